//! Automatic bans: abuse events counted per IP in a window; at a trigger's
//! count the IP is banned for `autoban.ttl`.
//!
//! Bans are a blocklist source ("autoban"), so a ban refuses new
//! connections and, with `kill_on_block`, closes open sessions. They are
//! persisted in the blocklist text format (expiry in the comment) and
//! reloaded at start with their remaining time, and exported the same way.
//! A batch of new bans is applied at most every [`APPLY_EVERY`], so a brute
//! force from many IPs rebuilds the lists a few times a second, not per ban;
//! the rebuild and the save run on the blocking pool, never on a worker
//! that serves sockets.
//!
//! Durability: an automatic ban reaches `autoban.state` with its batch,
//! within [`APPLY_EVERY`] plus the time of one rebuild and write. A manual change through the
//! admin API is written before it is acknowledged ([`Bans::save`]); every
//! write is temp file, fsync, rename, fsync of the directory.
//!
//! Bounds: a ban lasts at most `autoban.max_ttl` (a longer request is
//! refused, a longer expiry in the state file is cut to it), covers no
//! prefix wider than `autoban.min_prefix_v4`/`_v6`, and at most
//! `autoban.max_bans` are kept (a new one evicts the ban soonest to
//! expire). Every expiry is computed with saturating arithmetic, so no
//! value from a request, the config or the state file can overflow a
//! timer.
//!
//! A state file that cannot be fully read (a line not UTF-8, not an IP or
//! CIDR, too wide, a bad `until=`) is never silently overwritten: its bad
//! lines are reported, the good ones loaded, and the file as it was is
//! renamed `<state>.bad-<unix time>` before the good bans are saved in its
//! place. If it cannot be moved aside, nothing is ever written over it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use ipnet::IpNet;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::blocklist::sources::Sources;
use crate::blocklist::{parse_net, Source};
use crate::config::AutobanSettings;
use crate::metrics::Metrics;

pub const APPLY_EVERY: Duration = Duration::from_millis(200);

/// Longest sleep of the maintenance task when no ban is due to expire.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// Largest state file read: `max_bans` lines are far smaller; anything
/// bigger is not a file mailmoat wrote.
const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

/// Bad state-file lines logged one by one; the rest are only counted.
const MAX_REPORTED_LINES: usize = 10;

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
    /// Shared, so a snapshot of every ban is cheap to take under the lock.
    pub reason: Arc<str>,
    /// When the ban was made (Unix milliseconds; 0 when unknown): a lift
    /// made later wins over it, one made earlier does not.
    pub since_ms: u64,
    /// The fleet node that made it; `None`: this node.
    pub origin: Option<Arc<str>>,
}

/// The bans in force and the lifts remembered (Unix ms).
pub type FleetSnapshot = (Vec<(IpNet, Ban)>, Vec<(IpNet, u64)>);

/// A change to the bans, as the fleet hears of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BanChange {
    Banned { net: IpNet, ban: Ban },
    Lifted { net: IpNet, at_ms: u64 },
}

/// Why a ban was refused; the text names the config key to change.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    #[error("{net} is wider than /{min} ({key}): refusing to ban that many addresses; ban a narrower prefix, list it in a blocklist file, or lower {key}")]
    TooWide {
        net: IpNet,
        key: &'static str,
        min: u8,
    },
    #[error("a ban of {ttl} is longer than autoban.max_ttl ({max}); ask for a shorter one or raise autoban.max_ttl")]
    TooLong { ttl: String, max: String },
}

/// What a ban request changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Banned {
    New,
    /// Already banned; now until the later expiry.
    Extended,
    /// Already banned at least that long.
    Unchanged,
}

/// Where an acknowledged change is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Saved {
    OnDisk,
    /// No `autoban.state`: in memory only, lost at restart.
    NotConfigured,
}

/// Events of one IP in the current fixed window.
#[derive(Clone, Copy, Debug)]
struct Window {
    started: Instant,
    counts: [u32; 4],
}

/// The bans, by network and by expiry (so expiring, finding the next
/// expiry and evicting the soonest are logarithmic, not a scan).
#[derive(Default)]
struct Table {
    by_net: BTreeMap<IpNet, Ban>,
    by_expiry: BTreeSet<(u64, IpNet)>,
    /// Recent lifts (fleet-clock milliseconds), so a fleet node that
    /// missed one does not bring the ban back; as bounded as the bans, and
    /// forgotten after `autoban.max_ttl` (no ban they could undo is left).
    lifts: BTreeMap<IpNet, u64>,
    lifts_by_at: BTreeSet<(u64, IpNet)>,
    /// Bumped by every change; compared with what is on disk.
    changes: u64,
    /// Bumped when the set of networks changes; compared with the lists.
    net_changes: u64,
}

impl Table {
    /// Adds or extends a ban; at `cap`, evicts the bans soonest to expire.
    /// Returns what changed and how many were evicted.
    fn insert(&mut self, net: IpNet, ban: Ban, cap: usize, now: u64) -> (Banned, usize) {
        if let Some(old) = self.by_net.get_mut(&net) {
            if old.until > now {
                // The newer ban's stamp and maker stand, so a lift made
                // between the two cannot undo the second.
                if ban.since_ms > old.since_ms {
                    old.since_ms = ban.since_ms;
                    old.origin = ban.origin;
                    old.reason = ban.reason;
                    self.changes += 1;
                }
                if ban.until <= old.until {
                    return (Banned::Unchanged, 0);
                }
                self.by_expiry.remove(&(old.until, net));
                old.until = ban.until;
                self.by_expiry.insert((ban.until, net));
                self.changes += 1;
                return (Banned::Extended, 0);
            }
            self.remove(net);
        }
        let mut evicted = 0;
        while self.by_net.len() >= cap {
            let Some(&(_, soonest)) = self.by_expiry.first() else {
                break;
            };
            self.remove(soonest);
            evicted += 1;
        }
        self.by_expiry.insert((ban.until, net));
        self.by_net.insert(net, ban);
        self.changes += 1;
        self.net_changes += 1;
        (Banned::New, evicted)
    }

    fn remove(&mut self, net: IpNet) -> Option<Ban> {
        let ban = self.by_net.remove(&net)?;
        self.by_expiry.remove(&(ban.until, net));
        self.changes += 1;
        self.net_changes += 1;
        Some(ban)
    }

    /// Drops the bans expired at `now` (Unix s) and the lifts made before
    /// `lifts_before` (ms).
    fn expire(&mut self, now: u64, lifts_before: u64) {
        while let Some(&(until, net)) = self.by_expiry.first() {
            if until > now {
                break;
            }
            self.remove(net);
        }
        while let Some(&(at, net)) = self.lifts_by_at.first() {
            if at >= lifts_before {
                break;
            }
            self.lifts_by_at.remove(&(at, net));
            self.lifts.remove(&net);
            self.changes += 1;
        }
    }

    /// Remembers that `net` was lifted at `at_ms`, keeping at most `cap`
    /// lifts (the oldest go first).
    fn remember_lift(&mut self, net: IpNet, at_ms: u64, cap: usize) -> bool {
        if let Some(old) = self.lifts.get(&net).copied() {
            if old >= at_ms {
                return false;
            }
            self.lifts_by_at.remove(&(old, net));
        } else if self.lifts.len() >= cap.max(1)
            && self
                .lifts_by_at
                .first()
                .is_some_and(|(oldest, _)| at_ms <= *oldest)
        {
            // Full, and older than every lift kept: it would go first.
            return false;
        }
        self.lifts.insert(net, at_ms);
        self.lifts_by_at.insert((at_ms, net));
        while self.lifts.len() > cap.max(1) {
            let Some((_, oldest)) = self.lifts_by_at.pop_first() else {
                break;
            };
            self.lifts.remove(&oldest);
        }
        self.changes += 1;
        true
    }

    /// True when a lift of `net` came after `ban` was made.
    fn lifted_after(&self, net: IpNet, ban: &Ban) -> bool {
        self.lifts.get(&net).is_some_and(|at| *at >= ban.since_ms)
    }

    fn next_expiry(&self) -> Option<u64> {
        self.by_expiry.first().map(|&(until, _)| until)
    }

    /// The lifts remembered, as (network, Unix ms).
    fn lifts(&self) -> Vec<(IpNet, u64)> {
        self.lifts.iter().map(|(net, at)| (*net, *at)).collect()
    }

    /// The bans in force, copied cheaply so they are formatted after the
    /// lock is released.
    fn snapshot(&self, now: u64) -> Vec<(IpNet, Ban)> {
        self.by_net
            .iter()
            .filter(|(_, ban)| ban.until > now)
            .map(|(net, ban)| (*net, ban.clone()))
            .collect()
    }
}

/// How far ahead of the fleet's clock a lift may be stamped: a lift from a
/// host whose clock is far ahead would otherwise forbid banning that
/// network anywhere, with no end.
const MAX_LIFT_AHEAD_MS: u64 = 5 * 60 * 1000;

/// A remembered lift, as a comment line of the state file (a blocklist
/// reading the file skips it).
const LIFTED: &str = "# lifted ";

/// Bans in the blocklist text format, expiry and reason in comments; then
/// the lifts remembered, as comments.
fn export_text(bans: &[(IpNet, Ban)], lifts: &[(IpNet, u64)]) -> String {
    let mut text = String::from(
        "# mailmoat automatic bans: IP or CIDR, then until=<unix time> reason=<trigger>\n",
    );
    for (net, ban) in bans {
        let _ = write!(
            text,
            "{net} # until={} reason={} since={}",
            ban.until, ban.reason, ban.since_ms
        );
        if let Some(node) = &ban.origin {
            let _ = write!(text, " node={node}");
        }
        text.push('\n');
    }
    for (net, at_ms) in lifts {
        let _ = writeln!(text, "{LIFTED}at={at_ms} {net}");
    }
    text
}

/// What `autoban.state` on disk holds, and whether it may be written.
#[derive(Default)]
struct Disk {
    /// The `Table::changes` last written.
    written: Option<u64>,
    /// Why the file must not be overwritten (it failed to load and could
    /// not be moved aside).
    refused: Option<String>,
}

pub struct Bans {
    settings: AutobanSettings,
    shadow: bool,
    max_tracked: usize,
    events: DashMap<IpAddr, Window>,
    table: Mutex<Table>,
    dirty: Notify,
    /// The `Table::net_changes` last pushed to the lists; held while
    /// pushing, so an older set never replaces a newer one.
    applied: Mutex<Option<u64>>,
    /// Held while writing, so an older state never replaces a newer one.
    disk: Mutex<Disk>,
    sources: Arc<Sources>,
    metrics: Arc<Metrics>,
    /// Where this node's own changes go to reach the fleet, and whom to
    /// ask for a full reconciliation when that queue is full; unset
    /// without `[fleet]`.
    announce: OnceLock<(mpsc::Sender<BanChange>, Arc<Notify>)>,
    /// Milliseconds to add to this host's clock to read the fleet's (the
    /// store's): ban and lift stamps from different hosts are compared.
    clock_offset_ms: AtomicI64,
}

pub fn source() -> Source {
    Source {
        name: "autoban".into(),
        allow: false,
    }
}

/// A poisoned lock still guards consistent data here (no code panics
/// half-way through a change), so bans keep working after a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn unix_now() -> u64 {
    since_epoch().as_secs()
}

pub(crate) fn unix_now_ms() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

/// The whole Unix second by which `ttl` from now has passed: a ban lasts
/// at least its TTL, never up to a second less.
fn unix_after(ttl: Duration) -> u64 {
    let at = since_epoch().saturating_add(ttl);
    at.as_secs()
        .saturating_add(u64::from(at.subsec_nanos() > 0))
}

/// Time left until the Unix second `until`.
fn time_until(until: u64) -> Duration {
    Duration::from_secs(until).saturating_sub(since_epoch())
}

/// A node name as it may appear in the state file and the logs.
pub(crate) fn clean_node(node: &str) -> Arc<str> {
    let clean: String = node
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    clean.into()
}

/// A reason as it may appear in the state file and the logs.
pub(crate) fn clean_reason(reason: &str) -> Arc<str> {
    let clean: String = reason
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect();
    clean.into()
}

/// A `# lifted at=MS NET` line's rest.
fn parse_lift(rest: &[u8]) -> Option<(IpNet, u64)> {
    let text = std::str::from_utf8(rest).ok()?;
    let (at, net) = text.trim().strip_prefix("at=")?.split_once(' ')?;
    Some((parse_net(net).ok()?, at.parse().ok()?))
}

/// The state file's bytes; `None` when there is none.
fn read_state(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_STATE_BYTES} bytes"
        )));
    }
    Ok(Some(bytes))
}

/// What loading a state file found.
#[derive(Default)]
pub(crate) struct Loaded {
    bans: usize,
    bad: usize,
    clamped: usize,
    evicted: usize,
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
            table: Mutex::new(Table::default()),
            dirty: Notify::new(),
            applied: Mutex::new(None),
            disk: Mutex::new(Disk::default()),
            sources,
            metrics,
            announce: OnceLock::new(),
            clock_offset_ms: AtomicI64::new(0),
        };
        bans.restore();
        bans
    }

    /// Bans that feed lists nobody reads: for driving shaping or the ban
    /// table alone (unit tests, the fuzzers).
    pub fn detached(settings: AutobanSettings, metrics: Arc<Metrics>) -> Bans {
        let sources = Sources::new(
            Default::default(),
            crate::blocklist::sources::SourceMetrics::register(&prometheus::Registry::new()),
            Box::new(|_| {}),
        );
        Bans::new(settings, false, 1000, Arc::new(sources), metrics)
    }

    /// Loads the bans persisted in `autoban.state`, if any, and puts them
    /// in force before the first client is accepted (not at the first
    /// maintenance pass: a restart must not let a banned client in).
    fn restore(&self) {
        let Some(path) = self.settings.state.clone() else {
            return;
        };
        let problem = match read_state(&path) {
            Ok(None) => return,
            Ok(Some(bytes)) => {
                let loaded = self.load(&bytes, &path);
                tracing::info!(bans = loaded.bans, path = %path.display(), "bans restored");
                if loaded.clamped > 0 {
                    tracing::warn!(path = %path.display(), bans = loaded.clamped, max_ttl = %humantime::format_duration(self.settings.max_ttl), "autoban.state: expiries beyond autoban.max_ttl were cut to it");
                }
                if loaded.evicted > 0 {
                    tracing::warn!(path = %path.display(), evicted = loaded.evicted, "autoban.state holds more than autoban.max_bans bans; kept those that expire last");
                }
                (loaded.bad > 0).then(|| format!("{} lines could not be read", loaded.bad))
            }
            Err(e) => Some(format!("cannot read it: {e}")),
        };
        self.apply(None);
        if let Some(problem) = problem {
            self.set_aside(&path, &problem);
        }
    }

    /// Keeps a state file that failed to load for the operator, renamed
    /// `<state>.bad-<unix time>`, and saves the bans that were read in its
    /// place; if it cannot be moved, refuses to ever write over it.
    fn set_aside(&self, path: &Path, problem: &str) {
        let mut name = path
            .file_name()
            .map(std::ffi::OsString::from)
            .unwrap_or_else(|| "autoban-state".into());
        name.push(format!(".bad-{}", unix_now()));
        let aside = path.with_file_name(name);
        match std::fs::rename(path, &aside) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), kept = %aside.display(), "autoban.state: {problem}; the file as it was is kept aside and the bans that could be read are saved in its place");
                if let Err(e) = self.write_state(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot persist bans (autoban.state)");
                }
            }
            Err(e) => {
                let refused = format!(
                    "{} failed to load ({problem}) and cannot be moved aside ({e}); it is not overwritten: move it away and restart mailmoat",
                    path.display()
                );
                tracing::error!("autoban.state: {refused}");
                lock(&self.disk).refused = Some(refused);
            }
        }
    }

    /// Parses a state file line by line: a bad line is reported and
    /// skipped, never the whole file. A line without `until=` gets a full
    /// TTL (an operator's hand-written list).
    pub(crate) fn load(&self, bytes: &[u8], path: &Path) -> Loaded {
        let now = unix_now();
        let latest = unix_after(self.settings.max_ttl);
        let default_until = unix_after(self.settings.ttl);
        let latest_lift = unix_now_ms().saturating_add(MAX_LIFT_AHEAD_MS);
        let mut loaded = Loaded::default();
        let mut table = lock(&self.table);
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            if let Some(lift) = raw.strip_prefix(LIFTED.as_bytes()) {
                match parse_lift(lift).filter(|(_, at)| *at <= latest_lift) {
                    Some((net, at_ms)) => {
                        table.remember_lift(net, at_ms, self.settings.max_bans);
                    }
                    None => {
                        loaded.bad += 1;
                        if loaded.bad <= MAX_REPORTED_LINES {
                            let text: String =
                                String::from_utf8_lossy(raw).chars().take(80).collect();
                            tracing::warn!(path = %path.display(), line = i + 1, text = ?text, "autoban.state: skipped a line: not \"# lifted at=<Unix ms, not in the future> <IP or CIDR>\"");
                        }
                    }
                }
                continue;
            }
            let parsed = std::str::from_utf8(raw)
                .map_err(|_| "not UTF-8".to_string())
                .and_then(|line| self.parse_line(line, now, default_until));
            match parsed {
                Ok(Some((net, mut ban))) => {
                    if ban.until > latest {
                        ban.until = latest;
                        loaded.clamped += 1;
                    }
                    loaded.evicted += table.insert(net, ban, self.settings.max_bans, now).1;
                }
                Ok(None) => {}
                Err(error) => {
                    loaded.bad += 1;
                    if loaded.bad <= MAX_REPORTED_LINES {
                        let text: String = String::from_utf8_lossy(raw).chars().take(80).collect();
                        tracing::warn!(path = %path.display(), line = i + 1, text = ?text, "autoban.state: skipped a line: {error}");
                    }
                }
            }
        }
        loaded.bans = table.by_net.len();
        drop(table);
        self.metrics.bans_evicted.inc_by(loaded.evicted as u64);
        loaded
    }

    /// One state-file line: `None` for blanks, comments and expired bans.
    fn parse_line(
        &self,
        line: &str,
        now: u64,
        default_until: u64,
    ) -> Result<Option<(IpNet, Ban)>, String> {
        let (entry, comment) = line.split_once('#').unwrap_or((line, ""));
        if entry.trim().is_empty() {
            return Ok(None);
        }
        let net = parse_net(entry)?;
        self.check_prefix(net).map_err(|e| e.to_string())?;
        let field = |key: &str| {
            comment
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        };
        let until = match field("until") {
            None => default_until,
            Some(u) => u
                .parse()
                .map_err(|_| format!("until={u:?} is not a Unix time"))?,
        };
        if until <= now {
            return Ok(None);
        }
        let reason = field("reason").map_or_else(|| Arc::from("loaded"), clean_reason);
        let since_ms = match field("since") {
            None => 0,
            Some(s) => s
                .parse()
                .map_err(|_| format!("since={s:?} is not a Unix time in milliseconds"))?,
        };
        let origin = field("node").map(clean_node).filter(|n| !n.is_empty());
        Ok(Some((
            net,
            Ban {
                until,
                reason,
                since_ms,
                origin,
            },
        )))
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
        let reached = {
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
            let count = &mut w.counts[event as usize];
            *count = count.saturating_add(1);
            // Start over under the entry's lock: of events racing past the
            // trigger, exactly one bans (one ban, one log line).
            let reached = *count >= threshold;
            if reached {
                *w = Window {
                    started: now,
                    counts: [0; 4],
                };
            }
            reached
        };
        if !reached {
            return false;
        }
        if self.shadow {
            tracing::info!(client = %ip, trigger = event.as_str(), "shadow: would ban");
            return false;
        }
        matches!(
            self.ban(IpNet::from(ip), self.settings.ttl, event.as_str()),
            Ok(Banned::New)
        )
    }

    fn check_prefix(&self, net: IpNet) -> Result<(), BanError> {
        let (min, key) = match net {
            IpNet::V4(_) => (self.settings.min_prefix_v4, "autoban.min_prefix_v4"),
            IpNet::V6(_) => (self.settings.min_prefix_v6, "autoban.min_prefix_v6"),
        };
        if net.prefix_len() < min {
            return Err(BanError::TooWide { net, key, min });
        }
        Ok(())
    }

    /// Bans `net` for `ttl`; applied to the lists within [`APPLY_EVERY`].
    /// A net already banned is extended silently (it was logged once).
    pub fn ban(&self, net: IpNet, ttl: Duration, reason: &str) -> Result<Banned, BanError> {
        let net = net.trunc();
        self.check_prefix(net)?;
        if ttl > self.settings.max_ttl {
            return Err(BanError::TooLong {
                ttl: humantime::format_duration(ttl).to_string(),
                max: humantime::format_duration(self.settings.max_ttl).to_string(),
            });
        }
        let reason = clean_reason(reason);
        let (banned, evicted, stored, restamped) = {
            let mut table = lock(&self.table);
            // Made after any lift this node knows of, whatever the clocks.
            let since_ms = self
                .fleet_now_ms()
                .max(table.lifts.get(&net).map_or(0, |at| at.saturating_add(1)));
            let ban = Ban {
                until: unix_after(ttl.max(Duration::from_secs(1))),
                reason: reason.clone(),
                since_ms,
                origin: None,
            };
            let (banned, evicted) = table.insert(net, ban, self.settings.max_bans, unix_now());
            let stored = table.by_net.get(&net).cloned();
            let restamped = stored.as_ref().is_some_and(|b| b.since_ms == since_ms);
            (banned, evicted, stored, restamped)
        };
        match banned {
            Banned::New if evicted > 0 => {
                self.metrics.bans_evicted.inc_by(evicted as u64);
                tracing::warn!(net = %net, reason = %reason, ttl = ?ttl, evicted, "banned (autoban.max_bans reached: evicted the bans soonest to expire)");
            }
            Banned::New => tracing::warn!(net = %net, reason = %reason, ttl = ?ttl, "banned"),
            Banned::Extended => {
                tracing::debug!(net = %net, reason = %reason, ttl = ?ttl, "ban extended")
            }
            Banned::Unchanged => {}
        }
        if banned != Banned::Unchanged || restamped {
            self.dirty.notify_one();
            if let Some(ban) = stored {
                self.tell_fleet(BanChange::Banned { net, ban });
            }
        }
        Ok(banned)
    }

    /// Lifts a ban; false when there was none. The lift is remembered (and
    /// told to the fleet) either way, so a node that still has the ban
    /// drops it.
    pub fn lift(&self, net: IpNet) -> bool {
        let net = net.trunc();
        let (lifted, remembered, at_ms) = {
            let mut table = lock(&self.table);
            // After the ban it lifts, whatever the clocks.
            let at_ms = self.fleet_now_ms().max(
                table
                    .by_net
                    .get(&net)
                    .map_or(0, |ban| ban.since_ms.saturating_add(1)),
            );
            let remembered = table.remember_lift(net, at_ms, self.settings.max_bans);
            (table.remove(net).is_some(), remembered, at_ms)
        };
        if lifted {
            tracing::info!(net = %net, "ban lifted");
        }
        if lifted || remembered {
            self.dirty.notify_one();
        }
        self.tell_fleet(BanChange::Lifted { net, at_ms });
        lifted
    }

    /// Sends this node's own changes to the fleet from now on. The queue is
    /// bounded: a change that does not fit is still in force here and
    /// reaches the store at the next full reconciliation.
    pub fn announce_to(&self, changes: mpsc::Sender<BanChange>, resync: Arc<Notify>) {
        let _ = self.announce.set((changes, resync));
    }

    fn tell_fleet(&self, change: BanChange) {
        if let Some((changes, resync)) = self.announce.get() {
            if changes.try_send(change).is_err() {
                tracing::debug!("fleet queue full: the ban change goes with a reconciliation");
                resync.notify_one();
            }
        }
    }

    /// Sets how far the fleet's clock (the store's) is from this host's.
    pub fn set_clock_offset(&self, offset_ms: i64) {
        self.clock_offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// Now on the fleet's clock (Unix ms), for stamps other nodes compare.
    fn fleet_now_ms(&self) -> u64 {
        let offset = self.clock_offset_ms.load(Ordering::Relaxed);
        unix_now_ms().saturating_add_signed(offset)
    }

    /// Applies a ban another node made (never told back to the fleet).
    /// Refused when it is wider than this node allows; ignored when this
    /// node lifted it after it was made. Its expiry is cut to
    /// `autoban.max_ttl`.
    pub fn apply_remote(&self, net: IpNet, mut ban: Ban) -> Result<Banned, BanError> {
        let net = net.trunc();
        self.check_prefix(net)?;
        ban.until = ban.until.min(unix_after(self.settings.max_ttl));
        let now = unix_now();
        if ban.until <= now {
            return Ok(Banned::Unchanged);
        }
        let (node, reason) = (ban.origin.clone(), ban.reason.clone());
        let (banned, evicted) = {
            let mut table = lock(&self.table);
            if table.lifted_after(net, &ban) {
                return Ok(Banned::Unchanged);
            }
            table.insert(net, ban, self.settings.max_bans, now)
        };
        self.metrics.bans_evicted.inc_by(evicted as u64);
        if banned == Banned::New {
            let node = node.as_deref().unwrap_or("?");
            tracing::warn!(net = %net, reason = %reason, node = node, "banned by another node");
        }
        if banned != Banned::Unchanged {
            self.dirty.notify_one();
        }
        Ok(banned)
    }

    /// Applies a lift another node made at `at_ms`: drops the ban unless
    /// it was made after the lift. True when a ban was dropped.
    pub fn lift_remote(&self, net: IpNet, at_ms: u64) -> bool {
        let net = net.trunc();
        if at_ms > self.fleet_now_ms().saturating_add(MAX_LIFT_AHEAD_MS) {
            tracing::warn!(net = %net, at_ms, "ignored a lift stamped in the future (a node's clock is wrong?)");
            return false;
        }
        let (lifted, remembered) = {
            let mut table = lock(&self.table);
            let remembered = table.remember_lift(net, at_ms, self.settings.max_bans);
            let older = table
                .by_net
                .get(&net)
                .is_some_and(|ban| ban.since_ms <= at_ms);
            (older && table.remove(net).is_some(), remembered)
        };
        if lifted {
            tracing::info!(net = %net, "ban lifted by another node");
        }
        if lifted || remembered {
            self.dirty.notify_one();
        }
        lifted
    }

    /// The bans in force and the lifts remembered, for a reconciliation
    /// with the fleet.
    pub fn fleet_snapshot(&self) -> FleetSnapshot {
        let table = lock(&self.table);
        (table.snapshot(unix_now()), table.lifts())
    }

    /// The most bans kept (`autoban.max_bans`).
    pub fn max_bans(&self) -> usize {
        self.settings.max_bans
    }

    /// The longest a ban may last (`autoban.max_ttl`).
    pub fn max_ttl(&self) -> Duration {
        self.settings.max_ttl
    }

    /// Bans held (the maintenance task drops them as they expire).
    pub fn count(&self) -> usize {
        lock(&self.table).by_net.len()
    }

    /// The ban in force on `net` exactly, if any.
    pub fn get(&self, net: IpNet) -> Option<Ban> {
        let now = unix_now();
        lock(&self.table)
            .by_net
            .get(&net.trunc())
            .filter(|ban| ban.until > now)
            .cloned()
    }

    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let now = unix_now();
        lock(&self.table)
            .by_net
            .iter()
            .any(|(net, ban)| ban.until > now && net.contains(&ip))
    }

    /// The bans in the blocklist text format, expiry and reason in comments
    /// (the lifts remembered are for the state file only).
    pub fn export(&self) -> String {
        let bans = lock(&self.table).snapshot(unix_now());
        export_text(&bans, &[])
    }

    /// Pushes the bans to the lists and writes them to `autoban.state`
    /// now, off the runtime, and returns once both are done: what the admin
    /// API waits for before it acknowledges a change, so a lookup right
    /// after the answer sees it (the maintenance task would apply it only
    /// on its next turn).
    pub async fn save(self: &Arc<Self>) -> std::io::Result<Saved> {
        let path = self.settings.state.clone();
        let bans = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            bans.push_to_lists();
            path.map(|path| bans.write_state(&path)).transpose()
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(match written {
            Some(()) => Saved::OnDisk,
            None => Saved::NotConfigured,
        })
    }

    /// Applies bans to the lists and persists them whenever they change,
    /// and expires them on time. Run as a task.
    pub async fn maintain(self: Arc<Self>, state: Option<PathBuf>) {
        loop {
            let (bans, path) = (self.clone(), state.clone());
            let next_expiry = tokio::task::spawn_blocking(move || bans.apply(path.as_deref()))
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "applying bans failed; retrying");
                    Some(unix_now().saturating_add(1))
                });
            let wait = next_expiry.map_or(IDLE_WAKE, |at| {
                time_until(at).clamp(Duration::from_millis(100), IDLE_WAKE)
            });
            tokio::select! {
                () = self.dirty.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
            tokio::time::sleep(APPLY_EVERY).await;
        }
    }

    /// Applies and persists the bans now. Blocks (rebuild, fsync): for the
    /// end of shutdown, when no task is left on the runtime to hold up.
    pub fn save_now(&self, state: Option<&Path>) {
        self.apply(state);
    }

    /// Drops expired bans, pushes the rest to the lists when the networks
    /// changed, writes the state file when anything changed. Returns the
    /// earliest expiry left. Blocking work: rebuild and fsync.
    fn apply(&self, state: Option<&Path>) -> Option<u64> {
        let next = self.push_to_lists();
        if let Some(path) = state {
            if let Err(e) = self.write_state(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot persist bans (autoban.state)");
            }
        }
        next
    }

    /// Drops expired bans and pushes the rest to the lists when the
    /// networks changed. Returns the earliest expiry left. Blocking work:
    /// the lists are rebuilt.
    fn push_to_lists(&self) -> Option<u64> {
        {
            let mut applied = lock(&self.applied);
            let (nets, count, next) = {
                let mut table = lock(&self.table);
                let lifts_before = self.fleet_now_ms().saturating_sub(
                    u64::try_from(self.settings.max_ttl.as_millis()).unwrap_or(u64::MAX),
                );
                table.expire(unix_now(), lifts_before);
                let nets = (*applied != Some(table.net_changes)).then(|| {
                    let nets: Vec<IpNet> = table.by_net.keys().copied().collect();
                    (nets, table.net_changes)
                });
                (nets, table.by_net.len(), table.next_expiry())
            };
            self.metrics.active_bans.set(count as i64);
            if let Some((nets, version)) = nets {
                self.sources.update(&source(), nets, &[]);
                *applied = Some(version);
            }
            next
        }
    }

    /// Writes the bans to `path` unless it already holds this version.
    fn write_state(&self, path: &Path) -> std::io::Result<()> {
        let mut disk = lock(&self.disk);
        if let Some(refused) = &disk.refused {
            return Err(std::io::Error::other(refused.clone()));
        }
        let ((bans, lifts), changes) = {
            let table = lock(&self.table);
            if disk.written.is_some_and(|written| written >= table.changes) {
                return Ok(());
            }
            ((table.snapshot(unix_now()), table.lifts()), table.changes)
        };
        crate::blocklist::api::persist(path, &export_text(&bans, &lifts))?;
        disk.written = Some(changes);
        Ok(())
    }

    /// Forgets event windows that have ended.
    pub fn sweep(&self) {
        let now = Instant::now();
        let window = self.settings.window;
        self.events
            .retain(|_, w| now.duration_since(w.started) < window);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::config::Config;

    /// Log output, shared by every thread that writes to it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn detached_bans(settings: AutobanSettings) -> Bans {
        Bans::detached(settings, Arc::new(Metrics::new()))
    }

    #[test]
    fn a_flood_from_one_ip_logs_its_ban_once() {
        let mut settings = Config::default().autoban;
        settings.auth_failures = 3;
        let bans = Arc::new(detached_bans(settings));
        let captured = Captured::default();
        let writer = captured.clone();
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || writer.clone())
                .finish(),
        );
        let ip: IpAddr = "192.0.2.50".parse().unwrap();
        // Sessions of one client race past the trigger, and keep failing
        // after the ban until they are closed.
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (bans, dispatch) = (bans.clone(), dispatch.clone());
                std::thread::spawn(move || {
                    tracing::dispatcher::with_default(&dispatch, || {
                        (0..30)
                            .filter(|_| bans.record(ip, BanEvent::AuthFailure))
                            .count()
                    })
                })
            })
            .collect();
        let new_bans: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let logs = String::from_utf8(lock(&captured.0).clone()).unwrap();
        assert_eq!(logs.matches(" banned").count(), 1, "{logs}");
        assert_eq!(new_bans, 1);
        assert!(bans.is_banned(ip));
    }

    #[test]
    fn expiries_at_the_end_of_time_do_not_overflow() {
        assert!(time_until(u64::MAX) > Duration::from_secs(u64::MAX / 2));
        assert_eq!(time_until(0), Duration::ZERO);
        assert!(unix_after(Duration::MAX) >= unix_now());
        let bans = detached_bans(Config::default().autoban);
        let far = u64::MAX.to_string();
        let loaded = bans.load(
            format!("192.0.2.1 # until={far}\n").as_bytes(),
            Path::new("t"),
        );
        assert_eq!((loaded.bans, loaded.clamped), (1, 1));
        let next = bans.apply(None).expect("an expiry");
        assert!(next <= unix_after(bans.settings.max_ttl));
    }

    fn ban_from(node: &str, since_ms: u64) -> Ban {
        Ban {
            until: unix_now() + 3600,
            reason: "fleet".into(),
            since_ms,
            origin: Some(node.into()),
        }
    }

    #[test]
    fn a_lift_beats_the_ban_it_lifts_whatever_the_banning_nodes_clock() {
        let bans = detached_bans(Config::default().autoban);
        let net: IpNet = "192.0.2.9/32".parse().unwrap();
        // Made by a node whose clock runs a minute fast.
        let ahead = unix_now_ms() + 60_000;
        bans.apply_remote(net, ban_from("fast", ahead)).unwrap();
        assert!(bans.lift(net));
        let (_, lifts) = bans.fleet_snapshot();
        assert!(lifts.iter().any(|(n, at)| *n == net && *at > ahead));
        // The same ban heard again (a stale message, a reconciliation) stays lifted.
        assert_eq!(
            bans.apply_remote(net, ban_from("fast", ahead)).unwrap(),
            Banned::Unchanged
        );
        assert!(bans.get(net).is_none());
    }

    #[test]
    fn a_ban_made_here_after_a_lift_is_not_undone_by_that_lift_whatever_the_clocks() {
        let bans = detached_bans(Config::default().autoban);
        let net: IpNet = "192.0.2.10/32".parse().unwrap();
        // A lift stamped by a node whose clock runs a minute fast.
        let lifted_at = unix_now_ms() + 60_000;
        bans.lift_remote(net, lifted_at);
        bans.ban(net, Duration::from_secs(60), "auth_failures")
            .unwrap();
        let ban = bans.get(net).expect("banned");
        assert!(ban.since_ms > lifted_at);
        assert!(
            !bans.lift_remote(net, lifted_at),
            "the older lift keeps the newer ban"
        );
    }

    #[test]
    fn a_newer_ban_of_a_banned_network_takes_its_stamp_so_an_older_lift_cannot_undo_it() {
        let bans = detached_bans(Config::default().autoban);
        let net: IpNet = "192.0.2.11/32".parse().unwrap();
        let now = unix_now_ms();
        bans.apply_remote(net, ban_from("a", now - 10_000)).unwrap();
        // Banned again elsewhere, shorter, after a lift this node missed.
        let mut again = ban_from("c", now - 1_000);
        again.until -= 600;
        bans.apply_remote(net, again).unwrap();
        let ban = bans.get(net).unwrap();
        assert_eq!(
            (ban.since_ms, ban.origin.as_deref()),
            (now - 1_000, Some("c"))
        );
        assert!(!bans.lift_remote(net, now - 5_000));
        assert!(bans.get(net).is_some());
    }

    #[test]
    fn lifts_are_saved_and_read_back_with_the_bans() {
        let dir = std::env::temp_dir().join(format!("mailmoat-lifts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("bans");
        let mut settings = Config::default().autoban;
        settings.state = Some(state.clone());
        let net: IpNet = "192.0.2.12/32".parse().unwrap();
        {
            let bans = detached_bans(settings.clone());
            bans.ban(net, Duration::from_secs(600), "manual").unwrap();
            bans.lift(net);
            bans.save_now(Some(&state));
        }
        let text = std::fs::read_to_string(&state).unwrap();
        assert!(text.contains("# lifted at="), "{text}");
        assert!(text.ends_with(" 192.0.2.12/32\n"), "{text}");
        let restarted = detached_bans(settings);
        let (held, lifts) = restarted.fleet_snapshot();
        assert!(held.is_empty());
        assert_eq!(lifts.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![net]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lifts_older_than_the_longest_ban_are_forgotten() {
        let mut settings = Config::default().autoban;
        settings.max_ttl = Duration::from_secs(3600);
        let bans = detached_bans(settings);
        let old: IpNet = "192.0.2.13/32".parse().unwrap();
        let recent: IpNet = "192.0.2.14/32".parse().unwrap();
        bans.lift_remote(old, unix_now_ms() - 2 * 3_600_000);
        bans.lift_remote(recent, unix_now_ms());
        bans.apply(None);
        let (_, lifts) = bans.fleet_snapshot();
        assert_eq!(
            lifts.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![recent]
        );
    }

    #[test]
    fn a_lift_stamped_far_in_the_future_is_ignored_so_the_network_can_still_be_banned() {
        let bans = detached_bans(Config::default().autoban);
        let net: IpNet = "192.0.2.15/32".parse().unwrap();
        let year_ahead = unix_now_ms() + 365 * 86_400_000;
        assert!(!bans.lift_remote(net, year_ahead));
        assert!(bans.fleet_snapshot().1.is_empty());
        bans.ban(net, Duration::from_secs(60), "manual").unwrap();
        let ban = bans.get(net).expect("banned");
        assert!(ban.since_ms < year_ahead);
    }
}
