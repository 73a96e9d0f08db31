//! The real programs, started on ephemeral ports: the `bridge` (with its embedded broker or
//! against an external one), the standalone `broker`, `device-sim`, and an in-process broker;
//! their `/metrics`; and a fleet's credentials on both sides ([`provision_fleet`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::process::Command;

use crate::process::{Program, field};
use crate::{WAIT, bin, temp_dir};

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
    pub async fn get_json(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut request = http_client().get(format!("{}{path}", self.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        json_exchange(request, &format!("GET {path}")).await
    }

    /// `POST path` with a JSON body and `Authorization: Bearer token`.
    ///
    /// # Errors
    /// If the request fails or the answer is not JSON.
    pub async fn post_json(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        let request = http_client()
            .post(format!("{}{path}", self.url()))
            .bearer_auth(token)
            .json(body);
        json_exchange(request, &format!("POST {path}")).await
    }

    /// Reads one sample of a Prometheus metric (`name{labels}` exactly as exposed).
    ///
    /// # Errors
    /// If `/metrics` cannot be read or has no such sample.
    pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        metric(&self.url(), sample).await
    }

    /// Waits until `sample` satisfies `check`, within `within`, and returns its value.
    ///
    /// # Errors
    /// If it does not (the bridge's log in the error), or `/metrics` cannot be read.
    pub async fn wait_metric(
        &self,
        sample: &str,
        check: impl Fn(f64) -> bool,
        within: Duration,
    ) -> anyhow::Result<f64> {
        wait_for_metric(&self.url(), sample, check, within, &self.program).await
    }

    /// The whole of `/metrics`, to read several samples of one moment
    /// ([`sample_value`]).
    ///
    /// # Errors
    /// If `/metrics` cannot be read.
    pub async fn scrape_metrics(&self) -> anyhow::Result<String> {
        scrape(&self.url()).await
    }

    /// The sum of every sample of metric `name` (all label sets).
    ///
    /// # Errors
    /// If `/metrics` cannot be read.
    pub async fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let text = scrape(&self.url()).await?;
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
        wait_ready(&self.url())
            .await
            .with_context(|| format!("bridge log:\n{}", self.program.log_text()))
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .unwrap_or_default()
}

/// Sends `request` (`what`, for messages) and returns the status and the JSON body.
async fn json_exchange(
    request: reqwest::RequestBuilder,
    what: &str,
) -> anyhow::Result<(u16, Value)> {
    let response = request.send().await.context(what.to_owned())?;
    let status = response.status().as_u16();
    let body = response
        .json()
        .await
        .with_context(|| format!("{what}: not JSON"))?;
    Ok((status, body))
}

/// Waits until `GET {base}/readyz` answers 200 (`base` is `http://HOST:PORT`).
///
/// # Errors
/// If it does not within the bound.
pub async fn wait_ready(base: &str) -> anyhow::Result<()> {
    let client = http_client();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = client
            .get(format!("{base}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        if ready {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{base} not ready within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole `GET {base}/metrics` text (`base` is `http://HOST:PORT`).
///
/// # Errors
/// If it cannot be fetched.
async fn scrape(base: &str) -> anyhow::Result<String> {
    let response = http_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .with_context(|| format!("GET {base}/metrics"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "GET {base}/metrics: {}",
        response.status()
    );
    Ok(response.text().await?)
}

/// One sample of a metric at `{base}/metrics` (`name{labels}` exactly as exposed).
///
/// # Errors
/// If `/metrics` cannot be read or has no such sample.
pub async fn metric(base: &str, sample: &str) -> anyhow::Result<f64> {
    let text = scrape(base).await?;
    sample_value(&text, sample).with_context(|| format!("no sample {sample} in:\n{text}"))
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

/// Starts the one-command demo as [`start_bridge`] does (embedded broker and HTTP on ephemeral
/// ports): `bridge --simulate vehicles --sim-speed speed --sim-stores stores`, the simulated
/// vehicles of fleet `demo` and the simulated stores (`store-1` ...) placing orders through the
/// bridge's own API, with the vehicles' clock and the stores' order rate `speed` times faster
/// than real time. `extra` is appended to the command line.
///
/// # Errors
/// If it does not start and become ready in time.
pub async fn start_demo(
    vehicles: u32,
    speed: f64,
    stores: u32,
    extra: &[&str],
) -> anyhow::Result<BridgeProcess> {
    let (vehicles, speed, stores) = (vehicles.to_string(), speed.to_string(), stores.to_string());
    let mut args = vec![
        "--simulate",
        &vehicles,
        "--sim-speed",
        &speed,
        "--sim-stores",
        &stores,
    ];
    args.extend_from_slice(extra);
    start_bridge(&args).await
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

/// Starts the `bridge` binary with exactly `args` (plus `--store` in a fresh temporary
/// directory unless `args` name one) and waits until it is ready: for tests that restart it
/// on the same addresses.
///
/// # Errors
/// If it does not start and become ready in time.
pub async fn spawn_bridge(args: &[&str]) -> anyhow::Result<BridgeProcess> {
    let bridge = spawn_bridge_started(args).await?;
    bridge.wait_ready().await?;
    Ok(bridge)
}

/// Starts the `bridge` binary as [`spawn_bridge`] does, but waits only for its `bridge
/// started` line, not for `/readyz` over plain HTTP: for a bridge that serves HTTPS (see
/// [`BridgeProcess::wait_ready_https`]) or whose MQTT side is expected to fail.
///
/// # Errors
/// If it does not start in time.
pub async fn spawn_bridge_started(args: &[&str]) -> anyhow::Result<BridgeProcess> {
    let mut cmd = Command::new(bin::path("bridge")?);
    cmd.args(args);
    let mut store_dir = None;
    if !args.contains(&"--store") {
        // Every bridge gets its own database unless the test shares one on purpose.
        let dir = temp_dir()?;
        cmd.arg("--store").arg(dir.path().join("fleetbeat.db"));
        store_dir = Some(dir);
    }
    let mut program = Program::spawn("bridge", cmd)?;
    if let Some(dir) = store_dir {
        program.keep(dir);
    }
    let line = program.wait_for_line("bridge started", WAIT).await?;
    let parse = |key: &str| -> anyhow::Result<SocketAddr> {
        field(&line, key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key}= address in {line:?}"))
    };
    Ok(BridgeProcess {
        http: parse("http")?,
        mqtt: parse("mqtt")?,
        program,
    })
}

/// `curl` (the real one) fetching `url` within 10 s: trusting only the CA file `ca` for
/// `https://` if given (else curl's system roots), with `args` added. Returns the HTTP status
/// and the body, or the error curl printed (`Err` inside: refused, bad certificate, ...).
///
/// # Errors
/// If curl cannot be run or does not finish within the bound.
pub async fn curl(
    url: &str,
    ca: Option<&std::path::Path>,
    args: &[&str],
) -> anyhow::Result<Result<(u16, String), String>> {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "10"])
        .args(["--write-out", "\n%{http_code}"]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.args(args).arg(url).kill_on_drop(true);
    let output = tokio::time::timeout(WAIT, cmd.output())
        .await
        .context("curl timed out")?
        .context("running curl (apt-get install curl)")?;
    if !output.status.success() {
        return Ok(Err(format!(
            "curl exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status
        .trim()
        .parse()
        .with_context(|| format!("no status from curl in {text:?}"))?;
    Ok(Ok((status, body.to_owned())))
}

impl BridgeProcess {
    /// `https://127.0.0.1:PORT`.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.http)
    }

    /// `GET path` over HTTPS with curl, trusting only `ca`: the status and body, or curl's
    /// error (`Err` inside).
    ///
    /// # Errors
    /// If curl cannot be run or hangs.
    pub async fn get_https(
        &self,
        path: &str,
        ca: &std::path::Path,
    ) -> anyhow::Result<Result<(u16, String), String>> {
        curl(&format!("{}{path}", self.https_url()), Some(ca), &[]).await
    }

    /// Waits until `/readyz` answers 200 over HTTPS (trusting only `ca`).
    ///
    /// # Errors
    /// If it is not ready within the bound.
    pub async fn wait_ready_https(&self, ca: &std::path::Path) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let answer = self.get_https("/readyz", ca).await?;
            if matches!(answer, Ok((200, _))) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready within {WAIT:?} (last: {answer:?}); log:\n{}",
                    self.https_url(),
                    self.program.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One sample of a metric over HTTPS (`name{labels}` exactly as exposed), trusting `ca`.
    ///
    /// # Errors
    /// If `/metrics` cannot be read or has no such sample.
    pub async fn metric_https(&self, sample: &str, ca: &std::path::Path) -> anyhow::Result<f64> {
        let (status, text) = self
            .get_https("/metrics", ca)
            .await?
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(status == 200, "GET /metrics: {status}");
        sample_value(&text, sample).with_context(|| format!("no sample {sample} in:\n{text}"))
    }
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

/// Writes a bridge configuration file into a fresh temporary file (removed when dropped).
///
/// # Errors
/// If the file cannot be written.
pub fn write_bridge_config(toml: &str) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new()
        .prefix("fleetbeat-test-bridge-")
        .suffix(".toml")
        .tempfile()
        .context("creating the bridge configuration")?;
    std::io::Write::write_all(&mut file, toml.as_bytes())
        .context("writing the bridge configuration")?;
    Ok(file)
}

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral range (see
/// `testengines::port`), for programs that must be told their port or restarted on the same
/// address.
///
/// # Errors
/// If no port can be bound.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let port = testengines::port::free_port().context("binding a loopback port")?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The standalone `broker` command: MQTT 3.1.1 on `listen`, MQTT 5 off and `/metrics` on an
/// ephemeral port and a journal of its own unless `extra` says otherwise (`--listen-v5` or
/// `--no-v5`, `--metrics-listen`, `--journal`), then `extra`; with the journal's temporary
/// directory, if one was made.
fn broker_command(
    listen: &str,
    extra: &[&str],
) -> anyhow::Result<(Command, Option<tempfile::TempDir>)> {
    let given = |flag: &str| extra.contains(&flag);
    let mut cmd = Command::new(bin::path("broker")?);
    if !given("--listen") {
        cmd.args(["--listen", listen]);
    }
    if !given("--listen-v5") && !given("--no-v5") {
        cmd.args(["--listen-v5", "off"]);
    }
    if !given("--metrics-listen") {
        cmd.args(["--metrics-listen", "127.0.0.1:0"]);
    }
    let mut journal_dir = None;
    if !given("--journal") {
        // Every broker gets its own journal unless the test shares one on purpose (a
        // restart on the same journal).
        let dir = temp_dir()?;
        cmd.arg("--journal")
            .arg(dir.path().join("broker-journal.db"));
        journal_dir = Some(dir);
    }
    cmd.args(extra);
    Ok((cmd, journal_dir))
}

/// Starts the standalone `broker` binary (MQTT 3.1.1 only, unless `extra` switches MQTT 5 on)
/// on `addr` and waits until it is ready. `extra` is appended to the command line; a
/// `--listen-v5`, `--no-v5` or `--metrics-listen` given there replaces the default.
///
/// # Errors
/// If it does not start in time.
pub async fn start_broker_process(addr: SocketAddr, extra: &[&str]) -> anyhow::Result<Program> {
    let (cmd, journal_dir) = broker_command(&addr.to_string(), extra)?;
    let mut program = Program::spawn("broker", cmd)?;
    if let Some(dir) = journal_dir {
        program.keep(dir);
    }
    program.wait_for_line("broker ready", WAIT).await?;
    Ok(program)
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
    /// Waits for a line of its log containing `needle` and returns it.
    ///
    /// # Errors
    /// If none comes within the bound.
    pub async fn log_line(&mut self, needle: &str) -> anyhow::Result<String> {
        self.program.wait_for_line(needle, WAIT).await
    }

    /// One sample of a metric (`name{labels}` exactly as exposed).
    ///
    /// # Errors
    /// If `/metrics` cannot be read or has no such sample.
    pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        metric(&format!("http://{}", self.metrics), sample).await
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
        let base = format!("http://{}", self.metrics);
        wait_for_metric(&base, sample, check, WAIT, &self.program).await
    }
}

/// Waits until `sample` at `{base}/metrics` satisfies `check`, within `within`, and returns its
/// value; the error shows `program`'s log.
async fn wait_for_metric(
    base: &str,
    sample: &str,
    check: impl Fn(f64) -> bool,
    within: Duration,
    program: &Program,
) -> anyhow::Result<f64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let value = metric(base, sample).await?;
        if check(value) {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{sample} is still {value} after {within:?}; log:\n{}",
                program.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `bridge add-token ARGS --config FILE`: the token it printed (once).
///
/// # Errors
/// If the command fails, times out or prints no token.
pub async fn bridge_add_token(config: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin::path("bridge")?);
    cmd.arg("add-token").args(args).arg("--config").arg(config);
    let stdout = run_to_end(cmd, "bridge add-token").await?;
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .map(str::to_owned)
        .with_context(|| format!("no token in {stdout:?}"))
}

/// Starts the standalone `broker` binary on ephemeral ports (MQTT 3.1.1, `/metrics`; MQTT 5
/// only if `extra` sets `--listen-v5`) and waits until it is ready. `extra` is appended to the
/// command line; `--listen`, `--listen-v5` and `--metrics-listen` given there replace the
/// defaults. No `FLEETBEAT_BROKER_*` variable of the caller's environment reaches it.
///
/// # Errors
/// If it does not start in time.
pub async fn start_broker_standalone(extra: &[&str]) -> anyhow::Result<BrokerProcess> {
    let (mut cmd, journal_dir) = broker_command("127.0.0.1:0", extra)?;
    // Only what the test sets: no FLEETBEAT_BROKER_* from the caller's environment.
    for (key, _) in std::env::vars() {
        if key.starts_with("FLEETBEAT_BROKER_") {
            cmd.env_remove(key);
        }
    }
    let mut program = Program::spawn("broker", cmd)?;
    if let Some(dir) = journal_dir {
        program.keep(dir);
    }
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
    /// The directory holding both files (removed when this is dropped).
    _dir: tempfile::TempDir,
    /// The broker's credentials file (`broker --credentials`).
    broker: PathBuf,
    /// The simulator's secrets file (`device-sim --credentials`).
    sim: PathBuf,
    /// The fleet (as given to `device-sim provision --fleet`).
    fleet: String,
    /// How many vehicles were provisioned.
    vehicles: u32,
    /// The simulator's secrets, parsed.
    secrets: device_sim::secrets::DeviceSecrets,
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

    /// Adds device `id` of this fleet to the broker's credentials file with `broker
    /// add-device`; returns the password and the key (hex) it printed.
    ///
    /// # Errors
    /// If the command fails.
    pub async fn add_device(&self, id: &str) -> anyhow::Result<(String, Option<String>)> {
        self.add_device_in(id, &self.fleet).await
    }

    /// Adds device `id` of `fleet` (which may be another fleet than this one's) to the
    /// broker's credentials file with `broker add-device`; returns the password and the key
    /// (hex) it printed.
    ///
    /// # Errors
    /// If the command fails.
    pub async fn add_device_in(
        &self,
        id: &str,
        fleet: &str,
    ) -> anyhow::Result<(String, Option<String>)> {
        let file = self.broker_arg();
        let args = ["add-device", id, "--fleet", fleet, "--credentials", &file];
        broker_credentials_command(&args).await
    }

    /// Adds client `name` with `role` (`observer`, `bridge`) to the broker's credentials file
    /// with `broker add-client`; returns its password.
    ///
    /// # Errors
    /// If the command fails.
    pub async fn add_client(&self, name: &str, role: &str) -> anyhow::Result<String> {
        let file = self.broker_arg();
        let args = ["add-client", name, "--role", role, "--credentials", &file];
        Ok(broker_credentials_command(&args).await?.0)
    }

    /// Starts the standalone broker on this credentials file (see
    /// [`start_broker_standalone`]; `extra` is appended).
    ///
    /// # Errors
    /// If it does not start in time.
    pub async fn start_broker(&self, extra: &[&str]) -> anyhow::Result<BrokerProcess> {
        let file = self.broker_arg();
        let mut args = vec!["--credentials", &file];
        args.extend_from_slice(extra);
        start_broker_standalone(&args).await
    }

    /// Starts `device-sim` with every provisioned vehicle against `mqtt`, logging in with the
    /// simulator's secrets (`extra`, then `--credentials`, are appended).
    ///
    /// # Errors
    /// If it cannot be started.
    pub fn start_sim(&self, mqtt: SocketAddr, extra: &[&str]) -> anyhow::Result<Program> {
        let file = self.sim_arg();
        let mut args = extra.to_vec();
        args.extend_from_slice(&["--credentials", &file]);
        start_sim(mqtt, self.vehicles, &self.fleet, &args)
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
    let sim = dir.path().join("sim-secrets.toml");
    let broker_file = dir.path().join("credentials.toml");
    let mut cmd = Command::new(bin::path("device-sim")?);
    cmd.args([
        "provision",
        "--vehicles",
        &vehicles.to_string(),
        "--fleet",
        fleet,
    ])
    .arg("--secrets")
    .arg(&sim);
    run_to_end(cmd, "device-sim provision").await?;
    let secrets = device_sim::secrets::DeviceSecrets::load(&sim)?;
    let fleet_id = shared::FleetId::new(fleet).map_err(anyhow::Error::msg)?;
    let mut file = broker::CredentialsFile::open(&broker_file)?;
    for vehicle in secrets.vehicles() {
        let secret = secrets.get(vehicle).context("listed")?;
        file.set_device(
            vehicle.as_str(),
            &fleet_id,
            &secret.password,
            broker::PasswordOrigin::Generated,
            secret.key,
        )?;
    }
    file.save()?;
    Ok(FleetSecrets {
        _dir: dir,
        broker: broker_file,
        sim,
        fleet: fleet.to_owned(),
        vehicles,
        secrets,
    })
}

/// Runs `cmd` (`what`, for messages) to its end within the bound and returns its stdout.
async fn run_to_end(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let output = tokio::time::timeout(WAIT, cmd.kill_on_drop(true).output())
        .await
        .with_context(|| format!("{what} timed out"))?
        .with_context(|| format!("running {what}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `broker <args>` (a credentials subcommand such as `add-device van-1 --credentials F`
/// or `add-client alice --role observer --credentials F`) and returns the `password:` and, for
/// a device, the `key:` it printed.
///
/// # Errors
/// If it fails or prints no password.
pub async fn broker_credentials_command(args: &[&str]) -> anyhow::Result<(String, Option<String>)> {
    let mut cmd = Command::new(bin::path("broker")?);
    cmd.args(args);
    let stdout = run_to_end(cmd, &format!("broker {args:?}")).await?;
    let printed = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let password = printed("password:").with_context(|| format!("no password in {stdout}"))?;
    Ok((password, printed("key:")))
}
