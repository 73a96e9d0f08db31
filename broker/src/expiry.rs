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
//!
//! A retained publish's interval does not go into the router at all (rumqttd defect 11 in
//! `docs/broker.md`): its retained store lowers the stored interval by the time since the
//! publish at every read, so each new subscriber takes the whole time off again and the
//! message is discarded early (published with 10 s, read at 2 s and 3.5 s, gone at 5 s). The
//! publish carries when its interval ends instead ([`carry_retained`], `carry::EXPIRES`), and
//! each forward leaving the router gets the seconds left back ([`restore`]) or is not
//! delivered once they are none. The router then keeps an expired retained message until its
//! topic's next retained publish replaces it, as it keeps any other.

use std::sync::LazyLock;
use std::time::Instant;

use rumqttd::protocol::PublishProperties;

use crate::carry;

/// The broker's clock for [`carry::EXPIRES`]: milliseconds since the first use.
static CLOCK: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `now` on the broker's clock, in milliseconds.
fn clock_ms(now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(*CLOCK).as_millis()).unwrap_or(u64::MAX)
}

/// A publish entering the router: if it is retained (`retain`) and has a Message Expiry
/// Interval, the interval leaves its properties for [`carry::EXPIRES`], when it ends.
pub(crate) fn carry_retained(retain: bool, properties: &mut Option<PublishProperties>) {
    carry_retained_at(retain, properties, Instant::now());
}

fn carry_retained_at(retain: bool, properties: &mut Option<PublishProperties>, now: Instant) {
    if !retain {
        return;
    }
    let Some(interval) = properties
        .as_mut()
        .and_then(|p| p.message_expiry_interval.take())
    else {
        return;
    };
    let ends = clock_ms(now).saturating_add(u64::from(interval) * 1_000);
    carry::add(properties, carry::EXPIRES, ends.to_string());
}

/// A forward leaving the router: a [`carry::EXPIRES`] it carries becomes its Message Expiry
/// Interval again, the whole seconds left rounded up; [`Aged::Expired`] once none are left.
/// The marker is taken out, so it is restored once: the time the front end keeps it after
/// that is [`Kept`]'s to count.
pub(crate) fn restore(properties: &mut Option<PublishProperties>) -> Aged {
    restore_at(properties, Instant::now())
}

fn restore_at(properties: &mut Option<PublishProperties>, now: Instant) -> Aged {
    let Some(props) = properties.as_mut() else {
        return Aged::Live;
    };
    let Some(at) = props
        .user_properties
        .iter()
        .position(|(key, _)| key == carry::EXPIRES)
    else {
        return Aged::Live;
    };
    let (_, ends) = props.user_properties.remove(at);
    let Ok(ends) = ends.parse::<u64>() else {
        return Aged::Live;
    };
    let now = clock_ms(now);
    if ends <= now {
        return Aged::Expired;
    }
    props.message_expiry_interval =
        Some(u32::try_from((ends - now).div_ceil(1_000)).unwrap_or(u32::MAX));
    Aged::Live
}

/// When the front end took a message that has a Message Expiry Interval (its interval then
/// as the router left it); nothing for one without, which never expires: no clock is read
/// for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kept(Option<Instant>);

/// What [`Kept::age`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aged {
    /// Still to deliver (its interval, if it has one, lowered).
    Live,
    /// Its Message Expiry Interval has passed: not for delivery.
    Expired,
}

impl Kept {
    /// A message with `properties` taken now: stamped if they have an interval.
    pub(crate) fn of(properties: &Option<PublishProperties>) -> Self {
        let expires = properties
            .as_ref()
            .is_some_and(|p| p.message_expiry_interval.is_some());
        Kept(expires.then(Instant::now))
    }

    /// Judges `properties` (the message's, about to be written) by the time since it was
    /// taken: [`Aged::Expired`] once its whole seconds reach the Message Expiry Interval, else
    /// the interval is lowered by them. A message without an interval never expires.
    pub(crate) fn age(self, properties: &mut Option<PublishProperties>) -> Aged {
        match self.0 {
            Some(taken) => age_at(taken, properties, Instant::now()),
            None => Aged::Live,
        }
    }
}

/// [`Kept::age`] of a message taken at `taken`, at `now`.
fn age_at(taken: Instant, properties: &mut Option<PublishProperties>, now: Instant) -> Aged {
    let Some(interval) = properties
        .as_mut()
        .and_then(|p| p.message_expiry_interval.as_mut())
    else {
        return Aged::Live;
    };
    let waited = u32::try_from(now.saturating_duration_since(taken).as_secs()).unwrap_or(u32::MAX);
    if waited >= *interval {
        return Aged::Expired;
    }
    *interval -= waited;
    Aged::Live
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
        let at = |ms| taken + Duration::from_millis(ms);

        let mut props = with_interval(Some(10));
        assert_eq!(age_at(taken, &mut props, at(999)), Aged::Live);
        assert_eq!(props.unwrap().message_expiry_interval, Some(10));

        let mut props = with_interval(Some(10));
        assert_eq!(age_at(taken, &mut props, at(3_500)), Aged::Live);
        assert_eq!(props.unwrap().message_expiry_interval, Some(7));

        let mut props = with_interval(Some(3));
        assert_eq!(age_at(taken, &mut props, at(3_000)), Aged::Expired);
    }

    #[test]
    fn a_retained_publish_carries_when_its_interval_ends_and_gets_the_seconds_left_back() {
        // The clock starts before the publish, as it does in a running broker.
        LazyLock::force(&CLOCK);
        let published = Instant::now();
        let mut props = with_interval(Some(10));
        carry_retained_at(true, &mut props, published);
        assert_eq!(props.as_ref().unwrap().message_expiry_interval, None);
        assert!(carry::get(props.as_ref(), carry::EXPIRES).is_some());

        let read = |ms| {
            let mut copy = props.clone();
            let aged = restore_at(&mut copy, published + Duration::from_millis(ms));
            // Taken out: a second restore finds nothing to change.
            assert_eq!(carry::get(copy.as_ref(), carry::EXPIRES), None);
            let interval = copy.as_ref().and_then(|p| p.message_expiry_interval);
            assert_eq!(
                restore_at(&mut copy, published + Duration::from_secs(60)),
                Aged::Live
            );
            assert_eq!(copy.and_then(|p| p.message_expiry_interval), interval);
            (aged, interval)
        };
        // Every read counts from the publish, not from the read before (rumqttd's store does).
        assert_eq!(read(2_000), (Aged::Live, Some(8)));
        assert_eq!(read(3_500), (Aged::Live, Some(7)));
        assert_eq!(read(9_100), (Aged::Live, Some(1)));
        assert_eq!(read(10_000).0, Aged::Expired);

        // Live publishes keep their interval for the router, which counts it right.
        let mut live = with_interval(Some(10));
        carry_retained_at(false, &mut live, published);
        assert_eq!(live.unwrap().message_expiry_interval, Some(10));
        let mut plain = None;
        carry_retained_at(true, &mut plain, published);
        assert_eq!(restore_at(&mut plain, published), Aged::Live);
        assert_eq!(plain, None);
    }

    #[test]
    fn a_message_without_an_interval_never_expires() {
        let taken = Instant::now();
        let much_later = taken + Duration::from_secs(86_400 * 365);
        let mut none = None;
        assert_eq!(age_at(taken, &mut none, much_later), Aged::Live);
        let mut props = with_interval(None);
        assert_eq!(age_at(taken, &mut props, much_later), Aged::Live);
        assert_eq!(props.unwrap().message_expiry_interval, None);
        // Nor is it stamped: no clock is read for it.
        assert!(Kept::of(&None).0.is_none());
        assert!(Kept::of(&with_interval(None)).0.is_none());
        assert!(Kept::of(&with_interval(Some(5))).0.is_some());
    }
}
