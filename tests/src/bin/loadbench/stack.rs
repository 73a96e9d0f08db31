//! Starting the stack under test: Fleetbeat (with the `tests` library's
//! [`start_bridge`](tests::stack::start_bridge) and friends), or a baseline (mosquitto and
//! `bench/baseline/bridge.js`, or `careful.js`), or a Fleetbeat cluster (`--bridges N`, `--cluster-engines`:
//! mosquitto, Redis, PostgreSQL and N bridges in one shared-subscription group).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tests::process::Program;
use tests::stack::{
    free_port, start_bridge, start_bridge_external, start_broker_process, wait_ready,
};
use tokio::process::Command;

use crate::cli::{BrokerMode, RunArgs, StackKind};
use crate::engines::Engines;

/// How long mosquitto and the baseline bridge may take to come up.
const START: Duration = Duration::from_secs(30);

/// A running stack.
pub struct Stack {
    /// Which one.
    pub kind: StackKind,
    /// Its processes with their roles (`broker+bridge`, `broker`, `bridge`).
    pub programs: Vec<(String, Program)>,
    /// Where dispatchers connect (`http://127.0.0.1:PORT`), one per bridge.
    pub bridges: Vec<String>,
    /// Where devices publish.
    pub mqtt: SocketAddr,
    /// The `/metrics` sample counting heartbeats ingested.
    pub ingest_metric: &'static str,
    /// The `/metrics` sample counting emits a socket could not take, if the stack has one.
    pub dropped_metric: Option<&'static str>,
    /// Redis and PostgreSQL of a cluster run.
    pub engines: Option<Engines>,
    /// The run's files (the bridge's store, mosquitto's configuration), removed afterwards.
    _dir: tempfile::TempDir,
}

/// How the CPU time of a process is read.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Its process id, if it has one.
    pub pid: Option<u32>,
    /// Whether its children count too (PostgreSQL: the postmaster and its backends).
    pub tree: bool,
}

impl Stack {
    /// Starts `kind` and waits until it is ready.
    ///
    /// # Errors
    /// If a program does not start or get ready in time.
    pub async fn start(kind: StackKind, args: &RunArgs) -> anyhow::Result<Self> {
        match kind {
            StackKind::Baseline | StackKind::Careful => start_baseline(kind, args).await,
            _ => start_fleetbeat(args).await,
        }
    }

    /// Reads one sample from `/metrics`, summed over the bridges.
    ///
    /// # Errors
    /// If `/metrics` cannot be read or lacks the sample.
    pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        let mut sum = 0.0;
        for http in &self.bridges {
            sum += tests::stack::metric(http, sample).await?;
        }
        Ok(sum)
    }

    /// Every process of the stack with its role, the engines' included.
    pub fn probes(&self) -> Vec<(String, Probe)> {
        let mut probes: Vec<(String, Probe)> = self
            .programs
            .iter()
            .map(|(role, program)| {
                let probe = Probe {
                    pid: program.pid(),
                    tree: false,
                };
                (role.clone(), probe)
            })
            .collect();
        if let Some(engines) = &self.engines {
            probes.push((
                "redis".to_owned(),
                Probe {
                    pid: Some(engines.redis_pid),
                    tree: false,
                },
            ));
            probes.push((
                "postgres".to_owned(),
                Probe {
                    pid: Some(engines.postgres_pid),
                    tree: true,
                },
            ));
        }
        probes
    }

    /// Stops every program (SIGTERM, then SIGKILL), then the engines.
    pub async fn stop(mut self) {
        for (_, program) in self.programs.iter_mut().rev() {
            if program.terminate(Duration::from_secs(10)).await.is_err() {
                let _ = program.kill().await;
            }
        }
        if let Some(engines) = self.engines.take() {
            // Dropping PostgreSQL runs `pg_ctl stop`, a blocking call.
            let _ = tokio::task::spawn_blocking(move || drop(engines)).await;
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
    let mut bridge_args = vec!["--tick-ms", &tick];
    if !args.bridge_args.iter().any(|a| a == "--store") {
        bridge_args.extend(["--store", store]);
    }
    bridge_args.extend(args.bridge_args.iter().map(String::as_str));
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
        BrokerMode::Embedded if args.cluster() => return start_cluster(args).await,
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
        bridges: vec![http],
        mqtt,
        ingest_metric: FLEETBEAT_INGEST,
        dropped_metric: Some(FLEETBEAT_DROPPED),
        engines: None,
        _dir: dir,
    })
}

/// Fleetbeat's count of heartbeats ingested.
const FLEETBEAT_INGEST: &str = "fleetbeat_bridge_mqtt_received_total{kind=\"hb\"}";
/// Fleetbeat's count of emits a socket could not take.
const FLEETBEAT_DROPPED: &str = "fleetbeat_bridge_socketio_dropped_total";

/// A Fleetbeat cluster: Debian's mosquitto, Redis, PostgreSQL and `--bridges` bridges
/// (`bridge-1` ...) in the shared-subscription group `loadbench`.
async fn start_cluster(args: &RunArgs) -> anyhow::Result<Stack> {
    let dir = run_dir("loadbench-cluster-")?;
    let engines = Engines::start().await?;
    let (mosquitto, mqtt) = tests::cluster::start_mosquitto(dir.path()).await?;
    let mut programs = vec![("mosquitto".to_owned(), mosquitto)];
    let mut bridges = Vec::new();
    let tick = args.tick_ms().to_string();
    let redis = engines.redis.url();
    for i in 1..=args.bridges {
        let client_id = format!("bridge-{i}");
        let mut bridge_args = vec![
            "--tick-ms",
            &tick,
            "--store",
            &engines.store_url,
            "--shared-group",
            "loadbench",
            "--redis-url",
            &redis,
            "--client-id",
            &client_id,
        ];
        bridge_args.extend(args.bridge_args.iter().map(String::as_str));
        let bridge = start_bridge_external(mqtt, &bridge_args)
            .await
            .with_context(|| format!("starting {client_id}"))?;
        bridges.push(bridge.url());
        programs.push((client_id, bridge.program));
    }
    Ok(Stack {
        kind: StackKind::Fleetbeat,
        programs,
        bridges,
        mqtt,
        ingest_metric: FLEETBEAT_INGEST,
        dropped_metric: Some(FLEETBEAT_DROPPED),
        engines: Some(engines),
        _dir: dir,
    })
}

/// A node baseline: Debian's mosquitto and `bench/baseline/bridge.js` (`kind` Baseline) or
/// `careful.js` (`kind` Careful, batching every `--tick-ms`). Both count what they ingest as
/// `baseline_mqtt_received_total`, and run as the roles `broker` and `bridge`.
async fn start_baseline(kind: StackKind, args: &RunArgs) -> anyhow::Result<Stack> {
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
    let (script, name) = match kind {
        StackKind::Careful => ("careful.js", "careful"),
        _ => ("bridge.js", "baseline"),
    };
    let mut node = Command::new("node");
    node.arg(script)
        .current_dir(baseline)
        .env("MQTT_URL", format!("mqtt://{mqtt}"))
        .env("PORT", "0")
        .env("TICK_MS", args.tick_ms().to_string());
    let mut bridge = Program::spawn(name, node)?;
    let line = bridge.wait_for_line("listening on http://", START).await?;
    let http = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .with_context(|| format!("no URL in the first line of {script}"))?
        .to_owned();
    bridge.wait_for_line("subscribed", START).await?;
    wait_ready(&http).await?;
    Ok(Stack {
        kind,
        programs: vec![
            ("broker".to_owned(), mosquitto),
            ("bridge".to_owned(), bridge),
        ],
        bridges: vec![http],
        mqtt,
        ingest_metric: "baseline_mqtt_received_total",
        dropped_metric: None,
        engines: None,
        _dir: dir,
    })
}
