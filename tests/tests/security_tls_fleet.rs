//! A provisioned fleet over mutual TLS, end to end with the real programs: `device-sim` (its
//! credentials file, `mqtts://`, `--ca-file`, a certificate per vehicle) against the standalone
//! `broker` (a credentials file, `listen_tls` with `tls_client_certs = "required"`), watched by
//! a real `mosquitto_sub` observer. The certificate names the vehicle: a vehicle holding another
//! vehicle's certificate is refused and counted, the others are unaffected.
//!
//! And the default deployment (the bridge with its embedded broker) encrypted on both sides:
//! vehicles over MQTT/TLS to the embedded broker's `[broker] listen_tls`, dispatchers over
//! HTTPS/WSS.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tests::process::Program;
use tests::sio::SioClient;
use tests::stack::{BrokerProcess, provision_fleet, spawn_bridge_started, write_bridge_config};
use tests::tls::TestPki;
use tests::{WAIT, bin, temp_dir};
use tokio::process::Command;

/// The TLS listener's address, from the broker's `broker ready` line (`tls_v4=Some(addr)`).
fn tls_addr(broker: &BrokerProcess) -> anyhow::Result<SocketAddr> {
    tls_addr_in(&broker.program)
}

/// The TLS listener's address from the `broker ready` line `program` logged (the standalone
/// broker's, or the bridge's embedded one's).
fn tls_addr_in(program: &Program) -> anyhow::Result<SocketAddr> {
    let ready = program
        .find_line("broker ready")
        .context("no `broker ready` line")?;
    let value = tests::process::field(&ready, "tls_v4").context("no tls_v4= field")?;
    value
        .strip_prefix("Some(")
        .and_then(|v| v.strip_suffix(')'))
        .context("tls_v4 is not Some(..)")?
        .parse()
        .with_context(|| format!("tls_v4 in {ready:?}"))
}

#[tokio::test]
async fn a_provisioned_fleet_over_mutual_tls_is_named_by_its_certificates() -> anyhow::Result<()> {
    let fleet = provision_fleet(3, "north").await?;
    let observer = fleet.add_client("watch", "observer").await?;
    let dir = temp_dir()?;
    let pki = TestPki::new(dir.path(), "fleet")?;
    let server = pki.server("broker")?;
    let certs = dir.path().join("vehicles");
    std::fs::create_dir(&certs)?;
    // The vehicles' certificates, signed by the fleet's CA, in the directory device-sim reads
    // (`{id}.pem`, `{id}-key.pem`); north-0003 holds north-0002's certificate.
    for id in ["north-0001", "north-0002"] {
        let files = pki.client(id)?;
        std::fs::copy(&files.cert, certs.join(format!("{id}.pem")))?;
        std::fs::copy(&files.key, certs.join(format!("{id}-key.pem")))?;
    }
    let borrowed = pki.client("north-0002")?;
    std::fs::copy(&borrowed.cert, certs.join("north-0003.pem"))?;
    std::fs::copy(&borrowed.key, certs.join("north-0003-key.pem"))?;

    let (cert, key, ca) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
        pki.ca.display().to_string(),
    );
    let broker = fleet
        .start_broker(&[
            "--listen-tls",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--tls-client-certs",
            "required",
        ])
        .await?;
    let tls = tls_addr(&broker)?;

    // The observer on the plain listener, with its password.
    let mut watch = tests::mosquitto::watch_as(
        broker.mqtt,
        "watch",
        ("watch", &observer),
        &["-t", "fleet/north/+/hb", "-F", "%t"],
    )
    .await?;

    let mut cmd = Command::new(bin::path("device-sim")?);
    cmd.args(["--vehicles", "3", "--fleet", "north", "--rate", "5"])
        .arg("--broker")
        .arg(format!("mqtts://localhost:{}", tls.port()))
        .arg("--ca-file")
        .arg(&pki.ca)
        .arg("--client-cert-dir")
        .arg(&certs)
        .arg("--credentials")
        .arg(fleet.sim_arg());
    let sim = Program::spawn("device-sim", cmd)?;

    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 2 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let topic = watch
            .next(left)
            .await
            .with_context(|| format!("device-sim log:\n{}", sim.log_text()))?;
        seen.insert(topic);
    }
    assert_eq!(
        seen,
        BTreeSet::from([
            "fleet/north/north-0001/hb".to_owned(),
            "fleet/north/north-0002/hb".to_owned()
        ])
    );
    // north-0003 logs in as itself with north-0002's certificate: refused, and counted.
    broker
        .wait_metric(
            r#"fleetbeat_broker_auth_refused_total{reason="certificate_mismatch"}"#,
            |v| v >= 1.0,
        )
        .await?;
    // Meanwhile the two genuine vehicles keep reporting, and north-0003 never gets through.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match watch.next(left).await {
            Ok(topic) => assert_ne!(
                topic, "fleet/north/north-0003/hb",
                "a borrowed certificate got in"
            ),
            Err(_) => break,
        }
    }
    assert!(
        !watch
            .seen()
            .iter()
            .any(|t| t == "fleet/north/north-0003/hb"),
        "a borrowed certificate got in"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_deployment_runs_encrypted_on_both_sides() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let pki = TestPki::new(dir.path(), "site")?;
    let web = pki.server("web")?;
    let mqtt = pki.server("mqtt")?;
    let config = write_bridge_config(&format!(
        "tls_cert = {web_cert:?}\n\
         tls_key = {web_key:?}\n\
         [broker]\n\
         listen_tls = \"127.0.0.1:0\"\n\
         tls_cert = {mqtt_cert:?}\n\
         tls_key = {mqtt_key:?}\n",
        web_cert = web.cert.display().to_string(),
        web_key = web.key.display().to_string(),
        mqtt_cert = mqtt.cert.display().to_string(),
        mqtt_key = mqtt.key.display().to_string(),
    ))?;
    let config_path = config.path().display().to_string();
    let bridge = spawn_bridge_started(&[
        "--config",
        &config_path,
        "--listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
    ])
    .await?;
    bridge.wait_ready_https(&pki.ca).await?;
    let tls = tls_addr_in(&bridge.program)?;

    let mut dispatcher = SioClient::dispatcher_tls(&bridge.https_url(), &pki.ca)
        .await?
        .map_err(|e| anyhow::anyhow!("refused: {e}"))?;
    assert_eq!(dispatcher.join("fleet:south").await?, json!({ "ok": true }));
    let mut cmd = Command::new(bin::path("device-sim")?);
    cmd.args(["--vehicles", "2", "--fleet", "south", "--rate", "5"])
        .arg("--broker")
        .arg(format!("mqtts://127.0.0.1:{}", tls.port()))
        .arg("--ca-file")
        .arg(&pki.ca);
    let sim = Program::spawn("device-sim", cmd)?;
    for vehicle in ["south-0001", "south-0002"] {
        dispatcher
            .positions_until(WAIT, |p: &Value| p["vehicle"] == vehicle)
            .await
            .with_context(|| format!("device-sim log:\n{}", sim.log_text()))?;
    }
    dispatcher.close().await;
    Ok(())
}
