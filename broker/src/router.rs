//! The broker's side of rumqttd's router: how connections register with it ([`Registrar`]),
//! how a link hands packets over and takes notifications ([`hand_over`], [`try_next`]), and
//! the broker's own publisher (last wills).
//!
//! rumqttd 0.20's public API offers `Router::new(..).spawn()`, which returns the router's
//! event channel, and `local::LinkBuilder`, which registers a connection on that channel with
//! the options a network client asked for (clean session, topic alias maximum). The channel's
//! element type is private to rumqttd, so it cannot be named outside it: [`Registrar`] keeps
//! it inside a closure.

use std::collections::{HashSet, VecDeque};
use std::future::Future as _;
use std::pin::pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::debug;

use crate::metrics::BrokerMetrics;

/// Client-id prefix of the broker's own connections; refused to anyone else.
pub(crate) use crate::reserved::INTERNAL_PREFIX;

/// The Topic Alias Maximum the broker announces in its CONNACK: how many topic aliases an
/// MQTT 5 client may set. The front end resolves them (the router never sees one), keeping
/// each alias's topic for the connection: at most this many topics of up to
/// `max_payload_size` each (1 MiB by default), where rumqttd's own maximum, 4096, let one
/// connection hold 64 MiB. A vehicle publishes on four topics.
pub(crate) const TOPIC_ALIAS_MAX: u16 = 64;

/// How long a link waiting for the router to take its buffer yields before it sleeps between
/// checks (see [`wait_for_router`]): the router usually takes a batch within microseconds; a
/// router that is behind is better left alone.
const SPIN: Duration = Duration::from_micros(200);

/// Longest a connection waits for the router to take its previous batch (see [`hand_over`]).
const HAND_OVER_PATIENCE: Duration = Duration::from_secs(10);

/// What a connection asks the router for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkRequest<'a> {
    /// The MQTT client id.
    pub(crate) client_id: &'a str,
    /// Clean session (3.1.1) / clean start (5).
    pub(crate) clean_session: bool,
}

impl<'a> LinkRequest<'a> {
    /// One of the broker's own links: a clean session.
    pub(crate) const fn internal(client_id: &'a str) -> Self {
        LinkRequest {
            client_id,
            clean_session: true,
        }
    }
}

/// A registered connection: its two link halves and the router's CONNACK.
pub(crate) type Registered = (LinkTx, LinkRx, Notification);

/// The router did not register a connection (it is full, or gone). rumqttd's own
/// `LinkError` is over 800 bytes; this keeps its message only.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct LinkRefused(pub(crate) String);

type Connect = dyn Fn(LinkRequest<'_>) -> Result<Registered, LinkRefused> + Send + Sync;

/// Registers connections with one router. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Registrar {
    connect: Arc<Connect>,
    names: Arc<NamePool>,
}

/// The names of the links no client knows by name (a clean session's own link, a shared
/// subscription group's), reused.
///
/// rumqttd 0.20's router never forgets a client id it registered: a link that disconnects
/// leaves an entry in its "graveyard" (a persistent session's state, or a clean session's last
/// ten connection events), removed only when a link of the same id registers again. Registered
/// under the clients' own ids (random for most tools: `mosquitto_sub`'s `mosq-...`), those
/// entries grow with every connection that ever had a link, ≈0.7 KiB each. Under names taken
/// from this pool, given back when the link is gone and taken again first, they are as many
/// as the most such links ever open at once.
#[derive(Debug, Default)]
struct NamePool {
    /// Numbers given back.
    free: std::sync::Mutex<Vec<u32>>,
    /// Numbers made so far: the names the router knows.
    made: AtomicU32,
    /// Where the count of names made is reported, once set.
    metrics: OnceLock<BrokerMetrics>,
}

/// The subscription filters clients made the router keep, bounded.
///
/// rumqttd 0.20's router gives every new filter a commit log (≈4 KiB when empty, up to
/// `max_segment_count` × `max_segment_size` when full) and never frees one, even once nobody
/// subscribes to it: a client subscribing to ever new filters (10 000 in a fraction of a
/// second, 100 per connection) grows the broker for good. So the front end keeps the set of
/// filters clients subscribed through the router (own links, shared groups' links), and a new
/// one beyond the bound is refused; a filter the router already keeps is never refused. The
/// broker's own links (mirror, bridge in-process, devices' command link) are not counted:
/// their filters are few and fixed.
#[derive(Debug)]
pub(crate) struct FilterBudget {
    /// At most this many filters (0: no bound).
    most: usize,
    known: std::sync::Mutex<HashSet<String>>,
    metrics: BrokerMetrics,
}

impl FilterBudget {
    /// No filters yet; at most `most` (0: no bound), counted in `metrics`.
    pub(crate) fn new(most: usize, metrics: BrokerMetrics) -> Self {
        FilterBudget {
            most,
            known: std::sync::Mutex::new(HashSet::new()),
            metrics,
        }
    }

    /// Whether `filter` may be handed to the router: one it keeps already, or a new one while
    /// fewer than the bound are kept (it is then counted as kept, for good).
    pub(crate) fn admit(&self, filter: &str) -> bool {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.contains(filter) {
            return true;
        }
        if self.most != 0 && known.len() >= self.most {
            return false;
        }
        known.insert(filter.to_owned());
        self.metrics
            .set_router_filters(u64::try_from(known.len()).unwrap_or(u64::MAX));
        true
    }

    /// The bound (0: none).
    pub(crate) fn most(&self) -> usize {
        self.most
    }
}

/// A link name from a [`Registrar`]'s pool, `fleetbeat-internal-link-{n}`, given back when
/// dropped: keep it as long as the link it names (drop it after the link's disconnect was
/// handed to the router; a link registered under a name still in use would replace it).
#[derive(Debug)]
pub(crate) struct LinkName {
    pool: Arc<NamePool>,
    n: u32,
    name: String,
}

impl LinkName {
    /// The name, to register a link under.
    pub(crate) fn as_str(&self) -> &str {
        &self.name
    }
}

impl Drop for LinkName {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.n);
    }
}

opaque_debug!(Registrar);

impl Registrar {
    /// Spawns rumqttd's router (its own thread, `router-0`) with `config`.
    ///
    /// The router thread cannot be stopped: it waits on a channel it holds a sender of
    /// itself. Once every connection is gone it sleeps, holding its commit logs, until the
    /// process exits.
    pub(crate) fn spawn(config: rumqttd::RouterConfig) -> Registrar {
        let router_tx = rumqttd::Router::new(0, config).spawn();
        Registrar {
            names: Arc::default(),
            connect: Arc::new(move |request: LinkRequest<'_>| {
                LinkBuilder::new(request.client_id, router_tx.clone())
                    .clean_session(request.clean_session)
                    // Never the client's Topic Alias Maximum: rumqttd 0.20 aliases what it
                    // forwards by subscription filter, not by topic, so under a wildcard every
                    // message would carry the first one's alias (wrong topics, or a protocol
                    // error in the client). Without, it forwards full topics.
                    .topic_alias_max(0)
                    .dynamic_filters(false)
                    .build()
                    .map_err(|err| LinkRefused(err.to_string()))
            }),
        }
    }

    /// A registrar that registers through `connect` instead of a router: for tests of what
    /// its callers do when the router refuses, or never answers.
    #[cfg(test)]
    pub(crate) fn from_fn(
        connect: impl Fn(LinkRequest<'_>) -> Result<Registered, LinkRefused> + Send + Sync + 'static,
    ) -> Registrar {
        Registrar {
            connect: Arc::new(connect),
            names: Arc::default(),
        }
    }

    /// A name for a link no client knows by name (see [`LinkName`]): one given back before, if
    /// any, else a new one.
    pub(crate) fn link_name(&self) -> LinkName {
        let reused = self
            .names
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let n = reused.unwrap_or_else(|| {
            let n = self.names.made.fetch_add(1, Ordering::AcqRel);
            if let Some(metrics) = self.names.metrics.get() {
                metrics.set_link_names(u64::from(n) + 1);
            }
            n
        });
        LinkName {
            pool: Arc::clone(&self.names),
            n,
            name: format!("{INTERNAL_PREFIX}link-{n}"),
        }
    }

    /// How many names [`Self::link_name`] has made: the most links under such names that
    /// were open at once.
    pub(crate) fn link_names(&self) -> u32 {
        self.names.made.load(Ordering::Acquire)
    }

    /// Reports the count of [`Self::link_name`]'s names to `metrics` from now on.
    pub(crate) fn report_link_names(&self, metrics: &BrokerMetrics) {
        metrics.set_link_names(u64::from(self.link_names()));
        let _ = self.names.metrics.set(metrics.clone());
    }

    /// Registers a connection. Blocks until the router answers (rumqttd's `build` waits on a
    /// synchronous channel, and a router that died with the request queued never answers):
    /// call it through [`Self::link`] or [`Self::link_detached`] from async code.
    fn link_blocking(&self, request: LinkRequest<'_>) -> Result<Registered, LinkRefused> {
        (self.connect)(request)
    }

    /// Registers an internal link for `client_id` on a thread of its own, so that the caller
    /// can give up waiting (a timeout around it): a router that died with the request in its
    /// queue never answers, and that thread then waits until the process ends (it is not a
    /// tokio thread: no runtime waits for it at shutdown). One thread per call: for the
    /// embedding program's few links, not for connections.
    pub(crate) async fn link_detached(&self, client_id: &str) -> Result<Registered, LinkRefused> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let registrar = self.clone();
        let id = client_id.to_owned();
        std::thread::Builder::new()
            .name("fleetbeat-link".into())
            .spawn(move || {
                // The caller may have given up meanwhile: the link is then dropped with the
                // answer.
                let _ = answer.send(registrar.link_blocking(LinkRequest::internal(&id)));
            })
            .map_err(|err| LinkRefused(format!("cannot start the registration thread: {err}")))?;
        answered.await.unwrap_or_else(|_| {
            Err(LinkRefused(
                "the registration thread ended without an answer".to_owned(),
            ))
        })
    }

    /// Registers a connection without stalling the other tasks of a multi-threaded runtime.
    pub(crate) fn link(&self, request: LinkRequest<'_>) -> Result<Registered, LinkRefused> {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.link_blocking(request))
            }
            _ => self.link_blocking(request),
        }
    }
}

/// The broker's own connection for publishing last wills.
///
/// A will is published on behalf of a connection whose link may already be gone (the router
/// dropped it), so it goes through this separate link. It is handed to the router at QoS 0,
/// which loses nothing: rumqttd forwards at the subscription's QoS and stores a retained will
/// either way, and the will's own QoS travels with it (`qos::mark`) so that it is delivered
/// at min(will QoS, granted QoS), as any publish.
pub(crate) struct WillPublisher {
    tx: Mutex<LinkTx>,
    /// Whether a retained will carries `carry::RETAINED`.
    retain_wanted: crate::carry::RetainWanted,
}

opaque_debug!(WillPublisher);

impl WillPublisher {
    /// Registers the publisher with the router; `rx` must be drained by the caller.
    pub(crate) fn new(
        registrar: &Registrar,
        client_id: &str,
        retain_wanted: crate::carry::RetainWanted,
    ) -> Result<(WillPublisher, LinkRx), LinkRefused> {
        let (tx, rx, _connack) = registrar.link(LinkRequest::internal(client_id))?;
        let publisher = WillPublisher {
            tx: Mutex::new(tx),
            retain_wanted,
        };
        Ok((publisher, rx))
    }

    /// Publishes `payload` on `topic` as published at `qos`, retained if `retain`, with the
    /// will's MQTT 5 `properties`, from `origin` (its client, if that has a No Local
    /// subscription: `carry::ORIGIN`).
    pub(crate) async fn publish(
        &self,
        topic: Bytes,
        payload: Bytes,
        retain: bool,
        qos: u8,
        mut properties: Option<PublishProperties>,
        origin: Option<&str>,
    ) -> Result<(), LinkError> {
        crate::qos::mark(&topic, qos, &mut properties);
        let retained = self.retain_wanted.mark(retain);
        crate::carry::mark(retained, origin, &mut properties);
        crate::expiry::carry_retained(retain, &mut properties);
        let publish = Publish::new(topic, payload, retain);
        self.tx
            .lock()
            .await
            .send(Packet::Publish(publish, properties))
            .await
            .map(drop)
    }
}

/// Reads and discards what the router sends to a publish-only link, so its queue stays empty.
pub(crate) async fn drain(mut rx: LinkRx, name: &'static str) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(err) => {
                debug!(link = name, cause = %err, "internal link closed");
                break;
            }
        }
    }
}

/// Hands `batch` to the router through `tx`, emptying it.
///
/// rumqttd's public way to signal new data is `LinkTx::send`, one notification per call, and
/// the router takes the link's whole buffer per notification. So a connection hands over one
/// batch at a time: while the buffer still holds the previous batch (the router has not taken
/// it yet), it waits. Without that wait a connection that reads faster than the router routes
/// (a flood) piles packets into the buffer without bound: memory grows, and the router spends
/// ever longer on one connection's backlog while nothing is delivered to subscribers, whose
/// commit-log cursors then fall behind the retained segments and lose messages. Waiting
/// instead leaves the packets in the socket, so TCP pushes back on the sender.
///
/// The router has no signal for "buffer taken": the wait is [`wait_for_router`]'s. After
/// [`HAND_OVER_PATIENCE`] it gives up waiting and appends to the buffer (the router still
/// takes it with the pending notification), so a stuck router cannot hang a connection's
/// teardown.
pub(crate) async fn hand_over(
    tx: &mut LinkTx,
    batch: &mut Vec<Packet>,
) -> Result<(), HandOverError> {
    if batch.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let deadline = started + HAND_OVER_PATIENCE;
    // The batch stays in its `Vec` (on the heap) until it goes: a packet held across the wait
    // would be ≈400 bytes of every connection task's state for as long as it lives.
    loop {
        {
            let mut buffer = tx.buffer();
            if buffer.is_empty() {
                let last = append_all_but_last(&mut buffer, batch);
                drop(buffer);
                return last.map_or(Ok(()), |last| send_now(tx, last));
            }
            if Instant::now() >= deadline {
                // No notification of its own: the router takes these with the one still
                // pending, and a stuck router's channel may be full (a send would block).
                buffer.extend(batch.drain(..));
                return Ok(());
            }
        }
        wait_for_router(started).await;
    }
}

/// Appends `batch` but its last packet to a link's `buffer`, emptying `batch`, and returns
/// that packet: the caller sends it with [`send_now`], one notification for the batch (the
/// router takes the whole buffer for it).
pub(crate) fn append_all_but_last(
    buffer: &mut VecDeque<Packet>,
    batch: &mut Vec<Packet>,
) -> Option<Packet> {
    let last = batch.pop();
    buffer.extend(batch.drain(..));
    last
}

/// Hands `packet` to the router through `tx`, without an `await`.
///
/// rumqttd 0.20's `LinkTx::send` is `async` but never waits: it appends to the link's buffer
/// and notifies the router on a channel with a blocking send. Awaited, its future (which holds
/// the packet) would be part of the caller's state; in a connection's task, for as long as the
/// connection lives. So it is polled once here. Should a later rumqttd make it wait, the
/// packet is refused ([`HandOverError::Waited`]) rather than lost unnoticed.
pub(crate) fn send_now(tx: &mut LinkTx, packet: Packet) -> Result<(), HandOverError> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(tx.send(packet)).poll(&mut cx) {
        Poll::Ready(Ok(_)) => Ok(()),
        Poll::Ready(Err(err)) => Err(HandOverError::Gone(err.to_string())),
        Poll::Pending => Err(HandOverError::Waited),
    }
}

/// Why a packet did not reach the router.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandOverError {
    /// The router's channel is closed: rumqttd's `LinkError`, kept as its message (the error
    /// itself is over 800 bytes).
    #[error("the router is gone: {0}")]
    Gone(String),
    /// `LinkTx::send` did not complete at once (see [`send_now`]).
    #[error("rumqttd's LinkTx::send waited, which this broker does not expect")]
    Waited,
}

/// One pause of a link waiting, since `started`, for the router to take its buffer: a yield to
/// other tasks for the first [`SPIN`], a millisecond's sleep after that.
pub(crate) async fn wait_for_router(started: Instant) {
    if started.elapsed() < SPIN {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The next notification if one is ready now, without waiting.
pub(crate) fn try_next(rx: &mut LinkRx) -> Option<Notification> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(rx.next()).poll(&mut cx) {
        Poll::Ready(Ok(notification)) => notification,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BrokerConfig;

    fn publish(payload: &'static str) -> Packet {
        Packet::Publish(Publish::new("fleet/f/v/hb", payload, false), None)
    }

    /// A router that never takes a link's buffer cannot hang a hand-over: after
    /// [`HAND_OVER_PATIENCE`] the batch is appended without a notification of its own, since
    /// the router's channel may be full and a send on it would block the worker thread.
    #[test]
    fn a_stuck_router_cannot_hang_a_hand_over() {
        // A rendezvous channel nobody receives on: any send on it blocks for good.
        let (router_tx, router_rx) = flume::bounded(0);
        let buffer = Arc::new(parking_lot::Mutex::new(VecDeque::from([publish(
            "previous",
        )])));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let link_buffer = Arc::clone(&buffer);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("a runtime");
            let mut tx = LinkTx::new(7, router_tx, link_buffer);
            let mut batch = vec![publish("a"), publish("b")];
            let handed = runtime.block_on(async {
                // The clock moves only while the hand-over waits (paused time, moved by hand:
                // its first waits are yields, which never leave the runtime idle).
                tokio::spawn(async {
                    loop {
                        tokio::time::advance(Duration::from_millis(100)).await;
                    }
                });
                hand_over(&mut tx, &mut batch).await
            });
            let _ = done_tx.send((handed.is_ok(), batch.len()));
        });
        let (handed, left) = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the hand-over returned instead of blocking on the router's channel");
        assert!(handed);
        assert_eq!(left, 0, "the batch was appended");
        assert_eq!(
            buffer.lock().len(),
            3,
            "behind the batch the router has not taken"
        );
        assert!(router_rx.try_recv().is_err(), "no notification of its own");
    }

    /// Publishes `messages` 100-byte payloads on `topic` while a subscriber to `filter` reads
    /// nothing, then one last one, and returns how many of them the subscriber got: what the
    /// filter's commit log kept for a subscriber that fell behind, plus what the router had
    /// queued for it before pausing it.
    fn kept_for_a_stalled_subscriber(topic: &str, filter: &str, messages: usize) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let registrar = Registrar::spawn(BrokerConfig::default().router_config(3));
        let link = |id: &str| {
            let (tx, rx, _connack) = registrar.link(LinkRequest::internal(id)).unwrap();
            (tx, rx)
        };
        let (mut reader_tx, mut reader) = link("reader");
        reader_tx.subscribe(filter).unwrap();
        let (mut marker_tx, mut marker) = link("marker");
        marker_tx.subscribe("done").unwrap();
        let (mut writer, _writer_rx) = link("writer");
        // The router handles one link's packets in order: once the marker is delivered, every
        // message before it is in the log.
        for i in 0..messages {
            writer
                .publish(topic.to_owned(), vec![i as u8; 100])
                .unwrap();
        }
        writer.publish("done", "").unwrap();
        loop {
            match marker.recv_deadline(deadline) {
                Ok(Some(Notification::Forward(_))) => break,
                Ok(_) => {}
                Err(err) => panic!("{filter}: no marker, {err}"),
            }
        }
        writer.publish(topic.to_owned(), "last").unwrap();
        let mut got = 0;
        loop {
            match reader.recv_deadline(deadline) {
                Ok(Some(Notification::Forward(forward))) => {
                    got += 1;
                    if forward.publish.payload == "last" {
                        return got;
                    }
                }
                Ok(Some(Notification::Unschedule)) => reader.ready().unwrap(),
                Ok(_) => {}
                Err(err) => panic!("{filter}: {got} messages read, then {err}"),
            }
        }
    }

    #[test]
    fn qos1_kinds_keep_a_small_window_heartbeats_a_large_one() {
        // 12 000 × 116 counted bytes (1.4 MB): within the heartbeats' 32 × 64 KiB, five times
        // the QoS 1 kinds' 4 × 64 KiB. Reconnects publish a will and an `online` on `status`
        // each: a log sized like the heartbeats' grew for hours in the soak (bench/README.md).
        const MESSAGES: usize = 12_000;
        let heartbeats = kept_for_a_stalled_subscriber("fleet/f/v/hb", "fleet/+/+/hb", MESSAGES);
        assert_eq!(
            heartbeats,
            MESSAGES + 1,
            "the heartbeats' log keeps them all"
        );
        for kind in ["status", "event", "ack", "cmd"] {
            let kept = kept_for_a_stalled_subscriber(
                &format!("fleet/f/v/{kind}"),
                &format!("fleet/+/+/{kind}"),
                MESSAGES,
            );
            // 2 500–3 100 measured: ≈2 200 in the log (4 segments of ≈550), the rest queued for
            // the reader before the router paused it. Without the QoS 1 pair: all 12 001.
            assert!(kept < 5_000, "{kind}: {kept} kept, the log is not bounded");
        }
    }

    // A measurement (run by hand, in release mode, see docs/broker.md):
    //   cargo test -p broker --release --lib measure_ -- --ignored --nocapture

    /// Resident memory of the process, in KiB.
    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// What one connection costs in rumqttd's router alone: N local links registered (no socket,
    /// no task of ours), each sent one CONNACK, against the process's resident memory.
    /// `FLEETBEAT_LINKS` sets N (default 10 000). The broker binary's whole per-connection cost is
    /// measured by `cargo bench -p broker --bench broker-bench` (BENCHMARKS.md).
    #[test]
    #[ignore = "a measurement, run by hand in release mode"]
    fn measure_rss_per_router_link() {
        let links: usize = std::env::var("FLEETBEAT_LINKS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(10_000);
        let config = BrokerConfig::default();
        let registrar = Registrar::spawn(config.router_config(8));
        let before = rss_kib();
        let mut held = Vec::with_capacity(links);
        for i in 0..links {
            let link = registrar
                .link(LinkRequest::internal(&format!("link-{i}")))
                .unwrap();
            held.push(link);
        }
        let after = rss_kib();
        println!(
            "{links} router links: {} KiB resident, {:.1} KiB each",
            after - before,
            (after - before) as f64 / links as f64
        );
    }
}
