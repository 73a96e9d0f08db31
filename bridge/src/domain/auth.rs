//! Who may connect where: tokens, their roles and scopes.
//!
//! Tokens are static, listed in the configuration (`[[tokens]]`). Each grants a [`Role`] on one
//! namespace and a scope within it: the fleets a dispatcher may watch, the store a vendor is.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use shared::FleetId;
use thiserror::Error;

use crate::store::ClientId;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Watches vehicles and sends them commands, on `/dispatch`.
    Dispatcher,
    /// A store placing orders, on `/vendor`.
    Vendor,
    /// An operator, on `/admin` (and on `/dispatch` with every fleet).
    Admin,
}

/// One configured token and what it grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenGrant {
    /// The secret the client presents in the handshake (`auth: {token}`).
    pub token: String,
    /// What the holder is.
    pub role: Role,
    /// Dispatchers: the fleets they may watch; `"*"` means every fleet.
    #[serde(default)]
    pub fleets: Vec<String>,
    /// Vendors: their store id.
    pub store: Option<String>,
    /// Vendors: the fleet that delivers their orders.
    pub fleet: Option<String>,
    /// A name for logs and the client's queue identity (never the token itself).
    pub name: Option<String>,
    /// Vendors: where the store is, `[lat, lon]` in degrees: the default pickup point.
    pub location: Option<[f64; 2]>,
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

/// The configured tokens, ready for look-up.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tokens {
    by_token: HashMap<String, Grant>,
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
        let mut by_token = HashMap::new();
        for (index, g) in grants.iter().enumerate() {
            let bad = |reason: String| TokenConfigError { index, reason };
            if g.token.len() < 8 {
                return Err(bad("token must be at least 8 characters".into()));
            }
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
            if by_token.insert(g.token.clone(), grant).is_some() {
                return Err(bad("duplicate token".into()));
            }
        }
        Ok(Self { by_token })
    }

    /// Every configured grant.
    pub(crate) fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.by_token.values()
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
        let grant = self.by_token.get(token).ok_or(AuthError::Unknown)?;
        if roles.contains(&grant.role) {
            Ok(grant.clone())
        } else {
            Err(AuthError::WrongNamespace(namespace))
        }
    }

    /// The demo tokens used when no configuration is given.
    pub(crate) fn demo_grants() -> Vec<TokenGrant> {
        let grant =
            |token: &str, role, fleets: &[&str], store: Option<&str>, fleet: Option<&str>| {
                TokenGrant {
                    token: token.into(),
                    role,
                    fleets: fleets.iter().map(|f| (*f).to_owned()).collect(),
                    store: store.map(str::to_owned),
                    fleet: fleet.map(str::to_owned),
                    name: Some(format!("demo-{role:?}").to_lowercase()),
                    // The demo store sits at the simulator's default city centre.
                    location: store.map(|_| [52.52, 13.405]),
                }
            };
        vec![
            grant("dispatch-demo", Role::Dispatcher, &["*"], None, None),
            grant(
                "vendor-demo",
                Role::Vendor,
                &[],
                Some("store-1"),
                Some("demo"),
            ),
            grant("admin-demo", Role::Admin, &[], None, None),
        ]
    }
}

/// The demo tokens and `north-only`, a dispatcher of fleet `north`, for the unit tests.
#[cfg(test)]
pub(crate) fn sample_tokens() -> Tokens {
    let mut grants = Tokens::demo_grants();
    grants.push(TokenGrant {
        token: "north-only".into(),
        role: Role::Dispatcher,
        fleets: vec!["north".into()],
        store: None,
        fleet: None,
        name: None,
        location: None,
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
        g[0].token = "short".into();
        assert!(Tokens::new(&g).is_err());
        let mut g = Tokens::demo_grants();
        g.push(g[0].clone());
        assert!(Tokens::new(&g).unwrap_err().reason.contains("duplicate"));
    }
}
