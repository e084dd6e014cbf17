//! Zero-touch enrolment and key renewal (`gateway.enrolment`).
//!
//! An operator issues a one-time code for a clinic id (`POST
//! /v1/registry/clinics/{id}/enrolment-codes`, or `tether keys enrol-code`). On the clinic PC,
//! `tether agent enrol` makes an RSA key (it never leaves the PC) and sends a certificate request
//! with the code to `POST /v1/enrol`. The gateway takes the code — once, on whichever node, as
//! the store decides — signs a client certificate for the code's clinic (never the name the
//! request asks for) with the enrolment CA, adds the key to the clinic's registry entry (in force
//! at once) and answers with the certificate, the key id and the agent config template.
//!
//! Renewal: an agent signs `POST /v1/enrol/renew` with its current key (the token it connects
//! with) and a request for a new key; it gets a certificate and the new key is added beside the
//! old one (the overlap). Once it connects with the new key it retires the old one (`POST
//! /v1/enrol/retire`, signed with the new key). Codes are stored as their SHA-256 only, and no
//! code, key or certificate reaches a log line.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use openssl::pkey::{PKey, Public};
use openssl::x509::X509Req;
use serde::Deserialize;
use serde_json::json;
use tether_actors::log_target::{AUDIT, ERROR};

use super::store::{CodeTake, NewEnrolmentCode};
use super::GatewayState;
use crate::config::EnrolmentConfig;
use crate::security::jwt::{RegistryEntry, RegistryKey};
use crate::security::keys::{self, Issued, Leaf, Usage};
use crate::security::log_value;

/// The alphabet of codes (Crockford's base 32: no I, L, O or U, so nothing is misread).
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters in a code: 24 × 5 = 120 random bits.
const CODE_CHARS: usize = 24;
/// Smallest RSA key a request may carry.
const MIN_RSA_BITS: u32 = 2048;
/// Keys a clinic may hold before enrolment or renewal adds another (retire old ones first):
/// bounds what a leaked code or key can pile into the registry.
pub const MAX_KEYS_PER_CLINIC: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum EnrolmentError {
    #[error("gateway.enrolment.{key}: {path}: {message}")]
    File {
        key: &'static str,
        path: String,
        message: String,
    },
}

/// What the gateway needs to enrol clinics, loaded at start.
pub struct Enrolment {
    gateway_id: String,
    ca: Issued,
    code_ttl: Duration,
    cert_days: u32,
    template: Option<String>,
    server_ca: Option<String>,
    renew_before: Duration,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, EnrolmentError> {
    std::fs::read(path).map_err(|e| EnrolmentError::File {
        key,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

impl Enrolment {
    pub fn from_config(e: &EnrolmentConfig, gateway_id: &str) -> Result<Self, EnrolmentError> {
        let bad = |key: &'static str, path: &Path, message: String| EnrolmentError::File {
            key,
            path: path.display().to_string(),
            message,
        };
        let cert = openssl::x509::X509::from_pem(&read("ca_cert", &e.ca_cert)?).map_err(|err| {
            bad(
                "ca_cert",
                &e.ca_cert,
                format!("not a PEM certificate: {err}"),
            )
        })?;
        let key = PKey::private_key_from_pem(&read("ca_key", &e.ca_key)?)
            .map_err(|err| bad("ca_key", &e.ca_key, format!("not a PEM private key: {err}")))?;
        let matches = cert
            .public_key()
            .map(|p| p.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(bad(
                "ca_key",
                &e.ca_key,
                "is not the key of gateway.enrolment.ca_cert".into(),
            ));
        }
        let text =
            |key: &'static str, p: &Option<std::path::PathBuf>| -> Result<_, EnrolmentError> {
                p.as_ref()
                    .map(|p| {
                        String::from_utf8(read(key, p)?)
                            .map_err(|_| bad(key, p, "is not UTF-8 text".into()))
                    })
                    .transpose()
            };
        Ok(Enrolment {
            gateway_id: gateway_id.to_string(),
            ca: Issued { cert, key },
            code_ttl: e.code_ttl.get(),
            cert_days: e.cert_days,
            template: text("agent_template", &e.agent_template)?,
            server_ca: text("server_ca", &e.server_ca)?,
            renew_before: e.renew_before.get(),
        })
    }
}

/// A new code: 24 characters of Crockford base 32 in groups of four (`K7QF-2M9X-…`).
pub fn new_code() -> String {
    let mut raw = [0u8; CODE_CHARS];
    if openssl::rand::rand_bytes(&mut raw).is_err() {
        // The OS generator failed: fall back to the thread generator (also a CSPRNG).
        raw = rand::random();
    }
    let chars: Vec<char> = raw
        .iter()
        .map(|b| ALPHABET[(b & 31) as usize] as char)
        .collect();
    chars
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

/// A code as typed (any case, dashes and spaces anywhere, `O` for `0`, `I`/`L` for `1`) in its
/// one spelling; `None` when it cannot be a code.
pub fn normalise_code(typed: &str) -> Option<String> {
    let mut out = String::with_capacity(CODE_CHARS);
    for c in typed.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        };
        if !ALPHABET.contains(&(c as u8)) || !c.is_ascii() {
            return None;
        }
        out.push(c);
    }
    (out.len() == CODE_CHARS).then_some(out)
}

/// What the store keeps of a code.
pub fn code_hash(normalised: &str) -> String {
    openssl::sha::sha256(normalised.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a certificate request is refused (the field is `csr`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----)")]
    NotPem,
    #[error("its signature does not verify with its own key")]
    Signature,
    #[error("an RSA key of {0} bits: at least {MIN_RSA_BITS} are required")]
    Weak(u32),
    #[error("the key is not RSA (connection tokens are RS256)")]
    NotRsa,
}

/// The request's public key, once it proves the requester holds the private key.
pub fn check_csr(pem: &str) -> Result<PKey<Public>, CsrError> {
    let req = X509Req::from_pem(pem.as_bytes()).map_err(|_| CsrError::NotPem)?;
    let key = req.public_key().map_err(|_| CsrError::NotPem)?;
    if !req.verify(&key).unwrap_or(false) {
        return Err(CsrError::Signature);
    }
    let rsa = key.rsa().map_err(|_| CsrError::NotRsa)?;
    let bits = rsa.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(CsrError::Weak(bits));
    }
    Ok(key)
}

/// The certificate (PEM) and key id for `clinic`'s key.
fn certify(
    en: &Enrolment,
    clinic: &str,
    key: &PKey<Public>,
) -> Result<(String, String, String), keys::KeyError> {
    let cert = keys::sign_leaf(
        &en.ca,
        &Leaf {
            dns: &[clinic],
            days: en.cert_days,
            ..Leaf::new(clinic, Usage::Client, 0)
        },
        key,
    )?;
    let kid = keys::key_id(clinic, key)?;
    let public = String::from_utf8_lossy(&key.public_key_to_pem()?).into_owned();
    Ok((
        String::from_utf8_lossy(&cert.to_pem()?).into_owned(),
        kid,
        public,
    ))
}

fn problem(status: StatusCode, field: Option<&str>, detail: impl Into<String>) -> HttpResponse {
    super::problem::problem(status, field, detail)
}

fn not_configured() -> HttpResponse {
    problem(
        StatusCode::NOT_FOUND,
        None,
        "enrolment is off on this gateway (gateway.enrolment is not configured)",
    )
}

fn peer(req: &HttpRequest) -> String {
    req.peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "-".into())
}

/// The admin token's name that made the request (set by `api::admin_auth`).
#[derive(Debug, Clone)]
pub struct AdminName(pub String);

fn admin_name(req: &HttpRequest) -> String {
    req.extensions()
        .get::<AdminName>()
        .map(|n| n.0.clone())
        .unwrap_or_else(|| "anonymous".into())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct CodeBody {
    /// Shorter than `gateway.enrolment.code_ttl` (never longer).
    ttl: Option<String>,
    /// Labels the clinic's registry entry gets (when the enrolment creates it).
    labels: BTreeMap<String, String>,
}

/// `POST /v1/registry/clinics/{id}/enrolment-codes`: a one-time code that enrols `{id}`.
pub(super) async fn create_code(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let Some(en) = &state.security.enrolment else {
        return not_configured();
    };
    let clinic = match super::api::clinic_id(id) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let parsed: CodeBody = if body.iter().all(|b| b.is_ascii_whitespace()) {
        CodeBody::default()
    } else {
        match super::api::json_body(&body) {
            Ok(b) => b,
            Err(resp) => return *resp,
        }
    };
    let ttl = match &parsed.ttl {
        None => en.code_ttl,
        Some(t) => match crate::config::parse_duration(t) {
            Some(d) if d >= Duration::from_secs(60) && d <= en.code_ttl => d,
            _ => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    Some("ttl"),
                    format!(
                        "`{}`: a duration from 1m to gateway.enrolment.code_ttl ({}s)",
                        log_value(t, 40),
                        en.code_ttl.as_secs()
                    ),
                )
            }
        },
    };
    for (k, v) in &parsed.labels {
        if k.is_empty() || k.len() > 64 || v.len() > 256 {
            return problem(
                StatusCode::BAD_REQUEST,
                Some(&format!("labels.{}", log_value(k, 64))),
                "label names are 1 to 64 characters, values at most 256",
            );
        }
    }
    if let Some(v) = &state.security.verifier {
        if v.registry()
            .clinics()
            .get(&clinic)
            .is_some_and(|c| c.revoked)
        {
            return problem(
                StatusCode::CONFLICT,
                Some("id"),
                format!("clinic {clinic} is revoked in the registry: put it back in force (PUT /v1/registry/clinics/{clinic}) before enrolling it again"),
            );
        }
    }
    let by = admin_name(&req);
    let code = new_code();
    let Some(normal) = normalise_code(&code) else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, None, "code generation");
    };
    let expires_at = crate::security::unix_now() + ttl.as_secs();
    let labels_json = serde_json::to_string(&parsed.labels).unwrap_or_else(|_| "{}".into());
    let new = NewEnrolmentCode {
        code_hash: code_hash(&normal),
        clinic_id: clinic.clone(),
        labels_json,
        expires_at,
        created_by: by.clone(),
    };
    if let Err(resp) = super::api::call(state.store.add_enrolment_code(new)).await {
        return resp;
    }
    let expires = super::store::iso_from_millis((expires_at as i64).saturating_mul(1000));
    log::info!(target: AUDIT, "event=enrolment_code_issued clinic={clinic} by={by} expires_at={expires}");
    HttpResponse::Created().json(json!({
        "clinic_id": clinic,
        "code": code,
        "expires_at": expires,
        "command": format!("tether agent enrol --gateway <gateway URL> --code {code}"),
    }))
}

/// `GET /v1/registry/clinics/{id}/enrolment-codes`: the clinic's codes (never the codes
/// themselves): when issued and by whom, until when, used when and from where.
pub(super) async fn list_codes(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
) -> HttpResponse {
    if state.security.enrolment.is_none() {
        return not_configured();
    }
    let clinic = match super::api::clinic_id(id) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    match super::api::call(state.store.enrolment_codes(&clinic)).await {
        Ok(codes) => HttpResponse::Ok().json(json!({ "clinic_id": clinic, "codes": codes })),
        Err(resp) => resp,
    }
}

/// `DELETE /v1/registry/clinics/{id}/enrolment-codes`: withdraws the clinic's unused codes.
pub(super) async fn withdraw_codes(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> HttpResponse {
    if state.security.enrolment.is_none() {
        return not_configured();
    }
    let clinic = match super::api::clinic_id(id) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let n = match super::api::call(state.store.withdraw_enrolment_codes(&clinic)).await {
        Ok(n) => n,
        Err(resp) => return resp,
    };
    let by = admin_name(&req);
    log::info!(target: AUDIT, "event=enrolment_codes_withdrawn clinic={clinic} by={by} codes={n}");
    HttpResponse::Ok().json(json!({ "clinic_id": clinic, "withdrawn": n }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolBody {
    code: String,
    csr: String,
}

/// Why `clinic` cannot get another key now (revoked, or holding the most keys), if so.
fn refuse_new_key(state: &GatewayState, clinic: &str) -> Option<String> {
    let registry = state.security.verifier.as_ref()?.registry();
    let info = registry.clinics().get(clinic)?;
    if info.revoked {
        return Some(format!("clinic {clinic} is revoked in the registry"));
    }
    (info.keys.len() >= MAX_KEYS_PER_CLINIC).then(|| {
        format!(
            "clinic {clinic} holds {} keys already (at most {MAX_KEYS_PER_CLINIC}): retire old ones first (POST /v1/enrol/retire, or PUT /v1/registry/clinics/{clinic})",
            info.keys.len()
        )
    })
}

/// Puts `key` in `clinic`'s registry entry (created with `labels` if new; `retire` removed).
/// Blocking.
fn register(
    state: &GatewayState,
    clinic: &str,
    kid: &str,
    public_pem: &str,
    labels: BTreeMap<String, String>,
    retire: &[String],
) -> Result<bool, super::clinic_registry::WriteError> {
    let current = state.security.verifier.as_ref().map(|v| v.registry());
    let existing = current.as_ref().and_then(|r| r.clinics().get(clinic));
    let mut entry = match existing {
        Some(info) => super::clinic_registry::entry_of(info),
        None => RegistryEntry {
            clinic_id: clinic.to_string(),
            keys: Vec::new(),
            revoked: false,
            labels,
        },
    };
    entry
        .keys
        .retain(|k| k.kid != kid && !retire.contains(&k.kid));
    entry.keys.push(RegistryKey {
        kid: kid.to_string(),
        algorithms: vec!["RS256".into()],
        public_key: public_pem.to_string(),
        revoked: false,
    });
    super::clinic_registry::put(state, entry)
}

/// `POST /v1/enrol` (no admin token: the one-time code is the credential).
pub(super) async fn enrol(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let Some(en) = &state.security.enrolment else {
        return not_configured();
    };
    let peer = peer(&req);
    if !state.security.admission.take() {
        log::warn!(target: AUDIT, "event=enrolment_refused peer={peer} reason=admission_limit");
        let mut resp = problem(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "busy: retry in a second",
        );
        resp.headers_mut().insert(
            actix_web::http::header::RETRY_AFTER,
            actix_web::http::header::HeaderValue::from_static("1"),
        );
        return resp;
    }
    let parsed: EnrolBody = match super::api::json_body(&body) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let key = match check_csr(&parsed.csr) {
        Ok(k) => k,
        Err(e) => {
            log::warn!(target: AUDIT, "event=enrolment_refused peer={peer} reason=bad_csr detail={:?}", e.to_string());
            return problem(StatusCode::BAD_REQUEST, Some("csr"), e.to_string());
        }
    };
    let Some(normal) = normalise_code(&parsed.code) else {
        log::warn!(target: AUDIT, "event=enrolment_refused peer={peer} reason=malformed_code");
        return problem(
            StatusCode::BAD_REQUEST,
            Some("code"),
            "not an enrolment code (24 letters and digits, e.g. K7QF-2M9X-…)",
        );
    };
    let hash = code_hash(&normal);
    let taken = match super::api::call(state.store.take_enrolment_code(&hash, &peer)).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let (clinic, labels) = match taken {
        CodeTake::Taken {
            clinic_id,
            labels_json,
        } => (
            clinic_id,
            serde_json::from_str::<BTreeMap<String, String>>(&labels_json).unwrap_or_default(),
        ),
        refused => {
            // The caller hears one answer for all three; the audit log has which.
            let reason = match &refused {
                CodeTake::Unknown => "code_unknown".to_string(),
                CodeTake::Used { at, by } => {
                    format!("code_used used_at={at} used_by={}", log_value(by, 64))
                }
                CodeTake::Expired { clinic_id } => format!("code_expired clinic={clinic_id}"),
                CodeTake::Taken { .. } => String::new(),
            };
            log::warn!(target: AUDIT, "event=enrolment_refused peer={peer} reason={reason}");
            return problem(
                StatusCode::FORBIDDEN,
                Some("code"),
                "this code is unknown, used or expired: ask the operator for a new one",
            );
        }
    };
    if let Some(why) = refuse_new_key(&state, &clinic) {
        let _ = state.store.return_enrolment_code(&hash).await;
        log::warn!(target: AUDIT, "event=enrolment_refused peer={peer} clinic={clinic} reason=no_new_key detail={why:?}");
        return problem(
            StatusCode::CONFLICT,
            None,
            format!("{why}; the code stays valid"),
        );
    }
    let issued = match certify(en, &clinic, &key) {
        Ok(v) => v,
        Err(e) => {
            let _ = state.store.return_enrolment_code(&hash).await;
            log::error!(target: ERROR, "event=enrolment_failed clinic={clinic} stage=certificate error={e}");
            return problem(StatusCode::INTERNAL_SERVER_ERROR, None, "the certificate could not be made (see the gateway's error log); the code stays valid");
        }
    };
    let (cert, kid, public) = issued;
    let st = state.clone();
    let (c, k, p) = (clinic.clone(), kid.clone(), public.clone());
    let put = web::block(move || register(&st, &c, &k, &p, labels, &[])).await;
    match put {
        Ok(Ok(_)) => {}
        failed => {
            let _ = state.store.return_enrolment_code(&hash).await;
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
                Ok(Ok(_)) => String::new(),
            };
            log::error!(target: ERROR, "event=enrolment_failed clinic={clinic} stage=registry error={:?}", log_value(&why, 300));
            return problem(StatusCode::INTERNAL_SERVER_ERROR, None, "the clinic could not be added to the registry (see the gateway's error log); the code stays valid");
        }
    }
    state.metrics.add(&state.metrics.enrolments, 1);
    log::info!(target: AUDIT, "event=clinic_enrolled clinic={clinic} kid={kid} peer={peer}");
    HttpResponse::Created().json(answer(en, &clinic, &kid, &cert))
}

fn answer(en: &Enrolment, clinic: &str, kid: &str, cert: &str) -> serde_json::Value {
    json!({
        "clinic_id": clinic,
        "kid": kid,
        "certificate": cert,
        "gateway_id": en.gateway_id,
        "server_ca": en.server_ca,
        "agent_template": en.template,
        "renew_before_s": en.renew_before.as_secs(),
    })
}

/// A clinic's own request: admitted as a handshake is (token, certificate, replay guard),
/// then its JSON body.
async fn clinic_request<T: serde::de::DeserializeOwned>(
    state: &GatewayState,
    req: &HttpRequest,
    body: &[u8],
) -> Result<(crate::security::jwt::Verified, T), Box<HttpResponse>> {
    let who = match super::session::admit(req, state).await? {
        Some(v) => v,
        None => {
            return Err(Box::new(problem(
                StatusCode::UNAUTHORIZED,
                None,
                "this needs a clinic token (the gateway has no clinic registry)",
            )))
        }
    };
    Ok((who, super::api::json_body(body)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    csr: String,
}

/// `POST /v1/enrol/renew`, signed with the clinic's current key (its connection token): a
/// certificate for a new key, which is added beside the current one.
pub(super) async fn renew(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let Some(en) = &state.security.enrolment else {
        return not_configured();
    };
    let (who, parsed) = match clinic_request::<RenewBody>(&state, &req, &body).await {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let key = match check_csr(&parsed.csr) {
        Ok(k) => k,
        Err(e) => return problem(StatusCode::BAD_REQUEST, Some("csr"), e.to_string()),
    };
    if let Some(why) = refuse_new_key(&state, &who.clinic) {
        log::warn!(target: AUDIT, "event=renewal_refused clinic={} kid={} reason=no_new_key detail={why:?}", who.clinic, who.kid);
        return problem(StatusCode::CONFLICT, None, why);
    }
    let (cert, kid, public) = match certify(en, &who.clinic, &key) {
        Ok(v) => v,
        Err(e) => {
            log::error!(target: ERROR, "event=renewal_failed clinic={} stage=certificate error={e}", who.clinic);
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "the certificate could not be made (see the gateway's error log)",
            );
        }
    };
    if kid == who.kid {
        return problem(
            StatusCode::BAD_REQUEST,
            Some("csr"),
            "the request is for the key in use: make a new key",
        );
    }
    let st = state.clone();
    let (c, k) = (who.clinic.clone(), kid.clone());
    match web::block(move || register(&st, &c, &k, &public, BTreeMap::new(), &[])).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            log::error!(target: ERROR, "event=renewal_failed clinic={} stage=registry error={:?}", who.clinic, log_value(&e.to_string(), 300));
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "the key could not be added to the registry (see the gateway's error log)",
            );
        }
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
    state.metrics.add(&state.metrics.enrolments, 1);
    log::info!(target: AUDIT, "event=key_renewed clinic={} old_kid={} new_kid={kid} peer={}", who.clinic, who.kid, peer(&req));
    HttpResponse::Created().json(answer(en, &who.clinic, &kid, &cert))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetireBody {
    kids: Vec<String>,
}

/// `POST /v1/enrol/retire`, signed with the clinic's new key: removes older keys of the same
/// clinic (their sessions close, their next handshake is refused).
pub(super) async fn retire(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    if state.security.enrolment.is_none() {
        return not_configured();
    }
    let (who, parsed) = match clinic_request::<RetireBody>(&state, &req, &body).await {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    if parsed.kids.contains(&who.kid) {
        return problem(
            StatusCode::BAD_REQUEST,
            Some("kids"),
            "cannot retire the key that signed this request",
        );
    }
    let registry = state.security.verifier.as_ref().map(|v| v.registry());
    let Some(info) = registry
        .as_ref()
        .and_then(|r| r.clinics().get(&who.clinic).cloned())
    else {
        return problem(
            StatusCode::NOT_FOUND,
            None,
            "the clinic is not in the registry",
        );
    };
    for (i, k) in parsed.kids.iter().enumerate() {
        if !info.keys.iter().any(|o| o.kid == *k) {
            return problem(
                StatusCode::NOT_FOUND,
                Some(&format!("kids[{i}]")),
                format!("{} is not a key of this clinic", log_value(k, 96)),
            );
        }
    }
    let st = state.clone();
    let (clinic, kids) = (who.clinic.clone(), parsed.kids.clone());
    let result = web::block(move || {
        let mut entry = super::clinic_registry::entry_of(&info);
        entry.keys.retain(|k| !kids.contains(&k.kid));
        super::clinic_registry::put(&st, entry)
    })
    .await;
    match result {
        Ok(Ok(_)) => {
            log::info!(target: AUDIT, "event=keys_retired clinic={clinic} kids={:?} by_kid={}", parsed.kids.join(","), who.kid);
            HttpResponse::Ok().json(json!({ "clinic_id": clinic, "retired": parsed.kids }))
        }
        Ok(Err(e)) => {
            log::error!(target: ERROR, "event=retire_failed clinic={clinic} error={:?}", log_value(&e.to_string(), 300));
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "the registry could not be written (see the gateway's error log)",
            )
        }
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_long_random_and_read_back_however_typed() {
        let a = new_code();
        let b = new_code();
        assert_ne!(a, b);
        assert_eq!(a.len(), CODE_CHARS + CODE_CHARS / 4 - 1);
        let n = normalise_code(&a).expect("own code");
        assert_eq!(n.len(), CODE_CHARS);
        // Lower case, spaces instead of dashes, O for 0 and l for 1 all read the same.
        let typed = a
            .to_ascii_lowercase()
            .replace('-', " ")
            .replace('0', "o")
            .replace('1', "l");
        assert_eq!(normalise_code(&typed).as_deref(), Some(n.as_str()));
        assert_eq!(
            code_hash(&n),
            code_hash(&normalise_code(&typed).unwrap_or_default())
        );
        assert_eq!(code_hash(&n).len(), 64);
        // Too short, too long, a letter that is never in a code.
        assert_eq!(normalise_code(&a[..a.len() - 1]), None);
        assert_eq!(normalise_code(&format!("{a}A")), None);
        assert_eq!(
            normalise_code(&a.replacen(|c: char| c.is_ascii_alphanumeric(), "U", 1)),
            None
        );
        assert_eq!(normalise_code("é"), None);
    }

    #[test]
    fn a_request_must_prove_its_key_and_be_strong_enough() {
        let key = keys::rsa_key(2048).expect("key");
        let pem = keys::csr("clinic-x", &key).expect("csr");
        let public = check_csr(&pem).expect("valid");
        assert!(public.public_eq(&key));
        assert_eq!(check_csr("hello").err(), Some(CsrError::NotPem));
        let weak = keys::rsa_key(1024).expect("weak key");
        let weak_pem = keys::csr("clinic-x", &weak).expect("csr");
        assert_eq!(check_csr(&weak_pem).err(), Some(CsrError::Weak(1024)));
        // A request whose signature is not its key's: one key's request, another's public key.
        let other = keys::rsa_key(2048).expect("other");
        let mut b = openssl::x509::X509ReqBuilder::new().expect("builder");
        b.set_pubkey(&other).expect("pubkey");
        b.sign(&key, openssl::hash::MessageDigest::sha256())
            .expect("sign");
        let forged = String::from_utf8_lossy(&b.build().to_pem().expect("pem")).into_owned();
        assert_eq!(check_csr(&forged).err(), Some(CsrError::Signature));
    }
}
