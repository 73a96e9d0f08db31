//! When the news of the fleet goes out: at once while the load is light, once per tick under
//! load.
//!
//! A position waiting for the next tick waits half a tick on average (5 ms at the default
//! 10 ms) even when the bridge has nothing else to do. So the ticker also wakes when news
//! arrives while none was waiting (`Hub::news`) and, if [`Pace::at_once`] says the load is
//! light, sends it right away. Under load every such flush would carry one or two positions and
//! cost as much as a full batch, so from the configured rate on (`flush_at_once_below`, 2 000
//! positions/s by default) the news waits for the tick and goes out coalesced.
//!
//! The load is the positions sent per second over windows of [`WINDOW`] (the ticks' flushes
//! included, so it is measured again every window and falls when the load does). A window
//! that already carried a window's worth of light load switches to per-tick at once, so a
//! surge does not wait for the window's end. A rate over a window rather than a moving average
//! of each flush's rate: heartbeats reach the bridge in bursts (the broker hands them over in
//! batches), and flushes a few microseconds apart would read as an enormous rate.

use std::time::{Duration, Instant};

/// The window the load is measured over.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);

/// The pace of the flushes: the positions sent in the current window and what the last window
/// measured.
#[derive(Debug, Clone)]
pub(crate) struct Pace {
    /// Positions per second from which news waits for the tick; 0: always.
    light_below: u64,
    window_start: Instant,
    in_window: u64,
    heavy: bool,
}

impl Pace {
    /// No load yet, a window starting at `now`; news goes out at once below `light_below`
    /// positions per second (0: never, always per tick).
    pub(crate) fn new(now: Instant, light_below: u32) -> Self {
        Self {
            light_below: u64::from(light_below),
            window_start: now,
            in_window: 0,
            heavy: light_below == 0,
        }
    }

    /// The positions a window may carry at light load: past them it is heavy.
    fn light_per_window(&self) -> u64 {
        self.light_below * WINDOW.as_millis() as u64 / 1000
    }

    /// Notes a flush at `now` that sent `positions`.
    pub(crate) fn flushed(&mut self, positions: usize, now: Instant) {
        self.in_window = self
            .in_window
            .saturating_add(u64::try_from(positions).unwrap_or(u64::MAX));
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            let per_s = u128::from(self.in_window) * 1_000_000 / elapsed.as_micros().max(1);
            self.heavy = per_s >= u128::from(self.light_below);
            self.window_start = now;
            self.in_window = 0;
        } else if self.in_window >= self.light_per_window() {
            self.heavy = true;
        }
    }

    /// Whether news should go out at once (light load) rather than wait for the tick.
    pub(crate) fn at_once(&self) -> bool {
        !self.heavy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flushes `per_flush` positions every `every` for `flushes` flushes after `start`.
    fn run(
        pace: &mut Pace,
        start: Instant,
        every: Duration,
        per_flush: usize,
        flushes: u32,
    ) -> Instant {
        let mut now = start;
        for _ in 0..flushes {
            now += every;
            pace.flushed(per_flush, now);
        }
        now
    }

    #[test]
    fn light_load_goes_at_once_heavy_load_per_tick_and_back() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0, 2_000);
        assert!(pace.at_once(), "idle");
        // 1 000 vehicles × 1 Hz, each sent at once: one position a millisecond, for a second.
        let now = run(&mut pace, t0, Duration::from_millis(1), 1, 1000);
        assert!(pace.at_once(), "1 000/s is light");
        // The same load in bursts (the broker hands heartbeats over in batches): 20 positions
        // 10 µs apart, then nothing for 20 ms. Still 1 000/s, still light.
        let mut now = now;
        for _ in 0..50 {
            now = run(&mut pace, now, Duration::from_micros(10), 1, 20);
            now += Duration::from_millis(20);
            pace.flushed(0, now);
        }
        assert!(pace.at_once(), "bursts of a light load are light");
        // 10 000 × 1 Hz arriving: the flushes at once carry one each, 10 a millisecond; a
        // window's share of light load (200) is used up within 20 ms of a fresh window, so
        // within 40 ms whenever the surge starts in the window.
        let now = run(&mut pace, now, Duration::from_micros(100), 1, 400);
        assert!(!pace.at_once(), "10 000/s is heavy");
        // Per tick from then on: 100 positions every 10 ms is still heavy, window after window.
        let now = run(&mut pace, now, Duration::from_millis(10), 100, 50);
        assert!(!pace.at_once(), "still heavy");
        // The load drops: the first whole window of empty ticks measures it (within two
        // windows), news goes at once again.
        run(&mut pace, now, Duration::from_millis(10), 0, 21);
        assert!(pace.at_once(), "light again");
    }

    #[test]
    fn a_surge_switches_before_the_window_ends() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0, 2_000);
        pace.flushed(200, t0);
        assert!(
            !pace.at_once(),
            "a window's worth of light load in one flush"
        );
        // A huge flush neither overflows nor panics.
        pace.flushed(usize::MAX, t0 + WINDOW);
        assert!(!pace.at_once());
    }

    #[test]
    fn zero_means_always_per_tick() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0, 0);
        assert!(!pace.at_once(), "idle, still per tick");
        run(&mut pace, t0, Duration::from_millis(10), 0, 30);
        assert!(!pace.at_once(), "no load, still per tick");
    }
}
