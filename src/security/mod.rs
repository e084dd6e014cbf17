//! Security: TLS (openssl), clinic-signed JWTs, payload field encryption, admin tokens, and
//! limits. See docs/SECURITY.md for the threat model.

pub mod admin;
pub mod crypto;
pub mod dialer;
pub mod jwt;
pub mod keys;
pub mod limits;
pub mod tls;

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
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

/// The token of an `Authorization: Bearer <token>` header, parsed strictly (RFC 6750 §2.1):
/// the scheme (any case), exactly one space, then a non-empty `b64token`
/// (`A-Z a-z 0-9 - . _ ~ + /`, trailing `=`). Anything else — two spaces, a tab, a trailing
/// space, a comma list — is no bearer token at all.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case("bearer ") || token.is_empty() {
        return None;
    }
    let body = token.trim_end_matches('=');
    let ok = !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        });
    ok.then_some(token)
}

/// A value from the other side of a connection (a header, a path, a parser's message quoting
/// input, an agent's free-text field) made fit for one log line: at most `max` characters,
/// control and non-ASCII characters escaped, quotes escaped, a cut marked with `…+N`. The
/// result is always wrapped in double quotes.
pub fn log_value(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 8);
    out.push('"');
    let mut taken = 0usize;
    for c in s.chars() {
        if taken == max {
            break;
        }
        taken += 1;
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c => out.extend(c.escape_default()),
        }
    }
    let left = s.chars().count().saturating_sub(taken);
    if left > 0 {
        out.push_str(&format!("…+{left}"));
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(
            bearer_token("Bearer abc.def-ghi_~+/=="),
            Some("abc.def-ghi_~+/==")
        );
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        for bad in [
            "Bearer  abc",
            "Bearer abc ",
            "Bearer\tabc",
            "Bearer ",
            "Bearer",
            "Bearer a,b",
            "Bearer ===",
            "Basic abc",
            "Bearerabc",
            "Bearer é",
        ] {
            assert_eq!(bearer_token(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn log_values_are_cut_and_escaped() {
        assert_eq!(log_value("plain", 10), "\"plain\"");
        assert_eq!(
            log_value("a\"b\nc\u{1b}[31m", 20),
            "\"a\\\"b\\nc\\u{1b}[31m\""
        );
        assert_eq!(log_value(&"x".repeat(100), 5), "\"xxxxx…+95\"");
        assert_eq!(log_value("ünï", 10), "\"\\u{fc}n\\u{ef}\"");
    }
}
