//! Where Socket.IO clients are addressed: the namespaces, and the room names on `/dispatch`
//! (`vehicle:{id}`, `fleet:{fleet}`, `all`) and `/vendor` (`vendor:{store}`).
//!
//! Besides the rooms a dispatcher joins, every socket sits in rooms the bridge puts it in at
//! connect, so that an event for a client identity reaches it whichever bridge it is
//! connected to (through the Socket.IO adapter): its queue identity (`vendor:{store}`,
//! `dispatch:{name}`, see `Grant::queue_client`) and, on `/dispatch`, its token's scope
//! ([`scope_rooms`]: `scope:all`, or `scope:fleet:{fleet}` for each fleet it may see).

use std::fmt;
use std::str::FromStr;

use shared::{FleetId, IdError, VehicleId};
use thiserror::Error;

use crate::domain::auth::Grant;

/// The dispatchers' namespace.
pub(crate) const DISPATCH: &str = "/dispatch";
/// The vendors' (stores') namespace.
pub(crate) const VENDOR: &str = "/vendor";
/// The operators' namespace.
pub(crate) const ADMIN: &str = "/admin";

/// A room a dispatcher can join.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RoomName {
    /// `vehicle:{id}`: one vehicle.
    Vehicle(VehicleId),
    /// `fleet:{fleet}`: every vehicle of a fleet.
    Fleet(FleetId),
    /// `all`: every vehicle.
    All,
}

/// Why a string is not a room name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum RoomError {
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

impl RoomName {
    /// Whether this room covers vehicle `vehicle` of fleet `fleet`.
    pub(crate) fn covers(&self, fleet: &FleetId, vehicle: &VehicleId) -> bool {
        match self {
            Self::All => true,
            Self::Fleet(f) => f == fleet,
            Self::Vehicle(v) => v == vehicle,
        }
    }

    /// Whether the holder of `grant` may join this room; `vehicle_fleet` is the fleet of the
    /// room's vehicle if the bridge knows it.
    pub(crate) fn admits(&self, grant: &Grant, vehicle_fleet: Option<&FleetId>) -> bool {
        match self {
            Self::All => grant.sees_every_fleet(),
            Self::Fleet(fleet) => grant.may_see_fleet(fleet),
            // An unknown vehicle may be joined only by who sees every fleet: its fleet is unknown.
            Self::Vehicle(_) => match vehicle_fleet {
                Some(fleet) => grant.may_see_fleet(fleet),
                None => grant.sees_every_fleet(),
            },
        }
    }
}

/// The rooms that cover one vehicle: its own, its fleet's, and `all`.
pub(crate) fn rooms_of(fleet: &FleetId, vehicle: &VehicleId) -> [String; 3] {
    [
        RoomName::Vehicle(vehicle.clone()).to_string(),
        RoomName::Fleet(fleet.clone()).to_string(),
        RoomName::All.to_string(),
    ]
}

/// The scope rooms a `/dispatch` socket with `grant` is put in at connect: `scope:all` if it
/// sees every fleet, else `scope:fleet:{fleet}` for each fleet it may see. Clients cannot join
/// them (they are not [`RoomName`]s).
pub(crate) fn scope_rooms(grant: &Grant) -> Vec<String> {
    match &grant.fleets {
        None => vec![SCOPE_ALL.to_owned()],
        Some(fleets) => fleets.iter().map(scope_of_fleet).collect(),
    }
}

/// The scope rooms whose sockets may see `fleet`: the [`scope_rooms`] of every grant that
/// may see it.
pub(crate) fn pickup_rooms(fleet: &FleetId) -> [String; 2] {
    [SCOPE_ALL.to_owned(), scope_of_fleet(fleet)]
}

/// The scope room of the sockets that see every fleet.
const SCOPE_ALL: &str = "scope:all";

/// The scope room of the sockets that may see `fleet`.
fn scope_of_fleet(fleet: &FleetId) -> String {
    format!("scope:fleet:{fleet}")
}

/// The room of a vendor's store on `/vendor`: `vendor:{store}`.
pub(crate) fn vendor_room(store: &str) -> String {
    format!("vendor:{store}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::auth::{Role, sample_tokens};

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

    #[test]
    fn scopes_rooms() {
        let t = sample_tokens();
        let north = t
            .authorize(Some("north-only"), "/dispatch", &[Role::Dispatcher])
            .expect("ok");
        let fleet = |f: &str| FleetId::new(f).expect("valid");
        assert!(RoomName::Fleet(fleet("north")).admits(&north, None));
        assert!(!RoomName::Fleet(fleet("south")).admits(&north, None));
        assert!(!RoomName::All.admits(&north, None));
        let v = RoomName::Vehicle(shared::VehicleId::new("v1").expect("valid"));
        assert!(v.admits(&north, Some(&fleet("north"))));
        assert!(!v.admits(&north, Some(&fleet("south"))));
        assert!(!v.admits(&north, None));
    }

    #[test]
    fn scope_rooms_match_pickup_rooms() {
        let t = sample_tokens();
        let north = t
            .authorize(Some("north-only"), "/dispatch", &[Role::Dispatcher])
            .expect("ok");
        let fleet = |f: &str| FleetId::new(f).expect("valid");
        let reaches = |grant: &Grant, f: &str| {
            let rooms = scope_rooms(grant);
            pickup_rooms(&fleet(f)).iter().any(|r| rooms.contains(r))
        };
        assert!(reaches(&north, "north"));
        assert!(!reaches(&north, "south"));
        let every = Grant::system();
        assert!(reaches(&every, "south"));
        for room in scope_rooms(&north).iter().chain(&scope_rooms(&every)) {
            assert!(
                room.parse::<RoomName>().is_err(),
                "{room} must not be joinable"
            );
        }
    }

    #[test]
    fn rooms_cover_their_vehicles() {
        let (north, south) = (
            FleetId::new("north").expect("valid"),
            FleetId::new("south").expect("valid"),
        );
        let v1 = VehicleId::new("v1").expect("valid");
        let v2 = VehicleId::new("v2").expect("valid");
        assert!(RoomName::All.covers(&south, &v2));
        assert!(RoomName::Fleet(north.clone()).covers(&north, &v2));
        assert!(!RoomName::Fleet(north.clone()).covers(&south, &v1));
        assert!(RoomName::Vehicle(v1.clone()).covers(&south, &v1));
        assert!(!RoomName::Vehicle(v1).covers(&north, &v2));
    }
}
