//! Who may connect, and what they may publish and subscribe to.
//!
//! - [`Credentials`]: the credentials file, read-only. The bridge and device-sim read it too
//!   (for the per-device message keys of `shared::seal`).
//! - [`CredentialsFile`]: adds or updates entries in that file (`broker add-device`,
//!   `broker add-client`, or a provisioning tool in bulk), keeping its comments.
//! - [`Authenticator`]: the broker's check of a CONNECT against the file, with the cache that keeps
//!   a reconnect storm cheap and the throttle of failed logins (`throttle`), and [`Identity`]:
//!   who a connection is, with its topic ACL (a device's fleet comes from the file).
//! - `client_id`: which client ids each login may use, so that none takes over another's
//!   session.
//!
//! # The file
//!
//! ```toml
//! # One table per vehicle: its MQTT username, which must also be its client id.
//! [devices.van-0001]
//! password = "$argon2id$v=19$m=1024,t=1,p=1$...$..."   # PHC string, never the password
//! key = "5f0c...e1"                                     # 32-byte message key, 64 hex digits
//! fleet = "north"                                       # required: its only `fleet/{fleet}/...`
//!
//! # Other clients: the bridge, and observers such as an engineer's mosquitto_sub.
//! [clients.bridge]
//! role = "bridge"          # publish and subscribe anywhere
//! password = "$argon2id$..."
//!
//! [clients.alice]
//! role = "observer"        # subscribe anywhere, publish nothing
//! password = "$argon2id$..."
//! ```
//!
//! The file holds every device's message key in clear (the bridge needs them to verify seals):
//! [`CredentialsFile::save`] writes it with mode 0600; keep it that way.
//!
//! # Cost of a connect
//!
//! Passwords are argon2id hashes. Their cost is chosen by where the password came from:
//!
//! - **generated** (`add-device` without `--password`, every device in practice): 128 random
//!   bits. No amount of hashing protects such a secret further, nor does brute force threaten
//!   it, so the hash is cheap: argon2id m = 1 MiB, t = 1, p = 1 ([`GENERATED_PARAMS`](password::GENERATED_PARAMS)).
//! - **chosen by a person** (`--password`): OWASP's minimum for argon2id, m = 19 MiB, t = 2,
//!   p = 1 ([`CHOSEN_PARAMS`](password::CHOSEN_PARAMS)), tens of milliseconds per check.
//!
//! On top of that, a successful check is remembered in memory: the username, the PHC string it
//! was checked against, and an HMAC-SHA256 of the password under a random per-process key. A
//! reconnect of the same device with the same password (the reconnect storm after a network
//! outage) costs one HMAC, not one argon2. A failed check is never cached. Checks that do run
//! argon2 run on Tokio's blocking pool, at most one per core at a time, so they never stall the
//! network tasks. Measured costs are in `docs/broker.md`.

mod authenticator;
mod client_id;
mod credentials;
mod file;
mod identity;
mod password;
#[cfg(test)]
mod testing;
mod throttle;

pub(crate) use self::authenticator::{Attempt, AuthSettings, Authenticator};
pub use self::credentials::{ClientEntry, Credentials, DeviceEntry, Role};
pub use self::file::{CredentialsFile, Issued, NewPassword};
pub(crate) use self::identity::{Identity, PROBE_TOPIC_PREFIX, is_vehicle_topic};
pub use self::password::PasswordOrigin;
pub(crate) use self::password::constant_time_eq;
