//! POP3, as the relay reads it: the protocol module the driver runs on a
//! `protocol = "pop3"` listener.
//!
//! Before a login, client lines are commands (bounded in length and in
//! number), or SASL responses inside an `AUTH` exchange; each is forwarded
//! and each receiver reply is matched to the command it answers. POP3 has
//! no tags, so replies are matched by order (a pipelining client, RFC 2449,
//! may have several in flight): `pending` holds one entry per command, and
//! a reply the proxy gives itself waits in that queue behind the
//! receiver's earlier ones. Which replies are multi-line is known from the
//! command (CAPA, and the listing commands a receiver might answer).
//!
//! A login is `PASS` (after `USER`), `APOP`, or the last step of `AUTH`.
//! The credentials the proxy can read go to the login accounting when the
//! login is forwarded, and are dropped; the receiver's verdict is counted
//! (`-ERR [AUTH]` is a failure, any other `-ERR` is not), and while the
//! account is under attack the verdict is held back until the attempt's
//! release time. After `+OK` to a login the session is relayed unread.
//!
//! On a listener that terminates TLS (`tls = "starttls"`) the proxy offers
//! and answers STLS itself; the session starts over inside TLS. The
//! receiver never sees STLS. On a `passthrough` listener STLS goes to the
//! receiver, and after its `+OK` the bytes pass unread.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::io::consume;
use super::login::{Attempt, LoginContext, LoginOutcome, MailboxContext};
use super::protocol::{Buffers, Farewell, Next, Protocol};
use super::CloseReason;
use crate::config::{Config, TlsMode};
use crate::pop3::reply::{self as replies, Refusal};
use crate::pop3::sasl::{self as pop3_sasl, Response};
use crate::pop3::{Command, Reply, ReplyReader, Status, Verb};
use crate::proxy_protocol::{self, Sniff};
use crate::sasl::{self, Mechanism};
use crate::tls::TlsFacts;

/// Commands in flight before the proxy stops reading from a pipelining client.
const MAX_PIPELINE: usize = 100;
/// Longest receiver reply read before a login (CAPA and mechanism lists
/// are the long ones).
const MAX_REPLY: usize = 64 * 1024;

const LINE_TOO_LONG: &[u8] = b"-ERR Line too long\r\n";
const NUL_IN_LINE: &[u8] = b"-ERR NUL byte in command line\r\n";
/// Not `[AUTH]`: a client would take it for a wrong password and ask its
/// user for another one.
const TLS_REQUIRED: &[u8] = b"-ERR [SYS/PERM] TLS required, issue STLS first\r\n";
const TOO_MANY_COMMANDS: &[u8] = b"-ERR Too many commands before login, closing\r\n";
const BEGIN_TLS: &[u8] = b"+OK Begin TLS negotiation\r\n";

#[derive(Debug)]
enum Phase {
    /// Client lines are commands.
    Command,
    /// A command whose reply decides how to read the client (a login,
    /// AUTH, a relayed STLS) is in flight: nothing more is read until then.
    AwaitingReply,
    /// The next client line answers a `+ ` challenge.
    SaslResponse(Box<Sasl>),
    /// The proxy's `+OK` to STLS waits behind earlier replies.
    StlsQueued,
    /// The `+OK` is on its way to the client: the driver handshakes.
    Handshake,
    /// Logged in, or after a relayed STLS: bytes pass unread.
    Opaque,
}

/// An AUTH exchange under way.
#[derive(Debug)]
struct Sasl {
    mechanism: Mechanism,
    /// Responses the client has sent so far, the initial one included.
    responses: u32,
    /// AUTH LOGIN's user name, between its two responses; then dropped.
    user: Option<Vec<u8>>,
    /// Made once the credentials are known (at once for a mechanism the
    /// proxy does not read).
    attempt: Option<Attempt>,
}

/// What the reply at this position of the queue will answer.
#[derive(Debug)]
enum Expect {
    Greeting,
    Capa,
    User,
    /// PASS or APOP.
    Login(Attempt),
    Auth(Box<Sasl>),
    /// STLS relayed to the receiver (`passthrough`).
    Stls,
    Quit,
    /// Anything else; `multiline`: its `+OK` is followed by lines.
    Other {
        multiline: bool,
    },
}

impl Expect {
    fn multiline(&self) -> bool {
        matches!(self, Expect::Capa | Expect::Other { multiline: true })
    }

    /// The login whose verdict this reply is, if any.
    fn attempt(&self) -> Option<&Attempt> {
        match self {
            Expect::Login(attempt) => Some(attempt),
            Expect::Auth(sasl) => sasl.attempt.as_ref(),
            _ => None,
        }
    }
}

/// What happens once the proxy's own reply has been released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Continue,
    Close(CloseReason),
    /// The reply was `+OK` to STLS: the handshake comes next.
    StartTls,
}

#[derive(Debug)]
enum Pending {
    Upstream(Expect),
    /// A reply the proxy gives itself.
    Local(&'static [u8], After),
}

pub struct Pop3<'a> {
    config: &'a Config,
    login: LoginContext<'a>,
    tls_mode: TlsMode,
    require_tls: bool,
    /// The client's session runs inside TLS.
    tls: bool,

    phase: Phase,
    pending: VecDeque<Pending>,
    replies: ReplyReader,
    /// The name from USER, until the PASS that goes with it; then dropped.
    user: Option<Vec<u8>>,
    /// The receiver accepted a login: its idle limit applies.
    logged_in: bool,
    /// Commands read before a login (and since STLS).
    preauth_commands: u32,
    quit_sent: bool,
    /// Skipping the rest of an over-long line.
    discarding_line: bool,
    /// The session ends once what is queued for the client is written.
    closing: Option<CloseReason>,
    /// A login's verdict is held back until then (the account tarpit).
    held_until: Option<Instant>,
    line_started: Option<Instant>,
    commands: u64,
}

impl<'a> Pop3<'a> {
    /// A session whose receiver's greeting is the first reply to come.
    pub fn new(ctx: MailboxContext<'a>, _now: Instant) -> Self {
        Pop3 {
            config: ctx.config,
            login: ctx.login,
            tls_mode: ctx.tls_mode,
            require_tls: ctx.require_tls,
            tls: ctx.tls,
            phase: Phase::Command,
            pending: VecDeque::from([Pending::Upstream(Expect::Greeting)]),
            replies: ReplyReader::new(MAX_REPLY),
            user: None,
            logged_in: false,
            preauth_commands: 0,
            quit_sent: false,
            discarding_line: false,
            closing: None,
            held_until: None,
            line_started: None,
            commands: 0,
        }
    }

    fn reading_lines(&self) -> bool {
        matches!(self.phase, Phase::Command | Phase::SaslResponse(_))
    }

    /// Handles one complete line if there is one; false when it must wait.
    fn take_line(&mut self, io: &mut Buffers, now: Instant) -> bool {
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
        } else if matches!(self.phase, Phase::SaslResponse(_)) {
            self.sasl_response(io, end, now);
        } else {
            self.command(io, end, now);
        }
        consume(&mut io.client_in, end);
        true
    }

    fn line_too_long(&mut self, io: &mut Buffers) {
        self.login.protocol_error();
        if matches!(self.phase, Phase::SaslResponse(_)) {
            self.cancel_sasl(io);
        } else {
            self.answer(io, LINE_TOO_LONG, After::Continue);
        }
    }

    /// A line with a NUL is never forwarded: a receiver may end the line
    /// there and read a command the proxy did not.
    fn nul_in_line(&mut self, io: &mut Buffers) {
        self.login.protocol_error();
        if matches!(self.phase, Phase::SaslResponse(_)) {
            self.cancel_sasl(io);
        } else {
            self.answer(io, NUL_IN_LINE, After::Continue);
        }
    }

    /// The receiver waits for a SASL response the proxy will not forward:
    /// the exchange is cancelled instead (RFC 5034 §4), and the receiver's
    /// `-ERR` answers the client.
    fn cancel_sasl(&mut self, io: &mut Buffers) {
        let Phase::SaslResponse(sasl) = std::mem::replace(&mut self.phase, Phase::AwaitingReply)
        else {
            return;
        };
        io.to_upstream.extend_from_slice(b"*\r\n");
        self.pending
            .push_back(Pending::Upstream(Expect::Auth(sasl)));
    }

    /// Queues the proxy's own reply in command order.
    fn answer(&mut self, io: &mut Buffers, reply: &'static [u8], after: After) {
        self.pending.push_back(Pending::Local(reply, after));
        self.release_local_replies(io);
    }

    /// The first bytes might still be a PROXY header arriving in pieces
    /// (the door catches those already there): held, under the line
    /// timeout, until they can be told apart. The v2 signature holds
    /// `QUIT\n`, which would otherwise reach the receiver as a command.
    fn proxy_header_undecided(&self, io: &Buffers) -> bool {
        self.commands == 0
            && !self.tls
            && matches!(self.phase, Phase::Command)
            && !io.client_in.is_empty()
            && proxy_protocol::sniff(&io.client_in) == Sniff::Undecided
    }

    /// Logins must wait for STLS: the listener requires TLS and this
    /// client has not started it.
    fn needs_tls_first(&self) -> bool {
        self.require_tls && !self.tls
    }

    fn command(&mut self, io: &mut Buffers, end: usize, now: Instant) {
        if self.commands == 0 && !self.tls && proxy_protocol::looks_like_header(&io.client_in) {
            // Only trusted proxies may say who the client is; past the
            // door this is the session's protocol error.
            self.login.protocol_error();
            let reply = b"-ERR [SYS/PERM] PROXY header from an untrusted address\r\n";
            self.answer(io, reply, After::Close(CloseReason::ProtocolError));
            return;
        }
        let line = &io.client_in[..end];
        let command = Command::parse(line);
        self.commands += 1;
        if command.verb != Verb::Quit {
            if self.preauth_commands >= self.config.mailbox.preauth_commands {
                self.answer(io, TOO_MANY_COMMANDS, After::Close(CloseReason::Limit));
                return;
            }
            self.preauth_commands += 1;
        }
        let expect = match command.verb {
            Verb::User | Verb::Pass | Verb::Apop | Verb::Auth if self.needs_tls_first() => {
                return self.answer(io, TLS_REQUIRED, After::Continue);
            }
            Verb::User => {
                self.user = Some(command.args.to_vec());
                Expect::User
            }
            Verb::Pass => {
                let user = self.user.take();
                let attempt = self.login.attempt(user.as_deref(), Some(command.args), now);
                Expect::Login(attempt)
            }
            Verb::Apop => {
                self.user = None;
                let user = command.words().next();
                Expect::Login(self.login.attempt(user, None, now))
            }
            Verb::Auth if command.args.is_empty() => Expect::Other { multiline: true },
            Verb::Auth => {
                self.user = None;
                match self.auth(&command, now) {
                    Some(sasl) => Expect::Auth(sasl),
                    None => {
                        self.login.protocol_error();
                        let reply = b"-ERR Invalid SASL initial response\r\n";
                        return self.answer(io, reply, After::Continue);
                    }
                }
            }
            Verb::Stls => match self.tls_mode {
                TlsMode::Passthrough => Expect::Stls,
                _ => return self.stls(io, command.args.is_empty()),
            },
            Verb::Capa => Expect::Capa,
            Verb::Quit => {
                self.quit_sent = true;
                Expect::Quit
            }
            _ => Expect::Other {
                multiline: command.multiline(),
            },
        };
        io.to_upstream.extend_from_slice(&io.client_in[..end]);
        self.expect(expect);
    }

    /// An AUTH command with a mechanism: its exchange, with the attempt
    /// made if the credentials are already known. `None` when its initial
    /// response is not base64.
    fn auth(&mut self, command: &Command<'_>, now: Instant) -> Option<Box<Sasl>> {
        let mut words = command.words();
        let mechanism = Mechanism::parse(words.next().unwrap_or_default());
        let mut sasl = Box::new(Sasl {
            mechanism,
            responses: 0,
            user: None,
            attempt: None,
        });
        match words.next() {
            Some(initial) => {
                let decoded = pop3_sasl::initial_response(initial).ok()?;
                self.sasl_data(&mut sasl, &decoded, now);
            }
            None if mechanism == Mechanism::Other => {
                sasl.attempt = Some(self.login.attempt(None, None, now));
            }
            None => {}
        }
        Some(sasl)
    }

    /// One decoded response of `sasl`'s exchange: the credentials it
    /// carries go to the attempt, once they are complete.
    fn sasl_data(&mut self, sasl: &mut Sasl, data: &[u8], now: Instant) {
        sasl.responses += 1;
        if sasl.attempt.is_some() {
            return;
        }
        match (sasl.mechanism, sasl.responses) {
            (Mechanism::Plain, _) => {
                let (user, password) = sasl::plain(data).unzip();
                sasl.attempt = Some(self.login.attempt(user, password, now));
            }
            (Mechanism::Login, 1) => sasl.user = Some(data.to_vec()),
            (Mechanism::Login, _) => {
                let user = sasl.user.take();
                sasl.attempt = Some(self.login.attempt(user.as_deref(), Some(data), now));
            }
            (Mechanism::Other, _) => {
                sasl.attempt = Some(self.login.attempt(None, None, now));
            }
        }
    }

    /// A client line answering a `+ ` challenge: base64 or `*`, forwarded;
    /// anything else cancels the exchange and is the client's protocol
    /// error.
    fn sasl_response(&mut self, io: &mut Buffers, end: usize, now: Instant) {
        let response = pop3_sasl::response(&io.client_in[..end]);
        let Phase::SaslResponse(mut sasl) =
            std::mem::replace(&mut self.phase, Phase::AwaitingReply)
        else {
            return;
        };
        match response {
            Ok(Response::Cancel) => {}
            Ok(Response::Data(data)) => self.sasl_data(&mut sasl, &data, now),
            Err(_) => {
                self.login.protocol_error();
                self.phase = Phase::SaslResponse(sasl);
                return self.cancel_sasl(io);
            }
        }
        io.to_upstream.extend_from_slice(&io.client_in[..end]);
        self.expect(Expect::Auth(sasl));
    }

    /// STLS on a listener that terminates TLS (or offers none): the proxy
    /// answers it. Its `+OK` waits its turn behind earlier replies, and
    /// nothing more is read until the handshake.
    fn stls(&mut self, io: &mut Buffers, bare: bool) {
        let refusal: &'static [u8] = match self.tls_mode {
            _ if self.tls => b"-ERR TLS already active\r\n",
            TlsMode::Starttls if !bare => b"-ERR Syntax: STLS\r\n",
            // The receiver keeps a USER given in the clear; it would pair
            // with a PASS sent inside TLS.
            TlsMode::Starttls if self.user.is_some() => b"-ERR STLS not allowed after USER\r\n",
            TlsMode::Starttls => {
                self.phase = Phase::StlsQueued;
                self.pending
                    .push_back(Pending::Local(BEGIN_TLS, After::StartTls));
                self.release_local_replies(io);
                return;
            }
            _ => b"-ERR STLS not offered here\r\n",
        };
        self.answer(io, refusal, After::Continue);
    }

    /// Queues the receiver's reply to what was just forwarded.
    fn expect(&mut self, expect: Expect) {
        if matches!(expect, Expect::Login(_) | Expect::Auth(_) | Expect::Stls) {
            self.phase = Phase::AwaitingReply;
        }
        self.pending.push_back(Pending::Upstream(expect));
    }

    /// The receiver's CAPA reply as this client may see it: STLS as the
    /// listener's TLS policy says, and no login offered in the clear where
    /// TLS is required.
    fn capa_reply(&self, reply: &Reply) -> Reply {
        let mut hidden = Vec::new();
        if self.tls_mode != TlsMode::Passthrough {
            hidden.push("STLS");
        }
        if self.needs_tls_first() {
            hidden.extend(["USER", "SASL"]);
        }
        let added: &[&str] = if self.tls_mode == TlsMode::Starttls && !self.tls {
            &["STLS"]
        } else {
            &[]
        };
        reply.with_capabilities(&hidden, added)
    }

    /// The front of the queue is a login whose verdict must wait: true
    /// (and `held_until` set) when the next reply is that verdict.
    fn hold(&mut self, line: &[u8], now: Instant) -> bool {
        if !self.replies.is_empty() {
            return false;
        }
        let Some(Pending::Upstream(expect)) = self.pending.front() else {
            return false;
        };
        let Some(release_at) = expect.attempt().map(|a| a.release_at) else {
            return false;
        };
        if release_at <= now || replies::status(line) == Some(Status::Continuation) {
            return false;
        }
        self.held_until = Some(release_at);
        true
    }

    fn reply(&mut self, io: &mut Buffers, reply: Reply) {
        let expect = match self.pending.pop_front() {
            Some(Pending::Upstream(expect)) => Some(expect),
            // Local replies are released as soon as they reach the front.
            Some(local @ Pending::Local(..)) => {
                self.pending.push_front(local);
                None
            }
            None => None,
        };
        let mut reply = reply;
        match (expect, reply.status) {
            (Some(Expect::Auth(sasl)), Status::Continuation) => {
                self.phase = Phase::SaslResponse(sasl);
            }
            (_, Status::Continuation) => {
                tracing::warn!("receiver sent a SASL challenge to a command that takes none");
                return self.close_after(CloseReason::UpstreamError);
            }
            (Some(Expect::Greeting), Status::Err) => self.close_after(CloseReason::UpstreamClosed),
            (Some(Expect::Capa), Status::Ok) => reply = self.capa_reply(&reply),
            (Some(Expect::User), Status::Err) => self.user = None,
            (Some(Expect::Login(attempt)), status) => self.verdict(Some(&attempt), status, &reply),
            (Some(Expect::Auth(sasl)), status) => {
                self.verdict(sasl.attempt.as_ref(), status, &reply)
            }
            (Some(Expect::Stls), status) => {
                self.phase = Phase::Command;
                if status == Status::Ok {
                    if !io.client_in.is_empty() {
                        // Plaintext sent after STLS would be taken as inside
                        // TLS by a vulnerable receiver (CVE-2011-0411).
                        self.login.protocol_error();
                        self.closing = Some(CloseReason::ProtocolError);
                        return;
                    }
                    self.phase = Phase::Opaque;
                }
            }
            (Some(Expect::Quit), _) => self.close_after(CloseReason::ClientQuit),
            _ => {}
        }
        io.to_client.extend_from_slice(&reply.raw);
        self.release_local_replies(io);
    }

    /// The receiver's verdict on a login: counted, and on `+OK` the rest
    /// of the session passes unread.
    fn verdict(&mut self, attempt: Option<&Attempt>, status: Status, reply: &Reply) {
        let outcome = match status {
            Status::Ok => LoginOutcome::Success,
            _ => match replies::refusal(reply.first_line()) {
                Refusal::Credentials => LoginOutcome::Failure,
                Refusal::Other => LoginOutcome::Temporary,
            },
        };
        if let Some(attempt) = attempt {
            self.login.outcome(attempt, outcome);
        }
        self.phase = Phase::Command;
        if status == Status::Ok {
            self.logged_in = true;
            self.phase = Phase::Opaque;
            // Nothing can be in flight behind a login: the client is not
            // read until its verdict.
            self.pending.clear();
        }
    }

    fn close_after(&mut self, reason: CloseReason) {
        self.closing.get_or_insert(reason);
    }

    /// The proxy has queued the reply it closes with, behind replies still
    /// owed: nothing the client sent after that command is read.
    fn last_word_queued(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Local(_, After::Close(_))))
    }

    /// Moves the proxy's own replies at the front of the queue to the client.
    fn release_local_replies(&mut self, io: &mut Buffers) {
        while let Some(Pending::Local(text, after)) = self.pending.front() {
            let (text, after) = (*text, *after);
            match after {
                After::Continue => io.to_client.extend_from_slice(text),
                After::Close(reason) => {
                    io.to_client.extend_from_slice(text);
                    self.close_after(reason);
                }
                // Checked when the client's input is settled: see
                // `settle_handshake`.
                After::StartTls => break,
            }
            self.pending.pop_front();
        }
    }

    /// The `+OK` to STLS reached the front of the queue: it is sent only
    /// if the client sent nothing after its STLS. Plaintext pipelined
    /// behind it would be read as if it came inside TLS (CVE-2011-0411);
    /// such a client is not told to start TLS at all.
    fn settle_handshake(&mut self, io: &mut Buffers) {
        if !matches!(
            self.pending.front(),
            Some(Pending::Local(_, After::StartTls))
        ) {
            return;
        }
        self.pending.pop_front();
        if io.client_in.is_empty() {
            io.to_client.extend_from_slice(BEGIN_TLS);
            self.phase = Phase::Handshake;
        } else {
            self.login.protocol_error();
            io.client_in = Vec::new();
            self.closing = Some(CloseReason::ProtocolError);
        }
    }

    /// Hands the rest of the receiver's bytes to the client unread.
    fn relay_upstream(io: &mut Buffers) {
        if io.to_client.is_empty() {
            std::mem::swap(&mut io.to_client, &mut io.upstream_in);
        } else {
            io.to_client.append(&mut io.upstream_in);
        }
    }
}

impl Protocol for Pop3<'_> {
    fn client_input(&mut self, io: &mut Buffers, now: Instant) {
        while !io.client_in.is_empty() && self.closing.is_none() && !self.last_word_queued() {
            let progressed = match self.phase {
                Phase::Command | Phase::SaslResponse(_) => self.take_line(io, now),
                Phase::Opaque => {
                    if io.to_upstream.is_empty() {
                        std::mem::swap(&mut io.to_upstream, &mut io.client_in);
                    } else {
                        io.to_upstream.append(&mut io.client_in);
                    }
                    true
                }
                Phase::AwaitingReply | Phase::StlsQueued | Phase::Handshake => false,
            };
            if !progressed {
                break;
            }
        }
        self.settle_handshake(io);
        // The line timer runs from the first byte of an unfinished line
        // until its end, however slowly the bytes in between trickle.
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
            return Self::relay_upstream(io);
        }
        if self.held_until.is_some_and(|until| now < until) {
            return;
        }
        self.held_until = None;
        let mut start = 0;
        while let Some(len) = memchr::memchr(b'\n', &io.upstream_in[start..]) {
            let end = start + len + 1;
            let line = &io.upstream_in[start..end];
            if self.hold(line, now) {
                break;
            }
            let multiline = match self.pending.front() {
                Some(Pending::Upstream(expect)) => expect.multiline(),
                _ => false,
            };
            let pushed = self.replies.push_line(line, multiline);
            start = end;
            match pushed {
                Ok(Some(reply)) => self.reply(io, reply),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "receiver sent a malformed POP3 reply");
                    self.close_after(CloseReason::UpstreamError);
                    return;
                }
            }
            if self.closing.is_some() {
                break;
            }
            if matches!(self.phase, Phase::Opaque) {
                consume(&mut io.upstream_in, start);
                return Self::relay_upstream(io);
            }
        }
        consume(&mut io.upstream_in, start);
        if io.upstream_in.len() > MAX_REPLY {
            tracing::warn!("receiver sent an over-long POP3 reply line");
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
        // RFC 2595 §4: the client discards what it knew and asks CAPA
        // again. The receiver saw no STLS; nothing it holds carries over
        // (STLS is refused after USER), and the bound on commands before
        // a login starts anew.
        self.tls = true;
        self.phase = Phase::Command;
        self.user = None;
        self.preauth_commands = 0;
    }

    fn tls_failed(&mut self) {
        self.login.protocol_error();
    }

    fn wants_client_bytes(&self) -> bool {
        self.pending.len() < MAX_PIPELINE
            && self.held_until.is_none()
            && !matches!(
                self.phase,
                Phase::AwaitingReply | Phase::StlsQueued | Phase::Handshake
            )
    }

    fn deadline(&self) -> Option<(Instant, CloseReason)> {
        let line = self.config.timeouts.command_line;
        self.line_started
            .map(|started| (started + line, CloseReason::LineTimeout))
    }

    fn idle_timeout(&self) -> Duration {
        let mailbox = &self.config.mailbox;
        if matches!(self.phase, Phase::Opaque) {
            mailbox.authenticated_idle
        } else {
            mailbox.preauth_idle
        }
    }

    fn wake_at(&self) -> Option<Instant> {
        self.held_until
    }

    fn woken(&mut self, io: &mut Buffers, now: Instant) {
        if self.held_until.is_some_and(|until| until <= now) {
            self.upstream_input(io, now);
        }
    }

    fn is_quiet(&self, io: &Buffers) -> bool {
        matches!(self.phase, Phase::Command) && self.pending.is_empty() && io.client_in.is_empty()
    }

    fn client_finished(&self) -> Option<CloseReason> {
        if !self.pending.is_empty() && !matches!(self.phase, Phase::Opaque) {
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
        if matches!(self.phase, Phase::Opaque | Phase::Handshake) {
            // Unread bytes (a message being listed, TLS records): a line
            // of ours would land in the middle of them.
            return None;
        }
        let text = match why {
            Farewell::Timeout => "timeout exceeded, closing connection",
            Farewell::Shutdown => "shutting down, try again later",
            Farewell::Blocked => "access denied, closing connection",
            Farewell::ReceiverLost => "receiver failed, try again later",
        };
        Some(format!("-ERR [SYS/TEMP] {text}\r\n").into_bytes())
    }

    fn mid_message(&self) -> bool {
        false
    }

    fn commands(&self) -> u64 {
        self.commands
    }

    fn messages(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    //! The POP3 module alone, without sockets: the test fills the buffers
    //! the driver would and reads what the module queued.

    use super::*;
    use crate::tls::TlsVersion;

    use crate::session::login::LoginContext;

    use crate::session::fixture::Fixture;

    impl Fixture {
        fn pop3(&self, tls_mode: TlsMode, require_tls: bool) -> Pop3<'_> {
            let ip = "192.0.2.7".parse().unwrap();
            Pop3::new(
                MailboxContext {
                    config: &self.config,
                    metrics: &self.metrics,
                    login: LoginContext {
                        settings: &self.config.mailbox,
                        metrics: &self.metrics,
                        shaping: self.shaping.client(ip, false),
                        protocol: crate::config::Protocol::Pop3,
                    },
                    tls_mode,
                    require_tls,
                    tls: tls_mode == TlsMode::Implicit,
                },
                Instant::now(),
            )
        }

        fn banned(&self) -> bool {
            self.shaping.bans().is_banned("192.0.2.7".parse().unwrap())
        }

        /// `mailmoat_logins_total` for POP3 with `outcome`, or the delays.
        fn pop3_logins(&self, outcome: &str) -> f64 {
            self.counted(&match outcome {
                "delayed" => "mailmoat_login_delays_total{protocol=\"pop3\"}".to_string(),
                _ => format!("mailmoat_logins_total{{outcome=\"{outcome}\",protocol=\"pop3\"}}"),
            })
        }
    }

    /// One session and its buffers, as the driver would hold them.
    struct Session<'a> {
        pop3: Pop3<'a>,
        io: Buffers,
    }

    const GREETING: &[u8] = b"+OK POP3 ready <1896.697170952@pop3.test>\r\n";
    const CAPA: &[u8] =
        b"+OK\r\nCAPA\r\nUSER\r\nSASL PLAIN LOGIN\r\nRESP-CODES\r\nPIPELINING\r\nSTLS\r\n.\r\n";
    const AUTH_FAILED: &[u8] = b"-ERR [AUTH] Authentication failed.\r\n";

    impl<'a> Session<'a> {
        fn new(pop3: Pop3<'a>) -> Self {
            let mut s = Session {
                pop3,
                io: Buffers::default(),
            };
            assert_eq!(s.receiver(GREETING), String::from_utf8_lossy(GREETING));
            s
        }

        /// Client bytes in; what went to the receiver and what to the client.
        fn client(&mut self, bytes: &[u8]) -> (String, String) {
            self.client_at(bytes, Instant::now())
        }

        fn client_at(&mut self, bytes: &[u8], now: Instant) -> (String, String) {
            self.io.client_in.extend_from_slice(bytes);
            self.pop3.client_input(&mut self.io, now);
            (take(&mut self.io.to_upstream), take(&mut self.io.to_client))
        }

        /// Receiver bytes in; what went to the client.
        fn receiver(&mut self, bytes: &[u8]) -> String {
            self.receiver_at(bytes, Instant::now())
        }

        fn receiver_at(&mut self, bytes: &[u8], now: Instant) -> String {
            self.io.upstream_in.extend_from_slice(bytes);
            self.pop3.upstream_input(&mut self.io, now);
            take(&mut self.io.to_client)
        }

        fn handshake_done(&mut self) {
            let facts = TlsFacts {
                version: TlsVersion::V1_3,
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
                sni: None,
            };
            self.pop3.tls_started(&facts, Instant::now());
        }
    }

    fn take(bytes: &mut Vec<u8>) -> String {
        String::from_utf8(std::mem::take(bytes)).unwrap()
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn pipelined_replies_are_matched_in_order_and_capa_is_read_to_its_dot() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        let (upstream, client) = s.client(b"CAPA\r\nUSER alice\r\nNOOP\r\n");
        assert_eq!(
            (upstream.as_str(), client.as_str()),
            ("CAPA\r\nUSER alice\r\nNOOP\r\n", "")
        );
        // The dot-stuffed line and the +OK inside the list are CAPA's.
        let said =
            s.receiver(b"+OK\r\nUSER\r\n..odd\r\n+OK\r\n.\r\n+OK\r\n-ERR Unknown command.\r\n");
        assert_eq!(
            said,
            "+OK\r\nUSER\r\n..odd\r\n+OK\r\n.\r\n+OK\r\n-ERR Unknown command.\r\n"
        );
        assert!(s.pop3.is_quiet(&s.io));
        assert_eq!(s.pop3.next(), Next::Relay);
    }

    #[test]
    fn a_wrong_password_counts_as_a_failure_toward_a_ban() {
        let f = Fixture::new("[autoban]\nauth_failures = 1\n");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        assert_eq!(
            s.client(b"USER alice\r\nPASS wrong\r\n").0,
            "USER alice\r\nPASS wrong\r\n"
        );
        assert_eq!(s.receiver(b"+OK\r\n"), "+OK\r\n");
        assert!(!f.banned());
        assert_eq!(s.receiver(AUTH_FAILED), text(AUTH_FAILED));
        assert!(f.banned());
        assert_eq!(f.protocol_errors(), 0);
    }

    #[test]
    fn temporary_refusals_and_a_refused_user_do_not_count() {
        let f = Fixture::new("[autoban]\nauth_failures = 1\n");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        s.client(b"USER nobody\r\n");
        s.receiver(b"-ERR [AUTH] no such user\r\n");
        s.client(b"USER alice\r\nPASS pw\r\n");
        s.receiver(b"+OK\r\n-ERR [SYS/TEMP] Temporary authentication failure.\r\n");
        s.client(b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n");
        s.receiver(b"-ERR [IN-USE] Mailbox is locked.\r\n");
        s.client(b"USER alice\r\nPASS pw\r\n");
        s.receiver(b"+OK\r\n-ERR Authentication failed\r\n");
        assert!(!f.banned());
        assert_eq!(s.pop3.next(), Next::Relay);
    }

    #[test]
    fn after_the_login_the_session_is_relayed_unread_under_the_authenticated_idle_limit() {
        let f = Fixture::new("[mailbox]\npreauth_idle = \"10s\"\nauthenticated_idle = \"30m\"\n");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        assert_eq!(s.pop3.idle_timeout(), Duration::from_secs(10));
        s.client(b"USER alice\r\nPASS right\r\n");
        // Pipelined behind the login: not read until its verdict.
        assert_eq!(s.client(b"STAT\r\n"), (String::new(), String::new()));
        assert!(!s.pop3.wants_client_bytes());
        assert_eq!(
            s.receiver(b"+OK\r\n+OK Logged in.\r\n+OK 1 3\r\nabc\0"),
            "+OK\r\n+OK Logged in.\r\n+OK 1 3\r\nabc\0"
        );
        assert_eq!(s.pop3.idle_timeout(), Duration::from_secs(30 * 60));
        let line = vec![b'x'; 10_000];
        let (upstream, _) = s.client(&line);
        assert_eq!(upstream.len(), "STAT\r\n".len() + line.len());
        assert_eq!(s.receiver(b"garbage\n"), "garbage\n");
        assert_eq!(s.pop3.farewell(Farewell::Timeout), None);
        assert_eq!(f.protocol_errors(), 0);
    }

    #[test]
    fn a_sasl_response_that_is_not_base64_is_cancelled_and_counted() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        s.client(b"AUTH PLAIN\r\n");
        s.receiver(b"+ \r\n");
        let (upstream, client) = s.client(b"USER alice\r\n");
        assert_eq!((upstream.as_str(), client.as_str()), ("*\r\n", ""));
        assert_eq!(f.protocol_errors(), 1);
        assert_eq!(
            s.receiver(b"-ERR Authentication cancelled.\r\n"),
            "-ERR Authentication cancelled.\r\n"
        );
        // A cancel from the client is no error.
        s.client(b"AUTH LOGIN\r\n");
        s.receiver(b"+ VXNlcm5hbWU6\r\n");
        assert_eq!(s.client(b"*\r\n").0, "*\r\n");
        s.receiver(b"-ERR Authentication cancelled.\r\n");
        assert_eq!(f.protocol_errors(), 1);
        assert_eq!(s.pop3.next(), Next::Relay);
    }

    #[test]
    fn nul_bytes_and_overlong_lines_are_answered_by_the_proxy_and_counted() {
        let f = Fixture::new("[limits]\nmax_line_length = 64\n");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        assert_eq!(
            s.client(b"USER a\0b\r\n"),
            (String::new(), text(NUL_IN_LINE))
        );
        assert_eq!(s.client(&[b'x'; 100]), (String::new(), text(LINE_TOO_LONG)));
        // The rest of that line is skipped; the next one is read.
        assert_eq!(s.client(b"xxx\r\nCAPA\r\n").0, "CAPA\r\n");
        assert_eq!(f.protocol_errors(), 2);
    }

    #[test]
    fn commands_beyond_the_preauth_bound_are_refused_and_the_session_closed() {
        let f = Fixture::new("[mailbox]\npreauth_commands = 2\n");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        let (upstream, client) = s.client(b"CAPA\r\nNOOP\r\nUSER a\r\nPASS b\r\n");
        assert_eq!(upstream, "CAPA\r\nNOOP\r\n");
        assert_eq!(client, "");
        assert_eq!(s.pop3.next(), Next::Relay);
        s.receiver(CAPA);
        assert_eq!(
            s.receiver(b"-ERR Unknown command.\r\n"),
            format!("-ERR Unknown command.\r\n{}", text(TOO_MANY_COMMANDS))
        );
        assert_eq!(s.pop3.next(), Next::Close(CloseReason::Limit));
    }

    #[test]
    fn stls_is_answered_by_the_proxy_and_the_session_starts_over_inside_tls() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::Starttls, false));
        s.client(b"CAPA\r\n");
        // Offered whether or not the receiver does.
        let receiver_capa = b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n";
        assert_eq!(
            s.receiver(receiver_capa),
            "+OK\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\n.\r\n"
        );
        let (upstream, client) = s.client(b"STLS\r\n");
        assert_eq!(
            (upstream.as_str(), client.as_str()),
            ("", text(BEGIN_TLS).as_str())
        );
        assert_eq!(s.pop3.next(), Next::StartTls);
        assert!(!s.pop3.wants_client_bytes());
        s.handshake_done();
        assert_eq!(s.pop3.next(), Next::Relay);
        s.client(b"CAPA\r\n");
        // Inside TLS, STLS is no longer offered, nor accepted.
        assert_eq!(
            s.receiver(CAPA),
            "+OK\r\nCAPA\r\nUSER\r\nSASL PLAIN LOGIN\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"
        );
        assert_eq!(s.client(b"STLS\r\n").1, "-ERR TLS already active\r\n");
    }

    #[test]
    fn plaintext_pipelined_behind_the_proxys_stls_is_refused_without_its_ok() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::Starttls, false));
        let (upstream, client) = s.client(b"STLS\r\nUSER evil\r\n");
        assert_eq!((upstream.as_str(), client.as_str()), ("", ""));
        assert_eq!(s.pop3.next(), Next::Close(CloseReason::ProtocolError));
        assert_eq!(f.protocol_errors(), 1);
    }

    #[test]
    fn stls_waits_for_the_replies_to_commands_pipelined_before_it() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::Starttls, false));
        assert_eq!(
            s.client(b"CAPA\r\nSTLS\r\n"),
            ("CAPA\r\n".into(), String::new())
        );
        let said = s.receiver(b"+OK\r\nUSER\r\n.\r\n");
        assert_eq!(
            said,
            format!("+OK\r\nUSER\r\nSTLS\r\n.\r\n{}", text(BEGIN_TLS))
        );
        assert_eq!(s.pop3.next(), Next::StartTls);
    }

    #[test]
    fn stls_is_neither_offered_nor_accepted_without_a_terminating_listener() {
        let f = Fixture::new("");
        for mode in [TlsMode::None, TlsMode::Implicit] {
            let mut s = Session::new(f.pop3(mode, false));
            s.client(b"CAPA\r\n");
            assert_eq!(
                s.receiver(CAPA),
                "+OK\r\nCAPA\r\nUSER\r\nSASL PLAIN LOGIN\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"
            );
            let (upstream, client) = s.client(b"STLS\r\n");
            assert_eq!(upstream, "");
            assert!(client.starts_with("-ERR "), "{client:?}");
            assert_eq!(s.pop3.next(), Next::Relay);
        }
    }

    #[test]
    fn passthrough_relays_stls_and_the_receivers_tls_passes_unread() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::Passthrough, false));
        s.client(b"CAPA\r\n");
        assert_eq!(s.receiver(CAPA), text(CAPA));
        assert_eq!(s.client(b"STLS\r\n").0, "STLS\r\n");
        assert_eq!(
            s.receiver(b"+OK Begin TLS\r\n\x16\x03\x03"),
            "+OK Begin TLS\r\n\x16\x03\x03"
        );
        assert_eq!(s.client(b"\x16\x03\x01\0\x05").0, "\x16\x03\x01\0\x05");
        assert_eq!(s.pop3.next(), Next::Relay);
        assert_eq!(f.protocol_errors(), 0);
    }

    #[test]
    fn require_tls_refuses_logins_in_the_clear_without_counting_and_hides_them() {
        let f = Fixture::new("[autoban]\nauth_failures = 1\n");
        let mut s = Session::new(f.pop3(TlsMode::Starttls, true));
        s.client(b"CAPA\r\n");
        assert_eq!(
            s.receiver(CAPA),
            "+OK\r\nCAPA\r\nRESP-CODES\r\nPIPELINING\r\nSTLS\r\n.\r\n"
        );
        for login in [
            &b"USER alice\r\n"[..],
            b"PASS x\r\n",
            b"APOP a b\r\n",
            b"AUTH PLAIN AGEAYg==\r\n",
        ] {
            assert_eq!(s.client(login), (String::new(), text(TLS_REQUIRED)));
        }
        assert!(!f.banned());
        s.client(b"STLS\r\n");
        s.handshake_done();
        assert_eq!(s.client(b"USER alice\r\n").0, "USER alice\r\n");
    }

    #[test]
    fn a_refusing_greeting_is_relayed_and_closes_the_session() {
        let f = Fixture::new("");
        let mut s = Session {
            pop3: f.pop3(TlsMode::None, false),
            io: Buffers::default(),
        };
        assert_eq!(
            s.receiver(b"-ERR [SYS/TEMP] too busy\r\n"),
            "-ERR [SYS/TEMP] too busy\r\n"
        );
        assert_eq!(s.pop3.next(), Next::Close(CloseReason::UpstreamClosed));
    }

    #[test]
    fn a_reply_that_is_not_pop3_closes_the_session_as_the_receivers_fault() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        s.client(b"CAPA\r\n");
        assert_eq!(s.receiver(b"220 smtp.test ESMTP\r\n"), "");
        assert_eq!(s.pop3.next(), Next::Close(CloseReason::UpstreamError));
        assert_eq!(f.protocol_errors(), 0);
    }

    #[test]
    fn an_accounts_login_verdict_is_held_until_its_release_while_another_account_is_answered() {
        let toml = "[mailbox]\naccount_failures = 1\naccount_delay = \"3s\"\n";
        let f = Fixture::new(toml);
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        s.client(b"USER alice\r\nPASS wrong1\r\n");
        assert_eq!(s.receiver(b"+OK\r\n").len(), 5);
        assert_eq!(s.receiver(AUTH_FAILED), text(AUTH_FAILED));
        assert_eq!(s.pop3.wake_at(), None);
        // alice now has a failure: her next verdict waits.
        let start = Instant::now();
        s.client_at(b"USER alice\r\nPASS wrong2\r\n", start);
        assert_eq!(s.receiver_at(b"+OK\r\n", start), "+OK\r\n");
        assert_eq!(s.receiver_at(AUTH_FAILED, start), "");
        let release = s.pop3.wake_at().expect("held");
        assert!(release >= start + Duration::from_secs(3), "{release:?}");
        assert!(!s.pop3.wants_client_bytes());
        s.pop3.woken(&mut s.io, start + Duration::from_secs(1));
        assert_eq!(take(&mut s.io.to_client), "");
        // Another account, another session: answered at once.
        let mut other = Session::new(f.pop3(TlsMode::None, false));
        other.client(b"USER bob\r\nPASS wrong\r\n");
        assert_eq!(
            other.receiver(b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"),
            format!("+OK\r\n{}", text(AUTH_FAILED))
        );
        s.pop3.woken(&mut s.io, release);
        assert_eq!(take(&mut s.io.to_client), text(AUTH_FAILED));
        assert_eq!(s.pop3.wake_at(), None);
        assert!(s.pop3.wants_client_bytes());
        assert_eq!(f.pop3_logins("delayed"), 1.0);
    }

    #[test]
    fn pass_auth_plain_and_auth_login_each_read_the_user_and_password() {
        // The same wrong password counts once per account (a stale phone),
        // which it can only if the module read it.
        let f = Fixture::new("[autoban]\nauth_failures = 2\n");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        s.client(b"USER alice\r\nPASS wrong\r\n");
        s.receiver(b"+OK\r\n");
        s.receiver(AUTH_FAILED);
        // authzid NUL alice NUL wrong
        assert_eq!(
            s.client(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n").0,
            "AUTH PLAIN AGFsaWNlAHdyb25n\r\n"
        );
        assert!(!s.pop3.wants_client_bytes());
        s.receiver(AUTH_FAILED);
        assert_eq!(s.client(b"AUTH LOGIN\r\n").0, "AUTH LOGIN\r\n");
        assert_eq!(s.receiver(b"+ VXNlcm5hbWU6\r\n"), "+ VXNlcm5hbWU6\r\n");
        assert_eq!(s.client(b"YWxpY2U=\r\n").0, "YWxpY2U=\r\n");
        s.receiver(b"+ UGFzc3dvcmQ6\r\n");
        assert_eq!(s.client(b"d3Jvbmc=\r\n").0, "d3Jvbmc=\r\n");
        s.receiver(AUTH_FAILED);
        assert_eq!(f.pop3_logins("failure"), 1.0);
        assert_eq!(f.pop3_logins("repeated"), 2.0);
        assert!(!f.banned());
        // A new password is a new failure.
        s.client(b"AUTH PLAIN AGFsaWNlAHdyb25nMg==\r\n");
        s.receiver(AUTH_FAILED);
        assert!(f.banned());
        assert_eq!(f.protocol_errors(), 0);
    }

    #[test]
    fn a_login_accepted_by_the_receiver_is_counted_as_a_success() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        s.client(b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n");
        s.receiver(b"+OK Logged in.\r\n");
        assert_eq!(f.pop3_logins("success"), 1.0);
        assert_eq!(f.pop3_logins("failure"), 0.0);
    }

    #[test]
    fn quit_closes_after_the_receivers_reply() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        assert_eq!(s.client(b"QUIT\r\n").0, "QUIT\r\n");
        assert_eq!(s.pop3.client_finished(), None);
        assert_eq!(s.receiver(b"+OK Bye\r\n"), "+OK Bye\r\n");
        assert_eq!(s.pop3.next(), Next::Close(CloseReason::ClientQuit));
    }

    #[test]
    fn farewells_before_the_login_are_temporary_errors() {
        let f = Fixture::new("");
        let s = Session::new(f.pop3(TlsMode::None, false));
        for why in [
            Farewell::Timeout,
            Farewell::Shutdown,
            Farewell::Blocked,
            Farewell::ReceiverLost,
        ] {
            let said = s.pop3.farewell(why).expect("a farewell");
            assert!(said.starts_with(b"-ERR [SYS/TEMP] ") && said.ends_with(b"\r\n"));
        }
    }

    #[test]
    fn a_partial_line_must_finish_within_the_command_line_timeout() {
        let f = Fixture::new("");
        let mut s = Session::new(f.pop3(TlsMode::None, false));
        let start = Instant::now();
        s.client_at(b"USER al", start);
        let (at, reason) = s.pop3.deadline().expect("a line deadline");
        assert_eq!(
            (at, reason),
            (
                start + f.config.timeouts.command_line,
                CloseReason::LineTimeout
            )
        );
        s.client(b"ice\r\n");
        assert_eq!(s.pop3.deadline(), None);
    }
}
