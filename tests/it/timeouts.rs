//! Session timeouts: idle clients and slowloris trickles are cut off.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::time::Instant;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[tokio::test]
async fn idle_client_is_closed_at_the_idle_timeout() {
    let sink = sink().await;
    let proxy = TestProxy::start("[timeouts]\nidle = \"1s\"\n", &[sink.addr()]).await;
    let started = Instant::now();
    let mut raw = Raw::connect(CLIENT, proxy.addr).await;
    raw.expect("220 ").await;
    raw.expect("421 4.4.2 ").await;
    assert_eq!(raw.closed().await, "");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1),
        "closed after {elapsed:?}"
    );
    let idle = r#"mailmoat_sessions_closed_total{reason="idle_timeout"}"#;
    proxy.wait_metric(idle, 1.0).await;
    assert_eq!(proxy.metric(idle), 1.0);
}

#[tokio::test]
async fn trickled_line_is_closed_at_the_line_timeout_though_bytes_keep_coming() {
    let sink = sink().await;
    let toml = "[timeouts]\nidle = \"10s\"\ncommand_line = \"1s\"\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;
    let mut raw = Raw::connect(CLIENT, proxy.addr).await;
    raw.expect("220 ").await;

    // One byte every 300 ms: never idle, never a whole line. At most 20
    // bytes (6 s); the line timeout is due after about 4.
    let started = Instant::now();
    let mut reply = None;
    for byte in b"NOOP NOOP NOOP NOOP ".iter() {
        raw.send(&[*byte]).await;
        reply = raw.reply_within(Duration::from_millis(300)).await;
        if reply.is_some() {
            break;
        }
    }
    let elapsed = started.elapsed();
    let reply = reply.expect("closed before the trickle ended");
    assert!(reply.starts_with("421 4.4.2 "), "{reply:?}");
    assert!(
        elapsed >= Duration::from_secs(1),
        "closed after {elapsed:?}"
    );
    assert_eq!(raw.closed().await, "");
    let line = r#"mailmoat_sessions_closed_total{reason="line_timeout"}"#;
    proxy.wait_metric(line, 1.0).await;
    assert_eq!(proxy.metric(line), 1.0);
}
