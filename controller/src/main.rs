//! `wardgate-controller`: initialise, serve, and administer a Wardgate controller.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wardgate_controller::admin::cli::{AdminCmd, Conn};
use wardgate_controller::config::DataDir;
use wardgate_controller::run::{self, InitOptions};
use wardgate_controller::shutdown::cancel_pair;

#[derive(Debug, Parser)]
#[command(
    name = "wardgate-controller",
    version,
    about = "Wardgate controller: decides who may reach which clinical resource, and tells the gateways"
)]
struct Cli {
    /// The data directory (CA, keys, configuration, SQLite database).
    #[arg(long, env = "WARDGATE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Testing only: read the wall clock as the real one plus the offset (ms) in this file.
    /// Hidden; never set in production (see `wardgate_common::clock`).
    #[arg(long, global = true, hide = true)]
    test_clock: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Creates the data directory, the CA, the database and a one-time admin token.
    Init {
        /// The organisation, shown in the CA's name.
        #[arg(long, default_value = "Wardgate")]
        organisation: String,
        /// Database URL (`sqlite://…` or `postgres://…`); default: SQLite in the data directory.
        #[arg(long, env = "WARDGATE_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Where gateways and clients reach the control plane (UDP).
        #[arg(long, default_value = "0.0.0.0:4433")]
        quic_listen: SocketAddr,
        /// Where the admin API listens (TCP); keep it on a management network.
        #[arg(long, default_value = "127.0.0.1:8443")]
        admin_listen: SocketAddr,
        /// Extra DNS names or IP addresses for the controller's certificate.
        #[arg(long = "san")]
        server_names: Vec<String>,
        /// New devices wait for an administrator's approval before they get a certificate.
        #[arg(long)]
        require_device_approval: bool,
        /// Also write the admin token to this file (mode 0600), for automation.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
    },
    /// Runs the control plane and the admin API until SIGINT or SIGTERM.
    Serve,
    /// The tamper-evident audit log, read straight from the database (auditor tooling: it
    /// needs read access to the store, not an admin token, and trusts no running controller).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Administers a running controller through its admin API.
    Admin {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: AdminCmd,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Walks the hash chain; names the first broken row. Exits non-zero when broken.
    Verify,
    /// Writes events as JSON lines (who, what, when, why, with the facts used).
    Export {
        /// Only events at or after this instant (RFC 3339, e.g. 2026-11-27T00:00:00Z).
        #[arg(long)]
        since: Option<humantime::Timestamp>,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

async fn audit(dir: &DataDir, cmd: AuditCmd) -> anyhow::Result<()> {
    use std::io::Write;
    let config = wardgate_controller::config::ControllerConfig::load(dir)?;
    let store = wardgate_controller::store::Store::open(&config.database_url).await?;
    match cmd {
        AuditCmd::Verify => {
            let v = store.audit_verify().await?;
            store.close().await;
            match v {
                wardgate_controller::store::AuditVerification::Intact { count, last_hash } => {
                    println!("audit log intact: {count} events, last hash {last_hash}");
                }
                wardgate_controller::store::AuditVerification::Broken(b) => {
                    anyhow::bail!("audit log BROKEN at row {}: {b}", b.seq);
                }
            }
        }
        AuditCmd::Export { since, out } => {
            let since_ms = since.map(|t| wardgate_common::unix_ms(std::time::SystemTime::from(t)));
            let events = store.list_audit(since_ms, None).await?;
            store.close().await;
            let mut w: Box<dyn Write> = match &out {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot write {}", p.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            for e in events {
                let at = std::time::UNIX_EPOCH
                    + std::time::Duration::from_millis(u64::try_from(e.at_ms).unwrap_or(0));
                let line = serde_json::json!({
                    "seq": e.seq,
                    "at": humantime::format_rfc3339_millis(at).to_string(),
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "outcome": e.outcome,
                    "detail": e.detail,
                    "hash": e.hash,
                    "prev_hash": e.prev_hash,
                });
                writeln!(w, "{line}")?;
            }
            w.flush()?;
        }
    }
    Ok(())
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
    if let Some(f) = cli.test_clock.clone() {
        wardgate_common::clock::use_test_clock(f.clone());
        eprintln!(
            "warning: running on the test clock {} (testing only)",
            f.display()
        );
    }
    init_tracing();
    let dir = DataDir::resolve(cli.data_dir)?;
    match cli.cmd {
        Cmd::Init {
            organisation,
            database_url,
            quic_listen,
            admin_listen,
            server_names,
            require_device_approval,
            admin_token_file,
        } => {
            let out = run::init(
                &dir,
                &InitOptions {
                    organisation,
                    database_url,
                    quic_listen,
                    admin_listen,
                    server_names,
                    require_device_approval,
                },
            )
            .await?;
            if let Some(f) = admin_token_file {
                wardgate_common::files::write_secret(&f, out.admin_token.as_bytes())?;
            }
            println!(
                "Wardgate controller initialised in {}",
                dir.root().display()
            );
            println!(
                "CA certificate (give it to gateways and devices): {}",
                out.ca_cert_path.display()
            );
            println!("Admin token (shown once; it is stored only hashed):");
            println!("{}", out.admin_token);
        }
        Cmd::Serve => {
            let (handle, token) = cancel_pair();
            let running = run::start(&dir, token)
                .await
                .context("cannot start the controller")?;
            println!("quic={} admin={}", running.quic, running.admin);
            wardgate_common::signal::shutdown().await;
            tracing::info!("shutting down");
            handle.cancel();
            running.join().await;
        }
        Cmd::Audit(cmd) => audit(&dir, cmd).await?,
        Cmd::Admin { conn, cmd } => {
            wardgate_controller::admin::cli::run(conn, dir, cmd).await?;
        }
    }
    Ok(())
}
