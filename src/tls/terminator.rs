//! The server side of a TLS handshake with a client, bounded: handshakes
//! in flight are limited (`tls.max_handshakes`, all listeners together) and
//! each has one deadline (`tls.handshake_timeout`) covering the wait for a
//! slot and the handshake itself. A client that opens many connections and
//! stalls them mid-handshake holds at most the slots, each for at most the
//! timeout, and the CPU of a handshake is spent only on admitted clients
//! (the session calls `accept` after admission).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::store::CertStore;
use super::TlsFacts;
use crate::config::TlsSettings;
use crate::metrics::TlsMetrics;

/// Why a handshake did not give a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Every handshake slot stayed taken until the deadline.
    #[error("no handshake slot free before the handshake deadline")]
    Busy,
    #[error("the handshake did not finish before its deadline")]
    TimedOut,
    /// The client or the TLS layer broke it off (bad record, no common
    /// version or cipher, reset).
    #[error("handshake failed: {0}")]
    Failed(std::io::Error),
}

impl HandshakeError {
    /// The log field and metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            HandshakeError::Busy => "busy",
            HandshakeError::TimedOut => "timeout",
            HandshakeError::Failed(_) => "failed",
        }
    }
}

/// A configuration error found at start.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A configured certificate or key that does not load; `key` is the
    /// setting naming the file (`tls.certificate`, `tls.sni[2].key`).
    #[error("{key}: {source}")]
    Certificate {
        key: String,
        source: super::CertError,
    },
}

/// Terminates TLS from clients: built once at start, shared by every
/// terminating listener.
pub struct Terminator {
    acceptor: TlsAcceptor,
    certificates: Arc<CertStore>,
    slots: Semaphore,
    max_handshakes: usize,
    timeout: Duration,
    metrics: TlsMetrics,
}

impl Terminator {
    /// `None` when no certificate is configured (no listener terminates
    /// TLS); an error naming the file when a configured one fails to load.
    pub fn from_settings(
        settings: &TlsSettings,
        metrics: TlsMetrics,
    ) -> Result<Option<Terminator>, TlsError> {
        let Some(store) = CertStore::load(settings, metrics.clone())? else {
            return Ok(None);
        };
        let certificates = Arc::new(store);
        let config = super::server_config(certificates.clone());
        // The config refuses 0; a semaphore with no permit would only ever
        // say busy, and one above its maximum panics.
        let max_handshakes = settings.max_handshakes.clamp(1, Semaphore::MAX_PERMITS);
        Ok(Some(Terminator {
            acceptor: TlsAcceptor::from(config),
            certificates,
            slots: Semaphore::new(max_handshakes),
            max_handshakes,
            timeout: settings.handshake_timeout,
            metrics,
        }))
    }

    /// The certificates, for reloads.
    pub fn certificates(&self) -> &Arc<CertStore> {
        &self.certificates
    }

    /// Handshakes holding a slot now.
    pub fn handshakes_in_flight(&self) -> usize {
        self.max_handshakes - self.slots.available_permits()
    }

    /// Handshakes as the server on `stream` (after STARTTLS's `220`, or at
    /// once on an implicit-TLS listener). Counts the result; the caller
    /// counts the session ([`TlsMetrics::session`]) and decides what a
    /// failure means for the client (an autoban event).
    pub async fn accept<S>(&self, stream: S) -> Result<(TlsStream<S>, TlsFacts), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let result = self.handshake(stream).await;
        if let Err(e) = &result {
            self.metrics.handshake_failed(e);
        }
        result
    }

    async fn handshake<S>(&self, stream: S) -> Result<(TlsStream<S>, TlsFacts), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let deadline = deadline_after(self.timeout);
        let _slot = match tokio::time::timeout_at(deadline, self.slots.acquire()).await {
            // A slot freed at the very deadline (the handshake ahead timed
            // out at the same instant) leaves no time to handshake in.
            Ok(Ok(permit)) if Instant::now() < deadline => permit,
            // The semaphore is never closed; a closed one has no slot either.
            Ok(_) | Err(_) => return Err(HandshakeError::Busy),
        };
        let started = Instant::now();
        let stream = match tokio::time::timeout_at(deadline, self.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(HandshakeError::Failed(e)),
            Err(_) => return Err(HandshakeError::TimedOut),
        };
        let took = started.elapsed();
        let (_, connection) = stream.get_ref();
        let Some(facts) = TlsFacts::of(connection, connection.server_name()) else {
            return Err(HandshakeError::Failed(std::io::Error::other(
                "the handshake ended without a negotiated version and cipher",
            )));
        };
        self.metrics.handshake_done(took);
        Ok((stream, facts))
    }
}

/// `timeout` from now; a timeout too large to add is a day, still a bound.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(24 * 3600))
}
