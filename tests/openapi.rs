//! The OpenAPI file (`schemas/openapi.json`, served at `/v1/openapi.json`) and the server agree:
//! every route the gateway registers is in the spec and every operation in the spec is served;
//! every example in the spec validates against its schema; live answers validate too.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tether::fleet::Fleet;
use tether::gateway::routes;

fn spec() -> Value {
    serde_json::from_str(routes::OPENAPI).expect("schemas/openapi.json is JSON")
}

/// A validator for `schema` (inline or a `$ref` into the spec's components).
fn validator(spec: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = spec.clone();
    root["$defs"] = json!({ "target": schema });
    root["$ref"] = json!("#/$defs/target");
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema {schema}: {e}"))
}

fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            out.push((method.to_uppercase(), path.clone(), op.clone()));
        }
    }
    out
}

#[test]
fn every_route_is_in_the_spec_and_every_operation_is_a_route() {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.1.0");
    let served: BTreeSet<(String, String)> = routes::endpoints()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let described: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let missing: Vec<_> = served.difference(&described).collect();
    assert!(
        missing.is_empty(),
        "routes missing from the spec: {missing:?}"
    );
    let extra: Vec<_> = described.difference(&served).collect();
    assert!(extra.is_empty(), "spec operations not served: {extra:?}");
    for (m, p, op) in operations(&spec) {
        assert!(op["operationId"].is_string(), "{m} {p}: operationId");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{m} {p}: responses"
        );
        // Path parameters are declared.
        for seg in p.split('/').filter(|s| s.starts_with('{')) {
            let name = seg.trim_matches(|c| c == '{' || c == '}');
            let declared = op["parameters"].as_array().is_some_and(|ps| {
                ps.iter().any(|x| {
                    x["name"] == name
                        || x["$ref"]
                            .as_str()
                            .and_then(|r| r.rsplit('/').next())
                            .and_then(|n| spec["components"]["parameters"].get(n))
                            .is_some_and(|d| d["name"] == name)
                })
            });
            assert!(declared, "{m} {p}: path parameter {name} not declared");
        }
    }
}

#[test]
fn every_example_in_the_spec_validates_against_its_schema() {
    let spec = spec();
    let mut checked = 0;
    for (m, p, op) in operations(&spec) {
        let mut media = Vec::new();
        if let Some(c) = op["requestBody"]["content"].as_object() {
            media.extend(c.iter().map(|(t, v)| (format!("request {t}"), v.clone())));
        }
        for (code, r) in op["responses"].as_object().expect("responses") {
            if let Some(c) = r["content"].as_object() {
                media.extend(c.iter().map(|(t, v)| (format!("{code} {t}"), v.clone())));
            }
        }
        for (what, m_obj) in media {
            let (Some(example), Some(schema)) = (m_obj.get("example"), m_obj.get("schema")) else {
                continue;
            };
            if !what.contains("json") {
                continue;
            }
            let v = validator(&spec, schema);
            let errors: Vec<String> = v.iter_errors(example).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{m} {p} {what}: {errors:?}");
            checked += 1;
        }
    }
    for (name, schema) in spec["components"]["schemas"].as_object().expect("schemas") {
        for ex in schema["examples"].as_array().into_iter().flatten() {
            let v = validator(
                &spec,
                &json!({"$ref": format!("#/components/schemas/{name}")}),
            );
            assert!(v.is_valid(ex), "{name} example {ex}");
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} examples checked");
    // The validators do reject: a problem without its fields, a clinic with an unknown state.
    let problem = validator(&spec, &json!({"$ref": "#/components/schemas/Problem"}));
    assert!(!problem.is_valid(&json!({"status": "bad"})));
    let clinic = validator(&spec, &json!({"$ref": "#/components/schemas/Clinic"}));
    assert!(!clinic.is_valid(
        &json!({"clinic_id": "c", "connected": true, "state": "asleep",
        "acked_seq": 0, "events": 0, "pending_updates": 0})
    ));
}

fn response_schema(spec: &Value, method: &str, path: &str, code: &str) -> Value {
    let r = &spec["paths"][path][method]["responses"][code];
    let c = r["content"].as_object().expect("content");
    let (_, m) = c.iter().next().expect("one media type");
    m["schema"].clone()
}

#[actix_rt::test]
async fn live_answers_match_the_spec_and_no_described_route_is_missing() {
    let spec = spec();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 1, Duration::from_millis(500)).expect("fleet");
    fleet.start_agents().await.expect("agents");
    common::write_activity(&fleet.clinics[0].db, 5);
    common::wait_drained(&fleet, Duration::from_secs(20)).await;
    let clinic = fleet.clinics[0].id.clone();
    let base = fleet.http_url();
    let (status, accepted) = common::post_as(
        Some(&fleet),
        &format!("{base}/v1/clinics/{clinic}/updates"),
        &json!({"entity": "patient", "op": "upsert", "key": {"id": 900}, "row": {"id": 900, "name": "x"}}),
    )
    .await;
    assert_eq!(status, 202);
    let check = |method: &str, path: &str, code: &str, body: &Value| {
        let v = validator(&spec, &response_schema(&spec, method, path, code));
        let errors: Vec<String> = v.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {code}: {errors:?}\n{body}"
        );
    };
    check("post", "/v1/clinics/{id}/updates", "202", &accepted);
    let update_id = accepted["update_id"].as_str().expect("id").to_string();
    let (status, posted) = common::post_as(
        Some(&fleet),
        &format!("{base}/v1/clinics/{clinic}/channels/voip.call"),
        &json!({"call_id": "c-1", "state": "ringing"}),
    )
    .await;
    assert_eq!(status, 202, "{posted}");
    check("post", "/v1/clinics/{id}/channels/{name}", "202", &posted);
    let message_id = posted["message_id"].as_str().expect("id").to_string();
    let (status, refused) = common::post_as(
        Some(&fleet),
        &format!("{base}/v1/clinics/{clinic}/channels/voip.call"),
        &json!({"state": "ringing"}),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    check("post", "/v1/clinics/{id}/channels/{name}", "422", &refused);
    let (status, batch) = common::post_as(
        Some(&fleet),
        &format!("{base}/v1/channels/notice.broadcast"),
        &json!({"all": true, "payload": {"notice_id": "n", "title": "t", "severity": "info"}}),
    )
    .await;
    assert_eq!(status, 202, "{batch}");
    check("post", "/v1/channels/{name}", "202", &batch);
    for (path, url, code) in [
        ("/healthz", "/healthz".to_string(), "200"),
        ("/readyz", "/readyz".to_string(), "200"),
        ("/v1/events", "/v1/events?after=0".to_string(), "200"),
        ("/v1/clinics", "/v1/clinics".to_string(), "200"),
        (
            "/v1/clinics",
            "/v1/clinics?state=connected&limit=1".to_string(),
            "200",
        ),
        ("/v1/clinics", "/v1/clinics?state=asleep".to_string(), "400"),
        ("/v1/clinics/{id}", format!("/v1/clinics/{clinic}"), "200"),
        (
            "/v1/clinics/{id}",
            "/v1/clinics/clinic-999".to_string(),
            "404",
        ),
        ("/v1/events", "/v1/events?limit=2".to_string(), "200"),
        ("/v1/events", "/v1/events?limit=0".to_string(), "400"),
        (
            "/v1/updates/{id}",
            format!("/v1/updates/{update_id}"),
            "200",
        ),
        (
            "/v1/updates/{id}",
            "/v1/updates/upd_nope".to_string(),
            "404",
        ),
        (
            "/v1/clinics/{id}/updates",
            format!("/v1/clinics/{clinic}/updates?limit=5"),
            "200",
        ),
        (
            "/v1/clinics/{id}/updates",
            format!("/v1/clinics/{clinic}/updates?status=lost"),
            "400",
        ),
        (
            "/v1/registry/clinics",
            "/v1/registry/clinics".to_string(),
            "200",
        ),
        (
            "/v1/channels/messages/{id}",
            format!("/v1/channels/messages/{message_id}"),
            "200",
        ),
        (
            "/v1/channels/messages/{id}",
            "/v1/channels/messages/msg_nope".to_string(),
            "404",
        ),
        ("/v1/channels", "/v1/channels".to_string(), "200"),
    ] {
        let (status, body) = common::get_as(Some(&fleet), &format!("{base}{url}")).await;
        assert_eq!(status.to_string(), code, "{url}: {body}");
        check("get", path, code, &body);
    }
    // Errors are problem+json, framework errors included.
    let client = fleet.rest_client().expect("client");
    for (method, url, want) in [
        ("GET", "/v1/nothing-here", 404),
        ("DELETE", "/v1/clinics", 404),
        ("GET", "/v1/clinics", 401),
    ] {
        let req = client.request(method.parse().expect("method"), format!("{base}{url}"));
        let req = if want == 401 {
            req
        } else {
            fleet.authorize(req)
        };
        let mut resp = req.send().await.expect("request");
        assert_eq!(resp.status().as_u16(), want, "{method} {url}");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert_eq!(ct, "application/problem+json", "{method} {url}");
        let body: Value = resp.json().await.expect("problem json");
        let v = validator(&spec, &json!({"$ref": "#/components/schemas/Problem"}));
        assert!(v.is_valid(&body), "{body}");
        assert_eq!(body["status"], want);
    }
    // Every described operation is answered by a handler, not the framework's "no route".
    for (m, p, _) in operations(&spec) {
        let url = p.replace("{id}", &clinic).replace("{channel}", "hunknown");
        let req = client.request(m.parse().expect("method"), format!("{base}{url}"));
        let mut resp = fleet.authorize(req).send().await.expect("request");
        let status = resp.status().as_u16();
        assert_ne!(status, 405, "{m} {p}");
        if status == 404 {
            let body: Value = resp.json().await.unwrap_or_default();
            assert_ne!(body["detail"], "no such resource or route", "{m} {p}");
        }
    }
    // The spec is served, without a token, as checked in.
    let mut resp = client
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await
        .expect("openapi");
    assert_eq!(resp.status().as_u16(), 200);
    let served: Value = resp.json().limit(1 << 20).await.expect("json");
    assert_eq!(served, spec);
    fleet.stop().await;
}
