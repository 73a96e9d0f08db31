//! The bridge's own picture of the fleet: last heartbeat, liveness and last-seen per vehicle.
//!
//! This cache answers snapshots on join and the HTTP API, detects stale vehicles, refuses
//! replayed payloads, and collects what to send at the next tick: the vehicles that moved and
//! the liveness changes, in order. It keeps wire [`Heartbeat`]s; what clients see of them is
//! made in `view`. It does not rely on retained MQTT messages.
//!
//! With several bridges (issue #15), each bridge receives only part of the vehicles' messages.
//! [`Fleet::cluster_port`] connects the cache to `cluster`: at every tick the cache hands over
//! the latest state of the vehicles it heard from itself ([`SharedVehicle`]), and it merges the
//! states other bridges heard ([`ClusterPort::deliver`]) as if it had heard them, for the views
//! only: newer wins, and a merged state is never handed back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::{
    CodecError, FleetId, Heartbeat, OfflineReason, ReplayGuard, Status, Topic, VehicleId,
};
use tokio::sync::mpsc;

use crate::clock::now_ms;

/// How alive a vehicle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Connected and sending heartbeats.
    Online,
    /// No heartbeat for longer than the stale threshold, but no offline status either.
    Stale,
    /// Offline: its last will fired or it said goodbye.
    Offline,
}

impl Liveness {
    /// The liveness named by [`Liveness::as_str`].
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "online" => Some(Self::Online),
            "stale" => Some(Self::Stale),
            "offline" => Some(Self::Offline),
            _ => None,
        }
    }

    /// `online`, `stale` or `offline`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Stale => "stale",
            Self::Offline => "offline",
        }
    }
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

impl StaleRule {
    /// How long a vehicle that reports every `interval` may stay quiet before it is stale.
    fn threshold(self, interval: Duration) -> Duration {
        match self {
            Self::After(d) => d,
            Self::MissedIntervals(n) => interval * n,
        }
    }
}

/// A vehicle's liveness, as clients are told it: a `status` change, or part of its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VehicleStatus {
    /// Vehicle id.
    pub(crate) vehicle: VehicleId,
    /// Its fleet.
    pub(crate) fleet: FleetId,
    /// Its liveness.
    pub(crate) liveness: Liveness,
    /// Why it is (or went) offline or stale, if it is.
    pub(crate) reason: Option<&'static str>,
    /// When the bridge last heard from it, ms since the Unix epoch.
    pub(crate) last_seen_ms: u64,
}

/// One vehicle's state (`snapshot`, HTTP API): its liveness and its last heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VehicleState {
    /// Its liveness.
    pub(crate) status: VehicleStatus,
    /// Its last heartbeat, if it sent one.
    pub(crate) heartbeat: Option<Heartbeat>,
}

#[derive(Debug)]
struct Record {
    fleet: FleetId,
    heartbeat: Option<Heartbeat>,
    liveness: Liveness,
    reason: Option<&'static str>,
    last_seen_ms: u64,
    last_heartbeat: Option<Instant>,
    last_heard: Instant,
    interval: Duration,
    guard: ReplayGuard,
    dirty: bool,
    /// When the bridge that heard it last heard from the vehicle (a heartbeat or a status),
    /// ms since the Unix epoch: which of two liveness reports is newer, when their status
    /// counters do not tell (see [`SharedVehicle::status_counter`]).
    heard_ms: u64,
    /// The device's counter of the latest status message (online or offline) behind its
    /// liveness, heard here or merged; 0 before any.
    status_counter: u64,
    /// When it last went offline here (heard or merged): heartbeats heard within
    /// [`LATE_HEARTBEAT_WINDOW`] after a last will are taken for its lost connection's.
    offline_at: Instant,
    /// Heard from since the last hand-over to the cluster (and listed in `Fleet::shared`).
    shared_dirty: bool,
}

/// How long after a vehicle's last will a heartbeat may still be one of the lost connection's,
/// heard late (a shared subscription handed it to a bridge that lagged behind the one that heard
/// the will): such a heartbeat does not bring the vehicle back. The next connection's `Online`
/// ends the will at once; a device that reconnects without one comes back at its first
/// heartbeat heard after this window.
const LATE_HEARTBEAT_WINDOW: Duration = Duration::from_secs(5);

impl Record {
    /// A vehicle first seen (by this bridge or through the cluster) at `now`, of `fleet`:
    /// offline until its first report, nothing heard yet.
    fn new(fleet: FleetId, now: Instant) -> Self {
        Self {
            fleet,
            heartbeat: None,
            liveness: Liveness::Offline,
            reason: None,
            last_seen_ms: 0,
            last_heartbeat: None,
            last_heard: now,
            interval: Duration::from_secs(1),
            guard: ReplayGuard::default(),
            dirty: false,
            heard_ms: 0,
            status_counter: 0,
            offline_at: now,
            shared_dirty: false,
        }
    }

    /// Whether a heartbeat sealed with `counter`, heard at `now`, may have been sent before the
    /// status that took the vehicle offline, so it must not bring the vehicle back: a heartbeat
    /// heard within [`LATE_HEARTBEAT_WINDOW`] after a last will (the will is sealed at connect,
    /// older than the connection's heartbeats, so the counter cannot tell; the next
    /// connection's `Online` ends it at once), or one sealed before a `Shutdown` or
    /// `LowBattery`. Such a heartbeat arrives after the status when another bridge of a shared
    /// subscription heard the status, or through the cluster's news.
    fn went_offline_after(&self, counter: u64, now: Instant) -> bool {
        if self.liveness != Liveness::Offline {
            return false;
        }
        match self.reason {
            Some(reason) if reason == OfflineReason::ConnectionLost.as_str() => {
                now.saturating_duration_since(self.offline_at) < LATE_HEARTBEAT_WINDOW
            }
            Some(_) => counter < self.status_counter,
            None => false,
        }
    }

    /// The vehicle's liveness as clients are told it, reported under `fleet`.
    fn status(&self, vehicle: &VehicleId, fleet: &FleetId) -> VehicleStatus {
        VehicleStatus {
            vehicle: vehicle.clone(),
            fleet: fleet.clone(),
            liveness: self.liveness,
            reason: self.reason,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

/// What a vehicle reported that the fleet cache records.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Report<'a> {
    /// A heartbeat: where it is, and that it is online.
    Heartbeat(&'a Heartbeat),
    /// A status message: online, or offline and why.
    Status(&'a Status),
}

/// A vehicle that moved since the last tick, with its latest heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Moved {
    /// Vehicle id.
    pub(crate) vehicle: VehicleId,
    /// Its fleet.
    pub(crate) fleet: FleetId,
    /// Its latest heartbeat.
    pub(crate) heartbeat: Heartbeat,
}

/// What the next tick sends: the liveness changes, oldest first, and the vehicles that moved.
#[derive(Debug, Default)]
pub(crate) struct TickNews {
    /// Liveness changes since the last tick, oldest first.
    pub(crate) statuses: Vec<VehicleStatus>,
    /// Vehicles that moved since the last tick, each once.
    pub(crate) moved: Vec<Moved>,
}

/// Counts of vehicles per liveness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LivenessCounts {
    /// Online vehicles.
    pub(crate) online: u64,
    /// Stale vehicles.
    pub(crate) stale: u64,
    /// Offline vehicles.
    pub(crate) offline: u64,
}

/// Every vehicle the bridge has heard of.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    vehicles: HashMap<VehicleId, Record>,
    stale: StaleRule,
    /// Vehicles whose `dirty` flag is set, so a tick visits only what moved.
    dirty: Vec<VehicleId>,
    /// Status changes waiting for the next tick, oldest first.
    statuses: Vec<VehicleStatus>,
    /// The other bridges, when there are (see [`Fleet::cluster_port`]).
    cluster: Option<ClusterSide>,
}

impl Fleet {
    /// An empty fleet with the given stale rule.
    pub(crate) fn new(stale: StaleRule) -> Self {
        Self {
            vehicles: HashMap::new(),
            stale,
            dirty: Vec::new(),
            statuses: Vec::new(),
            cluster: None,
        }
    }

    fn entry(&mut self, topic: &Topic, now: Instant) -> &mut Record {
        self.vehicles
            .entry(topic.vehicle.clone())
            .or_insert_with(|| Record::new(topic.fleet.clone(), now))
    }

    /// Accepts `counter` from an authenticated payload on `topic`, or refuses a replay.
    ///
    /// # Errors
    /// [`CodecError::Replayed`] if the counter is not newer than the last one of its kind.
    pub(crate) fn check_fresh(&mut self, topic: &Topic, counter: u64) -> Result<(), CodecError> {
        let now = Instant::now();
        self.entry(topic, now).guard.check(topic.kind, counter)
    }

    /// Records what a vehicle reported, sealed with `counter`, if the counter is fresh, and
    /// queues the liveness change it causes for the next tick.
    ///
    /// # Errors
    /// [`CodecError::Replayed`] if the counter is not fresh: nothing is recorded.
    pub(crate) fn record(
        &mut self,
        topic: &Topic,
        counter: u64,
        report: Report<'_>,
    ) -> Result<(), CodecError> {
        self.check_fresh(topic, counter)?;
        let change = match report {
            Report::Heartbeat(hb) => self.heartbeat(topic, hb, counter),
            Report::Status(status) => self.status(topic, status, counter),
        };
        self.queue_statuses(change);
        self.heard_here(&topic.vehicle);
        Ok(())
    }

    /// Notes that this bridge heard from `vehicle` itself: its state goes to the other bridges
    /// at the next tick.
    fn heard_here(&mut self, vehicle: &VehicleId) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if let Some(record) = self.vehicles.get_mut(vehicle)
            && !std::mem::replace(&mut record.shared_dirty, true)
        {
            cluster.heard.push(vehicle.clone());
        }
    }

    /// Records a heartbeat sealed with `counter`; returns the status change it causes, if any
    /// (none for a heartbeat sent before the vehicle went offline: [`Record::went_offline_after`]).
    fn heartbeat(&mut self, topic: &Topic, hb: &Heartbeat, counter: u64) -> Option<VehicleStatus> {
        let now = Instant::now();
        let wall = now_ms();
        let record = self.entry(topic, now);
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
        record.heard_ms = wall;
        record.heartbeat = Some(*hb);
        let newly_dirty = !std::mem::replace(&mut record.dirty, true);
        let change = if record.went_offline_after(counter, now) {
            None
        } else {
            Self::transition(topic, record, Liveness::Online, None)
        };
        if newly_dirty {
            self.dirty.push(topic.vehicle.clone());
        }
        change
    }

    /// Records a status message sealed with `counter`; returns the status change it causes,
    /// if any.
    fn status(&mut self, topic: &Topic, status: &Status, counter: u64) -> Option<VehicleStatus> {
        let now = Instant::now();
        let record = self.entry(topic, now);
        record.last_heard = now;
        record.heard_ms = now_ms();
        if counter < record.status_counter {
            // Older than a status another bridge heard (merged): that one stands.
            return None;
        }
        record.status_counter = counter;
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
    ) -> Option<VehicleStatus> {
        if record.liveness == to && record.reason == reason {
            return None;
        }
        if to == Liveness::Offline {
            record.offline_at = Instant::now();
        }
        record.liveness = to;
        record.reason = reason;
        Some(record.status(&topic.vehicle, &topic.fleet))
    }

    /// Marks online vehicles that missed their heartbeats as stale; returns the changes.
    pub(crate) fn sweep(&mut self, now: Instant) -> Vec<VehicleStatus> {
        self.merge_shared();
        let mut changes = Vec::new();
        let rule = self.stale;
        for (vehicle, record) in &mut self.vehicles {
            if record.liveness != Liveness::Online {
                continue;
            }
            let quiet =
                now.saturating_duration_since(record.last_heartbeat.unwrap_or(record.last_heard));
            if quiet > rule.threshold(record.interval) {
                record.liveness = Liveness::Stale;
                record.reason = Some(MISSED_HEARTBEATS);
                changes.push(record.status(vehicle, &record.fleet));
            }
        }
        changes
    }

    /// Queues status changes for the next tick ([`Fleet::take_statuses`]).
    pub(crate) fn queue_statuses(&mut self, changes: impl IntoIterator<Item = VehicleStatus>) {
        self.statuses.extend(changes);
    }

    /// Whether a vehicle moved or a status change is queued since the last take: what the
    /// next flush would send (the other bridges' news aside).
    pub(crate) fn has_news(&self) -> bool {
        !self.dirty.is_empty() || !self.statuses.is_empty()
    }

    /// Takes the queued status changes, oldest first.
    #[cfg(test)]
    pub(crate) fn take_statuses(&mut self) -> Vec<VehicleStatus> {
        let mut out = Vec::new();
        self.take_statuses_into(&mut out);
        out
    }

    /// Takes the queued status changes, oldest first, into `out` (emptied first). The two
    /// lists trade places, so each keeps its room for the next tick: a tick allocates neither.
    pub(crate) fn take_statuses_into(&mut self, out: &mut Vec<VehicleStatus>) {
        self.merge_shared();
        out.clear();
        std::mem::swap(out, &mut self.statuses);
    }

    /// Takes the vehicles that moved since the last call, each once with its latest
    /// heartbeat.
    #[cfg(test)]
    pub(crate) fn take_moved(&mut self) -> Vec<Moved> {
        let mut out = Vec::new();
        self.take_moved_into(&mut out);
        out
    }

    /// Takes the vehicles that moved since the last call, each once with its latest
    /// heartbeat, into `out` (emptied first; the caller keeps it from tick to tick, so that a
    /// tick does not allocate it). Visits only the vehicles that moved, not the whole fleet.
    pub(crate) fn take_moved_into(&mut self, out: &mut Vec<Moved>) {
        let mut dirty = std::mem::take(&mut self.dirty);
        out.clear();
        out.reserve(dirty.len());
        for vehicle in dirty.drain(..) {
            let Some(record) = self.vehicles.get_mut(&vehicle) else {
                continue;
            };
            if !std::mem::take(&mut record.dirty) {
                continue;
            }
            if let Some(heartbeat) = record.heartbeat {
                out.push(Moved {
                    fleet: record.fleet.clone(),
                    vehicle,
                    heartbeat,
                });
            }
        }
        // Emptied, it keeps its room: a tick's first heartbeat does not allocate it again.
        self.dirty = dirty;
        self.hand_over();
    }

    /// The fleet of a known vehicle.
    pub(crate) fn fleet_of(&mut self, vehicle: &VehicleId) -> Option<&FleetId> {
        self.merge_shared();
        self.vehicles.get(vehicle).map(|r| &r.fleet)
    }

    fn state(vehicle: &VehicleId, r: &Record) -> VehicleState {
        VehicleState {
            status: r.status(vehicle, &r.fleet),
            heartbeat: r.heartbeat,
        }
    }

    /// The state of one vehicle.
    pub(crate) fn vehicle(&mut self, vehicle: &VehicleId) -> Option<VehicleState> {
        self.merge_shared();
        self.vehicles.get(vehicle).map(|r| Self::state(vehicle, r))
    }

    /// The state of every vehicle for which `wanted(fleet, vehicle)` holds, sorted by
    /// vehicle id.
    pub(crate) fn snapshot(
        &mut self,
        wanted: impl Fn(&FleetId, &VehicleId) -> bool,
    ) -> Vec<VehicleState> {
        self.merge_shared();
        let mut states: Vec<VehicleState> = self
            .vehicles
            .iter()
            .filter(|(vehicle, r)| wanted(&r.fleet, vehicle))
            .map(|(vehicle, r)| Self::state(vehicle, r))
            .collect();
        states.sort_by(|a, b| a.status.vehicle.cmp(&b.status.vehicle));
        states
    }

    /// How many vehicles are online, stale and offline.
    pub(crate) fn counts(&mut self) -> LivenessCounts {
        self.merge_shared();
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
}

// ---- the other bridges (issue #15) -----------------------------------------------------------

/// How many ticks of hand-overs may wait for `cluster` before new ones are dropped.
const HAND_OVER_BACKLOG: usize = 256;

/// A vehicle's latest state as the bridge that heard it knows it: what bridges share.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SharedVehicle {
    /// Vehicle id.
    pub(crate) vehicle: VehicleId,
    /// Its fleet.
    pub(crate) fleet: FleetId,
    /// Its last heartbeat, if it sent one.
    pub(crate) heartbeat: Option<Heartbeat>,
    /// Its liveness.
    pub(crate) liveness: Liveness,
    /// Why it is offline or stale, if it is.
    pub(crate) reason: Option<&'static str>,
    /// When a bridge last had a heartbeat (or an online status) from it, ms since the epoch.
    pub(crate) last_seen_ms: u64,
    /// When a bridge last heard from it at all, ms since the epoch: of two liveness reports
    /// behind the same status (or from a bridge that does not say which), the newer wins.
    pub(crate) heard_ms: u64,
    /// The device's counter of the latest status message behind its liveness (`Some(0)`: the
    /// bridge knows of none; `None`: a bridge of an earlier version, which does not say). Of
    /// two liveness reports behind different statuses, the one behind the later status wins,
    /// whenever each bridge heard its messages: the device's counters order its statuses (a
    /// last will beats its connection's `Online`, the next `Online` beats the will), where two
    /// bridges' clocks of hearing them do not.
    pub(crate) status_counter: Option<u64>,
    /// How often it reports (the moving average of its heartbeat gaps), for the stale rule.
    pub(crate) interval: Duration,
}

/// The reason strings a [`SharedVehicle`] may carry, as the `&'static str` the cache keeps.
pub(crate) fn known_reason(reason: &str) -> Option<&'static str> {
    [
        OfflineReason::Shutdown.as_str(),
        OfflineReason::ConnectionLost.as_str(),
        OfflineReason::LowBattery.as_str(),
        MISSED_HEARTBEATS,
    ]
    .into_iter()
    .find(|known| *known == reason)
}

/// Why a vehicle is stale.
const MISSED_HEARTBEATS: &str = "missed-heartbeats";

/// The fleet's side of its link to the other bridges.
#[derive(Debug)]
struct ClusterSide {
    /// States other bridges heard, waiting to be merged.
    inbox: Arc<Mutex<Vec<SharedVehicle>>>,
    /// Where each tick's own states go.
    outbox: mpsc::Sender<Vec<SharedVehicle>>,
    /// Vehicles heard here since the last hand-over, each once.
    heard: Vec<VehicleId>,
}

/// The cluster's side of the link ([`Fleet::cluster_port`]): takes the states this bridge
/// heard, one batch per tick, and delivers the states other bridges heard.
#[derive(Debug)]
pub(crate) struct ClusterPort {
    inbox: Arc<Mutex<Vec<SharedVehicle>>>,
    outbox: mpsc::Receiver<Vec<SharedVehicle>>,
}

impl ClusterPort {
    /// Hands states heard by other bridges to the fleet; merged at its next use, newer wins.
    pub(crate) fn deliver(&self, states: impl IntoIterator<Item = SharedVehicle>) {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(states);
    }

    /// The next tick's batch of states this bridge heard itself; `None` once the fleet is gone.
    pub(crate) async fn next_batch(&mut self) -> Option<Vec<SharedVehicle>> {
        self.outbox.recv().await
    }

    /// A batch already waiting, if any (to flush at shutdown).
    pub(crate) fn try_next_batch(&mut self) -> Option<Vec<SharedVehicle>> {
        self.outbox.try_recv().ok()
    }
}

/// A wall-clock time (ms since the epoch) as an [`Instant`], not after now.
fn instant_of(ms: u64) -> Instant {
    let now = Instant::now();
    let ago = Duration::from_millis(now_ms().saturating_sub(ms));
    now.checked_sub(ago).unwrap_or(now)
}

impl Fleet {
    /// Links the cache to the other bridges: from now on each tick ([`Fleet::take_moved`])
    /// hands the states of the vehicles heard here to the returned port, and what the port
    /// delivers is merged. Called once, before the fleet is shared; a second call replaces the
    /// first link.
    pub(crate) fn cluster_port(&mut self) -> ClusterPort {
        let inbox = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel(HAND_OVER_BACKLOG);
        self.cluster = Some(ClusterSide {
            inbox: Arc::clone(&inbox),
            outbox: tx,
            heard: Vec::new(),
        });
        ClusterPort { inbox, outbox: rx }
    }

    /// Sends the states of the vehicles heard here since the last tick to the cluster.
    fn hand_over(&mut self) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if cluster.heard.is_empty() {
            return;
        }
        let heard = std::mem::take(&mut cluster.heard);
        let mut batch = Vec::with_capacity(heard.len());
        for vehicle in heard {
            let Some(record) = self.vehicles.get_mut(&vehicle) else {
                continue;
            };
            record.shared_dirty = false;
            batch.push(SharedVehicle {
                fleet: record.fleet.clone(),
                heartbeat: record.heartbeat,
                liveness: record.liveness,
                reason: record.reason,
                last_seen_ms: record.last_seen_ms,
                heard_ms: record.heard_ms,
                status_counter: Some(record.status_counter),
                interval: record.interval,
                vehicle,
            });
        }
        if let Err(err) = cluster.outbox.try_send(batch) {
            // The cluster task is far behind or gone; the next states of these vehicles follow.
            tracing::debug!(cause = %err, "cluster hand-over dropped");
        }
    }

    /// Merges the states other bridges delivered since the last call.
    fn merge_shared(&mut self) {
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        let delivered = std::mem::take(
            &mut *cluster
                .inbox
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for state in delivered {
            self.merge(state);
        }
    }

    /// Merges one state another bridge heard, for the views only (positions, liveness,
    /// snapshots): its heartbeat if newer than ours (device time, then sequence number), its
    /// liveness if newer than ours: behind a later status (by the device's counter: a last will
    /// beats a late heartbeat of its own connection heard here), or behind the same status (or
    /// from a bridge that does not say) if it heard the vehicle after we last did. Nothing
    /// else (replay guard, the hand-over to the cluster) changes.
    fn merge(&mut self, state: SharedVehicle) {
        let now = Instant::now();
        let record = self
            .vehicles
            .entry(state.vehicle.clone())
            .or_insert_with(|| Record::new(state.fleet.clone(), now));
        if let Some(hb) = state.heartbeat {
            let newer = record
                .heartbeat
                .is_none_or(|ours| (hb.ts_ms, hb.seq) > (ours.ts_ms, ours.seq));
            if newer {
                record.heartbeat = Some(hb);
                if state.last_seen_ms > record.last_seen_ms {
                    record.last_seen_ms = state.last_seen_ms;
                    record.last_heartbeat = Some(instant_of(state.last_seen_ms));
                }
                record.interval = state.interval;
                if !std::mem::replace(&mut record.dirty, true) {
                    self.dirty.push(state.vehicle.clone());
                }
            }
        }
        let newer = match state.status_counter {
            Some(theirs) if theirs != record.status_counter => theirs > record.status_counter,
            _ => state.heard_ms > record.heard_ms,
        };
        if !newer {
            return;
        }
        if let Some(theirs) = state.status_counter {
            record.status_counter = record.status_counter.max(theirs);
        }
        record.heard_ms = record.heard_ms.max(state.heard_ms);
        record.last_heard = instant_of(record.heard_ms);
        record.last_seen_ms = record.last_seen_ms.max(state.last_seen_ms);
        let (to, reason) = (state.liveness, state.reason);
        if record.liveness != to || record.reason != reason {
            if to == Liveness::Offline {
                record.offline_at = now;
            }
            record.liveness = to;
            record.reason = reason;
            let change = record.status(&state.vehicle, &record.fleet);
            self.statuses.push(change);
        }
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
            .heartbeat(&t, &Heartbeat::default(), 101)
            .expect("goes online");
        assert_eq!(change.liveness, Liveness::Online);
        assert!(
            fleet.heartbeat(&t, &Heartbeat::default(), 102).is_none(),
            "no change"
        );
        let later = Instant::now() + Duration::from_millis(60);
        let stale = fleet.sweep(later);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].liveness, Liveness::Stale);
        assert!(fleet.sweep(later).is_empty(), "reported once");
        let off = fleet
            .status(
                &t.with_kind(TopicKind::Status),
                &Status::Offline(OfflineReason::ConnectionLost),
                103,
            )
            .expect("goes offline");
        assert_eq!(
            (off.liveness, off.reason),
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
    fn moved_vehicles_are_taken_once_and_snapshots_filter() {
        let mut fleet = Fleet::default();
        fleet.heartbeat(&topic("v1"), &Heartbeat::default(), 104);
        fleet.heartbeat(&topic("v2"), &Heartbeat::default(), 105);
        fleet.heartbeat(
            &topic("v1"),
            &Heartbeat {
                seq: 2,
                ..Heartbeat::default()
            },
            106,
        );
        let moved = fleet.take_moved();
        assert_eq!(moved.len(), 2, "the latest position per vehicle");
        assert!(fleet.take_moved().is_empty());
        let v1 = VehicleId::new("v1").expect("valid");
        let snap = fleet.snapshot(|_, vehicle| *vehicle == v1);
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].heartbeat.map(|hb| hb.seq), Some(2));
        let north = FleetId::new("north").expect("valid");
        assert_eq!(fleet.snapshot(|fleet, _| *fleet == north).len(), 2);
        let south = FleetId::new("south").expect("valid");
        assert!(fleet.snapshot(|fleet, _| *fleet == south).is_empty());
    }

    #[test]
    fn status_changes_wait_for_the_tick_in_order() {
        let mut fleet = Fleet::default();
        let online = fleet.heartbeat(&topic("v1"), &Heartbeat::default(), 107);
        let change = online.expect("first heartbeat brings v1 online");
        fleet.queue_statuses([change]);
        let offline = fleet.status(
            &topic("v1"),
            &Status::Offline(OfflineReason::ConnectionLost),
            108,
        );
        fleet.queue_statuses(offline);
        let taken = fleet.take_statuses();
        let kinds: Vec<Liveness> = taken.iter().map(|c| c.liveness).collect();
        assert_eq!(kinds, [Liveness::Online, Liveness::Offline]);
        assert!(fleet.take_statuses().is_empty(), "taken once");
        // Only vehicles that moved are visited, and a vehicle that moved twice appears once.
        fleet.heartbeat(&topic("v2"), &Heartbeat::default(), 109);
        fleet.heartbeat(&topic("v2"), &Heartbeat::default(), 110);
        let moved = fleet.take_moved();
        assert_eq!(moved.len(), 2, "v1 from before, v2 once");
        assert!(fleet.take_moved().is_empty());
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

    fn shared(vehicle: &str, seq: u32, ts_ms: u64, liveness: Liveness) -> SharedVehicle {
        let now = now_ms();
        SharedVehicle {
            vehicle: VehicleId::new(vehicle).expect("valid"),
            fleet: FleetId::new("north").expect("valid"),
            heartbeat: Some(Heartbeat {
                seq,
                ts_ms,
                ..Heartbeat::default()
            }),
            liveness,
            reason: None,
            last_seen_ms: now,
            heard_ms: now,
            status_counter: Some(0),
            interval: Duration::from_millis(100),
        }
    }

    /// States heard by other bridges: merged for the views, newer wins, never handed back.
    #[test]
    fn shared_states_merge_newer_wins_and_are_not_handed_back() {
        let mut fleet = Fleet::default();
        let mut port = fleet.cluster_port();
        let v1 = VehicleId::new("v1").expect("valid");
        port.deliver([shared("v1", 5, 2_000, Liveness::Online)]);
        assert_eq!(
            fleet
                .vehicle(&v1)
                .and_then(|v| v.heartbeat)
                .map(|hb| hb.seq),
            Some(5)
        );
        assert_eq!(
            fleet.take_statuses().len(),
            1,
            "its sockets learn it is online"
        );
        assert_eq!(fleet.take_moved().len(), 1, "and where it is");
        assert!(
            port.try_next_batch().is_none(),
            "a merged state is not handed back"
        );
        // Older: ignored; the liveness of an older report too.
        let mut old = shared("v1", 4, 1_900, Liveness::Offline);
        old.heard_ms -= 10_000;
        port.deliver([old]);
        let state = fleet.vehicle(&v1).expect("known");
        assert_eq!(state.heartbeat.map(|hb| hb.seq), Some(5));
        assert_eq!(state.status.liveness, Liveness::Online);
        assert!(fleet.take_moved().is_empty());
        // A heartbeat heard here is handed over once, at the tick, with the full state.
        fleet.heartbeat(
            &topic("v1"),
            &Heartbeat {
                seq: 6,
                ts_ms: 2_100,
                ..Heartbeat::default()
            },
            111,
        );
        fleet.heard_here(&v1);
        fleet.heartbeat(&topic("v2"), &Heartbeat::default(), 112);
        fleet.heard_here(&VehicleId::new("v2").expect("valid"));
        fleet.take_statuses();
        fleet.take_moved();
        let batch = port.try_next_batch().expect("one batch per tick");
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].heartbeat.map(|hb| hb.seq), Some(6));
        assert_eq!(batch[0].liveness, Liveness::Online);
        assert!(port.try_next_batch().is_none(), "one batch per tick");
        fleet.take_moved();
        assert!(
            port.try_next_batch().is_none(),
            "nothing new, nothing handed over"
        );
    }

    /// A fleet with its port to the other bridges, vehicle `v1`'s heartbeat topic and a
    /// heartbeat to report on it.
    fn clustered_v1() -> (Fleet, ClusterPort, Topic, Heartbeat) {
        let mut fleet = Fleet::default();
        let port = fleet.cluster_port();
        (fleet, port, topic("v1"), Heartbeat::default())
    }

    /// Records what a vehicle reported, sealed with `counter`, which must be fresh.
    fn hear(fleet: &mut Fleet, topic: &Topic, counter: u64, report: Report<'_>) {
        fleet.record(topic, counter, report).expect("fresh");
    }

    /// The liveness of `vehicle` in `fleet`.
    fn liveness_of(fleet: &mut Fleet, vehicle: &str) -> Option<Liveness> {
        let vehicle = VehicleId::new(vehicle).expect("valid");
        fleet.vehicle(&vehicle).map(|v| v.status.liveness)
    }

    /// A heartbeat sent before the vehicle went offline does not bring it back: after a last
    /// will, none heard within the window does, the next connection's `Online` does; after a
    /// `Shutdown`, a heartbeat sealed after it does too.
    #[test]
    fn a_heartbeat_sent_before_going_offline_does_not_bring_the_vehicle_back() {
        let mut fleet = Fleet::default();
        let hb_topic = topic("v1");
        let status_topic = hb_topic.with_kind(TopicKind::Status);
        let hb = Heartbeat::default();
        let lost = Status::Offline(OfflineReason::ConnectionLost);
        // A connection: its `Online` (10), its last will sealed at connect (11), a heartbeat.
        hear(
            &mut fleet,
            &status_topic,
            10,
            Report::Status(&Status::Online),
        );
        hear(&mut fleet, &hb_topic, 12, Report::Heartbeat(&hb));
        hear(&mut fleet, &status_topic, 11, Report::Status(&lost));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        fleet.take_statuses();
        // A heartbeat of that connection heard after the will: still offline, nothing sent.
        hear(&mut fleet, &hb_topic, 13, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        assert!(fleet.take_statuses().is_empty());
        // The next connection's `Online` brings it back.
        hear(
            &mut fleet,
            &status_topic,
            20,
            Report::Status(&Status::Online),
        );
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Online));
        // A shutdown, then a heartbeat sealed before it: offline; one sealed after it: online.
        let shutdown = Status::Offline(OfflineReason::Shutdown);
        hear(&mut fleet, &status_topic, 30, Report::Status(&shutdown));
        hear(&mut fleet, &hb_topic, 29, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        hear(&mut fleet, &hb_topic, 31, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Online));
    }

    /// A device that breaks the protocol and reconnects without `Online`: its heartbeats heard
    /// within the window after its last will (here or merged) are taken for the lost
    /// connection's; the first one heard after the window brings it back.
    #[test]
    fn a_heartbeat_heard_long_after_a_last_will_brings_the_vehicle_back() {
        let (mut fleet, port, hb_topic, hb) = clustered_v1();
        let lost = Status::Offline(OfflineReason::ConnectionLost);
        let window_ago = |fleet: &mut Fleet| {
            let record = fleet.vehicles.values_mut().next().expect("heard");
            record.offline_at = Instant::now()
                .checked_sub(LATE_HEARTBEAT_WINDOW)
                .expect("the clock started long ago");
        };
        hear(&mut fleet, &hb_topic, 12, Report::Heartbeat(&hb));
        hear(
            &mut fleet,
            &hb_topic.with_kind(TopicKind::Status),
            11,
            Report::Status(&lost),
        );
        hear(&mut fleet, &hb_topic, 13, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        window_ago(&mut fleet);
        hear(&mut fleet, &hb_topic, 30, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Online));
        // A later will, heard by another bridge: the window starts when it is merged here.
        let mut will = shared("v1", 1, 1_000, Liveness::Offline);
        will.reason = Some("connection-lost");
        will.status_counter = Some(40);
        port.deliver([will]);
        hear(&mut fleet, &hb_topic, 41, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        window_ago(&mut fleet);
        hear(&mut fleet, &hb_topic, 50, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Online));
    }

    /// Two bridges of a shared subscription: the other one heard a vehicle's last will, this
    /// one heartbeats of the same connection, one of them later by its clock. The will wins
    /// here by its status counter, in either order; an older status heard here late does not
    /// undo it; the next connection's `Online` wins over the will.
    #[test]
    fn a_last_will_heard_by_another_bridge_beats_a_later_heartbeat_here() {
        let (mut fleet, port, hb_topic, hb) = clustered_v1();
        hear(&mut fleet, &hb_topic, 12, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Online));
        // The will (11), heard by the other bridge a second before our heartbeat.
        let mut will = shared("v1", 1, 1_000, Liveness::Offline);
        will.reason = Some("connection-lost");
        will.status_counter = Some(11);
        will.heard_ms -= 1_000;
        port.deliver([will]);
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        // A later heartbeat of that connection heard here: offline still.
        hear(&mut fleet, &hb_topic, 13, Report::Heartbeat(&hb));
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        // The connection's `Online` (10), heard here late: older than the will.
        hear(
            &mut fleet,
            &hb_topic.with_kind(TopicKind::Status),
            10,
            Report::Status(&Status::Online),
        );
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        // News of an online state behind that `Online`, heard later by the other bridge's clock.
        let mut late = shared("v1", 2, 1_100, Liveness::Online);
        late.status_counter = Some(10);
        late.heard_ms += 1_000;
        port.deliver([late]);
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Offline));
        // The next connection's `Online` (20), heard by the other bridge: online.
        let mut back = shared("v1", 3, 1_200, Liveness::Online);
        back.status_counter = Some(20);
        back.heard_ms -= 2_000;
        port.deliver([back]);
        assert_eq!(liveness_of(&mut fleet, "v1"), Some(Liveness::Online));
    }

    /// A vehicle heard by another bridge turns stale by its own last-seen time.
    #[test]
    fn shared_vehicles_turn_stale_by_their_last_seen_time() {
        let mut fleet = Fleet::new(StaleRule::After(Duration::from_secs(5)));
        let port = fleet.cluster_port();
        let mut quiet = shared("v1", 1, 1_000, Liveness::Online);
        quiet.last_seen_ms -= 6_000;
        quiet.heard_ms -= 6_000;
        let fresh = shared("v2", 1, 1_000, Liveness::Online);
        port.deliver([quiet, fresh]);
        let stale = fleet.sweep(Instant::now());
        let names: Vec<&str> = stale.iter().map(|s| s.vehicle.as_str()).collect();
        assert_eq!(names, ["v1"]);
    }

    /// What the MQTT side calls, once per heartbeat: the freshness check, the update and the
    /// queued liveness change in one step; a replay changes nothing.
    #[test]
    fn recording_checks_freshness_and_queues_the_change() {
        let mut fleet = Fleet::default();
        let t = topic("v1");
        let hb = Heartbeat {
            seq: 1,
            ..Heartbeat::default()
        };
        assert_eq!(fleet.record(&t, 7, Report::Heartbeat(&hb)), Ok(()));
        assert_eq!(
            fleet.record(&t, 7, Report::Heartbeat(&Heartbeat::default())),
            Err(CodecError::Replayed)
        );
        let statuses = fleet.take_statuses();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0].liveness, Liveness::Online);
        let moved = fleet.take_moved();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].heartbeat.seq, 1, "the replay was not recorded");
        let status = t.with_kind(TopicKind::Status);
        let offline = Status::Offline(OfflineReason::Shutdown);
        assert_eq!(fleet.record(&status, 1, Report::Status(&offline)), Ok(()));
        assert_eq!(fleet.take_statuses()[0].reason, Some("shutdown"));
    }
}
