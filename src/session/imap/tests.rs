//! The IMAP module alone, without sockets: the test fills the buffers the
//! driver would and reads what the module queued.

use super::*;
use crate::config::Protocol as Speaks;
use crate::session::fixture::Fixture;
use crate::session::login::LoginContext;
use crate::tls::TlsVersion;

const CLIENT: &str = "192.0.2.7";

impl Fixture {
    fn imap(&self, tls_mode: TlsMode, require_tls: bool) -> Imap<'_> {
        self.imap_from(CLIENT, tls_mode, require_tls)
    }

    fn imap_from(&self, ip: &str, tls_mode: TlsMode, require_tls: bool) -> Imap<'_> {
        Imap::new(
            MailboxContext {
                config: &self.config,
                metrics: &self.metrics,
                login: LoginContext {
                    settings: &self.config.mailbox,
                    metrics: &self.metrics,
                    shaping: self.shaping.client(ip.parse().unwrap(), false),
                    protocol: Speaks::Imap,
                },
                tls_mode,
                require_tls,
                tls: tls_mode == TlsMode::Implicit,
            },
            Instant::now(),
        )
    }

    /// `mailmoat_logins_total` for IMAP with this outcome.
    fn imap_logins(&self, outcome: &str) -> f64 {
        self.counted(&format!(
            "mailmoat_logins_total{{outcome=\"{outcome}\",protocol=\"imap\"}}"
        ))
    }
}

/// One session and its buffers, as the driver would hold them.
struct Session<'a> {
    imap: Imap<'a>,
    io: Buffers,
}

const GREETING: &[u8] =
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE AUTH=PLAIN] Dovecot ready.\r\n";

impl<'a> Session<'a> {
    fn new(imap: Imap<'a>) -> Self {
        let mut s = Session {
            imap,
            io: Buffers::default(),
        };
        s.receiver(GREETING);
        s
    }

    /// Client bytes in; what went to the receiver and what to the client.
    fn client(&mut self, bytes: &[u8]) -> (String, String) {
        self.io.client_in.extend_from_slice(bytes);
        self.imap.client_input(&mut self.io, Instant::now());
        (take(&mut self.io.to_upstream), take(&mut self.io.to_client))
    }

    /// Receiver bytes in; what went to the client.
    fn receiver(&mut self, bytes: &[u8]) -> String {
        self.io.upstream_in.extend_from_slice(bytes);
        self.imap.upstream_input(&mut self.io, Instant::now());
        take(&mut self.io.to_client)
    }

    fn handshake_done(&mut self) {
        let facts = TlsFacts {
            version: TlsVersion::V1_3,
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            sni: None,
        };
        self.imap.tls_started(&facts, Instant::now());
    }
}

fn take(bytes: &mut Vec<u8>) -> String {
    String::from_utf8_lossy(&std::mem::take(bytes)).into_owned()
}

#[test]
fn the_greeting_offers_starttls_where_the_proxy_terminates_it() {
    let f = Fixture::new("");
    let mut s = Session {
        imap: f.imap(TlsMode::Starttls, false),
        io: Buffers::default(),
    };
    assert_eq!(
        s.receiver(b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=PLAIN] ready\r\n"),
        "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS] ready\r\n"
    );
    let mut s = Session {
        imap: f.imap(TlsMode::Implicit, false),
        io: Buffers::default(),
    };
    assert_eq!(
        s.receiver(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n"),
        "* OK [CAPABILITY IMAP4rev1] ready\r\n"
    );
    let mut s = Session {
        imap: f.imap(TlsMode::Passthrough, false),
        io: Buffers::default(),
    };
    assert_eq!(
        s.receiver(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n"),
        "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n"
    );
}

#[test]
fn starttls_is_answered_by_the_proxy_and_the_session_starts_over_inside_tls() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::Starttls, false));
    assert_eq!(s.client(b"a CAPABILITY\r\n").0, "a CAPABILITY\r\n");
    assert_eq!(
        s.receiver(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na OK done\r\n"),
        "* CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS\r\na OK done\r\n"
    );
    assert_eq!(
        s.client(b"b STARTTLS\r\n"),
        (String::new(), "b OK Begin TLS negotiation now\r\n".into())
    );
    assert_eq!(s.imap.next(), Next::StartTls);
    assert!(!s.imap.wants_client_bytes());
    s.handshake_done();
    assert_eq!(s.imap.next(), Next::Relay);
    s.client(b"c CAPABILITY\r\n");
    assert_eq!(
        s.receiver(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nc OK done\r\n"),
        "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nc OK done\r\n"
    );
    assert_eq!(
        s.client(b"d STARTTLS\r\n").1,
        "d BAD TLS already active\r\n"
    );
}

#[test]
fn plaintext_pipelined_behind_starttls_is_refused_without_an_ok() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::Starttls, false));
    let (upstream, client) = s.client(b"a STARTTLS\r\nb LOGIN joe secret\r\n");
    assert_eq!((upstream.as_str(), client.as_str()), ("", ""));
    assert_eq!(s.imap.next(), Next::Close(CloseReason::ProtocolError));
    assert_eq!(f.protocol_errors(), 1);
}

#[test]
fn starttls_waits_for_the_replies_to_commands_pipelined_before_it() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::Starttls, false));
    assert_eq!(
        s.client(b"a NOOP\r\nb STARTTLS\r\n"),
        ("a NOOP\r\n".into(), String::new())
    );
    assert_eq!(s.imap.next(), Next::Relay);
    assert_eq!(
        s.receiver(b"a OK NOOP completed\r\n"),
        "a OK NOOP completed\r\nb OK Begin TLS negotiation now\r\n"
    );
    assert_eq!(s.imap.next(), Next::StartTls);
}

#[test]
fn a_listener_without_tls_neither_offers_nor_relays_starttls() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    assert_eq!(
        s.client(b"a STARTTLS\r\n"),
        (String::new(), "a BAD STARTTLS not offered here\r\n".into())
    );
}

#[test]
fn passthrough_starttls_goes_to_the_receiver_and_then_bytes_pass_unread() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::Passthrough, false));
    assert_eq!(s.client(b"a STARTTLS\r\n").0, "a STARTTLS\r\n");
    assert!(!s.imap.wants_client_bytes());
    assert_eq!(
        s.receiver(b"a OK Begin TLS\r\n\x16\x03\x01"),
        "a OK Begin TLS\r\n\x16\x03\x01"
    );
    assert_eq!(s.client(b"\x16\x03\x01\x00\x05").0, "\x16\x03\x01\x00\x05");
    assert_eq!(s.imap.farewell(Farewell::Timeout), None);
}

#[test]
fn require_tls_refuses_logins_in_the_clear_and_advertises_logindisabled() {
    let f = Fixture::new("");
    let mut s = Session {
        imap: f.imap(TlsMode::Starttls, true),
        io: Buffers::default(),
    };
    assert_eq!(
        s.receiver(GREETING),
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE STARTTLS LOGINDISABLED] Dovecot ready.\r\n"
    );
    let privacy = "NO [PRIVACYREQUIRED] Must issue a STARTTLS command first\r\n";
    assert_eq!(
        s.client(b"a LOGIN joe secret\r\n"),
        (String::new(), format!("a {privacy}"))
    );
    assert_eq!(
        s.client(b"b AUTHENTICATE PLAIN AGpvZQBzZWNyZXQ=\r\n"),
        (String::new(), format!("b {privacy}"))
    );
    // A literal the client sends unasked after a refused LOGIN is skipped.
    assert_eq!(
        s.client(b"c LOGIN {3+}\r\njoe {6+}\r\nsecret\r\nd NOOP\r\n"),
        ("d NOOP\r\n".into(), format!("c {privacy}"))
    );
    s.receiver(b"d OK done\r\n");
    s.client(b"e STARTTLS\r\n");
    s.handshake_done();
    assert_eq!(
        s.client(b"f LOGIN joe secret\r\n").0,
        "f LOGIN joe secret\r\n"
    );
    assert_eq!(f.protocol_errors(), 0);
}

#[test]
fn a_synchronizing_literal_over_the_bound_is_refused_and_never_forwarded() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    assert_eq!(
        s.client(b"a LOGIN {100000}\r\n"),
        (
            String::new(),
            "a BAD [TOOBIG] literal too long before login\r\n".into()
        )
    );
    assert_eq!(s.imap.next(), Next::Relay);
    assert_eq!(f.protocol_errors(), 1);
    // The client did not send it; the session goes on.
    assert_eq!(s.client(b"b NOOP\r\n").0, "b NOOP\r\n");
}

#[test]
fn a_non_synchronizing_literal_over_the_bound_ends_the_session() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    let (upstream, client) = s.client(b"a LOGIN joe {100000+}\r\nxxxxxxxxxxxx");
    assert_eq!(
        (upstream.as_str(), client.as_str()),
        ("", "* BYE [TOOBIG] literal too long before login\r\n")
    );
    assert_eq!(s.imap.next(), Next::Close(CloseReason::ProtocolError));
    assert!(s.imap.mid_message(), "the client is still sending: linger");
    assert_eq!(f.protocol_errors(), 1);
}

#[test]
fn an_oversized_literal_after_part_of_a_command_went_to_the_receiver_ends_the_session() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    assert_eq!(s.client(b"a LOGIN {3}\r\n").0, "a LOGIN {3}\r\n");
    assert_eq!(s.receiver(b"+ OK\r\n"), "+ OK\r\n");
    let (upstream, client) = s.client(b"joe {100000}\r\n");
    assert_eq!(upstream, "joe");
    assert_eq!(
        client,
        "a BAD [TOOBIG] literal too long before login\r\n* BYE [TOOBIG] literal too long before login\r\n"
    );
    assert_eq!(s.imap.next(), Next::Close(CloseReason::ProtocolError));
}

#[test]
fn literals_are_read_by_count_not_as_lines() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::Starttls, false));
    // A synchronizing literal: nothing more is read until the `+`.
    assert_eq!(s.client(b"a LOGIN {3}\r\n").0, "a LOGIN {3}\r\n");
    assert!(!s.imap.wants_client_bytes());
    assert_eq!(s.receiver(b"+ Ready\r\n"), "+ Ready\r\n");
    assert!(s.imap.wants_client_bytes());
    // The password literal holds what would be a STARTTLS line: it is the
    // password, forwarded, never taken as a command.
    let (upstream, client) = s.client(b"joe {14+}\r\nx STARTTLS\r\n\r\n\r\n");
    assert_eq!(upstream, "joe {14+}\r\nx STARTTLS\r\n\r\n\r\n");
    assert_eq!(client, "");
    assert!(
        !s.imap.wants_client_bytes(),
        "the login's verdict is awaited"
    );
    assert_eq!(s.imap.next(), Next::Relay);
}

#[test]
fn the_receiver_refusing_a_literal_ends_the_command() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    s.client(b"a ID ({4}\r\n");
    assert_eq!(s.receiver(b"a NO not now\r\n"), "a NO not now\r\n");
    assert_eq!(s.client(b"b NOOP\r\n").0, "b NOOP\r\n");
}

#[test]
fn a_literal_hidden_in_an_unclosed_quote_is_refused_and_what_follows_is_read_as_commands() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    let (upstream, client) = s.client(b"a NOOP \"{17+}\r\nb LOGIN joe pw\r\n");
    assert_eq!(upstream, "b LOGIN joe pw\r\n");
    assert_eq!(client, "a BAD invalid arguments\r\n");
    assert_eq!(f.protocol_errors(), 1);
}

#[test]
fn a_successful_login_relays_unread_from_then_on() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    s.client(b"a LOGIN joe secret\r\n");
    // Pipelined behind the login: not read until its verdict.
    assert_eq!(s.client(b"b SELECT {5}\r\n").0, "");
    assert_eq!(
        s.receiver(b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS {\r\n"),
        "a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS {\r\n"
    );
    assert_eq!(s.imap.idle_timeout(), Duration::from_secs(31 * 60));
    let big = vec![b'x'; 100_000];
    assert_eq!(s.client(&big).0.len(), 100_000 + "b SELECT {5}\r\n".len());
    assert_eq!(s.imap.next(), Next::Relay);
    assert_eq!(s.imap.deadline(), None);
}

#[test]
fn a_preauth_greeting_relays_unread_at_once() {
    let f = Fixture::new("");
    let mut s = Session {
        imap: f.imap(TlsMode::None, false),
        io: Buffers::default(),
    };
    assert_eq!(
        s.receiver(b"* PREAUTH welcome\r\n* 1 EXISTS\r\n"),
        "* PREAUTH welcome\r\n* 1 EXISTS\r\n"
    );
    assert_eq!(
        s.client(b"garbage {99999999}\r\n").0,
        "garbage {99999999}\r\n"
    );
}

#[test]
fn a_bye_greeting_is_relayed_and_closes() {
    let f = Fixture::new("");
    let mut s = Session {
        imap: f.imap(TlsMode::None, false),
        io: Buffers::default(),
    };
    assert_eq!(s.receiver(b"* BYE too busy\r\n"), "* BYE too busy\r\n");
    assert_eq!(s.imap.next(), Next::Close(CloseReason::UpstreamClosed));
}

#[test]
fn commands_before_login_are_bounded() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    for i in 0..s.imap.bounds.commands {
        let line = format!("n{i} NOOP\r\n");
        assert_eq!(s.client(line.as_bytes()).0, line);
        s.receiver(format!("n{i} OK\r\n").as_bytes());
    }
    assert_eq!(
        s.client(b"z NOOP\r\n"),
        (
            String::new(),
            "* BYE too many commands before login\r\n".into()
        )
    );
    assert_eq!(s.imap.next(), Next::Close(CloseReason::Limit));
}

#[test]
fn an_overlong_line_ends_the_session() {
    let f = Fixture::new("[limits]\nmax_line_length = 100\n");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    let (upstream, client) = s.client(&[b'a'; 150]);
    assert_eq!(
        (upstream.as_str(), client.as_str()),
        ("", "* BYE [TOOBIG] command line too long\r\n")
    );
    assert_eq!(s.imap.next(), Next::Close(CloseReason::ProtocolError));
}

#[test]
fn bad_from_the_receiver_is_a_protocol_error_but_not_after_a_cancel() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    s.client(b"a LOGIN joe\r\n");
    s.receiver(b"a BAD missing password\r\n");
    assert_eq!(f.protocol_errors(), 1);
    s.client(b"b AUTHENTICATE PLAIN\r\n");
    assert_eq!(s.receiver(b"+ \r\n"), "+ \r\n");
    assert_eq!(s.client(b"*\r\n").0, "*\r\n");
    assert_eq!(
        s.receiver(b"b BAD authentication cancelled\r\n"),
        "b BAD authentication cancelled\r\n"
    );
    assert_eq!(f.protocol_errors(), 1);
    assert_eq!(s.client(b"c NOOP\r\n").0, "c NOOP\r\n");
}

#[test]
fn a_nul_in_a_sasl_response_cancels_the_exchange() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    s.client(b"a AUTHENTICATE PLAIN\r\n");
    s.receiver(b"+ \r\n");
    assert_eq!(s.client(b"AGpv\0ZQ==\r\n").0, "*\r\n");
    s.receiver(b"a BAD cancelled\r\n");
    assert_eq!(f.protocol_errors(), 1);
}

#[test]
fn logout_closes_after_its_tagged_ok() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    s.client(b"a LOGOUT\r\n");
    assert_eq!(
        s.receiver(b"* BYE logging out\r\n"),
        "* BYE logging out\r\n"
    );
    assert_eq!(s.imap.next(), Next::Relay);
    assert_eq!(s.receiver(b"a OK bye\r\n"), "a OK bye\r\n");
    assert_eq!(s.imap.next(), Next::Close(CloseReason::ClientQuit));
}

#[test]
fn a_started_line_must_finish_in_time() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    assert_eq!(s.imap.deadline(), None);
    s.client(b"a LOG");
    let (_, reason) = s.imap.deadline().expect("a line timer");
    assert_eq!(reason, CloseReason::LineTimeout);
    s.client(b"IN {3+}\r\n");
    assert!(s.imap.deadline().is_some(), "the literal is owed");
    s.client(b"joe x\r\n");
    assert_eq!(s.imap.deadline(), None);
}

#[test]
fn farewells_say_unavailable() {
    let f = Fixture::new("");
    let s = Session::new(f.imap(TlsMode::None, false));
    let bye = s.imap.farewell(Farewell::Timeout).unwrap();
    assert!(
        bye.starts_with(b"* BYE [UNAVAILABLE] ") && bye.ends_with(b"\r\n"),
        "{bye:?}"
    );
}

#[test]
fn untagged_garbage_from_the_client_is_refused_unforwarded() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    assert_eq!(
        s.client(b"\r\n"),
        (String::new(), "* BAD invalid command line\r\n".into())
    );
    assert_eq!(f.protocol_errors(), 1);
}

#[test]
fn a_command_broken_after_part_of_it_went_to_the_receiver_ends_the_session() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    s.client(b"a ID ({4+}\r\n");
    let (upstream, client) = s.client(b"name\"x)\r\n");
    assert_eq!(upstream, "name");
    assert_eq!(client, "* BYE invalid command\r\n");
    assert_eq!(s.imap.next(), Next::Close(CloseReason::ProtocolError));
}

#[test]
fn login_verdicts_are_read_from_the_receivers_tagged_status() {
    let f = Fixture::new("");
    let mut s = Session::new(f.imap(TlsMode::None, false));
    s.client(b"a LOGIN joe wrong\r\n");
    assert_eq!(
        s.receiver(b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
        "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    );
    s.client(b"b LOGIN joe \"wrong\"\r\n");
    s.receiver(b"b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
    s.client(b"c LOGIN joe other\r\n");
    s.receiver(b"c NO [UNAVAILABLE] Temporary authentication failure.\r\n");
    s.client(b"d LOGIN joe other\r\n");
    s.receiver(b"d NO Something else\r\n");
    s.client(b"e LOGIN joe x y\r\n");
    s.receiver(b"e BAD too many arguments\r\n");
    assert_eq!(
        (
            f.imap_logins("failure"),
            f.imap_logins("repeated"),
            f.imap_logins("temporary")
        ),
        (1.0, 1.0, 2.0),
        "the same wrong password counts once; UNAVAILABLE and other NO not at all"
    );
    assert_eq!(f.metrics.auth_failures.get(), 1);
    assert_eq!(f.protocol_errors(), 1, "BAD is a protocol error");
    s.client(b"f LOGIN {3}\r\n");
    s.receiver(b"+ go\r\n");
    s.client(b"joe {5+}\r\nright\r\n");
    s.receiver(b"f OK Logged in\r\n");
    assert_eq!(f.imap_logins("success"), 1.0);
    assert_eq!(s.imap.next(), Next::Relay);
    assert_eq!(s.client(b"g SELECT INBOX\r\n").0, "g SELECT INBOX\r\n");
}

/// An account with two distinct failures is delayed (`account_failures =
/// 2`): the next login's status is held. Used to tell whether a mechanism
/// gave the module the account and password.
const TARPIT: &str = "[mailbox]\naccount_failures = 2\naccount_delay = \"5s\"\n";
const FAILED: &[u8] = b"NO [AUTHENTICATIONFAILED] Authentication failed.\r\n";

fn tagged(tag: &str, status: &[u8]) -> Vec<u8> {
    let mut line = format!("{tag} ").into_bytes();
    line.extend_from_slice(status);
    line
}

#[test]
fn an_account_under_attack_has_its_login_status_held_until_release() {
    let f = Fixture::new(TARPIT);
    for (i, ip) in ["192.0.2.10", "192.0.2.11"].into_iter().enumerate() {
        let mut s = Session::new(f.imap_from(ip, TlsMode::None, false));
        s.client(format!("a LOGIN joe guess{i}\r\n").as_bytes());
        assert_eq!(
            s.receiver(&tagged("a", FAILED)).as_bytes(),
            tagged("a", FAILED)
        );
    }
    // Another account is answered at once.
    let mut other = Session::new(f.imap(TlsMode::None, false));
    other.client(b"a LOGIN ann hers\r\n");
    assert_eq!(other.receiver(b"a OK in\r\n"), "a OK in\r\n");
    assert_eq!(other.imap.wake_at(), None);

    let mut s = Session::new(f.imap(TlsMode::None, false));
    let before = Instant::now();
    s.client(b"a LOGIN joe right\r\n");
    assert_eq!(
        s.receiver(b"a OK [CAPABILITY IMAP4rev1] in\r\n* 1 EXISTS\r\n"),
        ""
    );
    let at = s.imap.wake_at().expect("the status is held");
    assert!(at >= before + Duration::from_secs(5), "{:?}", at - before);
    assert!(!s.imap.wants_client_bytes());
    assert_eq!(s.client_finished_now(), None, "the status is still owed");
    // Too early: still held.
    s.imap.woken(&mut s.io, at - Duration::from_millis(1));
    assert_eq!(take(&mut s.io.to_client), "");
    s.imap.woken(&mut s.io, at);
    assert_eq!(
        take(&mut s.io.to_client),
        "a OK [CAPABILITY IMAP4rev1] in\r\n* 1 EXISTS\r\n"
    );
    assert_eq!(s.imap.wake_at(), None);
    assert!(s.imap.wants_client_bytes());
    assert_eq!(s.client(b"b IDLE\r\n").0, "b IDLE\r\n");
    assert_eq!(f.imap_logins("success"), 2.0);
}

impl Session<'_> {
    fn client_finished_now(&self) -> Option<CloseReason> {
        self.imap.client_finished()
    }
}

/// Two distinct failures for joe through `exchange` (client lines, each
/// followed by the receiver's `+`), then a LOGIN for joe: held only if the
/// exchanges gave the module joe's name and the passwords.
fn fails_twice_then_held(exchange: impl Fn(usize) -> Vec<Vec<u8>>) -> bool {
    let f = Fixture::new(TARPIT);
    for i in 0..2 {
        let mut s = Session::new(f.imap(TlsMode::None, false));
        let lines = exchange(i);
        for (n, line) in lines.iter().enumerate() {
            s.client(line);
            if n + 1 < lines.len() {
                assert_eq!(s.receiver(b"+ \r\n"), "+ \r\n");
            }
        }
        s.receiver(&tagged("a", FAILED));
    }
    let mut s = Session::new(f.imap(TlsMode::None, false));
    s.client(b"a LOGIN joe right\r\n");
    s.receiver(b"a OK in\r\n");
    s.imap.wake_at().is_some()
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn authenticate_plain_and_login_give_the_account_and_password() {
    let plain_ir =
        |i| vec![format!("a AUTHENTICATE PLAIN {}\r\n", b64(&format!("\0joe\0g{i}"))).into_bytes()];
    assert!(fails_twice_then_held(plain_ir));
    let plain = |i| {
        vec![
            b"a AUTHENTICATE PLAIN\r\n".to_vec(),
            format!("{}\r\n", b64(&format!("\0joe\0g{i}"))).into_bytes(),
        ]
    };
    assert!(fails_twice_then_held(plain));
    let login = |i| {
        vec![
            b"a AUTHENTICATE LOGIN\r\n".to_vec(),
            format!("{}\r\n", b64("joe")).into_bytes(),
            format!("{}\r\n", b64(&format!("g{i}"))).into_bytes(),
        ]
    };
    assert!(fails_twice_then_held(login));
    let login_ir = |i| {
        vec![
            format!("a AUTHENTICATE LOGIN {}\r\n", b64("joe")).into_bytes(),
            format!("{}\r\n", b64(&format!("g{i}"))).into_bytes(),
        ]
    };
    assert!(fails_twice_then_held(login_ir));
    // Another account's failures, or a mechanism that hides the account,
    // do not delay joe.
    let ann = |i| vec![format!("a LOGIN ann g{i}\r\n").into_bytes()];
    assert!(!fails_twice_then_held(ann));
    let scram = |_| vec![b"a AUTHENTICATE SCRAM-SHA-256 biwsbj1qb2Uscj1y\r\n".to_vec()];
    assert!(!fails_twice_then_held(scram));
}
