//! The seam between the session driver and a protocol module.
//!
//! The driver (`driver.rs`) owns the sockets (plain or TLS, upgraded in
//! place), the buffers and the byte-level timers (idle, whole session,
//! writes). A protocol module owns what the bytes mean: it reads the
//! buffers the driver filled, queues what to forward and what to answer,
//! and says when TLS starts or the session ends. It does no I/O and reads
//! no clock of its own (`now` is passed in), so it is tested without
//! sockets. SMTP is `smtp.rs`; IMAP and POP3 plug in here the same way.

use std::time::Duration;

use tokio::time::Instant;

use super::CloseReason;
use crate::tls::{TlsFacts, TlsVersion};

/// The session's byte queues, owned by the driver.
#[derive(Debug, Default)]
pub struct Buffers {
    /// Read from the client, not yet taken by the protocol.
    pub client_in: Vec<u8>,
    /// Read from the receiver, not yet taken by the protocol.
    pub upstream_in: Vec<u8>,
    /// Queued for the client: the receiver's replies and the proxy's own.
    pub to_client: Vec<u8>,
    /// Queued for the receiver.
    pub to_upstream: Vec<u8>,
}

/// What the driver does once the queued bytes are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Relay,
    /// The client was told to start TLS: handshake now, then call
    /// [`Protocol::tls_started`].
    StartTls,
    Close(CloseReason),
}

/// Why the driver ends a session in the middle of the protocol; the
/// protocol says it in its own words ([`Protocol::farewell`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Farewell {
    /// A deadline ran out.
    Timeout,
    Shutdown,
    /// The client was blocked while connected.
    Blocked,
    /// The receiver failed; the client may be owed an answer.
    ReceiverLost,
}

/// Counts kept for the session's closing log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionFacts {
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub commands: u64,
    pub messages: u64,
    /// The TLS version the client's session ran under, if any.
    pub tls: Option<TlsVersion>,
}

pub trait Protocol {
    /// Takes what it can of `io.client_in`.
    fn client_input(&mut self, io: &mut Buffers, now: Instant);
    /// Takes what it can of `io.upstream_in`.
    fn upstream_input(&mut self, io: &mut Buffers, now: Instant);
    /// What to do once the queued bytes are written.
    fn next(&self) -> Next;
    /// The handshake the protocol asked for is done.
    fn tls_started(&mut self, facts: &TlsFacts, now: Instant);
    /// The handshake the protocol asked for failed: counted as the
    /// client's protocol error.
    fn tls_failed(&mut self);
    /// Whether more client bytes may be read now (a pipelining client is
    /// paused while its replies are pending).
    fn wants_client_bytes(&self) -> bool;
    /// The protocol's own deadline (a line's completion, a data rate).
    fn deadline(&self) -> Option<(Instant, CloseReason)>;
    /// The idle limit in force now (IMAP's is short before login and long
    /// after it).
    fn idle_timeout(&self) -> Duration;
    /// When the protocol wants [`Protocol::woken`] called: it holds bytes
    /// back until then (a login reply under the account delay).
    fn wake_at(&self) -> Option<Instant> {
        None
    }
    /// `wake_at` has passed.
    fn woken(&mut self, _io: &mut Buffers, _now: Instant) {}
    /// A point where closing loses nothing: no command in flight, no message.
    fn is_quiet(&self, io: &Buffers) -> bool;
    /// The client reached end of stream: the reason to close once nothing
    /// is in flight, or `None` while replies are still owed.
    fn client_finished(&self) -> Option<CloseReason>;
    /// The receiver closed its side.
    fn upstream_finished(&self) -> CloseReason;
    /// The last words for the client when the driver ends the session, if
    /// any are owed.
    fn farewell(&self, why: Farewell) -> Option<Vec<u8>>;
    /// The client is in the middle of sending a message: ending the
    /// session now needs a linger so it reads why.
    fn mid_message(&self) -> bool;
    fn commands(&self) -> u64;
    fn messages(&self) -> u64;
}
