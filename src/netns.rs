//! Throwaway network namespaces for end-to-end tests and the data-plane bench: a client, a
//! gateway and a resource network, wired with veth pairs, named with a per-run id so tests can
//! run in parallel, and deleted (with every process inside) on drop.
//!
//! ```text
//!  client ns            gateway ns                         resource ns
//!  10.99.N.2/24 ─veth─ 10.99.N.1/24 | 10.10.1.1/24 ─veth─ 10.10.1.10/24, 10.10.1.11/24
//! ```
//! The 10.x addresses exist only inside these namespaces; nothing here sends traffic from the
//! host to them.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command inside a namespace and returns stdout.
pub fn exec(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| format!("cannot run {args:?} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One namespace; deleted with its processes on drop.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Creates a namespace with loopback up.
    pub fn new(name: String) -> anyhow::Result<Self> {
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        exec(&ns.name, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        exec(&self.name, args)
    }

    /// A `Command` that runs `program` inside this namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Kills every process in the namespace.
    pub fn kill_all(&self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The three-namespace test network.
pub struct Topology {
    /// Client side.
    pub client: Netns,
    /// Gateway.
    pub gateway: Netns,
    /// Resources.
    pub resource: Netns,
    /// The gateway's address on the client-facing link.
    pub gateway_outer: Ipv4Addr,
    /// The client's address on that link.
    pub client_outer: Ipv4Addr,
    /// The gateway's interface towards the resources.
    pub gateway_inner_if: String,
    /// The resources' interface.
    pub resource_if: String,
}

/// A short unique id for names (interface names are limited to 15 characters).
pub fn short_id() -> String {
    let mut b = [0u8; 3];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Topology {
    /// Builds the network. `subnet` (1..=250) picks the client link 10.99.`subnet`.0/24.
    pub fn new(subnet: u8) -> anyhow::Result<Self> {
        let id = short_id();
        let client = Netns::new(format!("wgc-{id}"))?;
        let gateway = Netns::new(format!("wgg-{id}"))?;
        let resource = Netns::new(format!("wgr-{id}"))?;
        let (c_if, g_if1, g_if2, r_if) = (
            format!("c{id}"),
            format!("g{id}a"),
            format!("g{id}b"),
            format!("r{id}"),
        );
        ip(&[
            "link",
            "add",
            &c_if,
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            &g_if1,
            "netns",
            &gateway.name,
        ])?;
        ip(&[
            "link",
            "add",
            &g_if2,
            "netns",
            &gateway.name,
            "type",
            "veth",
            "peer",
            "name",
            &r_if,
            "netns",
            &resource.name,
        ])?;
        let client_outer = Ipv4Addr::new(10, 99, subnet, 2);
        let gateway_outer = Ipv4Addr::new(10, 99, subnet, 1);
        client.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{client_outer}/24"),
            "dev",
            &c_if,
        ])?;
        client.exec(&["ip", "link", "set", &c_if, "up"])?;
        gateway.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{gateway_outer}/24"),
            "dev",
            &g_if1,
        ])?;
        gateway.exec(&["ip", "link", "set", &g_if1, "up"])?;
        gateway.exec(&["ip", "addr", "add", "10.10.1.1/24", "dev", &g_if2])?;
        gateway.exec(&["ip", "link", "set", &g_if2, "up"])?;
        resource.exec(&["ip", "addr", "add", "10.10.1.10/24", "dev", &r_if])?;
        resource.exec(&["ip", "addr", "add", "10.10.1.11/24", "dev", &r_if])?;
        resource.exec(&["ip", "link", "set", &r_if, "up"])?;
        resource.exec(&["ip", "route", "add", "default", "via", "10.10.1.1"])?;
        Ok(Self {
            client,
            gateway,
            resource,
            gateway_outer,
            client_outer,
            gateway_inner_if: g_if2,
            resource_if: r_if,
        })
    }

    /// Adds another resource network on the same link: the gateway gets `gateway_cidr`
    /// (e.g. `10.20.5.1/24`), the resource namespace the `hosts` (e.g. `10.20.5.5/24`).
    pub fn add_resource_network(&self, gateway_cidr: &str, hosts: &[&str]) -> anyhow::Result<()> {
        self.gateway.exec(&[
            "ip",
            "addr",
            "add",
            gateway_cidr,
            "dev",
            &self.gateway_inner_if,
        ])?;
        for h in hosts {
            self.resource
                .exec(&["ip", "addr", "add", h, "dev", &self.resource_if])?;
        }
        Ok(())
    }
}
