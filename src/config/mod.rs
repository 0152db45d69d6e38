//! `mailmoat.toml` → validated [`Config`].
//!
//! Two layers, as ripgrep's low/high args: [`file`] mirrors the TOML file
//! with raw strings and their spans; [`Config::from_toml`] turns that into
//! typed values (`Duration`, `SocketAddr`, byte counts) and collects *every*
//! invalid value before failing, each error naming its file, line and key.
//! Running code only ever sees a validated `Config`.
//!
//! Relative paths in a file are relative to the file's directory, so a
//! config means the same whatever directory mailmoat is started from;
//! without a file (the embedded defaults) they are relative to the current
//! directory. [`Config::to_toml`] prints the effective config in a form
//! that loads back into the same config.

mod addr;
mod file;
mod fleet;
mod listeners;
pub mod units;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use addr::Resolve;
pub use addr::UpstreamAddr;
use file::{FileConfig, Raw, Scalar};
use toml::Spanned;
pub use units::Rate;

/// The shortest period of a repeating task (sweep, API poll): zero would
/// spin, or panic a timer.
const MIN_PERIOD: Duration = Duration::from_millis(100);

/// The file shipped in `config/mailmoat.toml`, with every key documented.
pub const SHIPPED_CONFIG: &str = include_str!("../../config/mailmoat.toml");

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub server: ServerSettings,
    /// `[[listener]]` tables; `server.listen` adds plain SMTP listeners
    /// (see [`Config::all_listeners`]).
    #[serde(rename = "listener", skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerSettings>,
    pub tls: TlsSettings,
    pub upstream: UpstreamSettings,
    /// `[upstreams.NAME]`: receivers a listener names with `upstream = "NAME"`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub upstreams: BTreeMap<String, UpstreamSettings>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub blocklist: BlocklistSettings,
    pub autoban: AutobanSettings,
    pub mailbox: MailboxSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    /// `[fleet]`: bans and rate counters shared through Redis; none: this
    /// node is on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetSettings>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub hostname: String,
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    #[serde(serialize_with = "ser_big_int")]
    pub max_connections: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub shadow: bool,
    #[serde(serialize_with = "ser_big_int")]
    pub max_tracked_ips: usize,
    #[serde(serialize_with = "ser_duration")]
    pub state_sweep: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct UpstreamSettings {
    /// Tried in order; a host name contributes each address it resolved to.
    #[serde(serialize_with = "addr::serialize_names")]
    pub servers: Vec<UpstreamAddr>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    pub proxy_protocol: ProxyProtocol,
    pub tls: UpstreamTls,
    // The optional keys print as "" when unset: a named upstream printed
    // without one would inherit [upstream]'s when loaded back.
    /// CA certificates (PEM) that sign the receiver's certificate.
    #[serde(serialize_with = "ser_optional_path")]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the receiver's leaf certificate (DER), 64 lowercase hex
    /// digits: accepted whoever signed it.
    #[serde(serialize_with = "ser_optional_str")]
    pub pin_sha256: Option<String>,
    /// The name verified in the receiver's certificate and sent as SNI;
    /// none: the first server's host name.
    #[serde(serialize_with = "ser_optional_str")]
    pub server_name: Option<String>,
}

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Imap,
    Pop3,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
        }
    }
}

/// How a listener handles TLS from clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: STARTTLS is neither offered nor accepted.
    None,
    /// mailmoat answers STARTTLS itself and shapes inside TLS.
    Starttls,
    /// TLS from the first byte (port 465), terminated by mailmoat.
    Implicit,
    /// The receiver's STARTTLS, relayed unread after the `220`.
    Passthrough,
}

/// One `[[listener]]`.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerSettings {
    pub address: SocketAddr,
    pub protocol: Protocol,
    pub tls: TlsMode,
    /// Refuse MAIL and AUTH before STARTTLS (`530 5.7.0`); never offer AUTH
    /// in the clear.
    pub require_tls: bool,
    /// A name in `[upstreams]`; none: `[upstream]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

impl ListenerSettings {
    /// A `server.listen` entry: SMTP, the receiver's STARTTLS relayed
    /// unread, as before listeners had modes.
    pub fn passthrough(address: SocketAddr) -> ListenerSettings {
        ListenerSettings {
            address,
            protocol: Protocol::Smtp,
            tls: TlsMode::Passthrough,
            require_tls: false,
            upstream: None,
        }
    }
}

/// The certificates mailmoat presents on terminating listeners.
#[derive(Clone, Debug, Serialize)]
pub struct TlsSettings {
    /// PEM chain, leaf first; none: no terminating listener may be configured.
    #[serde(serialize_with = "ser_optional_path")]
    pub certificate: Option<PathBuf>,
    #[serde(serialize_with = "ser_optional_path")]
    pub key: Option<PathBuf>,
    /// More certificates, chosen by the name the client asks for (SNI).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<SniCertificate>,
    #[serde(serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
    /// Handshakes in flight at once, all listeners together.
    #[serde(serialize_with = "ser_big_int")]
    pub max_handshakes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct SniCertificate {
    pub names: Vec<String>,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// How mailmoat talks to a receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plaintext (a trusted link); PROXY v2 carries the client's TLS facts.
    None,
    /// mailmoat's own STARTTLS after its EHLO, verifying the receiver.
    Starttls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    Off,
    V1,
    V2,
}

#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    pub per_ip_connections: u32,
    pub per_prefix_connections: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    #[serde(serialize_with = "ser_display")]
    pub connection_rate: Rate,
    pub connection_burst: u32,
    #[serde(serialize_with = "ser_display")]
    pub message_rate: Rate,
    pub message_burst: u32,
    #[serde(serialize_with = "ser_display")]
    pub recipient_rate: Rate,
    pub recipient_burst: u32,
    pub recipients_per_message: u32,
    #[serde(serialize_with = "ser_size")]
    pub max_message_size: u64,
    #[serde(serialize_with = "ser_big_int")]
    pub max_line_length: usize,
}

/// A per-IP rate that a fleet can count in Redis, across its nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedRate {
    ConnectionRate,
    MessageRate,
    RecipientRate,
}

impl SharedRate {
    /// Shared when `fleet.shared_rates` is not set. Not the recipient rate:
    /// a client's RCPTs arrive pipelined, faster than the store answers,
    /// and while its takes are unanswered a node holds it to its share.
    pub const DEFAULT: [SharedRate; 2] = [SharedRate::ConnectionRate, SharedRate::MessageRate];

    pub const ALL: [SharedRate; 3] = [
        SharedRate::ConnectionRate,
        SharedRate::MessageRate,
        SharedRate::RecipientRate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SharedRate::ConnectionRate => "connection_rate",
            SharedRate::MessageRate => "message_rate",
            SharedRate::RecipientRate => "recipient_rate",
        }
    }
}

/// `[fleet]`: the Redis (or Valkey) the nodes share bans and rate counters
/// through, and how this node behaves when it is slow or gone.
#[derive(Clone, Debug, Serialize)]
pub struct FleetSettings {
    /// `redis://host:port/db` or `rediss://` (TLS); no password in it.
    pub url: String,
    /// The Redis password (AUTH), read once at start; trailing newline dropped.
    pub password_file: Option<PathBuf>,
    /// PEM roots for `rediss://`; none: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Prepended to every key and channel, so fleets can share one Redis.
    pub key_prefix: String,
    /// This node's name in the fleet (default: the host name).
    pub node: String,
    /// The fleet's size, for each node's local share of a shared rate while
    /// Redis is down; 0: learned from the nodes heard.
    pub nodes: u32,
    /// The per-IP rates counted fleet-wide.
    pub shared_rates: Vec<SharedRate>,
    /// One Redis command's deadline.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Failed commands in a row that open the breaker.
    pub breaker_failures: u32,
    /// How long an open breaker waits before it tries Redis again.
    #[serde(serialize_with = "ser_duration")]
    pub breaker_cooldown: Duration,
    /// How often this node says it is alive (and learns who else is).
    #[serde(serialize_with = "ser_duration")]
    pub heartbeat: Duration,
    /// How often the bans are reconciled with Redis in full (anti-entropy).
    #[serde(serialize_with = "ser_duration")]
    pub resync: Duration,
}

/// Abuse triggers: events per IP within `window`; 0 disables a trigger.
#[derive(Clone, Debug, Serialize)]
pub struct AutobanSettings {
    #[serde(serialize_with = "ser_duration")]
    pub ttl: Duration,
    pub state: Option<PathBuf>,
    pub early_talker: u32,
    pub auth_failures: u32,
    pub limit_violations: u32,
    pub protocol_errors: u32,
    #[serde(serialize_with = "ser_duration")]
    pub window: Duration,
    /// The longest ban, from any source: `ttl`, the admin API, the state file.
    #[serde(serialize_with = "ser_duration")]
    pub max_ttl: Duration,
    /// Bans kept at once; at the cap the ban soonest to expire is evicted.
    pub max_bans: usize,
    /// The widest IPv4 and IPv6 prefixes a ban may cover.
    pub min_prefix_v4: u8,
    pub min_prefix_v6: u8,
}

#[derive(Clone, Debug, Serialize)]
pub struct BlocklistSettings {
    pub files: Vec<PathBuf>,
    pub allowlist_files: Vec<PathBuf>,
    pub action: BlockAction,
    pub kill_on_block: bool,
    #[serde(serialize_with = "ser_big_int")]
    pub tarpit_max: usize,
    #[serde(serialize_with = "ser_duration")]
    pub tarpit_time: Duration,
    pub max_entries_per_source: usize,
    pub api: Option<ApiSettings>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockAction {
    Reject,
    Drop,
    Tarpit,
}

#[derive(Clone, Debug, Serialize)]
pub struct ApiSettings {
    pub url: String,
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    pub token_file: Option<PathBuf>,
    pub cache: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct Timeouts {
    /// Zero disables the early-talker test.
    #[serde(serialize_with = "ser_duration")]
    pub greet_pause: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub greet_pass_ttl: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub proxy_header: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub idle: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub command_line: Duration,
    /// Bytes per second a client must average during DATA.
    #[serde(serialize_with = "ser_byte_rate")]
    pub data_min_rate: u64,
    #[serde(serialize_with = "ser_duration")]
    pub session: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub write: Duration,
}

/// `[mailbox]`: IMAP and POP3 listeners, before and after login, and the
/// account tarpit that slows a brute force spread over many addresses.
#[derive(Clone, Debug, Serialize)]
pub struct MailboxSettings {
    /// The idle limit before login.
    #[serde(serialize_with = "ser_duration")]
    pub preauth_idle: Duration,
    /// Commands a client may send before a login succeeds.
    pub preauth_commands: u32,
    /// The largest IMAP literal accepted before login, in bytes.
    pub max_literal: usize,
    /// The idle limit after login (IMAP IDLE re-issues every 29 minutes).
    #[serde(serialize_with = "ser_duration")]
    pub authenticated_idle: Duration,
    /// The longest IMAP or POP3 session.
    #[serde(serialize_with = "ser_duration")]
    pub session: Duration,
    /// Distinct failed passwords for one account within `account_window`
    /// before its logins are delayed; 0 disables the delay.
    pub account_failures: u32,
    #[serde(serialize_with = "ser_duration")]
    pub account_window: Duration,
    /// The first delay; it doubles with each further failure.
    #[serde(serialize_with = "ser_duration")]
    pub account_delay: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub account_delay_max: Duration,
    #[serde(serialize_with = "ser_big_int")]
    pub max_tracked_accounts: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct AdminSettings {
    /// None: no admin listener (`listen = ""`).
    #[serde(serialize_with = "ser_optional_addr")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token for mutating endpoints; none disables them.
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// TOML integers are i64; a larger count is written as a string, which
/// loads back the same.
fn ser_big_int<S: serde::Serializer>(n: &usize, s: S) -> Result<S::Ok, S::Error> {
    match i64::try_from(*n) {
        Ok(n) => s.serialize_i64(n),
        Err(_) => s.serialize_str(&n.to_string()),
    }
}

fn ser_size<S: serde::Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_size(*bytes))
}

fn ser_byte_rate<S: serde::Serializer>(per_second: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}/s", format_size(*per_second)))
}

fn ser_optional_path<S: serde::Serializer>(
    path: &Option<PathBuf>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        &path
            .as_deref()
            .map_or(String::new(), |p| p.display().to_string()),
    )
}

fn ser_optional_str<S: serde::Serializer>(text: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(text.as_deref().unwrap_or_default())
}

fn ser_optional_addr<S: serde::Serializer>(
    addr: &Option<SocketAddr>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&addr.map_or(String::new(), |a| a.to_string()))
}

/// A byte count exactly, in the largest binary unit that divides it.
fn format_size(bytes: u64) -> String {
    for (unit, scale) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    bytes.to_string()
}

/// Why a config cannot be used. `Invalid` holds every problem in the file,
/// one per line, each starting with `file:line:`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {error}; check the path given with -c", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {} in the config:\n{}", .origin.display(), plural(.problems.len(), "problem"), .problems.join("\n"))]
    Invalid {
        origin: PathBuf,
        problems: Vec<String>,
    },
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

impl Default for Config {
    /// The embedded defaults: strict limits, loopback-only listeners.
    fn default() -> Self {
        Config::from_toml("", Path::new("<defaults>")).expect("embedded defaults are valid")
    }
}

impl Config {
    /// Loads `path`; its relative paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let dir = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        Config::parse(&text, path, dir.as_deref(), &addr::system_resolve)
    }

    /// The config in `path`, or the embedded defaults with their relative
    /// paths made absolute against the current directory, so the effective
    /// config printed by `check-config` means the same from anywhere.
    pub fn load_or_defaults(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(path) => Config::load(path),
            None => {
                let cwd = std::env::current_dir().ok();
                Config::parse(
                    "",
                    Path::new("<defaults>"),
                    cwd.as_deref(),
                    &addr::system_resolve,
                )
            }
        }
    }

    /// Parses and validates; `origin` names the file in error messages.
    /// Relative paths stay relative to the current directory.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        Config::parse(text, origin, None, &addr::system_resolve)
    }

    /// Parses and validates, resolving relative paths against `base` and
    /// upstream host names with `resolve`.
    pub(crate) fn parse(
        text: &str,
        origin: &Path,
        base: Option<&Path>,
        resolve: Resolve<'_>,
    ) -> Result<Config, ConfigError> {
        let (raw, file_problems) = file::parse(text);
        let mut v = Validator {
            text,
            origin,
            base,
            resolve,
            problems: Vec::new(),
        };
        for problem in file_problems {
            v.problem_at(problem.span, problem.message);
        }
        let config = v.config(raw);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            // In file order; problems without a line (a missing key) last.
            v.problems
                .sort_by_key(|(line, _)| line.unwrap_or(usize::MAX));
            Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems: v.problems.into_iter().map(|(_, p)| p).collect(),
            })
        }
    }

    /// Every listener: `server.listen` (plain SMTP, STARTTLS relayed
    /// unread, as before listeners had modes), then `[[listener]]`.
    pub fn all_listeners(&self) -> Vec<ListenerSettings> {
        let plain = self
            .server
            .listen
            .iter()
            .map(|&a| ListenerSettings::passthrough(a));
        plain.chain(self.listeners.iter().cloned()).collect()
    }

    /// The listener configured at `address`, if any.
    pub fn listener_at(&self, address: SocketAddr) -> Option<ListenerSettings> {
        if self.server.listen.contains(&address) {
            return Some(ListenerSettings::passthrough(address));
        }
        self.listeners
            .iter()
            .find(|l| l.address == address)
            .cloned()
    }

    /// The key that asks for a listener on `address` (`server.listen` or
    /// `listener[N].address`), for messages about it.
    pub fn listener_key(&self, address: SocketAddr) -> String {
        match self.listeners.iter().position(|l| l.address == address) {
            Some(i) if !self.server.listen.contains(&address) => {
                format!("listener[{}].address", i + 1)
            }
            _ => "server.listen".into(),
        }
    }

    /// Every receiver: `[upstream]`, then each `[upstreams.NAME]`.
    pub fn all_upstreams(&self) -> impl Iterator<Item = &UpstreamSettings> {
        std::iter::once(&self.upstream).chain(self.upstreams.values())
    }

    /// The receivers a listener relays to.
    pub fn upstream_for(&self, listener: &ListenerSettings) -> &UpstreamSettings {
        listener
            .upstream
            .as_ref()
            .and_then(|name| self.upstreams.get(name))
            .unwrap_or(&self.upstream)
    }

    /// The effective configuration, as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Turns raw values into typed ones, remembering every failure.
struct Validator<'a> {
    text: &'a str,
    origin: &'a Path,
    /// Relative paths are joined to this, when set.
    base: Option<&'a Path>,
    resolve: Resolve<'a>,
    /// Each problem with its line, when it has one.
    problems: Vec<(Option<usize>, String)>,
}

impl Validator<'_> {
    fn config(&mut self, raw: FileConfig) -> Config {
        let ttl_span = raw.autoban.ttl.as_ref().map(|t| t.span());
        let s = raw.server;
        let l = raw.limits;
        let t = raw.timeouts;
        let listen_span = s.listen.as_ref().map(Spanned::span);
        // With [[listener]] tables, server.listen adds to them, or nothing.
        let has_listeners = !raw.listener.is_empty();
        let default_listen: &[&str] = if has_listeners {
            &[]
        } else {
            &["127.0.0.1:2525"]
        };
        let listen = self.addrs("server.listen", s.listen, default_listen, has_listeners);
        let (upstream, written) = self.upstream("upstream", raw.upstream, None);
        let mut upstreams = BTreeMap::new();
        let mut named_servers = Vec::new();
        for (name, table) in raw.upstreams {
            let key = format!("upstreams.{name}");
            let (settings, named) = self.upstream(&key, table, Some(&upstream));
            if let Some(span) = named.servers {
                named_servers.push((format!("{key}.servers"), settings.servers.clone(), span));
            }
            upstreams.insert(name, settings);
        }
        let tls = self.tls(raw.tls);
        let (listeners, from_tables) = self.listeners(raw.listener, &tls, &upstreams);
        let own: Vec<listeners::Own> = listen
            .iter()
            .map(|&addr| listeners::Own {
                addr,
                key: "server.listen".into(),
                span: listen_span.clone(),
            })
            .chain(from_tables)
            .collect();
        self.refuse_duplicate_listeners(&own);
        self.refuse_loops(&own, "upstream.servers", &upstream.servers, written.servers);
        for (key, servers, span) in named_servers {
            self.refuse_loops(&own, &key, &servers, Some(span));
        }
        let config = Config {
            server: ServerSettings {
                listen,
                hostname: s
                    .hostname
                    .map_or_else(|| "localhost".into(), |h| h.into_inner()),
                shutdown_grace: self.duration("server.shutdown_grace", s.shutdown_grace, "30s"),
                max_connections: self.count("server.max_connections", s.max_connections, "10000"),
                trusted_proxies: self.nets("server.trusted_proxies", s.trusted_proxies),
                shadow: s.shadow.is_some_and(|b| b.into_inner()),
                max_tracked_ips: self.count("server.max_tracked_ips", s.max_tracked_ips, "1000000"),
                state_sweep: self.at_least("server.state_sweep", s.state_sweep, "10s", MIN_PERIOD),
            },
            listeners,
            tls,
            upstream,
            upstreams,
            limits: Limits {
                per_ip_connections: self.count(
                    "limits.per_ip_connections",
                    l.per_ip_connections,
                    "10",
                ),
                per_prefix_connections: self.count(
                    "limits.per_prefix_connections",
                    l.per_prefix_connections,
                    "50",
                ),
                ipv4_prefix: self.parse("limits.ipv4_prefix", l.ipv4_prefix, "24", |s| {
                    prefix_len(s, 32)
                }),
                ipv6_prefix: self.parse("limits.ipv6_prefix", l.ipv6_prefix, "64", |s| {
                    prefix_len(s, 128)
                }),
                connection_rate: self.parse(
                    "limits.connection_rate",
                    l.connection_rate,
                    "60/min",
                    |s| units::parse_rate(s, false).and_then(nonzero_rate),
                ),
                connection_burst: self.count("limits.connection_burst", l.connection_burst, "10"),
                message_rate: self.parse("limits.message_rate", l.message_rate, "120/hour", |s| {
                    units::parse_rate(s, false).and_then(nonzero_rate)
                }),
                message_burst: self.count("limits.message_burst", l.message_burst, "20"),
                recipient_rate: self.parse(
                    "limits.recipient_rate",
                    l.recipient_rate,
                    "600/hour",
                    |s| units::parse_rate(s, false).and_then(nonzero_rate),
                ),
                recipient_burst: self.count("limits.recipient_burst", l.recipient_burst, "100"),
                recipients_per_message: self.count(
                    "limits.recipients_per_message",
                    l.recipients_per_message,
                    "100",
                ),
                max_message_size: self.size("limits.max_message_size", l.max_message_size, "25MiB"),
                max_line_length: self.size("limits.max_line_length", l.max_line_length, "2048")
                    as usize,
            },
            timeouts: Timeouts {
                greet_pause: self.duration("timeouts.greet_pause", t.greet_pause, "0s"),
                greet_pass_ttl: self.duration("timeouts.greet_pass_ttl", t.greet_pass_ttl, "1h"),
                proxy_header: self.duration("timeouts.proxy_header", t.proxy_header, "5s"),
                idle: self.duration("timeouts.idle", t.idle, "60s"),
                command_line: self.duration("timeouts.command_line", t.command_line, "30s"),
                data_min_rate: self.parse(
                    "timeouts.data_min_rate",
                    t.data_min_rate,
                    "1KiB/s",
                    |s| units::parse_rate(s, true).map(|r| r.per_second().ceil() as u64),
                ),
                session: self.duration("timeouts.session", t.session, "10m"),
                write: self.duration("timeouts.write", t.write, "30s"),
            },
            blocklist: BlocklistSettings {
                files: self.paths(raw.blocklist.files, &["config/blocklist.txt"]),
                allowlist_files: self.paths(raw.blocklist.allowlist_files, &[]),
                action: self.parse(
                    "blocklist.action",
                    raw.blocklist.action,
                    "reject",
                    |s| match s {
                        "reject" => Ok(BlockAction::Reject),
                        "drop" => Ok(BlockAction::Drop),
                        "tarpit" => Ok(BlockAction::Tarpit),
                        _ => Err("expected \"reject\", \"drop\" or \"tarpit\"".into()),
                    },
                ),
                kill_on_block: raw.blocklist.kill_on_block.is_none_or(|b| b.into_inner()),
                tarpit_max: self.count("blocklist.tarpit_max", raw.blocklist.tarpit_max, "100"),
                tarpit_time: self.duration(
                    "blocklist.tarpit_time",
                    raw.blocklist.tarpit_time,
                    "10s",
                ),
                max_entries_per_source: self.count(
                    "blocklist.max_entries_per_source",
                    raw.blocklist.max_entries_per_source,
                    "2000000",
                ),
                api: raw.blocklist.api.map(|api| self.api(api)),
            },
            autoban: AutobanSettings {
                ttl: self.duration("autoban.ttl", raw.autoban.ttl, "1h"),
                state: self.optional_path(raw.autoban.state),
                early_talker: self.parse(
                    "autoban.early_talker",
                    raw.autoban.early_talker,
                    "1",
                    whole,
                ),
                auth_failures: self.parse(
                    "autoban.auth_failures",
                    raw.autoban.auth_failures,
                    "5",
                    whole,
                ),
                limit_violations: self.parse(
                    "autoban.limit_violations",
                    raw.autoban.limit_violations,
                    "20",
                    whole,
                ),
                protocol_errors: self.parse(
                    "autoban.protocol_errors",
                    raw.autoban.protocol_errors,
                    "10",
                    whole,
                ),
                window: self.duration("autoban.window", raw.autoban.window, "10m"),
                max_ttl: self.parse("autoban.max_ttl", raw.autoban.max_ttl, "1year", |s| {
                    match units::parse_duration(s)? {
                        d if d < Duration::from_secs(1) => Err("must be at least 1s".into()),
                        d => Ok(d),
                    }
                }),
                max_bans: self.count("autoban.max_bans", raw.autoban.max_bans, "100000"),
                min_prefix_v4: self.parse(
                    "autoban.min_prefix_v4",
                    raw.autoban.min_prefix_v4,
                    "16",
                    |s| prefix_len(s, 32),
                ),
                min_prefix_v6: self.parse(
                    "autoban.min_prefix_v6",
                    raw.autoban.min_prefix_v6,
                    "32",
                    |s| prefix_len(s, 128),
                ),
            },
            mailbox: self.mailbox(raw.mailbox),
            admin: AdminSettings {
                token_file: self.optional_path(raw.admin.token_file),
                listen: match raw.admin.listen {
                    Some(text) if text.get_ref().as_str() == Some("") => None,
                    raw_listen => {
                        Some(
                            self.parse("admin.listen", raw_listen, "127.0.0.1:9925", |s| {
                                s.parse::<SocketAddr>()
                                    .map_err(|e| format!("{e}; write IP:port"))
                            }),
                        )
                    }
                },
            },
            fleet: raw.fleet.map(|f| self.fleet(f)),
            log: LogSettings {
                format: self.parse("log.format", raw.log.format, "text", |s| match s {
                    "text" => Ok(LogFormat::Text),
                    "json" => Ok(LogFormat::Json),
                    _ => Err("expected \"text\" or \"json\"".into()),
                }),
                level: raw
                    .log
                    .level
                    .map_or_else(|| "info".into(), |l| l.into_inner()),
            },
        };
        self.ban_ttl_within_max(&config.autoban, ttl_span);
        config
    }

    /// `autoban.ttl` may not exceed `autoban.max_ttl`: every ban is bounded
    /// by the same maximum, whoever makes it.
    fn ban_ttl_within_max(
        &mut self,
        a: &AutobanSettings,
        ttl_span: Option<std::ops::Range<usize>>,
    ) {
        if a.ttl <= a.max_ttl {
            return;
        }
        let message = format!(
            "{} is longer than autoban.max_ttl ({}); shorten it or raise autoban.max_ttl",
            humantime::format_duration(a.ttl),
            humantime::format_duration(a.max_ttl)
        );
        match ttl_span {
            Some(span) => self.problem("autoban.ttl", span, &message),
            None => self.problems.push((
                None,
                format!(
                    "{}: autoban.ttl (default) = {message}",
                    self.origin.display()
                ),
            )),
        }
    }

    fn mailbox(&mut self, m: file::MailboxFile) -> MailboxSettings {
        MailboxSettings {
            preauth_idle: self.at_least("mailbox.preauth_idle", m.preauth_idle, "30s", MIN_PERIOD),
            preauth_commands: self.count("mailbox.preauth_commands", m.preauth_commands, "20"),
            max_literal: self.size("mailbox.max_literal", m.max_literal, "8KiB") as usize,
            authenticated_idle: self.at_least(
                "mailbox.authenticated_idle",
                m.authenticated_idle,
                "31m",
                MIN_PERIOD,
            ),
            session: self.at_least("mailbox.session", m.session, "12h", MIN_PERIOD),
            account_failures: self.parse(
                "mailbox.account_failures",
                m.account_failures,
                "10",
                whole,
            ),
            account_window: self.at_least(
                "mailbox.account_window",
                m.account_window,
                "15m",
                MIN_PERIOD,
            ),
            account_delay: self.duration("mailbox.account_delay", m.account_delay, "2s"),
            account_delay_max: self.duration(
                "mailbox.account_delay_max",
                m.account_delay_max,
                "15s",
            ),
            max_tracked_accounts: self.count(
                "mailbox.max_tracked_accounts",
                m.max_tracked_accounts,
                "100000",
            ),
        }
    }

    fn duration(&mut self, key: &str, raw: Raw<Scalar>, default: &str) -> Duration {
        self.parse(key, raw, default, units::parse_duration)
    }

    /// A period something repeats at: zero would spin a loop (or panic a
    /// timer), so it has a floor.
    fn at_least(&mut self, key: &str, raw: Raw<Scalar>, default: &str, min: Duration) -> Duration {
        self.parse(key, raw, default, |s| match units::parse_duration(s)? {
            d if d < min => Err(format!(
                "must be at least {}",
                humantime::format_duration(min)
            )),
            d => Ok(d),
        })
    }

    fn size(&mut self, key: &str, raw: Raw<Scalar>, default: &str) -> u64 {
        self.parse(key, raw, default, |s| match units::parse_size(s)? {
            0 => Err("must be greater than zero".into()),
            n => Ok(n),
        })
    }

    fn api(&mut self, api: file::ApiFile) -> ApiSettings {
        let url = match api.url {
            Some(url)
                if url.get_ref().starts_with("http://")
                    || url.get_ref().starts_with("https://") =>
            {
                url.into_inner()
            }
            Some(url) => {
                self.problem(
                    "blocklist.api.url",
                    url.span(),
                    "must start with https:// (or http://)",
                );
                String::new()
            }
            None => {
                self.problem_at(
                    None,
                    "[blocklist.api] needs url = \"https://…\" (or remove the section)".into(),
                );
                String::new()
            }
        };
        ApiSettings {
            url,
            interval: self.at_least("blocklist.api.interval", api.interval, "10s", MIN_PERIOD),
            timeout: self.at_least("blocklist.api.timeout", api.timeout, "10s", MIN_PERIOD),
            token_file: self.optional_path(api.token_file),
            cache: self.path(api.cache.map_or_else(
                || "/var/lib/mailmoat/api-cache.txt".into(),
                Spanned::into_inner,
            )),
        }
    }

    /// A whole number greater than zero.
    fn count<T: TryFrom<u64>>(&mut self, key: &str, raw: Raw<Scalar>, default: &str) -> T {
        self.parse(key, raw, default, |s| {
            let n: u64 = s
                .parse()
                .map_err(|e| format!("{e}; write a whole number"))?;
            if n == 0 {
                return Err("must be greater than zero".into());
            }
            T::try_from(n).map_err(|_| "is too large".to_string())
        })
    }

    fn paths(&mut self, raw: Raw<Vec<String>>, default: &[&str]) -> Vec<PathBuf> {
        match raw {
            Some(raw) => raw.into_inner().into_iter().map(|p| self.path(p)).collect(),
            None => default.iter().map(|p| self.path((*p).into())).collect(),
        }
    }

    /// A path; empty means none.
    fn optional_path(&self, raw: Raw<String>) -> Option<PathBuf> {
        raw.map(Spanned::into_inner)
            .filter(|p| !p.is_empty())
            .map(|p| self.path(p))
    }

    /// `path` as the running process must open it: relative to the
    /// config file's directory when there is one.
    fn path(&self, path: String) -> PathBuf {
        let path = PathBuf::from(path);
        match self.base {
            Some(base) if path.is_relative() => base.join(path),
            _ => path,
        }
    }

    /// The upstream servers, host names resolved now.
    fn upstream_addrs(&mut self, key: &str, raw: Raw<Vec<String>>) -> Vec<UpstreamAddr> {
        let Some(raw) = raw else {
            return vec![UpstreamAddr::from(SocketAddr::from(([127, 0, 0, 1], 25)))];
        };
        let span = raw.span();
        let written = raw.into_inner();
        if written.is_empty() {
            self.problem(key, span.clone(), "needs at least one address");
        }
        let mut servers = Vec::new();
        for text in written {
            match addr::upstream(&text, self.resolve) {
                Ok(addrs) => servers.extend(addrs),
                Err(e) => self.problem(key, span.clone(), &format!("{text:?}: {e}")),
            }
        }
        servers
    }

    fn nets(&mut self, key: &str, raw: Raw<Vec<String>>) -> Vec<IpNet> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        let span = raw.span();
        let mut nets = Vec::new();
        for text in raw.into_inner() {
            match crate::blocklist::parse_net(&text) {
                Ok(net) => nets.push(net),
                Err(e) => self.problem(key, span.clone(), &format!("{text:?}: {e}")),
            }
        }
        nets
    }

    /// Addresses to listen on; an empty list only when `may_be_empty`.
    fn addrs(
        &mut self,
        key: &str,
        raw: Raw<Vec<String>>,
        default: &[&str],
        may_be_empty: bool,
    ) -> Vec<SocketAddr> {
        let Some(raw) = raw else {
            return default
                .iter()
                .map(|a| a.parse().expect("valid default"))
                .collect();
        };
        let span = raw.span();
        let written = raw.into_inner();
        if written.is_empty() && !may_be_empty {
            self.problem(
                key,
                span.clone(),
                "needs at least one address (or a [[listener]] table)",
            );
        }
        written
            .iter()
            .filter_map(|a| match a.parse() {
                Ok(addr) => Some(addr),
                Err(e) => {
                    self.problem(
                        key,
                        span.clone(),
                        &format!(
                            "{a:?}: {e}; write IP:port, e.g. \"127.0.0.1:25\" or \"[::1]:25\""
                        ),
                    );
                    None
                }
            })
            .collect()
    }

    /// Parses `raw` (or `default` when the key is absent) with `parse`,
    /// recording a problem that names the key and its line.
    fn parse<T>(
        &mut self,
        key: &str,
        raw: Raw<Scalar>,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> T {
        if let Some(raw) = raw {
            let text = match raw.get_ref() {
                Scalar::String(s) => Ok(s.clone()),
                Scalar::Integer(i) => Ok(i.to_string()),
                other => Err(format!("{other}: expected a string or a number")),
            };
            match text.and_then(|t| parse(&t).map_err(|e| format!("{t:?}: {e}"))) {
                Ok(value) => return value,
                Err(e) => self.problem(key, raw.span(), &e),
            }
        }
        parse(default).expect("valid default")
    }

    fn problem(&mut self, key: &str, span: Range<usize>, message: &str) {
        self.problem_at(Some(span), format!("{key} = {message}"));
    }

    /// Records `message`, prefixed with `file:line:` (or `file:` without a span).
    fn problem_at(&mut self, span: Option<Range<usize>>, message: String) {
        let origin = self.origin.display();
        match span {
            Some(span) => {
                let line = self.line(&span);
                self.problems
                    .push((Some(line), format!("{origin}:{line}: {message}")));
            }
            None => self.problems.push((None, format!("{origin}: {message}"))),
        }
    }

    /// The 1-based line where `span` starts.
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
}

fn whole(s: &str) -> Result<u32, String> {
    s.parse()
        .map_err(|e| format!("{e}; write a whole number (0 disables)"))
}

fn prefix_len(s: &str, max: u8) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("write a prefix length from 1 to {max}")),
    }
}

fn nonzero_rate(rate: Rate) -> Result<Rate, String> {
    if rate.amount == 0 {
        Err("the amount must be greater than zero".into())
    } else {
        Ok(rate)
    }
}

/// A config from `text` as if read from `m.toml` in `base`, with no DNS:
/// every problem as its line, for the tests of each part of the config.
#[cfg(test)]
pub(crate) fn load_in(text: &str, base: Option<&Path>) -> Result<Config, Vec<String>> {
    let no_dns = |_: &str| -> Result<Vec<SocketAddr>, String> { Err("no DNS here".into()) };
    Config::parse(text, Path::new("m.toml"), base, &no_dns).map_err(|e| match e {
        ConfigError::Invalid { problems, .. } => problems,
        other => vec![other.to_string()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves `mx.test` offline; nothing else.
    fn fake_resolve(text: &str) -> Result<Vec<SocketAddr>, String> {
        match text.rsplit_once(':') {
            Some(("mx.test", port)) => {
                let port: u16 = port.parse().map_err(|_| "bad port".to_string())?;
                Ok(vec![
                    SocketAddr::from(([192, 0, 2, 25], port)),
                    SocketAddr::from(([192, 0, 2, 26], port)),
                ])
            }
            _ => Err("no such host".into()),
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("m.toml"), None, &fake_resolve)
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    /// `to_toml` of a config, parsed again, gives the same `to_toml`.
    fn assert_round_trips(config: &Config) {
        let printed = config.to_toml();
        let again = parse(&printed).unwrap_or_else(|e| panic!("{e}\nin\n{printed}"));
        assert_eq!(again.to_toml(), printed);
    }

    #[test]
    fn shipped_config_is_valid_and_matches_embedded_defaults() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let shipped = Config::parse(
            SHIPPED_CONFIG,
            Path::new("config/mailmoat.toml"),
            Some(&root.join("config")),
            &addr::system_resolve,
        )
        .unwrap();
        let defaults = Config::parse(
            "",
            Path::new("<defaults>"),
            Some(root),
            &addr::system_resolve,
        )
        .unwrap();
        assert_eq!(shipped.to_toml(), defaults.to_toml());
    }

    /// Review of issue 9: `state_sweep = "0"` panicked the sweep timer at
    /// every restart (per-IP state then filled and rate limits failed
    /// open), and a zero API interval polled in a tight loop.
    #[test]
    fn periods_of_zero_are_config_errors() {
        let text = "[server]\nstate_sweep = \"0\"\n[blocklist.api]\nurl = \"https://x.test/l\"\ninterval = \"0s\"\ntimeout = \"10ms\"\n";
        let err = Config::from_toml(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        for key in [
            "m.toml:2: server.state_sweep",
            "m.toml:5: blocklist.api.interval",
            "m.toml:6: blocklist.api.timeout",
        ] {
            assert!(err.contains(key), "{key} not in {err}");
        }
        assert!(err.contains("must be at least 100ms"), "{err}");
    }

    #[test]
    fn every_bad_value_is_reported_with_key_and_line() {
        let text = "[timeouts]\nidle = \"3x\"\nsession = \"forever\"\n";
        let err = Config::from_toml(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.toml:2: timeouts.idle"), "{err}");
        assert!(err.contains("m.toml:3: timeouts.session"), "{err}");
    }

    #[test]
    fn durations_that_cannot_be_added_to_now_are_config_errors() {
        let text = "[timeouts]\nidle = \"1000000000years\"\n[autoban]\nwindow = \"18446744073709551615s\"\n";
        let err = Config::from_toml(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.toml:2: timeouts.idle"), "{err}");
        assert!(err.contains("m.toml:4: autoban.window"), "{err}");
        assert!(err.contains("maximum of 100years"), "{err}");
    }

    #[test]
    fn a_ban_ttl_beyond_max_ttl_is_a_config_error() {
        let text = "[autoban]\nmax_ttl = \"1d\"\nttl = \"2d\"\n";
        let err = Config::from_toml(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.toml:3: autoban.ttl"), "{err}");
        assert!(err.contains("autoban.max_ttl"), "{err}");
        let err = Config::from_toml("[autoban]\nmax_ttl = \"10m\"\n", Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("autoban.ttl (default)"), "{err}");
        for bad in ["min_prefix_v4 = 0", "min_prefix_v6 = 129", "max_bans = 0"] {
            let text = format!("[autoban]\n{bad}\n");
            let err = Config::from_toml(&text, Path::new("m.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("m.toml:2: autoban."), "{bad}: {err}");
        }
    }

    #[test]
    fn misspelled_key_is_named() {
        let err = Config::from_toml("[timeouts]\nidel = \"3s\"\n", Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.toml:2: timeouts.idel: unknown key"),
            "{err}"
        );
    }

    /// Regression: serde stopped at the first unknown key or wrong type, so
    /// an operator fixed a file one error per run.
    #[test]
    fn unknown_keys_wrong_types_and_bad_values_are_all_reported_once_in_file_order() {
        let text = "[server]\nlisten = [\"127.0.0.1:2525\"]\nshadow = \"yes\"\nlisen = 1\n\
                    [limits]\nmax_message_size = 0\n[nonsense]\nx = 1\n\
                    [timeouts]\nidle = \"3x\"\nidel = \"1s\"\n";
        assert_eq!(
            problems(text),
            [
                "m.toml:3: server.shadow: invalid type: string \"yes\", expected a boolean",
                "m.toml:4: server.lisen: unknown key `lisen`, expected one of `listen`, \
                 `hostname`, `shutdown_grace`, `max_connections`, `trusted_proxies`, `shadow`, \
                 `max_tracked_ips`, `state_sweep`",
                "m.toml:6: limits.max_message_size = \"0\": must be greater than zero",
                "m.toml:7: nonsense: unknown key `nonsense`, expected one of `server`, \
                 `listener`, `tls`, `upstream`, `upstreams`, `limits`, `timeouts`, \
                 `blocklist`, `autoban`, `mailbox`, `admin`, `log`, `fleet`",
                "m.toml:10: timeouts.idle = \"3x\": unknown time unit \"x\", supported units: \
                 ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few \
                 variations); write a duration such as \"500ms\", \"30s\" or \"10m\"",
                "m.toml:11: timeouts.idel: unknown key `idel`, expected one of `greet_pause`, \
                 `greet_pass_ttl`, `proxy_header`, `idle`, `command_line`, `data_min_rate`, \
                 `session`, `write`",
            ]
        );
    }

    #[test]
    fn syntax_errors_are_reported_with_their_line_and_the_rest_still_checked() {
        let text = "[timeouts]\nidle = \"3x\"\nsession = \n[server]\nshadow = maybe\n";
        let found = problems(text);
        assert!(
            found[0].starts_with("m.toml:2: timeouts.idle = \"3x\""),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| p.starts_with("m.toml:3: ")),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| p.starts_with("m.toml:5: ")),
            "{found:?}"
        );
    }

    /// Regression: the header said "N problems" once; the message carried
    /// its cause again (printed twice by `{e:#}`).
    #[test]
    fn a_config_error_is_said_once() {
        let err = parse("[timeouts\n").unwrap_err();
        assert!(std::error::Error::source(&err).is_none());
        let text = err.to_string();
        assert_eq!(text.matches("unclosed table").count(), 1, "{text}");
        assert!(
            text.starts_with("m.toml: 1 problem in the config:\nm.toml:1: "),
            "{text}"
        );
    }

    /// Regression: `data_min_rate = 1024` was printed, which does not load
    /// ("missing '/'").
    #[test]
    fn effective_defaults_load_back_unchanged() {
        let defaults = Config::default();
        assert!(defaults.to_toml().contains("data_min_rate = \"1KiB/s\""));
        assert_round_trips(&defaults);
    }

    #[test]
    fn effective_config_with_every_key_set_loads_back_unchanged() {
        let text = r#"
            [server]
            listen = ["0.0.0.0:25", "[::]:25"]
            hostname = "mx.example.net"
            shutdown_grace = "5s"
            max_connections = 500
            trusted_proxies = ["10.0.0.0/8", "2001:db8::1"]
            shadow = true
            max_tracked_ips = 5000
            state_sweep = "1m"
            [[listener]]
            address = "0.0.0.0:587"
            protocol = "smtp"
            tls = "starttls"
            require_tls = true
            upstream = "submission"
            [[listener]]
            address = "[::]:465"
            tls = "implicit"
            [[listener]]
            address = "127.0.0.1:2526"
            tls = "passthrough"
            [tls]
            certificate = "/etc/mailmoat/mx.pem"
            key = "/etc/mailmoat/mx.key"
            handshake_timeout = "3s"
            max_handshakes = 17
            [[tls.sni]]
            names = ["mail.example.org", "smtp.example.org"]
            certificate = "/etc/mailmoat/org.pem"
            key = "/etc/mailmoat/org.key"
            [upstream]
            servers = ["mx.test:10025", "192.0.2.9:25", "[2001:db8::25]:25"]
            connect_timeout = "1500ms"
            proxy_protocol = "v1"
            tls = "starttls"
            ca_file = "/etc/mailmoat/receiver-ca.pem"
            pin_sha256 = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"
            server_name = "mx.internal"
            [upstreams.submission]
            servers = ["192.0.2.9:10587"]
            connect_timeout = "2s"
            proxy_protocol = "off"
            ca_file = "/etc/mailmoat/submission-ca.pem"
            pin_sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            server_name = "submission.internal"
            [limits]
            per_ip_connections = 3
            per_prefix_connections = 7
            ipv4_prefix = 16
            ipv6_prefix = 48
            connection_rate = "5/s"
            connection_burst = 2
            message_rate = "10/hour"
            message_burst = 3
            recipient_rate = "100/1h 30m"
            recipient_burst = 9
            recipients_per_message = 20
            max_message_size = 1000000
            max_line_length = "4KiB"
            [timeouts]
            greet_pause = "6s"
            greet_pass_ttl = "2h"
            proxy_header = "2s"
            idle = "45s"
            command_line = "20s"
            data_min_rate = "1KiB/10s"
            session = "20m"
            write = "15s"
            [blocklist]
            files = ["/etc/mailmoat/block.txt", "/etc/mailmoat/more.txt"]
            allowlist_files = ["/etc/mailmoat/allow.txt"]
            action = "tarpit"
            kill_on_block = false
            tarpit_max = 7
            tarpit_time = "3s"
            max_entries_per_source = 500000
            [blocklist.api]
            url = "https://blocklist.example.net/v1/list"
            interval = "30s"
            timeout = "4s"
            token_file = "/etc/mailmoat/api-token"
            cache = "/var/cache/mailmoat/api.txt"
            [autoban]
            ttl = "2h"
            state = "/var/lib/mailmoat/bans.txt"
            early_talker = 2
            auth_failures = 0
            limit_violations = 5
            protocol_errors = 3
            window = "5m"
            max_ttl = "30days"
            max_bans = 5000
            min_prefix_v4 = 20
            min_prefix_v6 = 40
            [mailbox]
            preauth_idle = "10s"
            preauth_commands = 5
            max_literal = "2KiB"
            authenticated_idle = "40m"
            session = "2h"
            account_failures = 4
            account_window = "30m"
            account_delay = "1s"
            account_delay_max = "9s"
            max_tracked_accounts = 777
            [admin]
            listen = ""
            token_file = "/etc/mailmoat/admin-token"
            [log]
            format = "json"
            level = "mailmoat=debug"
            [fleet]
            url = "rediss://redis.internal:6380/2"
            password_file = "/etc/mailmoat/redis-password"
            ca_file = "/etc/mailmoat/redis-ca.pem"
            key_prefix = "mx-eu:"
            node = "mx1.eu"
            nodes = 5
            shared_rates = ["message_rate", "connection_rate"]
            timeout = "100ms"
            connect_timeout = "2s"
            breaker_failures = 5
            breaker_cooldown = "10s"
            heartbeat = "2s"
            resync = "1m"
        "#;
        let config = parse(text).unwrap();
        let printed = config.to_toml();
        let defaults = Config::default().to_toml();
        // Every key differs from its default, so each is printed and checked.
        for line in printed.lines().filter(|l| l.contains(" = ")) {
            assert!(!defaults.lines().any(|d| d == line), "{line} is a default");
        }
        let table: toml::Table = printed.parse().unwrap();
        assert_eq!(
            table["upstream"]["servers"],
            toml::Value::from(vec!["mx.test:10025", "192.0.2.9:25", "[2001:db8::25]:25"])
        );
        assert_eq!(table["admin"]["listen"], toml::Value::from(""));
        assert_eq!(
            config.upstream.pin_sha256.as_deref(),
            Some("abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789")
        );
        assert_eq!(config.listeners.len(), 3);
        assert_eq!(config.tls.sni.len(), 1);
        let fleet = config.fleet.as_ref().unwrap();
        assert_eq!(
            fleet.shared_rates,
            [SharedRate::MessageRate, SharedRate::ConnectionRate]
        );
        assert_eq!(
            table["fleet"].as_table().unwrap().len(),
            13,
            "every key printed"
        );
        let submission = &config.upstreams["submission"];
        assert_eq!(submission.tls, UpstreamTls::Starttls, "inherited");
        assert_eq!(
            config.upstream_for(&config.listeners[0]).servers[0].name,
            "192.0.2.9:10587"
        );
        assert_round_trips(&config);
    }

    #[test]
    fn a_fleet_with_defaults_and_no_shared_rate_loads_back_unchanged() {
        let config = parse("[fleet]\nurl = \"redis://127.0.0.1\"\nshared_rates = []\n").unwrap();
        let printed = config.to_toml();
        assert!(printed.contains("\n[fleet]\n"), "{printed}");
        assert!(printed.contains("shared_rates = []\n"), "{printed}");
        assert!(!printed.contains("password_file"), "{printed}");
        assert_round_trips(&config);
    }

    /// Regression: `servers = ["localhost:10025"]` was refused.
    #[test]
    fn upstream_host_names_resolve_at_load_and_print_as_written() {
        let config = parse("[upstream]\nservers = [\"mx.test:10025\"]\n").unwrap();
        let addrs: Vec<String> = config
            .upstream
            .servers
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(addrs, ["192.0.2.25:10025", "192.0.2.26:10025"]);
        assert!(config.to_toml().contains("servers = [\"mx.test:10025\"]"));
        assert_eq!(
            problems("\n[upstream]\nservers = [\"nowhere.test:25\"]\n"),
            ["m.toml:3: upstream.servers = \"nowhere.test:25\": cannot resolve \"nowhere.test\" \
              (no such host); names are resolved when the config is loaded, so fix the name or \
              write the IP"]
        );
    }

    /// Regression: an upstream equal to a listener was accepted, and every
    /// client was relayed back into mailmoat.
    #[test]
    fn an_upstream_that_is_a_listener_is_refused_naming_both_keys() {
        let exact =
            "[server]\nlisten = [\"127.0.0.1:2525\"]\n[upstream]\nservers = [\"127.0.0.1:2525\"]\n";
        let found = problems(exact);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("m.toml:4: upstream.servers = \"127.0.0.1:2525\""),
            "{found:?}"
        );
        assert!(
            found[0].contains("server.listen = \"127.0.0.1:2525\" (line 2)"),
            "{found:?}"
        );

        let wildcard =
            "[server]\nlisten = [\"0.0.0.0:2600\"]\n[upstream]\nservers = [\"127.0.0.1:2600\"]\n";
        assert_eq!(problems(wildcard).len(), 1);
        // The default listener is 127.0.0.1:2525.
        let default_listener = "[upstream]\nservers = [\"127.0.0.1:2525\"]\n";
        assert!(problems(default_listener)[0].contains("the default server.listen"));
        let elsewhere =
            "[server]\nlisten = [\"0.0.0.0:25\"]\n[upstream]\nservers = [\"192.0.2.9:25\"]\n";
        assert!(parse(elsewhere).is_ok());
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_directory() {
        let text = "[blocklist]\nfiles = [\"lists/block.txt\", \"/abs/block.txt\"]\n\
                    allowlist_files = [\"allow.txt\"]\n[blocklist.api]\nurl = \"https://x.test/\"\n\
                    token_file = \"api-token\"\ncache = \"cache.txt\"\n\
                    [autoban]\nstate = \"bans.txt\"\n[admin]\ntoken_file = \"admin-token\"\n";
        let base = Path::new("/etc/mailmoat");
        let config = Config::parse(text, Path::new("m.toml"), Some(base), &fake_resolve).unwrap();
        assert_eq!(
            config.blocklist.files,
            [
                base.join("lists/block.txt"),
                PathBuf::from("/abs/block.txt")
            ]
        );
        assert_eq!(config.blocklist.allowlist_files, [base.join("allow.txt")]);
        let api = config.blocklist.api.as_ref().unwrap();
        assert_eq!(api.token_file.as_deref(), Some(&*base.join("api-token")));
        assert_eq!(api.cache, base.join("cache.txt"));
        assert_eq!(
            config.autoban.state.as_deref(),
            Some(&*base.join("bans.txt"))
        );
        assert_eq!(
            config.admin.token_file.as_deref(),
            Some(&*base.join("admin-token"))
        );
        // Without a file, relative to the current directory, as written.
        let plain = parse(text).unwrap();
        assert_eq!(plain.blocklist.files[0], PathBuf::from("lists/block.txt"));
    }
}
