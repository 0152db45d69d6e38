//! Admission at the door: caps, the rate bucket, lists, the greet pause,
//! PROXY headers and shadow mode, each refusal with its exact reply and
//! counter; and the per-IP state that must not outlive its clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use mailmoat::config::ProxyProtocol;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clients::*;
use crate::harness::*;

#[tokio::test]
async fn eleventh_connection_from_one_ip_gets_421_while_another_network_gets_in() {
    let sink = sink().await;
    // The default cap of 10 per IP; the rate bucket out of the way.
    let proxy = TestProxy::start("[limits]\nconnection_burst = 1000\n", &[sink.addr()]).await;
    let attacker = Ipv4Addr::new(127, 0, 3, 9);
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(admitted(attacker, proxy.addr).await);
    }

    let reply = refusal(attacker, proxy.addr).await;
    assert!(
        reply.starts_with("421 4.7.0 localhost too many connections from your IP address\r\n"),
        "{reply:?}"
    );
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="ip_cap"}"#
        ),
        1.0
    );

    let _other = admitted(Ipv4Addr::new(127, 0, 4, 1), proxy.addr).await;
    assert_eq!(
        sink.connections(),
        11,
        "the refused client reached the sink"
    );
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="prefix_cap"}"#
        ),
        0.0
    );
    assert_eq!(counted(&proxy, "mailmoat_active_sessions"), 11.0);
}

#[tokio::test]
async fn per_prefix_cap_counts_neighbours_in_one_slash_24_together() {
    let sink = sink().await;
    let toml = "[limits]\nper_prefix_connections = 2\nconnection_burst = 1000\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;
    let _a = admitted(Ipv4Addr::new(127, 0, 5, 1), proxy.addr).await;
    let _b = admitted(Ipv4Addr::new(127, 0, 5, 2), proxy.addr).await;

    for third in [Ipv4Addr::new(127, 0, 5, 3), Ipv4Addr::new(127, 0, 5, 1)] {
        let reply = refusal(third, proxy.addr).await;
        assert!(
            reply.starts_with("421 4.7.0 localhost too many connections from your network\r\n"),
            "{third}: {reply:?}"
        );
    }
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="prefix_cap"}"#
        ),
        2.0
    );
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="ip_cap"}"#
        ),
        0.0
    );
    let _next_network = admitted(Ipv4Addr::new(127, 0, 6, 1), proxy.addr).await;
}

#[tokio::test]
async fn rate_bucket_refuses_the_connection_after_the_burst_and_admits_after_refill() {
    let sink = sink().await;
    // Refusals count toward an automatic ban; only the bucket is under test.
    let toml = "[limits]\nconnection_rate = \"60/min\"\nconnection_burst = 3\n\
                [autoban]\nlimit_violations = 0\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;
    let client = Ipv4Addr::new(127, 0, 3, 10);
    // Each client closes again: only the bucket limits here, not the caps.
    let started = Instant::now();
    for _ in 0..3 {
        drop(admitted(client, proxy.addr).await);
    }
    let reply = refusal(client, proxy.addr).await;
    assert!(
        reply
            .starts_with("421 4.7.0 localhost connection rate limit exceeded, try again later\r\n"),
        "{reply:?}"
    );
    let limited = r#"mailmoat_connections_refused_total{reason="connection_rate"}"#;
    assert_eq!(counted(&proxy, limited), 1.0);

    // One token comes back each second: poll until a client gets in.
    let deadline = Instant::now() + WAIT;
    let mut refusals = 1.0;
    loop {
        let mut raw = Raw::connect(client, proxy.addr).await;
        let reply = raw.reply().await;
        if reply.starts_with("220 ") {
            break;
        }
        assert!(reply.starts_with("421 4.7.0 "), "{reply:?}");
        refusals += 1.0;
        assert!(Instant::now() < deadline, "the bucket never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The fourth token is due a second after the first was taken.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(950),
        "admitted again after only {waited:?}"
    );
    assert_eq!(counted(&proxy, limited), refusals);
}

#[tokio::test]
async fn global_cap_refuses_with_421_and_frees_its_slot_on_close() {
    let sink = sink().await;
    let proxy = TestProxy::start("[server]\nmax_connections = 3\n", &[sink.addr()]).await;
    let mut held = Vec::new();
    for host in 1..=3 {
        held.push(admitted(Ipv4Addr::new(127, 0, 10, host), proxy.addr).await);
    }
    let reply = refusal(Ipv4Addr::new(127, 0, 11, 1), proxy.addr).await;
    assert!(
        reply.starts_with("421 4.7.0 localhost too many connections, try again later\r\n"),
        "{reply:?}"
    );
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="global_cap"}"#
        ),
        1.0
    );

    drop(held.pop());
    wait_exactly(&proxy, "mailmoat_active_sessions", 2.0).await;
    let _in_again = admitted(Ipv4Addr::new(127, 0, 11, 1), proxy.addr).await;
}

/// Issue 9 follow-up: refusals at the global cap counted as limit
/// violations against each refused client, so a busy server banned the
/// ordinary senders that retried.
#[tokio::test]
async fn global_cap_refusals_never_ban_the_refused_client() {
    let sink = sink().await;
    let proxy = TestProxy::start(
        "[server]\nmax_connections = 2\n\
         [limits]\nconnection_rate = \"1/hour\"\nconnection_burst = 1\n\
         [autoban]\nlimit_violations = 3\n",
        &[sink.addr()],
    )
    .await;
    let (busy, sender, control) = (
        Ipv4Addr::new(127, 0, 12, 1),
        Ipv4Addr::new(127, 0, 12, 2),
        Ipv4Addr::new(127, 0, 12, 3),
    );
    let first = admitted(busy, proxy.addr).await;
    let second = admitted(control, proxy.addr).await;
    for _ in 0..5 {
        let reply = refusal(sender, proxy.addr).await;
        assert!(reply.starts_with("421 4.7.0 "), "{reply:?}");
    }
    // A control client over its connection rate three times is banned,
    // so the counting works and its ban has been applied when this waits.
    drop(second);
    wait_exactly(&proxy, "mailmoat_active_sessions", 1.0).await;
    for _ in 0..3 {
        let reply = refusal(control, proxy.addr).await;
        assert!(reply.starts_with("421 4.7.0 "), "{reply:?}");
    }
    proxy.wait_metric("mailmoat_active_bans", 1.0).await;
    assert_eq!(proxy.metric("mailmoat_active_bans"), 1.0);
    drop(first);
    let _in = admitted(sender, proxy.addr).await;
}

#[tokio::test]
async fn allowlisted_ip_passes_the_per_ip_cap() {
    let sink = sink().await;
    let friend = Ipv4Addr::new(127, 0, 6, 6);
    let allow = TempFile::new("allow.txt", "# friends\n127.0.6.6\n");
    let toml = format!(
        "[limits]\nper_ip_connections = 1\nper_prefix_connections = 1\nconnection_burst = 1\n\
         [blocklist]\nfiles = []\nallowlist_files = [{}]\n",
        allow.toml()
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(admitted(friend, proxy.addr).await);
    }

    // The same limits hold for an IP that is not listed.
    let stranger = Ipv4Addr::new(127, 0, 7, 6);
    let _first = admitted(stranger, proxy.addr).await;
    let reply = refusal(stranger, proxy.addr).await;
    assert!(reply.starts_with("421 4.7.0 "), "{reply:?}");
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="ip_cap"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn allowlisted_ip_still_counts_toward_the_global_cap() {
    let sink = sink().await;
    let allow = TempFile::new("allow.txt", "127.0.6.0/24\n");
    let toml = format!(
        "[server]\nmax_connections = 2\n[blocklist]\nfiles = []\nallowlist_files = [{}]\n",
        allow.toml()
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let friend = Ipv4Addr::new(127, 0, 6, 7);
    let _a = admitted(friend, proxy.addr).await;
    let _b = admitted(friend, proxy.addr).await;
    let reply = refusal(friend, proxy.addr).await;
    assert!(reply.starts_with("421 4.7.0 "), "{reply:?}");
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="global_cap"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn blocklisted_ip_gets_554_and_never_reaches_the_receiver() {
    let sink = sink().await;
    let block = TempFile::new("block.txt", "# bad\n127.0.7.0/24 # the whole net\n");
    let toml = format!("[blocklist]\nfiles = [{}]\n", block.toml());
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;

    let reply = refusal(Ipv4Addr::new(127, 0, 7, 7), proxy.addr).await;
    assert_eq!(reply, "554 5.7.1 localhost access denied\r\n");
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="blocked"}"#
        ),
        1.0
    );
    assert_eq!(sink.connections(), 0);

    // Someone unlisted still gets through, and is the sink's only client.
    let _ok = admitted(Ipv4Addr::new(127, 0, 8, 7), proxy.addr).await;
    assert_eq!(sink.connections(), 1);
}

#[tokio::test]
async fn greet_pause_refuses_early_talkers_and_lets_patient_clients_deliver() {
    let sink = sink().await;
    let toml = "[timeouts]\ngreet_pause = \"500ms\"\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;

    let mut early = Raw::connect(Ipv4Addr::new(127, 0, 12, 1), proxy.addr).await;
    early.send(b"EHLO x\r\n").await;
    let said = early.closed().await;
    assert!(
        said.starts_with("220-localhost ESMTP\r\n554 5.5.1 "),
        "{said:?}"
    );
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="early_talker"}"#
        ),
        1.0
    );
    assert_eq!(sink.connections(), 0, "the early talker reached the sink");

    // A patient client: our "220-" line, then the sink's "220 " completes
    // one banner, and mail flows.
    let started = Instant::now();
    let mut patient = Raw::connect(Ipv4Addr::new(127, 0, 12, 2), proxy.addr).await;
    let banner = patient.reply().await;
    assert_eq!(
        banner,
        "220-localhost ESMTP\r\n220 sink.test ESMTP ready\r\n"
    );
    let paused = started.elapsed();
    assert!(paused >= Duration::from_millis(500), "paused {paused:?}");
    deliver(
        &mut patient,
        "a@example.org",
        "b@example.net",
        "Subject: patient\r\n\r\nhi",
    )
    .await;
    assert_eq!(sink.delivered(), 1);
    assert_eq!(sink.connections(), 1);
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="early_talker"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_peer_is_refused() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let spoofed: SocketAddr = "1.2.3.4:1111".parse().unwrap();
    let headers = [
        b"PROXY TCP4 1.2.3.4 127.0.0.1 1111 25\r\n".to_vec(),
        mailmoat::proxy_protocol::encode(ProxyProtocol::V2, spoofed, proxy.addr, None),
    ];
    for (n, header) in headers.iter().enumerate() {
        let mut raw = Raw::connect(Ipv4Addr::new(127, 0, 13, 1), proxy.addr).await;
        raw.send(header).await;
        let said = raw.closed().await;
        assert!(
            said.contains("554 5.7.1 localhost PROXY header not accepted from your address\r\n"),
            "header {n}: {said:?}"
        );
    }
    // Refused at the door when the header came with the connect, or as the
    // session's first command when it came a moment later (the door looks
    // without waiting): counted once either way.
    let at_door = counted(
        &proxy,
        r#"mailmoat_connections_refused_total{reason="proxy_untrusted"}"#,
    );
    let in_session = counted(&proxy, "mailmoat_protocol_errors_total");
    assert_eq!(at_door + in_session, 2.0);
    assert_eq!(sink.delivered(), 0);
}

#[tokio::test]
async fn trusted_proxy_header_makes_the_inner_address_subject_to_the_per_ip_cap() {
    let sink = sink().await;
    let toml = "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
                [limits]\nper_ip_connections = 1\nconnection_burst = 1000\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;
    let inner: SocketAddr = "127.0.9.9:1111".parse().unwrap();

    let mut first = proxied(ProxyProtocol::V1, inner, proxy.addr).await;
    first.expect("220 ").await;
    // Same TCP source, same inner client: over its cap.
    let mut second = proxied(ProxyProtocol::V2, inner, proxy.addr).await;
    let said = second.closed().await;
    assert!(
        said.starts_with("421 4.7.0 localhost too many connections from your IP address\r\n"),
        "{said:?}"
    );
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="ip_cap"}"#
        ),
        1.0
    );
    // Same TCP source, another inner client: in, with either version.
    for (version, other) in [
        (ProxyProtocol::V2, "127.0.9.10:2222"),
        (ProxyProtocol::V1, "127.0.9.11:3333"),
    ] {
        let mut raw = proxied(version, other.parse().unwrap(), proxy.addr).await;
        raw.expect("220 ").await;
    }
}

#[tokio::test]
async fn trusted_peer_sending_garbage_instead_of_a_proxy_header_is_refused() {
    let sink = sink().await;
    let toml = "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;
    let mut raw = Raw::connect(Ipv4Addr::LOCALHOST, proxy.addr).await;
    raw.send(b"EHLO garbage.example\r\n").await;
    let said = raw.closed().await;
    assert_eq!(said, "421 4.7.0 localhost malformed PROXY header\r\n");
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="proxy_malformed"}"#
        ),
        1.0
    );
    assert_eq!(sink.connections(), 0);
}

#[tokio::test]
async fn shadow_mode_refuses_nothing_but_counts_what_it_would_refuse() {
    let sink = sink().await;
    let toml = "[server]\nshadow = true\n[limits]\nper_ip_connections = 1\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;
    let client = Ipv4Addr::new(127, 0, 14, 1);
    let _first = admitted(client, proxy.addr).await;
    let _second = admitted(client, proxy.addr).await;
    assert_eq!(
        counted(&proxy, r#"mailmoat_shadow_refusals_total{reason="ip_cap"}"#),
        1.0
    );
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_connections_refused_total{reason="ip_cap"}"#
        ),
        0.0
    );
    assert_eq!(counted(&proxy, "mailmoat_active_sessions"), 2.0);
}

#[tokio::test]
async fn tracked_ips_return_to_zero_after_a_thousand_sources_leave() {
    const SOURCES: u32 = 1000;
    const AT_ONCE: usize = 100;
    let sink = sink().await;
    let toml = "[server]\nstate_sweep = \"200ms\"\n[limits]\nconnection_rate = \"100/s\"\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;

    // 127.1.x.y, spread over 250 networks so no prefix cap is near.
    let source = |i: u32| Ipv4Addr::new(127, 1, (i % 250) as u8, (i / 250 + 1) as u8);
    let addr = proxy.addr;
    let mut clients = JoinSet::new();
    let mut admitted_count = 0;
    for i in 0..SOURCES {
        if clients.len() == AT_ONCE {
            clients.join_next().await.expect("a client").expect("joins");
            admitted_count += 1;
        }
        clients.spawn(async move { drop(admitted(source(i), addr).await) });
    }
    while let Some(done) = clients.join_next().await {
        done.expect("joins");
        admitted_count += 1;
    }
    assert_eq!(admitted_count, SOURCES);

    wait_exactly(&proxy, "mailmoat_active_sessions", 0.0).await;
    // Every source was tracked once and is evicted once its bucket is full
    // again. The gauges are set by the sweep, so they are read after the
    // sweep that evicted the last source, not before it (a stale zero).
    wait_exactly(
        &proxy,
        "mailmoat_tracked_evictions_total",
        f64::from(SOURCES),
    )
    .await;
    assert_eq!(counted(&proxy, "mailmoat_tracked_ips"), 0.0);
    wait_exactly(&proxy, "mailmoat_tracked_prefixes", 0.0).await;
    assert_eq!(counted(&proxy, "mailmoat_rate_untracked_total"), 0.0);
}

#[tokio::test]
async fn caps_are_released_after_idle_timeouts_and_client_resets() {
    let sink = sink().await;
    let toml = "[limits]\nper_ip_connections = 2\n[timeouts]\nidle = \"1s\"\n";
    let proxy = TestProxy::start(toml, &[sink.addr()]).await;
    let client = Ipv4Addr::new(127, 0, 15, 1);
    let mut idler = admitted(client, proxy.addr).await;
    let resetter = admitted_socket(client, proxy.addr).await;
    let reply = refusal(client, proxy.addr).await;
    assert!(reply.starts_with("421 4.7.0 "), "{reply:?}");

    resetter.set_zero_linger().unwrap();
    drop(resetter);
    idler.expect("421 4.4.2 ").await;
    assert_eq!(idler.closed().await, "");
    proxy
        .wait_metric(
            r#"mailmoat_sessions_closed_total{reason="client_closed"}"#,
            1.0,
        )
        .await;
    proxy
        .wait_metric(
            r#"mailmoat_sessions_closed_total{reason="idle_timeout"}"#,
            1.0,
        )
        .await;
    wait_exactly(&proxy, "mailmoat_active_sessions", 0.0).await;

    // Both slots are free again.
    let _a = admitted(client, proxy.addr).await;
    let _b = admitted(client, proxy.addr).await;
    assert_eq!(counted(&proxy, "mailmoat_active_sessions"), 2.0);
}
