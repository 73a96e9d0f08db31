//! One vehicle's task: its [`Device`], its MQTT session ([`VehicleSession`], the `no_std`
//! protocol state the firmware runs too) and its socket ([`Link`]), driven by one
//! super-loop; see the [runner docs](super).

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shared::{CodecError, Command, OfflineReason};
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at, sleep, sleep_until};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{debug, info, warn};

use super::clock::SimClock;
use super::config::{Chaos, SimConfig};
use super::report::Counters;
use crate::device::{Device, Publication};
use crate::mqtt::{Link, LinkError, SessionClock, TlsTarget};
use crate::secrets::DeviceSecrets;
use crate::session::{
    ConnectRequest, Incoming, LARGEST_PUBLISH, MAX_INFLIGHT, Message, QoS, SendError, Session,
    SessionOptions, VehicleSession,
};

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

/// The MQTT QoS of a publication's level (0 or 1; anything else is refused when published).
fn qos(level: u8) -> QoS {
    QoS::from_level(level).unwrap_or(QoS::ExactlyOnce)
}

/// The session options for a keep-alive (validated to 1 ..= 65 535 whole seconds): a PINGRESP
/// may take as long as the keep-alive.
fn session_options(keep_alive: Duration) -> SessionOptions {
    SessionOptions::new(u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX))
}

/// What a received packet asks of the vehicle, once the session's buffer is let go.
#[derive(Debug)]
enum Input {
    ConnAck,
    /// A command payload, decoded (or why not), and its size.
    Command(Result<Command, CodecError>, usize),
    PubAck {
        pkid: u16,
        tag: Option<Acked>,
    },
    SubAck {
        refused: bool,
    },
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
pub(super) struct Vehicle {
    device: Device,
    mqtt: VehicleSession<Acked>,
    /// The session's milliseconds.
    session_clock: SessionClock,
    broker: Arc<BrokerAccess>,
    /// TLS to the broker (this vehicle's client certificate, if any); `None`: plain TCP.
    tls: Option<TlsTarget>,
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
            command_topic: device.topic(shared::TopicKind::Command).name().to_string(),
            device,
            mqtt: Session::new(session_options(config.keep_alive)),
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
            online: None,
            events_sent_end: 0,
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
            .secrets
            .as_ref()
            .and_then(|s| s.get(self.device.vehicle()))
            .map(|secret| secret.password.as_str());
        let request = ConnectRequest {
            client_id: id,
            login: password.map(|password| (id, password)),
            will: statuses.as_ref().map(|s| message(&s.will)),
        };
        self.mqtt.begin(&request, self.session_clock.now_ms())?;
        self.online = statuses.map(|s| s.online);
        Ok(())
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
                    .write_now(&mut self.mqtt)
                    .and_then(|()| self.on_input())
                {
                    return Ended::Lost(err);
                }
                if self.mqtt.has_output() || !self.flush() {
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
                exchanged = link.exchange(&mut self.mqtt) => {
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
                    if let Err(err) = self.mqtt.on_timer(self.session_clock.now_ms()) {
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
            .mqtt
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
        while self.mqtt.output_room() >= LARGEST_PUBLISH {
            let now = self.session_clock.now_ms();
            // What the packet asks, taken out of the session's receive buffer it borrows.
            let input = match self.mqtt.next_incoming(now)? {
                None => return Ok(()),
                Some(Incoming::ConnAck) => Input::ConnAck,
                Some(Incoming::Publish(publish)) if publish.topic == self.command_topic => {
                    Input::Command(
                        shared::decode::<Command>(publish.payload),
                        publish.payload.len(),
                    )
                }
                Some(Incoming::Publish(publish)) => {
                    debug!(topic = %publish.topic, "ignoring a message on a foreign topic");
                    continue;
                }
                Some(Incoming::PubAck { pkid, tag }) => Input::PubAck { pkid, tag },
                Some(Incoming::SubAck { refused, .. }) => Input::SubAck { refused },
            };
            match input {
                Input::ConnAck => self.on_connected(),
                Input::Command(command, size) => self.on_command(command, size),
                Input::PubAck {
                    tag: Some(Acked::Event(seq)),
                    ..
                } => {
                    let removed = self.device.event_acked(seq) as u64;
                    self.counters
                        .events_acked
                        .fetch_add(removed, Ordering::Relaxed);
                }
                Input::PubAck {
                    tag: Some(Acked::Other),
                    ..
                } => {}
                Input::PubAck { pkid, tag: None } => {
                    debug!(pkid, "an acknowledgement of nothing in flight");
                }
                Input::SubAck { refused } => {
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
        if let Err(err) = self.mqtt.subscribe(
            &self.command_topic,
            QoS::AtLeastOnce,
            self.session_clock.now_ms(),
        ) {
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

    /// Hands up to [`FLUSH_WINDOW`] queued events and heartbeats to the MQTT session, if the
    /// link is up, everything handed over before is written, and PUBACKs are not overdue (at
    /// most [`MAX_INFLIGHT`] QoS 1 publishes unacknowledged); each only while the session's
    /// transmit buffer has room for the largest publish. (A command's ack always fits: a
    /// packet is taken only while there is room for one, see [`on_input`](Self::on_input);
    /// the goodbye writes the output out first if need be.) Returns whether it handed any.
    fn flush(&mut self) -> bool {
        if !self.link_up || !self.mqtt.is_connected() || self.mqtt.has_output() {
            return false;
        }
        let mut handed = 0;
        while handed < FLUSH_WINDOW
            && self.mqtt.in_flight() < MAX_INFLIGHT
            && self.mqtt.output_room() >= LARGEST_PUBLISH
        {
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

    /// Answers a command (`size` bytes on the wire), or counts a bad one.
    fn on_command(&mut self, command: Result<Command, CodecError>, size: usize) {
        let command = match command {
            Ok(command) => command,
            Err(err) => {
                warn!(cause = %err, bytes = size, "ignoring a bad command payload");
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

    /// The link is down: the MQTT session forgets what was in flight, and the device's events in
    /// flight go out again after the reconnect.
    fn link_down(&mut self) {
        if self.link_up {
            self.link_up = false;
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.mqtt.reset();
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
        mut link: Link,
        reason: OfflineReason,
        mut abort: Pin<&mut WaitForCancellationFuture<'_>>,
    ) {
        if !self.link_up {
            return;
        }
        if self.mqtt.output_room() < LARGEST_PUBLISH {
            // Make room for the offline status: write what is queued first.
            tokio::select! {
                biased;
                () = abort.as_mut() => {
                    info!("dropping the connection without a goodbye");
                    return;
                }
                written = tokio::time::timeout(GOODBYE_TIMEOUT, link.write_all(&mut self.mqtt)) => {
                    if !matches!(written, Ok(Ok(()))) {
                        warn!("cannot write out before saying goodbye");
                        return;
                    }
                }
            }
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
        if let Err(err) = self.mqtt.disconnect(self.session_clock.now_ms()) {
            warn!(cause = %err, "cannot disconnect");
            Counters::bump(&self.counters.errors);
            return;
        }
        debug!(reason = reason.as_str(), "saying goodbye");
        tokio::select! {
            biased;
            () = abort.as_mut() => info!("dropping the connection without a goodbye"),
            closed = tokio::time::timeout(GOODBYE_TIMEOUT, link.close(&mut self.mqtt)) => {
                match closed {
                    Ok(Ok(())) => debug!("said goodbye"),
                    Ok(Err(err)) => debug!(cause = %err, "connection closed while saying goodbye"),
                    Err(_) => warn!("goodbye timed out"),
                }
            }
        }
    }

    /// Hands a publication to the MQTT session; logs and counts a failure. Returns whether it was
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
            .mqtt
            .publish(&message(publication), dup, tag, self.session_clock.now_ms())
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
    use super::*;

    /// What one vehicle's MQTT session costs in the simulator's memory (boxed with the rest
    /// of the vehicle): the 256 + 512 bytes of buffers and 20 tags in flight.
    #[test]
    fn a_vehicles_session_stays_small() {
        let size = std::mem::size_of::<VehicleSession<Acked>>();
        println!("VehicleSession<Acked>: {size} bytes");
        assert!(size <= 1200, "{size} bytes");
    }
}
