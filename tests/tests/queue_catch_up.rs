//! The classic parcel-service acceptance test: a vendor that was offline while its orders were
//! delivered catches up with `getAll`, acknowledges, and then nothing is pending.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use tests::sio::SioClient;
use tests::stack::{start_bridge, start_sim};

/// device-sim with a sped-up clock: a whole delivery takes seconds instead of minutes.
const SPED_UP: [&str; 4] = ["--rate", "5", "--time-scale", "40"];

const DELIVERY_WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_vendor_catches_up_and_acknowledges() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let _sim = start_sim(bridge.mqtt, 3, "demo", &SPED_UP)?;
    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    dispatcher.join("fleet:demo").await?;
    dispatcher.vehicles_seen(3, tests::WAIT).await?;

    // The vendor is there, then goes away.
    let mut vendor = SioClient::connect_with_token(&bridge.url(), "/vendor", "vendor-demo").await?;
    vendor.disconnect().await?;
    vendor
        .next_matching(tests::WAIT, |v| v["type"] == "disconnect")
        .await?;

    // Orders are placed (over HTTP) and delivered while it is away.
    let orders = ["catch-1", "catch-2"];
    for (i, order) in orders.iter().enumerate() {
        let body = json!({ "order": order, "customer": "Ada", "lat": 52.525 - 0.01 * i as f64, "lon": 13.41 });
        let (status, placed) = bridge
            .post_json("/api/orders", "vendor-demo", &body)
            .await?;
        assert_eq!(status, 201, "{placed}");
    }
    let mut delivered = BTreeSet::new();
    while delivered.len() < orders.len() {
        let d = dispatcher.next_event("delivery", DELIVERY_WAIT).await?;
        if d["kind"] == "delivered" {
            delivered.insert(d["order"].as_str().unwrap_or_default().to_owned());
        }
    }
    for order in orders {
        let (status, view) = bridge
            .get_json(&format!("/api/orders/{order}"), Some("vendor-demo"))
            .await?;
        assert_eq!(status, 200);
        assert_eq!(view["state"], "delivered", "{view}");
        let kinds: Vec<&str> = view["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["kind"].as_str())
            .collect();
        assert!(
            kinds.ends_with(&["pickup", "in-transit", "delivered"]),
            "{kinds:?}"
        );
    }
    // The store's group commit shows on /metrics: every one of those six events was committed
    // (a vehicle's re-send counts too), in at most as many transactions.
    let events = bridge
        .metric("fleetbeat_bridge_store_events_committed_total")
        .await?;
    let commits = bridge
        .metric("fleetbeat_bridge_store_event_commits_total")
        .await?;
    let largest = bridge
        .metric("fleetbeat_bridge_store_event_group_largest")
        .await?;
    assert!(events >= 6.0, "{events} events committed");
    assert!((1.0..=events).contains(&commits), "{commits} commits");
    assert!((1.0..=events).contains(&largest), "largest group {largest}");
    // The vendor's messages and its room's `order` events found no socket while it was away:
    // skipped before they were serialized, and counted. The dispatcher, in its rooms, got its
    // events all along (above).
    let unheard = bridge
        .metric("fleetbeat_bridge_socketio_emits_unheard_total")
        .await?;
    assert!(unheard >= 6.0, "{unheard} events for rooms nobody was in");

    // Back online: getAll brings every missed event (pending ones are also re-sent on connect;
    // duplicates carry the same message id).
    vendor.reconnect().await?;
    let all = vendor.emit_ack("getAll", json!([])).await?;
    assert_eq!(all["ok"], true);
    assert_eq!(all["count"], 6, "{all}");
    let mut by_id: BTreeMap<u64, Value> = BTreeMap::new();
    while by_id.len() < 6 {
        let d = vendor.next_event("delivery", tests::WAIT).await?;
        by_id.insert(d["message_id"].as_u64().unwrap_or_default(), d);
    }
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for d in by_id.values() {
        assert_eq!(d["store"], "store-1");
        seen.insert((
            d["order"].as_str().unwrap_or_default().into(),
            d["kind"].as_str().unwrap_or_default().into(),
        ));
    }
    assert_eq!(seen.len(), 6, "every step of both orders: {seen:?}");

    for id in by_id.keys() {
        let ack = vendor
            .emit_ack("received", json!([{ "messageId": id }]))
            .await?;
        assert_eq!(ack, json!({ "ok": true, "removed": true }));
    }
    let again = vendor
        .emit_ack("received", json!([{ "messageId": by_id.keys().next() }]))
        .await?;
    assert_eq!(again["removed"], false, "an ack is idempotent");
    let empty = vendor.emit_ack("getAll", json!([])).await?;
    assert_eq!(empty["count"], 0, "{empty}");
    vendor.close().await;
    dispatcher.close().await;
    Ok(())
}
