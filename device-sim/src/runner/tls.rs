//! TLS to the broker (`mqtts://`): the CA bundle and the per-vehicle client certificates of a
//! [`TlsConfig`], turned into the rustls client configurations the vehicles' links use.
//!
//! Without client certificates one configuration serves every vehicle; with a
//! [`TlsConfig::client_cert_dir`] each vehicle gets its own (a client certificate is part of
//! a rustls configuration), all sharing the one store of trusted CAs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use shared::VehicleId;

use crate::mqtt::TlsTarget;

/// How the vehicles speak TLS to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The PEM bundle of the CAs the broker's certificate must chain to (this build has no
    /// system root store, so it is required).
    pub ca_file: PathBuf,
    /// Mutual TLS: each vehicle presents the certificate `{dir}/{vehicle-id}.pem` (the chain,
    /// leaf first) with the private key `{dir}/{vehicle-id}-key.pem`. `None`: no client
    /// certificate.
    pub client_cert_dir: Option<PathBuf>,
}

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `mqtts://` without a CA file.
    #[error(
        "an mqtts:// broker needs --ca-file PATH (a PEM CA bundle): this build has no system root store"
    )]
    NoCaFile,
    /// TLS settings for a plain `mqtt://` broker.
    #[error("--ca-file and --client-cert-dir need an mqtts:// broker address")]
    NotMqtts,
    /// The CA file cannot be read or is not PEM.
    #[error("cannot read the CA file {path}")]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls_pki_types::pem::Error,
    },
    /// The CA file holds no certificate.
    #[error("the CA file {0} holds no PEM certificate")]
    NoCaCert(PathBuf),
    /// A certificate in the CA file cannot be a trust anchor.
    #[error("the CA file {path} holds an unusable certificate")]
    BadCaCert {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::Error,
    },
    /// The broker host cannot be checked against a certificate.
    #[error("the broker host {0:?} is neither a DNS name nor an IP address a certificate can name")]
    ServerName(String),
    /// The client certificate directory is not a directory.
    #[error("the client certificate directory {0} is not a directory")]
    ClientCertDir(PathBuf),
    /// A vehicle's certificate or key file cannot be read or holds nothing usable.
    #[error("cannot read {path}, the client certificate or key of {vehicle}")]
    ReadClientCert {
        /// The vehicle.
        vehicle: VehicleId,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls_pki_types::pem::Error,
    },
    /// A vehicle's certificate and key do not make a client identity (they do not match, or
    /// the key type is not supported).
    #[error("the client certificate and key of {vehicle} cannot be used")]
    ClientAuth {
        /// The vehicle.
        vehicle: VehicleId,
        /// The cause.
        source: rustls::Error,
    },
    /// No protocol version is shared by the crypto provider and rustls' safe defaults (a bug).
    #[error("cannot build a TLS client configuration")]
    Config(#[source] rustls::Error),
}

/// The TLS side of a run: the trusted CAs, the broker's name, and either the one
/// configuration every vehicle shares or where each vehicle's certificate lies.
#[derive(Debug)]
pub(super) struct FleetTls {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    server_name: ServerName<'static>,
    identity: Identity,
}

/// Whether the vehicles show certificates.
#[derive(Debug)]
enum Identity {
    /// No client certificates: one configuration for every vehicle.
    Shared(TlsTarget),
    /// Each vehicle's certificate and key lie in this directory.
    PerVehicle(PathBuf),
}

impl FleetTls {
    /// Reads the CA file and checks the broker host and the client certificate directory.
    ///
    /// # Errors
    /// [`TlsError`] names the file or setting that is wrong.
    pub(super) fn new(config: &TlsConfig, broker_host: &str) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(read_roots(&config.ca_file)?);
        let server_name = ServerName::try_from(broker_host.to_owned())
            .map_err(|_| TlsError::ServerName(broker_host.to_owned()))?;
        let identity = match &config.client_cert_dir {
            Some(dir) if !dir.is_dir() => return Err(TlsError::ClientCertDir(dir.clone())),
            Some(dir) => Identity::PerVehicle(dir.clone()),
            None => {
                let config = builder(&provider, &roots)?.with_no_client_auth();
                Identity::Shared(TlsTarget::new(Arc::new(config), server_name.clone()))
            }
        };
        Ok(Self {
            provider,
            roots,
            server_name,
            identity,
        })
    }

    /// How `vehicle` connects: the shared configuration, or one with its own certificate.
    ///
    /// # Errors
    /// [`TlsError::ReadClientCert`] or [`TlsError::ClientAuth`] for its certificate files.
    pub(super) fn for_vehicle(&self, vehicle: &VehicleId) -> Result<TlsTarget, TlsError> {
        let dir = match &self.identity {
            Identity::Shared(shared) => return Ok(shared.clone()),
            Identity::PerVehicle(dir) => dir,
        };
        let (cert_path, key_path) = client_cert_files(dir, vehicle);
        let read_error = |path: &Path| {
            let (vehicle, path) = (vehicle.clone(), path.to_path_buf());
            move |source| TlsError::ReadClientCert {
                vehicle,
                path,
                source,
            }
        };
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(read_error(&cert_path))?;
        if chain.is_empty() {
            return Err(read_error(&cert_path)(
                rustls_pki_types::pem::Error::NoItemsFound,
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(read_error(&key_path))?;
        let config = builder(&self.provider, &self.roots)?
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::ClientAuth {
                vehicle: vehicle.clone(),
                source,
            })?;
        Ok(TlsTarget::new(Arc::new(config), self.server_name.clone()))
    }
}

/// A configuration builder with the ring provider, rustls' safe protocol versions and the
/// trusted CAs.
fn builder(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    Ok(ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(Arc::clone(roots)))
}

/// A vehicle's certificate and key files in `dir`: `{id}.pem` and `{id}-key.pem`.
pub(super) fn client_cert_files(dir: &Path, vehicle: &VehicleId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{vehicle}.pem")),
        dir.join(format!("{vehicle}-key.pem")),
    )
}

/// Every certificate of the PEM file `path` as a trust anchor.
fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let read_error = |source| TlsError::ReadCa {
        path: path.to_path_buf(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(read_error)? {
        roots
            .add(cert.map_err(read_error)?)
            .map_err(|source| TlsError::BadCaCert {
                path: path.to_path_buf(),
                source,
            })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCaCert(path.to_path_buf()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test's files.
    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("device-sim-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    /// A self-signed CA certificate (its key was thrown away): a valid trust anchor.
    const FIXTURE_CA: &str = "\
-----BEGIN CERTIFICATE-----
MIIBmjCCAUGgAwIBAgIUKxrFzQTtliYC9nRC3J/Ccx9zlOAwCgYIKoZIzj0EAwIw
IjEgMB4GA1UEAwwXZGV2aWNlLXNpbSB1bml0IHRlc3QgQ0EwIBcNMjYxMjAzMjI0
MzAxWhgPMjEyNjExMDkyMjQzMDFaMCIxIDAeBgNVBAMMF2RldmljZS1zaW0gdW5p
dCB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEjJ2lcyS1LDxcvaOf
ATDNvrjnx6cF/Jt0450j8CKpo0Jtdg6y32Swb4C1NuE8RbtuNJ/ZUp972XxQ0Y9Y
nHyJ6aNTMFEwHQYDVR0OBBYEFGzxFa/WxHnb8r3sXxS6gk/qylCeMB8GA1UdIwQY
MBaAFGzxFa/WxHnb8r3sXxS6gk/qylCeMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZI
zj0EAwIDRwAwRAIgYRPKjSHETaFFODuMg2z1VLVeXoBUfPgFIhjkpOEHq9YCIGJD
xDG4Oi02k5+H2oreMKGDvaigOZ45rOFGpDwp3ngu
-----END CERTIFICATE-----
";

    fn config(ca_file: PathBuf) -> TlsConfig {
        TlsConfig {
            ca_file,
            client_cert_dir: None,
        }
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let err = FleetTls::new(&config("/nonexistent/ca.pem".into()), "localhost")
            .expect_err("no such file");
        assert!(
            matches!(&err, TlsError::ReadCa { path, .. } if path == Path::new("/nonexistent/ca.pem")),
            "{err:?}"
        );
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = temp_dir("empty");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("written");
        assert!(matches!(
            FleetTls::new(&config(empty.clone()), "localhost"),
            Err(TlsError::NoCaCert(path)) if path == empty
        ));
        // A key is PEM, but not a certificate.
        let key = dir.join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("written");
        assert!(matches!(
            FleetTls::new(&config(key), "localhost"),
            Err(TlsError::NoCaCert(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_broken_or_bogus_ca_certificate_is_refused() {
        let dir = temp_dir("bogus");
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").expect("written");
        assert!(matches!(
            FleetTls::new(&config(broken), "localhost"),
            Err(TlsError::ReadCa { .. })
        ));
        let bogus = dir.join("bogus.pem");
        std::fs::write(
            &bogus,
            "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
        )
        .expect("written");
        assert!(matches!(
            FleetTls::new(&config(bogus), "localhost"),
            Err(TlsError::BadCaCert { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_valid_ca_serves_every_vehicle_with_one_configuration() {
        let dir = temp_dir("valid");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, FIXTURE_CA).expect("written");
        for host in ["localhost", "broker.example", "127.0.0.1", "::1"] {
            let fleet = FleetTls::new(&config(ca.clone()), host).expect(host);
            let one = fleet
                .for_vehicle(&VehicleId::new("demo-0001").expect("valid"))
                .expect("shared");
            assert_eq!(one.server_name().to_str(), host);
        }
        assert!(matches!(
            FleetTls::new(&config(ca.clone()), "not a host name!"),
            Err(TlsError::ServerName(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn client_certificates_must_exist() {
        let dir = temp_dir("client");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, FIXTURE_CA).expect("written");
        let missing_dir = TlsConfig {
            ca_file: ca.clone(),
            client_cert_dir: Some(dir.join("nowhere")),
        };
        assert!(matches!(
            FleetTls::new(&missing_dir, "localhost"),
            Err(TlsError::ClientCertDir(_))
        ));
        let per_vehicle = TlsConfig {
            ca_file: ca,
            client_cert_dir: Some(dir.clone()),
        };
        let fleet = FleetTls::new(&per_vehicle, "localhost").expect("valid");
        let vehicle = VehicleId::new("demo-0001").expect("valid");
        let err = fleet.for_vehicle(&vehicle).expect_err("no certificate");
        assert!(
            matches!(&err, TlsError::ReadClientCert { path, .. } if path == &dir.join("demo-0001.pem")),
            "{err:?}"
        );
        // A certificate without its key.
        std::fs::write(dir.join("demo-0001.pem"), FIXTURE_CA).expect("written");
        let err = fleet.for_vehicle(&vehicle).expect_err("no key");
        assert!(
            matches!(&err, TlsError::ReadClientCert { path, .. } if path == &dir.join("demo-0001-key.pem")),
            "{err:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn client_certificates_are_named_after_the_vehicle() {
        let vehicle = VehicleId::new("demo-0001").expect("valid");
        let (cert, key) = client_cert_files(Path::new("/certs"), &vehicle);
        assert_eq!(cert, Path::new("/certs/demo-0001.pem"));
        assert_eq!(key, Path::new("/certs/demo-0001-key.pem"));
    }
}
