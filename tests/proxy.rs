//! The agent behind an HTTP CONNECT proxy: a real `tinyproxy` (Debian's package; `.ci/run`
//! installs it) between a real agent process and a real gateway process. Direct, through the
//! proxy (config and environment), with Basic authentication (right and wrong), with the proxy
//! killed mid-stream and started again — each ending with the history check.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::procs::*;
use tether::fleet::Fleet;

const TINYPROXY: &str = "/usr/bin/tinyproxy";

/// Starts tinyproxy on 127.0.0.1:`port` (with Basic auth when given) and waits until it listens.
fn start_proxy(dir: &Path, port: u16, auth: Option<(&str, &str)>) -> Proc {
    assert!(
        Path::new(TINYPROXY).exists(),
        "{TINYPROXY} is missing: `apt-get install tinyproxy` (.ci/run does)"
    );
    let conf = dir.join(format!("tinyproxy-{port}.conf"));
    let mut text = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 50\nLogLevel Connect\nLogFile \"{}\"\nDisableViaHeader Yes\n",
        proxy_log(dir).display()
    );
    if let Some((u, p)) = auth {
        text.push_str(&format!("BasicAuth {u} {p}\n"));
    }
    std::fs::write(&conf, text).expect("proxy config");
    let child = Command::new(TINYPROXY)
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tinyproxy");
    let p = Proc(child);
    wait_for("tinyproxy to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

fn proxy_log(dir: &Path) -> PathBuf {
    dir.join("tinyproxy.log")
}

fn tunnels(dir: &Path) -> usize {
    std::fs::read_to_string(proxy_log(dir))
        .unwrap_or_default()
        .matches("Request (file descriptor")
        .count()
}

fn agent_log(dir: &Path, category: &str) -> String {
    common::log_text(&dir.join("logs-agent"), category)
}

fn spawn_agent(s: &Site, gateway_extra: &str, env: &[(&str, &str)]) -> Proc {
    let cfg = agent_config_with(
        s.dir.path(),
        &format!("ws://{}/v1/ws", s.addr),
        gateway_extra,
    );
    let mut cmd = Command::new(BIN);
    cmd.args(["agent", "--config"])
        .arg(&cfg)
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().expect("spawn agent"))
}

/// Writes for a while, then drains and checks the history.
fn sync_and_check(s: &mut Site, agent: &mut Proc) {
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(s.db.clone(), stop.clone());
    wait_for("acknowledgements", Duration::from_secs(20), || {
        acked(s.dir.path()) > 200
    });
    stop_and_drain(s.dir.path(), &s.db, &stop, w);
    agent.kill();
    s.gw.kill();
    final_check(s.dir.path());
}

#[test]
fn syncs_through_the_configured_proxy() {
    let mut s = site();
    let port = free_port();
    let _proxy = start_proxy(s.dir.path(), port, None);
    let mut agent = spawn_agent(
        &s,
        &format!("    proxy:\n      url: http://127.0.0.1:{port}\n"),
        &[],
    );
    sync_and_check(&mut s, &mut agent);
    assert!(
        tunnels(s.dir.path()) >= 1,
        "the link went through the proxy"
    );
    let sup = agent_log(s.dir.path(), "supervisor");
    assert!(
        sup.contains(&format!("proxy=http://127.0.0.1:{port}")),
        "the agent says which path it uses:\n{sup}"
    );
}

#[test]
fn honours_http_proxy_and_no_proxy_from_the_environment() {
    let mut s = site();
    let port = free_port();
    let _proxy = start_proxy(s.dir.path(), port, None);
    // NO_PROXY covers the gateway: direct, the proxy sees nothing.
    let url = format!("http://127.0.0.1:{port}");
    let mut direct = spawn_agent(
        &s,
        "",
        &[("HTTP_PROXY", &url), ("NO_PROXY", "localhost,127.0.0.1")],
    );
    wait_for("the direct connection", Duration::from_secs(20), || {
        agent_log(s.dir.path(), "connection").contains("event=connected")
    });
    direct.kill();
    assert_eq!(tunnels(s.dir.path()), 0, "NO_PROXY: no tunnel");
    let mut agent = spawn_agent(&s, "", &[("HTTP_PROXY", &url)]);
    sync_and_check(&mut s, &mut agent);
    assert!(tunnels(s.dir.path()) >= 1, "HTTP_PROXY: through the proxy");
}

#[test]
fn authenticates_to_the_proxy_and_says_so_when_refused_without_logging_the_password() {
    let mut s = site();
    let port = free_port();
    let _proxy = start_proxy(s.dir.path(), port, Some(("clinicuser", "Pr0xyPass")));
    let wrong = s.dir.path().join("wrong.txt");
    std::fs::write(&wrong, "Wr0ngPass\n").expect("write");
    let mut refused = spawn_agent(
        &s,
        &format!(
            "    proxy:\n      url: http://127.0.0.1:{port}\n      username: clinicuser\n      password_file: {}\n",
            wrong.display()
        ),
        &[],
    );
    wait_for("the refusal in the log", Duration::from_secs(20), || {
        agent_log(s.dir.path(), "connection").contains("requires authentication")
    });
    refused.kill();
    let log = agent_log(s.dir.path(), "connection");
    assert!(
        log.contains("the configured credentials were refused"),
        "{log}"
    );
    let mut agent = spawn_agent(
        &s,
        &format!("    proxy:\n      url: http://127.0.0.1:{port}\n      username: clinicuser\n      password_env: TETHER_TEST_PROXY_PASSWORD\n"),
        &[("TETHER_TEST_PROXY_PASSWORD", "Pr0xyPass")],
    );
    sync_and_check(&mut s, &mut agent);
    for category in ["connection", "supervisor", "error", "message", "audit"] {
        let text = agent_log(s.dir.path(), category);
        for secret in ["Pr0xyPass", "Wr0ngPass", "UHIweHlQYXNz"] {
            assert!(!text.contains(secret), "{category}.log leaks a credential");
        }
    }
}

#[test]
fn proxy_killed_mid_stream_then_back_loses_nothing() {
    let mut s = site();
    let port = free_port();
    let mut proxy = start_proxy(s.dir.path(), port, None);
    let mut agent = spawn_agent(
        &s,
        &format!("    proxy:\n      url: http://127.0.0.1:{port}\n"),
        &[],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(s.db.clone(), stop.clone());
    wait_for("acknowledgements", Duration::from_secs(20), || {
        acked(s.dir.path()) > 200
    });
    proxy.kill();
    let at_kill = acked(s.dir.path());
    wait_for("the agent to notice", Duration::from_secs(20), || {
        agent_log(s.dir.path(), "connection").contains("unreachable")
    });
    let log = agent_log(s.dir.path(), "connection");
    assert!(
        log.contains(&format!("proxy http://127.0.0.1:{port} unreachable")),
        "the error names the hop:\n{log}"
    );
    let _proxy = start_proxy(s.dir.path(), port, None);
    wait_for(
        "progress through the restarted proxy",
        Duration::from_secs(30),
        || acked(s.dir.path()) > at_kill + 200,
    );
    stop_and_drain(s.dir.path(), &s.db, &stop, w);
    agent.kill();
    s.gw.kill();
    final_check(s.dir.path());
}

/// The production path inside the tunnel: mutual TLS, clinic tokens and field encryption
/// (an in-process secure fleet), the proxy seeing only CONNECT.
#[actix_rt::test]
async fn mutual_tls_tokens_and_encryption_run_inside_the_tunnel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _proxy = start_proxy(dir.path(), port, None);
    let mut fleet = Fleet::new(dir.path(), 1, Duration::from_millis(500)).expect("fleet");
    assert!(fleet.clinics[0].config.gateway.url.starts_with("wss://"));
    fleet.clinics[0].config.gateway.proxy = Some(tether::config::ProxyConfig::new(format!(
        "http://127.0.0.1:{port}"
    )));
    fleet.start_agents().await.expect("agents");
    common::write_activity(&fleet.clinics[0].db, 60);
    common::wait_drained(&fleet, Duration::from_secs(30)).await;
    common::assert_history_clean(&fleet, &[]);
    assert!(
        tunnels(dir.path()) >= 1,
        "the TLS link went through the proxy"
    );
    fleet.stop().await;
}

/// A clinic that reaches the gateway only through its proxy enrols and renews through it: the
/// enrolment request and the renewal (with its retirement) each go through a CONNECT tunnel.
#[actix_rt::test]
async fn enrolment_and_renewal_go_through_the_proxy() {
    use serde_json::json;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _proxy = start_proxy(dir.path(), port, None);
    let fleet = Fleet::new(dir.path(), 1, Duration::from_millis(500)).expect("fleet");
    let certs = fleet.certs.clone().expect("certs");
    let (status, issued) = common::post_as(
        Some(&fleet),
        &format!(
            "{}/v1/registry/clinics/clinic-px/enrolment-codes",
            fleet.http_url()
        ),
        &json!({}),
    )
    .await;
    assert_eq!(status, 201, "{issued}");
    let pc = dir.path().join("pc");
    std::fs::create_dir_all(&pc).expect("pc");
    tether::fleet::create_sample_clinic(&pc.join("clinic.db")).expect("db");
    let proxy_url = format!("http://127.0.0.1:{port}");
    let gateway = fleet.gateway.as_ref().expect("gateway").ws_url();
    let before = tunnels(dir.path());
    let done = tether::enrol::enrol(&tether::enrol::EnrolRequest {
        gateway: gateway.clone(),
        code: issued["code"].as_str().expect("code").to_string(),
        config: pc.join("config.yaml"),
        ca: Some(certs.join("ca.pem")),
        force: false,
        bits: 2048,
        timeout: Duration::from_secs(10),
        proxy: tether::enrol::proxy_for(&gateway, Some(&proxy_url)).expect("proxy"),
    })
    .await
    .expect("enrol through the proxy");
    assert_eq!(done.clinic_id, "clinic-px");
    let after_enrol = tunnels(dir.path());
    assert!(after_enrol > before, "the enrolment went through the proxy");
    let mut cfg = tether::config::Config::load(&pc.join("config.yaml"))
        .expect("config")
        .agent
        .expect("agent");
    cfg.gateway.proxy = Some(tether::config::ProxyConfig::new(proxy_url));
    let renewed = tether::enrol::renew(&cfg, 2048).await.expect("renew");
    assert!(renewed.retired, "the old key was retired through the proxy");
    assert_ne!(renewed.new_kid, done.kid);
    assert!(
        tunnels(dir.path()) >= after_enrol + 2,
        "renewal and retirement went through the proxy"
    );
    fleet.stop().await;
}
