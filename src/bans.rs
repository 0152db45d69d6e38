//! Automatic bans: abuse events counted per IP in a window; at a trigger's
//! count the IP is banned for `autoban.ttl`.
//!
//! Bans are a blocklist source ("autoban"), so a ban refuses new
//! connections and, with `kill_on_block`, closes open sessions. They are
//! persisted in the blocklist text format (expiry in the comment) and
//! reloaded at start with their remaining time, and exported the same way.
//! A batch of new bans is applied at most every [`APPLY_EVERY`], so a brute
//! force from many IPs rebuilds the lists a few times a second, not per ban.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use ipnet::IpNet;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::blocklist::sources::Sources;
use crate::blocklist::{parse_net, Source};
use crate::config::AutobanSettings;
use crate::metrics::Metrics;

pub const APPLY_EVERY: Duration = Duration::from_millis(200);

/// What can earn a ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanEvent {
    EarlyTalker,
    AuthFailure,
    LimitViolation,
    ProtocolError,
}

impl BanEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            BanEvent::EarlyTalker => "early_talker",
            BanEvent::AuthFailure => "auth_failures",
            BanEvent::LimitViolation => "limit_violations",
            BanEvent::ProtocolError => "protocol_errors",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ban {
    /// Unix seconds.
    pub until: u64,
    pub reason: String,
}

/// Events of one IP in the current fixed window.
#[derive(Clone, Copy, Debug)]
struct Window {
    started: Instant,
    counts: [u32; 4],
}

pub struct Bans {
    settings: AutobanSettings,
    shadow: bool,
    max_tracked: usize,
    events: DashMap<IpAddr, Window>,
    bans: Mutex<BTreeMap<IpNet, Ban>>,
    dirty: Notify,
    sources: Arc<Sources>,
    metrics: Arc<Metrics>,
}

pub fn source() -> Source {
    Source {
        name: "autoban".into(),
        allow: false,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The whole Unix second by which `ttl` from now has passed: a ban lasts
/// at least its TTL, never up to a second less.
fn unix_after(ttl: Duration) -> u64 {
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + ttl;
    at.as_secs() + u64::from(at.subsec_nanos() > 0)
}

/// Time left until the Unix second `until`.
fn time_until(until: u64) -> Duration {
    (UNIX_EPOCH + Duration::from_secs(until))
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

impl Bans {
    pub fn new(
        settings: AutobanSettings,
        shadow: bool,
        max_tracked: usize,
        sources: Arc<Sources>,
        metrics: Arc<Metrics>,
    ) -> Bans {
        sources.declare(source());
        let bans = Bans {
            settings,
            shadow,
            max_tracked,
            events: DashMap::new(),
            bans: Mutex::new(BTreeMap::new()),
            dirty: Notify::new(),
            sources,
            metrics,
        };
        bans.restore();
        bans
    }

    /// Loads the bans persisted in `autoban.state`, if any.
    fn restore(&self) {
        let Some(path) = &self.settings.state else {
            return;
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let n = self.load(&text);
                tracing::info!(bans = n, path = %path.display(), "bans restored");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read autoban.state")
            }
        }
    }

    fn threshold(&self, event: BanEvent) -> u32 {
        let s = &self.settings;
        match event {
            BanEvent::EarlyTalker => s.early_talker,
            BanEvent::AuthFailure => s.auth_failures,
            BanEvent::LimitViolation => s.limit_violations,
            BanEvent::ProtocolError => s.protocol_errors,
        }
    }

    /// Counts one event; bans `ip` when its count in the window reaches the
    /// trigger. Returns true when this event banned it.
    pub fn record(&self, ip: IpAddr, event: BanEvent) -> bool {
        let threshold = self.threshold(event);
        if threshold == 0 {
            return false;
        }
        let now = Instant::now();
        if self.events.len() >= self.max_tracked && !self.events.contains_key(&ip) {
            return false;
        }
        let count = {
            let mut w = self.events.entry(ip).or_insert(Window {
                started: now,
                counts: [0; 4],
            });
            if now.duration_since(w.started) >= self.settings.window {
                *w = Window {
                    started: now,
                    counts: [0; 4],
                };
            }
            w.counts[event as usize] += 1;
            w.counts[event as usize]
        };
        if count < threshold {
            return false;
        }
        if self.shadow {
            tracing::info!(client = %ip, trigger = event.as_str(), "shadow: would ban");
            return false;
        }
        self.events.remove(&ip);
        self.ban(IpNet::from(ip), self.settings.ttl, event.as_str());
        true
    }

    /// Bans `net` for `ttl`; applied to the lists within [`APPLY_EVERY`].
    pub fn ban(&self, net: IpNet, ttl: Duration, reason: &str) {
        let ban = Ban {
            until: unix_after(ttl.max(Duration::from_secs(1))),
            reason: reason
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(40)
                .collect(),
        };
        tracing::warn!(net = %net, reason = %ban.reason, ttl = ?ttl, "banned");
        self.bans
            .lock()
            .expect("bans lock")
            .insert(net.trunc(), ban);
        self.dirty.notify_one();
    }

    /// Lifts a ban; false when there was none.
    pub fn lift(&self, net: IpNet) -> bool {
        let lifted = self
            .bans
            .lock()
            .expect("bans lock")
            .remove(&net.trunc())
            .is_some();
        if lifted {
            tracing::info!(net = %net, "ban lifted");
            self.dirty.notify_one();
        }
        lifted
    }

    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let now = unix_now();
        self.bans
            .lock()
            .expect("bans lock")
            .iter()
            .any(|(net, ban)| ban.until > now && net.contains(&ip))
    }

    /// The bans in the blocklist text format, expiry and reason in comments.
    pub fn export(&self) -> String {
        let now = unix_now();
        let mut text = String::from(
            "# mailmoat automatic bans: IP or CIDR, then until=<unix time> reason=<trigger>\n",
        );
        for (net, ban) in self.bans.lock().expect("bans lock").iter() {
            if ban.until > now {
                let _ = writeln!(text, "{net} # until={} reason={}", ban.until, ban.reason);
            }
        }
        text
    }

    /// Loads persisted bans, keeping those not yet expired. A line without
    /// `until=` gets a full TTL (an operator's hand-written list).
    pub fn load(&self, text: &str) -> usize {
        let now = unix_now();
        let mut bans = self.bans.lock().expect("bans lock");
        for line in text.lines() {
            let (entry, comment) = line.split_once('#').unwrap_or((line, ""));
            let Ok(net) = parse_net(entry) else {
                continue;
            };
            let field = |key: &str| {
                comment
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .map(str::to_string)
            };
            let until = field("until")
                .and_then(|u| u.parse().ok())
                .unwrap_or(now + self.settings.ttl.as_secs());
            if until > now {
                let reason = field("reason").unwrap_or_else(|| "loaded".into());
                bans.insert(net, Ban { until, reason });
            }
        }
        let n = bans.len();
        drop(bans);
        // In force before the first client is accepted, not at the first
        // maintenance pass: a restart must not let a banned client in.
        self.apply(None);
        self.dirty.notify_one();
        n
    }

    /// Applies bans to the lists and persists them whenever they change,
    /// and expires them on time. Run as a task.
    pub async fn maintain(self: Arc<Self>, state: Option<PathBuf>) {
        loop {
            let next_expiry = self.apply(state.as_deref());
            let wait = next_expiry.map_or(Duration::from_secs(3600), |at| {
                time_until(at).max(Duration::from_millis(100))
            });
            tokio::select! {
                () = self.dirty.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
            tokio::time::sleep(APPLY_EVERY).await;
        }
    }

    /// Applies and persists the bans now (at shutdown).
    pub fn save_now(&self, state: Option<&std::path::Path>) {
        self.apply(state);
    }

    /// Drops expired bans, pushes the rest to the lists, writes the state
    /// file. Returns the earliest expiry left.
    fn apply(&self, state: Option<&std::path::Path>) -> Option<u64> {
        let now = unix_now();
        let (nets, next) = {
            let mut bans = self.bans.lock().expect("bans lock");
            bans.retain(|_, b| b.until > now);
            let nets: Vec<IpNet> = bans.keys().copied().collect();
            (nets, bans.values().map(|b| b.until).min())
        };
        self.metrics.active_bans.set(nets.len() as i64);
        self.sources.update(&source(), nets, &[]);
        if let Some(path) = state {
            if let Err(e) = crate::blocklist::api::persist(path, &self.export()) {
                tracing::warn!(path = %path.display(), error = %e, "cannot persist bans (autoban.state)");
            }
        }
        next
    }

    /// Forgets event windows that have ended.
    pub fn sweep(&self) {
        let now = Instant::now();
        let window = self.settings.window;
        self.events
            .retain(|_, w| now.duration_since(w.started) < window);
    }
}
