//! File sources: read at start, re-read when they change (notify, debounced)
//! and on SIGHUP.
//!
//! Only changes to the listed files themselves wake a reload: events for
//! other files in their directories (a log written next to the list) and
//! the events of reading a file (inotify reports opens; our own re-read
//! would otherwise wake the next one) are dropped in the watcher's callback.
//! A file is read by streaming it, one line at a time, up to the source
//! limits; reading the same bytes again changes and reports nothing.

use std::collections::BTreeSet;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::sources::{Applied, Sources};
use super::{parse_reader, Source};

/// Quiet time after the last change event before a file is re-read, so a
/// writer's several writes are read once, whole.
const SETTLE: Duration = Duration::from_millis(150);

/// Longest wait for quiet: a file written without pause is still read
/// within SPEC's second.
const MAX_SETTLE: Duration = Duration::from_millis(750);

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
    let watcher = start_watcher(changes.clone());
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

/// Watches the directories of the targets, not the files: replacing a file
/// by rename (how careful tools write) would otherwise end the watch.
fn start_watcher(changes: Arc<Changes>) -> Option<notify::RecommendedWatcher> {
    let callback = {
        let changes = changes.clone();
        move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                changes.note(&event);
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(callback) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch blocklist files; they reload on SIGHUP only");
            return None;
        }
    };
    let mut dirs: Vec<&Path> = changes
        .targets
        .iter()
        .filter_map(|p| p.as_deref()?.parent())
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory");
        }
    }
    Some(watcher)
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

async fn next_change(changes: Option<&Changes>) -> BTreeSet<usize> {
    match changes {
        Some(changes) => changes.next().await,
        None => std::future::pending().await,
    }
}

async fn next_hangup(hangup: &mut Option<Signal>) {
    if let Some(h) = hangup {
        if h.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}

/// The targets changed since the last reload (a set of indices into the
/// files, so bounded by their number), and the wake-up for the loop.
struct Changes {
    targets: Vec<Option<PathBuf>>,
    dirty: Mutex<BTreeSet<usize>>,
    wake: Notify,
}

impl Changes {
    fn new(targets: Vec<Option<PathBuf>>) -> Changes {
        Changes {
            targets,
            dirty: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
        }
    }

    /// Marks the targets `event` changed; wakes the loop only if there is one.
    fn note(&self, event: &notify::Event) {
        // The watcher lost events: any target may have changed.
        if event.need_rescan() {
            return self.note_all();
        }
        if !changes_content(&event.kind) {
            return;
        }
        let hits: Vec<usize> = (0..self.targets.len())
            .filter(|i| {
                let target = self.targets[*i].as_ref();
                target.is_some_and(|t| event.paths.contains(t))
            })
            .collect();
        if hits.is_empty() {
            return;
        }
        self.dirty.lock().expect("changes lock").extend(hits);
        self.wake.notify_one();
    }

    fn note_all(&self) {
        self.dirty
            .lock()
            .expect("changes lock")
            .extend(0..self.targets.len());
        self.wake.notify_one();
    }

    /// Waits for a change, then for `SETTLE` without one (at most
    /// `MAX_SETTLE` in all), and takes the changed targets.
    async fn next(&self) -> BTreeSet<usize> {
        self.wake.notified().await;
        let deadline = Instant::now() + MAX_SETTLE;
        loop {
            let quiet = (Instant::now() + SETTLE).min(deadline);
            let woken = tokio::time::timeout_at(quiet, self.wake.notified()).await;
            if woken.is_err() || Instant::now() >= deadline {
                break;
            }
        }
        std::mem::take(&mut *self.dirty.lock().expect("changes lock"))
    }
}

/// Whether an event can mean new content. Opening, reading and closing a
/// file unwritten (our own reload, anyone's `cat`) cannot.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
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

    fn event(kind: EventKind, path: &Path) -> notify::Event {
        notify::Event::new(kind).add_path(path.to_path_buf())
    }

    /// Issue 9 #16: inotify reports opens, so each reload's own read woke
    /// the next one, about seven times a second.
    #[test]
    fn only_content_changes_of_the_listed_files_wake_a_reload() {
        use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
        let (list, log) = (Path::new("/lists/block.txt"), Path::new("/lists/log"));
        let changes = Changes::new(vec![None, Some(list.to_path_buf())]);
        let dirty = || changes.dirty.lock().unwrap().clone();
        for kind in [
            AccessKind::Open(AccessMode::Read),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
        ] {
            changes.note(&event(EventKind::Access(kind), list));
        }
        changes.note(&event(EventKind::Modify(ModifyKind::Any), log));
        changes.note(&event(EventKind::Create(CreateKind::File), log));
        assert!(dirty().is_empty());

        for kind in [
            EventKind::Modify(ModifyKind::Any),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
        ] {
            changes.note(&event(kind, list));
            assert_eq!(dirty(), BTreeSet::from([1]), "{kind:?}");
            changes.dirty.lock().unwrap().clear();
        }
    }

    /// Issue 9 #16: a change to another file kept the settle wait going.
    #[tokio::test(start_paused = true)]
    async fn changes_settle_for_at_most_max_settle() {
        let changes = Arc::new(Changes::new(vec![Some(PathBuf::from("/l/a"))]));
        let writer = {
            let changes = changes.clone();
            tokio::spawn(async move {
                for _ in 0..1000 {
                    changes.note(&event(EventKind::Any, Path::new("/l/a")));
                    tokio::time::sleep(SETTLE / 2).await;
                }
            })
        };
        let start = Instant::now();
        assert_eq!(changes.next().await, BTreeSet::from([0]));
        assert!(
            start.elapsed() <= MAX_SETTLE + SETTLE,
            "{:?}",
            start.elapsed()
        );
        writer.abort();
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
        let ended =
            tokio::time::timeout(Duration::from_secs(10), react(sources, files, None, None)).await;
        assert!(ended.is_err(), "the reload loop ended");
    }
}
