//! What a simulation did: the live [`Counters`] its vehicles bump, and the [`SimReport`]
//! read from them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What a simulation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimReport {
    /// Vehicles simulated.
    pub vehicles: u32,
    /// Vehicles connected to the broker at the time of the report.
    pub connected: u64,
    /// Heartbeats written to the broker connection.
    pub heartbeats_sent: u64,
    /// Heartbeats lost: pushed out of a full offline backlog, or not queued because the
    /// connection was backed up.
    pub heartbeats_dropped: u64,
    /// Delivery event publishes written to the broker connection (re-sends included).
    pub events_sent: u64,
    /// Delivery events acknowledged by the broker (each counted once).
    pub events_acked: u64,
    /// Malformed payloads published on purpose
    /// ([`Chaos::garbage_rate`](super::Chaos::garbage_rate)).
    pub garbage_sent: u64,
    /// Connections dropped on purpose ([`Chaos::drop_rate`](super::Chaos::drop_rate)).
    pub chaos_drops: u64,
    /// Commands answered with an ack.
    pub commands_answered: u64,
    /// Payloads on a `cmd` topic that did not decode as a command.
    pub bad_commands: u64,
    /// Successful reconnections after a lost connection.
    pub reconnects: u64,
    /// Connection failures, failed publishes and refused subscriptions.
    pub errors: u64,
    /// Connections ended because the broker sent a packet larger than a vehicle accepts
    /// ([`crate::session::SessionOptions::max_packet`]); also counted in `errors`.
    pub oversized_packets: u64,
    /// Time since the simulation started.
    pub elapsed: Duration,
}

/// Defines [`Counters`], one [`AtomicU64`] for each `field` of [`SimReport`] it names, and
/// `Counters::read`, which fills those fields of a report.
macro_rules! counters {
    ($($field:ident),* $(,)?) => {
        /// Live counters shared by the vehicle tasks, each one the [`SimReport`] field of its
        /// name.
        #[derive(Debug, Default)]
        pub(super) struct Counters {
            $(pub(super) $field: AtomicU64,)*
        }

        impl Counters {
            /// `report` with each counted field set to its count now.
            fn read(&self, report: SimReport) -> SimReport {
                SimReport {
                    $($field: self.$field.load(Ordering::Relaxed),)*
                    ..report
                }
            }
        }
    };
}

counters! {
    connected, heartbeats_sent, heartbeats_dropped, events_sent, events_acked, garbage_sent,
    chaos_drops, commands_answered, bad_commands, reconnects, errors, oversized_packets,
}

impl Counters {
    /// Adds one to `counter`.
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now, for `vehicles` vehicles started at `started`.
    pub(super) fn report(&self, vehicles: u32, started: Instant) -> SimReport {
        self.read(SimReport {
            vehicles,
            elapsed: started.elapsed(),
            ..SimReport::default()
        })
    }
}
