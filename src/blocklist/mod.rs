//! The blocklist and allowlist: sources in one text format, merged into
//! longest-prefix sets that are swapped whole, so admission reads a
//! consistent list without waiting on a rebuild.

pub mod api;
pub mod files;
mod format;
mod set;
pub mod sources;

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

pub use format::{parse_list, parse_net, BadLine};
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

/// One built generation of the effective lists.
#[derive(Debug, Default)]
pub struct Lists {
    sources: Vec<Source>,
    block: IpSet<u16>,
    allow: IpSet<u16>,
}

impl Lists {
    /// The allowlist wins over any covering block entry.
    pub fn verdict(&self, ip: IpAddr) -> Verdict {
        if let Some((entry, s)) = self.allow.lookup(ip) {
            return Verdict::Allowed {
                source: self.sources[usize::from(s)].name.clone(),
                entry,
            };
        }
        if let Some((entry, s)) = self.block.lookup(ip) {
            return Verdict::Blocked {
                source: self.sources[usize::from(s)].name.clone(),
                entry,
            };
        }
        Verdict::Unlisted
    }

    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        self.allow.contains(ip)
    }

    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.block.contains(ip)
    }

    pub fn block_len(&self) -> usize {
        self.block.len()
    }

    /// Every list entry that covers `ip`, decisive one first, as lines
    /// for people: `blocked by FILE entry NET`.
    pub fn explain(&self, ip: IpAddr) -> Vec<String> {
        let mut lines = Vec::new();
        let name = |s: u16| self.sources[usize::from(s)].name.clone();
        if let Some((entry, s)) = self.allow.lookup(ip) {
            lines.push(format!("allowed by {} entry {entry}", name(s)));
        }
        if let Some((entry, s)) = self.block.lookup(ip) {
            let note = if lines.is_empty() {
                ""
            } else {
                " (overridden by the allowlist)"
            };
            lines.push(format!("blocked by {} entry {entry}{note}", name(s)));
        }
        if lines.is_empty() {
            lines.push("not listed".into());
        }
        lines
    }
}

/// Builds lists from named sources and their entries.
#[derive(Default)]
pub struct ListsBuilder {
    lists: Lists,
}

impl ListsBuilder {
    pub fn add(&mut self, source: Source, nets: &[IpNet]) {
        let id = u16::try_from(self.lists.sources.len()).unwrap_or(u16::MAX);
        let set = if source.allow {
            &mut self.lists.allow
        } else {
            &mut self.lists.block
        };
        for net in nets {
            set.insert(*net, id);
        }
        self.lists.sources.push(source);
    }

    pub fn build(self) -> Lists {
        self.lists
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
    let sources = sources::Sources::new(live.clone(), metrics, Box::new(|_| {}));
    load_all(config, &sources);
    live.load_full()
}
