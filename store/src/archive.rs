//! Kubernetes checkpoint archives: the tar layout written by the kubelet's checkpoint API
//! (through CRI-O or containerd) and read by checkpointctl:
//!
//! ```text
//! checkpoint/        CRIU's image files
//! config.dump        JSON: id, name, rootfsImage, rootfsImageRef, rootfsImageName, runtime,
//!                    createdTime, checkpointedTime, restoredTime, restored
//! spec.dump          the container's OCI runtime spec (JSON)
//! rootfs-diff.tar    files changed in the container's root file system (optional)
//! deleted.files      JSON array of paths deleted from it (optional)
//! ```
//!
//! Export writes a checkpoint stored in this layout as it is; a checkpoint stored as a bare
//! CRIU image directory goes under `checkpoint/`. Missing `config.dump` and `spec.dump` are
//! generated (containerd-style annotations, so checkpointctl shows the container, pod and
//! namespace); the store's metadata travel as `io.runc-architect.label.*` annotations.
//! Import streams the archive's entries straight into a new checkpoint (no extraction),
//! keeping the tree byte-exact, so exporting it again gives the same files.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, LockKind};
use crate::index::CheckpointInfo;
use crate::ingest::PutOutcome;
use crate::manifest::EntryKind;
use crate::materialize::ReadContext;
use crate::reference::{validate_name, CheckpointKey, Reference};
use crate::Store;

/// `config.dump`.
pub const CONFIG_DUMP: &str = "config.dump";
/// `spec.dump`.
pub const SPEC_DUMP: &str = "spec.dump";
/// Directory of the CRIU images.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Annotation prefix carrying the store's metadata.
pub const LABEL_PREFIX: &str = "io.runc-architect.label.";
/// Annotation: store namespace.
pub const ANN_NAMESPACE: &str = "io.runc-architect.store.namespace";
/// Annotation: template key.
pub const ANN_TEMPLATE: &str = "io.runc-architect.store.template-key";
/// Annotation: container.
pub const ANN_CONTAINER: &str = "io.runc-architect.store.container";
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";
const MAX_METADATA_FILE: u64 = 64 << 20;

/// The JSON of `config.dump` (Podman's container config, reduced, as checkpointctl reads it).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Container id.
    #[serde(default)]
    pub id: String,
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Image id.
    #[serde(
        rename = "rootfsImage",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub rootfs_image: String,
    /// Image reference.
    #[serde(
        rename = "rootfsImageRef",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub rootfs_image_ref: String,
    /// Image name.
    #[serde(
        rename = "rootfsImageName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub rootfs_image_name: String,
    /// OCI runtime.
    #[serde(rename = "runtime", default, skip_serializing_if = "String::is_empty")]
    pub oci_runtime: String,
    /// Creation time (RFC 3339).
    #[serde(rename = "createdTime", default)]
    pub created_time: String,
    /// Checkpoint time (RFC 3339).
    #[serde(rename = "checkpointedTime", default)]
    pub checkpointed_time: String,
    /// Restore time (RFC 3339; Go's zero time when never restored).
    #[serde(rename = "restoredTime", default)]
    pub restored_time: String,
    /// Whether it was restored.
    #[serde(default)]
    pub restored: bool,
}

#[derive(Debug, Default, Deserialize)]
struct SpecAnnotations {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn archive_err(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Archive {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn unwrap_io(e: std::io::Error, path: &Path) -> StoreError {
    if e.get_ref().is_some_and(|r| r.is::<StoreError>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(se) = inner.downcast::<StoreError>() {
                return *se;
            }
            return archive_err(path, "write failed");
        }
        return archive_err(path, "write failed");
    }
    StoreError::io("write", path, e)
}

pub(crate) fn export(store: &Store, r: &Reference, out: &Path) -> Result<CheckpointInfo> {
    let _lock = store.lock(LockKind::Shared)?;
    let info = store.resolve(r)?;
    let ctx = ReadContext::open(store, &info)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(fsutil::temp_name("export.tar"));
    let res = write_archive(&ctx, &info, &tmp);
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_file(&tmp);
        return Err(StoreError::io("rename", out, e));
    }
    fsutil::fsync_dir(&parent)?;
    tracing::info!(checkpoint = %info.reference(), archive = %out.display(), "checkpoint exported");
    Ok(info)
}

fn write_archive(ctx: &ReadContext, info: &CheckpointInfo, tmp: &Path) -> Result<()> {
    let file = fsutil::create_new_file(tmp)?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    tar.mode(tar::HeaderMode::Deterministic);
    let entries = &ctx.body.entries;
    let k8s_layout = entries
        .iter()
        .any(|e| e.path == CHECKPOINT_DIR && e.kind == EntryKind::Dir);
    let prefix = if k8s_layout { "" } else { "checkpoint/" };
    let mtime = info.created_ms / 1000;
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    let io = |e: std::io::Error| unwrap_io(e, tmp);
    if !k8s_layout {
        let mut h = header(tar::EntryType::Directory, 0o700, 0);
        tar.append_data(&mut h, CHECKPOINT_DIR, std::io::empty())
            .map_err(io)?;
    }
    for e in entries {
        let path = format!("{prefix}{}", e.path);
        match e.kind {
            EntryKind::Dir => {
                let mut h = header(tar::EntryType::Directory, e.mode, 0);
                tar.append_data(&mut h, &path, std::io::empty())
                    .map_err(io)?;
            }
            EntryKind::File => {
                let mut h = header(tar::EntryType::Regular, e.mode, e.size);
                tar.append_data(&mut h, &path, ctx.entry_reader(e))
                    .map_err(io)?;
            }
            EntryKind::Symlink => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut h, &path, e.target.as_deref().unwrap_or_default())
                    .map_err(io)?;
            }
        }
    }
    let has = |name: &str| entries.iter().any(|e| e.path == name) && k8s_layout;
    let meta = &ctx.body.metadata;
    if !has(CONFIG_DUMP) {
        let created = fsutil::rfc3339_ms(info.created_ms);
        let cfg = ContainerConfig {
            id: meta
                .get("container-id")
                .cloned()
                .unwrap_or_else(|| info.key.container.clone()),
            name: info.key.container.clone(),
            rootfs_image: String::new(),
            rootfs_image_ref: meta.get("image-ref").cloned().unwrap_or_default(),
            rootfs_image_name: meta.get("image").cloned().unwrap_or_default(),
            oci_runtime: "runc-architect".into(),
            created_time: created.clone(),
            checkpointed_time: created,
            restored_time: GO_ZERO_TIME.into(),
            restored: false,
        };
        let data = serde_json::to_vec_pretty(&cfg).unwrap_or_default();
        let mut h = header(tar::EntryType::Regular, 0o600, data.len() as u64);
        tar.append_data(&mut h, CONFIG_DUMP, data.as_slice())
            .map_err(io)?;
    }
    if !has(SPEC_DUMP) {
        let mut ann = BTreeMap::new();
        ann.insert(
            "io.kubernetes.cri.container-type".to_string(),
            "container".to_string(),
        );
        ann.insert(
            "io.kubernetes.cri.container-name".to_string(),
            info.key.container.clone(),
        );
        ann.insert(
            "io.kubernetes.cri.sandbox-namespace".to_string(),
            meta.get("pod-namespace")
                .cloned()
                .unwrap_or_else(|| info.key.namespace.clone()),
        );
        ann.insert(
            "io.kubernetes.cri.sandbox-name".to_string(),
            meta.get("pod-name")
                .cloned()
                .unwrap_or_else(|| info.key.template.clone()),
        );
        ann.insert(ANN_NAMESPACE.to_string(), info.key.namespace.clone());
        ann.insert(ANN_TEMPLATE.to_string(), info.key.template.clone());
        ann.insert(ANN_CONTAINER.to_string(), info.key.container.clone());
        for (k, v) in meta {
            ann.insert(format!("{LABEL_PREFIX}{k}"), v.clone());
        }
        let spec = serde_json::json!({ "ociVersion": "1.0.2", "annotations": ann });
        let data = serde_json::to_vec_pretty(&spec).unwrap_or_default();
        let mut h = header(tar::EntryType::Regular, 0o600, data.len() as u64);
        tar.append_data(&mut h, SPEC_DUMP, data.as_slice())
            .map_err(io)?;
    }
    let mut w = tar.into_inner().map_err(io)?;
    w.flush().map_err(io)?;
    let file = w.into_inner().map_err(|e| unwrap_io(e.into_error(), tmp))?;
    file.sync_all().ctx("fsync", tmp)?;
    Ok(())
}

/// Normalises an archive member name ("./a/b/" -> "a/b"); `None` for the root itself.
fn member_path(raw: &Path, archive: &Path) -> Result<Option<String>> {
    let s = raw
        .to_str()
        .ok_or_else(|| archive_err(archive, format!("member name {raw:?} is not UTF-8")))?;
    let mut s = s;
    while let Some(rest) = s.strip_prefix("./") {
        s = rest;
    }
    let s = s.trim_end_matches('/');
    if s.is_empty() || s == "." {
        return Ok(None);
    }
    Ok(Some(s.to_owned()))
}

fn open_archive(path: &Path) -> Result<tar::Archive<BufReader<File>>> {
    let mut f = File::open(path).ctx("open", path)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).ctx("read", path)?;
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        return Err(archive_err(
            path,
            "gzip-compressed; decompress it first (gunzip)",
        ));
    }
    if n >= 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(archive_err(
            path,
            "zstd-compressed; decompress it first (zstd -d)",
        ));
    }
    drop(f);
    let f = File::open(path).ctx("open", path)?;
    Ok(tar::Archive::new(BufReader::with_capacity(1 << 20, f)))
}

/// Reads `config.dump` and `spec.dump` of an archive, and whether it has `checkpoint/`.
fn scan(path: &Path) -> Result<(Option<ContainerConfig>, SpecAnnotations, bool)> {
    let mut ar = open_archive(path)?;
    let mut cfg = None;
    let mut spec = SpecAnnotations::default();
    let mut has_checkpoint = false;
    for entry in ar.entries().map_err(|e| archive_err(path, e.to_string()))? {
        let mut entry = entry.map_err(|e| archive_err(path, e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| archive_err(path, e.to_string()))?
            .into_owned();
        let Some(name) = member_path(&raw, path)? else {
            continue;
        };
        if name == CHECKPOINT_DIR || name.starts_with("checkpoint/") {
            has_checkpoint = true;
        }
        if name == CONFIG_DUMP || name == SPEC_DUMP {
            let mut data = Vec::new();
            (&mut entry)
                .take(MAX_METADATA_FILE)
                .read_to_end(&mut data)
                .map_err(|e| archive_err(path, e.to_string()))?;
            if name == CONFIG_DUMP {
                cfg = Some(
                    serde_json::from_slice(&data)
                        .map_err(|e| archive_err(path, format!("{CONFIG_DUMP}: {e}")))?,
                );
            } else {
                spec = serde_json::from_slice(&data)
                    .map_err(|e| archive_err(path, format!("{SPEC_DUMP}: {e}")))?;
            }
        }
    }
    Ok((cfg, spec, has_checkpoint))
}

/// Turns an arbitrary string into a valid store name (keeping valid ones as they are).
fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(crate::reference::MAX_NAME_LEN)
        .collect();
    while out.starts_with(['.', '_', '-']) {
        out.remove(0);
    }
    out
}

pub(crate) fn import(
    store: &Store,
    path: &Path,
    key: Option<&CheckpointKey>,
) -> Result<PutOutcome> {
    let (cfg, spec, has_checkpoint) = scan(path)?;
    if !has_checkpoint {
        return Err(archive_err(
            path,
            "not a container checkpoint archive: no checkpoint/ directory",
        ));
    }
    let ann = &spec.annotations;
    let key = match key {
        Some(k) => k.clone(),
        None => {
            let pick = |names: &[&str]| {
                names
                    .iter()
                    .filter_map(|n| ann.get(*n))
                    .map(|v| sanitize(v))
                    .find(|v| validate_name("name", v).is_ok())
            };
            let ns = pick(&[
                ANN_NAMESPACE,
                "io.kubernetes.cri.sandbox-namespace",
                "io.kubernetes.pod.namespace",
            ])
            .unwrap_or_else(|| "default".into());
            let template = pick(&[
                ANN_TEMPLATE,
                "io.kubernetes.cri.sandbox-name",
                "io.kubernetes.pod.name",
            ])
            .unwrap_or_else(|| "imported".into());
            let container = pick(&[ANN_CONTAINER, "io.kubernetes.cri.container-name", "io.kubernetes.container.name"])
                .or_else(|| cfg.as_ref().map(|c| sanitize(&c.name)).filter(|n| validate_name("name", n).is_ok()))
                .ok_or_else(|| {
                    archive_err(path, "cannot tell the container's name; pass namespace, key and container explicitly")
                })?;
            CheckpointKey::new(&ns, &template, &container)?
        }
    };
    let mut metadata: BTreeMap<String, String> = ann
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(LABEL_PREFIX)
                .map(|k| (k.to_owned(), v.clone()))
        })
        .collect();
    if let Some(c) = &cfg {
        if !c.rootfs_image_name.is_empty() {
            metadata
                .entry("image".into())
                .or_insert_with(|| c.rootfs_image_name.clone());
        }
    }

    let mut w = store.writer(&key, metadata)?;
    let mut ar = open_archive(path)?;
    for entry in ar.entries().map_err(|e| archive_err(path, e.to_string()))? {
        let mut entry = entry.map_err(|e| archive_err(path, e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| archive_err(path, e.to_string()))?
            .into_owned();
        let Some(name) = member_path(&raw, path)? else {
            continue;
        };
        let mode = entry
            .header()
            .mode()
            .map_err(|e| archive_err(path, e.to_string()))?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => w.add_dir(&name, mode)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                w.add_file(&name, mode, &mut entry, Some(size))
                    .map_err(|e| match e {
                        StoreError::Io { source, .. } => {
                            archive_err(path, format!("{name}: {source}"))
                        }
                        other => other,
                    })?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| archive_err(path, e.to_string()))?
                    .ok_or_else(|| archive_err(path, format!("{name}: symlink without target")))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| archive_err(path, format!("{name}: target not UTF-8")))?
                    .to_owned();
                w.add_symlink(&name, &target)?;
            }
            other => {
                return Err(archive_err(
                    path,
                    format!("{name}: unsupported member type {other:?}"),
                ))
            }
        }
    }
    w.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(sanitize("web-0"), "web-0");
        assert_eq!(sanitize("_a b/c"), "a-b-c");
        assert_eq!(
            member_path(Path::new("./checkpoint/"), Path::new("x"))
                .unwrap()
                .as_deref(),
            Some("checkpoint")
        );
        assert_eq!(member_path(Path::new("./"), Path::new("x")).unwrap(), None);
    }

    #[test]
    fn config_dump_json_names() {
        let c: ContainerConfig = serde_json::from_str(
            r#"{"id":"abc","name":"counter","rootfsImageName":"img","runtime":"runc","createdTime":"2023-02-13T16:20:09Z","checkpointedTime":"2023-02-13T16:20:09Z","restoredTime":"0001-01-01T00:00:00Z","restored":false}"#,
        )
        .unwrap();
        assert_eq!(c.name, "counter");
        assert_eq!(c.oci_runtime, "runc");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["rootfsImageName"], "img");
    }
}
