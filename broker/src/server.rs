//! [`Broker`]: rumqttd's router, our network front end on listeners we bound ourselves, the
//! listener health checks, the JSON mirror; started, observed and stopped as one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::auth::{AuthSettings, Authenticator, PROBE_TOPIC_PREFIX};
use crate::carry::RetainWanted;
use crate::client_ids::ClientIds;
use crate::config::BrokerConfig;
use crate::connection::{self, FrontEnd, Limits, PendingConnects};
use crate::durability::Durability;
use crate::durability::journal::{Bounds, Journal};
use crate::error::BrokerError;
use crate::health::{HealthBoard, HealthChecker, ListenerHealth};
use crate::listener::Listener;
use crate::local::LocalSubscriber;
use crate::metrics::BrokerMetrics;
use crate::mirror::{self, Mirror};
use crate::mux::Mux;
use crate::probe::{ProbeLogin, ProbeReceiver};
use crate::router::{self, FilterBudget, INTERNAL_PREFIX, LinkRequest, Registrar, WillPublisher};
use crate::share::SharedSubscriptions;
use crate::tls::{ServerTls, TlsFiles};
use crate::watchdog::{Ending, Watchdog};
use crate::watchers::MirrorWatchers;

/// Router slots beyond `max_connections`: the internal links (probe, will publisher, mux, mirror,
/// the router's watch) and the listener probes' connections, which may overlap a previous
/// probe's teardown; the embedding program's local subscribers ([`Broker::subscribe_local`],
/// the bridge has one); and the links of shared subscription groups (`share`).
const ROUTER_HEADROOM: usize = 12 + crate::share::MAX_GROUPS;

/// How long connections get after the grace period to close on their own.
const FORCED_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What a graceful shutdown did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections open when the shutdown began (probes included).
    pub open_connections: usize,
    /// Connections still open when the grace period ended, closed regardless.
    pub forced: usize,
    /// How long the shutdown took.
    pub elapsed: Duration,
}

/// A running broker. Stop it with [`Broker::shutdown`]; dropping the handle stops it at once
/// (connections are cut without draining).
///
/// rumqttd's router thread cannot be stopped: after a shutdown it sleeps, holding its commit
/// logs, until the process exits. Tests may start many brokers on ephemeral ports
/// ([`BrokerConfig::ephemeral`]); each leaves one idle thread behind.
///
/// # Threads
///
/// - `router-0`: rumqttd's router (spawned by rumqttd; it cannot be stopped, see
///   [`Broker::shutdown`]);
/// - `fleetbeat-mqtt`: the broker's own multi-threaded Tokio runtime (one thread per core by
///   default, [`BrokerConfig::io_threads`]) running the accept loops, one task per connection,
///   the health checks and the mirror. It is separate from the caller's runtime because
///   rumqttd's link API blocks briefly (a synchronous channel towards the router), which must
///   not stall an embedding program's tasks.
///
/// # Death
///
/// Should a part the broker cannot live without die (rumqttd's router thread panics, the
/// shared link of device connections ends, an accept loop panics), the broker logs one ERROR
/// line, stops accepting (its listening sockets close) and closes every connection: it never
/// lingers as a zombie that accepts and does not route. [`Broker::failed`] resolves then;
/// the `broker` binary exits non-zero on it, and so does the bridge in embedded mode.
///
/// # Start
///
/// [`Broker::start`] binds every listen address itself (a taken address fails at once with
/// [`BrokerError::Bind`]), loads the credentials, spawns the router and its internal links,
/// starts accepting and returns once every listener has passed an end-to-end probe: a TCP
/// connect, CONNECT/CONNACK with the broker's own probe login, a PUBLISH on a random topic,
/// and that message delivered through the router to the broker's probe link.
pub struct Broker {
    v4: SocketAddr,
    v5: Option<SocketAddr>,
    tls_v4: Option<SocketAddr>,
    tls_v5: Option<SocketAddr>,
    metrics: BrokerMetrics,
    health: Arc<HealthBoard>,
    ctx: Arc<FrontEnd>,
    listeners: Vec<(Listener, CancellationToken)>,
    connections: TaskTracker,
    /// Stops the accept loops.
    accepting: CancellationToken,
    /// Stops the health checks and the mirror.
    background: CancellationToken,
    grace: Duration,
    /// The parts the broker cannot live without.
    watchdog: Arc<Watchdog>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("v4", &self.v4)
            .field("v5", &self.v5)
            .field("tls_v4", &self.tls_v4)
            .field("tls_v5", &self.tls_v5)
            .field("open_mode", &self.metrics.open_mode())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Starts the broker with `config` and returns once every listener passed an end-to-end
    /// probe (see [Start](Broker#start)), within [`BrokerConfig::startup_timeout`].
    ///
    /// Without [`BrokerConfig::credentials`] the broker runs in open mode and says so with a
    /// WARN. Must be called from within a Tokio runtime (any flavour).
    ///
    /// # Errors
    ///
    /// - [`BrokerError::InvalidConfig`] if [`BrokerConfig::validate`] rejects `config`;
    /// - [`BrokerError::Bind`] if a listen address is taken or unusable;
    /// - [`BrokerError::BindTls`] if a TLS listen address is taken or unusable;
    /// - [`BrokerError::Tls`] if the TLS certificate, key or client CA cannot be loaded;
    /// - [`BrokerError::Credentials`] if the credentials file cannot be loaded;
    /// - [`BrokerError::Spawn`] if the broker's threads cannot be started;
    /// - [`BrokerError::RouterUnavailable`] if rumqttd's router refuses an internal link;
    /// - [`BrokerError::NotReady`] if a listener does not pass its probe within the bound;
    /// - [`BrokerError::Died`] if a part of it (rumqttd's router thread) dies before then.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        config.validate()?;
        let deadline = Instant::now() + config.startup_timeout;
        let bound = bind_all(&config)?;
        let metrics = BrokerMetrics::default();
        let tls = match TlsFiles::of(&config) {
            Some(files) => Some(Arc::new(ServerTls::load(files, metrics.clone())?)),
            None => None,
        };
        let bound_tls = bind_all_tls(&config)?;
        let auth = match &config.credentials {
            Some(path) => Some(Arc::new(Authenticator::load_with(
                path,
                AuthSettings {
                    bridge_ids: config.durable_consumers.clone(),
                    max_login_failures: config.max_login_failures,
                    login_failure_window: config.login_failure_window,
                    max_password_checks: config.max_password_checks,
                },
            )?)),
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.network_threads())
            .thread_name("fleetbeat-mqtt")
            .enable_all()
            .build()
            .map_err(BrokerError::Spawn)?;
        let handle = runtime.handle().clone();
        let mut runtime = RuntimeGuard(Some(runtime));

        // If this future is dropped or fails, the guard stops the runtime.
        let started = handle.spawn(assemble(
            config.clone(),
            Bound {
                plain: bound,
                tls: bound_tls,
                server_tls: tls,
            },
            auth,
            metrics.clone(),
        ));
        let assembled = match timeout_at_deadline(deadline, started).await {
            Some(Ok(Ok(assembled))) => assembled,
            Some(Ok(Err(err))) => return Err(err),
            Some(Err(join)) => {
                return Err(BrokerError::RouterUnavailable {
                    reason: format!("start-up task failed: {join}"),
                });
            }
            None => {
                return Err(BrokerError::RouterUnavailable {
                    reason: format!(
                        "start-up did not finish within {:?}",
                        config.startup_timeout
                    ),
                });
            }
        };
        let Assembled {
            ctx,
            addrs,
            tls_addrs,
            listeners,
            connections,
            accepting,
            background,
            prober,
            mirror,
            watchdog,
        } = assembled;

        let health = Arc::new(HealthBoard::new(&addrs));
        let mut broker = Broker {
            v4: find(&addrs, Listener::V4).unwrap_or(config.v4),
            v5: find(&addrs, Listener::V5),
            tls_v4: find(&tls_addrs, Listener::V4),
            tls_v5: find(&tls_addrs, Listener::V5),
            metrics: metrics.clone(),
            health: Arc::clone(&health),
            ctx,
            listeners,
            connections,
            accepting,
            background,
            grace: config.shutdown_grace,
            watchdog,
            runtime: None,
        };

        // Every listener must pass a probe before we say we are ready.
        let checker = HealthChecker::new(
            prober,
            broker.ctx.probe.clone(),
            metrics.clone(),
            Arc::clone(&health),
            broker.listeners.clone(),
        );
        broker.runtime = runtime.0.take();
        // From here on, dropping `broker` stops everything.
        let ready = handle.spawn(checker.until_ready(deadline, config.startup_timeout));
        // A part that dies meanwhile (the router thread) fails the start at once, with its
        // cause, rather than as a probe that timed out.
        let ready = tokio::select! {
            ready = ready => ready,
            death = broker.watchdog.died() => {
                return Err(BrokerError::Died {
                    part: death.part,
                    cause: death.cause,
                });
            }
        };
        let checker = match ready {
            Ok(Ok(checker)) => checker,
            Ok(Err(err)) => return Err(err),
            Err(join) => {
                return Err(BrokerError::RouterUnavailable {
                    reason: format!("readiness probe failed: {join}"),
                });
            }
        };
        handle.spawn(stop_on_death(
            Arc::clone(&broker.watchdog),
            broker.accepting.clone(),
            broker.background.clone(),
            broker.ctx.stopping.clone(),
        ));
        handle.spawn(checker.run(config.probe_interval, broker.background.clone()));
        if let Some(mirror) = mirror {
            handle.spawn(mirror.run(broker.background.clone()));
        }

        if broker.ctx.auth.is_none() {
            metrics.set_open_mode(true);
            warn!(
                "OPEN MODE: no credentials file configured. Every client may connect, publish and \
                 subscribe anywhere, and vehicle origin proves nothing. For the local demo only; \
                 set `credentials` (see docs/broker.md) for anything else."
            );
        }
        info!(v4 = %broker.v4, v5 = ?broker.v5, tls_v4 = ?broker.tls_v4, tls_v5 = ?broker.tls_v5, open_mode = broker.ctx.auth.is_none(), "broker ready");
        Ok(broker)
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

    /// Address of the MQTT 3.1.1 over TLS listener
    /// ([`BrokerConfig::tls_listen`]), if one was configured; as for [`Self::v4_addr`].
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_v4
    }

    /// Address of the MQTT 5 over TLS listener ([`BrokerConfig::tls_listen_v5`]), if one was
    /// configured; as for [`Self::v4_addr`].
    pub fn tls_v5_addr(&self) -> Option<SocketAddr> {
        self.tls_v5
    }

    /// Client connections open now that have a router link of their own: persistent
    /// sessions, and connections that subscribed to more than their commands. The others are
    /// served by the one shared link of device-like connections (see `docs/broker.md`).
    pub fn own_links(&self) -> usize {
        self.ctx
            .own_links
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Names the router was given for links no client knows by name (a clean session's own
    /// link, a shared subscription group's): reused, so this is the most such links ever open
    /// at once, however many connections had one (`fleetbeat_broker_router_link_names`).
    pub fn link_names(&self) -> u64 {
        self.metrics.link_names()
    }

    /// Subscribes the embedding program in-process to `filters`, at QoS 0: see
    /// [`LocalSubscriber`]. `name` tells the subscription apart (it is part of its internal
    /// client id, which no client can take). Returns once the router has acknowledged every
    /// filter.
    ///
    /// # Errors
    /// [`BrokerError::RouterUnavailable`] if the router does not register or acknowledge the
    /// subscription.
    pub async fn subscribe_local(
        &self,
        name: &str,
        filters: &[&str],
    ) -> Result<LocalSubscriber, BrokerError> {
        let client_id = format!("{INTERNAL_PREFIX}local-{name}-{:08x}", fastrand::u32(..));
        LocalSubscriber::subscribe(
            &self.ctx.registrar,
            &client_id,
            filters,
            self.metrics.clone(),
        )
        .await
    }

    /// The broker's counters; [`BrokerMetrics::render`] gives the Prometheus text.
    pub fn metrics(&self) -> BrokerMetrics {
        self.metrics.clone()
    }

    /// Whether the broker runs without authentication (no credentials file).
    pub fn open_mode(&self) -> bool {
        self.ctx.auth.is_none()
    }

    /// Every listener's state as of its latest probe (every
    /// [`BrokerConfig::probe_interval`]). A dead listener also shows as
    /// `fleetbeat_broker_listener_up{listener="v4"} 0` and an ERROR log.
    pub fn listener_health(&self) -> Vec<ListenerHealth> {
        self.health.snapshot()
    }

    /// Whether every listener passed its latest probe: what a readiness check should report.
    pub fn is_ready(&self) -> bool {
        self.is_running() && self.listener_health().iter().all(|h| h.up)
    }

    /// Whether the broker still runs (it was not shut down and did not die) and at least one
    /// listener accepts connections.
    pub fn is_alive(&self) -> bool {
        self.is_running() && self.listener_health().iter().any(|h| h.up)
    }

    fn is_running(&self) -> bool {
        self.runtime.is_some() && self.watchdog.death().is_none()
    }

    /// Resolves if the broker dies: a part it cannot live without (rumqttd's router thread,
    /// the shared link of device connections, an accept loop) panicked or ended. By then the
    /// broker has stopped accepting and closed every connection (see [Death](Broker#death)).
    /// Never resolves while the broker lives; a program should exit non-zero when it does
    /// (the `broker` binary does).
    ///
    /// Returns [`BrokerError::Died`].
    pub async fn failed(&self) -> BrokerError {
        let death = self.watchdog.died().await;
        BrokerError::Died {
            part: death.part,
            cause: death.cause,
        }
    }

    /// Stops accepting connections on `listener` (established ones continue). The next
    /// probe reports it dead. For draining one port, and for testing what a dead listener
    /// looks like.
    pub fn stop_listener(&self, listener: Listener) {
        for (which, stop) in &self.listeners {
            if *which == listener {
                stop.cancel();
            }
        }
    }

    /// Shuts the broker down gracefully within [`BrokerConfig::shutdown_grace`]; see
    /// [`Self::shutdown_within`].
    pub async fn shutdown(self) -> ShutdownReport {
        let grace = self.grace;
        self.shutdown_within(grace).await
    }

    /// Shuts the broker down gracefully: stops accepting (the listening sockets close, new
    /// connects are refused), lets every connection complete its in-flight QoS 1 exchanges
    /// (the PUBACKs it owes and is owed) while routing nothing new, closes each one as soon as
    /// it has (MQTT 5 clients get DISCONNECT "server shutting down"), and after `grace`
    /// closes the rest regardless. Last wills are not published for connections the broker
    /// closes. Retained messages and sessions are lost: rumqttd keeps them in memory only.
    ///
    /// rumqttd's router thread stays (idle) until the process exits: it has no stop API.
    pub async fn shutdown_within(mut self, grace: Duration) -> ShutdownReport {
        let started = Instant::now();
        let open_connections = self.connections.len();
        info!(
            open_connections,
            ?grace,
            "shutting down: no new connections, draining in-flight QoS 1"
        );
        self.accepting.cancel();
        self.background.cancel();
        self.ctx.draining.cancel();
        self.ctx.alarm.cancel();
        self.connections.close();
        let forced = if timeout(grace, self.connections.wait()).await.is_ok() {
            0
        } else {
            let forced = self.connections.len();
            warn!(
                forced,
                "grace period over: closing the remaining connections"
            );
            self.ctx.stopping.cancel();
            let _ = timeout(FORCED_CLOSE_WAIT, self.connections.wait()).await;
            forced
        };
        self.ctx.stopping.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        let report = ShutdownReport {
            open_connections,
            forced,
            elapsed: started.elapsed(),
        };
        info!(?report, "broker stopped");
        report
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            self.accepting.cancel();
            self.background.cancel();
            self.ctx.stopping.cancel();
            runtime.shutdown_background();
            debug!(v4 = %self.v4, "broker dropped: stopped without draining");
        }
    }
}

/// Owns the broker's runtime until the [`Broker`] does; stops it if start-up fails or is
/// abandoned (dropping a runtime inside async code would panic).
struct RuntimeGuard(Option<Runtime>);

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

async fn timeout_at_deadline<F: std::future::Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

fn find(addrs: &[(Listener, SocketAddr)], wanted: Listener) -> Option<SocketAddr> {
    addrs.iter().find(|(l, _)| *l == wanted).map(|(_, a)| *a)
}

/// Binds every configured address (port 0 becomes a free port, distinct per listener).
fn bind_all(config: &BrokerConfig) -> Result<Vec<(Listener, std::net::TcpListener)>, BrokerError> {
    config
        .listeners()
        .map(|(listener, addr)| {
            std::net::TcpListener::bind(addr)
                .and_then(|socket| {
                    socket.set_nonblocking(true)?;
                    Ok((listener, socket))
                })
                .map_err(|source| BrokerError::Bind {
                    listener,
                    addr,
                    source,
                })
        })
        .collect()
}

/// Binds every configured TLS address, as [`bind_all`].
fn bind_all_tls(
    config: &BrokerConfig,
) -> Result<Vec<(Listener, std::net::TcpListener)>, BrokerError> {
    config
        .tls_listeners()
        .map(|(listener, addr)| {
            std::net::TcpListener::bind(addr)
                .and_then(|socket| {
                    socket.set_nonblocking(true)?;
                    Ok((listener, socket))
                })
                .map_err(|source| BrokerError::BindTls {
                    listener,
                    addr,
                    source,
                })
        })
        .collect()
}

/// The sockets [`Broker::start`] bound, and the TLS configuration of the TLS ones.
struct Bound {
    plain: Vec<(Listener, std::net::TcpListener)>,
    tls: Vec<(Listener, std::net::TcpListener)>,
    server_tls: Option<Arc<ServerTls>>,
}

/// What [`assemble`] built on the broker's runtime.
struct Assembled {
    ctx: Arc<FrontEnd>,
    addrs: Vec<(Listener, SocketAddr)>,
    /// The TLS listeners' addresses (not probed by the health checks).
    tls_addrs: Vec<(Listener, SocketAddr)>,
    listeners: Vec<(Listener, CancellationToken)>,
    connections: TaskTracker,
    accepting: CancellationToken,
    background: CancellationToken,
    prober: ProbeReceiver,
    mirror: Option<Mirror>,
    watchdog: Arc<Watchdog>,
}

/// Once a part the broker cannot live without died: stops accepting (the listening sockets
/// close), the health checks and the mirror, and closes every connection.
async fn stop_on_death(
    watchdog: Arc<Watchdog>,
    accepting: CancellationToken,
    background: CancellationToken,
    stopping: CancellationToken,
) {
    watchdog.died().await;
    accepting.cancel();
    background.cancel();
    stopping.cancel();
}

/// Spawns the router, registers the internal links and starts the accept loops. Runs on the
/// broker's runtime (rumqttd's link API blocks briefly).
async fn assemble(
    config: BrokerConfig,
    bound: Bound,
    auth: Option<Arc<Authenticator>>,
    metrics: BrokerMetrics,
) -> Result<Assembled, BrokerError> {
    // The journal first: if it cannot be opened (another broker holds it), nothing else is
    // started (rumqttd's router thread could not be stopped again).
    let waiters = Durability::waiters(&metrics);
    let journal = match &config.journal {
        Some(path) => {
            let bounds = Bounds {
                rows: config.journal_max_rows,
                bytes: config.journal_max_bytes,
            };
            Some(Journal::open(path, bounds, Arc::clone(&waiters), metrics.clone()).await?)
        }
        None => None,
    };
    let registrar = Registrar::spawn(config.router_config(ROUTER_HEADROOM));
    registrar.report_link_names(&metrics);
    let router_filters = Arc::new(FilterBudget::new(config.max_filters, metrics.clone()));
    let instance = format!("{:016x}", fastrand::u64(..));
    let unavailable = |what: &str, err: &dyn std::fmt::Display| BrokerError::RouterUnavailable {
        reason: format!("{what}: {err}"),
    };
    let watchdog = Arc::new(Watchdog::default());

    // rumqttd's router thread: a link that never sends sees its channel close when the
    // thread is gone (rumqttd spawns it and keeps its handle).
    let (_watch_tx, watch_rx, _) = registrar
        .link(LinkRequest::internal(&format!(
            "{INTERNAL_PREFIX}router-watch-{instance}"
        )))
        .map_err(|err| unavailable("the router's watch link", &err))?;
    watchdog.watch(
        "rumqttd's router thread",
        Ending::Fatal,
        router::drain(watch_rx, "router-watch"),
    );

    // The probe link: every listener probe must reach it.
    let probe_id = format!("{INTERNAL_PREFIX}probe-link-{instance}");
    let (mut probe_tx, probe_rx, _) = registrar
        .link(LinkRequest::internal(&probe_id))
        .map_err(|err| unavailable("the probe link", &err))?;
    let probe_topic = format!("{PROBE_TOPIC_PREFIX}{instance}");
    probe_tx
        .subscribe(probe_topic.as_str())
        .map_err(|err| unavailable("the probe subscription", &err))?;
    let pending = PendingConnects::new(
        config.max_pending_connects,
        config.max_pending_connects_per_ip,
    );
    let prober = ProbeReceiver::new(probe_tx, probe_rx, probe_topic, Arc::clone(&pending));

    let retain_wanted = RetainWanted::default();
    let (wills, wills_rx) = WillPublisher::new(
        &registrar,
        &format!("{INTERNAL_PREFIX}wills-{instance}"),
        retain_wanted.clone(),
    )
    .map_err(|err| unavailable("the will publisher", &err))?;
    tokio::spawn(router::drain(wills_rx, "wills"));

    let (mux, mux_rx) = Mux::new(&registrar, &format!("{INTERNAL_PREFIX}mux-{instance}"))
        .await
        .map_err(|err| unavailable("the shared device link", &err))?;
    watchdog.watch(
        "the shared link of device connections",
        Ending::Fatal,
        Arc::clone(&mux).dispatch(mux_rx),
    );

    let watchers = Arc::new(MirrorWatchers::default());
    let mirror = if config.json_mirror {
        let (mut tx, rx, _) = registrar
            .link(LinkRequest::internal(&format!(
                "{INTERNAL_PREFIX}mirror-{instance}"
            )))
            .map_err(|err| unavailable("the mirror link", &err))?;
        for kind in mirror::ALWAYS {
            tx.subscribe(kind.filter())
                .map_err(|err| unavailable("the mirror subscription", &err))?;
        }
        let keys = match &auth {
            Some(auth) => mirror::Keys::File(Arc::clone(auth)),
            None => mirror::Keys::Open,
        };
        Some(Mirror::new(
            (tx, rx),
            keys,
            metrics.clone(),
            Arc::clone(&watchers),
            retain_wanted.clone(),
        ))
    } else {
        None
    };

    let probe_secret: [u8; 16] = {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|err| unavailable("randomness for the probe login", &err))?;
        bytes
    };
    let stopping = CancellationToken::new();
    let alarm = CancellationToken::new();
    {
        let dead = mux.dead().clone();
        let alarm = alarm.clone();
        tokio::spawn(async move {
            dead.cancelled().await;
            alarm.cancel();
        });
    }
    let ctx = Arc::new(FrontEnd {
        limits: Limits {
            connection_timeout: Duration::from_millis(u64::from(config.connection_timeout_ms)),
            max_payload_size: config.max_payload_size,
            max_batch: config.max_inflight_count,
            max_connections: config.max_connections,
            max_publish_rate: config.max_publish_rate,
            max_subscribe_rate: config.max_subscribe_rate,
            max_subscriptions: config.max_subscriptions,
            max_persistent_sessions: config.max_persistent_sessions,
            max_keep_alive: (config.max_keep_alive_secs > 0).then_some(config.max_keep_alive_secs),
        },
        pending,
        auth,
        probe: ProbeLogin {
            username: format!("{INTERNAL_PREFIX}probe"),
            password: hex::encode(probe_secret),
        },
        metrics: metrics.clone(),
        client_ids: ClientIds::new(stopping.clone()),
        registrar: registrar.clone(),
        durability: Arc::new(Durability::new(
            &config.durable_consumers,
            journal.map(|(journal, writer)| {
                watchdog.watch("the journal's writer", Ending::Fatal, writer.run());
                journal
            }),
            waiters,
            Arc::clone(&mux),
            metrics.clone(),
        )),
        mux,
        shared: SharedSubscriptions::new(
            registrar.clone(),
            Arc::clone(&router_filters),
            metrics.clone(),
        ),
        router_filters,
        sessions: crate::connection::Sessions::new(
            registrar.clone(),
            Arc::clone(&watchers),
            metrics.clone(),
            stopping.clone(),
        ),
        own_links: AtomicUsize::new(0),
        watchers,
        wills,
        retain_wanted,
        retained_fetches: crate::retained::Fetches::default(),
        draining: CancellationToken::new(),
        stopping,
        alarm: alarm.clone(),
        admitted: AtomicUsize::new(0),
    });
    tokio::spawn(Arc::clone(&ctx.durability).replay(ctx.draining.clone()));

    let connections = TaskTracker::new();
    let accepting = CancellationToken::new();
    let mut addrs = Vec::new();
    let mut listeners = Vec::new();
    let Bound {
        plain: bound,
        tls: bound_tls,
        server_tls,
    } = bound;
    for (listener, socket) in bound {
        let addr = socket.local_addr().map_err(|source| BrokerError::Bind {
            listener,
            addr: match listener {
                Listener::V4 => config.v4,
                Listener::V5 => config.v5.unwrap_or(config.v4),
            },
            source,
        })?;
        let socket = TcpListener::from_std(socket).map_err(|source| BrokerError::Bind {
            listener,
            addr,
            source,
        })?;
        let stop = accepting.child_token();
        watchdog.watch(
            accept_loop_name(listener),
            Ending::Allowed,
            accept_loop(
                socket,
                listener,
                None,
                Arc::clone(&ctx),
                stop.clone(),
                connections.clone(),
                Duration::from_millis(config.next_connection_delay_ms),
            ),
        );
        info!(listener = %listener, %addr, "listening");
        addrs.push((listener, addr));
        listeners.push((listener, stop));
    }
    // The TLS listeners stop with `accepting`; the health checks do not probe them (their
    // connections take the same path as the plain ones' once the TLS handshake is done).
    let mut tls_addrs = Vec::new();
    for (listener, socket) in bound_tls {
        let Some(server_tls) = &server_tls else {
            break;
        };
        let bind_error = |addr, source| BrokerError::BindTls {
            listener,
            addr,
            source,
        };
        let configured = match listener {
            Listener::V4 => config.tls_listen,
            Listener::V5 => config.tls_listen_v5,
        }
        .unwrap_or(config.v4);
        let addr = socket
            .local_addr()
            .map_err(|source| bind_error(configured, source))?;
        let socket = TcpListener::from_std(socket).map_err(|source| bind_error(addr, source))?;
        watchdog.watch(
            tls_accept_loop_name(listener),
            Ending::Allowed,
            accept_loop(
                socket,
                listener,
                Some(Arc::clone(server_tls)),
                Arc::clone(&ctx),
                accepting.child_token(),
                connections.clone(),
                Duration::from_millis(config.next_connection_delay_ms),
            ),
        );
        info!(listener = %listener, %addr, client_certificates = server_tls.asks_for_client_certs(), "listening (TLS)");
        tls_addrs.push((listener, addr));
    }
    #[cfg(feature = "fault-injection")]
    crate::fault::inject_from_env(&ctx.registrar);

    Ok(Assembled {
        ctx,
        addrs,
        tls_addrs,
        listeners,
        connections,
        accepting,
        background: CancellationToken::new(),
        prober,
        mirror,
        watchdog,
    })
}

/// The accept loop of `listener`, as the watchdog names it.
const fn accept_loop_name(listener: Listener) -> &'static str {
    match listener {
        Listener::V4 => "the MQTT 3.1.1 accept loop",
        Listener::V5 => "the MQTT 5 accept loop",
    }
}

/// The TLS accept loop of `listener`, as the watchdog names it.
const fn tls_accept_loop_name(listener: Listener) -> &'static str {
    match listener {
        Listener::V4 => "the MQTT 3.1.1 over TLS accept loop",
        Listener::V5 => "the MQTT 5 over TLS accept loop",
    }
}

/// Accepts connections on `socket` until `stop`; each one is served by its own task (which
/// does the TLS handshake, if `tls` is given).
async fn accept_loop(
    socket: TcpListener,
    listener: Listener,
    tls: Option<Arc<ServerTls>>,
    ctx: Arc<FrontEnd>,
    stop: CancellationToken,
    connections: TaskTracker,
    delay: Duration,
) {
    let mut last_error_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                connections.spawn(connection::serve(
                    stream,
                    peer,
                    listener,
                    tls.clone(),
                    Arc::clone(&ctx),
                ));
                if !delay.is_zero() {
                    sleep(delay).await;
                }
            }
            Err(err) => {
                // Out of file descriptors and the like: back off, and do not flood the log.
                if last_error_log.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                    error!(listener = %listener, cause = %err, "cannot accept connections");
                    last_error_log = Some(Instant::now());
                }
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
    info!(listener = %listener, "stopped accepting connections");
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    /// Outer bound on anything a test awaits.
    const T: Duration = Duration::from_secs(20);

    /// rumqttd's router thread dies (the panic of issue #13, caused here through the router's
    /// own API, since the front end refuses `$share`): the broker does not linger as a zombie.
    /// `failed` resolves, the listeners close, connections are closed.
    #[tokio::test]
    async fn a_dead_router_ends_the_broker_instead_of_leaving_a_zombie() {
        let broker = Broker::start(BrokerConfig::ephemeral()).await.unwrap();
        let addr = broker.v4_addr();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let connect = shared::frame::Connect {
            client_id: "bystander",
            keep_alive: 30,
            ..shared::frame::Connect::default()
        };
        client.write_all(&connect.bytes()).await.unwrap();
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0]);

        crate::fault::router_panic(&broker.ctx.registrar)
            .await
            .expect("the router takes the reproduction");
        let died = timeout(T, broker.failed())
            .await
            .expect("the death is reported");
        let BrokerError::Died { part, .. } = died else {
            panic!("{died:?}");
        };
        assert!(
            part == "rumqttd's router thread" || part == "the shared link of device connections",
            "{part}"
        );
        assert!(!broker.is_alive() && !broker.is_ready());

        // Nothing accepts any more, and the connection was closed.
        timeout(T, async {
            while TcpStream::connect(addr).await.is_ok() {
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the listener closes");
        let mut rest = Vec::new();
        let read = timeout(T, client.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "the connection is closed"
        );
        let report = timeout(T, broker.shutdown()).await.unwrap();
        assert_eq!(report.forced, 0);
    }
}
