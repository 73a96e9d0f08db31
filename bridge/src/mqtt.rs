//! The MQTT side: one task owns the rumqttc event loop, keeps it polled, reconnects with
//! backoff, resubscribes after every connect, and routes each message to Socket.IO.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use shared::{CodecError, Heartbeat, Status, Topic, TopicKind};
use socketioxide::SocketIo;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{BridgeConfig, MqttEndpoint};
use crate::metrics::{Metrics, Rejection};
use crate::socket;
use crate::view::{PositionView, StatusView};

/// The topic kinds the bridge subscribes to, each at the QoS that kind is published at (the
/// broker delivers at the subscription's QoS, so a QoS 0 kind must not be subscribed at 1).
pub const SUBSCRIPTIONS: [TopicKind; 2] = [TopicKind::Heartbeat, TopicKind::Status];

/// Largest MQTT packet the bridge accepts or sends.
const MAX_PACKET: usize = 16 * 1024;

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Builds the rumqttc client and event loop for `endpoint`.
pub fn connect(endpoint: &MqttEndpoint, config: &BridgeConfig) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(&config.client_id, &endpoint.host, endpoint.port);
    options
        .set_keep_alive(config.keep_alive)
        // A persistent session: QoS 1 messages published while the bridge is briefly away
        // are kept by the broker and delivered when it is back.
        .set_clean_session(false)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some((user, password)) = &endpoint.credentials {
        options.set_credentials(user, password);
    }
    AsyncClient::new(options, 1024)
}

/// What the MQTT task needs to route messages.
#[derive(Clone)]
pub struct Router {
    /// The Socket.IO server to emit on.
    pub io: SocketIo,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl Router {
    /// Routes one PUBLISH: parses its topic, decodes its payload and emits it to the rooms of
    /// its vehicle. Anything invalid is counted and logged, never fatal.
    pub async fn route(&self, publish: &Publish) {
        let topic = match Topic::parse(&publish.topic) {
            Ok(topic) => topic,
            Err(cause) => {
                self.metrics.rejected(Rejection::Topic);
                warn!(topic = %publish.topic, %cause, "rejected MQTT message: bad topic");
                return;
            }
        };
        let result = match topic.kind {
            TopicKind::Heartbeat => self.heartbeat(&topic, &publish.payload).await,
            TopicKind::Status => self.status(&topic, &publish.payload).await,
            // Not subscribed: commands are ours, events and acks come with later features.
            kind => {
                debug!(topic = %topic.name(), ?kind, "ignoring unsubscribed kind");
                Ok(())
            }
        };
        if let Err(cause) = result {
            self.metrics.rejected(Rejection::Decode);
            warn!(topic = %topic.name(), %cause, bytes = publish.payload.len(), "rejected MQTT message: bad payload");
        }
    }

    async fn heartbeat(&self, topic: &Topic, payload: &[u8]) -> Result<(), CodecError> {
        let hb: Heartbeat = shared::decode(payload)?;
        self.metrics.received(TopicKind::Heartbeat);
        let view = PositionView::new(topic, &hb);
        socket::emit_to_vehicle(&self.io, &self.metrics, topic, "position", &view).await;
        Ok(())
    }

    async fn status(&self, topic: &Topic, payload: &[u8]) -> Result<(), CodecError> {
        // An empty retained message clears the retained status: nothing to report.
        if payload.is_empty() {
            return Ok(());
        }
        let status: Status = shared::decode(payload)?;
        self.metrics.received(TopicKind::Status);
        let view = StatusView::new(topic, &status);
        socket::emit_to_vehicle(&self.io, &self.metrics, topic, "status", &view).await;
        Ok(())
    }
}

fn subscribe(client: &AsyncClient) -> Result<(), rumqttc::ClientError> {
    client.try_subscribe_many(
        SUBSCRIPTIONS
            .iter()
            .map(|kind| SubscribeFilter::new(kind.filter().to_owned(), qos(kind.qos()))),
    )
}

/// Polls the event loop until `cancel` fires, then disconnects cleanly.
///
/// Reconnects with exponential backoff and jitter (up to `max_backoff`) and subscribes again
/// after every CONNACK: a persistent session may have been lost by the broker.
pub async fn run(
    client: AsyncClient,
    mut eventloop: EventLoop,
    router: Router,
    max_backoff: Duration,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    warn!(code = ?ack.code, "MQTT connection refused");
                    continue;
                }
                info!(session_present = ack.session_present, "MQTT connected");
                router.metrics.mqtt_connected();
                backoff = Duration::from_millis(100);
                if let Err(err) = subscribe(&client) {
                    warn!(cause = %err, "could not queue MQTT subscriptions");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|code| matches!(code, SubscribeReasonCode::Success(_)));
                if ok {
                    info!("MQTT subscriptions active");
                } else {
                    warn!(codes = ?ack.return_codes, "MQTT broker refused a subscription");
                }
                router.metrics.set_mqtt_ready(ok);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => router.route(&publish).await,
            Ok(_) => {}
            Err(err) => {
                router.metrics.set_mqtt_ready(false);
                router.metrics.mqtt_error();
                let wait = backoff.mul_f64(0.5 + fastrand::f64());
                warn!(cause = %err, retry_in_ms = wait.as_millis() as u64, "MQTT connection error");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
    router.metrics.set_mqtt_ready(false);
    disconnect(&client, &mut eventloop).await;
}

/// Sends DISCONNECT and polls until it is written, for at most a second.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let flushed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    match flushed {
        Ok(()) => info!("MQTT disconnected"),
        Err(_) => warn!("MQTT disconnect not confirmed within 1 s"),
    }
}
