//! One client session: from an accepted socket to its one close reason.
//!
//! `serve` is the lifecycle (the door, TLS on an implicit listener, connect
//! upstream, relay, record the end); [`driver`] runs the relay loop over a
//! [`transport`] (plain or TLS) for a protocol module ([`smtp`]) that
//! decides what the bytes mean. Generic over the client stream so a session
//! is tested over `tokio::io::duplex`.

mod close;
pub mod driver;
#[cfg(test)]
mod fixture;
mod greeting;
pub mod imap;
pub mod io;
pub mod login;
pub mod message;
pub mod pop3;
pub mod protocol;
pub mod registry;
pub mod smtp;
#[cfg(test)]
mod tests;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

pub use close::CloseReason;
use driver::{Driver, DriverContext};
use greeting::GreetOutcome;
use imap::Imap;
use login::{LoginContext, MailboxContext};
use pop3::Pop3;
use protocol::SessionFacts;
use smtp::{Smtp, SmtpContext};
use transport::Transport;

use crate::admission::{Admission, Permit, Refusal};
use crate::bans::BanEvent;
use crate::blocklist::Blocklist;
use crate::config::{BlockAction, Config, ListenerSettings, Protocol, TlsMode};
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, Inbound, Sniff};
use crate::shaping::{Limit, Shaping};
use crate::tls::{Terminator, TlsVersion};
use crate::upstream;
use registry::Registry;

/// What every session shares with the process.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
    pub shaping: Arc<Shaping>,
    pub blocklist: Arc<Blocklist>,
    /// Bounds how many blocked clients are tarpitted at once.
    pub tarpit_slots: Arc<tokio::sync::Semaphore>,
    /// Open sessions by client, for kill-on-block, `/admin/top` and the
    /// graceful drain at shutdown.
    pub registry: Arc<Registry>,
    /// Terminates TLS on `starttls` and `implicit` listeners; none when no
    /// certificate is configured.
    pub tls: Option<Arc<Terminator>>,
    /// The receivers, with their TLS clients; rebuilt on reload.
    pub upstreams: Arc<upstream::Connector>,
}

/// Who is talking to whom, fixed at accept.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The client, after any trusted PROXY header.
    pub client: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
    /// A trusted proxy's own connection (PROXY `LOCAL`/`UNKNOWN`, its
    /// health check): `client` is the proxy, to which no per-IP rule, list
    /// or ban applies.
    pub proxy_check: bool,
}

/// What the door decided at accept, before any I/O.
pub enum Door {
    /// A trusted proxy: its PROXY header names the client to decide on.
    Undecided,
    Admitted(Permit),
    Refused(Refusal),
}

/// The door's decision where it needs no I/O: every client but a trusted
/// proxy's connection is admitted or refused on its address alone. Called
/// at accept, so a refusal costs no session task (see [`refuse_at_accept`]).
pub fn door(remote: SocketAddr, config: &Config, shared: &Shared) -> Door {
    let ip = remote.ip();
    if config
        .server
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&ip))
    {
        return Door::Undecided;
    }
    match shared.admission.admit(ip) {
        Ok(permit) => Door::Admitted(permit),
        Err(refusal) => Door::Refused(refusal),
    }
}

/// A refusal the accept loop can finish alone: anything but a tarpit.
pub fn finishes_at_accept(refusal: Refusal, config: &Config) -> bool {
    !matches!(
        (refusal, config.blocklist.action),
        (Refusal::Blocked, BlockAction::Tarpit)
    )
}

/// Refuses a client at accept, with no task and no registration with the
/// runtime: the reply (or nothing, for `blocklist.action = "drop"`) goes
/// out in one non-blocking send, and the socket closes when dropped. A
/// fresh connection's send buffer is empty, so the reply fits; if a
/// client's window does not take it, it is not waited for.
pub fn refuse_at_accept(
    client: &std::net::TcpStream,
    ip: std::net::IpAddr,
    refusal: Refusal,
    listener: &ListenerSettings,
    config: &Config,
    shared: &Shared,
) {
    record_refusal(&shared.shaping, ip, refusal);
    if (refusal, config.blocklist.action) == (Refusal::Blocked, BlockAction::Drop) {
        return;
    }
    let reply = refusal.reply(listener.protocol, &config.server.hostname);
    // MSG_MORE holds the reply until the shutdown, whose FIN rides in the
    // same segment: one packet instead of two, and on loopback the
    // client's side of each packet is processed in our send. MSG_NOSIGNAL
    // as std's own sends: a client gone already is EPIPE, not SIGPIPE to a
    // process that embeds this library.
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_MORE;
    let socket = socket2::SockRef::from(client);
    let sent = socket
        .send_with_flags(reply.as_bytes(), flags)
        .and_then(|_| socket.shutdown(std::net::Shutdown::Write));
    if let Err(e) = sent {
        tracing::debug!(client = %ip, error = %e, "refusal not sent");
    }
}

/// Serves one accepted connection until it ends, door and relay in one
/// task (the accept path splits them: [`enter`], then [`relay`]); returns
/// the recorded reason. `remote` is the TCP peer; `listener` and `config` are the
/// snapshot taken at accept: one view for the whole session.
pub async fn serve<C>(
    client: C,
    remote: SocketAddr,
    local: SocketAddr,
    listener: &ListenerSettings,
    config: Arc<Config>,
    shared: &Shared,
) -> CloseReason
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let door = door(remote, &config, shared);
    let entered = Box::pin(enter(
        client, remote, local, door, listener, &config, shared,
    ))
    .await;
    match entered {
        Ok(mut entered) => relay(&mut entered, listener, &config, shared).await,
        Err(reason) => reason,
    }
}

/// A client through the door: what its relay starts from.
pub struct Entered<C> {
    client: C,
    peer: Peer,
    /// What the client sent before the relay (after a PROXY header, or in
    /// a shadow-mode greet pause).
    early: Vec<u8>,
    /// Held until the relay ends, whatever ends it (dropped with this).
    _permit: Permit,
    started: Instant,
}

/// The door, from accept to admission: a trusted proxy's PROXY header,
/// the greet pause, a look at bytes sent unasked. `Err` is why the client
/// is not relayed (refused, or gone), already recorded.
///
/// Apart from [`relay`] so the accept path can run the relay in a task of
/// its own: a relayed session then carries nothing of the door, and a
/// client in the greet pause nothing of the relay.
pub async fn enter<C>(
    mut client: C,
    remote: SocketAddr,
    local: SocketAddr,
    door: Door,
    listener: &ListenerSettings,
    config: &Config,
    shared: &Shared,
) -> Result<Entered<C>, CloseReason>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut early = Vec::new();
    let mut peer = Peer {
        client: remote,
        local,
        proxy_check: false,
    };
    // A client on an implicit-TLS listener cannot read a plaintext banner,
    // and the pause's half banner is SMTP's.
    let may_pause = listener.tls != TlsMode::Implicit && listener.protocol == Protocol::Smtp;
    // Boxed: the PROXY header and greet pause futures are large and done
    // before the relay.
    let admitted = Box::pin(admit(
        &mut client,
        &mut peer,
        &mut early,
        door,
        may_pause,
        config,
        shared,
    ))
    .await;
    match admitted {
        Err(refusal) => {
            record_refusal(&shared.shaping, peer.client.ip(), refusal);
            let reply = refusal.reply(listener.protocol, &config.server.hostname);
            match (refusal, config.blocklist.action) {
                (Refusal::Blocked, BlockAction::Drop) => {}
                (Refusal::Blocked, BlockAction::Tarpit) => {
                    Box::pin(tarpit(&mut client, reply.as_bytes(), config, shared)).await
                }
                _ => {
                    let write = write_refusal(&mut client, reply.as_bytes(), config.timeouts.write);
                    Box::pin(write).await
                }
            }
            // Counted as refused at the door, not as a session.
            Err(refusal.close_reason())
        }
        Ok(None) => {
            let reason = CloseReason::ClientClosed;
            record_close(reason, started, peer, SessionFacts::default(), shared);
            Err(reason)
        }
        Ok(Some(permit)) => Ok(Entered {
            client,
            peer,
            early,
            _permit: permit,
            started,
        }),
    }
}

/// The relay of a client through the door, to the session's end. The
/// client is borrowed, not taken: the task that owns it holds it once.
/// Its admission permit is released with it, by the caller.
pub async fn relay<C>(
    entered: &mut Entered<C>,
    listener: &ListenerSettings,
    config: &Config,
    shared: &Shared,
) -> CloseReason
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Entered {
        client,
        peer,
        early,
        started,
        ..
    } = entered;
    let (reason, facts) = connect_and_relay(client, peer, early, listener, config, shared).await;
    record_close(reason, *started, *peer, facts, shared);
    reason
}

/// A session's end in the metrics and the log. Only admitted clients are
/// sessions: a refused connection was counted as such at the door, so
/// each connection is counted as one or the other.
fn record_close(
    reason: CloseReason,
    started: Instant,
    peer: Peer,
    facts: SessionFacts,
    shared: &Shared,
) {
    let duration = started.elapsed();
    let metrics = &shared.metrics;
    metrics.session_closed(reason);
    metrics.session_duration.observe(duration.as_secs_f64());
    if facts.commands == 0 && facts.bytes_from_client == 0 {
        tracing::debug!(client = %peer.client.ip(), reason = reason.as_str(), "session closed before it began");
        return;
    }
    tracing::info!(
        client = %peer.client.ip(),
        reason = reason.as_str(),
        duration_ms = duration.as_millis() as u64,
        bytes_in = facts.bytes_from_client,
        bytes_out = facts.bytes_to_client,
        commands = facts.commands,
        messages = facts.messages,
        tls = facts.tls.map_or("none", TlsVersion::as_str),
        "session closed"
    );
}

/// The door: trusted PROXY header, admission, greet pause, and a look at
/// what the client sent unasked. `Ok(None)` when the client left before it
/// was decided.
///
/// A trusted proxy is never refused for its own address: a health check
/// (`LOCAL`/`UNKNOWN`) passes whatever lists or bans name that address,
/// so the balancer sees the service up, while the lists apply to the real
/// clients its headers name. Its failures (no header, a bad one) are
/// refused and counted in metrics, but never toward a ban (see `Shaping`).
#[allow(clippy::too_many_arguments)]
async fn admit<C>(
    client: &mut C,
    peer: &mut Peer,
    early: &mut Vec<u8>,
    door: Door,
    may_pause: bool,
    config: &Config,
    shared: &Shared,
) -> Result<Option<Permit>, Refusal>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let admission = &shared.admission;
    let permit = match door {
        Door::Admitted(permit) => permit,
        Door::Refused(refusal) => return Err(refusal),
        Door::Undecided => {
            match read_proxy_header(client, early, config.timeouts.proxy_header).await {
                Ok(Some(real)) => {
                    peer.client = real;
                    admission.admit(real.ip())?
                }
                Ok(None) => {
                    // No greet pause: the balancer is not a bot to be tested,
                    // and a checker that reads the first line takes `220-` for
                    // a failure.
                    peer.proxy_check = true;
                    return admission.admit_proxy_check(peer.client.ip()).map(Some);
                }
                Err(why) => {
                    // A plain TCP check connects and closes without a word;
                    // anything else is a misconfigured proxy worth a warning.
                    if matches!(why, HeaderError::Silent) {
                        tracing::debug!(proxy = %peer.client, "trusted proxy closed without a PROXY header");
                    } else {
                        tracing::warn!(proxy = %peer.client, error = %why, "bad PROXY header from trusted proxy");
                    }
                    shared.metrics.refused(Refusal::ProxyMalformed);
                    return Err(Refusal::ProxyMalformed);
                }
            }
        }
    };
    let ip = peer.client.ip();
    let mut paused = false;
    if may_pause && admission.needs_greet_pause(ip, Instant::now()) {
        paused = true;
        let t = &config.timeouts;
        match greeting::greet_pause(
            client,
            &config.server.hostname,
            t.greet_pause,
            t.write,
            early,
        )
        .await
        {
            GreetOutcome::Patient => admission.greet_passed(ip, Instant::now()),
            GreetOutcome::EarlyTalker if proxy_header_unasked(early) => {
                return Err(untrusted_header(shared))
            }
            GreetOutcome::EarlyTalker => admission.refuse(ip, Refusal::EarlyTalker)?,
            GreetOutcome::Gone => return Ok(None),
        }
    }
    // The greet pause collected anything sent early; without one, look now.
    if !paused && early.is_empty() && !collect_waiting(client, early).await {
        return Ok(None);
    }
    if proxy_header_unasked(early) {
        return Err(untrusted_header(shared));
    }
    Ok(Some(permit))
}

/// True when a client (never a trusted proxy: its header is consumed) sent
/// what is, or may yet become, a PROXY header. Honest SMTP clients wait for
/// the greeting, so any early bytes are suspect already: refusing a prefix
/// costs them nothing, and catches a v2 signature cut after its `\r\n`.
fn proxy_header_unasked(early: &[u8]) -> bool {
    !early.is_empty() && proxy_protocol::sniff(early) != Sniff::NotHeader
}

/// Refuses a PROXY header from a peer that is not a trusted proxy, at the
/// door, before a receiver connection is spent on it. Shadow mode does not
/// let it through: it would only reach the receiver as junk.
fn untrusted_header(shared: &Shared) -> Refusal {
    shared.metrics.refused(Refusal::ProxyUntrusted);
    Refusal::ProxyUntrusted
}

/// Collects what the client has already sent, without waiting for more.
/// The yield lets the runtime notice bytes already waiting on a socket
/// just accepted. False when the client has left.
///
/// No wait at all: a zero timeout here fired at tokio's next millisecond
/// tick, which cost every session without a greet pause 0.8 ms of latency
/// and 90 µs of CPU (a sleep and a wakeup). A PROXY header that arrives
/// after this look is refused by the SMTP module as the first command.
async fn collect_waiting<C: AsyncRead + Unpin>(client: &mut C, early: &mut Vec<u8>) -> bool {
    tokio::task::yield_now().await;
    match io::poll_once(io::read_into(client, early)).await {
        Poll::Pending | Poll::Ready(Ok(1..)) => true,
        Poll::Ready(Ok(0) | Err(_)) => false,
    }
}

/// Why a trusted proxy's connection carried no usable PROXY header.
#[derive(Debug)]
enum HeaderError {
    /// Closed without sending a byte (a plain TCP health check).
    Silent,
    Bad(String),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Silent => f.write_str("connection closed before the PROXY header"),
            HeaderError::Bad(why) => f.write_str(why),
        }
    }
}

/// Reads a PROXY header; leftover bytes stay in `early`. `Ok(None)` for a
/// LOCAL/UNKNOWN header (the proxy's own health check).
async fn read_proxy_header<C: AsyncRead + Unpin>(
    client: &mut C,
    early: &mut Vec<u8>,
    within: Duration,
) -> Result<Option<SocketAddr>, HeaderError> {
    let parse = async {
        loop {
            match proxy_protocol::parse_inbound(early) {
                Inbound::Proxied { client: real, len } => {
                    early.drain(..len);
                    return Ok(Some(real));
                }
                Inbound::Local { len } => {
                    early.drain(..len);
                    return Ok(None);
                }
                Inbound::Malformed(why) => return Err(HeaderError::Bad(why)),
                Inbound::Incomplete => match io::read_into(client, early).await {
                    Ok(0) if early.is_empty() => return Err(HeaderError::Silent),
                    Ok(0) => {
                        return Err(HeaderError::Bad(
                            "connection closed in the PROXY header".into(),
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(HeaderError::Bad(e.to_string())),
                },
            }
        }
    };
    tokio::time::timeout(within, parse)
        .await
        .unwrap_or_else(|_| Err(HeaderError::Bad("no PROXY header in time".into())))
}

/// From an admitted client to the end of its relay: TLS first on an
/// implicit listener (after admission: no TLS work for a refused client),
/// then the receiver, then the driver.
///
/// `peer` and `early` are borrowed from the caller's [`Entered`]: owned
/// here they would be held twice for the whole relay, once as arguments
/// and once as locals.
async fn connect_and_relay<C>(
    client: &mut C,
    peer: &Peer,
    early: &mut Vec<u8>,
    listener: &ListenerSettings,
    config: &Config,
    shared: &Shared,
) -> (CloseReason, SessionFacts)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &shared.metrics;
    let ip = peer.client.ip();
    let session_limit = match listener.protocol {
        Protocol::Smtp => config.timeouts.session,
        Protocol::Imap | Protocol::Pop3 => config.mailbox.session,
    };
    let session_deadline = Instant::now() + session_limit;
    let terminator = match listener.tls {
        TlsMode::Starttls | TlsMode::Implicit => shared.tls.as_deref(),
        TlsMode::None | TlsMode::Passthrough => None,
    };
    // Registered before any TLS work, so a ban reaches a client still
    // handshaking or waiting for its receiver.
    let registration = shared.registry.register(ip);
    // Blocks here end what they borrow before the relay starts: a local
    // that was ever borrowed is kept in the session's future until its
    // scope ends, for the whole relay.
    let allowlisted = {
        // A list swapped in since admission has not seen this session.
        // Its guard would hold this list generation for the whole relay.
        let lists = shared.blocklist.load();
        // Decided once, from the lists as the session starts, like the
        // config snapshot: a list change mid-session does not lift or
        // impose per-IP limits on a session already relaying.
        let allowlisted = lists.is_allowed(ip);
        // A proxy's health check passes a listed proxy address (see `admit`).
        if config.blocklist.kill_on_block
            && !peer.proxy_check
            && !config.server.shadow
            && lists.is_blocked(ip)
            && !allowlisted
        {
            registration.stop.stop(CloseReason::Blocked);
        }
        allowlisted
    };
    let implicit = listener.tls == TlsMode::Implicit;
    // On an implicit listener, what the door read starts the handshake.
    let unread = if implicit {
        std::mem::take(early)
    } else {
        Vec::new()
    };
    let mut client = Transport::plain(client, unread);
    let (tls, implicit_version, connected) = {
        let mut tls = None;
        if implicit {
            let Some(terminator) = terminator else {
                // Config validation requires a certificate for this mode.
                tracing::error!(listener = %listener.address, "implicit-TLS listener without a loaded certificate; set tls.certificate and tls.key and restart");
                return (CloseReason::TlsFailed, SessionFacts::default());
            };
            let stop = registration.stop.stopped();
            // Boxed, as the connect below: a relayed session should not carry
            // the size of the futures that set it up.
            match Box::pin(client.start_tls(terminator, TlsMode::Implicit, metrics, stop)).await {
                Ok(facts) => tls = Some(facts),
                Err(refused) => {
                    if refused.client_fault {
                        metrics.protocol_errors.inc();
                        shared.shaping.event(ip, BanEvent::ProtocolError);
                    }
                    return (refused.reason, SessionFacts::default());
                }
            }
        }
        let connect = Box::pin(upstream::connect(
            shared.upstreams.for_listener(listener),
            peer.client,
            peer.local,
            tls.as_ref(),
            config.timeouts.write,
            metrics,
        ));
        let connected = tokio::select! {
            connected = connect => connected,
            reason = registration.stop.stopped() => return (reason, SessionFacts::default()),
        };
        let implicit_version = tls.as_ref().map(|t| t.version);
        (tls, implicit_version, connected)
    };
    let (mut upstream, greeting) = match connected {
        Ok(upstream::Connected { stream, greeting }) => (stream, greeting),
        Err(e) => {
            tracing::warn!(client = %peer.client, error = %e, "no upstream for client");
            let hostname = &config.server.hostname;
            let reply = match listener.protocol {
                Protocol::Smtp => format!(
                    "421 4.3.2 {hostname} service temporarily unavailable, try again later\r\n"
                ),
                Protocol::Imap => format!(
                    "* BYE [UNAVAILABLE] {hostname} service temporarily unavailable, try again later\r\n"
                ),
                Protocol::Pop3 => format!(
                    "-ERR [SYS/TEMP] {hostname} service temporarily unavailable, try again later\r\n"
                ),
            };
            Box::pin(write_refusal(
                &mut client,
                reply.as_bytes(),
                config.timeouts.write,
            ))
            .await;
            return (CloseReason::UpstreamError, SessionFacts::default());
        }
    };
    let shaping = shared.shaping.client(ip, allowlisted);
    let ctx = DriverContext {
        config,
        metrics,
        terminator,
        tls_mode: listener.tls,
        stop: &registration.stop,
        session_deadline,
    };
    let early = std::mem::take(early);
    let now = Instant::now();
    let (reason, mut facts) = match listener.protocol {
        Protocol::Smtp => {
            let smtp = Smtp::new(
                SmtpContext {
                    config,
                    metrics,
                    shaping,
                    client_ip: ip,
                    tls_mode: listener.tls,
                    require_tls: listener.require_tls,
                    tls,
                },
                now,
            );
            drive(client, &mut upstream, smtp, ctx, early, greeting).await
        }
        Protocol::Imap | Protocol::Pop3 => {
            let mailbox = MailboxContext {
                config,
                metrics,
                login: LoginContext {
                    settings: &config.mailbox,
                    metrics,
                    shaping,
                    protocol: listener.protocol,
                },
                tls_mode: listener.tls,
                require_tls: listener.require_tls,
                tls: tls.is_some(),
            };
            // Boxed: an SMTP session should not carry the size of the
            // other protocols' relays.
            if listener.protocol == Protocol::Imap {
                let imap = Imap::new(mailbox, now);
                Box::pin(drive(client, &mut upstream, imap, ctx, early, greeting)).await
            } else {
                let pop3 = Pop3::new(mailbox, now);
                Box::pin(drive(client, &mut upstream, pop3, ctx, early, greeting)).await
            }
        }
    };
    facts.tls = facts.tls.or(implicit_version);
    Box::pin(upstream::close(upstream)).await;
    (reason, facts)
}

/// Runs one protocol module's relay to its end.
///
/// Not an `async fn`: its future would hold the arguments beside the
/// driver built from them, for the whole relay; built first, the future
/// holds only the driver.
fn drive<'a, C, U, P>(
    client: Transport<C>,
    upstream: U,
    protocol: P,
    ctx: DriverContext<'a>,
    early: Vec<u8>,
    greeting: Vec<u8>,
) -> impl Future<Output = (CloseReason, SessionFacts)> + use<'a, C, U, P>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    P: protocol::Protocol,
{
    let mut driver = Driver::new(client, upstream, protocol, ctx, early, greeting);
    async move {
        let reason = driver.run().await;
        (reason, driver.facts())
    }
}

/// Feeds a refusal to the ban counters: early talking and protocol abuse
/// are their own triggers, cap and rate refusals are limit violations.
/// A trusted proxy's own address is counted here (`/admin/top`) but
/// `Shaping` never lets it feed a ban.
fn record_refusal(shaping: &Shaping, ip: std::net::IpAddr, refusal: Refusal) {
    // Logged at debug: under a flood, a line per refusal would be the
    // flood's own echo in the logs; the metrics and /admin/top say it.
    tracing::debug!(client = %ip, reason = refusal.as_str(), "connection refused");
    shaping.refused(ip);
    match refusal {
        Refusal::Blocked => {}
        Refusal::EarlyTalker => shaping.event(ip, BanEvent::EarlyTalker),
        Refusal::ProxyUntrusted | Refusal::ProxyMalformed => {
            shaping.event(ip, BanEvent::ProtocolError)
        }
        Refusal::ConnectionRate => shaping.violation(ip, Limit::ConnectionRate),
        Refusal::IpCap | Refusal::PrefixCap => shaping.event(ip, BanEvent::LimitViolation),
        // A full server is nobody's fault: counting it would ban ordinary
        // senders for retrying while mailmoat is busy.
        Refusal::GlobalCap => {}
    }
}

/// Sends `reply` a byte at a time over `blocklist.tarpit_time`, wasting a
/// bot's time rather than ours: at most `blocklist.tarpit_max` at once, the
/// rest are dropped.
async fn tarpit<C: AsyncWrite + Unpin>(
    client: &mut C,
    reply: &[u8],
    config: &Config,
    shared: &Shared,
) {
    let Ok(_slot) = shared.tarpit_slots.clone().try_acquire_owned() else {
        return;
    };
    let pace = config.blocklist.tarpit_time / u32::try_from(reply.len()).unwrap_or(u32::MAX).max(1);
    for byte in reply {
        let mut one = vec![*byte];
        if io::write_all_within(
            client,
            &mut one,
            config.timeouts.write.min(Duration::from_secs(2)),
        )
        .await
        .is_err()
        {
            return;
        }
        tokio::time::sleep(pace).await;
    }
}

/// Writes a one-line refusal with a short deadline; a client that does not
/// read cannot hold the proxy.
pub async fn write_refusal<C: AsyncWrite + Unpin>(client: &mut C, reply: &[u8], write: Duration) {
    let mut bytes = reply.to_vec();
    let deadline = write.min(Duration::from_secs(2));
    let _ = io::write_all_within(client, &mut bytes, deadline).await;
}
