//! The client's side of a session: plain TCP, or TLS upgraded in place.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use super::CloseReason;
use crate::config::TlsMode;
use crate::metrics::Metrics;
use crate::tls::{HandshakeError, Terminator, TlsFacts};

/// A stream that first yields bytes already read from it (a TLS
/// ClientHello that arrived with a PROXY header, or before the door
/// decided), so the handshake sees them.
#[derive(Debug)]
pub struct Rewind<S> {
    unread: Vec<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        super::io::consume(&mut self.unread, n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a client's TLS did not start.
#[derive(Debug)]
pub struct TlsRefused {
    pub reason: CloseReason,
    /// The client's bytes broke the handshake: a protocol error of its own,
    /// toward a ban.
    pub client_fault: bool,
}

/// The client's stream as the driver reads and writes it.
pub enum Transport<S> {
    Plain(Rewind<S>),
    Tls(Box<TlsStream<Rewind<S>>>),
    /// A handshake failed or was abandoned: the stream is gone.
    Lost,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transport<S> {
    /// A plain stream whose first bytes are `unread`.
    pub fn plain(inner: S, unread: Vec<u8>) -> Self {
        Transport::Plain(Rewind { unread, inner })
    }

    /// Handshakes as the server (bounded by the terminator's deadline and
    /// its handshakes in flight) and goes on as TLS, unless `stop` comes
    /// first; counts the session by mode and version. On failure the
    /// stream is lost: the session ends.
    pub async fn start_tls(
        &mut self,
        terminator: &Terminator,
        mode: TlsMode,
        metrics: &Metrics,
        stop: impl Future<Output = CloseReason>,
    ) -> Result<TlsFacts, TlsRefused> {
        let Transport::Plain(plain) = std::mem::replace(self, Transport::Lost) else {
            return Err(TlsRefused {
                reason: CloseReason::TlsFailed,
                client_fault: false,
            });
        };
        let handshake = tokio::select! {
            done = terminator.accept(plain) => done,
            reason = stop => return Err(TlsRefused { reason, client_fault: false }),
        };
        match handshake {
            Ok((tls, facts)) => {
                *self = Transport::Tls(Box::new(tls));
                metrics.tls.session(mode, facts.version);
                Ok(facts)
            }
            Err(e) => {
                tracing::debug!(error = %e, "client TLS handshake failed");
                Err(TlsRefused {
                    reason: CloseReason::TlsFailed,
                    // A full server, or a deadline spent waiting for a
                    // slot, is not the client's doing: counting it toward
                    // a ban would let an attacker who holds the slots get
                    // honest senders banned.
                    client_fault: matches!(e, HandshakeError::Failed(_)),
                })
            }
        }
    }
}

fn lost() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "TLS handshake failed")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Transport<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Lost => Poll::Ready(Err(lost())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Transport<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Lost => Poll::Ready(Err(lost())),
        }
    }
}
