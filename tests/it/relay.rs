//! The SMTP-aware relay: legitimate mail arrives intact.

use std::net::Ipv4Addr;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[tokio::test]
async fn message_from_127_0_0_2_reaches_the_receiver_intact() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let body = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n";
    send_mail(CLIENT, proxy.addr, "a@example.org", &["b@example.net"], body).await.unwrap();
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].mail_from, "a@example.org");
    assert_eq!(messages[0].rcpt_to, ["b@example.net"]);
    // lettre always writes CRLF before the end marker, even after a final CRLF.
    assert_eq!(messages[0].data, [&body[..], b"\r\n"].concat());
}
