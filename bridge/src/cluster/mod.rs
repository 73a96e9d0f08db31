//! Several bridges behaving as one (issue #15): the latest vehicle state shared through Redis.
//!
//! With a shared MQTT subscription each bridge receives only part of the vehicles' messages,
//! yet each must show every vehicle to its own Socket.IO clients. So every tick each bridge
//! publishes what it heard itself (one message on `fleetbeat:news`, tagged with its instance
//! id) and writes the same latest states into one Redis hash per fleet
//! (`fleetbeat:vehicles:{fleet}`, field = vehicle id), in one round trip. Every bridge
//! subscribes to the channel and merges the others' news into its fleet cache (for the views:
//! positions, liveness, snapshots; not the history, delivery events or metrics of received
//! heartbeats, which belong to the bridge that received them). Newer wins. At start and after
//! every reconnection a bridge loads every fleet hash, so a bridge started later has the whole
//! fleet at once.
//!
//! # Layout
//! - [`news`]: the channel and key names and the JSON encoding.
//! - [`link`]: the task that owns the Redis connection (subscribe, load, publish, reconnect).
//! - [`stats`]: its counters (`fleetbeat_bridge_cluster_*`).
//!
//! The fleet cache's side is `domain::fleet` ([`Fleet::cluster_port`]): the cache hands over a
//! batch per tick by itself, in `Fleet::take_moved`; nothing else in the tick changes.
//!
//! [`Fleet::cluster_port`]: crate::domain::fleet::Fleet::cluster_port

mod link;
mod news;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use redis::{IntoConnectionInfo, ProtocolVersion};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) use stats::ClusterStats;

use crate::domain::fleet::ClusterPort;
use link::Link;

/// How long [`Cluster::start`] waits for the first load of the fleet hashes.
const FIRST_LOAD_WAIT: Duration = Duration::from_secs(5);

/// Why the cluster link could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClusterError {
    /// The Redis URL is not one the client understands (its text is not repeated: it may hold a
    /// password).
    #[error("invalid redis_url: {0}")]
    Url(String),
}

/// What the link to the other bridges needs.
#[derive(Debug, Clone)]
pub(crate) struct ClusterOptions {
    /// `redis://[:password@]host:port[/db]`.
    pub(crate) url: String,
    /// A name for this bridge in its instance id (the MQTT client id is a good one).
    pub(crate) name: String,
    /// The longest wait between two connection attempts.
    pub(crate) max_backoff: Duration,
}

/// The running link to the other bridges.
#[derive(Debug)]
pub(crate) struct Cluster {
    stats: Arc<ClusterStats>,
    task: JoinHandle<()>,
}

impl Cluster {
    /// Starts the link task (it runs until `cancel` fires) and waits until it has loaded the
    /// fleet hashes into the fleet behind `port`, or failed its first attempt, or
    /// [`FIRST_LOAD_WAIT`] passed: a bridge that cannot reach Redis starts anyway and serves
    /// its own state meanwhile.
    ///
    /// # Errors
    /// [`ClusterError::Url`] if the URL cannot be used.
    pub(crate) async fn start(
        options: ClusterOptions,
        port: ClusterPort,
        cancel: CancellationToken,
    ) -> Result<Self, ClusterError> {
        let info = options
            .url
            .as_str()
            .into_connection_info()
            .map_err(|err| ClusterError::Url(format!("{:?}", err.kind())))?;
        // RESP3: one connection both subscribed and writing, messages pushed to us.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))
            .map_err(|err| ClusterError::Url(format!("{:?}", err.kind())))?;
        let instance: Arc<str> = Arc::from(format!(
            "{}-{}-{:08x}",
            options.name,
            std::process::id(),
            fastrand::u32(..)
        ));
        let stats = Arc::new(ClusterStats::default());
        let (ready_tx, ready_rx) = oneshot::channel();
        let link = Link::new(
            client,
            Arc::clone(&instance),
            Arc::clone(&stats),
            options.max_backoff.max(Duration::from_millis(100)),
            ready_tx,
        );
        let task = tokio::spawn(link.run(port, cancel));
        tracing::debug!(%instance, "cluster link started");
        if tokio::time::timeout(FIRST_LOAD_WAIT, ready_rx)
            .await
            .is_err()
        {
            tracing::warn!("cluster: first load from Redis still pending; starting meanwhile");
        }
        Ok(Self { stats, task })
    }

    /// The link's counters (render them with [`ClusterStats::render_into`]).
    pub(crate) fn stats(&self) -> Arc<ClusterStats> {
        Arc::clone(&self.stats)
    }

    /// Waits until the link task has ended (after `cancel`, with the last news flushed).
    pub(crate) async fn stopped(self) {
        if let Err(err) = self.task.await {
            tracing::error!(cause = %err, "cluster link task failed");
        }
    }
}

#[cfg(test)]
mod tests;
