//! IMAP behind the door (issue 14): a proxy with an SMTP listener and an
//! IMAP one in front of the test IMAP receiver. Login failures read from
//! the receiver's own statuses ban an IP on every listener, an account
//! under attack gets its login replies delayed, and what the proxy refuses
//! before login never reaches the receiver.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use crate::bans::{door, wait_door, BLOCKED};
use crate::harness::*;
use crate::imap_receiver::{ImapClient, ImapReceiver};

const USERS: &[(&str, &str)] = &[("joe", "right"), ("ann", "hers")];
const NO_BANS: &str = "early_talker = 0\nlimit_violations = 0\nprotocol_errors = 0\n";

struct Setup {
    proxy: TestProxy,
    imap: SocketAddr,
    receiver: ImapReceiver,
    _sink: mailmoat::sink::Sink,
}

/// A proxy whose SMTP listener relays to a sink and whose IMAP listener
/// relays to a fresh test receiver; `autoban` and `mailbox` are the keys
/// of those tables.
async fn setup(autoban: &str, mailbox: &str) -> Setup {
    let receiver = ImapReceiver::start(USERS).await;
    let sink = sink().await;
    let imap = unused_addr();
    let toml = format!(
        "[limits]\nconnection_burst = 1000\n\
         [[listener]]\naddress = \"{imap}\"\nprotocol = \"imap\"\nupstream = \"imap\"\n\
         [upstreams.imap]\nservers = [\"{}\"]\n\
         [autoban]\n{NO_BANS}{autoban}\n\
         [mailbox]\n{mailbox}\n",
        receiver.addr
    );
    let proxy = TestProxy::start_with(config(&toml, &[sink.addr()])).await;
    Setup {
        proxy,
        imap,
        receiver,
        _sink: sink,
    }
}

/// An IMAP session from `ip`, past the greeting.
async fn imap_client(ip: Ipv4Addr, addr: SocketAddr) -> ImapClient {
    let (client, greeting) = ImapClient::connect(ip, addr).await;
    assert!(greeting.starts_with("* OK "), "{greeting:?}");
    client
}

const FAILED: &str = "NO [AUTHENTICATIONFAILED]";
const AUTH_FAILURES: &str = "mailmoat_auth_failures_total";

/// `mailmoat_logins_total` for IMAP with this outcome.
fn logins(outcome: &str) -> String {
    format!("mailmoat_logins_total{{outcome=\"{outcome}\",protocol=\"imap\"}}")
}

#[tokio::test]
async fn wrong_logins_on_parallel_imap_connections_ban_the_ip_on_smtp_too() {
    let s = setup("auth_failures = 10", "").await;
    let attacker = Ipv4Addr::new(127, 0, 140, 1);
    let mut sessions = Vec::new();
    for i in 0..10 {
        let addr = s.imap;
        sessions.push(tokio::spawn(async move {
            let mut client = imap_client(attacker, addr).await;
            client.login("a", "joe", &format!("guess{i}")).await
        }));
    }
    for session in sessions {
        let status = session.await.unwrap();
        // The tenth may already be cut off by its own ban.
        assert!(
            status.starts_with(&format!("a {FAILED}")) || status.starts_with("* BYE"),
            "{status:?}"
        );
    }
    assert!(s.receiver.connections() >= 10);
    // Banned on the SMTP listener of the same proxy …
    wait_door(s.proxy.addr, attacker, BLOCKED).await;
    // … and on the IMAP one.
    let (mut client, said) = ImapClient::connect(attacker, s.imap).await;
    assert!(said.starts_with("* BYE"), "{said:?}");
    assert_eq!(client.closed().await, "");
    // Someone else still gets in.
    assert_eq!(
        door(s.proxy.addr, Ipv4Addr::new(127, 0, 140, 2)).await,
        "220 sink.test ESMTP ready\r\n"
    );
}

#[tokio::test]
async fn the_right_password_logs_in_and_idle_outlives_the_preauth_timeout() {
    let s = setup("auth_failures = 10", "preauth_idle = \"1s\"").await;
    let ip = Ipv4Addr::new(127, 0, 141, 1);
    // Before login, one second of silence ends the session.
    let mut idler = imap_client(ip, s.imap).await;
    let started = Instant::now();
    let said = idler.closed().await;
    assert!(said.starts_with("* BYE [UNAVAILABLE] "), "{said:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let mut client = imap_client(ip, s.imap).await;
    assert!(client.login("a", "joe", "right").await.starts_with("a OK "));
    client.send(b"b IDLE\r\n").await;
    assert_eq!(client.line().await, "+ idling\r\n");
    // Well past the pre-auth limit with nothing said either way.
    assert_eq!(client.line_within(Duration::from_millis(2500)).await, None);
    client.send(b"DONE\r\n").await;
    assert_eq!(client.line().await, "b OK IDLE terminated\r\n");
    client.send(b"c LOGOUT\r\n").await;
    assert_eq!(client.status("c").await, "c OK bye\r\n");
}

#[tokio::test]
async fn a_literal_over_the_preauth_bound_is_refused_and_never_reaches_the_receiver() {
    let s = setup("", "max_literal = \"1KiB\"").await;
    let ip = Ipv4Addr::new(127, 0, 142, 1);
    let mut client = imap_client(ip, s.imap).await;
    // Synchronizing: refused, so the client never sends it.
    client.send(b"a LOGIN joe {5000}\r\n").await;
    assert_eq!(
        client.line().await,
        "a BAD [TOOBIG] literal too long before login\r\n"
    );
    // The session goes on, and a literal within the bound goes through.
    client.send(b"b LOGIN joe {5}\r\n").await;
    assert_eq!(client.line().await, "+ Ready\r\n");
    client.send(b"right\r\n").await;
    assert!(client.status("b").await.starts_with("b OK "));

    // Non-synchronizing: the client sends it at once; the session ends.
    let mut client = imap_client(ip, s.imap).await;
    let mut attack = b"c LOGIN joe {5000+}\r\n".to_vec();
    attack.extend(std::iter::repeat_n(b'x', 5000));
    attack.extend_from_slice(b"\r\n");
    client.send(&attack).await;
    let said = client.closed().await;
    assert!(said.starts_with("* BYE [TOOBIG] "), "{said:?}");

    let received = s.receiver.received();
    assert!(
        !received.windows(5).any(|w| w == b"{5000"),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(!received.windows(64).any(|w| w.iter().all(|&b| b == b'x')));
    assert_eq!(s.receiver.logins(), 1, "only the good LOGIN reached it");
}

#[tokio::test]
async fn no_unavailable_does_not_count_toward_a_ban() {
    let s = setup("auth_failures = 3", "").await;
    let ip = Ipv4Addr::new(127, 0, 143, 1);
    s.receiver.set_unavailable(true);
    for i in 0..6 {
        let mut client = imap_client(ip, s.imap).await;
        let status = client.login("a", "joe", &format!("guess{i}")).await;
        assert_eq!(status, "a NO [UNAVAILABLE] try again later\r\n");
    }
    assert_eq!(s.proxy.metric(&logins("temporary")), 6.0);
    assert_eq!(s.proxy.metric(AUTH_FAILURES), 0.0);
    // Still admitted, and the same failures do count once the receiver
    // says what they are.
    s.receiver.set_unavailable(false);
    for i in 0..3 {
        let mut client = imap_client(ip, s.imap).await;
        let status = client.login("a", "joe", &format!("other{i}")).await;
        assert!(status.starts_with(&format!("a {FAILED}")), "{status:?}");
    }
    wait_door(s.proxy.addr, ip, BLOCKED).await;
}

#[tokio::test]
async fn the_same_wrong_password_sent_ten_times_counts_once() {
    let s = setup("auth_failures = 2", "").await;
    let ip = Ipv4Addr::new(127, 0, 144, 1);
    for _ in 0..10 {
        let mut client = imap_client(ip, s.imap).await;
        let status = client.login("a", "joe", "stale").await;
        assert!(status.starts_with(&format!("a {FAILED}")), "{status:?}");
    }
    assert_eq!(s.proxy.metric(&logins("failure")), 1.0);
    assert_eq!(s.proxy.metric(&logins("repeated")), 9.0);
    assert_eq!(s.proxy.metric(AUTH_FAILURES), 1.0);
    assert_eq!(
        door(s.proxy.addr, ip).await,
        "220 sink.test ESMTP ready\r\n",
        "ten of the same password counted more than once"
    );
    // A second, different wrong password is the second failure.
    let mut client = imap_client(ip, s.imap).await;
    client.login("a", "joe", "another").await;
    wait_door(s.proxy.addr, ip, BLOCKED).await;
}

#[tokio::test]
async fn an_account_attacked_from_twenty_ips_gets_delayed_replies_and_others_do_not() {
    let s = setup(
        "auth_failures = 0",
        "account_failures = 10\naccount_delay = \"1s\"\naccount_delay_max = \"2s\"",
    )
    .await;
    let mut attacks = Vec::new();
    for i in 1..=20u8 {
        let addr = s.imap;
        attacks.push(tokio::spawn(async move {
            let mut client = imap_client(Ipv4Addr::new(127, 0, 145, i), addr).await;
            client.login("a", "joe", &format!("guess{i}")).await
        }));
    }
    for attack in attacks {
        let status = attack.await.unwrap();
        assert!(status.starts_with(&format!("a {FAILED}")), "{status:?}");
    }

    let ip = Ipv4Addr::new(127, 0, 146, 1);
    let mut other = imap_client(ip, s.imap).await;
    let started = Instant::now();
    assert!(other.login("a", "ann", "hers").await.starts_with("a OK "));
    let other_took = started.elapsed();

    let mut owner = imap_client(ip, s.imap).await;
    let started = Instant::now();
    assert!(owner.login("a", "joe", "right").await.starts_with("a OK "));
    let owner_took = started.elapsed();

    assert!(
        other_took < Duration::from_millis(500),
        "another account waited {other_took:?}"
    );
    assert!(
        owner_took >= Duration::from_millis(950),
        "the attacked account was answered after {owner_took:?}"
    );
}
