//! TLS towards clients: what a handshake negotiated.

use rustls::{CommonState, ProtocolVersion};

/// The TLS versions mailmoat speaks; a closed set, so it can label metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

impl TlsVersion {
    /// As OpenSSL and Postfix write it, also the PROXY v2 `SSL_VERSION`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "TLSv1.2",
            TlsVersion::V1_3 => "TLSv1.3",
        }
    }
}

/// What a finished handshake negotiated, for the session log, metrics and
/// the PROXY v2 header to the receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFacts {
    pub version: TlsVersion,
    /// The cipher suite's IANA name, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: String,
    /// The server name the client asked for, if it sent one.
    pub sni: Option<String>,
}

impl TlsFacts {
    /// The facts of an established connection; `None` before the handshake
    /// is complete.
    pub fn of(state: &CommonState, sni: Option<&str>) -> Option<TlsFacts> {
        let version = match state.protocol_version()? {
            ProtocolVersion::TLSv1_3 => TlsVersion::V1_3,
            ProtocolVersion::TLSv1_2 => TlsVersion::V1_2,
            _ => return None,
        };
        let suite = state.negotiated_cipher_suite()?.suite();
        Some(TlsFacts {
            version,
            cipher: suite.as_str().unwrap_or("unknown").to_owned(),
            sni: sni.map(str::to_owned),
        })
    }
}

// ---- stand-in until the certificate store lands (lead's scaffold) ----

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// Why a handshake did not finish.
#[derive(Debug)]
pub enum HandshakeError {
    Busy,
    TimedOut,
    Failed(std::io::Error),
}

impl HandshakeError {
    pub fn as_str(&self) -> &'static str {
        match self {
            HandshakeError::Busy => "busy",
            HandshakeError::TimedOut => "timeout",
            HandshakeError::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Failed(e) => write!(f, "TLS handshake failed: {e}"),
            other => write!(f, "TLS handshake {}", other.as_str()),
        }
    }
}

/// Terminates TLS for clients.
pub struct Terminator {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub timeout: Duration,
}

impl Terminator {
    pub fn new(config: Arc<rustls::ServerConfig>, timeout: Duration) -> Self {
        Terminator {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            timeout,
        }
    }

    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> Result<(tokio_rustls::server::TlsStream<S>, TlsFacts), HandshakeError> {
        let tls = tokio::time::timeout(self.timeout, self.acceptor.accept(stream))
            .await
            .map_err(|_| HandshakeError::TimedOut)?
            .map_err(HandshakeError::Failed)?;
        let (_, conn) = tls.get_ref();
        let facts = TlsFacts::of(conn, conn.server_name())
            .ok_or_else(|| HandshakeError::Failed(std::io::Error::other("handshake incomplete")))?;
        Ok((tls, facts))
    }
}
