//! `mailmoat demo`: the proxy in front of the built-in sink on loopback,
//! a legitimate sender, and the incidents mailmoat exists for, played at
//! once for about 40 seconds; then a report.
//!
//! Everything runs on 127.0.0.0/8 (all of it is local on Linux), each
//! actor from its own addresses, every loop bounded by the demo's deadline.
//! The listener terminates STARTTLS with a certificate made at start, and
//! the AUTH brute force runs inside TLS, as it does on a real submission
//! port: mailmoat still counts its failures and bans it. An IMAP listener
//! in front of a stand-in for Dovecot (`imap.rs`) takes a brute force of
//! wrong LOGINs from a few addresses while a user keeps logging in. When
//! `redis-server` is installed, a fleet act follows (`fleet.rs`): three
//! nodes sharing a private Redis, a block pushed to one, enforced by all.

mod fleet;
mod imap;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::sink::{Sink, SinkOptions};
use crate::Server;

const LEGIT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const TRICKLE_IPS: u8 = 20;
const TRICKLE_SOCKETS_PER_IP: usize = 50;
const FLOOD_IPS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(127, 77, 0, 1),
    Ipv4Addr::new(127, 77, 1, 1),
    Ipv4Addr::new(127, 77, 2, 1),
    Ipv4Addr::new(127, 77, 3, 1),
];
const BRUTE: Ipv4Addr = Ipv4Addr::new(127, 88, 0, 1);
/// An IP with an open, idle session when the operators push their block.
const PUSHED: Ipv4Addr = Ipv4Addr::new(127, 99, 0, 1);
const IO: Duration = Duration::from_secs(5);
/// The name in the demo's certificate, which the brute force verifies.
const TLS_NAME: &str = "mx.demo.test";

#[derive(Default)]
struct Tally {
    legit_sent: AtomicU64,
    legit_delivered: AtomicU64,
    flood_attempts: AtomicU64,
    flood_refused: AtomicU64,
    trickle_opened: AtomicU64,
    brute_attempts: AtomicU64,
    /// The brute force's sessions that completed a TLS handshake.
    brute_tls_sessions: AtomicU64,
    /// Its TLS sessions in which mailmoat answered an AUTH with `535`: the
    /// brute force seen inside TLS.
    brute_auth_sessions: AtomicU64,
    /// Refused with `554 5.7.1` after such a session: banned (a `421` rate
    /// refusal or a dropped connection is not a ban).
    brute_banned: std::sync::atomic::AtomicBool,
    brute_banned_after: AtomicU64,
    push_refused_ms: AtomicU64,
    push_killed_ms: AtomicU64,
    /// The held session ended before the push (it then measures nothing).
    push_held_lost: std::sync::atomic::AtomicBool,
    imap: imap::Tally,
}

pub struct DemoOptions {
    pub duration: Duration,
}

/// What the demo showed.
pub struct DemoOutcome {
    /// The report's headline claims that did not hold, one sentence each;
    /// empty when all held.
    pub failed_claims: Vec<String>,
}

pub async fn run(options: DemoOptions) -> anyhow::Result<DemoOutcome> {
    let dir = std::env::temp_dir().join(format!("mailmoat-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("creating the demo's temp dir")?;
    let blocklist = dir.join("blocklist.txt");
    std::fs::write(&blocklist, "# pushed by the operators during the demo\n")?;
    let certificate = DemoCertificate::generate(&dir)?;
    let brute_tls = certificate.connector()?;

    let sink = Sink::start(
        "127.0.0.1:0".parse()?,
        SinkOptions {
            slots: 100,
            auth: Some(("user".into(), "correct horse".into())),
            ..SinkOptions::default()
        },
    )
    .await?;
    let imap_receiver = imap::Receiver::start()
        .await
        .context("starting the demo's IMAP receiver")?;
    let config = demo_config(
        &blocklist,
        sink.addr(),
        imap_receiver.addr(),
        &dir,
        &certificate,
    )?;
    let server = Server::bind(config).await?;
    let [proxy, imap_proxy] = server.listen_addrs()[..] else {
        anyhow::bail!("the demo's server should listen twice (SMTP, IMAP)");
    };
    let metrics = server.metrics();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    println!(
        "mailmoat demo: proxy on {proxy} in front of a sink with 100 slots; {}s of traffic",
        options.duration.as_secs()
    );
    println!("  IMAP on {imap_proxy} in front of a stand-in for Dovecot: wrong LOGINs from {} addresses, a user logging in every second from {}", imap::ATTACKERS.len(), imap::USER_IP);
    println!("  legit sender {LEGIT}; {} trickling sockets from {TRICKLE_IPS} IPs (each reconnects when refused or cut); a flood from 4 IPs; AUTH brute force from {BRUTE} inside STARTTLS (mailmoat terminates TLS with a certificate made at start)", TRICKLE_IPS as usize * TRICKLE_SOCKETS_PER_IP);

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + options.duration;
    let mut actors = JoinSet::new();
    actors.spawn(legit(proxy, tally.clone(), deadline));
    for ip in 1..=TRICKLE_IPS {
        for _ in 0..TRICKLE_SOCKETS_PER_IP {
            actors.spawn(trickle(
                Ipv4Addr::new(127, 66, ip, 1),
                proxy,
                tally.clone(),
                deadline,
            ));
        }
    }
    for ip in FLOOD_IPS {
        actors.spawn(flood(ip, proxy, tally.clone(), deadline));
    }
    actors.spawn(brute_force(proxy, brute_tls, tally.clone(), deadline));
    for ip in imap::ATTACKERS {
        let tally = tally.clone();
        actors.spawn(
            async move { imap::attacker(ip, imap_proxy, proxy, &tally.imap, deadline).await },
        );
    }
    {
        let tally = tally.clone();
        actors.spawn(async move { imap::user(imap_proxy, &tally.imap, deadline).await });
    }
    actors.spawn(push_block(
        proxy,
        blocklist.clone(),
        tally.clone(),
        options.duration / 4,
    ));

    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    while Instant::now() < deadline {
        tokio::select! {
            _ = tick.tick() => progress(started, &metrics, &tally, &sink),
            Some(_) = actors.join_next() => {}
        }
    }
    // Actors stop at the deadline; give stragglers a moment, then cut.
    let _ = timeout(Duration::from_secs(10), async {
        while actors.join_next().await.is_some() {}
    })
    .await;
    actors.shutdown().await;
    println!("  fleet act: three nodes sharing a private redis-server, a block pushed to one");
    let fleet_act = fleet::play(&dir, sink.addr()).await;
    report(started, &metrics, &tally, &sink);
    imap::report(&metrics, &tally.imap, &imap_receiver);
    println!("{}", fleet::report(&fleet_act));
    let mut failed_claims = failed_claims(&tally);
    failed_claims.extend(imap::failed_claims(&tally.imap));
    failed_claims.extend(fleet::failed_claims(&fleet_act));
    if failed_claims.is_empty() {
        println!("  every claim above held");
    }
    for claim in &failed_claims {
        println!("  CLAIM FAILED: {claim}");
    }

    let _ = stop_tx.send(());
    let _ = timeout(Duration::from_secs(15), proxy_task).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(DemoOutcome { failed_claims })
}

/// The report's headlines, checked: legitimate mail all delivered, the
/// brute force seen inside TLS and banned, the pushed block enforced.
fn failed_claims(tally: &Tally) -> Vec<String> {
    let mut failed = Vec::new();
    let sent = tally.legit_sent.load(Ordering::Relaxed);
    let delivered = tally.legit_delivered.load(Ordering::Relaxed);
    if sent == 0 || delivered < sent {
        failed.push(format!(
            "legitimate mail not all delivered ({delivered} of {sent})"
        ));
    }
    if tally.brute_auth_sessions.load(Ordering::Relaxed) == 0 {
        failed.push(
            "the AUTH brute force was not seen inside TLS (no STARTTLS session got a 535)".into(),
        );
    } else if !tally.brute_banned.load(Ordering::Relaxed) {
        failed.push(
            "the AUTH brute force inside TLS was not banned (never refused with 554 5.7.1)".into(),
        );
    }
    if tally.push_refused_ms.load(Ordering::Relaxed) == 0 {
        failed.push(
            "the pushed block was not enforced: new connections not refused with 554 within 10 s"
                .into(),
        );
    } else if !tally.push_held_lost.load(Ordering::Relaxed)
        && tally.push_killed_ms.load(Ordering::Relaxed) == 0
    {
        failed.push(
            "the pushed block was not enforced: the open session was not closed within 10 s".into(),
        );
    }
    failed
}

fn demo_config(
    blocklist: &std::path::Path,
    sink: SocketAddr,
    imap: SocketAddr,
    dir: &std::path::Path,
    certificate: &DemoCertificate,
) -> anyhow::Result<Config> {
    let toml = demo_toml(blocklist, sink, imap, dir, certificate);
    Ok(Config::from_toml(&toml, std::path::Path::new("<demo>"))?)
}

fn demo_toml(
    blocklist: &std::path::Path,
    sink: SocketAddr,
    imap: SocketAddr,
    dir: &std::path::Path,
    certificate: &DemoCertificate,
) -> String {
    format!(
        r#"
[server]
listen = []
shutdown_grace = "5s"
state_sweep = "1s"
[[listener]]
address = "127.0.0.1:0"
tls = "starttls"
[[listener]]
# Port 0 may appear once per address: IMAP listens on another loopback one.
address = "127.0.1.1:0"
protocol = "imap"
tls = "none"
upstream = "imap"
[tls]
certificate = "{cert}"
key = "{key}"
[upstream]
servers = ["{sink}"]
[upstreams.imap]
servers = ["{imap}"]
# The stand-in for Dovecot reads no PROXY header.
proxy_protocol = "off"
[limits]
per_ip_connections = 3
per_prefix_connections = 20
connection_rate = "60/min"
connection_burst = 10
message_rate = "1000/min"
message_burst = 100
[timeouts]
command_line = "3s"
idle = "10s"
[blocklist]
files = ["{blocklist}"]
[autoban]
auth_failures = 5
limit_violations = 300
state = "{bans}"
[admin]
listen = ""
[log]
level = "error"
"#,
        blocklist = blocklist.display(),
        bans = dir.join("bans.txt").display(),
        cert = certificate.cert.display(),
        key = certificate.key.display(),
    )
}

async fn connect_from(ip: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    let stream = timeout(IO, socket.connect(addr)).await??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The demo's certificate: a CA the brute force trusts, and the leaf
/// mailmoat presents, signed by it, in files under the demo's temp dir.
struct DemoCertificate {
    ca: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
}

impl DemoCertificate {
    fn generate(dir: &std::path::Path) -> anyhow::Result<DemoCertificate> {
        use rustls::pki_types::pem::PemObject;
        let authority = crate::tls::generate::Authority::new()?;
        let (cert, key) = authority
            .issue(&[TLS_NAME])?
            .write_in(dir, "demo")
            .context("writing the demo's certificate")?;
        let ca = CertificateDer::from_pem_slice(authority.cert_pem().as_bytes())
            .context("reading back the demo's CA")?;
        Ok(DemoCertificate { ca, cert, key })
    }

    /// A client that trusts only the demo's CA.
    fn connector(&self) -> anyhow::Result<tokio_rustls::TlsConnector> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(tokio_rustls::TlsConnector::from(crate::tls::client_config(
            roots,
        )))
    }
}

/// Reads one reply line (bounded); "" when the connection ended.
async fn read_reply<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while buf.len() < 512 {
        match timeout(IO, stream.read(&mut byte)).await {
            Ok(Ok(1)) => {
                buf.push(byte[0]);
                if byte[0] == b'\n' {
                    if buf.get(3) == Some(&b'-') {
                        buf.clear();
                        continue;
                    }
                    break;
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A real client (lettre) sending a message every 400 ms.
async fn legit(proxy: SocketAddr, tally: Arc<Tally>, deadline: Instant) {
    use lettre::transport::smtp::client::AsyncSmtpConnection;
    use lettre::transport::smtp::extension::ClientId;
    let envelope = lettre::address::Envelope::new(
        Some("alice@legit.example".parse().expect("valid address")),
        vec!["bob@receiver.example".parse().expect("valid address")],
    )
    .expect("valid envelope");
    let body = b"From: Alice <alice@legit.example>\r\nTo: bob@receiver.example\r\nSubject: still here\r\nMessage-ID: <demo@legit.example>\r\n\r\nThe receiver kept working.\r\n";
    // Like a real MTA: one connection carries several messages.
    while Instant::now() < deadline {
        let connected = timeout(
            IO,
            AsyncSmtpConnection::connect_tokio1(
                proxy,
                Some(IO),
                &ClientId::Domain("legit.example".into()),
                None,
                Some(IpAddr::V4(LEGIT)),
            ),
        )
        .await;
        let Ok(Ok(mut conn)) = connected else {
            tally.legit_sent.fetch_add(1, Ordering::Relaxed);
            sleep(Duration::from_millis(400)).await;
            continue;
        };
        for _ in 0..10 {
            if Instant::now() >= deadline {
                break;
            }
            tally.legit_sent.fetch_add(1, Ordering::Relaxed);
            match timeout(IO * 2, conn.send(&envelope, body)).await {
                Ok(Ok(_)) => tally.legit_delivered.fetch_add(1, Ordering::Relaxed),
                _ => break,
            };
            sleep(Duration::from_millis(400)).await;
        }
        let _ = timeout(IO, conn.quit()).await;
    }
}

/// Socket hoarding: open, start a command line, send a byte every 2 s.
async fn trickle(ip: Ipv4Addr, proxy: SocketAddr, tally: Arc<Tally>, deadline: Instant) {
    while Instant::now() < deadline {
        let Ok(mut stream) = connect_from(ip, proxy).await else {
            sleep(Duration::from_secs(1)).await;
            continue;
        };
        tally.trickle_opened.fetch_add(1, Ordering::Relaxed);
        let banner = read_reply(&mut stream).await;
        if !banner.starts_with("220") {
            sleep(Duration::from_secs(5)).await;
            continue;
        }
        for byte in b"EHLO trickle.example".iter().cycle() {
            if Instant::now() >= deadline || stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            sleep(Duration::from_secs(2)).await;
        }
    }
}

/// A connection flood: connect, read the reply, close, as fast as allowed.
async fn flood(ip: Ipv4Addr, proxy: SocketAddr, tally: Arc<Tally>, deadline: Instant) {
    while Instant::now() < deadline {
        tally.flood_attempts.fetch_add(1, Ordering::Relaxed);
        let Ok(mut stream) = connect_from(ip, proxy).await else {
            sleep(Duration::from_millis(50)).await;
            continue;
        };
        let reply = read_reply(&mut stream).await;
        if !reply.starts_with("220") {
            tally.flood_refused.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = stream.write_all(b"QUIT\r\n").await;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// AUTH brute force inside TLS, as on a submission port: EHLO, STARTTLS,
/// the handshake, EHLO again, then wrong passwords until the proxy bans
/// the IP.
async fn brute_force(
    proxy: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    tally: Arc<Tally>,
    deadline: Instant,
) {
    use base64::Engine;
    let Ok(name) = ServerName::try_from(TLS_NAME) else {
        return;
    };
    let mut guess = 0u64;
    while Instant::now() < deadline {
        let Ok(mut stream) = connect_from(BRUTE, proxy).await else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let banner = read_reply(&mut stream).await;
        if banner.starts_with("554 5.7.1") && tally.brute_auth_sessions.load(Ordering::Relaxed) > 0
        {
            tally.brute_banned_after.store(
                tally.brute_attempts.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            tally.brute_banned.store(true, Ordering::Relaxed);
            return;
        }
        // A rate refusal (421) or a dropped connection: try again later.
        if !banner.starts_with("220") {
            sleep(Duration::from_millis(300)).await;
            continue;
        }
        let _ = stream.write_all(b"EHLO brute.example\r\n").await;
        let _ = read_reply(&mut stream).await;
        let _ = stream.write_all(b"STARTTLS\r\n").await;
        if !read_reply(&mut stream).await.starts_with("220") {
            sleep(Duration::from_millis(300)).await;
            continue;
        }
        let Ok(Ok(mut tls)) = timeout(IO, connector.connect(name.clone(), stream)).await else {
            sleep(Duration::from_millis(300)).await;
            continue;
        };
        tally.brute_tls_sessions.fetch_add(1, Ordering::Relaxed);
        // RFC 3207: after the handshake the client starts over with EHLO.
        let _ = tls.write_all(b"EHLO brute.example\r\n").await;
        let _ = read_reply(&mut tls).await;
        let mut refused_inside_tls = false;
        for _ in 0..3 {
            guess += 1;
            let creds =
                base64::engine::general_purpose::STANDARD.encode(format!("\0user\0guess{guess}"));
            if tls
                .write_all(format!("AUTH PLAIN {creds}\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            tally.brute_attempts.fetch_add(1, Ordering::Relaxed);
            if !read_reply(&mut tls).await.starts_with("535") {
                break;
            }
            refused_inside_tls = true;
        }
        if refused_inside_tls {
            tally.brute_auth_sessions.fetch_add(1, Ordering::Relaxed);
        }
        sleep(Duration::from_millis(300)).await;
    }
}

/// The operators push a block by file while the attack runs: how long until
/// the pushed IP is refused, and its open session closed?
async fn push_block(proxy: SocketAddr, blocklist: PathBuf, tally: Arc<Tally>, after: Duration) {
    let Ok(mut held) = connect_from(PUSHED, proxy).await else {
        return;
    };
    let _ = read_reply(&mut held).await;
    let _ = held.write_all(b"EHLO pushed.example\r\n").await;
    let _ = read_reply(&mut held).await;
    // A NOOP now and then keeps the held session under the idle timeout,
    // so what ends it is the block.
    let push_at = Instant::now() + after;
    while Instant::now() < push_at {
        sleep(Duration::from_secs(3).min(push_at - Instant::now())).await;
        if held.write_all(b"NOOP\r\n").await.is_err()
            || !read_reply(&mut held).await.starts_with("250")
        {
            tally.push_held_lost.store(true, Ordering::Relaxed);
            break;
        }
    }
    sleep(push_at.saturating_duration_since(Instant::now())).await;

    let mut list = String::from("# pushed by the operators during the demo\n");
    for ip in FLOOD_IPS.iter().chain([&PUSHED]) {
        list.push_str(&format!("{ip}\n"));
    }
    let tmp = blocklist.with_extension("tmp");
    if std::fs::write(&tmp, list)
        .and_then(|()| std::fs::rename(&tmp, &blocklist))
        .is_err()
    {
        return;
    }
    let pushed = Instant::now();
    let killed = async {
        let mut rest = [0u8; 256];
        // The held session ends (421 then EOF) when the block reaches it;
        // still open after 10 s, it was not closed, and nothing is stored.
        let closed = timeout(Duration::from_secs(10), async {
            while let Ok(n) = held.read(&mut rest).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        if closed.is_ok() {
            tally.push_killed_ms.store(
                pushed.elapsed().as_millis().max(1) as u64,
                Ordering::Relaxed,
            );
        }
    };
    let refused = async {
        while pushed.elapsed() < Duration::from_secs(10) {
            if let Ok(mut s) = connect_from(PUSHED, proxy).await {
                if read_reply(&mut s).await.starts_with("554") {
                    tally.push_refused_ms.store(
                        pushed.elapsed().as_millis().max(1) as u64,
                        Ordering::Relaxed,
                    );
                    return;
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::join!(killed, refused);
}

fn value(metrics: &Metrics, series: &str) -> u64 {
    metrics
        .render()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

fn refused(metrics: &Metrics, reason: &str) -> u64 {
    value(
        metrics,
        &format!("mailmoat_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

fn closed(metrics: &Metrics, reason: &str) -> u64 {
    value(
        metrics,
        &format!("mailmoat_sessions_closed_total{{reason=\"{reason}\"}}"),
    )
}

/// Refusals at the per-IP, per-prefix and global connection caps.
fn connection_caps(metrics: &Metrics) -> u64 {
    CAPS.iter().map(|cap| refused(metrics, cap)).sum()
}

const CAPS: [&str; 3] = ["ip_cap", "prefix_cap", "global_cap"];

fn progress(started: Instant, metrics: &Metrics, tally: &Tally, sink: &Sink) {
    println!(
        "  t={:>2}s  legit {}/{} delivered | refused: connection_rate {} connection caps {} blocked {} | cut by line timeout {} | bans {} | receiver slots in use {}",
        started.elapsed().as_secs(),
        tally.legit_delivered.load(Ordering::Relaxed),
        tally.legit_sent.load(Ordering::Relaxed),
        refused(metrics, "connection_rate"),
        connection_caps(metrics),
        refused(metrics, "blocked"),
        closed(metrics, "line_timeout"),
        value(metrics, "mailmoat_active_bans"),
        sink.active(),
    );
}

fn report(started: Instant, metrics: &Metrics, tally: &Tally, sink: &Sink) {
    // 0: not measured in the demo's time (a real 0 ms rounds up to 1).
    let ms = |a: &AtomicU64| match a.load(Ordering::Relaxed) {
        0 => "not measured".to_string(),
        v => format!("{v} ms"),
    };
    println!("\nmailmoat demo report ({}s)", started.elapsed().as_secs());
    println!(
        "  legitimate mail:   {} of {} messages delivered (the receiver got {} in all)",
        tally.legit_delivered.load(Ordering::Relaxed),
        tally.legit_sent.load(Ordering::Relaxed),
        sink.delivered()
    );
    println!("  attackers refused, by reason:");
    let caps = CAPS
        .iter()
        .map(|cap| format!("{cap} {}", refused(metrics, cap)))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "    connection_rate  {}",
        refused(metrics, "connection_rate")
    );
    println!("    connection caps  {} ({caps})", connection_caps(metrics));
    for reason in ["blocked", "early_talker"] {
        println!("    {reason:<16} {}", refused(metrics, reason));
    }
    println!(
        "  flood (4 IPs):     {} of {} connection attempts refused",
        tally.flood_refused.load(Ordering::Relaxed),
        tally.flood_attempts.load(Ordering::Relaxed)
    );
    println!(
        "  trickling sockets: {} of them, each reconnecting when refused or cut: {} connections in all; {} cut by the line timeout, {} by idle",
        TRICKLE_IPS as usize * TRICKLE_SOCKETS_PER_IP,
        tally.trickle_opened.load(Ordering::Relaxed),
        closed(metrics, "line_timeout"),
        closed(metrics, "idle_timeout"),
    );
    println!(
        "  open sessions of clients blocked while connected, closed: {}",
        closed(metrics, "blocked")
    );
    println!(
        "  AUTH brute force:  inside TLS ({} STARTTLS sessions, terminated by mailmoat): {} failures seen; {}",
        tally.brute_tls_sessions.load(Ordering::Relaxed),
        // mailmoat_auth_failures_total counts the IMAP act's failures too.
        value(
            metrics,
            "mailmoat_logins_total{outcome=\"failure\",protocol=\"smtp\"}"
        ),
        if tally.brute_banned.load(Ordering::Relaxed) {
            format!(
                "banned after {} attempts (refused with 554 5.7.1 since); the encryption hid nothing from mailmoat",
                tally.brute_banned_after.load(Ordering::Relaxed)
            )
        } else {
            "not banned (raise the duration?)".into()
        }
    );
    let killed = if tally.push_held_lost.load(Ordering::Relaxed) {
        "the held session had ended before the push: its close not measured".to_string()
    } else {
        format!("open session closed after {}", ms(&tally.push_killed_ms))
    };
    println!(
        "  pushed block:      new connections refused after {}, {killed}",
        ms(&tally.push_refused_ms),
    );
    println!(
        "  receiver:          at most {} of its 100 slots used at once; {} busy refusals",
        sink.peak_active(),
        sink.busy_refusals()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's server, its receivers and certificate, with `edits`
    /// (each `(from, to)` replaced in the demo's config, which must set
    /// `from`), until `stop`.
    struct DemoServer {
        smtp: SocketAddr,
        imap: SocketAddr,
        certificate: DemoCertificate,
        dir: PathBuf,
        stop_tx: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
        _sink: Sink,
        _imap_receiver: imap::Receiver,
    }

    impl DemoServer {
        async fn start(name: &str, edits: &[(&str, &str)]) -> DemoServer {
            let dir = std::env::temp_dir()
                .join(format!("mailmoat-demo-test-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let blocklist = dir.join("blocklist.txt");
            std::fs::write(&blocklist, "").unwrap();
            let certificate = DemoCertificate::generate(&dir).unwrap();
            let sink = Sink::start(
                "127.0.0.1:0".parse().unwrap(),
                SinkOptions {
                    auth: Some(("user".into(), "correct horse".into())),
                    ..SinkOptions::default()
                },
            )
            .await
            .unwrap();
            let imap_receiver = imap::Receiver::start().await.unwrap();
            let demo = demo_toml(
                &blocklist,
                sink.addr(),
                imap_receiver.addr(),
                &dir,
                &certificate,
            );
            let toml = edits.iter().fold(demo, |toml, (from, to)| {
                assert!(toml.contains(from), "the demo's config sets {from}");
                toml.replace(from, to)
            });
            let config = Config::from_toml(&toml, std::path::Path::new("<test>")).unwrap();
            let server = Server::bind(config).await.unwrap();
            let [smtp, imap] = server.listen_addrs()[..] else {
                panic!("the demo listens for SMTP and IMAP");
            };
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(server.run(async {
                let _ = stop_rx.await;
            }));
            DemoServer {
                smtp,
                imap,
                certificate,
                dir,
                stop_tx,
                task,
                _sink: sink,
                _imap_receiver: imap_receiver,
            }
        }

        async fn stop(self) {
            let _ = self.stop_tx.send(());
            let _ = timeout(Duration::from_secs(10), self.task).await;
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The demo's setup with autoban's AUTH counting off and a connection
    /// rate the brute force exceeds at its second connection: what refuses
    /// it then is a `421`, which is not a ban.
    #[tokio::test]
    async fn brute_force_refused_for_its_rate_is_not_reported_banned() {
        let demo = DemoServer::start(
            "rate",
            &[
                ("auth_failures = 5", "auth_failures = 0"),
                (
                    "connection_rate = \"60/min\"",
                    "connection_rate = \"1/min\"",
                ),
                ("connection_burst = 10", "connection_burst = 1"),
            ],
        )
        .await;

        let tally = Arc::new(Tally::default());
        let deadline = Instant::now() + Duration::from_secs(2);
        brute_force(
            demo.smtp,
            demo.certificate.connector().unwrap(),
            tally.clone(),
            deadline,
        )
        .await;

        assert!(
            tally.brute_auth_sessions.load(Ordering::Relaxed) >= 1,
            "the first session reached AUTH inside TLS"
        );
        assert!(
            !tally.brute_banned.load(Ordering::Relaxed),
            "a rate refusal was taken for a ban"
        );
        let failed = failed_claims(&tally);
        assert!(
            failed.iter().any(|c| c.contains("was not banned")),
            "{failed:?}"
        );
        demo.stop().await;
    }

    /// The IMAP act on the demo's own config, for a few seconds: each
    /// attacker banned after its wrong LOGINs and then refused on SMTP too,
    /// the user logging in all along.
    #[tokio::test]
    async fn imap_brute_force_is_banned_while_the_user_logs_in() {
        let demo = DemoServer::start("imap", &[]).await;
        let tally = imap::Tally::default();
        let deadline = Instant::now() + Duration::from_secs(4);
        let [a, b, c] =
            imap::ATTACKERS.map(|ip| imap::attacker(ip, demo.imap, demo.smtp, &tally, deadline));
        tokio::join!(a, b, c, imap::user(demo.imap, &tally, deadline));
        let failed = imap::failed_claims(&tally);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            tally.banned.load(Ordering::Relaxed),
            imap::ATTACKERS.len() as u64
        );
        demo.stop().await;
    }

    #[test]
    fn claims_hold_only_when_every_headline_does() {
        let tally = Tally::default();
        tally.legit_sent.store(10, Ordering::Relaxed);
        tally.legit_delivered.store(10, Ordering::Relaxed);
        tally.brute_auth_sessions.store(2, Ordering::Relaxed);
        tally.brute_banned.store(true, Ordering::Relaxed);
        tally.push_refused_ms.store(150, Ordering::Relaxed);
        tally.push_killed_ms.store(150, Ordering::Relaxed);
        assert!(failed_claims(&tally).is_empty());

        tally.legit_delivered.store(9, Ordering::Relaxed);
        tally.push_killed_ms.store(0, Ordering::Relaxed);
        let failed = failed_claims(&tally);
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(failed[0].contains("9 of 10"), "{failed:?}");
        assert!(
            failed[1].contains("open session was not closed"),
            "{failed:?}"
        );
    }
}
