//! A small IMAP receiver for the tests, on loopback: a greeting with
//! capabilities, LOGIN and AUTHENTICATE PLAIN checked against a fixed user
//! table (`NO [AUTHENTICATIONFAILED]` on a wrong password, `NO
//! [UNAVAILABLE]` while switched to), IDLE, NOOP, ID, CAPABILITY, LOGOUT.
//! It counts the connections and logins it received and keeps every
//! byte, so a test can assert what never reached it. Plus an IMAP client
//! that reads lines with deadlines.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

use crate::harness::{connect_from, WAIT};

const CAPABILITIES: &str = "IMAP4rev1 SASL-IR LITERAL+ ID IDLE AUTH=PLAIN";
/// Longest line or literal the receiver reads; a test never needs more.
const MAX_READ: usize = 1 << 20;

#[derive(Default)]
struct State {
    connections: AtomicUsize,
    logins: AtomicUsize,
    unavailable: AtomicBool,
    /// Everything every client sent.
    received: Mutex<Vec<u8>>,
}

pub struct ImapReceiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for ImapReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ImapReceiver {
    /// Listens on an ephemeral loopback port; `users` are (name, password).
    pub async fn start(users: &[(&str, &str)]) -> ImapReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let users: Arc<Vec<(Vec<u8>, Vec<u8>)>> = Arc::new(
            users
                .iter()
                .map(|(u, p)| (u.as_bytes().to_vec(), p.as_bytes().to_vec()))
                .collect(),
        );
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let (state, users) = (shared.clone(), users.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &state, &users).await;
                });
            }
        });
        ImapReceiver { addr, state, task }
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// LOGIN and AUTHENTICATE commands received.
    pub fn logins(&self) -> usize {
        self.state.logins.load(Ordering::SeqCst)
    }

    /// Every byte every client sent, in arrival order per connection.
    pub fn received(&self) -> Vec<u8> {
        self.state.received.lock().unwrap().clone()
    }

    /// While on, every login is answered `NO [UNAVAILABLE]`.
    pub fn set_unavailable(&self, on: bool) {
        self.state.unavailable.store(on, Ordering::SeqCst);
    }
}

/// The receiver's side of one connection; ends at LOGOUT, EOF or any error.
async fn serve(
    stream: TcpStream,
    state: &State,
    users: &[(Vec<u8>, Vec<u8>)],
) -> std::io::Result<()> {
    let mut conn = Conn {
        stream: BufReader::new(stream),
        state,
    };
    conn.proxy_header().await?;
    conn.write(&format!("* OK [CAPABILITY {CAPABILITIES}] test ready\r\n"))
        .await?;
    let mut logged_in = false;
    loop {
        let Some(args) = conn.command().await? else {
            return Ok(());
        };
        let tag = String::from_utf8_lossy(args.first().map_or(&[][..], |t| t)).into_owned();
        let name = args
            .get(1)
            .map(|n| n.to_ascii_uppercase())
            .unwrap_or_default();
        if matches!(name.as_slice(), b"LOGIN" | b"AUTHENTICATE") {
            state.logins.fetch_add(1, Ordering::SeqCst);
        }
        match (name.as_slice(), logged_in) {
            (b"CAPABILITY", _) => {
                conn.write(&format!("* CAPABILITY {CAPABILITIES}\r\n{tag} OK done\r\n"))
                    .await?
            }
            (b"NOOP", _) => conn.write(&format!("{tag} OK NOOP done\r\n")).await?,
            (b"ID", _) => {
                conn.write(&format!("* ID (\"name\" \"test\")\r\n{tag} OK ID done\r\n"))
                    .await?
            }
            (b"LOGOUT", _) => {
                conn.write(&format!("* BYE logging out\r\n{tag} OK bye\r\n"))
                    .await?;
                return Ok(());
            }
            (b"LOGIN", false) if args.len() == 4 => {
                logged_in = conn.verdict(&tag, users, &args[2], &args[3]).await?;
            }
            (b"AUTHENTICATE", false) if args.len() >= 3 => {
                let response = match args.get(3) {
                    Some(initial) => initial.clone(),
                    None => {
                        conn.write("+ \r\n").await?;
                        let Some(line) = conn.line().await? else {
                            return Ok(());
                        };
                        trim(&line).to_vec()
                    }
                };
                if response == b"*" {
                    conn.write(&format!("{tag} BAD cancelled\r\n")).await?;
                    continue;
                }
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(&response)
                    .unwrap_or_default();
                let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
                match parts.as_slice() {
                    [_, user, password] if args[2].eq_ignore_ascii_case(b"PLAIN") => {
                        logged_in = conn.verdict(&tag, users, user, password).await?;
                    }
                    _ => conn.write(&format!("{tag} BAD malformed\r\n")).await?,
                }
            }
            (b"IDLE", true) => {
                conn.write("+ idling\r\n").await?;
                let Some(line) = conn.line().await? else {
                    return Ok(());
                };
                if trim(&line).eq_ignore_ascii_case(b"DONE") {
                    conn.write(&format!("{tag} OK IDLE terminated\r\n")).await?;
                } else {
                    conn.write(&format!("{tag} BAD expected DONE\r\n")).await?;
                }
            }
            (b"SELECT", true) => {
                conn.write(&format!("* 0 EXISTS\r\n{tag} OK [READ-WRITE] selected\r\n"))
                    .await?
            }
            _ => {
                conn.write(&format!("{tag} BAD unknown command\r\n"))
                    .await?
            }
        }
    }
}

struct Conn<'a> {
    stream: BufReader<TcpStream>,
    state: &'a State,
}

impl Conn<'_> {
    /// The PROXY v2 header mailmoat sends first (`upstream.proxy_protocol`
    /// defaults to "v2"), skipped as Dovecot's `haproxy = yes` would.
    async fn proxy_header(&mut self) -> std::io::Result<()> {
        const SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
        let mut head = [0u8; 16];
        self.stream.read_exact(&mut head).await?;
        if &head[..12] != SIGNATURE {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut rest = vec![0; usize::from(u16::from_be_bytes([head[14], head[15]]))];
        self.stream.read_exact(&mut rest).await?;
        Ok(())
    }

    async fn write(&mut self, text: &str) -> std::io::Result<()> {
        self.stream.get_mut().write_all(text.as_bytes()).await
    }

    async fn line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let n = (&mut self.stream)
            .take(MAX_READ as u64)
            .read_until(b'\n', &mut line)
            .await?;
        self.state.received.lock().unwrap().extend_from_slice(&line);
        Ok((n > 0 && line.ends_with(b"\n")).then_some(line))
    }

    /// One command's words: atoms, quoted strings (unescaped) and
    /// literals (read by count, `+` sent for a synchronizing one).
    async fn command(&mut self) -> std::io::Result<Option<Vec<Vec<u8>>>> {
        let mut args = Vec::new();
        loop {
            let Some(line) = self.line().await? else {
                return Ok(None);
            };
            let mut text = trim(&line);
            let mut literal = None;
            if let Some(open) = text.iter().rposition(|&b| b == b'{') {
                if text.ends_with(b"}") {
                    let spec = &text[open + 1..text.len() - 1];
                    let sync = !spec.ends_with(b"+");
                    let digits = spec.strip_suffix(b"+").unwrap_or(spec);
                    if let Some(n) = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.parse::<usize>().ok())
                    {
                        literal = Some((n.min(MAX_READ), sync));
                        text = &text[..open];
                    }
                }
            }
            words(text, &mut args);
            let Some((n, sync)) = literal else {
                return Ok(Some(args));
            };
            if sync {
                self.write("+ Ready\r\n").await?;
            }
            let mut bytes = vec![0; n];
            self.stream.read_exact(&mut bytes).await?;
            self.state
                .received
                .lock()
                .unwrap()
                .extend_from_slice(&bytes);
            args.push(bytes);
        }
    }

    /// Answers a login; true when it logged in.
    async fn verdict(
        &mut self,
        tag: &str,
        users: &[(Vec<u8>, Vec<u8>)],
        user: &[u8],
        password: &[u8],
    ) -> std::io::Result<bool> {
        if self.state.unavailable.load(Ordering::SeqCst) {
            self.write(&format!("{tag} NO [UNAVAILABLE] try again later\r\n"))
                .await?;
            return Ok(false);
        }
        if users.iter().any(|(u, p)| u == user && p == password) {
            self.write(&format!(
                "{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
            ))
            .await?;
            return Ok(true);
        }
        self.write(&format!(
            "{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        ))
        .await?;
        Ok(false)
    }
}

fn trim(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Space-separated words, quoted strings unescaped.
fn words(text: &[u8], out: &mut Vec<Vec<u8>>) {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b' ' => i += 1,
            b'"' => {
                let mut word = Vec::new();
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    if text[i] == b'\\' && i + 1 < text.len() {
                        i += 1;
                    }
                    word.push(text[i]);
                    i += 1;
                }
                i += 1;
                out.push(word);
            }
            _ => {
                let end = text[i..]
                    .iter()
                    .position(|&b| b == b' ')
                    .map_or(text.len(), |p| i + p);
                out.push(text[i..end].to_vec());
                i = end;
            }
        }
    }
}

/// An IMAP client from a chosen loopback source, reading with deadlines.
pub struct ImapClient {
    stream: BufReader<TcpStream>,
}

impl ImapClient {
    /// Connects from `ip` and reads the greeting.
    pub async fn connect(ip: Ipv4Addr, addr: SocketAddr) -> (ImapClient, String) {
        let mut client = ImapClient {
            stream: BufReader::new(connect_from(ip, addr).await),
        };
        let greeting = client.line().await;
        (client, greeting)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let stream = self.stream.get_mut();
        timeout(WAIT, stream.write_all(bytes))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// One line, or "" at EOF.
    pub async fn line(&mut self) -> String {
        self.line_within(WAIT).await.expect("a line in time")
    }

    /// One line, "" at EOF, `None` if none comes within `limit`.
    pub async fn line_within(&mut self, limit: Duration) -> Option<String> {
        let mut line = Vec::new();
        let read = timeout_at(
            Instant::now() + limit,
            self.stream.read_until(b'\n', &mut line),
        );
        read.await.ok()?.ok()?;
        Some(String::from_utf8_lossy(&line).into_owned())
    }

    /// Lines up to and including the status tagged `tag`, which is returned
    /// last; "" at EOF.
    pub async fn tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = line.is_empty() || line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// The status tagged `tag` (untagged lines before it skipped).
    pub async fn status(&mut self, tag: &str) -> String {
        self.tagged(tag).await.pop().unwrap_or_default()
    }

    /// `tag LOGIN user password` (quoted), and its status.
    pub async fn login(&mut self, tag: &str, user: &str, password: &str) -> String {
        self.send(format!("{tag} LOGIN \"{user}\" \"{password}\"\r\n").as_bytes())
            .await;
        self.status(tag).await
    }

    /// Reads until the server closes; what it said.
    pub async fn closed(&mut self) -> String {
        let mut all = String::new();
        loop {
            match self.line().await {
                line if line.is_empty() => return all,
                line => all.push_str(&line),
            }
        }
    }
}
