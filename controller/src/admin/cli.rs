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
    /// Groups and their members.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Resources (JSON documents: name, addresses, rules, gateways, labels).
    #[command(subcommand)]
    Resource(DocCmd),
    /// Policies (JSON documents: name, groups, resources, conditions).
    #[command(subcommand)]
    Policy(DocCmd),
    /// Device posture profiles that policies name (JSON documents: name, firewall_required,
    /// min_os_version, required_processes, max_report_age, …).
    #[command(subcommand)]
    PostureProfile(DocCmd),
    /// Would this user get this resource now? Why not?
    DryRun {
        /// The user.
        #[arg(long)]
        user: String,
        /// The resource.
        #[arg(long)]
        resource: String,
    },
    /// Live grants.
    #[command(subcommand)]
    Grant(GrantCmd),
    /// The break-glass review queue.
    #[command(subcommand)]
    BreakGlass(BreakGlassCmd),
    /// Webhook sinks for notifications (break-glass, terminations, …).
    #[command(subcommand)]
    Webhook(WebhookCmd),
    /// Vendor organisations: sponsor, contract, members.
    #[command(subcommand)]
    Vendor(VendorCmd),
    /// Access requests: list, approve, deny, revoke.
    #[command(subcommand)]
    Request(RequestCmd),
}

/// Break-glass commands.
#[derive(Debug, Subcommand)]
pub enum BreakGlassCmd {
    /// Lists break-glass events.
    List {
        /// Only those not yet reviewed.
        #[arg(long)]
        unreviewed: bool,
        /// Only those unreviewed for longer than the overdue setting.
        #[arg(long)]
        overdue: bool,
    },
    /// Closes an event with a comment (required).
    Review {
        /// The event id (`bg_…`).
        id: String,
        /// Whether the access was justified and what was checked.
        #[arg(long)]
        comment: String,
    },
}

/// Webhook commands.
#[derive(Debug, Subcommand)]
pub enum WebhookCmd {
    /// Adds a sink. The secret is read from a file, never from the command line.
    Add {
        /// Where events are POSTed.
        #[arg(long)]
        url: String,
        /// A file holding the HMAC secret (at least 16 bytes).
        #[arg(long)]
        secret_file: PathBuf,
    },
    /// Lists sinks (never their secrets).
    List,
    /// Removes a sink; its undelivered events are dropped.
    Remove {
        /// The sink's id (`wh_…`).
        id: String,
    },
}

/// Group commands.
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Creates a group.
    Create {
        /// Name.
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Lists groups with members.
    List,
    /// Adds a user to a group.
    AddMember {
        /// Group.
        group: String,
        /// User name.
        username: String,
    },
    /// Removes a user from a group (their grants are re-evaluated at once).
    RemoveMember {
        /// Group.
        group: String,
        /// User name.
        username: String,
    },
}

/// Resource and policy commands.
#[derive(Debug, Subcommand)]
pub enum DocCmd {
    /// Creates or replaces one from a JSON file (validated with the whole policy set).
    Put {
        /// The JSON file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Lists them.
    List,
    /// Deletes one.
    Delete {
        /// Name.
        name: String,
    },
}

/// Grant commands.
#[derive(Debug, Subcommand)]
pub enum GrantCmd {
    /// Lists live grants.
    List,
    /// Ends a grant now: the gateways drop it and the device is told.
    Revoke {
        /// Grant id.
        id: i64,
    },
    /// Hands out a grant as a standard WireGuard configuration, for a vendor device that
    /// cannot run the client (the policy must allow it with wireguard_export). Audited as
    /// "no posture"; the gateway drops the peer at the end.
    Export {
        /// The user (the vendor's account).
        #[arg(long)]
        user: String,
        /// The resource.
        #[arg(long)]
        resource: String,
        /// The end: RFC 3339 (`2025-03-04T16:00:00Z`) or a duration from now (`2h`).
        #[arg(long)]
        until: String,
        /// The vendor's WireGuard public key; without it a key pair is made here and the
        /// private key is shown once.
        #[arg(long)]
        public_key: Option<String>,
    },
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
    /// Disables a user: sessions and grants end, the devices are disconnected.
    Disable {
        /// User name.
        username: String,
    },
    /// Enrols (or replaces) a local user's TOTP second factor: prints the otpauth:// URI for
    /// the authenticator app, and the secret for typing in by hand. Shown once.
    TotpEnrol {
        /// User name.
        username: String,
    },
}

/// Settings commands.
#[derive(Debug, Subcommand)]
pub enum SettingsCmd {
    /// Shows the settings.
    Show,
    /// Changes settings; only those given change.
    Set {
        /// New devices wait for an administrator's approval (`--enrolment-requires-approval`
        /// alone means true; give `false` to turn it off).
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        enrolment_requires_approval: Option<bool>,
        /// How often devices report their posture when nothing changes (e.g. `30s`).
        #[arg(long)]
        posture_interval: Option<humantime::Duration>,
        /// Longest a login session lasts, e.g. 12h.
        #[arg(long)]
        session_lifetime: Option<String>,
        /// A session without a new grant this long ends, e.g. 1h.
        #[arg(long)]
        session_idle_timeout: Option<String>,
        /// Failed local logins within the window that lock the user name.
        #[arg(long)]
        lockout_threshold: Option<u32>,
        /// The window failed logins are counted in, e.g. 15m.
        #[arg(long)]
        lockout_window: Option<String>,
        /// How long a locked user name stays locked, e.g. 15m.
        #[arg(long)]
        lockout_period: Option<String>,
        /// A break-glass event unreviewed this long is listed as overdue, e.g. 24h.
        #[arg(long)]
        break_glass_overdue: Option<String>,
        /// How often OIDC sessions are checked at their identity provider (a refresh), e.g.
        /// 5m: a user disabled there loses access within about this long.
        #[arg(long)]
        session_refresh_interval: Option<String>,
        /// How long before an approved access window ends the device is told, e.g. 10m.
        #[arg(long)]
        request_notice: Option<humantime::Duration>,
    },
}

/// Vendor commands.
#[derive(Debug, Subcommand)]
pub enum VendorCmd {
    /// Creates a vendor organisation.
    Create {
        /// Name, e.g. `acme`.
        name: String,
        /// The staff user who sponsors it.
        #[arg(long)]
        sponsor: String,
        /// Contract or BAA reference, e.g. ACME-BAA-7.
        #[arg(long)]
        contract_ref: String,
        /// The contract's last day (YYYY-MM-DD): no grant after it.
        #[arg(long)]
        contract_end: String,
        /// The time zone that day is counted in (default UTC).
        #[arg(long)]
        contract_zone: Option<String>,
    },
    /// Lists vendors with their members.
    List,
    /// Adds a user to a vendor.
    AddMember {
        /// Vendor.
        vendor: String,
        /// User name.
        username: String,
    },
}

/// Access request commands.
#[derive(Debug, Subcommand)]
pub enum RequestCmd {
    /// Lists requests, newest first.
    List {
        /// Only those waiting for a decision.
        #[arg(long)]
        pending: bool,
    },
    /// Approves a request: its window becomes a grant window.
    Approve {
        /// Request number.
        id: i64,
        /// The approving user (required with an admin token; must be in the approvers group).
        #[arg(long)]
        approver: Option<String>,
        /// A comment for the record.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Denies a request.
    Deny {
        /// Request number.
        id: i64,
        /// Why (the requester is told).
        #[arg(long)]
        reason: String,
        /// The denying user.
        #[arg(long)]
        approver: Option<String>,
    },
    /// Revokes a request: live grants under it end now.
    Revoke {
        /// Request number.
        id: i64,
        /// Why (the requester is told).
        #[arg(long)]
        reason: String,
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

    /// POST `body` to `path`, accepting an empty answer.
    pub async fn post_empty<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<serde_json::Value> {
        self.send_empty(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// PUT `body` to `path`, accepting an empty answer.
    pub async fn put_json<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<serde_json::Value> {
        self.send_empty(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// DELETE `path`.
    pub async fn delete_empty(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.send_empty(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    async fn send_empty(&self, req: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
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
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes).context("unexpected answer from the admin API")
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
        AdminCmd::User(UserCmd::TotpEnrol { username }) => {
            let r: TotpEnrolled = c
                .post(&format!("/api/v1/users/{username}/totp"), &())
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"username": r.username, "secret": r.secret.expose(), "uri": r.uri})
                );
            } else {
                println!("TOTP enrolled for {} (shown once):", r.username);
                println!("{}", r.uri);
                println!("secret: {}", r.secret.expose());
            }
            Ok(())
        }
        AdminCmd::User(UserCmd::Disable { username }) => {
            let r: serde_json::Value = c
                .post(&format!("/api/v1/users/{username}/disable"), &())
                .await?;
            print(json, &r, |r| {
                format!(
                    "user {username} disabled; {} grant(s) ended",
                    r["grants_ended"]
                )
            })
        }
        AdminCmd::Group(g) => match g {
            GroupCmd::Create { name, description } => {
                let _: serde_json::Value = c
                    .post_empty(
                        "/api/v1/groups",
                        &serde_json::json!({"name": name, "description": description}),
                    )
                    .await?;
                print(json, &serde_json::json!({"group": name}), |_| {
                    format!("group {name} created")
                })
            }
            GroupCmd::List => {
                let r: serde_json::Value = c.get("/api/v1/groups").await?;
                print(json, &r, |r| {
                    r.as_array()
                        .map(|gs| {
                            gs.iter()
                                .map(|g| {
                                    format!(
                                        "{:<20} {}",
                                        g["name"].as_str().unwrap_or(""),
                                        g["members"]
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("\n")
                        })
                        .unwrap_or_default()
                })
            }
            GroupCmd::AddMember { group, username } => {
                let _: serde_json::Value = c
                    .post_empty(
                        &format!("/api/v1/groups/{group}/members"),
                        &serde_json::json!({"username": username}),
                    )
                    .await?;
                print(
                    json,
                    &serde_json::json!({"group": group, "added": username}),
                    |_| format!("{username} added to {group}"),
                )
            }
            GroupCmd::RemoveMember { group, username } => {
                let _: serde_json::Value = c
                    .delete_empty(&format!("/api/v1/groups/{group}/members/{username}"))
                    .await?;
                print(
                    json,
                    &serde_json::json!({"group": group, "removed": username}),
                    |_| format!("{username} removed from {group}"),
                )
            }
        },
        AdminCmd::Resource(d) => doc(&c, json, "resources", d).await,
        AdminCmd::Policy(d) => doc(&c, json, "policies", d).await,
        AdminCmd::PostureProfile(d) => doc(&c, json, "posture-profiles", d).await,
        AdminCmd::DryRun { user, resource } => {
            let r: serde_json::Value = c
                .post(
                    "/api/v1/access/dry-run",
                    &serde_json::json!({"user": user, "resource": resource}),
                )
                .await?;
            print(json, &r, |r| {
                if r["allowed"] == true {
                    format!("{user} WOULD get {resource} now")
                } else {
                    let reasons: Vec<String> = r["reasons"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(|s| format!("  - {s}")))
                                .collect()
                        })
                        .unwrap_or_default();
                    format!(
                        "{user} would NOT get {resource} now:\n{}",
                        reasons.join("\n")
                    )
                }
            })
        }
        AdminCmd::Grant(GrantCmd::List) => {
            let r: serde_json::Value = c.get("/api/v1/grants").await?;
            print(json, &r, |r| {
                r.as_array()
                    .map(|gs| {
                        gs.iter()
                            .map(|g| {
                                format!(
                                    "{:<20} {:<22} {:<14} until {}",
                                    g["id"],
                                    g["device_id"].as_str().unwrap_or(""),
                                    g["resource"].as_str().unwrap_or(""),
                                    fmt_ms(g["expires_ms"].as_i64().unwrap_or(0))
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            })
        }
        AdminCmd::Grant(GrantCmd::Revoke { id }) => {
            let r: serde_json::Value = c.post(&format!("/api/v1/grants/{id}/revoke"), &()).await?;
            print(json, &r, |_| format!("grant {id} revoked"))
        }
        AdminCmd::Grant(GrantCmd::Export {
            user,
            resource,
            until,
            public_key,
        }) => {
            let until_ms = match humantime::parse_rfc3339_weak(&until) {
                Ok(t) => wardgate_common::unix_ms(t),
                Err(_) => {
                    let d = humantime::parse_duration(&until).with_context(|| {
                        format!("--until {until:?}: give RFC 3339 (2025-03-04T16:00:00Z) or a duration (2h)")
                    })?;
                    wardgate_common::unix_ms(std::time::SystemTime::now() + d)
                }
            };
            let req = crate::export::ExportRequest {
                user,
                resource,
                until_ms,
                public_key,
            };
            let r: crate::export::ExportAnswer = c.post("/api/v1/grants/export", &req).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                    "grant_id": r.grant_id, "device_id": r.device_id, "expires_ms": r.expires_ms,
                    "config": r.config.expose(), "controller_made_key": r.controller_made_key}))
                    .unwrap_or_default()
                );
            } else {
                eprintln!(
                    "grant {} until {} (no posture; the gateway drops the peer then){}",
                    r.grant_id,
                    fmt_ms(r.expires_ms),
                    if r.controller_made_key {
                        "; this configuration holds the private key and is shown only now"
                    } else {
                        ""
                    }
                );
                print!("{}", r.config.expose());
            }
            Ok(())
        }
        AdminCmd::BreakGlass(BreakGlassCmd::List {
            unreviewed,
            overdue,
        }) => {
            let r: serde_json::Value = c
                .get(&format!(
                    "/api/v1/break-glass?unreviewed={unreviewed}&overdue={overdue}"
                ))
                .await?;
            print(json, &r, |r| {
                r.as_array()
                    .map(|es| {
                        es.iter()
                            .map(|e| {
                                let state = match e["reviewed_by"].as_str() {
                                    Some(by) => format!(
                                        "reviewed by {by}: {}",
                                        e["comment"].as_str().unwrap_or("")
                                    ),
                                    None if e["overdue"] == true => "UNREVIEWED, OVERDUE".into(),
                                    None => "unreviewed".into(),
                                };
                                format!(
                                    "{} {} {} → {} ({:?}) grant {} — {}",
                                    e["id"].as_str().unwrap_or(""),
                                    fmt_ms(e["at_ms"].as_i64().unwrap_or(0)),
                                    e["user"].as_str().unwrap_or(""),
                                    e["resource"].as_str().unwrap_or(""),
                                    e["reason"].as_str().unwrap_or(""),
                                    e["grant_id"],
                                    state
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            })
        }
        AdminCmd::BreakGlass(BreakGlassCmd::Review { id, comment }) => {
            let r: serde_json::Value = c
                .post(
                    &format!("/api/v1/break-glass/{id}/review"),
                    &serde_json::json!({"comment": comment}),
                )
                .await?;
            print(json, &r, |_| format!("break-glass event {id} reviewed"))
        }
        AdminCmd::Webhook(WebhookCmd::Add { url, secret_file }) => {
            let secret = String::from_utf8(wardgate_common::files::read_secret(&secret_file)?)
                .context("the secret file is not UTF-8")?
                .trim()
                .to_owned();
            let r: serde_json::Value = c
                .post(
                    "/api/v1/webhooks",
                    &serde_json::json!({"url": url, "secret": secret}),
                )
                .await?;
            print(json, &r, |r| {
                format!("webhook {} added for {url}", r["id"].as_str().unwrap_or(""))
            })
        }
        AdminCmd::Webhook(WebhookCmd::List) => {
            let r: serde_json::Value = c.get("/api/v1/webhooks").await?;
            print(json, &r, |r| {
                r.as_array()
                    .map(|ws| {
                        ws.iter()
                            .map(|w| {
                                format!(
                                    "{} {}",
                                    w["id"].as_str().unwrap_or(""),
                                    w["url"].as_str().unwrap_or("")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            })
        }
        AdminCmd::Webhook(WebhookCmd::Remove { id }) => {
            let r = c.delete_empty(&format!("/api/v1/webhooks/{id}")).await?;
            print(json, &r, |_| format!("webhook {id} removed"))
        }
        AdminCmd::Settings(SettingsCmd::Show) => {
            let r: Settings = c.get("/api/v1/settings").await?;
            print(json, &r, settings_text)
        }
        AdminCmd::Settings(SettingsCmd::Set {
            enrolment_requires_approval,
            posture_interval,
            session_lifetime,
            session_idle_timeout,
            lockout_threshold,
            lockout_window,
            lockout_period,
            break_glass_overdue,
            session_refresh_interval,
            request_notice,
        }) => {
            let update = SettingsUpdate {
                break_glass_overdue,
                request_notice_lead_ms: request_notice
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                enrolment_requires_approval,
                posture_report_interval_ms: posture_interval
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                session_lifetime,
                session_idle_timeout,
                lockout_threshold,
                lockout_window,
                lockout_period,
                session_refresh_interval,
            };
            let r: Settings = c.put("/api/v1/settings", &update).await?;
            print(json, &r, settings_text)
        }
        AdminCmd::Vendor(v) => vendor(&c, json, v).await,
        AdminCmd::Request(r) => request(&c, json, r).await,
    }
}

async fn vendor(c: &AdminClient, json: bool, cmd: VendorCmd) -> anyhow::Result<()> {
    use super::requests_api::{AddVendorMember, CreateVendor, VendorView};
    match cmd {
        VendorCmd::Create {
            name,
            sponsor,
            contract_ref,
            contract_end,
            contract_zone,
        } => {
            let body = CreateVendor {
                name: name.clone(),
                sponsor,
                contract_ref,
                contract_end,
                contract_zone,
            };
            let r = c.post_empty("/api/v1/vendors", &body).await?;
            print(json, &r, |_| format!("vendor {name} created"))
        }
        VendorCmd::List => {
            let r: Vec<VendorView> = c.get("/api/v1/vendors").await?;
            print(json, &r, |r| {
                r.iter()
                    .map(|v| {
                        format!(
                            "{} (sponsor {}): contract {} until {} {}; members: {}",
                            v.name,
                            v.sponsor,
                            v.contract_ref,
                            v.contract_end,
                            v.contract_zone,
                            v.members.join(", ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        VendorCmd::AddMember { vendor, username } => {
            let r = c
                .post_empty(
                    &format!("/api/v1/vendors/{vendor}/members"),
                    &AddVendorMember {
                        username: username.clone(),
                    },
                )
                .await?;
            print(json, &r, |_| format!("{username} added to vendor {vendor}"))
        }
    }
}

fn request_line(v: &super::requests_api::RequestView) -> String {
    let r = &v.request;
    format!(
        "#{} {:<9} {} → {} on {} from {} until {}{} — {}{}",
        r.id,
        r.state,
        v.user,
        r.resource,
        r.device_id,
        fmt_ms(r.from_ms),
        fmt_ms(r.until_ms),
        r.ticket
            .as_deref()
            .map(|t| format!(" [{t}]"))
            .unwrap_or_default(),
        r.reason,
        match (&r.approver, &r.decision_reason) {
            (Some(a), Some(d)) => format!(" (by {a}: {d})"),
            (Some(a), None) => format!(" (by {a})"),
            (None, Some(d)) => format!(" ({d})"),
            (None, None) => String::new(),
        }
    )
}

async fn request(c: &AdminClient, json: bool, cmd: RequestCmd) -> anyhow::Result<()> {
    use super::requests_api::{RequestDecisionBody, RequestView};
    let (id, action, body) = match cmd {
        RequestCmd::List { pending } => {
            let path = if pending {
                "/api/v1/requests?state=pending"
            } else {
                "/api/v1/requests"
            };
            let r: Vec<RequestView> = c.get(path).await?;
            return print(json, &r, |r| {
                r.iter().map(request_line).collect::<Vec<_>>().join("\n")
            });
        }
        RequestCmd::Approve {
            id,
            approver,
            comment,
        } => (
            id,
            "approve",
            RequestDecisionBody {
                approver,
                reason: comment,
            },
        ),
        RequestCmd::Deny {
            id,
            reason,
            approver,
        } => (
            id,
            "deny",
            RequestDecisionBody {
                approver,
                reason: Some(reason),
            },
        ),
        RequestCmd::Revoke { id, reason } => (
            id,
            "revoke",
            RequestDecisionBody {
                approver: None,
                reason: Some(reason),
            },
        ),
    };
    let r: RequestView = c
        .post(&format!("/api/v1/requests/{id}/{action}"), &body)
        .await?;
    print(json, &r, request_line)
}

fn settings_text(s: &Settings) -> String {
    let o = |v: &Option<String>| v.clone().unwrap_or_default();
    format!(
        "enrolment requires approval: {}\nposture report interval:     {}\nsession lifetime:            {}\nsession idle timeout:        {}\nlockout:                     {} failures within {} lock for {}\nsession refresh interval:    {}\nbreak-glass overdue after:   {}",
        s.enrolment_requires_approval,
        humantime::format_duration(std::time::Duration::from_millis(
            s.posture_report_interval_ms
        )),
        o(&s.session_lifetime),
        o(&s.session_idle_timeout),
        s.lockout_threshold.unwrap_or_default(),
        o(&s.lockout_window),
        o(&s.lockout_period),
        o(&s.session_refresh_interval),
        o(&s.break_glass_overdue)
    )
}

async fn doc(c: &AdminClient, json: bool, kind: &str, cmd: DocCmd) -> anyhow::Result<()> {
    match cmd {
        DocCmd::Put { file } => {
            let body: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?,
            )
            .with_context(|| format!("{} is not JSON", file.display()))?;
            let name = body["name"]
                .as_str()
                .context("the document has no \"name\"")?
                .to_owned();
            let r = c.put_json(&format!("/api/v1/{kind}/{name}"), &body).await?;
            print(json, &r, |_| format!("{kind} {name} saved"))
        }
        DocCmd::List => {
            let r: serde_json::Value = c.get(&format!("/api/v1/{kind}")).await?;
            print(json, &r, |r| {
                serde_json::to_string_pretty(r).unwrap_or_default()
            })
        }
        DocCmd::Delete { name } => {
            let _ = c.delete_empty(&format!("/api/v1/{kind}/{name}")).await?;
            print(json, &serde_json::json!({"deleted": name}), |_| {
                format!("{kind} {name} deleted")
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
