//! Sizes and counts of a store.

use std::os::unix::fs::FileExt;

use serde::Serialize;

use crate::error::{IoContext, Result};
use crate::fsutil::LockKind;
use crate::index;
use crate::Store;

/// Sizes and counts (the JSON of `stats --json`).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Visible checkpoints (generations).
    pub checkpoints: u64,
    /// Containers (keys) with at least one checkpoint.
    pub containers: u64,
    /// Namespaces.
    pub namespaces: u64,
    /// Sum of the checkpoints' file sizes: what storing them naively would take.
    pub logical_bytes: u64,
    /// Bytes on disk: packs plus manifests.
    pub stored_bytes: u64,
    /// Bytes of packs.
    pub pack_bytes: u64,
    /// Bytes of manifests.
    pub manifest_bytes: u64,
    /// Distinct stored chunks (records in packs).
    pub chunks: u64,
    /// Packs.
    pub packs: u64,
    /// Manifests.
    pub manifests: u64,
}

fn pack_entry_count(path: &std::path::Path) -> Option<u64> {
    let f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut footer = [0u8; 56];
    f.read_exact_at(&mut footer, len.checked_sub(56)?).ok()?;
    Some(u64::from_le_bytes(footer[8..16].try_into().ok()?))
}

pub(crate) fn stats(store: &Store) -> Result<Stats> {
    let _lock = store.lock(LockKind::Shared)?;
    let layout = store.layout();
    let mut s = Stats::default();
    let namespaces = index::list_namespaces(layout)?;
    s.namespaces = namespaces.len() as u64;
    for key in index::list_keys(layout, None, None)? {
        let cps = index::list_checkpoints(layout, &key)?;
        if !cps.is_empty() {
            s.containers += 1;
        }
        for c in cps {
            s.checkpoints += 1;
            s.logical_bytes += c.logical_size;
        }
    }
    let packs = layout.packs();
    for ent in std::fs::read_dir(&packs).ctx("read directory", &packs)? {
        let ent = ent.ctx("read directory", &packs)?;
        if ent.file_name().to_string_lossy().ends_with(".pack") {
            s.packs += 1;
            s.pack_bytes += ent.metadata().ctx("stat", ent.path())?.len();
            s.chunks += pack_entry_count(&ent.path()).unwrap_or(0);
        }
    }
    let manifests = layout.manifests();
    for ent in std::fs::read_dir(&manifests).ctx("read directory", &manifests)? {
        let ent = ent.ctx("read directory", &manifests)?;
        if ent.file_name().to_string_lossy().ends_with(".manifest") {
            s.manifests += 1;
            s.manifest_bytes += ent.metadata().ctx("stat", ent.path())?.len();
        }
    }
    s.stored_bytes = s.pack_bytes + s.manifest_bytes;
    Ok(s)
}
