//! Commands from dispatchers (and from the bridge itself, for assignments) to vehicles:
//! publishing one over MQTT and matching the vehicle's ack to it. Who may command which
//! vehicle is the hub's to check (`Hub::command`).
//!
//! With several bridges (issue #15) every bridge subscribes to the vehicles' acks (that
//! subscription is not shared): the bridge that sent a command answers it, and the others
//! ignore its ack quietly ([`Completion::NotOurs`], counted). A bridge remembers the commands
//! it sent a while after they timed out, so that a late ack is still its own
//! ([`Completion::Late`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// What became of a vehicle's ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// It answered a command of this bridge that was waiting for it.
    Answered,
    /// It answers a command this bridge sent but that timed out (or was answered) before:
    /// still this bridge's to show.
    Late,
    /// This bridge did not send that command: another bridge did (or a bridge before a
    /// restart). Ignored.
    NotOurs,
}

impl Completion {
    /// Whether the ack is this bridge's (to emit to the rooms watching the vehicle).
    pub(crate) fn is_ours(self) -> bool {
        !matches!(self, Self::NotOurs)
    }
}

/// How many commands that no longer wait (timed out, answered) are remembered, at most.
const RECENT_MAX: usize = 4096;

/// Commands waiting for their vehicle's ack.
#[derive(Debug)]
struct PendingCommands {
    next_id: AtomicU32,
    waiting: Mutex<HashMap<(VehicleId, u32), oneshot::Sender<AckResult>>>,
    /// Commands that no longer wait, with when they stopped, oldest first: a late or repeated
    /// ack of one of them is still this bridge's.
    recent: Mutex<VecDeque<(VehicleId, u32, Instant)>>,
    /// How long [`Self::recent`] keeps a command.
    remember: Duration,
}

impl Default for PendingCommands {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
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
    /// No commands yet; those that stop waiting are remembered for `remember`.
    fn new(remember: Duration) -> Self {
        Self {
            // Random start: ids of a restarted bridge (or of another bridge) do not collide
            // with old acks.
            next_id: AtomicU32::new(fastrand::u32(..)),
            waiting: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
            remember,
        }
    }

    /// Remembers that `vehicle`'s command `id` was sent by this bridge and no longer waits.
    fn remember(&self, vehicle: &VehicleId, id: u32) {
        let now = Instant::now();
        if let Ok(mut recent) = self.recent.lock() {
            while recent.len() >= RECENT_MAX
                || recent
                    .front()
                    .is_some_and(|(_, _, at)| now.duration_since(*at) > self.remember)
            {
                recent.pop_front();
            }
            recent.push_back((vehicle.clone(), id, now));
        }
    }

    /// Whether `vehicle`'s command `id` was sent by this bridge lately and no longer waits.
    fn recently_sent(&self, vehicle: &VehicleId, id: u32) -> bool {
        let now = Instant::now();
        self.recent.lock().is_ok_and(|recent| {
            recent.iter().any(|(v, i, at)| {
                *i == id && v == vehicle && now.duration_since(*at) <= self.remember
            })
        })
    }

    /// Registers a new command to `vehicle`.
    fn register(&self, vehicle: &VehicleId) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, ack) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert((vehicle.clone(), id), tx);
        }
        Registered { id, ack }
    }

    /// Stops waiting for a command (timed out, or it could not be published); a late ack of
    /// it is still recognised as this bridge's.
    fn forget(&self, vehicle: &VehicleId, id: u32) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&(vehicle.clone(), id));
        }
        self.remember(vehicle, id);
    }

    /// Delivers a vehicle's ack to the command waiting for it, if this bridge sent it.
    fn complete(&self, vehicle: &VehicleId, id: u32, result: AckResult) -> Completion {
        let sender = self
            .waiting
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&(vehicle.clone(), id)));
        match sender {
            Some(sender) => {
                self.remember(vehicle, id);
                if sender.send(result).is_ok() {
                    Completion::Answered
                } else {
                    // The caller gave up a moment ago.
                    Completion::Late
                }
            }
            None if self.recently_sent(vehicle, id) => Completion::Late,
            None => Completion::NotOurs,
        }
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
            // A late ack is recognised for a while after the command timed out.
            waiting: PendingCommands::new(timeout.saturating_mul(4).max(Duration::from_secs(60))),
            mqtt,
            timeout,
            metrics,
        }
    }

    /// How long a command waits for its ack.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
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

    /// Delivers a vehicle's ack to the command waiting for it; says whether this bridge sent
    /// that command (see [`Completion`]).
    pub(crate) fn complete(&self, vehicle: &VehicleId, id: u32, result: AckResult) -> Completion {
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
        assert_eq!(
            pending.complete(&v, b.id, AckResult::Busy),
            Completion::Answered
        );
        assert_eq!(
            pending.complete(&v, b.id, AckResult::Ok),
            Completion::Late,
            "completed once; a repeated ack is still ours"
        );
        let v2 = VehicleId::new("v2").expect("valid");
        assert_eq!(
            pending.complete(&v2, a.id, AckResult::Ok),
            Completion::NotOurs
        );
        assert_eq!(b.ack.await.ok(), Some(AckResult::Busy));
        assert_eq!(pending.len(), 1);
        pending.forget(&v, a.id);
        assert_eq!(pending.len(), 0, "none waiting");
        assert_eq!(
            pending.complete(&v, a.id, AckResult::Ok),
            Completion::Late,
            "timed out, then answered"
        );
        assert!(Completion::Late.is_ours() && !Completion::NotOurs.is_ours());
    }

    #[test]
    fn acks_of_other_bridges_are_not_ours() {
        // Two bridges: ids from random starts; an ack of one's command is not the other's.
        let (a, b) = (PendingCommands::default(), PendingCommands::default());
        let v = VehicleId::new("v1").expect("valid");
        let sent = a.register(&v);
        assert_eq!(b.complete(&v, sent.id, AckResult::Ok), Completion::NotOurs);
        assert_eq!(a.complete(&v, sent.id, AckResult::Ok), Completion::Answered);
    }

    #[test]
    fn recent_commands_are_forgotten_after_a_while() {
        let pending = PendingCommands::new(Duration::ZERO);
        let v = VehicleId::new("v1").expect("valid");
        let sent = pending.register(&v);
        pending.forget(&v, sent.id);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(
            pending.complete(&v, sent.id, AckResult::Ok),
            Completion::NotOurs
        );
    }
}
