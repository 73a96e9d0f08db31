//! Socket.IO room names on `/dispatch`.

use std::fmt;
use std::str::FromStr;

use shared::{FleetId, IdError, VehicleId};
use thiserror::Error;

/// A room a dispatcher can join.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RoomName {
    /// `vehicle:{id}`: one vehicle.
    Vehicle(VehicleId),
    /// `fleet:{fleet}`: every vehicle of a fleet.
    Fleet(FleetId),
    /// `all`: every vehicle.
    All,
}

/// Why a string is not a room name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RoomError {
    /// Not of a known form.
    #[error("unknown room form {0:?}: expected vehicle:{{id}}, fleet:{{fleet}} or all")]
    UnknownForm(String),
    /// The id part is not a valid identifier.
    #[error("invalid id in room {room:?}: {cause}")]
    BadId {
        /// The room as given.
        room: String,
        /// What is wrong with the id.
        cause: IdError,
    },
}

impl FromStr for RoomName {
    type Err = RoomError;

    fn from_str(s: &str) -> Result<Self, RoomError> {
        let bad_id = |cause| RoomError::BadId {
            room: s.to_owned(),
            cause,
        };
        match s.split_once(':') {
            Some(("vehicle", id)) => VehicleId::new(id).map(Self::Vehicle).map_err(bad_id),
            Some(("fleet", id)) => FleetId::new(id).map(Self::Fleet).map_err(bad_id),
            None if s == "all" => Ok(Self::All),
            _ => Err(RoomError::UnknownForm(s.chars().take(64).collect())),
        }
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vehicle(id) => write!(f, "vehicle:{id}"),
            Self::Fleet(id) => write!(f, "fleet:{id}"),
            Self::All => f.write_str("all"),
        }
    }
}

/// The rooms that cover one vehicle: its own, its fleet's, and `all`.
pub fn rooms_of(fleet: &FleetId, vehicle: &VehicleId) -> [String; 3] {
    [
        RoomName::Vehicle(vehicle.clone()).to_string(),
        RoomName::Fleet(fleet.clone()).to_string(),
        RoomName::All.to_string(),
    ]
}

/// The room of a vendor's store on `/vendor`: `vendor:{store}`.
pub fn vendor_room(store: &str) -> String {
    format!("vendor:{store}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_rooms() {
        for room in ["vehicle:demo-0001", "fleet:demo", "all"] {
            let parsed: RoomName = room.parse().expect("valid room");
            assert_eq!(parsed.to_string(), room);
        }
    }

    #[test]
    fn rejects_unknown_rooms() {
        assert!(matches!(
            "truck:1".parse::<RoomName>(),
            Err(RoomError::UnknownForm(_))
        ));
        assert!(matches!(
            "".parse::<RoomName>(),
            Err(RoomError::UnknownForm(_))
        ));
        assert!(matches!(
            "vehicle:".parse::<RoomName>(),
            Err(RoomError::BadId { .. })
        ));
        assert!(matches!(
            "fleet:a/b".parse::<RoomName>(),
            Err(RoomError::BadId { .. })
        ));
    }
}
