//! Running rumqttd on its own thread, and knowing when it is really ready.
//!
//! rumqttd's `Broker::start` blocks for as long as any of its listeners runs, binds the
//! listeners itself, and reports neither readiness nor a failed bind (a listener thread that
//! cannot bind logs an error and ends; `start` returns only once all of them ended). So
//! [`Broker::start`]:
//!
//! 1. binds every listen address itself, all at once (port 0 becomes a free port, distinct
//!    for v4 and v5), then releases them for rumqttd: a taken address fails here, at once,
//!    with [`BrokerError::Bind`];
//! 2. runs rumqttd on a thread named `rumqttd`, after registering an internal connection
//!    with rumqttd's router that subscribes to a random probe topic;
//! 3. probes each listener until it answers: TCP connect, MQTT CONNECT/CONNACK, PUBLISH of
//!    a random token on the probe topic; then waits for the router to deliver that token to
//!    the internal connection. The delivery proves the listener is this broker's, not a
//!    process that grabbed the port between step 1 and rumqttd's bind;
//! 4. gives up when the startup bound elapses, or at once if the thread ends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use tracing::{debug, error};

use crate::config::{BrokerConfig, Listener};
use crate::error::{BrokerError, ProbeError};
use crate::probe::{self, ProbeMessage};

/// Name of the thread rumqttd's `Broker::start` runs on.
const THREAD_NAME: &str = "rumqttd";

/// Topic prefix of the readiness probe's messages; the last level is random per broker.
const PROBE_TOPIC_PREFIX: &str = "fleetbeat-broker/probe";

/// Longest wait for one probe attempt (connect + CONNACK) before trying again.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// A running broker: rumqttd on its own thread, every listener proven to accept MQTT.
///
/// rumqttd has no stop API, so **the broker runs until the process exits**. Dropping this
/// handle does not stop it and does not block; it only forgets the thread. Tests can start as
/// many brokers as they like on ephemeral ports ([`BrokerConfig::ephemeral`]); each keeps its
/// threads (rumqttd's router, one per listener, and ours) until the test binary exits.
#[derive(Debug)]
pub struct Broker {
    v4: SocketAddr,
    v5: Option<SocketAddr>,
    thread: JoinHandle<()>,
}

impl Broker {
    /// Starts rumqttd with `config` and returns once every listener completes an MQTT
    /// handshake with this broker's router (see the [module docs](self) for how), within
    /// [`BrokerConfig::startup_timeout`].
    ///
    /// Must be called from within a Tokio runtime (with the `time` and `net` drivers). If the
    /// returned future is dropped before it completes, or if it fails after spawning the
    /// thread, whatever rumqttd already started keeps running until the process exits.
    ///
    /// The readiness probe publishes one QoS 0 message per listener on
    /// `fleetbeat-broker/probe/<random>`, before any client can have subscribed, and leaves one
    /// internal connection registered with the router (not counted in
    /// [`BrokerConfig::max_connections`]).
    ///
    /// # Errors
    ///
    /// - [`BrokerError::InvalidConfig`] if [`BrokerConfig::validate`] rejects `config`;
    /// - [`BrokerError::Bind`] if a listen address is taken or unusable;
    /// - [`BrokerError::Spawn`] if the thread cannot be spawned;
    /// - [`BrokerError::ThreadExited`] if the rumqttd thread returns or panics during startup;
    /// - [`BrokerError::RouterUnavailable`] if rumqttd's router does not register the probe;
    /// - [`BrokerError::NotReady`] if a listener does not answer MQTT within the bound;
    /// - [`BrokerError::ForeignListener`] if a listener answers MQTT but is not this broker.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        config.validate()?;
        let listeners = reserve_addresses(&config)?;
        launch(&config, &listeners).await
    }

    /// Address of the MQTT 3.1.1 listener, with the port resolved if 0 was asked for. If the
    /// configured IP is unspecified (`0.0.0.0`), so is this one: connect to loopback instead.
    pub fn v4_addr(&self) -> SocketAddr {
        self.v4
    }

    /// Address of the MQTT 5 listener, if one was configured; as for [`Self::v4_addr`].
    pub fn v5_addr(&self) -> Option<SocketAddr> {
        self.v5
    }

    /// Whether the `rumqttd` thread still runs. It ends only if every listener has stopped
    /// (rumqttd's `Broker::start` returned) or on a panic; it logs why at `error` level.
    pub fn is_alive(&self) -> bool {
        !self.thread.is_finished()
    }
}

/// Binds every configured address at once, reads back the ports and releases them.
///
/// Holding them all together is what makes two port-0 requests come back as two ports.
fn reserve_addresses(config: &BrokerConfig) -> Result<Vec<(Listener, SocketAddr)>, BrokerError> {
    let held = config
        .listeners()
        .map(|(listener, addr)| {
            std::net::TcpListener::bind(addr)
                .and_then(|socket| Ok((listener, socket.local_addr()?, socket)))
                .map_err(|source| BrokerError::Bind {
                    listener,
                    addr,
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(held
        .into_iter()
        .map(|(listener, addr, _socket)| (listener, addr))
        .collect())
}

/// Starts rumqttd on `listeners` (ports already resolved) and waits until each is ready.
async fn launch(
    config: &BrokerConfig,
    listeners: &[(Listener, SocketAddr)],
) -> Result<Broker, BrokerError> {
    let deadline = Instant::now() + config.startup_timeout;
    let find = |wanted| {
        listeners
            .iter()
            .find(|(l, _)| *l == wanted)
            .map(|(_, a)| *a)
    };
    let v4 = find(Listener::V4).unwrap_or(config.v4);
    let v5 = find(Listener::V5);

    let rumqttd_config = config.to_rumqttd(v4, v5);
    let topic = format!("{PROBE_TOPIC_PREFIX}/{:016x}", fastrand::u64(..));
    let (probe_tx, probe_rx) = oneshot::channel();
    let (exit_tx, mut exit_rx) = oneshot::channel();
    let thread = thread::Builder::new()
        .name(THREAD_NAME.to_owned())
        .spawn(move || run_rumqttd(rumqttd_config, topic, probe_tx, exit_tx))
        .map_err(BrokerError::Spawn)?;

    let ready = async {
        let mut probe = match timeout_at(deadline, probe_rx).await {
            Ok(Ok(probe)) => probe,
            // The thread ended without handing the probe over; the exit branch below says why.
            Ok(Err(_)) => {
                sleep_until(deadline).await;
                return Err(router_unavailable(
                    config,
                    "the thread ended before handing over the probe connection",
                ));
            }
            Err(_) => return Err(router_unavailable(config, "the probe connection timed out")),
        };
        for &(listener, addr) in listeners {
            await_listener(&mut probe, listener, addr, deadline, config.startup_timeout).await?;
        }
        probe.release();
        Ok(())
    };

    tokio::select! {
        biased;
        exit = &mut exit_rx => Err(BrokerError::ThreadExited {
            reason: exit.unwrap_or_else(|_| "it ended without saying why".to_owned()),
        }),
        ready = ready => {
            ready?;
            debug!(%v4, ?v5, "broker ready");
            Ok(Broker { v4, v5, thread })
        }
    }
}

fn router_unavailable(config: &BrokerConfig, what: &str) -> BrokerError {
    BrokerError::RouterUnavailable {
        reason: format!("{what} (waited {:?})", config.startup_timeout),
    }
}

/// The body of the `rumqttd` thread. Sends why it ended on `exit` (it only ends on failure).
fn run_rumqttd(
    config: rumqttd::Config,
    topic: String,
    probe: oneshot::Sender<RouterProbe>,
    exit: oneshot::Sender<String>,
) {
    let outcome = panic::catch_unwind(AssertUnwindSafe(move || {
        let mut broker = rumqttd::Broker::new(config);
        let client_id = format!("fleetbeat-broker-{:016x}", fastrand::u64(..));
        let (mut tx, rx) = match broker.link(&client_id) {
            Ok(link) => link,
            Err(err) => return format!("the router refused the probe connection: {err}"),
        };
        if let Err(err) = tx.subscribe(topic.as_str()) {
            return format!("the router refused the probe subscription: {err}");
        }
        // If the caller has given up already, rumqttd runs regardless: it cannot be stopped.
        let _ = probe.send(RouterProbe { tx, rx, topic });
        match broker.start() {
            Ok(()) => "rumqttd returned: none of its listeners is running".to_owned(),
            Err(err) => format!("rumqttd failed: {err}"),
        }
    }));
    let reason = outcome.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string payload".to_owned());
        format!("rumqttd panicked: {message}")
    });
    error!(reason = %reason, "the broker thread ended");
    // Nobody listens once startup is over; `Broker::is_alive` reports it then.
    let _ = exit.send(reason);
}

/// The router-side end of the readiness probe: an internal connection subscribed to a
/// random topic.
struct RouterProbe {
    tx: LinkTx,
    rx: LinkRx,
    topic: String,
}

impl RouterProbe {
    /// Waits until the router forwards a message with `payload` on the probe topic.
    async fn delivered(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        loop {
            // `None` and other notifications (the SUBACK) are not what we wait for.
            if let Some(Notification::Forward(forward)) = self.rx.next().await?
                && forward.publish.payload.as_ref() == payload
            {
                return Ok(());
            }
        }
    }

    /// Unsubscribes (without blocking) so nothing more is routed here, and drops the link.
    /// rumqttd offers no way to deregister a local connection; its slot stays taken.
    fn release(mut self) {
        if let Err(err) = self.tx.try_unsubscribe(self.topic.as_str()) {
            debug!(error = %err, "could not unsubscribe the readiness probe");
        }
    }
}

/// Probes `addr` until an MQTT handshake succeeds and its message reaches our router.
async fn await_listener(
    probe: &mut RouterProbe,
    listener: Listener,
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let target = connectable(addr);
    let client_id = format!("fbprobe{:016x}", fastrand::u64(..));
    let payload = format!("{listener:?} {:016x}", fastrand::u64(..));
    let message = ProbeMessage {
        client_id: &client_id,
        topic: &probe.topic,
        payload: payload.as_bytes(),
    };

    let mut backoff = Duration::ZERO;
    loop {
        let attempt_deadline = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
        let err: ProbeError =
            match probe::publish_once(target, listener, message, attempt_deadline).await {
                Ok(()) => break,
                Err(err) => err,
            };
        debug!(%listener, %addr, error = %err, "listener not ready yet");
        // No event announces rumqttd's bind: retry, backing off, until the deadline.
        backoff = probe::next_backoff(backoff);
        if Instant::now() + backoff >= deadline {
            return Err(BrokerError::NotReady {
                listener,
                addr,
                timeout,
                last_error: Some(err),
            });
        }
        sleep(backoff).await;
    }

    match timeout_at(deadline, probe.delivered(payload.as_bytes())).await {
        Ok(Ok(())) => {
            debug!(%listener, %addr, "listener ready");
            Ok(())
        }
        Ok(Err(err)) => Err(BrokerError::RouterUnavailable {
            reason: format!("the router dropped the probe connection: {err}"),
        }),
        Err(_) => Err(BrokerError::ForeignListener { listener, addr }),
    }
}

/// Where to connect to reach a listener bound to `addr`: loopback for a wildcard address.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;

    use super::*;

    /// Outer bound on anything a test awaits; generous, the code under test has its own.
    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        timeout(TEST_TIMEOUT, Broker::start(config))
            .await
            .expect("Broker::start must return within its bound")
    }

    /// Sends `connect` and returns the CONNACK's bytes, checking only the fixed header.
    async fn connack(addr: SocketAddr, connect: &[u8]) -> io::Result<Vec<u8>> {
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(connect).await?;
            let mut header = [0u8; 2];
            stream.read_exact(&mut header).await?;
            assert_eq!(header[0], 0x20, "not a CONNACK");
            assert!(header[1] < 0x80, "unexpectedly long CONNACK");
            let mut body = vec![0; usize::from(header[1])];
            stream.read_exact(&mut body).await?;
            Ok([&header[..], &body].concat())
        };
        timeout(TEST_TIMEOUT, exchange).await?
    }

    /// MQTT 3.1.1 CONNECT, clean session, keep-alive 30 s, client id `unit-test-v4`.
    const CONNECT_V4: &[u8] = b"\x10\x18\x00\x04MQTT\x04\x02\x00\x1e\x00\x0cunit-test-v4";
    /// MQTT 5 CONNECT, clean start, keep-alive 30 s, no properties, client id `unit-test-v5`.
    const CONNECT_V5: &[u8] = b"\x10\x19\x00\x04MQTT\x05\x02\x00\x1e\x00\x00\x0cunit-test-v5";

    async fn assert_speaks_mqtt(broker: &Broker) {
        let v4 = connack(broker.v4_addr(), CONNECT_V4).await.unwrap();
        assert_eq!(v4, [0x20, 0x02, 0x00, 0x00], "v4 CONNACK: accepted");
        let v5 = connack(broker.v5_addr().unwrap(), CONNECT_V5)
            .await
            .unwrap();
        assert_eq!(
            v5[2], 0x00,
            "v5 CONNACK reason code: success, got {v5:02x?}"
        );
    }

    #[tokio::test]
    async fn ephemeral_broker_answers_mqtt_on_both_listeners() {
        let broker = start(BrokerConfig::ephemeral()).await.unwrap();

        assert_ne!(broker.v4_addr().port(), 0);
        let v5 = broker.v5_addr().expect("a v5 listener");
        assert_ne!(v5.port(), 0);
        assert_ne!(v5, broker.v4_addr());
        assert!(broker.is_alive());
        assert_speaks_mqtt(&broker).await;
    }

    #[tokio::test]
    async fn v5_listener_is_optional() {
        let config = BrokerConfig {
            v5: None,
            ..BrokerConfig::ephemeral()
        };
        let broker = start(config).await.unwrap();
        assert_eq!(broker.v5_addr(), None);
        let v4 = connack(broker.v4_addr(), CONNECT_V4).await.unwrap();
        assert_eq!(v4, [0x20, 0x02, 0x00, 0x00]);
    }

    #[tokio::test]
    async fn two_brokers_run_in_one_process() {
        let (a, b) = tokio::join!(
            start(BrokerConfig::ephemeral()),
            start(BrokerConfig::ephemeral())
        );
        let (a, b) = (a.unwrap(), b.unwrap());

        let mut ports = [
            a.v4_addr().port(),
            a.v5_addr().unwrap().port(),
            b.v4_addr().port(),
            b.v5_addr().unwrap().port(),
        ];
        ports.sort_unstable();
        assert!(ports.windows(2).all(|w| w[0] != w[1]), "ports {ports:?}");
        assert!(a.is_alive() && b.is_alive());
        assert_speaks_mqtt(&a).await;
        assert_speaks_mqtt(&b).await;
    }

    #[tokio::test]
    async fn taken_port_is_a_bind_error_not_a_hang() {
        let squatter = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = squatter.local_addr().unwrap();

        for (listener, config) in [
            (
                Listener::V4,
                BrokerConfig {
                    v4: taken,
                    ..BrokerConfig::ephemeral()
                },
            ),
            (
                Listener::V5,
                BrokerConfig {
                    v5: Some(taken),
                    ..BrokerConfig::ephemeral()
                },
            ),
        ] {
            let started = Instant::now();
            match start(config).await {
                Err(BrokerError::Bind {
                    listener: l,
                    addr,
                    source,
                }) => {
                    assert_eq!(l, listener);
                    assert_eq!(addr, taken);
                    assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
                }
                other => panic!("expected a bind error for {listener}, got {other:?}"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "it should fail at once"
            );
        }
    }

    /// A port taken after our check: rumqttd cannot bind it, and the squatter answers MQTT.
    #[tokio::test]
    async fn squatter_answering_mqtt_is_a_foreign_listener() {
        let squatter = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = squatter.local_addr().unwrap();
        let fake_broker = tokio::spawn(async move {
            while let Ok((mut stream, _)) = squatter.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    // Accept any CONNECT, swallow whatever follows.
                    if stream.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        stream.write_all(&[0x20, 0x02, 0x00, 0x00]).await.ok();
                        while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                    }
                });
            }
        });

        // A real v5 listener keeps rumqttd's thread alive after its v4 bind fails.
        let config = BrokerConfig {
            startup_timeout: Duration::from_secs(1),
            ..BrokerConfig::ephemeral()
        };
        let v5 = reserve_addresses(&config).unwrap()[1];
        let result = timeout(TEST_TIMEOUT, launch(&config, &[(Listener::V4, taken), v5])).await;
        fake_broker.abort();

        match result.expect("launch must return within its bound") {
            Err(BrokerError::ForeignListener { listener, addr }) => {
                assert_eq!((listener, addr), (Listener::V4, taken));
            }
            other => panic!("expected ForeignListener, got {other:?}"),
        }
    }

    /// A port taken after our check by something that accepts but never answers.
    #[tokio::test]
    async fn silent_squatter_is_not_ready_within_the_bound() {
        let squatter = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = squatter.local_addr().unwrap();
        let config = BrokerConfig {
            startup_timeout: Duration::from_millis(500),
            ..BrokerConfig::ephemeral()
        };
        let v5 = reserve_addresses(&config).unwrap()[1];

        let started = Instant::now();
        let result = timeout(TEST_TIMEOUT, launch(&config, &[(Listener::V4, taken), v5])).await;
        match result.expect("launch must return within its bound") {
            Err(BrokerError::NotReady {
                listener,
                addr,
                last_error: Some(ProbeError::TimedOut(_)),
                ..
            }) => assert_eq!((listener, addr), (Listener::V4, taken)),
            other => panic!("expected NotReady after a timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(squatter);
    }

    /// rumqttd's only listener cannot bind: its thread returns, and we say so at once.
    #[tokio::test]
    async fn thread_exit_during_startup_is_reported_at_once() {
        let squatter = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = squatter.local_addr().unwrap();
        let config = BrokerConfig {
            v5: None,
            ..BrokerConfig::ephemeral()
        };

        let started = Instant::now();
        let result = timeout(TEST_TIMEOUT, launch(&config, &[(Listener::V4, taken)])).await;
        match result.expect("launch must return within its bound") {
            Err(BrokerError::ThreadExited { reason }) => {
                assert!(reason.contains("none of its listeners"), "{reason}");
            }
            other => panic!("expected ThreadExited, got {other:?}"),
        }
        assert!(started.elapsed() < config.startup_timeout / 2);
        drop(squatter);
    }

    #[test]
    fn wildcard_addresses_are_probed_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:1883".parse().unwrap();
        let v6: SocketAddr = "[::]:1884".parse().unwrap();
        let specific: SocketAddr = "192.0.2.7:1883".parse().unwrap();
        assert_eq!(connectable(v4), "127.0.0.1:1883".parse().unwrap());
        assert_eq!(connectable(v6), "[::1]:1884".parse().unwrap());
        assert_eq!(connectable(specific), specific);
    }
}
