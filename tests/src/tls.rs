//! Certificates the TLS tests make themselves with `rcgen`: a test CA, a server certificate
//! for `localhost` and `127.0.0.1`, and client certificates whose common name is a vehicle id.
//! Everything is written as PEM files into a directory the test owns.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A test certificate authority and the files it has written.
pub struct TestPki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM): what clients trust (`--cafile`, `ca_file`).
    pub ca: PathBuf,
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl TestPki {
    /// A new CA named `name`, its certificate written to `dir/{name}-ca.pem`.
    ///
    /// # Errors
    /// If a key cannot be made or a file cannot be written.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<TestPki> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params.self_signed(&key).context("signing the CA")?;
        let ca = dir.join(format!("{name}-ca.pem"));
        fs::write(&ca, cert.pem()).with_context(|| format!("writing {}", ca.display()))?;
        Ok(TestPki {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca,
        })
    }

    /// A server certificate for `localhost` and `127.0.0.1`, written as `dir/{file}.pem` and
    /// `dir/{file}-key.pem`. Call it again with the same `file` to replace the files (a
    /// renewed certificate).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn server(&self, file: &str) -> anyhow::Result<CertFiles> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).context("server params")?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, file)
    }

    /// A client certificate whose common name is `name` (a vehicle id), written as
    /// `dir/{name}.pem` and `dir/{name}-key.pem`.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn client(&self, name: &str) -> anyhow::Result<CertFiles> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, name)
    }

    fn issue(&self, params: CertificateParams, file: &str) -> anyhow::Result<CertFiles> {
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a certificate")?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        // Key first, then the certificate: a watcher that reloads on the certificate's change
        // finds the matching key already there.
        write_replacing(&files.key, &key.serialize_pem())?;
        write_replacing(&files.cert, &cert.pem())?;
        Ok(files)
    }
}

/// Writes `text` to `path` through a temporary file and a rename, as an operator's
/// certificate renewal (certbot, cert-manager) does: a reader never sees half a file.
fn write_replacing(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("pem.tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
