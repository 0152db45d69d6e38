//! The DATA end-of-message scanner.
//!
//! The message ends at `CRLF . CRLF`; a line starting with `.` that is not
//! the end is dot-stuffed (`..`) and passes through unchanged, since the
//! receiver un-stuffs it. A lone dot framed by a bare LF or CR is refused:
//! receivers disagree on whether it ends the message, and that disagreement
//! is how SMTP smuggling hides a second message (and commands the proxy would
//! never see) inside the first.
//!
//! A NUL byte is refused anywhere in the content: RFC 5321 text never carries
//! one, and a receiver that strips NULs would read `CRLF NUL . CRLF` or
//! `CRLF . NUL CRLF` (from hannob/smtpsmug) as the end of data.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// After CRLF (DATA's own line counts): a `.` here may end the message.
    LineStart,
    /// After a bare LF.
    BareLineStart,
    Mid,
    MidCr,
    Dot,
    DotCr,
    BareDot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataEvent {
    /// No end in this chunk; all of it is message content.
    Continue,
    /// The message ends after this many bytes of the chunk (marker included).
    End(usize),
    /// A dot line framed by bare CR/LF, at this byte offset.
    Smuggling(usize),
    /// A NUL byte at this offset.
    Nul(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct DataScanner {
    state: State,
}

impl Default for DataScanner {
    fn default() -> Self {
        DataScanner {
            state: State::LineStart,
        }
    }
}

impl DataScanner {
    /// Scans the next chunk of the message. Only a NUL, or a dot after a
    /// CR or LF, can end the message or refuse it, and both are rare in
    /// mail, so whole runs of lines are skipped in one vectorized search
    /// and the byte-by-byte rules ([`DataScanner::step`]) run only around
    /// those places.
    pub fn scan(&mut self, chunk: &[u8]) -> DataEvent {
        let mut ahead = Ahead::default();
        let mut i = 0;
        while i < chunk.len() {
            if self.state == State::Mid {
                match ahead.next_turn(chunk, i) {
                    Some(at) => i = at,
                    None => return DataEvent::Continue,
                }
            }
            if let Some(event) = self.step(chunk[i], i) {
                return event;
            }
            i += 1;
        }
        DataEvent::Continue
    }

    /// The rules, one byte at a time: `at` is the byte's offset in its
    /// chunk, for the event it may cause.
    fn step(&mut self, b: u8, at: usize) -> Option<DataEvent> {
        use State::*;
        self.state = match (self.state, b) {
            (_, 0) => return Some(DataEvent::Nul(at)),
            (DotCr, b'\n') => {
                *self = DataScanner::default();
                return Some(DataEvent::End(at + 1));
            }
            (Dot, b'\n') | (DotCr, _) | (BareDot, b'\r' | b'\n') => {
                return Some(DataEvent::Smuggling(at));
            }
            (Dot, b'\r') => DotCr,
            (LineStart, b'.') => Dot,
            // After a bare LF or a bare CR: some receivers end lines there.
            (BareLineStart | MidCr, b'.') => BareDot,
            (_, b'\r') => MidCr,
            (MidCr, b'\n') => LineStart,
            (_, b'\n') => BareLineStart,
            _ => Mid,
        };
        None
    }
}

/// Where the rules must run next in a chunk, for a scanner inside a line
/// ([`State::Mid`]). Each search's next hit is kept, so a chunk is
/// searched once per kind of hit, not once per hit of another kind.
#[derive(Default)]
struct Ahead {
    nul: Found,
    /// A dot after a CR or a LF.
    dot: Found,
}

/// Both dot searches in one vectorized pass (aho-corasick's Teddy), not
/// one pass over the chunk for each.
static LINE_END_DOT: std::sync::LazyLock<aho_corasick::AhoCorasick> =
    std::sync::LazyLock::new(|| {
        aho_corasick::AhoCorasick::new([b"\n.", b"\r."]).expect("two short literals build")
    });

/// The offset of the next hit at or after `from`, once searched.
#[derive(Clone, Copy, Default)]
enum Found {
    #[default]
    Unsearched,
    At {
        from: usize,
        hit: Option<usize>,
    },
}

impl Found {
    fn next(&mut self, from: usize, search: impl Fn(usize) -> Option<usize>) -> Option<usize> {
        if let Found::At {
            from: searched,
            hit,
        } = *self
        {
            if searched <= from && hit.is_none_or(|h| h >= from) {
                return hit;
            }
        }
        let hit = search(from);
        *self = Found::At { from, hit };
        hit
    }
}

impl Ahead {
    /// The first offset from `i` at which the rules must run: a NUL, or the
    /// byte before a CR or LF that is followed by a dot or ends the chunk
    /// (whether that line ending is CRLF decides what the dot means). In
    /// between, every byte leaves a scanner inside a line there.
    fn next_turn(&mut self, chunk: &[u8], i: usize) -> Option<usize> {
        let nul = self.nul.next(i, |from| {
            memchr::memchr(0, &chunk[from..]).map(|n| from + n)
        });
        let dot = self.dot.next(i, |from| {
            LINE_END_DOT.find(&chunk[from..]).map(|m| from + m.start())
        });
        let last = chunk.len() - 1;
        let trailing = matches!(chunk[last], b'\r' | b'\n').then_some(last);
        let line_end = [dot, trailing].into_iter().flatten().min();
        let from_line_end = line_end.map(|at| at.saturating_sub(1).max(i));
        [nul, from_line_end].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(chunks: &[&[u8]]) -> Vec<DataEvent> {
        let mut s = DataScanner::default();
        chunks.iter().map(|c| s.scan(c)).collect()
    }

    #[test]
    fn end_marker_is_found_across_chunk_boundaries() {
        assert_eq!(scan_all(&[b"hi\r\n.\r\nQUIT\r\n"]), [DataEvent::End(7)]);
        assert_eq!(
            scan_all(&[b"hi\r", b"\n.", b"\r", b"\nQUIT"]),
            [
                DataEvent::Continue,
                DataEvent::Continue,
                DataEvent::Continue,
                DataEvent::End(1)
            ]
        );
        assert_eq!(scan_all(&[b".\r\n"]), [DataEvent::End(3)]);
    }

    #[test]
    fn dot_stuffed_lines_are_content() {
        assert_eq!(scan_all(&[b"..\r\n...x\r\n.a\r\n"]), [DataEvent::Continue]);
        assert_eq!(scan_all(&[b"a\r\n..\r\n.\r\n"]), [DataEvent::End(10)]);
    }

    #[test]
    fn bare_line_ending_dot_lines_are_smuggling() {
        assert_eq!(scan_all(&[b"a\n.\r\n"]), [DataEvent::Smuggling(3)]);
        assert_eq!(scan_all(&[b"a\r\n.\n"]), [DataEvent::Smuggling(4)]);
        assert_eq!(scan_all(&[b"a\r\n.\rX"]), [DataEvent::Smuggling(5)]);
        assert_eq!(scan_all(&[b"a\r.\r\n"]), [DataEvent::Smuggling(3)]);
        assert_eq!(scan_all(&[b"a\r.b\r\n"]), [DataEvent::Continue]);
        assert_eq!(scan_all(&[b"a\n.b\r\n"]), [DataEvent::Continue]);
    }

    /// `scan` skips ahead between the places the rules must see; fed one
    /// byte at a time it cannot skip anything, so the two must agree on
    /// every input: line endings of every kind, dots and NULs, densely
    /// mixed so every neighbour of every special byte is tried.
    #[test]
    fn skipping_ahead_finds_the_same_events_as_the_rules_byte_by_byte() {
        const ALPHABET: &[u8] = b"\r\n\r\n..a\0";
        let mut seed = 0x9e37_79b9_u32;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as usize
        };
        for _ in 0..20_000 {
            let len = random() % 40;
            let input: Vec<u8> = (0..len)
                .map(|_| match random() % 4 {
                    // Runs of plain text, so there is something to skip.
                    0 => b'x',
                    _ => ALPHABET[random() % ALPHABET.len()],
                })
                .collect();
            crate::fuzzing::data_scanner(&input);
        }
    }

    #[test]
    fn nul_anywhere_in_the_content_is_refused() {
        // The two endings of hannob/smtpsmug that a NUL-stripping receiver
        // would take for the end of data.
        assert_eq!(scan_all(&[b"a\r\n\0.\r\n"]), [DataEvent::Nul(3)]);
        assert_eq!(scan_all(&[b"a\r\n.\0\r\n"]), [DataEvent::Nul(4)]);
        // Mid-line (the fast path), after a CR, at the very start.
        assert_eq!(scan_all(&[b"abc\0def\r\n"]), [DataEvent::Nul(3)]);
        assert_eq!(scan_all(&[b"a\r\0\n"]), [DataEvent::Nul(2)]);
        assert_eq!(
            scan_all(&[b"ab", b"\0"]),
            [DataEvent::Continue, DataEvent::Nul(0)]
        );
    }
}
