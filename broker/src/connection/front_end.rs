//! [`FrontEnd`]: what every connection shares, and the [`Limits`] each one works within.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::pending::PendingConnects;
use super::sessions::Sessions;
use crate::auth::Authenticator;
use crate::carry::RetainWanted;
use crate::client_ids::ClientIds;
use crate::durability::Durability;
use crate::metrics::BrokerMetrics;
use crate::mux::Mux;
use crate::probe::ProbeLogin;
use crate::router::{FilterBudget, Registrar, WillPublisher};
use crate::share::SharedSubscriptions;
use crate::watchers::MirrorWatchers;

/// The limits a connection works within.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a new connection may take to send CONNECT.
    pub(crate) connection_timeout: Duration,
    /// Largest packet accepted (remaining length).
    pub(crate) max_payload_size: usize,
    /// Packets handed to the router per batch.
    pub(crate) max_batch: usize,
    /// Most client connections at once (probes not counted).
    pub(crate) max_connections: usize,
    /// PUBLISH packets per second per client connection (0: no limit); see the `rate` module.
    pub(crate) max_publish_rate: u32,
    /// SUBSCRIBE packets per second per client connection (0: no limit).
    pub(crate) max_subscribe_rate: u32,
    /// Subscription filters per client connection (0: no limit).
    pub(crate) max_subscriptions: usize,
    /// Client ids that may have had a persistent session since start (0: no limit).
    pub(crate) max_persistent_sessions: usize,
    /// Longest keep-alive a client may use (`None`: no maximum); see `handshake`.
    pub(crate) max_keep_alive: Option<u16>,
}

/// Everything connections share.
#[derive(Debug)]
pub(crate) struct FrontEnd {
    pub(crate) limits: Limits,
    /// Connections that have not sent CONNECT yet.
    pub(crate) pending: Arc<PendingConnects>,
    /// `None` in open mode.
    pub(crate) auth: Option<Arc<Authenticator>>,
    pub(crate) probe: ProbeLogin,
    pub(crate) metrics: BrokerMetrics,
    pub(crate) client_ids: ClientIds,
    pub(crate) registrar: Registrar,
    /// The shared link that serves the publishes and command subscriptions of clean-session
    /// connections (see `mux`).
    pub(crate) mux: Arc<Mux>,
    /// End-to-end acknowledgement: which publishes wait for durability, and for what.
    pub(crate) durability: Arc<Durability>,
    /// Shared subscription groups (`$share/{group}/{filter}`, see `share`).
    pub(crate) shared: SharedSubscriptions,
    /// The subscription filters clients made the router keep, bounded by `max_filters`.
    pub(crate) router_filters: Arc<FilterBudget>,
    /// Every client id that had a persistent session since start, whether the router may
    /// hold one for it now, and the MQTT 5 session expiries that wait (see `sessions`).
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) wills: WillPublisher,
    /// Whether any client asked for Retain As Published (`carry`).
    pub(crate) retain_wanted: RetainWanted,
    /// The fetches of retained messages to send again (`retained`).
    pub(crate) retained_fetches: crate::retained::Fetches,
    /// Client connections with a router link of their own, open now.
    pub(crate) own_links: AtomicUsize,
    /// Subscriptions that may read the JSON mirror.
    pub(crate) watchers: Arc<MirrorWatchers>,
    /// Cancelled when a graceful shutdown begins: connections drain and close.
    pub(crate) draining: CancellationToken,
    /// Cancelled when connections must close now.
    pub(crate) stopping: CancellationToken,
    /// Cancelled when `draining` is and when the shared link of device connections dies
    /// (`mux`): a connection listens for both on one token of its own (see `session`).
    pub(crate) alarm: CancellationToken,
    /// Client connections admitted (CONNECT accepted, not yet closed).
    pub(crate) admitted: AtomicUsize,
}

impl FrontEnd {
    /// Takes one of the [`Limits::max_connections`] slots for a client connection (`counted`;
    /// probes are not); `false` if none is left.
    pub(super) fn admit(&self, counted: bool) -> bool {
        if counted && self.admitted.fetch_add(1, Ordering::AcqRel) >= self.limits.max_connections {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back the slot [`Self::admit`] took.
    pub(super) fn release_slot(&self, counted: bool) {
        if counted {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A connection got (`true`) or gave up (`false`) a router link of its own.
    pub(super) fn count_own_link(&self, opened: bool) {
        if opened {
            self.own_links.fetch_add(1, Ordering::AcqRel);
        } else {
            self.own_links.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
