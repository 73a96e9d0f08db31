//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5 §4.8.2; accepted from 3.1.1 clients
//! too, as mosquitto does), served by the front end: rumqttd 0.20's router is never given a
//! `$share` filter (its own shared subscriptions panic the router thread, issue #13, and key
//! groups by name alone).
//!
//! - A group is keyed by (group name, filter): `$share/g/a` and `$share/g/b` are two groups.
//! - Each group has one internal router link (`fleetbeat-internal-share-N`), registered at the
//!   group's first member and subscribed to the plain filter (QoS 0: nothing to acknowledge to
//!   the router; each message's original QoS travels with it, see `qos`). Its dispatcher task
//!   hands every message the router forwards to ONE member: round-robin, skipping members
//!   with [`MEMBER_INFLIGHT`] QoS 1 deliveries unacknowledged or [`MEMBER_QUEUE`] messages not
//!   yet written to their socket. When every member is at a bound the dispatcher waits (the router keeps the messages in its commit log, as for any
//!   slow subscriber).
//! - The member's connection writes the message at min(granted QoS, message QoS) under a
//!   packet id of its own (`connection::outbound`), remembers what a QoS 1 delivery carried
//!   (so a durable consumer's PUBACK releases the devices' waiters, as for its other
//!   forwards), and tells the group when it is acknowledged ([`Group::acknowledged`]).
//! - A member that leaves (UNSUBSCRIBE, disconnect) is removed; what it was given and had not
//!   acknowledged (or not even written) is given to another member of the group
//!   ([`SharedSubscriptions::redeliver`], counted). The last member leaving removes the group
//!   and disconnects its link.
//! - Retained messages are not sent on a new shared subscription (MQTT 5 §4.8.2).
//! - Groups are bounded: each counts as a filter of its member connections
//!   (`max_subscriptions`, `max_subscribe_rate`), and there are at most [`MAX_GROUPS`] in all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet, PublishProperties};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::BrokerMetrics;
use crate::metrics::SubscribeRefusal;
use crate::router::{FilterBudget, LinkName, LinkRefused, LinkRequest, Registrar, hand_over};
use crate::topic_syntax::valid_filter;

/// Most shared subscription groups at once, in all (each has a router link of its own; the
/// router is sized for them, see `server`).
pub(crate) const MAX_GROUPS: usize = 1024;

/// Most QoS 1 messages one member is given and has not acknowledged; beyond, the group's
/// other members get the messages, or the group waits (rumqttd's own window is 100 too).
pub(crate) const MEMBER_INFLIGHT: usize = 100;

/// Most messages given to one member and not yet written to its socket (its connection's
/// queue): a member whose socket is stalled is skipped beyond it, and a group whose members
/// are all stalled waits (the router keeps the messages), so memory stays bounded.
pub(crate) const MEMBER_QUEUE: usize = 1000;

/// How often a dispatcher whose members are all at [`MEMBER_INFLIGHT`] looks again without
/// being woken (a member that left without a word, say).
const RECHECK: Duration = Duration::from_secs(1);

/// The prefix of a shared subscription filter.
const SHARE_PREFIX: &str = "$share/";

/// A shared subscription filter, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShareFilter<'a> {
    /// Not a shared subscription.
    NotShared,
    /// `$share/{group}/{filter}`, well formed.
    Shared {
        /// The share name.
        group: &'a str,
        /// The filter the group's members share.
        filter: &'a str,
    },
    /// Starts with `$share/` but has no group, a group with `+` or `#`, no filter, or a filter
    /// that is not valid (or starts with `$`, which the router would not serve).
    Malformed,
}

/// Parses a subscription filter as a shared subscription.
pub(crate) fn parse(path: &str) -> ShareFilter<'_> {
    let Some(rest) = path.strip_prefix(SHARE_PREFIX) else {
        return ShareFilter::NotShared;
    };
    let Some((group, filter)) = rest.split_once('/') else {
        return ShareFilter::Malformed;
    };
    if group.is_empty()
        || group.contains(['+', '#', '\0'])
        || filter.starts_with('$')
        || !valid_filter(filter)
    {
        return ShareFilter::Malformed;
    }
    ShareFilter::Shared { group, filter }
}

/// The key of a group: (group name, filter).
pub(crate) type GroupKey = (String, String);

/// A message a group gives one of its members.
#[derive(Debug)]
pub(crate) struct SharedMessage {
    /// The group it came through (acknowledgements and redelivery go back to it).
    pub(crate) group: Arc<Group>,
    /// Its topic.
    pub(crate) topic: Bytes,
    /// Its payload.
    pub(crate) payload: Bytes,
    /// Its MQTT 5 properties, without the broker's QoS marker.
    pub(crate) properties: Option<PublishProperties>,
    /// The QoS it was published at (at most [`qos::MAX_QOS`](crate::qos::MAX_QOS)).
    pub(crate) qos: u8,
    /// Whether it was published retained (for members with Retain As Published; the router
    /// clears the flag of what it forwards live, see `carry`).
    pub(crate) retained: bool,
    /// When the group read it from the router: its Message Expiry Interval runs on while it
    /// waits for a member (`expiry`).
    pub(crate) kept: crate::expiry::Kept,
}

/// Where a group hands a member its messages: the member's connection (its mux port, see
/// `mux`, which implements this; so this module does not depend on the mux).
pub(crate) trait MemberPort: Send + Sync + std::fmt::Debug {
    /// Hands `message` to the member, to write at `qos`, with the retain flag `retain` and
    /// the member's Subscription Identifier `id`; false if its connection is gone.
    fn give(&self, message: Arc<SharedMessage>, qos: u8, retain: bool, id: Option<SubId>) -> bool;
}

/// An MQTT 5 Subscription Identifier (1 to 268 435 455): four bytes, none for nothing.
pub(crate) type SubId = std::num::NonZeroU32;

/// `id` as a [`SubId`], if it is one.
pub(crate) fn sub_id(id: Option<usize>) -> Option<SubId> {
    SubId::new(u32::try_from(id?).ok()?)
}

/// What a member asked of its shared subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemberOptions {
    /// Its granted QoS.
    pub(crate) qos: u8,
    /// MQTT 5 Retain As Published.
    pub(crate) retain_as_published: bool,
    /// The MQTT 5 Subscription Identifier it subscribed with, given with each message.
    pub(crate) id: Option<SubId>,
}

/// One connection in a group.
#[derive(Debug)]
struct Member {
    connection: u64,
    /// Its granted QoS.
    qos: u8,
    /// Its subscription's Retain As Published (MQTT 5): messages published retained are
    /// delivered with the retain flag.
    retain_as_published: bool,
    /// Its subscription's Subscription Identifier (MQTT 5).
    id: Option<SubId>,
    tx: Arc<dyn MemberPort>,
    /// QoS 1 messages given to it and not acknowledged yet.
    outstanding: usize,
    /// Messages given to it and not yet written (or dropped) by its connection.
    queued: usize,
}

impl Member {
    /// Whether it may be given one more message delivered at `qos`.
    fn has_room(&self, qos: u8) -> bool {
        self.queued < MEMBER_QUEUE && (qos == 0 || self.outstanding < MEMBER_INFLIGHT)
    }
}

#[derive(Debug, Default)]
struct Members {
    list: Vec<Member>,
    /// Where the round-robin goes on.
    next: usize,
}

/// What became of a message offered to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Given {
    Sent,
    /// Every member is at [`MEMBER_INFLIGHT`] or [`MEMBER_QUEUE`].
    Full,
    NoMembers,
}

/// One shared subscription group.
#[derive(Debug)]
pub(crate) struct Group {
    key: GroupKey,
    members: Mutex<Members>,
    /// Woken when a member acknowledged a message or joined.
    room: Notify,
    /// Cancelled when the group is removed: its dispatcher ends and disconnects its link.
    stop: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Group {
    fn join(&self, connection: u64, options: MemberOptions, tx: &Arc<dyn MemberPort>) {
        let MemberOptions {
            qos,
            retain_as_published,
            id,
        } = options;
        let mut members = lock(&self.members);
        if let Some(member) = members.list.iter_mut().find(|m| m.connection == connection) {
            member.qos = qos;
            member.retain_as_published = retain_as_published;
            member.id = id;
            member.tx = Arc::clone(tx);
        } else {
            members.list.push(Member {
                connection,
                qos,
                retain_as_published,
                id,
                tx: Arc::clone(tx),
                outstanding: 0,
                queued: 0,
            });
        }
        drop(members);
        self.room.notify_one();
    }

    /// Removes `connection`; whether the group is empty now.
    fn leave(&self, connection: u64) -> bool {
        let mut members = lock(&self.members);
        members.list.retain(|m| m.connection != connection);
        members.list.is_empty()
    }

    /// `connection` acknowledged (or dropped) a QoS 1 message the group gave it.
    pub(crate) fn acknowledged(&self, connection: u64) {
        let mut members = lock(&self.members);
        if let Some(member) = members.list.iter_mut().find(|m| m.connection == connection) {
            member.outstanding = member.outstanding.saturating_sub(1);
        }
        drop(members);
        self.room.notify_one();
    }

    /// `connection` took a message the group gave it off its queue (wrote or dropped it).
    pub(crate) fn written(&self, connection: u64) {
        let mut members = lock(&self.members);
        let mut freed = false;
        if let Some(member) = members.list.iter_mut().find(|m| m.connection == connection) {
            freed = member.queued == MEMBER_QUEUE;
            member.queued = member.queued.saturating_sub(1);
        }
        drop(members);
        if freed {
            self.room.notify_one();
        }
    }

    /// Gives `message` to the next member (round-robin) with room, or, if `force`, to the
    /// next member whatever it has in flight.
    fn give(&self, message: &Arc<SharedMessage>, force: bool) -> Given {
        let mut members = lock(&self.members);
        loop {
            let count = members.list.len();
            if count == 0 {
                return Given::NoMembers;
            }
            let start = members.next % count;
            let picked = (0..count).map(|i| (start + i) % count).find(|&i| {
                let member = &members.list[i];
                force || member.has_room(member.qos.min(message.qos))
            });
            let Some(at) = picked else {
                return Given::Full;
            };
            let member = &mut members.list[at];
            let qos = member.qos.min(message.qos);
            let retain = member.retain_as_published && message.retained;
            if !member.tx.give(Arc::clone(message), qos, retain, member.id) {
                // Its connection is gone (it leaves the group on its way out).
                members.list.swap_remove(at);
                continue;
            }
            member.queued += 1;
            if qos > 0 {
                member.outstanding += 1;
            }
            members.next = at + 1;
            return Given::Sent;
        }
    }
}

/// Every shared subscription group of the broker.
#[derive(Debug)]
pub(crate) struct SharedSubscriptions {
    registrar: Registrar,
    /// The filters the groups' links may make the router keep (with the clients' own).
    filters: Arc<FilterBudget>,
    groups: Mutex<HashMap<GroupKey, Arc<Group>>>,
    metrics: BrokerMetrics,
}

/// Why a connection could not join a group.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JoinError {
    /// [`MAX_GROUPS`] groups exist already.
    #[error("{MAX_GROUPS} shared subscription groups exist already")]
    TooManyGroups,
    /// The router did not register the group's link.
    #[error("the router did not register the group's link: {0}")]
    Link(#[from] LinkRefused),
    /// The filter is new to the router, which keeps the most filters it may.
    #[error("the router keeps the most filters it may (max_filters)")]
    Filters,
}

impl JoinError {
    /// The reason a refused subscription is counted under.
    pub(crate) fn refusal(&self) -> SubscribeRefusal {
        match self {
            JoinError::TooManyGroups | JoinError::Link(_) => SubscribeRefusal::SharedGroups,
            JoinError::Filters => SubscribeRefusal::RouterFilters,
        }
    }
}

impl SharedSubscriptions {
    /// No groups yet; their links are registered through `registrar`.
    pub(crate) fn new(
        registrar: Registrar,
        filters: Arc<FilterBudget>,
        metrics: BrokerMetrics,
    ) -> Self {
        SharedSubscriptions {
            registrar,
            filters,
            groups: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Adds `connection` (its mux port `tx`) to the group (`group`, `filter`) at granted
    /// `qos`, creating the group and its link if it is the first member (the link's
    /// subscription is with the router before this returns, so a publish after the SUBACK
    /// reaches the group).
    ///
    /// # Errors
    ///
    /// [`JoinError`] if the group cannot be created.
    pub(crate) fn join(
        &self,
        group: &str,
        filter: &str,
        connection: u64,
        options: MemberOptions,
        tx: &Arc<dyn MemberPort>,
    ) -> Result<(), JoinError> {
        let key = (group.to_owned(), filter.to_owned());
        {
            let groups = lock(&self.groups);
            if let Some(existing) = groups.get(&key)
                && !existing.stop.is_cancelled()
            {
                existing.join(connection, options, tx);
                return Ok(());
            }
            if groups.len() >= MAX_GROUPS {
                return Err(JoinError::TooManyGroups);
            }
        }
        if !self.filters.admit(filter) {
            return Err(JoinError::Filters);
        }
        // A reused name (`router::LinkName`): groups come and go, and the router remembers
        // every name it was given.
        let name = self.registrar.link_name();
        let (mut link_tx, link_rx, _connack) =
            self.registrar.link(LinkRequest::internal(name.as_str()))?;
        link_tx
            .subscribe(filter)
            .map_err(|err| LinkRefused(err.to_string()))?;
        let created = Arc::new(Group {
            key: key.clone(),
            members: Mutex::new(Members::default()),
            room: Notify::new(),
            stop: CancellationToken::new(),
        });
        let mut groups = lock(&self.groups);
        if let Some(existing) = groups.get(&key)
            && !existing.stop.is_cancelled()
        {
            // Another member created it meanwhile: ours goes.
            existing.join(connection, options, tx);
            drop(groups);
            created.stop.cancel();
        } else {
            // New, or in place of one whose link the router dropped.
            created.join(connection, options, tx);
            groups.insert(key, Arc::clone(&created));
            self.metrics.set_shared_groups(groups.len());
            drop(groups);
            debug!(
                group,
                filter,
                link = name.as_str(),
                "shared subscription group created"
            );
        }
        tokio::spawn(dispatch(
            created,
            link_tx,
            link_rx,
            name,
            self.metrics.clone(),
        ));
        Ok(())
    }

    /// Removes `connection` from the group `key`; the last member leaving removes the group.
    pub(crate) fn leave(&self, key: &GroupKey, connection: u64) {
        let mut groups = lock(&self.groups);
        let Some(group) = groups.get(key) else {
            return;
        };
        if group.leave(connection) {
            group.stop.cancel();
            groups.remove(key);
            self.metrics.set_shared_groups(groups.len());
            debug!(
                group = key.0,
                filter = key.1,
                "shared subscription group removed"
            );
        }
    }

    /// Gives `messages`, which a member that left was given and did not acknowledge, to
    /// other members of their groups (counted in `shared_redeliveries_total`); a message
    /// whose group has no member left is counted in `shared_undelivered_total` (a durable
    /// kind still waits for durability: the replay publishes it again).
    pub(crate) fn redeliver(&self, messages: impl IntoIterator<Item = Arc<SharedMessage>>) {
        for message in messages {
            match message.group.give(&message, true) {
                Given::Sent => self.metrics.shared_redelivered(),
                Given::Full | Given::NoMembers => self.metrics.shared_undelivered(),
            }
        }
    }
}

/// Reads what the router forwards to a group's link, giving each message to one member, until
/// the group is removed (or the router drops the link); then disconnects the link and gives its
/// `name` back.
async fn dispatch(
    group: Arc<Group>,
    mut tx: LinkTx,
    mut rx: LinkRx,
    name: LinkName,
    metrics: BrokerMetrics,
) {
    'reading: loop {
        let note = tokio::select! {
            biased;
            () = group.stop.cancelled() => break,
            note = rx.next() => note,
        };
        match note {
            // A retained message the router sends the group's new subscription: not for
            // shared subscriptions (MQTT 5 §4.8.2). Live retained publishes come unflagged.
            Ok(Some(Notification::Forward(forward))) if forward.publish.retain => {}
            Ok(Some(Notification::Forward(forward))) => {
                let mut properties = forward.properties;
                if crate::expiry::restore(&mut properties) == crate::expiry::Aged::Expired {
                    metrics.dropped(crate::metrics::DropReason::Expired);
                    continue;
                }
                let retained =
                    crate::carry::get(properties.as_ref(), crate::carry::RETAINED).is_some();
                let qos = crate::qos::take_original(&forward.publish.topic, &mut properties)
                    .min(crate::qos::MAX_QOS);
                let kept = crate::expiry::Kept::of(&properties);
                let message = Arc::new(SharedMessage {
                    group: Arc::clone(&group),
                    topic: forward.publish.topic,
                    payload: forward.publish.payload,
                    properties,
                    qos,
                    retained,
                    kept,
                });
                loop {
                    match group.give(&message, false) {
                        Given::Sent => {
                            metrics.shared_delivered();
                            break;
                        }
                        Given::NoMembers => {
                            metrics.shared_undelivered();
                            break;
                        }
                        Given::Full => {
                            tokio::select! {
                                biased;
                                () = group.stop.cancelled() => break 'reading,
                                () = group.room.notified() => {}
                                () = tokio::time::sleep(RECHECK) => {}
                            }
                        }
                    }
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(err) => {
                if !group.stop.is_cancelled() {
                    warn!(group = group.key.0, filter = group.key.1, cause = %err, "the router dropped a shared subscription group's link: the next member to subscribe creates it again");
                    // Marks the group dead: a new subscription replaces it.
                    group.stop.cancel();
                }
                break;
            }
        }
    }
    let bye = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    if let Err(err) = hand_over(&mut tx, &mut vec![Packet::Disconnect(bye, None)]).await {
        debug!(cause = %err, "router gone at a group's disconnect");
    }
    drop(name);
}

#[cfg(test)]
mod tests {

    use super::*;

    fn group() -> Arc<Group> {
        Arc::new(Group {
            key: ("g".to_owned(), "t/#".to_owned()),
            members: Mutex::new(Members::default()),
            room: Notify::new(),
            stop: CancellationToken::new(),
        })
    }

    fn message(group: &Arc<Group>, qos: u8) -> Arc<SharedMessage> {
        Arc::new(SharedMessage {
            group: Arc::clone(group),
            topic: Bytes::from_static(b"t/1"),
            payload: Bytes::from_static(b"x"),
            properties: None,
            qos,
            retained: false,
            kept: crate::expiry::Kept::of(&None),
        })
    }

    /// A member's port that keeps the QoS of what it was given, until it is gone.
    #[derive(Debug, Default)]
    struct TestPort {
        given: Mutex<Vec<u8>>,
        gone: std::sync::atomic::AtomicBool,
    }

    impl MemberPort for TestPort {
        fn give(
            &self,
            _message: Arc<SharedMessage>,
            qos: u8,
            _retain: bool,
            _id: Option<SubId>,
        ) -> bool {
            if self.gone.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            lock(&self.given).push(qos);
            true
        }
    }

    /// A member's options at `qos`, without Retain As Published.
    fn at_qos(qos: u8) -> MemberOptions {
        MemberOptions {
            qos,
            retain_as_published: false,
            id: None,
        }
    }

    /// A new port, as the group holds it and as the test reads it.
    fn port() -> (Arc<dyn MemberPort>, Arc<TestPort>) {
        let port = Arc::new(TestPort::default());
        (Arc::clone(&port) as Arc<dyn MemberPort>, port)
    }

    /// The QoS of each message the port was given since the last call.
    fn taken(port: &TestPort) -> Vec<u8> {
        std::mem::take(&mut *lock(&port.given))
    }

    #[test]
    fn messages_go_round_robin_at_each_members_qos_and_skip_full_members() {
        let group = group();
        let (tx1, rx1) = port();
        let (tx2, rx2) = port();
        group.join(1, at_qos(1), &tx1);
        group.join(2, at_qos(0), &tx2);
        for _ in 0..4 {
            assert_eq!(group.give(&message(&group, 1), false), Given::Sent);
        }
        assert_eq!(taken(&rx1), [1, 1], "granted 1: QoS 1");
        assert_eq!(taken(&rx2), [0, 0], "granted 0: QoS 0");

        // Member 1 at its in-flight bound: everything goes to member 2 (QoS 0, no bound).
        assert_eq!(lock(&group.members).list[0].outstanding, 2);
        lock(&group.members).list[0].outstanding = MEMBER_INFLIGHT;
        for _ in 0..3 {
            assert_eq!(group.give(&message(&group, 1), false), Given::Sent);
        }
        assert!(taken(&rx1).is_empty());
        assert_eq!(taken(&rx2).len(), 3);
        // Acknowledged: room again.
        group.acknowledged(1);
        group.give(&message(&group, 1), false);
        group.give(&message(&group, 1), false);
        assert_eq!(taken(&rx1).len() + taken(&rx2).len(), 2);

        // A member that left is never picked; a group without members says so.
        assert!(!group.leave(2));
        assert!(group.leave(1));
        assert_eq!(group.give(&message(&group, 0), true), Given::NoMembers);
    }

    #[test]
    fn a_stalled_member_bounds_what_it_is_given() {
        let group = group();
        let (tx, rx) = port();
        group.join(1, at_qos(0), &tx);
        for _ in 0..MEMBER_QUEUE {
            assert_eq!(group.give(&message(&group, 0), false), Given::Sent);
        }
        assert_eq!(group.give(&message(&group, 0), false), Given::Full);
        assert_eq!(
            group.give(&message(&group, 0), true),
            Given::Sent,
            "a redelivery is never refused"
        );
        group.written(1);
        group.written(1);
        assert_eq!(group.give(&message(&group, 0), false), Given::Sent);
        assert_eq!(taken(&rx).len(), MEMBER_QUEUE + 2);
        // A member whose connection is gone is dropped.
        rx.gone.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(group.give(&message(&group, 0), true), Given::NoMembers);
    }

    #[test]
    fn share_filters_are_parsed_and_malformed_ones_recognised() {
        assert_eq!(parse("fleet/#"), ShareFilter::NotShared);
        assert_eq!(parse("$SYS/#"), ShareFilter::NotShared);
        assert_eq!(
            parse("$share/g/fleet/+/+/hb"),
            ShareFilter::Shared {
                group: "g",
                filter: "fleet/+/+/hb"
            }
        );
        assert_eq!(
            parse("$share/g/#"),
            ShareFilter::Shared {
                group: "g",
                filter: "#"
            }
        );
        for malformed in [
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/g+/a",
            "$share/#/a",
            "$share/+/a",
            "$share/g/a/#/b",
            "$share/g/a+/b",
            "$share/g/$SYS/#",
            "$share/g/a\0b",
        ] {
            assert_eq!(parse(malformed), ShareFilter::Malformed, "{malformed:?}");
        }
    }
}
