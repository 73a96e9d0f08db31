//! Data scoped to the reader (issue 14): an order goes only to the dispatchers of its fleet
//! (with the customer's details) and to nobody else; "not yours" and "does not exist" get the
//! same answer; a delivery event from a vehicle that does not hold the order never reaches the
//! vendor as genuine. Real bridge, real `socket.io-client`, real `mosquitto_pub`.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::{Value, json};
use shared::{DeliveryEvent, DeliveryKind, OrderId, Position, VehicleId};
use tests::WAIT;
use tests::sio::SioClient;
use tests::stack::{BridgeProcess, start_bridge, start_sim, write_bridge_config};
use tests::temp_dir;

/// Two stores in two fleets, a dispatcher per fleet, one of every fleet, and an operator.
const TOKENS: &str = r#"
[[tokens]]
token = "store-n-secret"
role = "vendor"
store = "store-n"
fleet = "north"
name = "store-n"
location = [52.52, 13.405]

[[tokens]]
token = "store-s-secret"
role = "vendor"
store = "store-s"
fleet = "south"
name = "store-s"
location = [52.50, 13.40]

[[tokens]]
token = "north-secret"
role = "dispatcher"
fleets = ["north"]
name = "north-desk"

[[tokens]]
token = "south-secret"
role = "dispatcher"
fleets = ["south"]
name = "south-desk"

[[tokens]]
token = "every-secret"
role = "dispatcher"
fleets = ["*"]
name = "every-desk"

[[tokens]]
token = "admin-secret"
role = "admin"
name = "ops"
"#;

/// A bridge with [`TOKENS`]; the configuration file lives as long as the bridge.
async fn scoped_bridge() -> anyhow::Result<(BridgeProcess, tempfile::NamedTempFile)> {
    let config = write_bridge_config(TOKENS)?;
    let path = config.path().to_str().context("utf-8 path")?.to_owned();
    let bridge = start_bridge(&["--config", &path]).await?;
    Ok((bridge, config))
}

fn order(id: &str, customer: &str) -> Value {
    json!({ "order": id, "customer": customer, "lat": 52.51, "lon": 13.39 })
}

/// The orders of the `pickup` events `client` got before the operator's announcement
/// `barrier`: everything emitted before the announcement arrives before it on the same
/// connection, so what is not here was not sent.
async fn pickups_before(client: &mut SioClient, barrier: &str) -> anyhow::Result<BTreeSet<String>> {
    loop {
        let announce = client.next_event("announce", WAIT).await?;
        if announce["message"] == barrier {
            break;
        }
    }
    Ok(client
        .drain_events("pickup")
        .iter()
        .map(|p| p["order"].as_str().unwrap_or_default().to_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_goes_only_to_the_dispatchers_of_its_fleet() -> anyhow::Result<()> {
    let (bridge, _config) = scoped_bridge().await?;
    let url = bridge.url();
    let mut sender = SioClient::connect_with_token(&url, "/vendor", "store-n-secret").await?;
    let mut same_store = SioClient::connect_with_token(&url, "/vendor", "store-n-secret").await?;
    let mut other_store = SioClient::connect_with_token(&url, "/vendor", "store-s-secret").await?;
    let mut north = SioClient::connect_with_token(&url, "/dispatch", "north-secret").await?;
    let mut south = SioClient::connect_with_token(&url, "/dispatch", "south-secret").await?;
    let mut every = SioClient::connect_with_token(&url, "/dispatch", "every-secret").await?;
    let mut admin = SioClient::connect_with_token(&url, "/admin", "admin-secret").await?;

    // North's store places n-1 on its socket, south's s-1 over HTTP.
    let ack = sender
        .emit_ack("pickup", json!([order("n-1", "Ada North")]))
        .await?;
    assert_eq!(ack["ok"], true, "{ack}");
    let (status, placed) = bridge
        .post_json("/api/orders", "store-s-secret", &order("s-1", "Bob South"))
        .await?;
    assert_eq!(status, 201, "{placed}");

    // The dispatchers of the order's fleet get it with the customer's details.
    let orders = [("n-1", "Ada North"), ("s-1", "Bob South")];
    for (client, wanted) in [
        (&mut north, &orders[..1]),
        (&mut south, &orders[1..]),
        (&mut every, &orders[..]),
    ] {
        for &(id, customer) in wanted {
            let got = client
                .next_matching(WAIT, |v| {
                    v["type"] == "event" && v["event"] == "pickup" && v["args"][0]["order"] == id
                })
                .await?;
            assert_eq!(got["args"][0]["customer"], customer, "{got}");
        }
    }

    let barrier = "scope barrier";
    let ack = admin
        .emit_ack("announce", json!([{ "message": barrier }]))
        .await?;
    assert_eq!(ack["ok"], true, "{ack}");
    let set = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    // Nobody else got either: not the other fleet's dispatcher, not the other store, and the
    // sender only its ack; the store's other socket sees its own store's order.
    assert_eq!(
        pickups_before(&mut north, barrier).await?,
        set(&[]),
        "north"
    );
    assert_eq!(
        pickups_before(&mut south, barrier).await?,
        set(&[]),
        "south"
    );
    assert_eq!(
        pickups_before(&mut every, barrier).await?,
        set(&[]),
        "every"
    );
    assert_eq!(
        pickups_before(&mut other_store, barrier).await?,
        set(&["s-1"]),
        "another store must not see north's order (its own, placed over HTTP, it sees)"
    );
    assert_eq!(
        pickups_before(&mut sender, barrier).await?,
        set(&[]),
        "sender"
    );
    assert_eq!(
        pickups_before(&mut same_store, barrier).await?,
        set(&["n-1"]),
        "the store's other socket"
    );

    // Reading an order: its store and its fleet's dispatchers only, the same 404 otherwise.
    let (status, view) = bridge
        .get_json("/api/orders/n-1", Some("north-secret"))
        .await?;
    assert_eq!((status, &view["customer"]), (200, &json!("Ada North")));
    let missing = bridge
        .get_json("/api/orders/no-such-order", Some("south-secret"))
        .await?;
    assert_eq!(missing.0, 404);
    for token in ["south-secret", "store-s-secret"] {
        let theirs = bridge.get_json("/api/orders/n-1", Some(token)).await?;
        assert_eq!(
            (theirs.0, &theirs.1["error"]),
            (missing.0, &missing.1["error"]),
            "{token}: another's order answers like a missing one"
        );
    }
    for c in [sender, same_store, other_store, north, south, every, admin] {
        c.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_fleets_vehicle_answers_like_a_missing_one() -> anyhow::Result<()> {
    let (bridge, _config) = scoped_bridge().await?;
    let url = bridge.url();
    let _sim = start_sim(bridge.mqtt, 1, "south", &[])?;
    // Wait (bounded) until the bridge knows the south vehicle.
    let deadline = tokio::time::Instant::now() + WAIT;
    let vehicle = loop {
        let (_, list) = bridge
            .get_json("/api/vehicles", Some("every-secret"))
            .await?;
        if let Some(id) = list
            .as_array()
            .and_then(|l| l.first())
            .and_then(|v| v["vehicle"].as_str())
        {
            break id.to_owned();
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the simulated vehicle never appeared"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let missing = "no-such-vehicle";
    let (status, _) = bridge
        .get_json(&format!("/api/vehicles/{vehicle}"), Some("south-secret"))
        .await?;
    assert_eq!(status, 200, "its own dispatcher sees it");

    // The north dispatcher: every answer about the south vehicle equals the one about a
    // vehicle that does not exist.
    let north = Some("north-secret");
    for path in ["/api/vehicles/{}", "/api/vehicles/{}/track"] {
        let theirs = bridge
            .get_json(&path.replace("{}", &vehicle), north)
            .await?;
        let nothing = bridge.get_json(&path.replace("{}", missing), north).await?;
        assert_eq!(theirs.0, 404, "{path}: {}", theirs.1);
        assert_eq!(theirs, nothing, "{path}");
    }
    let ping = json!({ "type": "ping" });
    let theirs = bridge
        .post_json(
            &format!("/api/vehicles/{vehicle}/commands"),
            "north-secret",
            &ping,
        )
        .await?;
    let nothing = bridge
        .post_json(
            &format!("/api/vehicles/{missing}/commands"),
            "north-secret",
            &ping,
        )
        .await?;
    assert_eq!(theirs.0, 404, "{}", theirs.1);
    assert_eq!(theirs, nothing, "command over HTTP");

    let mut desk = SioClient::connect_with_token(&url, "/dispatch", "north-secret").await?;
    let command = |v: &str| json!([{ "vehicle": v, "type": "ping" }]);
    let theirs = desk.emit_ack("command", command(&vehicle)).await?;
    let nothing = desk.emit_ack("command", command(missing)).await?;
    assert_eq!(theirs["ok"], false, "{theirs}");
    assert_eq!(theirs, nothing, "command over Socket.IO");
    let theirs = desk.join(&format!("vehicle:{vehicle}")).await?;
    let nothing = desk.join(&format!("vehicle:{missing}")).await?;
    assert_eq!(theirs["ok"], false, "{theirs}");
    let unnamed = |ack: &Value, id: &str| ack["error"].as_str().unwrap_or("").replace(id, "ID");
    assert_eq!(
        unnamed(&theirs, &vehicle),
        unnamed(&nothing, missing),
        "join"
    );
    desk.close().await;
    Ok(())
}

/// A delivery event of vehicle `vehicle` of fleet `fleet` about `order`, sealed with the open
/// mode key, as the vehicle would publish it.
fn forged_event(
    fleet: &str,
    vehicle: &str,
    order: &str,
    kind: DeliveryKind,
    seq: u32,
) -> anyhow::Result<(String, Vec<u8>)> {
    let now = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    let id = VehicleId::new(vehicle).map_err(anyhow::Error::msg)?;
    let event = DeliveryEvent {
        seq,
        order: OrderId::new(order).map_err(anyhow::Error::msg)?,
        kind,
        ts_ms: now,
        pos: Position::new(525_000_000, 133_900_000),
    };
    let topic = format!("fleet/{fleet}/{vehicle}/event");
    let mut buf = [0u8; 128];
    let sealed = shared::seal(
        &event,
        &topic,
        now + u64::from(seq),
        &shared::open_mode_key(&id),
        &mut buf,
    )
    .map_err(anyhow::Error::msg)?;
    Ok((topic, sealed.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_from_a_vehicle_without_the_order_never_reaches_the_vendor() -> anyhow::Result<()>
{
    let (bridge, _config) = scoped_bridge().await?;
    let url = bridge.url();
    let mut vendor = SioClient::connect_with_token(&url, "/vendor", "store-n-secret").await?;
    let mut desk = SioClient::connect_with_token(&url, "/dispatch", "north-secret").await?;
    // No vehicle is online: the order waits, held by nobody.
    let ack = vendor
        .emit_ack("pickup", json!([order("forged-1", "Ada")]))
        .await?;
    assert_eq!(
        (ack["ok"].clone(), ack["state"].clone()),
        (json!(true), json!("created"))
    );

    // A vehicle of the fleet claims to have delivered it.
    let (topic, payload) =
        forged_event("north", "n-rogue", "forged-1", DeliveryKind::Delivered, 1)?;
    tests::mosquitto::publish(bridge.mqtt, &topic, &payload, 1).await?;

    // Its fleet's dispatcher gets it, flagged as suspect and without the store.
    let notice = desk.next_event("delivery", WAIT).await?;
    assert_eq!(notice["order"], "forged-1", "{notice}");
    assert_eq!(notice["suspect"], true, "{notice}");
    assert_eq!(notice["flag"], "wrong-vehicle", "{notice}");
    assert!(notice["store"].is_null(), "{notice}");

    // The vendor got nothing queued (the dispatcher's copy was committed in the same
    // transaction, so the vendor's would be there too), and nothing live.
    let pending = vendor.emit_ack("getAll", json!([])).await?;
    assert_eq!(pending["count"], 0, "the vendor was told: {pending}");
    assert!(
        vendor.drain_events("delivery").is_empty(),
        "the vendor got the forged event live"
    );
    // The order did not move; its timeline shows the event, flagged, to its vendor.
    let (status, view) = bridge
        .get_json("/api/orders/forged-1", Some("store-n-secret"))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(view["state"], "created", "{view}");
    let flags: Vec<&Value> = view["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| &t["flag"])
        .collect();
    assert_eq!(flags, [&json!("wrong-vehicle")], "{view}");
    vendor.close().await;
    desk.close().await;
    Ok(())
}

/// A dispatcher token named `desk` watching `fleets`.
fn desk_token(fleets: &str) -> String {
    format!(
        "[[tokens]]\ntoken = \"desk-secret\"\nrole = \"dispatcher\"\nname = \"desk\"\nfleets = {fleets}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_outside_a_narrowed_scope_are_not_sent() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let store = dir.path().join("fleetbeat.db");
    let store = store.to_str().context("utf-8 path")?;
    let wide = write_bridge_config(&desk_token(r#"["north", "south"]"#))?;
    let wide = wide.path().to_str().context("utf-8 path")?.to_owned();
    let listen = ["--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"];
    let mut args = listen.to_vec();
    args.extend(["--store", store, "--config", &wide]);
    let mut bridge = tests::stack::spawn_bridge(&args).await?;
    // One event of each fleet queued for `desk` (orders nobody placed: flagged, dispatchers only).
    let mut desk = SioClient::connect_with_token(&bridge.url(), "/dispatch", "desk-secret").await?;
    for (fleet, vehicle, seq) in [("north", "n-7", 1), ("south", "s-7", 1)] {
        let (topic, payload) = forged_event(
            fleet,
            vehicle,
            &format!("lost-{fleet}"),
            DeliveryKind::Pickup,
            seq,
        )?;
        tests::mosquitto::publish(bridge.mqtt, &topic, &payload, 1).await?;
        let got = desk.next_event("delivery", WAIT).await?;
        assert_eq!(got["fleet"], fleet, "{got}");
    }
    desk.close().await;
    bridge.program.terminate(WAIT).await?;

    // The same identity, now for north only: south's message stays where it is.
    let narrow = write_bridge_config(&desk_token(r#"["north"]"#))?;
    let narrow = narrow.path().to_str().context("utf-8 path")?.to_owned();
    let mut args = listen.to_vec();
    args.extend(["--store", store, "--config", &narrow]);
    let bridge = tests::stack::spawn_bridge(&args).await?;
    let mut desk = SioClient::connect_with_token(&bridge.url(), "/dispatch", "desk-secret").await?;
    let page = desk.emit_ack("getAll", json!([])).await?;
    assert_eq!(page["count"], 1, "{page}");
    let fleets: Vec<Value> = desk
        .drain_events("delivery")
        .iter()
        .map(|d| d["fleet"].clone())
        .collect();
    // Once on connect, once for getAll: north's only.
    assert_eq!(fleets, [json!("north"), json!("north")]);
    desk.close().await;
    Ok(())
}
