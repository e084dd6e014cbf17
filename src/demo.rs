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
    pub dir: Option<String>,
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
    }
    print_summary(&summary, opts.json);
    Ok(summary)
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
    let mut fleet = Fleet::build_on(dir, opts.clinics, heartbeat, Some(3072), opts.store.clone())?;
    fleet.start_agents().await?;
    let store = fleet.store().context("gateway store")?;
    let client = fleet.rest_client()?;

    let per_clinic = opts.rate / opts.clinics as f64;
    let mut generators = Vec::new();
    for c in &fleet.clinics {
        generators.push(Generator::start(c.db.clone(), per_clinic)?);
    }

    let started = Instant::now();
    let mut updates: Vec<CloudUpdate> = Vec::new();
    let mut next_status = Instant::now();
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
        if now >= next_status {
            next_status = now + Duration::from_secs(2);
            print_status(&fleet, &generators, started.elapsed());
        }
        actix_rt_sleep(Duration::from_millis(50)).await;
    }
    let active = started.elapsed();
    for g in &mut generators {
        g.stop();
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
    print_status(&fleet, &generators, started.elapsed());

    let mut s = Summary {
        clinics: fleet.clinics.len(),
        duration_s: active.as_secs_f64(),
        chaos: opts.chaos,
        drained,
        ..Default::default()
    };
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
    let (p50, p99) = latency_percentiles(&store)?;
    s.p50_ms = p50;
    s.p99_ms = p99;
    s.events_per_s = s.events_at_gateway as f64 / active.as_secs_f64().max(0.001);
    fleet.stop().await;
    Ok(s)
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

fn print_status(fleet: &Fleet, generators: &[Generator], elapsed: Duration) {
    for (c, g) in fleet.clinics.iter().zip(generators) {
        let Some(a) = &c.agent else { continue };
        let st = &a.handle.stats;
        let head = Fleet::outbox_head(&c.db).unwrap_or(0);
        let acked = tether_actors::AgentStats::get(&st.acked_seq);
        eprintln!(
            "[{:>4}s] {} {:<4} writes={:>6} outbox={:>6} acked={:>6} backlog={:>5} applied={:>4} restarts={:>2} reconnects={:>2}",
            elapsed.as_secs(),
            c.id,
            if st.connected.load(std::sync::atomic::Ordering::Relaxed) { "up" } else { "DOWN" },
            g.steps.load(std::sync::atomic::Ordering::Relaxed),
            head,
            acked,
            head.saturating_sub(acked),
            tether_actors::AgentStats::get(&st.updates_applied),
            st.total_restarts(),
            tether_actors::AgentStats::get(&st.links_up).saturating_sub(1),
        );
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
    println!(
        "commit→durable       p50 {} ms, p99 {} ms",
        s.p50_ms, s.p99_ms
    );
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
