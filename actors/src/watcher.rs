//! DB watcher: notices new outbox rows and hands them to the outbound queue in order, never
//! skipping one.
//! Every `poll_interval` it reads the source's change token (SQLite: `PRAGMA data_version`);
//! when it moved, or the last read was cut short, it reads the rows after its cursor and sends
//! them as `Enqueue { after: cursor, .. }`. The queue answers where to continue, so the cursor
//! always follows the queue (a queue that restarted rewinds the watcher).
//! Takes: nothing but its timer. Sends: `Position`, `Enqueue` to the outbound queue.
//! State: the cursor only. On restart it asks the queue for its position.

use std::sync::Arc;

use actix::prelude::*;

use crate::agent::{blocking, AgentSettings, Slots};
use crate::log_target::ERROR;
use crate::outbound::{Enqueue, Position};
use crate::ports::{ChangeSource, PortError};
use crate::supervisor::ExitGuard;

pub struct Watcher {
    /// Tells the supervisor when this actor ends (its `Drop`).
    guard: ExitGuard,
    settings: Arc<AgentSettings>,
    source: Arc<dyn ChangeSource>,
    slots: Slots,
    cursor: Option<u64>,
    last_token: Option<u64>,
    /// The last read may have left rows behind (full chunk, no room, or a rewind).
    more: bool,
    room: usize,
    busy: bool,
    failing: bool,
}

impl Watcher {
    pub fn new(
        guard: ExitGuard,
        settings: Arc<AgentSettings>,
        source: Arc<dyn ChangeSource>,
        slots: Slots,
    ) -> Self {
        let room = settings.read_chunk;
        Watcher {
            guard,
            settings,
            source,
            slots,
            cursor: None,
            last_token: None,
            more: true,
            room,
            busy: false,
            failing: false,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let Some(outbound) = self.slots.outbound.get() else {
            self.cursor = None;
            return;
        };
        self.busy = true;
        let source = self.source.clone();
        let cursor = self.cursor;
        let last_token = self.last_token;
        let more = self.more;
        let limit = self.settings.read_chunk.min(self.room.max(1));
        let fut = async move {
            let cursor = match cursor {
                Some(c) => c,
                None => match outbound.send(Position).await {
                    Ok(Some(c)) => c,
                    _ => return Ok(None), // queue not ready yet
                },
            };
            let s = source.clone();
            let token = blocking(move || s.change_token()).await?;
            if Some(token) == last_token && !more {
                return Ok(Some(Step {
                    token,
                    cursor,
                    read: 0,
                    reply: None,
                }));
            }
            let rows = blocking(move || source.read_after(cursor, limit)).await?;
            let read = rows.len();
            let reply = outbound
                .send(Enqueue {
                    after: cursor,
                    events: rows,
                })
                .await
                .map_err(|e| PortError::new(format!("outbound queue unavailable: {e}")))?;
            Ok::<_, PortError>(Some(Step {
                token,
                cursor,
                read,
                reply: Some(reply),
            }))
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.busy = false;
            let mut again = false;
            match res {
                Ok(None) => act.cursor = None,
                Ok(Some(step)) => {
                    act.failing = false;
                    act.last_token = Some(step.token);
                    match step.reply {
                        None => {
                            act.cursor = Some(step.cursor);
                            act.more = false;
                        }
                        Some(reply) => {
                            act.room = reply.room;
                            act.cursor = Some(reply.last_enqueued);
                            act.more = step.read >= limit
                                || reply.room == 0
                                || reply.last_enqueued < step.cursor
                                || (step.read > 0 && reply.last_enqueued == step.cursor);
                            // A full chunk with room left: a backlog is waiting, read on now
                            // rather than one chunk per poll interval (which capped a drain
                            // at read_chunk / poll_interval, 10,000 events/s by default).
                            again = step.read >= limit && reply.room > 0;
                        }
                    }
                }
                Err(e) => {
                    act.cursor = None;
                    act.more = true;
                    if !act.failing {
                        log::error!(target: ERROR, "clinic={} event=outbox_read_failed error={e}", act.settings.clinic_id);
                    }
                    act.failing = true;
                }
            }
            if again {
                act.tick(ctx);
            }
        }));
    }
}

struct Step {
    token: u64,
    cursor: u64,
    read: usize,
    reply: Option<crate::outbound::EnqueueReply>,
}

impl Actor for Watcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.settings.poll_interval, |act, ctx| act.tick(ctx));
    }
}

impl Handler<crate::outbound::Halt> for Watcher {
    type Result = ();
    fn handle(&mut self, _: crate::outbound::Halt, ctx: &mut Self::Context) {
        self.guard.request_stop("agent shutting down");
        ctx.stop();
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<crate::InjectPanic> for Watcher {
    type Result = ();
    fn handle(&mut self, _: crate::InjectPanic, _: &mut Self::Context) {
        panic!("fault injection: watcher");
    }
}
