//! What each packet from the client does: into a batch for the router (the mux link's or the
//! connection's own), or answered by the front end itself (ACL refusals, PINGRESP, the SUBACK
//! and UNSUBACK of command subscriptions the mux link serves).

use bytes::Bytes;
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, Publish, PublishProperties, QoS,
    SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode, UnsubAck, UnsubAckReason,
    Unsubscribe, UnsubscribeProperties,
};
use shared::topic::kind_of;
use tracing::warn;

use super::network::{PublishInfo, Received, valid_topic_name};
use super::session::Established;
use crate::listener::Listener;
use crate::metrics::{DisconnectReason, DropReason};
use crate::mux::{MuxEvent, is_command_topic};
use crate::router::TOPIC_ALIAS_MAX;

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
                if let Some(at) = self.mux_outgoing.iter().position(|&p| p == ack.pkid) {
                    self.mux_outgoing.swap_remove(at);
                } else if self.link.is_some() {
                    self.outgoing_inflight.retain(|&p| p != ack.pkid);
                    batch.push(Packet::PubAck(ack, properties));
                }
                Ok(())
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
            Packet::Disconnect(disconnect, _) => {
                self.will_on_disconnect =
                    disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                Err(DisconnectReason::Client)
            }
            Packet::Connect(..) => {
                warn!(client_id = self.client_id, "second CONNECT: disconnecting");
                Err(DisconnectReason::Protocol)
            }
            // PUBREL, PUBREC, PUBCOMP: QoS 2 exchanges, which run on the connection's link.
            other => {
                if self.link.is_some() {
                    batch.push(other);
                }
                Ok(())
            }
        };
        handled.err()
    }

    /// A PUBLISH: checked against the topic ACL, then to the mux link (clean sessions, QoS 0
    /// and 1) or the connection's own link (persistent sessions, QoS 2).
    fn on_publish(
        &mut self,
        mut publish: Publish,
        mut properties: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        batch: &mut Vec<Packet>,
    ) -> Result<(), DisconnectReason> {
        self.resolve_alias(&mut publish, properties.as_ref())?;
        self.ctx.metrics.message_in(kind_of(&publish.topic));
        if self.draining {
            // Unacknowledged: a QoS 1 sender sends it again after reconnecting.
            self.ctx.metrics.dropped(DropReason::Shutdown);
            return Ok(());
        }
        if !self.identity.may_publish(&publish.topic) {
            return self.refuse_publish(&publish.topic, qos, pkid);
        }
        let via_link = self.persistent || qos == 2;
        if !via_link {
            self.check_for_mux(&publish, properties.as_mut())?;
        }
        if qos == 1 && !self.incoming_inflight.contains(&pkid) {
            self.incoming_inflight.push(pkid);
        }
        // Our own copy: the commit log must not keep the whole read buffer alive.
        publish.topic = Bytes::copy_from_slice(&publish.topic);
        publish.payload = Bytes::copy_from_slice(&publish.payload);
        self.ctx
            .mux
            .record(&publish.topic, &publish.payload, publish.retain);
        if via_link {
            self.ensure_link()?;
            batch.push(Packet::Publish(publish, properties));
        } else if qos == 1 {
            let reply = self.port().tx.clone();
            let packet = self.ctx.mux.qos1(&publish, properties, &reply, pkid);
            self.mux_batch.push(packet);
        } else {
            self.mux_batch.push(Packet::Publish(publish, properties));
        }
        Ok(())
    }

    /// Gives an MQTT 5 aliased publish (empty topic) the topic its alias stands for, and
    /// remembers the aliases the client sets.
    fn resolve_alias(
        &mut self,
        publish: &mut Publish,
        properties: Option<&PublishProperties>,
    ) -> Result<(), DisconnectReason> {
        let Some(alias) = properties.and_then(|p| p.topic_alias) else {
            return Ok(());
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            warn!(
                client_id = self.client_id,
                alias, "invalid topic alias: disconnecting"
            );
            return Err(DisconnectReason::Protocol);
        }
        if !publish.topic.is_empty() {
            self.topic_aliases
                .insert(alias, Bytes::copy_from_slice(&publish.topic));
            return Ok(());
        }
        match self.topic_aliases.get(&alias) {
            Some(topic) => {
                publish.topic = topic.clone();
                Ok(())
            }
            None => {
                warn!(
                    client_id = self.client_id,
                    alias, "unknown topic alias: disconnecting"
                );
                Err(DisconnectReason::Protocol)
            }
        }
    }

    /// A publish the topic ACL refuses: dropped and counted (logged once per connection);
    /// QoS 1 is acknowledged so the client does not resend it forever.
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
                self.answer(Packet::PubAck(PubAck { pkid, reason }, None))
            }
            // QoS 2 has no way to refuse in 3.1.1: end the connection.
            _ => Err(DisconnectReason::Protocol),
        }
    }

    /// What rumqttd's router would refuse by dropping the link: for the mux link that would be
    /// the link of every device, so the front end refuses it first. Clears the topic alias
    /// (resolved already; the mux link's alias table is not this client's).
    fn check_for_mux(
        &self,
        publish: &Publish,
        properties: Option<&mut PublishProperties>,
    ) -> Result<(), DisconnectReason> {
        if !valid_topic_name(&publish.topic) {
            warn!(client_id = self.client_id, topic = %String::from_utf8_lossy(&publish.topic), "invalid topic name in PUBLISH: disconnecting");
            return Err(DisconnectReason::Protocol);
        }
        if let Some(props) = properties {
            if !props.subscription_identifiers.is_empty() {
                warn!(
                    client_id = self.client_id,
                    "PUBLISH with a subscription identifier: disconnecting"
                );
                return Err(DisconnectReason::Protocol);
            }
            props.topic_alias = None;
        }
        Ok(())
    }

    /// An UNSUBSCRIBE: command topics leave the mux link here, the rest goes to the
    /// connection's own link (answered here if it has none).
    fn on_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        properties: Option<UnsubscribeProperties>,
        batch: &mut Vec<Packet>,
    ) -> Result<(), DisconnectReason> {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        let mut others = false;
        for filter in &unsubscribe.filters {
            if let Some(at) = self.mux_subscriptions.iter().position(|t| t == filter) {
                self.mux_subscriptions.swap_remove(at);
                self.ctx.mux.unsubscribe(self.connection, filter);
                reasons.push(UnsubAckReason::Success);
            } else {
                others = true;
                self.ctx.watchers.unsubscribed(&self.client_id, filter);
                reasons.push(UnsubAckReason::NoSubscriptionExisted);
            }
        }
        if others && self.link.is_some() {
            batch.push(Packet::Unsubscribe(unsubscribe, properties));
            return Ok(());
        }
        let ack = UnsubAck {
            pkid: unsubscribe.pkid,
            reasons,
        };
        self.answer(Packet::UnsubAck(ack, None))
    }

    /// A SUBSCRIBE: refused whole if the topic ACL refuses a filter; served by the mux link if
    /// it names exact command topics only (clean sessions); else by the connection's own link.
    fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
        batch: &mut Vec<Packet>,
    ) -> Result<(), DisconnectReason> {
        if !subscribe
            .filters
            .iter()
            .all(|f| self.identity.may_subscribe(&f.path))
        {
            return self.refuse_subscribe(&subscribe);
        }
        if !self.persistent
            && subscribe
                .filters
                .iter()
                .all(|f| is_command_topic(f.path.as_bytes()))
        {
            return self.subscribe_commands(&subscribe);
        }
        self.ensure_link()?;
        for filter in &subscribe.filters {
            self.ctx.watchers.subscribed(&self.client_id, &filter.path);
        }
        batch.push(Packet::Subscribe(subscribe, properties));
        Ok(())
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
    /// answers the SUBACK, and queues the retained command of each topic after it.
    fn subscribe_commands(&mut self, subscribe: &Subscribe) -> Result<(), DisconnectReason> {
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
                self.mux_subscriptions.push(filter.path.clone());
            }
            if let Some(command) = retained {
                // Written after the SUBACK: the channel is read once this batch is done.
                let _ = reply.send(MuxEvent::Command { command, qos });
            }
            return_codes.push(SubscribeReasonCode::Success(granted));
        }
        let ack = SubAck {
            pkid: subscribe.pkid,
            return_codes,
        };
        self.answer(Packet::SubAck(ack, None))
    }
}
