//! IMAP client commands as mailmoat reads them before login (RFC 9051 §2.2):
//! a tag, a command name, then arguments, where a literal (`{n}`, `{n+}`)
//! ends the line and `n` bytes follow, read by count, before the command's
//! line goes on.
//!
//! The reading is strict on purpose. A line the proxy took one way and the
//! receiver another would let a client hide a command from the proxy (a
//! `{n+}` inside an unclosed quoted string is a literal to a lax reader and
//! text to Dovecot, and the "literal" bytes a LOGIN the proxy never counts).
//! So only what every receiver reads alike passes: quoted strings closed on
//! their line with only `\\` and `\"` escapes, literals only where an
//! argument starts and only at the end of a line, no control character or
//! NUL outside a literal, balanced parentheses, tokens apart. Anything else
//! is refused by the proxy and never forwarded.

/// Parenthesized lists nest at most this deep (ID's is one level).
const MAX_DEPTH: u8 = 8;
/// Top-level argument values kept for a command whose credentials are
/// read (LOGIN has two; AUTHENTICATE a mechanism and an initial response).
const MAX_VALUES: usize = 3;

/// The commands the proxy reads before login; the rest are forwarded as
/// they are and answered by the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name {
    Login,
    Authenticate,
    StartTls,
    Capability,
    Logout,
    Id,
    Noop,
    Other,
}

impl Name {
    fn parse(word: &[u8]) -> Name {
        const NAMES: [(&[u8], Name); 7] = [
            (b"LOGIN", Name::Login),
            (b"AUTHENTICATE", Name::Authenticate),
            (b"STARTTLS", Name::StartTls),
            (b"CAPABILITY", Name::Capability),
            (b"LOGOUT", Name::Logout),
            (b"ID", Name::Id),
            (b"NOOP", Name::Noop),
        ];
        NAMES
            .iter()
            .find(|(name, _)| word.eq_ignore_ascii_case(name))
            .map_or(Name::Other, |&(_, name)| name)
    }

    /// A label for logs and metrics: a closed set.
    pub fn as_str(self) -> &'static str {
        match self {
            Name::Login => "login",
            Name::Authenticate => "authenticate",
            Name::StartTls => "starttls",
            Name::Capability => "capability",
            Name::Logout => "logout",
            Name::Id => "id",
            Name::Noop => "noop",
            Name::Other => "other",
        }
    }
}

/// Why a command line is refused unread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("no tag")]
    Tag,
    #[error("no command name")]
    Name,
    #[error("control character or NUL outside a literal")]
    Control,
    #[error("quoted string not closed on its line, or a bad escape in it")]
    Quoted,
    #[error("malformed literal")]
    Literal,
    #[error("unbalanced or too deeply nested parentheses")]
    Parentheses,
    #[error("arguments not separated by a space")]
    Separator,
}

/// The start of a command: its tag and name, and where its arguments begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head<'a> {
    pub tag: &'a [u8],
    pub name: Name,
    /// Offset in the line of what follows the name (a space, or the line end).
    pub rest: usize,
}

/// How a line of a command ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The command is complete.
    Line,
    /// A literal of `len` bytes follows; `sync`: the client waits for a `+`
    /// before sending it (`{n}`), else it sends it at once (`{n+}`).
    Literal { len: u64, sync: bool },
}

/// The line without its line ending (CRLF, or a bare LF as receivers accept).
pub fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `tag`: any printable ASCII but the atom specials and `+` (RFC 9051).
fn is_tag_char(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b'+')
}

/// Reads a command's first line: tag, a space, the command name.
pub fn parse_head(line: &[u8]) -> Result<Head<'_>, Invalid> {
    let text = strip_line_ending(line);
    let tag_len = text.iter().take_while(|&&b| is_tag_char(b)).count();
    if tag_len == 0 || text.get(tag_len) != Some(&b' ') {
        return Err(Invalid::Tag);
    }
    let start = tag_len + 1;
    let name_len = text[start..]
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        .count();
    let rest = start + name_len;
    if name_len == 0 || !matches!(text.get(rest), None | Some(b' ')) {
        return Err(Invalid::Name);
    }
    Ok(Head {
        tag: &text[..tag_len],
        name: Name::parse(&text[start..rest]),
        rest,
    })
}

/// The arguments of one command, read line by line across its literals.
#[derive(Debug, Default)]
pub struct Args {
    depth: u8,
    /// A token just ended: what follows must be a space, `)` or the end.
    token_ended: bool,
    /// Top-level values, kept only for commands whose credentials are read.
    values: Option<Vec<Vec<u8>>>,
    /// Top-level arguments seen, kept or not.
    count: usize,
    /// The literal announced at the end of the last line is a top-level
    /// argument to keep.
    keep_literal: bool,
}

impl Args {
    /// Arguments that are only checked, not kept.
    pub fn checked() -> Args {
        Args::default()
    }

    /// Arguments whose top-level values are kept (a few, for credentials).
    pub fn kept() -> Args {
        Args {
            values: Some(Vec::new()),
            ..Args::default()
        }
    }

    /// Top-level arguments seen so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The kept top-level values (quoted strings unescaped, literals as
    /// sent), up to the first few.
    pub fn values(&self) -> &[Vec<u8>] {
        self.values.as_deref().unwrap_or_default()
    }

    fn push_value(&mut self, value: &[u8]) {
        self.count += 1;
        if let Some(values) = self.values.as_mut().filter(|v| v.len() < MAX_VALUES) {
            values.push(value.to_vec());
        }
    }

    /// Reads one line of arguments: the first line's bytes after the
    /// command name, or a line that follows a literal.
    pub fn scan(&mut self, line: &[u8]) -> Result<End, Invalid> {
        let text = strip_line_ending(line);
        let mut i = 0;
        while i < text.len() {
            let b = text[i];
            if self.token_ended && !matches!(b, b' ' | b')') {
                return Err(Invalid::Separator);
            }
            self.token_ended = false;
            match b {
                b' ' => i += 1,
                b'(' => {
                    if self.depth >= MAX_DEPTH {
                        return Err(Invalid::Parentheses);
                    }
                    if self.depth == 0 {
                        self.count += 1;
                    }
                    self.depth += 1;
                    i += 1;
                }
                b')' => {
                    self.depth = self.depth.checked_sub(1).ok_or(Invalid::Parentheses)?;
                    self.token_ended = true;
                    i += 1;
                }
                b'"' => {
                    let (value, len) = quoted(&text[i..])?;
                    if self.depth == 0 {
                        self.push_value(&value);
                    }
                    self.token_ended = true;
                    i += len;
                }
                b'{' => return self.literal_marker(&text[i..]),
                b'~' if text.get(i + 1) == Some(&b'{') => {
                    return self.literal_marker(&text[i + 1..])
                }
                _ => {
                    let len = text[i..]
                        .iter()
                        .take_while(|&&b| !matches!(b, b' ' | b'(' | b')'))
                        .count();
                    let atom = &text[i..i + len];
                    if atom.iter().any(|&b| b < 0x20 || b == 0x7f) {
                        return Err(Invalid::Control);
                    }
                    if atom.iter().any(|&b| matches!(b, b'"' | b'{')) {
                        return Err(Invalid::Separator);
                    }
                    if self.depth == 0 {
                        self.push_value(atom);
                    }
                    self.token_ended = true;
                    i += len;
                }
            }
        }
        if self.depth > 0 {
            return Err(Invalid::Parentheses);
        }
        Ok(End::Line)
    }

    /// `{n}` or `{n+}` where an argument starts; it must end the line.
    fn literal_marker(&mut self, text: &[u8]) -> Result<End, Invalid> {
        let digits = text[1..].iter().take_while(|b| b.is_ascii_digit()).count();
        let len = std::str::from_utf8(&text[1..1 + digits])
            .ok()
            .filter(|d| !d.is_empty())
            .and_then(|d| d.parse::<u64>().ok())
            .ok_or(Invalid::Literal)?;
        let sync = match &text[1 + digits..] {
            b"}" => true,
            b"+}" => false,
            _ => return Err(Invalid::Literal),
        };
        self.keep_literal = self.depth == 0;
        if self.depth == 0 {
            // Counted now; its value is kept once read.
            self.count += 1;
        }
        Ok(End::Literal { len, sync })
    }

    /// The literal the last line announced is a value to keep.
    pub fn keeps_literal(&self) -> bool {
        self.keep_literal && self.values.as_ref().is_some_and(|v| v.len() < MAX_VALUES)
    }

    /// The bytes of the literal the last line announced, once all read.
    pub fn literal(&mut self, bytes: &[u8]) {
        if std::mem::take(&mut self.keep_literal) {
            if let Some(values) = self.values.as_mut().filter(|v| v.len() < MAX_VALUES) {
                values.push(bytes.to_vec());
            }
        }
        self.token_ended = true;
    }
}

/// A quoted string at the start of `text`: its value and its length with
/// both quotes.
fn quoted(text: &[u8]) -> Result<(Vec<u8>, usize), Invalid> {
    let mut value = Vec::new();
    let mut i = 1;
    loop {
        match text.get(i) {
            None => return Err(Invalid::Quoted),
            Some(b'"') => return Ok((value, i + 1)),
            Some(b'\\') => match text.get(i + 1) {
                Some(&c @ (b'"' | b'\\')) => {
                    value.push(c);
                    i += 2;
                }
                _ => return Err(Invalid::Quoted),
            },
            Some(&b) if b < 0x20 || b == 0x7f => return Err(Invalid::Control),
            Some(&b) => {
                value.push(b);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole command as the module reads it: lines and literals in turn.
    fn read(command: &[u8], keep: bool) -> Result<(Name, Vec<Vec<u8>>), Invalid> {
        let line_end = |b: &[u8]| memchr::memchr(b'\n', b).map_or(b.len(), |i| i + 1);
        let first = &command[..line_end(command)];
        let head = parse_head(first)?;
        let mut args = if keep { Args::kept() } else { Args::checked() };
        let mut end = args.scan(&first[head.rest..])?;
        let mut pos = first.len();
        while let End::Literal { len, .. } = end {
            let len = len as usize;
            args.literal(&command[pos..pos + len]);
            pos += len;
            let line = &command[pos..pos + line_end(&command[pos..])];
            pos += line.len();
            end = args.scan(line)?;
        }
        assert_eq!(pos, command.len(), "bytes left after the command");
        Ok((head.name, args.values().to_vec()))
    }

    fn values(command: &[u8]) -> Vec<Vec<u8>> {
        read(command, true).expect("command reads").1
    }

    #[test]
    fn head_reads_tag_and_name_case_blind() {
        let head = parse_head(b"a1 login x y\r\n").unwrap();
        assert_eq!(
            (head.tag, head.name, head.rest),
            (&b"a1"[..], Name::Login, 8)
        );
        assert_eq!(
            parse_head(b"A.2 CAPABILITY\r\n").unwrap().name,
            Name::Capability
        );
        assert_eq!(parse_head(b"z SELECT INBOX\n").unwrap().name, Name::Other);
        assert_eq!(parse_head(b"z Xlogin\r\n").unwrap().name, Name::Other);
    }

    #[test]
    fn head_without_tag_or_name_is_invalid() {
        for line in [
            &b"\r\n"[..],
            b"LOGIN\r\n",
            b" a LOGIN\r\n",
            b"+ LOGIN\r\n",
            b"* LOGIN\r\n",
            b"a \r\n",
            b"a  LOGIN\r\n",
            b"a LOG{3}\r\n",
            b"a\tLOGIN\r\n",
        ] {
            assert!(parse_head(line).is_err(), "{line:?}");
        }
    }

    #[test]
    fn login_arguments_as_atoms_quoted_strings_and_literals() {
        assert_eq!(
            values(b"a LOGIN joe secret\r\n"),
            [b"joe".to_vec(), b"secret".to_vec()]
        );
        assert_eq!(
            values(b"a LOGIN \"j o\\\"e\" \"se\\\\c\"\r\n"),
            [b"j o\"e".to_vec(), b"se\\c".to_vec()]
        );
        assert_eq!(
            values(b"a LOGIN {3}\r\njoe {6+}\r\nse\r\nc!\r\n"),
            [b"joe".to_vec(), b"se\r\nc!".to_vec()]
        );
        assert_eq!(
            values(b"a LOGIN \"\" {0}\r\n\r\n"),
            [Vec::<u8>::new(), Vec::new()]
        );
    }

    #[test]
    fn a_literal_is_announced_with_its_length_and_kind() {
        let mut args = Args::checked();
        assert_eq!(
            args.scan(b" {12}\r\n"),
            Ok(End::Literal {
                len: 12,
                sync: true
            })
        );
        let mut args = Args::checked();
        assert_eq!(
            args.scan(b" x {7+}\n"),
            Ok(End::Literal {
                len: 7,
                sync: false
            })
        );
        let mut args = Args::checked();
        assert_eq!(
            args.scan(b" ~{99999999999}\r\n"),
            Ok(End::Literal {
                len: 99_999_999_999,
                sync: true
            })
        );
    }

    #[test]
    fn literal_markers_anywhere_but_an_argument_start_at_a_line_end_are_invalid() {
        for line in [
            &b" {}\r\n"[..],
            b" {3\r\n",
            b" {3} x\r\n",
            b" {-3}\r\n",
            b" {3-}\r\n",
            b" x{3}\r\n",
            b" {99999999999999999999999}\r\n",
        ] {
            assert!(Args::checked().scan(line).is_err(), "{line:?}");
        }
    }

    #[test]
    fn a_literal_hidden_in_an_unclosed_quoted_string_is_invalid() {
        // Text to Dovecot, a literal to a lax reader: the bytes after it
        // would be a LOGIN the proxy never sees.
        assert_eq!(read(b"a NOOP \"{20+}\r\n", false), Err(Invalid::Quoted));
        assert_eq!(read(b"a NOOP \"x\\q\"\r\n", false), Err(Invalid::Quoted));
    }

    #[test]
    fn control_characters_outside_literals_are_invalid() {
        assert_eq!(read(b"a LOGIN jo\0e x\r\n", true), Err(Invalid::Control));
        assert_eq!(
            read(b"a LOGIN \"jo\re\" x\r\n", true),
            Err(Invalid::Control)
        );
        assert_eq!(read(b"a LOGIN joe x\r\r\n", true), Err(Invalid::Control));
        // Inside a literal anything goes: it is read by count.
        assert_eq!(values(b"a LOGIN {3}\r\n\0\r\n x\r\n")[0], b"\0\r\n");
    }

    #[test]
    fn tokens_must_be_apart() {
        assert_eq!(read(b"a LOGIN \"a\"b c\r\n", true), Err(Invalid::Separator));
        assert_eq!(
            read(b"a LOGIN {1}\r\nab c\r\n", true),
            Err(Invalid::Separator)
        );
        assert_eq!(read(b"a LOGIN a\"b\" c\r\n", true), Err(Invalid::Separator));
    }

    #[test]
    fn id_lists_balance_across_literals() {
        assert!(read(b"a ID (\"name\" \"mutt\" \"os\" NIL)\r\n", false).is_ok());
        assert!(read(b"a ID (\"name\" {4}\r\nmutt)\r\n", false).is_ok());
        assert!(read(b"a ID NIL\r\n", false).is_ok());
        assert_eq!(
            read(b"a ID (\"name\"\r\n", false),
            Err(Invalid::Parentheses)
        );
        assert_eq!(
            read(b"a ID \"name\")\r\n", false),
            Err(Invalid::Parentheses)
        );
        assert_eq!(
            read(b"a ID ((((((((((x))))))))))\r\n", false),
            Err(Invalid::Parentheses)
        );
    }

    #[test]
    fn only_top_level_values_are_kept_and_only_a_few() {
        assert_eq!(values(b"a LOGIN (x y) z\r\n"), [b"z".to_vec()]);
        let mut args = Args::kept();
        args.scan(b" a b c d e f\r\n").unwrap();
        assert_eq!(args.values().len(), MAX_VALUES);
        assert_eq!(args.count(), 6);
        let mut args = Args::checked();
        args.scan(b" a b\r\n").unwrap();
        assert!(args.values().is_empty());
        assert_eq!(args.count(), 2);
    }
}
