//! Free loopback ports for programs that must be told their port (PostgreSQL, Redis, a broker or
//! a bridge restarted on the same address).
//!
//! A port found by binding port 0 comes from the kernel's ephemeral range, which is also where
//! every outgoing connection takes its source port: between releasing it and the program
//! binding it, any connection on the machine (a bridge to PostgreSQL, a test's client) may take
//! it, and the program fails with "address in use". So the port is chosen at random below the
//! ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), where the kernel gives out no
//! port by itself, and checked free by binding it; only two choosers picking the same port at
//! once can still meet.

use std::io;
use std::net::{Ipv4Addr, TcpListener};

/// The ports chosen from: this many below the ephemeral range's first port.
const SPAN: u16 = 12_000;

/// The lowest port ever chosen (below it: well-known and registered services).
const LOWEST: u16 = 10_000;

/// How many random ports are tried before falling back to port 0.
const TRIES: usize = 64;

/// A port on 127.0.0.1 that was free a moment ago, outside the kernel's ephemeral range if
/// there is room below it (else one the kernel picks).
///
/// # Errors
/// If no port can be bound at all.
pub fn free_port() -> io::Result<u16> {
    let (low, high) = below_ephemeral();
    if low < high {
        for _ in 0..TRIES {
            let port = fastrand::u16(low..high);
            if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                return Ok(listener.local_addr()?.port());
            }
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The range to choose from: up to [`SPAN`] ports below the ephemeral range, not below
/// [`LOWEST`] (empty if the ephemeral range starts too low or cannot be read).
fn below_ephemeral() -> (u16, u16) {
    let first = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    (first.saturating_sub(SPAN).max(LOWEST), first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_is_below_the_ephemeral_range() {
        let (low, high) = below_ephemeral();
        assert!(low < high, "room below the ephemeral range on this machine");
        for _ in 0..20 {
            let port = free_port().expect("a port");
            assert!((low..high).contains(&port), "{port} not in {low}..{high}");
        }
    }
}
