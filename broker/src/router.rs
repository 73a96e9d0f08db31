//! The broker's handle on rumqttd's router: how connections register with it, and the
//! broker's own publisher (last wills).
//!
//! rumqttd 0.20's public API offers `Router::new(..).spawn()`, which returns the router's
//! event channel, and `local::LinkBuilder`, which registers a connection on that channel with
//! the options a network client asked for (clean session, topic alias maximum). The channel's
//! element type is private to rumqttd, so it cannot be named outside it: [`RouterHandle`]
//! keeps it inside a closure.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use tokio::sync::Mutex;
use tracing::debug;

/// Client-id prefix of the broker's own connections; refused to anyone else.
pub(crate) const INTERNAL_PREFIX: &str = "fleetbeat-internal-";

/// What a connection asks the router for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkRequest<'a> {
    /// The MQTT client id.
    pub(crate) client_id: &'a str,
    /// Clean session (3.1.1) / clean start (5).
    pub(crate) clean_session: bool,
    /// The client's topic alias maximum (MQTT 5), 0 for none.
    pub(crate) topic_alias_max: u16,
}

/// A registered connection: its two link halves and the router's CONNACK.
pub(crate) type Link = (LinkTx, LinkRx, Notification);

/// The router did not register a connection (it is full, or gone). rumqttd's own
/// `LinkError` is over 800 bytes; this keeps its message only.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct LinkRefused(pub(crate) String);

type Connect = dyn Fn(LinkRequest<'_>) -> Result<Link, LinkRefused> + Send + Sync;

/// Registers connections with one router. Cheap to clone.
#[derive(Clone)]
pub(crate) struct RouterHandle {
    connect: Arc<Connect>,
}

impl fmt::Debug for RouterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterHandle").finish_non_exhaustive()
    }
}

impl RouterHandle {
    /// Spawns rumqttd's router (its own thread, `router-0`) with `config`.
    ///
    /// The router thread cannot be stopped: it waits on a channel it holds a sender of
    /// itself. Once every connection is gone it sleeps, holding its commit logs, until the
    /// process exits.
    pub(crate) fn spawn(config: rumqttd::RouterConfig) -> RouterHandle {
        let router_tx = rumqttd::Router::new(0, config).spawn();
        RouterHandle {
            connect: Arc::new(move |request: LinkRequest<'_>| {
                LinkBuilder::new(request.client_id, router_tx.clone())
                    .clean_session(request.clean_session)
                    .topic_alias_max(request.topic_alias_max)
                    .dynamic_filters(false)
                    .build()
                    .map_err(|err| LinkRefused(err.to_string()))
            }),
        }
    }

    /// Registers a connection. Blocks until the router answers (rumqttd's `build` waits on a
    /// synchronous channel): call it through [`Self::link`] from async code.
    fn link_blocking(&self, request: LinkRequest<'_>) -> Result<Link, LinkRefused> {
        (self.connect)(request)
    }

    /// Registers a connection without stalling the other tasks of a multi-threaded runtime.
    pub(crate) fn link(&self, request: LinkRequest<'_>) -> Result<Link, LinkRefused> {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.link_blocking(request))
            }
            _ => self.link_blocking(request),
        }
    }
}

/// The broker's own connection for publishing last wills.
///
/// A will is published on behalf of a connection whose link may already be gone (the router
/// dropped it), so it goes through this separate link. Publishing at QoS 0 loses nothing:
/// rumqttd delivers at the subscription's QoS (see `docs/broker.md`) and stores a retained
/// will either way.
pub(crate) struct WillPublisher {
    tx: Mutex<LinkTx>,
}

impl fmt::Debug for WillPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WillPublisher").finish_non_exhaustive()
    }
}

impl WillPublisher {
    /// Registers the publisher with the router; `rx` must be drained by the caller.
    pub(crate) fn new(
        router: &RouterHandle,
        client_id: &str,
    ) -> Result<(WillPublisher, LinkRx), LinkRefused> {
        let (tx, rx, _connack) = router.link(LinkRequest {
            client_id,
            clean_session: true,
            topic_alias_max: 0,
        })?;
        Ok((WillPublisher { tx: Mutex::new(tx) }, rx))
    }

    /// Publishes `payload` on `topic`, retained if `retain`.
    pub(crate) async fn publish(
        &self,
        topic: Bytes,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), LinkError> {
        let publish = Publish::new(topic, payload, retain);
        self.tx
            .lock()
            .await
            .send(Packet::Publish(publish, None))
            .await
            .map(drop)
    }
}

/// Reads and discards what the router sends to a publish-only link, so its queue stays empty.
pub(crate) async fn drain(mut rx: LinkRx, name: &'static str) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(err) => {
                debug!(link = name, cause = %err, "internal link closed");
                break;
            }
        }
    }
}
