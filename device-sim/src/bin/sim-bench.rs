//! `sim-bench`: what a simulated vehicle costs, measured against a real broker.
//!
//! It starts Debian's `mosquitto` on an ephemeral loopback port (anonymous, no connection
//! limit) and runs five phases, each in a fresh child process of itself so no phase inherits
//! another's heap:
//!
//! 1. `rumqttc-bare`: N plain rumqttc clients (`AsyncClient` + `EventLoop`), connected and
//!    idle: what a connection cost with the client the simulator used before.
//! 2. `rumqttc-raw`: the same clients publishing a 38-byte QoS 0 payload at the rate.
//! 3. `client-bare`: N connections of the simulator's own MQTT session
//!    ([`device_sim::session`], driven over [`device_sim::mqtt::Link`]),
//!    connected and idle: the baseline cost of a connection.
//! 4. `client-raw`: the same connections publishing a 38-byte QoS 0 payload at the rate: the
//!    baseline cost of moving that many messages through our client and tokio.
//! 5. `sim`: the real simulator with N vehicles at the rate (device core, sealing,
//!    store-and-forward, events).
//!
//! For each phase it reports the RSS growth per connection (after all connected and a
//! warm-up) and the CPU time per second of wall time over the measurement window, per 1,000
//! messages per second; and the ratios of `sim` against the baselines. `--phases` runs a
//! subset. The file descriptor limit must allow N sockets in this process and in mosquitto
//! (`ulimit -n`).
//!
//! ```sh
//! ulimit -n 65536   # or at least N + 100
//! cargo run --release -p device-sim --bin sim-bench -- --vehicles 10000 --rate 1
//! ```

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use device_sim::mqtt::{Link, LinkError, SessionClock};
use device_sim::runner::{SimConfig, Simulation};
use device_sim::session::{
    ConnectRequest, Incoming, Message, QoS as SessionQoS, Session, SessionOptions, VehicleSession,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Every phase, in the order they run.
const PHASES: [&str; 5] = [
    "rumqttc-bare",
    "rumqttc-raw",
    "client-bare",
    "client-raw",
    "sim",
];

/// Measures memory per vehicle and CPU per 1k heartbeats/s against mosquitto.
#[derive(Debug, Clone, Parser)]
#[command(name = "sim-bench")]
struct Args {
    /// Vehicles (connections) per phase.
    #[arg(long, default_value_t = 10_000)]
    vehicles: u32,
    /// Heartbeats per second per vehicle.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds to wait after the last connection before measuring.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Seconds to measure CPU over.
    #[arg(long, default_value_t = 30)]
    measure: u64,
    /// The mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Use this broker instead of starting mosquitto.
    #[arg(long)]
    broker: Option<SocketAddr>,
    /// The phases to run, comma-separated (default: all, see the module docs).
    #[arg(long, value_delimiter = ',')]
    phases: Vec<String>,
    /// Internal: run one phase against `--broker`.
    #[arg(long, hide = true)]
    phase: Option<String>,
}

/// One phase's measurements.
#[derive(Debug, Clone, Default)]
struct Measured {
    phase: String,
    vehicles: u32,
    rss_before_kib: u64,
    rss_after_kib: u64,
    connect_secs: f64,
    cpu_secs: f64,
    wall_secs: f64,
    messages: u64,
    broker_cpu_secs: f64,
}

impl Measured {
    fn per_vehicle_kib(&self) -> f64 {
        (self.rss_after_kib.saturating_sub(self.rss_before_kib)) as f64
            / f64::from(self.vehicles.max(1))
    }

    fn messages_per_sec(&self) -> f64 {
        self.messages as f64 / self.wall_secs.max(1e-9)
    }

    /// CPU (in % of one core) per 1,000 messages per second.
    fn cpu_pct_per_1k(&self) -> f64 {
        let cpu_pct = 100.0 * self.cpu_secs / self.wall_secs.max(1e-9);
        cpu_pct / (self.messages_per_sec() / 1000.0).max(1e-9)
    }

    fn to_line(&self) -> String {
        format!(
            "MEASURED {} {} {} {} {:.3} {:.3} {:.3} {}",
            self.phase,
            self.vehicles,
            self.rss_before_kib,
            self.rss_after_kib,
            self.connect_secs,
            self.cpu_secs,
            self.wall_secs,
            self.messages
        )
    }

    fn from_line(line: &str) -> Option<Self> {
        let mut f = line.strip_prefix("MEASURED ")?.split(' ');
        Some(Self {
            phase: f.next()?.to_owned(),
            vehicles: f.next()?.parse().ok()?,
            rss_before_kib: f.next()?.parse().ok()?,
            rss_after_kib: f.next()?.parse().ok()?,
            connect_secs: f.next()?.parse().ok()?,
            cpu_secs: f.next()?.parse().ok()?,
            wall_secs: f.next()?.parse().ok()?,
            messages: f.next()?.parse().ok()?,
            broker_cpu_secs: 0.0,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(phase) = args.phase.clone() {
        let broker = args.broker.context("--phase needs --broker")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let measured = runtime.block_on(run_phase(&phase, broker, &args))?;
        println!("{}", measured.to_line());
        return Ok(());
    }

    let mut mosquitto = None;
    let broker = match args.broker {
        Some(addr) => addr,
        None => {
            let (child, addr, _dir) = start_mosquitto(&args.mosquitto)?;
            mosquitto = Some((child, _dir));
            addr
        }
    };
    let broker_pid = mosquitto.as_ref().map(|(c, _)| c.id());
    eprintln!(
        "sim-bench: {} vehicles at {} Hz against {broker}",
        args.vehicles, args.rate
    );
    let phases: Vec<&str> = if args.phases.is_empty() {
        PHASES.to_vec()
    } else {
        for phase in &args.phases {
            if !PHASES.contains(&phase.as_str()) {
                bail!("unknown phase {phase}: one of {}", PHASES.join(", "));
            }
        }
        PHASES
            .into_iter()
            .filter(|p| args.phases.iter().any(|a| a == p))
            .collect()
    };
    let load_before = load_average();
    let mut results = Vec::new();
    for phase in phases {
        let broker_cpu_before = broker_pid.map_or(0.0, cpu_secs_of);
        let mut measured = run_child(phase, broker, &args)?;
        measured.broker_cpu_secs = broker_pid.map_or(0.0, cpu_secs_of) - broker_cpu_before;
        eprintln!("sim-bench: {phase} done: {measured:?}");
        results.push(measured);
    }
    if let Some((mut child, _dir)) = mosquitto {
        let _ = child.kill();
        let _ = child.wait();
    }
    report(&args, &results);
    println!(
        "\nload average (1, 5, 15 min): {load_before} before, {} after",
        load_average()
    );
    Ok(())
}

/// `/proc/loadavg`'s first three fields.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn report(args: &Args, results: &[Measured]) {
    println!(
        "\n| phase | connections | connect s | RSS before MiB | RSS after MiB | KiB per connection | msgs/s | CPU % of a core | CPU % per 1k msgs/s | mosquitto CPU % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for m in results {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {} | {:.1} |",
            m.phase,
            m.vehicles,
            m.connect_secs,
            m.rss_before_kib as f64 / 1024.0,
            m.rss_after_kib as f64 / 1024.0,
            m.per_vehicle_kib(),
            m.messages_per_sec(),
            100.0 * m.cpu_secs / m.wall_secs.max(1e-9),
            if m.messages > 0 {
                format!("{:.2}", m.cpu_pct_per_1k())
            } else {
                "-".into()
            },
            100.0 * m.broker_cpu_secs / m.wall_secs.max(1e-9),
        );
    }
    let find = |p: &str| results.iter().find(|m| m.phase == p);
    let Some(sim) = find("sim") else {
        return;
    };
    println!(
        "\nsim: {:.1} KiB per vehicle, {:.2} % of a core per 1k heartbeats/s; \
         {} vehicles at {} Hz: {:.0} heartbeats/s using {:.0} % of one core",
        sim.per_vehicle_kib(),
        sim.cpu_pct_per_1k(),
        args.vehicles,
        args.rate,
        sim.messages_per_sec(),
        100.0 * sim.cpu_secs / sim.wall_secs.max(1e-9),
    );
    for base in ["client-bare", "rumqttc-bare"] {
        if let Some(bare) = find(base) {
            println!(
                "  memory: {:.2}x {base} ({:.1} KiB), {:+.1} KiB",
                sim.per_vehicle_kib() / bare.per_vehicle_kib().max(1e-9),
                bare.per_vehicle_kib(),
                sim.per_vehicle_kib() - bare.per_vehicle_kib(),
            );
        }
    }
    for base in ["client-raw", "rumqttc-raw"] {
        if let Some(raw) = find(base).filter(|m| m.messages > 0) {
            println!(
                "  CPU: {:.2}x {base} ({:.2} % per 1k msgs/s)",
                sim.cpu_pct_per_1k() / raw.cpu_pct_per_1k().max(1e-9),
                raw.cpu_pct_per_1k(),
            );
        }
    }
}

/// Runs one phase in a child process of this binary and reads its measurement.
fn run_child(phase: &str, broker: SocketAddr, args: &Args) -> anyhow::Result<Measured> {
    let exe = std::env::current_exe().context("locating sim-bench")?;
    let mut child = Command::new(exe)
        .args(["--phase", phase, "--broker", &broker.to_string()])
        .args(["--vehicles", &args.vehicles.to_string()])
        .args(["--rate", &args.rate.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--measure", &args.measure.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a phase")?;
    let stdout = child.stdout.take().context("phase stdout")?;
    let mut measured = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(m) = Measured::from_line(&line) {
            measured = Some(m);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("phase {phase} failed: {status}");
    }
    measured.with_context(|| format!("phase {phase} reported nothing"))
}

/// Starts mosquitto on a free loopback port with a config allowing anonymous clients and
/// any number of connections.
fn start_mosquitto(binary: &PathBuf) -> anyhow::Result<(Child, SocketAddr, TempDir)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = TempDir::new("sim-bench")?;
    let conf = dir.0.join("mosquitto.conf");
    let mut file = std::fs::File::create(&conf)?;
    writeln!(
        file,
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning"
    )?;
    drop(file);
    let child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (apt-get install mosquitto)", binary.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("mosquitto did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, addr, dir))
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of process `pid` (all threads), from `/proc/PID/stat`.
fn cpu_secs_of(pid: u32) -> f64 {
    cpu_secs_from(&format!("/proc/{pid}/stat"))
}

fn cpu_secs() -> f64 {
    cpu_secs_from("/proc/self/stat")
}

fn cpu_secs_from(path: &str) -> f64 {
    // Fields after the command name (which may contain spaces) start at field 3; utime and
    // stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0)
}

async fn run_phase(phase: &str, broker: SocketAddr, args: &Args) -> anyhow::Result<Measured> {
    let rss_before_kib = rss_kib();
    let started = Instant::now();
    let spread = Duration::from_secs_f64(f64::from(args.vehicles) / 1000.0);
    let (messages, keep): (Arc<AtomicU64>, Box<dyn std::any::Any + Send>) = match phase {
        "rumqttc-bare" | "rumqttc-raw" | "client-bare" | "client-raw" => {
            let rate = phase.ends_with("-raw").then_some(args.rate);
            let pool = if phase.starts_with("rumqttc") {
                bare_clients(broker, args.vehicles, spread, rate)
            } else {
                own_clients(broker, args.vehicles, spread, rate)
            };
            let connected = Arc::clone(&pool.connected);
            wait_until(|| connected.load(Ordering::Relaxed) >= u64::from(args.vehicles)).await?;
            (Arc::clone(&pool.messages), Box::new(pool.tasks))
        }
        "sim" => {
            let config = SimConfig {
                vehicles: args.vehicles,
                broker_host: broker.ip().to_string(),
                broker_port: broker.port(),
                rate_hz: args.rate,
                connect_spread: spread,
                progress_every: Duration::from_secs(3600),
                ..SimConfig::default()
            };
            let simulation = Arc::new(Simulation::start(config)?);
            let sim = Arc::clone(&simulation);
            wait_until(move || sim.report().connected >= u64::from(args.vehicles)).await?;
            let messages = Arc::new(AtomicU64::new(0));
            let counter = Arc::clone(&messages);
            let sim = Arc::clone(&simulation);
            tokio::spawn(async move {
                loop {
                    counter.store(sim.report().heartbeats_sent, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            (messages, Box::new(simulation))
        }
        other => bail!("unknown phase {other}"),
    };
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let rss_after_kib = rss_kib();
    let (cpu0, msgs0, t0) = (cpu_secs(), messages.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.measure)).await;
    let (cpu1, msgs1, wall) = (
        cpu_secs(),
        messages.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    drop(keep);
    Ok(Measured {
        phase: phase.to_owned(),
        vehicles: args.vehicles,
        rss_before_kib,
        rss_after_kib,
        connect_secs,
        cpu_secs: cpu1 - cpu0,
        wall_secs: wall,
        messages: msgs1 - msgs0,
        broker_cpu_secs: 0.0,
    })
}

async fn wait_until(done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        if Instant::now() > deadline {
            bail!("not all connected within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A pool of benchmark connections: how many messages they published, how many are
/// connected, and their tasks (dropping the pool does not stop them; the phase's process ends).
struct Pool {
    messages: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pool {
    /// Spawns `n` connections: `connection(i, delay, messages, connected)` is the future of the
    /// `i`-th, which waits `delay` (its share of `spread`) before connecting.
    fn spawn<F>(
        n: u32,
        spread: Duration,
        connection: impl Fn(u32, Duration, Arc<AtomicU64>, Arc<AtomicU64>) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let messages = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicU64::new(0));
        let tasks = (0..n)
            .map(|i| {
                let delay = spread.mul_f64(f64::from(i) / f64::from(n));
                tokio::spawn(connection(
                    i,
                    delay,
                    Arc::clone(&messages),
                    Arc::clone(&connected),
                ))
            })
            .collect();
        Self {
            messages,
            connected,
            tasks,
        }
    }
}

/// With a rate, an interval at it starting now, its phase the `i`-th of `n` spread over one
/// period.
fn publish_ticker(rate: Option<f64>, i: u32, n: u32) -> Option<tokio::time::Interval> {
    rate.map(|r| {
        let p = Duration::from_secs_f64(1.0 / r);
        let mut t = tokio::time::interval_at(
            tokio::time::Instant::now() + p.mul_f64(f64::from(i) / f64::from(n)),
            p,
        );
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        t
    })
}

/// `n` plain rumqttc clients with the simulator's options, connecting over `spread`; with a
/// rate, each publishes a heartbeat-sized QoS 0 payload at it.
fn bare_clients(broker: SocketAddr, n: u32, spread: Duration, rate: Option<f64>) -> Pool {
    Pool::spawn(n, spread, |i, delay, messages, connected| {
        let mut options = MqttOptions::new(
            format!("bare-{i:05}"),
            broker.ip().to_string(),
            broker.port(),
        );
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(20)
            .set_request_channel_capacity(32);
        let (client, mut eventloop) = AsyncClient::new(options, 32);
        let topic = format!("fleet/bare/bare-{i:05}/hb");
        async move {
            tokio::time::sleep(delay).await;
            let mut ticker = publish_ticker(rate, i, n);
            loop {
                // One poll future kept across ticks, as the simulator does.
                let event = {
                    let poll = eventloop.poll();
                    tokio::pin!(poll);
                    loop {
                        tokio::select! {
                            event = &mut poll => break event,
                            _ = next_tick(ticker.as_mut()) => {
                                let _ = client.try_publish(
                                    topic.as_str(),
                                    QoS::AtMostOnce,
                                    false,
                                    vec![1u8; 38],
                                );
                            }
                        }
                    }
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                        messages.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
    })
}

/// Like [`bare_clients`], with the simulator's own client: one task per connection owning
/// the socket and the client state, as a vehicle does.
fn own_clients(broker: SocketAddr, n: u32, spread: Duration, rate: Option<f64>) -> Pool {
    let host: Arc<str> = broker.ip().to_string().into();
    Pool::spawn(n, spread, |i, delay, messages, connected| {
        let host = Arc::clone(&host);
        async move {
            let id = format!("client-{i:05}");
            let topic = format!("fleet/bare/{id}/hb");
            let mut client: VehicleSession<()> = Session::new(SessionOptions::new(30));
            let clock = SessionClock::new();
            tokio::time::sleep(delay).await;
            let mut ticker = publish_ticker(rate, i, n);
            loop {
                if let Ok(mut link) =
                    Link::connect(&host, broker.port(), None, Duration::from_secs(5)).await
                {
                    let request = ConnectRequest {
                        client_id: &id,
                        login: None,
                        will: None,
                    };
                    if client.begin(&request, clock.now_ms()).is_err() {
                        return;
                    }
                    let _lost = converse(
                        &mut link,
                        &mut client,
                        clock,
                        &topic,
                        ticker.as_mut(),
                        &messages,
                        &connected,
                    )
                    .await;
                    client.reset();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    })
}

/// One connection of [`own_clients`] until it fails.
async fn converse(
    link: &mut Link,
    client: &mut VehicleSession<()>,
    clock: SessionClock,
    topic: &str,
    mut ticker: Option<&mut tokio::time::Interval>,
    messages: &AtomicU64,
    connected: &AtomicU64,
) -> LinkError {
    let far = || tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
    let deadline =
        |client: &VehicleSession<()>| client.deadline().map_or_else(far, |ms| clock.instant(ms));
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline(client)));
    let payload = [1u8; 38];
    loop {
        if let Err(err) = link.write_now(client) {
            return err;
        }
        tokio::select! {
            exchanged = link.exchange(client) => {
                if let Err(err) = exchanged {
                    return err;
                }
                loop {
                    match client.next_incoming(clock.now_ms()) {
                        Ok(Some(Incoming::ConnAck)) => {
                            connected.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(err) => return err.into(),
                    }
                }
            }
            _ = next_tick(ticker.as_deref_mut()) => {
                let message = Message {
                    topic,
                    payload: &payload,
                    qos: SessionQoS::AtMostOnce,
                    retain: false,
                };
                if client.publish(&message, false, (), clock.now_ms()).is_ok() {
                    messages.fetch_add(1, Ordering::Relaxed);
                }
            }
            () = timer.as_mut() => {
                if let Err(err) = client.on_timer(clock.now_ms()) {
                    return err.into();
                }
                timer.as_mut().reset(deadline(client));
            }
        }
    }
}

async fn next_tick(ticker: Option<&mut tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}
