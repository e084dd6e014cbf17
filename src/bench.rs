//! `tether bench <scenario>`: measured figures, one JSON line per scenario with the machine.
//! Scenarios: ingest, latency, connections, footprint, drain, fallback, storm, bridge, all. See
//! docs/BENCHMARKS.md for what each measures and what limits it.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fleet::{self, Fleet};
use crate::gateway::store::{self, IncomingEvent, StoreLocation, UNFENCED};
use crate::gateway::{self, GatewaySecurity, GatewaySettings};
use crate::loadgen::{rss_kb, rss_kb_of, run_client, ClientSpec, Swarm};
use crate::security::limits::SharedBucket;

pub const SCENARIOS: [&str; 13] = [
    "history",
    "agent-send",
    "values",
    "sqlite-ceiling",
    "ingest",
    "latency",
    "connections",
    "footprint",
    "drain",
    "fallback",
    "storm",
    "bridge",
    "channels",
];

/// Sizes; the defaults are the issue's, smaller ones keep CI quick.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub clinics: usize,
    pub events_per_clinic: u64,
    pub latency_clinics: usize,
    pub latency_secs: u64,
    pub connections: usize,
    /// `connections` without TLS (to separate OpenSSL's share from the HTTP stack's).
    pub plaintext: bool,
    pub drain_events: u64,
    pub storm_clients: usize,
    /// Calls per round and callers at once for `bridge`.
    pub bridge_calls: usize,
    pub bridge_callers: usize,
    /// Events in the store for `history`.
    pub history_events: u64,
    /// The gateway store for `ingest` and `history` (`None`: SQLite in the run's directory).
    pub store: Option<StoreLocation>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            clinics: 8,
            events_per_clinic: 25_000,
            latency_clinics: 500,
            latency_secs: 20,
            connections: 2_000,
            plaintext: false,
            drain_events: 100_000,
            storm_clients: 1_000,
            bridge_calls: 5_000,
            bridge_callers: 20,
            history_events: 3_000_000,
            store: None,
        }
    }
}

pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024 / 1024)
        .unwrap_or(0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
        "mem_gb": mem_gb,
        "os": std::env::consts::OS,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

pub(crate) fn settings(dir: &Path, listen: &str) -> GatewaySettings {
    GatewaySettings {
        node_id: None,
        advertise: None,
        listen: listen.into(),
        store: crate::gateway::store::StoreLocation::Sqlite(dir.join("gateway.db")),
        retention: None,
        heartbeat_interval: Duration::from_secs(10),
        max_frame_bytes: tether_schemas::DEFAULT_MAX_FRAME_BYTES,
        entity_schemas: None,
        update_window: 32,
        group_commit_max_events: 20_000,
        workers: 2,
        shutdown_timeout: Duration::from_secs(1),
        faults: Default::default(),
        webhooks: Vec::new(),
        bridge: Default::default(),
        channels: Vec::new(),
    }
}

pub(crate) fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    (sorted[i.min(sorted.len() - 1)] as f64 / 1000.0 * 100.0).round() / 100.0
}

/// Fills a clinic's outbox with `n` changes in large transactions (a backlog).
fn backlog(db: &Path, n: u64) -> anyhow::Result<()> {
    let conn = crate::db::sqlite::open(db)?;
    let mut left = n;
    while left > 0 {
        let chunk = left.min(5_000);
        conn.execute(
            "INSERT INTO payments (patient_id, amount_cents, method) \
             WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
             SELECT i, i * 7, 'card' FROM s",
            [chunk as i64],
        )?;
        left -= chunk;
    }
    Ok(())
}

async fn drain_fleet(fleet: &Fleet, deadline: Duration) -> anyhow::Result<Duration> {
    let store = fleet.store().ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    let heads: Vec<(String, u64)> = fleet
        .clinics
        .iter()
        .map(|c| Ok((c.id.clone(), Fleet::outbox_head(&c.db)?)))
        .collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    loop {
        let mut done = true;
        for (id, head) in &heads {
            if !store.acked_seq(id).await.is_ok_and(|a| a >= *head) {
                done = false;
                break;
            }
        }
        if done {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > deadline {
            anyhow::bail!("not drained within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The agent's send path alone: a real agent process drains a backlog of `drain_events` queued
/// changes (SQLite outbox) to a gateway in this process; the agent's CPU-seconds (from
/// `/proc/PID/stat`, start-up included) per 100,000 events sent and acknowledged.
pub async fn agent_send(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let db = dir.join("clinic.db");
    fleet::create_sample_clinic(&db)?;
    backlog(&db, o.drain_events)?;
    let (secs, cpu) =
        drain_by_agent_process(dir, &db, "payments", "payment", o.drain_events).await?;
    let n = o.drain_events;
    Ok(
        json!({"scenario": "agent-send", "events": n, "seconds": (secs * 100.0).round() / 100.0,
        "events_per_s": (n as f64 / secs).round(),
        "agent_cpu_s_per_100k": (cpu * 100_000.0 / n.max(1) as f64 * 1000.0).round() / 1000.0,
        "machine": machine()}),
    )
}

/// The cost of the wire form (docs/PROTOCOL.md "Values"): the same rows sent by a real agent
/// process from a table whose columns are typed (`BOOLEAN`, `DATETIME`, `DECIMAL`, `BLOB`:
/// every value converted) and from one whose columns are not (`INTEGER`, `TEXT`, `REAL`: passed
/// as they are), `drain_events` each, three rounds interleaved; the agent's CPU-seconds per
/// 100,000 events for each and their ratio.
pub async fn values(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    const PLAIN: &str = "CREATE TABLE readings (id INTEGER PRIMARY KEY, flag INTEGER, at TEXT, amount REAL, data TEXT, note TEXT)";
    const TYPED: &str = "CREATE TABLE readings (id INTEGER PRIMARY KEY, flag BOOLEAN, at DATETIME, amount DECIMAL(12,2), data BLOB, note TEXT)";
    let n = o.drain_events;
    let mut rounds = Vec::new();
    let (mut plain_cpu, mut typed_cpu) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let mut pair = serde_json::Map::new();
        for (kind, ddl, data) in [("plain", PLAIN, "'00FF10'"), ("typed", TYPED, "x'00ff10'")] {
            let sub = dir.join(format!("{kind}-{round}"));
            std::fs::create_dir_all(&sub)?;
            let db = sub.join("clinic.db");
            let conn = crate::db::sqlite::open(&db)?;
            conn.execute_batch(ddl)?;
            let t = crate::config::TableConfig::new(
                "readings",
                "reading",
                &["id"],
                crate::config::Direction::Up,
            );
            crate::db::sqlite::install(&db, &[t])?;
            let mut done = 0u64;
            while done < n {
                let chunk = (n - done).min(5_000);
                conn.execute(
                    &format!(
                        "INSERT INTO readings \
                         WITH RECURSIVE s(i) AS (SELECT ?1 + 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1 + ?2) \
                         SELECT i, i % 2, '2026-12-01 10:00:00.25', i * 0.25, {data}, 'note' FROM s"
                    ),
                    [done as i64, chunk as i64],
                )?;
                done += chunk;
            }
            drop(conn);
            let (secs, cpu) = drain_by_agent_process(&sub, &db, "readings", "reading", n).await?;
            let per_100k = cpu * 100_000.0 / n.max(1) as f64;
            if kind == "plain" {
                plain_cpu.push(per_100k);
            } else {
                typed_cpu.push(per_100k);
            }
            pair.insert(
                kind.into(),
                json!({"events_per_s": (n as f64 / secs).round(),
                       "agent_cpu_s_per_100k": (per_100k * 1000.0).round() / 1000.0}),
            );
        }
        rounds.push(Value::Object(pair));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (p, t) = (median(&mut plain_cpu), median(&mut typed_cpu));
    Ok(json!({"scenario": "values", "events": n, "rounds": rounds,
        "plain_agent_cpu_s_per_100k": (p * 1000.0).round() / 1000.0,
        "typed_agent_cpu_s_per_100k": (t * 1000.0).round() / 1000.0,
        "typed_over_plain": if p > 0.0 { (t / p * 100.0).round() / 100.0 } else { 0.0 },
        "machine": machine()}))
}

/// A real agent process (its own config, `table` → `entity` up) drains the `n` queued changes
/// of `db` to a gateway in this process: (seconds, the agent's CPU-seconds).
async fn drain_by_agent_process(
    dir: &Path,
    db: &Path,
    table: &str,
    entity: &str,
    n: u64,
) -> anyhow::Result<(f64, f64)> {
    let gw = gateway::start(settings(dir, "127.0.0.1:0"), GatewaySecurity::insecure())?;
    let agent_cfg = dir.join("agent.yaml");
    std::fs::write(
        &agent_cfg,
        format!(
            "logging:\n  dir: logs-agent\n  console: false\n  level: warn\nagent:\n  clinic_id: sender\n  database:\n    path: {}\n  gateway:\n    url: {}\n    insecure_plaintext: true\n  tables:\n    - {{table: {table}, entity: {entity}, key: [id], direction: up}}\n  admin:\n    listen: \"off\"\n",
            db.display(),
            gw.ws_url()
        ),
    )?;
    let t0 = Instant::now();
    let mut agent = std::process::Command::new(std::env::current_exe()?)
        .args(["agent", "--config"])
        .arg(&agent_cfg)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = agent.id();
    let mut cpu = 0.0;
    let done = loop {
        // Read before the ack check: the CPU counted covers at least everything acknowledged.
        cpu = cpu_seconds(pid).max(cpu);
        if gw.store.acked_seq("sender").await? >= n {
            break Ok(t0.elapsed());
        }
        if let Ok(Some(status)) = agent.try_wait() {
            break Err(anyhow::anyhow!("the agent exited early: {status}"));
        }
        if t0.elapsed() > Duration::from_secs(600) {
            break Err(anyhow::anyhow!("not drained within 600 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cpu = cpu_seconds(pid).max(cpu);
    let _ = agent.kill();
    let _ = agent.wait();
    gw.stop().await;
    Ok((done?.as_secs_f64(), cpu))
}

/// SQLite's own insert rate on this disk (the ingest ceiling): 500,000 events, 5,000 per commit
/// (about the writer's group size under load), best of three.
fn sqlite_ceiling(dir: &Path) -> anyhow::Result<Value> {
    let mut best = (0.0f64, f64::MAX);
    for i in 0..3 {
        let (rate, cpu) =
            store::sqlite::insert_ceiling(&dir.join(format!("ceiling-{i}.db")), 500_000, 5_000)?;
        if rate > best.0 {
            best = (rate, cpu);
        }
    }
    Ok(
        json!({"scenario": "sqlite-ceiling", "rows": 500_000, "rows_per_commit": 5_000,
        "rows_per_s": best.0.round(), "cpu_s_per_100k": (best.1 * 1000.0).round() / 1000.0,
        "machine": machine()}),
    )
}

/// K clinics push a backlog as fast as acknowledgements allow: durable events/s at the gateway.
pub async fn ingest(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let mut fleet = Fleet::build_on(
        dir,
        o.clinics,
        Duration::from_secs(10),
        None,
        o.store.clone(),
        None,
    )?;
    for c in &mut fleet.clinics {
        c.config.outbox.batch_max_events = 2_000;
        c.config.outbox.batch_max_bytes = 900 * 1024;
        c.config.outbox.max_inflight_batches = 8;
        c.config.outbox.max_buffered_events = 40_000;
        backlog(&c.db, o.events_per_clinic)?;
    }
    let total = o.events_per_clinic * o.clinics as u64;
    let t0 = Instant::now();
    fleet.start_agents().await?;
    drain_fleet(&fleet, Duration::from_secs(600)).await?;
    let secs = t0.elapsed().as_secs_f64();
    let rss = rss_kb() / 1024;
    fleet.stop().await;
    Ok(
        json!({"scenario": "ingest", "store": store_kind(&o.store), "clinics": o.clinics, "events": total,
        "seconds": (secs * 100.0).round() / 100.0, "events_per_s": (total as f64 / secs).round(),
        "rss_mb": rss, "machine": machine()}),
    )
}

/// One clinic over `transport` drains a backlog of `events`: seconds.
async fn drain_over(dir: &Path, events: u64, transport: &str) -> anyhow::Result<f64> {
    let mut fleet = Fleet::insecure(dir, 1, Duration::from_secs(10))?;
    let c = &mut fleet.clinics[0];
    c.config.outbox.batch_max_events = 2_000;
    c.config.outbox.batch_max_bytes = 900 * 1024;
    c.config.outbox.max_inflight_batches = 8;
    c.config.outbox.max_buffered_events = 40_000;
    c.config.gateway.transport = transport.into();
    backlog(&c.db, events)?;
    let t0 = Instant::now();
    fleet.start_agents().await?;
    drain_fleet(&fleet, Duration::from_secs(600)).await?;
    let secs = t0.elapsed().as_secs_f64();
    fleet.stop().await;
    Ok(secs)
}

/// One clinic drains a queued backlog after an outage: events/s.
pub async fn drain(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let secs = drain_over(dir, o.drain_events, "websocket").await?;
    Ok(
        json!({"scenario": "drain", "events": o.drain_events, "seconds": (secs * 100.0).round() / 100.0,
        "events_per_s": (o.drain_events as f64 / secs).round(), "machine": machine()}),
    )
}

/// The same drain over the HTTP fallback (long-poll + POST) next to the WebSocket.
pub async fn fallback(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let mut rates = Vec::new();
    for transport in ["websocket", "http"] {
        let sub = dir.join(transport);
        std::fs::create_dir_all(&sub)?;
        let secs = drain_over(&sub, o.drain_events, transport).await?;
        rates.push((o.drain_events as f64 / secs).round());
    }
    Ok(json!({"scenario": "fallback", "events": o.drain_events,
        "websocket_events_per_s": rates[0], "http_events_per_s": rates[1],
        "http_vs_websocket": ((rates[1] / rates[0].max(1.0)) * 100.0).round() / 100.0,
        "machine": machine()}))
}

fn spawn_swarm(
    n: usize,
    url: &str,
    tls: Option<openssl::ssl::SslConnector>,
    events_per_s: f64,
    prefix: &str,
) -> Arc<Swarm> {
    spawn_swarm_with(n, url, tls, events_per_s, prefix, |_| {})
}

fn spawn_swarm_with(
    n: usize,
    url: &str,
    tls: Option<openssl::ssl::SslConnector>,
    events_per_s: f64,
    prefix: &str,
    adjust: impl Fn(&mut ClientSpec),
) -> Arc<Swarm> {
    let swarm = Arc::new(Swarm::default());
    let http = crate::loadgen::http_client(tls.as_ref());
    for i in 0..n {
        let mut spec = ClientSpec {
            url: url.to_string(),
            clinic_id: format!("{prefix}{i:05}"),
            tls: tls.clone(),
            headers: Vec::new(),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(10),
            events_per_s,
            legacy_backoff: false,
            silence_limit: None,
        };
        adjust(&mut spec);
        actix::spawn(run_client(spec, http.clone(), swarm.clone()));
    }
    swarm
}

pub(crate) async fn wait_up(swarm: &Swarm, n: usize, limit: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while (Swarm::get(&swarm.up) as usize) < n {
        if t0.elapsed() > limit {
            anyhow::bail!(
                "only {} of {n} clients up after {limit:?}",
                Swarm::get(&swarm.up)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(t0.elapsed())
}

/// Many clinics × 2 events/s: commit-to-durable-ack latency at the protocol level.
pub async fn latency(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let gw = gateway::start(settings(dir, "127.0.0.1:0"), GatewaySecurity::insecure())?;
    let swarm = spawn_swarm(o.latency_clinics, &gw.ws_url(), None, 2.0, "lat-");
    wait_up(&swarm, o.latency_clinics, Duration::from_secs(60)).await?;
    swarm.clear_latencies();
    tokio::time::sleep(Duration::from_secs(o.latency_secs)).await;
    let l = swarm.stop_with_latencies();
    gw.stop().await;
    Ok(
        json!({"scenario": "latency", "clinics": o.latency_clinics, "events_per_clinic_per_s": 2,
        "acked": l.len(), "p50_ms": percentile(&l, 0.5), "p99_ms": percentile(&l, 0.99),
        "p999_ms": percentile(&l, 0.999), "machine": machine()}),
    )
}

/// The channel the bench posts every other call to: `voip.call` with its caller and patient
/// encrypted (`encrypt`), beside the plain one, so both are measured in the same run.
const SEALED_CALL: &str = "voip.call.sealed";

/// Call pops for many connected clinics: a phone system posts `voip.call` messages over REST
/// (one kept-alive client, `CALLS_PER_S` spread over the clinics) and each clinic's link receives
/// them; latency is POST sent → message at the clinic (a protocol client answering `delivered`
/// at once, as an agent does once its subscriber has it). Every other call goes to
/// [`SEALED_CALL`] (caller and patient encrypted for the clinic), so plain and encrypted are
/// interleaved call by call; the CPU the encryption costs is measured on its own (seal at the
/// gateway + open at the agent, per 100,000 messages). Then the full path on a few real
/// agents: POST → agent → a local SSE subscriber on the agent's endpoint. Checks that every
/// clinic got exactly its own calls, in order.
pub async fn channels(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    const CALLS_PER_S: f64 = 100.0;
    let n = o.latency_clinics;
    let mut s = settings(dir, "127.0.0.1:0");
    s.channels = crate::gateway::channels::samples();
    let mut sealed = s.channels[0].clone();
    sealed.def.name = SEALED_CALL.into();
    sealed.def.encrypt = vec!["caller".into(), "patient_id".into()];
    s.channels.push(sealed);
    std::fs::create_dir_all(dir)?;
    let cipher = bench_cipher(&dir.join("dk1.key"))?;
    let crypto = channel_crypto_cost(&cipher)?;
    let security = GatewaySecurity {
        decrypt: Some(cipher),
        ..GatewaySecurity::insecure()
    };
    // The phone system posts far more than one clinic's default rate in total, never per clinic.
    let gw = gateway::start(s, security)?;
    let swarm = spawn_swarm(n, &gw.ws_url(), None, 0.0, "ch-");
    wait_up(&swarm, n, Duration::from_secs(60)).await?;
    let base = gw.http_url();
    let client = crate::loadgen::http_client(None);
    let calls = (CALLS_PER_S * o.latency_secs as f64) as usize;
    let mut posted: std::collections::HashMap<String, Instant> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / CALLS_PER_S));
    let cpu0 = cpu_seconds(std::process::id());
    let t0 = Instant::now();
    let mut refused = 0usize;
    for i in 0..calls {
        tick.tick().await;
        let clinic = format!("ch-{:05}", (i * 7919) % n);
        let call_id = format!("{clinic}-{i:07}");
        let body = json!({"call_id": call_id, "state": "ringing", "caller": "+1-555-0100", "patient_id": i});
        posted.insert(call_id, Instant::now());
        let channel = if i % 2 == 1 { SEALED_CALL } else { "voip.call" };
        match client
            .post(format!("{base}/v1/clinics/{clinic}/channels/{channel}"))
            .send_json(&body)
            .await
        {
            Ok(mut r) if r.status().as_u16() == 202 => {
                let _ = r.body().await;
            }
            _ => refused += 1,
        }
    }
    // Everything posted arrives within the deadline, or the run says how much did not.
    let deadline = Instant::now() + Duration::from_secs(10);
    while swarm.channel_messages.lock().map(|m| m.len()).unwrap_or(0) < calls - refused
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id()) - cpu0;
    let got = swarm
        .channel_messages
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    swarm.stop.store(true, Ordering::Relaxed);
    let (mut lat, mut foreign, mut out_of_order) = (Vec::new(), 0usize, 0usize);
    let (mut plain_lat, mut sealed_lat) = (Vec::new(), Vec::new());
    let mut last: std::collections::HashMap<&str, &str> = Default::default();
    for (clinic, _, call, at) in &got {
        if !call.starts_with(clinic.as_str()) {
            foreign += 1;
        }
        if last
            .get(clinic.as_str())
            .is_some_and(|prev| *prev >= call.as_str())
        {
            out_of_order += 1;
        }
        last.insert(clinic, call);
        if let Some(t) = posted.get(call) {
            let us = at.duration_since(*t).as_micros() as u64;
            lat.push(us);
            // Odd call numbers went to the sealed channel.
            let odd = call
                .rsplit('-')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n % 2 == 1);
            if odd {
                sealed_lat.push(us);
            } else {
                plain_lat.push(us);
            }
        }
    }
    lat.sort_unstable();
    plain_lat.sort_unstable();
    sealed_lat.sort_unstable();
    let protocol = json!({
        "clinics_connected": n, "calls_posted": calls, "post_refused": refused,
        "received": got.len(), "missing": (calls - refused).saturating_sub(got.len()),
        "foreign": foreign, "out_of_order": out_of_order,
        "calls_per_s": CALLS_PER_S,
        "p50_ms": pct_ms(&lat, 0.5), "p99_ms": pct_ms(&lat, 0.99), "max_ms": pct_ms(&lat, 1.0),
        "process_cpu_s_per_100k": if got.is_empty() { 0.0 } else { cpu / got.len() as f64 * 100_000.0 },
        "seconds": elapsed,
        "plain": {"received": plain_lat.len(), "p50_ms": pct_ms(&plain_lat, 0.5), "p99_ms": pct_ms(&plain_lat, 0.99)},
        "encrypted": {"received": sealed_lat.len(), "p50_ms": pct_ms(&sealed_lat, 0.5), "p99_ms": pct_ms(&sealed_lat, 0.99)},
        "encryption_cpu": crypto,
    });
    gw.stop().await;
    let agents = channels_through_agents(&dir.join("agents"), 5, 400).await?;
    Ok(
        json!({"scenario": "channels", "protocol_clients": protocol, "real_agents": agents, "machine": machine()}),
    )
}

/// A data key written to `path`, active, as the bench gateway's.
fn bench_cipher(path: &Path) -> anyhow::Result<crate::security::crypto::FieldCipher> {
    crate::security::keys::write_data_key(path)?;
    let mut keys = crate::security::crypto::DataKeys::default();
    keys.add_file("dk1", path)?;
    keys.set_active("dk1")?;
    Ok(crate::security::crypto::FieldCipher::new(
        keys,
        Default::default(),
    ))
}

/// CPU-seconds per 100,000 call pops to seal their caller and patient (the gateway, per clinic
/// and message) and to open them (the agent), one thread, 20,000 of each.
fn channel_crypto_cost(cipher: &crate::security::crypto::FieldCipher) -> anyhow::Result<Value> {
    const N: usize = 20_000;
    let fields = ["caller".to_string(), "patient_id".to_string()];
    let payload = json!({"call_id": "ch-00001-0000001", "state": "ringing", "caller": "+1-555-0100", "patient_id": 1234})
        .as_object()
        .cloned()
        .unwrap_or_default();
    let thread_cpu = || {
        let t = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
        let rest = t.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let f: Vec<f64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|x| x.parse().ok())
            .collect();
        f.iter().sum::<f64>() / 100.0
    };
    let mut sealed = Vec::with_capacity(N);
    let c0 = thread_cpu();
    let t0 = Instant::now();
    for i in 0..N {
        let mut p = payload.clone();
        let id = format!("msg_{i:020}");
        cipher.seal_channel("ch-00001", "voip.call", &id, &mut p, &fields)?;
        sealed.push((id, p));
    }
    let (seal_cpu, seal_wall) = (thread_cpu() - c0, t0.elapsed().as_secs_f64());
    let c0 = thread_cpu();
    let t0 = Instant::now();
    for (id, p) in &mut sealed {
        cipher.open_channel("ch-00001", "voip.call", id, p, &fields)?;
    }
    let (open_cpu, open_wall) = (thread_cpu() - c0, t0.elapsed().as_secs_f64());
    anyhow::ensure!(
        sealed.iter().all(|(_, p)| *p == payload),
        "every sealed payload opens to what was sealed"
    );
    let per_100k = |x: f64| x / N as f64 * 100_000.0;
    Ok(json!({
        "messages": N,
        "seal_cpu_s_per_100k": per_100k(seal_cpu), "seal_wall_s_per_100k": per_100k(seal_wall),
        "open_cpu_s_per_100k": per_100k(open_cpu), "open_wall_s_per_100k": per_100k(open_wall),
    }))
}

/// `clinics` real agents (SQLite clinics, the gateway in this process) each with one SSE
/// subscriber on its local endpoint; `calls` call pops posted round-robin at 50/s: POST sent →
/// the subscriber has it.
async fn channels_through_agents(
    dir: &Path,
    clinics: usize,
    calls: usize,
) -> anyhow::Result<Value> {
    std::fs::create_dir_all(dir)?;
    let mut fleet = Fleet::insecure(dir, clinics, Duration::from_millis(500))?;
    fleet.start_agents().await?;
    let token = "bench-local-token-0123456789abcdef0123456789abcdef";
    let mut inboxes = Vec::new();
    for c in &fleet.clinics {
        let addr = fleet::serve_local_endpoint(c, token).await?;
        inboxes.push(fleet::subscribe_sse(addr, token, "voip.call").await?);
    }
    let received = |inboxes: &[fleet::Inbox]| -> Vec<(String, Instant)> {
        inboxes
            .iter()
            .flat_map(|i| i.lock().map(|g| g.clone()).unwrap_or_default())
            .map(|(v, at)| {
                (
                    v["payload"]["call_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    at,
                )
            })
            .collect()
    };
    let base = fleet.http_url();
    let client = crate::loadgen::http_client(None);
    let mut posted: std::collections::HashMap<String, Instant> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 0..calls {
        tick.tick().await;
        let clinic = &fleet.clinics[i % clinics].id;
        let call_id = format!("{clinic}-{i:06}");
        posted.insert(call_id.clone(), Instant::now());
        let mut r = client
            .post(format!("{base}/v1/clinics/{clinic}/channels/voip.call"))
            .send_json(&json!({"call_id": call_id, "state": "ringing"}))
            .await
            .map_err(|e| anyhow::anyhow!("post: {e}"))?;
        let _ = r.body().await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while received(&inboxes).len() < calls && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received(&inboxes);
    let mut lat: Vec<u64> = got
        .iter()
        .filter_map(|(call, at)| {
            posted
                .get(call)
                .map(|t| at.duration_since(*t).as_micros() as u64)
        })
        .collect();
    lat.sort_unstable();
    fleet.stop().await;
    Ok(json!({
        "clinics": clinics, "subscribers": inboxes.len(), "calls_posted": calls, "received": got.len(),
        "p50_ms": pct_ms(&lat, 0.5), "p99_ms": pct_ms(&lat, 0.99), "max_ms": pct_ms(&lat, 1.0),
    }))
}

/// A gateway restarted three times in a row (a graceful stop: sessions told 1001, then a new
/// process on the same address); seconds until every client has a session again, each time.
/// The clients use the agent's default backoff (0.5 s doubling to 60 s) and its reconnect policy
/// (back within a second after a 1001; the backoff reset once a link carried traffic); then the
/// same with the policy before it (reset only after 60 s of link) for comparison.
pub async fn storm(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let agent_backoff = (Duration::from_millis(500), Duration::from_secs(60));
    let current = storm_rounds(dir, o, agent_backoff, false).await?;
    let legacy = storm_rounds(&dir.join("legacy"), o, agent_backoff, true).await?;
    let worst = |v: &Value| {
        v["each_restart_s"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).fold(0.0, f64::max))
            .unwrap_or(0.0)
    };
    Ok(
        json!({"scenario": "storm", "clients": o.storm_clients, "restarts": 3, "admission_limit_per_s": 200,
        "seconds_until_all_back": worst(&current), "current_policy": current, "previous_policy": legacy,
        "machine": machine()}),
    )
}

/// Three restarts with clients whose backoff runs from `backoff.0` doubling to `backoff.1`.
pub async fn storm_rounds(
    dir: &Path,
    o: &BenchOptions,
    backoff: (Duration, Duration),
    legacy: bool,
) -> anyhow::Result<Value> {
    std::fs::create_dir_all(dir)?;
    let admission = || {
        let mut sec = GatewaySecurity::insecure();
        sec.admission = SharedBucket::new(200.0, 200.0);
        sec
    };
    let mut gw = gateway::start(settings(dir, "127.0.0.1:0"), admission())?;
    let addr = gw.addr.to_string();
    let swarm = spawn_swarm_with(o.storm_clients, &gw.ws_url(), None, 0.0, "storm-", |s| {
        (s.backoff_base, s.backoff_cap) = backoff;
        s.legacy_backoff = legacy;
    });
    wait_up(&swarm, o.storm_clients, Duration::from_secs(300)).await?;
    let rss_before = rss_kb();
    let refused_before = Swarm::get(&swarm.refused);
    let mut back = Vec::new();
    for _ in 0..3 {
        gw.stop().await;
        // Every client must have seen its session end before the new gateway starts.
        let t0 = Instant::now();
        while Swarm::get(&swarm.up) > 0 {
            if t0.elapsed() > Duration::from_secs(60) {
                anyhow::bail!(
                    "{} clients never noticed the gateway stop",
                    Swarm::get(&swarm.up)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gw = gateway::start(settings(dir, &addr), admission())?;
        let t = wait_up(&swarm, o.storm_clients, Duration::from_secs(300)).await?;
        back.push((t.as_secs_f64() * 100.0).round() / 100.0);
    }
    let refused = Swarm::get(&swarm.refused) - refused_before;
    let rss_after = rss_kb();
    swarm.stop.store(true, Ordering::Relaxed);
    gw.stop().await;
    Ok(json!({"each_restart_s": back, "refused_503": refused,
        "rss_mb_before": rss_before / 1024, "rss_mb_after": rss_after / 1024}))
}

/// N idle TLS (or, with `plaintext`, plain) connections held by a gateway in its own process:
/// RSS per connection.
pub async fn connections(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let certs = dir.join("certs");
    crate::security::keys::dev_setup(&certs, &[], 2048)?;
    let cfg = dir.join("gw.yaml");
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  dir: logs\n  console: false\n  level: warn\ngateway:\n  listen: 127.0.0.1:0\n  insecure_plaintext: true\n  store:\n    path: gw.db\n{tls}  limits:\n    handshakes_per_second: 5000\n    handshake_burst: 5000\n",
            tls = if o.plaintext {
                String::new()
            } else {
                format!(
                    "  tls:\n    cert: {c}/gateway.pem\n    key: {c}/gateway.key\n",
                    c = certs.display()
                )
            }
        ),
    )?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .read_line(&mut line)?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let pid = child.id().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kb_of(&pid);
    let tls = if o.plaintext {
        None
    } else {
        Some(crate::security::tls::connector(
            &crate::security::tls::ClientTls {
                ca: Some(certs.join("ca.pem")),
                ..Default::default()
            },
        )?)
    };
    let scheme = if o.plaintext { "ws" } else { "wss" };
    let swarm = spawn_swarm(
        o.connections,
        &format!("{scheme}://{addr}/v1/ws"),
        tls,
        0.0,
        "conn-",
    );
    let r = wait_up(&swarm, o.connections, Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = rss_kb_of(&pid);
    swarm.stop.store(true, Ordering::Relaxed);
    let _ = child.kill();
    let _ = child.wait();
    r?;
    let per = (loaded.saturating_sub(idle) as f64 * 1024.0 / o.connections as f64).round();
    Ok(
        json!({"scenario": "connections", "connections": o.connections, "tls": !o.plaintext,
        "gateway_rss_mb_idle": idle / 1024, "gateway_rss_mb_loaded": loaded / 1024,
        "bytes_per_connection": per, "machine": machine()}),
    )
}

/// A real agent process: RSS idle and while the clinic writes ~1,000 changes/s.
pub async fn footprint(dir: &Path, _o: &BenchOptions) -> anyhow::Result<Value> {
    let gw = gateway::start(settings(dir, "127.0.0.1:0"), GatewaySecurity::insecure())?;
    let db = dir.join("clinic.db");
    fleet::create_sample_clinic(&db)?;
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  dir: logs-agent\n  console: false\n  level: warn\nagent:\n  clinic_id: fp\n  database:\n    path: {}\n  gateway:\n    url: {}\n    insecure_plaintext: true\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n    - {{table: appointments, entity: appointment, key: [id]}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n",
            db.display(),
            gw.ws_url()
        ),
    )?;
    // TETHER_AGENT_BIN: measure an agent-only build (`--no-default-features`) instead.
    let exe = match std::env::var_os("TETHER_AGENT_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::current_exe()?,
    };
    let mut child = std::process::Command::new(&exe)
        .args(["agent", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id().to_string();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_kb_of(&pid);
    let writer_db = db.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let writer = std::thread::spawn(move || -> anyhow::Result<u64> {
        let conn = crate::db::sqlite::open(&writer_db)?;
        let mut n = 0u64;
        let t0 = Instant::now();
        while !s.load(Ordering::Relaxed) {
            conn.execute(
                "INSERT INTO payments (patient_id, amount_cents, method) \
                 WITH RECURSIVE q(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM q WHERE i < 50) SELECT i, i, 'cash' FROM q",
                [],
            )?;
            n += 50;
            // Pace the load at about 1,000 changes/s.
            let due = Duration::from_millis(n);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(n)
    });
    let mut peak = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_kb_of(&pid));
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let _ = child.kill();
    let _ = child.wait();
    gw.stop().await;
    Ok(
        json!({"scenario": "footprint", "agent_rss_mb_idle": (idle as f64 / 1024.0 * 10.0).round() / 10.0,
        "agent_rss_mb_at_1000_events_per_s": (peak as f64 / 1024.0 * 10.0).round() / 10.0,
        "events_written": written, "machine": machine()}),
    )
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat` (0 elsewhere).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    (ticks(11) + ticks(12)) / 100.0
}

/// `calls` POSTs of `body` to `url` from `callers` concurrent callers: (calls/s, latencies in
/// µs, non-2xx answers).
async fn call_load(url: &str, body: &str, calls: usize, callers: usize) -> (f64, Vec<u64>, usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let tasks = (0..callers.max(1)).map(|_| {
        let (next, url, body) = (next.clone(), url.to_string(), body.to_string());
        async move {
            let client = awc::Client::builder()
                .timeout(Duration::from_secs(30))
                .finish();
            let (mut lat, mut bad) = (Vec::new(), 0usize);
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let t = Instant::now();
                let ok = match client
                    .post(&url)
                    .insert_header(("content-type", "application/json"))
                    .send_body(body.clone())
                    .await
                {
                    Ok(mut r) => {
                        let b = r.body().await;
                        if std::env::var_os("TETHER_BENCH_DEBUG").is_some()
                            && !r.status().is_success()
                        {
                            eprintln!("{} {:?}", r.status(), b);
                        }
                        b.is_ok() && r.status().is_success()
                    }
                    Err(e) => {
                        if std::env::var_os("TETHER_BENCH_DEBUG").is_some() {
                            eprintln!("error {e}");
                        }
                        false
                    }
                };
                lat.push(t.elapsed().as_micros() as u64);
                if !ok {
                    bad += 1;
                }
            }
            (lat, bad)
        }
    });
    let mut lat = Vec::with_capacity(calls);
    let mut bad = 0;
    for (l, b) in futures_util::future::join_all(tasks).await {
        lat.extend(l);
        bad += b;
    }
    let rate = calls as f64 / t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    (rate, lat, bad)
}

fn pct_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    (sorted_us[i] as f64 / 10.0).round() / 100.0
}

/// Clinic software calling the main Web API through its agent (`POST /call/{endpoint}` →
/// agent → gateway → a stand-in API in this process) against calling the stand-in directly,
/// interleaved over three rounds. The gateway and the agent run as their own processes; their
/// CPU per 1,000 bridged calls comes from `/proc`.
pub async fn bridge(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let api = HttpServer::new(|| {
        App::new().route(
            "/echo",
            web::post().to(|body: web::Bytes| async move {
                HttpResponse::Ok()
                    .content_type("application/json")
                    .body(body)
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")?;
    let api_addr = api.addrs()[0];
    let api = api.run();
    let api_handle = api.handle();
    actix::spawn(api);
    let exe = std::env::current_exe()?;
    let gw_port = crate::loadgen::free_port()?;
    let admin_port = crate::loadgen::free_port()?;
    let gw_cfg = dir.join("gateway.yaml");
    std::fs::write(
        &gw_cfg,
        format!(
            "logging:\n  dir: logs-gateway\n  console: false\n  level: warn\ngateway:\n  listen: 127.0.0.1:{gw_port}\n  insecure_plaintext: true\n  store:\n    path: gateway.db\n  api_bridge:\n    endpoints:\n      echo: {{url: http://{api_addr}/echo, method: POST, timeout: 10s}}\n  limits:\n    calls_per_second: 100000\n"
        ),
    )?;
    let mut gw = std::process::Command::new(&exe)
        .args(["gateway", "--config"])
        .arg(&gw_cfg)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let db = dir.join("clinic.db");
    fleet::create_sample_clinic(&db)?;
    let agent_cfg = dir.join("agent.yaml");
    std::fs::write(
        &agent_cfg,
        format!(
            "logging:\n  dir: logs-agent\n  console: false\n  level: warn\nagent:\n  clinic_id: bridge\n  database:\n    path: {}\n  gateway:\n    url: ws://127.0.0.1:{gw_port}/v1/ws\n    insecure_plaintext: true\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n  admin:\n    listen: 127.0.0.1:{admin_port}\n",
            db.display()
        ),
    )?;
    let mut agent = std::process::Command::new(&exe)
        .args(["agent", "--config"])
        .arg(&agent_cfg)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let via = format!("http://127.0.0.1:{admin_port}/call/echo");
    let direct = format!("http://{api_addr}/echo");
    let body = r#"{"patient_ref":"p-7","plan":"basic","amount":1e5}"#;
    // Ready once a call goes through.
    let t0 = Instant::now();
    loop {
        let (_, _, bad) = call_load(&via, body, 1, 1).await;
        if bad == 0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = (gw.kill(), agent.kill());
            anyhow::bail!("the agent never got a call through");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut via_rate, mut direct_rate) = (Vec::new(), Vec::new());
    let (mut via_lat, mut direct_lat) = (Vec::new(), Vec::new());
    let (mut failed, mut gw_cpu, mut agent_cpu) = (0usize, 0.0, 0.0);
    for _ in 0..3 {
        let (r, l, b) = call_load(&direct, body, o.bridge_calls, o.bridge_callers).await;
        direct_rate.push(r);
        direct_lat.extend(l);
        failed += b;
        let (g0, a0) = (cpu_seconds(gw.id()), cpu_seconds(agent.id()));
        let (r, l, b) = call_load(&via, body, o.bridge_calls, o.bridge_callers).await;
        gw_cpu += cpu_seconds(gw.id()) - g0;
        agent_cpu += cpu_seconds(agent.id()) - a0;
        via_rate.push(r);
        via_lat.extend(l);
        failed += b;
    }
    let _ = (gw.kill(), agent.kill());
    let _ = (gw.wait(), agent.wait());
    api_handle.stop(true).await;
    via_lat.sort_unstable();
    direct_lat.sort_unstable();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2]).round()
    };
    let per_1000 =
        |cpu: f64| (cpu / (3.0 * o.bridge_calls as f64) * 1000.0 * 1000.0).round() / 1000.0;
    Ok(
        json!({"scenario": "bridge", "calls_per_round": o.bridge_calls, "callers": o.bridge_callers, "rounds": 3,
        "bridged_calls_per_s": median(&mut via_rate), "direct_calls_per_s": median(&mut direct_rate),
        "bridged_p50_ms": pct_ms(&via_lat, 0.5), "bridged_p99_ms": pct_ms(&via_lat, 0.99),
        "direct_p50_ms": pct_ms(&direct_lat, 0.5), "direct_p99_ms": pct_ms(&direct_lat, 0.99),
        "added_p99_ms": ((pct_ms(&via_lat, 0.99) - pct_ms(&direct_lat, 0.99)) * 100.0).round() / 100.0,
        "gateway_cpu_s_per_1000_calls": per_1000(gw_cpu), "agent_cpu_s_per_1000_calls": per_1000(agent_cpu),
        "failed": failed, "machine": machine()}),
    )
}

/// Runs one scenario (or all) and prints one JSON line each (or a readable summary).
pub fn run(scenario: &str, json_out: bool, o: BenchOptions) -> anyhow::Result<Vec<Value>> {
    let names: Vec<&str> = if scenario == "all" {
        SCENARIOS.to_vec()
    } else if SCENARIOS.contains(&scenario) {
        vec![scenario]
    } else {
        anyhow::bail!(
            "unknown scenario `{scenario}` (one of {}, all)",
            SCENARIOS.join(", ")
        );
    };
    let mut out = Vec::new();
    for name in names {
        let dir = tempfile::Builder::new().prefix("tether-bench-").tempdir()?;
        let mut logging = crate::config::LoggingConfig::default();
        logging.dir = dir.path().join("logs");
        logging.console = false;
        logging.level = "warn".into();
        let _ = crate::logging::init(&logging, "");
        let system = actix::System::new();
        let path = dir.path().to_path_buf();
        let mut opts = o.clone();
        // A fresh PostgreSQL schema per scenario, dropped after it.
        let pg_schema = match &mut opts.store {
            Some(StoreLocation::Postgres { schema, .. }) => {
                *schema = format!("{schema}_{name}");
                Some(schema.clone())
            }
            _ => None,
        };
        let store_opt = opts.store.clone();
        let v = system.block_on(async move {
            match name {
                "ingest" => ingest(&path, &opts).await,
                "latency" => latency(&path, &opts).await,
                "connections" => connections(&path, &opts).await,
                "footprint" => footprint(&path, &opts).await,
                "drain" => drain(&path, &opts).await,
                "fallback" => fallback(&path, &opts).await,
                "bridge" => bridge(&path, &opts).await,
                "history" => history(&path, &opts).await,
                "sqlite-ceiling" => sqlite_ceiling(&path),
                "agent-send" => agent_send(&path, &opts).await,
                "values" => values(&path, &opts).await,
                "channels" => channels(&path, &opts).await,
                _ => storm(&path, &opts).await,
            }
        });
        #[cfg(feature = "postgres")]
        if let (Some(schema), Some(StoreLocation::Postgres { url, .. })) = (&pg_schema, &store_opt)
        {
            if let Ok(mut c) = ::postgres::Client::connect(url, ::postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        }
        let _ = &pg_schema;
        let v = v?;
        if json_out {
            println!("{v}");
        } else {
            println!(
                "{name}: {}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            );
        }
        out.push(v);
    }
    Ok(out)
}

fn store_kind(s: &Option<StoreLocation>) -> &'static str {
    match s {
        Some(StoreLocation::Postgres { .. }) => "postgres",
        _ => "sqlite",
    }
}

/// Fills the store with `events` events from 500 clinics through the port (group-committed).
async fn fill(s: &Arc<store::Store>, clinics: usize, events: u64) -> anyhow::Result<f64> {
    let per = events / clinics as u64;
    let t0 = Instant::now();
    let mut at = 0u64;
    while at < per {
        let n = (per - at).min(1_000);
        let mut waits = Vec::with_capacity(clinics);
        for k in 0..clinics {
            let batch: Vec<IncomingEvent> = (at + 1..=at + n)
                .map(|seq| {
                    let event = tether_schemas::Event {
                        seq,
                        entity: "appointment".into(),
                        op: tether_schemas::Op::Insert,
                        key: json!({"id": seq}).as_object().cloned().unwrap_or_default(),
                        row: json!({"id": seq, "patient_id": k, "status": "booked", "starts_at": "2026-12-01T09:00:00Z"})
                            .as_object()
                            .cloned(),
                        committed_at: "2026-12-01T09:00:00.000Z".into(),
                    };
                    IncomingEvent::from_event(&event, None)
                })
                .collect();
            waits.push(s.append(&format!("clinic-{k:03}"), 0, UNFENCED, at, batch));
        }
        for w in waits {
            w.await?;
        }
        at += n;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Median milliseconds of `n` GETs of `path`.
async fn median_get(base: &str, path: &str, n: usize) -> anyhow::Result<f64> {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(60))
        .finish();
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut resp = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("GET {path}: {e}"))?;
        let body = resp.body().limit(64 << 20).await?;
        if !resp.status().is_success() {
            anyhow::bail!(
                "GET {path}: {} {}",
                resp.status(),
                String::from_utf8_lossy(&body)
            );
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok((ms[ms.len() / 2] * 100.0).round() / 100.0)
}

/// CPU seconds this process spends over `secs` (with or without a fleet stream open).
async fn cpu_over(base: &str, stream: bool, secs: u64) -> anyhow::Result<f64> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = if stream {
        let client = awc::Client::builder().disable_timeout().finish();
        let mut resp = client
            .get(format!("{base}/v1/stream/fleet?interval_ms=1000"))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("stream: {e}"))?;
        let stop = stop.clone();
        Some(actix::spawn(async move {
            use futures_util::StreamExt;
            while !stop.load(Ordering::Relaxed) {
                if resp.next().await.is_none() {
                    break;
                }
            }
        }))
    } else {
        None
    };
    let before = cpu_seconds(std::process::id());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let used = cpu_seconds(std::process::id()) - before;
    stop.store(true, Ordering::Relaxed);
    if let Some(r) = reader {
        r.abort();
    }
    Ok(used)
}

async fn history_round(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let mut s = settings(dir, "127.0.0.1:0");
    if let Some(loc) = &o.store {
        s.store = loc.clone();
    }
    let gw = gateway::start(s, GatewaySecurity::insecure())?;
    let base = gw.http_url();
    // Warm-up (caches, connections).
    median_get(&base, "/v1/clinics", 3).await?;
    let clinics_ms = median_get(&base, "/v1/clinics", 21).await?;
    let one_ms = median_get(&base, "/v1/clinics/clinic-250", 21).await?;
    let metrics_ms = median_get(&base, "/metrics", 21).await?;
    let idle = cpu_over(&base, false, 10).await?;
    let streaming = cpu_over(&base, true, 10).await?;
    gw.stop().await;
    Ok(json!({
        "clinics_ms": clinics_ms, "clinic_ms": one_ms, "metrics_ms": metrics_ms,
        "fleet_stream_core_pct": (((streaming - idle).max(0.0) / 10.0) * 1000.0).round() / 10.0,
    }))
}

/// The fleet views against an empty store and against one holding `history_events` events of
/// 500 clinics: they must not grow with history.
pub async fn history(dir: &Path, o: &BenchOptions) -> anyhow::Result<Value> {
    let clinics = 500;
    let location = o
        .store
        .clone()
        .unwrap_or_else(|| StoreLocation::Sqlite(dir.join("gateway.db")));
    let mut opts = o.clone();
    opts.store = Some(location.clone());
    // 500 clinics known, no events: the baseline.
    let mut ss = store::StoreSettings::sqlite(dir.join("unused"));
    ss.location = location.clone();
    let s = store::open(&ss)?;
    for k in 0..clinics {
        s.hello(&format!("clinic-{k:03}"), 0).await?;
    }
    let empty = history_round(dir, &opts).await?;
    let fill_s = fill(&s, clinics, o.history_events).await?;
    s.close();
    drop(s);
    let full = history_round(dir, &opts).await?;
    let ratio = |k: &str| {
        let a = empty[k].as_f64().unwrap_or(0.0);
        let b = full[k].as_f64().unwrap_or(0.0);
        if a > 0.0 {
            ((b / a) * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    Ok(json!({
        "scenario": "history", "store": store_kind(&o.store), "clinics": clinics,
        "events": o.history_events, "fill_seconds": (fill_s * 10.0).round() / 10.0,
        "fill_events_per_s": (o.history_events as f64 / fill_s).round(),
        "empty": empty, "full": full,
        "ratio": {"clinics": ratio("clinics_ms"), "clinic": ratio("clinic_ms"), "metrics": ratio("metrics_ms")},
        "machine": machine(),
    }))
}
