//! Connecting to the real receiver: servers in order, each within
//! `connect_timeout`, then the optional PROXY header. Called only after the
//! client was admitted and greeted, so refused clients never cost the
//! receiver a connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::{ProxyProtocol, UpstreamSettings};
use crate::metrics::Metrics;
use crate::proxy_protocol;

#[derive(Debug, thiserror::Error)]
#[error("no upstream reachable (tried {tried}); last error: {last}")]
pub struct UpstreamError {
    tried: usize,
    last: String,
}

/// Connects to the first upstream that answers, sending the PROXY header
/// for `client` (who connected to our `local` address) when configured.
pub async fn connect(
    settings: &UpstreamSettings,
    client: SocketAddr,
    local: SocketAddr,
    write_timeout: Duration,
    metrics: &Metrics,
) -> Result<TcpStream, UpstreamError> {
    let mut last = String::from("no servers configured");
    for server in &settings.servers {
        match connect_one(settings, server.addr, client, local, write_timeout).await {
            Ok(stream) => {
                metrics.upstream_result(&server.to_string(), true);
                return Ok(stream);
            }
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
    settings: &UpstreamSettings,
    server: SocketAddr,
    client: SocketAddr,
    local: SocketAddr,
    write_timeout: Duration,
) -> std::io::Result<TcpStream> {
    let mut stream = timeout(settings.connect_timeout, TcpStream::connect(server))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    if settings.proxy_protocol != ProxyProtocol::Off {
        let header = proxy_protocol::encode(settings.proxy_protocol, client, local);
        timeout(write_timeout, stream.write_all(&header))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "PROXY header write timed out")
            })??;
    }
    Ok(stream)
}

/// True when any upstream accepts a TCP connection within `limit`. A
/// receiver that expects a PROXY header gets a health-check one (v2 LOCAL,
/// v1 UNKNOWN), so probes do not show up as protocol errors in its log.
pub async fn probe(settings: &UpstreamSettings, limit: Duration) -> bool {
    let hello = proxy_protocol::health_check(settings.proxy_protocol);
    for server in &settings.servers {
        let wait = settings.connect_timeout.min(limit);
        if let Ok(Ok(mut stream)) = timeout(wait, TcpStream::connect(server.addr)).await {
            let _ = timeout(wait, stream.write_all(&hello)).await;
            return true;
        }
    }
    false
}
