//! [`LocalSubscriber`]: an in-process subscription for the program that embeds the broker.
//! The bridge's embedded mode reads the heartbeats this way: what the router routes to the
//! subscriber's filters comes straight from rumqttd's link, without the PUBLISH being encoded,
//! written to a loopback socket, read by a client's own thread and decoded again.
//!
//! Messages are delivered at QoS 0 (the filters are subscribed at 0), in the router's order.
//! A subscriber that falls behind is paused by the router like any slow subscriber (its queue
//! is bounded); [`LocalSubscriber::recv`] resumes it once it has taken what was queued.

use std::time::Duration;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use shared::topic::kind_of;

use crate::error::BrokerError;
use crate::metrics::BrokerMetrics;
use crate::router::{Registrar, send_now, try_next};

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

/// The router does not register a new link and acknowledge its SUBSCRIBE within this time:
/// something is wrong.
const SUBSCRIBE_PATIENCE: Duration = Duration::from_secs(10);

impl LocalSubscriber {
    /// Registers `client_id` with the router and subscribes it to `filters` at QoS 0;
    /// returns once the router has acknowledged every filter, so that whatever is published
    /// after that reaches the subscriber. Gives up after [`SUBSCRIBE_PATIENCE`].
    pub(crate) async fn subscribe(
        registrar: &Registrar,
        client_id: &str,
        filters: &[&str],
        metrics: BrokerMetrics,
    ) -> Result<Self, BrokerError> {
        Self::subscribe_within(registrar, client_id, filters, metrics, SUBSCRIBE_PATIENCE).await
    }

    /// [`subscribe`](Self::subscribe), giving up after `patience`.
    async fn subscribe_within(
        registrar: &Registrar,
        client_id: &str,
        filters: &[&str],
        metrics: BrokerMetrics,
        patience: Duration,
    ) -> Result<Self, BrokerError> {
        let unavailable = |reason: String| BrokerError::RouterUnavailable {
            reason: format!("local subscriber {client_id}: {reason}"),
        };
        let subscribed = tokio::time::timeout(patience, async {
            let (mut tx, mut rx, _connack) = registrar
                .link_detached(client_id)
                .await
                .map_err(|err| unavailable(err.to_string()))?;
            for filter in filters {
                tx.subscribe(*filter)
                    .map_err(|err| unavailable(err.to_string()))?;
            }
            let mut acknowledged = 0;
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
            Ok((tx, rx))
        })
        .await;
        let (tx, rx) = match subscribed {
            Ok(result) => result?,
            Err(_) => {
                return Err(unavailable(format!(
                    "not registered and subscribed within {patience:?}"
                )));
            }
        };
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::router::LinkRefused;

    /// A subscription through `registrar` with `patience`: its error, or `Ok` if it
    /// subscribed.
    async fn subscribe_with(registrar: &Registrar, patience: Duration) -> Result<(), BrokerError> {
        LocalSubscriber::subscribe_within(
            registrar,
            "fleetbeat-internal-local-test",
            &["fleet/+/+/hb"],
            BrokerMetrics::default(),
            patience,
        )
        .await
        .map(|_| ())
    }

    /// A router that died with the registration in its queue never answers it: the
    /// subscription gives up after its patience instead of blocking its caller (the bridge's
    /// start, which then could not see the broker's death and exit).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_registration_the_router_never_answers_is_given_up_after_the_patience() {
        // Answers after 30 s: long after the patience, but a broken version fails in time.
        let registrar = Registrar::from_fn(|_| {
            std::thread::sleep(Duration::from_secs(30));
            Err(LinkRefused("too late".to_owned()))
        });
        let started = Instant::now();
        let subscribing =
            tokio::spawn(
                async move { subscribe_with(&registrar, Duration::from_millis(200)).await },
            );
        let outcome = tokio::time::timeout(Duration::from_secs(10), subscribing)
            .await
            .expect("the subscription blocked past its patience")
            .expect("the subscribing task panicked");
        let err = outcome.expect_err("a router that never answers cannot subscribe anyone");
        assert!(
            matches!(&err, BrokerError::RouterUnavailable { reason } if reason.contains("within 200ms")),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// A refused registration is the subscription's error, with the router's reason.
    #[tokio::test]
    async fn a_refused_registration_is_an_error_with_its_reason() {
        let registrar = Registrar::from_fn(|_| Err(LinkRefused("router full".to_owned())));
        let err = subscribe_with(&registrar, Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, BrokerError::RouterUnavailable { reason } if reason.contains("router full")),
            "{err}"
        );
    }
}
