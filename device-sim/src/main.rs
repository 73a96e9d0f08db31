//! `device-sim`: simulated Fleetbeat vehicles publishing heartbeats to an MQTT broker.

use anyhow::Context as _;
use clap::Parser as _;
use device_sim::cli::Cli;
use std::io::IsTerminal as _;
use tracing::info;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = cli.into_config().context("invalid settings")?;
    let report = device_sim::runner::run(config, shutdown_signal())
        .await
        .context("cannot run the simulation")?;
    info!(
        vehicles = report.vehicles,
        heartbeats = report.heartbeats_sent,
        heartbeats_dropped = report.heartbeats_dropped,
        acks = report.commands_answered,
        bad_commands = report.bad_commands,
        reconnects = report.reconnects,
        errors = report.errors,
        elapsed = ?report.elapsed,
        "simulation finished"
    );
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
