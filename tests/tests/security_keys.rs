//! The bridge's device keys follow the credentials file (issue 14, keys): a message from a
//! vehicle whose key the bridge does not have yet is held unacknowledged and handled once the
//! key is added (never acknowledged and dropped); a removed key stops working; a vehicle's
//! fleet is the credentials', never the topic's. The wait is bounded: after
//! `--key-wait-park-after-ms` the message is parked in the store (acknowledged), so the
//! events session flows again, and it is handled once the key appears.
//!
//! Real parts: the standalone `broker` (without topic ACLs, so that only the bridge stands
//! between a publisher and the fleet), the `bridge` binary, `mosquitto_pub`, the real
//! `broker add-device` and `bridge add-token`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use shared::{DeliveryEvent, DeliveryKind, Heartbeat, OrderId, Position, Status, Topic};
use tests::provision::provision_in;
use tests::sio::SioClient;
use tests::stack::{
    bridge_add_token, free_port, start_bridge_external, start_broker_process, write_bridge_config,
};
use tests::{WAIT, mosquitto};

/// `msg` sealed for `topic` with `key`, sealed with `counter`.
fn sealed<T: shared::WireMessage>(
    msg: &T,
    topic: &str,
    counter: u64,
    key: &[u8; 32],
) -> anyhow::Result<Vec<u8>> {
    let topic = Topic::parse(topic).map_err(anyhow::Error::msg)?;
    let mut buf = [0u8; shared::MAX_PAYLOAD];
    Ok(shared::seal(msg, &topic.name(), counter, key, &mut buf)
        .map_err(anyhow::Error::msg)?
        .to_vec())
}

/// Removes `[devices.{id}]` from the credentials file at `path` (written aside, then renamed
/// over it, as an operator's editor or `broker` does).
fn remove_device(path: &Path, id: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let header = format!("[devices.{id}]");
    let mut kept = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with('[') {
            skipping = line.trim() == header;
        }
        if !skipping {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    anyhow::ensure!(kept.len() < text.len(), "{id} not in {}", path.display());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, kept)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

const RECEIVED_EVENT: &str = "fleetbeat_bridge_mqtt_received_total{kind=\"event\"}";
const RECEIVED_STATUS: &str = "fleetbeat_bridge_mqtt_received_total{kind=\"status\"}";
const KEY_WAITS: &str = "fleetbeat_bridge_key_waits_total";
const ACKS_WAITING: &str = "fleetbeat_bridge_acks_waiting";
const REVOKED: &str = "fleetbeat_bridge_mqtt_rejected_total{reason=\"revoked\"}";
const WRONG_FLEET: &str = "fleetbeat_bridge_mqtt_rejected_total{reason=\"fleet\"}";
const RELOADS: &str = "fleetbeat_bridge_credentials_reloads_total";
const PARKED_TOTAL: &str = "fleetbeat_bridge_parked_total";
const PARKED: &str = "fleetbeat_bridge_parked";

/// A pickup event of `order`, numbered `seq`.
fn pickup(seq: u32, order: &str) -> anyhow::Result<DeliveryEvent> {
    Ok(DeliveryEvent {
        seq,
        order: OrderId::new(order).map_err(anyhow::Error::msg)?,
        kind: DeliveryKind::Pickup,
        ts_ms: 1_700_000_000_000 + u64::from(seq),
        pos: Position::new(1, 2),
    })
}

/// A message from a vehicle not in the credentials file is held for the bound only, then
/// parked: the known vehicle's event behind it reaches the dispatcher meanwhile; once the
/// vehicle is added, its parked event does too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_key_is_parked_and_the_session_flows() -> anyhow::Result<()> {
    let creds = provision_in("park", &["park-0001"]).await?;
    let file = creds.broker_file.to_str().context("utf-8 path")?.to_owned();
    let config = write_bridge_config("")?;
    let token =
        bridge_add_token(config.path(), &["--role", "dispatcher", "--fleet", "park"]).await?;
    let config_arg = config.path().to_str().context("utf-8 path")?;
    let mqtt = free_port()?;
    let _broker = start_broker_process(mqtt, &[]).await?;
    let mut bridge = start_bridge_external(
        mqtt,
        &[
            "--credentials",
            &file,
            "--config",
            config_arg,
            "--key-wait-park-after-ms",
            "500",
        ],
    )
    .await?;
    let mut dispatcher = SioClient::connect_with_token(&bridge.url(), "/dispatch", &token).await?;
    let (_, known_key) = creds
        .devices
        .get("park-0001")
        .context("provisioned")?
        .clone();

    // park-0002 is not in the credentials file: its event comes first, and is held.
    let unknown_key = [0x3c; 32];
    let unknown_topic = "fleet/park/park-0002/event";
    let unknown_event = sealed(&pickup(1, "park-order-2")?, unknown_topic, 1, &unknown_key)?;
    mosquitto::publish(bridge.mqtt, unknown_topic, &unknown_event, 1).await?;
    bridge.wait_metric(KEY_WAITS, |v| v >= 1.0, WAIT).await?;

    // The known vehicle's event behind it reaches the dispatcher without waiting for the
    // first (events of different vehicles are committed side by side; their PUBACKs still
    // leave in order), and the held one is parked after the bound, long before the default
    // 60 s wait would have ended.
    let known_topic = "fleet/park/park-0001/event";
    let known_event = sealed(&pickup(1, "park-order-1")?, known_topic, 1, &known_key)?;
    mosquitto::publish(bridge.mqtt, known_topic, &known_event, 1).await?;
    let delivered = dispatcher.next_event("delivery", WAIT).await?;
    assert!(
        delivered.to_string().contains("park-order-1"),
        "the known vehicle's event first: {delivered}"
    );
    bridge.wait_metric(PARKED_TOTAL, |v| v >= 1.0, WAIT).await?;
    assert_eq!(bridge.metric(PARKED_TOTAL).await?, 1.0);
    assert_eq!(bridge.metric(PARKED).await?, 1.0);
    assert_eq!(
        bridge.metric(RECEIVED_EVENT).await?,
        1.0,
        "the parked one is not handled yet"
    );
    bridge.wait_metric(ACKS_WAITING, |v| v == 0.0, WAIT).await?;
    bridge
        .program
        .wait_for_line("its message is parked in the store", WAIT)
        .await?;

    // The operator adds park-0002 with the key its event was sealed with: the parked event is
    // handled and reaches the dispatcher; nothing stays parked.
    let mut credentials = broker::CredentialsFile::open(&creds.broker_file)?;
    let fleet = shared::FleetId::new("park").map_err(anyhow::Error::msg)?;
    credentials.set_device(
        "park-0002",
        &fleet,
        "a-password-for-park-0002",
        broker::PasswordOrigin::Generated,
        unknown_key,
    )?;
    credentials.save()?;
    let delivered = dispatcher.next_event("delivery", WAIT).await?;
    assert!(
        delivered.to_string().contains("park-order-2"),
        "the parked event once its key is known: {delivered}"
    );
    bridge.wait_metric(PARKED, |v| v == 0.0, WAIT).await?;
    assert_eq!(bridge.metric(RECEIVED_EVENT).await?, 2.0);
    assert_eq!(bridge.metric(PARKED_TOTAL).await?, 1.0);
    bridge
        .program
        .wait_for_line("parked message handled", WAIT)
        .await?;
    dispatcher.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_follow_the_credentials_file() -> anyhow::Result<()> {
    let creds = provision_in("keys", &["keys-0001"]).await?;
    let file = creds.broker_file.to_str().context("utf-8 path")?.to_owned();
    let config = write_bridge_config("")?;
    let token =
        bridge_add_token(config.path(), &["--role", "dispatcher", "--fleet", "keys"]).await?;
    let config_arg = config.path().to_str().context("utf-8 path")?;
    let mqtt = free_port()?;
    let _broker = start_broker_process(mqtt, &[]).await?;
    let mut bridge =
        start_bridge_external(mqtt, &["--credentials", &file, "--config", config_arg]).await?;

    // keys-0002 is not in the credentials file yet: its status and its delivery event are
    // held, unacknowledged, not recorded.
    let key = [0x5a; 32];
    let status_topic = "fleet/keys/keys-0002/status";
    let event_topic = "fleet/keys/keys-0002/event";
    let status = sealed(&Status::Online, status_topic, 1, &key)?;
    let event = DeliveryEvent {
        seq: 1,
        order: OrderId::new("keys-order-1").map_err(anyhow::Error::msg)?,
        kind: DeliveryKind::Pickup,
        ts_ms: 1_700_000_000_000,
        pos: Position::new(1, 2),
    };
    let event = sealed(&event, event_topic, 2, &key)?;
    mosquitto::publish(bridge.mqtt, status_topic, &status, 1).await?;
    mosquitto::publish(bridge.mqtt, event_topic, &event, 1).await?;
    bridge.wait_metric(KEY_WAITS, |v| v >= 2.0, WAIT).await?;
    bridge.wait_metric(ACKS_WAITING, |v| v >= 2.0, WAIT).await?;
    assert_eq!(bridge.metric(RECEIVED_EVENT).await?, 0.0);
    assert_eq!(bridge.metric(RECEIVED_STATUS).await?, 0.0);
    let (code, _) = bridge
        .get_json("/api/vehicles/keys-0002", Some(&token))
        .await?;
    assert_eq!(code, 404, "recorded before its key was known");
    bridge
        .program
        .wait_for_line("its message is held", WAIT)
        .await?;

    // The operator adds it: the bridge reloads the file and handles what it held, in order.
    let mut credentials = broker::CredentialsFile::open(&creds.broker_file)?;
    let fleet = shared::FleetId::new("keys").map_err(anyhow::Error::msg)?;
    credentials.set_device(
        "keys-0002",
        &fleet,
        "a-password-for-keys-0002",
        broker::PasswordOrigin::Generated,
        key,
    )?;
    credentials.save()?;
    bridge
        .wait_metric(RECEIVED_EVENT, |v| v >= 1.0, WAIT)
        .await?;
    bridge
        .wait_metric(RECEIVED_STATUS, |v| v >= 1.0, WAIT)
        .await?;
    bridge.wait_metric(ACKS_WAITING, |v| v == 0.0, WAIT).await?;
    assert!(bridge.metric(RELOADS).await? >= 1.0);
    let (code, state) = bridge
        .get_json("/api/vehicles/keys-0002", Some(&token))
        .await?;
    assert_eq!(code, 200, "{state}");
    bridge
        .program
        .wait_for_line("held message handled", WAIT)
        .await?;

    // Revoked: removed from the file, its key stops working at the bridge (a QoS 1 message
    // is refused and acknowledged, not held: the bridge knew the key and saw it go).
    remove_device(&creds.broker_file, "keys-0002")?;
    let hb_topic = "fleet/keys/keys-0002/hb";
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut counter = 10;
    while bridge.metric(REVOKED).await? < 1.0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the removed key still works:\n{}",
            bridge.program.log_text()
        );
        counter += 1;
        let hb = Heartbeat {
            seq: u32::try_from(counter)?,
            ..Heartbeat::default()
        };
        mosquitto::publish(
            bridge.mqtt,
            hb_topic,
            &sealed(&hb, hb_topic, counter, &key)?,
            0,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let revoked = bridge.metric(REVOKED).await?;
    let later = sealed(&Status::Online, status_topic, 1_000, &key)?;
    mosquitto::publish(bridge.mqtt, status_topic, &later, 1).await?;
    bridge.wait_metric(REVOKED, |v| v > revoked, WAIT).await?;
    bridge.wait_metric(ACKS_WAITING, |v| v == 0.0, WAIT).await?;
    assert_eq!(bridge.metric(RECEIVED_STATUS).await?, 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_cannot_choose_its_fleet() -> anyhow::Result<()> {
    let creds = provision_in("home", &["home-0001"]).await?;
    let file = creds.broker_file.to_str().context("utf-8 path")?.to_owned();
    let config = write_bridge_config("")?;
    let home =
        bridge_add_token(config.path(), &["--role", "dispatcher", "--fleet", "home"]).await?;
    let away =
        bridge_add_token(config.path(), &["--role", "dispatcher", "--fleet", "away"]).await?;
    let config_arg = config.path().to_str().context("utf-8 path")?;
    let mqtt = free_port()?;
    let _broker = start_broker_process(mqtt, &[]).await?;
    let mut bridge =
        start_bridge_external(mqtt, &["--credentials", &file, "--config", config_arg]).await?;
    let (_, key) = creds
        .devices
        .get("home-0001")
        .context("provisioned")?
        .clone();

    // Its first message, correctly sealed, under another fleet: refused and counted; the
    // vehicle is not pinned to that fleet.
    let foreign = "fleet/away/home-0001/hb";
    let hb = Heartbeat {
        seq: 1,
        ..Heartbeat::default()
    };
    mosquitto::publish(bridge.mqtt, foreign, &sealed(&hb, foreign, 1, &key)?, 0).await?;
    bridge.wait_metric(WRONG_FLEET, |v| v >= 1.0, WAIT).await?;
    let (code, _) = bridge
        .get_json("/api/vehicles/home-0001", Some(&away))
        .await?;
    assert_eq!(
        code, 404,
        "the away dispatcher sees a vehicle that is not its fleet's"
    );
    bridge
        .program
        .wait_for_line("not the vehicle's fleet", WAIT)
        .await?;

    // Its own fleet: accepted, filed under the credentials' fleet.
    let own = "fleet/home/home-0001/hb";
    let hb = Heartbeat {
        seq: 2,
        ..Heartbeat::default()
    };
    mosquitto::publish(bridge.mqtt, own, &sealed(&hb, own, 2, &key)?, 0).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let state = loop {
        let (code, state) = bridge
            .get_json("/api/vehicles/home-0001", Some(&home))
            .await?;
        if code == 200 {
            break state;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not recorded: {code} {state}\n{}",
            bridge.program.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(state["fleet"], "home", "{state}");
    let (code, _) = bridge
        .get_json("/api/vehicles/home-0001", Some(&away))
        .await?;
    assert_ne!(
        code, 200,
        "the away dispatcher sees the home fleet's vehicle"
    );
    Ok(())
}
