//! A bridge cluster (issue #15) for tests: one MQTT broker (Debian's `mosquitto`, or our
//! `broker`), a Redis server, a PostgreSQL database, N `bridge` processes in one
//! shared-subscription group, and `device-sim` — all real processes on free loopback ports,
//! everything stopped when the [`Cluster`] is dropped.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use tests::cluster::{Cluster, ClusterOptions};
//! let mut cluster = Cluster::start(ClusterOptions::default()).await?;
//! let url = cluster.bridge(2)?.url(); // http://127.0.0.1:PORT of `bridge-2`
//! cluster.kill_bridge(1).await?; // SIGKILL
//! cluster.restart_bridge(1).await?; // the same client_id and addresses
//! # Ok(()) }
//! ```
//!
//! Bridges are numbered from 1, as their client ids: bridge `i` is `bridge-{i}`. Each runs
//! with `--client-id bridge-{i} --shared-group {group} --redis-url {redis} --store
//! postgres://…/{database} --mqtt-url mqtt://{broker} --listen 127.0.0.1:{port}`: port 0 at the
//! first start (the bridge binds a free port itself and logs it: a port picked here and
//! released could be taken by any other socket before the bridge binds it), then the port it
//! bound, so a restarted bridge comes back on the same address and the same MQTT session.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use testengines::postgres::TempPostgres;
use testengines::redis::TempRedis;
use tokio::process::Command;

use crate::process::Program;
use crate::stack::{BridgeProcess, BrokerProcess, free_port, spawn_bridge, start_sim};
use crate::{WAIT, temp_dir};

/// Which MQTT broker the cluster's devices and bridges use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BrokerKind {
    /// Debian's `mosquitto` (2.x), the reference broker with shared subscriptions.
    #[default]
    Mosquitto,
    /// Fleetbeat's own standalone `broker` (its `$share` support, issue #15 item 4).
    Fleetbeat,
}

/// What [`Cluster::start`] starts.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many bridges (`bridge-1` ..= `bridge-{n}`).
    pub bridges: usize,
    /// How many `device-sim` vehicles; 0 starts no simulator.
    pub vehicles: u32,
    /// The simulator's fleet (vehicles `{fleet}-0001`, ...).
    pub fleet: String,
    /// The MQTT broker.
    pub broker: BrokerKind,
    /// The bridges' shared-subscription group (`--shared-group`).
    pub shared_group: String,
    /// Extra arguments for every bridge (e.g. `--command-timeout-ms 3000`).
    pub bridge_args: Vec<String>,
    /// Extra arguments for `device-sim` (e.g. `--rate 2`).
    pub sim_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            bridges: 2,
            vehicles: 200,
            fleet: "demo".to_owned(),
            broker: BrokerKind::Mosquitto,
            shared_group: "fleetbeat".to_owned(),
            bridge_args: Vec::new(),
            sim_args: Vec::new(),
        }
    }
}

/// The MQTT broker of a cluster.
enum Broker {
    /// Debian's `mosquitto` (its configuration is in the cluster's directory).
    Mosquitto(Program),
    /// Our standalone `broker`.
    Fleetbeat(BrokerProcess),
}

/// One bridge's fixed identity: its client id and HTTP address, kept across restarts.
struct Slot {
    client_id: String,
    /// The HTTP address it bound at its first start (`None` before).
    listen: Option<SocketAddr>,
    process: Option<BridgeProcess>,
}

/// A running cluster; see the module documentation. Dropping it kills every process (the
/// bridges with SIGKILL) and stops Redis and PostgreSQL.
pub struct Cluster {
    // Field order is drop order: clients of the engines go first.
    sim: Option<Program>,
    slots: Vec<Slot>,
    broker: Broker,
    mqtt: SocketAddr,
    redis: TempRedis,
    store_url: String,
    postgres: TempPostgres,
    options: ClusterOptions,
    /// Files of the cluster (mosquitto's configuration); removed last.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the broker, Redis, PostgreSQL, `options.bridges` bridges (each ready: MQTT
    /// connected and subscribed) and then `device-sim`.
    ///
    /// # Errors
    /// If any part does not start within its bound (the error says which, with its log).
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(options.bridges >= 1, "a cluster needs at least one bridge");
        let dir = temp_dir()?;
        let (postgres, redis) = start_engines().await?;
        let (broker, mqtt) = match options.broker {
            BrokerKind::Mosquitto => {
                let (program, addr) = start_mosquitto(dir.path()).await?;
                (Broker::Mosquitto(program), addr)
            }
            BrokerKind::Fleetbeat => {
                let broker = crate::stack::start_broker_standalone(&[]).await?;
                let addr = broker.mqtt;
                (Broker::Fleetbeat(broker), addr)
            }
        };
        let mut slots = Vec::with_capacity(options.bridges);
        for i in 1..=options.bridges {
            slots.push(Slot {
                client_id: format!("bridge-{i}"),
                listen: None,
                process: None,
            });
        }
        let mut cluster = Self {
            sim: None,
            slots,
            broker,
            mqtt,
            store_url: postgres.url(),
            redis,
            postgres,
            options,
            _dir: dir,
        };
        for i in 1..=cluster.slots.len() {
            cluster.launch(i).await?;
        }
        if cluster.options.vehicles > 0 {
            cluster.sim = Some(cluster.start_sim()?);
        }
        Ok(cluster)
    }

    /// Starts `device-sim` with the cluster's vehicles, fleet and `sim_args` against the broker.
    fn start_sim(&self) -> anyhow::Result<Program> {
        let args: Vec<&str> = self.options.sim_args.iter().map(String::as_str).collect();
        start_sim(self.mqtt, self.options.vehicles, &self.options.fleet, &args)
    }

    /// The command line of bridge `i`.
    fn bridge_args(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let slot = self.slot(i)?;
        let mut args = vec![
            "--mqtt-url".to_owned(),
            format!("mqtt://{}", self.mqtt),
            "--listen".to_owned(),
            slot.listen
                .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string()),
            "--client-id".to_owned(),
            slot.client_id.clone(),
            "--shared-group".to_owned(),
            self.options.shared_group.clone(),
            "--redis-url".to_owned(),
            self.redis.url(),
            "--store".to_owned(),
            self.store_url.clone(),
        ];
        args.extend(self.options.bridge_args.iter().cloned());
        Ok(args)
    }

    /// Starts bridge `i` and waits until it is ready. A bridge killed a moment ago may still
    /// hold its `client_id` registration in Redis (it expires by itself): the start is then
    /// retried until [`RESTART_WAIT`] has passed.
    async fn launch(&mut self, i: usize) -> anyhow::Result<()> {
        let args = self.bridge_args(i)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let deadline = tokio::time::Instant::now() + RESTART_WAIT;
        let process = loop {
            match spawn_bridge(&args).await {
                Ok(process) => break process,
                Err(err) if is_client_id_held(&err) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(err) => {
                    return Err(err.context(format!("starting bridge-{i}")));
                }
            }
        };
        let slot = self.slot_mut(i)?;
        slot.listen = Some(process.http);
        slot.process = Some(process);
        Ok(())
    }

    fn slot(&self, i: usize) -> anyhow::Result<&Slot> {
        i.checked_sub(1)
            .and_then(|k| self.slots.get(k))
            .with_context(|| format!("no bridge {i} (bridges are numbered from 1)"))
    }

    fn slot_mut(&mut self, i: usize) -> anyhow::Result<&mut Slot> {
        i.checked_sub(1)
            .and_then(|k| self.slots.get_mut(k))
            .with_context(|| format!("no bridge {i} (bridges are numbered from 1)"))
    }

    /// Bridge `i` (numbered from 1), if it is running.
    ///
    /// # Errors
    /// If there is no such bridge or it is killed.
    pub fn bridge(&self, i: usize) -> anyhow::Result<&BridgeProcess> {
        self.slot(i)?
            .process
            .as_ref()
            .with_context(|| format!("bridge-{i} is not running"))
    }

    /// Bridge `i` (numbered from 1), mutably (to wait for its log lines).
    ///
    /// # Errors
    /// If there is no such bridge or it is killed.
    pub fn bridge_mut(&mut self, i: usize) -> anyhow::Result<&mut BridgeProcess> {
        self.slot_mut(i)?
            .process
            .as_mut()
            .with_context(|| format!("bridge-{i} is not running"))
    }

    /// `http://127.0.0.1:PORT` of bridge `i`: the same across restarts.
    ///
    /// # Errors
    /// If there is no such bridge.
    pub fn url(&self, i: usize) -> anyhow::Result<String> {
        let listen = self.slot(i)?.listen;
        Ok(format!(
            "http://{}",
            listen.with_context(|| format!("bridge-{i} has not started yet"))?
        ))
    }

    /// The MQTT client id of bridge `i` (`bridge-{i}`).
    ///
    /// # Errors
    /// If there is no such bridge.
    pub fn client_id(&self, i: usize) -> anyhow::Result<&str> {
        Ok(&self.slot(i)?.client_id)
    }

    /// How many bridges the cluster has (running or not).
    pub fn bridges(&self) -> usize {
        self.slots.len()
    }

    /// Kills bridge `i` with SIGKILL (no goodbye to MQTT, Redis or PostgreSQL) and reaps it.
    ///
    /// # Errors
    /// If it is not running or cannot be killed.
    pub async fn kill_bridge(&mut self, i: usize) -> anyhow::Result<()> {
        let mut process = self
            .slot_mut(i)?
            .process
            .take()
            .with_context(|| format!("bridge-{i} is not running"))?;
        process.program.kill().await
    }

    /// Starts bridge `i` again with the same command line (client id, address, group, Redis,
    /// store) and waits until it is ready. If it is still running, it is killed first.
    ///
    /// # Errors
    /// If it does not come back within its bound.
    pub async fn restart_bridge(&mut self, i: usize) -> anyhow::Result<()> {
        if self.slot(i)?.process.is_some() {
            self.kill_bridge(i).await?;
        }
        self.launch(i).await
    }

    /// The MQTT broker's address (plain MQTT 3.1.1, anonymous).
    pub fn mqtt(&self) -> SocketAddr {
        self.mqtt
    }

    /// The broker's process (its log), whichever kind it is.
    pub fn broker_program(&self) -> &Program {
        match &self.broker {
            Broker::Mosquitto(program) => program,
            Broker::Fleetbeat(broker) => &broker.program,
        }
    }

    /// `redis://127.0.0.1:PORT` of the cluster's Redis.
    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    /// The cluster's Redis server (to kill or restart it).
    pub fn redis_mut(&mut self) -> &mut TempRedis {
        &mut self.redis
    }

    /// The bridges' store, `postgres://…` (for direct queries with sqlx).
    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    /// The cluster's PostgreSQL server.
    pub fn postgres(&self) -> &TempPostgres {
        &self.postgres
    }

    /// The running `device-sim`, if any.
    pub fn sim_mut(&mut self) -> Option<&mut Program> {
        self.sim.as_mut()
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }
}

/// How long [`Cluster::restart_bridge`] keeps trying while the dead bridge's `client_id`
/// registration in Redis has not expired yet.
pub const RESTART_WAIT: Duration = Duration::from_secs(40);

/// Whether a bridge's start failed because its `client_id` is still registered (by the
/// instance that was killed).
fn is_client_id_held(err: &anyhow::Error) -> bool {
    let text = format!("{err:#}");
    text.contains("in use by another bridge")
}

/// Starts a PostgreSQL server and a redis-server on free loopback ports (off the runtime's
/// threads: initdb takes seconds), as a cluster or a benchmark of several bridges needs.
///
/// # Errors
/// If either does not start (the error says which, and the package to install).
pub async fn start_engines() -> anyhow::Result<(TempPostgres, TempRedis)> {
    let postgres = tokio::task::spawn_blocking(TempPostgres::start)
        .await
        .context("the PostgreSQL starter panicked")?
        .context("starting PostgreSQL (apt-get install -y postgresql)")?;
    let redis = tokio::task::spawn_blocking(TempRedis::start)
        .await
        .context("the Redis starter panicked")?
        .context("starting redis-server (apt-get install -y redis-server)")?;
    Ok((postgres, redis))
}

/// Starts Debian's `mosquitto` with one plain MQTT listener on a free 127.0.0.1 port,
/// anonymous clients allowed; its configuration is written into `dir`. Returns once it listens.
///
/// The bridges keep a persistent MQTT session for delivery events (clean session off). For a
/// shared subscription whose member's client is gone but whose session persists, mosquitto
/// 2.0 keeps dealing messages to that member in turn, queuing the QoS 1 ones in its session
/// until it reconnects (the broker PUBACKs the publisher meanwhile); `max_queued_messages`
/// (default 1000 per client) would silently drop the excess, so the tests raise it.
///
/// # Errors
/// If it cannot be started or does not listen within the bound.
pub async fn start_mosquitto(dir: &std::path::Path) -> anyhow::Result<(Program, SocketAddr)> {
    let addr = free_port()?;
    let config = dir.join("mosquitto.conf");
    let text = format!(
        "# Written by the Fleetbeat cluster tests.\n\
         # As root, mosquitto would switch to its own user; not as root, this does nothing.\n\
         user root\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
         # The bridges' persistent sessions hold every QoS 1 message dealt to a dead bridge.\n\
         max_queued_messages 1000000\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n",
        port = addr.port(),
    );
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(&config);
    let mut program = Program::spawn("mosquitto", cmd)
        .context("running mosquitto (apt-get install mosquitto)")?;
    program
        .wait_for_line(&format!("listen socket on port {}", addr.port()), WAIT)
        .await?;
    program.wait_for_line(" running", WAIT).await?;
    Ok((program, addr))
}

/// Waits until `check` passes, polling every 100 ms, for at most `within`; returns its last
/// error otherwise.
///
/// # Errors
/// The last error of `check` if it never passed.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(err) if tokio::time::Instant::now() > deadline => {
                return Err(err.context(format!("still failing after {within:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Fails unless `program` is still running (e.g. `device-sim` did not exit with an error).
///
/// # Errors
/// If it has exited: with its log.
pub fn ensure_running(program: &mut Program, what: &str) -> anyhow::Result<()> {
    if !program.is_running() {
        bail!("{what} exited; its log:\n{}", program.log_text());
    }
    Ok(())
}
