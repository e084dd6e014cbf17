//! A private PostgreSQL primary with a synchronous standby, each its own server on its own port
//! in a temporary directory (`initdb`, `pg_basebackup`, `pg_ctl` of the machine's PostgreSQL;
//! run as the `postgres` user when the tests run as root, since `initdb` refuses root). For
//! tests that crash the primary and promote the standby, as a failover manager would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::procs::free_port;

/// The server binaries: `TETHER_PG_BIN`, or the newest `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TETHER_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.retain(|d| d.join("initdb").exists());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql; or set TETHER_PG_BIN)")
    })
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub struct PgPair {
    dir: tempfile::TempDir,
    bin: PathBuf,
    root: bool,
    pub primary_port: u16,
    pub standby_port: u16,
}

impl PgPair {
    /// A primary and a standby it waits for on every commit (`synchronous_standby_names =
    /// 'ANY 1 (standby1)'`), both up and streaming.
    pub fn start() -> PgPair {
        let dir = tempfile::Builder::new()
            .prefix("tether-pg-")
            .tempdir()
            .expect("tempdir");
        let p = PgPair {
            bin: bin_dir(),
            root: running_as_root(),
            primary_port: free_port(),
            standby_port: free_port(),
            dir,
        };
        if p.root {
            p.run("chown", &["postgres", &p.path(".")]);
        }
        let primary = p.path("primary");
        p.pg(
            "initdb",
            &[
                "-D",
                &primary,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        append(
            &p.dir.path().join("primary/postgresql.conf"),
            &format!(
                "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 4\nsynchronous_standby_names = 'ANY 1 (standby1)'\nsynchronous_commit = on\n",
                p.primary_port,
                p.path(".")
            ),
        );
        append(
            &p.dir.path().join("primary/pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\n",
        );
        p.pg_ctl(&["-D", &primary, "-l", &p.path("primary.log"), "-w", "start"]);
        let standby = p.path("standby");
        p.pg(
            "pg_basebackup",
            &[
                "-D",
                &standby,
                "-R",
                "-d",
                &format!(
                    "host=127.0.0.1 port={} user=postgres application_name=standby1",
                    p.primary_port
                ),
            ],
        );
        // Its own port; once promoted it waits for no standby of its own.
        append(
            &p.dir.path().join("standby/postgresql.conf"),
            &format!(
                "port = {}\nsynchronous_standby_names = ''\n",
                p.standby_port
            ),
        );
        p.pg_ctl(&["-D", &standby, "-l", &p.path("standby.log"), "-w", "start"]);
        p
    }

    /// Both servers, the writable one chosen at each connect (`target_session_attrs`).
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=2",
            self.primary_port, self.standby_port
        )
    }

    /// The primary's own connection string.
    pub fn primary_url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.primary_port
        )
    }

    /// The primary dies without a checkpoint (`pg_ctl stop -m immediate`).
    pub fn crash_primary(&self) {
        self.pg_ctl(&["-D", &self.path("primary"), "-m", "immediate", "stop"]);
    }

    /// The standby becomes the primary.
    pub fn promote_standby(&self) {
        self.pg_ctl(&["-D", &self.path("standby"), "-w", "promote"]);
    }

    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }

    fn pg_ctl(&self, args: &[&str]) {
        self.pg("pg_ctl", args);
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool).display().to_string();
        if self.root {
            let mut all = vec!["-u", "postgres", "--", exe.as_str()];
            all.extend_from_slice(args);
            self.run("runuser", &all);
        } else {
            self.run(&exe, args);
        }
    }

    fn run(&self, exe: &str, args: &[&str]) {
        let out = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{exe}: {e}"));
        assert!(
            out.status.success(),
            "{exe} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("append");
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for d in ["primary", "standby"] {
            let data = self.path(d);
            if Path::new(&data).join("postmaster.pid").exists() {
                let exe = self.bin.join("pg_ctl").display().to_string();
                let mut cmd = if self.root {
                    let mut c = Command::new("runuser");
                    c.args(["-u", "postgres", "--", &exe]);
                    c
                } else {
                    Command::new(&exe)
                };
                let _ = cmd
                    .args(["-D", &data, "-m", "immediate", "stop"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}
