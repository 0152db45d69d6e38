//! Receiver replies: `DDD-text` continuation lines ending in one `DDD text`
//! line (RFC 5321 §4.2). The proxy needs each reply whole to know the outcome
//! of the command it answers, and to edit EHLO capabilities.

/// A complete reply, its lines kept as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub raw: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line does not start with a three-digit code")]
    BadCode,
    #[error("reply line has {0:?} after its code instead of ' ' or '-'")]
    BadSeparator(u8),
    #[error("reply is longer than {0} bytes")]
    TooLong(usize),
    #[error("reply line's code differs from the reply's first line")]
    MixedCodes,
}

/// Parses one line: its code and whether it is the last line of the reply.
pub fn parse_line(line: &[u8]) -> Result<(u16, bool), ReplyError> {
    let digits = line.get(..3).ok_or(ReplyError::BadCode)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return Err(ReplyError::BadCode);
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match line.get(3) {
        Some(b' ') | Some(b'\r') | Some(b'\n') | None => Ok((code, true)),
        Some(b'-') => Ok((code, false)),
        Some(&other) => Err(ReplyError::BadSeparator(other)),
    }
}

/// Collects lines into replies, bounded in size.
#[derive(Debug)]
pub struct ReplyAssembler {
    raw: Vec<u8>,
    max_len: usize,
}

impl ReplyAssembler {
    pub fn new(max_len: usize) -> Self {
        ReplyAssembler {
            raw: Vec::new(),
            max_len,
        }
    }

    /// Feeds one complete line; returns the reply when this line ends it.
    pub fn push_line(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        let (code, last) = parse_line(line)?;
        // RFC 5321 4.2.1: every line of a reply has the same code. Mixed
        // codes would leave `code` (the last line's) disagreeing with what
        // the client reads once EHLO editing has dropped that last line.
        if self.raw.get(..3).is_some_and(|first| *first != line[..3]) {
            return Err(ReplyError::MixedCodes);
        }
        if self.raw.len() + line.len() > self.max_len {
            return Err(ReplyError::TooLong(self.max_len));
        }
        self.raw.extend_from_slice(line);
        if !last {
            return Ok(None);
        }
        Ok(Some(Reply {
            code,
            raw: std::mem::take(&mut self.raw),
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The lines of the reply, each with its line ending.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.raw.split_inclusive(|&b| b == b'\n')
    }

    /// An EHLO reply without the extensions named in `keywords` (upper case),
    /// continuation markers rewritten so the last kept line ends the reply.
    pub fn without_extensions(&self, keywords: &[&str]) -> Reply {
        let kept: Vec<&[u8]> = self
            .lines()
            .enumerate()
            .filter(|(i, line)| *i == 0 || !keywords.iter().any(|k| names_extension(line, k)))
            .map(|(_, line)| line)
            .collect();
        if kept.len() == self.lines().count() {
            return self.clone();
        }
        let mut raw = Vec::with_capacity(self.raw.len());
        for (i, line) in kept.iter().enumerate() {
            let text = super::command::strip_line_ending(line.get(4..).unwrap_or_default());
            raw.extend_from_slice(&line[..3]);
            raw.push(if i + 1 == kept.len() { b' ' } else { b'-' });
            raw.extend_from_slice(text);
            raw.extend_from_slice(b"\r\n");
        }
        Reply {
            code: self.code,
            raw,
        }
    }
}

impl Reply {
    /// An EHLO reply that names the extension `keyword` (upper case),
    /// appended as its last line if the receiver did not offer it.
    pub fn with_extension(&self, keyword: &str) -> Reply {
        if self
            .lines()
            .skip(1)
            .any(|line| names_extension(line, keyword))
        {
            return self.clone();
        }
        let mut raw = Vec::with_capacity(self.raw.len() + keyword.len() + 6);
        for line in self.lines() {
            let text = super::command::strip_line_ending(line.get(4..).unwrap_or_default());
            raw.extend_from_slice(line.get(..3).unwrap_or(b"250"));
            raw.push(b'-');
            raw.extend_from_slice(text);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(format!("{} {keyword}\r\n", self.code).as_bytes());
        Reply {
            code: self.code,
            raw,
        }
    }

    /// An EHLO reply whose SIZE extension says at most `max` bytes, so
    /// clients learn the proxy's limit before they send (RFC 1870).
    pub fn with_size_limit(&self, max: u64) -> Reply {
        let mut raw = Vec::with_capacity(self.raw.len());
        for (i, line) in self.lines().enumerate() {
            if i == 0 || !names_extension(line, "SIZE") {
                raw.extend_from_slice(line);
                continue;
            }
            let text = super::command::strip_line_ending(line.get(4..).unwrap_or_default());
            let advertised = text
                .split(|&b| b == b' ')
                .nth(1)
                .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok())
                .filter(|&n| n > 0);
            let size = advertised.map_or(max, |n| n.min(max));
            raw.extend_from_slice(&line[..4]);
            raw.extend_from_slice(format!("SIZE {size}\r\n").as_bytes());
        }
        Reply {
            code: self.code,
            raw,
        }
    }
}

fn names_extension(line: &[u8], keyword: &str) -> bool {
    let text = line.get(4..).unwrap_or_default();
    // `AUTH=PLAIN LOGIN` is the old-client spelling of AUTH (Postfix's
    // broken_sasl_auth_clients): the keyword ends at `=` too.
    let word = text
        .split(|&b| matches!(b, b' ' | b'=' | b'\r' | b'\n'))
        .next()
        .unwrap_or_default();
    word.eq_ignore_ascii_case(keyword.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hiding_auth_also_hides_its_old_equals_spelling() {
        let reply = assemble(
            b"250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250 8BITMIME\r\n",
        );
        let hidden = reply[0].without_extensions(&["AUTH"]);
        assert_eq!(hidden.raw, b"250-mx.test\r\n250 8BITMIME\r\n");
    }

    fn assemble(text: &[u8]) -> Vec<Reply> {
        let mut a = ReplyAssembler::new(4096);
        text.split_inclusive(|&b| b == b'\n')
            .filter_map(|line| a.push_line(line).unwrap())
            .collect()
    }

    #[test]
    fn multi_line_replies_end_at_the_line_with_a_space() {
        let replies = assemble(b"250-mx\r\n250-SIZE 10\r\n250 OK\r\n354 go\r\n");
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].code, 250);
        assert_eq!(replies[0].lines().count(), 3);
        assert_eq!(replies[1].code, 354);
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert_eq!(parse_line(b"hello\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse_line(b"25"), Err(ReplyError::BadCode));
        assert_eq!(parse_line(b"250x\r\n"), Err(ReplyError::BadSeparator(b'x')));
        assert_eq!(parse_line(b"250\r\n"), Ok((250, true)));
        let mut a = ReplyAssembler::new(10);
        assert!(a.push_line(b"250-aaaa\r\n").unwrap().is_none());
        assert_eq!(a.push_line(b"250 bbbb\r\n"), Err(ReplyError::TooLong(10)));
        let mut a = ReplyAssembler::new(4096);
        assert!(a.push_line(b"250-mx\r\n").unwrap().is_none());
        assert_eq!(
            a.push_line(b"500 CHUNKING\r\n"),
            Err(ReplyError::MixedCodes)
        );
    }

    #[test]
    fn size_is_capped_at_the_proxy_limit() {
        let ehlo = &assemble(b"250-mx\r\n250-SIZE 209715200\r\n250 8BITMIME\r\n")[0];
        assert_eq!(
            ehlo.with_size_limit(1024).raw,
            b"250-mx\r\n250-SIZE 1024\r\n250 8BITMIME\r\n"
        );
        let unlimited = &assemble(b"250-mx\r\n250 SIZE\r\n")[0];
        assert_eq!(
            unlimited.with_size_limit(1024).raw,
            b"250-mx\r\n250 SIZE 1024\r\n"
        );
        let smaller = &assemble(b"250-mx\r\n250 SIZE 100\r\n")[0];
        assert_eq!(smaller.with_size_limit(1024), *smaller);
    }

    #[test]
    fn chunking_is_removed_even_when_it_is_the_last_line() {
        let ehlo = &assemble(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")[0];
        let edited = ehlo.without_extensions(&["CHUNKING"]);
        assert_eq!(edited.raw, b"250-mx\r\n250 PIPELINING\r\n");
        let ehlo = &assemble(b"250-mx\r\n250-chunking\r\n250 8BITMIME\r\n")[0];
        assert_eq!(
            ehlo.without_extensions(&["CHUNKING"]).raw,
            b"250-mx\r\n250 8BITMIME\r\n"
        );
        let only = &assemble(b"250 mx\r\n")[0];
        assert_eq!(only.without_extensions(&["CHUNKING"]), *only);
    }
}
