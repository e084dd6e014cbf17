//! The gateway: WebSocket relay for clinic agents plus the REST API for the main Web API.
//!
//! `start` builds the store and the registry, binds the listener (port 0 picks a free one)
//! and runs the HTTP server; the returned handle gives the bound address and a graceful stop.

pub mod api;
pub mod bridge;
pub mod clinic_registry;
pub mod cluster;
pub mod enrolment;
pub mod metrics;
pub mod monitor;
pub mod problem;
pub mod retention;
pub mod routes;
pub mod session;
pub mod webhooks;

/// A clinic is reported `lagging` beyond this many events read and not yet durable ...
pub const LAG_EVENTS: u64 = 10_000;
/// ... or when its newest event took longer than this (ms) from commit to durable.
pub const LAG_MS: u64 = 60_000;
pub mod channels;
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
use crate::security::admin::AdminTokens;
use crate::security::crypto::FieldCipher;
use crate::security::jwt::{ClinicRegistry, TokenVerifier};
use crate::security::limits::SharedBucket;
use crate::security::tls::{self, ServerTls};
use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("gateway.entity_schemas: {0}")]
    Schemas(#[from] tether_schemas::EntitySchemaError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("gateway.auth.clinics_dir: {0}")]
    Registry(#[from] crate::security::jwt::JwtError),
    #[error("gateway.decryption_keys: {0}")]
    Keys(#[from] crate::security::crypto::CryptoError),
    #[error("gateway.admin_tokens: entry {0} has a malformed sha256")]
    AdminToken(String),
    #[error("gateway.webhooks: {0}")]
    Webhook(String),
    #[error("gateway.api_bridge: {0}")]
    Bridge(String),
    #[error("{0}")]
    Channels(String),
    #[error(transparent)]
    Enrolment(#[from] enrolment::EnrolmentError),
    #[error("gateway.listen {addr}: {}", bind_advice(cause))]
    Bind { addr: String, cause: std::io::Error },
}

/// What a failed bind means to an operator (the OS text alone says "os error 98").
fn bind_advice(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "the address is already in use (another gateway, or another program, listens there): stop it or change gateway.listen".into()
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "this host has no such address: use one of its own, 0.0.0.0 (every IPv4 address) or [::]".into()
        }
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need privileges): use a higher port, or put it behind the load balancer".into()
        }
        _ => e.to_string(),
    }
}

/// The gateway's listening sockets, bound before anything else starts: a taken port fails the
/// start at once, with nothing to unwind. Every address the name resolves to, like
/// `HttpServer::bind`, with the same backlog.
fn bind_listeners(listen: &str) -> Result<Vec<std::net::TcpListener>, GatewayError> {
    use std::net::ToSocketAddrs;
    let err = |cause| GatewayError::Bind {
        addr: listen.to_string(),
        cause,
    };
    let addrs: Vec<std::net::SocketAddr> = listen.to_socket_addrs().map_err(err)?.collect();
    let mut listeners = Vec::new();
    let mut last = None;
    for addr in addrs {
        match bind_one(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => last = Some(e),
        }
    }
    match (listeners.is_empty(), last) {
        (false, _) => Ok(listeners),
        (true, Some(e)) => Err(err(e)),
        (true, None) => Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "the name resolves to no address",
        ))),
    }
}

/// `check-config --connect`: the listen address can be bound now (the sockets are closed again).
pub fn probe_listen(listen: &str) -> Result<(), GatewayError> {
    bind_listeners(listen).map(drop)
}

fn bind_one(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    #[cfg(not(windows))]
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    // actix-server's own default: room for a reconnect storm's handshakes.
    socket.listen(2048)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Settings the gateway's handlers need, resolved from config.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub listen: String,
    /// This node's id (`gateway.node_id`); `None`: `<host name>:<listen port>`.
    pub node_id: Option<String>,
    /// Where the other nodes reach this one (`gateway.advertise`); see [`GatewaySettings::advertised`].
    pub advertise: Option<String>,
    /// Which store, and where (`gateway.store`).
    pub store: store::StoreLocation,
    /// Events older than this are removed in the background (`gateway.store.retention`);
    /// `None` keeps everything.
    pub retention: Option<Duration>,
    pub heartbeat_interval: Duration,
    pub max_frame_bytes: usize,
    pub entity_schemas: Option<PathBuf>,
    pub update_window: usize,
    pub group_commit_max_events: usize,
    pub workers: usize,
    /// How long a graceful stop waits for open connections.
    pub shutdown_timeout: Duration,
    /// Test-only faults; honoured only in builds with the `fault-injection` feature.
    pub faults: GatewayFaults,
    /// Endpoints of the main Web API that receive every durable clinic event.
    pub webhooks: Vec<webhooks::WebhookSettings>,
    /// Endpoints of the main Web API that agents may call (`call_request`).
    pub bridge: BridgeSettings,
    /// The channels carried between cloud services and clinic applications (`gateway.channels`).
    pub channels: Vec<channels::ChannelSpec>,
}

/// `gateway.api_bridge`, resolved.
#[derive(Clone, Default)]
pub struct BridgeSettings {
    pub endpoints: std::collections::HashMap<String, BridgeEndpoint>,
    /// `Authorization` value presented upstream (from `authorization_env`).
    pub authorization: Option<String>,
}

impl std::fmt::Debug for BridgeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeSettings")
            .field("endpoints", &self.endpoints)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct BridgeEndpoint {
    pub url: String,
    pub post: bool,
    pub timeout: Duration,
}

/// `gateway.api_bridge`, its token read from the environment.
pub fn bridge_from_config(c: &GatewayConfig) -> Result<BridgeSettings, GatewayError> {
    let authorization = match &c.api_bridge.authorization_env {
        None => None,
        Some(var) => Some(format!(
            "Bearer {}",
            std::env::var(var).map_err(|_| GatewayError::Bridge(format!(
                "authorization_env: {var} is not set"
            )))?
        )),
    };
    Ok(BridgeSettings {
        endpoints: c
            .api_bridge
            .endpoints
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    BridgeEndpoint {
                        url: e.url.clone(),
                        post: e.method == "POST",
                        timeout: e.timeout.get(),
                    },
                )
            })
            .collect(),
        authorization,
    })
}

/// Deliberate misbehaviour for the fault tests (ignored without `fault-injection`).
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayFaults {
    /// Abort the process right after this many group commits, before acknowledging them.
    pub abort_after_commits: Option<u64>,
    /// The broken build the history checker must catch: acknowledge a batch on receipt,
    /// before it is durable, and lose every 7th batch as if the process died before its commit.
    pub ack_before_commit: bool,
}

impl GatewayFaults {
    pub fn active(self) -> GatewayFaults {
        if cfg!(feature = "fault-injection") {
            self
        } else {
            GatewayFaults::default()
        }
    }

    /// From `TETHER_FAULT_ABORT_AFTER_COMMITS` / `TETHER_FAULT_ACK_BEFORE_COMMIT` (fault builds).
    pub fn from_env() -> GatewayFaults {
        GatewayFaults {
            abort_after_commits: std::env::var("TETHER_FAULT_ABORT_AFTER_COMMITS")
                .ok()
                .and_then(|v| v.parse().ok()),
            ack_before_commit: std::env::var("TETHER_FAULT_ACK_BEFORE_COMMIT").is_ok(),
        }
        .active()
    }
}

impl GatewaySettings {
    /// This node's id: `gateway.node_id`, or `<host name>:<listen port>`.
    pub fn node(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        let port = self.listen.rsplit(':').next().unwrap_or("0");
        format!("{}:{port}", crate::db::instance::host())
    }

    /// Where the other nodes reach this one: `gateway.advertise`, else the bound address, or
    /// `<host name>:<port>` when bound to all interfaces.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        if !bound.ip().is_unspecified() {
            return bound.to_string();
        }
        format!("{}:{}", crate::db::instance::host(), bound.port())
    }

    pub fn from_config(c: &GatewayConfig) -> Self {
        GatewaySettings {
            listen: c.listen.clone(),
            node_id: c.node_id.clone(),
            advertise: c.advertise.clone(),
            store: c.store.location(),
            retention: c.store.retention(),
            heartbeat_interval: c.heartbeat_interval.get(),
            max_frame_bytes: c.max_frame_bytes as usize,
            entity_schemas: c.entity_schemas.clone(),
            update_window: c.update_window as usize,
            group_commit_max_events: c.group_commit_max_events as usize,
            workers: 2,
            shutdown_timeout: Duration::from_secs(5),
            faults: GatewayFaults::from_env(),
            webhooks: Vec::new(),
            bridge: BridgeSettings::default(),
            channels: Vec::new(),
        }
    }
}

/// `gateway.webhooks`, secrets read from their environment variable or file.
pub fn webhooks_from_config(
    c: &GatewayConfig,
) -> Result<Vec<webhooks::WebhookSettings>, GatewayError> {
    let mut out = Vec::new();
    for w in &c.webhooks {
        let secret = match (&w.secret_env, &w.secret_file) {
            (Some(var), _) => std::env::var(var)
                .map_err(|_| {
                    GatewayError::Webhook(format!("{}: secret_env {var} is not set", w.name))
                })?
                .into_bytes(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| {
                    GatewayError::Webhook(format!(
                        "{}: secret_file {}: {e}",
                        w.name,
                        file.display()
                    ))
                })?
                .trim()
                .as_bytes()
                .to_vec(),
            (None, None) => {
                return Err(GatewayError::Webhook(format!(
                    "{}: needs secret_env or secret_file",
                    w.name
                )))
            }
        };
        out.push(webhooks::WebhookSettings {
            name: w.name.clone(),
            url: w.url.clone(),
            secret,
            entities: w.entities.clone(),
            events: w.events,
            channels: w.channels.clone(),
            max_attempts: w.max_attempts.clamp(1, 1000) as u32,
            timeout: w.timeout.get(),
            backoff_initial: w.backoff_initial.get(),
            backoff_max: w.backoff_max.get(),
        });
    }
    Ok(out)
}

/// Who may connect and what they may do.
pub struct GatewaySecurity {
    pub tls: Option<ServerTls>,
    /// `None`: no tokens (insecure local mode); any hello is accepted.
    pub verifier: Option<TokenVerifier>,
    /// Where the verifier's clinic registry is reloaded from (`None`: it is fixed).
    pub registry_source: Option<clinic_registry::RegistrySource>,
    /// `None`: the REST API is open (insecure local mode).
    pub admin: Option<AdminTokens>,
    /// Decrypts sensitive fields before storing; `None` stores ciphertext.
    pub decrypt: Option<FieldCipher>,
    pub admission: SharedBucket,
    /// Per-session frames per second and burst.
    pub message_rate: (f64, f64),
    pub allowed_origins: Vec<String>,
    /// Per-clinic RPC calls per second, and calls running at once.
    pub rpc_rate: (f64, usize),
    /// Per-session `call_request`s per second (the burst is twice that).
    pub call_rate: f64,
    /// Zero-touch enrolment (`gateway.enrolment`); `None`: off.
    pub enrolment: Option<Arc<enrolment::Enrolment>>,
}

impl GatewaySecurity {
    /// No TLS, no tokens, open REST: for local development and protocol tests only.
    pub fn insecure() -> Self {
        GatewaySecurity {
            tls: None,
            verifier: None,
            registry_source: None,
            admin: None,
            decrypt: None,
            admission: SharedBucket::new(1000.0, 2000.0),
            message_rate: (10_000.0, 20_000.0),
            allowed_origins: Vec::new(),
            rpc_rate: (50.0, tether_actors::connection::MAX_RPC_RUNNING),
            call_rate: 10_000.0,
            enrolment: None,
        }
    }

    pub fn from_config(g: &GatewayConfig) -> Result<Self, GatewayError> {
        let tls = g.tls.as_ref().map(|t| ServerTls {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
        });
        let verifier = match &g.auth {
            Some(a) => Some(TokenVerifier::new(
                &g.id,
                a.leeway.get(),
                // A store registry is loaded once the store is open (`clinic_registry::start`).
                if a.registry == "store" {
                    ClinicRegistry::default()
                } else {
                    ClinicRegistry::load_dir(&a.clinics_dir)?
                },
            )),
            None => None,
        };
        let registry_source = g.auth.as_ref().map(|a| clinic_registry::RegistrySource {
            dir: a.clinics_dir.clone(),
            interval: a.reload_interval.get().max(Duration::from_millis(100)),
            store: a.registry == "store",
        });
        let admin = if g.admin_tokens.is_empty() {
            None
        } else {
            Some(AdminTokens::new(&g.admin_tokens).map_err(GatewayError::AdminToken)?)
        };
        let decrypt = if g.decryption_keys.is_empty() {
            None
        } else {
            Some(FieldCipher::new(
                data_keys(&g.decryption_keys, g.channel_encryption_key.as_deref())?,
                Default::default(),
            ))
        };
        let l = &g.limits;
        Ok(GatewaySecurity {
            tls,
            verifier,
            registry_source,
            admin,
            decrypt,
            admission: SharedBucket::new(l.handshakes_per_second as f64, l.handshake_burst as f64),
            message_rate: (l.messages_per_second as f64, l.message_burst as f64),
            allowed_origins: l.allowed_origins.clone(),
            rpc_rate: (l.rpc_per_second as f64, l.rpc_concurrent as usize),
            call_rate: l.calls_per_second as f64,
            enrolment: match &g.enrolment {
                Some(e) => Some(Arc::new(enrolment::Enrolment::from_config(e, &g.id)?)),
                None => None,
            },
        })
    }
}

pub use crate::security::crypto::data_keys;

/// The identities in the client certificate of a TLS connection (CN and SANs).
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Vec<String>);

fn peer_identity(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    type Tls = actix_tls::accept::openssl::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tls) = conn.downcast_ref::<Tls>() {
        if let Some(cert) = tls.ssl().peer_certificate() {
            ext.insert(PeerIdentity(tls::cert_identities(&cert)));
        }
    }
}

/// Shared by every handler and session.
pub struct GatewayState {
    pub settings: GatewaySettings,
    pub store: Arc<Store>,
    pub registry: Addr<Registry>,
    pub schemas: EntitySchemas,
    /// Background tasks `/readyz` checks (webhook dispatchers, retention).
    pub tasks: monitor::Liveness,
    pub security: GatewaySecurity,
    /// Open channels of the HTTP fallback transport.
    pub http_channels: session::http::Channels,
    pub metrics: metrics::GatewayMetrics,
    /// Callers of `POST /v1/clinics/{id}/rpc` waiting for the clinic's answer.
    pub rpc: session::RpcWaiters,
    /// Per-clinic RPC limits (`gateway.limits.rpc_*`).
    pub rpc_limits: session::RpcLimits,
    /// Calls passed to the node holding their clinic, waiting for the answer.
    pub forwards: cluster::Forwards,
    /// The key the nodes on this store share to sign the requests they pass to each other.
    pub peer_key: Vec<u8>,
    pub webhooks: Arc<webhooks::Webhooks>,
    /// The registry version in force (reloads without a restart).
    pub registry_reloads: clinic_registry::Reloads,
    /// The channels, their schemas, limits and counters.
    pub channels: channels::GatewayChannels,
}

pub struct GatewayHandle {
    pub addr: SocketAddr,
    pub tls: bool,
    pub server: actix_web::dev::ServerHandle,
    pub store: Arc<Store>,
    pub registry: Addr<Registry>,
}

impl GatewayHandle {
    pub fn ws_url(&self) -> String {
        let s = if self.tls { "wss" } else { "ws" };
        format!("{s}://{}/v1/ws", self.addr)
    }
    pub fn http_url(&self) -> String {
        let s = if self.tls { "https" } else { "http" };
        format!("{s}://{}", self.addr)
    }
    /// Graceful stop: every session finishes the store writes in flight and acknowledges them,
    /// takes no new batch and closes with 1001; the server stops accepting and waits (up to
    /// `shutdown_timeout`) for the connections to end; then the store writer stops.
    pub async fn stop(self) {
        let sessions = self
            .registry
            .send(tether_actors::registry::ShutdownSessions)
            .await
            .unwrap_or(0);
        log::info!(target: "connection", "event=closing_sessions sessions={sessions}");
        self.server.stop(true).await;
        self.store.close();
    }
}

/// Starts a gateway inside the current actix `System`.
pub fn start(
    settings: GatewaySettings,
    security: GatewaySecurity,
) -> Result<GatewayHandle, GatewayError> {
    let listeners = bind_listeners(&settings.listen)?;
    // One TLS acceptor per listening socket (a builder is used up by the socket it serves).
    let mut acceptors = Vec::new();
    for _ in &listeners {
        acceptors.push(match &security.tls {
            Some(t) => Some(tls::acceptor(t)?),
            None => None,
        });
    }
    let security_tls_on = security.tls.is_some();
    if !security_tls_on {
        log::warn!(target: "connection", "event=insecure_plaintext message=\"serving ws:// and http:// without TLS: local development only\"");
    }
    if security.verifier.is_none() {
        log::warn!(target: "audit", "event=auth_disabled message=\"no clinic tokens required: local development only\"");
    }
    if security.admin.is_none() {
        log::warn!(target: "audit", "event=rest_open message=\"REST API without admin tokens: local development only\"");
    }
    let faults = settings.faults.active();
    let store = store::open(&store::StoreSettings {
        location: settings.store.clone(),
        group_commit_max_events: settings.group_commit_max_events,
        queue: store::DEFAULT_QUEUE,
        queue_bytes: store::DEFAULT_QUEUE_BYTES,
        abort_after_commits: faults.abort_after_commits,
        node: settings.node(),
    })?;
    log::info!(target: "connection", "event=store_open store={}", settings.store);
    let schemas = match &settings.entity_schemas {
        Some(dir) => EntitySchemas::load_dir(dir)?,
        None => EntitySchemas::default(),
    };
    // A lost link is `reconnecting` for three heartbeat intervals, then `offline`; a clinic
    // with more than LAG_EVENTS read and not stored, or whose newest event took longer than
    // LAG_MS from commit to durable, is `lagging`.
    let candidate: String = (0..4)
        .map(|_| format!("{:016x}", rand::random::<u64>()))
        .collect();
    let peer_key = store::wait(store.cluster_key(&candidate))?.into_bytes();
    // Nodes reach each other as clients reach them: over TLS when they serve it, checking the
    // peer's certificate against the fleet's CA (`tls.client_ca`; the system roots without it).
    let peer_tls = match &security.tls {
        Some(t) => Some(tls::connector(&tls::ClientTls {
            ca: t.client_ca.clone(),
            ..Default::default()
        })?),
        None => None,
    };
    let channels =
        channels::GatewayChannels::new(settings.channels.clone(), security.decrypt.clone())
            .map_err(GatewayError::Channels)?;
    let registry = Registry::new(settings.heartbeat_interval * 3, LAG_EVENTS, LAG_MS).start();
    let tasks = monitor::Liveness::default();
    let webhooks = Arc::new(webhooks::Webhooks::new(
        store.clone(),
        settings.webhooks.clone(),
    ));
    webhooks.start(&tasks);
    if let Some(keep) = settings.retention {
        retention::start(store.clone(), webhooks.clone(), keep, &tasks);
    }
    let state = web::Data::new(GatewayState {
        settings: settings.clone(),
        store: store.clone(),
        registry: registry.clone(),
        schemas,
        tasks,
        security,
        http_channels: Default::default(),
        metrics: Default::default(),
        rpc: Default::default(),
        rpc_limits: Default::default(),
        forwards: Default::default(),
        peer_key,
        webhooks,
        registry_reloads: Default::default(),
        channels,
    });
    clinic_registry::start(state.clone())?;
    let cluster_state = state.clone();
    let listen = settings.listen.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            // Per worker: awc clients are not `Send`.
            .app_data(web::Data::new(bridge::BridgeClients::new(
                &state.settings.bridge,
            )))
            .app_data(web::Data::new(session::http::PeerClient::new(
                peer_tls.clone(),
                settings.heartbeat_interval,
            )))
            .app_data(web::PayloadConfig::new(settings.max_frame_bytes + 1024))
            .wrap(actix_web::middleware::from_fn(api::admin_auth))
            .wrap(actix_web::middleware::ErrorHandlers::new().default_handler(problem::rewrite))
            .configure(routes::register)
    })
    .on_connect(peer_identity)
    .workers(settings.workers)
    .shutdown_timeout(settings.shutdown_timeout.as_secs().max(1))
    .disable_signals();
    let bind_err = |cause| GatewayError::Bind {
        addr: listen.clone(),
        cause,
    };
    let tls_on = security_tls_on;
    let mut server = server;
    for (l, acceptor) in listeners.into_iter().zip(acceptors) {
        server = match acceptor {
            Some(a) => server.listen_openssl(l, a).map_err(bind_err)?,
            None => server.listen(l).map_err(bind_err)?,
        };
    }
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| GatewayError::Bind {
            addr: listen.clone(),
            cause: std::io::Error::other("no address bound"),
        })?;
    let server = server.run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(e) = server.await {
            log::error!(target: "error", "event=http_server_failed error={e}");
        }
    });
    log::info!(target: "connection", "event=gateway_listening addr={addr}");
    let advertised = settings.advertised(addr);
    cluster::start(cluster_state, advertised);
    Ok(GatewayHandle {
        addr,
        tls: tls_on,
        server: handle,
        store,
        registry,
    })
}
