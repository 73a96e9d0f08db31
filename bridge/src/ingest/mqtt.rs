//! The MQTT side's tasks, one per [`Session`]: each owns a rumqttc event loop, keeps it
//! polled, reconnects with backoff, subscribes again after every connect, and hands each
//! PUBLISH to the [`Inbox`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use shared::TopicKind;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use url::Url;

use super::inbox::Inbox;
use crate::error::BridgeError;
use crate::metrics::{Counter, Metrics};
use crate::tls::{TlsError, client_config};

/// TLS towards the broker (`mqtts://`): the CA bundle trusted (nothing else is: no system
/// roots are built in), the client certificate presented if any (mutual TLS), and the rustls
/// configuration made from them. Compared by its files.
#[derive(Clone)]
pub struct MqttTls {
    ca_file: PathBuf,
    client_cert: Option<(PathBuf, PathBuf)>,
    config: Arc<rustls::ClientConfig>,
}

impl MqttTls {
    /// Trusts the CA certificates of the PEM bundle `ca_file`; presents `client` (certificate,
    /// key) if given.
    ///
    /// # Errors
    /// [`TlsError`] if a file cannot be read or used.
    pub fn load(ca_file: &Path, client: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        Ok(Self {
            ca_file: ca_file.to_owned(),
            client_cert: client.map(|(cert, key)| (cert.to_owned(), key.to_owned())),
            config: client_config(ca_file, client)?,
        })
    }
}

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTls")
            .field("ca_file", &self.ca_file)
            .field(
                "client_cert",
                &self.client_cert.as_ref().map(|(cert, _)| cert),
            )
            .finish_non_exhaustive()
    }
}

impl PartialEq for MqttTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file && self.client_cert == other.client_cert
    }
}

impl Eq for MqttTls {}

/// An MQTT broker address, with optional credentials and TLS. Its `Debug` and `Display` never
/// show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    /// Host name or IP address (with TLS: the name the broker's certificate must carry).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Username and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// TLS (`mqtts://`), or `None` for plain TCP.
    pub tls: Option<MqttTls>,
}

impl std::fmt::Debug for MqttEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(user, _)| (user, "<password>")),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

impl std::fmt::Display for MqttEndpoint {
    /// `mqtt[s]://[user:***@]host:port`: the password never shows.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.tls.is_some() {
            "mqtts://"
        } else {
            "mqtt://"
        })?;
        if let Some((user, _)) = &self.credentials {
            write!(f, "{user}:***@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `raw`, an MQTT URL as given, with the password of its `user:password@` part (if any)
/// replaced by `***`, for logs and errors. Works on URLs that do not parse, too.
pub fn redact_url(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://").map(|i| i + 3) else {
        // No scheme: `user:password@host` may still be there.
        return redact_authority(raw, 0);
    };
    redact_authority(raw, scheme_end)
}

/// Redacts the password in the authority that starts at `start` in `raw`.
fn redact_authority(raw: &str, start: usize) -> String {
    let rest = &raw[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let Some(at) = authority.rfind('@') else {
        return raw.to_owned();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    if user.len() == userinfo.len() {
        return raw.to_owned();
    }
    format!("{}{user}:***{}", &raw[..start], &rest[at..])
}

impl MqttEndpoint {
    /// Parses `mqtt://[user[:password]@]host[:port]` (`tcp://` is accepted too; the port
    /// defaults to 1883), plain TCP.
    ///
    /// # Errors
    /// [`BridgeError::MqttUrl`] if the URL is not of that form (an `mqtts://` URL needs
    /// [`Self::parse_with_tls`]); it quotes the URL without its password.
    pub fn parse(raw: &str) -> Result<Self, BridgeError> {
        Self::parse_with_tls(raw, None)
    }

    /// Parses `mqtt://[user[:password]@]host[:port]` (port 1883; `tcp://` too) without `tls`,
    /// or `mqtts://...` (port 8883; `ssl://` too) with it.
    ///
    /// # Errors
    /// [`BridgeError::MqttUrl`] if the URL is not of that form, if it is `mqtts://` without
    /// `tls` (no system roots are built in: name the broker's CA with `mqtt_ca_file`), or
    /// `mqtt://` with it; it quotes the URL without its password.
    pub fn parse_with_tls(raw: &str, tls: Option<MqttTls>) -> Result<Self, BridgeError> {
        let bad = |reason: &str| BridgeError::MqttUrl {
            url: redact_url(raw),
            reason: reason.to_owned(),
        };
        let url = Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
        let default_port = match (url.scheme(), &tls) {
            ("mqtt" | "tcp", None) => 1883,
            ("mqtts" | "ssl", Some(_)) => 8883,
            ("mqtts" | "ssl", None) => {
                return Err(bad(
                    "mqtts:// needs mqtt_ca_file (the CA bundle that signed the broker's \
                     certificate; no system roots are built in)",
                ));
            }
            ("mqtt" | "tcp", Some(_)) => {
                return Err(bad(
                    "mqtt_ca_file is set but the URL is plain mqtt://: use mqtts://",
                ));
            }
            _ => return Err(bad("scheme must be mqtt://, tcp://, mqtts:// or ssl://")),
        };
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
            port: url.port().unwrap_or(default_port),
            credentials,
            tls,
        })
    }
}

/// The bridge's two MQTT sessions, each a connection of its own, with the same login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Session {
    /// Statuses, delivery events and command acks (QoS 1), and the commands the bridge
    /// publishes: a persistent session (the broker keeps what arrives while the bridge is
    /// away), with manual acks released in order by the `AckQueue`. Client id: the
    /// configured one.
    Events,
    /// Heartbeats (QoS 0): a clean session of its own, client id `{client id}-hb`, so that
    /// positions keep flowing while the broker holds QoS 1 messages back for the events
    /// session (rumqttd's router sends a link nothing more, heartbeats included, once it has
    /// 100 unacknowledged messages: a store that cannot write would freeze the map). With
    /// the embedded broker (and no shared group) the heartbeats come in-process instead
    /// (`ingest::local`), and this session is not opened.
    Heartbeats,
}

impl Session {
    /// The topic kinds the session subscribes to, each at the QoS that kind is published at
    /// (the broker delivers at the subscription's QoS, so a QoS 0 kind must not be subscribed
    /// at 1).
    fn kinds(self) -> &'static [TopicKind] {
        match self {
            Self::Events => &[TopicKind::Status, TopicKind::Event, TopicKind::Ack],
            Self::Heartbeats => &[TopicKind::Heartbeat],
        }
    }

    /// The session's client id, for the bridge's configured `client_id`.
    pub(crate) fn client_id(self, client_id: &str) -> String {
        match self {
            Self::Events => client_id.to_owned(),
            Self::Heartbeats => format!("{client_id}-hb"),
        }
    }

    /// Its name in the log.
    fn name(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Heartbeats => "heartbeats",
        }
    }

    fn set_ready(self, metrics: &Metrics, ready: bool) {
        match self {
            Self::Events => metrics.set_mqtt_ready(ready),
            Self::Heartbeats => metrics.set_mqtt_heartbeats_ready(ready),
        }
    }

    fn count_connect(self, metrics: &Metrics) {
        metrics.count(match self {
            Self::Events => Counter::MqttConnects,
            Self::Heartbeats => Counter::MqttHeartbeatConnects,
        });
    }

    fn count_error(self, metrics: &Metrics) {
        metrics.count(match self {
            Self::Events => Counter::MqttErrors,
            Self::Heartbeats => Counter::MqttHeartbeatErrors,
        });
    }
}

/// Largest MQTT packet the bridge accepts or sends.
const MAX_PACKET: usize = 16 * 1024;

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The MQTT options for `endpoint` with `client_id`: its address, its TLS if any, its
/// credentials. Every MQTT connection of the bridge is made from these.
pub(crate) fn options(endpoint: &MqttEndpoint, client_id: String) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, &endpoint.host, endpoint.port);
    if let Some(tls) = &endpoint.tls {
        // rumqttc checks the broker's certificate against `endpoint.host`.
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(&tls.config),
        )));
    }
    if let Some((user, password)) = &endpoint.credentials {
        options.set_credentials(user, password);
    }
    options
}

/// Builds the rumqttc client and event loop of `session` for `endpoint` (the bridge's
/// `client_id`, pinging every `keep_alive`).
pub(crate) fn connect(
    endpoint: &MqttEndpoint,
    client_id: &str,
    keep_alive: Duration,
    session: Session,
) -> (AsyncClient, EventLoop) {
    let mut options = options(endpoint, session.client_id(client_id));
    let events = session == Session::Events;
    options
        .set_keep_alive(keep_alive)
        // Events: a persistent session, so QoS 1 messages published while the bridge is
        // briefly away are kept by the broker and delivered when it is back. Heartbeats are
        // QoS 0: nothing to keep.
        .set_clean_session(!events)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        // A delivery event is acknowledged only once it is committed to the store.
        .set_manual_acks(events);
    let (client, mut eventloop) = AsyncClient::new(options, if events { 1024 } else { 16 });
    // Commands and PUBACKs are small writes: without TCP_NODELAY, Nagle holds them back until
    // the broker's delayed ACK (up to 40 ms on Linux).
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// The subscription filter of `kind` for a bridge in `shared_group` (issue #15): device topics
/// as `$share/{group}/fleet/+/+/{kind}`, so that the broker gives each message to one bridge of
/// the group, except command acks, which every bridge subscribes to plainly: the ack of a
/// command goes back to the bridge that sent it, whichever bridge the broker would pick.
fn filter(kind: TopicKind, shared_group: Option<&str>) -> String {
    match shared_group {
        Some(group) if kind != TopicKind::Ack => format!("$share/{group}/{}", kind.filter()),
        _ => kind.filter().to_owned(),
    }
}

fn subscribe(
    client: &AsyncClient,
    session: Session,
    shared_group: Option<&str>,
) -> Result<(), rumqttc::ClientError> {
    client.try_subscribe_many(
        session
            .kinds()
            .iter()
            .map(|&kind| SubscribeFilter::new(filter(kind, shared_group), qos(kind.qos()))),
    )
}

/// How many times in a row the broker may close a session soon after accepting it before the
/// bridge says that another client probably uses its client id.
const TAKEOVERS_BEFORE_ERROR: u32 = 3;
/// A connection the broker closes within this time of its CONNACK counts towards
/// [`TAKEOVERS_BEFORE_ERROR`].
const TAKEOVER_WINDOW: Duration = Duration::from_secs(10);

/// What a session subscribes with, and how it reconnects.
#[derive(Debug, Clone)]
pub(crate) struct Subscriptions {
    /// The bridges' shared-subscription group, if several bridges share the devices.
    pub(crate) shared_group: Option<Arc<str>>,
    /// The bridge's configured client id (for the log).
    pub(crate) client_id: Arc<str>,
    /// Upper bound of the reconnect backoff.
    pub(crate) max_backoff: Duration,
}

/// Polls the event loop of `session` until `cancel` fires, then disconnects cleanly.
///
/// Reconnects with exponential backoff and jitter (up to `max_backoff`) and subscribes again
/// after every CONNACK: a persistent session may have been lost by the broker. A message is
/// handled to its end before the next poll; a delivery event's commit (which may wait for the
/// store) happens in the ack queue's task, not here.
pub(crate) async fn run(
    client: AsyncClient,
    mut eventloop: EventLoop,
    session: Session,
    inbox: Arc<Inbox>,
    subscriptions: Subscriptions,
    cancel: CancellationToken,
) {
    let Subscriptions {
        shared_group,
        client_id,
        max_backoff,
    } = subscriptions;
    let name = session.name();
    let mut backoff = Duration::from_millis(100);
    // When the last CONNACK came, and how many connections in a row the broker closed soon
    // after it: two bridges with one client id take the session from each other in turn.
    let mut connected_at: Option<Instant> = None;
    let mut early_closes = 0u32;
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    warn!(session = name, code = ?ack.code, "MQTT connection refused");
                    continue;
                }
                info!(
                    session = name,
                    session_present = ack.session_present,
                    "MQTT connected"
                );
                if session == Session::Events {
                    inbox.acks().new_connection();
                }
                session.count_connect(inbox.metrics());
                backoff = Duration::from_millis(100);
                connected_at = Some(Instant::now());
                if let Err(err) = subscribe(&client, session, shared_group.as_deref()) {
                    warn!(session = name, cause = %err, "could not queue MQTT subscriptions");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|code| matches!(code, SubscribeReasonCode::Success(_)));
                if ok {
                    info!(session = name, "MQTT subscriptions active");
                } else {
                    warn!(session = name, codes = ?ack.return_codes, "MQTT broker refused a subscription");
                }
                session.set_ready(inbox.metrics(), ok);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => match session {
                Session::Events => inbox.handle(&publish).await,
                Session::Heartbeats => inbox.heartbeat(publish.topic.as_bytes(), &publish.payload),
            },
            Ok(_) => {}
            Err(err) => {
                if session == Session::Events {
                    // rumqttc drops the PUBACKs it has not sent yet; those still to come
                    // must not be sent on the next connection either.
                    inbox.acks().new_connection();
                }
                session.set_ready(inbox.metrics(), false);
                session.count_error(inbox.metrics());
                match connected_at.take() {
                    Some(at) if at.elapsed() < TAKEOVER_WINDOW => early_closes += 1,
                    Some(_) => early_closes = 0,
                    None => {}
                }
                if early_closes >= TAKEOVERS_BEFORE_ERROR {
                    early_closes = 0;
                    inbox.metrics().count(Counter::MqttSessionTakeovers);
                    error!(
                        session = name,
                        client_id = %session.client_id(&client_id),
                        "the broker closed this session soon after accepting it, {TAKEOVERS_BEFORE_ERROR} times in a row: \
                         another client probably uses the same client id (each bridge needs its own client_id)"
                    );
                }
                let wait = backoff.mul_f64(0.5 + fastrand::f64());
                warn!(session = name, cause = %err, retry_in_ms = wait.as_millis() as u64, "MQTT connection error");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
    session.set_ready(inbox.metrics(), false);
    disconnect(&client, &mut eventloop, name).await;
}

/// Sends DISCONNECT and polls until it is written, for at most a second.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop, name: &str) {
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
        Ok(()) => info!(session = name, "MQTT disconnected"),
        Err(_) => warn!(session = name, "MQTT disconnect not confirmed within 1 s"),
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
    fn passwords_never_show() {
        assert_eq!(
            redact_url("mqtt://bridge:s3cret@broker:1883/x"),
            "mqtt://bridge:***@broker:1883/x"
        );
        assert_eq!(redact_url("mqtt://broker:1883"), "mqtt://broker:1883");
        assert_eq!(redact_url("mqtt://bridge@broker"), "mqtt://bridge@broker");
        assert_eq!(redact_url("bridge:p@ss@broker"), "bridge:***@broker");
        assert_eq!(redact_url("mqtt://u:p@ss@h"), "mqtt://u:***@h");
        for raw in [
            "http://bridge:s3cret@broker:1883",
            "mqtt://bridge:s3cret@",
            "mqtt://bridge:s3cret@broker:99999",
        ] {
            let err = MqttEndpoint::parse(raw).expect_err("invalid").to_string();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.contains("bridge:***@"), "{err}");
        }
        let e = MqttEndpoint::parse("mqtt://bridge:s3cret@broker:1884").expect("valid");
        assert_eq!(e.to_string(), "mqtt://bridge:***@broker:1884");
        assert!(!format!("{e:?}").contains("s3cret"));
    }

    #[test]
    fn mqtts_needs_a_ca_and_defaults_to_8883() {
        let err = MqttEndpoint::parse("mqtts://u:s3cret@broker")
            .expect_err("no CA")
            .to_string();
        assert!(
            err.contains("mqtt_ca_file") && !err.contains("s3cret"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = crate::tls::testing::self_signed(dir.path(), "ca").cert;
        let tls = MqttTls::load(&ca, None).expect("a CA bundle");
        let e =
            MqttEndpoint::parse_with_tls("mqtts://broker.local", Some(tls.clone())).expect("valid");
        assert_eq!((e.host.as_str(), e.port), ("broker.local", 8883));
        assert_eq!(e.to_string(), "mqtts://broker.local:8883");
        let err = MqttEndpoint::parse_with_tls("mqtt://broker.local", Some(tls))
            .expect_err("plain with a CA")
            .to_string();
        assert!(err.contains("mqtts://"), "{err}");
        let options = options(&e, "b".into());
        assert!(matches!(options.transport(), Transport::Tls(_)));
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(MqttEndpoint::parse("http://x:1").is_err());
        assert!(MqttEndpoint::parse("127.0.0.1:1883").is_err());
        assert!(MqttEndpoint::parse("mqtt://").is_err());
    }

    #[test]
    fn a_shared_group_shares_device_topics_but_not_acks() {
        assert_eq!(filter(TopicKind::Heartbeat, None), "fleet/+/+/hb");
        assert_eq!(
            filter(TopicKind::Heartbeat, Some("g")),
            "$share/g/fleet/+/+/hb"
        );
        assert_eq!(
            filter(TopicKind::Event, Some("g")),
            "$share/g/fleet/+/+/event"
        );
        assert_eq!(
            filter(TopicKind::Status, Some("g")),
            "$share/g/fleet/+/+/status"
        );
        assert_eq!(filter(TopicKind::Ack, Some("g")), "fleet/+/+/ack");
    }
}
