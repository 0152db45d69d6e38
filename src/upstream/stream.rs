//! The connection to the receiver: plain TCP, or TLS after mailmoat's own
//! STARTTLS. One type, so the relay reads and writes either alike.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// How long [`close`] waits for the receiver to close.
pub const UPSTREAM_LINGER: Duration = Duration::from_secs(2);

/// Plain TCP (`Left`), or TLS after mailmoat's own STARTTLS (`Right`);
/// tokio-util's `Either` reads and writes either alike.
pub type UpstreamStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Closes the connection to the receiver and waits, briefly, for the
/// receiver to close its side too. The session's permit is released only
/// after this, so the caps bound the sessions the receiver holds, not just
/// ours: without the wait, a capped client cut off (say by the line
/// timeout) could be replaced by its next connection before the receiver
/// had noticed the first one close, and a receiver with exactly enough
/// slots for the caps would turn legitimate clients away.
pub async fn close(mut stream: UpstreamStream) {
    let linger = async {
        // TLS: close_notify first, then the TCP half-close.
        let _ = stream.shutdown().await;
        let mut discard = [0u8; 512];
        while let Ok(1..) = stream.read(&mut discard).await {}
    };
    let _ = tokio::time::timeout(UPSTREAM_LINGER, linger).await;
}
