//! Admin bearer tokens for the REST API. Config holds only SHA-256 hashes; comparison is
//! constant-time. Scopes: `read` (GET) and `write` (POST).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenConfig {
    /// Who holds the token (appears in the audit log).
    pub name: String,
    /// Hex SHA-256 of the token (`tether keys admin-token` prints it).
    pub sha256: String,
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminAuthError {
    #[error("no bearer token")]
    Missing,
    #[error("unknown token")]
    Unknown,
    #[error("token {0} lacks the {1:?} scope")]
    Scope(String, Scope),
}

pub struct AdminTokens {
    entries: Vec<(String, Vec<u8>, Vec<Scope>)>,
}

pub fn sha256_hex(token: &str) -> String {
    openssl::sha::sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random token (`tta_` + 64 hex digits).
pub fn new_token() -> String {
    let mut raw = [0u8; 32];
    if openssl::rand::rand_bytes(&mut raw).is_err() {
        for (i, b) in raw.iter_mut().enumerate() {
            *b = rand::random::<u8>() ^ (i as u8);
        }
    }
    format!(
        "tta_{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

impl AdminTokens {
    /// `None` names the first entry whose hash is not 64 hex digits.
    pub fn new(cfg: &[AdminTokenConfig]) -> Result<Self, String> {
        let mut entries = Vec::new();
        for c in cfg {
            let h = unhex(&c.sha256.to_ascii_lowercase()).ok_or_else(|| c.name.clone())?;
            entries.push((c.name.clone(), h, c.scopes.clone()));
        }
        Ok(AdminTokens { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks an `Authorization` header value; returns the token's name.
    pub fn check(&self, header: Option<&str>, need: Scope) -> Result<String, AdminAuthError> {
        let token = header
            .and_then(super::bearer_token)
            .ok_or(AdminAuthError::Missing)?;
        let hash = openssl::sha::sha256(token.as_bytes());
        for (name, h, scopes) in &self.entries {
            if openssl::memcmp::eq(h, &hash) {
                return if scopes.contains(&need) {
                    Ok(name.clone())
                } else {
                    Err(AdminAuthError::Scope(name.clone(), need))
                };
            }
        }
        Err(AdminAuthError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_by_hash_and_scope() {
        let t = new_token();
        let tokens = AdminTokens::new(&[AdminTokenConfig {
            name: "webapi".into(),
            sha256: sha256_hex(&t),
            scopes: vec![Scope::Read],
        }])
        .expect("tokens");
        assert_eq!(
            tokens.check(Some(&format!("Bearer {t}")), Scope::Read),
            Ok("webapi".into())
        );
        assert_eq!(
            tokens.check(Some(&format!("Bearer {t}")), Scope::Write),
            Err(AdminAuthError::Scope("webapi".into(), Scope::Write))
        );
        assert_eq!(
            tokens.check(Some("Bearer nope"), Scope::Read),
            Err(AdminAuthError::Unknown)
        );
        assert_eq!(
            tokens.check(None, Scope::Read),
            Err(AdminAuthError::Missing)
        );
        assert_eq!(
            tokens.check(Some(&t), Scope::Read),
            Err(AdminAuthError::Missing)
        );
        assert_eq!(
            tokens.check(Some(&format!("Bearer  {t}")), Scope::Read),
            Err(AdminAuthError::Missing),
            "two spaces"
        );
    }
}
