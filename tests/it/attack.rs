//! Under attack: slowloris sockets from a few IPs must not take the
//! receiver's slots away from a legitimate client.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use mailmoat::sink::SinkOptions;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clients::*;
use crate::harness::*;

const ATTACKER_IPS: u8 = 20;
const SOCKETS: usize = 2000;
/// Attacker sockets being opened at once.
const OPENING_AT_ONCE: usize = 200;
/// Per-IP and per-prefix cap. 20 × 4 = 80 attacker sessions at most, so
/// the receiver keeps 20 of its 100 slots for everyone else; at 5 per IP
/// the attackers alone could fill all 100 and the receiver would turn the
/// legitimate client away (`421 sink busy`).
const PER_IP: usize = 4;
const SLOTS: usize = 100;
const MESSAGES: usize = 10;
/// One byte per socket this often: never idle, never a whole line.
const TRICKLE: Duration = Duration::from_millis(500);
/// How long a closed attacker socket waits before it connects again.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);
/// The most connections a socket of the attack makes.
const ROUNDS: usize = 40;
const LEGIT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_sockets_from_twenty_ips_leave_the_receiver_room_for_legit_mail() {
    // Each attacker IP in a /24 of its own, so the per-IP cap is what binds.
    let attacker = |n: u8| Ipv4Addr::new(127, 20, n, 1);
    let attack_cap = usize::from(ATTACKER_IPS) * PER_IP;
    assert!(
        attack_cap < SLOTS,
        "the caps must leave the receiver a slot for legitimate clients"
    );
    // The receiver and the attackers run apart from the proxy, as the
    // separate processes they would be.
    let receiver = Apart::new("receiver");
    let attackers = Apart::new("attackers");
    let sink = receiver
        .sink(SinkOptions {
            slots: SLOTS,
            ..SinkOptions::default()
        })
        .await;
    // Only the caps and the line timeout defend: the rate bucket is wide
    // open and refusals never turn into bans, so the attack goes on.
    let toml = format!(
        "[limits]\nper_ip_connections = {PER_IP}\nper_prefix_connections = {PER_IP}\n\
         connection_rate = \"100000/min\"\nconnection_burst = 100000\n\
         [timeouts]\ncommand_line = \"2s\"\n\
         [autoban]\nlimit_violations = 0\nprotocol_errors = 0\n"
    );
    let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
    let addr = proxy.addr;

    let started = Instant::now();
    let until = started + Duration::from_secs(40);
    let stop = CancellationToken::new();
    let opening = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let mut attack = JoinSet::new();
    for socket in 0..SOCKETS {
        let ip = attacker(1 + (socket % usize::from(ATTACKER_IPS)) as u8);
        let (stop, opening) = (stop.clone(), opening.clone());
        let attacker_task = async move {
            // Reconnect whenever the proxy closes us, as a real attacker would.
            for _ in 0..ROUNDS {
                let line = b"EHLO slow.attacker.example.";
                let ended = trickle(ip, addr, &opening, line, TRICKLE, &stop, until).await;
                if ended != Ended::ClosedByProxy {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RECONNECT_AFTER) => {}
                }
            }
        };
        attack.spawn_on(attacker_task, attackers.handle());
    }

    // The attackers fill their share of the receiver...
    let full = wait_for(|| sink.active() >= attack_cap).await;
    assert!(full, "attackers hold {} receiver slots", sink.active());

    // ...and legitimate mail still gets through, every message the first
    // time, spread over several rounds of the attackers being cut off by
    // the line timeout and coming back.
    let cut = r#"mailmoat_sessions_closed_total{reason="line_timeout"}"#;
    for n in 0..MESSAGES {
        let message = format!("Subject: legit {n}\r\n\r\nhello {n}\r\n");
        let sent = send_mail(
            LEGIT,
            addr,
            "a@example.org",
            &["b@example.net"],
            message.as_bytes(),
        )
        .await;
        assert_eq!(
            sent,
            Ok(()),
            "message {n}; sink busy refusals {}",
            sink.busy_refusals()
        );
        proxy
            .wait_metric(cut, ((n + 1) * attack_cap / 4) as f64)
            .await;
    }
    stop.cancel();
    while let Some(done) = attack.join_next().await {
        done.expect("attacker task");
    }

    assert_eq!(sink.delivered(), MESSAGES as u64);
    assert_eq!(sink.busy_refusals(), 0);
    // The receiver never held more than the caps let through: every
    // attacker IP at its cap, plus the one legitimate client.
    let peak = sink.peak_active();
    assert!(
        peak <= attack_cap + 1,
        "the receiver saw {peak} connections at once"
    );
    let refused = counted(
        &proxy,
        r#"mailmoat_connections_refused_total{reason="ip_cap"}"#,
    );
    assert!(
        refused >= (SOCKETS - attack_cap) as f64,
        "only {refused} refused"
    );
    assert_eq!(
        counted(
            &proxy,
            r#"mailmoat_sessions_closed_total{reason="client_quit"}"#
        ),
        MESSAGES as f64
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(40),
        "the attack test took {took:?}"
    );
}
