//! Payload verification: what a vehicle publishes is believed only once its origin is
//! checked (the tag of its device key). Its freshness (the counter, per vehicle and kind) is
//! checked by the fleet cache as it records the message, under the same lock.

use serde::de::DeserializeOwned;
use shared::{CodecError, Opened, Topic};

use super::keys::DeviceKeys;
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

/// Checks the tag of `payload`, received on `topic`, against the vehicle's key and decodes
/// it. The counter it returns is not checked yet.
///
/// # Errors
/// [`Rejection::Auth`] for a vehicle without a key or a tag that does not match,
/// [`Rejection::Decode`] for a payload that does not decode.
pub(crate) fn open<T: DeserializeOwned>(
    keys: &DeviceKeys,
    topic: &Topic,
    payload: &[u8],
) -> Result<Opened<T>, Rejected> {
    let key = keys
        .key(&topic.vehicle)
        .ok_or_else(|| Rejected::new(Rejection::Auth, "unknown device: no key provisioned"))?;
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
        assert_eq!(
            wrong_topic.map(|_| ()).map_err(|r| r.why),
            Err(Rejection::Auth)
        );
        let nobody = DeviceKeys::Provisioned(std::collections::HashMap::from([(
            VehicleId::new("v2").expect("valid"),
            [0; 32],
        )]));
        let unknown = open::<Heartbeat>(&nobody, &topic, &sealed);
        assert_eq!(unknown.map(|_| ()).map_err(|r| r.why), Err(Rejection::Auth));
        assert_eq!(Rejected::from(CodecError::Replayed).why, Rejection::Replay);
    }
}
