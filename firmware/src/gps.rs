//! The GPS receiver's NMEA 0183 output: split into sentences, the `RMC` ones parsed with the
//! `nmea` crate into a [`Reading`]: the UTC time (the device's wall clock, see
//! [`crate::clock`]) and, when the receiver has a fix, a [`GpsFix`] for the device core.
//!
//! `RMC` ("recommended minimum") carries everything a heartbeat needs: time, date, validity,
//! latitude, longitude, speed over ground (knots) and course over ground (degrees). Every
//! receiver sends it once per fix by default; other sentences are skipped unparsed.

use device_sim::device::GpsFix;
use nmea::ParseResult;
use nmea::sentences::rmc::RmcStatusOfFix;
use shared::Position;

/// The longest sentence kept: NMEA 0183 allows 82 characters; some receivers send a little
/// more, the `nmea` crate takes up to 102.
pub const SENTENCE_MAX: usize = 102;
/// Centimetres per second in a knot (1852 m per hour).
const CM_S_PER_KNOT: f32 = 185_200.0 / 3_600.0;

/// What one `RMC` sentence says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// UTC, milliseconds since the Unix epoch, if the receiver knows the time and date (it
    /// often does before it has a fix).
    pub utc_ms: Option<u64>,
    /// The fix; `None` while the receiver has none (status `V`).
    pub fix: Option<GpsFix>,
}

/// Why a sentence was not a [`Reading`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GpsError {
    /// Not an `RMC` sentence (skipped, not an error worth logging).
    #[error("not an RMC sentence")]
    Skipped,
    /// A sentence the `nmea` crate refused: a bad checksum, a garbled field, not ASCII.
    #[error("malformed NMEA sentence")]
    Malformed,
}

/// Parses one sentence (without its line ending) into a [`Reading`].
///
/// # Errors
/// [`GpsError::Skipped`] for sentences other than `RMC`, [`GpsError::Malformed`] for what the
/// `nmea` crate refuses.
pub fn parse_sentence(sentence: &[u8]) -> Result<Reading, GpsError> {
    let is_rmc = sentence.len() > 6 && &sentence[3..6] == b"RMC";
    if !is_rmc {
        return Err(GpsError::Skipped);
    }
    let rmc = match nmea::parse_bytes(sentence) {
        Ok(ParseResult::RMC(rmc)) => rmc,
        Ok(_) => return Err(GpsError::Skipped),
        Err(_) => return Err(GpsError::Malformed),
    };
    let utc_ms = rmc
        .fix_date
        .zip(rmc.fix_time)
        .map(|(date, time)| date.and_time(time).and_utc().timestamp_millis())
        .and_then(|ms| u64::try_from(ms).ok());
    let valid = !matches!(rmc.status_of_fix, RmcStatusOfFix::Invalid);
    let fix = match (valid, rmc.lat, rmc.lon) {
        (true, Some(lat), Some(lon)) => Some(GpsFix {
            pos: Position::from_degrees(lat, lon),
            speed_cm_s: knots_to_cm_s(rmc.speed_over_ground.unwrap_or(0.0)),
            heading_deg: course_to_heading(rmc.true_course.unwrap_or(0.0)),
        }),
        _ => None,
    };
    Ok(Reading { utc_ms, fix })
}

/// Knots to whole centimetres per second, saturating (NaN gives 0).
fn knots_to_cm_s(knots: f32) -> u16 {
    libm::roundf(knots * CM_S_PER_KNOT) as u16
}

/// A course in degrees to a heading in 0 ..= 359.
fn course_to_heading(course: f32) -> u16 {
    (libm::roundf(course) as i32).rem_euclid(360) as u16
}

/// Splits a byte stream into NMEA sentences: from `$` to the end of the line, at most
/// [`SENTENCE_MAX`] bytes (a longer line is dropped whole, as is anything before a `$`).
#[derive(Debug, Clone, Default)]
pub struct SentenceSplitter {
    /// The line so far; it always starts with `$` unless empty.
    line: heapless::Vec<u8, SENTENCE_MAX>,
    /// The current line overflowed: drop it up to its end.
    skipping: bool,
    /// The line was handed out: start afresh on the next byte.
    handed_out: bool,
}

impl SentenceSplitter {
    /// An empty splitter.
    pub const fn new() -> Self {
        Self {
            line: heapless::Vec::new(),
            skipping: false,
            handed_out: false,
        }
    }

    /// Takes one byte; returns the sentence it completes, without the line ending.
    pub fn push(&mut self, byte: u8) -> Option<&[u8]> {
        if core::mem::take(&mut self.handed_out) {
            self.line.clear();
        }
        match byte {
            b'\r' | b'\n' => {
                let complete = !self.skipping && self.line.len() > 1;
                self.skipping = false;
                if complete {
                    self.handed_out = true;
                    return Some(self.line.as_slice());
                }
                self.line.clear();
                None
            }
            b'$' => {
                self.skipping = false;
                self.line.clear();
                // Cannot fail: the line is empty.
                let _ = self.line.push(byte);
                None
            }
            _ if self.skipping || self.line.is_empty() => None,
            _ => {
                if self.line.push(byte).is_err() {
                    self.line.clear();
                    self.skipping = true;
                }
                None
            }
        }
    }
}
