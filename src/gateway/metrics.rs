//! Gateway metrics in the Prometheus text format (`GET /metrics`): counters kept here by the
//! sessions, per-clinic gauges read from the registry and the store at scrape time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tether_actors::registry::ClinicLive;

use super::store::ClinicRecord;

/// Upper bounds (seconds) of the ack-latency histogram: batch received → durable.
const ACK_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Counters shared by every session. Lives in `GatewayState` (no statics).
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    pub events_ingested: AtomicU64,
    pub batches_stored: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Upgrades or opens refused by admission control or the Origin allow-list.
    pub handshakes_refused: AtomicU64,
    pub evictions: AtomicU64,
    pub rate_limited: AtomicU64,
    pub sessions_opened: AtomicU64,
    /// Batches refused because another session (on any node) had claimed the clinic since.
    pub sessions_fenced: AtomicU64,
    /// REST calls passed to the node holding their clinic.
    pub rpc_forwarded: AtomicU64,
    /// Sessions closed because their key was revoked or removed from the registry.
    pub sessions_revoked: AtomicU64,
    /// Hellos refused because another database presented the clinic's identity.
    pub duplicate_sources: AtomicU64,
    /// Registry reloads put in force, and reloads refused (a file that does not parse).
    pub registry_reloads: AtomicU64,
    pub registry_reload_failures: AtomicU64,
    /// Certificates issued to clinics (enrolments and renewals).
    pub enrolments: AtomicU64,
    /// HTTP-fallback requests passed to the node holding their channel.
    pub http_forwarded: AtomicU64,
    /// Flagged events counted so far in the store, and the highest event id counted (see
    /// [`GatewayMetrics::count_flagged`]).
    flagged: std::sync::Mutex<(u64, u64)>,
    ack_buckets: [AtomicU64; ACK_BUCKETS.len()],
    ack_count: AtomicU64,
    ack_sum_us: AtomicU64,
}

impl GatewayMetrics {
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// One batch made durable: `events` new rows, `took` from receipt to commit.
    pub fn stored(&self, events: u64, took: Duration) {
        self.add(&self.events_ingested, events);
        self.add(&self.batches_stored, 1);
        let secs = took.as_secs_f64();
        for (b, bound) in self.ack_buckets.iter().zip(ACK_BUCKETS) {
            if secs <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ack_count.fetch_add(1, Ordering::Relaxed);
        self.ack_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Where the running count of flagged events stands: (count, highest id counted).
    pub fn flagged_position(&self) -> (u64, u64) {
        *self.flagged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds what the store found after `from_id` — unless another scrape moved the position
    /// meanwhile (then its answer stands and this one is dropped: nothing is counted twice).
    pub fn count_flagged(&self, from_id: u64, found: u64, through: u64) {
        let mut f = self.flagged.lock().unwrap_or_else(|p| p.into_inner());
        if f.1 == from_id {
            *f = (f.0 + found, through.max(from_id));
        }
    }

    /// The whole exposition: these counters, then per-clinic gauges.
    pub fn render(&self, live: &[ClinicLive], records: &[ClinicRecord], now_ms: u64) -> String {
        let mut out = String::with_capacity(4096 + live.len() * 1024);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "tether_gateway_events_ingested_total",
            "Events made durable (duplicates not counted).",
            get(&self.events_ingested),
        );
        counter(
            "tether_gateway_batches_stored_total",
            "Event batches committed and acknowledged.",
            get(&self.batches_stored),
        );
        counter(
            "tether_gateway_auth_failures_total",
            "Connection attempts refused for their token or certificate.",
            get(&self.auth_failures),
        );
        counter(
            "tether_gateway_handshakes_refused_total",
            "Connection attempts refused by admission control or the Origin allow-list.",
            get(&self.handshakes_refused),
        );
        counter(
            "tether_gateway_evictions_total",
            "Sessions closed by the gateway after three silent heartbeat intervals.",
            get(&self.evictions),
        );
        counter(
            "tether_gateway_rate_limited_total",
            "Sessions closed for exceeding the message rate.",
            get(&self.rate_limited),
        );
        counter(
            "tether_gateway_sessions_opened_total",
            "Agent sessions that completed hello/welcome.",
            get(&self.sessions_opened),
        );
        counter(
            "tether_gateway_sessions_fenced_total",
            "Sessions closed because a newer session, on this node or another, claimed their clinic (their batch stored nothing).",
            get(&self.sessions_fenced),
        );
        counter(
            "tether_gateway_sessions_revoked_total",
            "Sessions closed (1008) because their key was revoked or removed from the clinic registry.",
            get(&self.sessions_revoked),
        );
        counter(
            "tether_gateway_duplicate_source_refusals_total",
            "Hellos refused (4009) because another database than the clinic's presented its identity; see the audit log and the clinic's `refused` in /v1/clinics.",
            get(&self.duplicate_sources),
        );
        counter(
            "tether_gateway_events_flagged_total",
            "Events stored with a problem (a row that failed its entity's schema), in the whole store (every node counts the same rows); list them with GET /v1/events?flagged=true.",
            self.flagged_position().0,
        );
        counter(
            "tether_gateway_registry_reloads_total",
            "Clinic registry changes put in force without a restart.",
            get(&self.registry_reloads),
        );
        counter(
            "tether_gateway_registry_reload_failures_total",
            "Clinic registry reloads refused (the registry in force stays): see error.log for the file.",
            get(&self.registry_reload_failures),
        );
        counter(
            "tether_gateway_enrolments_total",
            "Clinic certificates this node issued: enrolments with a one-time code and key renewals (audit log: clinic_enrolled, key_renewed).",
            get(&self.enrolments),
        );
        counter(
            "tether_gateway_rpc_forwarded_total",
            "REST calls (POST /v1/clinics/{id}/rpc) this node passed to the node holding the clinic's session.",
            get(&self.rpc_forwarded),
        );
        counter(
            "tether_gateway_http_forwarded_total",
            "HTTP-fallback requests (send, poll, close) this node passed to the node holding their channel.",
            get(&self.http_forwarded),
        );
        let name = "tether_gateway_ack_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Batch received to durable and acknowledged.\n# TYPE {name} histogram"
        );
        for (b, bound) in self.ack_buckets.iter().zip(ACK_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", get(b));
        }
        let count = get(&self.ack_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = get(&self.ack_sum_us) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");

        let by_transport = |t: &str| {
            live.iter()
                .filter(|l| l.connected && l.transport.as_deref() == Some(t))
                .count()
        };
        let _ = writeln!(
            out,
            "# HELP tether_gateway_connections Open agent sessions by transport.\n# TYPE tether_gateway_connections gauge"
        );
        for t in ["websocket", "http"] {
            let _ = writeln!(
                out,
                "tether_gateway_connections{{transport=\"{t}\"}} {}",
                by_transport(t)
            );
        }
        let gauges: [(&str, &str); 9] = [
            (
                "tether_clinic_connected",
                "1 while the clinic has a session.",
            ),
            (
                "tether_clinic_lag_events",
                "Events the agent has read from its outbox that the gateway does not hold yet.",
            ),
            (
                "tether_clinic_lag_seconds",
                "Age of the clinic's oldest change not yet acknowledged (0: caught up).",
            ),
            (
                "tether_clinic_backlog_updates",
                "Cloud updates queued for the clinic and not yet answered.",
            ),
            (
                "tether_clinic_acked_seq",
                "The clinic's durable outbox position.",
            ),
            (
                "tether_clinic_heartbeat_age_seconds",
                "Seconds since the clinic's last heartbeat.",
            ),
            (
                "tether_clinic_sessions_total",
                "Sessions since the gateway started.",
            ),
            (
                "tether_clinic_evictions_total",
                "Sessions evicted for silence.",
            ),
            (
                "tether_clinic_agent_restarts_total",
                "Actor restarts the clinic's agent reported since its process started.",
            ),
        ];
        let pending: std::collections::HashMap<&str, u64> = records
            .iter()
            .map(|r| (r.clinic_id.as_str(), r.pending_updates))
            .collect();
        let pending = |id: &str| pending.get(id).copied().unwrap_or(0);
        for (i, (name, help)) in gauges.iter().enumerate() {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for l in live {
                let v: f64 = match i {
                    0 => f64::from(u8::from(l.connected)),
                    1 => l.lag_events as f64,
                    2 => l.lag_ms.unwrap_or(0) as f64 / 1000.0,
                    3 => pending(&l.clinic_id) as f64,
                    4 => l.acked_seq as f64,
                    5 => l
                        .last_heartbeat_ms
                        .map(|t| now_ms.saturating_sub(t) as f64 / 1000.0)
                        .unwrap_or(f64::NAN),
                    6 => l.sessions_total as f64,
                    7 => l.evictions as f64,
                    _ => l.agent_restarts as f64,
                };
                if v.is_nan() {
                    continue;
                }
                let _ = writeln!(out, "{name}{{clinic=\"{}\"}} {v}", l.clinic_id);
            }
        }
        let name = "tether_clinic_info";
        let _ = writeln!(
            out,
            "# HELP {name} The clinic's state (connected, reconnecting, offline) and transport.\n# TYPE {name} gauge"
        );
        for l in live {
            let transport = l.transport.as_deref().unwrap_or("none");
            let _ = writeln!(
                out,
                "{name}{{clinic=\"{}\",state=\"{}\",transport=\"{transport}\"}} 1",
                l.clinic_id, l.state
            );
        }
        out
    }
}
