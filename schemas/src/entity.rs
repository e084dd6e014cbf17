//! Optional per-entity JSON Schemas: `<dir>/<entity>.schema.json` describes the `row` of that
//! entity's events. Adding an event type is config plus, optionally, one of these files.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

/// Compiled entity schemas, keyed by entity name.
#[derive(Default)]
pub struct EntitySchemas {
    validators: HashMap<String, jsonschema::Validator>,
}

#[derive(Debug, thiserror::Error)]
pub enum EntitySchemaError {
    #[error("reading entity schema {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("entity schema {path} is not valid JSON: {message}")]
    Json { path: String, message: String },
    #[error("entity schema {path} is not a valid JSON Schema: {message}")]
    Schema { path: String, message: String },
    #[error("{entity} row does not match its schema at `{field}`: {message}")]
    Invalid {
        entity: String,
        field: String,
        message: String,
    },
}

impl EntitySchemas {
    /// Loads every `*.schema.json` in `dir`. A missing directory means "no entity schemas".
    pub fn load_dir(dir: &Path) -> Result<Self, EntitySchemaError> {
        let mut validators = HashMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(EntitySchemaError::Io {
                    path: dir.display().to_string(),
                    source,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(|source| EntitySchemaError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(entity) = name.strip_suffix(".schema.json") else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|source| EntitySchemaError::Io {
                path: path.display().to_string(),
                source,
            })?;
            validators.insert(
                entity.to_string(),
                compile(&path.display().to_string(), &text)?,
            );
        }
        Ok(Self { validators })
    }

    /// Adds one schema from text (tests, embedded defaults).
    pub fn insert(&mut self, entity: &str, schema_text: &str) -> Result<(), EntitySchemaError> {
        let v = compile(entity, schema_text)?;
        self.validators.insert(entity.to_string(), v);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.validators.len()
    }

    pub fn is_empty(&self) -> bool {
        self.validators.is_empty()
    }

    /// Whether `entity` has a schema (rows of other entities are not checked).
    pub fn covers(&self, entity: &str) -> bool {
        self.validators.contains_key(entity)
    }

    /// Checks a row given as JSON text against its entity's schema (parsed only when the
    /// entity has one).
    pub fn validate_text(&self, entity: &str, row: &str) -> Result<(), EntitySchemaError> {
        if !self.covers(entity) {
            return Ok(());
        }
        let row: Value = serde_json::from_str(row).map_err(|e| EntitySchemaError::Invalid {
            entity: entity.to_string(),
            field: String::new(),
            message: format!("not JSON at line {} column {}", e.line(), e.column()),
        })?;
        self.validate(entity, &row)
    }

    /// Checks a row against its entity's schema; entities without a schema pass.
    pub fn validate(&self, entity: &str, row: &Value) -> Result<(), EntitySchemaError> {
        let Some(v) = self.validators.get(entity) else {
            return Ok(());
        };
        match v.iter_errors(row).next() {
            None => Ok(()),
            Some(err) => {
                // The message of a jsonschema error quotes the offending value: say it in
                // terms of field names, types and keywords only, so that no row data reaches a
                // log or an error frame.
                use jsonschema::error::{TypeKind, ValidationErrorKind as K};
                let at = err.instance_path().to_string();
                let (field, message) = match err.kind() {
                    K::Required { property } => (
                        format!("{at}/{}", property.as_str().unwrap_or("?")),
                        "is required and missing".to_string(),
                    ),
                    K::AdditionalProperties { unexpected } => (
                        at,
                        format!(
                            "has fields the schema does not allow: {}",
                            unexpected.join(", ")
                        ),
                    ),
                    K::Type {
                        kind: TypeKind::Single(t),
                    } => (at, format!("must be of type {t}")),
                    _ => (
                        at,
                        format!("violates `{}`", keyword_of(&err.schema_path().to_string())),
                    ),
                };
                Err(EntitySchemaError::Invalid {
                    entity: entity.to_string(),
                    field,
                    message,
                })
            }
        }
    }
}

fn keyword_of(schema_path: &str) -> String {
    schema_path
        .rsplit('/')
        .find(|s| !s.is_empty() && s.parse::<usize>().is_err())
        .unwrap_or("schema")
        .to_string()
}

fn compile(path: &str, text: &str) -> Result<jsonschema::Validator, EntitySchemaError> {
    let schema: Value = serde_json::from_str(text).map_err(|e| EntitySchemaError::Json {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    jsonschema::validator_for(&schema).map_err(|e| EntitySchemaError::Schema {
        path: path.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn row_violating_schema_names_field_without_value() {
        let mut s = EntitySchemas::default();
        s.insert(
            "patient",
            r#"{"type":"object","required":["id"],"properties":{"id":{"type":"integer"}}}"#,
        )
        .expect("schema");
        assert!(s.validate("patient", &json!({"id": 4})).is_ok());
        let err = s
            .validate("patient", &json!({"id": "SECRET-VALUE"}))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/id"), "{text}");
        assert!(!text.contains("SECRET-VALUE"), "{text}");
        assert!(s.validate("unknown_entity", &json!(1)).is_ok());
        assert!(text.contains("must be of type integer"), "{text}");
    }

    #[test]
    fn a_missing_or_unexpected_field_is_named_itself() {
        let mut s = EntitySchemas::default();
        s.insert(
            "patient",
            r#"{"type":"object","required":["id","name"],"additionalProperties":false,
                "properties":{"id":{"type":"integer"},"name":{"type":"string"}}}"#,
        )
        .expect("schema");
        let missing = s
            .validate("patient", &json!({"id": 4}))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/name"), "{missing}");
        assert!(missing.contains("is required and missing"), "{missing}");
        let extra = s
            .validate(
                "patient",
                &json!({"id": 4, "name": "SECRET", "nickname": "SECRET"}),
            )
            .unwrap_err()
            .to_string();
        assert!(extra.contains("nickname"), "{extra}");
        assert!(!extra.contains("SECRET"), "{extra}");
    }
}
