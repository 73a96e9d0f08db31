//! Validated identifiers with a fixed capacity.
//!
//! Identifiers appear as MQTT topic levels and in Socket.IO room names, so they are restricted
//! to `[A-Za-z0-9_.-]`: no `/`, `+`, `#` (MQTT) and no `:` (room names). Vehicle ids are unique
//! across fleets.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::IdError;

/// Checks that `s` is a valid identifier of at most `max` bytes.
///
/// # Errors
/// [`IdError`] says what is wrong with `s`.
pub fn validate(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            max: u8::try_from(max).unwrap_or(u8::MAX),
        });
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        Some(found) => Err(IdError::BadChar { found }),
        None => Ok(()),
    }
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $cap:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(heapless::String<$cap>);

        impl $name {
            /// The maximum length in bytes.
            pub const CAPACITY: usize = $cap;

            /// Validates `s` and copies it into a new identifier.
            ///
            /// # Errors
            /// [`IdError`] if `s` is empty, too long or has a forbidden character.
            pub fn new(s: &str) -> Result<Self, IdError> {
                validate(s, $cap)?;
                let mut inner = heapless::String::new();
                // Cannot fail: the length was checked by `validate`.
                inner.push_str(s).map_err(|_| IdError::TooLong { max: $cap })?;
                Ok(Self(inner))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = heapless::String::<$cap>::deserialize(deserializer)?;
                validate(&raw, $cap).map_err(serde::de::Error::custom)?;
                Ok(Self(raw))
            }
        }
    };
}

identifier!(
    /// A fleet (a group of vehicles run together, e.g. one vendor's or one depot's).
    FleetId,
    24
);
identifier!(
    /// A vehicle, unique across all fleets.
    VehicleId,
    24
);
identifier!(
    /// A delivery order.
    OrderId,
    32
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        assert_eq!(
            VehicleId::new("van-042").map(|v| v.to_string()),
            Ok("van-042".into())
        );
        assert!(FleetId::new("north_1.a").is_ok());
        assert!(OrderId::new(&"o".repeat(32)).is_ok());
    }

    #[test]
    fn rejects_invalid_ids() {
        assert_eq!(VehicleId::new(""), Err(IdError::Empty));
        assert_eq!(
            VehicleId::new(&"v".repeat(25)),
            Err(IdError::TooLong { max: 24 })
        );
        assert_eq!(FleetId::new("a/b"), Err(IdError::BadChar { found: '/' }));
        assert_eq!(FleetId::new("a+"), Err(IdError::BadChar { found: '+' }));
        assert_eq!(FleetId::new("#"), Err(IdError::BadChar { found: '#' }));
        assert_eq!(VehicleId::new("v:1"), Err(IdError::BadChar { found: ':' }));
        assert_eq!(VehicleId::new("vé"), Err(IdError::BadChar { found: 'é' }));
    }
}
