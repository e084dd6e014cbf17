//! Payload field encryption: AES-256-GCM (openssl) under a data key named by `kid`.
//!
//! A sensitive field's value (any JSON) is replaced by the string
//! `enc:v1:<kid>:<base64(iv ‖ ciphertext ‖ tag)>`; the associated data binds it to the event's
//! clinic, entity and key, so a ciphertext moved to another row or clinic fails its tag. Old keys
//! stay configured after a rotation so older events keep decrypting.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use serde_json::{Map, Value};
use tether_actors::ports::{ChangeSource, PayloadCipher, PortError, SealError};
use tether_schemas::{Event, RawEvent};

use super::safe_id;

const PREFIX: &str = "enc:v1:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("data key {kid} ({path}): {message}")]
    Key {
        kid: String,
        path: String,
        message: String,
    },
    #[error("unknown data key kid {0}")]
    UnknownKid(String),
    #[error("malformed encrypted value in field {0}")]
    Malformed(String),
    #[error("authentication tag check failed for field {0} (wrong key, or moved/altered data)")]
    BadTag(String),
    #[error("encrypting field {0}: {1}")]
    Encrypt(String, String),
    #[error("field {0} is listed as encrypted but does not hold an `enc:v1:` value")]
    NotEncrypted(String),
    #[error("field {field} is encrypted under data key {kid}, which is not configured here")]
    FieldKid { field: String, kid: String },
}

impl CryptoError {
    /// The field at fault, if the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            CryptoError::Malformed(f)
            | CryptoError::BadTag(f)
            | CryptoError::Encrypt(f, _)
            | CryptoError::NotEncrypted(f)
            | CryptoError::FieldKid { field: f, .. } => Some(f),
            CryptoError::Key { .. } | CryptoError::UnknownKid(_) => None,
        }
    }
}

/// Data keys by kid, with the one used for new encryptions.
#[derive(Clone, Default)]
pub struct DataKeys {
    keys: HashMap<String, [u8; 32]>,
    active: Option<String>,
}

impl DataKeys {
    /// Reads a base64 key file (`tether keys data-key`).
    pub fn add_file(&mut self, kid: &str, path: &Path) -> Result<(), CryptoError> {
        let err = |message: String| CryptoError::Key {
            kid: kid.into(),
            path: path.display().to_string(),
            message,
        };
        if !safe_id(kid, 64) {
            return Err(err("kid must be letters, digits, - _ .".into()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let raw = openssl::base64::decode_block(text.trim()).map_err(|e| err(e.to_string()))?;
        let key: [u8; 32] = raw
            .try_into()
            .map_err(|_| err("must hold 32 bytes (AES-256)".into()))?;
        self.keys.insert(kid.into(), key);
        Ok(())
    }

    pub fn set_active(&mut self, kid: &str) -> Result<(), CryptoError> {
        if !self.keys.contains_key(kid) {
            return Err(CryptoError::UnknownKid(kid.into()));
        }
        self.active = Some(kid.into());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn aad(clinic: &str, entity: &str, key: &Map<String, Value>) -> Vec<u8> {
    // serde_json's Map is ordered by key, so both sides serialise the key identically.
    let key = serde_json::to_string(key).unwrap_or_default();
    format!("tether/v1\n{clinic}\n{entity}\n{key}").into_bytes()
}

/// The associated data of a channel message's encrypted fields.
fn channel_aad(clinic: &str, channel: &str, message_id: &str) -> Vec<u8> {
    format!("tether/channel/v1\n{clinic}\n{channel}\n{message_id}").into_bytes()
}

/// A value's ciphertext (after the `enc:v1:` prefix), if it is one.
pub fn sealed(v: &Value) -> Option<&str> {
    v.as_str().and_then(|s| s.strip_prefix(PREFIX))
}

/// `enc:v1:<kid>:<base64(iv ‖ ciphertext ‖ tag)>` of `v` (any JSON) under `key`.
fn seal_value(
    kid: &str,
    key: &[u8; 32],
    aad: &[u8],
    v: &Value,
    field: &str,
) -> Result<String, CryptoError> {
    let fail = |e: String| CryptoError::Encrypt(field.to_string(), e);
    let plain = serde_json::to_vec(v).map_err(|e| fail(e.to_string()))?;
    let mut iv = [0u8; 12];
    openssl::rand::rand_bytes(&mut iv).map_err(|e| fail(e.to_string()))?;
    let mut tag = [0u8; 16];
    let ct = encrypt_aead(Cipher::aes_256_gcm(), key, Some(&iv), aad, &plain, &mut tag)
        .map_err(|e| fail(e.to_string()))?;
    let mut blob = Vec::with_capacity(12 + ct.len() + 16);
    blob.extend_from_slice(&iv);
    blob.extend_from_slice(&ct);
    blob.extend_from_slice(&tag);
    Ok(format!(
        "{PREFIX}{kid}:{}",
        openssl::base64::encode_block(&blob)
    ))
}

/// Loads data keys; `active` names the one used for new encryptions.
pub fn data_keys(
    cfg: &[crate::config::DataKeyConfig],
    active: Option<&str>,
) -> Result<DataKeys, CryptoError> {
    let mut keys = DataKeys::default();
    for k in cfg {
        keys.add_file(&k.kid, &k.file)?;
    }
    if let Some(a) = active {
        keys.set_active(a)?;
    }
    Ok(keys)
}

/// Encrypts and decrypts the configured fields of event rows.
#[derive(Clone)]
pub struct FieldCipher {
    keys: DataKeys,
    /// entity → sensitive field names.
    fields: HashMap<String, Vec<String>>,
}

impl FieldCipher {
    pub fn new(keys: DataKeys, fields: HashMap<String, Vec<String>>) -> Self {
        FieldCipher { keys, fields }
    }

    /// The active key and its kid.
    fn active_key(&self) -> Result<(&str, &[u8; 32]), CryptoError> {
        let kid = self
            .keys
            .active
            .as_deref()
            .ok_or_else(|| CryptoError::UnknownKid("(none active)".into()))?;
        let key = self
            .keys
            .keys
            .get(kid)
            .ok_or_else(|| CryptoError::UnknownKid(kid.to_string()))?;
        Ok((kid, key))
    }

    /// Whether new values can be encrypted (a key is active).
    pub fn can_encrypt(&self) -> bool {
        self.active_key().is_ok()
    }

    pub fn encrypt_event(&self, clinic: &str, ev: &mut Event) -> Result<(), CryptoError> {
        let Some(fields) = self.fields.get(&ev.entity) else {
            return Ok(());
        };
        let Some(row) = ev.row.as_mut() else {
            return Ok(());
        };
        let aad = aad(clinic, &ev.entity, &ev.key);
        self.seal_fields(&aad, row, fields)
    }

    /// Encrypts the listed fields of `row` (absent and null ones are left) under the active key.
    fn seal_fields(
        &self,
        aad: &[u8],
        row: &mut Map<String, Value>,
        fields: &[String],
    ) -> Result<(), CryptoError> {
        let (kid, key) = self.active_key()?;
        for f in fields {
            let Some(v) = row.get_mut(f) else { continue };
            if v.is_null() {
                continue;
            }
            *v = Value::String(seal_value(kid, key, aad, v, f)?);
        }
        Ok(())
    }

    /// The plaintext of one encrypted value (`s` without its prefix) of field `name`.
    fn open_value(&self, aad: &[u8], name: &str, s: &str) -> Result<Value, CryptoError> {
        let (kid, b64) = s
            .split_once(':')
            .ok_or_else(|| CryptoError::Malformed(name.to_string()))?;
        let key = self
            .keys
            .keys
            .get(kid)
            .ok_or_else(|| CryptoError::UnknownKid(kid.to_string()))?;
        let blob = openssl::base64::decode_block(b64)
            .map_err(|_| CryptoError::Malformed(name.to_string()))?;
        if blob.len() < 28 {
            return Err(CryptoError::Malformed(name.to_string()));
        }
        let (iv, rest) = blob.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let plain = decrypt_aead(Cipher::aes_256_gcm(), key, Some(iv), aad, ct, tag)
            .map_err(|_| CryptoError::BadTag(name.to_string()))?;
        serde_json::from_slice(&plain).map_err(|_| CryptoError::Malformed(name.to_string()))
    }

    /// Decrypts every encrypted field in place. On error the event is left untouched.
    pub fn decrypt_event(&self, clinic: &str, ev: &mut Event) -> Result<usize, CryptoError> {
        let Some(row) = ev.row.as_ref() else {
            return Ok(0);
        };
        let aad = aad(clinic, &ev.entity, &ev.key);
        let mut out = Vec::new();
        for (name, v) in row {
            let Some(s) = sealed(v) else { continue };
            out.push((name.clone(), self.open_value(&aad, name, s)?));
        }
        let n = out.len();
        if let Some(row) = ev.row.as_mut() {
            for (k, v) in out {
                row.insert(k, v);
            }
        }
        Ok(n)
    }

    /// Encrypts a channel message's listed payload fields under the active key, bound to the
    /// clinic, the channel and the message id.
    pub fn seal_channel(
        &self,
        clinic: &str,
        channel: &str,
        message_id: &str,
        payload: &mut Map<String, Value>,
        fields: &[String],
    ) -> Result<(), CryptoError> {
        self.seal_fields(&channel_aad(clinic, channel, message_id), payload, fields)
    }

    /// Decrypts a channel message's listed payload fields in place (absent and null ones are
    /// left). A listed field holding anything but a ciphertext is refused
    /// ([`CryptoError::NotEncrypted`]). On error the payload is left untouched.
    pub fn open_channel(
        &self,
        clinic: &str,
        channel: &str,
        message_id: &str,
        payload: &mut Map<String, Value>,
        fields: &[String],
    ) -> Result<usize, CryptoError> {
        let aad = channel_aad(clinic, channel, message_id);
        let mut out = Vec::new();
        for f in fields {
            let Some(v) = payload.get(f) else { continue };
            if v.is_null() {
                continue;
            }
            let s = sealed(v).ok_or_else(|| CryptoError::NotEncrypted(f.clone()))?;
            let plain = self.open_value(&aad, f, s).map_err(|e| match e {
                CryptoError::UnknownKid(kid) => CryptoError::FieldKid {
                    field: f.clone(),
                    kid,
                },
                other => other,
            })?;
            out.push((f.clone(), plain));
        }
        let n = out.len();
        for (k, v) in out {
            payload.insert(k, v);
        }
        Ok(n)
    }

    /// [`Self::decrypt_event`] for an event as the gateway receives it (key and row as JSON
    /// text). A row that holds no encrypted value is left as it is without being parsed; one
    /// that does is parsed, decrypted and encoded again.
    pub fn decrypt_raw(&self, clinic: &str, ev: &mut RawEvent) -> Result<usize, CryptoError> {
        let Some(raw) = ev.row.as_deref() else {
            return Ok(0);
        };
        // `\u` escapes could spell the prefix: such a row takes the parsing path.
        if !raw.get().contains(PREFIX) && !raw.get().contains("\\u") {
            return Ok(0);
        }
        let key: Map<String, Value> =
            serde_json::from_str(ev.key.get()).map_err(|_| CryptoError::Malformed("key".into()))?;
        let row: Map<String, Value> =
            serde_json::from_str(raw.get()).map_err(|_| CryptoError::Malformed("row".into()))?;
        let mut event = Event {
            seq: ev.seq,
            entity: ev.entity.clone(),
            op: ev.op,
            key,
            row: Some(row),
            committed_at: String::new(),
        };
        let n = self.decrypt_event(clinic, &mut event)?;
        if n > 0 {
            ev.row = event
                .row
                .as_ref()
                .map(serde_json::value::to_raw_value)
                .transpose()
                .map_err(|_| CryptoError::Malformed("row".into()))?;
        }
        Ok(n)
    }
}

/// A [`ChangeSource`] that encrypts sensitive fields before events leave the clinic.
pub struct EncryptingSource {
    inner: Arc<dyn ChangeSource>,
    cipher: FieldCipher,
    clinic: String,
}

impl EncryptingSource {
    pub fn new(inner: Arc<dyn ChangeSource>, cipher: FieldCipher, clinic: &str) -> Self {
        EncryptingSource {
            inner,
            cipher,
            clinic: clinic.into(),
        }
    }
}

impl ChangeSource for EncryptingSource {
    fn change_token(&self) -> Result<u64, PortError> {
        self.inner.change_token()
    }

    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, PortError> {
        let mut events = self.inner.read_after(after, limit)?;
        for ev in &mut events {
            self.cipher
                .encrypt_event(&self.clinic, ev)
                .map_err(|e| PortError::new(format!("seq {}: {e}", ev.seq)))?;
        }
        Ok(events)
    }

    fn backlog(&self, after: u64) -> Result<tether_actors::ports::Backlog, PortError> {
        self.inner.backlog(after)
    }
}

/// The agent's [`PayloadCipher`]: channel fields under its data keys, bound to its clinic.
pub struct ChannelCipher {
    cipher: FieldCipher,
    clinic: String,
}

impl ChannelCipher {
    pub fn new(keys: DataKeys, clinic: &str) -> Self {
        ChannelCipher {
            cipher: FieldCipher::new(keys, HashMap::new()),
            clinic: clinic.into(),
        }
    }
}

fn seal_error(e: CryptoError) -> SealError {
    SealError {
        field: e.field().map(str::to_string),
        message: e.to_string(),
    }
}

impl PayloadCipher for ChannelCipher {
    fn seal(
        &self,
        channel: &str,
        message_id: &str,
        payload: &mut Map<String, Value>,
        fields: &[String],
    ) -> Result<(), SealError> {
        self.cipher
            .seal_channel(&self.clinic, channel, message_id, payload, fields)
            .map_err(seal_error)
    }

    fn open(
        &self,
        channel: &str,
        message_id: &str,
        payload: &mut Map<String, Value>,
        fields: &[String],
    ) -> Result<(), SealError> {
        self.cipher
            .open_channel(&self.clinic, channel, message_id, payload, fields)
            .map(|_| ())
            .map_err(seal_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tether_schemas::Op;

    fn keys(dir: &Path, kids: &[&str]) -> DataKeys {
        let mut k = DataKeys::default();
        for kid in kids {
            let p = dir.join(format!("{kid}.key"));
            super::super::keys::write_data_key(&p).expect("key");
            k.add_file(kid, &p).expect("add");
        }
        k
    }

    fn event() -> Event {
        Event {
            seq: 1,
            entity: "patient".into(),
            op: Op::Insert,
            key: json!({"id": 7}).as_object().cloned().unwrap_or_default(),
            row: json!({"id": 7, "name": "Ana Silva", "national_id": "NID-1", "phone": "555"})
                .as_object()
                .cloned(),
            committed_at: "t".into(),
        }
    }

    fn cipher(k: DataKeys) -> FieldCipher {
        FieldCipher::new(
            k,
            HashMap::from([(
                "patient".to_string(),
                vec!["name".to_string(), "national_id".to_string()],
            )]),
        )
    }

    #[test]
    fn round_trip_hides_plaintext_and_binds_to_the_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut k = keys(dir.path(), &["dk1", "dk2"]);
        k.set_active("dk1").expect("active");
        let c = cipher(k.clone());
        let mut ev = event();
        c.encrypt_event("clinic-1", &mut ev).expect("encrypt");
        let text = serde_json::to_string(&ev).expect("json");
        assert!(
            !text.contains("Ana Silva") && !text.contains("NID-1"),
            "{text}"
        );
        assert!(text.contains("555"), "other fields stay clear");
        let mut moved = ev.clone();
        assert_eq!(c.decrypt_event("clinic-1", &mut ev).expect("decrypt"), 2);
        assert_eq!(ev.row.as_ref().expect("row")["name"], json!("Ana Silva"));
        // The same ciphertext presented for another clinic or row fails its tag.
        assert!(matches!(
            c.decrypt_event("clinic-2", &mut moved.clone()),
            Err(CryptoError::BadTag(_))
        ));
        moved.key.insert("id".into(), json!(8));
        assert!(matches!(
            c.decrypt_event("clinic-1", &mut moved),
            Err(CryptoError::BadTag(_))
        ));
        // After rotation to dk2, dk1 ciphertexts still decrypt; without dk1 they are refused.
        let mut rotated = k.clone();
        rotated.set_active("dk2").expect("rotate");
        let mut old = event();
        cipher(k)
            .encrypt_event("clinic-1", &mut old)
            .expect("encrypt");
        let mut again = old.clone();
        assert_eq!(
            cipher(rotated)
                .decrypt_event("clinic-1", &mut old)
                .expect("old key"),
            2
        );
        let only_dk2 = keys(dir.path(), &["dk2"]);
        assert_eq!(
            cipher(only_dk2).decrypt_event("clinic-1", &mut again),
            Err(CryptoError::UnknownKid("dk1".into()))
        );
    }

    #[test]
    fn channel_fields_are_sealed_for_one_clinic_channel_and_message_and_refused_by_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut k = keys(dir.path(), &["dk1"]);
        k.set_active("dk1").expect("active");
        let c = FieldCipher::new(k, HashMap::new());
        let fields = vec!["caller".to_string(), "patient_id".to_string()];
        let plain =
            json!({"call_id": "c1", "caller": "+1-555-0100", "patient_id": 42, "line": null})
                .as_object()
                .cloned()
                .unwrap_or_default();
        let mut sealed = plain.clone();
        c.seal_channel("clinic-1", "voip.call", "m1", &mut sealed, &fields)
            .expect("seal");
        let text = serde_json::to_string(&sealed).expect("json");
        assert!(!text.contains("555") && !text.contains("42"), "{text}");
        assert!(sealed["caller"]
            .as_str()
            .is_some_and(|s| s.starts_with("enc:v1:dk1:")));
        assert_eq!(sealed["call_id"], json!("c1"), "unlisted fields stay clear");
        let mut opened = sealed.clone();
        assert_eq!(
            c.open_channel("clinic-1", "voip.call", "m1", &mut opened, &fields),
            Ok(2)
        );
        assert_eq!(opened, plain, "the integer comes back an integer");
        // Bound to the clinic, the channel and the message id.
        for (clinic, channel, id) in [
            ("clinic-2", "voip.call", "m1"),
            ("clinic-1", "other", "m1"),
            ("clinic-1", "voip.call", "m2"),
        ] {
            let mut moved = sealed.clone();
            assert!(
                matches!(
                    c.open_channel(clinic, channel, id, &mut moved, &fields),
                    Err(CryptoError::BadTag(_))
                ),
                "{clinic} {channel} {id}"
            );
            assert_eq!(moved, sealed, "left untouched on error");
        }
        // A listed field in clear is refused by name; an unknown key names the field.
        let mut clear = plain.clone();
        let e = c
            .open_channel("clinic-1", "voip.call", "m1", &mut clear, &fields)
            .expect_err("clear");
        assert_eq!(e, CryptoError::NotEncrypted("caller".into()));
        assert_eq!(e.field(), Some("caller"));
        let other = FieldCipher::new(keys(dir.path(), &["dk9"]), HashMap::new());
        let e = other
            .open_channel("clinic-1", "voip.call", "m1", &mut sealed.clone(), &fields)
            .expect_err("no key");
        assert_eq!(
            e,
            CryptoError::FieldKid {
                field: "caller".into(),
                kid: "dk1".into()
            }
        );
        assert!(!e.to_string().contains("555"));
        // No active key: nothing can be sealed.
        assert!(!other.can_encrypt());
        assert!(other
            .seal_channel("clinic-1", "voip.call", "m1", &mut plain.clone(), &fields)
            .is_err());
    }
}
