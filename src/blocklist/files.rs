//! File sources: read at start, re-read when they change (notify, debounced)
//! and on SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::sources::{Applied, Sources};
use super::{parse_list, Source};

/// Quiet time after the last change event before a file is re-read, so a
/// writer's several writes are read once, whole.
const SETTLE: Duration = Duration::from_millis(150);

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
        match std::fs::read_to_string(&self.path) {
            // Truncated by an in-place rewrite not finished yet (or a failed
            // one): applying it would unblock everyone it listed. As for the
            // API, an intentionally empty list says so with a comment line.
            Ok(text) if text.trim().is_empty() => sources.error(
                &self.source(),
                &format!(
                    "{} is empty; keeping the last good version",
                    self.path.display()
                ),
            ),
            // The same text again (a touch, a second event, the re-read
            // after the watch starts): nothing to rebuild or report twice.
            Ok(text) if sources.is_current(&self.source(), fingerprint(&text)) => {
                sources.success(&self.source())
            }
            Ok(text) => {
                let (nets, bad) = parse_list(&text);
                let source = self.source();
                if let Applied::Replaced { .. } = sources.update(&source, nets, &bad) {
                    sources.set_fingerprint(&source, fingerprint(&text));
                }
            }
            Err(e) => sources.error(
                &self.source(),
                &format!("cannot read {}: {e}", self.path.display()),
            ),
        }
    }
}

/// Re-reads files when they change or on SIGHUP, until the task is dropped.
pub async fn watch(sources: Arc<Sources>, files: Vec<FileSource>) {
    let (tx, mut events) = mpsc::channel::<Vec<PathBuf>>(64);
    // Watch the directories, not the files: replacing a file by rename
    // (how careful tools write) would otherwise end the watch.
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = tx.try_send(event.paths);
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch blocklist files; they reload on SIGHUP only");
            None
        }
    };
    let targets: Vec<(PathBuf, FileSource)> = files
        .iter()
        .filter_map(|f| Some((absolute(&f.path)?, f.clone())))
        .collect();
    if let Some(w) = watcher.as_mut() {
        let mut dirs: Vec<&Path> = targets.iter().filter_map(|(p, _)| p.parent()).collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory");
            }
        }
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // A change between the first load and the watch taking hold would be
    // missed until the next one: read once more now that we watch.
    {
        let (sources, files) = (sources.clone(), files.clone());
        let _ =
            tokio::task::spawn_blocking(move || files.iter().for_each(|f| f.load(&sources))).await;
    }

    loop {
        let changed: Vec<FileSource> = tokio::select! {
            Some(paths) = events.recv() => {
                let mut paths = paths;
                // Settle: collect events until SETTLE passes without one.
                while let Ok(Some(more)) = tokio::time::timeout(SETTLE, events.recv()).await {
                    paths.extend(more);
                }
                targets
                    .iter()
                    .filter(|(target, _)| paths.iter().any(|p| p == target))
                    .map(|(_, f)| f.clone())
                    .collect()
            }
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: re-reading blocklist files");
                files.clone()
            }
        };
        if changed.is_empty() {
            continue;
        }
        let sources = sources.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for f in &changed {
                f.load(&sources);
            }
        })
        .await;
    }
}

fn fingerprint(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

fn absolute(path: &Path) -> Option<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some(std::fs::canonicalize(dir).ok()?.join(path.file_name()?))
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
}
