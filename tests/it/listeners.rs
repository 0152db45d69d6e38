//! `[[listener]]` tables through the real binary: `check-config` reports
//! every listener mistake at once; `run` and `reload` bind every listener
//! (server.listen and the tables alike) and name the key of one that
//! cannot bind.

use std::net::{Ipv4Addr, SocketAddr};

use crate::harness::*;

const NO_BANS: &str =
    "[autoban]\nearly_talker = 0\nauth_failures = 0\nlimit_violations = 0\nprotocol_errors = 0\n";

/// Listens on `listen` (server.listen) and on each of `tables` as a
/// `[[listener]]` with the default mode, relaying to `upstream`.
fn config_text(
    listen: SocketAddr,
    tables: &[SocketAddr],
    admin: SocketAddr,
    upstream: SocketAddr,
) -> String {
    let tables: String = tables
        .iter()
        .map(|a| format!("[[listener]]\naddress = \"{a}\"\n"))
        .collect();
    format!(
        "[server]\nlisten = [\"{listen}\"]\n{tables}[upstream]\nservers = [\"{upstream}\"]\n\
         [timeouts]\ngreet_pause = \"0s\"\n[admin]\nlisten = \"{admin}\"\ntoken_file = \"token\"\n{NO_BANS}"
    )
}

/// A session's first MAIL FROM reply, through the proxy at `addr`.
async fn mail_from(ip: Ipv4Addr, addr: SocketAddr) -> String {
    let mut raw = Raw::connect_when_ready(ip, addr).await;
    raw.expect("220 ").await;
    raw.send(b"EHLO x\r\n").await;
    raw.expect("250").await;
    raw.send(b"MAIL FROM:<a@b>\r\n").await;
    raw.reply().await
}

#[tokio::test]
async fn check_config_reports_every_listener_mistake_at_once() {
    let dir = TempDir::new("listener-mistakes");
    let path = dir.write(
        "m.toml",
        "[[listener]]\n\
         address = \"0.0.0.0:587\"\n\
         tls = \"starttls\"\n\
         [[listener]]\n\
         address = \"0.0.0.0:587\"\n\
         [[listener]]\n\
         address = \"0.0.0.0:2525\"\n\
         require_tls = true\n\
         [upstream]\n\
         servers = [\"192.0.2.1:10025\"]\n",
    );
    let run = mailmoat_run(&["check-config", "-c", path.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let file = path.display();
    for expected in [
        format!("{file}: 3 problems in the config"),
        format!(
            "{file}:3: listener[1].tls = \"starttls\": mailmoat terminates TLS here, so it \
             needs tls.certificate and tls.key"
        ),
        format!(
            "{file}:5: listener[2].address = \"0.0.0.0:587\" is also listener[1].address = \
             \"0.0.0.0:587\" (line 2)"
        ),
        format!(
            "{file}:8: listener[3].require_tls = true can never be met with tls = \
             \"passthrough\""
        ),
    ] {
        assert!(
            run.stderr.contains(&expected),
            "{expected:?} not in {}",
            run.stderr
        );
    }
}

#[tokio::test]
async fn run_names_the_listener_whose_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let dir = TempDir::new("listener-taken");
    let path = dir.write(
        "m.toml",
        &config_text(
            unused_addr(),
            &[unused_addr(), taken_addr],
            unused_addr(),
            unused_addr(),
        ),
    );
    let run = mailmoat_run(&["run", "-c", path.to_str().unwrap()]).await;
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    let expected = format!("cannot listen on {taken_addr} (listener[2].address)");
    assert!(
        run.stderr.contains(&expected),
        "{expected:?} not in {}",
        run.stderr
    );
}

#[tokio::test]
async fn every_listener_relays_and_a_reload_binds_new_tables_and_stops_removed_ones() {
    let sink = sink().await;
    let (listen, first, second, admin) =
        (unused_addr(), unused_addr(), unused_addr(), unused_addr());
    let dir = TempDir::new("listener-reload");
    dir.write("token", "secret\n");
    let config = dir.write(
        "mailmoat.toml",
        &config_text(listen, &[first], admin, sink.addr()),
    );
    let log = dir.path().join("stderr.log");
    let _proxy = mailmoat_logged(&config, &log);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    for (i, addr) in [listen, first].into_iter().enumerate() {
        let reply = mail_from(Ipv4Addr::new(127, 0, 0, 2 + i as u8), addr).await;
        assert!(
            reply.starts_with("250"),
            "{addr}: {reply}; log:\n{}",
            logs()
        );
    }

    dir.write(
        "mailmoat.toml",
        &config_text(listen, &[second], admin, sink.addr()),
    );
    let run = mailmoat_run(&["reload", "-c", config.to_str().unwrap()]).await;
    assert_eq!(
        run.code,
        Some(0),
        "{}{}; log:\n{}",
        run.stdout,
        run.stderr,
        logs()
    );
    let reply = mail_from(Ipv4Addr::new(127, 0, 0, 4), second).await;
    assert!(reply.starts_with("250"), "{reply}; log:\n{}", logs());
    assert!(
        wait_refused(first).await,
        "still accepting on the removed listener"
    );

    // A table whose address is taken refuses the reload, naming its key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    dir.write(
        "mailmoat.toml",
        &config_text(listen, &[second, taken_addr], admin, sink.addr()),
    );
    let run = mailmoat_run(&["reload", "-c", config.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(2), "{}{}", run.stdout, run.stderr);
    let expected = format!("cannot listen on {taken_addr} (listener[2].address)");
    assert!(
        run.stderr.contains(&expected),
        "{expected:?} not in {}",
        run.stderr
    );
    let reply = mail_from(Ipv4Addr::new(127, 0, 0, 5), second).await;
    assert!(reply.starts_with("250"), "{reply}; log:\n{}", logs());
}
