//! MQTT over TLS: the server certificate chain and key, and the CA of client certificates
//! (mutual TLS), loaded from PEM files into a rustls [`ServerConfig`] ([`ServerTls`]); the
//! files reloaded when they change; the vehicle id a verified client certificate names
//! ([`certificate_vehicle_id`]).
//!
//! # Reload
//!
//! Every new TLS connection asks [`ServerTls::current`] for the configuration; at most once per
//! [`FileWatch::INTERVAL`] that looks at the files' modification times and sizes, and rebuilds
//! the configuration if one changed. A new handshake then uses the new certificate;
//! established connections keep theirs. Files that do not load (half written, a key that
//! does not match the certificate) are reported with an ERROR and counted
//! (`fleetbeat_broker_tls_reload_failures_total`): the previous configuration stays in use
//! until the files change again.
//!
//! rustls uses the `ring` provider, set on each configuration (never the process default).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{error, info, warn};
use x509_parser::extensions::GeneralName;

use crate::config::{BrokerConfig, ClientCerts};
use crate::error::TlsError;
use crate::file_watch::FileWatch;
use crate::metrics::BrokerMetrics;

/// How often at most a failed TLS handshake is logged (the others are counted only).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where the TLS files are, and whether client certificates are asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    /// The certificate chain (PEM).
    pub(crate) cert: PathBuf,
    /// Its private key (PEM).
    pub(crate) key: PathBuf,
    /// The CA certificates of client certificates (PEM), if any.
    pub(crate) client_ca: Option<PathBuf>,
    /// Whether client certificates are asked for (only with `client_ca`).
    pub(crate) client_certs: ClientCerts,
}

impl TlsFiles {
    /// The TLS files of `config`, if it has a TLS listener.
    pub(crate) fn of(config: &BrokerConfig) -> Option<TlsFiles> {
        config.tls_listeners().next()?;
        Some(TlsFiles {
            cert: config.tls_cert.clone()?,
            key: config.tls_key.clone()?,
            client_ca: config.tls_client_ca.clone(),
            client_certs: config.tls_client_certs,
        })
    }

    /// The files to watch: certificate, key, client CA.
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }
}

/// The configuration in force, and what the files looked like when it was loaded.
#[derive(Debug)]
struct Loaded {
    config: Arc<ServerConfig>,
    watches: Vec<FileWatch>,
}

/// The TLS listeners' rustls configuration, swapped for a new one when the files change.
#[derive(Debug)]
pub(crate) struct ServerTls {
    files: TlsFiles,
    loaded: RwLock<Loaded>,
    metrics: BrokerMetrics,
    /// When a failed handshake was last logged, and how many were not logged since.
    failure_log: Mutex<(Option<Instant>, u64)>,
}

impl ServerTls {
    /// Loads `files`.
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the file that cannot be read or used.
    pub(crate) fn load(files: TlsFiles, metrics: BrokerMetrics) -> Result<ServerTls, TlsError> {
        let watches = files.paths().map(FileWatch::new).collect();
        let config = build(&files)?;
        Ok(ServerTls {
            files,
            loaded: RwLock::new(Loaded {
                config: Arc::new(config),
                watches,
            }),
            metrics,
            failure_log: Mutex::new((None, 0)),
        })
    }

    /// Whether client certificates are asked for at all.
    pub(crate) fn asks_for_client_certs(&self) -> bool {
        self.files.client_ca.is_some() && self.files.client_certs != ClientCerts::Off
    }

    /// The configuration for a new handshake (reloaded first if the files changed).
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        self.reload_if_changed();
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&loaded.config)
    }

    /// Rebuilds the configuration if a file changed (looked at once per
    /// [`FileWatch::INTERVAL`] at most); files that do not load keep the previous one.
    fn reload_if_changed(&self) {
        {
            let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
            if !loaded.watches.iter().any(FileWatch::due) {
                return;
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        // Every watch looks (no short circuit), so each remembers what it saw.
        let changed = loaded
            .watches
            .iter_mut()
            .zip(self.files.paths())
            .fold(false, |changed, (watch, path)| {
                watch.changed(path) | changed
            });
        if !changed {
            return;
        }
        match build(&self.files) {
            Ok(config) => {
                loaded.config = Arc::new(config);
                self.metrics.tls_reloaded(true);
                info!(cert = %self.files.cert.display(), "TLS files changed: reloaded, new connections use them");
            }
            Err(err) => {
                self.metrics.tls_reloaded(false);
                error!(cause = %err, "TLS files changed but do not load: keeping the previous certificate");
            }
        }
    }

    /// Makes the next [`Self::current`] look at the files at once (tests).
    #[cfg(test)]
    fn expire(&self) {
        let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        for watch in &mut loaded.watches {
            watch.expire();
        }
    }

    /// Counts a failed handshake and logs it, at most once per [`FAILURE_LOG_INTERVAL`]
    /// (with how many were not logged since).
    pub(crate) fn handshake_failed(
        &self,
        peer: std::net::SocketAddr,
        cause: &dyn std::fmt::Display,
    ) {
        self.metrics.tls_handshake_failed();
        let mut log = self
            .failure_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (last, unlogged) = &mut *log;
        if last.is_some_and(|at| at.elapsed() < FAILURE_LOG_INTERVAL) {
            *unlogged += 1;
            return;
        }
        warn!(%peer, cause = %cause, not_logged_since = *unlogged, "TLS handshake failed (logged at most every 10 s; all are counted in fleetbeat_broker_tls_handshake_failures_total)");
        *last = Some(Instant::now());
        *unlogged = 0;
    }
}

/// Reads the files into a rustls configuration.
fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs("certificate", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|err| pem_error("key", &files.key, err))?;
    let unusable = |paths: &[&Path], err: &dyn std::fmt::Display| TlsError::Unusable {
        paths: paths.iter().map(|p| p.display().to_string()).collect(),
        message: err.to_string(),
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|err| unusable(&[&files.cert], &err))?;
    let builder = match (&files.client_ca, files.client_certs) {
        (Some(ca), ClientCerts::Optional | ClientCerts::Required) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("client CA", ca)? {
                roots.add(cert).map_err(|err| unusable(&[ca], &err))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.client_certs == ClientCerts::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|err| unusable(&[ca], &err))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|err| unusable(&[&files.cert, &files.key], &err))
}

/// The certificates of a PEM file; at least one.
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| pem_error(what, path, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(what, path, err))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

fn pem_error(what: &'static str, path: &Path, err: rustls_pki_types::pem::Error) -> TlsError {
    match err {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: if what == "key" {
                "private key"
            } else {
                "certificate"
            },
        },
        other => TlsError::Read {
            what,
            path: path.to_owned(),
            message: other.to_string(),
        },
    }
}

/// The vehicle id a (verified) client certificate names: its subject's common name, else its
/// first DNS subject alternative name. `None` if it names none, or cannot be parsed.
pub(crate) fn certificate_vehicle_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty());
    if let Some(cn) = common_name {
        return Some(cn.to_owned());
    }
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) if !dns.is_empty() => Some((*dns).to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        SanType,
    };

    use super::*;

    /// A CA that signs certificates, as PEM strings.
    struct Ca(Issuer<'static, KeyPair>);

    impl Ca {
        fn new() -> Ca {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            Ca(Issuer::new(params, key))
        }

        /// (certificate, key) for `params`.
        fn sign(&self, params: CertificateParams) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.0).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        fn server(&self) -> (String, String) {
            self.sign(CertificateParams::new(vec!["localhost".to_owned()]).unwrap())
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn the_vehicle_id_is_the_common_name_else_the_first_dns_name() {
        let ca = Ca::new();
        let mut params = CertificateParams::new(vec!["van-9.example".to_owned()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "van-1");
        let (cert, _) = ca.sign(params);
        assert_eq!(
            certificate_vehicle_id(&der(&cert)).as_deref(),
            Some("van-1")
        );

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![
            SanType::IpAddress([10, 0, 0, 1].into()),
            SanType::DnsName("van-2".try_into().unwrap()),
        ];
        let (cert, _) = ca.sign(params);
        assert_eq!(
            certificate_vehicle_id(&der(&cert)).as_deref(),
            Some("van-2")
        );

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let (cert, _) = ca.sign(params);
        assert_eq!(certificate_vehicle_id(&der(&cert)), None);
        assert_eq!(
            certificate_vehicle_id(&CertificateDer::from(vec![1, 2, 3])),
            None
        );
    }

    fn files_in(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
            client_certs: ClientCerts::Optional,
        }
    }

    #[test]
    fn missing_empty_and_mismatched_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let err = build(&files).unwrap_err();
        assert!(
            matches!(
                &err,
                TlsError::Read {
                    what: "certificate",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("cert.pem"), "{err}");

        let ca = Ca::new();
        let (cert, key) = ca.server();
        std::fs::write(&files.cert, &cert).unwrap();
        std::fs::write(&files.key, "not a key").unwrap();
        let err = build(&files).unwrap_err();
        assert!(matches!(&err, TlsError::Empty { what: "key", .. }), "{err}");
        assert!(err.to_string().contains("key.pem"), "{err}");

        // Another certificate's key.
        let (_, other_key) = ca.server();
        std::fs::write(&files.key, &other_key).unwrap();
        let err = build(&files).unwrap_err();
        assert!(matches!(&err, TlsError::Unusable { .. }), "{err}");

        std::fs::write(&files.key, &key).unwrap();
        build(&files).unwrap();

        let with_ca = TlsFiles {
            client_ca: Some(dir.path().join("none.pem")),
            ..files
        };
        let err = build(&with_ca).unwrap_err();
        assert!(err.to_string().contains("none.pem"), "{err}");
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_previous_config() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new();
        let (cert, key) = ca.server();
        std::fs::write(&files.cert, &cert).unwrap();
        std::fs::write(&files.key, &key).unwrap();
        let metrics = BrokerMetrics::default();
        let tls = ServerTls::load(files.clone(), metrics.clone()).unwrap();
        let first = tls.current();
        assert!(
            Arc::ptr_eq(&first, &tls.current()),
            "unchanged: the same config"
        );

        let (cert, key) = ca.server();
        std::fs::write(&files.key, &key).unwrap();
        std::fs::write(&files.cert, &cert).unwrap();
        tls.expire();
        let second = tls.current();
        assert!(!Arc::ptr_eq(&first, &second), "reloaded");
        assert_eq!(metrics.tls_reloads_total(), 1);

        std::fs::write(&files.cert, "garbage").unwrap();
        tls.expire();
        assert!(Arc::ptr_eq(&second, &tls.current()), "broken: kept");
        assert_eq!(metrics.tls_reload_failures_total(), 1);
    }
}
