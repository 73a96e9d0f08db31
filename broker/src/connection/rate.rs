//! [`PublishRate`]: a connection's publish rate limit (`max_publish_rate`).
//!
//! A throttled connection's socket is not read until the rate allows its next PUBLISH, so TCP
//! pushes back on the client and nothing is lost, only delayed (see `session`).

use std::time::Duration;

use tokio::time::Instant;

/// A connection's publish rate limit: a token bucket of `rate` tokens refilled at `rate` per
/// second; each PUBLISH takes one.
#[derive(Debug, Clone)]
pub(super) struct PublishRate {
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl PublishRate {
    /// A full bucket for `per_second` publishes a second; `None` for 0 (no limit).
    pub(super) fn new(per_second: u32, now: Instant) -> Option<PublishRate> {
        (per_second > 0).then(|| PublishRate {
            rate: f64::from(per_second),
            tokens: f64::from(per_second),
            updated: now,
        })
    }

    /// `None` if a publish may go now, else when it may.
    pub(super) fn wait(&mut self, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.updated = now;
        (self.tokens < 1.0).then(|| now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }

    /// One publish went.
    pub(super) fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_rate_lets_a_burst_through_then_paces() {
        let start = Instant::now();
        assert!(PublishRate::new(0, start).is_none(), "0 is no limit");
        let mut rate = PublishRate::new(10, start).unwrap();
        for _ in 0..10 {
            assert_eq!(rate.wait(start), None);
            rate.take();
        }
        let until = rate.wait(start).expect("the burst is spent");
        assert_eq!(until - start, Duration::from_millis(100));
        assert_eq!(rate.wait(until), None);
        rate.take();
        // Idle time refills, up to one burst.
        let later = until + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(rate.wait(later), None);
            rate.take();
        }
        assert!(rate.wait(later).is_some());
    }
}
