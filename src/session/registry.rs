//! The sessions open now, by client IP: so a list change can close the
//! sessions of newly blocked clients (`kill_on_block`), and the operator can
//! see who holds the most sessions.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;

use super::CloseReason;

const DRAIN: u8 = 1;
const STOP: u8 = 2;

/// Tells one session to finish: at its next quiet point (a graceful
/// drain), or now, and why. One per session, waited on by that session's
/// task alone, so a relay loop turn waits for both with one small future
/// and no lock.
#[derive(Debug, Default)]
pub struct Stop {
    state: AtomicU8,
    reason: OnceLock<CloseReason>,
    waker: AtomicWaker,
}

/// What a session was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Close at the next quiet point.
    Drain,
    /// Close now.
    Stop(CloseReason),
}

impl Stop {
    pub fn stop(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.state.fetch_or(STOP, Ordering::AcqRel);
        self.waker.wake();
    }

    pub fn drain(&self) {
        self.state.fetch_or(DRAIN, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The next signal: a stop, or a drain unless `draining` says it was
    /// already heard. Only one task may wait on a `Stop` at a time.
    pub fn signal(&self, draining: bool) -> impl Future<Output = Signal> + '_ {
        self.until(move |stop| match stop.stopped_for() {
            Some(reason) => Some(Signal::Stop(reason)),
            None => (stop.state.load(Ordering::Acquire) & DRAIN != 0 && !draining)
                .then_some(Signal::Drain),
        })
    }

    /// Waits for a stop, not a drain, and says why.
    pub fn stopped(&self) -> impl Future<Output = CloseReason> + '_ {
        self.until(Stop::stopped_for)
    }

    fn stopped_for(&self) -> Option<CloseReason> {
        let stopped = self.state.load(Ordering::Acquire) & STOP != 0;
        stopped.then(|| self.reason.get().copied().unwrap_or(CloseReason::Shutdown))
    }

    fn until<'a, T>(
        &'a self,
        heard: impl Fn(&Stop) -> Option<T> + 'a,
    ) -> impl Future<Output = T> + 'a {
        poll_fn(move |cx| {
            if let Some(signal) = heard(self) {
                return Poll::Ready(signal);
            }
            self.waker.register(cx.waker());
            // A signal sent between the look and the registration woke
            // no one: look again.
            heard(self).map_or(Poll::Pending, Poll::Ready)
        })
    }
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: DashMap<u64, (IpAddr, Arc<Stop>)>,
    /// Set once shutdown begins, so a session that registers during it
    /// hears it too.
    draining: AtomicBool,
    stopping: AtomicBool,
}

/// A session's place in the registry, removed on drop.
pub struct Registration<'a> {
    registry: &'a Registry,
    id: u64,
    pub stop: Arc<Stop>,
}

impl Registry {
    pub fn register(&self, ip: IpAddr) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Stop::default());
        self.live.insert(id, (ip, stop.clone()));
        // Paired with the fence in `drain_all` and `stop_all`: either this
        // session is in the map they walk, or it sees their flag here.
        fence(Ordering::SeqCst);
        if self.stopping.load(Ordering::Relaxed) {
            stop.stop(CloseReason::Shutdown);
        } else if self.draining.load(Ordering::Relaxed) {
            stop.drain();
        }
        Registration {
            registry: self,
            id,
            stop,
        }
    }

    /// Tells every session, now and registered later, to close at its next
    /// quiet point (graceful shutdown).
    pub fn drain_all(&self) {
        self.draining.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        for entry in self.live.iter() {
            entry.value().1.drain();
        }
    }

    /// Stops every session, now and registered later (the shutdown grace
    /// ran out).
    pub fn stop_all(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        for entry in self.live.iter() {
            entry.value().1.stop(CloseReason::Shutdown);
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn now<T>(future: impl Future<Output = T>) -> Option<T> {
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(future).poll(&mut cx) {
            Poll::Ready(value) => Some(value),
            Poll::Pending => None,
        }
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_drain_is_heard_once_and_a_stop_after_it_still_is() {
        let registry = Registry::default();
        let session = registry.register(IP);
        assert_eq!(now(session.stop.signal(false)), None);
        registry.drain_all();
        assert_eq!(now(session.stop.signal(false)), Some(Signal::Drain));
        assert_eq!(now(session.stop.signal(true)), None);
        assert_eq!(now(session.stop.stopped()), None);
        session.stop.stop(CloseReason::Blocked);
        let stopped = Signal::Stop(CloseReason::Blocked);
        assert_eq!(now(session.stop.signal(true)), Some(stopped));
        assert_eq!(now(session.stop.stopped()), Some(CloseReason::Blocked));
    }

    #[test]
    fn sessions_registered_after_shutdown_began_hear_it() {
        let registry = Registry::default();
        registry.drain_all();
        let drained = registry.register(IP);
        assert_eq!(now(drained.stop.signal(false)), Some(Signal::Drain));
        registry.stop_all();
        let late = registry.register(IP);
        assert_eq!(now(late.stop.stopped()), Some(CloseReason::Shutdown));
        assert_eq!(now(drained.stop.stopped()), Some(CloseReason::Shutdown));
    }

    #[test]
    fn the_first_reason_given_is_the_one_kept() {
        let registry = Registry::default();
        let session = registry.register(IP);
        assert_eq!(registry.stop_matching(CloseReason::Blocked, |_| true), 1);
        registry.stop_all();
        assert_eq!(now(session.stop.stopped()), Some(CloseReason::Blocked));
        drop(session);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_a_drain_then_waits_for_the_stop() {
        let registry = Arc::new(Registry::default());
        let session = registry.register(IP);
        let stop = session.stop.clone();
        let waiting = tokio::spawn(async move {
            let first = stop.signal(false).await;
            (first, stop.signal(true).await)
        });
        tokio::task::yield_now().await;
        registry.drain_all();
        registry.drain_all();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a second drain is not a stop");
        registry.stop_all();
        let heard = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        let stopped = Signal::Stop(CloseReason::Shutdown);
        assert_eq!(
            heard.expect("woken").expect("joined"),
            (Signal::Drain, stopped)
        );
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_a_stop() {
        let registry = Arc::new(Registry::default());
        let session = registry.register(IP);
        let stop = session.stop.clone();
        let waiting = tokio::spawn(async move { stop.stopped().await });
        tokio::task::yield_now().await;
        registry.stop_all();
        let reason = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert_eq!(
            reason.expect("woken").expect("joined"),
            CloseReason::Shutdown
        );
    }
}
