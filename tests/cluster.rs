//! Three gateway nodes on one PostgreSQL store behind a real HAProxy (Debian's `haproxy`) on
//! loopback, with real agent processes: a node killed with SIGKILL, a node paused past its
//! heartbeats and woken up (fenced), cloud updates and calls posted to a node that does not
//! hold the clinic. Each test ends with the history check of every clinic against the store.
//!
//! PostgreSQL (127.0.0.1:5432 or TETHER_TEST_PG) and `haproxy` on PATH are required: missing
//! either is a failure, never a skip (`.ci/run` installs and starts both).

mod common;

use common::procs::{free_port, write_config, Proc, BIN};
use common::{applied_counts, poll_blocking as wait_for};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tether::fleet::{clinic_step, cloud_id, create_sample_clinic, Fleet};
use tether::gateway::store::{self, Store, StoreLocation, StoreSettings};
use tether::local_cluster::haproxy_config_balanced;

fn pg_url() -> String {
    std::env::var("TETHER_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

struct Node {
    id: String,
    port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

struct Clinic {
    id: String,
    db: PathBuf,
    agent: Proc,
    writer: Option<std::thread::JoinHandle<u64>>,
}

/// The whole cluster of one test: nodes, load balancer, clinics and their writers.
struct Cluster {
    dir: tempfile::TempDir,
    schema: String,
    nodes: Vec<Node>,
    lb_port: u16,
    _lb: Proc,
    clinics: Vec<Clinic>,
    stop: Arc<AtomicBool>,
    /// Extra lines under each agent's `gateway:` section.
    agent_gateway: String,
    /// Extra lines under each node's `gateway:` section.
    node_extra: String,
    /// The store's PostgreSQL.
    pg: String,
}

/// How a test's cluster differs from the default one.
struct Opts<'a> {
    /// HAProxy's algorithm.
    balance: &'a str,
    /// Extra lines under each agent's `gateway:` section (e.g. `    transport: http\n`).
    agent_gateway: &'a str,
    /// Extra lines under each node's `gateway:` section.
    node_extra: &'a str,
    /// The store's PostgreSQL connection string.
    pg: String,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            balance: "leastconn",
            agent_gateway: "",
            node_extra: "",
            pg: pg_url(),
        }
    }
}

impl Cluster {
    fn start(nodes: usize, clinics: usize) -> Cluster {
        Cluster::start_with(nodes, clinics, Opts::default())
    }

    fn start_with(nodes: usize, clinics: usize, o: Opts<'_>) -> Cluster {
        let Opts {
            balance,
            agent_gateway,
            node_extra,
            pg,
        } = o;
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = format!("cluster_{}_{:x}", std::process::id(), rand::random::<u32>());
        let mut c = Cluster {
            schema,
            nodes: (1..=nodes)
                .map(|i| Node {
                    id: format!("gw-{i}"),
                    port: free_port(),
                    dir: dir.path().join(format!("gw-{i}")),
                    proc: None,
                })
                .collect(),
            lb_port: free_port(),
            _lb: Proc(Command::new("true").spawn().expect("placeholder")),
            clinics: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            agent_gateway: agent_gateway.to_string(),
            node_extra: node_extra.to_string(),
            pg,
            dir,
        };
        for i in 0..nodes {
            c.start_node(i);
        }
        let cfg = c.dir.path().join("haproxy.cfg");
        let servers: Vec<(String, String)> = c
            .nodes
            .iter()
            .map(|n| (n.id.clone(), format!("127.0.0.1:{}", n.port)))
            .collect();
        let listen = format!("127.0.0.1:{}", c.lb_port);
        std::fs::write(
            &cfg,
            haproxy_config_balanced(&listen, &servers, None, balance),
        )
        .expect("haproxy.cfg");
        let log = std::fs::File::create(c.dir.path().join("haproxy.log")).expect("log");
        let lb = Command::new(tether::local_cluster::haproxy_bin())
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("haproxy could not start ({e}): install Debian's `haproxy` (.ci/run does)")
            });
        c._lb = Proc(lb);
        let lb_port = c.lb_port;
        wait_for("HAProxy to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", lb_port)).is_ok()
        });
        for k in 0..clinics {
            c.add_clinic(&format!("clinic-{k}"));
        }
        c
    }

    fn start_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        std::fs::create_dir_all(&n.dir).expect("node dir");
        let cfg = write_config(
            &n.dir,
            "gateway",
            &format!(
                "gateway:\n  listen: 127.0.0.1:{}\n  node_id: {}\n  insecure_plaintext: true\n  heartbeat_interval: 500ms\n  store:\n    kind: postgres\n    url: \"{}\"\n    schema: {}\n{}",
                n.port,
                n.id,
                self.pg,
                self.schema,
                self.node_extra
            ),
        );
        let mut child = Command::new(BIN)
            .args(["gateway", "--config"])
            .arg(&cfg)
            .current_dir(&n.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read gateway stdout");
        assert!(
            line.starts_with("gateway listening on "),
            "node {} did not start: {line:?} (is PostgreSQL running?)",
            n.id
        );
        n.proc = Some(Proc(child));
    }

    fn add_clinic(&mut self, id: &str) {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir).expect("clinic dir");
        let db = dir.join("clinic.db");
        create_sample_clinic(&db).expect("clinic");
        let cfg = write_config(
            &dir,
            "agent",
            &format!(
                "agent:\n  clinic_id: {id}\n  database:\n    path: {}\n  gateway:\n    url: ws://127.0.0.1:{}/v1/ws\n    insecure_plaintext: true\n    heartbeat_interval: 500ms\n    backoff:\n      initial: 50ms\n      max: 1s\n{}  outbox:\n    poll_interval: 20ms\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n    - {{table: appointments, entity: appointment, key: [id]}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n  shutdown:\n    drain_timeout: 5s\n  admin:\n    listen: off\n  rpc:\n    timeout: 2s\n    queries:\n      patient_named:\n        sql: SELECT id, name FROM patients WHERE id = :id\n        params: [id]\n",
                db.display(),
                self.lb_port,
                self.agent_gateway
            ),
        );
        let agent = Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&cfg)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agent");
        let (path, stop) = (db.clone(), self.stop.clone());
        let writer = std::thread::spawn(move || {
            let mut conn = tether::db::sqlite::open(&path).expect("open");
            let mut rng = rand::rng();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += clinic_step(&mut conn, &mut rng).expect("write");
                // Pacing the load (~100 changes/s per clinic), not synchronisation.
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        });
        self.clinics.push(Clinic {
            id: id.to_string(),
            db,
            agent: Proc(agent),
            writer: Some(writer),
        });
    }

    /// clinic → (acknowledged position, node holding it) from the store's own table.
    fn owners(&self) -> BTreeMap<String, (u64, Option<String>)> {
        let Ok(mut c) = postgres::Client::connect(&self.pg, postgres::NoTls) else {
            return BTreeMap::new();
        };
        let sql = format!(
            "SELECT clinic_id, acked_seq, owner_node FROM {}.clinics",
            self.schema
        );
        c.query(&sql, &[])
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        (
                            r.get::<_, String>(0),
                            (r.get::<_, i64>(1) as u64, r.get::<_, Option<String>>(2)),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn wait_every_clinic(
        &self,
        what: &str,
        limit: Duration,
        ok: impl Fn(u64, Option<&str>) -> bool,
    ) {
        let ids: Vec<String> = self.clinics.iter().map(|c| c.id.clone()).collect();
        wait_for(what, limit, || {
            let o = self.owners();
            ids.iter().all(|id| {
                o.get(id)
                    .is_some_and(|(acked, node)| ok(*acked, node.as_deref()))
            })
        });
    }

    /// The node holding the most clinics, and those clinics with their acknowledged position.
    fn busiest(&self) -> (String, BTreeMap<String, u64>) {
        tether::local_cluster::busiest(&self.owners()).expect("a node holds clinics")
    }

    /// Waits until every clinic of `moved` is held by a node other than `from` and has been
    /// acknowledged more than `beyond` events past its position in `moved`.
    /// A timeout names the clinics still missing, with where they stood (position and node).
    fn wait_moved(&self, what: &str, from: &str, moved: &BTreeMap<String, u64>, beyond: u64) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let o = self.owners();
            let missing: Vec<String> = moved
                .iter()
                .filter(|(id, at)| {
                    !o.get(*id).is_some_and(|(acked, node)| {
                        node.as_deref().is_some_and(|n| n != from) && *acked > *at + beyond
                    })
                })
                .map(|(id, at)| format!("{id} (was {at} on {from}, now {:?})", o.get(id)))
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 90 s waiting for {what}: {}",
                missing.join(", ")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn node_index(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn signal(&self, node: usize, sig: &str) {
        let pid = self.nodes[node].proc.as_ref().expect("running").0.id();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{sig} {pid}");
    }

    fn log(&self, node: usize, category: &str) -> String {
        common::log_text(&self.nodes[node].dir.join("logs-gateway"), category)
    }

    /// Stops the writers and waits until the store holds everything each clinic committed.
    fn drain(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in &mut self.clinics {
            if let Some(w) = c.writer.take() {
                w.join().expect("writer");
            }
        }
        let heads: BTreeMap<String, u64> = self
            .clinics
            .iter()
            .map(|c| (c.id.clone(), Fleet::outbox_head(&c.db).expect("head")))
            .collect();
        wait_for("every backlog to drain", Duration::from_secs(60), || {
            let o = self.owners();
            heads
                .iter()
                .all(|(id, head)| o.get(id).is_some_and(|(a, _)| a >= head))
        });
    }

    /// The history check of every clinic: nothing lost, nothing twice, nothing out of order.
    fn check_histories(&self, echo: &BTreeMap<String, Vec<(String, Value)>>) {
        let mut s = StoreSettings::sqlite("unused");
        s.location = StoreLocation::Postgres {
            url: self.pg.clone(),
            schema: self.schema.clone(),
        };
        s.node = "checker".into();
        let st: Arc<Store> = store::open(&s).expect("open the store");
        for c in &self.clinics {
            let keys = echo.get(&c.id).cloned().unwrap_or_default();
            let r = tether::history::check_clinic(&c.db, &c.id, st.as_ref(), &keys)
                .expect("history check");
            assert!(r.clean(), "history of {} is not clean: {r:?}", c.id);
            assert_eq!(r.written, r.at_gateway, "{}: {r:?}", c.id);
            assert!(
                r.written > 50,
                "{}: too little traffic to judge: {r:?}",
                c.id
            );
        }
        st.close();
    }
}

/// The last `n` lines of a text (for a failed test's report).
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a log category in a logs directory.
fn tail(logs: &std::path::Path, category: &str, n: usize) -> String {
    last_lines(&common::log_text(logs, category), n)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What each process said last, to explain the failure.
            eprintln!("owners: {:?}", self.owners());
            for n in &self.nodes {
                let logs = n.dir.join("logs-gateway");
                eprintln!("--- node {} ---\n{}", n.id, tail(&logs, "connection", 15));
                eprintln!("--- node {} errors ---\n{}", n.id, tail(&logs, "error", 6));
            }
            for c in &self.clinics {
                let logs = self.dir.path().join(&c.id).join("logs-agent");
                eprintln!("--- agent {} ---\n{}", c.id, tail(&logs, "connection", 10));
            }
            eprintln!(
                "--- haproxy ---\n{}",
                last_lines(
                    &std::fs::read_to_string(self.dir.path().join("haproxy.log"))
                        .unwrap_or_default(),
                    20
                )
            );
        }
        self.stop.store(true, Ordering::Relaxed);
        for c in &mut self.clinics {
            c.agent.kill();
        }
        for n in &mut self.nodes {
            if let Some(p) = &mut n.proc {
                // A paused node must be woken to die.
                let _ = Command::new("kill")
                    .args(["-CONT", &p.0.id().to_string()])
                    .status();
                p.kill();
            }
        }
        if let Ok(mut c) = postgres::Client::connect(&self.pg, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

/// One HTTP/1.1 request to a node: (status, JSON body).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to node");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .expect("send");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    let code = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (code, body)
}

/// Clinics on the HTTP fallback behind round-robin balancing: every new connection goes to the
/// next node, so a channel's polls and sends reach nodes that do not hold it; those nodes pass
/// them on to the channel's node. Each clinic keeps the one channel it opened (no reopening on
/// a 404), the nodes did forward, and nothing is lost or stored twice.
#[test]
fn http_fallback_channels_work_behind_round_robin_balancing() {
    let mut c = Cluster::start_with(
        3,
        3,
        Opts {
            balance: "roundrobin",
            agent_gateway: "    transport: http\n",
            ..Opts::default()
        },
    );
    c.wait_every_clinic(
        "every clinic connected and acknowledged",
        Duration::from_secs(60),
        |acked, node| acked > 300 && node.is_some(),
    );
    // A request reaches another node once a clinic's client opens a second connection (a send
    // while its poll waits): wait for that while the clinics keep writing, or the test proves
    // nothing.
    let forwarded = || -> u64 {
        c.nodes
            .iter()
            .map(|n| metric(n.port, "tether_gateway_http_forwarded_total"))
            .sum()
    };
    wait_for(
        "a request passed on between nodes",
        Duration::from_secs(60),
        || forwarded() > 0,
    );
    let forwarded = forwarded();
    c.drain();
    c.check_histories(&BTreeMap::new());
    for clinic in &c.clinics {
        let log = common::log_text(
            &c.dir.path().join(&clinic.id).join("logs-agent"),
            "connection",
        );
        let links = count(&log, "event=connected transport=http", &clinic.id);
        assert_eq!(links, 1, "{}: its channel was reopened:\n{log}", clinic.id);
    }
    eprintln!("requests passed on between nodes: {forwarded}");
}

/// A counter of a node's `/metrics`.
fn metric(port: u16, name: &str) -> u64 {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to node");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// kill -9 of the node holding the most clinics: they reconnect through HAProxy to the others
/// and resend from the acknowledged position (0 lost, 0 twice); cloud updates and calls posted
/// to a node that does not hold the clinic reach it, before and after the failover; the killed node
/// comes back and the fleet view knows every node.
#[test]
fn a_node_killed_with_sigkill_loses_no_clinic_and_updates_reach_clinics_through_any_node() {
    let mut c = Cluster::start(3, 6);
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
    c.wait_every_clinic(
        "every clinic connected and acknowledged",
        Duration::from_secs(60),
        |acked, node| acked > 30 && node.is_some(),
    );

    let mut echo: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    let mut posted = 0u64;
    let mut post_elsewhere = |c: &Cluster, echo: &mut BTreeMap<String, Vec<(String, Value)>>| {
        let owners = c.owners();
        let mut sent = Vec::new();
        for clinic in &c.clinics {
            let holder = owners.get(&clinic.id).and_then(|(_, n)| n.clone());
            // A live node that does not hold the clinic.
            let other = c
                .nodes
                .iter()
                .find(|n| n.proc.is_some() && Some(&n.id) != holder.as_ref())
                .expect("another node");
            posted += 1;
            let id = cloud_id(1000 + posted);
            let body = json!({"entity": "patient", "op": "upsert", "key": {"id": id}, "row": {"id": id, "name": "Routed"}});
            let at = Instant::now();
            let (code, v) = http(
                other.port,
                "POST",
                &format!("/v1/clinics/{}/updates", clinic.id),
                Some(&body),
            );
            assert_eq!(code, 202, "{v}");
            let update_id = v["update_id"].as_str().expect("update_id").to_string();
            echo.entry(clinic.id.clone())
                .or_default()
                .push(("patient".into(), json!({"id": id})));
            wait_for(
                "an update posted to another node to be applied",
                Duration::from_secs(30),
                || applied_counts(&clinic.db, id, &update_id) == (1, 1),
            );
            sent.push(at.elapsed());
            // A call posted to that node runs in the clinic's database through the node that
            // holds its session, and sees the row the update wrote.
            let call = json!({"name": "patient_named", "params": {"id": id}, "timeout_ms": 5000});
            let (code, v) = http(
                other.port,
                "POST",
                &format!("/v1/clinics/{}/rpc", clinic.id),
                Some(&call),
            );
            assert_eq!(
                code, 200,
                "a call through {} for {}: {v}",
                other.id, clinic.id
            );
            assert_eq!(v["rows"], json!([{"id": id, "name": "Routed"}]), "{v}");
        }
        sent
    };
    let before = post_elsewhere(&c, &mut echo);
    eprintln!("routed updates before the kill: {before:?}");

    // The node holding the most clinics dies without a word.
    let (victim, orphans) = c.busiest();
    let vi = c.node_index(&victim);
    let t0 = Instant::now();
    c.nodes[vi].proc.take().expect("running").kill();
    c.wait_moved(
        "every orphaned clinic back on another node and moving",
        &victim,
        &orphans,
        0,
    );
    eprintln!(
        "failover: {} clinics of {victim} back on the other nodes {:.1} s after kill -9",
        orphans.len(),
        t0.elapsed().as_secs_f64()
    );
    let after = post_elsewhere(&c, &mut echo);
    eprintln!("routed updates after the kill: {after:?}");
    // Every call of the rounds went through another node: each live node forwarded some.
    let forwarded: u64 = c
        .nodes
        .iter()
        .filter(|n| n.proc.is_some())
        .map(|n| metric(n.port, "tether_gateway_rpc_forwarded_total"))
        .sum();
    assert!(
        forwarded >= c.clinics.len() as u64,
        "calls forwarded: {forwarded}"
    );

    // The node comes back under the same id; the fleet view lists every node.
    c.start_node(vi);
    let live = c.nodes.iter().find(|n| n.id != victim).expect("node").port;
    wait_for(
        "the restarted node to beat",
        Duration::from_secs(20),
        || {
            let (_, v) = http(live, "GET", "/v1/nodes", None);
            v["nodes"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|n| n["alive"] == json!(true)).count() == 3)
        },
    );
    let (code, v) = http(live, "GET", "/v1/clinics", None);
    assert_eq!(code, 200);
    for clinic in v["clinics"].as_array().expect("clinics") {
        let node = clinic["node"].as_str().unwrap_or("");
        assert!(
            nodes.iter().any(|n| n == node),
            "held by a known node: {clinic}"
        );
        assert_eq!(clinic["state"], "connected", "{clinic}");
    }
    // The dashboard's stream, from any node, shows every clinic connected and where.
    let snapshot = first_sse_data(live, "/v1/stream/fleet?interval_ms=250");
    let tiles = snapshot["tiles"].as_array().expect("tiles");
    assert_eq!(tiles.len(), c.clinics.len(), "{snapshot}");
    for t in tiles {
        assert_eq!(t["state"], "connected", "{t}");
        assert!(
            nodes.iter().any(|n| Some(n.as_str()) == t["node"].as_str()),
            "tile names a known node: {t}"
        );
    }
    c.drain();
    c.check_histories(&echo);
}

/// The `data:` of the first event of a node's SSE stream.
fn first_sse_data(port: u16, path: &str) -> Value {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to node");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send");
    let mut reader = BufReader::new(c);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read the stream");
        assert!(n > 0, "the stream ended before an event");
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            return serde_json::from_str(data).expect("event data is JSON");
        }
    }
}

/// The numeric `name=` field of a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let tag = format!(" {name}=");
    let at = line.find(&tag)? + tag.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The numeric `name=` field of the last `event` line of `clinic` in a log.
fn last_field(log: &str, event: &str, clinic: &str, name: &str) -> Option<u64> {
    let tag = format!("clinic={clinic} ");
    log.lines()
        .filter(|l| l.contains(event) && l.contains(&tag))
        .filter_map(|l| field(l, name))
        .next_back()
}

/// `clinic=<id> ` lines of `event` in a log.
fn count(log: &str, event: &str, clinic: &str) -> usize {
    let tag = format!("clinic={clinic} ");
    log.lines()
        .filter(|l| l.contains(event) && l.contains(&tag))
        .count()
}

/// A node paused (SIGSTOP) past three heartbeats: its clinics move to the other nodes; woken
/// up (SIGCONT), its old sessions end without storing anything more for them (whatever it had
/// received before the pause is fenced), and the clinics stay where they moved. Nothing is
/// lost or stored twice.
#[test]
fn a_paused_node_woken_up_stores_nothing_for_clinics_that_moved() {
    let mut c = Cluster::start(3, 6);
    c.wait_every_clinic(
        "every clinic connected and acknowledged",
        Duration::from_secs(60),
        |acked, node| acked > 30 && node.is_some(),
    );
    let (victim, moved) = c.busiest();
    let vi = c.node_index(&victim);
    c.signal(vi, "STOP");
    let t0 = Instant::now();
    c.wait_moved(
        "the paused node's clinics to move and make progress",
        &victim,
        &moved,
        50,
    );
    eprintln!(
        "{} clinics left the paused node {victim} in {:.1} s",
        moved.len(),
        t0.elapsed().as_secs_f64()
    );
    // What the paused node had done for each clinic: its sessions are still open in it.
    let (msgs, conns_paused) = (c.log(vi, "message"), c.log(vi, "connection"));
    let stored_before: BTreeMap<&String, usize> = moved
        .keys()
        .map(|id| (id, count(&msgs, "event=batch_stored", id)))
        .collect();
    let closed_before: BTreeMap<&String, usize> = moved
        .keys()
        .map(|id| (id, count(&conns_paused, "event=session_closed", id)))
        .collect();
    c.signal(vi, "CONT");
    wait_for(
        "the woken node to end its old sessions",
        Duration::from_secs(30),
        || {
            let conns = c.log(vi, "connection");
            closed_before
                .iter()
                .all(|(id, n)| count(&conns, "event=session_closed", id) > *n)
        },
    );
    // A batch whose commit came before the pause may be logged only after the wake-up (the
    // signal can land between the commit and the log line): such a batch was committed before
    // the clinic's new claim, so the position it acknowledged is at most the one the new
    // session's `hello` read. A batch stored after the move would acknowledge beyond it.
    let (msgs, conns) = (c.log(vi, "message"), c.log(vi, "connection"));
    for (id, n) in &stored_before {
        let old_epoch = last_field(&conns_paused, "event=session_open", id, "epoch")
            .unwrap_or_else(|| panic!("{victim} opened a session for {id}"));
        let claimed_at = (0..c.nodes.len())
            .filter(|&i| i != vi)
            .flat_map(|i| {
                let log = c.log(i, "connection");
                log.lines()
                    .filter(|l| {
                        l.contains("event=session_open")
                            && l.contains(&format!("clinic={id} "))
                            && field(l, "epoch") == Some(old_epoch + 1)
                    })
                    .filter_map(|l| field(l, "gateway_acked_seq"))
                    .collect::<Vec<_>>()
            })
            .next()
            .unwrap_or_else(|| panic!("the claim after epoch {old_epoch} of {id}"));
        let late: Vec<&str> = msgs
            .lines()
            .filter(|l| l.contains("event=batch_stored") && l.contains(&format!("clinic={id} ")))
            .skip(*n)
            .collect();
        for line in &late {
            assert!(
                field(line, "acked_seq").is_some_and(|a| a <= claimed_at),
                "the woken node stored a batch for {id} after it moved (claimed at {claimed_at}): {line}"
            );
        }
        if !late.is_empty() {
            eprintln!(
                "{id}: {} batch(es) committed before the pause, logged after the wake-up",
                late.len()
            );
        }
    }
    let fenced = conns.matches("event=fenced").count();
    eprintln!("the woken node refused {fenced} stale batches (fenced)");
    for line in conns.lines().filter(|l| l.contains("event=fenced")) {
        assert!(line.contains("action=closed_nothing_stored"), "{line}");
    }
    // The clinics stay where they moved.
    let o = c.owners();
    for id in moved.keys() {
        assert_ne!(o[id].1.as_deref(), Some(victim.as_str()), "{id} went back");
    }
    c.drain();
    c.check_histories(&BTreeMap::new());
}

/// The fence itself, frame by frame: a session on node A whose clinic has since been claimed
/// on node B (a session A's registry knows nothing of) sends a batch: A stores nothing of it
/// and closes the session 4001; B's session goes on from the acknowledged position.
#[actix_rt::test]
async fn a_batch_on_a_node_whose_claim_moved_is_fenced_and_stores_nothing() {
    use common::ws::{close_code, connect, event, hello, next_json, send};
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = format!("fence_{}_{:x}", std::process::id(), rand::random::<u32>());
    let node = |id: &str| {
        let mut s = common::gateway_settings(dir.path(), Duration::from_secs(30));
        s.node_id = Some(id.into());
        s.store = StoreLocation::Postgres {
            url: pg_url(),
            schema: schema.clone(),
        };
        tether::gateway::start(s, tether::gateway::GatewaySecurity::insecure())
            .unwrap_or_else(|e| panic!("node {id}: {e} (is PostgreSQL running?)"))
    };
    let (a, b) = (node("node-a"), node("node-b"));
    let mut on_a = connect(&a.ws_url()).await;
    send(&mut on_a, hello("clinic-f")).await;
    next_json(&mut on_a).await.expect("welcome from a");
    send(
        &mut on_a,
        json!({"v": 1, "type": "events", "prev_seq": 0, "events": [event(1), event(2)]}),
    )
    .await;
    let ack = next_json(&mut on_a).await.expect("ack");
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(2))
    );

    // The clinic reconnects through the balancer to node b while a's socket is still open.
    let mut on_b = connect(&b.ws_url()).await;
    send(&mut on_b, hello("clinic-f")).await;
    let welcome = next_json(&mut on_b).await.expect("welcome from b");
    assert_eq!(welcome["acked_seq"], 2);

    // Node a, whose claim has moved on, is handed a late batch.
    send(
        &mut on_a,
        json!({"v": 1, "type": "events", "prev_seq": 2, "events": [event(3), event(4)]}),
    )
    .await;
    assert_eq!(close_code(&mut on_a).await, Some(4001));
    let held =
        tether::gateway::store::wait(b.store.clinic_events("clinic-f", 0, 100)).expect("events");
    assert_eq!(held.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    let rec = b
        .store
        .clinic("clinic-f")
        .await
        .expect("clinic")
        .expect("record");
    assert_eq!((rec.acked_seq, rec.node.as_deref()), (2, Some("node-b")));

    // Node b's session goes on from there.
    send(
        &mut on_b,
        json!({"v": 1, "type": "events", "prev_seq": 2, "events": [event(3)]}),
    )
    .await;
    let ack = next_json(&mut on_b).await.expect("ack from b");
    assert_eq!(ack["seq"], 3);
    let mut resp = common::client()
        .get(format!("{}/metrics", a.http_url()))
        .send()
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&resp.body().await.expect("body")).to_string();
    assert!(
        text.lines()
            .any(|l| l == "tether_gateway_sessions_fenced_total 1"),
        "the fence is counted:\n{text}"
    );
    a.stop().await;
    b.stop().await;
    // The driver blocks on its own runtime: not on this one's thread.
    let _ = std::thread::spawn(move || {
        if let Ok(mut c) = postgres::Client::connect(&pg_url(), postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    })
    .join();
}

/// A rolling restart: each node in turn is stopped with SIGTERM (its sessions finish their
/// writes, acknowledge them and close with 1001), its clinics come back at once on the others
/// (agents told to go reconnect after a short jitter, not their backoff), and it is started
/// again before the next one goes. Nothing is lost or stored twice.
#[test]
fn a_rolling_restart_moves_every_clinic_without_loss() {
    let mut c = Cluster::start(3, 6);
    c.wait_every_clinic(
        "every clinic connected and acknowledged",
        Duration::from_secs(60),
        |acked, node| acked > 30 && node.is_some(),
    );
    for i in 0..c.nodes.len() {
        let id = c.nodes[i].id.clone();
        let moving: BTreeMap<String, u64> = c
            .owners()
            .into_iter()
            .filter(|(_, (_, n))| n.as_deref() == Some(id.as_str()))
            .map(|(k, (a, _))| (k, a))
            .collect();
        let t0 = Instant::now();
        let mut p = c.nodes[i].proc.take().expect("running");
        let status = common::procs::terminate(&mut p, Duration::from_secs(20));
        assert!(
            status.success(),
            "node {id} exits 0 after SIGTERM: {status}"
        );
        c.wait_moved(
            "the drained node's clinics back on the others",
            &id,
            &moving,
            0,
        );
        eprintln!(
            "{id} drained: {} clinics back on the others {:.2} s after SIGTERM",
            moving.len(),
            t0.elapsed().as_secs_f64()
        );
        c.start_node(i);
        let port = c.nodes[i].port;
        wait_for(
            "the restarted node to be ready",
            Duration::from_secs(20),
            || http(port, "GET", "/readyz", None).0 == 200,
        );
    }
    // Agents told to go (1001) came back after a short jitter, not a full backoff.
    let jitter = tether_actors::backoff::GOING_AWAY_JITTER.as_millis() as u64;
    let mut told = 0;
    for clinic in &c.clinics {
        let log = common::log_text(
            &c.dir.path().join(&clinic.id).join("logs-agent"),
            "connection",
        );
        let lines: Vec<&str> = log.lines().collect();
        for (k, line) in lines.iter().enumerate() {
            if !(line.contains("event=closed") && line.contains("code=1001")) {
                continue;
            }
            told += 1;
            let delay = lines[k..]
                .iter()
                .find_map(|l| l.split("event=reconnect_scheduled delay_ms=").nth(1))
                .and_then(|rest| rest.split(' ').next())
                .and_then(|ms| ms.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{}: no reconnect after {line}", clinic.id));
            assert!(
                delay <= jitter,
                "{}: waited {delay} ms after 1001",
                clinic.id
            );
        }
    }
    assert!(
        told >= c.clinics.len(),
        "every clinic was told to go at least once: {told}"
    );
    c.drain();
    c.check_histories(&BTreeMap::new());
}

/// `tether demo --gateways 3`: three nodes on one PostgreSQL store behind HAProxy, child nodes
/// killed with SIGKILL and restarted during the run; the summary's history check finds nothing
/// lost or duplicated, and counts the kills and the failovers they caused.
#[test]
fn the_demo_with_three_gateways_kills_nodes_and_loses_nothing() {
    let schema_url = pg_url();
    let out = Command::new(BIN)
        .args([
            "demo",
            "--gateways",
            "3",
            "--clinics",
            "4",
            "--duration",
            "9s",
            "--rate",
            "120",
            "--json",
            "--store",
            &schema_url,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    let s: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}):\n{stdout}\n{stderr}"));
    assert!(out.status.success(), "demo failed: {s}\n{stderr}");
    assert_eq!(s["gateways"], 3, "{s}");
    assert_eq!(
        (s["missing"].as_u64(), s["duplicates"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert_eq!(s["drained"], true, "{s}");
    assert!(s["node_kills"].as_u64() >= Some(2), "nodes killed: {s}");
    assert!(
        s["failovers"].as_u64() >= s["node_kills"].as_u64(),
        "every kill moved at least one clinic: {s}"
    );
    assert_eq!(s["failovers_incomplete"], 0, "{s}");
    // HAProxy checks the nodes over TLS and resumes its sessions: every check's handshake works
    // (a gateway refusing resumed sessions had its live nodes flapping down and up).
    assert_eq!(s["lb_tls_check_failures"], 0, "{s}");
    assert!(s["events_at_gateway"].as_u64() > Some(300), "{s}");
    assert!(
        stderr.contains("kill -9 gw-"),
        "the run says what it killed:\n{stderr}"
    );
}

/// A fallback channel opened on node A, used through node B under mutual TLS: B passes the
/// requests on, signed with the nodes' shared key and carrying the client certificate's
/// identity, and A checks that identity as if the clinic had come to it: the clinic's own
/// certificate is served, another clinic's is refused (403), and a request that claims to come
/// from a node without the cluster's signature is refused.
#[actix_rt::test]
async fn a_fallback_channel_reached_through_another_node_checks_the_clinics_certificate() {
    use tether::security::tls::{connector, ClientTls};
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = format!("fwd_{}_{:x}", std::process::id(), rand::random::<u32>());
    let fleet = Fleet::build_on(
        dir.path(),
        2,
        Duration::from_millis(500),
        Some(2048),
        Some(StoreLocation::Postgres {
            url: pg_url(),
            schema: schema.clone(),
        }),
        Some("gw-a"),
    )
    .expect("fleet (is PostgreSQL running?)");
    let b = fleet.start_peer("gw-b").expect("node b");
    let certs = fleet.certs.clone().expect("certs");
    let (a_url, b_url) = (fleet.http_url(), b.http_url());
    let client_of = |clinic: &str| {
        let tls = connector(&ClientTls {
            ca: Some(certs.join("ca.pem")),
            cert: Some(certs.join(format!("{clinic}.pem"))),
            key: Some(certs.join(format!("{clinic}.key"))),
            ..Default::default()
        })
        .expect("client tls");
        awc::Client::builder()
            .timeout(Duration::from_secs(10))
            .connector(awc::Connector::new().openssl(tls))
            .finish()
    };
    let (own, other) = (client_of("clinic-001"), client_of("clinic-002"));
    let token = tether::security::jwt::TokenSigner::from_pem_file(
        &certs.join("clinic-001.key"),
        "clinic-001",
        tether::fleet::GATEWAY_ID,
        "clinic-001-1",
        Duration::from_secs(300),
    )
    .expect("signer")
    .sign()
    .expect("token");
    let mut resp = own
        .post(format!("{a_url}/v1/http/open"))
        .insert_header(("Authorization", format!("Bearer {token}")))
        .send()
        .await
        .expect("open on a");
    assert_eq!(resp.status().as_u16(), 201);
    let opened: tether_schemas::http::Opened = resp.json().await.expect("opened");
    let ch = opened.channel;
    // Through node b, once b sees a in the node table.
    let hello = json!({"v": 1, "type": "hello", "clinic_id": "clinic-001", "agent_version": "test", "last_acked_seq": 0, "source_id": 7});
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = own
            .post(format!("{b_url}/v1/http/{ch}/send?seq=1"))
            .send_body(hello.to_string())
            .await
            .expect("send through b");
        if r.status().as_u16() == 204 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "send through b: {} (b never passed it on)",
            r.status()
        );
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    let mut r = own
        .get(format!("{b_url}/v1/http/{ch}/poll?after=0&wait_ms=2000"))
        .send()
        .await
        .expect("poll through b");
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().limit(1 << 20).await.expect("polled");
    assert_eq!(v["messages"][0]["type"], "welcome", "{v}");
    // Another clinic's certificate, through b: a refuses it.
    let r = other
        .get(format!("{b_url}/v1/http/{ch}/poll?after=0&wait_ms=100"))
        .send()
        .await
        .expect("poll with another certificate");
    assert_eq!(r.status().as_u16(), 403, "another clinic's certificate");
    // A request that claims to be passed on by node b, without the cluster's key.
    let r = other
        .get(format!("{a_url}/v1/http/{ch}/poll?after=0&wait_ms=100"))
        .insert_header(("tether-forwarded-by", "gw-b"))
        .insert_header(("tether-forwarded-peer", "clinic-001"))
        .insert_header((
            "tether-forwarded-at",
            tether::security::unix_now_ms().to_string(),
        ))
        .insert_header(("tether-forwarded-signature", "0".repeat(64)))
        .send()
        .await
        .expect("forged");
    assert_eq!(r.status().as_u16(), 403, "a forged forwarded request");
    let mut m = own
        .get(format!("{b_url}/metrics"))
        .insert_header((
            "Authorization",
            format!("Bearer {}", fleet.admin_token.clone().expect("admin")),
        ))
        .send()
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&m.body().await.expect("body")).to_string();
    let passed: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("tether_gateway_http_forwarded_total ")?
                .parse()
                .ok()
        })
        .expect("counter");
    assert!(passed >= 3, "requests passed on by b: {passed}");
    b.stop().await;
    fleet.stop().await;
    let _ = std::thread::spawn(move || {
        if let Ok(mut c) = postgres::Client::connect(&pg_url(), postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    })
    .join();
}

/// A webhook receiver on 127.0.0.1:0 (plain HTTP/1.1, keep-alive): records the `tether-event-id`
/// of every request whose signature checks out, and answers 204.
struct HookReceiver {
    url: String,
    got: Arc<std::sync::Mutex<Vec<u64>>>,
    bad: Arc<std::sync::atomic::AtomicU64>,
}

impl HookReceiver {
    fn start(secret: &'static [u8]) -> HookReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let bad = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (g, b) = (got.clone(), bad.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let (g, b) = (g.clone(), b.clone());
                std::thread::spawn(move || serve_hooks(conn, secret, &g, &b));
            }
        });
        HookReceiver { url, got, bad }
    }

    fn ids(&self) -> Vec<u64> {
        self.got.lock().expect("lock").clone()
    }
}

fn serve_hooks(
    conn: std::net::TcpStream,
    secret: &[u8],
    got: &std::sync::Mutex<Vec<u64>>,
    bad: &std::sync::atomic::AtomicU64,
) {
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    loop {
        let mut headers = BTreeMap::new();
        let mut line = String::new();
        // Request line, then headers up to the empty line.
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let ts: u64 = headers
            .get("tether-timestamp")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let want = format!("v1={}", tether::gateway::webhooks::sign(secret, ts, &body));
        if headers.get("tether-signature") == Some(&want) {
            if let Some(id) = headers.get("tether-event-id").and_then(|v| v.parse().ok()) {
                got.lock().expect("lock").push(id);
            }
        } else {
            bad.fetch_add(1, Ordering::Relaxed);
        }
        if w.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

/// Webhooks with the dispatcher's node killed: exactly one node dispatches the endpoint; killed
/// with SIGKILL, another takes over from the stored cursor. Every stored event reaches the
/// receiver (no gap); an event delivered twice around the takeover is counted and allowed
/// (at-least-once, `Tether-Event-Id` to deduplicate).
#[test]
fn webhooks_survive_the_dispatching_node_killed_without_a_gap() {
    const SECRET: &[u8] = b"cluster-webhook-secret-made-by-this-test";
    let hooks = HookReceiver::start(SECRET);
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret_file = secret_dir.path().join("webhook.secret");
    std::fs::write(&secret_file, SECRET).expect("secret");
    let extra = format!(
        "  webhooks:\n    - name: main-api\n      url: {}\n      secret_file: {}\n      backoff_initial: 50ms\n      backoff_max: 500ms\n",
        hooks.url,
        secret_file.display()
    );
    let mut c = Cluster::start_with(
        3,
        3,
        Opts {
            node_extra: &extra,
            ..Opts::default()
        },
    );
    c.wait_every_clinic(
        "every clinic connected and acknowledged",
        Duration::from_secs(60),
        |acked, node| acked > 30 && node.is_some(),
    );
    wait_for("deliveries", Duration::from_secs(30), || {
        hooks.ids().len() > 50
    });
    let active = |c: &Cluster| -> Vec<usize> {
        (0..c.nodes.len())
            .filter(|i| {
                c.nodes[*i].proc.is_some()
                    && c.log(*i, "connection")
                        .contains("webhook=main-api event=dispatcher_active")
            })
            .collect()
    };
    let leaders = active(&c);
    assert_eq!(leaders.len(), 1, "exactly one node dispatches: {leaders:?}");
    let victim = leaders[0];
    let before = hooks.ids().len();
    c.nodes[victim].proc.take().expect("running").kill();
    wait_for(
        "another node to take the endpoint over and deliver more",
        Duration::from_secs(30),
        || active(&c).len() == 1 && hooks.ids().len() > before + 50,
    );
    c.drain();
    // Every stored event delivered at least once.
    let stored: Vec<u64> = {
        let mut pg = postgres::Client::connect(&c.pg, postgres::NoTls).expect("pg");
        pg.query(
            &format!("SELECT id FROM {}.events ORDER BY id", c.schema),
            &[],
        )
        .expect("events")
        .iter()
        .map(|r| r.get::<_, i64>(0) as u64)
        .collect()
    };
    wait_for(
        "every stored event delivered",
        Duration::from_secs(60),
        || {
            let got: std::collections::BTreeSet<u64> = hooks.ids().into_iter().collect();
            stored.iter().all(|id| got.contains(id))
        },
    );
    let ids = hooks.ids();
    let distinct: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    eprintln!(
        "webhook takeover: {} events stored, {} deliveries, {} delivered twice or more",
        stored.len(),
        ids.len(),
        ids.len() - distinct.len()
    );
    assert_eq!(
        hooks.bad.load(Ordering::Relaxed),
        0,
        "every delivery is signed"
    );
    assert!(
        distinct.iter().all(|id| stored.binary_search(id).is_ok()),
        "only stored events are delivered"
    );
    c.check_histories(&BTreeMap::new());
}

/// A real PostgreSQL failover under load: the store on a private primary with a synchronous
/// standby (`ANY 1`), the nodes connecting to both with `target_session_attrs=read-write`. The
/// primary crashes (`pg_ctl stop -m immediate`) mid-stream and the standby is promoted, as a
/// failover manager would: the nodes' writers, listeners and leader connections find the new
/// primary by themselves, every clinic moves on, and the history check against the promoted
/// server finds nothing lost or stored twice — what each node acknowledged had reached the
/// standby before the acknowledgement.
#[test]
fn a_postgresql_failover_to_the_synchronous_standby_loses_nothing_acknowledged() {
    let pg = common::pg::PgPair::start();
    let mut c = Cluster::start_with(
        2,
        3,
        Opts {
            pg: pg.url(),
            ..Opts::default()
        },
    );
    c.wait_every_clinic(
        "every clinic connected and acknowledged",
        Duration::from_secs(60),
        |acked, node| acked > 100 && node.is_some(),
    );
    let before = c.owners();
    // The standby holds what the primary acknowledged: it is a synchronous one.
    let sync: String = postgres::Client::connect(&pg.primary_url(), postgres::NoTls)
        .expect("primary")
        .query_one(
            "SELECT coalesce(string_agg(sync_state, ','), '') FROM pg_stat_replication",
            &[],
        )
        .expect("replication state")
        .get(0);
    assert!(
        sync == "quorum" || sync == "sync",
        "the standby is not synchronous: {sync:?}"
    );
    let t0 = Instant::now();
    pg.crash_primary();
    pg.promote_standby();
    c.wait_every_clinic(
        "every clinic acknowledged further on the promoted standby",
        Duration::from_secs(90),
        |acked, node| node.is_some() && acked > 0,
    );
    wait_for(
        "every clinic to move on past its position before the crash",
        Duration::from_secs(90),
        || {
            let now = c.owners();
            before
                .iter()
                .all(|(id, (at, _))| now.get(id).is_some_and(|(a, _)| a > &(at + 50)))
        },
    );
    eprintln!(
        "PostgreSQL failover: every clinic acknowledged 50 more events {:.1} s after the primary crashed",
        t0.elapsed().as_secs_f64()
    );
    c.drain();
    c.check_histories(&BTreeMap::new());
    for i in 0..c.nodes.len() {
        let errors = c.log(i, "error");
        assert!(
            errors.contains("event=store_connection_lost"),
            "node {i} never saw the primary go:\n{errors}"
        );
    }
}
