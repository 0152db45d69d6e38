//! Buffer-lean socket I/O for sessions.
//!
//! An idle session must cost almost nothing (SPEC: 3 KiB waiting for its
//! greeting, 16 KiB relayed), so no read buffer lives in the session between
//! reads: each read lands in a stack buffer for the length of one poll and
//! only the bytes that arrived are copied to the heap, and a buffer that has
//! been consumed is freed.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Bytes per read; lives on the stack only while a read is polled.
const READ_CHUNK: usize = 16 * 1024;

/// Reads what is available into `buf`; `Ok(0)` is end of stream.
/// Cancel-safe: nothing is consumed unless it is appended.
pub async fn read_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut chunk = [0u8; READ_CHUNK];
        let mut read_buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut *reader).poll_read(cx, &mut read_buf))?;
        buf.extend_from_slice(read_buf.filled());
        Poll::Ready(Ok(read_buf.filled().len()))
    })
    .await
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

/// Writes all of `bytes` within `deadline`, then frees them.
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
    let write = async {
        writer.write_all(bytes).await?;
        writer.flush().await
    };
    match tokio::time::timeout(deadline, write).await {
        Ok(Ok(())) => {
            *bytes = Vec::new();
            Ok(n)
        }
        Ok(Err(e)) => Err(WriteError::Io(e)),
        Err(_) => Err(WriteError::TimedOut),
    }
}
