//! One message's facts, for the per-message log record: envelope, size,
//! and the header block (bounded, parsed with mail-parser only once the
//! message is accepted, so the relay never waits on it).

use std::net::IpAddr;

use crate::smtp::command::strip_line_ending;

/// Header bytes kept per message; the rest of the message is never buffered.
const MAX_HEADER: usize = 64 * 1024;
/// Longest client-supplied text kept for a log field.
pub(crate) const MAX_FIELD: usize = 256;
/// The `.CRLF` that ends DATA: on the wire, but not part of the message
/// size (RFC 1870). The CRLF before the dot ends the message's last line
/// (RFC 5321 4.1.1.4), so it counts, as the receiver stores it.
pub const END_MARKER: u64 = 3;

#[derive(Debug, Default)]
pub struct Message {
    pub mail_from: String,
    /// RCPT commands sent to the receiver for this message.
    pub recipients_sent: u32,
    /// RCPT commands the receiver accepted.
    pub recipients: u32,
    pub size: u64,
    header: Vec<u8>,
    header_done: bool,
    /// Bytes searched for the end of the header, to test it stays linear.
    #[cfg(test)]
    scanned: usize,
}

impl Message {
    /// A new transaction from `MAIL FROM:<addr> …` arguments.
    pub fn new(mail_args: &[u8]) -> Message {
        Message {
            mail_from: field(angle_address(mail_args)),
            ..Message::default()
        }
    }

    /// Sees a chunk of message content; keeps it while the header lasts.
    pub fn content(&mut self, chunk: &[u8]) {
        self.size += chunk.len() as u64;
        if self.header_done {
            return;
        }
        let room = MAX_HEADER.saturating_sub(self.header.len());
        let old_len = self.header.len();
        self.header
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
        // Only the new bytes, and the three before them in case the blank
        // line straddles two chunks: the kept block was searched already.
        let fresh = &self.header[old_len.saturating_sub(3)..];
        #[cfg(test)]
        {
            self.scanned += fresh.len();
        }
        if memchr::memmem::find(fresh, b"\r\n\r\n").is_some() || self.header.len() >= MAX_HEADER {
            self.header_done = true;
        }
    }

    /// The end marker was the last content seen: its bytes are not the message's.
    pub fn ended(&mut self) {
        self.size = self.size.saturating_sub(END_MARKER);
    }

    /// Writes the per-message log record.
    pub fn log_accepted(&self, client: IpAddr, helo: &str) {
        // Parsing the headers is a real part of a transaction's cost: not
        // for a record nobody will see. The fields are named so a filter
        // on them decides here as it would for the record.
        let fields = tracing::enabled!(
            target: "mailmoat::message",
            tracing::Level::INFO,
            client,
            helo,
            mail_from,
            recipients,
            size,
            from_domain,
            message_id
        );
        if !fields {
            return;
        }
        let headers = mail_parser::MessageParser::default().parse_headers(&self.header[..]);
        let from_domain = headers
            .as_ref()
            .and_then(|m| m.from()?.first()?.address())
            .and_then(|a| a.rsplit_once('@').map(|(_, d)| field(d.as_bytes())))
            .unwrap_or_default();
        let message_id = headers
            .as_ref()
            .and_then(|m| m.message_id())
            .map(|id| field(id.as_bytes()))
            .unwrap_or_default();
        tracing::info!(
            target: "mailmoat::message",
            client = %client,
            helo,
            mail_from = self.mail_from.as_str(),
            recipients = self.recipients,
            size = self.size,
            from_domain = from_domain.as_str(),
            message_id = message_id.as_str(),
            "message accepted"
        );
    }
}

/// `MAIL FROM:<a@b> SIZE=10` → the `SIZE=` value, if any.
pub fn size_param(mail_args: &[u8]) -> Option<u64> {
    mail_args
        .split(|&b| b == b' ')
        .find_map(|p| {
            p.get(..5)
                .filter(|k| k.eq_ignore_ascii_case(b"SIZE="))
                .map(|_| &p[5..])
        })
        .and_then(|v| std::str::from_utf8(strip_line_ending(v)).ok()?.parse().ok())
}

fn angle_address(args: &[u8]) -> &[u8] {
    let start = args.iter().position(|&b| b == b'<').map_or(0, |i| i + 1);
    let end = args[start..]
        .iter()
        .position(|&b| b == b'>')
        .map_or(args.len(), |i| start + i);
    &args[start..end]
}

/// Client text for a log field: bounded, as UTF-8 (invalid bytes become
/// U+FFFD), otherwise kept as sent. Log it as a `&str` value
/// (`helo = helo.as_str()`), never with `%` or `?`: the text formatter then
/// writes it as one double-quoted value with quotes and control characters
/// escaped, and the JSON formatter escapes it exactly once, so a client
/// cannot add a field or a line. Escaping here as well would escape JSON
/// twice (`\\x1b`, `é` as `\\xc3\\xa9`).
pub fn field(bytes: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_FIELD)]).into_owned();
    let mut end = text.len().min(MAX_FIELD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_size_and_header_fields() {
        let mut m = Message::new(b"FROM:<a@example.org> SIZE=1234 BODY=8BITMIME");
        assert_eq!(m.mail_from, "a@example.org");
        assert_eq!(
            size_param(b"FROM:<a@example.org> size=1234\r\n"),
            Some(1234)
        );
        assert_eq!(size_param(b"FROM:<a@example.org>"), None);
        m.content(b"From: Alice <alice@sender.example>\r\nMessage-ID: <id1@sender.example>\r\n");
        m.content(b"Subject: x\r\n\r\nbody\r\n");
        assert!(m.header_done);
        let parsed = mail_parser::MessageParser::default()
            .parse_headers(&m.header[..])
            .unwrap();
        assert_eq!(parsed.message_id(), Some("id1@sender.example"));
    }

    #[test]
    fn header_end_split_across_chunks_is_found_at_every_split() {
        let message = b"Subject: x\r\nTo: y\r\n\r\nbody\r\n";
        let blank = 17;
        assert_eq!(&message[blank..blank + 4], b"\r\n\r\n");
        for split in 1..message.len() {
            let mut m = Message::default();
            m.content(&message[..split]);
            assert_eq!(m.header_done, split >= blank + 4, "split at {split}");
            m.content(&message[split..]);
            assert!(m.header_done, "split at {split}");
        }
        // A byte at a time, no blank line until the very end.
        let mut m = Message::default();
        for (i, b) in message.iter().enumerate() {
            m.content(std::slice::from_ref(b));
            assert_eq!(m.header_done, i + 1 >= blank + 4, "byte {i}");
        }
    }

    #[test]
    fn header_scan_stays_linear_in_small_chunks() {
        // 64 KiB of header lines a byte at a time: each byte is searched a
        // bounded number of times, not the whole kept block on every chunk.
        let line = b"X-Filler: 0123456789abcdefghijklmnopqrstuvwxyz\r\n";
        let mut m = Message::default();
        let mut fed = 0;
        while !m.header_done {
            let b = line[fed % line.len()];
            m.content(&[b]);
            fed += 1;
            assert!(fed <= MAX_HEADER, "header never ended");
        }
        assert_eq!(m.header.len(), MAX_HEADER);
        assert!(
            m.scanned <= 4 * fed,
            "{} bytes scanned for {fed}",
            m.scanned
        );
    }

    #[test]
    fn client_text_is_bounded_utf8_kept_as_sent() {
        assert_eq!(field("evil\r\nINFO é".as_bytes()), "evil\r\nINFO é");
        assert_eq!(field(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(field(&[b'a'; 1000]).len(), MAX_FIELD);
        // Invalid bytes and a character cut by the bound stay within it.
        assert!(field(&[0xff; 1000]).len() <= MAX_FIELD);
        assert!(field("é".repeat(500).as_bytes()).len() <= MAX_FIELD);
    }
}
