//! `tether bench failover`: N gateway nodes (this binary, each its own process) on one
//! PostgreSQL store behind HAProxy, and a swarm of simulated clinics (in this process, the load
//! client) sending events at a steady rate. Measures, in order:
//! 1. routing: cloud updates posted to the node holding the clinic and to another node,
//!    interleaved — POST to the update's arrival at the clinic, p50/p99 of each;
//! 2. failover: one node (the one holding most clinics) killed with SIGKILL (`--mode kill`) or
//!    paused with SIGSTOP (`--mode stop`, a host gone silent) — seconds until every clinic has a
//!    session again and every orphaned clinic is held by another node and acknowledged further;
//! 3. loss: every clinic's acknowledged position is in the store, each sequence once, no hole.
//!
//! `tether bench ingest --nodes N`: N nodes (TLS, clinic tokens) on one PostgreSQL store behind
//! HAProxy, and the ingest load client in its own process (`tether bench ingest --gateway`)
//! through HAProxy: acknowledged events/s and all nodes' CPU-seconds per 100,000 events.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::bench::{machine, percentile};
use crate::loadgen::{ClientSpec, Swarm};
use crate::local_cluster::{start_haproxy, start_node as start_node_with, Process};
use std::process::{Command, Stdio};

/// What `tether bench failover` is asked to do.
#[derive(Debug, Clone)]
pub struct FailoverOptions {
    pub nodes: usize,
    pub clinics: usize,
    pub events_per_s: f64,
    /// `kill` (SIGKILL) or `stop` (SIGSTOP: the node's host goes silent).
    pub mode: String,
    pub pg_url: String,
    /// Updates posted in the routing measurement (half to the holder, half elsewhere).
    pub updates: usize,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(crate::loadgen::free_port()?)
}

fn start_node(dir: &Path, id: &str, port: u16, url: &str, schema: &str) -> anyhow::Result<Process> {
    start_node_with(
        dir,
        id,
        &format!(
            "logging:\n  dir: logs\n  console: false\n  level: warn\ngateway:\n  listen: 127.0.0.1:{port}\n  node_id: {id}\n  insecure_plaintext: true\n  heartbeat_interval: 1s\n  limits:\n    handshakes_per_second: 2000\n    handshake_burst: 4000\n  store:\n    kind: postgres\n    url: \"{url}\"\n    schema: {schema}\n"
        ),
    )
}

fn pg(url: &str) -> anyhow::Result<postgres::Client> {
    // The driver blocks on its own runtime: callers run it on a plain thread.
    Ok(postgres::Client::connect(url, postgres::NoTls)?)
}

/// clinic → (acknowledged position, node holding it), read off the store's table.
fn owners(url: &str, schema: &str) -> anyhow::Result<BTreeMap<String, (u64, Option<String>)>> {
    let (url, schema) = (url.to_string(), schema.to_string());
    std::thread::spawn(move || -> anyhow::Result<_> {
        let mut c = pg(&url)?;
        let rows = c.query(
            &format!("SELECT clinic_id, acked_seq, owner_node FROM {schema}.clinics"),
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    (r.get::<_, i64>(1) as u64, r.get::<_, Option<String>>(2)),
                )
            })
            .collect())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("owners thread panicked"))?
}

async fn post_update(
    http: &awc::Client,
    port: u16,
    clinic: &str,
    n: usize,
) -> anyhow::Result<String> {
    let body = json!({"entity": "patient", "op": "upsert", "key": {"id": n}, "row": {"id": n, "name": "Routed"}});
    let mut resp = http
        .post(format!(
            "http://127.0.0.1:{port}/v1/clinics/{clinic}/updates"
        ))
        .send_json(&body)
        .await
        .map_err(|e| anyhow::anyhow!("POST update: {e}"))?;
    let v: Value = resp
        .json()
        .await
        .map_err(|e| anyhow::anyhow!("POST update answer: {e}"))?;
    v["update_id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no update_id in {v}"))
}

/// One call through `port`; the microseconds until its answer came back.
async fn post_call(http: &awc::Client, port: u16, clinic: &str) -> anyhow::Result<u64> {
    let t0 = Instant::now();
    let mut resp = http
        .post(format!("http://127.0.0.1:{port}/v1/clinics/{clinic}/rpc"))
        .send_json(&json!({"name": "bench", "timeout_ms": 10000}))
        .await
        .map_err(|e| anyhow::anyhow!("POST rpc: {e}"))?;
    let us = t0.elapsed().as_micros() as u64;
    if !resp.status().is_success() {
        let body = resp.body().await.unwrap_or_default();
        bail!(
            "POST rpc for {clinic} through port {port}: {} {}",
            resp.status(),
            String::from_utf8_lossy(&body)
        );
    }
    Ok(us)
}

/// What `tether bench ingest --nodes N` is asked to do.
#[derive(Debug, Clone)]
pub struct NodesIngest {
    pub nodes: usize,
    pub pg_url: String,
    /// Clinic ids are PREFIX000, PREFIX001, … (the load client's).
    pub prefix: String,
    pub clinics: usize,
    pub events_per_clinic: u64,
}

/// Ingest through `o.nodes` gateway nodes behind HAProxy, the load client in its own process.
pub fn ingest_through_nodes(dir: &Path, o: &NodesIngest) -> anyhow::Result<Value> {
    let certs = dir.join("certs");
    let ids: Vec<String> = (0..o.clinics)
        .map(|i| format!("{}{i:03}", o.prefix))
        .collect();
    crate::security::keys::dev_setup(&certs, &ids, 2048)?;
    let schema = format!("bench_nodes_{}", std::process::id());
    let c = |f: &str| certs.join(f).display().to_string();
    let mut nodes = Vec::new();
    let mut servers = Vec::new();
    for i in 1..=o.nodes {
        let id = format!("gw-{i}");
        let port = free_port()?;
        let yaml = format!(
            "logging:\n  dir: logs\n  console: false\n  level: warn\ngateway:\n  listen: 127.0.0.1:{port}\n  id: gw-bench\n  node_id: {id}\n  tls:\n    cert: {cert}\n    key: {key}\n  auth:\n    clinics_dir: {clinics}\n  admin_tokens:\n    - name: bench\n      sha256: {sha}\n      scopes: [read]\n  store:\n    kind: postgres\n    url: \"{url}\"\n    schema: {schema}\n",
            cert = c("gateway.pem"),
            key = c("gateway.key"),
            clinics = c("clinics"),
            sha = crate::security::admin::sha256_hex(&crate::security::admin::new_token()),
            url = o.pg_url,
        );
        nodes.push(start_node_with(dir, &id, &yaml)?);
        servers.push((id, format!("127.0.0.1:{port}")));
    }
    let lb_port = free_port()?;
    let _lb = start_haproxy(dir, lb_port, &servers, Some(&certs.join("ca.pem")))?;
    let pids: Vec<u32> = nodes.iter().map(Process::id).collect();
    let cpu = || {
        pids.iter()
            .map(|p| crate::bench::cpu_seconds(*p))
            .sum::<f64>()
    };
    let before = cpu();
    let out = Command::new(std::env::current_exe()?)
        .args(["bench", "ingest", "--gateway"])
        .arg(format!("wss://127.0.0.1:{lb_port}/v1/ws"))
        .arg("--certs")
        .arg(&certs)
        .args(["--prefix", &o.prefix])
        .args(["--clinics", &o.clinics.to_string()])
        .args(["--events-per-clinic", &o.events_per_clinic.to_string()])
        .args(["--server-pid", &pids[0].to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("run the load client")?;
    let used = cpu() - before;
    drop(nodes);
    let dropped = pg(&o.pg_url)
        .and_then(|mut c| Ok(c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?));
    if let Err(e) = dropped {
        eprintln!("bench: could not drop schema {schema}: {e}");
    }
    if !out.status.success() {
        bail!("the load client failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let client: Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no JSON from the load client: {text}"))?;
    let events = client["events_acked"]
        .as_u64()
        .or_else(|| client["events"].as_u64())
        .unwrap_or(o.events_per_clinic * o.clinics as u64);
    let per_100k = if events > 0 {
        used / events as f64 * 100_000.0
    } else {
        0.0
    };
    Ok(json!({
        "scenario": "ingest_nodes",
        "nodes": o.nodes,
        "clinics": o.clinics,
        "events_per_s": client["events_per_s"],
        "gateway_cpu_s_per_100k_events": (per_100k * 1000.0).round() / 1000.0,
        "client": client,
        "machine": machine(),
    }))
}

pub async fn failover(dir: &Path, o: &FailoverOptions) -> anyhow::Result<Value> {
    if o.nodes < 2 {
        bail!("--nodes: a failover needs at least 2 nodes");
    }
    let schema = format!("bench_failover_{}", std::process::id());
    let ports: Vec<u16> = (0..o.nodes)
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let ids: Vec<String> = (1..=o.nodes).map(|i| format!("gw-{i}")).collect();
    let mut nodes = Vec::new();
    for (id, port) in ids.iter().zip(&ports) {
        nodes.push(Some(start_node(dir, id, *port, &o.pg_url, &schema)?));
    }
    let lb_port = free_port()?;
    let servers: Vec<(String, String)> = ids
        .iter()
        .zip(&ports)
        .map(|(id, p)| (id.clone(), format!("127.0.0.1:{p}")))
        .collect();
    let _lb = start_haproxy(dir, lb_port, &servers, None)?;
    let url = format!("ws://127.0.0.1:{lb_port}/v1/ws");
    let swarm = Arc::new(Swarm::default());
    // The agent's default connect timeout (10 s): a client that reconnects into the paused node
    // before HAProxy has marked it down waits this long, as an agent would.
    let http = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .connector(
            awc::Connector::new()
                .limit(0)
                .timeout(Duration::from_secs(10)),
        )
        .finish();
    for i in 0..o.clinics {
        let spec = ClientSpec {
            url: url.clone(),
            clinic_id: format!("fo-{i:05}"),
            tls: None,
            headers: Vec::new(),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(10),
            events_per_s: o.events_per_s,
            legacy_backoff: false,
            // Three of the nodes' 1 s heartbeats, as the agent.
            silence_limit: Some(Duration::from_secs(3)),
        };
        actix::spawn(crate::loadgen::run_client(
            spec,
            http.clone(),
            swarm.clone(),
        ));
    }
    crate::bench::wait_up(&swarm, o.clinics, Duration::from_secs(120)).await?;
    // Every clinic acknowledged at least once and held by a node.
    let t_ready = Instant::now();
    loop {
        let own = owners(&o.pg_url, &schema)?;
        if own.len() >= o.clinics && own.values().all(|(a, n)| *a > 0 && n.is_some()) {
            break;
        }
        if t_ready.elapsed() > Duration::from_secs(120) {
            bail!("clinics never all acknowledged");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 1. Routing: same node vs another node, interleaved.
    let api = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish();
    let own = owners(&o.pg_url, &schema)?;
    let clinic_ids: Vec<&String> = own.keys().collect();
    // Each round: one update, then one call (POST /v1/clinics/{id}/rpc, answered by the
    // clinic at once), through the same node.
    let (mut same, mut routed) = (Vec::new(), Vec::new());
    let (mut call_same, mut call_routed) = (Vec::new(), Vec::new());
    for n in 0..o.updates {
        let clinic = clinic_ids[(n * 7919) % clinic_ids.len()];
        let holder = own[clinic].1.clone().unwrap_or_default();
        let holder_i = ids.iter().position(|i| *i == holder).unwrap_or(0);
        let elsewhere = n % 2 == 1;
        let target = if elsewhere {
            (holder_i + 1 + n % (o.nodes - 1)) % o.nodes
        } else {
            holder_i
        };
        let t0 = Instant::now();
        let id = post_update(&api, ports[target], clinic, 1_000_000 + n).await?;
        let arrived = loop {
            if let Some(at) = swarm.updates.lock().ok().and_then(|u| u.get(&id).copied()) {
                break at;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("update {id} to {clinic} never arrived");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let us = arrived.duration_since(t0).as_micros() as u64;
        let call_us = post_call(&api, ports[target], clinic).await?;
        if elsewhere {
            routed.push(us);
            call_routed.push(call_us);
        } else {
            same.push(us);
            call_same.push(call_us);
        }
    }
    same.sort_unstable();
    routed.sort_unstable();
    call_same.sort_unstable();
    call_routed.sort_unstable();

    // 2. Failover.
    let own = owners(&o.pg_url, &schema)?;
    let (victim, orphans) =
        crate::local_cluster::busiest(&own).context("no node holds a clinic")?;
    let vi = ids.iter().position(|i| *i == victim).unwrap_or(0);
    let t_fault = Instant::now();
    match o.mode.as_str() {
        "stop" => {
            if let Some(n) = &nodes[vi] {
                n.signal("STOP");
            }
        }
        _ => {
            nodes[vi] = None;
        }
    }
    let back = loop {
        let own = owners(&o.pg_url, &schema)?;
        let all_back = orphans.iter().all(|(id, at)| {
            own.get(id)
                .is_some_and(|(a, n)| n.as_deref().is_some_and(|n| n != victim) && a > at)
        });
        if all_back && Swarm::get(&swarm.up) as usize >= o.clinics {
            break t_fault.elapsed();
        }
        if t_fault.elapsed() > Duration::from_secs(180) {
            bail!(
                "after 180 s, {} orphaned clinics are still not back",
                orphans
                    .keys()
                    .filter(|id| own
                        .get(*id)
                        .is_none_or(|(_, n)| n.as_deref() == Some(victim.as_str())))
                    .count()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Run on a little, then stop and check the store against what the clinics saw acknowledged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    swarm.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let positions = swarm
        .positions
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let (url, sch) = (o.pg_url.clone(), schema.clone());
    let check = std::thread::spawn(move || -> anyhow::Result<(u64, u64, u64)> {
        let mut c = pg(&url)?;
        let rows = c.query(
            &format!(
                "SELECT clinic_id, count(*), count(DISTINCT seq), coalesce(max(seq), 0) FROM {sch}.events GROUP BY clinic_id"
            ),
            &[],
        )?;
        let mut stored: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
        for r in rows {
            stored.insert(r.get(0), (r.get(1), r.get(2), r.get(3)));
        }
        let (mut lost, mut dup, mut total) = (0u64, 0u64, 0u64);
        for (clinic, acked) in &positions {
            let (n, distinct, max) = stored.get(clinic).copied().unwrap_or((0, 0, 0));
            total += n as u64;
            dup += (n - distinct) as u64;
            // Acknowledged to the clinic but not held: lost. Holes below the top: lost.
            lost += acked.saturating_sub(max as u64) + (max - distinct).max(0) as u64;
        }
        let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {sch} CASCADE"));
        Ok((lost, dup, total))
    });
    let (lost, dup, total) = check
        .join()
        .map_err(|_| anyhow::anyhow!("check thread panicked"))??;
    drop(nodes);
    let ms = |v: &[u64], p: f64| percentile(v, p);
    Ok(json!({
        "scenario": "failover",
        "nodes": o.nodes,
        "clinics": o.clinics,
        "events_per_clinic_per_s": o.events_per_s,
        "mode": o.mode,
        "orphaned_clinics": orphans.len(),
        "seconds_until_all_back": (back.as_secs_f64() * 100.0).round() / 100.0,
        "events_stored": total,
        "lost": lost,
        "duplicated": dup,
        "routing": {
            "updates": o.updates,
            "same_node_p50_ms": ms(&same, 0.5), "same_node_p99_ms": ms(&same, 0.99),
            "other_node_p50_ms": ms(&routed, 0.5), "other_node_p99_ms": ms(&routed, 0.99),
            "rpc_same_node_p50_ms": ms(&call_same, 0.5), "rpc_same_node_p99_ms": ms(&call_same, 0.99),
            "rpc_other_node_p50_ms": ms(&call_routed, 0.5), "rpc_other_node_p99_ms": ms(&call_routed, 0.99),
        },
        "machine": machine(),
    }))
}
