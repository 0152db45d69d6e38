//! Bans across the fleet: this node's changes go to the store, the other
//! nodes' come back by pub/sub, and a full reconciliation (on every
//! (re)connection and every `fleet.resync`) makes up for whatever a
//! message missed: a node that was cut off catches up from the stored set,
//! and a store restarted empty is filled again from the nodes' bans.

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;
use redis::aio::MultiplexedConnection;

use super::store::{Store, StoreError};
use crate::bans::{clean_node, clean_reason, Ban, BanChange, Bans};
use crate::blocklist::parse_net;
use crate::metrics::StoreOp;

/// The most entries read back from the store in one reconciliation: far
/// more than one node keeps, bounded all the same.
const MAX_REMOTE: usize = 4_000_000;

/// Entries per `HSCAN`/`ZSCAN` page and per pipeline of changes.
const PAGE: usize = 1000;

/// The longest message or stored value read; a ban's line is far shorter.
const MAX_LINE: usize = 512;

/// A ban as stored: `until since_ms node reason`.
pub fn encode(ban: &Ban, node: &str) -> [String; 4] {
    [
        ban.until.to_string(),
        ban.since_ms.to_string(),
        ban.origin.as_deref().unwrap_or(node).to_owned(),
        ban.reason.to_string(),
    ]
}

/// Reads a stored ban value; `None` for anything else.
pub fn decode(value: &str) -> Option<Ban> {
    if value.len() > MAX_LINE {
        return None;
    }
    let mut fields = value.splitn(4, ' ');
    let until = fields.next()?.parse().ok()?;
    let since_ms = fields.next()?.parse().ok()?;
    let node = clean_node(fields.next()?);
    let reason = clean_reason(fields.next().unwrap_or("fleet"));
    Some(Ban {
        until,
        reason,
        since_ms,
        origin: (!node.is_empty()).then_some(node),
    })
}

/// A message on the events channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Banned {
        net: IpNet,
        ban: Ban,
    },
    Lifted {
        net: IpNet,
        at_ms: u64,
        node: String,
    },
}

impl Event {
    pub fn parse(message: &str) -> Option<Event> {
        if message.len() > MAX_LINE {
            return None;
        }
        let (kind, rest) = message.split_once(' ')?;
        let (net, rest) = rest.split_once(' ')?;
        let net = parse_net(net).ok()?;
        match kind {
            "ban" => Some(Event::Banned {
                net,
                ban: decode(rest)?,
            }),
            "lift" => {
                let (at, node) = rest.split_once(' ')?;
                Some(Event::Lifted {
                    net,
                    at_ms: at.parse().ok()?,
                    node: clean_node(node).to_string(),
                })
            }
            _ => None,
        }
    }

    /// The node the change came from.
    fn node(&self) -> &str {
        match self {
            Event::Banned { ban, .. } => ban.origin.as_deref().unwrap_or(""),
            Event::Lifted { node, .. } => node,
        }
    }
}

/// Applies a message from the events channel; this node's own are
/// already in force.
pub fn apply_event(bans: &Bans, store: &Store, me: &str, event: Event) {
    if event.node() == me {
        return;
    }
    match event {
        Event::Banned { net, ban } => match bans.apply_remote(net, ban) {
            Ok(crate::bans::Banned::Unchanged) => {}
            Ok(_) => store.metrics.fleet.received(false),
            Err(e) => {
                tracing::warn!(net = %net, error = %e, "a ban from the fleet was not applied")
            }
        },
        Event::Lifted { net, at_ms, .. } => {
            if bans.lift_remote(net, at_ms) {
                store.metrics.fleet.received(true);
            }
        }
    }
}

/// The command that writes one change.
fn change_command(store: &Store, me: &str, change: &BanChange) -> redis::Cmd {
    let k = &store.keys;
    let keys = [
        k.bans.as_str(),
        k.until.as_str(),
        k.lifts.as_str(),
        k.events.as_str(),
    ];
    match change {
        BanChange::Banned { net, ban } => {
            let mut cmd = store.scripts.ban.call(&keys);
            cmd.arg(net.to_string());
            for field in encode(ban, me) {
                cmd.arg(field);
            }
            cmd
        }
        BanChange::Lifted { net, at_ms } => {
            let mut cmd = store.scripts.lift.call(&keys);
            cmd.arg(net.to_string()).arg(*at_ms).arg(me);
            cmd
        }
    }
}

/// Writes changes in one pipeline; returns the ban script's answers (0:
/// lifted since) in order, for the bans.
async fn write_changes(
    store: &Store,
    me: &str,
    changes: &[BanChange],
    op: StoreOp,
) -> Result<Vec<i64>, StoreError> {
    let mut pipe = redis::pipe();
    for change in changes {
        pipe.add_command(change_command(store, me, change));
    }
    store
        .run(op, |mut c| async move { pipe.query_async(&mut c).await })
        .await
}

/// Writes this node's changes to the store as they come. A change that
/// fails stays in force here and is written at the next reconciliation.
pub async fn publish(
    store: Arc<Store>,
    bans: Arc<Bans>,
    me: Arc<str>,
    changes: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<BanChange>>>,
    resync: Arc<tokio::sync::Notify>,
) {
    let mut changes = changes.lock().await;
    let mut batch = Vec::with_capacity(64);
    loop {
        if changes.recv_many(&mut batch, 64).await == 0 {
            return;
        }
        match write_changes(&store, &me, &batch, StoreOp::Ban).await {
            Ok(answers) => {
                for (change, answer) in batch.iter().zip(answers) {
                    store
                        .metrics
                        .fleet
                        .sent(matches!(change, BanChange::Lifted { .. }));
                    if let (BanChange::Banned { net, ban }, 0) = (change, answer) {
                        // Lifted elsewhere after it was made here.
                        bans.lift_remote(*net, ban.since_ms);
                    }
                }
            }
            Err(_) => resync.notify_one(),
        }
        batch.clear();
    }
}

/// What the store holds, as read by a reconciliation.
#[derive(Default)]
struct Remote {
    bans: HashMap<IpNet, Ban>,
    lifts: HashMap<IpNet, u64>,
}

async fn scan_pairs(
    mut c: MultiplexedConnection,
    command: &str,
    key: &str,
) -> redis::RedisResult<Vec<(String, String)>> {
    let mut cursor = 0u64;
    let mut all = Vec::new();
    loop {
        let (next, page): (u64, Vec<(String, String)>) = redis::cmd(command)
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut c)
            .await?;
        all.extend(page);
        if next == 0 || all.len() >= MAX_REMOTE {
            return Ok(all);
        }
        cursor = next;
    }
}

async fn read_remote(store: &Store, max_ttl: std::time::Duration) -> Result<Remote, StoreError> {
    let k = &store.keys;
    let prune = store.scripts.prune.call(&[&k.bans, &k.until, &k.lifts]);
    let max_ttl_ms = u64::try_from(max_ttl.as_millis()).unwrap_or(u64::MAX);
    store
        .run(StoreOp::Resync, |mut c| async move {
            prune
                .clone()
                .arg(max_ttl_ms)
                .query_async::<i64>(&mut c)
                .await
        })
        .await?;
    let bans = store
        .run(StoreOp::Resync, |c| scan_pairs(c, "HSCAN", &k.bans))
        .await?;
    let lifts = store
        .run(StoreOp::Resync, |c| scan_pairs(c, "ZSCAN", &k.lifts))
        .await?;
    let mut remote = Remote::default();
    for (net, value) in bans {
        if let (Ok(net), Some(ban)) = (parse_net(&net), decode(&value)) {
            remote.bans.insert(net, ban);
        }
    }
    for (net, at) in lifts {
        if let (Ok(net), Ok(at)) = (parse_net(&net), at.parse::<f64>()) {
            remote.lifts.insert(net, at as u64);
        }
    }
    Ok(remote)
}

/// A full reconciliation: lifts first (so a lift is never undone by the
/// ban it lifted), then bans both ways.
pub async fn reconcile(store: &Store, bans: &Bans, me: &str) -> Result<(), StoreError> {
    let remote = read_remote(store, bans.max_ttl()).await?;
    let (local_bans, local_lifts) = bans.fleet_snapshot();
    let mut to_store: Vec<BanChange> = Vec::new();
    for (net, at_ms) in local_lifts {
        if remote.lifts.get(&net).is_none_or(|r| *r < at_ms) {
            to_store.push(BanChange::Lifted { net, at_ms });
        }
    }
    for (net, at_ms) in &remote.lifts {
        bans.lift_remote(*net, *at_ms);
    }
    for (net, ban) in local_bans {
        let stored_until = remote.bans.get(&net).map(|b| b.until);
        if stored_until.is_none_or(|until| until < ban.until) {
            to_store.push(BanChange::Banned { net, ban });
        }
    }
    let mut received = 0u64;
    for (net, ban) in remote.bans {
        // One of ours that this node lost (restarted without its state
        // file) comes back as ours.
        let ban = Ban {
            origin: ban.origin.filter(|node| &**node != me),
            ..ban
        };
        if matches!(bans.apply_remote(net, ban), Ok(b) if b != crate::bans::Banned::Unchanged) {
            received += 1;
        }
    }
    store.metrics.fleet.received_many(received);
    for chunk in to_store.chunks(PAGE) {
        let answers = write_changes(store, me, chunk, StoreOp::Resync).await?;
        for (change, answer) in chunk.iter().zip(answers) {
            store
                .metrics
                .fleet
                .sent(matches!(change, BanChange::Lifted { .. }));
            if let (BanChange::Banned { net, ban }, 0) = (change, answer) {
                bans.lift_remote(*net, ban.since_ms);
            }
        }
    }
    store.metrics.fleet.resyncs.inc();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_from_the_channel_read_back_what_was_written() {
        let ban = Ban {
            until: 1_900_000_000,
            reason: "auth_failures".into(),
            since_ms: 1_800_000_000_123,
            origin: None,
        };
        let value = encode(&ban, "mx-1").join(" ");
        let event = Event::parse(&format!("ban 192.0.2.7/32 {value}")).expect("parses");
        let expected = Ban {
            origin: Some("mx-1".into()),
            ..ban
        };
        assert_eq!(
            event,
            Event::Banned {
                net: "192.0.2.7/32".parse().unwrap(),
                ban: expected
            }
        );
        assert_eq!(
            Event::parse("lift 2001:db8::/64 1800000000999 mx-2"),
            Some(Event::Lifted {
                net: "2001:db8::/64".parse().unwrap(),
                at_ms: 1_800_000_000_999,
                node: "mx-2".into()
            })
        );
    }

    #[test]
    fn garbage_on_the_channel_is_ignored_not_applied() {
        for message in [
            "",
            "ban",
            "ban 192.0.2.7",
            "ban not-an-ip 1 2 n r",
            "ban 192.0.2.7 soon 2 n r",
            "lift 192.0.2.7 later n",
            "unban 192.0.2.7 1 n",
            &"x".repeat(MAX_LINE + 1),
        ] {
            assert_eq!(Event::parse(message), None, "{message:?}");
        }
    }
}
