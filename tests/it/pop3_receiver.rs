//! A small POP3 receiver for the tests: one mailbox with one message, a
//! fixed user table, RFC 3206 response codes, and counters of what reached
//! it. A tokio task on loopback; each connection runs until QUIT or EOF.
//! Like Dovecot with `haproxy_trusted_networks`, it reads mailmoat's PROXY
//! v2 header first; connections whose header is LOCAL (mailmoat's receiver
//! check) are not counted as clients'.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The one account that logs in.
pub const USER: &str = "alice";
pub const PASSWORD: &str = "correct horse";
/// The one message in its mailbox.
pub const MESSAGE: &str = "Subject: hello\r\n\r\nthrough mailmoat\r\n";
/// The reply to a wrong password, as Dovecot words it.
pub const AUTH_FAILED: &str = "-ERR [AUTH] Authentication failed.";

const GREETING: &[u8] = b"+OK test POP3 ready <1896.697170952@pop3.test>\r\n";
const CAPA: &[u8] =
    b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n.\r\n";

#[derive(Default)]
struct State {
    connections: AtomicUsize,
    commands: AtomicUsize,
    /// Given to every login instead of checking it (`[SYS/TEMP]`, `[IN-USE]`).
    login_reply: Mutex<Option<String>>,
}

pub struct Pop3Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Pop3Receiver {
    pub async fn start() -> Pop3Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Pop3Receiver { addr, state, task }
    }

    /// Client connections accepted so far (PROXY, not LOCAL).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Command lines received so far, over all connections.
    pub fn commands(&self) -> usize {
        self.state.commands.load(Ordering::SeqCst)
    }

    /// Every login is answered with `reply` (a line without its CRLF),
    /// whatever its credentials; `None` checks them again.
    pub fn answer_logins_with(&self, reply: Option<&str>) {
        *self.state.login_reply.lock().unwrap() = reply.map(str::to_owned);
    }
}

impl Drop for Pop3Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads a PROXY v2 header: whether it carries a client (PROXY) rather
/// than a health check (LOCAL); `None` if it is not one.
async fn proxy_header(stream: &mut BufReader<TcpStream>) -> Option<bool> {
    let mut fixed = [0u8; 16];
    let read = tokio::time::timeout(crate::harness::WAIT, stream.read_exact(&mut fixed));
    read.await.ok()?.ok()?;
    if fixed[..12] != *b"\r\n\r\n\0\r\nQUIT\n" {
        return None;
    }
    let mut rest = vec![0u8; usize::from(u16::from_be_bytes([fixed[14], fixed[15]]))];
    stream.read_exact(&mut rest).await.ok()?;
    Some(fixed[12] & 0x0f == 1)
}

async fn serve(stream: TcpStream, state: Arc<State>) {
    let mut stream = BufReader::new(stream);
    match proxy_header(&mut stream).await {
        Some(true) => {
            state.connections.fetch_add(1, Ordering::SeqCst);
        }
        Some(false) => {}
        None => return,
    }
    if stream.get_mut().write_all(GREETING).await.is_err() {
        return;
    }
    let mut user: Option<String> = None;
    let mut logged_in = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        match stream.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        state.commands.fetch_add(1, Ordering::SeqCst);
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, args) = text.split_once(' ').unwrap_or((text, ""));
        let reply: String = match (verb.to_ascii_uppercase().as_str(), logged_in) {
            ("QUIT", _) => {
                let _ = stream.get_mut().write_all(b"+OK Bye\r\n").await;
                return;
            }
            ("CAPA", _) => String::from_utf8_lossy(CAPA).into_owned(),
            ("USER", false) => {
                user = Some(args.to_owned());
                "+OK\r\n".into()
            }
            ("PASS", false) => {
                let verdict = login(&state, user.take().as_deref(), args);
                logged_in = verdict.starts_with("+OK");
                verdict
            }
            ("AUTH", false) => match args.split_once(' ') {
                Some((mechanism, initial)) if mechanism.eq_ignore_ascii_case("PLAIN") => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(initial)
                        .unwrap_or_default();
                    let mut fields = decoded.split(|&b| b == 0).skip(1);
                    let name = fields
                        .next()
                        .map(|f| String::from_utf8_lossy(f).into_owned());
                    let password = fields.next().map(String::from_utf8_lossy);
                    let verdict = login(&state, name.as_deref(), password.as_deref().unwrap_or(""));
                    logged_in = verdict.starts_with("+OK");
                    verdict
                }
                _ => "-ERR Unsupported authentication mechanism.\r\n".into(),
            },
            ("STAT", true) => format!("+OK 1 {}\r\n", MESSAGE.len()),
            ("RETR", true) if args == "1" => {
                format!("+OK {} octets\r\n{MESSAGE}.\r\n", MESSAGE.len())
            }
            ("NOOP", true) => "+OK\r\n".into(),
            (_, false) => "-ERR Unknown command.\r\n".into(),
            (_, true) => "-ERR Unknown command or argument.\r\n".into(),
        };
        if stream.get_mut().write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn login(state: &State, user: Option<&str>, password: &str) -> String {
    if let Some(reply) = state.login_reply.lock().unwrap().clone() {
        return format!("{reply}\r\n");
    }
    if user == Some(USER) && password == PASSWORD {
        "+OK Logged in.\r\n".into()
    } else {
        format!("{AUTH_FAILED}\r\n")
    }
}
