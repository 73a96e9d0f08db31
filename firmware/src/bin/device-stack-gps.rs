//! `device-stack` plus the GPS: the same loop, positioned and timed by NMEA sentences split
//! and parsed as the `tracker` does (the `nmea` crate), to show what NMEA parsing costs on
//! top of the device stack. `size.sh` prints it; the budget applies to `device-stack`.
#![no_std]
#![no_main]

#[path = "../budget.rs"]
mod budget;

use core::hint::black_box;

use device_sim::device::Device;
use fleetbeat_firmware::clock::WallClock;
use fleetbeat_firmware::gps::{SentenceSplitter, parse_sentence};

/// Sentences as a u-blox receiver sends them once a second (only `RMC` is parsed).
const NMEA: &[u8] = b"$GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,*76\r\n\
$GPGSA,A,3,10,07,05,02,29,04,08,13,,,,,1.72,1.03,1.38*0A\r\n\
$GPRMC,092750.000,A,5321.6802,N,00630.3372,W,0.02,31.66,280511,,,A*43\r\n\
$GPRMC,092751.000,A,5321.6802,N,00630.3371,W,0.06,31.66,280511,,,A*45\r\n";

/// The receiver's sentences, over and over.
struct NmeaFixes(SentenceSplitter);

impl budget::Positioning for NmeaFixes {
    fn update(&mut self, mono: u64, clock: &mut WallClock, device: &mut Device) {
        for &byte in black_box(NMEA) {
            let Some(sentence) = self.0.push(byte) else {
                continue;
            };
            if let Ok(reading) = parse_sentence(sentence) {
                if let Some(utc) = reading.utc_ms {
                    clock.set(utc, mono);
                }
                match reading.fix {
                    Some(fix) => device.gps_fix(fix),
                    None => device.gps_lost(),
                }
            }
        }
    }
}

#[cortex_m_rt::entry]
fn main() -> ! {
    budget::run(NmeaFixes(SentenceSplitter::new()))
}
