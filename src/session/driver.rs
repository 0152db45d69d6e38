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

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout_at, Instant, Sleep};

use super::io::{read_bulk_into, read_into, write_all_within, WriteError, BULK_READ, READ_CHUNK};
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
    last_activity: Instant,
    bytes_from_client: u64,
    bytes_to_client: u64,
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
            last_activity: Instant::now(),
            bytes_from_client: 0,
            bytes_to_client: 0,
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
            self.protocol.upstream_input(&mut self.io, Instant::now());
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
        self.protocol.client_input(&mut self.io, Instant::now());
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
        tokio::select! {
            read = read_bulk_into(&mut self.client, &mut self.io.client_in, max, &mut self.client_error), if read_client => {
                match read {
                    Ok(0) => self.client_eof = true,
                    Ok(n) => {
                        self.last_activity = Instant::now();
                        self.ctx.metrics.bytes_from_client.inc_by(n as u64);
                        self.bytes_from_client += n as u64;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "client read failed");
                        return Err(CloseReason::ClientClosed);
                    }
                }
            }
            read = read_into(&mut self.upstream, &mut self.io.upstream_in) => {
                let failed = match read {
                    Ok(0) => self.protocol.upstream_finished(),
                    Ok(_) => {
                        let now = Instant::now();
                        self.last_activity = now;
                        self.protocol.upstream_input(&mut self.io, now);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "upstream read failed");
                        CloseReason::UpstreamError
                    }
                };
                if failed == CloseReason::ClientQuit {
                    return Err(failed);
                }
                return Err(Box::pin(self.receiver_lost(failed)).await);
            }
            () = &mut self.timer => {
                let now = Instant::now();
                if self.protocol.wake_at().is_some_and(|at| at <= now) {
                    self.protocol.woken(&mut self.io, now);
                }
                let (deadline, expiry) = self.next_deadline();
                if now < deadline {
                    let wake = self.next_wake();
                    self.timer.as_mut().reset(wake);
                    return Ok(());
                }
                return Err(Box::pin(self.goodbye(expiry, Farewell::Timeout)).await);
            }
            signal = self.ctx.stop.signal(self.draining) => {
                let Signal::Stop(reason) = signal else {
                    self.draining = true;
                    return Ok(());
                };
                let why = match reason {
                    CloseReason::Blocked => Farewell::Blocked,
                    _ => Farewell::Shutdown,
                };
                return Err(Box::pin(self.goodbye(reason, why)).await);
            }
        }
        Ok(())
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
                let now = Instant::now();
                self.last_activity = now;
                self.tls = Some(facts.version);
                self.protocol.tls_started(&facts, now);
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
        if let Ok(n) = write_all_within(&mut self.client, &mut bytes, deadline).await {
            self.ctx.metrics.bytes_to_client.inc_by(n as u64);
            self.bytes_to_client += n as u64;
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
                Ok(Ok(n @ 1..)) => {
                    self.ctx.metrics.bytes_from_client.inc_by(n as u64);
                    self.bytes_from_client += n as u64;
                }
                _ => return,
            }
        }
    }

    async fn flush_upstream(&mut self) -> Result<(), CloseReason> {
        let deadline = self.ctx.config.timeouts.write;
        match write_all_within(&mut self.upstream, &mut self.io.to_upstream, deadline).await {
            Ok(0) => Ok(()),
            Ok(_) => {
                self.last_activity = Instant::now();
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
            Ok(0) => Ok(()),
            Ok(n) => {
                self.last_activity = Instant::now();
                self.ctx.metrics.bytes_to_client.inc_by(n as u64);
                self.bytes_to_client += n as u64;
                Ok(())
            }
            Err(WriteError::TimedOut) => Err(CloseReason::WriteTimeout),
            Err(WriteError::Io(e)) => {
                tracing::debug!(error = %e, "client write failed");
                Err(CloseReason::ClientClosed)
            }
        }
    }
}
