//! What the crash tests share: how many times to kill ([`kill_count`]), a raw vehicle that
//! pipelines sealed QoS 1 delivery events and records which ones got a PUBACK
//! ([`EventPipeline`]), the delivery events a bridge's store holds ([`stored_events`]), and the
//! vendor's side of a run of orders ([`OrderRun`]).
//!
//! The pipeline is written with [`shared::frame`] and [`shared::seal`] (open-mode keys), not
//! with a client library, so that what counts as "acknowledged" is exactly a PUBACK on the
//! wire: an event leaves the vehicle's memory only with its PUBACK, and everything not yet
//! acknowledged is sent again, byte for byte with DUP set, after every reconnect.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use shared::frame::{self, Connect, DISCONNECT, PINGREQ};
use shared::{DeliveryEvent, DeliveryKind, OrderId, Position, VehicleId};
use sqlx::Connection as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use crate::process::Program;
use crate::sio::SioClient;
use crate::stack::BridgeProcess;

/// The environment variable that sets how many times a crash test kills (default
/// [`DEFAULT_KILLS`]); `docs/broker.md` runs them with 100.
pub const KILLS_VAR: &str = "FLEETBEAT_CRASH_KILLS";

/// Kills per crash test unless [`KILLS_VAR`] says otherwise: sized for CI.
pub const DEFAULT_KILLS: usize = 10;

/// How many times a crash test kills: [`KILLS_VAR`], else [`DEFAULT_KILLS`].
pub fn kill_count() -> usize {
    std::env::var(KILLS_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(DEFAULT_KILLS)
}

/// A random pause in `min ..= max`.
pub fn random_pause(min: Duration, max: Duration) -> Duration {
    let span = max.saturating_sub(min).as_millis();
    let span = u64::try_from(span).unwrap_or(u64::MAX);
    min + Duration::from_millis(fastrand_below(span.saturating_add(1)))
}

fn fastrand_below(n: u64) -> u64 {
    // The std RandomState is seeded randomly per process and per instance: enough here.
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(n);
    hasher.finish() % n.max(1)
}

/// What an [`EventPipeline`] did.
#[derive(Debug, Clone, Default)]
pub struct PipelineReport {
    /// The `seq` of every event that got a PUBACK.
    pub acked: BTreeSet<u32>,
    /// Events published (each counted once, however often it was sent again).
    pub published: u32,
    /// PUBLISH packets sent again with DUP after a reconnect.
    pub resent: u32,
    /// Connections made (CONNACK received).
    pub connections: u32,
}

/// State shared between an [`EventPipeline`] and its task.
#[derive(Debug)]
struct Shared {
    report: Mutex<PipelineReport>,
    /// No new events once set; the task ends when everything is acknowledged.
    stopping: AtomicBool,
}

impl Shared {
    fn report(&self) -> std::sync::MutexGuard<'_, PipelineReport> {
        self.report.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A raw MQTT 3.1.1 vehicle publishing sealed delivery events on
/// `fleet/{fleet}/{vehicle}/event` at QoS 1, up to `window` unacknowledged at a time, as fast
/// as the broker acknowledges them. It reconnects (clean session) whenever its connection
/// fails, and then sends every unacknowledged event again, with DUP set.
pub struct EventPipeline {
    shared: Arc<Shared>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl EventPipeline {
    /// Starts publishing to the broker at `broker` as `vehicle` of `fleet` (open mode: the
    /// client id is the vehicle id, no login, the open-mode key seals).
    ///
    /// # Errors
    /// If `vehicle` is not a valid vehicle id.
    pub fn start(
        broker: SocketAddr,
        fleet: &str,
        vehicle: &str,
        window: usize,
    ) -> anyhow::Result<Self> {
        let id = VehicleId::new(vehicle).map_err(anyhow::Error::msg)?;
        let shared = Arc::new(Shared {
            report: Mutex::new(PipelineReport::default()),
            stopping: AtomicBool::new(false),
        });
        let vehicle = Vehicle {
            broker,
            topic: format!("fleet/{fleet}/{vehicle}/event"),
            key: shared::open_mode_key(&id),
            client_id: vehicle.to_owned(),
            window: window.clamp(1, 1000),
            epoch_ms: now_ms(),
        };
        let task = tokio::spawn(vehicle.run(Arc::clone(&shared)));
        Ok(Self { shared, task })
    }

    /// The events acknowledged so far.
    pub fn acked(&self) -> usize {
        self.shared.report().acked.len()
    }

    /// What the pipeline did so far.
    pub fn report(&self) -> PipelineReport {
        self.shared.report().clone()
    }

    /// Waits until more than `count` events are acknowledged.
    ///
    /// # Errors
    /// If that does not happen within `within`.
    pub async fn wait_acked_beyond(&self, count: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while self.acked() <= count {
            if Instant::now() > deadline {
                bail!(
                    "no more than {} events acknowledged within {within:?}: {:?}",
                    self.acked(),
                    self.report()
                );
            }
            sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops publishing new events, waits until every event published got its PUBACK (the
    /// pipeline keeps reconnecting and re-sending meanwhile), disconnects, and reports.
    ///
    /// # Errors
    /// If that does not happen within `within`, or the pipeline failed.
    pub async fn finish(self, within: Duration) -> anyhow::Result<PipelineReport> {
        self.shared.stopping.store(true, Ordering::Release);
        let mut task = self.task;
        match timeout(within, &mut task).await {
            Ok(joined) => joined.context("the pipeline task panicked")??,
            Err(_) => {
                task.abort();
                let report = self.shared.report().clone();
                bail!(
                    "events still unacknowledged after {within:?}: {} published, {} acked",
                    report.published,
                    report.acked.len()
                );
            }
        }
        Ok(self.shared.report().clone())
    }
}

/// The pipeline's vehicle: where it publishes and how it seals.
struct Vehicle {
    broker: SocketAddr,
    topic: String,
    key: shared::DeviceKey,
    client_id: String,
    window: usize,
    /// The device timestamps are `epoch_ms + seq`: a re-sent event carries the same one.
    epoch_ms: u64,
}

/// Packet id of event `seq`: distinct for every event in a window of at most 1000.
fn pkid_of(seq: u32) -> u16 {
    u16::try_from(seq % 60_000).unwrap_or(0) + 1
}

impl Vehicle {
    async fn run(self, shared: Arc<Shared>) -> anyhow::Result<()> {
        // seq → sealed payload, sent and not yet acknowledged.
        let mut unacked: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut next_seq: u32 = 1;
        loop {
            let stopping = shared.stopping.load(Ordering::Acquire);
            if stopping && unacked.is_empty() {
                return Ok(());
            }
            let Ok(mut link) = Link::connect(self.broker, &self.client_id).await else {
                sleep(Duration::from_millis(50)).await;
                continue;
            };
            shared.report().connections += 1;
            let mut sent = Vec::new();
            for (&seq, payload) in &unacked {
                self.put_publish(&mut sent, seq, payload, true);
            }
            shared.report().resent += u32::try_from(unacked.len()).unwrap_or(u32::MAX);
            if link.write(&sent).await.is_err() {
                continue;
            }
            // The connection's life: publish up to the window, read PUBACKs.
            loop {
                let stopping = shared.stopping.load(Ordering::Acquire);
                if stopping && unacked.is_empty() {
                    let _ = link.write(&DISCONNECT).await;
                    return Ok(());
                }
                let mut batch = Vec::new();
                while !stopping && unacked.len() < self.window {
                    let seq = next_seq;
                    next_seq += 1;
                    let payload = self.seal(seq)?;
                    self.put_publish(&mut batch, seq, &payload, false);
                    unacked.insert(seq, payload);
                    shared.report().published += 1;
                }
                if !batch.is_empty() && link.write(&batch).await.is_err() {
                    break;
                }
                match link.read(Duration::from_secs(2)).await {
                    Ok(Some((first, body))) if first >> 4 == 4 && body.len() >= 2 => {
                        let pkid = u16::from_be_bytes([body[0], body[1]]);
                        let seq = unacked.keys().copied().find(|&seq| pkid_of(seq) == pkid);
                        if let Some(seq) = seq {
                            unacked.remove(&seq);
                            shared.report().acked.insert(seq);
                        }
                    }
                    Ok(Some(_)) => {}
                    // Quiet for a while (waiting for PUBACKs): keep the connection alive.
                    Ok(None) => {
                        if link.write(&PINGREQ).await.is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// The sealed payload of event `seq` (an order of its own, so it never moves a real one).
    fn seal(&self, seq: u32) -> anyhow::Result<Vec<u8>> {
        let kinds = [
            DeliveryKind::Pickup,
            DeliveryKind::InTransit,
            DeliveryKind::Delivered,
        ];
        let event = DeliveryEvent {
            seq,
            order: OrderId::new(&format!("raw-{}", seq / 3)).map_err(anyhow::Error::msg)?,
            kind: kinds[(seq % 3) as usize],
            ts_ms: self.epoch_ms + u64::from(seq),
            pos: Position::new(525_000_000, 133_900_000),
        };
        let mut buf = [0u8; 128];
        let sealed = shared::seal(
            &event,
            &self.topic,
            self.epoch_ms + u64::from(seq),
            &self.key,
            &mut buf,
        )
        .map_err(anyhow::Error::msg)?;
        Ok(sealed.to_vec())
    }

    fn put_publish(&self, out: &mut Vec<u8>, seq: u32, payload: &[u8], dup: bool) {
        frame::Publish {
            topic: self.topic.as_bytes(),
            payload,
            qos: 1,
            pkid: pkid_of(seq),
            dup,
            ..frame::Publish::default()
        }
        .put(out);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One MQTT connection of the pipeline.
struct Link {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Link {
    /// Connects as `client_id` (clean session, keep-alive 10 s) and waits for an accepting
    /// CONNACK.
    async fn connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<Link> {
        let stream = timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
        stream.set_nodelay(true)?;
        let mut link = Link {
            stream,
            buf: Vec::new(),
        };
        let connect = Connect {
            client_id,
            keep_alive: 10,
            ..Connect::default()
        };
        link.write(&connect.bytes()).await?;
        match link.read(Duration::from_secs(5)).await? {
            Some((0x20, body)) if body.get(1) == Some(&0) => Ok(link),
            other => bail!("no accepting CONNACK: {other:?}"),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        timeout(Duration::from_secs(5), self.stream.write_all(bytes))
            .await
            .context("write timed out")??;
        Ok(())
    }

    /// The next packet (first byte, body); `Ok(None)` if none came within `wait`; an error
    /// once the connection is closed.
    async fn read(&mut self, wait: Duration) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(header) = frame::frame(&self.buf) {
                let body = self.buf[header.header_len..header.total()].to_vec();
                self.buf.drain(..header.total());
                return Ok(Some((header.first, body)));
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => bail!("closed by the broker"),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(err)) => return Err(err.into()),
            }
        }
    }
}

/// `vehicles` device-sim vehicles of the fleet `demo` against `mqtt`, at 2 Hz with a clock
/// 100× faster (deliveries in seconds), as the crash tests run them.
///
/// # Errors
/// If device-sim cannot be started.
pub fn start_fast_demo_sim(mqtt: SocketAddr, vehicles: u32) -> anyhow::Result<Program> {
    crate::stack::start_sim(
        mqtt,
        vehicles,
        "demo",
        &["--rate", "2", "--time-scale", "100"],
    )
}

/// The `seq` of every delivery event of `vehicle` in the bridge store at `store` (read with
/// sqlx; the bridge may be running, SQLite's WAL lets it).
///
/// # Errors
/// If the database cannot be read.
pub async fn stored_events(store: &Path, vehicle: &str) -> anyhow::Result<BTreeSet<u32>> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(store)
        .busy_timeout(Duration::from_secs(5));
    let mut db = sqlx::SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("opening {}", store.display()))?;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM delivery_events WHERE vehicle = ?")
        .bind(vehicle)
        .fetch_all(&mut db)
        .await
        .context("reading delivery_events")?;
    db.close().await.ok();
    Ok(seqs
        .into_iter()
        .filter_map(|s| u32::try_from(s).ok())
        .collect())
}

/// Waits until every event in `acked` is among `vehicle`'s in the store at `store`, and
/// returns how many were stored.
///
/// # Errors
/// If some are still missing after `within`.
pub async fn wait_stored(
    store: &Path,
    vehicle: &str,
    acked: &BTreeSet<u32>,
    within: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        let stored = stored_events(store, vehicle).await?;
        let missing: Vec<u32> = acked.difference(&stored).copied().collect();
        if missing.is_empty() {
            return Ok(stored.len());
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} acknowledged events are not in the store, e.g. {:?}",
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(10)]
            );
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// The vendor's side of a run of orders through one bridge: places them (a placement cut by a
/// kill is retried; placing is idempotent), and collects and acknowledges `delivery` events
/// until every order was reported `delivered`.
pub struct OrderRun {
    vendor: SioClient,
    orders: Vec<String>,
    placed: usize,
    delivered: BTreeSet<String>,
    /// `delivery` messages received per id, to count re-sends.
    seen: HashMap<u64, u32>,
}

impl OrderRun {
    /// `count` orders named `{prefix}-{i}`, for the demo vendor (`vendor-demo`, store
    /// `store-1`, fleet `demo`), whose socket connects to `bridge` now and reconnects by
    /// itself when the bridge comes back on the same address.
    ///
    /// # Errors
    /// If the vendor cannot connect.
    pub async fn new(bridge: &BridgeProcess, prefix: &str, count: usize) -> anyhow::Result<Self> {
        let vendor = SioClient::connect_with_token(&bridge.url(), "/vendor", "vendor-demo").await?;
        Ok(Self {
            vendor,
            orders: (0..count).map(|i| format!("{prefix}-{i:03}")).collect(),
            placed: 0,
            delivered: BTreeSet::new(),
            seen: HashMap::new(),
        })
    }

    /// Whether every order was reported delivered to the vendor.
    pub fn done(&self) -> bool {
        self.delivered.len() == self.orders.len()
    }

    /// Orders reported delivered so far.
    pub fn delivered(&self) -> usize {
        self.delivered.len()
    }

    /// The first order not yet reported delivered.
    pub fn missing(&self) -> Option<&String> {
        self.orders.iter().find(|o| !self.delivered.contains(*o))
    }

    /// One step: places the next order (if any is left and the bridge takes it), then takes
    /// and acknowledges what reached the vendor, waiting up to `wait` if nothing had.
    ///
    /// # Errors
    /// If the vendor's client is gone.
    pub async fn step(&mut self, bridge: &BridgeProcess, wait: Duration) -> anyhow::Result<()> {
        if self.placed < self.orders.len() {
            let i = self.placed;
            let body = json!({
                "order": self.orders[i],
                "customer": format!("customer {i}"),
                "lat": 52.51 + 0.0005 * (i % 40) as f64,
                "lon": 13.39 + 0.0007 * (i % 30) as f64,
            });
            if let Ok((status, _)) = bridge.post_json("/api/orders", "vendor-demo", &body).await
                && (status == 200 || status == 201)
            {
                self.placed += 1;
            }
        }
        let mut batch = self.vendor.drain_events("delivery");
        if batch.is_empty()
            && let Ok(d) = self.vendor.next_event("delivery", wait).await
        {
            batch.push(d);
        }
        for d in batch {
            self.take(&d).await?;
        }
        Ok(())
    }

    async fn take(&mut self, d: &Value) -> anyhow::Result<()> {
        if d["kind"] == "delivered" {
            self.delivered
                .insert(d["order"].as_str().unwrap_or_default().to_owned());
        }
        if let Some(id) = d["message_id"].as_u64() {
            *self.seen.entry(id).or_default() += 1;
            self.vendor
                .emit("received", json!([{ "messageId": id }]))
                .await?;
        }
        Ok(())
    }

    /// Checks, through the bridge's API, that the store shows every order delivered.
    ///
    /// # Errors
    /// If one is not.
    pub async fn check_store(&self, bridge: &BridgeProcess) -> anyhow::Result<()> {
        for order in &self.orders {
            let (status, view) = bridge
                .get_json(&format!("/api/orders/{order}"), Some("vendor-demo"))
                .await?;
            anyhow::ensure!(status == 200, "{order}: {view}");
            anyhow::ensure!(view["state"] == "delivered", "{order}: {view}");
        }
        Ok(())
    }

    /// Closes the vendor's client.
    pub async fn close(self) {
        self.vendor.close().await;
    }
}
