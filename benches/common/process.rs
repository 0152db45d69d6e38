//! Servers measured as child processes: the mailmoat release binary,
//! Debian's HAProxy, or this bench executable re-run in a server role.
//! Their CPU and memory are read from `/proc/PID`, apart from the client's,
//! which runs in the bench process.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::{Cpu, WAIT};

/// A server process under measurement, killed when dropped.
pub struct Process {
    pub name: &'static str,
    child: Child,
    /// Where it accepts clients.
    pub addr: SocketAddr,
}

impl Process {
    /// This bench executable again, with `env` set (the bench's `main`
    /// reads it and becomes a server), `args` after it, listening on
    /// `addr`. Its stderr is this process's.
    pub fn this_bench<I, S>(
        name: &'static str,
        env: (&str, &str),
        args: I,
        addr: SocketAddr,
    ) -> Process
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let child = Command::new(std::env::current_exe().expect("bench executable"))
            .env(env.0, env.1)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Process::started(name, child, addr, "its stderr")
    }

    /// `mailmoat run -c DIR/STEM.toml` with `config` written there, which
    /// must listen on `addr`; its log goes to `DIR/STEM.log`.
    pub fn mailmoat(dir: &Path, stem: &str, config: &str, addr: SocketAddr) -> Process {
        let path = dir.join(format!("{stem}.toml"));
        std::fs::write(&path, config).expect("write the mailmoat config");
        let log_path = dir.join(format!("{stem}.log"));
        let log = std::fs::File::create(&log_path).expect("mailmoat log");
        let child = Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .args(["run", "-c"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mailmoat");
        Process::started("mailmoat", child, addr, &log_path.display().to_string())
    }

    /// HAProxy in the foreground (`-db`, no master process: one PID holds
    /// all its threads) with `config` written to `DIR/STEM.cfg`, which
    /// must bind `addr`; its output goes to `DIR/STEM.log`. `None` when
    /// HAProxy is not installed.
    pub fn haproxy(dir: &Path, stem: &str, config: &str, addr: SocketAddr) -> Option<Process> {
        let binary = haproxy_binary()?;
        let path = dir.join(format!("{stem}.cfg"));
        std::fs::write(&path, config).expect("write the HAProxy config");
        let log_path = dir.join(format!("{stem}.log"));
        let log = std::fs::File::create(&log_path).expect("HAProxy log");
        let child = Command::new(binary)
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .expect("start HAProxy");
        Some(Process::started(
            "HAProxy",
            child,
            addr,
            &log_path.display().to_string(),
        ))
    }

    /// Waits until `addr` accepts (or the child exits, which fails the
    /// bench with the reason).
    pub fn started(name: &'static str, mut child: Child, addr: SocketAddr, log: &str) -> Process {
        wait_listening(name, &mut child, addr, log);
        Process { name, child, addr }
    }

    /// Waits until the child also accepts on `addr`, a second listener.
    pub fn also_listening(&mut self, addr: SocketAddr) {
        wait_listening(self.name, &mut self.child, addr, "its stderr");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU used so far, all threads (see [`super::process_cpu`]).
    pub fn cpu(&self) -> Cpu {
        super::process_cpu(self.pid()).unwrap_or_else(|| panic!("{} is gone", self.name))
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        super::rss_kib(&self.pid().to_string())
    }
}

fn wait_listening(name: &str, child: &mut Child, addr: SocketAddr, log: &str) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited ({status}) before listening on {addr}: see {log}");
        }
        assert!(Instant::now() < deadline, "{name} never listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `haproxy` on the PATH, or Debian's `/usr/sbin/haproxy` (not on a
/// user's PATH).
pub fn haproxy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|c| c.is_file())
}

/// "HAProxy version 2.6.12 …; Running on OpenSSL version : OpenSSL 3.0.…":
/// OpenSSL's version matters as much as HAProxy's to TLS figures.
pub fn haproxy_version() -> String {
    let output = haproxy_binary().and_then(|b| Command::new(b).arg("-vv").output().ok());
    let text = output.map_or_else(String::new, |o| {
        String::from_utf8_lossy(&o.stdout).into_owned()
    });
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map_or("?", str::trim)
            .to_string()
    };
    format!(
        "{}; {}",
        line("HAProxy version"),
        line("Running on OpenSSL")
    )
}
