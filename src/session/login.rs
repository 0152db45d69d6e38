//! What an IMAP or POP3 module calls around each login: the attempt (its
//! account's delay), and the receiver's verdict (metrics, the client's ban
//! events, the account's failures). Credentials come in, are hashed, and
//! are dropped: nothing here keeps, logs or counts them by name.

use tokio::time::Instant;

use crate::bans::BanEvent;
use crate::config::{MailboxSettings, Protocol};
use crate::logins::{Account, Failed, Guess, LoginCount};
use crate::metrics::Metrics;
use crate::shaping::ClientShaping;

/// The receiver's verdict on a login, in the protocol module's reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    Success,
    /// Wrong credentials (`NO [AUTHENTICATIONFAILED]`, `-ERR [AUTH]`).
    Failure,
    /// The receiver could not check (`[UNAVAILABLE]`, `[SYS/TEMP]`,
    /// `[IN-USE]`): not the client's fault, not counted against it.
    Temporary,
}

/// A login on its way to the receiver.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    account: Option<Account>,
    guess: Option<Guess>,
    /// Before this the receiver's reply is held back: `now` unless the
    /// account is under attack.
    pub release_at: Instant,
}

#[derive(Clone, Copy)]
pub struct LoginContext<'a> {
    pub settings: &'a MailboxSettings,
    pub metrics: &'a Metrics,
    pub shaping: ClientShaping<'a>,
    pub protocol: Protocol,
}

impl LoginContext<'_> {
    /// A login is on its way. `user` and `password` when the module could
    /// read them (IMAP LOGIN, AUTHENTICATE PLAIN/LOGIN; POP3 USER+PASS,
    /// AUTH PLAIN/LOGIN; APOP names the user only); `None` for other
    /// mechanisms, which count per IP only.
    pub fn attempt(&self, user: Option<&[u8]>, password: Option<&[u8]>, now: Instant) -> Attempt {
        let logins = self.shaping.logins();
        let account = user.map(|u| logins.account(u));
        let guess = account.zip(password).map(|(a, p)| logins.guess(a, p));
        let delay = account.map_or(std::time::Duration::ZERO, |a| {
            logins.delay(a, self.settings, now)
        });
        if !delay.is_zero() {
            self.metrics.login_delayed(self.protocol);
        }
        Attempt {
            account,
            guess,
            release_at: now.checked_add(delay).unwrap_or(now),
        }
    }

    /// The receiver's verdict on `attempt`.
    pub fn outcome(&self, attempt: &Attempt, outcome: LoginOutcome) {
        let count = match outcome {
            LoginOutcome::Success => LoginCount::Success,
            LoginOutcome::Temporary => LoginCount::Temporary,
            LoginOutcome::Failure => {
                let failed = attempt.account.map_or(Failed::Counted, |account| {
                    self.shaping.logins().failed(
                        account,
                        attempt.guess,
                        self.settings,
                        Instant::now(),
                    )
                });
                match failed {
                    Failed::Counted => {
                        self.shaping.event(BanEvent::AuthFailure);
                        LoginCount::Failure
                    }
                    Failed::Repeated => LoginCount::Repeated,
                }
            }
        };
        self.metrics.login(self.protocol, count);
    }

    /// A protocol error before login (the receiver's `BAD`, garbage, an
    /// oversized literal): counted, toward a ban too.
    pub fn protocol_error(&self) {
        self.metrics.protocol_errors.inc();
        self.shaping.event(BanEvent::ProtocolError);
    }
}

/// What an IMAP or POP3 module is built with.
#[derive(Clone, Copy)]
pub struct MailboxContext<'a> {
    pub config: &'a crate::config::Config,
    pub metrics: &'a Metrics,
    pub login: LoginContext<'a>,
    pub tls_mode: crate::config::TlsMode,
    pub require_tls: bool,
    /// TLS already running (an implicit-TLS listener).
    pub tls: bool,
}
