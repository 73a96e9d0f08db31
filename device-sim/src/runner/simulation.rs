//! A running simulation: every vehicle task started at once, single vehicles stopped, all of
//! them shut down; and its progress, shown live or logged.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shared::{FleetId, VehicleId};
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span};

use super::clock::SimClock;
use super::config::{SimConfig, SimError, vehicle_seed};
use super::report::{Counters, SimReport};
use super::vehicle::{BrokerAccess, Vehicle, VehicleControl};

/// A live view of a running simulation's counters, such as the `device-sim` binary's status
/// line on a terminal. Without one, the simulation logs a `progress` line every
/// [`SimConfig::progress_every`] instead.
pub trait ProgressDisplay: fmt::Debug + Send + Sync {
    /// Shows `report`; `heartbeats_per_s` is the rate of heartbeats sent lately. Called four
    /// times a second.
    fn update(&self, report: &SimReport, heartbeats_per_s: f64);

    /// The simulation has stopped: take the view down.
    fn finish(&self);
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

/// A running simulation: start it, stop single vehicles, shut it down.
#[derive(Debug)]
pub struct Simulation {
    vehicles: Vec<VehicleId>,
    controls: HashMap<VehicleId, VehicleControl>,
    counters: Arc<Counters>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    started: Instant,
    display: Option<Arc<dyn ProgressDisplay>>,
}

impl Simulation {
    /// Validates `config` and spawns every vehicle and the progress logger on the current
    /// Tokio runtime, logging progress lines. [`SimConfig::duration`] is not enforced here
    /// (see [`run`]).
    ///
    /// # Errors
    /// [`SimError`] for an invalid configuration, or [`SimError::NoRuntime`].
    pub fn start(config: SimConfig) -> Result<Self, SimError> {
        Self::start_with_display(config, None)
    }

    /// [`start`](Self::start), showing progress on `display` if there is one (else as log
    /// lines).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    fn start_with_display(
        config: SimConfig,
        display: Option<Arc<dyn ProgressDisplay>>,
    ) -> Result<Self, SimError> {
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
        let max_skew_ms = i64::try_from(config.chaos.clock_skew.as_millis()).unwrap_or(i64::MAX);
        let tls = config.fleet_tls()?;
        let broker = Arc::new(BrokerAccess {
            host: config.broker_host.clone(),
            port: config.broker_port,
            secrets: config.secrets.clone(),
        });

        for (slot, mut device) in (0u32..).zip(devices) {
            let id = device.vehicle().clone();
            let seed = vehicle_seed(config.seed, slot + 1);
            let mut rng = fastrand::Rng::with_seed(seed ^ 0xB0FF);
            let skew_ms = if max_skew_ms > 0 {
                rng.i64(-max_skew_ms..=max_skew_ms)
            } else {
                0
            };
            let clock = SimClock::new(epoch_ms, started, config.time_scale, skew_ms);
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
            let vehicle_tls = match &tls {
                Some(tls) => Some(tls.for_vehicle(&id)?),
                None => None,
            };
            let vehicle = Vehicle::new(
                device,
                clock,
                rng,
                &config,
                Arc::clone(&broker),
                vehicle_tls,
                Arc::clone(&counters),
            );
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
                display.clone(),
                shutdown.clone(),
            ),
            &runtime,
        );
        let fleets: Vec<&str> = config.fleets.iter().map(FleetId::as_str).collect();
        let tls_mode = match &config.tls {
            None => "off",
            Some(tls) if tls.client_cert_dir.is_some() => "mutual",
            Some(_) => "on",
        };
        info!(
            vehicles = n,
            broker = %format_args!(
                "{}://{}:{}",
                if config.tls.is_some() { "mqtts" } else { "mqtt" },
                config.broker_host,
                config.broker_port
            ),
            tls = %tls_mode,
            fleets = %fleets.join(","),
            interval_ms,
            time_scale = config.time_scale,
            heartbeat_qos = config.heartbeat_qos,
            sealed_with = if config.secrets.is_some() { "per-vehicle keys" } else { "open-mode keys" },
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
            display,
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
        if let Some(display) = &self.display {
            display.finish();
        }
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
    run_with_display(config, shutdown, None).await
}

/// [`run`], showing progress on `display` if there is one (such as a live status line on a
/// terminal), else as log lines.
///
/// # Errors
/// As [`run`].
pub async fn run_with_display(
    config: SimConfig,
    shutdown: impl Future<Output = ()>,
    display: Option<Arc<dyn ProgressDisplay>>,
) -> Result<SimReport, SimError> {
    let duration = config.duration;
    let simulation = Simulation::start_with_display(config, display)?;
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

/// Shows the counters: on the display four times a second, or as a log line every `every` if
/// there is no display; until `cancel`.
async fn show_progress(
    counters: Arc<Counters>,
    vehicles: u32,
    started: Instant,
    every: Duration,
    display: Option<Arc<dyn ProgressDisplay>>,
    cancel: CancellationToken,
) {
    let every = if display.is_some() {
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
                if let Some(display) = &display {
                    display.update(&r, rate);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `vehicles` vehicles against `127.0.0.1:port`, all at once, retrying every 200 ms at most.
    fn quick_retries(vehicles: u32, port: u16) -> SimConfig {
        SimConfig {
            vehicles,
            broker_port: port,
            connect_spread: Duration::ZERO,
            reconnect_max: Duration::from_millis(200),
            ..SimConfig::default()
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
        let simulation = Simulation::start(quick_retries(1, port)).expect("starts");
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
        let simulation = Simulation::start(quick_retries(3, port)).expect("starts");
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
