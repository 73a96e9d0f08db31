//! `device-sim` over TLS (`mqtts://`, `--ca-file`, `--client-cert-dir`) against the real
//! Debian `mosquitto` broker with certificates the test makes itself: heartbeats from every
//! vehicle arrive, seen by a real `mosquitto_sub` over TLS; a broker that requires client
//! certificates refuses vehicles without them; a CA the broker's certificate does not chain to
//! is logged as a certificate error and retried, not a crash.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tests::mosquitto::Watch;
use tests::process::Program;
use tests::stack::free_port;
use tests::tls::{CertFiles, TestPki};
use tests::{WAIT, temp_dir};
use tokio::process::Command;

/// The heartbeat topics of every vehicle of every fleet.
const HEARTBEATS: &str = "fleet/+/+/hb";

/// The real `mosquitto` broker with one TLS listener on 127.0.0.1, logging everything to
/// stderr (where [`Program`] collects it).
struct TlsMosquitto {
    program: Program,
    addr: SocketAddr,
}

impl TlsMosquitto {
    /// Starts `/usr/sbin/mosquitto` on a free port with `server` as its certificate,
    /// trusting `ca` for client certificates; with `require_client_cert`, a client must show
    /// one signed by `ca`, and its common name becomes its username.
    async fn start(
        dir: &Path,
        ca: &Path,
        server: &CertFiles,
        require_client_cert: bool,
    ) -> anyhow::Result<Self> {
        let addr = free_port()?;
        let mut conf = format!(
            "listener {port} 127.0.0.1\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             allow_anonymous true\n\
             persistence false\n\
             log_dest stderr\n\
             log_type all\n\
             user root\n",
            port = addr.port(),
            ca = ca.display(),
            cert = server.cert.display(),
            key = server.key.display(),
        );
        if require_client_cert {
            conf.push_str("require_certificate true\nuse_identity_as_username true\n");
        }
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf).context("writing mosquitto.conf")?;
        let mut cmd = Command::new("/usr/sbin/mosquitto");
        cmd.arg("-c").arg(&conf_path);
        let mut program = Program::spawn("mosquitto", cmd)
            .context("starting mosquitto (apt-get install mosquitto)")?;
        program.wait_for_line(" running", WAIT).await?;
        Ok(Self { program, addr })
    }

    /// How many connections mosquitto has accepted (TCP, before any TLS).
    fn connections(&self) -> usize {
        self.program
            .log_text()
            .lines()
            .filter(|line| line.contains("New connection from"))
            .count()
    }

    /// Waits until mosquitto has accepted at least `count` connections.
    async fn wait_connections(&mut self, count: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.connections() < count {
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "mosquitto accepted {} connections, not {count}, within {WAIT:?}:\n{}",
                    self.connections(),
                    self.program.log_text()
                );
            }
            // Polling the collected log (bounded above).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// A `mosquitto_sub` over TLS (trusting `ca`, showing `client` if given) printing the
    /// topic of every heartbeat, once subscribed.
    async fn watch_heartbeats(
        &self,
        ca: &Path,
        client: Option<&CertFiles>,
    ) -> anyhow::Result<Watch> {
        let mut cmd = tests::mosquitto::client("mosquitto_sub", self.addr);
        cmd.arg("--cafile").arg(ca);
        if let Some(client) = client {
            cmd.arg("--cert")
                .arg(&client.cert)
                .arg("--key")
                .arg(&client.key);
        }
        cmd.args(["-t", HEARTBEATS, "-F", "%t"]);
        Watch::start(cmd).await
    }
}

/// Starts the `device-sim` binary with `vehicles` vehicles of fleet `fleet` against the
/// broker address `broker` (an `mqtts://` URL), `extra` appended. (`tests::stack::start_sim`
/// takes a socket address and makes a plain `--broker` of it.)
fn start_sim(broker: &str, vehicles: u32, fleet: &str, extra: &[&str]) -> anyhow::Result<Program> {
    let mut cmd = Command::new(tests::bin::path("device-sim")?);
    cmd.args(["--broker", broker, "--vehicles", &vehicles.to_string()])
        .args(["--fleet", fleet])
        .args(extra);
    Program::spawn("device-sim", cmd)
}

/// Waits until heartbeats from `count` distinct vehicles have arrived on `watch`, and returns
/// their topics.
async fn distinct_heartbeats(watch: &mut Watch, count: usize) -> anyhow::Result<BTreeSet<String>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut topics = BTreeSet::new();
    while topics.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let topic = watch
            .next_matching(left, |line| line.ends_with("/hb"))
            .await
            .with_context(|| format!("heartbeats from {topics:?} only"))?;
        topics.insert(topic);
    }
    Ok(topics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_arrive_over_tls_with_a_ca_file() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let pki = TestPki::new(dir.path(), "fleet")?;
    let server = pki.server("broker")?;
    let mut broker = TlsMosquitto::start(dir.path(), &pki.ca, &server, false).await?;
    let mut watch = broker.watch_heartbeats(&pki.ca, None).await?;

    let ca = pki.ca.to_str().context("utf-8 path")?;
    let mut sim = start_sim(
        &format!("mqtts://localhost:{}", broker.addr.port()),
        3,
        "tls",
        &["--ca-file", ca, "--rate", "5"],
    )?;
    sim.wait_for_line("tls=on", WAIT).await?;
    let topics = distinct_heartbeats(&mut watch, 3).await?;
    assert_eq!(
        topics,
        BTreeSet::from(["tls-0001", "tls-0002", "tls-0003"].map(|v| format!("fleet/tls/{v}/hb"))),
        "device-sim log:\n{}",
        sim.log_text()
    );
    // Really TLS: mosquitto saw each vehicle's connection on its TLS-only listener.
    broker.wait_connections(4).await?;
    assert!(
        sim.find_line("cannot connect").is_none(),
        "{}",
        sim.log_text()
    );

    watch.stop().await;
    let status = sim.terminate(WAIT).await?;
    assert!(status.success(), "device-sim exited with {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_certificate_per_vehicle() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let pki = TestPki::new(dir.path(), "fleet")?;
    let server = pki.server("broker")?;
    let mut broker = TlsMosquitto::start(dir.path(), &pki.ca, &server, true).await?;
    let watcher = pki.client("watcher")?;
    let mut watch = broker.watch_heartbeats(&pki.ca, Some(&watcher)).await?;
    // Each vehicle's certificate as `{id}.pem` and `{id}-key.pem` in the test's directory,
    // as `--client-cert-dir` expects them.
    for vehicle in ["mtls-0001", "mtls-0002", "mtls-0003"] {
        pki.client(vehicle)?;
    }

    let ca = pki.ca.to_str().context("utf-8 path")?;
    let certs_arg = dir.path().to_str().context("utf-8 path")?;
    // An IP address: the server certificate names 127.0.0.1 too.
    let mut sim = start_sim(
        &format!("mqtts://127.0.0.1:{}", broker.addr.port()),
        3,
        "mtls",
        &[
            "--ca-file",
            ca,
            "--client-cert-dir",
            certs_arg,
            "--rate",
            "5",
        ],
    )?;
    let topics = distinct_heartbeats(&mut watch, 3).await?;
    assert_eq!(topics.len(), 3, "{topics:?}");
    assert!(topics.iter().all(|t| t.starts_with("fleet/mtls/mtls-000")));
    // The broker took each vehicle's identity from its certificate.
    for vehicle in ["mtls-0001", "mtls-0002", "mtls-0003"] {
        let line = broker
            .program
            .wait_for_line(&format!("u'{vehicle}'"), WAIT)
            .await?;
        assert!(line.contains(&format!("as {vehicle}")), "{line}");
    }
    sim.terminate(WAIT).await?;

    // The same broker refuses vehicles without a certificate: nothing arrives, and the
    // simulator says why and keeps trying.
    let before = broker.connections();
    let mut bare = start_sim(
        &format!("mqtts://localhost:{}", broker.addr.port()),
        3,
        "bare",
        &["--ca-file", ca, "--rate", "5"],
    )?;
    let refused = bare.wait_for_line("cannot connect, retrying", WAIT).await?;
    // TLS 1.3: the broker's alert comes after the client's side of the handshake.
    assert!(
        refused.contains("cause=TLS"),
        "not a TLS refusal: {refused}"
    );
    // Every vehicle tried at least twice.
    broker.wait_connections(before + 6).await?;
    assert!(bare.is_running(), "device-sim died:\n{}", bare.log_text());
    assert!(
        !watch.seen().iter().any(|t| t.starts_with("fleet/bare/")),
        "a vehicle without a certificate got through: {:?}",
        watch.seen()
    );
    assert!(bare.find_line("panicked").is_none(), "{}", bare.log_text());
    watch.stop().await;
    bare.terminate(WAIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_a_logged_certificate_error_and_retried() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let pki = TestPki::new(dir.path(), "fleet")?;
    let other = TestPki::new(dir.path(), "other")?;
    let server = pki.server("broker")?;
    let mut broker = TlsMosquitto::start(dir.path(), &pki.ca, &server, false).await?;

    let mut sim = start_sim(
        &format!("mqtts://localhost:{}", broker.addr.port()),
        1,
        "wrong",
        &["--ca-file", other.ca.to_str().context("utf-8 path")?],
    )?;
    let line = sim.wait_for_line("cannot connect, retrying", WAIT).await?;
    assert!(
        line.contains("TLS handshake failed") && line.contains("certificate"),
        "not a certificate error: {line}"
    );
    // It keeps trying (with backoff) and stays up.
    broker.wait_connections(3).await?;
    assert!(sim.is_running(), "device-sim died:\n{}", sim.log_text());
    assert!(sim.find_line("panicked").is_none(), "{}", sim.log_text());
    let status = sim.terminate(WAIT).await?;
    assert!(status.success(), "device-sim exited with {status}");
    Ok(())
}
