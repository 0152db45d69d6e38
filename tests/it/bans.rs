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

pub(crate) const BLOCKED: &str = "554 5.7.1 localhost access denied\r\n";
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
pub(crate) fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// The first thing a new connection from `ip` is told.
pub(crate) async fn door(addr: SocketAddr, ip: Ipv4Addr) -> String {
    Raw::connect(ip, addr).await.reply().await
}

/// Polls the door until a new connection from `ip` is told `prefix`.
pub(crate) async fn wait_door(addr: SocketAddr, ip: Ipv4Addr, prefix: &str) {
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

pub(crate) fn auth_plain(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    format!("AUTH PLAIN {token}\r\n")
}

pub(crate) async fn auth_sink() -> mailmoat::sink::Sink {
    sink_with(SinkOptions {
        auth: Some(("user".into(), "secret".into())),
        ..SinkOptions::default()
    })
    .await
}

/// Fails AUTH `n` times in one session, each answered 535 by the receiver.
pub(crate) async fn fail_auth(raw: &mut Raw, n: usize) {
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

/// The admin API's answer means the change is in force: a lookup right
/// after it sees the ban, and right after its lift, no ban.
#[tokio::test]
async fn admin_ban_and_lift_are_in_the_lists_when_the_api_answers() {
    let sink = sink().await;
    let dir = TempDir::new("admin-lift-now");
    let token_file = dir.write("token", "s3cret\n");
    let toml = format!(
        "{}[admin]\ntoken_file = {}\n",
        autoban_toml(&[], ""),
        quoted(&token_file)
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let ban = "/admin/bans?ip=127.0.44.9";
    let lookup = "/admin/lookup?ip=127.0.44.9";
    for _ in 0..3 {
        let (status, body) = http(admin, "POST", ban, Some("s3cret")).await;
        assert_eq!(status, 200, "{body}");
        let (_, body) = http_get(admin, lookup).await;
        assert!(body.contains("blocked by autoban"), "{body}");

        let (status, body) = http(admin, "DELETE", ban, Some("s3cret")).await;
        assert_eq!(status, 200, "{body}");
        let (_, body) = http_get(admin, lookup).await;
        assert!(body.contains("not listed"), "{body}");
    }
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

/// A proxy whose ban endpoints take the token "s3cret", with `extra`
/// `[autoban]` keys; returns it and the directory holding the token.
async fn proxy_with_token(sink: &mailmoat::sink::Sink, extra: &str) -> (TestProxy, TempDir) {
    let dir = TempDir::new("ban-token");
    let token_file = dir.write("token", "s3cret\n");
    let toml = format!(
        "{}[admin]\ntoken_file = {}\n",
        autoban_toml(&[], extra),
        quoted(&token_file)
    );
    (TestProxy::start(&toml, &[sink.addr()]).await, dir)
}

/// The `until=` of the exported ban of `net`.
fn exported_until(export: &str, net: &str) -> Option<u64> {
    export
        .lines()
        .find(|l| l.starts_with(&format!("{net} ")))?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("until="))?
        .parse()
        .ok()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const YEAR: u64 = 31_557_600;

#[tokio::test]
async fn a_ttl_beyond_max_ttl_is_refused_and_later_bans_are_still_enforced() {
    let sink = sink().await;
    let (proxy, _dir) = proxy_with_token(&sink, "").await;
    let admin = proxy.admin.unwrap();

    for ttl in ["10000000000000000000s", "18446744073709551615s", "2years"] {
        let (status, body) = http(
            admin,
            "POST",
            &format!("/admin/bans?ip=127.0.93.1&ttl={ttl}"),
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, 400, "ttl={ttl}: {body}");
        assert!(body.contains("autoban.max_ttl"), "ttl={ttl}: {body}");
    }
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 93, 1)).await,
        "220 sink.test ESMTP ready\r\n"
    );
    // The longest allowed ban is taken, and a ban after it is enforced.
    let (status, body) = http(
        admin,
        "POST",
        "/admin/bans?ip=127.0.93.2&ttl=1year",
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(admin, "POST", "/admin/bans?ip=127.0.93.3", Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    wait_door(proxy.addr, Ipv4Addr::new(127, 0, 93, 3), BLOCKED).await;
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 93, 2)).await,
        BLOCKED
    );
    proxy.wait_metric("mailmoat_active_bans", 2.0).await;
}

#[tokio::test]
async fn a_state_file_until_beyond_max_ttl_is_clamped_and_later_bans_are_still_enforced() {
    let sink = sink().await;
    let dir = TempDir::new("ban-clamp");
    let state = dir.write(
        "bans.txt",
        "127.0.94.1/32 # until=18446744073709551615 reason=manual\n",
    );
    let (proxy, _token) = proxy_with_token(&sink, &format!("state = {}", quoted(&state))).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 94, 1)).await,
        BLOCKED
    );
    let (_, export) = http_get(admin, "/admin/bans").await;
    let until = exported_until(&export, "127.0.94.1/32").expect("the clamped ban is exported");
    assert!(until <= unix_now() + YEAR + 5, "{export}");

    // The maintenance task still runs: a new ban is enforced and saved.
    let (status, body) = http(admin, "POST", "/admin/bans?ip=127.0.94.2", Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    wait_door(proxy.addr, Ipv4Addr::new(127, 0, 94, 2), BLOCKED).await;
    proxy.wait_metric("mailmoat_active_bans", 2.0).await;
    let saved = std::fs::read_to_string(&state).unwrap();
    let until = exported_until(&saved, "127.0.94.1/32").expect("the clamped ban is saved");
    assert!(until <= unix_now() + YEAR + 5, "{saved}");
}

#[tokio::test]
async fn unreadable_state_lines_are_skipped_and_the_original_is_kept_aside() {
    let sink = sink().await;
    let dir = TempDir::new("ban-bad-state");
    let state = dir.path().join("bans.txt");
    let until = unix_now() + 3600;
    let mut original = format!("127.0.95.1/32 # until={until} reason=auth_failures\n").into_bytes();
    original.extend_from_slice(b"127.0.95.2/32 # until=1 reason=caf\xe9\n");
    original.extend_from_slice(format!("0.0.0.0/0 # until={until} reason=manual\n").as_bytes());
    original.extend_from_slice(format!("127.0.95.3/32 # until={until} reason=manual\n").as_bytes());
    std::fs::write(&state, &original).unwrap();

    let proxy = TestProxy::start(
        &autoban_toml(&[], &format!("state = {}", quoted(&state))),
        &[sink.addr()],
    )
    .await;
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 95, 1)).await,
        BLOCKED
    );
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 95, 3)).await,
        BLOCKED
    );
    // The line banning everyone is not loaded.
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 95, 9)).await,
        "220 sink.test ESMTP ready\r\n"
    );
    // The file as it was is kept for the operator, byte for byte …
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("bans.txt.bad-"))
        .collect();
    assert_eq!(aside.len(), 1, "no copy of the bad state file was kept");
    assert_eq!(std::fs::read(aside[0].path()).unwrap(), original);
    // … and the state file holds the bans that could be read.
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(
        saved.contains("127.0.95.1/32 ") && saved.contains("127.0.95.3/32 "),
        "{saved}"
    );
    assert!(!saved.contains("0.0.0.0/0"), "{saved}");
}

#[tokio::test]
async fn a_ban_wider_than_the_minimum_prefix_is_refused() {
    let sink = sink().await;
    let (proxy, _dir) = proxy_with_token(&sink, "").await;
    let admin = proxy.admin.unwrap();
    for (net, key) in [
        ("0.0.0.0/0", "autoban.min_prefix_v4"),
        ("127.0.0.0/8", "autoban.min_prefix_v4"),
        ("::ffff:0:0/96", "autoban.min_prefix_v4"),
        ("::/0", "autoban.min_prefix_v6"),
        ("2001:db8::/24", "autoban.min_prefix_v6"),
    ] {
        let (status, body) = http(
            admin,
            "POST",
            &format!("/admin/bans?ip={net}"),
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, 400, "{net}: {body}");
        assert!(body.contains(key), "{net}: {body}");
    }
    assert_eq!(proxy.metric("mailmoat_active_bans"), 0.0);
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 96, 1)).await,
        "220 sink.test ESMTP ready\r\n"
    );
    // At the minimum is fine.
    let (status, body) = http(
        admin,
        "POST",
        "/admin/bans?ip=127.96.0.0/16",
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_acknowledged_ban_is_on_disk_when_the_post_returns() {
    let sink = sink().await;
    let dir = TempDir::new("ban-durable");
    let state = dir.path().join("bans.txt");
    let (proxy, _token) = proxy_with_token(&sink, &format!("state = {}", quoted(&state))).await;
    let admin = proxy.admin.unwrap();
    for i in 1..=5u8 {
        let (status, body) = http(
            admin,
            "POST",
            &format!("/admin/bans?ip=127.0.97.{i}"),
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("saved"), "{body}");
        let saved = std::fs::read_to_string(&state).unwrap_or_default();
        assert!(
            saved.contains(&format!("127.0.97.{i}/32 ")),
            "ban {i} acknowledged but not on disk:\n{saved}"
        );
    }
    // Lifting is durable too.
    let (status, _) = http(admin, "DELETE", "/admin/bans?ip=127.0.97.1", Some("s3cret")).await;
    assert_eq!(status, 200);
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(!saved.contains("127.0.97.1/32 "), "{saved}");
}

#[tokio::test]
async fn a_ban_acknowledged_without_autoban_state_says_it_is_lost_at_restart() {
    let sink = sink().await;
    let (proxy, _dir) = proxy_with_token(&sink, "").await;
    let (status, body) = http(
        proxy.admin.unwrap(),
        "POST",
        "/admin/bans?ip=127.0.98.1",
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("autoban.state is not set") && body.contains("lost at restart"),
        "{body}"
    );
}

#[tokio::test]
async fn at_max_bans_the_ban_soonest_to_expire_is_evicted() {
    let sink = sink().await;
    let (proxy, _dir) = proxy_with_token(&sink, "max_bans = 3").await;
    let admin = proxy.admin.unwrap();
    for (ip, ttl) in [
        ("127.0.99.1", "3h"),
        ("127.0.99.2", "1h"),
        ("127.0.99.3", "2h"),
        ("127.0.99.4", "4h"),
    ] {
        let (status, body) = http(
            admin,
            "POST",
            &format!("/admin/bans?ip={ip}&ttl={ttl}"),
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, export) = http_get(admin, "/admin/bans").await;
    assert!(!export.contains("127.0.99.2/32"), "{export}");
    for kept in ["127.0.99.1/32 ", "127.0.99.3/32 ", "127.0.99.4/32 "] {
        assert!(export.contains(kept), "{export}");
    }
    assert_eq!(proxy.metric("mailmoat_bans_evicted_total"), 1.0);
    proxy.wait_metric("mailmoat_active_bans", 3.0).await;
    wait_door(proxy.addr, Ipv4Addr::new(127, 0, 99, 4), BLOCKED).await;
    assert_eq!(
        door(proxy.addr, Ipv4Addr::new(127, 0, 99, 2)).await,
        "220 sink.test ESMTP ready\r\n"
    );
}
