//! The `device-sim` command line, and how it becomes a [`SimConfig`].
//!
//! Every flag can also come from a `FLEETBEAT_SIM_*` environment variable; a flag on the
//! command line wins.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use shared::{FleetId, Position};

use crate::runner::{SimConfig, SimError};

/// Simulated delivery vehicles: each one its own MQTT connection, driving a street grid and
/// publishing GPS heartbeats.
#[derive(Debug, Clone, Parser)]
#[command(name = "device-sim", version, about, long_about = None)]
pub struct Cli {
    /// How many vehicles to simulate.
    #[arg(long, default_value_t = 100, env = "FLEETBEAT_SIM_VEHICLES")]
    pub vehicles: u32,

    /// The MQTT broker: `mqtt://host:port`, `tcp://host:port`, `host:port` or `host`
    /// (port 1883). IPv6 addresses go in brackets: `[::1]:1883`.
    #[arg(
        long,
        default_value = "mqtt://127.0.0.1:1883",
        env = "FLEETBEAT_SIM_BROKER"
    )]
    pub broker: BrokerAddr,

    /// The fleet name; vehicles are `{fleet}-0001`, `{fleet}-0002`, ...
    #[arg(long, default_value = "demo", env = "FLEETBEAT_SIM_FLEET")]
    pub fleet: FleetId,

    /// Heartbeats per second per vehicle; fractions allowed (0.2 = every 5 s), at most 10.
    #[arg(
        long = "rate",
        value_name = "HZ",
        default_value_t = 1.0,
        env = "FLEETBEAT_SIM_RATE"
    )]
    pub rate_hz: f64,

    /// Seed for starts, batteries and routes: the same seed drives the same way.
    #[arg(long, default_value_t = 1, env = "FLEETBEAT_SIM_SEED")]
    pub seed: u64,

    /// Stop after this many seconds (fractions allowed); without it, run until Ctrl-C.
    #[arg(long, value_name = "SECS", env = "FLEETBEAT_SIM_DURATION")]
    pub duration: Option<f64>,

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

impl Cli {
    /// The simulator configuration these flags ask for, validated.
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
        let config = SimConfig {
            vehicles: self.vehicles,
            broker_host: self.broker.host,
            broker_port: self.broker.port,
            fleet: self.fleet,
            rate_hz: self.rate_hz,
            seed: self.seed,
            duration,
            centre: self.centre,
            ..SimConfig::default()
        };
        config.validate()?;
        Ok(config)
    }
}

/// An MQTT broker's address (plain TCP: this build has no TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Why a broker address does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerAddrError {
    /// A scheme other than `mqtt://` or `tcp://`.
    #[error("unsupported scheme {0:?}: use mqtt:// or tcp:// (no TLS or WebSocket in this build)")]
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
    pub const DEFAULT_PORT: u16 = 1883;
}

impl FromStr for BrokerAddr {
    type Err = BrokerAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let rest = match s.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some((scheme, _)) => return Err(BrokerAddrError::Scheme(scheme.to_string())),
            None => s,
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
        })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtt://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtt://{}:{}", self.host, self.port)
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
    let (lat, lon) = (degrees(lat, 90.0)?, degrees(lon, 180.0)?);
    // Within ±1.8e9 after the bounds check: the casts are exact enough and cannot overflow.
    Ok(Position::new(
        (lat * 1e7).round() as i32,
        (lon * 1e7).round() as i32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str, port: u16) -> BrokerAddr {
        BrokerAddr {
            host: host.into(),
            port,
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
    }

    #[test]
    fn rejects_bad_broker_addresses() {
        let err = |s: &str| s.parse::<BrokerAddr>().expect_err(s);
        assert!(matches!(
            err("mqtts://host:8883"),
            BrokerAddrError::Scheme(_)
        ));
        assert!(matches!(err("ws://host"), BrokerAddrError::Scheme(_)));
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
        assert_eq!(config.fleet.as_str(), "demo");
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
            &["device-sim", "--broker", "mqtts://x"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        for args in [
            &["device-sim", "--rate", "0"][..],
            &["device-sim", "--vehicles", "0"],
            &["device-sim", "--duration=-1"],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert!(cli.into_config().is_err(), "{args:?}");
        }
    }
}
