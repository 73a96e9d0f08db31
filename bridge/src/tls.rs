//! The bridge's TLS configurations, made from PEM files with rustls and its ring provider
//! (never a process-wide default provider): the HTTPS server's ([`server_config`], served by
//! `api::https`) and the MQTT client's ([`client_config`], used by `ingest::mqtt`).
//!
//! No system root store is built in: a client trusts exactly the CA bundle it is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// Why a TLS configuration could not be made.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable of what was asked.
    #[error("reading {}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file (or CA bundle) holds no certificate.
    #[error("{}: no certificate in it", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificates or the key (e.g. a key that does not match the
    /// certificate, a CA certificate it cannot parse).
    #[error("{what}: {source}")]
    Rustls {
        /// What was being configured, with the files involved.
        what: String,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
}

/// A certificate (chain, leaf first) and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The ring provider, for every configuration the bridge builds.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of the PEM file at `path`, in order (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of the PEM file at `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        source,
    })
}

fn refused(what: String) -> impl FnOnce(rustls::Error) -> TlsError {
    move |source| TlsError::Rustls { what, source }
}

/// The HTTPS server's configuration: the certificate chain in `cert` (leaf first) and its key
/// in `key`, TLS 1.2 and 1.3, ALPN `http/1.1` (what the bridge's HTTP server speaks; Socket.IO's
/// WebSocket upgrade needs HTTP/1.1).
///
/// # Errors
/// [`TlsError`] if a file cannot be read, holds no certificate or key, or the key does not
/// match the certificate.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let what = || format!("certificate {} with key {}", cert.display(), key.display());
    let chain = certificates(cert)?;
    let key = private_key(key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(refused(what()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(refused(what()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The MQTT client's configuration: trusts the CA certificates of the PEM bundle `ca` (and
/// nothing else), and presents `client` (certificate chain, key) if given (mutual TLS).
///
/// # Errors
/// [`TlsError`] if a file cannot be read, the bundle holds no usable CA certificate, or the
/// client key does not match its certificate.
pub(crate) fn client_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots
            .add(cert)
            .map_err(refused(format!("CA bundle {}", ca.display())))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(refused(format!("CA bundle {}", ca.display())))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(refused(format!(
                "client certificate {} with key {}",
                cert.display(),
                key.display()
            )))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Certificates for the unit tests, made with rcgen.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    use super::TlsFiles;

    /// A self-signed certificate for `localhost` and its key, written as `dir/{name}.pem` and
    /// `dir/{name}-key.pem`.
    pub(crate) fn self_signed(dir: &Path, name: &str) -> TlsFiles {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let files = TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.key, made.signing_key.serialize_pem()).expect("write the key");
        std::fs::write(&files.cert, made.cert.pem()).expect("write the certificate");
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("nope.pem");
        let err = server_config(&missing, &missing).expect_err("missing");
        assert!(err.to_string().contains("nope.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a pem\n").expect("write");
        let err = client_config(&empty, None).expect_err("empty");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("empty.pem"), "{err}");
    }
}
