//! A private `redis-server` on loopback for the demo, the tests and the
//! benches: the real binary (Debian's `redis-server` package), never a
//! stand-in, on an ephemeral port, with no persistence, in a temp dir of
//! its own, killed when dropped.
//!
//! It can be killed (SIGKILL: gone at once, as in an outage), restarted
//! empty on the same port (as a Redis that lost its data), and frozen
//! (SIGSTOP: the port still accepts, nothing answers, as a Redis that
//! hangs).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout, Instant};

/// How long a started server has to answer PING.
const READY: Duration = Duration::from_secs(10);
/// Fresh ports tried when another process takes the one picked.
const PORT_ATTEMPTS: usize = 5;
const BINARY: &str = "redis-server";

#[derive(Debug, thiserror::Error)]
pub enum RedisServerError {
    #[error("redis-server is not on PATH (Debian: apt-get install redis-server)")]
    Missing,
    #[error("redis-server: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis-server on {addr} did not start: {reason}; its log:\n{log}")]
    NotStarted {
        addr: SocketAddr,
        reason: String,
        log: String,
    },
}

/// A running (or killed) `redis-server`.
pub struct RedisServer {
    addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
    /// Further `redis-server` arguments (TLS, a password).
    extra: Vec<String>,
}

impl RedisServer {
    /// The `redis-server` found on PATH, if any.
    pub fn binary() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(BINARY))
            .find(|candidate| candidate.is_file())
    }

    /// Starts one on a free loopback port and waits until it answers PING.
    pub async fn start() -> Result<RedisServer, RedisServerError> {
        RedisServer::start_with(Vec::new()).await
    }

    /// Starts one with further arguments (`--requirepass`, `--tls-port`
    /// and the certificate files...); the plaintext port still answers
    /// PING (or NOAUTH) for readiness.
    pub async fn start_with(extra: Vec<String>) -> Result<RedisServer, RedisServerError> {
        if RedisServer::binary().is_none() {
            return Err(RedisServerError::Missing);
        }
        let dir = temp_dir()?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let mut server = RedisServer {
                addr: free_port()?,
                dir: dir.clone(),
                child: None,
                extra: extra.clone(),
            };
            match server.spawn().await {
                Ok(()) => return Ok(server),
                // The port went to someone else between the pick and the
                // bind: pick another.
                Err(e) => {
                    server.dir = PathBuf::new();
                    last = Some(e);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(last.unwrap_or(RedisServerError::Missing))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT/0`, for `[fleet] url`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// The process id while it runs (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// SIGKILL: gone at once, connections reset, nothing saved.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = timeout(READY, child.wait()).await;
        }
    }

    /// Kills it if it runs, then starts an empty one on the same port.
    pub async fn restart_empty(&mut self) -> Result<(), RedisServerError> {
        self.kill().await;
        // The old process's socket is gone once it is reaped; a new bind
        // may still race a closing client, so retry for a moment.
        let deadline = Instant::now() + READY;
        loop {
            match self.spawn().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// SIGSTOP: the port still accepts connections and nothing answers,
    /// as a Redis that hangs.
    pub async fn freeze(&self) -> Result<(), RedisServerError> {
        self.signal("-STOP").await
    }

    /// SIGCONT after [`RedisServer::freeze`].
    pub async fn thaw(&self) -> Result<(), RedisServerError> {
        self.signal("-CONT").await
    }

    async fn signal(&self, signal: &str) -> Result<(), RedisServerError> {
        let pid = self.pid().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "redis-server is not running")
        })?;
        // kill(1), as forbid(unsafe_code) leaves no kill(2) here.
        let status = timeout(
            READY,
            Command::new("kill")
                .arg(signal)
                .arg(pid.to_string())
                .status(),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "kill(1) hung"))??;
        if !status.success() {
            return Err(std::io::Error::other(format!("kill {signal} {pid}: {status}")).into());
        }
        Ok(())
    }

    /// Runs the binary on `self.addr` and waits for PING.
    async fn spawn(&mut self) -> Result<(), RedisServerError> {
        let log = self.dir.join("redis.log");
        let mut child = Command::new(BINARY)
            .arg("--port")
            .arg(self.addr.port().to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => RedisServerError::Missing,
                _ => RedisServerError::Io(e),
            })?;
        let deadline = Instant::now() + READY;
        let reason = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("it exited ({status})");
            }
            if ping(self.addr).await {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                break format!("no PONG within {READY:?}");
            }
            sleep(Duration::from_millis(20)).await;
        };
        Err(RedisServerError::NotStarted {
            addr: self.addr,
            reason,
            log: read_log(&log),
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// True when `addr` answers `PING` within a short deadline: `+PONG`, or
/// `-NOAUTH` from one that requires a password.
pub async fn ping(addr: SocketAddr) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(&reply == b"+PONG\r\n" || &reply == b"-NOAUTH")
    };
    matches!(
        timeout(Duration::from_millis(500), exchange).await,
        Ok(Ok(true))
    )
}

/// A loopback port free a moment ago (bound, then released).
pub fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

fn temp_dir() -> std::io::Result<PathBuf> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mailmoat-redis-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The end of the server's log, for an error that says why it did not start.
fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
