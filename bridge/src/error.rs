//! Errors of the bridge library.

use thiserror::Error;

/// Why the bridge could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum BridgeError {
    /// The embedded MQTT broker could not be started.
    #[error("embedded broker: {0}")]
    Broker(#[from] broker::BrokerError),
    /// The MQTT URL given for an external broker is not usable.
    #[error("invalid MQTT URL {url:?}: {reason}")]
    MqttUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration is invalid; the message names the key.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The token configuration is invalid.
    #[error("invalid configuration: {0}")]
    Tokens(#[from] crate::domain::auth::TokenConfigError),
    /// The credentials file (read for the device keys) cannot be used.
    #[error("credentials: {0}")]
    Credentials(#[from] broker::CredentialsError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A TLS certificate, key or CA bundle cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The Redis server of the bridges (`redis_url`) cannot be used; `url` is shown without
    /// its password.
    #[error("Redis at {url}: {reason}")]
    Redis {
        /// The URL, its password masked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Another live bridge registered this `client_id` in Redis.
    #[error(
        "client_id {client_id} is in use by another bridge (registered in Redis): give each \
         bridge its own client_id"
    )]
    ClientIdInUse {
        /// The client id.
        client_id: String,
    },
    /// The HTTP listener failed.
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    /// A background task panicked or could not be joined.
    #[error("task {name} failed: {reason}")]
    Task {
        /// Which task.
        name: &'static str,
        /// What happened.
        reason: String,
    },
}
