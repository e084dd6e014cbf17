//! The clinic side of enrolment and key renewal (`tether agent enrol`, `tether agent renew`,
//! and the agent's scheduled renewal), and the operator's `tether keys enrol-code`.
//!
//! Enrolment writes, beside the config file, `identity/clinic.key` (made here, mode 0600, never
//! sent), `identity/clinic.pem` (the certificate the gateway's CA signed) and, when known,
//! `identity/gateway-ca.pem` (the CA of the gateway's own certificate); then the config, from
//! the gateway's agent template. The agent's tokens carry the key's own id (no `auth.kid` in
//! the config), so a renewed key needs no config edit: renewal replaces the two files, the
//! agent's next connection uses them, and the old key is retired at the gateway.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openssl::pkey::PKey;
use openssl::x509::X509;
use serde_json::{json, Value};

use crate::config::AgentConfig;
use crate::security::jwt::TokenSigner;
use crate::security::keys;
use crate::security::tls::{self, ClientTls};

/// The identity files, relative to the config file's directory.
pub const KEY_FILE: &str = "identity/clinic.key";
pub const CERT_FILE: &str = "identity/clinic.pem";
pub const CA_FILE: &str = "identity/gateway-ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("--gateway {0}: use the gateway's address, e.g. wss://gateway.example.org/v1/ws or https://gateway.example.org")]
    Url(String),
    #[error("{0}")]
    Refused(String),
    #[error("the gateway at {url} could not be reached: {message}")]
    Unreachable { url: String, message: String },
    #[error("{path} exists: this PC is enrolled already (use --force to replace its identity)")]
    Exists { path: String },
    #[error("{0}")]
    Key(#[from] keys::KeyError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Jwt(#[from] crate::security::jwt::JwtError),
    #[error("the gateway's answer: {0}")]
    Answer(String),
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EnrolError + '_ {
    move |source| EnrolError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The gateway's HTTP base (`https://host:port`) and its WebSocket URL, from either.
pub fn gateway_urls(given: &str) -> Result<(String, String), EnrolError> {
    let bad = || EnrolError::Url(given.to_string());
    let (scheme, rest) = given.split_once("://").ok_or_else(bad)?;
    let (http, ws) = match scheme {
        "https" | "wss" => ("https", "wss"),
        "http" | "ws" => ("http", "ws"),
        _ => return Err(bad()),
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok((format!("{http}://{host}"), format!("{ws}://{host}/v1/ws")))
}

/// An HTTP client for the gateway: TLS as given, through `proxy` (HTTP CONNECT) if any.
fn client(
    tls: Option<&ClientTls>,
    timeout: Duration,
    proxy: Option<&crate::proxy::Proxy>,
) -> Result<awc::Client, EnrolError> {
    let b = awc::Client::builder().timeout(timeout).disable_redirects();
    let tls = tls.map(tls::connector).transpose()?;
    Ok(match (proxy, tls) {
        (Some(p), tls) => {
            let c = awc::Connector::new()
                .connector(crate::proxy::ProxyConnector::new(p.clone(), timeout))
                .timeout(timeout);
            match tls {
                Some(t) => b.connector(c.openssl(t)).finish(),
                None => b.connector(c).finish(),
            }
        }
        (None, Some(t)) => b
            .connector(awc::Connector::new().openssl(t).timeout(timeout))
            .finish(),
        (None, None) => b.finish(),
    })
}

/// The proxy to reach `gateway_url` through: `given` (`direct`: none), else the environment
/// (`HTTPS_PROXY`/`HTTP_PROXY`, `NO_PROXY`), as the agent decides.
pub fn proxy_for(
    gateway_url: &str,
    given: Option<&str>,
) -> Result<Option<crate::proxy::Proxy>, EnrolError> {
    let bad = |e: crate::proxy::ProxyError| EnrolError::Config {
        key: "--proxy".into(),
        message: e.to_string(),
    };
    match given {
        Some("direct") => Ok(None),
        Some(url) => crate::proxy::Proxy::parse(url, "--proxy")
            .map(Some)
            .map_err(bad),
        None => {
            let (_, ws) = gateway_urls(gateway_url)?;
            crate::proxy::from_env(&ws, |k| std::env::var(k).ok()).map_err(bad)
        }
    }
}

/// The agent's own proxy (`agent.gateway.proxy`, else the environment).
fn agent_proxy(a: &AgentConfig) -> Result<Option<crate::proxy::Proxy>, EnrolError> {
    crate::agent::proxy(a).map_err(|e| EnrolError::Config {
        key: "agent.gateway.proxy".into(),
        message: e.to_string(),
    })
}

/// POSTs `body`; the JSON answer on 2xx, else the gateway's `detail` (and `field`).
async fn post(
    client: &awc::Client,
    url: &str,
    bearer: Option<&str>,
    body: &Value,
) -> Result<Value, EnrolError> {
    let mut req = client.post(url);
    if let Some(t) = bearer {
        req = req.insert_header(("Authorization", format!("Bearer {t}")));
    }
    let mut resp = req
        .send_json(body)
        .await
        .map_err(|e| EnrolError::Unreachable {
            url: url.to_string(),
            message: e.to_string(),
        })?;
    let status = resp.status();
    let bytes = resp
        .body()
        .limit(1 << 20)
        .await
        .map_err(|e| EnrolError::Answer(e.to_string()))?;
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(value);
    }
    let detail = value
        .get("detail")
        .and_then(Value::as_str)
        .unwrap_or("no detail");
    let field = value
        .get("field")
        .and_then(Value::as_str)
        .map(|f| format!(" (field `{f}`)"))
        .unwrap_or_default();
    let hint = if status.as_u16() == 404 && detail == "no detail" {
        ": is this a Tether gateway's address?"
    } else {
        ""
    };
    Err(EnrolError::Refused(format!(
        "{url} answered {status}{field}: {detail}{hint}"
    )))
}

fn text(v: &Value, key: &str) -> Result<String, EnrolError> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| EnrolError::Answer(format!("no `{key}`")))
}

/// The certificate in the answer, checked to be for `key` and (if known) `clinic`.
fn answered_cert(
    v: &Value,
    key: &PKey<openssl::pkey::Private>,
) -> Result<(X509, String), EnrolError> {
    let pem = text(v, "certificate")?;
    let cert = X509::from_pem(pem.as_bytes())
        .map_err(|e| EnrolError::Answer(format!("certificate: {e}")))?;
    let matches = cert.public_key().map(|p| p.public_eq(key)).unwrap_or(false);
    if !matches {
        return Err(EnrolError::Answer(
            "the certificate is not for the key this PC sent".into(),
        ));
    }
    Ok((cert, pem))
}

/// What `tether agent enrol` needs.
#[derive(Debug, Clone)]
pub struct EnrolRequest {
    /// The gateway (`wss://…/v1/ws`, `https://…`).
    pub gateway: String,
    pub code: String,
    /// The config file to write (its directory gets `identity/`).
    pub config: PathBuf,
    /// CA of the gateway's certificate (system roots when absent).
    pub ca: Option<PathBuf>,
    /// Replace an existing identity and config.
    pub force: bool,
    pub bits: u32,
    pub timeout: Duration,
    /// HTTP CONNECT proxy to the gateway (`None`: direct).
    pub proxy: Option<crate::proxy::Proxy>,
}

/// What enrolment did.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub clinic_id: String,
    pub kid: String,
    pub gateway_url: String,
    pub config: PathBuf,
    /// `false`: the gateway has no agent template: the config holds the connection only.
    pub complete_config: bool,
    /// What the written config still lacks, from `check-config` (empty when it loads).
    pub config_problems: Vec<String>,
}

/// The config a clinic gets when the gateway has no template: the connection only.
const CONNECTION_ONLY: &str = "\
# Written by `tether agent enrol`: the connection to the gateway. This gateway has no agent
# template (gateway.enrolment.agent_template), so add agent.database and agent.tables here,
# then run `tether check-config`.
agent:
  clinic_id: {{clinic_id}}
  gateway:
    url: {{gateway_url}}
    gateway_id: {{gateway_id}}
    tls:
{{tls_ca}}      cert: identity/clinic.pem
      key: identity/clinic.key
    auth: {}
";

/// Fills `{{clinic_id}}`, `{{gateway_url}}`, `{{gateway_id}}` (and `{{tls_ca}}`); any other
/// `{{…}}` is an error naming it.
pub fn fill_template(template: &str, values: &[(&str, &str)]) -> Result<String, EnrolError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| EnrolError::Config {
            key: "gateway.enrolment.agent_template".into(),
            message: "a `{{` without its `}}`".into(),
        })?;
        let name = after[..end].trim();
        let value = values
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| EnrolError::Config {
                key: "gateway.enrolment.agent_template".into(),
                message: format!(
                    "unknown placeholder {{{{{name}}}}} (known: clinic_id, gateway_url, gateway_id)"
                ),
            })?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `tether agent enrol`: key made here, certificate from the gateway, config written.
pub async fn enrol(r: &EnrolRequest) -> Result<Enrolled, EnrolError> {
    let (base, ws_url) = gateway_urls(&r.gateway)?;
    let dir = r.config.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let (key_path, cert_path, ca_path) =
        (dir.join(KEY_FILE), dir.join(CERT_FILE), dir.join(CA_FILE));
    if !r.force {
        for p in [&key_path, &r.config] {
            if p.exists() {
                return Err(EnrolError::Exists {
                    path: p.display().to_string(),
                });
            }
        }
    }
    let key = keys::rsa_key(r.bits)?;
    // The gateway names the certificate after the code's clinic, whatever the request says.
    let csr = keys::csr("tether-agent", &key)?;
    let tls = base.starts_with("https").then(|| ClientTls {
        ca: r.ca.clone(),
        ..Default::default()
    });
    let http = client(tls.as_ref(), r.timeout, r.proxy.as_ref())?;
    let answer = post(
        &http,
        &format!("{base}/v1/enrol"),
        None,
        &json!({ "code": r.code, "csr": csr }),
    )
    .await?;
    let (_, cert_pem) = answered_cert(&answer, &key)?;
    let clinic = text(&answer, "clinic_id")?;
    let kid = text(&answer, "kid")?;
    let gateway_id = text(&answer, "gateway_id")?;
    if !crate::config::valid_id(&clinic) || !crate::config::valid_id(&gateway_id) {
        return Err(EnrolError::Answer(
            "clinic_id or gateway_id is not a valid id".into(),
        ));
    }
    if keys::key_id(&clinic, &key)? != kid {
        return Err(EnrolError::Answer(format!(
            "kid {kid} is not this key's own id"
        )));
    }
    // The CA this PC trusted for the gateway (given), else the one the gateway names.
    let ca_pem = match &r.ca {
        Some(p) => Some(std::fs::read(p).map_err(io(p))?),
        None => answer
            .get("server_ca")
            .and_then(Value::as_str)
            .map(|s| s.as_bytes().to_vec()),
    };
    // The config first: a template that does not fill leaves nothing half-written.
    let template = answer.get("agent_template").and_then(Value::as_str);
    let tls_ca = if ca_pem.is_some() {
        format!("      ca: {CA_FILE}\n")
    } else {
        String::new()
    };
    let values = [
        ("clinic_id", clinic.as_str()),
        ("gateway_url", ws_url.as_str()),
        ("gateway_id", gateway_id.as_str()),
        ("tls_ca", tls_ca.as_str()),
    ];
    let text = fill_template(template.unwrap_or(CONNECTION_ONLY), &values)?;
    keys::write_file(
        &key_path,
        &key.private_key_to_pem_pkcs8()
            .map_err(keys::KeyError::from)?,
        true,
    )?;
    keys::write_file(&cert_path, cert_pem.as_bytes(), false)?;
    if let Some(ca) = &ca_pem {
        keys::write_file(&ca_path, ca, false)?;
    }
    if r.config.exists() {
        let mut bak = r.config.as_os_str().to_owned();
        bak.push(".bak");
        std::fs::copy(&r.config, PathBuf::from(bak)).map_err(io(&r.config))?;
    }
    keys::write_file(&r.config, text.as_bytes(), false)?;
    let config_problems = match crate::config::Config::load(&r.config) {
        Ok(_) => Vec::new(),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    };
    log::info!(target: "audit", "event=enrolled clinic={clinic} kid={kid} gateway={ws_url}");
    Ok(Enrolled {
        clinic_id: clinic,
        kid,
        gateway_url: ws_url,
        config: r.config.clone(),
        complete_config: template.is_some(),
        config_problems,
    })
}

/// `tether keys enrol-code`: asks the gateway (REST, an admin token with `write`) for a code.
pub async fn request_code(
    gateway: &str,
    clinic: &str,
    admin_token: &str,
    ttl: Option<&str>,
    labels: &[(String, String)],
    ca: Option<&Path>,
) -> Result<Value, EnrolError> {
    let (base, _) = gateway_urls(gateway)?;
    let tls = base.starts_with("https").then(|| ClientTls {
        ca: ca.map(Path::to_path_buf),
        ..Default::default()
    });
    let proxy = proxy_for(gateway, None)?;
    let http = client(tls.as_ref(), Duration::from_secs(30), proxy.as_ref())?;
    let mut body = json!({});
    if let Some(t) = ttl {
        body["ttl"] = json!(t);
    }
    if !labels.is_empty() {
        body["labels"] = labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    post(
        &http,
        &format!("{base}/v1/registry/clinics/{clinic}/enrolment-codes"),
        Some(admin_token),
        &body,
    )
    .await
}

/// Where renewal reads and writes: the certificate and the key the tokens are signed with.
struct IdentityFiles {
    cert: PathBuf,
    key: PathBuf,
}

fn identity_files(a: &AgentConfig) -> Result<IdentityFiles, EnrolError> {
    let tls = a.gateway.tls.as_ref();
    let (Some(cert), Some(key)) = (
        tls.and_then(|t| t.cert.clone()),
        tls.and_then(|t| t.key.clone()),
    ) else {
        return Err(EnrolError::Config {
            key: "agent.gateway.tls".into(),
            message: "renewal replaces tls.cert and tls.key: set both".into(),
        });
    };
    let Some(auth) = &a.gateway.auth else {
        return Err(EnrolError::Config {
            key: "agent.gateway.auth".into(),
            message: "renewal needs the agent's token signing (auth)".into(),
        });
    };
    if auth.key.as_ref().is_some_and(|k| *k != key) {
        return Err(EnrolError::Config {
            key: "agent.gateway.auth.key".into(),
            message: "renewal replaces one key: leave auth.key out (the tls.key signs tokens)"
                .into(),
        });
    }
    if !auth.kid.is_empty() {
        return Err(EnrolError::Config {
            key: "agent.gateway.auth.kid".into(),
            message: "a renewed key has a new id: leave auth.kid out (tokens then carry the key's own id)".into(),
        });
    }
    Ok(IdentityFiles { cert, key })
}

fn companion(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Finishes a renewal a crash interrupted: the new files were written (`.new`) and not both
/// moved in place yet. Safe to call at every start.
pub fn finish_interrupted_renewal(a: &AgentConfig) {
    let Ok(f) = identity_files(a) else { return };
    let (new_key, new_cert) = (companion(&f.key, ".new"), companion(&f.cert, ".new"));
    let read_cert = |p: &Path| std::fs::read(p).ok().and_then(|b| X509::from_pem(&b).ok());
    let read_key = |p: &Path| {
        std::fs::read(p)
            .ok()
            .and_then(|b| PKey::private_key_from_pem(&b).ok())
    };
    // Key moved, certificate not yet: move the certificate.
    if let (Some(cert), Some(key)) = (read_cert(&new_cert), read_key(&f.key)) {
        if cert.public_key().is_ok_and(|p| p.public_eq(&key)) {
            let _ = std::fs::rename(&new_cert, &f.cert);
            log::warn!(target: "audit", "event=renewal_completed_at_start cert={}", f.cert.display());
        }
    }
    // Neither moved: the old pair still works; drop the half-made new one.
    if new_key.exists() && read_cert(&new_cert).is_none() {
        let _ = std::fs::remove_file(&new_key);
    }
}

/// What a renewal did.
#[derive(Debug, Clone)]
pub struct Renewed {
    pub old_kid: String,
    pub new_kid: String,
    pub not_after: String,
    /// The old key was removed at the gateway (else it is retried at the next check).
    pub retired: bool,
}

fn signer(a: &AgentConfig, key: &Path) -> Result<TokenSigner, EnrolError> {
    Ok(TokenSigner::from_pem_file(
        key,
        &a.clinic_id,
        &a.gateway.gateway_id,
        "",
        Duration::from_secs(120),
    )?)
}

/// The gateway's HTTP base and a client presenting the agent's certificate (mutual TLS),
/// through its proxy.
fn agent_client(a: &AgentConfig, f: &IdentityFiles) -> Result<(String, awc::Client), EnrolError> {
    let (base, _) = gateway_urls(&a.gateway.url)?;
    let tls = ClientTls {
        ca: a.gateway.tls.as_ref().and_then(|t| t.ca.clone()),
        cert: Some(f.cert.clone()),
        key: Some(f.key.clone()),
        ..Default::default()
    };
    let http = client(
        base.starts_with("https").then_some(&tls),
        a.gateway.connect_timeout.get().max(Duration::from_secs(10)),
        agent_proxy(a)?.as_ref(),
    )?;
    Ok((base, http))
}

/// The certificate's end of validity, as Unix seconds.
fn not_after_unix(cert: &X509) -> Option<i64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(cert.not_after()).ok()?;
    Some(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

/// The end of validity of the certificate at `path`, as Unix seconds.
pub fn cert_not_after(path: &Path) -> Result<i64, EnrolError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    let cert = X509::from_pem(&pem).map_err(|e| EnrolError::Config {
        key: path.display().to_string(),
        message: format!("not a PEM certificate: {e}"),
    })?;
    not_after_unix(&cert).ok_or_else(|| EnrolError::Config {
        key: path.display().to_string(),
        message: "its end of validity does not read".into(),
    })
}

/// Seconds until the agent's certificate runs out (negative: it has).
pub fn cert_remaining(a: &AgentConfig) -> Result<i64, EnrolError> {
    let f = identity_files(a)?;
    let pem = std::fs::read(&f.cert).map_err(io(&f.cert))?;
    let cert = X509::from_pem(&pem).map_err(|e| EnrolError::Config {
        key: "agent.gateway.tls.cert".into(),
        message: e.to_string(),
    })?;
    let end = not_after_unix(&cert).unwrap_or(0);
    Ok(end - crate::security::unix_now() as i64)
}

/// Retires the kids listed in `<key>.retire` (signed with the current key); removes the file
/// once the gateway has them gone.
pub async fn retire_pending(a: &AgentConfig) -> Result<bool, EnrolError> {
    let f = identity_files(a)?;
    let list = companion(&f.key, ".retire");
    let Ok(text) = std::fs::read_to_string(&list) else {
        return Ok(true);
    };
    let kids: Vec<&str> = text.split_whitespace().collect();
    if kids.is_empty() {
        let _ = std::fs::remove_file(&list);
        return Ok(true);
    }
    let (base, http) = agent_client(a, &f)?;
    let token = signer(a, &f.key)?.sign()?;
    match post(
        &http,
        &format!("{base}/v1/enrol/retire"),
        Some(&token),
        &json!({ "kids": kids }),
    )
    .await
    {
        Ok(_) => {}
        // Already gone (retired by an operator, or by an earlier try whose answer was lost).
        Err(EnrolError::Refused(m)) if m.contains(" 404 ") => {}
        Err(e) => return Err(e),
    }
    std::fs::remove_file(&list).map_err(io(&list))?;
    log::info!(target: "audit", "event=keys_retired kids={:?}", kids.join(","));
    Ok(true)
}

/// Renews the agent's key: a new key made here, its certificate from the gateway (the request
/// signed with the current key), both files replaced, then the old key retired.
pub async fn renew(a: &AgentConfig, bits: u32) -> Result<Renewed, EnrolError> {
    let f = identity_files(a)?;
    let old = signer(a, &f.key)?;
    let old_kid = old.kid().to_string();
    let (base, http) = agent_client(a, &f)?;
    let key = keys::rsa_key(bits)?;
    let csr = keys::csr(&a.clinic_id, &key)?;
    let answer = post(
        &http,
        &format!("{base}/v1/enrol/renew"),
        Some(&old.sign()?),
        &json!({ "csr": csr }),
    )
    .await?;
    let (cert, cert_pem) = answered_cert(&answer, &key)?;
    let new_kid = text(&answer, "kid")?;
    if keys::key_id(&a.clinic_id, &key)? != new_kid {
        return Err(EnrolError::Answer(format!(
            "kid {new_kid} is not the new key's own id"
        )));
    }
    // Both new files first, then the key, then the certificate (a crash in between is
    // finished at the next start: `finish_interrupted_renewal`).
    let (new_key, new_cert) = (companion(&f.key, ".new"), companion(&f.cert, ".new"));
    keys::write_file(
        &new_key,
        &key.private_key_to_pem_pkcs8()
            .map_err(keys::KeyError::from)?,
        true,
    )?;
    keys::write_file(&new_cert, cert_pem.as_bytes(), false)?;
    std::fs::rename(&new_key, &f.key).map_err(io(&f.key))?;
    std::fs::rename(&new_cert, &f.cert).map_err(io(&f.cert))?;
    // Only now is the old key out of use here: it may go at the gateway.
    let retire = companion(&f.key, ".retire");
    keys::write_file(&retire, format!("{old_kid}\n").as_bytes(), false)?;
    let not_after = cert.not_after().to_string();
    log::info!(target: "audit", "event=key_renewed old_kid={old_kid} new_kid={new_kid} not_after={not_after:?}");
    let retired = match retire_pending(a).await {
        Ok(done) => done,
        Err(e) => {
            log::warn!(target: "audit", "event=retire_deferred kid={old_kid} error={:?} action=\"retried at the next check\"", crate::security::log_value(&e.to_string(), 300));
            false
        }
    };
    Ok(Renewed {
        old_kid,
        new_kid,
        not_after,
        retired,
    })
}

/// The agent's scheduled renewal: `None` when the config does not allow it (no certificate
/// and key files, an explicit `auth.kid`, or `renew_before: 0s`), with the reason logged once.
pub fn schedule(a: &AgentConfig) -> Option<(AgentConfig, Duration, Duration)> {
    let auth = a.gateway.auth.as_ref()?;
    if auth.renew_before.get().is_zero() {
        return None;
    }
    match identity_files(a) {
        Ok(_) => Some((
            a.clone(),
            auth.renew_before.get(),
            auth.renew_check.get().max(Duration::from_secs(1)),
        )),
        Err(e) => {
            log::info!(target: "supervisor", "event=renewal_off reason={:?}", e.to_string());
            None
        }
    }
}

/// Checks now and then every `every`: finishes a retirement, renews when the certificate
/// has less than `before` left. Runs for as long as the agent does.
pub async fn renewal_loop(a: AgentConfig, before: Duration, every: Duration) {
    finish_interrupted_renewal(&a);
    log::info!(target: "supervisor", "event=renewal_scheduled renew_before_s={} check_every_s={}", before.as_secs(), every.as_secs());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = retire_pending(&a).await {
            log::warn!(target: "audit", "event=retire_deferred error={:?}", crate::security::log_value(&e.to_string(), 300));
        }
        let left = match cert_remaining(&a) {
            Ok(s) => s,
            Err(e) => {
                log::warn!(target: "audit", "event=renewal_check_failed error={:?}", crate::security::log_value(&e.to_string(), 300));
                continue;
            }
        };
        if left > before.as_secs() as i64 {
            continue;
        }
        log::info!(target: "audit", "event=renewal_due seconds_left={left}");
        match renew(&a, RENEW_BITS).await {
            Ok(r) => {
                log::info!(target: "audit", "event=renewal_done old_kid={} new_kid={} not_after={:?} old_key_retired={}", r.old_kid, r.new_kid, r.not_after, r.retired);
            }
            Err(e) => {
                log::warn!(target: "audit", "event=renewal_failed error={:?} action=\"retried at the next check\"", crate::security::log_value(&e.to_string(), 300));
            }
        }
    }
}

/// The size of a renewed key.
pub const RENEW_BITS: u32 = 3072;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_addresses_in_either_form() {
        assert_eq!(
            gateway_urls("wss://gw.example.org/v1/ws").expect("wss"),
            (
                "https://gw.example.org".to_string(),
                "wss://gw.example.org/v1/ws".to_string()
            )
        );
        assert_eq!(
            gateway_urls("https://gw.example.org:8443/")
                .expect("https")
                .1,
            "wss://gw.example.org:8443/v1/ws"
        );
        assert_eq!(
            gateway_urls("ws://127.0.0.1:9000").expect("ws").0,
            "http://127.0.0.1:9000"
        );
        for bad in ["gw.example.org", "ftp://x", "https://", "https:// x"] {
            assert!(gateway_urls(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn without_a_template_the_connection_is_written_and_reads_back() {
        let ca = format!("      ca: {CA_FILE}\n");
        for tls_ca in [ca.as_str(), ""] {
            let text = fill_template(
                CONNECTION_ONLY,
                &[
                    ("clinic_id", "clinic-9"),
                    ("gateway_url", "wss://gw.example.org/v1/ws"),
                    ("gateway_id", "gw-prod"),
                    ("tls_ca", tls_ca),
                ],
            )
            .expect("fill");
            let v: serde_json::Value = serde_saphyr::from_str(&text).expect("YAML");
            let g = &v["agent"]["gateway"];
            assert_eq!(v["agent"]["clinic_id"], "clinic-9");
            assert_eq!(g["url"], "wss://gw.example.org/v1/ws");
            assert_eq!(g["gateway_id"], "gw-prod");
            assert_eq!(g["tls"]["cert"], CERT_FILE);
            assert_eq!(g["tls"]["key"], KEY_FILE);
            assert_eq!(
                g["tls"]["ca"].as_str(),
                (!tls_ca.is_empty()).then_some(CA_FILE)
            );
            assert!(g["auth"].is_object(), "{text}");
        }
    }

    #[test]
    fn templates_fill_known_placeholders_and_name_unknown_ones() {
        let v = [
            ("clinic_id", "c-1"),
            ("gateway_url", "wss://g/v1/ws"),
            ("gateway_id", "gw"),
        ];
        assert_eq!(
            fill_template("id: {{clinic_id}}\nurl: {{ gateway_url }}\n", &v).expect("fill"),
            "id: c-1\nurl: wss://g/v1/ws\n"
        );
        let e = fill_template("x: {{clinic}}", &v).expect_err("unknown");
        assert!(e.to_string().contains("{{clinic}}"), "{e}");
        assert!(fill_template("x: {{clinic_id", &v).is_err());
    }
}
