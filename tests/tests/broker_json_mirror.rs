//! The JSON mirror, read with `mosquitto_sub`: device-sim's postcard heartbeats and statuses
//! appear as readable JSON on `json/fleet/...`, faithfully (the same values the sealed payload
//! holds), and `--json-mirror false` switches it off.

use serde_json::Value;
use shared::{Heartbeat, VehicleId};
use tests::WAIT;
use tests::mosquitto::{unhex, watch};
use tests::stack::{BrokerProcess, start_broker_standalone, start_sim};

/// A `topic payload` line of `mosquitto_sub -v` with a JSON payload.
fn json_line(line: &str) -> anyhow::Result<(&str, Value)> {
    let (topic, payload) = line
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("not `topic payload`: {line}"))?;
    Ok((topic, serde_json::from_str(payload)?))
}

/// Messages the broker mirrored as JSON so far.
async fn mirrored(broker: &BrokerProcess) -> anyhow::Result<f64> {
    broker
        .metric("fleetbeat_broker_mirror_published_total")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_statuses_are_mirrored_as_json() -> anyhow::Result<()> {
    let broker = start_broker_standalone(&[]).await?;
    let mut raw = watch(broker.mqtt, &["-t", "fleet/demo/demo-0001/hb", "-F", "%x"]).await?;
    let mut mirror = watch(broker.mqtt, &["-t", "json/fleet/#", "-v"]).await?;
    let _sim = start_sim(broker.mqtt, 2, "demo", &["--rate", "5"])?;

    // Every vehicle's status, retained, then heartbeats: readable JSON, verified seals.
    for vehicle in ["demo-0001", "demo-0002"] {
        let line = mirror
            .next_matching(WAIT, |l| {
                l.starts_with(&format!("json/fleet/demo/{vehicle}/status "))
            })
            .await?;
        let (_, doc) = json_line(&line)?;
        assert_eq!(doc["status"], "online", "{line}");
        assert_eq!(doc["origin"], "open mode: public key, not proof", "{line}");
    }
    let line = mirror
        .next_matching(WAIT, |l| l.starts_with("json/fleet/demo/demo-0002/hb "))
        .await?;
    let (_, doc) = json_line(&line)?;
    assert_eq!(doc["origin"], "open mode: public key, not proof", "{line}");
    for field in [
        "seq",
        "ts_ms",
        "lat",
        "lon",
        "speed_cm_s",
        "heading_deg",
        "battery_pct",
    ] {
        assert!(doc[field].is_number(), "{field} in {line}");
    }
    assert!(doc["flags"].is_array(), "{line}");

    // The mirror says what the sealed payload says: find the JSON of a heartbeat read raw.
    let key = shared::open_mode_key(&VehicleId::new("demo-0001").map_err(anyhow::Error::msg)?);
    let hex = raw.next(WAIT).await?;
    let hb = shared::open::<Heartbeat>(&unhex(&hex)?, "fleet/demo/demo-0001/hb", &key)
        .map_err(|e| anyhow::anyhow!("{e}: {hex}"))?
        .msg;
    eprintln!(
        "raw hb seq {} ts {} seen {:?}",
        hb.seq,
        hb.ts_ms,
        mirror
            .seen()
            .iter()
            .take(6)
            .map(|l| &l[..60.min(l.len())])
            .collect::<Vec<_>>()
    );
    let same = |l: &str| {
        l.starts_with("json/fleet/demo/demo-0001/hb ")
            && json_line(l).is_ok_and(|(_, d)| d["seq"] == hb.seq)
    };
    // It may have been mirrored before or after the raw one reached us.
    let line = match mirror.seen().iter().find(|l| same(l)) {
        Some(line) => line.clone(),
        None => mirror.next_matching(WAIT, same).await?,
    };
    let (_, doc) = json_line(&line)?;
    assert_eq!(doc["ts_ms"], hb.ts_ms);
    assert_eq!(doc["speed_cm_s"], hb.speed_cm_s);
    assert_eq!(doc["battery_pct"], hb.battery_pct);
    let lat = doc["lat"].as_f64().unwrap_or_default();
    let lon = doc["lon"].as_f64().unwrap_or_default();
    assert!(
        (lat - hb.pos.lat()).abs() < 1e-7,
        "{lat} vs {}",
        hb.pos.lat()
    );
    assert!(
        (lon - hb.pos.lon()).abs() < 1e-7,
        "{lon} vs {}",
        hb.pos.lon()
    );
    assert!(mirrored(&broker).await? > 0.0);
    assert_eq!(
        broker
            .metric("fleetbeat_broker_mirror_undecodable_total")
            .await?,
        0.0
    );
    raw.stop().await;
    mirror.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_can_be_switched_off() -> anyhow::Result<()> {
    let broker = start_broker_standalone(&["--json-mirror", "false"]).await?;
    let mut mirror = watch(broker.mqtt, &["-t", "json/#", "-v"]).await?;
    let mut raw = watch(broker.mqtt, &["-t", "fleet/#", "-F", "%t"]).await?;
    let _sim = start_sim(broker.mqtt, 2, "demo", &["--rate", "5"])?;
    // Statuses and ten heartbeats of traffic went by: with the mirror on, their JSON would
    // have been published alongside.
    raw.next_matching(WAIT, |t| t.ends_with("/status")).await?;
    for _ in 0..10 {
        raw.next_matching(WAIT, |t| t.ends_with("/hb")).await?;
    }
    assert!(
        mirror.seen().is_empty(),
        "mirrored although off: {:?}",
        mirror.seen()
    );
    assert_eq!(mirrored(&broker).await?, 0.0);
    raw.stop().await;
    mirror.stop().await;
    Ok(())
}
