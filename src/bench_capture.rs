//! `tether bench capture`: how long a PostgreSQL clinic's committed change waits before the
//! agent can read it, per writer mix, for the trigger capture and the logical capture.
//!
//! Each mix runs against a fresh database per capture mode on the given server (which needs
//! `wal_level = logical` for the logical half): four connections commit short transactions at
//! 25 per second in all (an insert and an update of one of 20 shared rows), and depending on the
//! mix some roll back (15 %), some roll back a savepoint and commit the rest, and two more
//! connections keep long transactions open back to back (1–20 s each, a quarter rolled back);
//! `other-db` holds a transaction with an id open in *another* database for the whole run. A
//! reader polls as the agent's watcher does (every 20 ms) and notes when each committed insert
//! becomes readable; the delay is that time minus the writer's commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use postgres::{Client, NoTls};
use serde_json::{json, Value};
use tether_actors::ports::ChangeSource;

use crate::config::{Direction, TableConfig};
use crate::db::postgres::{self as pg, PgSource};

pub const MIXES: [&str; 5] = ["short", "rollbacks", "long", "full", "other-db"];

#[derive(Clone, Copy)]
struct Mix {
    rollbacks: bool,
    long: bool,
    other_db: bool,
}

fn mix(name: &str) -> Mix {
    Mix {
        rollbacks: matches!(name, "rollbacks" | "full"),
        long: matches!(name, "long" | "full"),
        other_db: name == "other-db",
    }
}

fn tables() -> Vec<TableConfig> {
    vec![
        TableConfig::new("bench_patients", "patient", &["id"], Direction::Up),
        TableConfig::new("bench_payments", "payment", &["id"], Direction::Up),
    ]
}

/// A small deterministic generator (no shared state, no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn with_db(url: &str, db: &str) -> String {
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|kv| !kv.starts_with("dbname="))
        .collect();
    format!("{} dbname={db}", kept.join(" "))
}

/// Server CPU: every `postgres` process on this machine (the server under test and, idle,
/// any other).
fn postgres_cpu_seconds() -> f64 {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == "postgres")
                .unwrap_or(false)
        })
        .map(crate::bench::cpu_seconds)
        .sum()
}

/// Notes when the transaction that inserted payment `id` committed.
fn note_commit(commits: &Mutex<HashMap<i64, Instant>>, id: i64) {
    commits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, Instant::now());
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[i.min(sorted.len() - 1)] * 1000.0).round() / 1000.0
}

/// One mix in one capture mode.
fn run_one(url: &str, mix_name: &str, mode: &str, secs: u64) -> anyhow::Result<Value> {
    let m = mix(mix_name);
    let db = format!(
        "tether_bench_{}_{}_{}",
        mode,
        mix_name.replace('-', "_"),
        std::process::id()
    );
    let mut admin = Client::connect(url, NoTls).with_context(|| format!("connecting to {url}"))?;
    let other = format!("{db}_other");
    for name in [Some(&db), m.other_db.then_some(&other)]
        .into_iter()
        .flatten()
    {
        // One statement each: DROP/CREATE DATABASE cannot share a transaction.
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        admin.batch_execute(&format!("CREATE DATABASE {name}"))?;
    }
    let dburl = with_db(url, &db);
    let result = (|| -> anyhow::Result<Value> {
        Client::connect(&dburl, NoTls)?.batch_execute(
            "CREATE TABLE bench_patients (id int PRIMARY KEY, visits int NOT NULL DEFAULT 0, note text);
             INSERT INTO bench_patients (id) SELECT g FROM generate_series(1, 20) g;
             CREATE TABLE bench_payments (id bigserial PRIMARY KEY, kind text NOT NULL, amount_cents int NOT NULL);",
        )?;
        let t = tables();
        let src = if mode == "logical" {
            pg::logical::install(&dburl, &t)?;
            PgSource::open_logical(&dburl, &t, 1 << 30)?
        } else {
            pg::install(&dburl, &t)?;
            PgSource::open(&dburl, &t)?
        };
        let commits: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
        let longest_open = Arc::new(Mutex::new(Duration::ZERO));
        let mut threads = Vec::new();
        // The other database's transaction, with an id, open all run long.
        let mut other_txn = if m.other_db {
            let mut c = Client::connect(&with_db(url, &other), NoTls)?;
            c.batch_execute("CREATE TABLE t (id int); BEGIN; INSERT INTO t VALUES (1);")?;
            Some(c)
        } else {
            None
        };
        let cpu0 = (
            crate::bench::cpu_seconds(std::process::id()),
            postgres_cpu_seconds(),
        );
        let started = Instant::now();
        let until = started + Duration::from_secs(secs);
        for w in 0..4u64 {
            let (dburl, commits) = (dburl.clone(), commits.clone());
            threads.push(std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut c = Client::connect(&dburl, NoTls)?;
                let mut rng = Rng(0x9E37_79B9 + w * 7919);
                let mut next = Instant::now() + Duration::from_millis(w * 40);
                let mut n = 0;
                while next < until {
                    // Paced: 6.25 transactions per second per connection.
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    next += Duration::from_millis(160);
                    let roll = m.rollbacks && rng.below(100) < 15;
                    let savepoint = m.rollbacks && !roll && rng.below(100) < 10;
                    let mut tx = c.transaction()?;
                    let id: i64 = tx
                        .query_one(
                            "INSERT INTO bench_payments (kind, amount_cents) VALUES ('short', 100) RETURNING id",
                            &[],
                        )?
                        .get(0);
                    tx.execute(
                        "UPDATE bench_patients SET visits = visits + 1 WHERE id = $1",
                        &[&(1 + rng.below(20) as i32)],
                    )?;
                    if savepoint {
                        tx.batch_execute(
                            "SAVEPOINT s; INSERT INTO bench_payments (kind, amount_cents) VALUES ('undone', 1); ROLLBACK TO s",
                        )?;
                    }
                    if roll {
                        tx.rollback()?;
                    } else {
                        tx.commit()?;
                        note_commit(&commits, id);
                        n += 1;
                    }
                }
                Ok(n)
            }));
        }
        if m.long {
            for w in 0..2u64 {
                let (dburl, commits, longest) =
                    (dburl.clone(), commits.clone(), longest_open.clone());
                threads.push(std::thread::spawn(move || -> anyhow::Result<u64> {
                    let mut c = Client::connect(&dburl, NoTls)?;
                    let mut rng = Rng(0xC2B2_AE35 + w * 104_729);
                    // Staggered, so that long transactions overlap.
                    std::thread::sleep(Duration::from_millis(w * 2_500));
                    let mut n = 0;
                    while Instant::now() < until {
                        let hold = Duration::from_millis(1_000 + rng.below(19_000));
                        let hold = hold.min(until.saturating_duration_since(Instant::now()));
                        let opened = Instant::now();
                        let mut tx = c.transaction()?;
                        let id: i64 = tx
                            .query_one(
                                "INSERT INTO bench_payments (kind, amount_cents) VALUES ('long', 100) RETURNING id",
                                &[],
                            )?
                            .get(0);
                        // The transaction stays open, as a slow application's would.
                        std::thread::sleep(hold);
                        if rng.below(4) == 0 {
                            tx.rollback()?;
                        } else {
                            tx.commit()?;
                            note_commit(&commits, id);
                            n += 1;
                        }
                        let open = opened.elapsed();
                        let mut l = longest.lock().unwrap_or_else(|p| p.into_inner());
                        *l = (*l).max(open);
                    }
                    Ok(n)
                }));
            }
        }
        // The reader, as the watcher: every 20 ms, everything readable.
        let mut arrived: HashMap<i64, Instant> = HashMap::new();
        let mut after = 0u64;
        loop {
            let writers_done = threads.iter().all(|t| t.is_finished());
            let batch = src.read_after(after, 1_000)?;
            let now = Instant::now();
            for e in &batch {
                if e.entity == "payment" {
                    if let Some(id) = e
                        .row
                        .as_ref()
                        .and_then(|r| r.get("id"))
                        .and_then(Value::as_i64)
                    {
                        arrived.insert(id, now);
                    }
                }
            }
            if let Some(l) = batch.last() {
                after = l.seq;
            }
            let committed = commits.lock().unwrap_or_else(|p| p.into_inner()).len();
            if writers_done && arrived.len() >= committed {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(secs + 120),
                "{mode}/{mix_name}: {} of {committed} commits read two minutes after the writers stopped",
                arrived.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut written = 0;
        for t in threads {
            written += t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        if let Some(c) = other_txn.as_mut() {
            c.batch_execute("COMMIT")?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = (
            crate::bench::cpu_seconds(std::process::id()) - cpu0.0,
            postgres_cpu_seconds() - cpu0.1,
        );
        let commits = commits.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut delays: Vec<f64> = commits
            .iter()
            .filter_map(|(id, at)| {
                arrived
                    .get(id)
                    .map(|a| a.saturating_duration_since(*at).as_secs_f64())
            })
            .collect();
        delays.sort_by(f64::total_cmp);
        let changes = delays.len().max(1) as f64;
        let longest = longest_open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_secs_f64();
        Ok(json!({
            "mix": mix_name, "capture": mode, "seconds": secs,
            "transactions_committed": written,
            "transactions_per_s": (written as f64 / elapsed * 10.0).round() / 10.0,
            "delay_s": {"p50": pct(&delays, 0.5), "p99": pct(&delays, 0.99), "max": pct(&delays, 1.0)},
            "longest_transaction_open_s": (longest * 10.0).round() / 10.0,
            "server_cpu_s_per_100k_changes": (cpu.1 / changes * 100_000.0).round(),
            "bench_process_cpu_s_per_100k_changes": (cpu.0 / changes * 100_000.0).round(),
        }))
    })();
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    if m.other_db {
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {other} WITH (FORCE)"));
    }
    result
}

/// Every mix (or `only`), trigger then logical capture for each; `secs` per run.
pub fn run(url: &str, only: Option<&str>, secs: u64, json_out: bool) -> anyhow::Result<Vec<Value>> {
    let mut admin = Client::connect(url, NoTls).with_context(|| format!("connecting to {url}"))?;
    let wal_level: String = admin.query_one("SHOW wal_level", &[])?.get(0);
    drop(admin);
    let mixes: Vec<&str> = match only {
        Some(m) if MIXES.contains(&m) => vec![m],
        Some(m) => anyhow::bail!("unknown mix `{m}` (one of {})", MIXES.join(", ")),
        None => MIXES.to_vec(),
    };
    let mut out = Vec::new();
    for m in mixes {
        for mode in ["triggers", "logical"] {
            let v = if mode == "logical" && wal_level != "logical" {
                json!({"mix": m, "capture": mode, "skipped": format!("the server has wal_level = {wal_level}; logical capture needs wal_level = logical")})
            } else {
                let mut v = run_one(url, m, mode, secs)?;
                v["machine"] = crate::bench::machine();
                v
            };
            if json_out {
                println!("{v}");
            } else {
                println!(
                    "capture: {}",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                );
            }
            out.push(v);
        }
    }
    Ok(out)
}
