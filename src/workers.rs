//! The session workers: one thread per core, each with its own
//! single-threaded runtime, where client sessions live from accept to close.
//!
//! A session's socket events, timers and wakeups stay on the thread that
//! accepted it, as in HAProxy and nginx. On the shared multi-threaded
//! runtime each session hopped between workers: a profile of fresh
//! transactions showed three futex wakeups, two eventfd writes and a
//! `sched_yield` per transaction, and a quarter more kernel time than a
//! single worker spent on the same work. The admin API and the background
//! tasks stay on the main runtime; workers share the process's state
//! (admission, bans, lists, metrics) as before.
//!
//! Every worker accepts from the same listening socket (a duplicate of its
//! descriptor, registered with the worker's own reactor), so whichever
//! worker is free takes the next client: a busy one leaves clients to the
//! others instead of queueing them behind its own.

use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// At most this many workers, whatever the core count says.
const MAX_WORKERS: usize = 64;
/// How often an idle worker wakes: see [`keep_time_near`].
const TICK: Duration = Duration::from_millis(500);

pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    /// Ends every worker's runtime, dropping what still runs on it.
    stop: CancellationToken,
}

impl Workers {
    /// One worker per available core.
    pub fn per_core() -> std::io::Result<Workers> {
        Workers::start(per_core_count())
    }

    pub fn start(count: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::new(),
            threads: Vec::new(),
            stop: stop.clone(),
        };
        for i in 0..count.max(1) {
            // Signals are the main runtime's business, but tokio gives every
            // runtime with I/O its own signal and process drivers all the
            // same (their descriptors counted in `descriptors_held`).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("mailmoat-w{i}"))
                .spawn(move || {
                    runtime.spawn(keep_time_near());
                    runtime.block_on(stop.cancelled())
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Descriptors the workers hold with `listeners` listening sockets
    /// (see [`descriptors_held`]).
    pub fn descriptors(&self, listeners: usize) -> u64 {
        descriptors_held(self.handles.len(), listeners)
    }

    /// Runs `future` on the worker `handle` belongs to and waits here. If
    /// this wait is dropped (the supervisor aborting it), the future is
    /// aborted too, and a panic there is a panic here, so the supervisor
    /// counts and restarts it like any task.
    pub fn run_on<F>(handle: &Handle, future: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let task = tokio_util::task::AbortOnDropHandle::new(handle.spawn(future));
        async move {
            if let Err(e) = task.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }

    /// Ends the workers and waits for their threads; what still runs on
    /// them (nothing, after a graceful shutdown) is dropped.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Keeps a timer always due within [`TICK`] on the worker's runtime.
///
/// Tokio's time driver wakes its reactor (an eventfd write, then one more
/// `epoll_wait`) whenever a timer is armed earlier than the driver's next
/// planned wake. With only sessions' idle deadlines (minutes away) in the
/// wheel, every upstream connect timeout, ten seconds away, did that: one
/// write and one extra turn per transaction. With a tick always nearer,
/// deadlines more than [`TICK`] away are armed silently; the tick's own
/// re-arm wakes the reactor, twice a second per worker, busy or idle.
///
/// Not supervised: it cannot fail, and ends only with its runtime.
async fn keep_time_near() {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// How many workers [`Workers::per_core`] starts here.
pub fn per_core_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(MAX_WORKERS)
}

/// Descriptors `workers` hold with `listeners` listening sockets: each
/// worker's runtime opens four (its epoll and a duplicate of it, a wakeup
/// eventfd and its copy of tokio's signal pipe, as `/proc/self/fd` shows
/// for tokio 1.54), plus its copy of every listening socket.
pub fn descriptors_held(workers: usize, listeners: usize) -> u64 {
    let per_worker = 4 + listeners as u64;
    per_worker.saturating_mul(workers as u64)
}

impl Drop for Workers {
    /// A server dropped without a shutdown (a test ending) leaves no
    /// thread serving behind it.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
