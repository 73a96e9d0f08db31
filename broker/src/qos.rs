//! Delivery QoS: what a subscriber is granted, and the QoS each message is delivered at,
//! min(publish QoS, granted QoS), which rumqttd's router does not keep.
//!
//! rumqttd 0.20 forwards every message at the QoS of the subscription it matched, whatever
//! QoS it was published at: a QoS 0 publish reaches a QoS 1 subscriber as QoS 1. It keeps
//! each publish's MQTT 5 properties in its commit log, though, so the front end carries the
//! original QoS there, as a user property [`MARKER`], and delivers at the minimum:
//!
//! - only where the receiver could not infer it: on Fleetbeat's `fleet/{f}/{v}/{kind}`
//!   topics the QoS is the kind's ([`TopicKind::qos`](shared::TopicKind::qos): heartbeats 0,
//!   the rest 1), on the JSON mirror's `json/...` 0 (what the mirror publishes at), on any
//!   other topic 1. So a vehicle's heartbeat (QoS 0 on `hb`) and event (QoS 1) and
//!   the mirror's documents carry no marker and cost nothing more; a QoS 0 publish on
//!   `mosquitto_pub`'s `test/topic` carries one;
//! - [`mark`] adds it as a publish enters the router (and removes one a client forged),
//!   [`take_original`] reads and removes it as a forward leaves: a client never sees it.
//!
//! QoS 2 runs in the front end, both ways, for clean sessions: a QoS 2 PUBLISH from a client
//! is received exactly once (its PUBREC / PUBREL / PUBCOMP exchange in `connection::inbound`,
//! the message handed to the router once), and a subscription of a clean session asking for 2
//! is granted 2 and subscribed to in the router at 2, so that the router's forwards for it come
//! at QoS 2 (rumqttd forwards at the subscription's QoS): the front end delivers each at
//! min(original, 2), runs the exchange with the client and acknowledges the forward to the
//! router (a PUBACK, which rumqttd takes for a QoS 2 forward as well) once the client's
//! PUBCOMP came. rumqttd's own QoS 2 flow is never used. A persistent session's subscriptions
//! are granted at most [`MAX_QOS`] (1): the delivery exchanges live with the connection, not
//! the session, so exactly once could not be kept across a reconnect. What it publishes at
//! QoS 2 is received exactly once across reconnects (the packet ids awaiting their PUBREL are
//! kept with the session, `connection::sessions`). Shared subscriptions and the devices'
//! shared link deliver at most at 1 as well.

use rumqttd::protocol::{PublishProperties, QoS};
use shared::topic::kind_of;

/// The highest QoS persistent sessions, shared subscriptions and the devices' shared link are
/// granted and delivered at.
pub(crate) const MAX_QOS: u8 = 1;

/// The QoS a message on a topic no Fleetbeat kind names is taken to have without a marker.
const OTHER_TOPICS_QOS: u8 = 1;

/// How many QoS 1 and 2 publishes an MQTT 5 client may have unacknowledged at once (told in
/// CONNACK as `Receive Maximum`; one more ends the connection with DISCONNECT 0x93). A vehicle
/// has far fewer in flight; rumqttc's default window is 100 as well.
pub(crate) const RECEIVE_MAXIMUM: u16 = 100;

/// The user property carrying a publish's original QoS through rumqttd's router. Starts with
/// the broker's reserved prefix; clients never see it, and one a client sends is removed.
pub(crate) const MARKER: &str = "fleetbeat-internal-qos";

/// The QoS granted for a subscription that asked for `requested`: 2 only where the front end
/// can keep exactly once (`exactly_once`: a clean session's own link), else at most
/// [`MAX_QOS`].
pub(crate) fn grant(requested: QoS, exactly_once: bool) -> QoS {
    match requested {
        QoS::AtMostOnce => QoS::AtMostOnce,
        QoS::ExactlyOnce if exactly_once => QoS::ExactlyOnce,
        QoS::AtLeastOnce | QoS::ExactlyOnce => QoS::AtLeastOnce,
    }
}

/// The QoS of level `level` (0, 1, or 2 and above).
pub(crate) fn from_level(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The QoS a message on `topic` is taken to have when it carries no [`MARKER`]: its kind's on
/// Fleetbeat topics, 0 on the JSON mirror's `json/...` (it publishes at QoS 0), 1 on every
/// other.
pub(crate) fn implied(topic: &[u8]) -> u8 {
    match kind_of(topic) {
        Some(kind) => kind.qos().min(OTHER_TOPICS_QOS),
        None if topic.starts_with(MIRROR_PREFIX) => 0,
        None => OTHER_TOPICS_QOS,
    }
}

/// The JSON mirror's topics start with this (`mirror`).
const MIRROR_PREFIX: &[u8] = b"json/";

/// Records that a publish on `topic` was published at `qos` (0, 1 or 2), in its properties,
/// if a receiver could not infer it (see [`implied`]); removes a [`MARKER`], or any other
/// property the broker carries through the router (`carry`), the client sent. Allocates
/// nothing when no marker is needed and the client sent no properties.
pub(crate) fn mark(topic: &[u8], qos: u8, properties: &mut Option<PublishProperties>) {
    crate::carry::remove_forged(properties);
    let qos = qos.min(2);
    if qos == implied(topic) {
        return;
    }
    properties
        .get_or_insert_with(PublishProperties::default)
        .user_properties
        .push((MARKER.to_owned(), qos.to_string()));
}

/// The original QoS of a message on `topic` leaving the router with `properties` (0 to 2):
/// its [`MARKER`], else what the topic implies. Leaves the properties alone.
pub(crate) fn original(topic: &[u8], properties: Option<&PublishProperties>) -> u8 {
    properties
        .and_then(|props| props.user_properties.iter().find(|(key, _)| key == MARKER))
        .and_then(|(_, value)| value.parse::<u8>().ok())
        .map_or_else(|| implied(topic), |qos| qos.min(2))
}

/// Lowers the QoS a forward on `topic` with `properties` is delivered at to at most `cap` (a
/// subscription whose QoS a repeated SUBSCRIBE lowered, see `connection::options`): its
/// [`MARKER`] says `cap` if its original QoS was higher.
pub(crate) fn cap(topic: &[u8], properties: &mut PublishProperties, cap: u8) {
    if original(topic, Some(properties)) <= cap {
        return;
    }
    properties.user_properties.retain(|(key, _)| key != MARKER);
    properties
        .user_properties
        .push((MARKER.to_owned(), cap.to_string()));
}

/// The original QoS of a forward on `topic` (as [`original`]), removing the [`MARKER`] and
/// everything else the broker carried through the router (`carry::strip`) from `properties`
/// (and properties left empty by that), so the client never sees them. Deliver at the minimum
/// of this and the QoS the router forwarded at (the subscription's).
pub(crate) fn take_original(topic: &[u8], properties: &mut Option<PublishProperties>) -> u8 {
    let original = original(topic, properties.as_ref());
    crate::carry::strip(properties);
    original
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos_2_is_granted_only_where_exactly_once_can_be_kept() {
        for exactly_once in [true, false] {
            assert_eq!(grant(QoS::AtMostOnce, exactly_once), QoS::AtMostOnce);
            assert_eq!(grant(QoS::AtLeastOnce, exactly_once), QoS::AtLeastOnce);
        }
        assert_eq!(grant(QoS::ExactlyOnce, true), QoS::ExactlyOnce);
        assert_eq!(grant(QoS::ExactlyOnce, false), QoS::AtLeastOnce);
    }

    #[test]
    fn fleet_traffic_needs_no_marker() {
        for (topic, qos) in [
            (&b"fleet/f/van-1/hb"[..], 0),
            (b"fleet/f/van-1/event", 1),
            (b"fleet/f/van-1/status", 1),
            (b"fleet/f/van-1/cmd", 1),
            (b"fleet/f/van-1/ack", 1),
            (b"test/topic", 1),
            (b"json/fleet/f/van-1/status", 0),
        ] {
            let mut properties = None;
            mark(topic, qos, &mut properties);
            assert_eq!(properties, None, "{topic:?} at {qos}");
            assert_eq!(original(topic, None), qos);
        }
    }

    #[test]
    fn the_original_qos_survives_the_router_and_is_removed() {
        for (topic, qos) in [
            (&b"test/topic"[..], 0),
            (b"fleet/f/van-1/hb", 1),
            (b"fleet/f/van-1/hb", 2),
            (b"fleet/f/van-1/event", 0),
            (b"fleet/f/van-1/ack", 2),
            (b"test/topic", 2),
            (b"json/fleet/f/van-1/hb", 1),
        ] {
            let mut properties = None;
            mark(topic, qos, &mut properties);
            assert!(properties.is_some(), "{topic:?} at {qos}");
            assert_eq!(take_original(topic, &mut properties), qos);
            assert_eq!(properties, None, "the marker is gone");
        }
    }

    #[test]
    fn a_forged_marker_is_removed_and_other_properties_kept() {
        let mut properties = Some(PublishProperties {
            user_properties: vec![
                ("a".into(), "2".into()),
                (MARKER.into(), "1".into()),
                ("c".into(), "3".into()),
            ],
            ..PublishProperties::default()
        });
        // A QoS 0 publish on a topic implied QoS 1: the client's marker is replaced by ours.
        mark(b"test/topic", 0, &mut properties);
        let props = properties.as_ref().unwrap();
        assert_eq!(
            props.user_properties,
            vec![
                ("a".into(), "2".into()),
                ("c".into(), "3".into()),
                (MARKER.into(), "0".into())
            ]
        );
        assert_eq!(take_original(b"test/topic", &mut properties), 0);
        assert_eq!(
            properties.unwrap().user_properties,
            vec![("a".into(), "2".into()), ("c".into(), "3".into())],
            "the client's own properties are delivered as sent"
        );
        // A forged marker on a publish that needs none is simply removed.
        let mut forged = Some(PublishProperties {
            user_properties: vec![(MARKER.into(), "0".into())],
            ..PublishProperties::default()
        });
        mark(b"test/topic", 1, &mut forged);
        assert_eq!(forged.unwrap().user_properties, vec![]);
    }
}
