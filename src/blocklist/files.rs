//! File sources: read at start, re-read when they change (notify, debounced)
//! and on SIGHUP.
//!
//! What wakes a reload, and how bursts settle, is [`crate::watch`]'s. A file is read by streaming it, one line at a time, up to the source
//! limits; reading the same bytes again changes and reports nothing.

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};

use super::sources::{Applied, Sources};
use super::{parse_reader, Source};
use crate::watch::{absolute, next_change, next_hangup, start_watcher, Changes};

#[derive(Clone, Debug)]
pub struct FileSource {
    pub path: PathBuf,
    pub allow: bool,
}

impl FileSource {
    pub fn source(&self) -> Source {
        Source {
            name: self.path.display().to_string(),
            allow: self.allow,
        }
    }

    /// Reads and applies the file; a failed read keeps the last good version.
    pub fn load(&self, sources: &Sources) {
        let source = self.source();
        let read = std::fs::File::open(&self.path)
            .and_then(|file| parse_reader(BufReader::new(file), sources.limits()));
        let parsed = match read {
            Ok(parsed) => parsed,
            Err(e) => {
                sources.remember(&source, None, false);
                sources.error(
                    &source,
                    &format!("cannot read {}: {e}", self.path.display()),
                );
                return;
            }
        };
        match sources.seen(&source, parsed.fingerprint) {
            // The same text again (a touch, a second event, the re-read
            // after the watch starts): nothing to rebuild or report twice.
            Some(true) => sources.success(&source),
            Some(false) => {}
            None => {
                let applied = if parsed.blank {
                    // Truncated by an in-place rewrite not finished yet (or
                    // a failed one): applying it would unblock everyone it
                    // listed. As for the API, an intentionally empty list
                    // says so with a comment line.
                    sources.error(
                        &source,
                        &format!(
                            "{} is empty; keeping the last good version",
                            self.path.display()
                        ),
                    );
                    false
                } else {
                    let applied = sources.apply(&source, parsed.nets, &parsed.bad);
                    matches!(applied, Applied::Replaced { .. })
                };
                sources.remember(&source, Some(parsed.fingerprint), applied);
            }
        }
    }
}

/// Re-reads files when they change or on SIGHUP, until the task is dropped.
pub async fn watch(sources: Arc<Sources>, files: Vec<FileSource>) {
    // A file whose directory does not exist cannot be watched (SIGHUP
    // still reloads it).
    let targets: Vec<Option<PathBuf>> = files.iter().map(|f| absolute(&f.path)).collect();
    let changes = Arc::new(Changes::new(targets));
    // Kept alive for as long as we watch.
    let watcher = start_watcher(changes.clone(), "blocklist files");
    let hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; blocklist files reload on change only");
            None
        }
    };
    let changes = watcher.as_ref().map(|_| changes);
    react(sources, files, changes, hangup).await;
    drop(watcher);
}

/// The reload loop: `changes` (the watcher's, if it started) and `hangup`
/// (if SIGHUP could be caught) say which files to re-read.
async fn react(
    sources: Arc<Sources>,
    files: Vec<FileSource>,
    changes: Option<Arc<Changes>>,
    mut hangup: Option<Signal>,
) {
    if changes.is_none() && hangup.is_none() {
        tracing::warn!(
            "blocklist files are read at start only: neither a file watch nor SIGHUP is available"
        );
        // Ending would make the supervisor restart the task, and warn,
        // forever: there is nothing to wait for, so wait.
        return std::future::pending().await;
    }
    // A change between the first load and the watch taking hold would be
    // missed until the next one: read once more now that we watch.
    load(&sources, files.clone()).await;
    loop {
        let changed: Vec<FileSource> = tokio::select! {
            dirty = next_change(changes.as_deref()) => {
                dirty.into_iter().filter_map(|i| files.get(i).cloned()).collect()
            }
            () = next_hangup(&mut hangup) => {
                tracing::info!("SIGHUP: re-reading blocklist files");
                files.clone()
            }
        };
        load(&sources, changed).await;
    }
}

/// Reads `files` off the runtime: parsing and building a big list is heavy.
async fn load(sources: &Arc<Sources>, files: Vec<FileSource>) {
    if files.is_empty() {
        return;
    }
    let sources = sources.clone();
    let _ = tokio::task::spawn_blocking(move || files.iter().for_each(|f| f.load(&sources))).await;
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::super::sources::SourceMetrics;
    use super::super::Blocklist;
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failed_reads_and_empty_versions_keep_the_last_good_list() {
        let dir = std::env::temp_dir().join(format!(
            "mailmoat-files-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = FileSource {
            path: dir.join("block.txt"),
            allow: false,
        };
        let live = Arc::new(Blocklist::default());
        let registry = prometheus::Registry::new();
        let sources = Sources::new(
            live.clone(),
            SourceMetrics::register(&registry),
            Box::new(|_| {}),
        );
        let blocked = || live.load().is_blocked(ip("192.0.2.7"));

        std::fs::write(&file.path, "192.0.2.7\n").unwrap();
        file.load(&sources);
        assert!(blocked());
        for bad_version in ["", " \n\n", "garbage\n"] {
            std::fs::write(&file.path, bad_version).unwrap();
            file.load(&sources);
            assert!(blocked(), "{bad_version:?} unblocked");
        }
        std::fs::remove_file(&file.path).unwrap();
        file.load(&sources);
        assert!(blocked(), "a missing file unblocked");

        // An intentionally empty list says so with a comment.
        std::fs::write(&file.path, "# nobody\n").unwrap();
        file.load(&sources);
        assert!(!blocked());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 9 #16: `select!` with every branch disabled panics.
    #[tokio::test(start_paused = true)]
    async fn without_a_watcher_or_sighup_the_reload_loop_waits_without_panicking() {
        let live = Arc::new(Blocklist::default());
        let sources = Arc::new(Sources::new(
            live,
            SourceMetrics::register(&prometheus::Registry::new()),
            Box::new(|_| {}),
        ));
        let files = vec![FileSource {
            path: PathBuf::from("/nonexistent/block.txt"),
            allow: false,
        }];
        // Neither panics nor ends (the supervisor would restart it in a loop).
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            react(sources, files, None, None),
        )
        .await;
        assert!(ended.is_err(), "the reload loop ended");
    }
}
