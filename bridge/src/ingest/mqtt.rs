//! The MQTT side's task: it owns the rumqttc event loop, keeps it polled, reconnects with
//! backoff, subscribes again after every connect, and hands each PUBLISH to the [`Inbox`].

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use shared::TopicKind;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use url::Url;

use super::inbox::Inbox;
use crate::error::BridgeError;
use crate::metrics::Counter;

/// An MQTT broker address, with optional credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Username and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
}

impl MqttEndpoint {
    /// Parses `mqtt://[user[:password]@]host[:port]` (`tcp://` is accepted too; the port
    /// defaults to 1883).
    ///
    /// # Errors
    /// [`BridgeError::MqttUrl`] if the URL is not of that form.
    pub fn parse(raw: &str) -> Result<Self, BridgeError> {
        let bad = |reason: &str| BridgeError::MqttUrl {
            url: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let url = Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "mqtt" | "tcp") {
            return Err(bad("scheme must be mqtt:// or tcp://"));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let credentials = match url.username() {
            "" => None,
            user => Some((
                user.to_owned(),
                url.password().unwrap_or_default().to_owned(),
            )),
        };
        Ok(Self {
            host,
            port: url.port().unwrap_or(1883),
            credentials,
        })
    }
}

/// The topic kinds the bridge subscribes to, each at the QoS that kind is published at (the
/// broker delivers at the subscription's QoS, so a QoS 0 kind must not be subscribed at 1).
const SUBSCRIPTIONS: [TopicKind; 4] = [
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

/// Builds the rumqttc client (`client_id`, pinging every `keep_alive`) and event loop for
/// `endpoint`.
pub(crate) fn connect(
    endpoint: &MqttEndpoint,
    client_id: &str,
    keep_alive: Duration,
) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, &endpoint.host, endpoint.port);
    options
        .set_keep_alive(keep_alive)
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
pub(crate) async fn run(
    client: AsyncClient,
    mut eventloop: EventLoop,
    inbox: Inbox,
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
                inbox.metrics().count(Counter::MqttConnects);
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
                inbox.metrics().set_mqtt_ready(ok);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => inbox.handle(&publish).await,
            Ok(_) => {}
            Err(err) => {
                inbox.metrics().set_mqtt_ready(false);
                inbox.metrics().count(Counter::MqttErrors);
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
    inbox.metrics().set_mqtt_ready(false);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mqtt_urls() {
        let e = MqttEndpoint::parse("mqtt://127.0.0.1:18830").expect("valid");
        assert_eq!(
            (e.host.as_str(), e.port, e.credentials),
            ("127.0.0.1", 18830, None)
        );
        let e = MqttEndpoint::parse("tcp://bridge:s3cret@broker.local").expect("valid");
        assert_eq!(e.port, 1883);
        assert_eq!(e.credentials, Some(("bridge".into(), "s3cret".into())));
        let e = MqttEndpoint::parse("mqtt://[::1]:1884").expect("valid");
        assert_eq!(e.host, "::1");
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(MqttEndpoint::parse("http://x:1").is_err());
        assert!(MqttEndpoint::parse("127.0.0.1:1883").is_err());
        assert!(MqttEndpoint::parse("mqtt://").is_err());
    }
}
