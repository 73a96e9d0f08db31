//! Orders in the API (issue #16 item 2), on a real bridge with real `device-sim` vehicles and
//! a real `socket.io-client`: orders are listed and filtered within each token's scope (a
//! vendor sees its store's only, another store's or another fleet's order answers like a
//! missing one); a dispatcher places an order on a store's behalf; cancelling tells the
//! vehicle (`CancelOrder`, acked) and frees it for the next order; a dispatcher reassigns an
//! order to the vehicle it chooses; every state change reaches the right sockets as an `order`
//! event, in order; an order stuck on a vehicle whose simulator was killed is offered again
//! after `--orders-reoffer-after-ms`; an order waiting behind more than a page of another
//! fleet's orders is offered once its own fleet has a free vehicle.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tests::WAIT;
use tests::process::Program;
use tests::sio::SioClient;
use tests::stack::{BridgeProcess, start_bridge, start_sim, write_bridge_config};

/// Stores `store-a` and `store-b` of fleet `demo`, `store-e` of fleet `east`; a dispatcher of
/// each fleet, and an operator.
const TOKENS: &str = r#"
[[tokens]]
token = "store-a-secret"
role = "vendor"
store = "store-a"
fleet = "demo"
name = "store-a"
location = [52.52, 13.405]

[[tokens]]
token = "store-b-secret"
role = "vendor"
store = "store-b"
fleet = "demo"
name = "store-b"
location = [52.521, 13.406]

[[tokens]]
token = "store-e-secret"
role = "vendor"
store = "store-e"
fleet = "east"
name = "store-e"
location = [52.519, 13.404]

[[tokens]]
token = "demo-desk-secret"
role = "dispatcher"
fleets = ["demo"]
name = "demo-desk"

[[tokens]]
token = "east-desk-secret"
role = "dispatcher"
fleets = ["east"]
name = "east-desk"

[[tokens]]
token = "admin-secret"
role = "admin"
name = "ops"
"#;

const STORE_A: &str = "store-a-secret";
const STORE_B: &str = "store-b-secret";
const STORE_E: &str = "store-e-secret";
const DEMO_DESK: &str = "demo-desk-secret";
const EAST_DESK: &str = "east-desk-secret";
const ADMIN: &str = "admin-secret";

/// A bridge with [`TOKENS`] that re-offers orders of vehicles offline for 2 s; the
/// configuration file lives as long as the bridge.
async fn orders_bridge() -> anyhow::Result<(BridgeProcess, tempfile::NamedTempFile)> {
    let config = write_bridge_config(TOKENS)?;
    let path = config.path().to_str().context("utf-8 path")?.to_owned();
    let bridge = start_bridge(&["--config", &path, "--orders-reoffer-after-ms", "2000"]).await?;
    Ok((bridge, config))
}

/// A new order near the stores.
fn order(id: &str, k: u32) -> Value {
    json!({
        "order": id,
        "customer": format!("customer {k}"),
        "lat": 52.515 + 0.001 * f64::from(k),
        "lon": 13.40,
    })
}

/// Waits until `/api/vehicles` (as `token`) shows `ids` online with a position.
async fn wait_online(bridge: &BridgeProcess, token: &str, ids: &[&str]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, vehicles) = bridge.get_json("/api/vehicles", Some(token)).await?;
        anyhow::ensure!(status == 200, "{vehicles}");
        let ready = ids.iter().all(|id| {
            vehicles.as_array().is_some_and(|all| {
                all.iter().any(|v| {
                    v["vehicle"] == *id && v["status"] == "online" && !v["position"].is_null()
                })
            })
        });
        if ready {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{ids:?} not all online with a position: {vehicles}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `order` events a socket received, in arrival order.
struct OrderEvents {
    client: SioClient,
    seen: Vec<Value>,
}

impl OrderEvents {
    fn new(client: SioClient) -> Self {
        Self {
            client,
            seen: Vec::new(),
        }
    }

    /// Reads `order` events until one says `order` is in `state`; returns it.
    async fn until(&mut self, order: &str, state: &str) -> anyhow::Result<Value> {
        loop {
            let event = self
                .client
                .next_event("order", WAIT)
                .await
                .with_context(|| format!("waiting for {order} {state}; seen {:?}", self.seen))?;
            self.seen.push(event.clone());
            if event["order"] == order && event["state"] == state {
                return Ok(event);
            }
        }
    }

    /// The states `order` went through, as the events said, in order.
    fn states_of(&self, order: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter(|e| e["order"] == order)
            .map(|e| e["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The stores of every event seen.
    fn stores(&self) -> Vec<String> {
        self.seen
            .iter()
            .map(|e| e["store"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// The ids `GET /api/orders{query}` lists for `token`.
async fn list(bridge: &BridgeProcess, token: &str, query: &str) -> anyhow::Result<Vec<String>> {
    let (status, list) = bridge
        .get_json(&format!("/api/orders{query}"), Some(token))
        .await?;
    anyhow::ensure!(status == 200, "{query} as {token}: {list}");
    Ok(ids(&list))
}

/// `GET /api/stores` for `token`: its `stores`.
async fn stores(bridge: &BridgeProcess, token: &str) -> anyhow::Result<Value> {
    let (status, body) = bridge.get_json("/api/stores", Some(token)).await?;
    anyhow::ensure!(status == 200, "{body}");
    Ok(body["stores"].clone())
}

fn ids(list: &Value) -> Vec<String> {
    list["orders"]
        .as_array()
        .map(|orders| {
            orders
                .iter()
                .map(|o| o["order"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_listed_cancelled_and_reassigned_within_scope() -> anyhow::Result<()> {
    let (bridge, _config) = orders_bridge().await?;
    let url = bridge.url();
    let mut desk =
        OrderEvents::new(SioClient::connect_with_token(&url, "/dispatch", DEMO_DESK).await?);
    let mut vendor_a =
        OrderEvents::new(SioClient::connect_with_token(&url, "/vendor", STORE_A).await?);
    let mut east_desk =
        OrderEvents::new(SioClient::connect_with_token(&url, "/dispatch", EAST_DESK).await?);
    // Real time: a vehicle drives to the store and then spends 8 s or more there before it
    // reports `picked-up`; this test takes a few seconds, so no order is picked up during it
    // (reassignment is for orders not picked up yet).
    let mut sim = start_sim(bridge.mqtt, 2, "demo", &["--rate", "2", "--seed", "3"])?;
    wait_online(&bridge, DEMO_DESK, &["demo-0001", "demo-0002"]).await?;

    // store-a places o-1; the demo desk places o-2 for store-b. Each gets a vehicle.
    let (status, placed) = bridge
        .post_json("/api/orders", STORE_A, &order("o-1", 1))
        .await?;
    assert_eq!(status, 201, "{placed}");
    let first = placed["vehicle"]
        .as_str()
        .context("o-1 assigned")?
        .to_owned();
    let mut on_behalf = order("o-2", 2);
    on_behalf["store"] = json!("store-b");
    let (status, placed) = bridge
        .post_json("/api/orders", DEMO_DESK, &on_behalf)
        .await?;
    assert_eq!(status, 201, "{placed}");
    let second = placed["vehicle"]
        .as_str()
        .context("o-2 assigned")?
        .to_owned();
    assert_ne!(first, second, "one order per vehicle");
    let (status, o2) = bridge.get_json("/api/orders/o-2", Some(STORE_B)).await?;
    assert_eq!((status, &o2["store"]), (200, &json!("store-b")), "{o2}");
    assert_eq!(
        o2["pickup"],
        json!({ "lat": 52.521, "lon": 13.406 }),
        "the store's location"
    );
    // Only a store of a fleet the caller may see; a vendor only for itself.
    for (token, store) in [
        (EAST_DESK, "store-b"),
        (ADMIN, "store-x"),
        (STORE_A, "store-b"),
    ] {
        let mut body = order("o-x", 9);
        body["store"] = json!(store);
        let (status, answer) = bridge.post_json("/api/orders", token, &body).await?;
        assert_eq!(status, 404, "{token} for {store}: {answer}");
    }
    let (status, answer) = bridge
        .post_json("/api/orders", DEMO_DESK, &order("o-x", 9))
        .await?;
    assert_eq!(status, 422, "a dispatcher must name the store: {answer}");

    // Lists, newest first, within the scope.
    assert_eq!(list(&bridge, DEMO_DESK, "").await?, ["o-2", "o-1"]);
    assert_eq!(
        list(&bridge, ADMIN, "?state=assigned,created").await?,
        ["o-2", "o-1"]
    );
    assert_eq!(
        list(&bridge, DEMO_DESK, "?state=created").await?,
        Vec::<String>::new()
    );
    assert_eq!(list(&bridge, DEMO_DESK, "?store=store-b").await?, ["o-2"]);
    assert_eq!(list(&bridge, DEMO_DESK, "?limit=1").await?, ["o-2"]);
    let by_vehicle = format!("?vehicle={first}");
    assert_eq!(list(&bridge, DEMO_DESK, &by_vehicle).await?, ["o-1"]);
    assert_eq!(
        list(&bridge, STORE_A, "").await?,
        ["o-1"],
        "a vendor sees its own"
    );
    assert_eq!(
        list(&bridge, STORE_A, "?store=store-b").await?,
        Vec::<String>::new()
    );
    assert_eq!(
        list(&bridge, EAST_DESK, "").await?,
        Vec::<String>::new(),
        "another fleet"
    );
    let (status, answer) = bridge
        .get_json("/api/orders?state=lost", Some(DEMO_DESK))
        .await?;
    assert_eq!(status, 400, "{answer}");
    for (token, order) in [(STORE_B, "o-1"), (EAST_DESK, "o-1"), (STORE_A, "o-2")] {
        let (status, answer) = bridge
            .get_json(&format!("/api/orders/{order}"), Some(token))
            .await?;
        assert_eq!(status, 404, "{token} reading {order}: {answer}");
        let (status, answer) = bridge
            .post_json(&format!("/api/orders/{order}/cancel"), token, &json!({}))
            .await?;
        assert_eq!(status, 404, "{token} cancelling {order}: {answer}");
    }
    assert_eq!(
        stores(&bridge, DEMO_DESK).await?,
        json!([
            { "store": "store-a", "fleet": "demo", "lat": 52.52, "lon": 13.405 },
            { "store": "store-b", "fleet": "demo", "lat": 52.521, "lon": 13.406 },
        ])
    );
    assert_eq!(
        stores(&bridge, STORE_A).await?.as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(stores(&bridge, EAST_DESK).await?[0]["store"], "store-e");
    assert_eq!(
        stores(&bridge, ADMIN).await?.as_array().map(Vec::len),
        Some(3)
    );

    // store-a cancels o-1: its vehicle acks CancelOrder and takes the next order.
    let (status, cancelled) = bridge
        .post_json("/api/orders/o-1/cancel", STORE_A, &json!({}))
        .await?;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(cancelled["vehicle_ack"], "ok", "{cancelled}");
    let (status, again) = bridge
        .post_json("/api/orders/o-1/cancel", DEMO_DESK, &json!({}))
        .await?;
    assert_eq!(
        (status, &again["state"]),
        (200, &json!("cancelled")),
        "{again}"
    );
    assert!(again["vehicle_ack"].is_null(), "told once: {again}");
    let (status, placed) = bridge
        .post_json("/api/orders", STORE_A, &order("o-3", 3))
        .await?;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(
        placed["vehicle"],
        json!(first),
        "the freed vehicle accepts: {placed}"
    );

    // Reassigning: vendors may not; a busy vehicle is refused; a free one takes it, and the
    // vehicle that lost it is free again (it dropped the order).
    let to = |vehicle: &str| json!({ "vehicle": vehicle });
    let (status, answer) = bridge
        .post_json("/api/orders/o-3/assign", STORE_A, &to(&second))
        .await?;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = bridge
        .post_json("/api/orders/o-3/assign", DEMO_DESK, &to(&second))
        .await?;
    assert_eq!(status, 409, "busy with o-2: {answer}");
    let (status, answer) = bridge
        .post_json("/api/orders/o-3/assign", EAST_DESK, &to(&second))
        .await?;
    assert_eq!(status, 404, "another fleet's order: {answer}");
    let (status, cancelled) = bridge
        .post_json("/api/orders/o-2/cancel", DEMO_DESK, &json!({}))
        .await?;
    assert_eq!(
        (status, &cancelled["vehicle_ack"]),
        (200, &json!("ok")),
        "{cancelled}"
    );
    let (status, moved) = bridge
        .post_json("/api/orders/o-3/assign", DEMO_DESK, &to(&second))
        .await?;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(
        (&moved["state"], &moved["vehicle"]),
        (&json!("assigned"), &json!(second))
    );
    let (_, o3) = bridge.get_json("/api/orders/o-3", Some(STORE_A)).await?;
    assert_eq!(o3["vehicle"], json!(second), "{o3}");
    let (status, placed) = bridge
        .post_json("/api/orders", STORE_A, &order("o-4", 4))
        .await?;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(
        placed["vehicle"],
        json!(first),
        "the vehicle that lost o-3 is free: {placed}"
    );
    assert_eq!(
        list(&bridge, DEMO_DESK, "?state=cancelled").await?,
        ["o-2", "o-1"]
    );

    // Every change reached the desk and store-a as `order` events, in order; store-a never
    // saw store-b's order, the east desk none of these.
    desk.until("o-4", "assigned").await?;
    vendor_a.until("o-4", "assigned").await?;
    for events in [&desk, &vendor_a] {
        assert_eq!(
            events.states_of("o-1"),
            ["created", "assigned", "cancelled"]
        );
        assert_eq!(
            events.states_of("o-3"),
            ["created", "assigned", "created", "assigned"]
        );
        assert_eq!(events.states_of("o-4"), ["created", "assigned"]);
    }
    assert_eq!(desk.states_of("o-2"), ["created", "assigned", "cancelled"]);
    assert!(
        vendor_a.stores().iter().all(|s| s == "store-a"),
        "{:?}",
        vendor_a.seen
    );
    let last = vendor_a.seen.last().context("events")?;
    for key in [
        "order",
        "store",
        "fleet",
        "customer",
        "state",
        "vehicle",
        "pickup",
        "dropoff",
        "created_ms",
        "updated_ms",
        "ts_ms",
    ] {
        assert!(last.get(key).is_some(), "{key} missing in {last}");
    }
    assert!(east_desk.client.drain_events("order").is_empty());

    sim.terminate(WAIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_on_a_vehicle_that_went_offline_is_offered_again() -> anyhow::Result<()> {
    let (bridge, _config) = orders_bridge().await?;
    let url = bridge.url();
    let mut vendor =
        OrderEvents::new(SioClient::connect_with_token(&url, "/vendor", STORE_E).await?);
    // A short keep-alive: killed, the vehicle's last will comes within 1.5 s.
    let start = |seed: &str| -> anyhow::Result<Program> {
        start_sim(
            bridge.mqtt,
            1,
            "east",
            &["--rate", "2", "--seed", seed, "--keep-alive", "1"],
        )
    };
    let mut sim = start("4")?;
    wait_online(&bridge, EAST_DESK, &["east-0001"]).await?;
    let (status, placed) = bridge
        .post_json("/api/orders", STORE_E, &order("e-1", 1))
        .await?;
    assert_eq!(
        (status, &placed["vehicle"]),
        (201, &json!("east-0001")),
        "{placed}"
    );
    vendor.until("e-1", "assigned").await?;

    sim.kill().await?;
    // Offline (last will), then 2 s: the order goes back to `created`, without a vehicle.
    let back = vendor.until("e-1", "created").await?;
    assert!(back["vehicle"].is_null(), "{back}");
    let (_, view) = bridge.get_json("/api/orders/e-1", Some(EAST_DESK)).await?;
    assert_eq!(
        (&view["state"], &view["vehicle"]),
        (&json!("created"), &Value::Null),
        "{view}"
    );
    // Nobody online: it waits. A vehicle comes (back) online: it is offered the order.
    let mut sim = start("5")?;
    let again = vendor.until("e-1", "assigned").await?;
    assert_eq!(again["vehicle"], "east-0001", "{again}");
    assert_eq!(
        vendor.states_of("e-1"),
        ["created", "assigned", "created", "assigned"]
    );
    sim.terminate(WAIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_waiting_behind_another_fleets_backlog_is_offered_when_its_fleet_has_a_vehicle()
-> anyhow::Result<()> {
    let (bridge, _config) = orders_bridge().await?;
    let mut vendor =
        OrderEvents::new(SioClient::connect_with_token(&bridge.url(), "/vendor", STORE_E).await?);
    // More than a page (64) of `demo` orders wait first, with no `demo` vehicle anywhere.
    for k in 0..70 {
        let (status, placed) = bridge
            .post_json(
                "/api/orders",
                STORE_A,
                &order(&format!("backlog-{k:02}"), k),
            )
            .await?;
        assert_eq!(
            (status, &placed["vehicle"]),
            (201, &Value::Null),
            "{placed}"
        );
    }
    let (status, placed) = bridge
        .post_json("/api/orders", STORE_E, &order("e-late", 1))
        .await?;
    assert_eq!(
        (status, &placed["vehicle"]),
        (201, &Value::Null),
        "{placed}"
    );
    // An `east` vehicle comes online: the assigner finds e-late behind the backlog it skips.
    let mut sim = start_sim(bridge.mqtt, 1, "east", &["--rate", "2", "--seed", "6"])?;
    let assigned = vendor.until("e-late", "assigned").await?;
    assert_eq!(assigned["vehicle"], "east-0001", "{assigned}");
    let (_, view) = bridge
        .get_json("/api/orders?state=created&limit=100", Some(DEMO_DESK))
        .await?;
    let waiting = view["orders"].as_array().map_or(0, Vec::len);
    assert_eq!(waiting, 70, "the backlog still waits: {view}");
    sim.terminate(WAIT).await?;
    Ok(())
}
