//! `wardgate-controller admin …`: the admin CLI, a thin client of the admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wardgate_common::pki::CONTROLLER_NAME;
use wardgate_common::proto::Secret;

use super::types::*;
use crate::config::{DataDir, Endpoints};

/// How the CLI finds and authenticates to the API.
#[derive(Debug, Args)]
pub struct Conn {
    /// The admin API address (`host:port`). Default: the one the controller in --data-dir bound.
    #[arg(long, env = "WARDGATE_ADMIN_URL")]
    pub url: Option<String>,
    /// The admin token. Prefer the environment variable or --token-file over the command line.
    #[arg(long, env = "WARDGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the admin token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The controller's CA certificate. Default: ca.pem in --data-dir.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Admin commands.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Gateways: join tokens, list, revoke.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Devices: list, approve, deny, revoke.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Local users.
    #[command(subcommand)]
    User(UserCmd),
    /// Runtime settings.
    #[command(subcommand)]
    Settings(SettingsCmd),
}

/// Gateway commands.
#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// Makes a single-use join token for a new gateway.
    Token {
        /// The gateway's name.
        #[arg(long)]
        name: String,
        /// A network the gateway serves (CIDR); repeat for several.
        #[arg(long = "network", required = true)]
        networks: Vec<String>,
        /// How long the token is valid, e.g. `30m`, `1h`, `2d` (at most 7 days).
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
    /// Lists gateways.
    List,
    /// Revokes a gateway: its certificate stops working at once.
    Revoke {
        /// Gateway id.
        id: String,
    },
}

/// Device commands.
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Lists devices.
    List,
    /// Approves a pending device.
    Approve {
        /// Device id.
        id: String,
    },
    /// Denies a pending device.
    Deny {
        /// Device id.
        id: String,
    },
    /// Revokes a device: it is disconnected and can't connect again.
    Revoke {
        /// Device id.
        id: String,
    },
}

/// User commands.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Creates a local user. The password is read from stdin (first line) or
    /// WARDGATE_NEW_PASSWORD, never from the command line.
    Create {
        /// Login name.
        username: String,
        /// Display name.
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Lists users.
    List,
}

/// Settings commands.
#[derive(Debug, Subcommand)]
pub enum SettingsCmd {
    /// Shows the settings.
    Show,
    /// Changes settings.
    Set {
        /// New devices wait for an administrator's approval.
        #[arg(long)]
        enrolment_requires_approval: bool,
    },
}

/// A client of the admin API.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// Builds a client that trusts only `ca_pem` and sends `token`.
    pub fn new(addr: SocketAddr, ca_pem: &[u8], token: String) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in wardgate_common::pki::certs_from_pem("CA certificate", ca_pem)? {
            roots.add(c).context("the CA certificate is not usable")?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(wardgate_common::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(Arc::new(roots))
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .resolve(CONTROLLER_NAME, addr)
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            base: format!("https://{CONTROLLER_NAME}:{}", addr.port()),
            token,
        })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .context("cannot reach the admin API; is `wardgate-controller serve` running?")?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => bail!("{} ({}, HTTP {})", e.message, e.error, status.as_u16()),
                Err(_) => bail!("the admin API answered HTTP {status}"),
            }
        }
        serde_json::from_slice(&bytes).context("unexpected answer from the admin API")
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// POST `body` to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// PUT `body` to `path`.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }
}

async fn resolve_addr(s: &str) -> anyhow::Result<SocketAddr> {
    let s = s.trim_start_matches("https://").trim_end_matches('/');
    tokio::net::lookup_host(s)
        .await
        .with_context(|| format!("cannot resolve {s}"))?
        .next()
        .with_context(|| format!("{s} resolves to no address"))
}

/// Builds the client from flags, environment and the data directory.
pub async fn client(conn: &Conn, data_dir: &DataDir) -> anyhow::Result<AdminClient> {
    let addr = match &conn.url {
        Some(u) => resolve_addr(u).await?,
        None => {
            let p = data_dir.endpoints();
            let bytes = std::fs::read(&p).with_context(|| {
                format!("no --url given and {} is missing; is the controller running with this --data-dir?", p.display())
            })?;
            let ep: Endpoints = serde_json::from_slice(&bytes)?;
            let mut a = ep.admin;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a
        }
    };
    let ca_path = conn.ca.clone().unwrap_or_else(|| data_dir.ca_cert());
    let ca = std::fs::read(&ca_path)
        .with_context(|| format!("cannot read the CA certificate {}", ca_path.display()))?;
    let token = match (&conn.token, &conn.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => String::from_utf8(wardgate_common::files::read_secret(f)?)?
            .trim()
            .to_owned(),
        (None, None) => bail!("no admin token: set WARDGATE_ADMIN_TOKEN or pass --token-file"),
    };
    AdminClient::new(addr, &ca, token)
}

fn print<T: Serialize>(json: bool, v: &T, text: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{}", text(v));
    }
    Ok(())
}

fn read_new_password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("WARDGATE_NEW_PASSWORD") {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let p = line.trim_end_matches(['\r', '\n']).to_owned();
    if p.is_empty() {
        bail!("no password: write it on stdin or set WARDGATE_NEW_PASSWORD");
    }
    Ok(p)
}

/// Runs one admin command.
pub async fn run(conn: Conn, data_dir: DataDir, cmd: AdminCmd) -> anyhow::Result<()> {
    let c = client(&conn, &data_dir).await?;
    let json = conn.json;
    match cmd {
        AdminCmd::Gateway(GatewayCmd::Token {
            name,
            networks,
            ttl,
        }) => {
            let r: JoinTokenCreated = c
                .post(
                    "/api/v1/gateway-tokens",
                    &CreateJoinToken {
                        name,
                        networks,
                        ttl_seconds: Some(ttl.as_secs()),
                    },
                )
                .await?;
            print(json, &r, |r| {
                format!(
                    "Join token for gateway {} (single-use, valid until {}):\n{}",
                    r.gateway_name,
                    fmt_ms(r.expires_ms),
                    r.token
                )
            })
        }
        AdminCmd::Gateway(GatewayCmd::List) => {
            let r: Vec<GatewayView> = c.get("/api/v1/gateways").await?;
            print(json, &r, |r| {
                let mut s = format!(
                    "{:<20} {:<16} {:<8} {:<7} {:<22} NETWORKS",
                    "ID", "NAME", "STATUS", "ONLINE", "ENDPOINT"
                );
                for g in r {
                    s.push_str(&format!(
                        "\n{:<20} {:<16} {:<8} {:<7} {:<22} {}",
                        g.id,
                        g.name,
                        g.status,
                        if g.online { "yes" } else { "no" },
                        g.endpoint,
                        g.networks.join(",")
                    ));
                }
                s
            })
        }
        AdminCmd::Gateway(GatewayCmd::Revoke { id }) => {
            let r: serde_json::Value = c
                .post(&format!("/api/v1/gateways/{id}/revoke"), &())
                .await?;
            print(json, &r, |_| format!("gateway {id} revoked"))
        }
        AdminCmd::Device(cmd) => {
            let (id, action) = match cmd {
                DeviceCmd::Approve { id } => (id, "approve"),
                DeviceCmd::Deny { id } => (id, "deny"),
                DeviceCmd::Revoke { id } => (id, "revoke"),
                DeviceCmd::List => {
                    let r: Vec<DeviceView> = c.get("/api/v1/devices").await?;
                    return print(json, &r, |r| {
                        let mut s = format!(
                            "{:<21} {:<20} {:<12} {:<9} {:<7} OS",
                            "ID", "NAME", "OWNER", "STATUS", "ONLINE"
                        );
                        for d in r {
                            s.push_str(&format!(
                                "\n{:<21} {:<20} {:<12} {:<9} {:<7} {}",
                                d.id,
                                d.name,
                                d.owner,
                                d.status,
                                if d.online { "yes" } else { "no" },
                                d.os
                            ));
                        }
                        s
                    });
                }
            };

            let r: DeviceView = c
                .post(&format!("/api/v1/devices/{id}/{action}"), &())
                .await?;
            print(json, &r, |d| {
                format!("device {} ({}) is now {}", d.id, d.name, d.status)
            })
        }
        AdminCmd::User(UserCmd::Create {
            username,
            display_name,
        }) => {
            let password = Secret::new(read_new_password()?);
            let r: UserView = c
                .post(
                    "/api/v1/users",
                    &CreateUser {
                        username,
                        display_name,
                        password,
                    },
                )
                .await?;
            print(json, &r, |u| {
                format!("user {} created ({})", u.username, u.id)
            })
        }
        AdminCmd::User(UserCmd::List) => {
            let r: Vec<UserView> = c.get("/api/v1/users").await?;
            print(json, &r, |r| {
                let mut s = format!("{:<22} {:<16} {:<9} NAME", "ID", "USERNAME", "DISABLED");
                for u in r {
                    s.push_str(&format!(
                        "\n{:<22} {:<16} {:<9} {}",
                        u.id, u.username, u.disabled, u.display_name
                    ));
                }
                s
            })
        }
        AdminCmd::Settings(SettingsCmd::Show) => {
            let r: Settings = c.get("/api/v1/settings").await?;
            print(json, &r, |s| {
                format!(
                    "enrolment requires approval: {}",
                    s.enrolment_requires_approval
                )
            })
        }
        AdminCmd::Settings(SettingsCmd::Set {
            enrolment_requires_approval,
        }) => {
            let r: Settings = c
                .put(
                    "/api/v1/settings",
                    &Settings {
                        enrolment_requires_approval,
                    },
                )
                .await?;
            print(json, &r, |s| {
                format!(
                    "enrolment requires approval: {}",
                    s.enrolment_requires_approval
                )
            })
        }
    }
}

/// Formats ms since the epoch as RFC 3339 UTC.
pub fn fmt_ms(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}
