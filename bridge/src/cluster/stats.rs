//! What the cluster link counts, for `/metrics` (`fleetbeat_bridge_cluster_*`) and the tests.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The cluster link's counters.
#[derive(Debug, Default)]
pub(crate) struct ClusterStats {
    errors: AtomicU64,
    connects: AtomicU64,
    published: AtomicU64,
    published_vehicles: AtomicU64,
    received: AtomicU64,
    merged_vehicles: AtomicU64,
    loaded_vehicles: AtomicU64,
    rejected: AtomicU64,
    connected: AtomicBool,
}

/// One of the counters of [`ClusterStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterCounter {
    /// A failed connection attempt or a lost connection to Redis.
    Errors,
    /// A successful (re)connection to Redis (subscribed and loaded).
    Connects,
    /// A tick's news published (one PUBLISH and the hash writes, one round trip).
    Published,
    /// A vehicle state in published news.
    PublishedVehicles,
    /// News received from another bridge.
    Received,
    /// A vehicle state from another bridge handed to the fleet cache.
    MergedVehicles,
    /// A vehicle state loaded from the fleet hashes after a (re)connection.
    LoadedVehicles,
    /// News or a stored state that could not be decoded.
    Rejected,
}

impl ClusterCounter {
    const ALL: [Self; 8] = [
        Self::Errors,
        Self::Connects,
        Self::Published,
        Self::PublishedVehicles,
        Self::Received,
        Self::MergedVehicles,
        Self::LoadedVehicles,
        Self::Rejected,
    ];

    /// Name (after `fleetbeat_bridge_`) and help text.
    const fn describe(self) -> (&'static str, &'static str) {
        match self {
            Self::Errors => (
                "cluster_errors_total",
                "Redis connection attempts that failed and connections lost (cluster state).",
            ),
            Self::Connects => (
                "cluster_connects_total",
                "Successful (re)connections to Redis, each followed by a load of the fleet hashes.",
            ),
            Self::Published => (
                "cluster_published_total",
                "Ticks whose news was published to the other bridges (one round trip each).",
            ),
            Self::PublishedVehicles => (
                "cluster_published_vehicles_total",
                "Vehicle states published to the other bridges.",
            ),
            Self::Received => (
                "cluster_received_total",
                "News received from other bridges.",
            ),
            Self::MergedVehicles => (
                "cluster_merged_vehicles_total",
                "Vehicle states from other bridges handed to the fleet cache.",
            ),
            Self::LoadedVehicles => (
                "cluster_loaded_vehicles_total",
                "Vehicle states loaded from Redis after a (re)connection.",
            ),
            Self::Rejected => (
                "cluster_rejected_total",
                "Cluster news or stored states that could not be decoded.",
            ),
        }
    }
}

impl ClusterStats {
    fn cell(&self, counter: ClusterCounter) -> &AtomicU64 {
        match counter {
            ClusterCounter::Errors => &self.errors,
            ClusterCounter::Connects => &self.connects,
            ClusterCounter::Published => &self.published,
            ClusterCounter::PublishedVehicles => &self.published_vehicles,
            ClusterCounter::Received => &self.received,
            ClusterCounter::MergedVehicles => &self.merged_vehicles,
            ClusterCounter::LoadedVehicles => &self.loaded_vehicles,
            ClusterCounter::Rejected => &self.rejected,
        }
    }

    /// Adds `n` to `counter`.
    pub(crate) fn add(&self, counter: ClusterCounter, n: u64) {
        self.cell(counter).fetch_add(n, Ordering::Relaxed);
    }

    /// The value of `counter`.
    pub(crate) fn get(&self, counter: ClusterCounter) -> u64 {
        self.cell(counter).load(Ordering::Relaxed)
    }

    /// Records whether the link to Redis is up.
    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// Whether the link to Redis is up (subscribed, hashes loaded).
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Appends the counters and the `cluster_connected` gauge in the Prometheus text format,
    /// named like the bridge's other metrics (`fleetbeat_bridge_cluster_*`).
    pub(crate) fn render_into(&self, out: &mut String) {
        for counter in ClusterCounter::ALL {
            let (name, help) = counter.describe();
            let _ = writeln!(out, "# HELP fleetbeat_bridge_{name} {help}");
            let _ = writeln!(out, "# TYPE fleetbeat_bridge_{name} counter");
            let _ = writeln!(out, "fleetbeat_bridge_{name} {}", self.get(counter));
        }
        let name = "cluster_connected";
        let _ = writeln!(
            out,
            "# HELP fleetbeat_bridge_{name} 1 while the bridge is connected to Redis."
        );
        let _ = writeln!(out, "# TYPE fleetbeat_bridge_{name} gauge");
        let _ = writeln!(
            out,
            "fleetbeat_bridge_{name} {}",
            u8::from(self.connected())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter() {
        let stats = ClusterStats::default();
        stats.add(ClusterCounter::Errors, 2);
        stats.set_connected(true);
        let mut text = String::new();
        stats.render_into(&mut text);
        assert!(
            text.contains("fleetbeat_bridge_cluster_errors_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetbeat_bridge_cluster_connected 1\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE").count(),
            ClusterCounter::ALL.len() + 1
        );
    }
}
