//! Crash supervision for the agent's actors.
//!
//! actix's own `Supervisor` restarts an actor that *stops*, but a panic inside a handler just
//! drops the actor's task and closes its mailbox. Here every supervised actor owns an
//! [`ExitGuard`]; the guard's `Drop` runs on a clean stop and while a panic unwinds alike, and
//! tells the [`Supervisor`], which logs the exit on the `supervisor` target (actor, reason,
//! restart count) and starts a fresh instance after a bounded exponential backoff.
//!
//! actix runs `stopped()` even when a panic tore the actor down (its context's `Drop` finishes
//! the lifecycle), so `stopped()` cannot tell a crash from a stop. An actor that stops on
//! purpose says so first with [`ExitGuard::request_stop`]; any other exit is a crash. Other actors
//! reach each other through [`Slot`]s, which the supervisor repoints at the new instance.
//! Restarted actors rebuild their state from durable state (see each actor's doc).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::log_target::SUPERVISOR;
use crate::stats::AgentStats;

/// A late-bound address: always the current instance of a supervised actor.
pub struct Slot<A: Actor>(Arc<RwLock<Option<Addr<A>>>>);

impl<A: Actor> Clone for Slot<A> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<A: Actor> Default for Slot<A> {
    fn default() -> Self {
        Slot(Arc::new(RwLock::new(None)))
    }
}

impl<A: Actor> Slot<A> {
    /// The current instance, if it is alive.
    pub fn get(&self) -> Option<Addr<A>> {
        let guard = self.0.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|a| a.connected()).cloned()
    }

    pub fn set(&self, addr: Addr<A>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(addr);
    }
}

/// Why a supervised actor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The actor stopped on purpose, for the reason it gave.
    Stopped(&'static str),
    /// The actor ended without asking to: a handler panicked (or its arbiter died).
    Panicked,
}

impl ExitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Stopped(_) => "stopped",
            ExitReason::Panicked => "panicked",
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            ExitReason::Stopped(why) => why,
            ExitReason::Panicked => "crash",
        }
    }
}

/// Held by a supervised actor; reports the actor's end to its supervisor when dropped.
pub struct ExitGuard {
    name: &'static str,
    generation: u64,
    supervisor: Addr<Supervisor>,
    stop_requested: Option<&'static str>,
}

impl ExitGuard {
    /// Call before `ctx.stop()` when the actor stops on purpose.
    pub fn request_stop(&mut self, why: &'static str) {
        self.stop_requested = Some(why);
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let reason = match self.stop_requested {
            Some(why) => ExitReason::Stopped(why),
            None => ExitReason::Panicked,
        };
        self.supervisor.do_send(ChildExited {
            name: self.name,
            generation: self.generation,
            reason,
        });
    }
}

type StartFn = Box<dyn Fn(ExitGuard) + Send>;

struct Child {
    name: &'static str,
    start: StartFn,
    generation: u64,
    started_at: Instant,
    consecutive: u32,
}

/// Restart policy: backoff `base * 2^(n-1)` capped at `cap` for the n-th consecutive crash; an
/// actor that ran for `stable_after` counts as healthy again. From `loop_warn` consecutive
/// crashes on, every restart is logged at error level as a restart loop.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub base: Duration,
    pub cap: Duration,
    pub stable_after: Duration,
    pub loop_warn: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
            stable_after: Duration::from_secs(30),
            loop_warn: 5,
        }
    }
}

impl RestartPolicy {
    pub fn delay(&self, consecutive: u32) -> Duration {
        let exp = consecutive.saturating_sub(1).min(20);
        self.base.saturating_mul(1u32 << exp).min(self.cap)
    }
}

/// Starts, watches and restarts a fixed set of children.
pub struct Supervisor {
    scope: String,
    children: Vec<Child>,
    policy: RestartPolicy,
    stats: Arc<AgentStats>,
    shutting_down: bool,
}

impl Supervisor {
    /// `scope` names the group in logs (e.g. the clinic id).
    pub fn new(scope: impl Into<String>, policy: RestartPolicy, stats: Arc<AgentStats>) -> Self {
        Supervisor {
            scope: scope.into(),
            children: Vec::new(),
            policy,
            stats,
            shutting_down: false,
        }
    }

    /// Adds a child; `start` builds and starts one instance that owns the given guard.
    pub fn child(mut self, name: &'static str, start: impl Fn(ExitGuard) + Send + 'static) -> Self {
        self.children.push(Child {
            name,
            start: Box::new(start),
            generation: 0,
            started_at: Instant::now(),
            consecutive: 0,
        });
        self
    }

    fn start_child(&mut self, idx: usize, me: Addr<Supervisor>) {
        let child = &mut self.children[idx];
        child.generation += 1;
        child.started_at = Instant::now();
        let guard = ExitGuard {
            name: child.name,
            generation: child.generation,
            supervisor: me,
            stop_requested: None,
        };
        (child.start)(guard);
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for i in 0..self.children.len() {
            self.start_child(i, ctx.address());
        }
        log::info!(target: SUPERVISOR, "scope={} event=started children={}", self.scope, self.children.len());
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ChildExited {
    name: &'static str,
    generation: u64,
    reason: ExitReason,
}

impl Handler<ChildExited> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, ctx: &mut Self::Context) {
        if self.shutting_down {
            log::info!(target: SUPERVISOR, "scope={} actor={} event=exited reason={} during=shutdown", self.scope, msg.name, msg.reason.as_str());
            return;
        }
        let Some(idx) = self
            .children
            .iter()
            .position(|c| c.name == msg.name && c.generation == msg.generation)
        else {
            return; // an older instance; already replaced
        };
        let policy = self.policy;
        let child = &mut self.children[idx];
        if child.started_at.elapsed() >= policy.stable_after {
            child.consecutive = 0;
        }
        child.consecutive += 1;
        let total = self.stats.record_restart(msg.name);
        let delay = policy.delay(child.consecutive);
        if child.consecutive >= policy.loop_warn {
            log::error!(target: SUPERVISOR, "scope={} actor={} event=restart_loop reason={} detail={:?} restart={} consecutive={} backoff_ms={}", self.scope, msg.name, msg.reason.as_str(), msg.reason.detail(), total, child.consecutive, delay.as_millis());
        } else {
            log::warn!(target: SUPERVISOR, "scope={} actor={} event=crashed reason={} detail={:?} restart={} consecutive={} backoff_ms={}", self.scope, msg.name, msg.reason.as_str(), msg.reason.detail(), total, child.consecutive, delay.as_millis());
        }
        let generation = msg.generation;
        let name = msg.name;
        ctx.run_later(delay, move |act, ctx| {
            if act.shutting_down || act.children[idx].generation != generation {
                return;
            }
            act.start_child(idx, ctx.address());
            log::info!(target: SUPERVISOR, "scope={} actor={} event=restarted restart={}", act.scope, name, total);
        });
    }
}

/// Stop restarting children (they are being torn down on purpose).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) {
        self.shutting_down = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Probe {
        guard: ExitGuard,
        generation: u64,
    }

    impl Actor for Probe {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "u64")]
    struct WhoAreYou;
    impl Handler<WhoAreYou> for Probe {
        type Result = u64;
        fn handle(&mut self, _: WhoAreYou, _: &mut Context<Self>) -> u64 {
            self.generation
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Boom;
    impl Handler<Boom> for Probe {
        type Result = ();
        fn handle(&mut self, _: Boom, _: &mut Context<Self>) {
            panic!("injected by test");
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Halt;
    impl Handler<Halt> for Probe {
        type Result = ();
        fn handle(&mut self, _: Halt, ctx: &mut Context<Self>) {
            self.guard.request_stop("halt requested by test");
            ctx.stop();
        }
    }

    async fn generation_of(slot: &Slot<Probe>, at_least: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(addr) = slot.get() {
                if let Ok(g) = addr.send(WhoAreYou).await {
                    if g >= at_least {
                        return g;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "actor not back at generation {at_least}"
            );
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn start(stats: Arc<AgentStats>) -> (Addr<Supervisor>, Slot<Probe>) {
        let slot: Slot<Probe> = Slot::default();
        let s = slot.clone();
        let policy = RestartPolicy {
            base: Duration::from_millis(1),
            ..RestartPolicy::default()
        };
        let sup = Supervisor::new("test", policy, stats)
            .child("probe", move |guard| {
                let generation = guard.generation;
                s.set(Probe { guard, generation }.start());
            })
            .start();
        (sup, slot)
    }

    #[actix_rt::test]
    async fn panicked_actor_is_restarted_and_counted() {
        let stats = Arc::new(AgentStats::default());
        let (_sup, slot) = start(stats.clone());
        assert_eq!(generation_of(&slot, 1).await, 1);
        let addr = slot.get().expect("running");
        let res = addr.send(Boom).await;
        assert!(res.is_err(), "the panicking handler never answers");
        assert_eq!(generation_of(&slot, 2).await, 2);
        assert_eq!(stats.restarts().get("probe"), Some(&1));
    }

    #[actix_rt::test]
    async fn stopped_actor_is_restarted_and_shutdown_prevents_it() {
        let stats = Arc::new(AgentStats::default());
        let (sup, slot) = start(stats.clone());
        generation_of(&slot, 1).await;
        slot.get().expect("running").do_send(Halt);
        assert_eq!(generation_of(&slot, 2).await, 2);
        sup.send(Shutdown).await.expect("supervisor alive");
        let addr = slot.get().expect("running");
        addr.do_send(Halt);
        let deadline = Instant::now() + Duration::from_secs(2);
        while addr.connected() {
            assert!(Instant::now() < deadline);
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(slot.get().is_none(), "no restart after shutdown");
        assert_eq!(stats.total_restarts(), 1);
    }

    #[test]
    fn restart_delay_grows_and_is_capped() {
        let p = RestartPolicy::default();
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(30), Duration::from_secs(30));
    }
}
