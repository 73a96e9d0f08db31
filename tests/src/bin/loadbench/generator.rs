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
use shared::frame::{self, FrameHeader};
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

/// Reads one whole packet from `stream` (blocking): its fixed header and its body.
fn read_packet(stream: &mut TcpStream) -> anyhow::Result<(FrameHeader, Vec<u8>)> {
    let mut packet = Vec::with_capacity(8);
    let header = loop {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        packet.push(byte[0]);
        if let Some(header) = FrameHeader::parse(&packet)? {
            break header;
        }
    };
    let mut body = vec![0u8; header.remaining];
    stream.read_exact(&mut body)?;
    Ok((header, body))
}

/// Connects as `client_id` and, like a real vehicle, subscribes to `commands` (its own
/// `cmd` topics), waiting for the CONNACK and SUBACK.
fn connect(broker: SocketAddr, client_id: &str, commands: &[String]) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&broker, Duration::from_secs(10))
        .with_context(|| format!("connecting {client_id} to {broker}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let connect = frame::Connect {
        client_id,
        keep_alive: KEEP_ALIVE,
        ..frame::Connect::default()
    };
    stream.write_all(&connect.bytes())?;
    let (ack, body) = read_packet(&mut stream)
        .with_context(|| format!("waiting for the CONNACK of {client_id}"))?;
    if ack.first != 0x20 || body.get(1) != Some(&0) {
        bail!(
            "{client_id}: CONNACK refused: {:02x?}",
            [&[ack.first][..], &body].concat()
        );
    }
    if !commands.is_empty() {
        let filters: Vec<(&str, u8)> = commands.iter().map(|c| (c.as_str(), 1)).collect();
        stream.write_all(&frame::subscribe(false, 1, &filters))?;
        // SUBACK: packet id, then one return code per filter.
        let (suback, body) = read_packet(&mut stream)
            .with_context(|| format!("waiting for the SUBACK of {client_id}"))?;
        let codes = body.get(2..).unwrap_or_default();
        if suback.first != 0x90 || codes.len() != commands.len() || codes.iter().any(|&c| c >= 0x80)
        {
            bail!(
                "{client_id}: SUBSCRIBE refused: {:02x?}",
                [&[suback.first][..], &body].concat()
            );
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
            packet.clear();
            frame::Publish {
                topic: vehicle.topic.as_bytes(),
                payload: &buf[..len],
                ..frame::Publish::default()
            }
            .put(&mut packet);
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
            let _ = connection.stream.write_all(&frame::DISCONNECT);
        }
    }
    let last_seq: Vec<i64> = vehicles.iter().map(|v| i64::from(v.seq) - 1).collect();
    let mut done = counters.mark();
    done["type"] = json!("done");
    done["lastSeq"] = json!(last_seq);
    say(&done);
    Ok(())
}
