//! Shaping inside admitted sessions: the message and recipient limits and
//! the size limit answer with their exact codes while the session (and,
//! with PIPELINING, the order of replies) carries on; `/admin/top` names
//! who is being shaped; and each accepted message leaves a log record.
//!
//! Every config sets the autoban thresholds it does not test to 0, so a
//! test client is never banned half-way through for its own refusals.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{timeout_at, Instant};

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 33, 3);

/// No autoban trigger: these tests are about the replies, not the bans.
const NO_BANS: &str =
    "[autoban]\nearly_talker = 0\nauth_failures = 0\nlimit_violations = 0\nprotocol_errors = 0\n";

const MESSAGE_RATE_REFUSED: &str = "450 4.7.1 message rate limit exceeded, try again later\r\n";
const TOO_MANY_RECIPIENTS: &str = "452 4.5.3 too many recipients\r\n";
const TOO_BIG: &str = "552 5.3.4 message size exceeds fixed maximum message size\r\n";

async fn shaping_proxy(limits: &str, sink: &mailmoat::sink::Sink) -> TestProxy {
    TestProxy::start(&format!("[limits]\n{limits}\n{NO_BANS}"), &[sink.addr()]).await
}

/// Sends `command` and returns the one reply to it.
async fn say(raw: &mut Raw, command: &str) -> String {
    raw.send(format!("{command}\r\n").as_bytes()).await;
    raw.reply().await
}

/// MAIL, one RCPT, DATA and `body` (CRLF-terminated), each accepted.
async fn deliver(raw: &mut Raw, body: &str) {
    assert_eq!(
        say(raw, "MAIL FROM:<a@example.org>").await,
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        say(raw, "RCPT TO:<b@example.net>").await,
        "250 2.1.5 Ok\r\n"
    );
    assert!(say(raw, "DATA").await.starts_with("354 "));
    raw.send(format!("{body}.\r\n").as_bytes()).await;
    assert_eq!(raw.reply().await, "250 2.0.0 Ok: queued\r\n");
}

/// A message of exactly `len` bytes as RFC 1870 counts it (its final CRLF
/// included, the terminating ".CRLF" not), no line starting with a dot.
fn message_of(len: usize) -> String {
    let mut message = String::from("Subject: size\r\n\r\n");
    while message.len() < len {
        let room = len - message.len();
        let line = if room > 80 + 4 { 78 } else { room - 2 };
        message.push_str(&"x".repeat(line));
        message.push_str("\r\n");
    }
    assert_eq!(message.len(), len);
    message
}

#[tokio::test]
async fn third_message_of_a_burst_of_two_gets_450_and_passes_after_the_refill() {
    let sink = sink().await;
    // One token a second, two in the bucket.
    let proxy = shaping_proxy("message_rate = \"60/min\"\nmessage_burst = 2", &sink).await;
    let mut raw = session(CLIENT, proxy.addr).await;
    deliver(&mut raw, "Subject: 1\r\n\r\none\r\n").await;
    deliver(&mut raw, "Subject: 2\r\n\r\ntwo\r\n").await;

    assert_eq!(
        say(&mut raw, "MAIL FROM:<a@example.org>").await,
        MESSAGE_RATE_REFUSED
    );
    // The refused MAIL never reached the receiver: it has no transaction.
    let rcpt = say(&mut raw, "RCPT TO:<b@example.net>").await;
    assert!(rcpt.starts_with("503 5.5.1 need MAIL"), "{rcpt:?}");
    assert_eq!(
        proxy.metric(r#"mailmoat_rate_limit_hits_total{limit="message_rate"}"#),
        1.0
    );
    assert_eq!(
        proxy.metric(r#"mailmoat_messages_refused_total{limit="message_rate"}"#),
        1.0
    );
    // The receiver decided nothing: no message result, accepted or not.
    assert_eq!(
        proxy.metric(r#"mailmoat_messages_total{result="rejected"}"#),
        0.0
    );

    // Within about a second a token is back and the next MAIL passes.
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match say(&mut raw, "MAIL FROM:<a@example.org>").await.as_str() {
            "250 2.1.0 Ok\r\n" => break,
            MESSAGE_RATE_REFUSED => assert!(Instant::now() < deadline, "no refill in time"),
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!(
        say(&mut raw, "RCPT TO:<b@example.net>").await,
        "250 2.1.5 Ok\r\n"
    );
    assert!(say(&mut raw, "DATA").await.starts_with("354 "));
    raw.send(b"Subject: 3\r\n\r\nthree\r\n.\r\n").await;
    assert_eq!(raw.reply().await, "250 2.0.0 Ok: queued\r\n");
    assert_eq!(sink.delivered(), 3);
}

#[tokio::test]
async fn rcpt_over_the_per_message_cap_gets_452_and_the_message_goes_to_the_first_ones() {
    let sink = sink().await;
    let proxy = shaping_proxy("recipients_per_message = 2", &sink).await;
    let mut raw = session(CLIENT, proxy.addr).await;
    assert_eq!(
        say(&mut raw, "MAIL FROM:<a@example.org>").await,
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        say(&mut raw, "RCPT TO:<one@example.net>").await,
        "250 2.1.5 Ok\r\n"
    );
    assert_eq!(
        say(&mut raw, "RCPT TO:<two@example.net>").await,
        "250 2.1.5 Ok\r\n"
    );
    assert_eq!(
        say(&mut raw, "RCPT TO:<three@example.net>").await,
        TOO_MANY_RECIPIENTS
    );
    assert!(say(&mut raw, "DATA").await.starts_with("354 "));
    raw.send(b"Subject: r\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(raw.reply().await, "250 2.0.0 Ok: queued\r\n");

    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpt_to, ["one@example.net", "two@example.net"]);
    // A cap, not a rate; a refused recipient, not a refused message.
    let text = proxy.metrics.render();
    for (series, value) in [
        (
            r#"mailmoat_message_cap_hits_total{cap="recipients_per_message"}"#,
            Some(1.0),
        ),
        (
            r#"mailmoat_recipients_refused_total{limit="recipients_per_message"}"#,
            Some(1.0),
        ),
        (
            r#"mailmoat_rate_limit_hits_total{limit="recipients_per_message"}"#,
            None,
        ),
        (
            r#"mailmoat_messages_refused_total{limit="message_size"}"#,
            Some(0.0),
        ),
        (r#"mailmoat_messages_total{result="accepted"}"#, Some(1.0)),
    ] {
        assert_eq!(series_value(&text, series), value, "{series} in\n{text}");
    }

    // The cap is per message: the next one may have two recipients again.
    assert_eq!(
        say(&mut raw, "MAIL FROM:<a@example.org>").await,
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        say(&mut raw, "RCPT TO:<four@example.net>").await,
        "250 2.1.5 Ok\r\n"
    );
    assert_eq!(
        say(&mut raw, "RCPT TO:<five@example.net>").await,
        "250 2.1.5 Ok\r\n"
    );
    assert_eq!(
        say(&mut raw, "RCPT TO:<six@example.net>").await,
        TOO_MANY_RECIPIENTS
    );
}

#[tokio::test]
async fn mail_declaring_a_size_over_the_maximum_gets_552_before_the_receiver_sees_it() {
    let sink = sink().await;
    let proxy = shaping_proxy("max_message_size = \"10KiB\"", &sink).await;
    let mut raw = session(CLIENT, proxy.addr).await;
    assert_eq!(say(&mut raw, "MAIL FROM:<a@b> SIZE=999999").await, TOO_BIG);
    // The receiver has no transaction: the MAIL never reached it.
    let rcpt = say(&mut raw, "RCPT TO:<c@d>").await;
    assert!(rcpt.starts_with("503 5.5.1 need MAIL"), "{rcpt:?}");
    let text = proxy.metrics.render();
    for (series, value) in [
        (
            r#"mailmoat_message_cap_hits_total{cap="message_size"}"#,
            Some(1.0),
        ),
        (
            r#"mailmoat_messages_refused_total{limit="message_size"}"#,
            Some(1.0),
        ),
        (
            r#"mailmoat_rate_limit_hits_total{limit="message_size"}"#,
            None,
        ),
    ] {
        assert_eq!(series_value(&text, series), value, "{series} in\n{text}");
    }
    // The session goes on; a size within the limit is fine.
    assert_eq!(
        say(&mut raw, "MAIL FROM:<a@b> SIZE=10240").await,
        "250 2.1.0 Ok\r\n"
    );
}

#[tokio::test]
async fn data_over_the_maximum_gets_552_and_never_reaches_the_mailbox() {
    let sink = sink().await;
    let proxy = shaping_proxy("max_message_size = \"10KiB\"", &sink).await;
    let mut raw = session(CLIENT, proxy.addr).await;
    assert_eq!(say(&mut raw, "MAIL FROM:<a@b>").await, "250 2.1.0 Ok\r\n");
    assert_eq!(say(&mut raw, "RCPT TO:<c@d>").await, "250 2.1.5 Ok\r\n");
    assert!(say(&mut raw, "DATA").await.starts_with("354 "));
    // A complete message, end marker and all, in one write (one read of
    // the proxy's, so the close that follows is not a reset).
    let mut message = big_message(11 * 1024);
    message.extend_from_slice(b".\r\n");
    raw.send(&message).await;
    assert_eq!(raw.reply().await, TOO_BIG);
    assert_eq!(raw.closed().await, "");

    proxy
        .wait_metric(r#"mailmoat_sessions_closed_total{reason="limit"}"#, 1.0)
        .await;
    assert!(
        wait_for(|| sink.active() == 0).await,
        "the receiver still holds the session"
    );
    assert_eq!(sink.delivered(), 0, "an over-size message was delivered");
    assert!(sink.messages().is_empty());
    let text = proxy.metrics.render();
    for (series, value) in [
        (
            r#"mailmoat_message_cap_hits_total{cap="message_size"}"#,
            Some(1.0),
        ),
        (
            r#"mailmoat_messages_refused_total{limit="message_size"}"#,
            Some(1.0),
        ),
        (
            r#"mailmoat_rate_limit_hits_total{limit="message_size"}"#,
            None,
        ),
    ] {
        assert_eq!(series_value(&text, series), value, "{series} in\n{text}");
    }
}

#[tokio::test]
async fn message_of_exactly_the_maximum_passes_and_one_byte_more_gets_552() {
    let sink = sink().await;
    let proxy = shaping_proxy("max_message_size = \"10KiB\"", &sink).await;

    let mut raw = session(CLIENT, proxy.addr).await;
    let exact = message_of(10 * 1024);
    deliver(&mut raw, &exact).await;
    assert_eq!(sink.messages()[0].data, exact.as_bytes());
    assert!(say(&mut raw, "QUIT").await.starts_with("221 "));
    drop(raw);

    let mut raw = session(CLIENT, proxy.addr).await;
    assert_eq!(say(&mut raw, "MAIL FROM:<a@b>").await, "250 2.1.0 Ok\r\n");
    assert_eq!(say(&mut raw, "RCPT TO:<c@d>").await, "250 2.1.5 Ok\r\n");
    assert!(say(&mut raw, "DATA").await.starts_with("354 "));
    raw.send(format!("{}.\r\n", message_of(10 * 1024 + 1)).as_bytes())
        .await;
    assert_eq!(raw.reply().await, TOO_BIG);
    assert_eq!(raw.closed().await, "");
    assert!(wait_for(|| sink.active() == 0).await);
    assert_eq!(sink.delivered(), 1);
}

#[tokio::test]
async fn pipelined_batch_with_refused_recipients_gets_every_reply_in_order() {
    let sink = sink().await;
    let proxy = shaping_proxy("recipients_per_message = 1", &sink).await;
    let mut raw = session(CLIENT, proxy.addr).await;
    raw.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\n")
        .await;
    assert_eq!(raw.reply().await, "250 2.1.0 Ok\r\n");
    assert_eq!(raw.reply().await, "250 2.1.5 Ok\r\n");
    assert_eq!(raw.reply().await, TOO_MANY_RECIPIENTS);
    assert_eq!(raw.reply().await, TOO_MANY_RECIPIENTS);
    raw.expect("354 ").await;
    raw.send(b"Subject: p\r\n\r\nhello\r\n.\r\nQUIT\r\n").await;
    assert_eq!(raw.reply().await, "250 2.0.0 Ok: queued\r\n");
    raw.expect("221 ").await;
    assert_eq!(raw.closed().await, "");

    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpt_to, ["c@d"]);
    assert_eq!(messages[0].data, b"Subject: p\r\n\r\nhello\r\n");
}

#[tokio::test]
async fn admin_top_lists_the_flooding_ip_first() {
    let sink = sink().await;
    // A sweep halves the refusal counts; keep it out of the test's way.
    let toml = format!(
        "[server]\nstate_sweep = \"1h\"\n[limits]\nper_ip_connections = 2\nconnection_burst = 1000\n{NO_BANS}"
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let attacker = Ipv4Addr::new(127, 0, 55, 5);
    let legit = Ipv4Addr::new(127, 0, 66, 6);

    let mut held = Vec::new();
    for ip in [attacker, attacker, legit] {
        let mut raw = Raw::connect(ip, proxy.addr).await;
        raw.expect("220 ").await;
        held.push(raw);
    }
    for _ in 0..30 {
        let mut raw = Raw::connect(attacker, proxy.addr).await;
        raw.expect("421 4.7.0 ").await;
    }

    let (status, body) = http_get(proxy.admin.unwrap(), "/admin/top?n=5").await;
    assert_eq!(status, 200, "{body}");
    let top: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let sessions = top["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 2, "{body}");
    assert_eq!(sessions[0]["ip"], "127.0.55.5", "{body}");
    assert_eq!(sessions[0]["sessions"], 2, "{body}");
    assert_eq!(sessions[1]["ip"], "127.0.66.6", "{body}");
    assert_eq!(sessions[1]["sessions"], 1, "{body}");
    let refusals = top["refusals"].as_array().expect("refusals");
    assert_eq!(refusals.len(), 1, "{body}");
    assert_eq!(refusals[0]["ip"], "127.0.55.5", "{body}");
    assert_eq!(refusals[0]["refusals"], 30, "{body}");
    drop(held);
}

#[tokio::test]
async fn log_record_of_a_lettre_message_carries_the_from_domain_and_message_id() {
    let sink = sink().await;
    let dir = TempDir::new("message-log");
    let listen = unused_addr();
    let config = dir.write(
        "mailmoat.toml",
        &format!(
            "[server]\nlisten = [\"{listen}\"]\n[upstream]\nservers = [\"{}\"]\n\
             [blocklist]\nfiles = []\n[admin]\nlisten = \"\"\n{NO_BANS}\
             [log]\nformat = \"json\"\nlevel = \"info\"\n",
            sink.addr()
        ),
    );
    let mut child = mailmoat()
        .arg("run")
        .arg("-c")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mailmoat starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();

    // Up and accepting: a probe connection gets the receiver's banner.
    let mut probe = Raw::connect_when_ready(CLIENT, listen).await;
    probe.expect("220 ").await;
    drop(probe);

    let body = b"From: Alice <alice@sender.example>\r\nTo: b@example.net\r\n\
Message-ID: <abc123@sender.example>\r\nSubject: logged\r\n\r\nHello.\r\n";
    send_mail(
        CLIENT,
        listen,
        "bounce@envelope.example",
        &["b@example.net"],
        body,
    )
    .await
    .unwrap();
    assert_eq!(sink.delivered(), 1);

    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let record = loop {
        let line = timeout_at(deadline, stderr.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no \"message accepted\" record in time; stderr:\n{}",
                    seen.join("\n")
                )
            })
            .expect("read stderr")
            .unwrap_or_else(|| panic!("mailmoat exited; stderr:\n{}", seen.join("\n")));
        if line.contains("message accepted") {
            break line;
        }
        seen.push(line);
    };
    let _ = child.start_kill();
    let record: serde_json::Value = serde_json::from_str(&record).expect("a JSON log line");
    let fields = &record["fields"];
    assert_eq!(fields["message"], "message accepted", "{record}");
    assert_eq!(fields["from_domain"], "sender.example", "{record}");
    let message_id = fields["message_id"].as_str().expect("message_id");
    assert!(message_id.contains("abc123"), "{record}");
    assert_eq!(fields["mail_from"], "bounce@envelope.example", "{record}");
    assert_eq!(fields["client"], CLIENT.to_string(), "{record}");
    assert_eq!(fields["recipients"], 1, "{record}");
    assert_eq!(
        fields["size"],
        sink.messages()[0].data.len(),
        "size as the receiver stored it; {record}"
    );
    let _ = timeout_at(deadline, child.wait()).await;
}

#[tokio::test]
async fn allowlisted_client_skips_the_message_and_recipient_rates_and_is_never_banned() {
    let sink = sink().await;
    let dir = TempDir::new("allow-shaping");
    let allow = dir.write("allow.txt", &format!("{CLIENT}\n"));
    // Tight rates and a ban at the first violation or protocol error.
    let toml = format!(
        "[limits]\nmessage_burst = 2\nrecipient_burst = 3\nrecipients_per_message = 2\n\
         [autoban]\nlimit_violations = 1\nprotocol_errors = 1\n\
         [blocklist]\nfiles = []\nallowlist_files = [{:?}]\n",
        allow.display().to_string()
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let mut raw = session(CLIENT, proxy.addr).await;
    for n in 0..4 {
        deliver(&mut raw, &format!("Subject: {n}\r\n\r\nhello\r\n")).await;
    }
    assert_eq!(sink.delivered(), 4);
    assert_eq!(
        proxy.metric(r#"mailmoat_rate_limit_hits_total{limit="message_rate"}"#),
        0.0
    );
    assert_eq!(
        proxy.metric(r#"mailmoat_rate_limit_hits_total{limit="recipient_rate"}"#),
        0.0
    );

    // The per-message cap is not a per-IP limit: it protects the receiver
    // and holds for everyone. Hitting it, or breaking the protocol, bans
    // no allowlisted client.
    assert_eq!(
        say(&mut raw, "MAIL FROM:<a@example.org>").await,
        "250 2.1.0 Ok\r\n"
    );
    for rcpt in ["one", "two"] {
        let reply = say(&mut raw, &format!("RCPT TO:<{rcpt}@example.net>")).await;
        assert_eq!(reply, "250 2.1.5 Ok\r\n");
    }
    assert_eq!(
        say(&mut raw, "RCPT TO:<three@example.net>").await,
        TOO_MANY_RECIPIENTS
    );
    raw.send(b"NOOP \x00\r\n").await;
    assert_eq!(raw.reply().await, "500 5.5.2 NUL byte in command line\r\n");
    assert_eq!(say(&mut raw, "RSET").await, "250 2.0.0 Ok\r\n");

    let (status, bans) = http_get(proxy.admin.unwrap(), "/admin/bans").await;
    assert_eq!(status, 200, "{bans}");
    assert!(!bans.contains(&CLIENT.to_string()), "{bans}");
}
