//! The receiver check: mailmoat and the receiver must agree on the PROXY
//! header, and `/readyz` and the log say so when they do not; probes of
//! `/readyz` cost the receiver nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mailmoat::sink::{Sink, SinkOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::harness::*;

/// A receiver like Postfix's smtpd without `smtpd_upstream_proxy_protocol`:
/// it greets at once and answers every line as a command.
struct PlainReceiver {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl PlainReceiver {
    async fn start() -> PlainReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(tokio::time::timeout(WAIT, plain_session(stream)));
            }
        });
        PlainReceiver {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for PlainReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn plain_session(stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    writer
        .write_all(b"220 plain.test ESMTP Postfix\r\n")
        .await?;
    let mut line = Vec::new();
    for _ in 0..100 {
        line.clear();
        if (&mut reader)
            .take(4096)
            .read_until(b'\n', &mut line)
            .await?
            == 0
        {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let command = text.trim_end_matches(['\r', '\n']).to_ascii_uppercase();
        let reply: &[u8] = match command.as_str() {
            "QUIT" => {
                writer.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            "" => b"500 5.5.2 Error: bad syntax\r\n",
            c if c.starts_with("EHLO") || c.starts_with("HELO") => b"250 plain.test\r\n",
            _ => b"502 5.5.2 Error: command not recognized\r\n",
        };
        writer.write_all(reply).await?;
    }
    Ok(())
}

/// `mailmoat run` with its admin listener, relaying to `upstream`; stderr
/// goes to a file.
struct Running {
    _child: tokio::process::Child,
    admin: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

async fn run(name: &str, upstream: SocketAddr, proxy_protocol: &str) -> Running {
    let (listen, admin) = (unused_addr(), unused_addr());
    let dir = TempDir::new(name);
    let config = dir.write(
        "mailmoat.toml",
        &format!(
            "[server]\nlisten = [\"{listen}\"]\n[upstream]\nservers = [\"{upstream}\"]\n\
             proxy_protocol = \"{proxy_protocol}\"\n[admin]\nlisten = \"{admin}\"\n\
             [log]\nlevel = \"info\"\n"
        ),
    );
    let log = dir.path().join("stderr.log");
    let child = mailmoat_logged(&config, &log);
    Running {
        _child: child,
        admin,
        log,
        _dir: dir,
    }
}

impl Running {
    /// The log once it has a line containing every one of `needles`.
    async fn log_with(&self, needles: &[&str]) -> String {
        let has = |text: &str| {
            text.lines()
                .any(|line| needles.iter().all(|n| line.contains(n)))
        };
        wait_for(|| has(&std::fs::read_to_string(&self.log).unwrap_or_default())).await;
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(has(&text), "no log line with {needles:?} in:\n{text}");
        text
    }
}

#[tokio::test]
async fn receiver_that_rejects_the_proxy_header_makes_readyz_unready_with_the_postfix_hint() {
    let receiver = PlainReceiver::start().await;
    let proxy = run("check-rejects", receiver.addr, "v2").await;
    proxy
        .log_with(&[
            "ERROR",
            "smtpd_upstream_proxy_protocol=haproxy",
            "500 5.5.2",
        ])
        .await;
    let (status, body) = http_get(proxy.admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&receiver.addr.to_string()) && body.contains("smtpd_upstream_proxy_protocol"),
        "{body}"
    );
}

#[tokio::test]
async fn receiver_that_expects_a_header_mailmoat_does_not_send_makes_readyz_unready() {
    // The sink expects a header, as Postfix with smtpd_upstream_proxy_protocol.
    let sink = sink().await;
    let proxy = run("check-expects", sink.addr(), "off").await;
    let log = proxy
        .log_with(&[
            "ERROR",
            "upstream.proxy_protocol = \"v2\"",
            "remove smtpd_upstream_proxy_protocol",
        ])
        .await;
    // PROXY off toward a loopback receiver: every client looks local.
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("mynetworks")),
        "{log}"
    );
    let (status, body) = http_get(proxy.admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("smtpd_upstream_proxy_protocol"), "{body}");
}

async fn readyz_with(sink: &Sink, proxy_protocol: &str) -> (u16, String) {
    let toml = format!("[upstream]\nproxy_protocol = \"{proxy_protocol}\"\n");
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    http_get(proxy.admin.unwrap(), "/readyz").await
}

#[tokio::test]
async fn receiver_that_agrees_on_proxy_makes_readyz_ready() {
    let expects_header = sink().await;
    for version in ["v2", "v1"] {
        let (status, body) = readyz_with(&expects_header, version).await;
        assert_eq!((status, body.as_str()), (200, "ready\n"), "{version}");
    }
    // Health checks are not clients: the receiver counted none.
    assert_eq!(expects_header.connections(), 0);
    let plain = sink_with(SinkOptions {
        proxy_protocol: false,
        ..SinkOptions::default()
    })
    .await;
    let (status, body) = readyz_with(&plain, "off").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
}

#[tokio::test]
async fn readyz_probes_open_no_receiver_connection() {
    let receiver = PlainReceiver::start().await;
    let proxy = TestProxy::start("[upstream]\nproxy_protocol = \"off\"\n", &[receiver.addr]).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let before = receiver.accepted.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(http_get(admin, "/readyz").await.0, 200);
    }
    let after = receiver.accepted.load(Ordering::SeqCst);
    // One periodic check may fall in between; five probes may not.
    assert!(
        after <= before + 1,
        "{before} -> {after} receiver connections"
    );
}
