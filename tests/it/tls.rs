//! TLS termination: every rule holds inside STARTTLS and implicit TLS.
//! Certificates are generated per test; the clients are rustls (raw, for
//! exact bytes and attacks) and lettre (a legitimate sender).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use mailmoat::config::{Config, ListenerSettings, Protocol, TlsMode};
use mailmoat::sink::SinkOptions;
use mailmoat::tls::generate;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, Instant};

use crate::harness::*;

/// A self-signed certificate and key for "localhost" in a temporary
/// directory.
struct TlsKit {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    root: CertificateDer<'static>,
}

impl TlsKit {
    fn new(test: &str) -> TlsKit {
        let dir = TempDir::new(test);
        let generated = generate::self_signed(&["localhost"]).expect("certificate");
        let (cert, key) = generated.write_in(dir.path(), "mx").expect("written");
        TlsKit {
            dir,
            cert,
            key,
            root: generated.der().clone(),
        }
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }
}

/// A proxy config whose listeners are exactly `modes` (in order), with
/// the kit's certificate.
fn tls_config(toml: &str, sink: SocketAddr, kit: &TlsKit, modes: &[(TlsMode, bool)]) -> Config {
    let mut config = config(toml, &[sink]);
    config.server.listen.clear();
    config.listeners = modes
        .iter()
        .map(|&(tls, require_tls)| ListenerSettings {
            address: "127.0.0.1:0".parse().unwrap(),
            protocol: Protocol::Smtp,
            tls,
            require_tls,
            upstream: None,
        })
        .collect();
    config.tls.certificate = Some(kit.cert.clone());
    config.tls.key = Some(kit.key.clone());
    config
}

async fn starttls_proxy(toml: &str, sink: SocketAddr, kit: &TlsKit) -> TestProxy {
    TestProxy::start_with(tls_config(toml, sink, kit, &[(TlsMode::Starttls, false)])).await
}

/// A session from `ip` past STARTTLS and the second EHLO.
async fn tls_session(
    ip: Ipv4Addr,
    addr: SocketAddr,
    kit: &TlsKit,
) -> Raw<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let raw = session(ip, addr).await;
    let mut tls = raw_starttls(raw, kit).await;
    tls.send(b"EHLO client.test\r\n").await;
    let ehlo = tls.expect("250").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo:?}");
    tls
}

async fn raw_starttls(
    raw: Raw,
    kit: &TlsKit,
) -> Raw<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    raw.starttls(&kit.roots()).await
}

#[tokio::test]
async fn inside_one_starttls_session_message_and_recipient_limits_hold() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-limits");
    let toml = "[limits]\nmessage_rate = \"4/s\"\nmessage_burst = 2\nrecipients_per_message = 2\n";
    let proxy = starttls_proxy(toml, sink.addr(), &kit).await;
    let mut tls = tls_session(Ipv4Addr::new(127, 0, 90, 1), proxy.addr, &kit).await;

    for _ in 0..2 {
        tls.send(b"MAIL FROM:<a@example.org>\r\n").await;
        tls.expect("250").await;
        tls.send(b"RSET\r\n").await;
        tls.expect("250").await;
    }
    tls.send(b"MAIL FROM:<a@example.org>\r\n").await;
    tls.expect("450 4.7.1").await;
    // A token comes back within 250ms at 4/s.
    let deadline = Instant::now() + WAIT;
    loop {
        tls.send(b"MAIL FROM:<a@example.org>\r\n").await;
        let reply = tls.reply().await;
        if reply.starts_with("250") {
            break;
        }
        assert!(reply.starts_with("450 4.7.1"), "{reply:?}");
        assert!(Instant::now() < deadline, "the bucket never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for rcpt in ["b@example.net", "c@example.net"] {
        tls.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()).await;
        tls.expect("250").await;
    }
    tls.send(b"RCPT TO:<d@example.net>\r\n").await;
    tls.expect("452 4.5.3").await;
    tls.send(b"DATA\r\n").await;
    tls.expect("354").await;
    tls.send(b"Subject: inside TLS\r\n\r\nhello\r\n.\r\n").await;
    tls.expect("250").await;
    assert!(wait_for(|| sink.delivered() == 1).await);
    assert_eq!(sink.messages()[0].rcpt_to.len(), 2);
}

#[tokio::test]
async fn five_auth_failures_inside_tls_ban_the_ip_and_close_its_open_sessions() {
    let sink = sink_with(SinkOptions {
        auth: Some(("user".into(), "secret".into())),
        ..SinkOptions::default()
    })
    .await;
    let kit = TlsKit::new("tls-auth");
    let proxy = starttls_proxy("[autoban]\nauth_failures = 5\n", sink.addr(), &kit).await;
    let ip = Ipv4Addr::new(127, 0, 90, 2);
    // Held open, idle, while the same IP guesses passwords inside TLS.
    let mut idle = session(ip, proxy.addr).await;
    let mut tls = tls_session(ip, proxy.addr, &kit).await;
    for _ in 0..5 {
        // user / wrong
        tls.send(b"AUTH PLAIN AHVzZXIAd3Jvbmc=\r\n").await;
        tls.expect("535").await;
    }
    let said = timeout(WAIT, idle.closed())
        .await
        .expect("idle session closed");
    assert!(said.starts_with("421 4.7.1"), "{said:?}");
    let mut again = Raw::connect(ip, proxy.addr).await;
    again.expect("554 5.7.1").await;
}

#[tokio::test]
async fn a_smuggling_pattern_inside_tls_is_refused() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-smuggle");
    let proxy = starttls_proxy("", sink.addr(), &kit).await;
    let mut tls = tls_session(Ipv4Addr::new(127, 0, 90, 3), proxy.addr, &kit).await;
    tls.send(b"MAIL FROM:<a@example.org>\r\n").await;
    tls.expect("250").await;
    tls.send(b"RCPT TO:<b@example.net>\r\n").await;
    tls.expect("250").await;
    tls.send(b"DATA\r\n").await;
    tls.expect("354").await;
    tls.send(b"Subject: s\r\n\r\nhi\n.\r\nMAIL FROM:<evil@x>\r\n")
        .await;
    tls.expect("421 4.5.0").await;
    assert_eq!(sink.delivered(), 0);
}

#[tokio::test]
async fn plaintext_after_starttls_in_the_same_packet_is_refused() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-inject");
    let proxy = starttls_proxy("", sink.addr(), &kit).await;
    let mut raw = session(Ipv4Addr::new(127, 0, 90, 4), proxy.addr).await;
    raw.send(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n").await;
    // Never told to start TLS over a stream it tampered with.
    assert_eq!(raw.closed().await, "");
    proxy
        .wait_metric(
            r#"mailmoat_sessions_closed_total{reason="protocol_error"}"#,
            1.0,
        )
        .await;
}

#[tokio::test]
async fn a_client_stalling_mid_handshake_is_cut_at_the_handshake_deadline() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-stall");
    let mut config = tls_config("", sink.addr(), &kit, &[(TlsMode::Starttls, false)]);
    config.tls.handshake_timeout = Duration::from_millis(500);
    let proxy = TestProxy::start_with(config).await;
    let mut raw = session(Ipv4Addr::new(127, 0, 90, 5), proxy.addr).await;
    raw.send(b"STARTTLS\r\n").await;
    raw.expect("220 ").await;
    // The first bytes of a ClientHello, then nothing.
    raw.stream()
        .write_all(b"\x16\x03\x01\x00\xc8\x01")
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(raw.closed().await, "");
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(400) && held < Duration::from_secs(2),
        "cut after {held:?}, not at the 500ms deadline"
    );
    proxy
        .wait_metric(
            r#"mailmoat_sessions_closed_total{reason="tls_failed"}"#,
            1.0,
        )
        .await;
}

#[tokio::test]
async fn require_tls_refuses_mail_before_starttls_with_530_and_hides_auth() {
    let sink = sink_with(SinkOptions {
        auth: Some(("user".into(), "secret".into())),
        ..SinkOptions::default()
    })
    .await;
    let kit = TlsKit::new("tls-require");
    let config = tls_config("", sink.addr(), &kit, &[(TlsMode::Starttls, true)]);
    let proxy = TestProxy::start_with(config).await;
    let mut raw = Raw::connect(Ipv4Addr::new(127, 0, 90, 6), proxy.addr).await;
    raw.expect("220 ").await;
    raw.send(b"EHLO client.test\r\n").await;
    let ehlo = raw.expect("250").await;
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo:?}"
    );
    raw.send(b"MAIL FROM:<a@example.org>\r\n").await;
    raw.expect("530 5.7.0").await;
    let mut tls = raw_starttls(raw, &kit).await;
    tls.send(b"EHLO client.test\r\n").await;
    assert!(tls.expect("250").await.contains("AUTH"));
    // user / secret
    tls.send(b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n").await;
    tls.expect("235").await;
    tls.send(b"MAIL FROM:<a@example.org>\r\n").await;
    tls.expect("250").await;
}

#[tokio::test]
async fn a_legitimate_sender_delivers_with_starttls() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-lettre");
    let proxy = starttls_proxy("", sink.addr(), &kit).await;
    let mut conn = AsyncSmtpConnection::connect_tokio1(
        proxy.addr,
        Some(WAIT),
        &ClientId::Domain("client.test".into()),
        None,
        Some(Ipv4Addr::new(127, 0, 90, 7).into()),
    )
    .await
    .expect("connect");
    assert!(conn.can_starttls());
    let params = TlsParameters::builder("localhost".into())
        .add_root_certificate(Certificate::from_der(kit.root.to_vec()).unwrap())
        .build_rustls()
        .unwrap();
    conn.starttls(params, &ClientId::Domain("client.test".into()))
        .await
        .expect("STARTTLS");
    assert!(conn.is_encrypted());
    let envelope = lettre::address::Envelope::new(
        Some("a@example.org".parse().unwrap()),
        vec!["b@example.net".parse().unwrap()],
    )
    .unwrap();
    conn.send(&envelope, b"Subject: over TLS\r\n\r\nhello\r\n")
        .await
        .expect("send");
    conn.quit().await.expect("quit");
    assert!(wait_for(|| sink.delivered() == 1).await);
    proxy
        .wait_metric(r#"mailmoat_tls_handshakes_total{result="ok"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn the_implicit_tls_listener_relays_a_message_and_tells_the_receiver_about_tls() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-implicit");
    let config = tls_config("", sink.addr(), &kit, &[(TlsMode::Implicit, false)]);
    let proxy = TestProxy::start_with(config).await;
    let stream = connect_from(Ipv4Addr::new(127, 0, 90, 8), proxy.addr).await;
    let mut tls = Raw::over(tls_handshake(stream, &kit.roots()).await);
    tls.expect("220 ").await;
    tls.send(b"EHLO client.test\r\n").await;
    let ehlo = tls.expect("250").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo:?}");
    tls.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        .await;
    tls.expect("250").await;
    tls.expect("250").await;
    tls.expect("354").await;
    tls.send(b"Subject: implicit\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        .await;
    tls.expect("250").await;
    tls.expect("221").await;
    assert!(wait_for(|| sink.delivered() == 1).await);
    let received = &sink.messages()[0];
    let tlv = received.proxy_tls.as_ref().expect("PROXY v2 TLS TLVs");
    assert_eq!(tlv.version.as_deref(), Some("TLSv1.3"));
    let cipher = tlv.cipher.as_deref().unwrap_or_default();
    assert!(cipher.starts_with("TLS13_"), "{tlv:?}");
    assert_eq!(tlv.authority.as_deref(), Some("localhost"));
}

#[tokio::test]
async fn replaced_certificate_files_are_presented_within_2s_while_an_open_session_keeps_working() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-reload");
    let proxy = starttls_proxy("", sink.addr(), &kit).await;
    let mut open = tls_session(Ipv4Addr::new(127, 0, 90, 9), proxy.addr, &kit).await;

    // certbot's way: new files written, then moved over the old ones.
    let generated = generate::self_signed(&["localhost"]).expect("certificate");
    let (new_cert, new_key) = generated.write_in(kit.dir.path(), "renewed").unwrap();
    std::fs::rename(&new_key, &kit.key).unwrap();
    std::fs::rename(&new_cert, &kit.cert).unwrap();
    let renewed = vec![generated.der().clone()];
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut raw = session(Ipv4Addr::new(127, 0, 90, 10), proxy.addr).await;
        raw.send(b"STARTTLS\r\n").await;
        raw.expect("220 ").await;
        let stream = raw.into_stream();
        let connector = tokio_rustls::TlsConnector::from(tls_client_config(&renewed));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        if timeout(WAIT, connector.connect(name, stream))
            .await
            .expect("handshake ends")
            .is_ok()
        {
            assert!(Instant::now() < deadline, "the new certificate showed late");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate never showed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The session from before the renewal still relays.
    open.send(b"NOOP\r\n").await;
    open.expect("250").await;
}

#[tokio::test]
async fn failed_handshakes_are_protocol_errors_toward_a_ban() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-failures");
    let toml = "[autoban]\nprotocol_errors = 2\n";
    let config = tls_config(toml, sink.addr(), &kit, &[(TlsMode::Implicit, false)]);
    let proxy = TestProxy::start_with(config).await;
    let ip = Ipv4Addr::new(127, 0, 90, 11);
    for _ in 0..2 {
        // Plaintext SMTP on the TLS port is no ClientHello.
        let mut raw = Raw::connect(ip, proxy.addr).await;
        raw.send(b"EHLO client.test\r\n").await;
        // A TLS alert at most, never a greeting.
        let said = raw.closed().await;
        assert!(said.is_empty() || said.starts_with('\u{15}'), "{said:?}");
    }
    proxy
        .wait_metric(r#"mailmoat_tls_handshakes_total{result="failed"}"#, 2.0)
        .await;
    proxy.wait_metric("mailmoat_active_bans", 1.0).await;
    // Refused at the door, before any TLS work: in plaintext.
    let mut again = Raw::connect(ip, proxy.addr).await;
    again.expect("554 5.7.1").await;
    assert_eq!(sink.connections(), 0, "a receiver connection was spent");
}

#[tokio::test]
async fn a_ban_closes_a_client_still_in_its_handshake() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-ban-mid-handshake");
    let token = kit.dir.write("token", "s3cret\n");
    let mut config = tls_config("", sink.addr(), &kit, &[(TlsMode::Implicit, false)]);
    config.admin.token_file = Some(token);
    let proxy = TestProxy::start_with(config).await;
    // The first bytes of a ClientHello, then nothing: the handshake waits
    // out its 10s deadline unless the ban reaches it.
    let mut raw = Raw::connect(Ipv4Addr::new(127, 0, 90, 12), proxy.addr).await;
    raw.stream()
        .write_all(b"\x16\x03\x01\x00\xc8\x01")
        .await
        .unwrap();
    proxy.wait_metric("mailmoat_active_sessions", 1.0).await;
    let started = Instant::now();
    let ban = "/admin/bans?ip=127.0.90.12";
    let (status, body) = http(proxy.admin.unwrap(), "POST", ban, Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    timeout(WAIT, raw.closed()).await.expect("closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed only after {:?}",
        started.elapsed()
    );
    proxy
        .wait_metric(r#"mailmoat_sessions_closed_total{reason="blocked"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn handshakes_that_run_out_of_time_or_slots_are_not_counted_toward_a_ban() {
    let sink = sink().await;
    let kit = TlsKit::new("tls-starved");
    let toml = "[autoban]\nprotocol_errors = 1\n";
    let mut config = tls_config(toml, sink.addr(), &kit, &[(TlsMode::Implicit, false)]);
    config.tls.max_handshakes = 1;
    config.tls.handshake_timeout = Duration::from_millis(400);
    let proxy = TestProxy::start_with(config).await;
    // The one slot, held by a client that stalls mid-handshake.
    let stalling = Ipv4Addr::new(127, 0, 90, 13);
    let mut staller = Raw::connect(stalling, proxy.addr).await;
    staller
        .stream()
        .write_all(b"\x16\x03\x01\x00\xc8\x01")
        .await
        .unwrap();
    proxy.wait_metric("mailmoat_active_sessions", 1.0).await;
    // A client arriving meanwhile waits for the slot: busy, out of time,
    // or through once the staller is cut; never a protocol error.
    let waiting = Ipv4Addr::new(127, 0, 90, 14);
    let stream = connect_from(waiting, proxy.addr).await;
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(&kit.roots()));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    drop(
        timeout(WAIT, connector.connect(name, stream))
            .await
            .expect("ends"),
    );
    assert_eq!(
        timeout(WAIT, staller.closed()).await.expect("staller cut"),
        ""
    );
    proxy
        .wait_metric(
            r#"mailmoat_sessions_closed_total{reason="tls_failed"}"#,
            1.0,
        )
        .await;
    // With protocol_errors = 1, one counted event would have banned.
    assert_eq!(proxy.metric("mailmoat_protocol_errors_total"), 0.0);
    assert_eq!(proxy.metric("mailmoat_active_bans"), 0.0);
    for ip in [stalling, waiting] {
        let stream = connect_from(ip, proxy.addr).await;
        let mut tls = Raw::over(tls_handshake(stream, &kit.roots()).await);
        tls.expect("220 ").await;
    }
}
