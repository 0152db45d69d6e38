//! `mailmoat.toml` → validated [`Config`].
//!
//! Two layers, as ripgrep's low/high args: [`file`] mirrors the TOML file
//! with raw strings and their spans; [`Config::from_toml`] turns that into
//! typed values (`Duration`, `SocketAddr`, byte counts) and collects *every*
//! invalid value before failing, each error naming its file, line and key.
//! Running code only ever sees a validated `Config`.

mod file;
pub mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use file::{FileConfig, Raw, Scalar};
pub use units::Rate;

/// The file shipped in `config/mailmoat.toml`, with every key documented.
pub const SHIPPED_CONFIG: &str = include_str!("../../config/mailmoat.toml");

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub blocklist: BlocklistSettings,
    pub autoban: AutobanSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub hostname: String,
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub shadow: bool,
    pub max_tracked_ips: usize,
    #[serde(serialize_with = "ser_duration")]
    pub state_sweep: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct UpstreamSettings {
    pub servers: Vec<SocketAddr>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    pub proxy_protocol: ProxyProtocol,
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
    pub max_message_size: u64,
    pub max_line_length: usize,
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
    pub data_min_rate: u64,
    #[serde(serialize_with = "ser_duration")]
    pub session: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub write: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct AdminSettings {
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

/// Every problem found in a config file, one per line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given with -c")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Syntax {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{}", .problems.join("\n"))]
    Invalid { problems: Vec<String> },
}

impl Default for Config {
    /// The embedded defaults: strict limits, loopback-only listeners.
    fn default() -> Self {
        Config::from_toml("", Path::new("<defaults>")).expect("embedded defaults are valid")
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates; `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let raw: FileConfig = toml::from_str(text).map_err(|source| ConfigError::Syntax {
            path: origin.to_owned(),
            source: Box::new(source),
        })?;
        let mut v = Validator {
            text,
            origin,
            problems: Vec::new(),
        };
        let config = v.config(raw);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                problems: v.problems,
            })
        }
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
    problems: Vec<String>,
}

impl Validator<'_> {
    fn config(&mut self, raw: FileConfig) -> Config {
        let ttl_span = raw.autoban.ttl.as_ref().map(|t| t.span());
        let s = raw.server;
        let u = raw.upstream;
        let l = raw.limits;
        let t = raw.timeouts;
        let config = Config {
            server: ServerSettings {
                listen: self.addrs("server.listen", s.listen, &["127.0.0.1:2525"]),
                hostname: s
                    .hostname
                    .map_or_else(|| "localhost".into(), |h| h.into_inner()),
                shutdown_grace: self.duration("server.shutdown_grace", s.shutdown_grace, "30s"),
                max_connections: self.count("server.max_connections", s.max_connections, "10000"),
                trusted_proxies: self.nets("server.trusted_proxies", s.trusted_proxies),
                shadow: s.shadow.is_some_and(|b| b.into_inner()),
                max_tracked_ips: self.count("server.max_tracked_ips", s.max_tracked_ips, "1000000"),
                state_sweep: self.duration("server.state_sweep", s.state_sweep, "10s"),
            },
            upstream: UpstreamSettings {
                servers: self.addrs("upstream.servers", u.servers, &["127.0.0.1:25"]),
                connect_timeout: self.duration("upstream.connect_timeout", u.connect_timeout, "5s"),
                proxy_protocol: self.parse(
                    "upstream.proxy_protocol",
                    u.proxy_protocol,
                    "off",
                    |s| match s {
                        "off" => Ok(ProxyProtocol::Off),
                        "v1" => Ok(ProxyProtocol::V1),
                        "v2" => Ok(ProxyProtocol::V2),
                        _ => Err("expected \"off\", \"v1\" or \"v2\"".into()),
                    },
                ),
            },
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
                state: raw
                    .autoban
                    .state
                    .map(|p| PathBuf::from(p.into_inner()))
                    .filter(|p| !p.as_os_str().is_empty()),
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
            admin: AdminSettings {
                token_file: raw
                    .admin
                    .token_file
                    .map(|p| PathBuf::from(p.into_inner()))
                    .filter(|p| !p.as_os_str().is_empty()),
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
            None => self.problems.push(format!(
                "{}: autoban.ttl (default) = {message}",
                self.origin.display()
            )),
        }
    }

    fn duration(&mut self, key: &str, raw: Raw<Scalar>, default: &str) -> Duration {
        self.parse(key, raw, default, units::parse_duration)
    }

    fn size(&mut self, key: &str, raw: Raw<Scalar>, default: &str) -> u64 {
        let value = self.parse(key, raw, default, units::parse_size);
        if value == 0 {
            self.problems.push(format!(
                "{}: {key} must be greater than zero",
                self.origin.display()
            ));
        }
        value
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
                self.problems.push(format!(
                    "{}: [blocklist.api] needs url = \"https://…\" (or remove the section)",
                    self.origin.display()
                ));
                String::new()
            }
        };
        ApiSettings {
            url,
            interval: self.duration("blocklist.api.interval", api.interval, "10s"),
            timeout: self.duration("blocklist.api.timeout", api.timeout, "10s"),
            token_file: api.token_file.map(|t| PathBuf::from(t.into_inner())),
            cache: api.cache.map_or_else(
                || PathBuf::from("/var/lib/mailmoat/api-cache.txt"),
                |c| PathBuf::from(c.into_inner()),
            ),
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
            Some(raw) => raw.into_inner().into_iter().map(PathBuf::from).collect(),
            None => default.iter().map(PathBuf::from).collect(),
        }
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

    fn addrs(&mut self, key: &str, raw: Raw<Vec<String>>, default: &[&str]) -> Vec<SocketAddr> {
        let Some(raw) = raw else {
            return default
                .iter()
                .map(|a| a.parse().expect("valid default"))
                .collect();
        };
        let span = raw.span();
        let addrs: Vec<SocketAddr> = raw
            .into_inner()
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
            .collect();
        if addrs.is_empty() {
            self.problem(key, span, "needs at least one address");
        }
        addrs
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

    fn problem(&mut self, key: &str, span: std::ops::Range<usize>, message: &str) {
        let line = self.text[..span.start.min(self.text.len())]
            .matches('\n')
            .count()
            + 1;
        self.problems.push(format!(
            "{}:{line}: {key} = {message}",
            self.origin.display()
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_is_valid_and_matches_embedded_defaults() {
        let shipped = Config::from_toml(SHIPPED_CONFIG, Path::new("config/mailmoat.toml")).unwrap();
        assert_eq!(shipped.to_toml(), Config::default().to_toml());
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
        assert!(err.contains("idel"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }
}
