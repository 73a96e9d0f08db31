//! Commands from dispatchers (and from the bridge itself, for assignments) to vehicles:
//! publishing one over MQTT and matching the vehicle's ack to it. Who may command which
//! vehicle is the hub's to check (`Hub::command`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use serde::Deserialize;
use shared::{AckResult, Command, CommandKind, FleetId, Topic, TopicKind, VehicleId};
use thiserror::Error;
use tokio::sync::oneshot;

use crate::metrics::{Counter, Metrics};

/// A command as clients write it (Socket.IO `command`, HTTP `POST .../commands`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum CommandRequest {
    /// Ask the vehicle to answer.
    Ping,
    /// Change the heartbeat interval.
    SetRate {
        /// The new interval in milliseconds (100 ..= 3 600 000).
        interval_ms: u32,
    },
    /// Send the vehicle back to its depot.
    ReturnToDepot,
}

impl CommandRequest {
    /// The wire command.
    ///
    /// # Errors
    /// [`CommandError::Invalid`] if an argument is out of range.
    pub(crate) fn to_wire(&self) -> Result<CommandKind, CommandError> {
        Ok(match *self {
            Self::Ping => CommandKind::Ping,
            Self::SetRate { interval_ms } => {
                if !(100..=3_600_000).contains(&interval_ms) {
                    return Err(CommandError::Invalid(
                        "interval_ms must be within 100 ..= 3600000".into(),
                    ));
                }
                CommandKind::SetRate { interval_ms }
            }
            Self::ReturnToDepot => CommandKind::ReturnToDepot,
        })
    }
}

/// Why a command did not get an answer.
#[derive(Debug, Error)]
pub(crate) enum CommandError {
    /// The bridge has never heard of this vehicle, or it is in a fleet the caller may not
    /// see: the two are one answer, so that it does not tell which vehicle ids exist.
    #[error("unknown vehicle")]
    UnknownVehicle,
    /// The vehicle is offline: a command would not reach it.
    #[error("vehicle is offline")]
    Offline,
    /// The command is malformed or out of range.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The vehicle did not answer in time.
    #[error("timeout: the vehicle did not answer within {0:?}")]
    Timeout(Duration),
    /// The command could not be published.
    #[error("could not publish the command: {0}")]
    Publish(String),
}

/// Commands waiting for their vehicle's ack.
#[derive(Debug)]
struct PendingCommands {
    next_id: AtomicU32,
    waiting: Mutex<HashMap<(VehicleId, u32), oneshot::Sender<AckResult>>>,
}

impl Default for PendingCommands {
    fn default() -> Self {
        Self {
            // Random start: ids of a restarted bridge do not collide with old acks.
            next_id: AtomicU32::new(fastrand::u32(..)),
            waiting: Mutex::new(HashMap::new()),
        }
    }
}

/// A registered command: its id, and where its ack will arrive.
#[derive(Debug)]
struct Registered {
    /// The command id to publish.
    id: u32,
    /// Resolves with the vehicle's answer.
    ack: oneshot::Receiver<AckResult>,
}

impl PendingCommands {
    /// Registers a new command to `vehicle`.
    fn register(&self, vehicle: &VehicleId) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, ack) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert((vehicle.clone(), id), tx);
        }
        Registered { id, ack }
    }

    /// Forgets a command (answered, timed out or failed).
    fn forget(&self, vehicle: &VehicleId, id: u32) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&(vehicle.clone(), id));
        }
    }

    /// Delivers a vehicle's ack; returns false if no command with that id was waiting.
    fn complete(&self, vehicle: &VehicleId, id: u32, result: AckResult) -> bool {
        let sender = self
            .waiting
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&(vehicle.clone(), id)));
        sender.is_some_and(|s| s.send(result).is_ok())
    }

    /// How many commands are waiting.
    fn len(&self) -> usize {
        self.waiting.lock().map(|w| w.len()).unwrap_or(0)
    }
}

/// Sends commands to vehicles and waits for their acks.
pub(crate) struct Commands {
    waiting: PendingCommands,
    mqtt: AsyncClient,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Commands {
    /// Commands published with `mqtt`, each waiting at most `timeout` for its ack.
    pub(crate) fn new(mqtt: AsyncClient, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            waiting: PendingCommands::default(),
            mqtt,
            timeout,
            metrics,
        }
    }

    /// Publishes `kind` to `vehicle` of `fleet` and waits for its ack (at most the timeout).
    ///
    /// # Errors
    /// [`CommandError::Publish`] if it could not be published, [`CommandError::Timeout`] if
    /// the vehicle did not answer in time.
    pub(crate) async fn send(
        &self,
        fleet: FleetId,
        vehicle: &VehicleId,
        kind: CommandKind,
    ) -> Result<(u32, AckResult), CommandError> {
        let registered = self.waiting.register(vehicle);
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
            self.waiting.forget(vehicle, id);
            return Err(CommandError::Publish(err.to_string()));
        }
        self.metrics.count(Counter::CommandsSent);
        match tokio::time::timeout(self.timeout, registered.ack).await {
            Ok(Ok(result)) => Ok((id, result)),
            Ok(Err(_)) | Err(_) => {
                self.waiting.forget(vehicle, id);
                self.metrics.count(Counter::CommandsTimedOut);
                Err(CommandError::Timeout(self.timeout))
            }
        }
    }

    /// Delivers a vehicle's ack to the command waiting for it; returns false if no command
    /// with that id was waiting.
    pub(crate) fn complete(&self, vehicle: &VehicleId, id: u32, result: AckResult) -> bool {
        self.waiting.complete(vehicle, id, result)
    }

    /// How many commands wait for their vehicle's ack.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        let req: CommandRequest =
            serde_json::from_str(r#"{"type":"set_rate","interval_ms":500}"#).expect("valid");
        assert_eq!(
            req.to_wire().ok(),
            Some(CommandKind::SetRate { interval_ms: 500 })
        );
        let req: CommandRequest = serde_json::from_str(r#"{"type":"ping"}"#).expect("valid");
        assert_eq!(req.to_wire().ok(), Some(CommandKind::Ping));
        assert!(serde_json::from_str::<CommandRequest>(r#"{"type":"explode"}"#).is_err());
        let slow = CommandRequest::SetRate { interval_ms: 5 };
        assert!(matches!(slow.to_wire(), Err(CommandError::Invalid(_))));
    }

    #[tokio::test]
    async fn acks_complete_the_right_command() {
        let pending = PendingCommands::default();
        let v = VehicleId::new("v1").expect("valid");
        let a = pending.register(&v);
        let b = pending.register(&v);
        assert!(pending.complete(&v, b.id, AckResult::Busy));
        assert!(!pending.complete(&v, b.id, AckResult::Ok), "completed once");
        assert!(!pending.complete(&VehicleId::new("v2").expect("valid"), a.id, AckResult::Ok));
        assert_eq!(b.ack.await.ok(), Some(AckResult::Busy));
        assert_eq!(pending.len(), 1);
        pending.forget(&v, a.id);
        assert_eq!(pending.len(), 0, "none waiting");
    }
}
