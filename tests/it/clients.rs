//! Clients for the admission and attack tests: exact metric reads, temp
//! list files, PROXY-header senders and a slowloris attacker. Kept apart
//! from `harness.rs` so the two can change independently.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mailmoat::config::ProxyProtocol;
use mailmoat::sink::{Sink, SinkOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

/// The value of `series` in the proxy's rendered registry. Panics when the
/// series is not exposed at all, so a misspelt name cannot pass as zero.
pub fn counted(proxy: &TestProxy, series: &str) -> f64 {
    let text = proxy.metrics.render();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{series} is not exposed; metrics:\n{text}"))
}

/// Waits until `series` equals `value` exactly (gauges that fall).
pub async fn wait_exactly(proxy: &TestProxy, series: &str, value: f64) {
    let ok = wait_for(|| counted(proxy, series) == value).await;
    assert!(
        ok,
        "{series} never became {value}; metrics:\n{}",
        proxy.metrics.render()
    );
}

/// A file under the system temp dir with a name of its own, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(name: &str, text: &str) -> TempFile {
        let path = unique_temp_path(name);
        std::fs::write(&path, text).expect("write temp file");
        TempFile(path)
    }

    /// The path as a TOML string literal.
    pub fn toml(&self) -> String {
        format!("{:?}", self.0.to_str().expect("temp path is UTF-8"))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A client from `ip` that got the receiver's complete `220 ` banner.
pub async fn admitted(ip: Ipv4Addr, addr: SocketAddr) -> Raw {
    let mut raw = Raw::connect(ip, addr).await;
    raw.expect("220 ").await;
    raw
}

/// A bare socket from `ip` that has read the receiver's `220 ` banner, for
/// tests that need the socket itself (to reset it).
pub async fn admitted_socket(ip: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let mut stream = connect_from(ip, addr).await;
    let mut banner = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !banner.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        match timeout_at(deadline, stream.read(&mut byte)).await {
            Ok(Ok(1)) => banner.push(byte[0]),
            other => panic!("no banner ({other:?}) after {banner:?}"),
        }
    }
    assert!(
        banner.starts_with(b"220 "),
        "{:?}",
        String::from_utf8_lossy(&banner)
    );
    stream
}

/// Everything the proxy says to a client from `ip` before it closes.
pub async fn refusal(ip: Ipv4Addr, addr: SocketAddr) -> String {
    Raw::connect(ip, addr).await.closed().await
}

/// A connection from the trusted proxy 127.0.0.1 whose PROXY `version`
/// header says `client` is connecting.
pub async fn proxied(version: ProxyProtocol, client: SocketAddr, addr: SocketAddr) -> Raw {
    let mut raw = Raw::connect(Ipv4Addr::LOCALHOST, addr).await;
    raw.send(&mailmoat::proxy_protocol::encode(
        version, client, addr, None,
    ))
    .await;
    raw
}

/// One SMTP transaction over a client that has its banner; the receiver
/// must accept every step.
pub async fn deliver(raw: &mut Raw, from: &str, to: &str, body: &str) {
    raw.send(b"EHLO client.test\r\n").await;
    raw.expect("250").await;
    raw.send(format!("MAIL FROM:<{from}>\r\n").as_bytes()).await;
    raw.expect("250 ").await;
    raw.send(format!("RCPT TO:<{to}>\r\n").as_bytes()).await;
    raw.expect("250 ").await;
    raw.send(b"DATA\r\n").await;
    raw.expect("354 ").await;
    raw.send(format!("{body}\r\n.\r\n").as_bytes()).await;
    raw.expect("250 ").await;
    raw.send(b"QUIT\r\n").await;
    raw.expect("221 ").await;
}

/// A runtime of its own, like a separate process: the receiver or the
/// attackers, so their tasks do not queue behind the proxy's (or the
/// proxy's behind theirs) as they would in one runtime.
pub struct Apart(Option<Runtime>);

impl Apart {
    pub fn new(name: &str) -> Apart {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("runtime");
        Apart(Some(runtime))
    }

    pub fn handle(&self) -> &Handle {
        self.0.as_ref().expect("running").handle()
    }

    /// A sink whose tasks run on this runtime.
    pub async fn sink(&self, options: SinkOptions) -> Sink {
        let bind = "127.0.0.1:0".parse().unwrap();
        self.handle()
            .spawn(Sink::start(bind, options))
            .await
            .expect("sink starts")
            .expect("sink binds")
    }
}

impl Drop for Apart {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// How one attacker socket's life ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The proxy answered (`421`, a timeout) and closed.
    ClosedByProxy,
    /// The attack was called off, or its time ran out, while still open.
    Stopped,
    /// The connection could not even be made.
    ConnectFailed,
}

/// A slowloris socket from `ip`: sends `line` (which has no line end) one
/// byte every `pace` until the proxy closes the connection, the line is
/// used up, `stop` fires or `until` passes. Connects holding a permit of
/// `opening`, which bounds how many sockets are being opened at once.
pub async fn trickle(
    ip: Ipv4Addr,
    addr: SocketAddr,
    opening: &Semaphore,
    line: &[u8],
    pace: Duration,
    stop: &CancellationToken,
    until: Instant,
) -> Ended {
    let connect = async {
        let _permit = opening.acquire().await.expect("semaphore open");
        let socket = TcpSocket::new_v4()?;
        socket.bind((ip, 0).into())?;
        socket.connect(addr).await
    };
    let connect = tokio::select! {
        () = stop.cancelled() => return Ended::Stopped,
        connect = timeout_at(until, connect) => connect,
    };
    let Ok(Ok(mut stream)) = connect else {
        return Ended::ConnectFailed;
    };
    let mut scratch = [0u8; 512];
    let mut bytes = line.iter();
    let mut next_byte = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            () = tokio::time::sleep_until(until) => return Ended::Stopped,
            read = stream.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return Ended::ClosedByProxy,
                Ok(_) => {}
            },
            () = tokio::time::sleep_until(next_byte) => {
                let Some(byte) = bytes.next() else {
                    return Ended::Stopped;
                };
                if stream.write_all(&[*byte]).await.is_err() {
                    return Ended::ClosedByProxy;
                }
                next_byte += pace;
            }
        }
    }
}
