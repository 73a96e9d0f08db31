//! `broker-bench`: the Fleetbeat broker and Debian's mosquitto, side by side, under the same
//! load from the same load generator in one run. Recipe and results: `BENCHMARKS.md`.
//!
//! ```sh
//! cargo bench -p broker --bench broker-bench                        # every scenario, both brokers
//! cargo bench -p broker --bench broker-bench -- --scenario hb10k --duration 10
//! ```
//!
//! Each broker runs as its own process (the release `broker` binary; `/usr/sbin/mosquitto`),
//! started fresh for each scenario, so its CPU time (utime + stime) and peak RSS (`VmHWM`)
//! come from `/proc/PID`. The load generator is this process: raw tokio TCP with hand-encoded
//! MQTT 3.1.1 packets (cheap per connection: one task and one socket per simulated device).
//! Every payload carries its send time (nanoseconds on this process's monotonic clock); one
//! subscriber, on a thread of its own, records the latency of each message it receives.
//!
//! Scenarios:
//! - `hb10k`: 10 000 devices × 1 Hz, QoS 0, to one QoS 0 subscriber;
//! - `qos1`: 1 000 devices × 10 Hz, QoS 1 (publishers read their PUBACKs), to one QoS 1
//!   subscriber that acknowledges every message;
//! - `flood`: 4 publishers (`--flood-publishers`) send 1 000 000 QoS 0 messages between them
//!   as fast as TCP lets them; the Fleetbeat broker runs with `--max-publish-rate 0` here.
//!
//! Steady scenarios connect every device, publish for 2 s of warm-up, then measure for
//! `--duration` seconds (sends spread evenly over each period) and give late messages 2 s.
//! Throughput is what the subscriber received per second of the window; loss is what was
//! sent in the window and never received.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf as _, BytesMut};
use clap::Parser;
use shared::frame;
use shared::{FleetId, Topic, TopicKind, VehicleId};
use testengines::{port, procfs};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// The Fleetbeat broker binary, built by cargo for this bench (release profile).
const FLEETBEAT: &str = env!("CARGO_BIN_EXE_broker");

/// Bytes of every payload: send time (8), sequence number (4), padding: about a heartbeat.
const PAYLOAD_LEN: usize = 48;

/// Simultaneous connection attempts while connecting the devices.
const CONNECTS_IN_FLIGHT: usize = 64;

/// Warm-up before a steady scenario's window, and the grace for late messages after it.
const WARM_UP: Duration = Duration::from_secs(2);
const LATE: Duration = Duration::from_secs(2);

/// The Fleetbeat broker and mosquitto, side by side, under the same load.
#[derive(Debug, Parser)]
#[command(name = "broker-bench")]
struct Args {
    /// Scenarios to run, comma-separated: hb10k, qos1, flood, or all.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    scenario: Vec<String>,

    /// Brokers to run, comma-separated: fleetbeat, mosquitto.
    #[arg(long, default_value = "fleetbeat,mosquitto", value_delimiter = ',')]
    brokers: Vec<String>,

    /// Seconds measured in each steady scenario, after the warm-up.
    #[arg(long, default_value_t = 20)]
    duration: u64,

    /// Scale the number of devices and flood messages (0.1 for a quick try).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,

    /// Publishers sharing the flood's 1 000 000 messages.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    flood_publishers: u16,

    /// The mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,

    /// Run the Fleetbeat broker with its JSON mirror on (off by default: mosquitto has none).
    #[arg(long)]
    json_mirror: bool,

    /// Each device of a steady scenario also subscribes (QoS 1) to its own command topic,
    /// `fleet/bench/{id}/cmd`, as a vehicle does; none is published.
    #[arg(long)]
    subscribe_commands: bool,

    /// Extra command-line argument for the Fleetbeat broker (repeat for more), e.g.
    /// `--fleetbeat-arg=--io-threads=1`.
    #[arg(long, allow_hyphen_values = true)]
    fleetbeat_arg: Vec<String>,

    /// Extra environment variable for the Fleetbeat broker, `KEY=VALUE` (repeat for more),
    /// e.g. `--fleetbeat-env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`.
    #[arg(long)]
    fleetbeat_env: Vec<String>,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy)]
enum Scenario {
    Steady {
        name: &'static str,
        devices: usize,
        rate_hz: u32,
        qos: u8,
    },
    Flood {
        name: &'static str,
        publishers: usize,
        messages: usize,
    },
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Steady { name, .. } | Scenario::Flood { name, .. } => name,
        }
    }

    fn describe(&self) -> String {
        match *self {
            Scenario::Steady {
                devices,
                rate_hz,
                qos,
                ..
            } => format!("{devices} devices × {rate_hz} Hz, QoS {qos}"),
            Scenario::Flood {
                publishers,
                messages,
                ..
            } => format!(
                "flood: {} messages from {publishers} publishers, QoS 0",
                publishers * messages
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum BrokerKind {
    Fleetbeat,
    Mosquitto,
}

impl BrokerKind {
    fn label(self) -> &'static str {
        match self {
            BrokerKind::Fleetbeat => "fleetbeat",
            BrokerKind::Mosquitto => "mosquitto",
        }
    }
}

/// What one broker did in one scenario.
#[derive(Debug, Clone, Default)]
struct Outcome {
    sent: u64,
    received: u64,
    msg_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_s: f64,
    window_s: f64,
    peak_rss_mib: f64,
    end_rss_mib: f64,
    /// `VmRSS` of a steady scenario's broker before the devices connect, and once they all
    /// have (before they publish): what the connections themselves cost.
    idle_rss_mib: f64,
    connected_rss_mib: f64,
    connect_s: f64,
    /// Connections of a steady scenario (0 for the flood).
    devices: usize,
}

impl Outcome {
    fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            100.0 * (self.sent.saturating_sub(self.received)) as f64 / self.sent as f64
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scale = |n: usize| ((n as f64 * args.scale).round() as usize).max(1);
    let all = [
        Scenario::Steady {
            name: "hb10k",
            devices: scale(10_000),
            rate_hz: 1,
            qos: 0,
        },
        Scenario::Steady {
            name: "qos1",
            devices: scale(1_000),
            rate_hz: 10,
            qos: 1,
        },
        Scenario::Flood {
            name: "flood",
            publishers: usize::from(args.flood_publishers),
            messages: scale(1_000_000) / usize::from(args.flood_publishers),
        },
    ];
    let wanted = |s: &Scenario| args.scenario.iter().any(|w| w == "all" || w == s.name());
    let scenarios: Vec<Scenario> = all.into_iter().filter(wanted).collect();
    let mut brokers = Vec::new();
    for name in &args.brokers {
        brokers.push(match name.as_str() {
            "fleetbeat" => BrokerKind::Fleetbeat,
            "mosquitto" => BrokerKind::Mosquitto,
            other => anyhow::bail!("unknown broker {other:?}: fleetbeat or mosquitto"),
        });
    }
    anyhow::ensure!(!scenarios.is_empty(), "no scenario selected");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("{}", machine());
    println!("load average before: {}", loadavg());
    let mut results: BTreeMap<(&str, BrokerKind), Outcome> = BTreeMap::new();
    for scenario in &scenarios {
        for &kind in &brokers {
            eprintln!("== {} on {} ...", scenario.describe(), kind.label());
            let outcome = runtime.block_on(run_scenario(&args, *scenario, kind))?;
            eprintln!("   {outcome:?}");
            results.insert((scenario.name(), kind), outcome);
        }
    }
    println!("load average after:  {}", loadavg());
    println!();
    print_table(&scenarios, &brokers, &results);
    Ok(())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "machine: {cores} cores, {model}; mosquitto: {}",
        mosquitto_version()
    )
}

fn mosquitto_version() -> String {
    std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "mosquitto"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown version".to_owned())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_table(
    scenarios: &[Scenario],
    brokers: &[BrokerKind],
    results: &BTreeMap<(&str, BrokerKind), Outcome>,
) {
    println!(
        "| scenario | broker | msg/s | loss | p50 ms | p99 ms | max ms | broker CPU s (window) | peak RSS MiB | KiB/connection | RSS at end MiB | RSS before / after connecting MiB | connect s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for scenario in scenarios {
        for &kind in brokers {
            let Some(o) = results.get(&(scenario.name(), kind)) else {
                continue;
            };
            println!(
                "| {} | {} | {:.0} | {:.2}% | {:.2} | {:.2} | {:.1} | {:.2} ({:.1} s) | {:.1} | {} | {:.1} | {} | {:.1} |",
                scenario.describe(),
                kind.label(),
                o.msg_per_s,
                o.loss_pct(),
                o.p50_ms,
                o.p99_ms,
                o.max_ms,
                o.cpu_s,
                o.window_s,
                o.peak_rss_mib,
                if o.devices > 0 {
                    format!("{:.1}", o.peak_rss_mib * 1024.0 / o.devices as f64)
                } else {
                    "–".to_owned()
                },
                o.end_rss_mib,
                if o.devices > 0 {
                    format!("{:.1} / {:.1}", o.idle_rss_mib, o.connected_rss_mib)
                } else {
                    "–".to_owned()
                },
                o.connect_s,
            );
        }
        if let (Some(f), Some(m)) = (
            results.get(&(scenario.name(), BrokerKind::Fleetbeat)),
            results.get(&(scenario.name(), BrokerKind::Mosquitto)),
        ) {
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            println!(
                "| {} | **fleetbeat ÷ mosquitto** | **{:.2}×** | | {:.2}× | {:.2}× | | {:.2}× | {:.2}× | | {:.2}× | | |",
                scenario.describe(),
                ratio(f.msg_per_s, m.msg_per_s),
                ratio(f.p50_ms, m.p50_ms),
                ratio(f.p99_ms, m.p99_ms),
                ratio(f.cpu_s, m.cpu_s),
                ratio(f.peak_rss_mib, m.peak_rss_mib),
                ratio(f.end_rss_mib, m.end_rss_mib),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The brokers, as processes.

struct BrokerProcess {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl BrokerProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// utime + stime, in seconds.
    fn cpu_seconds(&self) -> f64 {
        procfs::cpu_secs(self.pid()).unwrap_or(0.0)
    }

    /// A `/proc/PID/status` field in MiB (`VmRSS`, `VmHWM`).
    fn memory_mib(&self, key: &str) -> f64 {
        procfs::status_kib(self.pid(), key).map_or(0.0, |kib| kib as f64 / 1024.0)
    }

    fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_broker(args: &Args, kind: BrokerKind, flood: bool) -> anyhow::Result<BrokerProcess> {
    let port = port::free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let dir = std::env::temp_dir().join(format!(
        "fleetbeat-broker-bench-{}-{port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("broker.log"))?;
    let mut cmd = match kind {
        BrokerKind::Fleetbeat => {
            let mut cmd = std::process::Command::new(FLEETBEAT);
            cmd.args(["--listen", &addr.to_string(), "--listen-v5", "off"])
                .args(["--metrics-listen", "off"])
                // Its own journal, not one in the working directory (heartbeats never go
                // there: only QoS 1 events, acks and statuses).
                .arg("--journal")
                .arg(dir.join("journal.db"))
                .args([
                    "--json-mirror",
                    if args.json_mirror { "true" } else { "false" },
                ]);
            if flood {
                // The flood is a few clients publishing as fast as they can: exactly what
                // the per-connection rate limit exists to stop. Measure the broker, not it.
                cmd.args(["--max-publish-rate", "0"]);
            }
            cmd.args(&args.fleetbeat_arg);
            cmd.env("RUST_LOG", "warn");
            for pair in &args.fleetbeat_env {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--fleetbeat-env wants KEY=VALUE: {pair}"))?;
                cmd.env(key, value);
            }
            cmd
        }
        BrokerKind::Mosquitto => {
            let config = dir.join("mosquitto.conf");
            std::fs::write(
                &config,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
                     max_connections -1\nmax_queued_messages 10000000\n\
                     max_inflight_messages 100\npersistence false\n\
                     log_dest stderr\nlog_type error\nlog_type warning\n"
                ),
            )?;
            let mut cmd = std::process::Command::new(&args.mosquitto);
            cmd.arg("-c").arg(config);
            cmd
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {}: {e}", kind.label()))?;
    let mut broker = BrokerProcess { child, addr, dir };
    // Ready when it answers an MQTT CONNECT.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(1), connect(addr, "bench-ready", 30)).await
        {
            return Ok(broker);
        }
        if let Ok(Some(status)) = broker.child.try_wait() {
            anyhow::bail!(
                "{} exited ({status}); see {}",
                kind.label(),
                broker.dir.display()
            );
        }
        anyhow::ensure!(Instant::now() < deadline, "{} did not start", kind.label());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT 3.1.1, written by hand with `shared::frame`.

fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    frame::Connect {
        client_id,
        keep_alive,
        ..frame::Connect::default()
    }
    .bytes()
}

/// Appends a PUBLISH of `payload` on `topic`.
fn publish_packet(topic: &[u8], qos: u8, pkid: u16, payload: &[u8], out: &mut Vec<u8>) {
    frame::Publish {
        topic,
        payload,
        qos,
        pkid,
        ..frame::Publish::default()
    }
    .put(out);
}

/// The heartbeat topic of bench vehicle `vehicle` (a valid vehicle id) in fleet `bench`.
fn heartbeat_topic(vehicle: &str) -> Vec<u8> {
    let (Ok(fleet), Ok(vehicle)) = (FleetId::new("bench"), VehicleId::new(vehicle)) else {
        unreachable!("bench ids are valid: {vehicle}");
    };
    let topic = Topic::new(fleet, vehicle, TopicKind::Heartbeat).name();
    topic.as_bytes().to_vec()
}

fn payload(sent_ns: u64, seq: u32) -> [u8; PAYLOAD_LEN] {
    let mut payload = [b'.'; PAYLOAD_LEN];
    payload[..8].copy_from_slice(&sent_ns.to_le_bytes());
    payload[8..12].copy_from_slice(&seq.to_le_bytes());
    payload
}

/// Subscribes the device `vehicle` to its command topic at QoS 1 and waits for the SUBACK.
async fn subscribe_to_commands(stream: &mut TcpStream, vehicle: &str) -> io::Result<()> {
    let (Ok(fleet), Ok(vehicle)) = (FleetId::new("bench"), VehicleId::new(vehicle)) else {
        unreachable!("bench ids are valid: {vehicle}");
    };
    let topic = Topic::new(fleet, vehicle, TopicKind::Command).name();
    stream
        .write_all(&frame::subscribe(false, 1, &[(topic.as_str(), 1)]))
        .await?;
    let mut suback = [0u8; 5];
    stream.read_exact(&mut suback).await?;
    if suback[0] != 0x90 || suback[4] > 2 {
        return Err(io::Error::other(format!("SUBACK {suback:?}")));
    }
    Ok(())
}

/// Connects, sends CONNECT, and waits for a successful CONNACK.
async fn connect(addr: SocketAddr, client_id: &str, keep_alive: u16) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream
        .write_all(&connect_packet(client_id, keep_alive))
        .await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(io::Error::other(format!("CONNACK {connack:?}")));
    }
    Ok(stream)
}

// ---------------------------------------------------------------------------------------------
// The subscriber: on a thread of its own, so its clock readings do not wait for publishers.

/// Shared clock: nanoseconds since the bench started.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now_ns(self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// What the subscriber saw.
#[derive(Debug, Default)]
struct Received {
    /// Messages sent within the window and received.
    in_window: u64,
    /// Every message received.
    total: u64,
    /// Latencies of the messages counted in `in_window`, in microseconds.
    latencies_us: Vec<u32>,
    /// When the first and the last message arrived (ns on the clock).
    first_ns: u64,
    last_ns: u64,
}

struct SubscriberControl {
    /// Count messages sent in [from, to) ns.
    window: (u64, u64),
    /// Stop once this many messages were received in total, or ...
    expect_total: u64,
    /// ... once `done` is set and nothing arrived for `idle`.
    done: AtomicBool,
    idle: Duration,
    /// Stop at this time (ns), whatever happens.
    deadline_ns: AtomicU64,
}

fn spawn_subscriber(
    addr: SocketAddr,
    qos: u8,
    clock: Clock,
    control: Arc<SubscriberControl>,
) -> anyhow::Result<(
    std::thread::JoinHandle<io::Result<Received>>,
    tokio::sync::oneshot::Receiver<()>,
)> {
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = std::thread::Builder::new()
        .name("bench-subscriber".to_owned())
        .spawn(move || {
            runtime.block_on(subscribe_and_read(addr, qos, clock, control, subscribed_tx))
        })?;
    Ok((handle, subscribed))
}

async fn subscribe_and_read(
    addr: SocketAddr,
    qos: u8,
    clock: Clock,
    control: Arc<SubscriberControl>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> io::Result<Received> {
    let mut stream = connect(addr, "bench-subscriber", 600).await?;
    stream
        .write_all(&frame::subscribe(
            false,
            1,
            &[(TopicKind::Heartbeat.filter(), qos)],
        ))
        .await?;
    let mut suback = [0u8; 5];
    stream.read_exact(&mut suback).await?;
    if suback[0] != 0x90 || suback[4] != qos {
        return Err(io::Error::other(format!("SUBACK {suback:?}")));
    }
    let _ = subscribed.send(());

    let mut received = Received::default();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut acks = Vec::with_capacity(4096);
    let mut last_activity = Instant::now();
    loop {
        if received.total >= control.expect_total
            || clock.now_ns() >= control.deadline_ns.load(Ordering::Relaxed)
            || (control.done.load(Ordering::Relaxed) && last_activity.elapsed() >= control.idle)
        {
            return Ok(received);
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
        match tokio::time::timeout(Duration::from_millis(100), stream.read_buf(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) => return Err(io::Error::other("the broker closed the subscriber")),
            Ok(Err(err)) => return Err(err),
            Ok(Ok(_)) => last_activity = Instant::now(),
        }
        while let Some(header) = frame::frame(&buf) {
            let body = &buf[header.header_len..header.total()];
            if header.packet_type() == 3
                && let Some((_topic, pkid, payload)) = frame::publish_fields(header.first, body)
            {
                if let Some(pkid) = pkid {
                    acks.extend_from_slice(&frame::puback(pkid));
                }
                let now = clock.now_ns();
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&payload[..8]);
                let sent = u64::from_le_bytes(sent);
                received.total += 1;
                if received.first_ns == 0 {
                    received.first_ns = now;
                }
                received.last_ns = now;
                if (control.window.0..control.window.1).contains(&sent) {
                    received.in_window += 1;
                    let us = now.saturating_sub(sent) / 1_000;
                    received
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            buf.advance(header.total());
        }
        if !acks.is_empty() {
            stream.write_all(&acks).await?;
            acks.clear();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

async fn run_scenario(
    args: &Args,
    scenario: Scenario,
    kind: BrokerKind,
) -> anyhow::Result<Outcome> {
    let broker = start_broker(args, kind, matches!(scenario, Scenario::Flood { .. })).await?;
    let outcome = match scenario {
        Scenario::Steady {
            devices,
            rate_hz,
            qos,
            ..
        } => {
            steady(
                &broker,
                args.subscribe_commands,
                devices,
                rate_hz,
                qos,
                Duration::from_secs(args.duration),
            )
            .await
        }
        Scenario::Flood {
            publishers,
            messages,
            ..
        } => flood(&broker, publishers, messages).await,
    };
    let outcome = outcome.map(|mut o| {
        o.peak_rss_mib = broker.memory_mib("VmHWM");
        o
    });
    broker.stop();
    outcome
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn fill_latencies(outcome: &mut Outcome, mut latencies: Vec<u32>) {
    latencies.sort_unstable();
    outcome.p50_ms = percentile(&latencies, 0.50);
    outcome.p99_ms = percentile(&latencies, 0.99);
    outcome.max_ms = latencies
        .last()
        .map_or(f64::NAN, |&m| f64::from(m) / 1000.0);
}

/// Connects `devices` publishers, `CONNECTS_IN_FLIGHT` at a time.
async fn connect_devices(
    addr: SocketAddr,
    devices: usize,
    subscribe_commands: bool,
) -> anyhow::Result<Vec<TcpStream>> {
    let limit = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut tasks = Vec::with_capacity(devices);
    for i in 0..devices {
        let limit = Arc::clone(&limit);
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.map_err(io::Error::other)?;
            let mut attempt = 0;
            loop {
                match connect(addr, &format!("bench-d{i:05}"), 600).await {
                    Ok(mut stream) if subscribe_commands => {
                        subscribe_to_commands(&mut stream, &format!("d{i:05}")).await?;
                        return Ok::<_, io::Error>(stream);
                    }
                    Ok(stream) => return Ok::<_, io::Error>(stream),
                    Err(err) if attempt >= 5 => return Err(err),
                    Err(_) => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
    }
    let mut streams = Vec::with_capacity(devices);
    for task in tasks {
        streams.push(task.await??);
    }
    Ok(streams)
}

async fn steady(
    broker: &BrokerProcess,
    subscribe_commands: bool,
    devices: usize,
    rate_hz: u32,
    qos: u8,
    window: Duration,
) -> anyhow::Result<Outcome> {
    let clock = Clock(Instant::now());
    let idle_rss_mib = broker.memory_mib("VmRSS");
    let connecting = Instant::now();
    let streams = connect_devices(broker.addr, devices, subscribe_commands).await?;
    let connect_s = connecting.elapsed().as_secs_f64();
    // Each device has its CONNACK: the broker has set every connection up.
    let connected_rss_mib = broker.memory_mib("VmRSS");

    let period = Duration::from_secs(1) / rate_hz;
    // Sends start a moment from now, then: warm-up, the window, the end of sending.
    let start = Instant::now() + Duration::from_millis(500);
    let window_start = start + WARM_UP;
    let window_end = window_start + window;
    let ns = |t: Instant| t.duration_since(clock.0).as_nanos() as u64;
    let control = Arc::new(SubscriberControl {
        window: (ns(window_start), ns(window_end)),
        expect_total: u64::MAX,
        done: AtomicBool::new(false),
        idle: LATE,
        deadline_ns: AtomicU64::new(ns(window_end + LATE)),
    });
    let (subscriber, subscribed) = spawn_subscriber(broker.addr, qos, clock, Arc::clone(&control))?;
    tokio::time::timeout(Duration::from_secs(20), subscribed).await??;

    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(devices);
    for (i, stream) in streams.into_iter().enumerate() {
        let sent = Arc::clone(&sent);
        let first = start + period.mul_f64(i as f64 / devices as f64);
        let (window_start_ns, window_end_ns) = control.window;
        tasks.push(tokio::spawn(async move {
            let (mut reader, mut writer) = stream.into_split();
            if qos > 0 {
                // Read (and drop) the PUBACKs, so the socket never fills.
                tokio::spawn(async move {
                    let mut sink = [0u8; 4096];
                    while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
                });
            }
            let topic = heartbeat_topic(&format!("d{i:05}"));
            let mut out = Vec::with_capacity(96);
            let mut next = tokio::time::Instant::from_std(first);
            let end = tokio::time::Instant::from_std(window_end);
            let mut seq = 0u32;
            while next < end {
                tokio::time::sleep_until(next).await;
                let sent_ns = clock.now_ns();
                out.clear();
                let pkid = (seq % 65_535) as u16 + 1;
                publish_packet(&topic, qos, pkid, &payload(sent_ns, seq), &mut out);
                if writer.write_all(&out).await.is_err() {
                    return;
                }
                if (window_start_ns..window_end_ns).contains(&sent_ns) {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                seq = seq.wrapping_add(1);
                next += period;
            }
            // Keep the connection open until the subscriber is done.
            tokio::time::sleep(LATE + Duration::from_secs(1)).await;
            drop(writer);
        }));
    }

    tokio::time::sleep_until(tokio::time::Instant::from_std(window_start)).await;
    let cpu_before = broker.cpu_seconds();
    tokio::time::sleep_until(tokio::time::Instant::from_std(window_end)).await;
    let cpu_after = broker.cpu_seconds();
    let end_rss_mib = broker.memory_mib("VmRSS");
    control.done.store(true, Ordering::Relaxed);
    let received = tokio::task::spawn_blocking(move || subscriber.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the subscriber panicked"))??;
    for task in tasks {
        let _ = task.await;
    }

    let mut outcome = Outcome {
        sent: sent.load(Ordering::Relaxed),
        received: received.in_window,
        msg_per_s: received.in_window as f64 / window.as_secs_f64(),
        cpu_s: cpu_after - cpu_before,
        window_s: window.as_secs_f64(),
        end_rss_mib,
        idle_rss_mib,
        connected_rss_mib,
        connect_s,
        devices,
        ..Outcome::default()
    };
    fill_latencies(&mut outcome, received.latencies_us);
    Ok(outcome)
}

async fn flood(
    broker: &BrokerProcess,
    publishers: usize,
    messages: usize,
) -> anyhow::Result<Outcome> {
    let clock = Clock(Instant::now());
    let streams = connect_devices(broker.addr, publishers, false).await?;
    let total = (publishers * messages) as u64;
    let control = Arc::new(SubscriberControl {
        window: (0, u64::MAX),
        expect_total: total,
        done: AtomicBool::new(false),
        idle: Duration::from_secs(3),
        deadline_ns: AtomicU64::new(clock.now_ns() + Duration::from_secs(120).as_nanos() as u64),
    });
    let (subscriber, subscribed) = spawn_subscriber(broker.addr, 0, clock, Arc::clone(&control))?;
    tokio::time::timeout(Duration::from_secs(20), subscribed).await??;

    let started_ns = clock.now_ns();
    let cpu_before = broker.cpu_seconds();
    let mut tasks = Vec::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let topic = heartbeat_topic(&format!("flood{i}"));
            let mut out = Vec::with_capacity(256 * 80);
            let mut seq = 0u32;
            while (seq as usize) < messages {
                out.clear();
                let sent_ns = clock.now_ns();
                for _ in 0..256.min(messages - seq as usize) {
                    publish_packet(&topic, 0, 0, &payload(sent_ns, seq), &mut out);
                    seq += 1;
                }
                stream.write_all(&out).await?;
            }
            Ok::<_, io::Error>(stream)
        }));
    }
    let mut keep = Vec::new();
    for task in tasks {
        keep.push(task.await??);
    }
    control.done.store(true, Ordering::Relaxed);
    let received = tokio::task::spawn_blocking(move || subscriber.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the subscriber panicked"))??;
    let cpu_after = broker.cpu_seconds();
    let end_rss_mib = broker.memory_mib("VmRSS");
    drop(keep);

    let elapsed_s = (received.last_ns.saturating_sub(started_ns)) as f64 / 1e9;
    let mut outcome = Outcome {
        sent: total,
        received: received.total,
        msg_per_s: received.total as f64 / elapsed_s.max(1e-9),
        cpu_s: cpu_after - cpu_before,
        window_s: elapsed_s,
        end_rss_mib,
        ..Outcome::default()
    };
    fill_latencies(&mut outcome, received.latencies_us);
    Ok(outcome)
}
