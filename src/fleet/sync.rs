//! Bans across the fleet: this node's changes go to the store, the other
//! nodes' come back by pub/sub, and a full reconciliation (on every
//! (re)connection and every `fleet.resync`) makes up for whatever a
//! message missed: a node that was cut off catches up from the stored set,
//! and a store restarted empty is filled again from the nodes' bans.

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;

use super::store::{Store, StoreError};
use crate::bans::{clean_node, clean_reason, Ban, BanChange, Bans};
use crate::blocklist::parse_net;
use crate::metrics::StoreOp;

/// The most entries read back from the store in one reconciliation, per
/// ban this node may keep (`autoban.max_bans`): room for a fleet's worth.
const REMOTE_PER_LOCAL: usize = 8;

/// Expired bans the prune script drops per call, and the most calls in
/// one reconciliation.
const PRUNE_BATCH: i64 = 1000;
const MAX_PRUNES: usize = 100;

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

/// Writes changes in one pipeline and acts on the answers: a ban the
/// store says was lifted after it was made is lifted here too.
async fn write_changes(
    store: &Store,
    bans: &Bans,
    me: &str,
    changes: &[BanChange],
    op: StoreOp,
) -> Result<(), StoreError> {
    let mut pipe = redis::pipe();
    for change in changes {
        pipe.add_command(change_command(store, me, change));
    }
    let answers: Vec<i64> = store
        .run(op, |mut c| async move { pipe.query_async(&mut c).await })
        .await?;
    for (change, answer) in changes.iter().zip(answers) {
        match change {
            BanChange::Banned { net, ban } => {
                if answer == 0 {
                    bans.lift_remote(*net, ban.since_ms);
                }
                if answer == 2 {
                    store.metrics.fleet.sent(false);
                }
            }
            BanChange::Lifted { .. } => store.metrics.fleet.sent(true),
        }
    }
    Ok(())
}

/// The operation a batch of changes counts as when it fails.
fn op_of(changes: &[BanChange]) -> StoreOp {
    if changes
        .iter()
        .any(|c| matches!(c, BanChange::Banned { .. }))
    {
        StoreOp::Ban
    } else {
        StoreOp::Lift
    }
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
        if write_changes(&store, &bans, &me, &batch, op_of(&batch))
            .await
            .is_err()
        {
            resync.notify_one();
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

/// A field and its value (or a member and its score) as the store has it.
type RawPair = (Vec<u8>, Vec<u8>);

/// Every field and value of a hash (`HSCAN`) or member and score of a
/// sorted set (`ZSCAN`), a page per round trip, each under the timeout,
/// at most `max` of them.
async fn scan_pairs(
    store: &Store,
    command: &'static str,
    key: &str,
    max: usize,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut cursor = 0u64;
    let mut all = Vec::new();
    loop {
        let page = redis::cmd(command)
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(PAGE)
            .to_owned();
        let (next, pairs): (u64, Vec<RawPair>) = store
            .run(StoreOp::Resync, |mut c| async move {
                page.query_async(&mut c).await
            })
            .await?;
        // A field or value that is not UTF-8 is not ours: skipped.
        all.extend(
            pairs.into_iter().filter_map(|(a, b)| {
                Some((String::from_utf8(a).ok()?, String::from_utf8(b).ok()?))
            }),
        );
        if next == 0 {
            return Ok(all);
        }
        if all.len() >= max {
            tracing::warn!(key, entries = all.len(), "the fleet store holds more than this node reads in one reconciliation; the rest waits for the next");
            return Ok(all);
        }
        cursor = next;
    }
}

async fn read_remote(store: &Store, bans: &Bans) -> Result<Remote, StoreError> {
    let k = &store.keys;
    let max_ttl_ms = u64::try_from(bans.max_ttl().as_millis()).unwrap_or(u64::MAX);
    // Expired bans go a batch per call: a bounded number of calls.
    for _ in 0..MAX_PRUNES {
        let prune = store
            .scripts
            .prune
            .call(&[&k.bans, &k.until, &k.lifts])
            .arg(max_ttl_ms)
            .to_owned();
        let pruned: i64 = store
            .run(StoreOp::Resync, |mut c| async move {
                prune.query_async(&mut c).await
            })
            .await?;
        if pruned < PRUNE_BATCH {
            break;
        }
    }
    let max = bans.max_bans().saturating_mul(REMOTE_PER_LOCAL);
    let bans = scan_pairs(store, "HSCAN", &k.bans, max).await?;
    let lifts = scan_pairs(store, "ZSCAN", &k.lifts, max).await?;
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

/// Applies what the store holds to this node's bans and returns what the
/// store lacks: lifts first (so a lift is never undone by the ban it
/// lifted), then bans both ways. Blocking work (every ban compared).
fn merge(bans: &Bans, remote: Remote, me: &str) -> (Vec<BanChange>, u64) {
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
        let stored = remote.bans.get(&net);
        if stored.is_none_or(|b| b.until < ban.until || b.since_ms < ban.since_ms) {
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
    (to_store, received)
}

/// A full reconciliation: read the store, merge off the runtime, write
/// what the store lacks.
pub async fn reconcile(store: &Store, bans: &Arc<Bans>, me: &str) -> Result<(), StoreError> {
    let remote = read_remote(store, bans).await?;
    let (merging, node) = (bans.clone(), me.to_owned());
    let (to_store, received) = tokio::task::spawn_blocking(move || merge(&merging, remote, &node))
        .await
        .map_err(|e| StoreError::Merge(e.to_string()))?;
    store.metrics.fleet.received_many(received);
    for chunk in to_store.chunks(PAGE) {
        write_changes(store, bans, me, chunk, StoreOp::Resync).await?;
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
