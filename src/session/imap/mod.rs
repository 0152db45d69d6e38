//! IMAP, as the relay reads it: the protocol module the driver runs on an
//! `imap` listener.
//!
//! Before login every client command is read (`command.rs`: tag, name,
//! arguments, literals by count) and bounded: line length, literal size,
//! commands before login, and a line started must finish in time. The
//! receiver's responses are framed (`reply.rs`) and each tagged status is
//! matched by tag to the command it ends, in `pending`, where the proxy's
//! own answers wait their turn behind earlier commands'. A login's status
//! is its verdict (`LoginContext::outcome`): `OK` logs in, `NO
//! [AUTHENTICATIONFAILED]` is a failure, any other `NO` a temporary one,
//! `BAD` a protocol error. When the account is under attack the status is
//! held until the login's `release_at` (the account tarpit), and the client
//! waits for it.
//!
//! After a successful login (or a `* PREAUTH` greeting) the session is
//! relayed unread both ways, under the authenticated idle limit.
//!
//! On a listener that terminates TLS the proxy offers and answers STARTTLS
//! itself and the session starts over inside TLS (RFC 9051 §6.2.1); the
//! receiver's link stays as it was, so its STARTTLS and LOGINDISABLED are
//! not the client's business. Under `passthrough` STARTTLS goes to the
//! receiver, and once it says OK the bytes pass unread.

pub mod command;
pub mod reply;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::io::consume;
use super::login::{Attempt, LoginContext, LoginOutcome, MailboxContext};
use super::protocol::{Buffers, Farewell, Next, Protocol};
use super::CloseReason;
use crate::config::{Config, TlsMode};
use crate::sasl::{self, Mechanism};
use crate::tls::TlsFacts;
use command::{parse_head, Args, End, Name};
use reply::{CapabilityEdit, Framer, Kind, Status};

/// Commands in flight before the proxy stops reading from a pipelining client.
const MAX_PIPELINE: usize = 100;
/// Longest receiver response read before login (a greeting with its
/// capabilities, an ID response).
const MAX_RESPONSE: usize = 64 * 1024;

/// What the proxy bounds before login.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    max_line: usize,
    max_literal: u64,
    commands: u64,
    preauth_idle: Duration,
    authenticated_idle: Duration,
}

/// How the client's bytes are read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A command's first line, or the rest of its line after a literal.
    Line,
    /// Bytes of a literal still to come.
    Literal { remaining: u64 },
    /// Nothing is read from the client until the receiver answers the
    /// command in flight.
    Awaiting(Wait),
    /// The next client line answers the receiver's SASL challenge.
    SaslResponse,
    /// The proxy's OK to STARTTLS waits behind earlier replies.
    StartTlsQueued,
    /// The OK is on its way to the client: the driver handshakes.
    Handshake,
    /// Logged in, or TLS relayed to the receiver: bytes pass unread.
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// A `+` before the client sends a literal of this length (or the
    /// command's tagged status, refusing it).
    Literal(u64),
    /// A SASL challenge, or the status that ends the exchange.
    Sasl,
    /// The command's status: a login's verdict, LOGOUT, a relayed STARTTLS.
    Status,
}

/// What the status of a forwarded command decides.
#[derive(Debug)]
enum Expect {
    /// LOGIN or AUTHENTICATE, with the attempt once its credentials are
    /// complete. `cancelled`: the client cancelled the exchange (`*`), so
    /// the receiver's BAD is no protocol error.
    Login {
        attempt: Option<Attempt>,
        cancelled: bool,
    },
    Logout,
    /// STARTTLS relayed to the receiver (`passthrough`).
    StartTls,
    Other,
}

/// What happens once the proxy's own reply has been released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Continue,
    Close(CloseReason),
    /// The OK to STARTTLS: the handshake comes next.
    StartTls,
}

#[derive(Debug)]
enum Pending {
    /// The receiver's greeting.
    Greeting,
    Upstream {
        tag: Vec<u8>,
        expect: Expect,
    },
    /// A reply the proxy gives itself.
    Local(Vec<u8>, After),
}

/// The command being read, from its first line to its end.
#[derive(Debug)]
struct Reading {
    name: Name,
    args: Args,
    /// Went to the receiver; else the proxy refused it and the rest of it
    /// (the lines and literals the client sends anyway) is skipped unread.
    forwarded: bool,
    /// The bytes of a literal whose value is kept (credentials).
    literal: Vec<u8>,
}

/// An AUTHENTICATE exchange in flight.
#[derive(Debug)]
struct Sasl {
    mechanism: Mechanism,
    /// Client responses so far (the initial response counts).
    responses: u8,
    /// LOGIN's user, until its password comes.
    user: Option<Vec<u8>>,
}

/// A login's status, held until the account tarpit releases it, with
/// whether it logged the client in. Everything the receiver sends after
/// it waits too.
#[derive(Debug)]
struct Held {
    until: Instant,
    status: Vec<u8>,
    success: bool,
}

pub struct Imap<'a> {
    config: &'a Config,
    login: LoginContext<'a>,
    tls_mode: TlsMode,
    require_tls: bool,
    /// The client's session runs inside TLS.
    tls: bool,
    bounds: Bounds,

    phase: Phase,
    reading: Option<Reading>,
    sasl: Option<Sasl>,
    pending: VecDeque<Pending>,
    framer: Framer,
    held: Option<Held>,
    authenticated: bool,
    logout_sent: bool,
    /// The session ends once what is queued for the client is written.
    closing: Option<CloseReason>,
    /// The client was cut off in the middle of a literal it is still
    /// sending: the driver lingers so it reads why.
    cut_mid_literal: bool,
    /// After login: the last byte relayed to the client ended a line, so
    /// a farewell would not land inside a response.
    at_line_start: bool,
    line_started: Option<Instant>,
    commands: u64,
}

impl<'a> Imap<'a> {
    /// A session whose receiver's greeting is the first response to come.
    pub fn new(ctx: MailboxContext<'a>, _now: Instant) -> Self {
        let config = ctx.config;
        Imap {
            config,
            login: ctx.login,
            tls_mode: ctx.tls_mode,
            require_tls: ctx.require_tls,
            tls: ctx.tls,
            bounds: Bounds {
                max_line: config.limits.max_line_length,
                max_literal: config.mailbox.max_literal as u64,
                commands: u64::from(config.mailbox.preauth_commands),
                preauth_idle: config.mailbox.preauth_idle,
                authenticated_idle: config.mailbox.authenticated_idle,
            },
            phase: Phase::Line,
            reading: None,
            sasl: None,
            pending: VecDeque::from([Pending::Greeting]),
            framer: Framer::default(),
            held: None,
            authenticated: false,
            logout_sent: false,
            closing: None,
            cut_mid_literal: false,
            at_line_start: true,
            line_started: None,
            commands: 0,
        }
    }

    /// Logins must wait for STARTTLS: the listener requires TLS and this
    /// client has not started it.
    fn needs_tls_first(&self) -> bool {
        self.require_tls && !self.tls
    }

    /// Counts a protocol error, toward a ban too.
    fn protocol_error(&self) {
        self.login.protocol_error();
    }

    fn close_after(&mut self, reason: CloseReason) {
        self.closing.get_or_insert(reason);
    }

    /// Queues the proxy's own reply in command order.
    fn answer(&mut self, io: &mut Buffers, reply: Vec<u8>, after: After) {
        self.pending.push_back(Pending::Local(reply, after));
        self.release_local_replies(io);
    }

    fn tagged_answer(&mut self, io: &mut Buffers, tag: &[u8], text: &str) {
        let mut reply = tag.to_vec();
        reply.push(b' ');
        reply.extend_from_slice(text.as_bytes());
        reply.extend_from_slice(b"\r\n");
        self.answer(io, reply, After::Continue);
    }

    /// `* BYE` and close once it is written, in its turn.
    fn bye(&mut self, io: &mut Buffers, text: &str, reason: CloseReason) {
        let reply = format!("* BYE {text}\r\n").into_bytes();
        self.answer(io, reply, After::Close(reason));
    }

    /// The proxy has queued the reply it closes with: nothing the client
    /// sent after that is read.
    fn last_word_queued(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Local(_, After::Close(_))))
    }

    /// Moves the proxy's own replies at the front of the queue to the client.
    fn release_local_replies(&mut self, io: &mut Buffers) {
        while let Some(Pending::Local(_, after)) = self.pending.front() {
            if *after == After::StartTls {
                // Sent only if nothing follows it: see `settle_handshake`.
                break;
            }
            let Some(Pending::Local(text, after)) = self.pending.pop_front() else {
                break;
            };
            io.to_client.extend_from_slice(&text);
            if let After::Close(reason) = after {
                self.close_after(reason);
            }
        }
    }

    /// The OK to STARTTLS reached the front of the queue: it is sent only
    /// if the client sent nothing after its STARTTLS. Plaintext pipelined
    /// behind it would be read as if it came inside TLS (CVE-2011-0411,
    /// CVE-2021-38371 for IMAP); such a client is not told to start TLS.
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
            self.close_after(CloseReason::ProtocolError);
        }
    }

    // ---- The client's side ----

    /// Handles one complete line if there is one; false when it must wait.
    fn take_line(&mut self, io: &mut Buffers, now: Instant) -> bool {
        if self.pending.len() >= MAX_PIPELINE {
            return false;
        }
        let max = self.bounds.max_line;
        let Some(end) = memchr::memchr(b'\n', &io.client_in).map(|i| i + 1) else {
            if io.client_in.len() >= max {
                self.line_too_long(io);
            }
            return false;
        };
        if end > max {
            self.line_too_long(io);
            return false;
        }
        if self.phase == Phase::SaslResponse {
            self.sasl_response(io, end, now);
        } else if self.reading.is_some() {
            self.next_line(io, end, now);
        } else {
            self.first_line(io, end, now);
        }
        consume(&mut io.client_in, end);
        true
    }

    /// A line over `limits.max_line_length`: there is no telling where the
    /// command would end for the receiver, so the session ends here.
    fn line_too_long(&mut self, io: &mut Buffers) {
        self.protocol_error();
        io.client_in = Vec::new();
        self.bye(
            io,
            "[TOOBIG] command line too long",
            CloseReason::ProtocolError,
        );
    }

    fn first_line(&mut self, io: &mut Buffers, end: usize, now: Instant) {
        self.commands += 1;
        if self.commands > self.bounds.commands {
            io.client_in = Vec::new();
            return self.bye(io, "too many commands before login", CloseReason::Limit);
        }
        let line = &io.client_in[..end];
        let head = match parse_head(line) {
            Ok(head) => head,
            Err(e) => {
                tracing::debug!(error = %e, "IMAP command refused");
                self.protocol_error();
                return self.answer(
                    io,
                    b"* BAD invalid command line\r\n".to_vec(),
                    After::Continue,
                );
            }
        };
        let tag = head.tag.to_vec();
        let name = head.name;
        let mut args = if matches!(name, Name::Login | Name::Authenticate) {
            Args::kept()
        } else {
            Args::checked()
        };
        let ends = match args.scan(&line[head.rest..]) {
            Ok(ends) => ends,
            Err(e) => {
                tracing::debug!(error = %e, command = name.as_str(), "IMAP command refused");
                self.protocol_error();
                return self.tagged_answer(io, &tag, "BAD invalid arguments");
            }
        };
        let refusal = match name {
            Name::StartTls if self.tls_mode != TlsMode::Passthrough => {
                let bare = args.count() == 0 && ends == End::Line;
                match self.starttls_refusal(bare) {
                    Some(refusal) => Some(refusal),
                    None => return self.start_tls(io, &tag),
                }
            }
            Name::Login | Name::Authenticate if self.needs_tls_first() => {
                Some("NO [PRIVACYREQUIRED] Must issue a STARTTLS command first")
            }
            _ => None,
        };
        let mut reading = Reading {
            name,
            args,
            forwarded: false,
            literal: Vec::new(),
        };
        if let Some(text) = refusal {
            self.tagged_answer(io, &tag, text);
            return self.line_ends(io, reading, ends, now);
        }
        if let End::Literal { len, sync } = ends {
            if len > self.bounds.max_literal {
                return self.literal_too_long(io, Some(&tag), sync);
            }
        }
        reading.forwarded = true;
        io.to_upstream.extend_from_slice(&io.client_in[..end]);
        let expect = match name {
            Name::Login | Name::Authenticate => Expect::Login {
                attempt: None,
                cancelled: false,
            },
            Name::Logout => Expect::Logout,
            Name::StartTls => Expect::StartTls,
            _ => Expect::Other,
        };
        self.pending.push_back(Pending::Upstream { tag, expect });
        self.line_ends(io, reading, ends, now);
    }

    /// A line of a command after one of its literals.
    fn next_line(&mut self, io: &mut Buffers, end: usize, now: Instant) {
        let Some(mut reading) = self.reading.take() else {
            return;
        };
        let ends = match reading.args.scan(&io.client_in[..end]) {
            Ok(ends) => ends,
            Err(e) => {
                tracing::debug!(error = %e, "IMAP command refused mid-way");
                return self.broken_command(io, reading.forwarded);
            }
        };
        if reading.forwarded {
            if let End::Literal { len, sync } = ends {
                if len > self.bounds.max_literal {
                    // The receiver has the start of the command and waits
                    // for the rest, which will not come: this ends here.
                    // Its status will not come: the proxy answers instead.
                    let tag = match self.pending.pop_back() {
                        Some(Pending::Upstream { tag, .. }) => tag,
                        _ => b"*".to_vec(),
                    };
                    self.literal_too_long(io, Some(&tag), sync);
                    io.client_in = Vec::new();
                    return self.bye(
                        io,
                        "[TOOBIG] literal too long before login",
                        CloseReason::ProtocolError,
                    );
                }
            }
            io.to_upstream.extend_from_slice(&io.client_in[..end]);
        }
        self.line_ends(io, reading, ends, now);
    }

    /// A command part of which the receiver has: it waits for the rest,
    /// which can no longer come in a form both sides read alike.
    fn broken_command(&mut self, io: &mut Buffers, forwarded: bool) {
        self.protocol_error();
        self.phase = Phase::Line;
        if forwarded {
            // Its status will not come: the proxy has the last word.
            if matches!(self.pending.back(), Some(Pending::Upstream { .. })) {
                self.pending.pop_back();
            }
            io.client_in = Vec::new();
            self.bye(io, "invalid command", CloseReason::ProtocolError);
        }
    }

    /// A literal over `mailbox.max_literal` before login. One the client
    /// waits to be invited to send is refused and never sent; one it sends
    /// unasked (`{n+}`) ends the session.
    fn literal_too_long(&mut self, io: &mut Buffers, tag: Option<&[u8]>, sync: bool) {
        self.protocol_error();
        self.phase = Phase::Line;
        match tag {
            Some(tag) if sync => {
                self.tagged_answer(io, tag, "BAD [TOOBIG] literal too long before login")
            }
            _ => {
                self.cut_mid_literal = true;
                io.client_in = Vec::new();
                self.bye(
                    io,
                    "[TOOBIG] literal too long before login",
                    CloseReason::ProtocolError,
                );
            }
        }
    }

    /// After a command's line: its end, or the literal that follows.
    fn line_ends(&mut self, io: &mut Buffers, reading: Reading, ends: End, now: Instant) {
        match ends {
            End::Line => {
                self.phase = Phase::Line;
                if reading.forwarded {
                    self.command_complete(reading, now);
                }
            }
            // Refused: the client will not send it.
            End::Literal { sync: true, .. } if !reading.forwarded => self.phase = Phase::Line,
            End::Literal { len, sync: true } => {
                self.phase = Phase::Awaiting(Wait::Literal(len));
                self.reading = Some(reading);
            }
            End::Literal { len, sync: false } if len > self.bounds.max_literal => {
                self.literal_too_long(io, None, false)
            }
            End::Literal { len, sync: false } => {
                self.phase = Phase::Literal { remaining: len };
                self.reading = Some(reading);
            }
        }
    }

    fn take_literal(&mut self, io: &mut Buffers) -> bool {
        let (Phase::Literal { remaining }, Some(reading)) = (self.phase, self.reading.as_mut())
        else {
            return false;
        };
        let n =
            usize::try_from(remaining).map_or(io.client_in.len(), |r| r.min(io.client_in.len()));
        let bytes = &io.client_in[..n];
        if reading.forwarded {
            io.to_upstream.extend_from_slice(bytes);
        }
        if reading.args.keeps_literal() {
            reading.literal.extend_from_slice(bytes);
        }
        let remaining = remaining - n as u64;
        consume(&mut io.client_in, n);
        if remaining == 0 {
            let literal = std::mem::take(&mut reading.literal);
            reading.args.literal(&literal);
            self.phase = Phase::Line;
        } else {
            self.phase = Phase::Literal { remaining };
        }
        true
    }

    /// The whole command is with the receiver.
    fn command_complete(&mut self, reading: Reading, now: Instant) {
        let values = reading.args.values();
        match reading.name {
            Name::Login if reading.args.count() == 2 && values.len() == 2 => {
                let attempt = self.login.attempt(Some(&values[0]), Some(&values[1]), now);
                self.set_attempt(attempt);
                self.phase = Phase::Awaiting(Wait::Status);
            }
            Name::Authenticate if (1..=2).contains(&reading.args.count()) => {
                let mechanism = Mechanism::parse(values.first().map_or(&[][..], |v| v));
                self.sasl = Some(Sasl {
                    mechanism,
                    responses: 0,
                    user: None,
                });
                if mechanism == Mechanism::Other {
                    let attempt = self.login.attempt(None, None, now);
                    self.set_attempt(attempt);
                }
                if let Some(initial) = values.get(1) {
                    self.sasl_step(initial, now);
                }
                self.phase = Phase::Awaiting(Wait::Sasl);
            }
            // The receiver refuses it (BAD): a protocol error then.
            Name::Login | Name::Authenticate => self.phase = Phase::Awaiting(Wait::Status),
            Name::Logout => {
                self.logout_sent = true;
                self.phase = Phase::Awaiting(Wait::Status);
            }
            Name::StartTls => self.phase = Phase::Awaiting(Wait::Status),
            _ => {}
        }
    }

    /// Gives the login in flight (the last command forwarded) its attempt.
    fn set_attempt(&mut self, new: Attempt) {
        if let Some(Pending::Upstream {
            expect: Expect::Login { attempt, .. },
            ..
        }) = self.pending.back_mut()
        {
            attempt.get_or_insert(new);
        }
    }

    /// A client line answering a SASL challenge: forwarded as it is (never
    /// logged); credentials read from it where the mechanism shows them.
    fn sasl_response(&mut self, io: &mut Buffers, end: usize, now: Instant) {
        let line = command::strip_line_ending(&io.client_in[..end]);
        self.phase = Phase::Awaiting(Wait::Sasl);
        if line == b"*" || memchr::memchr(0, line).is_some() {
            if line != b"*" {
                // A receiver may end the line at the NUL and read what
                // follows as a command: cancel the exchange instead.
                self.protocol_error();
            }
            io.to_upstream.extend_from_slice(b"*\r\n");
            if let Some(Pending::Upstream {
                expect: Expect::Login { cancelled, .. },
                ..
            }) = self.pending.back_mut()
            {
                *cancelled = true;
            }
            self.sasl = None;
            return;
        }
        let line = line.to_vec();
        io.to_upstream.extend_from_slice(&io.client_in[..end]);
        self.sasl_step(&line, now);
    }

    /// One client response of the exchange: the attempt once the
    /// credentials are complete (or cannot be read).
    fn sasl_step(&mut self, response: &[u8], now: Instant) {
        let Some(sasl) = self.sasl.as_mut() else {
            return;
        };
        sasl.responses = sasl.responses.saturating_add(1);
        let decoded = sasl::decode(response);
        let attempt = match (sasl.mechanism, sasl.responses) {
            (Mechanism::Plain, 1) => {
                let credentials = decoded.as_deref().and_then(sasl::plain);
                let (user, password) = credentials.unzip();
                Some(self.login.attempt(user, password, now))
            }
            (Mechanism::Login, 1) => {
                sasl.user = decoded;
                None
            }
            (Mechanism::Login, 2) => {
                let user = sasl.user.take();
                Some(self.login.attempt(user.as_deref(), decoded.as_deref(), now))
            }
            _ => None,
        };
        if let Some(attempt) = attempt {
            self.set_attempt(attempt);
        }
    }

    /// Why the proxy refuses STARTTLS on a listener that terminates TLS
    /// (or offers none), if it does.
    fn starttls_refusal(&self, bare: bool) -> Option<&'static str> {
        match self.tls_mode {
            TlsMode::None | TlsMode::Passthrough => Some("BAD STARTTLS not offered here"),
            _ if self.tls => Some("BAD TLS already active"),
            _ if !bare => Some("BAD Syntax: STARTTLS"),
            _ => None,
        }
    }

    /// The proxy answers STARTTLS. Its OK waits its turn behind earlier
    /// replies, and nothing more is read until the handshake.
    fn start_tls(&mut self, io: &mut Buffers, tag: &[u8]) {
        self.phase = Phase::StartTlsQueued;
        let mut ok = tag.to_vec();
        ok.extend_from_slice(b" OK Begin TLS negotiation now\r\n");
        self.pending.push_back(Pending::Local(ok, After::StartTls));
        self.release_local_replies(io);
    }

    // ---- The receiver's side ----

    /// How this client sees the receiver's capabilities.
    fn capability_edit(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut remove = Vec::new();
        let mut add = Vec::new();
        if self.tls_mode != TlsMode::Passthrough {
            remove.push("STARTTLS");
        }
        if matches!(self.tls_mode, TlsMode::Starttls | TlsMode::Implicit) {
            // The receiver sees a plaintext trusted link; the client's
            // link is the proxy's business.
            remove.push("LOGINDISABLED");
        }
        if self.tls_mode == TlsMode::Starttls && !self.tls {
            add.push("STARTTLS");
        }
        if self.needs_tls_first() {
            remove.push("AUTH=");
            add.push("LOGINDISABLED");
        }
        (remove, add)
    }

    fn edit_capabilities(&self, raw: Vec<u8>) -> Vec<u8> {
        let (remove, add) = self.capability_edit();
        let edit = CapabilityEdit {
            remove: &remove,
            add: &add,
        };
        reply::edit_capabilities(&raw, &edit).unwrap_or(raw)
    }

    fn response(&mut self, io: &mut Buffers, raw: Vec<u8>, now: Instant) {
        let (kind, tag): (Kind<'static>, Vec<u8>) = match reply::kind(&raw) {
            Ok(Kind::Tagged(tag, status)) => (Kind::Tagged(b"", status), tag.to_vec()),
            Ok(Kind::Untagged(status)) => (Kind::Untagged(status), Vec::new()),
            Ok(Kind::Continuation) => (Kind::Continuation, Vec::new()),
            Err(e) => {
                tracing::warn!(error = %e, "receiver sent a malformed IMAP response");
                return self.close_after(CloseReason::UpstreamError);
            }
        };
        if matches!(self.pending.front(), Some(Pending::Greeting)) {
            self.pending.pop_front();
            return self.greeting(io, kind, raw);
        }
        match kind {
            Kind::Continuation => {
                io.to_client.extend_from_slice(&raw);
                match self.phase {
                    Phase::Awaiting(Wait::Literal(len)) => {
                        self.phase = Phase::Literal { remaining: len }
                    }
                    Phase::Awaiting(Wait::Sasl) => self.phase = Phase::SaslResponse,
                    _ => {}
                }
            }
            Kind::Untagged(_) => {
                let raw = self.edit_capabilities(raw);
                io.to_client.extend_from_slice(&raw);
            }
            Kind::Tagged(_, status) => self.tagged(io, &tag, status, raw, now),
        }
        self.release_local_replies(io);
    }

    fn greeting(&mut self, io: &mut Buffers, kind: Kind, raw: Vec<u8>) {
        match kind {
            Kind::Untagged(Some(Status::Ok)) => {
                let raw = self.edit_capabilities(raw);
                io.to_client.extend_from_slice(&raw);
            }
            Kind::Untagged(Some(Status::Preauth)) => {
                io.to_client.extend_from_slice(&raw);
                self.logged_in(io);
            }
            Kind::Untagged(Some(Status::Bye)) => {
                io.to_client.extend_from_slice(&raw);
                self.close_after(CloseReason::UpstreamClosed);
            }
            _ => {
                tracing::warn!("receiver's first response is not an IMAP greeting");
                self.close_after(CloseReason::UpstreamError);
            }
        }
        self.release_local_replies(io);
    }

    /// A tagged status: the end of the command with that tag.
    fn tagged(&mut self, io: &mut Buffers, tag: &[u8], status: Status, raw: Vec<u8>, now: Instant) {
        let at = self
            .pending
            .iter()
            .position(|p| matches!(p, Pending::Upstream { tag: t, .. } if t == tag));
        let in_flight = at.is_some_and(|i| {
            !self
                .pending
                .iter()
                .skip(i + 1)
                .any(|p| matches!(p, Pending::Upstream { .. }))
        });
        let expect = match at.and_then(|i| self.pending.remove(i)) {
            Some(Pending::Upstream { expect, .. }) => Some(expect),
            _ => None,
        };
        let reading_it = self.reading.as_ref().is_some_and(|r| r.forwarded);
        if in_flight
            && (reading_it || matches!(self.phase, Phase::Awaiting(_) | Phase::SaslResponse))
        {
            // The command the client is in the middle of is over: the
            // receiver refused its literal, or ended its exchange.
            self.reading = None;
            self.sasl = None;
            self.phase = Phase::Line;
        }
        let raw = if status == Status::Ok {
            self.edit_capabilities(raw)
        } else {
            raw
        };
        match expect {
            Some(Expect::Login { attempt, cancelled }) => {
                return self.login_status(io, status, raw, attempt, cancelled, now)
            }
            Some(Expect::Logout) => self.close_after(CloseReason::ClientQuit),
            Some(Expect::StartTls) if status == Status::Ok => {
                if !io.client_in.is_empty() {
                    // Plaintext sent after STARTTLS would be taken as
                    // inside TLS by a vulnerable receiver.
                    self.protocol_error();
                    return self.close_after(CloseReason::ProtocolError);
                }
                self.phase = Phase::Opaque;
            }
            Some(Expect::Other | Expect::StartTls) if status == Status::Bad => {
                self.protocol_error()
            }
            _ => {}
        }
        io.to_client.extend_from_slice(&raw);
    }

    /// A login's verdict, counted now, and its status released now or
    /// when the account tarpit says.
    fn login_status(
        &mut self,
        io: &mut Buffers,
        status: Status,
        raw: Vec<u8>,
        attempt: Option<Attempt>,
        cancelled: bool,
        now: Instant,
    ) {
        let outcome = match status {
            Status::Ok => Some(LoginOutcome::Success),
            Status::No if reply::code(&raw).as_deref() == Some(b"AUTHENTICATIONFAILED") => {
                Some(LoginOutcome::Failure)
            }
            Status::No => Some(LoginOutcome::Temporary),
            _ => {
                if !cancelled {
                    self.protocol_error();
                }
                None
            }
        };
        let attempt = match (attempt, outcome) {
            (Some(attempt), _) => Some(attempt),
            // The exchange ended before its credentials could be read.
            (None, Some(_)) => Some(self.login.attempt(None, None, now)),
            (None, None) => None,
        };
        if let (Some(attempt), Some(outcome)) = (&attempt, outcome) {
            self.login.outcome(attempt, outcome);
        }
        let success = status == Status::Ok;
        match attempt {
            Some(attempt) if attempt.release_at > now => {
                self.phase = Phase::Awaiting(Wait::Status);
                self.held = Some(Held {
                    until: attempt.release_at,
                    status: raw,
                    success,
                });
            }
            _ => self.release_login_status(io, raw, success),
        }
    }

    fn release_login_status(&mut self, io: &mut Buffers, raw: Vec<u8>, success: bool) {
        io.to_client.extend_from_slice(&raw);
        if success {
            self.logged_in(io);
        } else if self.phase == Phase::Awaiting(Wait::Status) {
            self.phase = Phase::Line;
        }
    }

    /// From here on the session is relayed unread.
    fn logged_in(&mut self, io: &mut Buffers) {
        self.authenticated = true;
        self.phase = Phase::Opaque;
        self.reading = None;
        self.sasl = None;
        self.line_started = None;
        // Replies owed to commands pipelined before the login pass unread.
        self.pending.retain(|p| matches!(p, Pending::Local(..)));
        self.release_local_replies(io);
    }

    fn relay_unread(&mut self, io: &mut Buffers) {
        if let Some(&last) = io.upstream_in.last() {
            self.at_line_start = last == b'\n';
        }
        if io.to_client.is_empty() {
            io.to_client = std::mem::take(&mut io.upstream_in);
        } else {
            io.to_client.append(&mut io.upstream_in);
        }
    }

    /// Commands allowed before login.
    pub fn preauth_commands(&self) -> u64 {
        self.bounds.commands
    }

    /// The client's bytes are read now, a command being in the middle.
    fn mid_command(&self, io: &Buffers) -> bool {
        match self.phase {
            Phase::Literal { .. } => true,
            Phase::Line | Phase::SaslResponse => self.reading.is_some() || !io.client_in.is_empty(),
            _ => false,
        }
    }
}

impl Protocol for Imap<'_> {
    fn idle_timeout(&self) -> Duration {
        if self.authenticated {
            self.bounds.authenticated_idle
        } else {
            self.bounds.preauth_idle
        }
    }

    fn wake_at(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| h.until)
    }

    /// The account tarpit's hold is over: the login status goes out, and
    /// what the receiver sent after it is read.
    fn woken(&mut self, io: &mut Buffers, now: Instant) {
        let Some(held) = self.held.take_if(|h| h.until <= now) else {
            return;
        };
        self.release_login_status(io, held.status, held.success);
        self.release_local_replies(io);
        if !io.upstream_in.is_empty() {
            self.upstream_input(io, now);
        }
    }

    fn client_input(&mut self, io: &mut Buffers, now: Instant) {
        while !io.client_in.is_empty() && self.closing.is_none() && !self.last_word_queued() {
            let progressed = match self.phase {
                Phase::Line | Phase::SaslResponse => self.take_line(io, now),
                Phase::Literal { .. } => self.take_literal(io),
                Phase::Opaque => {
                    io.to_upstream.append(&mut io.client_in);
                    true
                }
                Phase::Awaiting(_) | Phase::StartTlsQueued | Phase::Handshake => false,
            };
            if !progressed {
                break;
            }
        }
        self.settle_handshake(io);
        // The line timer runs from the first byte of an unfinished command
        // until its end, however slowly the bytes in between trickle.
        if self.closing.is_none() && self.mid_command(io) {
            self.line_started.get_or_insert(now);
        } else {
            self.line_started = None;
        }
    }

    fn upstream_input(&mut self, io: &mut Buffers, now: Instant) {
        if self.held.is_some() {
            if io.upstream_in.len() > MAX_RESPONSE {
                tracing::warn!("receiver sent too much behind a held login status");
                self.close_after(CloseReason::UpstreamError);
            }
            return;
        }
        if self.phase == Phase::Opaque {
            return self.relay_unread(io);
        }
        loop {
            let n = match self.framer.next(&io.upstream_in, MAX_RESPONSE) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "receiver sent an over-long IMAP response");
                    self.close_after(CloseReason::UpstreamError);
                    return;
                }
            };
            let raw: Vec<u8> = io.upstream_in.drain(..n).collect();
            self.response(io, raw, now);
            if self.phase == Phase::Opaque {
                // What follows the OK is the logged-in session's, or the
                // receiver's TLS.
                self.relay_unread(io);
                break;
            }
            if self.held.is_some() || self.closing.is_some() {
                break;
            }
        }
        if io.upstream_in.is_empty() {
            io.upstream_in = Vec::new();
        }
        self.settle_handshake(io);
    }

    fn next(&self) -> Next {
        match (self.closing, self.phase) {
            (Some(reason), _) => Next::Close(reason),
            (None, Phase::Handshake) => Next::StartTls,
            (None, _) => Next::Relay,
        }
    }

    fn tls_started(&mut self, _facts: &TlsFacts, _now: Instant) {
        // RFC 9051 §6.2.1: the client forgets what it learned in the clear
        // (it asks CAPABILITY again). Nothing is in flight: the OK to
        // STARTTLS was sent only once every earlier reply was.
        self.tls = true;
        self.phase = Phase::Line;
        self.reading = None;
        self.sasl = None;
    }

    fn tls_failed(&mut self) {
        self.protocol_error();
    }

    fn wants_client_bytes(&self) -> bool {
        self.pending.len() < MAX_PIPELINE
            && self.held.is_none()
            && !matches!(
                self.phase,
                Phase::Awaiting(_) | Phase::StartTlsQueued | Phase::Handshake
            )
    }

    fn deadline(&self) -> Option<(Instant, CloseReason)> {
        self.line_started.map(|started| {
            (
                started + self.config.timeouts.command_line,
                CloseReason::LineTimeout,
            )
        })
    }

    fn is_quiet(&self, io: &Buffers) -> bool {
        if self.authenticated {
            // Unread from here on: a line boundary is the best there is.
            return self.at_line_start && io.client_in.is_empty() && io.upstream_in.is_empty();
        }
        self.phase == Phase::Line
            && self.pending.is_empty()
            && self.held.is_none()
            && self.reading.is_none()
            && io.client_in.is_empty()
    }

    fn client_finished(&self) -> Option<CloseReason> {
        if !self.pending.is_empty() || self.held.is_some() {
            return None;
        }
        Some(if self.logout_sent {
            CloseReason::ClientQuit
        } else {
            CloseReason::ClientClosed
        })
    }

    fn upstream_finished(&self) -> CloseReason {
        if self.logout_sent {
            CloseReason::ClientQuit
        } else {
            CloseReason::UpstreamClosed
        }
    }

    fn farewell(&self, why: Farewell) -> Option<Vec<u8>> {
        let relayed_tls = self.phase == Phase::Opaque && !self.authenticated;
        if relayed_tls || (self.authenticated && !self.at_line_start) {
            // Our words would land inside the receiver's TLS, or inside a
            // response the proxy does not read.
            return None;
        }
        let text = match why {
            Farewell::Timeout => "timeout exceeded, closing connection",
            Farewell::Shutdown => "shutting down, try again later",
            Farewell::Blocked => "access denied, closing connection",
            Farewell::ReceiverLost => "receiver failed, try again later",
        };
        let hostname = &self.config.server.hostname;
        Some(format!("* BYE [UNAVAILABLE] {hostname} {text}\r\n").into_bytes())
    }

    fn mid_message(&self) -> bool {
        self.cut_mid_literal
    }

    fn commands(&self) -> u64 {
        self.commands
    }

    fn messages(&self) -> u64 {
        0
    }
}
