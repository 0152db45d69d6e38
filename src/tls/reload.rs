//! The certificate reload task (supervised as `certificate_reload`):
//! re-reads the certificates when their files change (certbot renewing,
//! settled so the certificate and then the key written a moment later are
//! read together) and on SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use super::store::CertStore;
use crate::watch::{absolute, next_change, next_hangup, start_watcher, Changes};

/// Runs until dropped by its supervisor.
pub async fn watch(certificates: Arc<CertStore>) {
    let targets: Vec<Option<PathBuf>> = certificates.files().map(absolute).collect();
    let changes = Arc::new(Changes::new(targets));
    // Kept alive for as long as we watch.
    let watcher = start_watcher(changes.clone(), "certificate files");
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload on change only");
            None
        }
    };
    let changes = watcher.as_ref().map(|_| changes);
    if changes.is_none() && hangup.is_none() {
        tracing::warn!(
            "certificates are read at start only: neither a file watch nor SIGHUP is available"
        );
        // Ending would only be restarted into the same failure.
        return std::future::pending().await;
    }
    // A renewal between the load at start (or a restart of this task) and
    // the watch taking hold would be missed until the next one.
    reload(&certificates).await;
    loop {
        tokio::select! {
            dirty = next_change(changes.as_deref()) => {
                if dirty.is_empty() {
                    continue;
                }
            }
            () = next_hangup(&mut hangup) => {
                tracing::info!("SIGHUP: re-reading certificates");
            }
        }
        reload(&certificates).await;
    }
}

/// Reads the files off the runtime's workers.
async fn reload(certificates: &Arc<CertStore>) {
    let certificates = certificates.clone();
    let _ = tokio::task::spawn_blocking(move || certificates.reload()).await;
}
