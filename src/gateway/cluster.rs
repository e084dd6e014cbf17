//! What ties gateway nodes together when several share one store (PostgreSQL): each node's
//! heartbeat row (`gateway_nodes`, shown by `GET /v1/nodes`), cloud updates signalled to
//! whichever node holds the clinic (the store's commit-time notification, plus a periodic
//! sweep in case one is lost), REST calls (`POST /v1/clinics/{id}/rpc`) forwarded to the node
//! that holds the clinic and answered back (a row in the store, signalled both ways on commit),
//! and the view of which node holds each clinic.
//!
//! Ownership itself is the store's: each session's `hello` claims its clinic with a new epoch
//! and appends carry it, so a node whose claim has moved on is fenced (see `gateway_store`).
//! Nothing here elects, balances or queues: the load balancer spreads clinics, PostgreSQL
//! carries state and signals.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use actix::prelude::*;
use actix_web::web;
use serde_json::{Map, Value};
use tether_actors::registry::{Snapshot, UpdatesPending};
use tokio::sync::{mpsc, oneshot};

use super::api::{call_here, CallOutcome};
use super::store::{ForwardedCall, NodeRecord, Signal};
use super::GatewayState;

/// A node is taken for gone when its heartbeat is older than this many intervals.
pub const STALE_BEATS: u32 = 3;

/// Whether `node` beat within [`STALE_BEATS`] intervals of `now_ms`.
pub fn alive(node: &NodeRecord, interval: Duration, now_ms: u64) -> bool {
    now_ms.saturating_sub(node.last_beat_ms) <= (interval * STALE_BEATS).as_millis() as u64
}

/// Calls this node forwarded to another, waiting for their answer (by request id).
#[derive(Default)]
pub struct Forwards(Mutex<HashMap<String, oneshot::Sender<CallOutcome>>>);

impl Forwards {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<CallOutcome>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The time the holding node is given beyond the caller's timeout to say how the call ended.
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// Passes a call to `node`, which holds the clinic's session, through the store, and waits for
/// its outcome. The caller's parameters and the rows stay out of the logs.
pub(super) async fn forward_call(
    state: &GatewayState,
    request_id: &str,
    clinic: &str,
    node: String,
    name: String,
    params: Map<String, Value>,
    timeout: Duration,
) -> CallOutcome {
    let (tx, rx) = oneshot::channel();
    state.forwards.lock().insert(request_id.to_string(), tx);
    let call = ForwardedCall {
        id: request_id.to_string(),
        clinic_id: clinic.to_string(),
        from_node: state.store.node().to_string(),
        to_node: node.clone(),
        name,
        params,
        deadline_ms: crate::security::unix_now_ms() + timeout.as_millis() as u64,
    };
    log::info!(target: "connection", "clinic={clinic} event=rpc_forwarded request_id={request_id} to_node={node}");
    if let Err(e) = state.store.forward_call(call).await {
        state.forwards.lock().remove(request_id);
        return CallOutcome::Failed {
            message: e.to_string(),
        };
    }
    state.metrics.add(&state.metrics.rpc_forwarded, 1);
    match tokio::time::timeout(timeout + ANSWER_MARGIN, rx).await {
        Ok(Ok(outcome)) => outcome,
        _ => {
            state.forwards.lock().remove(request_id);
            if let Err(e) = state.store.drop_call(request_id).await {
                log::warn!(target: "error", "clinic={clinic} event=rpc_forward_cleanup_failed request_id={request_id} error={e}");
            }
            CallOutcome::TimedOut
        }
    }
}

/// A call forwarded to this node: taken (once), run through the clinic's session here, and its
/// outcome stored for the node that forwarded it.
async fn serve_call(state: web::Data<GatewayState>, id: String) {
    let call = match state.store.take_call(&id).await {
        Ok(Some(c)) => c,
        // Taken already, or its caller gave up.
        Ok(None) => return,
        Err(e) => {
            log::warn!(target: "error", "event=rpc_take_failed request_id={id} error={e}");
            return;
        }
    };
    let left = call
        .deadline_ms
        .saturating_sub(crate::security::unix_now_ms());
    let outcome = if left == 0 {
        CallOutcome::TimedOut
    } else {
        call_here(
            &state,
            &call.id,
            &call.clinic_id,
            &call.name,
            call.params,
            Duration::from_millis(left),
        )
        .await
    };
    let text = match serde_json::to_string(&outcome) {
        Ok(t) => t,
        Err(e) => {
            log::error!(target: "error", "clinic={} event=rpc_answer_unencodable request_id={id} error={e}", call.clinic_id);
            return;
        }
    };
    match state.store.answer_call(&id, &text).await {
        Ok(true) => {}
        Ok(false) => {
            log::info!(target: "connection", "clinic={} event=rpc_answer_unclaimed request_id={id} from_node={}", call.clinic_id, call.from_node)
        }
        Err(e) => {
            log::warn!(target: "error", "clinic={} event=rpc_answer_failed request_id={id} error={e}", call.clinic_id)
        }
    }
}

/// The answer to a call this node forwarded: handed to its waiting caller.
async fn take_answer(state: web::Data<GatewayState>, id: String) {
    let outcome = match state.store.call_answer(&id).await {
        Ok(Some(text)) => serde_json::from_str(&text).unwrap_or_else(|e| CallOutcome::Failed {
            message: format!("unreadable answer: {e}"),
        }),
        Ok(None) => return,
        Err(e) => CallOutcome::Failed {
            message: e.to_string(),
        },
    };
    if let Some(tx) = state.forwards.lock().remove(&id) {
        let _ = tx.send(outcome);
    }
}

/// Starts the node's heartbeat, the update sweep and the store listener (where the store has
/// one: updates for clinics held here, calls forwarded here, answers to calls forwarded from
/// here). `addr` is where this node's API listens.
pub fn start(state: web::Data<GatewayState>, addr: String) {
    let (store, registry) = (state.store.clone(), state.registry.clone());
    let interval = state.settings.heartbeat_interval;
    let heard = registry.clone();
    let (calls_tx, mut calls) = mpsc::unbounded_channel::<Signal>();
    let across = store.watch(Box::new(move |signal: Signal| match signal {
        // A full mailbox drops the notice (the sweep finds the update); a stopped registry
        // ends the listener.
        Signal::Updates(clinic) => !matches!(
            heard.try_send(UpdatesPending { clinic_id: clinic }),
            Err(SendError::Closed(_))
        ),
        other => calls_tx.send(other).is_ok(),
    }));
    let on_calls = state.clone();
    actix::spawn(async move {
        while let Some(signal) = calls.recv().await {
            let state = on_calls.clone();
            match signal {
                Signal::Call(id) => actix::spawn(serve_call(state, id)),
                Signal::Answer(id) => actix::spawn(take_answer(state, id)),
                Signal::Registry(_) => actix::spawn(super::clinic_registry::on_signal(state)),
                Signal::UpChannel => {
                    super::channels::up_stored(&state);
                    continue;
                }
                Signal::Updates(_) => continue,
            };
        }
    });
    let started_at = super::store::iso_from_millis(crate::security::unix_now_ms() as i64);
    log::info!(target: "connection", "event=node_started node={} addr={addr} updates_signalled={}", store.node(), if across { "notify" } else { "in_process" });
    let beat = state
        .tasks
        .register("node_heartbeat", interval * STALE_BEATS);
    let sweep_state = state.clone();
    actix::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let live = match registry.send(Snapshot).await {
                Ok(l) => l,
                // The registry has stopped: the gateway is going away.
                Err(_) => return,
            };
            let sessions = live.iter().filter(|l| l.connected).count() as u64;
            match store.node_beat(&addr, &started_at, sessions).await {
                Ok(()) => {
                    beat.beat();
                    if failing {
                        log::warn!(target: "connection", "event=node_heartbeat_back node={}", store.node());
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        log::error!(target: "error", "event=node_heartbeat_failed node={} error={e}", store.node());
                        failing = true;
                    }
                    continue;
                }
            }
            // The sweep: any clinic with open updates is nudged; only a node holding its
            // session acts on it (one cheap read when nothing new is queued).
            if let Ok(records) = store.clinics().await {
                for r in records.into_iter().filter(|r| r.pending_updates > 0) {
                    registry.do_send(UpdatesPending {
                        clinic_id: r.clinic_id,
                    });
                }
            }
            super::channels::sweep(&sweep_state).await;
        }
    });
}
