//! Starting the stack under test: Fleetbeat (with the `tests` library's
//! [`start_bridge`](tests::stack::start_bridge) and friends), or the baseline (mosquitto and
//! `bench/baseline/bridge.js`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tests::process::Program;
use tests::stack::{
    free_port, start_bridge, start_bridge_external, start_broker_process, wait_ready,
};
use tokio::process::Command;

use crate::cli::{BrokerMode, RunArgs, StackKind};

/// How long mosquitto and the baseline bridge may take to come up.
const START: Duration = Duration::from_secs(30);

/// A running stack.
pub struct Stack {
    /// Which one.
    pub kind: StackKind,
    /// Its processes with their roles (`broker+bridge`, `broker`, `bridge`).
    pub programs: Vec<(String, Program)>,
    /// Where dispatchers connect (`http://127.0.0.1:PORT`).
    pub http: String,
    /// Where devices publish.
    pub mqtt: SocketAddr,
    /// The `/metrics` sample counting heartbeats ingested.
    pub ingest_metric: &'static str,
    /// The `/metrics` sample counting emits a socket could not take, if the stack has one.
    pub dropped_metric: Option<&'static str>,
    /// The run's files (the bridge's store, mosquitto's configuration), removed afterwards.
    _dir: tempfile::TempDir,
}

impl Stack {
    /// Starts `kind` and waits until it is ready.
    ///
    /// # Errors
    /// If a program does not start or get ready in time.
    pub async fn start(kind: StackKind, args: &RunArgs) -> anyhow::Result<Self> {
        match kind {
            StackKind::Baseline => start_baseline(args).await,
            _ => start_fleetbeat(args).await,
        }
    }

    /// Reads one sample from `/metrics`.
    ///
    /// # Errors
    /// If `/metrics` cannot be read or lacks the sample.
    pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        tests::stack::metric(&self.http, sample).await
    }

    /// Stops every program (SIGTERM, then SIGKILL).
    pub async fn stop(mut self) {
        for (_, program) in self.programs.iter_mut().rev() {
            if program.terminate(Duration::from_secs(10)).await.is_err() {
                let _ = program.kill().await;
            }
        }
    }
}

/// A fresh temporary directory for one run, named after what it is for.
fn run_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("temporary directory")
}

async fn start_fleetbeat(args: &RunArgs) -> anyhow::Result<Stack> {
    // A fresh store per run, so no run inherits another's orders.
    let dir = run_dir("loadbench-bridge-")?;
    let store = dir.path().join("fleetbeat.db");
    let store = store.to_str().context("a UTF-8 temporary directory")?;
    let tick = args.tick_ms().to_string();
    let bridge_args = ["--tick-ms", &tick, "--store", store];
    let mut programs = Vec::new();
    let bridge = match args.broker {
        BrokerMode::Separate => {
            let mqtt = free_port()?;
            let broker = start_broker_process(
                mqtt,
                &[
                    "--no-v5",
                    "--metrics-listen",
                    "off",
                    "--json-mirror",
                    "false",
                ],
            )
            .await?;
            programs.push(("broker".to_owned(), broker));
            start_bridge_external(mqtt, &bridge_args).await?
        }
        BrokerMode::Embedded => start_bridge(&bridge_args).await?,
    };
    let role = match args.broker {
        BrokerMode::Embedded => "broker+bridge",
        BrokerMode::Separate => "bridge",
    };
    let (http, mqtt) = (bridge.url(), bridge.mqtt);
    programs.push((role.to_owned(), bridge.program));
    Ok(Stack {
        kind: StackKind::Fleetbeat,
        programs,
        http,
        mqtt,
        ingest_metric: "fleetbeat_bridge_mqtt_received_total{kind=\"hb\"}",
        dropped_metric: Some("fleetbeat_bridge_socketio_dropped_total"),
        _dir: dir,
    })
}

async fn start_baseline(args: &RunArgs) -> anyhow::Result<Stack> {
    let dir = run_dir("loadbench-mosquitto-")?;
    let mqtt = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {} {}\nallow_anonymous true\nmax_connections -1\npersistence false\n\
             log_dest stderr\nlog_type error\nlog_type warning\n",
            mqtt.port(),
            mqtt.ip()
        ),
    )
    .context("writing mosquitto.conf")?;
    let mut mosquitto = Command::new(&args.mosquitto);
    mosquitto.arg("-c").arg(&conf);
    let mosquitto = Program::spawn("mosquitto", mosquitto)
        .context("starting mosquitto (apt-get install mosquitto)")?;
    let deadline = tokio::time::Instant::now() + START;
    while tokio::net::TcpStream::connect(mqtt).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "mosquitto does not listen on {mqtt}:\n{}",
                mosquitto.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let baseline = tests::workspace().join("bench/baseline");
    tests::node::npm_ci(&baseline, &["socket.io", "mqtt"])?;
    let mut node = Command::new("node");
    node.arg("bridge.js")
        .current_dir(baseline)
        .env("MQTT_URL", format!("mqtt://{mqtt}"))
        .env("PORT", "0");
    let mut bridge = Program::spawn("baseline", node)?;
    let line = bridge.wait_for_line("listening on http://", START).await?;
    let http = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .context("no URL in the baseline's first line")?
        .to_owned();
    bridge.wait_for_line("subscribed", START).await?;
    wait_ready(&http).await?;
    Ok(Stack {
        kind: StackKind::Baseline,
        programs: vec![
            ("broker".to_owned(), mosquitto),
            ("bridge".to_owned(), bridge),
        ],
        http,
        mqtt,
        ingest_metric: "baseline_mqtt_received_total",
        dropped_metric: None,
        _dir: dir,
    })
}
