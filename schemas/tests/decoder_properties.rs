//! Property tests: the frame decoder never panics, whatever arrives, and everything it accepts
//! re-encodes to an equivalent frame.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;
use tether_schemas::{decode_inbound, Message, MESSAGE_TYPES};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("v".to_string()),
                    Just("type".to_string()),
                    Just("seq".to_string()),
                    Just("events".to_string()),
                    Just("prev_seq".to_string()),
                    Just("key".to_string()),
                    Just("row".to_string()),
                    Just("op".to_string()),
                    ".{0,6}"
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The gateway's fast path accepts exactly what the full decoder accepts, and refuses the rest
/// naming the same field.
fn agree(text: &str) -> Result<(), TestCaseError> {
    let fast = decode_inbound(text, 1 << 20);
    let full = Message::decode(text, 1 << 20);
    match (&fast, &full) {
        (Ok(f), Ok(m)) => prop_assert_eq!(f.kind(), m.kind()),
        (Err(f), Err(m)) => prop_assert_eq!(f.field(), m.field(), "{}", text),
        _ => prop_assert!(
            false,
            "fast {:?} vs full {:?} for {}",
            fast.is_ok(),
            full.is_ok(),
            text
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,300}") {
        let _ = Message::decode(&text, 1 << 20);
    }

    #[test]
    fn arbitrary_json_envelopes_never_panic(v in json_value(), kind in prop::sample::select(MESSAGE_TYPES.to_vec())) {
        let mut v = v;
        if let Value::Object(m) = &mut v {
            m.insert("v".into(), Value::from(1));
            m.insert("type".into(), Value::from(kind));
        }
        agree(&v.to_string())?;
        if let Ok(msg) = Message::decode(&v.to_string(), 1 << 20) {
            let again = Message::decode(&msg.encode(), 1 << 20).expect("re-encoded frame decodes");
            prop_assert_eq!(again, msg);
        }
    }

    #[test]
    fn mangled_examples_never_panic(idx in 0usize..MESSAGE_TYPES.len(), cut in 0usize..400, byte in any::<u8>()) {
        let kind = MESSAGE_TYPES[idx];
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{kind}.json"));
        let mut bytes = std::fs::read(path).expect("example");
        if !bytes.is_empty() {
            let i = cut % bytes.len();
            bytes[i] = byte;
            bytes.truncate(bytes.len() - (cut % 3));
        }
        let text = String::from_utf8_lossy(&bytes);
        agree(&text)?;
    }
}
