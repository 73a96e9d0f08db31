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

    /// The sum of every sample of metric `name` (all label sets).
    ///
    /// # Errors
    /// If `/metrics` cannot be read.
    pub async fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let (_, text) = self.get("/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| {
                l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
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
    let mut args = vec!["--mqtt-url", &url];
    if !extra.contains(&"--listen") {
        args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    }
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
        .args(["--listen-v5", "off", "--metrics-listen", "127.0.0.1:0"])
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

/// A running standalone `broker` process: its addresses, and its `/metrics`.
pub struct BrokerProcess {
    /// The process (stderr is searchable).
    pub program: Program,
    /// The MQTT 3.1.1 listener.
    pub mqtt: SocketAddr,
    /// The MQTT 5 listener, if it was switched on (`--listen-v5 127.0.0.1:0`).
    pub mqtt_v5: Option<SocketAddr>,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
}

impl BrokerProcess {
    /// The whole `/metrics` text.
    ///
    /// # Errors
    /// If it cannot be fetched.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let response = http_client()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .context("GET /metrics of the broker")?;
        anyhow::ensure!(
            response.status().is_success(),
            "GET /metrics: {}",
            response.status()
        );
        Ok(response.text().await?)
    }

    /// One sample of a metric (`name{labels}` exactly as exposed).
    ///
    /// # Errors
    /// If `/metrics` cannot be read or has no such sample.
    pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        let text = self.metrics_text().await?;
        sample_value(&text, sample).with_context(|| format!("no sample {sample} in:\n{text}"))
    }

    /// Waits until `sample` satisfies `check` and returns its value.
    ///
    /// # Errors
    /// If it does not within the bound.
    pub async fn wait_metric(
        &self,
        sample: &str,
        check: impl Fn(f64) -> bool,
    ) -> anyhow::Result<f64> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let value = self.metric(sample).await?;
            if check(value) {
                return Ok(value);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{sample} is still {value} after {WAIT:?}; broker log:\n{}",
                    self.program.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The value of `sample` in a Prometheus text exposition.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Starts the standalone `broker` binary on ephemeral ports (MQTT 3.1.1, `/metrics`; MQTT 5
/// only if `extra` sets `--listen-v5`) and waits until it is ready. `extra` is appended to the
/// command line; `--listen`, `--listen-v5` and `--metrics-listen` given there replace the
/// defaults.
///
/// # Errors
/// If it does not start in time.
pub async fn start_broker_standalone(extra: &[&str]) -> anyhow::Result<BrokerProcess> {
    let given = |flag: &str| extra.contains(&flag);
    let mut cmd = Command::new(bin::path("broker")?);
    if !given("--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    if !given("--listen-v5") && !given("--no-v5") {
        cmd.args(["--listen-v5", "off"]);
    }
    if !given("--metrics-listen") {
        cmd.args(["--metrics-listen", "127.0.0.1:0"]);
    }
    cmd.args(extra);
    // Only what the test sets: no FLEETBEAT_BROKER_* from the caller's environment.
    for (key, _) in std::env::vars() {
        if key.starts_with("FLEETBEAT_BROKER_") {
            cmd.env_remove(key);
        }
    }
    let mut program = Program::spawn("broker", cmd)?;
    let ready = program.wait_for_line("broker ready", WAIT).await?;
    let serving = program.wait_for_line("serving /metrics", WAIT).await?;
    let addr = |line: &str, key: &str| -> Option<SocketAddr> {
        let value = field(line, key)?;
        let value = value
            .strip_prefix("Some(")
            .and_then(|v| v.strip_suffix(')'))
            .unwrap_or(&value);
        value.parse().ok()
    };
    Ok(BrokerProcess {
        mqtt: addr(&ready, "v4").with_context(|| format!("no v4= address in {ready:?}"))?,
        mqtt_v5: addr(&ready, "v5"),
        metrics: addr(&serving, "addr").with_context(|| format!("no addr= in {serving:?}"))?,
        program,
    })
}

/// A fleet's secrets on both sides, in a fresh temporary directory: the devices' half
/// (`device-sim provision`, plain passwords and keys) and the broker's credentials file made
/// from it (hashed passwords, the same keys).
pub struct FleetSecrets {
    /// The directory holding both files.
    pub dir: std::path::PathBuf,
    /// The broker's credentials file (`broker --credentials`).
    pub broker: std::path::PathBuf,
    /// The simulator's secrets file (`device-sim --credentials`).
    pub sim: std::path::PathBuf,
    /// The simulator's secrets, parsed.
    pub secrets: device_sim::credentials::Credentials,
}

impl FleetSecrets {
    /// The broker's credentials file as a command-line argument.
    pub fn broker_arg(&self) -> String {
        self.broker.display().to_string()
    }

    /// The simulator's secrets file as a command-line argument.
    pub fn sim_arg(&self) -> String {
        self.sim.display().to_string()
    }

    /// `vehicle`'s password and message key.
    ///
    /// # Errors
    /// If `vehicle` was not provisioned.
    pub fn device(&self, vehicle: &str) -> anyhow::Result<(String, shared::DeviceKey)> {
        let id = shared::VehicleId::new(vehicle).map_err(anyhow::Error::msg)?;
        let secret = self
            .secrets
            .get(&id)
            .with_context(|| format!("{vehicle} was not provisioned"))?;
        Ok((secret.password.clone(), secret.key))
    }
}

/// Provisions `vehicles` vehicles of `fleet` with the real `device-sim provision`, and
/// registers each with a new broker credentials file (`CredentialsFile::set_device`, with the
/// simulator's password and key).
///
/// # Errors
/// If a program or a file fails.
pub async fn provision_fleet(vehicles: u32, fleet: &str) -> anyhow::Result<FleetSecrets> {
    let dir = temp_dir()?;
    let sim = dir.join("sim-secrets.toml");
    let broker_file = dir.join("credentials.toml");
    let output = Command::new(bin::path("device-sim")?)
        .args([
            "provision",
            "--vehicles",
            &vehicles.to_string(),
            "--fleet",
            fleet,
        ])
        .arg("--secrets")
        .arg(&sim)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, output)
        .await
        .context("device-sim provision timed out")?
        .context("running device-sim provision")?;
    anyhow::ensure!(
        output.status.success(),
        "device-sim provision failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let secrets = device_sim::credentials::Credentials::load(&sim)?;
    let mut file = broker::CredentialsFile::open(&broker_file)?;
    for vehicle in secrets.vehicles() {
        let secret = secrets.get(vehicle).context("listed")?;
        file.set_device(
            vehicle.as_str(),
            &secret.password,
            broker::PasswordOrigin::Generated,
            secret.key,
        )?;
    }
    file.save()?;
    Ok(FleetSecrets {
        dir,
        broker: broker_file,
        sim,
        secrets,
    })
}

/// Runs `broker <args>` (a credentials subcommand such as `add-device van-1 --credentials F`
/// or `add-client alice --role observer --credentials F`) and returns the `password:` and, for
/// a device, the `key:` it printed.
///
/// # Errors
/// If it fails or prints no password.
pub async fn broker_credentials_command(args: &[&str]) -> anyhow::Result<(String, Option<String>)> {
    let output = Command::new(bin::path("broker")?)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, output)
        .await
        .context("broker subcommand timed out")?
        .context("running the broker subcommand")?;
    anyhow::ensure!(
        output.status.success(),
        "broker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let printed = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let password = printed("password:").with_context(|| format!("no password in {stdout}"))?;
    Ok((password, printed("key:")))
}
