//! Automatic and manual bans: AUTH failures and early talking ban the
//! client, a ban survives a restart and expires after its TTL, and
//! operators add, lift and export bans through `/admin/bans`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use mailmoat::sink::SinkOptions;
use tokio::time::{timeout, Instant};

use crate::harness::*;

const BLOCKED: &str = "554 5.7.1 localhost access denied\r\n";
const AUTH_FAILED: &str = "535 5.7.8 Authentication credentials invalid\r\n";
const AUTOBAN_ENTRIES: &str = r#"mailmoat_blocklist_entries{source="autoban"}"#;

/// `[autoban]` with only the `triggers` given on (and `extra` keys), and
/// room for the many connections a test makes from one IP while it polls.
fn autoban_toml(triggers: &[(&str, u32)], extra: &str) -> String {
    let mut toml = String::from("[limits]\nconnection_burst = 1000\n[autoban]\n");
    for trigger in [
        "early_talker",
        "auth_failures",
        "limit_violations",
        "protocol_errors",
    ] {
        let n = triggers
            .iter()
            .find_map(|&(t, n)| (t == trigger).then_some(n))
            .unwrap_or(0);
        toml.push_str(&format!("{trigger} = {n}\n"));
    }
    toml.push_str(extra);
    toml.push('\n');
    toml
}

/// A path as a TOML string.
fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// The first thing a new connection from `ip` is told.
async fn door(addr: SocketAddr, ip: Ipv4Addr) -> String {
    Raw::connect(ip, addr).await.reply().await
}

/// Polls the door until a new connection from `ip` is told `prefix`.
async fn wait_door(addr: SocketAddr, ip: Ipv4Addr, prefix: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = door(addr, ip).await;
        if reply.starts_with(prefix) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ip} was never told {prefix:?}; last reply {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn auth_plain(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    format!("AUTH PLAIN {token}\r\n")
}

async fn auth_sink() -> mailmoat::sink::Sink {
    sink_with(SinkOptions {
        auth: Some(("user".into(), "secret".into())),
        ..SinkOptions::default()
    })
    .await
}

/// Fails AUTH `n` times in one session, each answered 535 by the receiver.
async fn fail_auth(raw: &mut Raw, n: usize) {
    for _ in 0..n {
        raw.send(auth_plain("user", "wrong").as_bytes()).await;
        assert_eq!(raw.reply().await, AUTH_FAILED);
    }
}

#[tokio::test]
async fn five_535_replies_ban_the_ip_and_the_ban_survives_a_restart() {
    let sink = auth_sink().await;
    let dir = TempDir::new("auth-ban");
    let state = dir.path().join("bans.txt");
    let toml = autoban_toml(
        &[("auth_failures", 5)],
        &format!("ttl = \"1h\"\nstate = {}", quoted(&state)),
    );
    let mut proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let attacker = Ipv4Addr::new(127, 0, 77, 7);

    let mut raw = session(attacker, proxy.addr).await;
    // A good login is not a failure.
    raw.send(auth_plain("user", "secret").as_bytes()).await;
    raw.expect("235 ").await;
    fail_auth(&mut raw, 4).await;
    let (_, export) = http_get(admin, "/admin/bans").await;
    assert!(
        !export.contains("127.0.77.7"),
        "banned too early:\n{export}"
    );

    fail_auth(&mut raw, 1).await;
    let (_, export) = http_get(admin, "/admin/bans").await;
    assert!(
        export
            .lines()
            .any(|l| l.starts_with("127.0.77.7/32 ") && l.contains("reason=auth_failures")),
        "{export}"
    );
    // The ban closes the open session too (kill_on_block) …
    let said = raw.closed().await;
    assert!(said.starts_with("421 4.7.1 "), "{said:?}");
    // … and refuses the next connection.
    wait_door(proxy.addr, attacker, BLOCKED).await;
    assert_eq!(proxy.metric("mailmoat_auth_failures_total"), 5.0);
    assert_eq!(proxy.metric("mailmoat_active_bans"), 1.0);
    assert_eq!(sink.auth_failures(), 5);
    // Someone else still gets in.
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 77, 8)).await,
        "220 sink.test ESMTP ready\r\n"
    );

    assert!(
        wait_for(|| std::fs::read_to_string(&state).is_ok_and(|s| s.contains("127.0.77.7/32")))
            .await,
        "the ban was never written to autoban.state"
    );
    timeout(WAIT, proxy.begin_shutdown())
        .await
        .expect("proxy stops in time")
        .unwrap();

    // A new process from the same config: refused from its first connection.
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    assert_eq!(door(proxy.addr, attacker).await, BLOCKED);
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 77, 8)).await,
        "220 sink.test ESMTP ready\r\n"
    );
    let (_, export) = http_get(proxy.admin.unwrap(), "/admin/bans").await;
    assert!(export.contains("127.0.77.7/32 "), "{export}");
}

#[tokio::test]
async fn auth_ban_expires_after_its_ttl() {
    let sink = auth_sink().await;
    let ttl = Duration::from_secs(2);
    let proxy = TestProxy::start(
        &autoban_toml(&[("auth_failures", 5)], "ttl = \"2s\""),
        &[sink.addr()],
    )
    .await;
    let attacker = Ipv4Addr::new(127, 0, 78, 8);
    let mut raw = session(attacker, proxy.addr).await;
    fail_auth(&mut raw, 5).await;
    let banned_at = Instant::now();
    wait_door(proxy.addr, attacker, BLOCKED).await;

    wait_door(proxy.addr, attacker, "220 ").await;
    let lasted = banned_at.elapsed();
    assert!(lasted >= ttl, "a {ttl:?} ban lasted only {lasted:?}");
    let (_, export) = http_get(proxy.admin.unwrap(), "/admin/bans").await;
    assert!(!export.contains("127.0.78.8"), "{export}");
    assert_eq!(proxy.metric("mailmoat_active_bans"), 0.0);
}

#[tokio::test]
async fn early_talker_is_banned_and_even_its_patient_next_connection_gets_554() {
    let sink = sink().await;
    let toml = format!(
        "[timeouts]\ngreet_pause = \"300ms\"\n{}",
        autoban_toml(&[("early_talker", 1)], "")
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let talker = Ipv4Addr::new(127, 0, 88, 8);

    let mut early = Raw::connect(talker, proxy.addr).await;
    early.send(b"EHLO x\r\n").await;
    let said = early.closed().await;
    assert!(said.contains("554 5.5.1 "), "{said:?}");
    proxy.wait_metric(AUTOBAN_ENTRIES, 1.0).await;

    // Patient this time: it says nothing and waits.
    let mut patient = Raw::connect(talker, proxy.addr).await;
    assert_eq!(patient.reply().await, BLOCKED);
    assert_eq!(patient.closed().await, "");
    assert_eq!(
        sink.connections(),
        0,
        "the early talker reached the receiver"
    );
    assert_eq!(
        proxy.metric(r#"mailmoat_connections_refused_total{reason="blocked"}"#),
        1.0
    );
    let (_, export) = http_get(proxy.admin.unwrap(), "/admin/bans").await;
    assert!(
        export
            .lines()
            .any(|l| l.starts_with("127.0.88.8/32 ") && l.contains("reason=early_talker")),
        "{export}"
    );
}

#[tokio::test]
async fn admin_ban_needs_the_token_blocks_exports_and_lifts() {
    let sink = sink().await;
    let dir = TempDir::new("admin-bans");
    let token_file = dir.write("token", "s3cret\n");
    let toml = format!(
        "{}[admin]\ntoken_file = {}\n",
        autoban_toml(&[], ""),
        quoted(&token_file)
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let target = Ipv4Addr::new(127, 0, 44, 4);
    let ban = "/admin/bans?ip=127.0.44.4";

    assert_eq!(http(admin, "POST", ban, None).await.0, 401);
    assert_eq!(http(admin, "POST", ban, Some("wrong")).await.0, 401);
    assert_eq!(http(admin, "POST", ban, Some("S3CRET")).await.0, 401);
    assert!(!http_get(admin, "/admin/bans")
        .await
        .1
        .contains("127.0.44.4"));
    assert_eq!(
        door(proxy.addr, target).await,
        "220 sink.test ESMTP ready\r\n"
    );

    let (status, body) = http(admin, "POST", ban, Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    wait_door(proxy.addr, target, BLOCKED).await;
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 44, 5)).await,
        "220 sink.test ESMTP ready\r\n"
    );

    let (status, export) = http_get(admin, "/admin/bans").await;
    assert_eq!(status, 200);
    assert!(
        export
            .lines()
            .any(|l| l.starts_with("127.0.44.4/32 ") && l.contains("reason=manual")),
        "{export}"
    );
    // The export is a blocklist file as it stands.
    let exported = dir.write("exported.txt", &export);
    let other = TestProxy::start(
        &format!("[blocklist]\nfiles = [{}]\n", quoted(&exported)),
        &[sink.addr()],
    )
    .await;
    assert_eq!(door(other.addr, target).await, BLOCKED);

    assert_eq!(http(admin, "DELETE", ban, None).await.0, 401);
    assert_eq!(door(proxy.addr, target).await, BLOCKED);
    let (status, body) = http(admin, "DELETE", ban, Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    wait_door(proxy.addr, target, "220 ").await;
    assert!(!http_get(admin, "/admin/bans")
        .await
        .1
        .contains("127.0.44.4"));
    assert_eq!(http(admin, "DELETE", ban, Some("s3cret")).await.0, 404);
}

#[tokio::test]
async fn admin_ban_mutations_are_forbidden_without_a_token_file() {
    let sink = sink().await;
    let proxy = TestProxy::start(&autoban_toml(&[], ""), &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let ban = "/admin/bans?ip=127.0.44.4";
    assert_eq!(http(admin, "POST", ban, Some("anything")).await.0, 403);
    assert_eq!(http(admin, "POST", ban, None).await.0, 403);
    assert_eq!(http(admin, "DELETE", ban, Some("anything")).await.0, 403);
    assert!(!http_get(admin, "/admin/bans")
        .await
        .1
        .contains("127.0.44.4"));
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 44, 4)).await,
        "220 sink.test ESMTP ready\r\n"
    );
}
