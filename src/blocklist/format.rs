//! The one blocklist text format, used for files, the API body, the cache
//! and the ban export: one IP or CIDR per line, `#` starts a comment, blank
//! lines are ignored.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

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
}
