//! The acks of client events on Socket.IO (`{ok: true, ...}` or `{ok: false, error}`), and
//! what operators send and see on `/admin`.

use serde_json::{Value, json};

use crate::domain::fleet::LivenessCounts;

/// The ack of a client event: `{ok: true}` plus the fields of an object answer, or
/// `{ok: false, error}`.
pub(crate) fn ack(result: Result<Value, String>) -> Value {
    match result {
        Ok(Value::Object(mut fields)) => {
            fields.insert("ok".into(), Value::Bool(true));
            Value::Object(fields)
        }
        Ok(_) => json!({ "ok": true }),
        Err(error) => json!({ "ok": false, "error": error }),
    }
}

/// The answer to `received`: whether the message was still pending.
pub(crate) fn removed(removed: bool) -> Value {
    json!({ "removed": removed })
}

/// The answer to `getAll`: how many pending messages were sent again, and the cursor of the
/// next page (`null`: nothing more).
pub(crate) fn resent(count: usize, next: Option<u64>) -> Value {
    json!({ "count": count, "next": next })
}

/// An `announce` event: an operator's `message`, sent at `ts_ms`.
pub(crate) fn announcement(message: &str, from: &str, ts_ms: u64) -> Value {
    json!({ "message": message, "from": from, "ts_ms": ts_ms })
}

/// What the bridge reports to `/admin` `stats`.
#[derive(Debug)]
pub(crate) struct Stats {
    /// Whether MQTT is connected and subscribed.
    pub(crate) mqtt_ready: bool,
    /// Commands waiting for their vehicle's ack.
    pub(crate) commands_waiting: usize,
    /// The counters in the Prometheus text format.
    pub(crate) metrics: String,
    /// Vehicles per liveness.
    pub(crate) vehicles: LivenessCounts,
    /// Connected sockets on `/dispatch`, `/vendor` and `/admin`.
    pub(crate) clients: [usize; 3],
}

/// The answer to `stats`.
pub(crate) fn stats(stats: Stats) -> Value {
    let [dispatch, vendor, admin] = stats.clients;
    json!({
        "bridge": {
            "mqtt_ready": stats.mqtt_ready,
            "commands_waiting": stats.commands_waiting,
            "metrics": stats.metrics,
        },
        "vehicles": {
            "online": stats.vehicles.online,
            "stale": stats.vehicles.stale,
            "offline": stats.vehicles.offline,
        },
        "clients": {
            "dispatch": dispatch,
            "vendor": vendor,
            "admin": admin,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_say_ok_or_why_not() {
        assert_eq!(ack(Ok(Value::Null)), json!({ "ok": true }));
        assert_eq!(
            ack(Ok(removed(true))),
            json!({ "ok": true, "removed": true })
        );
        assert_eq!(ack(Err("no".into())), json!({ "ok": false, "error": "no" }));
    }
}
