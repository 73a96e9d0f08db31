//! `broker`: Fleetbeat's MQTT broker as a process. Parses the command line, starts tracing,
//! starts [`broker::Broker`] and runs until SIGINT or SIGTERM.

use std::net::SocketAddr;

use anyhow::Context as _;
use broker::{Broker, BrokerConfig};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// Fleetbeat's MQTT broker (rumqttd with bounded memory).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address of the MQTT 3.1.1 listener.
    #[arg(
        long,
        env = "FLEETBEAT_BROKER_LISTEN",
        default_value = "127.0.0.1:1883"
    )]
    listen: SocketAddr,

    /// Address of the MQTT 5 listener.
    #[arg(
        long,
        env = "FLEETBEAT_BROKER_LISTEN_V5",
        default_value = "127.0.0.1:1884"
    )]
    listen_v5: SocketAddr,

    /// Run without the MQTT 5 listener.
    #[arg(long, env = "FLEETBEAT_BROKER_NO_V5")]
    no_v5: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .context("parsing RUST_LOG")?;
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let config = BrokerConfig {
        v4: cli.listen,
        v5: (!cli.no_v5).then_some(cli.listen_v5),
        ..BrokerConfig::default()
    };
    let broker = Broker::start(config)
        .await
        .context("starting the MQTT broker")?;
    info!(v4 = %broker.v4_addr(), v5 = ?broker.v5_addr(), "broker ready");

    let signal = shutdown_signal().await?;
    // rumqttd has no stop API: returning from main ends its threads with the process.
    info!(signal, "shutting down");
    Ok(())
}

/// Resolves with the name of the first SIGINT or SIGTERM received.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = interrupt.recv() => Ok("SIGINT"),
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}
