//! `mailmoat demo` through the built binary: a short run whose report's
//! claims are checked by the demo itself, so a claim that stops holding
//! fails here and in CI, not only in a reader's eyes. Its fleet act needs
//! redis-server, which CI installs.

use std::time::Duration;

use tokio::time::timeout;

use crate::harness::mailmoat;

#[tokio::test]
async fn demo_brute_force_inside_tls_is_banned_and_every_claim_holds() {
    // 8 s of traffic, up to 10 s for stragglers, the proxy's shutdown.
    let output = timeout(
        Duration::from_secs(40),
        mailmoat()
            .args(["demo", "--duration", "8s"])
            .env_remove("RUST_LOG")
            .output(),
    )
    .await
    .expect("the demo ends in time")
    .expect("mailmoat runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let brute = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("AUTH brute force:"))
        .unwrap_or_else(|| panic!("no brute-force line in the report:\n{stdout}"));
    assert!(brute.contains("inside TLS"), "{brute}");
    assert!(
        brute.contains("banned after") && brute.contains("554 5.7.1"),
        "{brute}"
    );
    // The fleet act is played where redis-server is installed (always in
    // CI, which installs it), and says it is skipped elsewhere.
    let fleet = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("fleet:"))
        .unwrap_or_else(|| panic!("no fleet line in the report:\n{stdout}"));
    if mailmoat::redis_server::RedisServer::binary().is_some() || std::env::var_os("CI").is_some() {
        assert!(
            fleet.contains("3 nodes sharing redis-server")
                && fleet.contains("refused by a after")
                && !fleet.contains("not within"),
            "{fleet}"
        );
    } else {
        assert!(
            fleet.contains("skipped: redis-server is not on PATH"),
            "{fleet}"
        );
    }
    assert!(stdout.contains("every claim above held"), "{stdout}");
}
