//! The receiver behind the proxies under measurement: a small SMTP server
//! that accepts every message and keeps nothing, run in a child copy of a
//! bench executable so its CPU is its own.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// PROXY v2's fixed 12-byte signature.
pub const PROXY_V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Two workers, as the proxies in front have two threads each.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Accepts forever, each connection served by `handle` in its own task,
/// for at most `session_limit`.
pub async fn accept_loop<F, Fut>(listener: TcpListener, session_limit: Duration, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors, most likely: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let session = handle(tcp);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(session_limit, session).await;
        });
    }
}

/// SMTP that accepts every message and discards it. With `proxy_header`,
/// a PROXY v2 header (its signature checked, its addresses skipped) must
/// come first, as a proxy sends it on connecting.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    proxy_header: bool,
) -> std::io::Result<()> {
    let mut s = BufReader::with_capacity(64 * 1024, stream);
    if proxy_header {
        let mut fixed = [0u8; 16];
        s.read_exact(&mut fixed).await?;
        if &fixed[..12] != PROXY_V2 {
            return Err(std::io::Error::other("no PROXY v2 header"));
        }
        let len = u16::from_be_bytes([fixed[14], fixed[15]]);
        let mut rest = vec![0u8; len.into()];
        s.read_exact(&mut rest).await?;
    }
    reply(&mut s, b"220 receiver.bench.test ESMTP\r\n").await?;
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        if s.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        match &verb[..] {
            b"EHLO" | b"HELO" => {
                reply(
                    &mut s,
                    b"250-receiver.bench.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                )
                .await?
            }
            b"DATA" => {
                reply(&mut s, b"354 go ahead\r\n").await?;
                loop {
                    line.clear();
                    if s.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                reply(&mut s, b"250 2.0.0 queued\r\n").await?
            }
            b"QUIT" => {
                reply(&mut s, b"221 2.0.0 bye\r\n").await?;
                return s.get_mut().shutdown().await;
            }
            _ => reply(&mut s, b"250 2.0.0 ok\r\n").await?,
        }
    }
}

async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    text: &[u8],
) -> std::io::Result<()> {
    let s = s.get_mut();
    s.write_all(text).await?;
    s.flush().await
}
