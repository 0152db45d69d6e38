//! STUB until the lead's seam lands: not committed.
use tokio::time::Instant;

use crate::config::{Config, TlsMode};
use crate::metrics::Metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    Success,
    Failure,
    Temporary,
}

pub struct LoginContext<'a> {
    pub metrics: &'a Metrics,
    pub delay: std::time::Duration,
}

#[derive(Debug)]
pub struct Attempt {
    pub release_at: Instant,
}

impl LoginContext<'_> {
    pub fn attempt(&self, _user: Option<&[u8]>, _password: Option<&[u8]>, now: Instant) -> Attempt {
        Attempt {
            release_at: now + self.delay,
        }
    }
    pub fn outcome(&self, _attempt: &Attempt, _outcome: LoginOutcome) {}
    pub fn protocol_error(&self) {
        self.metrics.protocol_errors.inc();
    }
}

pub struct MailboxContext<'a> {
    pub config: &'a Config,
    pub metrics: &'a Metrics,
    pub login: LoginContext<'a>,
    pub tls_mode: TlsMode,
    pub require_tls: bool,
    pub tls: bool,
}
