//! The operator's commands through the real binary: `check-config` (every
//! mistake at once with its key and line; output that loads back; the
//! shipped and packaged files pass), and `lookup` / `bans` against a
//! running proxy's admin API or, when it is down, the files on disk, with
//! exit statuses scripts can use; no colour codes into a pipe.

use std::net::SocketAddr;
use std::path::Path;

use tokio::time::timeout;

use crate::harness::*;

/// `path` as a TOML string.
fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[tokio::test]
async fn check_config_accepts_the_shipped_file() {
    let (ok, stderr) = mailmoat_output(&["check-config", "-c", "config/mailmoat.toml"]).await;
    assert!(ok, "{stderr}");
}

#[tokio::test]
async fn check_config_accepts_the_debian_package_file() {
    let (ok, stderr) = mailmoat_output(&["check-config", "-c", "ops/debian/mailmoat.toml"]).await;
    assert!(ok, "{stderr}");
}

#[tokio::test]
async fn check_config_names_a_misspelled_key() {
    let dir = TempDir::new("misspelled");
    let path = dir.write("m.toml", "[timeouts]\nidel = \"3s\"\n");
    let (ok, stderr) = mailmoat_output(&["check-config", "-c", path.to_str().unwrap()]).await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("idel"), "{stderr}");
}

#[tokio::test]
async fn check_config_names_the_key_and_line_of_a_bad_duration() {
    let dir = TempDir::new("bad-duration");
    let path = dir.write("m.toml", "[timeouts]\nidle = \"3x\"\n");
    let (ok, stderr) = mailmoat_output(&["check-config", "-c", path.to_str().unwrap()]).await;
    assert!(!ok, "{stderr}");
    let expected = format!("{}:2: timeouts.idle", path.display());
    assert!(stderr.contains(&expected), "{expected:?} not in {stderr}");
}

#[tokio::test]
async fn blocklist_check_writes_no_colour_codes_into_a_pipe() {
    let dir = TempDir::new("check-colours");
    // A bad line makes the loader warn on stderr, which the test reads
    // through a pipe.
    let list = dir.write("list.txt", "not-an-address\n192.0.2.0/24\n");
    let config = dir.write(
        "m.toml",
        &format!("[blocklist]\nfiles = [{:?}]\n", list.to_str().unwrap()),
    );
    let output = timeout(
        WAIT,
        mailmoat()
            .args(["blocklist", "check", "192.0.2.7", "-c"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .output(),
    )
    .await
    .expect("exits in time")
    .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    // 192.0.2.7 is listed: exit status 1 says "blocked".
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not-an-address"), "no warning: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a pipe: {stderr:?}"
    );
    assert!(
        !stdout.contains('\x1b'),
        "colour codes in a pipe: {stdout:?}"
    );
}

/// Regression: the first unknown key stopped the check, and a parse error
/// was printed twice.
#[tokio::test]
async fn check_config_prints_three_seeded_errors_at_once_each_once() {
    let dir = TempDir::new("three-errors");
    let path = dir.write(
        "m.toml",
        "[server]\nshadow = \"yes\"\n[limits]\nper_ip_conections = 5\n[timeouts]\nidle = \"3x\"\n",
    );
    let run = mailmoat_run(&["check-config", "-c", path.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let file = path.display();
    for expected in [
        format!("{file}:2: server.shadow: invalid type"),
        format!("{file}:4: limits.per_ip_conections: unknown key"),
        format!("{file}:6: timeouts.idle = \"3x\""),
    ] {
        assert_eq!(
            run.stderr.matches(&expected).count(),
            1,
            "{expected:?} once in\n{}",
            run.stderr
        );
    }
    assert!(run.stderr.contains("3 problems"), "{}", run.stderr);
    assert_eq!(run.stdout, "", "no effective config for a bad file");
}

/// Regression: the printed effective config could not be loaded
/// (`data_min_rate = 1024` → "missing '/'").
#[tokio::test]
async fn check_config_output_loads_back_unchanged() {
    let first = mailmoat_run(&["check-config", "-c", "config/mailmoat.toml"]).await;
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    // Elsewhere, so relative paths would show if they were not resolved.
    let dir = TempDir::new("round-trip");
    let effective = dir.write("effective.toml", &first.stdout);
    let second = mailmoat_run(&[
        "check-config".as_ref(),
        "-c".as_ref(),
        effective.as_os_str(),
    ])
    .await;
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    assert_eq!(second.stdout, first.stdout);
    let blocklist = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/blocklist.txt");
    assert!(
        first
            .stdout
            .contains(&format!("files = [{}]", quoted(&blocklist))),
        "{}",
        first.stdout
    );
}

/// Regression: `servers = ["localhost:10025"]` was refused.
#[tokio::test]
async fn check_config_accepts_a_host_name_upstream_and_prints_it_as_written() {
    let dir = TempDir::new("host-name");
    let path = dir.write("m.toml", "[upstream]\nservers = [\"localhost:10025\"]\n");
    let run = mailmoat_run(&["check-config", "-c", path.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("servers = [\"localhost:10025\"]"),
        "{}",
        run.stdout
    );
}

/// Regression: an upstream equal to a listener was accepted and looped.
#[tokio::test]
async fn check_config_refuses_an_upstream_that_is_its_own_listener() {
    let dir = TempDir::new("loop");
    let path = dir.write(
        "m.toml",
        "[server]\nlisten = [\"0.0.0.0:2626\"]\n[upstream]\nservers = [\"127.0.0.1:2626\"]\n",
    );
    let run = mailmoat_run(&["check-config", "-c", path.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let expected = format!(
        "{}:4: upstream.servers = \"127.0.0.1:2626\"",
        path.display()
    );
    assert!(run.stderr.contains(&expected), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("server.listen = \"0.0.0.0:2626\" (line 2)"),
        "{}",
        run.stderr
    );
}

/// Regression: a relative `blocklist.files` passed the check but was read
/// from the current directory, so from elsewhere nothing was blocked.
#[tokio::test]
async fn relative_list_paths_are_read_next_to_the_config_file() {
    let dir = TempDir::new("relative");
    let list = dir.write("block.txt", "192.0.2.7\n");
    let config = dir.write("m.toml", "[blocklist]\nfiles = [\"block.txt\"]\n");
    // The binary runs from the repository root, not from `dir`.
    let run = mailmoat_run(&[
        "blocklist",
        "check",
        "192.0.2.7",
        "-c",
        config.to_str().unwrap(),
    ])
    .await;
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains(&format!("blocked by {} entry 192.0.2.7/32", list.display())),
        "{}",
        run.stdout
    );
}

/// A proxy with an admin token, and a config file for the binary that
/// points at its admin listener.
struct Live {
    proxy: TestProxy,
    _sink: mailmoat::sink::Sink,
    dir: TempDir,
    config: std::path::PathBuf,
    token: String,
}

impl Live {
    async fn start(name: &str) -> Live {
        let sink = sink().await;
        let dir = TempDir::new(name);
        let token_file = dir.write("admin-token", "s3cret\n");
        let state = dir.path().join("bans.txt");
        let toml = format!(
            "[blocklist]\nfiles = []\n[autoban]\nstate = {}\n[admin]\ntoken_file = {}\n",
            quoted(&state),
            quoted(&token_file)
        );
        let proxy = TestProxy::start(&toml, &[sink.addr()]).await;
        let admin = proxy.admin.unwrap();
        // `[admin]` is the last table: the listener goes in it.
        let config = dir.write("cli.toml", &format!("{toml}listen = \"{admin}\"\n"));
        Live {
            proxy,
            _sink: sink,
            dir,
            config,
            token: "s3cret".into(),
        }
    }

    fn admin(&self) -> SocketAddr {
        self.proxy.admin.unwrap()
    }

    async fn run(&self, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", self.config.to_str().unwrap()]);
        let run = mailmoat_run(&all).await;
        assert!(
            !run.stdout.contains('\x1b') && !run.stderr.contains('\x1b'),
            "colour codes into a pipe: {run:?}",
            run = (&run.stdout, &run.stderr)
        );
        run
    }

    /// Waits until the live lists say `ip` is blocked (bans apply within
    /// a fraction of a second).
    async fn wait_blocked(&self, ip: &str, blocked: bool) {
        let path = format!("/admin/lookup?ip={ip}&format=json");
        let expected = if blocked {
            "\"decision\":\"blocked\""
        } else {
            "\"decision\":\"unlisted\""
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = http_get(self.admin(), &path).await;
            assert_eq!(status, 200, "{body}");
            if body.contains(expected) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{ip}: {body}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Regression: `blocklist check` said "not listed" for an IP the running
/// proxy had banned, and exited 0 either way.
#[tokio::test]
async fn lookup_exits_1_for_a_live_ban_and_0_for_an_unlisted_ip() {
    let live = Live::start("lookup-live").await;
    let (status, body) = http(
        live.admin(),
        "POST",
        "/admin/bans?ip=192.0.2.66",
        Some(&live.token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    live.wait_blocked("192.0.2.66", true).await;

    let run = live.run(&["lookup", "192.0.2.66"]).await;
    assert_eq!(
        run.code,
        Some(1),
        "{run:?}",
        run = (&run.stdout, &run.stderr)
    );
    assert_eq!(
        run.stdout,
        format!(
            "192.0.2.66\n  blocked by autoban entry 192.0.2.66/32\n  open sessions: 0\n  \
             (live: the running proxy, admin API {})\n",
            live.admin()
        )
    );

    let run = live.run(&["lookup", "192.0.2.67"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("not listed"), "{}", run.stdout);
    assert!(run.stdout.contains("(live:"), "{}", run.stdout);
}

#[tokio::test]
async fn bans_add_list_and_remove_through_the_running_proxy() {
    let live = Live::start("bans-cli").await;
    let run = live
        .run(&["bans", "add", "192.0.2.0/28", "--ttl", "2h"])
        .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "banned 192.0.2.0/28 for 2h; saved to autoban.state\n"
    );
    live.wait_blocked("192.0.2.9", true).await;

    let run = live.run(&["bans", "list"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.starts_with("# live:"), "{}", run.stdout);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("192.0.2.0/28 ") && l.contains("reason=manual")),
        "{}",
        run.stdout
    );
    assert_eq!(live.run(&["lookup", "192.0.2.9"]).await.code, Some(1));

    let run = live.run(&["bans", "remove", "192.0.2.0/28"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "lifted 192.0.2.0/28\n");
    live.wait_blocked("192.0.2.9", false).await;
    assert_eq!(live.run(&["lookup", "192.0.2.9"]).await.code, Some(0));
    let run = live.run(&["bans", "remove", "192.0.2.0/28"]).await;
    assert_eq!(run.code, Some(2), "no such ban: {}", run.stdout);
    assert!(run.stderr.contains("HTTP 404"), "{}", run.stderr);

    // A wrong token is refused, and said so.
    let wrong = live.dir.write("wrong-token", "wrong\n");
    let config = live.dir.write(
        "wrong.toml",
        &format!(
            "[admin]\nlisten = \"{}\"\ntoken_file = {}\n",
            live.admin(),
            quoted(&wrong)
        ),
    );
    let run = mailmoat_run(&["bans", "add", "192.0.2.1", "-c", config.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(2), "{}", run.stdout);
    assert!(run.stderr.contains("HTTP 401"), "{}", run.stderr);
    let run = live.run(&["bans", "add", "not-an-ip"]).await;
    assert_eq!(run.code, Some(2));
}

/// With the proxy stopped, the persisted bans still answer.
#[tokio::test]
async fn lookup_falls_back_to_the_ban_state_when_the_proxy_is_down() {
    let mut live = Live::start("lookup-offline").await;
    let (status, body) = http(
        live.admin(),
        "POST",
        "/admin/bans?ip=192.0.2.77",
        Some(&live.token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    live.wait_blocked("192.0.2.77", true).await;
    live.proxy.begin_shutdown().await.unwrap();
    assert!(wait_refused(live.admin()).await);

    let run = live.run(&["lookup", "192.0.2.77"]).await;
    assert_eq!(
        run.code,
        Some(1),
        "{run:?}",
        run = (&run.stdout, &run.stderr)
    );
    assert_eq!(
        run.stdout,
        "192.0.2.77\n  blocked by autoban entry 192.0.2.77/32\n  \
         (offline: the lists and bans on disk)\n"
    );
    assert!(run.stderr.contains("does not answer"), "{}", run.stderr);
    assert_eq!(live.run(&["lookup", "192.0.2.78"]).await.code, Some(0));

    let run = live.run(&["bans", "list"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.starts_with("# offline:"), "{}", run.stdout);
    assert!(run.stdout.contains("192.0.2.77/32 "), "{}", run.stdout);
    // Changes need the proxy.
    assert_eq!(live.run(&["bans", "add", "192.0.2.1"]).await.code, Some(2));
}

#[tokio::test]
async fn lookup_without_proxy_or_files_is_an_error() {
    let dir = TempDir::new("no-data");
    let config = dir.write(
        "m.toml",
        &format!(
            "[blocklist]\nfiles = [\"missing.txt\"]\n[admin]\nlisten = \"{}\"\n",
            unused_addr()
        ),
    );
    let run = mailmoat_run(&["lookup", "192.0.2.7", "-c", config.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(2), "{}", run.stdout);
    assert!(run.stderr.contains("no offline data"), "{}", run.stderr);
}
