//! The TOML file as written: every value optional, raw, with its span so a
//! validation error can name the line. Unknown keys are refused here.
//!
//! [`parse`] reports every syntax error, unknown key and wrongly typed value
//! at once: serde stops at the first, so each one found is recorded and its
//! entry removed from the parsed document before deserializing again.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub type Raw<T> = Option<Spanned<T>>;

/// A scalar as written: durations, sizes and counts may be strings (`"30s"`)
/// or bare numbers (`2048`); the validator reads either as text.
pub type Scalar = toml::Value;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerFile,
    /// `[[listener]]`, each table with its span (its header's line).
    pub listener: Vec<Spanned<ListenerFile>>,
    pub tls: TlsFile,
    pub upstream: UpstreamFile,
    /// `[upstreams.NAME]`, in name order.
    pub upstreams: BTreeMap<String, UpstreamFile>,
    pub limits: LimitsFile,
    pub timeouts: TimeoutsFile,
    pub blocklist: BlocklistFile,
    pub autoban: AutobanFile,
    pub mailbox: MailboxFile,
    pub admin: AdminFile,
    pub log: LogFile,
    /// `[fleet]`; absent: this node is on its own.
    pub fleet: Option<Spanned<FleetFile>>,
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
    pub tls: Raw<Scalar>,
    pub ca_file: Raw<String>,
    pub pin_sha256: Raw<String>,
    pub server_name: Raw<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerFile {
    pub address: Raw<String>,
    pub protocol: Raw<Scalar>,
    pub tls: Raw<Scalar>,
    pub require_tls: Raw<bool>,
    pub upstream: Raw<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFile {
    pub certificate: Raw<String>,
    pub key: Raw<String>,
    pub handshake_timeout: Raw<Scalar>,
    pub max_handshakes: Raw<Scalar>,
    pub sni: Vec<Spanned<SniFile>>,
}

/// One `[[tls.sni]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SniFile {
    pub names: Raw<Vec<String>>,
    pub certificate: Raw<String>,
    pub key: Raw<String>,
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
pub struct MailboxFile {
    pub preauth_idle: Raw<Scalar>,
    pub preauth_commands: Raw<Scalar>,
    pub max_literal: Raw<Scalar>,
    pub authenticated_idle: Raw<Scalar>,
    pub session: Raw<Scalar>,
    pub account_failures: Raw<Scalar>,
    pub account_window: Raw<Scalar>,
    pub account_delay: Raw<Scalar>,
    pub account_delay_max: Raw<Scalar>,
    pub max_tracked_accounts: Raw<Scalar>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetFile {
    pub url: Raw<String>,
    pub password_file: Raw<String>,
    pub ca_file: Raw<String>,
    pub key_prefix: Raw<String>,
    pub node: Raw<String>,
    pub nodes: Raw<Scalar>,
    pub shared_rates: Raw<Vec<String>>,
    pub timeout: Raw<Scalar>,
    pub connect_timeout: Raw<Scalar>,
    pub breaker_failures: Raw<Scalar>,
    pub breaker_cooldown: Raw<Scalar>,
    pub heartbeat: Raw<Scalar>,
    pub resync: Raw<Scalar>,
}

/// A problem found in the file: where, and what to say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    pub span: Option<Range<usize>>,
    pub message: String,
}

/// Parses `text`, collecting every problem the structure of the file has;
/// the entries at fault are left out, so the rest can still be validated.
pub fn parse(text: &str) -> (FileConfig, Vec<FileProblem>) {
    let (mut document, syntax) = DeTable::parse_recoverable(text);
    let mut problems: Vec<FileProblem> = syntax
        .iter()
        .map(|e| FileProblem {
            span: e.span(),
            message: e.message().trim_end().to_string(),
        })
        .collect();
    // Each pass removes one entry, so this ends; the bound is belt and braces.
    let passes = count_entries(document.get_ref()) + 1;
    for _ in 0..passes {
        let de = toml::de::Deserializer::from(document.clone());
        let error = match FileConfig::deserialize(de) {
            Ok(raw) => return (raw, problems),
            Err(e) => e,
        };
        let message = error
            .message()
            .trim_end()
            .replacen("unknown field", "unknown key", 1);
        let removed = error
            .span()
            .and_then(|span| remove_entry_at(document.get_mut(), &span, ""));
        match removed {
            Some((key, span)) => problems.push(FileProblem {
                span: Some(span),
                message: format!("{key}: {message}"),
            }),
            None => {
                problems.push(FileProblem {
                    span: error.span(),
                    message,
                });
                break;
            }
        }
    }
    (FileConfig::default(), problems)
}

fn count_entries(table: &DeTable<'_>) -> usize {
    table
        .values()
        .map(|v| match v.get_ref() {
            DeValue::Table(t) => 1 + count_entries(t),
            DeValue::Array(items) => {
                1 + items
                    .iter()
                    .map(|item| match item.get_ref() {
                        DeValue::Table(t) => count_entries(t),
                        _ => 0,
                    })
                    .sum::<usize>()
            }
            _ => 1,
        })
        .sum()
}

/// Removes the innermost `key = value` entry whose key or value holds
/// `span`; returns its dotted path and the span of its key. Tables are
/// searched whatever their own span (a `[header]` table spans its header),
/// and so are the tables of an array (`[[listener]]`), numbered from 1 as
/// the validator names them (`listener[2].tls`).
fn remove_entry_at(
    table: &mut DeTable<'_>,
    span: &Range<usize>,
    prefix: &str,
) -> Option<(String, Range<usize>)> {
    let holds = |outer: Range<usize>| outer.start <= span.start && span.end <= outer.end;
    let mut found = None;
    for (key, value) in table.iter_mut() {
        let path = format!("{prefix}{}", key.get_ref());
        match value.get_mut() {
            DeValue::Table(inner) => {
                if let Some(deeper) = remove_entry_at(inner, span, &format!("{path}.")) {
                    return Some(deeper);
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let DeValue::Table(inner) = item.get_mut() {
                        let prefix = format!("{path}[{}].", i + 1);
                        if let Some(deeper) = remove_entry_at(inner, span, &prefix) {
                            return Some(deeper);
                        }
                    }
                }
            }
            _ => {}
        }
        if holds(key.span()) || holds(value.span()) {
            found = Some((key.clone(), path, key.span()));
            break;
        }
    }
    let (key, path, key_span) = found?;
    table.remove(&key);
    Some((path, key_span))
}
