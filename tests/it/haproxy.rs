//! Interop with a real HAProxy in front of mailmoat, as operators deploy
//! it: `send-proxy-v2` for clients, `option smtpchk` health checks (a v2
//! `LOCAL` header, EHLO, QUIT) from HAProxy's own address, which mailmoat
//! trusts.
//!
//!   client -> HAProxy (127.0.0.1:frontend) -> mailmoat -> sink
//!                      source 127.0.77.1
//!
//! Needs Debian's `haproxy` (CI installs it in `.ci/run`): missing, the
//! test fails under `CI` and is skipped with a notice elsewhere.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::time::{timeout, Instant};

use crate::harness::*;

/// The address HAProxy connects from: the only one mailmoat trusts.
const HAPROXY_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 77, 1);
/// Checks are this often (ms), so a few seconds hold many of them.
const CHECK_EVERY_MS: u64 = 100;

/// The `haproxy` binary, if installed.
fn haproxy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
}

/// A HAProxy child process, killed when dropped.
struct Haproxy {
    _child: Child,
    frontend: SocketAddr,
    stats: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Haproxy {
    async fn start(binary: &Path, mailmoat: SocketAddr) -> Haproxy {
        let dir = TempDir::new("haproxy");
        let stats = dir.path().join("admin.sock");
        let frontend = unused_addr();
        let config = format!(
            "global\n\
             \x20   nbthread 1\n\
             \x20   stats socket {stats} level admin\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 5s\n\
             \x20   timeout client 30s\n\
             \x20   timeout server 30s\n\
             \x20   timeout check 5s\n\
             frontend smtp\n\
             \x20   bind {frontend}\n\
             \x20   default_backend mailmoat\n\
             backend mailmoat\n\
             \x20   option smtpchk EHLO haproxy.test\n\
             \x20   server mm {mailmoat} send-proxy-v2 check inter {CHECK_EVERY_MS}ms \
                    fall 2 rise 1 source {HAPROXY_SOURCE}\n",
            stats = stats.display(),
        );
        let config_path = dir.write("haproxy.cfg", &config);
        let log = dir.path().join("haproxy.log");
        let log_file = std::fs::File::create(&log).expect("create the HAProxy log");
        let child = Command::new(binary)
            .arg("-f")
            .arg(&config_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone the log file"))
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn haproxy");
        Haproxy {
            _child: child,
            frontend,
            stats,
            log,
            _dir: dir,
        }
    }

    /// What HAProxy said on stderr, for a failure message.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's row of `show stat`, by column name; `None` while the
    /// stats socket is not up yet.
    async fn server_stat(&self) -> Option<Stat> {
        let exchange = async {
            let mut socket = UnixStream::connect(&self.stats).await.ok()?;
            socket.write_all(b"show stat\n").await.ok()?;
            let mut csv = String::new();
            socket.read_to_string(&mut csv).await.ok()?;
            Some(csv)
        };
        let csv = timeout(WAIT, exchange).await.ok()??;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let row: Vec<&str> = lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|row| row.first() == Some(&"mailmoat") && row.get(1) == Some(&"mm"))?;
        let field = |name: &str| {
            let i = header.iter().position(|h| *h == name)?;
            row.get(i).map(|v| v.to_string())
        };
        Some(Stat {
            status: field("status")?,
            // "* L7OK": the last result, while the next check is running.
            check_status: field("check_status")?.trim_start_matches("* ").to_string(),
            failed_checks: field("chkfail")?.parse().ok()?,
        })
    }

    /// Waits until the server is UP after a passing SMTP check.
    async fn wait_up(&self) -> Stat {
        let deadline = Instant::now() + WAIT;
        loop {
            let stat = self.server_stat().await;
            if let Some(stat) = &stat {
                if stat.status == "UP" && stat.check_status == "L7OK" {
                    return stat.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy never saw mailmoat UP: {stat:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[derive(Clone, Debug)]
struct Stat {
    status: String,
    check_status: String,
    failed_checks: u64,
}

#[tokio::test]
async fn haproxy_keeps_mailmoat_up_after_header_less_connections_from_its_address() {
    let Some(binary) = haproxy_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is not installed; CI must install it (.ci/run)"
        );
        eprintln!("notice: haproxy not installed; skipping the HAProxy interop test");
        return;
    };
    let sink = sink().await;
    let toml = format!("[server]\ntrusted_proxies = [\"{HAPROXY_SOURCE}/32\"]\n");
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let haproxy = Haproxy::start(&binary, proxy.addr).await;
    haproxy.wait_up().await;

    // A hundred connections from HAProxy's own address that close without
    // a PROXY header (a misconfigured TCP check, a port scan from the
    // balancer's host): ten times the protocol-error trigger.
    for _ in 0..100 {
        drop(connect_from(HAPROXY_SOURCE, proxy.addr).await);
    }
    let malformed = r#"mailmoat_connections_refused_total{reason="proxy_malformed"}"#;
    proxy.wait_metric(malformed, 100.0).await;
    // Several checks more, each a new connection, well past `fall 2`.
    let accepted = "mailmoat_connections_total";
    proxy
        .wait_metric(accepted, proxy.metric(accepted) + 10.0)
        .await;

    let stat = haproxy.server_stat().await.expect("HAProxy stats");
    assert!(
        stat.status == "UP" && stat.check_status == "L7OK" && stat.failed_checks == 0,
        "HAProxy marked mailmoat down: {stat:?}\n{}",
        haproxy.log()
    );
    send_mail(
        Ipv4Addr::new(127, 0, 78, 1),
        haproxy.frontend,
        "a@example.org",
        &["b@example.net"],
        b"Subject: through HAProxy\r\n\r\nhello\r\n",
    )
    .await
    .unwrap_or_else(|e| panic!("no delivery through HAProxy: {e}\n{}", haproxy.log()));
    assert!(
        wait_for(|| sink.delivered() == 1).await,
        "the sink got nothing"
    );
    assert_eq!(
        proxy.metric(r#"mailmoat_connections_refused_total{reason="blocked"}"#),
        0.0
    );
}
