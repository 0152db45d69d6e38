//! The checks behind `fuzz/fuzz_targets/*`: one function per target, each
//! taking the raw input and panicking when a property fails. They live here,
//! always compiled, so `tests/it/fuzz_corpus.rs` replays the seed corpora on
//! stable with the very checks the fuzzers run.

use std::path::Path;

use crate::blocklist::{parse_list, parse_net, IpSet};
use crate::config::Config;
use crate::proxy_protocol::{self, Inbound, MAX_INBOUND_HEADER};
use crate::session::message::{field, size_param, Message, MAX_FIELD};
use crate::smtp::{Command, DataEvent, DataScanner, Reply, ReplyAssembler, Verb};

/// A target's check: panics when a property fails on `data`.
pub type Check = fn(data: &[u8]);

/// Every fuzz target, by name: the corpus folder and the check it runs.
pub const TARGETS: [(&str, Check); 12] = [
    ("smtp_command", smtp_command),
    ("smtp_reply", smtp_reply),
    ("data_scanner", data_scanner),
    ("blocklist_line", blocklist_line),
    ("proxy_header", proxy_header),
    ("config_loader", config_loader),
    ("ban_state", ban_state),
    ("smtp_session", smtp_session),
    ("fleet_event", fleet_event),
    ("imap_response", imap_response),
    ("imap_session", imap_session),
    ("pop3_session", pop3_session),
];

/// Messages on the fleet's channel (and stored ban values), one per line,
/// as another node or a tampered store could send them: parsing never
/// panics, what parses writes back to the same event, names and reasons
/// stay one clean word, and applying it to the bans never panics.
pub fn fleet_event(data: &[u8]) {
    use crate::fleet::sync::{decode, encode, Event};
    let bans = detached_bans(16);
    for line in data.split(|&b| b == b'\n') {
        let Ok(text) = std::str::from_utf8(line) else {
            continue;
        };
        let _ = decode(text);
        let Some(event) = Event::parse(text) else {
            continue;
        };
        let again = match &event {
            Event::Banned { net, ban } => {
                let node = ban.origin.as_deref().unwrap_or("");
                for word in [node, &ban.reason] {
                    assert!(word.chars().all(|c| c.is_ascii_graphic()), "{word:?}");
                }
                format!("ban {net} {}", encode(ban, node).join(" "))
            }
            Event::Lifted { net, at_ms, node } => format!("lift {net} {at_ms} {node}"),
        };
        if !matches!(&event, Event::Banned { ban, .. } if ban.origin.is_none())
            && !matches!(&event, Event::Lifted { node, .. } if node.is_empty())
        {
            assert_eq!(Event::parse(&again).as_ref(), Some(&event), "{again:?}");
        }
        match event {
            Event::Banned { net, ban } => {
                let _ = bans.apply_remote(net, ban);
            }
            Event::Lifted { net, at_ms, .. } => {
                bans.lift_remote(net, at_ms);
            }
        }
    }
}

/// Bans that feed lists nobody reads, kept in memory only.
fn detached_bans(max_bans: usize) -> crate::bans::Bans {
    let mut settings = Config::default().autoban;
    settings.state = None;
    settings.max_bans = max_bans;
    crate::bans::Bans::detached(
        settings,
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    )
}

/// `Command::parse` on each line: the verb matches the first word, the
/// arguments survive a re-parse, and log fields stay bounded and quotable.
pub fn smtp_command(data: &[u8]) {
    for line in data.split_inclusive(|&b| b == b'\n') {
        let command = Command::parse(line);
        assert!(command.args.len() <= line.len());
        if command.verb != Verb::Other {
            let word = line.split(|&b| b == b' ').next().unwrap_or_default();
            let word = crate::smtp::command::strip_line_ending(word);
            assert!(word.eq_ignore_ascii_case(command.verb.as_str().as_bytes()));
            let mut again = command.verb.as_str().as_bytes().to_vec();
            again.push(b' ');
            again.extend_from_slice(command.args);
            again.extend_from_slice(b"\r\n");
            assert_eq!(Command::parse(&again), command);
        }
        if size_param(command.args).is_some() {
            let upper = command.args.to_ascii_uppercase();
            assert!(upper.windows(5).any(|w| w == b"SIZE="));
        }
        assert_log_safe(&field(command.args));
        assert_log_safe(&Message::new(command.args).mail_from);
    }
}

/// Client text is logged as a `&str` value, which the text formatter writes
/// Debug-quoted: bounded, and one quoted value with no control character.
fn assert_log_safe(text: &str) {
    assert!(text.len() <= MAX_FIELD, "field too long: {}", text.len());
    let quoted = format!("{text:?}");
    assert!(
        !quoted.chars().any(char::is_control),
        "control character in log field {quoted}"
    );
}

/// The longest reply the target lets the assembler build.
const REPLY_BOUND: usize = 512;

/// Lines through a `ReplyAssembler`: no reply over its bound, each reply's
/// lines are continuations up to one last line, all with one code. The EHLO
/// edits (`without_extensions`, then `with_size_limit`, as the relay does)
/// keep the first line and give a reply that reassembles to itself, whose
/// SIZE never advertises more than the limit.
pub fn smtp_reply(data: &[u8]) {
    let mut assembler = ReplyAssembler::new(REPLY_BOUND);
    for line in data.split_inclusive(|&b| b == b'\n') {
        let reply = match assembler.push_line(line) {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(_) => {
                // The relay closes the connection on any error.
                assembler = ReplyAssembler::new(REPLY_BOUND);
                continue;
            }
        };
        assert!(reply.raw.len() <= REPLY_BOUND);
        assert_one_reply(&reply);
        let lines: Vec<&[u8]> = reply.lines().collect();
        for keywords in [&["CHUNKING", "BINARYMIME"][..], &["PIPELINING"], &[]] {
            let edited = reply.without_extensions(keywords);
            assert_one_reply(&edited);
            let first = edited.lines().next().expect("the first line is kept");
            assert_eq!(first[..3], lines[0][..3]);
            assert_eq!(text_of(first), text_of(lines[0]));
            if keywords.is_empty() {
                assert_eq!(edited, reply);
            }
            for max in [1, 25 << 20] {
                let sized = edited.with_size_limit(max);
                assert_one_reply(&sized);
                assert_eq!(sized.code, edited.code);
                assert_eq!(sized.lines().count(), edited.lines().count());
                assert_eq!(sized.lines().next(), edited.lines().next());
                for l in sized.lines().skip(1) {
                    let mut words = text_of(l).split(|&b| b == b' ');
                    if words
                        .next()
                        .is_some_and(|w| w.eq_ignore_ascii_case(b"SIZE"))
                    {
                        let n = words.next().and_then(|n| std::str::from_utf8(n).ok());
                        let n: u64 = n.and_then(|n| n.parse().ok()).expect("a SIZE number");
                        assert!((1..=max).contains(&n), "SIZE {n} over {max}");
                    }
                }
            }
        }
    }
}

/// `reply` is one well-formed reply: fed back line by line to an assembler,
/// it comes out whole, equal to itself, on its last line.
fn assert_one_reply(reply: &Reply) {
    let lines: Vec<&[u8]> = reply.lines().collect();
    let mut again = ReplyAssembler::new(usize::MAX);
    let mut replies = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let (_, last) = crate::smtp::reply::parse_line(l).expect("reply line parses");
        assert_eq!(last, i + 1 == lines.len());
        replies.extend(again.push_line(l).expect("one reply, one code"));
    }
    assert!(again.is_empty(), "reply does not end");
    assert_eq!(replies, std::slice::from_ref(reply), "not one reply");
    assert_eq!(
        reply.code.to_string().as_bytes(),
        &lines[lines.len() - 1][..3]
    );
}

/// A reply line's text, without code, separator and line ending.
fn text_of(line: &[u8]) -> &[u8] {
    crate::smtp::command::strip_line_ending(line.get(4..).unwrap_or_default())
}

/// The scanner gives the same events, at the same absolute offsets, whether
/// the input comes in one chunk, byte by byte, or in uneven chunks; an end
/// is always just after `CRLF.CRLF` (or `.CRLF` at the very start), with no
/// NUL before it; a `Nul` event points at the first NUL byte.
pub fn data_scanner(data: &[u8]) {
    let whole = scan_in_chunks(data, |_| data.len().max(1));
    let bytewise = scan_in_chunks(data, |_| 1);
    let mut seed = data.len() as u32 | 1;
    let uneven = scan_in_chunks(data, |_| {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        1 + (seed >> 16) as usize % 17
    });
    assert_eq!(whole, bytewise);
    assert_eq!(whole, uneven);
    let mut start = 0;
    for event in &whole {
        match *event {
            DataEvent::End(end) => {
                let message = &data[start..end];
                assert!(
                    message == b".\r\n" || message.ends_with(b"\r\n.\r\n"),
                    "end after {message:?}"
                );
                assert!(!message.contains(&0), "NUL in {message:?}");
                start = end;
            }
            DataEvent::Smuggling(at) => {
                assert!(at < data.len());
                assert!(!data[start..at].contains(&0), "NUL before smuggling");
            }
            DataEvent::Nul(at) => {
                assert_eq!(data.get(at), Some(&0));
                assert!(!data[start..at].contains(&0), "not the first NUL");
            }
            DataEvent::Continue => unreachable!(),
        }
    }
}

/// Feeds `data` in chunks of `next_len()` bytes, each message to its end;
/// returns the events with offsets from the start of `data`.
fn scan_in_chunks(data: &[u8], mut next_len: impl FnMut(usize) -> usize) -> Vec<DataEvent> {
    let mut events = Vec::new();
    let mut scanner = DataScanner::default();
    let mut offset = 0;
    while offset < data.len() {
        let len = next_len(offset).min(data.len() - offset);
        let chunk = &data[offset..offset + len];
        let mut pos = 0;
        loop {
            match scanner.scan(&chunk[pos..]) {
                DataEvent::Continue => break,
                DataEvent::End(n) => {
                    assert!(n > 0 && pos + n <= chunk.len());
                    pos += n;
                    events.push(DataEvent::End(offset + pos));
                }
                DataEvent::Smuggling(i) => {
                    assert!(pos + i < chunk.len());
                    events.push(DataEvent::Smuggling(offset + pos + i));
                    return events;
                }
                DataEvent::Nul(i) => {
                    assert!(pos + i < chunk.len());
                    events.push(DataEvent::Nul(offset + pos + i));
                    return events;
                }
            }
        }
        offset += len;
    }
    events
}

/// `parse_list` over the input as text: every entry is a network address
/// that round-trips through its `Display` and matches itself in an `IpSet`.
pub fn blocklist_line(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (nets, bad) = parse_list(&text);
    let lines = text.lines().count();
    assert!(nets.len() + bad.len() <= lines);
    for b in &bad {
        assert!((1..=lines).contains(&b.line));
        assert!(b.text.chars().count() <= 80);
    }
    let mut set = IpSet::new();
    for net in &nets {
        assert_eq!(*net, net.trunc());
        assert_eq!(parse_net(&net.to_string()).as_ref(), Ok(net));
        set.insert(*net, ());
        let lookup = set.lookup(net.network());
        assert!(
            lookup.is_some_and(|(found, ())| found.prefix_len() >= net.prefix_len()),
            "{net} does not match its own network address"
        );
    }
    for line in text.lines() {
        if let Ok(net) = parse_net(line) {
            assert_eq!(parse_net(&net.to_string()), Ok(net));
        }
    }
    // The streaming reader (files, the API cache) stops one entry past its
    // limit, quotes at most a few bad lines, and otherwise reads what
    // `parse_list` reads.
    for max_entries in [2, 1 << 20] {
        let limits = crate::blocklist::Limits {
            max_entries,
            max_bytes: 1 << 20,
        };
        let Ok(parsed) = crate::blocklist::parse_reader(data, limits) else {
            continue;
        };
        assert!(parsed.nets.len() <= max_entries + 1);
        assert!(parsed.bad.first.len() as u64 <= parsed.bad.count);
        assert!(parsed.bad.first.len() <= 5);
        if std::str::from_utf8(data).is_ok() && parsed.nets.len() <= max_entries {
            assert_eq!(parsed.nets, nets, "the streaming reader disagrees");
            assert_eq!(parsed.bad.count, bad.len() as u64);
        }
    }
}

/// `parse_inbound`: a parsed header is no longer than the input, begins like
/// a header, and parses the same on its own; a full-size buffer is never
/// `Incomplete`, so the reader's buffer stays bounded.
pub fn proxy_header(data: &[u8]) {
    let result = proxy_protocol::parse_inbound(data);
    match &result {
        Inbound::Proxied { client, len } => {
            assert!(*len > 0 && *len <= data.len());
            assert_eq!(client.ip(), client.ip().to_canonical());
            assert!(proxy_protocol::looks_like_header(data));
            assert_eq!(proxy_protocol::parse_inbound(&data[..*len]), result);
        }
        Inbound::Local { len } => {
            assert!(*len > 0 && *len <= data.len());
            assert!(proxy_protocol::looks_like_header(data));
            assert_eq!(proxy_protocol::parse_inbound(&data[..*len]), result);
        }
        Inbound::Incomplete => assert!(data.len() < MAX_INBOUND_HEADER),
        Inbound::Malformed(_) => {}
    }
    // The door refuses what `sniff` flags: it must flag every header a
    // trusted proxy's would be parsed as.
    if matches!(result, Inbound::Proxied { .. } | Inbound::Local { .. }) {
        assert_eq!(proxy_protocol::sniff(data), proxy_protocol::Sniff::Header);
    }
}

/// `autoban.state` as loaded at start: any bytes load without a panic, at
/// most `max_bans` bans, none beyond `max_ttl`, and the export loads back
/// to itself (but for bans expiring meanwhile).
pub fn ban_state(data: &[u8]) {
    const MAX_BANS: usize = 16;
    let bans = |text: &[u8]| {
        let bans = detached_bans(MAX_BANS);
        bans.load(text, Path::new("fuzz.state"));
        bans
    };
    let first = bans(data);
    let max_ttl = Config::default().autoban.max_ttl.as_secs();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let exported = first.export();
    let lines: Vec<&str> = exported.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(lines.len() <= MAX_BANS, "{} bans kept", lines.len());
    let until = |line: &str| -> u64 {
        let field = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("until="));
        field
            .and_then(|u| u.parse().ok())
            .expect("every export line has until=")
    };
    for line in &lines {
        assert!(until(line) <= now + max_ttl + 2, "beyond max_ttl: {line}");
    }
    let again = bans(exported.as_bytes()).export();
    for line in again.lines().filter(|l| !l.starts_with('#')) {
        assert!(lines.contains(&line), "{line:?} appeared on reload");
    }
    for line in lines.iter().filter(|l| until(l) > now + 5) {
        assert!(again.lines().any(|l| l == *line), "{line:?} lost on reload");
    }
}

/// `Config::from_toml` on arbitrary text never panics; a config it accepts
/// renders as TOML that loads back into the same config. Host names resolve
/// to a documentation address, offline.
pub fn config_loader(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let resolve = |name: &str| -> Result<Vec<std::net::SocketAddr>, String> {
        let port = name.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
        port.map(|port| vec![std::net::SocketAddr::from(([192, 0, 2, 1], port))])
            .ok_or_else(|| "no port".into())
    };
    match Config::parse(text, Path::new("fuzz.toml"), None, &resolve) {
        Ok(config) => {
            let rendered = config.to_toml();
            let again = Config::parse(&rendered, Path::new("rendered.toml"), None, &resolve)
                .unwrap_or_else(|e| panic!("rendered config does not load: {e}\n{rendered}"));
            assert_eq!(
                again.to_toml(),
                rendered,
                "rendered config changed on reload"
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The SMTP module as the driver runs it, fed client and receiver bytes in
/// the chunks the input says, on a listener of the mode it says. The first
/// byte picks the TLS mode and `require_tls`; then records of a direction
/// byte (even: client, odd: receiver), a length byte and that many bytes.
/// A `StartTls` request is answered as a finished handshake.
///
/// Properties: no panic; TLS starts only on a `starttls` listener, once,
/// right after the proxy's own `220`, with no client byte left unread
/// (plaintext pipelined behind STARTTLS is never carried into TLS,
/// CVE-2011-0411).
pub fn smtp_session(data: &[u8]) {
    use crate::config::TlsMode;
    use crate::session::protocol::{Buffers, Next, Protocol};
    use crate::session::smtp::{Smtp, SmtpContext};
    use crate::shaping::Shaping;
    use crate::tls::{TlsFacts, TlsVersion};
    use std::sync::Arc;
    use tokio::time::Instant;

    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let tls_mode = [
        TlsMode::Starttls,
        TlsMode::Passthrough,
        TlsMode::None,
        TlsMode::Implicit,
    ][usize::from(mode & 3)];
    let config = Config::default();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let shaping = Shaping::detached(&config, &metrics);
    let ip = "192.0.2.9".parse().expect("an IP");
    let facts = TlsFacts {
        version: TlsVersion::V1_3,
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        sni: None,
    };
    let mut smtp = Smtp::new(
        SmtpContext {
            config: &config,
            metrics: &metrics,
            shaping: shaping.client(ip, false),
            client_ip: ip,
            tls_mode,
            require_tls: mode & 4 != 0,
            tls: (tls_mode == TlsMode::Implicit).then(|| facts.clone()),
        },
        Instant::now(),
    );
    let mut io = Buffers::default();
    let mut started_tls = false;
    while let [direction, len, tail @ ..] = rest {
        let take = usize::from(*len).min(tail.len());
        let (chunk, after) = tail.split_at(take);
        rest = after;
        let now = Instant::now();
        if direction % 2 == 0 {
            // The driver reads the client only when the module wants it.
            if smtp.wants_client_bytes() {
                io.client_in.extend_from_slice(chunk);
            }
            smtp.client_input(&mut io, now);
        } else {
            io.upstream_in.extend_from_slice(chunk);
            smtp.upstream_input(&mut io, now);
        }
        match smtp.next() {
            Next::Relay => {}
            // The driver ends the session here.
            Next::Close(_) => return,
            Next::StartTls => {
                assert!(io.client_in.is_empty(), "plaintext carried into TLS");
                assert!(
                    io.to_client.ends_with(b"220 2.0.0 Ready to start TLS\r\n"),
                    "TLS without the proxy's 220"
                );
                assert!(
                    matches!(tls_mode, TlsMode::Starttls) && !started_tls,
                    "TLS started twice or on a listener that does not terminate it"
                );
                started_tls = true;
                smtp.tls_started(&facts, now);
            }
        }
        io.to_client.clear();
        io.to_upstream.clear();
    }
}

/// The receiver's IMAP responses, framed as the IMAP module frames them:
/// the same responses whether the bytes come whole or one at a time, none
/// over the bound, each one whole response; a capability edit keeps the
/// response one response of the same kind, and editing again changes
/// nothing.
pub fn imap_response(data: &[u8]) {
    use crate::session::imap::reply::{edit_capabilities, kind, CapabilityEdit, Framer};
    const MAX: usize = 512;
    let frame = |chunk: usize| {
        let mut framer = Framer::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match framer.next(&buf, MAX) {
                    Ok(Some(n)) => out.push(Ok(buf.drain(..n).collect::<Vec<u8>>())),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    };
    let whole = frame(data.len());
    assert_eq!(whole, frame(1), "framing depends on how the bytes arrive");
    let edits = [
        CapabilityEdit {
            remove: &["STARTTLS", "LOGINDISABLED"],
            add: &["STARTTLS"],
        },
        CapabilityEdit {
            remove: &["STARTTLS", "AUTH="],
            add: &["LOGINDISABLED"],
        },
    ];
    for response in whole.iter().flatten() {
        assert!(response.len() <= MAX);
        assert!(response.ends_with(b"\n"));
        let mut again = Framer::default();
        assert_eq!(again.next(response, MAX), Ok(Some(response.len())));
        for edit in &edits {
            let Some(edited) = edit_capabilities(response, edit) else {
                continue;
            };
            assert_eq!(kind(&edited).ok(), kind(response).ok());
            let twice = edit_capabilities(&edited, edit).expect("still a capability list");
            assert_eq!(twice, edited, "a second edit changed the response");
        }
    }
}

/// The IMAP module as the driver runs it, fed as `smtp_session` is: the
/// first byte picks the TLS mode and `require_tls`, then records of a
/// direction byte (even: client, odd: receiver), a length byte and that
/// many bytes. A `StartTls` request is answered as a finished handshake; a
/// held login status is woken at once.
///
/// Properties: no panic; TLS starts only on a `starttls` listener, once,
/// right after the proxy's own OK, with no client byte left unread; no
/// more commands are taken before login than `mailbox.preauth_commands`
/// and the one refused for it.
pub fn imap_session(data: &[u8]) {
    use crate::config::TlsMode;
    use crate::session::imap::Imap;
    use crate::session::protocol::{Buffers, Next, Protocol};
    use crate::tls::{TlsFacts, TlsVersion};
    use std::sync::Arc;
    use tokio::time::Instant;

    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let tls_mode = [
        TlsMode::Starttls,
        TlsMode::Passthrough,
        TlsMode::None,
        TlsMode::Implicit,
    ][usize::from(mode & 3)];
    let mut config = Config::default();
    config.limits.max_line_length = 256;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let facts = TlsFacts {
        version: TlsVersion::V1_3,
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        sni: None,
    };
    let shaping = crate::shaping::Shaping::detached(&config, &metrics);
    let mut imap = Imap::new(
        crate::session::login::MailboxContext {
            config: &config,
            metrics: &metrics,
            login: crate::session::login::LoginContext {
                settings: &config.mailbox,
                metrics: &metrics,
                shaping: shaping.client("192.0.2.9".parse().expect("an IP"), false),
                protocol: crate::config::Protocol::Imap,
            },
            tls_mode,
            require_tls: mode & 4 != 0,
            tls: tls_mode == TlsMode::Implicit,
        },
        Instant::now(),
    );
    let max_commands = imap.preauth_commands() + 1;
    let mut io = Buffers::default();
    let mut started_tls = false;
    while let [direction, len, tail @ ..] = rest {
        let take = usize::from(*len).min(tail.len());
        let (chunk, after) = tail.split_at(take);
        rest = after;
        let now = Instant::now();
        if direction % 2 == 0 {
            if imap.wants_client_bytes() {
                io.client_in.extend_from_slice(chunk);
            }
            imap.client_input(&mut io, now);
        } else {
            io.upstream_in.extend_from_slice(chunk);
            imap.upstream_input(&mut io, now);
        }
        if let Some(at) = imap.wake_at() {
            imap.woken(&mut io, at);
        }
        assert!(
            imap.commands() <= max_commands,
            "too many commands before login"
        );
        match imap.next() {
            Next::Relay => {}
            Next::Close(_) => return,
            Next::StartTls => {
                assert!(io.client_in.is_empty(), "plaintext carried into TLS");
                assert!(
                    io.to_client.ends_with(b" OK Begin TLS negotiation now\r\n"),
                    "TLS without the proxy's OK"
                );
                assert!(
                    matches!(tls_mode, TlsMode::Starttls) && !started_tls,
                    "TLS started twice or on a listener that does not terminate it"
                );
                started_tls = true;
                imap.tls_started(&facts, now);
            }
        }
        io.to_client.clear();
        io.to_upstream.clear();
    }
}

/// The POP3 module as the driver runs it, in the format of
/// [`smtp_session`]: the first byte picks the TLS mode (bits 0-1) and
/// `require_tls` (bit 2); then records of a direction byte (even: client,
/// odd: receiver), a length byte and that many bytes. A `StartTls` request
/// is answered as a finished handshake.
///
/// Properties: no panic; TLS starts only on a `starttls` listener, once,
/// right after the proxy's own `+OK`, with no client byte left unread;
/// before a login no line reaching the receiver holds a NUL or exceeds the
/// line limit, STLS reaches it only on a `passthrough` listener, and no
/// login command reaches it in the clear where TLS is required.
pub fn pop3_session(data: &[u8]) {
    use crate::config::TlsMode;
    use crate::session::pop3::Pop3;
    use crate::session::protocol::{Buffers, Next, Protocol};
    use crate::shaping::Shaping;
    use crate::tls::{TlsFacts, TlsVersion};
    use std::sync::Arc;
    use tokio::time::Instant;

    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let tls_mode = [
        TlsMode::Starttls,
        TlsMode::Passthrough,
        TlsMode::None,
        TlsMode::Implicit,
    ][usize::from(mode & 3)];
    let require_tls = mode & 4 != 0;
    let config = Config::default();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let shaping = Shaping::detached(&config, &metrics);
    let ip = "192.0.2.9".parse().expect("an IP");
    let facts = TlsFacts {
        version: TlsVersion::V1_3,
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        sni: None,
    };
    let mut tls = tls_mode == TlsMode::Implicit;
    let mut pop3 = Pop3::new(
        crate::session::login::MailboxContext {
            config: &config,
            metrics: &metrics,
            login: crate::session::login::LoginContext {
                settings: &config.mailbox,
                metrics: &metrics,
                shaping: shaping.client(ip, false),
                protocol: crate::config::Protocol::Pop3,
            },
            tls_mode,
            require_tls,
            tls,
        },
        Instant::now(),
    );
    let preauth_idle = config.mailbox.preauth_idle;
    let max_line = config.limits.max_line_length;
    let mut io = Buffers::default();
    let mut started_tls = false;
    // The client was last sent a SASL challenge: its next line is a
    // response (base64, which may spell a command).
    let mut challenged = false;
    while let [direction, len, tail @ ..] = rest {
        let take = usize::from(*len).min(tail.len());
        let (chunk, after) = tail.split_at(take);
        rest = after;
        let now = Instant::now();
        // Before a login (the only time the module reads the lines).
        let preauth = pop3.idle_timeout() == preauth_idle && !challenged;
        if direction % 2 == 0 {
            if pop3.wants_client_bytes() {
                io.client_in.extend_from_slice(chunk);
            }
            pop3.client_input(&mut io, now);
        } else {
            io.upstream_in.extend_from_slice(chunk);
            pop3.upstream_input(&mut io, now);
        }
        if preauth && pop3.idle_timeout() == preauth_idle {
            for line in io.to_upstream.split_inclusive(|&b| b == b'\n') {
                assert!(!line.contains(&0), "NUL forwarded: {line:?}");
                assert!(line.len() <= max_line, "over-long line forwarded");
                let command = crate::pop3::Command::parse(line);
                assert!(
                    command.verb != crate::pop3::Verb::Stls || tls_mode == TlsMode::Passthrough,
                    "STLS forwarded on a {tls_mode:?} listener"
                );
                if require_tls && !tls {
                    use crate::pop3::Verb;
                    assert!(
                        !matches!(
                            command.verb,
                            Verb::User | Verb::Pass | Verb::Apop | Verb::Auth
                        ),
                        "a login forwarded in the clear: {line:?}"
                    );
                }
            }
        }
        match pop3.next() {
            Next::Relay => {}
            Next::Close(_) => return,
            Next::StartTls => {
                assert!(io.client_in.is_empty(), "plaintext carried into TLS");
                assert!(
                    io.to_client.ends_with(b"+OK Begin TLS negotiation\r\n"),
                    "TLS without the proxy's +OK"
                );
                assert!(
                    matches!(tls_mode, TlsMode::Starttls) && !started_tls,
                    "TLS started twice or on a listener that does not terminate it"
                );
                started_tls = true;
                tls = true;
                pop3.tls_started(&facts, now);
            }
        }
        if let Some(last) = io.to_client.split_inclusive(|&b| b == b'\n').next_back() {
            challenged =
                crate::pop3::reply::status(last) == Some(crate::pop3::Status::Continuation);
        }
        io.to_client.clear();
        io.to_upstream.clear();
    }
}
