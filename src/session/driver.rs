//! The session driver: sockets, buffers and timers for one relayed session.
//!
//! One task, one loop. Each turn lets the protocol take what was read,
//! writes what it queued (each write under the write deadline), does what
//! it asked (a TLS handshake, a close), then waits for the first of: bytes
//! from the client (when the protocol wants them), bytes from the
//! receiver, a deadline (idle, whole session, or the protocol's own), a
//! graceful drain, or a stop (kill on block, shutdown).
//!
//! When the session ends mid-message on our side (a refusal, or the
//! receiver failing), the client is still writing and reads only after its
//! end of data: the driver ends its side and discards what the client sends
//! for a short linger, since closing a socket with bytes unread sends a
//! reset that destroys the reply before the client reads it.

use std::pin::Pin;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout_at, Instant, Sleep};

use super::io::{
    read_bulk_into, read_into, write_all_within, WriteError, Written, BULK_READ, READ_CHUNK,
};
use super::protocol::{Buffers, Farewell, Next, Protocol, SessionFacts};
use super::registry::{Signal, Stop};
use super::transport::Transport;
use super::CloseReason;
use crate::config::{Config, TlsMode};
use crate::metrics::Metrics;
use crate::tls::{Terminator, TlsVersion};

/// Deadline for the last words to a client we are closing on.
const GOODBYE_WRITE: Duration = Duration::from_secs(2);
/// The longest we discard a client's input after ending a session mid-DATA,
/// so it reads our reply; and the pause that ends it sooner: a client that
/// sends nothing for that long has finished writing.
const LINGER: Duration = Duration::from_secs(5);
const LINGER_QUIET: Duration = Duration::from_secs(1);
/// A session's bytes reach the shared byte counters in batches of at least
/// this many, and the rest when it ends: adding to the same atomic counter
/// from every worker on each read and write bounced its cache line between
/// cores, a sixth of the driver's own time in a profile of fresh
/// transactions.
const REPORT_BYTES_EVERY: u64 = 16 * 1024;

/// What a driver reads but does not own.
#[derive(Clone, Copy)]
pub struct DriverContext<'a> {
    pub config: &'a Config,
    pub metrics: &'a Metrics,
    /// Present on a listener that terminates TLS.
    pub terminator: Option<&'a Terminator>,
    pub tls_mode: TlsMode,
    /// Close at the next quiet point (graceful shutdown), or now, for the
    /// reason it carries.
    pub stop: &'a Stop,
    pub session_deadline: Instant,
}

pub struct Driver<'a, C, U, P> {
    client: Transport<C>,
    upstream: U,
    protocol: P,
    io: Buffers,
    ctx: DriverContext<'a>,
    client_eof: bool,
    draining: bool,
    /// When this turn began: the clock is read once as the driver wakes,
    /// not again by each step of the turn.
    now: Instant,
    last_activity: Instant,
    bytes_from_client: u64,
    bytes_to_client: u64,
    /// What of those the shared counters have not been told yet.
    unreported_from_client: u32,
    unreported_to_client: u32,
    tls: Option<TlsVersion>,
    /// A client read error that came after bytes, for the next read.
    client_error: Option<std::io::Error>,
    /// Armed at or before the earliest deadline in force. Activity moves
    /// the idle deadline later without touching it; when it fires early it
    /// is re-armed. One timer per session, not one per loop turn.
    timer: Pin<Box<Sleep>>,
}

impl<'a, C, U, P> Driver<'a, C, U, P>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    P: Protocol,
{
    /// `client_in`: client bytes read before the relay started (after a
    /// PROXY header, or during a shadow-mode greet pause); `upstream_in`:
    /// receiver bytes read while connecting (its greeting, when mailmoat
    /// started TLS with it first).
    pub fn new(
        client: Transport<C>,
        upstream: U,
        protocol: P,
        ctx: DriverContext<'a>,
        client_in: Vec<u8>,
        upstream_in: Vec<u8>,
    ) -> Self {
        let now = Instant::now();
        Driver {
            client,
            upstream,
            protocol,
            io: Buffers {
                client_in,
                upstream_in,
                ..Buffers::default()
            },
            ctx,
            client_eof: false,
            draining: false,
            now,
            last_activity: now,
            bytes_from_client: 0,
            bytes_to_client: 0,
            unreported_from_client: 0,
            unreported_to_client: 0,
            tls: None,
            client_error: None,
            timer: Box::pin(sleep_until(ctx.session_deadline)),
        }
    }

    pub fn facts(&self) -> SessionFacts {
        SessionFacts {
            bytes_from_client: self.bytes_from_client,
            bytes_to_client: self.bytes_to_client,
            commands: self.protocol.commands(),
            messages: self.protocol.messages(),
            tls: self.tls,
        }
    }

    /// Relays until the session ends, and says why it ended.
    pub async fn run(&mut self) -> CloseReason {
        if !self.io.upstream_in.is_empty() {
            self.protocol.upstream_input(&mut self.io, self.now);
        }
        let reason = loop {
            if let Err(reason) = self.step().await {
                break reason;
            }
        };
        let ours = matches!(
            reason,
            CloseReason::ProtocolError
                | CloseReason::Limit
                | CloseReason::UpstreamError
                | CloseReason::UpstreamClosed
        );
        if ours && self.protocol.mid_message() {
            self.linger().await;
        }
        reason
    }

    /// The session's last words (`goodbye`, `receiver_lost`) are boxed
    /// here: awaited inline, their writes would size the future every
    /// relayed session holds while it waits, for a path taken once.
    async fn step(&mut self) -> Result<(), CloseReason> {
        self.protocol.client_input(&mut self.io, self.now);
        if let Err(reason) = self.flush_upstream().await {
            return Err(Box::pin(self.receiver_lost(reason)).await);
        }
        self.flush_client().await?;
        match self.protocol.next() {
            Next::Relay => {}
            // Boxed: a handshake's future is large, and a relayed session
            // would carry its size in every loop turn's.
            Next::StartTls => return Box::pin(self.start_tls()).await,
            Next::Close(reason @ (CloseReason::UpstreamError | CloseReason::UpstreamClosed)) => {
                return Err(Box::pin(self.receiver_lost(reason)).await)
            }
            Next::Close(reason) => return Err(reason),
        }
        if self.client_eof {
            if let Some(reason) = self.protocol.client_finished() {
                return Err(reason);
            }
        }
        if self.draining && self.protocol.is_quiet(&self.io) {
            let farewell = self.goodbye(CloseReason::Shutdown, Farewell::Shutdown);
            return Err(Box::pin(farewell).await);
        }

        let read_client = !self.client_eof && self.protocol.wants_client_bytes();
        let wake = self.next_wake();
        if wake < self.timer.deadline() {
            self.timer.as_mut().reset(wake);
        }
        let max = if self.protocol.mid_message() {
            BULK_READ
        } else {
            READ_CHUNK
        };
        let woke = tokio::select! {
            read = read_bulk_into(&mut self.client, &mut self.io.client_in, max, &mut self.client_error), if read_client => Wake::Client(read),
            read = read_into(&mut self.upstream, &mut self.io.upstream_in) => Wake::Upstream(read),
            () = &mut self.timer => Wake::Timer,
            signal = self.ctx.stop.signal(self.draining) => Wake::Signal(signal),
        };
        self.now = Instant::now();
        match woke {
            Wake::Client(Ok(0)) => self.client_eof = true,
            Wake::Client(Ok(n)) => {
                self.last_activity = self.now;
                self.count_from_client(n);
            }
            Wake::Client(Err(e)) => {
                tracing::debug!(error = %e, "client read failed");
                return Err(CloseReason::ClientClosed);
            }
            Wake::Upstream(Ok(1..)) => {
                self.last_activity = self.now;
                self.protocol.upstream_input(&mut self.io, self.now);
            }
            Wake::Upstream(Ok(0)) => {
                let finished = self.protocol.upstream_finished();
                if finished == CloseReason::ClientQuit {
                    return Err(finished);
                }
                return Err(Box::pin(self.receiver_lost(finished)).await);
            }
            Wake::Upstream(Err(e)) => {
                tracing::debug!(error = %e, "upstream read failed");
                return Err(Box::pin(self.receiver_lost(CloseReason::UpstreamError)).await);
            }
            Wake::Timer => {
                if self.protocol.wake_at().is_some_and(|at| at <= self.now) {
                    self.protocol.woken(&mut self.io, self.now);
                }
                let (deadline, expiry) = self.next_deadline();
                if deadline <= self.now {
                    return Err(Box::pin(self.goodbye(expiry, Farewell::Timeout)).await);
                }
                let wake = self.next_wake();
                self.timer.as_mut().reset(wake);
            }
            Wake::Signal(Signal::Drain) => self.draining = true,
            Wake::Signal(Signal::Stop(reason)) => {
                let why = match reason {
                    CloseReason::Blocked => Farewell::Blocked,
                    _ => Farewell::Shutdown,
                };
                return Err(Box::pin(self.goodbye(reason, why)).await);
            }
        }
        Ok(())
    }

    fn count_from_client(&mut self, n: usize) {
        self.bytes_from_client += n as u64;
        let counter = &self.ctx.metrics.bytes_from_client;
        self.unreported_from_client = tally(counter, self.unreported_from_client, n);
    }

    fn count_to_client(&mut self, n: usize) {
        self.bytes_to_client += n as u64;
        let counter = &self.ctx.metrics.bytes_to_client;
        self.unreported_to_client = tally(counter, self.unreported_to_client, n);
    }

    /// The client was told to start TLS: handshake (bounded by the
    /// terminator's deadline and its handshakes in flight), then the
    /// protocol starts over inside TLS.
    async fn start_tls(&mut self) -> Result<(), CloseReason> {
        let Some(terminator) = self.ctx.terminator else {
            // A listener that terminates TLS always has a terminator
            // (config validation); reaching here is a wiring fault.
            tracing::error!("STARTTLS accepted on a listener without certificates");
            return Err(CloseReason::TlsFailed);
        };
        if self.client_eof {
            // Gone after asking: nothing to handshake with.
            return Err(CloseReason::ClientClosed);
        }
        let (mode, metrics, stop) = (self.ctx.tls_mode, self.ctx.metrics, self.ctx.stop);
        match self
            .client
            .start_tls(terminator, mode, metrics, stop.stopped())
            .await
        {
            Ok(facts) => {
                self.now = Instant::now();
                self.last_activity = self.now;
                self.tls = Some(facts.version);
                self.protocol.tls_started(&facts, self.now);
                Ok(())
            }
            Err(refused) => {
                if refused.client_fault {
                    self.protocol.tls_failed();
                }
                Err(refused.reason)
            }
        }
    }

    /// When the timer must fire next: the earliest deadline, or sooner if
    /// the protocol asked to be woken.
    fn next_wake(&self) -> Instant {
        let (deadline, _) = self.next_deadline();
        self.protocol
            .wake_at()
            .map_or(deadline, |at| at.min(deadline))
    }

    /// The earliest deadline now in force, and the reason it would close for.
    fn next_deadline(&self) -> (Instant, CloseReason) {
        let idle = (
            self.last_activity + self.protocol.idle_timeout(),
            CloseReason::IdleTimeout,
        );
        let session = (self.ctx.session_deadline, CloseReason::SessionTimeout);
        [Some(idle), self.protocol.deadline()]
            .into_iter()
            .flatten()
            .fold(session, |next, at| if at.0 < next.0 { at } else { next })
    }

    /// Writes the protocol's last words for `why` (best effort, short
    /// deadline) and returns `reason`.
    async fn goodbye(&mut self, reason: CloseReason, why: Farewell) -> CloseReason {
        let mut bytes = std::mem::take(&mut self.io.to_client);
        if let Some(words) = self.protocol.farewell(why) {
            bytes.extend_from_slice(&words);
        }
        let deadline = GOODBYE_WRITE.min(self.ctx.config.timeouts.write);
        if let Ok(written) = write_all_within(&mut self.client, &mut bytes, deadline).await {
            self.count_to_client(written.bytes);
        }
        reason
    }

    /// The receiver failed or went away. A client mid-message is owed the
    /// answer to it, which will not come from the receiver: the protocol
    /// says "try again later", then `run` lingers so the client reads it.
    async fn receiver_lost(&mut self, reason: CloseReason) -> CloseReason {
        if !self.protocol.mid_message() {
            return reason;
        }
        self.goodbye(reason, Farewell::ReceiverLost).await
    }

    /// Ends our side of the client's connection, then reads and discards
    /// until the client closes, pauses for `LINGER_QUIET`, or `LINGER` runs
    /// out. Nothing read is kept.
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER;
        if timeout_at(deadline, self.client.shutdown()).await.is_err() {
            return;
        }
        loop {
            let mut discard = Vec::new();
            let quiet = deadline.min(Instant::now() + LINGER_QUIET);
            match timeout_at(quiet, read_into(&mut self.client, &mut discard)).await {
                Ok(Ok(n @ 1..)) => self.count_from_client(n),
                _ => return,
            }
        }
    }

    async fn flush_upstream(&mut self) -> Result<(), CloseReason> {
        let deadline = self.ctx.config.timeouts.write;
        match write_all_within(&mut self.upstream, &mut self.io.to_upstream, deadline).await {
            Ok(written) => {
                self.wrote(written);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = ?e, "upstream write failed");
                Err(CloseReason::UpstreamError)
            }
        }
    }

    async fn flush_client(&mut self) -> Result<(), CloseReason> {
        let deadline = self.ctx.config.timeouts.write;
        match write_all_within(&mut self.client, &mut self.io.to_client, deadline).await {
            Ok(written) => {
                self.wrote(written);
                self.count_to_client(written.bytes);
                Ok(())
            }
            Err(WriteError::TimedOut) => Err(CloseReason::WriteTimeout),
            Err(WriteError::Io(e)) => {
                tracing::debug!(error = %e, "client write failed");
                Err(CloseReason::ClientClosed)
            }
        }
    }

    /// Bytes written count as activity; a write that waited moves the
    /// turn's clock on.
    fn wrote(&mut self, written: Written) {
        if written.waited {
            self.now = Instant::now();
        }
        if written.bytes > 0 {
            self.last_activity = self.now;
        }
    }
}

/// What ended a driver's wait.
enum Wake {
    Client(std::io::Result<usize>),
    Upstream(std::io::Result<usize>),
    Timer,
    Signal(Signal),
}

/// Adds `n` bytes to the `unreported` ones, and tells `counter` once they
/// reach [`REPORT_BYTES_EVERY`]; returns what is left unreported.
fn tally(counter: &IntCounter, unreported: u32, n: usize) -> u32 {
    let pending = u64::from(unreported).saturating_add(n as u64);
    match u32::try_from(pending) {
        Ok(pending) if u64::from(pending) < REPORT_BYTES_EVERY => pending,
        _ => {
            counter.inc_by(pending);
            0
        }
    }
}

impl<C, U, P> Drop for Driver<'_, C, U, P> {
    /// However the session ends (even dropped unfinished at shutdown), its
    /// bytes are counted.
    fn drop(&mut self) {
        let metrics = self.ctx.metrics;
        metrics
            .bytes_from_client
            .inc_by(u64::from(self.unreported_from_client));
        metrics
            .bytes_to_client
            .inc_by(u64::from(self.unreported_to_client));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_the_shared_counter_in_batches() {
        let counter = IntCounter::new("bytes", "bytes").unwrap();
        let mut unreported = tally(&counter, 0, 100);
        unreported = tally(&counter, unreported, 200);
        assert_eq!((counter.get(), unreported), (0, 300));
        let batch = REPORT_BYTES_EVERY as usize;
        unreported = tally(&counter, unreported, batch);
        assert_eq!((counter.get(), unreported), (300 + REPORT_BYTES_EVERY, 0));
        let beyond_u32 = u32::MAX as usize + 1;
        unreported = tally(&counter, 5, beyond_u32);
        assert_eq!(unreported, 0);
        assert_eq!(
            counter.get(),
            300 + REPORT_BYTES_EVERY + 5 + beyond_u32 as u64
        );
    }
}
