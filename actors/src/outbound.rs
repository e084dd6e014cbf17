//! Outbound queue: sends clinic events to the gateway in outbox order, in batches bounded by
//! count and bytes, with a bounded window of unacknowledged batches; resends what was not
//! acknowledged after a reconnect, starting from the position the gateway reports in `welcome`;
//! advances the durable checkpoint only on `ack`; purges acknowledged outbox rows after the
//! retention.
//! Takes: `Enqueue` (from the watcher), `Position`, `LinkUp`, `LinkDown`, `Acked` (from the
//! connection). Sends: `SendFrame` to the connection.
//! State: the in-memory buffer (pending + in flight) and the acknowledged position.
//! On restart it reloads the checkpoint; the buffer is refilled by the watcher from the outbox,
//! which still holds every unacknowledged row.

use std::collections::VecDeque;
use std::sync::Arc;

use actix::prelude::*;
use tether_schemas::Event;

use crate::agent::{blocking, AgentSettings, Slots};
use crate::connection::SendFrame;
use crate::log_target::{ERROR, MESSAGE};
use crate::ports::Checkpoint;
use crate::stats::AgentStats;
use crate::supervisor::ExitGuard;

struct Pending {
    /// Sequence of the event before this one in the outbox (the gateway's gap check).
    prev: u64,
    event: Event,
    bytes: usize,
}

struct Batch {
    last_seq: u64,
    items: Vec<Pending>,
}

pub struct Outbound {
    guard: ExitGuard,
    settings: Arc<AgentSettings>,
    checkpoint: Arc<dyn Checkpoint>,
    stats: Arc<AgentStats>,
    slots: Slots,
    loaded: bool,
    /// Highest sequence known durable at the gateway.
    acked: u64,
    /// Highest sequence taken from the watcher.
    last_enqueued: u64,
    pending: VecDeque<Pending>,
    inflight: VecDeque<Batch>,
    link: Option<u64>,
    /// Shutting down: no new batch is sent; waiters hear when nothing is in flight any more.
    draining: bool,
    drain_waiters: Vec<tokio::sync::oneshot::Sender<DrainOutcome>>,
}

impl Outbound {
    pub fn new(
        guard: ExitGuard,
        settings: Arc<AgentSettings>,
        checkpoint: Arc<dyn Checkpoint>,
        stats: Arc<AgentStats>,
        slots: Slots,
    ) -> Self {
        Outbound {
            guard,
            settings,
            checkpoint,
            stats,
            slots,
            loaded: false,
            acked: 0,
            last_enqueued: 0,
            pending: VecDeque::new(),
            inflight: VecDeque::new(),
            link: None,
            draining: false,
            drain_waiters: Vec::new(),
        }
    }

    fn buffered(&self) -> usize {
        self.pending.len() + self.inflight.iter().map(|b| b.items.len()).sum::<usize>()
    }

    fn room(&self) -> usize {
        self.settings
            .max_buffered_events
            .saturating_sub(self.buffered())
    }

    /// Puts every in-flight batch back in front of the pending queue, in order.
    fn requeue_inflight(&mut self) {
        while let Some(batch) = self.inflight.pop_back() {
            for item in batch.items.into_iter().rev() {
                self.pending.push_front(item);
            }
        }
    }

    fn save_checkpoint(&self, ctx: &mut Context<Self>) {
        let cp = self.checkpoint.clone();
        let acked = self.acked;
        let clinic = self.settings.clinic_id.clone();
        // `save` only ever raises the stored value, so out-of-order completion is harmless.
        ctx.spawn(
            async move {
                if let Err(e) = blocking(move || cp.save(acked)).await {
                    log::error!(target: ERROR, "clinic={clinic} event=checkpoint_save_failed seq={acked} error={e}");
                }
            }
            .into_actor(self),
        );
    }

    /// While draining: once nothing is in flight (all acknowledged) or the link is gone (the
    /// rest stays in the outbox), tell whoever waits.
    fn check_drained(&mut self) {
        if !self.draining || (self.link.is_some() && !self.inflight.is_empty()) {
            return;
        }
        let outcome = DrainOutcome {
            acked_seq: self.acked,
            unacked_events: self.buffered(),
            link_lost: self.link.is_none(),
        };
        for w in self.drain_waiters.drain(..) {
            let _ = w.send(outcome);
        }
    }

    fn pump(&mut self, _ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        let Some(epoch) = self.link else { return };
        let Some(conn) = self.slots.connection.get() else {
            return;
        };
        let s = &self.settings;
        while self.inflight.len() < s.max_inflight_batches && !self.pending.is_empty() {
            let mut items = Vec::new();
            let mut bytes = 0usize;
            while let Some(front) = self.pending.front() {
                if !items.is_empty()
                    && (items.len() >= s.batch_max_events
                        || bytes + front.bytes > s.batch_max_bytes)
                {
                    break;
                }
                bytes += front.bytes;
                if let Some(p) = self.pending.pop_front() {
                    items.push(p);
                }
            }
            let prev_seq = items.first().map(|p| p.prev).unwrap_or(self.acked);
            let first_seq = items.first().map(|p| p.event.seq).unwrap_or(0);
            let last_seq = items.last().map(|p| p.event.seq).unwrap_or(0);
            // The first event read after this batch is the clinic's oldest unacknowledged
            // change once the batch is acknowledged: the gateway shows its age as the lag.
            let meta = tether_schemas::EventsMeta {
                head_seq: Some(self.last_enqueued.max(last_seq)),
                restarts: Some(self.stats.total_restarts()),
                next_committed_at: self.pending.front().map(|p| p.event.committed_at.as_str()),
            };
            let frame =
                tether_schemas::encode_events(prev_seq, meta, items.iter().map(|p| &p.event));
            log::info!(target: MESSAGE, "clinic={} event=batch_sent first_seq={first_seq} last_seq={last_seq} count={} bytes={}", s.clinic_id, items.len(), frame.len());
            AgentStats::add(&self.stats.events_sent, items.len() as u64);
            conn.do_send(SendFrame { epoch, text: frame });
            self.inflight.push_back(Batch { last_seq, items });
        }
    }
}

impl Actor for Outbound {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let cp = self.checkpoint.clone();
        // Nothing else is handled until the checkpoint is loaded.
        ctx.wait(blocking(move || cp.load()).into_actor(self).map(
            |res, act, ctx| match res {
                Ok(acked) => {
                    act.acked = acked;
                    act.last_enqueued = acked;
                    act.loaded = true;
                    act.stats
                        .acked_seq
                        .fetch_max(acked, std::sync::atomic::Ordering::Relaxed);
                    act.ask_for_link(ctx);
                }
                Err(e) => {
                    log::error!(target: ERROR, "clinic={} event=checkpoint_load_failed error={e}", act.settings.clinic_id);
                    act.guard.request_stop("checkpoint load failed");
                    ctx.stop();
                }
            },
        ));
        let every = self.settings.purge_interval;
        ctx.run_interval(every, |act, ctx| {
            let cp = act.checkpoint.clone();
            let acked = act.acked;
            let retention = act.settings.outbox_retention;
            let clinic = act.settings.clinic_id.clone();
            ctx.spawn(
                async move {
                    match blocking(move || cp.purge(acked, retention)).await {
                        Ok(0) => {}
                        Ok(n) => log::info!(target: MESSAGE, "clinic={clinic} event=outbox_purged rows={n} upto_seq={acked}"),
                        Err(e) => log::error!(target: ERROR, "clinic={clinic} event=outbox_purge_failed error={e}"),
                    }
                }
                .into_actor(act),
            );
        });
    }
}

impl Outbound {
    /// A restarted queue asks whether a link is already up.
    fn ask_for_link(&mut self, ctx: &mut Context<Self>) {
        if let Some(conn) = self.slots.connection.get() {
            ctx.spawn(
                conn.send(crate::connection::CurrentLink)
                    .into_actor(self)
                    .map(|res, act, ctx| {
                        if let Ok(Some(link)) = res {
                            if act.link != Some(link.epoch) {
                                act.link_up(link.epoch, link.acked_seq, ctx);
                            }
                        }
                    }),
            );
        }
    }

    fn link_up(&mut self, epoch: u64, gateway_acked: u64, ctx: &mut Context<Self>) {
        self.link = Some(epoch);
        self.requeue_inflight();
        if gateway_acked > self.acked {
            self.acked = gateway_acked;
            self.stats
                .acked_seq
                .fetch_max(gateway_acked, std::sync::atomic::Ordering::Relaxed);
            self.save_checkpoint(ctx);
        } else if gateway_acked < self.acked {
            // The gateway holds less than it once acknowledged (restored from a backup?).
            // Resend what the outbox still has from its position; the watcher re-reads it.
            log::error!(target: ERROR, "clinic={} event=gateway_behind gateway_seq={gateway_acked} checkpoint={} action=resend_from_gateway_position", self.settings.clinic_id, self.acked);
            self.acked = gateway_acked;
            self.last_enqueued = gateway_acked;
            self.pending.clear();
        }
        let acked = self.acked;
        while self.pending.front().is_some_and(|p| p.event.seq <= acked) {
            self.pending.pop_front();
        }
        if self.last_enqueued < acked {
            self.last_enqueued = acked;
        }
        self.pump(ctx);
    }
}

/// From the watcher: events read from the outbox after `after`, in order.
#[derive(Message)]
#[rtype(result = "EnqueueReply")]
pub struct Enqueue {
    pub after: u64,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnqueueReply {
    /// Where the watcher must continue reading from.
    pub last_enqueued: u64,
    /// How many more events the queue will take now.
    pub room: usize,
}

impl Handler<Enqueue> for Outbound {
    type Result = MessageResult<Enqueue>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Self::Context) -> Self::Result {
        // Only a read that continues exactly where the queue stands can be appended; anything
        // else (a watcher ahead of a restarted queue) is refused and the watcher re-reads.
        if self.loaded && msg.after <= self.last_enqueued {
            let mut added = 0u64;
            for event in msg.events {
                if event.seq <= self.last_enqueued {
                    continue;
                }
                if self.room() == 0 {
                    break;
                }
                let bytes = tether_schemas::encoded_len(&event) + 1;
                self.pending.push_back(Pending {
                    prev: self.last_enqueued,
                    event,
                    bytes,
                });
                self.last_enqueued = self.pending.back().map(|p| p.event.seq).unwrap_or(0);
                added += 1;
            }
            AgentStats::add(&self.stats.events_enqueued, added);
            self.pump(ctx);
        }
        MessageResult(EnqueueReply {
            last_enqueued: self.last_enqueued,
            room: self.room(),
        })
    }
}

/// Where the queue stands (the watcher asks after it restarts).
#[derive(Message)]
#[rtype(result = "Option<u64>")]
pub struct Position;

impl Handler<Position> for Outbound {
    type Result = Option<u64>;
    fn handle(&mut self, _: Position, _: &mut Self::Context) -> Option<u64> {
        self.loaded.then_some(self.last_enqueued)
    }
}

/// The connection completed `hello`/`welcome`; the gateway holds everything up to `acked_seq`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkUp {
    pub epoch: u64,
    pub acked_seq: u64,
}

impl Handler<LinkUp> for Outbound {
    type Result = ();
    fn handle(&mut self, msg: LinkUp, ctx: &mut Self::Context) {
        self.link_up(msg.epoch, msg.acked_seq, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkDown {
    pub epoch: u64,
}

impl Handler<LinkDown> for Outbound {
    type Result = ();
    fn handle(&mut self, msg: LinkDown, _: &mut Self::Context) {
        if self.link == Some(msg.epoch) {
            self.link = None;
            self.requeue_inflight();
            self.check_drained();
        }
    }
}

/// The gateway acknowledged everything up to `seq`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Acked {
    pub epoch: u64,
    pub seq: u64,
}

impl Handler<Acked> for Outbound {
    type Result = ();
    fn handle(&mut self, msg: Acked, ctx: &mut Self::Context) {
        if msg.seq <= self.acked {
            return;
        }
        self.acked = msg.seq;
        self.stats
            .acked_seq
            .fetch_max(msg.seq, std::sync::atomic::Ordering::Relaxed);
        let mut count = 0usize;
        while self.inflight.front().is_some_and(|b| b.last_seq <= msg.seq) {
            if let Some(b) = self.inflight.pop_front() {
                count += b.items.len();
            }
            AgentStats::add(&self.stats.batches_acked, 1);
        }
        // An ack can also cover part of a batch (or pending events) after a resend.
        if let Some(b) = self.inflight.front_mut() {
            let before = b.items.len();
            b.items.retain(|p| p.event.seq > msg.seq);
            count += before - b.items.len();
        }
        while self.pending.front().is_some_and(|p| p.event.seq <= msg.seq) {
            self.pending.pop_front();
            count += 1;
        }
        log::debug!(target: MESSAGE, "clinic={} event=batch_acked seq={} events={count}", self.settings.clinic_id, msg.seq);
        self.save_checkpoint(ctx);
        if self.link == Some(msg.epoch) {
            self.pump(ctx);
        }
        self.check_drained();
    }
}

/// What a drain ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Everything up to here is durable at the gateway, and the checkpoint says so.
    pub acked_seq: u64,
    /// Events read from the outbox but not acknowledged: they stay in the outbox.
    pub unacked_events: usize,
    /// The link went down before everything in flight was acknowledged.
    pub link_lost: bool,
}

/// Shutdown: send nothing new, wait until what is in flight is acknowledged (or the link is
/// gone), then write the checkpoint and answer. The caller bounds the wait.
#[derive(Message)]
#[rtype(result = "Result<DrainOutcome, crate::PortError>")]
pub struct Drain;

impl Handler<Drain> for Outbound {
    type Result = ResponseFuture<Result<DrainOutcome, crate::PortError>>;

    fn handle(&mut self, _: Drain, _: &mut Self::Context) -> Self::Result {
        self.draining = true;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.drain_waiters.push(tx);
        self.check_drained();
        let cp = self.checkpoint.clone();
        Box::pin(async move {
            let outcome = rx
                .await
                .map_err(|_| crate::PortError::new("outbound queue stopped while draining"))?;
            let acked = outcome.acked_seq;
            blocking(move || cp.save(acked)).await?;
            Ok(outcome)
        })
    }
}

/// Stop on purpose (shutdown), without a restart.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Halt;

impl Handler<Halt> for Outbound {
    type Result = ();
    fn handle(&mut self, _: Halt, ctx: &mut Self::Context) {
        self.guard.request_stop("agent shutting down");
        ctx.stop();
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<crate::InjectPanic> for Outbound {
    type Result = ();
    fn handle(&mut self, _: crate::InjectPanic, _: &mut Self::Context) {
        panic!("fault injection: outbound");
    }
}
