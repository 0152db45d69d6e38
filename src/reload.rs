//! Reloading the config while running (SIGHUP, the unit's `ExecReload`,
//! `POST /admin/reload`, `mailmoat reload`).
//!
//! A reload re-reads and validates the whole file. On any error the running
//! config stays, and every error is logged and answered. On success the new
//! [`Live`] generation is swapped in whole: each accept loads the current
//! one, so new sessions use the new config while open sessions keep the
//! generation they started with (their config and their limit tables) to
//! the end. State whose key still means the same thing is carried over
//! (`Admission::reconfigured`, `Shaping::reconfigured`); listener changes
//! (`server.listen`, `[[listener]]`) are bound before anything is swapped.
//!
//! What needs a restart ([`effective`] lists it) is kept at its running value and
//! the log says which changed key waits for one.

use std::hash::Hasher;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TlsMode};
use crate::listener;
use crate::session::Shared;

/// The config and the state built from it that a session is handed at
/// accept, and keeps.
pub struct Live {
    pub config: Arc<Config>,
    pub shared: Arc<Shared>,
}

/// Starts an accept loop for the listener configured at an address (its
/// settings are looked up there at each accept) on a bound socket; the
/// token stops it.
pub type StartListener = Box<dyn Fn(SocketAddr, TcpListener) -> CancellationToken + Send + Sync>;

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The new config is in force.
    pub ok: bool,
    /// The hash of the config in force after this reload.
    pub hash: String,
    /// Why the reload was refused (the running config stays).
    pub errors: Vec<String>,
    /// Changed keys that wait for a restart.
    pub restart_needed: Vec<String>,
}

pub struct Reloader {
    path: Option<PathBuf>,
    live: Arc<ArcSwap<Live>>,
    /// The accept loops by configured address (as written: `:0` stays `:0`).
    listeners: Mutex<Vec<(SocketAddr, CancellationToken)>>,
    start: StartListener,
    metrics: ReloadMetrics,
    /// One reload at a time: two would race on the listeners.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        live: Arc<ArcSwap<Live>>,
        listeners: Vec<(SocketAddr, CancellationToken)>,
        start: StartListener,
        registry: &Registry,
    ) -> Reloader {
        let metrics = ReloadMetrics::register(registry);
        metrics.loaded(&hash(&live.load().config));
        Reloader {
            path,
            live,
            listeners: Mutex::new(listeners),
            start,
            metrics,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Re-reads the config file and, if it is valid and its listeners
    /// bind, puts it in force for new sessions.
    pub async fn reload(&self) -> Outcome {
        let _one = self.running.lock().await;
        let running = self.live.load_full();
        let outcome = match self.try_reload(&running).await {
            Ok(restart_needed) => {
                let hash = hash(&self.live.load().config);
                self.metrics.loaded(&hash);
                self.metrics.result("ok");
                tracing::info!(
                    hash = hash.as_str(),
                    "config reloaded: new sessions use it, open sessions finish under the old one"
                );
                for key in &restart_needed {
                    tracing::warn!(
                        key = key.as_str(),
                        "config reload: this change takes effect at the next restart; the running value is kept"
                    );
                }
                Outcome {
                    ok: true,
                    hash,
                    errors: Vec::new(),
                    restart_needed,
                }
            }
            Err(errors) => {
                self.metrics.result("error");
                for error in &errors {
                    tracing::error!(
                        error = error.as_str(),
                        "config reload refused; the running config stays"
                    );
                }
                Outcome {
                    ok: false,
                    hash: hash(&running.config),
                    errors,
                    restart_needed: Vec::new(),
                }
            }
        };
        outcome
    }

    async fn try_reload(&self, running: &Live) -> Result<Vec<String>, Vec<String>> {
        let Some(path) = self.path.clone() else {
            return Err(vec![
                "started without -c FILE: there is no config file to re-read; restart with -c"
                    .to_string(),
            ]);
        };
        // Loading resolves upstream host names: blocking.
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| vec![format!("config load failed: {e}")])?;
        let loaded = loaded.map_err(|e| {
            e.to_string()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })?;
        let (config, restart_needed) = effective(&running.config, loaded);
        let uncertified = terminating_without_certificate(&config);
        if !uncertified.is_empty() {
            return Err(uncertified);
        }

        // Bind what is new before anything changes: a port in use refuses
        // the whole reload.
        let open: Vec<SocketAddr> = lock(&self.listeners).iter().map(|(a, _)| *a).collect();
        let mut bound = Vec::new();
        let mut errors = Vec::new();
        let listen: Vec<SocketAddr> = config.all_listeners().iter().map(|l| l.address).collect();
        for &addr in listen.iter().filter(|a| !open.contains(a)) {
            match listener::bind(addr) {
                Ok(l) => bound.push((addr, l)),
                Err(e) => errors.push(format!(
                    "cannot listen on {addr} ({}): {e}; is another process using it?",
                    config.listener_key(addr)
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let upstreams = crate::upstream::Connector::new(&config).map_err(|e| {
            e.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        })?;
        let shared = &running.shared;
        let next = Shared {
            metrics: shared.metrics.clone(),
            admission: Arc::new(shared.admission.reconfigured(&config)),
            shaping: Arc::new(shared.shaping.reconfigured(&config)),
            blocklist: shared.blocklist.clone(),
            tarpit_slots: shared.tarpit_slots.clone(),
            registry: shared.registry.clone(),
            tls: shared.tls.clone(),
            upstreams: Arc::new(upstreams),
        };
        for server in config.all_upstreams().flat_map(|u| &u.servers) {
            shared.metrics.declare_upstream(&server.to_string());
        }
        // With the new generation: the shared rates take its limits.
        if let Some(rates) = next.shaping.fleet() {
            rates.reshape(&config);
        }
        self.live.store(Arc::new(Live {
            config: Arc::new(config),
            shared: Arc::new(next),
        }));

        let mut listeners = lock(&self.listeners);
        listeners.retain(|(addr, stop)| {
            let keep = listen.contains(addr);
            if !keep {
                tracing::info!(%addr, "config reload: no longer accepting here");
                stop.cancel();
            }
            keep
        });
        for (addr, l) in bound {
            if let Ok(local) = l.local_addr() {
                tracing::info!(addr = %local, "config reload: accepting SMTP clients");
            }
            listeners.push((addr, (self.start)(addr, l)));
        }
        Ok(restart_needed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `loaded` with every restart-only key at its running value, and the
/// restart-only keys that differ. These keys are wired into long-lived
/// state (the ban table, the list sources and their watchers, the admin
/// listener, the logger, the open sessions' prefix counts, the fleet).
fn effective(running: &Config, mut loaded: Config) -> (Config, Vec<String>) {
    let mut changed = Vec::new();
    let (r, l) = (running, &mut loaded);
    keep_running(
        &mut changed,
        "server.shadow",
        &r.server.shadow,
        &mut l.server.shadow,
    );
    keep_running(
        &mut changed,
        "server.max_tracked_ips",
        &r.server.max_tracked_ips,
        &mut l.server.max_tracked_ips,
    );
    keep_running(
        &mut changed,
        "server.state_sweep",
        &r.server.state_sweep,
        &mut l.server.state_sweep,
    );
    // Sessions open at the reload are counted under their old prefix keys:
    // new lengths would start new keys at zero and let a network past its
    // cap until those sessions end.
    keep_running(
        &mut changed,
        "limits.ipv4_prefix",
        &r.limits.ipv4_prefix,
        &mut l.limits.ipv4_prefix,
    );
    keep_running(
        &mut changed,
        "limits.ipv6_prefix",
        &r.limits.ipv6_prefix,
        &mut l.limits.ipv6_prefix,
    );
    // The certificate files' contents reload on their own; which files,
    // and the handshake limits, are wired into the TLS acceptor at start.
    keep_running(&mut changed, "tls", &r.tls, &mut l.tls);
    keep_running(&mut changed, "blocklist", &r.blocklist, &mut l.blocklist);
    keep_running(&mut changed, "autoban", &r.autoban, &mut l.autoban);
    keep_running(&mut changed, "admin", &r.admin, &mut l.admin);
    keep_running(&mut changed, "log", &r.log, &mut l.log);
    // The store connection, the node's name and the ban and rate tasks
    // are built once at start.
    keep_running(&mut changed, "fleet", &r.fleet, &mut l.fleet);
    (loaded, changed)
}

/// A listener that would terminate TLS without a certificate: possible
/// after [`effective`] keeps a running `[tls]` that has none.
fn terminating_without_certificate(config: &Config) -> Vec<String> {
    if config.tls.certificate.is_some() && config.tls.key.is_some() {
        return Vec::new();
    }
    config
        .all_listeners()
        .iter()
        .filter(|l| matches!(l.tls, TlsMode::Starttls | TlsMode::Implicit))
        .map(|l| {
            format!(
                "{} = \"{}\" terminates TLS, and the running config has no tls.certificate: \
                 [tls] changes take effect at a restart, so restart mailmoat to add it",
                config.listener_key(l.address),
                l.address
            )
        })
        .collect()
}

/// Puts the running value of a restart-only `key` back, noting it in
/// `changed` when the file asked for another.
fn keep_running<T: Serialize + Clone>(
    changed: &mut Vec<String>,
    key: &str,
    running: &T,
    loaded: &mut T,
) {
    if differs(running, loaded) {
        changed.push(key.to_string());
        *loaded = running.clone();
    }
}

fn differs<T: Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

/// A short, stable hash of the effective config (as `check-config` prints
/// it), for telling which config a process runs.
pub fn hash(config: &Config) -> String {
    let mut h = rustc_hash::FxHasher::default();
    h.write(config.to_toml().as_bytes());
    format!("{:016x}", h.finish())
}

struct ReloadMetrics {
    info: IntGaugeVec,
    loaded_at: Gauge,
    reloads: IntCounterVec,
    last_ok: IntGauge,
    current: Mutex<Option<String>>,
}

impl ReloadMetrics {
    fn register(registry: &Registry) -> ReloadMetrics {
        let info = IntGaugeVec::new(
            Opts::new(
                "mailmoat_config_info",
                "The config in force: 1 for its hash (of the effective config)",
            ),
            &["hash"],
        )
        .expect("valid metric");
        let loaded_at = Gauge::new(
            "mailmoat_config_last_reload_timestamp_seconds",
            "When the config in force was loaded (Unix time)",
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "mailmoat_config_reloads_total",
                "Config reloads, by result (error: the running config stayed)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let last_ok = IntGauge::new(
            "mailmoat_config_last_reload_success",
            "1 if the last reload succeeded (or none was tried), 0 if it was refused",
        )
        .expect("valid metric");
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        last_ok.set(1);
        for m in [
            Box::new(info.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(loaded_at.clone()),
            Box::new(reloads.clone()),
            Box::new(last_ok.clone()),
        ] {
            // Registered once per process; a second Server in the same
            // process (tests) keeps the first's.
            let _ = registry.register(m);
        }
        ReloadMetrics {
            info,
            loaded_at,
            reloads,
            last_ok,
            current: Mutex::new(None),
        }
    }

    fn loaded(&self, hash: &str) {
        let mut current = lock(&self.current);
        if let Some(old) = current.take() {
            let _ = self.info.remove_label_values(&[&old]);
        }
        self.info.with_label_values(&[hash]).set(1);
        *current = Some(hash.to_string());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.loaded_at.set(now);
    }

    fn result(&self, result: &'static str) {
        self.reloads.with_label_values(&[result]).inc();
        self.last_ok.set(i64::from(result == "ok"));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn reload_keeps_restart_only_keys_at_their_running_value_and_names_them() {
        let running = config("[server]\nshadow = false\n");
        let loaded = config(
            "[server]\nshadow = true\nhostname = \"mx.example\"\n[log]\nlevel = \"debug\"\n\
             [limits]\nmessage_rate = \"1/hour\"\n",
        );
        let (effective, restart) = effective(&running, loaded);
        assert_eq!(restart, ["server.shadow", "log"]);
        assert!(!effective.server.shadow);
        assert_eq!(effective.log.level, running.log.level);
        assert_eq!(effective.server.hostname, "mx.example");
        assert_eq!(effective.limits.message_rate.amount, 1);
        assert_ne!(hash(&effective), hash(&running));
    }

    #[test]
    fn tls_waits_for_a_restart_so_a_reload_cannot_add_a_listener_that_terminates_without_it() {
        let running = config("");
        let loaded = config(
            "[[listener]]\naddress = \"127.0.0.1:2600\"\ntls = \"starttls\"\n\
             [tls]\ncertificate = \"c.pem\"\nkey = \"k.pem\"\n\
             [upstreams.submission]\nservers = [\"192.0.2.1:10587\"]\n",
        );
        let (effective, restart) = effective(&running, loaded);
        assert_eq!(restart, ["tls"]);
        assert_eq!(effective.tls.certificate, None);
        // Listeners and named upstreams are taken from the file.
        assert_eq!(effective.listeners.len(), 1);
        assert!(effective.upstreams.contains_key("submission"));
        assert_eq!(
            terminating_without_certificate(&effective),
            [
                "listener[1].address = \"127.0.0.1:2600\" terminates TLS, and the running config \
              has no tls.certificate: [tls] changes take effect at a restart, so restart \
              mailmoat to add it"
            ]
        );
        assert!(terminating_without_certificate(&running).is_empty());
    }

    #[test]
    fn fleet_waits_for_a_restart_whether_added_changed_or_removed() {
        let none = config("");
        let fleet = |url: &str| config(&format!("[fleet]\nurl = \"{url}\"\nnode = \"a\"\n"));
        let one = fleet("redis://127.0.0.1:6379/0");
        let other = fleet("redis://127.0.0.1:6379/1");
        for (running, loaded) in [(&none, &one), (&one, &other), (&one, &none)] {
            let (effective, restart) = effective(running, loaded.clone());
            assert_eq!(restart, ["fleet"]);
            assert_eq!(
                effective.fleet.as_ref().map(|f| &f.url),
                running.fleet.as_ref().map(|f| &f.url)
            );
        }
        let (_, restart) = effective(&one, one.clone());
        assert!(restart.is_empty(), "{restart:?}");
    }
}
