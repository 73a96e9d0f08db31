//! The connection's side of end-to-end acknowledgement (see `durability`): how an
//! [`Established`] connection queues its PUBACKs in a [`PubAckQueue`](super::gate::PubAckQueue),
//! registers what waits for durability, and writes the PUBACKs once they are due.

use bytes::Bytes;
use rumqttd::protocol::{Packet, PubAck, PubAckReason, Publish};

use super::session::Established;
use crate::durability::{MessageKey, Waiter, is_gated_topic};
use crate::metrics::DisconnectReason;

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
            self.extras()
                .consumer_forwards
                .insert(pkid, MessageKey::new(topic, payload));
        }
    }

    /// A durable consumer acknowledged the forward `pkid` with `reason`.
    pub(super) fn consumer_acknowledged(&mut self, pkid: u16, reason: PubAckReason) {
        let forwards = self.extras.as_mut();
        let Some(key) = forwards.and_then(|e| e.consumer_forwards.remove(&pkid)) else {
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
