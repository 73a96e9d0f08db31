//! The vehicle: the device core ([`Device`], with its outbox) and its MQTT session
//! ([`VehicleSession`]), joined without I/O. The tracker's network task moves bytes and time
//! through it; the `device-stack` binary drives it from canned bytes to measure its size.
//!
//! Per connection: [`Vehicle::begin`] seals this connection's `Online` status and last will
//! and queues the CONNECT; on the CONNACK the `Online` status goes out and the vehicle
//! subscribes to its command topic; from then on [`Vehicle::flush`] hands the outbox over
//! (delivery events at QoS 1, tagged with their `seq`, sent again with DUP after a lost
//! connection), each PUBACK releases its events from the outbox, and each command is carried
//! out and answered with a sealed [`shared::CommandAck`]. [`Vehicle::link_lost`] forgets the
//! connection; the events in flight go out again on the next one.

use device_sim::device::{Device, DeviceConfig, Handover, Publication};
use device_sim::session::{
    ConnectRequest, Incoming, Message, QoS, SendError, SessionError, SessionOptions, VehicleSession,
};
use shared::topic::TopicName;
use shared::{CodecError, Command, MAX_PAYLOAD, TopicKind};

/// What a QoS 1 publish was, so its PUBACK can be reported to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// The delivery event with this `seq`.
    Event(u32),
    /// A status, command ack or QoS 1 heartbeat: nothing waits for its PUBACK.
    Other,
}

/// Something worth telling the log about, from [`Vehicle::on_input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    /// The broker accepted the connection.
    Connected,
    /// A command was carried out; its ack is queued (or could not be: `acked` false).
    Command {
        /// The command.
        command: Command,
        /// Whether the ack was queued.
        acked: bool,
    },
    /// A command payload that does not decode.
    BadCommand(CodecError),
    /// The broker acknowledged this many delivery events.
    EventsAcked(usize),
    /// The broker refused the command subscription.
    SubscriptionRefused,
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

/// The device core and its MQTT session. See the [module docs](self).
#[derive(Debug)]
pub struct Vehicle {
    device: Device,
    session: VehicleSession<Tag>,
    command_topic: TopicName,
    /// The `Online` status sealed for the connection being made.
    online: Option<Publication>,
    /// One past the `seq` of the newest delivery event ever published: an event below it
    /// goes out again with DUP.
    events_sent_end: u32,
}

/// `publication` as a session message.
fn message(publication: &Publication) -> Message<'_> {
    Message {
        topic: publication.topic.as_str(),
        payload: &publication.payload,
        qos: if publication.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        retain: publication.retain,
    }
}

impl Vehicle {
    /// A device made from `config` and `seed` ([`Device::new`]) with an idle session whose
    /// keep-alive is `keep_alive_secs`. Built in place: with
    /// `StaticCell::init_with(|| Vehicle::new(..))` the device (4.4 KiB) and the session
    /// buffers are written straight into the static, never copied through the stack.
    pub fn new(config: DeviceConfig, seed: u64, keep_alive_secs: u16) -> Self {
        let command_topic = shared::Topic::new(
            config.fleet.clone(),
            config.vehicle.clone(),
            TopicKind::Command,
        )
        .name();
        Self {
            command_topic,
            device: Device::new(config, seed),
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

    /// Whether the broker has accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.session.is_connected()
    }

    /// Starts a connection over a freshly opened socket: seals `Online` and the last will at
    /// `clock_ms` (UTC) and queues the CONNECT (with the login, if `password`) at the
    /// monotonic `mono_ms`.
    ///
    /// # Errors
    /// [`BeginError`]: nothing was queued; the session stays idle.
    pub fn begin(
        &mut self,
        password: Option<&str>,
        mono_ms: u64,
        clock_ms: u64,
    ) -> Result<(), BeginError> {
        let statuses = self
            .device
            .connect_statuses(clock_ms)
            .map_err(BeginError::Seal)?;
        let id = self.device.vehicle().as_str();
        let request = ConnectRequest {
            client_id: id,
            login: password.map(|password| (id, password)),
            will: Some(message(&statuses.will)),
        };
        self.session
            .begin(&request, mono_ms)
            .map_err(BeginError::Connect)?;
        self.online = Some(statuses.online);
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
    /// Empty while complete packets wait: call [`on_input`](Self::on_input) first.
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

    /// Takes every complete packet received, at `mono_ms` (UTC `clock_ms` for what it seals);
    /// calls `report` with what is worth logging.
    ///
    /// # Errors
    /// [`SessionError`]: the connection is over; call [`link_lost`](Self::link_lost).
    pub fn on_input(
        &mut self,
        mono_ms: u64,
        clock_ms: u64,
        mut report: impl FnMut(Happened),
    ) -> Result<(), SessionError> {
        loop {
            let Some(incoming) = self.session.next_incoming(mono_ms)? else {
                return Ok(());
            };
            let happened = match incoming {
                Incoming::ConnAck => {
                    self.on_connected(mono_ms);
                    Some(Happened::Connected)
                }
                Incoming::Publish(publish) if publish.topic == self.command_topic.as_str() => {
                    match shared::decode::<Command>(publish.payload) {
                        Ok(command) => Some(self.on_command(command, mono_ms, clock_ms)),
                        Err(err) => Some(Happened::BadCommand(err)),
                    }
                }
                Incoming::Publish(_) => None,
                Incoming::PubAck {
                    tag: Some(Tag::Event(seq)),
                    ..
                } => Some(Happened::EventsAcked(self.device.event_acked(seq))),
                Incoming::PubAck { .. } => None,
                Incoming::SubAck { refused, .. } => {
                    refused.then_some(Happened::SubscriptionRefused)
                }
            };
            if let Some(happened) = happened {
                report(happened);
            }
        }
    }

    fn on_connected(&mut self, mono_ms: u64) {
        if let Some(online) = self.online.take() {
            // Fits: the transmit buffer is empty right after the CONNACK.
            let _ = self
                .session
                .publish(&message(&online), false, Tag::Other, mono_ms);
        }
        // A clean session has no subscriptions: subscribe on every connection. Fits as well.
        let _ = self
            .session
            .subscribe(self.command_topic.as_str(), QoS::AtLeastOnce, mono_ms);
    }

    fn on_command(&mut self, command: Command, mono_ms: u64, clock_ms: u64) -> Happened {
        self.device.advance(clock_ms);
        let ack = self.device.handle_command(&command);
        let acked = match self.device.publication(&ack, clock_ms) {
            Ok(publication) => self
                .session
                .publish(&message(&publication), false, Tag::Other, mono_ms)
                .is_ok(),
            Err(_) => false,
        };
        Happened::Command { command, acked }
    }

    /// Hands queued events and heartbeats to the session, sealed at `clock_ms`, while the
    /// transmit buffer and the in-flight window take them. Returns how many it handed over.
    pub fn flush(&mut self, mono_ms: u64, clock_ms: u64) -> usize {
        let topic_max = self.command_topic.capacity();
        let mut handed = 0;
        while self.session.is_connected()
            && self
                .session
                .can_publish(topic_max, MAX_PAYLOAD, QoS::AtLeastOnce)
        {
            let Ok(Some(item)) = self.device.next_publication(clock_ms) else {
                break;
            };
            let (dup, tag) = match item.event_seq {
                Some(seq) => {
                    let dup = seq.wrapping_sub(self.events_sent_end) > u32::MAX / 2;
                    (dup, Tag::Event(seq))
                }
                None => (false, Tag::Other),
            };
            let message = message(&item.publication);
            if self.session.publish(&message, dup, tag, mono_ms).is_err() {
                if item.event_seq.is_some() {
                    self.device.event_unsent();
                }
                break;
            }
            if let Some(seq) = item.event_seq
                && !dup
            {
                self.events_sent_end = seq.wrapping_add(1);
            }
            handed += 1;
        }
        handed
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
