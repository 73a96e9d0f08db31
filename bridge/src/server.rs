//! Starting and stopping the bridge as a whole: builds every layer, spawns the tasks (the
//! MQTT task, the tick, retention, waiting orders, the heartbeat writer, HTTP), and stops
//! them gracefully.
//!
//! Several bridges (issue #15): with `redis_url`, Socket.IO runs on socketioxide's Redis
//! adapter, so that an event for a room reaches its sockets whichever bridge they are
//! connected to; without it, on the local adapter. The adapter is picked once, in
//! [`Bridge::start`]; everything after it is one code path, generic over the adapter
//! (`Bridge::launch`). With Redis the bridge also registers its `client_id` there
//! ([`Registration`]): a second live bridge with the same `client_id` refuses to start.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::layer::SocketIoLayer;
use socketioxide_redis::{RedisAdapterConfig, RedisAdapterCtr};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::api::adapter::{RedisLink, SharedAdapter};
use crate::api::https::{HttpsListener, ServerCertificate};
use crate::api::limits::SocketGuard;
use crate::api::state::HttpState;
use crate::api::{geofences, http, socket};
use crate::cluster::{Cluster, ClusterOptions};
use crate::config::{BridgeConfig, MqttEndpoint, MqttTarget};
use crate::domain::auth::{Grant, MetricsAccess, Tokens, parse_token_hash};
use crate::domain::fleet::{ClusterPort, Fleet, TickNews};
use crate::domain::{Hub, HubParts};
use crate::error::BridgeError;
use crate::geofence::{Geofences, StoreSite};
use crate::ingest::acks;
use crate::ingest::inbox::{Inbox, Parking};
use crate::ingest::keys::DeviceKeys;
use crate::ingest::local;
use crate::ingest::mqtt::{self, Session};
use crate::metrics::{Counter, Metrics};
use crate::store::{HeartbeatSender, HeartbeatWriter, HeartbeatWriterOptions, Store, StoreOptions};
use crate::view;
use crate::view::emit::{self, Outlet};
use crate::view::pace::Pace;

/// Closes every Socket.IO socket, whatever the adapter.
type CloseSockets = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A running bridge. Stop it with [`Bridge::shutdown`].
pub struct Bridge {
    http_addr: SocketAddr,
    mqtt: MqttEndpoint,
    close_sockets: CloseSockets,
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
    /// With `redis_url`, first registers `client_id` in Redis, then builds Socket.IO on the
    /// Redis adapter and starts the link of the fleet cache to the other bridges.
    ///
    /// # Errors
    /// [`BridgeError`] if the embedded broker cannot start or the listener is unusable;
    /// [`BridgeError::Redis`] if Redis cannot be reached; [`BridgeError::ClientIdInUse`] if
    /// another live bridge registered `client_id` (a registration left by a bridge that did
    /// not stop gracefully expires within 15 s).
    pub async fn start(listener: TcpListener, config: BridgeConfig) -> Result<Self, BridgeError> {
        let http_addr = listener.local_addr().map_err(BridgeError::Http)?;
        // First: a second bridge with this client id must not touch the MQTT sessions of the
        // live one.
        let redis = match &config.redis_url {
            Some(url) => {
                let url = RedisUrl::new(url.expose())?;
                let registration = Registration::claim(&url, &config.client_id).await?;
                Some((url, registration))
            }
            None => None,
        };
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
        let heartbeats = match &broker {
            // In-process from the embedded broker's router, unless other bridges may share
            // the devices through it (shared subscriptions are the front end's, not the
            // router's: the group must be joined over MQTT).
            // A broker that dies meanwhile ends the start at once, with its cause.
            Some(broker) if config.shared_group.is_none() => {
                let filters = [shared::TopicKind::Heartbeat.filter()];
                HeartbeatFeed::Local(tokio::select! {
                    subscribed = broker.subscribe_local("bridge-heartbeats", &filters) => subscribed?,
                    death = broker.failed() => return Err(BridgeError::Broker(death)),
                })
            }
            _ => {
                let (client, eventloop) = mqtt::connect(
                    &endpoint,
                    &config.client_id,
                    config.keep_alive,
                    Session::Heartbeats,
                );
                HeartbeatFeed::Mqtt(Box::new((client, eventloop)))
            }
        };
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
        let mut fleet = Fleet::new(config.stale);
        // With other bridges: the fleet cache's link to them (`cluster`), started in `launch`.
        let cluster = redis.is_some().then(|| fleet.cluster_port());
        let hub = Arc::new(
            Hub::new(HubParts {
                metrics: Arc::clone(&metrics),
                tokens,
                fleet,
                store: store.clone(),
                mqtt: client.clone(),
                command_timeout: config.command_timeout,
            })
            .with_geofences(Arc::new(Geofences::new(config.geofences)))
            .with_history(history.clone()),
        );
        // Geofences: the stores' automatic fences now (the stores `GET /api/stores` lists),
        // the stored and drop-off ones in `geofence_task`.
        let sites: Vec<StoreSite> = hub
            .stores(&Grant::system())
            .into_iter()
            .filter_map(|s| {
                Some(StoreSite {
                    location: s.location?,
                    store: s.store,
                    fleet: s.fleet,
                })
            })
            .collect();
        hub.geofences().sync_stores(&sites);
        // Socket.IO limits (issue 14): `api::limits`.
        let guard = Arc::new(SocketGuard::new(config.socketio.clone()));
        let builder = SocketIo::builder()
            .max_buffer_size(config.socketio.buffer_packets as usize)
            .max_payload(config.socketio.max_payload_bytes)
            .ws_max_message_size(
                usize::try_from(config.socketio.max_payload_bytes).unwrap_or(usize::MAX),
            )
            .with_state(Arc::clone(&hub))
            .with_state(Arc::clone(&guard));
        let started = Started {
            listener,
            http_addr,
            config,
            broker,
            endpoint,
            metrics,
            certificate,
            keys,
            client,
            eventloop,
            heartbeats,
            store,
            writer,
            history,
            hub,
            guard,
            registration: None,
            link: None,
            cluster,
        };
        match redis {
            None => {
                let (layer, io) = builder.build_layer();
                socket::register(&io);
                Self::launch(started, layer, io).await
            }
            Some((url, registration)) => {
                let link = RedisLink::connect(
                    url.client()?,
                    Arc::clone(&started.metrics),
                    url.to_string(),
                )
                .await
                .map_err(|err| url.error(err.to_string()))?;
                let adapter =
                    RedisAdapterCtr::new_with_driver(link.clone(), RedisAdapterConfig::default());
                let (layer, io) = builder.with_adapter::<SharedAdapter>(adapter).build_layer();
                for init in socket::register_shared(&io) {
                    init.await
                        .map_err(|err| url.error(format!("adapter: {err}")))?;
                }
                info!(redis = %url, "Socket.IO shared with the other bridges through Redis");
                let started = Started {
                    registration: Some(registration),
                    link: Some(link),
                    ..started
                };
                Self::launch(started, layer, io).await
            }
        }
    }

    /// The rest of [`Bridge::start`], once Socket.IO is built on adapter `A` (its namespaces
    /// registered): spawns the tasks and serves HTTP.
    async fn launch<A: Adapter>(
        started: Started,
        layer: SocketIoLayer<A>,
        io: SocketIo<A>,
    ) -> Result<Self, BridgeError> {
        let Started {
            listener,
            http_addr,
            config,
            broker,
            endpoint,
            metrics,
            certificate,
            keys,
            client,
            eventloop,
            heartbeats,
            store,
            writer,
            history,
            hub,
            guard,
            registration,
            cluster,
            link,
        } = started;
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        if let Some(registration) = registration {
            tasks.spawn(registration.keep(Arc::clone(&metrics), cancel.child_token()));
        }
        if let Some(link) = link {
            tasks.spawn(link.watch(cancel.child_token()));
        }
        // The vehicles other bridges hear, merged into the fleet cache (`cluster`).
        let cluster = match (cluster, &config.redis_url) {
            (Some(port), Some(url)) => {
                let options = ClusterOptions {
                    url: url.expose().to_owned(),
                    name: config.client_id.clone(),
                    max_backoff: config.max_backoff,
                };
                let link = Cluster::start(options, port, cancel.child_token())
                    .await
                    .map_err(|err| BridgeError::Config(err.to_string()))?;
                let stats = link.stats();
                tasks.spawn(link.stopped());
                Some(stats)
            }
            _ => None,
        };
        let outlet: Arc<dyn Outlet> = Arc::new(io.clone());
        let (acks, releaser) =
            acks::ack_queue(Arc::clone(&hub), Arc::clone(&outlet), client.clone());
        let parking = Parking {
            store: store.clone(),
            after: config.key_wait_park_after,
            vehicles: store.parked_vehicles().await?,
        };
        let (inbox, key_wait) = Inbox::new(outlet, Arc::clone(&hub), keys, history, acks, parking);
        let inbox = Arc::new(inbox);
        tasks.spawn(key_wait.run(cancel.child_token()));
        tasks.spawn(writer.run(cancel.child_token()));
        tasks.spawn(releaser.run(cancel.child_token()));
        tasks.spawn(assign_waiting(
            Arc::clone(&hub),
            io.clone(),
            config.orders,
            cancel.child_token(),
        ));
        tasks.spawn(retention(
            Arc::clone(&hub),
            store.clone(),
            config.queue_retention,
            config.history_retention,
            cancel.child_token(),
        ));
        let subscriptions = mqtt::Subscriptions {
            shared_group: config.shared_group.as_deref().map(Arc::from),
            client_id: Arc::from(config.client_id.as_str()),
            max_backoff: config.max_backoff,
        };
        tasks.spawn(mqtt::run(
            client,
            eventloop,
            Session::Events,
            Arc::clone(&inbox),
            subscriptions.clone(),
            cancel.child_token(),
        ));
        match heartbeats {
            HeartbeatFeed::Mqtt(session) => {
                let (client, eventloop) = *session;
                tasks.spawn(mqtt::run(
                    client,
                    eventloop,
                    Session::Heartbeats,
                    inbox,
                    subscriptions.clone(),
                    cancel.child_token(),
                ))
            }
            HeartbeatFeed::Local(subscriber) => {
                tasks.spawn(local::run(subscriber, inbox, cancel.child_token()))
            }
        };
        tasks.spawn(geofence_task(
            io.clone(),
            Arc::clone(&hub),
            cancel.child_token(),
        ));
        tasks.spawn(ticker(
            io.clone(),
            Arc::clone(&hub),
            (config.tick, config.socketio.max_packet_bytes as usize),
            config.flush_at_once_below,
            cancel.child_token(),
        ));

        let state = HttpState {
            io: io.clone(),
            hub: Arc::clone(&hub),
            broker: broker.as_ref().map(broker::Broker::metrics),
            guard,
            cluster,
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
            close_sockets: Box::new(move || Box::pin(async move { io.close().await })),
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
        (self.close_sockets)().await;
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

/// Where the bridge's heartbeats come from.
enum HeartbeatFeed {
    /// Its heartbeats session: an MQTT connection of its own (an external broker, or the
    /// embedded one when other bridges may share the devices).
    Mqtt(Box<(rumqttc::AsyncClient, rumqttc::EventLoop)>),
    /// The embedded broker's router, in-process (`ingest::local`).
    Local(broker::LocalSubscriber),
}

/// What [`Bridge::start`] made before Socket.IO, for [`Bridge::launch`].
struct Started {
    listener: TcpListener,
    http_addr: SocketAddr,
    config: BridgeConfig,
    broker: Option<broker::Broker>,
    endpoint: MqttEndpoint,
    metrics: Arc<Metrics>,
    certificate: Option<Arc<ServerCertificate>>,
    keys: DeviceKeys,
    client: rumqttc::AsyncClient,
    eventloop: rumqttc::EventLoop,
    heartbeats: HeartbeatFeed,
    store: Store,
    writer: HeartbeatWriter,
    history: HeartbeatSender,
    hub: Arc<Hub>,
    guard: Arc<SocketGuard>,
    /// The bridge's client id registered in Redis, with `redis_url`.
    registration: Option<Registration>,
    /// The fleet cache's side of the link to the other bridges, with `redis_url`.
    cluster: Option<ClusterPort>,
    /// The Socket.IO adapter's link to Redis, with `redis_url`.
    link: Option<RedisLink>,
}

// ---- Redis (several bridges, issue #15) --------------------------------------------------

/// How long the bridge waits for Redis when it starts.
const REDIS_CONNECT: Duration = Duration::from_secs(5);
/// How long a registration lives in Redis without being refreshed.
const REGISTRATION_TTL: Duration = Duration::from_secs(15);
/// How often the registration is refreshed.
const REGISTRATION_REFRESH: Duration = Duration::from_secs(5);
/// How soon a refresh that could not reach Redis is tried again, while it stays away.
const REGISTRATION_RETRY: Duration = Duration::from_millis(500);

/// Sets the registration if it is ours or gone (Redis lost it); returns 1, or 0 if another
/// bridge holds it. KEYS[1]: the key; ARGV[1]: our token; ARGV[2]: the TTL in ms.
const REFRESH_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
    if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 \
    elseif not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 \
    else return 0 end";

/// Deletes the registration if it is still ours; returns 1 if it was deleted.
const RELEASE_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) else return 0 end";

/// The Redis server of the bridges: the URL to connect with (RESP3, which socketioxide's
/// Redis adapter needs, asked for when the URL does not say) and its form for logs and errors
/// (without the password).
struct RedisUrl {
    url: String,
    shown: String,
}

impl RedisUrl {
    /// Reads `raw` (a `redis://` URL, checked by the configuration).
    fn new(raw: &str) -> Result<Self, BridgeError> {
        let mut url =
            url::Url::parse(raw).map_err(|err| BridgeError::Config(format!("redis_url: {err}")))?;
        if !url.query_pairs().any(|(key, _)| key == "protocol") {
            url.query_pairs_mut().append_pair("protocol", "resp3");
        }
        let mut shown = url.clone();
        if shown.password().is_some() {
            // Only fails for URLs without a host, which `redis://` URLs have.
            let _ = shown.set_password(Some("***"));
        }
        Ok(Self {
            url: url.into(),
            shown: shown.into(),
        })
    }

    /// A client for it (connects on first use).
    fn client(&self) -> Result<redis::Client, BridgeError> {
        redis::Client::open(self.url.as_str()).map_err(|err| self.error(err.to_string()))
    }

    /// The error "cannot use Redis at this URL", for `reason`.
    fn error(&self, reason: String) -> BridgeError {
        BridgeError::Redis {
            url: self.shown.clone(),
            reason,
        }
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// This bridge's `client_id`, registered in Redis as `fleetbeat:bridge:{client_id}` with a
/// random token of this instance, for [`REGISTRATION_TTL`]: two live bridges never share a
/// client id (they would take each other's MQTT sessions). Refreshed every
/// [`REGISTRATION_REFRESH`] by [`Registration::keep`], deleted on shutdown if still ours.
struct Registration {
    client: redis::Client,
    connection: Option<redis::aio::MultiplexedConnection>,
    key: String,
    token: String,
    client_id: String,
    shown: String,
}

impl Registration {
    /// Registers `client_id` in Redis at `url`.
    ///
    /// # Errors
    /// [`BridgeError::Redis`] if Redis cannot be reached; [`BridgeError::ClientIdInUse`] if
    /// another live bridge holds `client_id`.
    async fn claim(url: &RedisUrl, client_id: &str) -> Result<Self, BridgeError> {
        let client = url.client()?;
        let mut connection =
            tokio::time::timeout(REDIS_CONNECT, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| url.error(format!("no answer within {REDIS_CONNECT:?}")))?
                .map_err(|err| url.error(err.to_string()))?;
        let key = format!("fleetbeat:bridge:{client_id}");
        let token = format!(
            "{:016x}{:016x}-{}",
            fastrand::u64(..),
            fastrand::u64(..),
            std::process::id()
        );
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms())
            .query_async(&mut connection)
            .await
            .map_err(|err| url.error(err.to_string()))?;
        if set.is_none() {
            return Err(BridgeError::ClientIdInUse {
                client_id: client_id.to_owned(),
            });
        }
        info!(%key, redis = %url, "client id registered in Redis");
        Ok(Self {
            client,
            connection: Some(connection),
            key,
            token,
            client_id: client_id.to_owned(),
            shown: url.shown.clone(),
        })
    }

    /// Refreshes the registration every [`REGISTRATION_REFRESH`] until `cancel`, then deletes
    /// it if it is still ours. A failure is counted in `metrics` and logged: another bridge
    /// took the client id; or Redis is unreachable (or did not answer in [`REDIS_CONNECT`]),
    /// then it reconnects and tries again every [`REGISTRATION_RETRY`].
    async fn keep(mut self, metrics: Arc<Metrics>, cancel: CancellationToken) {
        // Whether the last refresh could not reach Redis.
        let mut lost = false;
        loop {
            let wait = if lost {
                REGISTRATION_RETRY
            } else {
                REGISTRATION_REFRESH
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            let refresh = self.run_script(REFRESH_SCRIPT, Some(ttl_ms()));
            let cause = match tokio::time::timeout(REDIS_CONNECT, refresh).await {
                Ok(Ok(1)) => {
                    if lost {
                        info!(key = %self.key, "registration back in Redis");
                    } else {
                        debug!(key = %self.key, "registration refreshed");
                    }
                    lost = false;
                    continue;
                }
                Ok(Ok(_)) => {
                    metrics.count(Counter::RedisErrors);
                    error!(
                        client_id = %self.client_id,
                        "client_id {} is in use by another bridge (registered in Redis): give each bridge its own client_id",
                        self.client_id
                    );
                    lost = false;
                    continue;
                }
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no answer in {REDIS_CONNECT:?}"),
            };
            // Redis is unreachable: try again soon, so the registration is back shortly after
            // Redis is (a refused connection costs little; logged once, counted each time).
            metrics.count(Counter::RedisErrors);
            if lost {
                debug!(redis = %self.shown, %cause, "still cannot refresh the bridge's registration in Redis");
            } else {
                warn!(redis = %self.shown, %cause, "cannot refresh the bridge's registration in Redis: will retry");
            }
            lost = true;
        }
        match tokio::time::timeout(REDIS_CONNECT, self.run_script(RELEASE_SCRIPT, None)).await {
            Ok(Ok(1)) => info!(key = %self.key, "registration removed from Redis"),
            Ok(Ok(_)) => {
                warn!(key = %self.key, "registration was not ours any more: left in Redis")
            }
            Ok(Err(err)) => {
                warn!(cause = %err, "cannot remove the registration from Redis: it expires by itself")
            }
            Err(_) => warn!("Redis did not answer: the registration expires by itself"),
        }
    }

    /// Runs `script` on the registration (our key and token, and `ttl_ms` if given),
    /// connecting again first if the last connection failed.
    async fn run_script(&mut self, script: &str, ttl_ms: Option<u64>) -> redis::RedisResult<i64> {
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => self.client.get_multiplexed_async_connection().await?,
        };
        let mut command = redis::cmd("EVAL");
        command.arg(script).arg(1).arg(&self.key).arg(&self.token);
        if let Some(ttl) = ttl_ms {
            command.arg(ttl);
        }
        let result = command.query_async(&mut connection).await;
        if result.is_ok() {
            self.connection = Some(connection);
        }
        result
    }
}

/// [`REGISTRATION_TTL`] in milliseconds.
fn ttl_ms() -> u64 {
    u64::try_from(REGISTRATION_TTL.as_millis()).unwrap_or(u64::MAX)
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
             vendor-demo, vendor-demo-2, vendor-demo-3, admin-demo"
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
/// ([`emit::send_batches`]); and between ticks as soon as news arrives while the load is light
/// ([`Pace`]), so a position does not wait for the tick on a quiet bridge. Every
/// [`SWEEP_EVERY`]: marks vehicles that missed their heartbeats as stale. No batch part is
/// larger than `max_packet` bytes.
async fn ticker<A: Adapter>(
    io: SocketIo<A>,
    hub: Arc<Hub>,
    (period, max_packet): (Duration, usize),
    flush_at_once_below: u32,
    cancel: CancellationToken,
) {
    let mut positions = tokio::time::interval(period);
    positions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut pace = Pace::new(Instant::now(), flush_at_once_below);
    // Kept from flush to flush: its lists keep their room (see `emit::send_batches`).
    let mut news = TickNews::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = positions.tick() => {
                let sent = emit::send_batches(&io, &hub, &mut news, max_packet, true);
                pace.flushed(sent, Instant::now());
            }
            () = hub.news() => {
                if pace.at_once() {
                    let sent = emit::send_batches(&io, &hub, &mut news, max_packet, false);
                    pace.flushed(sent, Instant::now());
                }
            }
            _ = sweep.tick() => hub.mark_stale(Instant::now()),
        }
    }
}

/// How often the positions noted for the geofences are evaluated.
const GEOFENCE_EVERY: Duration = Duration::from_millis(100);
/// How often the geofences are brought in step with the store (custom fences other bridges
/// changed, orders they placed and ended).
const GEOFENCE_SYNC_EVERY: Duration = Duration::from_secs(2);

/// Every [`GEOFENCE_EVERY`]: evaluates the positions noted since (`Hub::record`) and emits
/// the `geofence` events they cause; every [`GEOFENCE_SYNC_EVERY`]: reloads the custom fences
/// and reads the orders changed since from the store (`geofences::StoreSync`).
async fn geofence_task<A: Adapter>(io: SocketIo<A>, hub: Arc<Hub>, cancel: CancellationToken) {
    let mut evaluate = tokio::time::interval(GEOFENCE_EVERY);
    evaluate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sync = tokio::time::interval(GEOFENCE_SYNC_EVERY);
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut store_sync = geofences::StoreSync::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = sync.tick() => match store_sync.step(&hub).await {
                Ok(0) => {}
                Ok(changed) => debug!(changed, "geofences in step with the store"),
                Err(err) => warn!(cause = %err, "cannot reload the geofences from the store"),
            },
            _ = evaluate.tick() => {
                let transitions = hub.geofences().evaluate();
                if !transitions.is_empty() {
                    view::geofence::transitions(&io, hub.metrics(), &transitions).await;
                }
            }
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

/// The orders' task, two loops side by side: every [`ASSIGN_EVERY`], takes back orders stuck
/// on a vehicle offline longer than `orders.reoffer_after` and offers every order without a
/// vehicle to the vehicles free now; and, as they come, applies each order's state changes
/// (the hub's order-change channel) to its drop-off fence (`geofences::order_changed`) and
/// emits them as `order` events, in commit order.
async fn assign_waiting<A: Adapter>(
    hub: Arc<Hub>,
    io: SocketIo<A>,
    orders: crate::config::OrderOptions,
    cancel: CancellationToken,
) {
    let offer = async {
        let mut ticks = tokio::time::interval(ASSIGN_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let attempt = tokio::select! {
                () = cancel.cancelled() => break,
                attempt = async {
                    hub.reoffer_stranded(orders.reoffer_after).await?;
                    hub.assign_waiting().await
                } => attempt,
            };
            if let Err(err) = attempt {
                warn!(cause = %err, "could not offer waiting orders");
            }
        }
    };
    let emit = async {
        let Some(mut changes) = hub.take_order_changes() else {
            return;
        };
        loop {
            let change = tokio::select! {
                () = cancel.cancelled() => break,
                change = changes.recv() => change,
            };
            let Some(view) = change else { break };
            geofences::order_changed(&hub, &view);
            let event = crate::view::order::changed(&view, crate::clock::now_ms());
            crate::view::emit::order(&io, hub.metrics(), (&view.fleet, &view.store), &event).await;
        }
    };
    tokio::join!(offer, emit);
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

#[cfg(test)]
mod tests {
    use testengines::redis::TempRedis;

    use super::*;

    /// What Redis holds at `key` now.
    async fn held(url: &RedisUrl, key: &str) -> Option<String> {
        let mut connection = url
            .client()
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("GET")
    }

    #[test]
    fn redis_urls_ask_for_resp3_and_hide_the_password() {
        let url = RedisUrl::new("redis://fleet:s3cret@127.0.0.1:6390/0").expect("valid");
        assert!(url.url.contains("protocol=resp3"), "{}", url.url);
        assert!(url.url.contains("s3cret"), "the password is used");
        assert!(!url.to_string().contains("s3cret"), "{url}");
        let error = url.error("refused".into()).to_string();
        assert!(
            error.contains("127.0.0.1:6390") && !error.contains("s3cret"),
            "{error}"
        );
        let url = RedisUrl::new("redis://h:6390/?protocol=resp3").expect("valid");
        assert_eq!(url.url.matches("protocol=").count(), 1, "{}", url.url);
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_a_clear_error_without_the_password() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let url = RedisUrl::new(&format!("redis://:pw-123@127.0.0.1:{port}")).expect("valid");
        let Err(error) = Registration::claim(&url, "bridge-a").await else {
            panic!("claimed on a closed port");
        };
        let text = error.to_string();
        assert!(matches!(error, BridgeError::Redis { .. }), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(!text.contains("pw-123"), "{text}");
    }

    #[tokio::test]
    async fn a_client_id_is_held_by_one_live_bridge() {
        let mut server = TempRedis::start().expect("redis-server");
        let url = RedisUrl::new(&server.url()).expect("valid");
        let first = Registration::claim(&url, "bridge-a")
            .await
            .expect("claimed");
        let key = "fleetbeat:bridge:bridge-a";
        assert_eq!(held(&url, key).await.as_deref(), Some(first.token.as_str()));

        let Err(error) = Registration::claim(&url, "bridge-a").await else {
            panic!("a second bridge got the same client id");
        };
        assert_eq!(
            error.to_string(),
            "client_id bridge-a is in use by another bridge (registered in Redis): give each \
             bridge its own client_id"
        );
        let other = Registration::claim(&url, "bridge-b")
            .await
            .expect("another id");

        // Kept while it runs, deleted at shutdown (ours), free again after.
        let metrics = Arc::new(Metrics::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(first.keep(Arc::clone(&metrics), cancel.clone()));
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("keep ends")
            .expect("no panic");
        assert_eq!(held(&url, key).await, None, "deleted on shutdown");
        let mut again = Registration::claim(&url, "bridge-a")
            .await
            .expect("free again");

        // Redis lost, then back (empty): the next refresh fails, the one after sets it again.
        server.restart().expect("restart");
        let _ = again.run_script(REFRESH_SCRIPT, Some(ttl_ms())).await;
        assert_eq!(
            again
                .run_script(REFRESH_SCRIPT, Some(ttl_ms()))
                .await
                .expect("reconnected"),
            1
        );
        assert_eq!(held(&url, key).await.as_deref(), Some(again.token.as_str()));

        // Not ours any more: the refresh says so, and shutdown leaves it alone.
        redis::cmd("SET")
            .arg(key)
            .arg("someone-else")
            .exec_async(
                &mut url
                    .client()
                    .expect("client")
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect"),
            )
            .await
            .expect("SET");
        assert_eq!(
            again
                .run_script(REFRESH_SCRIPT, Some(ttl_ms()))
                .await
                .expect("refresh"),
            0
        );
        assert_eq!(
            again
                .run_script(RELEASE_SCRIPT, None)
                .await
                .expect("release"),
            0
        );
        assert_eq!(held(&url, key).await.as_deref(), Some("someone-else"));
        drop(other);
    }
}
