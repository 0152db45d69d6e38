//! Connecting to the real receiver: servers in order, each within
//! `connect_timeout`, then the optional PROXY header. Called only after the
//! client was admitted and greeted, so refused clients never cost the
//! receiver a connection.
//!
//! The receiver check ([`check_loop`]) makes sure the receiver agrees on the
//! PROXY header, at start and every [`CHECK_INTERVAL`]: a mismatch costs
//! every client either a long wait and `421` (receiver expects a header we
//! do not send) or replies out of step (receiver takes our header for a
//! command), and nothing else would show it. `/readyz` answers from the
//! latest check, so probes do not cost the receiver a connection each.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use std::sync::Arc;

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
            // `upstream_up` goes back to 1 only when the receiver check
            // passes: a receiver that accepts TCP may still disagree on PROXY.
            Ok(stream) => return Ok(stream),
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

/// How often the receiver check runs (and so how often the receiver logs
/// one short connection from mailmoat).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How long the check waits for the greeting, and then for the answer to
/// `QUIT`. Postfix waits `smtpd_upstream_proxy_timeout` (5s) for a header
/// it expects, greeting nobody meanwhile.
pub const CHECK_REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Lines of one reply read before giving up on its end.
const CHECK_MAX_LINES: usize = 64;
const CHECK_MAX_LINE: u64 = 1024;

/// What the receiver check found on one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    Unreachable(String),
    /// No greeting though no header was sent: the receiver waits for one.
    ExpectsHeader,
    /// The receiver answered the header as a command.
    RejectsHeader(String),
    /// Anything else that is not a working SMTP receiver.
    Broken(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Unreachable(e) => write!(f, "unreachable: {e}"),
            Problem::ExpectsHeader => write!(
                f,
                "the receiver sent no greeting within {}s to a connection without a PROXY \
                 header: it expects one. Set upstream.proxy_protocol = \"v2\" (recommended), \
                 or remove smtpd_upstream_proxy_protocol from the Postfix listener (master.cf)",
                CHECK_REPLY_TIMEOUT.as_secs()
            ),
            Problem::RejectsHeader(reply) => write!(
                f,
                "the receiver answered the PROXY header with {reply:?}: it does not expect \
                 one. Add `-o smtpd_upstream_proxy_protocol=haproxy` to the Postfix listener \
                 mailmoat relays to (master.cf), or set upstream.proxy_protocol = \"off\" \
                 (then Postfix sees every client as mailmoat's address)"
            ),
            Problem::Broken(e) => write!(f, "{e}"),
        }
    }
}

/// The latest verdict of the receiver check, for `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Problems by server; ready while at least one server has none.
    pub problems: Vec<(String, Problem)>,
    pub ready: bool,
}

/// Holds the latest [`Verdict`]; `None` until the first check ends.
pub struct Health {
    latest: watch::Sender<Option<Verdict>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            latest: watch::Sender::new(None),
        }
    }
}

impl Health {
    /// The latest verdict, waiting up to `limit` for the first one.
    pub async fn verdict(&self, limit: Duration) -> Option<Verdict> {
        let mut rx = self.latest.subscribe();
        let result = timeout(limit, rx.wait_for(Option::is_some)).await;
        match result {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    }
}

/// Checks every server now and then every [`CHECK_INTERVAL`], publishing
/// the verdict in `health` and `mailmoat_upstream_up`, and logging each
/// server's problem once when it appears and once when it is gone.
/// `current` gives the upstream settings in force now, so a reload that
/// changes `[upstream]` is checked from the next tick on.
pub async fn check_loop(
    current: impl Fn() -> UpstreamSettings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) {
    let mut known: HashMap<String, Option<Problem>> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let settings = current();
        known.retain(|name, _| settings.servers.iter().any(|s| s.to_string() == *name));
        let mut problems = Vec::new();
        let mut ready = false;
        for server in &settings.servers {
            let name = server.to_string();
            let found = check(&settings, server.addr).await.err();
            metrics.upstream_result(&name, found.is_none());
            let before = known.insert(name.clone(), found.clone());
            if before.as_ref() != Some(&found) {
                report(&name, before.flatten().as_ref(), found.as_ref());
            }
            match found {
                None => ready = true,
                Some(p) => problems.push((name, p)),
            }
        }
        health
            .latest
            .send_replace(Some(Verdict { problems, ready }));
    }
}

fn report(server: &str, before: Option<&Problem>, now: Option<&Problem>) {
    match now {
        Some(p @ Problem::Unreachable(_)) => {
            tracing::warn!(upstream = %server, "receiver check: {p}")
        }
        Some(p) => tracing::error!(upstream = %server, "receiver check: {p}"),
        None if before.is_some() => {
            tracing::info!(upstream = %server, "receiver check passes again")
        }
        None => tracing::debug!(upstream = %server, "receiver check passes"),
    }
}

/// Logs a warning when the receiver cannot learn the real client: with
/// PROXY off it sees mailmoat's own address, and a loopback one is in
/// Postfix's default `mynetworks` (Debian's too), which may relay anywhere.
pub fn warn_if_clients_look_local(settings: &UpstreamSettings) {
    if settings.proxy_protocol != ProxyProtocol::Off {
        return;
    }
    for server in settings
        .servers
        .iter()
        .filter(|s| s.addr.ip().is_loopback())
    {
        tracing::warn!(
            upstream = %server,
            "upstream.proxy_protocol = \"off\" with a loopback upstream: the receiver sees \
             every client as a loopback address, which Postfix's default mynetworks trusts \
             to relay mail anywhere. Set upstream.proxy_protocol = \"v2\" with \
             `-o smtpd_upstream_proxy_protocol=haproxy` on the Postfix listener, or take \
             127.0.0.0/8 and [::1] out of mynetworks"
        );
    }
}

/// The cheapest exchange the receiver logs least: the health-check PROXY
/// header (v2 `LOCAL`, v1 `UNKNOWN`, none when off), the greeting, `QUIT`.
pub async fn check(settings: &UpstreamSettings, server: SocketAddr) -> Result<(), Problem> {
    let mut stream = timeout(settings.connect_timeout, TcpStream::connect(server))
        .await
        .map_err(|_| Problem::Unreachable("connect timed out".into()))?
        .map_err(|e| Problem::Unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let header = proxy_protocol::health_check(settings.proxy_protocol);
    let sent_header = !header.is_empty();
    let deadline = Instant::now() + CHECK_REPLY_TIMEOUT;
    match timeout_at(deadline, stream.write_all(&header)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Problem::Broken(format!("sending the PROXY header: {e}"))),
        Err(_) => return Err(Problem::Broken("sending the PROXY header timed out".into())),
    }
    let mut reader = BufReader::new(stream);
    let greeting = match read_reply(&mut reader, deadline).await {
        Ok(Some(reply)) => reply,
        // Silence, or a close without a word, is how a receiver waiting
        // for a header answers none; a reset or other error is not advice
        // about PROXY.
        Ok(None) if !sent_header => return Err(Problem::ExpectsHeader),
        Err(e) if !sent_header && e.kind() == std::io::ErrorKind::TimedOut => {
            return Err(Problem::ExpectsHeader)
        }
        Ok(None) => return Err(Problem::Broken("closed without a greeting".into())),
        Err(e) => return Err(Problem::Broken(format!("no greeting: {e}"))),
    };
    if !greeting.starts_with("220") {
        return Err(Problem::Broken(format!("greeted with {greeting:?}")));
    }
    let deadline = Instant::now() + CHECK_REPLY_TIMEOUT;
    match timeout_at(deadline, reader.get_mut().write_all(b"QUIT\r\n")).await {
        Ok(Ok(())) => {}
        _ => return Err(Problem::Broken("sending QUIT failed".into())),
    }
    // A plain smtpd answers the header's lines (v2's signature ends in
    // `QUIT\n`, so it may say 221 itself, after its 500s) before our QUIT:
    // any first answer but 221 means it read the header as commands.
    match read_reply(&mut reader, deadline).await {
        Ok(Some(reply)) if reply.starts_with("221") => Ok(()),
        Ok(Some(reply)) if sent_header => Err(Problem::RejectsHeader(reply)),
        Ok(Some(reply)) => Err(Problem::Broken(format!("answered QUIT with {reply:?}"))),
        Ok(None) => Err(Problem::Broken("closed without answering QUIT".into())),
        Err(e) => Err(Problem::Broken(format!("no answer to QUIT: {e}"))),
    }
}

/// One SMTP reply (its last line), `None` at end of stream, by `deadline`.
async fn read_reply(
    reader: &mut BufReader<TcpStream>,
    deadline: Instant,
) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    for _ in 0..CHECK_MAX_LINES {
        line.clear();
        let mut limited = (&mut *reader).take(CHECK_MAX_LINE);
        let n = timeout_at(deadline, limited.read_until(b'\n', &mut line))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
        if n == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        // `250-` continues a reply; `250 ` or a bare code ends it.
        if text.as_bytes().get(3) != Some(&b'-') {
            return Ok(Some(text));
        }
    }
    Err(std::io::Error::other("reply too long"))
}
