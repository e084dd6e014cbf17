//! The Tether sync runtime: actors, their messages, crash supervision, and the ports (traits)
//! the actors need from the outside world. This crate knows no SQL dialect and no database
//! driver: `src/` plugs adapters into the ports.
#![forbid(unsafe_code)]

pub mod agent;
pub mod applier;
pub mod backoff;
pub mod channels;
pub mod connection;
pub mod frames;
pub mod gateway_store;
pub mod http_link;
pub mod outbound;
pub mod ports;
pub mod registry;
pub mod stats;
pub mod supervisor;
pub mod watcher;

pub use agent::{start_agent, AgentHandle, AgentSettings, DrainReport};
pub use ports::{ChangeSink, ChangeSource, Checkpoint, Clock, Dialer, PortError, SystemClock};
pub use stats::AgentStats;

/// Log targets (log4rs categories). Each is routed to its own daily-rolled file by `src/logging.rs`.
pub mod log_target {
    pub const CONNECTION: &str = "connection";
    pub const MESSAGE: &str = "message";
    pub const ERROR: &str = "error";
    pub const SUPERVISOR: &str = "supervisor";
    pub const AUDIT: &str = "audit";
}

/// Test-only fault switch: a message every agent actor obeys by panicking.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, actix::Message)]
#[rtype(result = "()")]
pub struct InjectPanic;
