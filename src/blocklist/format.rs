//! The one blocklist text format, used for files, the API body, the cache
//! and the ban export: one IP or CIDR per line, `#` starts a comment, blank
//! lines are ignored.

use std::net::IpAddr;

use ipnet::IpNet;

/// A line that is not an IP or CIDR, with its 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub text: String,
    pub error: String,
}

/// Parses `text`; good entries are returned even when some lines are bad.
pub fn parse_list(text: &str) -> (Vec<IpNet>, Vec<BadLine>) {
    let mut nets = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        match parse_net(entry) {
            Ok(net) => nets.push(net),
            Err(error) => bad.push(BadLine {
                line: i + 1,
                text: entry.chars().take(80).collect(),
                error,
            }),
        }
    }
    (nets, bad)
}

/// An IP (a host entry) or a CIDR, normalised to its network address.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(|ip| IpNet::from(ip.to_canonical()))
        .map_err(|_| {
            "not an IP address or CIDR (e.g. 192.0.2.7, 198.51.100.0/24, 2001:db8::/64)".into()
        })
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
}
