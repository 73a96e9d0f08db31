//! End-to-end acknowledgement: a vehicle's QoS 1 `event`, `ack` and `status` publishes are
//! acknowledged to the vehicle only once they are durable.
//!
//! rumqttd's router keeps messages in memory only: a PUBACK sent once the router has a message
//! (what rumqttd's own network code does) promises nothing once the process dies, nor once a
//! bounded commit log drops a segment its subscriber had not read. Our front end writes every
//! PUBACK itself, so it holds back the PUBACK of a **gated** publish (QoS 1, on
//! `fleet/{f}/{v}/event`, `ack` or `status`, from anyone but a durable consumer) until one of:
//!
//! - a **durable consumer** acknowledged its copy: a connection whose client id is listed in
//!   [`BrokerConfig::durable_consumers`](crate::BrokerConfig::durable_consumers), or that
//!   logged in with the `bridge` role. The bridge acknowledges a message only once its store
//!   committed it. The connection (`connection::outbound`) remembers which message each
//!   QoS 1 forward to a durable consumer carried (by packet id), and its PUBACK names it here
//!   ([`Durability::acknowledged`]). Messages are matched by topic and payload bytes (a
//!   sealed payload carries a per-vehicle counter, so two different messages never match);
//! - or, with a [`journal`] (the standalone broker), the journal committed it: fsynced, in a
//!   transaction shared with everything else that arrived meanwhile (group commit). A
//!   journaled message is deleted once a durable consumer acknowledged it, and published
//!   again to the durable consumers whenever one subscribes (rumqttd's sessions die with the
//!   process: the bridge's first subscription after a restart is what gets them back).
//!
//! Each waiting message has its publisher's **waiter** ([`Waiter`]): the connection's mux
//! channel and the number of its entry in the connection's PUBACK queue
//! (`connection::gate`), which writes the PUBACKs in the order of the PUBLISHes. A connection
//! that ends drops its waiters ([`Durability::forget`]); its client sends the message again
//! after reconnecting, and the same bytes find the same journal row.
//!
//! What the router loses never reaches a durable consumer, so it would wait forever: every
//! [`REPLAY_INTERVAL`] the messages that have waited longer than [`REPLAY_AFTER`] since they
//! were last published are published again ([`Durability::replay`]), as everything waiting is
//! when a durable consumer subscribes. Replays go through the mux link, handed to the router
//! at QoS 0 without a QoS marker: on these topics that means their kind's QoS 1 (`qos`), so
//! a consumer gets them at QoS 1. In chunks paced by the acknowledgements. A durable
//! consumer sees such a message twice at most: the store drops duplicates.
//!
//! # Layout
//!
//! - this module: [`Durability`], the waiters, the replays;
//! - [`journal`]: the SQLite journal and its writer task.

pub(crate) mod journal;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::Packet;
use shared::TopicKind;
use shared::topic::kind_of;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::journal::Journal;
use crate::auth::{Identity, Role};
use crate::metrics::BrokerMetrics;
use crate::mux::{Mux, MuxEvent, PortTx, publish_with};

/// How often waiting messages are checked for a replay.
pub(crate) const REPLAY_INTERVAL: Duration = Duration::from_secs(10);

/// A message that has waited this long since it was last published is published again.
pub(crate) const REPLAY_AFTER: Duration = Duration::from_secs(30);

/// Messages a replay publishes at a time...
const REPLAY_CHUNK: usize = 256;

/// ...and how many of them may be unacknowledged before it publishes more...
const REPLAY_WINDOW: usize = 1024;

/// ...waiting at most this long for them.
const REPLAY_PATIENCE: Duration = Duration::from_secs(5);

/// A message, as the broker tells one from another: its topic and payload bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct MessageKey {
    pub(crate) topic: Bytes,
    pub(crate) payload: Bytes,
}

impl MessageKey {
    /// The key of a message.
    pub(crate) fn new(topic: &Bytes, payload: &Bytes) -> Self {
        MessageKey {
            topic: topic.clone(),
            payload: payload.clone(),
        }
    }

    /// Bytes it counts for in the journal's bound.
    pub(crate) fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }
}

/// Whether a QoS 1 publish on `topic` waits for durability: `event`, `ack` and `status`.
pub(crate) fn is_gated_topic(topic: &[u8]) -> bool {
    matches!(
        kind_of(topic),
        Some(TopicKind::Event | TopicKind::Ack | TopicKind::Status)
    )
}

/// A publisher waiting for its message to be durable.
#[derive(Debug)]
pub(crate) struct Waiter {
    /// The connection (its id in the mux's tables).
    pub(crate) connection: u64,
    /// The message's entry in the connection's PUBACK queue.
    pub(crate) entry: u64,
    /// Where [`MuxEvent::Durable`] goes.
    pub(crate) tx: PortTx,
}

/// One waiting message.
#[derive(Debug)]
struct Waiting {
    waiters: Vec<Waiter>,
    /// When it was first seen, for replays in arrival order.
    order: u64,
    /// When it was last published (by its publisher or by a replay).
    sent: Instant,
}

/// The waiting messages and their waiters.
#[derive(Debug)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<MessageKey, Waiting>>,
    order: AtomicU64,
    metrics: BrokerMetrics,
}

impl Waiters {
    fn new(metrics: BrokerMetrics) -> Self {
        Waiters {
            map: Mutex::new(HashMap::new()),
            order: AtomicU64::new(0),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<MessageKey, Waiting>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `waiter` waits for `key`.
    fn add(&self, key: MessageKey, waiter: Waiter) {
        let mut map = self.lock();
        let waiting = map.entry(key).or_insert_with(|| Waiting {
            waiters: Vec::new(),
            order: self.order.fetch_add(1, Ordering::Relaxed),
            sent: Instant::now(),
        });
        waiting.sent = Instant::now();
        waiting.waiters.push(waiter);
        self.metrics.waiting_for_durability(1);
    }

    /// `key` is durable: every waiter is told.
    pub(crate) fn release(&self, key: &MessageKey) {
        let Some(waiting) = self.lock().remove(key) else {
            return;
        };
        self.metrics
            .waiting_for_durability(-(waiting.waiters.len() as i64));
        for waiter in waiting.waiters {
            // The connection may be gone: it dropped its waiters, or is about to.
            let _ = waiter.tx.unbounded_send(MuxEvent::Durable(waiter.entry));
        }
    }

    /// `connection` no longer waits for `key`.
    fn forget(&self, connection: u64, key: &MessageKey) {
        let mut map = self.lock();
        let Some(waiting) = map.get_mut(key) else {
            return;
        };
        let before = waiting.waiters.len();
        waiting.waiters.retain(|w| w.connection != connection);
        let gone = before - waiting.waiters.len();
        if waiting.waiters.is_empty() {
            map.remove(key);
        }
        drop(map);
        self.metrics.waiting_for_durability(-(gone as i64));
    }

    fn contains(&self, key: &MessageKey) -> bool {
        self.lock().contains_key(key)
    }

    /// The waiting messages last published before `before` (all with `None`), oldest first,
    /// marked as published now.
    fn due(&self, before: Option<Instant>) -> Vec<MessageKey> {
        let now = Instant::now();
        let mut map = self.lock();
        let mut due: Vec<(u64, MessageKey)> = map
            .iter_mut()
            .filter(|(_, w)| before.is_none_or(|before| w.sent <= before))
            .map(|(key, w)| {
                w.sent = now;
                (w.order, key.clone())
            })
            .collect();
        drop(map);
        due.sort_unstable_by_key(|(order, _)| *order);
        due.into_iter().map(|(_, key)| key).collect()
    }
}

/// End-to-end acknowledgement for one broker (see the [module docs](self)).
pub(crate) struct Durability {
    /// Whether publishes wait for durability at all.
    enabled: bool,
    /// Client ids of the durable consumers.
    consumers: HashSet<String>,
    waiters: Arc<Waiters>,
    journal: Option<Journal>,
    mux: Arc<Mux>,
    metrics: BrokerMetrics,
    /// A durable consumer subscribed: replay everything published before then.
    subscribed: Notify,
    /// When the latest of those subscriptions was answered: messages published after it
    /// reached the consumer through its subscription and are not replayed.
    subscribed_at: Mutex<Option<Instant>>,
    /// Durable consumers connected now.
    connected: AtomicUsize,
}

opaque_debug!(Durability);

impl Durability {
    /// End-to-end acknowledgement with `consumers` as the durable consumers' client ids and
    /// the opened `journal`, if any; off if both are empty. Replays go through `mux`.
    pub(crate) fn new(
        consumers: &[String],
        journal: Option<Journal>,
        waiters: Arc<Waiters>,
        mux: Arc<Mux>,
        metrics: BrokerMetrics,
    ) -> Self {
        Durability {
            enabled: journal.is_some() || !consumers.is_empty(),
            consumers: consumers.iter().cloned().collect(),
            waiters,
            journal,
            mux,
            metrics,
            subscribed: Notify::new(),
            subscribed_at: Mutex::new(None),
            connected: AtomicUsize::new(0),
        }
    }

    /// The waiters' table, for a journal opened before this.
    pub(crate) fn waiters(metrics: &BrokerMetrics) -> Arc<Waiters> {
        Arc::new(Waiters::new(metrics.clone()))
    }

    /// Whether a connection of `identity` as `client_id` is a durable consumer: its PUBACKs
    /// prove messages durable, and its own publishes do not wait.
    pub(crate) fn is_consumer(&self, identity: &Identity, client_id: &str) -> bool {
        self.enabled
            && match identity {
                Identity::Client {
                    role: Role::Bridge, ..
                } => true,
                Identity::Probe => false,
                _ => self.consumers.contains(client_id),
            }
    }

    /// Whether the publishes of a connection of `identity` that is a durable consumer or not
    /// (`consumer`) may wait for durability.
    pub(crate) fn gates(&self, identity: &Identity, consumer: bool) -> bool {
        self.enabled && !consumer && *identity != Identity::Probe
    }

    /// A gated message arrived: `waiter` waits until it is durable. With a journal, it is
    /// appended (and the waiter released once committed).
    pub(crate) fn expect(&self, key: MessageKey, waiter: Waiter) {
        self.waiters.add(key.clone(), waiter);
        if let Some(journal) = &self.journal {
            journal.append(key);
        }
    }

    /// A durable consumer acknowledged its copy of `key`: whoever waits for it is released,
    /// and its journal row goes.
    pub(crate) fn acknowledged(&self, key: MessageKey) {
        self.waiters.release(&key);
        if let Some(journal) = &self.journal {
            journal.acknowledged(key);
        }
    }

    /// `connection` ended: it no longer waits for `keys`.
    pub(crate) fn forget<'a>(&self, connection: u64, keys: impl Iterator<Item = &'a MessageKey>) {
        for key in keys {
            self.waiters.forget(connection, key);
        }
    }

    /// Whether a waiting message may still become durable: a journal commits, or a durable
    /// consumer is connected to acknowledge it.
    pub(crate) fn may_become_durable(&self) -> bool {
        self.journal.is_some() || self.connected.load(Ordering::Acquire) > 0
    }

    /// A durable consumer connected (`true`) or went away.
    pub(crate) fn consumer_connected(&self, connected: bool) {
        if connected {
            self.connected.fetch_add(1, Ordering::AcqRel);
        } else {
            self.connected.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The router answered a durable consumer's SUBSCRIBE: everything waiting since before
    /// now is published again, so the consumer gets what the router lost or delivered to
    /// nobody. What arrives later is routed to the new subscription and is not replayed.
    pub(crate) fn consumer_subscribed(&self) {
        *self
            .subscribed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        self.subscribed.notify_one();
    }

    /// Whether `key` is still waiting or journaled.
    fn outstanding(&self, key: &MessageKey) -> bool {
        self.waiters.contains(key) || self.journal.as_ref().is_some_and(|j| j.contains(key))
    }

    /// Replays until `stop`: everything from before the subscription when a durable consumer
    /// subscribed, what has waited longer than [`REPLAY_AFTER`] every [`REPLAY_INTERVAL`]
    /// while one is connected.
    pub(crate) async fn replay(self: Arc<Self>, stop: CancellationToken) {
        if !self.enabled {
            return;
        }
        let mut tick = interval(REPLAY_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pending = None;
        loop {
            let everything = tokio::select! {
                () = stop.cancelled() => return,
                () = self.subscribed.notified() => true,
                _ = tick.tick() => false,
            };
            if !everything && self.connected.load(Ordering::Acquire) == 0 {
                continue;
            }
            let before = if everything {
                // The replay task may run late (a loaded machine): a message published
                // between the subscription and now already went to the consumer.
                self.subscribed_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
            } else {
                match Instant::now().checked_sub(REPLAY_AFTER) {
                    Some(before) => Some(before),
                    None => continue,
                }
            };
            let keys = self.due(before);
            if keys.is_empty() {
                continue;
            }
            if everything {
                info!(
                    messages = keys.len(),
                    "a durable consumer subscribed: publishing again what is not acknowledged yet"
                );
            } else {
                debug!(
                    messages = keys.len(),
                    "publishing again what has waited for a durable consumer for {REPLAY_AFTER:?}"
                );
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.publish_again(&keys, &mut pending) => {}
            }
        }
    }

    /// What to replay: journal rows and waiting messages last published before `before`
    /// (everything with `None`), oldest first, each once.
    fn due(&self, before: Option<Instant>) -> Vec<MessageKey> {
        let mut keys = match &self.journal {
            Some(journal) => journal.due(before),
            None => Vec::new(),
        };
        let mut seen: HashSet<MessageKey> = keys.iter().cloned().collect();
        for key in self.waiters.due(before) {
            if seen.insert(key.clone()) {
                keys.push(key);
            }
        }
        keys
    }

    /// Publishes `keys` through the mux link at QoS 0, [`REPLAY_CHUNK`] at a time, each chunk
    /// once no more than [`REPLAY_WINDOW`] of those before it are unacknowledged (or
    /// [`REPLAY_PATIENCE`] has passed).
    async fn publish_again(&self, keys: &[MessageKey], pending: &mut Option<u64>) {
        for (i, chunk) in keys.chunks(REPLAY_CHUNK).enumerate() {
            let published = &keys[..i * REPLAY_CHUNK];
            let started = Instant::now();
            while started.elapsed() < REPLAY_PATIENCE
                && published
                    .iter()
                    .rev()
                    .take(REPLAY_WINDOW + REPLAY_CHUNK)
                    .filter(|key| self.outstanding(key))
                    .count()
                    > REPLAY_WINDOW
            {
                sleep(Duration::from_millis(20)).await;
            }
            let mut batch: Vec<Packet> = chunk
                .iter()
                .filter(|key| self.outstanding(key))
                .map(|key| {
                    Packet::Publish(publish_with(&key.topic, &key.payload, 0, 0, false), None)
                })
                .collect();
            let count = batch.len() as u64;
            if let Err(err) = self.mux.send(&mut batch, pending).await {
                warn!(cause = %err, "could not publish waiting messages again");
                return;
            }
            self.metrics.replayed(count);
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn key(payload: &'static [u8]) -> MessageKey {
        MessageKey::new(
            &Bytes::from_static(b"fleet/f/v/event"),
            &Bytes::from_static(payload),
        )
    }

    #[test]
    fn gated_kinds() {
        assert!(is_gated_topic(b"fleet/f/v/event"));
        assert!(is_gated_topic(b"fleet/f/v/ack"));
        assert!(is_gated_topic(b"fleet/f/v/status"));
        assert!(!is_gated_topic(b"fleet/f/v/hb"));
        assert!(!is_gated_topic(b"fleet/f/v/cmd"));
        assert!(!is_gated_topic(b"other/topic"));
    }

    #[test]
    fn release_tells_every_waiter_and_forget_drops_one() {
        let metrics = BrokerMetrics::default();
        let waiters = Waiters::new(metrics.clone());
        let (tx, mut rx) = crate::mux::port();
        waiters.add(
            key(b"a"),
            Waiter {
                connection: 1,
                entry: 7,
                tx: tx.clone(),
            },
        );
        waiters.add(
            key(b"a"),
            Waiter {
                connection: 2,
                entry: 9,
                tx: tx.clone(),
            },
        );
        waiters.add(
            key(b"b"),
            Waiter {
                connection: 1,
                entry: 8,
                tx,
            },
        );
        assert_eq!(metrics.durability_waiting(), 3);
        waiters.forget(1, &key(b"b"));
        assert!(!waiters.contains(&key(b"b")), "no waiter left: gone");
        assert_eq!(metrics.durability_waiting(), 2);
        waiters.release(&key(b"a"));
        let mut told = Vec::new();
        while let Ok(MuxEvent::Durable(entry)) = rx.try_recv() {
            told.push(entry);
        }
        assert_eq!(told, [7, 9]);
        assert_eq!(metrics.durability_waiting(), 0);
        waiters.release(&key(b"a"));
        assert!(rx.try_recv().is_err(), "released once");
    }

    #[test]
    fn due_is_oldest_first_and_marks_as_sent() {
        let waiters = Waiters::new(BrokerMetrics::default());
        let (tx, _rx) = crate::mux::port();
        for (i, payload) in [&b"1"[..], b"2", b"3"].into_iter().enumerate() {
            let key = MessageKey::new(
                &Bytes::from_static(b"fleet/f/v/event"),
                &Bytes::copy_from_slice(payload),
            );
            waiters.add(
                key,
                Waiter {
                    connection: 1,
                    entry: i as u64,
                    tx: tx.clone(),
                },
            );
        }
        let all = waiters.due(None);
        let payloads: Vec<&[u8]> = all.iter().map(|k| &k.payload[..]).collect();
        assert_eq!(payloads, [b"1", b"2", b"3"]);
        let long_ago = Instant::now() - Duration::from_secs(60);
        assert!(waiters.due(Some(long_ago)).is_empty(), "just sent");
    }

    #[test]
    fn a_subscription_replays_only_what_was_published_before_it() {
        // The replay a durable consumer's SUBSCRIBE triggers may run late; what arrived after
        // the subscription was routed to it and must not come a second time (a CI run saw
        // that second copy).
        let waiters = Waiters::new(BrokerMetrics::default());
        let (tx, _rx) = crate::mux::port();
        let waiter = |entry| Waiter {
            connection: 1,
            entry,
            tx: tx.clone(),
        };
        waiters.add(key(b"before"), waiter(1));
        std::thread::sleep(Duration::from_millis(2));
        let subscribed_at = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        waiters.add(key(b"after"), waiter(2));
        let due = waiters.due(Some(subscribed_at));
        let payloads: Vec<&[u8]> = due.iter().map(|k| &k.payload[..]).collect();
        assert_eq!(payloads, [b"before"]);
    }
}
