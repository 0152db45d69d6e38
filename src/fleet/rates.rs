//! Per-IP rates counted across the fleet.
//!
//! A shared rate never makes a client wait for the store. The caller has
//! already taken a token from this node's own bucket (the full limit: one
//! node alone never lets more through). Then [`SharedRates::check`]:
//! - store up: refuse if the store last said this client's fleet-wide rate
//!   is spent (until the time it gave), else let it through and queue the
//!   take for the store's GCRA script, whose answer updates that verdict.
//!   A node can let one event through before it hears that the fleet's
//!   count is spent, so a fleet of N overshoots by at most about N; the
//!   script charges those, so they are paid back.
//! - store down (breaker open, or never reached): this node's share of
//!   the limit, rate/N and burst/N for a fleet of N: the fleet together
//!   still lets through about the limit, never "unlimited".
//!
//! The share buckets are charged on every event, up or down, so when the
//! store fails they already hold what this client spent here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::store::{Store, StoreError};
use crate::admission::{quota, RateCheck, RateTable};
use crate::config::{Config, Rate, SharedRate};
use crate::metrics::{Metrics, StoreOp};

/// Takes waiting for the store; beyond, they are dropped (counted), and
/// only the local buckets hold until the queue drains.
const QUEUE: usize = 8192;

/// Takes sent to the store in one script call.
const BATCH: usize = 256;

/// How long the first take of a batch waits for others to join it.
const LINGER: Duration = Duration::from_millis(2);

/// How often expired verdicts are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// One shared rate as configured, and this node's share of it.
struct Shape {
    rate: Rate,
    burst: u32,
    /// Microseconds between two events at the rate.
    interval_us: u64,
    share: Arc<RateTable>,
}

/// The shapes of the shared rates for a fleet of `nodes`.
struct Shapes {
    nodes: u32,
    by_rate: [Option<Shape>; 3],
}

/// What the fleet says about one event of a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetVerdict {
    Allowed,
    /// Over the limit: the fleet's count is spent, or, with the store
    /// down, this node's share.
    Over,
    /// Held to this node's share while an earlier take of the client waits
    /// for the store's answer: caution, not proof of abuse, so it feeds no
    /// ban.
    Held,
}

/// A take on its way to the store.
#[derive(Clone)]
pub struct Take {
    rate: SharedRate,
    ip: IpAddr,
    interval_us: u64,
    burst: u32,
}

pub struct SharedRates {
    shared: Vec<SharedRate>,
    /// The limits in force (the latest reload's).
    config: ArcSwap<Config>,
    shapes: ArcSwap<Shapes>,
    /// Clients whose fleet-wide rate is spent, until when.
    spent: DashMap<(SharedRate, IpAddr), Instant>,
    /// Takes sent (or queued) and not answered yet, per client and rate.
    unanswered: DashMap<(SharedRate, IpAddr), u32>,
    max_tracked: usize,
    takes: mpsc::Sender<Take>,
    queue: tokio::sync::Mutex<mpsc::Receiver<Take>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

fn limits_of(config: &Config, rate: SharedRate) -> (Rate, u32) {
    let l = &config.limits;
    match rate {
        SharedRate::ConnectionRate => (l.connection_rate, l.connection_burst),
        SharedRate::MessageRate => (l.message_rate, l.message_burst),
        SharedRate::RecipientRate => (l.recipient_rate, l.recipient_burst),
    }
}

/// `rate` and `burst` divided among `nodes`, never below one event per
/// period and a burst of one.
fn share_of(rate: Rate, burst: u32, nodes: u32) -> (Rate, u32) {
    let nodes = nodes.max(1);
    let amount = (rate.amount / u64::from(nodes)).max(1);
    (
        Rate {
            amount,
            per: rate.per,
        },
        (burst / nodes).max(1),
    )
}

impl SharedRates {
    pub fn new(config: &Config, store: Arc<Store>, metrics: Arc<Metrics>) -> SharedRates {
        let fleet = config.fleet.as_ref().expect("built only with [fleet]");
        let (takes, queue) = mpsc::channel(QUEUE);
        let nodes = fleet.nodes.max(1);
        SharedRates {
            shared: fleet.shared_rates.clone(),
            config: ArcSwap::from_pointee(config.clone()),
            shapes: ArcSwap::from_pointee(Self::shapes(config, &fleet.shared_rates, nodes)),
            spent: DashMap::new(),
            unanswered: DashMap::new(),
            max_tracked: config.server.max_tracked_ips,
            takes,
            queue: tokio::sync::Mutex::new(queue),
            store,
            metrics,
        }
    }

    fn shapes(config: &Config, shared: &[SharedRate], nodes: u32) -> Shapes {
        let shape = |rate: SharedRate| {
            shared.contains(&rate).then(|| {
                let (limit, burst) = limits_of(config, rate);
                let (share_rate, share_burst) = share_of(limit, burst, nodes);
                let interval = limit.per / u32::try_from(limit.amount).unwrap_or(u32::MAX).max(1);
                Shape {
                    rate: limit,
                    burst,
                    interval_us: u64::try_from(interval.as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                    share: Arc::new(RateTable::new(
                        quota(share_rate, share_burst),
                        config.server.max_tracked_ips,
                    )),
                }
            })
        };
        Shapes {
            nodes,
            by_rate: SharedRate::ALL.map(shape),
        }
    }

    /// New limits from a reload, or a new fleet size: a shape that did not
    /// change keeps its share buckets (a client's spent tokens are not
    /// refilled by a reload).
    pub fn reshape(&self, config: &Config) {
        self.config.store(Arc::new(config.clone()));
        self.rebuild(self.nodes());
    }

    /// A new fleet size (learned from the nodes heard).
    pub fn set_nodes(&self, nodes: u32) {
        if nodes.max(1) != self.nodes() {
            tracing::info!(nodes, "fleet size changed: local shares recut");
            self.rebuild(nodes);
        }
    }

    fn rebuild(&self, nodes: u32) {
        let nodes = nodes.max(1);
        let old = self.shapes.load_full();
        let mut fresh = Self::shapes(&self.config.load(), &self.shared, nodes);
        if fresh.nodes == old.nodes {
            for (new, old) in fresh.by_rate.iter_mut().zip(old.by_rate.iter()) {
                if let (Some(new), Some(old)) = (new.as_mut(), old.as_ref()) {
                    if new.rate == old.rate && new.burst == old.burst {
                        new.share = old.share.clone();
                    }
                }
            }
        }
        self.shapes.store(Arc::new(fresh));
    }

    /// The fleet size the local shares are cut for.
    pub fn nodes(&self) -> u32 {
        self.shapes.load().nodes
    }

    /// The fleet's verdict on one event of `ip` under `rate`, which this
    /// node's own bucket has already let through. Never waits.
    pub fn check(&self, rate: SharedRate, ip: IpAddr) -> FleetVerdict {
        let shapes = self.shapes.load();
        let Some(shape) = &shapes.by_rate[rate as usize] else {
            return FleetVerdict::Allowed;
        };
        let share_allows = shape.share.check(ip) != RateCheck::Limited;
        let share = |refusal| {
            if share_allows {
                FleetVerdict::Allowed
            } else {
                refusal
            }
        };
        if !self.store.breaker.is_up() {
            self.metrics.fleet.fallback(rate);
            return share(FleetVerdict::Over);
        }
        let key = (rate, ip);
        let now = Instant::now();
        if self.spent.get(&key).is_some_and(|until| *until > now) {
            self.metrics.fleet.limited(rate);
            return FleetVerdict::Over;
        }
        // While an earlier event of this client waits for the store's
        // answer, the share decides: without it, a client faster than the
        // round trip would go unchecked until the answers came back.
        let unanswered = self.unanswered.get(&key).is_some_and(|n| *n > 0);
        if unanswered && !share_allows {
            self.metrics.fleet.fallback(rate);
            return FleetVerdict::Held;
        }
        if self.unanswered.len() >= self.max_tracked && !self.unanswered.contains_key(&key) {
            self.metrics.fleet.takes_dropped.inc();
            self.metrics.fleet.fallback(rate);
            return share(FleetVerdict::Held);
        }
        *self.unanswered.entry(key).or_insert(0) += 1;
        let take = Take {
            rate,
            ip,
            interval_us: shape.interval_us,
            burst: shape.burst,
        };
        if self.takes.try_send(take).is_err() {
            self.answered(key, 1);
            self.metrics.fleet.takes_dropped.inc();
            self.metrics.fleet.fallback(rate);
            return share(FleetVerdict::Held);
        }
        FleetVerdict::Allowed
    }

    /// `n` takes of `key` were answered (or given up on).
    fn answered(&self, key: (SharedRate, IpAddr), n: u32) {
        self.unanswered.remove_if_mut(&key, |_, left| {
            *left = left.saturating_sub(n);
            *left == 0
        });
    }

    /// Sends queued takes to the store and keeps its verdicts. Run as a
    /// task. Takes arriving within [`LINGER`] of each other go in one
    /// script call, the same client's counted together: a transaction's
    /// connection, MAIL and RCPT cost the store one call, not three.
    pub async fn send_takes(self: Arc<Self>) {
        let mut queue = self.queue.lock().await;
        let mut batch = Vec::with_capacity(BATCH);
        let mut swept = Instant::now();
        loop {
            if queue.recv_many(&mut batch, BATCH).await == 0 {
                return;
            }
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while batch.len() < BATCH {
                let room = BATCH - batch.len();
                tokio::select! {
                    n = queue.recv_many(&mut batch, room) => if n == 0 { break },
                    () = &mut linger => break,
                }
            }
            // Answered when dropped, whatever happens to the batch (an
            // error, a panic, a shutdown): a count left up would hold its
            // client to the share forever.
            let counted = InFlight {
                rates: &self,
                takes: count_takes(&batch),
            };
            batch.clear();
            if let Err(e) = self.send(&counted.takes).await {
                tracing::debug!(error = %e, takes = counted.takes.len(), "shared-rate takes not counted by the fleet");
                self.metrics
                    .fleet
                    .takes_dropped
                    .inc_by(counted.takes.len() as u64);
            }
            drop(counted);
            if swept.elapsed() >= SWEEP_EVERY {
                let now = Instant::now();
                self.spent.retain(|_, until| *until > now);
                swept = now;
            }
        }
    }

    /// Forgets share buckets that are full again.
    pub fn sweep(&self) {
        for shape in self.shapes.load().by_rate.iter().flatten() {
            shape.share.sweep();
        }
    }

    async fn send(&self, counted: &[(Take, u32)]) -> Result<(), StoreError> {
        let store = &self.store;
        let keys: Vec<String> = counted
            .iter()
            .map(|(take, _)| store.keys.rate(take.rate.as_str(), take.ip))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut cmd = store.scripts.take.call(&keys);
        for (take, n) in counted {
            cmd.arg(take.interval_us).arg(take.burst).arg(*n);
        }
        let verdicts: Vec<u64> = store
            .run(StoreOp::Take, |mut c| async move {
                cmd.query_async(&mut c).await
            })
            .await?;
        let now = Instant::now();
        for ((take, _), verdict) in counted.iter().zip(verdicts.chunks(2)) {
            let key = (take.rate, take.ip);
            let wait_ms = verdict.get(1).copied().unwrap_or(0);
            if wait_ms == 0 {
                self.spent.remove(&key);
            } else if self.spent.len() < self.max_tracked || self.spent.contains_key(&key) {
                let wait = Duration::from_millis(wait_ms.min(86_400_000));
                self.spent.insert(key, now + wait);
            }
        }
        Ok(())
    }
}

/// A batch of takes on its way; dropping it marks them answered.
struct InFlight<'a> {
    rates: &'a SharedRates,
    takes: Vec<(Take, u32)>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        for (take, n) in &self.takes {
            self.rates.answered((take.rate, take.ip), *n);
        }
    }
}

/// The takes of one batch, one per client and rate, with their count.
fn count_takes(batch: &[Take]) -> Vec<(Take, u32)> {
    let mut counted: Vec<(Take, u32)> = Vec::with_capacity(batch.len());
    let mut index: HashMap<(SharedRate, IpAddr), usize> = HashMap::with_capacity(batch.len());
    for take in batch {
        match index.get(&(take.rate, take.ip)) {
            Some(&i) => counted[i].1 = counted[i].1.saturating_add(1),
            None => {
                index.insert((take.rate, take.ip), counted.len());
                counted.push((take.clone(), 1));
            }
        }
    }
    counted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_the_limit_divided_among_the_nodes_and_never_nothing() {
        let per = Duration::from_secs(60);
        let rate = Rate { amount: 30, per };
        assert_eq!(share_of(rate, 30, 3), (Rate { amount: 10, per }, 10));
        assert_eq!(share_of(rate, 2, 5), (Rate { amount: 6, per }, 1));
        assert_eq!(
            share_of(Rate { amount: 1, per }, 1, 100),
            (Rate { amount: 1, per }, 1)
        );
        assert_eq!(
            share_of(rate, 30, 0),
            (rate, 30),
            "an unknown fleet size is one node"
        );
    }
}
