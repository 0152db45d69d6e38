//! Test harness: a proxy on an ephemeral loopback port in front of a sink,
//! clients bound to distinct 127.x.y.z sources, and SMTP helpers with
//! deadlines so nothing hangs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use lettre::Address;
use mailmoat::config::Config;
use mailmoat::metrics::Metrics;
use mailmoat::sink::{Sink, SinkOptions};
use mailmoat::Server;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

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
    config.upstream.servers = upstreams.to_vec();
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
        assert!(ok, "{series} never reached {value}; metrics:\n{}", self.metrics.render());
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
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
    Sink::start("127.0.0.1:0".parse().unwrap(), options).await.expect("sink binds")
}

/// A TCP connection to `addr` from the loopback source `ip`.
pub async fn connect_from(ip: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind((ip, 0).into()).unwrap();
    let stream = timeout(WAIT, socket.connect(addr)).await.expect("connect in time").expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
}

/// A raw SMTP client for attacks and exact-byte checks.
pub struct Raw {
    reader: BufReader<TcpStream>,
}

impl Raw {
    pub async fn connect(ip: Ipv4Addr, addr: SocketAddr) -> Raw {
        Raw {
            reader: BufReader::new(connect_from(ip, addr).await),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).await.expect("send");
    }

    /// One whole reply (all lines of a multi-line one), or "" at EOF.
    pub async fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = timeout(WAIT, self.reader.read_line(&mut line))
                .await
                .expect("reply in time")
                .unwrap_or(0);
            if n == 0 {
                return reply;
            }
            reply.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return reply;
            }
        }
    }

    /// Reads until the server closes; returns what it said first.
    pub async fn closed(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match timeout(WAIT, self.reader.read_line(&mut line)).await.expect("close in time") {
                Ok(0) | Err(_) => return all,
                Ok(_) => all.push_str(&line),
            }
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

/// Sends one message with lettre from the loopback source `ip`.
pub async fn send_mail(ip: Ipv4Addr, addr: SocketAddr, from: &str, to: &[&str], message: &[u8]) -> Result<(), String> {
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
    conn.send(&envelope, message).await.map_err(|e| e.to_string())?;
    conn.quit().await.map_err(|e| e.to_string())?;
    Ok(())
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response))
        .await
        .expect("http response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
