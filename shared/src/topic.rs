//! The MQTT topic scheme: `fleet/{fleet}/{vehicle}/{kind}`.
//!
//! | kind     | level    | QoS | retained | direction          |
//! |----------|----------|-----|----------|--------------------|
//! | heartbeat| `hb`     | 0   | no       | vehicle → system   |
//! | event    | `event`  | 1   | no       | vehicle → system   |
//! | status   | `status` | 1   | yes      | vehicle (and LWT)  |
//! | command  | `cmd`    | 1   | no       | system → vehicle   |
//! | ack      | `ack`    | 1   | no       | vehicle → system   |
//!
//! Topics are built into and parsed from fixed-capacity strings: no allocation.

use core::fmt::Write as _;

use crate::error::TopicError;
use crate::id::{FleetId, VehicleId};

/// The first topic level of every Fleetbeat topic.
pub const ROOT: &str = "fleet";

/// A topic name with room for the longest valid topic.
pub type TopicName = heapless::String<80>;

/// The kind of message a topic carries: its last level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicKind {
    /// GPS heartbeats ([`Heartbeat`](crate::Heartbeat)).
    Heartbeat,
    /// Delivery events ([`DeliveryEvent`](crate::DeliveryEvent)).
    Event,
    /// Online/offline status ([`Status`](crate::Status)), retained.
    Status,
    /// Commands to the vehicle ([`Command`](crate::Command)).
    Command,
    /// The vehicle's answers to commands ([`CommandAck`](crate::CommandAck)).
    Ack,
}

impl TopicKind {
    /// Every kind, in wire order.
    pub const ALL: [TopicKind; 5] = [
        Self::Heartbeat,
        Self::Event,
        Self::Status,
        Self::Command,
        Self::Ack,
    ];

    /// The topic level naming this kind.
    pub const fn level(self) -> &'static str {
        match self {
            Self::Heartbeat => "hb",
            Self::Event => "event",
            Self::Status => "status",
            Self::Command => "cmd",
            Self::Ack => "ack",
        }
    }

    /// The kind a topic level names, if any.
    pub fn from_level(level: &str) -> Option<Self> {
        Self::from_level_bytes(level.as_bytes())
    }

    /// The kind a raw topic level names, if any.
    pub fn from_level_bytes(level: &[u8]) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.level().as_bytes() == level)
    }

    /// The MQTT QoS this kind is published and subscribed at.
    pub const fn qos(self) -> u8 {
        match self {
            Self::Heartbeat => 0,
            _ => 1,
        }
    }

    /// Whether messages of this kind are published retained.
    pub const fn retained(self) -> bool {
        matches!(self, Self::Status)
    }

    /// The subscription filter matching this kind for every vehicle: `fleet/+/+/{level}`.
    pub const fn filter(self) -> &'static str {
        match self {
            Self::Heartbeat => "fleet/+/+/hb",
            Self::Event => "fleet/+/+/event",
            Self::Status => "fleet/+/+/status",
            Self::Command => "fleet/+/+/cmd",
            Self::Ack => "fleet/+/+/ack",
        }
    }
}

/// The three levels after `fleet/` of a topic or filter with Fleetbeat's four-level shape,
/// split without allocation and not validated: the fleet and vehicle levels may be wildcards
/// (`+`) or invalid ids, and the kind level any text.
///
/// This is the one place that knows the shape `fleet/{fleet}/{vehicle}/{kind}`: [`Topic::parse`]
/// validates on top of it, and the broker's ACLs, metrics and router link read raw MQTT topic
/// bytes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels<'a> {
    /// The fleet level.
    pub fleet: &'a [u8],
    /// The vehicle level.
    pub vehicle: &'a [u8],
    /// The kind level, as written.
    pub kind: &'a [u8],
}

impl<'a> Levels<'a> {
    /// Splits `fleet/{fleet}/{vehicle}/{kind}`; `None` for any other shape (another root, fewer
    /// or more levels).
    pub fn split(topic: &'a [u8]) -> Option<Self> {
        let mut levels = topic.split(|&b| b == b'/');
        match (
            levels.next(),
            levels.next(),
            levels.next(),
            levels.next(),
            levels.next(),
        ) {
            (Some(root), Some(fleet), Some(vehicle), Some(kind), None)
                if root == ROOT.as_bytes() =>
            {
                Some(Self {
                    fleet,
                    vehicle,
                    kind,
                })
            }
            _ => None,
        }
    }

    /// [`Levels::split`] on a string.
    pub fn split_str(topic: &'a str) -> Option<Self> {
        Self::split(topic.as_bytes())
    }

    /// The kind the last level names, if it names one.
    pub fn topic_kind(&self) -> Option<TopicKind> {
        TopicKind::from_level_bytes(self.kind)
    }

    /// The fleet level as text (`None` if it is not UTF-8).
    pub fn fleet_str(&self) -> Option<&'a str> {
        core::str::from_utf8(self.fleet).ok()
    }

    /// The vehicle level as text (`None` if it is not UTF-8).
    pub fn vehicle_str(&self) -> Option<&'a str> {
        core::str::from_utf8(self.vehicle).ok()
    }
}

/// The kind of a raw MQTT topic with Fleetbeat's shape, checking the shape only (an invalid id
/// still counts): `None` for every other topic.
pub fn kind_of(topic: &[u8]) -> Option<TopicKind> {
    Levels::split(topic).and_then(|levels| levels.topic_kind())
}

/// A parsed, valid Fleetbeat topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    /// The fleet level.
    pub fleet: FleetId,
    /// The vehicle level.
    pub vehicle: VehicleId,
    /// The kind level.
    pub kind: TopicKind,
}

impl Topic {
    /// Bundles the parts of a topic.
    pub const fn new(fleet: FleetId, vehicle: VehicleId, kind: TopicKind) -> Self {
        Self {
            fleet,
            vehicle,
            kind,
        }
    }

    /// Parses `fleet/{fleet}/{vehicle}/{kind}`.
    ///
    /// # Errors
    /// [`TopicError`] if the shape, an id or the kind is invalid.
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let levels = Levels::split_str(topic).ok_or(TopicError::Shape)?;
        let kind = levels.topic_kind().ok_or(TopicError::UnknownKind)?;
        // The levels are slices of a `str` cut at ASCII `/`: always UTF-8.
        let (Some(fleet), Some(vehicle)) = (levels.fleet_str(), levels.vehicle_str()) else {
            return Err(TopicError::Shape);
        };
        let fleet = FleetId::new(fleet).map_err(TopicError::Fleet)?;
        let vehicle = VehicleId::new(vehicle).map_err(TopicError::Vehicle)?;
        Ok(Self::new(fleet, vehicle, kind))
    }

    /// The topic as an MQTT topic name.
    pub fn name(&self) -> TopicName {
        let mut name = TopicName::new();
        // Cannot overflow: ids are at most 24 bytes each, so the topic is at most 62 bytes.
        let _ = write!(
            name,
            "{ROOT}/{}/{}/{}",
            self.fleet,
            self.vehicle,
            self.kind.level()
        );
        name
    }

    /// The same vehicle's topic of another kind.
    #[must_use]
    pub fn with_kind(&self, kind: TopicKind) -> Self {
        Self::new(self.fleet.clone(), self.vehicle.clone(), kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::IdError;

    fn ids() -> (FleetId, VehicleId) {
        (
            FleetId::new("north").expect("valid"),
            VehicleId::new("van-7").expect("valid"),
        )
    }

    #[test]
    fn builds_and_parses_every_kind() {
        let (fleet, vehicle) = ids();
        for kind in TopicKind::ALL {
            let topic = Topic::new(fleet.clone(), vehicle.clone(), kind);
            let name = topic.name();
            assert_eq!(name.as_str(), format!("fleet/north/van-7/{}", kind.level()));
            assert_eq!(Topic::parse(&name), Ok(topic));
        }
    }

    #[test]
    fn longest_topic_fits() {
        let fleet = FleetId::new(&"f".repeat(24)).expect("valid");
        let vehicle = VehicleId::new(&"v".repeat(24)).expect("valid");
        let name = Topic::new(fleet, vehicle, TopicKind::Status).name();
        assert_eq!(name.len(), 62);
    }

    #[test]
    fn rejects_bad_topics() {
        assert_eq!(Topic::parse("fleet/a/b"), Err(TopicError::Shape));
        assert_eq!(Topic::parse("fleet/a/b/hb/x"), Err(TopicError::Shape));
        assert_eq!(Topic::parse("truck/a/b/hb"), Err(TopicError::Shape));
        assert_eq!(Topic::parse(""), Err(TopicError::Shape));
        assert_eq!(Topic::parse("fleet/a/b/gps"), Err(TopicError::UnknownKind));
        assert_eq!(
            Topic::parse("fleet//b/hb"),
            Err(TopicError::Fleet(IdError::Empty))
        );
        assert_eq!(
            Topic::parse("fleet/a/b+/hb"),
            Err(TopicError::Vehicle(IdError::BadChar { found: '+' }))
        );
    }

    #[test]
    fn splits_levels_without_validating() {
        let levels = Levels::split(b"fleet/+/van 7/hb").expect("shape");
        assert_eq!(
            (levels.fleet, levels.vehicle, levels.kind),
            (&b"+"[..], &b"van 7"[..], &b"hb"[..])
        );
        assert_eq!(levels.topic_kind(), Some(TopicKind::Heartbeat));
        assert_eq!(kind_of(b"fleet/x/bad+id/event"), Some(TopicKind::Event));
        assert_eq!(kind_of(b"fleet/x/y/gps"), None);
        assert_eq!(kind_of(b"json/fleet/x/y/hb"), None);
        assert_eq!(Levels::split(b"fleet/a/b"), None);
        assert_eq!(Levels::split(b"fleet/a/b/c/d"), None);
        assert_eq!(
            Levels::split_str("fleet//b/cmd").map(|l| l.fleet),
            Some(&b""[..])
        );
    }

    #[test]
    fn qos_and_retain_rules() {
        assert_eq!(TopicKind::Heartbeat.qos(), 0);
        assert!(TopicKind::ALL[1..].iter().all(|k| k.qos() == 1));
        assert!(TopicKind::Status.retained());
        assert_eq!(
            TopicKind::ALL.iter().filter(|k| k.retained()).count(),
            1,
            "only status is retained"
        );
        for kind in TopicKind::ALL {
            assert_eq!(kind.filter(), format!("fleet/+/+/{}", kind.level()));
        }
    }
}
