//! What clients call, on top of everything else: the Socket.IO namespaces and their handlers,
//! the HTTP API, and the dispatcher page.
//!
//! - [`socket`]: namespaces, their middleware and named event handlers.
//! - [`adapter`]: the reconnecting Redis link of the Socket.IO adapter of several bridges.
//! - [`https`]: the TLS listener for HTTPS and WSS, and its reloaded certificate.
//! - [`http`]: the axum router (`/healthz`, `/readyz`, `/metrics`, `/api`, Socket.IO).
//! - [`geofences`]: the geofence API (`/api/geofences`) and the sync of fences with the store.
//! - [`state`]: [`state::HttpState`], what the HTTP handlers share.
//! - [`limits`]: the Socket.IO abuse limits, their settings and counters.
//! - [`web`]: the dispatcher page at `/` (embedded assets, `/config.json`).

pub(crate) mod adapter;
pub(crate) mod geofences;
pub(crate) mod http;
pub(crate) mod https;
pub(crate) mod limits;
pub(crate) mod socket;
pub(crate) mod state;
pub(crate) mod web;
