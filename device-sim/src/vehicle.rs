//! The vehicle: the device core ([`Device`], with its outbox) on its MQTT session
//! ([`VehicleSession`]), joined without I/O. Both the simulator's runner and the firmware
//! drive this one code path: they move bytes and time through it, and keep to themselves
//! only what is theirs (sockets, timers, reconnect backoff, logs; the simulator's chaos,
//! counters and goodbye).
//!
//! Per connection: [`Vehicle::begin`] seals this connection's `Online` status and last will
//! and queues the CONNECT; on the CONNACK the `Online` status goes out and the vehicle
//! subscribes to its command topic; from then on [`Vehicle::flush`] hands the outbox over
//! (delivery events at QoS 1, tagged with their `seq`, sent again with DUP after a lost
//! connection), each PUBACK releases its events from the outbox, and each command is carried
//! out and answered with a sealed [`shared::CommandAck`]. [`Vehicle::link_lost`] forgets the
//! connection; the events in flight go out again on the next one.
//!
//! `no_std`, no heap: the firmware keeps one in a static, the simulator one per vehicle task.

use shared::topic::TopicName;
use shared::{AckResult, CodecError, Command, Status, TopicKind};

use crate::device::{CONNECTION_LOST, Device, DeviceConfig, Handover, Payload, Publication};
use crate::session::{
    ConnectRequest, Incoming, LARGEST_PUBLISH, MAX_INFLIGHT, Message, QoS, SendError, SessionError,
    SessionOptions, VehicleSession,
};

/// What a QoS 1 publish was, so its PUBACK can be reported to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// The delivery event with this `seq`.
    Event(u32),
    /// A status, command ack or QoS 1 heartbeat: nothing waits for its PUBACK.
    Other,
}

/// The clocks a [`Vehicle`] reads, each only when it needs it.
pub trait Clocks {
    /// Monotonic milliseconds: the session's keep-alive and timeouts.
    fn mono_ms(&self) -> u64;
    /// The device's time (UTC ms; the simulator's may run faster than real time): what the
    /// device advances to before it carries out a command.
    fn device_ms(&self) -> u64;
    /// Real UTC milliseconds: what seal counters are read from.
    fn seal_ms(&self) -> u64;
}

/// One moment, read once: a monotonic time and a UTC time that is both the device's and the
/// sealing time (as on the firmware, whose device runs in real time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// Monotonic milliseconds.
    pub mono_ms: u64,
    /// UTC milliseconds.
    pub utc_ms: u64,
}

impl Clocks for Moment {
    fn mono_ms(&self) -> u64 {
        self.mono_ms
    }

    fn device_ms(&self) -> u64 {
        self.utc_ms
    }

    fn seal_ms(&self) -> u64 {
        self.utc_ms
    }
}

/// Why a publication the vehicle makes itself (a command's ack) did not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// It could not be sealed.
    #[error("cannot seal it: {0}")]
    Seal(CodecError),
    /// The session did not take it.
    #[error("cannot publish it: {0}")]
    Send(SendError),
}

/// What one packet from the broker did, from [`Vehicle::next_input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    /// The broker accepted the connection: the `Online` status and the command subscription
    /// are queued.
    Connected,
    /// A command was carried out; its ack is queued, or why not.
    Command {
        /// The command.
        command: Command,
        /// Its outcome, as acknowledged.
        result: AckResult,
        /// Whether the ack was queued.
        ack: Result<(), PublishError>,
    },
    /// A command payload that does not decode.
    BadCommand {
        /// Why.
        error: CodecError,
        /// Its size.
        bytes: usize,
    },
    /// A message on a topic that is not the command topic: ignored.
    ForeignPublish,
    /// The broker acknowledged a delivery event; this many left the outbox.
    EventsAcked(usize),
    /// The broker acknowledged a status, command ack or heartbeat.
    Acked,
    /// An acknowledgement of nothing in flight (late or duplicate).
    UnknownAck {
        /// Its packet id.
        pkid: u16,
    },
    /// The broker answered the command subscription.
    Subscribed {
        /// Whether it refused it.
        refused: bool,
    },
}

/// Why [`Vehicle::begin`] could not start a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BeginError {
    /// The statuses could not be sealed.
    #[error("cannot seal the connection statuses: {0}")]
    Seal(CodecError),
    /// The CONNECT could not be queued (an id or login too long).
    #[error("cannot queue the CONNECT: {0}")]
    Connect(SendError),
}

/// What the caller of [`Vehicle::flush`] sees of each queued publication; every method does
/// nothing unless overridden (`()` is the hook that does nothing).
pub trait FlushHook {
    /// The sealed `payload` of the delivery event `event_seq` (`None`: a heartbeat) is about
    /// to be handed to the session; the hook may change it (the simulator's garbage chaos).
    fn handing(&mut self, payload: &mut Payload, event_seq: Option<u32>) {
        let _ = (payload, event_seq);
    }

    /// The session took it; `dup`: a delivery event sent again.
    fn handed(&mut self, event_seq: Option<u32>, dup: bool) {
        let _ = (event_seq, dup);
    }

    /// The session did not take it: a delivery event stays queued, a heartbeat is gone. The
    /// flush stops.
    fn refused(&mut self, event_seq: Option<u32>, error: SendError) {
        let _ = (event_seq, error);
    }

    /// The next queued message could not be sealed. The flush stops.
    fn unsealed(&mut self, error: CodecError) {
        let _ = error;
    }
}

impl FlushHook for () {}

/// The device core and its MQTT session. See the [module docs](self).
#[derive(Debug)]
pub struct Vehicle {
    device: Device,
    session: VehicleSession<Tag>,
    /// The seal counter of the connection's `Online` status, drawn with the will's in
    /// [`begin`](Self::begin) (`Online` is sealed with it on the CONNACK: the same bytes,
    /// without keeping them meanwhile).
    online: Option<u64>,
    /// One past the `seq` of the newest delivery event ever published: an event below it
    /// goes out again with DUP.
    events_sent_end: u32,
}

/// `publication` as a session message (a QoS other than 0 and 1 is refused by the session).
fn message(publication: &Publication) -> Message<'_> {
    sealed_message(
        &publication.topic,
        &publication.payload,
        publication.qos,
        publication.retain,
    )
}

/// A sealed payload for `topic` as a session message.
fn sealed_message<'a>(
    topic: &'a TopicName,
    payload: &'a [u8],
    qos: u8,
    retain: bool,
) -> Message<'a> {
    Message {
        topic: topic.as_str(),
        payload,
        qos: QoS::from_level(qos).unwrap_or(QoS::ExactlyOnce),
        retain,
    }
}

impl Vehicle {
    /// A device made from `config` and `seed` ([`Device::new`]) with an idle session whose
    /// keep-alive is `keep_alive_secs`. Built in place: with
    /// `StaticCell::init_with(|| Vehicle::new(..))` the device (4.4 KiB) is written straight
    /// into the static, never copied through the stack; the session (about 800 B of it) is,
    /// once (measured on the firmware: docs/firmware.md).
    pub fn new(config: DeviceConfig, seed: u64, keep_alive_secs: u16) -> Self {
        Self::with_device(Device::new(config, seed), keep_alive_secs)
    }

    /// `device` with an idle session whose keep-alive is `keep_alive_secs`.
    pub fn with_device(device: Device, keep_alive_secs: u16) -> Self {
        Self {
            device,
            session: VehicleSession::new(SessionOptions::new(keep_alive_secs)),
            online: None,
            events_sent_end: 0,
        }
    }

    /// The device core.
    pub const fn device(&self) -> &Device {
        &self.device
    }

    /// The device core, to feed it GPS fixes and ticks.
    pub const fn device_mut(&mut self) -> &mut Device {
        &mut self.device
    }

    /// The MQTT session.
    pub const fn session(&self) -> &VehicleSession<Tag> {
        &self.session
    }

    /// The MQTT session, to move its bytes (or queue the simulator's goodbye).
    pub const fn session_mut(&mut self) -> &mut VehicleSession<Tag> {
        &mut self.session
    }

    /// The topic commands arrive on (made when asked for: not kept, to keep the vehicle
    /// small).
    pub fn command_topic(&self) -> TopicName {
        self.device.topic(TopicKind::Command).name()
    }

    /// Whether the broker has accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.session.is_connected()
    }

    /// Starts a connection over a freshly opened socket: seals `Online` and the last will at
    /// `seal_ms` (UTC) and queues the CONNECT (with the login, if `password`) at the
    /// monotonic `mono_ms`.
    ///
    /// # Errors
    /// [`BeginError`]: nothing was queued; the session stays idle.
    // Not inlined, as `flush`, `on_connected` and `on_command`: each seals into a topic and
    // a payload of its own (about 220 B), which take the stack only while it runs.
    #[inline(never)]
    pub fn begin(
        &mut self,
        password: Option<&str>,
        mono_ms: u64,
        seal_ms: u64,
    ) -> Result<(), BeginError> {
        // `Online` is sealed with its counter on the CONNACK.
        let counters = self.device.connect_counters(seal_ms);
        let (mut topic, mut payload) = (TopicName::new(), Payload::new());
        let qos = self
            .device
            .seal(&CONNECTION_LOST, counters.will, &mut topic, &mut payload)
            .map_err(BeginError::Seal)?;
        let id = self.device.vehicle().as_str();
        let request = ConnectRequest {
            client_id: id,
            login: password.map(|password| (id, password)),
            will: Some(sealed_message(
                &topic,
                &payload,
                qos,
                TopicKind::Status.retained(),
            )),
        };
        self.session
            .begin(&request, mono_ms)
            .map_err(BeginError::Connect)?;
        self.online = Some(counters.online);
        Ok(())
    }

    /// The bytes to write to the socket.
    pub fn output(&self) -> &[u8] {
        self.session.output()
    }

    /// `n` bytes of [`output`](Self::output) were written.
    pub fn wrote(&mut self, n: usize) {
        self.session.wrote(n);
    }

    /// Where to read socket bytes into; report them with [`received`](Self::received).
    /// Empty while complete packets wait: call [`on_input`](Self::on_input) first (after
    /// writing the output, if it stopped for want of room).
    pub fn receive_buffer(&mut self) -> &mut [u8] {
        self.session.receive_buffer()
    }

    /// `n` bytes were read into [`receive_buffer`](Self::receive_buffer).
    pub fn received(&mut self, n: usize) {
        self.session.received(n);
    }

    /// Hands `bytes` to the session as if read from the socket; returns how many it took.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        self.session.feed(bytes)
    }

    /// When [`on_timer`](Self::on_timer) has something to do (monotonic ms).
    pub fn deadline(&self) -> Option<u64> {
        self.session.deadline()
    }

    /// Keep-alive and timeouts at the monotonic `mono_ms`.
    ///
    /// # Errors
    /// [`SessionError`]: the connection is over; call [`link_lost`](Self::link_lost).
    pub fn on_timer(&mut self, mono_ms: u64) -> Result<(), SessionError> {
        self.session.on_timer(mono_ms)
    }

    /// Takes the next complete packet received and acts on it; `None` if there is none, or
    /// if the transmit buffer has no room for a command's ack (write the output first: the
    /// packet waits). A command is carried out at `clocks`' device time and its ack sealed.
    ///
    /// # Errors
    /// [`SessionError`]: the connection is over; call [`link_lost`](Self::link_lost).
    pub fn next_input(&mut self, clocks: &impl Clocks) -> Result<Option<Happened>, SessionError> {
        if self.session.output_room() < LARGEST_PUBLISH {
            return Ok(None);
        }
        let mono_ms = clocks.mono_ms();
        let Some(incoming) = self.session.next_incoming(mono_ms)? else {
            return Ok(None);
        };
        let happened = match incoming {
            Incoming::ConnAck => {
                self.on_connected(mono_ms);
                Happened::Connected
            }
            Incoming::Publish(publish)
                if publish.topic == self.device.topic(TopicKind::Command).name().as_str() =>
            {
                match shared::decode::<Command>(publish.payload) {
                    Ok(command) => self.on_command(command, clocks),
                    Err(error) => Happened::BadCommand {
                        error,
                        bytes: publish.payload.len(),
                    },
                }
            }
            Incoming::Publish(_) => Happened::ForeignPublish,
            Incoming::PubAck {
                tag: Some(Tag::Event(seq)),
                ..
            } => Happened::EventsAcked(self.device.event_acked(seq)),
            Incoming::PubAck {
                tag: Some(Tag::Other),
                ..
            } => Happened::Acked,
            Incoming::PubAck { pkid, tag: None } => Happened::UnknownAck { pkid },
            Incoming::SubAck { refused, .. } => Happened::Subscribed { refused },
        };
        Ok(Some(happened))
    }

    /// Takes every complete packet received as far as there is room to answer
    /// ([`next_input`](Self::next_input)), and calls `report` with what each did.
    ///
    /// # Errors
    /// [`SessionError`]: the connection is over; call [`link_lost`](Self::link_lost).
    pub fn on_input(
        &mut self,
        clocks: &impl Clocks,
        mut report: impl FnMut(Happened),
    ) -> Result<(), SessionError> {
        while let Some(happened) = self.next_input(clocks)? {
            report(happened);
        }
        Ok(())
    }

    #[inline(never)]
    fn on_connected(&mut self, mono_ms: u64) {
        let (mut topic, mut payload) = (TopicName::new(), Payload::new());
        if let Some(counter) = self.online.take()
            && let Ok(qos) = self
                .device
                .seal(&Status::Online, counter, &mut topic, &mut payload)
        {
            let online = sealed_message(&topic, &payload, qos, TopicKind::Status.retained());
            // Fits: the transmit buffer is empty right after the CONNACK.
            let _ = self.session.publish(&online, false, Tag::Other, mono_ms);
        }
        // A clean session has no subscriptions: subscribe on every connection. Fits as well.
        let topic = self.device.topic(TopicKind::Command).name();
        let _ = self
            .session
            .subscribe(topic.as_str(), QoS::AtLeastOnce, mono_ms);
    }

    #[inline(never)]
    fn on_command(&mut self, command: Command, clocks: &impl Clocks) -> Happened {
        self.device.advance(clocks.device_ms());
        let ack = self.device.handle_command(&command);
        let counter = self.device.next_counter(clocks.seal_ms());
        let (mut topic, mut payload) = (TopicName::new(), Payload::new());
        let sent = match self.device.seal(&ack, counter, &mut topic, &mut payload) {
            Ok(qos) => self
                .session
                .publish(
                    &sealed_message(&topic, &payload, qos, TopicKind::Ack.retained()),
                    false,
                    Tag::Other,
                    clocks.mono_ms(),
                )
                .map(|_| ())
                .map_err(PublishError::Send),
            Err(err) => Err(PublishError::Seal(err)),
        };
        Happened::Command {
            command,
            result: ack.result,
            ack: sent,
        }
    }

    /// Hands up to `limit` queued events and heartbeats to the session, sealed at
    /// `seal_ms`, while the in-flight window ([`MAX_INFLIGHT`]) and the transmit buffer (room
    /// for the largest publish) take them; `hook` sees each. Returns how many it handed over.
    #[inline(never)]
    pub fn flush(
        &mut self,
        mono_ms: u64,
        seal_ms: u64,
        limit: usize,
        hook: &mut impl FlushHook,
    ) -> usize {
        let mut handed = 0;
        let (mut topic, mut payload) = (TopicName::new(), Payload::new());
        while handed < limit
            && self.session.is_connected()
            && self.session.in_flight() < MAX_INFLIGHT
            && self.session.output_room() >= LARGEST_PUBLISH
        {
            let item = match self.device.seal_next(seal_ms, &mut topic, &mut payload) {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(err) => {
                    hook.unsealed(err);
                    break;
                }
            };
            let (dup, tag) = match item.event_seq {
                // Below the end, in wrapping order: published before.
                Some(seq) => (
                    seq.wrapping_sub(self.events_sent_end) > u32::MAX / 2,
                    Tag::Event(seq),
                ),
                None => (false, Tag::Other),
            };
            hook.handing(&mut payload, item.event_seq);
            let message = sealed_message(&topic, &payload, item.qos, item.retain);
            if let Err(err) = self.session.publish(&message, dup, tag, mono_ms) {
                if item.event_seq.is_some() {
                    self.device.event_unsent();
                }
                hook.refused(item.event_seq, err);
                break;
            }
            if let Some(seq) = item.event_seq
                && !dup
            {
                self.events_sent_end = seq.wrapping_add(1);
            }
            hook.handed(item.event_seq, dup);
            handed += 1;
        }
        handed
    }

    /// Publishes a status (or anything else nothing waits the PUBACK of) at `mono_ms`, e.g.
    /// the `Offline` status of a goodbye.
    ///
    /// # Errors
    /// [`SendError`]: the session did not take it.
    pub fn publish(&mut self, publication: &Publication, mono_ms: u64) -> Result<(), SendError> {
        self.session
            .publish(&message(publication), false, Tag::Other, mono_ms)
            .map(|_| ())
    }

    /// The driver pressed "handed over" at UTC `clock_ms`.
    pub fn complete_handover(&mut self, clock_ms: u64) -> Handover {
        self.device.complete_handover(clock_ms)
    }

    /// The connection is gone (socket error, session error): the session forgets it, and
    /// the events in flight go out again on the next one.
    pub fn link_lost(&mut self) {
        self.session.reset();
        self.online = None;
        self.device.connection_lost();
    }
}

#[cfg(test)]
mod tests;
