//! The MQTT 5 subscription options rumqttd's router does not implement (§3.8.3.1), applied by
//! the front end to the forwards of a connection's own link: No Local (messages the client
//! published itself are not sent back to it), Retain As Published (live messages keep the
//! retain flag they were published with; the router clears it) and Retain Handling 2 (no
//! retained messages when the subscription is made). Retain Handling 1 ("only for a new
//! subscription") is what the router does anyway.
//!
//! The router sends one copy of a message per matching filter, and does not say which filter
//! a copy came through; but it attaches the filter's Subscription Identifier to every copy. So
//! a filter with any of these options is subscribed in the router on its own, under an
//! identifier of the front end's ([`FIRST_ID`] and up, beyond MQTT's largest, 268 435 455),
//! and its options, with the identifier the client gave, are kept in [`LinkFilters`]:
//! [`LinkFilters::judge`] reads a forward's identifier, applies the options and puts the
//! client's own identifier (if any) in its place. What a copy needs to be judged travels with
//! the publish through the router (`carry`): whether it was published retained, and, from a
//! client with a No Local subscription, its client id.
//!
//! A persistent session keeps its table across connections (`sessions`), as the router keeps
//! its subscriptions; rumqttd forgets their identifiers when the session is taken up again, so
//! on a persistent session a filter with the client's Subscription Identifier is kept in the
//! table too, to be given back ([`LinkFilters::restore`]). A connection without such options
//! has no table: a vehicle never pays for it.

use std::collections::HashMap;

use bytes::Bytes;

use rumqttd::protocol::{
    Filter, Packet, Publish, PublishProperties, RetainForwardRule, Subscribe, SubscribeProperties,
};

use crate::carry;

/// The first Subscription Identifier the front end gives the router for a filter with options;
/// a client's are below (MQTT 5 allows 1 to 268 435 455).
pub(super) const FIRST_ID: usize = 1 << 28;

/// One filter's options the front end applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Options {
    /// No Local: not the messages this client published.
    no_local: bool,
    /// Retain As Published: live messages with the retain flag they were published with.
    retain_as_published: bool,
    /// Retain Handling 2: no retained messages when the subscription is made.
    no_retained: bool,
    /// The Subscription Identifier the client gave the filter, if any.
    client_id: Option<usize>,
    /// Set by a repeated SUBSCRIBE that lowered the filter's QoS: copies are delivered at most
    /// at it (the router keeps serving the QoS the filter was first subscribed at).
    cap: Option<u8>,
}

impl Options {
    /// The options of `filter`, subscribed with the client's identifier `id` (and, for a
    /// repeated SUBSCRIBE that lowered its QoS, that `cap`), that the front end must apply;
    /// `None` if it has none of them (the router serves it as asked). For a persistent
    /// session (`persistent`) the client's identifier is one: rumqttd forgets a resumed
    /// session's identifiers, and the front end gives back only those it keeps
    /// ([`LinkFilters::restore`]).
    pub(super) fn of(
        filter: &Filter,
        id: Option<usize>,
        cap: Option<u8>,
        persistent: bool,
    ) -> Option<Options> {
        let no_retained = filter.retain_forward_rule == RetainForwardRule::Never;
        let any = filter.nolocal
            || filter.preserve_retain
            || no_retained
            || cap.is_some()
            || (persistent && id.is_some());
        any.then_some(Options {
            no_local: filter.nolocal,
            retain_as_published: filter.preserve_retain,
            no_retained,
            client_id: id,
            cap,
        })
    }
}

/// What a forward became once judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judged {
    /// Write it to the client.
    Deliver,
    /// Not for the client (No Local, or a retained message under Retain Handling 2): the
    /// router's forward is acknowledged without writing it.
    Skip,
}

/// The filters a connection's own link (or a persistent session) has in the router, and
/// those with options, by the identifier they are subscribed under there.
#[derive(Debug, Default)]
pub(crate) struct LinkFilters {
    /// Every filter subscribed through the link and not unsubscribed, with the QoS the router
    /// serves it at: the QoS of its first SUBSCRIBE (a repeated SUBSCRIBE of one makes no new
    /// subscription in the router and changes nothing there: see `retained`).
    subscribed: Vec<(String, u8)>,
    by_id: HashMap<usize, (String, Options)>,
    /// The identifier the next filter with options gets.
    next: usize,
    /// Router SUBACKs still to come for [`Self::restore`]'s SUBSCRIBEs.
    restoring: usize,
    /// A persistent session's deliveries that an earlier connection was sent and did not
    /// acknowledge, by topic and place in the router's log: the router sends them again to the
    /// next connection, which marks them DUP ([`Self::is_resend`]).
    unacknowledged: Vec<(Bytes, (u64, u64))>,
}

/// At most this many unacknowledged deliveries are remembered for a session (the router has
/// at most 100 in flight per connection): beyond, the oldest are forgotten and their resend
/// goes without DUP.
const UNACKNOWLEDGED_KEPT: usize = 256;

impl LinkFilters {
    /// The QoS the router serves `filter` at for the link, if the link has the filter.
    pub(super) fn router_qos(&self, filter: &str) -> Option<u8> {
        self.subscribed
            .iter()
            .find(|(f, _)| f == filter)
            .map(|&(_, qos)| qos)
    }

    /// A SUBSCRIBE of `filter` with `options` (a repeated one replaces the subscription's
    /// options), granted `qos` (the router's QoS for a new filter): the identifier to
    /// subscribe it under in the router, if it has options, and whether the link had the
    /// filter already.
    pub(super) fn subscribe(
        &mut self,
        filter: &str,
        options: Option<Options>,
        qos: u8,
    ) -> (Option<usize>, bool) {
        self.by_id.retain(|_, (f, _)| f != filter);
        let had = self.router_qos(filter).is_some();
        if !had {
            self.subscribed.push((filter.to_owned(), qos));
        }
        let Some(options) = options else {
            return (None, had);
        };
        let id = FIRST_ID + self.next;
        self.next = (self.next + 1) % (usize::MAX - FIRST_ID);
        self.by_id.insert(id, (filter.to_owned(), options));
        (Some(id), had)
    }

    /// An UNSUBSCRIBE of `filter`.
    pub(super) fn unsubscribe(&mut self, filter: &str) {
        self.subscribed.retain(|(f, _)| f != filter);
        self.by_id.retain(|_, (f, _)| f != filter);
    }

    /// The router SUBSCRIBEs that give a resumed session's filters their identifiers again:
    /// rumqttd keeps a session's subscriptions, not their identifiers. A SUBSCRIBE of a filter
    /// the session has makes no new subscription (no retained messages either); the router
    /// answers each with a SUBACK, which [`Self::restored`] tells apart from the client's.
    /// Forwards the router sends before it has them come without an identifier and are
    /// delivered as sent.
    pub(super) fn restore(&mut self) -> Vec<Packet> {
        self.restoring = self.by_id.len();
        self.by_id
            .iter()
            .map(|(&id, (path, options))| {
                // The QoS the router serves the filter at (it keeps the session's).
                let served = self.router_qos(path).unwrap_or(0);
                let filter = Filter {
                    path: path.clone(),
                    qos: crate::qos::from_level(served),
                    nolocal: options.no_local,
                    preserve_retain: options.retain_as_published,
                    retain_forward_rule: if options.no_retained {
                        RetainForwardRule::Never
                    } else {
                        RetainForwardRule::OnNewSubscribe
                    },
                };
                let subscribe = Subscribe {
                    pkid: 1,
                    filters: vec![filter],
                };
                let properties = SubscribeProperties {
                    id: Some(id),
                    user_properties: Vec::new(),
                };
                Packet::Subscribe(subscribe, Some(properties))
            })
            .collect()
    }

    /// Whether a router SUBACK answers one of [`Self::restore`]'s SUBSCRIBEs (they come
    /// before any of the client's).
    pub(super) fn restored(&mut self) -> bool {
        let restoring = self.restoring > 0;
        self.restoring = self.restoring.saturating_sub(1);
        restoring
    }

    /// Whether any filter asks for No Local: then the client's publishes carry its client id.
    pub(super) fn no_local(&self) -> bool {
        self.by_id.values().any(|(_, options)| options.no_local)
    }

    /// The connection ends with `deliveries` (topic, place in the router's log) sent and not
    /// acknowledged: the next connection's resend of each is marked DUP (MQTT 3.1.1
    /// §3.3.1.1, MQTT 5 §3.3.1.1).
    pub(super) fn unacknowledged(
        &mut self,
        deliveries: impl IntoIterator<Item = (Bytes, (u64, u64))>,
    ) {
        for delivery in deliveries {
            if !self.unacknowledged.contains(&delivery) {
                self.unacknowledged.push(delivery);
            }
        }
        let over = self
            .unacknowledged
            .len()
            .saturating_sub(UNACKNOWLEDGED_KEPT);
        self.unacknowledged.drain(..over);
    }

    /// Whether the forward of `topic` at `cursor` is the resend of a delivery an earlier
    /// connection did not acknowledge (then forgotten: it is marked once).
    pub(super) fn is_resend(&mut self, topic: &[u8], cursor: (u64, u64)) -> bool {
        if self.unacknowledged.is_empty() {
            return false;
        }
        let Some(at) = self
            .unacknowledged
            .iter()
            .position(|(t, c)| *c == cursor && t[..] == *topic)
        else {
            return false;
        };
        self.unacknowledged.remove(at);
        true
    }

    /// Whether the link has no filter left.
    pub(super) fn is_empty(&self) -> bool {
        self.subscribed.is_empty()
    }

    /// Applies the options of the filter a forward of the own link came through, if it has
    /// any: No Local against `client_id`, Retain Handling 2, Retain As Published; and gives
    /// the forward the client's Subscription Identifier in place of the front end's. A
    /// forward of a filter without options, or under an identifier this table no longer has
    /// (a subscription replaced meanwhile), is delivered as the router sent it, without the
    /// front end's identifier.
    ///
    /// rumqttd forgets a resumed session's identifiers: what it forwards of the session's
    /// backlog before [`Self::restore`]'s SUBSCRIBEs reach it carries none. A forward without
    /// one whose topic only one of the link's filters matches came through that filter, and
    /// is judged by its options; one that several filters match is delivered as sent.
    pub(super) fn judge(
        &self,
        client_id: &str,
        publish: &mut Publish,
        properties: &mut Option<PublishProperties>,
    ) -> Judged {
        let internal = properties.as_mut().and_then(|props| {
            let at = props
                .subscription_identifiers
                .iter()
                .position(|&id| id >= FIRST_ID)?;
            Some((at, props.subscription_identifiers.remove(at)))
        });
        let (at, options) = match internal {
            Some((at, id)) => match self.by_id.get(&id) {
                Some((_, options)) => (at, options),
                None => return Judged::Deliver,
            },
            None => match self.only_filter_of(&publish.topic) {
                Some(options) => (0, options),
                None => return Judged::Deliver,
            },
        };
        let props = properties.get_or_insert_with(PublishProperties::default);
        // The router flags only the retained messages it sends a new subscription; it
        // clears the flag of everything it forwards live.
        if options.no_retained && publish.retain {
            return Judged::Skip;
        }
        if options.no_local && carry::get(Some(props), carry::ORIGIN) == Some(client_id) {
            return Judged::Skip;
        }
        if options.retain_as_published && !publish.retain {
            publish.retain = carry::get(Some(props), carry::RETAINED).is_some();
        }
        if let Some(cap) = options.cap {
            crate::qos::cap(&publish.topic, props, cap);
        }
        if let Some(client_sub_id) = options.client_id {
            props.subscription_identifiers.insert(at, client_sub_id);
        }
        Judged::Deliver
    }

    /// The options of the one filter of the link that matches `topic`, if only one does and
    /// it has options.
    fn only_filter_of(&self, topic: &[u8]) -> Option<&Options> {
        if self.by_id.is_empty() {
            return None;
        }
        let topic = std::str::from_utf8(topic).ok()?;
        let mut matching = self
            .subscribed
            .iter()
            .filter(|(filter, _)| rumqttd::protocol::matches(topic, filter));
        let (filter, _) = matching.next()?;
        if matching.next().is_some() {
            return None;
        }
        self.by_id
            .values()
            .find(|(f, _)| f == filter)
            .map(|(_, options)| options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::QoS;

    fn filter(path: &str, nolocal: bool, rap: bool, rule: RetainForwardRule) -> Filter {
        Filter {
            path: path.into(),
            qos: QoS::AtLeastOnce,
            nolocal,
            preserve_retain: rap,
            retain_forward_rule: rule,
        }
    }

    /// A forward as the router sends it: live (retain cleared) or retained, through the filter
    /// subscribed under `id`, published by `origin` (if marked), retained or not.
    fn forward(
        id: usize,
        retained_send: bool,
        published_retained: bool,
        origin: Option<&str>,
    ) -> (Publish, Option<PublishProperties>) {
        let mut properties = None;
        carry::mark(published_retained, origin, &mut properties);
        properties
            .get_or_insert_with(PublishProperties::default)
            .subscription_identifiers
            .push(id);
        (Publish::new("a/b", "x", retained_send), properties)
    }

    #[test]
    fn a_forward_without_an_identifier_is_judged_by_the_one_filter_it_matches() {
        let mut table = LinkFilters::default();
        let nl = filter("a/#", true, false, RetainForwardRule::OnEverySubscribe);
        let (id, _) = table.subscribe("a/#", Options::of(&nl, Some(5), None, false), 1);
        assert!(id.is_some());
        // A resumed session's backlog: the router forgot the identifier.
        let strip = |(publish, mut properties): (Publish, Option<PublishProperties>)| {
            if let Some(props) = properties.as_mut() {
                props.subscription_identifiers.clear();
            }
            (publish, properties)
        };
        let (mut own, mut props) = strip(forward(0, false, false, Some("me")));
        assert_eq!(table.judge("me", &mut own, &mut props), Judged::Skip);
        let (mut other, mut props) = strip(forward(0, false, false, Some("you")));
        assert_eq!(table.judge("me", &mut other, &mut props), Judged::Deliver);
        assert_eq!(props.expect("properties").subscription_identifiers, [5]);
        // With a second filter matching, the copy could be either's: delivered as sent.
        assert_eq!(table.subscribe("a/b", None, 1), (None, false));
        let (mut own, mut props) = strip(forward(0, false, false, Some("me")));
        assert_eq!(table.judge("me", &mut own, &mut props), Judged::Deliver);
        assert!(
            props
                .expect("properties")
                .subscription_identifiers
                .is_empty()
        );
    }

    #[test]
    fn filters_without_these_options_are_left_to_the_router() {
        let plain = filter("a/b", false, false, RetainForwardRule::OnEverySubscribe);
        assert_eq!(Options::of(&plain, Some(7), None, false), None);
        // A persistent session keeps the identifier through the table (`restore`).
        let kept = Options::of(&plain, Some(7), None, true).expect("an option");
        assert_eq!(kept.client_id, Some(7));
        let mut table = LinkFilters::default();
        assert_eq!(table.subscribe("a/b", None, 1), (None, false));
        assert_eq!(table.subscribe("a/b", None, 0), (None, true), "repeated");
        assert_eq!(table.router_qos("a/b"), Some(1), "the router's QoS stays");
        table.unsubscribe("a/b");
        assert!(table.is_empty());
        // The client's own identifier passes untouched.
        let (mut publish, mut properties) = forward(7, false, false, None);
        assert_eq!(
            table.judge("me", &mut publish, &mut properties),
            Judged::Deliver
        );
        assert_eq!(properties.unwrap().subscription_identifiers, vec![7]);
    }

    #[test]
    fn each_option_is_applied_to_the_copies_of_its_own_filter() {
        let mut table = LinkFilters::default();
        let no_local = Options::of(
            &filter("a/#", true, false, RetainForwardRule::OnEverySubscribe),
            Some(3),
            None,
            false,
        );
        let rap = Options::of(
            &filter("a/b", false, true, RetainForwardRule::OnNewSubscribe),
            None,
            None,
            false,
        );
        let never = Options::of(
            &filter("+/b", false, false, RetainForwardRule::Never),
            None,
            None,
            false,
        );
        let nl = table.subscribe("a/#", no_local, 1).0.unwrap();
        let rap = table.subscribe("a/b", rap, 1).0.unwrap();
        let never = table.subscribe("+/b", never, 1).0.unwrap();
        assert!(nl >= FIRST_ID && rap != nl && never != rap);
        assert!(table.no_local());

        // No Local: the client's own message is skipped, another's delivered with the client's
        // identifier in place of the front end's.
        let (mut p, mut props) = forward(nl, false, false, Some("me"));
        assert_eq!(table.judge("me", &mut p, &mut props), Judged::Skip);
        let (mut p, mut props) = forward(nl, false, false, Some("other"));
        assert_eq!(table.judge("me", &mut p, &mut props), Judged::Deliver);
        assert_eq!(props.unwrap().subscription_identifiers, vec![3]);
        // The same message through the filter without No Local is delivered.
        let (mut p, mut props) = forward(rap, false, false, Some("me"));
        assert_eq!(table.judge("me", &mut p, &mut props), Judged::Deliver);

        // Retain As Published: a live copy gets its publish's retain flag back.
        let (mut p, mut props) = forward(rap, false, true, None);
        assert_eq!(table.judge("me", &mut p, &mut props), Judged::Deliver);
        assert!(p.retain);
        let (mut p, mut props) = forward(rap, false, false, None);
        table.judge("me", &mut p, &mut props);
        assert!(!p.retain);
        // Without it, a live copy stays unflagged.
        let (mut p, mut props) = forward(nl, false, true, None);
        table.judge("me", &mut p, &mut props);
        assert!(!p.retain);

        // Retain Handling 2: the retained message sent for the new subscription is skipped,
        // live ones are delivered.
        let (mut p, mut props) = forward(never, true, true, None);
        assert_eq!(table.judge("me", &mut p, &mut props), Judged::Skip);
        let (mut p, mut props) = forward(never, false, true, None);
        assert_eq!(table.judge("me", &mut p, &mut props), Judged::Deliver);

        // Unsubscribed, or replaced by a subscription without options: delivered as sent,
        // without the front end's identifier.
        table.unsubscribe("a/#");
        assert_eq!(table.subscribe("a/b", None, 1), (None, true));
        assert!(!table.no_local());
        let (mut p, mut props) = forward(nl, false, false, Some("me"));
        assert_eq!(table.judge("me", &mut p, &mut props), Judged::Deliver);
        assert!(props.unwrap().subscription_identifiers.is_empty());
        table.unsubscribe("+/b");
        table.unsubscribe("a/b");
        assert!(table.is_empty());
    }
}
