//! Routes through the TUN interface, and the gateway's forwarding and masquerade.
//!
//! Linux only, through the standard tools (`ip` from iproute2, `nft` from nftables) rather
//! than netlink by hand: these changes happen when a grant starts or ends, not per packet, and
//! the tools' error messages are what an operator needs to see. Every command runs with a
//! timeout and is killed if it hangs; a failure carries the command line and its stderr.
//!
//! The masquerade lives in its own nftables table, `inet wardgate`, which this module owns
//! whole: it is replaced atomically on every call and deleted by [`remove_masquerade`]. Other
//! rules belong in other tables.

use std::time::Duration;

use ipnet::IpNet;

use super::{TunError, check_ifname};

/// How long `ip` or `nft` may take before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The nftables table this module owns.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const NFT_TABLE: &str = "inet wardgate";

/// Where IPv4 forwarding is switched on.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Finds a system tool: daemons started by init systems often run without `/usr/sbin` in
/// `PATH`, so look there first.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn tool(name: &'static str) -> String {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| format!("{dir}/{name}"))
        .find(|path| std::path::Path::new(path).exists())
        .unwrap_or_else(|| name.to_owned())
}

/// Runs `program args…` (feeding `stdin` if given) and returns its stdout, or a typed error
/// with its stderr.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
async fn run(
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, TunError> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;

    let command_line = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = tokio::process::Command::new(tool(program));
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|source| TunError::Spawn { program, source })?;
    let finish = async {
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).await?;
            // Dropping the pipe closes it, so the program sees the end of its input.
        }
        child.wait_with_output().await
    };
    let output = match tokio::time::timeout(COMMAND_TIMEOUT, finish).await {
        Ok(result) => result.map_err(|source| TunError::Spawn { program, source })?,
        // The child was dropped with the future: kill_on_drop ends it.
        Err(_) => {
            return Err(TunError::Timeout {
                command: command_line,
                seconds: COMMAND_TIMEOUT.as_secs(),
            });
        }
    };
    if !output.status.success() {
        return Err(TunError::Command {
            command: command_line,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `ip args…`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) async fn ip(args: &[&str]) -> Result<String, TunError> {
    run("ip", args, None).await
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn family_flag(prefix: &IpNet) -> &'static str {
    match prefix {
        IpNet::V4(_) => "-4",
        IpNet::V6(_) => "-6",
    }
}

/// `ip route replace PREFIX dev IFNAME`: see [`super::TunDevice::add_route`].
pub(crate) async fn add_route(ifname: &str, prefix: IpNet) -> Result<(), TunError> {
    check_ifname(ifname)?;
    #[cfg(target_os = "linux")]
    {
        let prefix = prefix.trunc();
        let dst = prefix.to_string();
        ip(&[
            family_flag(&prefix),
            "route",
            "replace",
            &dst,
            "dev",
            ifname,
        ])
        .await?;
        tracing::debug!(ifname, prefix = %prefix, "route added");
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = prefix;
        Err(TunError::Unsupported {
            what: "adding a route",
        })
    }
}

/// `ip route del PREFIX dev IFNAME` if that route exists: see
/// [`super::TunDevice::remove_route`].
pub(crate) async fn remove_route(ifname: &str, prefix: IpNet) -> Result<bool, TunError> {
    check_ifname(ifname)?;
    #[cfg(target_os = "linux")]
    {
        let prefix = prefix.trunc();
        let dst = prefix.to_string();
        let family = family_flag(&prefix);
        // Look first, so that removing an absent route is not an error (without guessing
        // from `ip`'s error text).
        let existing = ip(&[family, "route", "show", "exact", &dst, "dev", ifname]).await?;
        if existing.trim().is_empty() {
            return Ok(false);
        }
        ip(&[family, "route", "del", &dst, "dev", ifname]).await?;
        tracing::debug!(ifname, prefix = %prefix, "route removed");
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = prefix;
        Err(TunError::Unsupported {
            what: "removing a route",
        })
    }
}

/// The nftables script that (re)creates the masquerade table in one atomic transaction.
/// Names must have passed [`check_ifname`], so they cannot break out of the quotes.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn masquerade_script(tun: &str, out_iface: Option<&str>) -> String {
    let out = out_iface
        .map(|name| format!(" oifname \"{name}\""))
        .unwrap_or_default();
    // Declaring the table before deleting it makes the delete succeed whether or not it
    // existed; the whole file is one transaction, so there is no moment without the rule.
    format!(
        "table {NFT_TABLE} {{}}\n\
         delete table {NFT_TABLE}\n\
         table {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tiifname \"{tun}\"{out} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Makes this host (the gateway in `tun` mode) forward IPv4 packets from the tunnel and
/// rewrite their source to its own address on the way out, so resources answer the gateway
/// without routes back to client tunnel addresses.
///
/// Sets `net.ipv4.ip_forward=1` and installs `iifname "TUN" [oifname "OUT"] masquerade` in the
/// `postrouting` chain of table `inet wardgate` (replacing what was there, so calling it again
/// is harmless). `out_iface` limits it to the interface towards the resources; `None`
/// masquerades towards all. IPv6 forwarding is deliberately not switched on: doing so turns
/// off router-advertisement acceptance, which can take a host's own IPv6 default route away;
/// the rule covers IPv6 once an operator enables forwarding. A host firewall that drops
/// forwarded traffic must still allow it. Linux only; needs root.
pub async fn enable_forwarding_and_masquerade(
    tun: &str,
    out_iface: Option<&str>,
) -> Result<(), TunError> {
    check_ifname(tun)?;
    if let Some(out) = out_iface {
        check_ifname(out)?;
    }
    #[cfg(target_os = "linux")]
    {
        std::fs::write(IP_FORWARD, "1\n").map_err(|source| TunError::Sysctl {
            path: IP_FORWARD,
            source,
        })?;
        run(
            "nft",
            &["-f", "-"],
            Some(&masquerade_script(tun, out_iface)),
        )
        .await?;
        tracing::info!(tun, out_iface, "forwarding and masquerade enabled");
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(TunError::Unsupported {
            what: "forwarding and masquerade",
        })
    }
}

/// Deletes the masquerade table installed by [`enable_forwarding_and_masquerade`], if any
/// (idempotent). IP forwarding is left as it is: other software on the host may rely on it.
pub async fn remove_masquerade() -> Result<(), TunError> {
    #[cfg(target_os = "linux")]
    {
        let script = format!("table {NFT_TABLE} {{}}\ndelete table {NFT_TABLE}\n");
        run("nft", &["-f", "-"], Some(&script)).await?;
        tracing::info!("masquerade removed");
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(TunError::Unsupported {
            what: "removing the masquerade",
        })
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn masquerade_script_is_one_replacing_transaction() {
        let s = masquerade_script("wg0", Some("eth1"));
        assert!(s.starts_with("table inet wardgate {}\ndelete table inet wardgate\n"));
        assert!(s.contains("type nat hook postrouting priority srcnat; policy accept;"));
        assert!(s.contains("iifname \"wg0\" oifname \"eth1\" masquerade"));
        assert!(masquerade_script("wg0", None).contains("iifname \"wg0\" masquerade"));
    }

    #[tokio::test]
    async fn hostile_names_never_reach_a_command() {
        let net: IpNet = "10.0.0.0/8".parse().expect("prefix");
        for bad in ["wg0\"; flush ruleset", "wg0\n", "a b"] {
            assert!(matches!(
                add_route(bad, net).await,
                Err(TunError::InvalidName { .. })
            ));
            assert!(matches!(
                enable_forwarding_and_masquerade("wg0", Some(bad)).await,
                Err(TunError::InvalidName { .. })
            ));
        }
    }
}
