//! The hub: the state every part of the bridge shares, and the operations on it that are not
//! tied to one transport (commands, routing what vehicles publish).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use shared::{
    AckResult, Command, CommandAck, CommandKind, DeliveryEvent, Heartbeat, Status, Topic,
    TopicKind, VehicleId,
};

use crate::auth::{Grant, Tokens};
use crate::command::{CommandError, PendingCommands};
use crate::fleet::{Fleet, Liveness, StatusChange, now_ms};
use crate::keys::DeviceKeys;
use crate::metrics::{Metrics, Rejection};
use crate::store::{HeartbeatRow, HeartbeatSender, Store};

/// What happened when a vehicle's payload was accepted, for the Socket.IO side to emit.
#[derive(Debug)]
pub enum Accepted {
    /// A heartbeat (positions are emitted in batches at the next tick), possibly bringing the
    /// vehicle back online.
    Heartbeat(Option<StatusChange>),
    /// A status message, possibly changing the vehicle's liveness.
    Status(Option<StatusChange>),
    /// A delivery event (recorded and queued by the caller before it is acknowledged).
    Delivery(DeliveryEvent),
    /// A command ack.
    Ack(CommandAck),
}

/// What a [`Hub`] is made of.
pub struct HubParts {
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Tokens and their grants.
    pub tokens: Tokens,
    /// Device message keys.
    pub keys: DeviceKeys,
    /// The fleet cache.
    pub fleet: Fleet,
    /// Durable storage.
    pub store: Store,
    /// The heartbeat history writer's input.
    pub history: HeartbeatSender,
    /// The MQTT client, to publish commands.
    pub mqtt: AsyncClient,
    /// How long a command waits for its ack.
    pub command_timeout: Duration,
}

/// The bridge's shared state.
pub struct Hub {
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Tokens and their grants.
    pub tokens: Tokens,
    /// Device message keys.
    pub keys: DeviceKeys,
    /// Commands waiting for acks.
    pub commands: PendingCommands,
    /// Durable storage: orders, delivery events, client queues, heartbeat history.
    pub store: Store,
    /// Where accepted heartbeats go to be stored in batches.
    pub history: HeartbeatSender,
    /// Serializes order assignment (see `orders`).
    pub(crate) assigning: tokio::sync::Mutex<()>,
    fleet: Mutex<Fleet>,
    mqtt: AsyncClient,
    command_timeout: Duration,
}

impl Hub {
    /// Bundles the shared state.
    pub fn new(parts: HubParts) -> Self {
        Self {
            metrics: parts.metrics,
            tokens: parts.tokens,
            keys: parts.keys,
            commands: PendingCommands::default(),
            store: parts.store,
            history: parts.history,
            assigning: tokio::sync::Mutex::new(()),
            fleet: Mutex::new(parts.fleet),
            mqtt: parts.mqtt,
            command_timeout: parts.command_timeout,
        }
    }

    /// Locks the fleet cache. A poisoned lock (a panic elsewhere) is recovered: the cache holds
    /// no invariant a half-done update could break.
    pub fn fleet(&self) -> MutexGuard<'_, Fleet> {
        self.fleet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks a vehicle's sealed payload (origin, freshness, shape) and updates the state.
    ///
    /// # Errors
    /// The [`Rejection`] reason and a message for the log.
    pub fn accept(&self, topic: &Topic, payload: &[u8]) -> Result<Accepted, (Rejection, String)> {
        let key = self.keys.key(&topic.vehicle).ok_or((
            Rejection::Auth,
            "unknown device: no key provisioned".to_owned(),
        ))?;
        let name = topic.name();
        let reject = |err: shared::CodecError| {
            let why = match err {
                shared::CodecError::Unauthenticated => Rejection::Auth,
                shared::CodecError::Replayed => Rejection::Replay,
                _ => Rejection::Decode,
            };
            (why, err.to_string())
        };
        macro_rules! open {
            ($t:ty) => {{
                let opened = shared::open::<$t>(payload, &name, &key).map_err(reject)?;
                self.fleet()
                    .check_fresh(topic, opened.counter)
                    .map_err(reject)?;
                self.metrics.received(topic.kind);
                opened.msg
            }};
        }
        Ok(match topic.kind {
            TopicKind::Heartbeat => {
                let hb = open!(Heartbeat);
                let row =
                    HeartbeatRow::new(topic.fleet.clone(), topic.vehicle.clone(), &hb, now_ms());
                if !self.history.send(row) {
                    self.metrics.history_dropped();
                }
                Accepted::Heartbeat(self.fleet().heartbeat(topic, &hb))
            }
            TopicKind::Status => {
                let status = open!(Status);
                Accepted::Status(self.fleet().status(topic, &status))
            }
            TopicKind::Event => {
                // Not through the replay guard: a re-sent event (the device retries until the
                // broker acks it) must be acknowledged again, and the store drops duplicates.
                let opened = shared::open::<DeliveryEvent>(payload, &name, &key).map_err(reject)?;
                self.metrics.received(topic.kind);
                Accepted::Delivery(opened.msg)
            }
            TopicKind::Ack => {
                let ack = open!(CommandAck);
                if !self.commands.complete(&topic.vehicle, ack.id, ack.result) {
                    tracing::debug!(vehicle = %topic.vehicle, id = ack.id, "ack for no waiting command");
                }
                Accepted::Ack(ack)
            }
            TopicKind::Command => {
                return Err((
                    Rejection::Topic,
                    "commands are not accepted from vehicles".into(),
                ));
            }
        })
    }

    /// Sends `kind` to `vehicle` and waits for its ack (at most the command timeout).
    ///
    /// # Errors
    /// [`CommandError`] if the vehicle is unknown, offline, not the caller's, or silent.
    pub async fn command(
        &self,
        grant: &Grant,
        vehicle: &VehicleId,
        kind: CommandKind,
    ) -> Result<(u32, AckResult), CommandError> {
        let (fleet, liveness) = {
            let fleet = self.fleet();
            let state = fleet.vehicle(vehicle).ok_or(CommandError::UnknownVehicle)?;
            (state.fleet, state.status)
        };
        if !grant.may_see_fleet(&fleet) {
            return Err(CommandError::Forbidden);
        }
        if liveness == Liveness::Offline {
            return Err(CommandError::Offline);
        }
        let registered = self.commands.register(vehicle);
        let id = registered.id;
        let command = Command { id, kind };
        let payload = shared::codec::encode_vec(&command)
            .map_err(|e| CommandError::Invalid(e.to_string()))?;
        let topic = Topic::new(fleet, vehicle.clone(), TopicKind::Command).name();
        if let Err(err) = self
            .mqtt
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload.to_vec())
            .await
        {
            self.commands.forget(vehicle, id);
            return Err(CommandError::Publish(err.to_string()));
        }
        self.metrics.command_sent();
        match tokio::time::timeout(self.command_timeout, registered.ack).await {
            Ok(Ok(result)) => Ok((id, result)),
            Ok(Err(_)) | Err(_) => {
                self.commands.forget(vehicle, id);
                self.metrics.command_timed_out();
                Err(CommandError::Timeout(self.command_timeout))
            }
        }
    }
}
