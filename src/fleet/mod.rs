//! The fleet: bans and per-IP rate counters shared through Redis (or
//! Valkey), while every node keeps enforcing from its own state.
//!
//! Nothing on a client's path waits for Redis. A ban made here is applied
//! locally first and then written to the store and announced; a ban from
//! another node arrives by pub/sub and is applied like a local one. A
//! shared rate is decided from local state (this node's full bucket, and
//! what the store last said about the client) and the take is sent to the
//! store's GCRA script in the background (`rates.rs`). When the store is
//! slow or gone the breaker (`breaker.rs`) opens and each node enforces its
//! share of every shared rate and the bans it has (persisted, as ever).
//!
//! Four supervised tasks: `fleet_events` (the subscription), `fleet_sync`
//! (heartbeat, fleet view, reconciliation), `fleet_publish` (this node's
//! ban changes), `fleet_rates` (shared-rate takes).

pub mod breaker;
pub mod rates;
pub mod store;
pub mod sync;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, Mutex, Notify};
use tokio::time::Instant;

use crate::bans::{BanChange, Bans};
use crate::config::{Config, FleetSettings};
use crate::metrics::{Metrics, StoreOp};
pub use rates::{FleetVerdict, SharedRates};
use store::{Store, StoreError};

/// Ban changes waiting to be written; beyond, the next reconciliation
/// writes them.
const CHANGES_QUEUE: usize = 4096;

/// The most nodes the fleet view keeps.
const MAX_NODES: usize = 1000;

pub struct Fleet {
    pub node: Arc<str>,
    settings: FleetSettings,
    store: Arc<Store>,
    pub rates: Arc<SharedRates>,
    changes_tx: mpsc::Sender<BanChange>,
    changes: Arc<Mutex<mpsc::Receiver<BanChange>>>,
    /// Asks `fleet_sync` for a full reconciliation now.
    resync: Arc<Notify>,
    nodes: ArcSwap<Nodes>,
}

/// Every node as the last heartbeat saw them.
#[derive(Default)]
struct Nodes {
    seen: Vec<(String, u64, u64)>,
    at: Option<Instant>,
}

/// `/admin/fleet`.
#[derive(Clone, Debug, Serialize)]
pub struct View {
    pub node: String,
    pub store: &'static str,
    pub live_nodes: usize,
    /// The fleet size local shares are cut for while the store is down.
    pub share_of: u32,
    pub nodes: Vec<NodeView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    pub name: String,
    pub last_heard_ms_ago: u64,
    pub bans: u64,
    pub live: bool,
}

impl Fleet {
    /// The fleet of `config`, if it has `[fleet]`; no connection is made
    /// yet. Fails on a bad URL or an unreadable password or CA file.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Option<Arc<Fleet>>> {
        let Some(settings) = config.fleet.clone() else {
            return Ok(None);
        };
        let store = Arc::new(Store::new(&settings, metrics.clone())?);
        let rates = Arc::new(SharedRates::new(config, store.clone(), metrics));
        let (changes_tx, changes) = mpsc::channel(CHANGES_QUEUE);
        Ok(Some(Arc::new(Fleet {
            node: settings.node.as_str().into(),
            settings,
            store,
            rates,
            changes_tx,
            changes: Arc::new(Mutex::new(changes)),
            resync: Arc::new(Notify::new()),
            nodes: ArcSwap::from_pointee(Nodes::default()),
        })))
    }

    /// Where `Bans` sends this node's changes.
    pub fn changes(&self) -> mpsc::Sender<BanChange> {
        self.changes_tx.clone()
    }

    /// What asks for a full reconciliation now.
    pub fn resync_handle(&self) -> Arc<Notify> {
        self.resync.clone()
    }

    fn live_window(&self) -> Duration {
        (self.settings.heartbeat * 3).max(Duration::from_secs(3))
    }

    /// Listens to the other nodes' changes. Each (re)subscription asks for
    /// a reconciliation, for what was missed while not listening. Run as a
    /// task.
    pub async fn listen(self: Arc<Self>, bans: Arc<Bans>) {
        loop {
            // Counted, but the data connection and the breaker are the
            // data path's: a subscription failing is no reason to drop them.
            let error = self.subscription(&bans).await;
            self.store.metrics.fleet.store_error(StoreOp::Subscribe);
            tracing::warn!(error = %error, "fleet events: subscription lost; other nodes' bans wait for the next reconciliation until it is back");
            let wait = self.store.breaker.wait(Instant::now());
            let pace = self.settings.heartbeat.min(Duration::from_secs(1));
            tokio::time::sleep(wait.max(pace)).await;
        }
    }

    /// One subscription, until it fails. It is pinged every heartbeat, so
    /// a connection that died without a word (a dropped NAT entry, a paused
    /// store) is noticed within a heartbeat and a timeout.
    async fn subscription(&self, bans: &Bans) -> StoreError {
        let deadline = self.settings.connect_timeout + self.settings.timeout;
        let subscribe = async {
            let mut pubsub = self.store.client().get_async_pubsub().await?;
            pubsub.subscribe(&self.store.keys.events).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = match tokio::time::timeout(deadline, subscribe).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(e)) => return e.into(),
            Err(_) => return StoreError::TimedOut(deadline),
        };
        self.resync.notify_one();
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(self.settings.heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        return StoreError::Closed;
                    };
                    let Ok(text) = std::str::from_utf8(message.get_payload_bytes()) else {
                        continue;
                    };
                    match sync::Event::parse(text) {
                        Some(event) => sync::apply_event(bans, &self.store, &self.node, event),
                        None => tracing::debug!(message = text, "ignored a message on the fleet channel"),
                    }
                }
                _ = ping.tick() => {
                    let pong = sink.ping::<redis::Value>();
                    match tokio::time::timeout(self.settings.timeout, pong).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e.into(),
                        Err(_) => return StoreError::TimedOut(self.settings.timeout),
                    }
                }
            }
        }
    }

    /// Writes this node's ban changes. Run as a task.
    pub async fn publish(self: Arc<Self>, bans: Arc<Bans>) {
        sync::publish(
            self.store.clone(),
            bans,
            self.node.clone(),
            self.changes.clone(),
            self.resync.clone(),
        )
        .await;
    }

    /// Heartbeats, learns the fleet, reconciles the bans when asked, on
    /// every return of the store and every `fleet.resync`. Run as a task.
    pub async fn keep_in_touch(self: Arc<Self>, bans: Arc<Bans>) {
        let mut wanted = true;
        let mut last = Instant::now();
        // A reconciliation that keeps failing is retried less and less
        // often (a heartbeat, doubling up to `fleet.resync`), never in a
        // loop.
        let mut failures = 0u32;
        let mut next_try = Instant::now();
        loop {
            // At most one reconciliation per heartbeat, however often one
            // is asked for (a storm of bans overflowing the queue).
            let due = ((wanted && last.elapsed() >= self.settings.heartbeat)
                || last.elapsed() >= self.settings.resync)
                && Instant::now() >= next_try;
            // The heartbeat goes through the breaker like every operation:
            // while it is open this costs nothing, and after the cooldown
            // it is the trial.
            if self.heartbeat(&bans).await.is_ok() && due {
                match sync::reconcile(&self.store, &bans, &self.node).await {
                    Ok(()) => {
                        wanted = false;
                        failures = 0;
                        last = Instant::now();
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let backoff = self
                            .settings
                            .heartbeat
                            .saturating_mul(1 << failures.min(10))
                            .min(self.settings.resync);
                        next_try = Instant::now() + backoff;
                        wanted = true;
                        tracing::warn!(error = %e, failures, retry_in = ?backoff, "fleet reconciliation failed");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.heartbeat) => {}
                () = self.resync.notified() => wanted = true,
                () = self.store.came_back.notified() => wanted = true,
            }
        }
    }

    async fn heartbeat(&self, bans: &Bans) -> Result<(), StoreError> {
        let cmd = self
            .store
            .scripts
            .heartbeat
            .call(&[&self.store.keys.nodes])
            .arg(&*self.node)
            .arg(bans.count())
            .arg(MAX_NODES)
            .to_owned();
        let reply: Vec<Vec<u8>> = self
            .store
            .run(StoreOp::Heartbeat, |mut c| async move {
                cmd.query_async(&mut c).await
            })
            .await?;
        let mut fields = reply
            .into_iter()
            .map(|field| String::from_utf8_lossy(&field).into_owned());
        let now_ms: u64 = fields.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        if now_ms > 0 {
            let offset = i128::from(now_ms) - i128::from(crate::bans::unix_now_ms());
            let offset = i64::try_from(offset).unwrap_or(0);
            if offset.abs() > 1000 {
                tracing::warn!(offset_ms = offset, "this host's clock is off the fleet store's by over a second: ban expiries are Unix times; keep every node on NTP");
            }
            bans.set_clock_offset(offset);
        }
        let mut seen = Vec::new();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            if seen.len() >= MAX_NODES {
                break;
            }
            let mut parts = value.split(' ');
            let heard: u64 = parts.next().and_then(|h| h.parse().ok()).unwrap_or(0);
            let count: u64 = parts.next().and_then(|b| b.parse().ok()).unwrap_or(0);
            seen.push((
                crate::bans::clean_node(&name).to_string(),
                now_ms.saturating_sub(heard),
                count,
            ));
        }
        seen.sort();
        let window = u64::try_from(self.live_window().as_millis()).unwrap_or(u64::MAX);
        let live = seen.iter().filter(|(_, ago, _)| *ago <= window).count();
        self.store.metrics.fleet.live_nodes.set(live as i64);
        if self.settings.nodes == 0 && live > 0 {
            self.rates
                .set_nodes(u32::try_from(live).unwrap_or(u32::MAX));
        }
        self.nodes.store(Arc::new(Nodes {
            seen,
            at: Some(Instant::now()),
        }));
        Ok(())
    }

    /// What `/admin/fleet` shows: this node, the store's state, every node
    /// the last heartbeat saw.
    pub fn view(&self) -> View {
        let nodes = self.nodes.load();
        let since = nodes.at.map_or(0, |at| {
            u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)
        });
        let window = u64::try_from(self.live_window().as_millis()).unwrap_or(u64::MAX);
        let nodes: Vec<NodeView> = nodes
            .seen
            .iter()
            .map(|(name, ago, bans)| {
                let ago = ago.saturating_add(since);
                NodeView {
                    name: name.clone(),
                    last_heard_ms_ago: ago,
                    bans: *bans,
                    live: ago <= window,
                }
            })
            .collect();
        View {
            node: self.node.to_string(),
            store: if self.store.breaker.is_up() {
                "up"
            } else {
                "down"
            },
            live_nodes: nodes.iter().filter(|n| n.live).count(),
            share_of: self.rates.nodes(),
            nodes,
        }
    }
}
