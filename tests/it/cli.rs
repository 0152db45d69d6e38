//! The command line: `check-config` accepts the shipped and packaged files
//! and names mistakes with their key and line; `blocklist check` output.

use tokio::time::timeout;

use crate::harness::*;

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
    assert!(output.status.success(), "{stderr}");
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
