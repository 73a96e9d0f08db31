//! `loadbench`: Fleetbeat end to end under load, side by side with the stack people use today.
//!
//! ```sh
//! cargo run --release -p tests --bin loadbench -- --vehicles 1000 --rate 1 --dispatchers 10 --duration 30
//! cargo run --release -p tests --bin loadbench -- --curve          # p99 and CPU against vehicles
//! ```
//!
//! One run starts, on this machine and on loopback only:
//! - the stack under test: **Fleetbeat** (the release `bridge` with its embedded broker, or
//!   `broker` + `bridge --mqtt-url` with `--broker separate`), or the **baseline** (Debian's
//!   `mosquitto` + `bench/baseline/bridge.js`, npm `mqtt` + `socket.io`, one emit per message);
//! - the **devices**: this program again as a child (`loadbench generate`), V vehicles at R Hz,
//!   each vehicle a real MQTT 3.1.1 client connection subscribed to its own `cmd` topic and
//!   publishing QoS 0 heartbeats: sealed postcard `Heartbeat`s (`shared::seal`, open-mode keys)
//!   to Fleetbeat, the same heartbeat as a JSON object to the baseline (or, for Fleetbeat,
//!   the real `device-sim` with `--devices device-sim`);
//! - K **dispatchers**: real `socket.io-client` connections, several per node process
//!   (`tests/node/load-dispatchers.mjs`), each joined to the room `all`.
//!
//! It warms up, measures a window, stops the devices, lets the last positions drain, and
//! reports: heartbeats/s sent and ingested (the bridge's `/metrics`), positions/s delivered to
//! the dispatchers, device→dispatcher latency p50/p99/max (`ts_ms` from the device clock against
//! the receive time, same machine), CPU seconds over the window and peak RSS (`VmHWM`) of every
//! process, and loss. Loss is what coalescing does not explain: a dispatcher that skips more
//! consecutive heartbeats of a vehicle than `(tick + slack) / interval`, or never receives a
//! vehicle's last heartbeat, lost them. `bench/README.md` explains every figure.
//!
//! # Layout
//! - [`Cli`]: the command line; `generate` is the device side, run as a child.
//! - [`generator`]: the device side: hand-written MQTT over non-blocking sockets.
//! - [`peer`]: a child process that speaks JSON lines (the generator, the dispatchers).
//! - [`procfs`]: CPU seconds and RSS from `/proc`.
//! - [`stack`]: starting Fleetbeat or the baseline.
//! - [`run`]: one measured run.
//! - [`report`]: the markdown tables.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

/// End-to-end load harness: Fleetbeat against the baseline (mosquitto + node mqtt/socket.io).
#[derive(Debug, Parser)]
#[command(name = "loadbench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: the device side, driven over stdin/stdout by the harness.
    #[command(hide = true)]
    Generate(generator::GenArgs),
}

/// Which stack a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StackKind {
    /// Fleetbeat: the `bridge` binary (and its embedded broker, or the `broker` binary).
    Fleetbeat,
    /// The reference stack: mosquitto + `bench/baseline/bridge.js`.
    Baseline,
    /// Both, one after the other on the same load, with ratios.
    Both,
}

/// Where Fleetbeat's broker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerMode {
    /// Inside the bridge process (the default deployment).
    Embedded,
    /// The standalone `broker` binary, the bridge connecting with `--mqtt-url`.
    Separate,
}

/// What publishes the heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// `loadbench generate`: exact per-vehicle accounting, sealed or JSON payloads.
    Generator,
    /// The real simulator, `device-sim` (sealed payloads only).
    DeviceSim,
}

/// What one run (or each point of the curve) does.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Simulated vehicles.
    #[arg(long, default_value_t = 1000)]
    pub vehicles: u32,
    /// Heartbeats per second per vehicle.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Dispatcher clients (real socket.io-client connections), each joined to `all`.
    #[arg(long, default_value_t = 10)]
    pub dispatchers: u32,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Seconds between the first heartbeat and the measured window, at least.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// After the warm-up, wait (up to this many seconds) until the stack has settled: its
    /// ingest rate has stayed within 5 % of the offered rate (neither falling behind nor still
    /// catching up) for 3 s in a row. The time it took is
    /// reported ("settled after"). 0: measure right after the warm-up.
    #[arg(long, default_value_t = 120)]
    pub settle_max: u64,
    /// The stack to measure.
    #[arg(long, value_enum, default_value_t = StackKind::Both)]
    pub stack: StackKind,
    /// Fleetbeat's broker: inside the bridge, or the separate `broker` binary.
    #[arg(long, value_enum, default_value_t = BrokerMode::Embedded)]
    pub broker: BrokerMode,
    /// Fleetbeat's position tick in ms (`bridge --tick-ms`); unset: the bridge's default (10).
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Latency beyond the tick that still counts as on time, for loss and `late`, in ms.
    #[arg(long, default_value_t = 100)]
    pub slack_ms: u64,
    /// The device side: this program's generator (both stacks), or the real `device-sim`
    /// (Fleetbeat only; at most 10 000 vehicles; loss then counts gaps only, not the tail).
    #[arg(long, value_enum, default_value_t = DeviceKind::Generator)]
    pub devices: DeviceKind,
    /// Devices do not subscribe to their `cmd` topics (real vehicles do: one subscription
    /// per vehicle, which is what makes a broker's topic matching work).
    #[arg(long)]
    pub no_subscribe: bool,
    /// Dispatcher clients per node process.
    #[arg(long, default_value_t = 5)]
    pub clients_per_process: u32,
    /// Vehicles sharing one MQTT connection; unset: 1, or as many as keep connections at or
    /// under 15 000 (a process may hold 20 000 file descriptors here).
    #[arg(long)]
    pub per_connection: Option<u32>,
    /// The scaling curve: run Fleetbeat at each of `--curve-points` vehicles for
    /// `--curve-duration` seconds and print p99 and CPU against vehicles.
    #[arg(long)]
    pub curve: bool,
    /// Vehicle counts of the curve.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,1000,5000,10000,20000"
    )]
    pub curve_points: Vec<u32>,
    /// Seconds measured per curve point.
    #[arg(long, default_value_t = 15)]
    pub curve_duration: u64,
    /// Sustained throughput: at `--vehicles`, raise the rate through `--saturate-rates` for each
    /// stack (`--curve-duration` seconds each) until a step is not sustained.
    #[arg(long, conflicts_with = "curve")]
    pub saturate: bool,
    /// The whole report of BENCHMARKS.md's end-to-end section in one go: side by side at
    /// `--report-fleets` vehicles (both stacks, `--repeat` times each), the scaling curve of
    /// Fleetbeat, and the sustained throughput of both stacks at 10 000 vehicles. About 20
    /// minutes.
    #[arg(long, conflicts_with_all = ["curve", "saturate"])]
    pub report: bool,
    /// Fleet sizes of the side-by-side tables of `--report`.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub report_fleets: Vec<u32>,
    /// Heartbeat rates (Hz per vehicle) of `--saturate`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,1.25,1.5,1.75,2,3,4,5,5.5,6,7,8"
    )]
    pub saturate_rates: Vec<f64>,
    /// Side by side: run each stack this many times, alternating, and report for each the run
    /// the rest of the machine disturbed least (all runs are listed too).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Where the release binaries are (`bridge`, `broker`); default: beside this program.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Do not run `cargo build --release` for the binaries first.
    #[arg(long)]
    pub no_build: bool,
    /// The mosquitto binary for the baseline.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto: PathBuf,
    /// Also append the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl RunArgs {
    /// The bridge's position tick.
    fn tick_ms(&self) -> u64 {
        self.tick_ms.unwrap_or(10)
    }

    /// Vehicles per MQTT connection for `vehicles` vehicles.
    fn per_connection(&self, vehicles: u32) -> u32 {
        self.per_connection
            .unwrap_or_else(|| vehicles.div_ceil(15_000))
            .max(1)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Generate(args)) = cli.command {
        return generator::main(&args);
    }
    let args = cli.run;
    if args.vehicles == 0 || args.dispatchers == 0 || args.clients_per_process == 0 {
        bail!("--vehicles, --dispatchers and --clients-per-process must be at least 1");
    }
    if args.rate.is_nan() || args.rate <= 0.0 || args.rate > 100.0 {
        bail!("--rate must be within (0, 100] Hz");
    }
    if args.devices == DeviceKind::DeviceSim && args.stack != StackKind::Fleetbeat {
        bail!(
            "--devices device-sim publishes sealed heartbeats only: use it with --stack fleetbeat"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = harness(args) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

/// The workspace root (the tests crate's parent).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

async fn harness(args: RunArgs) -> anyhow::Result<()> {
    let bins = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("locating loadbench")?
            .parent()
            .context("loadbench has no directory")?
            .to_path_buf(),
    };
    if !args.no_build && args.stack != StackKind::Baseline {
        build_binaries()?;
    }
    let env = run::Env::new(bins)?;
    let mut report = String::new();
    report.push_str(&report::header(&args, &env));
    if args.report {
        for &vehicles in &args.report_fleets {
            let _ = writeln!(
                report,
                "### {vehicles} vehicles × {} Hz, {} dispatchers\n",
                args.rate, args.dispatchers
            );
            let fleet = RunArgs {
                vehicles,
                stack: StackKind::Both,
                ..args.clone()
            };
            report.push_str(&side_by_side(&env, &fleet).await?);
        }
        let _ = writeln!(report, "### Scaling curve\n");
        let fleetbeat = RunArgs {
            stack: StackKind::Fleetbeat,
            ..args.clone()
        };
        report.push_str(&curve(&env, &fleetbeat).await?);
        let _ = writeln!(report, "### Sustained throughput at 10 000 vehicles\n");
        let both = RunArgs {
            vehicles: 10_000,
            stack: StackKind::Both,
            ..args.clone()
        };
        report.push_str(&saturate(&env, &both).await?);
    } else if args.curve {
        report.push_str(&curve(&env, &args).await?);
    } else if args.saturate {
        report.push_str(&saturate(&env, &args).await?);
    } else {
        report.push_str(&side_by_side(&env, &args).await?);
    }
    println!("{report}");
    if let Some(path) = &args.out {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(file, "{report}").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The scaling curve: Fleetbeat (or the baseline) at each of `--curve-points` vehicles.
async fn curve(env: &run::Env, args: &RunArgs) -> anyhow::Result<String> {
    let mut points = Vec::new();
    for &vehicles in &args.curve_points {
        let point = RunArgs {
            vehicles,
            duration: args.curve_duration,
            ..args.clone()
        };
        let stack = if args.stack == StackKind::Baseline {
            StackKind::Baseline
        } else {
            StackKind::Fleetbeat
        };
        eprintln!("loadbench: curve point {vehicles} vehicles ({stack:?})");
        points.push(run::measure(env, &point, stack).await?);
    }
    Ok(report::curve(&points))
}

/// Sustained throughput: each stack at rising rates until a step is not sustained.
async fn saturate(env: &run::Env, args: &RunArgs) -> anyhow::Result<String> {
    let mut steps = Vec::new();
    for &stack in stacks_of(args.stack) {
        for &rate in &args.saturate_rates {
            let step = RunArgs {
                rate,
                duration: args.curve_duration,
                ..args.clone()
            };
            eprintln!("loadbench: {stack:?} at {rate} Hz");
            let measured = run::measure(env, &step, stack).await?;
            let sustained = measured.sustained();
            steps.push(measured);
            if !sustained {
                break;
            }
        }
    }
    Ok(report::saturation(&steps))
}

/// Side by side: each stack `--repeat` times, alternating; the least disturbed run of each.
async fn side_by_side(env: &run::Env, args: &RunArgs) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for round in 1..=args.repeat.max(1) {
        for &stack in stacks_of(args.stack) {
            eprintln!(
                "loadbench: {} vehicles, {stack:?}, run {round} of {}",
                args.vehicles,
                args.repeat.max(1)
            );
            runs.push(run::measure(env, args, stack).await?);
        }
    }
    let results: Vec<run::Measured> = stacks_of(args.stack)
        .iter()
        .filter_map(|&kind| {
            runs.iter()
                .filter(|m| m.stack == kind)
                .min_by(|a, b| a.others_cores.total_cmp(&b.others_cores))
                .cloned()
        })
        .collect();
    let mut out = report::side_by_side(&results);
    if runs.len() > results.len() {
        out.push_str(&report::runs(&runs));
    }
    Ok(out)
}

/// The stacks `kind` stands for, in the order they run.
fn stacks_of(kind: StackKind) -> &'static [StackKind] {
    match kind {
        StackKind::Both => &[StackKind::Fleetbeat, StackKind::Baseline],
        StackKind::Fleetbeat => &[StackKind::Fleetbeat],
        StackKind::Baseline => &[StackKind::Baseline],
    }
}

/// Builds the release `bridge`, `broker` and `device-sim` binaries, so a run measures the
/// current code.
fn build_binaries() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "bridge",
            "-p",
            "broker",
            "--bins",
        ])
        .current_dir(workspace())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release of bridge and broker failed: {status}");
    }
    Ok(())
}

/// The bound on waiting for a child to answer.
const ANSWER: Duration = Duration::from_secs(60);

pub mod generator {
    //! The device side: V vehicles, each publishing a heartbeat every `1 / rate` seconds on its
    //! own MQTT connection (or `per_connection` vehicles sharing one, beyond the descriptor
    //! limit).
    //!
    //! It speaks MQTT 3.1.1 itself over non-blocking std sockets from one thread: CONNECT and
    //! CONNACK, SUBSCRIBE to the vehicle's `cmd` topic and SUBACK (as a real vehicle does; the
    //! broker's topic matching depends on it), then QoS 0 PUBLISH packets only, so the device side costs a system call per
    //! heartbeat and leaves the CPU to what is measured. Vehicle `i`'s heartbeats are due at
    //! `start + (round + i / V) / rate`, so the load is spread evenly over each interval. A
    //! heartbeat the socket cannot take at once waits in that connection's buffer (at most
    //! 64 KiB, beyond which it is dropped and counted as `blocked`).
    //!
    //! Protocol with the harness, JSON lines: it prints `connected` once every connection is
    //! acknowledged, starts on `start`, answers `mark` with its counters, and on `stop` (or
    //! when stdin closes) stops, disconnects cleanly and prints `done` with each vehicle's last
    //! sequence number.

    use std::fmt::Write as _;
    use std::io::{BufRead as _, ErrorKind, Read as _, Write as _};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use anyhow::{Context as _, bail};
    use clap::ValueEnum;
    use serde_json::json;
    use shared::{Counter, DeviceKey, Heartbeat, Position, StatusFlags, VehicleId};

    /// How heartbeats are encoded.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
    pub enum Payload {
        /// Fleetbeat's wire format: a sealed postcard `Heartbeat`.
        Sealed,
        /// The baseline's: the position as a JSON object.
        Json,
    }

    /// The generator's command line (set by the harness).
    #[derive(Debug, Clone, clap::Args)]
    pub struct GenArgs {
        /// The MQTT broker.
        #[arg(long)]
        pub broker: SocketAddr,
        /// Vehicles.
        #[arg(long)]
        pub vehicles: u32,
        /// Heartbeats per second per vehicle.
        #[arg(long)]
        pub rate: f64,
        /// Payload encoding.
        #[arg(long, value_enum)]
        pub payload: Payload,
        /// Vehicles per MQTT connection.
        #[arg(long, default_value_t = 1)]
        pub per_connection: u32,
        /// The fleet every vehicle belongs to.
        #[arg(long, default_value = "bench")]
        pub fleet: String,
        /// Threads that open the connections.
        #[arg(long, default_value_t = 8)]
        pub connect_threads: usize,
        /// Do not subscribe each vehicle to its `cmd` topic.
        #[arg(long)]
        pub no_subscribe: bool,
    }

    /// The id of vehicle `index`.
    pub fn vehicle_id(index: u32) -> String {
        format!("v{index:05}")
    }

    /// MQTT keep-alive of every connection, seconds (heartbeats keep it alive).
    const KEEP_ALIVE: u16 = 60;
    /// A connection's buffer of bytes the socket did not take yet.
    const MAX_BUFFERED: usize = 64 * 1024;

    struct Vehicle {
        id: String,
        topic: String,
        key: DeviceKey,
        counter: Counter,
        /// The next heartbeat's sequence number (= heartbeats sent so far).
        seq: u32,
        connection: usize,
        angle: f64,
    }

    struct Connection {
        stream: TcpStream,
        buffered: Vec<u8>,
        dead: bool,
    }

    #[derive(Default)]
    struct Counters {
        sent: AtomicU64,
        blocked: AtomicU64,
        errors: AtomicU64,
        late_10ms: AtomicU64,
        max_late_us: AtomicU64,
    }

    impl Counters {
        fn mark(&self) -> serde_json::Value {
            json!({
                "type": "mark",
                "sent": self.sent.load(Ordering::Relaxed),
                "blocked": self.blocked.load(Ordering::Relaxed),
                "errors": self.errors.load(Ordering::Relaxed),
                "late10ms": self.late_10ms.load(Ordering::Relaxed),
                "maxLateMs": self.max_late_us.load(Ordering::Relaxed) as f64 / 1000.0,
            })
        }
    }

    fn say(value: &serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }

    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn remaining_length(out: &mut Vec<u8>, mut len: usize) {
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                break;
            }
        }
    }

    fn connect_packet(client_id: &str) -> Vec<u8> {
        let mut body = Vec::with_capacity(16 + client_id.len());
        body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02]);
        body.extend_from_slice(&KEEP_ALIVE.to_be_bytes());
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10];
        remaining_length(&mut packet, body.len());
        packet.extend_from_slice(&body);
        packet
    }

    fn publish_packet(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
        out.clear();
        out.push(0x30);
        remaining_length(out, 2 + topic.len() + payload.len());
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(payload);
    }

    /// SUBSCRIBE (packet id 1) to `filters`, each at QoS 1.
    fn subscribe_packet(filters: &[String]) -> Vec<u8> {
        let mut body = vec![0, 1];
        for filter in filters {
            body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
            body.extend_from_slice(filter.as_bytes());
            body.push(1);
        }
        let mut packet = vec![0x82];
        remaining_length(&mut packet, body.len());
        packet.extend_from_slice(&body);
        packet
    }

    /// Connects as `client_id` and, like a real vehicle, subscribes to `commands` (its own
    /// `cmd` topics), waiting for the CONNACK and SUBACK.
    fn connect(
        broker: SocketAddr,
        client_id: &str,
        commands: &[String],
    ) -> anyhow::Result<TcpStream> {
        let mut stream = TcpStream::connect_timeout(&broker, Duration::from_secs(10))
            .with_context(|| format!("connecting {client_id} to {broker}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.write_all(&connect_packet(client_id))?;
        let mut ack = [0u8; 4];
        stream
            .read_exact(&mut ack)
            .with_context(|| format!("waiting for the CONNACK of {client_id}"))?;
        if ack[0] != 0x20 || ack[3] != 0 {
            bail!("{client_id}: CONNACK refused: {ack:02x?}");
        }
        if !commands.is_empty() {
            stream.write_all(&subscribe_packet(commands))?;
            // SUBACK: 0x90, remaining length (< 128 here), packet id, one code per filter.
            let mut suback = vec![0u8; 4 + commands.len()];
            stream
                .read_exact(&mut suback)
                .with_context(|| format!("waiting for the SUBACK of {client_id}"))?;
            if suback[0] != 0x90 || suback[4..].iter().any(|&code| code >= 0x80) {
                bail!("{client_id}: SUBSCRIBE refused: {suback:02x?}");
            }
        }
        stream.set_nonblocking(true)?;
        Ok(stream)
    }

    fn connect_all(args: &GenArgs, ids: &[String]) -> anyhow::Result<Vec<Connection>> {
        let per = args.per_connection.max(1) as usize;
        let clients: Vec<(&str, Vec<String>)> = ids
            .chunks(per)
            .map(|vehicles| {
                let commands = if args.no_subscribe {
                    Vec::new()
                } else {
                    vehicles
                        .iter()
                        .map(|v| format!("fleet/{}/{v}/cmd", args.fleet))
                        .collect()
                };
                (vehicles[0].as_str(), commands)
            })
            .collect();
        let client_ids = &clients;
        let threads = args.connect_threads.clamp(1, 64);
        let chunk = client_ids.len().div_ceil(threads).max(1);
        let results: Vec<anyhow::Result<Vec<TcpStream>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = client_ids
                .chunks(chunk)
                .map(|ids| {
                    scope.spawn(move || {
                        ids.iter()
                            .map(|(id, commands)| connect(args.broker, id, commands))
                            .collect::<anyhow::Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a connect thread panicked")))
                })
                .collect()
        });
        let mut connections = Vec::with_capacity(client_ids.len());
        for streams in results {
            connections.extend(streams?.into_iter().map(|stream| Connection {
                stream,
                buffered: Vec::new(),
                dead: false,
            }));
        }
        Ok(connections)
    }

    /// Writes what `connection` has buffered; returns whether it is now empty.
    fn flush(connection: &mut Connection, counters: &Counters) -> bool {
        while !connection.buffered.is_empty() && !connection.dead {
            match connection.stream.write(&connection.buffered) {
                Ok(0) => {
                    connection.dead = true;
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n) => {
                    connection.buffered.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    connection.dead = true;
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        true
    }

    fn send(connection: &mut Connection, packet: &[u8], counters: &Counters) {
        if connection.dead {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !connection.buffered.is_empty() {
            if connection.buffered.len() + packet.len() > MAX_BUFFERED {
                counters.blocked.fetch_add(1, Ordering::Relaxed);
                return;
            }
            connection.buffered.extend_from_slice(packet);
            flush(connection, counters);
            return;
        }
        match connection.stream.write(packet) {
            Ok(n) if n == packet.len() => {}
            Ok(n) => connection.buffered.extend_from_slice(&packet[n..]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                connection.buffered.extend_from_slice(packet);
            }
            Err(_) => {
                connection.dead = true;
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn heartbeat(vehicle: &Vehicle, ts_ms: u64) -> Heartbeat {
        // Each vehicle drives round its own circle of ~500 m about Berlin Mitte.
        let angle = vehicle.angle + f64::from(vehicle.seq) * 0.02;
        let (sin, cos) = angle.sin_cos();
        Heartbeat {
            seq: vehicle.seq,
            ts_ms,
            pos: Position::new(
                525_200_000 + (sin * 45_000.0) as i32,
                134_050_000 + (cos * 75_000.0) as i32,
            ),
            speed_cm_s: 1389,
            heading_deg: (angle.to_degrees().rem_euclid(360.0)) as u16,
            battery_pct: 80,
            flags: StatusFlags(StatusFlags::MOVING | StatusFlags::IGNITION | StatusFlags::GPS_FIX),
        }
    }

    fn encode(
        payload: Payload,
        fleet: &str,
        vehicle: &mut Vehicle,
        ts_ms: u64,
        buf: &mut [u8; 256],
        json: &mut String,
    ) -> anyhow::Result<usize> {
        let hb = heartbeat(vehicle, ts_ms);
        match payload {
            Payload::Sealed => {
                let counter = vehicle.counter.next(ts_ms);
                let sealed = shared::seal(&hb, &vehicle.topic, counter, &vehicle.key, buf)
                    .map_err(|e| anyhow::anyhow!("sealing a heartbeat: {e}"))?;
                Ok(sealed.len())
            }
            Payload::Json => {
                json.clear();
                let _ = write!(
                    json,
                    "{{\"vehicle\":\"{}\",\"fleet\":\"{fleet}\",\"seq\":{},\"ts_ms\":{ts_ms},\"lat\":{},\"lon\":{},\"speed_mps\":{},\"heading_deg\":{},\"battery_pct\":{},\"flags\":{},\"moving\":true}}",
                    vehicle.id,
                    hb.seq,
                    hb.pos.lat(),
                    hb.pos.lon(),
                    f64::from(hb.speed_cm_s) / 100.0,
                    hb.heading_deg,
                    hb.battery_pct,
                    hb.flags.0,
                );
                let bytes = json.as_bytes();
                let len = bytes.len().min(buf.len());
                buf[..len].copy_from_slice(&bytes[..len]);
                Ok(len)
            }
        }
    }

    /// Runs the generator (the `generate` subcommand).
    ///
    /// # Errors
    /// If a connection cannot be made or acknowledged.
    pub fn main(args: &GenArgs) -> anyhow::Result<()> {
        if args.vehicles == 0 || args.rate.is_nan() || args.rate <= 0.0 {
            bail!("--vehicles and --rate must be positive");
        }
        let began = Instant::now();
        let ids: Vec<String> = (1..=args.vehicles).map(vehicle_id).collect();
        let per = args.per_connection.max(1) as usize;
        let mut vehicles: Vec<Vehicle> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let vehicle = VehicleId::new(id).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
                Ok(Vehicle {
                    id: id.clone(),
                    topic: format!("fleet/{}/{id}/hb", args.fleet),
                    key: shared::open_mode_key(&vehicle),
                    counter: Counter::new(),
                    seq: 0,
                    connection: i / per,
                    angle: i as f64 * 0.618,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let mut connections = connect_all(args, &ids)?;
        say(&json!({
            "type": "connected",
            "connections": connections.len(),
            "secs": began.elapsed().as_secs_f64(),
        }));

        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (start_tx, start_rx) = std::sync::mpsc::channel::<()>();
        {
            let counters = Arc::clone(&counters);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    match line.trim() {
                        "start" => {
                            let _ = start_tx.send(());
                        }
                        "mark" => say(&counters.mark()),
                        "stop" => break,
                        _ => {}
                    }
                }
                // `stop`, or the harness went away.
                stop.store(true, Ordering::Relaxed);
                let _ = start_tx.send(());
            });
        }
        let _ = start_rx.recv();

        let period = Duration::from_secs_f64(1.0 / args.rate);
        let n = vehicles.len() as u32;
        let start = Instant::now();
        let mut buf = [0u8; 256];
        let mut json = String::with_capacity(256);
        let mut packet = Vec::with_capacity(512);
        let mut pending: Vec<usize> = Vec::new();
        let mut round: u32 = 0;
        'run: while !stop.load(Ordering::Relaxed) {
            let round_start = start + period * round;
            for i in 0..n {
                if i % 64 == 0 && stop.load(Ordering::Relaxed) {
                    break 'run;
                }
                let due = round_start + period * i / n;
                let now = Instant::now();
                if due > now + Duration::from_millis(1) {
                    // Idle: finish writes the sockets could not take, then sleep until due.
                    pending.retain(|&c| !flush(&mut connections[c], &counters));
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                } else if now > due {
                    let late = (now - due).as_micros() as u64;
                    counters.max_late_us.fetch_max(late, Ordering::Relaxed);
                    if late > 10_000 {
                        counters.late_10ms.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let vehicle = &mut vehicles[i as usize];
                let len = encode(
                    args.payload,
                    &args.fleet,
                    vehicle,
                    now_ms(),
                    &mut buf,
                    &mut json,
                )?;
                publish_packet(&mut packet, &vehicle.topic, &buf[..len]);
                vehicle.seq += 1;
                let c = vehicle.connection;
                let was_empty = connections[c].buffered.is_empty();
                send(&mut connections[c], &packet, &counters);
                if was_empty && !connections[c].buffered.is_empty() {
                    pending.push(c);
                }
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            round += 1;
        }

        // Finish the writes in flight (for a second at most), then disconnect cleanly.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|&c| !flush(&mut connections[c], &counters));
            std::thread::sleep(Duration::from_millis(5));
        }
        for connection in &mut connections {
            if !connection.dead {
                let _ = connection.stream.set_nonblocking(false);
                let _ = connection.stream.write_all(&[0xe0, 0x00]);
            }
        }
        let last_seq: Vec<i64> = vehicles.iter().map(|v| i64::from(v.seq) - 1).collect();
        let mut done = counters.mark();
        done["type"] = json!("done");
        done["lastSeq"] = json!(last_seq);
        say(&done);
        Ok(())
    }
}

pub mod peer {
    //! A child process that speaks JSON lines on stdin/stdout: the generator and the
    //! dispatcher processes.

    use std::process::Stdio;
    use std::time::Duration;

    use anyhow::{Context as _, bail};
    use serde_json::Value;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::process::{Child, ChildStdin, Command};
    use tokio::sync::mpsc;

    /// A running child with its line channels.
    pub struct Peer {
        /// What it is, for messages.
        pub name: String,
        child: Child,
        stdin: ChildStdin,
        lines: mpsc::UnboundedReceiver<Value>,
        /// `error` messages it reported.
        pub errors: Vec<String>,
    }

    impl Peer {
        /// Spawns `cmd` with piped stdin/stdout (stderr is inherited), killed on drop.
        ///
        /// # Errors
        /// If it cannot be started.
        pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            let stdin = child.stdin.take().context("child stdin")?;
            let stdout = child.stdout.take().context("child stdout")?;
            let (tx, lines) = mpsc::unbounded_channel();
            let who = name.to_owned();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) => {
                            if tx.send(v).is_err() {
                                break;
                            }
                        }
                        Err(_) => {
                            let end = line.char_indices().nth(200).map_or(line.len(), |(i, _)| i);
                            eprintln!("[{who}] {}", &line[..end]);
                        }
                    }
                }
            });
            Ok(Self {
                name: name.to_owned(),
                child,
                stdin,
                lines,
                errors: Vec::new(),
            })
        }

        /// The process id.
        pub fn pid(&self) -> Option<u32> {
            self.child.id()
        }

        /// Writes one line.
        ///
        /// # Errors
        /// If the child's stdin is closed.
        pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
            self.stdin
                .write_all(format!("{line}\n").as_bytes())
                .await
                .with_context(|| format!("writing to {}", self.name))?;
            self.stdin.flush().await.context("flushing")?;
            Ok(())
        }

        /// Waits for the next message of type `kind`, keeping `error` messages aside.
        ///
        /// # Errors
        /// If the child exits or is silent for `timeout`.
        pub async fn expect(&mut self, kind: &str, timeout: Duration) -> anyhow::Result<Value> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let message = tokio::time::timeout_at(deadline, self.lines.recv())
                    .await
                    .with_context(|| {
                        format!("{} did not answer {kind:?} in {timeout:?}", self.name)
                    })?;
                let Some(message) = message else {
                    bail!("{} exited before answering {kind:?}", self.name);
                };
                match message["type"].as_str() {
                    Some(t) if t == kind => return Ok(message),
                    Some("error") => {
                        let text = message["message"].as_str().unwrap_or("?").to_owned();
                        eprintln!("[{}] {text}", self.name);
                        self.errors.push(text);
                    }
                    _ => {}
                }
            }
        }

        /// Waits for the process to exit (at most `timeout`), then kills it.
        pub async fn finish(mut self, timeout: Duration) {
            if tokio::time::timeout(timeout, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
    }
}

pub mod procfs {
    //! CPU time and memory of processes, and of the machine, from `/proc`.

    use std::sync::OnceLock;

    /// Clock ticks per second of `/proc/*/stat` times.
    fn ticks_per_sec() -> f64 {
        static TICKS: OnceLock<f64> = OnceLock::new();
        *TICKS.get_or_init(|| {
            std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                .unwrap_or(100.0)
        })
    }

    /// User + system CPU seconds `pid` has used so far.
    pub fn cpu_secs(pid: u32) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state is the 3rd field,
        // utime the 14th and stime the 15th.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / ticks_per_sec())
    }

    /// A `/proc/PID/status` field in KiB (`VmHWM` = peak RSS, `VmRSS` = RSS now).
    pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.split_whitespace().next()?.parse().ok()
        })
    }

    /// The machine's CPU time so far: (busy seconds, total seconds), summed over cores.
    pub fn machine() -> Option<(f64, f64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let values: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: f64 = values.iter().take(8).sum();
        let idle = values.get(3)? + values.get(4)?;
        let ticks = ticks_per_sec();
        Some(((total - idle) / ticks, total / ticks))
    }

    /// The 1-minute load average.
    pub fn load_average() -> Option<f64> {
        std::fs::read_to_string("/proc/loadavg")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

pub mod stack {
    //! Starting the stack under test: Fleetbeat, or the baseline.

    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use anyhow::{Context as _, bail};
    use tests::process::{Program, field};
    use tokio::process::Command;

    use crate::{BrokerMode, RunArgs, StackKind};

    /// How long a stack may take to come up.
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
        _dir: Option<tempfile::TempDir>,
    }

    impl Stack {
        /// Starts `kind` and waits until it is ready.
        ///
        /// # Errors
        /// If a program does not start or get ready in time.
        pub async fn start(kind: StackKind, args: &RunArgs, bins: &Path) -> anyhow::Result<Self> {
            match kind {
                StackKind::Baseline => start_baseline(args).await,
                _ => start_fleetbeat(args, bins).await,
            }
        }

        /// Reads one sample from `/metrics`.
        ///
        /// # Errors
        /// If `/metrics` cannot be read or lacks the sample.
        pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
            let text = reqwest::Client::new()
                .get(format!("{}/metrics", self.http))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .context("GET /metrics")?
                .text()
                .await?;
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(sample)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse()
                        .ok()
                })
                .with_context(|| format!("no sample {sample} in /metrics"))
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

    fn free_port() -> anyhow::Result<SocketAddr> {
        tests::stack::free_port()
    }

    async fn wait_ready(url: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + START;
        loop {
            let ready = client
                .get(format!("{url}/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{url} not ready within {START:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn start_fleetbeat(args: &RunArgs, bins: &Path) -> anyhow::Result<Stack> {
        let bin = |name: &str| -> anyhow::Result<PathBuf> {
            let path = bins.join(name);
            if !path.exists() {
                bail!(
                    "{} not found (cargo build --release -p {name})",
                    path.display()
                );
            }
            Ok(path)
        };
        let tick = args.tick_ms().to_string();
        let mut programs = Vec::new();
        // A fresh store per run, so no run inherits another's orders.
        let dir = tempfile::Builder::new()
            .prefix("loadbench-bridge-")
            .tempdir()
            .context("temporary directory")?;
        let mut bridge = Command::new(bin("bridge")?);
        bridge
            .args(["--listen", "127.0.0.1:0", "--tick-ms", &tick])
            .arg("--store")
            .arg(dir.path().join("fleetbeat.db"))
            .current_dir(dir.path());
        if args.broker == BrokerMode::Separate {
            let mqtt = free_port()?;
            let mut broker = Command::new(bin("broker")?);
            broker
                .args(["--listen", &mqtt.to_string(), "--no-v5"])
                .args(["--metrics-listen", "off", "--json-mirror", "false"]);
            let mut broker = Program::spawn("broker", broker)?;
            broker.wait_for_line("broker ready", START).await?;
            programs.push(("broker".to_owned(), broker));
            bridge.args(["--mqtt-url", &format!("mqtt://{mqtt}")]);
        } else {
            bridge.args(["--mqtt-listen", "127.0.0.1:0"]);
        }
        let mut bridge = Program::spawn("bridge", bridge)?;
        let line = bridge.wait_for_line("bridge started", START).await?;
        let addr = |key: &str| -> anyhow::Result<SocketAddr> {
            field(&line, key)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {key}= in {line:?}"))
        };
        let http = format!("http://{}", addr("http")?);
        let mqtt = addr("mqtt")?;
        let role = match args.broker {
            BrokerMode::Embedded => "broker+bridge",
            BrokerMode::Separate => "bridge",
        };
        programs.push((role.to_owned(), bridge));
        wait_ready(&http).await?;
        Ok(Stack {
            kind: StackKind::Fleetbeat,
            programs,
            http,
            mqtt,
            ingest_metric: "fleetbeat_bridge_mqtt_received_total{kind=\"hb\"}",
            dropped_metric: Some("fleetbeat_bridge_socketio_dropped_total"),
            _dir: Some(dir),
        })
    }

    /// `bench/baseline` with its npm packages installed (`npm ci` the first time).
    fn baseline_dir() -> anyhow::Result<PathBuf> {
        let dir = crate::workspace().join("bench/baseline");
        if !dir.join("node_modules/socket.io").exists() || !dir.join("node_modules/mqtt").exists() {
            let status = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--silent"])
                .current_dir(&dir)
                .status()
                .context("running npm ci in bench/baseline")?;
            if !status.success() {
                bail!("npm ci in bench/baseline failed: {status}");
            }
        }
        Ok(dir)
    }

    async fn start_baseline(args: &RunArgs) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new()
            .prefix("loadbench-mosquitto-")
            .tempdir()
            .context("temporary directory")?;
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
        let mut node = Command::new("node");
        node.arg("bridge.js")
            .current_dir(baseline_dir()?)
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
            _dir: Some(dir),
        })
    }
}

pub mod run {
    //! One measured run: stack, dispatchers, devices; warm-up, window, drain, report.

    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use anyhow::{Context as _, bail};
    use serde_json::{Value, json};
    use tokio::process::Command;

    use crate::generator::vehicle_id;
    use crate::peer::Peer;
    use crate::stack::Stack;
    use tests::process::{Program, field};

    use crate::{ANSWER, DeviceKind, RunArgs, StackKind, procfs};

    /// What every run shares.
    pub struct Env {
        /// Where the release binaries are.
        pub bins: PathBuf,
        /// `tests/node`, with socket.io-client installed.
        pub node_dir: PathBuf,
        /// This program, to run the generator.
        pub exe: PathBuf,
    }

    impl Env {
        /// Locates everything a run needs.
        ///
        /// # Errors
        /// If a piece is missing.
        pub fn new(bins: PathBuf) -> anyhow::Result<Self> {
            let node_dir = crate::workspace().join("tests/node");
            if !node_dir.join("node_modules/socket.io-client").exists() {
                let status = std::process::Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--silent"])
                    .current_dir(&node_dir)
                    .status()
                    .context("running npm ci in tests/node")?;
                if !status.success() {
                    bail!("npm ci in tests/node failed: {status}");
                }
            }
            Ok(Self {
                bins,
                node_dir,
                exe: std::env::current_exe().context("locating loadbench")?,
            })
        }
    }

    /// CPU and memory of one process.
    #[derive(Debug, Clone)]
    pub struct ProcessFigures {
        /// Its role (`broker+bridge`, `broker`, `bridge`, `devices`, `dispatchers`).
        pub role: String,
        /// How many processes are summed here.
        pub count: usize,
        /// CPU seconds (user + system) over the window.
        pub cpu_secs: f64,
        /// Peak RSS (`VmHWM`) in MiB, summed over the processes.
        pub peak_rss_mib: f64,
    }

    /// Latency percentiles in ms.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Latency {
        /// Median.
        pub p50: f64,
        /// 99th percentile.
        pub p99: f64,
        /// 99.9th percentile.
        pub p999: f64,
        /// Largest seen.
        pub max: f64,
    }

    /// Everything one run measured.
    #[derive(Debug, Clone)]
    pub struct Measured {
        /// The stack.
        pub stack: StackKind,
        /// Vehicles, rate, dispatchers.
        pub vehicles: u32,
        /// Heartbeats per second per vehicle.
        pub rate: f64,
        /// Dispatcher clients.
        pub dispatchers: u32,
        /// MQTT connections of the devices.
        pub connections: u64,
        /// Seconds the devices took to connect.
        pub connect_secs: f64,
        /// Seconds from the first heartbeat until the stack kept up (`None`: it did not).
        pub settle_secs: Option<f64>,
        /// Whether settling was checked (not with `device-sim`, whose offered rate is unknown,
        /// nor with `--settle-max 0`): otherwise `settle_secs` is the warm-up.
        pub settle_checked: bool,
        /// The window's length in seconds.
        pub window_secs: f64,
        /// Heartbeats the devices published per second.
        pub sent_per_s: f64,
        /// Heartbeats the bridge accepted per second.
        pub ingested_per_s: f64,
        /// Positions all dispatchers together received per second.
        pub delivered_per_s: f64,
        /// Position events (batches or single emits) all dispatchers received per second.
        pub events_per_s: f64,
        /// Device→dispatcher latency.
        pub latency: Latency,
        /// Positions received later than tick + slack.
        pub late: f64,
        /// Heartbeats sent, whole run.
        pub sent_total: u64,
        /// Heartbeats × dispatchers that should have arrived and did not (whole run).
        pub lost: u64,
        /// The worst dispatcher's lost heartbeats.
        pub lost_worst: u64,
        /// Heartbeats sent during the window.
        pub sent_window: f64,
        /// Heartbeats × dispatchers skipped (beyond coalescing) among the positions received
        /// during the window: loss in the steady state, without the start-up.
        pub lost_window: f64,
        /// Dispatchers that disconnected.
        pub disconnects: u64,
        /// Per process role.
        pub processes: Vec<ProcessFigures>,
        /// Machine CPU busy over the window, in cores.
        pub machine_busy_cores: f64,
        /// Of that, what the benchmark's own processes did not use (other work on the machine
        /// and kernel time not charged to a process, such as loopback softirqs), in cores.
        pub others_cores: f64,
        /// 1-minute load average at the window's start.
        pub load_before: f64,
        /// Heartbeats the devices could not write (socket full) or lost to a dead connection.
        pub device_blocked: u64,
        /// Device-side errors (dead connections).
        pub device_errors: u64,
        /// The latest a device sent behind its schedule, ms (device-side starvation).
        pub device_max_late_ms: f64,
        /// Emits the bridge could not hand to a socket, whole run (Fleetbeat's
        /// `socketio_dropped_total`: volatile batches skipped, reliable events failed).
        pub emits_dropped: Option<f64>,
        /// Log lines of the stack's programs at WARN or reporting a failed broadcast.
        pub warnings: usize,
        /// The most frequent of those, digits masked, with their counts.
        pub top_warnings: Vec<(usize, String)>,
    }

    impl Measured {
        /// Loss over the whole run (start-up included), as a fraction of heartbeats ×
        /// dispatchers.
        pub fn loss_fraction(&self) -> f64 {
            self.lost as f64 / (self.sent_total as f64 * f64::from(self.dispatchers)).max(1.0)
        }

        /// Loss in the window (the steady state), as a fraction of heartbeats × dispatchers.
        /// Gaps found in the window may have opened before it: a stack far behind can lose
        /// more than the window's heartbeats, so this is capped at 1.
        pub fn window_loss_fraction(&self) -> f64 {
            (self.lost_window / (self.sent_window * f64::from(self.dispatchers)).max(1.0)).min(1.0)
        }

        /// The figures of one role, if present.
        pub fn process(&self, role: &str) -> Option<&ProcessFigures> {
            self.processes.iter().find(|p| p.role == role)
        }

        /// Whether the stack sustained the offered load: it settled, ingested at least 97 % of
        /// vehicles × rate, lost at most 0.1 % in the window, kept p99 within a second and dropped no
        /// dispatcher.
        pub fn sustained(&self) -> bool {
            let offered = f64::from(self.vehicles) * self.rate;
            self.settle_secs.is_some()
                && self.ingested_per_s >= 0.97 * offered
                && self.window_loss_fraction() <= 0.001
                && self.latency.p99 <= 1000.0
                && self.disconnects == 0
        }

        /// Broker and bridge together.
        pub fn server(&self) -> ProcessFigures {
            let mut sum = ProcessFigures {
                role: "broker+bridge".into(),
                count: 0,
                cpu_secs: 0.0,
                peak_rss_mib: 0.0,
            };
            for p in &self.processes {
                if matches!(p.role.as_str(), "broker" | "bridge" | "broker+bridge") {
                    sum.count += p.count;
                    sum.cpu_secs += p.cpu_secs;
                    sum.peak_rss_mib += p.peak_rss_mib;
                }
            }
            sum
        }
    }

    /// Latency histogram buckets as node reports them: 0.1 ms below 1 s, then 1 ms.
    const FINE: usize = 10_000;

    fn bucket_ms(bucket: usize) -> f64 {
        if bucket < FINE {
            (bucket as f64 + 0.5) / 10.0
        } else {
            1000.0 + (bucket - FINE) as f64 + 0.5
        }
    }

    fn percentiles(histogram: &HashMap<usize, f64>, max: f64) -> Latency {
        let total: f64 = histogram.values().sum();
        let mut buckets: Vec<(usize, f64)> = histogram.iter().map(|(&b, &c)| (b, c)).collect();
        buckets.sort_unstable_by_key(|&(b, _)| b);
        let at = |q: f64| {
            let target = (q * total).ceil().max(1.0);
            let mut seen = 0.0;
            for &(bucket, count) in &buckets {
                seen += count;
                if seen >= target {
                    return bucket_ms(bucket).min(max);
                }
            }
            max
        };
        if total == 0.0 {
            return Latency::default();
        }
        Latency {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max,
        }
    }

    struct Snapshot {
        at: Instant,
        cpu: Vec<Option<f64>>,
        machine: Option<(f64, f64)>,
        ingested: f64,
        sent: f64,
    }

    async fn snapshot(
        stack: &Stack,
        pids: &[Option<u32>],
        devices: &mut Devices,
    ) -> anyhow::Result<Snapshot> {
        let at = Instant::now();
        let cpu = pids.iter().map(|p| p.and_then(procfs::cpu_secs)).collect();
        let machine = procfs::machine();
        let sent = devices.sent().await?;
        let ingested = stack.metric(stack.ingest_metric).await?;
        Ok(Snapshot {
            at,
            cpu,
            machine,
            ingested,
            sent,
        })
    }

    /// Waits out the warm-up, then until the stack keeps up with the offered load (see
    /// [`RunArgs::settle_max`]); returns the seconds since the devices started, or `None` if it
    /// did not settle in time (the run is measured anyway).
    async fn settle(
        args: &RunArgs,
        stack: &Stack,
        devices: &mut Devices,
    ) -> anyhow::Result<Option<f64>> {
        let began = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        let exact = matches!(devices, Devices::Generator(_));
        if args.settle_max == 0 || !exact {
            return Ok(Some(began.elapsed().as_secs_f64()));
        }
        let offered = f64::from(args.vehicles) * args.rate;
        let deadline = began + Duration::from_secs(args.warmup + args.settle_max);
        let mut last = (Instant::now(), stack.metric(stack.ingest_metric).await?);
        let mut steady = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = (Instant::now(), stack.metric(stack.ingest_metric).await?);
            let rate = (now.1 - last.1) / now.0.duration_since(last.0).as_secs_f64();
            last = now;
            // Heartbeats lost at start-up never arrive, so a backlog of sent − ingested need
            // not drain: the rate is what tells a stack that keeps up.
            let even = (rate - offered).abs() <= 0.05 * offered;
            steady = if even { steady + 1 } else { 0 };
            if steady >= 3 {
                return Ok(Some(began.elapsed().as_secs_f64()));
            }
        }
        eprintln!(
            "loadbench: not settled within {} s; measuring anyway",
            args.settle_max
        );
        Ok(None)
    }

    /// The device side of a run.
    enum Devices {
        /// `loadbench generate`.
        Generator(Peer),
        /// `device-sim`, with the time its heartbeats were last sampled.
        Sim(Program),
    }

    /// What the devices did, once stopped.
    struct DevicesDone {
        /// Each vehicle's last sequence number, when known.
        last_seq: Option<Vec<i64>>,
        sent_total: u64,
        blocked: u64,
        errors: u64,
        max_late_ms: f64,
    }

    /// The last `progress` line of device-sim, as (connected, heartbeats sent).
    fn sim_progress(sim: &Program) -> (u64, u64) {
        sim.log_text()
            .lines()
            .rev()
            .find(|l| l.contains("progress"))
            .map_or((0, 0), |line| {
                let get = |k: &str| field(line, k).and_then(|v| v.parse().ok()).unwrap_or(0);
                (get("connected"), get("heartbeats"))
            })
    }

    impl Devices {
        /// Starts the devices and waits until every vehicle is connected; returns them with
        /// (connections, seconds to connect).
        async fn start(
            env: &Env,
            args: &RunArgs,
            stack: &Stack,
        ) -> anyhow::Result<(Self, u64, f64)> {
            let connect_timeout = ANSWER + Duration::from_millis(u64::from(args.vehicles) * 2);
            if args.devices == DeviceKind::DeviceSim {
                let began = Instant::now();
                let mut cmd = Command::new(env.bins.join("device-sim"));
                cmd.args(["--broker", &stack.mqtt.to_string()])
                    .args(["--vehicles", &args.vehicles.to_string()])
                    .args(["--rate", &args.rate.to_string()])
                    .args(["--fleet", "bench"]);
                let sim = Program::spawn("device-sim", cmd)?;
                // It logs a progress line every 5 s: wait for one with every vehicle connected.
                let deadline = Instant::now() + connect_timeout;
                loop {
                    if sim_progress(&sim).0 >= u64::from(args.vehicles) {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "device-sim did not connect every vehicle:\n{}",
                            sim.log_text()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                let secs = began.elapsed().as_secs_f64();
                return Ok((Self::Sim(sim), u64::from(args.vehicles), secs));
            }
            let payload = match stack.kind {
                StackKind::Baseline => "json",
                _ => "sealed",
            };
            let mut cmd = Command::new(&env.exe);
            cmd.arg("generate")
                .args(["--broker", &stack.mqtt.to_string()])
                .args(["--vehicles", &args.vehicles.to_string()])
                .args(["--rate", &args.rate.to_string()])
                .args(["--payload", payload])
                .args([
                    "--per-connection",
                    &args.per_connection(args.vehicles).to_string(),
                ]);
            if args.no_subscribe {
                cmd.arg("--no-subscribe");
            }
            let mut generator = Peer::spawn("devices", cmd)?;
            let connected = generator.expect("connected", connect_timeout).await?;
            let connections = connected["connections"].as_u64().unwrap_or(0);
            let secs = connected["secs"].as_f64().unwrap_or(0.0);
            generator.send("start").await?;
            Ok((Self::Generator(generator), connections, secs))
        }

        fn pid(&self) -> Option<u32> {
            match self {
                Self::Generator(peer) => peer.pid(),
                Self::Sim(sim) => sim.pid(),
            }
        }

        /// Heartbeats sent so far (device-sim: as of its last progress line, every 5 s).
        async fn sent(&mut self) -> anyhow::Result<f64> {
            match self {
                Self::Generator(peer) => {
                    peer.send("mark").await?;
                    let mark = peer.expect("mark", ANSWER).await?;
                    Ok(mark["sent"].as_f64().unwrap_or(0.0))
                }
                Self::Sim(sim) => Ok(sim_progress(sim).1 as f64),
            }
        }

        async fn stop(self) -> anyhow::Result<DevicesDone> {
            match self {
                Self::Generator(mut peer) => {
                    peer.send("stop").await?;
                    let done = peer.expect("done", ANSWER).await?;
                    peer.finish(Duration::from_secs(5)).await;
                    let last_seq: Vec<i64> = done["lastSeq"]
                        .as_array()
                        .context("no lastSeq from the devices")?
                        .iter()
                        .map(|v| v.as_i64().unwrap_or(-1))
                        .collect();
                    Ok(DevicesDone {
                        sent_total: last_seq.iter().map(|&s| (s + 1).max(0) as u64).sum(),
                        last_seq: Some(last_seq),
                        blocked: done["blocked"].as_u64().unwrap_or(0),
                        errors: done["errors"].as_u64().unwrap_or(0),
                        max_late_ms: done["maxLateMs"].as_f64().unwrap_or(0.0),
                    })
                }
                Self::Sim(mut sim) => {
                    sim.terminate(Duration::from_secs(30))
                        .await
                        .context("stopping device-sim")?;
                    let sent_total = sim
                        .find_line("simulation finished")
                        .and_then(|line| field(&line, "heartbeats")?.parse().ok())
                        .unwrap_or_else(|| sim_progress(&sim).1);
                    Ok(DevicesDone {
                        last_seq: None,
                        sent_total,
                        blocked: 0,
                        errors: 0,
                        max_late_ms: 0.0,
                    })
                }
            }
        }
    }

    /// Runs `stack` under the load of `args` and measures it.
    ///
    /// # Errors
    /// If a program fails to start, answer or stay up.
    pub async fn measure(env: &Env, args: &RunArgs, kind: StackKind) -> anyhow::Result<Measured> {
        let stack = Stack::start(kind, args, &env.bins).await?;
        let result = drive(env, args, &stack).await;
        stack.stop().await;
        result
    }

    async fn drive(env: &Env, args: &RunArgs, stack: &Stack) -> anyhow::Result<Measured> {
        let interval_ms = 1000.0 / args.rate;
        let tick_ms = args.tick_ms();

        // Dispatchers first, so they see every heartbeat from the first one.
        let mut dispatchers = Vec::new();
        let mut first = 0;
        while first < args.dispatchers {
            let clients = args.clients_per_process.min(args.dispatchers - first);
            let config = json!({
                "url": stack.http,
                "namespace": "/dispatch",
                "token": "dispatch-demo",
                "room": "all",
                "clients": clients,
                "first": first,
                "intervalMs": interval_ms,
                "tickMs": tick_ms,
                "slackMs": args.slack_ms,
            });
            let mut cmd = Command::new("node");
            cmd.arg(env.node_dir.join("load-dispatchers.mjs"))
                .arg(config.to_string())
                .current_dir(&env.node_dir);
            dispatchers.push(Peer::spawn(&format!("dispatchers-{first}"), cmd)?);
            first += clients;
        }
        for d in &mut dispatchers {
            d.expect("ready", ANSWER).await?;
        }

        // Devices: connect every vehicle, then start publishing.
        let (mut devices, connections, connect_secs) = Devices::start(env, args, stack).await?;
        eprintln!(
            "loadbench: {} vehicles on {connections} connections in {connect_secs:.1} s; warming up {} s",
            args.vehicles, args.warmup
        );
        let settle_secs = settle(args, stack, &mut devices).await?;

        // The window.
        let mut pids: Vec<Option<u32>> = stack.programs.iter().map(|(_, p)| p.pid()).collect();
        pids.push(devices.pid());
        pids.extend(dispatchers.iter().map(Peer::pid));
        let load_before = procfs::load_average().unwrap_or(0.0);
        for d in &mut dispatchers {
            d.send(r#"{"op":"window-start"}"#).await?;
        }
        for d in &mut dispatchers {
            d.expect("window-started", ANSWER).await?;
        }
        let begin = snapshot(stack, &pids, &mut devices).await?;
        eprintln!("loadbench: measuring {} s", args.duration);
        tokio::time::sleep(Duration::from_secs(args.duration)).await;
        let end = snapshot(stack, &pids, &mut devices).await?;
        for d in &mut dispatchers {
            d.send(r#"{"op":"window-end"}"#).await?;
        }
        let mut windows = Vec::new();
        for d in &mut dispatchers {
            windows.push(d.expect("window", ANSWER).await?);
        }

        let peak: Vec<Option<u64>> = pids
            .iter()
            .map(|p| p.and_then(|pid| procfs::status_kib(pid, "VmHWM")))
            .collect();

        // Stop the devices, let the last positions arrive, collect what each client saw.
        let done = devices.stop().await?;
        tokio::time::sleep(Duration::from_millis(tick_ms + args.slack_ms + 1000)).await;
        for d in &mut dispatchers {
            d.send(r#"{"op":"report"}"#).await?;
        }
        let mut reports = Vec::new();
        for d in &mut dispatchers {
            reports.push(d.expect("report", ANSWER).await?);
        }
        for d in dispatchers {
            d.finish(Duration::from_secs(5)).await;
        }

        // Figures.
        let secs = end.at.duration_since(begin.at).as_secs_f64();
        let mut histogram: HashMap<usize, f64> = HashMap::new();
        let mut max_latency: f64 = 0.0;
        let mut late = 0.0;
        let mut positions = 0.0;
        let mut events = 0.0;
        let mut lost_window = 0.0;
        for w in &windows {
            for b in w["buckets"].as_array().into_iter().flatten() {
                let bucket = b[0].as_u64().unwrap_or(0) as usize;
                *histogram.entry(bucket).or_default() += b[1].as_f64().unwrap_or(0.0);
            }
            max_latency = max_latency.max(w["maxLatencyMs"].as_f64().unwrap_or(0.0));
            late += w["late"].as_f64().unwrap_or(0.0);
            for c in w["clients"].as_array().into_iter().flatten() {
                positions += c["positions"].as_f64().unwrap_or(0.0);
                events += c["batches"].as_f64().unwrap_or(0.0);
                lost_window += c["gapLost"].as_f64().unwrap_or(0.0);
            }
        }
        let emits_dropped = match stack.dropped_metric {
            Some(sample) => Some(stack.metric(sample).await?),
            None => None,
        };
        let mut kinds: HashMap<String, usize> = HashMap::new();
        let mut warnings = 0;
        for (_, program) in &stack.programs {
            for line in program.log_text().lines() {
                let warning = line.contains(" WARN ") || line.contains("broadcast failed");
                // The start-up notices of the demo setup (open mode, demo tokens) are expected.
                if !warning || line.contains(" MODE") {
                    continue;
                }
                warnings += 1;
                // The message without timestamp and numbers, to count alike lines together.
                let message = line.split_once(" WARN ").map_or(line, |(_, m)| m);
                let masked: String = message
                    .chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .take(140)
                    .collect();
                *kinds.entry(masked).or_default() += 1;
            }
        }
        let mut top_warnings: Vec<(usize, String)> =
            kinds.into_iter().map(|(m, n)| (n, m)).collect();
        top_warnings.sort_unstable_by(|a, b| b.cmp(a));
        top_warnings.truncate(3);
        let allowed = ((tick_ms + args.slack_ms) as f64 / interval_ms).floor() as i64;
        let (lost, lost_worst, disconnects) =
            losses(&reports, done.last_seq.as_deref().unwrap_or(&[]), allowed);
        let sent_total = done.sent_total;

        let names: Vec<String> = stack
            .programs
            .iter()
            .map(|(role, _)| role.clone())
            .chain(std::iter::once("devices".to_owned()))
            .chain(std::iter::repeat_n("dispatchers".to_owned(), reports.len()))
            .collect();
        let mut processes: Vec<ProcessFigures> = Vec::new();
        let mut ours = 0.0;
        for (i, role) in names.iter().enumerate() {
            let cpu = match (begin.cpu[i], end.cpu[i]) {
                (Some(a), Some(b)) => b - a,
                _ => 0.0,
            };
            ours += cpu;
            let rss = peak[i].unwrap_or(0) as f64 / 1024.0;
            match processes.iter_mut().find(|p| &p.role == role) {
                Some(p) => {
                    p.count += 1;
                    p.cpu_secs += cpu;
                    p.peak_rss_mib += rss;
                }
                None => processes.push(ProcessFigures {
                    role: role.clone(),
                    count: 1,
                    cpu_secs: cpu,
                    peak_rss_mib: rss,
                }),
            }
        }
        let machine_busy_cores = match (begin.machine, end.machine) {
            (Some((b0, _)), Some((b1, _))) => (b1 - b0) / secs,
            _ => 0.0,
        };
        Ok(Measured {
            stack: stack.kind,
            vehicles: args.vehicles,
            rate: args.rate,
            dispatchers: args.dispatchers,
            connections,
            connect_secs,
            settle_secs,
            settle_checked: args.settle_max > 0 && args.devices == DeviceKind::Generator,
            window_secs: secs,
            sent_per_s: (end.sent - begin.sent) / secs,
            ingested_per_s: (end.ingested - begin.ingested) / secs,
            delivered_per_s: positions / secs,
            events_per_s: events / secs,
            latency: percentiles(&histogram, max_latency),
            late,
            sent_total,
            lost,
            lost_worst,
            sent_window: end.sent - begin.sent,
            lost_window,
            disconnects,
            processes,
            machine_busy_cores,
            others_cores: (machine_busy_cores - ours / secs).max(0.0),
            load_before,
            device_blocked: done.blocked,
            device_errors: done.errors,
            device_max_late_ms: done.max_late_ms,
            emits_dropped,
            warnings,
            top_warnings,
        })
    }

    /// Lost heartbeats per the definition in the crate docs: skipped beyond `allowed` inside
    /// each client's stream (counted by the client), plus the tail each client never received.
    /// Returns (total, worst client, disconnects).
    fn losses(reports: &[Value], last_seq: &[i64], allowed: i64) -> (u64, u64, u64) {
        let ids: Vec<String> = (1..=last_seq.len() as u32).map(vehicle_id).collect();
        let mut total = 0;
        let mut worst = 0;
        let mut disconnects = 0;
        for report in reports {
            for client in report["clients"].as_array().into_iter().flatten() {
                let mut lost = client["gapLost"].as_u64().unwrap_or(0);
                disconnects += client["disconnects"].as_u64().unwrap_or(0);
                let seen = &client["lastSeq"];
                for (id, &sent) in ids.iter().zip(last_seq) {
                    let received = seen[id.as_str()].as_i64().unwrap_or(-1);
                    lost += (sent - received - allowed).max(0) as u64;
                }
                total += lost;
                worst = worst.max(lost);
            }
        }
        (total, worst, disconnects)
    }
}

pub mod report {
    //! The markdown tables.

    use std::fmt::Write as _;

    use crate::run::{Env, Measured};
    use crate::{BrokerMode, RunArgs, StackKind, procfs};

    fn cores() -> usize {
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    /// What was run, on what.
    pub fn header(args: &RunArgs, env: &Env) -> String {
        let mut out = String::new();
        let commit = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(crate::workspace())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        let _ = writeln!(
            out,
            "loadbench: {} cores, load average {:.2} at start, commit {commit}, binaries in {}",
            cores(),
            procfs::load_average().unwrap_or(0.0),
            env.bins.display()
        );
        let _ = writeln!(
            out,
            "tick {} ms, slack {} ms, broker {}, {} dispatcher clients per node process, warm-up {} s\n",
            args.tick_ms(),
            args.slack_ms,
            match args.broker {
                BrokerMode::Embedded => "embedded",
                BrokerMode::Separate => "separate",
            },
            args.clients_per_process,
            args.warmup
        );
        out
    }

    fn name(kind: StackKind) -> &'static str {
        match kind {
            StackKind::Fleetbeat => "Fleetbeat",
            StackKind::Baseline => "baseline",
            StackKind::Both => "both",
        }
    }

    fn pct_core(cpu_secs: f64, secs: f64) -> f64 {
        100.0 * cpu_secs / secs.max(1e-9)
    }

    /// The rows of one run: (figure, value).
    fn rows(m: &Measured) -> Vec<(String, f64)> {
        let mut rows = vec![
            ("heartbeats/s sent".to_owned(), m.sent_per_s),
            ("heartbeats/s ingested".to_owned(), m.ingested_per_s),
            (
                "positions/s delivered (all dispatchers)".to_owned(),
                m.delivered_per_s,
            ),
            ("position events/s received".to_owned(), m.events_per_s),
            ("latency p50 ms".to_owned(), m.latency.p50),
            ("latency p99 ms".to_owned(), m.latency.p99),
            ("latency p99.9 ms".to_owned(), m.latency.p999),
            ("latency max ms".to_owned(), m.latency.max),
            (
                "loss % in the window (heartbeats × dispatchers)".to_owned(),
                100.0 * m.window_loss_fraction(),
            ),
            (
                "loss % over the whole run, start-up included".to_owned(),
                100.0 * m.loss_fraction(),
            ),
        ];
        let server = m.server();
        rows.push((
            "broker+bridge CPU % of a core".to_owned(),
            pct_core(server.cpu_secs, m.window_secs),
        ));
        rows.push((
            "broker+bridge CPU µs per heartbeat".to_owned(),
            1e6 * server.cpu_secs / (m.ingested_per_s * m.window_secs).max(1.0),
        ));
        rows.push(("broker+bridge peak RSS MiB".to_owned(), server.peak_rss_mib));
        for p in &m.processes {
            if p.role == "broker+bridge" {
                continue;
            }
            rows.push((
                format!("{} CPU % of a core", p.role),
                pct_core(p.cpu_secs, m.window_secs),
            ));
            rows.push((format!("{} peak RSS MiB", p.role), p.peak_rss_mib));
        }
        rows.push((
            format!("machine busy, cores (of {})", cores()),
            m.machine_busy_cores,
        ));
        rows.push((
            "… of which outside the benchmark's processes, cores".to_owned(),
            m.others_cores,
        ));
        rows
    }

    fn fmt(v: f64) -> String {
        if v == 0.0 {
            "0".into()
        } else if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else if v.abs() >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        }
    }

    fn notes(m: &Measured) -> String {
        format!(
            "{}: {} vehicles × {} Hz on {} connections (connected in {:.1} s, settled {}), {} dispatchers, \
             {:.1} s window; load average {:.2} before the window, {:.2} cores busy outside the \
             benchmark during it; {} heartbeats sent in all, \
             {} lost (worst dispatcher {}), {} late (> tick + slack), {} dispatcher disconnects; \
             devices: {} blocked, {} errors, at most {:.1} ms behind schedule; emits the bridge \
             could not hand to a socket: {}; warnings logged by the stack: {}",
            name(m.stack),
            m.vehicles,
            m.rate,
            m.connections,
            m.connect_secs,
            settled(m),
            m.dispatchers,
            m.window_secs,
            m.load_before,
            m.others_cores,
            m.sent_total,
            m.lost,
            m.lost_worst,
            m.late,
            m.disconnects,
            m.device_blocked,
            m.device_errors,
            m.device_max_late_ms,
            m.emits_dropped
                .map_or_else(|| "not counted".to_owned(), |d| format!("{d:.0}")),
            m.warnings,
        )
    }

    /// "window / whole run" loss in %.
    fn loss_pair(m: &Measured) -> String {
        format!(
            "{} / {}",
            fmt(100.0 * m.window_loss_fraction()),
            fmt(100.0 * m.loss_fraction())
        )
    }

    fn settled(m: &Measured) -> String {
        if !m.settle_checked {
            return "not checked: measured after the warm-up".to_owned();
        }
        m.settle_secs.map_or_else(
            || "**not within --settle-max**".to_owned(),
            |s| format!("{s:.0} s after the first heartbeat"),
        )
    }

    fn warnings(m: &Measured) -> String {
        m.top_warnings
            .iter()
            .map(|(n, message)| format!("\n  - {n} × `{}`", message.replace('`', "'")))
            .collect()
    }

    /// One table per run, and ratios when both stacks ran.
    pub fn side_by_side(results: &[Measured]) -> String {
        let mut out = String::new();
        let fleetbeat = results.iter().find(|m| m.stack == StackKind::Fleetbeat);
        let baseline = results.iter().find(|m| m.stack == StackKind::Baseline);
        match (fleetbeat, baseline) {
            (Some(f), Some(b)) => {
                let _ = writeln!(
                    out,
                    "| figure | Fleetbeat | baseline | Fleetbeat / baseline |\n|---|---|---|---|"
                );
                let (fr, br) = (rows(f), rows(b));
                for (label, value) in &fr {
                    let other = br.iter().find(|(l, _)| l == label).map(|r| r.1);
                    let (other, ratio) = match other {
                        Some(o) if label.starts_with('…') => (fmt(o), "–".into()),
                        Some(o) if o != 0.0 => (fmt(o), format!("{:.2}×", value / o)),
                        Some(o) => (fmt(o), "–".into()),
                        None => ("–".into(), "–".into()),
                    };
                    let _ = writeln!(out, "| {label} | {} | {other} | {ratio} |", fmt(*value));
                }
                for (label, value) in &br {
                    if !fr.iter().any(|(l, _)| l == label) {
                        let _ = writeln!(out, "| {label} | – | {} | – |", fmt(*value));
                    }
                }
            }
            _ => {
                for m in results {
                    let _ = writeln!(out, "| figure | {} |\n|---|---|", name(m.stack));
                    for (label, value) in rows(m) {
                        let _ = writeln!(out, "| {label} | {} |", fmt(value));
                    }
                }
            }
        }
        out.push('\n');
        for m in results {
            let _ = writeln!(out, "- {}{}", notes(m), warnings(m));
        }
        out
    }

    /// Every run of a repeated side by side, in order, with the figures that vary most.
    pub fn runs(runs: &[Measured]) -> String {
        let mut out = String::from(
            "\nAll runs (the table above shows, per stack, the one with the least CPU busy outside the benchmark):\n\n\
             | run | stack | ingested/s | p50 ms | p99 ms | max ms | loss % window / whole run | broker+bridge CPU % of a core | outside the benchmark, cores |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for (i, m) in runs.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {:.1} | {:.2} |",
                i + 1,
                name(m.stack),
                m.ingested_per_s,
                fmt(m.latency.p50),
                fmt(m.latency.p99),
                fmt(m.latency.max),
                loss_pair(m),
                pct_core(m.server().cpu_secs, m.window_secs),
                m.others_cores,
            );
        }
        out
    }

    /// The sustained-throughput steps, and the best sustained step of each stack.
    pub fn saturation(steps: &[Measured]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| stack | vehicles × Hz | offered/s | settled after s | sent/s | ingested/s | positions/s delivered | p50 ms | p99 ms | loss % window / whole run | broker+bridge CPU % of a core | broker+bridge peak RSS MiB | machine busy cores | outside the benchmark, cores | sustained |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for m in steps {
            let server = m.server();
            let _ = writeln!(
                out,
                "| {} | {} × {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
                name(m.stack),
                m.vehicles,
                m.rate,
                f64::from(m.vehicles) * m.rate,
                m.settle_secs
                    .map_or_else(|| "**no**".to_owned(), |s| format!("{s:.0}")),
                m.sent_per_s,
                m.ingested_per_s,
                m.delivered_per_s,
                fmt(m.latency.p50),
                fmt(m.latency.p99),
                loss_pair(m),
                pct_core(server.cpu_secs, m.window_secs),
                server.peak_rss_mib,
                m.machine_busy_cores,
                m.others_cores,
                if m.sustained() { "yes" } else { "**no**" },
            );
        }
        out.push('\n');
        let best = |kind: StackKind| {
            steps
                .iter()
                .filter(|m| m.stack == kind && m.sustained())
                .max_by(|a, b| a.ingested_per_s.total_cmp(&b.ingested_per_s))
        };
        for kind in [StackKind::Fleetbeat, StackKind::Baseline] {
            if let Some(m) = best(kind) {
                let _ = writeln!(
                    out,
                    "- {} sustained {:.0} heartbeats/s (p99 {} ms)",
                    name(kind),
                    m.ingested_per_s,
                    fmt(m.latency.p99)
                );
            }
        }
        if let (Some(f), Some(b)) = (best(StackKind::Fleetbeat), best(StackKind::Baseline)) {
            let _ = writeln!(
                out,
                "- Fleetbeat / baseline sustained throughput: {:.2}×, p99 {:.2}×",
                f.ingested_per_s / b.ingested_per_s.max(1.0),
                f.latency.p99 / b.latency.p99.max(1e-9)
            );
        }
        out
    }

    /// The scaling curve.
    pub fn curve(points: &[Measured]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| vehicles | connections | settled after s | heartbeats/s ingested | positions/s delivered | p50 ms | p99 ms | max ms | loss % window / whole run | broker+bridge CPU % of a core | µs CPU per heartbeat | broker+bridge peak RSS MiB | devices CPU % | dispatchers CPU % | machine busy cores | outside the benchmark, cores |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for m in points {
            let server = m.server();
            let cpu = |role: &str| {
                m.process(role)
                    .map_or(0.0, |p| pct_core(p.cpu_secs, m.window_secs))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                m.vehicles,
                m.connections,
                m.settle_secs
                    .map_or_else(|| "**no**".to_owned(), |s| format!("{s:.0}")),
                m.ingested_per_s,
                m.delivered_per_s,
                fmt(m.latency.p50),
                fmt(m.latency.p99),
                fmt(m.latency.max),
                loss_pair(m),
                pct_core(server.cpu_secs, m.window_secs),
                1e6 * server.cpu_secs / (m.ingested_per_s * m.window_secs).max(1.0),
                server.peak_rss_mib,
                cpu("devices"),
                cpu("dispatchers"),
                m.machine_busy_cores,
                m.others_cores,
            );
        }
        out.push('\n');
        for m in points {
            let _ = writeln!(out, "- {}{}", notes(m), warnings(m));
        }
        out
    }
}
