//! Test harness: a proxy on an ephemeral loopback port in front of a sink,
//! clients bound to distinct 127.x.y.z sources, and SMTP helpers with
//! deadlines so nothing hangs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use lettre::Address;
use mailmoat::config::Config;
use mailmoat::metrics::Metrics;
use mailmoat::sink::{Sink, SinkOptions};
use mailmoat::Server;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::client::TlsStream;

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A config from `toml`, listening on an ephemeral port, relaying to `upstreams`.
pub fn config(toml: &str, upstreams: &[SocketAddr]) -> Config {
    let mut config = Config::from_toml(toml, Path::new("test.toml")).expect("test config is valid");
    config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    config.upstream.servers = upstreams.iter().map(|&a| a.into()).collect();
    config
}

impl TestProxy {
    pub async fn start(toml: &str, upstreams: &[SocketAddr]) -> TestProxy {
        TestProxy::start_with(config(toml, upstreams)).await
    }

    pub async fn start_with(config: Config) -> TestProxy {
        let server = Server::bind(config).await.expect("proxy binds");
        let addr = server.listen_addrs()[0];
        let admin = server.admin_addr();
        let metrics = server.metrics();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestProxy {
            addr,
            admin,
            metrics,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts the graceful shutdown; returns the task that completes when done.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("shutdown once")
    }

    /// The value of one metric line, e.g. `mailmoat_sessions_closed_total{reason="idle_timeout"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics.render(), series)
    }

    /// Waits until `series` reaches at least `value`.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let ok = wait_for(|| self.metric(series) >= value).await;
        assert!(
            ok,
            "{series} never reached {value}; metrics:\n{}",
            self.metrics.render()
        );
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The value of `series` in rendered metrics, 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    series_value(text, series).unwrap_or(0.0)
}

/// The value of `series` in rendered metrics, `None` when it is not exposed.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A loopback address nobody listens on (bound, then released): a dead
/// upstream, or a port for a spawned proxy.
pub fn unused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().unwrap()
}

/// Polls `cond` every 10 ms until it holds or `WAIT` passes.
pub async fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

pub async fn sink() -> Sink {
    sink_with(SinkOptions::default()).await
}

pub async fn sink_with(options: SinkOptions) -> Sink {
    Sink::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("sink binds")
}

/// A TCP connection to `addr` from the loopback source `ip`.
pub async fn connect_from(ip: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind((ip, 0).into()).unwrap();
    let stream = timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
}

/// A raw SMTP client for attacks and exact-byte checks, over TCP or, after
/// [`Raw::starttls`], over TLS.
pub struct Raw<S = TcpStream> {
    reader: BufReader<S>,
    /// What has been read of a reply not yet complete, kept across a wait
    /// that ran out so no byte is lost.
    partial: Vec<u8>,
}

impl Raw {
    pub async fn connect(ip: Ipv4Addr, addr: SocketAddr) -> Raw {
        Raw::from_stream(connect_from(ip, addr).await)
    }

    /// Connects as soon as something listens on `addr` (a process starting).
    pub async fn connect_when_ready(ip: Ipv4Addr, addr: SocketAddr) -> Raw {
        let deadline = Instant::now() + WAIT;
        loop {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind((ip, 0).into()).unwrap();
            match timeout_at(deadline, socket.connect(addr)).await {
                Ok(Ok(stream)) => return Raw::from_stream(stream),
                _ if Instant::now() >= deadline => panic!("{addr} never accepted"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn from_stream(stream: TcpStream) -> Raw {
        stream.set_nodelay(true).unwrap();
        Raw::over(stream)
    }

    /// Sends STARTTLS, expects `220`, and handshakes trusting `roots`.
    pub async fn starttls(
        mut self,
        roots: &[CertificateDer<'static>],
    ) -> Raw<TlsStream<TcpStream>> {
        self.send(b"STARTTLS\r\n").await;
        self.expect("220 ").await;
        assert!(self.reader.buffer().is_empty(), "bytes after the 220");
        Raw::over(tls_handshake(self.reader.into_inner(), roots).await)
    }
}

/// mailmoat's TLS client config trusting exactly `roots`.
pub fn tls_client_config(roots: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).expect("a usable root");
    }
    mailmoat::tls::client_config(store)
}

/// A client handshake for "localhost" over `stream`, within `WAIT`.
pub async fn tls_handshake(
    stream: TcpStream,
    roots: &[CertificateDer<'static>],
) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(roots));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    timeout(WAIT, connector.connect(name, stream))
        .await
        .expect("handshake in time")
        .expect("handshake")
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    pub fn over(stream: S) -> Raw<S> {
        Raw {
            reader: BufReader::new(stream),
            partial: Vec::new(),
        }
    }

    /// The stream under the client, for what SMTP cannot say.
    pub fn stream(&mut self) -> &mut S {
        self.reader.get_mut()
    }

    /// The stream, once nothing read is left unconsumed.
    pub fn into_stream(self) -> S {
        assert!(self.reader.buffer().is_empty(), "unread bytes");
        self.reader.into_inner()
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let stream = self.reader.get_mut();
        stream.write_all(bytes).await.expect("send");
        stream.flush().await.expect("flush");
    }

    /// Sends `bytes` within `WAIT`; an error (say, the server reset the
    /// connection) is the caller's to judge.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stream = self.reader.get_mut();
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        timeout(WAIT, write)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }

    /// One whole reply (all lines of a multi-line one), or "" at EOF.
    pub async fn reply(&mut self) -> String {
        self.reply_within(WAIT).await.expect("reply in time")
    }

    /// One whole reply, "" at EOF, or `None` if none completes within `limit`.
    pub async fn reply_within(&mut self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let read = timeout_at(deadline, self.reader.read_until(b'\n', &mut self.partial));
            let n = read.await.ok()?.unwrap_or(0);
            let body = &self.partial[..self.partial.len().saturating_sub(1)];
            let last_line = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if n == 0 || self.partial.get(last_line + 3) != Some(&b'-') {
                let reply = std::mem::take(&mut self.partial);
                return Some(String::from_utf8_lossy(&reply).into_owned());
            }
        }
    }

    /// The next reply, which must start with `prefix` (e.g. "250", "421 4.4.2").
    pub async fn expect(&mut self, prefix: &str) -> String {
        let reply = self.reply().await;
        assert!(
            reply.starts_with(prefix),
            "expected {prefix:?}, got {reply:?}"
        );
        reply
    }

    /// Reads until the server closes; returns what it said first.
    pub async fn closed(&mut self) -> String {
        let mut all = String::new();
        loop {
            match self.reply().await {
                reply if reply.is_empty() => return all,
                reply => all.push_str(&reply),
            }
        }
    }
}

/// Polls until a connection to `addr` is refused (its listener is gone).
pub async fn wait_refused(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if timeout(WAIT, TcpStream::connect(addr))
            .await
            .is_ok_and(|c| c.is_err())
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A raw session from `ip` past the banner and EHLO.
pub async fn session(ip: Ipv4Addr, addr: SocketAddr) -> Raw {
    let mut raw = Raw::connect(ip, addr).await;
    raw.expect("220 ").await;
    raw.send(b"EHLO client.test\r\n").await;
    raw.expect("250-").await;
    raw
}

/// Sends one message with lettre from the loopback source `ip`.
pub async fn send_mail(
    ip: Ipv4Addr,
    addr: SocketAddr,
    from: &str,
    to: &[&str],
    message: &[u8],
) -> Result<(), String> {
    let mut conn = AsyncSmtpConnection::connect_tokio1(
        addr,
        Some(WAIT),
        &ClientId::Domain("client.test".into()),
        None,
        Some(IpAddr::V4(ip)),
    )
    .await
    .map_err(|e| e.to_string())?;
    let envelope = lettre::address::Envelope::new(
        Some(from.parse::<Address>().unwrap()),
        to.iter().map(|t| t.parse::<Address>().unwrap()).collect(),
    )
    .unwrap();
    conn.send(&envelope, message)
        .await
        .map_err(|e| e.to_string())?;
    conn.quit().await.map_err(|e| e.to_string())?;
    Ok(())
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, None).await
}

/// One HTTP/1.1 request with an empty body, with a bearer token if given;
/// returns the status and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response)
            .await
            .unwrap();
        String::from_utf8_lossy(&response).into_owned()
    };
    let text = timeout(WAIT, exchange)
        .await
        .expect("http response in time");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A message of about `size` bytes: headers, then numbered 78-byte lines.
pub fn big_message(size: usize) -> Vec<u8> {
    let mut message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: big\r\n\r\n".to_vec();
    let mut n = 0;
    while message.len() < size {
        message.extend_from_slice(format!("{n:08} {}\r\n", "x".repeat(67)).as_bytes());
        n += 1;
    }
    message
}

/// A path under the system temp dir that no other test uses.
pub fn unique_temp_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("mailmoat-it-{}-{n}-{name}", std::process::id()))
}

/// A directory of its own under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = unique_temp_path(name);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// Writes `text` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real `mailmoat` binary, run from the repository root.
pub fn mailmoat() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailmoat"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .kill_on_drop(true);
    command
}

/// `mailmoat run -c config` in the background, its log (stderr) written to
/// `log`, killed when the handle drops.
pub fn mailmoat_logged(config: &Path, log: &Path) -> tokio::process::Child {
    mailmoat()
        .arg("run")
        .arg("-c")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("create the log file"))
        .spawn()
        .expect("spawn mailmoat")
}

/// Runs the binary to completion; returns (success, stderr).
pub async fn mailmoat_output(args: &[&str]) -> (bool, String) {
    let output = timeout(WAIT, mailmoat().args(args).output())
        .await
        .expect("mailmoat exits in time")
        .expect("mailmoat runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// What a run of the binary left: exit status, stdout, stderr.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary to completion with `args`.
pub async fn mailmoat_run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let output = timeout(WAIT, mailmoat().args(args).output())
        .await
        .expect("mailmoat exits in time")
        .expect("mailmoat runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A private `redis-server` on loopback (the real binary), or `None` with a
/// notice when it is not installed; under `CI` a missing one fails the
/// test, as CI installs it (`.ci/run`).
pub async fn redis_server(test: &str) -> Option<mailmoat::redis_server::RedisServer> {
    redis_server_with(test, Vec::new()).await
}

/// [`redis_server`] with further `redis-server` arguments.
pub async fn redis_server_with(
    test: &str,
    extra: Vec<String>,
) -> Option<mailmoat::redis_server::RedisServer> {
    use mailmoat::redis_server::{RedisServer, RedisServerError};
    match RedisServer::start_with(extra).await {
        Ok(server) => Some(server),
        Err(RedisServerError::Missing) if std::env::var_os("CI").is_none() => {
            eprintln!("notice: redis-server not installed; skipping {test}");
            None
        }
        Err(e) => panic!("{test} needs a real redis-server (CI installs it in .ci/run): {e}"),
    }
}
