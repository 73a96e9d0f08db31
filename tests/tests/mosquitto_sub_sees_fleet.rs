//! An engineer with `mosquitto_sub` sees device-sim's traffic on the embedded broker.

use shared::{Heartbeat, Status, Topic, TopicKind, VehicleId, open_mode_key};
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
    // Payloads are sealed; in open mode each vehicle's key is derived from its id.
    let topic = "fleet/south/south-0001/hb";
    let hb = mosquitto::sub_payloads(bridge.mqtt, topic, 1).await?;
    let key = open_mode_key(&VehicleId::new("south-0001").map_err(anyhow::Error::msg)?);
    let hb = shared::open::<Heartbeat>(&hb[0], topic, &key)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .msg;
    assert!(hb.pos.is_valid() && hb.pos.lat_e7 != 0);
    // The retained status says online.
    let topic = "fleet/south/south-0002/status";
    let status = mosquitto::sub_payloads(bridge.mqtt, topic, 1).await?;
    let key = open_mode_key(&VehicleId::new("south-0002").map_err(anyhow::Error::msg)?);
    assert_eq!(
        shared::open::<Status>(&status[0], topic, &key).map(|o| o.msg),
        Ok(Status::Online)
    );
    Ok(())
}
