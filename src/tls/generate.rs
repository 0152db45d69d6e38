//! Certificates made on the spot (rcgen) for tests, benches and the demo:
//! a self-signed one, or a tiny CA issuing leaves, so a client can verify a
//! receiver against a CA file as it would in production.
//!
//! Keys are ECDSA P-256: handshakes stay cheap. Certificates are valid
//! from an hour ago (clock skew) for [`VALIDITY`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// How long a generated certificate is valid.
pub const VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Generating a certificate, or making it usable by rustls, failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot use a generated certificate: {0}")]
    Use(#[from] rustls::Error),
}

/// A certificate and its key, as PEM.
#[derive(Clone, Debug)]
pub struct GeneratedCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's notAfter, Unix seconds.
    pub not_after: i64,
    cert_der: CertificateDer<'static>,
    /// PKCS#8, as rcgen serializes it.
    key_der: Vec<u8>,
}

impl GeneratedCert {
    fn new(cert: &rcgen::Certificate, key: &KeyPair, not_after: i64) -> GeneratedCert {
        GeneratedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// The certificate, DER: what a client's root store or a pin takes.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The certificate and its key as rustls presents them, for
    /// [`server_config`](super::server_config) through
    /// [`rustls::sign::SingleCertAndKey`].
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, rustls::Error> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let signing = super::configs::provider()
            .key_provider
            .load_private_key(key)?;
        Ok(Arc::new(CertifiedKey::new(
            vec![self.cert_der.clone()],
            signing,
        )))
    }

    /// Writes `<stem>.crt` and `<stem>.key` in `dir`, each replaced whole
    /// (written aside, then renamed over), as certbot's links change: a
    /// watcher never reads half a file. Returns their paths.
    pub fn write_in(&self, dir: &Path, stem: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        replace(&cert, &self.cert_pem)?;
        replace(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

fn replace(path: &Path, content: &str) -> std::io::Result<()> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".new");
    std::fs::write(&aside, content)?;
    std::fs::rename(&aside, path)
}

/// A certificate for `names` (DNS names; the first is also the subject's
/// common name), signed by its own key.
pub fn self_signed(names: &[&str]) -> Result<GeneratedCert, rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let (params, not_after) = leaf_params(names)?;
    let cert = params.self_signed(&key)?;
    Ok(GeneratedCert::new(&cert, &key, not_after))
}

/// A certificate authority that lives as long as the test: its certificate
/// goes in the verifier's CA file, its leaves on the servers.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Authority {
    pub fn new() -> Result<Authority, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "mailmoat test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) = validity();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// A leaf for `names`, signed by this authority. Its `cert_pem` is the
    /// leaf alone: verifiers hold the authority's certificate.
    pub fn issue(&self, names: &[&str]) -> Result<GeneratedCert, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let (params, not_after) = leaf_params(names)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(GeneratedCert::new(&cert, &key, not_after))
    }

    /// The authority's certificate, PEM: the CA file of a verifier.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
}

fn leaf_params(names: &[&str]) -> Result<(CertificateParams, i64), rcgen::Error> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone())?;
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (not_before, not_after) = validity();
    params.not_before = not_before;
    params.not_after = not_after;
    Ok((params, not_after.unix_timestamp()))
}

/// Whole seconds: certificates carry no fractions, and `not_after` must
/// read back as written.
fn validity() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    (
        now - time::Duration::hours(1),
        now + time::Duration::seconds(VALIDITY.as_secs() as i64),
    )
}
