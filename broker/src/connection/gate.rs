//! [`PubAckQueue`]: the QoS 1 publishes of one connection awaiting their PUBACK, in the order
//! they arrived.
//!
//! A PUBACK is written once the router has the message (the mux link's or the connection's
//! own link's acknowledgement) and, for a publish that waits for durability (see
//! `durability`), once it is durable; and only after the PUBACKs of every earlier publish of
//! the connection (MQTT 3.1.1 §4.6: acknowledgements in the order of the PUBLISH packets).
//! A publish sent again (DUP) under a packet id still awaited gets no second entry. The queue
//! is bounded by the connection, which stops reading its socket while it holds
//! [`MAX_UNACKNOWLEDGED`] entries.

use std::collections::VecDeque;

use bytes::Bytes;
use rumqttd::protocol::{Packet, PubAck, PubAckReason, Publish};

use super::session::Established;
use crate::durability::{MessageKey, Waiter, is_gated_topic};
use crate::metrics::DisconnectReason;

/// QoS 1 publishes a connection may have awaiting their PUBACK before its socket is read no
/// further (TCP pushes back on the client).
pub(super) const MAX_UNACKNOWLEDGED: usize = 1024;

/// One publish awaiting its PUBACK.
#[derive(Debug)]
struct Entry {
    pkid: u16,
    /// Its number on this connection: how `durability` names it.
    number: u64,
    /// The acknowledgement to write, once the router had the message.
    routed: Option<Packet>,
    /// The message, while it waits for durability.
    waits_for: Option<MessageKey>,
}

/// The QoS 1 publishes of one connection awaiting their PUBACK, oldest first.
#[derive(Debug, Default)]
pub(super) struct PubAckQueue {
    entries: VecDeque<Entry>,
    next_number: u64,
}

impl PubAckQueue {
    /// A QoS 1 publish with `pkid` arrived, waiting for durability (`waits_for`: the message)
    /// or not. Returns its entry's number, or `None` if a publish with that packet id is still
    /// awaited (a DUP re-send: it shares the first one's entry).
    pub(super) fn push(&mut self, pkid: u16, waits_for: Option<MessageKey>) -> Option<u64> {
        if self.entries.iter().any(|e| e.pkid == pkid) {
            return None;
        }
        let number = self.next_number;
        self.next_number += 1;
        self.entries.push_back(Entry {
            pkid,
            number,
            routed: None,
            waits_for,
        });
        Some(number)
    }

    /// The router took the publish with `pkid`; `ack` is the PUBACK to write for it (the
    /// router's second acknowledgement of a DUP re-send is dropped). Gives `ack` back if no
    /// publish with that packet id is queued.
    pub(super) fn routed(&mut self, pkid: u16, ack: Packet) -> Option<Packet> {
        let Some(entry) = self.entries.iter_mut().find(|e| e.pkid == pkid) else {
            return Some(ack);
        };
        if entry.routed.is_none() {
            entry.routed = Some(ack);
        }
        None
    }

    /// The publish numbered `number` is durable.
    pub(super) fn durable(&mut self, number: u64) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.number == number) {
            entry.waits_for = None;
        }
    }

    /// The next PUBACK that may be written now, if the oldest publish has one.
    pub(super) fn pop_ready(&mut self) -> Option<Packet> {
        let first = self.entries.front()?;
        if first.routed.is_none() || first.waits_for.is_some() {
            return None;
        }
        self.entries.pop_front().and_then(|entry| entry.routed)
    }

    /// Whether no publish awaits its PUBACK.
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether every publish in it was taken by the router, and some wait for durability:
    /// what it still owes waits for that alone.
    pub(super) fn only_durability_left(&self) -> bool {
        !self.entries.is_empty() && self.entries.iter().all(|e| e.routed.is_some())
    }

    /// Whether it holds [`MAX_UNACKNOWLEDGED`] publishes.
    pub(super) fn is_full(&self) -> bool {
        self.entries.len() >= MAX_UNACKNOWLEDGED
    }

    /// The messages still waiting for durability.
    pub(super) fn waiting(&self) -> impl Iterator<Item = &MessageKey> {
        self.entries.iter().filter_map(|e| e.waits_for.as_ref())
    }
}

/// The connection's side of end-to-end acknowledgement (see `durability`).
impl Established {
    /// A QoS 1 `publish` with packet id `pkid` arrived (topic and payload already copied out
    /// of the read buffer): its PUBACK is queued, and if it waits for durability its waiter
    /// is registered (and, with a journal, the message appended). Returns whether to route
    /// it: not a DUP re-send of a publish that still waits for durability (the first copy
    /// is on its way; replays cover the rest).
    pub(super) fn expect_puback(&mut self, publish: &Publish, pkid: u16) -> bool {
        let waits = self.gated && is_gated_topic(&publish.topic);
        let key = waits.then(|| MessageKey::new(&publish.topic, &publish.payload));
        match self.pubacks.push(pkid, key.clone()) {
            Some(entry) => {
                if let Some(key) = key {
                    let waiter = Waiter {
                        connection: self.connection,
                        entry,
                        tx: self.port().tx.clone(),
                    };
                    self.ctx.durability.expect(key, waiter);
                }
                true
            }
            None => !waits,
        }
    }

    /// The router took the publish with `pkid` (`ack` is its PUBACK): written once it is
    /// due (see [`PubAckQueue`]).
    pub(super) fn routed(&mut self, pkid: u16, ack: Packet) -> Result<(), DisconnectReason> {
        if let Some(ack) = self.pubacks.routed(pkid, ack) {
            // Not one of ours (nothing queued it): as before, at once.
            self.incoming_inflight.retain(|&p| p != pkid);
            return self.answer(ack);
        }
        self.write_due_pubacks()
    }

    /// The publish numbered `entry` is durable.
    pub(super) fn durable(&mut self, entry: u64) -> Result<(), DisconnectReason> {
        self.pubacks.durable(entry);
        self.write_due_pubacks()
    }

    /// Acknowledges the QoS 1 publish `pkid` with `ack` now, or after the PUBACKs still owed
    /// for earlier publishes (a refused publish).
    pub(super) fn acknowledge_in_order(
        &mut self,
        pkid: u16,
        ack: Packet,
    ) -> Result<(), DisconnectReason> {
        if self.pubacks.is_empty() {
            return self.answer(ack);
        }
        if self.pubacks.push(pkid, None).is_some() && !self.incoming_inflight.contains(&pkid) {
            self.incoming_inflight.push(pkid);
        }
        self.routed(pkid, ack)
    }

    /// Draining: whether the PUBACKs still owed wait only for a durability that cannot come
    /// any more (no durable consumer is connected, and there is no journal). The connection
    /// then closes without them; its client sends those messages to the next broker.
    pub(super) fn owes_only_lost_causes(&self) -> bool {
        self.pubacks.only_durability_left() && !self.ctx.durability.may_become_durable()
    }

    /// Writes the PUBACKs that are due, in order.
    fn write_due_pubacks(&mut self) -> Result<(), DisconnectReason> {
        while let Some(ack) = self.pubacks.pop_ready() {
            if let Packet::PubAck(PubAck { pkid, .. }, _) = &ack {
                let pkid = *pkid;
                self.incoming_inflight.retain(|&p| p != pkid);
            }
            self.answer(ack)?;
        }
        Ok(())
    }

    /// A durable consumer is sent `topic` and `payload` at QoS 1 under `pkid`: its PUBACK
    /// will prove the message durable.
    pub(super) fn forwarded_to_consumer(&mut self, pkid: u16, topic: &Bytes, payload: &Bytes) {
        if self.consumer && is_gated_topic(topic) {
            self.consumer_forwards
                .insert(pkid, MessageKey::new(topic, payload));
        }
    }

    /// A durable consumer acknowledged the forward `pkid` with `reason`.
    pub(super) fn consumer_acknowledged(&mut self, pkid: u16, reason: PubAckReason) {
        let Some(key) = self.consumer_forwards.remove(&pkid) else {
            return;
        };
        if matches!(
            reason,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ) {
            self.ctx.durability.acknowledged(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rumqttd::protocol::{PubAck, PubAckReason};

    use super::*;

    fn ack(pkid: u16) -> Packet {
        Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        )
    }

    fn pkid(packet: Option<Packet>) -> Option<u16> {
        match packet {
            Some(Packet::PubAck(ack, _)) => Some(ack.pkid),
            _ => None,
        }
    }

    fn key() -> MessageKey {
        MessageKey::new(
            &Bytes::from_static(b"fleet/f/v/event"),
            &Bytes::from_static(b"e"),
        )
    }

    #[test]
    fn pubacks_go_out_in_publish_order() {
        let mut queue = PubAckQueue::default();
        let first = queue.push(1, Some(key())).unwrap();
        queue.push(2, None).unwrap();
        queue.routed(2, ack(2));
        assert_eq!(pkid(queue.pop_ready()), None, "2 waits for 1");
        queue.routed(1, ack(1));
        assert_eq!(pkid(queue.pop_ready()), None, "1 waits for durability");
        queue.durable(first);
        assert_eq!(pkid(queue.pop_ready()), Some(1));
        assert_eq!(pkid(queue.pop_ready()), Some(2));
        assert!(queue.is_empty());
    }

    #[test]
    fn a_dup_resend_shares_the_first_entry() {
        let mut queue = PubAckQueue::default();
        let number = queue.push(7, Some(key())).unwrap();
        assert_eq!(queue.push(7, Some(key())), None);
        assert_eq!(queue.entries.len(), 1);
        assert_eq!(queue.waiting().count(), 1);
        queue.routed(7, ack(7));
        queue.routed(7, ack(7));
        queue.durable(number);
        assert_eq!(pkid(queue.pop_ready()), Some(7));
        assert!(queue.is_empty());
        // A late durability notice for a finished entry changes nothing.
        queue.durable(number);
        let again = queue.push(7, None).unwrap();
        assert_ne!(again, number);
        assert_eq!(pkid(queue.pop_ready()), None, "not routed yet");
    }
}
