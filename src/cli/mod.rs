//! The operator's commands besides `run`: `mailmoat lookup IP` and
//! `mailmoat bans list|add|remove`. They ask the running proxy through its
//! admin API (`admin.listen` in the same config, the bearer token from
//! `admin.token_file` for changes). When nothing answers there, questions
//! are answered offline from the files on disk, and the output says which.
//!
//! Exit status, for scripts: 0 not blocked / done, 1 blocked, 2 error
//! (bad arguments, a refused request, or no answer at all).

// The demo pushes its fleet block through it, as an operator would.
pub(crate) mod admin_client;
mod offline;

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use admin_client::{AdminClient, CallError, Method};

use crate::config::Config;
use crate::lookup::Lookup;

/// How a command ends; the discriminant is the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Not blocked (lookup); done (bans).
    Clear = 0,
    /// Blocked (lookup).
    Blocked = 1,
    /// No answer: bad arguments, a refused request, nothing to read.
    Error = 2,
}

impl From<Status> for ExitCode {
    fn from(status: Status) -> ExitCode {
        ExitCode::from(status as u8)
    }
}

/// Where an answer came from.
enum Mode {
    Live,
    Offline,
}

/// `mailmoat lookup IP`: the running proxy's verdict, else the offline one.
pub fn lookup(config: &Config, ip: IpAddr, offline: bool) -> Status {
    if !offline {
        match live_lookup(config, ip) {
            Ok(answer) => return print_lookup(&answer, Mode::Live, config),
            Err(CallError::Unreachable(why)) => {
                eprintln!("mailmoat: {why}; answering offline from the files on disk");
            }
            Err(CallError::Failed(e)) => {
                eprintln!("mailmoat: {e}");
                return Status::Error;
            }
        }
    }
    let data = offline::load(config);
    if data.read.is_empty() {
        eprintln!(
            "mailmoat: no offline data: none of the blocklist files, the API cache or \
             autoban.state in the config can be read"
        );
        return Status::Error;
    }
    print_lookup(&Lookup::new(&data.lists, ip, None), Mode::Offline, config)
}

fn live_lookup(config: &Config, ip: IpAddr) -> Result<Lookup, CallError> {
    let client = AdminClient::new(config)
        .ok_or_else(|| CallError::Unreachable("admin.listen is disabled".into()))?;
    let ip = ip.to_string();
    let reply = client.call(
        Method::Get,
        "/admin/lookup",
        &[("ip", &ip), ("format", "json")],
        None,
    )?;
    if reply.status != 200 {
        return Err(CallError::Failed(format!(
            "admin API at {}: HTTP {}: {}",
            client.addr(),
            reply.status,
            reply.body.trim()
        )));
    }
    serde_json::from_str(&reply.body).map_err(|e| {
        CallError::Failed(format!(
            "admin API at {}: unexpected lookup answer ({e}); is it a mailmoat of the same version?",
            client.addr()
        ))
    })
}

fn print_lookup(answer: &Lookup, mode: Mode, config: &Config) -> Status {
    print!("{}", answer.to_text());
    match (mode, config.admin.listen) {
        (Mode::Live, Some(admin)) => println!("  (live: the running proxy, admin API {admin})"),
        (Mode::Live, None) => println!("  (live: the running proxy)"),
        (Mode::Offline, _) => println!("  (offline: the lists and bans on disk)"),
    }
    if answer.is_blocked() {
        Status::Blocked
    } else {
        Status::Clear
    }
}

/// `mailmoat bans list`: the bans in force, in the blocklist text format.
pub fn list_bans(config: &Config, offline: bool) -> Status {
    if !offline {
        match live_bans(config) {
            Ok((admin, export)) => {
                println!("# live: the running proxy, admin API {admin}");
                print!("{export}");
                return Status::Clear;
            }
            Err(CallError::Unreachable(why)) => {
                eprintln!("mailmoat: {why}; listing the bans persisted on disk");
            }
            Err(CallError::Failed(e)) => {
                eprintln!("mailmoat: {e}");
                return Status::Error;
            }
        }
    }
    let Some(state) = &config.autoban.state else {
        eprintln!(
            "mailmoat: autoban.state is not set, so bans are not persisted: only the running \
             proxy knows them"
        );
        return Status::Error;
    };
    if let Err(e) = std::fs::File::open(state) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!(
                "mailmoat: cannot read autoban.state {}: {e}",
                state.display()
            );
            return Status::Error;
        }
    }
    println!("# offline: {}", state.display());
    print!("{}", offline::load(config).bans);
    Status::Clear
}

fn live_bans(config: &Config) -> Result<(std::net::SocketAddr, String), CallError> {
    let client = AdminClient::new(config)
        .ok_or_else(|| CallError::Unreachable("admin.listen is disabled".into()))?;
    let reply = client.call(Method::Get, "/admin/bans", &[], None)?;
    if reply.status != 200 {
        return Err(CallError::Failed(format!(
            "admin API at {}: HTTP {}: {}",
            client.addr(),
            reply.status,
            reply.body.trim()
        )));
    }
    Ok((client.addr(), reply.body))
}

/// `mailmoat bans add NET [--ttl]`: bans through the running proxy, which
/// persists the ban and applies it within a fraction of a second.
pub fn add_ban(config: &Config, net: &str, ttl: Option<Duration>) -> Status {
    let ttl = ttl.map(|t| humantime::format_duration(t).to_string());
    let mut query = vec![("ip", net)];
    if let Some(ttl) = &ttl {
        query.push(("ttl", ttl));
    }
    change_ban(config, Method::Post, net, &query)
}

/// `mailmoat bans remove NET`: lifts a ban through the running proxy.
pub fn remove_ban(config: &Config, net: &str) -> Status {
    change_ban(config, Method::Delete, net, &[("ip", net)])
}

fn change_ban(config: &Config, method: Method, net: &str, query: &[(&str, &str)]) -> Status {
    if let Err(e) = crate::blocklist::parse_net(net) {
        eprintln!("mailmoat: {net:?}: {e}");
        return Status::Error;
    }
    let Some(client) = AdminClient::new(config) else {
        eprintln!(
            "mailmoat: admin.listen is disabled: ban changes go through the running proxy's \
             admin API"
        );
        return Status::Error;
    };
    let token = match admin_client::token(config) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("mailmoat: {e}");
            return Status::Error;
        }
    };
    let answer = client.call(method, "/admin/bans", query, Some(&token));
    report_change(
        &client,
        answer,
        "ban changes need the running proxy (mailmoat run)",
    )
}

/// Prints the answer to a change made through the admin API: the body of a
/// 200, else what went wrong, with `when_down` as the hint when the proxy
/// cannot be reached.
fn report_change(
    client: &AdminClient,
    answer: Result<admin_client::Reply, CallError>,
    when_down: &str,
) -> Status {
    match answer {
        Ok(reply) if reply.status == 200 => {
            print!("{}", reply.body);
            Status::Clear
        }
        Ok(reply) => {
            eprintln!(
                "mailmoat: admin API at {}: HTTP {}: {}",
                client.addr(),
                reply.status,
                reply.body.trim_end()
            );
            Status::Error
        }
        Err(CallError::Unreachable(why)) => {
            eprintln!("mailmoat: {why}; {when_down}");
            Status::Error
        }
        Err(CallError::Failed(e)) => {
            eprintln!("mailmoat: {e}");
            Status::Error
        }
    }
}

/// `mailmoat reload`: has the running proxy re-read its config (already
/// validated by the caller, as `check-config` does) through the admin API,
/// and prints whether it took.
pub fn reload(config: &Config) -> Status {
    let Some(client) = AdminClient::new(config) else {
        eprintln!(
            "mailmoat: admin.listen is disabled, so the result cannot be asked for: \
             send SIGHUP instead (systemctl reload mailmoat) and read the log or \
             mailmoat_config_reloads_total"
        );
        return Status::Error;
    };
    let token = match admin_client::token(config) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("mailmoat: {e}; or send SIGHUP (systemctl reload mailmoat)");
            return Status::Error;
        }
    };
    let answer = client.call(Method::Post, "/admin/reload", &[], Some(&token));
    report_change(&client, answer, "is mailmoat running with this config?")
}
