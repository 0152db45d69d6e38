//! The admin listener is bounded: slow or idle clients cannot keep a
//! scrape out or hold descriptors, requests carry no body, and a ban
//! mutation checks the token before its parameters.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::harness::*;

/// What `mailmoat::admin::HEADER_TIMEOUT` allows, plus slack.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// True when the server closes `stream` within `limit` (whatever it sends
/// first).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn slow_client(admin: SocketAddr) -> TcpStream {
    let mut stream = timeout(WAIT, TcpStream::connect(admin))
        .await
        .expect("connect in time")
        .expect("connect");
    // A request head that never ends.
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn slow_admin_clients_are_closed_and_do_not_keep_a_scrape_out() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let mut slow = Vec::new();
    for _ in 0..100 {
        slow.push(slow_client(admin).await);
    }

    // Well before any header timeout.
    let started = Instant::now();
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("mailmoat_active_sessions"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "scrape took {:?}",
        started.elapsed()
    );

    // The oldest made room for the newer ones at once...
    for (i, stream) in slow.iter_mut().take(50).enumerate() {
        assert!(
            closed_within(stream, Duration::from_secs(1)).await,
            "slow connection {i} still open"
        );
    }
    // ...and no request head may take longer than the header timeout.
    for (i, stream) in slow.iter_mut().enumerate().skip(50) {
        assert!(
            closed_within(stream, HEADER_TIMEOUT + Duration::from_secs(2)).await,
            "slow connection {i} outlived the header timeout"
        );
    }
}

#[tokio::test]
async fn ban_mutation_without_a_token_is_401_before_its_parameters_are_read() {
    let sink = sink().await;
    let dir = TempDir::new("auth-first");
    let token_file = dir.write("token", "s3cret\n");
    let toml = format!(
        "[admin]\ntoken_file = {:?}\n",
        token_file.display().to_string()
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();

    for method in ["POST", "DELETE"] {
        for path in [
            "/admin/bans",
            "/admin/bans?ttl=x",
            "/admin/bans?ip=nonsense",
        ] {
            assert_eq!(
                http(admin, method, path, None).await.0,
                401,
                "{method} {path}"
            );
            assert_eq!(
                http(admin, method, path, Some("wrong")).await.0,
                401,
                "{method} {path}"
            );
        }
        // The token holder gets told what is wrong.
        let (status, body) = http(admin, method, "/admin/bans", Some("s3cret")).await;
        assert_eq!(status, 400, "{method}: {body}");
        assert!(body.contains("ip"), "{method}: {body}");
    }
}

#[tokio::test]
async fn admin_requests_with_a_body_are_refused() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(
            b"POST /admin/bans?ip=192.0.2.1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = timeout(WAIT, stream.read(&mut head))
        .await
        .expect("answer in time")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
}
