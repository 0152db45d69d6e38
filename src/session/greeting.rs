//! The greet pause (postscreen's pregreet test): send the first line of a
//! multi-line banner, `220-`, and wait. SMTP clients must wait for the whole
//! banner; spam bots that talk first give themselves away. The receiver's
//! own banner later completes ours, so a patient client sees one reply.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;

use super::io::{read_into, write_all_within};

pub enum GreetOutcome {
    Patient,
    /// The client sent bytes before the banner was complete (kept, in case
    /// shadow mode lets it through).
    EarlyTalker,
    Gone,
}

/// Sends `220-` and waits `pause`; `early` collects anything the client says.
pub async fn greet_pause<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    hostname: &str,
    pause: Duration,
    write: Duration,
    early: &mut Vec<u8>,
) -> GreetOutcome {
    if !early.is_empty() {
        return GreetOutcome::EarlyTalker;
    }
    let mut banner = format!("220-{hostname} ESMTP\r\n").into_bytes();
    if write_all_within(client, &mut banner, write).await.is_err() {
        return GreetOutcome::Gone;
    }
    match timeout(pause, read_into(client, early)).await {
        Err(_) => GreetOutcome::Patient,
        Ok(Ok(0)) | Ok(Err(_)) => GreetOutcome::Gone,
        Ok(Ok(_)) => GreetOutcome::EarlyTalker,
    }
}
