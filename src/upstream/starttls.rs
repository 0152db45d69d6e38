//! mailmoat's own STARTTLS to the receiver (`upstream.tls = "starttls"`):
//! EHLO, STARTTLS, `220`, then a rustls client handshake verified against
//! the upstream's CA file or pin. The receiver's greeting is read first by
//! the caller and kept, since the client must get the receiver's real one.

use std::io;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::verify::{self, CaFileError, PinVerifier};
use crate::config::UpstreamSettings;
use crate::smtp::{Reply, ReplyAssembler};
use crate::tls;

/// Longest reply read from the receiver (a Postfix EHLO reply is ~200 bytes).
const MAX_REPLY: usize = 16 * 1024;
const READ_CHUNK: usize = 2048;

/// A rustls client for one upstream, built once when the config is loaded.
#[derive(Debug)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    /// What the certificate is verified against, for handshake errors.
    trusts: String,
    key: String,
}

/// An upstream whose TLS client cannot be built: a config error.
#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    #[error(transparent)]
    CaFile(#[from] CaFileError),
    /// The upstream's table (`upstream`, `upstreams.NAME`).
    #[error(
        "{0}.tls = \"starttls\" needs {0}.ca_file (the CA that signs the receiver's \
         certificate) or {0}.pin_sha256 (its SHA-256): mailmoat never talks TLS to an \
         unverified receiver"
    )]
    NoTrust(String),
    #[error(
        "{0}.servers: none to take a TLS name from; list the receiver's servers or set \
         {0}.server_name to the name in its certificate"
    )]
    NoServers(String),
    /// `setting` is `upstream.server_name` or `upstream.servers`.
    #[error(
        "{setting}: {host:?} is not a name to verify the receiver's certificate against \
         ({detail}); set {table}.server_name to the name in its certificate"
    )]
    BadName {
        setting: String,
        table: String,
        host: String,
        detail: rustls::pki_types::InvalidDnsNameError,
    },
}

impl TlsClient {
    /// The client for `settings`; `key` is the table's name in the file
    /// (`upstream`, `upstreams.NAME`), for errors.
    pub fn new(settings: &UpstreamSettings, key: &str) -> Result<TlsClient, TlsClientError> {
        let provider = tls::configs::provider();
        let chain = match &settings.ca_file {
            Some(path) => {
                let setting = format!("{key}.ca_file");
                let roots = verify::root_store(path, &setting)?;
                let verifier =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| CaFileError {
                            key: setting,
                            path: path.clone(),
                            problem: e.into(),
                        })?;
                Some(verifier)
            }
            None => None,
        };
        let name = server_name(settings, key)?;
        let mut trusts = Vec::new();
        if let Some(path) = &settings.ca_file {
            trusts.push(format!(
                "a CA in {key}.ca_file ({}) must sign it for the name {}",
                path.display(),
                name.to_str()
            ));
        }
        if settings.pin_sha256.is_some() {
            trusts.push(format!(
                "its SHA-256 must equal {key}.pin_sha256 (print it with `openssl x509 -in \
                 CERT -outform DER | sha256sum`)"
            ));
        }
        let builder = tls::configs::client_builder(provider.clone());
        let config = match (&settings.pin_sha256, chain) {
            (Some(pin), chain) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier::new(
                    pin,
                    format!("{key}.pin_sha256"),
                    chain,
                    provider,
                ))),
            (None, Some(chain)) => builder.with_webpki_verifier(chain),
            (None, None) => return Err(TlsClientError::NoTrust(key.to_string())),
        }
        .with_no_client_auth();
        Ok(TlsClient {
            config: Arc::new(config),
            name,
            trusts: format!("the receiver's certificate: {}", trusts.join("; ")),
            key: key.to_string(),
        })
    }
}

/// `server_name`, else the host of the first server as written.
fn server_name(
    settings: &UpstreamSettings,
    key: &str,
) -> Result<ServerName<'static>, TlsClientError> {
    let (host, which) = match (&settings.server_name, settings.servers.first()) {
        (Some(name), _) => (name.clone(), "server_name"),
        (None, Some(first)) => {
            let host = match first.name.parse::<std::net::SocketAddr>() {
                Ok(addr) => addr.ip().to_string(),
                Err(_) => first
                    .name
                    .rsplit_once(':')
                    .map_or(first.name.as_str(), |(h, _)| h)
                    .to_string(),
            };
            (host, "servers")
        }
        (None, None) => return Err(TlsClientError::NoServers(key.to_string())),
    };
    ServerName::try_from(host.clone()).map_err(|detail| TlsClientError::BadName {
        setting: format!("{key}.{which}"),
        table: key.to_string(),
        host,
        detail,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum StarttlsError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the receiver greeted with {0:?}")]
    Greeting(String),
    #[error("the receiver answered EHLO with {0:?}")]
    Ehlo(String),
    /// The upstream's table (`upstream`, `upstreams.NAME`).
    #[error(
        "the receiver does not offer STARTTLS ({0}.tls = \"starttls\"): enable TLS on the \
         receiver (Postfix: smtpd_tls_security_level = may, with smtpd_tls_chain_files) or \
         set {0}.tls = \"none\" on a trusted link"
    )]
    NotOffered(String),
    #[error("the receiver answered STARTTLS with {0:?}")]
    Refused(String),
    #[error("the receiver sent bytes after its 220 to STARTTLS, before the handshake")]
    Injected,
    #[error("TLS handshake with the receiver failed: {error}; {trusts}")]
    Handshake { error: io::Error, trusts: String },
}

/// After the greeting: EHLO, STARTTLS, the handshake, all by `deadline`.
pub async fn upgrade(
    mut replies: Replies<TcpStream>,
    client: &TlsClient,
    hostname: &str,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, StarttlsError> {
    replies
        .send(format!("EHLO {hostname}\r\n").as_bytes(), deadline)
        .await?;
    let ehlo = replies.expect_reply(deadline).await?;
    if ehlo.code != 250 {
        return Err(StarttlsError::Ehlo(last_line(&ehlo)));
    }
    if !ehlo.lines().skip(1).any(offers_starttls) {
        return Err(StarttlsError::NotOffered(client.key.clone()));
    }
    replies.send(b"STARTTLS\r\n", deadline).await?;
    let answer = replies.expect_reply(deadline).await?;
    if answer.code != 220 {
        return Err(StarttlsError::Refused(last_line(&answer)));
    }
    // Whatever came with the 220 was written before TLS and would be read
    // as if inside it (CVE-2011-0411, the other way round).
    let (stream, leftover) = replies.into_parts();
    if !leftover.is_empty() {
        return Err(StarttlsError::Injected);
    }
    let connector = TlsConnector::from(client.config.clone());
    let handshake = connector.connect(client.name.clone(), stream);
    match timeout_at(deadline, handshake).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(error)) => Err(StarttlsError::Handshake {
            error,
            trusts: client.trusts.clone(),
        }),
        Err(_) => Err(StarttlsError::Handshake {
            error: timed_out("the handshake"),
            trusts: client.trusts.clone(),
        }),
    }
}

fn offers_starttls(line: &[u8]) -> bool {
    let keyword = line.get(4..).unwrap_or_default();
    let end = keyword
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(keyword.len());
    keyword[..end].eq_ignore_ascii_case(b"STARTTLS")
}

/// The reply's last line as text, for errors and logs.
pub fn last_line(reply: &Reply) -> String {
    let line = reply.lines().last().unwrap_or_default();
    String::from_utf8_lossy(line).trim_end().to_string()
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// Whole SMTP replies from the receiver, bounded in size and by a
/// deadline; bytes read past a reply are kept for the next one.
pub struct Replies<S> {
    stream: S,
    buf: Vec<u8>,
    assembler: ReplyAssembler,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Replies<S> {
    pub fn new(stream: S) -> Replies<S> {
        Replies {
            stream,
            buf: Vec::new(),
            assembler: ReplyAssembler::new(MAX_REPLY),
        }
    }

    /// The next reply; `None` when the receiver closes before saying a word.
    pub async fn next(&mut self, deadline: Instant) -> io::Result<Option<Reply>> {
        loop {
            while let Some(end) = memchr::memchr(b'\n', &self.buf) {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let pushed = self.assembler.push_line(&line);
                match pushed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
                    Some(reply) => return Ok(Some(reply)),
                    None => continue,
                }
            }
            if self.buf.len() >= MAX_REPLY {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a reply line longer than {MAX_REPLY} bytes"),
                ));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let n = timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| timed_out("waiting for the receiver's reply"))??;
            if n == 0 {
                if self.buf.is_empty() && self.assembler.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the receiver closed in the middle of a reply",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next reply; the receiver closing first is an error.
    pub async fn expect_reply(&mut self, deadline: Instant) -> io::Result<Reply> {
        self.next(deadline).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the receiver closed the connection",
            )
        })
    }

    pub async fn send(&mut self, bytes: &[u8], deadline: Instant) -> io::Result<()> {
        timeout_at(deadline, self.stream.write_all(bytes))
            .await
            .map_err(|_| timed_out("writing to the receiver"))?
    }

    /// The stream, and any bytes read past the last reply.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}
