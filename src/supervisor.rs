//! Long-lived background tasks, supervised: a task that panics or returns
//! is logged at error with its name, counted in
//! `mailmoat_task_restarts_total{task}`, shown down in `mailmoat_task_up`
//! and `/readyz`, and started again from its factory after a backoff
//! (100 ms doubling to 5 s). Nothing dies silently.
//!
//! Each task is spawned with the token that ends it; once that token is
//! cancelled the running instance is aborted and never restarted, and
//! dropping its factory releases what the factory holds (a listener).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The first wait before a restart.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait before a restart.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A task that ran this long before dying starts over from [`FIRST_BACKOFF`]:
/// a rare crash is not punished for the crash loops of long ago.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Every supervised task: a closed set, so the metric label is bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// One per `server.listen` address.
    SmtpAccept,
    Admin,
    BlocklistFiles,
    BlocklistApi,
    BanMaintenance,
    StateSweep,
    UpstreamCheck,
    /// Waits for SIGHUP and reloads the config.
    ConfigReload,
    /// Reloads the TLS certificates when their files change and on SIGHUP.
    CertificateReload,
    /// The other fleet nodes' ban changes, by subscription.
    FleetEvents,
    /// Heartbeat, fleet view and reconciliation of the bans.
    FleetSync,
    /// This node's ban changes, written to the fleet's store.
    FleetPublish,
    /// Shared-rate takes, sent to the fleet's store.
    FleetRates,
}

impl Task {
    pub const ALL: [Task; 13] = [
        Task::SmtpAccept,
        Task::Admin,
        Task::BlocklistFiles,
        Task::BlocklistApi,
        Task::BanMaintenance,
        Task::StateSweep,
        Task::UpstreamCheck,
        Task::ConfigReload,
        Task::CertificateReload,
        Task::FleetEvents,
        Task::FleetSync,
        Task::FleetPublish,
        Task::FleetRates,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::SmtpAccept => "smtp_accept",
            Task::Admin => "admin",
            Task::BlocklistFiles => "blocklist_files",
            Task::BlocklistApi => "blocklist_api",
            Task::BanMaintenance => "ban_maintenance",
            Task::StateSweep => "state_sweep",
            Task::UpstreamCheck => "upstream_check",
            Task::ConfigReload => "config_reload",
            Task::CertificateReload => "certificate_reload",
            Task::FleetEvents => "fleet_events",
            Task::FleetSync => "fleet_sync",
            Task::FleetPublish => "fleet_publish",
            Task::FleetRates => "fleet_rates",
        }
    }
}

/// The wait before restart number `restarts` (1 for the first).
pub fn backoff(restarts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << restarts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

pub struct Supervisor {
    restarts: IntCounterVec,
    up: IntGaugeVec,
    /// Instances down now, per task (several accept loops share a name).
    down: [AtomicUsize; Task::ALL.len()],
    tracker: TaskTracker,
}

impl Supervisor {
    pub fn new(registry: &Registry) -> Supervisor {
        let restarts = IntCounterVec::new(
            Opts::new(
                "mailmoat_task_restarts_total",
                "Background tasks restarted after a panic or an unexpected end, by task.",
            ),
            &["task"],
        )
        .expect("valid metric");
        let up = IntGaugeVec::new(
            Opts::new(
                "mailmoat_task_up",
                "1 while every instance of a background task runs, 0 while one waits to restart.",
            ),
            &["task"],
        )
        .expect("valid metric");
        for metric in [
            Box::new(restarts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(up.clone()),
        ] {
            registry.register(metric).expect("unique metric");
        }
        Supervisor {
            restarts,
            up,
            down: Default::default(),
            tracker: TaskTracker::new(),
        }
    }

    /// Runs `factory()`'s future as `task` until `stop`, restarting it
    /// whenever it panics or returns before `stop`.
    pub fn spawn<F, Fut>(
        self: &std::sync::Arc<Self>,
        task: Task,
        stop: CancellationToken,
        factory: F,
    ) where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.restarts.with_label_values(&[task.as_str()]);
        self.set_up(task);
        let this = self.clone();
        self.tracker
            .spawn(async move { this.supervise(task, stop, factory).await });
    }

    async fn supervise<F, Fut>(&self, task: Task, stop: CancellationToken, factory: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let mut instance = tokio::spawn(factory());
            let ended = tokio::select! {
                () = stop.cancelled() => {
                    instance.abort();
                    let _ = instance.await;
                    return;
                }
                ended = &mut instance => ended,
            };
            if stop.is_cancelled() {
                return;
            }
            let why = match ended {
                Ok(()) => "returned".to_string(),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
                Err(e) => format!("was cancelled: {e}"),
            };
            failures = if started.elapsed() >= HEALTHY_RUN {
                1
            } else {
                failures.saturating_add(1)
            };
            let wait = backoff(failures);
            tracing::error!(task = task.as_str(), restart_in = ?wait, "background task {why}");
            self.restarts.with_label_values(&[task.as_str()]).inc();
            self.down[task as usize].fetch_add(1, Ordering::SeqCst);
            self.set_up(task);
            let stopped = tokio::select! {
                () = stop.cancelled() => true,
                () = tokio::time::sleep(wait) => false,
            };
            self.down[task as usize].fetch_sub(1, Ordering::SeqCst);
            self.set_up(task);
            if stopped {
                return;
            }
            tracing::info!(task = task.as_str(), "background task restarted");
        }
    }

    fn set_up(&self, task: Task) {
        let up = self.down[task as usize].load(Ordering::SeqCst) == 0;
        self.up
            .with_label_values(&[task.as_str()])
            .set(i64::from(up));
    }

    /// The tasks with an instance down now, for `/readyz`.
    pub fn down(&self) -> Vec<Task> {
        Task::ALL
            .into_iter()
            .filter(|&t| self.down[t as usize].load(Ordering::SeqCst) > 0)
            .collect()
    }

    /// Waits until every supervised task has ended (their tokens cancelled).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".into());
    format!("{:?}", text)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn metric(registry: &Registry, series: &str) -> Option<f64> {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Yields until `cond` holds; paused time does not move meanwhile.
    async fn settle(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..10_000 {
            if cond() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        cond()
    }

    #[test]
    fn backoff_doubles_from_100ms_and_stops_at_5s() {
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_counted_shown_down_and_restarted_until_it_runs() {
        let registry = Registry::new();
        let supervisor = Arc::new(Supervisor::new(&registry));
        let starts = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        {
            let starts = starts.clone();
            supervisor.spawn(Task::BanMaintenance, stop.clone(), move || {
                let n = starts.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if n <= 3 {
                        panic!("overflow when adding duration to instant");
                    }
                    std::future::pending::<()>().await;
                }
            });
        }
        let restarts = r#"mailmoat_task_restarts_total{task="ban_maintenance"}"#;
        let up = r#"mailmoat_task_up{task="ban_maintenance"}"#;

        for (n, wait) in [(1, 100), (2, 200), (3, 400)] {
            assert!(
                settle(|| metric(&registry, restarts) == Some(n as f64)).await,
                "restart {n} not counted"
            );
            assert_eq!(supervisor.down(), [Task::BanMaintenance]);
            assert_eq!(metric(&registry, up), Some(0.0));
            assert_eq!(starts.load(Ordering::SeqCst), n);
            // Not before its backoff...
            tokio::time::sleep(Duration::from_millis(wait - 1)).await;
            assert_eq!(starts.load(Ordering::SeqCst), n);
            // ...and at once after it.
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(settle(|| starts.load(Ordering::SeqCst) == n + 1).await);
        }
        assert!(settle(|| supervisor.down().is_empty()).await);
        assert_eq!(metric(&registry, up), Some(1.0));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            4,
            "a running task was restarted"
        );
        assert_eq!(metric(&registry, restarts), Some(3.0));

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), supervisor.wait())
            .await
            .expect("supervisor stops with its token");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_returns_is_restarted_but_not_after_its_stop() {
        let registry = Registry::new();
        let supervisor = Arc::new(Supervisor::new(&registry));
        let starts = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        {
            let (starts, stop) = (starts.clone(), stop.clone());
            supervisor.spawn(Task::StateSweep, stop.clone(), move || {
                starts.fetch_add(1, Ordering::SeqCst);
                // Like an accept loop: it ends when told to.
                let stop = stop.clone();
                async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(1150)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        let restarts = r#"mailmoat_task_restarts_total{task="state_sweep"}"#;
        assert_eq!(metric(&registry, restarts), Some(1.0));

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), supervisor.wait())
            .await
            .expect("supervisor stops with its token");
        assert_eq!(metric(&registry, restarts), Some(1.0));
        assert!(supervisor.down().is_empty());
    }
}
