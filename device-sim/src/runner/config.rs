//! What to simulate and where to connect: [`SimConfig`], checked once by
//! [`SimConfig::validate`], and the devices it describes.

use std::sync::Arc;
use std::time::Duration;

use shared::{CodecError, FleetId, IdError, Position, VehicleId};

use crate::device::{Device, DeviceConfig, MAX_HEARTBEAT_INTERVAL_MS, MIN_HEARTBEAT_INTERVAL_MS};
use crate::route::{GridConfig, GridError, StreetGrid};
use crate::secrets::{DeviceSecrets, SecretsError};

use super::tls::{FleetTls, TlsConfig, TlsError};

/// The most vehicles one simulator runs.
const MAX_VEHICLES: u32 = 10_000;
/// The fastest heartbeat rate per vehicle, in real time.
const MAX_RATE_HZ: f64 = 10.0;
/// The largest time scale.
const MAX_TIME_SCALE: f64 = 1000.0;

/// Switches that make vehicles misbehave, to test the rest of the system.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Chaos {
    /// Probability per second per vehicle of dropping its connection abruptly (the will
    /// fires; it reconnects after the usual backoff), 0 ..= 1.
    pub drop_rate: f64,
    /// Probability per heartbeat of publishing a malformed payload instead, 0 ..= 1.
    pub garbage_rate: f64,
    /// Each vehicle's clock is off by a random amount within ± this.
    pub clock_skew: Duration,
}

/// What to simulate and where to connect.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// How many vehicles, 1 ..= 10 000.
    pub vehicles: u32,
    /// The MQTT broker's host name or IP address.
    pub broker_host: String,
    /// The MQTT broker's TCP port.
    pub broker_port: u16,
    /// TLS to the broker (`mqtts://`): the CA file and, for mutual TLS, the vehicles'
    /// certificates. `None`: plain TCP.
    pub tls: Option<TlsConfig>,
    /// The fleets; vehicles are dealt to them in turn and numbered within each:
    /// `{fleet}-{index:04}` from 1 (see [`SimConfig::vehicle`]).
    pub fleets: Vec<FleetId>,
    /// Heartbeats per (real) second per vehicle, fractions allowed, at most
    /// 10; the device interval it gives (scaled by the time scale) must lie
    /// within 100 ms ..= 1 h.
    pub rate_hz: f64,
    /// The MQTT QoS of heartbeats, 0 or 1.
    pub heartbeat_qos: u8,
    /// Seeds every vehicle's start, battery and drive: same seed, same fleet movements.
    pub seed: u64,
    /// Stop by itself after this long ([`run`](super::run) only); `None` runs until shut down.
    pub duration: Option<Duration>,
    /// The city centre the street grid is laid around.
    pub centre: Position,
    /// How much faster than real time the vehicles live, 0 < x ..= 1000.
    pub time_scale: f64,
    /// Per-vehicle MQTT passwords and message keys; `None` is open mode (no login, keys from
    /// [`shared::open_mode_key`]).
    pub secrets: Option<Arc<DeviceSecrets>>,
    /// Misbehaviour on purpose.
    pub chaos: Chaos,
    /// MQTT keep-alive, 1 ..= 65 535 s (never 0: the broker must notice a dead vehicle).
    pub keep_alive: Duration,
    /// Vehicles connect one after another over this window instead of all at once.
    pub connect_spread: Duration,
    /// The longest wait between two reconnect attempts.
    pub reconnect_max: Duration,
    /// How often a progress line is logged (without a status line).
    pub progress_every: Duration,
}

impl Default for SimConfig {
    /// 100 vehicles of fleet `demo` in Berlin at 1 Hz, in open mode, against
    /// `127.0.0.1:1883`.
    fn default() -> Self {
        Self {
            vehicles: 100,
            broker_host: "127.0.0.1".into(),
            broker_port: 1883,
            tls: None,
            fleets: vec![FleetId::new("demo").unwrap_or_else(|_| unreachable!("`demo` is valid"))],
            rate_hz: 1.0,
            heartbeat_qos: 0,
            seed: 1,
            duration: None,
            centre: GridConfig::BERLIN,
            time_scale: 1.0,
            secrets: None,
            chaos: Chaos::default(),
            keep_alive: Duration::from_secs(30),
            connect_spread: Duration::from_secs(2),
            reconnect_max: Duration::from_secs(5),
            progress_every: Duration::from_secs(5),
        }
    }
}

impl SimConfig {
    /// The device's heartbeat interval in (simulation) milliseconds: the real-time interval
    /// the rate gives, times the time scale.
    ///
    /// # Errors
    /// [`SimError::Rate`] if the rate is not finite, positive and at most 10 Hz, or
    /// the interval falls outside 100 ms ..= 1 h; [`SimError::TimeScale`] for a bad scale.
    pub(crate) fn heartbeat_interval_ms(&self) -> Result<u32, SimError> {
        if !(self.time_scale.is_finite()
            && self.time_scale > 0.0
            && self.time_scale <= MAX_TIME_SCALE)
        {
            return Err(SimError::TimeScale(self.time_scale));
        }
        if !(self.rate_hz.is_finite() && self.rate_hz > 0.0 && self.rate_hz <= MAX_RATE_HZ) {
            return Err(SimError::Rate(self.rate_hz));
        }
        let interval = (1000.0 * self.time_scale / self.rate_hz).round();
        let valid = f64::from(MIN_HEARTBEAT_INTERVAL_MS)..=f64::from(MAX_HEARTBEAT_INTERVAL_MS);
        if !valid.contains(&interval) {
            return Err(SimError::Rate(self.rate_hz));
        }
        // Within 100 ..= 3_600_000: the cast is exact.
        Ok(interval as u32)
    }

    /// The fleet and id of the `slot`-th vehicle (from 0): fleets are dealt in turn, and
    /// vehicles are numbered from 1 within their fleet: `{fleet}-{index:04}`.
    ///
    /// # Errors
    /// [`SimError::NoFleet`] without fleets; [`SimError::VehicleId`] if the id does not fit
    /// a [`VehicleId`] (the fleet name is too long).
    pub fn vehicle(&self, slot: u32) -> Result<(FleetId, VehicleId), SimError> {
        let fleets = u32::try_from(self.fleets.len()).unwrap_or(u32::MAX);
        let fleet = self
            .fleets
            .get((slot % fleets.max(1)) as usize)
            .ok_or(SimError::NoFleet)?;
        let id = format!("{fleet}-{:04}", slot / fleets + 1);
        let vehicle = VehicleId::new(&id).map_err(|source| SimError::VehicleId { id, source })?;
        Ok((fleet.clone(), vehicle))
    }

    /// Every vehicle's id, in slot order.
    ///
    /// # Errors
    /// See [`vehicle`](Self::vehicle).
    pub(crate) fn vehicle_ids(&self) -> Result<Vec<VehicleId>, SimError> {
        (0..self.vehicles)
            .map(|slot| self.vehicle(slot).map(|(_, id)| id))
            .collect()
    }

    /// Checks every setting, and builds the street grid.
    ///
    /// # Errors
    /// [`SimError`] names the first invalid setting.
    pub fn validate(&self) -> Result<StreetGrid, SimError> {
        if !(1..=MAX_VEHICLES).contains(&self.vehicles) {
            return Err(SimError::Vehicles(self.vehicles));
        }
        if self.broker_host.is_empty() {
            return Err(SimError::BrokerHost);
        }
        if self.fleets.is_empty() {
            return Err(SimError::NoFleet);
        }
        self.fleet_tls()?;
        self.heartbeat_interval_ms()?;
        if self.heartbeat_qos > 1 {
            return Err(SimError::Qos(self.heartbeat_qos));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(65_535)).contains(&self.keep_alive)
            || self.keep_alive.subsec_nanos() != 0
        {
            return Err(SimError::KeepAlive(self.keep_alive));
        }
        for (name, p) in [
            ("drop rate", self.chaos.drop_rate),
            ("garbage rate", self.chaos.garbage_rate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(SimError::Probability { name, value: p });
            }
        }
        // The longest ids are the last ones of each fleet.
        let last = self.vehicles.saturating_sub(1);
        for slot in last.saturating_sub(self.fleets.len() as u32)..=last {
            self.vehicle(slot)?;
        }
        if let Some(secrets) = &self.secrets {
            for slot in 0..self.vehicles {
                let (_, id) = self.vehicle(slot)?;
                if secrets.get(&id).is_none() {
                    return Err(SimError::NoSecrets(id));
                }
            }
        }
        Ok(StreetGrid::new(GridConfig {
            centre: self.centre,
            ..GridConfig::default()
        })?)
    }

    /// The TLS side of the run (the CA file read, the broker host checked); `None` over
    /// plain TCP.
    ///
    /// # Errors
    /// [`SimError::Tls`] names the file or setting that is wrong.
    pub(super) fn fleet_tls(&self) -> Result<Option<FleetTls>, SimError> {
        match &self.tls {
            None => Ok(None),
            Some(tls) => Ok(Some(FleetTls::new(tls, &self.broker_host)?)),
        }
    }

    /// The devices this configuration simulates, in slot order, exactly as
    /// [`Simulation::start`](super::Simulation::start) builds them (without scheduling their
    /// first heartbeat): the same seed gives the same devices, and so the same drives.
    ///
    /// # Errors
    /// [`SimError`] for an invalid configuration.
    pub fn devices(&self) -> Result<Vec<Device>, SimError> {
        let grid = self.validate()?;
        let interval_ms = self.heartbeat_interval_ms()?;
        // Different seeds start the fleet at different (but still spread-out) intersections.
        let slot_offset = (self.seed % u64::from(grid.node_count())) as u32;
        (0..self.vehicles)
            .map(|slot| {
                let (fleet, id) = self.vehicle(slot)?;
                let mut config = DeviceConfig::new(id.clone(), fleet, grid);
                config.start = Some(grid.spread_node(slot + slot_offset));
                config.heartbeat_interval_ms = interval_ms;
                config.heartbeat_qos = self.heartbeat_qos;
                if let Some(secret) = self.secrets.as_ref().and_then(|s| s.get(&id)) {
                    config.key = secret.key;
                }
                Ok(Device::new(config, vehicle_seed(self.seed, slot + 1)))
            })
            .collect()
    }
}

/// Why the simulator cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The number of vehicles is outside 1 ..= 10 000.
    #[error("the number of vehicles must be 1 ..= {MAX_VEHICLES}, not {0}")]
    Vehicles(u32),
    /// The broker host is empty.
    #[error("the broker host is empty")]
    BrokerHost,
    /// No fleet was given.
    #[error("at least one fleet is needed")]
    NoFleet,
    /// The heartbeat rate is not positive, above 10 Hz, or gives a device interval
    /// outside 100 ms ..= 1 h at this time scale.
    #[error(
        "heartbeat rate {0} Hz is outside 0 < rate <= 10 Hz, or gives a device interval outside 100 ms ..= 1 h at this time scale"
    )]
    Rate(f64),
    /// The time scale is not within 0 < x ..= 1000.
    #[error("time scale {0} is outside 0 < x <= {MAX_TIME_SCALE}")]
    TimeScale(f64),
    /// The heartbeat QoS is not 0 or 1.
    #[error("heartbeat QoS must be 0 or 1, not {0}")]
    Qos(u8),
    /// A chaos probability is outside 0 ..= 1.
    #[error("the {name} {value} is not a probability (0 ..= 1)")]
    Probability {
        /// Which switch.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// The run duration is negative or not a number of seconds.
    #[error("duration {0} s is not a non-negative number of seconds")]
    Duration(f64),
    /// The keep-alive is not a whole number of seconds in 1 ..= 65 535.
    #[error("keep-alive {0:?} is not a whole number of seconds in 1 ..= 65535")]
    KeepAlive(Duration),
    /// A vehicle id would be invalid.
    #[error("vehicle id {id:?} is invalid (is the fleet name too long?)")]
    VehicleId {
        /// The id that was built.
        id: String,
        /// What is wrong with it.
        source: IdError,
    },
    /// The TLS settings cannot be used: no CA file for `mqtts://`, a CA or client
    /// certificate file that cannot be read, a broker host a certificate cannot name.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The secrets file cannot be read.
    #[error("cannot use the secrets file")]
    Secrets(#[from] SecretsError),
    /// The secrets file has no entry for a simulated vehicle.
    #[error("the secrets file has no entry for {0} (run `device-sim provision` for it)")]
    NoSecrets(VehicleId),
    /// The street grid around the centre cannot be built.
    #[error("invalid street grid")]
    Grid(#[from] GridError),
    /// A status message could not be encoded (a bug: every message fits).
    #[error("cannot encode a status message")]
    Codec(#[from] CodecError),
    /// [`Simulation::start`](super::Simulation::start) was called outside a Tokio runtime.
    #[error("the simulator must be started inside a Tokio runtime")]
    NoRuntime,
    /// [`Simulation::stop_vehicle`](super::Simulation::stop_vehicle) was given an id this
    /// simulation does not run.
    #[error("no vehicle {0} in this simulation")]
    UnknownVehicle(VehicleId),
}

/// A distinct, well-mixed seed for each vehicle (the SplitMix64 finaliser).
pub(super) fn vehicle_seed(seed: u64, index: u32) -> u64 {
    let mut z = seed ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fleets of `names`, in order.
    fn fleets(names: &[&str]) -> Vec<FleetId> {
        names
            .iter()
            .map(|name| FleetId::new(name).expect("valid"))
            .collect()
    }

    #[test]
    fn vehicle_ids_are_fleet_dash_index() {
        let config = SimConfig::default();
        assert_eq!(config.vehicle(0).expect("valid").1.as_str(), "demo-0001");
        assert_eq!(
            config.vehicle(9_999).expect("valid").1.as_str(),
            "demo-10000"
        );
        let long = SimConfig {
            fleets: fleets(&["a-very-long-fleet-name-x"]),
            ..SimConfig::default()
        };
        assert!(matches!(long.validate(), Err(SimError::VehicleId { .. })));
    }

    #[test]
    fn fleets_are_dealt_in_turn() {
        let config = SimConfig {
            vehicles: 5,
            fleets: fleets(&["north", "south"]),
            ..SimConfig::default()
        };
        let ids: Vec<String> = config
            .vehicle_ids()
            .expect("valid")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            ids,
            [
                "north-0001",
                "south-0001",
                "north-0002",
                "south-0002",
                "north-0003"
            ]
        );
        let devices = config.devices().expect("valid");
        assert_eq!(devices[1].fleet().as_str(), "south");
    }

    #[test]
    fn same_seed_same_devices() {
        let positions = |seed| {
            let config = SimConfig {
                vehicles: 4,
                seed,
                ..SimConfig::default()
            };
            config
                .devices()
                .expect("valid")
                .into_iter()
                .map(|mut d| {
                    (0..60)
                        .filter_map(|s| d.tick(1_000_000 + s * 1000).map(|h| h.pos))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(positions(3), positions(3));
        assert_ne!(positions(3), positions(4));
    }

    #[test]
    fn secrets_must_cover_every_vehicle() {
        let mut secrets = DeviceSecrets::default();
        let config = SimConfig {
            vehicles: 2,
            ..SimConfig::default()
        };
        let ids = config.vehicle_ids().expect("valid");
        secrets.provision(&ids[..1]).expect("random");
        let missing = SimConfig {
            secrets: Some(Arc::new(secrets.clone())),
            ..config.clone()
        };
        assert!(matches!(missing.validate(), Err(SimError::NoSecrets(id)) if id == ids[1]));
        secrets.provision(&ids).expect("random");
        let key = secrets.get(&ids[1]).expect("provisioned").key;
        let full = SimConfig {
            secrets: Some(Arc::new(secrets)),
            ..config
        };
        let mut devices = full.devices().expect("valid");
        devices[1].tick(1_000_000);
        let item = devices[1]
            .next_publication(1_000_000)
            .expect("fits")
            .expect("queued");
        let p = item.publication;
        assert!(shared::open::<shared::Heartbeat>(&p.payload, p.topic.as_str(), &key).is_ok());
    }

    #[test]
    fn validates_the_config() {
        assert!(SimConfig::default().validate().is_ok());
        let with = |f: fn(&mut SimConfig)| {
            let mut config = SimConfig::default();
            f(&mut config);
            config.validate()
        };
        assert!(matches!(
            with(|c| c.vehicles = 0),
            Err(SimError::Vehicles(0))
        ));
        assert!(matches!(with(|c| c.rate_hz = 0.0), Err(SimError::Rate(_))));
        assert!(matches!(
            with(|c| c.heartbeat_qos = 2),
            Err(SimError::Qos(2))
        ));
        assert!(matches!(with(|c| c.fleets.clear()), Err(SimError::NoFleet)));
        assert!(matches!(
            with(|c| c.chaos.drop_rate = 1.5),
            Err(SimError::Probability { .. })
        ));
        assert!(matches!(with(|c| c.rate_hz = 11.0), Err(SimError::Rate(_))));
        assert!(matches!(
            with(|c| c.rate_hz = f64::NAN),
            Err(SimError::Rate(_))
        ));
        assert!(matches!(
            with(|c| c.keep_alive = Duration::ZERO),
            Err(SimError::KeepAlive(_))
        ));
        assert!(matches!(
            with(|c| c.keep_alive = Duration::from_millis(1500)),
            Err(SimError::KeepAlive(_))
        ));
        assert!(matches!(
            with(|c| c.centre = Position::new(890_000_000, 0)),
            Err(SimError::Grid(GridError::Centre))
        ));
        assert!(matches!(
            with(|c| c.broker_host.clear()),
            Err(SimError::BrokerHost)
        ));
        let slow = SimConfig {
            rate_hz: 0.25,
            ..SimConfig::default()
        };
        assert_eq!(slow.heartbeat_interval_ms().expect("valid"), 4000);
    }

    #[test]
    fn vehicle_seeds_differ() {
        let seeds: std::collections::HashSet<u64> =
            (1..=1000).map(|i| vehicle_seed(1, i)).collect();
        assert_eq!(seeds.len(), 1000);
        assert_ne!(vehicle_seed(1, 1), vehicle_seed(2, 1));
    }
}
