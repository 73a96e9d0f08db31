//! [`StoreHealth`]: whether the store can write, as the bridge learns it from its own writes
//! (delivery events, heartbeat batches, probes), for `/readyz`, `/metrics` and the log.
//!
//! The log says it once per change of state (ERROR when writes start failing, WARN when they
//! succeed again), and while an outage lasts a reminder every [`REMIND_EVERY`]: never once per
//! message.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::{error, warn};

/// How often a lasting outage is logged again.
pub(crate) const REMIND_EVERY: Duration = Duration::from_secs(30);

/// An outage under way: when it began, and the latest cause.
#[derive(Debug)]
struct Outage {
    since: Instant,
    cause: String,
    reminded: Instant,
    failures_before: u64,
}

/// What the store's writes have shown lately. Cheap to update from any task.
#[derive(Debug)]
pub(crate) struct StoreHealth {
    writable: AtomicBool,
    failures: AtomicU64,
    outage: Mutex<Option<Outage>>,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            writable: AtomicBool::new(true),
            failures: AtomicU64::new(0),
            outage: Mutex::new(None),
        }
    }
}

/// An outage as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutageReport {
    /// The latest write error.
    pub(crate) cause: String,
    /// How long writes have been failing.
    pub(crate) for_secs: u64,
    /// Writes that failed since it began.
    pub(crate) failures: u64,
}

impl StoreHealth {
    fn outage(&self) -> MutexGuard<'_, Option<Outage>> {
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the latest write succeeded (true until one fails).
    pub(crate) fn writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    /// Writes that failed because the store could not write, since the bridge started.
    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Records that `what` (a delivery event, a heartbeat batch) could not be written because
    /// of `cause`, a failure of the store itself (see `StoreError::is_outage`). `waiting`, the
    /// QoS 1 messages whose PUBACK waits, goes into the log lines.
    pub(crate) fn failed(&self, what: &str, cause: &dyn Display, waiting: u64) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let mut outage = self.outage();
        match outage.as_mut() {
            None => {
                error!(
                    %cause, what, waiting,
                    "the store cannot write: delivery events stay unacknowledged (the broker and \
                     the vehicles keep them) and are retried; heartbeat history is dropped, counted"
                );
                *outage = Some(Outage {
                    since: now,
                    cause: cause.to_string(),
                    reminded: now,
                    failures_before: failures - 1,
                });
            }
            Some(o) => {
                o.cause = cause.to_string();
                if now.duration_since(o.reminded) >= REMIND_EVERY {
                    o.reminded = now;
                    warn!(
                        %cause,
                        for_secs = now.duration_since(o.since).as_secs(),
                        failed_writes = failures - o.failures_before,
                        waiting,
                        "the store still cannot write"
                    );
                }
            }
        }
        self.writable.store(false, Ordering::Relaxed);
    }

    /// Records a successful write: ends an outage (logged once).
    pub(crate) fn succeeded(&self) {
        if self.writable() {
            return;
        }
        let mut outage = self.outage();
        if let Some(o) = outage.take() {
            warn!(
                after_secs = o.since.elapsed().as_secs(),
                failed_writes = self.failures() - o.failures_before,
                "the store writes again"
            );
        }
        self.writable.store(true, Ordering::Relaxed);
    }

    /// The outage under way, if writes are failing.
    pub(crate) fn report(&self) -> Option<OutageReport> {
        if self.writable() {
            return None;
        }
        self.outage().as_ref().map(|o| OutageReport {
            cause: o.cause.clone(),
            for_secs: o.since.elapsed().as_secs(),
            failures: self.failures() - o.failures_before,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_begins_with_a_failure_and_ends_with_a_success() {
        let health = StoreHealth::default();
        assert!(health.writable());
        assert_eq!(health.report(), None);
        health.failed("delivery event", &"database is locked", 1);
        health.failed("heartbeat batch", &"disk I/O error", 1);
        assert!(!health.writable());
        let report = health.report().expect("an outage");
        assert_eq!(report.cause, "disk I/O error");
        assert_eq!(report.failures, 2);
        health.succeeded();
        assert!(health.writable());
        assert_eq!(health.report(), None);
        assert_eq!(health.failures(), 2, "the counter keeps counting");
        health.failed("probe", &"database is locked", 0);
        assert_eq!(health.report().map(|r| r.failures), Some(1));
    }
}
