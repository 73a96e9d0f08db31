//! Retained messages sent again for a repeated SUBSCRIBE.
//!
//! MQTT 3.1.1 §3.8.4 says a SUBSCRIBE of a filter the client has replaces the subscription and
//! sends its retained messages again; so does MQTT 5's Retain Handling 0, the default. rumqttd
//! 0.20's router keeps one subscription per filter and connection and sends retained messages
//! to a new one only: the repeated SUBSCRIBE changes nothing there. The front end fetches them
//! itself ([`resend`]): a link of the broker's own subscribes to the filters, once, at QoS 0;
//! the router answers the SUBSCRIBEs, then sends the new subscriptions their retained messages,
//! flagged; a PINGREQ sent once every SUBACK came is answered after them (the router flushes a
//! link's acknowledgements before its forwards, one round after the other), which tells the
//! end. Each retained message goes to the subscriber's connection (its port, as commands and
//! shared subscriptions' messages do), to be written at min(its QoS, the subscription's), with
//! the retain flag; the link is dropped.
//!
//! The subscriber's own subscription is not touched, so its flow of live messages goes on.
//! A message retained while the fetch runs may come twice, as for a new subscription in the
//! router (defect 7 in `docs/broker.md`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PingReq, PublishProperties, QoS,
    RetainForwardRule, Subscribe, SubscribeProperties,
};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::router::{LinkName, LinkRequest, Registrar, send_now};

/// The longest a fetch may take, from the SUBSCRIBEs to the PINGRESP.
const PATIENCE: Duration = Duration::from_secs(10);

/// Fetches running at once, all connections together: each holds a router link (tens of KiB)
/// while it runs, and repeated SUBSCRIBEs from many clients must not take the router's
/// connection slots. Further ones wait their turn.
const MAX_FETCHES: usize = 16;

/// The broker's fetches: at most [`MAX_FETCHES`] at once.
#[derive(Debug, Clone)]
pub(crate) struct Fetches(Arc<Semaphore>);

impl Default for Fetches {
    fn default() -> Self {
        Fetches(Arc::new(Semaphore::new(MAX_FETCHES)))
    }
}

/// A retained message to write to a subscriber again.
#[derive(Debug, Clone)]
pub(crate) struct RetainedMessage {
    /// Its topic.
    pub(crate) topic: Bytes,
    /// Its payload.
    pub(crate) payload: Bytes,
    /// Its MQTT 5 properties, without anything the broker carried through the router.
    pub(crate) properties: Option<PublishProperties>,
}

/// A filter a client subscribed to again, whose retained messages it gets again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Repeated {
    /// The filter.
    pub(crate) filter: String,
    /// The QoS granted: they are written at min(their QoS, this).
    pub(crate) qos: u8,
    /// The Subscription Identifier the client gave the SUBSCRIBE (MQTT 5), if any: each copy
    /// carries it.
    pub(crate) id: Option<usize>,
}

/// Where a fetch hands the subscriber its retained messages: the subscriber's connection (its
/// mux port, see `mux`, which implements this; so this module does not depend on the mux).
pub(crate) trait RetainedPort: Send + Sync + 'static {
    /// Hands `message` to the subscriber, to write at `qos`; false if its connection is gone.
    fn give(&self, message: RetainedMessage, qos: u8) -> bool;
}

/// Why a fetch ended early.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// The router dropped the link, or is gone.
    #[error("the router link failed: {0}")]
    Link(String),
    /// Not over within [`PATIENCE`].
    #[error("not over within {PATIENCE:?}")]
    Late,
}

/// Sends the retained messages matching `filters` (each with what the subscriber's repeated
/// subscription was granted) to the connection whose port is `to`, from a task of
/// its own, once one of `fetches` is free; logged if the router refuses the fetch's link (the
/// SUBACK was granted already: the messages are then not sent again).
pub(crate) fn resend(
    fetches: &Fetches,
    registrar: &Registrar,
    filters: Vec<Repeated>,
    to: impl RetainedPort,
) {
    if filters.is_empty() {
        return;
    }
    let (fetches, registrar) = (Arc::clone(&fetches.0), registrar.clone());
    tokio::spawn(async move {
        let Ok(_turn) = fetches.acquire().await else {
            return;
        };
        let name = registrar.link_name();
        match registrar.link(LinkRequest::internal(name.as_str())) {
            Ok((tx, rx, _connack)) => run(name, tx, rx, filters, to).await,
            Err(err) => {
                warn!(cause = %err, "retained messages not sent again: the router did not register the fetch");
            }
        }
    });
}

async fn run(
    name: LinkName,
    mut tx: LinkTx,
    mut rx: LinkRx,
    filters: Vec<Repeated>,
    to: impl RetainedPort,
) {
    match timeout(PATIENCE, fetch(&mut tx, &mut rx, &filters, &to)).await {
        Ok(Ok(sent)) => debug!(
            sent,
            filters = filters.len(),
            "retained messages sent again"
        ),
        Ok(Err(err)) => warn!(cause = %err, "retained messages not all sent again"),
        Err(_) => warn!(cause = %FetchError::Late, "retained messages not all sent again"),
    }
    let bye = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    if let Err(err) = send_now(&mut tx, Packet::Disconnect(bye, None)) {
        debug!(cause = %err, "the fetch's link could not say goodbye");
    }
    // The router has the disconnect before the name may be registered again.
    drop(name);
}

/// Subscribes the fetch's link to `filters` and hands each retained message the router sends
/// to `to`, until the PINGRESP that follows them. How many went.
async fn fetch(
    tx: &mut LinkTx,
    rx: &mut LinkRx,
    filters: &[Repeated],
    to: &impl RetainedPort,
) -> Result<usize, FetchError> {
    let link = |err: rumqttd::local::LinkError| FetchError::Link(err.to_string());
    for (at, repeated) in filters.iter().enumerate() {
        let filter = Filter {
            path: repeated.filter.clone(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![filter],
        };
        // Each copy says which filter it came through, for that subscription's QoS.
        let properties = SubscribeProperties {
            id: Some(at + 1),
            user_properties: Vec::new(),
        };
        tx.send(Packet::Subscribe(subscribe, Some(properties)))
            .await
            .map_err(link)?;
    }
    let (mut subacks, mut sent) = (0, 0);
    loop {
        let Some(notification) = rx.next().await.map_err(link)? else {
            continue;
        };
        match notification {
            Notification::DeviceAck(ack) => match Packet::from(ack) {
                Packet::SubAck(..) => {
                    subacks += 1;
                    if subacks == filters.len() {
                        tx.send(Packet::PingReq(PingReq)).await.map_err(link)?;
                    }
                }
                Packet::PingResp(_) => return Ok(sent),
                _ => {}
            },
            // Live messages (unflagged) are the subscriber's own subscription's business.
            Notification::Forward(forward) if forward.publish.retain => {
                let mut properties = forward.properties;
                let through = properties
                    .as_mut()
                    .and_then(|p| p.subscription_identifiers.pop())
                    .and_then(|id| filters.get(id.checked_sub(1)?));
                let Some(repeated) = through else {
                    continue;
                };
                if crate::expiry::restore(&mut properties) == crate::expiry::Aged::Expired {
                    continue;
                }
                let topic = forward.publish.topic;
                let original = crate::qos::take_original(&topic, &mut properties);
                if let Some(id) = repeated.id {
                    properties
                        .get_or_insert_with(PublishProperties::default)
                        .subscription_identifiers
                        .push(id);
                } else if properties.as_ref() == Some(&PublishProperties::default()) {
                    properties = None;
                }
                let message = RetainedMessage {
                    topic,
                    payload: forward.publish.payload,
                    properties,
                };
                if !to.give(message, original.min(repeated.qos)) {
                    // The subscriber is gone.
                    return Ok(sent);
                }
                sent += 1;
            }
            Notification::Unschedule => rx.wake().await.map_err(link)?,
            _ => {}
        }
    }
}
