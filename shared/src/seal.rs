//! Sealed payloads: proof of origin and freshness for what a vehicle publishes.
//!
//! Fleetbeat's own broker authenticates connections and confines each device to its own topics
//! with ACLs, but the bridge may run against any external MQTT broker, whose ACLs it cannot
//! know, and a message passes through the broker's hands. Every payload a vehicle publishes
//! (`hb`, `event`, `status`, `ack`) is therefore sealed with that vehicle's own 32-byte key, so
//! its origin is proven end to end, whatever broker carried it:
//!
//! ```text
//! +---------+-------------------+----------------+---------------------------+
//! | version | counter           | postcard body  | tag                       |
//! | 1 byte  | varint u64        | the message    | 8 bytes                   |
//! +---------+-------------------+----------------+---------------------------+
//! tag = HMAC-SHA256(key, topic ‖ 0x00 ‖ version ‖ counter ‖ body)[..8]
//! ```
//!
//! The tag binds the payload to its topic, so it cannot be moved to another vehicle's topic,
//! and the counter, which strictly increases per vehicle, lets the receiver refuse replays
//! (see [`ReplayGuard`]). A device draws counters from a [`Counter`]: milliseconds of its clock,
//! bumped when two messages fall in the same millisecond, so it survives reboots without
//! storing anything.
//!
//! In open mode (the local demo, no credentials) every vehicle's key is derived from its id
//! with [`open_mode_key`]: the format stays the same but proves nothing.

use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

use crate::codec::PROTOCOL_VERSION;
use crate::error::CodecError;
use crate::id::VehicleId;
use crate::topic::TopicKind;

/// A vehicle's message key.
pub type DeviceKey = [u8; 32];

/// Length of the truncated HMAC-SHA256 tag.
pub const TAG_LEN: usize = 8;

/// The largest overhead sealing adds to a postcard body: the version byte, a 10-byte varint
/// counter and the tag.
pub const SEAL_OVERHEAD: usize = 1 + 10 + TAG_LEN;

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &DeviceKey, topic: &str, signed: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail for a 32-byte key.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(topic.as_bytes());
    mac.update(&[0]);
    mac.update(signed);
    mac
}

/// Seals `msg` for publication on `topic` with `counter` and `key`, into `buf`.
///
/// # Errors
/// [`CodecError::BufferFull`] if `buf` is too small.
pub fn seal<'a, T: Serialize>(
    msg: &T,
    topic: &str,
    counter: u64,
    key: &DeviceKey,
    buf: &'a mut [u8],
) -> Result<&'a mut [u8], CodecError> {
    let (version, rest) = buf.split_first_mut().ok_or(CodecError::BufferFull)?;
    *version = PROTOCOL_VERSION;
    let counter_len = postcard::to_slice(&counter, rest)
        .map_err(|_| CodecError::BufferFull)?
        .len();
    let body_len = postcard::to_slice(msg, &mut rest[counter_len..])
        .map_err(|_| CodecError::BufferFull)?
        .len();
    let signed_len = 1 + counter_len + body_len;
    let total = signed_len + TAG_LEN;
    if buf.len() < total {
        return Err(CodecError::BufferFull);
    }
    let (signed, tag) = buf[..total].split_at_mut(signed_len);
    sign(key, topic, signed, tag);
    Ok(&mut buf[..total])
}

/// Writes the tag of `signed` for `topic` into `tag` ([`TAG_LEN`] bytes). Not inlined: one
/// HMAC state on the stack, only while it is computed (a device's stack is small).
#[inline(never)]
fn sign(key: &DeviceKey, topic: &str, signed: &[u8], tag: &mut [u8]) {
    let full = mac(key, topic, signed).finalize().into_bytes();
    tag.copy_from_slice(&full[..TAG_LEN]);
}

/// A payload whose tag checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened<T> {
    /// The sender's counter: check it with a [`ReplayGuard`].
    pub counter: u64,
    /// The message.
    pub msg: T,
}

/// Checks the tag of a payload received on `topic` and decodes it.
///
/// The tag is checked (in constant time) before anything else is believed.
///
/// # Errors
/// [`CodecError::Unauthenticated`] if the tag does not match (wrong key, altered bytes, or a
/// payload moved from another topic); otherwise the decoding errors of
/// [`decode`](crate::codec::decode).
pub fn open<T: DeserializeOwned>(
    payload: &[u8],
    topic: &str,
    key: &DeviceKey,
) -> Result<Opened<T>, CodecError> {
    let (signed, tag) = split_sealed(payload)?;
    mac(key, topic, signed)
        .verify_truncated_left(tag)
        .map_err(|_| CodecError::Unauthenticated)?;
    decode_signed(signed)
}

/// Decodes a sealed payload **without** checking its tag: version, counter, body.
///
/// For readers that show traffic but cannot judge it (the broker's JSON mirror for a device
/// whose key it does not hold, a debugging tool): what it returns proves nothing about who sent
/// it. Everything that acts on a message uses [`open`].
///
/// # Errors
/// The decoding errors of [`open`], except [`CodecError::Unauthenticated`].
pub fn open_unverified<T: DeserializeOwned>(payload: &[u8]) -> Result<Opened<T>, CodecError> {
    let (signed, _tag) = split_sealed(payload)?;
    decode_signed(signed)
}

/// Checks the version and splits a sealed payload into the signed part (version, counter,
/// body) and the tag.
fn split_sealed(payload: &[u8]) -> Result<(&[u8], &[u8]), CodecError> {
    crate::codec::check_version(payload)?;
    if payload.len() < 2 + TAG_LEN {
        return Err(CodecError::Truncated);
    }
    Ok(payload.split_at(payload.len() - TAG_LEN))
}

/// Decodes the counter and the message of the signed part (after the version byte).
fn decode_signed<T: DeserializeOwned>(signed: &[u8]) -> Result<Opened<T>, CodecError> {
    let (counter, body) =
        postcard::take_from_bytes::<u64>(&signed[1..]).map_err(|_| CodecError::Malformed)?;
    let msg = crate::codec::decode_body(body)?;
    Ok(Opened { counter, msg })
}

/// The key of `vehicle` in open mode (no credentials): public, so it proves nothing, but it
/// keeps one wire format for both modes.
#[inline(never)]
pub fn open_mode_key(vehicle: &VehicleId) -> DeviceKey {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(b"fleetbeat open mode: no origin guarantee")
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(vehicle.as_str().as_bytes());
    mac.finalize().into_bytes().into()
}

/// A device's message counter: strictly increasing, anchored to its clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    last: u64,
}

impl Counter {
    /// A counter that has issued nothing yet.
    pub const fn new() -> Self {
        Self { last: 0 }
    }

    /// The next counter value: `now_ms`, or one more than the last value if the clock has
    /// not moved on (or went backwards).
    pub fn next(&mut self, now_ms: u64) -> u64 {
        self.last = now_ms.max(self.last.saturating_add(1));
        self.last
    }
}

/// A receiver's memory of the highest counter seen per topic kind of one vehicle.
///
/// Kinds are tracked separately because a last will is sealed when the device connects but
/// published by the broker only when the connection is lost: its counter is older than the
/// heartbeats in between, yet newer than every earlier status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayGuard {
    last: [u64; TopicKind::ALL.len()],
}

impl ReplayGuard {
    /// Accepts `counter` for `kind` if it is newer than every counter seen for that kind.
    ///
    /// # Errors
    /// [`CodecError::Replayed`] if it is not (a replay, or a duplicate).
    pub fn check(&mut self, kind: TopicKind, counter: u64) -> Result<(), CodecError> {
        let last = &mut self.last[kind as usize];
        if counter <= *last {
            return Err(CodecError::Replayed);
        }
        *last = counter;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::MAX_PAYLOAD;
    use crate::wire::{Heartbeat, OfflineReason, Status};

    const KEY: DeviceKey = [7; 32];
    const TOPIC: &str = "fleet/demo/demo-0001/status";

    #[test]
    fn golden_sealed_status() {
        let mut buf = [0u8; MAX_PAYLOAD];
        let sealed = seal(&Status::Online, TOPIC, 300, &KEY, &mut buf).expect("fits");
        // version, counter 300, body (Online), then the tag.
        // The tag was computed independently with Python's hmac module.
        assert_eq!(
            sealed,
            &[1, 0xac, 0x02, 0, 117, 9, 104, 188, 13, 244, 114, 217],
            "encoding changed: that is a protocol change"
        );
        let opened = open::<Status>(sealed, TOPIC, &KEY).expect("authentic");
        assert_eq!(
            opened,
            Opened {
                counter: 300,
                msg: Status::Online
            }
        );
    }

    #[test]
    fn wrong_key_topic_or_bytes_are_refused() {
        let mut buf = [0u8; MAX_PAYLOAD];
        let sealed = seal(
            &Status::Offline(OfflineReason::Shutdown),
            TOPIC,
            1,
            &KEY,
            &mut buf,
        )
        .expect("fits")
        .to_vec();
        assert_eq!(
            open::<Status>(&sealed, TOPIC, &[8; 32]),
            Err(CodecError::Unauthenticated)
        );
        assert_eq!(
            open::<Status>(&sealed, "fleet/demo/demo-0002/status", &KEY),
            Err(CodecError::Unauthenticated)
        );
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x40;
            assert!(
                open::<Status>(&altered, TOPIC, &KEY).is_err(),
                "byte {i} altered"
            );
        }
        assert_eq!(
            open::<Status>(&sealed[..5], TOPIC, &KEY),
            Err(CodecError::Truncated)
        );
        assert_eq!(open::<Status>(&[], TOPIC, &KEY), Err(CodecError::Empty));
    }

    #[test]
    fn sealed_heartbeat_stays_small() {
        let hb = Heartbeat::sample();
        let mut buf = [0u8; MAX_PAYLOAD];
        let topic = "fleet/demo/demo-0001/hb";
        let sealed = seal(&hb, topic, 1_764_230_400_000, &KEY, &mut buf).expect("fits");
        assert!(sealed.len() <= 40, "{} bytes", sealed.len());
        assert_eq!(
            open::<Heartbeat>(sealed, topic, &KEY).map(|o| o.msg),
            Ok(hb)
        );
    }

    #[test]
    fn open_unverified_reads_without_the_key() {
        let vehicle = VehicleId::new("van-1").expect("valid");
        let key = open_mode_key(&vehicle);
        let status = Status::Online;
        let mut buf = [0u8; 64];
        let sealed = seal(&status, "fleet/f/van-1/status", 42, &key, &mut buf).expect("fits");
        let mut forged = sealed.to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 0xFF;
        assert_eq!(
            open::<Status>(&forged, "fleet/f/van-1/status", &key),
            Err(CodecError::Unauthenticated)
        );
        assert_eq!(
            open_unverified::<Status>(&forged),
            Ok(Opened {
                counter: 42,
                msg: Status::Online
            })
        );
        assert_eq!(open_unverified::<Status>(&[]), Err(CodecError::Empty));
        assert!(matches!(
            open_unverified::<Status>(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(CodecError::UnsupportedVersion { found: 9, .. })
        ));
        assert_eq!(
            open_unverified::<Status>(&[1, 0, 0]),
            Err(CodecError::Truncated)
        );
    }

    #[test]
    fn counters_increase_and_replays_are_refused() {
        let mut counter = Counter::new();
        assert_eq!(counter.next(1000), 1000);
        assert_eq!(counter.next(1000), 1001);
        assert_eq!(
            counter.next(900),
            1002,
            "a clock going back does not reuse values"
        );
        assert_eq!(counter.next(5000), 5000);

        let mut guard = ReplayGuard::default();
        assert_eq!(guard.check(TopicKind::Heartbeat, 10), Ok(()));
        assert_eq!(
            guard.check(TopicKind::Heartbeat, 10),
            Err(CodecError::Replayed)
        );
        assert_eq!(
            guard.check(TopicKind::Heartbeat, 9),
            Err(CodecError::Replayed)
        );
        // A last will sealed at connect time is older than the heartbeats but newer than the
        // status before it.
        assert_eq!(guard.check(TopicKind::Status, 5), Ok(()));
        assert_eq!(guard.check(TopicKind::Status, 6), Ok(()));
        assert_eq!(guard.check(TopicKind::Status, 6), Err(CodecError::Replayed));
    }

    #[test]
    fn open_mode_keys_differ_per_vehicle() {
        let a = open_mode_key(&VehicleId::new("a").expect("valid"));
        let b = open_mode_key(&VehicleId::new("b").expect("valid"));
        assert_ne!(a, b);
    }
}
