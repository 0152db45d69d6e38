//! The SMTP-aware relay: legitimate mail arrives intact, pipelined replies
//! stay in order, and extensions the proxy cannot shape are hidden.

use std::net::Ipv4Addr;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[tokio::test]
async fn message_from_127_0_0_2_reaches_the_receiver_intact() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let body = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n";
    send_mail(
        CLIENT,
        proxy.addr,
        "a@example.org",
        &["b@example.net"],
        body,
    )
    .await
    .unwrap();
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].mail_from, "a@example.org");
    assert_eq!(messages[0].rcpt_to, ["b@example.net"]);
    // lettre always writes CRLF before the end marker, even after a final CRLF.
    assert_eq!(messages[0].data, [&body[..], b"\r\n"].concat());
}

#[tokio::test]
async fn dot_stuffed_lines_pass_through_unchanged() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n...\r\nlast . line\r\n";
    send_mail(
        CLIENT,
        proxy.addr,
        "a@example.org",
        &["b@example.net"],
        body,
    )
    .await
    .unwrap();
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].data, [&body[..], b"\r\n"].concat());
}

#[tokio::test]
async fn five_mib_message_reaches_the_receiver_intact() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let body = big_message(5 * 1024 * 1024);
    send_mail(
        CLIENT,
        proxy.addr,
        "a@example.org",
        &["b@example.net"],
        &body,
    )
    .await
    .unwrap();
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0].data == [&body[..], b"\r\n"].concat(),
        "message altered in transit"
    );
}

#[tokio::test]
async fn pipelined_replies_arrive_in_command_order() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let mut raw = Raw::connect(CLIENT, proxy.addr).await;
    raw.expect("220 ").await;
    raw.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
        .await;
    let ehlo = raw.expect("250-").await;
    assert!(ehlo.contains("\r\n250-PIPELINING\r\n"), "{ehlo}");
    assert_eq!(raw.reply().await, "250 2.1.0 Ok\r\n");
    assert_eq!(raw.reply().await, "250 2.1.5 Ok\r\n");
    assert_eq!(raw.reply().await, "250 2.1.5 Ok\r\n");
    raw.expect("354 ").await;
    raw.send(b"Subject: p\r\n\r\nhello\r\n.\r\nQUIT\r\n").await;
    assert_eq!(raw.reply().await, "250 2.0.0 Ok: queued\r\n");
    raw.expect("221 ").await;
    assert_eq!(raw.closed().await, "");

    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpt_to, ["c@d", "e@f"]);
    assert_eq!(messages[0].data, b"Subject: p\r\n\r\nhello\r\n");
}

#[tokio::test]
async fn chunking_is_not_advertised_through_the_proxy() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let mut raw = Raw::connect(CLIENT, proxy.addr).await;
    raw.expect("220 ").await;
    raw.send(b"EHLO x\r\n").await;
    let ehlo = raw.reply().await;
    let lines: Vec<&str> = ehlo.split_inclusive("\r\n").collect();
    let (last, rest) = lines.split_last().unwrap();
    assert!(rest.iter().all(|l| l.starts_with("250-")), "{ehlo}");
    assert_eq!(*last, "250 ENHANCEDSTATUSCODES\r\n");
    assert!(!ehlo.to_ascii_uppercase().contains("CHUNKING"), "{ehlo}");
    assert!(ehlo.contains("250-PIPELINING\r\n"), "{ehlo}");
}

/// A receiver that answers until DATA's 354, then reads nothing more (its
/// receive buffer as small as the kernel allows), holding the connection
/// until `release` is cancelled. It expects no PROXY header, and answers
/// mailmoat's receiver check (`QUIT`) on its own connections.
async fn stalling_receiver(release: CancellationToken) -> std::net::SocketAddr {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(8).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(stall(BufReader::new(stream), release.clone()));
        }
    });
    addr
}

async fn stall(mut stream: BufReader<tokio::net::TcpStream>, release: CancellationToken) {
    if stream
        .get_mut()
        .write_all(b"220 stalled.test ESMTP\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-stalled.test\r\n250 PIPELINING\r\n",
            "DATA" => b"354 go ahead\r\n",
            "QUIT" => b"221 2.0.0 Bye\r\n",
            _ => b"250 2.0.0 Ok\r\n",
        };
        if stream.get_mut().write_all(reply).await.is_err() || reply.starts_with(b"221") {
            return;
        }
        if reply.starts_with(b"354") {
            break;
        }
    }
    release.cancelled().await;
}

#[tokio::test]
async fn receiver_that_stops_reading_during_data_gets_the_client_a_451_not_a_reset() {
    let release = CancellationToken::new();
    let receiver = stalling_receiver(release.clone()).await;
    let toml = "[server]\nhostname = \"mx.proxy\"\n[timeouts]\nwrite = \"1s\"\n\
                [limits]\nmax_message_size = \"64MiB\"\n[upstream]\nproxy_protocol = \"off\"\n";
    let proxy = TestProxy::start(toml, &[receiver]).await;
    let mut raw = session(CLIENT, proxy.addr).await;
    raw.send(b"MAIL FROM:<a@b>\r\n").await;
    raw.expect("250 ").await;
    raw.send(b"RCPT TO:<c@d>\r\n").await;
    raw.expect("250 ").await;
    raw.send(b"DATA\r\n").await;
    raw.expect("354 ").await;
    // Far more than the socket buffers between the proxy and the receiver
    // hold: the proxy's writes to the receiver run out of time mid-message.
    let mut message = big_message(16 * 1024 * 1024);
    message.extend_from_slice(b".\r\n");
    let sent = raw.try_send(&message).await;
    assert!(
        sent.is_ok(),
        "the client was cut off while sending: {sent:?}"
    );
    assert_eq!(
        raw.reply().await,
        "451 4.4.2 mx.proxy receiver failed during the message, try again later\r\n"
    );
    assert_eq!(raw.closed().await, "");
    drop(raw);
    proxy
        .wait_metric(
            r#"mailmoat_sessions_closed_total{reason="upstream_error"}"#,
            1.0,
        )
        .await;
    release.cancel();
}

#[tokio::test]
async fn smtpsmug_nul_endings_never_reach_the_receiver() {
    let sink = sink().await;
    let proxy = TestProxy::start("[autoban]\nprotocol_errors = 0\n", &[sink.addr()]).await;
    // hannob/smtpsmug's two endings that a NUL-stripping receiver would
    // take for the end of data, each followed by a forged message.
    for (n, ending) in [&b"\r\n\x00.\r\n"[..], b"\r\n.\x00\r\n"]
        .into_iter()
        .enumerate()
    {
        let mut raw = session(CLIENT, proxy.addr).await;
        raw.send(b"MAIL FROM:<a@example.org>\r\n").await;
        raw.expect("250 ").await;
        raw.send(b"RCPT TO:<b@example.net>\r\n").await;
        raw.expect("250 ").await;
        raw.send(b"DATA\r\n").await;
        raw.expect("354 ").await;
        let smuggled = [
            &b"Subject: s\r\n\r\nhi"[..],
            ending,
            b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\n\
              Subject: forged\r\n\r\nforged\r\n.\r\n",
        ]
        .concat();
        raw.send(&smuggled).await;
        assert_eq!(
            raw.reply().await,
            "554 5.6.0 NUL byte in message content, closing\r\n"
        );
        assert_eq!(raw.closed().await, "");
        let errors = (n + 1) as f64;
        proxy
            .wait_metric("mailmoat_protocol_errors_total", errors)
            .await;
        assert_eq!(proxy.metric("mailmoat_protocol_errors_total"), errors);
    }
    assert!(wait_for(|| sink.active() == 0).await);
    assert_eq!(sink.delivered(), 0, "{:?}", sink.messages());
}
