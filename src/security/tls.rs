//! TLS with openssl: the gateway's acceptor (TLS 1.2+, Mozilla "intermediate" ciphers, client
//! certificates verified against the client CA when one is set) and the agent's connector (CA file or system
//! roots, hostname verification, client certificate, ALPN `http/1.1` for the WebSocket upgrade).

use std::path::{Path, PathBuf};

use openssl::pkcs12::Pkcs12;
use openssl::ssl::{
    SslAcceptor, SslAcceptorBuilder, SslConnector, SslFiletype, SslMethod, SslMode, SslVerifyMode,
    SslVersion,
};
use openssl::x509::X509;

#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct TlsError {
    pub what: &'static str,
    pub path: String,
    pub message: String,
}

fn err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(openssl::error::ErrorStack) -> TlsError + 'a {
    move |e| TlsError {
        what,
        path: path.display().to_string(),
        message: explain(path, &e),
    }
}

/// An OpenSSL error stack in an operator's words: the file's own state first (missing,
/// unreadable, empty), then the commonest reasons, else OpenSSL's first reason alone — never
/// the whole `error:0A080002:SSL routines::…` chain.
pub fn explain(path: &Path, e: &openssl::error::ErrorStack) -> String {
    if path != Path::new("-") {
        match std::fs::metadata(path) {
            Err(io) if io.kind() == std::io::ErrorKind::NotFound => return "no such file".into(),
            Err(io) => return format!("cannot be read: {io}"),
            Ok(m) if m.is_dir() => return "a directory, not a file".into(),
            Ok(m) if m.len() == 0 => return "the file is empty".into(),
            Ok(_) => {}
        }
        if let Err(io) = std::fs::File::open(path) {
            return format!("cannot be read: {io}");
        }
    }
    let reasons: Vec<String> = e
        .errors()
        .iter()
        .filter_map(|x| x.reason().map(str::to_string))
        .collect();
    let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
    if has("no start line") || has("bad base64") || (has("unsupported") && has("decoder")) {
        "not a PEM file of the expected kind (no `-----BEGIN …-----` block it can use)".into()
    } else if has("key values mismatch") {
        "the key does not belong to the certificate".into()
    } else if has("bad decrypt") || has("mac verify failure") {
        "wrong password, or the file is damaged".into()
    } else if has("ca md too weak") || has("ee key too small") {
        "the certificate's key or signature is too weak for this OpenSSL's security level".into()
    } else if let Some(first) = reasons.first() {
        first.clone()
    } else {
        e.to_string()
    }
}

/// The gateway side.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a client CA, every client must present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

pub fn acceptor(cfg: &ServerTls) -> Result<SslAcceptorBuilder, TlsError> {
    let none = Path::new("-");
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(err("TLS set-up", none))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(err("TLS set-up", none))?;
    // Idle agents are the common case: give their TLS record buffers back between messages
    // (about 34 KB per idle connection).
    b.set_mode(SslMode::RELEASE_BUFFERS);
    b.set_certificate_chain_file(&cfg.cert)
        .map_err(err("gateway.tls.cert", &cfg.cert))?;
    b.set_private_key_file(&cfg.key, SslFiletype::PEM)
        .map_err(err("gateway.tls.key", &cfg.key))?;
    b.check_private_key()
        .map_err(err("gateway.tls.key does not match cert", &cfg.key))?;
    if let Some(ca) = &cfg.client_ca {
        // A presented certificate must chain to the client CA (else the handshake fails);
        // the WebSocket upgrade then refuses a connection that presented none, so REST
        // clients can still use bearer tokens on the same port.
        b.set_ca_file(ca)
            .map_err(err("gateway.tls.client_ca", ca))?;
        b.set_verify(SslVerifyMode::PEER);
    }
    // Browsers and HTTP clients resume sessions on new connections; with client certificates
    // requested, OpenSSL refuses a resumption (fatal internal error alert) unless sessions are
    // bound to a context. A resumed session keeps the certificate it was made with.
    b.set_session_id_context(b"tether-gateway")
        .map_err(err("TLS set-up", none))?;
    Ok(b)
}

/// The agent side.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Trust anchors for the gateway's certificate; the system roots when absent.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Alternative to cert + key: a PKCS#12 bundle and its password.
    pub pkcs12: Option<PathBuf>,
    pub pkcs12_password: Option<String>,
    /// Highest protocol version to offer (tests use it to play an old client).
    pub max_version: Option<SslVersion>,
    pub min_version: Option<SslVersion>,
    /// OpenSSL cipher string override (tests use `DEFAULT:@SECLEVEL=0` to play a legacy
    /// client that really offers TLS 1.0/1.1).
    pub cipher_list: Option<String>,
}

pub fn connector(cfg: &ClientTls) -> Result<SslConnector, TlsError> {
    let none = Path::new("-");
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(err("TLS set-up", none))?;
    b.set_min_proto_version(Some(cfg.min_version.unwrap_or(SslVersion::TLS1_2)))
        .map_err(err("TLS set-up", none))?;
    if let Some(v) = cfg.max_version {
        b.set_max_proto_version(Some(v))
            .map_err(err("TLS set-up", none))?;
    }
    if let Some(c) = &cfg.cipher_list {
        b.set_cipher_list(c).map_err(err("TLS set-up", none))?;
    }
    // awc speaks HTTP/1.1 for the WebSocket upgrade: never negotiate h2.
    b.set_alpn_protos(b"\x08http/1.1")
        .map_err(err("TLS set-up", none))?;
    if let Some(ca) = &cfg.ca {
        b.set_ca_file(ca).map_err(err("agent.gateway.tls.ca", ca))?;
    }
    if let Some(p12) = &cfg.pkcs12 {
        let der = std::fs::read(p12).map_err(|e| TlsError {
            what: "agent.gateway.tls.pkcs12",
            path: p12.display().to_string(),
            message: e.to_string(),
        })?;
        let parsed = Pkcs12::from_der(&der)
            .and_then(|p| p.parse2(cfg.pkcs12_password.as_deref().unwrap_or("")))
            .map_err(err("agent.gateway.tls.pkcs12", p12))?;
        if let (Some(cert), Some(key)) = (parsed.cert, parsed.pkey) {
            b.set_certificate(&cert)
                .map_err(err("agent.gateway.tls.pkcs12", p12))?;
            b.set_private_key(&key)
                .map_err(err("agent.gateway.tls.pkcs12", p12))?;
        }
        for extra in parsed.ca.into_iter().flatten() {
            b.add_extra_chain_cert(extra)
                .map_err(err("agent.gateway.tls.pkcs12", p12))?;
        }
    } else {
        if let Some(cert) = &cfg.cert {
            b.set_certificate_chain_file(cert)
                .map_err(err("agent.gateway.tls.cert", cert))?;
        }
        if let Some(key) = &cfg.key {
            b.set_private_key_file(key, SslFiletype::PEM)
                .map_err(err("agent.gateway.tls.key", key))?;
        }
    }
    Ok(b.build())
}

/// The identities a certificate names: its subject CN and its DNS/URI/email SANs.
pub fn cert_identities(cert: &X509) -> Vec<String> {
    let mut out = Vec::new();
    for e in cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
    {
        if let Ok(s) = e.data().to_string() {
            out.push(s);
        }
    }
    if let Some(sans) = cert.subject_alt_names() {
        for n in sans.iter() {
            if let Some(d) = n.dnsname() {
                out.push(d.to_string());
            } else if let Some(u) = n.uri() {
                out.push(u.to_string());
            } else if let Some(m) = n.email() {
                out.push(m.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openssl_errors_are_said_in_an_operators_words() {
        let dir = tempfile::tempdir().expect("dir");
        let tls = |cert: &Path, key: &Path| {
            acceptor(&ServerTls {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                client_ca: None,
            })
            .map(|_| ())
            .expect_err("refused")
            .to_string()
        };
        let missing = dir.path().join("gateway.pem");
        let e = tls(&missing, &missing);
        assert_eq!(
            e,
            format!("gateway.tls.cert {}: no such file", missing.display())
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"").expect("write");
        assert!(tls(&empty, &empty).ends_with("the file is empty"));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, b"hello, not a certificate\n").expect("write");
        let e = tls(&junk, &junk);
        assert!(e.contains("not a PEM file"), "{e}");
        assert!(!e.contains("error:"), "{e}");
    }
}
