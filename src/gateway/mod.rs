//! The gateway: WebSocket relay for clinic agents plus the REST API for the main Web API.
//!
//! `start` builds the store and the registry, binds the listener (port 0 picks a free one)
//! and runs the HTTP server; the returned handle gives the bound address and a graceful stop.

pub mod api;
pub mod session;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, App, HttpServer};
use tether_actors::registry::Registry;
use tether_schemas::EntitySchemas;

use crate::config::GatewayConfig;
use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("gateway.entity_schemas: {0}")]
    Schemas(#[from] tether_schemas::EntitySchemaError),
    #[error("gateway.listen {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Settings the gateway's handlers need, resolved from config.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub listen: String,
    pub store_path: PathBuf,
    pub heartbeat_interval: Duration,
    pub max_frame_bytes: usize,
    pub entity_schemas: Option<PathBuf>,
    pub update_window: usize,
    pub group_commit_max_events: usize,
    pub workers: usize,
    /// How long a graceful stop waits for open connections.
    pub shutdown_timeout: Duration,
}

impl GatewaySettings {
    pub fn from_config(c: &GatewayConfig) -> Self {
        GatewaySettings {
            listen: c.listen.clone(),
            store_path: c.store.path.clone(),
            heartbeat_interval: c.heartbeat_interval.get(),
            max_frame_bytes: c.max_frame_bytes as usize,
            entity_schemas: c.entity_schemas.clone(),
            update_window: c.update_window as usize,
            group_commit_max_events: c.group_commit_max_events as usize,
            workers: 2,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Shared by every handler and session.
pub struct GatewayState {
    pub settings: GatewaySettings,
    pub store: Arc<Store>,
    pub registry: Addr<Registry>,
    pub schemas: EntitySchemas,
}

pub struct GatewayHandle {
    pub addr: SocketAddr,
    pub server: actix_web::dev::ServerHandle,
    pub store: Arc<Store>,
    pub registry: Addr<Registry>,
}

impl GatewayHandle {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Stops accepting, closes sessions, then stops the store writer.
    pub async fn stop(self) {
        self.server.stop(true).await;
        self.store.close();
    }
}

/// Starts a gateway inside the current actix `System`.
pub fn start(settings: GatewaySettings) -> Result<GatewayHandle, GatewayError> {
    let store = Store::open(&settings.store_path, settings.group_commit_max_events)?;
    let schemas = match &settings.entity_schemas {
        Some(dir) => EntitySchemas::load_dir(dir)?,
        None => EntitySchemas::default(),
    };
    let registry = Registry::default().start();
    let state = web::Data::new(GatewayState {
        settings: settings.clone(),
        store: store.clone(),
        registry: registry.clone(),
        schemas,
    });
    let listen = settings.listen.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(settings.max_frame_bytes))
            .route("/v1/ws", web::get().to(session::upgrade))
            .configure(api::routes)
    })
    .workers(settings.workers)
    .shutdown_timeout(settings.shutdown_timeout.as_secs().max(1))
    .disable_signals()
    .bind(&listen)
    .map_err(|source| GatewayError::Bind {
        addr: listen.clone(),
        source,
    })?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| GatewayError::Bind {
            addr: listen.clone(),
            source: std::io::Error::other("no address bound"),
        })?;
    let server = server.run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(e) = server.await {
            log::error!(target: "error", "event=http_server_failed error={e}");
        }
    });
    log::info!(target: "connection", "event=gateway_listening addr={addr}");
    Ok(GatewayHandle {
        addr,
        server: handle,
        store,
        registry,
    })
}
