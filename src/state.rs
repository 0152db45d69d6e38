//! The state the parts of the process share, built in one place.
//!
//! [`Core::build`] makes the live lists, their sources, bans, shaping,
//! admission and the session registry once; the server then hands each part
//! what it needs: sessions get [`Core::sessions`], the admin listener gets
//! its own explicit view (`admin::AdminState`), background tasks get the
//! pieces they maintain.

use std::sync::Arc;

use crate::admission::Admission;
use crate::bans::Bans;
use crate::blocklist::sources::{SourceMetrics, Sources};
use crate::blocklist::{self, Blocklist, Lists};
use crate::config::Config;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::session::registry::Registry;
use crate::session::{CloseReason, Shared};
use crate::shaping::Shaping;
use crate::tls::Terminator;

pub struct Core {
    pub metrics: Arc<Metrics>,
    /// The live lists every admission reads.
    pub blocklist: Arc<Blocklist>,
    /// Every source's last good version; rebuilds `blocklist`.
    pub sources: Arc<Sources>,
    pub bans: Arc<Bans>,
    pub shaping: Arc<Shaping>,
    pub admission: Arc<Admission>,
    /// Open sessions by client, for kill-on-block and `/admin/top`.
    pub registry: Arc<Registry>,
    /// What each session is handed.
    pub sessions: Arc<Shared>,
}

impl Core {
    /// Builds the shared state and loads the lists (files, API cache,
    /// persisted bans) before the first client is accepted. `tls` and
    /// `upstreams` were built by `Server::bind`, where a certificate or CA
    /// file that fails to load stops the start.
    pub async fn build(
        config: &Arc<Config>,
        metrics: Arc<Metrics>,
        tls: Option<Arc<Terminator>>,
        upstreams: Arc<crate::upstream::Connector>,
        fleet: Option<&Arc<Fleet>>,
    ) -> Core {
        let live_lists = Arc::new(Blocklist::default());
        let registry = Arc::new(Registry::default());
        let sources = Arc::new(
            Sources::new(
                live_lists.clone(),
                SourceMetrics::register(metrics.registry()),
                kill_on_block(config, registry.clone()),
            )
            .with_max_entries(config.blocklist.max_entries_per_source),
        );
        {
            let (config, sources) = (config.clone(), sources.clone());
            let _ =
                tokio::task::spawn_blocking(move || blocklist::load_all(&config, &sources)).await;
        }
        let bans = Arc::new(Bans::new(
            config.autoban.clone(),
            config.server.shadow,
            config.server.max_tracked_ips,
            sources.clone(),
            metrics.clone(),
        ));
        if let Some(fleet) = fleet {
            bans.announce_to(fleet.changes(), fleet.resync_handle());
        }
        let shared_rates = fleet.map(|f| f.rates.clone());
        let shaping = Arc::new(
            Shaping::new(config, bans.clone(), metrics.clone()).with_fleet(shared_rates.clone()),
        );
        let admission = Arc::new(
            Admission::new(config, live_lists.clone(), metrics.clone()).with_fleet(shared_rates),
        );
        let sessions = Arc::new(Shared {
            metrics: metrics.clone(),
            admission: admission.clone(),
            shaping: shaping.clone(),
            blocklist: live_lists.clone(),
            registry: registry.clone(),
            tarpit_slots: Arc::new(tokio::sync::Semaphore::new(config.blocklist.tarpit_max)),
            tls,
            upstreams,
        });
        Core {
            metrics,
            blocklist: live_lists,
            sources,
            bans,
            shaping,
            admission,
            registry,
            sessions,
        }
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
