//! `wardgate-bench`: end-to-end benchmarks of the real binaries, and (`node …`) the small test
//! servers and clients that benches and tests run inside network namespaces.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wardgate::node;

#[derive(Debug, Parser)]
#[command(
    name = "wardgate-bench",
    about = "Wardgate end-to-end benchmarks and test-network endpoints"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Data-plane throughput and memory in network namespaces (root); prints one JSON object.
    Dataplane {
        /// Print JSON (the only format; accepted for the documented command line).
        #[arg(long)]
        json: bool,
        /// Bytes per transfer.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Transfers per figure (median reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Other grants installed for the scale figure.
        #[arg(long, default_value_t = 10_000)]
        peers: u32,
    },
    /// Access latency and throughput with the real binaries on loopback (no root); prints one
    /// JSON object.
    Access {
        /// Print JSON (the only format; accepted for the documented command line).
        #[arg(long)]
        json: bool,
        /// Connect runs.
        #[arg(long, default_value_t = 100)]
        connects: usize,
        /// Revoke runs.
        #[arg(long, default_value_t = 30)]
        revokes: usize,
    },
    /// A test-network endpoint (used by end-to-end tests and benches).
    #[command(subcommand)]
    Node(NodeCmd),
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Serve a fixed HTTP answer.
    Http {
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// One HTTP GET; prints the body.
    Get {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
        /// Give up after this long.
        #[arg(long, default_value = "10s")]
        timeout: humantime::Duration,
    },
    /// One HTTP GET through a SOCKS5 proxy; prints the body.
    SocksGet {
        /// The proxy.
        #[arg(long)]
        proxy: SocketAddr,
        /// The server behind it.
        #[arg(long)]
        to: SocketAddr,
        /// Give up after this long.
        #[arg(long, default_value = "10s")]
        timeout: humantime::Duration,
    },
    /// Receive TCP streams and answer their length and SHA-256.
    Sink {
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send test data to a sink and check its hash; prints JSON.
    Send {
        /// Sink address.
        #[arg(long)]
        to: SocketAddr,
        /// How many bytes.
        #[arg(long)]
        bytes: u64,
        /// Give up after this long.
        #[arg(long, default_value = "300s")]
        timeout: humantime::Duration,
    },
    /// Echo UDP datagrams.
    UdpEcho {
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send numbered UDP datagrams to an echo server; prints how many came back.
    UdpPing {
        /// Echo server.
        #[arg(long)]
        to: SocketAddr,
        /// How many.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Wait per datagram.
        #[arg(long, default_value = "1s")]
        timeout: humantime::Duration,
    },
    /// Write TCP SYNs the grant may not allow straight into its tunnel (a misbehaving client);
    /// prints JSON with the replies seen.
    SynAttack {
        /// The grant file.
        #[arg(long)]
        grant: std::path::PathBuf,
        /// The grant's private key file.
        #[arg(long)]
        key: std::path::PathBuf,
        /// Source address to write (may be spoofed).
        #[arg(long)]
        src: std::net::Ipv4Addr,
        /// Targets (repeat for a scan).
        #[arg(long, required = true)]
        to: Vec<SocketAddr>,
        /// How many SYNs to each target.
        #[arg(long, default_value_t = 5)]
        count: u32,
        /// How long to listen for replies.
        #[arg(long, default_value = "2s")]
        listen: humantime::Duration,
    },
    /// Ask the controller for a real grant with an enrolled device's certificate and a key made
    /// here, write the grant and the key for `syn-attack`, print `ready`, and hold the session
    /// until killed: what a tampered client would do.
    RogueGrant {
        /// The enrolled device's `wardgate` config directory.
        #[arg(long)]
        config: std::path::PathBuf,
        /// The resource.
        #[arg(long)]
        resource: String,
        /// Where to write the grant (JSON).
        #[arg(long)]
        grant_out: std::path::PathBuf,
        /// Where to write the private key.
        #[arg(long)]
        key_out: std::path::PathBuf,
    },
    /// Send this machine's posture report with an enrolled device's certificate and a chosen
    /// counter (an old one: a replay) and print the controller's answer as JSON.
    PostureReport {
        /// The enrolled device's `wardgate` config directory.
        #[arg(long)]
        config: std::path::PathBuf,
        /// The counter the report carries.
        #[arg(long)]
        counter: u64,
    },
    /// Send malformed datagrams to a WireGuard port.
    Junk {
        /// Target.
        #[arg(long)]
        to: SocketAddr,
        /// How many.
        #[arg(long, default_value_t = 1000)]
        count: u32,
    },
    /// Try one TCP connection; exit 0 if it was established.
    Probe {
        /// Target.
        #[arg(long)]
        to: SocketAddr,
        /// Give up after this long.
        #[arg(long, default_value = "2s")]
        timeout: humantime::Duration,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match cli.cmd {
        Cmd::Dataplane {
            json: _,
            bytes,
            runs,
            peers,
        } => {
            wardgate::build::build_siblings()?;
            let opts = wardgate::bench::Options {
                bytes,
                runs,
                extra_peers: peers,
            };
            let report =
                tokio::task::spawn_blocking(move || wardgate::bench::dataplane(&opts)).await??;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Cmd::Access {
            json: _,
            connects,
            revokes,
        } => {
            wardgate::build::build_siblings()?;
            let report = tokio::task::spawn_blocking(move || {
                wardgate::access_bench::access(connects, revokes)
            })
            .await??;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Cmd::Node(n) => match n {
            NodeCmd::Http { listen } => node::http(listen).await?,
            NodeCmd::Get { to, timeout } => {
                print!("{}", node::http_get(to, timeout.into()).await?);
            }
            NodeCmd::SocksGet { proxy, to, timeout } => {
                print!("{}", node::socks_get(proxy, to, timeout.into()).await?);
            }
            NodeCmd::Sink { listen } => node::tcp_sink(listen).await?,
            NodeCmd::Send { to, bytes, timeout } => {
                let t = node::tcp_send(to, bytes, timeout.into()).await?;
                println!("{}", serde_json::to_string(&t)?);
                if !t.hash_ok {
                    return Ok(ExitCode::FAILURE);
                }
            }
            NodeCmd::UdpEcho { listen } => node::udp_echo(listen).await?,
            NodeCmd::UdpPing { to, count, timeout } => {
                let ok = node::udp_ping(to, count, timeout.into()).await?;
                println!("{ok}");
                if ok == 0 {
                    return Ok(ExitCode::FAILURE);
                }
            }
            NodeCmd::RogueGrant {
                config,
                resource,
                grant_out,
                key_out,
            } => {
                wardgate::attack::rogue_grant(&config, &resource, &grant_out, &key_out).await?;
            }
            NodeCmd::PostureReport { config, counter } => {
                let a = wardgate::attack::send_posture(&config, counter).await?;
                println!("{}", serde_json::to_string(&a)?);
            }
            NodeCmd::SynAttack {
                grant,
                key,
                src,
                to,
                count,
                listen,
            } => {
                let g: wardgate_common::grant::ClientGrant =
                    serde_json::from_slice(&std::fs::read(&grant)?)?;
                let k = wardgate_common::keys::decode_private(&String::from_utf8(std::fs::read(
                    &key,
                )?)?)?;
                let r = wardgate::attack::syn_attack(&g, k, src, &to, count, listen.into()).await?;
                println!("{}", serde_json::to_string(&r)?);
            }
            NodeCmd::Junk { to, count } => {
                let n = wardgate::attack::junk(to, count).await?;
                println!("{n}");
            }
            NodeCmd::Probe { to, timeout } => {
                let d: Duration = timeout.into();
                return Ok(if node::tcp_probe(to, d).await {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
