//! TLS towards clients: certificates ([`certs`], [`store`], reloaded by
//! [`reload`]), the bounded handshake ([`Terminator`]), and what a
//! handshake negotiated ([`TlsFacts`]), the rustls configurations
//! ([`configs`]). [`generate`] makes certificates for tests, benches and
//! the demo.

pub mod certs;
pub mod configs;
pub mod generate;
pub mod reload;
pub mod store;
mod terminator;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use rustls::{CommonState, ProtocolVersion};

pub use certs::CertError;
pub use configs::{client_config, server_config};
pub use store::CertStore;
pub use terminator::{HandshakeError, Terminator, TlsError};

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
