//! Tether: the edge of the sync runtime — CLI, config, logging, database adapters, the
//! gateway's HTTP/WebSocket server, and the wiring that plugs adapters into `tether-actors`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod config;
pub mod db;
pub mod demo;
pub mod faults;
pub mod fleet;
pub mod gateway;
pub mod history;
pub mod loadgen;
pub mod logging;
pub mod security;
