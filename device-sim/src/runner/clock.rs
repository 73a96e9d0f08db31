//! A vehicle's clocks: the sped-up simulation clock that drives its device, and the
//! real-time clock its seal counters are read from.

use std::time::Duration;

use tokio::time::Instant;

/// A vehicle's clocks: Unix milliseconds read once at start (plus the vehicle's skew), then
/// advanced by the monotonic Tokio clock, so they never jump with the wall clock and match
/// Tokio's timers to the millisecond. The simulation clock runs `scale` times faster.
#[derive(Debug, Clone, Copy)]
pub(super) struct SimClock {
    /// Unix milliseconds at `start`, before the skew.
    epoch_ms: u64,
    /// When the clock started.
    start: Instant,
    /// How much faster than real time the simulation clock runs.
    scale: f64,
    /// The vehicle's clock skew ([`Chaos::clock_skew`](super::Chaos::clock_skew)).
    skew_ms: i64,
}

impl SimClock {
    /// A clock reading `epoch_ms` (plus `skew_ms`) at `start`, its simulation time running
    /// `scale` times faster than real time.
    pub(super) const fn new(epoch_ms: u64, start: Instant, scale: f64, skew_ms: i64) -> Self {
        Self {
            epoch_ms,
            start,
            scale,
            skew_ms,
        }
    }

    fn base_ms(&self) -> u64 {
        self.epoch_ms.saturating_add_signed(self.skew_ms)
    }

    /// Simulation time at `at`.
    pub(super) fn ms_at(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.start).as_secs_f64() * 1000.0;
        // Non-negative and far below 2^53.
        self.base_ms() + (elapsed * self.scale).floor() as u64
    }

    /// Simulation time now.
    pub(super) fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// Real (unscaled) device time now: what seal counters are read from.
    pub(super) fn wall_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.base_ms().saturating_add(elapsed)
    }

    /// The instant at simulation time `ms`: a timer set to it fires when `now_ms() >= ms`.
    pub(super) fn instant_at(&self, ms: u64) -> Instant {
        let sim = ms.saturating_sub(self.base_ms()) as f64;
        self.start + Duration::from_secs_f64(sim / self.scale / 1000.0)
    }

    /// A real-time duration for `ms` of simulation time.
    pub(super) fn real(&self, ms: u32) -> Duration {
        Duration::from_secs_f64(f64::from(ms) / self.scale / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{SimConfig, SimError};
    use super::*;
    use tokio::time::sleep_until;

    #[test]
    fn time_scale_stretches_the_device_interval() {
        let config = SimConfig {
            rate_hz: 2.0,
            time_scale: 60.0,
            ..SimConfig::default()
        };
        assert_eq!(config.heartbeat_interval_ms().expect("valid"), 30_000);
        let clock = SimClock {
            epoch_ms: 1_000_000,
            start: Instant::now(),
            scale: 60.0,
            skew_ms: -500,
        };
        assert_eq!(clock.ms_at(clock.start + Duration::from_secs(1)), 1_059_500);
        assert_eq!(
            clock.instant_at(1_059_500),
            clock.start + Duration::from_secs(1)
        );
        assert_eq!(clock.real(30_000), Duration::from_millis(500));
        for bad in [0.0, -1.0, 1001.0, f64::NAN] {
            let config = SimConfig {
                time_scale: bad,
                ..SimConfig::default()
            };
            assert!(
                matches!(config.validate(), Err(SimError::TimeScale(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn clock_matches_tokio_timers() {
        for scale in [1.0, 50.0] {
            let clock = SimClock {
                epoch_ms: 1_764_230_400_000,
                start: Instant::now(),
                scale,
                skew_ms: 250,
            };
            let due = clock.now_ms() + 12_340;
            sleep_until(clock.instant_at(due)).await;
            // Tokio's timers have millisecond resolution: one real ms is `scale` ms here.
            let late = clock.now_ms() - due;
            assert!(late < scale as u64, "{late} ms late at scale {scale}");
            if scale == 1.0 {
                assert_eq!(late, 0);
            }
        }
    }
}
