//! The attack matrix: every case is a real TLS handshake and WebSocket upgrade against a real
//! gateway on 127.0.0.1:0 with generated keys and certificates.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_codec::Framed;
use awc::error::WsClientError;
use awc::ws::{self, Frame};
use awc::BoxedSocket;
use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use openssl::ssl::SslVersion;
use serde_json::{json, Value};
use tether::gateway::{self, GatewayHandle, GatewaySecurity, GatewaySettings};
use tether::security::jwt::{ClinicRegistry, TokenVerifier};
use tether::security::keys::{self, Leaf, Usage};
use tether::security::limits::SharedBucket;
use tether::security::tls::{ClientTls, ServerTls};
use tether::security::{admin, unix_now};

type Ws = Framed<BoxedSocket, ws::Codec>;

const AUD: &str = "gw-test";

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// CA, gateway, clinics a and b, a clinic signed by a foreign CA, an expired clinic
    /// certificate, and a certificate for "clinic-x" (whose key signs tokens for clinic-a).
    fn new(dir: &Path) -> Pki {
        let bits = 2048;
        let ca = keys::make_ca("Test CA", 30, bits).expect("ca");
        keys::save(&ca, dir, "ca").expect("save");
        let gw = keys::issue(
            &ca,
            &Leaf {
                dns: &["localhost"],
                ips: &["127.0.0.1"],
                days: 30,
                valid: None,
                ..Leaf::new("localhost", Usage::Server, bits)
            },
        )
        .expect("gw");
        keys::save(&gw, dir, "gateway").expect("save");
        let reg = dir.join("clinics");
        for c in ["clinic-a", "clinic-b"] {
            let cert = keys::issue(
                &ca,
                &Leaf {
                    dns: &[c],
                    days: 30,
                    ..Leaf::new(c, Usage::Client, bits)
                },
            )
            .expect("clinic");
            keys::save(&cert, dir, c).expect("save");
            let entry = keys::registry_entry(c, &format!("{c}-1"), &cert.cert).expect("entry");
            std::fs::create_dir_all(&reg).expect("dir");
            std::fs::write(reg.join(format!("{c}.yaml")), entry).expect("write");
        }
        let foreign = keys::make_ca("Foreign CA", 30, bits).expect("foreign ca");
        let f = keys::issue(
            &foreign,
            &Leaf {
                dns: &["clinic-a"],
                ips: &[],
                days: 30,
                valid: None,
                ..Leaf::new("clinic-a", Usage::Client, bits)
            },
        )
        .expect("f");
        keys::save(&f, dir, "foreign").expect("save");
        let now = unix_now() as i64;
        let old = keys::issue(
            &ca,
            &Leaf {
                dns: &["clinic-a"],
                ips: &[],
                days: 1,
                valid: Some((now - 864_000, now - 86_400)),
                ..Leaf::new("clinic-a", Usage::Client, bits)
            },
        )
        .expect("old");
        keys::save(&old, dir, "expired").expect("save");
        // clinic-x's certificate carries clinic-a's key so its tokens verify; only the
        // certificate identity differs.
        let a = keys::load(dir, "clinic-a").expect("a");
        let x = issue_with_key(&ca, "clinic-x", &a.key);
        std::fs::write(dir.join("clinic-x.pem"), x.to_pem().expect("pem")).expect("write");
        std::fs::copy(dir.join("clinic-a.key"), dir.join("clinic-x.key")).expect("copy");
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn client(&self, who: &str) -> ClientTls {
        ClientTls {
            ca: Some(self.path("ca.pem")),
            cert: Some(self.path(&format!("{who}.pem"))),
            key: Some(self.path(&format!("{who}.key"))),
            ..Default::default()
        }
    }

    fn key(&self, clinic: &str) -> EncodingKey {
        EncodingKey::from_rsa_pem(&std::fs::read(self.path(&format!("{clinic}.key"))).expect("key"))
            .expect("pem")
    }
}

fn issue_with_key(
    ca: &keys::Issued,
    cn: &str,
    key: &openssl::pkey::PKey<openssl::pkey::Private>,
) -> openssl::x509::X509 {
    use openssl::x509::extension::{ExtendedKeyUsage, SubjectAlternativeName};
    let mut name = openssl::x509::X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", cn).expect("cn");
    let name = name.build();
    let mut b = openssl::x509::X509::builder().expect("builder");
    b.set_version(2).expect("v");
    let sn = openssl::bn::BigNum::from_u32(4242)
        .and_then(|n| n.to_asn1_integer())
        .expect("sn");
    b.set_serial_number(&sn).expect("sn");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(ca.cert.subject_name()).expect("issuer");
    b.set_pubkey(key).expect("key");
    let nb = openssl::asn1::Asn1Time::days_from_now(0).expect("t");
    let na = openssl::asn1::Asn1Time::days_from_now(30).expect("t");
    b.set_not_before(&nb).expect("nb");
    b.set_not_after(&na).expect("na");
    b.append_extension(ExtendedKeyUsage::new().client_auth().build().expect("eku"))
        .expect("eku");
    let san = SubjectAlternativeName::new()
        .dns(cn)
        .build(&b.x509v3_context(Some(&ca.cert), None))
        .expect("san");
    b.append_extension(san).expect("san");
    b.sign(&ca.key, openssl::hash::MessageDigest::sha256())
        .expect("sign");
    b.build()
}

fn settings(dir: &Path) -> GatewaySettings {
    GatewaySettings {
        node_id: None,
        advertise: None,
        listen: "127.0.0.1:0".into(),
        store: tether::gateway::store::StoreLocation::Sqlite(dir.join("gateway.db")),
        retention: None,
        heartbeat_interval: Duration::from_secs(5),
        max_frame_bytes: 64 * 1024,
        entity_schemas: None,
        update_window: 8,
        group_commit_max_events: 1000,
        workers: 1,
        shutdown_timeout: Duration::from_millis(200),
        faults: Default::default(),
        webhooks: Vec::new(),
        bridge: Default::default(),
        channels: Vec::new(),
    }
}

fn security(pki: &Pki, leeway: Duration) -> GatewaySecurity {
    let token = "tta_test";
    GatewaySecurity {
        tls: Some(ServerTls {
            cert: pki.path("gateway.pem"),
            key: pki.path("gateway.key"),
            client_ca: Some(pki.path("ca.pem")),
        }),
        verifier: Some(TokenVerifier::new(
            AUD,
            leeway,
            ClinicRegistry::load_dir(&pki.path("clinics")).expect("registry"),
        )),
        registry_source: Some(tether::gateway::clinic_registry::RegistrySource {
            dir: pki.path("clinics"),
            interval: Duration::from_millis(100),
            store: false,
        }),
        admin: Some(
            admin::AdminTokens::new(&[
                admin::AdminTokenConfig {
                    name: "rw".into(),
                    sha256: admin::sha256_hex(token),
                    scopes: vec![admin::Scope::Read, admin::Scope::Write],
                },
                admin::AdminTokenConfig {
                    name: "ro".into(),
                    sha256: admin::sha256_hex("tta_readonly"),
                    scopes: vec![admin::Scope::Read],
                },
            ])
            .expect("admin"),
        ),
        ..GatewaySecurity::insecure()
    }
}

fn start(pki: &Pki, dir: &Path) -> GatewayHandle {
    gateway::start(settings(dir), security(pki, Duration::from_secs(30))).expect("gateway")
}

fn claims(clinic: &str) -> Value {
    let now = unix_now();
    json!({"iss": clinic, "sub": clinic, "aud": AUD, "iat": now, "nbf": now, "exp": now + 120,
           "jti": format!("{:x}", rand::random::<u64>())})
}

fn sign(pki: &Pki, signer: &str, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, &pki.key(signer)).expect("sign")
}

fn good_token(pki: &Pki, clinic: &str) -> String {
    sign(pki, clinic, &format!("{clinic}-1"), &claims(clinic))
}

fn b64url(bytes: &[u8]) -> String {
    openssl::base64::encode_block(bytes)
        .replace('+', "-")
        .replace('/', "_")
        .trim_end_matches('=')
        .to_string()
}

enum Outcome {
    Open(Ws),
    Status(u16),
    Refused(String),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Open(_) => write!(f, "Open"),
            Outcome::Status(s) => write!(f, "Status({s})"),
            Outcome::Refused(e) => write!(f, "Refused({e})"),
        }
    }
}

async fn dial(
    gw: &GatewayHandle,
    tls: &ClientTls,
    token: Option<&str>,
    url: Option<String>,
) -> Outcome {
    let conn = tether::security::tls::connector(tls).expect("connector");
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .connector(
            awc::Connector::new()
                .openssl(conn)
                .timeout(Duration::from_secs(30)),
        )
        .finish();
    let mut req = client.ws(url.unwrap_or_else(|| gw.ws_url()));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    match req.connect().await {
        Ok((_, framed)) => Outcome::Open(framed),
        Err(WsClientError::InvalidResponseStatus(s)) => Outcome::Status(s.as_u16()),
        Err(e) => Outcome::Refused(e.to_string()),
    }
}

async fn status_of(gw: &GatewayHandle, tls: &ClientTls, token: Option<&str>) -> u16 {
    match dial(gw, tls, token, None).await {
        Outcome::Open(_) => 101,
        Outcome::Status(s) => s,
        Outcome::Refused(e) => panic!("expected an HTTP answer, the connection failed: {e}"),
    }
}

async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("frame within 5 s")?;
        match item.ok()? {
            Frame::Text(t) => return serde_json::from_slice(&t).ok(),
            Frame::Close(_) => return None,
            _ => {}
        }
    }
}

async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(8), ws.next())
            .await
            .expect("close within 8 s")?;
        if let Ok(Frame::Close(r)) = item {
            return r.map(|r| u16::from(r.code));
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(ws::Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

fn hello(clinic: &str) -> Value {
    json!({"v": 1, "type": "hello", "clinic_id": clinic, "agent_version": "t", "last_acked_seq": 0})
}

#[actix_rt::test]
async fn forged_and_invalid_tokens_are_refused_before_the_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let pki = Pki::new(dir.path());
    let gw = start(&pki, dir.path());
    let a = pki.client("clinic-a");
    let now = unix_now();

    assert_eq!(
        status_of(&gw, &a, Some(&good_token(&pki, "clinic-a"))).await,
        101,
        "the baseline works"
    );

    let header = |alg: &str, kid: &str| {
        b64url(
            json!({"alg": alg, "typ": "JWT", "kid": kid})
                .to_string()
                .as_bytes(),
        )
    };
    let payload = b64url(claims("clinic-a").to_string().as_bytes());
    let none = format!("{}.{}.", header("none", "clinic-a-1"), payload);

    let public_pem = keys::load(dir.path(), "clinic-a")
        .expect("a")
        .cert
        .public_key()
        .expect("pk")
        .public_key_to_pem()
        .expect("pem");
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("clinic-a-1".into());
    let hs256 = jsonwebtoken::encode(
        &h,
        &claims("clinic-a"),
        &EncodingKey::from_secret(&public_pem),
    )
    .expect("hs256");

    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("clinic-a");
        f(&mut c);
        sign(&pki, "clinic-a", "clinic-a-1", &c)
    };
    let cases: Vec<(&str, String)> = vec![
        ("alg=none", none),
        ("HS256 keyed with the RSA public key", hs256),
        (
            "unknown kid",
            sign(&pki, "clinic-a", "nobody-1", &claims("clinic-a")),
        ),
        (
            "kid with ../",
            sign(
                &pki,
                "clinic-a",
                "../clinics/clinic-a-1",
                &claims("clinic-a"),
            ),
        ),
        (
            "kid with quotes",
            sign(&pki, "clinic-a", "clinic-a-1\"", &claims("clinic-a")),
        ),
        (
            "missing exp",
            with(&|c| {
                c.as_object_mut().map(|o| o.remove("exp"));
            }),
        ),
        (
            "expired",
            with(&|c| {
                c["exp"] = json!(now - 120);
                c["iat"] = json!(now - 200);
                c["nbf"] = json!(now - 200);
            }),
        ),
        ("nbf in the future", with(&|c| c["nbf"] = json!(now + 120))),
        (
            "missing nbf",
            with(&|c| {
                c.as_object_mut().map(|o| o.remove("nbf"));
            }),
        ),
        ("wrong aud", with(&|c| c["aud"] = json!("another-gateway"))),
        ("wrong iss", with(&|c| c["iss"] = json!("clinic-b"))),
        (
            "sub is another clinic",
            with(&|c| c["sub"] = json!("clinic-b")),
        ),
        (
            "lifetime over 5 minutes",
            with(&|c| c["exp"] = json!(now + 3600)),
        ),
        (
            "signed by clinic-b's key under clinic-a's kid",
            sign(&pki, "clinic-b", "clinic-a-1", &claims("clinic-a")),
        ),
        ("garbage", "not.a.token".to_string()),
    ];
    for (what, token) in &cases {
        assert_eq!(status_of(&gw, &a, Some(token)).await, 401, "{what}");
    }
    assert_eq!(status_of(&gw, &a, None).await, 401, "no token");

    // Replay: the same valid token twice.
    let t = good_token(&pki, "clinic-a");
    assert_eq!(status_of(&gw, &a, Some(&t)).await, 101);
    assert_eq!(status_of(&gw, &a, Some(&t)).await, 401, "replayed jti");
    // ... and at a second node sharing the store (its own memory has never seen the token),
    // or at this node after a restart: the store's replay guard refuses it.
    let t2 = good_token(&pki, "clinic-a");
    assert_eq!(status_of(&gw, &a, Some(&t2)).await, 101);
    let other = gateway::start(
        settings(dir.path()),
        security(&pki, Duration::from_secs(30)),
    )
    .expect("second node on the same store");
    assert_eq!(
        status_of(&other, &a, Some(&t2)).await,
        401,
        "a token used at one node is refused at another"
    );
    assert_eq!(
        status_of(&other, &a, Some(&good_token(&pki, "clinic-a"))).await,
        101
    );
    other.stop().await;

    // Reasons are in the audit log, not in the response.
    let audit = read_log(dir.path(), "audit");
    for needle in [
        "unknown kid nobody-1",
        "algorithm HS256 is not allowed",
        "missing field `exp`",
        "InvalidSignature",
        "kid is not a safe identifier",
        "replayed jti",
        "replayed jti (seen by the store)",
        "InvalidAudience",
        "ExpiredSignature",
        "ImmatureSignature",
        "InvalidIssuer",
        "InvalidSubject",
        "exceeds the maximum",
        "no bearer token",
    ] {
        assert!(audit.contains(needle), "audit log lacks {needle}:\n{audit}");
    }
    gw.stop().await;
}

#[actix_rt::test]
async fn mutual_tls_refuses_missing_foreign_expired_mismatched_old_and_plaintext_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let gw = start(&pki, dir.path());
    let token = || good_token(&pki, "clinic-a");

    let no_cert = ClientTls {
        ca: Some(pki.path("ca.pem")),
        ..Default::default()
    };
    assert_eq!(
        status_of(&gw, &no_cert, Some(&token())).await,
        401,
        "no client certificate"
    );

    for (what, tls) in [
        ("foreign CA", pki.client("foreign")),
        ("expired certificate", pki.client("expired")),
    ] {
        match dial(&gw, &tls, Some(&token()), None).await {
            Outcome::Refused(_) => {}
            other => panic!("{what}: expected a failed TLS handshake, got {other:?}"),
        }
    }
    // A valid certificate for clinic-x presenting clinic-a's (valid) token.
    let t = sign(&pki, "clinic-x", "clinic-a-1", &claims("clinic-a"));
    assert_eq!(
        status_of(&gw, &pki.client("clinic-x"), Some(&t)).await,
        401,
        "certificate CN differs from token sub"
    );

    for v in [SslVersion::TLS1, SslVersion::TLS1_1] {
        let old = ClientTls {
            min_version: Some(v),
            max_version: Some(v),
            // Let the client really offer the old protocol: the refusal must be the server's.
            cipher_list: Some("DEFAULT:@SECLEVEL=0".into()),
            ..pki.client("clinic-a")
        };
        match dial(&gw, &old, Some(&token()), None).await {
            Outcome::Refused(_) => {}
            other => panic!("{v:?} client: expected a failed handshake, got {other:?}"),
        }
    }
    let plain = format!("ws://{}/v1/ws", gw.addr);
    let plain_result = awc::Client::new()
        .ws(plain)
        .header("Authorization", format!("Bearer {}", token()))
        .connect()
        .await;
    assert!(
        plain_result.is_err(),
        "plaintext ws:// to the TLS port must fail"
    );
    // The agent checks the gateway's host name: a certificate for another host is refused.
    let wrong_dir = dir.path().join("wrong");
    let ca = keys::load(dir.path(), "ca").expect("ca");
    let wrong = keys::issue(
        &ca,
        &Leaf {
            dns: &["elsewhere.example"],
            ..Leaf::new("elsewhere.example", Usage::Server, 2048)
        },
    )
    .expect("wrong");
    keys::save(&wrong, &wrong_dir, "gateway").expect("save");
    let mut sec = security(&pki, Duration::from_secs(30));
    sec.tls = Some(ServerTls {
        cert: wrong_dir.join("gateway.pem"),
        key: wrong_dir.join("gateway.key"),
        client_ca: Some(pki.path("ca.pem")),
    });
    let other = gateway::start(
        GatewaySettings {
            store: tether::gateway::store::StoreLocation::Sqlite(wrong_dir.join("g.db")),
            retention: None,
            ..settings(dir.path())
        },
        sec,
    )
    .expect("gateway");
    match dial(&other, &pki.client("clinic-a"), Some(&token()), None).await {
        Outcome::Refused(_) => {}
        o => panic!("a gateway certificate for another host name must be refused: {o:?}"),
    }
    other.stop().await;
    // And the right client still gets in.
    assert_eq!(
        status_of(&gw, &pki.client("clinic-a"), Some(&token())).await,
        101
    );
    gw.stop().await;
}

/// One HTTP/1.1 request through `openssl s_client`, on a connection of its own: a client that
/// resumes TLS sessions (`-sess_in`), as browsers, .NET's and Node.js's HTTP clients do on a new
/// connection, and saves the session it gets (`-sess_out`). The answer's status and whether the
/// session was resumed, or `Err` with what the client printed when no answer came.
fn s_client(
    addr: std::net::SocketAddr,
    pki: &Pki,
    cert: Option<&str>,
    session: (&str, &Path),
    request: &str,
) -> Result<(u16, bool), String> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "localhost",
    ])
    .args(["-alpn", "http/1.1", "-verify_return_error", "-CAfile"])
    .arg(pki.path("ca.pem"))
    .arg(session.0)
    .arg(session.1);
    if let Some(who) = cert {
        cmd.arg("-cert")
            .arg(pki.path(&format!("{who}.pem")))
            .arg("-key")
            .arg(pki.path(&format!("{who}.key")));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("`openssl` (the command-line tool) runs here: `apt-get install openssl`");
    // The request is written and stdin kept open (at its end s_client would hang up before
    // the answer); the client is killed once the status line is in, or after 20 s.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(request.as_bytes()).expect("request");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut resumed = None;
    let mut status = None;
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if line.starts_with("Reused, ") {
            resumed = Some(true);
        } else if line.starts_with("New, ") {
            resumed = Some(false);
        } else if let Some(at) = line.find("HTTP/1.1 ") {
            // (The answer may share a line with the session tickets s_client prints.)
            status = line.get(at + 9..at + 12).and_then(|s| s.parse().ok());
            break;
        }
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("s_client");
    drop(stdin);
    match (status, resumed) {
        (Some(s), Some(r)) => Ok((s, r)),
        _ => Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("error"))
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Browsers and the Web API's HTTP clients resume TLS sessions on new connections. With client
/// certificates requested, OpenSSL refuses to resume without a session id context: the handshake
/// failed with an internal error alert (the dashboard's periodic fetches failed with
/// `ERR_SSL_PROTOCOL_ERROR`, one CI run never showed its channel strip). Resumption works, and a
/// resumed session keeps the identity it was made with: the clinic its certificate names, or none.
#[actix_rt::test]
async fn resumed_tls_sessions_work_and_keep_the_certificate_they_were_made_with() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let gw = start(&pki, dir.path());
    let addr = gw.addr;
    let upgrade = |token: &str| {
        format!(
            "GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
    };
    let health = "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let sessions = dir.path().join("sessions");
    std::fs::create_dir_all(&sessions).expect("dir");
    let file = move |who: &str| sessions.join(format!("{who}.pem"));
    actix_web::rt::task::spawn_blocking(move || {
        let run = |cert: Option<&str>, resume: bool, request: &str| {
            let f = file(cert.unwrap_or("none"));
            let session = if resume {
                ("-sess_in", f.as_path())
            } else {
                ("-sess_out", f.as_path())
            };
            s_client(addr, &pki, cert, session, request)
        };
        // A REST client without a certificate, resuming three times.
        assert_eq!(run(None, false, health), Ok((200, false)));
        for i in 0..3 {
            assert_eq!(run(None, true, health), Ok((200, true)), "resumed, try {i}");
        }
        // Resumed without a certificate, an upgrade is still refused.
        // (Each upgrade with a token of its own: the gateway refuses a replayed one.)
        let a = || good_token(&pki, "clinic-a");
        assert_eq!(
            run(None, true, &upgrade(&a())),
            Ok((401, true)),
            "an upgrade on a resumed session without a certificate"
        );
        // A clinic's resumed session is still that clinic's.
        assert_eq!(
            run(Some("clinic-a"), false, &upgrade(&a())),
            Ok((101, false))
        );
        assert_eq!(
            run(Some("clinic-a"), true, &upgrade(&a())),
            Ok((101, true)),
            "clinic-a's resumed session"
        );
        // clinic-x's session does not become clinic-a's by being resumed.
        assert_eq!(run(Some("clinic-x"), false, health), Ok((200, false)));
        assert_eq!(
            run(
                Some("clinic-x"),
                true,
                &upgrade(&sign(&pki, "clinic-x", "clinic-a-1", &claims("clinic-a")))
            ),
            Ok((401, true)),
            "clinic-x's resumed session with clinic-a's token"
        );
    })
    .await
    .expect("requests");
    gw.stop().await;
}

#[actix_rt::test]
async fn a_clinic_can_neither_write_nor_read_another_clinics_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let gw = start(&pki, dir.path());
    let base = gw.http_url();
    let rest = |req: awc::ClientRequest| {
        req.insert_header(("Authorization", "Bearer tta_test"))
            .timeout(Duration::from_secs(5))
    };
    let conn = tether::security::tls::connector(&ClientTls {
        ca: Some(pki.path("ca.pem")),
        ..Default::default()
    })
    .expect("tls");
    let http = awc::Client::builder()
        .connector(awc::Connector::new().openssl(conn))
        .finish();

    // clinic-b, properly authenticated, claims to be clinic-a in hello.
    let Outcome::Open(mut ws) = dial(
        &gw,
        &pki.client("clinic-b"),
        Some(&good_token(&pki, "clinic-b")),
        None,
    )
    .await
    else {
        panic!("clinic-b must connect")
    };
    send(&mut ws, hello("clinic-a")).await;
    let e = next_json(&mut ws).await.expect("error");
    assert_eq!(e["code"], "clinic_mismatch");
    assert_eq!(close_code(&mut ws).await, Some(1008));

    // Updates for a are queued first; b, connected as itself, receives only its own.
    for (clinic, id) in [("clinic-a", 1), ("clinic-b", 2)] {
        let body = json!({"entity": "patient", "op": "upsert", "key": {"id": id}, "row": {"id": id, "name": "n"}});
        let resp = rest(http.post(format!("{base}/v1/clinics/{clinic}/updates")))
            .send_json(&body)
            .await
            .expect("post");
        assert_eq!(resp.status().as_u16(), 202);
    }
    let Outcome::Open(mut ws) = dial(
        &gw,
        &pki.client("clinic-b"),
        Some(&good_token(&pki, "clinic-b")),
        None,
    )
    .await
    else {
        panic!("clinic-b must connect")
    };
    send(&mut ws, hello("clinic-b")).await;
    assert_eq!(
        next_json(&mut ws).await.expect("welcome")["type"],
        "welcome"
    );
    let u = next_json(&mut ws).await.expect("update");
    assert_eq!(u["type"], "update");
    assert_eq!(u["key"]["id"], 2, "b receives b's update, never a's: {u}");
    // b sends events: they are stored as b's, and a has nothing.
    send(&mut ws, json!({"v": 1, "type": "events", "prev_seq": 0, "events": [
        {"seq": 1, "entity": "patient", "op": "insert", "key": {"id": 9}, "row": {"id": 9}, "committed_at": "t"}]})).await;
    assert_eq!(next_json(&mut ws).await.expect("ack")["type"], "ack");
    assert!(
        tether::gateway::store::wait(gw.store.events_page(Some("clinic-a"), 0, 10))
            .expect("page")
            .is_empty()
    );
    assert_eq!(
        tether::gateway::store::wait(gw.store.events_page(Some("clinic-b"), 0, 10))
            .expect("page")
            .len(),
        1
    );
    gw.stop().await;
}

#[actix_rt::test]
async fn rest_api_requires_admin_tokens_with_the_right_scope() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let pki = Pki::new(dir.path());
    let gw = start(&pki, dir.path());
    let base = gw.http_url();
    let conn = tether::security::tls::connector(&ClientTls {
        ca: Some(pki.path("ca.pem")),
        ..Default::default()
    })
    .expect("tls");
    let http = awc::Client::builder()
        .connector(awc::Connector::new().openssl(conn))
        .finish();
    let body = json!({"entity": "patient", "op": "delete", "key": {"id": 1}});
    let status = |r: Result<awc::ClientResponse<_>, _>| {
        r.map(|r: awc::ClientResponse<_>| r.status().as_u16())
            .expect("response")
    };
    assert_eq!(
        status(http.get(format!("{base}/v1/clinics")).send().await),
        401
    );
    assert_eq!(
        status(
            http.get(format!("{base}/v1/clinics"))
                .insert_header(("Authorization", "Bearer wrong"))
                .send()
                .await
        ),
        401
    );
    assert_eq!(
        status(
            http.get(format!("{base}/v1/clinics"))
                .insert_header(("Authorization", "Bearer tta_readonly"))
                .send()
                .await
        ),
        200
    );
    assert_eq!(
        status(
            http.post(format!("{base}/v1/clinics/c1/updates"))
                .insert_header(("Authorization", "Bearer tta_readonly"))
                .send_json(&body)
                .await
        ),
        403
    );
    assert_eq!(
        status(
            http.post(format!("{base}/v1/clinics/clinic-a/updates"))
                .insert_header(("Authorization", "Bearer tta_test"))
                .send_json(&body)
                .await
        ),
        202
    );
    assert_eq!(
        status(
            http.post(format!("{base}/v1/clinics/c1/updates"))
                .insert_header(("Authorization", "Bearer tta_test"))
                .send_json(&body)
                .await
        ),
        404,
        "an update for a clinic the registry does not know is refused, not queued"
    );
    assert_eq!(
        status(http.get(format!("{base}/healthz")).send().await),
        200,
        "health needs no token"
    );
    let audit = read_log(dir.path(), "audit");
    assert!(
        audit.contains("actor=rw")
            && audit.contains("action=\"POST /v1/clinics/clinic-a/updates\" result=202"),
        "{audit}"
    );
    assert!(audit.contains("result=denied"), "{audit}");
    assert!(!audit.contains("tta_test"), "tokens never reach the log");
    gw.stop().await;
}

#[actix_rt::test]
async fn expired_token_closes_the_live_socket_with_1008() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let gw = gateway::start(settings(dir.path()), security(&pki, Duration::ZERO)).expect("gateway");
    let now = unix_now();
    let mut c = claims("clinic-a");
    c["exp"] = json!(now + 2);
    let t = sign(&pki, "clinic-a", "clinic-a-1", &c);
    let Outcome::Open(mut ws) = dial(&gw, &pki.client("clinic-a"), Some(&t), None).await else {
        panic!("must connect")
    };
    send(&mut ws, hello("clinic-a")).await;
    assert_eq!(
        next_json(&mut ws).await.expect("welcome")["type"],
        "welcome"
    );
    assert_eq!(close_code(&mut ws).await, Some(1008));
    gw.stop().await;
}

#[actix_rt::test]
async fn floods_are_rate_limited_browsers_need_an_allowed_origin_and_storms_are_admitted_gradually()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let sec = GatewaySecurity {
        message_rate: (50.0, 100.0),
        admission: SharedBucket::new(5.0, 4.0),
        ..security(&pki, Duration::from_secs(30))
    };
    let gw = gateway::start(settings(dir.path()), sec).expect("gateway");
    let Outcome::Open(mut ws) = dial(
        &gw,
        &pki.client("clinic-a"),
        Some(&good_token(&pki, "clinic-a")),
        None,
    )
    .await
    else {
        panic!("must connect")
    };
    send(&mut ws, hello("clinic-a")).await;
    next_json(&mut ws).await.expect("welcome");
    let rss_before = tether::loadgen::rss_kb();
    let frame = json!({"v": 1, "type": "ack", "seq": 1, "pad": "x".repeat(30_000)}).to_string();
    let mut closed = None;
    for _ in 0..2000 {
        if ws
            .send(ws::Message::Text(frame.clone().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    while let Ok(Some(Ok(f))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Frame::Close(r) = f {
            closed = r.map(|r| u16::from(r.code));
            break;
        }
    }
    assert_eq!(closed, Some(1013), "flood closed with try-again-later");
    let grown_mb = tether::loadgen::rss_kb().saturating_sub(rss_before) / 1024;
    assert!(
        grown_mb < 64,
        "memory stayed bounded under a 60 MB flood: +{grown_mb} MB"
    );

    // A browser page on a foreign origin cannot open a clinic socket.
    let conn = tether::security::tls::connector(&pki.client("clinic-a")).expect("tls");
    let client = awc::Client::builder()
        .connector(awc::Connector::new().openssl(conn))
        .finish();
    let r = client
        .ws(gw.ws_url())
        .origin("https://evil.example")
        .header(
            "Authorization",
            format!("Bearer {}", good_token(&pki, "clinic-a")),
        )
        .connect()
        .await;
    let code = match r {
        Err(WsClientError::InvalidResponseStatus(s)) => s.as_u16(),
        Err(e) => panic!("{e}"),
        Ok(_) => 101,
    };
    assert_eq!(code, 403, "foreign origin refused");

    // A storm of upgrades: some are turned away with 503 rather than all accepted at once.
    // All at once, so the burst is exceeded whatever the machine's speed.
    let client = pki.client("clinic-a");
    let tokens: Vec<String> = (0..30).map(|_| good_token(&pki, "clinic-a")).collect();
    // Under heavy load some handshakes may also time out at the TLS layer (0 here): they are
    // turned away too; what matters is that the limit answers 503 and admits some.
    let outcomes =
        futures_util::future::join_all(tokens.iter().map(|t| dial(&gw, &client, Some(t), None)))
            .await;
    let codes: Vec<u16> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Open(_) => 101,
            Outcome::Status(s) => *s,
            Outcome::Refused(_) => 0,
        })
        .collect();
    assert!(codes.contains(&503), "{codes:?}");
    assert!(codes.contains(&101), "{codes:?}");
    gw.stop().await;
}

#[actix_rt::test]
async fn agent_reauthenticates_before_its_token_expires_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet =
        tether::fleet::Fleet::new(dir.path(), 1, Duration::from_millis(500)).expect("fleet");
    if let Some(auth) = fleet.clinics[0].config.gateway.auth.as_mut() {
        auth.token_lifetime = tether::config::Dur::secs(3);
    }
    fleet.start_agents().await.expect("agents");
    let db = fleet.clinics[0].db.clone();
    let links = || {
        fleet.clinics[0]
            .agent
            .as_ref()
            .map(|a| tether_actors::AgentStats::get(&a.handle.stats.links_up))
            .unwrap_or(0)
    };
    wait_until(
        "three token lifetimes of sessions",
        Duration::from_secs(30),
        || {
            write_activity(&db, 5);
            let n = links();
            async move { n >= 4 }
        },
    )
    .await;
    wait_drained(&fleet, Duration::from_secs(20)).await;
    assert_history_clean(&fleet, &[]);
    let log = read_log(dir.path(), "connection");
    assert!(log.contains("event=reauthenticating"), "{log}");
    // A clean close handshake: the agent's 1000 reaches the gateway, whose answer ends the old
    // link; no socket is dropped under a live session (the gateway would log a 1002).
    assert!(log.contains("event=closed_by_agent code=1000"), "{log}");
    assert!(log.contains("event=link_retired"), "{log}");
    assert!(!log.contains("event=protocol_error"), "{log}");
    assert!(!log.contains("event=unexpected_close"), "{log}");
    assert!(
        !read_log(dir.path(), "audit").contains("event=token_expired"),
        "the agent never let a token run out"
    );
    fleet.stop().await;
}

#[actix_rt::test]
async fn marker_planted_in_every_payload_field_never_reaches_a_log() {
    const MARK: &str = "ZZMARKER7f3a";
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet =
        tether::fleet::Fleet::new(dir.path(), 2, Duration::from_millis(500)).expect("fleet");
    fleet.start_agents().await.expect("agents");
    for c in &fleet.clinics {
        let conn = tether::db::sqlite::open(&c.db).expect("open");
        for i in 0..20 {
            conn.execute(
                "INSERT INTO patients (name, national_id, dob, phone) VALUES (?1, ?1, ?1, ?1)",
                [format!("{MARK}-{i}")],
            )
            .expect("insert");
            conn.execute(
                "INSERT INTO appointments (patient_id, starts_at, status, notes) VALUES (1, ?1, 'booked', ?1)",
                [format!("{MARK}-{i}")],
            )
            .expect("insert");
            conn.execute(
                "INSERT INTO payments (patient_id, amount_cents, method) VALUES (1, 5, ?1)",
                [MARK],
            )
            .expect("insert");
        }
        conn.execute("UPDATE patients SET phone = ?1 || phone", [MARK])
            .expect("update");
        conn.execute("DELETE FROM appointments WHERE id % 2 = 0", [])
            .expect("delete");
    }
    let base = fleet.http_url();
    for (i, c) in fleet.clinics.iter().enumerate() {
        let good = json!({"entity": "patient", "op": "upsert", "key": {"id": -1 - i as i64}, "row": {"id": -1 - i as i64, "name": MARK, "phone": MARK}});
        let poison = json!({"entity": "patient", "op": "upsert", "key": {"id": 7}, "row": {"id": 7, "name": MARK, "updated_at": null}});
        for body in [good, poison] {
            let (status, _) = post_as(
                Some(&fleet),
                &format!("{base}/v1/clinics/{}/updates", c.id),
                &body,
            )
            .await;
            assert_eq!(status, 202);
        }
    }
    // A row that fails its entity schema and carries the marker.
    let store = fleet.store().expect("store");
    wait_drained(&fleet, Duration::from_secs(30)).await;
    wait_until("updates answered", Duration::from_secs(20), || {
        let _ = &store;
        let n = common::gateway_db_count(
            &dir.path().join("gateway.db"),
            "SELECT count(*) FROM updates WHERE status IN ('applied','failed')",
        );
        async move { n == 4 }
    })
    .await;
    fleet.stop().await;
    let mut scanned = 0;
    for entry in std::fs::read_dir(dir.path().join("logs")).expect("logs") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        scanned += text.lines().count();
        assert!(
            !text.contains(MARK),
            "{} contains patient data",
            path.display()
        );
    }
    assert!(
        scanned > 20,
        "the logs were really written ({scanned} lines)"
    );
}

#[actix_rt::test]
async fn undecryptable_fields_are_parked_as_ciphertext_never_dropped_or_stored_in_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let dk = dir.path().join("dk1.key");
    keys::write_data_key(&dk).expect("dk");
    let mut data = tether::security::crypto::DataKeys::default();
    data.add_file("dk1", &dk).expect("dk1");
    data.set_active("dk1").expect("active");
    let fields =
        std::collections::HashMap::from([("patient".to_string(), vec!["name".to_string()])]);
    let cipher = tether::security::crypto::FieldCipher::new(data.clone(), fields);
    let sec = GatewaySecurity {
        decrypt: Some(tether::security::crypto::FieldCipher::new(
            data,
            Default::default(),
        )),
        ..security(&pki, Duration::from_secs(30))
    };
    let gw = gateway::start(settings(dir.path()), sec).expect("gateway");
    let event = |seq: u64, name: &str| tether_schemas::Event {
        seq,
        entity: "patient".into(),
        op: tether_schemas::Op::Insert,
        key: json!({"id": seq}).as_object().cloned().unwrap_or_default(),
        row: json!({"id": seq, "name": name}).as_object().cloned(),
        committed_at: "2026-01-01T00:00:00.000Z".into(),
    };
    let mut good = event(1, "Ana Silva");
    cipher
        .encrypt_event("clinic-a", &mut good)
        .expect("encrypt");
    // Encrypted for clinic-b: its tag will not check out for clinic-a.
    let mut moved = event(2, "Ben Okafor");
    cipher
        .encrypt_event("clinic-b", &mut moved)
        .expect("encrypt");
    let mut unknown = event(3, "x");
    unknown.row.as_mut().expect("row").insert(
        "name".into(),
        json!("enc:v1:dk9:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    );
    let Outcome::Open(mut ws) = dial(
        &gw,
        &pki.client("clinic-a"),
        Some(&good_token(&pki, "clinic-a")),
        None,
    )
    .await
    else {
        panic!("must connect")
    };
    send(&mut ws, hello("clinic-a")).await;
    next_json(&mut ws).await.expect("welcome");
    let frame = tether_schemas::Message::Events(tether_schemas::Events {
        prev_seq: 0,
        events: vec![good, moved, unknown],
        head_seq: None,
        restarts: None,
        next_committed_at: None,
    })
    .encode();
    ws.send(ws::Message::Text(frame.into()))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut ws).await.expect("ack")["seq"],
        3,
        "all three acknowledged"
    );
    let page =
        tether::gateway::store::wait(gw.store.events_page(Some("clinic-a"), 0, 10)).expect("page");
    assert_eq!(page.len(), 3);
    assert_eq!(page[0].row.as_ref().expect("row")["name"], "Ana Silva");
    assert!(page[0].problem.is_none());
    for (e, needle) in [(&page[1], "tag"), (&page[2], "dk9")] {
        let problem = e.problem.as_deref().expect("parked");
        assert!(
            problem.contains("decryption failed") && problem.contains(needle),
            "{problem}"
        );
        let name = e.row.as_ref().expect("row")["name"]
            .as_str()
            .expect("str")
            .to_string();
        assert!(name.starts_with("enc:v1:"), "kept as ciphertext: {name}");
    }
    gw.stop().await;
}

/// An HTTPS client for the REST API (trusts the test CA).
fn rest_client(pki: &Pki) -> awc::Client {
    let conn = tether::security::tls::connector(&ClientTls {
        ca: Some(pki.path("ca.pem")),
        ..Default::default()
    })
    .expect("tls");
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .connector(awc::Connector::new().openssl(conn))
        .finish()
}

async fn rest(http: &awc::Client, method: &str, url: String, body: Option<Value>) -> (u16, Value) {
    let req = http
        .request(method.parse().expect("method"), url)
        .insert_header(("Authorization", "Bearer tta_test"));
    let mut resp = match body {
        Some(b) => req.send_json(&b).await,
        None => req.send().await,
    }
    .expect("response");
    let bytes = resp.body().await.expect("body");
    (
        resp.status().as_u16(),
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The public key of a clinic's certificate, as a registry entry holds it.
fn public_key_of(pki: &Pki, clinic: &str) -> String {
    let pem = std::fs::read(pki.path(&format!("{clinic}.pem"))).expect("cert");
    let cert = openssl::x509::X509::from_pem(&pem).expect("pem");
    String::from_utf8(
        cert.public_key()
            .and_then(|k| k.public_key_to_pem())
            .expect("public key"),
    )
    .expect("utf8")
}

/// The upgrade's status for `clinic` with its own certificate and a fresh token.
async fn clinic_status(gw: &GatewayHandle, pki: &Pki, clinic: &str) -> u16 {
    status_of(gw, &pki.client(clinic), Some(&good_token(pki, clinic))).await
}

/// Upgrades with a fresh token until one is answered with `want` (fails after `limit`); the
/// time it took.
async fn until_status(
    gw: &GatewayHandle,
    pki: &Pki,
    clinic: &str,
    want: u16,
    limit: Duration,
) -> Duration {
    let t0 = std::time::Instant::now();
    wait_until(
        &format!("{clinic} to be answered {want}"),
        limit,
        || async move { clinic_status(gw, pki, clinic).await == want },
    )
    .await;
    t0.elapsed()
}

async fn open_session(gw: &GatewayHandle, pki: &Pki, clinic: &str) -> Ws {
    let Outcome::Open(mut ws) = dial(
        gw,
        &pki.client(clinic),
        Some(&good_token(pki, clinic)),
        None,
    )
    .await
    else {
        panic!("{clinic} must connect")
    };
    send(&mut ws, hello(clinic)).await;
    assert_eq!(
        next_json(&mut ws).await.expect("welcome")["type"],
        "welcome"
    );
    ws
}

/// The clinic registry changes without a restart: an entry added to `clinics_dir` lets its
/// clinic connect within seconds; a file that does not parse changes nothing (the registry in
/// force stays, sessions stay up); revoking a key through REST closes its live session with
/// 1008 and refuses the next handshake; deleting a clinic closes its session, removes it from
/// the listing, and its cloud updates are refused with 404. Every change is an audit line.
#[actix_rt::test]
async fn the_registry_reloads_live_new_clinics_connect_and_revoked_keys_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let pki = Pki::new(dir.path());
    let parked = dir.path().join("clinic-b.entry");
    std::fs::rename(pki.path("clinics/clinic-b.yaml"), &parked).expect("park clinic-b");
    let gw = start(&pki, dir.path());
    let (base, http) = (gw.http_url(), rest_client(&pki));
    assert_eq!(
        clinic_status(&gw, &pki, "clinic-b").await,
        401,
        "not in the registry yet"
    );
    // Enrol: the entry appears in the directory.
    std::fs::copy(&parked, pki.path("clinics/clinic-b.yaml")).expect("enrol clinic-b");
    let took = until_status(&gw, &pki, "clinic-b", 101, Duration::from_secs(10)).await;
    eprintln!("clinic-b accepted {took:?} after its entry was written");
    let mut b = open_session(&gw, &pki, "clinic-b").await;
    let mut a = open_session(&gw, &pki, "clinic-a").await;
    // A file that does not parse: refused, the registry in force stays.
    std::fs::write(pki.path("clinics/broken.yaml"), "clinic_id: [not, an, id\n").expect("write");
    let metrics = || async {
        let mut r = http
            .get(format!("{base}/metrics"))
            .insert_header(("Authorization", "Bearer tta_test"))
            .send()
            .await
            .expect("metrics");
        String::from_utf8(r.body().await.expect("body").to_vec()).expect("utf8")
    };
    wait_until(
        "the bad file to be reported",
        Duration::from_secs(10),
        || {
            let m = metrics();
            async move {
                m.await
                    .contains("tether_gateway_registry_reload_failures_total 1")
            }
        },
    )
    .await;
    assert_eq!(
        clinic_status(&gw, &pki, "clinic-b").await,
        101,
        "the registry in force stays"
    );
    let errors = read_log(dir.path(), "error");
    assert!(
        errors.contains("event=registry_reload_refused") && errors.contains("broken.yaml"),
        "the refusal names the file: {errors}"
    );
    std::fs::remove_file(pki.path("clinics/broken.yaml")).expect("remove");
    // Revoke clinic-b's key through REST: its live session closes with 1008.
    let (code, v) = rest(
        &http,
        "PUT",
        format!("{base}/v1/registry/clinics/clinic-b"),
        Some(json!({"keys": [{"kid": "clinic-b-1", "public_key": public_key_of(&pki, "clinic-b"), "revoked": true}]})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(close_code(&mut b).await, Some(1008));
    assert_eq!(
        clinic_status(&gw, &pki, "clinic-b").await,
        401,
        "a revoked key is refused"
    );
    let (code, v) = rest(&http, "GET", format!("{base}/v1/registry/clinics"), None).await;
    assert_eq!(code, 200);
    let listed: Vec<(String, String)> = v["clinics"]
        .as_array()
        .expect("clinics")
        .iter()
        .map(|c| {
            (
                c["clinic_id"].as_str().unwrap_or("").to_string(),
                c["keys"][0]["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("clinic-a".to_string(), "active".to_string()),
            ("clinic-b".to_string(), "revoked".to_string())
        ],
        "{v}"
    );
    assert!(
        !v.to_string().contains("BEGIN PUBLIC KEY"),
        "keys are not listed: {v}"
    );
    // A kid of another clinic is refused, naming the field; nothing is written.
    let (code, v) = rest(
        &http,
        "PUT",
        format!("{base}/v1/registry/clinics/clinic-c"),
        Some(
            json!({"keys": [{"kid": "clinic-a-1", "public_key": public_key_of(&pki, "clinic-b")}]}),
        ),
    )
    .await;
    assert_eq!((code, v["field"].as_str()), (422, Some("keys.kid")), "{v}");
    assert!(!pki.path("clinics/clinic-c.yaml").exists());
    // Delete clinic-a: its session closes, its updates are refused.
    let (code, _) = rest(
        &http,
        "DELETE",
        format!("{base}/v1/registry/clinics/clinic-a"),
        None,
    )
    .await;
    assert_eq!(code, 204);
    assert_eq!(close_code(&mut a).await, Some(1008));
    let (code, v) = rest(
        &http,
        "POST",
        format!("{base}/v1/clinics/clinic-a/updates"),
        Some(json!({"entity": "patient", "op": "delete", "key": {"id": 1}})),
    )
    .await;
    assert_eq!((code, v["field"].as_str()), (404, Some("id")), "{v}");
    let (code, _) = rest(
        &http,
        "DELETE",
        format!("{base}/v1/registry/clinics/clinic-a"),
        None,
    )
    .await;
    assert_eq!(code, 404);
    let audit = read_log(dir.path(), "audit");
    for needle in [
        "event=registry_reloaded trigger=poll",
        "clinics_added=\"clinic-b\"",
        "keys_withdrawn=\"clinic-b/clinic-b-1\"",
        "keys_withdrawn=\"clinic-a/clinic-a-1\"",
        "event=session_revoked kid=clinic-b-1",
        "action=\"PUT /v1/registry/clinics/clinic-b\" result=200",
    ] {
        assert!(audit.contains(needle), "audit lacks {needle}: {audit}");
    }
    gw.stop().await;
}
