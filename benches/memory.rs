//! How much resident memory does one idle client connection cost the real
//! mailmoat process, against a bare tokio server holding the same
//! connections?
//!
//! SPEC ("Promises to measure"): at most 3 KiB per idle connection waiting
//! for its greeting, at most 16 KiB per relayed idle session, measured at
//! 9,000 connections.
//!
//! - `greeting`: `greet_pause = "5m"`, so each client sits in the pause
//!   after its `220-` line, with no upstream connection. Baseline: a bare
//!   tokio task per connection that writes `220-` and awaits a read.
//! - `relayed`: no pause; each client reads the banner and sends EHLO, then
//!   idles with both legs open. The receiver is the built-in sink in this
//!   process. Baseline: a bare tokio proxy, `copy_bidirectional` per
//!   connection to the same sink (what a general-purpose TCP proxy does).
//!
//! The servers are child processes: the `mailmoat` binary with a temp
//! config, and this bench executable re-run as the bare server. Figure:
//! (VmRSS with N connections − VmRSS at rest) / N, at rest meaning after
//! start and a few connections opened and closed. Clients come from
//! 127.1.x.y, ten per address (the default per-IP cap).
//!
//! Open files: the limit here is 20,000 per process. A relayed session
//! holds two descriptors in the proxy, and this process holds both other
//! ends (client and sink), so N ≤ (limit − slack) / 2 = 9,000 at most,
//! SPEC's figure; a waiting client holds one descriptor in the proxy and
//! one here, and mailmoat's descriptor budget counts two per session in
//! both cases, so 9,000 for both (under the default `max_connections` of
//! 10,000).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use common::process::Process;
use common::{Idle, Mode, Resident, Smtp};
use mailmoat::sink::{Sink, SinkOptions};
use tokio::runtime::Runtime;

/// Set in the child: which bare server to be (`hold` or `relay`).
const CHILD_ENV: &str = "MAILMOAT_BENCH_BARE";
const GREETING_TARGET_KIB: f64 = 3.0;
const RELAYED_TARGET_KIB: f64 = 16.0;
/// Descriptors this process keeps beyond the connections.
const FD_SLACK: u64 = 200;
const PER_IP: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Greeting,
    Relayed,
}

/// Resident sizes of one server, in KiB.
struct Figures {
    resident: Resident,
    closed: u64,
    /// Filled again after closing: about `loaded` when freed memory is
    /// reused, `loaded` plus the growth again if it leaked.
    refilled: u64,
}

fn main() {
    if let Ok(role) = std::env::var(CHILD_ENV) {
        bare::run(&role);
        return;
    }
    if common::listing() {
        return;
    }
    let limit = common::raise_fd_limit();
    let mode = Mode::detect();
    if !common::selected("memory", &["greeting", "relayed"]) {
        return;
    }
    // Both cases at 9,000 connections, SPEC's figure. Issue 3 measured the
    // greeting case at 10,000, but mailmoat's descriptor budget counts two
    // per session even in the greet pause (the receiver's comes next):
    // under a 20,000 limit, less the reserve, 10,000 no longer all get in.
    let fit = |wanted: usize, per_conn: u64| {
        let most = (limit.saturating_sub(FD_SLACK) / per_conn) as usize;
        wanted.min(most)
    };
    let client_rt = common::runtime("bench-client", 2);
    let dir = std::env::temp_dir().join(format!("mailmoat-bench-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let greeting = fit(mode.pick(50, 1_000, 9_000), 1);
    let relayed = fit(mode.pick(50, 1_000, 9_000), 2);
    let greet = [
        run_case(&client_rt, &dir, Case::Greeting, Server::Bare, greeting),
        run_case(&client_rt, &dir, Case::Greeting, Server::Mailmoat, greeting),
    ];
    let relay = [
        run_case(&client_rt, &dir, Case::Relayed, Server::Bare, relayed),
        run_case(&client_rt, &dir, Case::Relayed, Server::Mailmoat, relayed),
    ];

    common::header(
        "memory: resident memory per idle connection, mailmoat vs bare tokio",
        mode,
    );
    println!(
        "  open-file limit {limit}; N = connections held at once (full mode: 9,000 in both cases)"
    );
    report(
        "waiting in the greet pause",
        "bare tokio: write 220-, await a read",
        &greet,
        GREETING_TARGET_KIB,
    );
    report(
        "relayed, idle after EHLO",
        "bare tokio: copy_bidirectional to the sink",
        &relay,
        RELAYED_TARGET_KIB,
    );
    if greeting < mode.pick(50, 1_000, 9_000) || relayed < mode.pick(50, 1_000, 9_000) {
        println!("  note: N lowered to fit the open-file limit of {limit}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Mailmoat,
    Bare,
}

fn run_case(rt: &Runtime, dir: &std::path::Path, case: Case, server: Server, n: usize) -> Figures {
    let sink = (case == Case::Relayed).then(|| {
        let options = SinkOptions {
            slots: n + 1_000,
            // The bare relay sends no PROXY header; mailmoat sends none either.
            proxy_protocol: false,
            ..SinkOptions::default()
        };
        rt.block_on(Sink::start("127.0.0.1:0".parse().unwrap(), options))
            .expect("sink binds")
    });
    let upstream = sink.as_ref().map_or_else(common::unused_addr, |s| s.addr());
    let listen = common::unused_addr();
    let child = match server {
        Server::Mailmoat => spawn_mailmoat(dir, case, listen, upstream),
        Server::Bare => spawn_bare(case, listen, upstream),
    };

    // At rest: started, and a few connections served and closed.
    let warm: Vec<Smtp> = rt.block_on(open_many(listen, case, 32, 6_000));
    drop(warm);
    std::thread::sleep(Duration::from_millis(500));
    let rest = child.rss_kib();

    let started = Instant::now();
    let conns = rt.block_on(open_many(listen, case, n, 0));
    let filled = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let loaded = child.rss_kib();
    if let Some(sink) = &sink {
        assert!(
            sink.active() >= n,
            "every relayed session reached the sink ({} of {n})",
            sink.active()
        );
    }
    // The sink closes sessions idle for 60 s; this must stay well inside.
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "filling took {filled:?}"
    );

    drop(conns);
    std::thread::sleep(Duration::from_millis(1_000));
    let closed = child.rss_kib();

    let conns = rt.block_on(open_many(listen, case, n, 0));
    std::thread::sleep(Duration::from_millis(500));
    let refilled = child.rss_kib();
    drop(conns);
    drop(child);
    if let Some(sink) = &sink {
        let deadline = Instant::now() + common::WAIT;
        while sink.active() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Figures {
        resident: Resident { rest, loaded, n },
        closed,
        refilled,
    }
}

fn spawn_mailmoat(
    dir: &std::path::Path,
    case: Case,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Process {
    let greet_pause = match case {
        Case::Greeting => "5m",
        Case::Relayed => "0s",
    };
    let config = format!(
        r#"
[server]
listen = ["{listen}"]
hostname = "bench.proxy"
max_connections = 20000
shutdown_grace = "1s"
[upstream]
servers = ["{upstream}"]
proxy_protocol = "off"
[limits]
per_prefix_connections = 100000
connection_burst = 100
[timeouts]
greet_pause = "{greet_pause}"
idle = "10m"
command_line = "10m"
session = "1h"
[blocklist]
files = []
[admin]
listen = ""
[log]
level = "warn"
"#
    );
    Process::mailmoat(dir, "mailmoat", &config, listen)
}

fn spawn_bare(case: Case, listen: SocketAddr, upstream: SocketAddr) -> Process {
    let role = match case {
        Case::Greeting => "hold",
        Case::Relayed => "relay",
    };
    let args = [listen.to_string(), upstream.to_string()];
    Process::this_bench("bare server", (CHILD_ENV, role), args, listen)
}

/// Opens `n` connections brought to `case`'s idle point, from client
/// addresses starting at the `first_ip`-th.
async fn open_many(addr: SocketAddr, case: Case, n: usize, first_ip: usize) -> Vec<Smtp> {
    let idle = match case {
        Case::Greeting => Idle::Greeting,
        Case::Relayed => Idle::Relayed,
    };
    common::open_idle(addr, idle, n, first_ip, PER_IP).await
}

fn report(what: &str, baseline: &str, figures: &[Figures; 2], target: f64) {
    let [bare, moat] = figures;
    println!("  {what} (N = {}):", moat.resident.n);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let line = |name: &str, f: &Figures| {
        println!(
            "    {name:<54} rest {:>5.1} MiB, with N {:>5.1} MiB → {:>5.2} KiB/connection \
             (all closed: {:.1} MiB; N again: {:.1} MiB)",
            mib(f.resident.rest),
            mib(f.resident.loaded),
            f.resident.per_conn_kib(),
            mib(f.closed),
            mib(f.refilled),
        )
    };
    line(&format!("{baseline} (baseline)"), bare);
    line("mailmoat", moat);
    println!(
        "    ratio mailmoat/bare {:.2}×; SPEC target ≤ {target} KiB: {}",
        moat.resident.per_conn_kib() / bare.resident.per_conn_kib().max(f64::MIN_POSITIVE),
        common::verdict(moat.resident.per_conn_kib() <= target),
    );
}

/// The baseline servers, run in a child copy of this executable.
mod bare {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// The child lives no longer than this, whatever happens to the parent.
    const LIFETIME: Duration = Duration::from_secs(600);

    pub fn run(role: &str) {
        super::common::raise_fd_limit();
        let args: Vec<SocketAddr> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        let (listen, upstream) = (args[0], args[1]);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let listener = mailmoat::listener::bind(listen).expect("bind");
            if role == "relay" {
                let relay = super::common::tcp_proxy(listener, upstream);
                let _ = tokio::time::timeout(LIFETIME, relay).await;
                return;
            }
            let serve = async {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    tokio::spawn(hold_one(client));
                }
            };
            let _ = tokio::time::timeout(LIFETIME, serve).await;
        });
    }

    async fn hold_one(mut client: TcpStream) {
        if client.write_all(b"220-bench ESMTP\r\n").await.is_err() {
            return;
        }
        let mut byte = [0u8; 1];
        let _ = tokio::time::timeout(LIFETIME, client.read(&mut byte)).await;
    }
}
