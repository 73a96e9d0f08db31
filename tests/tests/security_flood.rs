//! One device cannot stall everyone: a vehicle that floods delivery events as fast as the
//! broker acknowledges them (a raw MQTT client, 500 in flight) is held to `max_publish_rate`
//! by the broker (counted in `fleetbeat_broker_throttled_total`), and meanwhile every other
//! vehicle's heartbeats keep reaching a dispatcher (they travel on the bridge's own heartbeat
//! session, not behind the events' store commits).

use std::collections::BTreeSet;

use tests::WAIT;
use tests::crash::{EventPipeline, start_fast_demo_sim};
use tests::sio::SioClient;
use tests::stack::start_bridge;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_flood_from_one_vehicle_does_not_stall_the_others_heartbeats() -> anyhow::Result<()>
{
    let bridge = start_bridge(&[]).await?;
    let _sim = start_fast_demo_sim(bridge.mqtt, 4)?;
    let mut dispatcher = SioClient::dispatcher_in(&bridge.url(), "all").await?;
    let others = dispatcher.vehicles_seen(4, WAIT).await?;

    let flood = EventPipeline::start(bridge.mqtt, "demo", "flood-0001", 500)?;
    // Well into the flood: more than one second's worth of the limit (100 a second).
    flood.wait_acked_beyond(150, WAIT).await?;
    dispatcher.drain_events("position");
    // Every other vehicle is seen moving again while the flood goes on.
    let mut seen = BTreeSet::new();
    while !others.is_subset(&seen) {
        for position in dispatcher.positions_until(WAIT, |_| true).await? {
            seen.insert(position["vehicle"].as_str().unwrap_or_default().to_owned());
        }
    }
    let acked_meanwhile = flood.acked();
    assert!(
        acked_meanwhile > 150,
        "the flood went on: {acked_meanwhile} events acknowledged"
    );
    let throttled = bridge.metric("fleetbeat_broker_throttled_total").await?;
    assert!(
        throttled >= 1.0,
        "the flooding vehicle was throttled: {throttled}"
    );
    let report = flood.finish(WAIT).await?;
    assert_eq!(
        report.acked.len() as u32,
        report.published,
        "every event the flood published was acknowledged in the end"
    );
    Ok(())
}
