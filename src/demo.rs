//! `tether demo`: a gateway and N clinics on temporary SQLite databases, realistic activity,
//! cloud updates over the REST API, optional chaos (dropped links, crashed actors), a live
//! status line per clinic, and a final summary whose `missing`/`duplicates` come from comparing
//! every clinic database with the gateway store row by row.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};

use crate::fleet::{cloud_id, Fleet, Generator};
use crate::history;

pub struct DemoOptions {
    pub clinics: usize,
    pub duration: Duration,
    pub rate: f64,
    pub json: bool,
    pub chaos: bool,
    pub keep: bool,
    /// The gateway's store: `None` is embedded SQLite in the run's directory.
    pub store: Option<crate::gateway::store::StoreLocation>,
    /// Gateway nodes (`--gateways`): more than 1 needs a PostgreSQL `store` and HAProxy.
    pub gateways: usize,
    /// `--channels`: a phone system posts call pops for every clinic and each clinic's front
    /// desk (a subscriber on its agent's local endpoint) must get exactly its own, in order.
    pub channels: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub clinics: usize,
    pub duration_s: f64,
    pub chaos: bool,
    pub events_written: u64,
    pub events_at_gateway: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    pub mismatched: u64,
    pub order_violations: u64,
    pub echoed: u64,
    pub updates_sent: u64,
    pub updates_applied: u64,
    pub updates_failed: u64,
    pub updates_unresolved: u64,
    pub updates_applied_but_absent: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub events_per_s: f64,
    pub actor_restarts: u64,
    pub reconnects: u64,
    pub drained: bool,
    /// Gateway nodes behind HAProxy (1: one in-process gateway, no balancer).
    pub gateways: usize,
    /// Nodes killed with SIGKILL during the run, and the clinic sessions that failed over to
    /// another node because of it (each orphaned clinic held again by a live node).
    pub node_kills: u64,
    pub failovers: u64,
    /// The longest a kill's orphaned clinics took to be held by other nodes again.
    pub failover_max_s: f64,
    /// Kills after which some orphaned clinic was not held by another node within 60 s.
    pub failovers_incomplete: u64,
    /// HAProxy's reports of health checks that failed in the TLS handshake (its log's `Layer6`
    /// lines, written as a node's check state changes): a node that answers must answer TLS,
    /// or the balancer takes live nodes out.
    pub lb_tls_check_failures: u64,
    /// `--channels`: the call pops posted, received by the right front desk, received by
    /// another clinic's (must be 0), out of order (must be 0), never received (0 unless
    /// chaos), and POST → front desk latency; the durable notices (every clinic gets each once).
    pub channels: Option<ChannelSummary>,
    pub dir: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct ChannelSummary {
    pub calls_posted: u64,
    pub calls_received: u64,
    pub calls_foreign: u64,
    pub calls_out_of_order: u64,
    pub calls_missing: u64,
    /// Calls at the right desk whose caller or patient (encrypted between the gateway and the
    /// agent) differ from what was posted.
    pub calls_garbled: u64,
    pub call_p50_ms: f64,
    pub call_p99_ms: f64,
    pub notices_posted: u64,
    pub notices_missing: u64,
    pub notices_duplicated: u64,
}

impl ChannelSummary {
    fn ok(&self, chaos: bool) -> bool {
        self.calls_foreign == 0
            && self.calls_out_of_order == 0
            && self.calls_garbled == 0
            && (chaos || self.calls_missing == 0)
            && self.notices_missing == 0
    }
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.drained
            && self.missing == 0
            && self.duplicates == 0
            && self.unexpected == 0
            && self.mismatched == 0
            && self.order_violations == 0
            && self.echoed == 0
            && self.updates_unresolved == 0
            && self.updates_applied_but_absent == 0
            && self.failovers_incomplete == 0
            && self.lb_tls_check_failures == 0
            && self.channels.as_ref().is_none_or(|c| c.ok(self.chaos))
    }
}

pub fn run(opts: DemoOptions) -> anyhow::Result<Summary> {
    #[cfg(not(feature = "fault-injection"))]
    if opts.chaos {
        anyhow::bail!("--chaos needs a build with the `fault-injection` feature (cargo run --features fault-injection -- demo --chaos)");
    }
    let tmp = tempfile::Builder::new().prefix("tether-demo-").tempdir()?;
    let dir: PathBuf = tmp.path().to_path_buf();
    let mut logging = crate::config::LoggingConfig::default();
    logging.dir = dir.join("logs");
    logging.console = false;
    let _log = crate::logging::init(&logging, "")?;
    crate::logging::install_panic_logger(false);
    eprintln!(
        "tether demo: {} clinics, {:?}, {} writes/s{} — files in {}",
        opts.clinics,
        opts.duration,
        opts.rate,
        if opts.chaos { ", chaos on" } else { "" },
        dir.display()
    );

    let system = actix::System::new();
    let mut summary = system.block_on(drive(&opts, &dir))?;
    if opts.keep {
        summary.dir = Some(tmp.keep().display().to_string());
    } else {
        drop_store_schema(opts.store.as_ref());
    }
    print_summary(&summary, opts.json);
    Ok(summary)
}

/// A PostgreSQL store's schema is the demo's own (`demo_<pid>`): removed after the run unless
/// `--keep`.
fn drop_store_schema(store: Option<&crate::gateway::store::StoreLocation>) {
    #[cfg(feature = "postgres")]
    if let Some(crate::gateway::store::StoreLocation::Postgres { url, schema }) = store {
        let (url, sql) = (
            url.clone(),
            format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        );
        // The driver blocks on its own runtime: a plain thread.
        let done = std::thread::spawn(move || -> Result<(), postgres::Error> {
            let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
            c.batch_execute(&sql)
        })
        .join();
        if !matches!(done, Ok(Ok(()))) {
            eprintln!("tether demo: could not remove the store's schema {schema}: drop it by hand");
        }
    }
    #[cfg(not(feature = "postgres"))]
    let _ = store;
}

struct CloudUpdate {
    clinic: usize,
    update_id: String,
    entity: String,
    key: Value,
    row: Option<Value>,
    expect_applied: bool,
}

async fn post_update(
    fleet: &Fleet,
    client: &awc::Client,
    clinic: &str,
    body: &Value,
) -> anyhow::Result<String> {
    let base = fleet.http_url();
    let mut resp = fleet
        .authorize(client.post(format!("{base}/v1/clinics/{clinic}/updates")))
        .send_json(body)
        .await
        .map_err(|e| anyhow::anyhow!("POST update: {e}"))?;
    let v: Value = resp
        .json()
        .await
        .map_err(|e| anyhow::anyhow!("POST update response: {e}"))?;
    v["update_id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("POST update answered {} {v}", resp.status()))
}

async fn drive(opts: &DemoOptions, dir: &std::path::Path) -> anyhow::Result<Summary> {
    let heartbeat = Duration::from_millis(500);
    // Mutual TLS, clinic-signed tokens, admin tokens and field encryption, like production.
    let first_node = (opts.gateways > 1).then_some("gw-1");
    let mut fleet = Fleet::build_on(
        dir,
        opts.clinics,
        heartbeat,
        Some(3072),
        opts.store.clone(),
        first_node,
    )?;
    let mut cluster = match opts.gateways {
        0 | 1 => None,
        n => Some(DemoCluster::start(&mut fleet, n, opts, dir)?),
    };
    fleet.start_agents().await?;
    let store = fleet.store().context("gateway store")?;
    let client = fleet.rest_client()?;
    let mut phone = match opts.channels {
        true => Some(Phone::start(&fleet).await?),
        false => None,
    };

    let per_clinic = opts.rate / opts.clinics as f64;
    let mut generators = Vec::new();
    for c in &fleet.clinics {
        generators.push(Generator::start(c.db.clone(), per_clinic)?);
    }

    let started = Instant::now();
    let mut updates: Vec<CloudUpdate> = Vec::new();
    let mut next_status = Instant::now();
    let mut board = StatusBoard::new(opts.json, opts.duration);
    let mut next_update = Instant::now();
    let mut next_chaos = Instant::now() + Duration::from_millis(800);
    let mut cloud_rows = 0u64;
    while started.elapsed() < opts.duration {
        let now = Instant::now();
        if now >= next_update {
            next_update = now + Duration::from_millis(250);
            let i = rand::rng().random_range(0..fleet.clinics.len());
            let n = updates.len();
            // Every 10th update is refused by design (payments only flow up): it must come
            // back `failed` without holding up the others.
            let (entity, key, row, expect) = if n % 10 == 9 {
                (
                    "payment",
                    json!({"id": 1}),
                    Some(json!({"id": 1, "patient_id": 1, "amount_cents": 1, "method": "cash"})),
                    false,
                )
            } else {
                let id = cloud_id(cloud_rows);
                cloud_rows += 1;
                (
                    "patient",
                    json!({"id": id}),
                    Some(
                        json!({"id": id, "name": format!("Cloud Patient {n}"), "phone": "+1-555-0000"}),
                    ),
                    true,
                )
            };
            let body = json!({"entity": entity, "op": "upsert", "key": key, "row": row});
            match post_update(&fleet, &client, &fleet.clinics[i].id, &body).await {
                Ok(update_id) => updates.push(CloudUpdate {
                    clinic: i,
                    update_id,
                    entity: entity.into(),
                    key,
                    row,
                    expect_applied: expect,
                }),
                Err(e) => log::warn!(target: "error", "event=demo_update_post_failed error={e}"),
            }
        }
        if let Some(p) = &mut phone {
            p.step(&fleet, &client).await;
        }
        #[cfg(feature = "fault-injection")]
        if opts.chaos && now >= next_chaos {
            let mut rng = rand::rng();
            next_chaos = now + Duration::from_millis(rng.random_range(400..1200));
            let c = &fleet.clinics[rng.random_range(0..fleet.clinics.len())];
            if let Some(a) = &c.agent {
                if rng.random_bool(0.4) {
                    if let Some(conn) = a.handle.slots.connection.get() {
                        conn.do_send(tether_actors::connection::DropLink);
                    }
                } else {
                    let actor = tether_actors::agent::ACTOR_NAMES[rng.random_range(0..4)];
                    a.handle.inject_panic(actor);
                }
            }
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = &mut next_chaos;
        if let Some(c) = &mut cluster {
            c.step(&store, opts.duration).await;
            board.note(c.notes.drain(..));
        }
        if now >= next_status {
            next_status = now + Duration::from_secs(2);
            board.show(&fleet, &generators, started.elapsed());
        }
        actix_rt_sleep(Duration::from_millis(50)).await;
    }
    let active = started.elapsed();
    for g in &mut generators {
        g.stop();
    }
    if let Some(c) = &mut cluster {
        // A node still down comes back, so every clinic drains through a full cluster.
        c.restart_down();
        board.note(c.notes.drain(..));
    }

    // Drain: every committed change acknowledged, every update answered (deadline 60 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut drained = false;
    while Instant::now() < deadline {
        let mut all = true;
        for c in &fleet.clinics {
            let head = Fleet::outbox_head(&c.db)?;
            let acked = store.acked_seq(&c.id).await?;
            if acked < head {
                all = false;
            }
        }
        for u in &updates {
            let st = store.update(&u.update_id).await?.map(|r| r.status);
            if !matches!(st.as_deref(), Some("applied" | "failed" | "conflict")) {
                all = false;
            }
        }
        if all {
            drained = true;
            break;
        }
        actix_rt_sleep(Duration::from_millis(100)).await;
    }
    board.show(&fleet, &generators, started.elapsed());

    let mut s = Summary {
        clinics: fleet.clinics.len(),
        duration_s: active.as_secs_f64(),
        chaos: opts.chaos,
        drained,
        gateways: opts.gateways.max(1),
        ..Default::default()
    };
    if let Some(c) = &cluster {
        s.node_kills = c.kills;
        s.failovers = c.failovers;
        s.failovers_incomplete = c.failovers_incomplete;
        s.lb_tls_check_failures = c.tls_check_failures();
        s.failover_max_s = (c.failover_max.as_secs_f64() * 100.0).round() / 100.0;
    }
    for (i, c) in fleet.clinics.iter().enumerate() {
        let echo_keys: Vec<(String, Value)> = updates
            .iter()
            .filter(|u| u.clinic == i && u.expect_applied)
            .map(|u| (u.entity.clone(), u.key.clone()))
            .collect();
        let r = history::check_clinic(&c.db, &c.id, store.as_ref(), &echo_keys)?;
        s.events_written += r.written;
        s.events_at_gateway += r.at_gateway;
        s.missing += r.missing;
        s.duplicates += r.duplicates;
        s.unexpected += r.unexpected;
        s.mismatched += r.mismatched;
        s.order_violations += r.order_violations;
        s.echoed += r.echoed;
        if let Some(a) = &c.agent {
            s.actor_restarts += a.handle.stats.total_restarts();
            s.reconnects +=
                tether_actors::AgentStats::get(&a.handle.stats.links_up).saturating_sub(1);
        }
    }
    s.updates_sent = updates.len() as u64;
    for u in &updates {
        let status = store.update(&u.update_id).await?.map(|r| r.status);
        if status.as_deref()
            == Some(if u.expect_applied {
                "failed"
            } else {
                "applied"
            })
        {
            log::warn!(target: "error", "event=demo_unexpected_update_outcome update_id={}", u.update_id);
        }
        match status.as_deref() {
            Some("applied") => {
                s.updates_applied += 1;
                let db = &fleet.clinics[u.clinic].db;
                if !row_present(db, u)? {
                    s.updates_applied_but_absent += 1;
                }
            }
            Some("failed") => s.updates_failed += 1,
            _ => s.updates_unresolved += 1,
        }
    }
    if let Some(p) = phone {
        s.channels = Some(p.finish().await);
    }
    let (p50, p99) = latency_percentiles(&store)?;
    s.p50_ms = p50;
    s.p99_ms = p99;
    s.events_per_s = s.events_at_gateway as f64 / active.as_secs_f64().max(0.001);
    fleet.stop().await;
    drop(cluster);
    Ok(s)
}

/// `--channels`: a simulated phone system posting a call pop every 100 ms to a random clinic,
/// and a durable notice to every clinic every 5 s; one front desk (SSE subscriber) per clinic.
struct Phone {
    desks: Vec<crate::fleet::Inbox>,
    /// Per call id: the clinic it was for and when it was posted.
    /// Call id → the desk's clinic, when it was posted, its caller.
    calls: std::collections::HashMap<String, (usize, Instant, String)>,
    notices: Vec<String>,
    next_call: Instant,
    next_notice: Instant,
    seq: u64,
}

const DESK_TOKEN: &str = "demo-front-desk-token-0123456789abcdef0123456789";

impl Phone {
    async fn start(fleet: &Fleet) -> anyhow::Result<Phone> {
        let mut desks = Vec::new();
        for c in &fleet.clinics {
            let addr = crate::fleet::serve_local_endpoint(c, DESK_TOKEN).await?;
            desks.push(crate::fleet::subscribe_sse(addr, DESK_TOKEN, "").await?);
        }
        Ok(Phone {
            desks,
            calls: Default::default(),
            notices: Vec::new(),
            next_call: Instant::now(),
            next_notice: Instant::now(),
            seq: 0,
        })
    }

    async fn step(&mut self, fleet: &Fleet, client: &awc::Client) {
        let now = Instant::now();
        let base = fleet.http_url();
        if now >= self.next_call {
            self.next_call = now + Duration::from_millis(100);
            self.seq += 1;
            let i = rand::rng().random_range(0..fleet.clinics.len());
            let clinic = &fleet.clinics[i].id;
            let call_id = format!("{clinic}/{:08}", self.seq);
            // The caller and patient are encrypted between the gateway and the agent.
            let caller = format!("+1-555-{:04}", self.seq % 10_000);
            let body = json!({"call_id": call_id, "state": "ringing", "caller": caller, "patient_id": self.seq, "line": "reception"});
            let sent = Instant::now();
            let ok = fleet
                .authorize(client.post(format!("{base}/v1/clinics/{clinic}/channels/voip.call")))
                .send_json(&body)
                .await
                .is_ok_and(|r| r.status().as_u16() == 202);
            if ok {
                self.calls.insert(call_id, (i, sent, caller));
            }
        }
        if now >= self.next_notice {
            self.next_notice = now + Duration::from_secs(5);
            let notice_id = format!("notice-{}", self.notices.len() + 1);
            let body = json!({"all": true, "payload": {"notice_id": notice_id, "title": "Demo notice", "severity": "info"}});
            let ok = fleet
                .authorize(client.post(format!("{base}/v1/channels/notice.broadcast")))
                .send_json(&body)
                .await
                .is_ok_and(|r| r.status().as_u16() == 202);
            if ok {
                self.notices.push(notice_id);
            }
        }
    }

    /// Waits (at most 15 s) for every call and notice to reach its desks, then counts.
    async fn finish(self) -> ChannelSummary {
        let want_notices = self.notices.len() * self.desks.len();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got: usize = self
                .desks
                .iter()
                .map(|d| d.lock().map(|g| g.len()).unwrap_or(0))
                .sum();
            if got >= self.calls.len() + want_notices || Instant::now() > deadline {
                break;
            }
            actix_rt_sleep(Duration::from_millis(50)).await;
        }
        let mut s = ChannelSummary {
            calls_posted: self.calls.len() as u64,
            notices_posted: self.notices.len() as u64,
            ..Default::default()
        };
        let mut lat = Vec::new();
        let mut seen_calls = std::collections::HashSet::new();
        for (desk, inbox) in self.desks.iter().enumerate() {
            let got = inbox.lock().map(|g| g.clone()).unwrap_or_default();
            let mut last_call = String::new();
            let mut notices = std::collections::HashMap::<String, u64>::new();
            for (m, at) in got {
                let p = &m["payload"];
                if let Some(call) = p["call_id"].as_str() {
                    match self.calls.get(call) {
                        Some((clinic, sent, caller)) if *clinic == desk => {
                            s.calls_received += 1;
                            let seq = call.rsplit('/').next().and_then(|n| n.parse::<u64>().ok());
                            if p["caller"].as_str() != Some(caller.as_str())
                                || p["patient_id"].as_u64() != seq
                            {
                                s.calls_garbled += 1;
                            }
                            seen_calls.insert(call.to_string());
                            lat.push(at.duration_since(*sent).as_micros() as u64);
                            if call <= last_call.as_str() {
                                s.calls_out_of_order += 1;
                            }
                            last_call = call.to_string();
                        }
                        _ => s.calls_foreign += 1,
                    }
                } else if let Some(n) = p["notice_id"].as_str() {
                    *notices.entry(n.to_string()).or_default() += 1;
                }
            }
            for n in &self.notices {
                match notices.get(n) {
                    None => s.notices_missing += 1,
                    Some(k) if *k > 1 => s.notices_duplicated += k - 1,
                    Some(_) => {}
                }
            }
        }
        s.calls_missing = (self.calls.len() - seen_calls.len()) as u64;
        lat.sort_unstable();
        let pct = |q: f64| {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
            (lat[i] as f64 / 10.0).round() / 100.0
        };
        s.call_p50_ms = pct(0.5);
        s.call_p99_ms = pct(0.99);
        s
    }
}

/// `--gateways N`: node gw-1 runs in this process (the demo posts its cloud updates to it),
/// gw-2 … gw-N are child processes of this binary on the same PostgreSQL store, and HAProxy
/// spreads the clinics over all of them. The child node holding the most clinics is killed with
/// SIGKILL every third of the run (none in the last quarter); its clinics fail over through
/// HAProxy; it is restarted once they are all held by other nodes.
struct DemoCluster {
    dir: PathBuf,
    /// The child nodes: id, configuration, process (None while killed).
    nodes: Vec<(String, String, Option<crate::local_cluster::Process>)>,
    _lb: crate::local_cluster::Process,
    started: Instant,
    next_kill: Instant,
    /// The node killed last, its orphaned clinics and when.
    down: Option<(usize, Vec<String>, Instant)>,
    kills: u64,
    failovers: u64,
    failovers_incomplete: u64,
    failover_max: Duration,
    /// What happened to the nodes since the board last took it (kills, failovers, restarts):
    /// shown by the status board, so a redraw in place does not overwrite it.
    notes: Vec<String>,
}

impl DemoCluster {
    /// HAProxy's log lines reporting a health check failed in the TLS handshake.
    fn tls_check_failures(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("haproxy.log"))
            .map(|log| log.lines().filter(|l| l.contains("Layer6")).count() as u64)
            .unwrap_or(0)
    }

    fn start(
        fleet: &mut Fleet,
        n: usize,
        opts: &DemoOptions,
        dir: &std::path::Path,
    ) -> anyhow::Result<DemoCluster> {
        let Some(crate::gateway::store::StoreLocation::Postgres { url, schema }) = &opts.store
        else {
            anyhow::bail!("--gateways {n}: the nodes share one PostgreSQL store; add --store postgres://… (or \"host=… dbname=…\")");
        };
        let (Some(certs), Some(token), Some(gw)) =
            (&fleet.certs, &fleet.admin_token, &fleet.gateway)
        else {
            anyhow::bail!("--gateways: the demo fleet has no certificates");
        };
        let mut servers = vec![("gw-1".to_string(), gw.addr.to_string())];
        let mut nodes = Vec::new();
        for i in 2..=n {
            let id = format!("gw-{i}");
            let port = crate::loadgen::free_port()?;
            let yaml = node_config(&id, port, certs, token, url, schema, fleet);
            let p = crate::local_cluster::start_node(dir, &id, &yaml)?;
            servers.push((id.clone(), format!("127.0.0.1:{port}")));
            nodes.push((id, yaml, Some(p)));
        }
        let lb_port = crate::loadgen::free_port()?;
        let lb = crate::local_cluster::start_haproxy(
            dir,
            lb_port,
            &servers,
            Some(&certs.join("ca.pem")),
        )?;
        // Every clinic connects through the balancer.
        let url = format!("wss://127.0.0.1:{lb_port}/v1/ws");
        for c in &mut fleet.clinics {
            c.config = crate::fleet::quick_agent_config(&c.id, &c.db, &url, Some(certs))?;
        }
        eprintln!(
            "tether demo: {n} gateway nodes (gw-1 in this process, {} as child processes) behind HAProxy on 127.0.0.1:{lb_port}",
            nodes.iter().map(|(id, _, _)| id.as_str()).collect::<Vec<_>>().join(", ")
        );
        let started = Instant::now();
        Ok(DemoCluster {
            dir: dir.to_path_buf(),
            nodes,
            _lb: lb,
            started,
            next_kill: started + opts.duration / 3,
            down: None,
            kills: 0,
            failovers: 0,
            failovers_incomplete: 0,
            failover_max: Duration::ZERO,
            notes: Vec::new(),
        })
    }

    /// Kills a node when it is time, and restarts the one killed once its clinics are back.
    async fn step(&mut self, store: &Arc<crate::gateway::store::Store>, run: Duration) {
        let now = Instant::now();
        if let Some((i, orphans, at)) = &self.down {
            let (i, at) = (*i, *at);
            let victim = self.nodes[i].0.clone();
            let Ok(records) = store.clinics().await else {
                return;
            };
            let back = orphans.iter().all(|id| {
                records
                    .iter()
                    .any(|r| &r.clinic_id == id && r.node.as_deref().is_some_and(|n| n != victim))
            });
            if back || now.duration_since(at) > Duration::from_secs(60) {
                let took = now.duration_since(at);
                if back {
                    self.failovers += orphans.len() as u64;
                    self.failover_max = self.failover_max.max(took);
                    self.notes.push(format!(
                        "[{:>4}s] {} clinics of {victim} held by other nodes again after {:.1} s; restarting {victim}",
                        self.started.elapsed().as_secs(),
                        orphans.len(),
                        took.as_secs_f64()
                    ));
                } else {
                    self.failovers_incomplete += 1;
                    log::warn!(target: "error", "event=demo_failover_incomplete node={victim}");
                }
                self.restart_down();
            }
            return;
        }
        // No kill in the last quarter: every failover is seen before the run ends.
        if now < self.next_kill || self.started.elapsed() > run * 3 / 4 {
            return;
        }
        self.next_kill = now + run / 3;
        let Ok(records) = store.clinics().await else {
            return;
        };
        // The child node holding the most clinics.
        let Some((i, orphans)) = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, (_, _, p))| p.is_some())
            .map(|(i, (id, _, _))| {
                let held: Vec<String> = records
                    .iter()
                    .filter(|r| r.node.as_deref() == Some(id.as_str()))
                    .map(|r| r.clinic_id.clone())
                    .collect();
                (i, held)
            })
            .max_by_key(|(_, held)| held.len())
            .filter(|(_, held)| !held.is_empty())
        else {
            return;
        };
        self.notes.push(format!(
            "[{:>4}s] kill -9 {} (holding {} clinics)",
            self.started.elapsed().as_secs(),
            self.nodes[i].0,
            orphans.len()
        ));
        log::warn!(target: "connection", "event=demo_node_killed node={} clinics={}", self.nodes[i].0, orphans.len());
        // Dropping the process kills it (SIGKILL).
        self.nodes[i].2 = None;
        self.kills += 1;
        self.down = Some((i, orphans, Instant::now()));
    }

    /// Starts the node killed last again, if it is down.
    fn restart_down(&mut self) {
        let Some((i, _, _)) = self.down.take() else {
            return;
        };
        let (id, yaml, _) = &self.nodes[i];
        match crate::local_cluster::start_node(&self.dir, id, yaml) {
            Ok(p) => self.nodes[i].2 = Some(p),
            Err(e) => {
                self.notes
                    .push(format!("tether demo: node {id} did not restart: {e:#}"));
                log::error!(target: "error", "event=demo_node_restart_failed node={id} error={e}");
            }
        }
    }
}

/// A child node's configuration: the in-process node's security (mutual TLS, clinic tokens,
/// admin token, field decryption) on the shared PostgreSQL store.
fn node_config(
    id: &str,
    port: u16,
    certs: &std::path::Path,
    admin_token: &str,
    url: &str,
    schema: &str,
    fleet: &Fleet,
) -> String {
    let c = |f: &str| certs.join(f).display().to_string();
    let s = &fleet.gateway_settings;
    let schemas = s
        .entity_schemas
        .as_ref()
        .map(|p| format!("  entity_schemas: {}\n", p.display()))
        .unwrap_or_default();
    format!(
        "logging:\n  dir: logs\n  console: false\ngateway:\n  listen: 127.0.0.1:{port}\n  id: {gid}\n  node_id: {id}\n  tls:\n    cert: {cert}\n    key: {key}\n    client_ca: {ca}\n  auth:\n    clinics_dir: {clinics}\n    leeway: 30s\n  admin_tokens:\n    - name: fleet-admin\n      sha256: {sha}\n      scopes: [read, write]\n  decryption_keys:\n    - {{kid: dk1, file: {dk}}}\n  store:\n    kind: postgres\n    url: \"{url}\"\n    schema: {schema}\n  heartbeat_interval: {hb}ms\n  update_window: {window}\n  group_commit_max_events: {group}\n{schemas}",
        gid = crate::fleet::GATEWAY_ID,
        cert = c("gateway.pem"),
        key = c("gateway.key"),
        ca = c("ca.pem"),
        clinics = c("clinics"),
        sha = crate::security::admin::sha256_hex(admin_token),
        dk = c("dk1.key"),
        hb = s.heartbeat_interval.as_millis(),
        window = s.update_window,
        group = s.group_commit_max_events,
    )
}

async fn actix_rt_sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

fn row_present(db: &std::path::Path, u: &CloudUpdate) -> anyhow::Result<bool> {
    let conn = crate::db::sqlite::open(db)?;
    let id = u.key["id"].as_i64().unwrap_or(-1);
    let name: Option<String> = rusqlite::OptionalExtension::optional(conn.query_row(
        "SELECT name FROM patients WHERE id = ?1",
        [id],
        |r| r.get(0),
    ))?;
    let want = u
        .row
        .as_ref()
        .and_then(|r| r["name"].as_str())
        .map(str::to_string);
    Ok(name.is_some() && name == want)
}

fn latency_percentiles(store: &Arc<crate::gateway::store::Store>) -> anyhow::Result<(f64, f64)> {
    // Commit (clinic clock) to durable (gateway clock), over every stored event.
    let mut v: Vec<f64> = Vec::new();
    let mut after = 0;
    loop {
        let page = crate::gateway::store::wait(store.events_page(None, after, 5_000))?;
        let Some(last) = page.last().map(|e| e.id) else {
            break;
        };
        after = last;
        v.extend(page.iter().filter_map(|e| {
            let stored = tether_schemas::rfc3339_ms(&e.received_at)?;
            let committed = tether_schemas::rfc3339_ms(&e.committed_at)?;
            Some(stored as f64 - committed as f64)
        }));
    }
    if v.is_empty() {
        return Ok((0.0, 0.0));
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        let idx = ((v.len() as f64 - 1.0) * q).round() as usize;
        (v[idx.min(v.len() - 1)] * 10.0).round() / 10.0
    };
    Ok((pick(0.50), pick(0.99)))
}

/// The live status on stderr: on a terminal, one line per clinic and a progress line, redrawn
/// in place every 2 s under a legend printed once; otherwise (a pipe, a file, `--json`) the
/// same lines appended, the legend once at the start.
struct StatusBoard {
    redraw: bool,
    /// Lines drawn last time (to move back over them).
    drawn: usize,
    /// The latest events (node kills, failovers) shown under the progress line on a terminal.
    recent: std::collections::VecDeque<String>,
    legend_done: bool,
    planned: Duration,
}

/// Events kept under the board on a terminal.
const RECENT_NOTES: usize = 4;

const LEGEND: &str = "columns: writes = transactions the demo committed at the clinic · outbox = changes \
they captured · acked = changes the gateway has acknowledged · unacked = outbox − acked (committed, \
not yet durable in the cloud) · applied = cloud updates applied at the clinic · restarts = actor \
crashes recovered · reconnects = links re-established";

impl StatusBoard {
    fn new(json: bool, planned: Duration) -> Self {
        use std::io::IsTerminal;
        StatusBoard {
            redraw: !json && std::io::stderr().is_terminal(),
            drawn: 0,
            recent: std::collections::VecDeque::new(),
            legend_done: false,
            planned,
        }
    }

    fn lines(
        fleet: &Fleet,
        generators: &[Generator],
        elapsed: Duration,
        planned: Duration,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let (mut up, mut unacked_total, mut writes_total) = (0usize, 0u64, 0u64);
        for (c, g) in fleet.clinics.iter().zip(generators) {
            let Some(a) = &c.agent else { continue };
            let st = &a.handle.stats;
            let head = Fleet::outbox_head(&c.db).unwrap_or(0);
            let acked = tether_actors::AgentStats::get(&st.acked_seq);
            let connected = st.connected.load(std::sync::atomic::Ordering::Relaxed);
            let writes = g.steps.load(std::sync::atomic::Ordering::Relaxed);
            up += usize::from(connected);
            unacked_total += head.saturating_sub(acked);
            writes_total += writes;
            out.push(format!(
                "{:<12} {:<4} writes={:>6} outbox={:>6} acked={:>6} unacked={:>5} applied={:>4} restarts={:>2} reconnects={:>2}",
                c.id,
                if connected { "up" } else { "DOWN" },
                writes,
                head,
                acked,
                head.saturating_sub(acked),
                tether_actors::AgentStats::get(&st.updates_applied),
                st.total_restarts(),
                tether_actors::AgentStats::get(&st.links_up).saturating_sub(1),
            ));
        }
        let phase = if elapsed <= planned {
            "running"
        } else {
            "draining"
        };
        out.push(format!(
            "[{:>4}s / {}s {phase}] {up}/{} clinics up · {writes_total} writes · {unacked_total} changes not yet acknowledged",
            elapsed.as_secs(),
            planned.as_secs(),
            fleet.clinics.len(),
        ));
        out
    }

    /// Events to tell: on a terminal kept (the last few) and drawn with the board; otherwise
    /// printed at once, one line each.
    fn note(&mut self, notes: impl Iterator<Item = String>) {
        use std::io::Write;
        for n in notes {
            if self.redraw {
                self.recent.push_back(n);
                if self.recent.len() > RECENT_NOTES {
                    self.recent.pop_front();
                }
            } else {
                let _ = writeln!(std::io::stderr().lock(), "{n}");
            }
        }
    }

    fn show(&mut self, fleet: &Fleet, generators: &[Generator], elapsed: Duration) {
        use std::io::Write;
        let mut lines = Self::lines(fleet, generators, elapsed, self.planned);
        lines.extend(self.recent.iter().cloned());
        let mut err = std::io::stderr().lock();
        if !self.legend_done {
            self.legend_done = true;
            let _ = writeln!(err, "{LEGEND}");
        }
        if self.redraw {
            if self.drawn > 0 {
                // Back to the first line of the last drawing; each line is cleared as it is
                // written again.
                let _ = write!(err, "\x1b[{}A", self.drawn);
            }
            for l in &lines {
                let _ = writeln!(err, "\x1b[2K{l}");
            }
            self.drawn = lines.len();
        } else {
            let stamp = format!("[{:>4}s] ", elapsed.as_secs());
            for l in &lines[..lines.len().saturating_sub(1)] {
                let _ = writeln!(err, "{stamp}{l}");
            }
        }
        let _ = err.flush();
    }
}

fn print_summary(s: &Summary, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
        return;
    }
    println!();
    println!("== tether demo summary ==");
    println!("clinics              {}", s.clinics);
    println!("changes committed    {}", s.events_written);
    println!("stored at gateway    {}", s.events_at_gateway);
    println!("missing / duplicates {} / {}", s.missing, s.duplicates);
    println!("unexpected/mismatch  {} / {}", s.unexpected, s.mismatched);
    println!("order violations     {}", s.order_violations);
    println!("echoed updates       {}", s.echoed);
    println!(
        "cloud updates        {} sent, {} applied, {} failed (by design), {} unresolved",
        s.updates_sent, s.updates_applied, s.updates_failed, s.updates_unresolved
    );
    if s.updates_failed > 0 {
        println!(
            "                     (by design: the demo also sends payments down to a table mapped \
             `direction: up`; the clinic refuses each one and the gateway records it as failed \
             with the reason — a refusal is reported, never applied)"
        );
    }
    println!(
        "commit→durable       p50 {} ms, p99 {} ms",
        s.p50_ms, s.p99_ms
    );
    if let Some(c) = &s.channels {
        println!(
            "call pops            {} posted, {} at the right front desk, {} at another (must be 0), {} out of order, {} never arrived, {} with a wrong caller or patient (must be 0; both encrypted in transit)",
            c.calls_posted, c.calls_received, c.calls_foreign, c.calls_out_of_order, c.calls_missing, c.calls_garbled
        );
        println!(
            "POST → front desk    p50 {} ms, p99 {} ms",
            c.call_p50_ms, c.call_p99_ms
        );
        println!(
            "notices (durable)    {} posted to every clinic, {} missing, {} duplicates (the desk deduplicates by message_id)",
            c.notices_posted, c.notices_missing, c.notices_duplicated
        );
    }
    if s.gateways > 1 {
        println!(
            "gateway nodes        {} behind HAProxy: {} node kills (kill -9), {} clinics failed over, all back within {} s{}",
            s.gateways,
            s.node_kills,
            s.failovers,
            s.failover_max_s,
            if s.failovers_incomplete > 0 {
                format!(", {} failovers INCOMPLETE", s.failovers_incomplete)
            } else {
                String::new()
            }
        );
        println!(
            "balancer checks      {} failed in the TLS handshake{}",
            s.lb_tls_check_failures,
            if s.lb_tls_check_failures > 0 {
                " (HAProxy takes live nodes out: see haproxy.log, kept with --keep)"
            } else {
                ""
            }
        );
    }
    println!("actor restarts       {}", s.actor_restarts);
    println!("reconnects           {}", s.reconnects);
    println!(
        "result               {}",
        if s.ok() {
            "OK: nothing lost, nothing duplicated"
        } else {
            "FAILED"
        }
    );
}
