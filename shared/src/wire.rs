//! The message types that travel between vehicles and the rest of the system.
//!
//! Every field has a fixed width or a bounded length: identifiers are `heapless` strings and no
//! field is a `usize`, so an encoding means the same on a 32-bit tracker and a 64-bit server.
//! Integers are postcard varints on the wire (zig-zag for signed ones).

use serde::{Deserialize, Serialize};

use crate::id::OrderId;
use crate::topic::TopicKind;

/// A message type bound to the topic kind that carries it.
pub trait WireMessage: Serialize + for<'de> Deserialize<'de> {
    /// The topic kind this message is published on.
    const KIND: TopicKind;
}

/// A WGS84 position in integer units of 1e-7 degrees (about 1.1 cm at the equator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Position {
    /// Latitude in 1e-7 degrees, -900_000_000 ..= 900_000_000.
    pub lat_e7: i32,
    /// Longitude in 1e-7 degrees, -1_800_000_000 ..= 1_800_000_000.
    pub lon_e7: i32,
}

/// Degrees to 1e-7 degree units, rounded half away from zero; `as` saturates (NaN gives 0).
fn degrees_to_e7(degrees: f64) -> i32 {
    libm::round(degrees * 1e7) as i32
}

impl Position {
    /// Builds a position from 1e-7 degree units.
    pub const fn new(lat_e7: i32, lon_e7: i32) -> Self {
        Self { lat_e7, lon_e7 }
    }

    /// Builds a position from degrees, rounded to the nearest 1e-7 degree (about a centimetre)
    /// and saturated at the `i32` range; check [`Position::is_valid`] for the globe's range.
    pub fn from_degrees(lat: f64, lon: f64) -> Self {
        Self::new(degrees_to_e7(lat), degrees_to_e7(lon))
    }

    /// Latitude and longitude in degrees.
    pub fn to_degrees(&self) -> (f64, f64) {
        (self.lat(), self.lon())
    }

    /// Latitude in degrees.
    pub fn lat(&self) -> f64 {
        f64::from(self.lat_e7) / 1e7
    }

    /// Longitude in degrees.
    pub fn lon(&self) -> f64 {
        f64::from(self.lon_e7) / 1e7
    }

    /// Whether the coordinates lie on the globe.
    pub fn is_valid(&self) -> bool {
        (-900_000_000..=900_000_000).contains(&self.lat_e7)
            && (-1_800_000_000..=1_800_000_000).contains(&self.lon_e7)
    }
}

/// Bit flags describing the vehicle's state at the time of a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusFlags(pub u8);

impl StatusFlags {
    /// The vehicle is moving.
    pub const MOVING: u8 = 1 << 0;
    /// The ignition is on.
    pub const IGNITION: u8 = 1 << 1;
    /// The battery is below its warning level.
    pub const LOW_BATTERY: u8 = 1 << 2;
    /// The GPS has a fix (when clear, the position is the last known one).
    pub const GPS_FIX: u8 = 1 << 3;
    /// The vehicle is carrying out a delivery order.
    pub const ON_ORDER: u8 = 1 << 4;

    /// Whether every bit of `flag` is set.
    pub const fn has(self, flag: u8) -> bool {
        self.0 & flag == flag
    }

    /// Returns the flags with `flag` set or cleared.
    #[must_use]
    pub const fn with(self, flag: u8, on: bool) -> Self {
        if on {
            Self(self.0 | flag)
        } else {
            Self(self.0 & !flag)
        }
    }
}

/// A periodic GPS heartbeat: where the vehicle is and how it is doing. Published at QoS 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Per-vehicle sequence number, incremented for every heartbeat (wraps at `u32::MAX`).
    pub seq: u32,
    /// Device clock, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Current position.
    pub pos: Position,
    /// Ground speed in centimetres per second.
    pub speed_cm_s: u16,
    /// Heading in degrees clockwise from true north, 0 ..= 359.
    pub heading_deg: u16,
    /// Battery charge in percent, 0 ..= 100.
    pub battery_pct: u8,
    /// State flags, see [`StatusFlags`].
    pub flags: StatusFlags,
}

impl WireMessage for Heartbeat {
    const KIND: TopicKind = TopicKind::Heartbeat;
}

/// The step of a delivery an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryKind {
    /// The parcel was picked up at the vendor.
    Pickup,
    /// The parcel is on its way to the customer.
    InTransit,
    /// The parcel was handed to the customer.
    Delivered,
}

impl DeliveryKind {
    /// The name used in JSON and Socket.IO events: `pickup`, `in-transit`, `delivered`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pickup => "pickup",
            Self::InTransit => "in-transit",
            Self::Delivered => "delivered",
        }
    }
}

/// A step in a delivery order's life. Published at QoS 1: never dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryEvent {
    /// Per-vehicle event sequence number, so a receiver can drop re-sent duplicates.
    pub seq: u32,
    /// The order this event is about.
    pub order: OrderId,
    /// Which step happened.
    pub kind: DeliveryKind,
    /// Device clock when it happened, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Where it happened.
    pub pos: Position,
}

impl WireMessage for DeliveryEvent {
    const KIND: TopicKind = TopicKind::Event;
}

/// Why a vehicle went offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OfflineReason {
    /// The device said goodbye (clean shutdown, end of shift).
    Shutdown,
    /// The connection was lost: published by the broker from the device's last will.
    ConnectionLost,
    /// The device shut down because its battery ran out.
    LowBattery,
}

impl OfflineReason {
    /// The name used in JSON and Socket.IO events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::ConnectionLost => "connection-lost",
            Self::LowBattery => "low-battery",
        }
    }
}

/// A vehicle's connectivity, published retained; the device's last will sets it offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    /// The device is connected.
    Online,
    /// The device is not connected, and why.
    Offline(OfflineReason),
}

impl WireMessage for Status {
    const KIND: TopicKind = TopicKind::Status;
}

/// What the dispatcher asks a vehicle to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandKind {
    /// Answer with an ack, nothing else (a liveness check).
    Ping,
    /// Publish heartbeats every `interval_ms` milliseconds while moving.
    SetRate {
        /// The new heartbeat interval in milliseconds.
        interval_ms: u32,
    },
    /// Abandon free driving and return to the depot.
    ReturnToDepot,
    /// Take on a delivery order: drive to `pickup`, then to `dropoff`.
    AssignOrder {
        /// The order to carry out.
        order: OrderId,
        /// Where the parcel is collected (the vendor).
        pickup: Position,
        /// Where the parcel goes (the customer).
        dropoff: Position,
    },
    /// Drop the delivery of `order`: it was cancelled or given to another vehicle. The
    /// vehicle stops where it is and cruises again; it acks `Ok`, or `Invalid` if it is not
    /// delivering that order. Appended last: the variants before it keep their bytes.
    CancelOrder {
        /// The order to drop.
        order: OrderId,
    },
}

/// A command from a dispatcher to one vehicle. Published at QoS 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Identifies the command; the vehicle's [`CommandAck`] carries it back.
    pub id: u32,
    /// What to do.
    pub kind: CommandKind,
}

impl WireMessage for Command {
    const KIND: TopicKind = TopicKind::Command;
}

/// The outcome of a command, as the vehicle reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AckResult {
    /// The command was carried out (or, for an order, accepted).
    Ok,
    /// The vehicle is busy with another order.
    Busy,
    /// The device does not support this command.
    Unsupported,
    /// The command's arguments are out of range.
    Invalid,
}

impl AckResult {
    /// The name used in JSON and Socket.IO events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Busy => "busy",
            Self::Unsupported => "unsupported",
            Self::Invalid => "invalid",
        }
    }
}

/// A vehicle's answer to a [`Command`]. Published at QoS 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    /// The [`Command::id`] this answers.
    pub id: u32,
    /// The outcome.
    pub result: AckResult,
}

impl WireMessage for CommandAck {
    const KIND: TopicKind = TopicKind::Ack;
}

#[cfg(test)]
impl Heartbeat {
    /// The heartbeat the golden-byte tests pin (no flags set).
    pub(crate) fn sample() -> Self {
        Self {
            seq: 1234,
            ts_ms: 1_764_230_400_000,
            pos: Position::new(525_200_000, 134_050_000),
            speed_cm_s: 1389,
            heading_deg: 270,
            battery_pct: 87,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Position;

    #[test]
    fn degrees_round_trip_to_the_nearest_unit() {
        let pos = Position::from_degrees(52.520_000_04, -13.405_000_06);
        assert_eq!(pos, Position::new(525_200_000, -134_050_001));
        assert_eq!(pos.to_degrees(), (52.52, -13.405_000_1));
        assert_eq!(
            Position::from_degrees(90.0, 180.0),
            Position::new(900_000_000, 1_800_000_000)
        );
        assert!(Position::from_degrees(90.0, 180.0).is_valid());
        assert!(
            !Position::from_degrees(1e6, 0.0).is_valid(),
            "saturates, then invalid"
        );
        assert_eq!(Position::from_degrees(f64::NAN, 0.0), Position::new(0, 0));
    }
}
