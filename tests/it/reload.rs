//! Reloading the config of the real binary: SIGHUP (the unit's
//! `ExecReload`) and `mailmoat reload` put a changed limit in force for new
//! sessions while open ones finish under the old one; a broken edit keeps
//! the running config and is reported.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::process::Child;
use tokio::time::Instant;

use crate::harness::*;

const NO_BANS: &str =
    "[autoban]\nearly_talker = 0\nauth_failures = 0\nlimit_violations = 0\nprotocol_errors = 0\n";
const MESSAGE_RATE_REFUSED: &str = "450 4.7.1 message rate limit exceeded";

/// A config allowing `messages` messages per hour per IP.
fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    messages: u32,
) -> String {
    format!(
        "[server]\nlisten = [\"{listen}\"]\n[upstream]\nservers = [\"{upstream}\"]\n\
         [limits]\nmessage_rate = \"{messages}/hour\"\nmessage_burst = {messages}\n\
         [timeouts]\ngreet_pause = \"0s\"\n\
         [admin]\nlisten = \"{admin}\"\ntoken_file = \"token\"\n{NO_BANS}"
    )
}

fn hangup(proxy: &Child) {
    let pid = proxy.id().expect("running").to_string();
    let kill = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(&pid)
        .status();
    assert!(kill.expect("run kill").success());
}

/// Waits until `series` reads `value` on the admin listener.
async fn wait_series(admin: SocketAddr, series: &str, value: f64) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok((200, body)) = tokio::time::timeout(WAIT, http_get(admin, "/metrics"))
            .await
            .map_err(|_| ())
        {
            if series_value(&body, series) == Some(value) {
                return true;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// A session past EHLO.
async fn open(ip: Ipv4Addr, addr: SocketAddr) -> Raw {
    let mut raw = Raw::connect_when_ready(ip, addr).await;
    raw.expect("220 ").await;
    raw.send(b"EHLO x\r\n").await;
    raw.expect("250").await;
    raw
}

/// One MAIL FROM and its reply, then RSET if it was taken.
async fn mail(raw: &mut Raw) -> String {
    raw.send(b"MAIL FROM:<a@b>\r\n").await;
    let reply = raw.reply().await;
    if reply.starts_with("250") {
        raw.send(b"RSET\r\n").await;
        raw.expect("250 ").await;
    }
    reply
}

#[tokio::test]
async fn hup_after_editing_a_rate_limits_new_sessions_while_open_ones_keep_the_old() {
    let sink = sink().await;
    let (addr, admin) = (unused_addr(), unused_addr());
    let dir = TempDir::new("reload-hup");
    dir.write("token", "secret\n");
    let config = dir.write("mailmoat.toml", &config_text(addr, admin, sink.addr(), 2));
    let log = dir.path().join("stderr.log");
    let proxy = mailmoat_logged(&config, &log);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    // Opened under 2 messages an hour.
    let mut before = open(Ipv4Addr::new(127, 0, 0, 2), addr).await;
    assert!(mail(&mut before).await.starts_with("250"));

    dir.write("mailmoat.toml", &config_text(addr, admin, sink.addr(), 1));
    hangup(&proxy);
    assert!(
        wait_series(admin, r#"mailmoat_config_reloads_total{result="ok"}"#, 1.0).await,
        "no reload; log:\n{}",
        logs()
    );

    // A new session is under 1 an hour: its second message is refused,
    // where the old limit would have let it through.
    let mut after = open(Ipv4Addr::new(127, 0, 0, 3), addr).await;
    assert!(mail(&mut after).await.starts_with("250"));
    let refused = mail(&mut after).await;
    assert!(
        refused.starts_with(MESSAGE_RATE_REFUSED),
        "{refused}; log:\n{}",
        logs()
    );

    // The session opened before finishes under the old limit.
    let second = mail(&mut before).await;
    assert!(second.starts_with("250"), "{second}; log:\n{}", logs());

    // A broken edit: refused, reported, and the running config stays.
    let broken = config_text(addr, admin, sink.addr(), 1)
        .replace("message_rate = \"1/hour\"", "message_rate = \"lots\"");
    dir.write("mailmoat.toml", &broken);
    hangup(&proxy);
    assert!(
        wait_series(
            admin,
            r#"mailmoat_config_reloads_total{result="error"}"#,
            1.0
        )
        .await,
        "broken config not reported; log:\n{}",
        logs()
    );
    assert!(wait_series(admin, "mailmoat_config_last_reload_success", 0.0).await);
    assert!(
        wait_for(|| logs().contains("config reload refused") && logs().contains("message_rate"))
            .await,
        "the log does not name the error; log:\n{}",
        logs()
    );
    let mut later = open(Ipv4Addr::new(127, 0, 0, 4), addr).await;
    assert!(mail(&mut later).await.starts_with("250"));
    let refused = mail(&mut later).await;
    assert!(
        refused.starts_with(MESSAGE_RATE_REFUSED),
        "{refused}; log:\n{}",
        logs()
    );
    // Accepting all along.
    assert!(mail(&mut open(Ipv4Addr::new(127, 0, 0, 5), addr).await)
        .await
        .starts_with("250"));
}

#[tokio::test]
async fn mailmoat_reload_moves_the_listener_and_reports_a_refused_reload() {
    let sink = sink().await;
    let (addr, admin, moved) = (unused_addr(), unused_addr(), unused_addr());
    let dir = TempDir::new("reload-cli");
    dir.write("token", "secret\n");
    let config = dir.write("mailmoat.toml", &config_text(addr, admin, sink.addr(), 5));
    let log = dir.path().join("stderr.log");
    let _proxy = mailmoat_logged(&config, &log);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut held = open(Ipv4Addr::new(127, 0, 0, 2), addr).await;

    dir.write("mailmoat.toml", &config_text(moved, admin, sink.addr(), 5));
    let run = mailmoat_run(&["reload", "-c", config.to_str().unwrap()]).await;
    assert_eq!(
        run.code,
        Some(0),
        "{}{}; log:\n{}",
        run.stdout,
        run.stderr,
        logs()
    );
    assert!(run.stdout.contains("config reloaded"), "{}", run.stdout);
    assert!(mail(&mut open(Ipv4Addr::new(127, 0, 0, 3), moved).await)
        .await
        .starts_with("250"));
    assert!(
        wait_refused(addr).await,
        "still accepting on the old address"
    );
    // The session accepted on the old address goes on.
    assert!(mail(&mut held).await.starts_with("250"));

    // A listener that cannot bind refuses the whole reload, and says so.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let text = config_text(moved, admin, sink.addr(), 5).replace(
        &format!("listen = [\"{moved}\"]"),
        &format!("listen = [\"{moved}\", \"{taken_addr}\"]"),
    );
    dir.write("mailmoat.toml", &text);
    let run = mailmoat_run(&["reload", "-c", config.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(2), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("config reload refused")
            && run.stderr.contains(&taken_addr.to_string()),
        "{}",
        run.stderr
    );
    assert!(mail(&mut open(Ipv4Addr::new(127, 0, 0, 4), moved).await)
        .await
        .starts_with("250"));
}
