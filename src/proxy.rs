//! HTTP CONNECT proxies for the agent's link: which proxy applies (`agent.gateway.proxy`, else
//! `HTTPS_PROXY` / `HTTP_PROXY` with `NO_PROXY`), and an awc TCP connector that opens the tunnel.
//! TLS to the gateway then runs inside the tunnel, end to end; the proxy sees only the host name.
//! Errors name the hop that failed: proxy unreachable, proxy refused (its status line), proxy
//! authentication required. Credentials never appear in logs or errors.

use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use actix_tls::connect::{ConnectError, ConnectInfo, Connection};
use awc::http::Uri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy to tunnel through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// `Basic …` value of `Proxy-Authorization`, when credentials were given.
    authorization: Option<String>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the credentials.
        write!(
            f,
            "http://{}:{}{}",
            self.host,
            self.port,
            if self.authorization.is_some() {
                " (with credentials)"
            } else {
                ""
            }
        )
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

/// A proxy setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ProxyError {
    /// Where the setting came from (`agent.gateway.proxy.url`, `HTTPS_PROXY`, …).
    pub origin: String,
    pub message: String,
}

impl Proxy {
    /// Parses `http://[user[:password]@]host[:port]` (port 3128, the usual proxy port, when absent;
    /// IPv6 hosts in brackets). `origin` names the setting in errors.
    pub fn parse(url: &str, origin: &str) -> Result<Proxy, ProxyError> {
        let bad = |m: &str| ProxyError {
            origin: origin.to_string(),
            message: m.to_string(),
        };
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.contains("://") {
            return Err(bad(
                "only http:// proxies are supported (the tunnel carries TLS to the gateway)",
            ));
        } else {
            url
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        if hostport.is_empty() || hostport.contains('/') {
            return Err(bad("expected http://host:port"));
        }
        let (host, port_text) = if let Some(v6) = hostport.strip_prefix('[') {
            // [v6 address] or [v6 address]:port
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed `[` in the host"))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = match port_text {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| bad(&format!("`{p}` is not a port")))?,
            None => 3128,
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let mut proxy = Proxy {
            host: host.to_string(),
            port,
            authorization: None,
        };
        if let Some(u) = userinfo {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            proxy = proxy.with_credentials(&percent_decode(user), &percent_decode(pass));
        }
        Ok(proxy)
    }

    /// Basic credentials (sent only to the proxy, in `Proxy-Authorization`).
    pub fn with_credentials(mut self, user: &str, password: &str) -> Proxy {
        use openssl::base64::encode_block;
        self.authorization = Some(format!(
            "Basic {}",
            encode_block(format!("{user}:{password}").as_bytes())
        ));
        self
    }

    pub fn has_credentials(&self) -> bool {
        self.authorization.is_some()
    }

    /// Opens a TCP connection to the proxy and a CONNECT tunnel to `host:port` through it.
    pub async fn tunnel(&self, host: &str, port: u16) -> std::io::Result<TcpStream> {
        use std::io::{Error, ErrorKind};
        let mut s = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| Error::new(e.kind(), format!("proxy {self} unreachable: {e}")))?;
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(a) = &self.authorization {
            req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| {
            Error::new(e.kind(), format!("proxy {self} closed the connection: {e}"))
        })?;
        // Read the response head byte by byte: nothing of the tunnel may be consumed.
        let mut head = Vec::with_capacity(256);
        loop {
            let mut b = [0u8; 1];
            let n = s.read(&mut b).await.map_err(|e| {
                Error::new(e.kind(), format!("proxy {self} closed the connection: {e}"))
            })?;
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::ConnectionAborted,
                    format!("proxy {self} closed the connection before answering CONNECT"),
                ));
            }
            head.push(b[0]);
            if head.ends_with(b"\r\n\r\n") {
                break;
            }
            if head.len() > 16 * 1024 {
                return Err(Error::new(
                    ErrorKind::InvalidData,
                    format!("proxy {self} sent an oversized response to CONNECT"),
                ));
            }
        }
        let text = String::from_utf8_lossy(&head);
        let status_line = text.lines().next().unwrap_or_default().trim().to_string();
        let code = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok());
        match code {
            Some(200..=299) => Ok(s),
            // 407 is the standard answer; some proxies (tinyproxy) answer 401 to bad credentials.
            Some(407) | Some(401) => Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "proxy {self} requires authentication ({status_line}){}",
                    if self.authorization.is_some() {
                        "; the configured credentials were refused"
                    } else {
                        "; set agent.gateway.proxy credentials"
                    }
                ),
            )),
            _ => Err(Error::new(
                ErrorKind::ConnectionRefused,
                format!("proxy {self} refused CONNECT to {target}: {status_line:?}"),
            )),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `host` is excluded by a `NO_PROXY` list (`*`, exact names, `.suffix` or `suffix`
/// domain matches, IP addresses; ports are ignored).
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    no_proxy
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|e| {
            if e == "*" {
                return true;
            }
            let e = e
                .split(':')
                .next()
                .unwrap_or_default()
                .trim_start_matches('.');
            host == e || host.ends_with(&format!(".{e}"))
        })
}

/// The proxy for a gateway URL from the environment: `HTTPS_PROXY` for `wss://`, `HTTP_PROXY`
/// for `ws://` (upper or lower case), unless `NO_PROXY` excludes the host.
pub fn from_env(
    gateway_url: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, ProxyError> {
    let Ok(uri) = gateway_url.parse::<Uri>() else {
        return Ok(None);
    };
    let host = uri.host().unwrap_or_default();
    let get = |name: &str| {
        var(name)
            .or_else(|| var(&name.to_ascii_lowercase()))
            .filter(|v| !v.trim().is_empty())
    };
    if let Some(np) = get("NO_PROXY") {
        if no_proxy_matches(&np, host) {
            return Ok(None);
        }
    }
    let name = if uri.scheme_str() == Some("wss") {
        "HTTPS_PROXY"
    } else {
        "HTTP_PROXY"
    };
    match get(name) {
        Some(v) => Proxy::parse(v.trim(), name).map(Some),
        None => Ok(None),
    }
}

/// awc's TCP connector, tunnelling through a proxy.
#[derive(Clone)]
pub struct ProxyConnector {
    proxy: Rc<Proxy>,
    timeout: Duration,
}

impl ProxyConnector {
    pub fn new(proxy: Proxy, timeout: Duration) -> Self {
        ProxyConnector {
            proxy: Rc::new(proxy),
            timeout,
        }
    }
}

impl actix_service::Service<ConnectInfo<Uri>> for ProxyConnector {
    type Response = Connection<Uri, TcpStream>;
    type Error = ConnectError;
    type Future =
        futures_util::future::LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_service::always_ready!();

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let proxy = self.proxy.clone();
        let timeout = self.timeout;
        let host = req.hostname().to_string();
        let port = req.port();
        let uri = req.request().clone();
        Box::pin(async move {
            let stream = match tokio::time::timeout(timeout, proxy.tunnel(&host, port)).await {
                Ok(r) => r.map_err(ConnectError::Io)?,
                Err(_) => {
                    return Err(ConnectError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("proxy {proxy}: no tunnel within {} ms", timeout.as_millis()),
                    )))
                }
            };
            Ok(Connection::new(uri, stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_with_and_without_port_and_credentials() {
        let p = Proxy::parse("http://proxy.clinic.local:8080", "x").expect("parse");
        assert_eq!(
            (p.host.as_str(), p.port, p.has_credentials()),
            ("proxy.clinic.local", 8080, false)
        );
        let p = Proxy::parse("http://ann:s%40cret@10.0.0.1:3128/", "x").expect("parse");
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.1", 3128));
        assert_eq!(p.authorization.as_deref(), Some("Basic YW5uOnNAY3JldA=="));
        assert_eq!(Proxy::parse("corp-proxy", "x").expect("bare").port, 3128);
        let p = Proxy::parse("http://[::1]:8080", "x").expect("v6");
        assert_eq!((p.host.as_str(), p.port), ("::1", 8080));
        assert_eq!(
            Proxy::parse("http://[fe80::1]", "x").expect("v6").port,
            3128
        );
        let shown = format!("{p:?} {p}");
        assert!(!shown.contains("cret") && !shown.contains("ann"), "{shown}");
    }

    #[test]
    fn bad_proxy_urls_name_the_setting() {
        let e = Proxy::parse("socks5://h:1080", "HTTPS_PROXY").unwrap_err();
        assert!(
            e.to_string().starts_with("HTTPS_PROXY: only http://"),
            "{e}"
        );
        let e = Proxy::parse("http://h:port", "agent.gateway.proxy.url").unwrap_err();
        assert_eq!(
            e.to_string(),
            "agent.gateway.proxy.url: `port` is not a port"
        );
    }

    #[test]
    fn no_proxy_matches_names_suffixes_and_star() {
        assert!(no_proxy_matches("localhost,.internal", "gw.internal"));
        assert!(no_proxy_matches("example.com", "api.example.com"));
        assert!(no_proxy_matches("example.com:443", "example.com"));
        assert!(!no_proxy_matches("example.com", "badexample.com"));
        assert!(no_proxy_matches("*", "anything"));
        assert!(no_proxy_matches("127.0.0.1", "127.0.0.1"));
    }

    #[test]
    fn environment_picks_the_variable_for_the_scheme_and_honours_no_proxy() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let vars = env(&[("https_proxy", "http://p:1"), ("HTTP_PROXY", "http://q:2")]);
        let p = from_env("wss://gw.example.com/v1/ws", vars)
            .expect("ok")
            .expect("proxy");
        assert_eq!(p.port, 1);
        let p = from_env("ws://gw.example.com/v1/ws", vars)
            .expect("ok")
            .expect("proxy");
        assert_eq!(p.port, 2);
        let vars = env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", ".example.com")]);
        assert!(from_env("wss://gw.example.com/v1/ws", vars)
            .expect("ok")
            .is_none());
    }
}
