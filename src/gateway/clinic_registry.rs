//! The clinic registry in force, changed without a restart.
//!
//! It comes from one of two places (`gateway.auth.registry`):
//!
//! - `dir` (default): the directory `gateway.auth.clinics_dir` (one `*.yaml` entry per clinic).
//!   Every `gateway.auth.reload_interval` this node reads the directory; when its contents
//!   changed it loads the whole registry again. Each node reads its own directory: in a
//!   cluster, give every node the same files (a shared volume, or configuration management).
//! - `store`: the gateway's store (table `clinic_registry`, versioned), shared by every node on
//!   it. A change made on any node (REST, enrolment) signals the others (PostgreSQL `NOTIFY`)
//!   and each polls the version every `reload_interval` as well. At start, entries in
//!   `clinics_dir` (if it exists) for clinics the store does not hold are imported once.
//!
//! Either way the new registry is put in force at once: a new clinic's next handshake is
//! accepted, a removed or revoked key's live sessions are closed (1008) and its next handshake
//! refused. A registry that does not load (an entry that does not parse, a kid registered
//! twice) changes nothing: the registry in force stays, and the error is said once per bad
//! version. `PUT`/`DELETE /v1/registry/clinics/{id}` (and enrolment) write the source and
//! reload at once.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use actix_web::web;
use tether_actors::log_target::{AUDIT, ERROR};
use tether_actors::registry::{SessionCommand, ToClinic};

use super::GatewayState;
use crate::security::jwt::{
    read_entry, registry_files, ClinicInfo, ClinicRegistry, JwtError, RegistryChange, RegistryEntry,
};

/// Where the registry comes from and how often it is read.
#[derive(Debug, Clone)]
pub struct RegistrySource {
    /// `clinics_dir`: the registry (`store: false`), or the entries imported at start.
    pub dir: PathBuf,
    pub interval: Duration,
    /// The registry is kept in the gateway's store (`gateway.auth.registry: store`).
    pub store: bool,
}

fn store_error(e: impl std::fmt::Display) -> JwtError {
    JwtError::Registry {
        path: "store".into(),
        message: e.to_string(),
    }
}

/// The source's version: the registry store's counter, or a hash of the directory's files.
fn version(state: &GatewayState, src: &RegistrySource) -> Result<u64, JwtError> {
    if src.store {
        super::store::wait(state.store.registry_version()).map_err(store_error)
    } else {
        fingerprint(&src.dir)
    }
}

/// Every entry the store holds, as a registry.
fn load_store(state: &GatewayState) -> Result<ClinicRegistry, JwtError> {
    let (_, rows) = super::store::wait(state.store.registry_entries()).map_err(store_error)?;
    let mut reg = ClinicRegistry::default();
    for (clinic, json) in rows {
        let label = format!("store:{clinic}");
        let entry: RegistryEntry = serde_json::from_str(&json).map_err(|e| JwtError::Registry {
            path: label.clone(),
            message: e.to_string(),
        })?;
        reg.add(entry, &label)?;
    }
    Ok(reg)
}

fn load(state: &GatewayState, src: &RegistrySource) -> Result<ClinicRegistry, JwtError> {
    if src.store {
        load_store(state)
    } else {
        ClinicRegistry::load_dir(&src.dir)
    }
}

/// Store registry: imports the entries of `clinics_dir` (if it exists) whose clinic the store
/// does not hold, then loads the store's registry. Blocking; at start.
fn seed_store(state: &GatewayState, src: &RegistrySource) -> Result<(), JwtError> {
    let (_, rows) = super::store::wait(state.store.registry_entries()).map_err(store_error)?;
    let held: std::collections::HashSet<String> = rows.into_iter().map(|(c, _)| c).collect();
    let mut imported = Vec::new();
    if src.dir.is_dir() {
        for p in registry_files(&src.dir)? {
            let entry = read_entry(&p)?;
            if held.contains(&entry.clinic_id) {
                continue;
            }
            // Checked alone before it is written (keys parse, ids are safe).
            ClinicRegistry::default().add(entry.clone(), &p.display().to_string())?;
            let json = serde_json::to_string(&entry).map_err(store_error)?;
            super::store::wait(state.store.put_registry_entry(&entry.clinic_id, &json))
                .map_err(store_error)?;
            imported.push(entry.clinic_id);
        }
    }
    if !imported.is_empty() {
        log::info!(target: AUDIT, "event=registry_imported from={:?} clinics={:?}", src.dir.display().to_string(), imported.join(","));
    }
    Ok(())
}

/// The version of the directory last put in force (or last refused), so a bad file is reported
/// once, not on every poll. Serialises reloads (the poll and REST writes).
#[derive(Default)]
pub struct Reloads {
    last: Mutex<Option<u64>>,
}

/// A hash of every registry file's name and contents.
fn fingerprint(dir: &Path) -> Result<u64, JwtError> {
    let mut h = DefaultHasher::new();
    for p in registry_files(dir)? {
        p.hash(&mut h);
        match std::fs::read(&p) {
            Ok(bytes) => bytes.hash(&mut h),
            // Removed between the listing and the read: the next poll sees it gone.
            Err(e) => e.kind().hash(&mut h),
        }
    }
    Ok(h.finish())
}

/// Reads the directory and, if it changed since the last reload (or `force`), puts the new
/// registry in force and closes the sessions of withdrawn keys. Blocking (file reads, key
/// parsing): call from a blocking thread. `None`: nothing changed.
pub fn reload(
    state: &GatewayState,
    src: &RegistrySource,
    force: bool,
    why: &str,
) -> Result<Option<RegistryChange>, JwtError> {
    let Some(verifier) = &state.security.verifier else {
        return Ok(None);
    };
    let reloads = &state.registry_reloads;
    let mut last = reloads.last.lock().unwrap_or_else(|p| p.into_inner());
    // An unreadable directory is a version too: said once, not on every poll.
    let (print, loaded) = match version(state, src) {
        Ok(p) => (p, None),
        Err(e) => {
            let mut h = DefaultHasher::new();
            e.to_string().hash(&mut h);
            (h.finish(), Some(Err(e)))
        }
    };
    if !force && *last == Some(print) {
        return Ok(None);
    }
    *last = Some(print);
    let loaded = loaded.unwrap_or_else(|| load(state, src));
    let next = match loaded {
        Ok(r) => r,
        Err(e) => {
            state
                .metrics
                .add(&state.metrics.registry_reload_failures, 1);
            log::error!(target: ERROR, "event=registry_reload_refused trigger={why} error={:?} action=\"the registry in force stays\"", e.to_string());
            return Err(e);
        }
    };
    let (clinics, keys) = (next.clinics().len(), next.len());
    let change = verifier.replace(next);
    state.metrics.add(&state.metrics.registry_reloads, 1);
    let withdrawn: Vec<String> = change
        .keys_withdrawn
        .iter()
        .flat_map(|(c, ks)| ks.iter().map(move |k| format!("{c}/{k}")))
        .collect();
    log::info!(target: AUDIT, "event=registry_reloaded trigger={why} clinics={clinics} keys={keys} clinics_added={:?} clinics_removed={:?} keys_added={:?} keys_withdrawn={:?}", change.clinics_added.join(","), change.clinics_removed.join(","), change.keys_added.join(","), withdrawn.join(","));
    for (clinic, kids) in &change.keys_withdrawn {
        state.registry.do_send(ToClinic {
            clinic_id: clinic.clone(),
            cmd: SessionCommand::Revoked { kids: kids.clone() },
        });
    }
    Ok(Some(change))
}

/// Loads a store registry (imported from `clinics_dir` the first time), then polls the source
/// every `interval` for as long as the gateway runs. Blocking at first: call before serving.
pub fn start(state: web::Data<GatewayState>) -> Result<(), JwtError> {
    let Some(src) = state.security.registry_source.clone() else {
        return Ok(());
    };
    if src.store {
        seed_store(&state, &src)?;
        // A registry that does not load stops the start (the gateway would refuse everyone).
        reload(&state, &src, true, "start")?;
    } else if let Ok(print) = fingerprint(&src.dir) {
        // The registry in force was loaded at start: remember its version.
        *state
            .registry_reloads
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(print);
    }
    actix::spawn(async move {
        let mut tick = tokio::time::interval(src.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (st, s) = (state.clone(), src.clone());
            // A refusal is logged and counted inside; the registry in force stays.
            let _ = web::block(move || reload(&st, &s, false, "poll")).await;
        }
    });
    Ok(())
}

/// Another node changed the store's registry: load it now (not at the next poll).
pub async fn on_signal(state: web::Data<GatewayState>) {
    let Some(src) = state.security.registry_source.clone() else {
        return;
    };
    if src.store {
        let _ = web::block(move || reload(&state, &src, false, "notify")).await;
    }
}

/// Why a registry write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the gateway has no clinic registry (gateway.auth is not configured)")]
    NoRegistry,
    #[error("clinic {0} is not in the registry")]
    NotFound(String),
    /// The entry (field named) is wrong: nothing was written.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Io(String),
}

/// An entry as YAML, in the layout `tether keys registry-entry` prints. Strings are written as
/// JSON strings, which YAML reads as double-quoted scalars.
fn entry_yaml(e: &RegistryEntry) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut out = format!("clinic_id: {}\n", q(&e.clinic_id));
    if e.revoked {
        out.push_str("revoked: true\n");
    }
    if !e.labels.is_empty() {
        out.push_str("labels:\n");
        for (k, v) in &e.labels {
            out.push_str(&format!("  {}: {}\n", q(k), q(v)));
        }
    }
    out.push_str("keys:\n");
    for k in &e.keys {
        out.push_str(&format!("  - kid: {}\n", q(&k.kid)));
        let algs: Vec<String> = k.algorithms.iter().map(|a| q(a)).collect();
        out.push_str(&format!("    algorithms: [{}]\n", algs.join(", ")));
        if k.revoked {
            out.push_str("    revoked: true\n");
        }
        out.push_str("    public_key: |\n");
        for line in k.public_key.trim().lines() {
            out.push_str(&format!("      {}\n", line.trim()));
        }
    }
    out
}

/// The entry as it was loaded (public keys included), to change and `put` back.
pub fn entry_of(info: &ClinicInfo) -> RegistryEntry {
    (*info.entry).clone()
}

/// Writes `text` to `path` whole (a temporary file renamed over it).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Writes one entry to the store's registry (every node is signalled).
fn store_put(state: &GatewayState, entry: &RegistryEntry) -> Result<(), WriteError> {
    let json = serde_json::to_string(entry).map_err(|e| WriteError::Invalid {
        field: "keys".into(),
        message: format!("does not serialise: {e}"),
    })?;
    super::store::wait(state.store.put_registry_entry(&entry.clinic_id, &json))
        .map(|_| ())
        .map_err(|e| WriteError::Io(format!("store: {e}")))
}

/// `PUT /v1/registry/clinics/{id}`: checks the entry against the registry in force (keys parse,
/// kids unique), writes it to the clinic's file (or `<dir>/<id>.yaml`) and puts it in force.
/// Blocking. Returns whether the clinic is new.
pub fn put(state: &GatewayState, entry: RegistryEntry) -> Result<bool, WriteError> {
    let (Some(src), Some(verifier)) = (&state.security.registry_source, &state.security.verifier)
    else {
        return Err(WriteError::NoRegistry);
    };
    let current = verifier.registry();
    let existing = current
        .clinics()
        .get(&entry.clinic_id)
        .map(|c| c.file.clone());
    let path = existing
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| src.dir.join(format!("{}.yaml", entry.clinic_id)));
    let text = entry_yaml(&entry);
    // The file must read back as the entry, and the registry with it must hold together.
    let back: RegistryEntry = serde_saphyr::from_str(&text).map_err(|e| WriteError::Invalid {
        field: "keys".into(),
        message: format!("does not serialise: {e}"),
    })?;
    for k in &back.keys {
        let taken = current
            .clinics()
            .values()
            .find(|c| c.clinic_id != entry.clinic_id && c.keys.iter().any(|o| o.kid == k.kid));
        if let Some(other) = taken {
            return Err(WriteError::Invalid {
                field: "keys.kid".into(),
                message: format!("kid {} is registered for clinic {}", k.kid, other.clinic_id),
            });
        }
    }
    ClinicRegistry::default()
        .add(back, &path.display().to_string())
        .map_err(|e| WriteError::Invalid {
            field: "keys".into(),
            message: match e {
                JwtError::Registry { message, .. } => message,
                other => other.to_string(),
            },
        })?;
    if src.store {
        let before = current
            .clinics()
            .get(&entry.clinic_id)
            .map(|c| c.entry.clone());
        store_put(state, &entry)?;
        if let Err(e) = reload(state, src, true, "rest") {
            // Another entry does not load: put the store back as it was.
            let _ = match &before {
                Some(old) => store_put(state, old),
                None => super::store::wait(state.store.delete_registry_entry(&entry.clinic_id))
                    .map(|_| ())
                    .map_err(|e| WriteError::Io(e.to_string())),
            };
            return Err(WriteError::Invalid {
                field: "registry".into(),
                message: e.to_string(),
            });
        }
        return Ok(existing.is_none());
    }
    let before = std::fs::read_to_string(&path).ok();
    write_atomically(&path, &text)
        .map_err(|e| WriteError::Io(format!("{}: {e}", path.display())))?;
    if let Err(e) = reload(state, src, true, "rest") {
        // Another file in the directory does not load: put ours back as it was.
        let _ = match &before {
            Some(old) => write_atomically(&path, old),
            None => std::fs::remove_file(&path),
        };
        return Err(WriteError::Invalid {
            field: "registry".into(),
            message: e.to_string(),
        });
    }
    Ok(existing.is_none())
}

/// `DELETE /v1/registry/clinics/{id}`: removes the clinic's file and puts the registry without
/// it in force (its sessions close). Blocking.
pub fn delete(state: &GatewayState, clinic: &str) -> Result<(), WriteError> {
    let (Some(src), Some(verifier)) = (&state.security.registry_source, &state.security.verifier)
    else {
        return Err(WriteError::NoRegistry);
    };
    let current = verifier.registry();
    let info = current
        .clinics()
        .get(clinic)
        .ok_or_else(|| WriteError::NotFound(clinic.to_string()))?;
    if src.store {
        let before = info.entry.clone();
        let gone = super::store::wait(state.store.delete_registry_entry(clinic))
            .map_err(|e| WriteError::Io(format!("store: {e}")))?;
        if gone.is_none() {
            return Err(WriteError::NotFound(clinic.to_string()));
        }
        if let Err(e) = reload(state, src, true, "rest") {
            let _ = store_put(state, &before);
            return Err(WriteError::Invalid {
                field: "registry".into(),
                message: e.to_string(),
            });
        }
        return Ok(());
    }
    let path = PathBuf::from(&info.file);
    let before = std::fs::read_to_string(&path).ok();
    std::fs::remove_file(&path).map_err(|e| WriteError::Io(format!("{}: {e}", path.display())))?;
    if let Err(e) = reload(state, src, true, "rest") {
        if let Some(old) = before {
            let _ = write_atomically(&path, &old);
        }
        return Err(WriteError::Invalid {
            field: "registry".into(),
            message: e.to_string(),
        });
    }
    Ok(())
}
