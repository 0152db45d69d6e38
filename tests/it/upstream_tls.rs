//! mailmoat's own STARTTLS to the receiver (`upstream.tls = "starttls"`): a
//! receiver that offers AUTH only inside TLS (Postfix's
//! `smtpd_tls_auth_only = yes`) still authenticates a client that spoke to
//! mailmoat in the clear, and the receiver check verifies the certificate.

use std::net::Ipv4Addr;

use base64::Engine;
use mailmoat::config::{Config, UpstreamTls};
use mailmoat::sink::{Sink, SinkCertificate, SinkOptions};
use mailmoat::upstream::verify::sha256_hex;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 41, 2);

fn certificate() -> SinkCertificate {
    SinkCertificate::generate(&["localhost", "127.0.0.1"]).unwrap()
}

/// A receiver like Postfix with `smtpd_tls_security_level = may` and
/// `smtpd_tls_auth_only = yes`, expecting PROXY v2 (mailmoat's default).
async fn tls_sink(cert: &SinkCertificate) -> Sink {
    sink_with(SinkOptions {
        tls: Some(cert.server_config.clone()),
        auth_requires_tls: true,
        auth: Some(("alice".into(), "s3cret".into())),
        ..SinkOptions::default()
    })
    .await
}

fn starttls_config(sink: &Sink) -> Config {
    let mut config = config("", &[sink.addr()]);
    config.upstream.tls = UpstreamTls::Starttls;
    config
}

#[tokio::test]
async fn plaintext_auth_reaches_a_tls_only_auth_receiver_inside_mailmoats_starttls() {
    let cert = certificate();
    let sink = tls_sink(&cert).await;
    let dir = TempDir::new("upstream-starttls");
    let mut config = starttls_config(&sink);
    config.upstream.ca_file = Some(dir.write("ca.pem", &cert.ca_pem));
    let proxy = TestProxy::start_with(config).await;

    let mut raw = Raw::connect(CLIENT, proxy.addr).await;
    raw.expect("220 sink.test").await;
    raw.send(b"EHLO client.test\r\n").await;
    let ehlo = raw.expect("250").await;
    assert!(ehlo.contains("AUTH PLAIN"), "{ehlo}");
    let token = base64::engine::general_purpose::STANDARD.encode("\0alice\0s3cret");
    raw.send(format!("AUTH PLAIN {token}\r\n").as_bytes()).await;
    raw.expect("235 ").await;
    raw.send(b"MAIL FROM:<alice@example.org>\r\n").await;
    raw.expect("250 ").await;
    raw.send(b"RCPT TO:<bob@example.net>\r\n").await;
    raw.expect("250 ").await;
    raw.send(b"DATA\r\n").await;
    raw.expect("354 ").await;
    raw.send(b"Subject: inside\r\n\r\nhello\r\n.\r\n").await;
    raw.expect("250 ").await;
    raw.send(b"QUIT\r\n").await;
    raw.expect("221 ").await;

    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert!(messages[0].tls, "the receiver got the message inside TLS");
    assert_eq!(messages[0].client.ip(), CLIENT);
    // The client's side was plaintext: the header says so by saying nothing.
    assert_eq!(messages[0].proxy_tls, None);
    assert_eq!(sink.auth_failures(), 0);
    let (status, body) = http_get(proxy.admin.unwrap(), "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
}

#[tokio::test]
async fn receiver_check_names_a_pin_that_does_not_match_the_receivers_certificate() {
    let (cert, other) = (certificate(), certificate());
    let sink = tls_sink(&cert).await;
    let mut config = starttls_config(&sink);
    config.upstream.pin_sha256 = Some(sha256_hex(&other.leaf));
    let proxy = TestProxy::start_with(config).await;
    let (status, body) = http_get(proxy.admin.unwrap(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("upstream.pin_sha256")
            && body.contains(&sha256_hex(&cert.leaf))
            && body.contains(&sink.addr().to_string()),
        "{body}"
    );
    // A client is told to come back rather than relayed in the clear.
    let mut raw = Raw::connect(CLIENT, proxy.addr).await;
    raw.expect("421 ").await;
    assert_eq!(sink.delivered(), 0);
}
