//! The simulator: one tokio task, one [`Device`] and one MQTT connection per vehicle.
//!
//! Each vehicle task owns everything of its vehicle: the device, the socket ([`Link`]) and
//! the MQTT [`Session`] (this crate's small client, see [`crate::mqtt`]), and is a small
//! super-loop over the socket, the heartbeat interval, one timer (keep-alive, timeouts,
//! chaos) and its stop signals. Nothing it does waits on anything but that loop.
//!
//! - Connect (clean session, keep-alive [`SimConfig::keep_alive`], username and password from
//!   the [`Credentials`] if given, `TCP_NODELAY`), staggered over
//!   [`SimConfig::connect_spread`]. Right before each CONNECT the device seals a fresh
//!   `Online` (counter `c`) and last will `Offline(ConnectionLost)` (counter `c + 1`), and
//!   the will goes into that CONNECT.
//! - On every CONNACK: publish `Online` (retained, QoS 1) and subscribe to `.../cmd` at QoS 1;
//!   a clean session forgets subscriptions, so this is redone after every reconnect. Then the
//!   device's [`Outbox`](crate::outbox::Outbox) is flushed: buffered delivery events first,
//!   then the buffered heartbeats, oldest first, [`FLUSH_WINDOW`] publishes at a time, each
//!   batch once the previous one is written to the socket.
//! - Heartbeats on `.../hb` at [`SimConfig::heartbeat_qos`], from a per-vehicle interval
//!   whose phases are spread evenly over the interval; the [`Device`] decides what is due and
//!   queues it, online or not.
//! - Delivery events on `.../event` at QoS 1 leave the device's queue only on their PUBACK:
//!   each is published with its `seq` as the session's tag, and the PUBACK of its packet id
//!   gives the `seq` back. When the connection drops, the events in flight are sent again
//!   after the reconnect, with DUP set (a clean session has nothing to resume).
//! - Commands from `.../cmd` are acknowledged (PUBACK), decoded (plain, not sealed; a bad
//!   payload is logged and counted) and answered on `.../ack` at QoS 1.
//! - Everything published is sealed with the vehicle's key ([`Device::publication`]).
//! - A lost connection (socket error, closed by the broker, no PINGRESP, an oversized or
//!   malformed packet) is retried with jittered exponential backoff up to
//!   [`SimConfig::reconnect_max`].
//! - On stop: `Offline(Shutdown)` retained, then an MQTT DISCONNECT, so the broker drops the
//!   will; the vehicle then closes its side and waits (at most 3 s) for the broker's close.
//!   An abrupt stop ([`StopMode::Abrupt`]) just drops the socket and the will fires.
//! - Chaos ([`Chaos`]): random abrupt disconnects, malformed heartbeat payloads, skewed
//!   clocks.
//!
//! # Clocks
//! Each vehicle has two clocks, both offset by its clock skew: the *simulation* clock, which
//! runs [`SimConfig::time_scale`] times faster than real time and drives the device (its
//! heartbeats' and events' `ts_ms`), and the real-time clock its seal counters are read
//! from. [`SimConfig::rate_hz`] is in real time: at `--time-scale 60 --rate 1` a vehicle
//! publishes once a (real) second, reporting a minute of driving each time.

use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::mqttbytes::QoS;
use shared::{CodecError, Command, FleetId, IdError, OfflineReason, Position, VehicleId};
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at, sleep, sleep_until};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::credentials::Credentials;
use crate::device::{
    Device, DeviceConfig, MAX_HEARTBEAT_INTERVAL_MS, MIN_HEARTBEAT_INTERVAL_MS, Publication,
};
use crate::mqtt::{
    ConnectRequest, Incoming, Link, LinkError, MAX_INFLIGHT, Message, SendError, Session,
    SessionOptions,
};
use crate::route::{GridConfig, GridError, StreetGrid};
use crate::status::StatusLine;

/// The most vehicles one simulator runs.
pub const MAX_VEHICLES: u32 = 10_000;
/// The fastest heartbeat rate per vehicle, in real time.
pub const MAX_RATE_HZ: f64 = 10.0;
/// The largest time scale.
pub const MAX_TIME_SCALE: f64 = 1000.0;
/// A vehicle hands at most this many publishes to its connection at once, and the next batch
/// only once they are written to the socket.
pub const FLUSH_WINDOW: usize = 16;
/// The first reconnect attempt waits about this long; each further one doubles it.
const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// How long a vehicle may take to say goodbye (publish offline, disconnect) on stop.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the TCP connection to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// How many vehicles, 1 ..= [`MAX_VEHICLES`].
    pub vehicles: u32,
    /// The MQTT broker's host name or IP address.
    pub broker_host: String,
    /// The MQTT broker's TCP port.
    pub broker_port: u16,
    /// The fleets; vehicles are dealt to them in turn and numbered within each:
    /// `{fleet}-{index:04}` from 1 (see [`SimConfig::vehicle_ids`]).
    pub fleets: Vec<FleetId>,
    /// Heartbeats per (real) second per vehicle, fractions allowed, at most
    /// [`MAX_RATE_HZ`]; the device interval it gives (scaled by the time scale) must lie
    /// within 100 ms ..= 1 h.
    pub rate_hz: f64,
    /// The MQTT QoS of heartbeats, 0 or 1.
    pub heartbeat_qos: u8,
    /// Seeds every vehicle's start, battery and drive: same seed, same fleet movements.
    pub seed: u64,
    /// Stop by itself after this long ([`run`] only); `None` runs until shut down.
    pub duration: Option<Duration>,
    /// The city centre the street grid is laid around.
    pub centre: Position,
    /// How much faster than real time the vehicles live, 0 < x ..= [`MAX_TIME_SCALE`].
    pub time_scale: f64,
    /// Per-vehicle MQTT passwords and message keys; `None` is open mode (no login, keys from
    /// [`shared::open_mode_key`]).
    pub credentials: Option<Arc<Credentials>>,
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
            fleets: vec![FleetId::new("demo").unwrap_or_else(|_| unreachable!("`demo` is valid"))],
            rate_hz: 1.0,
            heartbeat_qos: 0,
            seed: 1,
            duration: None,
            centre: GridConfig::BERLIN,
            time_scale: 1.0,
            credentials: None,
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
    /// [`SimError::Rate`] if the rate is not finite, positive and at most [`MAX_RATE_HZ`], or
    /// the interval falls outside 100 ms ..= 1 h; [`SimError::TimeScale`] for a bad scale.
    pub fn heartbeat_interval_ms(&self) -> Result<u32, SimError> {
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
    pub fn vehicle_ids(&self) -> Result<Vec<VehicleId>, SimError> {
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
        if let Some(credentials) = &self.credentials {
            for slot in 0..self.vehicles {
                let (_, id) = self.vehicle(slot)?;
                if credentials.get(&id).is_none() {
                    return Err(SimError::NoCredentials(id));
                }
            }
        }
        Ok(StreetGrid::new(GridConfig {
            centre: self.centre,
            ..GridConfig::default()
        })?)
    }

    /// The devices this configuration simulates, in slot order, exactly as
    /// [`Simulation::start`] builds them (without scheduling their first heartbeat): the
    /// same seed gives the same devices, and so the same drives.
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
                if let Some(secret) = self.credentials.as_ref().and_then(|c| c.get(&id)) {
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
    /// The number of vehicles is outside 1 ..= [`MAX_VEHICLES`].
    #[error("the number of vehicles must be 1 ..= {MAX_VEHICLES}, not {0}")]
    Vehicles(u32),
    /// The broker host is empty.
    #[error("the broker host is empty")]
    BrokerHost,
    /// No fleet was given.
    #[error("at least one fleet is needed")]
    NoFleet,
    /// The heartbeat rate is not positive, above [`MAX_RATE_HZ`], or gives a device interval
    /// outside 100 ms ..= 1 h at this time scale.
    #[error(
        "heartbeat rate {0} Hz is outside 0 < rate <= 10 Hz, or gives a device interval outside 100 ms ..= 1 h at this time scale"
    )]
    Rate(f64),
    /// The time scale is not within 0 < x ..= [`MAX_TIME_SCALE`].
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
    /// The secrets file cannot be read.
    #[error("cannot use the secrets file")]
    Credentials(#[from] crate::credentials::CredentialsError),
    /// The credentials have no entry for a simulated vehicle.
    #[error("the secrets file has no entry for {0} (run `device-sim provision` for it)")]
    NoCredentials(VehicleId),
    /// The street grid around the centre cannot be built.
    #[error("invalid street grid")]
    Grid(#[from] GridError),
    /// A status message could not be encoded (a bug: every message fits).
    #[error("cannot encode a status message")]
    Codec(#[from] CodecError),
    /// [`Simulation::start`] was called outside a Tokio runtime.
    #[error("the simulator must be started inside a Tokio runtime")]
    NoRuntime,
    /// [`Simulation::stop_vehicle`] was given an id this simulation does not run.
    #[error("no vehicle {0} in this simulation")]
    UnknownVehicle(VehicleId),
}

/// What a simulation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimReport {
    /// Vehicles simulated.
    pub vehicles: u32,
    /// Vehicles connected to the broker at the time of the report.
    pub connected: u64,
    /// Heartbeats written to the broker connection.
    pub heartbeats_sent: u64,
    /// Heartbeats lost: pushed out of a full offline backlog, or not queued because the
    /// connection was backed up.
    pub heartbeats_dropped: u64,
    /// Delivery event publishes written to the broker connection (re-sends included).
    pub events_sent: u64,
    /// Delivery events acknowledged by the broker (each counted once).
    pub events_acked: u64,
    /// Malformed payloads published on purpose ([`Chaos::garbage_rate`]).
    pub garbage_sent: u64,
    /// Connections dropped on purpose ([`Chaos::drop_rate`]).
    pub chaos_drops: u64,
    /// Commands answered with an ack.
    pub commands_answered: u64,
    /// Payloads on a `cmd` topic that did not decode as a command.
    pub bad_commands: u64,
    /// Successful reconnections after a lost connection.
    pub reconnects: u64,
    /// Connection failures, failed publishes and refused subscriptions.
    pub errors: u64,
    /// Connections ended because the broker sent a packet larger than a vehicle accepts
    /// ([`crate::mqtt::SessionOptions::max_packet`]); also counted in `errors`.
    pub oversized_packets: u64,
    /// Time since the simulation started.
    pub elapsed: Duration,
}

/// Live counters shared by the vehicle tasks.
#[derive(Debug, Default)]
struct Counters {
    connected: AtomicU64,
    heartbeats_sent: AtomicU64,
    heartbeats_dropped: AtomicU64,
    events_sent: AtomicU64,
    events_acked: AtomicU64,
    garbage_sent: AtomicU64,
    chaos_drops: AtomicU64,
    commands_answered: AtomicU64,
    bad_commands: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
    oversized_packets: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self, vehicles: u32, started: Instant) -> SimReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SimReport {
            vehicles,
            connected: get(&self.connected),
            heartbeats_sent: get(&self.heartbeats_sent),
            heartbeats_dropped: get(&self.heartbeats_dropped),
            events_sent: get(&self.events_sent),
            events_acked: get(&self.events_acked),
            garbage_sent: get(&self.garbage_sent),
            chaos_drops: get(&self.chaos_drops),
            commands_answered: get(&self.commands_answered),
            bad_commands: get(&self.bad_commands),
            reconnects: get(&self.reconnects),
            errors: get(&self.errors),
            oversized_packets: get(&self.oversized_packets),
            elapsed: started.elapsed(),
        }
    }
}

/// How [`Simulation::stop_vehicle`] stops a vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Publish `Offline(Shutdown)` and disconnect: the broker drops the last will.
    Clean,
    /// Drop the TCP connection without a word: the broker publishes the last will,
    /// `Offline(ConnectionLost)`, as when a tracker loses power.
    Abrupt,
}

/// The handles that stop one vehicle and tell when it has stopped.
#[derive(Debug, Clone)]
struct VehicleControl {
    /// Clean stop; a child of the simulation's shutdown token.
    stop: CancellationToken,
    /// Abrupt stop.
    abort: CancellationToken,
    /// Cancelled when the vehicle task has ended.
    done: CancellationToken,
}

/// A running simulation: start it, stop single vehicles, shut it down.
#[derive(Debug)]
pub struct Simulation {
    vehicles: Vec<VehicleId>,
    controls: HashMap<VehicleId, VehicleControl>,
    counters: Arc<Counters>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    started: Instant,
    status: StatusLine,
}

impl Simulation {
    /// Validates `config` and spawns every vehicle and the progress logger on the current
    /// Tokio runtime, logging progress lines. [`SimConfig::duration`] is not enforced here
    /// (see [`run`]).
    ///
    /// # Errors
    /// [`SimError`] for an invalid configuration, or [`SimError::NoRuntime`].
    pub fn start(config: SimConfig) -> Result<Self, SimError> {
        Self::start_with_status(config, StatusLine::none())
    }

    /// [`start`](Self::start), showing progress on `status` if it is shown (else as log
    /// lines).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_with_status(config: SimConfig, status: StatusLine) -> Result<Self, SimError> {
        let devices = config.devices()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SimError::NoRuntime)?;
        let interval_ms = config.heartbeat_interval_ms()?;
        let counters = Arc::new(Counters::default());
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let n = config.vehicles;
        let mut vehicles = Vec::with_capacity(n as usize);
        let mut controls = HashMap::with_capacity(n as usize);
        let started = Instant::now();
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let skew_ms = i64::try_from(config.chaos.clock_skew.as_millis()).unwrap_or(i64::MAX);
        let broker = Arc::new(Broker {
            host: config.broker_host.clone(),
            port: config.broker_port,
            credentials: config.credentials.clone(),
        });

        for (slot, mut device) in (0u32..).zip(devices) {
            let id = device.vehicle().clone();
            let seed = vehicle_seed(config.seed, slot + 1);
            let mut rng = fastrand::Rng::with_seed(seed ^ 0xB0FF);
            let clock = SimClock {
                epoch_ms,
                start: started,
                scale: config.time_scale,
                skew_ms: if skew_ms > 0 {
                    rng.i64(-skew_ms..=skew_ms)
                } else {
                    0
                },
            };
            // Phases spread evenly over one interval, so heartbeats do not come in bursts.
            let phase_ms = u64::from(interval_ms) * u64::from(slot) / u64::from(n);
            device.schedule_heartbeat(clock.now_ms() + phase_ms);
            let connect_delay = config
                .connect_spread
                .mul_f64(f64::from(slot) / f64::from(n));

            let control = VehicleControl {
                stop: shutdown.child_token(),
                abort: CancellationToken::new(),
                done: CancellationToken::new(),
            };
            let vehicle = Vehicle {
                command_topic: device.topic(shared::TopicKind::Command).name().to_string(),
                device,
                session: Session::new(SessionOptions::new(config.keep_alive)),
                broker: Arc::clone(&broker),
                clock,
                counters: Arc::clone(&counters),
                rng,
                chaos: config.chaos,
                reconnect_max: config.reconnect_max,
                link_up: false,
                ever_connected: false,
                attempt: 0,
                heartbeat: None,
                online: None,
                events_sent_end: 0,
                next_drop: None,
                stall_reported: false,
                next_logged_event: 0,
            };
            let span = info_span!("vehicle", vehicle = %id);
            // Boxed: an async fn keeps its arguments next to the locals they are moved into,
            // which would hold the ~5 KiB vehicle twice in every task.
            let task = Box::new(vehicle).run(control.clone(), connect_delay);
            tracker.spawn_on(task.instrument(span), &runtime);
            vehicles.push(id.clone());
            controls.insert(id, control);
        }

        tracker.spawn_on(
            show_progress(
                Arc::clone(&counters),
                n,
                started,
                config.progress_every,
                status.clone(),
                shutdown.clone(),
            ),
            &runtime,
        );
        let fleets: Vec<&str> = config.fleets.iter().map(FleetId::as_str).collect();
        info!(
            vehicles = n,
            broker = %format_args!("{}:{}", config.broker_host, config.broker_port),
            fleets = %fleets.join(","),
            interval_ms,
            time_scale = config.time_scale,
            heartbeat_qos = config.heartbeat_qos,
            sealed_with = if config.credentials.is_some() { "per-vehicle keys" } else { "open-mode keys" },
            seed = config.seed,
            "simulation started"
        );
        Ok(Self {
            vehicles,
            controls,
            counters,
            tracker,
            shutdown,
            started,
            status,
        })
    }

    /// The simulated vehicles' ids, in slot order.
    pub fn vehicles(&self) -> &[VehicleId] {
        &self.vehicles
    }

    /// The counters so far.
    pub fn report(&self) -> SimReport {
        self.counters.report(self.vehicle_count(), self.started)
    }

    fn vehicle_count(&self) -> u32 {
        // At most MAX_VEHICLES.
        self.vehicles.len() as u32
    }

    /// Stops one vehicle and waits until its task has ended (for [`StopMode::Clean`], after
    /// the goodbye has been written or has timed out). Stopping a stopped vehicle is a no-op.
    ///
    /// # Errors
    /// [`SimError::UnknownVehicle`] if `vehicle` is not part of this simulation.
    pub async fn stop_vehicle(&self, vehicle: &VehicleId, mode: StopMode) -> Result<(), SimError> {
        let control = self
            .controls
            .get(vehicle)
            .ok_or_else(|| SimError::UnknownVehicle(vehicle.clone()))?;
        match mode {
            StopMode::Clean => control.stop.cancel(),
            StopMode::Abrupt => control.abort.cancel(),
        }
        control.done.cancelled().await;
        Ok(())
    }

    /// Stops every vehicle cleanly, waits for all tasks and returns the final counts.
    pub async fn shutdown(self) -> SimReport {
        info!("stopping vehicles");
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.status.finish();
        self.report()
    }
}

impl Drop for Simulation {
    /// A simulation dropped without [`Simulation::shutdown`] still stops its vehicles cleanly
    /// (in the background, for as long as the runtime lives).
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs a simulation until `shutdown` completes or [`SimConfig::duration`] has passed, then
/// stops every vehicle cleanly and returns what happened. Progress goes to the log.
///
/// # Errors
/// [`SimError`] if the configuration is invalid; connection trouble is not an error (vehicles
/// keep retrying) but shows in the report.
pub async fn run(
    config: SimConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<SimReport, SimError> {
    run_with_status(config, shutdown, StatusLine::none()).await
}

/// [`run`], showing progress on `status` (a live status line on a terminal).
///
/// # Errors
/// As [`run`].
pub async fn run_with_status(
    config: SimConfig,
    shutdown: impl Future<Output = ()>,
    status: StatusLine,
) -> Result<SimReport, SimError> {
    let duration = config.duration;
    let simulation = Simulation::start_with_status(config, status)?;
    let elapsed = async {
        match duration {
            Some(duration) => sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = shutdown => info!("shutdown requested"),
        () = elapsed => info!("duration elapsed"),
    }
    Ok(simulation.shutdown().await)
}

/// Shows the counters: on the status line four times a second, or as a log line every
/// `every` if there is no status line; until `cancel`.
async fn show_progress(
    counters: Arc<Counters>,
    vehicles: u32,
    started: Instant,
    every: Duration,
    status: StatusLine,
    cancel: CancellationToken,
) {
    let every = if status.is_shown() {
        Duration::from_millis(250)
    } else {
        every.max(Duration::from_millis(100))
    };
    let mut ticker = interval_at(Instant::now() + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {
                let r = counters.report(vehicles, started);
                let now = Instant::now();
                let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
                let rate = r.heartbeats_sent.saturating_sub(last.1) as f64 / secs;
                last = (now, r.heartbeats_sent);
                if status.is_shown() {
                    status.update(&r, rate);
                } else {
                    info!(
                        connected = r.connected,
                        vehicles,
                        heartbeats = r.heartbeats_sent,
                        heartbeats_per_s = rate.round(),
                        events = r.events_acked,
                        acks = r.commands_answered,
                        reconnects = r.reconnects,
                        errors = r.errors,
                        "progress"
                    );
                }
            }
        }
    }
}

/// A distinct, well-mixed seed for each vehicle (the SplitMix64 finaliser).
fn vehicle_seed(seed: u64, index: u32) -> u64 {
    let mut z = seed ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A vehicle's clocks: Unix milliseconds read once at start (plus the vehicle's skew), then
/// advanced by the monotonic Tokio clock, so they never jump with the wall clock and match
/// Tokio's timers to the millisecond. The simulation clock runs `scale` times faster.
#[derive(Debug, Clone, Copy)]
struct SimClock {
    epoch_ms: u64,
    start: Instant,
    scale: f64,
    skew_ms: i64,
}

impl SimClock {
    fn base_ms(&self) -> u64 {
        self.epoch_ms.saturating_add_signed(self.skew_ms)
    }

    /// Simulation time at `at`.
    fn ms_at(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.start).as_secs_f64() * 1000.0;
        // Non-negative and far below 2^53.
        self.base_ms() + (elapsed * self.scale).floor() as u64
    }

    /// Simulation time now.
    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// Real (unscaled) device time now: what seal counters are read from.
    fn wall_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.base_ms().saturating_add(elapsed)
    }

    /// The instant at simulation time `ms`: a timer set to it fires when `now_ms() >= ms`.
    fn instant_at(&self, ms: u64) -> Instant {
        let sim = ms.saturating_sub(self.base_ms()) as f64;
        self.start + Duration::from_secs_f64(sim / self.scale / 1000.0)
    }

    /// A real-time duration for `ms` of simulation time.
    fn real(&self, ms: u32) -> Duration {
        Duration::from_secs_f64(f64::from(ms) / self.scale / 1000.0)
    }
}

/// Where the vehicles' broker is and how they log in; shared by all of them.
#[derive(Debug)]
struct Broker {
    host: String,
    port: u16,
    credentials: Option<Arc<Credentials>>,
}

/// What a QoS 1 publish was, so its PUBACK can be reported to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acked {
    /// The delivery event with this `seq`.
    Event(u32),
    /// A status, command ack or QoS 1 heartbeat: nothing waits for its PUBACK.
    Other,
}

/// What a publish carries, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Heartbeat,
    Garbage,
    Event(u32),
    Other,
}

/// Whether a vehicle task goes on after handling something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Say goodbye (if connected), then stop.
    Goodbye(OfflineReason),
}

/// How a connection ended.
#[derive(Debug)]
enum Ended {
    /// The vehicle stopped.
    Done,
    /// The link failed: reconnect after a backoff.
    Lost(LinkError),
    /// [`Chaos::drop_rate`] struck.
    ChaosDrop,
}

/// One vehicle's task state: the device and its MQTT side.
struct Vehicle {
    device: Device,
    session: Session<Acked>,
    broker: Arc<Broker>,
    command_topic: String,
    clock: SimClock,
    counters: Arc<Counters>,
    /// Backoff jitter and chaos.
    rng: fastrand::Rng,
    chaos: Chaos,
    reconnect_max: Duration,
    /// Whether the broker accepted the current connection (CONNACK).
    link_up: bool,
    ever_connected: bool,
    /// Failed connection attempts since the last CONNACK.
    attempt: u32,
    /// Created on the first CONNACK: no heartbeats before the vehicle was ever online.
    heartbeat: Option<Interval>,
    /// The `Online` status sealed for the connection being made.
    online: Option<Publication>,
    /// One past the `seq` of the newest delivery event ever published: an event below it is
    /// sent again (DUP).
    events_sent_end: u32,
    /// When [`Chaos::drop_rate`] strikes next.
    next_drop: Option<Instant>,
    /// Whether the current stall (full event queue) was logged.
    stall_reported: bool,
    /// The `seq` of the next delivery event to log.
    next_logged_event: u32,
}

impl Vehicle {
    async fn run(mut self: Box<Self>, control: VehicleControl, connect_delay: Duration) {
        let _done = control.done.clone().drop_guard();
        self.drive(&control, connect_delay).await;
        if self.link_up {
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        let outbox = self.device.outbox();
        debug!(
            heartbeats = self.device.heartbeat(self.clock.now_ms()).seq,
            events_unacknowledged = outbox.events_queued(),
            "vehicle stopped"
        );
    }

    async fn drive(&mut self, control: &VehicleControl, connect_delay: Duration) {
        // Registered once for the whole task, not on every turn of the loops below.
        let mut abort = pin!(control.abort.cancelled());
        let mut stop = pin!(control.stop.cancelled());
        tokio::select! {
            biased;
            () = abort.as_mut() => return,
            () = stop.as_mut() => return,
            () = sleep(connect_delay) => {}
        }
        let mut retry_at: Option<Instant> = None;
        loop {
            if let Some(at) = retry_at.take() {
                // Backing off. The device lives on and queues what it has to say; offline
                // there is nothing to say goodbye on, the will covers it.
                loop {
                    tokio::select! {
                        biased;
                        () = abort.as_mut() => return,
                        () = stop.as_mut() => return,
                        () = sleep_until(at) => break,
                        at = tick(&mut self.heartbeat) => {
                            if self.on_heartbeat(at) != Flow::Continue {
                                return;
                            }
                        }
                    }
                }
            }

            let broker = Arc::clone(&self.broker);
            let connected = {
                let mut connect = pin!(Link::connect(&broker.host, broker.port, CONNECT_TIMEOUT));
                loop {
                    tokio::select! {
                        biased;
                        () = abort.as_mut() => return,
                        () = stop.as_mut() => return,
                        connected = &mut connect => break connected,
                        at = tick(&mut self.heartbeat) => {
                            if self.on_heartbeat(at) != Flow::Continue {
                                return;
                            }
                        }
                    }
                }
            };
            let ended = match connected {
                Ok(link) => match self.begin() {
                    Ok(()) => self.converse(link, abort.as_mut(), stop.as_mut()).await,
                    Err(err) => {
                        // Not a connection problem: an id or a login too long for MQTT.
                        warn!(cause = %err, "cannot connect");
                        Counters::bump(&self.counters.errors);
                        return;
                    }
                },
                Err(err) => Ended::Lost(err),
            };
            match ended {
                Ended::Done => return,
                Ended::Lost(err) => retry_at = Some(self.on_connection_error(&err)),
                Ended::ChaosDrop => {
                    // The socket is already dropped, without a DISCONNECT: the broker
                    // publishes the will.
                    Counters::bump(&self.counters.chaos_drops);
                    info!("chaos: dropping the connection");
                    self.link_down();
                    self.attempt = 0;
                    retry_at = Some(self.backoff());
                }
            }
        }
    }

    /// Seals this attempt's `Online` (counter `c`) and will (`c + 1`) and queues the CONNECT
    /// with the will.
    fn begin(&mut self) -> Result<(), SendError> {
        let statuses = match self.device.connect_statuses(self.clock.wall_ms()) {
            Ok(statuses) => Some(statuses),
            Err(err) => {
                warn!(cause = %err, "cannot seal the connection statuses");
                Counters::bump(&self.counters.errors);
                None
            }
        };
        let id = self.device.vehicle().as_str();
        let password = self
            .broker
            .credentials
            .as_ref()
            .and_then(|c| c.get(self.device.vehicle()))
            .map(|secret| secret.password.as_str());
        let request = ConnectRequest {
            client_id: id,
            login: password.map(|password| (id, password)),
            will: statuses.as_ref().map(|s| message(&s.will)),
        };
        self.session.begin(&request, Instant::now())?;
        self.online = statuses.map(|s| s.online);
        Ok(())
    }

    /// One connection, from the CONNECT queued by [`begin`](Self::begin) until it ends.
    async fn converse(
        &mut self,
        link: Link,
        mut abort: Pin<&mut WaitForCancellationFuture<'_>>,
        mut stop: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Ended {
        // One timer for keep-alive, timeouts and chaos, re-armed only when it fires or
        // something is due earlier than it is armed for.
        let mut armed = self.next_timer();
        let mut timer = pin!(sleep_until(armed));
        loop {
            // Write what is queued and hand the device's backlog over, as far as the socket
            // takes it without waiting.
            loop {
                if let Err(err) = link.write_now(&mut self.session) {
                    return Ended::Lost(err);
                }
                if self.session.has_output() || !self.flush() {
                    break;
                }
            }
            let wanted = self.next_timer();
            if wanted < armed {
                armed = wanted;
                timer.as_mut().reset(armed);
            }
            let flow = tokio::select! {
                biased;
                () = abort.as_mut() => {
                    info!("dropping the connection without a goodbye");
                    return Ended::Done;
                }
                () = stop.as_mut() => Flow::Goodbye(OfflineReason::Shutdown),
                exchanged = link.exchange(&mut self.session) => {
                    match exchanged.and_then(|()| self.on_input()) {
                        Ok(()) => Flow::Continue,
                        Err(err) => return Ended::Lost(err),
                    }
                }
                at = tick(&mut self.heartbeat) => self.on_heartbeat(at),
                () = timer.as_mut() => {
                    let now = Instant::now();
                    if self.next_drop.is_some_and(|at| at <= now) {
                        return Ended::ChaosDrop;
                    }
                    if let Err(err) = self.session.on_timer(now) {
                        return Ended::Lost(err);
                    }
                    armed = self.next_timer();
                    timer.as_mut().reset(armed);
                    Flow::Continue
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Goodbye(reason) => {
                    self.say_goodbye(link, reason, abort).await;
                    return Ended::Done;
                }
            }
        }
    }

    /// The earliest of the session's deadline and the next chaos drop; far away if none.
    fn next_timer(&self) -> Instant {
        let drop = self.next_drop.filter(|_| self.link_up);
        [self.session.deadline(), drop]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(24 * 3600))
    }

    /// Handles every complete packet received.
    fn on_input(&mut self) -> Result<(), LinkError> {
        let now = Instant::now();
        while let Some(incoming) = self.session.next_incoming(now)? {
            match incoming {
                Incoming::ConnAck => self.on_connected(),
                Incoming::Publish(publish) => {
                    if publish.topic == self.command_topic {
                        self.on_command(&publish.payload);
                    } else {
                        debug!(topic = %publish.topic, "ignoring a message on a foreign topic");
                    }
                }
                Incoming::PubAck {
                    tag: Some(Acked::Event(seq)),
                    ..
                } => {
                    let removed = self.device.event_acked(seq) as u64;
                    self.counters
                        .events_acked
                        .fetch_add(removed, Ordering::Relaxed);
                }
                Incoming::PubAck {
                    tag: Some(Acked::Other),
                    ..
                } => {}
                Incoming::PubAck { pkid, tag: None } => {
                    debug!(pkid, "an acknowledgement of nothing in flight");
                }
                Incoming::SubAck { refused, .. } => {
                    if refused {
                        warn!(topic = %self.command_topic, "the broker refused the command subscription");
                        Counters::bump(&self.counters.errors);
                    }
                }
            }
        }
        Ok(())
    }

    fn on_connected(&mut self) {
        self.link_up = true;
        self.attempt = 0;
        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        if self.ever_connected {
            Counters::bump(&self.counters.reconnects);
            let outbox = self.device.outbox();
            info!(
                events_queued = outbox.events_queued(),
                heartbeats_queued = outbox.heartbeats_queued(),
                "reconnected"
            );
        } else {
            debug!("connected");
            self.ever_connected = true;
        }
        if let Some(online) = self.online.take() {
            self.send("online status", &online, Sent::Other);
        }
        // A clean session has no subscriptions: subscribe on every connection.
        if let Err(err) =
            self.session
                .subscribe(&self.command_topic, QoS::AtLeastOnce, Instant::now())
        {
            warn!(cause = %err, "cannot subscribe to commands");
            Counters::bump(&self.counters.errors);
        }
        if self.heartbeat.is_none() {
            self.heartbeat = Some(self.heartbeat_interval());
        }
        if self.chaos.drop_rate > 0.0 {
            // Exponentially distributed: `drop_rate` per second on average.
            let wait = -(1.0 - self.rng.f64()).ln() / self.chaos.drop_rate;
            self.next_drop = Some(Instant::now() + Duration::from_secs_f64(wait.min(1e6)));
        }
    }

    /// Advances the device to the scheduled tick `at`; its heartbeat (if due) goes into the
    /// outbox, which the connection loop flushes if the link is up.
    fn on_heartbeat(&mut self, at: Instant) -> Flow {
        // The scheduled time, not the (jittery) wake-up time: the same seed drives the same.
        let now = self.clock.ms_at(at);
        let dropped_before = self.device.outbox().heartbeats_dropped();
        let beat = self.device.tick(now);
        let dropped = self
            .device
            .outbox()
            .heartbeats_dropped()
            .wrapping_sub(dropped_before);
        if dropped > 0 {
            self.counters
                .heartbeats_dropped
                .fetch_add(u64::from(dropped), Ordering::Relaxed);
        }
        self.log_new_events();
        if beat.is_some() && self.device.is_depleted() {
            info!("battery empty, going offline");
            return Flow::Goodbye(OfflineReason::LowBattery);
        }
        match (self.device.is_stalled(), self.stall_reported) {
            (true, false) => {
                warn!(
                    events_queued = self.device.outbox().events_queued(),
                    "event queue full: the delivery waits until the broker acknowledges"
                );
                self.stall_reported = true;
            }
            (false, true) => self.stall_reported = false,
            _ => {}
        }
        Flow::Continue
    }

    /// Logs the delivery events the device produced since the last call.
    fn log_new_events(&mut self) {
        let next = self.device.next_event_seq();
        if next == self.next_logged_event {
            return;
        }
        let from = self.next_logged_event;
        for event in self
            .device
            .outbox()
            .events()
            .filter(|e| e.seq.wrapping_sub(from) < next.wrapping_sub(from))
        {
            info!(
                order = %event.order,
                kind = event.kind.as_str(),
                seq = event.seq,
                ts_ms = event.ts_ms,
                online = self.link_up,
                "delivery event"
            );
        }
        self.next_logged_event = next;
    }

    /// Hands up to [`FLUSH_WINDOW`] queued events and heartbeats to the session, if the link
    /// is up, everything handed over before is written, and PUBACKs are not overdue (at most
    /// [`MAX_INFLIGHT`] QoS 1 publishes unacknowledged). Returns whether it handed any.
    fn flush(&mut self) -> bool {
        if !self.link_up || !self.session.is_connected() || self.session.has_output() {
            return false;
        }
        let mut handed = 0;
        while handed < FLUSH_WINDOW && self.session.in_flight() < MAX_INFLIGHT {
            let item = match self.device.next_publication(self.clock.wall_ms()) {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(err) => {
                    warn!(cause = %err, "cannot seal a queued message");
                    Counters::bump(&self.counters.errors);
                    break;
                }
            };
            let mut publication = item.publication;
            let mut what = match item.event_seq {
                Some(seq) => Sent::Event(seq),
                None => Sent::Heartbeat,
            };
            if what == Sent::Heartbeat
                && self.chaos.garbage_rate > 0.0
                && self.rng.f64() < self.chaos.garbage_rate
            {
                self.garble(&mut publication);
                what = Sent::Garbage;
            }
            if !self.send("queued message", &publication, what) {
                match what {
                    Sent::Event(_) => self.device.event_unsent(),
                    _ => Counters::bump(&self.counters.heartbeats_dropped),
                }
                break;
            }
            handed += 1;
        }
        handed > 0
    }

    /// Replaces a heartbeat's payload by a malformed one: cut short, a flipped bit (the tag no
    /// longer matches), or random bytes.
    fn garble(&mut self, publication: &mut Publication) {
        let payload = &mut publication.payload;
        match self.rng.u8(..3) {
            0 => payload.truncate(self.rng.usize(..payload.len().max(1))),
            1 => {
                let i = self.rng.usize(..payload.len().max(1));
                if let Some(byte) = payload.get_mut(i) {
                    *byte ^= 1 << self.rng.u8(..8);
                }
            }
            _ => {
                payload.clear();
                for _ in 0..self.rng.usize(1..=32) {
                    // Cannot overflow: at most 32 of MAX_PAYLOAD bytes.
                    let _ = payload.push(self.rng.u8(..));
                }
            }
        }
    }

    fn on_command(&mut self, payload: &[u8]) {
        let command = match shared::decode::<Command>(payload) {
            Ok(command) => command,
            Err(err) => {
                warn!(cause = %err, bytes = payload.len(), "ignoring a bad command payload");
                Counters::bump(&self.counters.bad_commands);
                return;
            }
        };
        self.device.advance(self.clock.now_ms());
        self.log_new_events();
        let interval = self.device.heartbeat_interval_ms();
        let ack = self.device.handle_command(&command);
        info!(
            command = command.id,
            kind = ?command.kind,
            result = ack.result.as_str(),
            "command"
        );
        match self.device.publication(&ack, self.clock.wall_ms()) {
            Ok(publication) => {
                if self.send("command ack", &publication, Sent::Other) {
                    Counters::bump(&self.counters.commands_answered);
                }
            }
            Err(err) => {
                warn!(cause = %err, "cannot seal the command ack");
                Counters::bump(&self.counters.errors);
            }
        }
        if self.device.heartbeat_interval_ms() != interval && self.heartbeat.is_some() {
            self.heartbeat = Some(self.heartbeat_interval());
        }
    }

    /// The link is down: the session forgets what was in flight, and the device's events in
    /// flight go out again after the reconnect.
    fn link_down(&mut self) {
        if self.link_up {
            self.link_up = false;
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.session.reset();
        self.next_drop = None;
        self.device.connection_lost();
    }

    /// Counts the error and picks when to try again.
    fn on_connection_error(&mut self, err: &LinkError) -> Instant {
        Counters::bump(&self.counters.errors);
        if err.is_oversized() {
            Counters::bump(&self.counters.oversized_packets);
        }
        if self.link_up {
            warn!(cause = %err, "connection lost, reconnecting");
        } else if self.attempt == 0 {
            warn!(cause = %err, "cannot connect, retrying");
        } else {
            debug!(cause = %err, attempt = self.attempt, "still cannot connect");
        }
        self.link_down();
        self.backoff()
    }

    /// Exponential backoff from [`RECONNECT_BASE`] up to `reconnect_max`, each wait drawn
    /// from its upper half.
    fn backoff(&mut self) -> Instant {
        let backoff = RECONNECT_BASE
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.reconnect_max);
        self.attempt = self.attempt.saturating_add(1);
        let wait = backoff / 2 + backoff.mul_f64(self.rng.f64() / 2.0);
        Instant::now() + wait
    }

    /// Publishes `Offline(reason)`, disconnects, and closes the link once the DISCONNECT is
    /// out and the broker has closed its side (at most [`GOODBYE_TIMEOUT`]). Without a
    /// CONNACK there is nothing to say goodbye on: the link is just dropped.
    async fn say_goodbye(
        &mut self,
        link: Link,
        reason: OfflineReason,
        mut abort: Pin<&mut WaitForCancellationFuture<'_>>,
    ) {
        if !self.link_up {
            return;
        }
        let unacknowledged = self.device.outbox().events_queued();
        if unacknowledged > 0 {
            warn!(
                events = unacknowledged,
                "stopping with delivery events not yet acknowledged"
            );
        }
        match self.device.offline_status(reason, self.clock.wall_ms()) {
            Ok(bye) => {
                self.send("offline status", &bye, Sent::Other);
            }
            Err(err) => {
                warn!(cause = %err, "cannot seal the offline status");
                Counters::bump(&self.counters.errors);
            }
        }
        if let Err(err) = self.session.disconnect(Instant::now()) {
            warn!(cause = %err, "cannot disconnect");
            Counters::bump(&self.counters.errors);
            return;
        }
        debug!(reason = reason.as_str(), "saying goodbye");
        tokio::select! {
            biased;
            () = abort.as_mut() => info!("dropping the connection without a goodbye"),
            closed = tokio::time::timeout(GOODBYE_TIMEOUT, link.close(&mut self.session)) => {
                match closed {
                    Ok(Ok(())) => debug!("said goodbye"),
                    Ok(Err(err)) => debug!(cause = %err, "connection closed while saying goodbye"),
                    Err(_) => warn!("goodbye timed out"),
                }
            }
        }
    }

    /// Hands a publication to the session; logs and counts a failure. Returns whether it was
    /// queued. A delivery event published before (its PUBACK never came) goes with DUP set.
    fn send(&mut self, what: &str, publication: &Publication, sent: Sent) -> bool {
        let (dup, tag) = match sent {
            // `seq` is below the end (in wrapping order) if it was published before.
            Sent::Event(seq) => (
                (self.events_sent_end.wrapping_sub(seq) as i32) > 0,
                Acked::Event(seq),
            ),
            _ => (false, Acked::Other),
        };
        match self
            .session
            .publish(&message(publication), dup, tag, Instant::now())
        {
            Ok(_) => {
                match sent {
                    Sent::Heartbeat => Counters::bump(&self.counters.heartbeats_sent),
                    Sent::Garbage => Counters::bump(&self.counters.garbage_sent),
                    Sent::Event(seq) => {
                        Counters::bump(&self.counters.events_sent);
                        if !dup {
                            self.events_sent_end = seq.wrapping_add(1);
                        }
                    }
                    Sent::Other => {}
                }
                true
            }
            Err(err) => {
                warn!(cause = %err, "cannot publish the {what}");
                Counters::bump(&self.counters.errors);
                false
            }
        }
    }

    /// An interval on the device's heartbeat phase: its next due time plus whole intervals,
    /// in real time.
    fn heartbeat_interval(&self) -> Interval {
        let period = self.clock.real(self.device.heartbeat_interval_ms());
        let start = self
            .device
            .next_heartbeat_ms()
            .map_or_else(Instant::now, |ms| self.clock.instant_at(ms));
        let mut interval = interval_at(start, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        interval
    }
}

/// A publication as an MQTT message.
fn message(publication: &Publication) -> Message<'_> {
    Message {
        topic: publication.topic.as_str(),
        payload: &publication.payload,
        qos: qos(publication.qos),
        retain: publication.retain,
    }
}

/// The next tick of an optional interval (its scheduled instant); never, if there is none.
async fn tick(interval: &mut Option<Interval>) -> Instant {
    match interval {
        Some(interval) => interval.tick().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(name: &str) -> FleetId {
        FleetId::new(name).expect("valid")
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
            fleets: vec![fleet("a-very-long-fleet-name-x")],
            ..SimConfig::default()
        };
        assert!(matches!(long.validate(), Err(SimError::VehicleId { .. })));
    }

    #[test]
    fn fleets_are_dealt_in_turn() {
        let config = SimConfig {
            vehicles: 5,
            fleets: vec![fleet("north"), fleet("south")],
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
    fn time_scale_stretches_the_device_interval() {
        let config = SimConfig {
            rate_hz: 2.0,
            time_scale: 60.0,
            ..SimConfig::default()
        };
        assert_eq!(config.heartbeat_interval_ms().expect("valid"), 30_000);
        let clock = SimClock {
            epoch_ms: 1_000_000,
            start: Instant::now(),
            scale: 60.0,
            skew_ms: -500,
        };
        assert_eq!(clock.ms_at(clock.start + Duration::from_secs(1)), 1_059_500);
        assert_eq!(
            clock.instant_at(1_059_500),
            clock.start + Duration::from_secs(1)
        );
        assert_eq!(clock.real(30_000), Duration::from_millis(500));
        for bad in [0.0, -1.0, 1001.0, f64::NAN] {
            let config = SimConfig {
                time_scale: bad,
                ..SimConfig::default()
            };
            assert!(
                matches!(config.validate(), Err(SimError::TimeScale(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn credentials_must_cover_every_vehicle() {
        let mut credentials = Credentials::default();
        let config = SimConfig {
            vehicles: 2,
            ..SimConfig::default()
        };
        let ids = config.vehicle_ids().expect("valid");
        credentials.provision(&ids[..1]).expect("random");
        let missing = SimConfig {
            credentials: Some(Arc::new(credentials.clone())),
            ..config.clone()
        };
        assert!(matches!(missing.validate(), Err(SimError::NoCredentials(id)) if id == ids[1]));
        credentials.provision(&ids).expect("random");
        let key = credentials.get(&ids[1]).expect("provisioned").key;
        let full = SimConfig {
            credentials: Some(Arc::new(credentials)),
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

    #[tokio::test(start_paused = true)]
    async fn clock_matches_tokio_timers() {
        for scale in [1.0, 50.0] {
            let clock = SimClock {
                epoch_ms: 1_764_230_400_000,
                start: Instant::now(),
                scale,
                skew_ms: 250,
            };
            let due = clock.now_ms() + 12_340;
            sleep_until(clock.instant_at(due)).await;
            // Tokio's timers have millisecond resolution: one real ms is `scale` ms here.
            let late = clock.now_ms() - due;
            assert!(late < scale as u64, "{late} ms late at scale {scale}");
            if scale == 1.0 {
                assert_eq!(late, 0);
            }
        }
    }

    #[test]
    fn start_needs_a_runtime() {
        assert!(matches!(
            Simulation::start(SimConfig::default()),
            Err(SimError::NoRuntime)
        ));
    }

    /// A broker that sends a packet over the vehicle's limit: the connection ends with a
    /// counted error, and the vehicle connects again.
    #[tokio::test]
    async fn an_oversized_packet_ends_the_connection_and_is_counted() {
        use bytes::BytesMut;
        use rumqttc::mqttbytes::v4::Packet;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let broker = tokio::spawn(async move {
            for attempt in 1.. {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut buf = BytesMut::new();
                loop {
                    socket.read_buf(&mut buf).await.expect("read");
                    match Packet::read(&mut buf, 1 << 16) {
                        Ok(Packet::Connect(_)) => break,
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                        other => panic!("expected a CONNECT: {other:?}"),
                    }
                }
                // CONNACK, accepted.
                socket.write_all(&[0x20, 2, 0, 0]).await.expect("write");
                if attempt == 2 {
                    return socket;
                }
                // A PUBLISH announcing 1 MiB.
                socket
                    .write_all(&[0x30, 0x80, 0x80, 0x40])
                    .await
                    .expect("write");
                let mut sink = [0u8; 256];
                while socket.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            }
            unreachable!()
        });
        let config = SimConfig {
            vehicles: 1,
            broker_port: port,
            connect_spread: Duration::ZERO,
            reconnect_max: Duration::from_millis(200),
            ..SimConfig::default()
        };
        let simulation = Simulation::start(config).expect("starts");
        let socket = tokio::time::timeout(Duration::from_secs(5), broker)
            .await
            .expect("the vehicle connects again")
            .expect("broker task");
        tokio::time::timeout(Duration::from_secs(5), async {
            while simulation.report().reconnects < 1 {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("reconnected");
        let report = simulation.report();
        assert_eq!(report.oversized_packets, 1, "{report:?}");
        assert!(report.errors >= 1, "{report:?}");
        assert_eq!(report.connected, 1, "{report:?}");
        drop(socket);
        let report = tokio::time::timeout(Duration::from_secs(5), simulation.shutdown())
            .await
            .expect("shuts down");
        assert_eq!(report.oversized_packets, 1);
    }

    /// Without a broker the vehicles keep retrying, count errors, and still shut down promptly.
    #[tokio::test]
    async fn survives_a_missing_broker_and_shuts_down() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let config = SimConfig {
            vehicles: 3,
            broker_port: port,
            connect_spread: Duration::ZERO,
            reconnect_max: Duration::from_millis(200),
            ..SimConfig::default()
        };
        let simulation = Simulation::start(config).expect("starts");
        assert_eq!(simulation.vehicles().len(), 3);
        sleep(Duration::from_millis(800)).await;
        let vehicle = simulation.vehicles()[0].clone();
        tokio::time::timeout(
            Duration::from_secs(2),
            simulation.stop_vehicle(&vehicle, StopMode::Clean),
        )
        .await
        .expect("one vehicle stops")
        .expect("known vehicle");
        let unknown = VehicleId::new("nobody").expect("valid");
        assert!(matches!(
            simulation.stop_vehicle(&unknown, StopMode::Abrupt).await,
            Err(SimError::UnknownVehicle(_))
        ));
        let report = tokio::time::timeout(Duration::from_secs(2), simulation.shutdown())
            .await
            .expect("shuts down promptly");
        assert_eq!(report.connected, 0);
        assert_eq!(report.heartbeats_sent, 0);
        // Each vehicle failed several times, backing off at most 200 ms.
        assert!(report.errors >= 6, "{report:?}");
    }
}
