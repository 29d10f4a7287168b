//! `wardgate-bench access --json`: how fast access is granted and taken away, with the real
//! binaries on loopback (userspace modes, SQLite), all figures from the same run.
//!
//! - `connect_p50_ms` / `connect_p99_ms`: `wardgate connect` started → first byte from the
//!   resource through the new grant's tunnel (process start, mTLS, decision, push + ack,
//!   WireGuard handshake included), over `connects` runs.
//! - `revoke_p50_ms` / `revoke_p99_ms`: admin revoke call → answer; the API answers only after
//!   every gateway serving the grant has acknowledged dropping the peer.
//! - `decide_per_s`: the pure policy engine, one thread.
//! - `grants_per_s`: request → decision → grant row → push to the gateway → ack → answer, over
//!   one device session with 32 requests in flight, 1,000 grants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use wardgate_common::proto::{Request, Response};
use wardgate_common::transport::ControlClient;

use crate::demo::{Site, site};
use crate::harness::{Proc, free_port, wait_for};

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct AccessReport {
    /// Median connect latency.
    pub connect_p50_ms: f64,
    /// 99th percentile connect latency.
    pub connect_p99_ms: f64,
    /// Median revoke latency.
    pub revoke_p50_ms: f64,
    /// 99th percentile revoke latency.
    pub revoke_p99_ms: f64,
    /// Pure engine decisions per second.
    pub decide_per_s: f64,
    /// Grants issued per second end to end.
    pub grants_per_s: f64,
    /// Connect runs.
    pub connects: usize,
    /// Revoke runs.
    pub revokes: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

fn get(local: u16) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(rt) = rt else { return false };
    rt.block_on(crate::node::http_get(
        ([127, 0, 0, 1], local).into(),
        Duration::from_millis(500),
    ))
    .is_ok()
}

fn one_connect(s: &Site) -> anyhow::Result<(f64, Proc, u16)> {
    let local = free_port();
    let mut cmd = s.w.client_cmd(&s.client)?;
    cmd.args([
        "connect",
        "ehr-web",
        "--mode",
        "userspace",
        "--forward",
        &local.to_string(),
    ]);
    let t0 = Instant::now();
    let p = Proc::spawn(cmd, &s.w.logs, "bench-connect")?;
    let deadline = t0 + Duration::from_secs(20);
    while !get(local) {
        if Instant::now() > deadline {
            bail!("no first byte within 20 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((t0.elapsed().as_secs_f64() * 1000.0, p, local))
}

fn decide_rate() -> anyhow::Result<f64> {
    use crate::policy_fixture::{facts, set};
    let compiled = wardgate_controller::policy::CompiledPolicies::new(&set()?)
        .map_err(|e| anyhow::anyhow!("fixture invalid: {e:?}"))?;
    let (req, f) = facts();
    let now = jiff::Timestamp::now();
    let start = Instant::now();
    let mut n = 0u64;
    let mut allowed = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..1000 {
            if compiled.decide(&req, &f, now).is_allow() {
                allowed += 1;
            }
        }
        n += 1000;
    }
    if allowed != n {
        bail!("the fixture must allow every decision");
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Grant requests kept in flight by the grants/s measurement.
const IN_FLIGHT: usize = 32;

fn grant_rate(s: &Site, total: usize) -> anyhow::Result<f64> {
    let rt = tokio::runtime::Runtime::new()?;
    let dir = wardgate_client::state::ConfigDir::resolve(Some(s.client.clone()))?;
    let controller = s.w.quic.to_string();
    rt.block_on(async move {
        let cfg = wardgate_client::enrol::client_config(&dir)?;
        let session = Arc::new(
            ControlClient::connect(&controller, cfg, "bench")
                .await?
                .into_session(),
        );
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        let mut granted = 0usize;
        let mut issued = 0usize;
        while granted < total {
            while set.len() < IN_FLIGHT && issued < total {
                issued += 1;
                let s = session.clone();
                set.spawn(async move {
                    let key = wardgate_common::keys::generate_private();
                    s.request(Request::Connect {
                        resource: "ehr-web".into(),
                        wg_public_key: wardgate_common::keys::public_of(&key),
                        renews: None,
                    })
                    .await
                });
            }
            match set.join_next().await {
                Some(Ok(Ok(Response::Granted(_)))) => granted += 1,
                Some(Ok(other)) => bail!("grant request failed: {other:?}"),
                Some(Err(e)) => bail!("task: {e}"),
                None => break,
            }
        }
        Ok(granted as f64 / start.elapsed().as_secs_f64())
    })
}

/// Runs every measurement.
pub fn access(connects: usize, revokes: usize) -> anyhow::Result<AccessReport> {
    eprintln!("setting up controller, gateway, resource, policies…");
    let s = site("1h")?;
    eprintln!("decide…");
    let decide_per_s = decide_rate()?;
    eprintln!("{connects} connects…");
    let mut connect = Vec::new();
    for _ in 0..connects {
        let (ms, mut p, _) = one_connect(&s)?;
        connect.push(ms);
        p.stop();
    }
    eprintln!("{revokes} revokes…");
    let rt = tokio::runtime::Runtime::new()?;
    let ca = std::fs::read(s.w.ca())?;
    let admin =
        wardgate_controller::admin::cli::AdminClient::new(s.w.admin, &ca, s.w.admin_token.clone())?;
    let mut revoke = Vec::new();
    for _ in 0..revokes {
        let (_, mut p, local) = one_connect(&s)?;
        let grants: serde_json::Value = rt.block_on(admin.get("/api/v1/grants"))?;
        let id = grants
            .as_array()
            .and_then(|g| {
                g.iter()
                    .max_by_key(|g| g["issued_ms"].as_i64().unwrap_or(0))
            })
            .and_then(|g| g["id"].as_i64())
            .context("no live grant")?;
        let t0 = Instant::now();
        let r: serde_json::Value =
            rt.block_on(admin.post(&format!("/api/v1/grants/{id}/revoke"), &()))?;
        revoke.push(t0.elapsed().as_secs_f64() * 1000.0);
        if r["ended"] != true {
            bail!("revoke did not end the grant: {r}");
        }
        if get(local) {
            bail!("the flow still passes after the revoke returned");
        }
        wait_for(Duration::from_secs(10), "the client to stop", || {
            (!p.running()).then_some(())
        })?;
    }
    eprintln!("grants/s…");
    let grants_per_s = grant_rate(&s, 1000)?;
    Ok(AccessReport {
        connect_p50_ms: pct(&mut connect.clone(), 0.5),
        connect_p99_ms: pct(&mut connect, 0.99),
        revoke_p50_ms: pct(&mut revoke.clone(), 0.5),
        revoke_p99_ms: pct(&mut revoke, 0.99),
        decide_per_s,
        grants_per_s,
        connects,
        revokes,
    })
}
