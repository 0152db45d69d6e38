//! The circuit breaker between this node and the fleet's store: after
//! `breaker_failures` failed operations in a row it opens, and for
//! `breaker_cooldown` nothing is sent to the store, so no caller pays a
//! timeout for a store that is gone. Then one trial goes through (another
//! only if it has not reported within a cooldown); its success closes the
//! breaker, its failure opens it again.
//!
//! `is_up` is what the data path reads (one atomic load): whether to trust
//! the fleet's counts or enforce the local share. Any failure puts it down
//! at once, before the breaker opens: between a store's death and the
//! breaker opening, a shared rate would otherwise hold only per node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::FleetMetrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A trial is out since `since`.
    HalfOpen {
        since: Instant,
    },
}

/// What an outcome changed, for the caller to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turned {
    Unchanged,
    /// The store answers again after an outage (or for the first time).
    Up,
    /// The breaker just opened.
    Down,
}

pub struct Breaker {
    failures_to_open: u32,
    cooldown: Duration,
    state: Mutex<State>,
    up: AtomicBool,
}

impl Breaker {
    /// Starts closed but not up: until the store has answered once, the
    /// node enforces its local shares.
    pub fn new(failures_to_open: u32, cooldown: Duration) -> Breaker {
        Breaker {
            failures_to_open: failures_to_open.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
            up: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True when the store's answers stand: the last operation succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether an operation may go to the store now; after the cooldown,
    /// the first caller is the trial and the others wait for its outcome.
    pub fn allows(&self, now: Instant) -> bool {
        let mut state = self.state();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { since: now };
                true
            }
            State::HalfOpen { since } if now >= since + self.cooldown => {
                *state = State::HalfOpen { since: now };
                true
            }
            State::Open { .. } | State::HalfOpen { .. } => false,
        }
    }

    /// How long until an open breaker lets a trial through.
    pub fn wait(&self, now: Instant) -> Duration {
        match *self.state() {
            State::Closed { .. } => Duration::ZERO,
            State::Open { until } => until.saturating_duration_since(now),
            State::HalfOpen { since } => (since + self.cooldown).saturating_duration_since(now),
        }
    }

    pub fn success(&self, metrics: &FleetMetrics) -> Turned {
        *self.state() = State::Closed { failures: 0 };
        if self.up.swap(true, Ordering::Relaxed) {
            return Turned::Unchanged;
        }
        metrics.up.set(1);
        Turned::Up
    }

    pub fn failure(&self, now: Instant, metrics: &FleetMetrics) -> Turned {
        self.up.store(false, Ordering::Relaxed);
        metrics.up.set(0);
        let mut state = self.state();
        let opens = match *state {
            State::Closed { failures } => {
                let failures = failures.saturating_add(1);
                *state = State::Closed { failures };
                failures >= self.failures_to_open
            }
            // A trial failed: wait another cooldown.
            State::Open { .. } | State::HalfOpen { .. } => true,
        };
        if !opens {
            return Turned::Unchanged;
        }
        let was_closed = matches!(*state, State::Closed { .. });
        *state = State::Open {
            until: now + self.cooldown,
        };
        drop(state);
        if was_closed {
            metrics.breaker_opened.inc();
            return Turned::Down;
        }
        Turned::Unchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn the_breaker_opens_after_the_configured_failures_and_lets_one_trial_through_after_its_cooldown(
    ) {
        let metrics = Metrics::new();
        let m = &metrics.fleet;
        let breaker = Breaker::new(3, Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(!breaker.is_up(), "not up before the store answered");
        assert_eq!(breaker.success(m), Turned::Up);
        assert!(breaker.is_up());
        assert_eq!(breaker.failure(t0, m), Turned::Unchanged);
        assert!(!breaker.is_up(), "down at the first failure");
        assert_eq!(breaker.failure(t0, m), Turned::Unchanged);
        assert!(breaker.allows(t0), "still tried until the breaker opens");
        assert_eq!(breaker.failure(t0, m), Turned::Down);
        assert!(!breaker.is_up());
        assert!(!breaker.allows(t0 + Duration::from_secs(4)));
        assert_eq!(breaker.wait(t0), Duration::from_secs(5));
        let trial = t0 + Duration::from_secs(5);
        assert!(breaker.allows(trial));
        assert!(!breaker.allows(trial), "one trial at a time");
        assert_eq!(breaker.failure(trial, m), Turned::Unchanged);
        assert!(!breaker.allows(trial + Duration::from_secs(1)));
        assert_eq!(breaker.success(m), Turned::Up);
        assert!(breaker.allows(trial) && breaker.is_up());
        assert_eq!(m.breaker_opened.get(), 1);
    }

    #[test]
    fn a_success_between_failures_starts_the_count_over() {
        let metrics = Metrics::new();
        let breaker = Breaker::new(2, Duration::from_secs(1));
        let now = Instant::now();
        breaker.success(&metrics.fleet);
        breaker.failure(now, &metrics.fleet);
        assert_eq!(breaker.success(&metrics.fleet), Turned::Up);
        assert_eq!(breaker.failure(now, &metrics.fleet), Turned::Unchanged);
        assert!(breaker.allows(now));
    }
}
