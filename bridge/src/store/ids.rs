//! The ids of the durable queue: who a message is for ([`ClientId`]) and the message's own
//! ([`MessageId`]). Below every other store module: they know no store.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who a queued message is for: a vendor's store (`vendor:{store}`) or a dispatcher identity
/// (`dispatch`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(String);

impl ClientId {
    /// The identity all dispatchers share.
    pub const DISPATCH: &'static str = "dispatch";

    /// The vendor store `store`: `vendor:{store}`, like its Socket.IO room.
    pub fn vendor(store: &str) -> Self {
        Self(format!("vendor:{store}"))
    }

    /// The dispatchers: `dispatch`.
    pub fn dispatch() -> Self {
        Self(Self::DISPATCH.to_owned())
    }

    /// The dispatcher identity `name` (a token's name): `dispatch:{name}`.
    pub(crate) fn dispatcher(name: &str) -> Self {
        Self(format!("dispatch:{name}"))
    }

    /// Whether this is a vendor's store (`vendor:{store}`).
    pub(crate) fn is_vendor(&self) -> bool {
        self.0.starts_with("vendor:")
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A queued message's id: unique across all clients, increasing, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A message just queued, to emit once the transaction that queued it has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Enqueued {
    /// Who it is for.
    pub client: ClientId,
    /// Its id.
    pub id: MessageId,
    /// What to send.
    pub payload: Value,
}
