//! The index: which checkpoints exist, by (namespace, template key, container) and generation.
//!
//! ```text
//! index/<ns>/.namespace                      encryption state of the namespace (record)
//! index/<ns>/<template>/<container>/.lock    flock: allocation of generation numbers
//! index/<ns>/<template>/<container>/gen-0000000007   {generation, manifest id, created, size}
//! index/<ns>/<template>/<container>/.latest  {generation}: the latest pointer
//! ```
//!
//! Every file here is a checksummed record written to a temporary name, fsynced and
//! published by link(2) (generations: never replacing one) or rename(2) (`.latest`), with the
//! directory fsynced after. A generation record is only written once its manifest and every
//! chunk are durable, and it becomes visible only when `.latest` is moved to it (the commit
//! point): generations above the pointer are leftovers of dead writers, never visible.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, LockKind};
use crate::manifest::EncryptionInfo;
use crate::pack::PackId;
use crate::reference::{validate_name, CheckpointKey};

/// Paths of a store.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Layout under `root`.
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_owned(),
        }
    }
    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Format marker.
    pub fn marker(&self) -> PathBuf {
        self.root.join("STORE")
    }
    /// Store-wide lock (writers and readers shared, gc exclusive).
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
    /// Pack directory.
    pub fn packs(&self) -> PathBuf {
        self.root.join("packs")
    }
    /// Manifest directory.
    pub fn manifests(&self) -> PathBuf {
        self.root.join("manifests")
    }
    /// Index directory.
    pub fn index(&self) -> PathBuf {
        self.root.join("index")
    }
    /// Temporary files.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    /// A pack's path.
    pub fn pack(&self, id: &PackId) -> PathBuf {
        self.packs().join(id.file_name())
    }
    /// A manifest's path.
    pub fn manifest(&self, id: &Digest) -> PathBuf {
        self.manifests().join(format!("{}.manifest", id.to_hex()))
    }
    /// A namespace's directory.
    pub fn namespace_dir(&self, ns: &str) -> PathBuf {
        self.index().join(ns)
    }
    /// A namespace's record.
    pub fn namespace_record(&self, ns: &str) -> PathBuf {
        self.namespace_dir(ns).join(".namespace")
    }
    /// A key's directory.
    pub fn key_dir(&self, key: &CheckpointKey) -> PathBuf {
        self.index()
            .join(&key.namespace)
            .join(&key.template)
            .join(&key.container)
    }
    /// A generation record.
    pub fn generation(&self, key: &CheckpointKey, gen: u64) -> PathBuf {
        self.key_dir(key).join(format!("gen-{gen:010}"))
    }
    /// The latest pointer.
    pub fn latest(&self, key: &CheckpointKey) -> PathBuf {
        self.key_dir(key).join(".latest")
    }
    /// The key's lock.
    pub fn key_lock(&self, key: &CheckpointKey) -> PathBuf {
        self.key_dir(key).join(".lock")
    }
}

/// A generation record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenRecord {
    /// Generation number (from 1).
    pub generation: u64,
    /// Checkpoint id (manifest).
    pub manifest: String,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Sum of file sizes.
    pub logical_size: u64,
}

impl GenRecord {
    /// The manifest id.
    pub fn manifest_id(&self, path: &Path) -> Result<Digest> {
        Digest::from_hex(&self.manifest).ok_or_else(|| StoreError::CorruptRecord {
            path: path.to_owned(),
            reason: "bad manifest id".into(),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LatestRecord {
    generation: u64,
}

/// The encryption state of a namespace, fixed by its first checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceRecord {
    /// `None`: plaintext namespace.
    pub encryption: Option<EncryptionInfo>,
}

/// A visible checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Its key.
    pub key: CheckpointKey,
    /// Its generation.
    pub generation: u64,
    /// Its id.
    pub id: Digest,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Sum of file sizes.
    pub logical_size: u64,
    /// Whether it is the key's latest generation.
    pub latest: bool,
}

impl CheckpointInfo {
    /// `NS/KEY/CONTAINER@GEN`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.key, self.generation)
    }
}

/// Generation files present for a key, ascending (committed or not).
pub fn generation_files(layout: &Layout, key: &CheckpointKey) -> Result<Vec<u64>> {
    let dir = layout.key_dir(key);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("read directory", dir, e)),
    };
    let mut gens = Vec::new();
    for ent in rd {
        let ent = ent.ctx("read directory", &dir)?;
        if let Some(n) = ent
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("gen-"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            gens.push(n);
        }
    }
    gens.sort_unstable();
    Ok(gens)
}

/// The committed limit: generations up to the `.latest` pointer are visible. No pointer:
/// nothing is committed yet. A damaged pointer (reported by `verify`): everything present.
fn committed_limit(layout: &Layout, key: &CheckpointKey) -> Result<u64> {
    let ptr = layout.latest(key);
    match std::fs::read(&ptr) {
        Ok(data) => match fsutil::decode_record::<LatestRecord>(&ptr, &data) {
            Ok(rec) => Ok(rec.generation),
            Err(e) => {
                tracing::warn!(error = %e, "damaged latest pointer; treating every generation as committed");
                Ok(u64::MAX)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::io("read", ptr, e)),
    }
}

/// Visible (committed) generation numbers of a key, ascending.
pub fn list_generations(layout: &Layout, key: &CheckpointKey) -> Result<Vec<u64>> {
    let limit = committed_limit(layout, key)?;
    Ok(generation_files(layout, key)?
        .into_iter()
        .filter(|g| *g <= limit)
        .collect())
}

/// Generation files above the latest pointer: left by writers that died between writing
/// the generation record and moving the pointer (the commit point). Never visible.
pub fn uncommitted_generations(layout: &Layout, key: &CheckpointKey) -> Result<Vec<u64>> {
    let limit = committed_limit(layout, key)?;
    Ok(generation_files(layout, key)?
        .into_iter()
        .filter(|g| *g > limit)
        .collect())
}

/// Reads a generation record.
pub fn read_generation(layout: &Layout, key: &CheckpointKey, gen: u64) -> Result<GenRecord> {
    let path = layout.generation(key, gen);
    let rec: GenRecord = fsutil::read_record(&path)?;
    if rec.generation != gen {
        return Err(StoreError::CorruptRecord {
            path,
            reason: format!("names generation {}", rec.generation),
        });
    }
    Ok(rec)
}

/// The latest visible generation of a key.
pub fn latest_generation(layout: &Layout, key: &CheckpointKey) -> Result<Option<u64>> {
    Ok(list_generations(layout, key)?.last().copied())
}

/// Publishes a new generation for `key` pointing at a durable manifest; returns its number.
///
/// Under the key's flock: leftovers of dead writers above the pointer are removed, the
/// generation record is created (link(2): never replacing one), and the `.latest` pointer is
/// moved to it: that rename is the commit point. A crash before it leaves the new
/// generation invisible (and removed by the next writer or gc); a crash after it leaves it
/// committed.
pub fn publish_generation(
    layout: &Layout,
    key: &CheckpointKey,
    manifest: &Digest,
    created_ms: u64,
    logical_size: u64,
) -> Result<u64> {
    let dir = layout.key_dir(key);
    fsutil::create_dir_all_durable(&dir)?;
    let _lock = fsutil::lock_file(&layout.key_lock(key), LockKind::Exclusive)?;
    let leftovers = uncommitted_generations(layout, key)?;
    for g in &leftovers {
        fsutil::remove_any(&layout.generation(key, *g))?;
    }
    if !leftovers.is_empty() {
        fsutil::fsync_dir(&dir)?;
    }
    let mut gen = list_generations(layout, key)?.last().copied().unwrap_or(0) + 1;
    loop {
        let rec = GenRecord {
            generation: gen,
            manifest: manifest.to_hex(),
            created_ms,
            logical_size,
        };
        if fsutil::atomic_create(&layout.generation(key, gen), &fsutil::encode_record(&rec))? {
            break;
        }
        gen += 1;
    }
    crate::fault::point("generation-published");
    set_latest(layout, key, gen)?;
    crate::fault::point("latest-published");
    Ok(gen)
}

/// Points `.latest` at `gen` (atomic replace).
pub fn set_latest(layout: &Layout, key: &CheckpointKey, gen: u64) -> Result<()> {
    fsutil::atomic_write(
        &layout.latest(key),
        &fsutil::encode_record(&LatestRecord { generation: gen }),
    )
}

/// Reads a namespace's record, if it has one.
pub fn read_namespace(layout: &Layout, ns: &str) -> Result<Option<NamespaceRecord>> {
    let path = layout.namespace_record(ns);
    match std::fs::read(&path) {
        Ok(data) => Ok(Some(fsutil::decode_record(&path, &data)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read", path, e)),
    }
}

/// Fixes a namespace's encryption state on first use and checks it afterwards.
pub fn ensure_namespace(
    layout: &Layout,
    ns: &str,
    key_fingerprint: Option<&str>,
) -> Result<NamespaceRecord> {
    let wanted = NamespaceRecord {
        encryption: key_fingerprint.map(|fp| EncryptionInfo {
            cipher: crate::manifest::CIPHER.to_owned(),
            key_fingerprint: fp.to_owned(),
        }),
    };
    let rec = match read_namespace(layout, ns)? {
        Some(r) => r,
        None => {
            fsutil::create_dir_all_durable(&layout.namespace_dir(ns))?;
            if fsutil::atomic_create(
                &layout.namespace_record(ns),
                &fsutil::encode_record(&wanted),
            )? {
                wanted.clone()
            } else {
                read_namespace(layout, ns)?.ok_or_else(|| StoreError::CorruptRecord {
                    path: layout.namespace_record(ns),
                    reason: "vanished".into(),
                })?
            }
        }
    };
    match (&rec.encryption, key_fingerprint) {
        (None, None) => {}
        (None, Some(_)) => {
            return Err(StoreError::UnexpectedKey {
                namespace: ns.to_owned(),
            })
        }
        (Some(info), None) => {
            return Err(StoreError::MissingKey {
                namespace: ns.to_owned(),
                fingerprint: info.key_fingerprint.clone(),
            })
        }
        (Some(info), Some(fp)) if info.key_fingerprint != fp => {
            return Err(StoreError::WrongKey {
                namespace: ns.to_owned(),
                expected: info.key_fingerprint.clone(),
                actual: fp.to_owned(),
            })
        }
        _ => {}
    }
    Ok(rec)
}

fn sub_dirs(dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("read directory", dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.ctx("read directory", dir)?;
        let Some(name) = ent.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if validate_name("name", &name).is_ok() && ent.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Namespaces present in the index.
pub fn list_namespaces(layout: &Layout) -> Result<Vec<String>> {
    sub_dirs(&layout.index())
}

/// Keys present in the index (optionally of one namespace / template).
pub fn list_keys(
    layout: &Layout,
    namespace: Option<&str>,
    template: Option<&str>,
) -> Result<Vec<CheckpointKey>> {
    let mut out = Vec::new();
    for ns in list_namespaces(layout)? {
        if namespace.is_some_and(|n| n != ns) {
            continue;
        }
        for t in sub_dirs(&layout.namespace_dir(&ns))? {
            if template.is_some_and(|x| x != t) {
                continue;
            }
            for c in sub_dirs(&layout.namespace_dir(&ns).join(&t))? {
                out.push(CheckpointKey {
                    namespace: ns.clone(),
                    template: t.clone(),
                    container: c,
                });
            }
        }
    }
    Ok(out)
}

/// All visible checkpoints of a key, ascending by generation.
pub fn list_checkpoints(layout: &Layout, key: &CheckpointKey) -> Result<Vec<CheckpointInfo>> {
    let latest = latest_generation(layout, key)?;
    let mut out = Vec::new();
    for g in list_generations(layout, key)? {
        let rec = read_generation(layout, key, g)?;
        out.push(CheckpointInfo {
            key: key.clone(),
            generation: g,
            id: rec.manifest_id(&layout.generation(key, g))?,
            created_ms: rec.created_ms,
            logical_size: rec.logical_size,
            latest: Some(g) == latest,
        });
    }
    Ok(out)
}
