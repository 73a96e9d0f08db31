//! Sessions that outlive their connection: which client ids may have one in rumqttd's router,
//! the bound on them (`max_persistent_sessions`), and MQTT 5 session expiry.
//!
//! rumqttd 0.20's router knows 3.1.1's rule only: a link registered with clean session off
//! takes up the id's saved session and leaves its own behind, kept until a link with clean
//! session on registers under the id (which discards it). MQTT 5 separates the two (§3.1.2.4,
//! §3.1.2.11.2): Clean Start says whether to take up the saved session, the Session Expiry
//! Interval how long the session outlives the connection (absent or 0: it ends with it;
//! `0xFFFFFFFF`: never). The front end maps a CONNECT's pair onto the router's one flag
//! ([`Sessions::note`]) and discards sessions when they end, by registering a clean link under
//! the id and dropping it at once ([`Sessions::discard`]):
//!
//! | Clean Start | expiry | router link | at the end of the connection |
//! |---|---|---|---|
//! | 1 | 0 | clean (under the id only if the id had a session, which that discards) | nothing left |
//! | 1 | > 0 | the old session discarded first, then clean session off | kept, expires after the interval |
//! | 0 | 0 | clean session off if the id has a session (taken up, session present), else clean | discarded |
//! | 0 | > 0 | clean session off | kept, expires after the interval |
//!
//! 3.1.1's clean session 0 is Clean Start 0 with an interval that never ends. An expiry
//! waits on one task per id, aborted when the id connects again; it discards the session only
//! if no connection of the id came since (each connection of an id bumps its epoch, under the
//! same lock the discard holds, so a discard never lands after a new connection's
//! registration). A DISCONNECT may change the interval (not from 0 to more: a protocol
//! error, `inbound`). Sessions live in memory: a restart ends them all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::options::LinkFilters;
use crate::metrics::BrokerMetrics;
use crate::router::{LinkRequest, Registrar, send_now};
use crate::watchers::MirrorWatchers;

/// The Session Expiry Interval that never ends (MQTT 5 `0xFFFFFFFF`; 3.1.1 persistent sessions).
const NEVER: u32 = u32::MAX;

/// What a CONNECT asks of its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SessionRequest {
    /// Take up the session the client id has, if any (3.1.1: clean session 0; 5: Clean Start 0).
    pub(super) resume: bool,
    /// Seconds the session outlives the connection: 0 ends it with the connection, [`NEVER`]
    /// keeps it for good.
    pub(super) expiry: u32,
}

impl SessionRequest {
    /// An MQTT 3.1.1 CONNECT's: clean session off resumes and keeps the session for good.
    pub(super) fn v4(clean_session: bool) -> SessionRequest {
        SessionRequest {
            resume: !clean_session,
            expiry: if clean_session { 0 } else { NEVER },
        }
    }

    /// An MQTT 5 CONNECT's: Clean Start and the Session Expiry Interval (absent: 0).
    pub(super) fn v5(clean_start: bool, interval: Option<u32>) -> SessionRequest {
        SessionRequest {
            resume: !clean_start,
            expiry: interval.unwrap_or(0),
        }
    }

    /// Whether the connection may take up or leave a session another connection of the id
    /// could use (what the client id rules of `auth::client_id` call persistent).
    pub(super) fn may_persist(self) -> bool {
        self.resume || self.expiry > 0
    }
}

/// What [`Sessions::note`] decided for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Noted {
    /// The router may have held a session for the id until now.
    pub(super) had: bool,
    /// The connection's link is registered with clean session off (it takes up the id's
    /// session, or starts one the router keeps).
    pub(super) persistent: bool,
    /// The id's epoch for this connection (see [`Sessions::ended`]).
    pub(super) epoch: u64,
}

/// A persistent session's terms while its connection lasts, kept with its router link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Term {
    /// The id's epoch when the connection registered.
    pub(super) epoch: u64,
    /// Seconds the session outlives the connection ([`NEVER`]: for good).
    pub(super) expiry: u32,
    /// The CONNECT's interval was not 0: a DISCONNECT may set another (from 0, it may not).
    pub(super) may_change: bool,
}

/// [`Limits::max_persistent_sessions`](super::Limits) client ids had a persistent session
/// already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SessionsFull;

/// Every client id that had a persistent session since the broker started, and the expiries
/// that wait.
///
/// rumqttd's router keeps something for such an id for good (the session, or once it was
/// discarded, the id's last connection events), so ids are never removed, and at most
/// `max_persistent_sessions` are kept.
#[derive(Debug)]
pub(crate) struct Sessions {
    ids: Mutex<HashMap<String, Entry>>,
    /// Registers the links that discard sessions.
    registrar: Registrar,
    /// Told when a session (and its subscriptions) ends.
    watchers: Arc<MirrorWatchers>,
    metrics: BrokerMetrics,
    /// The broker stops: expiries wait no longer, sessions end with it.
    stopping: CancellationToken,
}

#[derive(Debug)]
struct Entry {
    /// Whether the router may hold a session for the id now.
    held: bool,
    /// Bumped at every connection of the id: an expiry set before it is void.
    epoch: u64,
    /// The task waiting to discard the session, if its expiry runs.
    expiry: Option<AbortHandle>,
    /// The session's filters in the router, with their options (`options`), kept between its
    /// connections.
    filters: Option<Box<LinkFilters>>,
    /// Packet ids of QoS 2 publishes its last connection received and answered with PUBREC,
    /// whose PUBREL had not come: the next connection does not route their resend again.
    qos2_received: Vec<u16>,
}

impl Sessions {
    /// No session yet; sessions are discarded through `registrar`, `watchers` told, counted in
    /// `metrics`; expiries end when `stopping` is cancelled.
    pub(crate) fn new(
        registrar: Registrar,
        watchers: Arc<MirrorWatchers>,
        metrics: BrokerMetrics,
        stopping: CancellationToken,
    ) -> Arc<Sessions> {
        Arc::new(Sessions {
            ids: Mutex::default(),
            registrar,
            watchers,
            metrics,
            stopping,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a connection of `client_id` asking for `request`: whether its link takes up or
    /// starts a session the router keeps, and whether the router may have held one for it.
    /// An expiry waiting for the id's session is called off.
    ///
    /// # Errors
    /// [`SessionsFull`] for a persistent session of a client id that never had one here, when
    /// `most` ids did (0: no bound): nothing is recorded.
    pub(super) fn note(
        &self,
        client_id: &str,
        request: SessionRequest,
        most: usize,
    ) -> Result<Noted, SessionsFull> {
        let mut ids = self.lock();
        if let Some(entry) = ids.get_mut(client_id) {
            if let Some(expiry) = entry.expiry.take() {
                expiry.abort();
            }
            let had = entry.held;
            let persistent = request.expiry > 0 || (request.resume && had);
            if !(request.resume && had) {
                // The router discards the session, subscriptions and all.
                entry.forget_kept();
            }
            entry.held = persistent;
            entry.epoch += 1;
            return Ok(Noted {
                had,
                persistent,
                epoch: entry.epoch,
            });
        }
        let persistent = request.expiry > 0;
        if !persistent {
            return Ok(Noted {
                had: false,
                persistent,
                epoch: 0,
            });
        }
        if most != 0 && ids.len() >= most {
            return Err(SessionsFull);
        }
        let entry = Entry {
            held: true,
            epoch: 0,
            expiry: None,
            filters: None,
            qos2_received: Vec::new(),
        };
        ids.insert(client_id.to_owned(), entry);
        Ok(Noted {
            had: false,
            persistent,
            epoch: 0,
        })
    }

    /// The filters and the QoS 2 publishes awaiting their PUBREL of the session `client_id`'s
    /// connection takes up (see [`Self::ended`]).
    pub(super) fn resume(&self, client_id: &str) -> (Option<Box<LinkFilters>>, Vec<u16>) {
        let mut ids = self.lock();
        let Some(entry) = ids.get_mut(client_id) else {
            return (None, Vec::new());
        };
        (
            entry.filters.take(),
            std::mem::take(&mut entry.qos2_received),
        )
    }

    /// Notes that the router did not register `client_id`'s persistent session (the id stays
    /// counted: the router may keep something of it from before).
    pub(super) fn forget(&self, client_id: &str) {
        if let Some(entry) = self.lock().get_mut(client_id) {
            entry.held = false;
        }
    }

    /// How many client ids had a persistent session since start.
    #[cfg(test)]
    fn ids(&self) -> usize {
        self.lock().len()
    }

    /// The connection of `client_id` that registered at `term.epoch` ended (its link's
    /// disconnect handed to the router): its session is discarded now if its expiry is 0, or
    /// after `term.expiry` seconds unless the id connects again before; kept for good with
    /// [`NEVER`]. A session kept keeps its `filters` and the packet ids of the QoS 2 publishes
    /// received whose PUBREL has not come (`qos2_received`) for the next connection.
    ///
    /// Not while the broker stops: its sessions end with it (they live in memory), and the
    /// router may be gone (a registration then might never be answered).
    pub(super) fn ended(
        self: &Arc<Self>,
        client_id: &str,
        term: Term,
        filters: Option<Box<LinkFilters>>,
        qos2_received: Vec<u16>,
    ) {
        if self.stopping.is_cancelled() {
            return;
        }
        let mut ids = self.lock();
        let Some(entry) = ids.get_mut(client_id) else {
            return;
        };
        if entry.epoch != term.epoch || !entry.held {
            return;
        }
        entry.filters = filters.filter(|filters| !filters.is_empty());
        entry.qos2_received = qos2_received;
        match term.expiry {
            NEVER => {}
            0 => {
                self.expire(client_id, entry);
            }
            seconds => {
                let (sessions, id) = (Arc::clone(self), client_id.to_owned());
                let wait = Duration::from_secs(u64::from(seconds));
                let epoch = term.epoch;
                let task = tokio::spawn(async move {
                    tokio::select! {
                        () = sessions.stopping.cancelled() => {}
                        () = tokio::time::sleep(wait) => {
                            let mut ids = sessions.lock();
                            if let Some(entry) = ids.get_mut(&id)
                                && entry.epoch == epoch
                                && entry.held
                            {
                                entry.expiry = None;
                                sessions.expire(&id, entry);
                            }
                        }
                    }
                });
                if let Some(earlier) = entry.expiry.replace(task.abort_handle()) {
                    earlier.abort();
                }
            }
        }
    }
}

impl Entry {
    /// Forgets what the session kept for its next connection (its session is discarded).
    fn forget_kept(&mut self) {
        self.filters = None;
        self.qos2_received = Vec::new();
    }
}

impl Sessions {
    /// Discards the session of `client_id` in `entry` (its lock held), counted.
    fn expire(&self, client_id: &str, entry: &mut Entry) {
        entry.held = false;
        entry.forget_kept();
        self.watchers.session_ended(client_id);
        match self.discard(client_id) {
            Ok(()) => {
                self.metrics.session_expired();
                debug!(client_id, "session expired: discarded");
            }
            Err(err) => {
                warn!(client_id, cause = %err, "could not discard an expired session");
            }
        }
    }

    /// Makes the router discard the session it keeps for `client_id`: a link registered under
    /// it with clean session on (the router drops the saved session for it), then its
    /// disconnect at once. Both go on the router's one event channel, in order, before anything
    /// a later registration sends.
    pub(super) fn discard(&self, client_id: &str) -> Result<(), DiscardError> {
        let (mut tx, _rx, _connack) = self
            .registrar
            .link(LinkRequest {
                client_id,
                clean_session: true,
            })
            .map_err(|err| DiscardError(err.to_string()))?;
        let bye = Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        };
        send_now(&mut tx, Packet::Disconnect(bye, None))
            .map_err(|err| DiscardError(err.to_string()))
    }
}

/// The router did not take a discard.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct DiscardError(String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::LinkRefused;

    fn sessions() -> Arc<Sessions> {
        let registrar = Registrar::from_fn(|_| Err(LinkRefused("no router here".into())));
        Sessions::new(
            registrar,
            Arc::default(),
            BrokerMetrics::default(),
            CancellationToken::new(),
        )
    }

    fn noted(sessions: &Sessions, id: &str, request: SessionRequest) -> Noted {
        sessions.note(id, request, 0).unwrap()
    }

    #[test]
    fn mqtt5_flags_map_onto_the_routers_one_flag() {
        let sessions = sessions();
        // Clean Start 0 without a session to take up, expiry 0: a clean session.
        let n = noted(&sessions, "a", SessionRequest::v5(false, None));
        assert_eq!((n.had, n.persistent), (false, false));
        assert_eq!(sessions.ids(), 0, "nothing kept, nothing counted");
        // Clean Start 1 with an expiry: kept.
        let n = noted(&sessions, "a", SessionRequest::v5(true, Some(5)));
        assert_eq!((n.had, n.persistent), (false, true));
        // Clean Start 0, expiry 0, a session to take up: taken up (and discarded at the end).
        let n = noted(&sessions, "a", SessionRequest::v5(false, Some(0)));
        assert_eq!((n.had, n.persistent, n.epoch), (true, true, 1));
        // Clean Start 1, expiry 0: the session is discarded by the clean link.
        let n = noted(&sessions, "a", SessionRequest::v5(true, None));
        assert_eq!((n.had, n.persistent, n.epoch), (true, false, 2));
        // Then Clean Start 0 has nothing to take up.
        let n = noted(&sessions, "a", SessionRequest::v5(false, None));
        assert_eq!((n.had, n.persistent), (false, false));
        assert_eq!(sessions.ids(), 1);
        // 3.1.1 as before.
        let n = noted(&sessions, "b", SessionRequest::v4(false));
        assert_eq!((n.had, n.persistent), (false, true));
        let n = noted(&sessions, "b", SessionRequest::v4(true));
        assert_eq!((n.had, n.persistent), (true, false));
    }

    #[test]
    fn the_bound_counts_ids_that_had_a_session() {
        let sessions = sessions();
        assert!(sessions.note("a", SessionRequest::v4(false), 1).is_ok());
        assert_eq!(
            sessions.note("b", SessionRequest::v5(true, Some(1)), 1),
            Err(SessionsFull)
        );
        assert!(
            sessions
                .note("b", SessionRequest::v5(false, None), 1)
                .is_ok(),
            "a clean session gets in"
        );
        sessions.forget("a");
        assert!(
            sessions.note("a", SessionRequest::v4(false), 1).is_ok(),
            "an id that had one may have one again"
        );
    }

    #[test]
    fn what_the_client_id_rules_call_persistent() {
        assert!(!SessionRequest::v4(true).may_persist());
        assert!(SessionRequest::v4(false).may_persist());
        assert!(!SessionRequest::v5(true, None).may_persist());
        assert!(SessionRequest::v5(true, Some(1)).may_persist());
        assert!(SessionRequest::v5(false, Some(0)).may_persist());
    }
}
