//! `tether`: the agent, the gateway, the demo and the admin commands.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tether::config::Config;
use tether::{agent, logging, service};
#[cfg(feature = "gateway")]
use tether::{demo, gateway};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Real-time sync between clinic databases and the cloud"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `tether bench capture`'s options.
#[derive(clap::Args)]
struct CaptureArgs {
    /// `capture`: the PostgreSQL server to create its databases on (needs wal_level = logical
    /// for the logical half).
    #[arg(long, default_value = "host=127.0.0.1 user=postgres dbname=postgres")]
    capture_url: String,
    /// `capture`: one writer mix (short, rollbacks, long, full, other-db) instead of all.
    #[arg(long)]
    mix: Option<String>,
    /// `capture`: seconds of load per mix and capture mode.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Run the clinic agent (or install/uninstall its database objects).
    Agent {
        #[arg(long, short, global = true, default_value = "config.yaml")]
        config: PathBuf,
        #[command(subcommand)]
        action: Option<AgentAction>,
    },
    /// Run the cloud gateway.
    #[cfg(feature = "gateway")]
    Gateway {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Install, control or remove the agent (or gateway) as a system service: a systemd unit on
    /// Linux, a Windows service on Windows.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Check a config file and list every problem with its line; `--connect` also opens the
    /// database and reaches the gateway (or binds the listen address and reaches the store).
    CheckConfig {
        #[arg(default_value = "config.yaml")]
        path: PathBuf,
        /// Also open the database, check the mapped tables, reach the gateway with this
        /// clinic's TLS and token (gateway: bind the listen address, reach the store).
        #[arg(long)]
        connect: bool,
    },
    /// Create keys and certificates (development CA, clinic and gateway certificates, data keys).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Measure throughput, latency, memory and reconnect storms (one JSON line per scenario).
    #[cfg(feature = "gateway")]
    Bench {
        /// ingest | latency | connections | footprint | drain | fallback | storm | bridge |
        /// history | sqlite-ceiling | agent-send | values | all;
        /// `capture`: PostgreSQL capture delay per writer mix, triggers vs logical
        scenario: String,
        #[command(flatten)]
        capture: Box<CaptureArgs>,
        #[arg(long)]
        json: bool,
        /// Scale every scenario down (for a quick look; the docs use the full sizes).
        #[arg(long)]
        quick: bool,
        /// Idle TLS connections for `connections`.
        #[arg(long)]
        connections: Option<usize>,
        /// `connections` over plain ws:// (measures the HTTP stack without OpenSSL).
        #[arg(long)]
        plaintext: bool,
        /// The gateway store for `ingest` and `history`: `sqlite` (default) or `postgres`.
        #[arg(long, default_value = "sqlite")]
        store: String,
        /// PostgreSQL connection string for `--store postgres`.
        #[arg(long, default_value = "host=127.0.0.1 user=postgres dbname=test")]
        store_url: String,
        /// Events in the store for `history` (e.g. 3000000; 30000000 takes a while).
        #[arg(long)]
        events: Option<u64>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Start a gateway and N clinic agents on temporary SQLite databases and show them syncing.
    #[cfg(feature = "gateway")]
    Demo {
        #[arg(long, default_value_t = 3)]
        clinics: usize,
        /// How long to generate activity (e.g. 30s, 2m).
        #[arg(long, default_value = "30s")]
        duration: String,
        /// Clinic writes per second, across all clinics.
        #[arg(long, default_value_t = 60.0)]
        rate: f64,
        /// Print one JSON summary object as the last line.
        #[arg(long)]
        json: bool,
        /// Drop connections and crash actors at random during the run.
        #[arg(long)]
        chaos: bool,
        /// Keep the temporary directory (databases and logs) for inspection.
        #[arg(long)]
        keep: bool,
        /// Run the gateway on PostgreSQL instead of embedded SQLite: a connection string
        /// (`postgres://…` or `host=… dbname=…`); the tables go in a fresh schema.
        #[arg(long)]
        store: Option<String>,
        /// Gateway nodes: more than 1 runs them on the `--store` PostgreSQL behind HAProxy
        /// (Debian's `haproxy`), kills the busiest child node with SIGKILL every third of the run and
        /// restarts it once its clinics have failed over.
        #[arg(long, default_value_t = 1)]
        gateways: usize,
        /// Also run channels: a simulated phone system posts call pops for every clinic and a
        /// durable notice to all; each clinic's front desk (a subscriber on its agent's local
        /// endpoint) must get exactly its own, in order.
        #[arg(long)]
        channels: bool,
    },
}

/// `tether bench ingest --gateway …`: the load client alone, against a gateway process.
#[cfg(feature = "gateway")]
#[derive(clap::Args)]
struct RemoteArgs {
    /// Push the ingest load to this gateway (`ws://` or `wss://…/v1/ws`) from this process.
    #[arg(long)]
    gateway: Option<String>,
    /// A `tether keys dev-setup` directory: ca.pem and the clinics' keys (tokens).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// The gateway's id (the tokens' audience).
    #[arg(long, default_value = "gw-bench")]
    gateway_id: String,
    /// Clinic ids are PREFIX000, PREFIX001, …
    #[arg(long, default_value = "clinic-")]
    prefix: String,
    #[arg(long, default_value_t = 50)]
    clinics: usize,
    #[arg(long, default_value_t = 10_000)]
    events_per_clinic: u64,
    /// Events per batch and batches unacknowledged at once (the agent's defaults).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// The gateway's process id: its CPU-seconds per 100,000 events and RSS are reported.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Encrypt each row's `notes` with the data key `<certs>/dk1.key` (kid dk1), as an agent
    /// with field encryption would.
    #[arg(long)]
    encrypt: bool,
    /// The measurement window of `latency --gateway`, in seconds.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Gateway nodes (each its own process) behind HAProxy on one PostgreSQL store
    /// (`--store-url`): `failover` (default 3), or `ingest` through N nodes (the load client in
    /// its own process; all nodes' CPU-seconds per 100,000 events).
    #[arg(long)]
    nodes: Option<usize>,
    /// `failover`: `kill` (SIGKILL a node) or `stop` (SIGSTOP: its host goes silent).
    #[arg(long, default_value = "kill")]
    mode: String,
    /// `failover`: events per second from each simulated clinic.
    #[arg(long, default_value_t = 2.0)]
    events_per_s: f64,
    /// `failover`: cloud updates posted for the routing measurement.
    #[arg(long, default_value_t = 200)]
    updates: usize,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Everything for a local TLS + token set-up: CA, gateway and clinic certificates,
    /// registry entries (clinics/*.yaml) and a data key (dk1.key).
    DevSetup {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Comma-separated clinic ids.
        #[arg(long, default_value = "clinic-001")]
        clinics: String,
        #[arg(long, default_value_t = 3072)]
        bits: u32,
    },
    /// A development certificate authority (ca.pem, ca.key).
    Ca {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        #[arg(long, default_value = "Tether Dev CA")]
        name: String,
        #[arg(long, default_value_t = 3072)]
        bits: u32,
    },
    /// A clinic certificate and RSA key (CN and SAN = clinic id).
    Clinic {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "certs")]
        ca: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        #[arg(long, default_value_t = 3072)]
        bits: u32,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// The gateway's server certificate.
    Gateway {
        #[arg(long, default_value = "certs")]
        ca: PathBuf,
        /// DNS names (repeatable).
        #[arg(long, default_value = "localhost")]
        host: Vec<String>,
        /// IP addresses (repeatable).
        #[arg(long, default_value = "127.0.0.1")]
        ip: Vec<String>,
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        #[arg(long, default_value_t = 3072)]
        bits: u32,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// A 256-bit data key for payload encryption.
    DataKey {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a clinic's registry entry (YAML) for the gateway's clinics_dir.
    RegistryEntry {
        #[arg(long)]
        id: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        kid: String,
    },
    /// Ask the gateway (REST, an admin token with `write`) for a one-time enrolment code for
    /// a clinic; give the code to whoever installs the clinic's PC (`tether agent enrol`).
    EnrolCode {
        /// The gateway: `https://host` or `wss://host/v1/ws`.
        #[arg(long)]
        gateway: String,
        /// The clinic the code enrols (and nothing else).
        #[arg(long)]
        clinic: String,
        /// Shorter than the gateway's `enrolment.code_ttl` (e.g. 2h).
        #[arg(long)]
        ttl: Option<String>,
        /// Registry labels for a new clinic, `name=value` (repeatable).
        #[arg(long)]
        label: Vec<String>,
        /// Environment variable holding the admin token.
        #[arg(long, default_value = "TETHER_ADMIN_TOKEN")]
        token_env: String,
        /// CA of the gateway's certificate (a private CA).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// A new REST API token and the hashed config entry for it.
    AdminToken {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "read,write")]
        scopes: String,
    },
}

#[derive(clap::Args, Clone)]
struct ServiceTarget {
    /// Service name.
    #[arg(long)]
    name: Option<String>,
    /// The service runs the gateway instead of the agent.
    #[arg(long)]
    gateway: bool,
    /// Where systemd units live (Linux).
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
}

impl ServiceTarget {
    fn role(&self) -> tether::service::systemd::Role {
        if self.gateway {
            tether::service::systemd::Role::Gateway
        } else {
            tether::service::systemd::Role::Agent
        }
    }

    fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.role().default_name().to_string())
    }
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Register the service: starts at boot, restarts on failure, runs from the given config.
    Install {
        #[command(flatten)]
        target: ServiceTarget,
        /// Config file (default: %ProgramData%\Tether\config.yaml on Windows,
        /// /etc/tether/config.yaml elsewhere).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Account to run as (Windows: e.g. `NT AUTHORITY\LocalService` or `.\tether`;
        /// Linux: a user name). Default: LocalSystem / root.
        #[arg(long)]
        user: Option<String>,
        /// Environment variable holding the account's password (Windows accounts that need one).
        #[arg(long)]
        password_env: Option<String>,
        /// Print the systemd unit instead of installing it.
        #[arg(long)]
        print: bool,
        /// Register only; do not start it now.
        #[arg(long)]
        no_start: bool,
    },
    /// Stop and remove the service (the database objects stay: `tether agent uninstall`).
    Uninstall {
        #[command(flatten)]
        target: ServiceTarget,
    },
    Start {
        #[command(flatten)]
        target: ServiceTarget,
    },
    Stop {
        #[command(flatten)]
        target: ServiceTarget,
    },
    Status {
        #[command(flatten)]
        target: ServiceTarget,
    },
    /// What the Windows service manager launches (not for interactive use).
    #[command(hide = true)]
    Run {
        #[command(flatten)]
        target: ServiceTarget,
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AgentAction {
    /// Enrol this PC with a one-time code from the operator: makes the clinic's key here (it
    /// never leaves the PC), gets its certificate from the gateway and writes the config
    /// (`--config`) and `identity/` beside it.
    Enrol {
        /// The gateway: `wss://host/v1/ws` or `https://host`.
        #[arg(long)]
        gateway: String,
        /// The one-time code (e.g. K7QF-2M9X-…).
        #[arg(long)]
        code: String,
        /// CA of the gateway's certificate (a private CA); the system's roots when absent.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Replace an identity and config that exist (the config is kept as `.bak`).
        #[arg(long)]
        force: bool,
        /// HTTP CONNECT proxy (`http://[user:pass@]host:port`, or `direct`); default: the
        /// environment's `HTTPS_PROXY` / `NO_PROXY`, as the agent uses.
        #[arg(long)]
        proxy: Option<String>,
        #[arg(long, default_value_t = 3072)]
        bits: u32,
    },
    /// Renew the clinic's key and certificate now (the agent also does it on its own,
    /// `agent.gateway.auth.renew_before` ahead of the certificate's end); the old key is
    /// retired at the gateway once the new one is in place.
    Renew {
        #[arg(long, default_value_t = 3072)]
        bits: u32,
    },
    /// Create the outbox, checkpoint and inbox tables and the capture triggers (idempotent).
    Install,
    /// Remove every object `install` created. Refuses while the outbox holds changes the gateway
    /// has not acknowledged (start the agent and let it drain first), unless `--force`.
    Uninstall {
        /// Drop unsent changes too.
        #[arg(long)]
        force: bool,
    },
    /// Ask the running agent (its local admin endpoint, `agent.admin.listen`) how it is doing:
    /// link and transport, outbox backlog, restarts, readiness. Exit code 0 when ready, 1 when
    /// running but not ready, 3 when no agent answers.
    Status {
        /// Print the raw JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Send every current row of a table as upserts, in key order; resumable after a crash.
    Snapshot {
        /// Table (or entity) name from agent.tables.
        #[arg(long)]
        table: String,
        #[arg(long, default_value_t = 1000)]
        chunk: usize,
        /// Start again from the first row even if a snapshot finished before.
        #[arg(long)]
        reset: bool,
    },
}

fn run_snapshot(
    a: &tether::config::AgentConfig,
    table: &str,
    chunk: usize,
    reset: bool,
) -> Result<()> {
    use std::io::Write;
    let mut last_pct = u64::MAX;
    let (done, total) = agent::snapshot(a, table, chunk.max(1), reset, &mut |done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100).min(100);
        if pct != last_pct {
            last_pct = pct;
            let bar = "#".repeat((pct / 5) as usize);
            eprint!("\rsnapshot {table}: [{bar:<20}] {pct:>3}% {done}/{total}");
            let _ = std::io::stderr().flush();
        }
    })?;
    eprintln!();
    println!("snapshot of {table}: {done} rows queued (table had {total} when it started)");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Also on error.log when the logs were open (a service's console goes nowhere).
            log::error!(target: logging::FATAL, "event=exit_on_error error={}", tether::security::log_value(&format!("{e:#}"), 600));
            ExitCode::FAILURE
        }
    };
    // Writes what the logs still hold (the counts of repeated warnings, see `logging`).
    log::logger().flush();
    code
}

fn load(path: &Path) -> Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Keys { command } => run_keys(command),
        #[cfg(feature = "gateway")]
        Command::Bench {
            scenario,
            json,
            quick,
            connections,
            plaintext,
            store,
            store_url,
            events,
            remote,
            capture,
        } => {
            if scenario == "capture" {
                #[cfg(feature = "postgres")]
                {
                    let secs = if quick { 8 } else { capture.seconds.max(1) };
                    tether::bench_capture::run(
                        &capture.capture_url,
                        capture.mix.as_deref(),
                        secs,
                        json,
                    )?;
                    return Ok(ExitCode::SUCCESS);
                }
                #[cfg(not(feature = "postgres"))]
                {
                    let _ = capture;
                    bail!(
                        "capture measures PostgreSQL clinics: this build has no `postgres` feature"
                    );
                }
            }
            #[cfg(not(feature = "postgres"))]
            if scenario == "failover" {
                bail!(
                    "failover runs the nodes on PostgreSQL: this build has no `postgres` feature"
                );
            }
            #[cfg(not(feature = "postgres"))]
            if remote.nodes.is_some() {
                bail!("--nodes runs the nodes on PostgreSQL: this build has no `postgres` feature");
            }
            #[cfg(feature = "postgres")]
            if let (Some(nodes), "ingest") = (remote.nodes, scenario.as_str()) {
                if !(1..=9).contains(&nodes) {
                    bail!("--nodes must be from 1 to 9");
                }
                let o = tether::bench_cluster::NodesIngest {
                    nodes,
                    pg_url: store_url,
                    prefix: remote.prefix,
                    clinics: remote.clinics,
                    events_per_clinic: remote.events_per_clinic,
                };
                let dir = tempfile::Builder::new().prefix("tether-nodes-").tempdir()?;
                let v = tether::bench_cluster::ingest_through_nodes(dir.path(), &o)?;
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            #[cfg(feature = "postgres")]
            if scenario == "failover" {
                let o = tether::bench_cluster::FailoverOptions {
                    nodes: remote.nodes.unwrap_or(3),
                    clinics: remote.clinics,
                    events_per_s: remote.events_per_s,
                    mode: remote.mode,
                    pg_url: store_url,
                    updates: remote.updates,
                };
                if o.mode != "kill" && o.mode != "stop" {
                    bail!("--mode `{}`: kill or stop", o.mode);
                }
                let dir = tempfile::Builder::new()
                    .prefix("tether-failover-")
                    .tempdir()?;
                let v = actix::System::new().block_on(async move {
                    tether::bench_cluster::failover(dir.path(), &o).await
                })?;
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(url) = remote.gateway {
                if scenario != "ingest" && scenario != "latency" {
                    bail!("--gateway: only `ingest` and `latency` run against another process");
                }
                let r = tether::bench_remote::RemoteIngest {
                    url,
                    certs: remote.certs,
                    audience: remote.gateway_id,
                    prefix: remote.prefix,
                    clinics: remote.clinics,
                    events_per_clinic: remote.events_per_clinic,
                    batch: remote.batch,
                    inflight: remote.inflight,
                    server_pid: remote.server_pid,
                    encrypt: remote.encrypt,
                };
                let v = actix::System::new().block_on(async move {
                    if scenario == "latency" {
                        tether::bench_remote::latency(r, remote.secs).await
                    } else {
                        tether::bench_remote::ingest(r).await
                    }
                })?;
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            let mut o = tether::bench::BenchOptions::default();
            if quick {
                o = tether::bench::BenchOptions {
                    clinics: 2,
                    events_per_clinic: 5_000,
                    latency_clinics: 50,
                    latency_secs: 5,
                    connections: 200,
                    plaintext: false,
                    drain_events: 10_000,
                    storm_clients: 200,
                    bridge_calls: 500,
                    bridge_callers: 10,
                    history_events: 100_000,
                    store: None,
                };
            }
            if let Some(n) = connections {
                o.connections = n;
            }
            o.plaintext = plaintext;
            o.store = match store.as_str() {
                "sqlite" => None,
                "postgres" => Some(tether::gateway::store::StoreLocation::Postgres {
                    url: store_url,
                    schema: format!("bench_{}", std::process::id()),
                }),
                other => bail!("--store `{other}`: sqlite or postgres"),
            };
            if let Some(n) = events {
                o.history_events = n;
            }
            tether::bench::run(&scenario, json, o)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Service { action } => run_service(action),
        Command::CheckConfig { path, connect } => match Config::check(&path) {
            Ok(cfg) => {
                println!("{}: ok", path.display());
                if !connect {
                    return Ok(ExitCode::SUCCESS);
                }
                println!("connected checks:");
                let lines = tether::check::run(&cfg);
                for l in &lines {
                    println!("{l}");
                }
                Ok(if lines.iter().all(|l| l.ok) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Err(e) => {
                eprintln!("{e}");
                if connect {
                    eprintln!("(connected checks not run: fix the problems above first)");
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Agent {
            config,
            action:
                Some(AgentAction::Enrol {
                    gateway,
                    code,
                    ca,
                    force,
                    proxy,
                    bits,
                }),
        } => {
            let proxy = tether::enrol::proxy_for(&gateway, proxy.as_deref())?;
            run_enrol(tether::enrol::EnrolRequest {
                gateway,
                code,
                config,
                ca,
                force,
                bits,
                timeout: std::time::Duration::from_secs(30),
                proxy,
            })
        }
        Command::Agent { config, action } => {
            let cfg = load(&config)?;
            let a = cfg
                .agent
                .clone()
                .with_context(|| format!("{}: no `agent:` section", config.display()))?;
            match action {
                Some(AgentAction::Install) => {
                    println!("{}", agent::install(&a)?);
                    for t in a.tables.iter().filter(|t| t.snapshot_on_install) {
                        run_snapshot(&a, &t.table, 1000, false)?;
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Some(AgentAction::Uninstall { force }) => {
                    // A database without our objects has nothing unsent: go on to uninstall.
                    let unsent = agent::unsent(&a, 100_000).unwrap_or(0);
                    if unsent > 0 && !force {
                        bail!("the outbox holds {unsent}{} changes the gateway has not acknowledged; run the agent until it has sent them (its message log shows the acks), or pass --force to drop them", if unsent >= 100_000 { "+" } else { "" });
                    }
                    if unsent > 0 {
                        eprintln!("warning: dropping {unsent} unsent changes (--force)");
                    }
                    println!("{}", agent::uninstall(&a)?);
                    Ok(ExitCode::SUCCESS)
                }
                Some(AgentAction::Enrol { .. }) => {
                    unreachable!("handled before the config is read")
                }
                Some(AgentAction::Renew { bits }) => {
                    let _log = logging::init(&cfg.logging, "")?;
                    let r = actix::System::new().block_on(tether::enrol::renew(&a, bits))?;
                    println!(
                        "renewed: key {} replaced by {} (certificate valid until {}); old key {}",
                        r.old_kid,
                        r.new_kid,
                        r.not_after,
                        if r.retired {
                            "retired at the gateway"
                        } else {
                            "still registered: retired at the agent's next check"
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Some(AgentAction::Status { json }) => {
                    let Some(addr) = a.admin.addr() else {
                        bail!(
                            "agent.admin.listen is `off` in {}: the agent has no status endpoint",
                            config.display()
                        );
                    };
                    match tether::admin::fetch_status(addr, std::time::Duration::from_secs(5)) {
                        Ok(s) => {
                            if json {
                                println!("{}", serde_json::to_string_pretty(&s)?);
                            } else {
                                print!("{}", tether::admin::describe(&s));
                            }
                            Ok(if s.ready {
                                ExitCode::SUCCESS
                            } else {
                                ExitCode::from(1)
                            })
                        }
                        Err(e @ tether::admin::StatusError::NotRunning(_)) => {
                            println!("{}: {e}", a.clinic_id);
                            match agent::unsent(&a, 100_000) {
                                Ok(n) => println!("  outbox: {n} changes not yet acknowledged by the gateway (read from the database)"),
                                Err(e) => println!("  outbox: unreadable: {e}"),
                            }
                            Ok(ExitCode::from(3))
                        }
                        Err(e) => Err(e.into()),
                    }
                }
                Some(AgentAction::Snapshot {
                    table,
                    chunk,
                    reset,
                }) => {
                    run_snapshot(&a, &table, chunk, reset)?;
                    Ok(ExitCode::SUCCESS)
                }
                None => run_agent(&cfg, a),
            }
        }
        #[cfg(feature = "gateway")]
        Command::Gateway { config } => {
            let cfg = load(&config)?;
            let g = cfg
                .gateway
                .clone()
                .with_context(|| format!("{}: no `gateway:` section", config.display()))?;
            run_gateway(&cfg, g)
        }
        #[cfg(feature = "gateway")]
        Command::Demo {
            clinics,
            duration,
            rate,
            json,
            chaos,
            keep,
            store,
            gateways,
            channels,
        } => {
            let Some(duration) = tether::config::parse_duration(&duration) else {
                bail!("--duration `{duration}` is not a duration (e.g. 20s, 2m)");
            };
            if clinics == 0 || clinics > 200 {
                bail!("--clinics must be from 1 to 200");
            }
            if !(rate > 0.0 && rate <= 50_000.0) {
                bail!("--rate must be above 0 and at most 50000");
            }
            if gateways == 0 || gateways > 9 {
                bail!("--gateways must be from 1 to 9");
            }
            if channels && gateways > 1 {
                bail!("--channels runs with one gateway (the child nodes of --gateways have no channels configured)");
            }
            if gateways > 1 && store.is_none() {
                bail!("--gateways {gateways}: the nodes share one PostgreSQL store; add --store postgres://… (or \"host=… dbname=…\")");
            }
            let opts = demo::DemoOptions {
                clinics,
                duration,
                rate,
                json,
                chaos,
                keep,
                store: store.map(|url| tether::gateway::store::StoreLocation::Postgres {
                    url,
                    schema: format!("demo_{}", std::process::id()),
                }),
                gateways,
                channels,
            };
            let summary = demo::run(opts)?;
            Ok(if summary.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn run_agent(cfg: &Config, a: tether::config::AgentConfig) -> Result<ExitCode> {
    let _log = logging::init(&cfg.logging, "")?;
    logging::install_panic_logger(true);
    let notifier = std::sync::Arc::new(service::systemd::Systemd::from_env());
    service::run_agent(&a, service::shutdown_signal(), notifier)?;
    Ok(ExitCode::SUCCESS)
}

fn default_config_path() -> PathBuf {
    #[cfg(windows)]
    {
        let base = std::env::var_os("ProgramData")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"));
        base.join("Tether").join("config.yaml")
    }
    #[cfg(not(windows))]
    PathBuf::from("/etc/tether/config.yaml")
}

#[cfg(not(windows))]
fn run_service(action: ServiceAction) -> Result<ExitCode> {
    use service::systemd::{self as sd, UnitSpec};
    match action {
        ServiceAction::Install {
            target,
            config,
            user,
            password_env,
            print,
            no_start,
        } => {
            if password_env.is_some() {
                bail!("--password-env is for Windows accounts; systemd runs `User=` without a password");
            }
            let config = std::path::absolute(config.unwrap_or_else(default_config_path))
                .context("--config")?;
            // The unit must point at a config that works: check it now, with every problem listed.
            let cfg = load(&config)?;
            let drain_timeout = match target.role() {
                sd::Role::Agent => {
                    let a = cfg
                        .agent
                        .as_ref()
                        .with_context(|| format!("{}: no `agent:` section", config.display()))?;
                    a.shutdown.drain_timeout.get()
                }
                sd::Role::Gateway => {
                    cfg.gateway
                        .as_ref()
                        .with_context(|| format!("{}: no `gateway:` section", config.display()))?;
                    std::time::Duration::from_secs(10)
                }
            };
            let exe = std::env::current_exe().context("locating the tether executable")?;
            let text = sd::unit(&UnitSpec {
                role: target.role(),
                exe,
                config,
                user,
                watchdog: std::time::Duration::from_secs(60),
                drain_timeout,
            });
            if print {
                print!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            let name = target.name();
            let path = sd::write_unit(&target.unit_dir, &name, &text)?;
            println!("wrote {}", path.display());
            sd::systemctl(&["daemon-reload"])?;
            if no_start {
                sd::systemctl(&["enable", &name])?;
            } else {
                sd::systemctl(&["enable", "--now", &name])?;
            }
            println!(
                "{name}: enabled{}",
                if no_start { "" } else { " and started" }
            );
        }
        ServiceAction::Uninstall { target } => {
            let name = target.name();
            // A unit that is not loaded cannot be disabled; that is fine when removing it.
            if let Err(e) = sd::systemctl(&["disable", "--now", &name]) {
                eprintln!("warning: {e}");
            }
            match sd::remove_unit(&target.unit_dir, &name)? {
                Some(p) => println!("removed {}", p.display()),
                None => println!("{name}: no unit file in {}", target.unit_dir.display()),
            }
            sd::systemctl(&["daemon-reload"])?;
        }
        ServiceAction::Start { target } => sd::systemctl(&["start", &target.name()])?,
        ServiceAction::Stop { target } => sd::systemctl(&["stop", &target.name()])?,
        ServiceAction::Status { target } => {
            // `systemctl status` exits 3 for a stopped unit: report, do not fail.
            if let Err(e) = sd::systemctl(&["status", "--no-pager", &target.name()]) {
                eprintln!("{e}");
                return Ok(ExitCode::from(3));
            }
        }
        ServiceAction::Run { .. } => {
            bail!("`tether service run` is the Windows service entry point; on Linux systemd runs `tether agent` directly")
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(windows)]
fn run_service(action: ServiceAction) -> Result<ExitCode> {
    use service::windows as win;
    match action {
        ServiceAction::Install {
            target,
            config,
            user,
            password_env,
            print: _,
            no_start,
        } => {
            if target.gateway {
                bail!("--gateway: the gateway is not offered as a Windows service; run it under systemd on Linux");
            }
            let config = std::path::absolute(config.unwrap_or_else(default_config_path))
                .context("--config")?;
            load(&config)?;
            let password = match password_env {
                Some(var) => Some(std::env::var(&var).with_context(|| {
                    format!("--password-env: environment variable {var} is not set")
                })?),
                None => None,
            };
            let spec = win::InstallSpec {
                name: target.name(),
                gateway: target.gateway,
                exe: std::env::current_exe().context("locating the tether executable")?,
                config,
                account: user,
                password,
            };
            win::install(&spec)?;
            println!(
                "{}: installed (automatic start, restart on failure after 5 s, 30 s, 60 s)",
                spec.name
            );
            if !no_start {
                win::start(&spec.name)?;
                println!("{}: start requested", spec.name);
            }
        }
        ServiceAction::Uninstall { target } => {
            win::uninstall(&target.name())?;
            println!("{}: removed", target.name());
        }
        ServiceAction::Start { target } => win::start(&target.name())?,
        ServiceAction::Stop { target } => win::stop(&target.name())?,
        ServiceAction::Status { target } => {
            println!("{}: {}", target.name(), win::status(&target.name())?)
        }
        ServiceAction::Run { target, config } => {
            win::run(target.name(), target.gateway, config)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_keys(cmd: KeysCommand) -> Result<ExitCode> {
    use tether::security::{admin, keys};
    match cmd {
        KeysCommand::DevSetup { out, clinics, bits } => {
            let ids: Vec<String> = clinics
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            for id in &ids {
                if !tether::config::valid_id(id) {
                    bail!("--clinics: `{id}` is not a valid clinic id");
                }
            }
            keys::dev_setup(&out, &ids, bits)?;
            println!(
                "wrote ca, gateway, {} clinic certificates, clinics/*.yaml and dk1.key to {}",
                ids.len(),
                out.display()
            );
        }
        KeysCommand::Ca { out, name, bits } => {
            let ca = keys::make_ca(&name, 3650, bits)?;
            keys::save(&ca, &out, "ca")?;
            println!("wrote {0}/ca.pem and {0}/ca.key", out.display());
        }
        KeysCommand::Clinic {
            ca,
            id,
            out,
            bits,
            days,
        } => {
            if !tether::config::valid_id(&id) {
                bail!("--id `{id}` is not a valid clinic id");
            }
            let ca = keys::load(&ca, "ca")?;
            let cert = keys::issue(
                &ca,
                &keys::Leaf {
                    dns: &[id.as_str()],
                    days,
                    ..keys::Leaf::new(&id, keys::Usage::Client, bits)
                },
            )?;
            keys::save(&cert, &out, &id)?;
            println!("wrote {0}/{id}.pem and {0}/{id}.key", out.display());
        }
        KeysCommand::Gateway {
            ca,
            host,
            ip,
            out,
            bits,
            days,
        } => {
            let ca = keys::load(&ca, "ca")?;
            let dns: Vec<&str> = host.iter().map(String::as_str).collect();
            let ips: Vec<&str> = ip.iter().map(String::as_str).collect();
            let cn = dns.first().copied().unwrap_or("tether-gateway");
            let cert = keys::issue(
                &ca,
                &keys::Leaf {
                    dns: &dns,
                    ips: &ips,
                    days,
                    ..keys::Leaf::new(cn, keys::Usage::Server, bits)
                },
            )?;
            keys::save(&cert, &out, "gateway")?;
            println!("wrote {0}/gateway.pem and {0}/gateway.key", out.display());
        }
        KeysCommand::DataKey { out } => {
            keys::write_data_key(&out)?;
            println!("wrote {}", out.display());
        }
        KeysCommand::RegistryEntry { id, cert, kid } => {
            let pem = std::fs::read(&cert).with_context(|| cert.display().to_string())?;
            let x = openssl::x509::X509::from_pem(&pem)?;
            print!("{}", keys::registry_entry(&id, &kid, &x)?);
        }
        KeysCommand::EnrolCode {
            gateway,
            clinic,
            ttl,
            label,
            token_env,
            ca,
        } => {
            let token = std::env::var(&token_env).with_context(|| {
                format!("--token-env: variable {token_env} is not set (an admin token with the write scope)")
            })?;
            let mut labels = Vec::new();
            for l in &label {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("--label {l}: use name=value"))?;
                labels.push((k.to_string(), v.to_string()));
            }
            let answer = actix::System::new().block_on(tether::enrol::request_code(
                &gateway,
                &clinic,
                &token,
                ttl.as_deref(),
                &labels,
                ca.as_deref(),
            ))?;
            let field = |k: &str| {
                answer
                    .get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("-")
                    .to_string()
            };
            println!("code for {}: {}", field("clinic_id"), field("code"));
            println!("valid once, until {}", field("expires_at"));
            println!(
                "on the clinic PC: tether agent enrol --gateway {gateway} --code {}",
                field("code")
            );
        }
        KeysCommand::AdminToken { name, scopes } => {
            let token = admin::new_token();
            println!("token (give to the caller, store nowhere else): {token}");
            println!("config (gateway.admin_tokens):\n  - name: {name}\n    sha256: {}\n    scopes: [{scopes}]", admin::sha256_hex(&token));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_enrol(r: tether::enrol::EnrolRequest) -> Result<ExitCode> {
    let done = actix::System::new().block_on(tether::enrol::enrol(&r))?;
    println!(
        "enrolled as clinic {} (key {}), gateway {}",
        done.clinic_id, done.kid, done.gateway_url
    );
    println!("wrote {} and identity/ beside it", done.config.display());
    if !done.complete_config {
        println!(
            "the gateway has no agent template: add agent.database and agent.tables to the config"
        );
    }
    if done.config_problems.is_empty() {
        println!(
            "next: tether agent install -c {0} && tether service install --config {0}",
            done.config.display()
        );
    } else {
        println!("the config does not load yet:");
        for p in &done.config_problems {
            println!("  {p}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "gateway")]
fn run_gateway(cfg: &Config, g: tether::config::GatewayConfig) -> Result<ExitCode> {
    let _log = logging::init(&cfg.logging, "")?;
    logging::install_panic_logger(true);
    let mut settings = gateway::GatewaySettings::from_config(&g);
    settings.webhooks = gateway::webhooks_from_config(&g)?;
    settings.bridge = gateway::bridge_from_config(&g)?;
    settings.channels =
        gateway::channels::specs_from_config(&g).map_err(gateway::GatewayError::Channels)?;
    let system = actix::System::new();
    system.block_on(async move {
        let security = gateway::GatewaySecurity::from_config(&g)?;
        let handle = gateway::start(settings, security)?;
        println!("gateway listening on {}", handle.addr);
        let sd = service::systemd::Systemd::from_env();
        use service::Notifier;
        sd.ready("gateway listening");
        let sd = std::sync::Arc::new(sd);
        if let Some(every) = sd.watchdog_interval() {
            let sd = sd.clone();
            actix::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    sd.watchdog();
                }
            });
        }
        let why = service::shutdown_signal().await;
        log::info!(target: "connection", "event=gateway_stopping reason={why}");
        sd.stopping(std::time::Duration::from_secs(10));
        handle.stop().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
