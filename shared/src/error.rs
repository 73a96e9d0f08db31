//! Typed errors of the wire contract. None of them is ever a panic: every malformed input
//! coming from the network maps to one of these variants.

use thiserror::Error;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IdError {
    /// The identifier is empty.
    #[error("identifier is empty")]
    Empty,
    /// The identifier is longer than the type's capacity.
    #[error("identifier is longer than {max} bytes")]
    TooLong {
        /// The capacity of the identifier type, in bytes.
        max: u8,
    },
    /// The identifier contains a character outside `[A-Za-z0-9_.-]`.
    #[error("identifier contains {found:?}; allowed are A-Z a-z 0-9 _ . -")]
    BadChar {
        /// The first offending character.
        found: char,
    },
}

/// Why a string is not a valid Fleetbeat topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TopicError {
    /// The topic does not have the `fleet/{fleet}/{vehicle}/{kind}` shape.
    #[error("topic does not have the shape fleet/{{fleet}}/{{vehicle}}/{{kind}}")]
    Shape,
    /// The last level names no known message kind.
    #[error("unknown topic kind (expected hb, event, status, cmd or ack)")]
    UnknownKind,
    /// The fleet level is not a valid [`FleetId`](crate::FleetId).
    #[error("invalid fleet id: {0}")]
    Fleet(IdError),
    /// The vehicle level is not a valid [`VehicleId`](crate::VehicleId).
    #[error("invalid vehicle id: {0}")]
    Vehicle(IdError),
}

/// Why a payload could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The payload has no bytes at all (not even the version byte).
    #[error("empty payload")]
    Empty,
    /// The payload carries a protocol version this code does not speak.
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion {
        /// The version byte found in the payload.
        found: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The body ended before the message was complete.
    #[error("truncated payload")]
    Truncated,
    /// The body is not a valid encoding of the expected message.
    #[error("malformed payload")]
    Malformed,
    /// A complete message was decoded but bytes were left over.
    #[error("{extra} unexpected trailing bytes")]
    TrailingBytes {
        /// How many bytes were left after the message.
        extra: u16,
    },
    /// A sealed payload's tag does not match: wrong key, altered bytes, or a payload moved
    /// from another vehicle's topic.
    #[error("authentication failed: the tag does not match the sender's key")]
    Unauthenticated,
    /// A sealed payload's counter is not newer than one already accepted: a replay.
    #[error("replayed: counter not newer than the last accepted one")]
    Replayed,
    /// The output buffer is too small for the encoded message.
    #[error("output buffer too small")]
    BufferFull,
}
