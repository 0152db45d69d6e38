//! What does terminating TLS cost mailmoat, against HAProxy terminating the
//! same TLS in front of the same receiver, and against a receiver that
//! terminates TLS itself?
//!
//! Issue 11's target: CPU per TLS handshake and CPU per MiB of DATA inside
//! TLS no worse than HAProxy's.
//!
//! - `handshake`: fresh connections to an implicit-TLS port (as on 465):
//!   TCP connect, a full TLS handshake (no resumption), the `220`, `QUIT`,
//!   the `221`, the close.
//! - `bulk`: one TLS session per path, messages of realistic 78-byte lines,
//!   timed and CPU-read from the first body byte to the `250`.
//!
//! The three paths, all presenting the same ECDSA P-256 certificate
//! (generated here with rcgen, signed by a generated CA the client trusts):
//!
//! - direct: the client's TLS ends at the receiver itself;
//! - HAProxy 2.6, `mode tcp`, `bind … ssl crt combined.pem`, `server …
//!   send-proxy-v2` to a plaintext receiver;
//! - mailmoat, `[[listener]] tls = "implicit"`, `proxy_protocol = "v2"` to
//!   the same plaintext receiver.
//!
//! The receivers are this bench's own executable started as child
//! processes (one small SMTP server, plaintext behind a PROXY v2 header or
//! TLS with rustls), mailmoat is the release binary, HAProxy Debian's; each
//! runs with 2 threads. The CPU figure of a path is the CPU time of the
//! process that terminates TLS, mailmoat, HAProxy, or the direct receiver,
//! read before and after from `/proc/PID/task/*/schedstat` (nanoseconds),
//! split into user and system by `/proc/PID/stat` (10 ms ticks: the split
//! is coarse in the short mode). The client
//! (tokio-rustls, the same for all three) runs in this process, so its own
//! CPU is in none of them. Paths take turns in rounds, rotating which goes
//! first, so all see the same noise on a shared machine.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::process::Process;
use common::{Cpu, Mode, WAIT};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The name in the certificate, which the client verifies.
const SERVER_NAME: &str = "mx.bench.test";
/// Set in a child started as a receiver: "plain" (PROXY v2 header, then
/// SMTP) or "tls" (implicit TLS, no header).
const CHILD_ENV: &str = "MAILMOAT_BENCH_TLS_RECEIVER";
/// Handshakes in flight at once from the client.
const CONCURRENCY: usize = 8;
/// Client sources 127.1.x.y, this many connections each.
const PER_IP: usize = 50;

const DIRECT: usize = 0;
const HAPROXY: usize = 1;
const MAILMOAT: usize = 2;
const NAMES: [&str; 3] = ["direct (receiver's TLS)", "HAProxy 2.6", "mailmoat"];

/// One path's totals over all rounds.
#[derive(Clone, Copy, Default)]
struct Totals {
    /// Handshakes, or bytes of message bodies.
    work: u64,
    cpu: Cpu,
    wall: Duration,
}

fn main() {
    if let Ok(role) = std::env::var(CHILD_ENV) {
        receiver::run(&role);
        return;
    }
    if common::listing() {
        return;
    }
    common::raise_fd_limit();
    let mode = Mode::detect();
    if !common::selected("tls", &["handshake", "bulk"]) {
        return;
    }
    let rounds = mode.pick(1, 5, 10);
    let handshakes_per_round = mode.pick(16, 200, 1_000);
    let messages_per_round = mode.pick(1, 2, 2);
    let message_size = mode.pick(1 << 20, 16 << 20, 32 << 20);

    let dir = std::env::temp_dir().join(format!("mailmoat-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let certs = Certificates::generate(&dir);

    // Plaintext receiver behind both proxies; TLS receiver for direct.
    let plain = servers::receiver("plain", &certs);
    let direct = servers::receiver("tls", &certs);
    let haproxy = servers::haproxy(&dir, &certs, plain.addr);
    let mailmoat = servers::mailmoat(&dir, &certs, plain.addr);
    let paths: [Option<&Process>; 3] = [Some(&direct), haproxy.as_ref(), Some(&mailmoat)];

    let client_rt = common::runtime("bench-client", 0);
    let connector = certs.connector();
    let message = common::big_message(message_size);

    let mut handshakes = [Totals::default(); 3];
    let mut bulk = [Totals::default(); 3];
    let mut ciphers: [String; 3] = Default::default();
    // `cargo bench --bench tls -- bulk` (or `-- handshake`) runs one part,
    // e.g. to profile it alone.
    let run_handshakes = common::selected("tls", &["handshake"]);
    let run_bulk = common::selected("tls", &["bulk"]);
    for round in (0..rounds).filter(|_| run_handshakes) {
        for path in (0..3).map(|k| (round + k) % 3) {
            let Some(process) = paths[path] else { continue };
            let first = round * handshakes_per_round;
            let (totals, cipher) = client_rt.block_on(handshake_round(
                process,
                &connector,
                first..first + handshakes_per_round,
            ));
            handshakes[path] = add(handshakes[path], totals);
            ciphers[path] = cipher;
        }
    }
    for round in (0..rounds).filter(|_| run_bulk) {
        for path in (0..3).map(|k| (round + k) % 3) {
            let Some(process) = paths[path] else { continue };
            let totals = client_rt.block_on(bulk_round(
                process,
                &connector,
                &message,
                messages_per_round,
            ));
            bulk[path] = add(bulk[path], totals);
        }
    }

    common::header(
        "tls: terminating implicit TLS, mailmoat vs HAProxy vs the receiver itself",
        mode,
    );
    println!(
        "  certificate: ECDSA P-256 (rcgen), the same for all; client: tokio-rustls, \
         no session resumption, {CONCURRENCY} handshakes in flight"
    );
    match &haproxy {
        Some(_) => println!("  {}", common::process::haproxy_version()),
        None => println!("  HAProxy: not installed (apt install haproxy): its column is skipped"),
    }
    for (path, cipher) in ciphers.iter().enumerate() {
        if paths[path].is_some() && !cipher.is_empty() {
            println!("    {:<24} negotiated {cipher}", NAMES[path]);
        }
    }
    if run_handshakes {
        report_handshakes(&handshakes, &paths);
    }
    if run_bulk {
        report_bulk(message_size, &bulk, &paths);
    }

    drop(mailmoat);
    drop(haproxy);
    drop(direct);
    drop(plain);
    let _ = std::fs::remove_dir_all(&dir);
}

fn add(a: Totals, b: Totals) -> Totals {
    Totals {
        work: a.work + b.work,
        cpu: a.cpu + b.cpu,
        wall: a.wall + b.wall,
    }
}

/// The `clients` handshakes (by client index), `CONCURRENCY` at a time;
/// the CPU of the TLS-terminating process over them, and the cipher.
async fn handshake_round(
    process: &Process,
    connector: &TlsConnector,
    clients: std::ops::Range<usize>,
) -> (Totals, String) {
    let n = clients.len();
    let cpu_before = process.cpu();
    let started = Instant::now();
    let mut next = clients.start;
    let mut running = tokio::task::JoinSet::new();
    let mut cipher = String::new();
    while next < clients.end || !running.is_empty() {
        while next < clients.end && running.len() < CONCURRENCY {
            let (addr, connector) = (process.addr, connector.clone());
            let source = common::client_ip(next, PER_IP);
            running.spawn(async move { handshake_session(source, addr, &connector).await });
            next += 1;
        }
        match running.join_next().await {
            Some(Ok(Ok(c))) => cipher = c,
            Some(Ok(Err(e))) => panic!("{}: handshake session: {e}", process.name),
            Some(Err(e)) => panic!("{}: handshake task: {e}", process.name),
            None => {}
        }
    }
    let wall = started.elapsed();
    let cpu = process.cpu() - cpu_before;
    let totals = Totals {
        work: n as u64,
        cpu,
        wall,
    };
    (totals, cipher)
}

/// Connect, handshake, `220`, `QUIT`, `221`, the server's close; the
/// negotiated version, cipher suite and key exchange.
async fn handshake_session(
    source: std::net::Ipv4Addr,
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<String> {
    let tcp = common::connect_from(source, addr).await?;
    let tls = tokio::time::timeout(WAIT, connector.connect(server_name(), tcp))
        .await
        .map_err(|_| timed_out("handshake"))??;
    let negotiated = {
        let (_, conn) = tls.get_ref();
        format!(
            "{:?} {:?} {:?}",
            conn.protocol_version().expect("handshake done"),
            conn.negotiated_cipher_suite()
                .expect("handshake done")
                .suite(),
            conn.negotiated_key_exchange_group()
                .map(|g| g.name())
                .expect("handshake done"),
        )
    };
    let mut c = Client::new(tls);
    c.expect(220).await?;
    c.command(b"QUIT\r\n", 221).await?;
    c.until_closed().await?;
    Ok(negotiated)
}

/// `messages` bodies of `message` on one TLS session opened beforehand;
/// CPU and time from each first body byte to its `250`.
async fn bulk_round(
    process: &Process,
    connector: &TlsConnector,
    message: &[u8],
    messages: usize,
) -> Totals {
    let run = async {
        let tcp = common::connect_from(common::client_ip(0, PER_IP), process.addr).await?;
        let tls = tokio::time::timeout(WAIT, connector.connect(server_name(), tcp))
            .await
            .map_err(|_| timed_out("handshake"))??;
        let mut c = Client::new(tls);
        c.expect(220).await?;
        c.command(b"EHLO client.bench.test\r\n", 250).await?;
        let mut totals = Totals::default();
        for _ in 0..messages {
            c.command(b"MAIL FROM:<a@example.org>\r\n", 250).await?;
            c.command(b"RCPT TO:<b@example.net>\r\n", 250).await?;
            c.command(b"DATA\r\n", 354).await?;
            let cpu_before = process.cpu();
            let started = Instant::now();
            c.command(message, 250).await?;
            let wall = started.elapsed();
            let cpu = process.cpu() - cpu_before;
            totals = add(
                totals,
                Totals {
                    work: message.len() as u64,
                    cpu,
                    wall,
                },
            );
        }
        c.command(b"QUIT\r\n", 221).await?;
        c.until_closed().await?;
        Ok::<_, std::io::Error>(totals)
    };
    run.await
        .unwrap_or_else(|e| panic!("{}: bulk session: {e}", process.name))
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"))
}

fn report_handshakes(totals: &[Totals; 3], paths: &[Option<&Process>; 3]) {
    let per = |t: &Totals| t.cpu.total.as_secs_f64() * 1e6 / t.work.max(1) as f64;
    println!(
        "  handshakes: fresh connection, full handshake, 220, QUIT; {} per path; \
         CPU of the process terminating TLS",
        totals[MAILMOAT].work
    );
    for path in [DIRECT, HAPROXY, MAILMOAT] {
        let t = &totals[path];
        if paths[path].is_none() {
            println!("    {:<24} skipped", NAMES[path]);
            continue;
        }
        println!(
            "    {:<24} {:>7.1} µs CPU/handshake (user {:.1}, system {:.1}); {:.0} sessions/s",
            NAMES[path],
            per(t),
            t.cpu.user.as_secs_f64() * 1e6 / t.work.max(1) as f64,
            t.cpu.system.as_secs_f64() * 1e6 / t.work.max(1) as f64,
            t.work as f64 / t.wall.as_secs_f64().max(1e-9),
        );
    }
    ratios("CPU per handshake", per, totals, paths);
}

fn report_bulk(size: usize, totals: &[Totals; 3], paths: &[Option<&Process>; 3]) {
    const MIB: f64 = (1 << 20) as f64;
    let per = |t: &Totals| t.cpu.total.as_secs_f64() * 1e3 / (t.work as f64 / MIB).max(1e-9);
    let rate = |t: &Totals| t.work as f64 / MIB / t.wall.as_secs_f64().max(1e-9);
    println!(
        "  bulk DATA inside TLS: {} MiB messages of 78-byte lines, {:.0} MiB per path; \
         CPU of the process terminating TLS",
        size >> 20,
        totals[MAILMOAT].work as f64 / MIB
    );
    for path in [DIRECT, HAPROXY, MAILMOAT] {
        let t = &totals[path];
        if paths[path].is_none() {
            println!("    {:<24} skipped", NAMES[path]);
            continue;
        }
        println!(
            "    {:<24} {:>7.2} ms CPU/MiB (user {:.2}, system {:.2}); {:.0} MiB/s",
            NAMES[path],
            per(t),
            t.cpu.user.as_secs_f64() * 1e3 / (t.work as f64 / MIB).max(1e-9),
            t.cpu.system.as_secs_f64() * 1e3 / (t.work as f64 / MIB).max(1e-9),
            rate(t),
        );
    }
    ratios("CPU per MiB", per, totals, paths);
    if paths[HAPROXY].is_some() {
        println!(
            "    throughput: mailmoat {:.2}× HAProxy, {:.2}× direct; HAProxy {:.2}× direct",
            rate(&totals[MAILMOAT]) / rate(&totals[HAPROXY]),
            rate(&totals[MAILMOAT]) / rate(&totals[DIRECT]),
            rate(&totals[HAPROXY]) / rate(&totals[DIRECT]),
        );
    } else {
        println!(
            "    throughput: mailmoat {:.2}× direct",
            rate(&totals[MAILMOAT]) / rate(&totals[DIRECT]),
        );
    }
}

/// mailmoat/HAProxy (the target: ≤ 1) and each proxy/direct.
fn ratios(
    what: &str,
    per: impl Fn(&Totals) -> f64,
    totals: &[Totals; 3],
    paths: &[Option<&Process>; 3],
) {
    let [direct, haproxy, mailmoat] = [DIRECT, HAPROXY, MAILMOAT].map(|p| per(&totals[p]));
    if paths[HAPROXY].is_some() {
        let ratio = mailmoat / haproxy;
        println!(
            "    {what}: mailmoat/HAProxy {ratio:.2}× (target ≤ 1×: {}); \
             mailmoat/direct {:.2}×, HAProxy/direct {:.2}×",
            common::verdict(ratio <= 1.0),
            mailmoat / direct,
            haproxy / direct,
        );
    } else {
        println!(
            "    {what}: mailmoat/direct {:.2}× (no HAProxy to compare with)",
            mailmoat / direct
        );
    }
}

/// A raw SMTP client over TLS: send bytes, read whole replies.
struct Client<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Client<S> {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn command(&mut self, bytes: &[u8], code: u16) -> std::io::Result<()> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(WAIT, write)
            .await
            .map_err(|_| timed_out("write"))??;
        self.expect(code).await
    }

    async fn expect(&mut self, code: u16) -> std::io::Result<()> {
        loop {
            if let Some((end, got)) = common::complete_reply(&self.buf) {
                self.buf.drain(..end);
                return match got {
                    c if c == code => Ok(()),
                    c => Err(std::io::Error::other(format!("expected {code}, got {c}"))),
                };
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .map_err(|_| timed_out("reply"))??;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until the server closes; a close without TLS close_notify
    /// counts as closed too.
    async fn until_closed(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 512];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(timed_out("close")),
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Ok(Err(e)) => return Err(e),
            }
        }
    }
}

/// A CA, and a leaf for [`SERVER_NAME`] it signed, on disk in the forms
/// each server reads.
struct Certificates {
    ca: CertificateDer<'static>,
    /// Leaf PEM (mailmoat's `tls.certificate`, the receiver's).
    cert: PathBuf,
    /// Leaf key PEM, PKCS#8.
    key: PathBuf,
    /// Leaf then key, as HAProxy's `crt` wants them.
    combined: PathBuf,
}

impl Certificates {
    fn generate(dir: &Path) -> Certificates {
        use rustls::pki_types::pem::PemObject;
        let authority = mailmoat::tls::generate::Authority::new().expect("a CA");
        let leaf = authority.issue(&[SERVER_NAME]).expect("a certificate");
        let (cert, key) = leaf.write_in(dir, "bench").expect("write the certificate");
        let combined = dir.join("combined.pem");
        std::fs::write(&combined, format!("{}{}", leaf.cert_pem, leaf.key_pem))
            .expect("write HAProxy's crt");
        Certificates {
            ca: CertificateDer::from_pem_slice(authority.cert_pem().as_bytes()).expect("CA PEM"),
            cert,
            key,
            combined,
        }
    }

    /// The client every path is measured with: trusts the CA, no session
    /// resumption (every handshake is a full one).
    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA into the root store");
        let mut config = Arc::unwrap_or_clone(mailmoat::tls::client_config(roots));
        config.resumption = rustls::client::Resumption::disabled();
        TlsConnector::from(Arc::new(config))
    }
}

/// The servers under measurement, as child processes.
mod servers {
    use super::*;

    pub fn receiver(role: &str, certs: &Certificates) -> Process {
        let addr = common::unused_addr();
        let args = [
            addr.to_string().into(),
            certs.cert.clone(),
            certs.key.clone(),
        ];
        Process::this_bench("receiver", (CHILD_ENV, role), args, addr)
    }

    /// HAProxy in TCP mode terminating TLS; `None` when not installed.
    pub fn haproxy(dir: &Path, certs: &Certificates, receiver: SocketAddr) -> Option<Process> {
        let addr = common::unused_addr();
        // Two threads, as mailmoat's runtime has two workers on two cores.
        let config = format!(
            "global\n\
             \x20   nbthread 2\n\
             \x20   maxconn 4000\n\
             \x20   ssl-default-bind-options ssl-min-ver TLSv1.2\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 5s\n\
             \x20   timeout client 60s\n\
             \x20   timeout server 60s\n\
             frontend smtps\n\
             \x20   bind {addr} ssl crt {combined}\n\
             \x20   default_backend receiver\n\
             backend receiver\n\
             \x20   server r {receiver} send-proxy-v2\n",
            combined = certs.combined.display(),
        );
        Process::haproxy(dir, "haproxy", &config, addr)
    }

    pub fn mailmoat(dir: &Path, certs: &Certificates, receiver: SocketAddr) -> Process {
        let addr = common::unused_addr();
        let config = format!(
            r#"
[server]
listen = []
hostname = "bench.proxy"
max_connections = 20000
shutdown_grace = "1s"

[[listener]]
address = "{addr}"
protocol = "smtp"
tls = "implicit"

[tls]
certificate = "{cert}"
key = "{key}"

[upstream]
servers = ["{receiver}"]
proxy_protocol = "v2"

[limits]
per_ip_connections = 10000
per_prefix_connections = 100000
connection_rate = "100000/s"
connection_burst = 100000
message_rate = "100000/s"
message_burst = 100000
recipient_rate = "100000/s"
recipient_burst = 100000
max_message_size = "256MiB"

[timeouts]
session = "1h"

[blocklist]
files = []

[admin]
listen = ""

[log]
level = "warn"
"#,
            cert = certs.cert.display(),
            key = certs.key.display(),
        );
        Process::mailmoat(dir, "mailmoat", &config, addr)
    }
}

/// The child receivers: [`common::receiver::serve`], plaintext behind a
/// PROXY v2 header ("plain"), or implicit TLS with rustls ("tls").
mod receiver {
    use super::*;
    use common::receiver::{accept_loop, serve};

    pub fn run(role: &str) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let [addr, cert, key] = &args[..] else {
            panic!("receiver: expected ADDR CERT KEY, got {args:?}");
        };
        let addr: SocketAddr = addr.parse().expect("receiver address");
        let tls = match role {
            "tls" => Some(acceptor(Path::new(cert), Path::new(key))),
            "plain" => None,
            other => panic!("receiver: unknown role {other:?}"),
        };
        common::receiver::runtime().block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
            accept_loop(listener, WAIT * 4, |tcp| {
                let tls = tls.clone();
                async move {
                    match tls {
                        Some(acceptor) => serve(acceptor.accept(tcp).await?, false).await,
                        None => serve(tcp, true).await,
                    }
                }
            })
            .await
        });
    }

    fn acceptor(cert: &Path, key: &Path) -> TlsAcceptor {
        let loaded = mailmoat::tls::certs::load(cert, key).expect("certificate and key");
        let single = rustls::sign::SingleCertAndKey::from(loaded.key);
        TlsAcceptor::from(mailmoat::tls::server_config(Arc::new(single)))
    }
}
