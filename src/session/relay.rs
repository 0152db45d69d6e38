//! The SMTP-aware relay between an admitted client and its receiver.
//!
//! One task, one loop: parse what the client sent according to the phase
//! (commands, DATA content, a SASL response, or opaque bytes after
//! STARTTLS), forward it, match each receiver reply to the command it
//! answers, and enforce every deadline. Replies reach the client in command
//! order: `pending` holds one entry per command in flight, and a reply the
//! proxy makes itself waits in that queue behind the receiver's earlier ones.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, Instant};
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
use crate::shaping::{Limit, Shaping};
use crate::smtp::{Command, DataEvent, DataScanner, Reply, ReplyAssembler, Verb};

/// Commands in flight before the proxy stops reading from a pipelining client.
const MAX_PIPELINE: usize = 100;
/// Longest receiver reply accepted (EHLO replies are the long ones).
const MAX_REPLY: usize = 64 * 1024;
/// Deadline for the last words to a client we are closing on.
const GOODBYE_WRITE: Duration = Duration::from_secs(2);
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Mail,
    Rcpt,
    Rset,
    Data,
    DataEnd,
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
    shaping: &'a Shaping,
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
    /// The open transaction, from MAIL to its end.
    message: Option<Message>,
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
            shaping: ctx.shaping,
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
            facts: RelayFacts::default(),
        }
    }

    /// Client bytes that arrived before the relay started (after a PROXY
    /// header, or during a shadow-mode greet pause).
    pub fn preload_client_input(&mut self, bytes: Vec<u8>) {
        self.client_in = bytes;
    }

    /// Relays until the session ends, and says why it ended.
    pub async fn run(&mut self) -> CloseReason {
        loop {
            if let Err(reason) = self.step().await {
                return reason;
            }
        }
    }

    async fn step(&mut self) -> Result<(), CloseReason> {
        self.process_client_input();
        self.flush().await?;
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
                match read {
                    Ok(0) => {
                        return Err(if self.quit_sent { CloseReason::ClientQuit } else { CloseReason::UpstreamClosed });
                    }
                    Ok(_) => {
                        self.last_activity = Instant::now();
                        self.process_upstream_input()?;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "upstream read failed");
                        return Err(CloseReason::UpstreamError);
                    }
                }
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
        let mut bytes = std::mem::take(&mut self.to_client);
        bytes.extend_from_slice(
            format!("421 {status} {} {text}\r\n", self.config.server.hostname).as_bytes(),
        );
        let deadline = GOODBYE_WRITE.min(self.config.timeouts.write);
        if let Ok(n) = write_all_within(&mut self.client, &mut bytes, deadline).await {
            self.metrics.bytes_to_client.inc_by(n as u64);
            self.facts.bytes_to_client += n as u64;
        }
        reason
    }

    async fn flush(&mut self) -> Result<(), CloseReason> {
        let deadline = self.config.timeouts.write;
        match write_all_within(&mut self.upstream, &mut self.to_upstream, deadline).await {
            Ok(0) => {}
            Ok(_) => self.last_activity = Instant::now(),
            Err(e) => {
                tracing::debug!(error = ?e, "upstream write failed");
                return Err(CloseReason::UpstreamError);
            }
        }
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

    /// Counts a protocol error, toward a ban too.
    fn protocol_error(&mut self) {
        self.metrics.protocol_errors.inc();
        self.shaping.event(self.client_ip, BanEvent::ProtocolError);
    }

    /// Queues the proxy's own reply in command order.
    fn answer(&mut self, reply: &[u8], close: Option<CloseReason>) {
        self.pending
            .push_back(Pending::Local(reply.to_vec(), close));
        self.release_local_replies();
    }

    /// Refuses a command over a limit with `reply`.
    fn over_limit(&mut self, limit: Limit, reply: &[u8], close: Option<CloseReason>) {
        if limit != Limit::MessageRate && limit != Limit::RecipientRate {
            // Rate hits are counted by the shaper that refused them.
            self.shaping.violation(self.client_ip, limit);
        }
        self.metrics.message("refused");
        self.shaping.refused(self.client_ip);
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
            // could spoof its way past every per-IP rule.
            let refusal = Refusal::ProxyUntrusted;
            self.metrics.refused(refusal);
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
                {
                    let reply = b"552 5.3.4 message size exceeds fixed maximum message size\r\n";
                    return self.over_limit(Limit::MessageSize, reply, None);
                }
                if !self.shaping.message(self.client_ip) {
                    let reply = b"450 4.7.1 message rate limit exceeded, try again later\r\n";
                    return self.over_limit(Limit::MessageRate, reply, None);
                }
                self.message = Some(Message::new(command.args));
                Expect::Mail
            }
            Verb::Rcpt => {
                let sent = self.message.as_ref().map_or(0, |m| m.recipients_sent);
                if sent >= limits.recipients_per_message {
                    let reply = b"452 4.5.3 too many recipients\r\n";
                    return self.over_limit(Limit::RecipientsPerMessage, reply, None);
                }
                if !self.shaping.recipient(self.client_ip) {
                    let reply = b"450 4.7.1 recipient rate limit exceeded, try again later\r\n";
                    return self.over_limit(Limit::RecipientRate, reply, None);
                }
                if let Some(m) = self.message.as_mut() {
                    m.recipients_sent += 1;
                }
                Expect::Rcpt
            }
            Verb::Rset => Expect::Rset,
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
        self.pending.push_back(Pending::Upstream(expect));
        if matches!(expect, Expect::Data | Expect::Auth | Expect::StartTls) {
            self.awaiting_sync_reply = true;
        }
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
                // Close without the end marker: the receiver drops the
                // unfinished message, so nothing is half-delivered.
                self.protocol_error();
                self.to_client
                    .extend_from_slice(b"421 4.5.0 bare line ending near end of data, closing\r\n");
                self.closing = Some(CloseReason::ProtocolError);
                self.client_in = Vec::new();
                return false;
            }
        };
        if self.data_bytes + taken as u64 > self.config.limits.max_message_size + END_MARKER {
            // Stop before the receiver has it all: without the end marker
            // it discards the message, so nothing over-size is delivered.
            self.over_limit(
                Limit::MessageSize,
                b"552 5.3.4 message size exceeds fixed maximum message size\r\n",
                Some(CloseReason::Limit),
            );
            self.client_in = Vec::new();
            return false;
        }
        if let Some(m) = self.message.as_mut() {
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
            if let Some(m) = self.message.as_mut() {
                m.ended();
            }
            self.phase = Phase::Command;
            self.pending.push_back(Pending::Upstream(Expect::DataEnd));
        }
        true
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
            Some(Expect::Mail) => {
                self.in_transaction = reply.is_positive();
                if !self.in_transaction {
                    self.message = None;
                }
            }
            Some(Expect::Rcpt) => {
                if let Some(m) = self.message.as_mut().filter(|_| reply.is_positive()) {
                    m.recipients += 1;
                }
            }
            Some(Expect::Rset) => {
                self.in_transaction = false;
                self.message = None;
            }
            Some(Expect::Data) => {
                self.awaiting_sync_reply = false;
                if reply.code == 354 {
                    self.phase = Phase::Data(DataScanner::default());
                    self.data_started = Instant::now();
                    self.data_bytes = 0;
                }
            }
            Some(Expect::DataEnd) => {
                self.in_transaction = false;
                let message = self.message.take();
                if reply.is_positive() {
                    self.facts.messages += 1;
                    self.metrics.message("accepted");
                    if let Some(m) = message {
                        m.log_accepted(self.client_ip, &self.helo);
                    }
                } else {
                    self.metrics.message("rejected");
                }
            }
            Some(Expect::Auth) => {
                self.awaiting_sync_reply = false;
                match reply.code {
                    334 => self.phase = Phase::SaslResponse,
                    535 => self.shaping.event(self.client_ip, BanEvent::AuthFailure),
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
        let config = Config::default();
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
        (reason, metrics.protocol_errors.get())
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
}
