//! The real programs, started on ephemeral ports: `start_bridge()`, `start_sim()`, and an
//! in-process `start_broker()`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Command;

use crate::WAIT;
use crate::bin;
use crate::process::{Program, field};

/// A running `bridge` process.
pub struct BridgeProcess {
    /// The process (stderr is searchable).
    pub program: Program,
    /// Where HTTP and Socket.IO are served.
    pub http: SocketAddr,
    /// The MQTT broker the bridge uses (the embedded one unless `--mqtt-url` was given).
    pub mqtt: SocketAddr,
}

impl BridgeProcess {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// `GET path` on the bridge, returning status and body.
    ///
    /// # Errors
    /// If the request fails.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let response = http_client()
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    /// `GET path` with `Authorization: Bearer token`, returning status and JSON body.
    ///
    /// # Errors
    /// If the request fails or the body is not JSON.
    pub async fn get_json(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut request = http_client().get(format!("{}{path}", self.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status().as_u16();
        Ok((
            status,
            response
                .json()
                .await
                .with_context(|| format!("GET {path}: not JSON"))?,
        ))
    }

    /// `POST path` with a JSON body and `Authorization: Bearer token`.
    ///
    /// # Errors
    /// If the request fails or the answer is not JSON.
    pub async fn post_json(
        &self,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let response = http_client()
            .post(format!("{}{path}", self.url()))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status().as_u16();
        Ok((
            status,
            response
                .json()
                .await
                .with_context(|| format!("POST {path}: not JSON"))?,
        ))
    }

    /// Reads one sample of a Prometheus metric (`name{labels}` exactly as exposed).
    ///
    /// # Errors
    /// If `/metrics` cannot be read or has no such sample.
    pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        let (_, text) = self.get("/metrics").await?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no sample {sample} in /metrics:\n{text}"))
    }

    /// Waits until `/readyz` answers 200 (MQTT connected and subscribed).
    ///
    /// # Errors
    /// If it is not ready within the bound.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = self.get("/readyz").await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "bridge not ready within {WAIT:?}:\n{}",
                    self.program.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .unwrap_or_default()
}

/// Starts the `bridge` binary with its embedded broker, everything on ephemeral ports, and
/// waits until it is ready. `extra` is appended to the command line.
///
/// # Errors
/// If it does not start and become ready in time.
pub async fn start_bridge(extra: &[&str]) -> anyhow::Result<BridgeProcess> {
    let mut args = vec!["--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    spawn_bridge(&args).await
}

/// Starts the `bridge` binary against the external broker at `mqtt`.
///
/// # Errors
/// If it does not start and become ready in time.
pub async fn start_bridge_external(
    mqtt: SocketAddr,
    extra: &[&str],
) -> anyhow::Result<BridgeProcess> {
    let url = format!("mqtt://{mqtt}");
    let mut args = vec!["--listen", "127.0.0.1:0", "--mqtt-url", &url];
    args.extend_from_slice(extra);
    spawn_bridge(&args).await
}

async fn spawn_bridge(args: &[&str]) -> anyhow::Result<BridgeProcess> {
    let mut cmd = Command::new(bin::path("bridge")?);
    cmd.args(args);
    if !args.contains(&"--store") {
        // Every bridge gets its own database unless the test shares one on purpose.
        cmd.arg("--store").arg(temp_dir()?.join("fleetbeat.db"));
    }
    let mut program = Program::spawn("bridge", cmd)?;
    let line = program.wait_for_line("bridge started", WAIT).await?;
    let parse = |key: &str| -> anyhow::Result<SocketAddr> {
        field(&line, key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key}= address in {line:?}"))
    };
    let bridge = BridgeProcess {
        http: parse("http")?,
        mqtt: parse("mqtt")?,
        program,
    };
    bridge.wait_ready().await?;
    Ok(bridge)
}

/// Starts the `device-sim` binary with `vehicles` vehicles of fleet `fleet` against `mqtt`.
/// `extra` is appended to the command line.
///
/// # Errors
/// If it cannot be started.
pub fn start_sim(
    mqtt: SocketAddr,
    vehicles: u32,
    fleet: &str,
    extra: &[&str],
) -> anyhow::Result<Program> {
    let mut cmd = Command::new(bin::path("device-sim")?);
    cmd.arg("--broker")
        .arg(mqtt.to_string())
        .arg("--vehicles")
        .arg(vehicles.to_string())
        .arg("--fleet")
        .arg(fleet)
        .args(extra);
    Program::spawn("device-sim", cmd)
}

/// Starts the project's broker in-process on ephemeral ports.
///
/// # Errors
/// If it does not start.
pub async fn start_broker() -> anyhow::Result<broker::Broker> {
    broker::Broker::start(broker::BrokerConfig::ephemeral())
        .await
        .context("starting the broker")
}

/// Writes a bridge configuration file into a fresh temporary directory and returns its path.
///
/// # Errors
/// If the file cannot be written.
pub fn write_bridge_config(toml: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = temp_dir()?.join("bridge.toml");
    std::fs::write(&path, toml).context("writing the bridge configuration")?;
    Ok(path)
}

/// A free TCP port on 127.0.0.1 (bound, read, released), for programs that must be restarted
/// on the same address.
///
/// # Errors
/// If no port can be bound.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    listener.local_addr().context("reading the bound address")
}

/// Starts the standalone `broker` binary (MQTT 3.1.1 only) on `addr` and waits until it is
/// ready.
///
/// # Errors
/// If it does not start in time.
pub async fn start_broker_process(addr: SocketAddr, extra: &[&str]) -> anyhow::Result<Program> {
    let mut cmd = Command::new(bin::path("broker")?);
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--no-v5")
        .args(extra);
    let mut program = Program::spawn("broker", cmd)?;
    program.wait_for_line("broker ready", WAIT).await?;
    Ok(program)
}

/// A fresh directory under the system's temporary directory, for one test's files.
///
/// # Errors
/// If it cannot be created.
pub fn temp_dir() -> anyhow::Result<std::path::PathBuf> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fleetbeat-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).context("creating a temporary directory")?;
    Ok(dir)
}
