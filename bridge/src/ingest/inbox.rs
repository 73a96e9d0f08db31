//! What the MQTT tasks do with each PUBLISH from a vehicle: parse its topic, verify its
//! payload, record it in the domain, and emit what clients must see now (command acks;
//! positions and liveness changes wait for the next tick's batches). A delivery event is
//! handed, with its message's PUBACK, to the [`AckQueue`], which commits it first.

use std::sync::Arc;

use rumqttc::Publish;
use shared::{CommandAck, DeliveryEvent, Heartbeat, Status, Topic, TopicKind};
use socketioxide::SocketIo;
use tracing::warn;

use super::acks::{AckQueue, Delivery};
use super::keys::DeviceKeys;
use super::verify::{self, Rejected};
use crate::clock::now_ms;
use crate::domain::Hub;
use crate::domain::fleet::Report;
use crate::metrics::{Counter, Metrics, Rejection};
use crate::store::{HeartbeatRow, HeartbeatSender};
use crate::view::emit;

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

/// Everything the MQTT tasks need to handle what vehicles publish.
pub(crate) struct Inbox {
    io: SocketIo,
    hub: Arc<Hub>,
    keys: DeviceKeys,
    history: HeartbeatSender,
    acks: AckQueue,
}

impl Inbox {
    /// An inbox that records into `hub` (and heartbeats into `history`), checks origins with
    /// `keys`, emits on `io`, and hands the events session's messages to `acks` for their
    /// PUBACK (delivery events to commit first).
    pub(crate) fn new(
        io: SocketIo,
        hub: Arc<Hub>,
        keys: DeviceKeys,
        history: HeartbeatSender,
        acks: AckQueue,
    ) -> Self {
        Self {
            io,
            hub,
            keys,
            history,
            acks,
        }
    }

    /// The bridge's counters.
    pub(crate) fn metrics(&self) -> &Metrics {
        self.hub.metrics()
    }

    /// The queue of the events session's PUBACKs.
    pub(crate) fn acks(&self) -> &AckQueue {
        &self.acks
    }

    /// Handles one PUBLISH of the events session, then queues it for its PUBACK (which a
    /// delivery event gets once committed). Anything invalid is counted and logged with the
    /// topic, never fatal, and acknowledged.
    pub(crate) async fn handle(&self, publish: &Publish) {
        let connection = self.acks.connection();
        let delivery = self.process(publish).await;
        self.acks.push(publish, connection, delivery).await;
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
        if let Err(Rejected { why, cause }) = self.accept(&topic, &publish.payload) {
            self.metrics().rejected(why);
            warn!(topic = %publish.topic, %cause, bytes = publish.payload.len(), "rejected MQTT message: {}", why.describe());
        }
    }

    /// Handles one message; returns its delivery event, to commit before it is acknowledged.
    async fn process(&self, publish: &Publish) -> Option<Delivery> {
        let metrics = self.metrics();
        let topic = match Topic::parse(&publish.topic) {
            Ok(topic) => topic,
            Err(cause) => {
                metrics.rejected(Rejection::Topic);
                warn!(topic = %publish.topic, %cause, "rejected MQTT message: bad topic");
                return None;
            }
        };
        // An empty retained message clears a retained status: nothing to report.
        if topic.kind == TopicKind::Status && publish.payload.is_empty() {
            return None;
        }
        match self.accept(&topic, &publish.payload) {
            Ok(Accepted::NextTick) => {}
            Ok(Accepted::Delivery(event)) => return Some(Delivery { topic, event }),
            Ok(Accepted::CommandAck(ack)) => {
                emit::command_ack(&self.io, metrics, &topic, &ack).await;
            }
            Err(Rejected { why, cause }) => {
                metrics.rejected(why);
                warn!(topic = %publish.topic, %cause, bytes = publish.payload.len(), "rejected MQTT message: {}", why.describe());
            }
        }
        None
    }

    /// Verifies a vehicle's sealed payload (origin, freshness, shape) and records it.
    fn accept(&self, topic: &Topic, payload: &[u8]) -> Result<Accepted, Rejected> {
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
                ));
            }
        };
        self.metrics().received(topic.kind);
        Ok(accepted)
    }
}
