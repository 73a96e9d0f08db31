//! What the MQTT tasks do with each PUBLISH from a vehicle: parse its topic, verify its
//! payload, record it in the domain, and emit what clients must see now (command acks;
//! positions and liveness changes wait for the next tick's batches). A delivery event is
//! handed, with its message's PUBACK, to the [`AckQueue`], which commits it first.
//!
//! A QoS 1 message (status, delivery event, command ack) from a vehicle whose key the bridge
//! does not have yet (a device added to the credentials file a moment ago) is neither
//! rejected nor acknowledged: it is held by the [`KeyWait`] task, which checks the
//! credentials file again (it is reloaded when it changes) until the key is there, then
//! handles it. Its PUBACK, and those of the messages behind it, wait meanwhile (the broker and
//! the vehicle keep it); the vehicle's later messages are held behind it, so that they are
//! handled in the order they came. If the connection ends first it is not acknowledged at
//! all, and the broker sends it again. Nothing from an unknown vehicle is acknowledged and
//! dropped.
//!
//! The wait is bounded: a message still without its key after `key_wait_park_after_ms`
//! (default 60 s) is **parked**: written to the store's `parked` table in one committed
//! transaction, and only then acknowledged, so that the PUBACKs behind it flow again (a
//! vehicle revoked before a bridge restart is unknown to the restarted bridge, and its queued
//! messages would otherwise stall the events session for good). If the store cannot write, it
//! stays held. The vehicle's later messages without a key are parked at once, behind it, so
//! that its messages stay in order. Parked messages are checked again every
//! [`broker::FileWatch::INTERVAL`] (the credentials file is reloaded when it changes) while no
//! message is held (a held one delays that by its wait at most; a vehicle's own parked
//! messages are checked before each of its held ones), and at start: once the vehicle has a
//! key they are handled in the order they came, exactly as if they had just arrived (a
//! delivery event is committed as the ack queue commits it; the store drops a duplicate), then
//! deleted; a revoked vehicle's, or one that does not verify,
//! are rejected (counted, logged) and deleted. What no key ever claims is removed by the
//! queue retention, counted (`fleetbeat_bridge_parked_expired_total`). Heartbeats (QoS 0) are
//! never held nor parked.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rumqttc::{Publish, QoS};
use shared::{CommandAck, DeliveryEvent, Heartbeat, Status, Topic, TopicKind, VehicleId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acks::{self, AckQueue, Delivery, Handled};
use super::keys::{DeviceKeys, Lookup};
use super::verify::{self, Rejected, Unopened};
use crate::clock::now_ms;
use crate::domain::Hub;
use crate::domain::fleet::Report;
use crate::metrics::{Counter, Metrics, Rejection};
use crate::store::{HeartbeatRow, HeartbeatSender, ParkedMessage, Store, StoreError};
use crate::view::emit::Outlet;

/// How often a message held for its vehicle's key is logged again while it waits.
const HELD_LOG_EVERY: Duration = Duration::from_secs(30);

/// How many parked messages of a vehicle are read at once when its key is known.
const PARKED_PAGE: u32 = 64;

/// Where messages held too long for their vehicle's key are parked (see the module docs).
pub(crate) struct Parking {
    /// The store that keeps them.
    pub(crate) store: Store,
    /// How long a message is held before it is parked.
    pub(crate) after: Duration,
    /// The vehicles with parked messages when the bridge starts (`Store::parked_vehicles`).
    pub(crate) vehicles: Vec<VehicleId>,
}

/// A vehicle's message, verified and recorded: what is left to do with it.
#[derive(Debug)]
enum Accepted {
    /// A heartbeat or a status, recorded in the fleet cache: it goes out with the next tick.
    NextTick,
    /// A delivery event, to record durably and queue before it is acknowledged.
    Delivery(DeliveryEvent),
    /// A command ack of a command this bridge sent, handed to the waiting command: everyone
    /// watching the vehicle sees it.
    CommandAck(CommandAck),
    /// A command ack of another bridge's command: that bridge shows it.
    OtherBridgesAck,
}

/// What verifies and records a vehicle's message: shared by the MQTT tasks and [`KeyWait`].
struct Intake {
    io: Arc<dyn Outlet>,
    hub: Arc<Hub>,
    keys: DeviceKeys,
    history: HeartbeatSender,
    /// Vehicles with messages held for their key, and how many: the messages behind them
    /// from the same vehicle are held too, so that they are handled in the order they came.
    held: Mutex<HashMap<VehicleId, usize>>,
    /// Vehicles with parked messages: their messages without a key are parked at once,
    /// behind them. Only the [`KeyWait`] task changes it.
    parked: Mutex<HashSet<VehicleId>>,
    store: Store,
    park_after: Duration,
}

/// Everything the MQTT tasks need to handle what vehicles publish.
pub(crate) struct Inbox {
    intake: Arc<Intake>,
    acks: AckQueue,
    held: mpsc::Sender<Held>,
}

/// A QoS 1 message held until its vehicle's key is known.
struct Held {
    topic: Topic,
    payload: Vec<u8>,
    /// The events session's connection it came on.
    connection: u64,
    /// Where its outcome goes: the ack queue waits on it.
    answer: oneshot::Sender<Option<Delivery>>,
}

/// The task that handles held messages, in the order they came, as their keys appear.
/// Spawn [`KeyWait::run`].
pub(crate) struct KeyWait {
    intake: Arc<Intake>,
    acks: AckQueue,
    rx: mpsc::Receiver<Held>,
}

impl Inbox {
    /// An inbox that records into `hub` (and heartbeats into `history`), checks origins with
    /// `keys`, emits on `io`, and hands the events session's messages to `acks` for their
    /// PUBACK (delivery events to commit first); and the [`KeyWait`] task that handles the
    /// messages held for their vehicle's key, and parks them in `parking` after its wait.
    pub(crate) fn new(
        io: Arc<dyn Outlet>,
        hub: Arc<Hub>,
        keys: DeviceKeys,
        history: HeartbeatSender,
        acks: AckQueue,
        parking: Parking,
    ) -> (Self, KeyWait) {
        let intake = Arc::new(Intake {
            io,
            hub,
            keys,
            history,
            held: Mutex::default(),
            parked: Mutex::new(parking.vehicles.into_iter().collect()),
            store: parking.store,
            park_after: parking.after,
        });
        let (held, rx) = mpsc::channel(acks::CAPACITY);
        let wait = KeyWait {
            intake: Arc::clone(&intake),
            acks: acks.clone(),
            rx,
        };
        (Self { intake, acks, held }, wait)
    }

    /// The bridge's counters.
    pub(crate) fn metrics(&self) -> &Metrics {
        self.intake.hub.metrics()
    }

    /// The queue of the events session's PUBACKs.
    pub(crate) fn acks(&self) -> &AckQueue {
        &self.acks
    }

    /// Handles one PUBLISH of the events session, then queues it for its PUBACK (which a
    /// delivery event gets once committed). Anything invalid is counted and logged with the
    /// topic, never fatal, and acknowledged; a message from a vehicle without a key yet is
    /// held (see the module docs).
    pub(crate) async fn handle(&self, publish: &Publish) {
        let connection = self.acks.connection();
        let handled = self.process(publish, connection).await;
        self.acks.push(publish, connection, handled).await;
    }

    /// Handles one message of the heartbeats session (QoS 0, nothing to acknowledge), or of
    /// the embedded broker's in-process heartbeat subscription: only heartbeats are taken
    /// there. A topic that is not UTF-8 is rejected like any bad topic.
    pub(crate) fn heartbeat(&self, topic: &[u8], payload: &[u8]) {
        let Ok(name) = std::str::from_utf8(topic) else {
            self.metrics().rejected(Rejection::Topic);
            warn!(topic = %String::from_utf8_lossy(topic), "rejected MQTT message: topic is not UTF-8");
            return;
        };
        let topic = match Topic::parse(name) {
            Ok(topic) if topic.kind == TopicKind::Heartbeat => topic,
            Ok(_) => {
                self.metrics().rejected(Rejection::Topic);
                warn!(topic = %name, "rejected MQTT message: not a heartbeat, on the heartbeats session");
                return;
            }
            Err(cause) => {
                self.metrics().rejected(Rejection::Topic);
                warn!(topic = %name, %cause, "rejected MQTT message: bad topic");
                return;
            }
        };
        match self.intake.accept(&topic, payload) {
            Ok(_) => {}
            Err(Unopened::Rejected(Rejected { why, cause })) => {
                self.metrics().rejected(why);
                warn!(topic = %name, %cause, bytes = payload.len(), "rejected MQTT message: {}", why.describe());
            }
            Err(Unopened::NoKey) => {
                // QoS 0: nothing to hold; the next heartbeat comes in a second.
                self.metrics().rejected(Rejection::Auth);
                warn!(topic = %name, "rejected MQTT message: unknown device, no key (yet) in the credentials file");
            }
        }
    }

    /// Handles one message; returns its delivery event, to commit before it is acknowledged,
    /// or the promise of one if it is held for its vehicle's key.
    async fn process(&self, publish: &Publish, connection: u64) -> Handled {
        let metrics = self.metrics();
        let topic = match Topic::parse(&publish.topic) {
            Ok(topic) => topic,
            Err(cause) => {
                metrics.rejected(Rejection::Topic);
                warn!(topic = %publish.topic, %cause, "rejected MQTT message: bad topic");
                return Handled::Now(None);
            }
        };
        // An empty retained message clears a retained status: nothing to report.
        if topic.kind == TopicKind::Status && publish.payload.is_empty() {
            return Handled::Now(None);
        }
        // QoS 0 is never parked: nothing behind it to keep in order.
        let behind_parked =
            publish.qos != QoS::AtMostOnce && self.intake.has_parked(&topic.vehicle);
        let behind_held = behind_parked || self.intake.holds(&topic.vehicle);
        let outcome = if behind_held {
            Err(Unopened::NoKey)
        } else {
            self.intake.accept(&topic, &publish.payload)
        };
        match outcome {
            Ok(accepted) => Handled::Now(self.intake.finish(&topic, accepted).await),
            Err(Unopened::Rejected(rejected)) => {
                reject(metrics, &topic, publish.payload.len(), rejected);
                Handled::Now(None)
            }
            Err(Unopened::NoKey) if publish.qos == QoS::AtMostOnce => {
                metrics.rejected(Rejection::Auth);
                warn!(topic = %publish.topic, "rejected MQTT message: unknown device, no key (yet) in the credentials file");
                Handled::Now(None)
            }
            Err(Unopened::NoKey) => {
                metrics.count(Counter::KeyWaits);
                if behind_parked {
                    debug!(topic = %publish.topic, "held behind parked messages of the vehicle");
                } else if behind_held {
                    debug!(topic = %publish.topic, "held behind an earlier message of the vehicle");
                } else {
                    warn!(
                        topic = %publish.topic,
                        "no key (yet) for this vehicle in the credentials file: its message is \
                         held unacknowledged until the key appears (add it with `broker add-device`)"
                    );
                }
                self.intake.hold(&topic.vehicle);
                let (answer, promise) = oneshot::channel();
                let held = Held {
                    topic,
                    payload: publish.payload.to_vec(),
                    connection,
                    answer,
                };
                // If the task is gone (stopping), the answer's sender is dropped with it: the
                // message is not acknowledged, and the broker keeps it.
                let _ = self.held.send(held).await;
                Handled::Later(promise)
            }
        }
    }
}

/// Counts and logs a rejected message.
fn reject(metrics: &Metrics, topic: &Topic, bytes: usize, Rejected { why, cause }: Rejected) {
    metrics.rejected(why);
    warn!(topic = %topic.name(), %cause, bytes, "rejected MQTT message: {}", why.describe());
}

impl KeyWait {
    /// Handles the held messages in order until `cancel` fires: each once its vehicle's key is
    /// known (the credentials file is checked again every [`broker::FileWatch::INTERVAL`]), or is
    /// given up unacknowledged when its connection ends.
    /// Parked messages are checked again at start and every [`broker::FileWatch::INTERVAL`].
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        self.update_parked_gauge().await;
        let mut recheck = tokio::time::interval(broker::FileWatch::INTERVAL);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let held = tokio::select! {
                () = cancel.cancelled() => return,
                _ = recheck.tick() => {
                    self.recheck_parked().await;
                    continue;
                }
                held = self.rx.recv() => match held {
                    Some(held) => held,
                    None => return,
                },
            };
            let vehicle = held.topic.vehicle.clone();
            let going_on = self.wait_for_key(held, &cancel).await;
            self.intake.release(&vehicle);
            if !going_on {
                return;
            }
        }
    }

    /// Handles `held` once its key is known, or parks it after its wait (at once if its
    /// vehicle has parked messages still without a key); returns false if the bridge is
    /// stopping.
    async fn wait_for_key(&self, mut held: Held, cancel: &CancellationToken) -> bool {
        let metrics = self.intake.hub.metrics();
        let vehicle = held.topic.vehicle.clone();
        let since = Instant::now();
        let mut logged = since;
        loop {
            if self.acks.connection() != held.connection {
                // Dropping the answer's sender: never acknowledged, the broker sends it again.
                return true;
            }
            if self.intake.has_parked(&vehicle) {
                // Its parked messages first, if their key is known now.
                // Failures are retried here every few hundred ms: logged at debug level, the
                // store's health (`/readyz`, `store_writable`) reports an outage.
                if let Err(err) = self.recheck_vehicle(&vehicle).await {
                    debug!(vehicle = %vehicle, cause = %err, "could not handle the vehicle's parked messages");
                }
                self.update_parked_gauge().await;
            }
            let outcome = if self.intake.has_parked(&vehicle) {
                Err(Unopened::NoKey)
            } else {
                self.intake.accept(&held.topic, &held.payload)
            };
            match outcome {
                Ok(accepted) => {
                    info!(
                        topic = %held.topic.name(),
                        waited_ms = since.elapsed().as_millis() as u64,
                        "the vehicle's key is known now: held message handled"
                    );
                    let delivery = self.intake.finish(&held.topic, accepted).await;
                    let _ = held.answer.send(delivery);
                    return true;
                }
                Err(Unopened::Rejected(rejected)) => {
                    reject(metrics, &held.topic, held.payload.len(), rejected);
                    let _ = held.answer.send(None);
                    return true;
                }
                Err(Unopened::NoKey) => {}
            }
            if self.intake.has_parked(&vehicle) || since.elapsed() >= self.intake.park_after {
                match self.park(&held, since).await {
                    Ok(()) => {
                        let _ = held.answer.send(None);
                        return true;
                    }
                    Err(err) => {
                        if logged.elapsed() >= HELD_LOG_EVERY || logged == since {
                            logged = Instant::now();
                            warn!(
                                topic = %held.topic.name(), cause = %err,
                                "could not park a message held for its vehicle's key: it stays \
                                 held unacknowledged, and parking is tried again"
                            );
                        }
                    }
                }
            }
            if logged.elapsed() >= HELD_LOG_EVERY {
                logged = Instant::now();
                warn!(
                    topic = %held.topic.name(),
                    waited_s = since.elapsed().as_secs(),
                    "still no key for this vehicle: its message and those behind it wait unacknowledged"
                );
            }
            let until_parked = self.intake.park_after.saturating_sub(since.elapsed());
            let nap =
                (broker::FileWatch::INTERVAL / 4).min(until_parked.max(Duration::from_millis(10)));
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = held.answer.closed() => return true,
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Parks `held` (held since `since`) in the store, committed; the caller acknowledges it.
    async fn park(&self, held: &Held, since: Instant) -> Result<(), StoreError> {
        let topic = held.topic.name();
        let vehicle = &held.topic.vehicle;
        let behind = self.intake.has_parked(vehicle);
        let waited_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let received_ms = now_ms().saturating_sub(waited_ms);
        let id = self
            .intake
            .store
            .park(vehicle, topic.as_str(), &held.payload, received_ms)
            .await?;
        self.intake.mark_parked(vehicle);
        self.intake.metrics().count(Counter::Parked);
        self.update_parked_gauge().await;
        warn!(
            topic = %topic,
            parked = id,
            waited_ms,
            behind_parked = behind,
            "no key for this vehicle in the credentials file: its message is parked in the store \
             and acknowledged; it is handled once the key appears (`broker add-device`), or \
             expires with the queue retention"
        );
        Ok(())
    }

    /// Handles the parked messages of every vehicle that has a key now (or is revoked). The
    /// list of vehicles is read back from the store (retention may have emptied some).
    async fn recheck_parked(&self) {
        if self.intake.parked().is_empty() {
            return;
        }
        let vehicles = match self.intake.store.parked_vehicles().await {
            Ok(vehicles) => vehicles,
            Err(err) => {
                warn!(cause = %err, "could not list the parked messages");
                return;
            }
        };
        *self.intake.parked() = vehicles.iter().cloned().collect();
        for vehicle in &vehicles {
            if let Err(err) = self.recheck_vehicle(vehicle).await {
                warn!(vehicle = %vehicle, cause = %err, "could not handle the vehicle's parked messages");
            }
        }
        self.update_parked_gauge().await;
    }

    /// Handles the parked messages of `vehicle` in the order they came if it has a key now
    /// (rejects them if it is revoked), deleting each once handled.
    ///
    /// # Errors
    /// [`StoreError`] if they could not be read, committed or deleted: what is left stays
    /// parked, for the next check.
    async fn recheck_vehicle(&self, vehicle: &VehicleId) -> Result<(), StoreError> {
        if self.intake.keys.lookup(vehicle) == Lookup::Unknown {
            return Ok(());
        }
        loop {
            let page = self.intake.store.parked_of(vehicle, PARKED_PAGE).await?;
            if page.is_empty() {
                self.intake.parked().remove(vehicle);
                return Ok(());
            }
            for parked in page {
                if !self.handle_parked(&parked).await? {
                    return Ok(());
                }
                self.intake.store.unpark(parked.id).await?;
            }
        }
    }

    /// Handles one parked message as if it had just arrived. Returns false if its vehicle has
    /// no key (any more): it stays parked.
    ///
    /// # Errors
    /// [`StoreError`] if its delivery event could not be committed for an outage.
    async fn handle_parked(&self, parked: &ParkedMessage) -> Result<bool, StoreError> {
        let metrics = self.intake.metrics();
        let topic = match Topic::parse(&parked.topic) {
            Ok(topic) if topic.vehicle == parked.vehicle => topic,
            Ok(_) | Err(_) => {
                metrics.rejected(Rejection::Topic);
                warn!(topic = %parked.topic, "rejected parked MQTT message: bad topic");
                return Ok(true);
            }
        };
        let accepted = match self.intake.accept(&topic, &parked.payload) {
            Ok(accepted) => accepted,
            Err(Unopened::Rejected(rejected)) => {
                reject(metrics, &topic, parked.payload.len(), rejected);
                return Ok(true);
            }
            Err(Unopened::NoKey) => return Ok(false),
        };
        let parked_for_ms = now_ms().saturating_sub(parked.received_ms);
        if let Some(delivery) = self.intake.finish(&topic, accepted).await {
            match acks::store_delivery(&self.intake.hub, &*self.intake.io, &delivery).await {
                Ok(()) => metrics.store().succeeded(),
                Err(err) if !err.is_outage() => {
                    metrics.rejected(Rejection::Store);
                    tracing::error!(
                        topic = %topic.name(), seq = delivery.event.seq, cause = %err,
                        "parked delivery event refused by the store: dropped"
                    );
                }
                Err(err) => {
                    metrics
                        .store()
                        .failed("parked delivery event", &err, metrics.acks_waiting());
                    return Err(err);
                }
            }
        }
        info!(
            topic = %topic.name(),
            parked = parked.id,
            parked_for_ms,
            "the vehicle's key is known now: parked message handled"
        );
        Ok(true)
    }

    /// Sets the gauge of parked messages from the store.
    async fn update_parked_gauge(&self) {
        match self.intake.store.parked_count().await {
            Ok(n) => self.intake.metrics().set_parked(n),
            Err(err) => debug!(cause = %err, "could not count the parked messages"),
        }
    }
}

impl Intake {
    fn metrics(&self) -> &Metrics {
        self.hub.metrics()
    }

    fn held(&self) -> MutexGuard<'_, HashMap<VehicleId, usize>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn parked(&self) -> MutexGuard<'_, HashSet<VehicleId>> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `vehicle` has parked messages.
    fn has_parked(&self, vehicle: &VehicleId) -> bool {
        self.parked().contains(vehicle)
    }

    /// Notes that `vehicle` has parked messages.
    fn mark_parked(&self, vehicle: &VehicleId) {
        self.parked().insert(vehicle.clone());
    }

    /// Whether messages of `vehicle` are held (for its key) now.
    fn holds(&self, vehicle: &VehicleId) -> bool {
        self.held().contains_key(vehicle)
    }

    /// Counts one more held message of `vehicle`.
    fn hold(&self, vehicle: &VehicleId) {
        *self.held().entry(vehicle.clone()).or_default() += 1;
    }

    /// Counts one held message of `vehicle` less (handled or given up).
    fn release(&self, vehicle: &VehicleId) {
        let mut held = self.held();
        if let Some(n) = held.get_mut(vehicle) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(vehicle);
            }
        }
    }

    /// Does what is left to do with an accepted message now: emits a command ack; returns a
    /// delivery event, to commit before the message is acknowledged.
    async fn finish(&self, topic: &Topic, accepted: Accepted) -> Option<Delivery> {
        match accepted {
            Accepted::NextTick | Accepted::OtherBridgesAck => None,
            Accepted::Delivery(event) => Some(Delivery {
                topic: topic.clone(),
                event,
            }),
            Accepted::CommandAck(ack) => {
                self.io.command_ack(self.metrics(), topic, &ack).await;
                None
            }
        }
    }

    /// Verifies a vehicle's sealed payload (fleet, origin, freshness, shape) and records it.
    fn accept(&self, topic: &Topic, payload: &[u8]) -> Result<Accepted, Unopened> {
        let accepted = match topic.kind {
            TopicKind::Heartbeat => {
                let opened = verify::open::<Heartbeat>(&self.keys, topic, payload)?;
                let report = Report::Heartbeat(&opened.msg);
                self.hub.record(topic, opened.counter, report)?;
                let row = HeartbeatRow::new(
                    topic.fleet.clone(),
                    topic.vehicle.clone(),
                    &opened.msg,
                    now_ms(),
                );
                if !self.history.send(row) {
                    self.metrics().count(Counter::HistoryDropped);
                }
                Accepted::NextTick
            }
            TopicKind::Status => {
                let opened = verify::open::<Status>(&self.keys, topic, payload)?;
                let report = Report::Status(&opened.msg);
                self.hub.record(topic, opened.counter, report)?;
                Accepted::NextTick
            }
            TopicKind::Event => {
                // Not through the replay guard: a re-sent event (the device retries until the
                // broker acks it) must be acknowledged again, and the store drops duplicates.
                let opened = verify::open::<DeliveryEvent>(&self.keys, topic, payload)?;
                Accepted::Delivery(opened.msg)
            }
            TopicKind::Ack => {
                let opened = verify::open::<CommandAck>(&self.keys, topic, payload)?;
                let completion = self
                    .hub
                    .complete_command(topic, opened.counter, &opened.msg)?;
                if completion.is_ours() {
                    Accepted::CommandAck(opened.msg)
                } else {
                    Accepted::OtherBridgesAck
                }
            }
            TopicKind::Command => {
                return Err(Rejected::new(
                    Rejection::Topic,
                    "commands are not accepted from vehicles",
                )
                .into());
            }
        };
        self.metrics().received(topic.kind);
        Ok(accepted)
    }
}
