//! `wardgate-gateway`: join a controller, then enforce its grants in front of clinical
//! resources.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use wardgate_common::proto::Secret;
use wardgate_gateway::control::{self, JoinOptions, RunOptions};
use wardgate_gateway::datapath::{self, BackendConfig, DatapathConfig};
use wardgate_gateway::local::{self, LocalRequest, LocalResponse};
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
    /// Testing only: read the wall clock as the real one plus the offset (ms) in this file.
    /// Hidden; never set in production (see `wardgate_common::clock`).
    #[arg(long, global = true, hide = true)]
    test_clock: Option<PathBuf>,
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
    /// Makes a WireGuard key pair: the private key goes to FILE (0600), the public key to
    /// stdout.
    Genkey {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs only the data plane, with grants installed through the local control socket
    /// (`grant add`) instead of a controller: for testing, benchmarks and isolated sites.
    Dataplane {
        /// WireGuard UDP listen address.
        #[arg(long, default_value = "0.0.0.0:51820")]
        listen: std::net::SocketAddr,
        /// The WireGuard private key file (see `genkey`).
        #[arg(long)]
        key_file: PathBuf,
        /// `userspace` (no root: a userspace TCP/IP stack opens sockets to resources) or `tun`.
        #[arg(long, default_value = "userspace")]
        mode: String,
        /// The prefix clients' tunnel addresses come from.
        #[arg(long, default_value = "100.64.0.0/10")]
        tunnel_net: ipnet::IpNet,
        /// The local control socket.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Installs or removes grants through the local control socket.
    #[command(subcommand)]
    Grant(GrantCmd),
    /// Prints the data plane's counters (per grant, drops by reason).
    Stats {
        /// The local control socket.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Keeps the control connection up and enforces grants.
    Run {
        /// WireGuard UDP listen address (default: the port of the registered endpoint).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// `userspace` (no root) or `tun`.
        #[arg(long, default_value = "userspace")]
        mode: String,
        /// The prefix clients' tunnel addresses come from.
        #[arg(long, default_value = "100.64.0.0/10")]
        tunnel_net: ipnet::IpNet,
        /// Also serve the local control socket here (counters; `stats --socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Run only the control connection, without a data plane.
        #[arg(long)]
        no_dataplane: bool,
        /// Userspace mode: dial flows to PUBLISHED at REAL instead (`PUBLISHED=REAL`, both
        /// `ip:port`), e.g. a resource published as 10.10.1.10:443 that listens on this
        /// host's loopback; repeatable.
        #[arg(long = "map")]
        maps: Vec<String>,
        /// Heartbeat interval.
        #[arg(long, default_value = "10s")]
        heartbeat: humantime::Duration,
        /// Longest delay between reconnection attempts.
        #[arg(long, default_value = "30s")]
        max_backoff: humantime::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum GrantCmd {
    /// Installs a grant from a JSON file (a `GatewayGrant`).
    Add {
        /// The local control socket.
        #[arg(long)]
        socket: PathBuf,
        /// The grant.
        #[arg(long)]
        file: PathBuf,
    },
    /// Removes a grant at once.
    Remove {
        /// The local control socket.
        #[arg(long)]
        socket: PathBuf,
        /// The grant id.
        grant_id: u64,
    },
}

async fn local(socket: &std::path::Path, req: LocalRequest) -> anyhow::Result<()> {
    match local::request(socket, &req).await? {
        LocalResponse::Error { message } => bail!("{message}"),
        LocalResponse::Stats { stats } => println!("{}", serde_json::to_string_pretty(&stats)?),
        other => println!("{}", serde_json::to_string(&other)?),
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
        Cmd::Genkey { out } => {
            let k = wardgate_common::keys::generate_private();
            wardgate_common::files::write_secret(
                &out,
                wardgate_common::keys::encode_key(&k.to_bytes()).as_bytes(),
            )?;
            println!("{}", wardgate_common::keys::public_of(&k));
        }
        Cmd::Dataplane {
            listen,
            key_file,
            mode,
            tunnel_net,
            socket,
        } => {
            let key = wardgate_common::keys::decode_private(&String::from_utf8(
                wardgate_common::files::read_secret(&key_file)?,
            )?)?;
            let backend = match mode.as_str() {
                "userspace" => BackendConfig::Userspace {
                    tunnel_net,
                    dialer: None,
                },
                "tun" => BackendConfig::Tun {
                    name: "wardgate0".into(),
                    tunnel_net,
                },
                other => bail!("unknown mode {other:?}: use userspace or tun"),
            };
            let (handle, task) = datapath::start(
                DatapathConfig {
                    listen,
                    private_key: key,
                    backend,
                    pep: Default::default(),
                },
                wardgate_common::signal::shutdown(),
            )
            .await?;
            let _server = local::serve(&socket, handle.clone(), local::Adds::Allowed).await?;
            println!("listening={}", handle.local_addr());
            task.await?;
            let _ = std::fs::remove_file(&socket);
        }
        Cmd::Grant(GrantCmd::Add { socket, file }) => {
            let grant = serde_json::from_slice(
                &std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?,
            )
            .context("the grant file is not a valid grant")?;
            local(&socket, LocalRequest::Add { grant }).await?;
        }
        Cmd::Grant(GrantCmd::Remove { socket, grant_id }) => {
            local(&socket, LocalRequest::Remove { grant_id }).await?;
        }
        Cmd::Stats { socket } => local(&socket, LocalRequest::Stats).await?,
        Cmd::Run {
            heartbeat,
            max_backoff,
            listen,
            mode,
            tunnel_net,
            socket,
            no_dataplane,
            maps,
        } => {
            let mut pairs = Vec::new();
            for m in &maps {
                let (a, b) = m
                    .split_once('=')
                    .with_context(|| format!("--map {m:?}: expected PUBLISHED=REAL"))?;
                pairs.push((
                    a.parse().with_context(|| format!("--map {m:?}"))?,
                    b.parse().with_context(|| format!("--map {m:?}"))?,
                ));
            }
            let dialer: Option<std::sync::Arc<dyn wardgate_gateway::datapath::DynDialer>> =
                (!pairs.is_empty()).then(|| {
                    std::sync::Arc::new(wardgate_gateway::datapath::MapDialer::new(pairs)) as _
                });
            let opts = RunOptions {
                heartbeat: heartbeat.into(),
                backoff_max: max_backoff.into(),
                ..RunOptions::default()
            };
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let stop = move || {
                let mut rx = stop_rx.clone();
                async move {
                    let _ = rx.wait_for(|v| *v).await;
                }
            };
            let mut dp_task = None;
            let handle = if no_dataplane {
                None
            } else {
                let reg = dir.load()?;
                let listen = match listen {
                    Some(l) => l,
                    None => {
                        let port: u16 = reg
                            .endpoint
                            .rsplit_once(':')
                            .and_then(|(_, p)| p.parse().ok())
                            .context("the registered endpoint has no port; pass --listen")?;
                        std::net::SocketAddr::from(([0, 0, 0, 0], port))
                    }
                };
                let key = wardgate_common::keys::decode_private(&String::from_utf8(
                    wardgate_common::files::read_secret(&dir.wg_key())?,
                )?)?;
                let backend = match mode.as_str() {
                    "userspace" => BackendConfig::Userspace { tunnel_net, dialer },
                    "tun" => BackendConfig::Tun {
                        name: "wardgate0".into(),
                        tunnel_net,
                    },
                    other => bail!("unknown mode {other:?}: use userspace or tun"),
                };
                let (handle, task) = datapath::start(
                    DatapathConfig {
                        listen,
                        private_key: key,
                        backend,
                        pep: Default::default(),
                    },
                    stop(),
                )
                .await?;
                if let Some(sock) = &socket {
                    local::serve(sock, handle.clone(), local::Adds::ControllerOnly).await?;
                }
                println!("listening={}", handle.local_addr());
                dp_task = Some(task);
                Some(handle)
            };
            let stop_tx = std::sync::Arc::new(stop_tx);
            let on_signal = stop_tx.clone();
            tokio::spawn(async move {
                wardgate_common::signal::shutdown().await;
                let _ = on_signal.send(true);
            });
            let result = control::run(&dir, opts, handle, stop()).await;
            // Refused for good (revoked): stop forwarding too — fail closed.
            let _ = stop_tx.send(true);
            if let Some(t) = dp_task {
                let _ = t.await;
            }
            result?;
        }
    }
    Ok(())
}
