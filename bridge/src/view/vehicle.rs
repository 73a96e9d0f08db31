//! What clients see of vehicles: `position`, `status`, `snapshot` and `ack` events, the
//! vehicle API and the stored track.
//!
//! Units are converted for people: degrees for coordinates ([`shared::Position::to_degrees`]),
//! metres per second for speed. `docs/protocol.md` and `docs/socketio.md` list the fields.

use serde::Serialize;
use serde_json::{Value, json};
use shared::{AckResult, CommandAck, FleetId, Heartbeat, StatusFlags, VehicleId};

use crate::domain::fleet::{VehicleState, VehicleStatus};
use crate::store::HeartbeatRow;

/// A `position`: one heartbeat of one vehicle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct PositionView<'a> {
    /// Vehicle id.
    vehicle: &'a str,
    /// Fleet id.
    fleet: &'a str,
    /// The heartbeat's sequence number.
    seq: u32,
    /// Device clock, milliseconds since the Unix epoch.
    ts_ms: u64,
    /// Latitude in degrees.
    lat: f64,
    /// Longitude in degrees.
    lon: f64,
    /// Ground speed in metres per second.
    speed_mps: f64,
    /// Heading in degrees clockwise from north.
    heading_deg: u16,
    /// Battery charge in percent.
    battery_pct: u8,
    /// Raw status flags (see `docs/protocol.md`).
    flags: u8,
    /// Whether the vehicle is moving.
    moving: bool,
}

impl<'a> PositionView<'a> {
    /// The view of heartbeat `hb` of `vehicle` in `fleet`.
    pub(crate) fn new(fleet: &'a FleetId, vehicle: &'a VehicleId, hb: &Heartbeat) -> Self {
        let (lat, lon) = hb.pos.to_degrees();
        Self {
            vehicle: vehicle.as_str(),
            fleet: fleet.as_str(),
            seq: hb.seq,
            ts_ms: hb.ts_ms,
            lat,
            lon,
            speed_mps: f64::from(hb.speed_cm_s) / 100.0,
            heading_deg: hb.heading_deg,
            battery_pct: hb.battery_pct,
            flags: hb.flags.0,
            moving: hb.flags.has(StatusFlags::MOVING),
        }
    }
}

/// A `StatusChange` of a `status` batch (a vehicle's liveness changed), and the liveness
/// part of a `VehicleState`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct StatusView<'a> {
    /// Vehicle id.
    vehicle: &'a VehicleId,
    /// Its fleet.
    fleet: &'a FleetId,
    /// `online`, `stale` or `offline`.
    status: &'static str,
    /// Why it is (or went) offline or stale.
    reason: Option<&'static str>,
    /// When the bridge last heard from it, ms since the Unix epoch.
    last_seen_ms: u64,
}

impl<'a> StatusView<'a> {
    /// The view of `status`.
    pub(crate) fn new(status: &'a VehicleStatus) -> Self {
        Self {
            vehicle: &status.vehicle,
            fleet: &status.fleet,
            status: status.liveness.as_str(),
            reason: status.reason,
            last_seen_ms: status.last_seen_ms,
        }
    }
}

/// A `VehicleState` (`snapshot`, HTTP API): one vehicle's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct VehicleView<'a> {
    /// Its liveness.
    #[serde(flatten)]
    status: StatusView<'a>,
    /// Its last position, if it sent one.
    position: Option<PositionView<'a>>,
}

impl<'a> VehicleView<'a> {
    /// The view of `state`.
    pub(crate) fn new(state: &'a VehicleState) -> Self {
        let status = &state.status;
        Self {
            status: StatusView::new(status),
            position: state
                .heartbeat
                .as_ref()
                .map(|hb| PositionView::new(&status.fleet, &status.vehicle, hb)),
        }
    }

    /// The views of `states`, in order.
    pub(crate) fn all(states: &'a [VehicleState]) -> Vec<Self> {
        states.iter().map(Self::new).collect()
    }
}

/// An `ack` event: a vehicle answered a command.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AckView<'a> {
    /// Vehicle id.
    vehicle: &'a str,
    /// The command's id.
    command_id: u32,
    /// `ok`, `busy`, `unsupported` or `invalid`.
    result: &'static str,
}

impl<'a> AckView<'a> {
    /// The view of `ack` from `vehicle`.
    pub(crate) fn new(vehicle: &'a VehicleId, ack: &CommandAck) -> Self {
        Self {
            vehicle: vehicle.as_str(),
            command_id: ack.id,
            result: ack.result.as_str(),
        }
    }
}

/// The answer to a command (Socket.IO `command` ack, `POST .../commands`).
pub(crate) fn command_answer(command_id: u32, result: AckResult) -> Value {
    json!({ "command_id": command_id, "result": result.as_str() })
}

/// `GET /api/vehicles/{id}/track?format=json`: the stored heartbeats in time order.
pub(crate) fn track(vehicle: &VehicleId, rows: &[HeartbeatRow]) -> Value {
    json!({
        "vehicle": vehicle,
        "points": rows.iter().map(|r| {
            let (lat, lon) = r.position().to_degrees();
            json!({
                "seq": r.seq, "ts_ms": r.ts_ms, "lat": lat, "lon": lon,
                "speed_mps": f64::from(r.speed_cm_s) / 100.0, "heading_deg": r.heading_deg,
                "battery_pct": r.battery_pct,
            })
        }).collect::<Vec<_>>(),
    })
}

/// `GET /api/vehicles/{id}/track?format=geojson`: a GeoJSON `Feature` with a `LineString`.
pub(crate) fn track_geojson(vehicle: &VehicleId, rows: &[HeartbeatRow]) -> Value {
    json!({
        "type": "Feature",
        "properties": {
            "vehicle": vehicle,
            "timestamps_ms": rows.iter().map(|r| r.ts_ms).collect::<Vec<_>>(),
        },
        "geometry": {
            "type": "LineString",
            "coordinates": rows.iter().map(|r| {
                let (lat, lon) = r.position().to_degrees();
                [lon, lat]
            }).collect::<Vec<_>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use shared::Position;

    use super::*;

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
        let (fleet, vehicle) = (
            FleetId::new("demo").expect("valid"),
            VehicleId::new("demo-0001").expect("valid"),
        );
        let json =
            serde_json::to_value(PositionView::new(&fleet, &vehicle, &hb)).expect("serializes");
        assert_eq!(json["vehicle"], "demo-0001");
        assert_eq!(json["fleet"], "demo");
        assert_eq!(json["lat"], 52.52);
        assert_eq!(json["lon"], -13.405);
        assert_eq!(json["speed_mps"], 12.5);
        assert_eq!(json["moving"], true);
    }

    /// The field order of the event payloads is part of the protocol's look: pin it.
    #[test]
    fn vehicle_state_and_status_shapes() {
        use crate::domain::fleet::Liveness;
        let (fleet, vehicle) = (
            FleetId::new("demo").expect("valid"),
            VehicleId::new("v1").expect("valid"),
        );
        let state = VehicleState {
            status: VehicleStatus {
                vehicle: vehicle.clone(),
                fleet: fleet.clone(),
                liveness: Liveness::Stale,
                reason: Some("missed-heartbeats"),
                last_seen_ms: 7,
            },
            heartbeat: None,
        };
        assert_eq!(
            serde_json::to_string(&VehicleView::new(&state)).expect("serializes"),
            r#"{"vehicle":"v1","fleet":"demo","status":"stale","reason":"missed-heartbeats","last_seen_ms":7,"position":null}"#
        );
        let change = VehicleStatus {
            vehicle,
            fleet,
            liveness: Liveness::Offline,
            reason: Some("connection-lost"),
            last_seen_ms: 9,
        };
        assert_eq!(
            serde_json::to_string(&StatusView::new(&change)).expect("serializes"),
            r#"{"vehicle":"v1","fleet":"demo","status":"offline","reason":"connection-lost","last_seen_ms":9}"#
        );
    }
}
