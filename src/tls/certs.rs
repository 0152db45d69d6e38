//! One certificate from its files: a PEM chain (leaf first) and the private
//! key that goes with it, checked against each other, and the leaf's expiry.
//!
//! Whatever the files hold, loading returns an error naming the file and
//! saying what to give instead; it never panics. Files are read whole but
//! bounded ([`MAX_PEM_BYTES`], [`files::read_bounded`]): a chain is a few
//! kilobytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::files::{self, ReadError};

/// The largest certificate or key file read. Long chains with big RSA keys
/// stay under 20 KiB.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}; check the path and that mailmoat may read it", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is larger than {MAX_PEM_BYTES} bytes; give a PEM file holding the certificate chain or the key", path.display())]
    TooLarge { path: PathBuf },
    #[error("{} is not valid PEM ({detail}); give the certificate chain as PEM, leaf first", path.display())]
    BadPem { path: PathBuf, detail: String },
    #[error("{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\"); give the certificate chain, leaf first", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not a PEM private key; give the key that matches {}", path.display(), certificate.display())]
    NoKey { path: PathBuf, certificate: PathBuf },
    #[error("the private key in {} cannot be used ({detail}); give an RSA, ECDSA (P-256, P-384) or Ed25519 key as PKCS#8, PKCS#1 or SEC1 PEM", path.display())]
    UnusableKey { path: PathBuf, detail: String },
    #[error("the first certificate in {} cannot be parsed ({detail}); give the chain as PEM, leaf first", path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error("the private key in {} does not match the certificate in {}; give the key issued with that certificate (and the leaf first in the chain)", path.display(), certificate.display())]
    KeyMismatch { path: PathBuf, certificate: PathBuf },
}

impl CertError {
    /// The file at fault, for the log's `file` field.
    pub fn path(&self) -> &Path {
        match self {
            CertError::Read { path, .. }
            | CertError::TooLarge { path }
            | CertError::BadPem { path, .. }
            | CertError::NoCertificate { path }
            | CertError::NoKey { path, .. }
            | CertError::UnusableKey { path, .. }
            | CertError::BadCertificate { path, .. }
            | CertError::KeyMismatch { path, .. } => path,
        }
    }
}

/// A certificate ready to present.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// The leaf's notAfter, Unix seconds.
    pub not_after: i64,
}

/// Reads the chain in `certificate` and the key in `key` (the same file may
/// hold both), and checks that the key is the leaf's.
pub fn load(certificate: &Path, key: &Path) -> Result<Loaded, CertError> {
    let chain_pem = read_bounded(certificate)?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(certificate, e))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: certificate.to_path_buf(),
        });
    };
    let not_after = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, parsed)) => parsed.validity().not_after.timestamp(),
        Err(e) => {
            return Err(CertError::BadCertificate {
                path: certificate.to_path_buf(),
                detail: e.to_string(),
            })
        }
    };

    let key_pem = if key == certificate {
        chain_pem
    } else {
        read_bounded(key)?
    };
    let private = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(pem::Error::NoItemsFound) => {
            return Err(CertError::NoKey {
                path: key.to_path_buf(),
                certificate: certificate.to_path_buf(),
            })
        }
        Err(e) => return Err(bad_pem(key, e)),
    };
    let signing = super::configs::provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| CertError::UnusableKey {
            path: key.to_path_buf(),
            detail: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // ring's keys all know their public half; a key that cannot say is
        // let through rather than refused on a guess.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(CertError::KeyMismatch {
                path: key.to_path_buf(),
                certificate: certificate.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(CertError::BadCertificate {
                path: certificate.to_path_buf(),
                detail: e.to_string(),
            })
        }
    }
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, CertError> {
    files::read_bounded(path, MAX_PEM_BYTES).map_err(|e| match e {
        ReadError::Io(source) => CertError::Read {
            path: path.to_path_buf(),
            source,
        },
        ReadError::TooLarge { .. } => CertError::TooLarge {
            path: path.to_path_buf(),
        },
    })
}

fn bad_pem(path: &Path, e: pem::Error) -> CertError {
    CertError::BadPem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::generate;
    use crate::tls::testing::TempDir;

    #[test]
    fn a_chain_and_its_key_load_with_the_leafs_expiry() {
        let dir = TempDir::new("certs-ok");
        let generated = generate::self_signed(&["mx.example.org"]).unwrap();
        let (cert, key) = generated.write_in(dir.path(), "mx").unwrap();
        let loaded = load(&cert, &key).unwrap();
        assert_eq!(loaded.not_after, generated.not_after);
        assert_eq!(loaded.key.cert.len(), 1);

        // One file holding both, as some operators keep them.
        let both = dir.path().join("both.pem");
        std::fs::write(
            &both,
            format!("{}{}", generated.cert_pem, generated.key_pem),
        )
        .unwrap();
        assert!(load(&both, &both).is_ok());
    }

    #[test]
    fn a_key_not_matching_the_certificate_is_refused_naming_the_key_file() {
        let dir = TempDir::new("certs-mismatch");
        let (cert, _) = generate::self_signed(&["mx.example.org"])
            .unwrap()
            .write_in(dir.path(), "one")
            .unwrap();
        let (_, other_key) = generate::self_signed(&["mx.example.org"])
            .unwrap()
            .write_in(dir.path(), "two")
            .unwrap();
        let err = load(&cert, &other_key).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
        assert_eq!(err.path(), other_key);
        let text = err.to_string();
        assert!(text.contains(&other_key.display().to_string()), "{text}");
        assert!(text.contains("does not match"), "{text}");
    }

    #[test]
    fn any_file_content_is_an_error_naming_the_file_never_a_panic() {
        let dir = TempDir::new("certs-garbage");
        let generated = generate::self_signed(&["mx.example.org"]).unwrap();
        let (cert, key) = generated.write_in(dir.path(), "good").unwrap();
        let bad = dir.path().join("bad.pem");
        let half_cert = &generated.cert_pem[..generated.cert_pem.len() / 2];
        let cert_as_garbage_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let cases: &[&[u8]] = &[
            b"",
            b"\xff\xfe\x00garbage",
            half_cert.as_bytes(),
            cert_as_garbage_der.as_bytes(),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        ];
        for content in cases {
            std::fs::write(&bad, content).unwrap();
            for (c, k) in [(&bad, &key), (&cert, &bad)] {
                let err = load(c, k).expect_err("garbage loaded");
                assert_eq!(err.path(), bad.as_path(), "{err}");
                assert!(err.to_string().contains("bad.pem"), "{err}");
            }
        }
        // A certificate where the key belongs says which key to give.
        let err = load(&cert, &cert).unwrap_err();
        assert!(matches!(err, CertError::NoKey { .. }), "{err:?}");
        assert!(
            err.to_string().contains("is not a PEM private key"),
            "{err}"
        );

        let missing = dir.path().join("missing.pem");
        assert!(matches!(load(&missing, &key), Err(CertError::Read { .. })));
        let huge = dir.path().join("huge.pem");
        std::fs::write(&huge, vec![b'A'; MAX_PEM_BYTES as usize + 1]).unwrap();
        assert!(matches!(load(&huge, &key), Err(CertError::TooLarge { .. })));
    }
}
