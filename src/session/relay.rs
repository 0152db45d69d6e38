//! The SMTP-aware relay between an admitted client and its receiver.
//!
//! One task, one loop: parse what the client sent according to the phase
//! (commands, DATA content, a SASL response, or opaque bytes after
//! STARTTLS), forward it, match each receiver reply to the command it
//! answers, and enforce every deadline. Replies reach the client in command
//! order: `pending` holds one entry per command in flight, and a reply the
//! proxy makes itself waits in that queue behind the receiver's earlier ones.
//! A message's facts travel in that queue too: the end of its data carries
//! them, so the reply that accepts it logs that message, whatever the client
//! has pipelined since.
//!
//! When the session ends mid-DATA on our side (a refusal, or the receiver
//! failing), the client is still writing and reads only after its end of
//! data: the relay says why, ends its side and discards what the client
//! sends for a short linger, since closing a socket with bytes unread sends
//! a reset that destroys the reply before the client reads it.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::io::{consume, read_into, write_all_within, WriteError};
use super::message::{self, Message, END_MARKER};
use super::registry::Stop;
use super::CloseReason;
use crate::admission::Refusal;
use crate::bans::BanEvent;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, Sniff};
use crate::shaping::{ClientShaping, Limit, Shaping, Verdict};
use crate::smtp::{Command, DataEvent, DataScanner, Reply, ReplyAssembler, Verb};

/// Commands in flight before the proxy stops reading from a pipelining client.
const MAX_PIPELINE: usize = 100;
/// Longest receiver reply accepted (EHLO replies are the long ones).
const MAX_REPLY: usize = 64 * 1024;
/// Deadline for the last words to a client we are closing on.
const GOODBYE_WRITE: Duration = Duration::from_secs(2);
/// The longest we discard a client's input after ending a session mid-DATA,
/// so it reads our reply; and the pause that ends it sooner: a client that
/// sends nothing for that long has finished writing.
const LINGER: Duration = Duration::from_secs(5);
const LINGER_QUIET: Duration = Duration::from_secs(1);
/// EHLO extensions the proxy cannot shape; BINARYMIME needs CHUNKING.
const HIDDEN_EXTENSIONS: [&str; 2] = ["CHUNKING", "BINARYMIME"];

#[derive(Debug)]
enum Phase {
    /// Client lines are commands.
    Command,
    /// Message content until the end marker.
    Data(DataScanner),
    /// The next client line answers a `334` challenge.
    SaslResponse,
    /// After STARTTLS: bytes pass through unread.
    Opaque,
}

/// What the reply at this position of the queue will answer.
#[derive(Debug)]
enum Expect {
    Greeting,
    Ehlo,
    /// The MAIL that opened transaction number `.0`.
    Mail(u64),
    /// A RCPT of transaction number `.0`.
    Rcpt(u64),
    Rset,
    Data,
    /// The end of a message's data, with the facts for its log record.
    DataEnd(Option<Box<Message>>),
    Auth,
    Quit,
    StartTls,
    Other,
}

#[derive(Debug)]
enum Pending {
    Upstream(Expect),
    /// A reply the proxy gives itself, and whether the session ends after it.
    Local(Vec<u8>, Option<CloseReason>),
}

/// Counts kept for the session's closing log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayFacts {
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub commands: u64,
    pub messages: u64,
}

/// What a relay reads but does not own.
#[derive(Clone, Copy)]
pub struct RelayContext<'a> {
    pub config: &'a Config,
    pub metrics: &'a Metrics,
    pub shaping: &'a Shaping,
    pub client_ip: IpAddr,
    /// The client was on the allowlist when the session started: no per-IP
    /// limit and no ban for the whole session (see `shaping.rs`).
    pub allowlisted: bool,
    /// Stop at the next quiet point (graceful shutdown).
    pub drain: &'a CancellationToken,
    /// Stop now, for the reason it carries.
    pub stop: &'a Stop,
    pub session_deadline: Instant,
}

pub struct Relay<'a, C, U> {
    client: C,
    upstream: U,
    config: &'a Config,
    metrics: &'a Metrics,
    shaping: ClientShaping<'a>,
    client_ip: IpAddr,
    drain: &'a CancellationToken,
    stop: &'a Stop,

    phase: Phase,
    pending: VecDeque<Pending>,
    replies: ReplyAssembler,
    client_in: Vec<u8>,
    upstream_in: Vec<u8>,
    to_client: Vec<u8>,
    to_upstream: Vec<u8>,
    /// A command whose reply decides how to read the client (DATA, AUTH,
    /// STARTTLS) is in flight: read nothing more until it is answered.
    awaiting_sync_reply: bool,
    /// Between an accepted MAIL and the end of its message or RSET.
    in_transaction: bool,
    quit_sent: bool,
    client_eof: bool,
    draining: bool,
    /// Skipping the rest of an over-long line.
    discarding_line: bool,
    /// The session ends once what is queued for the client is written.
    closing: Option<CloseReason>,

    session_deadline: Instant,
    last_activity: Instant,
    line_started: Option<Instant>,
    data_started: Instant,
    data_bytes: u64,
    /// The client's HELO/EHLO argument, bounded, for the message log.
    helo: String,
    /// The transaction the client is framing, with its number: from its MAIL
    /// to RSET or the end of its data, when it moves into `pending`.
    message: Option<(u64, Message)>,
    /// MAIL commands forwarded so far; numbers the transactions.
    mails: u64,
    pub facts: RelayFacts,
}

impl<'a, C, U> Relay<'a, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// A relay whose receiver's greeting is the first reply to come.
    pub fn new(client: C, upstream: U, ctx: RelayContext<'a>) -> Self {
        let now = Instant::now();
        Relay {
            client,
            upstream,
            config: ctx.config,
            metrics: ctx.metrics,
            shaping: ctx.shaping.client(ctx.client_ip, ctx.allowlisted),
            client_ip: ctx.client_ip,
            drain: ctx.drain,
            stop: ctx.stop,
            session_deadline: ctx.session_deadline,
            phase: Phase::Command,
            pending: VecDeque::from([Pending::Upstream(Expect::Greeting)]),
            replies: ReplyAssembler::new(MAX_REPLY),
            client_in: Vec::new(),
            upstream_in: Vec::new(),
            to_client: Vec::new(),
            to_upstream: Vec::new(),
            awaiting_sync_reply: false,
            in_transaction: false,
            quit_sent: false,
            client_eof: false,
            draining: false,
            discarding_line: false,
            closing: None,
            last_activity: now,
            line_started: None,
            data_started: now,
            data_bytes: 0,
            helo: String::new(),
            message: None,
            mails: 0,
            facts: RelayFacts::default(),
        }
    }

    /// Client bytes that arrived before the relay started (after a PROXY
    /// header, or during a shadow-mode greet pause).
    pub fn preload_client_input(&mut self, bytes: Vec<u8>) {
        self.client_in = bytes;
    }

    /// Receiver bytes read before the relay started (its greeting, read
    /// for mailmoat's own STARTTLS): handled as if just read.
    pub fn preload_upstream_input(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        self.upstream_in = bytes;
        if let Err(reason) = self.process_upstream_input() {
            self.closing = Some(reason);
        }
    }

    /// Relays until the session ends, and says why it ended.
    pub async fn run(&mut self) -> CloseReason {
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
        if ours && matches!(self.phase, Phase::Data(_)) {
            self.linger().await;
        }
        reason
    }

    async fn step(&mut self) -> Result<(), CloseReason> {
        self.process_client_input();
        if let Err(reason) = self.flush_upstream().await {
            return Err(self.receiver_lost(reason).await);
        }
        self.flush_client().await?;
        if let Some(reason) = self.closing {
            return Err(reason);
        }
        if self.client_eof && self.pending.is_empty() {
            return Err(if self.quit_sent {
                CloseReason::ClientQuit
            } else {
                CloseReason::ClientClosed
            });
        }
        if self.draining && self.is_quiet() {
            return Err(self
                .goodbye(
                    CloseReason::Shutdown,
                    "4.3.2",
                    "shutting down, try again later",
                )
                .await);
        }

        let read_client =
            !self.client_eof && !self.awaiting_sync_reply && self.pending.len() < MAX_PIPELINE;
        let (deadline, expiry) = self.next_deadline();
        tokio::select! {
            read = read_into(&mut self.client, &mut self.client_in), if read_client => {
                match read {
                    Ok(0) => self.client_eof = true,
                    Ok(n) => {
                        self.last_activity = Instant::now();
                        self.metrics.bytes_from_client.inc_by(n as u64);
                        self.facts.bytes_from_client += n as u64;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "client read failed");
                        return Err(CloseReason::ClientClosed);
                    }
                }
            }
            read = read_into(&mut self.upstream, &mut self.upstream_in) => {
                let failed = match read {
                    Ok(0) if self.quit_sent => return Err(CloseReason::ClientQuit),
                    Ok(0) => CloseReason::UpstreamClosed,
                    Ok(_) => {
                        self.last_activity = Instant::now();
                        match self.process_upstream_input() {
                            Ok(()) => return Ok(()),
                            Err(reason) => reason,
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "upstream read failed");
                        CloseReason::UpstreamError
                    }
                };
                return Err(self.receiver_lost(failed).await);
            }
            () = sleep_until(deadline) => {
                return Err(self.goodbye(expiry, "4.4.2", "timeout exceeded, closing connection").await);
            }
            () = self.drain.cancelled(), if !self.draining => self.draining = true,
            reason = self.stop.stopped() => {
                let (status, text) = match reason {
                    CloseReason::Blocked => ("4.7.1", "access denied, closing connection"),
                    _ => ("4.3.2", "shutting down, try again later"),
                };
                return Err(self.goodbye(reason, status, text).await);
            }
        }
        Ok(())
    }

    /// Nothing in flight and no message open: a point where closing loses nothing.
    fn is_quiet(&self) -> bool {
        matches!(self.phase, Phase::Command)
            && self.pending.is_empty()
            && self.client_in.is_empty()
            && !self.in_transaction
    }

    /// The earliest deadline now in force, and the reason it would close for.
    fn next_deadline(&self) -> (Instant, CloseReason) {
        let t = &self.config.timeouts;
        let mut next = (self.session_deadline, CloseReason::SessionTimeout);
        let mut consider = |at: Instant, reason| {
            if at < next.0 {
                next = (at, reason);
            }
        };
        if let Some(started) = self.line_started {
            consider(started + t.command_line, CloseReason::LineTimeout);
        }
        if matches!(self.phase, Phase::Data(_)) && t.data_min_rate > 0 {
            let earned = Duration::from_secs_f64(self.data_bytes as f64 / t.data_min_rate as f64);
            consider(
                self.data_started + t.command_line + earned,
                CloseReason::SlowData,
            );
        }
        consider(self.last_activity + t.idle, CloseReason::IdleTimeout);
        next
    }

    /// Writes a final `421 <status> <hostname> <text>` (best effort, short
    /// deadline) and returns `reason`. The enhanced status code comes right
    /// after the reply code (RFC 2034), as in Postfix's `421 4.4.2 mx …`.
    async fn goodbye(&mut self, reason: CloseReason, status: &str, text: &str) -> CloseReason {
        self.last_reply(reason, 421, status, text).await
    }

    /// The receiver failed or went away. A client mid-DATA is owed the
    /// answer to its message, which will not come from the receiver: it gets
    /// `451 4.4.2` (try again later), then `run` lingers so it reads it.
    async fn receiver_lost(&mut self, reason: CloseReason) -> CloseReason {
        if !matches!(self.phase, Phase::Data(_)) {
            return reason;
        }
        let text = "receiver failed during the message, try again later";
        self.last_reply(reason, 451, "4.4.2", text).await
    }

    /// Writes what is queued for the client and a final
    /// `<code> <status> <hostname> <text>` (best effort, short deadline);
    /// returns `reason`.
    async fn last_reply(
        &mut self,
        reason: CloseReason,
        code: u16,
        status: &str,
        text: &str,
    ) -> CloseReason {
        let mut bytes = std::mem::take(&mut self.to_client);
        bytes.extend_from_slice(
            format!("{code} {status} {} {text}\r\n", self.config.server.hostname).as_bytes(),
        );
        let deadline = GOODBYE_WRITE.min(self.config.timeouts.write);
        if let Ok(n) = write_all_within(&mut self.client, &mut bytes, deadline).await {
            self.metrics.bytes_to_client.inc_by(n as u64);
            self.facts.bytes_to_client += n as u64;
        }
        reason
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
                    self.metrics.bytes_from_client.inc_by(n as u64);
                    self.facts.bytes_from_client += n as u64;
                }
                _ => return,
            }
        }
    }

    async fn flush_upstream(&mut self) -> Result<(), CloseReason> {
        let deadline = self.config.timeouts.write;
        match write_all_within(&mut self.upstream, &mut self.to_upstream, deadline).await {
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
        let deadline = self.config.timeouts.write;
        match write_all_within(&mut self.client, &mut self.to_client, deadline).await {
            Ok(0) => Ok(()),
            Ok(n) => {
                self.last_activity = Instant::now();
                self.metrics.bytes_to_client.inc_by(n as u64);
                self.facts.bytes_to_client += n as u64;
                Ok(())
            }
            Err(WriteError::TimedOut) => Err(CloseReason::WriteTimeout),
            Err(WriteError::Io(e)) => {
                tracing::debug!(error = %e, "client write failed");
                Err(CloseReason::ClientClosed)
            }
        }
    }

    // ---- client → upstream -------------------------------------------------

    fn process_client_input(&mut self) {
        while !self.client_in.is_empty() && self.closing.is_none() {
            let progressed = match self.phase {
                Phase::Command | Phase::SaslResponse => self.take_line(),
                Phase::Data(_) => self.take_data(),
                Phase::Opaque => {
                    self.to_upstream.append(&mut self.client_in);
                    true
                }
            };
            if !progressed {
                break;
            }
        }
        // The line timer runs from the first byte of an unfinished line until
        // its end, however slowly the bytes in between trickle.
        let partial_line = matches!(self.phase, Phase::Command | Phase::SaslResponse)
            && (self.discarding_line
                || self.proxy_header_undecided()
                || (!self.client_in.is_empty() && !self.client_in.contains(&b'\n')));
        if partial_line {
            self.line_started.get_or_insert_with(Instant::now);
        } else {
            self.line_started = None;
        }
    }

    /// Handles one complete line if there is one; false when it must wait.
    fn take_line(&mut self) -> bool {
        if self.awaiting_sync_reply
            || self.pending.len() >= MAX_PIPELINE
            || self.proxy_header_undecided()
        {
            return false;
        }
        let max = self.config.limits.max_line_length;
        let Some(end) = self
            .client_in
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| i + 1)
        else {
            if self.discarding_line {
                self.client_in = Vec::new();
            } else if self.client_in.len() >= max {
                self.client_in = Vec::new();
                self.discarding_line = true;
                self.line_too_long();
            }
            return false;
        };
        self.line_started = None;
        if std::mem::take(&mut self.discarding_line) {
            consume(&mut self.client_in, end);
            return true;
        }
        if end > max {
            self.line_too_long();
        } else if memchr::memchr(0, &self.client_in[..end]).is_some() {
            self.nul_in_line();
        } else if matches!(self.phase, Phase::SaslResponse) {
            // Credentials: forwarded, never parsed or logged.
            self.phase = Phase::Command;
            self.forward_line(end, Expect::Auth);
        } else {
            self.command(end);
        }
        consume(&mut self.client_in, end);
        true
    }

    fn line_too_long(&mut self) {
        self.protocol_error();
        self.phase = Phase::Command;
        self.answer(b"500 5.5.2 line too long\r\n", None);
    }

    /// A line with a NUL is never forwarded: RFC 5321 text has none, and a
    /// receiver may end the line there and read a command the proxy did not.
    fn nul_in_line(&mut self) {
        self.protocol_error();
        if matches!(self.phase, Phase::SaslResponse) {
            // The receiver waits for a response: cancel the exchange
            // instead (RFC 4954), and its 501 answers the client.
            self.phase = Phase::Command;
            self.to_upstream.extend_from_slice(b"*\r\n");
            self.expect(Expect::Auth);
        } else {
            self.answer(b"500 5.5.2 NUL byte in command line\r\n", None);
        }
    }

    /// Counts a protocol error, toward a ban too.
    fn protocol_error(&mut self) {
        self.metrics.protocol_errors.inc();
        self.shaping.event(BanEvent::ProtocolError);
    }

    /// Queues the proxy's own reply in command order.
    fn answer(&mut self, reply: &[u8], close: Option<CloseReason>) {
        self.pending
            .push_back(Pending::Local(reply.to_vec(), close));
        self.release_local_replies();
    }

    /// Refuses a message or recipient over `limit` with `reply`.
    fn refuse(&mut self, limit: Limit, reply: &[u8], close: Option<CloseReason>) {
        self.metrics.refused_over(limit);
        self.answer(reply, close);
    }

    /// The first bytes might still be a PROXY header arriving in pieces
    /// (the door catches those already there): held, under the line
    /// timeout, until they can be told apart. The v2 signature begins with
    /// two bare `\r\n` that would otherwise reach the receiver as lines.
    fn proxy_header_undecided(&self) -> bool {
        self.facts.commands == 0
            && matches!(self.phase, Phase::Command)
            && !self.client_in.is_empty()
            && proxy_protocol::sniff(&self.client_in) == Sniff::Undecided
    }

    fn command(&mut self, end: usize) {
        if self.facts.commands == 0 && proxy_protocol::looks_like_header(&self.client_in) {
            // Only trusted proxies may say who the client is; anyone else
            // could spoof its way past every per-IP rule. Past the door this
            // is the session's protocol error, not a refused connection.
            let refusal = Refusal::ProxyUntrusted;
            self.protocol_error();
            let reply = refusal.reply(&self.config.server.hostname);
            self.answer(reply.as_bytes(), Some(CloseReason::ProtocolError));
            return;
        }
        let command = Command::parse(&self.client_in[..end]);
        let verb = command.verb;
        self.metrics.command(verb);
        self.facts.commands += 1;
        let limits = &self.config.limits;
        let expect = match verb {
            Verb::Helo | Verb::Ehlo | Verb::Lhlo => {
                self.helo = message::field(command.args);
                if verb == Verb::Helo {
                    Expect::Other
                } else {
                    Expect::Ehlo
                }
            }
            Verb::Mail => {
                if message::size_param(command.args)
                    .is_some_and(|size| size > limits.max_message_size)
                    && self.shaping.over(Limit::MessageSize) == Verdict::Refuse
                {
                    let reply = b"552 5.3.4 message size exceeds fixed maximum message size\r\n";
                    return self.refuse(Limit::MessageSize, reply, None);
                }
                if self.shaping.message() == Verdict::Refuse {
                    let reply = b"450 4.7.1 message rate limit exceeded, try again later\r\n";
                    return self.refuse(Limit::MessageRate, reply, None);
                }
                self.mails += 1;
                self.message = Some((self.mails, Message::new(command.args)));
                Expect::Mail(self.mails)
            }
            Verb::Rcpt => {
                let sent = self.message.as_ref().map_or(0, |(_, m)| m.recipients_sent);
                if sent >= limits.recipients_per_message
                    && self.shaping.over(Limit::RecipientsPerMessage) == Verdict::Refuse
                {
                    let reply = b"452 4.5.3 too many recipients\r\n";
                    return self.refuse(Limit::RecipientsPerMessage, reply, None);
                }
                if self.shaping.recipient() == Verdict::Refuse {
                    let reply = b"450 4.7.1 recipient rate limit exceeded, try again later\r\n";
                    return self.refuse(Limit::RecipientRate, reply, None);
                }
                match self.message.as_mut() {
                    Some((id, m)) => {
                        m.recipients_sent += 1;
                        Expect::Rcpt(*id)
                    }
                    // No transaction: the receiver refuses it.
                    None => Expect::Other,
                }
            }
            Verb::Rset => {
                // Whatever the receiver replies, its transaction is gone.
                self.message = None;
                Expect::Rset
            }
            Verb::Data => Expect::Data,
            Verb::Auth => Expect::Auth,
            Verb::StartTls => Expect::StartTls,
            Verb::Quit => {
                self.quit_sent = true;
                Expect::Quit
            }
            Verb::Bdat => {
                // The chunk that follows is binary of a length only BDAT
                // knows; without CHUNKING advertised there is no resync.
                self.protocol_error();
                self.answer(
                    b"503 5.5.1 BDAT without CHUNKING, use DATA\r\n",
                    Some(CloseReason::ProtocolError),
                );
                return;
            }
            _ => Expect::Other,
        };
        self.forward_line(end, expect);
    }

    fn forward_line(&mut self, end: usize, expect: Expect) {
        self.to_upstream.extend_from_slice(&self.client_in[..end]);
        self.expect(expect);
    }

    /// Queues the receiver's reply to what was just forwarded.
    fn expect(&mut self, expect: Expect) {
        if matches!(expect, Expect::Data | Expect::Auth | Expect::StartTls) {
            self.awaiting_sync_reply = true;
        }
        self.pending.push_back(Pending::Upstream(expect));
    }

    fn take_data(&mut self) -> bool {
        let Phase::Data(scanner) = &mut self.phase else {
            return false;
        };
        let event = scanner.scan(&self.client_in);
        let taken = match event {
            DataEvent::Continue => self.client_in.len(),
            DataEvent::End(n) => n,
            DataEvent::Smuggling(_) => {
                // Receivers disagree on whether this ends the message: one
                // more message may be hidden behind it.
                self.refuse_data(b"421 4.5.0 bare line ending near end of data, closing\r\n");
                return false;
            }
            DataEvent::Nul(_) => {
                // A receiver may strip it and see an end of data the proxy
                // did not. Resending the same message would not help: 554.
                self.refuse_data(b"554 5.6.0 NUL byte in message content, closing\r\n");
                return false;
            }
        };
        let max = self
            .config
            .limits
            .max_message_size
            .saturating_add(END_MARKER);
        // Counted once, as the message crosses the limit (shadow mode lets
        // the rest of it through).
        if self.data_bytes <= max
            && self.data_bytes.saturating_add(taken as u64) > max
            && self.shaping.over(Limit::MessageSize) == Verdict::Refuse
        {
            // Stop before the receiver has it all: without the end marker
            // it discards the message, so nothing over-size is delivered.
            self.refuse(
                Limit::MessageSize,
                b"552 5.3.4 message size exceeds fixed maximum message size\r\n",
                Some(CloseReason::Limit),
            );
            self.client_in = Vec::new();
            return false;
        }
        if let Some((_, m)) = self.message.as_mut() {
            m.content(&self.client_in[..taken]);
        }
        self.data_bytes += taken as u64;
        if taken == self.client_in.len() && self.to_upstream.is_empty() {
            // The bulk of a message: hand the buffer over, no copy.
            self.to_upstream = std::mem::take(&mut self.client_in);
        } else {
            self.to_upstream.extend_from_slice(&self.client_in[..taken]);
            consume(&mut self.client_in, taken);
        }
        if matches!(event, DataEvent::End(_)) {
            let message = self.message.take().map(|(_, mut m)| {
                m.ended();
                Box::new(m)
            });
            self.phase = Phase::Command;
            self.expect(Expect::DataEnd(message));
        }
        true
    }

    /// Refuses the message in DATA and closes without its end marker: the
    /// receiver drops the unfinished message, so nothing is half-delivered.
    /// Counted as a protocol error.
    fn refuse_data(&mut self, reply: &[u8]) {
        self.protocol_error();
        self.to_client.extend_from_slice(reply);
        self.closing = Some(CloseReason::ProtocolError);
        self.client_in = Vec::new();
    }

    // ---- upstream → client -------------------------------------------------

    fn process_upstream_input(&mut self) -> Result<(), CloseReason> {
        if matches!(self.phase, Phase::Opaque) {
            self.to_client.append(&mut self.upstream_in);
            return Ok(());
        }
        let mut start = 0;
        while let Some(len) = self.upstream_in[start..].iter().position(|&b| b == b'\n') {
            let line = &self.upstream_in[start..start + len + 1];
            start += len + 1;
            match self.replies.push_line(line) {
                Ok(Some(reply)) => self.reply(reply),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "receiver sent a malformed reply");
                    return Err(CloseReason::UpstreamError);
                }
            }
            if matches!(self.phase, Phase::Opaque) {
                // Bytes after the 220 to STARTTLS are the receiver's TLS.
                self.to_client.extend_from_slice(&self.upstream_in[start..]);
                start = self.upstream_in.len();
            }
        }
        consume(&mut self.upstream_in, start);
        if self.upstream_in.len() > MAX_REPLY {
            tracing::warn!("receiver sent an over-long reply line");
            return Err(CloseReason::UpstreamError);
        }
        Ok(())
    }

    fn reply(&mut self, mut reply: Reply) {
        let expect = match self.pending.pop_front() {
            Some(Pending::Upstream(expect)) => Some(expect),
            // Local replies are released as soon as they reach the front.
            Some(local @ Pending::Local(..)) => {
                self.pending.push_front(local);
                None
            }
            None => None,
        };
        match expect {
            Some(Expect::Greeting) if reply.code != 220 => {
                self.close_after(CloseReason::UpstreamClosed)
            }
            Some(Expect::Ehlo) if reply.code == 250 => {
                reply = reply
                    .without_extensions(&HIDDEN_EXTENSIONS)
                    .with_size_limit(self.config.limits.max_message_size)
            }
            Some(Expect::Mail(id)) => {
                self.in_transaction = reply.is_positive();
                if !self.in_transaction && self.message.as_ref().is_some_and(|(n, _)| *n == id) {
                    self.message = None;
                }
            }
            Some(Expect::Rcpt(id)) => {
                if let Some((_, m)) = self
                    .message
                    .as_mut()
                    .filter(|(n, _)| *n == id && reply.is_positive())
                {
                    m.recipients += 1;
                }
            }
            Some(Expect::Rset) => self.in_transaction = false,
            Some(Expect::Data) => {
                self.awaiting_sync_reply = false;
                if reply.code == 354 {
                    self.phase = Phase::Data(DataScanner::default());
                    self.data_started = Instant::now();
                    self.data_bytes = 0;
                }
            }
            Some(Expect::DataEnd(message)) => {
                self.in_transaction = false;
                if reply.is_positive() {
                    self.facts.messages += 1;
                    self.metrics.message(true);
                    if let Some(m) = message {
                        m.log_accepted(self.client_ip, &self.helo);
                    }
                } else {
                    self.metrics.message(false);
                }
            }
            Some(Expect::Auth) => {
                self.awaiting_sync_reply = false;
                match reply.code {
                    334 => self.phase = Phase::SaslResponse,
                    535 => self.shaping.event(BanEvent::AuthFailure),
                    _ => {}
                }
            }
            Some(Expect::StartTls) => {
                self.awaiting_sync_reply = false;
                if reply.code == 220 {
                    if !self.client_in.is_empty() {
                        // Plaintext sent after STARTTLS would be taken as
                        // inside TLS by a vulnerable receiver (CVE-2011-0411).
                        self.protocol_error();
                        self.closing = Some(CloseReason::ProtocolError);
                        return;
                    }
                    self.phase = Phase::Opaque;
                }
            }
            Some(Expect::Quit) => self.close_after(CloseReason::ClientQuit),
            Some(Expect::Greeting | Expect::Ehlo | Expect::Other) | None => {}
        }
        if reply.code == 421 {
            self.close_after(CloseReason::UpstreamClosed);
        }
        self.to_client.extend_from_slice(&reply.raw);
        self.release_local_replies();
    }

    fn close_after(&mut self, reason: CloseReason) {
        self.closing.get_or_insert(reason);
    }

    /// Moves the proxy's own replies at the front of the queue to the client.
    fn release_local_replies(&mut self) {
        while let Some(Pending::Local(..)) = self.pending.front() {
            if let Some(Pending::Local(text, close)) = self.pending.pop_front() {
                self.to_client.extend_from_slice(&text);
                if let Some(reason) = close {
                    self.close_after(reason);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The relay between two in-memory pipes: the test plays both the client
    //! and the receiver, on paused time.

    use std::future::Future;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// The test's ends of the pipes to the relay.
    struct Pipes {
        client: DuplexStream,
        upstream: DuplexStream,
    }

    /// Shaping whose bans feed lists nobody reads.
    fn detached_shaping(config: &Config, metrics: &std::sync::Arc<Metrics>) -> Shaping {
        use crate::blocklist::sources::{SourceMetrics, Sources};
        let sources = Sources::new(
            Default::default(),
            SourceMetrics::register(&prometheus::Registry::new()),
            Box::new(|_| {}),
        );
        let bans = crate::bans::Bans::new(
            config.autoban.clone(),
            false,
            1000,
            sources.into(),
            metrics.clone(),
        );
        Shaping::new(config, bans.into(), metrics.clone())
    }

    /// Runs a relay against `script`; returns why the relay ended and the
    /// protocol errors it counted.
    async fn relay_with<F>(script: impl FnOnce(Pipes) -> F) -> (CloseReason, u64)
    where
        F: Future<Output = ()>,
    {
        let (reason, metrics) = relay_configured("", script).await;
        (reason, metrics.protocol_errors.get())
    }

    /// Runs a relay with the config `toml` against `script`; returns why the
    /// relay ended and its metrics.
    async fn relay_configured<F>(
        toml: &str,
        script: impl FnOnce(Pipes) -> F,
    ) -> (CloseReason, std::sync::Arc<Metrics>)
    where
        F: Future<Output = ()>,
    {
        let config = Config::from_toml(toml, std::path::Path::new("test.toml")).expect("config");
        let metrics = std::sync::Arc::new(Metrics::new());
        let shaping = detached_shaping(&config, &metrics);
        let (drain, stop) = (CancellationToken::new(), Stop::default());
        let (client, client_end) = duplex(64 * 1024);
        let (upstream, upstream_end) = duplex(64 * 1024);
        let ctx = RelayContext {
            config: &config,
            metrics: &metrics,
            shaping: &shaping,
            client_ip: "192.0.2.1".parse().unwrap(),
            allowlisted: false,
            drain: &drain,
            stop: &stop,
            session_deadline: Instant::now() + config.timeouts.session,
        };
        let relay = async {
            // Dropped when it ends, so the script sees both pipes close.
            let mut relay = Relay::new(client, upstream, ctx);
            relay.run().await
        };
        let pipes = Pipes {
            client: client_end,
            upstream: upstream_end,
        };
        let both = async { tokio::join!(relay, script(pipes)) };
        let (reason, ()) = tokio::time::timeout(Duration::from_secs(600), both)
            .await
            .expect("relay and script finish");
        (reason, metrics)
    }

    /// The per-message log records written while `f` runs, as JSON.
    async fn message_records(f: impl Future<Output = ()>) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        {
            // This test's thread only: the runtime is single-threaded.
            let _guard = tracing::subscriber::set_default(subscriber);
            f.await;
        }
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON log line"))
            .filter(|record| record["target"] == "mailmoat::message")
            .collect()
    }

    /// Reads exactly `expected.len()` bytes and checks them.
    async fn expect_bytes(stream: &mut DuplexStream, expected: &[u8]) {
        let mut got = vec![0; expected.len()];
        stream.read_exact(&mut got).await.expect("read");
        assert_eq!(text(&got), text(expected));
    }

    /// Everything until the relay closes this pipe.
    async fn rest(stream: &mut DuplexStream) -> Vec<u8> {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read to end");
        rest
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    impl Pipes {
        async fn greet(&mut self) {
            let greeting = b"220 mx.test ESMTP\r\n";
            self.upstream.write_all(greeting).await.unwrap();
            expect_bytes(&mut self.client, greeting).await;
        }

        /// `command` reaches the receiver, whose `reply` reaches the client.
        async fn exchange(&mut self, command: &[u8], reply: &[u8]) {
            self.client.write_all(command).await.unwrap();
            expect_bytes(&mut self.upstream, command).await;
            self.upstream.write_all(reply).await.unwrap();
            expect_bytes(&mut self.client, reply).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn proxy_v2_signature_split_after_its_first_line_is_held_and_refused() {
        let header = crate::proxy_protocol::encode(
            crate::config::ProxyProtocol::V2,
            "203.0.113.9:4000".parse().unwrap(),
            "192.0.2.25:25".parse().unwrap(),
            None,
        );
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            p.client.write_all(&header[..2]).await.unwrap();
            // Paused time advances only once the relay has done all it can
            // with the first segment.
            tokio::time::sleep(Duration::from_millis(10)).await;
            p.client.write_all(&header[2..]).await.unwrap();
            let reply = text(&rest(&mut p.client).await);
            assert!(reply.starts_with("554 5.7.1 "), "{reply:?}");
            assert_eq!(
                text(&rest(&mut p.upstream).await),
                "",
                "part of the header reached the receiver"
            );
        })
        .await;
        assert_eq!(reason, CloseReason::ProtocolError);
        assert_eq!(errors, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_blank_first_line_is_held_only_until_the_line_timeout() {
        let (reason, _) = relay_with(|mut p| async move {
            p.greet().await;
            p.client.write_all(b"\r\n").await.unwrap();
            let reply = text(&rest(&mut p.client).await);
            assert!(reply.starts_with("421 4.4.2 "), "{reply:?}");
            assert_eq!(text(&rest(&mut p.upstream).await), "");
        })
        .await;
        assert_eq!(reason, CloseReason::LineTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn plaintext_injected_after_starttls_is_a_protocol_error() {
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            p.client
                .write_all(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
                .await
                .unwrap();
            expect_bytes(&mut p.upstream, b"STARTTLS\r\n").await;
            p.upstream
                .write_all(b"220 2.0.0 go ahead\r\n")
                .await
                .unwrap();
            assert_eq!(
                text(&rest(&mut p.upstream).await),
                "",
                "injection reached the receiver"
            );
            // The client is not told to start TLS over a stream it tampered with.
            assert_eq!(text(&rest(&mut p.client).await), "");
        })
        .await;
        assert_eq!(reason, CloseReason::ProtocolError);
        assert_eq!(errors, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn after_starttls_bytes_pass_through_opaquely() {
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            p.client.write_all(b"STARTTLS\r\n").await.unwrap();
            expect_bytes(&mut p.upstream, b"STARTTLS\r\n").await;
            // The receiver's TLS may follow its 220 in the same segment.
            let accepted = b"220 2.0.0 go ahead\r\n\x16\x03\x01server";
            p.upstream.write_all(accepted).await.unwrap();
            expect_bytes(&mut p.client, accepted).await;
            // Nothing is read as SMTP any more: not BDAT, not a bare-LF dot.
            let tls = b"\x16\x03\x01\x00\xffBDAT 5\r\nx\n.\r\n\x00";
            p.client.write_all(tls).await.unwrap();
            expect_bytes(&mut p.upstream, tls).await;
            p.upstream.write_all(b"\x17\x03\x03reply").await.unwrap();
            expect_bytes(&mut p.client, b"\x17\x03\x03reply").await;
            // The client hangs up first; the receiver's end stays open
            // until the relay lets go of it.
            let Pipes {
                client,
                mut upstream,
            } = p;
            drop(client);
            rest(&mut upstream).await;
        })
        .await;
        assert_eq!(reason, CloseReason::ClientClosed);
        assert_eq!(errors, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn bdat_is_refused_and_ends_the_session() {
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            p.client
                .write_all(b"BDAT 10 LAST\r\n0123456789")
                .await
                .unwrap();
            let reply = text(&rest(&mut p.client).await);
            assert!(reply.starts_with("503 5.5.1 "), "{reply:?}");
            assert_eq!(
                text(&rest(&mut p.upstream).await),
                "",
                "BDAT reached the receiver"
            );
        })
        .await;
        assert_eq!(reason, CloseReason::ProtocolError);
        assert_eq!(errors, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bare_lf_dot_in_data_closes_without_the_end_marker() {
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            p.exchange(b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n")
                .await;
            p.exchange(b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n").await;
            p.exchange(b"DATA\r\n", b"354 go ahead\r\n").await;
            let smuggled = b"Subject: s\r\n\r\nhi\n.\r\nMAIL FROM:<evil@x>\r\n";
            p.client.write_all(smuggled).await.unwrap();
            let reply = text(&rest(&mut p.client).await);
            assert!(reply.starts_with("421 "), "{reply:?}");
            let forwarded = text(&rest(&mut p.upstream).await);
            assert!(!forwarded.contains("\n.\r\n"), "{forwarded:?}");
            assert!(!forwarded.contains("evil"), "{forwarded:?}");
        })
        .await;
        assert_eq!(reason, CloseReason::ProtocolError);
        assert_eq!(errors, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn over_long_line_is_refused_and_the_session_continues() {
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            let long = format!("NOOP {}\r\n", "x".repeat(3000));
            p.client.write_all(long.as_bytes()).await.unwrap();
            expect_bytes(&mut p.client, b"500 5.5.2 line too long\r\n").await;
            // The receiver never saw the long line: NOOP is the next it reads.
            p.exchange(b"NOOP\r\n", b"250 2.0.0 Ok\r\n").await;
            p.exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
            assert_eq!(text(&rest(&mut p.client).await), "");
            assert_eq!(text(&rest(&mut p.upstream).await), "");
        })
        .await;
        assert_eq!(reason, CloseReason::ClientQuit);
        assert_eq!(errors, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn pipelined_messages_are_each_logged_with_their_own_facts() {
        let first = b"Subject: 1\r\n\r\none\r\n";
        let second = b"Subject: 2\r\n\r\nthe second\r\n";
        let records = message_records(async {
            let (reason, _) = relay_configured("", |mut p| async move {
                p.greet().await;
                let batch = b"MAIL FROM:<alice@a.example>\r\nRCPT TO:<x@b.example>\r\n\
                    RCPT TO:<y@b.example>\r\nDATA\r\n";
                p.exchange(
                    batch,
                    b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n",
                )
                .await;
                // The next transaction is pipelined behind the end of data:
                // the receiver has not accepted alice's message yet when
                // bob's MAIL is read.
                let batch = [
                    &first[..],
                    b".\r\nMAIL FROM:<bob@a.example>\r\nRCPT TO:<z@b.example>\r\nDATA\r\n",
                ]
                .concat();
                p.exchange(
                    &batch,
                    b"250 2.0.0 queued 1\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n",
                )
                .await;
                let batch = [&second[..], b".\r\nQUIT\r\n"].concat();
                p.exchange(&batch, b"250 2.0.0 queued 2\r\n221 2.0.0 Bye\r\n")
                    .await;
                assert_eq!(text(&rest(&mut p.client).await), "");
            })
            .await;
            assert_eq!(reason, CloseReason::ClientQuit);
        })
        .await;
        let facts: Vec<_> = records
            .iter()
            .map(|r| {
                let f = &r["fields"];
                (
                    f["mail_from"].as_str().unwrap().to_owned(),
                    f["recipients"].as_u64().unwrap(),
                    f["size"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            facts,
            [
                ("alice@a.example".to_owned(), 2, first.len() as u64),
                ("bob@a.example".to_owned(), 1, second.len() as u64),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn recipient_reply_after_rset_counts_for_its_own_transaction() {
        let records = message_records(async {
            relay_configured("", |mut p| async move {
                p.greet().await;
                // All pipelined: the replies to the first transaction come
                // after the client has moved on to the second.
                let batch = b"MAIL FROM:<old@a.example>\r\nRCPT TO:<x@b.example>\r\nRSET\r\n\
                    MAIL FROM:<new@a.example>\r\nRCPT TO:<y@b.example>\r\nDATA\r\n";
                let replies = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n\
                    250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n354 go\r\n";
                p.exchange(batch, replies).await;
                p.exchange(b"hi\r\n.\r\n", b"250 2.0.0 queued\r\n").await;
            })
            .await;
        })
        .await;
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0]["fields"]["mail_from"], "new@a.example");
        assert_eq!(records[0]["fields"]["recipients"], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn receiver_that_stops_reading_mid_data_gets_the_client_a_451() {
        let toml = "[server]\nhostname = \"mx.proxy\"\n[timeouts]\nwrite = \"5s\"\n";
        let (reason, _) = relay_configured(toml, |mut p| async move {
            p.greet().await;
            p.exchange(b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n")
                .await;
            p.exchange(b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n").await;
            p.exchange(b"DATA\r\n", b"354 go ahead\r\n").await;
            // Far more than the pipes hold: the relay's writes to the
            // receiver, which reads no more, run out of time.
            let line = [b'x'; 998];
            for _ in 0..1024 {
                if p.client.write_all(&line).await.is_err() {
                    break;
                }
                if p.client.write_all(b"\r\n").await.is_err() {
                    break;
                }
            }
            let _ = p.client.write_all(b".\r\n").await;
            assert_eq!(
                text(&rest(&mut p.client).await),
                "451 4.4.2 mx.proxy receiver failed during the message, try again later\r\n"
            );
        })
        .await;
        assert_eq!(reason, CloseReason::UpstreamError);
    }

    #[tokio::test(start_paused = true)]
    async fn nul_in_a_command_line_is_refused_and_never_forwarded() {
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            p.client
                .write_all(b"MAIL FROM:<a@b>\x00\r\nRCPT TO:<evil@x>\r\n")
                .await
                .unwrap();
            expect_bytes(&mut p.client, b"500 5.5.2 NUL byte in command line\r\n").await;
            expect_bytes(&mut p.upstream, b"RCPT TO:<evil@x>\r\n").await;
            p.upstream
                .write_all(b"503 5.5.1 need MAIL\r\n")
                .await
                .unwrap();
            expect_bytes(&mut p.client, b"503 5.5.1 need MAIL\r\n").await;
            p.exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
            assert_eq!(text(&rest(&mut p.upstream).await), "");
        })
        .await;
        assert_eq!(reason, CloseReason::ClientQuit);
        assert_eq!(errors, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn nul_in_a_sasl_response_cancels_the_exchange() {
        let (reason, errors) = relay_with(|mut p| async move {
            p.greet().await;
            p.exchange(b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n").await;
            p.client.write_all(b"dXNlcg\x00==\r\n").await.unwrap();
            // The receiver gets SASL's cancel, and its answer is the client's.
            expect_bytes(&mut p.upstream, b"*\r\n").await;
            p.upstream
                .write_all(b"501 5.7.0 cancelled\r\n")
                .await
                .unwrap();
            expect_bytes(&mut p.client, b"501 5.7.0 cancelled\r\n").await;
            p.exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
        })
        .await;
        assert_eq!(reason, CloseReason::ClientQuit);
        assert_eq!(errors, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn smtpsmug_nul_endings_close_without_reaching_the_receiver() {
        for ending in [&b"\r\n\x00.\r\n"[..], b"\r\n.\x00\r\n"] {
            let (reason, errors) = relay_with(|mut p| async move {
                p.greet().await;
                p.exchange(b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n")
                    .await;
                p.exchange(b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n").await;
                p.exchange(b"DATA\r\n", b"354 go ahead\r\n").await;
                let smuggled = [
                    &b"Subject: s\r\n\r\nhi"[..],
                    ending,
                    b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n.\r\n",
                ]
                .concat();
                p.client.write_all(&smuggled).await.unwrap();
                assert_eq!(
                    text(&rest(&mut p.client).await),
                    "554 5.6.0 NUL byte in message content, closing\r\n"
                );
                let forwarded = rest(&mut p.upstream).await;
                assert!(!forwarded.contains(&0), "{:?}", text(&forwarded));
                assert!(!text(&forwarded).contains("evil"), "{:?}", text(&forwarded));
            })
            .await;
            assert_eq!(reason, CloseReason::ProtocolError, "{ending:?}");
            assert_eq!(errors, 1, "{ending:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_mode_counts_a_message_over_the_rate_and_refuses_nothing() {
        let toml =
            "[server]\nshadow = true\n[limits]\nmessage_burst = 1\nrecipients_per_message = 1\n";
        let (reason, metrics) = relay_configured(toml, |mut p| async move {
            p.greet().await;
            for _ in 0..2 {
                p.exchange(b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n")
                    .await;
                p.exchange(b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n").await;
                p.exchange(b"RCPT TO:<e@f>\r\n", b"250 2.1.5 Ok\r\n").await;
                p.exchange(b"RSET\r\n", b"250 2.0.0 Ok\r\n").await;
            }
            p.exchange(b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
        })
        .await;
        assert_eq!(reason, CloseReason::ClientQuit);
        let text = metrics.render();
        for line in [
            r#"mailmoat_rate_limit_hits_total{limit="message_rate"} 1"#,
            r#"mailmoat_message_cap_hits_total{cap="recipients_per_message"} 2"#,
            r#"mailmoat_messages_refused_total{limit="message_rate"} 0"#,
            r#"mailmoat_recipients_refused_total{limit="recipients_per_message"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
