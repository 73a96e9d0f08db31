//! The tracker's wall clock: UTC from the GPS receiver, carried between its readings by the
//! monotonic timer.
//!
//! Sealing needs the real time: the message counter is anchored to it
//! ([`shared::Counter`]), and receivers refuse counters that do not beat the last one they
//! saw, so a tracker whose clock restarted at 0 on every boot would be refused as a replay.
//! The firmware therefore neither ticks the device nor connects before the GPS has told it
//! the time. The `RMC` time is the time of the fix, received some tens of milliseconds later:
//! the clock runs that much behind, which nobody minds.

/// UTC anchored to the monotonic timer. See the [module docs](self).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    /// UTC (ms since the epoch) at a monotonic instant (ms since boot).
    anchor: Option<(u64, u64)>,
}

impl WallClock {
    /// A clock that does not know the time yet.
    pub const fn new() -> Self {
        Self { anchor: None }
    }

    /// The GPS says it is `utc_ms` at the monotonic `mono_ms`.
    pub fn set(&mut self, utc_ms: u64, mono_ms: u64) {
        self.anchor = Some((utc_ms, mono_ms));
    }

    /// Whether the clock knows the time.
    pub const fn is_set(&self) -> bool {
        self.anchor.is_some()
    }

    /// UTC at the monotonic `mono_ms` (ms since the epoch); `None` before the first
    /// [`set`](Self::set).
    pub fn now_ms(&self, mono_ms: u64) -> Option<u64> {
        self.anchor
            .map(|(utc, at)| utc.saturating_add(mono_ms.saturating_sub(at)))
    }
}
