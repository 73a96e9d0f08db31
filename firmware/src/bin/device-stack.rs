//! The device stack alone, for its RAM and flash budget (issue #18: ≤ 8 KiB of RAM and
//! ≤ 64 KiB of flash without the network stack): the configuration record parser, the wall
//! clock, the device core with its outbox (64 heartbeats, 32 events), the MQTT session with
//! its buffers, and sealing — the very code of the `tracker` — driven in a loop from canned
//! bytes (a configuration record, broker packets, GPS fixes) through `black_box`, so the
//! compiler keeps every path. No network stack, no executor, no log, no NMEA parsing (that is
//! `device-stack-gps`). `size.sh` measures it and fails above the budget.
//!
//! Not meant to be flashed (it would do nothing useful). The record it parses carries a
//! made-up key: it never leaves this binary.
#![no_std]
#![no_main]

#[path = "../budget.rs"]
mod budget;

use core::hint::black_box;

use device_sim::device::{Device, GpsFix};
use fleetbeat_firmware::clock::WallClock;
use shared::Position;

/// A fix that moves a little every round, and the time set once.
struct CannedFixes;

impl budget::Positioning for CannedFixes {
    fn update(&mut self, mono: u64, clock: &mut WallClock, device: &mut Device) {
        if !clock.is_set() {
            clock.set(black_box(1_764_230_400_000), mono);
        }
        let step = (mono / 250) as i32 % 1_000;
        let fix = GpsFix {
            pos: Position::new(535_511_000 + step, 99_937_000),
            speed_cm_s: black_box(500),
            heading_deg: black_box(90),
        };
        if black_box(step % 97 == 0) {
            device.gps_lost();
        } else {
            device.gps_fix(fix);
        }
    }
}

#[cortex_m_rt::entry]
fn main() -> ! {
    budget::run(CannedFixes)
}
