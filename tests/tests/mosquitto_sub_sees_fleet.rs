//! An engineer with `mosquitto_sub` sees device-sim's traffic on the embedded broker.

use shared::{Heartbeat, Status, Topic, TopicKind};
use tests::mosquitto;
use tests::stack::{start_bridge, start_sim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_sees_heartbeats_and_status() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let sub = tokio::spawn(mosquitto::sub_topics(bridge.mqtt, "fleet/#", 12));
    let _sim = start_sim(bridge.mqtt, 3, "south", &["--rate", "5"])?;
    let lines = sub.await??;
    assert_eq!(lines.len(), 12);
    let mut kinds = std::collections::BTreeSet::new();
    for topic in &lines {
        let parsed = Topic::parse(topic).map_err(|e| anyhow::anyhow!("{topic}: {e}"))?;
        assert_eq!(parsed.fleet.as_str(), "south");
        assert!(parsed.vehicle.as_str().starts_with("south-"), "{topic}");
        kinds.insert(parsed.kind);
    }
    assert!(kinds.contains(&TopicKind::Heartbeat), "{lines:?}");
    // mosquitto_sub prints payloads as text; read exact bytes with -F %x to decode them.
    let hb = mosquitto::sub_payloads(bridge.mqtt, "fleet/south/south-0001/hb", 1).await?;
    let hb: Heartbeat = shared::decode(&hb[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(hb.pos.is_valid() && hb.pos.lat_e7 != 0);
    // The retained status says online.
    let status = mosquitto::sub_payloads(bridge.mqtt, "fleet/south/south-0002/status", 1).await?;
    assert_eq!(shared::decode::<Status>(&status[0]), Ok(Status::Online));
    Ok(())
}
