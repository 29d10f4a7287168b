//! `wardgate-gateway`: join a controller, then enforce its grants in front of clinical
//! resources.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use wardgate_common::proto::Secret;
use wardgate_gateway::control::{self, JoinOptions, RunOptions};
use wardgate_gateway::state::StateDir;

#[derive(Debug, Parser)]
#[command(
    name = "wardgate-gateway",
    version,
    about = "Wardgate gateway: the enforcement point in front of clinical resources"
)]
struct Cli {
    /// Where the gateway keeps its keys and registration.
    #[arg(long, env = "WARDGATE_GATEWAY_DIR", global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Registers with the controller using a single-use join token.
    Join {
        /// The controller's control-plane address (`host:port`, UDP).
        #[arg(long)]
        controller: String,
        /// The controller's CA certificate (ca.pem from its data directory).
        #[arg(long)]
        ca: PathBuf,
        /// The join token. Prefer WARDGATE_JOIN_TOKEN or --token-file.
        #[arg(long, env = "WARDGATE_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the join token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Where clients reach this gateway's WireGuard port (`host:port`).
        #[arg(long)]
        endpoint: String,
        /// A network this gateway serves (CIDR); default: the token's networks.
        #[arg(long = "network")]
        networks: Vec<String>,
    },
    /// Keeps the control connection up and enforces grants.
    Run {
        /// Heartbeat interval.
        #[arg(long, default_value = "10s")]
        heartbeat: humantime::Duration,
        /// Longest delay between reconnection attempts.
        #[arg(long, default_value = "30s")]
        max_backoff: humantime::Duration,
    },
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, one line, no backtrace: the message says what to do.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let dir = StateDir::resolve(cli.state_dir)?;
    match cli.cmd {
        Cmd::Join {
            controller,
            ca,
            token,
            token_file,
            endpoint,
            networks,
        } => {
            let token = match (token, token_file) {
                (Some(t), _) => t,
                (None, Some(f)) => String::from_utf8(wardgate_common::files::read_secret(&f)?)?
                    .trim()
                    .to_owned(),
                (None, None) => {
                    bail!("no join token: set WARDGATE_JOIN_TOKEN or pass --token-file")
                }
            };
            let ca_pem =
                std::fs::read(&ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let reg = control::join(
                &dir,
                JoinOptions {
                    controller,
                    ca_pem,
                    token: Secret::new(token),
                    endpoint,
                    networks,
                },
            )
            .await?;
            println!(
                "joined as gateway {} ({}) serving {}",
                reg.name,
                reg.gateway_id,
                reg.networks.join(", ")
            );
        }
        Cmd::Run {
            heartbeat,
            max_backoff,
        } => {
            let opts = RunOptions {
                heartbeat: heartbeat.into(),
                backoff_max: max_backoff.into(),
                ..RunOptions::default()
            };
            control::run(&dir, opts, wardgate_common::signal::shutdown()).await?;
        }
    }
    Ok(())
}
