//! What the connection writes to its client: the router's notifications on the connection's
//! own link, and the mux link's events (PUBACKs of publishes the router took, commands).
//! Everything already queued is written in one go, flushed every [`MAX_WRITE_BATCH`].

use bytes::Bytes;
use rumqttd::{Forward, Notification};
use std::sync::Arc;

use rumqttd::protocol::{Packet, PubAck, PubAckReason, PublishProperties, SubAck, UnsubAck};
use shared::topic::kind_of;
use tracing::debug;

use super::inbound::put_back_refusals;
use super::network::PublishInfo;
use super::options::Judged;
use super::session::{Established, Held, MUX_PKIDS};
use crate::expiry::{Aged, Kept};
use crate::listener::Listener;
use crate::metrics::{DisconnectReason, DropReason};
use crate::mux::{CommandMessage, MuxEvent, publish_pkid, publish_with};
use crate::qos;
use crate::retained::{self, RetainedMessage};
use crate::router::{hand_over, try_next};
use crate::share::SharedMessage;

/// Most router notifications written in one go before the socket is flushed.
const MAX_WRITE_BATCH: usize = 1000;

impl Established {
    /// Writes what the mux link handed this connection: `first` and whatever else is queued.
    pub(super) async fn deliver_mux(&mut self, first: MuxEvent) -> Result<(), DisconnectReason> {
        let mut next = Some(first);
        let mut written = 0;
        while let Some(event) = next.take() {
            match event {
                MuxEvent::PubAck(pkid) => {
                    let ack = PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    };
                    self.routed(pkid, Packet::PubAck(ack, None))?;
                }
                MuxEvent::Durable(entry) => self.durable(entry)?,
                MuxEvent::Shared {
                    message,
                    qos,
                    retain,
                    id,
                } => {
                    if qos > 0 && !self.draining && self.must_hold() {
                        self.hold(Held::Shared {
                            message,
                            qos,
                            retain,
                            id,
                        });
                    } else {
                        self.deliver_shared(message, qos, retain, id)?;
                    }
                }
                MuxEvent::Retained { message, qos } => {
                    if self.draining {
                        self.ctx.metrics.dropped(DropReason::Shutdown);
                    } else if qos > 0 && self.must_hold() {
                        self.hold(Held::Retained {
                            kept: Kept::of(&message.properties),
                            message,
                            qos,
                        });
                    } else {
                        self.write_retained(&message, qos)?;
                    }
                }
                MuxEvent::Command { command, qos } => {
                    if self.draining {
                        self.ctx.metrics.dropped(DropReason::Shutdown);
                    } else if qos > 0 && self.must_hold() {
                        self.hold(Held::Command { command, qos });
                    } else {
                        self.write_command(&command, qos)?;
                    }
                }
            }
            written += 1;
            if written >= MAX_WRITE_BATCH {
                self.flush().await?;
                written = 0;
            }
            next = self.port.as_mut().and_then(|port| port.rx.try_recv().ok());
        }
        self.flush().await
    }

    /// Writes a command from the mux link at `qos`, under a packet id of [`MUX_PKIDS`] if it is
    /// QoS 1, with its publisher's MQTT 5 properties; not once its Message Expiry Interval has
    /// passed.
    fn write_command(&mut self, command: &CommandMessage, qos: u8) -> Result<(), DisconnectReason> {
        let mut properties = command.properties.clone();
        if self.expired(command.kept, &mut properties) {
            return Ok(());
        }
        crate::carry::strip(&mut properties);
        self.write_from_port(
            &command.topic,
            &command.payload,
            properties,
            qos,
            command.retain,
        )?;
        Ok(())
    }

    /// Writes a retained message sent again for a repeated SUBSCRIBE (`retained`), flagged, at
    /// `qos` under a packet id of [`MUX_PKIDS`] if it is above 0; a QoS 2 one's exchange runs
    /// in `inbound`, as for the router's forwards.
    fn write_retained(
        &mut self,
        message: &RetainedMessage,
        qos: u8,
    ) -> Result<(), DisconnectReason> {
        let properties = message.properties.clone();
        let written =
            self.write_from_port(&message.topic, &message.payload, properties, qos, true)?;
        if let Some(PublishInfo { qos: 2, pkid }) = written {
            self.extras().qos2_delivered.push((pkid, false));
        }
        Ok(())
    }

    /// Writes a message that did not come through the own link (a shared group's, a retained
    /// one sent again) at `qos` with the retain flag `retain`, under a packet id of
    /// [`MUX_PKIDS`] if above 0, then unacknowledged until the client acknowledges it. How it
    /// went out; `None` if it is larger than the client accepts (not sent, as for the
    /// router's forwards).
    fn write_from_port(
        &mut self,
        topic: &Bytes,
        payload: &Bytes,
        properties: Option<PublishProperties>,
        qos: u8,
        retain: bool,
    ) -> Result<Option<PublishInfo>, DisconnectReason> {
        let pkid = if qos > 0 { self.next_mux_pkid() } else { 0 };
        let publish = publish_with(topic, payload, qos, pkid, retain);
        match self
            .net
            .queue_forward(Packet::Publish(publish, properties), qos, false)
        {
            Ok((Some(info), _)) => {
                self.ctx.metrics.message_out(kind_of(topic));
                if info.qos > 0 {
                    self.mux_outgoing.push(pkid);
                }
                Ok(Some(info))
            }
            Ok((None, _)) => Ok(None),
            Err(err) => Err(self.protocol_error(&err)),
        }
    }

    /// Whether a QoS 1 or 2 delivery must wait (MQTT 5 flow control, §4.9): the client has as
    /// many unacknowledged as its Receive Maximum allows, or deliveries wait already (they go
    /// out in their order).
    fn must_hold(&self) -> bool {
        self.extras.as_ref().is_some_and(|e| !e.held.is_empty())
            || self.unacknowledged_deliveries() >= usize::from(self.net.client_receive_max())
    }

    /// QoS 1 and 2 deliveries written and not yet acknowledged (PUBACK, PUBCOMP, or a PUBREC
    /// refusing the message).
    fn unacknowledged_deliveries(&self) -> usize {
        self.outgoing_inflight.len() + self.mux_outgoing.len()
    }

    /// Keeps a QoS 1 or 2 delivery until the client acknowledges one before it. What waits is
    /// bounded by its sources: the router forwards at most 100 unacknowledged messages to a
    /// link, a shared group gives a member at most 1 000 it has not written.
    fn hold(&mut self, held: Held) {
        self.extras().held.push_back(held);
    }

    /// Writes the deliveries [`Self::hold`] kept, in order, while the client's Receive Maximum
    /// allows; called once it acknowledged one. Not while draining: they are not written then
    /// (the connection's end disposes of them, see `session`).
    pub(super) fn release_held(&mut self) -> Result<(), DisconnectReason> {
        let max = usize::from(self.net.client_receive_max());
        while !self.draining && self.unacknowledged_deliveries() < max {
            let Some(held) = self.extras.as_mut().and_then(|e| e.held.pop_front()) else {
                break;
            };
            match held {
                Held::Router { mut forward, kept } => {
                    if self.expired(kept, &mut forward.properties) {
                        // Acknowledged to the router in its place among the forwards.
                        if let Some(pkid) = publish_pkid(&forward.publish) {
                            self.forward_done(pkid);
                        }
                    } else {
                        self.write_forward(*forward, true)?;
                    }
                }
                Held::Command { command, qos } => self.write_command(&command, qos)?,
                Held::Retained {
                    mut message,
                    qos,
                    kept,
                } => {
                    if !self.expired(kept, &mut message.properties) {
                        self.write_retained(&message, qos)?;
                    }
                }
                Held::Shared {
                    message,
                    qos,
                    retain,
                    id,
                } => self.deliver_shared(message, qos, retain, id)?,
            }
        }
        Ok(())
    }

    /// Writes a message a shared subscription group gave this connection, at `qos` under a
    /// packet id of [`MUX_PKIDS`], with the retain flag `retain`; a QoS 1 one is remembered
    /// until the client acknowledges it (given to another member if the connection ends
    /// first), and, for a durable consumer, what it carried (its PUBACK proves the message
    /// durable, as for the router's forwards).
    fn deliver_shared(
        &mut self,
        message: Arc<SharedMessage>,
        qos: u8,
        retain: bool,
        id: Option<crate::share::SubId>,
    ) -> Result<(), DisconnectReason> {
        message.group.written(self.connection);
        if self.draining {
            self.ctx.metrics.dropped(DropReason::Shutdown);
            if qos > 0 {
                message.group.acknowledged(self.connection);
            }
            return Ok(());
        }
        let mut properties = message.properties.clone();
        if self.expired(message.kept, &mut properties) {
            if qos > 0 {
                message.group.acknowledged(self.connection);
            }
            return Ok(());
        }
        if let Some(id) = id {
            // Its subscription's identifier (MQTT 5 §3.3.2.3.8); a 3.1.1 connection has none.
            properties
                .get_or_insert_with(PublishProperties::default)
                .subscription_identifiers
                .push(id.get() as usize);
        }
        match self.write_from_port(&message.topic, &message.payload, properties, qos, retain)? {
            Some(PublishInfo { qos: 1.., pkid }) => {
                self.forwarded_to_consumer(pkid, &message.topic, &message.payload);
                self.extras().shared_outgoing.insert(pkid, message);
            }
            Some(_) => {}
            // Not delivered: done with, as far as the group is concerned.
            None if qos > 0 => message.group.acknowledged(self.connection),
            None => {}
        }
        Ok(())
    }

    /// Whether a message the front end kept since `kept` is past its MQTT 5 Message Expiry
    /// Interval (counted, `dropped_total{reason="expired"}`); if not, its interval in
    /// `properties` is lowered by the time it waited (`expiry`). Never for the durable
    /// consumer: what it is given is an accepted message the broker answers for until the
    /// consumer has it (`durability`), so it is delivered whatever its interval says.
    fn expired(&self, kept: Kept, properties: &mut Option<PublishProperties>) -> bool {
        let aged = kept.age(properties);
        // A retained message's interval, carried as when it ends (if no step before restored
        // it), is given back either way.
        let restored = crate::expiry::restore(properties);
        if self.consumer || aged == Aged::Live && restored == Aged::Live {
            return false;
        }
        self.ctx.metrics.dropped(DropReason::Expired);
        true
    }

    /// Marks the router's forward `pkid` as done with without the client (an expired one it
    /// held back): acknowledged to the router in its place among the forwards, by the next
    /// [`Self::acknowledge_forward`].
    fn forward_done(&mut self, pkid: u16) {
        if let Some((_, done)) = self
            .extras()
            .router_forwards
            .iter_mut()
            .find(|(p, done)| *p == pkid && !*done)
        {
            *done = true;
        }
    }

    /// Puts the UNSUBACK reasons of the filters the front end answered itself (shared
    /// subscriptions, see `inbound`) into the router's UNSUBACK for it.
    fn put_back_unsuback_answers(&mut self, ack: &mut UnsubAck) {
        let answers = self.extras.as_mut();
        if let Some(answered) =
            answers.and_then(|e| take_by_pkid(&mut e.unsuback_answers, ack.pkid))
        {
            for (position, reason) in answered {
                ack.reasons.insert(position.min(ack.reasons.len()), reason);
            }
        }
    }

    /// Marks the router's forward `pkid` (if given) as acknowledged, and moves the PUBACKs the
    /// router may have now into `acks`, in the order it sent the forwards (rumqttd drops a
    /// link that acknowledges out of order). Whether `pkid` was one of its forwards.
    pub(super) fn acknowledge_forward(
        &mut self,
        pkid: Option<u16>,
        acks: &mut Vec<Packet>,
    ) -> bool {
        let Some(extras) = &mut self.extras else {
            return false;
        };
        let forwards = &mut extras.router_forwards;
        let known = pkid.is_some_and(|pkid| {
            forwards
                .iter_mut()
                .find(|(p, done)| *p == pkid && !*done)
                .map(|(_, done)| *done = true)
                .is_some()
        });
        while let Some(&(pkid, true)) = forwards.front() {
            forwards.pop_front();
            let ack = PubAck {
                pkid,
                reason: PubAckReason::Success,
            };
            acks.push(Packet::PubAck(ack, None));
        }
        known
    }

    /// Applies the subscription options the router does not implement to a forward of the own
    /// link (`options`), if the connection has filters with any.
    fn judge(&mut self, forward: &mut Forward) -> Judged {
        let Some(table) = self.link.as_ref().and_then(|link| link.filters.as_ref()) else {
            return Judged::Deliver;
        };
        table.judge(
            &self.client_id,
            &mut forward.publish,
            &mut forward.properties,
        )
    }

    /// Once the SUBACK of SUBSCRIBE `pkid` is written: fetches the retained messages of the
    /// filters it repeated, to send them again (`retained`).
    fn resend_retained(&mut self, pkid: u16) {
        let Some(extras) = self.extras.as_mut() else {
            return;
        };
        let Some(at) = extras.resend.iter().position(|(p, _)| *p == pkid) else {
            return;
        };
        let (_, filters) = extras.resend.remove(at);
        let to = self.port().tx.clone();
        retained::resend(&self.ctx.retained_fetches, &self.ctx.registrar, filters, to);
    }

    /// Whether a router SUBACK is to be answered: false for one of the SUBACKs a resumed
    /// session's restored identifiers bring (`options`), and for all but the last of those
    /// of a SUBSCRIBE handed over one filter at a time, whose codes it gathers; the last gets
    /// them all, in order.
    fn merge_split_suback(&mut self, ack: &mut SubAck) -> bool {
        if let Some(table) = self.link.as_mut().and_then(|link| link.filters.as_mut())
            && table.restored()
        {
            return false;
        }
        let Some(extras) = self.extras.as_mut() else {
            return true;
        };
        let Some(at) = extras
            .split_subacks
            .iter()
            .position(|(pkid, _, _)| *pkid == ack.pkid)
        else {
            return true;
        };
        let (_, remaining, codes) = &mut extras.split_subacks[at];
        codes.append(&mut ack.return_codes);
        *remaining -= 1;
        if *remaining > 0 {
            return false;
        }
        let (_, _, codes) = extras.split_subacks.remove(at);
        ack.return_codes = codes;
        true
    }

    /// Puts the SUBACK codes of the filters the front end refused from this SUBSCRIBE (see
    /// `inbound`) into the router's SUBACK for it.
    fn put_back_suback_refusals(&mut self, ack: &mut SubAck) {
        let refusals = self.extras.as_mut();
        if let Some(refused) = refusals.and_then(|e| take_by_pkid(&mut e.suback_refusals, ack.pkid))
        {
            put_back_refusals(&mut ack.return_codes, &refused);
        }
    }

    /// The next packet id for a command written from the mux link.
    fn next_mux_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_mux_pkid;
            self.next_mux_pkid = if pkid == *MUX_PKIDS.end() {
                *MUX_PKIDS.start()
            } else {
                pkid + 1
            };
            if !self.mux_outgoing.contains(&pkid) {
                return pkid;
            }
        }
    }

    /// Writes what the router sent: `first` and whatever else is already queued.
    ///
    /// A message is written at min(publish QoS, granted QoS) (`qos`): the router forwards at
    /// the subscription's QoS, so a forward above its original QoS is downgraded here (to QoS 0:
    /// acknowledged to the router on the client's behalf; from 2 to 1: acknowledged by the
    /// client's PUBACK). A QoS 2 delivery's exchange runs in `inbound`.
    pub(super) async fn deliver(
        &mut self,
        first: Option<Notification>,
    ) -> Result<(), DisconnectReason> {
        let mut unscheduled = false;
        let mut end = None;
        let mut next = first;
        let mut written = 0;
        let mut router_acks = Vec::new();
        while let Some(notification) = next.take() {
            match notification {
                Notification::Forward(mut forward) => {
                    if self.draining {
                        self.ctx.metrics.dropped(DropReason::Shutdown);
                    } else if self.judge(&mut forward) == Judged::Skip {
                        // Not for the client (No Local, Retain Handling 2): acknowledged to
                        // the router in its place among the forwards.
                        if let Some(pkid) = publish_pkid(&forward.publish) {
                            self.extras().router_forwards.push_back((pkid, true));
                        }
                    } else if self.must_hold() && delivered_above_qos0(&forward) {
                        // Its place among the router's forwards is kept: rumqttd takes the
                        // PUBACKs in the order it sent them.
                        if let Some(pkid) = publish_pkid(&forward.publish) {
                            self.extras().router_forwards.push_back((pkid, false));
                        }
                        self.hold(Held::Router {
                            kept: Kept::of(&forward.properties),
                            forward: Box::new(forward),
                        });
                    } else {
                        self.write_forward(forward, false)?;
                    }
                }
                Notification::DeviceAck(ack) => {
                    let mut packet: Packet = ack.into();
                    if let Packet::PubAck(ack, _) = &packet {
                        // Written in order, and once durable if it waits for that (`gate`).
                        let pkid = ack.pkid;
                        self.routed(pkid, packet)?;
                    } else {
                        if let Packet::UnsubAck(ack, _) = &mut packet {
                            self.put_back_unsuback_answers(ack);
                        }
                        if let Packet::SubAck(ack, _) = &mut packet {
                            if !self.merge_split_suback(ack) {
                                // Not the client's: more of its SUBACK to come, or a resumed
                                // session's identifiers restored (`options`).
                                next = self.link.as_mut().and_then(|link| try_next(&mut link.rx));
                                continue;
                            }
                            self.put_back_suback_refusals(ack);
                            if self.consumer {
                                // What the router delivered to nobody goes to the consumer now.
                                self.ctx.durability.consumer_subscribed();
                            }
                        }
                        let answered_subscribe = match &packet {
                            Packet::SubAck(ack, _) => Some(ack.pkid),
                            _ => None,
                        };
                        self.answer(packet)?;
                        if let Some(pkid) = answered_subscribe {
                            self.resend_retained(pkid);
                        }
                    }
                }
                Notification::Unschedule => unscheduled = true,
                Notification::Disconnect(disconnect, properties) => {
                    debug!(client_id = self.client_id, reason = ?disconnect.reason_code, "the router disconnects the client");
                    if self.net.version == Listener::V5 {
                        let _ = self.net.queue(Packet::Disconnect(disconnect, properties));
                    }
                    end = Some(DisconnectReason::Router);
                    break;
                }
                other => {
                    debug!(client_id = self.client_id, notification = ?other, "unexpected notification ignored")
                }
            }
            written += 1;
            if written >= MAX_WRITE_BATCH {
                self.flush().await?;
                written = 0;
            }
            next = self.link.as_mut().and_then(|link| try_next(&mut link.rx));
        }
        self.flush().await?;
        self.acknowledge_forward(None, &mut router_acks);
        if let Some(link) = &mut self.link
            && !router_acks.is_empty()
        {
            hand_over(&mut link.tx, &mut router_acks)
                .await
                .map_err(|_| DisconnectReason::Router)?;
        }
        if let Some(end) = end {
            return Err(end);
        }
        if unscheduled {
            // The router paused us while our queue was full; we have emptied it.
            if let Some(link) = &mut self.link {
                link.rx.wake().await.map_err(|_| DisconnectReason::Router)?;
            }
        }
        Ok(())
    }

    /// Writes a forward of the connection's own link at min(its original QoS, the QoS the
    /// router forwarded it at), and remembers what the router waits to be acknowledged (in
    /// its place `kept` when it was held back).
    fn write_forward(&mut self, forward: Forward, kept: bool) -> Result<(), DisconnectReason> {
        let kind = kind_of(&forward.publish.topic);
        let mut properties = forward.properties;
        // One held back was judged, and its interval given back, when released (`expired`).
        if !kept && crate::expiry::restore(&mut properties) == Aged::Expired && !self.consumer {
            // A retained message past its interval (`expiry`): acknowledged to the router in
            // its place among the forwards.
            self.ctx.metrics.dropped(DropReason::Expired);
            if let Some(pkid) = publish_pkid(&forward.publish) {
                self.extras().router_forwards.push_back((pkid, true));
            }
            return Ok(());
        }
        let original = qos::take_original(&forward.publish.topic, &mut properties);
        let publish = forward.publish;
        // A persistent session's resend of what an earlier connection did not acknowledge.
        let persistent = self.link.as_ref().is_some_and(|link| link.term.is_some());
        let dup = persistent
            && forward.cursor.is_some_and(|cursor| {
                self.link
                    .as_mut()
                    .and_then(|link| link.filters.as_mut())
                    .is_some_and(|filters| filters.is_resend(&publish.topic, cursor))
            });
        let sent = (persistent && forward.cursor.is_some()).then(|| publish.topic.clone());
        let message = self
            .consumer
            .then(|| (publish.topic.clone(), publish.payload.clone()));
        let (info, downgraded) = self
            .net
            .queue_forward(Packet::Publish(publish, properties), original, dup)
            .map_err(|err| self.protocol_error(&err))?;
        self.ctx.metrics.message_out(kind);
        if let Some(PublishInfo { qos: 1 | 2, pkid }) = info {
            if !self.outgoing_inflight.contains(&pkid) {
                self.outgoing_inflight.push(pkid);
            }
            if let (Some(topic), Some(cursor)) = (sent, forward.cursor) {
                let unacknowledged = &mut self.extras().unacknowledged;
                unacknowledged.retain(|(p, ..)| *p != pkid);
                unacknowledged.push((pkid, topic, cursor));
            }
            if !kept {
                self.extras().router_forwards.push_back((pkid, false));
            }
            if let Some((topic, payload)) = &message {
                self.forwarded_to_consumer(pkid, topic, payload);
            }
        }
        if let Some(PublishInfo { qos: 2, pkid }) = info {
            // Its exchange runs here (`inbound`); the router is acknowledged at its PUBCOMP.
            let delivered = &mut self.extras().qos2_delivered;
            delivered.retain(|&(p, _)| p != pkid);
            delivered.push((pkid, false));
        }
        if let Some(pkid) = downgraded {
            let forwards = &mut self.extras().router_forwards;
            match forwards
                .iter_mut()
                .find(|(p, done)| kept && *p == pkid && !*done)
            {
                Some((_, done)) => *done = true,
                None => forwards.push_back((pkid, true)),
            }
        }
        Ok(())
    }
}

/// Whether `forward` is delivered at QoS 1 or 2: min(its original QoS, the router's).
fn delivered_above_qos0(forward: &Forward) -> bool {
    // rumqttd keeps a publish's QoS private; `len` counts the packet id of a QoS 1 or 2 one.
    let publish = &forward.publish;
    let forwarded_above_qos0 = publish.len() > 2 + publish.topic.len() + publish.payload.len();
    forwarded_above_qos0 && qos::original(&publish.topic, forward.properties.as_ref()) > 0
}

/// Takes the entry for packet id `pkid` out of `list`, if it has one.
fn take_by_pkid<T>(list: &mut Vec<(u16, T)>, pkid: u16) -> Option<T> {
    let at = list.iter().position(|(p, _)| *p == pkid)?;
    Some(list.swap_remove(at).1)
}
