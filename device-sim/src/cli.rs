//! The `device-sim` command line, and how it becomes a [`SimConfig`].
//!
//! Every flag can also come from a `FLEETBEAT_SIM_*` environment variable; a flag on the
//! command line wins.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use shared::{FleetId, Position};

use crate::runner::{Chaos, SimConfig, SimError, TlsConfig, TlsError};
use crate::secrets::{DeviceSecrets, SecretsError};

/// Simulated delivery vehicles: each one its own MQTT connection, driving a street grid,
/// delivering orders and publishing sealed GPS heartbeats and delivery events.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "device-sim",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Something else than running the simulation.
    #[command(subcommand)]
    pub command: Option<CliCommand>,

    /// How many vehicles to simulate.
    #[arg(long, default_value_t = 100, env = "FLEETBEAT_SIM_VEHICLES")]
    pub vehicles: u32,

    /// The MQTT broker: `mqtt://host:port`, `tcp://host:port`, `host:port` or `host`
    /// (port 1883), or over TLS `mqtts://host:port` (port 8883; needs `--ca-file`). IPv6
    /// addresses go in brackets: `[::1]:1883`.
    #[arg(
        long,
        default_value = "mqtt://127.0.0.1:1883",
        env = "FLEETBEAT_SIM_BROKER"
    )]
    pub broker: BrokerAddr,

    /// TLS (`mqtts://`): the PEM bundle of the CAs the broker's certificate must chain to.
    /// Required with `mqtts://`: this build has no system root store.
    #[arg(long, value_name = "PATH", env = "FLEETBEAT_SIM_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Mutual TLS (`mqtts://`): each vehicle presents the certificate `DIR/{vehicle-id}.pem`
    /// with the key `DIR/{vehicle-id}-key.pem` (e.g. `DIR/demo-0001.pem`). Without it no
    /// client certificate is sent.
    #[arg(long, value_name = "DIR", env = "FLEETBEAT_SIM_CLIENT_CERT_DIR")]
    pub client_cert_dir: Option<PathBuf>,

    /// The fleets, comma-separated; vehicles are dealt to them in turn and numbered within
    /// each: `north-0001`, `south-0001`, `north-0002`, ...
    #[arg(
        long,
        default_value = "demo",
        value_delimiter = ',',
        env = "FLEETBEAT_SIM_FLEET"
    )]
    pub fleet: Vec<FleetId>,

    /// Heartbeats per (real) second per vehicle; fractions allowed (0.2 = every 5 s), at
    /// most 10. Parked vehicles report 5 times less often.
    #[arg(
        long = "rate",
        value_name = "HZ",
        default_value_t = 1.0,
        env = "FLEETBEAT_SIM_RATE"
    )]
    pub rate_hz: f64,

    /// The MQTT QoS of heartbeats, 0 or 1 (events, statuses and acks are always QoS 1).
    #[arg(long, default_value_t = 0, env = "FLEETBEAT_SIM_QOS")]
    pub qos: u8,

    /// Seed for starts, batteries and routes: the same seed drives the same way.
    #[arg(long, default_value_t = 1, env = "FLEETBEAT_SIM_SEED")]
    pub seed: u64,

    /// MQTT keep-alive in seconds (1 ..= 65535; never 0): the broker declares a silent
    /// vehicle dead after 1.5 times this and publishes its last will.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30,
        env = "FLEETBEAT_SIM_KEEP_ALIVE"
    )]
    pub keep_alive: u64,

    /// Stop after this many seconds (fractions allowed); without it, run until Ctrl-C.
    #[arg(long, value_name = "SECS", env = "FLEETBEAT_SIM_DURATION")]
    pub duration: Option<f64>,

    /// The secrets file (`device-sim provision` writes one): each vehicle logs in with its
    /// id and password and seals with its key. Without it: open mode (no login, public keys).
    #[arg(long, value_name = "PATH", env = "FLEETBEAT_SIM_CREDENTIALS")]
    pub credentials: Option<PathBuf>,

    /// Run the vehicles' clocks this many times faster than real time (e.g. 60: a minute of
    /// driving per second); `--rate` stays per real second.
    #[arg(
        long,
        value_name = "X",
        default_value_t = 1.0,
        env = "FLEETBEAT_SIM_TIME_SCALE"
    )]
    pub time_scale: f64,

    /// Chaos: probability per second per vehicle of dropping its connection abruptly (the
    /// broker publishes its will; it reconnects).
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0.0,
        env = "FLEETBEAT_SIM_DROP_RATE"
    )]
    pub drop_rate: f64,

    /// Chaos: probability per heartbeat of publishing a malformed payload instead.
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0.0,
        env = "FLEETBEAT_SIM_GARBAGE_RATE"
    )]
    pub garbage_rate: f64,

    /// Chaos: offset each vehicle's clock by a random amount within ± this many milliseconds.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 0,
        env = "FLEETBEAT_SIM_CLOCK_SKEW"
    )]
    pub clock_skew: u64,

    /// The city centre the street grid is laid around, as `LAT,LON` in degrees.
    #[arg(
        long,
        value_name = "LAT,LON",
        default_value = "52.5200,13.4050",
        allow_hyphen_values = true,
        value_parser = parse_centre,
        env = "FLEETBEAT_SIM_CENTRE"
    )]
    pub centre: Position,
}

/// The subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum CliCommand {
    /// Generate random passwords and message keys for the vehicles into a secrets file
    /// (vehicles already in it keep theirs).
    Provision(ProvisionArgs),
}

/// `device-sim provision`.
#[derive(Debug, Clone, Args)]
pub struct ProvisionArgs {
    /// How many vehicles (the same numbering as a run with these flags).
    #[arg(long)]
    pub vehicles: u32,
    /// The fleets, comma-separated.
    #[arg(long, default_value = "demo", value_delimiter = ',')]
    pub fleet: Vec<FleetId>,
    /// The secrets file to create or extend (written with mode 0600).
    #[arg(long, value_name = "PATH", default_value = "sim-secrets.toml")]
    pub secrets: PathBuf,
}

impl ProvisionArgs {
    /// Adds secrets for every vehicle that has none to the secrets file, creating it if
    /// needed. Returns how many were added and how many the file holds now.
    ///
    /// # Errors
    /// [`ProvisionError`] if the vehicle ids are invalid or the file cannot be read or
    /// written.
    pub fn run(&self) -> Result<(usize, usize), ProvisionError> {
        let config = SimConfig {
            vehicles: self.vehicles,
            fleets: self.fleet.clone(),
            ..SimConfig::default()
        };
        config.validate()?;
        let ids = config.vehicle_ids()?;
        let mut secrets = if self.secrets.exists() {
            DeviceSecrets::load(&self.secrets)?
        } else {
            DeviceSecrets::default()
        };
        let added = secrets.provision(&ids)?;
        secrets.save(&self.secrets)?;
        Ok((added, secrets.len()))
    }
}

/// Why `device-sim provision` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The vehicles cannot be numbered.
    #[error(transparent)]
    Vehicles(#[from] SimError),
    /// The secrets file cannot be read or written.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

impl Cli {
    /// The simulator configuration these flags ask for, validated (the secrets file, if
    /// any, is read here).
    ///
    /// # Errors
    /// [`SimError`] names the first invalid setting.
    pub fn into_config(self) -> Result<SimConfig, SimError> {
        let duration = match self.duration {
            None => None,
            Some(secs) => {
                Some(Duration::try_from_secs_f64(secs).map_err(|_| SimError::Duration(secs))?)
            }
        };
        let secrets = match &self.credentials {
            None => None,
            Some(path) => Some(Arc::new(DeviceSecrets::load(path)?)),
        };
        let tls = match (self.broker.tls, self.ca_file) {
            (true, Some(ca_file)) => Some(TlsConfig {
                ca_file,
                client_cert_dir: self.client_cert_dir,
            }),
            (true, None) => return Err(TlsError::NoCaFile.into()),
            (false, None) if self.client_cert_dir.is_none() => None,
            (false, _) => return Err(TlsError::NotMqtts.into()),
        };
        let config = SimConfig {
            vehicles: self.vehicles,
            broker_host: self.broker.host,
            broker_port: self.broker.port,
            tls,
            fleets: self.fleet,
            rate_hz: self.rate_hz,
            heartbeat_qos: self.qos,
            seed: self.seed,
            keep_alive: Duration::from_secs(self.keep_alive),
            duration,
            centre: self.centre,
            time_scale: self.time_scale,
            secrets,
            chaos: Chaos {
                drop_rate: self.drop_rate,
                garbage_rate: self.garbage_rate,
                clock_skew: Duration::from_millis(self.clock_skew),
            },
            ..SimConfig::default()
        };
        config.validate()?;
        Ok(config)
    }
}

/// An MQTT broker's address: plain TCP (`mqtt://`, `tcp://` or no scheme) or TLS
/// (`mqtts://`, `ssl://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the broker speaks TLS (`mqtts://`).
    pub tls: bool,
}

/// Why a broker address does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerAddrError {
    /// A scheme other than `mqtt://`, `tcp://`, `mqtts://` or `ssl://`.
    #[error("unsupported scheme {0:?}: use mqtt://, tcp:// or (TLS) mqtts:// (no WebSocket)")]
    Scheme(String),
    /// No host.
    #[error("the broker address has no host")]
    NoHost,
    /// The port is not 1 ..= 65535.
    #[error("invalid port {0:?}")]
    Port(String),
    /// An IPv6 address without brackets, or a path after the port.
    #[error("cannot read {0:?} as host:port (IPv6 addresses go in brackets)")]
    Shape(String),
}

impl BrokerAddr {
    /// The standard MQTT port.
    const DEFAULT_PORT: u16 = 1883;
    /// The standard MQTT-over-TLS port.
    const DEFAULT_TLS_PORT: u16 = 8883;
}

impl FromStr for BrokerAddr {
    type Err = BrokerAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (tls, rest) = match s.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (false, rest),
            Some(("mqtts" | "ssl", rest)) => (true, rest),
            Some((scheme, _)) => return Err(BrokerAddrError::Scheme(scheme.to_string())),
            None => (false, s),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(BrokerAddrError::Shape(s.to_string()));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| BrokerAddrError::Shape(s.to_string()))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(BrokerAddrError::Shape(s.to_string())),
                },
            }
        } else {
            match rest.split_once(':') {
                Some((_, port)) if port.contains(':') => {
                    return Err(BrokerAddrError::Shape(s.to_string()));
                }
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(BrokerAddrError::NoHost);
        }
        let port = match port {
            None if tls => Self::DEFAULT_TLS_PORT,
            None => Self::DEFAULT_PORT,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| BrokerAddrError::Port(port.to_string()))?,
        };
        Ok(Self {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Parses `LAT,LON` in degrees into a position.
fn parse_centre(s: &str) -> Result<Position, String> {
    let (lat, lon) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?} is not LAT,LON"))?;
    let degrees = |v: &str, max: f64| {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|d| d.is_finite() && d.abs() <= max)
            .ok_or_else(|| format!("{v:?} is not a coordinate within ±{max}°"))
    };
    Ok(Position::from_degrees(
        degrees(lat, 90.0)?,
        degrees(lon, 180.0)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str, port: u16) -> BrokerAddr {
        BrokerAddr {
            host: host.into(),
            port,
            tls: false,
        }
    }

    fn tls_addr(host: &str, port: u16) -> BrokerAddr {
        BrokerAddr {
            tls: true,
            ..addr(host, port)
        }
    }

    #[test]
    fn parses_broker_addresses() {
        let ok = |s: &str| s.parse::<BrokerAddr>().expect(s);
        assert_eq!(ok("mqtt://127.0.0.1:1883"), addr("127.0.0.1", 1883));
        assert_eq!(ok("tcp://broker.local:18830/"), addr("broker.local", 18830));
        assert_eq!(ok("127.0.0.1:18830"), addr("127.0.0.1", 18830));
        assert_eq!(ok("localhost"), addr("localhost", 1883));
        assert_eq!(ok("[::1]:1884"), addr("::1", 1884));
        assert_eq!(ok("mqtt://[::1]"), addr("::1", 1883));
        assert_eq!(ok("[::1]:1884").to_string(), "mqtt://[::1]:1884");
        assert_eq!(ok("mqtts://localhost:18883"), tls_addr("localhost", 18883));
        assert_eq!(ok("mqtts://broker.local"), tls_addr("broker.local", 8883));
        assert_eq!(ok("ssl://127.0.0.1:8884/"), tls_addr("127.0.0.1", 8884));
        assert_eq!(ok("mqtts://[::1]"), tls_addr("::1", 8883));
        assert_eq!(ok("mqtts://[::1]").to_string(), "mqtts://[::1]:8883");
    }

    #[test]
    fn rejects_bad_broker_addresses() {
        let err = |s: &str| s.parse::<BrokerAddr>().expect_err(s);
        assert!(matches!(err("ws://host"), BrokerAddrError::Scheme(_)));
        assert!(matches!(err("https://host"), BrokerAddrError::Scheme(_)));
        assert_eq!(err("mqtts://"), BrokerAddrError::NoHost);
        assert!(matches!(err("mqtts://host:0"), BrokerAddrError::Port(_)));
        assert_eq!(err(":1883"), BrokerAddrError::NoHost);
        assert_eq!(err("mqtt://"), BrokerAddrError::NoHost);
        assert!(matches!(err("host:0"), BrokerAddrError::Port(_)));
        assert!(matches!(err("host:99999"), BrokerAddrError::Port(_)));
        assert!(matches!(err("host:mqtt"), BrokerAddrError::Port(_)));
        assert!(matches!(err("::1"), BrokerAddrError::Shape(_)));
        assert!(matches!(err("host:1883/path"), BrokerAddrError::Shape(_)));
    }

    #[test]
    fn parses_the_command_line() {
        let cli = Cli::try_parse_from([
            "device-sim",
            "--vehicles",
            "5",
            "--broker",
            "127.0.0.1:18830",
            "--rate",
            "0.5",
            "--duration",
            "2.5",
            "--centre",
            "-33.8688,151.2093",
        ])
        .expect("parses");
        assert_eq!(cli.centre, Position::new(-338_688_000, 1_512_093_000));
        let config = cli.into_config().expect("valid");
        assert_eq!(config.vehicles, 5);
        assert_eq!(
            (config.broker_host.as_str(), config.broker_port),
            ("127.0.0.1", 18830)
        );
        assert_eq!(config.heartbeat_interval_ms().expect("valid"), 2000);
        assert_eq!(config.duration, Some(Duration::from_millis(2500)));
        assert_eq!(config.fleets, [FleetId::new("demo").expect("valid")]);
    }

    #[test]
    fn parses_fleets_chaos_and_clock() {
        let cli = Cli::try_parse_from([
            "device-sim",
            "--fleet",
            "north,south",
            "--qos",
            "1",
            "--time-scale",
            "60",
            "--drop-rate",
            "0.01",
            "--garbage-rate",
            "0.1",
            "--clock-skew",
            "1500",
        ])
        .expect("parses");
        let config = cli.into_config().expect("valid");
        assert_eq!(config.fleets.len(), 2);
        assert_eq!(config.heartbeat_qos, 1);
        assert_eq!(config.heartbeat_interval_ms().expect("valid"), 60_000);
        assert_eq!(
            config.chaos,
            Chaos {
                drop_rate: 0.01,
                garbage_rate: 0.1,
                clock_skew: Duration::from_millis(1500),
            }
        );
    }

    #[test]
    fn provisions_a_secrets_file_the_runner_reads() {
        let dir = std::env::temp_dir().join(format!("device-sim-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let secrets = dir.join("sim-secrets.toml");
        let _ = std::fs::remove_file(&secrets);
        let secrets_arg = secrets.to_str().expect("utf-8 path");
        let cli = Cli::try_parse_from([
            "device-sim",
            "provision",
            "--vehicles",
            "3",
            "--fleet",
            "north,south",
            "--secrets",
            secrets_arg,
        ])
        .expect("parses");
        let Some(CliCommand::Provision(args)) = cli.command else {
            panic!("not the provision subcommand");
        };
        assert_eq!(args.run().expect("provisions"), (3, 3));
        assert_eq!(args.run().expect("provisions"), (0, 3), "idempotent");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&secrets)
                .expect("written")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let config = Cli::try_parse_from([
            "device-sim",
            "--vehicles",
            "3",
            "--fleet",
            "north,south",
            "--credentials",
            secrets_arg,
        ])
        .expect("parses")
        .into_config()
        .expect("every vehicle has secrets");
        assert_eq!(config.secrets.map(|s| s.len()), Some(3));
        let too_many = Cli::try_parse_from([
            "device-sim",
            "--vehicles",
            "4",
            "--fleet",
            "north,south",
            "--credentials",
            secrets_arg,
        ])
        .expect("parses");
        assert!(matches!(
            too_many.into_config(),
            Err(SimError::NoSecrets(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_needs_mqtts_and_a_ca_file() {
        let config = |args: &[&str]| {
            let mut argv = vec!["device-sim"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).expect("parses").into_config()
        };
        let no_ca = config(&["--broker", "mqtts://localhost"]).expect_err("no CA file");
        assert!(
            matches!(no_ca, SimError::Tls(TlsError::NoCaFile)),
            "{no_ca:?}"
        );
        assert!(no_ca.to_string().contains("--ca-file"), "{no_ca}");
        for plain in [
            &["--ca-file", "ca.pem"][..],
            &["--broker", "mqtt://localhost", "--client-cert-dir", "/tmp"],
        ] {
            assert!(
                matches!(config(plain), Err(SimError::Tls(TlsError::NotMqtts))),
                "{plain:?}"
            );
        }
        let missing = config(&[
            "--broker",
            "mqtts://localhost:18883",
            "--ca-file",
            "/nonexistent/ca.pem",
        ])
        .expect_err("no such file");
        assert!(
            matches!(&missing, SimError::Tls(TlsError::ReadCa { path, .. }) if path.ends_with("ca.pem")),
            "{missing:?}"
        );
    }

    #[test]
    fn defaults_match_the_docs() {
        let config = Cli::try_parse_from(["device-sim"])
            .expect("parses")
            .into_config()
            .expect("valid");
        assert_eq!(config, SimConfig::default());
    }

    #[test]
    fn rejects_bad_flags() {
        for args in [
            &["device-sim", "--fleet", "a/b"][..],
            &["device-sim", "--centre", "91,0"],
            &["device-sim", "--centre", "52.5"],
            &["device-sim", "--broker", "wss://x"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        for args in [
            &["device-sim", "--rate", "0"][..],
            &["device-sim", "--vehicles", "0"],
            &["device-sim", "--duration=-1"],
            &["device-sim", "--qos", "2"],
            &["device-sim", "--time-scale", "0"],
            &["device-sim", "--drop-rate", "2"],
            &["device-sim", "--credentials", "/nonexistent/secrets.toml"],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert!(cli.into_config().is_err(), "{args:?}");
        }
    }
}
