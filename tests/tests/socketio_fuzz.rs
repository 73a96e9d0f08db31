//! Hostile JSON on every Socket.IO handler: a real `socket.io-client` on each namespace
//! (`/dispatch`, `/vendor`, `/admin`) sends every event the bridge handles with arguments drawn
//! by proptest (any JSON: nulls, huge and fractional numbers, long and odd strings, nested
//! arrays and objects with the field names the handlers read, room names that exist and that
//! do not). Each emit must be answered (an ack: a clear result or error, never silence), nothing
//! may panic, and afterwards the bridge is ready and a dispatcher still gets its snapshot.
//!
//! CI-sized: 120 emits. Longer: `FUZZ_EMITS=5000 cargo test -p tests --test socketio_fuzz`.

use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::TestRunner;
use serde_json::{Map, Value, json};
use tests::sio::SioClient;
use tests::stack::start_bridge;

/// The events each namespace handles, with the token that opens it (demo mode).
const TARGETS: [(&str, &str, &[&str]); 3] = [
    (
        "/dispatch",
        "dispatch-demo",
        &["join", "leave", "command", "received", "getAll"],
    ),
    (
        "/vendor",
        "vendor-demo",
        &["join", "pickup", "received", "getAll"],
    ),
    ("/admin", "admin-demo", &["stats", "announce"]),
];

/// Strings the handlers may take for something real.
const NAMES: [&str; 14] = [
    "all",
    "fleet:demo",
    "fleet:other",
    "vehicle:demo-0001",
    "vehicle:nope",
    "vendor:demo",
    "vendor:store-2",
    "demo-0001",
    "ord-1",
    "",
    "*",
    "fleet:",
    "vehicle:../../etc",
    "\u{0}\u{ffff}",
];

/// Field names the handlers read.
const KEYS: [&str; 16] = [
    "room",
    "vehicle",
    "order",
    "id",
    "cmd",
    "type",
    "lat",
    "lon",
    "customer",
    "dropoff",
    "pickup",
    "message_id",
    "ids",
    "after",
    "limit",
    "text",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        (0usize..NAMES.len()).prop_map(|i| Value::from(NAMES[i])),
        (1usize..20_000).prop_map(|n| Value::from("x".repeat(n))),
    ];
    leaf.prop_recursive(3, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec(((0usize..KEYS.len()), inner), 0..6).prop_map(|fields| {
                Value::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (KEYS[k].to_owned(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handler_answers_hostile_json_and_nothing_breaks() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let url = bridge.url();
    let mut clients = Vec::new();
    for (namespace, token, events) in TARGETS {
        let client = SioClient::connect_with_token(&url, namespace, token).await?;
        clients.push((client, namespace, events));
    }
    let emits: usize = std::env::var("FUZZ_EMITS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(120);
    let args = proptest::collection::vec(json_value(), 0..3);
    let mut runner = TestRunner::deterministic();
    for n in 0..emits {
        let (client, namespace, events) = &mut clients[n % TARGETS.len()];
        let event = events[(n / TARGETS.len()) % events.len()];
        let value = args
            .new_tree(&mut runner)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .current();
        let sent = Value::Array(value);
        let answer = client
            .emit_ack(event, sent.clone())
            .await
            .map_err(|err| anyhow::anyhow!("{namespace} {event} {sent}: no answer ({err:#})"))?;
        // An answer is an object saying how it went (`reply::ack`), whatever went in.
        assert!(
            answer["ok"].is_boolean(),
            "{namespace} {event} {sent}: {answer}"
        );
    }

    let log = bridge.program.log_text();
    assert!(!log.contains("panicked"), "a panic in the bridge:\n{log}");
    let (status, body) = bridge.get("/readyz").await?;
    assert_eq!(status, 200, "{body}");
    let mut fresh = SioClient::dispatcher(&url).await?;
    let joined = fresh.join("all").await?;
    assert_eq!(joined["ok"], json!(true), "{joined}");
    Ok(())
}
