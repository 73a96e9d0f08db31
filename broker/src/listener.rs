//! [`Listener`]: which of the broker's two MQTT listeners (3.1.1 or 5) something is about.

use std::fmt;

/// One of the broker's two MQTT listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// The MQTT 3.1.1 listener (protocol level 4), [`BrokerConfig::v4`](crate::BrokerConfig::v4).
    V4,
    /// The MQTT 5 listener, [`BrokerConfig::v5`](crate::BrokerConfig::v5).
    V5,
}

impl Listener {
    /// Both listeners, v4 first.
    pub(crate) const ALL: [Listener; 2] = [Listener::V4, Listener::V5];

    /// The listener's name in metrics and logs: `v4` or `v5`.
    pub const fn label(self) -> &'static str {
        match self {
            Listener::V4 => "v4",
            Listener::V5 => "v5",
        }
    }

    /// The listener's position in [`Listener::ALL`].
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Listener::V4 => "v4 (MQTT 3.1.1)",
            Listener::V5 => "v5 (MQTT 5)",
        })
    }
}
