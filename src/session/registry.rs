//! The sessions open now, by client IP: so a list change can close the
//! sessions of newly blocked clients (`kill_on_block`), and the operator can
//! see who holds the most sessions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::CloseReason;

/// Tells one session to stop now, and why.
#[derive(Debug, Default)]
pub struct Stop {
    token: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl Stop {
    /// A stop that also fires when `parent` is cancelled (with `Shutdown`).
    pub fn child_of(parent: &CancellationToken) -> Stop {
        Stop {
            token: parent.child_token(),
            reason: OnceLock::new(),
        }
    }

    pub fn stop(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub async fn stopped(&self) -> CloseReason {
        self.token.cancelled().await;
        self.reason.get().copied().unwrap_or(CloseReason::Shutdown)
    }
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: DashMap<u64, (IpAddr, Arc<Stop>)>,
}

/// A session's place in the registry, removed on drop.
pub struct Registration<'a> {
    registry: &'a Registry,
    id: u64,
    pub stop: Arc<Stop>,
}

impl Registry {
    pub fn register(&self, ip: IpAddr, parent: &CancellationToken) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Stop::child_of(parent));
        self.live.insert(id, (ip, stop.clone()));
        Registration {
            registry: self,
            id,
            stop,
        }
    }

    /// Stops every session whose client matches; returns how many.
    pub fn stop_matching(&self, reason: CloseReason, matches: impl Fn(IpAddr) -> bool) -> usize {
        let mut stopped = 0;
        for entry in self.live.iter() {
            let (ip, stop) = entry.value();
            if matches(*ip) {
                stop.stop(reason);
                stopped += 1;
            }
        }
        stopped
    }

    /// Open sessions per client IP.
    pub fn by_ip(&self) -> HashMap<IpAddr, usize> {
        let mut counts = HashMap::new();
        for entry in self.live.iter() {
            *counts.entry(entry.value().0).or_insert(0) += 1;
        }
        counts
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.live.remove(&self.id);
    }
}
