//! The simulator: one tokio task, one [`Device`](crate::device::Device) and one MQTT
//! connection per vehicle.
//!
//! Each vehicle task owns everything of its vehicle: the device, the socket
//! ([`Link`](crate::mqtt::Link)) and the MQTT session
//! ([`VehicleSession`](crate::session::VehicleSession): the `no_std` protocol state machine
//! the firmware runs, see [`crate::session`] and [`crate::mqtt`]), and is a small super-loop over the socket, the heartbeat interval, one
//! timer (keep-alive, timeouts, chaos) and its stop signals. Nothing it does waits on
//! anything but that loop.
//!
//! - Connect (clean session, keep-alive [`SimConfig::keep_alive`], username and password from
//!   the [`DeviceSecrets`](crate::secrets::DeviceSecrets) if given, `TCP_NODELAY`; over TLS
//!   with [`SimConfig::tls`], a failed handshake being a failed connection like any other),
//!   staggered over [`SimConfig::connect_spread`]. Right before each CONNECT the device seals
//!   a fresh `Online` (counter `c`) and last will `Offline(ConnectionLost)` (counter `c + 1`),
//!   and the will goes into that CONNECT.
//! - On every CONNACK: publish `Online` (retained, QoS 1) and subscribe to `.../cmd` at QoS 1;
//!   a clean session forgets subscriptions, so this is redone after every reconnect. Then the
//!   device's [`Outbox`](crate::outbox::Outbox) is flushed: buffered delivery events first,
//!   then the buffered heartbeats, oldest first, up to 16 publishes at a time (as many as the
//!   session's 512-byte transmit buffer takes: 2 of the largest, 4 or 5 heartbeats), each
//!   batch once the previous one is written to the socket. A received packet is taken only
//!   while that buffer has room for the largest publish, so a command's ack always fits.
//! - Heartbeats on `.../hb` at [`SimConfig::heartbeat_qos`], from a per-vehicle interval
//!   whose phases are spread evenly over the interval; the device decides what is due and
//!   queues it, online or not.
//! - Delivery events on `.../event` at QoS 1 leave the device's queue only on their PUBACK:
//!   each is published with its `seq` as the MQTT client's tag, and the PUBACK of its packet
//!   id gives the `seq` back. When the connection drops, the events in flight are sent again
//!   after the reconnect, with DUP set (a clean session has nothing to resume).
//! - Commands from `.../cmd` are acknowledged (PUBACK), decoded (plain, not sealed; a bad
//!   payload is logged and counted) and answered on `.../ack` at QoS 1.
//! - Everything published is sealed with the vehicle's key
//!   ([`Device::publication`](crate::device::Device::publication)).
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
//!
//! # Layout
//! - `config`: [`SimConfig`] and its validation, [`Chaos`], [`SimError`], and the devices a
//!   configuration describes ([`SimConfig::devices`]).
//! - `clock`: a vehicle's simulation and real-time clocks.
//! - `vehicle`: one vehicle's task: connect, converse, flush the outbox, answer commands,
//!   back off and reconnect, say goodbye.
//! - `simulation`: [`Simulation`] (start, stop one vehicle, shut down), [`run`], and the
//!   progress shown on a [`ProgressDisplay`] or logged.
//! - `report`: the live counters and the [`SimReport`] read from them.
//! - `tls`: TLS to the broker ([`TlsConfig`]): the CA file and the per-vehicle client
//!   certificates, read into the rustls configurations the vehicles' links use (one shared by
//!   all without client certificates).

mod clock;
mod config;
mod report;
mod simulation;
mod tls;
mod vehicle;

pub use config::{Chaos, SimConfig, SimError};
pub use report::SimReport;
pub use simulation::{ProgressDisplay, Simulation, StopMode, run, run_with_display};
pub use tls::{TlsConfig, TlsError};
