//! `tether bench ingest --gateway wss://…`: the ingest load client on its own, in this process,
//! against a gateway running as another process (Tether, or any peer speaking the protocol, such
//! as the Node.js baseline under `bench/peers/`). The numbers are then the gateway's alone: the
//! client shares no runtime with it, and the gateway's CPU is read from `/proc/<pid>/stat`.
//!
//! Each clinic connects (TLS and an RS256 token signed with its key from `--certs`, as an agent
//! does), sends `hello`, and pushes its events in batches of `--batch` with at most `--inflight`
//! batches unacknowledged (the agent's defaults: 500 and 4). Events are ~305 bytes, like the
//! issue's load. The run ends when every event is acknowledged; only acknowledged events count.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use awc::ws::{self, Frame};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use crate::security::crypto::{DataKeys, FieldCipher};
use crate::security::jwt::TokenSigner;
use crate::security::tls::{self, ClientTls};

/// What the remote ingest run needs.
#[derive(Debug, Clone)]
pub struct RemoteIngest {
    /// `ws://` or `wss://…/v1/ws`.
    pub url: String,
    /// A `tether keys dev-setup` directory: `ca.pem` and one `<clinic>.key` per clinic (token
    /// signing key, kid `<clinic>-1`). Without it: no TLS trust anchor and no token.
    pub certs: Option<PathBuf>,
    /// The gateway's id (the tokens' audience).
    pub audience: String,
    /// Clinic ids are `<prefix>NNN`, as `dev-setup --clinics` made them.
    pub prefix: String,
    pub clinics: usize,
    pub events_per_clinic: u64,
    pub batch: usize,
    pub inflight: usize,
    /// The gateway's process id: its CPU-seconds and RSS are reported when given.
    pub server_pid: Option<u32>,
    /// Encrypt each row's `notes` with `<certs>/dk1.key` (kid `dk1`), as an agent with field
    /// encryption does, so that a gateway holding the key decrypts every event.
    pub encrypt: bool,
}

impl RemoteIngest {
    /// TLS trusting `<certs>/ca.pem` for a `wss://` gateway.
    fn connector(&self) -> anyhow::Result<Option<openssl::ssl::SslConnector>> {
        Ok(match &self.certs {
            Some(dir) if self.url.starts_with("wss://") => Some(tls::connector(&ClientTls {
                ca: Some(dir.join("ca.pem")),
                ..ClientTls::default()
            })?),
            _ => None,
        })
    }

    /// A connection token for `clinic`, signed with `<certs>/<clinic>.key` (kid `<clinic>-1`).
    fn token(&self, clinic: &str) -> anyhow::Result<Option<String>> {
        let Some(dir) = &self.certs else {
            return Ok(None);
        };
        let signer = TokenSigner::from_pem_file(
            &dir.join(format!("{clinic}.key")),
            clinic,
            &self.audience,
            &format!("{clinic}-1"),
            Duration::from_secs(300),
        )?;
        Ok(Some(signer.sign()?))
    }
}

/// Encrypts the `notes` of appointment rows for one clinic.
struct Sealer {
    cipher: FieldCipher,
    clinic: String,
}

impl Sealer {
    fn seal(&self, text: &str, out: &mut String) -> anyhow::Result<()> {
        let mut e: tether_schemas::Event = serde_json::from_str(text)?;
        self.cipher.encrypt_event(&self.clinic, &mut e)?;
        out.push_str(&serde_json::to_string(&e)?);
        Ok(())
    }
}

/// The same ~305-byte appointment event for every sequence (the key and the ids vary).
fn push_event(out: &mut String, seq: u64, clinic_no: usize) {
    let _ = write!(
        out,
        r#"{{"seq":{seq},"entity":"appointment","op":"insert","key":{{"id":{seq}}},"row":{{"id":{seq},"patient_id":{pid},"practitioner_id":{prac},"status":"booked","starts_at":"2026-12-01T09:30:00Z","ends_at":"2026-12-01T10:00:00Z","room":"R-{room:02}","notes":"follow-up, bring results"}},"committed_at":"2026-12-01T09:00:00.000Z"}}"#,
        pid = 100_000 + (seq * 7 + clinic_no as u64) % 90_000,
        prac = 1 + seq % 40,
        room = seq % 12,
    );
}

fn batch_frame(
    prev: u64,
    n: u64,
    clinic_no: usize,
    head: u64,
    sealer: Option<&Sealer>,
) -> anyhow::Result<String> {
    let mut s = String::with_capacity(64 + n as usize * 400);
    let _ = write!(s, r#"{{"v":1,"type":"events","prev_seq":{prev},"events":["#);
    let mut one = String::new();
    for seq in prev + 1..=prev + n {
        if seq > prev + 1 {
            s.push(',');
        }
        match sealer {
            None => push_event(&mut s, seq, clinic_no),
            Some(sealer) => {
                one.clear();
                push_event(&mut one, seq, clinic_no);
                sealer.seal(&one, &mut s)?;
            }
        }
    }
    let _ = write!(s, r#"],"head_seq":{head}}}"#);
    Ok(s)
}

/// Bytes of one event on the wire (for the report).
pub fn event_bytes() -> usize {
    let mut s = String::new();
    push_event(&mut s, 123_456, 7);
    s.len()
}

/// When the load started (every clinic welcomed): the clock and the CPU counters.
#[derive(Clone, Copy)]
struct Start {
    at: Instant,
    client_cpu: f64,
    server_cpu: f64,
}

type Ready = Arc<(tokio::sync::Barrier, std::sync::OnceLock<Start>)>;

async fn one_clinic(
    r: Arc<RemoteIngest>,
    http: awc::Client,
    (clinic_no, token): (usize, Option<String>),
    acked_total: Arc<AtomicU64>,
    ready: Ready,
) -> anyhow::Result<()> {
    let clinic = format!("{}{clinic_no:03}", r.prefix);
    let mut req = http.ws(r.url.as_str()).max_frame_size(4 << 20);
    if let Some(t) = &token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let (_, mut link) = req
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{clinic}: connect {}: {e}", r.url))?;
    let hello = json!({"v": 1, "type": "hello", "clinic_id": clinic, "agent_version": "bench",
        "last_acked_seq": 0, "source_id": 1 + clinic_no as u64});
    link.send(ws::Message::Text(hello.to_string().into()))
        .await
        .context("send hello")?;
    let sealer = match (&r.certs, r.encrypt) {
        (Some(dir), true) => {
            let mut keys = DataKeys::default();
            keys.add_file("dk1", &dir.join("dk1.key"))?;
            keys.set_active("dk1")?;
            let fields = [("appointment".to_string(), vec!["notes".to_string()])];
            Some(Sealer {
                cipher: FieldCipher::new(keys, fields.into_iter().collect()),
                clinic: clinic.clone(),
            })
        }
        (None, true) => anyhow::bail!("--encrypt needs --certs (dk1.key)"),
        _ => None,
    };
    let total = r.events_per_clinic;
    let batch = r.batch as u64;
    let mut sent = None::<u64>;
    let mut acked = 0u64;
    // Every clinic connects and is welcomed first; then all push at once (the measured part).
    let mut welcomed = false;
    loop {
        if sent.is_some() && !welcomed {
            welcomed = true;
            if ready.0.wait().await.is_leader() {
                let _ = ready.1.set(Start {
                    at: Instant::now(),
                    client_cpu: super::bench::cpu_seconds(std::process::id()),
                    server_cpu: proc_cpu_s(r.server_pid),
                });
            }
        }
        // Keep `inflight` batches unacknowledged once welcomed.
        if let Some(s) = sent.as_mut() {
            while *s < total && *s - acked < batch * r.inflight as u64 {
                let n = batch.min(total - *s);
                let frame = batch_frame(*s, n, clinic_no, total, sealer.as_ref())?;
                link.send(ws::Message::Text(frame.into()))
                    .await
                    .with_context(|| format!("{clinic}: send events"))?;
                *s += n;
            }
        }
        if acked >= total {
            let _ = link.close().await;
            return Ok(());
        }
        let item = link
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("{clinic}: the gateway closed the link"))?;
        match item.with_context(|| format!("{clinic}: read"))? {
            Frame::Text(t) => {
                let v: Value = serde_json::from_slice(&t)
                    .with_context(|| format!("{clinic}: a frame that is not JSON"))?;
                match v["type"].as_str() {
                    Some("welcome") => {
                        acked = v["acked_seq"].as_u64().unwrap_or(0);
                        sent = Some(acked);
                    }
                    Some("ack") => {
                        let a = v["seq"].as_u64().unwrap_or(0);
                        if a > acked {
                            acked_total.fetch_add(a - acked, Ordering::Relaxed);
                            acked = a;
                        }
                    }
                    Some("error") => anyhow::bail!("{clinic}: the gateway answered {v}"),
                    _ => {}
                }
            }
            Frame::Ping(b) => {
                let _ = link.send(ws::Message::Pong(b)).await;
            }
            Frame::Close(c) => anyhow::bail!("{clinic}: closed by the gateway: {c:?}"),
            _ => {}
        }
    }
}

fn proc_cpu_s(pid: Option<u32>) -> f64 {
    pid.map(super::bench::cpu_seconds).unwrap_or(0.0)
}

/// Runs the load and reports acknowledged events/s, the client's and (with `server_pid`) the
/// gateway's CPU-seconds per 100,000 events.
pub async fn ingest(r: RemoteIngest) -> anyhow::Result<Value> {
    let connector = r.connector()?;
    let http = crate::loadgen::http_client(connector.as_ref());
    let tokens = (0..r.clinics)
        .map(|i| r.token(&format!("{}{i:03}", r.prefix)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let acked = Arc::new(AtomicU64::new(0));
    let r = Arc::new(r);
    let me = std::process::id();
    let ready: Ready = Arc::new((
        tokio::sync::Barrier::new(r.clinics),
        std::sync::OnceLock::new(),
    ));
    // The gateway's peak RSS, sampled while the load runs.
    let peak_kb = Arc::new(AtomicU64::new(0));
    let sampler = r.server_pid.map(|pid| {
        let peak = peak_kb.clone();
        actix::spawn(async move {
            loop {
                peak.fetch_max(
                    crate::loadgen::rss_kb_of(&pid.to_string()),
                    Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let tasks = tokens.into_iter().enumerate().map(|it| {
        let task = actix::spawn(one_clinic(
            r.clone(),
            http.clone(),
            it,
            acked.clone(),
            ready.clone(),
        ));
        async move { task.await.map_err(anyhow::Error::from).and_then(|r| r) }
    });
    // The first failure ends the run (the others would wait for it at the start line).
    let done = futures_util::future::try_join_all(tasks).await;
    if let Some(s) = sampler {
        s.abort();
    }
    done.with_context(|| format!("one of {} clinics failed", r.clinics))?;
    let start = ready
        .1
        .get()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("the clinics never all got a welcome"))?;
    let secs = start.at.elapsed().as_secs_f64();
    let events = acked.load(Ordering::Relaxed);
    let per100k = |cpu: f64| (cpu * 100_000.0 / events.max(1) as f64 * 1000.0).round() / 1000.0;
    let server_cpu = proc_cpu_s(r.server_pid) - start.server_cpu;
    Ok(
        json!({"scenario": "ingest", "gateway": r.url, "clinics": r.clinics, "events": events,
        "event_bytes": event_bytes(), "batch": r.batch, "inflight": r.inflight,
        "seconds": (secs * 100.0).round() / 100.0, "events_per_s": (events as f64 / secs).round(),
        "server_cpu_s_per_100k": r.server_pid.map(|_| per100k(server_cpu)),
        "server_peak_rss_mb": r.server_pid.map(|_| peak_kb.load(Ordering::Relaxed) / 1024),
        "client_cpu_s_per_100k": per100k(super::bench::cpu_seconds(me) - start.client_cpu),
        "machine": super::bench::machine()}),
    )
}

/// `tether bench latency --gateway …`: `clinics` protocol clients × 2 events/s (one event per
/// frame), each send timed to its durable ack, for `secs` once every client is up. The gateway
/// is another process; its CPU over the window is reported with `server_pid`.
pub async fn latency(r: RemoteIngest, secs: u64) -> anyhow::Result<Value> {
    use crate::loadgen::{run_client, ClientSpec, Swarm};
    let connector = r.connector()?;
    let http = crate::loadgen::http_client(connector.as_ref());
    let swarm = Arc::new(Swarm::default());
    for i in 0..r.clinics {
        let clinic = format!("{}{i:03}", r.prefix);
        let headers = r
            .token(&clinic)?
            .map(|t| vec![("Authorization".to_string(), format!("Bearer {t}"))])
            .unwrap_or_default();
        let spec = ClientSpec {
            url: r.url.clone(),
            clinic_id: clinic,
            tls: connector.clone(),
            headers,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(10),
            events_per_s: 2.0,
            legacy_backoff: false,
            silence_limit: None,
        };
        actix::spawn(run_client(spec, http.clone(), swarm.clone()));
    }
    super::bench::wait_up(&swarm, r.clinics, Duration::from_secs(120)).await?;
    swarm.clear_latencies();
    let srv0 = proc_cpu_s(r.server_pid);
    // The measurement window itself: the clients run on their own meanwhile.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let server_cpu = proc_cpu_s(r.server_pid) - srv0;
    let l = swarm.stop_with_latencies();
    let pct = |q| super::bench::percentile(&l, q);
    Ok(
        json!({"scenario": "latency", "gateway": r.url, "clinics": r.clinics,
        "events_per_clinic_per_s": 2, "seconds": secs, "acked": l.len(),
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
        "server_cpu_share": r.server_pid.map(|_| (server_cpu / secs.max(1) as f64 * 1000.0).round() / 1000.0),
        "failures": Swarm::get(&swarm.failures), "machine": super::bench::machine()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_is_a_valid_events_frame_of_305_byte_events() {
        let f = batch_frame(1000, 3, 4, 5000, None).expect("frame");
        let Ok(tether_schemas::Inbound::Events(ev)) = tether_schemas::decode_inbound(&f, 1 << 20)
        else {
            panic!("not an events frame: {f}")
        };
        assert_eq!(ev.prev_seq, 1000);
        let seqs: Vec<u64> = ev.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1001, 1002, 1003]);
        assert!((290..=320).contains(&event_bytes()), "{}", event_bytes());
    }

    /// Against a real gateway (in this process, for the test): every event is acknowledged and
    /// stored, and the client counts only what was acknowledged.
    #[test]
    fn the_client_pushes_everything_and_counts_only_acknowledged_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let system = actix::System::new();
        let (report, stored) = system.block_on(async {
            let gw = crate::gateway::start(
                crate::bench::settings(dir.path(), "127.0.0.1:0"),
                crate::gateway::GatewaySecurity::insecure(),
            )
            .expect("gateway");
            let report = ingest(RemoteIngest {
                url: gw.ws_url(),
                certs: None,
                audience: "gw-bench".into(),
                prefix: "c-".into(),
                clinics: 3,
                events_per_clinic: 1_234,
                batch: 100,
                inflight: 4,
                server_pid: Some(std::process::id()),
                encrypt: false,
            })
            .await
            .expect("ingest");
            let mut stored = Vec::new();
            for c in ["c-000", "c-001", "c-002"] {
                let rec = gw.store.clinic(c).await.expect("read").expect("clinic");
                stored.push((rec.acked_seq, rec.events));
            }
            gw.stop().await;
            (report, stored)
        });
        assert_eq!(report["events"], 3 * 1_234, "{report}");
        assert_eq!(stored, vec![(1_234, 1_234); 3]);
        assert!(
            report["server_cpu_s_per_100k"].as_f64().is_some(),
            "{report}"
        );
    }

    #[test]
    fn encrypted_load_carries_ciphertext_the_gateway_key_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::security::keys::write_data_key(&dir.path().join("dk1.key")).expect("key");
        let mut keys = DataKeys::default();
        keys.add_file("dk1", &dir.path().join("dk1.key"))
            .expect("add");
        keys.set_active("dk1").expect("active");
        let fields = [("appointment".to_string(), vec!["notes".to_string()])];
        let cipher = FieldCipher::new(keys, fields.into_iter().collect());
        let sealer = Sealer {
            cipher: cipher.clone(),
            clinic: "c-001".into(),
        };
        let f = batch_frame(0, 2, 1, 2, Some(&sealer)).expect("frame");
        assert!(
            !f.contains("bring results") && f.contains("enc:v1:dk1:"),
            "{f}"
        );
        let Ok(tether_schemas::Inbound::Events(mut ev)) =
            tether_schemas::decode_inbound(&f, 1 << 20)
        else {
            panic!("events")
        };
        assert_eq!(
            cipher
                .decrypt_raw("c-001", &mut ev.events[0])
                .expect("opens"),
            1
        );
        let row = ev.events[0].row.as_deref().map(|r| r.get()).unwrap_or("");
        assert!(row.contains("follow-up, bring results"), "{row}");
        assert!(
            cipher.decrypt_raw("c-002", &mut ev.events[1]).is_err(),
            "bound to its clinic"
        );
    }
}
