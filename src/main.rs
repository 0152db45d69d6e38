//! The `mailmoat` command: parse arguments, load the config, run.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailmoat::config::{Config, LogFormat};
use mailmoat::Server;

#[derive(Parser)]
#[command(name = "mailmoat", version, about = "Inbound SMTP abuse-shaping proxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (embedded defaults without -c).
    Run {
        /// Config file (TOML); keys left out take their defaults.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// Config file (TOML); keys left out take their defaults.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run the proxy before a built-in receiver on loopback with a legitimate
    /// sender and the attacks mailmoat exists for; print a report.
    #[command(
        after_help = "Exit status: 0 every claim of the report held, 2 one failed (named on stderr) or the demo could not run."
    )]
    Demo {
        /// How long the traffic runs.
        #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
    },
    /// Say whether an IP is blocked, and by which source and entry.
    ///
    /// Asks the running proxy (admin.listen in the config); when it does not
    /// answer, reads the lists, the API cache and the ban state on disk. The
    /// output says which answered.
    #[command(after_help = EXIT_STATUS)]
    Lookup {
        ip: std::net::IpAddr,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Do not ask the running proxy; read the files on disk.
        #[arg(long)]
        offline: bool,
    },
    /// List, add or remove bans in the running proxy.
    Bans {
        #[command(subcommand)]
        command: BansCmd,
    },
    /// Have the running proxy re-read its config, and say whether it took.
    ///
    /// Validates FILE first (as check-config), then asks the proxy through
    /// its admin API (admin.listen, admin.token_file). New sessions use the
    /// new config; open sessions finish under the old one. Keys that need a
    /// restart are named. SIGHUP reloads the same way, without the answer.
    #[command(after_help = "Exit status: 0 reloaded, 2 refused or no answer.")]
    Reload {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Blocklist tools.
    Blocklist {
        #[command(subcommand)]
        command: BlocklistCmd,
    },
}

const EXIT_STATUS: &str = "Exit status: 0 not blocked (or done), 1 blocked, 2 error (bad \
arguments, a refused request, or neither the proxy nor the files could answer).";

#[derive(Subcommand)]
enum BansCmd {
    /// Print the bans in force, in the blocklist text format (from the
    /// running proxy, else from autoban.state).
    #[command(after_help = EXIT_STATUS)]
    List {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Do not ask the running proxy; read autoban.state.
        #[arg(long)]
        offline: bool,
    },
    /// Ban an IP or CIDR (needs admin.token_file).
    #[command(after_help = EXIT_STATUS)]
    Add {
        /// IP or CIDR.
        net: String,
        /// How long (default: autoban.ttl), e.g. "1h", "7d".
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Lift a ban (needs admin.token_file).
    #[command(after_help = EXIT_STATUS)]
    Remove {
        /// IP or CIDR, as banned.
        net: String,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BlocklistCmd {
    /// Say which source and entry match an IP, offline (files, the API
    /// cache and the ban state, as the proxy would load them at start):
    /// `mailmoat lookup --offline`.
    #[command(after_help = EXIT_STATUS)]
    Check {
        /// The client address to look up.
        ip: std::net::IpAddr,
        /// Config file (TOML); keys left out take their defaults.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        // 2, as for bad arguments: `lookup` keeps 1 for "blocked".
        Err(e) => {
            eprintln!("mailmoat: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::CheckConfig { config } => {
            let config = load(config.as_deref())?;
            print!("{}", config.to_toml());
            eprintln!("config OK");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Blocklist {
            command: BlocklistCmd::Check { ip, config },
        } => {
            let config = load(config.as_deref())?;
            // Bad lines and unreadable sources are reported as warnings.
            // Colours only on a terminal: this output is piped and grepped.
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_max_level(tracing::Level::WARN)
                .init();
            Ok(mailmoat::cli::lookup(&config, ip, true).into())
        }
        Cmd::Lookup {
            ip,
            config,
            offline,
        } => {
            let config = load(config.as_deref())?;
            init_tool_logging();
            Ok(mailmoat::cli::lookup(&config, ip, offline).into())
        }
        Cmd::Bans { command } => {
            let status = match command {
                BansCmd::List { config, offline } => {
                    let config = load(config.as_deref())?;
                    init_tool_logging();
                    mailmoat::cli::list_bans(&config, offline)
                }
                BansCmd::Add { net, ttl, config } => {
                    mailmoat::cli::add_ban(&load(config.as_deref())?, &net, ttl)
                }
                BansCmd::Remove { net, config } => {
                    mailmoat::cli::remove_ban(&load(config.as_deref())?, &net)
                }
            };
            Ok(status.into())
        }
        Cmd::Reload { config } => Ok(mailmoat::cli::reload(&load(config.as_deref())?).into()),
        Cmd::Demo { duration } => {
            let config = Config::from_toml("[log]\nlevel = \"error\"\n", Path::new("<demo>"))?;
            init_logging(&config);
            raise_open_file_limit();
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let outcome = runtime.block_on(mailmoat::demo::run(mailmoat::demo::DemoOptions {
                duration,
            }))?;
            for claim in &outcome.failed_claims {
                eprintln!("mailmoat demo: claim failed: {claim}");
            }
            Ok(if outcome.failed_claims.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Cmd::Run { config: path } => {
            let config = load(path.as_deref())?;
            init_logging(&config);
            let shown = path
                .as_ref()
                .map_or_else(|| "<defaults>".into(), |p| p.display().to_string());
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = shown.as_str(),
                "mailmoat starting"
            );
            raise_open_file_limit();
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(async {
                let server = Server::bind(config).await?.reload_from(path);
                server.run(mailmoat::shutdown::signal()).await;
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(Config::load_or_defaults(path)?)
}

/// Warnings (an unreadable list, a bad line) on stderr, for the tools.
fn init_tool_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(tracing::Level::WARN)
        .init();
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Each relayed session holds two descriptors; the default soft limit of
/// 1024 would cap mailmoat at a few hundred clients.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
