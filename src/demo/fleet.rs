//! The demo's fleet act, when `redis-server` is installed: a private Redis
//! on loopback, three nodes sharing it, a client holding a session on one
//! of them, and an operator blocking that client through another node's
//! admin API. How long until every node refuses it, and the held session
//! is closed?

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep, timeout, Instant};

use super::{connect_from, read_reply};
use crate::cli::admin_client::{AdminClient, Method};
use crate::config::Config;
use crate::redis_server::RedisServer;
use crate::Server;

/// The client the operators block on the fleet.
const BLOCKED: Ipv4Addr = Ipv4Addr::new(127, 99, 1, 1);
const NODES: [&str; 3] = ["a", "b", "c"];
/// The node the operator pushes the block to, and the one holding the
/// client's session: another node.
const PUSHED_TO: usize = 0;
const HELD_ON: usize = 2;
/// The claim: every node enforces a block within this.
pub const PROMISE: Duration = Duration::from_secs(1);
/// How long anything in the act is waited for.
const LIMIT: Duration = Duration::from_secs(5);
const TOKEN: &str = "demo-fleet-token";

/// What the act showed.
pub enum FleetAct {
    /// Not played, and why (no `redis-server`).
    Skipped(String),
    /// Played; `None` where the thing never happened within `LIMIT`.
    Played {
        redis: SocketAddr,
        /// Per node, from the push to its first refusal of a new connection.
        refused: [Option<Duration>; 3],
        /// From the push to the close of the session held on `HELD_ON`.
        closed: Option<Duration>,
    },
    /// It could not be set up (Redis or a node would not start, the nodes
    /// never joined, the push was refused).
    Failed(String),
}

/// Plays the act, relaying to `sink`, its files under `dir`.
pub async fn play(dir: &Path, sink: SocketAddr) -> FleetAct {
    if RedisServer::binary().is_none() {
        return FleetAct::Skipped(
            "redis-server is not on PATH (Debian: apt-get install redis-server)".into(),
        );
    }
    match setup_and_push(dir, sink).await {
        Ok(act) => act,
        Err(e) => FleetAct::Failed(format!("{e:#}")),
    }
}

/// A running node: its SMTP address, its admin client, its stop.
struct Node {
    addr: SocketAddr,
    admin: Arc<AdminClient>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn setup_and_push(dir: &Path, sink: SocketAddr) -> anyhow::Result<FleetAct> {
    let mut redis = RedisServer::start()
        .await
        .context("starting a private redis-server")?;
    let dir = dir.join("fleet");
    std::fs::create_dir_all(&dir).context("creating the fleet act's dir")?;
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).context("writing the admin token")?;
    let mut nodes = Vec::new();
    for name in NODES {
        nodes.push(start_node(name, &redis, &dir, &token, sink).await?);
    }
    let act = push(&redis, &nodes).await;
    for node in nodes {
        let _ = node.stop.send(());
        let _ = timeout(LIMIT, node.task).await;
    }
    redis.kill().await;
    act
}

async fn start_node(
    name: &str,
    redis: &RedisServer,
    dir: &Path,
    token: &Path,
    sink: SocketAddr,
) -> anyhow::Result<Node> {
    let toml = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
shutdown_grace = "1s"
[upstream]
servers = ["{sink}"]
[autoban]
state = "{state}"
[admin]
listen = "127.0.0.1:0"
token_file = "{token}"
[log]
level = "error"
[fleet]
url = "{url}"
node = "{name}"
nodes = 3
heartbeat = "200ms"
"#,
        state = dir.join(format!("{name}.state")).display(),
        token = token.display(),
        url = redis.url(),
    );
    let mut config = Config::from_toml(&toml, Path::new("<demo fleet>"))?;
    let server = Server::bind(config.clone())
        .await
        .with_context(|| format!("starting node {name}"))?;
    let addr = server.listen_addrs()[0];
    config.admin.listen = server.admin_addr();
    let admin = Arc::new(AdminClient::new(&config).context("the node has no admin listener")?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Ok(Node {
        addr,
        admin,
        stop,
        task,
    })
}

/// Waits for the nodes to hear each other, holds a session on one, pushes
/// the block to another, and times each node's enforcement.
async fn push(redis: &RedisServer, nodes: &[Node]) -> anyhow::Result<FleetAct> {
    for node in nodes {
        wait_joined(&node.admin).await?;
    }
    let mut held = connect_from(BLOCKED, nodes[HELD_ON].addr)
        .await
        .context("the blocked client connecting")?;
    anyhow::ensure!(
        read_reply(&mut held).await.starts_with("220"),
        "the client was not greeted before the block"
    );
    held.write_all(b"EHLO held.example\r\n").await?;
    read_reply(&mut held).await;

    let pushed = Instant::now();
    let reply = admin_call(
        &nodes[PUSHED_TO].admin,
        Method::Post,
        vec![("ip".into(), BLOCKED.to_string())],
    )
    .await?;
    anyhow::ensure!(
        reply.0 == 200,
        "POST /admin/bans answered {}: {}",
        reply.0,
        reply.1.trim()
    );
    let closed = async {
        let mut rest = [0u8; 256];
        let ended = timeout(LIMIT, async {
            while let Ok(n) = held.read(&mut rest).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        ended.is_ok().then(|| pushed.elapsed())
    };
    let (closed, a, b, c) = tokio::join!(
        closed,
        refused_after(nodes[0].addr, pushed),
        refused_after(nodes[1].addr, pushed),
        refused_after(nodes[2].addr, pushed),
    );
    Ok(FleetAct::Played {
        redis: redis.addr(),
        refused: [a, b, c],
        closed,
    })
}

/// Polls new connections from the blocked client until `addr` refuses one.
async fn refused_after(addr: SocketAddr, pushed: Instant) -> Option<Duration> {
    while pushed.elapsed() < LIMIT {
        if let Ok(mut stream) = connect_from(BLOCKED, addr).await {
            if read_reply(&mut stream).await.starts_with("554") {
                return Some(pushed.elapsed());
            }
        }
        sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until the node has Redis and hears all three.
async fn wait_joined(admin: &Arc<AdminClient>) -> anyhow::Result<()> {
    let deadline = Instant::now() + LIMIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok((200, body)) = admin_get(admin, "/admin/fleet").await {
            if let Ok(view) = serde_json::from_str::<serde_json::Value>(&body) {
                if view["store"] == "up" && view["live_nodes"].as_u64() == Some(3) {
                    return Ok(());
                }
            }
            last = body;
        }
        sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "the nodes never joined through Redis within {LIMIT:?} (/admin/fleet at {}: {})",
        admin.addr(),
        last.trim()
    )
}

async fn admin_get(admin: &Arc<AdminClient>, path: &'static str) -> anyhow::Result<(u16, String)> {
    let admin = Arc::clone(admin);
    let reply = tokio::task::spawn_blocking(move || admin.call(Method::Get, path, &[], None))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((reply.status, reply.body))
}

/// `/admin/bans` with `query` and the token, off the runtime (the admin
/// client blocks).
async fn admin_call(
    admin: &Arc<AdminClient>,
    method: Method,
    query: Vec<(String, String)>,
) -> anyhow::Result<(u16, String)> {
    let admin = Arc::clone(admin);
    let reply = tokio::task::spawn_blocking(move || {
        let query: Vec<(&str, &str)> = query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        admin.call(method, "/admin/bans", &query, Some(TOKEN))
    })
    .await?
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((reply.status, reply.body))
}

/// The act's line in the report.
pub fn report(act: &FleetAct) -> String {
    let ms = |d: &Option<Duration>| {
        d.map_or(format!("not within {}s", LIMIT.as_secs()), |d| {
            format!("{} ms", d.as_millis())
        })
    };
    match act {
        FleetAct::Skipped(why) => format!("  fleet:             skipped: {why}"),
        FleetAct::Failed(why) => format!("  fleet:             could not be played: {why}"),
        FleetAct::Played {
            redis,
            refused,
            closed,
        } => {
            let nodes = NODES
                .iter()
                .zip(refused)
                .map(|(name, d)| format!("{name} after {}", ms(d)))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "  fleet:             3 nodes sharing redis-server on {redis}: a block pushed to node {} (POST /admin/bans) refused by {nodes}; the session held on {} closed after {}",
                NODES[PUSHED_TO],
                NODES[HELD_ON],
                ms(closed),
            )
        }
    }
}

/// The act's headline, checked: every node refuses the pushed block, and
/// the held session is closed, within [`PROMISE`]. A skipped act claims
/// nothing.
pub fn failed_claims(act: &FleetAct) -> Vec<String> {
    match act {
        FleetAct::Skipped(_) => Vec::new(),
        FleetAct::Failed(why) => vec![format!("the fleet act could not be played: {why}")],
        FleetAct::Played {
            refused, closed, ..
        } => {
            let late: Vec<String> = NODES
                .iter()
                .zip(refused)
                .filter(|(_, d)| d.is_none_or(|d| d > PROMISE))
                .map(|(name, _)| (*name).to_string())
                .collect();
            let mut failed = Vec::new();
            if !late.is_empty() {
                failed.push(format!(
                    "the block pushed to one node was not enforced within {}s by node(s) {}",
                    PROMISE.as_secs(),
                    late.join(", ")
                ));
            }
            if closed.is_none_or(|d| d > PROMISE) {
                failed.push(format!(
                    "the session held on node {} was not closed within {}s of the block",
                    NODES[HELD_ON],
                    PROMISE.as_secs()
                ));
            }
            failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_claim_holds_only_when_every_node_enforces_in_time() {
        let ms = |n| Some(Duration::from_millis(n));
        let played = |refused, closed| FleetAct::Played {
            redis: "127.0.0.1:6379".parse().unwrap(),
            refused,
            closed,
        };
        assert!(failed_claims(&played([ms(2), ms(150), ms(200)], ms(190))).is_empty());
        assert!(failed_claims(&FleetAct::Skipped("no redis-server".into())).is_empty());

        let failed = failed_claims(&played([ms(2), None, ms(1500)], ms(190)));
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains("node(s) b, c"), "{failed:?}");
        let failed = failed_claims(&played([ms(2), ms(150), ms(200)], None));
        assert!(failed[0].contains("not closed"), "{failed:?}");
        assert_eq!(failed_claims(&FleetAct::Failed("no PONG".into())).len(), 1);
    }
}
