//! A whole relayed session between two in-memory pipes — the driver
//! running the SMTP module — where the test plays both the client and the
//! receiver, on paused time.

use std::future::Future;

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use std::time::Duration;

use tokio::time::Instant;

use super::driver::{Driver, DriverContext};
use super::registry::Stop;
use super::smtp::{Smtp, SmtpContext};
use super::transport::Transport;
use super::CloseReason;
use crate::config::{Config, TlsMode};
use crate::metrics::Metrics;
use crate::shaping::Shaping;

/// The test's ends of the pipes to the relay.
struct Pipes {
    client: DuplexStream,
    upstream: DuplexStream,
}

/// Runs a relay against `script`; returns why the relay ended and the
/// protocol errors it counted.
async fn relay_with<F>(script: impl FnOnce(Pipes) -> F) -> (CloseReason, u64)
where
    F: Future<Output = ()>,
{
    let (reason, metrics) = relay_configured("", script).await;
    (reason, metrics.protocol_errors.get())
}

/// Runs a relay with the config `toml` against `script`; returns why the
/// relay ended and its metrics.
async fn relay_configured<F>(
    toml: &str,
    script: impl FnOnce(Pipes) -> F,
) -> (CloseReason, std::sync::Arc<Metrics>)
where
    F: Future<Output = ()>,
{
    let config = Config::from_toml(toml, std::path::Path::new("test.toml")).expect("config");
    let metrics = std::sync::Arc::new(Metrics::new());
    let shaping = Shaping::detached(&config, &metrics);
    let stop = Stop::default();
    let (client, client_end) = duplex(64 * 1024);
    let (upstream, upstream_end) = duplex(64 * 1024);
    let ip = "192.0.2.1".parse().unwrap();
    let smtp = Smtp::new(
        SmtpContext {
            config: &config,
            metrics: &metrics,
            shaping: shaping.client(ip, false),
            client_ip: ip,
            tls_mode: TlsMode::Passthrough,
            require_tls: false,
            tls: None,
        },
        Instant::now(),
    );
    let ctx = DriverContext {
        config: &config,
        metrics: &metrics,
        terminator: None,
        tls_mode: TlsMode::Passthrough,
        stop: &stop,
        session_deadline: Instant::now() + config.timeouts.session,
    };
    let relay = async {
        // Dropped when it ends, so the script sees both pipes close.
        let client = Transport::plain(client, Vec::new());
        let mut relay = Driver::new(client, upstream, smtp, ctx, Vec::new(), Vec::new());
        relay.run().await
    };
    let pipes = Pipes {
        client: client_end,
        upstream: upstream_end,
    };
    let both = async { tokio::join!(relay, script(pipes)) };
    let (reason, ()) = tokio::time::timeout(Duration::from_secs(600), both)
        .await
        .expect("relay and script finish");
    (reason, metrics)
}

/// The per-message log records written while `f` runs, as JSON.
async fn message_records(f: impl Future<Output = ()>) -> Vec<serde_json::Value> {
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .finish();
    {
        // This test's thread only: the runtime is single-threaded.
        let _guard = tracing::subscriber::set_default(subscriber);
        f.await;
    }
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON log line"))
        .filter(|record| record["target"] == "mailmoat::message")
        .collect()
}

/// Reads exactly `expected.len()` bytes and checks them.
async fn expect_bytes(stream: &mut DuplexStream, expected: &[u8]) {
    let mut got = vec![0; expected.len()];
    stream.read_exact(&mut got).await.expect("read");
    assert_eq!(text(&got), text(expected));
}

/// Everything until the relay closes this pipe.
async fn rest(stream: &mut DuplexStream) -> Vec<u8> {
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.expect("read to end");
    rest
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Pipes {
    async fn greet(&mut self) {
        let greeting = b"220 mx.test ESMTP\r\n";
        self.upstream.write_all(greeting).await.unwrap();
        expect_bytes(&mut self.client, greeting).await;
    }

    /// The client hangs up first; the receiver's end stays open until the
    /// relay lets go of it.
    async fn client_hangs_up(self) {
        let Pipes {
            client,
            mut upstream,
        } = self;
        drop(client);
        rest(&mut upstream).await;
    }

    /// `command` reaches the receiver, whose `reply` reaches the client.
    async fn exchange(&mut self, command: &[u8], reply: &[u8]) {
        self.client.write_all(command).await.unwrap();
        expect_bytes(&mut self.upstream, command).await;
        self.upstream.write_all(reply).await.unwrap();
        expect_bytes(&mut self.client, reply).await;
    }
}

#[tokio::test(start_paused = true)]
async fn proxy_v2_signature_split_after_its_first_line_is_held_and_refused() {
    let header = crate::proxy_protocol::encode(
        crate::config::ProxyProtocol::V2,
        "203.0.113.9:4000".parse().unwrap(),
        "192.0.2.25:25".parse().unwrap(),
        None,
    );
    let (reason, errors) = relay_with(|mut p| async move {
        p.greet().await;
        p.client.write_all(&header[..2]).await.unwrap();
        // Paused time advances only once the relay has done all it can
        // with the first segment.
        tokio::time::sleep(Duration::from_millis(10)).await;
        p.client.write_all(&header[2..]).await.unwrap();
        let reply = text(&rest(&mut p.client).await);
        assert!(reply.starts_with("554 5.7.1 "), "{reply:?}");
        assert_eq!(
            text(&rest(&mut p.upstream).await),
            "",
            "part of the header reached the receiver"
        );
    })
    .await;
    assert_eq!(reason, CloseReason::ProtocolError);
    assert_eq!(errors, 1);
}

#[tokio::test(start_paused = true)]
async fn a_lone_blank_first_line_is_held_only_until_the_line_timeout() {
    let (reason, _) = relay_with(|mut p| async move {
        p.greet().await;
        p.client.write_all(b"\r\n").await.unwrap();
        let reply = text(&rest(&mut p.client).await);
        assert!(reply.starts_with("421 4.4.2 "), "{reply:?}");
        assert_eq!(text(&rest(&mut p.upstream).await), "");
    })
    .await;
    assert_eq!(reason, CloseReason::LineTimeout);
}

#[tokio::test(start_paused = true)]
async fn plaintext_injected_after_starttls_is_a_protocol_error() {
    let (reason, errors) = relay_with(|mut p| async move {
        p.greet().await;
        p.client
            .write_all(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
            .await
            .unwrap();
        expect_bytes(&mut p.upstream, b"STARTTLS\r\n").await;
        p.upstream
            .write_all(b"220 2.0.0 go ahead\r\n")
            .await
            .unwrap();
        assert_eq!(
            text(&rest(&mut p.upstream).await),
            "",
            "injection reached the receiver"
        );
        // The client is not told to start TLS over a stream it tampered with.
        assert_eq!(text(&rest(&mut p.client).await), "");
    })
    .await;
    assert_eq!(reason, CloseReason::ProtocolError);
    assert_eq!(errors, 1);
}

#[tokio::test(start_paused = true)]
async fn after_starttls_bytes_pass_through_opaquely() {
    let (reason, errors) = relay_with(|mut p| async move {
        p.greet().await;
        p.client.write_all(b"STARTTLS\r\n").await.unwrap();
        expect_bytes(&mut p.upstream, b"STARTTLS\r\n").await;
        // The receiver's TLS may follow its 220 in the same segment.
        let accepted = b"220 2.0.0 go ahead\r\n\x16\x03\x01server";
        p.upstream.write_all(accepted).await.unwrap();
        expect_bytes(&mut p.client, accepted).await;
        // Nothing is read as SMTP any more: not BDAT, not a bare-LF dot.
        let tls = b"\x16\x03\x01\x00\xffBDAT 5\r\nx\n.\r\n\x00";
        p.client.write_all(tls).await.unwrap();
        expect_bytes(&mut p.upstream, tls).await;
        p.upstream.write_all(b"\x17\x03\x03reply").await.unwrap();
        expect_bytes(&mut p.client, b"\x17\x03\x03reply").await;
        p.client_hangs_up().await;
    })
    .await;
    assert_eq!(reason, CloseReason::ClientClosed);
    assert_eq!(errors, 0);
}

#[tokio::test(start_paused = true)]
async fn bdat_is_refused_and_ends_the_session() {
    let (reason, errors) = relay_with(|mut p| async move {
        p.greet().await;
        p.client
            .write_all(b"BDAT 10 LAST\r\n0123456789")
            .await
            .unwrap();
        let reply = text(&rest(&mut p.client).await);
        assert!(reply.starts_with("503 5.5.1 "), "{reply:?}");
        assert_eq!(
            text(&rest(&mut p.upstream).await),
            "",
            "BDAT reached the receiver"
        );
    })
    .await;
    assert_eq!(reason, CloseReason::ProtocolError);
    assert_eq!(errors, 1);
}

#[tokio::test(start_paused = true)]
async fn bare_lf_dot_in_data_closes_without_the_end_marker() {
    let (reason, errors) = relay_with(|mut p| async move {
        p.greet().await;
        p.exchange(b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n")
            .await;
        p.exchange(b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n").await;
        p.exchange(b"DATA\r\n", b"354 go ahead\r\n").await;
        let smuggled = b"Subject: s\r\n\r\nhi\n.\r\nMAIL FROM:<evil@x>\r\n";
        p.client.write_all(smuggled).await.unwrap();
        let reply = text(&rest(&mut p.client).await);
        assert!(reply.starts_with("421 "), "{reply:?}");
        let forwarded = text(&rest(&mut p.upstream).await);
        assert!(!forwarded.contains("\n.\r\n"), "{forwarded:?}");
        assert!(!forwarded.contains("evil"), "{forwarded:?}");
    })
    .await;
    assert_eq!(reason, CloseReason::ProtocolError);
    assert_eq!(errors, 1);
}

#[tokio::test(start_paused = true)]
async fn over_long_line_is_refused_and_the_session_continues() {
    let (reason, errors) = relay_with(|mut p| async move {
        p.greet().await;
        let long = format!("NOOP {}\r\n", "x".repeat(3000));
        p.client.write_all(long.as_bytes()).await.unwrap();
        expect_bytes(&mut p.client, b"500 5.5.2 line too long\r\n").await;
        // The receiver never saw the long line: NOOP is the next it reads.
        p.exchange(b"NOOP\r\n", b"250 2.0.0 Ok\r\n").await;
        p.exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
        assert_eq!(text(&rest(&mut p.client).await), "");
        assert_eq!(text(&rest(&mut p.upstream).await), "");
    })
    .await;
    assert_eq!(reason, CloseReason::ClientQuit);
    assert_eq!(errors, 1);
}

#[tokio::test(start_paused = true)]
async fn pipelined_messages_are_each_logged_with_their_own_facts() {
    let first = b"Subject: 1\r\n\r\none\r\n";
    let second = b"Subject: 2\r\n\r\nthe second\r\n";
    let records = message_records(async {
        let (reason, _) = relay_configured("", |mut p| async move {
            p.greet().await;
            let batch = b"MAIL FROM:<alice@a.example>\r\nRCPT TO:<x@b.example>\r\n\
                RCPT TO:<y@b.example>\r\nDATA\r\n";
            p.exchange(
                batch,
                b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n",
            )
            .await;
            // The next transaction is pipelined behind the end of data:
            // the receiver has not accepted alice's message yet when
            // bob's MAIL is read.
            let batch = [
                &first[..],
                b".\r\nMAIL FROM:<bob@a.example>\r\nRCPT TO:<z@b.example>\r\nDATA\r\n",
            ]
            .concat();
            p.exchange(
                &batch,
                b"250 2.0.0 queued 1\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n",
            )
            .await;
            let batch = [&second[..], b".\r\nQUIT\r\n"].concat();
            p.exchange(&batch, b"250 2.0.0 queued 2\r\n221 2.0.0 Bye\r\n")
                .await;
            assert_eq!(text(&rest(&mut p.client).await), "");
        })
        .await;
        assert_eq!(reason, CloseReason::ClientQuit);
    })
    .await;
    let facts: Vec<_> = records
        .iter()
        .map(|r| {
            let f = &r["fields"];
            (
                f["mail_from"].as_str().unwrap().to_owned(),
                f["recipients"].as_u64().unwrap(),
                f["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        facts,
        [
            ("alice@a.example".to_owned(), 2, first.len() as u64),
            ("bob@a.example".to_owned(), 1, second.len() as u64),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn recipient_reply_after_rset_counts_for_its_own_transaction() {
    let records = message_records(async {
        relay_configured("", |mut p| async move {
            p.greet().await;
            // All pipelined: the replies to the first transaction come
            // after the client has moved on to the second.
            let batch = b"MAIL FROM:<old@a.example>\r\nRCPT TO:<x@b.example>\r\nRSET\r\n\
                MAIL FROM:<new@a.example>\r\nRCPT TO:<y@b.example>\r\nDATA\r\n";
            let replies = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n\
                250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n354 go\r\n";
            p.exchange(batch, replies).await;
            p.exchange(b"hi\r\n.\r\n", b"250 2.0.0 queued\r\n").await;
        })
        .await;
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["fields"]["mail_from"], "new@a.example");
    assert_eq!(records[0]["fields"]["recipients"], 0);
}

#[tokio::test(start_paused = true)]
async fn receiver_that_stops_reading_mid_data_gets_the_client_a_451() {
    let toml = "[server]\nhostname = \"mx.proxy\"\n[timeouts]\nwrite = \"5s\"\n";
    let (reason, _) = relay_configured(toml, |mut p| async move {
        p.greet().await;
        p.exchange(b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n")
            .await;
        p.exchange(b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n").await;
        p.exchange(b"DATA\r\n", b"354 go ahead\r\n").await;
        // Far more than the pipes hold: the relay's writes to the
        // receiver, which reads no more, run out of time.
        let line = [b'x'; 998];
        for _ in 0..1024 {
            if p.client.write_all(&line).await.is_err() {
                break;
            }
            if p.client.write_all(b"\r\n").await.is_err() {
                break;
            }
        }
        let _ = p.client.write_all(b".\r\n").await;
        assert_eq!(
            text(&rest(&mut p.client).await),
            "451 4.4.2 mx.proxy receiver failed during the message, try again later\r\n"
        );
    })
    .await;
    assert_eq!(reason, CloseReason::UpstreamError);
}

#[tokio::test(start_paused = true)]
async fn nul_in_a_command_line_is_refused_and_never_forwarded() {
    let (reason, errors) = relay_with(|mut p| async move {
        p.greet().await;
        p.client
            .write_all(b"MAIL FROM:<a@b>\x00\r\nRCPT TO:<evil@x>\r\n")
            .await
            .unwrap();
        expect_bytes(&mut p.client, b"500 5.5.2 NUL byte in command line\r\n").await;
        expect_bytes(&mut p.upstream, b"RCPT TO:<evil@x>\r\n").await;
        p.upstream
            .write_all(b"503 5.5.1 need MAIL\r\n")
            .await
            .unwrap();
        expect_bytes(&mut p.client, b"503 5.5.1 need MAIL\r\n").await;
        p.exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
        assert_eq!(text(&rest(&mut p.upstream).await), "");
    })
    .await;
    assert_eq!(reason, CloseReason::ClientQuit);
    assert_eq!(errors, 1);
}

#[tokio::test(start_paused = true)]
async fn nul_in_a_sasl_response_cancels_the_exchange() {
    let (reason, errors) = relay_with(|mut p| async move {
        p.greet().await;
        p.exchange(b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n").await;
        p.client.write_all(b"dXNlcg\x00==\r\n").await.unwrap();
        // The receiver gets SASL's cancel, and its answer is the client's.
        expect_bytes(&mut p.upstream, b"*\r\n").await;
        p.upstream
            .write_all(b"501 5.7.0 cancelled\r\n")
            .await
            .unwrap();
        expect_bytes(&mut p.client, b"501 5.7.0 cancelled\r\n").await;
        p.exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    })
    .await;
    assert_eq!(reason, CloseReason::ClientQuit);
    assert_eq!(errors, 1);
}

#[tokio::test(start_paused = true)]
async fn smtpsmug_nul_endings_close_without_reaching_the_receiver() {
    for ending in [&b"\r\n\x00.\r\n"[..], b"\r\n.\x00\r\n"] {
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            p.exchange(b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n")
                .await;
            p.exchange(b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n").await;
            p.exchange(b"DATA\r\n", b"354 go ahead\r\n").await;
            let smuggled = [
                &b"Subject: s\r\n\r\nhi"[..],
                ending,
                b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n.\r\n",
            ]
            .concat();
            p.client.write_all(&smuggled).await.unwrap();
            assert_eq!(
                text(&rest(&mut p.client).await),
                "554 5.6.0 NUL byte in message content, closing\r\n"
            );
            let forwarded = rest(&mut p.upstream).await;
            assert!(!forwarded.contains(&0), "{:?}", text(&forwarded));
            assert!(!text(&forwarded).contains("evil"), "{:?}", text(&forwarded));
        })
        .await;
        assert_eq!(reason, CloseReason::ProtocolError, "{ending:?}");
        assert_eq!(errors, 1, "{ending:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_counts_a_message_over_the_rate_and_refuses_nothing() {
    let toml = "[server]\nshadow = true\n[limits]\nmessage_burst = 1\nrecipients_per_message = 1\n";
    let (reason, metrics) = relay_configured(toml, |mut p| async move {
        p.greet().await;
        for _ in 0..2 {
            p.exchange(b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n")
                .await;
            p.exchange(b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n").await;
            p.exchange(b"RCPT TO:<e@f>\r\n", b"250 2.1.5 Ok\r\n").await;
            p.exchange(b"RSET\r\n", b"250 2.0.0 Ok\r\n").await;
        }
        p.exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    })
    .await;
    assert_eq!(reason, CloseReason::ClientQuit);
    let text = metrics.render();
    for line in [
        r#"mailmoat_rate_limit_hits_total{limit="message_rate"} 1"#,
        r#"mailmoat_message_cap_hits_total{cap="recipients_per_message"} 2"#,
        r#"mailmoat_messages_refused_total{limit="message_rate"} 0"#,
        r#"mailmoat_recipients_refused_total{limit="recipients_per_message"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn every_byte_relayed_is_counted_once_the_session_ends() {
    let greeting = b"220 mx.test ESMTP\r\n";
    let accepted = b"220 2.0.0 go ahead\r\n";
    let opaque = vec![0x17u8; 40_000];
    let sent = opaque.clone();
    let (reason, metrics) = relay_configured("", |mut p| async move {
        p.greet().await;
        p.exchange(b"STARTTLS\r\n", accepted).await;
        // Over two of the driver's reporting batches, then a remainder.
        p.client.write_all(&sent).await.unwrap();
        expect_bytes(&mut p.upstream, &sent).await;
        p.upstream.write_all(b"\x17\x03\x03reply").await.unwrap();
        expect_bytes(&mut p.client, b"\x17\x03\x03reply").await;
        p.client_hangs_up().await;
    })
    .await;
    assert_eq!(reason, CloseReason::ClientClosed);
    let from_client = b"STARTTLS\r\n".len() + opaque.len();
    let to_client = greeting.len() + accepted.len() + b"\x17\x03\x03reply".len();
    assert_eq!(metrics.bytes_from_client.get(), from_client as u64);
    assert_eq!(metrics.bytes_to_client.get(), to_client as u64);
}
