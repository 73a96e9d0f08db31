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

use rumqttd::protocol::Packet;

use crate::durability::MessageKey;

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
