//! Who may connect where: tokens, their roles and scopes; and who may read `/metrics`.
//!
//! Tokens are static, listed in the configuration (`[[tokens]]`). Each grants a [`Role`] on one
//! namespace and a scope within it: the fleets a dispatcher may watch, the store a vendor is.
//!
//! The configuration holds a token's SHA-256 (`token_sha256`), not the token: whoever reads
//! the file (or a backup of it) learns nothing they can log in with. A plain SHA-256 is enough
//! because the tokens `bridge add-token` makes are 32 random bytes: nobody can search 2^256
//! candidates, so a slow password hash (argon2, for the low-entropy passwords people choose)
//! would only cost every handshake time. A presented token is hashed and compared with every
//! configured hash in constant time ([`constant_time_eq`], no early exit), so neither the
//! comparison nor a map look-up tells an attacker how much of a guess was right. A plain
//! `token = "..."` still works, hashed at load, with a warning at start.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use shared::FleetId;
use thiserror::Error;
use tracing::warn;

use crate::store::ClientId;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Watches vehicles and sends them commands, on `/dispatch`.
    #[default]
    Dispatcher,
    /// A store placing orders, on `/vendor`.
    Vendor,
    /// An operator, on `/admin` (and on `/dispatch` with every fleet).
    Admin,
}

/// One configured token and what it grants.
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenGrant {
    /// The SHA-256 of the secret the client presents, 64 hex digits (what `bridge add-token`
    /// writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// The secret itself, in plain (accepted, with a warning at start: prefer
    /// [`Self::token_sha256`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// What the holder is.
    pub role: Role,
    /// Dispatchers: the fleets they may watch; `"*"` means every fleet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fleets: Vec<String>,
    /// Vendors: their store id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Vendors: the fleet that delivers their orders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    /// A name for logs and the client's queue identity (never the token itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Vendors: where the store is, `[lat, lon]` in degrees: the default pickup point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<[f64; 2]>,
}

impl std::fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("TokenGrant")
            .field("token_sha256", &self.token_sha256)
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("role", &self.role)
            .field("fleets", &self.fleets)
            .field("store", &self.store)
            .field("fleet", &self.fleet)
            .field("name", &self.name)
            .field("location", &self.location)
            .finish()
    }
}

/// A token's SHA-256.
pub(crate) type TokenHash = [u8; 32];

/// The SHA-256 of `token`.
pub(crate) fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Parses 64 hex digits into a token hash.
///
/// # Errors
/// A message saying what is wrong.
pub(crate) fn parse_token_hash(hex_digits: &str) -> Result<TokenHash, String> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_digits.trim(), &mut hash).map_err(|e| {
        format!("token_sha256 must be 64 hex digits (the SHA-256 of the token): {e}")
    })?;
    Ok(hash)
}

/// Whether `a` and `b` are equal, in a time that depends only on their length.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let differ = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    a.len() == b.len() && differ == 0
}

/// A new token: 32 random bytes, as 64 hex digits.
///
/// # Errors
/// If the operating system's random source fails.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Who may read `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum MetricsAccess {
    /// Anyone (`metrics_public = true`, or the demo).
    Public,
    /// Whoever presents `Authorization: Bearer <the token>` (`metrics_token_sha256`).
    Token(TokenHash),
    /// Only peers on a loopback address (neither is configured).
    #[default]
    Loopback,
}

/// Why a `/metrics` request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub(crate) enum MetricsRefusal {
    /// A metrics token is configured and the request did not present it.
    #[error("metrics token required: Authorization: Bearer <metrics token>")]
    Token,
    /// No metrics token is configured and the request does not come from loopback.
    #[error("/metrics is served to loopback only (configure metrics_token_sha256)")]
    NotLoopback,
}

impl MetricsAccess {
    /// Whether a request from `peer` (if known) with `bearer` (the `Authorization: Bearer`
    /// token, if any) may read `/metrics`.
    ///
    /// # Errors
    /// [`MetricsRefusal`] saying why not.
    pub(crate) fn check(
        &self,
        peer: Option<IpAddr>,
        bearer: Option<&str>,
    ) -> Result<(), MetricsRefusal> {
        match self {
            Self::Public => Ok(()),
            Self::Token(hash) => match bearer {
                Some(token) if constant_time_eq(&hash_token(token), hash) => Ok(()),
                _ => Err(MetricsRefusal::Token),
            },
            Self::Loopback => match peer {
                Some(ip) if ip.is_loopback() || ip.to_canonical().is_loopback() => Ok(()),
                _ => Err(MetricsRefusal::NotLoopback),
            },
        }
    }
}

/// What a connected socket may do, derived from its token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Grant {
    /// The holder's role.
    pub(crate) role: Role,
    /// A name for logs.
    pub(crate) name: String,
    /// Fleets the holder may watch; `None` means every fleet.
    pub(crate) fleets: Option<Vec<FleetId>>,
    /// The vendor's store id.
    pub(crate) store: Option<String>,
    /// The vendor's delivering fleet.
    pub(crate) fleet: Option<FleetId>,
    /// The vendor's location, `[lat, lon]`.
    pub(crate) location: Option<[f64; 2]>,
}

impl Grant {
    /// Whether the holder may see `fleet`.
    pub(crate) fn may_see_fleet(&self, fleet: &FleetId) -> bool {
        self.fleets.as_ref().is_none_or(|f| f.contains(fleet))
    }

    /// Whether the holder sees every fleet.
    pub(crate) fn sees_every_fleet(&self) -> bool {
        self.fleets.is_none()
    }

    /// The holder's queue identity: a vendor's store (`vendor:{store}`), or a dispatcher's
    /// (or operator's) name (`dispatch:{name}`).
    pub(crate) fn queue_client(&self) -> Option<ClientId> {
        match self.role {
            Role::Vendor => self.store.as_deref().map(ClientId::vendor),
            Role::Dispatcher | Role::Admin => Some(ClientId::dispatcher(&self.name)),
        }
    }

    /// A grant for the bridge's own commands (assignments): every fleet.
    pub(crate) fn system() -> Self {
        Self {
            role: Role::Admin,
            name: "bridge".into(),
            fleets: None,
            store: None,
            fleet: None,
            location: None,
        }
    }
}

/// A way in for clients (a Socket.IO namespace, the HTTP API), and the roles whose tokens it
/// admits.
pub(crate) trait Entrance {
    /// Its name, as refusals say it: `/dispatch`, `/api`, ...
    const NAME: &'static str;
    /// The roles it admits.
    const ROLES: &'static [Role];
}

/// Why a handshake is refused. The message is sent to the client in `connect_error`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum AuthError {
    /// No token in the handshake's `auth` object.
    #[error("missing token: connect with auth {{ token }}")]
    Missing,
    /// The token is not configured.
    #[error("unknown token")]
    Unknown,
    /// The token is valid but not for this namespace.
    #[error("token not valid for {0}")]
    WrongNamespace(&'static str),
}

/// The configured tokens (their hashes), ready for look-up; and who may read `/metrics`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tokens {
    grants: Vec<(TokenHash, Grant)>,
    metrics: MetricsAccess,
}

/// Why the token configuration is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("tokens[{index}]: {reason}")]
pub struct TokenConfigError {
    /// Position in the `[[tokens]]` list.
    pub index: usize,
    /// What is wrong.
    pub reason: String,
}

impl Tokens {
    /// Validates the configured grants.
    ///
    /// # Errors
    /// [`TokenConfigError`] naming the first invalid entry.
    pub(crate) fn new(grants: &[TokenGrant]) -> Result<Self, TokenConfigError> {
        let mut hashed: Vec<(TokenHash, Grant)> = Vec::with_capacity(grants.len());
        for (index, g) in grants.iter().enumerate() {
            let bad = |reason: String| TokenConfigError { index, reason };
            let hash = match (&g.token_sha256, &g.token) {
                (Some(hex_digits), None) => parse_token_hash(hex_digits).map_err(bad)?,
                (None, Some(token)) if token.len() < 8 => {
                    return Err(bad("token must be at least 8 characters".into()));
                }
                (None, Some(token)) => hash_token(token),
                (Some(_), Some(_)) => {
                    return Err(bad("give token_sha256 or token, not both".into()));
                }
                (None, None) => {
                    return Err(bad(
                        "token_sha256 = \"<64 hex digits>\" missing (make one with `bridge add-token`)"
                            .into(),
                    ));
                }
            };
            let fleets = if g.fleets.iter().any(|f| f == "*") || g.role == Role::Admin {
                None
            } else {
                let fleets = g
                    .fleets
                    .iter()
                    .map(|f| FleetId::new(f).map_err(|e| bad(format!("fleet {f:?}: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?;
                if fleets.is_empty() && g.role == Role::Dispatcher {
                    return Err(bad("a dispatcher needs fleets = [...] (or [\"*\"])".into()));
                }
                Some(fleets)
            };
            let fleet = g
                .fleet
                .as_deref()
                .map(|f| FleetId::new(f).map_err(|e| bad(format!("fleet {f:?}: {e}"))))
                .transpose()?;
            if g.role == Role::Vendor {
                match &g.store {
                    Some(s) if shared::id::validate(s, 32).is_ok() => {}
                    _ => {
                        return Err(bad(
                            "a vendor needs store = \"<id>\" ([A-Za-z0-9_.-], ≤ 32)".into(),
                        ));
                    }
                }
            }
            let grant = Grant {
                role: g.role,
                name: g
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{:?}#{index}", g.role).to_lowercase()),
                fleets,
                store: g.store.clone(),
                fleet,
                location: g.location,
            };
            if hashed.iter().any(|(h, _)| *h == hash) {
                return Err(bad("duplicate token".into()));
            }
            // The name is the holder's queue identity and connection budget: two holders
            // sharing one would read each other's queue.
            if hashed.iter().any(|(_, other)| other.name == grant.name) {
                return Err(bad(format!("duplicate name {:?}", grant.name)));
            }
            hashed.push((hash, grant));
        }
        Ok(Self {
            grants: hashed,
            metrics: MetricsAccess::default(),
        })
    }

    /// Logs a warning for every grant configured with a plain `token` (once, at start).
    pub(crate) fn warn_plain(grants: &[TokenGrant]) {
        for (index, g) in grants.iter().enumerate() {
            if g.token.is_some() {
                warn!(
                    index,
                    name = g.name.as_deref().unwrap_or(""),
                    "tokens[{index}] is a plain `token` in the configuration: anyone who reads \
                     the file can use it; store token_sha256 instead (bridge add-token)"
                );
            }
        }
    }

    /// These tokens, with `/metrics` readable as `access` says.
    #[must_use]
    pub(crate) fn with_metrics(mut self, access: MetricsAccess) -> Self {
        self.metrics = access;
        self
    }

    /// Who may read `/metrics`.
    pub(crate) fn metrics_access(&self) -> MetricsAccess {
        self.metrics
    }

    /// Every configured grant.
    pub(crate) fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.grants.iter().map(|(_, grant)| grant)
    }

    /// Checks a handshake's token for `namespace`, which accepts `roles`.
    ///
    /// # Errors
    /// [`AuthError`] saying why it is refused.
    pub(crate) fn authorize(
        &self,
        token: Option<&str>,
        namespace: &'static str,
        roles: &[Role],
    ) -> Result<Grant, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let presented = hash_token(token);
        // Every hash is compared, in constant time: no early exit on the first match.
        let mut found = None;
        for (hash, grant) in &self.grants {
            if constant_time_eq(hash, &presented) {
                found = Some(grant);
            }
        }
        let grant = found.ok_or(AuthError::Unknown)?;
        if roles.contains(&grant.role) {
            Ok(grant.clone())
        } else {
            Err(AuthError::WrongNamespace(namespace))
        }
    }

    /// The demo tokens, used only in demo mode (no credentials file and no tokens):
    /// `dispatch-demo` (every fleet), `admin-demo`, and three stores of fleet `demo` at
    /// intersections of the simulator's street grid around 52.52° N 13.405° E (its default
    /// centre): `vendor-demo` (`store-1`, at the centre), `vendor-demo-2` (`store-2`, 600 m
    /// east and 400 m north) and `vendor-demo-3` (`store-3`, 400 m west and 600 m south).
    pub(crate) fn demo_grants() -> Vec<TokenGrant> {
        let grant = |token: &str, name: &str, role, fleets: &[&str]| TokenGrant {
            token_sha256: None,
            token: Some(token.into()),
            role,
            fleets: fleets.iter().map(|f| (*f).to_owned()).collect(),
            store: None,
            fleet: None,
            name: Some(name.into()),
            location: None,
        };
        // Exactly on the grid's intersections (the simulator's `StreetGrid::position`), so
        // that a pickup is where the vehicles stop.
        let store = |token: &str, name: &str, store: &str, location: [f64; 2]| TokenGrant {
            store: Some(store.into()),
            fleet: Some("demo".into()),
            location: Some(location),
            ..grant(token, name, Role::Vendor, &[])
        };
        vec![
            grant("dispatch-demo", "demo-dispatcher", Role::Dispatcher, &["*"]),
            store("vendor-demo", "demo-vendor", "store-1", [52.52, 13.405]),
            grant("admin-demo", "demo-admin", Role::Admin, &[]),
            store(
                "vendor-demo-2",
                "demo-vendor-2",
                "store-2",
                [52.523_457_4, 13.413_711_8],
            ),
            store(
                "vendor-demo-3",
                "demo-vendor-3",
                "store-3",
                [52.514_518, 13.399_386_7],
            ),
        ]
    }
}

/// The demo tokens and `north-only`, a dispatcher of fleet `north`, for the unit tests.
#[cfg(test)]
pub(crate) fn sample_tokens() -> Tokens {
    let mut grants = Tokens::demo_grants();
    grants.push(TokenGrant {
        token: Some("north-only".into()),
        role: Role::Dispatcher,
        fleets: vec!["north".into()],
        ..TokenGrant::default()
    });
    Tokens::new(&grants).expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorizes_by_namespace() {
        let t = sample_tokens();
        assert_eq!(
            t.authorize(None, "/dispatch", &[Role::Dispatcher]),
            Err(AuthError::Missing)
        );
        assert_eq!(
            t.authorize(Some("nope-nope"), "/dispatch", &[Role::Dispatcher]),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            t.authorize(
                Some("vendor-demo"),
                "/dispatch",
                &[Role::Dispatcher, Role::Admin]
            ),
            Err(AuthError::WrongNamespace("/dispatch"))
        );
        assert!(
            t.authorize(
                Some("admin-demo"),
                "/dispatch",
                &[Role::Dispatcher, Role::Admin]
            )
            .is_ok()
        );
    }

    #[test]
    fn rejects_bad_config() {
        let mut g = Tokens::demo_grants();
        g[1].store = None;
        assert_eq!(Tokens::new(&g).map(|_| ()).map_err(|e| e.index), Err(1));
        let mut g = Tokens::demo_grants();
        g[0].token = Some("short".into());
        assert!(Tokens::new(&g).is_err());
        let mut g = Tokens::demo_grants();
        g[0].token_sha256 = Some("ab".repeat(32));
        assert!(Tokens::new(&g).unwrap_err().reason.contains("not both"));
        let mut g = Tokens::demo_grants();
        g[0].token = None;
        assert!(Tokens::new(&g).unwrap_err().reason.contains("token_sha256"));
        g[0].token_sha256 = Some("xyz".into());
        assert!(
            Tokens::new(&g)
                .unwrap_err()
                .reason
                .contains("64 hex digits")
        );
        let mut g = Tokens::demo_grants();
        g.push(g[0].clone());
        assert!(Tokens::new(&g).unwrap_err().reason.contains("duplicate"));
        let mut g = Tokens::demo_grants();
        let mut twin = g[0].clone();
        twin.token = Some("another-token".into());
        g.push(twin);
        assert!(
            Tokens::new(&g)
                .unwrap_err()
                .reason
                .contains("duplicate name")
        );
    }

    /// A token stored as its SHA-256 admits the token, and nothing else; the plain token
    /// never needs to be in the configuration.
    #[test]
    fn hashed_tokens_admit_their_token_only() {
        let token = new_token().expect("random");
        assert_eq!(token.len(), 64);
        assert_ne!(token, new_token().expect("random"), "fresh every time");
        let grant = TokenGrant {
            token_sha256: Some(hex::encode(hash_token(&token))),
            role: Role::Admin,
            ..TokenGrant::default()
        };
        let t = Tokens::new(&[grant]).expect("valid");
        let admin = [Role::Admin];
        assert!(t.authorize(Some(&token), "/admin", &admin).is_ok());
        let hash_itself = hex::encode(hash_token(&token));
        assert_eq!(
            t.authorize(Some(&hash_itself), "/admin", &admin),
            Err(AuthError::Unknown),
            "the stored hash is not a token"
        );
        assert_eq!(
            t.authorize(Some(&token[..63]), "/admin", &admin),
            Err(AuthError::Unknown)
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn metrics_access_rules() {
        let loopback: IpAddr = "127.0.0.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
        let remote: IpAddr = "192.0.2.7".parse().expect("ip");
        assert!(MetricsAccess::Public.check(Some(remote), None).is_ok());
        assert!(MetricsAccess::Loopback.check(Some(loopback), None).is_ok());
        assert!(MetricsAccess::Loopback.check(Some(mapped), None).is_ok());
        assert_eq!(
            MetricsAccess::Loopback.check(Some(remote), None),
            Err(MetricsRefusal::NotLoopback)
        );
        assert_eq!(
            MetricsAccess::Loopback.check(None, None),
            Err(MetricsRefusal::NotLoopback)
        );
        let access = MetricsAccess::Token(hash_token("scrape-secret"));
        assert!(access.check(Some(remote), Some("scrape-secret")).is_ok());
        assert_eq!(
            access.check(Some(loopback), None),
            Err(MetricsRefusal::Token),
            "a configured token is required from loopback too"
        );
        assert_eq!(
            access.check(Some(loopback), Some("scrape-secreT")),
            Err(MetricsRefusal::Token)
        );
    }
}
