//! Who could be watching the JSON mirror: the subscriptions whose filter may match a
//! `json/...` topic, per client id.
//!
//! Heartbeats are nearly all of a fleet's traffic, and nobody reads their mirror most of the
//! time: the mirror documents them only while at least one such subscription exists (see
//! the `mirror` module). Statuses, events and acks are always mirrored: they are rare, and a
//! status is retained for a late `mosquitto_sub`.
//!
//! A persistent session's subscriptions outlive its connection (the router keeps them), so they
//! are kept here too, until the client unsubscribes or connects again with a clean session.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

/// The first level of every mirror topic.
pub(crate) const MIRROR_ROOT: &str = "json";

/// The subscriptions that may match a mirror topic, by client id.
#[derive(Debug)]
pub(crate) struct MirrorWatchers {
    by_client: Mutex<HashMap<String, Vec<String>>>,
    count: AtomicUsize,
    /// Whether `count > 0`, for the mirror to wait on.
    any: watch::Sender<bool>,
}

impl Default for MirrorWatchers {
    fn default() -> Self {
        Self {
            by_client: Mutex::default(),
            count: AtomicUsize::new(0),
            any: watch::Sender::new(false),
        }
    }
}

impl MirrorWatchers {
    /// [`MirrorWatchers::any`] as it changes.
    pub(crate) fn watch(&self) -> watch::Receiver<bool> {
        self.any.subscribe()
    }

    /// Tells the mirror when `count` crossed zero. Called with `by_client` locked, so the
    /// changes are told in the order they happened.
    fn tell(&self) {
        let now = self.count.load(Ordering::Acquire) > 0;
        self.any
            .send_if_modified(|any| std::mem::replace(any, now) != now);
    }

    /// Whether any subscription may match a mirror topic.
    pub(crate) fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// `client_id` subscribed to `filter`.
    pub(crate) fn subscribed(&self, client_id: &str, filter: &str) {
        if !may_match_mirror(filter) {
            return;
        }
        let mut by_client = self.lock();
        let filters = by_client.entry(client_id.to_owned()).or_default();
        if !filters.iter().any(|f| f == filter) {
            filters.push(filter.to_owned());
            self.count.fetch_add(1, Ordering::AcqRel);
            self.tell();
        }
    }

    /// `client_id` unsubscribed from `filter`.
    pub(crate) fn unsubscribed(&self, client_id: &str, filter: &str) {
        let mut by_client = self.lock();
        let Some(filters) = by_client.get_mut(client_id) else {
            return;
        };
        if let Some(at) = filters.iter().position(|f| f == filter) {
            filters.swap_remove(at);
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.tell();
        }
        if filters.is_empty() {
            by_client.remove(client_id);
        }
    }

    /// `client_id`'s session is gone (a clean session ended, or a clean session replaces a
    /// persistent one): its subscriptions with it.
    pub(crate) fn session_ended(&self, client_id: &str) {
        let mut by_client = self.lock();
        if let Some(filters) = by_client.remove(client_id) {
            self.count.fetch_sub(filters.len(), Ordering::AcqRel);
            self.tell();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.by_client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether a subscription to `filter` may receive a `json/...` topic: its first level (after a
/// `$share/{group}/` prefix) is `json`, `+` or `#`.
pub(crate) fn may_match_mirror(filter: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(shared) => shared.split_once('/').map_or("", |(_, rest)| rest),
        None => filter,
    };
    let first = filter.split('/').next().unwrap_or("");
    first == MIRROR_ROOT || first == "+" || first == "#"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_that_reach_the_mirror() {
        for filter in [
            "json/#",
            "json/fleet/demo/v1/hb",
            "#",
            "+/fleet/#",
            "$share/g/json/#",
        ] {
            assert!(may_match_mirror(filter), "{filter}");
        }
        for filter in [
            "fleet/+/+/hb",
            "fleet/#",
            "jsonx/#",
            "$share/g/fleet/#",
            "$SYS/#",
        ] {
            assert!(!may_match_mirror(filter), "{filter}");
        }
    }

    #[test]
    fn counts_subscriptions_until_they_go() {
        let watchers = MirrorWatchers::default();
        let mut told = watchers.watch();
        watchers.subscribed("a", "fleet/#");
        assert!(!watchers.any(), "not a mirror filter");
        watchers.subscribed("a", "json/#");
        watchers.subscribed("a", "json/#");
        assert!(told.has_changed().unwrap() && *told.borrow_and_update());
        watchers.subscribed("b", "#");
        watchers.unsubscribed("a", "json/#");
        assert!(watchers.any(), "b still watches");
        assert!(
            !told.has_changed().unwrap(),
            "still watched: nothing to tell"
        );
        watchers.session_ended("b");
        assert!(!watchers.any());
        assert!(told.has_changed().unwrap() && !*told.borrow_and_update());
        watchers.unsubscribed("b", "#");
        assert!(!watchers.any(), "no underflow");
    }
}
