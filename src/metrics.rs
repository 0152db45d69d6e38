//! Prometheus metrics, `mailmoat_` prefix (README "Metrics" lists each one).
//! Label values come from closed sets (`CloseReason`, `Verb`, `Limit`,
//! configured upstreams): never a client address, so cardinality stays flat
//! under any attack. Hot-path children are resolved once here, so counting
//! costs one atomic add.
//!
//! Every accepted connection is counted once at the socket
//! (`connections_total`) and ends once: refused at the door
//! (`connections_refused_total{reason}`) or, admitted, as a session
//! (`sessions_closed_total{reason}`). So accepted = refused + closed + the
//! ones still open, and a dashboard can add them up.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::admission::Refusal;
use crate::config::{Protocol, TlsMode};
use crate::logins::LoginCount;
use crate::session::CloseReason;
use crate::shaping::{Limit, LimitKind};
use crate::smtp::Verb;
use crate::tls::{HandshakeError, TlsVersion};

pub struct Metrics {
    registry: Registry,
    pub connections: IntCounter,
    pub active_sessions: IntGauge,
    closed: Vec<IntCounter>,
    commands: Vec<IntCounter>,
    pub bytes_from_client: IntCounter,
    pub bytes_to_client: IntCounter,
    pub protocol_errors: IntCounter,
    upstream_connect_errors: IntCounterVec,
    upstream_up: IntGaugeVec,
    pub session_duration: Histogram,
    refused: Vec<IntCounter>,
    shadow_refused: Vec<IntCounter>,
    pub tracked_ips: IntGauge,
    pub tracked_prefixes: IntGauge,
    pub greet_passed_ips: IntGauge,
    pub tracked_evictions: IntCounter,
    pub rate_untracked: IntCounter,
    limit_hits: Vec<IntCounter>,
    limit_refusals: Vec<Option<IntCounter>>,
    messages_accepted: IntCounter,
    messages_rejected: IntCounter,
    pub auth_failures: IntCounter,
    /// By protocol and [`LoginCount`].
    logins: IntCounterVec,
    login_delays: IntCounterVec,
    pub active_bans: IntGauge,
    pub bans_evicted: IntCounter,
    /// Handshakes, TLS sessions and certificates.
    pub tls: TlsMetrics,
    /// The fleet's store: its health, round trips, shared bans and rates.
    pub fleet: FleetMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };

        let connections = counter(
            "mailmoat_connections_total",
            "Client connections accepted from the listening sockets, before admission.",
        );
        let active_sessions =
            IntGauge::new("mailmoat_active_sessions", "Client sessions open now.").expect("valid");
        registry
            .register(Box::new(active_sessions.clone()))
            .expect("unique metric");
        let closed_vec = counter_vec(
            "mailmoat_sessions_closed_total",
            "Admitted sessions ended, by the one reason recorded for each (refused connections are not sessions).",
            "reason",
        );
        let closed = CloseReason::ALL
            .iter()
            .map(|r| closed_vec.with_label_values(&[r.as_str()]))
            .collect();
        let commands_vec = counter_vec(
            "mailmoat_smtp_commands_total",
            "SMTP commands received from clients, by verb.",
            "verb",
        );
        let commands = Verb::ALL
            .iter()
            .map(|v| commands_vec.with_label_values(&[v.as_str()]))
            .collect();
        let bytes = counter_vec(
            "mailmoat_bytes_total",
            "Bytes relayed, by direction: from_client or to_client; a session adds its own every 16 KiB and when it ends.",
            "direction",
        );
        let protocol_errors = counter(
            "mailmoat_protocol_errors_total",
            "Client protocol errors: over-long lines, smuggling patterns, injected bytes.",
        );
        let upstream_connect_errors = counter_vec(
            "mailmoat_upstream_connect_errors_total",
            "Failed connections to an upstream receiver, by configured server.",
            "server",
        );
        let upstream_up = IntGaugeVec::new(
            Opts::new(
                "mailmoat_upstream_up",
                "1 if the last receiver check or connection to this upstream succeeded (it greets and agrees on the PROXY header), else 0.",
            ),
            &["server"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(upstream_up.clone()))
            .expect("unique metric");
        let session_duration = Histogram::with_opts(
            HistogramOpts::new(
                "mailmoat_session_duration_seconds",
                "Duration of admitted client sessions.",
            )
            .buckets(vec![
                0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 600.0, 1800.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(session_duration.clone()))
            .expect("unique metric");

        let refused_vec = counter_vec(
            "mailmoat_connections_refused_total",
            "Connections refused at the door (admission, PROXY header, greet pause), by reason; each once.",
            "reason",
        );
        let shadow_vec = counter_vec(
            "mailmoat_shadow_refusals_total",
            "Connections shadow mode would have refused, by reason (admitted anyway).",
            "reason",
        );
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let tracked_ips = gauge(
            "mailmoat_tracked_ips",
            "Client IPs with connection-rate state (bounded by server.max_tracked_ips).",
        );
        let tracked_prefixes = gauge(
            "mailmoat_tracked_prefixes",
            "Client prefixes with connections open now.",
        );
        let greet_passed_ips = gauge(
            "mailmoat_greet_passed_ips",
            "Client IPs remembered as having passed the greet pause.",
        );
        let tracked_evictions = counter(
            "mailmoat_tracked_evictions_total",
            "Idle per-IP state entries evicted by the sweep.",
        );
        let rate_untracked = counter(
            "mailmoat_rate_untracked_total",
            "Connections or commands let through without a rate check because the IP table was full.",
        );

        let rate_vec = counter_vec(
            "mailmoat_rate_limit_hits_total",
            "Times a client went over a rate (token bucket), by limit; shadow mode included.",
            "limit",
        );
        let cap_vec = counter_vec(
            "mailmoat_message_cap_hits_total",
            "Times a message went over a per-message cap, by cap; shadow mode included.",
            "cap",
        );
        let messages_refused = counter_vec(
            "mailmoat_messages_refused_total",
            "MAIL commands or messages in DATA refused by mailmoat over a limit, by limit.",
            "limit",
        );
        let recipients_refused = counter_vec(
            "mailmoat_recipients_refused_total",
            "RCPT commands refused by mailmoat over a limit, by limit.",
            "limit",
        );
        let messages = counter_vec(
            "mailmoat_messages_total",
            "Messages the receiver answered at the end of DATA, by result: accepted (2xx) or rejected.",
            "result",
        );
        let build_info = IntGaugeVec::new(
            Opts::new(
                "mailmoat_build_info",
                "Always 1; the labels say which mailmoat is running.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("unique metric");
        // Descriptors, CPU, memory: the process_* names every exporter uses.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let auth_failures = counter(
            "mailmoat_auth_failures_total",
            "Logins the receiver refused, counted toward the client's bans: SMTP AUTH \
             answered 535, IMAP NO [AUTHENTICATIONFAILED], POP3 -ERR [AUTH] (a wrong \
             password repeated for an account counts once).",
        );
        let logins = IntCounterVec::new(
            Opts::new(
                "mailmoat_logins_total",
                "Login attempts by protocol and the receiver's verdict: success, failure, \
                 repeated (a wrong password the account already failed with in \
                 mailbox.account_window, not counted again), temporary (the receiver \
                 could not check: not the client's fault).",
            ),
            &["protocol", "outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(logins.clone()))
            .expect("unique metric");
        let login_delays = counter_vec(
            "mailmoat_login_delays_total",
            "Logins held back because their account is under attack from any addresses \
             (mailbox.account_failures).",
            "protocol",
        );
        for protocol in [Protocol::Smtp, Protocol::Imap, Protocol::Pop3] {
            for count in LoginCount::ALL {
                logins.with_label_values(&[protocol.as_str(), count.as_str()]);
            }
            if protocol != Protocol::Smtp {
                login_delays.with_label_values(&[protocol.as_str()]);
            }
        }
        let active_bans = gauge(
            "mailmoat_active_bans",
            "Automatic and manual bans in force.",
        );
        let bans_evicted = counter(
            "mailmoat_bans_evicted_total",
            "Bans dropped before their expiry because autoban.max_bans was reached.",
        );

        let tls = TlsMetrics::register(&registry);
        let fleet = FleetMetrics::register(&registry);

        Metrics {
            tls,
            fleet,
            limit_hits: Limit::ALL
                .iter()
                .map(|l| match l.kind() {
                    LimitKind::Rate => rate_vec.with_label_values(&[l.as_str()]),
                    LimitKind::MessageCap => cap_vec.with_label_values(&[l.as_str()]),
                })
                .collect(),
            limit_refusals: Limit::ALL
                .iter()
                .map(|l| match l {
                    Limit::ConnectionRate => None,
                    Limit::MessageRate | Limit::MessageSize => {
                        Some(messages_refused.with_label_values(&[l.as_str()]))
                    }
                    Limit::RecipientRate | Limit::RecipientsPerMessage => {
                        Some(recipients_refused.with_label_values(&[l.as_str()]))
                    }
                })
                .collect(),
            messages_accepted: messages.with_label_values(&["accepted"]),
            messages_rejected: messages.with_label_values(&["rejected"]),
            auth_failures,
            logins,
            login_delays,
            active_bans,
            bans_evicted,
            refused: Refusal::ALL
                .iter()
                .map(|r| refused_vec.with_label_values(&[r.as_str()]))
                .collect(),
            shadow_refused: Refusal::ALL
                .iter()
                .map(|r| shadow_vec.with_label_values(&[r.as_str()]))
                .collect(),
            tracked_ips,
            tracked_prefixes,
            greet_passed_ips,
            tracked_evictions,
            rate_untracked,
            connections,
            active_sessions,
            closed,
            commands,
            bytes_from_client: bytes.with_label_values(&["from_client"]),
            bytes_to_client: bytes.with_label_values(&["to_client"]),
            protocol_errors,
            upstream_connect_errors,
            upstream_up,
            session_duration,
            registry,
        }
    }

    pub fn login(&self, protocol: Protocol, count: LoginCount) {
        self.logins
            .with_label_values(&[protocol.as_str(), count.as_str()])
            .inc();
    }

    pub fn login_delayed(&self, protocol: Protocol) {
        self.login_delays
            .with_label_values(&[protocol.as_str()])
            .inc();
    }

    pub fn session_closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
    }

    pub fn refused(&self, refusal: Refusal) {
        self.refused[refusal as usize].inc();
    }

    pub fn shadow_refused(&self, refusal: Refusal) {
        self.shadow_refused[refusal as usize].inc();
    }

    pub fn limit_hit(&self, limit: Limit) {
        self.limit_hits[limit as usize].inc();
    }

    /// The receiver's answer at the end of DATA.
    pub fn message(&self, accepted: bool) {
        if accepted {
            self.messages_accepted.inc();
        } else {
            self.messages_rejected.inc();
        }
    }

    /// mailmoat refused a command over `limit`: a MAIL or a message in
    /// DATA (message limits), or an RCPT (recipient limits). A refused
    /// connection is counted by `refused` instead.
    pub fn refused_over(&self, limit: Limit) {
        if let Some(counter) = &self.limit_refusals[limit as usize] {
            counter.inc();
        }
    }

    pub fn command(&self, verb: Verb) {
        self.commands[verb as usize].inc();
    }

    /// Shows every configured upstream's error count from the start (its
    /// `up` gauge appears with the first connection: 0 before then would
    /// read as "down" on a quiet server).
    pub fn declare_upstream(&self, server: &str) {
        self.upstream_connect_errors.with_label_values(&[server]);
    }

    pub fn upstream_result(&self, server: &str, ok: bool) {
        self.upstream_up
            .with_label_values(&[server])
            .set(i64::from(ok));
        if !ok {
            self.upstream_connect_errors
                .with_label_values(&[server])
                .inc();
        }
    }

    /// For metrics registered by other modules (blocklist sources).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }
}

/// TLS towards clients. Labels: handshake results, terminating modes and
/// versions (closed enums), and configured certificates (bounded by the
/// config). Cheap to clone: the children are shared.
#[derive(Clone)]
pub struct TlsMetrics {
    handshake_ok: IntCounter,
    /// By result; the failures labelled by [`HandshakeError::as_str`].
    handshakes: IntCounterVec,
    handshake_duration: Histogram,
    /// `[starttls, implicit] × [TLSv1.2, TLSv1.3]`.
    sessions: [[IntCounter; 2]; 2],
    certificate_expiry: IntGaugeVec,
    reload_ok: IntCounter,
    reload_failed: IntCounter,
}

impl TlsMetrics {
    fn register(registry: &Registry) -> TlsMetrics {
        let handshakes = IntCounterVec::new(
            Opts::new(
                "mailmoat_tls_handshakes_total",
                "TLS handshakes with clients, by result: ok, failed, timeout (handshake_timeout passed) or busy (no handshake slot before it).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let handshake_duration = Histogram::with_opts(
            HistogramOpts::new(
                "mailmoat_tls_handshake_duration_seconds",
                "Duration of successful TLS handshakes with clients, from the slot taken to the handshake done.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let sessions = IntCounterVec::new(
            Opts::new(
                "mailmoat_tls_sessions_total",
                "Client sessions that completed a TLS handshake with mailmoat, by mode (starttls, implicit) and negotiated version.",
            ),
            &["mode", "version"],
        )
        .expect("valid metric");
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "mailmoat_tls_certificate_expiry_timestamp_seconds",
                "notAfter of each configured certificate in force (Unix time), by certificate: default or the first name of an SNI entry.",
            ),
            &["certificate"],
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "mailmoat_tls_certificate_reloads_total",
                "Certificate loads on reload, per configured certificate, by result; a failed one keeps the previous certificate.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for metric in [
            Box::new(handshakes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(handshake_duration.clone()),
            Box::new(sessions.clone()),
            Box::new(certificate_expiry.clone()),
            Box::new(reloads.clone()),
        ] {
            registry.register(metric).expect("unique metric");
        }
        let session =
            |mode: &str, version: TlsVersion| sessions.with_label_values(&[mode, version.as_str()]);
        // Every result shows from the start, at 0.
        for result in ["failed", "timeout", "busy"] {
            handshakes.with_label_values(&[result]);
        }
        TlsMetrics {
            handshake_ok: handshakes.with_label_values(&["ok"]),
            handshakes,
            handshake_duration,
            sessions: [
                [
                    session("starttls", TlsVersion::V1_2),
                    session("starttls", TlsVersion::V1_3),
                ],
                [
                    session("implicit", TlsVersion::V1_2),
                    session("implicit", TlsVersion::V1_3),
                ],
            ],
            certificate_expiry,
            reload_ok: reloads.with_label_values(&["ok"]),
            reload_failed: reloads.with_label_values(&["failed"]),
        }
    }

    pub fn handshake_done(&self, took: std::time::Duration) {
        self.handshake_ok.inc();
        self.handshake_duration.observe(took.as_secs_f64());
    }

    pub fn handshake_failed(&self, error: &HandshakeError) {
        self.handshakes.with_label_values(&[error.as_str()]).inc();
    }

    /// A session now runs inside TLS that mailmoat terminated. Listeners
    /// that do not terminate (`none`, `passthrough`) are not counted.
    pub fn session(&self, mode: TlsMode, version: TlsVersion) {
        let mode = match mode {
            TlsMode::Starttls => 0,
            TlsMode::Implicit => 1,
            TlsMode::None | TlsMode::Passthrough => return,
        };
        let version = match version {
            TlsVersion::V1_2 => 0,
            TlsVersion::V1_3 => 1,
        };
        self.sessions[mode][version].inc();
    }

    pub fn certificate_expiry(&self, certificate: &str, not_after: i64) {
        self.certificate_expiry
            .with_label_values(&[certificate])
            .set(not_after);
    }

    pub fn certificate_reload(&self, ok: bool) {
        if ok {
            self.reload_ok.inc();
        } else {
            self.reload_failed.inc();
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What the fleet's store costs and what it carries. Registered whether or
/// not `[fleet]` is configured, so dashboards and alerts see zeros, not
/// gaps.
pub struct FleetMetrics {
    /// 1 while the store answers (breaker closed), 0 while this node
    /// enforces from local state alone.
    pub up: IntGauge,
    /// Nodes heard within three heartbeats, this one included.
    pub live_nodes: IntGauge,
    /// Times the breaker opened.
    pub breaker_opened: IntCounter,
    /// Shared-rate decisions taken from the local share because the store
    /// was down, by limit.
    fallback: IntCounterVec,
    /// Refusals because the fleet-wide count was spent, by limit.
    limited: IntCounterVec,
    /// Failed or timed-out store operations, by operation.
    store_errors: IntCounterVec,
    pub round_trip: Histogram,
    /// Ban changes sent to and received from the fleet, by change.
    sent: IntCounterVec,
    received: IntCounterVec,
    /// Shared-rate takes not sent (queue full or store down); the local
    /// buckets still held.
    pub takes_dropped: IntCounter,
    /// Full reconciliations of the bans with the store.
    pub resyncs: IntCounter,
}

impl FleetMetrics {
    fn register(registry: &Registry) -> FleetMetrics {
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str, values: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            for value in values {
                c.with_label_values(&[value]);
            }
            c
        };
        let rates: Vec<&str> = crate::config::SharedRate::ALL
            .iter()
            .map(|r| r.as_str())
            .collect();
        let round_trip = Histogram::with_opts(
            HistogramOpts::new(
                "mailmoat_fleet_round_trip_seconds",
                "Round trip of one batch of commands to the fleet's store.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(round_trip.clone()))
            .expect("unique metric");
        FleetMetrics {
            up: gauge(
                "mailmoat_fleet_up",
                "1 while the fleet's store (Redis) answers; 0 while this node enforces from its local state alone (breaker open or not configured).",
            ),
            live_nodes: gauge(
                "mailmoat_fleet_live_nodes",
                "Fleet nodes heard within three heartbeats, this one included.",
            ),
            breaker_opened: counter(
                "mailmoat_fleet_breaker_opened_total",
                "Times the fleet's circuit breaker opened after failed store operations.",
            ),
            fallback: counter_vec(
                "mailmoat_fleet_fallback_total",
                "Shared-rate decisions taken from this node's local share because the store was down, by limit.",
                "limit",
                &rates,
            ),
            limited: counter_vec(
                "mailmoat_fleet_limited_total",
                "Refusals because the fleet-wide count of a shared rate was spent, by limit.",
                "limit",
                &rates,
            ),
            store_errors: counter_vec(
                "mailmoat_fleet_store_errors_total",
                "Failed or timed-out operations on the fleet's store, by operation.",
                "op",
                StoreOp::ALL_STR,
            ),
            round_trip,
            sent: counter_vec(
                "mailmoat_fleet_bans_sent_total",
                "Ban changes this node wrote to the fleet's store, by change (ban, lift).",
                "change",
                &["ban", "lift"],
            ),
            received: counter_vec(
                "mailmoat_fleet_bans_received_total",
                "Ban changes this node applied from other nodes, by change (ban, lift).",
                "change",
                &["ban", "lift"],
            ),
            takes_dropped: counter(
                "mailmoat_fleet_takes_dropped_total",
                "Shared-rate takes not sent to the store (queue full or store down); the local buckets still applied.",
            ),
            resyncs: counter(
                "mailmoat_fleet_resyncs_total",
                "Full reconciliations of the bans with the fleet's store.",
            ),
        }
    }

    pub fn fallback(&self, rate: crate::config::SharedRate) {
        self.fallback.with_label_values(&[rate.as_str()]).inc();
    }

    pub fn limited(&self, rate: crate::config::SharedRate) {
        self.limited.with_label_values(&[rate.as_str()]).inc();
    }

    pub fn store_error(&self, op: StoreOp) {
        self.store_errors.with_label_values(&[op.as_str()]).inc();
    }

    pub fn sent(&self, lift: bool) {
        self.sent
            .with_label_values(&[if lift { "lift" } else { "ban" }])
            .inc();
    }

    pub fn received_many(&self, bans: u64) {
        self.received.with_label_values(&["ban"]).inc_by(bans);
    }

    pub fn received(&self, lift: bool) {
        self.received
            .with_label_values(&[if lift { "lift" } else { "ban" }])
            .inc();
    }
}

/// An operation on the fleet's store, the `op` label of
/// `mailmoat_fleet_store_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    Connect,
    Subscribe,
    Ban,
    Lift,
    Take,
    Resync,
    Heartbeat,
}

impl StoreOp {
    const ALL_STR: &'static [&'static str] = &[
        "connect",
        "subscribe",
        "ban",
        "lift",
        "take",
        "resync",
        "heartbeat",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Connect => "connect",
            StoreOp::Subscribe => "subscribe",
            StoreOp::Ban => "ban",
            StoreOp::Lift => "lift",
            StoreOp::Take => "take",
            StoreOp::Resync => "resync",
            StoreOp::Heartbeat => "heartbeat",
        }
    }
}
