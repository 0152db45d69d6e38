//! Shared by the benches: the run mode, criterion's settings, an in-process
//! proxy, a raw SMTP client for loopback, CPU and memory readings, and the
//! printed comparison lines.
//!
//! Each bench is its own crate and uses a part of this module.
#![allow(dead_code)]

pub mod process;
pub mod receiver;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use criterion::Criterion;
use mailmoat::config::Config;
use mailmoat::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::runtime::Runtime;

/// Upper bound for any single network wait in a bench.
/// A proxy config whose limits no bench client reaches: what is measured
/// is the path, not a refusal.
pub const OPEN_LIMITS_TOML: &str = r#"
[server]
hostname = "bench.proxy"
shutdown_grace = "1s"
[limits]
connection_rate = "100000/s"
connection_burst = 100000
message_rate = "100000/s"
message_burst = 100000
recipient_rate = "100000/s"
recipient_burst = 100000
[timeouts]
session = "1h"
[blocklist]
files = []
"#;

pub const WAIT: Duration = Duration::from_secs(30);

/// How long and how hard to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `cargo test --benches`: run every path once, tiny, to prove it works.
    Smoke,
    /// `cargo bench`: a couple of minutes for all benches together.
    Short,
    /// `MAILMOAT_BENCH_FULL=1 cargo bench`: SPEC's sizes, longer samples.
    Full,
}

impl Mode {
    /// `cargo bench` passes `--bench`; without it (`cargo test --benches`)
    /// criterion runs in test mode, and so do we.
    pub fn detect() -> Mode {
        let args: Vec<String> = std::env::args().collect();
        let bench = args.iter().any(|a| a == "--bench");
        let test = args.iter().any(|a| a == "--test");
        if !bench || test {
            return Mode::Smoke;
        }
        match std::env::var("MAILMOAT_BENCH_FULL") {
            Ok(v) if !v.is_empty() && v != "0" => Mode::Full,
            _ => Mode::Short,
        }
    }

    pub fn pick<T>(self, smoke: T, short: T, full: T) -> T {
        match self {
            Mode::Smoke => smoke,
            Mode::Short => short,
            Mode::Full => full,
        }
    }

    pub fn name(self) -> &'static str {
        self.pick(
            "smoke (not a measurement)",
            "short (MAILMOAT_BENCH_FULL=1 for full)",
            "full",
        )
    }
}

/// `--list` (cargo nextest, IDEs): name nothing, run nothing.
pub fn listing() -> bool {
    std::env::args().any(|a| a == "--list")
}

/// False when a name filter was given (`cargo bench -- FILTER`) that
/// matches neither this bench nor any of `parts`.
pub fn selected(bench: &str, parts: &[&str]) -> bool {
    // Criterion's options that take a separate value, which is no filter.
    const WITH_VALUE: [&str; 19] = [
        "-c",
        "--color",
        "--save-baseline",
        "-s",
        "--baseline",
        "-b",
        "--baseline-lenient",
        "--load-baseline",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--profile-time",
        "--plotting-backend",
        "--output-format",
        "--format",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filter = args.iter().enumerate().find_map(|(i, a)| {
        let after_option = i > 0 && WITH_VALUE.contains(&args[i - 1].as_str());
        (!a.starts_with('-') && !after_option).then_some(a.as_str())
    });
    filter.is_none_or(|f| bench.contains(f) || parts.iter().any(|p| p.contains(f)))
}

/// Criterion with this mode's timings; flags on the command line win.
pub fn criterion(mode: Mode) -> Criterion {
    let c = Criterion::default().without_plots();
    let c = match mode {
        Mode::Smoke | Mode::Short => c
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(10),
        Mode::Full => c
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(15))
            .sample_size(30),
    };
    c.configure_from_args()
}

/// Raises the open-file soft limit to the hard limit; returns it.
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// `2 × AMD EPYC, load 1.52 1.41 0.80` for the report header.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{cpus} × {model}, load {load}")
}

pub fn header(title: &str, mode: Mode) {
    println!();
    println!("=== {title}");
    println!("    mode: {}; machine: {}", mode.name(), machine());
}

/// What one call of criterion's routine recorded, per call, so the
/// warm-up calls can be told from the measured ones: criterion calls the
/// routine once per sample, after its warm-up, so the last `sample_size`
/// calls are the measurement.
pub struct Samples<T> {
    calls: RefCell<Vec<Vec<T>>>,
}

impl<T: Clone> Samples<T> {
    pub fn new() -> Self {
        Samples {
            calls: RefCell::new(Vec::new()),
        }
    }

    /// Starts a routine call.
    pub fn call(&self) {
        self.calls.borrow_mut().push(Vec::new());
    }

    pub fn push(&self, value: T) {
        if let Some(call) = self.calls.borrow_mut().last_mut() {
            call.push(value);
        }
    }

    /// Everything recorded in the last `samples` calls.
    pub fn measured(&self, samples: usize) -> Vec<T> {
        let calls = self.calls.borrow();
        let skip = calls.len().saturating_sub(samples);
        calls[skip..].iter().flatten().cloned().collect()
    }
}

/// The `p`-th percentile (0–100), nearest rank; zero for no samples.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

pub fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

/// "meets" / "MISSES" beside a target.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "meets target"
    } else {
        "MISSES target"
    }
}

/// A proxy from the library, on its own runtime, until stopped.
pub struct InProcessProxy {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessProxy {
    /// Binds `config` (listening on an ephemeral loopback port, no admin
    /// listener, relaying to `upstream`) and runs it on `runtime`.
    pub fn start(runtime: &Runtime, toml: &str, upstream: SocketAddr) -> InProcessProxy {
        let mut config =
            Config::from_toml(toml, Path::new("bench.toml")).expect("bench config is valid");
        config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.admin.listen = None;
        config.upstream.servers = vec![upstream.into()];
        // Compared with a bare TCP proxy in front of the same receiver,
        // which sends no PROXY header.
        config.upstream.proxy_protocol = mailmoat::config::ProxyProtocol::Off;
        let server = runtime.block_on(Server::bind(config)).expect("proxy binds");
        let addr = server.listen_addrs()[0];
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(server.run(async {
            let _ = stopped.await;
        }));
        InProcessProxy {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub fn stop(mut self, runtime: &Runtime) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        let _ = runtime.block_on(async { tokio::time::timeout(WAIT, task).await });
    }
}

/// A general-purpose TCP proxy: each client gets its own connection to
/// `upstream` and `copy_bidirectional` (8 KiB buffers each way). The
/// baseline that knows nothing of SMTP.
pub async fn tcp_proxy(listener: tokio::net::TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Ok(mut upstream) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}

/// Starts [`tcp_proxy`] on `runtime`, on an ephemeral loopback port;
/// aborting the task closes the listener.
pub fn start_tcp_proxy(
    runtime: &Runtime,
    upstream: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let _enter = runtime.enter();
    let listener =
        mailmoat::listener::bind("127.0.0.1:0".parse().unwrap()).expect("bind the TCP proxy");
    let addr = listener.local_addr().expect("local addr");
    (addr, runtime.spawn(tcp_proxy(listener, upstream)))
}

/// A runtime whose threads are named `name`, so their CPU time can be
/// told apart; `workers` 0 means current-thread.
pub fn runtime(name: &str, workers: usize) -> Runtime {
    let mut builder = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A TCP connection from the loopback source `ip`.
pub async fn connect_from(ip: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((ip, 0).into())?;
    let stream = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A raw SMTP client: send bytes, read whole replies. Keeps no buffer
/// between replies beyond what the server sent ahead.
pub struct Smtp {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Smtp {
    pub fn new(stream: TcpStream) -> Smtp {
        Smtp {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn connect(addr: SocketAddr) -> std::io::Result<Smtp> {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(Smtp::new(stream))
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
    }

    /// The code of the next whole reply (all lines of a multi-line one).
    pub async fn reply(&mut self) -> std::io::Result<u16> {
        loop {
            if let Some((end, code)) = complete_reply(&self.buf) {
                self.buf.drain(..end);
                return Ok(code);
            }
            self.fill().await?;
        }
    }

    /// The next line, whatever it is (e.g. the `220-` of a greet pause).
    pub async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.drain(..=i).collect());
            }
            self.fill().await?;
        }
    }

    /// Sends `bytes`, then expects a reply with `code`.
    pub async fn command(&mut self, bytes: &[u8], code: u16) -> std::io::Result<()> {
        self.send(bytes).await?;
        self.expect(code).await
    }

    pub async fn expect(&mut self, code: u16) -> std::io::Result<()> {
        match self.reply().await? {
            c if c == code => Ok(()),
            c => Err(std::io::Error::other(format!("expected {code}, got {c}"))),
        }
    }

    /// Reads until the server closes.
    pub async fn until_closed(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 512];
        loop {
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no close"))??;
            if n == 0 {
                return Ok(());
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The end and code of the first whole reply in `buf`, if complete.
pub fn complete_reply(buf: &[u8]) -> Option<(usize, u16)> {
    let mut start = 0;
    while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + i + 1];
        start += i + 1;
        if line.get(3) != Some(&b'-') {
            let code = std::str::from_utf8(line.get(..3)?).ok()?.parse().ok()?;
            return Some((start, code));
        }
    }
    None
}

/// CPU used by some threads over an interval.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// On-CPU time, nanosecond resolution (schedstat).
    pub total: Duration,
    /// User and system shares, 10 ms resolution (stat's utime, stime).
    pub user: Duration,
    pub system: Duration,
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, o: Cpu) -> Cpu {
        Cpu {
            total: self.total + o.total,
            user: self.user + o.user,
            system: self.system + o.system,
        }
    }
}

struct ThreadTimes {
    name: String,
    ns: u64,
    user_ticks: u64,
    system_ticks: u64,
}

/// CPU time of each thread of this process, by thread id.
pub struct ThreadCpu(HashMap<u32, ThreadTimes>);

impl ThreadCpu {
    /// Reads `/proc/self/task/*/schedstat` (nanoseconds on CPU) and `stat`
    /// (utime, stime in clock ticks, used where schedstat is missing).
    pub fn now() -> ThreadCpu {
        let mut threads = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return ThreadCpu(threads);
        };
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let Some((user_ticks, system_ticks)) = stat_ticks(&path.join("stat")) else {
                continue;
            };
            let name = std::fs::read_to_string(path.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            let ns = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or((user_ticks + system_ticks) * TICK_NS);
            threads.insert(
                tid,
                ThreadTimes {
                    name,
                    ns,
                    user_ticks,
                    system_ticks,
                },
            );
        }
        ThreadCpu(threads)
    }

    /// CPU used since `earlier` by threads whose name starts with `prefix`
    /// ("" for all), counting only threads alive at both readings.
    pub fn since(&self, earlier: &ThreadCpu, prefix: &str) -> Cpu {
        let (mut ns, mut user, mut system) = (0, 0, 0);
        for (tid, now) in &self.0 {
            let Some(then) = earlier.0.get(tid).filter(|_| now.name.starts_with(prefix)) else {
                continue;
            };
            ns += now.ns.saturating_sub(then.ns);
            user += now.user_ticks.saturating_sub(then.user_ticks);
            system += now.system_ticks.saturating_sub(then.system_ticks);
        }
        Cpu {
            total: Duration::from_nanos(ns),
            user: Duration::from_nanos(user * TICK_NS),
            system: Duration::from_nanos(system * TICK_NS),
        }
    }
}

/// USER_HZ is 100 on Linux.
const TICK_NS: u64 = 10_000_000;

/// utime and stime from a `/proc/…/stat` file, in clock ticks.
fn stat_ticks(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces; fields resume after its ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// CPU used so far by the process `pid`: `total` sums its threads'
/// `/proc/PID/task/*/schedstat` (nanoseconds; threads that exited are
/// missing, a long-lived server's are not), the user/system split is
/// `/proc/PID/stat`'s utime and stime (10 ms ticks, exited threads
/// included). `None` once it is gone.
pub fn process_cpu(pid: u32) -> Option<Cpu> {
    let (user, system) = stat_ticks(Path::new(&format!("/proc/{pid}/stat")))?;
    let mut ns = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        ns += std::fs::read_to_string(entry.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    if ns == 0 {
        // No schedstat in this kernel: the ticks it is.
        ns = (user + system) * TICK_NS;
    }
    Some(Cpu {
        total: Duration::from_nanos(ns),
        user: Duration::from_nanos(user * TICK_NS),
        system: Duration::from_nanos(system * TICK_NS),
    })
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            total: self.total.saturating_sub(o.total),
            user: self.user.saturating_sub(o.user),
            system: self.system.saturating_sub(o.system),
        }
    }
}

/// Resident memory of `pid` ("self" for this process), in KiB.
pub fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A loopback port nobody listens on (bound, then released).
pub fn unused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr")
}

/// The `i`-th of many loopback client sources, `per_ip` connections each:
/// 127.1.x.y.
pub fn client_ip(i: usize, per_ip: usize) -> Ipv4Addr {
    let k = i / per_ip.max(1);
    Ipv4Addr::new(127, 1, (k >> 8) as u8, (k & 0xff) as u8)
}

/// Where [`open_idle`] leaves each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// Read the `220-` that starts a greet pause, and wait in it.
    Greeting,
    /// Read the `220`, sent `EHLO`, got the `250`: both legs open, idle.
    Relayed,
}

/// Connections opened at once by [`open_idle`].
const OPEN_BATCH: usize = 256;

/// Opens `n` connections to `addr` brought to `idle`, a batch at a time,
/// from sources [`client_ip`]`(first_ip × per_ip + i, per_ip)`: `per_ip`
/// connections per address, starting at the `first_ip`-th address.
pub async fn open_idle(
    addr: SocketAddr,
    idle: Idle,
    n: usize,
    first_ip: usize,
    per_ip: usize,
) -> Vec<Smtp> {
    let mut conns = Vec::with_capacity(n);
    let mut next = 0;
    while next < n {
        let mut batch = tokio::task::JoinSet::new();
        for i in next..(next + OPEN_BATCH).min(n) {
            let ip = client_ip(first_ip * per_ip + i, per_ip);
            batch.spawn(async move {
                let mut c = Smtp::new(connect_from(ip, addr).await?);
                match idle {
                    Idle::Greeting => {
                        let line = c.line().await?;
                        if !line.starts_with(b"220-") {
                            return Err(std::io::Error::other("no greet-pause banner"));
                        }
                    }
                    Idle::Relayed => {
                        c.expect(220).await?;
                        c.command(b"EHLO client.bench\r\n", 250).await?;
                    }
                }
                Ok::<_, std::io::Error>(c)
            });
        }
        while let Some(done) = batch.join_next().await {
            conns.push(
                done.expect("client task")
                    .expect("connection at its idle point"),
            );
        }
        next += OPEN_BATCH;
    }
    conns
}

/// A server's resident memory at rest and holding `n` connections, KiB.
#[derive(Clone, Copy)]
pub struct Resident {
    pub rest: u64,
    pub loaded: u64,
    pub n: usize,
}

impl Resident {
    pub fn per_conn_kib(&self) -> f64 {
        self.loaded.saturating_sub(self.rest) as f64 / self.n.max(1) as f64
    }
}

/// One whole transaction on a fresh connection from `ip` (connect, EHLO,
/// MAIL, RCPT, DATA with `message`, QUIT): its latency, from connect to the
/// `221`. The server closes first, then this side, so the client keeps no
/// TIME_WAIT.
pub async fn transaction(
    ip: Ipv4Addr,
    addr: SocketAddr,
    message: &[u8],
) -> std::io::Result<Duration> {
    let started = tokio::time::Instant::now();
    let mut c = Smtp::new(connect_from(ip, addr).await?);
    c.expect(220).await?;
    c.command(b"EHLO client.bench\r\n", 250).await?;
    c.command(b"MAIL FROM:<a@example.org>\r\n", 250).await?;
    c.command(b"RCPT TO:<b@example.net>\r\n", 250).await?;
    c.command(b"DATA\r\n", 354).await?;
    c.command(message, 250).await?;
    c.command(b"QUIT\r\n", 221).await?;
    let took = started.elapsed();
    c.until_closed().await?;
    Ok(took)
}

/// A small message: headers and one line.
pub const SMALL_MESSAGE: &[u8] =
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n\r\nhello\r\n.\r\n";

/// A message of `size` bytes of 78-byte lines, end marker included.
pub fn big_message(size: usize) -> Vec<u8> {
    let mut message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: big\r\n\r\n".to_vec();
    let mut n = 0u64;
    while message.len() + 80 < size {
        message.extend_from_slice(format!("{n:08} {}\r\n", "x".repeat(67)).as_bytes());
        n += 1;
    }
    message.extend_from_slice(b".\r\n");
    message
}
