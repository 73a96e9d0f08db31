//! The link to Redis: one task, one multiplexed RESP3 connection that is both subscribed to
//! [`CHANNEL`] and used for the writes.
//!
//! After each (re)connection: SUBSCRIBE first (so nothing published meanwhile is missed), then
//! load every fleet hash (SCAN, then one pipelined HGETALL per fleet) into the fleet cache, then
//! HSETNX the states this bridge heard while Redis was away or before it restarted empty. Then,
//! per tick with news: ONE pipeline (one round trip) of `PUBLISH fleetbeat:news` and one
//! `HSET fleetbeat:vehicles:{fleet} id state ...` per fleet in the batch.
//!
//! Redis unreachable: counted, logged once per outage, retried with a doubling backoff while
//! the fleet's hand-overs keep being taken (and remembered), so the bridge serves its own state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Msg, PushInfo, PushKind};
use shared::{FleetId, VehicleId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::news::{self, CHANNEL, HASH_PREFIX};
use super::stats::{ClusterCounter, ClusterStats};
use crate::domain::fleet::{ClusterPort, SharedVehicle};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command (or a pipeline) may wait for its answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// The first wait before a reconnection; doubled after each failure.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Hash keys asked per SCAN step.
const SCAN_COUNT: u32 = 500;
/// How long the last news may take to go out at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an idle link checks that Redis still answers (a silent peer, a half-open TCP
/// connection, would otherwise go unnoticed while no bridge publishes).
const PING_EVERY: Duration = Duration::from_secs(5);

/// Why a session with Redis ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// A command failed or the connection could not be made.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// The connection closed.
    #[error("connection to Redis lost")]
    Disconnected,
}

/// The state of the link task.
pub(super) struct Link {
    /// The Redis client (RESP3), connected again for every session.
    client: redis::Client,
    /// This bridge's instance id: its own news, coming back, is ignored.
    instance: Arc<str>,
    /// The counters.
    stats: Arc<ClusterStats>,
    /// The longest wait between two connection attempts.
    max_backoff: Duration,
    /// Told once the first session loaded the hashes, or the first attempt failed.
    ready: Option<oneshot::Sender<()>>,
    /// The latest state of every vehicle this bridge heard itself, written again after a
    /// reconnection (Redis may have restarted empty).
    own: HashMap<VehicleId, SharedVehicle>,
    /// The wait before the next connection attempt.
    backoff: Duration,
    /// Whether the link is in an outage (logged once per outage).
    in_outage: bool,
}

impl Link {
    /// A link that has not connected yet.
    pub(super) fn new(
        client: redis::Client,
        instance: Arc<str>,
        stats: Arc<ClusterStats>,
        max_backoff: Duration,
        ready: oneshot::Sender<()>,
    ) -> Self {
        Self {
            client,
            instance,
            stats,
            max_backoff,
            ready: Some(ready),
            own: HashMap::new(),
            backoff: MIN_BACKOFF,
            in_outage: false,
        }
    }

    /// Runs sessions until `cancel` fires or the fleet is gone, reconnecting with backoff.
    pub(super) async fn run(mut self, mut port: ClusterPort, cancel: CancellationToken) {
        loop {
            let err = match self.session(&mut port, &cancel).await {
                Ok(()) => break,
                Err(err) => err,
            };
            self.stats.set_connected(false);
            self.stats.add(ClusterCounter::Errors, 1);
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(());
            }
            if std::mem::replace(&mut self.in_outage, true) {
                debug!(cause = %err, retry_in = ?self.backoff, "cluster: Redis still unreachable");
            } else {
                warn!(cause = %err, "cluster: Redis unreachable; serving this bridge's own state and retrying");
            }
            let wait = tokio::time::sleep(self.backoff);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = &mut wait => break,
                    batch = port.next_batch() => match batch {
                        Some(batch) => self.remember(&batch),
                        None => return,
                    },
                }
            }
            self.backoff = (self.backoff * 2).min(self.max_backoff);
        }
        self.stats.set_connected(false);
    }

    /// One connection: subscribe, load, write back, then publish and merge until it fails.
    async fn session(
        &mut self,
        port: &mut ClusterPort,
        cancel: &CancellationToken,
    ) -> Result<(), SessionError> {
        let (tx, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_push_sender(tx);
        let mut conn = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            conn = self.client.get_multiplexed_async_connection_with_config(&config) => conn?,
        };
        conn.subscribe(CHANNEL).await?;
        self.load(&mut conn, port).await?;
        self.write_back(&mut conn).await?;
        self.stats.set_connected(true);
        self.stats.add(ClusterCounter::Connects, 1);
        self.backoff = MIN_BACKOFF;
        if std::mem::replace(&mut self.in_outage, false) {
            info!("cluster: Redis reachable again; fleet hashes reloaded");
        } else {
            info!(instance = %self.instance, "cluster: connected to Redis");
        }
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    self.flush(&mut conn, port).await;
                    return Ok(());
                }
                push = pushes.recv() => match push {
                    Some(push) if push.kind == PushKind::Disconnection => {
                        return Err(SessionError::Disconnected);
                    }
                    Some(push) => self.on_push(push, port),
                    None => return Err(SessionError::Disconnected),
                },
                batch = port.next_batch() => match batch {
                    Some(batch) => self.publish(&mut conn, &batch).await?,
                    None => return Ok(()),
                },
                _ = ping.tick() => redis::cmd("PING").query_async::<()>(&mut conn).await?,
            }
        }
    }

    /// Loads every fleet hash into the fleet cache (newer wins there).
    async fn load(
        &self,
        conn: &mut MultiplexedConnection,
        port: &ClusterPort,
    ) -> Result<(), SessionError> {
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{HASH_PREFIX}*"))
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(conn)
                .await?;
            keys.extend(found);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("HGETALL").arg(key);
        }
        let hashes: Vec<HashMap<String, Vec<u8>>> = pipe.query_async(conn).await?;
        let mut states = Vec::new();
        for (key, hash) in keys.iter().zip(hashes) {
            for (vehicle, value) in hash {
                match news::decode_state(&value) {
                    Ok(state) => states.push(state),
                    Err(err) => {
                        self.stats.add(ClusterCounter::Rejected, 1);
                        debug!(%key, %vehicle, cause = %err, "cluster: stored state ignored");
                    }
                }
            }
        }
        self.stats
            .add(ClusterCounter::LoadedVehicles, states.len() as u64);
        debug!(
            fleets = keys.len(),
            vehicles = states.len(),
            "cluster: fleet hashes loaded"
        );
        port.deliver(states);
        Ok(())
    }

    /// Writes the states this bridge heard itself where Redis has none (it restarted empty,
    /// or they were heard while it was away), without overwriting newer ones of other bridges.
    async fn write_back(&self, conn: &mut MultiplexedConnection) -> Result<(), SessionError> {
        if self.own.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for state in self.own.values() {
            if let Ok(value) = news::encode_state(state) {
                pipe.cmd("HSETNX")
                    .arg(news::hash_key(&state.fleet))
                    .arg(state.vehicle.as_str())
                    .arg(value)
                    .ignore();
            }
        }
        pipe.query_async::<()>(conn).await?;
        Ok(())
    }

    /// Remembers a batch as this bridge's latest own states.
    fn remember(&mut self, batch: &[SharedVehicle]) {
        for state in batch {
            self.own.insert(state.vehicle.clone(), state.clone());
        }
    }

    /// Publishes a tick's news and writes the same states into the fleet hashes: one pipeline,
    /// one round trip (1 PUBLISH + 1 HSET per fleet in the batch).
    async fn publish(
        &mut self,
        conn: &mut MultiplexedConnection,
        batch: &[SharedVehicle],
    ) -> Result<(), SessionError> {
        self.remember(batch);
        if batch.is_empty() {
            return Ok(());
        }
        let message = match news::encode_news(&self.instance, batch) {
            Ok(message) => message,
            Err(err) => {
                warn!(cause = %err, "cluster: cannot encode news");
                return Ok(());
            }
        };
        let mut by_fleet: HashMap<&FleetId, Vec<(&str, String)>> = HashMap::new();
        for state in batch {
            if let Ok(value) = news::encode_state(state) {
                by_fleet
                    .entry(&state.fleet)
                    .or_default()
                    .push((state.vehicle.as_str(), value));
            }
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(CHANNEL).arg(message).ignore();
        for (fleet, fields) in by_fleet {
            pipe.cmd("HSET").arg(news::hash_key(fleet));
            for (vehicle, value) in fields {
                pipe.arg(vehicle).arg(value);
            }
            pipe.ignore();
        }
        pipe.query_async::<()>(conn).await?;
        self.stats.add(ClusterCounter::Published, 1);
        self.stats
            .add(ClusterCounter::PublishedVehicles, batch.len() as u64);
        Ok(())
    }

    /// Merges news another bridge published; ignores this bridge's own.
    fn on_push(&self, push: PushInfo, port: &ClusterPort) {
        let Some(message) = Msg::from_push_info(push) else {
            return; // subscribe confirmations and the like
        };
        if message.get_channel_name() != CHANNEL {
            return;
        }
        let news = match news::decode_news(message.get_payload_bytes()) {
            Ok(news) => news,
            Err(err) => {
                self.stats.add(ClusterCounter::Rejected, 1);
                debug!(cause = %err, "cluster: news ignored");
                return;
            }
        };
        if *news.from == *self.instance {
            return;
        }
        self.stats.add(ClusterCounter::Received, 1);
        let mut states = Vec::with_capacity(news.states.len());
        for state in news.states {
            match state {
                Ok(state) => states.push(state),
                Err(err) => {
                    self.stats.add(ClusterCounter::Rejected, 1);
                    debug!(from = %news.from, cause = %err, "cluster: vehicle state ignored");
                }
            }
        }
        self.stats
            .add(ClusterCounter::MergedVehicles, states.len() as u64);
        port.deliver(states);
    }

    /// At shutdown: publishes what the fleet handed over and is not out yet (bounded).
    async fn flush(&mut self, conn: &mut MultiplexedConnection, port: &mut ClusterPort) {
        let mut pending = Vec::new();
        while let Some(batch) = port.try_next_batch() {
            pending.extend(batch);
        }
        if pending.is_empty() {
            return;
        }
        match tokio::time::timeout(FLUSH_TIMEOUT, self.publish(conn, &pending)).await {
            Ok(Ok(())) => debug!(vehicles = pending.len(), "cluster: last news published"),
            Ok(Err(err)) => debug!(cause = %err, "cluster: last news not published"),
            Err(_) => debug!("cluster: last news timed out"),
        }
    }
}
