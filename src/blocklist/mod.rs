//! The blocklist and allowlist: sources in one text format, each built
//! into its own longest-prefix set. The effective lists are the sources'
//! sets side by side, swapped whole, so admission reads a consistent list
//! without waiting on a rebuild, and a change to one source (the bans,
//! often) rebuilds only that source's set while the others (a million-line
//! file, rarely changed) are shared with the previous generation.

pub mod api;
pub mod files;
mod format;
mod set;
pub mod sources;

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

pub use format::{parse_list, parse_net, parse_reader, BadLine, BadLines, Limits, Parsed};
pub use set::IpSet;

use crate::config::Config;

/// Where an entry came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub allow: bool,
}

/// What the lists say about one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed { source: String, entry: IpNet },
    Blocked { source: String, entry: IpNet },
    Unlisted,
}

/// One source's built entries.
#[derive(Clone, Debug)]
struct Listed {
    source: Source,
    set: Arc<IpSet<()>>,
}

/// One built generation of the effective lists: every source's set, the
/// allowlists apart from the blocklists. A lookup asks each set of a kind
/// (there are a handful); the longest matching entry decides which source
/// is named, the earlier source on a tie.
#[derive(Clone, Debug, Default)]
pub struct Lists {
    allow: Vec<Listed>,
    block: Vec<Listed>,
}

impl Lists {
    /// Lists from built sets; empty ones are left out (nothing to ask).
    fn from_sets<'a>(sets: impl IntoIterator<Item = (&'a Source, &'a Arc<IpSet<()>>)>) -> Lists {
        let mut lists = Lists::default();
        for (source, set) in sets {
            if set.is_empty() {
                continue;
            }
            let listed = Listed {
                source: source.clone(),
                set: set.clone(),
            };
            if source.allow {
                lists.allow.push(listed);
            } else {
                lists.block.push(listed);
            }
        }
        lists
    }

    /// The allowlist wins over any covering block entry.
    pub fn verdict(&self, ip: IpAddr) -> Verdict {
        if let Some((source, entry)) = longest(&self.allow, ip) {
            return Verdict::Allowed {
                source: source.name.clone(),
                entry,
            };
        }
        if let Some((source, entry)) = longest(&self.block, ip) {
            return Verdict::Blocked {
                source: source.name.clone(),
                entry,
            };
        }
        Verdict::Unlisted
    }

    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|l| l.set.contains(ip))
    }

    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.block.iter().any(|l| l.set.contains(ip))
    }

    /// Block entries across sources (an entry two sources list counts twice).
    pub fn block_len(&self) -> usize {
        self.block.iter().map(|l| l.set.len()).sum()
    }

    /// Every list entry that covers `ip`, decisive one first, as lines
    /// for people: `blocked by FILE entry NET`.
    pub fn explain(&self, ip: IpAddr) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some((source, entry)) = longest(&self.allow, ip) {
            lines.push(format!("allowed by {} entry {entry}", source.name));
        }
        if let Some((source, entry)) = longest(&self.block, ip) {
            let note = if lines.is_empty() {
                ""
            } else {
                " (overridden by the allowlist)"
            };
            lines.push(format!("blocked by {} entry {entry}{note}", source.name));
        }
        if lines.is_empty() {
            lines.push("not listed".into());
        }
        lines
    }
}

/// The longest entry covering `ip` in any of `sets`, with its source; the
/// earlier source on a tie.
fn longest(sets: &[Listed], ip: IpAddr) -> Option<(&Source, IpNet)> {
    let mut best: Option<(&Source, IpNet)> = None;
    for listed in sets {
        if let Some((entry, ())) = listed.set.lookup(ip) {
            if best.is_none_or(|(_, b)| entry.prefix_len() > b.prefix_len()) {
                best = Some((&listed.source, entry));
            }
        }
    }
    best
}

/// Builds lists from named sources and their entries.
#[derive(Default)]
pub struct ListsBuilder {
    sets: Vec<(Source, Arc<IpSet<()>>)>,
}

impl ListsBuilder {
    pub fn add(&mut self, source: Source, nets: &[IpNet]) {
        self.sets.push((source, Arc::new(IpSet::from_nets(nets))));
    }

    pub fn build(self) -> Lists {
        Lists::from_sets(self.sets.iter().map(|(s, set)| (s, set)))
    }
}

/// The live lists, read by admission on every accept.
#[derive(Default)]
pub struct Blocklist {
    current: ArcSwap<Lists>,
}

impl Blocklist {
    pub fn new(lists: Lists) -> Blocklist {
        Blocklist {
            current: ArcSwap::from_pointee(lists),
        }
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Lists>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<Lists> {
        self.current.load_full()
    }

    pub fn store(&self, lists: Lists) {
        self.current.store(Arc::new(lists));
    }
}

/// The file sources named in the config, blocklists then allowlists.
pub fn file_sources(config: &Config) -> Vec<files::FileSource> {
    let block = config.blocklist.files.iter().map(|p| (p, false));
    let allow = config.blocklist.allowlist_files.iter().map(|p| (p, true));
    block
        .chain(allow)
        .map(|(path, allow)| files::FileSource {
            path: path.clone(),
            allow,
        })
        .collect()
}

/// Loads every configured source once: files, and the API's cache (never
/// the API itself). Used at start and by `mailmoat blocklist check`.
pub fn load_all(config: &Config, sources: &sources::Sources) {
    for file in file_sources(config) {
        sources.declare(file.source());
        file.load(sources);
    }
    if let Some(api_settings) = &config.blocklist.api {
        sources.declare(api::source());
        api::load_cache(sources, api_settings);
    }
}

/// The lists as the config's sources say now, offline.
pub fn load_offline(config: &Config) -> Arc<Lists> {
    let live = Arc::new(Blocklist::default());
    let metrics = sources::SourceMetrics::register(&prometheus::Registry::new());
    let sources = sources::Sources::new(live.clone(), metrics, Box::new(|_| {}))
        .with_max_entries(config.blocklist.max_entries_per_source);
    load_all(config, &sources);
    live.load_full()
}
