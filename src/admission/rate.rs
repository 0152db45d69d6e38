//! Per-IP connection-rate token buckets (governor, keyed, dashmap state),
//! bounded in how many IPs they track.

use std::convert::Infallible;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use crate::config::Rate;

pub struct RateTable<C: Clock = DefaultClock> {
    limiter: RateLimiter<IpAddr, Buckets, C, NoOpMiddleware<C::Instant>>,
    /// Buckets the sweeps removed and no sweep has reported yet.
    evicted: Arc<AtomicUsize>,
    max_tracked: usize,
    /// At least the number of buckets: the last exact count plus every
    /// check since (each may add one), so the map, whose exact count locks
    /// every shard, is counted only when this reaches `max_tracked`.
    at_most: AtomicUsize,
    /// One recount at a time, so two cannot both take back the same checks.
    recounting: AtomicBool,
}

/// What a bucket said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateCheck {
    Allowed,
    Limited,
    /// The table is full: this client is not rate-tracked (the caps still
    /// hold). Failing open here keeps memory flat under a flood of random
    /// sources without refusing legitimate newcomers.
    Untracked,
}

pub fn quota(rate: Rate, burst: u32) -> Quota {
    let period = rate.per / u32::try_from(rate.amount).unwrap_or(u32::MAX).max(1);
    Quota::with_period(period.max(std::time::Duration::from_nanos(1)))
        .expect("period is not zero")
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

impl RateTable<DefaultClock> {
    pub fn new(quota: Quota, max_tracked: usize) -> Self {
        RateTable::with_clock(quota, max_tracked, DefaultClock::default())
    }
}

impl<C: Clock> RateTable<C> {
    pub fn with_clock(quota: Quota, max_tracked: usize, clock: C) -> Self {
        let evicted = Arc::new(AtomicUsize::new(0));
        let buckets = Buckets {
            map: DashMapStateStore::default(),
            evicted: Arc::clone(&evicted),
        };
        RateTable {
            limiter: RateLimiter::new(quota, buckets, clock),
            evicted,
            max_tracked,
            at_most: AtomicUsize::new(0),
            recounting: AtomicBool::new(false),
        }
    }

    pub fn check(&self, ip: IpAddr) -> RateCheck {
        if self.at_most.fetch_add(1, Ordering::AcqRel) >= self.max_tracked
            && self.recount(1) >= self.max_tracked
        {
            return RateCheck::Untracked;
        }
        match self.limiter.check_key(&ip) {
            Ok(_) => RateCheck::Allowed,
            Err(_) => RateCheck::Limited,
        }
    }

    /// Forgets buckets that are full again (as if never seen); returns how
    /// many were evicted.
    pub fn sweep(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.recount(0);
        self.evicted.swap(0, Ordering::AcqRel)
    }

    /// Counts the buckets and lowers the estimate to that count, keeping
    /// the checks made while counting and the `pending` ones about to add
    /// their bucket (each may add one).
    fn recount(&self, pending: usize) -> usize {
        if self.recounting.swap(true, Ordering::AcqRel) {
            return self.limiter.len();
        }
        let estimate = self.at_most.load(Ordering::Acquire);
        let tracked = self.limiter.len();
        self.at_most
            .fetch_sub(estimate.saturating_sub(tracked + pending), Ordering::AcqRel);
        self.recounting.store(false, Ordering::Release);
        tracked
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// governor's own dashmap store, counting what its sweep removes. The
/// length before a sweep less the length after it is not that count:
/// clients keep adding buckets while the sweep runs.
struct Buckets {
    map: DashMapStateStore<IpAddr>,
    evicted: Arc<AtomicUsize>,
}

impl StateStore for Buckets {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.map.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for Buckets {
    /// governor's rule (a bucket whose arrival time is at or before
    /// `drop_below` is as good as new), counted as it removes.
    fn retain_recent(&self, drop_below: Nanos) {
        self.map.retain(|_, bucket| {
            let keep = arrival_time(bucket) > drop_below.as_u64();
            if !keep {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            keep
        });
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A bucket's theoretical arrival time (ns since the limiter's start), read
/// through the one public door to it: a measurement that declines to
/// replace anything.
fn arrival_time(bucket: &InMemoryState) -> u64 {
    let Err(tat) = bucket.measure_and_replace(&NotKeyed::NonKey, |tat| {
        Err::<(Infallible, Nanos), u64>(tat.map_or(0, Nanos::as_u64))
    });
    tat
}
