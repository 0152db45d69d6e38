//! A small SMTP receiver that accepts everything: the demo's and the tests'
//! stand-in for Postfix. It advertises what a real receiver does (PIPELINING,
//! CHUNKING, AUTH, optionally STARTTLS: real, with a certificate the test
//! made, or an echo after `220` for the passthrough tests), expects an
//! inbound PROXY header
//! unless told not to (as Postfix with `smtpd_upstream_proxy_protocol =
//! haproxy`, matching mailmoat's default), has a fixed number of slots like a
//! busy MTA, and remembers what it received. A health check (PROXY `LOCAL`
//! or `UNKNOWN`) is served but neither counted nor given a slot.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

use crate::proxy_protocol::HeaderTls;
use crate::tls;
use crate::tls::generate::{Authority, GenerateError};

/// The connection: plain, or TLS after STARTTLS.
type SinkStream = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// Messages kept for inspection; older ones are dropped (counts stay exact).
const KEEP_MESSAGES: usize = 1000;
const MAX_LINE: u64 = 64 * 1024;
const SINK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Connections served at once; more are answered `421` like a full MTA.
    pub slots: usize,
    /// Expect a PROXY v1/v2 header first and take the client from it; a
    /// client that sends none waits for the greeting forever (like Postfix).
    pub proxy_protocol: bool,
    /// `user:password` accepted by AUTH PLAIN; any other is `535`.
    pub auth: Option<(String, String)>,
    /// Advertise STARTTLS; after `220` the sink echoes raw bytes back.
    pub starttls_echo: bool,
    /// Advertise STARTTLS, handshake with this config, then serve SMTP
    /// inside TLS (the client must EHLO again).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Offer and accept AUTH only inside TLS, as Postfix with
    /// `smtpd_tls_auth_only = yes`.
    pub auth_requires_tls: bool,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            slots: 1000,
            proxy_protocol: true,
            auth: None,
            starttls_echo: false,
            tls: None,
            auth_requires_tls: false,
        }
    }
}

/// A certificate for the sink's STARTTLS, made at test time: a CA and a
/// leaf it signs for `names` (DNS names or IP addresses).
pub struct SinkCertificate {
    /// The CA, PEM: what `upstream.ca_file` names.
    pub ca_pem: String,
    /// The leaf, DER: what `upstream.pin_sha256` hashes.
    pub leaf: rustls::pki_types::CertificateDer<'static>,
    /// For [`SinkOptions::tls`].
    pub server_config: Arc<rustls::ServerConfig>,
}

impl SinkCertificate {
    pub fn generate(names: &[&str]) -> Result<SinkCertificate, GenerateError> {
        let authority = Authority::new()?;
        let leaf = authority.issue(names)?;
        let single = rustls::sign::SingleCertAndKey::from(leaf.certified_key()?);
        Ok(SinkCertificate {
            ca_pem: authority.cert_pem().to_owned(),
            leaf: leaf.der().clone(),
            server_config: tls::server_config(Arc::new(single)),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Received {
    /// The client as the sink understands it: from the PROXY header if any.
    pub client: SocketAddr,
    pub helo: String,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The message with dot-stuffing undone, without the end marker.
    pub data: Vec<u8>,
    /// The message came inside TLS (after STARTTLS).
    pub tls: bool,
    /// The client's TLS as the PROXY v2 header told it, if it did.
    pub proxy_tls: Option<HeaderTls>,
}

#[derive(Default)]
struct Stats {
    messages: Mutex<VecDeque<Received>>,
    delivered: AtomicU64,
    connections: AtomicU64,
    active: AtomicUsize,
    peak: AtomicUsize,
    busy_refusals: AtomicU64,
    auth_failures: AtomicU64,
}

pub struct Sink {
    addr: SocketAddr,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Sink {
    pub async fn start(bind: SocketAddr, options: SinkOptions) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let options = Arc::new(options);
        let task = tokio::spawn(accept(listener, options, stats.clone()));
        Ok(Sink { addr, stats, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The most recent messages, oldest first.
    pub fn messages(&self) -> Vec<Received> {
        self.stats
            .messages
            .lock()
            .expect("sink lock")
            .iter()
            .cloned()
            .collect()
    }

    pub fn delivered(&self) -> u64 {
        self.stats.delivered.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> usize {
        self.stats.active.load(Ordering::Relaxed)
    }

    /// The most connections the sink ever held at once.
    pub fn peak_active(&self) -> usize {
        self.stats.peak.load(Ordering::Relaxed)
    }

    pub fn busy_refusals(&self) -> u64 {
        self.stats.busy_refusals.load(Ordering::Relaxed)
    }

    pub fn auth_failures(&self) -> u64 {
        self.stats.auth_failures.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, options: Arc<SinkOptions>, stats: Arc<Stats>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (options, stats) = (options.clone(), stats.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                SINK_TIMEOUT * 10,
                connection(stream, peer, &options, &stats),
            )
            .await;
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    options: &SinkOptions,
    stats: &Stats,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (client, proxy_tls) = if options.proxy_protocol {
        match read_proxy_header(&mut stream).await? {
            (Some(client), tls) => (client, tls),
            (None, _) => return session(stream, peer, None, false, options, stats).await,
        }
    } else {
        (peer, None)
    };
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let active = stats.active.fetch_add(1, Ordering::SeqCst) + 1;
    stats.peak.fetch_max(active, Ordering::SeqCst);
    let busy = active > options.slots;
    let result = session(stream, client, proxy_tls, busy, options, stats).await;
    stats.active.fetch_sub(1, Ordering::SeqCst);
    result
}

async fn session(
    mut stream: TcpStream,
    client: SocketAddr,
    proxy_tls: Option<HeaderTls>,
    busy: bool,
    options: &SinkOptions,
    stats: &Stats,
) -> std::io::Result<()> {
    if busy {
        stats.busy_refusals.fetch_add(1, Ordering::Relaxed);
        stream
            .write_all(b"421 4.7.0 sink busy, all slots taken\r\n")
            .await?;
        return Ok(());
    }
    // Reads and writes go through the one BufReader, which passes writes on.
    let mut reader = BufReader::new(SinkStream::Left(stream));
    let mut in_tls = false;
    reader.write_all(b"220 sink.test ESMTP ready\r\n").await?;

    let mut helo = String::new();
    let mut mail_from: Option<String> = None;
    let mut rcpt_to = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if read_line(&mut reader, &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        let (verb, args) = text.split_once(' ').unwrap_or((text, ""));
        let reply: &[u8] = match verb.to_ascii_uppercase().as_str() {
            "EHLO" | "LHLO" => {
                helo = args.to_string();
                let mut ehlo = b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 209715200\r\n250-8BITMIME\r\n250-CHUNKING\r\n".to_vec();
                if in_tls || !options.auth_requires_tls {
                    ehlo.extend_from_slice(b"250-AUTH PLAIN\r\n");
                }
                if options.starttls_echo || (options.tls.is_some() && !in_tls) {
                    ehlo.extend_from_slice(b"250-STARTTLS\r\n");
                }
                ehlo.extend_from_slice(b"250 ENHANCEDSTATUSCODES\r\n");
                reader.write_all(&ehlo).await?;
                continue;
            }
            "HELO" => {
                helo = args.to_string();
                b"250 sink.test\r\n"
            }
            "MAIL" if mail_from.is_some() => b"503 5.5.1 nested MAIL\r\n",
            "MAIL" => {
                mail_from = Some(address(args));
                b"250 2.1.0 Ok\r\n"
            }
            "RCPT" if mail_from.is_none() => b"503 5.5.1 need MAIL\r\n",
            "RCPT" => {
                rcpt_to.push(address(args));
                b"250 2.1.5 Ok\r\n"
            }
            "DATA" if rcpt_to.is_empty() => b"554 5.5.1 no valid recipients\r\n",
            "DATA" => {
                reader
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let data = read_message(&mut reader).await?;
                let received = Received {
                    client,
                    helo: helo.clone(),
                    mail_from: mail_from.take().unwrap_or_default(),
                    rcpt_to: std::mem::take(&mut rcpt_to),
                    data,
                    tls: in_tls,
                    proxy_tls: proxy_tls.clone(),
                };
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                let mut kept = stats.messages.lock().expect("sink lock");
                if kept.len() == KEEP_MESSAGES {
                    kept.pop_front();
                }
                kept.push_back(received);
                drop(kept);
                b"250 2.0.0 Ok: queued\r\n"
            }
            "RSET" => {
                mail_from = None;
                rcpt_to.clear();
                b"250 2.0.0 Ok\r\n"
            }
            "NOOP" => b"250 2.0.0 Ok\r\n",
            "QUIT" => {
                reader.write_all(b"221 2.0.0 Bye\r\n").await?;
                let _ = reader.shutdown().await;
                return Ok(());
            }
            "AUTH" if options.auth_requires_tls && !in_tls => {
                b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
            }
            "AUTH" => {
                let mut response = args.split_once(' ').map(|(_, r)| r.to_string());
                if response.is_none() {
                    reader.write_all(b"334 \r\n").await?;
                    line.clear();
                    read_line(&mut reader, &mut line).await?;
                    response = Some(String::from_utf8_lossy(&line).trim_end().to_string());
                }
                if auth_ok(options, response.as_deref().unwrap_or_default()) {
                    b"235 2.7.0 Authentication successful\r\n"
                } else {
                    stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                    b"535 5.7.8 Authentication credentials invalid\r\n"
                }
            }
            "STARTTLS" if in_tls => b"554 5.5.1 Error: TLS already active\r\n",
            "STARTTLS" if options.starttls_echo => {
                reader
                    .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                    .await?;
                let mut buf = [0u8; 4096];
                loop {
                    let n = tokio::time::timeout(SINK_TIMEOUT, reader.read(&mut buf)).await??;
                    if n == 0 {
                        return Ok(());
                    }
                    reader.write_all(&buf[..n]).await?;
                }
            }
            "STARTTLS" if options.tls.is_some() => {
                reader
                    .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                    .await?;
                // Bytes sent with STARTTLS were written in the clear
                // (CVE-2011-0411): drop the connection, as Postfix does.
                let (Some(config), true) = (&options.tls, reader.buffer().is_empty()) else {
                    return Ok(());
                };
                let Either::Left(tcp) = reader.into_inner() else {
                    return Ok(());
                };
                let accept = TlsAcceptor::from(config.clone()).accept(tcp);
                let tls = tokio::time::timeout(SINK_TIMEOUT, accept).await??;
                reader = BufReader::new(SinkStream::Right(Box::new(tls)));
                in_tls = true;
                // RFC 3207: everything learnt before TLS is forgotten.
                helo.clear();
                mail_from = None;
                rcpt_to.clear();
                continue;
            }
            _ => b"502 5.5.2 Error: command not recognized\r\n",
        };
        reader.write_all(reply).await?;
    }
}

fn address(args: &str) -> String {
    let start = args.find('<').map_or(0, |i| i + 1);
    let end = args[start..].find('>').map_or(args.len(), |i| start + i);
    args[start..end].to_string()
}

fn auth_ok(options: &SinkOptions, response: &str) -> bool {
    let Some((user, password)) = &options.auth else {
        return false;
    };
    let expected =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    response == expected
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut limited = (&mut *reader).take(MAX_LINE);
    tokio::time::timeout(SINK_TIMEOUT, limited.read_until(b'\n', line)).await?
}

async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if read_line(reader, &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" {
            return Ok(data);
        }
        let unstuffed = if line.starts_with(b"..") {
            &line[1..]
        } else {
            &line[..]
        };
        data.extend_from_slice(unstuffed);
    }
}

/// The client a PROXY header names, or `None` for a health check (v2
/// `LOCAL`, v1 `UNKNOWN`), and the client's TLS if the header says it.
async fn read_proxy_header(
    stream: &mut TcpStream,
) -> std::io::Result<(Option<SocketAddr>, Option<HeaderTls>)> {
    use crate::proxy_protocol::{parse_inbound, Inbound, MAX_INBOUND_HEADER};
    let mut buf = Vec::with_capacity(MAX_INBOUND_HEADER);
    let mut byte = [0u8; 1];
    loop {
        if !buf.is_empty() {
            match parse_inbound(&buf) {
                Inbound::Proxied { client, .. } => {
                    return Ok((Some(client), crate::proxy_protocol::header_tls(&buf)))
                }
                Inbound::Local { .. } => return Ok((None, None)),
                Inbound::Malformed(e) => {
                    return Err(std::io::Error::other(format!("bad PROXY header: {e}")))
                }
                Inbound::Incomplete => {}
            }
        }
        if buf.len() >= MAX_INBOUND_HEADER {
            return Err(std::io::Error::other("PROXY header too long"));
        }
        // Byte at a time: the header is tiny and must not over-read the SMTP.
        tokio::time::timeout(SINK_TIMEOUT, stream.read_exact(&mut byte)).await??;
        buf.push(byte[0]);
    }
}
