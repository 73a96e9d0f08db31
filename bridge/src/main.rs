//! `bridge`: MQTT ⇄ Socket.IO for Fleetbeat. Parses the command line, starts tracing, runs the
//! library until SIGINT or SIGTERM.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use bridge::Bridge;
use bridge::config::{
    DEFAULT_CONFIG, GeofenceSettings, NewToken, NewTokenRole, OrderSettings, Secret, Settings,
    SocketIoSettings, add_token, redact_url,
};
use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// jemalloc instead of glibc's malloc: the broker's commit logs free their segments' megabyte
/// vectors and a hundred thousand small messages at a time, which glibc's per-thread arenas
/// kept as fragments (a soak's resident memory crept with the live heap flat); jemalloc hands
/// freed pages back to the system after a few seconds (bench/README.md, Soak). The feature
/// `system-allocator` keeps the system's malloc, for valgrind's DHAT, which counts only the
/// allocations that go through it.
#[cfg(all(not(target_env = "msvc"), not(feature = "system-allocator")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Fleetbeat bridge: vehicles' MQTT topics to Socket.IO namespaces and rooms.
///
/// Settings come from built-in defaults, then `--config FILE`, then `FLEETBEAT_*`
/// environment variables, then these flags (`bridge default-config` prints the file).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A TOML configuration file.
    #[arg(long, env = "FLEETBEAT_CONFIG")]
    config: Option<PathBuf>,
    /// Address to serve HTTP and Socket.IO on.
    #[arg(long, env = "FLEETBEAT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Use an external MQTT broker (`mqtt://[user:pass@]host[:port]`, or `mqtts://...` over
    /// TLS with --mqtt-ca-file) instead of the embedded one.
    #[arg(long, env = "FLEETBEAT_MQTT_URL")]
    mqtt_url: Option<String>,
    /// The CA bundle (PEM) that signed the `mqtts://` broker's certificate.
    #[arg(long, env = "FLEETBEAT_MQTT_CA_FILE")]
    mqtt_ca_file: Option<PathBuf>,
    /// The bridge's client certificate (PEM) for an `mqtts://` broker that wants one.
    #[arg(long, env = "FLEETBEAT_MQTT_CLIENT_CERT")]
    mqtt_client_cert: Option<PathBuf>,
    /// The key (PEM) of --mqtt-client-cert.
    #[arg(long, env = "FLEETBEAT_MQTT_CLIENT_KEY")]
    mqtt_client_key: Option<PathBuf>,
    /// Serve HTTPS (and WSS) with this certificate chain (PEM; with --tls-key). Reloaded
    /// when the file changes.
    #[arg(long, env = "FLEETBEAT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "FLEETBEAT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Where the embedded broker listens for MQTT clients.
    #[arg(long, env = "FLEETBEAT_MQTT_LISTEN")]
    mqtt_listen: Option<SocketAddr>,
    /// MQTT client id of this bridge (stable: the broker keeps its session).
    #[arg(long, env = "FLEETBEAT_CLIENT_ID")]
    client_id: Option<String>,
    /// Several bridges: the MQTT shared-subscription group this bridge joins for device
    /// topics (`$share/NAME/fleet/+/+/KIND`); the broker spreads the devices over the group.
    #[arg(long, env = "FLEETBEAT_SHARED_GROUP")]
    shared_group: Option<String>,
    /// Several bridges: the Redis server of the Socket.IO Redis adapter and of the shared
    /// vehicle state (`redis://127.0.0.1:6379`).
    #[arg(long, env = "FLEETBEAT_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// The broker's credentials file with the device message keys (unset: open mode).
    #[arg(long, env = "FLEETBEAT_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// The bridge's MQTT password when the broker authenticates (username: the client id).
    /// On the command line it is visible to every user of the machine (`ps`): prefer
    /// FLEETBEAT_MQTT_PASSWORD or --mqtt-password-file.
    #[arg(long, env = "FLEETBEAT_MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
    /// A file whose first line is the bridge's MQTT password (instead of --mqtt-password).
    #[arg(long, env = "FLEETBEAT_MQTT_PASSWORD_FILE")]
    mqtt_password_file: Option<PathBuf>,
    /// Let demo mode (no credentials file, no tokens) serve on a non-loopback address.
    #[arg(long, env = "FLEETBEAT_ALLOW_PUBLIC_DEMO")]
    allow_public_demo: bool,
    /// Serve /metrics to anyone (otherwise: to the metrics token, or to loopback only).
    #[arg(long, env = "FLEETBEAT_METRICS_PUBLIC")]
    metrics_public: bool,
    /// The SHA-256 (64 hex digits) of the token /metrics wants (`bridge add-token --role
    /// metrics` writes it into the configuration file).
    #[arg(long, env = "FLEETBEAT_METRICS_TOKEN_SHA256")]
    metrics_token_sha256: Option<String>,
    /// The token /metrics wants, in plain (prefer --metrics-token-sha256).
    #[arg(long, env = "FLEETBEAT_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// Position tick in milliseconds.
    #[arg(long, env = "FLEETBEAT_TICK_MS")]
    tick_ms: Option<u64>,
    /// Below this many positions/s they go to dispatchers at once, not per tick (0: per tick).
    #[arg(long, env = "FLEETBEAT_FLUSH_AT_ONCE_BELOW")]
    flush_at_once_below: Option<u32>,
    /// A vehicle without heartbeats for this long is stale (0: 3 of its intervals).
    #[arg(long, env = "FLEETBEAT_STALE_AFTER_MS")]
    stale_after_ms: Option<u64>,
    /// How long a command waits for the vehicle's ack.
    #[arg(long, env = "FLEETBEAT_COMMAND_TIMEOUT_MS")]
    command_timeout_ms: Option<u64>,
    /// How long a QoS 1 message from a vehicle without a key (yet) is held unacknowledged
    /// before it is parked in the store and acknowledged (100 ..= 3600000; default 60000).
    #[arg(long, env = "FLEETBEAT_KEY_WAIT_PARK_AFTER_MS")]
    key_wait_park_after_ms: Option<u64>,
    /// The store (orders, queues, history): a SQLite file, `:memory:`, or a `postgres://` URL
    /// (several bridges share one PostgreSQL).
    #[arg(long, env = "FLEETBEAT_STORE")]
    store: Option<String>,
    /// `full` (fsync every commit, the default) or `normal`.
    #[arg(long, env = "FLEETBEAT_SYNCHRONOUS")]
    synchronous: Option<String>,
    // Socket.IO limits (issue 14): `--socketio-*`, `FLEETBEAT_SOCKETIO_*`.
    #[command(flatten)]
    socketio: SocketIoSettings,
    /// `--orders-*`, `FLEETBEAT_ORDERS_*`.
    #[command(flatten)]
    orders: OrderSettings,
    /// `--geofences-*`, `FLEETBEAT_GEOFENCES_*`.
    #[command(flatten)]
    geofences: GeofenceSettings,
    /// Also run this many simulated vehicles of fleet `demo` in-process, and simulated
    /// stores placing orders (the demo).
    #[cfg(feature = "demo")]
    #[arg(long, default_value_t = 0)]
    simulate: u32,
    /// Heartbeat rate of the simulated vehicles, in Hz (real time).
    #[cfg(feature = "demo")]
    #[arg(long, default_value_t = 1.0)]
    sim_rate: f64,
    /// How much faster than real time the simulated vehicles live (0 < x <= 1000); the
    /// stores order this much more often too.
    #[cfg(feature = "demo")]
    #[arg(long, default_value_t = 1.0)]
    sim_speed: f64,
    /// With --simulate: how many simulated stores place orders (0 ..= 3: vendor-demo,
    /// vendor-demo-2, vendor-demo-3).
    #[cfg(feature = "demo")]
    #[arg(long, default_value_t = bridge::demo::DEFAULT_STORES)]
    sim_stores: u32,
    /// With --simulate: real milliseconds between two orders of one store, at speed 1
    /// (divided by --sim-speed).
    #[cfg(feature = "demo")]
    #[arg(long, default_value_t = bridge::demo::DEFAULT_ORDER_EVERY_MS)]
    sim_order_every_ms: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the commented default configuration file.
    DefaultConfig,
    /// Make a new token, add its SHA-256 and what it grants to the configuration file, and
    /// print the token (only this once: the file does not hold it).
    AddToken {
        /// What the token grants.
        #[arg(long, value_enum)]
        role: NewTokenRole,
        /// Dispatchers: a fleet they may watch (repeatable; `*` for every fleet). Vendors: the
        /// fleet that delivers their orders.
        #[arg(long)]
        fleet: Vec<String>,
        /// Vendors: their store id.
        #[arg(long)]
        store: Option<String>,
        /// A name for logs and the client's queue identity.
        #[arg(long)]
        name: Option<String>,
        /// The configuration file to add it to (created if missing).
        #[arg(long)]
        config: PathBuf,
    },
}

impl Cli {
    fn settings(&self) -> anyhow::Result<Settings> {
        let mut settings = Settings::defaults()?;
        if let Some(path) = &self.config {
            settings = settings.overridden_by(Settings::load(path)?);
        }
        Ok(settings.overridden_by(Settings {
            listen: self.listen,
            mqtt_url: self.mqtt_url.clone(),
            mqtt_ca_file: self.mqtt_ca_file.clone(),
            mqtt_client_cert: self.mqtt_client_cert.clone(),
            mqtt_client_key: self.mqtt_client_key.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            mqtt_listen: self.mqtt_listen,
            client_id: self.client_id.clone(),
            shared_group: self.shared_group.clone(),
            redis_url: self.redis_url.clone().map(Secret::new),
            credentials: self.credentials.clone(),
            mqtt_password: self.mqtt_password.clone().map(Secret::new),
            mqtt_password_file: self.mqtt_password_file.clone(),
            allow_public_demo: self.allow_public_demo.then_some(true),
            metrics_public: self.metrics_public.then_some(true),
            metrics_token_sha256: self.metrics_token_sha256.clone(),
            metrics_token: self.metrics_token.clone().map(Secret::new),
            tick_ms: self.tick_ms,
            flush_at_once_below: self.flush_at_once_below,
            stale_after_ms: self.stale_after_ms,
            command_timeout_ms: self.command_timeout_ms,
            key_wait_park_after_ms: self.key_wait_park_after_ms,
            store: self.store.clone(),
            synchronous: self.synchronous.clone(),
            // Socket.IO limits (issue 14)
            socketio: Some(self.socketio.clone()),
            orders: Some(self.orders.clone()),
            geofences: Some(self.geofences.clone()),
            ..Settings::default()
        }))
    }
}

#[cfg(feature = "demo")]
impl Cli {
    /// The demo's settings (`--simulate` and the `--sim-*` flags).
    fn demo(&self) -> bridge::demo::DemoConfig {
        bridge::demo::DemoConfig {
            vehicles: self.simulate,
            rate_hz: self.sim_rate,
            speed: self.sim_speed,
            stores: self.sim_stores,
            order_every: std::time::Duration::from_millis(self.sim_order_every_ms),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match &cli.command {
        Some(Command::DefaultConfig) => {
            print!("{DEFAULT_CONFIG}");
            return Ok(());
        }
        Some(Command::AddToken {
            role,
            fleet,
            store,
            name,
            config,
        }) => {
            let request = NewToken {
                role: *role,
                fleets: fleet.clone(),
                store: store.clone(),
                name: name.clone(),
            };
            let token = add_token(config, &request)?;
            println!("token: {token}");
            eprintln!(
                "added to {} as its SHA-256; the token is shown only this once",
                config.display()
            );
            return Ok(());
        }
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(broker::logging::without_rumqttd_spans())
        .init();
    warn_secrets_on_argv(&matches);

    let (listen, config) = cli.settings()?.into_config()?;
    #[cfg(feature = "demo")]
    let demo_config = cli.demo();
    #[cfg(feature = "demo")]
    if demo_config.vehicles > 0 {
        demo_config.validate()?;
    }
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            anyhow::bail!(port_taken(
                "HTTP",
                listen,
                &format!("--listen {}:PORT or FLEETBEAT_LISTEN", listen.ip()),
            ));
        }
        Err(err) => return Err(err).with_context(|| format!("binding {listen}")),
    };
    let bridge = match Bridge::start(listener, config).await {
        Ok(bridge) => bridge,
        Err(err) => match broker_port_taken(&err) {
            Some(message) => anyhow::bail!(message),
            None => return Err(err).context("starting the bridge"),
        },
    };

    let endpoint = bridge.mqtt_endpoint().clone();
    info!(
        "watch the raw traffic:  mosquitto_sub -h {} -p {} -t 'fleet/#' -v",
        endpoint.host, endpoint.port
    );
    info!(
        "dispatcher page:        {}://{}/  (Socket.IO: /dispatch, /vendor, /admin)",
        if bridge.https() { "https" } else { "http" },
        bridge.http_addr()
    );

    #[cfg(feature = "demo")]
    let demo = match bridge::demo::Demo::start(&demo_config, &bridge) {
        Ok(demo) => demo,
        Err(err) => {
            bridge.shutdown().await.context("shutting down")?;
            return Err(err).context("starting the demo");
        }
    };
    // A signal stops the bridge; so does the death of the embedded broker, then with an error
    // (exit code 1) so a supervisor restarts it.
    let died = tokio::select! {
        () = shutdown_signal() => None,
        death = bridge.failed() => Some(death),
    };
    #[cfg(feature = "demo")]
    if let Some(demo) = demo {
        demo.stop().await;
    }
    bridge.shutdown().await.context("shutting down")?;
    if let Some(death) = died {
        return Err(anyhow::Error::new(death).context("the embedded MQTT broker died"));
    }
    Ok(())
}

/// The one-line message for a listen address that another program holds: which port, and
/// how to choose another (`how`).
fn port_taken(what: &str, addr: SocketAddr, how: &str) -> String {
    format!(
        "cannot listen for {what} on {addr}: the port is in use by another program (e.g. a \
         mosquitto service, or another bridge); choose another port with {how} (port 0: any \
         free port)"
    )
}

/// The [`port_taken`] message when the embedded broker could not bind a port that is in use.
fn broker_port_taken(err: &bridge::BridgeError) -> Option<String> {
    use broker::{BrokerError, Listener};
    let bridge::BridgeError::Broker(err) = err else {
        return None;
    };
    let (what, addr, source) = match err {
        BrokerError::Bind {
            listener,
            addr,
            source,
        } => (*listener, addr, source),
        BrokerError::BindTls { addr, source, .. } => {
            let how = "listen_tls / listen_tls_v5 in the [broker] table of the configuration file";
            return (source.kind() == std::io::ErrorKind::AddrInUse)
                .then(|| port_taken("MQTT over TLS", *addr, how));
        }
        _ => return None,
    };
    if source.kind() != std::io::ErrorKind::AddrInUse {
        return None;
    }
    Some(match what {
        Listener::V4 => port_taken(
            "MQTT",
            *addr,
            &format!("--mqtt-listen {}:PORT or FLEETBEAT_MQTT_LISTEN", addr.ip()),
        ),
        Listener::V5 => port_taken(
            "MQTT 5",
            *addr,
            "listen_v5 in the [broker] table of the configuration file",
        ),
    })
}

/// Warns about secrets given on the command line, where every user of the machine sees them.
fn warn_secrets_on_argv(matches: &clap::ArgMatches) {
    let on_argv = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    if on_argv("mqtt_password") {
        warn!(
            "--mqtt-password on the command line is visible to every user (ps): use \
             FLEETBEAT_MQTT_PASSWORD or --mqtt-password-file"
        );
    }
    if on_argv("metrics_token") {
        warn!(
            "--metrics-token on the command line is visible to every user (ps): use \
             --metrics-token-sha256"
        );
    }
    let url_password = matches
        .get_one::<String>("mqtt_url")
        .is_some_and(|url| redact_url(url) != *url);
    if on_argv("mqtt_url") && url_password {
        warn!(
            "--mqtt-url with a password on the command line is visible to every user (ps): \
             use FLEETBEAT_MQTT_PASSWORD or --mqtt-password-file"
        );
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = term => info!("SIGTERM received"),
    }
}
