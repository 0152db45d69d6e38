//! Prometheus metrics, `mailmoat_` prefix. Label values come from closed sets
//! (`CloseReason`, `Verb`, configured upstreams): never a client address, so
//! cardinality stays flat under any attack. Hot-path children are resolved
//! once here, so counting costs one atomic add.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::session::CloseReason;
use crate::smtp::Verb;

pub struct Metrics {
    registry: Registry,
    pub connections_accepted: IntCounter,
    pub active_sessions: IntGauge,
    closed: Vec<IntCounter>,
    commands: Vec<IntCounter>,
    pub bytes_from_client: IntCounter,
    pub bytes_to_client: IntCounter,
    pub protocol_errors: IntCounter,
    upstream_connect_errors: IntCounterVec,
    upstream_up: IntGaugeVec,
    pub session_duration: Histogram,
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

        let connections_accepted = counter(
            "mailmoat_connections_accepted_total",
            "Client connections accepted by the listeners.",
        );
        let active_sessions =
            IntGauge::new("mailmoat_active_sessions", "Client sessions open now.").expect("valid");
        registry
            .register(Box::new(active_sessions.clone()))
            .expect("unique metric");
        let closed_vec = counter_vec(
            "mailmoat_sessions_closed_total",
            "Sessions ended, by the one reason recorded for each.",
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
            "Bytes relayed, by direction: from_client or to_client.",
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
                "1 if the last connection to this upstream succeeded, else 0.",
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
                "Duration of client sessions.",
            )
            .buckets(vec![
                0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 600.0, 1800.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(session_duration.clone()))
            .expect("unique metric");

        Metrics {
            connections_accepted,
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

    pub fn session_closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
    }

    pub fn command(&self, verb: Verb) {
        self.commands[verb as usize].inc();
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

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
