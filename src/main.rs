//! `tether`: the agent, the gateway, the demo and the admin commands.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tether::config::{parse_duration, Config};
use tether::{agent, db, demo, gateway, logging};

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

#[derive(Subcommand)]
enum Command {
    /// Run the clinic agent (or install/uninstall its database objects).
    Agent {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        #[command(subcommand)]
        action: Option<AgentAction>,
    },
    /// Run the cloud gateway.
    Gateway {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Check a config file and list every problem with its line.
    CheckConfig {
        #[arg(default_value = "config.yaml")]
        path: PathBuf,
    },
    /// Start a gateway and N clinic agents on temporary SQLite databases and show them syncing.
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
    },
}

#[derive(Subcommand)]
enum AgentAction {
    /// Create the outbox, checkpoint and inbox tables and the capture triggers (idempotent).
    Install,
    /// Remove every object `install` created.
    Uninstall,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { path } => match Config::load(&path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Agent { config, action } => {
            let cfg = load(&config)?;
            let a = cfg
                .agent
                .clone()
                .with_context(|| format!("{}: no `agent:` section", config.display()))?;
            match action {
                Some(AgentAction::Install) => {
                    let r = db::sqlite::install(&a.database.path, &a.tables)?;
                    println!(
                        "installed in {}: tables [{}], {} triggers",
                        a.database.path.display(),
                        r.tables.join(", "),
                        r.triggers
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Some(AgentAction::Uninstall) => {
                    let n = db::sqlite::uninstall(&a.database.path)?;
                    println!("removed {n} objects from {}", a.database.path.display());
                    Ok(ExitCode::SUCCESS)
                }
                None => run_agent(&cfg, a),
            }
        }
        Command::Gateway { config } => {
            let cfg = load(&config)?;
            let g = cfg
                .gateway
                .clone()
                .with_context(|| format!("{}: no `gateway:` section", config.display()))?;
            run_gateway(&cfg, g)
        }
        Command::Demo {
            clinics,
            duration,
            rate,
            json,
            chaos,
            keep,
        } => {
            let Some(duration) = parse_duration(&duration) else {
                bail!("--duration `{duration}` is not a duration (e.g. 20s, 2m)");
            };
            if clinics == 0 || clinics > 200 {
                bail!("--clinics must be from 1 to 200");
            }
            if !(rate > 0.0 && rate <= 50_000.0) {
                bail!("--rate must be above 0 and at most 50000");
            }
            let opts = demo::DemoOptions {
                clinics,
                duration,
                rate,
                json,
                chaos,
                keep,
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

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn run_agent(cfg: &Config, a: tether::config::AgentConfig) -> Result<ExitCode> {
    let _log = logging::init(&cfg.logging, "")?;
    logging::install_panic_logger(true);
    let ports = agent::sqlite_ports(&a)?;
    let settings = agent::settings(&a);
    log::info!(target: "supervisor", "event=agent_starting clinic={} gateway={} database={}", a.clinic_id, a.gateway.url, a.database.path.display());
    let system = actix::System::new();
    system.block_on(async move {
        let handle = tether_actors::start_agent(settings, ports);
        shutdown_signal().await;
        log::info!(target: "supervisor", "event=agent_stopping reason=signal");
        handle.shutdown();
    });
    Ok(ExitCode::SUCCESS)
}

fn run_gateway(cfg: &Config, g: tether::config::GatewayConfig) -> Result<ExitCode> {
    let _log = logging::init(&cfg.logging, "")?;
    logging::install_panic_logger(true);
    let settings = gateway::GatewaySettings::from_config(&g);
    let system = actix::System::new();
    system.block_on(async move {
        let handle = gateway::start(settings)?;
        println!("gateway listening on {}", handle.addr);
        shutdown_signal().await;
        log::info!(target: "connection", "event=gateway_stopping reason=signal");
        handle.stop().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
