//! mailmoat's STARTTLS to the receiver, against the sink speaking real TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::*;
use crate::config::{Config, Protocol, ProxyProtocol, UpstreamTls};
use crate::sink::{Sink, SinkCertificate, SinkOptions};
use crate::tls::TlsVersion;

const WAIT: Duration = Duration::from_secs(10);

/// A file under the system temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(text: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("mailmoat-upstream-{}-{n}.pem", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn certificate() -> SinkCertificate {
    SinkCertificate::generate(&["localhost", "127.0.0.1"]).unwrap()
}

async fn tls_sink(cert: &SinkCertificate, proxy_protocol: bool) -> Sink {
    Sink::start(
        "127.0.0.1:0".parse().unwrap(),
        SinkOptions {
            proxy_protocol,
            tls: Some(cert.server_config.clone()),
            auth_requires_tls: true,
            auth: Some(("user".into(), "secret".into())),
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap()
}

fn settings(sink: &Sink, ca_file: Option<&TempFile>, pin: Option<String>) -> UpstreamSettings {
    let mut settings = Config::default().upstream;
    settings.servers = vec![sink.addr().into()];
    settings.proxy_protocol = ProxyProtocol::Off;
    settings.tls = UpstreamTls::Starttls;
    settings.ca_file = ca_file.map(|f| f.0.clone());
    settings.pin_sha256 = pin;
    settings
}

async fn connect_to(
    settings: &UpstreamSettings,
    tls: Option<&TlsFacts>,
) -> Result<Connected, UpstreamError> {
    let upstream = Upstream::new("upstream", settings, Protocol::Smtp, "mailmoat.test").unwrap();
    let client: SocketAddr = "192.0.2.7:4000".parse().unwrap();
    let local: SocketAddr = "127.0.0.1:25".parse().unwrap();
    let metrics = Metrics::new();
    timeout(WAIT, connect(&upstream, client, local, tls, WAIT, &metrics))
        .await
        .expect("connect ends by its deadline")
}

/// Sends `command` and returns the reply's last line.
async fn say(replies: &mut Replies<UpstreamStream>, command: &str) -> String {
    let deadline = Instant::now() + WAIT;
    replies
        .send(format!("{command}\r\n").as_bytes(), deadline)
        .await
        .unwrap();
    let reply = replies.expect_reply(deadline).await.unwrap();
    String::from_utf8_lossy(&reply.raw).into_owned()
}

#[tokio::test]
async fn starttls_verified_by_the_ca_file_keeps_the_greeting_and_talks_inside_tls() {
    let cert = certificate();
    let sink = tls_sink(&cert, false).await;
    let ca = TempFile::new(&cert.ca_pem);
    let connected = connect_to(&settings(&sink, Some(&ca), None), None)
        .await
        .unwrap();
    assert_eq!(connected.greeting, b"220 sink.test ESMTP ready\r\n");
    assert!(matches!(
        connected.stream,
        tokio_util::either::Either::Right(_)
    ));
    // The sink offers AUTH only inside TLS: its EHLO reply says where we are.
    let mut replies = Replies::new(connected.stream);
    let ehlo = say(&mut replies, "EHLO client.test").await;
    assert!(
        ehlo.contains("AUTH PLAIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    assert!(say(&mut replies, "QUIT").await.starts_with("221"));
}

#[tokio::test]
async fn a_receiver_certificate_from_another_ca_is_refused_naming_ca_file() {
    let (cert, other) = (certificate(), certificate());
    let sink = tls_sink(&cert, false).await;
    let ca = TempFile::new(&other.ca_pem);
    let error = connect_to(&settings(&sink, Some(&ca), None), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("TLS handshake with the receiver failed")
            && error.contains("upstream.ca_file")
            && error.contains(&ca.0.display().to_string()),
        "{error}"
    );
}

#[tokio::test]
async fn a_pinned_receiver_certificate_is_accepted_without_a_ca_file() {
    let cert = certificate();
    let sink = tls_sink(&cert, false).await;
    let pin = verify::sha256_hex(&cert.leaf).to_ascii_uppercase();
    let connected = connect_to(&settings(&sink, None, Some(pin)), None)
        .await
        .unwrap();
    assert!(matches!(
        connected.stream,
        tokio_util::either::Either::Right(_)
    ));
    let mut replies = Replies::new(connected.stream);
    assert!(say(&mut replies, "EHLO client.test")
        .await
        .contains("AUTH PLAIN"));
}

#[tokio::test]
async fn a_receiver_certificate_other_than_the_pinned_one_is_refused_naming_pin_sha256() {
    let (cert, other) = (certificate(), certificate());
    let sink = tls_sink(&cert, false).await;
    let pin = verify::sha256_hex(&other.leaf);
    let error = connect_to(&settings(&sink, None, Some(pin)), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("upstream.pin_sha256") && error.contains(&verify::sha256_hex(&cert.leaf)),
        "{error}"
    );
}

#[tokio::test]
async fn a_receiver_without_starttls_is_refused_with_how_to_enable_it() {
    let cert = certificate();
    let plain = Sink::start(
        "127.0.0.1:0".parse().unwrap(),
        SinkOptions {
            proxy_protocol: false,
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let ca = TempFile::new(&cert.ca_pem);
    let error = connect_to(&settings(&plain, Some(&ca), None), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("does not offer STARTTLS")
            && error.contains("smtpd_tls_security_level = may")
            && error.contains("upstream.tls = \"none\""),
        "{error}"
    );
}

#[tokio::test]
async fn the_receiver_learns_the_clients_tls_from_the_proxy_header_inside_its_own_tls() {
    let cert = certificate();
    let sink = tls_sink(&cert, true).await;
    let ca = TempFile::new(&cert.ca_pem);
    let mut settings = settings(&sink, Some(&ca), None);
    settings.proxy_protocol = ProxyProtocol::V2;
    let facts = TlsFacts {
        version: TlsVersion::V1_2,
        cipher: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into(),
        sni: Some("mx.example.org".into()),
    };
    let connected = connect_to(&settings, Some(&facts)).await.unwrap();
    let mut replies = Replies::new(connected.stream);
    say(&mut replies, "EHLO client.test").await;
    say(&mut replies, "MAIL FROM:<a@example.org>").await;
    say(&mut replies, "RCPT TO:<b@example.org>").await;
    say(&mut replies, "DATA").await;
    assert!(say(&mut replies, "Subject: x\r\n\r\nhi\r\n.")
        .await
        .starts_with("250"));
    let received = &sink.messages()[0];
    assert_eq!(received.client, "192.0.2.7:4000".parse().unwrap());
    assert!(received.tls);
    assert_eq!(
        received.proxy_tls,
        Some(crate::proxy_protocol::HeaderTls {
            version: Some("TLSv1.2".into()),
            cipher: Some("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into()),
            authority: Some("mx.example.org".into()),
        })
    );
    let (mut stream, _) = replies.into_parts();
    let _ = stream.shutdown().await;
}

#[test]
fn an_unusable_ca_file_is_a_config_error_naming_the_file() {
    let mut config = Config::default();
    config.upstream.tls = UpstreamTls::Starttls;
    let missing = std::env::temp_dir().join("mailmoat-no-such-ca.pem");
    config.upstream.ca_file = Some(missing.clone());
    let error = Connector::new(&config).unwrap_err().to_string();
    assert!(
        error.contains("upstream.ca_file") && error.contains(&missing.display().to_string()),
        "{error}"
    );
    let empty = TempFile::new("not a certificate\n");
    config.upstream.ca_file = Some(empty.0.clone());
    let error = Connector::new(&config).unwrap_err().to_string();
    assert!(
        error.contains("no CERTIFICATE") && error.contains(&empty.0.display().to_string()),
        "{error}"
    );
    config.upstream.ca_file = None;
    let error = Connector::new(&config).unwrap_err().to_string();
    assert!(error.contains("upstream.pin_sha256"), "{error}");
}

#[test]
fn a_ca_file_with_no_size_that_never_ends_is_refused_at_the_limit() {
    // A device (or a file still growing) says nothing true in its
    // metadata; only a bounded read stops it.
    let endless = std::path::Path::new("/dev/zero");
    let error = verify::root_store(endless, "upstream.ca_file").unwrap_err();
    assert!(
        matches!(
            error.problem,
            verify::CaFileProblem::Read(crate::files::ReadError::TooLarge { .. })
        ),
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.starts_with("upstream.ca_file: cannot use /dev/zero: larger than"),
        "{text}"
    );
}

#[tokio::test]
async fn the_receiver_check_handshakes_and_names_a_wrong_pin() {
    let (cert, other) = (certificate(), certificate());
    let sink = tls_sink(&cert, true).await;
    let mut good = settings(&sink, None, Some(verify::sha256_hex(&cert.leaf)));
    good.proxy_protocol = ProxyProtocol::V2;
    let upstream = Upstream::new("upstream", &good, Protocol::Smtp, "mailmoat.test").unwrap();
    assert_eq!(check(&upstream, sink.addr()).await, Ok(()));
    let mut bad = good.clone();
    bad.pin_sha256 = Some(verify::sha256_hex(&other.leaf));
    let upstream = Upstream::new(
        "upstreams.submission",
        &bad,
        Protocol::Smtp,
        "mailmoat.test",
    )
    .unwrap();
    match check(&upstream, sink.addr()).await {
        Err(Problem::Tls(e)) => assert!(e.contains("upstreams.submission.pin_sha256"), "{e}"),
        other => panic!("expected a TLS problem, got {other:?}"),
    }
    // Health checks are not clients.
    assert_eq!(sink.connections(), 0);
}

#[tokio::test]
async fn receiver_check_is_unready_when_any_upstream_a_listener_uses_fails_and_names_it() {
    use crate::config::{ListenerSettings, TlsMode};
    let sink = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let mut config = Config::default();
    config.upstream.servers = vec![sink.addr().into()];
    let mut submission = config.upstream.clone();
    submission.servers = vec![dead_addr.into()];
    config
        .upstreams
        .insert("submission".into(), submission.clone());
    // Named but used by no listener: not checked.
    config.upstreams.insert("spare".into(), submission);
    config.listeners.push(ListenerSettings {
        address: "127.0.0.1:0".parse().unwrap(),
        protocol: Protocol::Smtp,
        tls: TlsMode::None,
        require_tls: false,
        upstream: Some("submission".into()),
    });
    let connector = Arc::new(Connector::new(&config).unwrap());
    let keys: Vec<&str> = connector.in_use().iter().map(|u| u.key.as_str()).collect();
    assert_eq!(keys, ["upstream", "upstreams.submission"]);

    let health = Arc::new(Health::default());
    let task = tokio::spawn(check_loop(
        move || connector.clone(),
        Arc::new(Metrics::new()),
        health.clone(),
    ));
    let verdict = health.verdict(WAIT).await;
    task.abort();
    let verdict = verdict.expect("a verdict");
    assert!(!verdict.ready);
    assert_eq!(verdict.unready, ["upstreams.submission"]);
    assert_eq!(verdict.problems.len(), 1, "{:?}", verdict.problems);
    assert_eq!(
        verdict.problems[0].0,
        format!("{dead_addr} (upstreams.submission)")
    );
}

/// A receiver that takes a PROXY v2 header and answers with `lines`, one
/// per line it reads after the greeting.
async fn mailbox_receiver(greeting: &'static str, answers: &'static str) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        // A v2 LOCAL header: 16 bytes, no addresses.
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).await.unwrap();
        stream.write_all(greeting.as_bytes()).await.unwrap();
        let mut command = [0u8; 64];
        let _ = stream.read(&mut command).await;
        let _ = stream.write_all(answers.as_bytes()).await;
    });
    addr
}

#[tokio::test]
async fn the_receiver_check_speaks_imap_and_pop3_to_their_receivers() {
    let mut config = Config::default();
    config.upstream.proxy_protocol = ProxyProtocol::V2;
    let imap = mailbox_receiver(
        "* OK [CAPABILITY IMAP4rev1] ready\r\n",
        "* BYE\r\nm1 OK bye\r\n",
    )
    .await;
    config.upstream.servers = vec![imap.into()];
    let upstream =
        Upstream::new("upstreams.imap", &config.upstream, Protocol::Imap, "m.test").unwrap();
    assert_eq!(check(&upstream, imap).await, Ok(()));

    let pop3 = mailbox_receiver("+OK ready\r\n", "+OK bye\r\n").await;
    let upstream =
        Upstream::new("upstreams.pop3", &config.upstream, Protocol::Pop3, "m.test").unwrap();
    assert_eq!(check(&upstream, pop3).await, Ok(()));

    // An IMAP receiver that took the header for a command.
    let confused = mailbox_receiver("* BAD invalid command\r\n", "").await;
    let upstream =
        Upstream::new("upstreams.imap", &config.upstream, Protocol::Imap, "m.test").unwrap();
    match check(&upstream, confused).await {
        Err(Problem::Broken(e)) => assert!(e.contains("haproxy_trusted_networks"), "{e}"),
        other => panic!("expected the header advice, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connection_sends_its_header_before_anything_else() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let header = b"PROXY TCP4 127.0.0.9 127.0.0.1 5000 25\r\n";
    let within = Duration::from_secs(5);
    let mut stream = tcp_connect(server, within, header, within)
        .await
        .expect("connects");
    stream.write_all(b"EHLO x\r\n").await.unwrap();
    let (mut accepted, _) = listener.accept().await.unwrap();
    let mut got = vec![0; header.len() + 8];
    tokio::io::AsyncReadExt::read_exact(&mut accepted, &mut got)
        .await
        .unwrap();
    assert_eq!(&got[..header.len()], header);
    assert_eq!(&got[header.len()..], b"EHLO x\r\n");
    assert!(stream.nodelay().unwrap());
}

#[tokio::test]
async fn a_refused_connection_is_an_error_with_or_without_a_header() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let within = Duration::from_secs(5);
    for header in [&b""[..], b"PROXY UNKNOWN\r\n"] {
        let refused = tcp_connect(closed, within, header, within).await;
        assert!(refused.is_err(), "header {header:?}: {refused:?}");
    }
}
