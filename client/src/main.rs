//! `wardgate`: the Wardgate client.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wardgate_client::enrol::{self, EnrolOptions, EnrolOutcome};
use wardgate_client::login::{self, PasswordSource};
use wardgate_client::state::ConfigDir;
use wardgate_common::proto::Secret;

#[derive(Debug, Parser)]
#[command(
    name = "wardgate",
    version,
    about = "Wardgate: reach the clinical systems you are granted, and nothing else"
)]
struct Cli {
    /// Where this device's identity is kept.
    #[arg(long, env = "WARDGATE_CONFIG_DIR", global = true)]
    config_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Enrols this device with a controller (logs you in, makes the device key here).
    Enrol {
        /// The controller's address (`host:port`).
        #[arg(long)]
        controller: String,
        /// The controller's CA certificate, as handed out by your IT team.
        #[arg(long)]
        ca: PathBuf,
        /// Your user name.
        #[arg(long)]
        user: String,
        /// Read the password from the first line of stdin (else WARDGATE_PASSWORD, else a prompt).
        #[arg(long)]
        password_stdin: bool,
        /// A name for this device (default: the host name).
        #[arg(long)]
        device_name: Option<String>,
        /// How long to wait for an administrator's approval (0 = don't wait).
        #[arg(long, default_value = "10m")]
        wait: humantime::Duration,
    },
    /// Shows enrolment and connection state.
    Status,
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let dir = ConfigDir::resolve(cli.config_dir)?;
    match cli.cmd {
        Cmd::Enrol {
            controller,
            ca,
            user,
            password_stdin,
            device_name,
            wait,
        } => {
            let source = if password_stdin {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                PasswordSource::Given(Secret::new(line.trim_end_matches(['\r', '\n'])))
            } else if let Ok(p) = std::env::var("WARDGATE_PASSWORD") {
                PasswordSource::Given(Secret::new(p))
            } else {
                PasswordSource::Prompt
            };
            let login = login::local(&user, source)?;
            let ca_pem =
                std::fs::read(&ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let out = enrol::enrol(
                &dir,
                EnrolOptions {
                    controller,
                    ca_pem,
                    login,
                    device_name: device_name.unwrap_or_else(enrol::default_device_name),
                    wait: wait.into(),
                    poll_every: Duration::from_millis(500),
                },
            )
            .await?;
            let EnrolOutcome::Enrolled(rec) = out;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            } else {
                println!(
                    "Enrolled as device {} ({}) for {}",
                    rec.device_id, rec.device_name, rec.username
                );
            }
        }
        Cmd::Status => {
            let st = wardgate_client::status::status(&dir).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("Enrolment:  {}", st.enrolment);
                if let Some(id) = &st.device_id {
                    println!(
                        "Device:     {} ({})",
                        id,
                        st.device_name.as_deref().unwrap_or("")
                    );
                    println!("User:       {}", st.username.as_deref().unwrap_or(""));
                    println!("Controller: {}", st.controller.as_deref().unwrap_or(""));
                }
                println!("Connection: {}", st.connection);
                if let Some(e) = &st.connection_error {
                    println!("            {e}");
                }
            }
        }
    }
    Ok(())
}
