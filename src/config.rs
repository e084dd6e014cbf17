//! `config.yaml`: one struct per subsystem, defaults in one place (the `Default` impls), and a
//! validation pass that reports every problem at once, each with its key path and line.
//!
//! Unknown keys are collected (a flattened `extra` map in every section) rather than failing on
//! the first, so `tether check-config` can list them all. Type errors (text where a number is
//! expected) come from the YAML parser, which stops at the first one; it names the line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

type Extra = BTreeMap<String, IgnoredAny>;

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct Config {
    pub logging: LoggingConfig,
    pub agent: Option<AgentConfig>,
    pub gateway: Option<GatewayConfig>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct LoggingConfig {
    /// Directory for the per-category log files.
    pub dir: PathBuf,
    /// error | warn | info | debug | trace
    pub level: String,
    /// Rolled files kept per category (one per day).
    pub keep_days: u32,
    /// Also print a summary (warnings and errors of every category) to the console.
    pub console: bool,
    /// utc | local: the zone of the timestamps and of the day each file holds.
    pub timezone: crate::logging::LogZone,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            dir: PathBuf::from("logs"),
            level: "info".into(),
            keep_days: 14,
            console: true,
            timezone: crate::logging::LogZone::Utc,
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct AgentConfig {
    pub clinic_id: String,
    pub database: DatabaseConfig,
    pub gateway: AgentGatewayConfig,
    pub outbox: OutboxConfig,
    pub tables: Vec<TableConfig>,
    pub encryption: Option<EncryptionConfig>,
    pub shutdown: ShutdownConfig,
    pub admin: AdminConfig,
    pub rpc: RpcConfig,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

/// `agent.rpc`: the named, parameterised, read-only queries the cloud may run through the
/// gateway (`POST /v1/clinics/{id}/rpc`). Nothing else can be asked.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct RpcConfig {
    pub queries: std::collections::BTreeMap<String, RpcQueryConfig>,
    /// A query still running after this is interrupted.
    pub timeout: Dur,
    /// PostgreSQL / SQL Server: run the queries on this connection instead of
    /// `database.connection` (a read replica; `database.password_env` applies). SQL Server gets
    /// `ApplicationIntent=ReadOnly` unless the string sets it (an availability group listener
    /// then routes the queries to a readable secondary).
    pub connection: Option<String>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            queries: Default::default(),
            timeout: Dur::secs(10),
            connection: None,
            extra: Extra::new(),
        }
    }
}

/// One allow-listed query: `sql` with `:name` placeholders for each of `params`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct RpcQueryConfig {
    pub sql: String,
    pub params: Vec<String>,
    /// At most this many rows are returned (`truncated` says when more matched).
    pub max_rows: u64,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

/// `agent.admin`: the local health and metrics endpoint (`/healthz`, `/readyz`, `/metrics`,
/// `/status`), read by `tether agent status`. Loopback addresses only.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AdminConfig {
    /// `127.0.0.1:7571` by default; `off` disables it.
    pub listen: String,
    /// Not ready (`/readyz` 503, `ready: false`) once the oldest unacknowledged change is older
    /// than this, whatever the reason.
    pub ready_lag: Dur,
    /// The local token clinic applications present to subscribe to and publish on channels
    /// (`/v1/channels`): made at the first start, readable by the agent's account only.
    pub channels_token_file: PathBuf,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:7571".into(),
            ready_lag: Dur::secs(10),
            channels_token_file: PathBuf::from("channels.token"),
            extra: Extra::new(),
        }
    }
}

impl AdminConfig {
    /// The address to serve on, or `None` when turned off.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        if self.listen == "off" {
            return None;
        }
        let a = self.listen.replace("localhost", "127.0.0.1");
        a.parse().ok()
    }
}

/// `agent.shutdown`: what happens on SIGTERM / Ctrl-C / a Windows service STOP.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ShutdownConfig {
    /// How long to wait for the gateway to acknowledge the batches already sent before closing
    /// the socket anyway (unacknowledged rows stay in the outbox and are sent next time).
    pub drain_timeout: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Dur::secs(10),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct DatabaseConfig {
    /// sqlite | postgres | sqlserver
    pub kind: String,
    /// sqlite: the database file.
    pub path: PathBuf,
    /// postgres: a libpq-style connection string (`host=… port=… user=… dbname=…`);
    /// sqlserver: an ADO connection string (`server=tcp:host,1433;database=…;user=…;password=…;
    /// encrypt=true;trustservercertificate=false`).
    pub connection: String,
    /// Name of an environment variable holding the password (kept out of the file).
    pub password_env: Option<String>,
    /// sqlserver: CA certificate (PEM) for the server's TLS certificate.
    pub ca: Option<PathBuf>,
    /// Capture mode: `triggers` (default, every engine); sqlserver: `change_tracking`;
    /// postgres: `logical` (a replication slot, no triggers; needs `wal_level = logical`).
    pub capture: String,
    /// postgres `logical`: warn when the server keeps more WAL than this for the slot (MB).
    pub slot_warn_mb: u64,
    /// Every database call gives up after this long (tiberius has no timeout of its own).
    pub timeout: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            kind: "sqlite".into(),
            path: PathBuf::from("clinic.db"),
            connection: String::new(),
            password_env: None,
            ca: None,
            capture: "triggers".into(),
            slot_warn_mb: 1024,
            timeout: Dur::secs(30),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AgentGatewayConfig {
    pub url: String,
    /// The gateway's id: the `aud` of the agent's tokens.
    pub gateway_id: String,
    /// Allow `ws://` and no token (local development only).
    pub insecure_plaintext: bool,
    pub heartbeat_interval: Dur,
    pub connect_timeout: Dur,
    pub backoff: BackoffConfig,
    pub max_frame_bytes: u64,
    pub tls: Option<ClientTlsConfig>,
    pub auth: Option<AgentAuthConfig>,
    /// An HTTP CONNECT proxy; absent: `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` decide.
    pub proxy: Option<ProxyConfig>,
    /// `auto` (WebSocket, falling back to HTTP when upgrades are blocked), `websocket` or `http`.
    pub transport: String,
    /// Blocked upgrades in a row before `auto` falls back to HTTP.
    pub fallback_after: u64,
    /// On the HTTP fallback, how often `auto` checks whether the WebSocket works again.
    pub upgrade_retry: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

/// `agent.gateway.proxy`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct ProxyConfig {
    /// `http://host:port`, or `direct` to ignore the proxy environment variables.
    pub url: String,
    pub username: Option<String>,
    /// Environment variable holding the password (never the file itself) ...
    pub password_env: Option<String>,
    /// ... or a file holding it (first line).
    pub password_file: Option<PathBuf>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl ProxyConfig {
    /// A proxy without credentials.
    pub fn new(url: impl Into<String>) -> Self {
        ProxyConfig {
            url: url.into(),
            ..ProxyConfig::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct ClientTlsConfig {
    /// CA that signed the gateway's certificate; the system roots when absent.
    pub ca: Option<PathBuf>,
    /// This clinic's certificate and RSA private key (PEM) ...
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// ... or a PKCS#12 bundle, with its password in the named environment variable.
    pub pkcs12: Option<PathBuf>,
    pub pkcs12_password_env: Option<String>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AgentAuthConfig {
    /// RSA private key (PEM) that signs the connection tokens; defaults to tls.key.
    pub key: Option<PathBuf>,
    /// The key's id in the gateway's clinic registry.
    pub kid: String,
    /// At most 5m; the agent reconnects with a fresh token before it runs out.
    pub token_lifetime: Dur,
    /// Renew the key and certificate (`tls.cert`, `tls.key`) this long before the certificate
    /// runs out, from a gateway with `gateway.enrolment`; `0s`: never. Needs no `kid` here.
    pub renew_before: Dur,
    /// How often the agent looks at its certificate's end.
    pub renew_check: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for AgentAuthConfig {
    fn default() -> Self {
        AgentAuthConfig {
            key: None,
            kid: String::new(),
            token_lifetime: Dur::secs(300),
            renew_before: Dur::secs(30 * 24 * 3600),
            renew_check: Dur::secs(3600),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct EncryptionConfig {
    /// Data keys by kid (files written by `tether keys data-key`); keep old ones after a rotation.
    pub keys: Vec<DataKeyConfig>,
    /// The kid new values are encrypted with.
    pub active: String,
    /// entity -> field names encrypted before they leave the clinic.
    pub fields: BTreeMap<String, Vec<String>>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DataKeyConfig {
    pub kid: String,
    pub file: PathBuf,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for AgentGatewayConfig {
    fn default() -> Self {
        AgentGatewayConfig {
            url: "ws://127.0.0.1:8080/v1/ws".into(),
            gateway_id: "gw-local".into(),
            insecure_plaintext: false,
            heartbeat_interval: Dur::secs(10),
            connect_timeout: Dur::secs(10),
            backoff: BackoffConfig::default(),
            max_frame_bytes: tether_schemas::DEFAULT_MAX_FRAME_BYTES as u64,
            tls: None,
            auth: None,
            proxy: None,
            transport: "auto".into(),
            fallback_after: 3,
            upgrade_retry: Dur::secs(300),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct BackoffConfig {
    pub initial: Dur,
    pub max: Dur,
    pub reset_after: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Dur::millis(500),
            max: Dur::secs(60),
            reset_after: Dur::secs(60),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct OutboxConfig {
    pub poll_interval: Dur,
    pub batch_max_events: u64,
    pub batch_max_bytes: u64,
    pub max_inflight_batches: u64,
    pub max_buffered_events: u64,
    pub retention: Dur,
    pub purge_interval: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            poll_interval: Dur::millis(50),
            batch_max_events: 500,
            batch_max_bytes: 512 * 1024,
            max_inflight_batches: 4,
            max_buffered_events: 10_000,
            retention: Dur::secs(24 * 3600),
            purge_interval: Dur::secs(60),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
    Both,
}

impl Direction {
    pub fn up(self) -> bool {
        matches!(self, Direction::Up | Direction::Both)
    }
    pub fn down(self) -> bool {
        matches!(self, Direction::Down | Direction::Both)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TableConfig {
    /// `table` or `schema.table`.
    pub table: String,
    pub entity: String,
    pub key: Vec<String>,
    #[serde(default = "default_direction")]
    pub direction: Direction,
    /// What happens when a cloud update meets a clinic change: cloud_wins | clinic_wins |
    /// newest_wins (by `version_column`). Conflicts are recorded, never silently dropped.
    #[serde(default)]
    pub conflict: ConflictPolicy,
    /// The column compared by newest_wins (a version number or an updated_at timestamp).
    #[serde(default)]
    pub version_column: Option<String>,
    /// Send every existing row once when `tether agent install` runs.
    #[serde(default)]
    pub snapshot_on_install: bool,
    /// Column → wire type (`boolean`, `timestamp`, `date`, `decimal`, `binary`, `plain`) where
    /// the column's SQL type does not say it — e.g. a SQLite `INTEGER` column holding 0/1.
    /// See docs/PROTOCOL.md "Values".
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub types: BTreeMap<String, crate::db::values::ValueType>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The cloud update is applied.
    #[default]
    CloudWins,
    /// The update is not applied while the clinic has an unacknowledged change to that row.
    ClinicWins,
    /// The higher `version_column` wins.
    NewestWins,
}

impl ConflictPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::CloudWins => "cloud_wins",
            ConflictPolicy::ClinicWins => "clinic_wins",
            ConflictPolicy::NewestWins => "newest_wins",
        }
    }
}

fn default_direction() -> Direction {
    Direction::Both
}

impl TableConfig {
    pub fn new(table: &str, entity: &str, key: &[&str], direction: Direction) -> Self {
        TableConfig {
            table: table.into(),
            entity: entity.into(),
            key: key.iter().map(|k| k.to_string()).collect(),
            direction,
            conflict: ConflictPolicy::CloudWins,
            version_column: None,
            snapshot_on_install: false,
            types: BTreeMap::new(),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// `host:port`; port 0 picks a free one.
    pub listen: String,
    pub store: StoreConfig,
    pub heartbeat_interval: Dur,
    pub max_frame_bytes: u64,
    /// Directory of `<entity>.schema.json` files checked against event rows (optional).
    pub entity_schemas: Option<PathBuf>,
    /// Updates sent to one clinic and not yet answered.
    pub update_window: u64,
    /// Largest number of events one group commit may hold.
    pub group_commit_max_events: u64,
    /// This gateway's id (the `aud` clinics put in their tokens); the same on every node.
    pub id: String,
    /// This node's id when several gateway nodes share a PostgreSQL store (recorded as the
    /// owner of the clinics it holds, and in `/v1/nodes`). Default: `<host name>:<listen port>`.
    pub node_id: Option<String>,
    /// `host:port` at which the other gateway nodes reach this one (HTTP-fallback requests that
    /// reached the wrong node are passed on to it). Default: the listen address, or
    /// `<host name>:<port>` when it listens on all interfaces.
    pub advertise: Option<String>,
    /// Serve `ws://`/`http://` without TLS, and without tokens if `auth` is absent
    /// (local development only; logged as a warning at start).
    pub insecure_plaintext: bool,
    pub tls: Option<ServerTlsConfig>,
    pub auth: Option<GatewayAuthConfig>,
    /// REST API bearer tokens, stored as SHA-256 (`tether keys admin-token`).
    pub admin_tokens: Vec<crate::security::admin::AdminTokenConfig>,
    /// Data keys to decrypt sensitive fields; without them the store keeps ciphertext.
    pub decryption_keys: Vec<DataKeyConfig>,
    /// The kid (one of `decryption_keys`) the gateway encrypts the `encrypt` fields of down
    /// channel messages with; required when a down channel lists any.
    pub channel_encryption_key: Option<String>,
    pub limits: LimitsConfig,
    /// Endpoints of the main Web API that receive every durable clinic event, signed.
    pub webhooks: Vec<WebhookConfig>,
    /// Endpoints of the main Web API that agents may call through the gateway.
    pub api_bridge: ApiBridgeConfig,
    /// Clinics enrol themselves with a one-time code (`tether agent enrol`); absent: off.
    pub enrolment: Option<EnrolmentConfig>,
    /// Messages between cloud services and the clinics' own applications that are not table
    /// rows (call pops, notices, check-ins): one entry and one JSON Schema file per channel.
    pub channels: Vec<ChannelConfig>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

/// One `gateway.channels` entry (see docs/CHANNELS.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ChannelConfig {
    /// Lower-case letters, digits, `.`, `_`, `-` (e.g. `voip.call`).
    pub name: String,
    /// `down` (cloud → clinic applications), `up` (clinic applications → cloud) or `both`.
    pub direction: String,
    /// `transient` (dropped when `ttl` runs out, never delivered late) or `durable` (kept until
    /// the other side has it; in order, at least once, deduplicated by message id).
    pub delivery: String,
    /// Transient channels: how long a message lives.
    pub ttl: Dur,
    /// The JSON Schema file every payload must match (checked at the gateway and the agent).
    pub schema: PathBuf,
    /// Largest payload (bytes of its JSON).
    pub max_bytes: u64,
    /// Messages per second per clinic, each way (a burst of twice that).
    pub rate_per_second: f64,
    /// Admin token names that may post on it (empty: any token with `write`).
    pub publishers: Vec<String>,
    /// Top-level payload fields carried encrypted (AES-256-GCM under a data key) between the
    /// agent and the gateway and in the gateway's store; each must be a property of the schema.
    pub encrypt: Vec<String>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            name: String::new(),
            direction: "down".into(),
            delivery: "transient".into(),
            ttl: Dur::secs(30),
            schema: PathBuf::new(),
            max_bytes: 16 * 1024,
            rate_per_second: 20.0,
            publishers: Vec::new(),
            encrypt: Vec::new(),
            extra: Extra::new(),
        }
    }
}

/// A channel name: 1-64 of lower-case letters, digits, `.`, `_`, `-`, starting with a letter
/// or digit.
pub fn valid_channel_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// `gateway.enrolment`: a clinic PC makes its own key, sends a certificate request with a
/// one-time code, and gets its certificate from this CA and its registry entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct EnrolmentConfig {
    /// The CA that signs clinic certificates (PEM): the one `gateway.tls.client_ca` trusts.
    pub ca_cert: PathBuf,
    /// Its private key (PEM); keep it readable by the gateway's account only.
    pub ca_key: PathBuf,
    /// How long a code stays valid unless its request asks for less (at most 7d).
    pub code_ttl: Dur,
    /// How long an issued clinic certificate is valid.
    pub cert_days: u32,
    /// The agent config a clinic writes when it enrols: YAML with `{{clinic_id}}`,
    /// `{{gateway_url}}` and `{{gateway_id}}` in it. Absent: connection settings only
    /// (the clinic adds its database and tables).
    pub agent_template: Option<PathBuf>,
    /// The CA clinics should trust for this gateway's own certificate, sent with theirs.
    pub server_ca: Option<PathBuf>,
    /// Renewal: an agent asks for a new certificate this long before its own runs out.
    pub renew_before: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for EnrolmentConfig {
    fn default() -> Self {
        EnrolmentConfig {
            ca_cert: PathBuf::new(),
            ca_key: PathBuf::new(),
            code_ttl: Dur::secs(24 * 3600),
            cert_days: 397,
            agent_template: None,
            server_ca: None,
            renew_before: Dur::secs(30 * 24 * 3600),
            extra: Extra::new(),
        }
    }
}

/// `gateway.api_bridge`: named endpoints of the main Web API that agents may call over their
/// socket (`call_request`), for clinics whose firewall only lets the agent's link out.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct ApiBridgeConfig {
    pub endpoints: std::collections::BTreeMap<String, BridgeEndpointConfig>,
    /// Environment variable with the bearer token the gateway presents upstream.
    pub authorization_env: Option<String>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct BridgeEndpointConfig {
    pub url: String,
    /// `GET` or `POST`.
    pub method: String,
    pub timeout: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for BridgeEndpointConfig {
    fn default() -> Self {
        BridgeEndpointConfig {
            url: String::new(),
            method: "POST".into(),
            timeout: Dur::secs(10),
            extra: Extra::new(),
        }
    }
}

/// One `gateway.webhooks` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct WebhookConfig {
    pub name: String,
    pub url: String,
    /// Environment variable holding the HMAC secret ...
    pub secret_env: Option<String>,
    /// ... or a file holding it.
    pub secret_file: Option<PathBuf>,
    /// Only events of these entities (all when empty).
    pub entities: Vec<String>,
    /// Clinic events at all (`false`: an endpoint for channel messages only).
    pub events: bool,
    /// Up channels whose messages this endpoint also receives (none by default).
    pub channels: Vec<String>,
    /// Attempts before an event goes to the dead-letter list.
    pub max_attempts: u64,
    pub timeout: Dur,
    pub backoff_initial: Dur,
    pub backoff_max: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            name: String::new(),
            url: String::new(),
            secret_env: None,
            secret_file: None,
            entities: Vec::new(),
            events: true,
            channels: Vec::new(),
            max_attempts: 8,
            timeout: Dur::secs(10),
            backoff_initial: Dur::secs(1),
            backoff_max: Dur::secs(60),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct ServerTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a client CA set, agents must present a certificate it signed (mutual TLS) whose
    /// CN or SAN equals their token's subject.
    pub client_ca: Option<PathBuf>,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct GatewayAuthConfig {
    /// Directory of clinic registry entries (`<clinic>.yaml`, from `tether keys registry-entry`).
    pub clinics_dir: PathBuf,
    /// Clock skew allowed on exp/nbf.
    pub leeway: Dur,
    /// How often `clinics_dir` is read for changes (a clinic added, removed or revoked takes
    /// effect without a restart); with `registry: store`, how often the store's is polled.
    pub reload_interval: Dur,
    /// `dir`: the registry is `clinics_dir` (each node reads its own). `store`: it is kept in
    /// the gateway's store, shared by every node (`clinics_dir` entries are imported at start).
    pub registry: String,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for GatewayAuthConfig {
    fn default() -> Self {
        GatewayAuthConfig {
            clinics_dir: PathBuf::from("clinics"),
            leeway: Dur::secs(30),
            reload_interval: Dur::secs(2),
            registry: "dir".into(),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Frames per second one session may send (sustained), and the burst above it.
    pub messages_per_second: u64,
    pub message_burst: u64,
    /// WebSocket upgrades per second accepted gateway-wide, and the burst.
    pub handshakes_per_second: u64,
    pub handshake_burst: u64,
    /// Browser upgrades (with an Origin header) are refused unless the origin is listed.
    pub allowed_origins: Vec<String>,
    /// `POST /v1/clinics/{id}/rpc` per clinic: calls per second (sustained; the burst is twice
    /// that) and calls running at once. Past either: 429 with Retry-After, before the clinic.
    pub rpc_per_second: u64,
    pub rpc_concurrent: u64,
    /// `call_request`s per second one clinic may send through the API bridge (the burst is
    /// twice that); past it the call is answered 429, the link stays up.
    pub calls_per_second: u64,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            messages_per_second: 200,
            message_burst: 400,
            handshakes_per_second: 200,
            handshake_burst: 500,
            allowed_origins: Vec::new(),
            rpc_per_second: 50,
            rpc_concurrent: 4,
            calls_per_second: 100,
            extra: Extra::new(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            store: StoreConfig::default(),
            heartbeat_interval: Dur::secs(10),
            max_frame_bytes: tether_schemas::DEFAULT_MAX_FRAME_BYTES as u64,
            entity_schemas: None,
            update_window: 32,
            group_commit_max_events: 20_000,
            id: "gw-local".into(),
            node_id: None,
            advertise: None,
            insecure_plaintext: false,
            tls: None,
            auth: None,
            admin_tokens: Vec::new(),
            decryption_keys: Vec::new(),
            channel_encryption_key: None,
            limits: LimitsConfig::default(),
            webhooks: Vec::new(),
            api_bridge: ApiBridgeConfig::default(),
            enrolment: None,
            channels: Vec::new(),
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct StoreConfig {
    /// `sqlite` (embedded, one node) or `postgres` (production, several nodes).
    pub kind: String,
    /// The SQLite file (`kind: sqlite`).
    pub path: PathBuf,
    /// The PostgreSQL connection string (`kind: postgres`), e.g.
    /// `host=db user=tether dbname=tether`; a password belongs in `url_env`, not the file.
    pub url: Option<String>,
    /// An environment variable holding the connection string (instead of `url`).
    pub url_env: Option<String>,
    /// The PostgreSQL schema the tables live in (created if missing).
    pub schema: String,
    /// `off` (keep every event) or an age such as `90d`: older events are removed in the
    /// background, never before every webhook endpoint has delivered them.
    pub retention: Dur,
    #[serde(flatten, skip_serializing)]
    extra: Extra,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: "sqlite".into(),
            path: PathBuf::from("gateway.db"),
            url: None,
            url_env: None,
            schema: "tether".into(),
            retention: Dur {
                text: "off".into(),
                value: None,
            },
            extra: Extra::new(),
        }
    }
}

impl StoreConfig {
    /// Where the store is (the PostgreSQL URL read from `url_env` when set).
    #[cfg(feature = "gateway")]
    pub fn location(&self) -> crate::gateway::store::StoreLocation {
        use crate::gateway::store::StoreLocation;
        match self.kind.as_str() {
            "postgres" => StoreLocation::Postgres {
                url: self
                    .url_env
                    .as_ref()
                    .and_then(|v| std::env::var(v).ok())
                    .or_else(|| self.url.clone())
                    .unwrap_or_default(),
                schema: self.schema.clone(),
            },
            _ => StoreLocation::Sqlite(self.path.clone()),
        }
    }

    /// `None` for `off`.
    pub fn retention(&self) -> Option<Duration> {
        (self.retention.text.trim() != "off")
            .then_some(self.retention.value)
            .flatten()
    }
}

/// A PostgreSQL schema name safe to put in SQL unquoted: `[a-z_][a-z0-9_]{0,62}`.
pub fn valid_schema(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        && s.len() <= 63
}

/// A duration written as `250ms`, `10s`, `5m`, `24h` or `7d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dur {
    text: String,
    value: Option<Duration>,
}

impl Dur {
    pub fn millis(ms: u64) -> Self {
        Dur {
            text: format!("{ms}ms"),
            value: Some(Duration::from_millis(ms)),
        }
    }
    pub fn secs(s: u64) -> Self {
        Dur {
            text: format!("{s}s"),
            value: Some(Duration::from_secs(s)),
        }
    }
    /// The parsed value; `validate` has reported unparsable ones, so this falls back to zero.
    pub fn get(&self) -> Duration {
        self.value.unwrap_or_default()
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let value = parse_duration(&text);
        Ok(Dur { text, value })
    }
}

/// Parses `250ms`, `10s`, `5m`, `24h`, `7d` (one number, one unit).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}: {}", list_problems(problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

/// One problem on the same line; several as a count and one line each, in file order.
fn list_problems(problems: &[Problem]) -> String {
    if let [one] = problems {
        return one.to_string();
    }
    let mut sorted: Vec<&Problem> = problems.iter().collect();
    sorted.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    let mut out = format!("{} problems", problems.len());
    for p in sorted {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    out
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Config::parse(&text, &path.display().to_string())?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(cfg)
    }

    /// `tether check-config`: [`Config::load`], then what will fail at start without opening
    /// a connection: every file the config names exists and can be read, every directory it
    /// writes to exists (or can be created), every `*_env` variable is set. One list, in file
    /// order, each with its key and line.
    pub fn check(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let file = path.display().to_string();
        let lines = LineIndex::new(&text);
        let (cfg, problems) = Config::parse_all(&text, &lines);
        let mut v = Validator {
            lines: &lines,
            problems,
        };
        let Some(mut cfg) = cfg else {
            return Err(ConfigError::Invalid {
                file,
                problems: v.problems,
            });
        };
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        v.files(&cfg, &|name| std::env::var_os(name).is_some());
        if v.problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                file,
                problems: v.problems,
            })
        }
    }

    /// Parses and validates; every problem is reported at once — type errors too: after the
    /// first, the document is read again as a plain tree with each faulty key taken out, so
    /// the next one (and then the checks on values) can be found in the same run.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        match Self::parse_all(text, &LineIndex::new(text)) {
            (Some(cfg), problems) if problems.is_empty() => Ok(cfg),
            (_, problems) => Err(ConfigError::Invalid {
                file: file.into(),
                problems,
            }),
        }
    }

    /// The config as far as it could be read (none when a type error could not be taken out
    /// or the text is not YAML), and every problem found.
    fn parse_all(text: &str, lines: &LineIndex) -> (Option<Config>, Vec<Problem>) {
        let (cfg, mut problems) = match serde_saphyr::from_str::<Config>(text) {
            Ok(c) => (Some(c), Vec::new()),
            Err(e) => {
                let line = e.location().map(|l| l.line() as usize);
                let path = line
                    .and_then(|l| lines.path_at(l))
                    .unwrap_or_else(|| "(document)".into());
                let message = e.to_string().lines().next().unwrap_or("").to_string();
                // The line is said once, by the problem itself.
                let message = match message.strip_prefix("error: line ") {
                    Some(rest) => match rest.split_once(": ") {
                        Some((_where, m)) => m.to_string(),
                        None => message,
                    },
                    None => message,
                };
                let first = Problem {
                    path,
                    line,
                    message,
                };
                match serde_saphyr::from_str::<serde_json::Value>(text) {
                    // Not even YAML (indentation, a stray quote): one problem is all there is.
                    Err(_) => (None, vec![first]),
                    Ok(tree) => Self::type_problems(tree, first, lines),
                }
            }
        };
        let Some(cfg) = cfg else {
            return (None, problems);
        };
        let taken_out: Vec<String> = problems.iter().map(|p| p.path.clone()).collect();
        problems.extend(cfg.validate(lines).into_iter().filter(|p| {
            // A key taken out after a type error is checked as its default: not a problem.
            !taken_out
                .iter()
                .any(|t| p.path == *t || p.path.starts_with(&format!("{t}.")))
        }));
        (Some(cfg), problems)
    }

    /// Reads `tree` as a `Config` again and again, taking out each key that fails, until it
    /// reads (then the rest of the checks run on it) or a failure cannot be taken out.
    fn type_problems(
        mut tree: serde_json::Value,
        first: Problem,
        lines: &LineIndex,
    ) -> (Option<Config>, Vec<Problem>) {
        let mut problems: Vec<Problem> = Vec::new();
        let mut cfg = None;
        for _ in 0..100 {
            let e = match serde_path_to_error::deserialize::<_, Config>(&tree) {
                Ok(c) => {
                    cfg = Some(c);
                    break;
                }
                Err(e) => e,
            };
            let path = e.path().to_string();
            // YAML reads `clinic_id: 001` as text where text is wanted; the plain tree has
            // a number there. Not a problem: give it back as text and read on.
            if e.inner().to_string().contains("expected a string") && stringify(&mut tree, e.path())
            {
                continue;
            }
            let line = lines.line_of(&path);
            if !problems.iter().any(|p| p.path == path) {
                problems.push(Problem {
                    path: path.clone(),
                    line,
                    message: e.inner().to_string(),
                });
            }
            if path == "." || !take_out(&mut tree, e.path()) {
                break;
            }
        }
        // The parser's own report (its line is exact) unless the tree found it too (its
        // message shows the value: `invalid type: string "many", expected u32`).
        if !problems.iter().any(|p| p.line == first.line) {
            problems.insert(0, first);
        }
        (cfg, problems)
    }

    /// Relative paths in the file are relative to the file's directory.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.logging.dir);
        let fix_opt = |p: &mut Option<PathBuf>| {
            if let Some(p) = p.as_mut() {
                fix(p);
            }
        };
        if let Some(a) = self.agent.as_mut() {
            fix(&mut a.database.path);
            fix(&mut a.admin.channels_token_file);
            fix_opt(&mut a.database.ca);
            if let Some(t) = a.gateway.tls.as_mut() {
                fix_opt(&mut t.ca);
                fix_opt(&mut t.cert);
                fix_opt(&mut t.key);
                fix_opt(&mut t.pkcs12);
            }
            if let Some(auth) = a.gateway.auth.as_mut() {
                fix_opt(&mut auth.key);
            }
            if let Some(p) = a.gateway.proxy.as_mut() {
                fix_opt(&mut p.password_file);
            }
            if let Some(e) = a.encryption.as_mut() {
                for k in &mut e.keys {
                    fix(&mut k.file);
                }
            }
        }
        if let Some(g) = self.gateway.as_mut() {
            fix(&mut g.store.path);
            fix_opt(&mut g.entity_schemas);
            if let Some(t) = g.tls.as_mut() {
                fix(&mut t.cert);
                fix(&mut t.key);
                fix_opt(&mut t.client_ca);
            }
            if let Some(a) = g.auth.as_mut() {
                fix(&mut a.clinics_dir);
            }
            if let Some(e) = g.enrolment.as_mut() {
                fix(&mut e.ca_cert);
                fix(&mut e.ca_key);
                fix_opt(&mut e.agent_template);
                fix_opt(&mut e.server_ca);
            }
            for k in &mut g.decryption_keys {
                fix(&mut k.file);
            }
            for w in &mut g.webhooks {
                fix_opt(&mut w.secret_file);
            }
            for c in &mut g.channels {
                fix(&mut c.schema);
            }
        }
    }

    fn validate(&self, lines: &LineIndex) -> Vec<Problem> {
        let mut v = Validator {
            lines,
            problems: Vec::new(),
        };
        v.unknown("", &self.extra, &self);
        v.unknown("logging", &self.logging.extra, &self.logging);
        if !["error", "warn", "info", "debug", "trace"].contains(&self.logging.level.as_str()) {
            v.bad(
                "logging.level",
                format!(
                    "`{}` is not one of error, warn, info, debug, trace",
                    self.logging.level
                ),
            );
        }
        if self.logging.keep_days == 0 {
            v.bad("logging.keep_days", "must be at least 1".into());
        }
        if let Some(a) = &self.agent {
            v.agent(a);
        }
        if let Some(g) = &self.gateway {
            v.gateway(g);
        }
        v.problems
    }
}

/// The value the segments lead to in `tree`, if there is one.
fn node_at<'t>(
    tree: &'t mut serde_json::Value,
    segments: &[&serde_path_to_error::Segment],
) -> Option<&'t mut serde_json::Value> {
    use serde_path_to_error::Segment;
    let mut node = tree;
    for seg in segments {
        node = match seg {
            Segment::Map { key } => node.get_mut(key.as_str())?,
            Segment::Seq { index } => node.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(node)
}

/// Removes the value at `path` from `tree`; false when there is nothing there to remove.
fn take_out(tree: &mut serde_json::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    match (last, node_at(tree, parents)) {
        (Segment::Map { key }, Some(serde_json::Value::Object(map))) => {
            map.remove(key.as_str()).is_some()
        }
        (Segment::Seq { index }, Some(serde_json::Value::Array(items))) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

/// Turns the number or boolean at `path` into its text; false when there is none there.
fn stringify(tree: &mut serde_json::Value, path: &serde_path_to_error::Path) -> bool {
    let segments: Vec<_> = path.iter().collect();
    let Some(node) = node_at(tree, &segments) else {
        return false;
    };
    let text = match node {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => return false,
    };
    *node = serde_json::Value::String(text);
    true
}

/// The known key closest to a misspelt one (a few edits apart at most).
fn closest<'k>(key: &str, known: &'k [String]) -> Option<&'k str> {
    let limit = (key.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|k| (edit_distance(&key.to_lowercase(), k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions, and swaps of two
/// neighbours each count one.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

struct Validator<'a> {
    lines: &'a LineIndex,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn bad(&mut self, path: &str, message: String) {
        self.problems.push(Problem {
            path: path.to_string(),
            line: self.lines.line_of(path),
            message,
        });
    }

    /// Keys of `section` the program does not know, each with the known key it most likely
    /// meant (or the list of known keys when none is close).
    fn unknown(&mut self, prefix: &str, extra: &Extra, section: &impl Serialize) {
        if extra.is_empty() {
            return;
        }
        let known: Vec<String> = match serde_json::to_value(section) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        };
        for key in extra.keys() {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            let message = match closest(key, &known) {
                Some(k) => format!("unknown key (did you mean `{k}`?)"),
                None if known.is_empty() => "unknown key".into(),
                None => format!("unknown key (known here: {})", known.join(", ")),
            };
            self.bad(&path, message);
        }
    }

    /// A file the program will read: it exists, is a file, and opens.
    fn readable(&mut self, key: &str, file: &Path) {
        let shown = file.display();
        match std::fs::metadata(file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.bad(key, format!("{shown}: no such file"))
            }
            Err(e) => self.bad(key, format!("{shown}: {e}")),
            Ok(m) if m.is_dir() => self.bad(key, format!("{shown}: a directory, not a file")),
            Ok(_) => {
                if let Err(e) = std::fs::File::open(file) {
                    self.bad(key, format!("{shown}: cannot be read: {e}"));
                }
            }
        }
    }

    /// A directory the program will read from.
    fn readable_dir(&mut self, key: &str, dir: &Path) {
        let shown = dir.display();
        match std::fs::read_dir(dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.bad(key, format!("{shown}: no such directory"))
            }
            Err(e) => self.bad(key, format!("{shown}: cannot be read: {e}")),
        }
    }

    /// A directory the program will write into: it exists and is a directory, or the nearest
    /// existing ancestor is a directory it could be created in.
    fn writable_dir(&mut self, key: &str, dir: &Path) {
        let shown = dir.display();
        let mut probe = dir;
        loop {
            match std::fs::metadata(probe) {
                Ok(m) if m.is_dir() => {
                    if m.permissions().readonly() {
                        self.bad(key, format!("{shown}: {} is read-only", probe.display()));
                    }
                    return;
                }
                Ok(_) => {
                    self.bad(key, format!("{shown}: {} is a file", probe.display()));
                    return;
                }
                Err(_) => match probe.parent() {
                    Some(p) if !p.as_os_str().is_empty() => probe = p,
                    _ => return,
                },
            }
        }
    }

    fn env_set(&mut self, key: &str, name: &Option<String>, is_set: &dyn Fn(&str) -> bool) {
        if let Some(name) = name {
            if !is_set(name) {
                self.bad(key, format!("environment variable {name} is not set"));
            }
        }
    }

    /// See [`Config::check`].
    fn files(&mut self, cfg: &Config, is_set: &dyn Fn(&str) -> bool) {
        self.writable_dir("logging.dir", &cfg.logging.dir);
        if let Some(a) = &cfg.agent {
            let d = &a.database;
            if d.kind == "sqlite" {
                // The agent never creates the clinic's database: a misspelt path would
                // otherwise become an empty database file.
                self.readable("agent.database.path", &d.path);
            }
            if let Some(ca) = &d.ca {
                self.readable("agent.database.ca", ca);
            }
            self.env_set("agent.database.password_env", &d.password_env, is_set);
            if let Some(t) = &a.gateway.tls {
                for (k, f) in [
                    ("ca", &t.ca),
                    ("cert", &t.cert),
                    ("key", &t.key),
                    ("pkcs12", &t.pkcs12),
                ] {
                    if let Some(f) = f {
                        self.readable(&format!("agent.gateway.tls.{k}"), f);
                    }
                }
                self.env_set(
                    "agent.gateway.tls.pkcs12_password_env",
                    &t.pkcs12_password_env,
                    is_set,
                );
            }
            if let Some(f) = a.gateway.auth.as_ref().and_then(|x| x.key.as_ref()) {
                self.readable("agent.gateway.auth.key", f);
            }
            if let Some(p) = &a.gateway.proxy {
                if let Some(f) = &p.password_file {
                    self.readable("agent.gateway.proxy.password_file", f);
                }
                self.env_set("agent.gateway.proxy.password_env", &p.password_env, is_set);
            }
            if let Some(e) = &a.encryption {
                for (i, k) in e.keys.iter().enumerate() {
                    self.readable(&format!("agent.encryption.keys[{i}].file"), &k.file);
                }
            }
        }
        if let Some(g) = &cfg.gateway {
            if g.store.kind == "sqlite" {
                let dir = g.store.path.parent().unwrap_or(Path::new("."));
                self.writable_dir("gateway.store.path", dir);
            }
            self.env_set("gateway.store.url_env", &g.store.url_env, is_set);
            if let Some(dir) = &g.entity_schemas {
                self.readable_dir("gateway.entity_schemas", dir);
            }
            if let Some(t) = &g.tls {
                self.readable("gateway.tls.cert", &t.cert);
                self.readable("gateway.tls.key", &t.key);
                if let Some(ca) = &t.client_ca {
                    self.readable("gateway.tls.client_ca", ca);
                }
            }
            if let Some(a) = &g.auth {
                // A store registry only imports from the directory, when there is one.
                if a.registry != "store" || a.clinics_dir.exists() {
                    self.readable_dir("gateway.auth.clinics_dir", &a.clinics_dir);
                }
            }
            if let Some(e) = &g.enrolment {
                self.readable("gateway.enrolment.ca_cert", &e.ca_cert);
                self.readable("gateway.enrolment.ca_key", &e.ca_key);
                if let Some(t) = &e.agent_template {
                    self.readable("gateway.enrolment.agent_template", t);
                }
                if let Some(ca) = &e.server_ca {
                    self.readable("gateway.enrolment.server_ca", ca);
                }
            }
            for (i, k) in g.decryption_keys.iter().enumerate() {
                self.readable(&format!("gateway.decryption_keys[{i}].file"), &k.file);
            }
            for (i, w) in g.webhooks.iter().enumerate() {
                if let Some(f) = &w.secret_file {
                    self.readable(&format!("gateway.webhooks[{i}].secret_file"), f);
                }
                self.env_set(
                    &format!("gateway.webhooks[{i}].secret_env"),
                    &w.secret_env,
                    is_set,
                );
            }
            self.env_set(
                "gateway.api_bridge.authorization_env",
                &g.api_bridge.authorization_env,
                is_set,
            );
            for (i, c) in g.channels.iter().enumerate() {
                let key = format!("gateway.channels[{i}].schema");
                let before = self.problems.len();
                self.readable(&key, &c.schema);
                if self.problems.len() == before {
                    let mut s = tether_schemas::EntitySchemas::default();
                    let compiled = std::fs::read_to_string(&c.schema)
                        .map_err(|e| e.to_string())
                        .and_then(|t| {
                            s.insert(&c.name, &t).map_err(|e| e.to_string())?;
                            serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string())
                        });
                    match compiled {
                        Err(e) => self.bad(&key, e),
                        Ok(schema) => {
                            let props = schema.get("properties").and_then(|p| p.as_object());
                            for (j, f) in c.encrypt.iter().enumerate() {
                                if !props.is_some_and(|p| p.contains_key(f)) {
                                    self.bad(
                                        &format!("gateway.channels[{i}].encrypt[{j}]"),
                                        format!("`{f}` is not a top-level property of the channel's schema ({})", c.schema.display()),
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn duration(&mut self, path: &str, d: &Dur, min: Duration) {
        match d.value {
            None => self.bad(
                path,
                format!(
                    "`{}` is not a duration (use e.g. 250ms, 10s, 5m, 24h, 7d)",
                    d.text
                ),
            ),
            Some(v) if v < min => self.bad(
                path,
                format!("`{}` is below the minimum of {min:?}", d.text),
            ),
            Some(_) => {}
        }
    }

    fn positive(&mut self, path: &str, n: u64) {
        if n == 0 {
            self.bad(path, "must be greater than 0".into());
        }
    }

    fn agent(&mut self, a: &AgentConfig) {
        self.unknown("agent", &a.extra, &a);
        self.unknown("agent.database", &a.database.extra, &a.database);
        self.unknown("agent.gateway", &a.gateway.extra, &a.gateway);
        self.unknown(
            "agent.gateway.backoff",
            &a.gateway.backoff.extra,
            &a.gateway.backoff,
        );
        self.unknown("agent.outbox", &a.outbox.extra, &a.outbox);
        self.unknown("agent.shutdown", &a.shutdown.extra, &a.shutdown);
        self.unknown("agent.admin", &a.admin.extra, &a.admin);
        self.unknown("agent.rpc", &a.rpc.extra, &a.rpc);
        if a.rpc.connection.is_some()
            && !matches!(a.database.kind.as_str(), "postgres" | "sqlserver")
        {
            self.bad(
                "agent.rpc.connection",
                "only for PostgreSQL and SQL Server (SQLite's queries read the database file, on a connection that cannot write)".into(),
            );
        }
        self.duration(
            "agent.rpc.timeout",
            &a.rpc.timeout,
            Duration::from_millis(10),
        );
        for (name, q) in &a.rpc.queries {
            let key = format!("agent.rpc.queries.{name}");
            self.unknown(&key, &q.extra, &q);
            if !valid_id(name) {
                self.bad(
                    &key,
                    "query names are 1-64 letters, digits, -, _ or .".into(),
                );
            }
            if q.sql.trim().is_empty() {
                self.bad(&format!("{key}.sql"), "missing".into());
            } else if let Some(why) = read_only_sql_problem(&q.sql) {
                self.bad(
                    &format!("{key}.sql"),
                    format!("query `{name}` is not read-only: {why}"),
                );
            } else {
                #[cfg(feature = "sqlserver")]
                if a.database.kind == "sqlserver" {
                    if let Some(why) = crate::db::sqlserver::queries::tsql_problem(&q.sql) {
                        self.bad(
                            &format!("{key}.sql"),
                            format!("query `{name}` is not read-only: {why}"),
                        );
                    }
                }
            }
            for p in &q.params {
                if !valid_id(p) || !q.sql.contains(&format!(":{p}")) {
                    self.bad(
                        &format!("{key}.params"),
                        format!("`{p}` does not appear in sql as :{p}"),
                    );
                }
            }
        }
        self.duration(
            "agent.admin.ready_lag",
            &a.admin.ready_lag,
            Duration::from_secs(1),
        );
        if a.admin.listen != "off" {
            match a.admin.addr() {
                None => self.bad(
                    "agent.admin.listen",
                    format!("`{}` is not host:port (or `off`)", a.admin.listen),
                ),
                Some(addr) if !addr.ip().is_loopback() => self.bad(
                    "agent.admin.listen",
                    format!("{addr} is not a loopback address: the admin endpoint is local only (127.0.0.1 or ::1)"),
                ),
                Some(_) => {}
            }
        }
        if let Some(p) = &a.gateway.proxy {
            self.unknown("agent.gateway.proxy", &p.extra, &p);
            if p.url.is_empty() {
                self.bad(
                    "agent.gateway.proxy.url",
                    "missing (http://host:port, or `direct`)".into(),
                );
            } else if p.url != "direct" {
                if let Err(e) = crate::proxy::Proxy::parse(&p.url, "agent.gateway.proxy.url") {
                    self.bad("agent.gateway.proxy.url", e.message);
                }
            }
            if p.password_env.is_some() && p.password_file.is_some() {
                self.bad(
                    "agent.gateway.proxy",
                    "give password_env or password_file, not both".into(),
                );
            }
            if (p.password_env.is_some() || p.password_file.is_some()) && p.username.is_none() {
                self.bad(
                    "agent.gateway.proxy.username",
                    "a password is configured but no username".into(),
                );
            }
        }
        if !["auto", "websocket", "http"].contains(&a.gateway.transport.as_str()) {
            self.bad(
                "agent.gateway.transport",
                format!(
                    "`{}` is not one of auto, websocket, http",
                    a.gateway.transport
                ),
            );
        }
        self.positive("agent.gateway.fallback_after", a.gateway.fallback_after);
        self.duration(
            "agent.gateway.upgrade_retry",
            &a.gateway.upgrade_retry,
            Duration::from_millis(100),
        );
        if !valid_id(&a.clinic_id) {
            self.bad(
                "agent.clinic_id",
                "must be 1-64 characters of letters, digits, `-`, `_` or `.`".into(),
            );
        }
        match a.database.kind.as_str() {
            "sqlite" => {}
            "postgres" | "sqlserver" => {
                if a.database.connection.trim().is_empty() {
                    self.bad(
                        "agent.database.connection",
                        format!("required for kind {}", a.database.kind),
                    );
                }
            }
            other => self.bad(
                "agent.database.kind",
                format!("`{other}` is not one of sqlite, postgres, sqlserver"),
            ),
        }
        if !["triggers", "change_tracking", "logical"].contains(&a.database.capture.as_str()) {
            self.bad(
                "agent.database.capture",
                format!(
                    "`{}` is not one of triggers, change_tracking, logical",
                    a.database.capture
                ),
            );
        } else if a.database.capture == "change_tracking" && a.database.kind != "sqlserver" {
            self.bad(
                "agent.database.capture",
                "change_tracking is a SQL Server capture mode".into(),
            );
        } else if a.database.capture == "logical" && a.database.kind != "postgres" {
            self.bad(
                "agent.database.capture",
                "logical is a PostgreSQL capture mode".into(),
            );
        }
        self.duration(
            "agent.database.timeout",
            &a.database.timeout,
            Duration::from_millis(100),
        );
        let url = a.gateway.url.as_str();
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            self.bad(
                "agent.gateway.url",
                format!("`{url}` must start with ws:// or wss://"),
            );
        } else if url.starts_with("ws://") && !a.gateway.insecure_plaintext {
            self.bad(
                "agent.gateway.url",
                "ws:// sends patient data in clear: use wss://, or set agent.gateway.insecure_plaintext: true for local development".into(),
            );
        }
        if let Some(t) = &a.gateway.tls {
            self.unknown("agent.gateway.tls", &t.extra, &t);
            if t.pkcs12.is_some() && (t.cert.is_some() || t.key.is_some()) {
                self.bad(
                    "agent.gateway.tls.pkcs12",
                    "use either pkcs12 or cert + key, not both".into(),
                );
            }
            if t.cert.is_some() != t.key.is_some() {
                self.bad("agent.gateway.tls.cert", "cert and key go together".into());
            }
        }
        match &a.gateway.auth {
            Some(auth) => {
                self.unknown("agent.gateway.auth", &auth.extra, &auth);
                if !auth.kid.is_empty() && !valid_id(&auth.kid) {
                    self.bad("agent.gateway.auth.kid", "must name the key in the gateway's clinic registry (letters, digits, - _ .); leave it out to use the key's own id".into());
                }
                self.duration("agent.gateway.auth.token_lifetime", &auth.token_lifetime, Duration::from_secs(2));
                self.duration("agent.gateway.auth.renew_before", &auth.renew_before, Duration::ZERO);
                self.duration("agent.gateway.auth.renew_check", &auth.renew_check, Duration::from_secs(1));
                if auth.token_lifetime.get() > Duration::from_secs(300) {
                    self.bad("agent.gateway.auth.token_lifetime", "must be at most 5m".into());
                }
                let has_key = auth.key.is_some()
                    || a.gateway.tls.as_ref().is_some_and(|t| t.key.is_some());
                if !has_key {
                    self.bad("agent.gateway.auth.key", "no signing key: set auth.key or tls.key".into());
                }
            }
            None if !a.gateway.insecure_plaintext => self.bad(
                "agent.gateway.auth",
                "required (the agent proves its identity with a signed token) unless insecure_plaintext: true".into(),
            ),
            None => {}
        }
        if !valid_id(&a.gateway.gateway_id) {
            self.bad(
                "agent.gateway.gateway_id",
                "must be letters, digits, - _ .".into(),
            );
        }
        if let Some(e) = &a.encryption {
            self.unknown("agent.encryption", &e.extra, &e);
            for (i, k) in e.keys.iter().enumerate() {
                self.unknown(&format!("agent.encryption.keys[{i}]"), &k.extra, &k);
            }
            if !e.keys.iter().any(|k| k.kid == e.active) {
                self.bad(
                    "agent.encryption.active",
                    format!("`{}` is not one of agent.encryption.keys", e.active),
                );
            }
            for (entity, fields) in &e.fields {
                if let Some(t) = a.tables.iter().find(|t| &t.entity == entity) {
                    if let Some(f) = fields.iter().find(|f| t.key.contains(f)) {
                        self.bad(
                            &format!("agent.encryption.fields.{entity}"),
                            format!("`{f}` is a key column; keys cannot be encrypted"),
                        );
                    }
                } else {
                    self.bad(
                        &format!("agent.encryption.fields.{entity}"),
                        format!("entity `{entity}` is not in agent.tables"),
                    );
                }
            }
        }
        let ms = Duration::from_millis(1);
        self.duration(
            "agent.shutdown.drain_timeout",
            &a.shutdown.drain_timeout,
            ms,
        );
        self.duration(
            "agent.gateway.heartbeat_interval",
            &a.gateway.heartbeat_interval,
            Duration::from_millis(100),
        );
        self.duration(
            "agent.gateway.connect_timeout",
            &a.gateway.connect_timeout,
            Duration::from_millis(100),
        );
        self.duration(
            "agent.gateway.backoff.initial",
            &a.gateway.backoff.initial,
            ms,
        );
        self.duration("agent.gateway.backoff.max", &a.gateway.backoff.max, ms);
        self.duration(
            "agent.gateway.backoff.reset_after",
            &a.gateway.backoff.reset_after,
            ms,
        );
        if a.gateway.backoff.max.get() < a.gateway.backoff.initial.get() {
            self.bad(
                "agent.gateway.backoff.max",
                "must not be below backoff.initial".into(),
            );
        }
        if a.gateway.max_frame_bytes < 1024 {
            self.bad(
                "agent.gateway.max_frame_bytes",
                "must be at least 1024".into(),
            );
        }
        let o = &a.outbox;
        self.duration("agent.outbox.poll_interval", &o.poll_interval, ms);
        self.duration("agent.outbox.retention", &o.retention, Duration::ZERO);
        self.duration(
            "agent.outbox.purge_interval",
            &o.purge_interval,
            Duration::from_millis(100),
        );
        self.positive("agent.outbox.batch_max_events", o.batch_max_events);
        self.positive("agent.outbox.max_inflight_batches", o.max_inflight_batches);
        if o.batch_max_bytes < 1024 || o.batch_max_bytes >= a.gateway.max_frame_bytes {
            self.bad(
                "agent.outbox.batch_max_bytes",
                "must be at least 1024 and below agent.gateway.max_frame_bytes".into(),
            );
        }
        if o.max_buffered_events < o.batch_max_events {
            self.bad(
                "agent.outbox.max_buffered_events",
                "must be at least batch_max_events".into(),
            );
        }
        if a.tables.is_empty() {
            self.bad("agent.tables", "at least one table must be mapped".into());
        }
        let mut entities = std::collections::HashSet::new();
        for (i, t) in a.tables.iter().enumerate() {
            let p = format!("agent.tables[{i}]");
            self.unknown(&p, &t.extra, &t);
            if t.table.is_empty() || t.table.starts_with("_tether") {
                self.bad(
                    &format!("{p}.table"),
                    "must name a table (not a _tether one)".into(),
                );
            }
            if !valid_id(&t.entity) {
                self.bad(
                    &format!("{p}.entity"),
                    "must be 1-64 characters of letters, digits, `-`, `_` or `.`".into(),
                );
            } else if !entities.insert(t.entity.clone()) {
                self.bad(
                    &format!("{p}.entity"),
                    format!("entity `{}` is mapped twice", t.entity),
                );
            }
            if t.key.is_empty() {
                self.bad(&format!("{p}.key"), "at least one key column".into());
            }
            if t.conflict == ConflictPolicy::NewestWins && t.version_column.is_none() {
                self.bad(
                    &format!("{p}.version_column"),
                    "required by conflict: newest_wins".into(),
                );
            }
        }
    }

    fn gateway(&mut self, g: &GatewayConfig) {
        self.unknown("gateway", &g.extra, &g);
        if let Some(a) = &g.advertise {
            let port_ok = a.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok {
                self.bad(
                    "gateway.advertise",
                    format!("`{a}` is not host:port (the address other gateway nodes reach this one at)"),
                );
            }
        }
        self.unknown("gateway.store", &g.store.extra, &g.store);
        self.unknown("gateway.limits", &g.limits.extra, &g.limits);
        self.unknown("gateway.api_bridge", &g.api_bridge.extra, &g.api_bridge);
        for (name, e) in &g.api_bridge.endpoints {
            let key = format!("gateway.api_bridge.endpoints.{name}");
            self.unknown(&key, &e.extra, &e);
            if !valid_id(name) {
                self.bad(
                    &key,
                    "endpoint names are 1-64 letters, digits, -, _ or .".into(),
                );
            }
            if !(e.url.starts_with("https://") || e.url.starts_with("http://")) {
                self.bad(
                    &format!("{key}.url"),
                    format!("`{}` is not an http(s) URL", e.url),
                );
            }
            if !["GET", "POST"].contains(&e.method.as_str()) {
                self.bad(
                    &format!("{key}.method"),
                    format!("`{}` is not GET or POST", e.method),
                );
            }
            self.duration(
                &format!("{key}.timeout"),
                &e.timeout,
                Duration::from_millis(10),
            );
        }
        for (i, w) in g.webhooks.iter().enumerate() {
            let key = format!("gateway.webhooks[{i}]");
            self.unknown(&key, &w.extra, &w);
            if !valid_id(&w.name) {
                self.bad(
                    &format!("{key}.name"),
                    "1-64 letters, digits, -, _ or .".into(),
                );
            }
            if !(w.url.starts_with("https://") || w.url.starts_with("http://")) {
                self.bad(
                    &format!("{key}.url"),
                    format!("`{}` is not an http(s) URL", w.url),
                );
            }
            if w.secret_env.is_none() && w.secret_file.is_none() {
                self.bad(
                    &key,
                    "needs secret_env or secret_file (the HMAC key)".into(),
                );
            }
            for (j, c) in w.channels.iter().enumerate() {
                let up = g.channels.iter().find(|d| &d.name == c).map(|d| {
                    tether_schemas::ChannelDirection::parse(&d.direction).is_some_and(|d| d.up())
                });
                match up {
                    Some(true) => {}
                    Some(false) => self.bad(
                        &format!("{key}.channels[{j}]"),
                        format!("channel `{c}` goes to the clinics; only up channels are pushed to webhooks"),
                    ),
                    None => self.bad(
                        &format!("{key}.channels[{j}]"),
                        format!("no channel `{c}` in gateway.channels"),
                    ),
                }
            }
            if !w.events && w.channels.is_empty() {
                self.bad(
                    &key,
                    "delivers nothing: `events: false` and no `channels`".into(),
                );
            }
            self.positive(&format!("{key}.max_attempts"), w.max_attempts);
            self.duration(
                &format!("{key}.timeout"),
                &w.timeout,
                Duration::from_millis(10),
            );
            self.duration(
                &format!("{key}.backoff_initial"),
                &w.backoff_initial,
                Duration::from_millis(1),
            );
            self.duration(
                &format!("{key}.backoff_max"),
                &w.backoff_max,
                Duration::from_millis(1),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in g.channels.iter().enumerate() {
            let key = format!("gateway.channels[{i}]");
            self.unknown(&key, &c.extra, &c);
            if !valid_channel_name(&c.name) {
                self.bad(
                    &format!("{key}.name"),
                    format!(
                        "`{}` is not 1-64 of a-z, 0-9, ., _, - (starting with a letter or digit)",
                        c.name
                    ),
                );
            } else if !seen.insert(c.name.as_str()) {
                self.bad(
                    &format!("{key}.name"),
                    format!("channel `{}` is declared twice", c.name),
                );
            }
            if tether_schemas::ChannelDirection::parse(&c.direction).is_none() {
                self.bad(
                    &format!("{key}.direction"),
                    format!("`{}` is not down, up or both", c.direction),
                );
            }
            match tether_schemas::ChannelDelivery::parse(&c.delivery) {
                None => self.bad(
                    &format!("{key}.delivery"),
                    format!("`{}` is not transient or durable", c.delivery),
                ),
                Some(tether_schemas::ChannelDelivery::Transient) => {
                    self.duration(&format!("{key}.ttl"), &c.ttl, Duration::from_millis(100));
                }
                Some(tether_schemas::ChannelDelivery::Durable) => {}
            }
            if c.schema.as_os_str().is_empty() {
                self.bad(
                    &format!("{key}.schema"),
                    "required: the JSON Schema file of the payload".into(),
                );
            }
            self.positive(&format!("{key}.max_bytes"), c.max_bytes);
            if c.max_bytes > g.max_frame_bytes / 2 {
                self.bad(
                    &format!("{key}.max_bytes"),
                    format!("{} is more than half of gateway.max_frame_bytes ({}); a message must fit in one frame", c.max_bytes, g.max_frame_bytes),
                );
            }
            if !(c.rate_per_second.is_finite() && c.rate_per_second > 0.0) {
                self.bad(
                    &format!("{key}.rate_per_second"),
                    "must be a number above 0".into(),
                );
            }
            let mut listed = std::collections::HashSet::new();
            for (j, f) in c.encrypt.iter().enumerate() {
                if !listed.insert(f.as_str()) {
                    self.bad(
                        &format!("{key}.encrypt[{j}]"),
                        format!("`{f}` is listed twice"),
                    );
                }
            }
            let down =
                tether_schemas::ChannelDirection::parse(&c.direction).is_some_and(|d| d.down());
            if down && !c.encrypt.is_empty() && g.channel_encryption_key.is_none() {
                self.bad(
                    &format!("{key}.encrypt"),
                    "a down channel with encrypted fields needs gateway.channel_encryption_key (the kid of gateway.decryption_keys to encrypt them with)".into(),
                );
            }
            for (j, p) in c.publishers.iter().enumerate() {
                if !g.admin_tokens.iter().any(|t| &t.name == p) {
                    self.bad(
                        &format!("{key}.publishers[{j}]"),
                        format!("no admin token named `{p}` in gateway.admin_tokens"),
                    );
                }
            }
        }
        if let Some(kid) = &g.channel_encryption_key {
            if !g.decryption_keys.iter().any(|k| &k.kid == kid) {
                self.bad(
                    "gateway.channel_encryption_key",
                    format!("`{kid}` is not one of gateway.decryption_keys"),
                );
            }
        }
        if !valid_id(&g.id) {
            self.bad("gateway.id", "must be letters, digits, - _ .".into());
        }
        match &g.tls {
            Some(t) => self.unknown("gateway.tls", &t.extra, &t),
            None if !g.insecure_plaintext => self.bad(
                "gateway.tls",
                "required (cert, key, client_ca) unless insecure_plaintext: true".into(),
            ),
            None => {}
        }
        match &g.auth {
            Some(a) => {
                self.unknown("gateway.auth", &a.extra, &a);
                self.duration("gateway.auth.leeway", &a.leeway, Duration::ZERO);
                if a.leeway.get() > Duration::from_secs(300) {
                    self.bad("gateway.auth.leeway", "must be at most 5m".into());
                }
                if !matches!(a.registry.as_str(), "dir" | "store") {
                    self.bad(
                        "gateway.auth.registry",
                        format!("`{}`: dir (clinics_dir) or store (kept in the gateway's store, shared by every node)", a.registry),
                    );
                }
            }
            None if !g.insecure_plaintext => self.bad(
                "gateway.auth",
                "required (clinics_dir) unless insecure_plaintext: true".into(),
            ),
            None => {}
        }
        if let Some(e) = &g.enrolment {
            self.unknown("gateway.enrolment", &e.extra, &e);
            if g.auth.is_none() {
                self.bad(
                    "gateway.enrolment",
                    "needs gateway.auth: enrolled clinics are added to its registry".into(),
                );
            }
            if e.ca_cert.as_os_str().is_empty() || e.ca_key.as_os_str().is_empty() {
                self.bad(
                    "gateway.enrolment",
                    "ca_cert and ca_key are required (the CA that signs clinic certificates)"
                        .into(),
                );
            }
            self.duration(
                "gateway.enrolment.code_ttl",
                &e.code_ttl,
                Duration::from_secs(60),
            );
            if e.code_ttl.get() > Duration::from_secs(7 * 24 * 3600) {
                self.bad("gateway.enrolment.code_ttl", "must be at most 7d".into());
            }
            if !(1..=825).contains(&e.cert_days) {
                self.bad("gateway.enrolment.cert_days", "must be 1 to 825".into());
            }
            if e.renew_before.get() >= Duration::from_secs(u64::from(e.cert_days) * 86_400) {
                self.bad(
                    "gateway.enrolment.renew_before",
                    "must be shorter than cert_days".into(),
                );
            }
        }
        if g.admin_tokens.is_empty() && !g.insecure_plaintext {
            self.bad(
                "gateway.admin_tokens",
                "at least one token is required for the REST API unless insecure_plaintext: true"
                    .into(),
            );
        }
        for (i, t) in g.admin_tokens.iter().enumerate() {
            if t.sha256.len() != 64 || !t.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                self.bad(
                    &format!("gateway.admin_tokens[{i}].sha256"),
                    "must be 64 hex digits (tether keys admin-token)".into(),
                );
            }
            if t.scopes.is_empty() {
                self.bad(
                    &format!("gateway.admin_tokens[{i}].scopes"),
                    "at least one of read, write".into(),
                );
            }
        }
        for (i, k) in g.decryption_keys.iter().enumerate() {
            self.unknown(&format!("gateway.decryption_keys[{i}]"), &k.extra, &k);
        }
        self.positive(
            "gateway.limits.messages_per_second",
            g.limits.messages_per_second,
        );
        self.positive("gateway.limits.message_burst", g.limits.message_burst);
        self.positive(
            "gateway.limits.handshakes_per_second",
            g.limits.handshakes_per_second,
        );
        self.positive("gateway.limits.handshake_burst", g.limits.handshake_burst);
        self.positive("gateway.limits.rpc_per_second", g.limits.rpc_per_second);
        self.positive("gateway.limits.rpc_concurrent", g.limits.rpc_concurrent);
        self.positive("gateway.limits.calls_per_second", g.limits.calls_per_second);
        if g.listen.parse::<std::net::SocketAddr>().is_err() {
            self.bad(
                "gateway.listen",
                format!("`{}` is not host:port (e.g. 0.0.0.0:8080)", g.listen),
            );
        }
        match g.store.kind.as_str() {
            "sqlite" => {}
            "postgres" if cfg!(feature = "postgres") => {
                match (&g.store.url, &g.store.url_env) {
                    (None, None) => self.bad(
                        "gateway.store.url",
                        "kind: postgres needs `url` (or `url_env`, the variable holding it)".into(),
                    ),
                    (Some(_), Some(_)) => self.bad(
                        "gateway.store.url_env",
                        "give `url` or `url_env`, not both".into(),
                    ),
                    (None, Some(var)) if std::env::var(var).is_err() => self.bad(
                        "gateway.store.url_env",
                        format!("environment variable {var} is not set"),
                    ),
                    _ => {}
                }
                if !valid_schema(&g.store.schema) {
                    self.bad(
                        "gateway.store.schema",
                        format!(
                            "`{}` is not a plain schema name ([a-z_][a-z0-9_]*)",
                            g.store.schema
                        ),
                    );
                }
            }
            "postgres" => self.bad(
                "gateway.store.kind",
                "`postgres` is not in this build (built without the `postgres` feature)".into(),
            ),
            other => self.bad(
                "gateway.store.kind",
                format!("`{other}` is not a store kind (sqlite or postgres)"),
            ),
        }
        if g.store.retention.text.trim() != "off" {
            self.duration(
                "gateway.store.retention",
                &g.store.retention,
                Duration::from_secs(3600),
            );
        }
        self.duration(
            "gateway.heartbeat_interval",
            &g.heartbeat_interval,
            Duration::from_millis(100),
        );
        if g.max_frame_bytes < 1024 {
            self.bad("gateway.max_frame_bytes", "must be at least 1024".into());
        }
        self.positive("gateway.update_window", g.update_window);
        self.positive("gateway.group_commit_max_events", g.group_commit_max_events);
    }
}

/// Clinic ids and entity names: safe in logs, URLs and file names.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Maps key paths (`agent.tables[1].key`) to line numbers for block-style YAML.
pub struct LineIndex {
    paths: Vec<(String, usize)>,
}

struct Frame {
    indent: usize,
    seg: String,
    item: bool,
    open: bool,
    items: usize,
}

impl LineIndex {
    pub fn new(text: &str) -> Self {
        let mut paths = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = strip_comment(raw);
            let content = line.trim_start();
            if content.is_empty() || content.starts_with("---") {
                continue;
            }
            let mut indent = line.len() - content.len();
            let mut rest = content;
            if rest == "-" || rest.starts_with("- ") {
                while let Some(top) = stack.last() {
                    if top.indent > indent || (top.indent == indent && (top.item || !top.open)) {
                        stack.pop();
                    } else {
                        break;
                    }
                }
                let idx = match stack.last_mut() {
                    Some(parent) => {
                        parent.items += 1;
                        parent.items - 1
                    }
                    None => 0,
                };
                stack.push(Frame {
                    indent,
                    seg: format!("[{idx}]"),
                    item: true,
                    open: true,
                    items: 0,
                });
                paths.push((join(&stack), n + 1));
                rest = rest[1..].trim_start();
                indent += content.len() - rest.len();
                if rest.is_empty() {
                    continue;
                }
            }
            let Some((key, value)) = split_key(rest) else {
                continue;
            };
            while stack.last().is_some_and(|t| t.indent >= indent) {
                stack.pop();
            }
            stack.push(Frame {
                indent,
                seg: key.to_string(),
                item: false,
                open: value.trim().is_empty(),
                items: 0,
            });
            paths.push((join(&stack), n + 1));
        }
        LineIndex { paths }
    }

    pub fn line_of(&self, path: &str) -> Option<usize> {
        // The path itself, or the closest ancestor written in the file.
        let mut p = path.to_string();
        loop {
            if let Some((_, l)) = self.paths.iter().find(|(q, _)| *q == p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }

    pub fn path_at(&self, line: usize) -> Option<String> {
        self.paths
            .iter()
            .filter(|(_, l)| *l <= line)
            .max_by_key(|(_, l)| *l)
            .map(|(p, _)| p.clone())
    }
}

fn join(stack: &[Frame]) -> String {
    let mut s = String::new();
    for f in stack {
        if !f.item && !s.is_empty() {
            s.push('.');
        }
        s.push_str(&f.seg);
    }
    s
}

fn split_key(s: &str) -> Option<(&str, &str)> {
    let idx = s.find(':')?;
    let (k, v) = s.split_at(idx);
    let v = &v[1..];
    if !(v.is_empty() || v.starts_with(' ')) {
        return None;
    }
    let k = k.trim().trim_matches(|c| c == '"' || c == '\'');
    (!k.is_empty() && !k.contains(' ')).then_some((k, v))
}

fn strip_comment(line: &str) -> &str {
    let mut in_single = false;
    let mut in_double = false;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !in_double => in_single = !in_single,
            '"' if !in_single => in_double = !in_double,
            '#' if !in_single && !in_double && prev.is_whitespace() => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
logging:
  dir: logs
agent:
  clinic_id: clinic-1
  gateway:
    url: ws://127.0.0.1:9/v1/ws
    insecure_plaintext: true
    heartbeat_interval: 2s
  tables:
    - table: patients
      entity: patient
      key: [id]
    - table: payments
      entity: payment
      key: [id]
      direction: up
gateway:
  listen: 127.0.0.1:0
  insecure_plaintext: true
";

    #[test]
    fn checked_in_config_is_valid() {
        let text = include_str!("../config.yaml");
        let cfg = Config::parse(text, "config.yaml").expect("config.yaml must be valid");
        assert!(cfg.agent.is_some() && cfg.gateway.is_some());
    }

    #[test]
    fn enrolment_settings_are_checked_by_name_and_line() {
        let base = "gateway:\n  listen: 127.0.0.1:0\n  insecure_plaintext: true\n  enrolment:\n";
        let problems = |body: &str| -> Vec<(String, Option<usize>, String)> {
            match Config::parse(&format!("{base}{body}"), "t") {
                Ok(_) => Vec::new(),
                Err(e) => e
                    .problems()
                    .iter()
                    .map(|p| (p.path.clone(), p.line, p.message.clone()))
                    .collect(),
            }
        };
        // No registry to enrol into, no CA, a code that lives too long, a typo.
        let p = problems("    code_tll: 1h\n    code_ttl: 30d\n    cert_days: 0\n");
        let paths: Vec<&str> = p.iter().map(|(k, _, _)| k.as_str()).collect();
        for want in [
            "gateway.enrolment",
            "gateway.enrolment.code_ttl",
            "gateway.enrolment.cert_days",
        ] {
            assert!(paths.contains(&want), "{want} missing from {p:?}");
        }
        let ttl = p
            .iter()
            .find(|(k, _, _)| k == "gateway.enrolment.code_ttl")
            .expect("ttl");
        assert_eq!(ttl.1, Some(6), "{ttl:?}");
        assert!(ttl.2.contains("7d"), "{ttl:?}");
        assert!(
            p.iter().any(|(_, _, m)| m.contains("gateway.auth")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|(k, l, m)| k == "gateway.enrolment.code_tll"
                && *l == Some(5)
                && m.contains("code_ttl")),
            "the typo is named: {p:?}"
        );
        // renew_before must leave room inside the certificate's life.
        let p = problems("    cert_days: 10\n    renew_before: 30d\n");
        assert!(
            p.iter()
                .any(|(k, _, _)| k == "gateway.enrolment.renew_before"),
            "{p:?}"
        );
    }

    #[test]
    fn channel_encryption_is_checked_against_the_schema_and_the_keys() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join("call.schema.json"),
            r#"{"type": "object", "properties": {"call_id": {"type": "string"}, "caller": {"type": "string"}}}"#,
        )
        .expect("schema");
        crate::security::keys::write_data_key(&dir.path().join("dk1.key")).expect("key");
        let check = |extra: &str| {
            let text = format!(
                "gateway:\n  listen: 127.0.0.1:0\n  insecure_plaintext: true\n  decryption_keys:\n    - {{kid: dk1, file: dk1.key}}\n{extra}  channels:\n    - name: voip.call\n      schema: call.schema.json\n      encrypt: [caller, called, caller]\n    - name: desk\n      direction: up\n      schema: call.schema.json\n      encrypt: [caller]\n"
            );
            let path = dir.path().join("c.yaml");
            std::fs::write(&path, text).expect("config");
            match Config::check(&path) {
                Ok(_) => Vec::new(),
                Err(e) => e.problems().to_vec(),
            }
        };
        let p = check("");
        let find = |p: &[Problem], key: &str| {
            p.iter()
                .find(|x| x.path == key)
                .cloned()
                .unwrap_or_else(|| panic!("no problem at {key} in {p:#?}"))
        };
        let e = find(&p, "gateway.channels[0].encrypt[1]");
        assert!(
            e.message.contains("`called` is not a top-level property"),
            "{e:?}"
        );
        assert_eq!(e.line, Some(9));
        assert!(find(&p, "gateway.channels[0].encrypt[2]")
            .message
            .contains("twice"));
        assert!(find(&p, "gateway.channels[0].encrypt")
            .message
            .contains("gateway.channel_encryption_key"));
        assert!(
            !p.iter().any(|x| x.path.starts_with("gateway.channels[1]")),
            "an up channel decrypts with any of decryption_keys: {p:#?}"
        );
        let p = check("  channel_encryption_key: dk9\n");
        assert!(find(&p, "gateway.channel_encryption_key")
            .message
            .contains("`dk9` is not one of gateway.decryption_keys"));
        let p = check("  channel_encryption_key: dk1\n");
        assert!(
            !p.iter().any(|x| x.path == "gateway.channels[0].encrypt"
                || x.path == "gateway.channel_encryption_key"),
            "{p:#?}"
        );
    }

    #[test]
    fn channel_settings_are_checked_by_name_and_line() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("ok.schema.json"), r#"{"type":"object"}"#).expect("ok");
        std::fs::write(dir.path().join("bad.schema.json"), r#"{"type": 12}"#).expect("bad");
        let text = "\
gateway:
  listen: 127.0.0.1:0
  insecure_plaintext: true
  admin_tokens:
    - {name: pbx, sha256: 0000000000000000000000000000000000000000000000000000000000000000, scopes: [write]}
  channels:
    - name: voip.call
      direction: down
      delivery: transient
      ttl: 30s
      schema: ok.schema.json
      publishers: [pbx]
    - name: Voip Call
      direction: sideways
      delivery: forever
      schema: missing.schema.json
      max_bytes: 0
      rate_per_second: 0
      publishers: [crm]
      tll: 1s
    - name: voip.call
      schema: bad.schema.json
  webhooks:
    - name: desk
      url: https://api.example/desk
      secret_env: TETHER_TEST_CHANNEL_HOOK_UNSET_3B1
      events: false
      channels: [voip.call, nope]
";
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, text).expect("config");
        let err = Config::check(&path).unwrap_err();
        let p = err.problems();
        let find = |key: &str| {
            p.iter()
                .find(|x| x.path == key)
                .cloned()
                .unwrap_or_else(|| panic!("no problem at {key} in {p:#?}"))
        };
        assert_eq!(find("gateway.channels[1].name").line, Some(13));
        assert!(find("gateway.channels[1].direction")
            .message
            .contains("sideways"));
        assert!(find("gateway.channels[1].delivery")
            .message
            .contains("transient or durable"));
        assert!(find("gateway.channels[1].schema")
            .message
            .contains("no such file"));
        find("gateway.channels[1].max_bytes");
        find("gateway.channels[1].rate_per_second");
        assert!(find("gateway.channels[1].publishers[0]")
            .message
            .contains("crm"));
        assert!(find("gateway.channels[1].tll").message.contains("ttl"));
        assert!(find("gateway.channels[2].name").message.contains("twice"));
        assert!(find("gateway.channels[2].schema")
            .message
            .contains("not a valid JSON Schema"));
        assert!(
            !p.iter().any(|x| x.path.starts_with("gateway.channels[0]")),
            "the good channel passes: {p:#?}"
        );
        assert!(find("gateway.webhooks[0].channels[0]")
            .message
            .contains("only up channels"));
        assert!(find("gateway.webhooks[0].channels[1]")
            .message
            .contains("no channel `nope`"));
    }

    #[test]
    fn an_agent_may_leave_its_kid_out() {
        let text = GOOD.replace(
            "    insecure_plaintext: true\n    heartbeat_interval: 2s\n",
            "    insecure_plaintext: true\n    heartbeat_interval: 2s\n    auth:\n      key: k.pem\n      renew_before: 0s\n",
        );
        let cfg = Config::parse(&text, "t").expect("valid");
        let auth = cfg.agent.and_then(|a| a.gateway.auth).expect("auth");
        assert!(auth.kid.is_empty());
        assert!(auth.renew_before.get().is_zero());
        let bad = text.replace(
            "      key: k.pem\n",
            "      key: k.pem\n      kid: \"a b\"\n",
        );
        let err = Config::parse(&bad, "t").expect_err("bad kid");
        assert!(err.to_string().contains("agent.gateway.auth.kid"), "{err}");
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let cfg = Config::parse(GOOD, "t").expect("valid");
        let a = cfg.agent.expect("agent");
        assert_eq!(a.gateway.heartbeat_interval.get(), Duration::from_secs(2));
        assert_eq!(a.outbox.poll_interval.get(), Duration::from_millis(50));
        assert_eq!(a.tables[1].direction, Direction::Up);
        assert_eq!(a.tables[0].direction, Direction::Both);
    }

    #[test]
    fn capture_modes_belong_to_their_engine() {
        let with = |db: &str| {
            GOOD.replace(
                "  gateway:\n    url",
                &format!("  database:\n{db}  gateway:\n    url"),
            )
        };
        let err = Config::parse(&with("    capture: logical\n"), "t").unwrap_err();
        let p = err
            .problems()
            .iter()
            .find(|p| p.path == "agent.database.capture")
            .cloned()
            .expect("capture problem");
        assert!(p.message.contains("PostgreSQL"), "{}", p.message);
        assert!(p.line.is_some());
        let ok = with("    kind: postgres\n    connection: \"host=db dbname=clinic\"\n    capture: logical\n    slot_warn_mb: 256\n");
        let a = Config::parse(&ok, "t")
            .expect("valid")
            .agent
            .expect("agent");
        assert_eq!(
            (a.database.capture.as_str(), a.database.slot_warn_mb),
            ("logical", 256)
        );
        let err = Config::parse(
            &with("    kind: postgres\n    connection: x\n    capture: wal\n"),
            "t",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("triggers, change_tracking, logical"),
            "{err}"
        );
    }

    #[test]
    fn transport_and_admin_settings_are_checked() {
        let a = Config::parse(GOOD, "t")
            .expect("valid")
            .agent
            .expect("agent");
        assert_eq!(a.gateway.transport, "auto");
        assert_eq!(a.gateway.fallback_after, 3);
        assert_eq!(a.admin.addr(), "127.0.0.1:7571".parse().ok());
        let text = GOOD
            .replace(
                "heartbeat_interval: 2s",
                "heartbeat_interval: 2s\n    transport: sometimes\n    fallback_after: 0",
            )
            .replace("  tables:", "  admin:\n    listen: 0.0.0.0:7571\n  tables:");
        let err = Config::parse(&text, "t").unwrap_err();
        let p = err.problems();
        let find = |path: &str| p.iter().find(|x| x.path == path).cloned();
        let t = find("agent.gateway.transport").expect("transport problem");
        assert_eq!(t.line, Some(10));
        assert!(t.message.contains("sometimes"), "{}", t.message);
        assert!(find("agent.gateway.fallback_after").is_some());
        let admin = find("agent.admin.listen").expect("admin problem");
        assert!(admin.message.contains("loopback"), "{}", admin.message);
        let off = GOOD.replace("  tables:", "  admin:\n    listen: off\n  tables:");
        let a = Config::parse(&off, "t")
            .expect("off is valid")
            .agent
            .expect("agent");
        assert_eq!(a.admin.addr(), None);
    }

    #[test]
    fn every_problem_is_reported_with_path_and_line() {
        let text = GOOD
            .replace(
                "heartbeat_interval: 2s",
                "heartbeat_interval: soon\n    colour: blue",
            )
            .replace("direction: up", "direction: up\n      flavour: x")
            .replace("listen: 127.0.0.1:0", "listen: nowhere");
        let err = Config::parse(&text, "t").unwrap_err();
        let p = err.problems();
        let find = |path: &str| p.iter().find(|x| x.path == path).cloned();
        let hb = find("agent.gateway.heartbeat_interval").expect("duration problem");
        assert_eq!(hb.line, Some(9));
        assert!(hb.message.contains("soon"));
        assert_eq!(
            find("agent.gateway.colour").expect("unknown key").line,
            Some(10)
        );
        assert_eq!(
            find("agent.tables[1].flavour")
                .expect("unknown nested key")
                .line,
            Some(19)
        );
        assert_eq!(find("gateway.listen").expect("listen").line, Some(21));
        assert_eq!(p.len(), 4, "{p:?}");
    }

    #[test]
    fn column_types_are_read_and_a_wrong_one_is_named() {
        use crate::db::values::ValueType;
        let good = GOOD.replace(
            "key: [id]\n      direction: up",
            "key: [id]\n      direction: up\n      types: {paid: boolean, photo: binary}",
        );
        let cfg = Config::parse(&good, "t").expect("types");
        let a = cfg.agent.expect("agent");
        assert_eq!(
            a.tables[1].types.get("paid").copied(),
            Some(ValueType::Boolean)
        );
        assert_eq!(
            a.tables[1].types.get("photo").copied(),
            Some(ValueType::Binary)
        );
        let bad = GOOD.replace(
            "key: [id]\n      direction: up",
            "key: [id]\n      direction: up\n      types: {paid: bolean}",
        );
        let err = Config::parse(&bad, "t").unwrap_err();
        let p = err
            .problems()
            .iter()
            .find(|p| p.path.starts_with("agent.tables[1].types"))
            .cloned()
            .unwrap_or_else(|| panic!("{:#?}", err.problems()));
        assert_eq!(p.line, Some(18), "{p}");
        assert!(
            p.message.contains("bolean") && p.message.contains("boolean"),
            "{p}"
        );
    }

    #[test]
    fn type_errors_name_the_line() {
        let text = GOOD.replace(
            "key: [id]\n    - table: payments",
            "key: 5\n    - table: payments",
        );
        let err = Config::parse(&text, "t").unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.line, Some(13), "{p}");
        assert!(p.path.starts_with("agent.tables[0]"), "{p}");
    }

    #[test]
    fn every_type_error_is_reported_in_one_run_with_the_other_problems() {
        let text = GOOD
            .replace(
                "  dir: logs",
                "  dir: logs\n  keep_days: many\n  timezone: mars",
            )
            .replace(
                "heartbeat_interval: 2s",
                "heartbeat_interval: soon\n    max_frame_bytes: big\n    fallback_aftr: 3",
            )
            .replace(
                "key: [id]\n      direction: up",
                "key: [id]\n      direction: sideways",
            );
        let err = Config::parse(&text, "t").unwrap_err();
        let p = err.problems();
        let find = |path: &str| {
            p.iter()
                .find(|x| x.path == path)
                .cloned()
                .unwrap_or_else(|| panic!("no problem at {path} in {p:#?}"))
        };
        assert_eq!(find("logging.keep_days").line, Some(4));
        assert_eq!(find("logging.timezone").line, Some(5));
        assert!(find("logging.timezone").message.contains("mars"), "{p:#?}");
        assert_eq!(find("agent.gateway.heartbeat_interval").line, Some(11));
        assert_eq!(find("agent.gateway.max_frame_bytes").line, Some(12));
        let typo = find("agent.gateway.fallback_aftr");
        assert_eq!(typo.line, Some(13));
        assert!(
            typo.message.contains("did you mean `fallback_after`"),
            "{typo:?}"
        );
        assert_eq!(find("agent.tables[1].direction").line, Some(21));
        // A value YAML reads as text is not a problem when read again as a tree.
        let numeric_id = text.replace("clinic_id: clinic-1", "clinic_id: 1001");
        let p2 = Config::parse(&numeric_id, "t").unwrap_err();
        assert!(
            p2.problems().iter().all(|x| x.path != "agent.clinic_id"),
            "{:#?}",
            p2.problems()
        );
        assert_eq!(p2.problems().len(), 6);
        assert_eq!(p.len(), 6, "{p:#?}");
    }

    #[test]
    fn check_names_every_missing_file_directory_and_variable_with_its_line() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path();
        std::fs::write(d.join("clinic.db"), b"").expect("db");
        std::fs::create_dir(d.join("a-dir")).expect("dir");
        std::fs::write(d.join("a-file"), b"").expect("file");
        let text = "\
logging:
  dir: a-file/logs
agent:
  clinic_id: clinic-1
  database:
    path: clinic.dbb
  gateway:
    url: wss://127.0.0.1:9/v1/ws
    tls:
      ca: certs/ca.pem
      pkcs12: a-dir
      pkcs12_password_env: TETHER_TEST_CHECK_UNSET_7F3A
    auth:
      kid: k1
      key: certs/clinic.key
  tables:
    - {table: patients, entity: patient, key: [id]}
gateway:
  listen: 127.0.0.1:0
  insecure_plaintext: true
  store:
    path: nowhere/deeper/gateway.db
  entity_schemas: schemas
";
        let path = d.join("c.yaml");
        std::fs::write(&path, text).expect("config");
        let err = Config::check(&path).unwrap_err();
        let p = err.problems();
        let find = |key: &str| {
            p.iter()
                .find(|x| x.path == key)
                .cloned()
                .unwrap_or_else(|| panic!("no problem at {key} in {p:#?}"))
        };
        assert!(find("logging.dir").message.contains("is a file"), "{p:#?}");
        let db = find("agent.database.path");
        assert_eq!(db.line, Some(6));
        assert!(db.message.ends_with("clinic.dbb: no such file"), "{db:?}");
        assert_eq!(find("agent.gateway.tls.ca").line, Some(10));
        assert!(find("agent.gateway.tls.pkcs12")
            .message
            .contains("a directory"));
        assert!(find("agent.gateway.tls.pkcs12_password_env")
            .message
            .contains("TETHER_TEST_CHECK_UNSET_7F3A is not set"));
        assert_eq!(find("agent.gateway.auth.key").line, Some(15));
        assert!(find("gateway.entity_schemas")
            .message
            .contains("no such directory"));
        // A store directory that does not exist yet is created at start: not a problem.
        assert!(p.iter().all(|x| x.path != "gateway.store.path"), "{p:#?}");
        assert_eq!(p.len(), 7, "{p:#?}");
        // The same file with its files in place passes.
        std::fs::create_dir_all(d.join("certs")).expect("certs");
        for f in ["certs/ca.pem", "certs/clinic.key"] {
            std::fs::write(d.join(f), b"x").expect("file");
        }
        std::fs::create_dir_all(d.join("schemas")).expect("schemas");
        let fixed = text
            .replace("a-file/logs", "logs")
            .replace("clinic.dbb", "clinic.db")
            .replace(
                "      pkcs12: a-dir\n      pkcs12_password_env: TETHER_TEST_CHECK_UNSET_7F3A\n",
                "",
            );
        std::fs::write(&path, fixed).expect("config");
        Config::check(&path).expect("passes");
    }

    #[test]
    fn a_misspelt_key_gets_the_closest_known_one_or_the_list() {
        let text = GOOD
            .replace("  dir: logs", "  dir: logs\n  levle: debug")
            .replace("agent:", "agent:\n  zzz: 1");
        let err = Config::parse(&text, "t").unwrap_err();
        let p = err.problems();
        let levle = p.iter().find(|x| x.path == "logging.levle").expect("levle");
        assert!(levle.message.contains("did you mean `level`"), "{levle:?}");
        let zzz = p.iter().find(|x| x.path == "agent.zzz").expect("zzz");
        assert!(
            zzz.message.contains("known here:") && zzz.message.contains("clinic_id"),
            "{zzz:?}"
        );
        assert_eq!(edit_distance("heartbeat_interval", "heartbaet_interval"), 1);
        assert_eq!(edit_distance("url", "uri"), 1);
        assert_eq!(
            closest("kind", &["path".into(), "kind".into()]),
            Some("kind")
        );
        assert_eq!(closest("colour", &["path".into(), "kind".into()]), None);
    }

    #[test]
    fn plaintext_and_missing_credentials_are_refused_unless_explicitly_insecure() {
        let text = GOOD
            .replace("    insecure_plaintext: true\n", "")
            .replace("  insecure_plaintext: true\n", "");
        let err = Config::parse(&text, "t").unwrap_err();
        let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
        for want in [
            "agent.gateway.url",
            "agent.gateway.auth",
            "gateway.tls",
            "gateway.auth",
            "gateway.admin_tokens",
        ] {
            assert!(paths.contains(&want), "{want} not in {paths:?}");
        }
    }

    #[test]
    fn duration_parsing() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("3 weeks"), None);
    }
}

/// Words that have no place in a read-only query (outside strings and quoted names).
const WRITING_WORDS: [&str; 17] = [
    "INSERT",
    "UPDATE",
    "DELETE",
    "REPLACE",
    "UPSERT",
    "PRAGMA",
    "ATTACH",
    "DETACH",
    "CREATE",
    "DROP",
    "ALTER",
    "VACUUM",
    "REINDEX",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
];

/// Why the text of an `agent.rpc` query is not one read-only statement (`None`: it may be).
/// A check on the text alone, for `check-config`; the agent also asks the engine when it starts
/// and before every run.
pub fn read_only_sql_problem(sql: &str) -> Option<String> {
    // The words outside comments, string literals and quoted identifiers, and whether a `;`
    // is followed by anything.
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut chars = sql.chars().peekable();
    let mut after_semicolon = false;
    let flush = |word: &mut String, words: &mut Vec<String>| {
        if !word.is_empty() {
            words.push(std::mem::take(word).to_ascii_uppercase());
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '-' if chars.peek() == Some(&'-') => {
                flush(&mut word, &mut words);
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                flush(&mut word, &mut words);
                chars.next();
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
            }
            '\'' | '"' | '`' | '[' => {
                flush(&mut word, &mut words);
                let end = if c == '[' { ']' } else { c };
                for c in chars.by_ref() {
                    if c == end {
                        break;
                    }
                }
                if after_semicolon {
                    return Some("more than one statement".into());
                }
                words.push("?".into());
            }
            ';' => {
                flush(&mut word, &mut words);
                after_semicolon = true;
            }
            c if c.is_alphanumeric() || c == '_' => {
                if after_semicolon {
                    return Some("more than one statement".into());
                }
                word.push(c);
            }
            c if c.is_whitespace() => flush(&mut word, &mut words),
            _ => {
                flush(&mut word, &mut words);
                if after_semicolon {
                    return Some("more than one statement".into());
                }
            }
        }
    }
    flush(&mut word, &mut words);
    match words.first().map(String::as_str) {
        Some("SELECT" | "WITH" | "VALUES") => {}
        Some(first) => {
            return Some(format!(
                "it starts with {first}, not SELECT, WITH or VALUES"
            ))
        }
        None => return Some("no statement".into()),
    }
    words
        .iter()
        .find(|w| WRITING_WORDS.contains(&w.as_str()))
        .map(|w| format!("it contains {w}"))
}

#[cfg(test)]
mod read_only_tests {
    use super::read_only_sql_problem as problem;

    #[test]
    fn write_capable_texts_are_refused_by_name() {
        for sql in [
            "PRAGMA query_only = 0",
            "DELETE FROM patients",
            "ATTACH DATABASE '/tmp/x.db' AS x",
            "SELECT 1; DELETE FROM patients",
            "select 1;delete from patients",
            "WITH d AS (SELECT 1) DELETE FROM patients",
            "WITH d AS (SELECT 1) INSERT INTO patients SELECT * FROM d",
            "UPDATE patients SET name = 'x'",
            "BEGIN; SELECT 1",
            "VACUUM INTO '/tmp/copy.db'",
            "  /* c */ REPLACE INTO patients VALUES (1)",
            "",
        ] {
            assert!(problem(sql).is_some(), "{sql:?} passed");
        }
    }

    #[test]
    fn reads_pass_with_comments_strings_and_quoted_names() {
        for sql in [
            "SELECT id, name FROM patients WHERE id = :id",
            "  -- the day's list\nSELECT * FROM appointments WHERE note != 'DELETE me; now'",
            "WITH t AS (SELECT 1 AS n) SELECT n FROM t;",
            "SELECT \"update\" FROM [delete]",
            "VALUES (1), (2)",
        ] {
            assert_eq!(problem(sql), None, "{sql:?}");
        }
    }

    #[test]
    fn the_gateway_store_keys_are_checked_by_name() {
        let base = "gateway:\n  listen: 127.0.0.1:0\n  insecure_plaintext: true\n  store:\n";
        let ok =
            format!("{base}    kind: postgres\n    url: host=db dbname=t\n    retention: 90d\n");
        let cfg = crate::config::Config::parse(&ok, "t").expect("valid");
        let g = cfg.gateway.expect("gateway");
        assert_eq!(
            g.store.retention(),
            Some(std::time::Duration::from_secs(90 * 86400))
        );
        let off = format!("{base}    kind: sqlite\n    retention: \"off\"\n");
        let g = crate::config::Config::parse(&off, "t")
            .expect("valid")
            .gateway
            .expect("gw");
        assert_eq!(g.store.retention(), None);
        let bad =
            format!("{base}    kind: postgres\n    schema: Bad-Name\n    retention: 3 weeks\n");
        let err = crate::config::Config::parse(&bad, "t").unwrap_err();
        let p = err.problems();
        let paths: Vec<&str> = p.iter().map(|x| x.path.as_str()).collect();
        for want in [
            "gateway.store.url",
            "gateway.store.schema",
            "gateway.store.retention",
        ] {
            assert!(paths.contains(&want), "{want} not reported: {paths:?}");
        }
        let kind = format!("{base}    kind: mongodb\n");
        let err = crate::config::Config::parse(&kind, "t").unwrap_err();
        assert!(err
            .problems()
            .iter()
            .any(|x| x.path == "gateway.store.kind" && x.message.contains("mongodb")));
    }

    #[test]
    #[cfg(feature = "gateway")]
    fn the_advertised_address_must_be_host_and_port() {
        let cfg = |a: &str| {
            format!(
                "gateway:\n  listen: 0.0.0.0:8443\n  insecure_plaintext: true\n  advertise: {a}\n"
            )
        };
        let ok = crate::config::Config::parse(&cfg("10.0.0.11:8443"), "t").expect("valid");
        assert_eq!(
            ok.gateway.expect("gateway").advertise.as_deref(),
            Some("10.0.0.11:8443")
        );
        for bad in ["gw-1.internal", ":8443", "gw-1:0", "gw-1:http"] {
            let err = crate::config::Config::parse(&cfg(bad), "t").unwrap_err();
            let p = err.problems();
            let hit = p.iter().find(|x| x.path == "gateway.advertise");
            let hit = hit.unwrap_or_else(|| panic!("{bad}: not reported: {p:?}"));
            assert!(hit.message.contains("host:port"), "{bad}: {}", hit.message);
            assert_eq!(hit.line, Some(4), "{bad}");
        }
        // Unset: the bound address, or this host's name with the port when bound to all.
        let mut s = crate::gateway::GatewaySettings::from_config(
            &crate::config::Config::parse(
                "gateway:\n  listen: 0.0.0.0:8443\n  insecure_plaintext: true\n",
                "t",
            )
            .expect("valid")
            .gateway
            .expect("gateway"),
        );
        let bound: std::net::SocketAddr = "0.0.0.0:8443".parse().expect("addr");
        assert!(s.advertised(bound).ends_with(":8443"));
        assert!(!s.advertised(bound).starts_with("0.0.0.0"));
        let local: std::net::SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        assert_eq!(s.advertised(local), "127.0.0.1:9000");
        s.advertise = Some("gw-1.internal:8443".into());
        assert_eq!(s.advertised(bound), "gw-1.internal:8443");
    }
}
