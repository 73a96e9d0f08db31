//! The bridge over TLS (docs/tls.md): HTTPS and WSS on its one listener with a certificate it
//! reloads when the files change; its MQTT client on an external broker over `mqtts://` (the
//! real Debian `mosquitto`); and the embedded broker's own settings in `[broker]`. Every
//! certificate is made by the test (`tests::tls::TestPki`); the clients are the real ones
//! (node's socket.io-client, curl, mosquitto_pub).

use std::time::Duration;

use serde_json::{Value, json};
use shared::{Heartbeat, Position, StatusFlags, Topic, VehicleId};
use tests::sio::{DISPATCH_TOKEN, SioClient};
use tests::stack::{
    BridgeProcess, curl, spawn_bridge, spawn_bridge_started, start_bridge, start_sim,
    write_bridge_config,
};
use tests::tls::{CertFiles, TestPki};
use tests::{WAIT, bin, mosquitto, process::Program, temp_dir};
use tokio::io::AsyncReadExt as _;

/// The bridge with its embedded broker, serving HTTPS with `cert`; ready (over HTTPS, trusting
/// `ca`).
async fn https_bridge(cert: &CertFiles, ca: &std::path::Path) -> anyhow::Result<BridgeProcess> {
    let (cert_path, key_path) = (
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
    );
    let bridge = spawn_bridge_started(&[
        "--listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert_path,
        "--tls-key",
        &key_path,
    ])
    .await?;
    bridge.wait_ready_https(ca).await?;
    Ok(bridge)
}

/// A position of `vehicle` in a `position` batch.
fn of(vehicle: &'static str) -> impl Fn(&Value) -> bool {
    move |p: &Value| p["vehicle"] == vehicle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_serve_clients_that_trust_the_ca_and_no_others() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let pki = TestPki::new(dir.path(), "one")?;
    let other = TestPki::new(dir.path(), "other")?;
    let cert = pki.server("bridge")?;
    let mut bridge = https_bridge(&cert, &pki.ca).await?;
    let https = bridge.https_url();

    // The page and the API over HTTPS (curl, trusting the test CA only).
    let (status, page) = bridge
        .get_https("/", &pki.ca)
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(status, 200);
    assert!(page.to_lowercase().contains("<html"), "{page}");
    let auth = format!("Authorization: Bearer {DISPATCH_TOKEN}");
    let (status, vehicles) = curl(
        &format!("{https}/api/vehicles"),
        Some(&pki.ca),
        &["-H", &auth],
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    assert_eq!(status, 200, "{vehicles}");
    assert!(
        serde_json::from_str::<Value>(&vehicles).is_ok(),
        "{vehicles}"
    );

    // A socket.io-client over wss:// trusting the CA joins a room and gets a vehicle's
    // heartbeats.
    let mut dispatcher = SioClient::dispatcher_tls(&https, &pki.ca)
        .await?
        .map_err(|e| anyhow::anyhow!("refused: {e}"))?;
    assert_eq!(
        dispatcher.join("vehicle:north-0001").await?,
        json!({ "ok": true })
    );
    let _sim = start_sim(bridge.mqtt, 1, "north", &["--rate", "5"])?;
    dispatcher.positions_until(WAIT, of("north-0001")).await?;

    // Plain HTTP to the HTTPS port fails cleanly: a 400 saying so, a counted failure.
    let failures = "fleetbeat_bridge_tls_handshake_failures_total";
    let before = bridge.metric_https(failures, &pki.ca).await?;
    let plain = curl(&format!("http://{}/healthz", bridge.http), None, &[])
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(plain.0, 400, "{plain:?}");
    assert!(plain.1.contains("use https://"), "{plain:?}");
    // Clients that do not trust the bridge's CA are refused: curl with another CA, and
    // node's socket.io-client with its built-in roots and with another CA.
    let untrusted = bridge.get_https("/healthz", &other.ca).await?;
    let reason = untrusted.expect_err("curl trusting another CA");
    assert!(reason.contains("certificate"), "{reason}");
    let refused = SioClient::refused(
        &https,
        "/dispatch",
        Some(json!({ "token": DISPATCH_TOKEN })),
    )
    .await;
    assert!(refused.is_ok(), "node's own roots: {refused:?}");
    let refused = SioClient::dispatcher_tls(&https, &other.ca).await?;
    assert!(refused.is_err(), "a client trusting another CA connected");
    let after = bridge.metric_https(failures, &pki.ca).await?;
    assert!(
        after >= before + 3.0,
        "handshake failures {before} -> {after}"
    );
    // The page's own HTTPS origin may open Socket.IO (the same-origin default).
    let origin = format!("Origin: {https}");
    let (status, _) = curl(
        &format!("{https}/socket.io/?EIO=4&transport=polling"),
        Some(&pki.ca),
        &["-H", &origin],
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    assert_eq!(status, 200, "same-origin polling handshake");
    let (status, _) = curl(
        &format!("{https}/socket.io/?EIO=4&transport=polling"),
        Some(&pki.ca),
        &["-H", "Origin: https://elsewhere.example"],
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    assert_ne!(status, 200, "another origin's polling handshake");

    // A client that connects and sends nothing holds no one up.
    let idle = tokio::net::TcpStream::connect(bridge.http).await?;
    let (status, _) = bridge
        .get_https("/healthz", &pki.ca)
        .await?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(status, 200, "served while a handshake is pending");
    drop(idle);

    // Graceful shutdown still works with the TLS listener.
    dispatcher.close().await;
    let status = bridge.program.terminate(WAIT).await?;
    assert!(
        status.success(),
        "{status}; log:\n{}",
        bridge.program.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let first = TestPki::new(dir.path(), "first")?;
    let second = TestPki::new(dir.path(), "second")?;
    let cert = first.server("bridge")?;
    let bridge = https_bridge(&cert, &first.ca).await?;
    let https = bridge.https_url();
    let before = SioClient::dispatcher_tls(&https, &first.ca)
        .await?
        .map_err(|e| anyhow::anyhow!("refused: {e}"))?;
    before.close().await;

    // Renewed by another CA, written over the same files (key, then certificate, renamed
    // into place). Connections come: the bridge looks at the files at most once a second.
    let renewed = second.server("bridge")?;
    assert_eq!(renewed.cert, cert.cert);
    let deadline = tokio::time::Instant::now() + WAIT;
    while bridge.get_https("/healthz", &second.ca).await?.is_err() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was not served within {WAIT:?}; log:\n{}",
            bridge.program.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reloads = bridge
        .metric_https("fleetbeat_bridge_tls_reloads_total", &second.ca)
        .await?;
    assert!(reloads >= 1.0, "reloads: {reloads}");
    let after = SioClient::dispatcher_tls(&https, &second.ca)
        .await?
        .map_err(|e| anyhow::anyhow!("a client trusting the new CA: {e}"))?;
    after.close().await;
    let stale = SioClient::dispatcher_tls(&https, &first.ca).await?;
    assert!(
        stale.is_err(),
        "a client trusting only the old CA connected"
    );

    // A broken replacement is refused, logged, and the certificate in use stays.
    std::fs::write(&cert.cert, "-----BEGIN CERTIFICATE-----\ntruncated\n")?;
    let failures = "fleetbeat_bridge_tls_reload_failures_total";
    let deadline = tokio::time::Instant::now() + WAIT;
    while bridge.metric_https(failures, &second.ca).await? < 1.0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the broken certificate was not noticed; log:\n{}",
            bridge.program.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        bridge
            .program
            .find_line("do not load")
            .is_some_and(|l| l.contains("ERROR")),
        "{}",
        bridge.program.log_text()
    );
    let still = SioClient::dispatcher_tls(&https, &second.ca)
        .await?
        .map_err(|e| anyhow::anyhow!("after a broken replacement: {e}"))?;
    still.close().await;
    Ok(())
}

/// A heartbeat of `vehicle` (fleet `north`) sealed with its open-mode key: topic and payload.
fn heartbeat(vehicle: &str, seq: u32) -> anyhow::Result<(String, Vec<u8>)> {
    let id = VehicleId::new(vehicle).map_err(anyhow::Error::msg)?;
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let hb = Heartbeat {
        seq,
        ts_ms: now,
        pos: Position::new(525_000_000, 133_900_000),
        speed_cm_s: 500,
        heading_deg: 90,
        battery_pct: 80,
        flags: StatusFlags(StatusFlags::GPS_FIX),
    };
    let topic = format!("fleet/north/{vehicle}/hb");
    let parsed = Topic::parse(&topic).map_err(anyhow::Error::msg)?;
    let mut buf = [0u8; shared::MAX_PAYLOAD];
    let sealed = shared::seal(
        &hb,
        &parsed.name(),
        now,
        &shared::open_mode_key(&id),
        &mut buf,
    )
    .map_err(anyhow::Error::msg)?;
    Ok((topic, sealed.to_vec()))
}

/// Runs the bridge with `args` expecting it to refuse to start; returns its log.
async fn refused_to_start(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(bin::path("bridge")?);
    cmd.args(["--listen", "127.0.0.1:0", "--store", ":memory:"])
        .args(args);
    let mut program = Program::spawn("bridge", cmd)?;
    let status = program.wait_exit(WAIT).await?;
    assert!(!status.success(), "it started: {}", program.log_text());
    Ok(program.log_text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_reaches_an_external_broker_over_mqtts() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let pki = TestPki::new(dir.path(), "mqtt")?;
    let other = TestPki::new(dir.path(), "other")?;
    let cert = pki.server("mosquitto")?;
    let broker = mosquitto::start_tls_broker(dir.path(), &pki.ca, &cert.cert, &cert.key).await?;
    let url = format!("mqtts://{}", broker.addr);
    let ca = pki.ca.display().to_string();

    // Ready means connected and subscribed: over TLS, the only listener mosquitto has.
    let bridge = spawn_bridge(&[
        "--listen",
        "127.0.0.1:0",
        "--mqtt-url",
        &url,
        "--mqtt-ca-file",
        &ca,
    ])
    .await?;
    let mut dispatcher = SioClient::dispatcher_in(&bridge.url(), "vehicle:north-0007").await?;
    let (topic, payload) = heartbeat("north-0007", 1)?;
    let published = mosquitto::publish_tls(broker.addr, &pki.ca, &topic, &payload, 1).await?;
    // The exit status too: a client killed by a signal says nothing on stderr.
    assert!(
        published.status.success(),
        "mosquitto_pub: {} (stderr {:?}, stdout {:?})",
        published.status,
        published.stderr,
        published.stdout
    );
    let seen = dispatcher.positions_until(WAIT, of("north-0007")).await?;
    assert!(seen.iter().any(|p| p["seq"] == 1), "{seen:?}");
    dispatcher.close().await;

    // mqtts:// without a CA file: a clear error at start.
    let log = refused_to_start(&["--mqtt-url", &url]).await?;
    assert!(log.contains("mqtt_ca_file"), "{log}");
    // A CA that did not sign the broker's certificate: never connected, and the log says why.
    let other_ca = other.ca.display().to_string();
    let mut wrong = spawn_bridge_started(&[
        "--listen",
        "127.0.0.1:0",
        "--mqtt-url",
        &url,
        "--mqtt-ca-file",
        &other_ca,
    ])
    .await?;
    let line = wrong
        .program
        .wait_for_line("MQTT connection error", WAIT)
        .await?;
    assert!(line.contains("certificate"), "{line}");
    let (status, _) = wrong.get("/readyz").await?;
    assert_eq!(status, 503, "ready without a trusted broker");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_table_configures_the_embedded_broker() -> anyhow::Result<()> {
    let config = write_bridge_config("[broker]\nmax_pending_connects_per_ip = 1\n")?;
    let path = config.path().display().to_string();
    let bridge = start_bridge(&["--config", &path]).await?;
    let refused = "fleetbeat_broker_connect_refused_total{reason=\"pending_limit\"}";
    let before = bridge.metric(refused).await?;

    // One connection from 127.0.0.1 that has not sent CONNECT is all it allows: a second
    // is closed at once, before a byte is read (counted). The bridge's own MQTT clients come
    // from 127.0.0.1 too: if one of them held the slot when `first` came, `first` is the one
    // closed, and the pair is tried again.
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !closed && tokio::time::Instant::now() < deadline {
        let mut first = tokio::net::TcpStream::connect(bridge.mqtt).await?;
        let mut byte = [0u8; 1];
        let first_open = tokio::time::timeout(Duration::from_millis(300), first.read(&mut byte))
            .await
            .is_err();
        if !first_open {
            continue;
        }
        let mut second = tokio::net::TcpStream::connect(bridge.mqtt).await?;
        closed = matches!(
            tokio::time::timeout(Duration::from_secs(2), second.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        );
    }
    assert!(closed, "a second pending connection stayed open");
    bridge.wait_metric(refused, |v| v > before, WAIT).await?;

    // An unknown key is named; [broker] with an external broker is refused.
    let unknown = write_bridge_config("[broker]\nnope = 1\n")?;
    let log = refused_to_start(&["--config", &unknown.path().display().to_string()]).await?;
    assert!(log.contains("broker.nope"), "{log}");
    let log = refused_to_start(&["--config", &path, "--mqtt-url", "mqtt://127.0.0.1:1"]).await?;
    assert!(
        log.contains("[broker]") && log.contains("mqtt_url"),
        "{log}"
    );
    Ok(())
}
