//! What the HTTP handlers share ([`HttpState`]): the routes of `http` and `geofences` both
//! take it, so it lives beside them rather than in either.

use std::sync::Arc;

use axum::extract::FromRef;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;

use super::limits::SocketGuard;
use crate::cluster::ClusterStats;
use crate::domain::Hub;

/// What the HTTP handlers share.
pub(crate) struct HttpState<A: Adapter> {
    /// The Socket.IO server, to announce orders placed over HTTP.
    pub(crate) io: SocketIo<A>,
    /// The bridge's shared state.
    pub(crate) hub: Arc<Hub>,
    /// The embedded broker's counters, appended to `/metrics` (embedded mode only).
    pub(crate) broker: Option<broker::BrokerMetrics>,
    /// The Socket.IO limits: the Origin check, and their counters for `/metrics`.
    pub(crate) guard: Arc<SocketGuard>,
    /// The counters of the link to the other bridges, appended to `/metrics` (with
    /// `redis_url` only).
    pub(crate) cluster: Option<Arc<ClusterStats>>,
}

// Not derived: a derive would ask `A: Clone`.
impl<A: Adapter> Clone for HttpState<A> {
    fn clone(&self) -> Self {
        Self {
            io: self.io.clone(),
            hub: Arc::clone(&self.hub),
            broker: self.broker.clone(),
            guard: Arc::clone(&self.guard),
            cluster: self.cluster.clone(),
        }
    }
}

impl<A: Adapter> FromRef<HttpState<A>> for Arc<Hub> {
    fn from_ref(state: &HttpState<A>) -> Self {
        Arc::clone(&state.hub)
    }
}
