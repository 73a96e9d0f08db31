//! Group commit of delivery events: the events that wait to be recorded are recorded together,
//! in arrival order, in one transaction, committed once (one fsync for the group instead of one
//! per event).
//!
//! One committer task per store ([`EventGroups`], started on the first event) takes whatever
//! events wait (at most [`MAX_GROUP`]), begins a write transaction, reads the group's orders and
//! looks its events up at once, judges the events one after the other in arrival order, makes
//! each new event's messages with the [`Address`] its caller handed over (for the flag and the
//! order's store the transaction read), writes it all and commits. Only then is each caller
//! answered with its own [`Recorded`]: `Store::record_event` never returns `Ok` before. The
//! callers take no part in between: an event costs its caller one hand-over and one answer.
//! Nothing waits on a timer: a lone event is committed at once, and the events that arrive
//! during a commit form the next group.
//!
//! The committer keeps the store's write connection from one group to the next while events
//! wait, for at most [`HOLD`]. A connection given back to sqlx's pool is tested (a ping, on a
//! task of its own) before anyone can take it again: a round trip to the database and a task
//! that each group paid for before its `BEGIN`. After `HOLD`, when no event waits, or after a
//! failure, it gives the connection back, so that the history writer and the other writes
//! (which queue for it fairly) get their turn.
//!
//! The failure semantics are those of one transaction per event:
//! - if the group's transaction cannot begin, nothing is recorded and every event of the group
//!   gets the error ([`StoreError::Group`]);
//! - if anything else fails (one event's statements, the commit, a PostgreSQL deadlock or
//!   serialization failure), the group is rolled back and its events are recorded again one
//!   per transaction (a group of one: the same judging and statements), in the same order, so
//!   that one bad event or a deadlock does not fail the others; each gets `Ok` only once its
//!   own transaction is committed. If one of those cannot begin either, it and the events after
//!   it get the error without being tried. An event whose caller went away is not tried alone.
//!
//! An event is never answered `Ok` unless the transaction that holds it committed, and never
//! lost: a caller answered with an error may try again (the store drops a duplicate).
//!
//! On PostgreSQL the group's transaction first locks the orders of all its events, sorted by
//! id (`SELECT ... ORDER BY order_id FOR UPDATE`): two bridges committing groups that share
//! orders take the locks in the same order and wait for each other instead of deadlocking.
//!
//! On SQLite the committer runs on a thread of its own ([`COMMIT_THREAD`], with a one-thread
//! Tokio runtime), not among the bridge's tasks: a group is a chain of steps that each wait for
//! the previous one (every statement goes to sqlx's SQLite thread and back), and on the
//! bridge's runtime each step queued again behind whatever else was ready there (the MQTT
//! sessions, the emits), while the other events waited for the group. SQLite's connections
//! are threads of sqlx's, tied to no runtime. On PostgreSQL it stays a task of the runtime of
//! the first event: a connection's socket belongs to the runtime that opened it.
//!
//! The committer drains what it accepted when the store closes (`Store::close`); with no
//! committer (a closed store, no Tokio runtime) the caller records its event alone itself.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::{DeliveryEvent, FleetId, VehicleId};
use sqlx::Connection as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::backend::Backend;
use super::error::StoreError;
use super::ids::{ClientId, Enqueued};
use super::latency::{Histogram, Latencies};
use super::pool::{Db, DbConn, DbPool};
use crate::clock::now_ms;
use crate::domain::order::{EventFlag, OrderState, judge};

mod statements;

use super::order_row::OrderView;
use statements::NewEvent;

/// The most events one transaction records.
pub(crate) const MAX_GROUP: usize = 512;

/// How long the committer keeps the write connection while events keep coming (see the
/// module docs): a few groups, well under what one slice of the history writer holds it.
const HOLD: Duration = Duration::from_millis(20);

/// What an event's caller hands over to make the event's messages once it is judged: given
/// its flag (`None`: it moves its order the usual step) and the store that placed its order
/// (`None`: no such order), as the transaction read them, the messages to queue (recipient,
/// payload), one per recipient (a recipient listed twice counts once). Called by the
/// committer, once per try (an event tried again alone after its group failed may be judged
/// otherwise).
pub(crate) type Address = Box<dyn Fn(Option<EventFlag>, Option<&str>) -> Messages + Send + Sync>;

/// An event's messages: recipient and payload, one per recipient.
pub(crate) type Messages = Vec<(ClientId, Value)>;

/// The outcome of recording a delivery event (see `Store::record_event`).
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The event had been recorded before (a re-send): nothing was changed or queued.
    pub duplicate: bool,
    /// Why the event did not move its order the usual one step, if it did not.
    pub flag: Option<EventFlag>,
    /// Whether the order's state changed.
    pub advanced: bool,
    /// The order's state after the event (`None`: unknown order, or a duplicate).
    pub state: Option<OrderState>,
    /// The order's store (`None`: unknown order, or a duplicate).
    pub store: Option<String>,
    /// The order as the event left it, without its timeline (`None`: unknown order, or a
    /// duplicate): read in the event's transaction, so announcing the change needs no read.
    pub(crate) order: Option<OrderView>,
    /// The messages queued, one per recipient, to emit now that they are committed.
    pub messages: Vec<Enqueued>,
}

/// What recording one event in a transaction did (committed once the transaction is).
struct Written {
    /// A re-sent event: nothing was changed or queued.
    duplicate: bool,
    /// Why it did not move its order the usual step, if it did not.
    flag: Option<EventFlag>,
    /// The order's state before the event, if the order exists.
    current: Option<OrderState>,
    /// Its state after, if the event moved it.
    next: Option<OrderState>,
    /// The order as the event left it (no timeline), if the order exists.
    order: Option<OrderView>,
    /// The messages queued, with their ids, in the order [`Address`] made them.
    queued: Vec<Enqueued>,
}

impl Written {
    /// A re-sent event.
    fn duplicate() -> Self {
        Self {
            duplicate: true,
            flag: None,
            current: None,
            next: None,
            order: None,
            queued: Vec::new(),
        }
    }

    /// The caller's outcome of `vehicle`'s `event`, committed.
    fn recorded(self, vehicle: &VehicleId, event: &DeliveryEvent) -> Recorded {
        if self.duplicate {
            return Recorded {
                duplicate: true,
                flag: None,
                advanced: false,
                state: None,
                store: None,
                order: None,
                messages: Vec::new(),
            };
        }
        if let Some(flag) = self.flag {
            warn!(%vehicle, order = %event.order, kind = event.kind.as_str(), seq = event.seq, %flag, "delivery event recorded with a flag");
        }
        Recorded {
            duplicate: false,
            flag: self.flag,
            advanced: self.next.is_some(),
            state: self.next.or(self.current),
            store: self.order.as_ref().map(|o| o.store.clone()),
            order: self.order,
            messages: self.queued,
        }
    }
}

/// A delivery event waiting to be recorded in a group.
pub(super) struct Request {
    /// The vehicle that reported it.
    vehicle: VehicleId,
    /// The vehicle's fleet.
    fleet: FleetId,
    /// The event.
    event: DeliveryEvent,
    /// What makes its messages.
    address: Address,
    /// Where its outcome goes.
    answer: oneshot::Sender<Result<Recorded, StoreError>>,
    /// When it was handed over.
    handed: Instant,
}

/// How the delivery events were committed so far, as `Store::event_groups` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Transactions committed that held delivery events.
    pub commits: u64,
    /// Delivery events committed in them.
    pub events: u64,
    /// The most events one of them held.
    pub largest: u64,
    /// How long each committed event took from its hand-over to the store (its wait for
    /// the group before, its own group's transaction) until it was committed.
    pub latency: Latencies,
}

/// The counters behind [`GroupStats`].
#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    events: AtomicU64,
    largest: AtomicU64,
    latency: Histogram,
}

impl Counters {
    /// A transaction holding `events` events was committed.
    fn committed(&self, events: usize) {
        let events = events as u64;
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(events, Ordering::Relaxed);
        self.largest.fetch_max(events, Ordering::Relaxed);
    }
}

/// The store's group committer: the channel to its task, which starts with the first event.
#[derive(Default)]
pub(super) struct EventGroups {
    slot: Mutex<Slot>,
    counters: Arc<Counters>,
}

#[derive(Default)]
enum Slot {
    /// No committer runs (no event yet, or its runtime ended).
    #[default]
    Idle,
    /// The committer runs.
    Running {
        requests: mpsc::UnboundedSender<Request>,
        ended: Ended,
    },
    /// The store is closed: events are recorded alone (and fail, the pools being closed).
    Closed,
}

impl EventGroups {
    /// Records `event` of `vehicle` of `fleet`, its messages made by `address`, in the
    /// committer's next group (the committer is started on `write`, a store on `backend`, if
    /// none runs); alone, in a transaction of its own, if there is no committer (the store is
    /// closed, or there is no Tokio runtime to run one).
    ///
    /// # Errors
    /// [`StoreError`] if it was not committed (see the module docs): the caller may try again.
    pub(super) async fn record(
        &self,
        vehicle: &VehicleId,
        fleet: &FleetId,
        event: &DeliveryEvent,
        address: Address,
        write: &DbPool,
        backend: Backend,
    ) -> Result<Recorded, StoreError> {
        let (answer, outcome) = oneshot::channel();
        let request = Request {
            vehicle: vehicle.clone(),
            fleet: fleet.clone(),
            event: event.clone(),
            address,
            answer,
            handed: Instant::now(),
        };
        match self.submit(request, write, backend) {
            None => outcome.await.unwrap_or(Err(StoreError::NotRecorded(
                "the store's committer stopped before answering",
            ))),
            Some(request) => {
                let mut conn = write.acquire().await?;
                alone(&mut conn, backend, &request).await?
            }
        }
    }

    /// Hands `request` to the committer, started if none runs; gives it back (`Some`) if
    /// there is no committer.
    fn submit(&self, mut request: Request, write: &DbPool, backend: Backend) -> Option<Request> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Slot::Running { requests, .. } = &*slot {
            match requests.send(request) {
                Ok(()) => return None,
                // Its runtime or thread ended (or it panicked): start another one.
                Err(mpsc::error::SendError(back)) => request = back,
            }
        }
        if matches!(*slot, Slot::Closed) {
            return Some(request);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Some(request);
        };
        let (requests, rx) = mpsc::unbounded_channel();
        let committer = Committer {
            counters: Arc::clone(&self.counters),
            write: write.clone(),
            backend,
            requests: rx,
        };
        let Some(ended) = start(committer, &runtime) else {
            return Some(request);
        };
        // Cannot fail: the receiver is in the committer just started.
        let unsent = requests.send(request).err().map(|back| back.0);
        *slot = Slot::Running { requests, ended };
        unsent
    }

    /// How the delivery events were committed so far.
    pub(super) fn stats(&self) -> GroupStats {
        GroupStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            events: self.counters.events.load(Ordering::Relaxed),
            largest: self.counters.largest.load(Ordering::Relaxed),
            latency: self.counters.latency.snapshot(),
        }
    }

    /// Stops the committer after it has recorded and answered every event it accepted; the
    /// events that come later are recorded alone.
    pub(super) async fn close(&self) {
        let slot = std::mem::replace(
            &mut *self.slot.lock().unwrap_or_else(PoisonError::into_inner),
            Slot::Closed,
        );
        if let Slot::Running { requests, ended } = slot {
            drop(requests);
            ended.wait().await;
        }
    }
}

/// The name of the SQLite committer's thread (see the module docs).
const COMMIT_THREAD: &str = "fleetbeat-commit";

/// What ends when a committer has ended: its task, or its thread.
enum Ended {
    /// A task of the runtime of the first event (PostgreSQL).
    Task(JoinHandle<()>),
    /// Completes (sent, or dropped if the committer panicked) when the thread's committer
    /// returns, whatever runtime waits for it.
    Thread(oneshot::Receiver<()>),
}

impl Ended {
    /// Waits until the committer has ended: drained what it accepted, or panicked (logged),
    /// or its runtime ended (nothing to drain).
    async fn wait(self) {
        match self {
            Self::Task(task) => {
                let _ = task.await;
            }
            Self::Thread(ended) => {
                let _ = ended.await;
            }
        }
    }
}

/// Starts `committer`: on SQLite on a thread of its own, on PostgreSQL as a task of `runtime`
/// (see the module docs). `None` if no thread could be started (the events are then recorded
/// alone, and the next one tries again).
fn start(committer: Committer, runtime: &tokio::runtime::Handle) -> Option<Ended> {
    if committer.backend == Backend::Postgres {
        return Some(Ended::Task(runtime.spawn(committer.run())));
    }
    let own = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(own) => own,
        Err(cause) => {
            warn!(%cause, "no runtime for the group committer's thread: it runs among the tasks");
            return Some(Ended::Task(runtime.spawn(committer.run())));
        }
    };
    let (done, ended) = oneshot::channel::<()>();
    let started = std::thread::Builder::new()
        .name(COMMIT_THREAD.into())
        .spawn(move || {
            own.block_on(committer.run());
            // Dropped unsent if the committer panicked: `ended` completes either way.
            let _ = done.send(());
        });
    match started {
        Ok(_) => Some(Ended::Thread(ended)),
        Err(cause) => {
            warn!(%cause, "the group committer's thread did not start: events are recorded alone");
            None
        }
    }
}

/// Why a group's transaction did not commit.
enum Failure {
    /// It could not begin: nothing was tried.
    Begin(StoreError),
    /// Something failed after it began: it was rolled back.
    Later(StoreError),
}

impl Request {
    /// Tells the caller the event's outcome (a caller that went away is not told).
    fn reply(self, outcome: Result<Recorded, StoreError>) {
        let _ = self.answer.send(outcome);
    }

    /// Whether the caller went away (nobody waits for the event).
    fn is_gone(&self) -> bool {
        self.answer.is_closed()
    }
}

/// The task that records groups of events (see the module docs).
struct Committer {
    counters: Arc<Counters>,
    write: DbPool,
    backend: Backend,
    requests: mpsc::UnboundedReceiver<Request>,
}

impl Committer {
    /// Records groups until every sender is gone and what was accepted is answered.
    async fn run(mut self) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while self.requests.recv_many(&mut group, MAX_GROUP).await > 0 {
            let mut conn = match self.write.acquire().await {
                Ok(conn) => conn,
                Err(err) => {
                    fail_all(std::mem::take(&mut group), err.into());
                    continue;
                }
            };
            let held = Instant::now();
            loop {
                let healthy = self.commit(&mut conn, &mut group).await;
                group.clear();
                // The callers just answered may hand over their next events before the next
                // group is taken (no timer: this only lets the woken tasks run; on SQLite's
                // thread they run beside it anyway).
                tokio::task::yield_now().await;
                if !healthy || held.elapsed() >= HOLD || self.requests.is_empty() {
                    break;
                }
                // Returns at once: events wait.
                self.requests.recv_many(&mut group, MAX_GROUP).await;
            }
        }
    }

    /// Records `group` on `conn` in one transaction, or, if that fails after it began, one
    /// event per transaction; answers every caller (and empties `group`). Whether everything
    /// went without an error (if not, the connection is given back to the pool, which tests
    /// it).
    async fn commit(&self, conn: &mut DbConn, group: &mut Vec<Request>) -> bool {
        if group.len() > 1 {
            match self.together(conn, group).await {
                Ok(written) => {
                    self.counters.committed(written.len());
                    // One clock read for the group: they were committed together.
                    let committed = Instant::now();
                    for (request, written) in group.drain(..).zip(written) {
                        let took = committed.saturating_duration_since(request.handed);
                        self.counters.latency.observe(took);
                        let recorded = written.recorded(&request.vehicle, &request.event);
                        request.reply(Ok(recorded));
                    }
                    return true;
                }
                Err(Failure::Begin(err)) => {
                    fail_all(std::mem::take(group), err);
                    return false;
                }
                Err(Failure::Later(cause)) => debug!(
                    events = group.len(), %cause,
                    "group of delivery events rolled back: recording them one per transaction"
                ),
            }
        }
        // A group of one, or a group that failed after it began.
        let mut healthy = group.len() == 1;
        let mut requests = group.drain(..);
        while let Some(request) = requests.next() {
            if request.is_gone() {
                continue;
            }
            match alone(conn, self.backend, &request).await {
                Ok(outcome) => {
                    if outcome.is_ok() {
                        self.counters.committed(1);
                        self.counters.latency.observe(request.handed.elapsed());
                    } else {
                        healthy = false;
                    }
                    request.reply(outcome);
                }
                Err(err) => {
                    fail_all(std::iter::once(request).chain(requests).collect(), err);
                    return false;
                }
            }
        }
        healthy
    }

    /// Records every event of `group` in one transaction and commits it; returns what it
    /// recorded of each, in order.
    async fn together(
        &self,
        conn: &mut DbConn,
        group: &[Request],
    ) -> Result<Vec<Written>, Failure> {
        let mut tx = begin(conn, self.backend).await.map_err(Failure::Begin)?;
        match record(&mut tx, self.backend, group).await {
            Ok(written) => {
                tx.commit()
                    .await
                    .map_err(|err| Failure::Later(err.into()))?;
                Ok(written)
            }
            Err(err) => {
                rollback(tx).await;
                Err(Failure::Later(err))
            }
        }
    }
}

/// Begins a write transaction on `conn`.
async fn begin(
    conn: &mut DbConn,
    backend: Backend,
) -> Result<sqlx::Transaction<'_, Db>, StoreError> {
    Ok(conn.begin_with(backend.begin_write()).await?)
}

/// How many times an event alone is tried when another transaction recorded it between its
/// read and its write (see `statements::RECORDED_MEANWHILE`): the next try sees it recorded.
const ALONE_TRIES: usize = 3;

/// Records `request`'s event in a transaction of its own (a group of one) and commits it.
/// The outer error: the transaction could not begin (nothing was tried); the inner one: its
/// statements or its commit failed (nothing of it was committed). If another bridge recorded
/// the same event meanwhile, it is tried again in a new transaction, which finds it recorded
/// (a duplicate).
async fn alone(
    conn: &mut DbConn,
    backend: Backend,
    request: &Request,
) -> Result<Result<Recorded, StoreError>, StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut tx = begin(conn, backend).await?;
        let written = match record(&mut tx, backend, std::slice::from_ref(request)).await {
            Ok(mut written) => written.pop(),
            Err(StoreError::NotRecorded(why))
                if why == statements::RECORDED_MEANWHILE && tries < ALONE_TRIES =>
            {
                rollback(tx).await;
                continue;
            }
            Err(err) => {
                rollback(tx).await;
                return Ok(Err(err));
            }
        };
        return Ok(match (tx.commit().await, written) {
            (Ok(()), Some(written)) => Ok(written.recorded(&request.vehicle, &request.event)),
            (Ok(()), None) => Err(StoreError::NotRecorded("recorded nothing")),
            (Err(err), _) => Err(err.into()),
        });
    }
}

/// Records `group` in `tx`, not committed: reads (and locks) its orders, looks its events
/// up, judges them one after the other in arrival order as one transaction per event would
/// (a duplicate, also of an event earlier in the group, changes nothing; an event that moves
/// its order moves it for the events after it), makes each new event's messages, then writes
/// it all.
async fn record(
    tx: &mut DbConn,
    backend: Backend,
    group: &[Request],
) -> Result<Vec<Written>, StoreError> {
    let now = now_ms();
    let mut ids: Vec<&str> = group.iter().map(|r| r.event.order.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let keys: Vec<(&VehicleId, &DeliveryEvent)> =
        group.iter().map(|r| (&r.vehicle, &r.event)).collect();
    let (mut orders, mut recorded) = statements::read(tx, backend, &ids, &keys).await?;

    let mut written = Vec::with_capacity(group.len());
    let mut new_events = Vec::with_capacity(group.len());
    let mut moved: HashSet<&str> = HashSet::new();
    let mut made: Vec<Messages> = Vec::with_capacity(group.len());
    for request in group {
        let (vehicle, event) = (&request.vehicle, &request.event);
        let key = (vehicle.as_str().to_owned(), event.seq, event.ts_ms);
        if let Some(first) = recorded.get(&key) {
            warn_if_reused(vehicle, event, first);
            written.push(Written::duplicate());
            continue;
        }
        recorded.insert(
            key,
            (
                event.order.as_str().to_owned(),
                event.kind.as_str().to_owned(),
            ),
        );
        let order = orders.get_mut(event.order.as_str());
        let (flag, next) = judge(
            order
                .as_ref()
                .map(|o| (o.state, o.vehicle.as_ref().map(VehicleId::as_str))),
            vehicle,
            event.kind,
        );
        let (current, order) = match order {
            Some(order) => {
                let current = order.state;
                if let Some(next) = next {
                    order.state = next;
                    order.updated_ms = now;
                    moved.insert(event.order.as_str());
                }
                (Some(current), Some(order.clone()))
            }
            None => (None, None),
        };
        made.push(one_per_recipient((request.address)(
            flag,
            order.as_ref().map(|o| o.store.as_str()),
        )));
        new_events.push(NewEvent {
            vehicle,
            fleet: &request.fleet,
            event,
            flag,
        });
        written.push(Written {
            duplicate: false,
            flag,
            current,
            next,
            order,
            queued: Vec::new(),
        });
    }

    let moved: Vec<(&str, OrderState)> = moved
        .into_iter()
        .filter_map(|id| orders.get(id).map(|o: &OrderView| (id, o.state)))
        .collect();
    let texts: Vec<String> = made
        .iter()
        .flatten()
        .map(|(_, payload)| payload.to_string())
        .collect();
    let rows: Vec<(&ClientId, &str)> = made
        .iter()
        .flatten()
        .zip(&texts)
        .map(|((client, _), text)| (client, text.as_str()))
        .collect();
    let mut queued = statements::write(tx, backend, &new_events, &moved, &rows, now)
        .await?
        .into_iter();
    drop(rows);
    let mut made = made.into_iter();
    for written in written.iter_mut().filter(|w| !w.duplicate) {
        written.queued = made
            .next()
            .unwrap_or_default()
            .into_iter()
            .zip(queued.by_ref())
            .map(|((client, payload), id)| Enqueued {
                client,
                id,
                payload,
            })
            .collect();
    }
    Ok(written)
}

/// `messages` with one message per recipient: the first for a recipient listed twice.
fn one_per_recipient(messages: Messages) -> Messages {
    let mut one: Messages = Vec::with_capacity(messages.len());
    for (client, payload) in messages {
        if !one.iter().any(|(c, _)| *c == client) {
            one.push((client, payload));
        }
    }
    one
}

/// Answers every request of `group` with `err` (shared if there are several).
fn fail_all(mut group: Vec<Request>, err: StoreError) {
    if group.len() == 1
        && let Some(request) = group.pop()
    {
        request.reply(Err(err));
        return;
    }
    let err = Arc::new(err);
    for request in group {
        request.reply(Err(StoreError::Group(Arc::clone(&err))));
    }
}

/// Ends `tx` without committing it.
async fn rollback(tx: sqlx::Transaction<'_, Db>) {
    if let Err(err) = tx.rollback().await {
        // sqlx rolls it back before the connection's next use; the committer gives a
        // connection back to the pool (which tests it) after any failure.
        debug!(cause = %err, "rollback failed");
    }
}

/// Logs a re-sent event whose number was first recorded with other content (`first`: its
/// order and kind); the first one is kept.
fn warn_if_reused(vehicle: &VehicleId, event: &DeliveryEvent, first: &(String, String)) {
    let (order, kind) = first;
    if order != event.order.as_str() || kind != event.kind.as_str() {
        warn!(
            %vehicle, seq = event.seq, ts_ms = event.ts_ms,
            first = %format!("{order} {kind}"),
            now = %format!("{} {}", event.order, event.kind.as_str()),
            "delivery event number reused with other content: kept the first"
        );
    }
}

#[cfg(test)]
mod tests;
