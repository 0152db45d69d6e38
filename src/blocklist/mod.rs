//! The blocklist and allowlist: sources in one text format, merged into
//! longest-prefix sets that are swapped whole, so admission reads a
//! consistent list without waiting on a rebuild.

mod format;
mod set;

use std::net::IpAddr;
use std::path::PathBuf;
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

    pub fn store(&self, lists: Lists) {
        self.current.store(Arc::new(lists));
    }
}

/// Reads the configured files. A file that cannot be read contributes
/// nothing (and is reported); bad lines are reported with file:line.
pub fn load_files(config: &Config) -> (Lists, Vec<String>) {
    let mut builder = ListsBuilder::default();
    let mut problems = Vec::new();
    let files = config
        .blocklist
        .files
        .iter()
        .map(|p| (p, false))
        .chain(config.blocklist.allowlist_files.iter().map(|p| (p, true)));
    for (path, allow) in files {
        let nets = read_file(path, &mut problems);
        builder.add(
            Source {
                name: path.display().to_string(),
                allow,
            },
            &nets,
        );
    }
    (builder.build(), problems)
}

fn read_file(path: &PathBuf, problems: &mut Vec<String>) -> Vec<IpNet> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let (nets, bad) = parse_list(&text);
            for b in bad {
                problems.push(format!(
                    "{}:{}: {:?}: {}",
                    path.display(),
                    b.line,
                    b.text,
                    b.error
                ));
            }
            nets
        }
        Err(e) => {
            problems.push(format!("{}: cannot read: {e}", path.display()));
            Vec::new()
        }
    }
}
