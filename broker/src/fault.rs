//! Fault injection, for tests of what happens when the broker breaks (feature
//! `fault-injection`, never in a release build): [`router_panic`] makes rumqttd's router thread
//! die the way issue #13 found it dying, through the router's own API (the front end refuses
//! `$share`, so no client can do this any more), and [`inject_from_env`] does it in a running
//! `broker` or `bridge` process when `FLEETBEAT_FAULT=router-panic` is set.

use std::time::Duration;

use rumqttd::Notification;
use rumqttd::protocol::{Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe};
use tokio::time::timeout;

use crate::mux::publish_with;
use crate::router::{LinkRequest, Registrar};

/// The variable [`inject_from_env`] reads.
#[cfg(feature = "fault-injection")]
const FAULT_VARIABLE: &str = "FLEETBEAT_FAULT";

/// If `FLEETBEAT_FAULT=router-panic`, makes the router thread die shortly after the start
/// (logged as a WARN line first, so nobody mistakes it for a real failure).
#[cfg(feature = "fault-injection")]
pub(crate) fn inject_from_env(registrar: &Registrar) {
    match std::env::var(FAULT_VARIABLE).as_deref() {
        Ok("router-panic") => {
            tracing::warn!("{FAULT_VARIABLE}=router-panic: killing rumqttd's router thread");
            let registrar = registrar.clone();
            tokio::spawn(async move {
                if let Err(err) = router_panic(&registrar).await {
                    tracing::error!(%err, "the injected fault did not happen");
                }
            });
        }
        Ok(other) => tracing::error!("{FAULT_VARIABLE}={other}: no such fault (router-panic)"),
        Err(_) => {}
    }
}

/// Makes rumqttd's router thread panic ("group must exists"): a persistent session subscribed
/// to `$share/g/...` at QoS 1 leaves with a message unacknowledged.
///
/// # Errors
/// If the router refuses a step (it is already gone).
pub(crate) async fn router_panic(registrar: &Registrar) -> Result<(), String> {
    const T: Duration = Duration::from_secs(20);
    let (mut tx, mut rx, _) = registrar
        .link(LinkRequest {
            client_id: "fault-sharer",
            clean_session: false,
        })
        .map_err(|err| err.to_string())?;
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![Filter {
            path: "$share/g/fault-boom".to_owned(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        }],
    };
    tx.send(Packet::Subscribe(subscribe, None))
        .await
        .map_err(|err| err.to_string())?;
    let (mut publisher, _publisher_rx, _) = registrar
        .link(LinkRequest::internal("fault-publisher"))
        .map_err(|err| err.to_string())?;
    let publish: Publish = publish_with(b"fault-boom", b"x", 0, 0, false);
    publisher
        .send(Packet::Publish(publish, None))
        .await
        .map_err(|err| err.to_string())?;
    // Wait for the forward, and do not acknowledge it.
    timeout(T, async {
        loop {
            match rx.next().await {
                Ok(Some(Notification::Forward(_))) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(format!("router gone too early: {err}")),
            }
        }
    })
    .await
    .map_err(|_| "the shared subscription never got the message".to_owned())??;
    let bye = rumqttd::protocol::Disconnect {
        reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
    };
    // The router saves the session: the group it names is gone, and it panics.
    let _ = tx.send(Packet::Disconnect(bye, None)).await;
    Ok(())
}
