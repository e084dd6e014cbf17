//! Inbound applier: applies cloud `update`s to the clinic database, one at a time and in the
//! order they arrive, through the [`ChangeSink`] port (which writes the row and the inbox record
//! in one transaction and suppresses the echo).
//! Takes: `Apply` (replies with the outcome). Sends: nothing.
//! State: none in memory. On restart it reloads nothing: the inbox in the clinic database is the
//! record of what was applied, so a redelivered update is recognised there.

use std::sync::Arc;

use actix::prelude::*;
use tether_schemas::{Update, UpdateStatus};

use crate::agent::blocking;
use crate::log_target::MESSAGE;
use crate::ports::{ApplyOutcome, ChangeSink, PortError};
use crate::stats::AgentStats;
use crate::supervisor::ExitGuard;

pub struct Applier {
    /// Tells the supervisor when this actor ends (its `Drop`).
    guard: ExitGuard,
    sink: Arc<dyn ChangeSink>,
    stats: Arc<AgentStats>,
}

impl Applier {
    pub fn new(guard: ExitGuard, sink: Arc<dyn ChangeSink>, stats: Arc<AgentStats>) -> Self {
        Applier { guard, sink, stats }
    }
}

impl Actor for Applier {
    type Context = Context<Self>;
}

/// Apply one update. `Err` means the database could not be reached: try again later.
#[derive(Message)]
#[rtype(result = "Result<ApplyOutcome, PortError>")]
pub struct Apply(pub Update);

impl Handler<Apply> for Applier {
    type Result = AtomicResponse<Self, Result<ApplyOutcome, PortError>>;

    fn handle(&mut self, msg: Apply, _: &mut Self::Context) -> Self::Result {
        let sink = self.sink.clone();
        let update = msg.0;
        AtomicResponse::new(Box::pin(
            async move {
                let id = update.update_id.clone();
                let entity = update.entity.clone();
                (id, entity, blocking(move || sink.apply(&update)).await)
            }
            .into_actor(self)
            .map(|(id, entity, res), act, _| {
                match &res {
                    Ok(out) if out.status == UpdateStatus::Applied => {
                        if !out.duplicate {
                            AgentStats::add(&act.stats.updates_applied, 1);
                        }
                        log::info!(target: MESSAGE, "event=update_applied update_id={id} entity={entity} duplicate={}", out.duplicate);
                    }
                    Ok(out) => {
                        if !out.duplicate {
                            AgentStats::add(&act.stats.updates_failed, 1);
                        }
                        log::warn!(target: MESSAGE, "event=update_failed update_id={id} entity={entity} reason={:?}", out.reason.as_deref().unwrap_or(""));
                    }
                    Err(e) => {
                        log::error!(target: crate::log_target::ERROR, "event=apply_error update_id={id} entity={entity} error={e:?}")
                    }
                }
                res
            }),
        ))
    }
}

/// Answered after the update being applied (if any) is committed or rolled back: the `Apply`
/// handler holds the mailbox until its transaction ends.
impl Handler<crate::outbound::Halt> for Applier {
    type Result = ();
    fn handle(&mut self, _: crate::outbound::Halt, ctx: &mut Self::Context) {
        self.guard.request_stop("agent shutting down");
        ctx.stop();
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<crate::InjectPanic> for Applier {
    type Result = ();
    fn handle(&mut self, _: crate::InjectPanic, _: &mut Self::Context) {
        panic!("fault injection: applier");
    }
}
