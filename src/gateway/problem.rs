//! Errors of the HTTP API as `application/problem+json` (RFC 9457): `type`, `title`, `status`,
//! `detail`, and `field` (an extension) naming the input at fault when there is one. Errors the
//! framework produces itself (no such route, wrong method, body too large, ...) are rewritten
//! into the same shape by [`rewrite`], so a client only ever sees one error format.

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::{header, StatusCode};
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::HttpResponse;
use serde_json::json;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// Where the problem types are described (the OpenAPI file's `Problem` schema lists them).
const TYPE_BASE: &str = "https://tether.example/problems/";

fn slug(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "-")
}

/// A problem answer.
pub fn problem(status: StatusCode, field: Option<&str>, detail: impl Into<String>) -> HttpResponse {
    problem_with(status, field, detail, serde_json::Value::Null)
}

/// A problem answer with extension members (`extra`, an object, merged in).
pub fn problem_with(
    status: StatusCode,
    field: Option<&str>,
    detail: impl Into<String>,
    extra: serde_json::Value,
) -> HttpResponse {
    let mut body = json!({
        "type": format!("{TYPE_BASE}{}", slug(status)),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    if let serde_json::Value::Object(more) = extra {
        for (k, v) in more {
            body[k.as_str()] = v;
        }
    }
    HttpResponse::build(status)
        .content_type(CONTENT_TYPE)
        .body(body.to_string())
}

/// Error-handler middleware: any 4xx/5xx that is not already a problem becomes one (its
/// original body, the framework's plain text, is dropped in favour of the status's meaning).
pub fn rewrite<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(CONTENT_TYPE));
    if is_problem {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let detail = match status {
        StatusCode::NOT_FOUND => "no such resource or route".to_string(),
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route".to_string(),
        StatusCode::PAYLOAD_TOO_LARGE => "request body too large".to_string(),
        s => s.canonical_reason().unwrap_or("error").to_string(),
    };
    let (req, _) = res.into_parts();
    let resp = problem(status, None, detail);
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, resp).map_into_right_body(),
    ))
}
