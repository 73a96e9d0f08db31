//! What a publish carries through rumqttd's router that the router itself would lose, in MQTT 5
//! user properties whose keys start with the broker's reserved prefix ([`INTERNAL_PREFIX`]).
//! rumqttd keeps a publish's properties in its commit log and hands them out with each forward,
//! so the front end writes these as a publish enters the router and reads them as a forward
//! leaves it:
//!
//! - the QoS it was published at (`qos::MARKER`, where the topic does not imply it);
//! - whether it was published retained ([`RETAINED`]): the router clears the retain flag of
//!   everything it forwards live, which MQTT 5's Retain As Published needs;
//! - who published it ([`ORIGIN`]: the client id), only from a client that has a No Local
//!   subscription, the one subscriber that needs it;
//! - when a retained publish's MQTT 5 Message Expiry Interval ends ([`EXPIRES`], instead of the
//!   interval: rumqttd's retained store counts the interval down wrongly, see `expiry`).
//!
//! [`RETAINED`] is written only once a client has asked for Retain As Published
//! ([`RetainWanted`]): until then nobody would read it, and retained publishes (every vehicle's
//! status) cost nothing more. A retained message published at the very moment the first such
//! subscription is made may reach it live unflagged.
//!
//! A client never sees them: one a client sends is removed as its publish enters
//! ([`remove_forged`]: a forged origin could otherwise hide a message from its subscriber), and
//! every one is removed from a forward before it is written ([`strip`]). Publishes that need
//! none (a vehicle's heartbeat or event) carry no properties and cost nothing more.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rumqttd::protocol::PublishProperties;

use crate::reserved::INTERNAL_PREFIX;

/// Present on a publish that was published with its retain flag set.
pub(crate) const RETAINED: &str = "fleetbeat-internal-retained";

/// The client id of the client that published it (only from clients with a No Local
/// subscription).
pub(crate) const ORIGIN: &str = "fleetbeat-internal-origin";

/// When a retained publish's Message Expiry Interval ends, in milliseconds of the broker's
/// clock (`expiry`): carried instead of the interval.
pub(crate) const EXPIRES: &str = "fleetbeat-internal-expires";

/// Whether any client asked for Retain As Published since the broker started (shared by the
/// front end, the will publisher and the JSON mirror): retained publishes carry [`RETAINED`]
/// from then on.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetainWanted(Arc<AtomicBool>);

impl RetainWanted {
    /// A client asked for Retain As Published.
    pub(crate) fn want(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether a publish with the retain flag `retain` is to carry [`RETAINED`].
    pub(crate) fn mark(&self, retain: bool) -> bool {
        retain && self.0.load(Ordering::Acquire)
    }
}

/// Removes every user property with the reserved prefix a client sent. Allocates nothing.
pub(crate) fn remove_forged(properties: &mut Option<PublishProperties>) {
    remove_internal(properties);
}

/// Removes every user property with the reserved prefix; whether there was one.
fn remove_internal(properties: &mut Option<PublishProperties>) -> bool {
    let Some(props) = properties.as_mut() else {
        return false;
    };
    let any = props
        .user_properties
        .iter()
        .any(|(key, _)| key.starts_with(INTERNAL_PREFIX));
    if any {
        props
            .user_properties
            .retain(|(key, _)| !key.starts_with(INTERNAL_PREFIX));
    }
    any
}

/// Adds the user property `key` = `value`.
pub(crate) fn add(properties: &mut Option<PublishProperties>, key: &str, value: String) {
    properties
        .get_or_insert_with(PublishProperties::default)
        .user_properties
        .push((key.to_owned(), value));
}

/// The value of the user property `key`, if the publish carries it.
pub(crate) fn get<'a>(properties: Option<&'a PublishProperties>, key: &str) -> Option<&'a str> {
    properties?
        .user_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, value)| value.as_str())
}

/// Removes every user property with the reserved prefix, and the properties if that leaves
/// them empty, so the client gets what its publisher sent.
pub(crate) fn strip(properties: &mut Option<PublishProperties>) {
    if remove_internal(properties) && properties.as_ref() == Some(&PublishProperties::default()) {
        *properties = None;
    }
}

/// Marks a publish entering the router: [`RETAINED`] if `retained` (published retained, and
/// wanted: [`RetainWanted::mark`]), [`ORIGIN`] = `origin` if given (its publisher has a No
/// Local subscription).
pub(crate) fn mark(
    retained: bool,
    origin: Option<&str>,
    properties: &mut Option<PublishProperties>,
) {
    if retained {
        add(properties, RETAINED, String::new());
    }
    if let Some(origin) = origin {
        add(properties, ORIGIN, origin.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_properties_go_and_the_clients_own_stay() {
        let mut properties = Some(PublishProperties {
            user_properties: vec![
                ("a".into(), "1".into()),
                (ORIGIN.into(), "victim".into()),
                (RETAINED.into(), String::new()),
                ("fleetbeat-internal-anything".into(), "x".into()),
            ],
            ..PublishProperties::default()
        });
        remove_forged(&mut properties);
        assert_eq!(
            properties.as_ref().unwrap().user_properties,
            vec![("a".into(), "1".into())]
        );
        mark(true, Some("me"), &mut properties);
        assert_eq!(get(properties.as_ref(), ORIGIN), Some("me"));
        assert_eq!(get(properties.as_ref(), RETAINED), Some(""));
        strip(&mut properties);
        assert_eq!(
            properties.unwrap().user_properties,
            vec![("a".into(), "1".into())]
        );
    }

    #[test]
    fn retained_is_marked_only_once_wanted() {
        let wanted = RetainWanted::default();
        assert!(!wanted.mark(true));
        wanted.clone().want();
        assert!(wanted.mark(true));
        assert!(!wanted.mark(false));
    }

    #[test]
    fn nothing_to_carry_allocates_nothing_and_strip_leaves_no_empty_properties() {
        let mut none = None;
        mark(false, None, &mut none);
        assert_eq!(none, None);
        mark(true, None, &mut none);
        assert!(none.is_some());
        strip(&mut none);
        assert_eq!(none, None);
    }
}
