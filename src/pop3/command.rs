//! Client command lines: a keyword, then arguments after one space.

/// The keywords the proxy tells apart before a login; anything else is
/// `Other` and goes to the receiver, which answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    User,
    Pass,
    Apop,
    Auth,
    Stls,
    Capa,
    Quit,
    /// Commands of the transaction state whose `+OK` is multi-line: a
    /// receiver should refuse them before a login, but if it accepts one,
    /// its lines up to the lone dot belong to that reply.
    Retr,
    Top,
    List,
    Uidl,
    Other,
}

impl Verb {
    fn from_word(word: &[u8]) -> Verb {
        let mut upper = [0u8; 4];
        if word.len() != upper.len() {
            return Verb::Other;
        }
        for (u, b) in upper.iter_mut().zip(word) {
            *u = b.to_ascii_uppercase();
        }
        match &upper {
            b"USER" => Verb::User,
            b"PASS" => Verb::Pass,
            b"APOP" => Verb::Apop,
            b"AUTH" => Verb::Auth,
            b"STLS" => Verb::Stls,
            b"CAPA" => Verb::Capa,
            b"QUIT" => Verb::Quit,
            b"RETR" => Verb::Retr,
            b"LIST" => Verb::List,
            b"UIDL" => Verb::Uidl,
            _ => Verb::Other,
        }
    }
}

/// One command line, borrowed from the client's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command<'a> {
    pub verb: Verb,
    /// Everything after the keyword's one space, without the line ending.
    /// Kept whole: a password may contain spaces.
    pub args: &'a [u8],
}

impl<'a> Command<'a> {
    pub fn parse(line: &'a [u8]) -> Command<'a> {
        let line = strip_line_ending(line);
        let (word, args) = match memchr::memchr(b' ', line) {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        let verb = if word.eq_ignore_ascii_case(b"TOP") {
            Verb::Top
        } else {
            Verb::from_word(word)
        };
        Command { verb, args }
    }

    /// Whether a `+OK` to this command is followed by lines up to a lone
    /// dot. `-ERR` is always one line.
    pub fn multiline(&self) -> bool {
        match self.verb {
            Verb::Capa | Verb::Retr | Verb::Top => true,
            // Without an argument: the whole list (for AUTH, the SASL
            // mechanisms, as Dovecot and others answer).
            Verb::Auth | Verb::List | Verb::Uidl => self.args.is_empty(),
            _ => false,
        }
    }

    /// The arguments split on spaces, empty words skipped.
    pub fn words(&self) -> impl Iterator<Item = &'a [u8]> {
        self.args.split(|&b| b == b' ').filter(|w| !w.is_empty())
    }
}

/// `line` without its `\r\n` or `\n`.
pub fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_case_insensitive_and_arguments_keep_their_spaces() {
        let c = Command::parse(b"pass my secret  pw\r\n");
        assert_eq!(c.verb, Verb::Pass);
        assert_eq!(c.args, b"my secret  pw");
        assert_eq!(Command::parse(b"Top 1 10\n").verb, Verb::Top);
        assert_eq!(Command::parse(b"QUIT\r\n").args, b"");
        assert_eq!(Command::parse(b"USERX a\r\n").verb, Verb::Other);
        assert_eq!(Command::parse(b"\r\n").verb, Verb::Other);
    }

    #[test]
    fn multiline_replies_are_known_by_command_and_argument() {
        let multi = |line: &[u8]| Command::parse(line).multiline();
        assert!(multi(b"CAPA\r\n"));
        assert!(multi(b"AUTH\r\n"));
        assert!(!multi(b"AUTH PLAIN\r\n"));
        assert!(multi(b"LIST\r\n"));
        assert!(!multi(b"LIST 1\r\n"));
        assert!(multi(b"RETR 1\r\n"));
        assert!(multi(b"TOP 1 0\r\n"));
        assert!(!multi(b"USER a\r\n"));
        assert!(!multi(b"STAT\r\n"));
    }

    #[test]
    fn words_skip_repeated_spaces() {
        let c = Command::parse(b"APOP  joe  c4c9334bac560ecc979e58001b3e22fb\r\n");
        let words: Vec<&[u8]> = c.words().collect();
        assert_eq!(
            words,
            [&b"joe"[..], &b"c4c9334bac560ecc979e58001b3e22fb"[..]]
        );
    }
}
