//! The log lines of the real binary, in both formats: client text is one
//! quoted value and cannot add fields, and the start-up line names the
//! version.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use mailmoat::sink::Sink;

use crate::harness::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// An EHLO argument that looks like two more logfmt fields, with a terminal
/// escape sequence and a non-ASCII letter.
const HELO: &str = "evil fake=1 client=10.0.0.1\x1b[31m é";
const MAIL_FROM: &str = "a\" forged=1 x=\"@example.org";

/// A running `mailmoat run` whose stderr goes to a file.
struct Running {
    _proxy: tokio::process::Child,
    _sink: Sink,
    log: PathBuf,
    addr: std::net::SocketAddr,
    _dir: TempDir,
}

async fn run_with_format(format: &str) -> Running {
    let sink = sink().await;
    let addr = unused_addr();
    let dir = TempDir::new(&format!("logs-{format}"));
    let config = dir.write(
        "mailmoat.toml",
        &format!(
            "[server]\nlisten = [\"{addr}\"]\n[upstream]\nservers = [\"{}\"]\n\
             [admin]\nlisten = \"\"\n[log]\nformat = \"{format}\"\nlevel = \"info\"\n",
            sink.addr()
        ),
    );
    let log = dir.path().join("stderr.log");
    let proxy = mailmoat_logged(&config, &log);
    Running {
        _proxy: proxy,
        _sink: sink,
        log,
        addr,
        _dir: dir,
    }
}

/// Sends one message with hostile client text; returns the log line that
/// records it.
async fn accepted_line(running: &Running) -> String {
    let mut raw = Raw::connect_when_ready(CLIENT, running.addr).await;
    raw.expect("220 ").await;
    raw.send(
        format!(
            "EHLO {HELO}\r\nMAIL FROM:<{MAIL_FROM}>\r\nRCPT TO:<c@d>\r\nDATA\r\n\
             Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        )
        .as_bytes(),
    )
    .await;
    for code in ["250-", "250 ", "250 ", "354 ", "250 ", "221 "] {
        raw.expect(code).await;
    }
    let mut line = None;
    let found = wait_for(|| {
        let text = std::fs::read_to_string(&running.log).unwrap_or_default();
        line = text
            .lines()
            .find(|l| l.contains("message accepted"))
            .map(str::to_owned);
        line.is_some()
    })
    .await;
    let text = std::fs::read_to_string(&running.log).unwrap_or_default();
    assert!(found, "no message line in the log:\n{text}");
    line.unwrap()
}

/// The `key=value` pairs of a logfmt line, values either bare (up to the
/// next space) or double-quoted with backslash escapes; words without `=`
/// (timestamp, level, message) are skipped.
fn logfmt_keys(line: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut chars = line.chars().peekable();
    while chars.peek().is_some() {
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c == ' ' || c == '=' {
                break;
            }
            word.push(c);
            chars.next();
        }
        if chars.peek() == Some(&'=') {
            chars.next();
            keys.push(word);
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            while chars.next_if(|&c| c != ' ').is_some() {}
        }
        chars.next();
    }
    keys
}

#[tokio::test]
async fn ehlo_text_cannot_add_a_field_to_a_text_log_line() {
    let running = run_with_format("text").await;
    let line = accepted_line(&running).await;
    let keys = logfmt_keys(&line);
    assert!(!keys.iter().any(|k| k == "fake" || k == "forged"), "{line}");
    assert_eq!(keys.iter().filter(|k| *k == "client").count(), 1, "{line}");
    assert_eq!(keys.iter().filter(|k| *k == "helo").count(), 1, "{line}");
    assert!(!line.contains('\x1b'), "raw escape byte in {line:?}");
    assert!(line.contains(" é"), "non-ASCII text mangled in {line:?}");
}

#[tokio::test]
async fn ehlo_text_cannot_add_a_field_to_a_json_log_line() {
    let running = run_with_format("json").await;
    let line = accepted_line(&running).await;
    let record: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
    let fields = record["fields"].as_object().expect("fields");
    assert!(!fields.contains_key("fake"), "{line}");
    assert!(!fields.contains_key("forged"), "{line}");
    assert_eq!(fields["client"], CLIENT.to_string(), "{line}");
    assert_eq!(fields["helo"], HELO, "helo does not round-trip: {line}");
    assert_eq!(fields["mail_from"], MAIL_FROM, "{line}");
}

#[tokio::test]
async fn start_up_line_names_the_version() {
    let running = run_with_format("json").await;
    let mut line = None;
    let found = wait_for(|| {
        let text = std::fs::read_to_string(&running.log).unwrap_or_default();
        line = text
            .lines()
            .find(|l| l.contains("\"version\""))
            .map(str::to_owned);
        line.is_some()
    })
    .await;
    let text = std::fs::read_to_string(&running.log).unwrap_or_default();
    assert!(found, "no version in the log:\n{text}");
    let record: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
    assert_eq!(record["fields"]["version"], env!("CARGO_PKG_VERSION"));
}
