//! What /metrics says, read as a scraper reads it: names that mean what
//! they say, and counts that add up.

use std::net::Ipv4Addr;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 21, 1);

#[tokio::test]
async fn metrics_show_the_build_and_the_process() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let (status, text) = http_get(proxy.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let build = format!(
        "mailmoat_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(series_value(&text, &build), Some(1.0), "{text}");
    for series in [
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    ] {
        assert!(metric_value(&text, series) > 0.0, "{series} in\n{text}");
    }
    assert!(series_value(&text, "process_cpu_seconds_total").is_some());
}

/// Every accepted connection is counted once at the socket and ends once,
/// either refused at the door or as a session: a refusal is not also a
/// closed session, so accepted = refused + closed adds up.
#[tokio::test]
async fn refused_connections_are_not_counted_as_closed_sessions() {
    let sink = sink().await;
    let proxy = TestProxy::start("[limits]\nper_ip_connections = 1\n", &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let mut first = session(CLIENT, proxy.addr).await;
    let mut second = Raw::connect(CLIENT, proxy.addr).await;
    assert!(second.closed().await.starts_with("421 4.7.0 "));
    first.send(b"QUIT\r\n").await;
    first.expect("221").await;
    proxy
        .wait_metric(
            r#"mailmoat_sessions_closed_total{reason="client_quit"}"#,
            1.0,
        )
        .await;

    let (_, text) = http_get(admin, "/metrics").await;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(series_value(&text, "mailmoat_connections_total"), Some(2.0));
    assert_eq!(
        series_value(
            &text,
            r#"mailmoat_connections_refused_total{reason="ip_cap"}"#
        ),
        Some(1.0)
    );
    assert_eq!(sum("mailmoat_connections_refused_total"), 1.0, "{text}");
    assert_eq!(sum("mailmoat_sessions_closed_total"), 1.0, "{text}");
    assert_eq!(
        series_value(&text, "mailmoat_session_duration_seconds_count"),
        Some(1.0)
    );
}
