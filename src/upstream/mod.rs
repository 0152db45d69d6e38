//! Connecting to the real receiver: servers in order, each within
//! `connect_timeout`, then the optional PROXY header, then, with
//! `tls = "starttls"`, mailmoat's own STARTTLS ([`starttls`]). Called only
//! after the client was admitted and greeted, so refused clients never cost
//! the receiver a connection.
//!
//! A [`Connector`] holds every upstream table of one config, each with its
//! rustls client built once (at start and at each reload), so a bad CA file
//! is a config error and no client pays for parsing it. The receiver check
//! ([`check_loop`]) is in `check.rs`.

mod check;
mod starttls;
mod stream;
pub mod verify;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

pub use check::{
    check, check_loop, warn_if_clients_look_local, Health, Problem, Verdict, CHECK_INTERVAL,
    CHECK_REPLY_TIMEOUT,
};
pub use starttls::{StarttlsError, TlsClient, TlsClientError};
pub use stream::{close, UpstreamStream, UPSTREAM_LINGER};
use tokio_util::either::Either;

use crate::config::{Config, ListenerSettings, Protocol, UpstreamSettings, UpstreamTls};
use crate::metrics::Metrics;
use crate::proxy_protocol;
use crate::tls::TlsFacts;
use starttls::Replies;

#[derive(Debug, thiserror::Error)]
#[error("no upstream reachable (tried {tried}); last error: {last}")]
pub struct UpstreamError {
    tried: usize,
    last: String,
}

/// One upstream table, ready to connect.
#[derive(Debug)]
pub struct Upstream {
    /// The table in the file: `upstream` or `upstreams.NAME`.
    pub key: String,
    pub settings: UpstreamSettings,
    /// What its receivers speak: the protocol of the listeners that relay
    /// to it (one, by config validation); the receiver check speaks it.
    pub protocol: Protocol,
    /// The name mailmoat gives in its own EHLO (`server.hostname`).
    hostname: String,
    /// With `tls = "starttls"`.
    tls: Option<TlsClient>,
}

impl Upstream {
    pub fn new(
        key: &str,
        settings: &UpstreamSettings,
        protocol: Protocol,
        hostname: &str,
    ) -> Result<Upstream, TlsClientError> {
        let tls = match settings.tls {
            UpstreamTls::None => None,
            UpstreamTls::Starttls => Some(TlsClient::new(settings, key)?),
        };
        Ok(Upstream {
            key: key.to_string(),
            settings: settings.clone(),
            protocol,
            hostname: hostname.to_string(),
            tls,
        })
    }
}

/// Every upstream of one config.
#[derive(Debug)]
pub struct Connector {
    default: Arc<Upstream>,
    named: BTreeMap<String, Arc<Upstream>>,
    /// The upstreams some listener relays to, each once, `[upstream]`
    /// first: what the receiver check checks.
    in_use: Vec<Arc<Upstream>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{}", one_per_line(.problems))]
pub struct ConnectorError {
    /// Each names its key and file.
    pub problems: Vec<TlsClientError>,
}

fn one_per_line(problems: &[TlsClientError]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

impl Connector {
    /// Builds every upstream of `config`, reporting every problem at once.
    pub fn new(config: &Config) -> Result<Connector, ConnectorError> {
        let hostname = &config.server.hostname;
        let mut problems = Vec::new();
        let listeners = config.all_listeners();
        let mut build = |key: &str, settings: &UpstreamSettings, name: Option<&str>| {
            let protocol = listeners
                .iter()
                .find(|l| name.is_some() && l.upstream.as_deref() == name)
                .map_or(Protocol::Smtp, |l| l.protocol);
            Upstream::new(key, settings, protocol, hostname)
                .map(Arc::new)
                .map_err(|e| problems.push(e))
                .ok()
        };
        let default = build("upstream", &config.upstream, None);
        let named: BTreeMap<String, Arc<Upstream>> = config
            .upstreams
            .iter()
            .filter_map(|(name, s)| {
                let upstream = build(&format!("upstreams.{name}"), s, Some(name))?;
                Some((name.clone(), upstream))
            })
            .collect();
        let Some(default) = default.filter(|_| problems.is_empty()) else {
            return Err(ConnectorError { problems });
        };
        let mut in_use: Vec<Arc<Upstream>> = Vec::new();
        for listener in listeners {
            let upstream = pick(&default, &named, &listener);
            if !in_use.iter().any(|u| Arc::ptr_eq(u, upstream)) {
                in_use.push(upstream.clone());
            }
        }
        in_use.sort_by_key(|u| u.key != "upstream");
        Ok(Connector {
            default,
            named,
            in_use,
        })
    }

    /// The upstream `listener` relays to.
    pub fn for_listener(&self, listener: &ListenerSettings) -> &Arc<Upstream> {
        pick(&self.default, &self.named, listener)
    }

    /// The upstreams some listener relays to, each once.
    pub fn in_use(&self) -> &[Arc<Upstream>] {
        &self.in_use
    }
}

fn pick<'a>(
    default: &'a Arc<Upstream>,
    named: &'a BTreeMap<String, Arc<Upstream>>,
    listener: &ListenerSettings,
) -> &'a Arc<Upstream> {
    listener
        .upstream
        .as_ref()
        .and_then(|name| named.get(name))
        .unwrap_or(default)
}

/// A connection to the receiver, ready for the client's first command.
#[derive(Debug)]
pub struct Connected {
    pub stream: UpstreamStream,
    /// The receiver's greeting when mailmoat had to read it (STARTTLS);
    /// the client must get it before anything else. Empty otherwise: the
    /// greeting is still to be read from `stream`.
    pub greeting: Vec<u8>,
}

/// Connects to the first server of `upstream` that answers, sending the
/// PROXY header for `client` (who connected to our `local` address, over
/// TLS when `tls` is given) when configured.
pub async fn connect(
    upstream: &Upstream,
    client: SocketAddr,
    local: SocketAddr,
    tls: Option<&TlsFacts>,
    write_timeout: Duration,
    metrics: &Metrics,
) -> Result<Connected, UpstreamError> {
    let settings = &upstream.settings;
    let mut last = String::from("no servers configured");
    for server in &settings.servers {
        let header = proxy_protocol::encode(settings.proxy_protocol, client, local, tls);
        match connect_one(upstream, server.addr, &header, write_timeout).await {
            // `upstream_up` goes back to 1 only when the receiver check
            // passes: a receiver that accepts TCP may still disagree on PROXY.
            Ok(connected) => return Ok(connected),
            Err(e) => {
                tracing::warn!(upstream = %server, error = %e, "upstream connect failed");
                metrics.upstream_result(&server.to_string(), false);
                last = format!("{server}: {e}");
            }
        }
    }
    Err(UpstreamError {
        tried: settings.servers.len(),
        last,
    })
}

async fn connect_one(
    upstream: &Upstream,
    server: SocketAddr,
    header: &[u8],
    write_timeout: Duration,
) -> Result<Connected, StarttlsError> {
    let settings = &upstream.settings;
    // With STARTTLS, connect_timeout bounds the whole exchange.
    let deadline = Instant::now() + settings.connect_timeout;
    let stream = tcp_connect(server, settings.connect_timeout, header, write_timeout).await?;
    let Some(tls) = &upstream.tls else {
        return Ok(Connected {
            stream: Either::Left(stream),
            greeting: Vec::new(),
        });
    };
    let mut replies = Replies::new(stream);
    let greeting = replies.expect_reply(deadline).await?;
    // A receiver that refuses at the greeting (busy, 421) gets nothing in
    // the clear: the next server is tried, the client told to come back.
    if greeting.code != 220 {
        return Err(StarttlsError::Greeting(starttls::last_line(&greeting)));
    }
    let stream = starttls::upgrade(replies, tls, &upstream.hostname, deadline).await?;
    Ok(Connected {
        stream: Either::Right(Box::new(stream)),
        greeting: greeting.raw,
    })
}

/// Connects to `server` within `within` and sends `header` (the PROXY
/// header; empty without one) within `write_timeout`.
///
/// On loopback and on a fast network the handshake is over by the time the
/// non-blocking connect returns, so the header is written at once: waiting
/// first for the socket to report writable cost a reactor turn and a
/// `getsockopt` per connection. When the write would block, the connection
/// is still opening: it waits for that as usual.
async fn tcp_connect(
    server: SocketAddr,
    within: Duration,
    header: &[u8],
    write_timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = mio::net::TcpStream::connect(server)?;
    socket.set_nodelay(true)?;
    let sent = if header.is_empty() {
        0
    } else {
        match std::io::Write::write(&mut &socket, header) {
            Ok(n) => n,
            // Still opening: Linux says EAGAIN, the BSDs ENOTCONN.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::NotConnected
                ) =>
            {
                0
            }
            Err(e) => return Err(e),
        }
    };
    let mut stream = TcpStream::from_std(socket.into())?;
    if sent == 0 {
        timeout(within, stream.writable()).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
        })??;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    if sent < header.len() {
        timeout(write_timeout, stream.write_all(&header[sent..]))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "PROXY header write timed out")
            })??;
    }
    Ok(stream)
}

#[cfg(test)]
mod tests;
