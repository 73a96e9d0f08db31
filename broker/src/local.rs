//! [`LocalSubscriber`]: an in-process subscription for the program that embeds the broker.
//! The bridge's embedded mode reads the heartbeats this way: what the router routes to the
//! subscriber's filters comes straight from rumqttd's link, without the PUBLISH being encoded,
//! written to a loopback socket, read by a client's own thread and decoded again.
//!
//! Messages are delivered at QoS 0 (the filters are subscribed at 0), in the router's order.
//! A subscriber that falls behind is paused by the router like any slow subscriber (its queue
//! is bounded); [`LocalSubscriber::recv`] resumes it once it has taken what was queued.

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use shared::topic::kind_of;

use crate::error::BrokerError;
use crate::metrics::BrokerMetrics;
use crate::router::{LinkRequest, Registrar, send_now, try_next};

/// One message a [`LocalSubscriber`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMessage {
    /// The topic it was published on.
    pub topic: Bytes,
    /// Its payload.
    pub payload: Bytes,
}

/// An in-process subscription to the broker's router: see the module documentation and
/// [`Broker::subscribe_local`](crate::Broker::subscribe_local).
pub struct LocalSubscriber {
    /// Says goodbye when the subscriber is dropped, so that the router forgets the link.
    tx: LinkTx,
    rx: LinkRx,
    metrics: BrokerMetrics,
    /// The router paused the link (its queue was full) and has not been told to resume yet.
    paused: bool,
}

opaque_debug!(LocalSubscriber);

/// The router does not answer a new link's SUBSCRIBE within this time: something is wrong.
const SUBSCRIBE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl LocalSubscriber {
    /// Registers `client_id` with the router and subscribes it to `filters` at QoS 0;
    /// returns once the router has acknowledged every filter, so that whatever is published
    /// after that reaches the subscriber.
    pub(crate) async fn subscribe(
        registrar: &Registrar,
        client_id: &str,
        filters: &[&str],
        metrics: BrokerMetrics,
    ) -> Result<Self, BrokerError> {
        let unavailable = |reason: String| BrokerError::RouterUnavailable {
            reason: format!("local subscriber {client_id}: {reason}"),
        };
        let (mut tx, mut rx, _connack) = registrar
            .link(LinkRequest::internal(client_id))
            .map_err(|err| unavailable(err.to_string()))?;
        for filter in filters {
            tx.subscribe(*filter)
                .map_err(|err| unavailable(err.to_string()))?;
        }
        let mut acknowledged = 0;
        let waited = tokio::time::timeout(SUBSCRIBE_PATIENCE, async {
            while acknowledged < filters.len() {
                match rx.next().await {
                    Ok(Some(Notification::DeviceAck(ack))) => {
                        if matches!(Packet::from(ack), Packet::SubAck(..)) {
                            acknowledged += 1;
                        }
                    }
                    // Nothing else can come before the acknowledgements of a new link.
                    Ok(_) => {}
                    Err(err) => return Err(unavailable(err.to_string())),
                }
            }
            Ok(())
        })
        .await;
        match waited {
            Ok(result) => result?,
            Err(_) => {
                return Err(unavailable(format!(
                    "no SUBACK within {SUBSCRIBE_PATIENCE:?}"
                )));
            }
        }
        Ok(Self {
            tx,
            rx,
            metrics,
            paused: false,
        })
    }

    /// Waits for the next message, then hands it and every one already queued behind it to
    /// `each`, in order; returns how many.
    ///
    /// Cancel-safe: a call dropped while it waits loses nothing, and one dropped while it
    /// resumes the router after a pause resumes it at the next call.
    ///
    /// # Errors
    /// [`BrokerError::RouterUnavailable`] once the router is gone (the broker died or was
    /// dropped): no message will come.
    pub async fn recv(&mut self, mut each: impl FnMut(LocalMessage)) -> Result<usize, BrokerError> {
        self.resume().await?;
        let mut next = self.rx.next().await.map_err(gone)?;
        let mut received = 0;
        while let Some(notification) = next.take() {
            match notification {
                Notification::Forward(forward) => {
                    self.metrics.message_out(kind_of(&forward.publish.topic));
                    received += 1;
                    each(LocalMessage {
                        topic: forward.publish.topic,
                        payload: forward.publish.payload,
                    });
                }
                // The router paused this link while its queue was full: resumed once the
                // queue is taken.
                Notification::Unschedule => self.paused = true,
                _ => {}
            }
            next = try_next(&mut self.rx);
        }
        self.resume().await?;
        Ok(received)
    }

    /// Tells the router to go on sending, if it paused the link.
    async fn resume(&mut self) -> Result<(), BrokerError> {
        if self.paused {
            self.rx.wake().await.map_err(gone)?;
            self.paused = false;
        }
        Ok(())
    }
}

impl Drop for LocalSubscriber {
    /// The router forgets the link and its subscriptions (it would otherwise keep both, and
    /// one of its connection slots, for as long as the process lives).
    fn drop(&mut self) {
        let bye = Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        };
        // A router that is gone has nothing to forget.
        let _ = send_now(&mut self.tx, Packet::Disconnect(bye, None));
    }
}

/// The router is gone.
fn gone(err: LinkError) -> BrokerError {
    BrokerError::RouterUnavailable {
        reason: format!("local subscriber: {err}"),
    }
}
