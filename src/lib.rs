//! Tether: the edge of the sync runtime — CLI, config, logging, database adapters, the
//! gateway's HTTP/WebSocket server, and the wiring that plugs adapters into `tether-actors`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
#[cfg(feature = "gateway")]
pub mod bench;
#[cfg(all(feature = "gateway", feature = "postgres"))]
pub mod bench_capture;
#[cfg(all(feature = "gateway", feature = "postgres"))]
pub mod bench_cluster;
#[cfg(feature = "gateway")]
pub mod bench_remote;
pub mod check;
pub mod config;
pub mod db;
#[cfg(feature = "gateway")]
pub mod demo;
pub mod enrol;
pub mod faults;
#[cfg(feature = "gateway")]
pub mod fleet;
#[cfg(feature = "gateway")]
pub mod gateway;
#[cfg(feature = "gateway")]
pub mod history;
pub mod loadgen;
pub mod local_channels;
#[cfg(feature = "gateway")]
pub mod local_cluster;
pub mod logging;
pub mod proxy;
pub mod security;
pub mod service;
