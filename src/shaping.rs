//! Shaping inside a session: per-IP message and recipient buckets, and the
//! abuse events that feed automatic bans. The relay asks; this answers and
//! counts, without I/O.
//!
//! A session shapes through its [`ClientShaping`], where the two rules that
//! bend every limit are applied, once, at the point of enforcement:
//! - An allowlisted client skips every per-IP limit (the message and
//!   recipient rates) and feeds no ban. The per-message limits
//!   (`recipients_per_message`, `max_message_size`) are not per-IP: they
//!   protect the receiver from any one message, and apply to everyone.
//! - In shadow mode a limit is evaluated, counted and logged as "shadow:
//!   would refuse", and nothing is refused.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use governor::Quota;

use crate::admission::{quota, RateCheck, RateTable};
use crate::bans::{BanEvent, Bans};
use crate::config::{Config, MailboxSettings, SharedRate};
use crate::fleet::{FleetVerdict, SharedRates};
use crate::logins::Logins;
use crate::metrics::Metrics;

/// The limits a client can hit: the `limit` label of
/// `mailmoat_rate_limit_hits_total` (rates) or the `cap` label of
/// `mailmoat_message_cap_hits_total` (per-message caps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    ConnectionRate,
    MessageRate,
    RecipientRate,
    RecipientsPerMessage,
    MessageSize,
}

impl Limit {
    pub const ALL: [Limit; 5] = [
        Limit::ConnectionRate,
        Limit::MessageRate,
        Limit::RecipientRate,
        Limit::RecipientsPerMessage,
        Limit::MessageSize,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ConnectionRate => "connection_rate",
            Limit::MessageRate => "message_rate",
            Limit::RecipientRate => "recipient_rate",
            Limit::RecipientsPerMessage => "recipients_per_message",
            Limit::MessageSize => "message_size",
        }
    }

    pub fn kind(self) -> LimitKind {
        match self {
            Limit::ConnectionRate | Limit::MessageRate | Limit::RecipientRate => LimitKind::Rate,
            Limit::RecipientsPerMessage | Limit::MessageSize => LimitKind::MessageCap,
        }
    }
}

/// A rate refuses a client that asks too often, and is over only for a
/// while; a per-message cap refuses one message whatever the pace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    Rate,
    MessageCap,
}

pub struct Shaping {
    shadow: bool,
    /// Each table with the quota it was built with (fixed in a governor
    /// bucket): a reload keeps a table whose quota did not change.
    messages: (Quota, Arc<RateTable>),
    recipients: (Quota, Arc<RateTable>),
    bans: Arc<Bans>,
    metrics: Arc<Metrics>,
    /// Refusals per IP, halved at each sweep: "who is hitting us now".
    recent_refusals: Arc<DashMap<IpAddr, u32>>,
    max_tracked: usize,
    /// `server.trusted_proxies`: a load balancer's own address is never
    /// rate-limited or counted toward a ban here, whatever its connections
    /// do (no header, a bad one, a health check's commands). Refusing it
    /// would refuse every client behind it and fail its health checks: an
    /// outage. Metrics still count what it did.
    trusted_proxies: Vec<ipnet::IpNet>,
    /// The fleet's count of the message and recipient rates, when shared.
    fleet: Option<Arc<SharedRates>>,
    /// IMAP and POP3 login failures per account, and the policy they are
    /// swept by (`[mailbox]`).
    logins: Arc<Logins>,
    mailbox: MailboxSettings,
}

impl Shaping {
    pub fn new(config: &Config, bans: Arc<Bans>, metrics: Arc<Metrics>) -> Shaping {
        let l = &config.limits;
        let max = config.server.max_tracked_ips;
        let table = |q: Quota| (q, Arc::new(RateTable::new(q, max)));
        Shaping {
            shadow: config.server.shadow,
            messages: table(quota(l.message_rate, l.message_burst)),
            recipients: table(quota(l.recipient_rate, l.recipient_burst)),
            bans,
            metrics,
            recent_refusals: Arc::new(DashMap::new()),
            max_tracked: max,
            trusted_proxies: config.server.trusted_proxies.clone(),
            fleet: None,
            logins: Arc::new(Logins::new()),
            mailbox: config.mailbox.clone(),
        }
    }

    /// Counts the message and recipient rates across the fleet too.
    pub fn with_fleet(mut self, fleet: Option<Arc<SharedRates>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// Shaping whose bans feed lists nobody reads: the SMTP module driven
    /// alone, by unit tests and the fuzzer.
    pub fn detached(config: &Config, metrics: &Arc<Metrics>) -> Shaping {
        let bans = Bans::detached(config.autoban.clone(), metrics.clone());
        Shaping::new(config, bans.into(), metrics.clone())
    }

    /// The shaping of a reloaded `config`. Sessions opened before keep the
    /// `Shaping` they started with, so they finish under the old limits; a
    /// bucket whose quota did not change is shared, so a client's spent
    /// tokens are not refilled by a reload. The bans and the recent
    /// refusals are shared; `server.shadow` and `server.max_tracked_ips`
    /// need a restart and are kept.
    pub fn reconfigured(&self, config: &Config) -> Shaping {
        let l = &config.limits;
        let table = |q: Quota, old: &(Quota, Arc<RateTable>)| {
            if q == old.0 {
                old.clone()
            } else {
                (q, Arc::new(RateTable::new(q, self.max_tracked)))
            }
        };
        Shaping {
            shadow: self.shadow,
            messages: table(quota(l.message_rate, l.message_burst), &self.messages),
            recipients: table(quota(l.recipient_rate, l.recipient_burst), &self.recipients),
            bans: self.bans.clone(),
            metrics: self.metrics.clone(),
            recent_refusals: self.recent_refusals.clone(),
            max_tracked: self.max_tracked,
            trusted_proxies: config.server.trusted_proxies.clone(),
            fleet: self.fleet.clone(),
            logins: self.logins.clone(),
            mailbox: config.mailbox.clone(),
        }
    }

    /// Notes a refusal of `ip` (connection or command) for `/admin/top`.
    pub fn refused(&self, ip: IpAddr) {
        // A flood comes from addresses counted already: one lookup for
        // them. `len` visits every shard, so only a new address pays it.
        if let Some(mut count) = self.recent_refusals.get_mut(&ip) {
            *count += 1;
        } else if self.recent_refusals.len() < self.max_tracked {
            *self.recent_refusals.entry(ip).or_insert(0) += 1;
        }
    }

    /// The `n` IPs with the most recent refusals, most first.
    pub fn top_refused(&self, n: usize) -> Vec<(IpAddr, u32)> {
        let mut all: Vec<(IpAddr, u32)> = self
            .recent_refusals
            .iter()
            .map(|e| (*e.key(), *e.value()))
            .collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// The shaping of one session's client. `allowlisted` is the verdict
    /// taken when the session started; it holds for the whole session, as
    /// the config snapshot does. A trusted proxy's own address is exempt
    /// as an allowlisted client is.
    pub fn client(&self, ip: IpAddr, allowlisted: bool) -> ClientShaping<'_> {
        ClientShaping {
            shaping: self,
            ip,
            allowlisted: allowlisted || self.is_trusted_proxy(ip),
        }
    }

    /// Counts a limit hit and its ban event.
    pub fn violation(&self, ip: IpAddr, limit: Limit) {
        self.metrics.limit_hit(limit);
        self.event(ip, BanEvent::LimitViolation);
    }

    pub fn event(&self, ip: IpAddr, event: BanEvent) {
        self.count(event);
        if !self.is_trusted_proxy(ip) {
            self.bans.record(ip, event);
        }
    }

    /// The metric an event has of its own, besides its ban window.
    fn count(&self, event: BanEvent) {
        if event == BanEvent::AuthFailure {
            self.metrics.auth_failures.inc();
        }
    }

    fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The fleet's shared rates, when `[fleet]` shares any.
    pub fn fleet(&self) -> Option<&Arc<SharedRates>> {
        self.fleet.as_ref()
    }

    pub fn bans(&self) -> &Arc<Bans> {
        &self.bans
    }

    pub fn logins(&self) -> &Logins {
        &self.logins
    }

    pub fn sweep(&self) {
        self.messages.1.sweep();
        self.recipients.1.sweep();
        self.bans.sweep();
        if let Some(fleet) = &self.fleet {
            fleet.sweep();
        }
        self.recent_refusals.retain(|_, n| {
            *n /= 2;
            *n > 0
        });
        self.logins
            .sweep(&self.mailbox, tokio::time::Instant::now());
    }
}

/// What the relay does about a limit the client went over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    Pass,
    Refuse,
}

/// One session's shaping: its client, and whether it is allowlisted.
#[derive(Clone, Copy)]
pub struct ClientShaping<'a> {
    shaping: &'a Shaping,
    ip: IpAddr,
    allowlisted: bool,
}

impl ClientShaping<'_> {
    /// Takes a message token (at MAIL).
    pub fn message(&self) -> Verdict {
        self.take(
            &self.shaping.messages.1,
            Limit::MessageRate,
            SharedRate::MessageRate,
        )
    }

    /// Takes a recipient token (at RCPT).
    pub fn recipient(&self) -> Verdict {
        self.take(
            &self.shaping.recipients.1,
            Limit::RecipientRate,
            SharedRate::RecipientRate,
        )
    }

    fn take(&self, table: &RateTable, limit: Limit, shared: SharedRate) -> Verdict {
        if self.allowlisted {
            return Verdict::Pass;
        }
        match table.check(self.ip) {
            RateCheck::Allowed => {
                let fleet = self.shaping.fleet.as_ref();
                match fleet.map(|f| f.check(shared, self.ip)) {
                    None | Some(FleetVerdict::Allowed) => Verdict::Pass,
                    Some(FleetVerdict::Over) => self.over(limit),
                    Some(FleetVerdict::Held) => self.held(limit),
                }
            }
            RateCheck::Untracked => {
                self.shaping.metrics.rate_untracked.inc();
                Verdict::Pass
            }
            RateCheck::Limited => self.over(limit),
        }
    }

    /// The client went over `limit`: counts the hit and its ban event, and
    /// says whether to refuse (never in shadow mode).
    pub fn over(&self, limit: Limit) -> Verdict {
        let s = self.shaping;
        s.metrics.limit_hit(limit);
        self.event(BanEvent::LimitViolation);
        if s.shadow {
            tracing::info!(client = %self.ip, limit = limit.as_str(), "shadow: would refuse");
            return Verdict::Pass;
        }
        s.refused(self.ip);
        Verdict::Refuse
    }

    /// The client is held back by caution, not caught over a limit (the
    /// fleet's answer about it is pending): refused and counted like a
    /// limit hit, but no ban event.
    fn held(&self, limit: Limit) -> Verdict {
        let s = self.shaping;
        s.metrics.limit_hit(limit);
        if s.shadow {
            tracing::info!(client = %self.ip, limit = limit.as_str(), "shadow: would refuse");
            return Verdict::Pass;
        }
        s.refused(self.ip);
        Verdict::Refuse
    }

    pub fn logins(&self) -> &Logins {
        &self.shaping.logins
    }

    /// Counts an abuse event; it feeds the client's bans unless allowlisted.
    pub fn event(&self, event: BanEvent) {
        if self.allowlisted {
            self.shaping.count(event);
        } else {
            self.shaping.event(self.ip, event);
        }
    }
}
