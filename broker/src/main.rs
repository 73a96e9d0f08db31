//! `broker`: Fleetbeat's MQTT broker as a process. Parses the command line, starts tracing,
//! and runs the broker (serving `/metrics`) until SIGINT or SIGTERM, or edits the credentials
//! file, or prints the default configuration.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use broker::config::{self, DEFAULT_CONFIG_TOML};
use broker::{Broker, ConfigOverrides, CredentialsFile, NewPassword, Role};
use clap::{Args, Parser, Subcommand};
use shared::FleetId;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// jemalloc instead of glibc's malloc: the broker's commit logs free their segments' megabyte
/// vectors and a hundred thousand small messages at a time, which glibc's per-thread arenas
/// kept as fragments (a soak's resident memory crept with the live heap flat); jemalloc hands
/// freed pages back to the system after a few seconds (bench/README.md, Soak).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Fleetbeat's MQTT broker: authenticated, bounded, observable.
///
/// Configuration layers: built-in defaults, then the --config file, then FLEETBEAT_BROKER_*
/// environment variables, then these flags. `broker default-config` prints every key.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default).
    Run(Box<RunArgs>),
    /// Print the commented default configuration file.
    DefaultConfig,
    /// Add a device to the credentials file, or give it a new password and key.
    AddDevice(AddDevice),
    /// Add a client (the bridge, or an observer for mosquitto_sub) to the credentials file.
    AddClient(AddClient),
}

#[derive(Debug, Clone, Default, Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(flatten)]
    overrides: ConfigOverrides,
}

#[derive(Debug, Args)]
struct CredentialsTarget {
    /// The credentials file to edit (created if missing); defaults to `credentials` from the
    /// configuration layers.
    #[arg(long, value_name = "PATH")]
    credentials: Option<PathBuf>,

    /// TOML configuration file to read `credentials` from.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct AddDevice {
    /// The vehicle id: the device's MQTT username and client id.
    vehicle_id: String,

    /// The device's fleet: the only `fleet/{fleet}/...` topics it may use, and the fleet the
    /// bridge files it in. Required.
    #[arg(long)]
    fleet: FleetId,

    /// Use this password (at least 8 characters, hashed expensively) instead of a generated
    /// one (128 random bits, hashed cheaply: the right choice for devices).
    #[arg(long)]
    password: Option<String>,

    #[command(flatten)]
    target: CredentialsTarget,
}

#[derive(Debug, Args)]
struct AddClient {
    /// The client's name: its MQTT username.
    name: String,

    /// What it may do: bridge (publish and subscribe anywhere) or observer (subscribe only).
    #[arg(long, value_enum)]
    role: Role,

    /// Use this password (at least 8 characters) instead of a generated one.
    #[arg(long)]
    password: Option<String>,

    #[command(flatten)]
    target: CredentialsTarget,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // rumqttd logs every connection at INFO: too much for a fleet, unless asked for.
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse(directives)
            .context("parsing RUST_LOG")?,
        _ => EnvFilter::new("info,rumqttd=warn"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .finish()
        .with(broker::logging::without_rumqttd_spans())
        .init();

    match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(*args).await,
        Some(Command::DefaultConfig) => {
            print!("{DEFAULT_CONFIG_TOML}");
            Ok(())
        }
        Some(Command::AddDevice(add)) => add_device(add),
        Some(Command::AddClient(add)) => add_client(add),
    }
}

/// Runs the broker and its `/metrics` endpoint until SIGINT or SIGTERM, then shuts down
/// gracefully within `shutdown_grace`; or until the broker dies, then fails (exit code 1).
async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Installed first: a signal that arrives while starting is handled once started.
    let shutdown = ShutdownSignal::install()?;
    let config = config::load(args.config.as_deref(), &args.overrides)
        .context("loading the configuration")?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener to {addr}"))?,
        ),
        None => None,
    };
    let broker = Broker::start(config)
        .await
        .context("starting the MQTT broker")?;

    let stop_http = CancellationToken::new();
    let http = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "serving /metrics");
        }
        let stop = stop_http.clone();
        tokio::spawn(broker::http::serve(
            listener,
            broker.metrics(),
            async move {
                stop.cancelled().await;
            },
        ))
    });

    // The broker stops by a signal, or dies (it has stopped accepting and closed every
    // connection by then): the process exits non-zero so a supervisor restarts it.
    let died = tokio::select! {
        signal = shutdown.recv() => {
            info!(signal, "shutting down");
            None
        }
        death = broker.failed() => Some(death),
    };
    let report = broker.shutdown().await;
    stop_http.cancel();
    if let Some(http) = http {
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => error!(cause = %err, "the metrics endpoint failed"),
            Err(err) => error!(cause = %err, "the metrics endpoint panicked"),
        }
    }
    if let Some(death) = died {
        return Err(anyhow::Error::new(death).context("the MQTT broker died"));
    }
    info!(forced = report.forced, elapsed = ?report.elapsed, "bye");
    Ok(())
}

/// SIGINT and SIGTERM, caught from the moment it is installed.
struct ShutdownSignal {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignal {
    fn install() -> anyhow::Result<ShutdownSignal> {
        Ok(ShutdownSignal {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Resolves with the name of the first SIGINT or SIGTERM received.
    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// The credentials file to edit: `--credentials`, else the configuration's `credentials`.
fn credentials_path(target: &CredentialsTarget) -> anyhow::Result<PathBuf> {
    if let Some(path) = &target.credentials {
        return Ok(path.clone());
    }
    let config = config::load(target.config.as_deref(), &ConfigOverrides::default())
        .context("loading the configuration to find the credentials file")?;
    match config.credentials {
        Some(path) => Ok(path),
        None => bail!(
            "no credentials file: pass --credentials PATH, or set `credentials` in the \
             configuration (FLEETBEAT_BROKER_CREDENTIALS)"
        ),
    }
}

fn new_password(given: Option<String>) -> NewPassword {
    given.map_or(NewPassword::Generate, NewPassword::Given)
}

fn add_device(add: AddDevice) -> anyhow::Result<()> {
    let path = credentials_path(&add.target)?;
    let mut file = open(&path)?;
    let issued = file
        .add_device(&add.vehicle_id, &add.fleet, new_password(add.password))
        .context("adding the device")?;
    file.save().context("saving the credentials file")?;
    println!("device {} written to {}", add.vehicle_id, path.display());
    println!("username: {}  (also its MQTT client id)", add.vehicle_id);
    println!("fleet:    {}", add.fleet);
    println!("password: {}", issued.password);
    if let Some(key) = issued.key {
        println!("key:      {key}");
    }
    println!(
        "Shown once: the file keeps only a hash of the password. Provision both on the device."
    );
    Ok(())
}

fn add_client(add: AddClient) -> anyhow::Result<()> {
    let path = credentials_path(&add.target)?;
    let mut file = open(&path)?;
    let issued = file
        .add_client(&add.name, add.role, new_password(add.password))
        .context("adding the client")?;
    file.save().context("saving the credentials file")?;
    println!("{} {} written to {}", add.role, add.name, path.display());
    println!("username: {}", add.name);
    println!("password: {}", issued.password);
    println!("Shown once: the file keeps only a hash of the password.");
    Ok(())
}

fn open(path: &Path) -> anyhow::Result<CredentialsFile> {
    CredentialsFile::open(path).with_context(|| format!("opening {}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_work_without_a_subcommand() {
        let cli =
            Cli::try_parse_from(["broker", "--listen", "127.0.0.1:2883", "--listen-v5", "off"])
                .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.overrides.listen.as_deref(), Some("127.0.0.1:2883"));
        assert_eq!(cli.run.overrides.listen_v5.as_deref(), Some("off"));

        let cli = Cli::try_parse_from([
            "broker",
            "add-device",
            "van-1",
            "--fleet",
            "north",
            "--credentials",
            "c.toml",
        ])
        .unwrap();
        match cli.command {
            Some(Command::AddDevice(add)) => {
                assert_eq!(add.vehicle_id, "van-1");
                assert_eq!(add.fleet.as_str(), "north");
                assert_eq!(add.password, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["broker", "add-device", "van-1", "--credentials", "c.toml"])
                .is_err(),
            "--fleet is required"
        );
        assert!(
            Cli::try_parse_from(["broker", "add-device", "van-1", "--fleet", "a/b"]).is_err(),
            "a fleet is a fleet id"
        );
        let cli =
            Cli::try_parse_from(["broker", "add-client", "alice", "--role", "observer"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::AddClient(AddClient {
                role: Role::Observer,
                ..
            }))
        ));
        assert!(Cli::try_parse_from(["broker", "add-client", "alice", "--role", "admin"]).is_err());
    }
}
