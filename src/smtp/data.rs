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
    pub fn scan(&mut self, chunk: &[u8]) -> DataEvent {
        use State::*;
        let mut i = 0;
        while i < chunk.len() {
            if self.state == Mid {
                // Inside a line only CR, LF and NUL matter: skip to the next one.
                match memchr::memchr3(b'\r', b'\n', 0, &chunk[i..]) {
                    Some(skip) => i += skip,
                    None => return DataEvent::Continue,
                }
            }
            let b = chunk[i];
            i += 1;
            self.state = match (self.state, b) {
                (_, 0) => return DataEvent::Nul(i - 1),
                (DotCr, b'\n') => {
                    *self = DataScanner::default();
                    return DataEvent::End(i);
                }
                (Dot, b'\n') | (DotCr, _) | (BareDot, b'\r' | b'\n') => {
                    return DataEvent::Smuggling(i - 1);
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
        }
        DataEvent::Continue
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
