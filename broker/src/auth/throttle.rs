//! [`LoginThrottle`]: failed logins counted per IP address and per username; past
//! `max_login_failures` within `login_failure_window`, further attempts are refused before any
//! password is checked, so a guesser can neither try many passwords nor make the broker spend
//! argon2 on them.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use std::time::{Duration, Instant};

/// Most IP addresses tracked at once; beyond it the expired ones are forgotten, then, if
/// still full, an arbitrary one (a spray from many addresses then throttles less, and never
/// grows memory).
const MAX_TRACKED_ADDRESSES: usize = 65_536;

/// Failures of one key within the current window, and its checks running now.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
    /// Password checks of this key running (or waiting to run) now: they count against the
    /// bound, so a burst of simultaneous guesses cannot queue more argon2 work than that.
    in_flight: u32,
}

/// One table of failure counts.
#[derive(Debug)]
struct Table<K> {
    entries: HashMap<K, Failures>,
    cap: usize,
}

impl<K: Eq + Hash + Clone> Table<K> {
    fn new(cap: usize) -> Self {
        Table {
            entries: HashMap::new(),
            cap,
        }
    }

    /// Recent failures plus checks running now.
    fn load(&self, key: &K, now: Instant, window: Duration) -> u32 {
        self.entries.get(key).map_or(0, |f| {
            let recent = if now.saturating_duration_since(f.since) < window {
                f.count
            } else {
                0
            };
            recent.saturating_add(f.in_flight)
        })
    }

    /// The entry of `key`, made (room made first, see [`MAX_TRACKED_ADDRESSES`]) if needed.
    fn entry(&mut self, key: &K, now: Instant, window: Duration) -> &mut Failures {
        if !self.entries.contains_key(key) && self.entries.len() >= self.cap {
            self.entries
                .retain(|_, f| f.in_flight > 0 || now.saturating_duration_since(f.since) < window);
            if self.entries.len() >= self.cap
                && let Some(victim) = self.entries.keys().next().cloned()
            {
                self.entries.remove(&victim);
            }
        }
        self.entries.entry(key.clone()).or_insert(Failures {
            count: 0,
            since: now,
            in_flight: 0,
        })
    }

    fn record(&mut self, key: &K, now: Instant, window: Duration) {
        let f = self.entry(key, now, window);
        if now.saturating_duration_since(f.since) < window {
            f.count = f.count.saturating_add(1);
        } else {
            f.count = 1;
            f.since = now;
        }
    }

    fn begin(&mut self, key: &K, now: Instant, window: Duration) {
        let f = self.entry(key, now, window);
        f.in_flight = f.in_flight.saturating_add(1);
    }

    fn end(&mut self, key: &K) {
        if let Some(f) = self.entries.get_mut(key) {
            f.in_flight = f.in_flight.saturating_sub(1);
        }
    }

    fn forget(&mut self, key: &K) {
        if let Some(f) = self.entries.get_mut(key) {
            f.count = 0;
        }
    }
}

/// Failed logins per IP address and per (known) username.
#[derive(Debug)]
pub(crate) struct LoginThrottle {
    /// Failures after which attempts are refused; 0: never.
    max_failures: u32,
    window: Duration,
    addresses: Mutex<Table<IpAddr>>,
    names: Mutex<Table<String>>,
}

/// A password check admitted by [`LoginThrottle::begin`], counted against the bound while it
/// runs; tell its outcome with [`Check::failed`] or [`Check::succeeded`] (dropped without:
/// neither, e.g. a connection closed meanwhile).
#[derive(Debug)]
pub(crate) struct Check<'a> {
    throttle: &'a LoginThrottle,
    peer: IpAddr,
    name: String,
}

impl Check<'_> {
    /// The password was wrong: a failure of the address and of the name.
    pub(crate) fn failed(self) {
        self.throttle.failed(self.peer, Some(&self.name));
    }

    /// The password was right: the name's failures are forgotten (the address's are not).
    pub(crate) fn succeeded(self) {
        if self.throttle.max_failures > 0 {
            self.throttle.names().forget(&self.name);
        }
    }
}

impl Drop for Check<'_> {
    fn drop(&mut self) {
        if self.throttle.max_failures > 0 {
            self.throttle.addresses().end(&self.peer);
            self.throttle.names().end(&self.name);
        }
    }
}

impl LoginThrottle {
    /// A throttle refusing attempts after `max_failures` failures (0: never) within `window`.
    pub(crate) fn new(max_failures: u32, window: Duration) -> Self {
        LoginThrottle {
            max_failures,
            window,
            addresses: Mutex::new(Table::new(MAX_TRACKED_ADDRESSES)),
            // Only names in the credentials file are counted: bounded by the file.
            names: Mutex::new(Table::new(usize::MAX)),
        }
    }

    fn addresses(&self) -> std::sync::MutexGuard<'_, Table<IpAddr>> {
        self.addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Table<String>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether attempts from `peer`, or for `name` (a known username), are refused now:
    /// recent failures and checks running reach the bound.
    pub(crate) fn blocks(&self, peer: IpAddr, name: Option<&str>) -> bool {
        if self.max_failures == 0 {
            return false;
        }
        let now = Instant::now();
        if self.addresses().load(&peer, now, self.window) >= self.max_failures {
            return true;
        }
        name.is_some_and(|name| {
            self.names().load(&name.to_owned(), now, self.window) >= self.max_failures
        })
    }

    /// Admits a password check of known username `name` from `peer`, counted against the
    /// bound while it runs; `None` if they are throttled.
    pub(crate) fn begin(&self, peer: IpAddr, name: &str) -> Option<Check<'_>> {
        if self.blocks(peer, Some(name)) {
            return None;
        }
        if self.max_failures > 0 {
            let now = Instant::now();
            self.addresses().begin(&peer, now, self.window);
            self.names().begin(&name.to_owned(), now, self.window);
        }
        Some(Check {
            throttle: self,
            peer,
            name: name.to_owned(),
        })
    }

    /// A login from `peer` failed; `name` if the username is a known one.
    pub(crate) fn failed(&self, peer: IpAddr, name: Option<&str>) {
        if self.max_failures == 0 {
            return;
        }
        let now = Instant::now();
        self.addresses().record(&peer, now, self.window);
        if let Some(name) = name {
            self.names().record(&name.to_owned(), now, self.window);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn failures_throttle_by_address_and_by_name_until_the_window_passes() {
        let throttle = LoginThrottle::new(3, Duration::from_secs(60));
        for _ in 0..2 {
            throttle.begin(A, "van-1").unwrap().failed();
        }
        assert!(!throttle.blocks(A, Some("van-1")));
        throttle.begin(A, "van-1").unwrap().failed();
        assert!(throttle.blocks(A, None), "by address");
        assert!(throttle.blocks(B, Some("van-1")), "by name, from anywhere");
        assert!(throttle.begin(B, "van-1").is_none());
        assert!(
            !throttle.blocks(B, Some("van-2")),
            "others are not affected"
        );
        // A password verified by argon2 forgets the name's failures.
        Check {
            throttle: &throttle,
            peer: B,
            name: "van-1".to_owned(),
        }
        .succeeded();
        assert!(!throttle.blocks(B, Some("van-1")));
        assert!(
            throttle.blocks(A, Some("van-1")),
            "the address stays throttled"
        );

        let short = LoginThrottle::new(1, Duration::from_millis(1));
        short.failed(A, Some("x"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!short.blocks(A, Some("x")), "the window passed");

        let off = LoginThrottle::new(0, Duration::from_secs(60));
        for _ in 0..100 {
            off.failed(A, Some("x"));
        }
        assert!(!off.blocks(A, Some("x")));
    }

    #[test]
    fn checks_running_count_so_a_burst_cannot_queue_more() {
        let throttle = LoginThrottle::new(3, Duration::from_secs(60));
        let running: Vec<Check<'_>> = (0..3)
            .map(|_| throttle.begin(A, "van-1").unwrap())
            .collect();
        assert!(
            throttle.begin(A, "van-2").is_none(),
            "the address has 3 running"
        );
        assert!(
            throttle.begin(B, "van-1").is_none(),
            "the name has 3 running"
        );
        assert!(throttle.begin(B, "van-2").is_some());
        drop(running);
        assert!(
            throttle.begin(A, "van-1").is_some(),
            "ended without a verdict: not failures"
        );
    }

    #[test]
    fn the_address_table_is_bounded() {
        let mut table = Table::new(4);
        let now = Instant::now();
        for i in 0..100u8 {
            table.record(
                &IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)),
                now,
                Duration::from_secs(60),
            );
        }
        assert_eq!(table.entries.len(), 4);
    }
}
