//! The demo's IMAP act: a brute force of wrong LOGINs from a few addresses
//! against an IMAP listener, while a legitimate user keeps logging in.
//!
//! The receiver stands in for Dovecot: one account with a known password,
//! `NO [AUTHENTICATIONFAILED]` to any other (Dovecot's reply), a mailbox
//! of one message. It reads no PROXY header (the demo's IMAP upstream sends
//! none). Everything is bounded: line length, commands per connection, and
//! every read and write has a deadline.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

use super::{connect_from, value, IO};
use crate::metrics::Metrics;

/// The account the legitimate user logs in to.
pub const USER: &str = "alice";
pub const PASSWORD: &str = "correct horse";
/// The attackers: a few addresses, each guessing passwords for the
/// accounts every server has.
pub const ATTACKERS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 55, 1, 1),
    Ipv4Addr::new(127, 55, 2, 1),
    Ipv4Addr::new(127, 55, 3, 1),
];
const TARGETS: [&str; 3] = ["admin", "info", "postmaster"];
/// The legitimate user, on its own address.
pub const USER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Wrong LOGINs per attacker connection before it reconnects.
const GUESSES_PER_CONNECTION: usize = 3;

const MAX_LINE: u64 = 1024;
const MAX_COMMANDS: usize = 100;
const GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] demo IMAP receiver ready\r\n";

/// The stand-in for Dovecot, on 127.0.0.1, until dropped.
pub struct Receiver {
    addr: SocketAddr,
    task: JoinHandle<()>,
    stats: Arc<ReceiverStats>,
}

#[derive(Default)]
struct ReceiverStats {
    logins: AtomicU64,
    failed: AtomicU64,
}

impl Receiver {
    pub async fn start() -> std::io::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ReceiverStats::default());
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Ok(Receiver { addr, task, stats })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wrong passwords that reached the receiver.
    pub fn failed(&self) -> u64 {
        self.stats.failed.load(Ordering::Relaxed)
    }

    /// Correct logins it served.
    pub fn logins(&self) -> u64 {
        self.stats.logins.load(Ordering::Relaxed)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, stats: Arc<ReceiverStats>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    if timeout(IO, write.write_all(GREETING)).await.is_err() {
        return;
    }
    let mut line = Vec::new();
    let mut logged_in = false;
    for _ in 0..MAX_COMMANDS {
        line.clear();
        let n = match timeout(
            Duration::from_secs(30),
            (&mut read).take(MAX_LINE).read_until(b'\n', &mut line),
        )
        .await
        {
            Ok(Ok(n)) if n > 0 && line.ends_with(b"\n") => n,
            _ => return,
        };
        let text = String::from_utf8_lossy(&line[..n]);
        let reply = answer(text.trim_end(), &mut logged_in, &stats);
        let last = reply.ends_with_bye;
        if timeout(IO, write.write_all(reply.text.as_bytes()))
            .await
            .map_or(true, |r| r.is_err())
            || last
        {
            return;
        }
    }
}

struct Reply {
    text: String,
    ends_with_bye: bool,
}

fn answer(command: &str, logged_in: &mut bool, stats: &ReceiverStats) -> Reply {
    let reply = |text: String| Reply {
        text,
        ends_with_bye: false,
    };
    let mut words = command.splitn(3, ' ');
    let tag = words.next().unwrap_or("*");
    let verb = words.next().unwrap_or("").to_ascii_uppercase();
    let rest = words.next().unwrap_or("");
    match verb.as_str() {
        "CAPABILITY" => reply(format!(
            "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK Capability completed.\r\n"
        )),
        "NOOP" => reply(format!("{tag} OK NOOP completed.\r\n")),
        "LOGOUT" => Reply {
            text: format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n"),
            ends_with_bye: true,
        },
        "LOGIN" if !*logged_in => {
            let (user, password) = login_arguments(rest);
            if user == USER && password == PASSWORD {
                *logged_in = true;
                stats.logins.fetch_add(1, Ordering::Relaxed);
                reply(format!(
                    "{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
                ))
            } else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                reply(format!(
                    "{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
                ))
            }
        }
        "SELECT" | "EXAMINE" if *logged_in => reply(format!(
            "* 1 EXISTS\r\n* 0 RECENT\r\n{tag} OK [READ-WRITE] Select completed.\r\n"
        )),
        _ => reply(format!("{tag} BAD Error in IMAP command.\r\n")),
    }
}

/// LOGIN's two arguments, atoms or quoted strings (`\"` and `\\` escaped).
fn login_arguments(rest: &str) -> (String, String) {
    let mut args = Vec::new();
    let mut chars = rest.chars().peekable();
    while args.len() < 2 {
        while chars.next_if_eq(&' ').is_some() {}
        let mut arg = String::new();
        match chars.peek() {
            None => break,
            Some('"') => {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => arg.extend(chars.next()),
                        '"' => break,
                        c => arg.push(c),
                    }
                }
            }
            Some(_) => {
                while let Some(c) = chars.next_if(|c| *c != ' ') {
                    arg.push(c);
                }
            }
        }
        args.push(arg);
    }
    let mut args = args.into_iter();
    (
        args.next().unwrap_or_default(),
        args.next().unwrap_or_default(),
    )
}

/// What the act saw.
#[derive(Default)]
pub struct Tally {
    /// Wrong LOGINs the attackers sent.
    pub guesses: AtomicU64,
    /// Answered `NO [AUTHENTICATIONFAILED]`: they reached the receiver.
    pub failures_seen: AtomicU64,
    /// Attackers greeted `* BYE` after their failures: banned.
    pub banned: AtomicU64,
    /// Guesses sent before the last attacker was banned.
    pub banned_after: AtomicU64,
    /// A banned attacker was refused on the SMTP listener too.
    pub refused_on_smtp: AtomicBool,
    pub user_attempts: AtomicU64,
    pub user_logins: AtomicU64,
}

/// One attacker: connections of a few wrong LOGINs each, until mailmoat
/// greets it with `* BYE` (banned; then it tries the SMTP listener once)
/// or the deadline.
pub async fn attacker(
    ip: Ipv4Addr,
    imap: SocketAddr,
    smtp: SocketAddr,
    tally: &Tally,
    deadline: Instant,
) {
    let mut guess = 0u64;
    let mut failed = false;
    while Instant::now() < deadline {
        let Ok(stream) = connect_from(ip, imap).await else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = BufReader::new(stream);
        let greeting = read_line(&mut stream).await;
        if greeting.starts_with("* BYE") && failed {
            tally.banned.fetch_add(1, Ordering::Relaxed);
            tally
                .banned_after
                .fetch_max(tally.guesses.load(Ordering::Relaxed), Ordering::Relaxed);
            if let Ok(mut s) = connect_from(ip, smtp).await {
                if super::read_reply(&mut s).await.starts_with("554") {
                    tally.refused_on_smtp.store(true, Ordering::Relaxed);
                }
            }
            return;
        }
        if !greeting.starts_with("* OK") {
            sleep(Duration::from_millis(300)).await;
            continue;
        }
        for n in 0..GUESSES_PER_CONNECTION {
            guess += 1;
            let account = TARGETS[n % TARGETS.len()];
            let command = format!("a{guess} LOGIN {account} \"guess{guess}\"\r\n");
            if stream
                .get_mut()
                .write_all(command.as_bytes())
                .await
                .is_err()
            {
                break;
            }
            tally.guesses.fetch_add(1, Ordering::Relaxed);
            let reply = tagged_reply(&mut stream, &format!("a{guess} ")).await;
            if !reply.contains("NO [AUTHENTICATIONFAILED]") {
                break;
            }
            failed = true;
            tally.failures_seen.fetch_add(1, Ordering::Relaxed);
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// The legitimate user: a LOGIN with the right password, SELECT, LOGOUT,
/// every second.
pub async fn user(imap: SocketAddr, tally: &Tally, deadline: Instant) {
    while Instant::now() < deadline {
        tally.user_attempts.fetch_add(1, Ordering::Relaxed);
        if login_once(imap).await {
            tally.user_logins.fetch_add(1, Ordering::Relaxed);
        }
        sleep(Duration::from_secs(1)).await;
    }
}

async fn login_once(imap: SocketAddr) -> bool {
    let Ok(stream) = connect_from(USER_IP, imap).await else {
        return false;
    };
    let mut stream = BufReader::new(stream);
    if !read_line(&mut stream).await.starts_with("* OK") {
        return false;
    }
    let login = format!("u1 LOGIN {USER} \"{PASSWORD}\"\r\n");
    if stream.get_mut().write_all(login.as_bytes()).await.is_err()
        || !tagged_reply(&mut stream, "u1 ").await.starts_with("u1 OK")
    {
        return false;
    }
    let _ = stream.get_mut().write_all(b"u2 SELECT INBOX\r\n").await;
    let selected = tagged_reply(&mut stream, "u2 ").await.starts_with("u2 OK");
    let _ = stream.get_mut().write_all(b"u3 LOGOUT\r\n").await;
    let _ = tagged_reply(&mut stream, "u3 ").await;
    selected
}

/// The act's headlines that did not hold, one sentence each.
pub fn failed_claims(tally: &Tally) -> Vec<String> {
    let mut failed = Vec::new();
    let banned = tally.banned.load(Ordering::Relaxed);
    if tally.failures_seen.load(Ordering::Relaxed) == 0 {
        failed.push(
            "the IMAP brute force never reached the receiver (no NO [AUTHENTICATIONFAILED])".into(),
        );
    } else if banned < ATTACKERS.len() as u64 {
        failed.push(format!(
            "the IMAP brute force was not all banned ({banned} of {} addresses greeted * BYE)",
            ATTACKERS.len()
        ));
    } else if !tally.refused_on_smtp.load(Ordering::Relaxed) {
        failed.push(
            "an address banned for IMAP brute force was not refused on the SMTP listener".into(),
        );
    }
    let attempts = tally.user_attempts.load(Ordering::Relaxed);
    let logins = tally.user_logins.load(Ordering::Relaxed);
    if attempts == 0 || logins < attempts {
        failed.push(format!(
            "the legitimate IMAP user did not always log in ({logins} of {attempts})"
        ));
    }
    failed
}

pub fn report(metrics: &Metrics, tally: &Tally, receiver: &Receiver) {
    let banned = tally.banned.load(Ordering::Relaxed);
    let bans = if banned == 0 {
        "none banned (raise the duration?)".to_string()
    } else {
        format!(
            "{banned} of {} banned after {} wrong LOGINs in all (greeted * BYE since){}",
            ATTACKERS.len(),
            tally.banned_after.load(Ordering::Relaxed),
            if tally.refused_on_smtp.load(Ordering::Relaxed) {
                ", and refused on SMTP too"
            } else {
                ""
            }
        )
    };
    println!(
        "  IMAP brute force:  {} addresses, {} wrong LOGINs ({} reached the receiver, {} counted by mailmoat as failures); {bans}",
        ATTACKERS.len(),
        tally.guesses.load(Ordering::Relaxed),
        receiver.failed(),
        value(metrics, "mailmoat_logins_total{outcome=\"failure\",protocol=\"imap\"}"),
    );
    println!(
        "  IMAP user:         {} of {} logins succeeded meanwhile (the receiver served {})",
        tally.user_logins.load(Ordering::Relaxed),
        tally.user_attempts.load(Ordering::Relaxed),
        receiver.logins(),
    );
}

/// The reply line tagged `tag`, skipping untagged ones; "" when the
/// connection ended or went quiet. At most a few lines are read.
async fn tagged_reply<S: AsyncRead + Unpin>(stream: &mut BufReader<S>, tag: &str) -> String {
    for _ in 0..16 {
        let line = read_line(stream).await;
        if line.is_empty() || line.starts_with(tag) {
            return line;
        }
    }
    String::new()
}

/// One line (bounded), "" when the connection ended or went quiet.
async fn read_line<S: AsyncRead + Unpin>(stream: &mut BufReader<S>) -> String {
    let mut line = Vec::new();
    match timeout(IO * 2, stream.take(MAX_LINE).read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) => String::from_utf8_lossy(&line).into_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_arguments_read_atoms_and_quoted_strings() {
        assert_eq!(
            login_arguments("alice \"correct horse\""),
            ("alice".into(), "correct horse".into())
        );
        assert_eq!(
            login_arguments("\"a\\\"b\" pw"),
            ("a\"b".into(), "pw".into())
        );
        assert_eq!(login_arguments(""), (String::new(), String::new()));
    }

    #[tokio::test]
    async fn receiver_answers_like_dovecot() {
        let receiver = Receiver::start().await.unwrap();
        let stream = TcpStream::connect(receiver.addr()).await.unwrap();
        let mut stream = BufReader::new(stream);
        assert!(read_line(&mut stream).await.starts_with("* OK"));
        stream
            .get_mut()
            .write_all(b"a LOGIN admin wrong\r\n")
            .await
            .unwrap();
        assert_eq!(
            tagged_reply(&mut stream, "a ").await,
            "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        );
        let login = format!("b LOGIN {USER} \"{PASSWORD}\"\r\n");
        stream.get_mut().write_all(login.as_bytes()).await.unwrap();
        assert!(tagged_reply(&mut stream, "b ").await.starts_with("b OK"));
        assert_eq!((receiver.failed(), receiver.logins()), (1, 1));
    }
}
