//! Client command lines.

/// The verbs the proxy tells apart. Anything else is `Other`, so the metric
/// label set stays fixed whatever a client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Helo,
    Ehlo,
    Lhlo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    Auth,
    StartTls,
    Other,
}

impl Verb {
    pub const ALL: [Verb; 16] = [
        Verb::Helo,
        Verb::Ehlo,
        Verb::Lhlo,
        Verb::Mail,
        Verb::Rcpt,
        Verb::Data,
        Verb::Bdat,
        Verb::Rset,
        Verb::Noop,
        Verb::Quit,
        Verb::Vrfy,
        Verb::Expn,
        Verb::Help,
        Verb::Auth,
        Verb::StartTls,
        Verb::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Helo => "helo",
            Verb::Ehlo => "ehlo",
            Verb::Lhlo => "lhlo",
            Verb::Mail => "mail",
            Verb::Rcpt => "rcpt",
            Verb::Data => "data",
            Verb::Bdat => "bdat",
            Verb::Rset => "rset",
            Verb::Noop => "noop",
            Verb::Quit => "quit",
            Verb::Vrfy => "vrfy",
            Verb::Expn => "expn",
            Verb::Help => "help",
            Verb::Auth => "auth",
            Verb::StartTls => "starttls",
            Verb::Other => "other",
        }
    }

    fn from_word(word: &[u8]) -> Verb {
        let mut upper = [0u8; 8];
        if word.len() > upper.len() {
            return Verb::Other;
        }
        for (u, b) in upper.iter_mut().zip(word) {
            *u = b.to_ascii_uppercase();
        }
        match &upper[..word.len()] {
            b"HELO" => Verb::Helo,
            b"EHLO" => Verb::Ehlo,
            b"LHLO" => Verb::Lhlo,
            b"MAIL" => Verb::Mail,
            b"RCPT" => Verb::Rcpt,
            b"DATA" => Verb::Data,
            b"BDAT" => Verb::Bdat,
            b"RSET" => Verb::Rset,
            b"NOOP" => Verb::Noop,
            b"QUIT" => Verb::Quit,
            b"VRFY" => Verb::Vrfy,
            b"EXPN" => Verb::Expn,
            b"HELP" => Verb::Help,
            b"AUTH" => Verb::Auth,
            b"STARTTLS" => Verb::StartTls,
            _ => Verb::Other,
        }
    }
}

/// One command line, borrowed from the client buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command<'a> {
    pub verb: Verb,
    /// What follows the verb, without the separating space and line ending.
    pub args: &'a [u8],
}

impl<'a> Command<'a> {
    /// Parses a complete line (with or without its CRLF). Never fails: an
    /// unknown or empty line is `Verb::Other`, which the receiver answers.
    pub fn parse(line: &'a [u8]) -> Command<'a> {
        let line = strip_line_ending(line);
        let (word, args) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        Command {
            verb: Verb::from_word(word),
            args,
        }
    }
}

pub fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_case_insensitive_and_args_split_at_first_space() {
        let c = Command::parse(b"mail FROM:<a@b> SIZE=10\r\n");
        assert_eq!(c.verb, Verb::Mail);
        assert_eq!(c.args, b"FROM:<a@b> SIZE=10");
        assert_eq!(Command::parse(b"StartTLS\r\n").verb, Verb::StartTls);
        assert_eq!(Command::parse(b"QUIT\n").verb, Verb::Quit);
        assert_eq!(Command::parse(b"\r\n").verb, Verb::Other);
        assert_eq!(Command::parse(b"MAILX FROM").verb, Verb::Other);
        assert_eq!(
            Command::parse(b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7").verb,
            Verb::Other
        );
    }
}
