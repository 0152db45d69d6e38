//! Login failures per account (IMAP, POP3): the brute force that many
//! addresses spread over one account, which no per-IP rule sees.
//!
//! An account is known here only by a keyed hash of its name, and a wrong
//! password only by a keyed, truncated hash of it: the key is random per
//! process, so nothing kept (or dumped from memory) names an account or
//! can be checked against a password list. An account with enough distinct
//! failures in its window has its logins delayed, doubling per failure up
//! to a ceiling: a delay, never a lockout, so a stranger cannot lock a user
//! out, and the owner still gets in.

use std::hash::BuildHasherDefault;
use std::time::Duration;

use dashmap::DashMap;
use ring::hmac;
use rustc_hash::FxHasher;
use tokio::time::Instant;

use crate::config::MailboxSettings;

/// Wrong passwords remembered per account, to count a repeat once: a
/// phone retrying a stale password every few minutes is one guess.
const RECENT_GUESSES: usize = 8;

/// An account name, as a keyed hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Account(u64);

/// A password tried for an account, as a keyed hash truncated to 32 bits:
/// enough to tell a repeat from a new guess, too little to test a guess
/// against offline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guess(u32);

#[derive(Debug)]
struct Record {
    window_start: Instant,
    /// Distinct wrong passwords since `window_start`.
    failures: u32,
    /// The latest wrong passwords, newest last; the window forgets them.
    recent: [Option<Guess>; RECENT_GUESSES],
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            window_start: now,
            failures: 0,
            recent: [None; RECENT_GUESSES],
        }
    }

    /// Starts a new window once the old one is over.
    fn roll(&mut self, window: Duration, now: Instant) {
        if now.saturating_duration_since(self.window_start) >= window {
            *self = Record::new(now);
        }
    }
}

/// How a login attempt is counted (`mailmoat_logins_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginCount {
    Success,
    Failure,
    /// A wrong password the account already failed with in the window.
    Repeated,
    /// The receiver could not check (`[UNAVAILABLE]`, `[SYS/TEMP]`, 454).
    Temporary,
}

impl LoginCount {
    pub const ALL: [LoginCount; 4] = [
        LoginCount::Success,
        LoginCount::Failure,
        LoginCount::Repeated,
        LoginCount::Temporary,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginCount::Success => "success",
            LoginCount::Failure => "failure",
            LoginCount::Repeated => "repeated",
            LoginCount::Temporary => "temporary",
        }
    }
}

/// What became of a failed login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// A new guess: counted for the account (and the caller counts it for
    /// the client's address).
    Counted,
    /// A password this account already failed with in the window.
    Repeated,
}

pub struct Logins {
    key: hmac::Key,
    accounts: DashMap<Account, Record, BuildHasherDefault<FxHasher>>,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins")
            .field("accounts", &self.accounts.len())
            .finish_non_exhaustive()
    }
}

impl Logins {
    /// A fresh random key: hashes from another process (or before a
    /// restart) mean nothing here.
    pub fn new() -> Logins {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .expect("the system random source is readable");
        Logins {
            key,
            accounts: DashMap::default(),
        }
    }

    /// The account a login names. Case is folded: `Bob` and `bob` are one
    /// account to every receiver that matters.
    pub fn account(&self, user: &[u8]) -> Account {
        let folded = user.to_ascii_lowercase();
        let tag = hmac::sign(&self.key, &folded);
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        Account(u64::from_le_bytes(first))
    }

    /// The guess a password is for `account` (salted by it, so the same
    /// password for two accounts is two guesses).
    pub fn guess(&self, account: Account, password: &[u8]) -> Guess {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&account.0.to_le_bytes());
        ctx.update(password);
        let tag = ctx.sign();
        let mut first = [0u8; 4];
        first.copy_from_slice(&tag.as_ref()[..4]);
        Guess(u32::from_le_bytes(first))
    }

    /// How long this account's next login waits: zero until it has
    /// `account_failures` distinct failures in the window.
    pub fn delay(&self, account: Account, settings: &MailboxSettings, now: Instant) -> Duration {
        if settings.account_failures == 0 {
            return Duration::ZERO;
        }
        let Some(record) = self.accounts.get(&account) else {
            return Duration::ZERO;
        };
        if now.saturating_duration_since(record.window_start) >= settings.account_window {
            return Duration::ZERO;
        }
        let Some(over) = record.failures.checked_sub(settings.account_failures) else {
            return Duration::ZERO;
        };
        2u32.checked_pow(over)
            .and_then(|factor| settings.account_delay.checked_mul(factor))
            .map_or(settings.account_delay_max, |d| {
                d.min(settings.account_delay_max)
            })
    }

    /// Records a failed login for `account`; `guess` when the password was
    /// read. An account not tracked yet is not added when
    /// `max_tracked_accounts` are: a spray over millions of names keeps
    /// memory flat, and those accounts go undelayed (the per-IP counts
    /// still see the spray).
    pub fn failed(
        &self,
        account: Account,
        guess: Option<Guess>,
        settings: &MailboxSettings,
        now: Instant,
    ) -> Failed {
        if !self.accounts.contains_key(&account)
            && self.accounts.len() >= settings.max_tracked_accounts
        {
            return Failed::Counted;
        }
        let mut record = self
            .accounts
            .entry(account)
            .or_insert_with(|| Record::new(now));
        record.roll(settings.account_window, now);
        if let Some(guess) = guess {
            if record.recent.contains(&Some(guess)) {
                return Failed::Repeated;
            }
            record.recent.rotate_left(1);
            record.recent[RECENT_GUESSES - 1] = Some(guess);
        }
        record.failures = record.failures.saturating_add(1);
        Failed::Counted
    }

    /// Forgets accounts whose window is over.
    pub fn sweep(&self, settings: &MailboxSettings, now: Instant) {
        self.accounts.retain(|_, record| {
            now.saturating_duration_since(record.window_start) < settings.account_window
        });
    }

    pub fn tracked(&self) -> usize {
        self.accounts.len()
    }
}

impl Default for Logins {
    fn default() -> Self {
        Logins::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn settings(extra: &str) -> MailboxSettings {
        let text = format!("[mailbox]\naccount_failures = 3\naccount_delay = \"1s\"\naccount_delay_max = \"5s\"\naccount_window = \"10m\"\n{extra}");
        Config::from_toml(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .mailbox
    }

    #[test]
    fn the_same_wrong_password_counts_once_per_window() {
        let (logins, s, now) = (Logins::new(), settings(""), Instant::now());
        let bob = logins.account(b"bob");
        let stale = logins.guess(bob, b"old-password");
        assert_eq!(logins.failed(bob, Some(stale), &s, now), Failed::Counted);
        for _ in 0..9 {
            assert_eq!(logins.failed(bob, Some(stale), &s, now), Failed::Repeated);
        }
        assert_eq!(logins.delay(bob, &s, now), Duration::ZERO);
        // A new window forgets it: counted again.
        let later = now + Duration::from_secs(601);
        assert_eq!(logins.failed(bob, Some(stale), &s, later), Failed::Counted);
    }

    #[test]
    fn an_account_over_its_failures_is_delayed_doubling_up_to_the_ceiling() {
        let (logins, s, now) = (Logins::new(), settings(""), Instant::now());
        let alice = logins.account(b"Alice");
        let other = logins.account(b"carol");
        let delays: Vec<u64> = (0..7u32)
            .map(|n| {
                let guess = logins.guess(alice, format!("guess{n}").as_bytes());
                logins.failed(alice, Some(guess), &s, now);
                logins.delay(alice, &s, now).as_secs()
            })
            .collect();
        assert_eq!(delays, [0, 0, 1, 2, 4, 5, 5]);
        // Case folded: the same account.
        assert_eq!(logins.account(b"alice"), alice);
        assert_eq!(logins.delay(other, &s, now), Duration::ZERO);
        // The window over, the delay is gone, and the sweep forgets it.
        let later = now + Duration::from_secs(601);
        assert_eq!(logins.delay(alice, &s, later), Duration::ZERO);
        logins.sweep(&s, later);
        assert_eq!(logins.tracked(), 0);
    }

    #[test]
    fn accounts_past_the_tracking_cap_are_not_added() {
        let (logins, now) = (Logins::new(), Instant::now());
        let s = settings("max_tracked_accounts = 2\n");
        for name in ["a", "b", "c", "d"] {
            let account = logins.account(name.as_bytes());
            assert_eq!(logins.failed(account, None, &s, now), Failed::Counted);
        }
        assert_eq!(logins.tracked(), 2);
    }

    #[test]
    fn a_huge_failure_count_saturates_at_the_ceiling() {
        let (logins, s, now) = (Logins::new(), settings(""), Instant::now());
        let bob = logins.account(b"bob");
        for _ in 0..200 {
            logins.failed(bob, None, &s, now);
        }
        assert_eq!(logins.delay(bob, &s, now), Duration::from_secs(5));
    }
}
