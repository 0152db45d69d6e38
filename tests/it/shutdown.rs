//! Graceful shutdown of the real binary: SIGTERM stops accepting, lets the
//! session in flight deliver its message, then exits cleanly.

use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::time::timeout;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[tokio::test]
async fn sigterm_drains_a_session_in_flight_without_losing_its_message() {
    let sink = sink().await;
    let addr = unused_addr();
    let dir = TempDir::new("sigterm");
    let config = dir.write(
        "mailmoat.toml",
        &format!(
            "[server]\nlisten = [\"{addr}\"]\nshutdown_grace = \"10s\"\n\
             [upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"\"\n",
            sink.addr()
        ),
    );
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut proxy = mailmoat()
        .arg("run")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mailmoat");
    let pid = proxy.id().expect("running").to_string();

    let mut raw = Raw::connect_when_ready(CLIENT, addr).await;
    raw.expect("220 ").await;
    raw.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        .await;
    for code in ["250-", "250 ", "250 ", "354 "] {
        raw.expect(code).await;
    }
    raw.send(b"Subject: drain\r\n\r\nfirst half\r\n").await;

    let kill = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(&pid)
        .status();
    assert!(kill.expect("run kill").success());
    assert!(wait_refused(addr).await, "still accepting after SIGTERM");

    raw.send(b"second half\r\n.\r\n").await;
    raw.expect("250 ").await;
    raw.expect("421 4.3.2 ").await;
    assert_eq!(raw.closed().await, "");

    let status = timeout(WAIT, proxy.wait()).await;
    let logs = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    let status = status.unwrap_or_else(|_| panic!("still running after the drain; log:\n{logs}"));
    assert!(status.expect("wait").success(), "exit status; log:\n{logs}");
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].data,
        b"Subject: drain\r\n\r\nfirst half\r\nsecond half\r\n"
    );
}

#[tokio::test]
async fn session_still_open_when_the_grace_runs_out_gets_421_and_closes() {
    let sink = sink().await;
    let toml = "[server]\nshutdown_grace = \"300ms\"\n";
    let mut proxy = TestProxy::start(toml, &[sink.addr()]).await;
    let mut raw = Raw::connect(CLIENT, proxy.addr).await;
    raw.expect("220 ").await;
    raw.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        .await;
    for code in ["250-", "250 ", "250 ", "354 "] {
        raw.expect(code).await;
    }
    raw.send(b"Subject: never finished\r\n").await;

    let stopped = proxy.begin_shutdown();
    raw.expect("421 4.3.2 ").await;
    assert_eq!(raw.closed().await, "");
    timeout(WAIT, stopped)
        .await
        .expect("stops in time")
        .unwrap();
    assert_eq!(
        proxy.metric(r#"mailmoat_sessions_closed_total{reason="shutdown"}"#),
        1.0
    );
    assert_eq!(sink.delivered(), 0);
}
