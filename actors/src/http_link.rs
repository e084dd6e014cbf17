//! The agent's side of the HTTP fallback transport (`tether_schemas::http`): open a channel,
//! a sender that POSTs the queued protocol messages in order (retrying a send whose answer was
//! lost under the same `seq`), and a poller that long-polls for the gateway's messages.
//! The connection actor drives both and treats them exactly like a WebSocket: the same
//! messages, the same acks, the same resend-from-`welcome` after a loss.

use std::time::Duration;

use futures_util::stream::Stream;
use tether_schemas::http::{Closed, Opened, Polled};
use tokio::sync::mpsc;

/// Why an HTTP link attempt or link failed, in words for the `connection` log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpLinkError {
    #[error("{what}: {error}")]
    Request { what: &'static str, error: String },
    #[error("{what}: gateway answered {status}")]
    Status { what: &'static str, status: u16 },
    #[error("{what}: bad answer: {error}")]
    BadAnswer { what: &'static str, error: String },
    #[error("{what}: timed out after {ms} ms")]
    Timeout { what: &'static str, ms: u128 },
    /// 401 with the gateway's reason (`WWW-Authenticate` `error_description`) and the clock
    /// offset measured on the answer (`Tether-Time`).
    #[error("{what}: refused by the gateway: {reason}")]
    Refused {
        what: &'static str,
        reason: String,
        clock_offset_ms: Option<i64>,
    },
}

/// One open channel.
#[derive(Clone)]
pub struct Channel {
    pub client: awc::Client,
    /// `…/v1/http/{channel}`.
    pub url: String,
    pub poll_wait: Duration,
    /// Allowance on top of `poll_wait` for a request's round trip.
    pub timeout: Duration,
}

async fn body_of(
    what: &'static str,
    mut resp: awc::ClientResponse<
        impl Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>> + Unpin,
    >,
    limit: usize,
) -> Result<bytes::Bytes, HttpLinkError> {
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(HttpLinkError::Status { what, status });
    }
    resp.body()
        .limit(limit)
        .await
        .map_err(|e| HttpLinkError::Request {
            what,
            error: e.to_string(),
        })
}

/// `POST {base}/open` with the attempt's credentials.
pub async fn open(
    client: awc::Client,
    base: &str,
    headers: Vec<(String, String)>,
    timeout: Duration,
) -> Result<Channel, HttpLinkError> {
    const WHAT: &str = "open";
    let mut req = client.post(format!("{base}/open")).timeout(timeout);
    for (k, v) in headers {
        req = req.insert_header((k, v));
    }
    let sent = crate::connection::wall_ms();
    let resp = req.send().await.map_err(|e| HttpLinkError::Request {
        what: WHAT,
        error: e.to_string(),
    })?;
    if resp.status().as_u16() == 401 {
        let got = crate::connection::wall_ms();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        return Err(HttpLinkError::Refused {
            what: WHAT,
            reason: header("www-authenticate")
                .as_deref()
                .and_then(|h| crate::connection::auth_param(h, "error_description"))
                .unwrap_or_else(|| "unauthorized".into()),
            clock_offset_ms: header("tether-time")
                .and_then(|t| t.parse::<i64>().ok())
                .map(|t| t - ((sent + got) / 2) as i64),
        });
    }
    let body = body_of(WHAT, resp, 64 * 1024).await?;
    let opened: Opened = serde_json::from_slice(&body).map_err(|e| HttpLinkError::BadAnswer {
        what: WHAT,
        error: e.to_string(),
    })?;
    if opened.channel.is_empty()
        || !opened
            .channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(HttpLinkError::BadAnswer {
            what: WHAT,
            error: "channel id is not a plain token".into(),
        });
    }
    Ok(Channel {
        client,
        url: format!("{base}/{}", opened.channel),
        poll_wait: Duration::from_millis(opened.poll_wait_ms).min(Duration::from_secs(60)),
        timeout,
    })
}

/// Sends everything queued on `rx`, in order, several messages per request (up to
/// `max_bytes`, the gateway's frame limit). A failed send is retried with the same `seq` and body until `retry_for` has
/// passed; then the link is lost and the error is returned. Ends quietly when `rx` closes.
pub async fn sender(
    ch: Channel,
    mut rx: mpsc::UnboundedReceiver<String>,
    max_bytes: usize,
    retry_for: Duration,
) -> Result<(), HttpLinkError> {
    const WHAT: &str = "send";
    let mut seq = 0u64;
    let mut carry: Option<String> = None;
    loop {
        let first = match carry.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return Ok(()),
            },
        };
        // As many queued messages as fit in one body (a single larger one goes alone).
        let mut body = first;
        while let Ok(next) = rx.try_recv() {
            if body.len() + 1 + next.len() > max_bytes {
                carry = Some(next);
                break;
            }
            body.push('\n');
            body.push_str(&next);
        }
        seq += 1;
        let url = format!("{}/send?seq={seq}", ch.url);
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let attempt = ch
                .client
                .post(&url)
                .timeout(ch.timeout)
                .insert_header(("content-type", "application/x-ndjson"))
                .send_body(body.clone())
                .await;
            let outcome = match attempt {
                Ok(resp) => body_of(WHAT, resp, 64 * 1024).await.map(|_| ()),
                Err(e) => Err(HttpLinkError::Request {
                    what: WHAT,
                    error: e.to_string(),
                }),
            };
            match outcome {
                Ok(()) => break,
                // The gateway knows no such channel (or refuses the send): the link is gone.
                Err(e @ HttpLinkError::Status { .. }) => return Err(e),
                Err(e) if started.elapsed() >= retry_for => return Err(e),
                Err(_) => {
                    // Retry pacing after a failed request, not synchronisation.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// What the poller hands the connection actor.
pub enum PollItem {
    Messages(Vec<String>),
    Closed(Closed),
    Failed(HttpLinkError),
}

enum PollState {
    Polling(Channel, u64),
    /// The close came with messages: those went first, the close is next.
    Closing(Closed),
}

/// Long-polls until the channel closes or a poll fails; the last item says which.
pub fn poller(ch: Channel) -> impl Stream<Item = PollItem> {
    futures_util::stream::unfold(Some(PollState::Polling(ch, 0)), |state| async move {
        let (ch, after) = match state? {
            PollState::Closing(c) => return Some((PollItem::Closed(c), None)),
            PollState::Polling(ch, after) => (ch, after),
        };
        const WHAT: &str = "poll";
        let limit = ch.poll_wait + ch.timeout;
        let req = ch
            .client
            .get(format!(
                "{}/poll?after={after}&wait_ms={}",
                ch.url,
                ch.poll_wait.as_millis()
            ))
            .timeout(limit);
        let polled = match req.send().await {
            Ok(resp) => body_of(WHAT, resp, 64 * 1024 * 1024).await,
            Err(awc::error::SendRequestError::Timeout) => Err(HttpLinkError::Timeout {
                what: WHAT,
                ms: limit.as_millis(),
            }),
            Err(e) => Err(HttpLinkError::Request {
                what: WHAT,
                error: e.to_string(),
            }),
        }
        .and_then(|body| {
            serde_json::from_slice::<Polled>(&body).map_err(|e| HttpLinkError::BadAnswer {
                what: WHAT,
                error: e.to_string(),
            })
        });
        let p = match polled {
            Err(e) => return Some((PollItem::Failed(e), None)),
            Ok(p) => p,
        };
        let msgs: Vec<String> = p.messages.iter().map(|m| m.get().to_string()).collect();
        match p.closed {
            Some(c) if msgs.is_empty() => Some((PollItem::Closed(c), None)),
            Some(c) => Some((PollItem::Messages(msgs), Some(PollState::Closing(c)))),
            None => {
                let next = PollState::Polling(ch, p.cursor.max(after));
                Some((PollItem::Messages(msgs), Some(next)))
            }
        }
    })
}

/// `POST …/close`: tell the gateway this side is done.
pub async fn close(ch: Channel, code: u16, reason: &str) -> Result<(), HttpLinkError> {
    const WHAT: &str = "close";
    let resp = ch
        .client
        .post(format!("{}/close", ch.url))
        .timeout(ch.timeout)
        .send_json(&Closed {
            code,
            reason: reason.to_string(),
        })
        .await
        .map_err(|e| HttpLinkError::Request {
            what: WHAT,
            error: e.to_string(),
        })?;
    body_of(WHAT, resp, 64 * 1024).await.map(|_| ())
}
