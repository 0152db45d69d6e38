//! PROXY protocol headers (HAProxy v1 text, v2 binary) via the `ppp` crate:
//! encoding toward the receiver, and parsing from trusted proxies in front.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Type, Version};

use crate::config::ProxyProtocol;
use crate::tls::TlsFacts;

/// The header that tells the receiver `client` connected to `local`, and,
/// in v2, how the client's TLS went when `tls` is given (v1 has no room).
/// Both addresses are put in the client's family, as the header requires one.
pub fn encode(
    version: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    tls: Option<&TlsFacts>,
) -> Vec<u8> {
    let client = canonical(client);
    let local = same_family(canonical(local), client);
    match version {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => ppp::v1::Addresses::from((client, local))
            .to_string()
            .into_bytes(),
        ProxyProtocol::V2 => {
            let builder = Builder::with_addresses(
                Version::Two | Command::Proxy,
                Protocol::Stream,
                (client, local),
            );
            let tlvs = tls.map(tls_tlvs).unwrap_or_default();
            tlvs.iter()
                .try_fold(builder, |b, (kind, value)| b.write_tlv(*kind, value))
                .and_then(Builder::build)
                .expect("addresses and TLVs bounded by MAX_TLV_VALUE always fit")
        }
    }
}

/// `PP2_CLIENT_SSL`: the client connected over TLS.
const PP2_CLIENT_SSL: u8 = 0x01;
/// `verify` is zero only for a client certificate that was verified;
/// mailmoat asks for none.
const PP2_VERIFY_NO_CLIENT_CERT: u32 = 1;
/// Longest SNI put in `PP2_TYPE_AUTHORITY`; rustls accepts only DNS names
/// (at most 253 bytes), so this only guards the header's size.
const MAX_TLV_VALUE: usize = 255;

/// `PP2_TYPE_SSL` (client, verify, then the version and cipher sub-TLVs)
/// and `PP2_TYPE_AUTHORITY` (the SNI), as HAProxy sends them.
fn tls_tlvs(tls: &TlsFacts) -> Vec<(Type, Vec<u8>)> {
    let mut ssl = vec![PP2_CLIENT_SSL];
    ssl.extend_from_slice(&PP2_VERIFY_NO_CLIENT_CERT.to_be_bytes());
    for (kind, value) in [
        (Type::SSLVersion, tls.version.as_str()),
        (Type::SSLCipher, tls.cipher.as_str()),
    ] {
        let value = &value.as_bytes()[..value.len().min(MAX_TLV_VALUE)];
        ssl.push(kind.into());
        // At most MAX_TLV_VALUE, so it fits in two bytes.
        ssl.extend_from_slice(&(value.len() as u16).to_be_bytes());
        ssl.extend_from_slice(value);
    }
    let mut tlvs = vec![(Type::SSL, ssl)];
    if let Some(sni) = tls.sni.as_deref().filter(|s| s.len() <= MAX_TLV_VALUE) {
        tlvs.push((Type::Authority, sni.as_bytes().to_vec()));
    }
    tlvs
}

/// The client's TLS as a PROXY v2 header tells it: what a receiver (the
/// sink) reads from `PP2_TYPE_SSL` and `PP2_TYPE_AUTHORITY`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderTls {
    /// `PP2_SUBTYPE_SSL_VERSION`, e.g. `TLSv1.3`.
    pub version: Option<String>,
    /// `PP2_SUBTYPE_SSL_CIPHER`.
    pub cipher: Option<String>,
    /// `PP2_TYPE_AUTHORITY`: the name the client asked for (SNI).
    pub authority: Option<String>,
}

/// The TLS TLVs of a v2 header at the start of `bytes`; `None` when there
/// is no complete v2 header or it says the client did not use TLS.
pub fn header_tls(bytes: &[u8]) -> Option<HeaderTls> {
    let ppp::HeaderResult::V2(Ok(header)) = ppp::HeaderResult::parse(bytes) else {
        return None;
    };
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let mut found = HeaderTls::default();
    let mut ssl = false;
    for tlv in header.tlvs().flatten() {
        if tlv.kind == u8::from(Type::Authority) {
            found.authority = Some(text(&tlv.value));
        } else if tlv.kind == u8::from(Type::SSL) {
            let Some((&client, rest)) = tlv.value.split_first() else {
                continue;
            };
            ssl = client & PP2_CLIENT_SSL != 0;
            // After the four bytes of `verify`, sub-TLVs in the same format.
            let mut subs = rest.get(4..).unwrap_or_default();
            while let [kind, hi, lo, tail @ ..] = subs {
                let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                let Some(value) = tail.get(..len) else { break };
                if *kind == u8::from(Type::SSLVersion) {
                    found.version = Some(text(value));
                } else if *kind == u8::from(Type::SSLCipher) {
                    found.cipher = Some(text(value));
                }
                subs = &tail[len..];
            }
        }
    }
    ssl.then_some(found)
}

/// The header of a connection that carries no client: v2 `LOCAL`, v1
/// `UNKNOWN` (empty when PROXY is off).
pub fn health_check(version: ProxyProtocol) -> Vec<u8> {
    match version {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyProtocol::V2 => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .expect("an empty PROXY v2 header always fits"),
    }
}

/// Longest header accepted inbound: v1 is at most 107 bytes; v2 carries
/// TLVs, which a load balancer keeps small.
pub const MAX_INBOUND_HEADER: usize = 536;

#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// The real client, and how many bytes the header took.
    Proxied {
        client: SocketAddr,
        len: usize,
    },
    /// `LOCAL` (v2) or `UNKNOWN` (v1): a health check by the proxy itself.
    Local {
        len: usize,
    },
    Incomplete,
    Malformed(String),
}

/// Parses a PROXY header at the start of `bytes`.
pub fn parse_inbound(bytes: &[u8]) -> Inbound {
    use ppp::PartialResult;
    // ppp calls a v1 line cut short a hard error; it is only incomplete.
    if bytes.starts_with(b"PROXY") && !bytes.contains(&b'\n') && bytes.len() < 108 {
        return Inbound::Incomplete;
    }
    let result = ppp::HeaderResult::parse(bytes);
    match result {
        // The command decides, not the address block: a `LOCAL` header may
        // carry addresses (some balancers fill them in), and they must be
        // ignored; the connection's real endpoints stand.
        ppp::HeaderResult::V2(Ok(h)) => {
            let len = h.len();
            match (h.command, h.addresses) {
                (Command::Local, _) => Inbound::Local { len },
                (Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                    proxied(SocketAddr::new(a.source_address.into(), a.source_port), len)
                }
                (Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                    proxied(SocketAddr::new(a.source_address.into(), a.source_port), len)
                }
                // No IP client (AF_UNSPEC, AF_UNIX): as v1's `UNKNOWN`, the
                // protocol says to use the real endpoints.
                (Command::Proxy, _) => Inbound::Local { len },
            }
        }
        ppp::HeaderResult::V1(Ok(h)) => {
            let len = h.header.len();
            match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    proxied(SocketAddr::new(a.source_address.into(), a.source_port), len)
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    proxied(SocketAddr::new(a.source_address.into(), a.source_port), len)
                }
                ppp::v1::Addresses::Unknown => Inbound::Local { len },
            }
        }
        _ if bytes.len() >= MAX_INBOUND_HEADER => Inbound::Malformed("header too long".into()),
        ref r if r.is_incomplete() => Inbound::Incomplete,
        ppp::HeaderResult::V1(Err(e)) => Inbound::Malformed(format!("{e:?}")),
        ppp::HeaderResult::V2(Err(e)) => Inbound::Malformed(format!("{e:?}")),
    }
}

fn proxied(client: SocketAddr, len: usize) -> Inbound {
    Inbound::Proxied {
        client: canonical(client),
        len,
    }
}

const V1_PREFIX: &[u8] = b"PROXY ";

/// What the first bytes of a connection say about a PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// They begin like a v1 or v2 header.
    Header,
    /// Too few to tell (none, or a strict prefix of a header's signature):
    /// the v2 signature begins with two bare `\r\n`, which a line reader
    /// would otherwise take for empty command lines.
    Undecided,
    NotHeader,
}

/// Tells whether `bytes` begin like a PROXY header (v1 or v2).
pub fn sniff(bytes: &[u8]) -> Sniff {
    let v2 = ppp::v2::PROTOCOL_PREFIX;
    let mut undecided = false;
    for signature in [V1_PREFIX, v2] {
        if bytes.starts_with(signature) {
            return Sniff::Header;
        }
        undecided |= signature.starts_with(bytes);
    }
    if undecided {
        Sniff::Undecided
    } else {
        Sniff::NotHeader
    }
}

/// True when `bytes` begin like a PROXY header (v1 or v2).
pub fn looks_like_header(bytes: &[u8]) -> bool {
    sniff(bytes) == Sniff::Header
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`, seen on dual-stack listeners) as IPv4,
/// so one client has one address for every rule and header.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn same_family(addr: SocketAddr, like: SocketAddr) -> SocketAddr {
    match (addr.ip(), like.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => addr,
        (IpAddr::V6(_), IpAddr::V4(_)) => {
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port())
        }
        (IpAddr::V4(v4), IpAddr::V6(_)) => {
            SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_headers_parse_incrementally_and_refuse_garbage() {
        let client: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:25".parse().unwrap();
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut bytes = encode(version, client, local, None);
            let len = bytes.len();
            for cut in 1..len {
                assert_eq!(
                    parse_inbound(&bytes[..cut]),
                    Inbound::Incomplete,
                    "{version:?} cut at {cut}"
                );
            }
            bytes.extend_from_slice(b"EHLO x\r\n");
            assert_eq!(parse_inbound(&bytes), Inbound::Proxied { client, len });
            assert!(looks_like_header(&bytes));
        }
        assert!(matches!(
            parse_inbound(b"EHLO example.org\r\n"),
            Inbound::Malformed(_)
        ));
        assert!(!looks_like_header(b"EHLO x\r\n"));
        assert!(!looks_like_header(b"\r\n"));
    }

    #[test]
    fn v2_local_with_an_address_block_keeps_the_real_endpoints() {
        let client: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:25".parse().unwrap();
        for addresses in [(client, local), ("0.0.0.0:0".parse().unwrap(), local)] {
            let header =
                Builder::with_addresses(Version::Two | Command::Local, Protocol::Stream, addresses)
                    .build()
                    .unwrap();
            let len = header.len();
            assert_eq!(
                parse_inbound(&header),
                Inbound::Local { len },
                "{addresses:?}"
            );
        }
        let check = health_check(ProxyProtocol::V2);
        let len = check.len();
        assert_eq!(parse_inbound(&check), Inbound::Local { len });
    }

    #[test]
    fn a_v2_signature_cut_after_its_blank_lines_is_undecided_not_junk() {
        let header = encode(
            ProxyProtocol::V2,
            "192.0.2.7:4000".parse().unwrap(),
            "127.0.0.1:25".parse().unwrap(),
            None,
        );
        for cut in 1..12 {
            assert_eq!(sniff(&header[..cut]), Sniff::Undecided, "cut at {cut}");
        }
        assert_eq!(sniff(&header), Sniff::Header);
        assert_eq!(sniff(b"PROXY TCP4 "), Sniff::Header);
        assert_eq!(sniff(b"PROX"), Sniff::Undecided);
        assert_eq!(sniff(b"\r\nEHLO x\r\n"), Sniff::NotHeader);
        assert_eq!(sniff(b"EHLO x\r\n"), Sniff::NotHeader);
    }

    #[test]
    fn v1_and_v2_headers_carry_the_client() {
        let client: SocketAddr = "127.0.0.2:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:2525".parse().unwrap();
        let v1 = encode(ProxyProtocol::V1, client, local, None);
        assert_eq!(v1, b"PROXY TCP4 127.0.0.2 127.0.0.1 4000 2525\r\n");
        let v2 = encode(ProxyProtocol::V2, client, local, None);
        match ppp::HeaderResult::parse(&v2) {
            ppp::HeaderResult::V2(Ok(h)) => {
                assert_eq!(h.addresses, ppp::v2::Addresses::from((client, local)))
            }
            other => panic!("not a v2 header: {other:?}"),
        }
        let mapped: SocketAddr = "[::ffff:127.0.0.2]:4000".parse().unwrap();
        let v6_local: SocketAddr = "[::1]:2525".parse().unwrap();
        assert_eq!(
            encode(ProxyProtocol::V1, mapped, v6_local, None),
            b"PROXY TCP4 127.0.0.2 0.0.0.0 4000 2525\r\n"
        );
    }

    fn facts(sni: Option<&str>) -> TlsFacts {
        TlsFacts {
            version: crate::tls::TlsVersion::V1_3,
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            sni: sni.map(str::to_owned),
        }
    }

    /// Each TLV found in the parsed header, by kind.
    fn tlvs(header: &[u8]) -> Vec<(u8, Vec<u8>)> {
        match ppp::HeaderResult::parse(header) {
            ppp::HeaderResult::V2(Ok(h)) => h
                .tlvs()
                .map(|t| t.expect("well-formed TLV"))
                .map(|t| (t.kind, t.value.to_vec()))
                .collect(),
            other => panic!("not a v2 header: {other:?}"),
        }
    }

    #[test]
    fn v2_header_of_a_tls_client_carries_ssl_and_authority_tlvs() {
        let client: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:465".parse().unwrap();
        let header = encode(
            ProxyProtocol::V2,
            client,
            local,
            Some(&facts(Some("mx.example.org"))),
        );
        let found = tlvs(&header);
        let ssl = &found
            .iter()
            .find(|(k, _)| *k == 0x20)
            .expect("PP2_TYPE_SSL")
            .1;
        assert_eq!(ssl[0], PP2_CLIENT_SSL);
        assert_ne!(
            &ssl[1..5],
            &[0, 0, 0, 0],
            "verify says no verified client cert"
        );
        let mut subs = vec![0x21, 0, 7];
        subs.extend_from_slice(b"TLSv1.3");
        subs.extend_from_slice(&[0x23, 0, 24]);
        subs.extend_from_slice(b"TLS13_AES_128_GCM_SHA256");
        assert_eq!(&ssl[5..], &subs[..]);
        assert!(
            found.contains(&(0x02, b"mx.example.org".to_vec())),
            "{found:?}"
        );
        // The header still names the client, and reads back whole.
        assert_eq!(
            parse_inbound(&header),
            Inbound::Proxied {
                client,
                len: header.len()
            }
        );
        assert_eq!(
            header_tls(&header),
            Some(HeaderTls {
                version: Some("TLSv1.3".into()),
                cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
                authority: Some("mx.example.org".into()),
            })
        );
    }

    #[test]
    fn tls_without_sni_sends_no_authority_and_v1_and_plain_sessions_no_tlvs() {
        let client: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let header = encode(ProxyProtocol::V2, client, local, Some(&facts(None)));
        let kinds: Vec<u8> = tlvs(&header).iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, vec![0x20]);
        assert_eq!(header_tls(&header).unwrap().authority, None);
        let plain = encode(ProxyProtocol::V2, client, local, None);
        assert!(tlvs(&plain).is_empty());
        assert_eq!(header_tls(&plain), None);
        assert_eq!(
            encode(
                ProxyProtocol::V1,
                client,
                local,
                Some(&facts(Some("x.test")))
            ),
            encode(ProxyProtocol::V1, client, local, None)
        );
    }
}
