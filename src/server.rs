//! The running proxy: listeners, admin endpoint, and graceful shutdown.
//!
//! Shutdown order (linkerd2-proxy's): stop accepting; tell sessions to
//! drain (each closes at its next quiet point); wait up to
//! `server.shutdown_grace`; then abort what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::bans::Bans;
use crate::blocklist::sources::{SourceMetrics, Sources};
use crate::blocklist::{self, Blocklist, Lists};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::registry::Registry;
use crate::session::CloseReason;
use crate::session::Shared;
use crate::shaping::Shaping;
use crate::{admin, listener};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({key}): {source}; is another process using it?")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Server {
    config: Arc<Config>,
    listeners: Vec<TcpListener>,
    admin: Option<TcpListener>,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Binds every listener, so failures show before anything runs.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let listeners = config
            .server
            .listen
            .iter()
            .map(|&addr| {
                listener::bind(addr).map_err(|source| ServerError::Bind {
                    key: "server.listen",
                    addr,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let admin = match config.admin.listen {
            Some(addr) => Some(listener::bind(addr).map_err(|source| ServerError::Bind {
                key: "admin.listen",
                addr,
                source,
            })?),
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        for server in &config.upstream.servers {
            metrics.declare_upstream(&server.to_string());
        }
        Ok(Server {
            config: Arc::new(config),
            listeners,
            admin,
            metrics,
        })
    }

    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let live_lists = Arc::new(Blocklist::default());
        let registry = Arc::new(Registry::default());
        let sources = Arc::new(
            Sources::new(
                live_lists.clone(),
                SourceMetrics::register(self.metrics.registry()),
                kill_on_block(&self.config, registry.clone()),
            )
            .with_max_entries(self.config.blocklist.max_entries_per_source),
        );
        {
            let (config, sources) = (self.config.clone(), sources.clone());
            let _ =
                tokio::task::spawn_blocking(move || blocklist::load_all(&config, &sources)).await;
        }
        let bans = Arc::new(Bans::new(
            self.config.autoban.clone(),
            self.config.server.shadow,
            self.config.server.max_tracked_ips,
            sources.clone(),
            self.metrics.clone(),
        ));
        let shaping = Arc::new(Shaping::new(
            &self.config,
            bans.clone(),
            self.metrics.clone(),
        ));
        let admission = Arc::new(Admission::new(
            &self.config,
            live_lists.clone(),
            self.metrics.clone(),
        ));
        let shared = Arc::new(Shared {
            metrics: self.metrics.clone(),
            admission: admission.clone(),
            shaping: shaping.clone(),
            blocklist: live_lists,
            registry: registry.clone(),
            tarpit_slots: Arc::new(tokio::sync::Semaphore::new(
                self.config.blocklist.tarpit_max,
            )),
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
        });
        let stop_accepting = CancellationToken::new();
        let sessions = TaskTracker::new();
        let mut background = tokio::task::JoinSet::new();

        for l in self.listeners {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "accepting SMTP clients");
            }
            background.spawn(listener::accept_loop(
                l,
                self.config.clone(),
                shared.clone(),
                sessions.clone(),
                stop_accepting.clone(),
            ));
        }
        if let Some(l) = self.admin {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "admin listener (metrics, health)");
            }
            let stop = shared.abort.clone();
            background.spawn(admin::serve(l, self.config.clone(), shared.clone(), stop));
        }

        background.spawn(blocklist::files::watch(
            sources.clone(),
            blocklist::file_sources(&self.config),
        ));
        if let Some(api) = self.config.blocklist.api.clone() {
            background.spawn(blocklist::api::poll(sources.clone(), api));
        }
        background.spawn(bans.clone().maintain(self.config.autoban.state.clone()));
        let sweep_every = self.config.server.state_sweep;
        background.spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + sweep_every, sweep_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                admission.sweep(tokio::time::Instant::now());
                shaping.sweep();
            }
        });

        shutdown.await;
        let grace = self.config.server.shutdown_grace;
        tracing::info!(sessions = sessions.len(), grace = ?grace, "shutting down: no new clients, draining sessions");
        stop_accepting.cancel();
        shared.drain.cancel();
        sessions.close();
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            tracing::warn!(
                sessions = sessions.len(),
                "shutdown grace ran out; closing the remaining sessions"
            );
            shared.abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
        }
        shared.abort.cancel();
        background.shutdown().await;
        // Bans made in the last moments are not lost with the process.
        bans.save_now(self.config.autoban.state.as_deref());
        tracing::info!("stopped");
    }
}

/// The hook run after each list swap: with `kill_on_block`, close the open
/// sessions of clients the new lists block. Shadow mode only logs them.
fn kill_on_block(config: &Config, registry: Arc<Registry>) -> Box<dyn Fn(&Lists) + Send + Sync> {
    let (enabled, shadow) = (config.blocklist.kill_on_block, config.server.shadow);
    Box::new(move |lists: &Lists| {
        if !enabled {
            return;
        }
        let newly_blocked = |ip| lists.is_blocked(ip) && !lists.is_allowed(ip);
        if shadow {
            let n = registry
                .by_ip()
                .into_keys()
                .filter(|ip| newly_blocked(*ip))
                .count();
            if n > 0 {
                tracing::info!(
                    clients = n,
                    "shadow: would close sessions of blocked clients"
                );
            }
            return;
        }
        let n = registry.stop_matching(CloseReason::Blocked, newly_blocked);
        if n > 0 {
            tracing::info!(sessions = n, "closed sessions of newly blocked clients");
        }
    })
}
