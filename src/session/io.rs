//! Buffer-lean socket I/O for sessions.
//!
//! An idle session must cost almost nothing (SPEC: 3 KiB waiting for its
//! greeting, 16 KiB relayed), so no read buffer lives in the session between
//! reads: each read lands in its worker thread's read buffer, and only the
//! bytes that arrived are appended to the session's buffer, which is freed
//! once consumed. (Reading straight into a session buffer reserved for the
//! largest read, then trimmed, cost a large allocation and a reallocation
//! per read: a sixth of mailmoat's user time per transaction.)

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Bytes per read outside a message.
pub const READ_CHUNK: usize = 16 * 1024;
/// Bytes per read while a message streams: fewer, larger writes to the
/// receiver, so fewer wakeups on both sides.
pub const BULK_READ: usize = 64 * 1024;

thread_local! {
    /// The worker thread's read buffer, zeroed once: reads borrow it only
    /// inside one poll, never across an await.
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; BULK_READ].into_boxed_slice());
}

/// Reads what is available into `buf` (one read, up to 16 KiB); `Ok(0)` is
/// end of stream. Cancel-safe: nothing is consumed unless it is appended.
pub async fn read_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    let mut reader = Pin::new(reader);
    poll_fn(|cx| {
        READ_BUFFER.with_borrow_mut(|scratch| {
            let mut read = ReadBuf::new(&mut scratch[..READ_CHUNK]);
            match reader.as_mut().poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(read.filled());
                    Poll::Ready(Ok(read.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

/// Reads what is available into `buf`, up to `max` bytes in as many reads
/// as are ready without waiting (a TLS stream yields one record per read);
/// `Ok(0)` is end of stream. An error that follows bytes is kept in
/// `deferred` and returned by the next call, so the bytes before it are
/// handled first, as with one read at a time. Cancel-safe, like
/// [`read_into`].
pub async fn read_bulk_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    deferred: &mut Option<io::Error>,
) -> io::Result<usize> {
    if let Some(e) = deferred.take() {
        return Err(e);
    }
    let mut reader = Pin::new(reader);
    let max = max.min(BULK_READ);
    poll_fn(|cx| {
        READ_BUFFER.with_borrow_mut(|scratch| {
            let mut read = ReadBuf::new(&mut scratch[..max]);
            let ready = read_ready(reader.as_mut(), cx, &mut read, deferred);
            buf.extend_from_slice(read.filled());
            ready
        })
    })
    .await
}

/// Fills `read` with what is ready, in as many reads as that takes.
fn read_ready<R: AsyncRead>(
    mut reader: Pin<&mut R>,
    cx: &mut Context<'_>,
    read: &mut ReadBuf<'_>,
    deferred: &mut Option<io::Error>,
) -> Poll<io::Result<usize>> {
    while read.remaining() > 0 {
        let before = read.filled().len();
        match reader.as_mut().poll_read(cx, read) {
            Poll::Ready(Ok(())) if read.filled().len() == before => break,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) if before == 0 => return Poll::Ready(Err(e)),
            Poll::Ready(Err(e)) => {
                *deferred = Some(e);
                break;
            }
            Poll::Pending if before == 0 => return Poll::Pending,
            Poll::Pending => break,
        }
    }
    Poll::Ready(Ok(read.filled().len()))
}

/// Drops the first `n` bytes; frees the allocation once nothing is left.
pub fn consume(buf: &mut Vec<u8>, n: usize) {
    if n >= buf.len() {
        *buf = Vec::new();
    } else {
        buf.drain(..n);
    }
}

#[derive(Debug)]
pub enum WriteError {
    TimedOut,
    Io(io::Error),
}

/// Polls `future` once: its output if it is ready, `Pending` if not.
pub async fn poll_once<F: Future>(future: F) -> Poll<F::Output> {
    let mut future = pin!(future);
    poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
}

/// Writes all of `bytes` within `deadline`, then frees them.
///
/// The deadline's timer is armed only when the socket does not take the
/// bytes at once, as it almost always does: a timer per write was a timer
/// registered and removed for nearly every reply and chunk relayed.
pub async fn write_all_within<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &mut Vec<u8>,
    deadline: Duration,
) -> Result<usize, WriteError> {
    if bytes.is_empty() {
        return Ok(0);
    }
    let n = bytes.len();
    // A TLS stream holds what it encrypted until flushed.
    let mut write = pin!(async {
        writer.write_all(bytes).await?;
        writer.flush().await
    });
    let written = match poll_once(write.as_mut()).await {
        Poll::Ready(written) => written,
        // Boxed: the timer is large, and every session's future would
        // carry it for a wait that is rare.
        Poll::Pending => match Box::pin(tokio::time::timeout(deadline, write)).await {
            Ok(written) => written,
            Err(_) => return Err(WriteError::TimedOut),
        },
    };
    match written {
        Ok(()) => {
            *bytes = Vec::new();
            Ok(n)
        }
        Err(e) => Err(WriteError::Io(e)),
    }
}
