//! The TOML file as written: every value optional, raw, with its span so a
//! validation error can name the line. Unknown keys are refused here.

use serde::Deserialize;
use toml::Spanned;

pub type Raw<T> = Option<Spanned<T>>;

/// A scalar as written: durations, sizes and counts may be strings (`"30s"`)
/// or bare numbers (`2048`); the validator reads either as text.
pub type Scalar = toml::Value;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerFile,
    pub upstream: UpstreamFile,
    pub limits: LimitsFile,
    pub timeouts: TimeoutsFile,
    pub blocklist: BlocklistFile,
    pub autoban: AutobanFile,
    pub admin: AdminFile,
    pub log: LogFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    pub listen: Raw<Vec<String>>,
    pub hostname: Raw<String>,
    pub shutdown_grace: Raw<Scalar>,
    pub max_connections: Raw<Scalar>,
    pub trusted_proxies: Raw<Vec<String>>,
    pub shadow: Raw<bool>,
    pub max_tracked_ips: Raw<Scalar>,
    pub state_sweep: Raw<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamFile {
    pub servers: Raw<Vec<String>>,
    pub connect_timeout: Raw<Scalar>,
    pub proxy_protocol: Raw<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    pub per_ip_connections: Raw<Scalar>,
    pub per_prefix_connections: Raw<Scalar>,
    pub ipv4_prefix: Raw<Scalar>,
    pub ipv6_prefix: Raw<Scalar>,
    pub connection_rate: Raw<Scalar>,
    pub connection_burst: Raw<Scalar>,
    pub message_rate: Raw<Scalar>,
    pub message_burst: Raw<Scalar>,
    pub recipient_rate: Raw<Scalar>,
    pub recipient_burst: Raw<Scalar>,
    pub recipients_per_message: Raw<Scalar>,
    pub max_message_size: Raw<Scalar>,
    pub max_line_length: Raw<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsFile {
    pub greet_pause: Raw<Scalar>,
    pub greet_pass_ttl: Raw<Scalar>,
    pub proxy_header: Raw<Scalar>,
    pub idle: Raw<Scalar>,
    pub command_line: Raw<Scalar>,
    pub data_min_rate: Raw<Scalar>,
    pub session: Raw<Scalar>,
    pub write: Raw<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    pub listen: Raw<Scalar>,
    pub token_file: Raw<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutobanFile {
    pub ttl: Raw<Scalar>,
    pub state: Raw<String>,
    pub early_talker: Raw<Scalar>,
    pub auth_failures: Raw<Scalar>,
    pub limit_violations: Raw<Scalar>,
    pub protocol_errors: Raw<Scalar>,
    pub window: Raw<Scalar>,
    pub max_ttl: Raw<Scalar>,
    pub max_bans: Raw<Scalar>,
    pub min_prefix_v4: Raw<Scalar>,
    pub min_prefix_v6: Raw<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    pub format: Raw<Scalar>,
    pub level: Raw<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlocklistFile {
    pub files: Raw<Vec<String>>,
    pub allowlist_files: Raw<Vec<String>>,
    pub action: Raw<Scalar>,
    pub kill_on_block: Raw<bool>,
    pub tarpit_max: Raw<Scalar>,
    pub tarpit_time: Raw<Scalar>,
    pub max_entries_per_source: Raw<Scalar>,
    pub api: Option<ApiFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiFile {
    pub url: Raw<String>,
    pub interval: Raw<Scalar>,
    pub timeout: Raw<Scalar>,
    pub token_file: Raw<String>,
    pub cache: Raw<String>,
}
