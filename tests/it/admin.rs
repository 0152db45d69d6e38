//! The admin listener: metrics that move with traffic, health and readiness.

use std::net::Ipv4Addr;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[tokio::test]
async fn metrics_are_exposed_and_move_after_one_message() {
    let sink = sink().await;
    let dead = unused_addr();
    let proxy = TestProxy::start("", &[dead, sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let closed = r#"mailmoat_sessions_closed_total{reason="client_quit"}"#;
    let from_client = r#"mailmoat_bytes_total{direction="from_client"}"#;
    let to_client = r#"mailmoat_bytes_total{direction="to_client"}"#;
    let ehlo = r#"mailmoat_smtp_commands_total{verb="ehlo"}"#;
    let errors = format!(r#"mailmoat_upstream_connect_errors_total{{server="{dead}"}}"#);
    let always = [
        "mailmoat_connections_total",
        "mailmoat_active_sessions",
        closed,
        from_client,
        to_client,
        ehlo,
        "mailmoat_session_duration_seconds_count",
    ];

    let (status, before) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for series in always {
        assert_eq!(
            series_value(&before, series),
            Some(0.0),
            "{series} in\n{before}"
        );
    }

    send_mail(
        CLIENT,
        proxy.addr,
        "a@example.org",
        &["b@example.net"],
        b"Subject: m\r\n\r\nhi\r\n",
    )
    .await
    .unwrap();
    proxy.wait_metric(closed, 1.0).await;
    let (_, after) = http_get(admin, "/metrics").await;
    for (series, value) in [
        ("mailmoat_connections_total", 1.0),
        ("mailmoat_active_sessions", 0.0),
        (closed, 1.0),
        (ehlo, 1.0),
        ("mailmoat_session_duration_seconds_count", 1.0),
    ] {
        assert_eq!(
            series_value(&after, series),
            Some(value),
            "{series} in\n{after}"
        );
    }
    // The failover's, and the receiver check's.
    assert!(metric_value(&after, &errors) >= 1.0, "{after}");
    assert!(metric_value(&after, from_client) > 0.0, "{after}");
    assert!(metric_value(&after, to_client) > 0.0, "{after}");
}

#[tokio::test]
async fn healthz_is_ok_and_readyz_follows_the_upstream() {
    let sink = sink().await;
    let live = TestProxy::start("", &[sink.addr()]).await;
    let down = TestProxy::start("", &[unused_addr()]).await;
    assert_eq!(http_get(live.admin.unwrap(), "/healthz").await.0, 200);
    assert_eq!(http_get(down.admin.unwrap(), "/healthz").await.0, 200);
    assert_eq!(http_get(live.admin.unwrap(), "/readyz").await.0, 200);
    assert_eq!(http_get(down.admin.unwrap(), "/readyz").await.0, 503);
}
