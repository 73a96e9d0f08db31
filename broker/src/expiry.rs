//! MQTT 5 Message Expiry (§3.3.2.3.3) for messages the front end keeps before it writes them.
//!
//! rumqttd's router honours a publish's Message Expiry Interval while the message is in its
//! commit log: a read drops an expired message and lowers the interval of the others by the
//! whole seconds they waited. What the front end then keeps for a while is not the router's:
//! a delivery held back by the client's Receive Maximum (`connection`), a shared
//! subscription group's message waiting for a member with room or given to another member
//! after one left (`share`), a retained message sent again (`retained`). Each is stamped when
//! the front end took it ([`Kept`]) and judged again when it is written ([`Kept::age`]): not
//! delivered once its interval has passed (counted, `dropped_total{reason="expired"}`), else
//! written with the interval less the whole seconds it waited here, as the router counts.

use std::time::Instant;

use rumqttd::protocol::PublishProperties;

/// When the front end took a message (its interval then as the router left it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kept(Instant);

/// What [`Kept::age`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aged {
    /// Still to deliver (its interval, if it has one, lowered).
    Live,
    /// Its Message Expiry Interval has passed: not for delivery.
    Expired,
}

impl Kept {
    /// A message taken now.
    pub(crate) fn now() -> Self {
        Kept(Instant::now())
    }

    /// Judges `properties` (the message's, about to be written) by the time since it was
    /// taken: [`Aged::Expired`] once its whole seconds reach the Message Expiry Interval, else
    /// the interval is lowered by them. A message without an interval never expires.
    pub(crate) fn age(self, properties: &mut Option<PublishProperties>) -> Aged {
        self.age_at(properties, Instant::now())
    }

    fn age_at(self, properties: &mut Option<PublishProperties>, now: Instant) -> Aged {
        let Some(interval) = properties
            .as_mut()
            .and_then(|p| p.message_expiry_interval.as_mut())
        else {
            return Aged::Live;
        };
        let waited =
            u32::try_from(now.saturating_duration_since(self.0).as_secs()).unwrap_or(u32::MAX);
        if waited >= *interval {
            return Aged::Expired;
        }
        *interval -= waited;
        Aged::Live
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn with_interval(seconds: Option<u32>) -> Option<PublishProperties> {
        Some(PublishProperties {
            message_expiry_interval: seconds,
            ..PublishProperties::default()
        })
    }

    #[test]
    fn an_interval_is_lowered_by_the_whole_seconds_waited_and_expires_at_its_end() {
        let taken = Instant::now();
        let kept = Kept(taken);
        let at = |ms| taken + Duration::from_millis(ms);

        let mut props = with_interval(Some(10));
        assert_eq!(kept.age_at(&mut props, at(999)), Aged::Live);
        assert_eq!(props.unwrap().message_expiry_interval, Some(10));

        let mut props = with_interval(Some(10));
        assert_eq!(kept.age_at(&mut props, at(3_500)), Aged::Live);
        assert_eq!(props.unwrap().message_expiry_interval, Some(7));

        let mut props = with_interval(Some(3));
        assert_eq!(kept.age_at(&mut props, at(3_000)), Aged::Expired);
    }

    #[test]
    fn a_message_without_an_interval_never_expires() {
        let kept = Kept(Instant::now());
        let much_later = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut none = None;
        assert_eq!(kept.age_at(&mut none, much_later), Aged::Live);
        let mut props = with_interval(None);
        assert_eq!(kept.age_at(&mut props, much_later), Aged::Live);
        assert_eq!(props.unwrap().message_expiry_interval, None);
    }
}
