//! Gateway registry: knows every clinic seen since start — whether a session is connected, its
//! last heartbeat, its acknowledged position and how many updates wait for it — and routes
//! "updates pending" notices to the clinic's live session. A second session for a clinic
//! replaces the first, which is told to close.
//! Takes: `Register`, `Unregister`, `Touch`, `Acked`, `UpdatesPending`, `Snapshot`.
//! Sends: `SessionCommand` to sessions.
//! State: in memory only; the durable truth (positions, updates) is in the gateway store, and
//! sessions re-register when agents reconnect.

use std::collections::BTreeMap;
use std::time::SystemTime;

use actix::prelude::*;

use crate::log_target::CONNECTION;

/// What the registry asks of a session.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum SessionCommand {
    /// A newer connection for the same clinic took over: close.
    Replaced { by_session: String },
    /// New cloud updates were queued for this clinic.
    DeliverUpdates,
    /// The gateway is stopping: finish the store writes in flight (and ack them), take no new
    /// batch, then close with 1001.
    Shutdown,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClinicLive {
    pub clinic_id: String,
    pub connected: bool,
    pub session_id: Option<String>,
    pub remote_addr: Option<String>,
    pub connected_since_ms: Option<u64>,
    pub last_heartbeat_ms: Option<u64>,
    pub acked_seq: u64,
    pub sessions_total: u64,
    /// `websocket` or `http` (the fallback) for the current (or last) session.
    pub transport: Option<String>,
}

struct Entry {
    live: ClinicLive,
    session: Option<Recipient<SessionCommand>>,
}

#[derive(Default)]
pub struct Registry {
    clinics: BTreeMap<String, Entry>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl Registry {
    fn entry(&mut self, clinic: &str) -> &mut Entry {
        self.clinics
            .entry(clinic.to_string())
            .or_insert_with(|| Entry {
                live: ClinicLive {
                    clinic_id: clinic.to_string(),
                    connected: false,
                    session_id: None,
                    remote_addr: None,
                    connected_since_ms: None,
                    last_heartbeat_ms: None,
                    acked_seq: 0,
                    sessions_total: 0,
                    transport: None,
                },
                session: None,
            })
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub clinic_id: String,
    pub session_id: String,
    pub remote_addr: Option<String>,
    pub acked_seq: u64,
    pub session: Recipient<SessionCommand>,
    /// `websocket` or `http`.
    pub transport: &'static str,
}

impl Handler<Register> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Register, _: &mut Self::Context) {
        let e = self.entry(&msg.clinic_id);
        if let (Some(old), Some(old_id)) = (e.session.take(), e.live.session_id.clone()) {
            log::warn!(target: CONNECTION, "clinic={} event=session_replaced old_session={old_id} new_session={}", msg.clinic_id, msg.session_id);
            old.do_send(SessionCommand::Replaced {
                by_session: msg.session_id.clone(),
            });
        }
        let now = now_ms();
        e.session = Some(msg.session);
        e.live.connected = true;
        e.live.session_id = Some(msg.session_id);
        e.live.transport = Some(msg.transport.to_string());
        e.live.remote_addr = msg.remote_addr;
        e.live.connected_since_ms = Some(now);
        e.live.last_heartbeat_ms = Some(now);
        e.live.acked_seq = e.live.acked_seq.max(msg.acked_seq);
        e.live.sessions_total += 1;
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub clinic_id: String,
    pub session_id: String,
}

impl Handler<Unregister> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) {
        if let Some(e) = self.clinics.get_mut(&msg.clinic_id) {
            // Only the current session may mark the clinic offline.
            if e.live.session_id.as_deref() == Some(msg.session_id.as_str()) {
                e.session = None;
                e.live.connected = false;
                e.live.connected_since_ms = None;
            }
        }
    }
}

/// Tells every open session that the gateway is stopping. Answers how many were told.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ShutdownSessions;

impl Handler<ShutdownSessions> for Registry {
    type Result = usize;
    fn handle(&mut self, _: ShutdownSessions, _: &mut Self::Context) -> usize {
        let mut n = 0;
        for e in self.clinics.values() {
            if let Some(s) = &e.session {
                s.do_send(SessionCommand::Shutdown);
                n += 1;
            }
        }
        n
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Touch {
    pub clinic_id: String,
}

impl Handler<Touch> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Touch, _: &mut Self::Context) {
        if let Some(e) = self.clinics.get_mut(&msg.clinic_id) {
            e.live.last_heartbeat_ms = Some(now_ms());
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Acked {
    pub clinic_id: String,
    pub seq: u64,
}

impl Handler<Acked> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Acked, _: &mut Self::Context) {
        let e = self.entry(&msg.clinic_id);
        e.live.acked_seq = e.live.acked_seq.max(msg.seq);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct UpdatesPending {
    pub clinic_id: String,
}

impl Handler<UpdatesPending> for Registry {
    type Result = ();
    fn handle(&mut self, msg: UpdatesPending, _: &mut Self::Context) {
        if let Some(s) = self
            .clinics
            .get(&msg.clinic_id)
            .and_then(|e| e.session.as_ref())
        {
            s.do_send(SessionCommand::DeliverUpdates);
        }
    }
}

#[derive(Message)]
#[rtype(result = "Vec<ClinicLive>")]
pub struct Snapshot;

impl Handler<Snapshot> for Registry {
    type Result = MessageResult<Snapshot>;
    fn handle(&mut self, _: Snapshot, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.clinics.values().map(|e| e.live.clone()).collect())
    }
}
