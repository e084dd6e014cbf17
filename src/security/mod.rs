//! Security: TLS (openssl), clinic-signed JWTs, payload field encryption, admin tokens, and
//! limits. See docs/SECURITY.md for the threat model.

pub mod admin;
pub mod crypto;
pub mod dialer;
pub mod jwt;
pub mod keys;
pub mod limits;
pub mod tls;

/// Seconds since the Unix epoch.
/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Identifiers that may appear in logs, file names and key ids.
pub fn safe_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.contains("..")
}
