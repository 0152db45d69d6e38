//! The one blocklist text format, used for files, the API body, the cache
//! and the ban export: one IP or CIDR per line, `#` starts a comment, blank
//! lines are ignored.
//!
//! Lists from outside are read with [`parse_reader`], which streams: it
//! holds one line at a time, keeps only the first few bad lines (and a
//! count), and stops at a bound on entries and on bytes, so a huge or
//! endless input costs neither memory nor an unbounded read.

use std::hash::Hasher;
use std::io::BufRead;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// A line that is not an IP or CIDR, with its 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub text: String,
    pub error: String,
}

/// How many bad lines a report quotes; the rest are only counted.
const QUOTED_BAD_LINES: usize = 5;

/// Longest line read as an entry; longer ones are bad lines, skipped to
/// their end without being held.
const MAX_LINE: usize = 1024;

/// The bad lines of one version: how many, and the first few.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BadLines {
    pub count: u64,
    pub first: Vec<BadLine>,
}

impl BadLines {
    pub fn from_slice(bad: &[BadLine]) -> BadLines {
        BadLines {
            count: bad.len() as u64,
            first: bad.iter().take(QUOTED_BAD_LINES).cloned().collect(),
        }
    }

    fn push(&mut self, bad: BadLine) {
        self.count += 1;
        if self.first.len() < QUOTED_BAD_LINES {
            self.first.push(bad);
        }
    }

    /// One line for people: the count, then the first few with their line
    /// numbers, e.g. `3 bad lines: line 2 "x" (not an IP …), line 5 "y"`.
    /// A reason shared with the previous quoted line is not repeated.
    pub fn summary(&self) -> String {
        let noun = if self.count == 1 { "line" } else { "lines" };
        let mut out = format!("{} bad {noun}: ", self.count);
        let mut last_error: Option<&str> = None;
        for (i, b) in self.first.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("line {} {:?}", b.line, b.text));
            if last_error != Some(b.error.as_str()) {
                out.push_str(&format!(" ({})", b.error));
                last_error = Some(&b.error);
            }
        }
        if self.count > self.first.len() as u64 {
            out.push_str(", …");
        }
        out
    }
}

/// One version of a list read by [`parse_reader`].
#[derive(Debug)]
pub struct Parsed {
    /// At most `max_entries + 1`: one more than allowed says "too many".
    pub nets: Vec<IpNet>,
    pub bad: BadLines,
    /// Identifies the bytes read, to skip re-applying an unchanged version.
    pub fingerprint: u64,
    /// Nothing but whitespace: a truncated file or an empty answer, never a
    /// list (an intentionally empty list says so with a comment).
    pub blank: bool,
}

/// How much of a list [`parse_reader`] reads.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Reading stops after one entry more than this (the caller refuses it).
    pub max_entries: usize,
    /// Reading fails past this many bytes.
    pub max_bytes: u64,
}

impl Limits {
    /// Bytes allowed per entry allowed: room for comments and long IPv6
    /// lines, while an endless or runaway input still stops.
    const BYTES_PER_ENTRY: u64 = 128;
    /// Never less than the API's body limit, so a small entry limit does not
    /// make a commented list unreadable.
    const MIN_BYTES: u64 = 64 * 1024 * 1024;

    pub fn for_entries(max_entries: usize) -> Limits {
        Limits {
            max_entries,
            max_bytes: (max_entries as u64)
                .saturating_mul(Self::BYTES_PER_ENTRY)
                .max(Self::MIN_BYTES),
        }
    }
}

/// Streams a list from `reader`, line by line: good entries are kept even
/// when some lines are bad. Stops early after `max_entries + 1` entries;
/// fails past `max_bytes` or on a read error.
pub fn parse_reader(mut reader: impl BufRead, limits: Limits) -> std::io::Result<Parsed> {
    let mut parsed = Parsed {
        nets: Vec::new(),
        bad: BadLines::default(),
        fingerprint: 0,
        blank: true,
    };
    let mut hash = std::collections::hash_map::DefaultHasher::new();
    let mut line = Vec::with_capacity(128);
    let (mut number, mut read) = (0usize, 0u64);
    loop {
        line.clear();
        let budget = limits.max_bytes.saturating_sub(read);
        let Some((taken, whole)) = read_line(&mut reader, &mut line, &mut hash, budget)? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "larger than {} bytes (128 per entry of \
                     blocklist.max_entries_per_source, at least 64 MiB); \
                     raise blocklist.max_entries_per_source if the list is meant to be this big",
                    limits.max_bytes
                ),
            ));
        };
        if taken == 0 {
            break;
        }
        read += taken;
        number += 1;
        let text = String::from_utf8_lossy(&line);
        if !text.trim().is_empty() {
            parsed.blank = false;
        }
        if !whole {
            parsed.bad.push(BadLine {
                line: number,
                text: text.chars().take(80).collect(),
                error: format!("longer than {MAX_LINE} bytes"),
            });
            continue;
        }
        match parse_line(number, &text) {
            None => {}
            Some(Ok(net)) => {
                parsed.nets.push(net);
                if parsed.nets.len() > limits.max_entries {
                    break;
                }
            }
            Some(Err(bad)) => parsed.bad.push(bad),
        }
    }
    parsed.fingerprint = hash.finish();
    Ok(parsed)
}

/// Reads one line into `line` (without its newline), at most `MAX_LINE`
/// bytes of it kept; hashes every byte read. Returns the bytes consumed and
/// whether the line fit, or `None` past `budget` bytes (an endless line).
fn read_line(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    hash: &mut impl Hasher,
    budget: u64,
) -> std::io::Result<Option<(u64, bool)>> {
    let mut taken = 0u64;
    let mut whole = true;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(Some((taken, whole)));
        }
        let (part, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (&chunk[..=i], true),
            None => (chunk, false),
        };
        hash.write(part);
        let content = part.strip_suffix(b"\n").unwrap_or(part);
        let room = MAX_LINE.saturating_sub(line.len());
        if content.len() > room {
            whole = false;
        }
        line.extend_from_slice(&content[..content.len().min(room)]);
        let used = part.len();
        reader.consume(used);
        taken += used as u64;
        if taken > budget {
            return Ok(None);
        }
        if done {
            return Ok(Some((taken, whole)));
        }
    }
}

/// An entry, nothing (blank or comment), or a bad line.
fn parse_line(number: usize, line: &str) -> Option<Result<IpNet, BadLine>> {
    let entry = line.split('#').next().unwrap_or_default().trim();
    if entry.is_empty() {
        return None;
    }
    Some(parse_net(entry).map_err(|error| BadLine {
        line: number,
        text: entry.chars().take(80).collect(),
        error,
    }))
}

/// Parses `text`; good entries are returned even when some lines are bad.
pub fn parse_list(text: &str) -> (Vec<IpNet>, Vec<BadLine>) {
    let mut nets = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_line(i + 1, line) {
            None => {}
            Some(Ok(net)) => nets.push(net),
            Some(Err(b)) => bad.push(b),
        }
    }
    (nets, bad)
}

/// An IP (a host entry) or a CIDR, normalised to its network address.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(canonical(net.trunc()));
    }
    text.parse::<IpAddr>()
        .map(|ip| IpNet::from(ip.to_canonical()))
        .map_err(|_| {
            "not an IP address or CIDR (e.g. 192.0.2.7, 198.51.100.0/24, 2001:db8::/64)".into()
        })
}

/// An IPv4-mapped IPv6 network (`::ffff:192.0.2.0/120`) as the IPv4 network
/// it is: lookups canonicalise mapped clients to IPv4, so the IPv6 form
/// would never match anyone.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => n
            .network()
            .to_ipv4_mapped()
            .and_then(|v4| Ipv4Net::new(v4, n.prefix_len() - 96).ok())
            .map_or(net, IpNet::V4),
        _ => net,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_blanks_and_bad_lines() {
        let (nets, bad) =
            parse_list("# list\n192.0.2.7\n\n198.51.100.9/24 # net\nnonsense\n2001:db8::/64\n");
        assert_eq!(
            nets,
            [
                "192.0.2.7/32".parse::<IpNet>().unwrap(),
                "198.51.100.0/24".parse().unwrap(),
                "2001:db8::/64".parse().unwrap()
            ]
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 5);
        assert_eq!(bad[0].text, "nonsense");
    }

    #[test]
    fn v4_mapped_networks_are_ipv4_networks() {
        let net = |s: &str| parse_net(s).unwrap().to_string();
        assert_eq!(net("::ffff:198.51.100.9/120"), "198.51.100.0/24");
        assert_eq!(net("::ffff:192.0.2.7/128"), "192.0.2.7/32");
        assert_eq!(net("::ffff:192.0.2.7"), "192.0.2.7/32");
        assert_eq!(net("::ffff:0:0/96"), "0.0.0.0/0");
        // Wider than the mapped range, or not mapped: stays IPv6.
        assert_eq!(net("::ffff:0:0/95"), "::fffe:0:0/95");
        assert_eq!(net("::192.0.2.7"), "::c000:207/128");
    }

    /// An endless input, `pattern` over and over.
    struct Endless(&'static [u8], usize);

    impl std::io::Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            for b in buf.iter_mut() {
                *b = self.0[self.1 % self.0.len()];
                self.1 += 1;
            }
            Ok(buf.len())
        }
    }

    fn endless(pattern: &'static [u8]) -> std::io::BufReader<Endless> {
        std::io::BufReader::new(Endless(pattern, 0))
    }

    #[test]
    fn streaming_reads_what_parse_list_reads() {
        let text = "# list\n192.0.2.7\r\n\n198.51.100.9/24 # net\nnonsense\n2001:db8::/64";
        let parsed = parse_reader(text.as_bytes(), Limits::for_entries(10)).unwrap();
        let (nets, bad) = parse_list(text);
        assert_eq!(parsed.nets, nets);
        assert_eq!(parsed.bad, BadLines::from_slice(&bad));
        assert!(!parsed.blank);
        let blank = parse_reader(&b" \n\n\t"[..], Limits::for_entries(10)).unwrap();
        assert!(blank.blank && blank.nets.is_empty() && blank.bad.count == 0);
        let again = parse_reader(text.as_bytes(), Limits::for_entries(10)).unwrap();
        assert_eq!(again.fingerprint, parsed.fingerprint);
    }

    #[test]
    fn reading_stops_one_entry_past_the_entry_limit() {
        let parsed = parse_reader(endless(b"192.0.2.1\n"), Limits::for_entries(1000)).unwrap();
        assert_eq!(parsed.nets.len(), 1001);
    }

    #[test]
    fn an_endless_line_or_comment_stops_at_the_byte_limit() {
        let limits = Limits {
            max_entries: 10,
            max_bytes: 1 << 20,
        };
        for pattern in [&b"#"[..], b"x", b"# comment\n"] {
            let e = parse_reader(endless(pattern), limits).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("blocklist.max_entries_per_source"));
        }
    }

    #[test]
    fn a_long_line_is_one_bad_line_and_the_next_line_counts() {
        let text = format!("{}\n192.0.2.1\n", "1".repeat(5000));
        let parsed = parse_reader(text.as_bytes(), Limits::for_entries(10)).unwrap();
        assert_eq!(parsed.nets, ["192.0.2.1/32".parse::<IpNet>().unwrap()]);
        assert_eq!(parsed.bad.count, 1);
        assert_eq!(parsed.bad.first[0].line, 1);
        assert_eq!(parsed.bad.first[0].text.len(), 80);
    }

    #[test]
    fn the_bad_line_summary_counts_all_and_quotes_five() {
        let text: String = (0..7).map(|i| format!("bad{i}\n")).collect();
        let parsed = parse_reader(text.as_bytes(), Limits::for_entries(10)).unwrap();
        let summary = parsed.bad.summary();
        assert!(
            summary.starts_with("7 bad lines: line 1 \"bad0\" (not an IP"),
            "{summary}"
        );
        assert!(summary.contains(", line 5 \"bad4\", …"), "{summary}");
        assert_eq!(summary.matches("not an IP").count(), 1, "{summary}");
    }
}
