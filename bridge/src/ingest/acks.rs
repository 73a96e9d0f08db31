//! The PUBACKs of the events session, released strictly in the order the broker sent the
//! messages, each only once what it carries is handled: a delivery event once it is committed
//! to the store.
//!
//! Brokers expect a subscriber's PUBACKs in order (rumqttd 0.20 drops a link that acknowledges
//! out of order, and sends it everything again). So a delivery event whose commit fails is
//! neither skipped (acknowledging the messages after it) nor a reason to reconnect: the
//! [`AckReleaser`] retries it with a backoff ([`RETRY_FIRST`], doubling up to [`RETRY_MAX`]),
//! while the messages behind it wait their turn, handled but unacknowledged, and the broker
//! and the vehicles keep what is not acknowledged. At most [`CAPACITY`] messages wait here;
//! beyond that the MQTT task waits too, and the broker keeps the rest (rumqttd sends a link at
//! most 100 unacknowledged messages, mosquitto 20: neither comes near the bound).
//!
//! A message received on a connection that has ended since is never acknowledged on the next
//! one (the broker would take the stray PUBACK for another message's, or drop the link): the
//! broker sends it again on the new one, where it is handled again (the store drops the
//! duplicate event).
//!
//! Delivery events are committed several at once, each in a task of the releaser, so that the
//! store records those that arrive together in one transaction (`store::group`): at most one
//! per vehicle at a time (a vehicle's next event starts once the one before it is committed),
//! so each vehicle's events are recorded in the order they came; the PUBACKs still leave in
//! order, each once its own event, and every one before it, is done with.
//!
//! While the store cannot write and no event is being retried, the releaser probes it
//! (`Store::probe_write`) on the same backoff, so that `/readyz` sees it recover even when
//! nothing else writes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Publish, QoS};
use shared::{DeliveryEvent, Topic, VehicleId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::domain::Hub;
use crate::metrics::{Counter, Metrics, Rejection};
use crate::store::StoreError;
use crate::view::emit::Outlet;
use crate::view::order;

/// Messages that may wait for their PUBACK here before the MQTT task waits too.
pub(crate) const CAPACITY: usize = 1024;

/// The first wait before a failed commit is tried again.
pub(crate) const RETRY_FIRST: Duration = Duration::from_millis(100);

/// The longest wait between two tries of a commit (the backoff doubles up to it).
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(5);

/// A delivery event, verified, to commit before its message is acknowledged.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// Where it was published.
    pub(crate) topic: Topic,
    /// The event.
    pub(crate) event: DeliveryEvent,
}

/// What the MQTT task made of a message of the events session.
#[derive(Debug)]
pub(crate) enum Handled {
    /// Handled: acknowledged in its turn, after its delivery event (if any) is committed.
    Now(Option<Delivery>),
    /// Held until its vehicle's key is known (`ingest::inbox`): handled then, and the answer
    /// (its delivery event, if any) comes on this channel. Until it comes, the message and
    /// every one behind it wait unacknowledged; if the sender is dropped (its connection ended,
    /// the bridge stops) it is never acknowledged: the broker sends it again.
    Later(oneshot::Receiver<Option<Delivery>>),
}

/// A message of the events session, handled, waiting for its PUBACK.
#[derive(Debug)]
struct Waiting {
    /// What to acknowledge (the packet id and QoS only), or `None` for a QoS 0 message.
    ack: Option<Publish>,
    /// The connection it came on.
    connection: u64,
    /// What became of it: its delivery event, committed before the PUBACK.
    handled: Handled,
}

/// The MQTT task's end of the queue: hands over handled messages in the order they came, and
/// says when the connection changes.
#[derive(Clone)]
pub(crate) struct AckQueue {
    tx: mpsc::Sender<Waiting>,
    connection: Arc<AtomicU64>,
    hub: Arc<Hub>,
}

/// The task's end: commits delivery events and releases the PUBACKs in order. Spawn
/// [`AckReleaser::run`].
pub(crate) struct AckReleaser {
    rx: mpsc::Receiver<Waiting>,
    events: EventCommit,
    client: AsyncClient,
}

/// What commits a delivery event, in a task of its own: the store through `hub`, the
/// emission on `io`, and the connection messages come on now.
#[derive(Clone)]
struct EventCommit {
    hub: Arc<Hub>,
    io: Arc<dyn Outlet>,
    connection: Arc<AtomicU64>,
}

/// A queue whose releaser commits delivery events through `hub`, emits them on `io` and
/// acknowledges through `client` (the events session's, with manual acks).
pub(crate) fn ack_queue(
    hub: Arc<Hub>,
    io: Arc<dyn Outlet>,
    client: AsyncClient,
) -> (AckQueue, AckReleaser) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    let connection = Arc::new(AtomicU64::new(0));
    let queue = AckQueue {
        tx,
        connection: Arc::clone(&connection),
        hub: Arc::clone(&hub),
    };
    let releaser = AckReleaser {
        rx,
        events: EventCommit {
            hub,
            io,
            connection,
        },
        client,
    };
    (queue, releaser)
}

impl AckQueue {
    /// The connection messages come on now.
    pub(crate) fn connection(&self) -> u64 {
        self.connection.load(Ordering::Acquire)
    }

    /// The connection ended, or a new one began: what came before is not acknowledged any
    /// more (the broker sends it again).
    pub(crate) fn new_connection(&self) {
        self.connection.fetch_add(1, Ordering::AcqRel);
    }

    /// Queues `publish`, received on `connection` and `handled`, for its PUBACK, after its
    /// delivery event is committed if it carries one. Nothing is queued for a QoS 0 message
    /// without a delivery event. Waits while [`CAPACITY`] messages wait already.
    pub(crate) async fn push(&self, publish: &Publish, connection: u64, handled: Handled) {
        let ack = (publish.qos != QoS::AtMostOnce).then(|| {
            // Only the packet id and QoS are needed to acknowledge: the payload is not kept.
            let mut ack = Publish::new("", publish.qos, Vec::new());
            ack.pkid = publish.pkid;
            ack
        });
        if ack.is_none() && matches!(handled, Handled::Now(None)) {
            return;
        }
        let metrics = self.hub.metrics();
        metrics.acks_waiting_delta(1);
        let waiting = Waiting {
            ack,
            connection,
            handled,
        };
        if self.tx.send(waiting).await.is_err() {
            // The releaser stopped (shutting down): not acknowledged, the broker keeps it.
            metrics.acks_waiting_delta(-1);
        }
    }
}

/// What became of a delivery event.
enum Commit {
    /// Committed, or found committed before.
    Done,
    /// Refused by the store as data: acknowledged and dropped, counted.
    Refused,
    /// Not committed, and its connection ended: not acknowledged, the broker sends it again.
    Stale,
    /// The bridge is stopping.
    Stopping,
}

/// A wait that doubles from [`RETRY_FIRST`] up to [`RETRY_MAX`].
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(RETRY_FIRST)
    }

    /// The wait now; the next one is twice as long, up to [`RETRY_MAX`].
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(RETRY_MAX);
        wait
    }
}

/// A message in the releaser, waiting for its PUBACK, with what is left to do before it.
struct Entry {
    /// What to acknowledge (the packet id and QoS only), or `None` for a QoS 0 message.
    ack: Option<Publish>,
    /// The connection it came on.
    connection: u64,
    state: State,
}

/// How far a message in the releaser got.
enum State {
    /// Held for its vehicle's key: its answer comes (`Handled::Later`).
    Held,
    /// Its delivery event waits for an earlier one of its vehicle to be committed.
    Queued(Delivery),
    /// Its delivery event is being committed (by a task of the releaser).
    Committing(VehicleId),
    /// Handled: acknowledged in its turn if `true`, never if `false` (the broker sends it
    /// again).
    Ready(bool),
}

/// What a task of the releaser reports, about the message with this number.
enum Progress {
    /// The answer of a held message came (`None`: given up, its sender dropped).
    Answered(Option<Option<Delivery>>),
    /// A delivery event's commit ended.
    Committed(Commit),
}

/// The messages in the releaser, in the order they came, and the tasks working on them.
///
/// Several delivery events are committed at once (so that the store records them in one
/// group), but at most one per vehicle: a vehicle's next event starts only once the one
/// before it is committed, so a vehicle's events are recorded in the order they came. The
/// PUBACKs still leave strictly in order.
#[derive(Default)]
struct Pipeline {
    /// The messages; the first has number `first`, the next `first + 1`, and so on.
    entries: VecDeque<Entry>,
    first: u64,
    /// For each vehicle, its delivery events queued or being committed.
    vehicles: HashMap<VehicleId, usize>,
    /// Answers awaited and commits under way, each reporting a message's number.
    tasks: JoinSet<(u64, Progress)>,
    /// The number of the message each task works on (to know which one a panicked task had).
    task_numbers: HashMap<tokio::task::Id, u64>,
    /// How many tasks are commits.
    commits: usize,
}

impl Pipeline {
    fn entry(&mut self, number: u64) -> Option<&mut Entry> {
        let index = usize::try_from(number.checked_sub(self.first)?).ok()?;
        self.entries.get_mut(index)
    }

    fn spawn(&mut self, number: u64, task: impl Future<Output = (u64, Progress)> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.task_numbers.insert(handle.id(), number);
    }
}

impl AckReleaser {
    fn metrics(&self) -> &Metrics {
        self.events.hub.metrics()
    }

    /// Releases the queue's messages in order until `cancel` fires or the queue's other end is
    /// gone (and what came is released). What is left is not acknowledged: the broker keeps it
    /// for the next run.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut pipeline = Pipeline::default();
        let mut open = true;
        // The next probe, while the store cannot write.
        let mut probe = Backoff::new();
        let mut probe_at: Option<Instant> = None;
        loop {
            if !self.release_ready(&mut pipeline, &cancel).await {
                break;
            }
            if !open && pipeline.entries.is_empty() {
                break;
            }
            if self.metrics().store().writable() {
                probe = Backoff::new();
                probe_at = None;
            } else if probe_at.is_none() {
                probe_at = Some(Instant::now() + probe.next());
            }
            let room = open && pipeline.entries.len() < CAPACITY;
            tokio::select! {
                () = cancel.cancelled() => break,
                waiting = self.rx.recv(), if room => match waiting {
                    Some(waiting) => self.admit(&mut pipeline, waiting, &cancel),
                    None => open = false,
                },
                Some(joined) = pipeline.tasks.join_next_with_id() => {
                    let (number, progress) = match joined {
                        Ok((id, done)) => {
                            pipeline.task_numbers.remove(&id);
                            done
                        }
                        Err(err) => {
                            let Some(number) = pipeline.task_numbers.remove(&err.id()) else {
                                continue;
                            };
                            error!(cause = %err, "a task of the PUBACK queue failed: its message is not acknowledged");
                            (number, Progress::Answered(None))
                        }
                    };
                    if !self.progress(&mut pipeline, number, progress, &cancel) {
                        break;
                    }
                }
                () = sleep_until(probe_at), if probe_at.is_some() && pipeline.commits == 0 => {
                    self.probe().await;
                    probe_at = None;
                }
            }
        }
        // What is under way ends here: not acknowledged, the broker sends it again.
        pipeline.tasks.shutdown().await;
        self.rx.close();
        let left = pipeline.entries.len() + self.rx.len();
        if left > 0 {
            debug!(
                left,
                "stopping with messages unacknowledged; the broker keeps them"
            );
            self.metrics()
                .acks_waiting_delta(-i64::try_from(left).unwrap_or(i64::MAX));
        }
    }

    /// Takes `waiting` into the pipeline: a delivery event starts its commit (unless an
    /// earlier one of its vehicle is not committed yet), a held message waits for its answer.
    fn admit(&self, pipeline: &mut Pipeline, waiting: Waiting, cancel: &CancellationToken) {
        let number = pipeline.first + pipeline.entries.len() as u64;
        pipeline.entries.push_back(Entry {
            ack: waiting.ack,
            connection: waiting.connection,
            state: State::Held,
        });
        match waiting.handled {
            Handled::Now(delivery) => self.handled(pipeline, number, delivery, cancel),
            Handled::Later(answer) => pipeline.spawn(number, async move {
                (number, Progress::Answered(answer.await.ok()))
            }),
        }
    }

    /// Message `number` is handled: commit its delivery event, if any, in its turn.
    fn handled(
        &self,
        pipeline: &mut Pipeline,
        number: u64,
        delivery: Option<Delivery>,
        cancel: &CancellationToken,
    ) {
        let Some(entry) = pipeline.entry(number) else {
            return;
        };
        let Some(delivery) = delivery else {
            entry.state = State::Ready(true);
            return;
        };
        let vehicle = delivery.topic.vehicle.clone();
        entry.state = State::Queued(delivery);
        let waiting = pipeline.vehicles.entry(vehicle.clone()).or_default();
        *waiting += 1;
        if *waiting == 1 {
            self.start_next(pipeline, &vehicle, cancel);
        }
    }

    /// Starts the commit of `vehicle`'s first queued delivery event (the ones of an ended
    /// connection are not committed: the broker sends them again).
    fn start_next(&self, pipeline: &mut Pipeline, vehicle: &VehicleId, cancel: &CancellationToken) {
        let current = self.events.connection();
        loop {
            let Some(number) = pipeline
                .entries
                .iter()
                .position(|e| matches!(&e.state, State::Queued(d) if d.topic.vehicle == *vehicle))
                .map(|index| pipeline.first + index as u64)
            else {
                pipeline.vehicles.remove(vehicle);
                return;
            };
            let Some(entry) = pipeline.entry(number) else {
                return;
            };
            let state = std::mem::replace(&mut entry.state, State::Committing(vehicle.clone()));
            let State::Queued(delivery) = state else {
                return;
            };
            if entry.connection != current {
                debug!(
                    topic = %delivery.topic.name(), seq = delivery.event.seq,
                    "not committed nor acknowledged: its connection ended, the broker sends it again"
                );
                entry.state = State::Ready(false);
                if !self.done_with(pipeline, vehicle) {
                    return;
                }
                continue;
            }
            let connection = entry.connection;
            let events = self.events.clone();
            let cancel = cancel.clone();
            pipeline.commits += 1;
            pipeline.spawn(number, async move {
                let commit = events.commit(&delivery, connection, &cancel).await;
                (number, Progress::Committed(commit))
            });
            return;
        }
    }

    /// One of `vehicle`'s delivery events is done with: whether it has more queued.
    fn done_with(&self, pipeline: &mut Pipeline, vehicle: &VehicleId) -> bool {
        match pipeline.vehicles.get_mut(vehicle) {
            Some(waiting) if *waiting > 1 => {
                *waiting -= 1;
                true
            }
            _ => {
                pipeline.vehicles.remove(vehicle);
                false
            }
        }
    }

    /// A task reported on message `number`; returns false if the bridge is stopping.
    fn progress(
        &self,
        pipeline: &mut Pipeline,
        number: u64,
        progress: Progress,
        cancel: &CancellationToken,
    ) -> bool {
        match progress {
            Progress::Answered(Some(delivery)) => self.handled(pipeline, number, delivery, cancel),
            Progress::Answered(None) => {
                if let Some(entry) = pipeline.entry(number) {
                    debug!(
                        pkid = entry.ack.as_ref().map(|a| a.pkid),
                        "not acknowledged: held for its vehicle's key until its connection ended"
                    );
                    entry.state = State::Ready(false);
                }
            }
            Progress::Committed(commit) => {
                pipeline.commits = pipeline.commits.saturating_sub(1);
                let Some(entry) = pipeline.entry(number) else {
                    return true;
                };
                let acknowledge = match commit {
                    Commit::Done | Commit::Refused => true,
                    Commit::Stale => false,
                    Commit::Stopping => return false,
                };
                let State::Committing(vehicle) =
                    std::mem::replace(&mut entry.state, State::Ready(acknowledge))
                else {
                    return true;
                };
                if self.done_with(pipeline, &vehicle) {
                    self.start_next(pipeline, &vehicle, cancel);
                }
            }
        }
        true
    }

    /// Acknowledges the handled messages at the head of the pipeline, in order. Returns false
    /// if the bridge is stopping.
    async fn release_ready(&self, pipeline: &mut Pipeline, cancel: &CancellationToken) -> bool {
        while let Some(entry) = pipeline.entries.front()
            && let State::Ready(acknowledge) = entry.state
        {
            let Some(entry) = pipeline.entries.pop_front() else {
                break;
            };
            pipeline.first += 1;
            self.metrics().acks_waiting_delta(-1);
            let Some(publish) = entry.ack.filter(|_| acknowledge) else {
                continue;
            };
            if entry.connection != self.events.connection() {
                debug!(
                    pkid = publish.pkid,
                    "not acknowledged: its connection ended, the broker sends it again"
                );
                continue;
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return false,
                sent = self.client.ack(&publish) => if let Err(err) = sent {
                    // Not acknowledged: the broker sends it again after a reconnect.
                    warn!(pkid = publish.pkid, cause = %err, "could not acknowledge an MQTT message");
                },
            }
        }
        true
    }

    /// Tries one write, to learn whether the store writes again.
    async fn probe(&self) {
        let health = self.metrics().store();
        match self.events.hub.probe_store().await {
            Ok(()) => health.succeeded(),
            Err(err) if err.is_outage() => {
                health.failed("probe", &err, self.metrics().acks_waiting());
            }
            Err(err) => warn!(cause = %err, "store probe failed"),
        }
    }
}

impl EventCommit {
    fn connection(&self) -> u64 {
        self.connection.load(Ordering::Acquire)
    }

    /// Commits `delivery`, received on `connection`, trying again after every failure of the
    /// store until it is committed, the store refuses it as data, the connection ends, or the
    /// bridge stops.
    async fn commit(
        &self,
        delivery: &Delivery,
        connection: u64,
        cancel: &CancellationToken,
    ) -> Commit {
        let metrics = self.hub.metrics();
        let mut backoff = Backoff::new();
        let mut tries: u32 = 0;
        loop {
            tries += 1;
            match store_delivery(&self.hub, &*self.io, delivery).await {
                Ok(()) => {
                    metrics.store().succeeded();
                    return Commit::Done;
                }
                Err(err) if !err.is_outage() => {
                    metrics.rejected(Rejection::Store);
                    error!(
                        topic = %delivery.topic.name(), seq = delivery.event.seq, cause = %err,
                        "delivery event refused by the store: acknowledged and dropped"
                    );
                    return Commit::Refused;
                }
                Err(err) => {
                    if tries == 1 {
                        metrics.count(Counter::EventsUnacked);
                    }
                    debug!(
                        topic = %delivery.topic.name(), seq = delivery.event.seq, tries, cause = %err,
                        "delivery event not stored; its PUBACK waits, it is tried again"
                    );
                    metrics
                        .store()
                        .failed("delivery event", &err, metrics.acks_waiting());
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return Commit::Stopping,
                () = tokio::time::sleep(backoff.next()) => {}
            }
            if self.connection() != connection {
                return Commit::Stale;
            }
            metrics.count(Counter::StoreRetries);
        }
    }
}

/// Records `delivery` durably through `hub` and queues it for its recipients, then emits it
/// to them on `io` (once committed). A duplicate (same vehicle, seq and device timestamp) is
/// found committed before and not queued again. Also used for parked delivery events
/// (`ingest::inbox`).
///
/// # Errors
/// [`StoreError`] if it was not committed ([`StoreError::is_outage`]: try again).
pub(crate) async fn store_delivery(
    hub: &Hub,
    io: &dyn Outlet,
    delivery: &Delivery,
) -> Result<(), StoreError> {
    let Delivery { topic, event } = delivery;
    let (owned_topic, owned_event) = (topic.clone(), event.clone());
    let payload =
        move |flag, store: Option<&str>| order::delivery(&owned_topic, &owned_event, store, flag);
    let messages = hub.record_delivery(topic, event, payload).await?;
    io.queued(hub.metrics(), &messages).await;
    Ok(())
}

/// Sleeps until `at` (forever if `None`).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use shared::{DeliveryKind, OrderId, Position};
    use sqlx::Connection as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::MqttEndpoint;
    use crate::domain::HubParts;
    use crate::domain::auth::Tokens;
    use crate::domain::fleet::Fleet;
    use crate::ingest::mqtt::{self, Session};
    use crate::store::{Store, StoreOptions};

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn the_backoff_doubles_up_to_its_bound() {
        let mut backoff = Backoff::new();
        let waits: Vec<u128> = (0..8).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    /// A broker of one connection that answers CONNECT and reports each PUBACK's packet id.
    async fn fake_broker(listener: TcpListener, acks: mpsc::UnboundedSender<u16>) {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        loop {
            while let Some(header) = shared::frame::frame(&buf) {
                let body = buf[header.header_len..header.total()].to_vec();
                match header.first >> 4 {
                    1 => {
                        let _ = socket.write_all(&[0x20, 2, 0, 0]).await;
                    }
                    4 if body.len() >= 2 => {
                        let _ = acks.send(u16::from_be_bytes([body[0], body[1]]));
                    }
                    _ => {}
                }
                buf.drain(..header.total());
            }
            let mut chunk = [0u8; 1024];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A message of the events session with packet id `pkid`.
    fn message(pkid: u16) -> Publish {
        let mut publish = Publish::new("fleet/demo/v-1/status", QoS::AtLeastOnce, Vec::new());
        publish.pkid = pkid;
        publish
    }

    fn delivery(seq: u32) -> Delivery {
        Delivery {
            topic: Topic::parse("fleet/demo/v-1/event").expect("topic"),
            event: DeliveryEvent {
                seq,
                order: OrderId::new("o-1").expect("order"),
                kind: DeliveryKind::Pickup,
                ts_ms: 1_000 + u64::from(seq),
                pos: Position::new(1, 2),
            },
        }
    }

    async fn locked(path: &std::path::Path) -> sqlx::SqliteConnection {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("connects");
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .expect("locks");
        conn
    }

    async fn unlock(mut conn: sqlx::SqliteConnection) {
        sqlx::query("ROLLBACK")
            .execute(&mut conn)
            .await
            .expect("unlocks");
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(WAIT, async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"));
    }

    /// A hub on `store` whose events session (client `client_id`) talks to a fake broker that
    /// reports every PUBACK it gets, and the ack queue's task running.
    struct Rig {
        hub: Arc<Hub>,
        queue: AckQueue,
        acks: mpsc::UnboundedReceiver<u16>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn rig(store: Store, client_id: &str) -> Rig {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let port = listener.local_addr().expect("address").port();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(fake_broker(listener, ack_tx));
        let endpoint = MqttEndpoint {
            host: "127.0.0.1".into(),
            port,
            credentials: None,
            tls: None,
        };
        let (client, mut eventloop) = mqtt::connect(
            &endpoint,
            client_id,
            Duration::from_secs(30),
            Session::Events,
        );
        tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        let hub = Arc::new(Hub::new(HubParts {
            metrics: Arc::default(),
            tokens: Tokens::new(&Tokens::demo_grants()).expect("tokens"),
            fleet: Fleet::default(),
            store,
            mqtt: client.clone(),
            command_timeout: Duration::from_secs(1),
        }));
        let (_layer, io) = socketioxide::SocketIo::builder().build_layer();
        let (queue, releaser) = ack_queue(Arc::clone(&hub), Arc::new(io), client);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(releaser.run(cancel.clone()));
        Rig {
            hub,
            queue,
            acks,
            cancel,
            task,
        }
    }

    /// Stops the ack queue's task and checks it ended without a panic.
    async fn stop(cancel: CancellationToken, task: tokio::task::JoinHandle<()>) {
        cancel.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("stops")
            .expect("no panic");
    }

    async fn next_ack(acks: &mut mpsc::UnboundedReceiver<u16>) -> u16 {
        tokio::time::timeout(WAIT, acks.recv())
            .await
            .expect("a PUBACK in time")
            .expect("the broker runs")
    }

    /// PUBACKs leave in order, a delivery event's only once it is committed (the messages
    /// behind it wait), and never for a message of a connection that has ended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pubacks_wait_for_the_commit_and_leave_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fleetbeat.db");
        let options = StoreOptions {
            busy_timeout: Duration::from_millis(50),
            ..StoreOptions::default()
        };
        let store = Store::open(path.to_str().expect("utf-8"), options)
            .await
            .expect("opens");
        let Rig {
            hub,
            queue,
            mut acks,
            cancel,
            task,
        } = rig(store.clone(), "acks-test").await;
        let health = || hub.metrics().store().writable();
        let connection = queue.connection();

        // A status, an event (its commit fails while the store is locked), another status.
        let lock = locked(&path).await;
        queue
            .push(&message(1), connection, Handled::Now(None))
            .await;
        queue
            .push(&message(2), connection, Handled::Now(Some(delivery(1))))
            .await;
        queue
            .push(&message(3), connection, Handled::Now(None))
            .await;
        assert_eq!(next_ack(&mut acks).await, 1);
        until("the failed commit is seen", || !health()).await;
        until("another try", || hub.metrics().store().failures() >= 2).await;
        assert!(acks.try_recv().is_err(), "acknowledged before it is stored");
        assert_eq!(hub.metrics().acks_waiting(), 2);
        unlock(lock).await;
        assert_eq!(next_ack(&mut acks).await, 2);
        assert_eq!(next_ack(&mut acks).await, 3);
        assert!(health());
        let stored = store
            .record_event(
                &delivery(1).topic.vehicle,
                &delivery(1).topic.fleet,
                &delivery(1).event,
                &[],
                &serde_json::json!({}),
            )
            .await
            .expect("records");
        assert!(
            stored.duplicate,
            "the event was committed before its PUBACK"
        );

        // The connection ends while an event waits: neither it nor what came with it is
        // acknowledged on the next connection; what comes on the next one is.
        let lock = locked(&path).await;
        queue
            .push(&message(4), connection, Handled::Now(Some(delivery(2))))
            .await;
        queue
            .push(&message(5), connection, Handled::Now(None))
            .await;
        until("the failed commit is seen", || !health()).await;
        queue.new_connection();
        queue
            .push(&message(1), queue.connection(), Handled::Now(None))
            .await;
        unlock(lock).await;
        assert_eq!(next_ack(&mut acks).await, 1);
        until("nothing waits", || hub.metrics().acks_waiting() == 0).await;
        assert!(acks.try_recv().is_err(), "a PUBACK of an ended connection");

        stop(cancel, task).await;
    }

    /// A message held for its vehicle's key holds the PUBACKs behind it until its answer
    /// comes; one given up (its sender dropped with its connection) is never acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_message_holds_the_pubacks_behind_it() {
        let store = crate::store::in_memory().await;
        let Rig {
            hub,
            queue,
            mut acks,
            cancel,
            task,
        } = rig(store, "held-test").await;
        let connection = queue.connection();

        let (answer, promise) = oneshot::channel();
        queue
            .push(&message(1), connection, Handled::Later(promise))
            .await;
        queue
            .push(&message(2), connection, Handled::Now(None))
            .await;
        until("both wait", || hub.metrics().acks_waiting() == 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(acks.try_recv().is_err(), "acknowledged while held");
        answer.send(None).expect("the releaser waits");
        assert_eq!(next_ack(&mut acks).await, 1);
        assert_eq!(next_ack(&mut acks).await, 2);

        // Given up: its connection ended; neither it nor what came with it is acknowledged.
        let (answer, promise) = oneshot::channel::<Option<Delivery>>();
        queue
            .push(&message(3), connection, Handled::Later(promise))
            .await;
        queue
            .push(&message(4), connection, Handled::Now(None))
            .await;
        queue.new_connection();
        drop(answer);
        queue
            .push(&message(5), queue.connection(), Handled::Now(None))
            .await;
        assert_eq!(next_ack(&mut acks).await, 5);
        until("nothing waits", || hub.metrics().acks_waiting() == 0).await;
        assert!(acks.try_recv().is_err(), "a given-up message acknowledged");

        stop(cancel, task).await;
    }
}
