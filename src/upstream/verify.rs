//! How mailmoat trusts the receiver's certificate: a CA file, a pinned
//! leaf (`pin_sha256`), or both. Built once per upstream, when the config is
//! loaded, so a bad CA file is an error at start or reload, not per client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{VerifierBuilderError, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::files::{self, ReadError};

/// A CA file larger than this is not a CA file.
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;

/// An upstream's CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "{key}: cannot use {}: {problem}; give a PEM file with the CA certificates that sign the \
     receiver's certificate",
    path.display()
)]
pub struct CaFileError {
    /// The setting: `upstream.ca_file`, `upstreams.NAME.ca_file`.
    pub key: String,
    pub path: PathBuf,
    pub problem: CaFileProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum CaFileProblem {
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("{0}")]
    Pem(#[from] pem::Error),
    #[error("no CERTIFICATE block in it")]
    NoCertificate,
    #[error("{0}")]
    Certificate(#[from] rustls::Error),
    #[error("{0}")]
    Verifier(#[from] VerifierBuilderError),
}

/// The roots in a PEM file; `key` names the setting in errors.
pub fn root_store(path: &Path, key: &str) -> Result<RootCertStore, CaFileError> {
    roots_in(path).map_err(|problem| CaFileError {
        key: key.to_string(),
        path: path.to_path_buf(),
        problem,
    })
}

fn roots_in(path: &Path) -> Result<RootCertStore, CaFileProblem> {
    let pem = files::read_bounded(path, MAX_CA_FILE)?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(CaFileProblem::NoCertificate);
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The SHA-256 of a certificate (DER), lowercase hex: what `pin_sha256`
/// holds.
pub fn sha256_hex(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Accepts the receiver's leaf when its SHA-256 is the pinned one, whoever
/// signed it and whatever names it carries (a self-signed certificate on
/// the receiver is the usual case); with a CA too, the chain and name must
/// verify as well. The handshake's signatures are always verified, so the
/// receiver must hold the pinned certificate's key.
#[derive(Debug)]
pub struct PinVerifier {
    pin: String,
    key: String,
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    pub fn new(
        pin: &str,
        key: String,
        chain: Option<Arc<WebPkiServerVerifier>>,
        provider: Arc<CryptoProvider>,
    ) -> PinVerifier {
        PinVerifier {
            pin: pin.replace(':', "").to_ascii_lowercase(),
            key,
            chain,
            provider,
        }
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(chain) = &self.chain {
            chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        }
        let found = sha256_hex(end_entity);
        if found != self.pin {
            return Err(rustls::Error::General(format!(
                "the receiver's certificate has SHA-256 {found}, not the one in {}",
                self.key
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
