//! The door of a session and PROXY headers: an untrusted header is refused
//! before a receiver connection is spent on it, and a trusted load
//! balancer's own address is never banned or refused, whatever its
//! connections do, so its health checks keep it routing to us.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mailmoat::admission::Admission;
use mailmoat::bans::Bans;
use mailmoat::blocklist::sources::{SourceMetrics, Sources};
use mailmoat::blocklist::Blocklist;
use mailmoat::config::{Config, ListenerSettings, ProxyProtocol};
use mailmoat::metrics::Metrics;
use mailmoat::proxy_protocol;
use mailmoat::session::registry::Registry;
use mailmoat::session::{self, CloseReason, Shared};
use mailmoat::shaping::Shaping;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use crate::harness::*;

const BLOCKED: &str = "554 5.7.1 localhost access denied\r\n";
const UNTRUSTED: &str = "554 5.7.1 localhost PROXY header not accepted from your address\r\n";
const AUTOBAN_ENTRIES: &str = r#"mailmoat_blocklist_entries{source="autoban"}"#;
/// The load balancer in front, by the address it connects from.
const BALANCER: Ipv4Addr = Ipv4Addr::new(127, 0, 30, 1);

/// What `Server::run` shares with sessions, wired the same way.
fn shared(config: &Config) -> Shared {
    let metrics = Arc::new(Metrics::new());
    let lists = Arc::new(Blocklist::default());
    let sources = Arc::new(Sources::new(
        lists.clone(),
        SourceMetrics::register(metrics.registry()),
        Box::new(|_| {}),
    ));
    let bans = Arc::new(Bans::new(
        config.autoban.clone(),
        config.server.shadow,
        config.server.max_tracked_ips,
        sources,
        metrics.clone(),
    ));
    Shared {
        shaping: Arc::new(Shaping::new(config, bans, metrics.clone())),
        admission: Arc::new(Admission::new(config, lists.clone(), metrics.clone())),
        blocklist: lists,
        tarpit_slots: Arc::new(tokio::sync::Semaphore::new(1)),
        registry: Arc::new(Registry::default()),
        tls: None,
        metrics,
        upstreams: Arc::new(mailmoat::upstream::Connector::new(config).unwrap()),
    }
}

#[tokio::test]
async fn untrusted_proxy_header_is_refused_at_the_door_before_any_receiver_connection() {
    let sink = sink().await;
    let spoofed: SocketAddr = "192.0.2.66:4000".parse().unwrap();
    let local: SocketAddr = "127.0.0.1:25".parse().unwrap();
    let v2 = proxy_protocol::encode(ProxyProtocol::V2, spoofed, local, None);
    let headers = [
        proxy_protocol::encode(ProxyProtocol::V1, spoofed, local, None),
        v2.clone(),
        // Only the first segment of a v2 signature has arrived.
        v2[..2].to_vec(),
    ];
    for pause in ["0s", "1s"] {
        let toml = format!("[timeouts]\ngreet_pause = \"{pause}\"\n");
        let config = Arc::new(config(&toml, &[sink.addr()]));
        let shared = shared(&config);
        for (n, header) in headers.iter().enumerate() {
            // Already sent when the connection is accepted, as a bot does.
            let (ours, mut theirs) = tokio::io::duplex(4096);
            theirs.write_all(header).await.unwrap();
            let remote: SocketAddr = "127.0.20.1:4000".parse().unwrap();
            let listener = ListenerSettings::passthrough(local);
            let serve = session::serve(ours, remote, local, &listener, config.clone(), &shared);
            let reason = timeout(WAIT, serve).await.expect("session ends");
            let mut said = Vec::new();
            theirs.read_to_end(&mut said).await.unwrap();
            let said = String::from_utf8_lossy(&said);
            assert!(
                said.ends_with(UNTRUSTED),
                "pause {pause}, header {n}: {said:?}"
            );
            assert_eq!(
                reason,
                CloseReason::ProtocolError,
                "pause {pause}, header {n}"
            );
        }
        let refused = r#"mailmoat_connections_refused_total{reason="proxy_untrusted"}"#;
        assert_eq!(metric_value(&shared.metrics.render(), refused), 3.0);
    }
    assert_eq!(sink.connections(), 0, "a receiver connection was spent");
}

/// A proxy trusting only [`BALANCER`], with room for the many connections
/// a test makes from one address.
async fn behind_balancer(sink: &mailmoat::sink::Sink, extra: &str) -> TestProxy {
    let toml = format!(
        "[server]\ntrusted_proxies = [\"{BALANCER}/32\"]\n\
         [limits]\nconnection_burst = 1000\n{extra}"
    );
    TestProxy::start(&toml, &[sink.addr()]).await
}

/// The balancer's own health check: a `LOCAL` (v2) or `UNKNOWN` (v1)
/// header, then what HAProxy's `option smtpchk` says.
async fn health_check(version: ProxyProtocol, addr: SocketAddr) {
    let mut raw = Raw::connect(BALANCER, addr).await;
    raw.send(&proxy_protocol::health_check(version)).await;
    raw.expect("220 ").await;
    raw.send(b"HELO localhost\r\n").await;
    raw.expect("250 ").await;
    raw.send(b"QUIT\r\n").await;
    raw.expect("221 ").await;
}

#[tokio::test]
async fn trusted_proxy_own_address_is_never_banned() {
    let sink = sink().await;
    let proxy = behind_balancer(&sink, "").await;
    let malformed = r#"mailmoat_connections_refused_total{reason="proxy_malformed"}"#;
    // Twice the trigger of connect-and-close without a header (a TCP
    // check), and a few that send garbage instead.
    for _ in 0..20 {
        drop(connect_from(BALANCER, proxy.addr).await);
    }
    proxy.wait_metric(malformed, 20.0).await;
    for _ in 0..3 {
        let mut raw = Raw::connect(BALANCER, proxy.addr).await;
        raw.send(b"EHLO garbage.example\r\n").await;
        raw.closed().await;
    }
    proxy.wait_metric(malformed, 23.0).await;
    // Protocol errors inside the balancer's own sessions feed no ban either.
    let long = format!("NOOP {}\r\n", "x".repeat(3000));
    let mut raw = Raw::connect(BALANCER, proxy.addr).await;
    raw.send(&proxy_protocol::health_check(ProxyProtocol::V2))
        .await;
    raw.expect("220 ").await;
    for _ in 0..12 {
        raw.send(long.as_bytes()).await;
        raw.expect("500 5.5.2 ").await;
    }
    drop(raw);
    // A client reaching the trigger is banned: once its ban is in force,
    // any ban of the balancer recorded before would be too.
    let control = Ipv4Addr::new(127, 0, 31, 1);
    for _ in 0..10 {
        let mut raw = Raw::connect(control, proxy.addr).await;
        raw.send(b"PROXY TCP4 192.0.2.1 127.0.0.1 1111 25\r\n")
            .await;
        raw.closed().await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while Raw::connect(control, proxy.addr).await.reply().await != BLOCKED {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control was never banned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(proxy.metric(AUTOBAN_ENTRIES), 1.0);
    health_check(ProxyProtocol::V2, proxy.addr).await;
    health_check(ProxyProtocol::V1, proxy.addr).await;
    let mut client = proxied_from_balancer("127.0.32.1:4000", proxy.addr).await;
    client.expect("220 ").await;
}

/// A client behind the balancer, named by its PROXY header.
async fn proxied_from_balancer(client: &str, addr: SocketAddr) -> Raw {
    let mut raw = Raw::connect(BALANCER, addr).await;
    let header = proxy_protocol::encode(ProxyProtocol::V2, client.parse().unwrap(), addr, None);
    raw.send(&header).await;
    raw
}

#[tokio::test]
async fn trusted_proxy_health_check_passes_while_its_address_is_blocklisted() {
    let sink = sink().await;
    let dir = TempDir::new("door-lists");
    let list = dir.write("blocked.txt", &format!("{BALANCER}\n127.0.32.9\n"));
    let extra = format!("[blocklist]\nfiles = [{:?}]\n", list.display().to_string());
    let proxy = behind_balancer(&sink, &extra).await;
    // The lists are for the clients the balancer names...
    let mut blocked = proxied_from_balancer("127.0.32.9:4000", proxy.addr).await;
    assert_eq!(blocked.closed().await, BLOCKED);
    let mut fine = proxied_from_balancer("127.0.32.10:4000", proxy.addr).await;
    fine.expect("220 ").await;
    // ...not for the balancer, which must go on seeing the service up.
    health_check(ProxyProtocol::V2, proxy.addr).await;
    health_check(ProxyProtocol::V1, proxy.addr).await;
}

#[tokio::test]
async fn trusted_proxy_health_check_skips_the_greet_pause() {
    let sink = sink().await;
    let proxy = behind_balancer(&sink, "[timeouts]\ngreet_pause = \"5s\"\n").await;
    let mut raw = Raw::connect(BALANCER, proxy.addr).await;
    raw.send(&proxy_protocol::health_check(ProxyProtocol::V2))
        .await;
    // A checker reading the first line would take `220-` for a failure.
    let first = raw.reply_within(Duration::from_secs(3)).await;
    assert!(
        first.as_deref().is_some_and(|r| r.starts_with("220 ")),
        "{first:?}"
    );
    // A client behind the balancer still sits through the pause.
    let mut client = proxied_from_balancer("127.0.32.2:4000", proxy.addr).await;
    assert_eq!(
        client.reply_within(Duration::from_millis(500)).await,
        None,
        "the pause was skipped for a client"
    );
}
