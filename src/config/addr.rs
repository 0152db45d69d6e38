//! Upstream addresses as the operator wrote them (`localhost:10025`),
//! resolved once when the config is loaded, and the check that mailmoat is
//! not told to relay to itself.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

use serde::Serialize;

/// One address of an upstream. `name` is the text from the file (printed
/// back by `check-config`, so the effective config loads again unchanged);
/// a host name resolving to several addresses gives one entry for each, in
/// the resolver's order, and they are tried in turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub name: String,
    pub addr: SocketAddr,
}

impl From<SocketAddr> for UpstreamAddr {
    fn from(addr: SocketAddr) -> UpstreamAddr {
        UpstreamAddr {
            name: addr.to_string(),
            addr,
        }
    }
}

/// The address, as logs and the `server` metric label show it.
impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// Serializes a server list as written: each name once, in order.
pub fn serialize_names<S: serde::Serializer>(
    servers: &[UpstreamAddr],
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut names: Vec<&str> = Vec::new();
    for server in servers {
        if names.last() != Some(&server.name.as_str()) {
            names.push(&server.name);
        }
    }
    names.serialize(s)
}

/// Turns `host:port` into addresses; the system resolver at load time,
/// something offline in tests and fuzzing.
pub type Resolve<'a> = &'a dyn Fn(&str) -> Result<Vec<SocketAddr>, String>;

/// The system resolver (`/etc/hosts`, then DNS).
pub fn system_resolve(text: &str) -> Result<Vec<SocketAddr>, String> {
    text.to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| e.to_string())
}

/// Parses `IP:port`, or resolves `host:port` with `resolve`.
pub fn upstream(text: &str, resolve: Resolve<'_>) -> Result<Vec<UpstreamAddr>, String> {
    const FORM: &str =
        "write IP:port or host:port, e.g. \"127.0.0.1:25\", \"[::1]:25\" or \"mx.internal:25\"";
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![UpstreamAddr {
            name: text.to_string(),
            addr,
        }]);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("no port; {FORM}"));
    };
    if host.is_empty() || host.contains([':', '[', ']']) || port.parse::<u16>().is_err() {
        return Err(format!("not an address; {FORM}"));
    }
    let addrs = resolve(text).map_err(|e| {
        format!("cannot resolve {host:?} ({e}); names are resolved when the config is loaded, so fix the name or write the IP")
    })?;
    if addrs.is_empty() {
        return Err(format!("{host:?} resolves to no address; {FORM}"));
    }
    Ok(addrs
        .into_iter()
        .map(|addr| UpstreamAddr {
            name: text.to_string(),
            addr,
        })
        .collect())
}

/// True when a connection to `upstream` would reach the listener `listen`:
/// the same address, or a wildcard listener (`0.0.0.0:P`, `[::]:P`) and any
/// address of this host on port P.
pub fn reaches(listen: SocketAddr, upstream: SocketAddr) -> bool {
    let upstream = SocketAddr::new(upstream.ip().to_canonical(), upstream.port());
    if listen.port() == 0 || listen.port() != upstream.port() {
        return false;
    }
    if listen == upstream {
        return true;
    }
    // Listeners bind one family each (`listener::bind` sets IPV6_V6ONLY).
    listen.ip().is_unspecified()
        && listen.is_ipv4() == upstream.is_ipv4()
        && is_local(upstream.ip())
}

/// An address of this host: only those can be bound.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_upstream_reaches_its_own_listener_and_wildcards_on_the_same_port() {
        assert!(reaches(addr("127.0.0.1:2525"), addr("127.0.0.1:2525")));
        assert!(reaches(addr("0.0.0.0:2525"), addr("127.0.0.1:2525")));
        assert!(reaches(addr("0.0.0.0:2525"), addr("127.0.0.5:2525")));
        assert!(reaches(addr("[::]:2525"), addr("[::1]:2525")));
        assert!(reaches(
            addr("127.0.0.1:2525"),
            addr("[::ffff:127.0.0.1]:2525")
        ));
        assert!(!reaches(addr("127.0.0.1:2525"), addr("127.0.0.1:25")));
        assert!(!reaches(addr("127.0.0.1:2525"), addr("127.0.0.2:2525")));
        assert!(!reaches(addr("[::]:2525"), addr("127.0.0.1:2525")));
        // A receiver on another host, on the port mailmoat listens on.
        assert!(!reaches(addr("0.0.0.0:25"), addr("192.0.2.10:25")));
        assert!(!reaches(addr("127.0.0.1:0"), addr("127.0.0.1:0")));
    }

    #[test]
    fn upstream_names_resolve_and_keep_what_was_written() {
        let fake = |text: &str| -> Result<Vec<SocketAddr>, String> {
            match text {
                "mx.test:25" => Ok(vec![addr("[::1]:25"), addr("127.0.0.1:25")]),
                _ => Err("unknown host".into()),
            }
        };
        let got = upstream("mx.test:25", &fake).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|u| u.name == "mx.test:25"));
        assert_eq!(got[1].addr, addr("127.0.0.1:25"));
        assert_eq!(
            upstream("[::1]:25", &fake).unwrap()[0].addr,
            addr("[::1]:25")
        );
        assert!(upstream("nowhere.test:25", &fake)
            .unwrap_err()
            .contains("cannot resolve"));
        assert!(upstream("mx.test", &fake).unwrap_err().contains("no port"));
        assert!(upstream("mx.test:port", &fake).is_err());
        assert!(upstream(":25", &fake).is_err());
    }
}
