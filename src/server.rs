//! The running proxy: listeners, admin endpoint, background tasks, and
//! graceful shutdown.
//!
//! The shared state is built once ([`Core::build`]); every long-lived task
//! (accept loops, admin listener, blocklist watcher and poller, ban
//! maintenance, state sweep) runs under the [`Supervisor`], which restarts
//! one that dies and holds `/readyz` unready meanwhile.
//!
//! Shutdown order (linkerd2-proxy's): stop accepting; tell sessions to
//! drain (each closes at its next quiet point); wait up to
//! `server.shutdown_grace`; then abort what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::blocklist;
use crate::config::Config;
use crate::descriptors::{self, Budget};
use crate::fleet::Fleet;
use crate::listener;
use crate::metrics::Metrics;
use crate::reload::{Live, Reloader, StartListener};
use crate::state::Core;
use crate::supervisor::{Supervisor, Task};
use crate::tls::{self, Terminator};
use crate::upstream;
use crate::workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({key}): {source}; is another process using it?")]
    Bind {
        key: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A configured certificate or key that does not load (`[tls]`).
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Upstream(#[from] upstream::ConnectorError),
    /// `[fleet]` that cannot be set up (URL, password or CA file).
    #[error("{0}")]
    Fleet(anyhow::Error),
    #[error("cannot start the session worker threads: {0}; check the process's thread limit (ulimit -u, TasksMax)")]
    Workers(std::io::Error),
}

pub struct Server {
    config: Arc<Config>,
    listeners: Vec<TcpListener>,
    admin: Option<TcpListener>,
    metrics: Arc<Metrics>,
    /// TLS termination; `None` without a certificate.
    tls: Option<Arc<Terminator>>,
    budget: Budget,
    /// The file a reload re-reads (`run -c FILE`).
    reload_from: Option<PathBuf>,
    upstreams: Arc<upstream::Connector>,
    /// The threads sessions run on.
    workers: Workers,
    /// Bans and rates shared through Redis; `None` without `[fleet]`.
    fleet: Option<Arc<Fleet>>,
}

impl Server {
    /// Binds every listener, so failures show before anything runs.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let listeners = config
            .all_listeners()
            .iter()
            .map(|l| {
                listener::bind(l.address).map_err(|source| ServerError::Bind {
                    key: config.listener_key(l.address),
                    addr: l.address,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let admin = match config.admin.listen {
            Some(addr) => Some(listener::bind(addr).map_err(|source| ServerError::Bind {
                key: "admin.listen".into(),
                addr,
                source,
            })?),
            None => None,
        };
        let upstreams = Arc::new(upstream::Connector::new(&config)?);
        let open_files = descriptors::soft_limit();
        descriptors::warn_if_short(config.server.max_connections, open_files);
        let metrics = Arc::new(Metrics::new());
        for server in config.all_upstreams().flat_map(|u| &u.servers) {
            metrics.declare_upstream(&server.to_string());
        }
        let tls = Terminator::from_settings(&config.tls, metrics.tls.clone())?.map(Arc::new);
        let fleet = Fleet::new(&config, metrics.clone()).map_err(ServerError::Fleet)?;
        let workers = Workers::per_core().map_err(ServerError::Workers)?;
        // The workers' own descriptors (their reactors, their copies of
        // the listening sockets) come out of the SMTP side's budget, not
        // the reserve the admin listener and state files live on.
        let budget = Budget::under(open_files.saturating_sub(workers.descriptors(listeners.len())));
        Ok(Server {
            fleet,
            workers,
            config: Arc::new(config),
            listeners,
            admin,
            metrics,
            tls,
            budget,
            reload_from: None,
            upstreams,
        })
    }

    /// The config file a reload (SIGHUP, `POST /admin/reload`) re-reads;
    /// without one a reload is refused and says so.
    pub fn reload_from(mut self, path: Option<PathBuf>) -> Server {
        self.reload_from = path;
        self
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
        let config = self.config;
        let core = Core::build(
            &config,
            self.metrics.clone(),
            self.tls.clone(),
            self.upstreams.clone(),
            self.fleet.as_ref(),
        )
        .await;
        let shared = core.sessions.clone();
        let tasks = Arc::new(Supervisor::new(self.metrics.registry()));
        let health = Arc::new(upstream::Health::default());
        upstream::warn_if_clients_look_local(&config.upstream);
        let stop_accepting = CancellationToken::new();
        // Ends every other background task, once the sessions are gone.
        let stop_background = CancellationToken::new();
        // A server dropped without a shutdown (a test ending) stops its
        // supervised tasks too, rather than leave them restarting accept
        // loops on workers that are gone.
        let _stop_on_drop = (
            stop_accepting.clone().drop_guard(),
            stop_background.clone().drop_guard(),
        );
        let sessions = TaskTracker::new();

        let live = Arc::new(ArcSwap::from_pointee(Live {
            config: config.clone(),
            shared: shared.clone(),
        }));
        let workers = self.workers;
        let start_listener: StartListener = {
            let (tasks, live, budget) = (tasks.clone(), live.clone(), self.budget.clone());
            let (sessions, stop_accepting) = (sessions.clone(), stop_accepting.clone());
            let workers = workers.handles().to_vec();
            Box::new(move |configured: SocketAddr, l: TcpListener| {
                // Its own token: a reload that drops the address stops
                // these loops alone; shutdown stops them all.
                let stop = stop_accepting.child_token();
                let socket = match l.into_std() {
                    Ok(socket) => Arc::new(socket),
                    Err(e) => {
                        tracing::error!(listener = %configured, error = %e, "cannot hand the listening socket to the session workers; not accepting on it");
                        return stop;
                    }
                };
                // One accept loop per worker, on the same socket.
                for worker in &workers {
                    let (live, budget, sessions, token, socket, worker) = (
                        live.clone(),
                        budget.clone(),
                        sessions.clone(),
                        stop.clone(),
                        socket.clone(),
                        worker.clone(),
                    );
                    tasks.spawn(Task::SmtpAccept, stop.clone(), move || {
                        let accept = listener::accept_loop(
                            configured,
                            socket.clone(),
                            live.clone(),
                            budget.clone(),
                            sessions.clone(),
                            token.clone(),
                        );
                        Workers::run_on(&worker, accept)
                    });
                }
                stop
            })
        };
        let mut accepting = Vec::new();
        for (settings, l) in config.all_listeners().into_iter().zip(self.listeners) {
            if let Ok(local) = l.local_addr() {
                tracing::info!(addr = %local, tls = ?settings.tls, "accepting SMTP clients");
            }
            accepting.push((settings.address, start_listener(settings.address, l)));
        }
        let reloader = Arc::new(Reloader::new(
            self.reload_from.clone(),
            live.clone(),
            accepting,
            start_listener,
            self.metrics.registry(),
        ));
        {
            let reloader = reloader.clone();
            tasks.spawn(Task::ConfigReload, stop_background.clone(), move || {
                reload_on_hangup(reloader.clone())
            });
        }
        if let Some(l) = self.admin {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "admin listener (metrics, health)");
            }
            let l = Arc::new(l);
            let app = admin::router(Arc::new(AdminState {
                config: config.clone(),
                metrics: self.metrics.clone(),
                blocklist: core.blocklist.clone(),
                registry: core.registry.clone(),
                shaping: core.shaping.clone(),
                bans: core.bans.clone(),
                tasks: tasks.clone(),
                upstream: health.clone(),
                reloader: Some(reloader.clone()),
                fleet: self.fleet.clone(),
            }));
            let stop = stop_background.clone();
            tasks.spawn(Task::Admin, stop_background.clone(), move || {
                admin::serve(l.clone(), app.clone(), stop.clone())
            });
        }

        {
            let (sources, files) = (core.sources.clone(), blocklist::file_sources(&config));
            tasks.spawn(Task::BlocklistFiles, stop_background.clone(), move || {
                blocklist::files::watch(sources.clone(), files.clone())
            });
        }
        if let Some(tls) = &self.tls {
            let certificates = tls.certificates().clone();
            tasks.spawn(
                Task::CertificateReload,
                stop_background.clone(),
                move || tls::reload::watch(certificates.clone()),
            );
        }
        if let Some(api) = config.blocklist.api.clone() {
            let sources = core.sources.clone();
            tasks.spawn(Task::BlocklistApi, stop_background.clone(), move || {
                blocklist::api::poll(sources.clone(), api.clone())
            });
        }
        {
            let (bans, state) = (core.bans.clone(), config.autoban.state.clone());
            tasks.spawn(Task::BanMaintenance, stop_background.clone(), move || {
                bans.clone().maintain(state.clone())
            });
        }
        if let Some(fleet) = &self.fleet {
            spawn_fleet(&tasks, &stop_background, fleet, &core.bans);
        }
        {
            let live = live.clone();
            let every = config.server.state_sweep;
            tasks.spawn(Task::StateSweep, stop_background.clone(), move || {
                sweep(live.clone(), every)
            });
        }

        {
            let (live, metrics) = (live.clone(), self.metrics.clone());
            let health = health.clone();
            tasks.spawn(Task::UpstreamCheck, stop_background.clone(), move || {
                let live = live.clone();
                upstream::check_loop(
                    move || live.load().shared.upstreams.clone(),
                    metrics.clone(),
                    health.clone(),
                )
            });
        }

        shutdown.await;
        let grace = live.load().config.server.shutdown_grace;
        tracing::info!(sessions = sessions.len(), grace = ?grace, "shutting down: no new clients, draining sessions");
        stop_accepting.cancel();
        shared.registry.drain_all();
        sessions.close();
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            tracing::warn!(
                sessions = sessions.len(),
                "shutdown grace ran out; closing the remaining sessions"
            );
            shared.registry.stop_all();
            let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
        }
        shared.registry.stop_all();
        stop_background.cancel();
        tasks.wait().await;
        workers.stop().await;
        // Bans made in the last moments are not lost with the process.
        core.bans.save_now(config.autoban.state.as_deref());
        tracing::info!("stopped");
    }
}

/// Reloads the config at each SIGHUP (the unit's `ExecReload`).
async fn reload_on_hangup(reloader: Arc<Reloader>) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/reload");
            // Ending would only be restarted into the same failure.
            return std::future::pending().await;
        }
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        reloader.reload().await;
    }
}

/// The fleet's four tasks, each supervised.
fn spawn_fleet(
    tasks: &Arc<Supervisor>,
    stop: &CancellationToken,
    fleet: &Arc<Fleet>,
    bans: &Arc<crate::bans::Bans>,
) {
    let (f, b) = (fleet.clone(), bans.clone());
    tasks.spawn(Task::FleetEvents, stop.clone(), move || {
        f.clone().listen(b.clone())
    });
    let (f, b) = (fleet.clone(), bans.clone());
    tasks.spawn(Task::FleetSync, stop.clone(), move || {
        f.clone().keep_in_touch(b.clone())
    });
    let (f, b) = (fleet.clone(), bans.clone());
    tasks.spawn(Task::FleetPublish, stop.clone(), move || {
        f.clone().publish(b.clone())
    });
    let rates = fleet.rates.clone();
    tasks.spawn(Task::FleetRates, stop.clone(), move || {
        rates.clone().send_takes()
    });
}

/// Evicts idle per-IP state every `every`, in the generation in force (a
/// replaced generation's tables go with its last session).
async fn sweep(live: Arc<ArcSwap<Live>>, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // On the runtime, not `spawn_blocking`: the eviction count is the
        // tables' shrinkage, which an insert racing a sweep on another
        // thread would make miscount.
        let live = live.load();
        live.shared.admission.sweep(tokio::time::Instant::now());
        live.shared.shaping.sweep();
    }
}
