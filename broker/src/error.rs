//! What can go wrong while starting the broker.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::Listener;

/// Why [`Broker::start`](crate::Broker::start) failed.
///
/// Every variant is returned within [`BrokerConfig::startup_timeout`](crate::BrokerConfig)
/// (or sooner): `start` never hangs on a listener that will not come up.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration was rejected before anything was started.
    #[error("invalid broker configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The [`BrokerConfig`](crate::BrokerConfig) field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A listen address could not be bound: it is already in use, not local, or needs
    /// privileges. Nothing was started.
    #[error("cannot bind the {listener} listener to {addr}")]
    Bind {
        /// The listener whose address is unusable.
        listener: Listener,
        /// The address as configured.
        addr: SocketAddr,
        /// The operating system's answer, e.g. [`io::ErrorKind::AddrInUse`].
        #[source]
        source: io::Error,
    },

    /// The `rumqttd` thread could not be spawned.
    #[error("cannot spawn the broker thread")]
    Spawn(#[source] io::Error),

    /// The `rumqttd` thread ended (returned or panicked) before the broker was ready.
    ///
    /// rumqttd returns once none of its listeners is running, e.g. when every listen
    /// address was taken between our check and its own bind.
    #[error("the broker thread ended during startup: {reason}")]
    ThreadExited {
        /// What the thread reported: rumqttd's error, or the panic message.
        reason: String,
    },

    /// rumqttd's router did not register, or dropped, the broker's internal probe
    /// connection (which is how readiness is proven).
    #[error("the broker's router is unavailable: {reason}")]
    RouterUnavailable {
        /// What happened to the probe connection.
        reason: String,
    },

    /// A listener did not complete an MQTT handshake with this broker's router within the
    /// startup bound, typically because rumqttd could not bind its address (rumqttd only logs
    /// that) or because something else holds the address and does not speak MQTT.
    #[error("the {listener} listener on {addr} was not ready within {timeout:?}")]
    NotReady {
        /// The listener that did not come up.
        listener: Listener,
        /// The address that was probed.
        addr: SocketAddr,
        /// The startup bound that elapsed.
        timeout: Duration,
        /// What the last probe attempt ran into, if any attempt was made.
        #[source]
        last_error: Option<ProbeError>,
    },

    /// The address answers MQTT, but a message published there never reached this broker's
    /// router: another broker took the port between our check and rumqttd's own bind.
    #[error("{addr} answers MQTT but is not this broker's {listener} listener")]
    ForeignListener {
        /// The listener whose address was taken.
        listener: Listener,
        /// The address that was probed.
        addr: SocketAddr,
    },
}

/// Why one readiness probe (TCP connect, MQTT `CONNECT`/`CONNACK`, `PUBLISH`) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connection was not accepted (usually refused: nothing listens yet).
    #[error("TCP connect failed")]
    Connect(#[source] io::Error),

    /// The connection failed while packets were being exchanged.
    #[error("I/O error during the MQTT handshake")]
    Io(#[source] io::Error),

    /// The peer closed the connection before a complete `CONNACK`.
    #[error("connection closed before CONNACK")]
    Closed,

    /// The peer did not answer within the per-attempt bound.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),

    /// The peer answered with something that is not a well-formed `CONNACK`.
    #[error("expected a CONNACK, got {0}")]
    NotConnAck(String),

    /// The peer answered with a `CONNACK` that refuses the connection.
    #[error("CONNACK refused the connection with code {0:#04x}")]
    Refused(u8),
}
