//! What bridges tell each other through Redis, and where: the channel every bridge publishes
//! its tick's news on, the hash per fleet that holds every vehicle's latest state, and their
//! JSON encoding.
//!
//! JSON rather than postcard: a tick's news is a few hundred short records, so the size and the
//! encoding time do not matter next to the round trip, while `redis-cli HGETALL
//! fleetbeat:vehicles:north` and `SUBSCRIBE fleetbeat:news` stay readable to an operator. The
//! format carries a version (`v`); a bridge ignores news of a version it does not know.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shared::{FleetId, Heartbeat, VehicleId};

use crate::domain::fleet::{Liveness, SharedVehicle, known_reason};

/// The channel every bridge publishes its news on, once per tick.
pub(crate) const CHANNEL: &str = "fleetbeat:news";

/// The prefix of the hashes of latest states, one per fleet (`fleetbeat:vehicles:{fleet}`,
/// field = vehicle id).
pub(crate) const HASH_PREFIX: &str = "fleetbeat:vehicles:";

/// The version of the encoding below.
const VERSION: u8 = 1;

/// The hash holding the latest states of `fleet`'s vehicles.
pub(crate) fn hash_key(fleet: &FleetId) -> String {
    format!("{HASH_PREFIX}{}", fleet.as_str())
}

/// Why news from Redis was not used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NewsError {
    /// Not JSON of the expected shape.
    #[error("undecodable cluster news: {0}")]
    Json(#[from] serde_json::Error),
    /// Another version of the format.
    #[error("cluster news of version {0}, expected {VERSION}")]
    Version(u8),
    /// A vehicle or fleet id, a liveness or a reason that is not valid.
    #[error("invalid {0} in cluster news")]
    Invalid(&'static str),
}

/// One vehicle's state as stored in its fleet's hash and carried in news.
#[derive(Debug, Serialize, Deserialize)]
struct StateJson<'a> {
    v: u8,
    fleet: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    hb: Option<Heartbeat>,
    liveness: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    last_seen_ms: u64,
    heard_ms: u64,
    /// Absent in the news of a bridge of an earlier version (`None`: ordered by `heard_ms`
    /// alone, as that version does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status_counter: Option<u64>,
    interval_ms: u64,
}

impl<'a> StateJson<'a> {
    fn of(state: &'a SharedVehicle) -> Self {
        Self {
            v: VERSION,
            fleet: state.fleet.as_str(),
            id: state.vehicle.as_str(),
            hb: state.heartbeat,
            liveness: state.liveness.as_str(),
            reason: state.reason,
            last_seen_ms: state.last_seen_ms,
            heard_ms: state.heard_ms,
            status_counter: state.status_counter,
            interval_ms: u64::try_from(state.interval.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn into_state(self) -> Result<SharedVehicle, NewsError> {
        if self.v != VERSION {
            return Err(NewsError::Version(self.v));
        }
        let reason = match self.reason {
            None => None,
            Some(reason) => Some(known_reason(reason).ok_or(NewsError::Invalid("reason"))?),
        };
        Ok(SharedVehicle {
            vehicle: VehicleId::new(self.id).map_err(|_| NewsError::Invalid("vehicle id"))?,
            fleet: FleetId::new(self.fleet).map_err(|_| NewsError::Invalid("fleet id"))?,
            heartbeat: self.hb,
            liveness: Liveness::parse(self.liveness).ok_or(NewsError::Invalid("liveness"))?,
            reason,
            last_seen_ms: self.last_seen_ms,
            heard_ms: self.heard_ms,
            status_counter: self.status_counter,
            interval: Duration::from_millis(self.interval_ms),
        })
    }
}

/// One tick's news of one bridge, as published on [`CHANNEL`].
#[derive(Debug, Serialize, Deserialize)]
struct NewsJson<'a> {
    v: u8,
    from: &'a str,
    #[serde(borrow)]
    vehicles: Vec<StateJson<'a>>,
}

/// Encodes one vehicle's state for its fleet's hash.
pub(crate) fn encode_state(state: &SharedVehicle) -> Result<String, NewsError> {
    Ok(serde_json::to_string(&StateJson::of(state))?)
}

/// Decodes a value of a fleet's hash.
///
/// # Errors
/// [`NewsError`] if it is not a valid state of this version.
pub(crate) fn decode_state(bytes: &[u8]) -> Result<SharedVehicle, NewsError> {
    serde_json::from_slice::<StateJson<'_>>(bytes)?.into_state()
}

/// Encodes a tick's news of the bridge `from`.
pub(crate) fn encode_news(from: &str, states: &[SharedVehicle]) -> Result<String, NewsError> {
    let news = NewsJson {
        v: VERSION,
        from,
        vehicles: states.iter().map(StateJson::of).collect(),
    };
    Ok(serde_json::to_string(&news)?)
}

/// Decoded news: who sent it, and the states (each decoded on its own: one invalid state does
/// not hide the others).
pub(crate) struct News {
    /// The instance id of the bridge that published it.
    pub(crate) from: String,
    /// The states, or why one could not be used.
    pub(crate) states: Vec<Result<SharedVehicle, NewsError>>,
}

/// Decodes news published on [`CHANNEL`].
///
/// # Errors
/// [`NewsError`] if it is not news of this version.
pub(crate) fn decode_news(bytes: &[u8]) -> Result<News, NewsError> {
    let news: NewsJson<'_> = serde_json::from_slice(bytes)?;
    if news.v != VERSION {
        return Err(NewsError::Version(news.v));
    }
    Ok(News {
        from: news.from.to_owned(),
        states: news
            .vehicles
            .into_iter()
            .map(StateJson::into_state)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SharedVehicle {
        SharedVehicle {
            vehicle: VehicleId::new("van-7").unwrap(),
            fleet: FleetId::new("north").unwrap(),
            heartbeat: Some(Heartbeat {
                seq: 9,
                ts_ms: 1_700_000_000_000,
                speed_cm_s: 1200,
                heading_deg: 90,
                battery_pct: 80,
                ..Heartbeat::default()
            }),
            liveness: Liveness::Offline,
            reason: Some("connection-lost"),
            last_seen_ms: 1_700_000_000_100,
            heard_ms: 1_700_000_000_200,
            status_counter: Some(1_700_000_000_001),
            interval: Duration::from_millis(1000),
        }
    }

    #[test]
    fn states_and_news_round_trip() {
        let s = state();
        assert_eq!(
            decode_state(encode_state(&s).unwrap().as_bytes()).unwrap(),
            s
        );
        let news = encode_news("bridge-a", &[s.clone(), s.clone()]).unwrap();
        let decoded = decode_news(news.as_bytes()).unwrap();
        assert_eq!(decoded.from, "bridge-a");
        assert_eq!(decoded.states.len(), 2);
        assert_eq!(decoded.states[0].as_ref().unwrap(), &s);
    }

    /// A state from a bridge of an earlier version has no status counter: it decodes without
    /// one (ordered by when it was heard alone), and a bridge of that version ignores the
    /// field (its decoder does not refuse unknown fields).
    #[test]
    fn a_state_without_a_status_counter_decodes_with_zero() {
        let json = encode_state(&state()).unwrap();
        assert!(json.contains("\"status_counter\":1700000000001"), "{json}");
        let old = json.replace(",\"status_counter\":1700000000001", "");
        assert_ne!(old, json);
        let decoded = decode_state(old.as_bytes()).unwrap();
        assert_eq!(decoded.status_counter, None);
        assert_eq!(decoded.heard_ms, state().heard_ms);
    }

    #[test]
    fn other_versions_and_bad_states_are_refused() {
        let json = encode_state(&state())
            .unwrap()
            .replace("\"v\":1", "\"v\":2");
        assert!(matches!(
            decode_state(json.as_bytes()),
            Err(NewsError::Version(2))
        ));
        let json = encode_state(&state())
            .unwrap()
            .replace("connection-lost", "bored");
        assert!(matches!(
            decode_state(json.as_bytes()),
            Err(NewsError::Invalid("reason"))
        ));
        assert!(decode_news(b"not json").is_err());
        let bad_one = encode_news("a", &[state()])
            .unwrap()
            .replace("\"offline\"", "\"sleepy\"");
        let news = decode_news(bad_one.as_bytes()).unwrap();
        assert!(matches!(
            news.states[0],
            Err(NewsError::Invalid("liveness"))
        ));
    }
}
