//! PROXY protocol headers (HAProxy v1 text, v2 binary) via the `ppp` crate.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Version};

use crate::config::ProxyProtocol;

/// The header that tells the receiver `client` connected to `local`.
/// Both addresses are put in the client's family, as the header requires one.
pub fn encode(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let client = canonical(client);
    let local = same_family(canonical(local), client);
    match version {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => ppp::v1::Addresses::from((client, local))
            .to_string()
            .into_bytes(),
        ProxyProtocol::V2 => Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (client, local),
        )
        .build()
        .expect("an address-only PROXY v2 header always fits"),
    }
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
    fn v1_and_v2_headers_carry_the_client() {
        let client: SocketAddr = "127.0.0.2:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:2525".parse().unwrap();
        let v1 = encode(ProxyProtocol::V1, client, local);
        assert_eq!(v1, b"PROXY TCP4 127.0.0.2 127.0.0.1 4000 2525\r\n");
        let v2 = encode(ProxyProtocol::V2, client, local);
        match ppp::HeaderResult::parse(&v2) {
            ppp::HeaderResult::V2(Ok(h)) => {
                assert_eq!(h.addresses, ppp::v2::Addresses::from((client, local)))
            }
            other => panic!("not a v2 header: {other:?}"),
        }
        let mapped: SocketAddr = "[::ffff:127.0.0.2]:4000".parse().unwrap();
        let v6_local: SocketAddr = "[::1]:2525".parse().unwrap();
        assert_eq!(
            encode(ProxyProtocol::V1, mapped, v6_local),
            b"PROXY TCP4 127.0.0.2 0.0.0.0 4000 2525\r\n"
        );
    }
}
