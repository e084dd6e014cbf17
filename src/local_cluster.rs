//! A gateway cluster on this machine, for `tether demo --gateways N`, `tether bench failover`
//! and the cluster tests: gateway nodes as child processes of this binary, and Debian's HAProxy
//! in front of them (TCP passthrough, health from `/readyz`). Nothing here balances or elects:
//! HAProxy spreads the clinics, the shared PostgreSQL store does the rest.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process, killed when dropped (woken first in case it was paused).
pub struct Process(pub Child);

impl Process {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Sends `sig` (`KILL`, `STOP`, `CONT`, `TERM`) with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        signal(self.0.id(), sig);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        signal(self.0.id(), "CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// HAProxy's binary: Debian installs it in /usr/sbin, which a user's PATH may lack.
pub fn haproxy_bin() -> &'static str {
    ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("haproxy")
}

/// The HAProxy configuration of the cluster (also in docs/SCALING.md): TCP passthrough, health
/// from `/readyz`, a failed connect sent to another node. `nodes`: (id, address). `tls_ca`:
/// the nodes serve TLS (their certificate checked against this CA); traffic stays end to end,
/// only the health checks speak TLS from HAProxy.
pub fn haproxy_config(listen: &str, nodes: &[(String, String)], tls_ca: Option<&Path>) -> String {
    haproxy_config_balanced(listen, nodes, tls_ca, "leastconn")
}

/// [`haproxy_config`] with another balancing algorithm (`roundrobin`: every new connection to
/// the next node, as the HTTP-fallback test wants).
pub fn haproxy_config_balanced(
    listen: &str,
    nodes: &[(String, String)],
    tls_ca: Option<&Path>,
    balance: &str,
) -> String {
    let check_tls = tls_ca
        .map(|ca| format!(" check-ssl verify required ca-file {}", ca.display()))
        .unwrap_or_default();
    let mut cfg = format!(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 1h\n  timeout server 1h\n  timeout check 1s\n  retries 2\n  option redispatch\n\nfrontend clinics\n  bind {listen}\n  default_backend gateways\n\nbackend gateways\n  balance {balance}\n  option httpchk GET /readyz\n  default-server inter 500ms fall 2 rise 2{check_tls}\n"
    );
    for (id, addr) in nodes {
        cfg.push_str(&format!("  server {id} {addr} check\n"));
    }
    cfg
}

/// Starts HAProxy on `127.0.0.1:port` in front of `nodes` (config and log in `dir`) and waits
/// until it listens. `tls_ca`: see [`haproxy_config`].
pub fn start_haproxy(
    dir: &Path,
    port: u16,
    nodes: &[(String, String)],
    tls_ca: Option<&Path>,
) -> anyhow::Result<Process> {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        haproxy_config(&format!("127.0.0.1:{port}"), nodes, tls_ca),
    )
    .with_context(|| format!("write {}", cfg.display()))?;
    let log = std::fs::File::create(dir.join("haproxy.log"))?;
    let lb = Process(
        Command::new(haproxy_bin())
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context(
                "start haproxy: install Debian's package `haproxy` (apt-get install haproxy)",
            )?,
    );
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "haproxy does not listen on 127.0.0.1:{port} (see {})",
                dir.join("haproxy.log").display()
            );
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
    Ok(lb)
}

/// Starts this binary as gateway node `id` with the configuration `yaml` (written to
/// `dir/<id>/gateway.yaml`), and waits for its "gateway listening on" line.
pub fn start_node(dir: &Path, id: &str, yaml: &str) -> anyhow::Result<Process> {
    let node_dir = dir.join(id);
    std::fs::create_dir_all(&node_dir)?;
    let cfg = node_dir.join("gateway.yaml");
    std::fs::write(&cfg, yaml)?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .current_dir(&node_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start a gateway node")?;
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().context("node stdout")?).read_line(&mut line)?;
    let node = Process(child);
    if !line.starts_with("gateway listening on ") {
        bail!(
            "node {id} did not start: {line:?} (its logs: {})",
            node_dir.display()
        );
    }
    Ok(node)
}

/// Clinic → (acknowledged position, node holding it), as the store's `clinics` table has them.
pub type Owners = BTreeMap<String, (u64, Option<String>)>;

/// The node holding the most clinics, and those clinics with their acknowledged position
/// (`None` when no node holds any).
pub fn busiest(owners: &Owners) -> Option<(String, BTreeMap<String, u64>)> {
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, node) in owners.values() {
        if let Some(n) = node {
            *per_node.entry(n.as_str()).or_default() += 1;
        }
    }
    let node = per_node.iter().max_by_key(|(_, n)| **n)?.0.to_string();
    let held = owners
        .iter()
        .filter(|(_, (_, n))| n.as_deref() == Some(node.as_str()))
        .map(|(id, (acked, _))| (id.clone(), *acked))
        .collect();
    Some((node, held))
}
