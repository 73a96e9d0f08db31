//! `bridge`: MQTT ⇄ Socket.IO for Fleetbeat. Parses the command line, starts tracing, runs the
//! library until SIGINT or SIGTERM.

use std::io::IsTerminal as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use bridge::config::MqttEndpoint;
use bridge::{Bridge, BridgeConfig, MqttTarget};
use clap::Parser;
use tokio::net::TcpListener;
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Fleetbeat bridge: vehicles' MQTT topics to Socket.IO namespaces and rooms.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address to serve HTTP and Socket.IO on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "FLEETBEAT_LISTEN")]
    listen: SocketAddr,
    /// Use an external MQTT broker (`mqtt://[user:pass@]host[:port]`) instead of the embedded one.
    #[arg(long, env = "FLEETBEAT_MQTT_URL")]
    mqtt_url: Option<String>,
    /// Where the embedded broker listens for MQTT 3.1.1 clients.
    #[arg(long, default_value = "127.0.0.1:1883", env = "FLEETBEAT_MQTT_LISTEN")]
    mqtt_listen: SocketAddr,
    /// Where the embedded broker listens for MQTT 5 clients.
    #[arg(
        long,
        default_value = "127.0.0.1:1884",
        env = "FLEETBEAT_MQTT_LISTEN_V5"
    )]
    mqtt_listen_v5: SocketAddr,
    /// MQTT client id of this bridge (stable: the broker keeps its session).
    #[arg(long, default_value = "fleetbeat-bridge", env = "FLEETBEAT_CLIENT_ID")]
    client_id: String,
    /// Also run this many simulated vehicles in-process (the demo).
    #[arg(long, default_value_t = 0)]
    simulate: u32,
    /// Heartbeat rate of the simulated vehicles, in Hz.
    #[arg(long, default_value_t = 1.0)]
    sim_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();

    let mqtt = match &cli.mqtt_url {
        Some(url) => MqttTarget::External(MqttEndpoint::parse(url)?),
        None => MqttTarget::Embedded(broker::BrokerConfig {
            v4: cli.mqtt_listen,
            v5: Some(cli.mqtt_listen_v5),
            ..broker::BrokerConfig::default()
        }),
    };
    let config = BridgeConfig {
        mqtt,
        client_id: cli.client_id.clone(),
        ..BridgeConfig::default()
    };
    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let bridge = Bridge::start(listener, config)
        .await
        .context("starting the bridge")?;

    let endpoint = bridge.mqtt_endpoint().clone();
    info!(
        "watch the raw traffic:  mosquitto_sub -h {} -p {} -t 'fleet/#' -v",
        endpoint.host, endpoint.port
    );
    info!(
        "Socket.IO:              http://{}/dispatch  (emit 'join' with 'all', 'fleet:demo' or 'vehicle:demo-0001')",
        bridge.http_addr()
    );

    let stop = tokio_util::sync::CancellationToken::new();
    let sim = (cli.simulate > 0).then(|| {
        let config = device_sim::runner::SimConfig {
            vehicles: cli.simulate,
            broker_host: endpoint.host.clone(),
            broker_port: endpoint.port,
            rate_hz: cli.sim_rate,
            ..device_sim::runner::SimConfig::default()
        };
        let stop = stop.clone();
        tokio::spawn(async move { device_sim::runner::run(config, stop.cancelled_owned()).await })
    });

    shutdown_signal().await;
    stop.cancel();
    if let Some(sim) = sim {
        match sim.await.context("simulator task")? {
            Ok(report) => info!(?report, "simulated vehicles stopped"),
            Err(err) => tracing::warn!(cause = %err, "simulator stopped with an error"),
        }
    }
    bridge.shutdown().await.context("shutting down")?;
    Ok(())
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
