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

    pub fn total_restarts(&self) -> u64 {
        self.restarts().values().sum()
    }
}
