//! The receiver's IMAP responses before login (RFC 9051 §7): continuation
//! requests (`+ …`), untagged responses (`* …`) and the tagged status that
//! ends a command (`tag OK|NO|BAD [code] text`). Each is framed whole, its
//! literals read by count (only untagged data carries them: status
//! responses have free text, where a `{3}` is just text), so the proxy can
//! match a status to its command by tag and edit capability lists.

use super::command::strip_line_ending;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    Bye,
    Preauth,
}

impl Status {
    fn parse(word: &[u8]) -> Option<Status> {
        const WORDS: [(&[u8], Status); 5] = [
            (b"OK", Status::Ok),
            (b"NO", Status::No),
            (b"BAD", Status::Bad),
            (b"BYE", Status::Bye),
            (b"PREAUTH", Status::Preauth),
        ];
        WORDS
            .iter()
            .find(|(w, _)| word.eq_ignore_ascii_case(w))
            .map(|&(_, s)| s)
    }
}

/// What a response is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// `+ …`: the receiver waits for the client.
    Continuation,
    /// `* …`: a status (`* OK`, `* BYE`, …), or data (`None`: CAPABILITY, ID…).
    Untagged(Option<Status>),
    /// The end of the command with this tag.
    Tagged(&'a [u8], Status),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response is longer than {0} bytes")]
    TooLong(usize),
    #[error("response is neither a continuation, untagged, nor tagged with OK, NO or BAD")]
    Malformed,
}

/// Reads a whole response's kind from its first line.
pub fn kind(raw: &[u8]) -> Result<Kind<'_>, ResponseError> {
    let line = strip_line_ending(first_line(raw));
    let mut words = line.splitn(3, |&b| b == b' ');
    let first = words.next().unwrap_or_default();
    let second = words.next();
    match first {
        b"+" => Ok(Kind::Continuation),
        // A bare `+` line is an empty continuation request.
        _ if line == b"+" => Ok(Kind::Continuation),
        b"*" => Ok(Kind::Untagged(second.and_then(Status::parse))),
        tag if !tag.is_empty() && tag.iter().all(|&b| b.is_ascii_graphic()) => {
            match second.and_then(Status::parse) {
                Some(status @ (Status::Ok | Status::No | Status::Bad)) => {
                    Ok(Kind::Tagged(tag, status))
                }
                _ => Err(ResponseError::Malformed),
            }
        }
        _ => Err(ResponseError::Malformed),
    }
}

fn first_line(raw: &[u8]) -> &[u8] {
    memchr::memchr(b'\n', raw).map_or(raw, |i| &raw[..=i])
}

/// A status response's code: `AUTHENTICATIONFAILED` in
/// `a NO [AUTHENTICATIONFAILED] …`, upper-cased, without its arguments.
pub fn code(raw: &[u8]) -> Option<Vec<u8>> {
    let line = strip_line_ending(first_line(raw));
    let mut words = line.splitn(3, |&b| b == b' ');
    let text = words.nth(2)?;
    let inner = text.strip_prefix(b"[")?;
    let len = inner
        .iter()
        .take_while(|&&b| !matches!(b, b' ' | b']'))
        .count();
    (len > 0).then(|| inner[..len].to_ascii_uppercase())
}

/// Splits the receiver's bytes into whole responses. Kept between reads,
/// so a response that arrives in pieces is scanned once.
#[derive(Debug, Default)]
pub struct Framer {
    /// Where the response's current line starts (after a literal, the
    /// rest of the line that announced it).
    line_start: usize,
    /// Bytes before this hold no line end still to find.
    scanned: usize,
}

impl Framer {
    /// The length of the whole response at the start of `buf`, once it is
    /// all there. `buf` only grows between calls until the response is
    /// taken; then the framer starts over.
    pub fn next(&mut self, buf: &[u8], max: usize) -> Result<Option<usize>, ResponseError> {
        loop {
            if self.scanned > buf.len() {
                // A literal's bytes are still arriving.
                return Ok(None);
            }
            let Some(lf) = memchr::memchr(b'\n', &buf[self.scanned..]) else {
                self.scanned = buf.len();
                return if buf.len() > max {
                    Err(ResponseError::TooLong(max))
                } else {
                    Ok(None)
                };
            };
            let end = self.scanned + lf + 1;
            if end > max {
                return Err(ResponseError::TooLong(max));
            }
            let line = &buf[self.line_start..end];
            if carries_data(buf) {
                if let Some(len) = trailing_literal(line) {
                    let after = usize::try_from(len)
                        .ok()
                        .and_then(|len| end.checked_add(len))
                        .filter(|&after| after <= max)
                        .ok_or(ResponseError::TooLong(max))?;
                    self.line_start = after;
                    self.scanned = after;
                    continue;
                }
            }
            *self = Framer::default();
            return Ok(Some(end));
        }
    }
}

/// An untagged data response (not a status): the only kind with literals.
fn carries_data(response: &[u8]) -> bool {
    matches!(kind(response), Ok(Kind::Untagged(None)))
}

/// `{n}` (or literal8's `~{n}`) ending a line.
fn trailing_literal(line: &[u8]) -> Option<u64> {
    let text = strip_line_ending(line).strip_suffix(b"}")?;
    let digits = text.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let (head, digits) = text.split_at(text.len() - digits);
    head.strip_suffix(b"{")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// How the proxy edits the capabilities a client sees.
#[derive(Clone, Copy, Debug, Default)]
pub struct CapabilityEdit<'a> {
    /// Capabilities to drop; one ending in `=` drops every `NAME=value`.
    pub remove: &'a [&'a str],
    /// Capabilities to add where absent.
    pub add: &'a [&'a str],
}

impl CapabilityEdit<'_> {
    fn removes(&self, capability: &[u8]) -> bool {
        self.remove.iter().any(|r| {
            let r = r.as_bytes();
            if r.ends_with(b"=") {
                capability.len() >= r.len() && capability[..r.len()].eq_ignore_ascii_case(r)
            } else {
                capability.eq_ignore_ascii_case(r)
            }
        })
    }

    /// The edited list, each capability after a space.
    fn list(&self, list: &[u8], out: &mut Vec<u8>) {
        let mut kept: Vec<&[u8]> = list
            .split(|&b| b == b' ')
            .filter(|c| !c.is_empty() && !self.removes(c))
            .collect();
        for add in self.add {
            if !kept.iter().any(|c| c.eq_ignore_ascii_case(add.as_bytes())) {
                kept.push(add.as_bytes());
            }
        }
        for capability in kept {
            out.push(b' ');
            out.extend_from_slice(capability);
        }
    }
}

/// The response with its capability list edited, if it carries one: a
/// `* CAPABILITY …` response, or a status response with a `[CAPABILITY …]`
/// code (the greeting, a tagged OK).
pub fn edit_capabilities(raw: &[u8], edit: &CapabilityEdit) -> Option<Vec<u8>> {
    let line = first_line(raw);
    let text = strip_line_ending(line);
    let ending = &line[text.len()..];
    let (start, end) = capability_list(text)?;
    let mut out = Vec::with_capacity(raw.len() + 16);
    out.extend_from_slice(&text[..start]);
    edit.list(&text[start..end], &mut out);
    out.extend_from_slice(&text[end..]);
    out.extend_from_slice(ending);
    out.extend_from_slice(&raw[line.len()..]);
    Some(out)
}

/// Where the capability list sits in a response's first line: from just
/// after the word CAPABILITY to the list's end.
fn capability_list(text: &[u8]) -> Option<(usize, usize)> {
    const DATA: &[u8] = b"* CAPABILITY";
    if text.len() >= DATA.len() && text[..DATA.len()].eq_ignore_ascii_case(DATA) {
        return matches!(text.get(DATA.len()), None | Some(b' '))
            .then_some((DATA.len(), text.len()));
    }
    // `tag STATUS [CAPABILITY …] text`
    let mut at = 0;
    for _ in 0..2 {
        at += memchr::memchr(b' ', &text[at..])? + 1;
    }
    const CODE: &[u8] = b"[CAPABILITY";
    let rest = &text[at..];
    if rest.len() < CODE.len() || !rest[..CODE.len()].eq_ignore_ascii_case(CODE) {
        return None;
    }
    let close = at + memchr::memchr(b']', rest)?;
    let start = at + CODE.len();
    matches!(text[start], b' ' | b']').then_some((start, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_responses() {
        assert_eq!(kind(b"+ Ready\r\n"), Ok(Kind::Continuation));
        assert_eq!(kind(b"+\r\n"), Ok(Kind::Continuation));
        assert_eq!(
            kind(b"* OK [CAPABILITY IMAP4rev1] hi\r\n"),
            Ok(Kind::Untagged(Some(Status::Ok)))
        );
        assert_eq!(
            kind(b"* bye going\r\n"),
            Ok(Kind::Untagged(Some(Status::Bye)))
        );
        assert_eq!(
            kind(b"* CAPABILITY IMAP4rev1\r\n"),
            Ok(Kind::Untagged(None))
        );
        assert_eq!(
            kind(b"a1 NO [AUTHENTICATIONFAILED] x\r\n"),
            Ok(Kind::Tagged(b"a1", Status::No))
        );
        assert_eq!(kind(b"a1 ok\r\n"), Ok(Kind::Tagged(b"a1", Status::Ok)));
        assert_eq!(kind(b"a1 PREAUTH x\r\n"), Err(ResponseError::Malformed));
        assert_eq!(kind(b"a1 FETCH x\r\n"), Err(ResponseError::Malformed));
        assert_eq!(kind(b"\r\n"), Err(ResponseError::Malformed));
    }

    #[test]
    fn codes_are_read_from_status_responses() {
        assert_eq!(
            code(b"a NO [AUTHENTICATIONFAILED] no\r\n").as_deref(),
            Some(&b"AUTHENTICATIONFAILED"[..])
        );
        assert_eq!(
            code(b"a NO [unavailable] later\r\n").as_deref(),
            Some(&b"UNAVAILABLE"[..])
        );
        assert_eq!(
            code(b"* OK [CAPABILITY IMAP4rev1] x\r\n").as_deref(),
            Some(&b"CAPABILITY"[..])
        );
        assert_eq!(code(b"a NO failed\r\n"), None);
        assert_eq!(code(b"a NO\r\n"), None);
    }

    fn frames(stream: &[u8], max: usize) -> Result<Vec<Vec<u8>>, ResponseError> {
        // Fed byte by byte, as the slowest receiver would send.
        let mut framer = Framer::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for &b in stream {
            buf.push(b);
            while let Some(n) = framer.next(&buf, max)? {
                out.push(buf.drain(..n).collect());
            }
        }
        Ok(out)
    }

    #[test]
    fn literals_in_data_responses_are_read_by_count() {
        let stream = b"* ID (\"name\" {5}\r\nDo\r\nt \"x\" {0}\r\n)\r\na OK done {3}\r\n* OK\r\n";
        assert_eq!(
            frames(stream, 1024).unwrap(),
            [
                b"* ID (\"name\" {5}\r\nDo\r\nt \"x\" {0}\r\n)\r\n".to_vec(),
                b"a OK done {3}\r\n".to_vec(),
                b"* OK\r\n".to_vec(),
            ]
        );
    }

    #[test]
    fn responses_over_the_bound_are_refused() {
        assert_eq!(
            frames(b"* OK 0123456789\r\n", 8),
            Err(ResponseError::TooLong(8))
        );
        assert_eq!(
            frames(b"* ID {99999999999999}\r\n", 64),
            Err(ResponseError::TooLong(64))
        );
        assert_eq!(
            frames(b"* ID {40}\r\n", 32),
            Err(ResponseError::TooLong(32))
        );
    }

    const TERMINATED: CapabilityEdit = CapabilityEdit {
        remove: &["STARTTLS", "LOGINDISABLED"],
        add: &["STARTTLS"],
    };

    fn edited(raw: &[u8], edit: &CapabilityEdit) -> String {
        String::from_utf8(edit_capabilities(raw, edit).expect("a capability list")).unwrap()
    }

    #[test]
    fn greeting_capabilities_are_edited_in_place() {
        assert_eq!(
            edited(
                b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED starttls ID] Dovecot ready.\r\n",
                &TERMINATED
            ),
            "* OK [CAPABILITY IMAP4rev1 ID STARTTLS] Dovecot ready.\r\n"
        );
        assert_eq!(
            edited(b"* OK [CAPABILITY] x\r\n", &TERMINATED),
            "* OK [CAPABILITY STARTTLS] x\r\n"
        );
    }

    #[test]
    fn capability_data_and_tagged_codes_are_edited() {
        let hide = CapabilityEdit {
            remove: &["STARTTLS", "AUTH="],
            add: &["LOGINDISABLED"],
        };
        assert_eq!(
            edited(
                b"* CAPABILITY IMAP4rev1 AUTH=PLAIN auth=login STARTTLS\r\n",
                &hide
            ),
            "* CAPABILITY IMAP4rev1 LOGINDISABLED\r\n"
        );
        assert_eq!(
            edited(
                b"a1 OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] done\r\n",
                &hide
            ),
            "a1 OK [CAPABILITY IMAP4rev1 LOGINDISABLED] done\r\n"
        );
        assert_eq!(
            edited(b"* CAPABILITY\r\n", &TERMINATED),
            "* CAPABILITY STARTTLS\r\n"
        );
    }

    #[test]
    fn responses_without_a_capability_list_are_left_alone() {
        for raw in [
            &b"* OK Dovecot ready.\r\n"[..],
            b"a OK [ALERT] CAPABILITY soon\r\n",
            b"* CAPABILITYX A\r\n",
            b"* OK [CAPABILITYX A] x\r\n",
            b"* OK [CAPABILITY A\r\n",
        ] {
            assert_eq!(edit_capabilities(raw, &TERMINATED), None, "{raw:?}");
        }
    }
}
