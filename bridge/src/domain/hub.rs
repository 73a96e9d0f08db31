//! The hub: the state every part of the bridge shares (the fleet cache, waiting commands, the
//! store, the tokens, the counters), behind the operations the MQTT side, the Socket.IO side
//! and the HTTP side perform on it.
//!
//! Orders and delivery events are in `delivery`; this file holds the state and the fleet,
//! command, queue and retention operations.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::AsyncClient;
use shared::{AckResult, CodecError, CommandAck, CommandKind, FleetId, Topic, VehicleId};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::auth::{AuthError, Entrance, Grant, MetricsAccess, Tokens};
use super::command::{CommandError, Commands, Completion};
use super::fleet::{Fleet, Liveness, LivenessCounts, Report, TickNews, VehicleState};
use crate::clock::now_ms;
use crate::geofence::Geofences;
use crate::metrics::{Counter, Metrics};
use crate::store::{
    ClientId, HeartbeatRow, HeartbeatSender, MessageId, OrderView, QueuedMessage, Store, StoreError,
};

/// How long a track read waits for the history writer to commit what it holds.
const TRACK_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// What a [`Hub`] is made of.
pub(crate) struct HubParts {
    /// Counters.
    pub(crate) metrics: Arc<Metrics>,
    /// Tokens and their grants.
    pub(crate) tokens: Tokens,
    /// The fleet cache.
    pub(crate) fleet: Fleet,
    /// Durable storage.
    pub(crate) store: Store,
    /// The MQTT client, to publish commands.
    pub(crate) mqtt: AsyncClient,
    /// How long a command waits for its ack.
    pub(crate) command_timeout: Duration,
}

/// The bridge's shared state.
pub(crate) struct Hub {
    metrics: Arc<Metrics>,
    pub(super) tokens: Tokens,
    /// Commands to vehicles, waiting for their acks.
    commands: Commands,
    /// Durable storage: orders, delivery events, client queues, heartbeat history.
    pub(super) store: Store,
    /// Serializes order assignment (see `delivery`).
    pub(super) assigning: tokio::sync::Mutex<()>,
    fleet: Mutex<Fleet>,
    /// Orders whose state changed, as they are after the change, in commit order: the
    /// server emits each as an `order` event. Unbounded: a change is a committed write, far
    /// rarer than what one emission costs, and none may be dropped.
    order_changes: mpsc::UnboundedSender<OrderView>,
    /// The receiving end, until the server takes it ([`Hub::take_order_changes`]).
    order_changes_rx: Mutex<Option<mpsc::UnboundedReceiver<OrderView>>>,
    /// Vehicles still reporting an order taken from them (reassigned, or re-offered while they
    /// were offline), to be sent `CancelOrder` by the orders' task (see `delivery`).
    pub(super) strays: Mutex<Vec<(shared::OrderId, VehicleId)>>,
    /// Geofences: heartbeats are noted here on the MQTT path, evaluated by `server`'s task.
    geofences: Arc<Geofences>,
    /// The history writer, asked to commit what it holds before a track read.
    history: Option<HeartbeatSender>,
    /// Woken when news arrives while none was waiting: the flush (`server`'s ticker) may send
    /// it at once instead of at the next tick.
    news: tokio::sync::Notify,
}

impl Hub {
    /// Bundles the shared state.
    pub(crate) fn new(parts: HubParts) -> Self {
        let (order_changes, order_changes_rx) = mpsc::unbounded_channel();
        Self {
            order_changes,
            order_changes_rx: Mutex::new(Some(order_changes_rx)),
            strays: Mutex::new(Vec::new()),
            commands: Commands::new(
                parts.mqtt,
                parts.command_timeout,
                Arc::clone(&parts.metrics),
            ),
            metrics: parts.metrics,
            tokens: parts.tokens,
            store: parts.store,
            assigning: tokio::sync::Mutex::new(()),
            fleet: Mutex::new(parts.fleet),
            geofences: Arc::new(Geofences::default()),
            history: None,
            news: tokio::sync::Notify::new(),
        }
    }

    /// The hub with the history writer that stores the heartbeats it reads back: a track
    /// read then first has the writer commit what it holds.
    #[must_use]
    pub(crate) fn with_history(mut self, history: HeartbeatSender) -> Self {
        self.history = Some(history);
        self
    }

    /// The hub with `geofences` instead of the default (empty) ones.
    #[must_use]
    pub(crate) fn with_geofences(mut self, geofences: Arc<Geofences>) -> Self {
        self.geofences = geofences;
        self
    }

    /// The geofences.
    pub(crate) fn geofences(&self) -> &Arc<Geofences> {
        &self.geofences
    }

    /// The store itself, for the geofence API and its sync (`api::geofences`).
    pub(crate) fn storage(&self) -> &Store {
        &self.store
    }

    /// Locks the fleet cache. A poisoned lock (a panic elsewhere) is recovered: the cache holds
    /// no invariant a half-done update could break.
    pub(super) fn fleet(&self) -> MutexGuard<'_, Fleet> {
        self.fleet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The orders whose state changed, in commit order (see `delivery`): once, for the task
    /// that emits them; `None` after.
    pub(crate) fn take_order_changes(&self) -> Option<mpsc::UnboundedReceiver<OrderView>> {
        self.order_changes_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Hands an order as it is after a change to whoever emits order changes. Nobody
    /// listening (no server, in unit tests) is not an error.
    pub(super) fn publish_order_change(&self, view: OrderView) {
        if self.order_changes.send(view).is_err() {
            tracing::debug!("order change not emitted: nobody listens");
        }
    }

    /// How long a command waits for the vehicle's ack.
    pub(crate) fn command_timeout(&self) -> Duration {
        self.commands.timeout()
    }

    /// The bridge's counters.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The bridge's metrics in the Prometheus text format: its counters, how the store
    /// committed the delivery events (`Store::event_groups`) and its checkpoints.
    pub(crate) fn metrics_text(&self) -> String {
        let mut text = self.metrics.render();
        crate::metrics::render_store(
            &mut text,
            self.store.event_groups(),
            self.store.checkpoints(),
        );
        text
    }

    /// Checks a client's token at entrance `E`: what it grants, if `E` admits its role.
    ///
    /// # Errors
    /// [`AuthError`] saying why it is refused.
    pub(crate) fn authorize<E: Entrance>(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        self.tokens.authorize(token, E::NAME, E::ROLES)
    }

    /// Who may read `/metrics`.
    pub(crate) fn metrics_access(&self) -> MetricsAccess {
        self.tokens.metrics_access()
    }

    // ---- the fleet -------------------------------------------------------------------------

    /// Records what a vehicle reported, sealed with `counter`, if it is fresh: one lock of
    /// the fleet for the replay check, the update and the liveness change it causes.
    ///
    /// # Errors
    /// [`CodecError::Replayed`] if the counter is not fresh: nothing is recorded.
    pub(crate) fn record(
        &self,
        topic: &Topic,
        counter: u64,
        report: Report<'_>,
    ) -> Result<(), CodecError> {
        let first_news = {
            let mut fleet = self.fleet();
            let had_news = fleet.has_news();
            fleet.record(topic, counter, report)?;
            !had_news && fleet.has_news()
        };
        if first_news {
            self.news.notify_one();
        }
        if let Report::Heartbeat(heartbeat) = report {
            self.geofences.note(&topic.fleet, &topic.vehicle, heartbeat);
        }
        Ok(())
    }

    /// The state of one vehicle.
    pub(crate) fn vehicle(&self, vehicle: &VehicleId) -> Option<VehicleState> {
        self.fleet().vehicle(vehicle)
    }

    /// The fleet of a vehicle the bridge has heard of (it never changes).
    pub(crate) fn fleet_of(&self, vehicle: &VehicleId) -> Option<FleetId> {
        self.fleet().fleet_of(vehicle).cloned()
    }

    /// Whether `grant` may see `vehicle`: a vehicle the bridge has not heard of reveals
    /// nothing, so only the fleet of a known one is checked.
    pub(crate) fn may_see_vehicle(&self, grant: &Grant, vehicle: &VehicleId) -> bool {
        self.fleet_of(vehicle)
            .is_none_or(|fleet| grant.may_see_fleet(&fleet))
    }

    /// The state of every vehicle for which `wanted(fleet, vehicle)` holds, sorted by id.
    pub(crate) fn snapshot(
        &self,
        wanted: impl Fn(&FleetId, &VehicleId) -> bool,
    ) -> Vec<VehicleState> {
        self.fleet().snapshot(wanted)
    }

    /// How many vehicles are online, stale and offline.
    pub(crate) fn liveness_counts(&self) -> LivenessCounts {
        self.fleet().counts()
    }

    /// Waits until news arrives while none was waiting (at most one wake-up is stored).
    pub(crate) async fn news(&self) {
        self.news.notified().await;
    }

    /// Takes what the tick sends into `news` (emptied first, kept by the caller from tick to
    /// tick): the queued liveness changes and the vehicles that moved.
    pub(crate) fn take_tick_news(&self, news: &mut TickNews) {
        let mut fleet = self.fleet();
        fleet.take_statuses_into(&mut news.statuses);
        fleet.take_moved_into(&mut news.moved);
    }

    /// Marks online vehicles that missed their heartbeats as stale; the changes go out with
    /// the next tick.
    pub(crate) fn mark_stale(&self, now: Instant) {
        let mut fleet = self.fleet();
        let changes = fleet.sweep(now);
        fleet.queue_statuses(changes);
    }

    // ---- commands ---------------------------------------------------------------------------

    /// Sends `kind` to `vehicle` and waits for its ack (at most the command timeout).
    ///
    /// # Errors
    /// [`CommandError`] if the vehicle is unknown, offline, or silent. A vehicle of a fleet the
    /// caller may not see is [`CommandError::UnknownVehicle`] too: the answer must not tell
    /// which vehicle ids exist.
    pub(crate) async fn command(
        &self,
        grant: &Grant,
        vehicle: &VehicleId,
        kind: CommandKind,
    ) -> Result<(u32, AckResult), CommandError> {
        let status = self
            .vehicle(vehicle)
            .filter(|v| grant.may_see_fleet(&v.status.fleet))
            .ok_or(CommandError::UnknownVehicle)?
            .status;
        if status.liveness == Liveness::Offline {
            return Err(CommandError::Offline);
        }
        self.commands.send(status.fleet, vehicle, kind).await
    }

    /// Accepts a fresh ack (sealed with `counter`) from the vehicle of `topic` and hands it
    /// to the command waiting for it. Says whether this bridge sent that command: every
    /// bridge receives every ack, and an ack of another bridge's command is ignored (a debug
    /// log, counted in `acks_for_other_bridges_total`).
    ///
    /// # Errors
    /// [`CodecError::Replayed`] if the counter is not fresh.
    pub(crate) fn complete_command(
        &self,
        topic: &Topic,
        counter: u64,
        ack: &CommandAck,
    ) -> Result<Completion, CodecError> {
        self.fleet().check_fresh(topic, counter)?;
        let completion = self.commands.complete(&topic.vehicle, ack.id, ack.result);
        match completion {
            Completion::Answered => {}
            Completion::Late => {
                tracing::debug!(vehicle = %topic.vehicle, id = ack.id, "late ack of a command of this bridge");
            }
            Completion::NotOurs => {
                self.metrics.count(Counter::AcksForOtherBridges);
                tracing::debug!(vehicle = %topic.vehicle, id = ack.id, "ack of a command this bridge did not send (another bridge's): ignored");
            }
        }
        Ok(completion)
    }

    /// How many commands wait for their vehicle's ack.
    pub(crate) fn commands_waiting(&self) -> usize {
        self.commands.waiting()
    }

    // ---- the durable queue and the history ------------------------------------------------

    /// One page of the messages still waiting for `client`'s acknowledgement: at most `limit`
    /// with an id above `after`, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be read.
    pub(crate) async fn pending_messages(
        &self,
        client: &ClientId,
        after: MessageId,
        limit: u32,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        self.store.pending_page(client, after, limit).await
    }

    /// `client` acknowledges message `id`; returns whether it was pending.
    ///
    /// # Errors
    /// [`StoreError`] if it could not be committed.
    pub(crate) async fn acknowledge_message(
        &self,
        client: &ClientId,
        id: MessageId,
    ) -> Result<bool, StoreError> {
        self.store.ack(client, id).await
    }

    /// The stored heartbeats of `vehicle` with `from_ms <= ts_ms <= to_ms`, at most `limit`,
    /// or `None` if the vehicle is not `grant`'s: some of them belong to a fleet `grant` may
    /// not see, the bridge knows the vehicle in such a fleet, or it neither knows the vehicle
    /// nor has any of its heartbeats in the window. "Not yours" and "does not exist" so get
    /// the same answer.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be read.
    pub(crate) async fn track(
        &self,
        grant: &Grant,
        vehicle: &VehicleId,
        (from_ms, to_ms): (u64, u64),
        limit: u32,
    ) -> Result<Option<Vec<HeartbeatRow>>, StoreError> {
        let known = self.fleet_of(vehicle);
        if known.as_ref().is_some_and(|f| !grant.may_see_fleet(f)) {
            return Ok(None);
        }
        // The writer holds up to a few seconds of heartbeats: the track ends where the live
        // view is. Another bridge's writer (several bridges, one database) is not asked.
        if let Some(history) = &self.history
            && !history.flush(TRACK_FLUSH_WAIT).await
        {
            debug!(%vehicle, "track read without the history writer's latest heartbeats");
        }
        let rows = self.store.track(vehicle, from_ms, to_ms, limit).await?;
        let visible = rows.iter().all(|r| grant.may_see_fleet(&r.fleet));
        Ok((visible && (known.is_some() || !rows.is_empty())).then_some(rows))
    }

    /// Tries one small write: whether the store can write now.
    ///
    /// # Errors
    /// [`StoreError`] if it could not be committed.
    pub(crate) async fn probe_store(&self) -> Result<(), StoreError> {
        self.store.probe_write().await
    }

    /// Removes queued messages older than `queue` and heartbeat history older than `history`.
    pub(crate) async fn apply_retention(&self, queue: Duration, history: Duration) {
        let now = now_ms();
        let cutoff =
            |d: Duration| now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match self.store.expire(cutoff(queue)).await {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.add(Counter::QueueExpired, n);
                warn!(expired = n, "queued messages expired unacknowledged");
            }
            Err(err) => warn!(cause = %err, "queue retention failed"),
        }
        if let Err(err) = self.store.expire_heartbeats(cutoff(history)).await {
            warn!(cause = %err, "history retention failed");
        }
    }
}
