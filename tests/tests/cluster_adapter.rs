//! Several bridges as one Socket.IO server (issue #15): socketioxide's Redis adapter carries
//! what one bridge emits to the clients of another. Real `bridge` processes, a real
//! `redis-server`, real `socket.io-client`s, real `device-sim` and `mosquitto`.
//!
//! - An order placed on bridge A reaches its fleet's dispatchers connected to bridge B (with
//!   the customer's details), never another fleet's dispatcher nor another store; its delivery
//!   events, recorded by whichever bridge the broker gave each to, reach the store's socket on
//!   B once each, and B's `received` acknowledges them (one PostgreSQL store, shared by both
//!   bridges).
//! - A dispatcher on B commands a vehicle whose ack also reaches A (the ack subscription is
//!   not shared): B answers, A ignores it (counted), watchers on both bridges see it once.
//! - A second bridge with a `client_id` registered by a live one refuses to start.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use testengines::postgres::TempPostgres;
use testengines::redis::TempRedis;
use tests::WAIT;
use tests::cluster::start_mosquitto;
use tests::process::Program;
use tests::sio::SioClient;
use tests::stack::{BridgeProcess, spawn_bridge, start_bridge, start_sim, write_bridge_config};
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

/// device-sim with a sped-up clock: a whole delivery takes seconds instead of minutes.
const SPED_UP: [&str; 4] = ["--rate", "5", "--time-scale", "40"];

/// How long a whole delivery may take.
const DELIVERY_WAIT: Duration = Duration::from_secs(120);

fn order(id: &str, customer: &str) -> Value {
    json!({ "order": id, "customer": customer, "lat": 52.51, "lon": 13.39 })
}

/// The events named `event` that `client` got before the operator's announcement `barrier`:
/// the announcement is emitted after them by the same bridge through the same Redis channel,
/// so what is not here was not sent.
async fn before_barrier(
    client: &mut SioClient,
    event: &str,
    barrier: &str,
) -> anyhow::Result<Vec<Value>> {
    loop {
        let announce = client.next_event("announce", WAIT).await?;
        if announce["message"] == barrier {
            break;
        }
    }
    Ok(client.drain_events(event))
}

/// The orders of the `pickup`s `client` got before `barrier`.
async fn pickups_before(client: &mut SioClient, barrier: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(before_barrier(client, "pickup", barrier)
        .await?
        .iter()
        .map(|p| p["order"].as_str().unwrap_or_default().to_owned())
        .collect())
}

/// Sends the operator's announcement `barrier` (from `admin`).
async fn announce(admin: &mut SioClient, barrier: &str) -> anyhow::Result<()> {
    let ack = admin
        .emit_ack("announce", json!([{ "message": barrier }]))
        .await?;
    anyhow::ensure!(ack["ok"] == true, "announce refused: {ack}");
    Ok(())
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_and_deliveries_reach_clients_on_the_other_bridge() -> anyhow::Result<()> {
    let redis = TempRedis::start()?;
    let config = write_bridge_config(TOKENS)?;
    let config = config.path().to_str().context("utf-8 path")?.to_owned();
    // One PostgreSQL store for both bridges: a message queued by A is acknowledged on B.
    let postgres = TempPostgres::start()?;
    let store = postgres.create_database("adapter")?;
    let redis_url = redis.url();
    let bridge = |id: &'static str, broker: Option<String>| {
        let mut args: Vec<String> = [
            "--config",
            config.as_str(),
            "--redis-url",
            redis_url.as_str(),
            "--client-id",
            id,
            "--store",
            store.as_str(),
            "--shared-group",
            "adapter",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(url) = broker {
            args.extend(["--mqtt-url".to_owned(), url]);
        }
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            start_bridge(&args).await
        }
    };
    // A embeds the broker, B uses it: one broker, as in any cluster (a bridge offers orders to
    // vehicles it can reach). Pickups and announcements are not MQTT: they reach B's clients
    // only through Redis.
    let a = bridge("bridge-a", None).await?;
    let b = bridge("bridge-b", Some(format!("mqtt://{}", a.mqtt))).await?;
    let (url_a, url_b) = (a.url(), b.url());

    let mut sender = SioClient::connect_with_token(&url_a, "/vendor", "store-n-secret").await?;
    let mut same_store = SioClient::connect_with_token(&url_b, "/vendor", "store-n-secret").await?;
    let mut other_store =
        SioClient::connect_with_token(&url_b, "/vendor", "store-s-secret").await?;
    let mut north = SioClient::connect_with_token(&url_b, "/dispatch", "north-secret").await?;
    let mut south = SioClient::connect_with_token(&url_a, "/dispatch", "south-secret").await?;
    let mut every = SioClient::connect_with_token(&url_b, "/dispatch", "every-secret").await?;
    let mut admin = SioClient::connect_with_token(&url_a, "/admin", "admin-secret").await?;

    // North's store places n-1 on A; south's store s-1 over HTTP on B.
    let ack = sender
        .emit_ack("pickup", json!([order("n-1", "Ada North")]))
        .await?;
    assert_eq!(ack["ok"], true, "{ack}");
    let (status, placed) = b
        .post_json("/api/orders", "store-s-secret", &order("s-1", "Bob South"))
        .await?;
    assert_eq!(status, 201, "{placed}");

    // The dispatchers of the order's fleet get it with the customer's details, whichever
    // bridge they are on.
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
    let barrier = "pickup barrier";
    announce(&mut admin, barrier).await?;
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
        "the store's socket on the other bridge"
    );

    // A north vehicle delivers n-1: the bridge the broker gives each step to records it and
    // queues it for the store, whose socket on B gets each one once (through Redis when A
    // recorded it).
    let _sim = start_sim(a.mqtt, 1, "north", &SPED_UP)?;
    let mut steps: BTreeMap<u64, String> = BTreeMap::new();
    loop {
        let d = same_store.next_event("delivery", DELIVERY_WAIT).await?;
        assert_eq!(d["order"], "n-1", "{d}");
        assert_eq!(d["store"], "store-n", "{d}");
        let id = d["message_id"].as_u64().context("message_id")?;
        let kind = d["kind"].as_str().unwrap_or_default().to_owned();
        assert!(
            steps.insert(id, kind.clone()).is_none(),
            "message {id} twice"
        );
        // Each step may reach a different bridge (the broker deals the vehicle's messages to
        // the group's members in turn), so they may be recorded, and queued, in another order
        // than sent (docs/scaling.md, "Order of a vehicle's events"): wait for all three.
        let kinds: BTreeSet<&str> = steps.values().map(String::as_str).collect();
        if ["pickup", "in-transit", "delivered"]
            .iter()
            .all(|k| kinds.contains(k))
        {
            break;
        }
    }
    let kinds: Vec<&str> = steps.values().map(String::as_str).collect();
    assert_eq!(kinds.len(), 3, "each step once: {kinds:?}");
    // Each exactly once on B, none for the other store.
    let barrier = "delivery barrier";
    announce(&mut admin, barrier).await?;
    let again = before_barrier(&mut same_store, "delivery", barrier).await?;
    assert!(again.is_empty(), "delivered twice: {again:?}");
    let theirs = before_barrier(&mut other_store, "delivery", barrier).await?;
    assert!(
        theirs.is_empty(),
        "another store got north's deliveries: {theirs:?}"
    );

    // Acknowledged on B, once.
    for id in steps.keys() {
        let ack = same_store
            .emit_ack("received", json!([{ "messageId": id }]))
            .await?;
        assert_eq!(ack, json!({ "ok": true, "removed": true }), "message {id}");
    }
    let first = steps.keys().next().context("no step")?;
    let again = same_store
        .emit_ack("received", json!([{ "messageId": first }]))
        .await?;
    assert_eq!(again["removed"], false, "{again}");

    for sample in ["fleetbeat_bridge_socketio_broadcast_failures_total"] {
        for bridge in [&a, &b] {
            assert_eq!(bridge.metric(sample).await?, 0.0, "{sample}");
        }
    }
    for c in [sender, same_store, other_store, north, south, every, admin] {
        c.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_on_one_bridge_is_answered_there() -> anyhow::Result<()> {
    let redis = TempRedis::start()?;
    let dir = temp_dir()?;
    let (_mosquitto, mqtt) = start_mosquitto(dir.path()).await?;
    let mqtt_url = format!("mqtt://{mqtt}");
    let redis_url = redis.url();
    let mut bridges: Vec<BridgeProcess> = Vec::new();
    for id in ["bridge-a", "bridge-b"] {
        bridges.push(
            spawn_bridge(&[
                "--listen",
                "127.0.0.1:0",
                "--mqtt-url",
                &mqtt_url,
                "--shared-group",
                "fleetbeat",
                "--redis-url",
                &redis_url,
                "--client-id",
                id,
                "--command-timeout-ms",
                "5000",
            ])
            .await?,
        );
    }
    let (a, b) = (&bridges[0], &bridges[1]);
    let _sim = start_sim(mqtt, 1, "cmd", &["--rate", "5"])?;
    let mut dispatcher = SioClient::dispatcher(&b.url()).await?;
    let mut watcher_a = SioClient::dispatcher(&a.url()).await?;
    let mut watcher_b = SioClient::dispatcher(&b.url()).await?;
    for c in [&mut dispatcher, &mut watcher_a, &mut watcher_b] {
        assert_eq!(c.join("vehicle:cmd-0001").await?, json!({ "ok": true }));
    }
    // Both bridges hear the vehicle (the heartbeats are shared between them).
    for c in [&mut dispatcher, &mut watcher_a] {
        c.positions_until(WAIT, |p| p["vehicle"] == "cmd-0001")
            .await?;
    }

    let mut ids = BTreeSet::new();
    for _ in 0..3 {
        let pong = dispatcher
            .emit_ack(
                "command",
                json!([{ "vehicle": "cmd-0001", "type": "ping" }]),
            )
            .await?;
        assert_eq!(pong["ok"], true, "{pong}");
        assert_eq!(pong["result"], "ok", "{pong}");
        ids.insert(pong["command_id"].as_u64().context("command_id")?);
    }
    // Everyone watching the vehicle, on either bridge, sees each ack once.
    let admin = SioClient::connect_with_token(&b.url(), "/admin", "admin-demo").await;
    let mut admin = admin?;
    let barrier = "ack barrier";
    announce(&mut admin, barrier).await?;
    for (name, watcher) in [("on A", &mut watcher_a), ("on B", &mut watcher_b)] {
        let seen: Vec<u64> = before_barrier(watcher, "ack", barrier)
            .await?
            .iter()
            .filter_map(|a| a["command_id"].as_u64())
            .collect();
        let unique: BTreeSet<u64> = seen.iter().copied().collect();
        assert_eq!(unique, ids, "{name}: {seen:?}");
        assert_eq!(seen.len(), ids.len(), "{name}: an ack twice: {seen:?}");
    }
    // A got every ack too (not shared) and ignored it quietly: counted, not answered.
    a.wait_metric(
        "fleetbeat_bridge_acks_for_other_bridges_total",
        |n| n >= 3.0,
        WAIT,
    )
    .await?;
    assert_eq!(
        b.metric("fleetbeat_bridge_acks_for_other_bridges_total")
            .await?,
        0.0
    );
    assert_eq!(
        a.metric("fleetbeat_bridge_commands_timed_out_total")
            .await?
            + b.metric("fleetbeat_bridge_commands_timed_out_total")
                .await?,
        0.0
    );
    for c in [dispatcher, watcher_a, watcher_b, admin] {
        c.close().await;
    }
    Ok(())
}

/// Starts a bridge with `args` (on ephemeral ports, with a store of its own) that must refuse
/// to start, and returns its log once it exited.
async fn refused_bridge(args: &[&str]) -> anyhow::Result<String> {
    let dir = temp_dir()?;
    let mut cmd = tokio::process::Command::new(tests::bin::path("bridge")?);
    cmd.args(["--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
        .args(args)
        .arg("--store")
        .arg(dir.path().join("refused.db"));
    let mut bridge = Program::spawn("bridge", cmd)?;
    let status = bridge.wait_exit(WAIT).await?;
    let log = bridge.log_text();
    anyhow::ensure!(!status.success(), "the bridge ran: {log}");
    anyhow::ensure!(
        bridge.find_line("bridge started").is_none(),
        "it must not start: {log}"
    );
    Ok(log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_in_use_by_a_live_bridge_is_refused() -> anyhow::Result<()> {
    let redis = TempRedis::start()?;
    let redis_url = redis.url();
    let args = ["--redis-url", redis_url.as_str(), "--client-id", "bridge-x"];
    let mut first = start_bridge(&args).await?;

    let log = refused_bridge(&args).await?;
    let wanted = "client_id bridge-x is in use by another bridge (registered in Redis): give \
                  each bridge its own client_id";
    assert!(log.contains(wanted), "{log}");
    // The first one is unharmed.
    first.wait_ready().await?;

    // Stopped gracefully, it releases its client id at once: a new bridge may take it.
    first.program.terminate(WAIT).await?;
    let again = start_bridge(&args).await?;
    again.wait_ready().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_is_counted_and_survived() -> anyhow::Result<()> {
    let mut redis = TempRedis::start()?;
    let redis_url = redis.url();
    let a = start_bridge(&["--redis-url", &redis_url, "--client-id", "bridge-a"]).await?;
    let b = start_bridge(&["--redis-url", &redis_url, "--client-id", "bridge-b"]).await?;
    let mut admin = SioClient::connect_with_token(&a.url(), "/admin", "admin-demo").await?;
    let mut on_a = SioClient::dispatcher(&a.url()).await?;
    let mut on_b = SioClient::dispatcher(&b.url()).await?;
    announce(&mut admin, "with redis").await?;
    for c in [&mut on_a, &mut on_b] {
        let got = c.next_event("announce", WAIT).await?;
        assert_eq!(got["message"], "with redis", "{got}");
    }
    let failures = "fleetbeat_bridge_socketio_broadcast_failures_total";
    assert_eq!(a.metric(failures).await?, 0.0);

    redis.kill();
    // A broadcast through the lost Redis fails: counted and logged; this bridge's own sockets
    // still get it, the operator gets an answer, the bridge keeps serving.
    announce(&mut admin, "without redis").await?;
    let got = on_a.next_event("announce", WAIT).await?;
    assert_eq!(got["message"], "without redis", "{got}");
    a.wait_metric(failures, |n| n >= 1.0, WAIT).await?;
    a.wait_metric("fleetbeat_bridge_redis_errors_total", |n| n >= 1.0, WAIT)
        .await?;
    assert!(
        a.program
            .find_line("Socket.IO adapter lost Redis")
            .is_some(),
        "{}",
        a.program.log_text()
    );
    let (status, _) = a.get("/healthz").await?;
    assert_eq!(status, 200);

    // Redis back (empty): both bridges reconnect and subscribe again by themselves; an
    // announcement on A reaches B again.
    redis.restart()?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let message = format!("after restart {n}");
        announce(&mut admin, &message).await?;
        let got = on_b
            .next_matching(Duration::from_secs(1), |v| {
                v["type"] == "event" && v["event"] == "announce"
            })
            .await;
        if got.is_ok() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "B never got an announcement from A after Redis came back:\n{}",
            b.program.log_text()
        );
    }
    // The registrations come back too (each bridge tries again soon while Redis is away):
    // A's key is in Redis again, and a bridge with A's client id is refused.
    let key = "fleetbeat:bridge:bridge-a";
    let deadline = tokio::time::Instant::now() + WAIT;
    while !redis.exists(key)? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "bridge-a's registration never came back:\n{}",
            a.program.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = refused_bridge(&["--redis-url", &redis_url, "--client-id", "bridge-a"]).await?;
    assert!(log.contains("is in use by another bridge"), "{log}");
    for c in [admin, on_a, on_b] {
        c.close().await;
    }
    Ok(())
}
