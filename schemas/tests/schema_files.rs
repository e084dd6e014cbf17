//! The JSON Schema files and the Rust decoder must agree: every example validates against its
//! schema, decodes, and re-encodes to the same JSON; every broken variant is refused by both.

use std::path::PathBuf;

use serde_json::Value;
use tether_schemas::{EntitySchemas, Message, MESSAGE_TYPES};

fn dir(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(sub)
}

fn read(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn validator(kind: &str) -> jsonschema::Validator {
    let schema = read(dir("json").join(format!("{kind}.schema.json")));
    jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{kind} schema: {e}"))
}

#[test]
fn every_message_type_has_a_schema_and_a_valid_example() {
    for kind in MESSAGE_TYPES {
        let v = validator(kind);
        let example = read(dir("examples").join(format!("{kind}.json")));
        let errors: Vec<String> = v.iter_errors(&example).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{kind} example vs schema: {errors:?}");
        let text = example.to_string();
        let msg = Message::decode(&text, 1 << 20).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(msg.kind(), kind);
        let back: Value = serde_json::from_str(&msg.encode()).expect("encoded json");
        assert_eq!(back, example, "{kind} round trip");
    }
}

fn refused_by_both(kind: &str, broken: &Value, what: &str) {
    let v = validator(kind);
    assert!(!v.is_valid(broken), "{kind}: schema accepted {what}");
    assert!(
        Message::decode(&broken.to_string(), 1 << 20).is_err(),
        "{kind}: decoder accepted {what}"
    );
}

#[test]
fn schema_and_decoder_refuse_the_same_broken_frames() {
    for kind in MESSAGE_TYPES {
        let example = read(dir("examples").join(format!("{kind}.json")));
        let obj = example.as_object().expect("object").clone();

        let mut extra = obj.clone();
        extra.insert("surprise".into(), Value::Bool(true));
        refused_by_both(kind, &Value::Object(extra), "an unknown field");

        let mut wrong_version = obj.clone();
        wrong_version.insert("v".into(), Value::from(2));
        refused_by_both(kind, &Value::Object(wrong_version), "version 2");

        // Drop each required field in turn.
        let schema = read(dir("json").join(format!("{kind}.schema.json")));
        for req in schema["required"].as_array().expect("required") {
            let name = req.as_str().expect("name");
            if name == "type" {
                continue;
            }
            let mut missing = obj.clone();
            missing.remove(name);
            refused_by_both(kind, &Value::Object(missing), &format!("missing `{name}`"));
        }
    }
}

#[test]
fn sample_entity_rows_match_their_entity_schemas() {
    let schemas = EntitySchemas::load_dir(&dir("entities")).expect("entity schemas");
    assert_eq!(schemas.len(), 3);
    let events = read(dir("examples").join("events.json"));
    for e in events["events"].as_array().expect("events") {
        let entity = e["entity"].as_str().expect("entity");
        schemas
            .validate(entity, &e["row"])
            .unwrap_or_else(|err| panic!("{entity}: {err}"));
    }
    let bad = serde_json::json!({"id": 1, "patient_id": 1, "amount_cents": -5, "method": "cash"});
    assert!(schemas.validate("payment", &bad).is_err());
}

#[test]
fn http_fallback_answers_match_their_schemas_and_types() {
    use tether_schemas::http::{Opened, Polled};
    for kind in ["http_opened", "http_polled"] {
        let v = validator(kind);
        let example = read(dir("examples/http").join(format!("{kind}.json")));
        let errors: Vec<String> = v.iter_errors(&example).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{kind} example vs schema: {errors:?}");
        let back = if kind == "http_opened" {
            let o: Opened = serde_json::from_value(example.clone()).expect("opened");
            serde_json::to_value(o).expect("json")
        } else {
            let p: Polled = serde_json::from_str(&example.to_string()).expect("polled");
            for m in &p.messages {
                Message::decode(m.get(), 1 << 20).expect("each message is an envelope");
            }
            serde_json::to_value(&p).expect("json")
        };
        assert_eq!(back, example, "{kind} round trip");
        let mut extra = example.as_object().expect("object").clone();
        extra.insert("surprise".into(), Value::Bool(true));
        assert!(!v.is_valid(&Value::Object(extra)), "{kind}: unknown field");
    }
}

#[test]
fn the_sample_channels_have_valid_schemas_and_the_example_payload_matches() {
    let channels = EntitySchemas::load_dir(&dir("channels")).expect("channel schemas");
    for name in ["voip.call", "notice.broadcast", "frontdesk.checkin"] {
        assert!(channels.covers(name), "schemas/channels/{name}.schema.json");
    }
    let example = read(dir("examples").join("channel.json"));
    let name = example["channel"].as_str().expect("channel");
    channels
        .validate(name, &example["payload"])
        .unwrap_or_else(|err| panic!("{name}: {err}"));
    let mut bad = example["payload"].clone();
    bad["state"] = Value::from("on_hold_forever");
    let err = channels
        .validate(name, &bad)
        .expect_err("state outside its enum");
    assert!(err.to_string().contains("/state"), "{err}");
    assert!(!err.to_string().contains("on_hold_forever"), "{err}");
}
