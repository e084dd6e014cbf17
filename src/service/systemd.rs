//! systemd: `sd_notify` readiness / watchdog / stopping messages (the datagram protocol, no
//! libsystemd), and the unit file `tether service install` writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::Notifier;

/// Talks to systemd through `$NOTIFY_SOCKET` when the unit is `Type=notify`; silent otherwise.
pub struct Systemd {
    #[cfg(unix)]
    socket: Option<(std::os::unix::net::UnixDatagram, String)>,
    watchdog: Option<Duration>,
}

impl Systemd {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the variables systemd sets).
    pub fn from_env() -> Systemd {
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|_| {
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_none_or(|p| p == std::process::id())
            })
            .filter(|&us| us > 0)
            // Ping at half the interval, as sd_watchdog_enabled(3) recommends.
            .map(|us| Duration::from_micros(us / 2));
        #[cfg(unix)]
        {
            let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
                match std::os::unix::net::UnixDatagram::unbound() {
                    Ok(s) => Some((s, path)),
                    Err(e) => {
                        log::warn!(target: "supervisor", "event=sd_notify_unavailable error={e}");
                        None
                    }
                }
            });
            Systemd { socket, watchdog }
        }
        #[cfg(not(unix))]
        Systemd { watchdog }
    }

    /// Whether systemd asked for notifications.
    pub fn active(&self) -> bool {
        #[cfg(unix)]
        {
            self.socket.is_some()
        }
        #[cfg(not(unix))]
        false
    }

    /// Sends one notification (`KEY=value` lines). Failures are logged, never fatal.
    pub fn notify(&self, state: &str) {
        #[cfg(unix)]
        if let Some((sock, path)) = &self.socket {
            if let Err(e) = send_to(sock, path, state.as_bytes()) {
                log::warn!(target: "supervisor", "event=sd_notify_failed socket={path:?} error={e}");
            }
        }
        #[cfg(not(unix))]
        let _ = state;
    }
}

#[cfg(unix)]
fn send_to(
    sock: &std::os::unix::net::UnixDatagram,
    path: &str,
    msg: &[u8],
) -> std::io::Result<usize> {
    if let Some(name) = path.strip_prefix('@') {
        // An abstract socket (Linux): systemd's default for user services.
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            return sock.send_to_addr(msg, &addr);
        }
        #[cfg(not(target_os = "linux"))]
        return Err(std::io::Error::other(format!(
            "abstract socket @{name} is Linux-only"
        )));
    }
    sock.send_to(msg, path)
}

impl Notifier for Systemd {
    fn ready(&self, status: &str) {
        self.notify(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    fn stopping(&self, within: Duration) {
        // Ask for the drain time so systemd does not SIGKILL us in the middle of it.
        self.notify(&format!(
            "STOPPING=1\nSTATUS=draining\nEXTEND_TIMEOUT_USEC={}",
            within.as_micros()
        ));
    }

    fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }
}

/// Which process a unit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Gateway,
}

impl Role {
    pub fn default_name(self) -> &'static str {
        match self {
            Role::Agent => "tether-agent",
            Role::Gateway => "tether-gateway",
        }
    }
}

/// What goes into a unit file.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    pub role: Role,
    pub exe: PathBuf,
    pub config: PathBuf,
    /// Account to run as (`User=`); root when empty.
    pub user: Option<String>,
    /// systemd kills the process if it misses watchdog pings for this long.
    pub watchdog: Duration,
    /// The drain timeout from the config: the stop timeout is a little longer.
    pub drain_timeout: Duration,
}

/// The unit file text.
pub fn unit(spec: &UnitSpec) -> String {
    let (what, verb) = match spec.role {
        Role::Agent => (
            "Tether clinic agent (clinic database <-> cloud sync)",
            "agent",
        ),
        Role::Gateway => ("Tether gateway (cloud relay for clinic agents)", "gateway"),
    };
    let workdir = spec
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/"));
    let user = spec
        .user
        .as_deref()
        .map(|u| format!("User={u}\n"))
        .unwrap_or_default();
    let stop = spec.drain_timeout.as_secs() + 10;
    let watchdog = spec.watchdog.as_secs().max(1);
    format!(
        "# Written by `tether service install`. Reinstall rather than edit: it is overwritten.\n\
         [Unit]\n\
         Description={what}\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         ExecStart={exe} {verb} --config {config}\n\
         WorkingDirectory={workdir}\n\
         {user}\
         Restart=on-failure\n\
         RestartSec=5s\n\
         # SIGTERM starts the graceful drain (agent.shutdown.drain_timeout).\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec={stop}s\n\
         WatchdogSec={watchdog}s\n\
         NoNewPrivileges=yes\n\
         PrivateTmp=yes\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exe = spec.exe.display(),
        config = spec.config.display(),
        workdir = workdir.display(),
    )
}

/// Errors from installing or controlling the unit.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`systemctl {args}` could not run ({source}); is this a systemd host?")]
    NoSystemctl {
        args: String,
        source: std::io::Error,
    },
    #[error("`systemctl {args}` failed with {status}")]
    Systemctl { args: String, status: String },
}

/// Writes `<dir>/<name>.service`. Returns its path.
pub fn write_unit(dir: &Path, name: &str, text: &str) -> Result<PathBuf, ServiceError> {
    let path = dir.join(format!("{name}.service"));
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&path, text))
        .map_err(|source| ServiceError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// Removes the unit file (a missing one is fine).
pub fn remove_unit(dir: &Path, name: &str) -> Result<Option<PathBuf>, ServiceError> {
    let path = dir.join(format!("{name}.service"));
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Some(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ServiceError::Remove { path, source }),
    }
}

/// Runs `systemctl <args>`, inheriting its output.
pub fn systemctl(args: &[&str]) -> Result<(), ServiceError> {
    let joined = args.join(" ");
    let status = Command::new("systemctl")
        .args(args)
        .status()
        .map_err(|source| ServiceError::NoSystemctl {
            args: joined.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(ServiceError::Systemctl {
            args: joined,
            status: status.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_runs_the_agent_as_a_notify_service_with_restart_and_watchdog() {
        let text = unit(&UnitSpec {
            role: Role::Agent,
            exe: PathBuf::from("/usr/local/bin/tether"),
            config: PathBuf::from("/etc/tether/config.yaml"),
            user: Some("tether".into()),
            watchdog: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
        });
        for line in [
            "Type=notify",
            "ExecStart=/usr/local/bin/tether agent --config /etc/tether/config.yaml",
            "WorkingDirectory=/etc/tether",
            "User=tether",
            "Restart=on-failure",
            "TimeoutStopSec=20s",
            "WatchdogSec=30s",
            "WantedBy=multi-user.target",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn gateway_unit_has_no_user_line_when_none_is_given() {
        let text = unit(&UnitSpec {
            role: Role::Gateway,
            exe: PathBuf::from("/opt/tether"),
            config: PathBuf::from("/srv/gw.yaml"),
            user: None,
            watchdog: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
        });
        assert!(text.contains("ExecStart=/opt/tether gateway --config /srv/gw.yaml\n"));
        assert!(!text.contains("User="));
    }

    #[cfg(unix)]
    #[test]
    fn notifications_reach_the_socket_systemd_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        let sd = Systemd {
            socket: Some((
                std::os::unix::net::UnixDatagram::unbound().expect("socket"),
                path.display().to_string(),
            )),
            watchdog: None,
        };
        sd.ready("agent running");
        sd.watchdog();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("recv");
        let first = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            first.starts_with("READY=1\nSTATUS=agent running\n"),
            "{first}"
        );
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
