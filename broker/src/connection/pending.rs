//! [`PendingConnects`]: connections accepted that have not sent their CONNECT yet, bounded in
//! all (`max_pending_connects`) and per client IP address (`max_pending_connects_per_ip`).
//!
//! Each such connection holds a socket and its buffers for up to `connection_timeout_ms`; a
//! peer that opens connections and sends nothing could otherwise hold thousands. One beyond
//! either bound is closed at once, before a byte is read, and counted.
//!
//! The broker's own listener probe is exempt: it registers its socket's address before it
//! connects ([`PendingConnects::exempt`]), so a flood of silent connections cannot make a
//! healthy listener look dead.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The connections awaiting CONNECT, in all and per address.
#[derive(Debug)]
pub(crate) struct PendingConnects {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
    /// Local addresses of the broker's own probe connections, not counted.
    exempt: Mutex<HashSet<SocketAddr>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Which bound refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingFull {
    /// `max_pending_connects`.
    Total,
    /// `max_pending_connects_per_ip`.
    PerIp,
}

/// One connection's place among those awaiting CONNECT; given back when dropped.
#[derive(Debug)]
pub(crate) struct PendingSlot {
    pending: Arc<PendingConnects>,
    /// The address counted, `None` for the exempt probe.
    ip: Option<IpAddr>,
}

/// A probe connection's exemption, from its local address; withdrawn when dropped.
#[derive(Debug)]
pub(crate) struct Exemption {
    pending: Arc<PendingConnects>,
    addr: SocketAddr,
}

impl Drop for Exemption {
    fn drop(&mut self) {
        self.pending.exempted().remove(&self.addr);
    }
}

impl PendingConnects {
    /// Bounds of `max_total` connections awaiting CONNECT, `max_per_ip` from one address.
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(PendingConnects {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
            exempt: Mutex::new(HashSet::new()),
        })
    }

    fn exempted(&self) -> MutexGuard<'_, HashSet<SocketAddr>> {
        self.exempt.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Exempts the connection that will come from `local` (the broker's own probe, bound
    /// there before it connects) until the returned exemption is dropped.
    pub(crate) fn exempt(self: &Arc<Self>, local: SocketAddr) -> Exemption {
        self.exempted().insert(local);
        Exemption {
            pending: Arc::clone(self),
            addr: local,
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for a connection from `peer`, or says which bound is reached.
    pub(crate) fn enter(self: &Arc<Self>, peer: SocketAddr) -> Result<PendingSlot, PendingFull> {
        if self.exempted().contains(&peer) {
            return Ok(PendingSlot {
                pending: Arc::clone(self),
                ip: None,
            });
        }
        let ip = peer.ip();
        let mut counts = self.counts();
        if counts.total >= self.max_total {
            return Err(PendingFull::Total);
        }
        let from_ip = counts.per_ip.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            return Err(PendingFull::PerIp);
        }
        *from_ip += 1;
        counts.total += 1;
        Ok(PendingSlot {
            pending: Arc::clone(self),
            ip: Some(ip),
        })
    }

    /// Connections awaiting CONNECT now.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.counts().total
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let Some(ip) = self.ip else {
            return;
        };
        let mut counts = self.pending.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_all_and_per_address_and_given_back() {
        let pending = PendingConnects::new(3, 2);
        let a = SocketAddr::from(([10, 0, 0, 1], 1000));
        let b = SocketAddr::from(([10, 0, 0, 2], 1000));
        let first = pending.enter(a).unwrap();
        let _second = pending.enter(a).unwrap();
        assert_eq!(pending.enter(a).unwrap_err(), PendingFull::PerIp);
        let _third = pending.enter(b).unwrap();
        assert_eq!(pending.enter(b).unwrap_err(), PendingFull::Total);
        drop(first);
        assert_eq!(pending.total(), 2);
        assert!(pending.enter(a).is_ok(), "a place was given back");
        assert_eq!(pending.total(), 2, "and the new one dropped at once");

        // The probe's connection is not counted, whatever the others do.
        let _full = pending.enter(SocketAddr::from(([10, 0, 0, 3], 1)));
        let probe = SocketAddr::from(([127, 0, 0, 1], 5555));
        let exemption = pending.exempt(probe);
        assert!(pending.enter(probe).is_ok());
        drop(exemption);
        assert_eq!(pending.enter(probe).unwrap_err(), PendingFull::Total);
    }
}
