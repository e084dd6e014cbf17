//! Running as a long-lived service: the agent and gateway run loops shared by the console, systemd
//! and the Windows service manager; readiness, watchdog and stop notifications; installing the
//! service (a systemd unit on Linux, a Windows service on Windows).
//!
//! Every way of stopping — SIGTERM, Ctrl-C, a Windows STOP or SHUTDOWN control — ends in the same
//! graceful drain ([`tether_actors::AgentHandle::drain`]): no new outbox rows are read, the
//! batches already sent are given `agent.shutdown.drain_timeout` to be acknowledged, the socket
//! is closed with a close frame, and the checkpoint only ever reflects acknowledgements.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tether_actors::DrainReport;

use crate::config::AgentConfig;

pub mod systemd;
#[cfg(windows)]
pub mod windows;

/// Whoever supervises the process: systemd, the Windows service manager, or nobody.
pub trait Notifier: Send + Sync {
    /// The process is up and doing its job.
    fn ready(&self, status: &str);
    /// A graceful stop began; it may take up to `within`.
    fn stopping(&self, within: Duration);
    /// "Still alive", sent every [`Notifier::watchdog_interval`] from the event loop.
    fn watchdog(&self) {}
    /// How often the supervisor wants a watchdog ping, if at all.
    fn watchdog_interval(&self) -> Option<Duration> {
        None
    }
}

/// A console run: nothing to notify.
pub struct Console;

impl Notifier for Console {
    fn ready(&self, _: &str) {}
    fn stopping(&self, _: Duration) {}
}

/// Runs a clinic agent until `stop` completes, then drains it. Logging must already be set up.
/// Returns how the drain went; the caller decides the exit code.
pub fn run_agent<S>(a: &AgentConfig, stop: S, notifier: Arc<dyn Notifier>) -> Result<DrainReport>
where
    S: Future<Output = &'static str> + Send + 'static,
{
    // The proxy is resolved once (its password file or variable read once) and shown.
    let resolved = crate::agent::proxy(a)?;
    let proxy = match &resolved {
        Some(p) => p.to_string(),
        None => "none".to_string(),
    };
    // Finish a renewal a crash interrupted before the dialer reads the files.
    crate::enrol::finish_interrupted_renewal(a);
    let ports = crate::agent::ports_with_proxy(a, resolved)?;
    let renewal = crate::enrol::schedule(a);
    let settings = crate::agent::settings(a);
    let drain_timeout = a.shutdown.drain_timeout.get();
    log::info!(target: "supervisor", "event=agent_starting clinic={} gateway={} proxy={proxy} database={} version={}", a.clinic_id, a.gateway.url, a.database.path.display(), env!("CARGO_PKG_VERSION"));
    // The actors run on their own thread so that the exit is bounded: dropping a runtime waits
    // for every blocking call still running (a database call stuck on a lock), and a service
    // must not hang in "stop pending" because of one.
    let admin = match a.admin.addr() {
        None => None,
        Some(addr) => {
            // Its own database handles: status reads never queue behind the watcher's.
            let (source, checkpoint, _) = crate::agent::db_ports(a)?;
            Some((
                addr,
                crate::admin::AdminState {
                    clinic_id: a.clinic_id.clone(),
                    gateway_url: a.gateway.url.clone(),
                    proxy: proxy.clone(),
                    stats: Arc::new(Default::default()),
                    source,
                    checkpoint,
                    started: std::time::Instant::now(),
                    ready_lag: a.admin.ready_lag.get(),
                    slots: None,
                    certificate: a
                        .gateway
                        .tls
                        .as_ref()
                        .and_then(|t| t.cert.clone())
                        .map(|c| (c, renewal.as_ref().map(|(_, before, _)| *before))),
                    channels: match crate::local_channels::load_or_create_token(
                        &a.admin.channels_token_file,
                    ) {
                        Ok(token) => Some(crate::local_channels::LocalChannels {
                            board: ports.channels.clone(),
                            token,
                        }),
                        // Sync matters more: say so and serve no channels.
                        Err(e) => {
                            log::error!(target: "error", "event=channels_unavailable file={} error={e} note=\"sync continues; local applications cannot subscribe\"", a.admin.channels_token_file.display());
                            None
                        }
                    },
                },
            ))
        }
    };
    let (report_tx, report_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let runner = std::thread::Builder::new()
        .name("tether-agent".into())
        .spawn(move || {
            let system = actix::System::new();
            let report = system.block_on(agent_main(
                settings,
                ports,
                stop,
                notifier,
                drain_timeout,
                admin,
                renewal,
            ));
            let _ = report_tx.send(report);
            drop(system);
            let _ = done_tx.send(());
        })?;
    let report = match report_rx.recv() {
        Ok(r) => r,
        Err(_) => {
            let _ = runner.join();
            anyhow::bail!("the agent's event loop ended without draining (see error.log)");
        }
    };
    log_drain(&report);
    if done_rx.recv_timeout(Duration::from_secs(3)).is_err() {
        log::warn!(target: "supervisor", "event=exit_without_waiting reason=\"a blocking database call is still running\" note=\"it is rolled back by the database; nothing acknowledged depends on it\"");
    }
    Ok(report)
}

async fn agent_main<S>(
    settings: tether_actors::AgentSettings,
    ports: tether_actors::agent::AgentPorts,
    stop: S,
    notifier: Arc<dyn Notifier>,
    drain_timeout: Duration,
    admin: Option<(std::net::SocketAddr, crate::admin::AdminState)>,
    renewal: Option<(crate::config::AgentConfig, Duration, Duration)>,
) -> DrainReport
where
    S: Future<Output = &'static str>,
{
    let handle = tether_actors::start_agent(settings, ports);
    let renewal = renewal
        .map(|(a, before, every)| actix::spawn(crate::enrol::renewal_loop(a, before, every)));
    if let Some((addr, mut state)) = admin {
        state.stats = handle.stats.clone();
        state.slots = Some(handle.slots.clone());
        match crate::admin::bind(addr).await {
            Ok(listener) => {
                log::info!(target: "supervisor", "event=admin_listening addr={addr} endpoints=\"/healthz /readyz /metrics /status /call /v1/channels\"");
                actix::spawn(crate::admin::serve(listener, Arc::new(state)));
            }
            // Syncing matters more than the status page: say so loudly and go on.
            Err(e) => {
                log::error!(target: "error", "event=admin_unavailable addr={addr} error={e} note=\"sync continues; `tether agent status` cannot reach this agent\"");
            }
        }
    }
    let watchdog = notifier.watchdog_interval().map(|every| {
        let n = notifier.clone();
        let sup = handle.supervisor.clone();
        actix::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                // Pinged from the event loop the actors run on: a stuck loop stops the pings.
                if sup.connected() {
                    n.watchdog();
                }
            }
        })
    });
    tokio::pin!(stop);
    let why = tokio::select! {
        why = &mut stop => Some(why),
        _ = handle.wait_ready() => {
            log::info!(target: "supervisor", "event=agent_ready");
            notifier.ready("agent running");
            None
        }
    };
    let why = match why {
        Some(w) => w,
        None => stop.await,
    };
    log::info!(target: "supervisor", "event=agent_stopping reason={why} drain_timeout_ms={}", drain_timeout.as_millis());
    notifier.stopping(drain_timeout + Duration::from_secs(2));
    let report = handle.drain(drain_timeout).await;
    if let Some(w) = watchdog {
        w.abort();
    }
    if let Some(r) = renewal {
        r.abort();
    }
    report
}

fn log_drain(r: &DrainReport) {
    let line = format!(
        "event=drained acked_seq={} unacked_events={} link_lost={} timed_out={} close_timed_out={} elapsed_ms={}",
        r.acked_seq,
        r.unacked_events,
        r.link_lost,
        r.timed_out,
        r.close_timed_out,
        r.elapsed.as_millis()
    );
    match &r.error {
        Some(e) => log::error!(target: "supervisor", "{line} error={e:?}"),
        None if r.clean() => log::info!(target: "supervisor", "{line}"),
        None => {
            log::warn!(target: "supervisor", "{line} note=\"unacknowledged rows stay in the outbox and are sent by the next run\"")
        }
    }
}

/// SIGTERM, SIGINT (Ctrl-C) or, on Windows, Ctrl-C / Ctrl-Break: the name of what arrived.
pub async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}
