//! Concurrent-connection counts: global, per IP, per prefix.
//!
//! The rule (sozu's rate-limit design note, and the fix for stalwart's
//! `InFlight` race): a count is checked and incremented under one map-entry
//! lock, so two connections can never both slip past a cap; an entry that
//! drops to zero is removed, so the maps hold only clients that are
//! connected now. A [`Permit`] releases its counts on drop, however the
//! session ends.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use ipnet::IpNet;
use prometheus::IntGauge;

pub struct ConnectionCounts {
    global: AtomicUsize,
    per_ip: DashMap<IpAddr, u32>,
    per_prefix: DashMap<IpNet, u32>,
    active_sessions: IntGauge,
}

/// Counts held by one admitted connection.
pub struct Permit {
    counts: Arc<ConnectionCounts>,
    ip: Option<IpAddr>,
    prefix: Option<IpNet>,
}

impl ConnectionCounts {
    pub fn new(active_sessions: IntGauge) -> Arc<Self> {
        Arc::new(ConnectionCounts {
            global: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            per_prefix: DashMap::new(),
            active_sessions,
        })
    }

    /// Takes a global slot; `None` at the cap unless `force` (shadow mode).
    pub fn acquire(self: &Arc<Self>, cap: usize, force: bool) -> Option<Permit> {
        self.global
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap || force).then_some(n + 1)
            })
            .ok()?;
        self.active_sessions.inc();
        Some(Permit {
            counts: self.clone(),
            ip: None,
            prefix: None,
        })
    }

    pub fn ips(&self) -> usize {
        self.per_ip.len()
    }

    pub fn prefixes(&self) -> usize {
        self.per_prefix.len()
    }

    pub fn global(&self) -> usize {
        self.global.load(Ordering::Acquire)
    }

    pub fn of_ip(&self, ip: IpAddr) -> u32 {
        self.per_ip.get(&ip).map_or(0, |n| *n)
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("ip", &self.ip)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Permit {
    /// Adds the per-IP count; false (and nothing added) at the cap unless `force`.
    pub fn add_ip(&mut self, ip: IpAddr, cap: u32, force: bool) -> bool {
        let ok = try_increment(&self.counts.per_ip, ip, cap, force);
        if ok {
            self.ip = Some(ip);
        }
        ok
    }

    pub fn add_prefix(&mut self, prefix: IpNet, cap: u32, force: bool) -> bool {
        let ok = try_increment(&self.counts.per_prefix, prefix, cap, force);
        if ok {
            self.prefix = Some(prefix);
        }
        ok
    }
}

/// Caps are at least 1, so a refused key always has a live entry and no
/// zero entry is ever left behind.
fn try_increment<K: Hash + Eq>(map: &DashMap<K, u32>, key: K, cap: u32, force: bool) -> bool {
    let mut count = map.entry(key).or_insert(0);
    if *count >= cap && !force {
        return false;
    }
    *count += 1;
    true
}

fn release<K: Hash + Eq>(map: &DashMap<K, u32>, key: &K) {
    if let Some(mut n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
    }
    map.remove_if(key, |_, n| *n == 0);
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip.take() {
            release(&self.counts.per_ip, &ip);
        }
        if let Some(prefix) = self.prefix.take() {
            release(&self.counts.per_prefix, &prefix);
        }
        self.counts.global.fetch_sub(1, Ordering::AcqRel);
        self.counts.active_sessions.dec();
    }
}
