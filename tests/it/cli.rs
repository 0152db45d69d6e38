//! `mailmoat check-config`: the shipped file passes; mistakes are named with
//! their key and line.

use crate::harness::*;

#[tokio::test]
async fn check_config_accepts_the_shipped_file() {
    let (ok, stderr) = mailmoat_output(&["check-config", "-c", "config/mailmoat.toml"]).await;
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
