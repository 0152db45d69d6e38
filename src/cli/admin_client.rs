//! A blocking client for the running proxy's admin API, at `admin.listen`
//! from the same config, with short deadlines so a hung proxy cannot hang
//! the command.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use crate::config::Config;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(10);
/// A ban export of a large brute force runs to megabytes; bounded anyway.
const MAX_BODY: u64 = 64 * 1024 * 1024;

pub struct AdminClient {
    agent: ureq::Agent,
    addr: SocketAddr,
}

/// Why a call gave no answer.
#[derive(Debug)]
pub enum CallError {
    /// Nothing answered at the address: the proxy is not running there.
    Unreachable(String),
    /// The proxy answered, but not with what was asked.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(e) | CallError::Failed(e) => f.write_str(e),
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub body: String,
}

pub enum Method {
    Get,
    Post,
    Delete,
}

impl AdminClient {
    /// A client for `config`'s admin listener; `None` when it is disabled.
    pub fn new(config: &Config) -> Option<AdminClient> {
        let listen = config.admin.listen?;
        // A wildcard listener is reached on loopback.
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            // The admin listener is local: never through an HTTP_PROXY.
            .proxy(None)
            .max_redirects(0)
            .build()
            .into();
        Some(AdminClient {
            agent,
            addr: SocketAddr::new(ip, listen.port()),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One request to `path` with `query`, with the bearer `token` if given.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        token: Option<&str>,
    ) -> Result<Reply, CallError> {
        let url = format!("http://{}{path}", self.addr);
        let auth = token.map(|t| format!("Bearer {t}"));
        let result = match method {
            Method::Get => {
                let mut request = self.agent.get(&url).query_pairs(query.iter().copied());
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call()
            }
            Method::Delete => {
                let mut request = self.agent.delete(&url).query_pairs(query.iter().copied());
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call()
            }
            Method::Post => {
                let mut request = self.agent.post(&url).query_pairs(query.iter().copied());
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.send_empty()
            }
        };
        let mut response = result.map_err(|e| match e {
            ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_) => CallError::Unreachable(format!(
                "the admin API at {} does not answer ({e})",
                self.addr
            )),
            e => CallError::Failed(format!("admin API at {}: {e}", self.addr)),
        })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| {
                CallError::Failed(format!(
                    "admin API at {}: reading the answer: {e}",
                    self.addr
                ))
            })?;
        Ok(Reply { status, body })
    }
}

/// The bearer token in `admin.token_file`, which ban changes need.
pub fn token(config: &Config) -> Result<String, String> {
    let path: &Path = config.admin.token_file.as_deref().ok_or(
        "admin.token_file is not set: the proxy refuses ban changes without a token; set it in the config and restart mailmoat",
    )?;
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read admin.token_file {}: {e}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("admin.token_file {} is empty", path.display()));
    }
    Ok(token.to_string())
}
