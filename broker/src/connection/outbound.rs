//! What the connection writes to its client: the router's notifications on the connection's
//! own link, and the mux link's events (PUBACKs of publishes the router took, commands).
//! Everything already queued is written in one go, flushed every [`MAX_WRITE_BATCH`].

use rumqttd::Notification;
use rumqttd::protocol::{Packet, PubAck, PubAckReason};
use shared::topic::kind_of;
use tracing::debug;

use super::network::PublishInfo;
use super::session::{Established, MUX_PKIDS};
use crate::listener::Listener;
use crate::metrics::{DisconnectReason, DropReason};
use crate::mux::{MuxEvent, publish_with};
use crate::router::try_next;

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
                    self.incoming_inflight.retain(|&p| p != pkid);
                    let ack = PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    };
                    self.answer(Packet::PubAck(ack, None))?;
                }
                MuxEvent::Command { command, qos } => {
                    if self.draining {
                        self.ctx.metrics.dropped(DropReason::Shutdown);
                    } else {
                        let pkid = if qos > 0 { self.next_mux_pkid() } else { 0 };
                        let publish = publish_with(
                            &command.topic,
                            &command.payload,
                            qos,
                            pkid,
                            command.retain,
                        );
                        self.answer(Packet::Publish(publish, None))?;
                        self.ctx.metrics.message_out(kind_of(&command.topic));
                        if qos > 0 {
                            self.mux_outgoing.push(pkid);
                        }
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
    pub(super) async fn deliver(
        &mut self,
        first: Option<Notification>,
    ) -> Result<(), DisconnectReason> {
        let mut unscheduled = false;
        let mut end = None;
        let mut next = first;
        let mut written = 0;
        while let Some(notification) = next.take() {
            match notification {
                Notification::Forward(forward) => {
                    if self.draining {
                        self.ctx.metrics.dropped(DropReason::Shutdown);
                    } else {
                        let kind = kind_of(&forward.publish.topic);
                        match self
                            .net
                            .queue(Packet::Publish(forward.publish, forward.properties))
                        {
                            Ok(info) => {
                                self.ctx.metrics.message_out(kind);
                                if let Some(PublishInfo { qos: 1, pkid }) = info
                                    && !self.outgoing_inflight.contains(&pkid)
                                {
                                    self.outgoing_inflight.push(pkid);
                                }
                            }
                            Err(err) => return Err(self.protocol_error(&err)),
                        }
                    }
                }
                Notification::DeviceAck(ack) => {
                    let packet: Packet = ack.into();
                    if let Packet::PubAck(ack, _) = &packet {
                        self.incoming_inflight.retain(|&p| p != ack.pkid);
                    }
                    self.answer(packet)?;
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
}
