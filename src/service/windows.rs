//! The Windows service: install/uninstall/start/stop/status through the service control manager
//! (the `windows-service` crate), and the service entry point, which reports start pending →
//! running → stop pending → stopped and turns STOP and SHUTDOWN into the graceful drain.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{
    self, ServiceControlHandlerResult, ServiceStatusHandle,
};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use super::Notifier;

/// What `tether service install` registers.
pub struct InstallSpec {
    pub name: String,
    pub gateway: bool,
    pub exe: PathBuf,
    pub config: PathBuf,
    /// `None`: LocalSystem.
    pub account: Option<String>,
    pub password: Option<String>,
}

fn manager(access: ServiceManagerAccess) -> Result<ServiceManager> {
    ServiceManager::local_computer(None::<&str>, access)
        .context("opening the service control manager (run as Administrator)")
}

pub fn install(spec: &InstallSpec) -> Result<()> {
    let m = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let mut args: Vec<OsString> = vec!["service".into(), "run".into()];
    args.push("--name".into());
    args.push(spec.name.clone().into());
    if spec.gateway {
        args.push("--gateway".into());
    }
    args.push("--config".into());
    args.push(spec.config.clone().into_os_string());
    let info = ServiceInfo {
        name: spec.name.clone().into(),
        display_name: if spec.gateway {
            "Tether gateway".into()
        } else {
            "Tether clinic agent".into()
        },
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: spec.exe.clone(),
        launch_arguments: args,
        dependencies: vec![],
        account_name: spec.account.clone().map(OsString::from),
        account_password: spec.password.clone().map(OsString::from),
    };
    let service = m
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS,
        )
        .with_context(|| format!("creating service {}", spec.name))?;
    service
        .set_description("Keeps this clinic's database in sync with the cloud (Tether).")
        .context("setting the description")?;
    let restart = |secs| ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(secs),
    };
    service
        .update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
            reboot_msg: None,
            command: None,
            actions: Some(vec![restart(5), restart(30), restart(60)]),
        })
        .context("setting the recovery actions")?;
    // Also restart after a non-zero exit, not only after a crash. (Wine's service manager does
    // not implement this flag; the recovery actions above still apply to crashes.)
    if let Err(e) = service.set_failure_actions_on_non_crash_failures(true) {
        eprintln!("warning: recovery after a non-zero exit could not be enabled ({e}); recovery applies to crashes");
    }
    Ok(())
}

fn open(name: &str, access: ServiceAccess) -> Result<windows_service::service::Service> {
    manager(ServiceManagerAccess::CONNECT)?
        .open_service(name, access)
        .with_context(|| format!("opening service {name}"))
}

pub fn uninstall(name: &str) -> Result<()> {
    let service = open(
        name,
        ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
    )?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        // The drain runs now; deletion completes when the service has stopped.
        let _ = service.stop();
    }
    service
        .delete()
        .with_context(|| format!("deleting service {name}"))?;
    Ok(())
}

pub fn start(name: &str) -> Result<()> {
    let service = open(name, ServiceAccess::START)?;
    service
        .start(&[] as &[&OsStr])
        .with_context(|| format!("starting service {name}"))?;
    Ok(())
}

pub fn stop(name: &str) -> Result<()> {
    let service = open(name, ServiceAccess::STOP)?;
    service
        .stop()
        .with_context(|| format!("stopping service {name}"))?;
    Ok(())
}

pub fn status(name: &str) -> Result<String> {
    let service = open(name, ServiceAccess::QUERY_STATUS)?;
    let s = service.query_status()?;
    Ok(match s.current_state {
        ServiceState::Stopped => "stopped".into(),
        ServiceState::StartPending => "start pending".into(),
        ServiceState::StopPending => "stop pending (draining)".into(),
        ServiceState::Running => format!(
            "running (pid {})",
            s.process_id.map(|p| p.to_string()).unwrap_or("?".into())
        ),
        other => format!("{other:?}"),
    })
}

/// Reports state changes to the service manager.
struct Scm {
    handle: ServiceStatusHandle,
    checkpoint: Mutex<u32>,
}

impl Scm {
    fn set(&self, state: ServiceState, wait: Duration, exit: u32) {
        let pending = matches!(
            state,
            ServiceState::StartPending | ServiceState::StopPending
        );
        let checkpoint = {
            let mut c = self.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
            *c = if pending { *c + 1 } else { 0 };
            *c
        };
        let status = ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: if state == ServiceState::Running {
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
            } else {
                ServiceControlAccept::empty()
            },
            exit_code: ServiceExitCode::Win32(exit),
            checkpoint,
            wait_hint: wait,
            process_id: None,
        };
        if let Err(e) = self.handle.set_service_status(status) {
            log::error!(target: "supervisor", "event=service_status_failed state={state:?} error={e}");
        }
    }
}

impl Notifier for Scm {
    fn ready(&self, _: &str) {
        self.set(ServiceState::Running, Duration::ZERO, 0);
        log::info!(target: "supervisor", "event=service_running");
    }

    fn stopping(&self, within: Duration) {
        self.set(ServiceState::StopPending, within, 0);
    }
}

define_windows_service!(ffi_service_main, service_main);

/// Entry point of `tether service run`: hands the thread to the service control dispatcher.
pub fn run(name: String, _gateway: bool, _config: PathBuf) -> Result<()> {
    service_dispatcher::start(&name, ffi_service_main).with_context(|| {
        format!(
            "`tether service run` must be started by the Windows service manager (service {name})"
        )
    })?;
    Ok(())
}

/// The launch arguments the service was registered with (`service run --name N --config C`),
/// read back from the process's own command line (no global state).
fn launch_args() -> Result<(String, bool, PathBuf)> {
    let mut name = None;
    let mut config = None;
    let mut gateway = false;
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--name") => name = it.next().and_then(|v| v.into_string().ok()),
            Some("--config") | Some("-c") => config = it.next().map(PathBuf::from),
            Some("--gateway") => gateway = true,
            _ => {}
        }
    }
    match (name, config) {
        (Some(n), Some(c)) => Ok((n, gateway, c)),
        _ => bail!("service launched without --name and --config"),
    }
}

fn service_main(_arguments: Vec<OsString>) {
    // Nothing can be printed here: a failure before logging starts goes to the SCM exit code.
    if let Err(e) = service_body() {
        eprintln!("tether service failed: {e:#}");
    }
}

fn service_body() -> Result<()> {
    let (name, gateway, config) = launch_args()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<&'static str>();
    let stop_tx = Mutex::new(Some(stop_tx));
    let handler = move |control| -> ServiceControlHandlerResult {
        match control {
            ServiceControl::Stop | ServiceControl::Shutdown => {
                let why = if control == ServiceControl::Stop {
                    "service STOP"
                } else {
                    "system SHUTDOWN"
                };
                if let Some(tx) = stop_tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = tx.send(why);
                }
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        }
    };
    let handle = service_control_handler::register(&name, handler)
        .context("registering the service control handler")?;
    let scm = Arc::new(Scm {
        handle,
        checkpoint: Mutex::new(0),
    });
    scm.set(ServiceState::StartPending, Duration::from_secs(30), 0);
    let result = run_service_body(gateway, &config, stop_rx, scm.clone());
    let code = match &result {
        Ok(()) => 0,
        Err(e) => {
            log::error!(target: "error", "event=service_failed error={e:#}");
            // ERROR_EXCEPTION_IN_SERVICE: a non-zero code, so the recovery actions apply.
            1064
        }
    };
    scm.set(ServiceState::Stopped, Duration::ZERO, code);
    result
}

fn run_service_body(
    gateway: bool,
    config: &std::path::Path,
    stop_rx: tokio::sync::oneshot::Receiver<&'static str>,
    scm: Arc<Scm>,
) -> Result<()> {
    let cfg = crate::config::Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let _log = crate::logging::init(&cfg.logging, "")?;
    crate::logging::install_panic_logger(false);
    let stop = async move { stop_rx.await.unwrap_or("service control handler gone") };
    if gateway {
        bail!("the gateway is not offered as a Windows service; run it under systemd");
    }
    let a = cfg
        .agent
        .clone()
        .with_context(|| format!("{}: no `agent:` section", config.display()))?;
    super::run_agent(&a, stop, scm)?;
    Ok(())
}
