//! Every source's last good entries, and the rebuild that merges them.
//!
//! A source only ever replaces its entries with a newer good version: a
//! failed read, a missing file or a garbage answer leaves the last good one
//! in place, so a failure never unblocks anyone.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use super::{BadLine, Blocklist, Lists, ListsBuilder, Source};

/// Per-source metrics, labelled by source name (configured, so bounded).
pub struct SourceMetrics {
    entries: IntGaugeVec,
    last_success: IntGaugeVec,
    errors: IntCounterVec,
    bad_lines: IntCounterVec,
}

impl SourceMetrics {
    pub fn register(registry: &Registry) -> SourceMetrics {
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["source"]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &["source"]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        SourceMetrics {
            entries: gauge(
                "mailmoat_blocklist_entries",
                "Entries in effect from each list source.",
            ),
            last_success: gauge(
                "mailmoat_blocklist_last_success_timestamp_seconds",
                "Unix time of each source's last successful load or fetch.",
            ),
            errors: counter(
                "mailmoat_blocklist_source_errors_total",
                "Failed loads or fetches per source (the last good version stays in effect).",
            ),
            bad_lines: counter(
                "mailmoat_blocklist_bad_lines_total",
                "Lines skipped because they are not an IP or CIDR, per source.",
            ),
        }
    }
}

struct Entry {
    source: Source,
    nets: Arc<Vec<IpNet>>,
    /// Identifies the text the entries came from, when the source has one.
    fingerprint: Option<u64>,
}

/// The sources, the live lists built from them, and the hook run after each swap.
pub struct Sources {
    entries: Mutex<Vec<Entry>>,
    live: Arc<Blocklist>,
    metrics: SourceMetrics,
    on_swap: Box<dyn Fn(&Lists) + Send + Sync>,
}

/// What became of an update.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Replaced {
        entries: usize,
    },
    /// Nothing usable: the last good version stays.
    Kept,
}

impl Sources {
    pub fn new(
        live: Arc<Blocklist>,
        metrics: SourceMetrics,
        on_swap: Box<dyn Fn(&Lists) + Send + Sync>,
    ) -> Sources {
        Sources {
            entries: Mutex::new(Vec::new()),
            live,
            metrics,
            on_swap,
        }
    }

    /// Declares a source with no entries yet (so it shows in metrics).
    pub fn declare(&self, source: Source) {
        let mut entries = self.entries.lock().expect("sources lock");
        if !entries.iter().any(|e| e.source == source) {
            self.metrics
                .entries
                .with_label_values(&[&source.name])
                .set(0);
            self.metrics.errors.with_label_values(&[&source.name]);
            entries.push(Entry {
                source,
                nets: Arc::new(Vec::new()),
                fingerprint: None,
            });
        }
    }

    /// Applies a parsed version of `source`. Bad lines are reported and
    /// counted; a version with bad lines and no good entry is garbage and
    /// is not applied.
    pub fn update(&self, source: &Source, nets: Vec<IpNet>, bad: &[BadLine]) -> Applied {
        for b in bad {
            tracing::warn!(source = %source.name, line = b.line, text = ?b.text, "blocklist: skipped bad line: {}", b.error);
        }
        self.metrics
            .bad_lines
            .with_label_values(&[&source.name])
            .inc_by(bad.len() as u64);
        if nets.is_empty() && !bad.is_empty() {
            self.error(
                source,
                "no valid entry in this version; keeping the last good one",
            );
            return Applied::Kept;
        }
        let count = nets.len();
        // Update and rebuild under one lock, so concurrent updates from
        // different sources cannot swap in a build that misses either.
        let mut entries = self.entries.lock().expect("sources lock");
        let nets = Arc::new(nets);
        match entries.iter_mut().find(|e| e.source == *source) {
            Some(e) => {
                e.nets = nets;
                e.fingerprint = None;
            }
            None => entries.push(Entry {
                source: source.clone(),
                nets,
                fingerprint: None,
            }),
        }
        self.rebuild(&entries);
        drop(entries);
        self.metrics
            .entries
            .with_label_values(&[&source.name])
            .set(count as i64);
        self.success(source);
        Applied::Replaced { entries: count }
    }

    /// True when `source` is already built from text with this fingerprint.
    pub fn is_current(&self, source: &Source, fingerprint: u64) -> bool {
        let entries = self.entries.lock().expect("sources lock");
        entries
            .iter()
            .any(|e| e.source == *source && e.fingerprint == Some(fingerprint))
    }

    pub fn set_fingerprint(&self, source: &Source, fingerprint: u64) {
        let mut entries = self.entries.lock().expect("sources lock");
        if let Some(e) = entries.iter_mut().find(|e| e.source == *source) {
            e.fingerprint = Some(fingerprint);
        }
    }

    /// Notes a successful check that changed nothing (HTTP 304).
    pub fn success(&self, source: &Source) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.metrics
            .last_success
            .with_label_values(&[&source.name])
            .set(now as i64);
    }

    pub fn error(&self, source: &Source, what: &str) {
        tracing::warn!(source = %source.name, "blocklist source failed: {what}");
        self.metrics.errors.with_label_values(&[&source.name]).inc();
    }

    /// Merges every source's entries into new lists, swaps them in, then
    /// runs the hook (which closes sessions of newly blocked clients).
    fn rebuild(&self, entries: &[Entry]) {
        let mut builder = ListsBuilder::default();
        for e in entries {
            builder.add(e.source.clone(), &e.nets);
        }
        self.live.store(builder.build());
        (self.on_swap)(&self.live.load());
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::parse_list;
    use super::*;

    fn source(name: &str) -> Source {
        Source {
            name: name.into(),
            allow: false,
        }
    }

    #[test]
    fn sources_merge_and_a_garbage_version_keeps_the_last_good_one() {
        let live = Arc::new(Blocklist::default());
        let swaps = Arc::new(AtomicUsize::new(0));
        let seen = swaps.clone();
        let sources = Sources::new(
            live.clone(),
            SourceMetrics::register(&Registry::new()),
            Box::new(move |lists| {
                assert!(lists.is_blocked("192.0.2.1".parse().unwrap()));
                seen.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let blocked = |ip: &str| live.load().is_blocked(ip.parse::<IpAddr>().unwrap());
        let (a, b) = (source("a"), source("b"));
        let (nets, bad) = parse_list("192.0.2.1\n");
        assert_eq!(
            sources.update(&a, nets, &bad),
            Applied::Replaced { entries: 1 }
        );
        let (nets, bad) = parse_list("198.51.100.0/24\n");
        sources.update(&b, nets, &bad);
        assert!(blocked("192.0.2.1") && blocked("198.51.100.9"));

        let (nets, bad) = parse_list("<html>oops</html>\n");
        assert_eq!(sources.update(&b, nets, &bad), Applied::Kept);
        assert!(blocked("192.0.2.1") && blocked("198.51.100.9"));
        assert_eq!(
            swaps.load(Ordering::SeqCst),
            2,
            "the hook runs after each swap"
        );
    }
}
