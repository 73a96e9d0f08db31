//! Starting and stopping the bridge as a whole: builds every layer, spawns the tasks (the
//! MQTT task, the tick, retention, waiting orders, the heartbeat writer, HTTP), and stops
//! them gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use socketioxide::SocketIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::api::https::{HttpsListener, ServerCertificate};
use crate::api::limits::SocketGuard;
use crate::api::{http, socket};
use crate::config::{BridgeConfig, MqttEndpoint, MqttTarget};
use crate::domain::auth::{MetricsAccess, Tokens, parse_token_hash};
use crate::domain::fleet::Fleet;
use crate::domain::{Hub, HubParts};
use crate::error::BridgeError;
use crate::ingest::acks;
use crate::ingest::inbox::{Inbox, Parking};
use crate::ingest::keys::DeviceKeys;
use crate::ingest::mqtt::{self, Session};
use crate::metrics::{Counter, Metrics};
use crate::store::{HeartbeatWriter, HeartbeatWriterOptions, Store, StoreOptions};
use crate::view::emit;

/// A running bridge. Stop it with [`Bridge::shutdown`].
pub struct Bridge {
    http_addr: SocketAddr,
    mqtt: MqttEndpoint,
    io: SocketIo,
    cancel: CancellationToken,
    tasks: TaskTracker,
    config: BridgeConfig,
    store: Store,
    https: bool,
    // The embedded broker: dropping it stops it, so it lives as long as the bridge.
    _broker: Option<broker::Broker>,
}

impl Bridge {
    /// Starts the bridge: the embedded broker if configured, the MQTT task, Socket.IO and HTTP
    /// on `listener` (already bound, so tests can use an ephemeral port).
    ///
    /// Returns once the embedded broker listens and HTTP is served; MQTT connects in the
    /// background (watch `GET /readyz`).
    ///
    /// # Errors
    /// [`BridgeError`] if the embedded broker cannot start or the listener is unusable.
    pub async fn start(listener: TcpListener, config: BridgeConfig) -> Result<Self, BridgeError> {
        let http_addr = listener.local_addr().map_err(BridgeError::Http)?;
        let (broker, endpoint) = match &config.mqtt {
            MqttTarget::Embedded(broker_config) => {
                let broker = broker::Broker::start(broker_config.clone()).await?;
                let addr = broker.v4_addr();
                info!(mqtt = %addr, "embedded broker listening");
                let endpoint = MqttEndpoint {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    credentials: config
                        .mqtt_password
                        .as_ref()
                        .map(|password| (config.client_id.clone(), password.expose().to_owned())),
                    // Loopback, in-process: TLS would buy nothing.
                    tls: None,
                };
                (Some(broker), endpoint)
            }
            MqttTarget::External(endpoint) => {
                let mut endpoint = endpoint.clone();
                if let (None, Some(password)) = (&endpoint.credentials, &config.mqtt_password) {
                    endpoint.credentials =
                        Some((config.client_id.clone(), password.expose().to_owned()));
                }
                (None, endpoint)
            }
        };

        let tokens = tokens(&config, http_addr)?;
        let metrics = Arc::new(Metrics::default());
        let certificate = match &config.tls {
            Some(files) => Some(Arc::new(ServerCertificate::load(
                files,
                Arc::clone(&metrics),
            )?)),
            None => None,
        };
        let keys = match &config.credentials {
            Some(path) => DeviceKeys::load(path, Arc::clone(&metrics))?,
            None => {
                warn!(
                    "no credentials file: OPEN MODE, the origin of vehicle messages is not verified"
                );
                DeviceKeys::Open
            }
        };

        let (client, eventloop) = mqtt::connect(
            &endpoint,
            &config.client_id,
            config.keep_alive,
            Session::Events,
        );
        let (hb_client, hb_eventloop) = mqtt::connect(
            &endpoint,
            &config.client_id,
            config.keep_alive,
            Session::Heartbeats,
        );
        let store = Store::open(
            &config.store,
            StoreOptions {
                synchronous: config.synchronous,
                ..StoreOptions::default()
            },
        )
        .await?;
        info!(store = %config.store, synchronous = %config.synchronous, "store open");
        let (writer, history) = HeartbeatWriter::new(
            store.clone(),
            HeartbeatWriterOptions::default(),
            Arc::clone(&metrics),
        );
        let hub = Arc::new(Hub::new(HubParts {
            metrics: Arc::clone(&metrics),
            tokens,
            fleet: Fleet::new(config.stale),
            store: store.clone(),
            mqtt: client.clone(),
            command_timeout: config.command_timeout,
        }));
        // Socket.IO limits (issue 14): `api::limits`.
        let guard = Arc::new(SocketGuard::new(config.socketio.clone()));
        let (layer, io) = SocketIo::builder()
            .max_buffer_size(config.socketio.buffer_packets as usize)
            .max_payload(config.socketio.max_payload_bytes)
            .ws_max_message_size(
                usize::try_from(config.socketio.max_payload_bytes).unwrap_or(usize::MAX),
            )
            .with_state(Arc::clone(&hub))
            .with_state(Arc::clone(&guard))
            .build_layer();
        socket::register(&io);

        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();

        let (acks, releaser) = acks::ack_queue(Arc::clone(&hub), io.clone(), client.clone());
        let parking = Parking {
            store: store.clone(),
            after: config.key_wait_park_after,
            vehicles: store.parked_vehicles().await?,
        };
        let (inbox, key_wait) =
            Inbox::new(io.clone(), Arc::clone(&hub), keys, history, acks, parking);
        let inbox = Arc::new(inbox);
        tasks.spawn(key_wait.run(cancel.child_token()));
        tasks.spawn(writer.run(cancel.child_token()));
        tasks.spawn(releaser.run(cancel.child_token()));
        tasks.spawn(assign_waiting(Arc::clone(&hub), cancel.child_token()));
        tasks.spawn(retention(
            Arc::clone(&hub),
            store.clone(),
            config.queue_retention,
            config.history_retention,
            cancel.child_token(),
        ));
        tasks.spawn(mqtt::run(
            client,
            eventloop,
            Session::Events,
            Arc::clone(&inbox),
            config.max_backoff,
            cancel.child_token(),
        ));
        tasks.spawn(mqtt::run(
            hb_client,
            hb_eventloop,
            Session::Heartbeats,
            inbox,
            config.max_backoff,
            cancel.child_token(),
        ));
        tasks.spawn(ticker(
            io.clone(),
            Arc::clone(&hub),
            (config.tick, config.socketio.max_packet_bytes as usize),
            cancel.child_token(),
        ));

        let state = http::HttpState {
            io: io.clone(),
            hub: Arc::clone(&hub),
            broker: broker.as_ref().map(broker::Broker::metrics),
            guard,
        };
        let app = http::router(state, layer, config.web.clone());
        let stop_http = cancel.child_token();
        let https = certificate.is_some();
        tasks.spawn(async move {
            let served = match certificate {
                None => serve_http(listener, app, stop_http).await,
                Some(certificate) => {
                    serve_https(listener, certificate, metrics, app, stop_http).await
                }
            };
            if let Err(err) = served {
                error!(cause = %err, "HTTP server failed");
            }
        });
        info!(http = %http_addr, https, mqtt = %format!("{}:{}", endpoint.host, endpoint.port), "bridge started");

        Ok(Self {
            http_addr,
            mqtt: endpoint,
            io,
            cancel,
            tasks,
            config,
            store,
            https,
            _broker: broker,
        })
    }

    /// Whether HTTP and Socket.IO are served over TLS (HTTPS, WSS).
    pub fn https(&self) -> bool {
        self.https
    }

    /// The address HTTP and Socket.IO are served on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The MQTT broker the bridge uses (the embedded one's address when embedded).
    pub fn mqtt_endpoint(&self) -> &MqttEndpoint {
        &self.mqtt
    }

    /// Resolves if the embedded broker dies ([`broker::Broker::failed`]: a part of it panicked
    /// or ended; it no longer accepts nor routes). The bridge cannot serve without it: stop it
    /// and exit non-zero. Never resolves with an external broker.
    pub async fn failed(&self) -> BridgeError {
        match &self._broker {
            Some(broker) => BridgeError::Broker(broker.failed().await),
            None => std::future::pending().await,
        }
    }

    /// Stops gracefully: stops accepting HTTP connections, closes every Socket.IO socket,
    /// disconnects from MQTT, and waits for the tasks (at most `shutdown_grace`).
    ///
    /// # Errors
    /// [`BridgeError::Task`] if the tasks did not finish within the grace period.
    pub async fn shutdown(self) -> Result<(), BridgeError> {
        info!("bridge shutting down");
        self.cancel.cancel();
        self.io.close().await;
        self.tasks.close();
        let grace = self.config.shutdown_grace;
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(?grace, "tasks still running after the grace period");
            return Err(BridgeError::Task {
                name: "shutdown",
                reason: format!("not finished within {grace:?}"),
            });
        }
        self.store.close().await;
        if let Some(broker) = self._broker {
            let report = broker.shutdown().await;
            info!(?report, "embedded broker stopped");
        }
        info!("bridge stopped");
        Ok(())
    }
}

/// Serves `app` over plain HTTP on `listener` until `stop`.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    // Position batches are written as they are made: without TCP_NODELAY, Nagle holds a
    // batch's last segment until the browser's delayed ACK (up to 40 ms on Linux).
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            debug!(cause = %err, "cannot set TCP_NODELAY on an HTTP connection");
        }
    });
    // The peer's address: `/metrics` without a token is served to loopback only.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Serves `app` over HTTPS on `listener` with `certificate` until `stop` (the TLS side:
/// `api::https`; its failures are counted in `metrics`).
async fn serve_https(
    listener: TcpListener,
    certificate: Arc<ServerCertificate>,
    metrics: Arc<Metrics>,
    app: axum::Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    // `tap_io` only for axum's `ConnectInfo<SocketAddr>` of a wrapped listener; TCP_NODELAY is
    // set before the handshake.
    let listener = HttpsListener::new(listener, certificate, metrics)?.tap_io(|_| {});
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// The tokens clients may use, and who may read `/metrics`, as `config` says for a bridge
/// serving on `http_addr`.
///
/// Demo mode (no credentials file and no tokens) admits the public demo tokens and opens
/// `/metrics`; it refuses to serve on a non-loopback address unless `allow_public_demo`. With
/// a credentials file and no tokens, no client is admitted.
fn tokens(config: &BridgeConfig, http_addr: SocketAddr) -> Result<Tokens, BridgeError> {
    let demo = config.tokens.is_empty() && config.credentials.is_none();
    let tokens = if demo {
        if !http_addr.ip().is_loopback() && !config.allow_public_demo {
            return Err(BridgeError::Config(format!(
                "demo mode (no credentials file and no tokens: anyone may use the public demo \
                 tokens) refuses to serve on {http_addr}, which is not a loopback address: \
                 configure tokens (`bridge add-token`) and a credentials file, listen on \
                 127.0.0.1, or pass --allow-public-demo"
            )));
        }
        warn!(
            "no tokens and no credentials file: DEMO MODE with the public tokens dispatch-demo, \
             vendor-demo, admin-demo"
        );
        Tokens::new(&Tokens::demo_grants())?
    } else {
        if config.tokens.is_empty() {
            warn!(
                "no tokens configured: every Socket.IO and API client is refused (demo tokens \
                 exist only without a credentials file); add one with `bridge add-token`"
            );
        }
        Tokens::warn_plain(&config.tokens);
        Tokens::new(&config.tokens)?
    };
    let metrics = if config.metrics_public || demo {
        MetricsAccess::Public
    } else if let Some(hex_digits) = &config.metrics_token_sha256 {
        MetricsAccess::Token(
            parse_token_hash(hex_digits)
                .map_err(|e| BridgeError::Config(format!("metrics_token_sha256: {e}")))?,
        )
    } else {
        MetricsAccess::Loopback
    };
    info!(metrics = %metrics_label(metrics), "/metrics access");
    Ok(tokens.with_metrics(metrics))
}

/// How `/metrics` access is described in the log (never the hash).
fn metrics_label(access: MetricsAccess) -> &'static str {
    match access {
        MetricsAccess::Public => "public",
        MetricsAccess::Token(_) => "metrics token",
        MetricsAccess::Loopback => "loopback only",
    }
}

/// How often vehicles are checked for missed heartbeats.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Every `period`: sends the batched status changes and the coalesced positions
/// ([`emit::send_batches`]); every [`SWEEP_EVERY`]: marks vehicles that missed their
/// heartbeats as stale. No batch part is larger than `max_packet` bytes.
async fn ticker(
    io: SocketIo,
    hub: Arc<Hub>,
    (period, max_packet): (Duration, usize),
    cancel: CancellationToken,
) {
    let mut positions = tokio::time::interval(period);
    positions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = positions.tick() => emit::send_batches(&io, &hub, max_packet),
            _ = sweep.tick() => hub.mark_stale(Instant::now()),
        }
    }
}

/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Every [`RETENTION_EVERY`]: removes queued messages and heartbeat history past retention,
/// and the parked messages (`ingest::inbox`) older than the queue retention, counted.
async fn retention(
    hub: Arc<Hub>,
    store: Store,
    queue: Duration,
    history: Duration,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(RETENTION_EVERY);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticks.tick() => {}
        }
        hub.apply_retention(queue, history).await;
        expire_parked(&store, hub.metrics(), queue).await;
    }
}

/// Removes the parked messages older than `retention`: their vehicle's key never appeared.
/// Counted and logged, never silent.
async fn expire_parked(store: &Store, metrics: &Metrics, retention: Duration) {
    let cutoff = crate::clock::now_ms()
        .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
    match store.expire_parked(cutoff).await {
        Ok(0) => {}
        Ok(expired) => {
            metrics.add(Counter::ParkedExpired, expired);
            warn!(
                expired,
                retention_h = retention.as_secs() / 3600,
                "parked messages expired: their vehicles never got a key in the credentials file"
            );
            if let Ok(left) = store.parked_count().await {
                metrics.set_parked(left);
            }
        }
        Err(err) => warn!(cause = %err, "parked message retention failed"),
    }
}

/// How often waiting orders are offered to vehicles again.
const ASSIGN_EVERY: Duration = Duration::from_secs(1);

/// Every [`ASSIGN_EVERY`]: offers orders that found no vehicle to the vehicles free now.
async fn assign_waiting(hub: Arc<Hub>, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(ASSIGN_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let attempt = tokio::select! {
            () = cancel.cancelled() => break,
            attempt = hub.assign_waiting() => attempt,
        };
        if let Err(err) = attempt {
            warn!(cause = %err, "could not offer waiting orders");
        }
    }
}

/// Runs the bridge until `shutdown` resolves, then stops it gracefully; or until the embedded
/// broker dies ([`Bridge::failed`]), then stops and returns that error.
///
/// # Errors
/// See [`Bridge::start`] and [`Bridge::shutdown`]; [`BridgeError::Broker`] if the embedded
/// broker died.
pub async fn run(
    listener: TcpListener,
    config: BridgeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BridgeError> {
    let bridge = Bridge::start(listener, config).await?;
    let died = tokio::select! {
        () = shutdown => None,
        death = bridge.failed() => Some(death),
    };
    bridge.shutdown().await?;
    died.map_or(Ok(()), Err)
}
