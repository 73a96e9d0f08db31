//! JSON views of the wire messages, as Socket.IO clients receive them.
//!
//! Units are converted for people: degrees for coordinates, metres per second for speed.
//! `docs/protocol.md` lists the fields.

use serde::Serialize;
use shared::{Heartbeat, Status, StatusFlags, Topic};

/// A `position` event: one heartbeat of one vehicle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionView {
    /// Vehicle id.
    pub vehicle: String,
    /// Fleet id.
    pub fleet: String,
    /// The heartbeat's sequence number.
    pub seq: u32,
    /// Device clock, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
    /// Ground speed in metres per second.
    pub speed_mps: f64,
    /// Heading in degrees clockwise from north.
    pub heading_deg: u16,
    /// Battery charge in percent.
    pub battery_pct: u8,
    /// Raw status flags (see `docs/protocol.md`).
    pub flags: u8,
    /// Whether the vehicle is moving.
    pub moving: bool,
}

impl PositionView {
    /// The view of heartbeat `hb` received on `topic`.
    pub fn new(topic: &Topic, hb: &Heartbeat) -> Self {
        Self {
            vehicle: topic.vehicle.to_string(),
            fleet: topic.fleet.to_string(),
            seq: hb.seq,
            ts_ms: hb.ts_ms,
            lat: hb.pos.lat(),
            lon: hb.pos.lon(),
            speed_mps: f64::from(hb.speed_cm_s) / 100.0,
            heading_deg: hb.heading_deg,
            battery_pct: hb.battery_pct,
            flags: hb.flags.0,
            moving: hb.flags.has(StatusFlags::MOVING),
        }
    }
}

/// A `status` event: a vehicle went online or offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusView {
    /// Vehicle id.
    pub vehicle: String,
    /// Fleet id.
    pub fleet: String,
    /// `online` or `offline`.
    pub status: &'static str,
    /// Why it went offline (`shutdown`, `connection-lost`, `low-battery`), if it did.
    pub reason: Option<&'static str>,
}

impl StatusView {
    /// The view of `status` received on `topic`.
    pub fn new(topic: &Topic, status: &Status) -> Self {
        let (status, reason) = match status {
            Status::Online => ("online", None),
            Status::Offline(reason) => ("offline", Some(reason.as_str())),
        };
        Self {
            vehicle: topic.vehicle.to_string(),
            fleet: topic.fleet.to_string(),
            status,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use shared::{OfflineReason, Position, TopicKind};

    use super::*;

    fn topic() -> Topic {
        Topic::parse("fleet/demo/demo-0001/hb").expect("valid")
    }

    #[test]
    fn position_converts_units() {
        let hb = Heartbeat {
            seq: 5,
            ts_ms: 10,
            pos: Position::new(525_200_000, -134_050_000),
            speed_cm_s: 1250,
            heading_deg: 90,
            battery_pct: 50,
            flags: StatusFlags(StatusFlags::MOVING),
        };
        let json = serde_json::to_value(PositionView::new(&topic(), &hb)).expect("serializes");
        assert_eq!(json["vehicle"], "demo-0001");
        assert_eq!(json["fleet"], "demo");
        assert_eq!(json["lat"], 52.52);
        assert_eq!(json["lon"], -13.405);
        assert_eq!(json["speed_mps"], 12.5);
        assert_eq!(json["moving"], true);
    }

    #[test]
    fn status_names_reason() {
        let topic = topic().with_kind(TopicKind::Status);
        let view = StatusView::new(&topic, &Status::Offline(OfflineReason::ConnectionLost));
        assert_eq!(
            (view.status, view.reason),
            ("offline", Some("connection-lost"))
        );
        assert_eq!(StatusView::new(&topic, &Status::Online).reason, None);
    }
}
