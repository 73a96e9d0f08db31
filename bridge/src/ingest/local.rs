//! The embedded broker's heartbeats, read in-process ([`broker::LocalSubscriber`]) instead of
//! through a second MQTT connection to it: no encode, loopback socket, client thread and
//! decode per heartbeat. The events session stays an MQTT connection: its PUBACKs, sent once
//! the store has committed, are what make a vehicle's event durable end to end.

use std::sync::Arc;

use broker::LocalSubscriber;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::inbox::Inbox;

/// Hands every heartbeat of `subscriber` to `inbox` until `cancel` fires or the broker's
/// router is gone (the broker died: the bridge exits on that, see `Bridge::failed`).
pub(crate) async fn run(
    mut subscriber: LocalSubscriber,
    inbox: Arc<Inbox>,
    cancel: CancellationToken,
) {
    // The subscription was acknowledged before the subscriber was handed over.
    inbox.metrics().set_mqtt_heartbeats_ready(true);
    info!(
        session = "heartbeats",
        "reading the embedded broker's heartbeats in-process"
    );
    loop {
        let received = tokio::select! {
            () = cancel.cancelled() => break,
            received = subscriber.recv(|message| inbox.heartbeat(&message.topic, &message.payload)) => received,
        };
        if let Err(err) = received {
            error!(cause = %err, "the embedded broker's heartbeat subscription ended");
            break;
        }
    }
    inbox.metrics().set_mqtt_heartbeats_ready(false);
}
