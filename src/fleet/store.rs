//! The fleet's store: one Redis (or Valkey), reached through the `redis`
//! crate. Every operation runs under the breaker and `fleet.timeout`, is
//! timed (`mailmoat_fleet_round_trip_seconds`) and, when it fails, counted
//! by operation and drops the connection, so the next one reconnects.
//!
//! Keys, all under `fleet.key_prefix`:
//! - `bans`: hash, network → `until since_ms node reason`;
//! - `bans:until`: sorted set of the same networks by expiry (Unix s);
//! - `lifts`: sorted set, network → when it was lifted (Unix ms), so a
//!   node that missed a lift does not bring the ban back;
//! - `nodes`: hash, node → `heard_ms bans`, the store's clock;
//! - `rate:<limit>:<ip>`: one GCRA theoretical arrival time (µs);
//! - channel `events`: `ban <net> <value>` and `lift <net> <at_ms> <node>`.
//!
//! The changes are Lua scripts, so each is atomic: two nodes banning and
//! lifting at once cannot leave a half-written ban.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo};
use tokio::time::Instant;

use super::breaker::{Breaker, Turned};
use crate::config::FleetSettings;
use crate::metrics::{Metrics, StoreOp};

/// Records a ban unless a later lift, or a ban as long and as recent, is
/// stored; publishes it when stored. The longer expiry and the later stamp
/// win. 0: lifted since, 1: nothing newer, 2: stored.
const BAN_SCRIPT: &str = r"
local lifted = redis.call('ZSCORE', KEYS[3], ARGV[1])
if lifted and tonumber(lifted) >= tonumber(ARGV[3]) then return 0 end
local expiry = tonumber(ARGV[2])
local cur = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
local old = redis.call('HGET', KEYS[1], ARGV[1])
local old_since = old and tonumber(string.match(old, '^%S+ (%S+)')) or 0
if cur >= expiry and old_since >= tonumber(ARGV[3]) then return 1 end
if cur > expiry then expiry = cur end
local value = string.format('%.0f', expiry) .. ' ' .. ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. ARGV[5]
redis.call('HSET', KEYS[1], ARGV[1], value)
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('PUBLISH', KEYS[4], 'ban ' .. ARGV[1] .. ' ' .. value)
return 2
";

/// Drops a ban made before the lift, remembers the lift, publishes it.
const LIFT_SCRIPT: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local since = tonumber(string.match(cur, '^%S+ (%S+)'))
  if since and since <= tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
end
local old = redis.call('ZSCORE', KEYS[3], ARGV[1])
if (not old) or tonumber(old) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
end
redis.call('PUBLISH', KEYS[4], 'lift ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return 1
";

/// Drops expired bans (a bounded batch per call) and lifts older than the
/// longest ban (nothing they could still undo).
const PRUNE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('HDEL', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now * 1000 - tonumber(ARGV[1]))
return #gone
";

/// GCRA (the generic cell rate algorithm) on the store's clock, for each
/// key with its (interval in µs, burst, count) in ARGV: records `count`
/// events the node already let through, and answers whether they were
/// within the rate and how many milliseconds until the next would be.
/// Events over the rate are still charged (capped at one burst of debt),
/// so a node that let some through before it knew pays them back.
const TAKE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local tolerance = interval * tonumber(ARGV[3 * i - 1])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval * tonumber(ARGV[3 * i])
  local within = 0
  if new_tat - now <= tolerance then within = 1 end
  if new_tat - now > 2 * tolerance then new_tat = now + 2 * tolerance end
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
  local wait = new_tat + interval - tolerance - now
  if wait < 0 then wait = 0 end
  table.insert(out, within)
  table.insert(out, math.ceil(wait / 1000))
end
return out
";

/// Records this node's heartbeat on the store's clock and returns that
/// clock (ms) and every node's record; forgets nodes silent for a day.
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', now) .. ' ' .. ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local out = {string.format('%.0f', now)}
for i = 1, #all, 2 do
  local heard = tonumber(string.match(all[i + 1], '^(%S+)'))
  if (not heard) or now - heard > 86400000 then
    redis.call('HDEL', KEYS[1], all[i])
  elseif #out <= 2 * tonumber(ARGV[3]) then
    table.insert(out, all[i])
    table.insert(out, all[i + 1])
  end
end
return out
";

/// The key names of one fleet.
pub struct Keys {
    pub bans: String,
    pub until: String,
    pub lifts: String,
    pub nodes: String,
    pub events: String,
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            bans: format!("{prefix}bans"),
            until: format!("{prefix}bans:until"),
            lifts: format!("{prefix}lifts"),
            nodes: format!("{prefix}nodes"),
            events: format!("{prefix}events"),
            prefix: prefix.to_owned(),
        }
    }

    pub fn rate(&self, limit: &str, ip: std::net::IpAddr) -> String {
        format!("{}rate:{limit}:{ip}", self.prefix)
    }
}

/// A script and its SHA-1, loaded on every new connection (a restarted
/// store has forgotten them).
pub struct Script {
    text: &'static str,
    pub sha: String,
}

impl Script {
    fn new(text: &'static str) -> Script {
        Script {
            text,
            sha: redis::Script::new(text).get_hash().to_owned(),
        }
    }

    /// `EVALSHA` with these keys; add the arguments.
    pub fn call(&self, keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        cmd
    }
}

pub struct Scripts {
    pub ban: Script,
    pub lift: Script,
    pub prune: Script,
    pub take: Script,
    pub heartbeat: Script,
}

impl Scripts {
    fn all(&self) -> [&Script; 5] {
        [
            &self.ban,
            &self.lift,
            &self.prune,
            &self.take,
            &self.heartbeat,
        ]
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the breaker is open: the store failed and is left alone for a while")]
    BreakerOpen,
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("the store closed the connection")]
    Closed,
    #[error("merging the store's bans failed: {0}")]
    Merge(String),
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

impl StoreError {
    /// Whether the store is unreachable, slow or lost its scripts (the
    /// connection is dropped and the breaker counts it), rather than
    /// answering with an error.
    fn is_transport(&self) -> bool {
        match self {
            StoreError::TimedOut(_) | StoreError::Closed => true,
            StoreError::BreakerOpen | StoreError::Merge(_) => false,
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.to_string().contains("NOSCRIPT")
            }
        }
    }
}

pub struct Store {
    client: Client,
    connection: Mutex<Option<MultiplexedConnection>>,
    /// Connecting is serialised: callers arriving while a connection is
    /// being made wait for it rather than each dialling.
    connecting: tokio::sync::Mutex<()>,
    pub keys: Keys,
    pub scripts: Scripts,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub breaker: Breaker,
    pub metrics: Arc<Metrics>,
    /// Told when the store answers again after an outage.
    pub came_back: tokio::sync::Notify,
}

impl Store {
    /// The client for `settings` (no connection yet). Fails on a URL the
    /// crate refuses or an unreadable password or CA file.
    pub fn new(settings: &FleetSettings, metrics: Arc<Metrics>) -> anyhow::Result<Store> {
        let mut info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| anyhow::anyhow!("fleet.url: {e}"))?;
        if let Some(password) = settings.password().map_err(anyhow::Error::msg)? {
            let redis = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis);
        }
        let client = match &settings.ca_file {
            Some(path) => {
                let root = crate::files::read_bounded(path, 1024 * 1024).map_err(|e| {
                    anyhow::anyhow!(
                        "fleet.ca_file {}: {e}; check the path and permissions",
                        path.display()
                    )
                })?;
                Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root),
                    },
                )
            }
            None => Client::open(info),
        }
        .map_err(|e| anyhow::anyhow!("fleet.url: {e}"))?;
        Ok(Store {
            client,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            keys: Keys::new(&settings.key_prefix),
            scripts: Scripts {
                ban: Script::new(BAN_SCRIPT),
                lift: Script::new(LIFT_SCRIPT),
                prune: Script::new(PRUNE_SCRIPT),
                take: Script::new(TAKE_SCRIPT),
                heartbeat: Script::new(HEARTBEAT_SCRIPT),
            },
            timeout: settings.timeout,
            connect_timeout: settings.connect_timeout,
            breaker: Breaker::new(settings.breaker_failures, settings.breaker_cooldown),
            metrics,
            came_back: tokio::sync::Notify::new(),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_current(&self, connection: Option<MultiplexedConnection>) {
        *self
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = connection;
    }

    /// The connection, made (and the scripts loaded) if there is none.
    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let _one = self.connecting.lock().await;
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.timeout));
        let connect = async {
            let mut connection = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let mut load = redis::pipe();
            for script in self.scripts.all() {
                load.cmd("SCRIPT").arg("LOAD").arg(script.text).ignore();
            }
            load.query_async::<()>(&mut connection).await?;
            Ok::<_, redis::RedisError>(connection)
        };
        let deadline = self.connect_timeout + self.timeout;
        let connection = tokio::time::timeout(deadline, connect)
            .await
            .map_err(|_| StoreError::TimedOut(deadline))??;
        self.set_current(Some(connection.clone()));
        Ok(connection)
    }

    /// Runs `op` on the connection under the breaker and the timeout.
    pub async fn run<T, F, Fut>(&self, op: StoreOp, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allows(Instant::now()) {
            return Err(StoreError::BreakerOpen);
        }
        let started = Instant::now();
        let result = async {
            let connection = self.connection().await?;
            tokio::time::timeout(self.timeout, f(connection))
                .await
                .map_err(|_| StoreError::TimedOut(self.timeout))?
                .map_err(StoreError::from)
        }
        .await;
        match &result {
            Ok(_) => {
                self.metrics
                    .fleet
                    .round_trip
                    .observe(started.elapsed().as_secs_f64());
                if self.breaker.success(&self.metrics.fleet) == Turned::Up {
                    tracing::info!("fleet store answers: sharing bans and rates");
                    self.came_back.notify_one();
                }
            }
            Err(e) if e.is_transport() => self.failed(op, e),
            Err(e) => {
                // The store answered: a bad value or a script error is no
                // outage, and must not put the node on its shares.
                self.metrics.fleet.store_error(op);
                tracing::warn!(op = op.as_str(), error = %e, "the fleet store refused an operation (bad data under the key prefix?)");
            }
        }
        result
    }

    /// Counts a failure, forgets the connection, and opens the breaker
    /// when failures pile up.
    pub fn failed(&self, op: StoreOp, error: &StoreError) {
        self.metrics.fleet.store_error(op);
        self.set_current(None);
        if self.breaker.failure(Instant::now(), &self.metrics.fleet) == Turned::Down {
            tracing::warn!(op = op.as_str(), error = %error, "fleet store failing: enforcing from local state (bans in force, local share of each shared rate) until it answers");
        } else {
            tracing::debug!(op = op.as_str(), error = %error, "fleet store operation failed");
        }
    }
}
