//! Whose a client id is: which login may use it, so that no login can take over another's
//! session (rumqttd's router hands a client id's session, queued messages and all, to
//! whoever connects with it).
//!
//! The rule, in order (first match decides):
//!
//! 1. the vehicle id of a device in the credentials file belongs to that device;
//! 2. an id listed in `durable_consumers` (the bridge's `client_id`, default
//!    `fleetbeat-bridge`), or such an id followed by `-` and anything (the bridge's heartbeat
//!    session `{client_id}-hb`), belongs to the logins with the `bridge` role;
//! 3. a client's name, or its name followed by `-` and anything, belongs to that client (the
//!    longest such name, so client `a` does not own client `a-b`'s ids);
//! 4. any other id belongs to nobody: a named client may use it with a clean session only
//!    (nothing to take over once it disconnects), a `bridge`-role login with a persistent one
//!    too; and never while another login holds it (see `client_ids`).
//!
//! So an observer `alice` uses `-i alice`, `-i alice-laptop` or mosquitto's random `mosq-...`
//! (clean session), and with `-c` only `alice` or `alice-...`.

use super::credentials::{Credentials, Role};
use super::identity::Identity;

/// Who a client id belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner<'a> {
    /// The device of that vehicle id.
    Device(&'a str),
    /// Logins with the `bridge` role.
    Bridge,
    /// The client of that name.
    Client(&'a str),
    /// Nobody in particular.
    Nobody,
}

/// Whether `id` is `name` or `name-...`.
fn is_own(id: &str, name: &str) -> bool {
    id.strip_prefix(name)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// Who `client_id` belongs to (see the [module docs](self)).
pub(crate) fn owner_of<'a>(
    client_id: &str,
    credentials: &'a Credentials,
    bridge_ids: &[String],
) -> Owner<'a> {
    if let Some((id, _)) = credentials.devices().find(|(id, _)| *id == client_id) {
        return Owner::Device(id);
    }
    if bridge_ids.iter().any(|id| is_own(client_id, id)) {
        return Owner::Bridge;
    }
    credentials
        .clients()
        .filter(|(name, _)| is_own(client_id, name))
        .max_by_key(|(name, _)| name.len())
        .map_or(Owner::Nobody, |(name, _)| Owner::Client(name))
}

/// Whether `identity` may use a client id that belongs to `owner`, with a persistent session
/// or not.
pub(crate) fn may_use(identity: &Identity, owner: Owner<'_>, persistent: bool) -> bool {
    match (identity, owner) {
        (Identity::Device { id, .. }, Owner::Device(owner)) => id.as_str() == owner,
        (Identity::Device { .. }, _) => false,
        (Identity::Client { role, .. }, Owner::Bridge) => *role == Role::Bridge,
        (Identity::Client { name, .. }, Owner::Client(owner)) => name == owner,
        (Identity::Client { role, .. }, Owner::Nobody) => !persistent || *role == Role::Bridge,
        (Identity::Client { .. }, Owner::Device(_)) => false,
        // Open mode and the probe are not subject to logins.
        (Identity::Anonymous | Identity::Tool | Identity::Probe, _) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use shared::{FleetId, VehicleId};

    use super::*;
    use crate::auth::testing::FAST_PHC_OF_SECRET;

    fn credentials() -> Credentials {
        let phc = FAST_PHC_OF_SECRET();
        let key = "00".repeat(32);
        let mut text =
            format!("[devices.van-1]\npassword = \"{phc}\"\nkey = \"{key}\"\nfleet = \"n\"\n");
        for (name, role) in [
            ("alice", "observer"),
            ("a", "observer"),
            ("a-b", "observer"),
            ("fleetbeat", "observer"),
            ("ops", "bridge"),
        ] {
            text.push_str(&format!(
                "[clients.{name}]\nrole = \"{role}\"\npassword = \"{phc}\"\n"
            ));
        }
        Credentials::parse(&text, Path::new("c.toml")).unwrap()
    }

    fn client(name: &str, role: Role) -> Identity {
        Identity::Client {
            name: name.to_owned(),
            role,
        }
    }

    #[test]
    fn client_ids_belong_to_devices_bridges_and_clients() {
        let creds = credentials();
        let bridge_ids = vec!["fleetbeat-bridge".to_owned()];
        let owner = |id| owner_of(id, &creds, &bridge_ids);
        assert_eq!(owner("van-1"), Owner::Device("van-1"));
        assert_eq!(owner("fleetbeat-bridge"), Owner::Bridge);
        assert_eq!(owner("fleetbeat-bridge-hb"), Owner::Bridge);
        assert_eq!(owner("fleetbeat-other"), Owner::Client("fleetbeat"));
        assert_eq!(owner("alice"), Owner::Client("alice"));
        assert_eq!(owner("alice-laptop"), Owner::Client("alice"));
        assert_eq!(owner("a-b-c"), Owner::Client("a-b"));
        assert_eq!(owner("a-c"), Owner::Client("a"));
        assert_eq!(owner("alicex"), Owner::Nobody);
        assert_eq!(owner("mosq-123"), Owner::Nobody);
        assert_eq!(owner("van-1-x"), Owner::Nobody);
    }

    #[test]
    fn logins_use_only_their_own_ids_and_free_ones_with_a_clean_session() {
        let creds = credentials();
        let bridge_ids = vec!["fleetbeat-bridge".to_owned()];
        let owner = |id| owner_of(id, &creds, &bridge_ids);
        let alice = client("alice", Role::Observer);
        let fleetbeat = client("fleetbeat", Role::Observer);
        let ops = client("ops", Role::Bridge);
        let van = Identity::Device {
            id: VehicleId::new("van-1").unwrap(),
            fleet: FleetId::new("n").unwrap(),
        };
        for persistent in [false, true] {
            // The reproduction of issue 14: an observer taking the bridge's session.
            assert!(!may_use(&alice, owner("fleetbeat-bridge"), persistent));
            assert!(!may_use(&fleetbeat, owner("fleetbeat-bridge"), persistent));
            assert!(!may_use(&alice, owner("fleetbeat-bridge-hb"), persistent));
            assert!(may_use(&ops, owner("fleetbeat-bridge"), persistent));
            assert!(may_use(&ops, owner("fleetbeat-bridge-hb"), persistent));
            assert!(!may_use(&alice, owner("van-1"), persistent));
            assert!(!may_use(&ops, owner("van-1"), persistent));
            assert!(!may_use(&alice, owner("a-b"), persistent));
            assert!(!may_use(&ops, owner("alice"), persistent));
            assert!(may_use(&alice, owner("alice"), persistent));
            assert!(may_use(&alice, owner("alice-2"), persistent));
            assert!(may_use(&van, owner("van-1"), persistent));
            assert!(!may_use(&van, owner("mosq-1"), persistent));
            assert!(may_use(&ops, owner("mosq-1"), persistent));
        }
        assert!(may_use(&alice, owner("mosq-1"), false));
        assert!(
            !may_use(&alice, owner("mosq-1"), true),
            "no persistent session on a free id"
        );
        assert!(may_use(
            &Identity::Anonymous,
            owner("fleetbeat-bridge"),
            true
        ));
    }
}
