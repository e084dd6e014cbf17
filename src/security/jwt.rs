//! Clinic identity tokens.
//!
//! The agent signs a short-lived JWT with its own private key for every connection attempt
//! (`iss` = `sub` = clinic id, `aud` = gateway id, `iat`, `nbf`, `exp` ≤ 5 min, `jti`, header
//! `kid`). The gateway looks the `kid` up in its clinic registry, accepts only that key's
//! algorithms, requires every claim, applies an explicit leeway (default 30 s; the crate's
//! default of 60 s and its `nbf` default of off are overridden), and refuses a `jti` it has
//! seen within the token's lifetime.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{safe_id, unix_now};

/// Longest token lifetime the gateway accepts, measured on the gateway's own clock
/// (`exp - now`), never on the token's word (`iat`).
pub const MAX_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("reading key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("key {path}: {message}")]
    Key { path: String, message: String },
    #[error("signing token: {0}")]
    Sign(String),
    #[error("clinic registry {path}: {message}")]
    Registry { path: String, message: String },
}

/// Why a token was refused. Goes to the audit log, never into the HTTP response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token header")]
    BadHeader,
    #[error("token has no kid")]
    NoKid,
    #[error("kid is not a safe identifier")]
    BadKid,
    #[error("unknown kid {0}")]
    UnknownKid(String),
    #[error("key {0} is revoked")]
    Revoked(String),
    #[error("algorithm {0:?} is not allowed for this key")]
    AlgorithmNotAllowed(Algorithm),
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token lifetime {0} s exceeds the maximum")]
    TooLong(u64),
    #[error("token issued {0} s in the future")]
    IssuedInFuture(u64),
    #[error("empty jti")]
    NoJti,
    #[error("replayed jti")]
    Replay,
    #[error("client certificate identity {cert:?} does not match token subject {sub}")]
    CertMismatch { cert: Vec<String>, sub: String },
    #[error("client certificate required")]
    NoClientCert,
}

impl AuthError {
    /// Whether the refusal belongs to the clinic its key is registered to, for the fleet views:
    /// the key is revoked, or the token's signature checked out and a claim (or the replay
    /// guard, or the certificate) refused it. A token anyone could forge (an unknown key, a bad
    /// signature) says nothing about a clinic.
    pub fn attributable(&self) -> bool {
        match self {
            AuthError::Revoked(_)
            | AuthError::TooLong(_)
            | AuthError::IssuedInFuture(_)
            | AuthError::Replay
            | AuthError::CertMismatch { .. } => true,
            AuthError::Invalid(kind) => matches!(
                kind.as_str(),
                "ExpiredSignature"
                    | "ImmatureSignature"
                    | "InvalidAudience"
                    | "InvalidIssuer"
                    | "InvalidSubject"
            ),
            _ => false,
        }
    }

    /// The coarse reason told to the client (RFC 6750 `error_description`, and `reason` in the
    /// problem body): nothing it does not already know — its own key id, its own clock, its own
    /// certificate. The full detail stays in the gateway's audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::BadHeader | AuthError::NoKid | AuthError::BadKid | AuthError::NoJti => {
                "malformed_token"
            }
            AuthError::UnknownKid(_) => "unknown_key_id",
            AuthError::Revoked(_) => "key_revoked",
            AuthError::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
            AuthError::Invalid(kind) => match kind.as_str() {
                "ExpiredSignature" => "token_expired",
                "ImmatureSignature" => "token_not_yet_valid",
                "InvalidAudience" => "wrong_audience",
                "InvalidIssuer" | "InvalidSubject" => "clinic_not_allowed_for_key",
                "InvalidSignature" => "bad_signature",
                _ => "invalid_token",
            },
            AuthError::TooLong(_) => "token_lifetime_too_long",
            AuthError::IssuedInFuture(_) => "token_not_yet_valid",
            AuthError::Replay => "token_replayed",
            AuthError::CertMismatch { .. } => "clinic_not_allowed_for_certificate",
            AuthError::NoClientCert => "client_certificate_required",
        }
    }

    /// Whether the reason concerns time (the client's clock may be off: tell it ours).
    pub fn about_time(&self) -> bool {
        matches!(
            self.reason(),
            "token_expired" | "token_not_yet_valid" | "token_lifetime_too_long"
        )
    }
}

/// Signs connection tokens for one clinic.
pub struct TokenSigner {
    clinic: String,
    audience: String,
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
    lifetime: Duration,
}

impl TokenSigner {
    pub fn from_pem_file(
        path: &Path,
        clinic: &str,
        audience: &str,
        kid: &str,
        lifetime: Duration,
    ) -> Result<Self, JwtError> {
        let pem = std::fs::read(path).map_err(|source| JwtError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| JwtError::Key {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        // No kid configured: the key's own id (what enrolment registered it as).
        let kid = if kid.is_empty() {
            openssl::pkey::PKey::private_key_from_pem(&pem)
                .map_err(|e| e.to_string())
                .and_then(|k| super::keys::key_id(clinic, &k).map_err(|e| e.to_string()))
                .map_err(|message| JwtError::Key {
                    path: path.display().to_string(),
                    message,
                })?
        } else {
            kid.to_string()
        };
        Ok(TokenSigner {
            clinic: clinic.into(),
            audience: audience.into(),
            kid,
            algorithm: Algorithm::RS256,
            key,
            lifetime: lifetime.min(MAX_LIFETIME),
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The key id the tokens carry.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A fresh token (new `jti`) valid from now for the configured lifetime.
    pub fn sign(&self) -> Result<String, JwtError> {
        let now = unix_now();
        let claims = Claims {
            iss: self.clinic.clone(),
            sub: self.clinic.clone(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: now + self.lifetime.as_secs(),
            jti: format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ),
        };
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| JwtError::Sign(e.to_string()))
    }
}

/// One public key of a clinic.
pub struct ClinicKey {
    pub clinic: String,
    pub kid: String,
    pub algorithms: Vec<Algorithm>,
    /// Refused at the handshake (`key_revoked`) and its sessions closed; kept so the refusal
    /// can say so rather than "unknown key".
    pub revoked: bool,
    key: DecodingKey,
}

/// A clinic registry entry as written by `tether keys registry-entry`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub clinic_id: String,
    pub keys: Vec<RegistryKey>,
    /// Every key of the clinic revoked at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
    /// Free labels (`region: north`), listed by `GET /v1/registry/clinics`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryKey {
    pub kid: String,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// PEM: an RSA public key or a certificate.
    pub public_key: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}

fn parse_alg(s: &str) -> Option<Algorithm> {
    match s {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "PS256" => Some(Algorithm::PS256),
        "PS384" => Some(Algorithm::PS384),
        "PS512" => Some(Algorithm::PS512),
        _ => None,
    }
}

/// What the registry holds of one clinic, for listings.
#[derive(Debug, Clone, Serialize)]
pub struct ClinicInfo {
    pub clinic_id: String,
    pub revoked: bool,
    pub labels: BTreeMap<String, String>,
    pub keys: Vec<KeyInfo>,
    /// The registry file it came from (`store:<clinic>` for a registry kept in the store).
    pub file: String,
    /// The entry as loaded (public keys included), for changes written back.
    #[serde(skip)]
    pub entry: std::sync::Arc<RegistryEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub kid: String,
    pub algorithms: Vec<String>,
    pub revoked: bool,
}

/// Every clinic's keys, by `kid` (a kid is unique across the registry).
#[derive(Default)]
pub struct ClinicRegistry {
    by_kid: HashMap<String, ClinicKey>,
    clinics: BTreeMap<String, ClinicInfo>,
}

impl ClinicRegistry {
    pub fn add(&mut self, entry: RegistryEntry, source: &str) -> Result<(), JwtError> {
        let err = |message: String| JwtError::Registry {
            path: source.to_string(),
            message,
        };
        if !safe_id(&entry.clinic_id, 64) {
            return Err(err(format!(
                "clinic_id {:?} is not a valid id",
                entry.clinic_id
            )));
        }
        if let Some(other) = self.clinics.get(&entry.clinic_id) {
            return Err(err(format!(
                "clinic {} is already registered by {}",
                entry.clinic_id, other.file
            )));
        }
        if entry.keys.is_empty() {
            return Err(err(format!("clinic {} has no keys", entry.clinic_id)));
        }
        let original = std::sync::Arc::new(entry.clone());
        let mut keys = Vec::new();
        let mut parsed = Vec::new();
        for k in entry.keys {
            if !safe_id(&k.kid, 128) {
                return Err(err(format!("kid {:?} is not a safe identifier", k.kid)));
            }
            let mut algorithms = Vec::new();
            for a in &k.algorithms {
                algorithms.push(parse_alg(a).ok_or_else(|| {
                    err(format!(
                        "algorithm {a:?} is not allowed (RS256/384/512, PS256/384/512)"
                    ))
                })?);
            }
            let public =
                public_key_pem(&k.public_key).map_err(|m| err(format!("kid {}: {m}", k.kid)))?;
            let key = DecodingKey::from_rsa_pem(&public)
                .map_err(|e| err(format!("kid {}: {e}", k.kid)))?;
            if self.by_kid.contains_key(&k.kid) || parsed.iter().any(|p: &ClinicKey| p.kid == k.kid)
            {
                return Err(err(format!("kid {} is registered twice", k.kid)));
            }
            let revoked = entry.revoked || k.revoked;
            keys.push(KeyInfo {
                kid: k.kid.clone(),
                algorithms: k.algorithms.clone(),
                revoked,
            });
            parsed.push(ClinicKey {
                clinic: entry.clinic_id.clone(),
                kid: k.kid,
                algorithms,
                revoked,
                key,
            });
        }
        for k in parsed {
            self.by_kid.insert(k.kid.clone(), k);
        }
        self.clinics.insert(
            entry.clinic_id.clone(),
            ClinicInfo {
                clinic_id: entry.clinic_id,
                revoked: entry.revoked,
                labels: entry.labels,
                keys,
                file: source.to_string(),
                entry: original,
            },
        );
        Ok(())
    }

    /// Loads every `*.yaml` registry entry in a directory.
    pub fn load_dir(dir: &Path) -> Result<Self, JwtError> {
        let mut reg = ClinicRegistry::default();
        for p in registry_files(dir)? {
            reg.add(read_entry(&p)?, &p.display().to_string())?;
        }
        Ok(reg)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty()
    }

    /// Every clinic, by id.
    pub fn clinics(&self) -> &BTreeMap<String, ClinicInfo> {
        &self.clinics
    }

    /// Whether the key verifies tokens (known and not revoked).
    pub fn is_active(&self, kid: &str) -> bool {
        self.by_kid.get(kid).is_some_and(|k| !k.revoked)
    }

    /// Whether the clinic has a registry entry (revoked or not).
    pub fn contains(&self, clinic: &str) -> bool {
        self.clinics.contains_key(clinic)
    }

    /// Key ids that verify tokens (not revoked), with their clinic.
    fn active(&self) -> BTreeSet<(String, String)> {
        self.by_kid
            .values()
            .filter(|k| !k.revoked)
            .map(|k| (k.clinic.clone(), k.kid.clone()))
            .collect()
    }
}

/// One registry entry file, read and parsed (errors name the file).
pub fn read_entry(p: &Path) -> Result<RegistryEntry, JwtError> {
    let err = |message: String| JwtError::Registry {
        path: p.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(p).map_err(|e| err(e.to_string()))?;
    serde_saphyr::from_str(&text).map_err(|e| err(e.to_string()))
}

/// The `*.yaml` / `*.yml` files of a registry directory, sorted.
pub fn registry_files(dir: &Path) -> Result<Vec<PathBuf>, JwtError> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| JwtError::Registry {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// What a registry replacement changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RegistryChange {
    pub clinics_added: Vec<String>,
    pub clinics_removed: Vec<String>,
    /// Keys that verified tokens before and no longer do (removed or revoked), by clinic:
    /// sessions opened with them must end.
    pub keys_withdrawn: BTreeMap<String, Vec<String>>,
    /// Keys that verify tokens now and did not before.
    pub keys_added: Vec<String>,
}

impl RegistryChange {
    pub fn is_empty(&self) -> bool {
        self.clinics_added.is_empty()
            && self.clinics_removed.is_empty()
            && self.keys_withdrawn.is_empty()
            && self.keys_added.is_empty()
    }
}

/// Accepts a PEM public key, or extracts the public key from a PEM certificate.
fn public_key_pem(pem: &str) -> Result<Vec<u8>, String> {
    if pem.contains("BEGIN CERTIFICATE") {
        let cert = openssl::x509::X509::from_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let key = cert.public_key().map_err(|e| e.to_string())?;
        key.public_key_to_pem().map_err(|e| e.to_string())
    } else {
        Ok(pem.as_bytes().to_vec())
    }
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub clinic: String,
    pub kid: String,
    pub jti: String,
    pub exp: u64,
    /// When a session opened with this token ends (unix seconds): the earlier of the token's
    /// expiry and the lifetime cap counted from the verification.
    pub close_at: u64,
}

/// Verifies connection tokens at the gateway.
pub struct TokenVerifier {
    audience: String,
    leeway: u64,
    /// Replaced whole on a reload; a verification holds the one it started with.
    registry: RwLock<Arc<ClinicRegistry>>,
    seen: Mutex<HashMap<String, u64>>,
}

impl TokenVerifier {
    pub fn new(audience: &str, leeway: Duration, registry: ClinicRegistry) -> Self {
        TokenVerifier {
            audience: audience.into(),
            leeway: leeway.as_secs(),
            registry: RwLock::new(Arc::new(registry)),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// The registry in force.
    pub fn registry(&self) -> Arc<ClinicRegistry> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `next` in force for every handshake from now on, and says what changed.
    pub fn replace(&self, next: ClinicRegistry) -> RegistryChange {
        let mut slot = self.registry.write().unwrap_or_else(|p| p.into_inner());
        let before = slot.clone();
        let (old, new) = (before.active(), next.active());
        let mut change = RegistryChange {
            clinics_added: next
                .clinics
                .keys()
                .filter(|c| !before.clinics.contains_key(*c))
                .cloned()
                .collect(),
            clinics_removed: before
                .clinics
                .keys()
                .filter(|c| !next.clinics.contains_key(*c))
                .cloned()
                .collect(),
            keys_added: new.difference(&old).map(|(_, k)| k.clone()).collect(),
            ..RegistryChange::default()
        };
        for (clinic, kid) in old.difference(&new) {
            change
                .keys_withdrawn
                .entry(clinic.clone())
                .or_default()
                .push(kid.clone());
        }
        *slot = Arc::new(next);
        change
    }

    /// The clinic a token's key is registered to (revoked or not), from its header alone.
    pub fn clinic_of_key(&self, token: &str) -> Option<String> {
        let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
        self.registry().by_kid.get(&kid).map(|e| e.clinic.clone())
    }

    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::BadHeader)?;
        let kid = header.kid.ok_or(AuthError::NoKid)?;
        if !safe_id(&kid, 128) {
            return Err(AuthError::BadKid);
        }
        let registry = self.registry();
        let entry = registry
            .by_kid
            .get(&kid)
            .ok_or_else(|| AuthError::UnknownKid(kid.clone()))?;
        if entry.revoked {
            return Err(AuthError::Revoked(kid));
        }
        if !entry.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed(header.alg));
        }
        let mut v = Validation::new(header.alg);
        v.algorithms = entry.algorithms.clone();
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&entry.clinic]);
        v.sub = Some(entry.clinic.clone());
        v.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &entry.key, &v)
            .map_err(|e| AuthError::Invalid(format!("{:?}", e.kind())))?;
        let c = data.claims;
        let now = unix_now();
        // The cap holds against this clock: a token claiming to be issued later (`iat` in the
        // future) must not stretch its own lifetime.
        if c.iat > now + self.leeway {
            return Err(AuthError::IssuedInFuture(c.iat - now));
        }
        let cap = MAX_LIFETIME.as_secs() + self.leeway;
        let left = c.exp.saturating_sub(now);
        let claimed = c.exp.saturating_sub(c.iat);
        if left > cap || claimed > cap {
            return Err(AuthError::TooLong(left.max(claimed)));
        }
        if c.jti.is_empty() {
            return Err(AuthError::NoJti);
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = self.leeway;
        seen.retain(|_, exp| *exp + horizon >= now);
        if seen.contains_key(&c.jti) {
            return Err(AuthError::Replay);
        }
        seen.insert(c.jti.clone(), c.exp);
        Ok(Verified {
            clinic: c.sub,
            kid,
            jti: c.jti,
            exp: c.exp,
            close_at: c.exp.min(now + MAX_LIFETIME.as_secs()),
        })
    }
}
