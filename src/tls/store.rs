//! The certificates mailmoat presents: the default one and an SNI map,
//! reloaded in place.
//!
//! The names are fixed by the config; what a reload changes is the loaded
//! certificate of each entry, swapped whole in an `ArcSwap`. A handshake
//! takes the entry current when its ClientHello arrives; sessions already
//! established keep the keys they negotiated and never notice.
//!
//! A reload re-reads every entry. An entry whose new files fail to load
//! keeps its certificate in force and the failure is logged (naming the
//! file) and counted; the others are replaced. Nothing is unset by a bad
//! renewal: the old certificate serves until it expires, and the expiry
//! alert says so in time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::{self, CertError};
use super::TlsError;
use crate::config::TlsSettings;
use crate::metrics::TlsMetrics;

/// The label of the default certificate in metrics and logs.
pub const DEFAULT_LABEL: &str = "default";

/// One configured certificate.
#[derive(Clone, Debug)]
struct Entry {
    /// `default`, or the first name of an SNI entry: bounded by the config.
    label: String,
    /// Where the entry is in the config: `tls` or `tls.sni[N]` (from 1).
    setting: String,
    certificate: PathBuf,
    key: PathBuf,
}

impl Entry {
    /// The setting naming the file `error` is about.
    fn key_of(&self, error: &CertError) -> String {
        let which = match error {
            CertError::NoKey { .. }
            | CertError::UnusableKey { .. }
            | CertError::KeyMismatch { .. } => "key",
            _ if error.path() == self.certificate => "certificate",
            _ => "key",
        };
        format!("{}.{which}", self.setting)
    }
}

pub struct CertStore {
    /// `entries[0]` is the default.
    entries: Vec<Entry>,
    /// Exact names (lowercase, no trailing dot) → entry.
    exact: HashMap<String, usize>,
    /// `*.example.org` stored as `example.org` → entry.
    wildcard: HashMap<String, usize>,
    /// The certificate in force per entry, same order as `entries`.
    current: ArcSwap<Vec<Arc<CertifiedKey>>>,
    /// One reload at a time: two interleaved could store an older read last.
    reloading: Mutex<()>,
    metrics: TlsMetrics,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads every configured certificate; `None` without a default
    /// certificate (no listener terminates TLS). Any file that fails to
    /// load is an error naming its setting and file: at start there is
    /// no old certificate to keep.
    pub fn load(
        settings: &TlsSettings,
        metrics: TlsMetrics,
    ) -> Result<Option<CertStore>, TlsError> {
        let Some(certificate) = settings.certificate.clone() else {
            return Ok(None);
        };
        // The config refuses a certificate without a key; should one slip
        // through, the certificate file is where the key is looked for.
        let key = settings.key.clone().unwrap_or_else(|| certificate.clone());
        let mut entries = vec![Entry {
            label: DEFAULT_LABEL.into(),
            setting: "tls".into(),
            certificate,
            key,
        }];
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, sni) in settings.sni.iter().enumerate() {
            let index = entries.len();
            entries.push(Entry {
                label: sni
                    .names
                    .first()
                    .map(|n| normalize(n))
                    .unwrap_or_else(|| sni.certificate.display().to_string()),
                setting: format!("tls.sni[{}]", i + 1),
                certificate: sni.certificate.clone(),
                key: sni.key.clone(),
            });
            for name in &sni.names {
                let name = normalize(name);
                // The first entry naming a host wins, as in the file's order.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()).or_insert(index),
                    None => exact.entry(name).or_insert(index),
                };
            }
        }
        let mut loaded = Vec::with_capacity(entries.len());
        for entry in &entries {
            let cert = certs::load(&entry.certificate, &entry.key).map_err(|source| {
                TlsError::Certificate {
                    key: entry.key_of(&source),
                    source,
                }
            })?;
            metrics.certificate_expiry(&entry.label, cert.not_after);
            warn_if_expired(entry, cert.not_after);
            loaded.push(cert.key);
        }
        Ok(Some(CertStore {
            entries,
            exact,
            wildcard,
            current: ArcSwap::from_pointee(loaded),
            reloading: Mutex::new(()),
            metrics,
        }))
    }

    /// Re-reads every entry's files; see the module doc. Returns how many
    /// entries failed (and kept their certificate). Blocking file I/O: call
    /// it off the runtime.
    pub fn reload(&self) -> usize {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: Vec<Arc<CertifiedKey>> = self.current.load().as_ref().clone();
        let mut failed = 0;
        for (entry, slot) in self.entries.iter().zip(next.iter_mut()) {
            match certs::load(&entry.certificate, &entry.key) {
                Ok(cert) => {
                    *slot = cert.key;
                    self.metrics
                        .certificate_expiry(&entry.label, cert.not_after);
                    self.metrics.certificate_reload(true);
                    warn_if_expired(entry, cert.not_after);
                }
                Err(e) => {
                    failed += 1;
                    self.metrics.certificate_reload(false);
                    tracing::error!(
                        certificate = entry.label.as_str(),
                        setting = entry.key_of(&e),
                        file = %e.path().display(),
                        error = %e,
                        "certificate reload failed; the previous certificate stays in force"
                    );
                }
            }
        }
        self.current.store(Arc::new(next));
        tracing::info!(
            certificates = self.entries.len(),
            failed,
            "certificates reloaded"
        );
        failed
    }

    /// Every configured certificate and key file, for the watcher.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.entries
            .iter()
            .flat_map(|e| [e.certificate.as_path(), e.key.as_path()])
    }

    /// The certificate presented for `server_name` (the client's SNI).
    /// `None` never happens (the default is loaded before the store
    /// exists); it would abort the handshake, not the process.
    pub fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.load();
        let index = server_name.and_then(|n| self.entry_for(n)).unwrap_or(0);
        current.get(index).or_else(|| current.first()).cloned()
    }

    fn entry_for(&self, server_name: &str) -> Option<usize> {
        let name = normalize(server_name);
        if let Some(&i) = self.exact.get(&name) {
            return Some(i);
        }
        // A wildcard covers exactly one label: `*.example.org` matches
        // `mx.example.org`, not `example.org` nor `a.mx.example.org`.
        let (first, parent) = name.split_once('.')?;
        if first.is_empty() {
            return None;
        }
        self.wildcard.get(parent).copied()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(client_hello.server_name())
    }
}

/// DNS names compare case-insensitively, and `mx.example.org.` is
/// `mx.example.org`.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn warn_if_expired(entry: &Entry, not_after: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if not_after <= now {
        tracing::warn!(
            certificate = entry.label.as_str(),
            file = %entry.certificate.display(),
            "the certificate has expired; clients verifying it will refuse the handshake"
        );
    }
}
