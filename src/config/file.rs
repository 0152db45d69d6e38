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
    pub admin: AdminFile,
    pub log: LogFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    pub listen: Raw<Vec<String>>,
    pub hostname: Raw<String>,
    pub shutdown_grace: Raw<Scalar>,
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
    pub max_line_length: Raw<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsFile {
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    pub format: Raw<Scalar>,
    pub level: Raw<String>,
}
