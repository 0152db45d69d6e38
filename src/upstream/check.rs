//! The receiver check ([`check_loop`]) makes sure each receiver a listener
//! relays to agrees on the PROXY header and, with `tls = "starttls"`, offers
//! STARTTLS with a certificate that verifies, at start and every
//! [`CHECK_INTERVAL`]: a mismatch costs every client either a long wait and
//! `421` (receiver expects a header we do not send), replies out of step
//! (receiver takes our header for a command) or a `421` after a failed
//! handshake, and nothing else would show it. `/readyz` answers from the
//! latest check, so probes do not cost the receiver a connection each.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use super::starttls::{self, last_line, Replies, StarttlsError};
use super::{Connector, Upstream};
use crate::config::{Protocol, ProxyProtocol, UpstreamSettings};
use crate::metrics::Metrics;
use crate::proxy_protocol;

/// How often the receiver check runs (and so how often the receiver logs
/// one short connection from mailmoat).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How long the check waits for the greeting, and then for the answer to
/// `QUIT`. Postfix waits `smtpd_upstream_proxy_timeout` (5s) for a header
/// it expects, greeting nobody meanwhile.
pub const CHECK_REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// What the receiver check found on one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    Unreachable(String),
    /// No greeting though no header was sent: the receiver waits for one.
    ExpectsHeader,
    /// The receiver answered the header as a command.
    RejectsHeader(String),
    /// STARTTLS not offered, or a certificate that does not verify.
    Tls(String),
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
            Problem::Tls(e) | Problem::Broken(e) => write!(f, "{e}"),
        }
    }
}

/// The latest verdict of the receiver check, for `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Problems by server (`ADDR (TABLE)`).
    pub problems: Vec<(String, Problem)>,
    /// Ready while every upstream in use has a server without problems.
    pub ready: bool,
    /// The upstream tables (`upstream`, `upstreams.NAME`) with no server
    /// that passes.
    pub unready: Vec<String>,
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

/// Checks every server of every upstream in use now and then every
/// [`CHECK_INTERVAL`], publishing the verdict in `health` and
/// `mailmoat_upstream_up`, and logging each server's problem once when it
/// appears and once when it is gone. `current` gives the upstreams in force
/// now, so a reload that changes them is checked from the next tick on.
pub async fn check_loop(
    current: impl Fn() -> Arc<Connector>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) {
    let mut known: HashMap<String, Option<Problem>> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let connector = current();
        let label = |upstream: &Upstream, server: &dyn std::fmt::Display| {
            format!("{server} ({})", upstream.key)
        };
        known.retain(|name, _| {
            connector
                .in_use()
                .iter()
                .any(|u| u.settings.servers.iter().any(|s| label(u, s) == *name))
        });
        let mut problems = Vec::new();
        let mut unready = Vec::new();
        for upstream in connector.in_use() {
            let mut ready = false;
            for server in &upstream.settings.servers {
                let name = label(upstream, server);
                let found = check(upstream, server.addr).await.err();
                metrics.upstream_result(&server.to_string(), found.is_none());
                let before = known.insert(name.clone(), found.clone());
                if before.as_ref() != Some(&found) {
                    report(&name, before.flatten().as_ref(), found.as_ref());
                }
                match found {
                    None => ready = true,
                    Some(p) => problems.push((name, p)),
                }
            }
            if !ready {
                unready.push(upstream.key.clone());
            }
        }
        health.latest.send_replace(Some(Verdict {
            problems,
            ready: unready.is_empty(),
            unready,
        }));
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
/// header (v2 `LOCAL`, v1 `UNKNOWN`, none when off), the greeting, with
/// `tls = "starttls"` EHLO, STARTTLS and the handshake, then `QUIT`.
pub async fn check(upstream: &Upstream, server: SocketAddr) -> Result<(), Problem> {
    let settings = &upstream.settings;
    let stream = timeout(settings.connect_timeout, TcpStream::connect(server))
        .await
        .map_err(|_| Problem::Unreachable("connect timed out".into()))?
        .map_err(|e| Problem::Unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let header = proxy_protocol::health_check(settings.proxy_protocol);
    if upstream.protocol != Protocol::Smtp {
        return check_mailbox(stream, &header, upstream).await;
    }
    let sent_header = !header.is_empty();
    let deadline = Instant::now() + CHECK_REPLY_TIMEOUT;
    let mut replies = Replies::new(stream);
    if let Err(e) = replies.send(&header, deadline).await {
        return Err(Problem::Broken(format!("sending the PROXY header: {e}")));
    }
    let greeting = match replies.next(deadline).await {
        Ok(Some(reply)) => last_line(&reply),
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
    match &upstream.tls {
        None => quit(replies, sent_header, deadline).await,
        Some(tls) => {
            let stream = match starttls::upgrade(replies, tls, &upstream.hostname, deadline).await {
                Ok(stream) => stream,
                // As QUIT below: the header's lines were answered first.
                Err(StarttlsError::Ehlo(reply)) if sent_header => {
                    return Err(Problem::RejectsHeader(reply))
                }
                Err(e) => return Err(Problem::Tls(e.to_string())),
            };
            let deadline = Instant::now() + CHECK_REPLY_TIMEOUT;
            quit(Replies::new(stream), false, deadline).await
        }
    }
}

/// The receiver check of an IMAP or POP3 receiver (Dovecot): the header,
/// the greeting, then `LOGOUT` or `QUIT` and its answer.
async fn check_mailbox(
    stream: TcpStream,
    header: &[u8],
    upstream: &Upstream,
) -> Result<(), Problem> {
    let imap = upstream.protocol == Protocol::Imap;
    let deadline = Instant::now() + CHECK_REPLY_TIMEOUT;
    let mut lines = Lines::new(stream);
    lines
        .send(header, deadline)
        .await
        .map_err(|e| Problem::Broken(format!("sending the PROXY header: {e}")))?;
    let greeting = match lines.next(deadline).await {
        Ok(Some(line)) => line,
        Ok(None) | Err(_) if header.is_empty() => {
            return Err(Problem::Broken(format!(
                "the receiver sent no greeting within {}s to a connection without a PROXY \
                 header: it expects one. Set {}.proxy_protocol = \"v2\" (recommended), or \
                 remove haproxy = yes from Dovecot's inet_listener",
                CHECK_REPLY_TIMEOUT.as_secs(),
                upstream.key
            )))
        }
        Ok(None) => return Err(Problem::Broken("closed without a greeting".into())),
        Err(e) => return Err(Problem::Broken(format!("no greeting: {e}"))),
    };
    let greeted = if imap {
        greeting.starts_with("* OK") || greeting.starts_with("* PREAUTH")
    } else {
        greeting.starts_with("+OK")
    };
    if !greeted && !header.is_empty() {
        return Err(Problem::Broken(format!(
            "the receiver answered the PROXY header with {greeting:?}: set haproxy = yes on \
             Dovecot's inet_listener and haproxy_trusted_networks to mailmoat's address, or \
             {}.proxy_protocol = \"off\" (then Dovecot sees every client as mailmoat)",
            upstream.key
        )));
    }
    if !greeted {
        return Err(Problem::Broken(format!("greeted with {greeting:?}")));
    }
    let (bye, done): (&[u8], &str) = if imap {
        (b"m1 LOGOUT\r\n", "m1 OK")
    } else {
        (b"QUIT\r\n", "+OK")
    };
    let deadline = Instant::now() + CHECK_REPLY_TIMEOUT;
    lines
        .send(bye, deadline)
        .await
        .map_err(|e| Problem::Broken(format!("sending {:?}: {e}", String::from_utf8_lossy(bye))))?;
    // IMAP says `* BYE` before the tagged OK; a few lines at most.
    for _ in 0..4 {
        match lines.next(deadline).await {
            Ok(Some(line)) if line.starts_with(done) => return Ok(()),
            Ok(Some(line)) if line.starts_with("* ") => continue,
            Ok(Some(line)) => {
                return Err(Problem::Broken(format!(
                    "answered the logout with {line:?}"
                )))
            }
            Ok(None) => {
                return Err(Problem::Broken(
                    "closed without answering the logout".into(),
                ))
            }
            Err(e) => return Err(Problem::Broken(format!("no answer to the logout: {e}"))),
        }
    }
    Err(Problem::Broken("no end to the answer to the logout".into()))
}

/// A receiver's lines, each bounded, read under a deadline.
struct Lines {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// The longest line the check reads (a greeting with its capabilities).
const MAX_CHECK_LINE: usize = 4096;

impl Lines {
    fn new(stream: TcpStream) -> Lines {
        Lines {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        tokio::time::timeout_at(deadline, self.stream.write_all(bytes))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)?
    }

    /// The next line, without its ending; `None` at end of stream.
    async fn next(&mut self, deadline: Instant) -> std::io::Result<Option<String>> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.buf) {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                return Ok(Some(text.trim_end().to_string()));
            }
            if self.buf.len() >= MAX_CHECK_LINE {
                return Err(std::io::Error::other("line too long"));
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| std::io::ErrorKind::TimedOut)??;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

async fn quit<S>(
    mut replies: Replies<S>,
    sent_header: bool,
    deadline: Instant,
) -> Result<(), Problem>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if replies.send(b"QUIT\r\n", deadline).await.is_err() {
        return Err(Problem::Broken("sending QUIT failed".into()));
    }
    // A plain smtpd answers the header's lines (v2's signature ends in
    // `QUIT\n`, so it may say 221 itself, after its 500s) before our QUIT:
    // any first answer but 221 means it read the header as commands.
    match replies.next(deadline).await {
        Ok(Some(reply)) if reply.code == 221 => Ok(()),
        Ok(Some(reply)) if sent_header => Err(Problem::RejectsHeader(last_line(&reply))),
        Ok(Some(reply)) => Err(Problem::Broken(format!(
            "answered QUIT with {:?}",
            last_line(&reply)
        ))),
        Ok(None) => Err(Problem::Broken("closed without answering QUIT".into())),
        Err(e) => Err(Problem::Broken(format!("no answer to QUIT: {e}"))),
    }
}
