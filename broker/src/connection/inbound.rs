//! What each packet from the client does: into a batch for the router (the mux link's or the
//! connection's own), or answered by the front end itself (ACL refusals, PINGRESP, the SUBACK
//! and UNSUBACK of command subscriptions the mux link serves, shared subscriptions, which
//! the front end serves itself through `share`).

use std::sync::Arc;

use bytes::Bytes;
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, QoS, RetainForwardRule, SubAck,
    Subscribe, SubscribeProperties, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
    UnsubscribeProperties,
};
use shared::topic::kind_of;
use tracing::warn;

use super::network::{PublishInfo, Received};
use super::options::Options;
use super::session::Established;
use crate::auth::Identity;
use crate::carry;
use crate::listener::Listener;
use crate::metrics::{DisconnectReason, DropReason, SubscribeRefusal};
use crate::mux::{MuxEvent, is_command_topic, publish_with};
use crate::qos;
use crate::retained::Repeated;
use crate::router::TOPIC_ALIAS_MAX;
use crate::share::{self, MemberOptions, MemberPort, ShareFilter};
use crate::topic_syntax::{valid_filter, valid_topic_name};

/// The SUBACK code refusing a filter for `why`, in MQTT 5 (`v5`) or 3.1.1 (always 0x80).
fn refusal_code(why: SubscribeRefusal, v5: bool) -> SubscribeReasonCode {
    match why {
        _ if !v5 => SubscribeReasonCode::Failure,
        SubscribeRefusal::Shared | SubscribeRefusal::Invalid => {
            SubscribeReasonCode::TopicFilterInvalid
        }
        SubscribeRefusal::DollarTopic => SubscribeReasonCode::Unspecified,
        SubscribeRefusal::Rate
        | SubscribeRefusal::Filters
        | SubscribeRefusal::SharedGroups
        | SubscribeRefusal::RouterFilters => SubscribeReasonCode::QuotaExceeded,
    }
}

impl Established {
    /// Handles one packet from the client: into `batch` for the router, or answered here.
    /// Returns how the connection ends, if it does.
    pub(super) fn on_packet(
        &mut self,
        received: Received,
        batch: &mut Vec<Packet>,
    ) -> Option<DisconnectReason> {
        let handled = match received.packet {
            Packet::Publish(publish, properties) => {
                let PublishInfo { qos, pkid } =
                    received.publish.unwrap_or(PublishInfo { qos: 0, pkid: 0 });
                self.on_publish(publish, properties, qos, pkid, batch)
            }
            Packet::PubAck(ack, properties) => {
                self.consumer_acknowledged(ack.pkid, ack.reason);
                if let Some(at) = self.mux_outgoing.iter().position(|&p| p == ack.pkid) {
                    self.mux_outgoing.swap_remove(at);
                    let shared = self.extras.as_mut();
                    if let Some(message) = shared.and_then(|e| e.shared_outgoing.remove(&ack.pkid))
                    {
                        message.group.acknowledged(self.connection);
                    }
                } else if self.link.is_some() {
                    self.outgoing_inflight.retain(|&p| p != ack.pkid);
                    if let Some(extras) = &mut self.extras {
                        // A PUBACK for a QoS 2 delivery (wrong, but it ends it).
                        extras.qos2_delivered.retain(|&(p, _)| p != ack.pkid);
                        extras.unacknowledged.retain(|(p, ..)| *p != ack.pkid);
                    }
                    if !self.acknowledge_forward(Some(ack.pkid), batch) {
                        batch.push(Packet::PubAck(ack, properties));
                    }
                }
                self.delivery_acknowledged(batch)
            }
            Packet::PingReq(_) => self.answer(Packet::PingResp(PingResp)),
            // Draining: nothing new is subscribed to, nor unsubscribed from.
            Packet::Subscribe(..) | Packet::Unsubscribe(..) if self.draining => Ok(()),
            Packet::Unsubscribe(unsubscribe, properties) => {
                self.on_unsubscribe(unsubscribe, properties, batch)
            }
            Packet::Subscribe(subscribe, properties) => {
                self.on_subscribe(subscribe, properties, batch)
            }
            Packet::Disconnect(disconnect, properties) => {
                self.will_on_disconnect =
                    disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                let expiry = properties.and_then(|p| p.session_expiry_interval);
                match expiry.map(|seconds| self.change_session_expiry(seconds)) {
                    Some(Err(end)) => Err(end),
                    _ => Err(DisconnectReason::Client),
                }
            }
            Packet::Connect(..) => {
                warn!(client_id = self.client_id, "second CONNECT: disconnecting");
                Err(DisconnectReason::Protocol)
            }
            // A QoS 2 publish from the client: its exchange ends here (see `on_publish`).
            Packet::PubRel(rel, _) => self.on_pubrel(rel.pkid),
            // A QoS 2 delivery's exchange (see `outbound`).
            Packet::PubRec(rec, _) => self
                .on_pubrec(rec.pkid, rec.reason, batch)
                .and_then(|()| self.delivery_acknowledged(batch)),
            Packet::PubComp(comp, _) => {
                self.on_pubcomp(comp.pkid, batch);
                self.delivery_acknowledged(batch)
            }
            // Packets only servers send were refused before decoding.
            _ => Ok(()),
        };
        handled.err()
    }

    /// The client acknowledged a delivery: those its Receive Maximum held back may go now
    /// (see `outbound`), and the router's forwards among them that need no PUBACK from the
    /// client (too big to send) are acknowledged to the router.
    fn delivery_acknowledged(&mut self, batch: &mut Vec<Packet>) -> Result<(), DisconnectReason> {
        if self.extras.as_ref().is_some_and(|e| !e.held.is_empty()) {
            self.release_held()?;
            self.acknowledge_forward(None, batch);
        }
        Ok(())
    }

    /// An MQTT 5 DISCONNECT's Session Expiry Interval, `seconds`: the session's new expiry
    /// (see `sessions`). From a CONNECT's 0 (a clean session, or one taken up to end with the
    /// connection) to more is a protocol error (MQTT 5 §3.14.2.2.2).
    fn change_session_expiry(&mut self, seconds: u32) -> Result<(), DisconnectReason> {
        let term = self.link.as_mut().and_then(|link| link.term.as_mut());
        match term {
            Some(term) if term.may_change => {
                term.expiry = seconds;
                Ok(())
            }
            _ if seconds == 0 => Ok(()),
            _ => {
                warn!(
                    client_id = self.client_id,
                    seconds,
                    "DISCONNECT sets a Session Expiry Interval after CONNECT set none: protocol error"
                );
                self.farewell.set(Some(DisconnectReasonCode::ProtocolError));
                Err(DisconnectReason::Protocol)
            }
        }
    }

    /// A PUBLISH: checked against the topic ACL, then to the mux link (clean sessions) or the
    /// connection's own link (persistent sessions). Its QoS travels with it for the delivery at
    /// min(publish QoS, granted QoS) (`qos::mark`); a QoS 2 one is received exactly once (see
    /// [`Self::receive_qos2`]) and handed to the router as QoS 0.
    fn on_publish(
        &mut self,
        mut publish: Publish,
        mut properties: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        batch: &mut Vec<Packet>,
    ) -> Result<(), DisconnectReason> {
        if !self.resolve_alias(&mut publish, properties.as_mut())? {
            self.ctx.metrics.message_in(kind_of(b""));
            return self.refuse_publish(b"(the topic alias of a refused topic)", qos, pkid);
        }
        if !valid_topic_name(&publish.topic) {
            let topic = String::from_utf8_lossy(&publish.topic);
            warn!(client_id = self.client_id, %topic, "invalid topic name in PUBLISH: disconnecting");
            self.farewell
                .set(Some(DisconnectReasonCode::TopicNameInvalid));
            return Err(DisconnectReason::Protocol);
        }
        self.ctx.metrics.message_in(kind_of(&publish.topic));
        if self.draining {
            // Unacknowledged: a QoS 1 sender sends it again after reconnecting.
            self.ctx.metrics.dropped(DropReason::Shutdown);
            return Ok(());
        }
        if !self.identity.may_publish(&publish.topic) {
            return self.refuse_publish(&publish.topic, qos, pkid);
        }
        if qos > 0 {
            self.check_receive_maximum(pkid)?;
        }
        if qos == 2 {
            if !self.receive_qos2(pkid)? {
                return Ok(());
            }
            publish = publish_with(&publish.topic, &publish.payload, 0, 0, publish.retain);
        }
        let via_link = self.persistent;
        if !via_link {
            self.check_for_mux(properties.as_ref())?;
        }
        if qos == 1 && !self.incoming_inflight.contains(&pkid) {
            self.incoming_inflight.push(pkid);
        }
        qos::mark(&publish.topic, qos, &mut properties);
        let origin = self.has_no_local().then_some(self.client_id.as_str());
        let retained = self.ctx.retain_wanted.mark(publish.retain);
        carry::mark(retained, origin, &mut properties);
        crate::expiry::carry_retained(publish.retain, &mut properties);
        (publish.topic, publish.payload) = own_copy(&publish.topic, &publish.payload);
        if qos == 1 && !self.expect_puback(&publish, pkid) {
            return Ok(());
        }
        self.ctx.mux.record(
            &publish.topic,
            &publish.payload,
            publish.retain,
            qos,
            properties.as_ref(),
        );
        if via_link {
            self.ensure_link()?;
            batch.push(Packet::Publish(publish, properties));
            return Ok(());
        }
        let packet = if qos == 1 {
            let reply = self.port().tx.clone();
            self.ctx.mux.qos1(&publish, properties, &reply, pkid)
        } else {
            Packet::Publish(publish, properties)
        };
        if self.mux_batch.capacity() == 0 {
            // Room for one (a vehicle's read holds one heartbeat), not the four a first push
            // makes: the batch is freed after each read (see `session`), so this is allocated
            // once per read, and four packets are 1.5 KiB.
            self.mux_batch.reserve_exact(1);
        }
        self.mux_batch.push(packet);
        Ok(())
    }

    /// An MQTT 5 client may have at most [`qos::RECEIVE_MAXIMUM`] QoS 1 and 2 publishes
    /// unacknowledged (as CONNACK tells it): one more is a protocol error, answered with
    /// DISCONNECT 0x93. A resent packet id does not count twice. 3.1.1 has no such limit.
    fn check_receive_maximum(&mut self, pkid: u16) -> Result<(), DisconnectReason> {
        let qos2_received = self
            .extras
            .as_ref()
            .map_or(&[][..], |e| &e.qos2_received[..]);
        if self.net.version != Listener::V5
            || self.incoming_inflight.contains(&pkid)
            || qos2_received.contains(&pkid)
            || self.incoming_inflight.len() + qos2_received.len()
                < usize::from(qos::RECEIVE_MAXIMUM)
        {
            return Ok(());
        }
        warn!(
            client_id = self.client_id,
            receive_maximum = qos::RECEIVE_MAXIMUM,
            "client exceeded the receive maximum: disconnecting"
        );
        self.farewell
            .set(Some(DisconnectReasonCode::ReceiveMaximumExceeded));
        Err(DisconnectReason::Protocol)
    }

    /// Answers a QoS 2 PUBLISH with packet id `pkid` with PUBREC (written once the batch it
    /// joins went to the router); whether to route it: not if `pkid` still awaits its PUBREL,
    /// so a resent publish reaches the router once.
    fn receive_qos2(&mut self, pkid: u16) -> Result<bool, DisconnectReason> {
        let received = &mut self.extras().qos2_received;
        let new = !received.contains(&pkid);
        if new {
            received.push(pkid);
        }
        let rec = PubRec {
            pkid,
            reason: PubRecReason::Success,
        };
        self.answer(Packet::PubRec(rec, None))?;
        Ok(new)
    }

    /// A PUBREL: the client's QoS 2 exchange for `pkid` is complete (PUBCOMP).
    fn on_pubrel(&mut self, pkid: u16) -> Result<(), DisconnectReason> {
        if let Some(extras) = &mut self.extras {
            extras.qos2_received.retain(|&p| p != pkid);
        }
        let comp = PubComp {
            pkid,
            reason: PubCompReason::Success,
        };
        self.answer(Packet::PubComp(comp, None))
    }

    /// A PUBREC for the QoS 2 delivery `pkid` (see `outbound`): answered with PUBREL; if the
    /// client refused the message (an MQTT 5 reason of 0x80 or more) the exchange ends there.
    /// A PUBREC for a packet id the broker did not deliver at QoS 2 gets PUBREL "packet
    /// identifier not found" (MQTT 5 §4.3.3).
    fn on_pubrec(
        &mut self,
        pkid: u16,
        reason: PubRecReason,
        batch: &mut Vec<Packet>,
    ) -> Result<(), DisconnectReason> {
        let delivering = self.extras.as_mut().and_then(|e| {
            e.qos2_delivered
                .iter_mut()
                .find(|(p, _)| *p == pkid)
                .map(|(_, released)| released)
        });
        let Some(released) = delivering else {
            let rel = PubRel {
                pkid,
                reason: PubRelReason::PacketIdentifierNotFound,
            };
            return self.answer(Packet::PubRel(rel, None));
        };
        *released = true;
        if !matches!(
            reason,
            PubRecReason::Success | PubRecReason::NoMatchingSubscribers
        ) {
            // Refused: over as if completed.
            self.on_pubcomp(pkid, batch);
            return Ok(());
        }
        let rel = PubRel {
            pkid,
            reason: PubRelReason::Success,
        };
        self.answer(Packet::PubRel(rel, None))
    }

    /// A PUBCOMP: the QoS 2 delivery `pkid`, released, is over; its forward is acknowledged to
    /// the router (in the router's order, see `outbound`).
    fn on_pubcomp(&mut self, pkid: u16, batch: &mut Vec<Packet>) {
        let Some(extras) = &mut self.extras else {
            return;
        };
        let Some(at) = extras
            .qos2_delivered
            .iter()
            .position(|&(p, released)| p == pkid && released)
        else {
            return;
        };
        extras.qos2_delivered.swap_remove(at);
        self.outgoing_inflight.retain(|&p| p != pkid);
        // A retained message sent again (`retained`) has a packet id of the front end's.
        self.mux_outgoing.retain(|&p| p != pkid);
        self.acknowledge_forward(Some(pkid), batch);
    }

    /// Gives an MQTT 5 aliased publish (empty topic) the topic its alias stands for, and
    /// remembers the aliases the client sets. `Ok(false)`: the alias stands for a topic the
    /// ACL refused (see below), and so is the publish.
    fn resolve_alias(
        &mut self,
        publish: &mut Publish,
        properties: Option<&mut PublishProperties>,
    ) -> Result<bool, DisconnectReason> {
        // The router never sees an alias: it would keep a table of its own for the link.
        let Some(alias) = properties.and_then(|p| p.topic_alias.take()) else {
            return Ok(true);
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            warn!(
                client_id = self.client_id,
                alias, "invalid topic alias: disconnecting"
            );
            self.farewell
                .set(Some(DisconnectReasonCode::TopicAliasInvalid));
            return Err(DisconnectReason::Protocol);
        }
        if !publish.topic.is_empty() {
            // Only a topic the client may publish on is kept: the alias of one it may not
            // stands for "refused" (no topic, an empty `Bytes` allocates nothing), so that an
            // observer cannot fill the table with topics it names only to be refused.
            let kept =
                if valid_topic_name(&publish.topic) && self.identity.may_publish(&publish.topic) {
                    Bytes::copy_from_slice(&publish.topic)
                } else {
                    Bytes::new()
                };
            self.extras().topic_aliases.insert(alias, kept);
            return Ok(true);
        }
        match self
            .extras
            .as_ref()
            .and_then(|e| e.topic_aliases.get(&alias))
        {
            Some(topic) if topic.is_empty() => Ok(false),
            Some(topic) => {
                publish.topic = topic.clone();
                Ok(true)
            }
            None => {
                warn!(
                    client_id = self.client_id,
                    alias, "unknown topic alias: disconnecting"
                );
                self.farewell.set(Some(DisconnectReasonCode::ProtocolError));
                Err(DisconnectReason::Protocol)
            }
        }
    }

    /// A publish the topic ACL refuses: dropped and counted (logged once per connection);
    /// QoS 1 and 2 are acknowledged so the client does not resend it forever.
    fn refuse_publish(&mut self, topic: &[u8], qos: u8, pkid: u16) -> Result<(), DisconnectReason> {
        self.ctx.metrics.dropped(DropReason::Acl);
        if !self.acl_warned {
            self.acl_warned = true;
            warn!(client_id = self.client_id, identity = %self.identity.describe(), topic = %String::from_utf8_lossy(topic), "publish refused by the topic ACL (further refusals on this connection are only counted)");
        }
        match qos {
            0 => Ok(()),
            1 => {
                let reason = if self.net.version == Listener::V5 {
                    PubAckReason::NotAuthorized
                } else {
                    PubAckReason::Success
                };
                self.acknowledge_in_order(pkid, Packet::PubAck(PubAck { pkid, reason }, None))
            }
            // Received (PUBREC, "not authorized" in MQTT 5) and dropped, as QoS 1; the PUBREL
            // that follows is answered as any other.
            _ => {
                let reason = if self.net.version == Listener::V5 {
                    PubRecReason::NotAuthorized
                } else {
                    PubRecReason::Success
                };
                self.answer(Packet::PubRec(PubRec { pkid, reason }, None))
            }
        }
    }

    /// What rumqttd's router would refuse by dropping the link: for the mux link that would be
    /// the link of every device, so the front end refuses it first (a topic name MQTT does
    /// not allow is refused for every link, see `on_publish`; so is a topic alias, resolved
    /// and taken out first).
    fn check_for_mux(
        &self,
        properties: Option<&PublishProperties>,
    ) -> Result<(), DisconnectReason> {
        if properties.is_some_and(|p| !p.subscription_identifiers.is_empty()) {
            warn!(
                client_id = self.client_id,
                "PUBLISH with a subscription identifier: disconnecting"
            );
            return Err(DisconnectReason::Protocol);
        }
        Ok(())
    }

    /// An UNSUBSCRIBE: command topics leave the mux link here, shared subscriptions their
    /// group (`$` filters and invalid ones never reach the router), the rest goes to the
    /// connection's own link (answered here if it has none).
    fn on_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        properties: Option<UnsubscribeProperties>,
        batch: &mut Vec<Packet>,
    ) -> Result<(), DisconnectReason> {
        if unsubscribe.filters.is_empty() {
            // MQTT 3.1.1 §3.10.3, MQTT 5 §3.10.3: at least one filter.
            warn!(
                client_id = self.client_id,
                "UNSUBSCRIBE without a topic filter: protocol error"
            );
            self.farewell.set(Some(DisconnectReasonCode::ProtocolError));
            return Err(DisconnectReason::Protocol);
        }
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        let mut others = false;
        let mut answered = Vec::new();
        for (position, filter) in unsubscribe.filters.iter().enumerate() {
            self.filters.remove(filter);
            if let ShareFilter::Shared { group, filter } = share::parse(filter) {
                let key = (group.to_owned(), filter.to_owned());
                let joined = self.extras.as_mut().and_then(|e| {
                    let at = e.shared_subscriptions.iter().position(|k| *k == key)?;
                    Some(e.shared_subscriptions.swap_remove(at))
                });
                let reason = match joined {
                    Some(_) => {
                        self.ctx.shared.leave(&key, self.connection);
                        UnsubAckReason::Success
                    }
                    None => UnsubAckReason::NoSubscriptionExisted,
                };
                reasons.push(reason);
                answered.push((position, reason));
            } else if filter.starts_with('$') || !valid_filter(filter) {
                // Never handed to the router: nothing to unsubscribe from.
                let reason = if filter.starts_with('$') {
                    UnsubAckReason::NoSubscriptionExisted
                } else {
                    UnsubAckReason::TopicFilterInvalid
                };
                reasons.push(reason);
                answered.push((position, reason));
            } else if let Some(at) = self.mux_subscriptions.iter().position(|t| t == filter) {
                self.mux_subscriptions.swap_remove(at);
                self.ctx.mux.unsubscribe(self.connection, filter);
                reasons.push(UnsubAckReason::Success);
            } else {
                others = true;
                self.ctx.watchers.unsubscribed(&self.client_id, filter);
                if let Some(table) = self.link.as_mut().and_then(|l| l.filters.as_mut()) {
                    table.unsubscribe(filter);
                }
                reasons.push(UnsubAckReason::NoSubscriptionExisted);
            }
        }
        if others && self.link.is_some() {
            let mut unsubscribe = unsubscribe;
            if !answered.is_empty() {
                // The router never sees a `$` filter nor an invalid one; their reasons go into
                // its UNSUBACK.
                unsubscribe
                    .filters
                    .retain(|f| !f.starts_with('$') && valid_filter(f));
                self.extras()
                    .unsuback_answers
                    .push((unsubscribe.pkid, answered));
            }
            batch.push(Packet::Unsubscribe(unsubscribe, properties));
            return Ok(());
        }
        let ack = UnsubAck {
            pkid: unsubscribe.pkid,
            reasons,
        };
        self.answer(Packet::UnsubAck(ack, None))
    }

    /// A SUBSCRIBE: refused whole if the topic ACL refuses a filter (for `$share/G/F`, the
    /// ACL's answer for F); filters the broker does not serve (malformed `$share/...`, other
    /// `$` filters, filters MQTT does not allow, beyond the limits) refused one by one;
    /// shared subscriptions joined here (`share`); each grant at most [`qos::MAX_QOS`], or 2
    /// where the front end keeps exactly once (a clean session's own link, see `qos`). The
    /// rest is served by the mux link if it names exact command topics only (clean sessions,
    /// no subscription identifier); else by the connection's own link.
    fn on_subscribe(
        &mut self,
        mut subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
        batch: &mut Vec<Packet>,
    ) -> Result<(), DisconnectReason> {
        if properties.as_ref().and_then(|p| p.id) == Some(0) {
            // Before the router, which would log it as its own ERROR.
            warn!(
                client_id = self.client_id,
                "SUBSCRIBE with Subscription Identifier 0: protocol error (MQTT 5 §3.8.2.1.2)"
            );
            self.farewell.set(Some(DisconnectReasonCode::ProtocolError));
            return Err(DisconnectReason::Protocol);
        }
        if let Some(rate) = &mut self.subscribe_rate {
            if rate.wait(tokio::time::Instant::now()).is_some() {
                return self.refuse_whole(&subscribe, SubscribeRefusal::Rate);
            }
            rate.take();
        }
        // A shared subscription is allowed iff its filter is.
        if !subscribe
            .filters
            .iter()
            .all(|f| match share::parse(&f.path) {
                ShareFilter::Shared { filter, .. } => self.identity.may_subscribe(filter),
                _ => self.identity.may_subscribe(&f.path),
            })
        {
            return self.refuse_subscribe(&subscribe);
        }
        if subscribe
            .filters
            .iter()
            .any(|f| f.nolocal && f.path.starts_with("$share/"))
        {
            warn!(
                client_id = self.client_id,
                "No Local on a shared subscription: protocol error (MQTT 5 §3.8.3.1)"
            );
            self.farewell.set(Some(DisconnectReasonCode::ProtocolError));
            return Err(DisconnectReason::Protocol);
        }
        if subscribe.filters.iter().any(|f| f.preserve_retain) {
            // Before the router has the subscription: what is published retained from now on
            // says so (`carry`).
            self.ctx.retain_wanted.want();
        }
        let mut refused = self.refuse_unserved(&mut subscribe);
        let client_sub_id = share::sub_id(properties.as_ref().and_then(|p| p.id));
        self.join_shared(&mut subscribe, client_sub_id, &mut refused);
        if subscribe.filters.is_empty() {
            return self.answer_refused(subscribe.pkid, refused);
        }
        if !self.persistent
            && properties.as_ref().is_none_or(|p| p.id.is_none())
            && subscribe.filters.iter().all(|f| {
                is_command_topic(f.path.as_bytes()) && Options::of(f, None, None, false).is_none()
            })
        {
            for filter in &mut subscribe.filters {
                filter.qos = qos::grant(filter.qos, false);
            }
            return self.subscribe_commands(&subscribe, &refused);
        }
        // QoS 2 where the front end can keep exactly once: a clean session's own link.
        for filter in &mut subscribe.filters {
            filter.qos = qos::grant(filter.qos, !self.persistent);
        }
        self.refuse_new_filters(&mut subscribe, &mut refused);
        if subscribe.filters.is_empty() {
            return self.answer_refused(subscribe.pkid, refused);
        }
        self.ensure_link()?;
        for filter in &subscribe.filters {
            self.ctx.watchers.subscribed(&self.client_id, &filter.path);
        }
        if !refused.is_empty() {
            self.extras()
                .suback_refusals
                .push((subscribe.pkid, refused));
        }
        self.subscribe_own_link(subscribe, properties, batch);
        Ok(())
    }

    /// Hands a SUBSCRIBE to the connection's own link (registered): as it is, unless one of
    /// its filters has options the router does not implement (`options`); then one SUBSCRIBE
    /// per filter, those with options under identifiers of the front end's, whose SUBACKs are
    /// merged into one for the client (`outbound`). The retained messages of a filter the link
    /// has already are sent again (Retain Handling 0, and always in MQTT 3.1.1): the router
    /// sends them to new subscriptions only (`retained`); its QoS may go down, not up.
    fn subscribe_own_link(
        &mut self,
        mut subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
        batch: &mut Vec<Packet>,
    ) {
        let client_sub_id = properties.as_ref().and_then(|p| p.id);
        let Some(link) = self.link.as_mut() else {
            // Not reached: the caller registered the link.
            batch.push(Packet::Subscribe(subscribe, properties));
            return;
        };
        let table = link.filters.get_or_insert_with(Box::default);
        let mut again = Vec::new();
        let mut ids = Vec::with_capacity(subscribe.filters.len());
        let mut split = false;
        for filter in &mut subscribe.filters {
            // A repeated SUBSCRIBE changes nothing in the router: a higher QoS is granted as
            // the router serves it (its SUBACK says what it is handed), a lower one is applied
            // here, as an option of the filter.
            let router = table.router_qos(&filter.path);
            let asked = filter.qos as u8;
            let granted = router.map_or(asked, |served| asked.min(served));
            filter.qos = qos::from_level(granted);
            let cap = router.filter(|&served| granted < served).map(|_| granted);
            let options = Options::of(filter, client_sub_id, cap, self.persistent);
            split |= options.is_some();
            let (id, had) = table.subscribe(&filter.path, options, granted);
            if had && filter.retain_forward_rule == RetainForwardRule::OnEverySubscribe {
                again.push(Repeated {
                    filter: filter.path.clone(),
                    qos: granted,
                    id: client_sub_id,
                });
            }
            ids.push(id);
        }
        if !again.is_empty() {
            // Fetched once the SUBACK is written (`outbound`), so that it comes first.
            self.extras().resend.push((subscribe.pkid, again));
        }
        if !split {
            batch.push(Packet::Subscribe(subscribe, properties));
            return;
        }
        let (pkid, count) = (subscribe.pkid, subscribe.filters.len());
        for (filter, own) in subscribe.filters.into_iter().zip(ids) {
            let properties = SubscribeProperties {
                id: own.or(client_sub_id),
                user_properties: Vec::new(),
            };
            let one = Subscribe {
                pkid,
                filters: vec![filter],
            };
            batch.push(Packet::Subscribe(one, Some(properties)));
        }
        if count > 1 {
            self.extras().split_subacks.push((pkid, count, Vec::new()));
        }
    }

    /// Whether the client has a No Local subscription: its publishes then carry its client id
    /// through the router (`carry`).
    pub(super) fn has_no_local(&self) -> bool {
        self.link
            .as_ref()
            .and_then(|link| link.filters.as_ref())
            .is_some_and(|table| table.no_local())
    }

    /// Takes the filters the broker does not serve out of `subscribe`, each counted and
    /// logged: malformed shared subscriptions (`$share/` without a group or a filter, a group
    /// with `+` or `#`, see `share::parse`), other filters starting with `$` (its router
    /// drops the connection for them), and filters beyond `max_subscriptions` on this
    /// connection (each costs the router a commit log, or a shared group a link). Returns
    /// their positions in the SUBSCRIBE, each with the SUBACK code refusing it (3.1.1: 0x80;
    /// MQTT 5: 0x8F "topic filter invalid" for a malformed share, 0x97 "quota exceeded"
    /// beyond the limit, 0x80 for the others).
    fn refuse_unserved(&mut self, subscribe: &mut Subscribe) -> Vec<(usize, SubscribeReasonCode)> {
        let limit = match *self.identity {
            Identity::Probe => 0,
            _ => self.ctx.limits.max_subscriptions,
        };
        if limit == 0
            && subscribe
                .filters
                .iter()
                .all(|f| !f.path.starts_with('$') && valid_filter(&f.path))
        {
            return Vec::new();
        }
        let v5 = self.net.version == Listener::V5;
        let mut refused = Vec::new();
        let mut at = 0;
        subscribe.filters.retain(|filter| {
            at += 1;
            let why = if share::parse(&filter.path) == ShareFilter::Malformed {
                SubscribeRefusal::Shared
            } else if filter.path.starts_with('$') && !filter.path.starts_with("$share/") {
                SubscribeRefusal::DollarTopic
            } else if !filter.path.starts_with('$') && !valid_filter(&filter.path) {
                SubscribeRefusal::Invalid
            } else if limit > 0
                && !self.filters.contains(&filter.path)
                && self.filters.len() >= limit
            {
                SubscribeRefusal::Filters
            } else {
                if limit > 0 {
                    self.filters.insert(filter.path.clone());
                }
                return true;
            };
            self.ctx.metrics.subscription_refused(why);
            warn!(
                client_id = self.client_id,
                filter = filter.path,
                reason = why.label(),
                "subscription refused: the broker does not serve this filter"
            );
            refused.push((at - 1, refusal_code(why, v5)));
            false
        });
        refused
    }

    /// Serves the shared subscriptions left in `subscribe` (`$share/{group}/{filter}`, well
    /// formed and within the limits): each joins its group (`share`) and is taken out of
    /// `subscribe`, its SUBACK code (the granted QoS, or a refusal if the group cannot be
    /// created) put into `answered` at its position in the SUBSCRIBE, which stays sorted;
    /// its messages carry the SUBSCRIBE's Subscription Identifier `id`, if it has one.
    /// rumqttd's router never sees a `$share` filter.
    fn join_shared(
        &mut self,
        subscribe: &mut Subscribe,
        id: Option<share::SubId>,
        answered: &mut Vec<(usize, SubscribeReasonCode)>,
    ) {
        if !subscribe
            .filters
            .iter()
            .any(|f| f.path.starts_with("$share/"))
        {
            return;
        }
        // The positions in the SUBSCRIBE of the filters still in it.
        let total = subscribe.filters.len() + answered.len();
        let positions: Vec<usize> = (0..total)
            .filter(|at| !answered.iter().any(|(p, _)| p == at))
            .collect();
        let mut positions = positions.into_iter();
        let v5 = self.net.version == Listener::V5;
        let mut joined = false;
        let filters = std::mem::take(&mut subscribe.filters);
        for filter in filters {
            let at = positions.next().unwrap_or(total);
            let ShareFilter::Shared {
                group,
                filter: shared,
            } = share::parse(&filter.path)
            else {
                subscribe.filters.push(filter);
                continue;
            };
            let granted = qos::grant(filter.qos, false);
            let granted_qos = match granted {
                QoS::AtMostOnce => 0,
                _ => 1,
            };
            let member = MemberOptions {
                qos: granted_qos,
                retain_as_published: filter.preserve_retain,
                id,
            };
            let tx: Arc<dyn MemberPort> = Arc::new(self.port().tx.clone());
            let code = match self
                .ctx
                .shared
                .join(group, shared, self.connection, member, &tx)
            {
                Ok(()) => {
                    let key = (group.to_owned(), shared.to_owned());
                    let groups = &mut self.extras().shared_subscriptions;
                    if !groups.contains(&key) {
                        groups.push(key);
                    }
                    joined = true;
                    SubscribeReasonCode::Success(granted)
                }
                Err(err) => {
                    let why = err.refusal();
                    self.ctx.metrics.subscription_refused(why);
                    self.filters.remove(&filter.path);
                    warn!(client_id = self.client_id, filter = filter.path, cause = %err, "shared subscription refused");
                    refusal_code(why, v5)
                }
            };
            answered.push((at, code));
        }
        answered.sort_by_key(|(at, _)| *at);
        if joined && self.consumer {
            // What waits for a durable consumer goes to the group now.
            self.ctx.durability.consumer_subscribed();
        }
    }

    /// Answers a SUBSCRIBE none of whose filters is served: the SUBACK with each one's
    /// refusal code, in their order (`refused` holds them all, by position).
    fn answer_refused(
        &mut self,
        pkid: u16,
        refused: Vec<(usize, SubscribeReasonCode)>,
    ) -> Result<(), DisconnectReason> {
        let ack = SubAck {
            pkid,
            return_codes: refused.into_iter().map(|(_, code)| code).collect(),
        };
        self.answer(Packet::SubAck(ack, None))
    }

    /// Takes the filters the router does not keep yet, and may not keep more of
    /// (`router::FilterBudget`, `max_filters`), out of `subscribe`, each counted and logged,
    /// and adds their SUBACK codes at their positions to `answered`.
    fn refuse_new_filters(
        &mut self,
        subscribe: &mut Subscribe,
        answered: &mut Vec<(usize, SubscribeReasonCode)>,
    ) {
        let budget = &self.ctx.router_filters;
        if subscribe.filters.iter().all(|f| budget.admit(&f.path)) {
            return;
        }
        // The positions in the SUBSCRIBE of the filters still in it.
        let total = subscribe.filters.len() + answered.len();
        let mut positions = (0..total).filter(|at| !answered.iter().any(|(p, _)| p == at));
        let why = SubscribeRefusal::RouterFilters;
        let code = refusal_code(why, self.net.version == Listener::V5);
        let filters = std::mem::take(&mut subscribe.filters);
        let mut refused = Vec::new();
        for filter in filters {
            let at = positions.next().unwrap_or(total);
            if budget.admit(&filter.path) {
                subscribe.filters.push(filter);
                continue;
            }
            self.ctx.metrics.subscription_refused(why);
            warn!(
                client_id = self.client_id,
                filter = filter.path,
                reason = why.label(),
                max_filters = budget.most(),
                "subscription refused: the router keeps the most filters it may (each a commit log it never frees)"
            );
            self.filters.remove(&filter.path);
            refused.push((at, code));
        }
        answered.extend(refused);
        answered.sort_by_key(|(at, _)| *at);
    }

    /// A SUBSCRIBE refused whole for `why` (a limit): counted per filter, logged, every filter
    /// refused in the SUBACK; the connection stays.
    fn refuse_whole(
        &mut self,
        subscribe: &Subscribe,
        why: SubscribeRefusal,
    ) -> Result<(), DisconnectReason> {
        for _ in &subscribe.filters {
            self.ctx.metrics.subscription_refused(why);
        }
        warn!(
            client_id = self.client_id,
            reason = why.label(),
            filters = subscribe.filters.len(),
            "subscribe refused: over the limit"
        );
        let code = refusal_code(why, self.net.version == Listener::V5);
        let ack = SubAck {
            pkid: subscribe.pkid,
            return_codes: vec![code; subscribe.filters.len()],
        };
        self.answer(Packet::SubAck(ack, None))
    }

    /// A SUBSCRIBE the topic ACL refuses: counted, logged, every filter refused in the SUBACK.
    fn refuse_subscribe(&mut self, subscribe: &Subscribe) -> Result<(), DisconnectReason> {
        self.ctx.metrics.subscribe_denied();
        let filters: Vec<&str> = subscribe.filters.iter().map(|f| f.path.as_str()).collect();
        warn!(client_id = self.client_id, identity = %self.identity.describe(), ?filters, "subscribe refused by the topic ACL");
        let code = if self.net.version == Listener::V5 {
            SubscribeReasonCode::NotAuthorized
        } else {
            SubscribeReasonCode::Failure
        };
        let ack = SubAck {
            pkid: subscribe.pkid,
            return_codes: vec![code; subscribe.filters.len()],
        };
        self.answer(Packet::SubAck(ack, None))
    }

    /// Serves a SUBSCRIBE to exact command topics from the mux link: registers each topic,
    /// answers the SUBACK (with the `refused` filters' codes in their places), and queues the
    /// retained command of each topic after it.
    fn subscribe_commands(
        &mut self,
        subscribe: &Subscribe,
        refused: &[(usize, SubscribeReasonCode)],
    ) -> Result<(), DisconnectReason> {
        let connection = self.connection;
        let reply = self.port().tx.clone();
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        for filter in &subscribe.filters {
            // Commands are delivered at QoS 0 or 1: a QoS 2 request is granted 1.
            let (granted, qos) = match filter.qos {
                QoS::AtMostOnce => (QoS::AtMostOnce, 0),
                _ => (QoS::AtLeastOnce, 1),
            };
            let retained = self
                .ctx
                .mux
                .subscribe(connection, &filter.path, qos, &reply);
            if !self.mux_subscriptions.contains(&filter.path) {
                if self.mux_subscriptions.is_empty() {
                    // Room for one: a vehicle subscribes to its own commands only.
                    self.mux_subscriptions.reserve_exact(1);
                }
                self.mux_subscriptions.push(filter.path.clone());
            }
            if let Some(command) = retained {
                // Written after the SUBACK: the channel is read once this batch is done.
                let qos = qos.min(command.qos);
                let _ = reply.unbounded_send(MuxEvent::Command { command, qos });
            }
            return_codes.push(SubscribeReasonCode::Success(granted));
        }
        put_back_refusals(&mut return_codes, refused);
        let ack = SubAck {
            pkid: subscribe.pkid,
            return_codes,
        };
        self.answer(Packet::SubAck(ack, None))
    }
}

/// Our own copy of a publish's topic and payload: the commit log must not keep the whole read
/// buffer alive. One allocation for both, shared: the router clones both, and a clone of a
/// `Bytes` made from a `Vec` allocates (its first clone makes it shared), of a shared one not.
fn own_copy(topic: &[u8], payload: &[u8]) -> (Bytes, Bytes) {
    let mut both = Vec::with_capacity(topic.len() + payload.len());
    both.extend_from_slice(topic);
    both.extend_from_slice(payload);
    let both = Bytes::from(both);
    (both.slice(..topic.len()), both.slice(topic.len()..))
}

/// Puts the SUBACK codes of the filters the front end refused back at their positions among
/// the codes of the filters it handed on (`refused` in ascending order of position).
pub(super) fn put_back_refusals(
    codes: &mut Vec<SubscribeReasonCode>,
    refused: &[(usize, SubscribeReasonCode)],
) {
    for &(at, code) in refused {
        codes.insert(at.min(codes.len()), code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy holds exactly the topic and the payload, none of the read buffer around them,
    /// and the two share one buffer.
    #[test]
    fn own_copy_splits_one_buffer_into_topic_and_payload() {
        let read = Bytes::from_static(b"xxfleet/f/van-1/hb\x01\x02\x03yy");
        let (topic, payload) = own_copy(&read[2..18], &read[18..21]);
        assert_eq!(&topic[..], b"fleet/f/van-1/hb");
        assert_eq!(&payload[..], b"\x01\x02\x03");
        assert_eq!(
            topic.as_ptr().wrapping_add(topic.len()),
            payload.as_ptr(),
            "one allocation: the payload follows the topic"
        );
        let (topic, payload) = own_copy(b"t", b"");
        assert_eq!((&topic[..], &payload[..]), (&b"t"[..], &b""[..]));
    }
}
