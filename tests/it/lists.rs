//! Helpers for the blocklist tests: a scratch directory for list files, a
//! fake central API whose answers the test controls, and door checks (what
//! a new connection from one client IP is told first).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use crate::harness::{Raw, TestProxy, WAIT};

/// A directory of its own under the system temp dir, removed on drop.
pub struct ListDir(PathBuf);

impl ListDir {
    pub fn new(name: &str) -> ListDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "mailmoat-lists-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).expect("create temp dir");
        ListDir(path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for ListDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path as a TOML string.
pub fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Limits high enough that a test polling the door from one IP is never
/// refused by a rate or a cap, only by the lists.
pub const OPEN_LIMITS: &str = "[limits]\n\
    connection_rate = \"10000/s\"\n\
    connection_burst = 10000\n\
    per_ip_connections = 1000\n\
    per_prefix_connections = 1000\n";

/// A config with these block and allow files, `extra` lines in
/// `[blocklist]`, and `tail` after it (e.g. a `[blocklist.api]` section).
pub fn lists_toml(block: &[&Path], allow: &[&Path], extra: &str, tail: &str) -> String {
    let list = |paths: &[&Path]| {
        paths
            .iter()
            .map(|p| quoted(p))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{OPEN_LIMITS}\n[blocklist]\nfiles = [{}]\nallowlist_files = [{}]\n{extra}\n{tail}",
        list(block),
        list(allow)
    )
}

/// The first thing a new connection from `ip` is told ("" if it is closed
/// without a word).
pub async fn door(proxy: &TestProxy, ip: Ipv4Addr) -> String {
    Raw::connect(ip, proxy.addr).await.reply().await
}

/// Polls the door until a new connection from `ip` is told something
/// starting with `prefix`; panics at `deadline`.
pub async fn wait_door(proxy: &TestProxy, ip: Ipv4Addr, prefix: &str, deadline: Instant) {
    loop {
        let reply = door(proxy, ip).await;
        if reply.starts_with(prefix) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ip} was never told {prefix:?} in time; last reply {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The series name of a per-source blocklist metric.
pub fn per_source(metric: &str, source: &Path) -> String {
    format!("{metric}{{source=\"{}\"}}", source.display())
}

/// What the fake API answers, and what it was asked.
#[derive(Default)]
pub struct ApiState {
    pub status: u16,
    pub body: String,
    /// Sent as `ETag`; a request whose `If-None-Match` equals it gets 304.
    pub etag: Option<String>,
    /// Each request's headers (names lowercased) and the status answered.
    pub requests: Vec<(Vec<(String, String)>, u16)>,
}

/// A tiny HTTP/1.1 server on loopback playing the central blocklist API.
pub struct FakeApi {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ApiState>>,
    task: JoinHandle<()>,
}

impl FakeApi {
    pub async fn start(status: u16, body: &str, etag: Option<&str>) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ApiState {
            status,
            body: body.into(),
            etag: etag.map(String::from),
            requests: Vec::new(),
        }));
        let task = tokio::spawn(serve(listener, state.clone()));
        FakeApi { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/list", self.addr)
    }

    /// Changes what later requests are answered.
    pub fn answer(&self, status: u16, body: &str, etag: Option<&str>) {
        let mut state = self.state.lock().unwrap();
        state.status = status;
        state.body = body.into();
        state.etag = etag.map(String::from);
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// The value of header `name` in request `i`.
    pub fn header(&self, i: usize, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state
            .requests
            .get(i)?
            .0
            .iter()
            .find_map(|(n, v)| n.eq_ignore_ascii_case(name).then(|| v.clone()))
    }

    /// The statuses answered so far, in order.
    pub fn answered(&self) -> Vec<u16> {
        let state = self.state.lock().unwrap();
        state.requests.iter().map(|(_, s)| *s).collect()
    }

    /// Waits until `n` more requests than `seen` have been answered.
    pub async fn wait_requests(&self, seen: usize, n: usize) {
        let ok = crate::harness::wait_for(|| self.requests() >= seen + n).await;
        assert!(
            ok,
            "the API got {} requests, wanted {}",
            self.requests(),
            seen + n
        );
    }

    /// Stops listening: later connections to `addr` are refused.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<ApiState>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = timeout(WAIT, answer(&mut stream, &state)).await;
        });
    }
}

async fn answer(
    stream: &mut tokio::net::TcpStream,
    state: &Mutex<ApiState>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let response = {
        let mut state = state.lock().unwrap();
        let if_none_match = headers
            .iter()
            .find(|(n, _)| n == "if-none-match")
            .map(|(_, v)| v.as_str());
        let not_modified = state.etag.is_some() && state.etag.as_deref() == if_none_match;
        let status = if not_modified { 304 } else { state.status };
        let body = if status == 304 {
            ""
        } else {
            state.body.as_str()
        };
        let mut response = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if let Some(tag) = &state.etag {
            response.push_str(&format!("ETag: {tag}\r\n"));
        }
        response.push_str("\r\n");
        response.push_str(body);
        state.requests.push((headers, status));
        response
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
