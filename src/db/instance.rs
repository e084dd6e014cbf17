//! One agent per clinic database. Two agents on one database would read the same outbox and
//! apply the same cloud updates twice, each believing it is the clinic. The first agent holds a
//! lock for as long as it runs; a second one refuses to start and names the holder (host and
//! pid). The lock is the operating system's (SQLite: a lock on a file beside the database) or
//! the database server's (PostgreSQL: a session advisory lock; SQL Server: a session-owned
//! `sp_getapplock`), so it is released when its holder dies, however it dies.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a starting agent waits for the previous holder to let go (a service restart, an
/// in-process restart whose old actors are still stopping) before refusing.
pub const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("another agent already syncs this database ({holder}); stop it first — two agents on one database would send its changes and apply cloud updates twice")]
    Held { holder: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("taking the one-agent lock: {0}")]
    Database(String),
}

/// This machine's name (`unknown-host` when none can be read).
pub fn host() -> String {
    std::env::var("COMPUTERNAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// `host <name> pid <pid>`: short enough for PostgreSQL's `application_name` (63 bytes).
pub fn short_holder() -> String {
    let mut s = format!("tether-agent {} pid {}", host(), std::process::id());
    s.truncate(63);
    s
}

/// Who this process is, as another agent will be told.
pub fn holder() -> String {
    format!(
        "host {}, pid {}, since {}",
        host(),
        std::process::id(),
        tether_schemas::iso_from_millis(crate::security::unix_now_ms() as i64)
    )
}

/// The lock beside a SQLite database: `<database>.agent-lock`, holding the holder's line.
pub struct FileLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the lock of the SQLite database at `db`, waiting up to `wait` for a holder to let go.
pub fn lock_sqlite(db: &Path, wait: Duration) -> Result<FileLock, InstanceError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".agent-lock");
    let path = PathBuf::from(name);
    let io = |source| InstanceError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                // The holder's line is in a file of its own: Windows does not let another
                // process read a locked file.
                let text = std::fs::read_to_string(holder_file(&path)).unwrap_or_default();
                let holder = text.trim();
                return Err(InstanceError::Held {
                    holder: if holder.is_empty() {
                        "holder unknown".into()
                    } else {
                        holder.chars().take(200).collect()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
    let info = holder_file(&path);
    std::fs::write(&info, holder()).map_err(|source| InstanceError::Io {
        path: info.display().to_string(),
        source,
    })?;
    Ok(FileLock { _file: file, path })
}

/// `<database>.agent-lock.holder`: who holds the lock (informational, never locked).
fn holder_file(lock: &Path) -> PathBuf {
    let mut name = lock.as_os_str().to_owned();
    name.push(".holder");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_name_and_gets_it_once_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("clinic.db");
        let first = lock_sqlite(&db, Duration::ZERO).expect("first");
        let t0 = Instant::now();
        match lock_sqlite(&db, Duration::from_millis(300)) {
            Err(InstanceError::Held { holder }) => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id())),
                    "{holder}"
                );
                assert!(
                    t0.elapsed() >= Duration::from_millis(300),
                    "it waited first"
                );
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a second holder must be refused"),
        }
        drop(first);
        lock_sqlite(&db, Duration::ZERO).expect("free again once released");
    }
}
