//! How fast is the blocklist at a million entries: building the
//! longest-prefix lists, and looking one address up, against a std
//! `HashSet` doing an exact-match lookup of the same addresses?
//!
//! SPEC ("Promises to measure"): one million entries built in under 1 s,
//! looked up in under 200 ns.
//!
//! The list is one million deterministic pseudo-random entries: 35 % IPv4
//! /32, 15 % IPv4 /24, 20 % IPv6 /128, 20 % IPv6 /64, 10 % IPv6 /48.
//!
//! - `build`: entries → `Lists` (what a reload swaps in); `parse_and_build`
//!   starts from the file's text; baseline: a std `HashSet<IpNet>` of the
//!   same entries (exact match only, no prefixes).
//! - `lookup_*`: `Lists::is_blocked`, the admission check, for addresses
//!   inside an entry (hits) and outside all (misses), IPv4 and IPv6.
//!   Baseline: std `HashSet<u32>` holding the IPv4 entries and the hit
//!   addresses, asked about the same IPv4 addresses (and `HashSet<u128>`
//!   likewise for IPv6). Each lookup picks the
//!   next address from the previous answer, so lookups cannot overlap:
//!   the time is a latency, not a pipelined throughput.

mod common;

use std::collections::HashSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tokio::time::Instant;

use common::{Mode, Samples};
use criterion::SamplingMode;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mailmoat::blocklist::{Lists, ListsBuilder, Source};

const BUILD_TARGET: Duration = Duration::from_secs(1);
const LOOKUP_TARGET_NS: f64 = 200.0;

/// SplitMix64: deterministic, good enough to scatter addresses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn v4(&mut self) -> Ipv4Addr {
        Ipv4Addr::from(self.next() as u32)
    }

    /// A global unicast address (2000::/3), where real lists live.
    fn v6(&mut self) -> Ipv6Addr {
        let bits = (u128::from(self.next()) << 64) | u128::from(self.next());
        Ipv6Addr::from((bits >> 3) | (1 << 125))
    }
}

fn entries(n: usize, rng: &mut Rng) -> Vec<IpNet> {
    (0..n)
        .map(|_| {
            let net = match rng.next() % 100 {
                0..35 => IpNet::V4(Ipv4Net::new(rng.v4(), 32).unwrap()),
                35..50 => IpNet::V4(Ipv4Net::new(rng.v4(), 24).unwrap()),
                50..70 => IpNet::V6(Ipv6Net::new(rng.v6(), 128).unwrap()),
                70..90 => IpNet::V6(Ipv6Net::new(rng.v6(), 64).unwrap()),
                _ => IpNet::V6(Ipv6Net::new(rng.v6(), 48).unwrap()),
            };
            net.trunc()
        })
        .collect()
}

/// A random address inside `net`.
fn inside(net: &IpNet, rng: &mut Rng) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = (rng.next() as u32) & !u32::from(n.netmask());
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
        }
        IpNet::V6(n) => {
            let random = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            let host = random & !u128::from(n.netmask());
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
        }
    }
}

fn build(nets: &[IpNet]) -> Lists {
    let mut builder = ListsBuilder::default();
    builder.add(
        Source {
            name: "bench".into(),
            allow: false,
        },
        nets,
    );
    builder.build()
}

/// Looks up `iters` addresses, each chosen by the previous answer.
fn chase<T: Copy>(queries: &[T], iters: u64, found: impl Fn(T) -> bool) -> (Duration, u64) {
    let start = Instant::now();
    let (mut i, mut hits) = (0usize, 0u64);
    for _ in 0..iters {
        let hit = found(black_box(queries[i]));
        hits += u64::from(hit);
        i += 1 + usize::from(hit);
        if i >= queries.len() {
            i %= queries.len();
        }
    }
    (start.elapsed(), black_box(hits))
}

fn main() {
    if common::listing() {
        return;
    }
    common::raise_fd_limit();
    let mode = Mode::detect();
    if !common::selected("blocklist", &["build", "lookup"]) {
        return;
    }
    let size = mode.pick(10_000, 1_000_000, 1_000_000);
    let queries = mode.pick(1_000, 200_000, 1_000_000);
    let samples = mode.pick(10, 10, 30);

    let mut rng = Rng(0x6d61_696c_6d6f_6174);
    let nets = entries(size, &mut rng);
    let text: String = nets.iter().map(|n| format!("{n}\n")).collect();

    let rss_before = common::rss_kib("self");
    let lists = build(&nets);
    let rss_lists = common::rss_kib("self").saturating_sub(rss_before);

    let pick_hits = |v4: bool, rng: &mut Rng| -> Vec<IpAddr> {
        let family: Vec<&IpNet> = nets
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)) == v4)
            .collect();
        (0..queries)
            .map(|_| inside(family[rng.next() as usize % family.len()], rng))
            .collect()
    };
    let pick_misses = |v4: bool, rng: &mut Rng| -> Vec<IpAddr> {
        std::iter::from_fn(|| {
            Some(if v4 {
                IpAddr::V4(rng.v4())
            } else {
                IpAddr::V6(rng.v6())
            })
        })
        .take(queries * 4)
        .filter(|ip| !lists.is_blocked(*ip))
        .take(queries)
        .collect()
    };
    let hit_v4 = pick_hits(true, &mut rng);
    let hit_v6 = pick_hits(false, &mut rng);
    let miss_v4 = pick_misses(true, &mut rng);
    let miss_v6 = pick_misses(false, &mut rng);
    assert!(hit_v4.iter().chain(&hit_v6).all(|ip| lists.is_blocked(*ip)));

    let bits = |ips: &[IpAddr]| -> Vec<u128> {
        ips.iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => u128::from(u32::from(*v4)),
                IpAddr::V6(v6) => u128::from(*v6),
            })
            .collect()
    };
    let narrow = |v: Vec<u128>| -> Vec<u32> { v.into_iter().map(|b| b as u32).collect() };
    let (hit_u32, miss_u32) = (narrow(bits(&hit_v4)), narrow(bits(&miss_v4)));
    let (hit_u128, miss_u128) = (bits(&hit_v6), bits(&miss_v6));
    let std_v4: HashSet<u32> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(u32::from(n.network())),
            IpNet::V6(_) => None,
        })
        .chain(hit_u32.iter().copied())
        .collect();
    let std_v6: HashSet<u128> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(u128::from(n.network())),
            IpNet::V4(_) => None,
        })
        .chain(hit_u128.iter().copied())
        .collect();

    let builds = Samples::<Duration>::new();
    let parse_builds = Samples::<Duration>::new();
    let std_builds = Samples::<Duration>::new();
    let lookups: Vec<(&str, Samples<(Duration, u64)>)> = [
        "lookup_hit_v4",
        "lookup_miss_v4",
        "lookup_hit_v6",
        "lookup_miss_v6",
        "std_hashset_hit_v4",
        "std_hashset_miss_v4",
        "std_hashset_hit_v6",
        "std_hashset_miss_v6",
    ]
    .into_iter()
    .map(|id| (id, Samples::new()))
    .collect();

    let mut c = common::criterion(mode);
    let mut group = c.benchmark_group("blocklist");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    let timed_build = |samples: &Samples<Duration>, iters: u64, f: &dyn Fn() -> Box<dyn Send>| {
        samples.call();
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let start = Instant::now();
            let built = f();
            let took = start.elapsed();
            drop(black_box(built));
            samples.push(took);
            total += took;
        }
        total
    };
    group.bench_function("build", |b| {
        b.iter_custom(|iters| timed_build(&builds, iters, &|| Box::new(build(&nets))))
    });
    group.bench_function("parse_and_build", |b| {
        b.iter_custom(|iters| {
            timed_build(&parse_builds, iters, &|| {
                let (parsed, bad) = mailmoat::blocklist::parse_list(&text);
                assert!(bad.is_empty());
                Box::new(build(&parsed))
            })
        })
    });
    group.bench_function("std_hashset_build", |b| {
        b.iter_custom(|iters| {
            timed_build(&std_builds, iters, &|| {
                Box::new(nets.iter().copied().collect::<HashSet<IpNet>>())
            })
        })
    });

    group.sample_size(samples);
    for (id, recorded) in &lookups {
        group.bench_function(*id, |b| {
            b.iter_custom(|iters| {
                recorded.call();
                let (took, hits) = match *id {
                    "lookup_hit_v4" => chase(&hit_v4, iters, |ip| lists.is_blocked(ip)),
                    "lookup_miss_v4" => chase(&miss_v4, iters, |ip| lists.is_blocked(ip)),
                    "lookup_hit_v6" => chase(&hit_v6, iters, |ip| lists.is_blocked(ip)),
                    "lookup_miss_v6" => chase(&miss_v6, iters, |ip| lists.is_blocked(ip)),
                    "std_hashset_hit_v4" => chase(&hit_u32, iters, |ip| std_v4.contains(&ip)),
                    "std_hashset_miss_v4" => chase(&miss_u32, iters, |ip| std_v4.contains(&ip)),
                    "std_hashset_hit_v6" => chase(&hit_u128, iters, |ip| std_v6.contains(&ip)),
                    _ => chase(&miss_u128, iters, |ip| std_v6.contains(&ip)),
                };
                black_box(hits);
                recorded.push((took, iters));
                took
            })
        });
    }
    group.finish();
    c.final_summary();

    common::header(
        "blocklist: one million mixed entries, mailmoat's lists vs std HashSet",
        mode,
    );
    println!(
        "  {} entries ({} distinct), resident size of the built lists ≈ {:.0} MiB; {queries} query addresses per kind",
        nets.len(),
        lists.block_len(),
        rss_lists as f64 / 1024.0,
    );
    let median = |s: &Samples<Duration>| {
        let mut v = s.measured(10);
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    };
    match (median(&builds), median(&parse_builds), median(&std_builds)) {
        (Some(b), Some(pb), Some(sb)) => {
            println!(
                "  build (median): std HashSet<IpNet> (baseline) {}  mailmoat Lists {}  ratio {:.2}×; \
                 SPEC target < 1 s: {}",
                common::ms(sb),
                common::ms(b),
                b.as_secs_f64() / sb.as_secs_f64(),
                common::verdict(b < BUILD_TARGET),
            );
            println!(
                "  parse the file's text and build (median): {}; SPEC target < 1 s: {}",
                common::ms(pb),
                common::verdict(pb < BUILD_TARGET),
            );
        }
        _ => println!("  build: not run (filtered out)"),
    }
    report_lookups(&lookups, samples);
}

/// Nanoseconds per lookup over the measured samples of each kind.
fn report_lookups(lookups: &[(&str, Samples<(Duration, u64)>)], samples: usize) {
    let ns = |id: &str| -> Option<f64> {
        let (_, recorded) = lookups.iter().find(|(i, _)| *i == id)?;
        let measured = recorded.measured(samples);
        let took: f64 = measured.iter().map(|m| m.0.as_secs_f64()).sum();
        let iters: u64 = measured.iter().map(|m| m.1).sum();
        (iters > 0).then(|| took * 1e9 / iters as f64)
    };
    println!("  lookup, ns per address (each address chosen by the previous answer):");
    for (kind, ours, std) in [
        ("IPv4 hit ", "lookup_hit_v4", Some("std_hashset_hit_v4")),
        ("IPv4 miss", "lookup_miss_v4", Some("std_hashset_miss_v4")),
        ("IPv6 hit ", "lookup_hit_v6", Some("std_hashset_hit_v6")),
        ("IPv6 miss", "lookup_miss_v6", Some("std_hashset_miss_v6")),
    ] {
        let Some(t) = ns(ours) else {
            println!("    {kind}: not run (filtered out)");
            continue;
        };
        let baseline = std.and_then(ns).map_or_else(
            || "no std baseline".to_string(),
            |b| format!("std HashSet (baseline) {b:.1} ns, ratio {:.2}×", t / b),
        );
        println!(
            "    {kind}: mailmoat {t:.1} ns; {baseline}; SPEC target < {LOOKUP_TARGET_NS} ns: {}",
            common::verdict(t < LOOKUP_TARGET_NS),
        );
    }
}
