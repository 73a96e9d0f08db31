//! What can go wrong: loading the configuration ([`ConfigError`]), starting the broker
//! ([`BrokerError`]), its TLS files ([`TlsError`]), one probe of a listener ([`ProbeError`]).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::listener::Listener;

/// Why [`config::load`](crate::config::load) refused the configuration. The message names the
/// key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file given with `--config` cannot be read.
    #[error("cannot read the configuration file {}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        #[source]
        source: io::Error,
    },

    /// A layer is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error(
        "invalid configuration{}{}: {message}",
        key.as_ref().map(|k| format!(" key `{k}`")).unwrap_or_default(),
        origin.as_ref().map(|o| format!(" (from {o})")).unwrap_or_default()
    )]
    Layer {
        /// The key at fault, as written in a configuration file, if known.
        key: Option<String>,
        /// Where the value came from: a file, an environment variable, the command line.
        origin: Option<String>,
        /// What is wrong with it.
        message: String,
    },

    /// The values are well-typed but not usable together; see
    /// [`BrokerConfig::validate`](crate::BrokerConfig::validate).
    #[error("invalid configuration: `{field}` {reason}")]
    Invalid {
        /// The key at fault, as written in a configuration file.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why [`Broker::start`](crate::Broker::start) failed, or (only [`BrokerError::Died`]) why a
/// running broker stopped ([`Broker::failed`](crate::Broker::failed)).
///
/// Every variant `start` returns is returned within
/// [`BrokerConfig::startup_timeout`](crate::BrokerConfig) (or sooner): `start` never hangs on
/// a listener that will not come up.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration was rejected before anything was started.
    #[error("invalid broker configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The configuration key at fault, as written in a configuration file (the
        /// [`BrokerConfig`](crate::BrokerConfig) field, `listen`/`listen_v5` for `v4`/`v5`).
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

    /// The address of a TLS listener (`listen_tls`, `listen_tls_v5`) could not be bound, as
    /// for [`BrokerError::Bind`]. Nothing was started.
    #[error("cannot bind the TLS {listener} listener to {addr}")]
    BindTls {
        /// The MQTT version of the TLS listener whose address is unusable.
        listener: Listener,
        /// The address as configured.
        addr: SocketAddr,
        /// The operating system's answer.
        #[source]
        source: io::Error,
    },

    /// The credentials file could not be loaded: nothing was started.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),

    /// The TLS certificate, key or client CA could not be loaded: nothing was started.
    #[error(transparent)]
    Tls(#[from] TlsError),

    /// The journal could not be opened or read: nothing was started.
    #[error(transparent)]
    Journal(#[from] JournalError),

    /// The broker's threads (its network runtime) could not be started.
    #[error("cannot start the broker's threads")]
    Spawn(#[source] io::Error),

    /// rumqttd's router did not register, or dropped, one of the broker's internal
    /// connections (the listener probe, the last-will publisher, the JSON mirror).
    #[error("the broker's router is unavailable: {reason}")]
    RouterUnavailable {
        /// What happened.
        reason: String,
    },

    /// A listener did not pass its end-to-end probe (TCP connect, CONNECT/CONNACK, PUBLISH
    /// delivered through the router) within the startup bound.
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

    /// A part the running broker cannot live without (rumqttd's router thread, the shared
    /// link of device connections, an accept loop) panicked or ended. The broker stopped
    /// accepting and closed every connection: the process should exit with an error and be
    /// restarted (`docs/broker.md`, Thread death).
    #[error("{part} died ({cause}): the broker cannot go on")]
    Died {
        /// The part that died.
        part: &'static str,
        /// How: "it panicked: ...", "it ended".
        cause: String,
    },
}

/// Why one listener probe (TCP connect, MQTT `CONNECT`/`CONNACK`, `PUBLISH`, delivery) failed.
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

    /// The message was published but never delivered through the router.
    #[error("the probe message was not delivered within {0:?}")]
    NotDelivered(Duration),
}

/// What went wrong with the broker's journal ([`BrokerConfig::journal`](crate::BrokerConfig)).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Its directory could not be created.
    #[error("cannot create the journal's directory {}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The operating system's answer.
        #[source]
        source: io::Error,
    },
    /// The file could not be opened, or another broker holds it (its lock did not come
    /// within a second).
    #[error("cannot open the journal {} (is another broker using it?)", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// SQLite's answer.
        #[source]
        source: sqlx::Error,
    },
    /// Its schema could not be set up, or its rows read.
    #[error("cannot read the journal {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// SQLite's answer.
        #[source]
        source: sqlx::Error,
    },
    /// It was written by a newer broker, in a format this one does not know.
    #[error("the journal {} has format {found}; this broker knows format {known} and older", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The format found (`PRAGMA user_version`).
        found: i64,
        /// The newest format this broker knows.
        known: i64,
    },
}

/// What went wrong with the TLS files (`tls_cert`, `tls_key`, `tls_client_ca`), at start or
/// on a reload (which keeps the previous certificate). The message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read, or is not PEM.
    #[error("cannot read the TLS {what} {}: {message}", path.display())]
    Read {
        /// Which file: `certificate`, `key` or `client CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The reader's answer (the operating system's, or what is wrong with the PEM).
        message: String,
    },
    /// A file holds no certificate (or key) at all.
    #[error("the TLS {what} {} holds no {expected}", path.display())]
    Empty {
        /// Which file: `certificate`, `key` or `client CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for in it.
        expected: &'static str,
    },
    /// rustls refused the files: a key that does not match the certificate, an unsupported
    /// key type, a client CA that is not a usable trust anchor.
    #[error("the TLS files {} are not usable: {message}", paths.join(", "))]
    Unusable {
        /// The files involved.
        paths: Vec<String>,
        /// rustls's answer.
        message: String,
    },
}

/// What went wrong with a credentials file.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("cannot read the credentials file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML, or has keys the format does not know.
    #[error("the credentials file {} is not valid: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line.
        message: String,
    },
    /// One entry is invalid.
    #[error("the credentials file {} has an invalid entry `{entry}`: {reason}", path.display())]
    Entry {
        /// The file.
        path: PathBuf,
        /// The entry, e.g. `devices.van-1` or `clients.alice`.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A new entry could not be made (invalid name or password).
    #[error("cannot add `{entry}`: {reason}")]
    Invalid {
        /// The entry, e.g. `devices.van-1`.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file could not be written.
    #[error("cannot write the credentials file {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        #[source]
        source: io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("no randomness available: {0}")]
    Random(String),
}
