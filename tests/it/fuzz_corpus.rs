//! Replays every fuzz target's seed corpus (`fuzz/corpus/<target>/`) through
//! the same check the fuzzer runs (`mailmoat::fuzzing`), on stable, so a
//! regression on a known input fails CI without cargo-fuzz or nightly.

use std::panic;
use std::path::{Path, PathBuf};

use mailmoat::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn replay(target: &str) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target} in mailmoat::fuzzing::TARGETS"));
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()))
        .map(|entry| entry.expect("read corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for file in files {
        let data = std::fs::read(&file).expect("read corpus file");
        if panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target} fails on {}", file.display());
        }
    }
}

#[test]
fn smtp_command_corpus() {
    replay("smtp_command");
}

#[test]
fn smtp_reply_corpus() {
    replay("smtp_reply");
}

#[test]
fn data_scanner_corpus() {
    replay("data_scanner");
}

#[test]
fn blocklist_line_corpus() {
    replay("blocklist_line");
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header");
}

#[test]
fn config_loader_corpus() {
    replay("config_loader");
}

/// Each target has its corpus, its fuzz_targets file and its `[[bin]]`, and
/// nothing else sits in fuzz/corpus.
#[test]
fn every_target_is_wired_up() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (target, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "fuzz/Cargo.toml has no [[bin]] {target}"
        );
        let source = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        let text = std::fs::read_to_string(&source).expect("fuzz target source");
        assert!(
            text.contains(&format!("mailmoat::fuzzing::{target}(")),
            "{} does not call mailmoat::fuzzing::{target}",
            source.display()
        );
    }
    for entry in std::fs::read_dir(fuzz_dir().join("corpus")).expect("fuzz/corpus") {
        let name = entry.expect("corpus entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            TARGETS.iter().any(|(target, _)| *target == name),
            "fuzz/corpus/{name} belongs to no target"
        );
    }
}

#[test]
fn ban_state_corpus() {
    replay("ban_state");
}

#[test]
fn fleet_event_corpus() {
    replay("fleet_event");
}

#[test]
fn imap_response_corpus() {
    replay("imap_response");
}

#[test]
fn imap_session_corpus() {
    replay("imap_session");
}

#[test]
fn pop3_session_corpus() {
    replay("pop3_session");
}

#[test]
fn smtp_session_corpus() {
    replay("smtp_session");
}
