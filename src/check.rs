//! `tether check-config --connect`: after the offline checks, what only the network and the
//! database can tell — each a line `ok` or `FAIL` with what to do:
//! - agent: the clinic's database opens (SQLite read-only: it is never created here), every
//!   mapped table passes what `tether agent install` requires, the capture objects are
//!   installed; the gateway is reached (DNS, TCP, proxy, TLS with the configured CA and client
//!   certificate) and takes this clinic's token — a refusal says the gateway's own reason;
//! - gateway: the listen address can be bound, the PostgreSQL store answers.
//!
//! Nothing is written anywhere: the WebSocket is closed right after the upgrade, before the
//! agent's `hello`, so a running agent's session is not touched.

use std::time::Duration;

use crate::config::{AgentConfig, Config};

/// One checked thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub ok: bool,
    /// `database`, `gateway`, `listen`, `store`.
    pub what: &'static str,
    pub text: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "  {mark}  {:<9} {}", self.what, self.text)
    }
}

fn ok(what: &'static str, text: impl Into<String>) -> Line {
    Line {
        ok: true,
        what,
        text: text.into(),
    }
}

fn fail(what: &'static str, text: impl Into<String>) -> Line {
    Line {
        ok: false,
        what,
        text: text.into(),
    }
}

/// Every connected check the config calls for.
pub fn run(cfg: &Config) -> Vec<Line> {
    let mut lines = Vec::new();
    if let Some(a) = &cfg.agent {
        lines.extend(database(a));
        lines.push(gateway_link(a));
    }
    #[cfg(feature = "gateway")]
    if let Some(g) = &cfg.gateway {
        lines.extend(gateway_side(g));
    }
    #[cfg(not(feature = "gateway"))]
    if cfg.gateway.is_some() {
        lines.push(fail(
            "gateway",
            "this build has no gateway (cargo feature `gateway`)",
        ));
    }
    lines
}

/// The clinic's database: tables as `install` needs them, and the capture objects.
pub fn database(a: &AgentConfig) -> Vec<Line> {
    let d = &a.database;
    let (label, result) = match d.kind.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => (
            "PostgreSQL".to_string(),
            crate::agent::connection_string(a)
                .map_err(|e| e.to_string())
                .and_then(|c| crate::db::postgres::check(&c, &a.tables).map_err(|e| e.to_string())),
        ),
        #[cfg(feature = "sqlserver")]
        "sqlserver" => ("SQL Server".to_string(), sqlserver(a)),
        "sqlite" => (
            format!("SQLite {}", d.path.display()),
            if d.path.is_file() {
                crate::db::sqlite::check(&d.path, &a.tables).map_err(|e| e.to_string())
            } else {
                Err(format!(
                    "{}: no such file (the agent never creates the clinic's database)",
                    d.path.display()
                ))
            },
        ),
        other => (
            other.to_string(),
            Err(format!(
                "agent.database.kind `{other}`: not in this build (cargo feature `{other}`)"
            )),
        ),
    };
    match result {
        Err(e) => vec![fail("database", format!("{label}: {e}"))],
        Ok((problems, installed)) => {
            let mut lines: Vec<Line> = problems
                .into_iter()
                .map(|p| fail("database", format!("{label}: {p}")))
                .collect();
            if lines.is_empty() {
                lines.push(ok(
                    "database",
                    format!(
                        "{label}: {} mapped tables, each with its key as install needs it",
                        a.tables.len()
                    ),
                ));
            }
            lines.push(if installed {
                ok("database", format!("{label}: capture objects installed"))
            } else {
                fail(
                    "database",
                    format!("{label}: capture objects not installed: run `tether agent install`"),
                )
            });
            lines
        }
    }
}

#[cfg(feature = "sqlserver")]
fn sqlserver(a: &AgentConfig) -> Result<(Vec<String>, bool), String> {
    use crate::db::sqlserver::{check_script, MssqlDb, INSTALLED_SQL};
    let conn = crate::agent::connection_string(a).map_err(|e| e.to_string())?;
    let db = MssqlDb::connect(&conn, a.database.ca.as_deref(), a.database.timeout.get())
        .map_err(|e| e.to_string())?;
    let problems = check_script(&a.tables)
        .into_iter()
        .filter_map(|b| db.batches(&[b]).err().map(|e| e.to_string()))
        .collect();
    let installed = db.batches(&[INSTALLED_SQL.to_string()]).is_ok();
    Ok((problems, installed))
}

/// The agent's link: a WebSocket upgrade with this clinic's TLS and token, closed at once.
pub fn gateway_link(a: &AgentConfig) -> Line {
    let url = a.gateway.url.clone();
    let dialer = match crate::agent::dialer(a) {
        Ok(d) => d,
        Err(e) => return fail("gateway", format!("{url}: {e}")),
    };
    let timeout = a.gateway.connect_timeout.get().max(Duration::from_secs(1));
    let system = actix::System::new();
    system.block_on(async move { upgrade(&dialer, &url, timeout).await })
}

async fn upgrade(
    dialer: &crate::security::dialer::SecureDialer,
    url: &str,
    timeout: Duration,
) -> Line {
    use futures_util::SinkExt;
    use tether_actors::ports::Dialer;
    let headers = match dialer.headers() {
        Ok(h) => h,
        Err(e) => return fail("gateway", format!("{url}: signing the token: {e}")),
    };
    let mut req = dialer.client().ws(url);
    for (k, v) in &headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let tls = if url.starts_with("wss://") {
        "TLS ok, "
    } else {
        "no TLS, "
    };
    match tokio::time::timeout(timeout, req.connect()).await {
        Err(_) => fail(
            "gateway",
            format!(
                "{url}: no answer within {timeout:?} (a firewall dropping packets, or a proxy that holds the upgrade)"
            ),
        ),
        Ok(Ok((_, mut framed))) => {
            let bye = awc::ws::Message::Close(Some(awc::ws::CloseReason {
                code: awc::ws::CloseCode::Normal,
                description: Some("check-config".into()),
            }));
            let _ = tokio::time::timeout(timeout, framed.send(bye)).await;
            let token = if headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
                "token accepted"
            } else {
                "no token configured"
            };
            ok("gateway", format!("{url}: connected, {tls}{token}"))
        }
        Ok(Err(awc::error::WsClientError::InvalidResponseStatus(s))) if s.as_u16() == 401 => {
            fail("gateway", format!("{url}: {}", refusal(dialer, url, timeout).await))
        }
        Ok(Err(awc::error::WsClientError::InvalidResponseStatus(s))) if s.as_u16() == 404 => fail(
            "gateway",
            format!("{url}: no WebSocket endpoint at this path (404): check agent.gateway.url (the path is /v1/ws)"),
        ),
        Ok(Err(e)) => fail("gateway", format!("{url}: {e}")),
    }
}

/// The gateway's reason for a 401, read as the agent reads it (a plain request with a fresh
/// token: `WWW-Authenticate` `error_description`, and the clock from `Tether-Time`).
async fn refusal(
    dialer: &crate::security::dialer::SecureDialer,
    url: &str,
    timeout: Duration,
) -> String {
    use tether_actors::ports::Dialer;
    let http = url
        .strip_prefix("wss://")
        .map(|r| format!("https://{r}"))
        .or_else(|| url.strip_prefix("ws://").map(|r| format!("http://{r}")))
        .unwrap_or_else(|| url.to_string());
    let mut req = dialer.client().get(http);
    if let Ok(headers) = dialer.headers() {
        for (k, v) in headers {
            req = req.insert_header((k, v));
        }
    }
    let sent = crate::security::unix_now_ms();
    let Ok(Ok(resp)) = tokio::time::timeout(timeout, req.send()).await else {
        return "the gateway refused the token (401); it gave no reason".into();
    };
    let got = crate::security::unix_now_ms();
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
    let refusal = tether_actors::stats::Refusal::from_answer(
        401,
        header("www-authenticate"),
        header("tether-time"),
        sent,
        got,
    );
    let (reason, offset, advice) = (&refusal.reason, refusal.clock_offset_ms, refusal.advice());
    let clock = offset
        .map(|o| format!(", this clock {o:+} ms from the gateway's"))
        .unwrap_or_default();
    format!("the gateway refused the token: {reason}{clock} — {advice}")
}

/// The gateway side: the listen address is free, the store answers.
#[cfg(feature = "gateway")]
pub fn gateway_side(g: &crate::config::GatewayConfig) -> Vec<Line> {
    let mut lines = Vec::new();
    lines.push(match crate::gateway::probe_listen(&g.listen) {
        Ok(()) => ok("listen", format!("{}: can be bound", g.listen)),
        Err(e) => fail("listen", e.to_string()),
    });
    match g.store.kind.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => {
            let url = match (&g.store.url, &g.store.url_env) {
                (Some(u), _) => Some(u.clone()),
                (None, Some(var)) => std::env::var(var).ok(),
                (None, None) => None,
            };
            lines.push(match url {
                None => fail("store", "gateway.store: no url (url or url_env)"),
                Some(url) => match crate::db::postgres::connect(&url)
                    .map_err(|e| e.to_string())
                    .and_then(|mut c| {
                        c.simple_query("SELECT 1")
                            .map(|_| ())
                            .map_err(|e| crate::db::postgres::pg_error_text(&e))
                    }) {
                    Ok(()) => ok(
                        "store",
                        format!("PostgreSQL answers (schema `{}`)", g.store.schema),
                    ),
                    Err(e) => fail("store", format!("PostgreSQL: {e}")),
                },
            });
        }
        _ => lines.push(ok(
            "store",
            format!(
                "SQLite {} (created at start if missing)",
                g.store.path.display()
            ),
        )),
    }
    lines
}
