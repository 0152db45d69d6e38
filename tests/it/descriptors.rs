//! Descriptors: the start warns when `server.max_connections` cannot fit
//! under the open-file limit, and SMTP clients filling that limit cannot
//! take the descriptors `/metrics` needs.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::harness::*;

/// The soft and hard open-file limit the proxy runs under.
const OPEN_FILES: u64 = 256;
/// Two descriptors per session; the reserve and the session workers' own
/// descriptors (their reactors, their copies of the one SMTP listener) are
/// kept out of the budget.
fn sessions_in_budget() -> f64 {
    use mailmoat::descriptors::{Budget, PER_SESSION};
    let workers = mailmoat::workers::descriptors_held(mailmoat::workers::per_core_count(), 1);
    (Budget::under(OPEN_FILES - workers).size() / PER_SESSION as usize) as f64
}

/// GET `path` with a deadline; `None` when nothing answers in time.
async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        Some((status, text))
    };
    timeout(Duration::from_secs(3), exchange).await.ok()?
}

#[tokio::test]
async fn metrics_answer_while_smtp_clients_fill_the_open_file_limit() {
    let sink = sink().await;
    let (smtp, admin) = (unused_addr(), unused_addr());
    let dir = TempDir::new("descriptors");
    // The greet pause holds each client's descriptor with no upstream yet.
    let config = dir.write(
        "mailmoat.toml",
        &format!(
            "[server]\nlisten = [\"{smtp}\"]\nmax_connections = 1000\n\
             [limits]\nper_ip_connections = 1000\nper_prefix_connections = 1000\n\
             connection_burst = 1000\n\
             [timeouts]\ngreet_pause = \"30s\"\n\
             [upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"{admin}\"\n",
            sink.addr()
        ),
    );
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _proxy = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -n {OPEN_FILES} && exec \"$0\" run -c \"$1\""
        ))
        .arg(env!("CARGO_BIN_EXE_mailmoat"))
        .arg(&config)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .kill_on_drop(true)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mailmoat under ulimit");

    let client = Ipv4Addr::new(127, 0, 0, 2);
    let mut clients = vec![Raw::connect_when_ready(client, smtp).await];
    for _ in 0..(OPEN_FILES + 50) {
        clients.push(Raw::connect(client, smtp).await);
    }

    let accepted = "mailmoat_connections_total";
    let last = scrape_until(admin, |m| metric_value(m, accepted) >= sessions_in_budget()).await;
    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    let Some((status, metrics)) = last else {
        panic!("/metrics never answered while the SMTP side was full; log:\n{logs}")
    };
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(&metrics, accepted),
        sessions_in_budget(),
        "{metrics}"
    );
    assert!(
        logs.contains("server.max_connections") && logs.contains(&OPEN_FILES.to_string()),
        "no open-file warning in:\n{logs}"
    );

    // Closing sessions gives their slots to the clients waiting.
    drop(clients.drain(..10));
    let more = sessions_in_budget() + 10.0;
    let last = scrape_until(admin, |m| metric_value(m, accepted) >= more).await;
    let now = last.map_or(0.0, |(_, m)| metric_value(&m, accepted));
    assert_eq!(now, more, "clients accepted after 10 sessions closed");
}

/// Scrapes `/metrics` until `done` holds of it or `WAIT` passes; returns
/// the last answer.
async fn scrape_until(admin: SocketAddr, done: impl Fn(&str) -> bool) -> Option<(u16, String)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        last = try_get(admin, "/metrics").await.or(last);
        if last.as_ref().is_some_and(|(_, m)| done(m)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}
