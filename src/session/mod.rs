//! One client session: from an accepted socket to its one close reason.
//!
//! `serve` is the lifecycle (connect upstream, relay, record the end);
//! [`relay`] is the SMTP-aware loop. Generic over the client stream so the
//! relay is tested over `tokio::io::duplex`.

mod close;
pub mod io;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use close::CloseReason;
use relay::Relay;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream;

/// What every session shares with the process.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Stop at the next quiet point (graceful shutdown).
    pub drain: CancellationToken,
    /// Stop now (the shutdown grace ran out).
    pub abort: CancellationToken,
}

/// Who is talking to whom, fixed at accept.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The client, after any trusted PROXY header.
    pub client: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
}

/// Serves one admitted client until it ends; returns the recorded reason.
/// `config` is the snapshot taken at accept: one view for the whole session.
pub async fn serve<C>(
    mut client: C,
    peer: Peer,
    config: Arc<Config>,
    shared: &Shared,
) -> CloseReason
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let session_deadline = started + config.timeouts.session;
    let metrics = &shared.metrics;
    metrics.active_sessions.inc();

    let (reason, facts) = match upstream::connect(
        &config.upstream,
        peer.client,
        peer.local,
        config.timeouts.write,
        metrics,
    )
    .await
    {
        Ok(upstream) => {
            let mut relay = Relay::new(
                &mut client,
                upstream,
                &config,
                metrics,
                &shared.drain,
                &shared.abort,
                session_deadline,
            );
            // Boxed so the relay's state is allocated only for admitted,
            // connected sessions, not for every socket waiting to get here.
            let reason = Box::pin(relay.run()).await;
            (reason, relay.facts)
        }
        Err(e) => {
            tracing::warn!(client = %peer.client, error = %e, "no upstream for client");
            let reply = format!(
                "421 4.3.2 {} service temporarily unavailable, try again later\r\n",
                config.server.hostname
            );
            write_refusal(&mut client, reply.as_bytes(), config.timeouts.write).await;
            (CloseReason::UpstreamError, relay::RelayFacts::default())
        }
    };

    let duration = started.elapsed();
    metrics.active_sessions.dec();
    metrics.session_closed(reason);
    metrics.session_duration.observe(duration.as_secs_f64());
    tracing::info!(
        client = %peer.client.ip(),
        reason = reason.as_str(),
        duration_ms = duration.as_millis() as u64,
        bytes_in = facts.bytes_from_client,
        bytes_out = facts.bytes_to_client,
        commands = facts.commands,
        messages = facts.messages,
        "session closed"
    );
    reason
}

/// Writes a one-line refusal with a short deadline; a client that does not
/// read cannot hold the proxy.
pub async fn write_refusal<C: AsyncWrite + Unpin>(client: &mut C, reply: &[u8], write: Duration) {
    let mut bytes = reply.to_vec();
    let deadline = write.min(Duration::from_secs(2));
    let _ = io::write_all_within(client, &mut bytes, deadline).await;
}
