//! Proof of life at the broker, seen with `mosquitto_sub`: a vehicle killed with `kill -9`
//! (its sockets close without a DISCONNECT) or frozen (nothing heard for 1.5 × its
//! keep-alive) gets its last will published: a retained, sealed `offline` status that a late
//! subscriber still finds, also on the JSON mirror.

use std::time::Duration;

use shared::{OfflineReason, Status};
use tests::WAIT;
use tests::mosquitto::{Watch, client, finish, unhex, watch};
use tests::stack::{FleetSecrets, provision_fleet, start_broker_standalone, start_sim};

const STATUS: &str = "fleet/north/north-0001/status";

/// Opens a `topic hex` line of `mosquitto_sub -F '%t %x'` as north-0001's sealed status.
fn open_status(fleet: &FleetSecrets, line: &str) -> anyhow::Result<Status> {
    let (_, key) = fleet.device("north-0001")?;
    let hex = line.rsplit(' ').next().unwrap_or_default();
    shared::open::<Status>(&unhex(hex)?, STATUS, &key)
        .map(|opened| opened.msg)
        .map_err(|e| anyhow::anyhow!("{line}: {e}"))
}

/// What a late `mosquitto_sub` on `filter` receives first (the retained message), printed
/// with `format`.
async fn first_message(
    broker: std::net::SocketAddr,
    login: [&str; 4],
    filter: &str,
    format: &str,
) -> anyhow::Result<String> {
    let mut cmd = client("mosquitto_sub", broker);
    cmd.args(login)
        .args(["-t", filter, "-C", "1", "-F", format, "-W", "10"]);
    let done = finish(cmd, None).await?;
    anyhow::ensure!(done.status.success(), "{done:?}");
    Ok(done.stdout.trim_end().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vehicle_gets_its_retained_offline_status() -> anyhow::Result<()> {
    let fleet = provision_fleet(1, "north").await?;
    // The watcher logs in as a client (any role may subscribe anywhere).
    let ops = fleet.add_client("ops", "bridge").await?;
    let broker = fleet.start_broker(&[]).await?;
    let login = ["-u", "ops", "-P", ops.as_str()];
    let mut sim = fleet.start_sim(broker.mqtt, &["--rate", "5"])?;
    let mut watch = Watch::start({
        let mut cmd = client("mosquitto_sub", broker.mqtt);
        cmd.args(login)
            .args(["-t", "fleet/+/+/status", "-q", "1", "-F", "%t %x"]);
        cmd
    })
    .await?;
    // The JSON mirror republishes what the router routes, a moment later: a watcher of its
    // statuses (started before the kill) tells when the will's mirror is out.
    let mut mirror = Watch::start({
        let mut cmd = client("mosquitto_sub", broker.mqtt);
        cmd.args(login)
            .args(["-t", "json/fleet/+/+/status", "-F", "%t %p"]);
        cmd
    })
    .await?;
    let online = watch.next_matching(WAIT, |l| l.starts_with(STATUS)).await?;
    assert_eq!(open_status(&fleet, &online)?, Status::Online);
    broker
        .wait_metric("fleetbeat_broker_devices_connected", |n| n == 1.0)
        .await?;

    sim.kill().await?;

    // (The retained `online` may have been followed by the live one.)
    let offline = loop {
        let line = watch.next_matching(WAIT, |l| l.starts_with(STATUS)).await?;
        let status = open_status(&fleet, &line)?;
        if status != Status::Online {
            break status;
        }
    };
    assert_eq!(
        offline,
        Status::Offline(OfflineReason::ConnectionLost),
        "the will, sealed by the vehicle itself"
    );
    broker
        .wait_metric("fleetbeat_broker_wills_published_total", |n| n == 1.0)
        .await?;
    broker
        .wait_metric(
            "fleetbeat_broker_disconnects_total{reason=\"network\"}",
            |n| n == 1.0,
        )
        .await?;
    broker
        .wait_metric("fleetbeat_broker_devices_connected", |n| n == 0.0)
        .await?;

    // Retained: whoever subscribes later is told at once.
    let late = first_message(broker.mqtt, login, STATUS, "%r %t %x").await?;
    assert!(late.starts_with("1 "), "not retained: {late}");
    assert_eq!(
        open_status(&fleet, &late)?,
        Status::Offline(OfflineReason::ConnectionLost)
    );
    // And readable on the mirror, retained once the mirror has republished the will.
    mirror
        .next_matching(WAIT, |l| l.contains("\"status\":\"offline\""))
        .await?;
    mirror.stop().await;
    let line = first_message(broker.mqtt, login, "json/fleet/+/+/status", "%r %t %p").await?;
    let doc: serde_json::Value = serde_json::from_str(
        line.strip_prefix("1 json/fleet/north/north-0001/status ")
            .ok_or_else(|| anyhow::anyhow!("not the retained status: {line}"))?,
    )?;
    assert_eq!(doc["status"], "offline", "{doc}");
    assert_eq!(doc["reason"], "connection-lost", "{doc}");
    assert_eq!(doc["origin"], "verified", "{doc}");
    watch.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_vehicle_is_declared_offline_after_one_and_a_half_keep_alives()
-> anyhow::Result<()> {
    let broker = start_broker_standalone(&[]).await?;
    let mut sim = start_sim(
        broker.mqtt,
        1,
        "north",
        &["--rate", "5", "--keep-alive", "2"],
    )?;
    let mut watch = watch(broker.mqtt, &["-t", "json/fleet/+/+/status", "-v"]).await?;
    watch
        .next_matching(WAIT, |l| l.contains("\"status\":\"online\""))
        .await?;
    let stop = sim.signal("STOP");
    assert!(stop.is_ok(), "{stop:?}");
    let frozen = tokio::time::Instant::now();

    let offline = watch
        .next_matching(WAIT, |l| l.contains("\"status\":\"offline\""))
        .await?;
    let took = frozen.elapsed();
    assert!(
        offline.contains("\"reason\":\"connection-lost\""),
        "{offline}"
    );
    // 1.5 × 2 s after the last packet heard, which came at most 0.2 s before the freeze.
    assert!(
        took >= Duration::from_millis(2_700) && took < Duration::from_secs(6),
        "declared offline after {took:?}"
    );
    broker
        .wait_metric(
            "fleetbeat_broker_disconnects_total{reason=\"keep_alive\"}",
            |n| n == 1.0,
        )
        .await?;
    let _ = sim.signal("CONT");
    sim.kill().await?;
    watch.stop().await;
    Ok(())
}
