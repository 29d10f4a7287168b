//! `wardgate`: the Wardgate client.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
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
    /// Testing only: read the wall clock as the real one plus the offset (ms) in this file.
    /// Hidden; never set in production (see `wardgate_common::clock`).
    #[arg(long, global = true, hide = true)]
    test_clock: Option<PathBuf>,
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
        #[command(flatten)]
        auth: AuthArgs,
        /// A name for this device (default: the host name).
        #[arg(long)]
        device_name: Option<String>,
        /// How long to wait for an administrator's approval (0 = don't wait).
        #[arg(long, default_value = "10m")]
        wait: humantime::Duration,
    },
    /// Logs in again on this enrolled device: a new login session (connects need one; it
    /// ends after the session lifetime or when idle).
    Login {
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Shows enrolment and connection state, grants with time left, and the last denial.
    Status,
    /// Asks for access to a resource and brings the tunnel up until you stop it (Ctrl-C or
    /// `wardgate disconnect`), the grant is revoked, or a renewal is denied.
    Connect {
        /// The resource, e.g. `ehr-web`.
        resource: String,
        /// `tun` (admin rights) or `userspace` (no admin rights: local forwards, SOCKS5).
        #[arg(long, default_value = "userspace")]
        mode: String,
        /// Userspace mode: a local port forward `LOCAL_PORT` (to the resource's first port) or
        /// `LOCAL_PORT=HOST:PORT`; repeatable.
        #[arg(long = "forward")]
        forwards: Vec<String>,
        /// Userspace mode: serve SOCKS5 on this loopback address.
        #[arg(long)]
        socks: Option<std::net::SocketAddr>,
        /// TUN interface name.
        #[arg(long, default_value = "wardgate0")]
        tun_name: String,
    },
    /// Emergency access: breaks glass for a resource marked for emergencies, at once and for
    /// at most the policy's cap (not renewed), with a reason that is recorded, alerted and
    /// reviewed. Needs a multi-factor login (`wardgate login` with your one-time code).
    BreakGlass {
        /// The resource, e.g. `pacs`.
        resource: String,
        /// Why (required), e.g. "stroke code, CT review".
        #[arg(long, default_value = "")]
        reason: String,
        /// `tun` (admin rights) or `userspace` (no admin rights: local forwards, SOCKS5).
        #[arg(long, default_value = "userspace")]
        mode: String,
        /// Userspace mode: a local port forward `LOCAL_PORT` or `LOCAL_PORT=HOST:PORT`.
        #[arg(long = "forward")]
        forwards: Vec<String>,
        /// Userspace mode: serve SOCKS5 on this loopback address.
        #[arg(long)]
        socks: Option<std::net::SocketAddr>,
        /// TUN interface name.
        #[arg(long, default_value = "wardgate0")]
        tun_name: String,
    },
    /// Ends the running `connect` (the controller ends its grant at once).
    Disconnect,
    /// Asks for a window of access to a resource that needs approval (for this device only):
    /// `--from` (default now) and `--until` or `--for`. Someone in the policy's approvers
    /// group approves; `wardgate status` shows the state; `wardgate connect` works inside the
    /// approved window.
    Request {
        /// The resource, e.g. `mri-console`.
        resource: String,
        /// Start: `now`, `2026-03-24T14:00:00+01:00` or `2026-03-24T14:00[Europe/Berlin]`.
        #[arg(long)]
        from: Option<String>,
        /// End, written like --from.
        #[arg(long, conflicts_with = "length")]
        until: Option<String>,
        /// Length instead of an end, e.g. `2h`.
        #[arg(long = "for", id = "length")]
        length: Option<humantime::Duration>,
        /// Why (the approver and the audit log see it).
        #[arg(long)]
        reason: String,
        /// A ticket reference, e.g. INC-4411.
        #[arg(long)]
        ticket: Option<String>,
    },
    /// Shows what this device reports about itself (OS, disk encryption, firewall, screen lock,
    /// required processes) with the evidence for each fact; `--json` prints the report exactly
    /// as it would be sent.
    Posture {
        /// A process a posture profile requires (e.g. an EDR agent); repeatable.
        #[arg(long = "require-process", value_name = "NAME")]
        require_process: Vec<String>,
    },
    /// Makes a WireGuard key pair: private key to FILE (0600), public key to stdout.
    Genkey {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Brings up tunnels for grants given as files (what `connect` receives from the
    /// controller), for testing and for sites that hand out grants by other means.
    Tunnel {
        /// A grant file (JSON `ClientGrant`); repeat for several, each followed by its --key.
        #[arg(long = "grant", required = true)]
        grants: Vec<PathBuf>,
        /// The private key file for the grant at the same position.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// `tun` (needs admin rights) or `userspace`.
        #[arg(long, default_value = "userspace")]
        mode: String,
        /// TUN interface name.
        #[arg(long, default_value = "wardgate0")]
        tun_name: String,
        /// A local port forward `[ADDR:]PORT=RESOURCE:PORT` (userspace mode); repeatable.
        #[arg(long = "forward")]
        forwards: Vec<String>,
        /// A local UDP port forward `[ADDR:]PORT=RESOURCE:PORT` (userspace mode); repeatable.
        #[arg(long = "forward-udp")]
        udp_forwards: Vec<String>,
        /// Serve SOCKS5 on this loopback address (userspace mode).
        #[arg(long)]
        socks: Option<std::net::SocketAddr>,
    },
}

/// How the user logs in: a local user (password, one-time code) or an OpenID provider.
#[derive(Debug, clap::Args)]
struct AuthArgs {
    /// Your user name (local users; default for `login`: the device's user).
    #[arg(long)]
    user: Option<String>,
    /// Read the password from the first line of stdin, and the one-time code from the second
    /// line if there is one (else WARDGATE_PASSWORD, else a prompt).
    #[arg(long)]
    password_stdin: bool,
    /// The current one-time code from your authenticator app (accounts with TOTP).
    #[arg(long, env = "WARDGATE_TOTP", hide_env_values = true)]
    totp: Option<String>,
    /// Log in with this OpenID provider (its issuer URL) instead of a local user.
    #[arg(long, value_name = "ISSUER")]
    oidc: Option<String>,
    /// Wardgate's client id at the OpenID provider.
    #[arg(long, default_value = wardgate_client::oidc::DEFAULT_CLIENT_ID)]
    client_id: String,
    /// Scopes to ask the OpenID provider for.
    #[arg(long, default_value = wardgate_client::oidc::DEFAULT_SCOPE)]
    scope: String,
    /// Use the device flow (enter a code on another device) instead of a browser.
    #[arg(long)]
    device: bool,
    /// Only print the login URL; do not try to open a browser.
    #[arg(long)]
    no_browser: bool,
    /// Give up on an OpenID login after this long.
    #[arg(long, default_value = "5m")]
    login_timeout: humantime::Duration,
}

/// Builds the login from the arguments (running the OpenID flow when asked).
async fn make_login(
    auth: AuthArgs,
    default_user: Option<String>,
) -> anyhow::Result<wardgate_common::proto::Login> {
    if let Some(issuer) = auth.oidc {
        let opts = wardgate_client::oidc::OidcOptions {
            issuer,
            client_id: auth.client_id,
            scope: auth.scope,
            device: auth.device,
            open_browser: !auth.no_browser,
            timeout: auth.login_timeout.into(),
        };
        return Ok(wardgate_client::oidc::login(&opts).await?);
    }
    let user = auth
        .user
        .or(default_user)
        .context("give --user NAME (or --oidc ISSUER to log in with an identity provider)")?;
    let mut totp = auth.totp.map(Secret::new);
    let source = if auth.password_stdin {
        let mut stdin = std::io::stdin().lock();
        let mut line = String::new();
        stdin.read_line(&mut line)?;
        let mut code = String::new();
        if totp.is_none() && stdin.read_line(&mut code).unwrap_or(0) > 0 {
            totp = Some(Secret::new(code.trim()));
        }
        PasswordSource::Given(Secret::new(line.trim_end_matches(['\r', '\n'])))
    } else if let Ok(p) = std::env::var("WARDGATE_PASSWORD") {
        PasswordSource::Given(Secret::new(p))
    } else {
        PasswordSource::Prompt
    };
    Ok(login::local(&user, source, totp)?)
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
            auth,
            device_name,
            wait,
        } => {
            let login = make_login(auth, None).await?;
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
        Cmd::Login { auth } => {
            let default_user = dir.load()?.map(|r| r.username).filter(|u| !u.is_empty());
            let login = make_login(auth, default_user).await?;
            let s = login::relogin(&dir, login).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "Logged in as {} ({}{}), multi-factor: {}, groups: {}; session until {}",
                    s.username,
                    s.method,
                    s.provider
                        .as_deref()
                        .map(|p| format!(" via {p}"))
                        .unwrap_or_default(),
                    if s.mfa { "yes" } else { "no" },
                    if s.groups.is_empty() {
                        "none".to_owned()
                    } else {
                        s.groups.join(", ")
                    },
                    fmt_ms(s.expires_at_ms)
                );
            }
        }
        cmd @ (Cmd::Connect { .. } | Cmd::BreakGlass { .. }) => {
            let (resource, mode, forwards, socks, tun_name, break_glass) = match cmd {
                Cmd::Connect {
                    resource,
                    mode,
                    forwards,
                    socks,
                    tun_name,
                } => (resource, mode, forwards, socks, tun_name, None),
                Cmd::BreakGlass {
                    resource,
                    reason,
                    mode,
                    forwards,
                    socks,
                    tun_name,
                } => (resource, mode, forwards, socks, tun_name, Some(reason)),
                _ => unreachable!("matched above"),
            };
            let emergency = break_glass.is_some();
            let mut fw = Vec::new();
            for f in &forwards {
                match f.split_once('=') {
                    Some(_) => {
                        let (l, t) = parse_forward(f)?;
                        fw.push((l, Some(t)));
                    }
                    None => {
                        let port: u16 = f
                            .parse()
                            .with_context(|| format!("--forward {f:?}: expected a port"))?;
                        fw.push((std::net::SocketAddr::from(([127, 0, 0, 1], port)), None));
                    }
                }
            }
            let json = cli.json;
            let opts = wardgate_client::connect::ConnectOptions {
                resource: resource.clone(),
                tun: match mode.as_str() {
                    "tun" => true,
                    "userspace" => false,
                    other => bail!("unknown mode {other:?}: use tun or userspace"),
                },
                tun_name,
                forwards: fw,
                socks,
                posture: wardgate_client::posture::system_collect(),
                break_glass,
            };
            let r = wardgate_client::connect::connect(&dir, opts, wardgate_common::signal::shutdown(), |g, listening| {
                let cap_s = (g.expires_at_ms - wardgate_common::clock::now_ms()).max(0) / 1000;
                if json {
                    println!("{}", serde_json::json!({"event": "connected", "grant_id": g.grant_id, "resource": g.resource,
                        "expires_at_ms": g.expires_at_ms, "listening": listening, "break_glass": emergency}));
                } else if emergency {
                    println!("BREAK-GLASS access to {} (grant {}) until {} — at most {} min, not renewed; security has been alerted and the access will be reviewed",
                        g.resource, g.grant_id, fmt_ms(g.expires_at_ms), (cap_s + 59) / 60);
                } else {
                    println!("Connected to {} (grant {}), until {}", g.resource, g.grant_id, fmt_ms(g.expires_at_ms));
                    for l in listening {
                        println!("  listening on {l}");
                    }
                }
            })
            .await;
            match r {
                Ok(()) => println!("Disconnected from {resource}."),
                Err(e) => return Err(e.into()),
            }
        }
        Cmd::Disconnect => match wardgate_client::connect::current(&dir) {
            Some(st) => {
                let ok = std::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(st.pid.to_string())
                    .status()?
                    .success();
                if !ok {
                    bail!("cannot signal the running connect (pid {})", st.pid);
                }
                println!(
                    "Disconnecting from {} (grant {}).",
                    st.resource, st.grant_id
                );
            }
            None => println!("Not connected."),
        },
        Cmd::Posture { require_process } => {
            use wardgate_client::posture;
            let runner = posture::SystemRunner::default();
            let collector = posture::platform(posture::Host::system(&runner));
            let opts = posture::Options {
                required_processes: require_process,
                device_cert: Some(dir.cert()),
                counter: posture::next_counter(&dir)?,
            };
            let report = posture::report(collector.as_ref(), &opts);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", posture::render_table(&report));
            }
        }
        Cmd::Genkey { out } => {
            let k = wardgate_common::keys::generate_private();
            wardgate_common::files::write_secret(
                &out,
                wardgate_common::keys::encode_key(&k.to_bytes()).as_bytes(),
            )?;
            println!("{}", wardgate_common::keys::public_of(&k));
        }
        Cmd::Tunnel {
            grants,
            keys,
            mode,
            tun_name,
            forwards,
            udp_forwards,
            socks,
        } => {
            tunnel(grants, keys, mode, tun_name, forwards, udp_forwards, socks).await?;
        }
        Cmd::Request {
            resource,
            from,
            until,
            length,
            reason,
            ticket,
        } => {
            let r = wardgate_client::request::request(
                &dir,
                wardgate_client::request::Ask {
                    resource,
                    from,
                    until,
                    duration: length.map(Into::into),
                    reason,
                    ticket,
                },
            )
            .await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "Request {} for {} from {} until {} is {}: an approver has to approve it; \
                     `wardgate status` shows its state",
                    r.id,
                    r.resource,
                    fmt_ms(r.from_ms),
                    fmt_ms(r.until_ms),
                    r.state
                );
            }
        }
        Cmd::Status => {
            let st = wardgate_client::status::status(&dir).await?;
            let conn = wardgate_client::connect::current(&dir);
            let denial = wardgate_client::connect::last_denial(&dir);
            if cli.json {
                let mut v = serde_json::to_value(&st)?;
                v["grant"] = serde_json::to_value(&conn)?;
                v["last_denial"] = serde_json::to_value(&denial)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if let Some(c) = &conn {
                    let left = (c.expires_at_ms - wardgate_common::clock::now_ms()).max(0) / 1000;
                    println!(
                        "Grant:      {} (grant {}), {}m{}s left, renewal {}",
                        c.resource,
                        c.grant_id,
                        left / 60,
                        left % 60,
                        c.renewal
                    );
                }
                if let Some(d) = &denial {
                    println!("Last denial: {} at {}", d.resource, fmt_ms(d.at_ms));
                    for r in &d.reasons {
                        println!("  - {r}");
                    }
                }
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
                for r in st.requests.iter().flatten().take(10) {
                    println!(
                        "Request {}: {} {} from {} until {}{}{}",
                        r.id,
                        r.resource,
                        r.state,
                        fmt_ms(r.from_ms),
                        fmt_ms(r.until_ms),
                        r.approver
                            .as_deref()
                            .map(|a| format!(", by {a}"))
                            .unwrap_or_default(),
                        r.decision_reason
                            .as_deref()
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

fn fmt_ms(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn parse_forward(s: &str) -> anyhow::Result<(std::net::SocketAddr, std::net::SocketAddr)> {
    let (local, target) = s
        .split_once('=')
        .with_context(|| format!("--forward {s:?}: expected [ADDR:]PORT=RESOURCE:PORT"))?;
    let local: std::net::SocketAddr = match local.parse::<u16>() {
        Ok(port) => ([127, 0, 0, 1], port).into(),
        Err(_) => local
            .parse()
            .with_context(|| format!("--forward {s:?}: bad local address"))?,
    };
    let target = target
        .parse()
        .with_context(|| format!("--forward {s:?}: bad resource address"))?;
    Ok((local, target))
}

async fn tunnel(
    grant_files: Vec<PathBuf>,
    key_files: Vec<PathBuf>,
    mode: String,
    tun_name: String,
    forwards: Vec<String>,
    udp_forwards: Vec<String>,
    socks: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use wardgate_client::datapath::{self, KeyedGrant, Mode};
    if grant_files.len() != key_files.len() {
        anyhow::bail!("give one --key per --grant");
    }
    let mut grants = Vec::new();
    for (g, k) in grant_files.iter().zip(&key_files) {
        let grant: wardgate_common::grant::ClientGrant = serde_json::from_slice(
            &std::fs::read(g).with_context(|| format!("cannot read {}", g.display()))?,
        )
        .with_context(|| format!("{} is not a valid grant", g.display()))?;
        let key = wardgate_common::keys::decode_private(&String::from_utf8(
            wardgate_common::files::read_secret(k)?,
        )?)?;
        grants.push(KeyedGrant {
            grant,
            private_key: key,
        });
    }
    let rules: Vec<wardgate_common::rule::Rule> =
        grants.iter().flat_map(|g| g.grant.rules.clone()).collect();
    let mode = match mode.as_str() {
        "tun" => Mode::Tun { name: tun_name },
        "userspace" => {
            let forwards = forwards
                .iter()
                .map(|f| parse_forward(f))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let udp_forwards = udp_forwards
                .iter()
                .map(|f| parse_forward(f))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let allow_rules = rules.clone();
            Mode::Userspace {
                forwards,
                udp_forwards,
                socks,
                allow: Some(Arc::new(move |dst: std::net::SocketAddr| {
                    allow_rules.iter().any(|r| {
                        r.matches(
                            dst.ip(),
                            wardgate_common::packet::protocol::TCP,
                            Some(dst.port()),
                        )
                    })
                })),
                on_bound: Some(Arc::new(|addrs| {
                    for a in addrs {
                        println!("listening {a}");
                    }
                })),
            }
        }
        other => anyhow::bail!("unknown mode {other:?}: use tun or userspace"),
    };
    let (_handle, task) =
        datapath::start(mode, grants, wardgate_common::signal::shutdown()).await?;
    println!("ready");
    task.await?;
    Ok(())
}
