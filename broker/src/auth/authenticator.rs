//! [`Authenticator`]: the broker's check of a CONNECT against the credentials file, with the
//! cache that keeps a reconnect storm cheap (see the [module docs](super)).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use shared::VehicleId;
use tokio::sync::Semaphore;
use tracing::{error, info};

use super::client_id::{may_use, owner_of};
use super::credentials::Credentials;
use super::identity::Identity;
use super::password::{constant_time_eq, random_bytes, verify_password};
use super::throttle::LoginThrottle;
use crate::error::CredentialsError;
use crate::file_watch::FileWatch;
use crate::metrics::AuthRefusal;

#[derive(Debug)]
struct Loaded {
    credentials: Arc<Credentials>,
    watch: FileWatch,
}

/// How the [`Authenticator`] checks logins, from the broker's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthSettings {
    /// Client ids that belong to `bridge`-role logins (`durable_consumers`; see `client_id`).
    pub(crate) bridge_ids: Vec<String>,
    /// Failed logins per IP address and per username within `login_failure_window` after
    /// which attempts are refused unchecked; 0: never.
    pub(crate) max_login_failures: u32,
    /// The window of `max_login_failures`.
    pub(crate) login_failure_window: Duration,
    /// argon2 checks at once; 0: one per core.
    pub(crate) max_password_checks: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            bridge_ids: Vec::new(),
            max_login_failures: 10,
            login_failure_window: Duration::from_secs(60),
            max_password_checks: 0,
        }
    }
}

/// The broker's side of authentication: the credentials file (reloaded when it changes), the
/// cache of successful checks, the throttle of failed ones and the bound on concurrent argon2
/// checks.
#[derive(Debug)]
pub(crate) struct Authenticator {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    /// username → (PHC string checked against, HMAC of the password under `cache_key`).
    cache: Mutex<HashMap<String, (String, [u8; 32])>>,
    cache_key: [u8; 32],
    hashing: Semaphore,
    bridge_ids: Vec<String>,
    throttle: LoginThrottle,
}

/// One CONNECT's login, as [`Authenticator::authenticate`] checks it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt<'a> {
    /// Where it comes from.
    pub(crate) peer: IpAddr,
    /// The client id it asks for.
    pub(crate) client_id: &'a str,
    /// Whether it asks for a persistent session (clean session / clean start off).
    pub(crate) persistent: bool,
    /// Its username, if any.
    pub(crate) username: Option<&'a str>,
    /// Its password, if any.
    pub(crate) password: Option<&'a str>,
    /// The vehicle id of its verified TLS client certificate, if it presented one: then it
    /// is that device, without a password (see [`Authenticator::authenticate`]).
    pub(crate) certificate: Option<&'a str>,
}

type HmacSha256 = Hmac<Sha256>;

impl Authenticator {
    /// Loads the credentials file at `path`, with the default [`AuthSettings`].
    #[cfg(test)]
    pub(crate) fn load(path: &Path) -> Result<Authenticator, CredentialsError> {
        Authenticator::load_with(path, AuthSettings::default())
    }

    /// Loads the credentials file at `path`, to check logins as `settings` say.
    pub(crate) fn load_with(
        path: &Path,
        settings: AuthSettings,
    ) -> Result<Authenticator, CredentialsError> {
        let credentials = Credentials::load(path)?;
        let watch = FileWatch::new(path);
        let parallelism = match settings.max_password_checks {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Ok(Authenticator {
            path: path.to_owned(),
            loaded: RwLock::new(Loaded {
                credentials: Arc::new(credentials),
                watch,
            }),
            cache: Mutex::new(HashMap::new()),
            cache_key: random_bytes::<32>()?,
            hashing: Semaphore::new(parallelism),
            bridge_ids: settings.bridge_ids,
            throttle: LoginThrottle::new(
                settings.max_login_failures,
                settings.login_failure_window,
            ),
        })
    }

    /// The credentials currently in force (reloaded if the file changed).
    pub(crate) fn credentials(&self) -> Arc<Credentials> {
        self.reload_if_changed();
        match self.loaded.read() {
            Ok(loaded) => Arc::clone(&loaded.credentials),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().credentials),
        }
    }

    /// Re-reads the file if its modification time or size changed, at most once a second.
    /// A file that no longer loads is reported and ignored: the previous credentials stay.
    fn reload_if_changed(&self) {
        {
            let Ok(loaded) = self.loaded.read() else {
                return;
            };
            if !loaded.watch.due() {
                return;
            }
        }
        let Ok(mut loaded) = self.loaded.write() else {
            return;
        };
        if !loaded.watch.changed(&self.path) {
            return;
        }
        match Credentials::load(&self.path) {
            Ok(credentials) => {
                info!(
                    path = %self.path.display(),
                    devices = credentials.devices().count(),
                    clients = credentials.clients().count(),
                    "credentials file changed: reloaded"
                );
                loaded.credentials = Arc::new(credentials);
            }
            Err(err) => {
                error!(
                    path = %self.path.display(),
                    cause = %err,
                    "credentials file changed but does not load: keeping the previous credentials"
                );
            }
        }
    }

    /// Checks a CONNECT's login against the credentials, and its client id against the
    /// login (see `client_id`). A username or address with too many recent failures is
    /// refused before its password is checked, unless this very password was verified before.
    ///
    /// With a client certificate ([`Attempt::certificate`], verified by the TLS handshake),
    /// the connection is the device that certificate names, which must be in the file; no
    /// password is needed (one given is ignored), and a username given must be that device's.
    pub(crate) async fn authenticate(&self, attempt: Attempt<'_>) -> Result<Identity, AuthRefusal> {
        let Attempt {
            peer,
            client_id,
            persistent,
            username,
            password,
            certificate,
        } = attempt;
        if let Some(vehicle) = certificate {
            return self.authenticate_certificate(peer, client_id, persistent, username, vehicle);
        }
        let (Some(username), Some(password)) = (username, password) else {
            return Err(AuthRefusal::NoCredentials);
        };
        if username.is_empty() {
            return Err(AuthRefusal::NoCredentials);
        }
        let credentials = self.credentials();
        let (identity, phc) = if let Some(device) = credentials.device(username) {
            let id = VehicleId::new(username).map_err(|_| AuthRefusal::UnknownUser)?;
            let identity = Identity::Device {
                id,
                fleet: device.fleet().clone(),
            };
            (identity, device.password_hash().to_owned())
        } else if let Some(client) = credentials.client(username) {
            let identity = Identity::Client {
                name: username.to_owned(),
                role: client.role(),
            };
            (identity, client.password_hash().to_owned())
        } else {
            if self.throttle.blocks(peer, None) {
                return Err(AuthRefusal::Throttled);
            }
            self.throttle.failed(peer, None);
            return Err(AuthRefusal::UnknownUser);
        };
        let owner = owner_of(client_id, &credentials, &self.bridge_ids);
        if !may_use(&identity, owner, persistent) {
            return Err(AuthRefusal::ClientIdMismatch);
        }

        let tag = self.tag(username, password);
        if self.cached(username, &phc, &tag) {
            return Ok(identity);
        }
        // Counted while it runs: simultaneous guesses cannot queue more checks than the bound.
        let Some(check) = self.throttle.begin(peer, username) else {
            return Err(AuthRefusal::Throttled);
        };
        if self.verify(password, &phc).await {
            if let Ok(mut cache) = self.cache.lock() {
                cache.insert(username.to_owned(), (phc, tag));
            }
            check.succeeded();
            Ok(identity)
        } else {
            check.failed();
            Err(AuthRefusal::BadPassword)
        }
    }

    /// [`Self::authenticate`] for a connection with the client certificate of `vehicle`.
    fn authenticate_certificate(
        &self,
        peer: IpAddr,
        client_id: &str,
        persistent: bool,
        username: Option<&str>,
        vehicle: &str,
    ) -> Result<Identity, AuthRefusal> {
        if username.is_some_and(|name| !name.is_empty() && name != vehicle) {
            return Err(AuthRefusal::CertificateMismatch);
        }
        let credentials = self.credentials();
        let device = credentials
            .device(vehicle)
            .zip(VehicleId::new(vehicle).ok());
        let Some((device, id)) = device else {
            self.throttle.failed(peer, None);
            return Err(AuthRefusal::UnknownUser);
        };
        let identity = Identity::Device {
            id,
            fleet: device.fleet().clone(),
        };
        let owner = owner_of(client_id, &credentials, &self.bridge_ids);
        if !may_use(&identity, owner, persistent) {
            return Err(AuthRefusal::ClientIdMismatch);
        }
        Ok(identity)
    }

    fn tag(&self, username: &str, password: &str) -> [u8; 32] {
        let mut mac = match <HmacSha256 as hmac::KeyInit>::new_from_slice(&self.cache_key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        mac.update(username.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Whether `username` was verified with this password against this very hash before.
    fn cached(&self, username: &str, phc: &str, tag: &[u8; 32]) -> bool {
        let Ok(cache) = self.cache.lock() else {
            return false;
        };
        cache.get(username).is_some_and(|(cached_phc, cached_tag)| {
            // Constant time: the tags are secret-derived.
            cached_phc == phc && constant_time_eq(cached_tag, tag)
        })
    }

    /// Runs argon2 on the blocking pool, at most one check per core at a time.
    async fn verify(&self, password: &str, phc: &str) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let (password, phc) = (password.to_owned(), phc.to_owned());
        tokio::task::spawn_blocking(move || verify_password(&password, &phc))
            .await
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::auth::credentials::Role;
    use tokio::time::Instant;

    use crate::auth::file::{CredentialsFile, NewPassword};
    use crate::auth::password::{CHOSEN_PARAMS, GENERATED_PARAMS};
    use crate::auth::testing::{FAST_PHC_OF_SECRET, temp_path};

    fn login<'a>(
        client_id: &'a str,
        username: Option<&'a str>,
        password: Option<&'a str>,
    ) -> Attempt<'a> {
        Attempt {
            peer: IpAddr::from([127, 0, 0, 1]),
            client_id,
            persistent: false,
            username,
            password,
            certificate: None,
        }
    }

    fn authenticator_with(text: &str) -> (Authenticator, PathBuf) {
        let path = temp_path("authn");
        fs::write(&path, text).unwrap();
        (Authenticator::load(&path).unwrap(), path)
    }

    #[tokio::test]
    async fn authentication_rules() {
        let phc = FAST_PHC_OF_SECRET();
        let key = "00".repeat(32);
        let (auth, path) = authenticator_with(&format!(
            "[devices.van-1]\npassword = \"{phc}\"\nkey = \"{key}\"\nfleet = \"f\"\n\
             [clients.watcher]\nrole = \"observer\"\npassword = \"{phc}\"\n"
        ));
        let ok = Some("s3cret-pw");
        assert_eq!(
            auth.authenticate(login("van-1", Some("van-1"), ok)).await,
            Ok(Identity::Device {
                id: VehicleId::new("van-1").unwrap(),
                fleet: shared::FleetId::new("f").unwrap(),
            })
        );
        assert_eq!(
            auth.authenticate(login("mosq-1", Some("watcher"), ok))
                .await,
            Ok(Identity::Client {
                name: "watcher".into(),
                role: Role::Observer
            })
        );
        for (client_id, user, pass, why) in [
            ("van-1", None, None, AuthRefusal::NoCredentials),
            ("van-1", Some("van-1"), None, AuthRefusal::NoCredentials),
            ("van-1", Some(""), ok, AuthRefusal::NoCredentials),
            ("van-2", Some("van-2"), ok, AuthRefusal::UnknownUser),
            (
                "van-1",
                Some("van-1"),
                Some("wrong"),
                AuthRefusal::BadPassword,
            ),
            ("other", Some("van-1"), ok, AuthRefusal::ClientIdMismatch),
            ("van-1", Some("watcher"), ok, AuthRefusal::ClientIdMismatch),
        ] {
            assert_eq!(
                auth.authenticate(login(client_id, user, pass)).await,
                Err(why),
                "{client_id} {user:?} {pass:?}"
            );
        }
        fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn a_client_certificate_is_its_device_without_a_password() {
        let phc = FAST_PHC_OF_SECRET();
        let key = "00".repeat(32);
        let (auth, path) = authenticator_with(&format!(
            "[devices.van-1]\npassword = \"{phc}\"\nkey = \"{key}\"\nfleet = \"f\"\n\
             [clients.watcher]\nrole = \"observer\"\npassword = \"{phc}\"\n"
        ));
        let with_cert = |client_id, username, vehicle| Attempt {
            certificate: Some(vehicle),
            ..login(client_id, username, None)
        };
        let van_1 = Ok(Identity::Device {
            id: VehicleId::new("van-1").unwrap(),
            fleet: shared::FleetId::new("f").unwrap(),
        });
        assert_eq!(
            auth.authenticate(with_cert("van-1", None, "van-1")).await,
            van_1
        );
        assert_eq!(
            auth.authenticate(with_cert("van-1", Some("van-1"), "van-1"))
                .await,
            van_1
        );
        for (client_id, username, vehicle, why) in [
            ("van-2", None, "van-1", AuthRefusal::ClientIdMismatch),
            (
                "van-1",
                Some("van-2"),
                "van-1",
                AuthRefusal::CertificateMismatch,
            ),
            (
                "van-1",
                Some("watcher"),
                "van-1",
                AuthRefusal::CertificateMismatch,
            ),
            ("van-2", None, "van-2", AuthRefusal::UnknownUser),
            // A client's name is not a vehicle: certificates name devices only.
            ("watcher", None, "watcher", AuthRefusal::UnknownUser),
        ] {
            assert_eq!(
                auth.authenticate(with_cert(client_id, username, vehicle))
                    .await,
                Err(why),
                "{client_id} {username:?} {vehicle}"
            );
        }
        fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn successful_checks_are_cached_and_failures_are_not() {
        let phc = FAST_PHC_OF_SECRET();
        let (auth, path) = authenticator_with(&format!(
            "[devices.van-1]\npassword = \"{phc}\"\nkey = \"{}\"\nfleet = \"f\"\n",
            "00".repeat(32)
        ));
        assert!(
            auth.authenticate(login("van-1", Some("van-1"), Some("nope")))
                .await
                .is_err()
        );
        assert!(auth.cache.lock().unwrap().is_empty());
        auth.authenticate(login("van-1", Some("van-1"), Some("s3cret-pw")))
            .await
            .unwrap();
        assert!(auth.cached("van-1", &phc, &auth.tag("van-1", "s3cret-pw")));
        assert!(!auth.cached("van-1", &phc, &auth.tag("van-1", "other")));
        // A cached success does not let another password in.
        assert_eq!(
            auth.authenticate(login("van-1", Some("van-1"), Some("s3cret-pwX")))
                .await,
            Err(AuthRefusal::BadPassword)
        );
        fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn a_changed_file_is_reloaded() {
        let path = temp_path("reload");
        let mut file = CredentialsFile::open(&path).unwrap();
        file.add_device(
            "van-1",
            &shared::FleetId::new("f").unwrap(),
            NewPassword::Generate,
        )
        .unwrap();
        file.save().unwrap();
        let auth = Authenticator::load(&path).unwrap();

        let mut file = CredentialsFile::open(&path).unwrap();
        let van2 = file
            .add_device(
                "van-2",
                &shared::FleetId::new("f").unwrap(),
                NewPassword::Generate,
            )
            .unwrap();
        file.save().unwrap();
        // Within the check interval the old credentials stay...
        assert_eq!(
            auth.authenticate(login("van-2", Some("van-2"), Some(&van2.password)))
                .await,
            Err(AuthRefusal::UnknownUser)
        );
        // ...and after it the new device is known.
        auth.loaded.write().unwrap().watch.expire();
        assert!(
            auth.authenticate(login("van-2", Some("van-2"), Some(&van2.password)))
                .await
                .is_ok()
        );

        // A broken file keeps what was loaded.
        fs::write(&path, "garbage [").unwrap();
        auth.loaded.write().unwrap().watch.expire();
        assert!(auth.credentials().device("van-2").is_some());
        fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn failed_logins_are_throttled_before_argon2_but_a_verified_password_gets_in() {
        let phc = FAST_PHC_OF_SECRET();
        let path = temp_path("throttle");
        fs::write(
            &path,
            format!(
                "[devices.van-1]\npassword = \"{phc}\"\nkey = \"{}\"\nfleet = \"f\"\n",
                "00".repeat(32)
            ),
        )
        .unwrap();
        let settings = AuthSettings {
            max_login_failures: 3,
            max_password_checks: 1,
            ..AuthSettings::default()
        };
        let auth = Authenticator::load_with(&path, settings).unwrap();
        // The device logs in once: its password is verified and remembered.
        let good = Some("s3cret-pw");
        assert!(
            auth.authenticate(login("van-1", Some("van-1"), good))
                .await
                .is_ok()
        );
        let attacker = |password| Attempt {
            peer: IpAddr::from([192, 0, 2, 1]),
            ..login("van-1", Some("van-1"), password)
        };
        for _ in 0..3 {
            assert_eq!(
                auth.authenticate(attacker(Some("guess"))).await,
                Err(AuthRefusal::BadPassword)
            );
        }
        // Now refused unchecked, even the right password from that address...
        for _ in 0..1000 {
            assert_eq!(
                auth.authenticate(attacker(Some("guess-again"))).await,
                Err(AuthRefusal::Throttled)
            );
        }
        assert!(
            auth.hashing.available_permits() == 1,
            "no argon2 check is running"
        );
        // ...and for that name from elsewhere, unless the password is one verified before.
        let elsewhere = Attempt {
            peer: IpAddr::from([192, 0, 2, 2]),
            ..login("van-1", Some("van-1"), Some("other"))
        };
        assert_eq!(
            auth.authenticate(elsewhere).await,
            Err(AuthRefusal::Throttled)
        );
        assert!(
            auth.authenticate(login("van-1", Some("van-1"), good))
                .await
                .is_ok()
        );
        // Unknown users count per address.
        let prober = |user| Attempt {
            peer: IpAddr::from([192, 0, 2, 3]),
            ..login(user, Some(user), Some("x"))
        };
        for user in ["u1", "u2", "u3"] {
            assert_eq!(
                auth.authenticate(prober(user)).await,
                Err(AuthRefusal::UnknownUser)
            );
        }
        assert_eq!(
            auth.authenticate(prober("u4")).await,
            Err(AuthRefusal::Throttled)
        );
        fs::remove_file(&path).unwrap();
    }

    // Measurements (run by hand, in release mode, see docs/broker.md):
    //   cargo test -p broker --release --lib measure_ -- --ignored --nocapture

    /// What one password check costs, cold (argon2) and warm (the cache).
    #[tokio::test]
    #[ignore = "a measurement, run by hand in release mode"]
    async fn measure_auth_cost_per_connect() {
        let path =
            std::env::temp_dir().join(format!("fleetbeat-measure-{}.toml", std::process::id()));
        let mut file = CredentialsFile::open(&path).unwrap();
        let generated = file
            .add_device(
                "van-1",
                &shared::FleetId::new("f").unwrap(),
                NewPassword::Generate,
            )
            .unwrap()
            .password;
        let chosen = "a person's passphrase".to_owned();
        file.add_device(
            "van-2",
            &shared::FleetId::new("f").unwrap(),
            NewPassword::Given(chosen.clone()),
        )
        .unwrap();
        file.save().unwrap();
        let settings = AuthSettings {
            max_login_failures: 0,
            ..AuthSettings::default()
        };
        let auth = Authenticator::load_with(&path, settings).unwrap();
        for (user, password, params) in [
            ("van-1", &generated, GENERATED_PARAMS),
            ("van-2", &chosen, CHOSEN_PARAMS),
        ] {
            let rounds = 20;
            let started = Instant::now();
            for _ in 0..rounds {
                // A wrong password is never cached: every check runs argon2.
                let wrong = format!("{password}x");
                assert!(
                    auth.authenticate(login(user, Some(user), Some(&wrong)))
                        .await
                        .is_err()
                );
            }
            let cold = started.elapsed() / rounds;
            auth.authenticate(login(user, Some(user), Some(password)))
                .await
                .unwrap();
            let started = Instant::now();
            for _ in 0..1000 {
                auth.authenticate(login(user, Some(user), Some(password)))
                    .await
                    .unwrap();
            }
            let warm = started.elapsed() / 1000;
            println!(
                "argon2id m={} KiB t={} p={}: cold check {cold:?}, cached check {warm:?}",
                params.0, params.1, params.2
            );
        }
        std::fs::remove_file(&path).ok();
    }
}
