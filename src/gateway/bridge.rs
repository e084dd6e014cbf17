//! Clinic → cloud calls (`call_request`): the gateway calls the configured endpoint of the main
//! Web API for the clinic and answers with `call_response`.
//!
//! - One pooled HTTP client per endpoint and worker thread ([`BridgeClients`], built in each
//!   worker's app factory: awc clients are not `Send`), so calls reuse kept-alive connections
//!   and TLS sessions instead of opening one per call.
//! - Deadlines: the agent sends the call's deadline on its own clock, and its clock at `hello`;
//!   the session converts it with the offset it measured. A call whose deadline has passed is
//!   never forwarded (504), and the main Web API gets only what is left of it.
//! - Bodies travel as received: `body_text` is sent upstream byte for byte, and the answer comes
//!   back the same way with its content type, so nothing is re-encoded (and grows) on the way.
//!   An answer that the link cannot carry is a 502 with the reason, never a 200.

use std::collections::HashMap;
use std::time::Duration;

use tether_schemas::{CallRequest, CallResponse};

use super::{BridgeEndpoint, BridgeSettings};

/// Bytes a `call_response` needs besides the body (envelope, id, status, content type).
pub const ENVELOPE_BYTES: usize = 1024;

/// One pooled client per configured endpoint, for one worker thread.
pub struct BridgeClients {
    clients: HashMap<String, awc::Client>,
}

impl BridgeClients {
    pub fn new(settings: &BridgeSettings) -> Self {
        let clients = settings
            .endpoints
            .iter()
            .map(|(name, ep)| {
                let connector = awc::Connector::new()
                    .limit(64)
                    .conn_keep_alive(Duration::from_secs(30))
                    .timeout(ep.timeout);
                let client = awc::Client::builder()
                    .connector(connector)
                    .timeout(ep.timeout)
                    .finish();
                (name.clone(), client)
            })
            .collect();
        BridgeClients { clients }
    }

    pub fn get(&self, endpoint: &str) -> Option<awc::Client> {
        self.clients.get(endpoint).cloned()
    }
}

/// What to tell the agent, before any network: `Some` = answer this and do not forward.
pub fn refuse(
    c: &CallRequest,
    ep: Option<&BridgeEndpoint>,
    left: Option<i64>,
) -> Option<CallResponse> {
    let answer = |status: u16, error: String| CallResponse {
        request_id: c.request_id.clone(),
        status,
        body: None,
        body_text: None,
        content_type: None,
        error: Some(error),
    };
    if ep.is_none() {
        return Some(answer(
            404,
            format!(
                "no endpoint `{}` in gateway.api_bridge.endpoints",
                c.endpoint
            ),
        ));
    }
    if let Some(ms) = left {
        if ms <= 0 {
            return Some(answer(
                504,
                format!(
                    "the call's deadline had passed {} ms before the gateway could forward it",
                    -ms
                ),
            ));
        }
    }
    let post = ep.is_some_and(|e| e.post);
    if post && c.body.is_none() && c.body_text.as_deref().is_none_or(|b| b.trim().is_empty()) {
        return Some(answer(400, "the call has no JSON body".into()));
    }
    None
}

/// Calls the endpoint; always returns an answer for the agent.
pub async fn forward(
    client: awc::Client,
    ep: BridgeEndpoint,
    authorization: Option<String>,
    clinic: String,
    c: CallRequest,
    timeout: Duration,
    max_frame: usize,
) -> CallResponse {
    let mut out = CallResponse {
        request_id: c.request_id.clone(),
        status: 0,
        body: None,
        body_text: None,
        content_type: None,
        error: None,
    };
    let mut req = if ep.post {
        client.post(&ep.url)
    } else {
        client.get(&ep.url)
    };
    req = req
        .timeout(timeout)
        .insert_header(("tether-clinic", clinic));
    if let Some(a) = authorization {
        req = req.insert_header(("authorization", a));
    }
    if let Some(k) = &c.idempotency_key {
        req = req.insert_header(("idempotency-key", k.as_str()));
    }
    let raw = c.body_text.is_some();
    let sent = match (ep.post, c.body_text, c.body) {
        (true, Some(text), _) => {
            req.insert_header(("content-type", "application/json"))
                .send_body(text)
                .await
        }
        (true, None, Some(v)) => req.send_json(&v).await,
        _ => req.send().await,
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(awc::error::SendRequestError::Timeout) => {
            out.status = 504;
            out.error = Some(format!(
                "the main Web API did not answer within {} ms",
                timeout.as_millis()
            ));
            return out;
        }
        Err(e) => {
            out.error = Some(format!("main Web API not reached: {e}"));
            return out;
        }
    };
    let status = resp.status().as_u16();
    let limit = max_frame.saturating_sub(ENVELOPE_BYTES);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = match resp.body().limit(limit).await {
        Ok(b) => b,
        Err(actix_web::error::PayloadError::Overflow) => {
            out.status = 502;
            out.error = Some(format!(
                "the main Web API's answer (status {status}) is over {limit} bytes, more than the clinic's link carries"
            ));
            return out;
        }
        Err(e) => {
            out.status = 502;
            out.error = Some(format!(
                "reading the main Web API's answer (status {status}) failed: {e}"
            ));
            return out;
        }
    };
    out.status = status;
    if bytes.is_empty() {
        return out;
    }
    if raw {
        match String::from_utf8(bytes.to_vec()) {
            Ok(text) => {
                out.body_text = Some(text);
                out.content_type = content_type;
            }
            Err(_) => {
                out.status = 502;
                out.error = Some(format!(
                    "the main Web API's answer (status {status}) is not UTF-8 text"
                ));
            }
        }
    } else {
        out.body = Some(serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        }));
    }
    out
}

/// An answer whose frame would be over the limit becomes a 502 saying so.
pub fn fit(mut r: CallResponse, max_frame: usize) -> CallResponse {
    let size = tether_schemas::Message::CallResponse(r.clone())
        .encode()
        .len();
    if size > max_frame {
        r.error = Some(format!(
            "the main Web API's answer (status {}) takes {size} bytes as a message, more than the clinic's link carries ({max_frame})",
            r.status
        ));
        r.status = 502;
        r.body = None;
        r.body_text = None;
        r.content_type = None;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(body_text: Option<&str>) -> CallRequest {
        CallRequest {
            request_id: "call_1".into(),
            endpoint: "e".into(),
            body: None,
            body_text: body_text.map(str::to_string),
            deadline: None,
            idempotency_key: None,
        }
    }

    #[test]
    fn expired_unknown_and_empty_calls_are_answered_without_forwarding() {
        let ep = BridgeEndpoint {
            url: "http://127.0.0.1:9/".into(),
            post: true,
            timeout: Duration::from_secs(1),
        };
        let c = call(Some("{}"));
        assert_eq!(refuse(&c, None, None).map(|r| r.status), Some(404));
        assert_eq!(refuse(&c, Some(&ep), Some(-5)).map(|r| r.status), Some(504));
        assert_eq!(refuse(&c, Some(&ep), Some(0)).map(|r| r.status), Some(504));
        assert!(refuse(&c, Some(&ep), Some(1)).is_none());
        assert_eq!(
            refuse(&call(Some("  ")), Some(&ep), None).map(|r| r.status),
            Some(400)
        );
        assert_eq!(
            refuse(&call(None), Some(&ep), None).map(|r| r.status),
            Some(400)
        );
        // A GET endpoint takes no body (older agents send none).
        let get = BridgeEndpoint { post: false, ..ep };
        assert!(refuse(&call(None), Some(&get), None).is_none());
    }

    #[test]
    fn an_answer_too_large_for_the_link_becomes_a_502() {
        let r = CallResponse {
            request_id: "call_1".into(),
            status: 200,
            body: None,
            body_text: Some("\"\\u0001\"".repeat(1000)),
            content_type: Some("application/json".into()),
            error: None,
        };
        let small = fit(r.clone(), 2_000);
        assert_eq!(small.status, 502);
        assert!(small.body_text.is_none());
        assert!(small.error.as_deref().unwrap_or("").contains("more than"));
        assert_eq!(fit(r, 1 << 20).status, 200);
    }
}
