//! Payload verification: what a vehicle publishes is believed only once its origin is
//! checked (the tag of its device key). Its freshness (the counter, per vehicle and kind) is
//! checked by the fleet cache as it records the message, under the same lock.

use serde::de::DeserializeOwned;
use shared::{CodecError, Opened, Topic};

use super::keys::{DeviceKeys, Lookup};
use crate::metrics::Rejection;

/// Why a message from a vehicle was not accepted, for the counters and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejected {
    /// The reason, as counted.
    pub(crate) why: Rejection,
    /// What exactly was wrong.
    pub(crate) cause: String,
}

impl Rejected {
    /// A rejection for `why`, explained by `cause`.
    pub(crate) fn new(why: Rejection, cause: impl Into<String>) -> Self {
        Self {
            why,
            cause: cause.into(),
        }
    }
}

impl From<CodecError> for Rejected {
    fn from(err: CodecError) -> Self {
        let why = match err {
            CodecError::Unauthenticated => Rejection::Auth,
            CodecError::Replayed => Rejection::Replay,
            _ => Rejection::Decode,
        };
        Self::new(why, err.to_string())
    }
}

/// Why a vehicle's message was not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unopened {
    /// Rejected for good: counted, logged, and (QoS 1) acknowledged.
    Rejected(Rejected),
    /// The bridge has no key for the vehicle (yet): a QoS 1 message is held unacknowledged
    /// until the credentials file gives one; a heartbeat is counted as unauthenticated.
    NoKey,
}

impl From<Rejected> for Unopened {
    fn from(rejected: Rejected) -> Self {
        Self::Rejected(rejected)
    }
}

impl From<CodecError> for Unopened {
    fn from(err: CodecError) -> Self {
        Self::Rejected(err.into())
    }
}

/// Checks that `topic` is under the vehicle's fleet (when the credentials say it), then the
/// tag of `payload` against the vehicle's key, and decodes it. The counter it returns is not
/// checked yet.
///
/// # Errors
/// [`Unopened::NoKey`] for a vehicle without a key; [`Rejection::Revoked`] for one whose key
/// was removed from the credentials file; [`Rejection::Fleet`] for a topic under another
/// fleet than the vehicle's; [`Rejection::Auth`] for a tag that does not match;
/// [`Rejection::Decode`] for a payload that does not decode.
pub(crate) fn open<T: DeserializeOwned>(
    keys: &DeviceKeys,
    topic: &Topic,
    payload: &[u8],
) -> Result<Opened<T>, Unopened> {
    let key = match keys.lookup(&topic.vehicle) {
        Lookup::Known(key, fleet) => {
            if let Some(fleet) = fleet.filter(|fleet| *fleet != topic.fleet) {
                return Err(Rejected::new(
                    Rejection::Fleet,
                    format!("the vehicle belongs to fleet {fleet}, not {}", topic.fleet),
                )
                .into());
            }
            key
        }
        Lookup::Revoked => {
            return Err(Rejected::new(
                Rejection::Revoked,
                "the vehicle's key was removed from the credentials file",
            )
            .into());
        }
        Lookup::Unknown => return Err(Unopened::NoKey),
    };
    Ok(shared::open::<T>(payload, &topic.name(), &key)?)
}

#[cfg(test)]
mod tests {
    use shared::{Heartbeat, TopicKind, VehicleId};

    use super::*;

    #[test]
    fn origin_is_checked_before_anything_is_believed() {
        let topic = Topic::parse("fleet/demo/v1/hb").expect("valid");
        let key = shared::open_mode_key(&topic.vehicle);
        let mut buf = [0u8; 64];
        let sealed = shared::seal(&Heartbeat::default(), &topic.name(), 5, &key, &mut buf)
            .expect("seals")
            .to_vec();
        let opened: Opened<Heartbeat> = open(&DeviceKeys::Open, &topic, &sealed).expect("opens");
        assert_eq!(opened.counter, 5);

        let moved = topic.with_kind(TopicKind::Status);
        let wrong_topic = open::<Heartbeat>(&DeviceKeys::Open, &moved, &sealed);
        assert_eq!(why(wrong_topic), Some(Rejection::Auth));
        assert_eq!(Rejected::from(CodecError::Replayed).why, Rejection::Replay);
    }

    fn why<T>(opened: Result<Opened<T>, Unopened>) -> Option<Rejection> {
        match opened {
            Err(Unopened::Rejected(r)) => Some(r.why),
            _ => None,
        }
    }

    /// With credentials: the fleet is the credentials' (never the topic's), an unknown vehicle
    /// waits for its key, a revoked one is refused.
    #[test]
    fn credentials_decide_key_and_fleet() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("credentials.toml");
        let phc = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let key = [7u8; 32];
        std::fs::write(
            &path,
            format!(
                "[devices.v1]\nfleet = \"north\"\npassword = \"{phc}\"\nkey = \"{}\"\n",
                hex_key(&key)
            ),
        )
        .expect("write");
        let keys = DeviceKeys::load(&path, std::sync::Arc::default()).expect("loads");
        let sealed = |topic: &Topic| {
            let mut buf = [0u8; 64];
            shared::seal(&Heartbeat::default(), &topic.name(), 5, &key, &mut buf)
                .expect("seals")
                .to_vec()
        };
        let home = Topic::parse("fleet/north/v1/hb").expect("valid");
        assert!(open::<Heartbeat>(&keys, &home, &sealed(&home)).is_ok());
        let away = Topic::parse("fleet/south/v1/hb").expect("valid");
        assert_eq!(
            why(open::<Heartbeat>(&keys, &away, &sealed(&away))),
            Some(Rejection::Fleet)
        );
        let stranger = Topic::parse("fleet/north/v2/hb").expect("valid");
        assert!(matches!(
            open::<Heartbeat>(&keys, &stranger, &sealed(&stranger)),
            Err(Unopened::NoKey)
        ));
        assert_eq!(
            VehicleId::new("v1").ok().and_then(|v| keys.key(&v)),
            Some(key)
        );
    }

    fn hex_key(key: &[u8; 32]) -> String {
        key.iter().map(|b| format!("{b:02x}")).collect()
    }
}
