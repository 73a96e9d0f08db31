//! The JSON mirror: device traffic republished as readable JSON for `mosquitto_sub`.
//!
//! Payloads on `fleet/{fleet}/{vehicle}/{kind}` are postcard, unreadable in a terminal. The
//! broker subscribes in-process (a rumqttd local link) to `fleet/+/+/{kind}`, decodes each payload
//! with the `shared` crate and publishes a JSON document on
//! `json/fleet/{fleet}/{vehicle}/{kind}`, at QoS 0, retained for `status` only (so a late
//! `mosquitto_sub` sees every vehicle's current status). See `docs/debugging.md` for recipes.
//!
//! What vehicles publish (`hb`, `event`, `status`, `ack`) is sealed (`shared::seal`): the
//! mirror checks the tag with the vehicle's key from the credentials file and says so in
//! `"origin"`: `"verified"`. In open mode the keys are public (derived from the vehicle id), so
//! a tag that checks proves nothing, and the origin says `"open mode: public key, not proof"`. A payload that does not decode becomes
//! `{"error": "...", "bytes": "<hex>"}`, so an engineer sees it instead of nothing:
//!
//! ```text
//! json/fleet/demo/demo-0001/hb     {"counter":1764230400123,"origin":"verified","seq":42,...}
//! json/fleet/demo/demo-0001/status {"counter":...,"origin":"verified","status":"online"}
//! json/fleet/demo/bad/hb           {"error":"unsupported protocol version 2 ...","bytes":"0201"}
//! ```
//!
//! The mirror never feeds itself: it subscribes to `fleet/+/+/{kind}` only, which no `json/...`
//! topic matches, one filter per kind, the filters the bridge uses (so no commit log of its
//! own). Heartbeats, nearly all of the traffic, are read and documented only while some
//! subscription may match a `json/...` topic (`json/...`, `+/...`, `#`; tracked by
//! [`MirrorWatchers`]): a broker nobody debugs does not forward, decode, check and republish
//! every one of them. Statuses, events, acks and commands are always mirrored.

use std::sync::Arc;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use shared::topic::kind_of;
use shared::{
    CodecError, Command, CommandAck, CommandKind, DeliveryEvent, DeviceKey, Heartbeat, Opened,
    Position, Status, StatusFlags, Topic, TopicKind, VehicleId,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::auth::Authenticator;
use crate::metrics::{BrokerMetrics, DropReason};
use crate::router::{hand_over, try_next};
use crate::watchers::{MIRROR_ROOT, MirrorWatchers};

/// What the mirror always reads: every kind but heartbeats, one filter per kind, the very
/// filters the bridge subscribes to. rumqttd keeps one commit log per filter, shared by its
/// subscribers, so the mirror adds no log of its own. None of them matches a `json/...` topic.
pub(crate) const ALWAYS: [TopicKind; 4] = [
    TopicKind::Status,
    TopicKind::Event,
    TopicKind::Ack,
    TopicKind::Command,
];

/// Heartbeats are read (`fleet/+/+/hb`) only while someone may read their mirror.
pub(crate) const WATCHED: TopicKind = TopicKind::Heartbeat;

/// Most documents handed to the router in one batch.
const MAX_BATCH: usize = 500;

/// The mirror topic of a device topic: `json/` in front.
fn mirror_topic(topic: &str) -> String {
    format!("{MIRROR_ROOT}/{topic}")
}

/// Where the mirror finds a vehicle's key.
#[derive(Debug, Clone)]
pub(crate) enum Keys {
    /// Open mode: every vehicle's public open-mode key.
    Open,
    /// The credentials file (reloaded when it changes).
    File(Arc<Authenticator>),
}

/// The origin of a sealed message whose tag checks, with the credentials file's keys.
const VERIFIED: &str = "verified";
/// The origin of a sealed message whose tag checks with the public open-mode key: anyone can
/// make that tag, so it proves nothing about who sent it.
const OPEN_MODE: &str = "open mode: public key, not proof";

impl Keys {
    /// What a tag that checks with these keys proves, as the `"origin"` says it.
    fn origin(&self) -> &'static str {
        match self {
            Keys::Open => OPEN_MODE,
            Keys::File(_) => VERIFIED,
        }
    }

    fn key(&self, vehicle: &VehicleId) -> Option<DeviceKey> {
        match self {
            Keys::Open => Some(shared::open_mode_key(vehicle)),
            Keys::File(auth) => auth.credentials().device(vehicle.as_str()).map(|d| d.key()),
        }
    }
}

/// The JSON document describing `payload` published on `topic`, and whether it decoded.
///
/// `key` is the sending vehicle's message key, if known: sealed kinds are then checked, and one
/// whose tag checks gets `origin` (what that proves: [`Keys::origin`]).
fn document(topic: &str, payload: &[u8], key: Option<&DeviceKey>, origin: &str) -> (Value, bool) {
    let parsed = match Topic::parse(topic) {
        Ok(parsed) => parsed,
        Err(err) => return (undecodable(&err.to_string(), payload), false),
    };
    let result = match parsed.kind {
        TopicKind::Heartbeat => sealed::<Heartbeat>(topic, payload, key, origin, heartbeat),
        TopicKind::Event => sealed::<DeliveryEvent>(topic, payload, key, origin, event),
        TopicKind::Status => sealed::<Status>(topic, payload, key, origin, status),
        TopicKind::Ack => sealed::<CommandAck>(topic, payload, key, origin, ack),
        TopicKind::Command => shared::decode::<Command>(payload)
            .map(|cmd| command(&cmd))
            .map_err(|err| undecodable(&err.to_string(), payload)),
    };
    match result {
        Ok(doc) => (doc, true),
        Err(doc) => (doc, false),
    }
}

fn undecodable(error: &str, payload: &[u8]) -> Value {
    json!({ "error": error, "bytes": hex::encode(payload) })
}

/// Opens a sealed payload: verified with `key` if there is one, else decoded unverified.
fn sealed<T: DeserializeOwned>(
    topic: &str,
    payload: &[u8],
    key: Option<&DeviceKey>,
    origin: &str,
    describe: fn(&T) -> Value,
) -> Result<Value, Value> {
    let with_origin = |counter: u64, origin: &str, msg: &T| {
        let mut doc = json!({ "counter": counter, "origin": origin });
        if let (Some(doc), Value::Object(fields)) = (doc.as_object_mut(), describe(msg)) {
            doc.extend(fields);
        }
        doc
    };
    match key {
        Some(key) => match shared::open::<T>(payload, topic, key) {
            Ok(opened) => Ok(with_origin(opened.counter, origin, &opened.msg)),
            Err(CodecError::Unauthenticated) => {
                // Show what it claims, clearly marked: that is what one debugs.
                let mut doc = undecodable(&CodecError::Unauthenticated.to_string(), payload);
                if let (Some(doc), Ok(claim)) =
                    (doc.as_object_mut(), shared::open_unverified::<T>(payload))
                {
                    doc.insert(
                        "unverified".to_owned(),
                        with_origin(claim.counter, "forged or wrong key", &claim.msg),
                    );
                }
                Err(doc)
            }
            Err(err) => Err(undecodable(&err.to_string(), payload)),
        },
        None => shared::open_unverified::<T>(payload)
            .map(|Opened { counter, msg }| {
                with_origin(counter, "unknown device: not verified", &msg)
            })
            .map_err(|err| undecodable(&err.to_string(), payload)),
    }
}

fn position(pos: &Position) -> Value {
    json!({ "lat": pos.lat(), "lon": pos.lon() })
}

fn heartbeat(hb: &Heartbeat) -> Value {
    let names = [
        (StatusFlags::MOVING, "moving"),
        (StatusFlags::IGNITION, "ignition"),
        (StatusFlags::LOW_BATTERY, "low_battery"),
        (StatusFlags::GPS_FIX, "gps_fix"),
        (StatusFlags::ON_ORDER, "on_order"),
    ];
    let flags: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| hb.flags.has(*bit))
        .map(|(_, name)| *name)
        .collect();
    json!({
        "seq": hb.seq,
        "ts_ms": hb.ts_ms,
        "lat": hb.pos.lat(),
        "lon": hb.pos.lon(),
        "speed_cm_s": hb.speed_cm_s,
        "heading_deg": hb.heading_deg,
        "battery_pct": hb.battery_pct,
        "flags": flags,
    })
}

fn event(ev: &DeliveryEvent) -> Value {
    json!({
        "seq": ev.seq,
        "order": ev.order.as_str(),
        "kind": ev.kind.as_str(),
        "ts_ms": ev.ts_ms,
        "lat": ev.pos.lat(),
        "lon": ev.pos.lon(),
    })
}

fn status(status: &Status) -> Value {
    match status {
        Status::Online => json!({ "status": "online" }),
        Status::Offline(reason) => json!({ "status": "offline", "reason": reason.as_str() }),
    }
}

fn ack(ack: &CommandAck) -> Value {
    json!({ "id": ack.id, "result": ack.result.as_str() })
}

fn command(cmd: &Command) -> Value {
    match &cmd.kind {
        CommandKind::Ping => json!({ "id": cmd.id, "command": "ping" }),
        CommandKind::SetRate { interval_ms } => {
            json!({ "id": cmd.id, "command": "set-rate", "interval_ms": interval_ms })
        }
        CommandKind::ReturnToDepot => json!({ "id": cmd.id, "command": "return-to-depot" }),
        CommandKind::AssignOrder {
            order,
            pickup,
            dropoff,
        } => json!({
            "id": cmd.id,
            "command": "assign-order",
            "order": order.as_str(),
            "pickup": position(pickup),
            "dropoff": position(dropoff),
        }),
        CommandKind::CancelOrder { order } => json!({
            "id": cmd.id,
            "command": "cancel-order",
            "order": order.as_str(),
        }),
    }
}

/// The mirror's connection to the router, subscribed to the [`ALWAYS`] kinds, and to
/// [`WATCHED`] while `watching` says someone may read it.
pub(crate) struct Mirror {
    tx: LinkTx,
    rx: LinkRx,
    keys: Keys,
    metrics: BrokerMetrics,
    /// Heartbeats are documented only while someone may read them.
    watchers: Arc<MirrorWatchers>,
    /// [`MirrorWatchers::any`], as it changes.
    watching: watch::Receiver<bool>,
    /// Whether a retained document carries `carry::RETAINED`.
    retain_wanted: crate::carry::RetainWanted,
}

impl Mirror {
    /// The mirror on a link already subscribed to the [`ALWAYS`] kinds.
    pub(crate) fn new(
        (tx, rx): (LinkTx, LinkRx),
        keys: Keys,
        metrics: BrokerMetrics,
        watchers: Arc<MirrorWatchers>,
        retain_wanted: crate::carry::RetainWanted,
    ) -> Mirror {
        Mirror {
            tx,
            rx,
            keys,
            metrics,
            watching: watchers.watch(),
            watchers,
            retain_wanted,
        }
    }

    /// Republishes until `stop` is cancelled or the router goes away.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(64);
        let mut reading_heartbeats = false;
        loop {
            let watched = *self.watching.borrow_and_update();
            if watched != reading_heartbeats {
                // Only while watched: otherwise the router would forward every heartbeat here
                // to be thrown away.
                let filter = WATCHED.filter();
                let sent = if watched {
                    self.tx.subscribe(filter)
                } else {
                    self.tx.unsubscribe(filter)
                };
                match sent {
                    Ok(_) => {
                        reading_heartbeats = watched;
                        // The router takes its links' packets in order: a heartbeat published
                        // after this is seen reaches the mirror.
                        self.metrics.set_mirror_heartbeats(watched);
                        debug!(watched, "JSON mirror of heartbeats switched");
                    }
                    Err(err) => {
                        warn!(cause = %err, "the JSON mirror lost its router link: mirror stopped");
                        return;
                    }
                }
            }
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                changed = self.watching.changed() => {
                    if changed.is_err() {
                        return; // the broker is gone
                    }
                    continue;
                }
                note = self.rx.next() => match note {
                    Ok(first) => first,
                    Err(err) => {
                        warn!(cause = %err, "the JSON mirror lost its router link: mirror stopped");
                        return;
                    }
                },
            };
            let mut unscheduled = false;
            let mut next = first;
            while let Some(notification) = next.take() {
                match notification {
                    Notification::Forward(forward) => {
                        if let Some(packet) = self.mirror(&forward.publish) {
                            batch.push(packet);
                        }
                    }
                    Notification::Unschedule => unscheduled = true,
                    _ => {}
                }
                if batch.len() >= MAX_BATCH {
                    self.publish(&mut batch).await;
                }
                next = try_next(&mut self.rx);
            }
            self.publish(&mut batch).await;
            if unscheduled && self.rx.wake().await.is_err() {
                return;
            }
        }
    }

    /// The mirror PUBLISH of one device message.
    fn mirror(&self, publish: &Publish) -> Option<Packet> {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return None;
        };
        let kind = kind_of(&publish.topic);
        if kind == Some(WATCHED) && !self.watchers.any() {
            // Nine messages in ten, and nobody is reading their mirror.
            return None;
        }
        let retain = kind == Some(TopicKind::Status);
        let target = mirror_topic(topic);
        let mut properties = None;
        crate::carry::mark(self.retain_wanted.mark(retain), None, &mut properties);
        if publish.payload.is_empty() && retain {
            // A cleared retained status clears its mirror too.
            let clear = Publish::new(Bytes::from(target), Bytes::new(), true);
            return Some(Packet::Publish(clear, properties));
        }
        let key = Topic::parse(topic)
            .ok()
            .and_then(|t| self.keys.key(&t.vehicle));
        let (doc, decoded) = document(topic, &publish.payload, key.as_ref(), self.keys.origin());
        self.metrics.mirror_published(decoded);
        let doc = Bytes::from(doc.to_string());
        Some(Packet::Publish(
            Publish::new(Bytes::from(target), doc, retain),
            properties,
        ))
    }

    async fn publish(&mut self, batch: &mut Vec<Packet>) {
        let Some(last) = batch.pop() else {
            return;
        };
        let count = batch.len() + 1;
        batch.push(last);
        if let Err(err) = hand_over(&mut self.tx, batch).await {
            for _ in 0..count {
                self.metrics.dropped(DropReason::Mirror);
            }
            debug!(cause = %err, "the JSON mirror could not publish");
        }
    }
}

#[cfg(test)]
mod tests {
    use shared::{AckResult, DeliveryKind, OfflineReason, OrderId};

    use super::*;

    const TOPIC: &str = "fleet/demo/demo-0001/hb";
    const KEY: DeviceKey = [7; 32];

    fn hb() -> Heartbeat {
        Heartbeat {
            seq: 42,
            ts_ms: 1_764_230_400_000,
            pos: Position::new(525_200_000, 134_050_000),
            speed_cm_s: 1389,
            heading_deg: 270,
            battery_pct: 87,
            flags: StatusFlags(StatusFlags::MOVING | StatusFlags::GPS_FIX),
        }
    }

    fn sealed_bytes<T: serde::Serialize>(msg: &T, topic: &str, key: &DeviceKey) -> Vec<u8> {
        let mut buf = [0u8; 256];
        shared::seal(msg, topic, 1_000, key, &mut buf)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn verified_heartbeat_is_readable() {
        let payload = sealed_bytes(&hb(), TOPIC, &KEY);
        let (doc, decoded) = document(TOPIC, &payload, Some(&KEY), VERIFIED);
        assert!(decoded);
        assert_eq!(
            doc,
            json!({
                "counter": 1000, "origin": "verified", "seq": 42, "ts_ms": 1_764_230_400_000u64,
                "lat": 52.52, "lon": 13.405, "speed_cm_s": 1389, "heading_deg": 270,
                "battery_pct": 87, "flags": ["moving", "gps_fix"],
            })
        );
    }

    #[test]
    fn wrong_key_is_an_error_showing_the_claim() {
        let payload = sealed_bytes(&hb(), TOPIC, &[1; 32]);
        let (doc, decoded) = document(TOPIC, &payload, Some(&KEY), VERIFIED);
        assert!(!decoded);
        assert!(
            doc["error"]
                .as_str()
                .unwrap()
                .contains("authentication failed")
        );
        assert_eq!(doc["bytes"], hex::encode(&payload));
        assert_eq!(doc["unverified"]["seq"], 42);
        assert_eq!(doc["unverified"]["origin"], "forged or wrong key");
    }

    #[test]
    fn unknown_device_is_decoded_unverified() {
        let payload = sealed_bytes(&hb(), TOPIC, &KEY);
        let (doc, decoded) = document(TOPIC, &payload, None, VERIFIED);
        assert!(decoded);
        assert_eq!(doc["origin"], "unknown device: not verified");
        assert_eq!(doc["seq"], 42);
    }

    #[test]
    fn garbage_is_shown_as_hex() {
        let (doc, decoded) = document(TOPIC, &[2, 1], Some(&KEY), VERIFIED);
        assert!(!decoded);
        assert_eq!(
            doc,
            json!({
                "error": "unsupported protocol version 2 (this build speaks 1)",
                "bytes": "0201",
            })
        );
        let (doc, _) = document(TOPIC, &[], None, VERIFIED);
        assert_eq!(doc["error"], "empty payload");
        let (doc, decoded) = document("fleet/demo/demo-0001/gps", b"hi", None, VERIFIED);
        assert!(!decoded);
        assert_eq!(doc["bytes"], "6869");
        assert!(
            doc["error"]
                .as_str()
                .unwrap()
                .contains("unknown topic kind")
        );
    }

    #[test]
    fn every_kind_has_a_readable_form() {
        let topic = |kind: &str| format!("fleet/demo/demo-0001/{kind}");
        let status_topic = topic("status");
        let offline = Status::Offline(OfflineReason::ConnectionLost);
        let (doc, _) = document(
            &status_topic,
            &sealed_bytes(&offline, &status_topic, &KEY),
            Some(&KEY),
            VERIFIED,
        );
        assert_eq!(doc["status"], "offline");
        assert_eq!(doc["reason"], "connection-lost");

        let event_topic = topic("event");
        let ev = DeliveryEvent {
            seq: 3,
            order: OrderId::new("ord-1").unwrap(),
            kind: DeliveryKind::InTransit,
            ts_ms: 1000,
            pos: Position::new(0, 0),
        };
        let (doc, _) = document(
            &event_topic,
            &sealed_bytes(&ev, &event_topic, &KEY),
            Some(&KEY),
            VERIFIED,
        );
        assert_eq!(doc["order"], "ord-1");
        assert_eq!(doc["kind"], "in-transit");

        let ack_topic = topic("ack");
        let answer = CommandAck {
            id: 7,
            result: AckResult::Busy,
        };
        let (doc, _) = document(
            &ack_topic,
            &sealed_bytes(&answer, &ack_topic, &KEY),
            Some(&KEY),
            VERIFIED,
        );
        assert_eq!(
            (doc["id"].clone(), doc["result"].clone()),
            (json!(7), json!("busy"))
        );

        // Commands are not sealed.
        let (doc, decoded) = document(&topic("cmd"), &[1, 7, 0], None, VERIFIED);
        assert!(decoded);
        assert_eq!(doc, json!({ "id": 7, "command": "ping" }));
        let set_rate = shared::encode_vec(&Command {
            id: 8,
            kind: CommandKind::SetRate { interval_ms: 500 },
        })
        .unwrap();
        let (doc, _) = document(&topic("cmd"), &set_rate, None, VERIFIED);
        assert_eq!(doc["interval_ms"], 500);
    }

    #[test]
    fn mirror_topics_never_match_the_source_filter() {
        assert_eq!(mirror_topic(TOPIC), "json/fleet/demo/demo-0001/hb");
        assert!(!mirror_topic(TOPIC).starts_with("fleet/"));
        for kind in ALWAYS.iter().chain([&WATCHED]) {
            assert!(
                kind.filter().starts_with("fleet/"),
                "never a json/... topic"
            );
        }
        assert!(!ALWAYS.contains(&WATCHED));
    }

    #[test]
    fn counters_are_read_without_the_key() {
        // Sealed payloads with a made-up tag: version, counter (a postcard varint), body, tag.
        let unverified = |counter_and_body: &[u8]| {
            let mut payload = vec![shared::PROTOCOL_VERSION];
            payload.extend_from_slice(counter_and_body);
            payload.extend_from_slice(&[0; shared::seal::TAG_LEN]);
            document("fleet/demo/demo-0001/status", &payload, None, VERIFIED)
        };
        // Status::Online is the single byte 0.
        assert_eq!(unverified(&[0x05, 0]).0["counter"], 5);
        assert_eq!(unverified(&[0xE8, 0x07, 0]).0["counter"], 1000);
        let (doc, decoded) = unverified(&[0x80]);
        assert!(!decoded && doc["error"].is_string(), "{doc}");
        let (doc, decoded) = unverified(&[0xFF; 11]);
        assert!(!decoded && doc["error"].is_string(), "{doc}");
    }
}
