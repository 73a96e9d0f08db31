//! The MQTT side: one task owns the rumqttc event loop, keeps it polled, reconnects with
//! backoff, resubscribes after every connect, and routes each message to Socket.IO.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use shared::{Topic, TopicKind};
use socketioxide::SocketIo;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{BridgeConfig, MqttEndpoint};
use crate::emit;
use crate::hub::{Accepted, Hub};
use crate::metrics::Rejection;

/// The topic kinds the bridge subscribes to, each at the QoS that kind is published at (the
/// broker delivers at the subscription's QoS, so a QoS 0 kind must not be subscribed at 1).
pub const SUBSCRIPTIONS: [TopicKind; 4] = [
    TopicKind::Heartbeat,
    TopicKind::Status,
    TopicKind::Event,
    TopicKind::Ack,
];

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
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        // A delivery event is acknowledged only once it is committed to the store.
        .set_manual_acks(true);
    if let Some((user, password)) = &endpoint.credentials {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // Commands and PUBACKs are small writes: without TCP_NODELAY, Nagle holds them back until
    // the broker's delayed ACK (up to 40 ms on Linux).
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// What the MQTT task needs to route messages.
#[derive(Clone)]
pub struct Router {
    /// The Socket.IO server to emit on.
    pub io: SocketIo,
    /// The shared state.
    pub hub: Arc<Hub>,
    /// The client, to acknowledge QoS 1 messages once they are handled (manual acks).
    pub client: AsyncClient,
}

impl Router {
    /// Routes one PUBLISH: parses its topic, checks and decodes its payload, updates the
    /// state and emits what clients must see now. Anything invalid is counted and logged with
    /// the topic, never fatal.
    pub async fn route(&self, publish: &Publish) {
        if self.handle(publish).await {
            self.ack(publish);
        }
    }

    /// Acknowledges a QoS 1 message to the broker.
    fn ack(&self, publish: &Publish) {
        if publish.qos != QoS::AtMostOnce
            && let Err(err) = self.client.try_ack(publish)
        {
            // Not acknowledged: the broker delivers it again after a reconnect.
            warn!(topic = %publish.topic, cause = %err, "could not acknowledge an MQTT message");
        }
    }

    /// Handles one message; returns whether it may be acknowledged (false only when a
    /// delivery event could not be stored: the broker must deliver it again).
    async fn handle(&self, publish: &Publish) -> bool {
        let metrics = &self.hub.metrics;
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
        match self.hub.accept(&topic, &publish.payload) {
            Ok(Accepted::Heartbeat(change) | Accepted::Status(change)) => {
                if let Some(change) = change {
                    // Sent with the next tick's batch.
                    self.hub.fleet().queue_statuses([change]);
                }
            }
            Ok(Accepted::Delivery(event)) => match self.hub.record_delivery(&topic, &event).await {
                Ok(messages) => {
                    // Committed: acknowledge first (in `route`), then tell the clients.
                    emit::queued(&self.io, metrics, &messages).await;
                }
                Err(err) => {
                    metrics.event_unacked();
                    warn!(topic = %publish.topic, cause = %err, "delivery event not stored; left unacknowledged");
                    return false;
                }
            },
            Ok(Accepted::Ack(ack)) => emit::ack(&self.io, metrics, &topic, &ack).await,
            Err((why, cause)) => {
                metrics.rejected(why);
                let what = match why {
                    Rejection::Auth => "unauthenticated origin",
                    Rejection::Replay => "replay",
                    Rejection::Topic => "bad topic",
                    Rejection::Decode => "bad payload",
                };
                warn!(topic = %publish.topic, %cause, bytes = publish.payload.len(), "rejected MQTT message: {what}");
            }
        }
        true
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
                router.hub.metrics.mqtt_connected();
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
                router.hub.metrics.set_mqtt_ready(ok);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => router.route(&publish).await,
            Ok(_) => {}
            Err(err) => {
                router.hub.metrics.set_mqtt_ready(false);
                router.hub.metrics.mqtt_error();
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
    router.hub.metrics.set_mqtt_ready(false);
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
