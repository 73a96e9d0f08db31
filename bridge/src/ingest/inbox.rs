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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rumqttc::{Publish, QoS};
use shared::{CommandAck, DeliveryEvent, Heartbeat, Status, Topic, TopicKind, VehicleId};
use socketioxide::SocketIo;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acks::{self, AckQueue, Delivery, Handled};
use super::keys::DeviceKeys;
use super::verify::{self, Rejected, Unopened};
use crate::clock::now_ms;
use crate::domain::Hub;
use crate::domain::fleet::Report;
use crate::metrics::{Counter, Metrics, Rejection};
use crate::store::{HeartbeatRow, HeartbeatSender};
use crate::view::emit;

/// How often a message held for its vehicle's key is logged again while it waits.
const HELD_LOG_EVERY: Duration = Duration::from_secs(30);

/// A vehicle's message, verified and recorded: what is left to do with it.
#[derive(Debug)]
enum Accepted {
    /// A heartbeat or a status, recorded in the fleet cache: it goes out with the next tick.
    NextTick,
    /// A delivery event, to record durably and queue before it is acknowledged.
    Delivery(DeliveryEvent),
    /// A command ack, handed to the waiting command: everyone watching the vehicle sees it.
    CommandAck(CommandAck),
}

/// What verifies and records a vehicle's message: shared by the MQTT tasks and [`KeyWait`].
struct Intake {
    io: SocketIo,
    hub: Arc<Hub>,
    keys: DeviceKeys,
    history: HeartbeatSender,
    /// Vehicles with messages held for their key, and how many: the messages behind them
    /// from the same vehicle are held too, so that they are handled in the order they came.
    held: Mutex<HashMap<VehicleId, usize>>,
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
    /// messages held for their vehicle's key.
    pub(crate) fn new(
        io: SocketIo,
        hub: Arc<Hub>,
        keys: DeviceKeys,
        history: HeartbeatSender,
        acks: AckQueue,
    ) -> (Self, KeyWait) {
        let intake = Arc::new(Intake {
            io,
            hub,
            keys,
            history,
            held: Mutex::default(),
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

    /// Handles one PUBLISH of the heartbeats session (QoS 0, nothing to acknowledge): only
    /// heartbeats are taken there.
    pub(crate) fn heartbeat(&self, publish: &Publish) {
        let topic = match Topic::parse(&publish.topic) {
            Ok(topic) if topic.kind == TopicKind::Heartbeat => topic,
            Ok(_) => {
                self.metrics().rejected(Rejection::Topic);
                warn!(topic = %publish.topic, "rejected MQTT message: not a heartbeat, on the heartbeats session");
                return;
            }
            Err(cause) => {
                self.metrics().rejected(Rejection::Topic);
                warn!(topic = %publish.topic, %cause, "rejected MQTT message: bad topic");
                return;
            }
        };
        match self.intake.accept(&topic, &publish.payload) {
            Ok(_) => {}
            Err(Unopened::Rejected(Rejected { why, cause })) => {
                self.metrics().rejected(why);
                warn!(topic = %publish.topic, %cause, bytes = publish.payload.len(), "rejected MQTT message: {}", why.describe());
            }
            Err(Unopened::NoKey) => {
                // QoS 0: nothing to hold; the next heartbeat comes in a second.
                self.metrics().rejected(Rejection::Auth);
                warn!(topic = %publish.topic, "rejected MQTT message: unknown device, no key (yet) in the credentials file");
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
        let behind_held = self.intake.holds(&topic.vehicle);
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
                if behind_held {
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
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        loop {
            let held = tokio::select! {
                () = cancel.cancelled() => return,
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

    /// Handles `held` once its key is known; returns false if the bridge is stopping.
    async fn wait_for_key(&self, mut held: Held, cancel: &CancellationToken) -> bool {
        let metrics = self.intake.hub.metrics();
        let since = Instant::now();
        let mut logged = since;
        loop {
            if self.acks.connection() != held.connection {
                // Dropping the answer's sender: never acknowledged, the broker sends it again.
                return true;
            }
            match self.intake.accept(&held.topic, &held.payload) {
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
            if logged.elapsed() >= HELD_LOG_EVERY {
                logged = Instant::now();
                warn!(
                    topic = %held.topic.name(),
                    waited_s = since.elapsed().as_secs(),
                    "still no key for this vehicle: its message and those behind it wait unacknowledged"
                );
            }
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = held.answer.closed() => return true,
                () = tokio::time::sleep(broker::FileWatch::INTERVAL / 4) => {}
            }
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
            Accepted::NextTick => None,
            Accepted::Delivery(event) => Some(Delivery {
                topic: topic.clone(),
                event,
            }),
            Accepted::CommandAck(ack) => {
                emit::command_ack(&self.io, self.metrics(), topic, &ack).await;
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
                self.hub
                    .complete_command(topic, opened.counter, &opened.msg)?;
                Accepted::CommandAck(opened.msg)
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
