//! The clinic registry in force, changed without a restart.
//!
//! The registry is the directory `gateway.auth.clinics_dir` (one `*.yaml` entry per clinic).
//! Every `gateway.auth.reload_interval` this node reads the directory; when its contents
//! changed it loads the whole registry again and puts it in force at once: a new clinic's next
//! handshake is accepted, a removed or revoked key's live sessions are closed (1008) and its
//! next handshake refused. A directory that does not load (a file that does not parse, a kid
//! registered twice) changes nothing: the registry in force stays, and the error names the
//! file, once per bad version. `PUT`/`DELETE /v1/registry/clinics/{id}` write the directory
//! and reload at once.
//!
//! Each node reads its own `clinics_dir`: in a cluster, give every node the same files (a
//! shared volume, or your configuration management), or call the REST API on every node.

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
    registry_files, ClinicInfo, ClinicRegistry, JwtError, RegistryChange, RegistryEntry,
};

/// Where the registry comes from and how often it is read.
#[derive(Debug, Clone)]
pub struct RegistrySource {
    pub dir: PathBuf,
    pub interval: Duration,
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
    let (print, loaded) = match fingerprint(&src.dir) {
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
    let loaded = loaded.unwrap_or_else(|| ClinicRegistry::load_dir(&src.dir));
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

/// Polls the directory every `interval` for as long as the gateway runs.
pub fn start(state: web::Data<GatewayState>) {
    let Some(src) = state.security.registry_source.clone() else {
        return;
    };
    // The registry in force was loaded at start: remember its version.
    if let Ok(print) = fingerprint(&src.dir) {
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

/// The entry as its file holds it now (public keys included), to change and `put` back.
pub fn entry_of(info: &ClinicInfo) -> Result<RegistryEntry, WriteError> {
    let text = std::fs::read_to_string(&info.file)
        .map_err(|e| WriteError::Io(format!("{}: {e}", info.file)))?;
    serde_saphyr::from_str(&text).map_err(|e| WriteError::Invalid {
        field: "registry".into(),
        message: format!("{}: {e}", info.file),
    })
}

/// Writes `text` to `path` whole (a temporary file renamed over it).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
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
