//! A real rustls client against `Terminator::accept` over `duplex`.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream as ClientStream;
use tokio_rustls::TlsConnector;

use super::generate::{self, GeneratedCert};
use super::testing::TempDir;
use super::*;
use crate::config::{Config, SniCertificate, TlsSettings};
use crate::metrics::Metrics;

const MX: &str = "mx.example.org";

fn settings(dir: &TempDir, default: &GeneratedCert) -> TlsSettings {
    let (certificate, key) = default.write_in(dir.path(), "default").unwrap();
    TlsSettings {
        certificate: Some(certificate),
        key: Some(key),
        ..Config::default().tls
    }
}

fn sni_entry(dir: &TempDir, stem: &str, names: &[&str], cert: &GeneratedCert) -> SniCertificate {
    let (certificate, key) = cert.write_in(dir.path(), stem).unwrap();
    SniCertificate {
        names: names.iter().map(|n| n.to_string()).collect(),
        certificate,
        key,
    }
}

fn terminator(settings: &TlsSettings, metrics: &Metrics) -> Terminator {
    Terminator::from_settings(settings, metrics.tls.clone())
        .unwrap()
        .expect("a certificate is configured")
}

/// mailmoat's client config trusting `trusted`.
fn client(trusted: &[&GeneratedCert]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.der().clone()).unwrap();
    }
    let mut config = Arc::unwrap_or_clone(super::client_config(roots));
    // A resumed session shows the certificate of the session it resumes:
    // each handshake here must show the one presented now.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

type Accepted = Result<(tokio_rustls::server::TlsStream<DuplexStream>, TlsFacts), HandshakeError>;

/// Handshakes a client asking for `name` with `terminator`; the server's
/// result comes back alongside.
async fn handshake(
    terminator: &Terminator,
    connector: &TlsConnector,
    name: &str,
) -> (std::io::Result<ClientStream<DuplexStream>>, Accepted) {
    let (client_io, server_io) = duplex(64 * 1024);
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::join!(
        connector.connect(name, client_io),
        terminator.accept(server_io)
    )
}

/// The leaf the server presented to `client`.
fn presented(client: &ClientStream<DuplexStream>) -> CertificateDer<'static> {
    client.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn der(cert: &GeneratedCert) -> CertificateDer<'static> {
    cert.der().clone()
}

fn metric(metrics: &Metrics, series: &str) -> Option<f64> {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Echoes what the client sends until it closes, like a session would
/// answer inside TLS.
fn echo(mut server: tokio_rustls::server::TlsStream<DuplexStream>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if server.write_all(&buf[..n]).await.is_err() || server.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

async fn round_trip(client: &mut ClientStream<DuplexStream>, line: &[u8]) {
    client.write_all(line).await.unwrap();
    client.flush().await.unwrap();
    let mut back = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(back, line);
}

#[tokio::test]
async fn a_handshake_gives_the_negotiated_facts_and_is_counted() {
    let dir = TempDir::new("tls-ok");
    let cert = generate::self_signed(&[MX]).unwrap();
    let metrics = Metrics::new();
    let terminator = terminator(&settings(&dir, &cert), &metrics);

    let (client, accepted) = handshake(&terminator, &client(&[&cert]), MX).await;
    let (server, facts) = accepted.unwrap();
    let mut client = client.unwrap();
    assert_eq!(facts.version, TlsVersion::V1_3);
    assert!(facts.cipher.starts_with("TLS13_"), "{}", facts.cipher);
    assert_eq!(facts.sni.as_deref(), Some(MX));
    assert_eq!(presented(&client), der(&cert));
    echo(server);
    round_trip(&mut client, b"EHLO client.example\r\n").await;

    let tls12 = tls12_client(&cert);
    let (_, accepted) = handshake(&terminator, &tls12, MX).await;
    let (_, facts) = accepted.unwrap();
    assert_eq!(facts.version, TlsVersion::V1_2);
    assert!(
        facts.cipher.starts_with("TLS_ECDHE_ECDSA_"),
        "{}",
        facts.cipher
    );

    let ok = r#"mailmoat_tls_handshakes_total{result="ok"}"#;
    assert_eq!(metric(&metrics, ok), Some(2.0));
    assert_eq!(
        metric(&metrics, "mailmoat_tls_handshake_duration_seconds_count"),
        Some(2.0)
    );
    let expiry = r#"mailmoat_tls_certificate_expiry_timestamp_seconds{certificate="default"}"#;
    assert_eq!(metric(&metrics, expiry), Some(cert.not_after as f64));
}

/// A client trusting `cert` that speaks TLS 1.2 only.
fn tls12_client(cert: &GeneratedCert) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = ClientConfig::builder_with_provider(configs::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn a_client_sending_garbage_fails_the_handshake_and_is_counted() {
    let dir = TempDir::new("tls-garbage");
    let cert = generate::self_signed(&[MX]).unwrap();
    let metrics = Metrics::new();
    let terminator = terminator(&settings(&dir, &cert), &metrics);

    let (mut client_io, server_io) = duplex(4096);
    let (written, accepted) = tokio::join!(
        async {
            // A TLS 1.0 ClientHello record header, then an SMTP line.
            client_io.write_all(b"\x16\x03\x01\x00\x05EHLO\r\n").await?;
            client_io.shutdown().await
        },
        terminator.accept(server_io)
    );
    written.unwrap();
    let err = accepted.map(|_| ()).unwrap_err();
    assert!(matches!(err, HandshakeError::Failed(_)), "{err:?}");
    assert_eq!(err.as_str(), "failed");
    let failed = r#"mailmoat_tls_handshakes_total{result="failed"}"#;
    assert_eq!(metric(&metrics, failed), Some(1.0));
}

#[tokio::test]
async fn sni_picks_the_entry_for_the_name_and_a_wildcard_covers_one_label() {
    let dir = TempDir::new("tls-sni");
    let default = generate::self_signed(&[MX]).unwrap();
    let net = generate::self_signed(&["smtp.example.net", "mx2.example.net"]).unwrap();
    let wild = generate::self_signed(&["*.example.com"]).unwrap();
    let mut settings = settings(&dir, &default);
    settings.sni = vec![
        sni_entry(&dir, "net", &["smtp.example.net", "MX2.Example.Net."], &net),
        sni_entry(&dir, "wild", &["*.example.com"], &wild),
    ];
    let metrics = Metrics::new();
    let terminator = terminator(&settings, &metrics);
    let connector = client(&[&default, &net, &wild]);

    for (name, expected) in [
        (MX, &default),
        ("smtp.example.net", &net),
        ("mx2.example.net", &net),
        ("relay.example.com", &wild),
    ] {
        let (client, accepted) = handshake(&terminator, &connector, name).await;
        assert_eq!(presented(&client.unwrap()), der(expected), "{name}");
        assert_eq!(accepted.unwrap().1.sni.as_deref(), Some(name));
    }

    // What the client cannot verify by name, asked of the store directly.
    let store = terminator.certificates();
    let pick = |name: Option<&str>| store.pick(name).unwrap().cert[0].clone();
    for (name, expected) in [
        (Some("SMTP.EXAMPLE.NET"), &net),
        (Some("mx2.example.net."), &net),
        (Some("A.Example.Com"), &wild),
        // One label only, and not the parent itself.
        (Some("a.b.example.com"), &default),
        (Some("example.com"), &default),
        (Some(".example.com"), &default),
        (Some("unknown.example"), &default),
        (None, &default),
    ] {
        assert_eq!(pick(name), der(expected), "{name:?}");
    }
    // Each configured certificate, labelled by its first name.
    for (label, cert) in [
        ("default", &default),
        ("smtp.example.net", &net),
        ("*.example.com", &wild),
    ] {
        let series = format!(
            r#"mailmoat_tls_certificate_expiry_timestamp_seconds{{certificate="{label}"}}"#
        );
        assert_eq!(metric(&metrics, &series), Some(cert.not_after as f64));
    }
}

#[tokio::test]
async fn after_a_reload_new_handshakes_get_the_new_certificate_while_open_sessions_keep_working() {
    let dir = TempDir::new("tls-reload");
    let old = generate::self_signed(&[MX]).unwrap();
    let new = generate::self_signed(&[MX]).unwrap();
    let settings = settings(&dir, &old);
    let metrics = Metrics::new();
    let terminator = terminator(&settings, &metrics);
    let connector = client(&[&old, &new]);

    let (client, accepted) = handshake(&terminator, &connector, MX).await;
    let mut open = client.unwrap();
    echo(accepted.unwrap().0);
    round_trip(&mut open, b"MAIL FROM:<a@example.org>\r\n").await;

    new.write_in(dir.path(), "default").unwrap();
    assert_eq!(terminator.certificates().reload(), 0);

    let (client, _) = handshake(&terminator, &connector, MX).await;
    assert_eq!(presented(&client.unwrap()), der(&new));
    assert_eq!(presented(&open), der(&old));
    round_trip(&mut open, b"RCPT TO:<b@example.org>\r\n").await;
    let ok = r#"mailmoat_tls_certificate_reloads_total{result="ok"}"#;
    assert_eq!(metric(&metrics, ok), Some(1.0));
}

#[tokio::test]
async fn a_bad_new_file_keeps_the_old_certificate_and_counts_a_failed_reload() {
    let dir = TempDir::new("tls-bad-reload");
    let old = generate::self_signed(&[MX]).unwrap();
    let net_old = generate::self_signed(&["smtp.example.net"]).unwrap();
    let net_new = generate::self_signed(&["smtp.example.net"]).unwrap();
    let mut settings = settings(&dir, &old);
    settings.sni = vec![sni_entry(&dir, "net", &["smtp.example.net"], &net_old)];
    let metrics = Metrics::new();
    let terminator = terminator(&settings, &metrics);
    let connector = client(&[&old, &net_old, &net_new]);
    let key = settings.key.clone().unwrap();

    // A renewal caught half way: the new certificate with the old key for
    // the default; a good new pair for the SNI entry.
    let renewed = generate::self_signed(&[MX]).unwrap();
    std::fs::write(settings.certificate.as_ref().unwrap(), &renewed.cert_pem).unwrap();
    net_new.write_in(dir.path(), "net").unwrap();
    assert_eq!(terminator.certificates().reload(), 1);

    let (client, _) = handshake(&terminator, &connector, MX).await;
    assert_eq!(
        presented(&client.unwrap()),
        der(&old),
        "the default changed"
    );
    let (client, _) = handshake(&terminator, &connector, "smtp.example.net").await;
    assert_eq!(
        presented(&client.unwrap()),
        der(&net_new),
        "the good entry kept its old one"
    );
    let failed = r#"mailmoat_tls_certificate_reloads_total{result="failed"}"#;
    let ok = r#"mailmoat_tls_certificate_reloads_total{result="ok"}"#;
    assert_eq!(metric(&metrics, failed), Some(1.0));
    assert_eq!(metric(&metrics, ok), Some(1.0));
    let expiry = r#"mailmoat_tls_certificate_expiry_timestamp_seconds{certificate="default"}"#;
    assert_eq!(metric(&metrics, expiry), Some(old.not_after as f64));

    // Garbage, then nothing at all: still the old one.
    for garbage in ["not a key".as_bytes(), b""] {
        std::fs::write(&key, garbage).unwrap();
        assert_eq!(terminator.certificates().reload(), 1);
        let (client, _) = handshake(&terminator, &connector, MX).await;
        assert_eq!(presented(&client.unwrap()), der(&old));
    }
    std::fs::remove_file(&key).unwrap();
    assert_eq!(terminator.certificates().reload(), 1);
    assert_eq!(metric(&metrics, failed), Some(4.0));
}

#[tokio::test(start_paused = true)]
async fn a_client_stalling_mid_handshake_is_cut_at_the_deadline() {
    let dir = TempDir::new("tls-stall");
    let cert = generate::self_signed(&[MX]).unwrap();
    let mut settings = settings(&dir, &cert);
    settings.handshake_timeout = Duration::from_secs(10);
    let metrics = Metrics::new();
    let terminator = terminator(&settings, &metrics);

    let (mut client_io, server_io) = duplex(4096);
    // The start of a ClientHello record, and then nothing.
    client_io
        .write_all(b"\x16\x03\x01\x02\x00\x01")
        .await
        .unwrap();
    let start = Instant::now();
    let err = terminator.accept(server_io).await.map(|_| ()).unwrap_err();
    assert!(matches!(err, HandshakeError::TimedOut), "{err:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let timeout = r#"mailmoat_tls_handshakes_total{result="timeout"}"#;
    assert_eq!(metric(&metrics, timeout), Some(1.0));
    drop(client_io);
}

#[tokio::test(start_paused = true)]
async fn with_every_handshake_slot_taken_the_next_is_busy_at_its_deadline_and_a_slot_frees_after() {
    let dir = TempDir::new("tls-busy");
    let cert = generate::self_signed(&[MX]).unwrap();
    let mut settings = settings(&dir, &cert);
    settings.handshake_timeout = Duration::from_secs(10);
    settings.max_handshakes = 1;
    let metrics = Metrics::new();
    let terminator = Arc::new(terminator(&settings, &metrics));

    // A client that connects and never says a word holds the one slot.
    let (stalled_client, stalled_server) = duplex(4096);
    let stalled = {
        let terminator = terminator.clone();
        tokio::spawn(async move { terminator.accept(stalled_server).await.map(|_| ()) })
    };
    for _ in 0..1000 {
        if terminator.handshakes_in_flight() == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(terminator.handshakes_in_flight(), 1);

    let (_waiting_client, server_io) = duplex(4096);
    let start = Instant::now();
    let err = terminator.accept(server_io).await.map(|_| ()).unwrap_err();
    assert!(matches!(err, HandshakeError::Busy), "{err:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert!(matches!(
        stalled.await.unwrap(),
        Err(HandshakeError::TimedOut)
    ));
    drop(stalled_client);

    // The slot went with the stalled handshake.
    let (client, accepted) = handshake(&terminator, &client(&[&cert]), MX).await;
    assert!(client.is_ok() && accepted.is_ok());
    for (result, n) in [("busy", 1.0), ("timeout", 1.0), ("ok", 1.0)] {
        let series = format!(r#"mailmoat_tls_handshakes_total{{result="{result}"}}"#);
        assert_eq!(metric(&metrics, &series), Some(n), "{result}");
    }
}

#[test]
fn a_key_not_matching_the_certificate_refuses_the_start_naming_the_key_file() {
    let dir = TempDir::new("tls-start-mismatch");
    let cert = generate::self_signed(&[MX]).unwrap();
    let mut settings = settings(&dir, &cert);
    let (_, other_key) = generate::self_signed(&[MX])
        .unwrap()
        .write_in(dir.path(), "other")
        .unwrap();
    settings.key = Some(other_key.clone());
    let err = Terminator::from_settings(&settings, Metrics::new().tls.clone())
        .map(|_| ())
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&other_key.display().to_string()), "{text}");
    assert!(text.contains("does not match"), "{text}");
    assert!(text.starts_with("tls.key: "), "{text}");

    // And a bad SNI entry too, naming its entry.
    let mut settings = self::settings(&dir, &cert);
    settings.sni = vec![SniCertificate {
        names: vec!["smtp.example.net".into()],
        certificate: dir.path().join("missing.crt"),
        key: other_key,
    }];
    let err = Terminator::from_settings(&settings, Metrics::new().tls.clone())
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("missing.crt"), "{err}");
    assert!(
        err.to_string().starts_with("tls.sni[1].certificate: "),
        "{err}"
    );
}

#[test]
fn without_a_certificate_nothing_terminates() {
    let settings = Config::default().tls;
    assert!(
        Terminator::from_settings(&settings, Metrics::new().tls.clone())
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn the_reload_task_presents_replaced_files_within_two_seconds() {
    let dir = TempDir::new("tls-watch");
    let old = generate::self_signed(&[MX]).unwrap();
    let new = generate::self_signed(&[MX]).unwrap();
    let settings = settings(&dir, &old);
    let metrics = Metrics::new();
    let terminator = terminator(&settings, &metrics);
    let connector = client(&[&old, &new]);
    let task = tokio::spawn(reload::watch(terminator.certificates().clone()));
    // The task's first reload says its watch has taken hold.
    let ok = r#"mailmoat_tls_certificate_reloads_total{result="ok"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&metrics, ok) != Some(1.0) {
        assert!(Instant::now() < deadline, "the watch task did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // As certbot: the certificate, then the key a moment later.
    let (certificate, key) = (
        settings.certificate.clone().unwrap(),
        settings.key.clone().unwrap(),
    );
    std::fs::write(&certificate, &new.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&key, &new.key_pem).unwrap();
    let written = Instant::now();
    loop {
        let (client, _) = handshake(&terminator, &connector, MX).await;
        if presented(&client.unwrap()) == der(&new) {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "the new certificate was not presented within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The burst was settled into one reload, not a failed one in between.
    let failed = r#"mailmoat_tls_certificate_reloads_total{result="failed"}"#;
    assert_eq!(metric(&metrics, failed), Some(0.0));
    task.abort();
}
