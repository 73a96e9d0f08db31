//! [`Identity`]: who a connection authenticated as, and its topic ACL.

use shared::topic::Levels;
use shared::{FleetId, Topic, TopicKind, VehicleId};

use super::credentials::Role;

/// Who a connection authenticated as; decides its topic ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// A vehicle of a fleet (both from the credentials file): publishes only
    /// `fleet/{fleet}/{id}/{hb,event,status,ack}`, subscribes only to `fleet/{fleet}/{id}/cmd`
    /// (or `fleet/+/{id}/cmd`, which matches only its own fleet's commands it may receive).
    Device {
        /// Its vehicle id, also its username and client id.
        id: VehicleId,
        /// Its fleet: the only `{fleet}` level it may use.
        fleet: FleetId,
    },
    /// A named client with a role.
    Client {
        /// Its name in the credentials file.
        name: String,
        /// What it may do.
        role: Role,
    },
    /// Anyone, in open mode: may do everything.
    Anonymous,
    /// Anyone in open mode who connected with keep-alive 0 ("never time out"): a tool or an
    /// observer, not a vehicle, since a vehicle must prove it is alive. May do everything but
    /// publish on vehicle topics (`fleet/{fleet}/{vehicle}/{hb,event,status,ack}`, see
    /// [`is_vehicle_topic`]).
    Tool,
    /// The broker's own listener probe: publishes on the probe topics only.
    Probe,
}

/// Topic prefix the broker's own probes publish on.
pub(crate) const PROBE_TOPIC_PREFIX: &str = "fleetbeat-broker/probe/";

impl Identity {
    /// Whether this identity may publish on `topic`.
    pub(crate) fn may_publish(&self, topic: &[u8]) -> bool {
        match self {
            Identity::Anonymous
            | Identity::Client {
                role: Role::Bridge, ..
            } => true,
            Identity::Client {
                role: Role::Observer,
                ..
            } => false,
            Identity::Tool => !is_vehicle_topic(topic),
            Identity::Probe => topic.starts_with(PROBE_TOPIC_PREFIX.as_bytes()),
            Identity::Device { id, fleet } => std::str::from_utf8(topic)
                .ok()
                .and_then(|t| Topic::parse(t).ok())
                .is_some_and(|t| {
                    &t.vehicle == id && &t.fleet == fleet && t.kind != TopicKind::Command
                }),
        }
    }

    /// Whether this identity may subscribe to `filter`.
    pub(crate) fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Identity::Anonymous | Identity::Tool | Identity::Client { .. } => true,
            Identity::Probe => false,
            Identity::Device { id, fleet } => Levels::split_str(filter).is_some_and(|levels| {
                levels.topic_kind() == Some(TopicKind::Command)
                    && levels.vehicle == id.as_str().as_bytes()
                    && (levels.fleet == b"+" || levels.fleet == fleet.as_str().as_bytes())
            }),
        }
    }

    /// Whether this is a device (counted in `devices_connected`).
    pub(crate) fn is_device(&self) -> bool {
        matches!(self, Identity::Device { .. })
    }

    /// A short description for logs.
    pub(crate) fn describe(&self) -> String {
        match self {
            Identity::Device { id, fleet } => format!("device {id} of fleet {fleet}"),
            Identity::Client { name, role } => format!("{role} {name}"),
            Identity::Anonymous => "anonymous (open mode)".to_owned(),
            Identity::Tool => "anonymous with keep-alive 0 (open mode, not a vehicle)".to_owned(),
            Identity::Probe => "listener probe".to_owned(),
        }
    }
}

/// Whether `topic` is one a vehicle publishes on: `fleet/{fleet}/{vehicle}/{kind}` of any kind
/// but `cmd` (which the bridge publishes to vehicles).
pub(crate) fn is_vehicle_topic(topic: &[u8]) -> bool {
    Levels::split(topic)
        .and_then(|levels| levels.topic_kind())
        .is_some_and(|kind| kind != TopicKind::Command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn van_1_of_north() -> Identity {
        Identity::Device {
            id: VehicleId::new("van-1").unwrap(),
            fleet: FleetId::new("north").unwrap(),
        }
    }

    #[test]
    fn device_acl() {
        let me = van_1_of_north();
        for topic in [
            "fleet/north/van-1/hb",
            "fleet/north/van-1/event",
            "fleet/north/van-1/status",
            "fleet/north/van-1/ack",
        ] {
            assert!(me.may_publish(topic.as_bytes()), "{topic}");
        }
        for topic in [
            "fleet/north/van-2/hb",
            // Another fleet: a device cannot move itself, nor create topics elsewhere.
            "fleet/south/van-1/hb",
            "fleet/south/van-1/event",
            "fleet/south/van-1/status",
            "fleet/south/van-1/ack",
            "fleet/+/van-1/hb",
            "fleet/north/van-1/cmd",
            "fleet/north/van-1/gps",
            "fleet/north/van-1",
            "json/fleet/north/van-1/hb",
            "anything",
        ] {
            assert!(!me.may_publish(topic.as_bytes()), "{topic}");
        }
        assert!(me.may_subscribe("fleet/+/van-1/cmd"));
        assert!(me.may_subscribe("fleet/north/van-1/cmd"));
        for filter in [
            "fleet/+/+/cmd",
            "fleet/+/van-2/cmd",
            "fleet/#",
            "#",
            "fleet/+/van-1/#",
            "fleet/+/van-1/hb",
            "fleet/a+b/van-1/cmd",
            "fleet/south/van-1/cmd",
            "fleet/#/van-1/cmd",
        ] {
            assert!(!me.may_subscribe(filter), "{filter}");
        }
    }

    #[test]
    fn role_acls() {
        let bridge = Identity::Client {
            name: "b".into(),
            role: Role::Bridge,
        };
        let observer = Identity::Client {
            name: "o".into(),
            role: Role::Observer,
        };
        assert!(bridge.may_publish(b"fleet/a/b/cmd") && bridge.may_subscribe("#"));
        assert!(!observer.may_publish(b"fleet/a/b/cmd") && observer.may_subscribe("fleet/#"));
        assert!(Identity::Anonymous.may_publish(b"x") && Identity::Anonymous.may_subscribe("#"));
        // Keep-alive 0 in open mode: anything but a vehicle's publishes.
        let tool = Identity::Tool;
        assert!(tool.may_subscribe("#") && tool.may_publish(b"TopicA/B"));
        assert!(tool.may_publish(b"fleet/a/van-1/cmd") && tool.may_publish(b"fleet/a/hb"));
        for topic in [
            "fleet/a/van-1/hb",
            "fleet/a/van-1/status",
            "fleet/a/van-1/event",
        ] {
            assert!(!tool.may_publish(topic.as_bytes()), "{topic}");
        }
        assert!(Identity::Probe.may_publish(b"fleetbeat-broker/probe/1"));
        assert!(!Identity::Probe.may_publish(b"fleet/a/b/hb"));
        assert!(!Identity::Probe.may_subscribe("#"));
    }
}
