//! Group commit of delivery events: the events that wait to be recorded are recorded together,
//! in arrival order, in one transaction, committed once (one fsync for the group instead of one
//! per event).
//!
//! One committer task per store ([`EventGroups`], started on the first event) takes whatever
//! events wait (at most [`MAX_GROUP`]), begins a write transaction and lends it to each event's
//! caller in turn ([`Turn`]): the caller records its event in it by the same per-event logic as
//! alone (`store::order`), with the messages it chose, and hands the transaction back. Once
//! every event had its turn, the committer commits and tells each caller [`ToCaller::Committed`]:
//! only then does `Store::record_event` return `Ok`. Nothing waits on a timer: a lone event is
//! committed at once, and the events that arrive during a commit form the next group.
//!
//! The failure semantics are those of one transaction per event:
//! - if the group's transaction cannot begin, nothing is recorded and every event of the group
//!   gets the error ([`StoreError::Group`]);
//! - if anything else fails (one event's statements, the commit, a PostgreSQL deadlock or
//!   serialization failure, a caller that went away during its turn), the group is rolled back
//!   and its events are recorded again one per transaction, in the same order, so that one bad
//!   event or a deadlock does not fail the others; each gets `Ok` only once its own transaction
//!   is committed. If one of those cannot begin either, it and the events after it get the error
//!   without being tried.
//!
//! An event is never answered `Ok` unless the transaction that holds it committed, and never
//! lost: a caller answered with an error may try again (the store drops a duplicate).
//!
//! On PostgreSQL the group's transaction first locks the orders of all its events, sorted by
//! id (`SELECT ... ORDER BY order_id FOR UPDATE`): two bridges committing groups that share
//! orders take the locks in the same order and wait for each other instead of deadlocking.
//!
//! The committer drains what it accepted when the store closes (`Store::close`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use shared::{DeliveryEvent, FleetId, VehicleId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::backend::Backend;
use super::error::StoreError;
use super::ids::{ClientId, MessageId};
use super::pool::{DbPool, DbTx};
use crate::clock::now_ms;
use crate::domain::order::{EventFlag, OrderState, judge};

mod statements;

use super::order_row::OrderView;
use statements::NewEvent;

/// The most events one transaction records.
pub(crate) const MAX_GROUP: usize = 512;

/// What recording one event in a transaction did (committed once the transaction is), alone
/// or in a group.
pub(super) struct Written {
    /// A re-sent event: nothing was changed or queued.
    pub(super) duplicate: bool,
    /// Why it did not move its order the usual step, if it did not.
    pub(super) flag: Option<EventFlag>,
    /// The order's state before the event, if the order exists.
    pub(super) current: Option<OrderState>,
    /// Its state after, if the event moved it.
    pub(super) next: Option<OrderState>,
    /// The order as the event left it (no timeline), if the order exists.
    pub(super) order: Option<OrderView>,
    /// The ids of the queued messages, in the order of the event's messages.
    pub(super) queued: Vec<MessageId>,
}

impl Written {
    /// A re-sent event.
    pub(super) fn duplicate() -> Self {
        Self {
            duplicate: true,
            flag: None,
            current: None,
            next: None,
            order: None,
            queued: Vec::new(),
        }
    }
}

/// A delivery event waiting to be recorded in a group.
struct Request {
    /// The vehicle that reported it.
    vehicle: VehicleId,
    /// The vehicle's fleet.
    fleet: FleetId,
    /// The event.
    event: DeliveryEvent,
    /// Where its questions, turns and verdict go.
    caller: mpsc::UnboundedSender<ToCaller>,
}

/// What the committer tells (or asks) the caller of an event.
pub(super) enum ToCaller {
    /// The event is judged, with this flag, in the group's transaction: the messages to queue
    /// for it (recipient, payload as JSON text), one per recipient.
    Address {
        /// The event's flag (`None`: it moves its order the usual step).
        flag: Option<EventFlag>,
        /// The store that placed the event's order (`None`: there is no such order).
        store: Option<String>,
        /// Where the messages go.
        reply: oneshot::Sender<Vec<(ClientId, String)>>,
    },
    /// Its turn: record the event in the transaction and hand it back (an event recorded
    /// alone).
    Turn(Turn),
    /// The event is committed: what the group recorded of it (`None`: what the caller
    /// recorded in its last turn).
    Committed(Option<Written>),
    /// Nothing of it is committed. `None`: its own turn failed (the caller has that error);
    /// otherwise why the transaction failed.
    Failed(Option<StoreError>),
}

/// A write transaction lent to the caller of one event, for its turn.
pub(super) struct Turn {
    tx: DbTx,
    back: oneshot::Sender<(DbTx, bool)>,
}

impl Turn {
    /// The transaction to record the event in.
    pub(super) fn tx(&mut self) -> &mut DbTx {
        &mut self.tx
    }

    /// Hands the transaction back to the committer: `recorded` says whether the event's
    /// statements all succeeded (if not, the group is rolled back).
    pub(super) fn hand_back(self, recorded: bool) {
        // If the committer is gone the transaction is dropped here, which rolls it back.
        let _ = self.back.send((self.tx, recorded));
    }
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
}

/// The counters behind [`GroupStats`].
#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    events: AtomicU64,
    largest: AtomicU64,
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
        task: JoinHandle<()>,
    },
    /// The store is closed: events are recorded alone (and fail, the pools being closed).
    Closed,
}

impl EventGroups {
    /// Hands `event` of `vehicle` of `fleet` to the committer (started on `write`, a store
    /// on `backend`, if none runs) and returns where its questions, turns and verdict come;
    /// `None` if there is no committer (the store is closed, or there is no Tokio runtime to
    /// run one): the caller records its event alone.
    pub(super) fn submit(
        &self,
        vehicle: &VehicleId,
        fleet: &FleetId,
        event: &DeliveryEvent,
        write: &DbPool,
        backend: Backend,
    ) -> Option<mpsc::UnboundedReceiver<ToCaller>> {
        let (caller, turns) = mpsc::unbounded_channel();
        let mut request = Request {
            vehicle: vehicle.clone(),
            fleet: fleet.clone(),
            event: event.clone(),
            caller,
        };
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Slot::Running { requests, .. } = &*slot {
            match requests.send(request) {
                Ok(()) => return Some(turns),
                // Its runtime ended: start another one in this one.
                Err(mpsc::error::SendError(back)) => request = back,
            }
        }
        if matches!(*slot, Slot::Closed) {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (requests, rx) = mpsc::unbounded_channel();
        let committer = Committer {
            counters: Arc::clone(&self.counters),
            write: write.clone(),
            backend,
            requests: rx,
        };
        let task = runtime.spawn(committer.run());
        // Cannot fail: the receiver is in the task just spawned.
        let sent = requests.send(request).is_ok();
        *slot = Slot::Running { requests, task };
        sent.then_some(turns)
    }

    /// How the delivery events were committed so far.
    pub(super) fn stats(&self) -> GroupStats {
        GroupStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            events: self.counters.events.load(Ordering::Relaxed),
            largest: self.counters.largest.load(Ordering::Relaxed),
        }
    }

    /// Stops the committer after it has recorded and answered every event it accepted; the
    /// events that come later are recorded alone.
    pub(super) async fn close(&self) {
        let slot = std::mem::replace(
            &mut *self.slot.lock().unwrap_or_else(PoisonError::into_inner),
            Slot::Closed,
        );
        if let Slot::Running { requests, task } = slot {
            drop(requests);
            // An error: its runtime ended, or it panicked (logged by Tokio); nothing to drain.
            let _ = task.await;
        }
    }
}

/// Why a group's transaction did not commit.
enum Failure {
    /// It could not begin: nothing was tried.
    Begin(StoreError),
    /// Something failed after it began: it was rolled back.
    Later(String),
}

/// What came of lending the transaction to a caller.
enum Turned {
    /// The caller recorded its event and handed the transaction back.
    Recorded(DbTx),
    /// The caller's statements failed; the transaction came back.
    Failed(DbTx),
    /// The caller went away before its turn (nobody waits for the event): the transaction
    /// came back untouched.
    Gone(DbTx),
    /// The caller went away during its turn, with the transaction (which rolls back).
    Lost,
}

impl Request {
    /// Tells the caller `what` (a caller that went away is not told).
    fn answer(&self, what: ToCaller) {
        let _ = self.caller.send(what);
    }

    /// Whether the caller went away (nobody waits for the event).
    fn is_gone(&self) -> bool {
        self.caller.is_closed()
    }

    /// Lends `tx` to the caller for its turn and waits for it back.
    async fn turn(&self, tx: DbTx) -> Turned {
        let (back, returned) = oneshot::channel();
        if let Err(mpsc::error::SendError(message)) =
            self.caller.send(ToCaller::Turn(Turn { tx, back }))
        {
            return match message {
                ToCaller::Turn(turn) => Turned::Gone(turn.tx),
                _ => Turned::Lost,
            };
        }
        match returned.await {
            Ok((tx, true)) => Turned::Recorded(tx),
            Ok((tx, false)) => Turned::Failed(tx),
            Err(_) => Turned::Lost,
        }
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
            self.commit(&group).await;
            group.clear();
            // The callers just answered may hand over their next events before the next
            // group is taken (no timer: this only lets the woken tasks run).
            tokio::task::yield_now().await;
        }
    }

    async fn begin(&self) -> Result<DbTx, StoreError> {
        Ok(self.write.begin_with(self.backend.begin_write()).await?)
    }

    /// Records `group` in one transaction, or, if that fails after it began, one event per
    /// transaction; answers every caller.
    async fn commit(&self, group: &[Request]) {
        if group.len() > 1 {
            match self.together(group).await {
                Ok(written) => {
                    self.counters.committed(written.len());
                    for (request, written) in group.iter().zip(written) {
                        request.answer(ToCaller::Committed(Some(written)));
                    }
                    return;
                }
                Err(Failure::Begin(err)) => {
                    fail_all(group, err);
                    return;
                }
                Err(Failure::Later(cause)) => debug!(
                    events = group.len(), %cause,
                    "group of delivery events rolled back: recording them one per transaction"
                ),
            }
        }
        for (i, request) in group.iter().enumerate() {
            if request.is_gone() {
                continue;
            }
            if let Err(err) = self.alone(request).await {
                fail_all(&group[i..], err);
                return;
            }
        }
    }

    /// Records every event of `group` in one transaction and commits it; returns what it
    /// recorded of each, in order.
    async fn together(&self, group: &[Request]) -> Result<Vec<Written>, Failure> {
        let mut tx = self.begin().await.map_err(Failure::Begin)?;
        match self.record(&mut tx, group).await {
            Ok(written) => {
                tx.commit()
                    .await
                    .map_err(|err| Failure::Later(format!("commit: {err}")))?;
                Ok(written)
            }
            Err(cause) => {
                rollback(tx).await;
                Err(Failure::Later(cause))
            }
        }
    }

    /// Records `group` in `tx`, not committed: reads (and locks) its orders, looks its events
    /// up, judges them one after the other in arrival order as one transaction per event
    /// would (a duplicate, also of an event earlier in the group, changes nothing; an event
    /// that moves its order moves it for the events after it), asks each new event's caller
    /// for its messages, then writes it all.
    async fn record(&self, tx: &mut DbTx, group: &[Request]) -> Result<Vec<Written>, String> {
        let now = now_ms();
        let backend = self.backend;
        let mut ids: Vec<&str> = group.iter().map(|r| r.event.order.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let keys: Vec<(&VehicleId, &DeliveryEvent)> =
            group.iter().map(|r| (&r.vehicle, &r.event)).collect();
        let (mut orders, mut recorded) = statements::read(tx, backend, &ids, &keys)
            .await
            .map_err(|err| format!("reading the orders and events: {err}"))?;

        let mut written = Vec::with_capacity(group.len());
        let mut new_events = Vec::with_capacity(group.len());
        let mut moved: HashSet<&str> = HashSet::new();
        let mut asked = Vec::with_capacity(group.len());
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
            let (reply, messages) = oneshot::channel();
            if request
                .caller
                .send(ToCaller::Address {
                    flag,
                    store: order.as_ref().map(|o| o.store.clone()),
                    reply,
                })
                .is_err()
            {
                return Err("a caller went away".into());
            }
            asked.push(messages);
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

        // The callers make their messages meanwhile, all at once.
        let mut messages = Vec::with_capacity(asked.len());
        for answer in asked {
            messages.push(
                answer
                    .await
                    .map_err(|_| String::from("a caller did not address its event"))?,
            );
        }

        let moved: Vec<(&str, OrderState)> = moved
            .into_iter()
            .filter_map(|id| orders.get(id).map(|o: &OrderView| (id, o.state)))
            .collect();
        let rows: Vec<(&ClientId, &str)> = messages
            .iter()
            .flatten()
            .map(|(client, payload)| (client, payload.as_str()))
            .collect();
        let mut queued = statements::write(tx, backend, &new_events, &moved, &rows, now)
            .await
            .map_err(|err| format!("writing the group: {err}"))?
            .into_iter();
        let mut messages = messages.iter();
        for written in written.iter_mut().filter(|w| !w.duplicate) {
            let count = messages.next().map_or(0, Vec::len);
            written.queued = queued.by_ref().take(count).collect();
        }
        Ok(written)
    }

    /// Records `request`'s event in a transaction of its own and answers it.
    ///
    /// # Errors
    /// The error if the transaction could not begin (the event is not answered).
    async fn alone(&self, request: &Request) -> Result<(), StoreError> {
        let tx = self.begin().await?;
        match request.turn(tx).await {
            Turned::Recorded(tx) => request.answer(match tx.commit().await {
                Ok(()) => {
                    self.counters.committed(1);
                    ToCaller::Committed(None)
                }
                Err(err) => ToCaller::Failed(Some(err.into())),
            }),
            Turned::Failed(tx) => {
                rollback(tx).await;
                request.answer(ToCaller::Failed(None));
            }
            Turned::Gone(tx) => rollback(tx).await,
            Turned::Lost => {}
        }
        Ok(())
    }
}

/// Answers every request of `group` with `err` (shared if there are several).
fn fail_all(group: &[Request], err: StoreError) {
    match group {
        [one] => one.answer(ToCaller::Failed(Some(err))),
        _ => {
            let err = Arc::new(err);
            for request in group {
                request.answer(ToCaller::Failed(Some(StoreError::Group(Arc::clone(&err)))));
            }
        }
    }
}

/// Ends `tx` without committing it.
async fn rollback(tx: DbTx) {
    if let Err(err) = tx.rollback().await {
        debug!(cause = %err, "rollback failed (the transaction ends with its connection)");
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
