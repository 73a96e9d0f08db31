//! One vehicle's task: its device core on its MQTT session ([`crate::vehicle::Vehicle`], the
//! `no_std` code path the firmware runs too) and its socket ([`Link`]), driven by one
//! super-loop; see the [runner docs](super). What is the simulator's alone stays here:
//! heartbeat scheduling, chaos, counters, logs, reconnect backoff and the goodbye.

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shared::{AckResult, CodecError, Command, OfflineReason};
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at, sleep, sleep_until};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{debug, info, warn};

use super::clock::SimClock;
use super::config::{Chaos, SimConfig};
use super::report::Counters;
use crate::device::{Device, Payload};
use crate::mqtt::{Link, LinkError, SessionClock, TlsTarget};
use crate::secrets::DeviceSecrets;
use crate::session::{LARGEST_PUBLISH, SendError};
use crate::vehicle::{self, BeginError, Clocks, FlushHook, Happened, PublishError};

/// A vehicle hands at most this many publishes to its connection at once, and the next batch
/// only once they are written to the socket.
const FLUSH_WINDOW: usize = 16;
/// The first reconnect attempt waits about this long; each further one doubles it.
const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// How long a vehicle may take to say goodbye (publish offline, disconnect) on stop.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the TCP connection to the broker (and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The handles that stop one vehicle and tell when it has stopped.
#[derive(Debug, Clone)]
pub(super) struct VehicleControl {
    /// Clean stop; a child of the simulation's shutdown token.
    pub(super) stop: CancellationToken,
    /// Abrupt stop.
    pub(super) abort: CancellationToken,
    /// Cancelled when the vehicle task has ended.
    pub(super) done: CancellationToken,
}

/// The MQTT keep-alive in whole seconds (validated to 1 ..= 65 535): a PINGRESP may take as
/// long as the keep-alive.
fn keep_alive_secs(keep_alive: Duration) -> u16 {
    u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX)
}

/// The clocks a vehicle reads: the session's milliseconds, and the simulation's (sped-up)
/// device time and real sealing time.
struct SimClocks<'a> {
    session: &'a SessionClock,
    sim: &'a SimClock,
}

impl Clocks for SimClocks<'_> {
    fn mono_ms(&self) -> u64 {
        self.session.now_ms()
    }

    fn device_ms(&self) -> u64 {
        self.sim.now_ms()
    }

    fn seal_ms(&self) -> u64 {
        self.sim.wall_ms()
    }
}

/// The simulator's view of a flush: garbles heartbeats ([`Chaos::garbage_rate`]) and counts
/// what went out.
struct SimFlush<'a> {
    rng: &'a mut fastrand::Rng,
    garbage_rate: f64,
    counters: &'a Counters,
    /// Whether the publication being handed over was garbled.
    garbled: bool,
}

impl FlushHook for SimFlush<'_> {
    fn handing(&mut self, payload: &mut Payload, event_seq: Option<u32>) {
        self.garbled =
            event_seq.is_none() && self.garbage_rate > 0.0 && self.rng.f64() < self.garbage_rate;
        if self.garbled {
            garble(self.rng, payload);
        }
    }

    fn handed(&mut self, event_seq: Option<u32>, _dup: bool) {
        let counter = match event_seq {
            Some(_) => &self.counters.events_sent,
            None if self.garbled => &self.counters.garbage_sent,
            None => &self.counters.heartbeats_sent,
        };
        Counters::bump(counter);
    }

    fn refused(&mut self, event_seq: Option<u32>, error: SendError) {
        warn!(cause = %error, "cannot publish the queued message");
        Counters::bump(&self.counters.errors);
        if event_seq.is_none() {
            Counters::bump(&self.counters.heartbeats_dropped);
        }
    }

    fn unsealed(&mut self, error: CodecError) {
        warn!(cause = %error, "cannot seal a queued message");
        Counters::bump(&self.counters.errors);
    }
}

/// Where the vehicles' broker is and how they log in to it; shared by all of them.
#[derive(Debug)]
pub(super) struct BrokerAccess {
    /// The broker's host name or IP address.
    pub(super) host: String,
    /// The broker's TCP port.
    pub(super) port: u16,
    /// Each vehicle's password; `None` in open mode (no login).
    pub(super) secrets: Option<Arc<DeviceSecrets>>,
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

/// One vehicle's task state: the device on its MQTT session, and the simulator's side.
pub(super) struct Vehicle {
    vehicle: vehicle::Vehicle,
    /// The session's milliseconds.
    session_clock: SessionClock,
    broker: Arc<BrokerAccess>,
    /// TLS to the broker (this vehicle's client certificate, if any); `None`: plain TCP.
    tls: Option<TlsTarget>,
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
    /// When [`Chaos::drop_rate`] strikes next.
    next_drop: Option<Instant>,
    /// Whether the current stall (full event queue) was logged.
    stall_reported: bool,
    /// The `seq` of the next delivery event to log.
    next_logged_event: u32,
}

impl Vehicle {
    /// A vehicle that has not connected yet, driving `device` on `clock`; `rng` draws its
    /// backoff jitter and chaos. It connects over TLS if `tls` is given.
    pub(super) fn new(
        device: Device,
        clock: SimClock,
        rng: fastrand::Rng,
        config: &SimConfig,
        broker: Arc<BrokerAccess>,
        tls: Option<TlsTarget>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            tls,
            vehicle: vehicle::Vehicle::with_device(device, keep_alive_secs(config.keep_alive)),
            session_clock: SessionClock::new(),
            broker,
            clock,
            counters,
            rng,
            chaos: config.chaos,
            reconnect_max: config.reconnect_max,
            link_up: false,
            ever_connected: false,
            attempt: 0,
            heartbeat: None,
            next_drop: None,
            stall_reported: false,
            next_logged_event: 0,
        }
    }

    /// Runs the vehicle until `control` stops it: connects after `connect_delay`, then
    /// converses, reconnects and says goodbye as the [runner docs](super) describe.
    pub(super) async fn run(mut self: Box<Self>, control: VehicleControl, connect_delay: Duration) {
        let _done = control.done.clone().drop_guard();
        self.drive(&control, connect_delay).await;
        if self.link_up {
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        let device = self.vehicle.device();
        let outbox = device.outbox();
        debug!(
            heartbeats = device.heartbeat(self.clock.now_ms()).seq,
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
                        at = heartbeat_due(&mut self.heartbeat) => {
                            if self.on_heartbeat(at) != Flow::Continue {
                                return;
                            }
                        }
                    }
                }
            }

            let broker = Arc::clone(&self.broker);
            // A clone (shared configuration, one name): the loop below borrows `self`.
            let tls = self.tls.clone();
            let connected = {
                let mut connect = pin!(Link::connect(
                    &broker.host,
                    broker.port,
                    tls.as_ref(),
                    CONNECT_TIMEOUT
                ));
                loop {
                    tokio::select! {
                        biased;
                        () = abort.as_mut() => return,
                        () = stop.as_mut() => return,
                        connected = &mut connect => break connected,
                        at = heartbeat_due(&mut self.heartbeat) => {
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
                        // Not a connection problem: an id or a login too long for MQTT, or
                        // statuses that cannot be sealed.
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
    fn begin(&mut self) -> Result<(), BeginError> {
        let password = self
            .broker
            .secrets
            .as_ref()
            .and_then(|s| s.get(self.vehicle.device().vehicle()))
            .map(|secret| secret.password.as_str());
        self.vehicle
            .begin(password, self.session_clock.now_ms(), self.clock.wall_ms())
    }

    /// One connection, from the CONNECT queued by [`begin`](Self::begin) until it ends.
    async fn converse(
        &mut self,
        mut link: Link,
        mut abort: Pin<&mut WaitForCancellationFuture<'_>>,
        mut stop: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Ended {
        // One timer for keep-alive, timeouts and chaos, re-armed only when it fires or
        // something is due earlier than it is armed for.
        let mut armed = self.next_timer();
        let mut timer = pin!(sleep_until(armed));
        loop {
            // Write what is queued, take the packets received as far as there is room to
            // answer them, and hand the device's backlog over, as far as the socket takes it
            // without waiting.
            loop {
                if let Err(err) = link
                    .write_now(self.vehicle.session_mut())
                    .and_then(|()| self.on_input())
                {
                    return Ended::Lost(err);
                }
                if self.vehicle.session().has_output() || !self.flush() {
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
                exchanged = link.exchange(self.vehicle.session_mut()) => {
                    match exchanged.and_then(|()| self.on_input()) {
                        Ok(()) => Flow::Continue,
                        Err(err) => return Ended::Lost(err),
                    }
                }
                at = heartbeat_due(&mut self.heartbeat) => self.on_heartbeat(at),
                () = timer.as_mut() => {
                    if self.next_drop.is_some_and(|at| at <= Instant::now()) {
                        return Ended::ChaosDrop;
                    }
                    if let Err(err) = self.vehicle.on_timer(self.session_clock.now_ms()) {
                        return Ended::Lost(err.into());
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

    /// The earliest of the MQTT session's deadline and the next chaos drop; far away if none.
    fn next_timer(&self) -> Instant {
        let drop = self.next_drop.filter(|_| self.link_up);
        let deadline = self
            .vehicle
            .deadline()
            .map(|ms| self.session_clock.instant(ms));
        [deadline, drop]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(24 * 3600))
    }

    /// Handles the complete packets received, as long as the session has room for an
    /// answer (a command's ack): the rest waits until the output is written.
    fn on_input(&mut self) -> Result<(), LinkError> {
        loop {
            let interval = self.vehicle.device().heartbeat_interval_ms();
            let clocks = SimClocks {
                session: &self.session_clock,
                sim: &self.clock,
            };
            let Some(happened) = self.vehicle.next_input(&clocks)? else {
                return Ok(());
            };
            match happened {
                Happened::Connected => self.on_connected(),
                Happened::Command {
                    command,
                    result,
                    ack,
                } => self.on_command(&command, result, ack, interval),
                Happened::BadCommand { error, bytes } => {
                    warn!(cause = %error, bytes, "ignoring a bad command payload");
                    Counters::bump(&self.counters.bad_commands);
                }
                Happened::ForeignPublish => debug!("ignoring a message on a foreign topic"),
                Happened::EventsAcked(removed) => {
                    self.counters
                        .events_acked
                        .fetch_add(removed as u64, Ordering::Relaxed);
                }
                Happened::Acked => {}
                Happened::UnknownAck { pkid } => {
                    debug!(pkid, "an acknowledgement of nothing in flight");
                }
                Happened::Subscribed { refused } => {
                    if refused {
                        warn!(topic = %self.vehicle.command_topic(), "the broker refused the command subscription");
                        Counters::bump(&self.counters.errors);
                    }
                }
            }
        }
    }

    fn on_connected(&mut self) {
        self.link_up = true;
        self.attempt = 0;
        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        if self.ever_connected {
            Counters::bump(&self.counters.reconnects);
            let outbox = self.vehicle.device().outbox();
            info!(
                events_queued = outbox.events_queued(),
                heartbeats_queued = outbox.heartbeats_queued(),
                "reconnected"
            );
        } else {
            debug!("connected");
            self.ever_connected = true;
        }
        // The `Online` status and the command subscription are queued already.
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
        let device = self.vehicle.device_mut();
        let dropped_before = device.outbox().heartbeats_dropped();
        let beat = device.tick(now);
        let dropped = device
            .outbox()
            .heartbeats_dropped()
            .wrapping_sub(dropped_before);
        if dropped > 0 {
            self.counters
                .heartbeats_dropped
                .fetch_add(u64::from(dropped), Ordering::Relaxed);
        }
        self.log_new_events();
        let device = self.vehicle.device();
        if beat.is_some() && device.is_depleted() {
            info!("battery empty, going offline");
            return Flow::Goodbye(OfflineReason::LowBattery);
        }
        match (device.is_stalled(), self.stall_reported) {
            (true, false) => {
                warn!(
                    events_queued = device.outbox().events_queued(),
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
        let device = self.vehicle.device();
        let next = device.next_event_seq();
        if next == self.next_logged_event {
            return;
        }
        let from = self.next_logged_event;
        for event in device
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

    /// Hands up to [`FLUSH_WINDOW`] queued events and heartbeats to the MQTT session
    /// ([`vehicle::Vehicle::flush`]: at most `MAX_INFLIGHT` QoS 1 publishes unacknowledged,
    /// each only while the transmit buffer has room for the largest publish), if the link is
    /// up and everything handed over before is written; heartbeats may be garbled on the way
    /// ([`Chaos::garbage_rate`]). (A command's ack always fits: a packet is taken only while
    /// there is room for one, see [`on_input`](Self::on_input); the goodbye writes the output
    /// out first if need be.) Returns whether it handed any.
    fn flush(&mut self) -> bool {
        if !self.link_up || !self.vehicle.is_connected() || self.vehicle.session().has_output() {
            return false;
        }
        let mut hook = SimFlush {
            rng: &mut self.rng,
            garbage_rate: self.chaos.garbage_rate,
            counters: &self.counters,
            garbled: false,
        };
        let (mono_ms, seal_ms) = (self.session_clock.now_ms(), self.clock.wall_ms());
        self.vehicle
            .flush(mono_ms, seal_ms, FLUSH_WINDOW, &mut hook)
            > 0
    }

    /// Logs and counts a command the vehicle carried out (its ack queued, or why not), and
    /// follows a change of the heartbeat interval (it was `interval` ms).
    fn on_command(
        &mut self,
        command: &Command,
        result: AckResult,
        ack: Result<(), PublishError>,
        interval: u32,
    ) {
        self.log_new_events();
        info!(
            command = command.id,
            kind = ?command.kind,
            result = result.as_str(),
            "command"
        );
        match ack {
            Ok(()) => Counters::bump(&self.counters.commands_answered),
            Err(err) => {
                warn!(cause = %err, "cannot answer the command");
                Counters::bump(&self.counters.errors);
            }
        }
        if self.vehicle.device().heartbeat_interval_ms() != interval && self.heartbeat.is_some() {
            self.heartbeat = Some(self.heartbeat_interval());
        }
    }

    /// The link is down: the MQTT session forgets what was in flight, and the device's events in
    /// flight go out again after the reconnect.
    fn link_down(&mut self) {
        if self.link_up {
            self.link_up = false;
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.vehicle.link_lost();
        self.next_drop = None;
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
        mut link: Link,
        reason: OfflineReason,
        mut abort: Pin<&mut WaitForCancellationFuture<'_>>,
    ) {
        if !self.link_up {
            return;
        }
        if self.vehicle.session().output_room() < LARGEST_PUBLISH {
            // Make room for the offline status: write what is queued first.
            tokio::select! {
                biased;
                () = abort.as_mut() => {
                    info!("dropping the connection without a goodbye");
                    return;
                }
                written = tokio::time::timeout(GOODBYE_TIMEOUT, link.write_all(self.vehicle.session_mut())) => {
                    if !matches!(written, Ok(Ok(()))) {
                        warn!("cannot write out before saying goodbye");
                        return;
                    }
                }
            }
        }
        let unacknowledged = self.vehicle.device().outbox().events_queued();
        if unacknowledged > 0 {
            warn!(
                events = unacknowledged,
                "stopping with delivery events not yet acknowledged"
            );
        }
        let bye = self
            .vehicle
            .device_mut()
            .offline_status(reason, self.clock.wall_ms());
        match bye {
            Ok(bye) => {
                if let Err(err) = self.vehicle.publish(&bye, self.session_clock.now_ms()) {
                    warn!(cause = %err, "cannot publish the offline status");
                    Counters::bump(&self.counters.errors);
                }
            }
            Err(err) => {
                warn!(cause = %err, "cannot seal the offline status");
                Counters::bump(&self.counters.errors);
            }
        }
        if let Err(err) = self
            .vehicle
            .session_mut()
            .disconnect(self.session_clock.now_ms())
        {
            warn!(cause = %err, "cannot disconnect");
            Counters::bump(&self.counters.errors);
            return;
        }
        debug!(reason = reason.as_str(), "saying goodbye");
        tokio::select! {
            biased;
            () = abort.as_mut() => info!("dropping the connection without a goodbye"),
            closed = tokio::time::timeout(GOODBYE_TIMEOUT, link.close(self.vehicle.session_mut())) => {
                match closed {
                    Ok(Ok(())) => debug!("said goodbye"),
                    Ok(Err(err)) => debug!(cause = %err, "connection closed while saying goodbye"),
                    Err(_) => warn!("goodbye timed out"),
                }
            }
        }
    }

    /// An interval on the device's heartbeat phase: its next due time plus whole intervals,
    /// in real time.
    fn heartbeat_interval(&self) -> Interval {
        let device = self.vehicle.device();
        let period = self.clock.real(device.heartbeat_interval_ms());
        let start = device
            .next_heartbeat_ms()
            .map_or_else(Instant::now, |ms| self.clock.instant_at(ms));
        let mut interval = interval_at(start, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        interval
    }
}

/// Replaces a heartbeat's payload by a malformed one: cut short, a flipped bit (the tag no
/// longer matches), or random bytes.
fn garble(rng: &mut fastrand::Rng, payload: &mut Payload) {
    match rng.u8(..3) {
        0 => payload.truncate(rng.usize(..payload.len().max(1))),
        1 => {
            let i = rng.usize(..payload.len().max(1));
            if let Some(byte) = payload.get_mut(i) {
                *byte ^= 1 << rng.u8(..8);
            }
        }
        _ => {
            payload.clear();
            for _ in 0..rng.usize(1..=32) {
                // Cannot overflow: at most 32 of MAX_PAYLOAD bytes.
                let _ = payload.push(rng.u8(..));
            }
        }
    }
}

/// When the next heartbeat is due: the next tick of the heartbeat interval (its scheduled
/// instant); never, while there is no interval.
async fn heartbeat_due(interval: &mut Option<Interval>) -> Instant {
    match interval {
        Some(interval) => interval.tick().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use crate::session::VehicleSession;
    use crate::vehicle::Tag;

    /// What one vehicle's MQTT session costs in the simulator's memory (boxed with the rest
    /// of the vehicle): the 256 + 512 bytes of buffers and 20 tags in flight.
    #[test]
    fn a_vehicles_session_stays_small() {
        let size = std::mem::size_of::<VehicleSession<Tag>>();
        println!("VehicleSession<Tag>: {size} bytes");
        assert!(size <= 1200, "{size} bytes");
    }
}
