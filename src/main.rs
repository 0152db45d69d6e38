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
    Demo {
        /// How long the traffic runs.
        #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
    },
    /// Blocklist tools.
    Blocklist {
        #[command(subcommand)]
        command: BlocklistCmd,
    },
}

#[derive(Subcommand)]
enum BlocklistCmd {
    /// Say which source and entry match an IP, offline (files and the API
    /// cache, as the proxy would load them at start).
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
        Err(e) => {
            eprintln!("mailmoat: {e:#}");
            ExitCode::FAILURE
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
            let lists = mailmoat::blocklist::load_offline(&config);
            println!("{ip}");
            for line in lists.explain(ip) {
                println!("  {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { duration } => {
            let config = Config::from_toml("[log]\nlevel = \"error\"\n", Path::new("<demo>"))?;
            init_logging(&config);
            raise_open_file_limit();
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(mailmoat::demo::run(mailmoat::demo::DemoOptions {
                duration,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { config: path } => {
            let config = load(path.as_deref())?;
            init_logging(&config);
            let path = path.map_or_else(|| "<defaults>".into(), |p| p.display().to_string());
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = path.as_str(),
                "mailmoat starting"
            );
            raise_open_file_limit();
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(async {
                let server = Server::bind(config).await?;
                server.run(mailmoat::shutdown::signal()).await;
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
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
