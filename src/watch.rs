//! Watching files an operator replaces while we run (blocklists,
//! certificates): which of them changed, settled so that a writer's several
//! writes (certbot writes the certificate, then the key) wake one reload.
//!
//! Only changes to the listed files themselves wake a reload: events for
//! other files in their directories (a log written next to the list) and
//! the events of reading a file (inotify reports opens; our own re-read
//! would otherwise wake the next one) are dropped in the watcher's callback.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::Signal;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Quiet time after the last change event before a file is re-read, so a
/// writer's several writes are read once, whole.
pub const SETTLE: Duration = Duration::from_millis(150);

/// Longest wait for quiet: a file written without pause is still read
/// within SPEC's second.
pub const MAX_SETTLE: Duration = Duration::from_millis(750);

/// Watches the directories of the targets, not the files: replacing a file
/// by rename (how careful tools write, and how certbot swaps its `live/`
/// links) would otherwise end the watch. `what` names the files in the
/// warning when no watch can be set up.
pub fn start_watcher(changes: Arc<Changes>, what: &str) -> Option<notify::RecommendedWatcher> {
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
            tracing::warn!(error = %e, "cannot watch {what}; they reload on SIGHUP only");
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

/// Waits for the next change of `changes`, forever without a watcher.
pub async fn next_change(changes: Option<&Changes>) -> BTreeSet<usize> {
    match changes {
        Some(changes) => changes.next().await,
        None => std::future::pending().await,
    }
}

/// Waits for the next SIGHUP, forever when it cannot be caught.
pub async fn next_hangup(hangup: &mut Option<Signal>) {
    if let Some(h) = hangup {
        if h.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}

/// The targets changed since the last reload (a set of indices into the
/// files, so bounded by their number), and the wake-up for the loop.
pub struct Changes {
    targets: Vec<Option<PathBuf>>,
    dirty: Mutex<BTreeSet<usize>>,
    wake: Notify,
}

impl Changes {
    /// `targets` are absolute ([`absolute`]); `None` is never matched.
    pub fn new(targets: Vec<Option<PathBuf>>) -> Changes {
        Changes {
            targets,
            dirty: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
        }
    }

    /// Marks the targets `event` changed; wakes the loop only if there is one.
    pub fn note(&self, event: &notify::Event) {
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
    pub async fn next(&self) -> BTreeSet<usize> {
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

/// `path` as the watcher reports it: its directory made absolute and
/// canonical (the file itself may not exist yet, or be a link that a
/// renewal replaces). `None` when the directory does not exist.
pub fn absolute(path: &Path) -> Option<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some(std::fs::canonicalize(dir).ok()?.join(path.file_name()?))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
