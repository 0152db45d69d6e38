//! The open-file budget of the SMTP side.
//!
//! A relayed session holds two descriptors (client and receiver). The SMTP
//! listeners may use the soft `RLIMIT_NOFILE` minus a [`RESERVE`]; when the
//! budget is spent they stop accepting (clients wait in the backlog) rather
//! than fail on EMFILE, so the admin listener, the state files and the
//! blocklist reloads always find a descriptor.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept out of the SMTP budget: the admin listener's
/// connections (`admin::MAX_CONNECTIONS`), listening sockets, list and
/// state files, the file watcher, the main runtime's own (the session
/// workers' are taken out of the budget: `workers::descriptors_held`).
pub const RESERVE: u64 = 128;
/// Descriptors one session may hold: its client and its receiver.
pub const PER_SESSION: u32 = 2;

/// Descriptor slots for SMTP sessions; a session's slot returns when its
/// task ends.
#[derive(Clone)]
pub struct Budget {
    slots: Arc<Semaphore>,
    size: usize,
}

impl Budget {
    /// The budget under the process's soft open-file limit.
    pub fn from_process_limit() -> Budget {
        Budget::under(soft_limit())
    }

    /// The budget under `limit` descriptors: `limit` less the reserve (or
    /// less half of it, when `limit` is too small to keep the whole reserve).
    pub fn under(limit: u64) -> Budget {
        let reserve = RESERVE.min(limit / 2);
        let size = usize::try_from(limit - reserve)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS)
            .max(PER_SESSION as usize);
        Budget {
            slots: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// A session's slot now, if the budget has one.
    pub fn try_session(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_many_owned(PER_SESSION).ok()
    }

    /// A session's slot, waiting for one to be released.
    pub async fn session(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_many_owned(PER_SESSION)
            .await
            .expect("the budget's semaphore is never closed")
    }
}

/// The soft open-file limit; `u64::MAX` when unlimited or unknown.
pub fn soft_limit() -> u64 {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) if soft != rlimit::INFINITY => soft,
        Ok(_) => u64::MAX,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
            u64::MAX
        }
    }
}

/// Warns when `server.max_connections` relayed sessions could not all get
/// their two descriptors under `limit` with the reserve kept.
pub fn warn_if_short(max_connections: usize, limit: u64) {
    let needed = (max_connections as u64)
        .saturating_mul(u64::from(PER_SESSION))
        .saturating_add(RESERVE);
    if needed > limit {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            needed,
            "server.max_connections needs {needed} descriptors (2 per session + {RESERVE} reserved) \
             but the open-file limit is {limit}: raise it (LimitNOFILE= in systemd, ulimit -n) \
             or lower server.max_connections; past {} sessions mailmoat stops accepting until some close",
            Budget::under(limit).size() / PER_SESSION as usize
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_the_reserve_out_of_the_smtp_side() {
        assert_eq!(Budget::under(1024).size(), 1024 - RESERVE as usize);
        assert_eq!(Budget::under(100).size(), 50);
        assert_eq!(Budget::under(0).size(), PER_SESSION as usize);
        assert_eq!(Budget::under(u64::MAX).size(), Semaphore::MAX_PERMITS);
    }

    #[test]
    fn session_slots_run_out_at_the_budget_and_come_back_on_drop() {
        let budget = Budget::under(8);
        assert_eq!(budget.size(), 4);
        let first = budget.try_session().expect("a slot");
        let second = budget.try_session().expect("a slot");
        assert!(budget.try_session().is_none());
        drop(first);
        assert!(budget.try_session().is_some());
        drop(second);
    }
}
