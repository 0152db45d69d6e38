//! How much does relaying through mailmoat cost an SMTP client, against
//! the same client talking directly to the same receiver?
//!
//! SPEC ("Promises to measure"): at most 0.25 ms added to a transaction at
//! p50, and bulk DATA throughput at least 0.85× direct. SPEC also says a
//! general-purpose TCP proxy adds about 0.5 ms; one is measured beside
//! (tokio `copy_bidirectional`, no SMTP awareness) to tell what any extra
//! hop costs on this machine from what mailmoat's SMTP handling costs.
//!
//! - `transaction_fresh`: connect, EHLO, MAIL, RCPT, DATA, a small body,
//!   QUIT, one connection per transaction (the usual inbound MX pattern).
//! - `transaction_rset`: MAIL, RCPT, DATA, body, RSET on one connection.
//! - `bulk`: one large message (20 MiB, 1 MiB in smoke mode), timed from
//!   the first body byte to the `250` that accepts it.
//!
//! Each criterion iteration runs the operation once per path (direct, TCP
//! proxy, mailmoat) back to back, rotating which goes first, so all see
//! the same noise on a shared machine; criterion times the mailmoat one,
//! and all are recorded for the printed p50/p99, difference and ratio.
//! Each proxy runs on its own 2-worker runtime (as the binary runs here),
//! the receiver is the built-in sink on its own thread, the client a raw
//! socket on the main thread; everything on loopback.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use common::{ms, percentile, verdict, InProcessProxy, Mode, Samples, Smtp, OPEN_LIMITS_TOML};
use criterion::SamplingMode;
use mailmoat::sink::{Sink, SinkOptions};
use tokio::runtime::Runtime;

/// SPEC: at most this much added at p50.
const ADDED_P50_TARGET: Duration = Duration::from_micros(250);
/// SPEC: bulk throughput at least this fraction of direct.
const THROUGHPUT_TARGET: f64 = 0.85;

/// The three ways to the sink, in the order of every `[_; 3]` here.
const DIRECT: usize = 0;
const TCP_PROXY: usize = 1;
const MAILMOAT: usize = 2;

type Times = [Duration; 3];

/// The paths in the order `i` runs them: rotated, so none is always first.
fn rotation(i: u64) -> impl Iterator<Item = usize> {
    (0..3).map(move |k| (i as usize + k) % 3)
}

/// A sink and both proxies in front of it.
struct Paths {
    sink: Sink,
    proxy: InProcessProxy,
    tcp_proxy: (SocketAddr, tokio::task::JoinHandle<()>),
}

impl Paths {
    fn start(sink_rt: &Runtime, proxy_rt: &Runtime, tcp_rt: &Runtime) -> Paths {
        let options = SinkOptions {
            slots: 10_000,
            // Reached directly and through a bare TCP proxy too: no header.
            proxy_protocol: false,
            ..SinkOptions::default()
        };
        let sink = sink_rt
            .block_on(Sink::start("127.0.0.1:0".parse().unwrap(), options))
            .expect("sink binds");
        let proxy = InProcessProxy::start(proxy_rt, OPEN_LIMITS_TOML, sink.addr());
        let tcp_proxy = common::start_tcp_proxy(tcp_rt, sink.addr());
        Paths {
            sink,
            proxy,
            tcp_proxy,
        }
    }

    fn addrs(&self) -> [SocketAddr; 3] {
        [self.sink.addr(), self.tcp_proxy.0, self.proxy.addr]
    }

    fn stop(self, proxy_rt: &Runtime) {
        self.tcp_proxy.1.abort();
        self.proxy.stop(proxy_rt);
        drop(self.sink);
    }
}

fn main() {
    if common::listing() {
        return;
    }
    common::raise_fd_limit();
    let mode = Mode::detect();
    if !common::selected("relay", &["transaction_fresh", "transaction_rset", "bulk"]) {
        return;
    }
    let samples = mode.pick(10, 10, 30);
    let bulk_size = mode.pick(1 << 20, 20 << 20, 20 << 20);

    let sink_rt = common::runtime("bench-sink", 1);
    let proxy_rt = common::runtime("bench-proxy", 2);
    let tcp_rt = common::runtime("bench-tcpproxy", 2);
    let client_rt = common::runtime("bench-client", 0);
    let paths = Paths::start(&sink_rt, &proxy_rt, &tcp_rt);
    let addrs = paths.addrs();

    let fresh = Samples::<Times>::new();
    let rset = Samples::<Times>::new();
    let bulk = Samples::<Times>::new();
    let message = common::big_message(bulk_size);

    let mut c = common::criterion(mode);
    let mut group = c.benchmark_group("relay");
    group.sampling_mode(SamplingMode::Flat).sample_size(samples);

    group.bench_function("transaction_fresh", |b| {
        b.iter_custom(|iters| {
            fresh.call();
            client_rt.block_on(async {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let mut t = Times::default();
                    for path in rotation(i) {
                        t[path] = fresh_transaction(addrs[path]).await;
                    }
                    fresh.push(t);
                    total += t[MAILMOAT];
                }
                total
            })
        })
    });

    // One long connection per path, opened outside the timing.
    let mut conns = client_rt.block_on(async {
        let mut conns = Vec::new();
        for addr in addrs {
            conns.push(open_session(addr).await.expect("session"));
        }
        conns
    });
    group.bench_function("transaction_rset", |b| {
        b.iter_custom(|iters| {
            rset.call();
            client_rt.block_on(async {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let mut t = Times::default();
                    for path in rotation(i) {
                        t[path] = rset_transaction(&mut conns[path]).await;
                    }
                    rset.push(t);
                    total += t[MAILMOAT];
                }
                total
            })
        })
    });
    drop(conns);

    // The sink keeps the last 1000 messages; a fresh sink and proxies per
    // call keep at most a few large messages alive.
    group.sample_size(10);
    group.bench_function(format!("bulk_{}MiB", bulk_size >> 20), |b| {
        b.iter_custom(|iters| {
            bulk.call();
            let paths = Paths::start(&sink_rt, &proxy_rt, &tcp_rt);
            let addrs = paths.addrs();
            let total = client_rt.block_on(async {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let mut t = Times::default();
                    for path in rotation(i) {
                        t[path] = bulk_message(addrs[path], &message).await;
                    }
                    bulk.push(t);
                    total += t[MAILMOAT];
                }
                total
            });
            paths.stop(&proxy_rt);
            total
        })
    });
    group.finish();
    c.final_summary();

    common::header(
        "relay: SMTP through mailmoat vs direct to the same sink",
        mode,
    );
    report_latency("fresh connection per transaction", &fresh.measured(samples));
    report_latency(
        "one connection, RSET between transactions",
        &rset.measured(samples),
    );
    report_throughput(bulk_size, &bulk.measured(10));

    paths.stop(&proxy_rt);
}

/// Connect to QUIT on a new connection; the time until `221`.
async fn fresh_transaction(addr: SocketAddr) -> Duration {
    let run = async {
        let start = Instant::now();
        let mut c = Smtp::connect(addr).await?;
        c.expect(220).await?;
        c.command(b"EHLO client.bench\r\n", 250).await?;
        transaction(&mut c).await?;
        c.command(b"QUIT\r\n", 221).await?;
        let took = start.elapsed();
        // The server closes first, so the client keeps no TIME_WAIT.
        c.until_closed().await?;
        Ok::<_, std::io::Error>(took)
    };
    run.await.expect("fresh transaction")
}

async fn open_session(addr: SocketAddr) -> std::io::Result<Smtp> {
    let mut c = Smtp::connect(addr).await?;
    c.expect(220).await?;
    c.command(b"EHLO client.bench\r\n", 250).await?;
    Ok(c)
}

/// MAIL to RSET on an open session.
async fn rset_transaction(c: &mut Smtp) -> Duration {
    let run = async {
        let start = Instant::now();
        transaction(c).await?;
        c.command(b"RSET\r\n", 250).await?;
        Ok::<_, std::io::Error>(start.elapsed())
    };
    run.await.expect("RSET transaction")
}

async fn transaction(c: &mut Smtp) -> std::io::Result<()> {
    c.command(b"MAIL FROM:<a@example.org>\r\n", 250).await?;
    c.command(b"RCPT TO:<b@example.net>\r\n", 250).await?;
    c.command(b"DATA\r\n", 354).await?;
    c.command(common::SMALL_MESSAGE, 250).await
}

/// One large message on its own connection; the time from the first body
/// byte to the `250`.
async fn bulk_message(addr: SocketAddr, message: &[u8]) -> Duration {
    let run = async {
        let mut c = open_session(addr).await?;
        c.command(b"MAIL FROM:<a@example.org>\r\n", 250).await?;
        c.command(b"RCPT TO:<b@example.net>\r\n", 250).await?;
        c.command(b"DATA\r\n", 354).await?;
        let start = Instant::now();
        c.command(message, 250).await?;
        let took = start.elapsed();
        c.command(b"QUIT\r\n", 221).await?;
        c.until_closed().await?;
        Ok::<_, std::io::Error>(took)
    };
    run.await.expect("bulk message")
}

fn column(times: &[Times], path: usize) -> Vec<Duration> {
    times.iter().map(|t| t[path]).collect()
}

fn report_latency(what: &str, times: &[Times]) {
    println!("  {what}: {} rounds, paths interleaved", times.len());
    if times.is_empty() {
        println!("    not run (filtered out)");
        return;
    }
    let p = |path: usize, q: f64| percentile(&column(times, path), q);
    for (name, path) in [
        ("direct (baseline)", DIRECT),
        ("tcp proxy (reference)", TCP_PROXY),
        ("mailmoat", MAILMOAT),
    ] {
        println!(
            "    {name:<22} p50 {}  p99 {}",
            ms(p(path, 50.0)),
            ms(p(path, 99.0))
        );
    }
    let added = |path: usize| p(path, 50.0).as_secs_f64() - p(DIRECT, 50.0).as_secs_f64();
    let mut paired: Vec<f64> = times
        .iter()
        .map(|t| t[MAILMOAT].as_secs_f64() - t[DIRECT].as_secs_f64())
        .collect();
    paired.sort_by(f64::total_cmp);
    println!(
        "    mailmoat added at p50: {:+.3} ms (median of paired differences {:+.3} ms); \
         SPEC target ≤ {}: {}",
        added(MAILMOAT) * 1e3,
        paired[paired.len() / 2] * 1e3,
        ms(ADDED_P50_TARGET),
        verdict(added(MAILMOAT) <= ADDED_P50_TARGET.as_secs_f64()),
    );
    let ratio = |path: usize, q: f64| p(path, q).as_secs_f64() / p(DIRECT, q).as_secs_f64();
    println!(
        "    ratio to direct: mailmoat p50 {:.2}× p99 {:.2}×; tcp proxy p50 {:.2}× (added {:+.3} ms); \
         SPEC: about 1.3× at p50",
        ratio(MAILMOAT, 50.0),
        ratio(MAILMOAT, 99.0),
        ratio(TCP_PROXY, 50.0),
        added(TCP_PROXY) * 1e3,
    );
}

fn report_throughput(size: usize, times: &[Times]) {
    println!(
        "  bulk DATA, {} MiB messages: {} rounds, paths interleaved",
        size >> 20,
        times.len()
    );
    if times.is_empty() {
        println!("    not run (filtered out)");
        return;
    }
    let mib = size as f64 / (1 << 20) as f64;
    let rate = |path: usize| {
        let total: Duration = column(times, path).iter().sum();
        mib * times.len() as f64 / total.as_secs_f64()
    };
    let direct = rate(DIRECT);
    println!("    direct (baseline)      {direct:.0} MiB/s");
    println!(
        "    tcp proxy (reference)  {:.0} MiB/s ({:.2}× direct)",
        rate(TCP_PROXY),
        rate(TCP_PROXY) / direct
    );
    println!("    mailmoat               {:.0} MiB/s", rate(MAILMOAT));
    let mut ratios: Vec<f64> = times
        .iter()
        .map(|t| t[DIRECT].as_secs_f64() / t[MAILMOAT].as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "    ratio mailmoat/direct: {:.2}× (median of rounds {:.2}×); SPEC target ≥ {THROUGHPUT_TARGET}×: {}",
        rate(MAILMOAT) / direct,
        ratios[ratios.len() / 2],
        verdict(rate(MAILMOAT) / direct >= THROUGHPUT_TARGET),
    );
}
