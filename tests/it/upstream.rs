//! Reaching the receiver: PROXY headers, failover, and a prompt 421 when
//! no receiver answers.

use std::net::Ipv4Addr;
use std::time::Duration;

use mailmoat::sink::SinkOptions;
use tokio::time::Instant;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The client address the receiver learns from a PROXY header of `version`.
async fn client_seen_through_proxy_protocol(version: &str) -> std::net::IpAddr {
    let sink = sink_with(SinkOptions {
        proxy_protocol: true,
        ..SinkOptions::default()
    })
    .await;
    let toml = format!("[upstream]\nproxy_protocol = \"{version}\"\n");
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    send_mail(
        CLIENT,
        proxy.addr,
        "a@example.org",
        &["b@example.net"],
        b"Subject: pp\r\n\r\nhi\r\n",
    )
    .await
    .unwrap();
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    messages[0].client.ip()
}

#[tokio::test]
async fn proxy_protocol_v2_tells_the_receiver_the_real_client() {
    assert_eq!(client_seen_through_proxy_protocol("v2").await, CLIENT);
}

#[tokio::test]
async fn proxy_protocol_v1_tells_the_receiver_the_real_client() {
    assert_eq!(client_seen_through_proxy_protocol("v1").await, CLIENT);
}

#[tokio::test]
async fn upstream_down_gives_421_promptly_and_closes() {
    let connect_timeout = Duration::from_secs(5);
    let proxy = TestProxy::start("[upstream]\nconnect_timeout = \"5s\"\n", &[unused_addr()]).await;
    let started = Instant::now();
    let mut raw = Raw::connect(CLIENT, proxy.addr).await;
    raw.expect("421 4.3.2 ").await;
    assert_eq!(raw.closed().await, "");
    let elapsed = started.elapsed();
    assert!(elapsed < connect_timeout / 2, "refusal took {elapsed:?}");
    proxy
        .wait_metric(
            r#"mailmoat_sessions_closed_total{reason="upstream_error"}"#,
            1.0,
        )
        .await;
}

#[tokio::test]
async fn second_upstream_is_used_when_the_first_is_down() {
    let sink = sink().await;
    let dead = unused_addr();
    let proxy = TestProxy::start("", &[dead, sink.addr()]).await;
    send_mail(
        CLIENT,
        proxy.addr,
        "a@example.org",
        &["b@example.net"],
        b"Subject: f\r\n\r\nhi\r\n",
    )
    .await
    .unwrap();
    assert_eq!(sink.delivered(), 1);
    // The receiver check counts its own failures there too.
    let errors = format!(r#"mailmoat_upstream_connect_errors_total{{server="{dead}"}}"#);
    assert!(proxy.metric(&errors) >= 1.0);
}
