//! The SMTP-aware relay: legitimate mail arrives intact, pipelined replies
//! stay in order, and extensions the proxy cannot shape are hidden.

use std::net::Ipv4Addr;

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
