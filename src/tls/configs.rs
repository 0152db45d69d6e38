//! The rustls configurations mailmoat builds, server and client, in one
//! place: always ring (never the process default, which another crate
//! could install), TLS 1.3 and 1.2.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::version::{TLS12, TLS13};
use rustls::{
    ClientConfig, ConfigBuilder, RootCertStore, ServerConfig, SupportedProtocolVersion,
    WantsVerifier,
};

/// The versions mailmoat speaks, newest first.
pub const VERSIONS: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

/// ring's provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ring's provider has cipher suites and key exchanges for both versions,
// so the version check cannot fail; it would in a build of rustls without
// `tls12`, which no test would survive.
const VERSIONS_OK: &str = "ring supports TLS 1.3 and 1.2";

/// A client builder on `provider` with [`VERSIONS`], for a caller with
/// its own certificate verifier (the upstream's pin).
pub fn client_builder(provider: Arc<CryptoProvider>) -> ConfigBuilder<ClientConfig, WantsVerifier> {
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .expect(VERSIONS_OK)
}

/// A client verifying servers against `roots` (WebPKI: chain and name).
pub fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    let config = client_builder(provider())
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A server presenting what `certificates` picks for each ClientHello
/// (a [`CertStore`](super::CertStore), or one certificate as
/// [`rustls::sign::SingleCertAndKey`]); no client certificates.
pub fn server_config(certificates: Arc<dyn ResolvesServerCert>) -> Arc<ServerConfig> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect(VERSIONS_OK)
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    Arc::new(config)
}
