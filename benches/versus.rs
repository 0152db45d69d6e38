//! mailmoat beside HAProxy beside no proxy at all, in one run, with the same
//! policy, the same receiver and the same client (issue 13).
//!
//! Reproduce: `cargo bench --bench versus` (short, under two minutes),
//! `MAILMOAT_BENCH_FULL=1 cargo bench --bench versus` (full: 20 MiB
//! messages, 9,000 connections), one part alone with
//! `cargo bench --bench versus -- bulk` (or `refusals`, `transactions`,
//! `flood`, `memory`). HAProxy is Debian's (`apt install haproxy`); without
//! it its column is skipped and the bench says so.
//!
//! The three paths:
//! - direct: client → receiver;
//! - HAProxy 2.6: client → `haproxy` (`mode tcp`, `nbthread 2`,
//!   `send-proxy-v2`) → receiver;
//! - mailmoat: client → the release binary (`mailmoat run -c`, two runtime
//!   workers on this 2-core machine, `proxy_protocol = "v2"`) → receiver.
//!
//! The same policy in both proxies: the blocklist file (one IP), at most
//! [`PER_IP_CAP`] connections per source IP, [`RATE_BURST`] new connections
//! per source per 10 s (HAProxy: a stick-table's `conn_cur` and
//! `conn_rate(10s)`; mailmoat: `per_ip_connections`, a token bucket of
//! [`RATE_BURST`] refilled at a tenth of that per second), [`MAXCONN`]
//! connections in all, 10-minute idle timeouts, no logging of sessions.
//! mailmoat's automatic bans are off (HAProxy has none); its other shaping
//! is in force but set where no client reaches it.
//!
//! The receiver is this bench executable re-run as a child process: one
//! SMTP server that accepts every message and keeps nothing, with a port
//! for the direct client and a port where a PROXY v2 header comes first.
//! The client runs in this process (tokio, current-thread). Each proxy is a
//! child process, so its CPU is its own: all its threads' on-CPU time from
//! `/proc/PID/task/*/schedstat` (nanoseconds), split into user and system
//! by `/proc/PID/stat` (10 ms ticks, so the split is coarse in short mode).
//!
//! The figures:
//! 1. `bulk`: one connection per path per round, one message of 78-byte
//!    lines, timed and CPU-read from the first body byte to the `250`.
//! 2. `refusals`: a blocked IP (mailmoat answers `554`, which the client
//!    checks; HAProxy closes silently) and an IP over its connection cap
//!    (mailmoat `421`): [`PER_IP_CAP`] connections from it are held open
//!    first, then it is hammered. Proxy CPU per refusal.
//! 3. `transactions`: fresh connection, `220`, EHLO, MAIL, RCPT, DATA with
//!    a 4 KiB body of 78-byte lines, QUIT, timed to the `221`, then the
//!    close (`common::transaction`); many source IPs
//!    (no limit is hit), [`CONCURRENCY`] at once. Latency and proxy CPU.
//! 4. `flood`: [`FLOOD_IPS`] IPs open connections as fast as they can
//!    ([`FLOOD_LOOPS`] loops each, on their own client thread) and are
//!    refused by the rate and cap limits, while one legitimate client runs
//!    sequential fresh-connection transactions from other IPs: its p50 and
//!    p99. Direct has no policy to refuse a flood with: its column is the
//!    legitimate client alone, no flood.
//! 5. `memory`: a fresh proxy process each, one at a time (open files),
//!    N idle relayed sessions (the client read the `220`, sent EHLO, got
//!    the `250`; both legs open): (VmRSS with N − VmRSS at rest) / N. For
//!    mailmoat also N connections waiting in a 5-minute greet pause.
//!
//! Paths take turns in rounds, rotating which goes first, so all see the
//! same noise on a shared machine.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::process::Process;
use common::{transaction, Cpu, Idle, Mode, Resident, Smtp, WAIT};
use tokio::time::Instant;

/// Set in the child that is the receiver.
const RECEIVER_ENV: &str = "MAILMOAT_BENCH_VERSUS_RECEIVER";

const DIRECT: usize = 0;
const HAPROXY: usize = 1;
const MAILMOAT: usize = 2;
const NAMES: [&str; 3] = ["direct", "HAProxy", "mailmoat"];
/// Column order in every table.
const COLUMNS: [usize; 3] = [MAILMOAT, HAPROXY, DIRECT];

/// Policy, the same in both proxies.
const PER_IP_CAP: usize = 10;
const RATE_BURST: u32 = 100;
/// Each proxy's connection cap; HAProxy sizes its open-file limit from it
/// (two descriptors per relayed session), which must fit the hard limit
/// of 20,000 here.
const MAXCONN: usize = 9_500;

/// Client sources, one range per part so no part inherits another's rate
/// state: 127.NET.x.y.
const TRANSACTION_NET: u8 = 2;
const LEGIT_NET: u8 = 7;
const BULK_IP: Ipv4Addr = Ipv4Addr::new(127, 4, 0, 1);
const BLOCKED_IP: Ipv4Addr = Ipv4Addr::new(127, 5, 0, 1);
const CAPPED_IP: Ipv4Addr = Ipv4Addr::new(127, 5, 0, 2);
const FLOOD_IPS: usize = 4;
const FLOOD_LOOPS: usize = 4;
/// Transactions per source IP, far under the cap and the burst.
const PER_IP: usize = 5;
/// Client tasks at once (refusals, transactions).
const CONCURRENCY: usize = 4;
/// Memory: descriptors the bench keeps beyond its connections.
const FD_SLACK: u64 = 300;
/// Memory: connections per client IP (the cap).
const MEMORY_PER_IP: usize = PER_IP_CAP;

/// What one path did over all rounds of a part.
#[derive(Clone, Default)]
struct Totals {
    /// Bytes, refusals or transactions.
    work: u64,
    /// The proxy's CPU (none for direct).
    proxy: Cpu,
    /// The receiver's CPU.
    receiver: Cpu,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Totals {
    fn add(&mut self, m: Measured, work: u64) {
        self.work += work;
        self.proxy = self.proxy + m.proxy;
        self.receiver = self.receiver + m.receiver;
        self.wall += m.wall;
    }

    /// CPU per unit of work, in `scale` (1e6: µs).
    fn per(&self, cpu: Duration, scale: f64) -> f64 {
        cpu.as_secs_f64() * scale / self.work.max(1) as f64
    }
}

/// One path of the three: where the client connects, and the proxy
/// process when there is one.
struct Subject<'a> {
    addr: SocketAddr,
    proxy: Option<&'a Process>,
}

/// CPU and wall time over an interval.
struct Meter<'a> {
    proxy: Option<&'a Process>,
    receiver: &'a Process,
    proxy_cpu: Cpu,
    receiver_cpu: Cpu,
    started: Instant,
}

struct Measured {
    proxy: Cpu,
    receiver: Cpu,
    wall: Duration,
}

impl<'a> Meter<'a> {
    fn start(proxy: Option<&'a Process>, receiver: &'a Process) -> Meter<'a> {
        Meter {
            proxy,
            receiver,
            proxy_cpu: proxy.map(Process::cpu).unwrap_or_default(),
            receiver_cpu: receiver.cpu(),
            started: Instant::now(),
        }
    }

    fn stop(self) -> Measured {
        let wall = self.started.elapsed();
        Measured {
            proxy: self.proxy.map(Process::cpu).unwrap_or_default() - self.proxy_cpu,
            receiver: self.receiver.cpu() - self.receiver_cpu,
            wall,
        }
    }
}

/// Figures for the closing summary, one row each.
struct Row {
    figure: String,
    unit: &'static str,
    values: [Option<f64>; 3],
    target: Target,
}

#[derive(Clone, Copy)]
enum Target {
    /// mailmoat ≤ HAProxy.
    NotAboveHaproxy,
    /// mailmoat ≤ HAProxy and mailmoat ≤ this.
    AtMost(f64),
    /// mailmoat ≤ this (no HAProxy figure).
    Only(f64),
    /// Reported, not a target.
    None,
}

fn main() {
    if std::env::var_os(RECEIVER_ENV).is_some() {
        receiver::run();
        return;
    }
    if common::listing() {
        return;
    }
    const PARTS: [&str; 5] = ["bulk", "refusals", "transactions", "flood", "memory"];
    if !common::selected("versus", &PARTS) {
        return;
    }
    let limit = common::raise_fd_limit();
    let mode = Mode::detect();
    let run = |part: &str| common::selected("versus", &[part]);

    let dir = std::env::temp_dir().join(format!("mailmoat-bench-versus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let blocklist = dir.join("blocked.lst");
    std::fs::write(&blocklist, format!("{BLOCKED_IP}\n")).expect("write the blocklist");

    let (direct_addr, proxied_addr) = (common::unused_addr(), common::unused_addr());
    let mut receiver = Process::this_bench(
        "receiver",
        (RECEIVER_ENV, "1"),
        [direct_addr.to_string(), proxied_addr.to_string()],
        direct_addr,
    );
    receiver.also_listening(proxied_addr);
    let haproxy_addr = common::unused_addr();
    let haproxy = Process::haproxy(
        &dir,
        "haproxy",
        &haproxy_config(haproxy_addr, proxied_addr, &blocklist),
        haproxy_addr,
    );
    let mailmoat_addr = common::unused_addr();
    let mailmoat = Process::mailmoat(
        &dir,
        "mailmoat",
        &mailmoat_config(mailmoat_addr, proxied_addr, &blocklist, "0s"),
        mailmoat_addr,
    );
    let subjects: [Option<Subject>; 3] = [
        Some(Subject {
            addr: direct_addr,
            proxy: None,
        }),
        haproxy.as_ref().map(|p| Subject {
            addr: p.addr,
            proxy: Some(p),
        }),
        Some(Subject {
            addr: mailmoat.addr,
            proxy: Some(&mailmoat),
        }),
    ];

    common::header(
        "versus: mailmoat vs HAProxy vs direct, same policy, same receiver, same run",
        mode,
    );
    match &haproxy {
        Some(_) => println!("  {}", common::process::haproxy_version()),
        None => println!(
            "  HAProxy: not installed (apt install haproxy): its column is skipped{}",
            if std::env::var_os("CI").is_some() {
                " (CI)"
            } else {
                ""
            }
        ),
    }
    println!(
        "  policy: blocklist {BLOCKED_IP}; ≤ {PER_IP_CAP} connections and ≤ {RATE_BURST} new \
         per 10 s per source IP; ≤ {MAXCONN} in all; both proxies 2 threads; open files {limit}"
    );

    let client_rt = common::runtime("bench-client", 0);
    let mut rows = Vec::new();
    if run("bulk") {
        bulk(mode, &client_rt, &subjects, &receiver, &mut rows);
    }
    if run("refusals") {
        refusals(mode, &client_rt, &subjects, &receiver, &mut rows);
    }
    if run("transactions") {
        transactions(mode, &client_rt, &subjects, &receiver, &mut rows);
    }
    if run("flood") {
        flood(mode, &client_rt, &subjects, &receiver, &mut rows);
    }
    if run("memory") {
        let context = MemoryContext {
            dir: &dir,
            blocklist: &blocklist,
            upstream: proxied_addr,
            receiver: &receiver,
            limit,
        };
        memory(mode, &client_rt, &context, haproxy.is_some(), &mut rows);
    }
    summary(mode, &rows);

    drop(mailmoat);
    drop(haproxy);
    drop(receiver);
    let _ = std::fs::remove_dir_all(&dir);
}

fn haproxy_config(addr: SocketAddr, upstream: SocketAddr, blocklist: &Path) -> String {
    // The blocklist before tracking, as mailmoat checks it before its caps.
    format!(
        "global\n\
         \x20   nbthread 2\n\
         \x20   maxconn {MAXCONN}\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   maxconn {MAXCONN}\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 10m\n\
         \x20   timeout server 10m\n\
         frontend smtp\n\
         \x20   bind {addr}\n\
         \x20   stick-table type ip size 100k expire 60s store conn_cur,conn_rate(10s)\n\
         \x20   tcp-request connection reject if {{ src -f {blocklist} }}\n\
         \x20   tcp-request connection track-sc0 src\n\
         \x20   tcp-request connection reject if {{ sc0_conn_cur gt {PER_IP_CAP} }}\n\
         \x20   tcp-request connection reject if {{ sc0_conn_rate gt {RATE_BURST} }}\n\
         \x20   default_backend receiver\n\
         backend receiver\n\
         \x20   server r {upstream} send-proxy-v2\n",
        blocklist = blocklist.display(),
    )
}

fn mailmoat_config(
    addr: SocketAddr,
    upstream: SocketAddr,
    blocklist: &Path,
    greet_pause: &str,
) -> String {
    format!(
        r#"
[server]
listen = ["{addr}"]
hostname = "bench.proxy"
max_connections = {MAXCONN}
shutdown_grace = "1s"

[upstream]
servers = ["{upstream}"]
proxy_protocol = "v2"

[limits]
per_ip_connections = {PER_IP_CAP}
# No prefix cap in HAProxy's policy: out of reach.
per_prefix_connections = 100000
# HAProxy's conn_rate(10s) ≤ {RATE_BURST}: a bucket of {RATE_BURST}, refilled in 10 s.
connection_rate = "{rate}/s"
connection_burst = {RATE_BURST}
message_rate = "100000/s"
message_burst = 100000
recipient_rate = "100000/s"
recipient_burst = 100000
max_message_size = "64MiB"

[timeouts]
greet_pause = "{greet_pause}"
idle = "10m"
command_line = "10m"
session = "1h"

[blocklist]
files = [{blocklist:?}]

[autoban]
limit_violations = 0

[admin]
listen = ""

[log]
level = "warn"
"#,
        rate = RATE_BURST / 10,
    )
}

/// The 127.NET.x.y address number `i`.
fn net_ip(net: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, net, (i >> 8) as u8, i as u8)
}

/// Each round, the paths in turn, the first one rotating.
fn order(round: usize) -> impl Iterator<Item = usize> {
    (0..3).map(move |k| (round + k) % 3)
}

// ---------------------------------------------------------------- bulk

fn bulk(
    mode: Mode,
    rt: &tokio::runtime::Runtime,
    subjects: &[Option<Subject>; 3],
    receiver: &Process,
    rows: &mut Vec<Row>,
) {
    // CPU is read in 10 ms ticks: 30 full rounds (600 MiB, about half a
    // second of proxy CPU) keep a tick under 2 % of the figure.
    let rounds = mode.pick(1, 5, 30);
    let size = mode.pick(256 << 10, 16 << 20, 20 << 20);
    let message = common::big_message(size);
    let mut totals: [Totals; 3] = Default::default();
    for round in 0..rounds {
        for path in order(round) {
            let Some(s) = &subjects[path] else { continue };
            let m = rt
                .block_on(bulk_once(s, receiver, &message))
                .unwrap_or_else(|e| panic!("{}: bulk: {e}", NAMES[path]));
            totals[path].add(m, message.len() as u64);
        }
    }

    const MIB: f64 = (1 << 20) as f64;
    let mib = |t: &Totals| t.work as f64 / MIB;
    let rate = |t: &Totals| mib(t) / t.wall.as_secs_f64().max(1e-9);
    let per_mib = |t: &Totals, cpu: Duration| cpu.as_secs_f64() * 1e3 / mib(t).max(1e-9);
    println!();
    println!(
        "  1. bulk DATA: {:.1} MiB messages of 78-byte lines, {rounds} rounds, one connection \
         per message; from the first body byte to the 250",
        size as f64 / MIB
    );
    table_header();
    let direct_rate = rate(&totals[DIRECT]);
    table_row("throughput MiB/s", subjects, |p| {
        Some(format!("{:.0}", rate(&totals[p])))
    });
    table_row("throughput vs direct", subjects, |p| {
        Some(format!("{:.2}×", rate(&totals[p]) / direct_rate))
    });
    table_row("proxy CPU ms/MiB", subjects, |p| {
        (p != DIRECT).then(|| format!("{:.2}", per_mib(&totals[p], totals[p].proxy.total)))
    });
    table_row("  user / system", subjects, |p| {
        let t = &totals[p];
        (p != DIRECT).then(|| {
            format!(
                "{:.2} / {:.2}",
                per_mib(t, t.proxy.user),
                per_mib(t, t.proxy.system)
            )
        })
    });
    table_row("receiver CPU ms/MiB", subjects, |p| {
        Some(format!(
            "{:.2}",
            per_mib(&totals[p], totals[p].receiver.total)
        ))
    });
    let cpu = |p: usize| per_mib(&totals[p], totals[p].proxy.total);
    ratio_line("proxy CPU per MiB", subjects, cpu(MAILMOAT), cpu(HAPROXY));
    rows.push(Row {
        figure: "bulk: proxy CPU per MiB (direct: receiver's)".into(),
        unit: "ms",
        values: values(subjects, |p| {
            if p == DIRECT {
                per_mib(&totals[p], totals[p].receiver.total)
            } else {
                cpu(p)
            }
        }),
        target: Target::NotAboveHaproxy,
    });
    rows.push(Row {
        figure: "bulk: throughput vs direct".into(),
        unit: "×",
        values: values(subjects, |p| rate(&totals[p]) / direct_rate),
        target: Target::None,
    });
}

/// EHLO, MAIL, RCPT, DATA on a fresh connection, then `message` measured,
/// then QUIT.
async fn bulk_once(
    s: &Subject<'_>,
    receiver: &Process,
    message: &[u8],
) -> std::io::Result<Measured> {
    let mut c = Smtp::new(common::connect_from(BULK_IP, s.addr).await?);
    c.expect(220).await?;
    c.command(b"EHLO client.bench\r\n", 250).await?;
    c.command(b"MAIL FROM:<a@example.org>\r\n", 250).await?;
    c.command(b"RCPT TO:<b@example.net>\r\n", 250).await?;
    c.command(b"DATA\r\n", 354).await?;
    let meter = Meter::start(s.proxy, receiver);
    c.command(message, 250).await?;
    let m = meter.stop();
    c.command(b"QUIT\r\n", 221).await?;
    c.until_closed().await?;
    Ok(m)
}

// ------------------------------------------------------------ refusals

#[derive(Clone, Copy)]
struct Refused {
    what: &'static str,
    ip: Ipv4Addr,
    /// mailmoat's reply; HAProxy closes without one.
    code: u16,
}

const REFUSED: [Refused; 2] = [
    Refused {
        what: "blocked IP",
        ip: BLOCKED_IP,
        code: 554,
    },
    Refused {
        what: "IP over its cap",
        ip: CAPPED_IP,
        code: 421,
    },
];

fn refusals(
    mode: Mode,
    rt: &tokio::runtime::Runtime,
    subjects: &[Option<Subject>; 3],
    receiver: &Process,
    rows: &mut Vec<Row>,
) {
    let rounds = mode.pick(1, 4, 5);
    let per_round = mode.pick(20, 1_000, 4_000);
    // The capped IP's slots, filled in both proxies for the whole part.
    let held: Vec<Vec<Smtp>> = [HAPROXY, MAILMOAT]
        .iter()
        .filter_map(|&p| subjects[p].as_ref())
        .map(|s| {
            rt.block_on(async {
                let mut held = Vec::new();
                for _ in 0..PER_IP_CAP {
                    let mut c = Smtp::new(common::connect_from(CAPPED_IP, s.addr).await?);
                    c.expect(220).await?;
                    held.push(c);
                }
                Ok::<_, std::io::Error>(held)
            })
            .expect("fill the capped IP's slots")
        })
        .collect();

    let mut totals: [[Totals; 3]; 2] = Default::default();
    for round in 0..rounds {
        for path in order(round).filter(|&p| p != DIRECT) {
            let Some(s) = &subjects[path] else { continue };
            for (k, r) in REFUSED.iter().enumerate() {
                let expect = (path == MAILMOAT).then_some(r.code);
                let meter = Meter::start(s.proxy, receiver);
                rt.block_on(refuse_many(s.addr, r.ip, expect, per_round))
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", NAMES[path], r.what));
                totals[k][path].add(meter.stop(), per_round as u64);
            }
        }
    }
    // Still open: the cap held for the whole part.
    for mut conns in held {
        rt.block_on(async {
            for c in &mut conns {
                c.command(b"QUIT\r\n", 221)
                    .await
                    .expect("held session alive");
            }
        });
    }

    println!();
    println!(
        "  2. refusals: {} per path per case, {CONCURRENCY} clients at once; the client reads \
         the reply (mailmoat) or the close (HAProxy)",
        rounds * per_round
    );
    table_header();
    for (k, r) in REFUSED.iter().enumerate() {
        let t = &totals[k];
        println!("    {}", r.what);
        table_row("  reply", subjects, |p| {
            Some(match p {
                MAILMOAT => r.code.to_string(),
                HAPROXY => "silent close".into(),
                _ => "—".into(),
            })
        });
        table_row("  proxy CPU µs/refusal", subjects, |p| {
            (p != DIRECT).then(|| format!("{:.1}", t[p].per(t[p].proxy.total, 1e6)))
        });
        table_row("    user / system", subjects, |p| {
            (p != DIRECT).then(|| {
                format!(
                    "{:.1} / {:.1}",
                    t[p].per(t[p].proxy.user, 1e6),
                    t[p].per(t[p].proxy.system, 1e6)
                )
            })
        });
        table_row("  refusals/s", subjects, |p| {
            (p != DIRECT).then(|| format!("{:.0}", t[p].work as f64 / t[p].wall.as_secs_f64()))
        });
        let cpu = |p: usize| t[p].per(t[p].proxy.total, 1e6);
        ratio_line(
            &format!("CPU per refusal, {}", r.what),
            subjects,
            cpu(MAILMOAT),
            cpu(HAPROXY),
        );
        rows.push(Row {
            figure: format!("proxy CPU per refusal, {} ({})", r.what, r.code),
            unit: "µs",
            values: values(subjects, |p| if p == DIRECT { f64::NAN } else { cpu(p) }),
            target: Target::NotAboveHaproxy,
        });
    }
}

/// `n` refused connections from `ip`, [`CONCURRENCY`] at a time: each
/// reads `expect` (or, for `None`, a close before any reply), then the close.
async fn refuse_many(
    addr: SocketAddr,
    ip: Ipv4Addr,
    expect: Option<u16>,
    n: usize,
) -> std::io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..CONCURRENCY {
        let count = n / CONCURRENCY + usize::from(k < n % CONCURRENCY);
        tasks.spawn(async move {
            for _ in 0..count {
                match refuse_once(addr, ip).await? {
                    got if got == expect => {}
                    got => {
                        return Err(std::io::Error::other(format!(
                            "expected {expect:?}, got {got:?}"
                        )))
                    }
                }
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("refusal task")?;
    }
    Ok(())
}

/// The reply code a connection from `ip` got, `None` for a close (or a
/// reset) before any reply; after a refusal, the close.
async fn refuse_once(addr: SocketAddr, ip: Ipv4Addr) -> std::io::Result<Option<u16>> {
    // A reset can come as soon as the connect completes (setting
    // TCP_NODELAY on it then fails): a silent refusal all the same.
    let mut c = match common::connect_from(ip, addr).await {
        Ok(stream) => Smtp::new(stream),
        Err(e) if closed(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let got = match c.reply().await {
        Ok(code) => Some(code),
        Err(e) if closed(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    if got == Some(220) {
        // Admitted (a flood's first connections): hang up.
        return Ok(got);
    }
    // The server closes first, so no TIME_WAIT holds this client's port.
    match c.until_closed().await {
        Err(e) if !closed(&e) => Err(e),
        _ => Ok(got),
    }
}

fn closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted
    )
}

// -------------------------------------------------------- transactions

fn transactions(
    mode: Mode,
    rt: &tokio::runtime::Runtime,
    subjects: &[Option<Subject>; 3],
    receiver: &Process,
    rows: &mut Vec<Row>,
) {
    let rounds = mode.pick(1, 3, 5);
    let per_round = mode.pick(20, 600, 2_000);
    let body = Arc::new(common::big_message(4 << 10));
    let mut totals: [Totals; 3] = Default::default();
    for round in 0..rounds {
        for path in order(round) {
            let Some(s) = &subjects[path] else { continue };
            let first = round * per_round;
            let meter = Meter::start(s.proxy, receiver);
            let latencies = rt
                .block_on(transactions_many(s.addr, &body, first..first + per_round))
                .unwrap_or_else(|e| panic!("{}: transaction: {e}", NAMES[path]));
            totals[path].add(meter.stop(), per_round as u64);
            totals[path].latencies.extend(latencies);
        }
    }

    println!();
    println!(
        "  3. fresh-connection transactions: connect, 220, EHLO, MAIL, RCPT, DATA ({} B of \
         78-byte lines), QUIT, 221, close; {} per path from {} source IPs, {CONCURRENCY} at once",
        body.len(),
        rounds * per_round,
        (rounds * per_round).div_ceil(PER_IP)
    );
    table_header();
    latency_rows(subjects, &totals);
    table_row("transactions/s", subjects, |p| {
        let t = &totals[p];
        Some(format!("{:.0}", t.work as f64 / t.wall.as_secs_f64()))
    });
    table_row("proxy CPU µs/transaction", subjects, |p| {
        (p != DIRECT).then(|| format!("{:.0}", totals[p].per(totals[p].proxy.total, 1e6)))
    });
    table_row("  user / system", subjects, |p| {
        let t = &totals[p];
        (p != DIRECT).then(|| {
            format!(
                "{:.0} / {:.0}",
                t.per(t.proxy.user, 1e6),
                t.per(t.proxy.system, 1e6)
            )
        })
    });
    table_row("receiver CPU µs/transaction", subjects, |p| {
        Some(format!(
            "{:.0}",
            totals[p].per(totals[p].receiver.total, 1e6)
        ))
    });
    let cpu = |p: usize| totals[p].per(totals[p].proxy.total, 1e6);
    ratio_line(
        "proxy CPU per transaction",
        subjects,
        cpu(MAILMOAT),
        cpu(HAPROXY),
    );
    rows.push(Row {
        figure: "proxy CPU per transaction (direct: receiver's)".into(),
        unit: "µs",
        values: values(subjects, |p| {
            if p == DIRECT {
                totals[p].per(totals[p].receiver.total, 1e6)
            } else {
                cpu(p)
            }
        }),
        target: Target::NotAboveHaproxy,
    });
    rows.push(Row {
        figure: "transaction p99 latency".into(),
        unit: "ms",
        values: values(subjects, |p| p99_ms(&totals[p].latencies)),
        target: Target::None,
    });
}

/// The transactions numbered `range` ([`PER_IP`] per source IP in
/// 127.2.x.y), [`CONCURRENCY`] at a time; the latency of each.
async fn transactions_many(
    addr: SocketAddr,
    body: &Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
) -> std::io::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(range.len());
    let mut next = range.start;
    let mut running = tokio::task::JoinSet::new();
    while next < range.end || !running.is_empty() {
        while next < range.end && running.len() < CONCURRENCY {
            let ip = net_ip(TRANSACTION_NET, next / PER_IP);
            let body = Arc::clone(body);
            running.spawn(async move { transaction(ip, addr, &body).await });
            next += 1;
        }
        if let Some(done) = running.join_next().await {
            latencies.push(done.expect("transaction task")?);
        }
    }
    Ok(latencies)
}

fn latency_rows(subjects: &[Option<Subject>; 3], totals: &[Totals; 3]) {
    for (label, p) in [("latency p50 ms", 50.0), ("latency p99 ms", 99.0)] {
        table_row(label, subjects, |path| {
            let d = common::percentile(&totals[path].latencies, p);
            Some(format!("{:.2}", d.as_secs_f64() * 1e3))
        });
    }
}

fn p99_ms(latencies: &[Duration]) -> f64 {
    common::percentile(latencies, 99.0).as_secs_f64() * 1e3
}

// --------------------------------------------------------------- flood

/// What the flooding clients got.
#[derive(Default)]
struct FloodCounts {
    refused: AtomicU64,
    admitted: AtomicU64,
    failed: AtomicU64,
}

impl FloodCounts {
    fn attempts(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
            + self.admitted.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
    }
}

fn flood(
    mode: Mode,
    rt: &tokio::runtime::Runtime,
    subjects: &[Option<Subject>; 3],
    receiver: &Process,
    rows: &mut Vec<Row>,
) {
    let rounds = mode.pick(1, 2, 3);
    let legit_per_round = mode.pick(10, 150, 500);
    let body = common::big_message(4 << 10);
    let mut totals: [Totals; 3] = Default::default();
    let mut counts: [(u64, u64, u64); 3] = Default::default();
    for round in 0..rounds {
        for path in order(round) {
            let Some(s) = &subjects[path] else { continue };
            let stop = Arc::new(AtomicBool::new(false));
            let flood = Arc::new(FloodCounts::default());
            let flooder = (path != DIRECT).then(|| {
                let (stop, flood, addr) = (Arc::clone(&stop), Arc::clone(&flood), s.addr);
                std::thread::spawn(move || flood_run(addr, &stop, &flood))
            });
            // Legitimate transactions start once the flood is under way.
            let deadline = Instant::now() + WAIT;
            while flooder.is_some() && flood.attempts() < 100 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let meter = Meter::start(s.proxy, receiver);
            let attempts_before = flood.attempts();
            let first = (round * 3 + path) * legit_per_round;
            let latencies = rt.block_on(async {
                let mut latencies = Vec::with_capacity(legit_per_round);
                for i in first..first + legit_per_round {
                    let ip = net_ip(LEGIT_NET, i / PER_IP);
                    latencies.push(transaction(ip, s.addr, &body).await?);
                }
                Ok::<_, std::io::Error>(latencies)
            });
            let m = meter.stop();
            let during = flood.attempts() - attempts_before;
            stop.store(true, Ordering::Relaxed);
            if let Some(flooder) = flooder {
                flooder.join().expect("flood thread");
            }
            let latencies =
                latencies.unwrap_or_else(|e| panic!("{}: legitimate client: {e}", NAMES[path]));
            totals[path].add(m, during);
            totals[path].latencies.extend(latencies);
            let c = &mut counts[path];
            c.0 += flood.refused.load(Ordering::Relaxed);
            c.1 += flood.admitted.load(Ordering::Relaxed);
            c.2 += flood.failed.load(Ordering::Relaxed);
        }
    }

    println!();
    println!(
        "  4. flood: {FLOOD_IPS} IPs × {FLOOD_LOOPS} loops connecting as fast as they can, \
         while one legitimate client runs {} sequential fresh-connection transactions per \
         path ({PER_IP} per source IP); direct: the legitimate client alone, no flood",
        rounds * legit_per_round
    );
    table_header();
    latency_rows(subjects, &totals);
    table_row("flood refused / admitted", subjects, |p| {
        (p != DIRECT).then(|| format!("{} / {}", counts[p].0, counts[p].1))
    });
    table_row("flood failed (timeout…)", subjects, |p| {
        (p != DIRECT).then(|| counts[p].2.to_string())
    });
    table_row("flood attempts/s (legit window)", subjects, |p| {
        let t = &totals[p];
        (p != DIRECT).then(|| format!("{:.0}", t.work as f64 / t.wall.as_secs_f64()))
    });
    table_row("proxy CPU % of a core", subjects, |p| {
        let t = &totals[p];
        (p != DIRECT).then(|| {
            format!(
                "{:.0}",
                t.proxy.total.as_secs_f64() * 100.0 / t.wall.as_secs_f64()
            )
        })
    });
    table_row("proxy CPU µs/attempt (+legit)", subjects, |p| {
        let t = &totals[p];
        (p != DIRECT).then(|| format!("{:.1}", t.per(t.proxy.total, 1e6)))
    });
    let p99 = |p: usize| p99_ms(&totals[p].latencies);
    ratio_line(
        "legitimate p99 during the flood",
        subjects,
        p99(MAILMOAT),
        p99(HAPROXY),
    );
    rows.push(Row {
        figure: "flood: legitimate p99 (direct: no flood)".into(),
        unit: "ms",
        values: values(subjects, p99),
        target: Target::NotAboveHaproxy,
    });
}

/// Floods `addr` from [`FLOOD_IPS`] addresses until `stop`, counting.
fn flood_run(addr: SocketAddr, stop: &Arc<AtomicBool>, counts: &Arc<FloodCounts>) {
    let rt = common::runtime("bench-flood", 0);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut loops = tokio::task::JoinSet::new();
        for ip in 0..FLOOD_IPS {
            let ip = Ipv4Addr::new(127, 6, 0, ip as u8 + 1);
            for _ in 0..FLOOD_LOOPS {
                let (stop, counts) = (Arc::clone(stop), Arc::clone(counts));
                loops.spawn(async move {
                    for _ in 0..10_000_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        let counter = match refuse_once(addr, ip).await {
                            Ok(Some(220)) => &counts.admitted,
                            Ok(Some(421 | 554) | None) => &counts.refused,
                            Ok(Some(_)) | Err(_) => &counts.failed,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
        while loops.join_next().await.is_some() {}
    });
}

// -------------------------------------------------------------- memory

struct MemoryContext<'a> {
    dir: &'a Path,
    blocklist: &'a Path,
    upstream: SocketAddr,
    receiver: &'a Process,
    limit: u64,
}

fn memory(
    mode: Mode,
    rt: &tokio::runtime::Runtime,
    cx: &MemoryContext,
    with_haproxy: bool,
    rows: &mut Vec<Row>,
) {
    // Each relayed session: two descriptors in the proxy, one here and
    // one in the receiver.
    let wanted = mode.pick(50, 1_000, 9_000);
    let n = wanted.min((cx.limit.saturating_sub(FD_SLACK) / 2) as usize);
    let start_haproxy = || {
        let addr = common::unused_addr();
        let config = haproxy_config(addr, cx.upstream, cx.blocklist);
        Process::haproxy(cx.dir, "haproxy-memory", &config, addr).expect("HAProxy is installed")
    };
    let start_mailmoat = |greet_pause: &str| {
        let addr = common::unused_addr();
        let config = mailmoat_config(addr, cx.upstream, cx.blocklist, greet_pause);
        Process::mailmoat(cx.dir, "mailmoat-memory", &config, addr)
    };
    let haproxy = with_haproxy.then(|| memory_case(rt, cx, start_haproxy(), Idle::Relayed, n));
    let relayed = memory_case(rt, cx, start_mailmoat("0s"), Idle::Relayed, n);
    let greeting = memory_case(rt, cx, start_mailmoat("5m"), Idle::Greeting, n);

    println!();
    println!(
        "  5. memory: N = {n} connections held at once{}, {MEMORY_PER_IP} per source IP, \
         a fresh proxy process each; (VmRSS with N − VmRSS at rest) / N",
        if n < wanted {
            format!(" (lowered from {wanted} to fit {} open files)", cx.limit)
        } else {
            String::new()
        }
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let line = |name: &str, m: &Resident| {
        println!(
            "    {name:<44} rest {:>6.1} MiB, with N {:>6.1} MiB → {:>5.2} KiB/connection",
            mib(m.rest),
            mib(m.loaded),
            m.per_conn_kib()
        )
    };
    match &haproxy {
        Some(m) => line("HAProxy, relayed idle (after EHLO)", m),
        None => println!("    HAProxy: skipped (not installed)"),
    }
    line("mailmoat, relayed idle (after EHLO)", &relayed);
    line("mailmoat, waiting in the greet pause", &greeting);
    let h = haproxy.as_ref().map(Resident::per_conn_kib);
    ratio_line_opt("memory per relayed idle session", relayed.per_conn_kib(), h);
    rows.push(Row {
        figure: "memory per relayed idle session".into(),
        unit: "KiB",
        values: [None, h, Some(relayed.per_conn_kib())],
        target: Target::AtMost(3.0),
    });
    rows.push(Row {
        figure: "memory per connection in the greet pause".into(),
        unit: "KiB",
        values: [None, None, Some(greeting.per_conn_kib())],
        target: Target::Only(3.0),
    });
}

/// Fills `proxy` with `n` connections at `idle`, reads its RSS, closes
/// them and stops it.
fn memory_case(
    rt: &tokio::runtime::Runtime,
    cx: &MemoryContext,
    proxy: Process,
    idle: Idle,
    n: usize,
) -> Resident {
    // At rest: started, and a few connections served and closed (from
    // addresses the fill does not use).
    drop(rt.block_on(common::open_idle(
        proxy.addr,
        idle,
        32,
        6_000,
        MEMORY_PER_IP,
    )));
    std::thread::sleep(Duration::from_millis(500));
    let rest = proxy.rss_kib();
    let started = Instant::now();
    let conns = rt.block_on(common::open_idle(proxy.addr, idle, n, 0, MEMORY_PER_IP));
    std::thread::sleep(Duration::from_millis(500));
    let loaded = proxy.rss_kib();
    assert!(
        started.elapsed() < Duration::from_secs(300),
        "{}: filling took {:?}, near the idle timeouts",
        proxy.name,
        started.elapsed()
    );
    drop(conns);
    drop(proxy);
    // The receiver's ends close too before the next case counts on its
    // descriptors.
    let deadline = Instant::now() + WAIT;
    while open_fds(cx.receiver.pid()) > 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Resident { rest, loaded, n }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

// ------------------------------------------------------------- tables

fn table_header() {
    print!("    {:<32}", "");
    for p in COLUMNS {
        print!(" {:>16}", NAMES[p]);
    }
    println!();
}

/// One line of a part's table; a `None` cell, or a path that was not run,
/// prints "—".
fn table_row(
    label: &str,
    subjects: &[Option<Subject>; 3],
    mut cell: impl FnMut(usize) -> Option<String>,
) {
    print!("    {label:<32}");
    for p in COLUMNS {
        let text = if subjects[p].is_some() { cell(p) } else { None };
        print!(" {:>16}", text.as_deref().unwrap_or("—"));
    }
    println!();
}

fn values(subjects: &[Option<Subject>; 3], f: impl Fn(usize) -> f64) -> [Option<f64>; 3] {
    std::array::from_fn(|p| subjects[p].as_ref().map(|_| f(p)).filter(|v| v.is_finite()))
}

fn ratio_line(what: &str, subjects: &[Option<Subject>; 3], mailmoat: f64, haproxy: f64) {
    ratio_line_opt(what, mailmoat, subjects[HAPROXY].as_ref().map(|_| haproxy));
}

fn ratio_line_opt(what: &str, mailmoat: f64, haproxy: Option<f64>) {
    match haproxy {
        Some(h) => {
            let ratio = mailmoat / h;
            println!(
                "    {what}: mailmoat/HAProxy {ratio:.2}× (target ≤ 1×: {})",
                common::verdict(ratio <= 1.0)
            );
        }
        None => println!("    {what}: no HAProxy to compare with"),
    }
}

fn summary(mode: Mode, rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("  summary ({}):", mode.name());
    println!(
        "    {:<48} {:>10} {:>10} {:>10} {:>9}  target",
        "figure", "mailmoat", "HAProxy", "direct", "m/H"
    );
    for r in rows {
        let cell = |v: Option<f64>| match v {
            Some(v) if r.unit == "×" => format!("{v:.2}×"),
            Some(v) if v >= 100.0 => format!("{v:.0} {}", r.unit),
            Some(v) => format!("{v:.2} {}", r.unit),
            None => "—".into(),
        };
        let [direct, haproxy, mailmoat] = r.values;
        let ratio = mailmoat.zip(haproxy).map(|(m, h)| m / h);
        let verdict = match (r.target, mailmoat, ratio) {
            (Target::None, ..) => "(no target)".to_string(),
            (Target::NotAboveHaproxy, _, Some(ratio)) => met(ratio <= 1.0, "≤ HAProxy"),
            (Target::AtMost(most), Some(m), Some(ratio)) => met(
                ratio <= 1.0 && m <= most,
                &format!("≤ HAProxy and ≤ {most} {}", r.unit),
            ),
            (Target::AtMost(most) | Target::Only(most), Some(m), _) => {
                met(m <= most, &format!("≤ {most} {}", r.unit))
            }
            _ => "no HAProxy figure".to_string(),
        };
        println!(
            "    {:<48} {:>10} {:>10} {:>10} {:>9}  {verdict}",
            r.figure,
            cell(mailmoat),
            cell(haproxy),
            cell(direct),
            ratio.map_or("—".into(), |r| format!("{r:.2}×")),
        );
    }
}

fn met(ok: bool, target: &str) -> String {
    format!("{target}: {}", if ok { "met" } else { "MISSED" })
}

/// The receiver child: [`common::receiver::serve`] on two ports, one for
/// the direct client, one where a PROXY v2 header comes first.
mod receiver {
    use super::*;
    use common::receiver::{accept_loop, serve};

    /// However the bench ends, this child does not outlive it by much.
    const LIFETIME: Duration = Duration::from_secs(3_600);
    /// Idle sessions are held open for the memory figures.
    const SESSION_LIMIT: Duration = Duration::from_secs(900);

    pub fn run() {
        common::raise_fd_limit();
        let args: Vec<SocketAddr> = std::env::args()
            .skip(1)
            .map(|a| a.parse().expect("receiver: ADDR ADDR"))
            .collect();
        let [direct, proxied] = args[..] else {
            panic!("receiver: expected DIRECT_ADDR PROXIED_ADDR, got {args:?}");
        };
        common::receiver::runtime().block_on(async move {
            let direct = tokio::net::TcpListener::bind(direct).await.expect("bind");
            let proxied = tokio::net::TcpListener::bind(proxied).await.expect("bind");
            let both = async {
                tokio::join!(
                    accept_loop(direct, SESSION_LIMIT, |tcp| serve(tcp, false)),
                    accept_loop(proxied, SESSION_LIMIT, |tcp| serve(tcp, true)),
                )
            };
            let _ = tokio::time::timeout(LIFETIME, both).await;
        });
    }
}
