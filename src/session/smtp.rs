//! SMTP, as the relay reads it: the protocol module the driver runs.
//!
//! Client lines are read per phase (commands, DATA content, a SASL
//! response, a TLS handshake, or opaque bytes after a relayed STARTTLS),
//! forwarded, and each receiver reply is matched to the command it answers.
//! Replies reach the client in command order: `pending` holds one entry per
//! command in flight, and a reply the proxy makes itself waits in that
//! queue behind the receiver's earlier ones. A message's facts travel in
//! that queue too: the end of its data carries them, so the reply that
//! accepts it logs that message, whatever the client has pipelined since.
//!
//! On a terminating listener (`tls = "starttls"`) the proxy answers
//! STARTTLS itself, the driver handshakes, and the session starts over as
//! RFC 3207 says (the client must EHLO again) with every rule in force.
//! The receiver never sees STARTTLS: its side stays as it was (plaintext on
//! a trusted link, or mailmoat's own TLS).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::io::consume;
use super::message::{self, Message, END_MARKER};
use super::protocol::{Buffers, Farewell, Next, Protocol};
use super::CloseReason;
use crate::admission::Refusal;
use crate::bans::BanEvent;
use crate::config::{Config, TlsMode};
use crate::logins::LoginCount;
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, Sniff};
use crate::shaping::{ClientShaping, Limit, Verdict};
use crate::smtp::{Command, DataEvent, DataScanner, Reply, ReplyAssembler, Verb};
use crate::tls::TlsFacts;

/// Commands in flight before the proxy stops reading from a pipelining client.
pub const MAX_PIPELINE: usize = 100;
/// This module's label in `mailmoat_logins_total`.
const SMTP: crate::config::Protocol = crate::config::Protocol::Smtp;
/// Longest receiver reply accepted (EHLO replies are the long ones).
const MAX_REPLY: usize = 64 * 1024;
/// EHLO extensions the proxy cannot shape; BINARYMIME needs CHUNKING.
const HIDDEN_EXTENSIONS: [&str; 2] = ["CHUNKING", "BINARYMIME"];

#[derive(Debug)]
enum Phase {
    /// Client lines are commands.
    Command,
    /// A command whose reply decides how to read the client (DATA, AUTH,
    /// a relayed STARTTLS) is in flight: nothing more is read until then.
    AwaitingReply,
    /// Message content until the end marker.
    Data(DataScanner),
    /// The next client line answers a `334` challenge.
    SaslResponse,
    /// The proxy's `220` to STARTTLS waits behind earlier replies.
    StartTlsQueued,
    /// The `220` is on its way to the client: the driver handshakes.
    Handshake,
    /// After a relayed STARTTLS (`passthrough`): bytes pass unread.
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

/// What happens once the proxy's own reply has been released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Continue,
    Close(CloseReason),
    /// The reply was `220` to STARTTLS: the handshake comes next.
    StartTls,
}

#[derive(Debug)]
enum Pending {
    Upstream(Expect),
    /// A reply the proxy gives itself.
    Local(Vec<u8>, After),
}

/// What the SMTP module reads but does not own.
pub struct SmtpContext<'a> {
    pub config: &'a Config,
    pub metrics: &'a Metrics,
    pub shaping: ClientShaping<'a>,
    pub client_ip: IpAddr,
    /// How the listener handles TLS, and whether it refuses MAIL and AUTH
    /// in the clear.
    pub tls_mode: TlsMode,
    pub require_tls: bool,
    /// TLS already in force (an implicit-TLS listener).
    pub tls: Option<TlsFacts>,
}

pub struct Smtp<'a> {
    config: &'a Config,
    metrics: &'a Metrics,
    shaping: ClientShaping<'a>,
    client_ip: IpAddr,
    tls_mode: TlsMode,
    require_tls: bool,
    /// The client's session runs inside TLS (its facts went to the
    /// receiver in the PROXY header; only the fact is needed here).
    tls: bool,

    phase: Phase,
    pending: VecDeque<Pending>,
    replies: ReplyAssembler,
    /// Between an accepted MAIL and the end of its message or RSET.
    in_transaction: bool,
    /// The receiver accepted an AUTH (`235`): its identity is settled.
    authenticated: bool,
    quit_sent: bool,
    /// Skipping the rest of an over-long line.
    discarding_line: bool,
    /// The session ends once what is queued for the client is written.
    closing: Option<CloseReason>,

    line_started: Option<Instant>,
    data_started: Instant,
    data_bytes: u64,
    /// The client's HELO/EHLO argument, bounded, for the message log.
    helo: String,
    /// The transaction the client is framing, with its number: from its MAIL
    /// to RSET or the end of its data, when it moves into `pending`. Boxed:
    /// an idle session has none, and should not carry its size.
    message: Option<Box<(u64, Message)>>,
    /// MAIL commands forwarded so far; numbers the transactions.
    mails: u64,
    commands: u64,
    messages: u64,
}

impl<'a> Smtp<'a> {
    /// A session whose receiver's greeting is the first reply to come.
    pub fn new(ctx: SmtpContext<'a>, now: Instant) -> Self {
        Smtp {
            config: ctx.config,
            metrics: ctx.metrics,
            shaping: ctx.shaping,
            client_ip: ctx.client_ip,
            tls_mode: ctx.tls_mode,
            require_tls: ctx.require_tls,
            tls: ctx.tls.is_some(),
            phase: Phase::Command,
            pending: VecDeque::from([Pending::Upstream(Expect::Greeting)]),
            replies: ReplyAssembler::new(MAX_REPLY),
            in_transaction: false,
            authenticated: false,
            quit_sent: false,
            discarding_line: false,
            closing: None,
            line_started: None,
            data_started: now,
            data_bytes: 0,
            helo: String::new(),
            message: None,
            mails: 0,
            commands: 0,
            messages: 0,
        }
    }

    fn reading_lines(&self) -> bool {
        matches!(self.phase, Phase::Command | Phase::SaslResponse)
    }

    /// Handles one complete line if there is one; false when it must wait.
    fn take_line(&mut self, io: &mut Buffers) -> bool {
        if self.pending.len() >= MAX_PIPELINE || self.proxy_header_undecided(io) {
            return false;
        }
        let max = self.config.limits.max_line_length;
        let Some(end) = memchr::memchr(b'\n', &io.client_in).map(|i| i + 1) else {
            if self.discarding_line {
                io.client_in = Vec::new();
            } else if io.client_in.len() >= max {
                io.client_in = Vec::new();
                self.discarding_line = true;
                self.line_too_long(io);
            }
            return false;
        };
        self.line_started = None;
        if std::mem::take(&mut self.discarding_line) {
            consume(&mut io.client_in, end);
            return true;
        }
        let line = &io.client_in[..end];
        if end > max {
            self.line_too_long(io);
        } else if memchr::memchr(0, line).is_some() {
            self.nul_in_line(io);
        } else if matches!(self.phase, Phase::SaslResponse) {
            // Credentials: forwarded, never parsed or logged.
            io.to_upstream.extend_from_slice(line);
            self.expect(Expect::Auth);
        } else {
            self.command(io, end);
        }
        consume(&mut io.client_in, end);
        true
    }

    fn line_too_long(&mut self, io: &mut Buffers) {
        self.protocol_error();
        self.phase = Phase::Command;
        self.answer(io, b"500 5.5.2 line too long\r\n", After::Continue);
    }

    /// A line with a NUL is never forwarded: RFC 5321 text has none, and a
    /// receiver may end the line there and read a command the proxy did not.
    fn nul_in_line(&mut self, io: &mut Buffers) {
        self.protocol_error();
        if matches!(self.phase, Phase::SaslResponse) {
            // The receiver waits for a response: cancel the exchange
            // instead (RFC 4954), and its 501 answers the client.
            io.to_upstream.extend_from_slice(b"*\r\n");
            self.expect(Expect::Auth);
        } else {
            self.answer(
                io,
                b"500 5.5.2 NUL byte in command line\r\n",
                After::Continue,
            );
        }
    }

    /// Counts a protocol error, toward a ban too.
    fn protocol_error(&mut self) {
        self.metrics.protocol_errors.inc();
        self.shaping.event(BanEvent::ProtocolError);
    }

    /// Queues the proxy's own reply in command order.
    fn answer(&mut self, io: &mut Buffers, reply: &[u8], after: After) {
        self.pending
            .push_back(Pending::Local(reply.to_vec(), after));
        self.release_local_replies(io);
    }

    /// Refuses a message or recipient over `limit` with `reply`.
    fn refuse(&mut self, io: &mut Buffers, limit: Limit, reply: &[u8], after: After) {
        self.metrics.refused_over(limit);
        self.answer(io, reply, after);
    }

    /// The first bytes might still be a PROXY header arriving in pieces
    /// (the door catches those already there): held, under the line
    /// timeout, until they can be told apart. The v2 signature begins with
    /// two bare `\r\n` that would otherwise reach the receiver as lines.
    fn proxy_header_undecided(&self, io: &Buffers) -> bool {
        self.commands == 0
            && !self.tls
            && matches!(self.phase, Phase::Command)
            && !io.client_in.is_empty()
            && proxy_protocol::sniff(&io.client_in) == Sniff::Undecided
    }

    /// MAIL and AUTH must wait for STARTTLS: the listener requires TLS and
    /// this client has not started it.
    fn needs_tls_first(&self) -> bool {
        self.require_tls && !self.tls
    }

    fn command(&mut self, io: &mut Buffers, end: usize) {
        if self.commands == 0 && !self.tls && proxy_protocol::looks_like_header(&io.client_in) {
            // Only trusted proxies may say who the client is; anyone else
            // could spoof its way past every per-IP rule. Past the door this
            // is the session's protocol error, not a refused connection.
            let refusal = Refusal::ProxyUntrusted;
            self.protocol_error();
            let reply = refusal.reply(SMTP, &self.config.server.hostname);
            self.answer(
                io,
                reply.as_bytes(),
                After::Close(CloseReason::ProtocolError),
            );
            return;
        }
        let command = Command::parse(&io.client_in[..end]);
        let verb = command.verb;
        self.metrics.command(verb);
        self.commands += 1;
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
            Verb::Mail | Verb::Auth if self.needs_tls_first() => {
                let reply = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
                return self.answer(io, reply, After::Continue);
            }
            Verb::Mail => {
                if message::size_param(command.args)
                    .is_some_and(|size| size > limits.max_message_size)
                    && self.shaping.over(Limit::MessageSize) == Verdict::Refuse
                {
                    let reply = b"552 5.3.4 message size exceeds fixed maximum message size\r\n";
                    return self.refuse(io, Limit::MessageSize, reply, After::Continue);
                }
                if self.shaping.message() == Verdict::Refuse {
                    let reply = b"450 4.7.1 message rate limit exceeded, try again later\r\n";
                    return self.refuse(io, Limit::MessageRate, reply, After::Continue);
                }
                self.mails += 1;
                self.message = Some(Box::new((self.mails, Message::new(command.args))));
                Expect::Mail(self.mails)
            }
            Verb::Rcpt => {
                let sent = self
                    .message
                    .as_deref()
                    .map_or(0, |(_, m)| m.recipients_sent);
                if sent >= limits.recipients_per_message
                    && self.shaping.over(Limit::RecipientsPerMessage) == Verdict::Refuse
                {
                    let reply = b"452 4.5.3 too many recipients\r\n";
                    return self.refuse(io, Limit::RecipientsPerMessage, reply, After::Continue);
                }
                if self.shaping.recipient() == Verdict::Refuse {
                    let reply = b"450 4.7.1 recipient rate limit exceeded, try again later\r\n";
                    return self.refuse(io, Limit::RecipientRate, reply, After::Continue);
                }
                match self.message.as_deref_mut() {
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
            Verb::StartTls => match self.tls_mode {
                TlsMode::Passthrough => Expect::StartTls,
                _ => {
                    let bare = crate::smtp::command::strip_line_ending(command.args).is_empty();
                    return self.starttls(io, bare);
                }
            },
            Verb::Quit => {
                self.quit_sent = true;
                Expect::Quit
            }
            Verb::Bdat => {
                // The chunk that follows is binary of a length only BDAT
                // knows; without CHUNKING advertised there is no resync.
                self.protocol_error();
                let reply = b"503 5.5.1 BDAT without CHUNKING, use DATA\r\n";
                return self.answer(io, reply, After::Close(CloseReason::ProtocolError));
            }
            _ => Expect::Other,
        };
        io.to_upstream.extend_from_slice(&io.client_in[..end]);
        self.expect(expect);
    }

    /// STARTTLS on a listener that terminates TLS (or offers none): the
    /// proxy answers it. Its `220` waits its turn behind earlier replies,
    /// and nothing more is read until the handshake.
    fn starttls(&mut self, io: &mut Buffers, bare: bool) {
        let refusal: &[u8] = match self.tls_mode {
            TlsMode::None | TlsMode::Passthrough => b"502 5.5.1 STARTTLS not offered here\r\n",
            _ if self.tls => b"503 5.5.1 TLS already active\r\n",
            _ if !bare => b"501 5.5.4 Syntax: STARTTLS\r\n",
            // The receiver keeps an identity settled in the clear; RFC 3207
            // would have it forgotten. Refused rather than carried into TLS.
            _ if self.authenticated => b"503 5.5.1 already authenticated\r\n",
            // RFC 3207 drops a transaction's state; its receiver would not.
            _ if self.message.is_some() || self.in_transaction => {
                b"503 5.5.1 MAIL transaction in progress\r\n"
            }
            _ => {
                self.phase = Phase::StartTlsQueued;
                let ready = b"220 2.0.0 Ready to start TLS\r\n".to_vec();
                self.pending
                    .push_back(Pending::Local(ready, After::StartTls));
                self.release_local_replies(io);
                return;
            }
        };
        self.answer(io, refusal, After::Continue);
    }

    /// Queues the receiver's reply to what was just forwarded.
    fn expect(&mut self, expect: Expect) {
        if matches!(expect, Expect::Data | Expect::Auth | Expect::StartTls) {
            self.phase = Phase::AwaitingReply;
        }
        self.pending.push_back(Pending::Upstream(expect));
    }

    fn take_data(&mut self, io: &mut Buffers) -> bool {
        let Phase::Data(scanner) = &mut self.phase else {
            return false;
        };
        let event = scanner.scan(&io.client_in);
        let taken = match event {
            DataEvent::Continue => io.client_in.len(),
            DataEvent::End(n) => n,
            DataEvent::Smuggling(_) => {
                // Receivers disagree on whether this ends the message: one
                // more message may be hidden behind it.
                self.refuse_data(
                    io,
                    b"421 4.5.0 bare line ending near end of data, closing\r\n",
                );
                return false;
            }
            DataEvent::Nul(_) => {
                // A receiver may strip it and see an end of data the proxy
                // did not. Resending the same message would not help: 554.
                self.refuse_data(io, b"554 5.6.0 NUL byte in message content, closing\r\n");
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
                io,
                Limit::MessageSize,
                b"552 5.3.4 message size exceeds fixed maximum message size\r\n",
                After::Close(CloseReason::Limit),
            );
            io.client_in = Vec::new();
            return false;
        }
        if let Some((_, m)) = self.message.as_deref_mut() {
            m.content(&io.client_in[..taken]);
        }
        self.data_bytes += taken as u64;
        if taken == io.client_in.len() && io.to_upstream.is_empty() {
            // The bulk of a message: hand the buffer over, no copy.
            io.to_upstream = std::mem::take(&mut io.client_in);
        } else {
            io.to_upstream.extend_from_slice(&io.client_in[..taken]);
            consume(&mut io.client_in, taken);
        }
        if matches!(event, DataEvent::End(_)) {
            let message = self.message.take().map(|framed| {
                let (_, mut m) = *framed;
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
    fn refuse_data(&mut self, io: &mut Buffers, reply: &[u8]) {
        self.protocol_error();
        io.to_client.extend_from_slice(reply);
        self.closing = Some(CloseReason::ProtocolError);
        io.client_in = Vec::new();
    }

    /// The receiver's EHLO reply as this client may see it: no extension
    /// the proxy cannot shape, the proxy's size limit, and STARTTLS and
    /// AUTH as the listener's TLS policy says.
    fn ehlo_reply(&self, reply: &Reply) -> Reply {
        let mut hidden = HIDDEN_EXTENSIONS.to_vec();
        let offer_starttls = self.tls_mode == TlsMode::Starttls && !self.tls;
        if self.tls_mode != TlsMode::Passthrough {
            hidden.push("STARTTLS");
        }
        if self.needs_tls_first() {
            hidden.push("AUTH");
        }
        let reply = reply
            .without_extensions(&hidden)
            .with_size_limit(self.config.limits.max_message_size);
        if offer_starttls {
            reply.with_extension("STARTTLS")
        } else {
            reply
        }
    }

    fn reply(&mut self, io: &mut Buffers, mut reply: Reply, now: Instant) {
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
            Some(Expect::Ehlo) if reply.code == 250 => reply = self.ehlo_reply(&reply),
            Some(Expect::Mail(id)) => {
                self.in_transaction = reply.is_positive();
                if !self.in_transaction && self.message.as_deref().is_some_and(|(n, _)| *n == id) {
                    self.message = None;
                }
            }
            Some(Expect::Rcpt(id)) => {
                if let Some((_, m)) = self
                    .message
                    .as_deref_mut()
                    .filter(|(n, _)| *n == id && reply.is_positive())
                {
                    m.recipients += 1;
                }
            }
            Some(Expect::Rset) => self.in_transaction = false,
            Some(Expect::Data) => {
                self.phase = Phase::Command;
                if reply.code == 354 {
                    self.phase = Phase::Data(DataScanner::default());
                    self.data_started = now;
                    self.data_bytes = 0;
                }
            }
            Some(Expect::DataEnd(message)) => {
                self.in_transaction = false;
                if reply.is_positive() {
                    self.messages += 1;
                    self.metrics.message(true);
                    if let Some(m) = message {
                        m.log_accepted(self.client_ip, &self.helo);
                    }
                } else {
                    self.metrics.message(false);
                }
            }
            Some(Expect::Auth) => {
                self.phase = Phase::Command;
                match reply.code {
                    334 => self.phase = Phase::SaslResponse,
                    235 => {
                        self.authenticated = true;
                        self.metrics.login(SMTP, LoginCount::Success);
                    }
                    535 => {
                        self.shaping.event(BanEvent::AuthFailure);
                        self.metrics.login(SMTP, LoginCount::Failure);
                    }
                    454 => self.metrics.login(SMTP, LoginCount::Temporary),
                    _ => {}
                }
            }
            Some(Expect::StartTls) => {
                self.phase = Phase::Command;
                if reply.code == 220 {
                    if !io.client_in.is_empty() {
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
        io.to_client.extend_from_slice(&reply.raw);
        self.release_local_replies(io);
    }

    /// The proxy has queued the reply it closes with, behind replies still
    /// owed (the greeting, say): nothing the client sent after that command
    /// is read, so it is neither relayed nor counted.
    fn last_word_queued(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Local(_, After::Close(_))))
    }

    fn close_after(&mut self, reason: CloseReason) {
        self.closing.get_or_insert(reason);
    }

    /// Moves the proxy's own replies at the front of the queue to the client.
    fn release_local_replies(&mut self, io: &mut Buffers) {
        while let Some(Pending::Local(..)) = self.pending.front() {
            let Some(Pending::Local(text, after)) = self.pending.pop_front() else {
                break;
            };
            match after {
                After::Continue => io.to_client.extend_from_slice(&text),
                After::Close(reason) => {
                    io.to_client.extend_from_slice(&text);
                    self.close_after(reason);
                }
                After::StartTls => {
                    // Checked when the client's input is settled: see
                    // `settle_handshake`.
                    self.pending.push_front(Pending::Local(text, after));
                    break;
                }
            }
        }
    }

    /// The `220` to STARTTLS reached the front of the queue: it is sent
    /// only if the client sent nothing after its STARTTLS. Plaintext
    /// pipelined behind it would be read as if it came inside TLS
    /// (CVE-2011-0411); such a client is not told to start TLS at all.
    fn settle_handshake(&mut self, io: &mut Buffers) {
        if !matches!(
            self.pending.front(),
            Some(Pending::Local(_, After::StartTls))
        ) {
            return;
        }
        let Some(Pending::Local(text, _)) = self.pending.pop_front() else {
            return;
        };
        if io.client_in.is_empty() {
            io.to_client.extend_from_slice(&text);
            self.phase = Phase::Handshake;
        } else {
            self.protocol_error();
            io.client_in = Vec::new();
            self.closing = Some(CloseReason::ProtocolError);
        }
    }
}

impl Protocol for Smtp<'_> {
    fn idle_timeout(&self) -> Duration {
        self.config.timeouts.idle
    }

    fn client_input(&mut self, io: &mut Buffers, now: Instant) {
        while !io.client_in.is_empty() && self.closing.is_none() && !self.last_word_queued() {
            let progressed = match self.phase {
                Phase::Command | Phase::SaslResponse => self.take_line(io),
                Phase::Data(_) => self.take_data(io),
                Phase::Opaque => {
                    io.to_upstream.append(&mut io.client_in);
                    true
                }
                Phase::AwaitingReply | Phase::StartTlsQueued | Phase::Handshake => false,
            };
            if !progressed {
                break;
            }
        }
        self.settle_handshake(io);
        // The line timer runs from the first byte of an unfinished line until
        // its end, however slowly the bytes in between trickle.
        let partial_line = self.reading_lines()
            && (self.discarding_line
                || self.proxy_header_undecided(io)
                || (!io.client_in.is_empty() && memchr::memchr(b'\n', &io.client_in).is_none()));
        if partial_line {
            self.line_started.get_or_insert(now);
        } else {
            self.line_started = None;
        }
    }

    fn upstream_input(&mut self, io: &mut Buffers, now: Instant) {
        if matches!(self.phase, Phase::Opaque) {
            io.to_client.append(&mut io.upstream_in);
            return;
        }
        let mut start = 0;
        while let Some(len) = memchr::memchr(b'\n', &io.upstream_in[start..]) {
            let end = start + len + 1;
            let pushed = self.replies.push_line(&io.upstream_in[start..end]);
            start = end;
            match pushed {
                Ok(Some(reply)) => self.reply(io, reply, now),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "receiver sent a malformed reply");
                    self.close_after(CloseReason::UpstreamError);
                    return;
                }
            }
            if matches!(self.phase, Phase::Opaque) {
                // Bytes after the 220 to STARTTLS are the receiver's TLS.
                io.to_client.extend_from_slice(&io.upstream_in[start..]);
                start = io.upstream_in.len();
            }
        }
        consume(&mut io.upstream_in, start);
        if io.upstream_in.len() > MAX_REPLY {
            tracing::warn!("receiver sent an over-long reply line");
            self.close_after(CloseReason::UpstreamError);
        }
        self.settle_handshake(io);
    }

    fn next(&self) -> Next {
        match (self.closing, &self.phase) {
            (Some(reason), _) => Next::Close(reason),
            (None, Phase::Handshake) => Next::StartTls,
            (None, _) => Next::Relay,
        }
    }

    fn tls_started(&mut self, _facts: &TlsFacts, _now: Instant) {
        // RFC 3207: the client starts over with EHLO, knowing nothing from
        // before. The receiver forgets nothing, but there is nothing it
        // could carry over: the proxy refuses STARTTLS inside a
        // transaction and after AUTH, and the next EHLO resets the rest.
        self.tls = true;
        self.phase = Phase::Command;
        self.helo = String::new();
        self.message = None;
    }

    fn tls_failed(&mut self) {
        self.protocol_error();
    }

    fn wants_client_bytes(&self) -> bool {
        self.pending.len() < MAX_PIPELINE
            && !matches!(
                self.phase,
                Phase::AwaitingReply | Phase::StartTlsQueued | Phase::Handshake
            )
    }

    fn deadline(&self) -> Option<(Instant, CloseReason)> {
        let t = &self.config.timeouts;
        let line = self
            .line_started
            .map(|started| (started + t.command_line, CloseReason::LineTimeout));
        let data = match self.phase {
            Phase::Data(_) if t.data_min_rate > 0 => {
                let earned =
                    Duration::from_secs_f64(self.data_bytes as f64 / t.data_min_rate as f64);
                Some((
                    self.data_started + t.command_line + earned,
                    CloseReason::SlowData,
                ))
            }
            _ => None,
        };
        match (line, data) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    fn is_quiet(&self, io: &Buffers) -> bool {
        matches!(self.phase, Phase::Command)
            && self.pending.is_empty()
            && io.client_in.is_empty()
            && !self.in_transaction
    }

    fn client_finished(&self) -> Option<CloseReason> {
        if !self.pending.is_empty() {
            return None;
        }
        Some(if self.quit_sent {
            CloseReason::ClientQuit
        } else {
            CloseReason::ClientClosed
        })
    }

    fn upstream_finished(&self) -> CloseReason {
        if self.quit_sent {
            CloseReason::ClientQuit
        } else {
            CloseReason::UpstreamClosed
        }
    }

    fn farewell(&self, why: Farewell) -> Option<Vec<u8>> {
        let (code, status, text) = match why {
            Farewell::Timeout => (421, "4.4.2", "timeout exceeded, closing connection"),
            Farewell::Shutdown => (421, "4.3.2", "shutting down, try again later"),
            Farewell::Blocked => (421, "4.7.1", "access denied, closing connection"),
            // Owed only to a client mid-DATA: it gets "try again later"
            // instead of the receiver's answer to its message.
            Farewell::ReceiverLost if self.mid_message() => (
                451,
                "4.4.2",
                "receiver failed during the message, try again later",
            ),
            Farewell::ReceiverLost => return None,
        };
        // The enhanced status code comes right after the reply code (RFC
        // 2034), as in Postfix's `421 4.4.2 mx …`.
        let hostname = &self.config.server.hostname;
        Some(format!("{code} {status} {hostname} {text}\r\n").into_bytes())
    }

    fn mid_message(&self) -> bool {
        matches!(self.phase, Phase::Data(_))
    }

    fn commands(&self) -> u64 {
        self.commands
    }

    fn messages(&self) -> u64 {
        self.messages
    }
}

#[cfg(test)]
mod tests {
    //! The SMTP module alone, without sockets: the test fills the buffers
    //! the driver would and reads what the module queued.

    use super::*;
    use crate::tls::TlsVersion;

    use crate::session::fixture::Fixture;

    impl Fixture {
        fn smtp(&self, tls_mode: TlsMode, require_tls: bool) -> Smtp<'_> {
            let ip = "192.0.2.7".parse().unwrap();
            Smtp::new(
                SmtpContext {
                    config: &self.config,
                    metrics: &self.metrics,
                    shaping: self.shaping.client(ip, false),
                    client_ip: ip,
                    tls_mode,
                    require_tls,
                    tls: None,
                },
                Instant::now(),
            )
        }
    }

    /// One session and its buffers, as the driver would hold them.
    struct Session<'a> {
        smtp: Smtp<'a>,
        io: Buffers,
    }

    impl<'a> Session<'a> {
        fn new(smtp: Smtp<'a>) -> Self {
            let mut s = Session {
                smtp,
                io: Buffers::default(),
            };
            assert_eq!(
                s.receiver(b"220 mx.test ESMTP\r\n"),
                "220 mx.test ESMTP\r\n"
            );
            s
        }

        /// Client bytes in; what went to the receiver and what to the client.
        fn client(&mut self, bytes: &[u8]) -> (String, String) {
            self.io.client_in.extend_from_slice(bytes);
            self.smtp.client_input(&mut self.io, Instant::now());
            (take(&mut self.io.to_upstream), take(&mut self.io.to_client))
        }

        /// Receiver bytes in; what went to the client.
        fn receiver(&mut self, bytes: &[u8]) -> String {
            self.io.upstream_in.extend_from_slice(bytes);
            self.smtp.upstream_input(&mut self.io, Instant::now());
            take(&mut self.io.to_client)
        }

        fn handshake_done(&mut self) {
            let facts = TlsFacts {
                version: TlsVersion::V1_3,
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
                sni: None,
            };
            self.smtp.tls_started(&facts, Instant::now());
        }
    }

    fn take(bytes: &mut Vec<u8>) -> String {
        String::from_utf8(std::mem::take(bytes)).unwrap()
    }

    const EHLO_REPLY: &[u8] =
        b"250-mx.test\r\n250-PIPELINING\r\n250-AUTH PLAIN\r\n250 CHUNKING\r\n";

    #[test]
    fn lines_after_a_closing_reply_owed_behind_the_greeting_are_not_read() {
        let f = Fixture::new("");
        let mut s = Session {
            smtp: f.smtp(TlsMode::None, false),
            io: Buffers::default(),
        };
        // A PROXY v2 header before the receiver's greeting: refused as the
        // first command; its NUL-bearing remainder is not a second error.
        let header = crate::proxy_protocol::encode(
            crate::config::ProxyProtocol::V2,
            "1.2.3.4:1111".parse().unwrap(),
            "127.0.0.1:25".parse().unwrap(),
            None,
        );
        assert_eq!(s.client(&header), (String::new(), String::new()));
        assert_eq!(f.metrics.protocol_errors.get(), 1);
        let said = s.receiver(b"220 mx.test ESMTP\r\n");
        assert!(said.starts_with("220 mx.test ESMTP\r\n554 "), "{said:?}");
        assert_eq!(s.smtp.next(), Next::Close(CloseReason::ProtocolError));
        assert_eq!(f.metrics.protocol_errors.get(), 1);
    }

    #[test]
    fn starttls_is_answered_by_the_proxy_and_the_session_starts_over_inside_tls() {
        let f = Fixture::new("");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, false));
        assert_eq!(s.client(b"EHLO c.test\r\n").0, "EHLO c.test\r\n");
        // Offered whether or not the receiver does; CHUNKING still hidden.
        assert_eq!(
            s.receiver(EHLO_REPLY),
            "250-mx.test\r\n250-PIPELINING\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n"
        );
        let (upstream, client) = s.client(b"STARTTLS\r\n");
        assert_eq!(
            (upstream.as_str(), client.as_str()),
            ("", "220 2.0.0 Ready to start TLS\r\n")
        );
        assert_eq!(s.smtp.next(), Next::StartTls);
        assert!(!s.smtp.wants_client_bytes());
        s.handshake_done();
        assert_eq!(s.smtp.next(), Next::Relay);
        assert_eq!(s.client(b"EHLO c.test\r\n").0, "EHLO c.test\r\n");
        // Inside TLS, STARTTLS is no longer offered, nor accepted.
        assert_eq!(
            s.receiver(b"250-mx.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"),
            "250-mx.test\r\n250 AUTH PLAIN\r\n"
        );
        assert_eq!(
            s.client(b"STARTTLS\r\n").1,
            "503 5.5.1 TLS already active\r\n"
        );
    }

    #[test]
    fn plaintext_pipelined_behind_the_proxys_starttls_is_refused_without_a_220() {
        let f = Fixture::new("");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, false));
        let (upstream, client) = s.client(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n");
        assert_eq!((upstream.as_str(), client.as_str()), ("", ""));
        assert_eq!(s.smtp.next(), Next::Close(CloseReason::ProtocolError));
        assert_eq!(f.metrics.protocol_errors.get(), 1);
    }

    #[test]
    fn starttls_waits_for_the_replies_to_commands_pipelined_before_it() {
        let f = Fixture::new("");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, false));
        let (upstream, client) = s.client(b"NOOP\r\nSTARTTLS\r\n");
        assert_eq!((upstream.as_str(), client.as_str()), ("NOOP\r\n", ""));
        assert_eq!(s.smtp.next(), Next::Relay);
        assert_eq!(
            s.receiver(b"250 2.0.0 Ok\r\n"),
            "250 2.0.0 Ok\r\n220 2.0.0 Ready to start TLS\r\n"
        );
        assert_eq!(s.smtp.next(), Next::StartTls);
    }

    #[test]
    fn require_tls_refuses_mail_and_auth_in_the_clear_and_hides_auth() {
        let f = Fixture::new("");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, true));
        s.client(b"EHLO c.test\r\n");
        assert_eq!(
            s.receiver(EHLO_REPLY),
            "250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
        );
        let must = "530 5.7.0 Must issue a STARTTLS command first\r\n";
        assert_eq!(
            s.client(b"MAIL FROM:<a@b.test>\r\n"),
            (String::new(), must.into())
        );
        assert_eq!(
            s.client(b"AUTH PLAIN AGFAYg==\r\n"),
            (String::new(), must.into())
        );
        s.client(b"STARTTLS\r\n");
        s.handshake_done();
        s.client(b"EHLO c.test\r\n");
        assert!(s.receiver(EHLO_REPLY).contains("AUTH PLAIN"));
        assert_eq!(
            s.client(b"MAIL FROM:<a@b.test>\r\n").0,
            "MAIL FROM:<a@b.test>\r\n"
        );
    }

    #[test]
    fn starttls_after_a_successful_auth_is_refused() {
        let f = Fixture::new("");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, false));
        s.client(b"AUTH PLAIN AGFAYg==\r\n");
        s.receiver(b"235 2.7.0 Authentication successful\r\n");
        assert_eq!(
            s.client(b"STARTTLS\r\n").1,
            "503 5.5.1 already authenticated\r\n"
        );
        assert_eq!(s.smtp.next(), Next::Relay);
    }

    #[test]
    fn starttls_with_an_argument_is_a_syntax_error() {
        let f = Fixture::new("");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, false));
        assert_eq!(
            s.client(b"STARTTLS now\r\n").1,
            "501 5.5.4 Syntax: STARTTLS\r\n"
        );
        assert_eq!(s.smtp.next(), Next::Relay);
    }

    #[test]
    fn starttls_inside_a_transaction_is_refused() {
        let f = Fixture::new("");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, false));
        s.client(b"MAIL FROM:<a@b.test>\r\n");
        s.receiver(b"250 2.1.0 Ok\r\n");
        assert_eq!(
            s.client(b"STARTTLS\r\n").1,
            "503 5.5.1 MAIL transaction in progress\r\n"
        );
        assert_eq!(s.smtp.next(), Next::Relay);
    }

    #[test]
    fn a_listener_without_tls_neither_offers_nor_relays_starttls() {
        let f = Fixture::new("");
        let mut s = Session::new(f.smtp(TlsMode::None, false));
        s.client(b"EHLO c.test\r\n");
        assert_eq!(
            s.receiver(b"250-mx.test\r\n250 STARTTLS\r\n"),
            "250 mx.test\r\n"
        );
        assert_eq!(
            s.client(b"STARTTLS\r\n"),
            (
                String::new(),
                "502 5.5.1 STARTTLS not offered here\r\n".into()
            )
        );
    }

    #[test]
    fn the_message_rate_applies_inside_tls() {
        let f = Fixture::new("[limits]\nmessage_burst = 1\n");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, false));
        s.client(b"STARTTLS\r\n");
        s.handshake_done();
        assert_eq!(
            s.client(b"MAIL FROM:<a@b.test>\r\n").0,
            "MAIL FROM:<a@b.test>\r\n"
        );
        s.receiver(b"250 2.1.0 Ok\r\n");
        s.client(b"RSET\r\n");
        s.receiver(b"250 2.0.0 Ok\r\n");
        assert_eq!(
            s.client(b"MAIL FROM:<a@b.test>\r\n"),
            (
                String::new(),
                "450 4.7.1 message rate limit exceeded, try again later\r\n".into()
            )
        );
    }

    #[test]
    fn auth_failures_inside_tls_are_counted_toward_a_ban() {
        let f = Fixture::new("[autoban]\nauth_failures = 1\n");
        let mut s = Session::new(f.smtp(TlsMode::Starttls, false));
        s.client(b"STARTTLS\r\n");
        s.handshake_done();
        s.client(b"AUTH PLAIN AGFAYg==\r\n");
        s.receiver(b"535 5.7.8 authentication failed\r\n");
        assert!(f.shaping.bans().is_banned("192.0.2.7".parse().unwrap()));
    }
}
