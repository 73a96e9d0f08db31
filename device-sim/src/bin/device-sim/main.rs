//! `device-sim`: simulated Fleetbeat vehicles publishing heartbeats to an MQTT broker.

mod status_line;

use std::io::IsTerminal as _;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use device_sim::cli::{Cli, CliCommand};
use device_sim::runner::ProgressDisplay;
use tracing::info;
use tracing_subscriber::EnvFilter;

use crate::status_line::{LogWriter, StatusLine};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let status = match cli.command {
        None => StatusLine::for_stderr(),
        Some(_) => None,
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(LogWriter::around(status.as_ref()))
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(CliCommand::Provision(args)) = &cli.command {
        let (added, total) = args.run().context("cannot provision")?;
        info!(
            added,
            total,
            secrets = %args.secrets.display(),
            "provisioned; register the same vehicles with the broker (see docs/device-sim.md)"
        );
        return Ok(());
    }
    let config = cli.into_config().context("invalid settings")?;
    let display = status.map(|line| Arc::new(line) as Arc<dyn ProgressDisplay>);
    let report = device_sim::runner::run_with_display(config, shutdown_signal(), display)
        .await
        .context("cannot run the simulation")?;
    info!(
        vehicles = report.vehicles,
        heartbeats = report.heartbeats_sent,
        heartbeats_dropped = report.heartbeats_dropped,
        events_sent = report.events_sent,
        events_acked = report.events_acked,
        garbage = report.garbage_sent,
        chaos_drops = report.chaos_drops,
        acks = report.commands_answered,
        bad_commands = report.bad_commands,
        reconnects = report.reconnects,
        errors = report.errors,
        oversized_packets = report.oversized_packets,
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
