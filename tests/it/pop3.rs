//! POP3 behind the door (issue 14): login verdicts counted from the
//! receiver's own replies, the authenticated session relayed under its own
//! idle limit, STLS answered by mailmoat. The receiver is the harness's
//! `Pop3Receiver`; clients are raw, for exact bytes.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use mailmoat::config::{Config, ListenerSettings, Protocol, TlsMode};
use mailmoat::tls::generate;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::harness::*;
use crate::pop3_receiver::{self, Pop3Receiver, AUTH_FAILED, MESSAGE, PASSWORD, USER};

/// A config from `toml` whose one listener speaks POP3 in `tls` mode,
/// relaying to `receiver`.
fn pop3_config(toml: &str, receiver: SocketAddr, tls: TlsMode) -> Config {
    let mut config = config(toml, &[receiver]);
    config.server.listen.clear();
    config.listeners = vec![ListenerSettings {
        address: "127.0.0.1:0".parse().unwrap(),
        protocol: Protocol::Pop3,
        tls,
        require_tls: false,
        upstream: None,
    }];
    config
}

/// A raw POP3 client: status lines and multi-line replies, with deadlines.
struct Client<S> {
    reader: BufReader<S>,
}

impl Client<TcpStream> {
    async fn connect(ip: Ipv4Addr, addr: SocketAddr) -> Client<TcpStream> {
        Client::over(connect_from(ip, addr).await)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn over(stream: S) -> Client<S> {
        Client {
            reader: BufReader::new(stream),
        }
    }

    async fn send(&mut self, line: &str) {
        let stream = self.reader.get_mut();
        stream.write_all(line.as_bytes()).await.expect("send");
        stream.write_all(b"\r\n").await.expect("send");
        stream.flush().await.expect("flush");
    }

    /// One line, "" at end of stream.
    async fn line(&mut self) -> String {
        let mut line = Vec::new();
        timeout(WAIT, self.reader.read_until(b'\n', &mut line))
            .await
            .expect("a line in time")
            .unwrap_or(0);
        String::from_utf8_lossy(&line).into_owned()
    }

    /// Sends `command` and reads its one-line reply.
    async fn ask(&mut self, command: &str) -> String {
        self.send(command).await;
        self.line().await
    }

    /// Sends `command` and reads its multi-line reply, up to the lone dot.
    async fn ask_lines(&mut self, command: &str) -> String {
        self.send(command).await;
        let mut all = self.line().await;
        if !all.starts_with("+OK") {
            return all;
        }
        loop {
            let line = self.line().await;
            assert!(
                !line.is_empty(),
                "closed inside a multi-line reply: {all:?}"
            );
            all.push_str(&line);
            if line == ".\r\n" {
                return all;
            }
        }
    }

    /// USER and PASS; the reply to PASS.
    async fn login(&mut self, user: &str, password: &str) -> String {
        assert_eq!(self.ask(&format!("USER {user}")).await, "+OK\r\n");
        self.ask(&format!("PASS {password}")).await
    }

    /// Reads until the server closes; what it said.
    async fn closed(&mut self) -> String {
        let mut all = String::new();
        loop {
            match self.line().await {
                line if line.is_empty() => return all,
                line => all.push_str(&line),
            }
        }
    }
}

#[tokio::test]
async fn pop3_auth_failures_count_toward_a_ban_and_the_ip_is_then_refused() {
    let receiver = Pop3Receiver::start().await;
    let toml = "[autoban]\nauth_failures = 3\n";
    let proxy = TestProxy::start_with(pop3_config(toml, receiver.addr, TlsMode::None)).await;
    let ip = Ipv4Addr::new(127, 0, 110, 1);
    for guess in 0..3 {
        let mut client = Client::connect(ip, proxy.addr).await;
        assert!(client.line().await.starts_with("+OK test POP3 ready"));
        let verdict = client.login(USER, &format!("guess{guess}")).await;
        assert_eq!(verdict, format!("{AUTH_FAILED}\r\n"));
    }
    let reached = receiver.connections();
    assert_eq!(reached, 3);
    // Bans reach the door's list a moment later.
    proxy.wait_metric("mailmoat_active_bans", 1.0).await;
    let mut refused = Client::connect(ip, proxy.addr).await;
    let said = refused.closed().await;
    assert!(said.starts_with("-ERR"), "{said:?}");
    assert_eq!(
        receiver.connections(),
        reached,
        "a banned IP reached the receiver"
    );
    // Another IP is not touched.
    let mut other = Client::connect(Ipv4Addr::new(127, 0, 110, 2), proxy.addr).await;
    assert!(other.line().await.starts_with("+OK test POP3 ready"));
}

#[tokio::test]
async fn pop3_sys_temp_and_in_use_refusals_do_not_count_toward_a_ban() {
    let receiver = Pop3Receiver::start().await;
    let toml = "[autoban]\nauth_failures = 2\n";
    let proxy = TestProxy::start_with(pop3_config(toml, receiver.addr, TlsMode::None)).await;
    let ip = Ipv4Addr::new(127, 0, 110, 3);
    for reply in [
        "-ERR [SYS/TEMP] Temporary authentication failure.",
        "-ERR [IN-USE] Mailbox is locked by another session.",
    ] {
        receiver.answer_logins_with(Some(reply));
        // Distinct passwords: were these failures, each would count.
        for guess in 0..3 {
            let mut client = Client::connect(ip, proxy.addr).await;
            assert!(client.line().await.starts_with("+OK"));
            let verdict = client.login(USER, &format!("guess{guess}")).await;
            assert_eq!(verdict, format!("{reply}\r\n"));
            assert_eq!(client.ask("QUIT").await, "+OK Bye\r\n");
        }
    }
    let logins = |outcome: &str| {
        proxy.metric(&format!(
            "mailmoat_logins_total{{outcome=\"{outcome}\",protocol=\"pop3\"}}"
        ))
    };
    assert_eq!((logins("temporary"), logins("failure")), (6.0, 0.0));
    assert_eq!(proxy.metric("mailmoat_active_bans"), 0.0);
    receiver.answer_logins_with(None);
    let mut client = Client::connect(ip, proxy.addr).await;
    assert!(client.line().await.starts_with("+OK test POP3 ready"));
    assert_eq!(client.login(USER, PASSWORD).await, "+OK Logged in.\r\n");
}

#[tokio::test]
async fn the_correct_password_reads_the_message_after_the_preauth_idle_limit_would_have_passed() {
    let receiver = Pop3Receiver::start().await;
    let toml = "[mailbox]\npreauth_idle = \"300ms\"\nauthenticated_idle = \"5s\"\n";
    let proxy = TestProxy::start_with(pop3_config(toml, receiver.addr, TlsMode::None)).await;
    let mut client = Client::connect(Ipv4Addr::new(127, 0, 110, 4), proxy.addr).await;
    assert!(client.line().await.starts_with("+OK test POP3 ready"));
    assert_eq!(client.login(USER, PASSWORD).await, "+OK Logged in.\r\n");
    // Held idle past the pre-login limit, well within the logged-in one:
    // the wait is what is tested, not a synchronization.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        client.ask("STAT").await,
        format!("+OK 1 {}\r\n", MESSAGE.len())
    );
    assert_eq!(
        client.ask_lines("RETR 1").await,
        format!("+OK {} octets\r\n{MESSAGE}.\r\n", MESSAGE.len())
    );
    assert_eq!(client.ask("QUIT").await, "+OK Bye\r\n");
    assert_eq!(client.closed().await, "");
}

#[tokio::test]
async fn an_idle_client_is_cut_at_the_preauth_idle_limit_before_it_logs_in() {
    let receiver = Pop3Receiver::start().await;
    let toml = "[mailbox]\npreauth_idle = \"300ms\"\nauthenticated_idle = \"5s\"\n";
    let proxy = TestProxy::start_with(pop3_config(toml, receiver.addr, TlsMode::None)).await;
    let mut client = Client::connect(Ipv4Addr::new(127, 0, 110, 5), proxy.addr).await;
    assert!(client.line().await.starts_with("+OK test POP3 ready"));
    let said = timeout(Duration::from_secs(3), client.closed())
        .await
        .expect("cut well before the logged-in idle limit");
    assert!(said.starts_with("-ERR [SYS/TEMP]"), "{said:?}");
}

/// A self-signed certificate for "localhost", written for the proxy.
struct TlsKit {
    _dir: TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    root: CertificateDer<'static>,
}

impl TlsKit {
    fn new(test: &str) -> TlsKit {
        let dir = TempDir::new(test);
        let generated = generate::self_signed(&["localhost"]).expect("certificate");
        let (cert, key) = generated.write_in(dir.path(), "pop3").expect("written");
        TlsKit {
            _dir: dir,
            cert,
            key,
            root: generated.der().clone(),
        }
    }
}

#[tokio::test]
async fn stls_is_answered_by_mailmoat_and_a_failed_login_inside_tls_counts_toward_a_ban() {
    let receiver = Pop3Receiver::start().await;
    let kit = TlsKit::new("pop3-stls");
    let mut config = pop3_config(
        "[autoban]\nauth_failures = 1\n",
        receiver.addr,
        TlsMode::Starttls,
    );
    config.tls.certificate = Some(kit.cert.clone());
    config.tls.key = Some(kit.key.clone());
    let proxy = TestProxy::start_with(config).await;
    let ip = Ipv4Addr::new(127, 0, 110, 6);
    let mut client = Client::connect(ip, proxy.addr).await;
    assert!(client.line().await.starts_with("+OK test POP3 ready"));
    let capa = client.ask_lines("CAPA").await;
    assert!(capa.contains("\r\nSTLS\r\n"), "{capa:?}");
    let commands = receiver.commands();
    assert_eq!(client.ask("STLS").await, "+OK Begin TLS negotiation\r\n");
    assert!(client.reader.buffer().is_empty(), "bytes after the +OK");
    let stream = tls_handshake(client.reader.into_inner(), std::slice::from_ref(&kit.root)).await;
    let mut tls = Client::over(stream);
    assert_eq!(receiver.commands(), commands, "STLS reached the receiver");
    let capa = tls.ask_lines("CAPA").await;
    assert!(!capa.contains("STLS"), "{capa:?}");
    assert!(capa.contains("\r\nUSER\r\n"), "{capa:?}");
    assert_eq!(tls.login(USER, "wrong").await, format!("{AUTH_FAILED}\r\n"));
    let reached = receiver.connections();
    proxy.wait_metric("mailmoat_active_bans", 1.0).await;
    let mut refused = Client::connect(ip, proxy.addr).await;
    let said = refused.closed().await;
    assert!(said.starts_with("-ERR"), "{said:?}");
    assert_eq!(receiver.connections(), reached);
    let _ = pop3_receiver::MESSAGE;
}
