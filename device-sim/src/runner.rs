//! The simulator: one tokio task, one [`Device`] and one MQTT connection per vehicle.
//!
//! Each vehicle task owns its `rumqttc` [`AsyncClient`] and [`EventLoop`] and is a small
//! super-loop: it keeps one `EventLoop::poll` future alive across heartbeat ticks (never
//! cancelling it halfway), and publishes with the non-blocking `try_` calls so nothing it does
//! can stall the loop that carries those publishes out.
//!
//! - Connect (clean session, keep-alive [`SimConfig::keep_alive`], last will
//!   `Offline(ConnectionLost)` retained at QoS 1 on `fleet/{fleet}/{vehicle}/status`), staggered
//!   over [`SimConfig::connect_spread`].
//! - On every ConnAck: publish `Online` (retained, QoS 1) and subscribe to `.../cmd` at QoS 1;
//!   a clean session forgets subscriptions, so this is redone after every reconnect.
//! - Heartbeats on `.../hb` at QoS 0 from a per-vehicle interval, phases spread evenly over
//!   the interval; the [`Device`] decides what is due.
//! - Commands from `.../cmd` are decoded (a bad payload is logged and counted) and answered
//!   on `.../ack` at QoS 1.
//! - A lost connection is retried with jittered exponential backoff up to
//!   [`SimConfig::reconnect_max`].
//! - On stop: `Offline(Shutdown)` retained, then an MQTT DISCONNECT, so the broker drops the
//!   will. An abrupt stop ([`StopMode::Abrupt`]) just drops the socket and the will fires.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use shared::{CodecError, Command, FleetId, IdError, OfflineReason, Position, VehicleId};
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::device::{
    Device, DeviceConfig, MAX_HEARTBEAT_INTERVAL_MS, MIN_HEARTBEAT_INTERVAL_MS, Publication,
};
use crate::route::{GridConfig, GridError, StreetGrid};

/// The most vehicles one simulator runs.
pub const MAX_VEHICLES: u32 = 10_000;
/// The first reconnect attempt waits about this long; each further one doubles it.
const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// How long a vehicle may take to say goodbye (publish offline, disconnect) on stop.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// Requests a vehicle can queue for its event loop.
const REQUEST_CAPACITY: usize = 32;

/// What to simulate and where to connect.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// How many vehicles, 1 ..= [`MAX_VEHICLES`].
    pub vehicles: u32,
    /// The MQTT broker's host name or IP address.
    pub broker_host: String,
    /// The MQTT broker's TCP port.
    pub broker_port: u16,
    /// The fleet all vehicles belong to; vehicle ids are `{fleet}-{index:04}` from 1.
    pub fleet: FleetId,
    /// Heartbeats per second per vehicle (fractions allowed): the interval must lie within
    /// 100 ms ..= 1 h.
    pub rate_hz: f64,
    /// Seeds every vehicle's start, battery and drive: same seed, same fleet movements.
    pub seed: u64,
    /// Stop by itself after this long ([`run`] only); `None` runs until shut down.
    pub duration: Option<Duration>,
    /// The city centre the street grid is laid around.
    pub centre: Position,
    /// MQTT keep-alive, 1 ..= 65 535 s (never 0: the broker must notice a dead vehicle).
    pub keep_alive: Duration,
    /// Vehicles connect one after another over this window instead of all at once.
    pub connect_spread: Duration,
    /// The longest wait between two reconnect attempts.
    pub reconnect_max: Duration,
    /// How often a progress line is logged.
    pub progress_every: Duration,
}

impl Default for SimConfig {
    /// 100 vehicles of fleet `demo` in Berlin at 1 Hz, against `127.0.0.1:1883`.
    fn default() -> Self {
        Self {
            vehicles: 100,
            broker_host: "127.0.0.1".into(),
            broker_port: 1883,
            fleet: FleetId::new("demo").unwrap_or_else(|_| unreachable!("`demo` is a valid id")),
            rate_hz: 1.0,
            seed: 1,
            duration: None,
            centre: GridConfig::BERLIN,
            keep_alive: Duration::from_secs(30),
            connect_spread: Duration::from_secs(2),
            reconnect_max: Duration::from_secs(5),
            progress_every: Duration::from_secs(5),
        }
    }
}

impl SimConfig {
    /// The heartbeat interval the rate gives, in milliseconds.
    ///
    /// # Errors
    /// [`SimError::Rate`] if the rate is not finite and positive, or the interval falls
    /// outside 100 ms ..= 1 h.
    pub fn heartbeat_interval_ms(&self) -> Result<u32, SimError> {
        let interval = 1000.0 / self.rate_hz;
        let valid = f64::from(MIN_HEARTBEAT_INTERVAL_MS)..=f64::from(MAX_HEARTBEAT_INTERVAL_MS);
        if !self.rate_hz.is_finite() || !valid.contains(&interval.round()) {
            return Err(SimError::Rate(self.rate_hz));
        }
        // Within 100 ..= 3_600_000: the cast is exact.
        Ok(interval.round() as u32)
    }

    /// The id of the `index`-th vehicle (from 1): `{fleet}-{index:04}`.
    ///
    /// # Errors
    /// [`SimError::VehicleId`] if the id does not fit a [`VehicleId`] (the fleet name is too
    /// long).
    pub fn vehicle_id(&self, index: u32) -> Result<VehicleId, SimError> {
        let id = format!("{}-{index:04}", self.fleet);
        VehicleId::new(&id).map_err(|source| SimError::VehicleId { id, source })
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
        self.heartbeat_interval_ms()?;
        if !(Duration::from_secs(1)..=Duration::from_secs(65_535)).contains(&self.keep_alive)
            || self.keep_alive.subsec_nanos() != 0
        {
            return Err(SimError::KeepAlive(self.keep_alive));
        }
        // The longest id is the last one.
        self.vehicle_id(self.vehicles)?;
        Ok(StreetGrid::new(GridConfig {
            centre: self.centre,
            ..GridConfig::default()
        })?)
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
    /// The heartbeat rate gives an interval outside 100 ms ..= 1 h.
    #[error("heartbeat rate {0} Hz is outside 1/3600 ..= 10 Hz")]
    Rate(f64),
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
    /// Heartbeats due while connected that could not be queued (the connection was backed up).
    pub heartbeats_dropped: u64,
    /// Commands answered with an ack.
    pub commands_answered: u64,
    /// Payloads on a `cmd` topic that did not decode as a command.
    pub bad_commands: u64,
    /// Successful reconnections after a lost connection.
    pub reconnects: u64,
    /// Connection failures, failed publishes and refused subscriptions.
    pub errors: u64,
    /// Time since the simulation started.
    pub elapsed: Duration,
}

/// Live counters shared by the vehicle tasks.
#[derive(Debug, Default)]
struct Counters {
    connected: AtomicU64,
    heartbeats_sent: AtomicU64,
    heartbeats_dropped: AtomicU64,
    commands_answered: AtomicU64,
    bad_commands: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
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
            commands_answered: get(&self.commands_answered),
            bad_commands: get(&self.bad_commands),
            reconnects: get(&self.reconnects),
            errors: get(&self.errors),
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
}

impl Simulation {
    /// Validates `config` and spawns every vehicle and the progress logger on the current
    /// Tokio runtime. [`SimConfig::duration`] is not enforced here (see [`run`]).
    ///
    /// # Errors
    /// [`SimError`] for an invalid configuration, or [`SimError::NoRuntime`].
    pub fn start(config: SimConfig) -> Result<Self, SimError> {
        let grid = config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SimError::NoRuntime)?;
        let interval_ms = config.heartbeat_interval_ms()?;
        let clock = SimClock::start();
        let counters = Arc::new(Counters::default());
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let n = config.vehicles;
        let mut vehicles = Vec::with_capacity(n as usize);
        let mut controls = HashMap::with_capacity(n as usize);
        // Different seeds start the fleet at different (but still spread-out) intersections.
        let slot_offset = (config.seed % u64::from(grid.node_count())) as u32;

        for index in 1..=n {
            let id = config.vehicle_id(index)?;
            let slot = index - 1;
            let mut device_config = DeviceConfig::new(id.clone(), config.fleet.clone(), grid);
            device_config.start = Some(grid.spread_node(slot + slot_offset));
            device_config.heartbeat_interval_ms = interval_ms;
            let seed = vehicle_seed(config.seed, index);
            let mut device = Device::new(device_config, seed);
            // Phases spread evenly over one interval, so heartbeats do not come in bursts.
            let phase_ms = u64::from(interval_ms) * u64::from(slot) / u64::from(n);
            device.schedule_heartbeat(clock.now_ms() + phase_ms);
            let connect_delay = config
                .connect_spread
                .mul_f64(f64::from(slot) / f64::from(n));

            let will = device.last_will_status()?;
            let mut options =
                MqttOptions::new(id.as_str(), config.broker_host.as_str(), config.broker_port);
            options
                .set_keep_alive(config.keep_alive)
                .set_clean_session(true)
                .set_request_channel_capacity(REQUEST_CAPACITY)
                .set_last_will(LastWill::new(
                    will.topic.as_str(),
                    will.payload.to_vec(),
                    qos(will.qos),
                    will.retain,
                ));
            let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);

            let control = VehicleControl {
                stop: shutdown.child_token(),
                abort: CancellationToken::new(),
                done: CancellationToken::new(),
            };
            let vehicle = Vehicle {
                topics: Topics::new(&device),
                device,
                client,
                clock,
                counters: Arc::clone(&counters),
                rng: fastrand::Rng::with_seed(seed ^ 0xB0FF),
                reconnect_max: config.reconnect_max,
                link_up: false,
                ever_connected: false,
                attempt: 0,
                goodbye_deadline: None,
                heartbeat: None,
            };
            let span = info_span!("vehicle", vehicle = %id);
            tracker.spawn_on(
                vehicle
                    .run(eventloop, control.clone(), connect_delay)
                    .instrument(span),
                &runtime,
            );
            vehicles.push(id.clone());
            controls.insert(id, control);
        }

        let started = clock.start;
        tracker.spawn_on(
            log_progress(
                Arc::clone(&counters),
                n,
                started,
                config.progress_every,
                shutdown.clone(),
            ),
            &runtime,
        );
        info!(
            vehicles = n,
            broker = %format_args!("{}:{}", config.broker_host, config.broker_port),
            fleet = %config.fleet,
            interval_ms,
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
        })
    }

    /// The simulated vehicles' ids, in index order.
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
/// stops every vehicle cleanly and returns what happened.
///
/// # Errors
/// [`SimError`] if the configuration is invalid; connection trouble is not an error (vehicles
/// keep retrying) but shows in the report.
pub async fn run(
    config: SimConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<SimReport, SimError> {
    let duration = config.duration;
    let simulation = Simulation::start(config)?;
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

/// Logs the counters every `every` until `cancel`.
async fn log_progress(
    counters: Arc<Counters>,
    vehicles: u32,
    started: Instant,
    every: Duration,
    cancel: CancellationToken,
) {
    let every = every.max(Duration::from_millis(100));
    let mut ticker = interval_at(Instant::now() + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {
                let r = counters.report(vehicles, started);
                info!(
                    connected = r.connected,
                    vehicles,
                    heartbeats = r.heartbeats_sent,
                    acks = r.commands_answered,
                    reconnects = r.reconnects,
                    errors = r.errors,
                    "progress"
                );
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

/// Device time: Unix milliseconds read once at start, then advanced by the monotonic Tokio
/// clock, so it never jumps with the wall clock and matches Tokio's timers to the millisecond.
#[derive(Debug, Clone, Copy)]
struct SimClock {
    epoch_ms: u64,
    start: Instant,
}

impl SimClock {
    fn start() -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            epoch_ms,
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.epoch_ms.saturating_add(elapsed)
    }

    /// The instant at device time `ms`: a timer set to it fires when `now_ms() >= ms`.
    fn instant_at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms.saturating_sub(self.epoch_ms))
    }
}

/// A vehicle's topic names, built once.
#[derive(Debug)]
struct Topics {
    heartbeat: String,
    command: String,
}

impl Topics {
    fn new(device: &Device) -> Self {
        use shared::TopicKind;
        Self {
            heartbeat: device.topic(TopicKind::Heartbeat).name().to_string(),
            command: device.topic(TopicKind::Command).name().to_string(),
        }
    }
}

/// Whether a vehicle task goes on after handling something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Done,
}

/// One vehicle's task state: the device and its MQTT side.
struct Vehicle {
    device: Device,
    client: AsyncClient,
    topics: Topics,
    clock: SimClock,
    counters: Arc<Counters>,
    /// Backoff jitter.
    rng: fastrand::Rng,
    reconnect_max: Duration,
    link_up: bool,
    ever_connected: bool,
    /// Failed connection attempts since the last ConnAck.
    attempt: u32,
    /// Set while saying goodbye: give up waiting for the DISCONNECT to go out at this time.
    goodbye_deadline: Option<Instant>,
    /// Created on the first ConnAck: no heartbeats before the vehicle was ever online.
    heartbeat: Option<Interval>,
}

impl Vehicle {
    async fn run(mut self, eventloop: EventLoop, control: VehicleControl, connect_delay: Duration) {
        let _done = control.done.clone().drop_guard();
        self.drive(eventloop, &control, connect_delay).await;
        if self.link_up {
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        debug!(
            heartbeats = self.device.heartbeat(self.clock.now_ms()).seq,
            "vehicle stopped"
        );
    }

    async fn drive(
        &mut self,
        mut eventloop: EventLoop,
        control: &VehicleControl,
        connect_delay: Duration,
    ) {
        tokio::select! {
            biased;
            () = control.abort.cancelled() => return,
            () = control.stop.cancelled() => return,
            () = sleep(connect_delay) => {}
        }
        let mut retry_at: Option<Instant> = None;
        loop {
            if let Some(at) = retry_at.take() {
                // Backing off: the event loop is deliberately not polled (that would reconnect).
                loop {
                    tokio::select! {
                        biased;
                        // Offline: nothing to say goodbye on, the will covers it.
                        () = control.abort.cancelled() => return,
                        () = control.stop.cancelled() => return,
                        () = sleep_until(at) => break,
                        _ = tick(&mut self.heartbeat) => {
                            if self.on_heartbeat() == Flow::Done {
                                return;
                            }
                        }
                    }
                }
            }

            let polled = {
                let poll = eventloop.poll();
                tokio::pin!(poll);
                loop {
                    let deadline = self.goodbye_deadline;
                    tokio::select! {
                        biased;
                        () = control.abort.cancelled() => {
                            info!("dropping the connection without a goodbye");
                            return;
                        }
                        () = control.stop.cancelled(), if deadline.is_none() => {
                            if self.say_goodbye(OfflineReason::Shutdown) == Flow::Done {
                                return;
                            }
                        }
                        () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                            warn!("goodbye timed out");
                            return;
                        }
                        polled = &mut poll => break polled,
                        _ = tick(&mut self.heartbeat), if deadline.is_none() => {
                            if self.on_heartbeat() == Flow::Done {
                                return;
                            }
                        }
                    }
                }
            };

            match polled {
                Ok(event) => {
                    if self.on_event(event) == Flow::Done {
                        return;
                    }
                }
                Err(err) => {
                    if self.goodbye_deadline.is_some() {
                        debug!(cause = %err, "connection closed while saying goodbye");
                        return;
                    }
                    retry_at = Some(self.on_connection_error(&err));
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) -> Flow {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => self.on_connected(),
            Event::Incoming(Packet::Publish(publish)) => {
                if publish.topic == self.topics.command {
                    self.on_command(&publish.payload);
                } else {
                    debug!(topic = %publish.topic, "ignoring a message on a foreign topic");
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, SubscribeReasonCode::Failure))
                {
                    warn!(topic = %self.topics.command, "the broker refused the command subscription");
                    Counters::bump(&self.counters.errors);
                }
            }
            // Heartbeats are the only QoS 0 messages a vehicle sends (packet id 0).
            Event::Outgoing(Outgoing::Publish(0)) => Counters::bump(&self.counters.heartbeats_sent),
            Event::Outgoing(Outgoing::Disconnect) => {
                debug!("said goodbye");
                return Flow::Done;
            }
            Event::Incoming(_) | Event::Outgoing(_) => {}
        }
        Flow::Continue
    }

    fn on_connected(&mut self) {
        self.link_up = true;
        self.attempt = 0;
        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        if self.ever_connected {
            Counters::bump(&self.counters.reconnects);
            info!("reconnected");
        } else {
            debug!("connected");
            self.ever_connected = true;
        }
        self.publish("online status", self.device.online_status());
        // A clean session has no subscriptions: subscribe on every connection.
        if let Err(err) = self
            .client
            .try_subscribe(self.topics.command.as_str(), QoS::AtLeastOnce)
        {
            warn!(cause = %err, "cannot subscribe to commands");
            Counters::bump(&self.counters.errors);
        }
        if self.heartbeat.is_none() {
            self.heartbeat = Some(self.heartbeat_interval());
        }
    }

    /// Advances the device; publishes a heartbeat if one is due and the link is up.
    fn on_heartbeat(&mut self) -> Flow {
        let now = self.clock.now_ms();
        let Some(heartbeat) = self.device.tick(now) else {
            return Flow::Continue;
        };
        if self.device.is_depleted() {
            info!("battery empty, going offline");
            return self.say_goodbye(OfflineReason::LowBattery);
        }
        if !self.link_up {
            // A QoS 0 heartbeat is not queued while offline: receivers see the gap in `seq`.
            return Flow::Continue;
        }
        let mut buf = [0u8; shared::MAX_PAYLOAD];
        let payload = match shared::encode(&heartbeat, &mut buf) {
            Ok(payload) => payload.to_vec(),
            Err(err) => {
                warn!(cause = %err, "cannot encode a heartbeat");
                Counters::bump(&self.counters.errors);
                return Flow::Continue;
            }
        };
        if let Err(err) = self.client.try_publish(
            self.topics.heartbeat.as_str(),
            QoS::AtMostOnce,
            false,
            payload,
        ) {
            debug!(cause = %err, seq = heartbeat.seq, "heartbeat dropped");
            Counters::bump(&self.counters.heartbeats_dropped);
        }
        Flow::Continue
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
        let interval = self.device.heartbeat_interval_ms();
        let ack = self.device.handle_command(&command);
        info!(
            command = command.id,
            kind = ?command.kind,
            result = ack.result.as_str(),
            "command"
        );
        if self.publish("command ack", self.device.publication(&ack)) {
            Counters::bump(&self.counters.commands_answered);
        }
        if self.device.heartbeat_interval_ms() != interval && self.heartbeat.is_some() {
            self.heartbeat = Some(self.heartbeat_interval());
        }
    }

    /// Counts the error and picks when to try again: exponential backoff from
    /// [`RECONNECT_BASE`] up to `reconnect_max`, each wait drawn from its upper half.
    fn on_connection_error(&mut self, err: &ConnectionError) -> Instant {
        Counters::bump(&self.counters.errors);
        if self.link_up {
            self.link_up = false;
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
            warn!(cause = %err, "connection lost, reconnecting");
        } else if self.attempt == 0 {
            warn!(cause = %err, "cannot connect, retrying");
        } else {
            debug!(cause = %err, attempt = self.attempt, "still cannot connect");
        }
        let backoff = RECONNECT_BASE
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.reconnect_max);
        self.attempt = self.attempt.saturating_add(1);
        let wait = backoff / 2 + backoff.mul_f64(self.rng.f64() / 2.0);
        Instant::now() + wait
    }

    /// Publishes `Offline(reason)` and disconnects; the task ends once the DISCONNECT is out.
    /// Returns [`Flow::Done`] if there is no connection to say goodbye on.
    fn say_goodbye(&mut self, reason: OfflineReason) -> Flow {
        if !self.link_up {
            return Flow::Done;
        }
        self.publish("offline status", self.device.offline_status(reason));
        if let Err(err) = self.client.try_disconnect() {
            warn!(cause = %err, "cannot disconnect");
            Counters::bump(&self.counters.errors);
            return Flow::Done;
        }
        debug!(reason = reason.as_str(), "saying goodbye");
        self.goodbye_deadline = Some(Instant::now() + GOODBYE_TIMEOUT);
        Flow::Continue
    }

    /// Queues a publication without waiting; logs and counts a failure. Returns whether it
    /// was queued.
    fn publish(&self, what: &str, publication: Result<Publication, CodecError>) -> bool {
        let queued = publication.map_err(|err| err.to_string()).and_then(|p| {
            self.client
                .try_publish(p.topic.as_str(), qos(p.qos), p.retain, p.payload.to_vec())
                .map_err(|err| err.to_string())
        });
        if let Err(cause) = &queued {
            warn!(%cause, "cannot publish the {what}");
            Counters::bump(&self.counters.errors);
        }
        queued.is_ok()
    }

    /// An interval on the device's heartbeat phase: its next due time plus whole intervals.
    fn heartbeat_interval(&self) -> Interval {
        let period = Duration::from_millis(u64::from(self.device.heartbeat_interval_ms()));
        let start = self
            .device
            .next_heartbeat_ms()
            .map_or_else(Instant::now, |ms| self.clock.instant_at(ms));
        let mut interval = interval_at(start, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        interval
    }
}

/// The next tick of an optional interval; never, if there is none.
async fn tick(interval: &mut Option<Interval>) -> Instant {
    match interval {
        Some(interval) => interval.tick().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicle_ids_are_fleet_dash_index() {
        let config = SimConfig::default();
        assert_eq!(config.vehicle_id(1).expect("valid").as_str(), "demo-0001");
        assert_eq!(
            config.vehicle_id(10_000).expect("valid").as_str(),
            "demo-10000"
        );
        let long = SimConfig {
            fleet: FleetId::new("a-very-long-fleet-name-x").expect("valid"),
            ..SimConfig::default()
        };
        assert!(matches!(long.validate(), Err(SimError::VehicleId { .. })));
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
        let clock = SimClock::start();
        let due = clock.now_ms() + 1234;
        sleep_until(clock.instant_at(due)).await;
        assert_eq!(clock.now_ms(), due);
    }

    #[test]
    fn start_needs_a_runtime() {
        assert!(matches!(
            Simulation::start(SimConfig::default()),
            Err(SimError::NoRuntime)
        ));
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
