//! What does it cost mailmoat to refuse a connection, against a bare tokio
//! server that only accepts, writes the same one-line reply and closes?
//!
//! SPEC ("Promises to measure"): at most 15 µs of CPU per refused
//! connection, SMTP reply included.
//!
//! - `blocked`: the client is in the blocklist file (127.0.0.9) → `554`.
//!   Once with info logging on (every refusal formats its "session closed"
//!   line, written to a sink rather than a terminal) and once with logs off.
//! - `capped`: `per_ip_connections = 1` and one connection from 127.0.0.10
//!   held in the greet pause → `421` (automatic bans are off here, or the
//!   21st refusal would turn the capped IP into a blocked one).
//!
//! Each criterion iteration is one refused connection; `concurrency`
//! clients connect at once from one source address, read the reply and
//! the close. Chunks of proxy refusals alternate with equal chunks sent to
//! the bare server, so both see the same noise; criterion times the
//! proxy's. CPU time is read per thread from `/proc/self/task/*/schedstat`
//! (nanoseconds) and summed over the server's runtime threads only, since
//! the client runs in the same process; kernel work on loopback is charged
//! to whichever thread runs it, alike for both servers.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::{us, verdict, Cpu, InProcessProxy, Mode, Samples, Smtp, ThreadCpu};
use criterion::SamplingMode;
use mailmoat::admission::Refusal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

/// SPEC: CPU per refused connection.
const CPU_TARGET: Duration = Duration::from_micros(15);
const BLOCKED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);
const CAPPED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const HOSTNAME: &str = "bench.proxy";
/// The bare server always says what a blocked client hears.
const BARE_CODE: u16 = 554;
/// Refusals per side before switching to the other server.
const CHUNK: u64 = 200;

/// One chunk: refusals, wall time, server CPU, whole-process CPU.
#[derive(Clone, Copy, Default)]
struct Chunk {
    n: u64,
    wall: Duration,
    cpu: Cpu,
    process_cpu: Cpu,
}

#[derive(Clone, Copy)]
struct Pair {
    proxy: Chunk,
    bare: Chunk,
}

struct Subject<'a> {
    id: &'a str,
    what: &'a str,
    ip: Ipv4Addr,
    code: u16,
    logs: LevelFilter,
    samples: Samples<Pair>,
}

fn main() {
    if common::listing() {
        return;
    }
    common::raise_fd_limit();
    let mode = Mode::detect();
    if !common::selected("refusals", &["blocked", "capped"]) {
        return;
    }
    let samples = mode.pick(10, 10, 30);
    let concurrency = 16;

    // The proxy logs like the binary at "info"; lines are formatted and
    // discarded, so what is measured is the proxy's work, not a terminal's.
    let (filter, logs) = reload::Layer::new(LevelFilter::INFO);
    Registry::default()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink))
        .init();

    let dir = std::env::temp_dir().join(format!("mailmoat-bench-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let blocklist = dir.join("blocklist.txt");
    std::fs::write(&blocklist, format!("{BLOCKED_IP}\n")).expect("write blocklist");
    let toml = format!(
        r#"
[server]
hostname = "{HOSTNAME}"
shutdown_grace = "1s"
[limits]
per_ip_connections = 1
[timeouts]
greet_pause = "1h"
[blocklist]
files = [{blocklist:?}]
[autoban]
limit_violations = 0
"#
    );

    let proxy_rt = common::runtime("bench-proxy", 2);
    let bare_rt = common::runtime("bench-bare", 2);
    let client_rt = common::runtime("bench-client", 0);
    let proxy = InProcessProxy::start(&proxy_rt, &toml, common::unused_addr());
    let bare_reply: &'static [u8] = Refusal::Blocked
        .reply(mailmoat::config::Protocol::Smtp, HOSTNAME)
        .leak()
        .as_bytes();
    let bare = {
        let _enter = bare_rt.enter();
        let listener = mailmoat::listener::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        bare_rt.spawn(bare_server(listener, bare_reply));
        addr
    };

    // The connection that fills 127.0.0.10's one slot, waiting in the pause.
    let mut held = client_rt.block_on(async {
        let stream = common::connect_from(CAPPED_IP, proxy.addr)
            .await
            .expect("connect");
        let mut held = Smtp::new(stream);
        let banner = held.line().await.expect("greet pause banner");
        assert!(
            banner.starts_with(b"220-"),
            "held connection is in the greet pause"
        );
        held
    });

    let subjects = [
        Subject {
            id: "blocked",
            what: "blocked IP (554), info logs formatted",
            ip: BLOCKED_IP,
            code: 554,
            logs: LevelFilter::INFO,
            samples: Samples::new(),
        },
        Subject {
            id: "blocked_nolog",
            what: "blocked IP (554), logs off",
            ip: BLOCKED_IP,
            code: 554,
            logs: LevelFilter::OFF,
            samples: Samples::new(),
        },
        Subject {
            id: "capped",
            what: "capped IP (421), info logs formatted",
            ip: CAPPED_IP,
            code: 421,
            logs: LevelFilter::INFO,
            samples: Samples::new(),
        },
    ];

    let mut c = common::criterion(mode);
    let mut group = c.benchmark_group("refusals");
    group.sampling_mode(SamplingMode::Flat).sample_size(samples);
    for s in &subjects {
        group.bench_function(s.id, |b| {
            b.iter_custom(|iters| {
                s.samples.call();
                let _ = logs.modify(|f| *f = s.logs);
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(CHUNK);
                    left -= n;
                    let run = |addr, ip, code, threads| {
                        client_rt.block_on(refuse(addr, ip, code, n, concurrency, threads))
                    };
                    let pair = Pair {
                        proxy: run(proxy.addr, s.ip, s.code, "bench-proxy"),
                        bare: run(bare, s.ip, BARE_CODE, "bench-bare"),
                    };
                    total += pair.proxy.wall;
                    s.samples.push(pair);
                }
                total
            })
        });
    }
    group.finish();
    c.final_summary();
    let _ = logs.modify(|f| *f = LevelFilter::INFO);

    common::header(
        "refusals: mailmoat refusing vs a bare tokio accept-write-close loop",
        mode,
    );
    println!(
        "  {concurrency} clients at once, one source IP each case; CPU = the server's runtime threads"
    );
    for s in &subjects {
        report(s.what, &s.samples.measured(samples));
    }

    // Still held, silent: the cap was in force for the whole run.
    client_rt.block_on(async {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(100), held.stream.read(&mut byte));
        assert!(read.await.is_err(), "the held connection stayed open");
    });
    drop(held);
    proxy.stop(&proxy_rt);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Accept, write the reply, close: the least a refusing server can do.
async fn bare_server(listener: tokio::net::TcpListener, reply: &'static [u8]) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.write_all(reply).await;
        });
    }
}

/// `n` connections from `ip`, `concurrency` at a time, each expecting a
/// `code` reply and the close; measures wall time and the CPU of threads
/// named `threads`.
async fn refuse(
    addr: SocketAddr,
    ip: Ipv4Addr,
    code: u16,
    n: u64,
    concurrency: usize,
    threads: &'static str,
) -> Chunk {
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = ThreadCpu::now();
    let start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n as usize) {
        let next = next.clone();
        clients.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n as usize {
                let stream = common::connect_from(ip, addr).await?;
                let mut c = Smtp::new(stream);
                let got = c.reply().await?;
                if got != code {
                    return Err(std::io::Error::other(format!("expected {code}, got {got}")));
                }
                c.until_closed().await?;
            }
            Ok::<_, std::io::Error>(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task").expect("refused as expected");
    }
    let wall = start.elapsed();
    let cpu_after = ThreadCpu::now();
    Chunk {
        n,
        wall,
        cpu: cpu_after.since(&cpu_before, threads),
        process_cpu: cpu_after.since(&cpu_before, ""),
    }
}

fn report(what: &str, pairs: &[Pair]) {
    let sum = |f: fn(&Pair) -> Chunk| {
        pairs.iter().map(f).fold(Chunk::default(), |a, c| Chunk {
            n: a.n + c.n,
            wall: a.wall + c.wall,
            cpu: a.cpu + c.cpu,
            process_cpu: a.process_cpu + c.process_cpu,
        })
    };
    let (p, b) = (sum(|p| p.proxy), sum(|p| p.bare));
    println!("  {what}: {} refusals each side", p.n);
    if p.n == 0 || b.n == 0 {
        println!("    not run (filtered out)");
        return;
    }
    let per = |d: Duration, n: u64| d / u32::try_from(n).unwrap_or(u32::MAX);
    let rate = |c: &Chunk| c.n as f64 / c.wall.as_secs_f64();
    let line = |name: &str, c: &Chunk| {
        println!(
            "    {name:<22} {:>7.0} refusals/s  CPU {}/refusal (user {}, system {}; whole process {})",
            rate(c),
            us(per(c.cpu.total, c.n)),
            us(per(c.cpu.user, c.n)),
            us(per(c.cpu.system, c.n)),
            us(per(c.process_cpu.total, c.n)),
        )
    };
    line("bare tokio (baseline)", &b);
    line("mailmoat", &p);
    let (p_cpu, b_cpu) = (per(p.cpu.total, p.n), per(b.cpu.total, b.n));
    println!(
        "    CPU ratio mailmoat/bare {:.2}× ({:+.2} µs per refusal); rate ratio {:.2}×; \
         SPEC target ≤ {}: {}",
        p_cpu.as_secs_f64() / b_cpu.as_secs_f64(),
        (p_cpu.as_secs_f64() - b_cpu.as_secs_f64()) * 1e6,
        rate(&p) / rate(&b),
        us(CPU_TARGET),
        verdict(p_cpu <= CPU_TARGET),
    );
}
