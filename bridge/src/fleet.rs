//! The bridge's own picture of the fleet: last position, liveness and last-seen per vehicle.
//!
//! This cache answers snapshots on join and the HTTP API, detects stale vehicles, and collects
//! the positions to send at the next tick. It does not rely on retained MQTT messages.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::value::RawValue;
use shared::{CodecError, FleetId, Heartbeat, ReplayGuard, Status, Topic, VehicleId};

use crate::room::RoomName;
use crate::view::PositionView;

/// How alive a vehicle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Connected and sending heartbeats.
    Online,
    /// No heartbeat for longer than the stale threshold, but no offline status either.
    Stale,
    /// Offline: its last will fired or it said goodbye.
    Offline,
}

/// When a vehicle counts as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleRule {
    /// After this many of its own heartbeat intervals without a heartbeat (default 3).
    MissedIntervals(u32),
    /// After a fixed time without a heartbeat.
    After(Duration),
}

impl Default for StaleRule {
    fn default() -> Self {
        Self::MissedIntervals(3)
    }
}

/// A `status` event: a vehicle's liveness changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusChange {
    /// Vehicle id.
    pub vehicle: VehicleId,
    /// Its fleet.
    pub fleet: FleetId,
    /// The new liveness.
    pub status: Liveness,
    /// Why it went offline or stale.
    pub reason: Option<&'static str>,
    /// When the bridge last heard from it, ms since the Unix epoch.
    pub last_seen_ms: u64,
}

/// One vehicle's state as clients see it (`snapshot`, HTTP API).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VehicleState {
    /// Vehicle id.
    pub vehicle: VehicleId,
    /// Its fleet.
    pub fleet: FleetId,
    /// Its liveness.
    pub status: Liveness,
    /// Why it is offline or stale, if it is.
    pub reason: Option<&'static str>,
    /// When the bridge last heard from it, ms since the Unix epoch.
    pub last_seen_ms: u64,
    /// Its last position, if it sent one.
    pub position: Option<PositionView>,
}

#[derive(Debug)]
struct Record {
    fleet: FleetId,
    position: Option<PositionView>,
    liveness: Liveness,
    reason: Option<&'static str>,
    last_seen_ms: u64,
    last_heartbeat: Option<Instant>,
    last_heard: Instant,
    interval: Duration,
    guard: ReplayGuard,
    dirty: bool,
}

/// A position waiting for the next tick, already serialized once.
#[derive(Debug)]
pub struct PendingPosition {
    /// Vehicle id.
    pub vehicle: VehicleId,
    /// Its fleet.
    pub fleet: FleetId,
    /// The `Position` JSON.
    pub json: Box<RawValue>,
}

/// Counts of vehicles per liveness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LivenessCounts {
    /// Online vehicles.
    pub online: u64,
    /// Stale vehicles.
    pub stale: u64,
    /// Offline vehicles.
    pub offline: u64,
}

/// Every vehicle the bridge has heard of.
#[derive(Debug, Default)]
pub struct Fleet {
    vehicles: HashMap<VehicleId, Record>,
    stale: StaleRule,
    /// Vehicles whose `dirty` flag is set, so a tick visits only what moved.
    dirty: Vec<VehicleId>,
    /// Status changes waiting for the next tick, oldest first.
    statuses: Vec<StatusChange>,
}

/// The wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Fleet {
    /// An empty fleet with the given stale rule.
    pub fn new(stale: StaleRule) -> Self {
        Self {
            vehicles: HashMap::new(),
            stale,
            dirty: Vec::new(),
            statuses: Vec::new(),
        }
    }

    fn record(&mut self, topic: &Topic, now: Instant) -> &mut Record {
        self.vehicles
            .entry(topic.vehicle.clone())
            .or_insert_with(|| Record {
                fleet: topic.fleet.clone(),
                position: None,
                liveness: Liveness::Offline,
                reason: None,
                last_seen_ms: 0,
                last_heartbeat: None,
                last_heard: now,
                interval: Duration::from_secs(1),
                guard: ReplayGuard::default(),
                dirty: false,
            })
    }

    /// Accepts `counter` from an authenticated payload on `topic`, or refuses a replay.
    ///
    /// # Errors
    /// [`CodecError::Replayed`] if the counter is not newer than the last one of its kind.
    pub fn check_fresh(&mut self, topic: &Topic, counter: u64) -> Result<(), CodecError> {
        let now = Instant::now();
        self.record(topic, now).guard.check(topic.kind, counter)
    }

    /// Records a heartbeat; returns the status change it causes, if any.
    pub fn heartbeat(&mut self, topic: &Topic, hb: &Heartbeat) -> Option<StatusChange> {
        let now = Instant::now();
        let wall = now_ms();
        let record = self.record(topic, now);
        if let Some(previous) = record.last_heartbeat {
            // A moving average of the gaps: a vehicle told to report faster turns stale sooner.
            let gap = now
                .saturating_duration_since(previous)
                .min(Duration::from_secs(3600));
            record.interval = (record.interval * 3 + gap) / 4;
        }
        record.last_heartbeat = Some(now);
        record.last_heard = now;
        record.last_seen_ms = wall;
        record.position = Some(PositionView::new(topic, hb));
        let newly_dirty = !std::mem::replace(&mut record.dirty, true);
        let change = Self::transition(topic, record, Liveness::Online, None);
        if newly_dirty {
            self.dirty.push(topic.vehicle.clone());
        }
        change
    }

    /// Records a status message; returns the status change it causes, if any.
    pub fn status(&mut self, topic: &Topic, status: &Status) -> Option<StatusChange> {
        let now = Instant::now();
        let record = self.record(topic, now);
        record.last_heard = now;
        match status {
            Status::Online => {
                record.last_seen_ms = now_ms();
                Self::transition(topic, record, Liveness::Online, None)
            }
            Status::Offline(reason) => {
                Self::transition(topic, record, Liveness::Offline, Some(reason.as_str()))
            }
        }
    }

    fn transition(
        topic: &Topic,
        record: &mut Record,
        to: Liveness,
        reason: Option<&'static str>,
    ) -> Option<StatusChange> {
        if record.liveness == to && record.reason == reason {
            return None;
        }
        record.liveness = to;
        record.reason = reason;
        Some(StatusChange {
            vehicle: topic.vehicle.clone(),
            fleet: topic.fleet.clone(),
            status: to,
            reason,
            last_seen_ms: record.last_seen_ms,
        })
    }

    fn stale_after(&self, record: &Record) -> Duration {
        match self.stale {
            StaleRule::After(d) => d,
            StaleRule::MissedIntervals(n) => record.interval * n,
        }
    }

    /// Marks online vehicles that missed their heartbeats as stale; returns the changes.
    pub fn sweep(&mut self, now: Instant) -> Vec<StatusChange> {
        let mut changes = Vec::new();
        let rule = self.stale;
        for (vehicle, record) in &mut self.vehicles {
            if record.liveness != Liveness::Online {
                continue;
            }
            let threshold = match rule {
                StaleRule::After(d) => d,
                StaleRule::MissedIntervals(n) => record.interval * n,
            };
            let quiet =
                now.saturating_duration_since(record.last_heartbeat.unwrap_or(record.last_heard));
            if quiet > threshold {
                record.liveness = Liveness::Stale;
                record.reason = Some("missed-heartbeats");
                changes.push(StatusChange {
                    vehicle: vehicle.clone(),
                    fleet: record.fleet.clone(),
                    status: Liveness::Stale,
                    reason: record.reason,
                    last_seen_ms: record.last_seen_ms,
                });
            }
        }
        changes
    }

    /// Queues status changes for the next tick ([`Fleet::take_statuses`]).
    pub fn queue_statuses(&mut self, changes: impl IntoIterator<Item = StatusChange>) {
        self.statuses.extend(changes);
    }

    /// Takes the queued status changes, oldest first.
    pub fn take_statuses(&mut self) -> Vec<StatusChange> {
        std::mem::take(&mut self.statuses)
    }

    /// Takes the positions that changed since the last call, serialized once each. Visits only
    /// the vehicles that moved, not the whole fleet.
    pub fn take_dirty(&mut self) -> Vec<PendingPosition> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::with_capacity(dirty.len());
        for vehicle in dirty {
            let Some(record) = self.vehicles.get_mut(&vehicle) else {
                continue;
            };
            if !std::mem::take(&mut record.dirty) {
                continue;
            }
            let Some(position) = &record.position else {
                continue;
            };
            match serde_json::value::to_raw_value(position) {
                Ok(json) => out.push(PendingPosition {
                    fleet: record.fleet.clone(),
                    vehicle,
                    json,
                }),
                Err(err) => tracing::error!(%vehicle, cause = %err, "cannot serialize a position"),
            }
        }
        out
    }

    /// The fleet of a known vehicle.
    pub fn fleet_of(&self, vehicle: &VehicleId) -> Option<&FleetId> {
        self.vehicles.get(vehicle).map(|r| &r.fleet)
    }

    fn state(vehicle: &VehicleId, r: &Record) -> VehicleState {
        VehicleState {
            vehicle: vehicle.clone(),
            fleet: r.fleet.clone(),
            status: r.liveness,
            reason: r.reason,
            last_seen_ms: r.last_seen_ms,
            position: r.position.clone(),
        }
    }

    /// The state of one vehicle.
    pub fn vehicle(&self, vehicle: &VehicleId) -> Option<VehicleState> {
        self.vehicles.get(vehicle).map(|r| Self::state(vehicle, r))
    }

    /// The state of every vehicle `room` covers, sorted by vehicle id.
    pub fn snapshot(&self, room: &RoomName) -> Vec<VehicleState> {
        let mut states: Vec<VehicleState> = self
            .vehicles
            .iter()
            .filter(|(vehicle, r)| covers(room, &r.fleet, vehicle))
            .map(|(vehicle, r)| Self::state(vehicle, r))
            .collect();
        states.sort_by(|a, b| a.vehicle.cmp(&b.vehicle));
        states
    }

    /// How many vehicles are online, stale and offline.
    pub fn counts(&self) -> LivenessCounts {
        let mut counts = LivenessCounts::default();
        for r in self.vehicles.values() {
            match r.liveness {
                Liveness::Online => counts.online += 1,
                Liveness::Stale => counts.stale += 1,
                Liveness::Offline => counts.offline += 1,
            }
        }
        counts
    }

    /// The stale threshold currently applied to `vehicle`.
    pub fn stale_threshold(&self, vehicle: &VehicleId) -> Option<Duration> {
        self.vehicles.get(vehicle).map(|r| self.stale_after(r))
    }
}

/// Whether `room` covers vehicle `vehicle` of fleet `fleet`.
pub fn covers(room: &RoomName, fleet: &FleetId, vehicle: &VehicleId) -> bool {
    match room {
        RoomName::All => true,
        RoomName::Fleet(f) => f == fleet,
        RoomName::Vehicle(v) => v == vehicle,
    }
}

#[cfg(test)]
mod tests {
    use shared::{OfflineReason, TopicKind};

    use super::*;

    fn topic(vehicle: &str) -> Topic {
        Topic::parse(&format!("fleet/north/{vehicle}/hb")).expect("valid")
    }

    #[test]
    fn liveness_transitions() {
        let mut fleet = Fleet::new(StaleRule::After(Duration::from_millis(50)));
        let t = topic("v1");
        let change = fleet
            .heartbeat(&t, &Heartbeat::default())
            .expect("goes online");
        assert_eq!(change.status, Liveness::Online);
        assert!(
            fleet.heartbeat(&t, &Heartbeat::default()).is_none(),
            "no change"
        );
        let later = Instant::now() + Duration::from_millis(60);
        let stale = fleet.sweep(later);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].status, Liveness::Stale);
        assert!(fleet.sweep(later).is_empty(), "reported once");
        let off = fleet
            .status(
                &t.with_kind(TopicKind::Status),
                &Status::Offline(OfflineReason::ConnectionLost),
            )
            .expect("goes offline");
        assert_eq!(
            (off.status, off.reason),
            (Liveness::Offline, Some("connection-lost"))
        );
        assert_eq!(
            fleet.counts(),
            LivenessCounts {
                online: 0,
                stale: 0,
                offline: 1
            }
        );
    }

    #[test]
    fn dirty_positions_are_taken_once_and_rooms_filter_snapshots() {
        let mut fleet = Fleet::default();
        fleet.heartbeat(&topic("v1"), &Heartbeat::default());
        fleet.heartbeat(&topic("v2"), &Heartbeat::default());
        fleet.heartbeat(
            &topic("v1"),
            &Heartbeat {
                seq: 2,
                ..Heartbeat::default()
            },
        );
        let dirty = fleet.take_dirty();
        assert_eq!(dirty.len(), 2, "the latest position per vehicle");
        assert!(fleet.take_dirty().is_empty());
        let v1 = VehicleId::new("v1").expect("valid");
        let snap = fleet.snapshot(&RoomName::Vehicle(v1.clone()));
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].position.as_ref().map(|p| p.seq), Some(2));
        assert_eq!(
            fleet
                .snapshot(&RoomName::Fleet(FleetId::new("north").expect("valid")))
                .len(),
            2
        );
        assert!(
            fleet
                .snapshot(&RoomName::Fleet(FleetId::new("south").expect("valid")))
                .is_empty()
        );
    }

    #[test]
    fn status_changes_wait_for_the_tick_in_order() {
        let mut fleet = Fleet::default();
        let online = fleet.heartbeat(&topic("v1"), &Heartbeat::default());
        let change = online.expect("first heartbeat brings v1 online");
        fleet.queue_statuses([change]);
        let offline = fleet.status(
            &topic("v1"),
            &Status::Offline(OfflineReason::ConnectionLost),
        );
        fleet.queue_statuses(offline);
        let taken = fleet.take_statuses();
        let kinds: Vec<Liveness> = taken.iter().map(|c| c.status).collect();
        assert_eq!(kinds, [Liveness::Online, Liveness::Offline]);
        assert!(fleet.take_statuses().is_empty(), "taken once");
        // Only vehicles that moved are visited, and a vehicle that moved twice appears once.
        fleet.heartbeat(&topic("v2"), &Heartbeat::default());
        fleet.heartbeat(&topic("v2"), &Heartbeat::default());
        let dirty = fleet.take_dirty();
        assert_eq!(dirty.len(), 2, "v1 from before, v2 once");
        assert!(fleet.take_dirty().is_empty());
    }

    #[test]
    fn replays_are_refused_per_vehicle() {
        let mut fleet = Fleet::default();
        assert_eq!(fleet.check_fresh(&topic("v1"), 5), Ok(()));
        assert_eq!(
            fleet.check_fresh(&topic("v1"), 5),
            Err(CodecError::Replayed)
        );
        assert_eq!(
            fleet.check_fresh(&topic("v2"), 5),
            Ok(()),
            "another vehicle is unaffected"
        );
    }
}
