//! The lists as the proxy would load them at start, from disk alone: the
//! blocklist and allowlist files, the API cache and the persisted bans.

use std::path::PathBuf;
use std::sync::Arc;

use crate::bans::Bans;
use crate::blocklist::{self, sources::Sources, Blocklist, Lists};
use crate::config::Config;
use crate::metrics::Metrics;

pub struct Offline {
    pub lists: Arc<Lists>,
    /// The bans that are still in force, in the export format.
    pub bans: String,
    /// The files that could be read; none means there is nothing to answer from.
    pub read: Vec<PathBuf>,
}

/// Loads every source on disk; unreadable ones are reported as warnings.
pub fn load(config: &Config) -> Offline {
    let live = Arc::new(Blocklist::default());
    let metrics = blocklist::sources::SourceMetrics::register(&prometheus::Registry::new());
    let sources = Arc::new(Sources::new(live.clone(), metrics, Box::new(|_| {})));
    blocklist::load_all(config, &sources);
    // Bans read their own state file, as at start.
    let bans = Bans::new(
        config.autoban.clone(),
        false,
        config.server.max_tracked_ips,
        sources,
        Arc::new(Metrics::new()),
    );
    let mut candidates: Vec<PathBuf> = config
        .blocklist
        .files
        .iter()
        .chain(&config.blocklist.allowlist_files)
        .cloned()
        .collect();
    candidates.extend(config.blocklist.api.as_ref().map(|api| api.cache.clone()));
    let read = candidates
        .into_iter()
        .filter(|path| std::fs::File::open(path).is_ok())
        .chain(
            config
                .autoban
                .state
                .iter()
                .filter(|p| state_readable(p))
                .cloned(),
        )
        .collect();
    Offline {
        lists: live.load_full(),
        bans: bans.export(),
        read,
    }
}

/// A missing state file means no ban was ever persisted: that is an answer.
fn state_readable(path: &std::path::Path) -> bool {
    match std::fs::File::open(path) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}
