//! Admission: may this client in? Decided before any upstream connection,
//! without I/O, in SPEC's order: allowlist (skips the limits below but
//! still counts toward the global cap) → blocklist → global cap → per-IP
//! and per-prefix caps → per-IP connection rate.
//!
//! In shadow mode every rule is still evaluated and counted, and what would
//! have been refused is logged, but everyone is admitted.

mod counts;
mod rate;
mod refusal;

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use ipnet::IpNet;
use tokio::time::Instant;

pub use counts::{ConnectionCounts, Permit};
pub use rate::{quota, RateCheck, RateTable};
pub use refusal::Refusal;

use crate::blocklist::Blocklist;
use crate::config::{Config, SharedRate};
use crate::fleet::{FleetVerdict, SharedRates};
use crate::metrics::Metrics;

pub struct Admission<C: Clock = DefaultClock> {
    shadow: bool,
    max_connections: usize,
    per_ip: u32,
    per_prefix: u32,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    greet_pause_on: bool,
    greet_pass_ttl: std::time::Duration,
    max_tracked: usize,
    counts: Arc<ConnectionCounts>,
    /// The quota `rate` was built with: a governor bucket's quota is fixed,
    /// so a reload that changes it needs a new table.
    rate_quota: governor::Quota,
    rate: Arc<RateTable<C>>,
    /// IPs that passed the greet pause recently, and until when.
    greet_passed: Arc<DashMap<IpAddr, Instant>>,
    blocklist: Arc<Blocklist>,
    metrics: Arc<Metrics>,
    clock: C,
    /// The fleet's count of the connection rate, when it is shared.
    fleet: Option<Arc<SharedRates>>,
}

impl Admission<DefaultClock> {
    pub fn new(config: &Config, blocklist: Arc<Blocklist>, metrics: Arc<Metrics>) -> Self {
        Admission::with_clock(config, blocklist, metrics, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Admission<C> {
    pub fn with_clock(
        config: &Config,
        blocklist: Arc<Blocklist>,
        metrics: Arc<Metrics>,
        clock: C,
    ) -> Self {
        let l = &config.limits;
        let rate_quota = quota(l.connection_rate, l.connection_burst);
        Admission {
            shadow: config.server.shadow,
            max_connections: config.server.max_connections,
            per_ip: l.per_ip_connections,
            per_prefix: l.per_prefix_connections,
            ipv4_prefix: l.ipv4_prefix,
            ipv6_prefix: l.ipv6_prefix,
            greet_pause_on: !config.timeouts.greet_pause.is_zero(),
            greet_pass_ttl: config.timeouts.greet_pass_ttl,
            max_tracked: config.server.max_tracked_ips,
            counts: ConnectionCounts::new(metrics.active_sessions.clone()),
            rate_quota,
            rate: Arc::new(RateTable::with_clock(
                rate_quota,
                config.server.max_tracked_ips,
                clock.clone(),
            )),
            greet_passed: Arc::new(DashMap::new()),
            blocklist,
            metrics,
            clock,
            fleet: None,
        }
    }

    /// Counts the connection rate across the fleet too.
    pub fn with_fleet(mut self, fleet: Option<Arc<SharedRates>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// The admission of a reloaded `config`, keeping the state whose key
    /// still means the same thing: the connection counts always (a permit
    /// releases the very keys it took, so sessions admitted before the
    /// reload are released correctly whatever the new prefix lengths), the
    /// greet passes, and the connection-rate buckets while their quota is
    /// unchanged. `server.shadow` and `server.max_tracked_ips` need a
    /// restart and are kept.
    pub fn reconfigured(&self, config: &Config) -> Self {
        let fresh = Admission::with_clock(
            config,
            self.blocklist.clone(),
            self.metrics.clone(),
            self.clock.clone(),
        );
        let rate = if fresh.rate_quota == self.rate_quota {
            self.rate.clone()
        } else {
            fresh.rate.clone()
        };
        Admission {
            shadow: self.shadow,
            max_tracked: self.max_tracked,
            counts: self.counts.clone(),
            rate,
            greet_passed: self.greet_passed.clone(),
            fleet: self.fleet.clone(),
            ..fresh
        }
    }

    /// Admits `ip` with a permit holding its counts, or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        let lists = self.blocklist.load();
        let allowed = lists.is_allowed(ip);
        if !allowed && lists.is_blocked(ip) {
            self.refuse(ip, Refusal::Blocked)?;
        }
        let mut permit = self.global_permit(ip)?;
        if allowed {
            return Ok(permit);
        }
        if !permit.add_ip(ip, self.per_ip, false) {
            self.refuse(ip, Refusal::IpCap)?;
            permit.add_ip(ip, self.per_ip, true);
        }
        if !permit.add_prefix(self.prefix_of(ip), self.per_prefix, false) {
            self.refuse(ip, Refusal::PrefixCap)?;
            permit.add_prefix(self.prefix_of(ip), self.per_prefix, true);
        }
        match self.rate.check(ip) {
            RateCheck::Allowed => {
                let fleet = self.fleet.as_ref();
                if fleet.is_some_and(|f| {
                    f.check(SharedRate::ConnectionRate, ip) != FleetVerdict::Allowed
                }) {
                    self.refuse(ip, Refusal::ConnectionRate)?;
                }
            }
            RateCheck::Limited => self.refuse(ip, Refusal::ConnectionRate)?,
            RateCheck::Untracked => self.metrics.rate_untracked.inc(),
        }
        Ok(permit)
    }

    /// Admits a trusted proxy's own connection (a PROXY `LOCAL`/`UNKNOWN`
    /// header: its health check), whose address `proxy` is the load
    /// balancer's, not a client's. Only the global cap applies, as to every
    /// session: per-IP caps and rates would refuse the balancer's checks,
    /// and the lists are for clients; a balancer whose address is listed
    /// or banned must still see the service up, or every client behind it
    /// is turned away.
    pub fn admit_proxy_check(&self, proxy: IpAddr) -> Result<Permit, Refusal> {
        self.global_permit(proxy)
    }

    fn global_permit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        match self.counts.acquire(self.max_connections, false) {
            Some(permit) => Ok(permit),
            None => {
                self.refuse(ip, Refusal::GlobalCap)?;
                Ok(self
                    .counts
                    .acquire(self.max_connections, true)
                    .expect("forced"))
            }
        }
    }

    /// Counts a refusal. In shadow mode it is only logged and `Ok` lets the
    /// client through; otherwise `Err` carries the refusal.
    pub fn refuse(&self, ip: IpAddr, refusal: Refusal) -> Result<(), Refusal> {
        if self.shadow {
            self.metrics.shadow_refused(refusal);
            tracing::info!(client = %ip, reason = refusal.as_str(), "shadow: would refuse");
            Ok(())
        } else {
            self.metrics.refused(refusal);
            tracing::debug!(client = %ip, reason = refusal.as_str(), "refused");
            Err(refusal)
        }
    }

    /// The network `ip` is counted in for the per-prefix cap.
    pub fn prefix_of(&self, ip: IpAddr) -> IpNet {
        let len = if ip.is_ipv4() {
            self.ipv4_prefix
        } else {
            self.ipv6_prefix
        };
        IpNet::new(ip, len)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(ip))
    }

    /// True when `ip` must sit through the greet pause.
    pub fn needs_greet_pause(&self, ip: IpAddr, now: Instant) -> bool {
        self.greet_pause_on && self.greet_passed.get(&ip).is_none_or(|until| *until <= now)
    }

    /// Remembers that `ip` waited for the banner, so it is not paused again
    /// for `greet_pass_ttl`. When the table is full the IP is simply paused
    /// again next time.
    pub fn greet_passed(&self, ip: IpAddr, now: Instant) {
        if self.greet_passed.len() < self.max_tracked || self.greet_passed.contains_key(&ip) {
            self.greet_passed.insert(ip, now + self.greet_pass_ttl);
        }
    }

    /// Evicts idle per-IP state and refreshes the state gauges.
    pub fn sweep(&self, now: Instant) {
        let mut evicted = self.rate.sweep();
        // Counted as removed, not as a difference of lengths: clients
        // pass the greet pause while this runs.
        self.greet_passed.retain(|_, until| {
            let keep = *until > now;
            evicted += usize::from(!keep);
            keep
        });
        self.greet_passed.shrink_to_fit();
        self.metrics.tracked_evictions.inc_by(evicted as u64);
        self.metrics.tracked_ips.set(self.rate.len() as i64);
        self.metrics
            .tracked_prefixes
            .set(self.counts.prefixes() as i64);
        self.metrics
            .greet_passed_ips
            .set(self.greet_passed.len() as i64);
    }

    pub fn counts(&self) -> &ConnectionCounts {
        &self.counts
    }
}

#[cfg(test)]
mod tests;
