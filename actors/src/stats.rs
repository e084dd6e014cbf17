//! Counters an agent exposes (status, demo summary, later metrics). Shared, lock-free.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct AgentStats {
    pub connected: AtomicBool,
    /// Reconnect attempts scheduled (failed attempts included).
    pub reconnects: AtomicU64,
    /// Links that completed hello/welcome.
    pub links_up: AtomicU64,
    pub connects: AtomicU64,
    pub events_enqueued: AtomicU64,
    pub events_sent: AtomicU64,
    pub acked_seq: AtomicU64,
    pub batches_acked: AtomicU64,
    pub updates_applied: AtomicU64,
    pub updates_failed: AtomicU64,
    pub heartbeat_misses: AtomicU64,
    /// The current (or last) link is the HTTP fallback, not a WebSocket.
    pub on_http: AtomicBool,
    /// Switches from WebSocket to the HTTP fallback.
    pub fallbacks: AtomicU64,
    restarts: Mutex<BTreeMap<String, u64>>,
    /// Why the gateway last refused this agent (cleared when a link comes up).
    refusal: Mutex<Option<Refusal>>,
}

/// The gateway refused a connection attempt, and said why (or the address is wrong).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// The HTTP status of the refused upgrade.
    pub status: u16,
    /// The gateway's coarse reason (`unknown_key_id`, `key_revoked`, `token_expired`, …), or
    /// `not_found` (no WebSocket endpoint at the configured URL).
    pub reason: String,
    /// Gateway clock minus ours, measured on the refusal (when the gateway said its time).
    pub clock_offset_ms: Option<i64>,
    pub at_ms: u64,
}

impl Refusal {
    /// A 401 as the gateway explains it: the reason from `WWW-Authenticate`'s
    /// `error_description`, and the clock offset from `Tether-Time` against the middle of the
    /// request (`sent_ms`, `got_ms`: our wall clock around it).
    pub fn from_answer(
        status: u16,
        www_authenticate: Option<&str>,
        tether_time: Option<&str>,
        sent_ms: u64,
        got_ms: u64,
    ) -> Refusal {
        Refusal {
            status,
            reason: www_authenticate
                .and_then(|h| crate::connection::auth_param(h, "error_description"))
                .unwrap_or_else(|| "unauthorized".to_string()),
            clock_offset_ms: tether_time
                .and_then(|t| t.trim().parse::<i64>().ok())
                .map(|t| t - ((sent_ms + got_ms) / 2) as i64),
            at_ms: got_ms,
        }
    }

    /// What to do about it, in words.
    pub fn advice(&self) -> &'static str {
        match self.reason.as_str() {
            "not_found" => "no WebSocket endpoint at agent.gateway.url: check the URL (it ends in /v1/ws)",
            "unknown_key_id" => "the gateway's registry has no key agent.gateway.auth.kid: ask the operator to enrol this clinic",
            "key_revoked" => "this clinic's key was revoked: ask the operator",
            "duplicate_source" => "another database already syncs as this clinic: stop the other agent, or, if this database replaces it (a re-install), ask the operator to confirm (POST /v1/clinics/{id}/source-reset)",
            "token_expired" | "token_not_yet_valid" | "token_lifetime_too_long" => {
                "check this PC's clock (see the offset)"
            }
            "wrong_audience" => "agent.gateway.auth.audience does not name this gateway",
            "clinic_not_allowed_for_key" | "clinic_not_allowed_for_certificate" => {
                "clinic_id does not match the key or certificate the gateway holds for it"
            }
            "client_certificate_required" => "the gateway requires a client certificate (agent.gateway.tls.cert/key)",
            _ => "see the gateway's audit log",
        }
    }
}

impl AgentStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn record_restart(&self, actor: &str) -> u64 {
        let mut map = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(actor.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    pub fn restarts(&self) -> BTreeMap<String, u64> {
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_refusal(&self, r: Option<Refusal>) {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn total_restarts(&self) -> u64 {
        self.restarts().values().sum()
    }
}
