//! What the MQTT task does with each PUBLISH from a vehicle: parse its topic, verify its
//! payload, record it in the domain, and emit what clients must see now (delivery events and
//! command acks; positions and liveness changes wait for the next tick's batches).

use std::sync::Arc;

use rumqttc::{AsyncClient, Publish, QoS};
use shared::{CommandAck, DeliveryEvent, Heartbeat, Status, Topic, TopicKind};
use socketioxide::SocketIo;
use tracing::warn;

use super::keys::DeviceKeys;
use super::verify::{self, Rejected};
use crate::clock::now_ms;
use crate::domain::Hub;
use crate::domain::fleet::Report;
use crate::metrics::{Counter, Metrics, Rejection};
use crate::store::{HeartbeatRow, HeartbeatSender};
use crate::view::{emit, order};

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

/// Everything the MQTT task needs to handle what vehicles publish.
pub(crate) struct Inbox {
    io: SocketIo,
    hub: Arc<Hub>,
    keys: DeviceKeys,
    history: HeartbeatSender,
    client: AsyncClient,
}

impl Inbox {
    /// An inbox that records into `hub` (and heartbeats into `history`), checks origins with
    /// `keys`, emits on `io` and acknowledges QoS 1 messages through `client` (manual acks).
    pub(crate) fn new(
        io: SocketIo,
        hub: Arc<Hub>,
        keys: DeviceKeys,
        history: HeartbeatSender,
        client: AsyncClient,
    ) -> Self {
        Self {
            io,
            hub,
            keys,
            history,
            client,
        }
    }

    /// The bridge's counters.
    pub(crate) fn metrics(&self) -> &Metrics {
        self.hub.metrics()
    }

    /// Handles one PUBLISH, then acknowledges it. Anything invalid is counted and logged with
    /// the topic, never fatal; a delivery event that could not be stored is left
    /// unacknowledged, so the broker delivers it again.
    pub(crate) async fn handle(&self, publish: &Publish) {
        if self.process(publish).await {
            self.puback(publish);
        }
    }

    /// Acknowledges a QoS 1 message to the broker.
    fn puback(&self, publish: &Publish) {
        if publish.qos != QoS::AtMostOnce
            && let Err(err) = self.client.try_ack(publish)
        {
            // Not acknowledged: the broker delivers it again after a reconnect.
            warn!(topic = %publish.topic, cause = %err, "could not acknowledge an MQTT message");
        }
    }

    /// Handles one message; returns whether it may be acknowledged.
    async fn process(&self, publish: &Publish) -> bool {
        let metrics = self.metrics();
        let topic = match Topic::parse(&publish.topic) {
            Ok(topic) => topic,
            Err(cause) => {
                metrics.rejected(Rejection::Topic);
                warn!(topic = %publish.topic, %cause, "rejected MQTT message: bad topic");
                return true;
            }
        };
        // An empty retained message clears a retained status: nothing to report.
        if topic.kind == TopicKind::Status && publish.payload.is_empty() {
            return true;
        }
        match self.accept(&topic, &publish.payload) {
            Ok(Accepted::NextTick) => {}
            Ok(Accepted::Delivery(event)) => return self.deliver(&topic, &event).await,
            Ok(Accepted::CommandAck(ack)) => {
                emit::command_ack(&self.io, metrics, &topic, &ack).await;
            }
            Err(Rejected { why, cause }) => {
                metrics.rejected(why);
                warn!(topic = %publish.topic, %cause, bytes = publish.payload.len(), "rejected MQTT message: {}", why.describe());
            }
        }
        true
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

    /// Records a delivery event durably and queues it for its recipients, then emits it to
    /// them; returns whether it may be acknowledged (false: not stored, the broker must
    /// deliver it again).
    async fn deliver(&self, topic: &Topic, event: &DeliveryEvent) -> bool {
        let stored = async {
            let recipients = self
                .hub
                .delivery_recipients(&topic.fleet, &event.order)
                .await?;
            let payload = order::delivery(topic, event, recipients.store.as_deref());
            self.hub
                .record_delivery(topic, event, &recipients.clients, &payload)
                .await
        }
        .await;
        match stored {
            Ok(messages) => {
                // Committed: the clients are told, then (in `handle`) the broker gets its ack.
                emit::queued(&self.io, self.metrics(), &messages).await;
                true
            }
            Err(err) => {
                self.metrics().count(Counter::EventsUnacked);
                warn!(topic = %topic.name(), cause = %err, "delivery event not stored; left unacknowledged");
                false
            }
        }
    }
}
