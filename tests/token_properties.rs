//! Property tests: token verification never panics on any input, and no altered token verifies.

use std::time::Duration;

use proptest::prelude::*;
use tether::security::jwt::{ClinicRegistry, TokenSigner, TokenVerifier};
use tether::security::keys;

struct Setup {
    _dir: tempfile::TempDir,
    verifier: TokenVerifier,
    signer: TokenSigner,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    keys::dev_setup(dir.path(), &["clinic-p".to_string()], 2048).expect("keys");
    let verifier = TokenVerifier::new(
        "gw-local",
        Duration::from_secs(30),
        ClinicRegistry::load_dir(&dir.path().join("clinics")).expect("registry"),
    );
    let signer = TokenSigner::from_pem_file(
        &dir.path().join("clinic-p.key"),
        "clinic-p",
        "gw-local",
        "clinic-p-1",
        Duration::from_secs(60),
    )
    .expect("signer");
    Setup {
        _dir: dir,
        verifier,
        signer,
    }
}

#[test]
fn a_fresh_token_verifies_once() {
    let s = setup();
    let t = s.signer.sign().expect("sign");
    let v = s.verifier.verify(&t).expect("valid");
    assert_eq!(v.clinic, "clinic-p");
    assert!(s.verifier.verify(&t).is_err(), "replay");
}

/// One key set for all cases (key generation is the slow part), one runner per property.
#[test]
fn arbitrary_strings_never_panic_or_verify() {
    let s = setup();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(&"[A-Za-z0-9_.=+/-]{0,400}", |text| {
            prop_assert!(s.verifier.verify(&text).is_err());
            Ok(())
        })
        .expect("property holds");
}

#[test]
fn altered_tokens_never_verify() {
    let s = setup();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(
            &(any::<prop::sample::Index>(), "[A-Za-z0-9_.-]"),
            |(pos, c)| {
                let token = s.signer.sign().expect("sign");
                let mut bytes = token.clone().into_bytes();
                let i = pos.index(bytes.len());
                let replacement = c.as_bytes()[0];
                prop_assume!(bytes[i] != replacement);
                bytes[i] = replacement;
                let altered = String::from_utf8(bytes).expect("ascii");
                // Base64url can spell the last character of the signature two ways; any other
                // change must be refused.
                if let Ok(v) = s.verifier.verify(&altered) {
                    prop_assert!(
                        i >= token.len() - 2,
                        "altered token verified at byte {i}: {v:?}"
                    );
                }
                Ok(())
            },
        )
        .expect("property holds");
}

/// A token signed with the clinic's real key but with claims chosen by the test.
fn forged(s: &Setup, iat: u64, exp: u64) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let pem = std::fs::read(s._dir.path().join("clinic-p.key")).expect("key");
    let key = EncodingKey::from_rsa_pem(&pem).expect("pem");
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("clinic-p-1".into());
    let claims = serde_json::json!({"iss": "clinic-p", "sub": "clinic-p", "aud": "gw-local",
        "iat": iat, "nbf": iat.min(tether::security::unix_now()), "exp": exp,
        "jti": format!("{:x}", rand::random::<u64>())});
    jsonwebtoken::encode(&h, &claims, &key).expect("sign")
}

#[test]
fn the_lifetime_cap_holds_against_the_gateways_clock_not_the_tokens_iat() {
    use tether::security::jwt::AuthError;
    let s = setup();
    let now = tether::security::unix_now();
    let ten_years = now + 10 * 365 * 86_400;
    // `iat` a minute before a far `exp`: exp - iat looks short, exp - now is ten years.
    let e = s
        .verifier
        .verify(&forged(&s, ten_years - 60, ten_years))
        .expect_err("iat in the future must not stretch the lifetime");
    assert!(matches!(e, AuthError::IssuedInFuture(_)), "{e:?}");
    // An honest iat with an exp beyond the cap.
    let e = s
        .verifier
        .verify(&forged(&s, now, now + 3_600))
        .expect_err("an hour-long token");
    assert!(matches!(e, AuthError::TooLong(_)), "{e:?}");
    // iat slightly ahead (a clinic clock within the leeway) is fine, and so is the maximum.
    let v = s
        .verifier
        .verify(&forged(&s, now + 10, now + 300))
        .expect("within the leeway");
    assert!(v.close_at <= now + 300 + 2, "{v:?}");
    // The session ends at the earlier of expiry and the cap counted on this clock.
    let v = s
        .verifier
        .verify(&forged(&s, now, now + 320))
        .expect("within cap + leeway");
    assert!(
        v.close_at <= tether::security::unix_now() + 300,
        "session must close at the cap: {v:?}"
    );
}
