//! Receiver replies: a status line (`+OK`, `-ERR`, or `+ ` for a SASL
//! challenge), and after the `+OK` of some commands, lines up to a lone dot
//! (RFC 1939 §3). POP3 has no tags: which reply may be multi-line is known
//! only from the command it answers, so the caller says.

use super::command::strip_line_ending;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Err,
    /// `+ ` and a base64 challenge: the receiver waits for a SASL response.
    Continuation,
}

/// The status a reply line starts with, if it is a status line. The
/// indicators are upper case by RFC 1939; case is not held against a
/// receiver.
pub fn status(line: &[u8]) -> Option<Status> {
    let ends_word = |rest: &[u8]| matches!(rest.first(), None | Some(b' ' | b'\r' | b'\n'));
    let starts = |word: &[u8]| {
        line.get(..word.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(word))
            && ends_word(&line[word.len()..])
    };
    if starts(b"+OK") {
        Some(Status::Ok)
    } else if starts(b"-ERR") {
        Some(Status::Err)
    } else if starts(b"+") {
        Some(Status::Continuation)
    } else {
        None
    }
}

/// The response code of a status line (RFC 2449 §8: `-ERR [SYS/TEMP] …`),
/// without its brackets, if it has one.
pub fn response_code(line: &[u8]) -> Option<&[u8]> {
    let line = strip_line_ending(line);
    let text = line.get(memchr::memchr(b' ', line)? + 1..)?;
    let inner = text.strip_prefix(b"[")?;
    let end = memchr::memchr(b']', inner)?;
    Some(&inner[..end])
}

/// Why a login's `-ERR` was given, as far as counting goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `[AUTH]` (RFC 3206): the credentials are wrong.
    Credentials,
    /// Anything else: `[SYS/TEMP]`, `[IN-USE]`, `[LOGIN-DELAY]`, no code.
    /// Not the client's fault as far as the receiver says.
    Other,
}

pub fn refusal(line: &[u8]) -> Refusal {
    let first_level = response_code(line)
        .and_then(|code| code.split(|&b| b == b'/').next())
        .unwrap_or_default();
    if first_level.eq_ignore_ascii_case(b"AUTH") {
        Refusal::Credentials
    } else {
        Refusal::Other
    }
}

/// A complete reply, its lines kept as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn first_line(&self) -> &[u8] {
        let end = memchr::memchr(b'\n', &self.raw).map_or(self.raw.len(), |i| i + 1);
        &self.raw[..end]
    }

    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.raw.split_inclusive(|&b| b == b'\n')
    }

    /// A multi-line reply with capability lines (CAPA) edited: `hidden`
    /// ones dropped (matched by their first word, any case) and `added`
    /// ones put before the final dot. The status line and the other lines
    /// stay as received.
    pub fn with_capabilities(&self, hidden: &[&str], added: &[&str]) -> Reply {
        let mut raw = Vec::with_capacity(self.raw.len() + 16);
        let mut lines = self.lines().peekable();
        if let Some(first) = lines.next() {
            raw.extend_from_slice(first);
        }
        while let Some(line) = lines.next() {
            if lines.peek().is_none() {
                for capability in added {
                    raw.extend_from_slice(capability.as_bytes());
                    raw.extend_from_slice(b"\r\n");
                }
                raw.extend_from_slice(line);
                break;
            }
            let text = strip_line_ending(line);
            let keyword = text.split(|&b| b == b' ').next().unwrap_or_default();
            if !hidden
                .iter()
                .any(|h| keyword.eq_ignore_ascii_case(h.as_bytes()))
            {
                raw.extend_from_slice(line);
            }
        }
        Reply {
            status: self.status,
            raw,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line does not start with +OK, -ERR or +")]
    BadStatus,
    #[error("reply is longer than {0} bytes")]
    TooLong(usize),
}

/// Collects lines into replies, bounded in size.
#[derive(Debug)]
pub struct ReplyReader {
    raw: Vec<u8>,
    max_len: usize,
    /// Inside the lines of a multi-line `+OK`.
    in_body: bool,
}

impl ReplyReader {
    pub fn new(max_len: usize) -> Self {
        ReplyReader {
            raw: Vec::new(),
            max_len,
            in_body: false,
        }
    }

    /// Feeds one complete line; returns the reply when this line ends it.
    /// `multiline`: a `+OK` starting this reply is followed by lines up to
    /// a lone dot (the command it answers says so).
    pub fn push_line(&mut self, line: &[u8], multiline: bool) -> Result<Option<Reply>, ReplyError> {
        if self.raw.len() + line.len() > self.max_len {
            return Err(ReplyError::TooLong(self.max_len));
        }
        if !self.in_body {
            let status = status(line).ok_or(ReplyError::BadStatus)?;
            if status == Status::Ok && multiline {
                self.in_body = true;
                self.raw.extend_from_slice(line);
                return Ok(None);
            }
            return Ok(Some(Reply {
                status,
                raw: line.to_vec(),
            }));
        }
        self.raw.extend_from_slice(line);
        if strip_line_ending(line) != b"." {
            return Ok(None);
        }
        self.in_body = false;
        Ok(Some(Reply {
            status: Status::Ok,
            raw: std::mem::take(&mut self.raw),
        }))
    }

    /// No reply is half read.
    pub fn is_empty(&self) -> bool {
        !self.in_body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_told_apart_and_garbage_is_not_one() {
        assert_eq!(status(b"+OK\r\n"), Some(Status::Ok));
        assert_eq!(status(b"+ok Logged in.\r\n"), Some(Status::Ok));
        assert_eq!(status(b"-ERR [AUTH] no\r\n"), Some(Status::Err));
        assert_eq!(status(b"+ VXNlcm5hbWU6\r\n"), Some(Status::Continuation));
        assert_eq!(status(b"+\r\n"), Some(Status::Continuation));
        assert_eq!(status(b"+OKAY\r\n"), None);
        assert_eq!(status(b"-ERROR\r\n"), None);
        assert_eq!(status(b"220 smtp\r\n"), None);
        assert_eq!(status(b""), None);
    }

    #[test]
    fn only_an_auth_response_code_blames_the_credentials() {
        let why = |line: &[u8]| refusal(line);
        assert_eq!(
            why(b"-ERR [AUTH] Authentication failed.\r\n"),
            Refusal::Credentials
        );
        assert_eq!(why(b"-ERR [auth] x\r\n"), Refusal::Credentials);
        assert_eq!(why(b"-ERR [SYS/TEMP] try later\r\n"), Refusal::Other);
        assert_eq!(why(b"-ERR [IN-USE] locked\r\n"), Refusal::Other);
        assert_eq!(why(b"-ERR Authentication failed\r\n"), Refusal::Other);
        assert_eq!(why(b"-ERR [AUTHX] x\r\n"), Refusal::Other);
        assert_eq!(why(b"-ERR [AUTH\r\n"), Refusal::Other);
        assert_eq!(response_code(b"-ERR [SYS/TEMP] x"), Some(&b"SYS/TEMP"[..]));
    }

    #[test]
    fn a_multiline_ok_ends_at_the_lone_dot_and_an_err_is_one_line() {
        let mut r = ReplyReader::new(1024);
        assert_eq!(
            r.push_line(b"+OK Capability list follows\r\n", true),
            Ok(None)
        );
        assert_eq!(r.push_line(b"..dot-stuffed\r\n", true), Ok(None));
        assert!(!r.is_empty());
        let reply = r.push_line(b".\r\n", true).unwrap().unwrap();
        assert_eq!(
            reply.raw,
            b"+OK Capability list follows\r\n..dot-stuffed\r\n.\r\n"
        );
        assert!(r.is_empty());
        let err = r.push_line(b"-ERR no\r\n", true).unwrap().unwrap();
        assert_eq!(err.status, Status::Err);
        let ok = r.push_line(b"+OK\r\n", false).unwrap().unwrap();
        assert_eq!(ok.raw, b"+OK\r\n");
        assert_eq!(
            r.push_line(b"* OK imap\r\n", false),
            Err(ReplyError::BadStatus)
        );
    }

    #[test]
    fn a_multiline_reply_is_bounded() {
        let mut r = ReplyReader::new(32);
        assert_eq!(r.push_line(b"+OK\r\n", true), Ok(None));
        assert_eq!(r.push_line(&[b'x'; 40], true), Err(ReplyError::TooLong(32)));
    }

    #[test]
    fn capabilities_are_hidden_by_keyword_and_added_before_the_dot() {
        let reply = Reply {
            status: Status::Ok,
            raw: b"+OK\r\nCAPA\r\nstls\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n".to_vec(),
        };
        let edited = reply.with_capabilities(&["STLS", "SASL"], &["STLS"]);
        assert_eq!(edited.raw, b"+OK\r\nCAPA\r\nUSER\r\nSTLS\r\n.\r\n");
        assert_eq!(reply.with_capabilities(&[], &[]), reply);
    }
}
