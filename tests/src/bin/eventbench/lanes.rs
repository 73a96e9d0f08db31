//! The vehicles: MQTT 3.1.1 written by hand (`shared::frame`) over tokio sockets, one
//! connection per vehicle, client id = vehicle id, no login (open mode).
//!
//! A lane is one vehicle at a time: it publishes the three events of the vehicle's order at
//! QoS 1, at most `in_flight` unacknowledged, disconnects, and goes on as the next vehicle of
//! the lane, whose connection it opened (CONNECT, CONNACK) while the one before published.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use shared::frame::{self, FrameHeader};
use shared::{Counter, DeliveryEvent, DeliveryKind, Topic, TopicKind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::engine::{self, DROPOFF, PICKUP};

/// The bound on every wait for the broker (CONNACK, PUBACK).
const ANSWER: Duration = Duration::from_secs(30);
/// MQTT keep-alive, seconds (a vehicle of a lane lives for three events).
const KEEP_ALIVE: u16 = 60;
/// The steps of an order, in order.
const STEPS: [DeliveryKind; 3] = [
    DeliveryKind::Pickup,
    DeliveryKind::InTransit,
    DeliveryKind::Delivered,
];

/// What a lane does with each vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Publishes its order's three events, at most this many unacknowledged.
    Events(usize),
    /// Connects and disconnects only (the control run: what a vehicle's connection costs).
    ConnectOnly,
}

/// What every lane shares: the counters the window is measured on, and when to stop.
#[derive(Default)]
pub struct Progress {
    /// Events acknowledged so far, all lanes.
    pub acknowledged: AtomicU64,
    /// Lanes that have finished.
    pub lanes_done: AtomicU64,
    /// Set when the lanes are to start no new order.
    pub stop: AtomicBool,
}

/// One acknowledged event.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// When its PUBACK was read.
    pub at: Instant,
    /// PUBLISH written → PUBACK read.
    pub latency: Duration,
    /// Its order (= vehicle) index.
    pub order: u32,
    /// Its `seq` (1, 2, 3).
    pub seq: u32,
}

/// What a lane did.
#[derive(Debug, Default)]
pub struct LaneReport {
    /// Every acknowledged event, in order.
    pub acks: Vec<Ack>,
    /// The orders whose three events were all acknowledged.
    pub completed: Vec<u32>,
}

/// Runs lane `lane` over `orders` (order = vehicle indices) against the broker at `broker`.
/// With [`Work::ConnectOnly`], [`Progress::acknowledged`] counts connections.
///
/// # Errors
/// If a connection is refused or breaks, or an answer does not come within [`ANSWER`].
pub async fn lane(
    lane: u32,
    broker: SocketAddr,
    orders: Vec<u32>,
    work: Work,
    progress: Arc<Progress>,
) -> anyhow::Result<LaneReport> {
    let result = run_lane(lane, broker, &orders, work, &progress).await;
    progress.lanes_done.fetch_add(1, Ordering::Relaxed);
    result
}

async fn run_lane(
    lane: u32,
    broker: SocketAddr,
    orders: &[u32],
    work: Work,
    progress: &Progress,
) -> anyhow::Result<LaneReport> {
    let mut report = LaneReport {
        acks: Vec::with_capacity(orders.len() * 3),
        completed: Vec::with_capacity(orders.len()),
    };
    let mut next: Option<JoinHandle<anyhow::Result<Connection>>> = orders
        .first()
        .map(|&i| tokio::spawn(connect(broker, lane, i)));
    for (n, &index) in orders.iter().enumerate() {
        let Some(pending) = next.take() else { break };
        let connection = pending.await.context("a connect task failed")??;
        if progress.stop.load(Ordering::Relaxed) {
            connection.disconnect().await;
            break;
        }
        next = orders
            .get(n + 1)
            .map(|&i| tokio::spawn(connect(broker, lane, i)));
        match work {
            Work::Events(in_flight) => {
                deliver(connection, index, in_flight, progress, &mut report).await?;
            }
            Work::ConnectOnly => {
                connection.disconnect().await;
                progress.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if let Some(pending) = next
        && let Ok(Ok(connection)) = pending.await
    {
        connection.disconnect().await;
    }
    Ok(report)
}

/// A vehicle's connection, CONNACK received.
struct Connection {
    index: u32,
    stream: BufReader<TcpStream>,
}

impl Connection {
    async fn disconnect(mut self) {
        let _ = self.stream.write_all(&frame::DISCONNECT).await;
        let _ = self.stream.shutdown().await;
    }
}

/// The source address of lane `lane`'s connections: a loopback address of its own
/// (127.1.x.y), as vehicles come from many addresses; from one address, the broker's
/// `max_pending_connects_per_ip` (100) would refuse the connections of more than 100 lanes
/// opening at once.
fn source_ip(lane: u32) -> Ipv4Addr {
    let [_, _, x, y] = (lane % 250 + 1 + (lane / 250) * 256).to_be_bytes();
    Ipv4Addr::new(127, 1, x, y)
}

/// Opens vehicle `index`'s connection (from lane `lane`'s address) and waits for its CONNACK.
async fn connect(broker: SocketAddr, lane: u32, index: u32) -> anyhow::Result<Connection> {
    let vehicle = engine::vehicle(index)?;
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from((source_ip(lane), 0)))
        .context("binding a loopback source address")?;
    let stream = timeout(ANSWER, socket.connect(broker))
        .await
        .context("connecting timed out")?
        .with_context(|| format!("connecting {vehicle} to {broker}"))?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    let connect = frame::Connect {
        client_id: vehicle.as_str(),
        keep_alive: KEEP_ALIVE,
        ..frame::Connect::default()
    };
    stream.write_all(&connect.bytes()).await?;
    let (first, body) = read_packet(&mut stream)
        .await
        .with_context(|| format!("waiting for the CONNACK of {vehicle}"))?;
    ensure!(
        first == 0x20 && body.get(1) == Some(&0),
        "{vehicle}: CONNACK refused: {first:02x} {body:02x?}"
    );
    Ok(Connection { index, stream })
}

/// Reads one whole packet: its first byte and its body.
async fn read_packet(stream: &mut BufReader<TcpStream>) -> anyhow::Result<(u8, Vec<u8>)> {
    let read = async {
        let mut header = Vec::with_capacity(5);
        let parsed = loop {
            header.push(stream.read_u8().await?);
            if let Some(parsed) = FrameHeader::parse(&header)
                .map_err(|_| anyhow::anyhow!("malformed remaining length"))?
            {
                break parsed;
            }
        };
        let mut body = vec![0u8; parsed.remaining];
        stream.read_exact(&mut body).await?;
        anyhow::Ok((parsed.first, body))
    };
    timeout(ANSWER, read)
        .await
        .context("no answer from the broker")?
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Publishes the three events of order `index` on its vehicle's `connection`, at most
/// `in_flight` unacknowledged, records each PUBACK, and disconnects.
async fn deliver(
    mut connection: Connection,
    index: u32,
    in_flight: usize,
    progress: &Progress,
    report: &mut LaneReport,
) -> anyhow::Result<()> {
    debug_assert_eq!(connection.index, index);
    let vehicle = engine::vehicle(index)?;
    let order = engine::order(index)?;
    let topic = Topic::new(engine::fleet()?, vehicle.clone(), TopicKind::Event).name();
    let key = shared::open_mode_key(&vehicle);
    let mut counter = Counter::new();
    let mut buf = [0u8; 256];
    let mut packet = Vec::with_capacity(320);
    // (packet id, seq, written at), oldest first: the broker acknowledges in order.
    let mut waiting: VecDeque<(u16, u32, Instant)> = VecDeque::with_capacity(3);
    let mut steps = STEPS.iter().zip(1u32..).peekable();
    while steps.peek().is_some() || !waiting.is_empty() {
        while waiting.len() < in_flight {
            let Some((&kind, seq)) = steps.next() else {
                break;
            };
            let ts_ms = now_ms();
            let event = DeliveryEvent {
                seq,
                order: order.clone(),
                kind,
                ts_ms,
                pos: if kind == DeliveryKind::Delivered {
                    DROPOFF
                } else {
                    PICKUP
                },
            };
            let sealed = shared::seal(&event, &topic, counter.next(ts_ms), &key, &mut buf)
                .map_err(|e| anyhow::anyhow!("sealing an event: {e}"))?;
            let pkid = u16::try_from(seq).context("packet id")?;
            packet.clear();
            frame::Publish {
                topic: topic.as_bytes(),
                payload: sealed,
                qos: 1,
                pkid,
                ..frame::Publish::default()
            }
            .put(&mut packet);
            connection.stream.write_all(&packet).await?;
            waiting.push_back((pkid, seq, Instant::now()));
        }
        let (first, body) = read_packet(&mut connection.stream)
            .await
            .with_context(|| format!("waiting for a PUBACK of {vehicle}"))?;
        let at = Instant::now();
        if first & 0xF0 != 0x40 {
            // Nothing else is expected (no subscription); skip it.
            continue;
        }
        let pkid = match body.as_slice() {
            [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
            _ => bail!("{vehicle}: a PUBACK without a packet id"),
        };
        let Some((expected, seq, written)) = waiting.pop_front() else {
            bail!("{vehicle}: PUBACK {pkid} for nothing sent");
        };
        ensure!(
            pkid == expected,
            "{vehicle}: PUBACK {pkid} out of order (expected {expected})"
        );
        report.acks.push(Ack {
            at,
            latency: at.duration_since(written),
            order: index,
            seq,
        });
        progress.acknowledged.fetch_add(1, Ordering::Relaxed);
    }
    report.completed.push(index);
    connection.disconnect().await;
    Ok(())
}
