//! A latency histogram of fixed buckets, updated with atomics from any task: how long each
//! delivery event took from its hand-over to the store to its commit
//! (`Store::event_groups`, rendered as a Prometheus histogram by `metrics::render_store`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The buckets' upper bounds, in microseconds (the last bucket, `+Inf`, is implicit).
pub const BOUNDS_US: [u64; 22] = [
    250, 500, 1_000, 2_000, 3_000, 4_000, 5_000, 6_000, 8_000, 10_000, 12_000, 15_000, 20_000,
    25_000, 30_000, 40_000, 50_000, 75_000, 100_000, 250_000, 500_000, 1_000_000,
];

/// A snapshot of a [`Histogram`]: the count of each bucket (not cumulative; the last one is
/// `+Inf`), and the sum of every observation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latencies {
    /// Observations per bucket: `counts[i]` those above `BOUNDS_US[i - 1]` and at most
    /// `BOUNDS_US[i]`; the last, those above every bound.
    pub counts: [u64; BOUNDS_US.len() + 1],
    /// The sum of every observation, in microseconds.
    pub sum_us: u64,
}

impl Latencies {
    /// How many observations there are.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Counts of observations per bucket, and their sum.
#[derive(Debug, Default)]
pub(super) struct Histogram {
    counts: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `took`.
    pub(super) fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US.partition_point(|&bound| bound < us);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The counts so far.
    pub(super) fn snapshot(&self) -> Latencies {
        Latencies {
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An observation lands in the first bucket whose bound is not below it; one above every
    /// bound in the last.
    #[test]
    fn observations_land_in_their_buckets() {
        let histogram = Histogram::default();
        for us in [0, 250, 251, 5_000, 2_000_000] {
            histogram.observe(Duration::from_micros(us));
        }
        let seen = histogram.snapshot();
        assert_eq!(seen.count(), 5);
        assert_eq!(seen.counts[0], 2, "0 and 250 µs");
        assert_eq!(seen.counts[1], 1, "251 µs");
        assert_eq!(seen.counts[6], 1, "5 ms");
        assert_eq!(seen.counts[BOUNDS_US.len()], 1, "2 s");
        assert_eq!(seen.sum_us, 2_005_501);
    }
}
