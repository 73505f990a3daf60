//! Writing checkpoints: chunk, dedup, pack, publish (see the crate docs, "Crash safety").

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::chunker::{self, Chunking, PAGE_SIZE};
use crate::crypt::NamespaceKey;
use crate::digest::{Addresser, Digest, DigestMap};
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, LockGuard, LockKind};
use crate::index;
use crate::manifest::{
    self, ChunkLoc, ChunkRef, EncryptionInfo, Entry, EntryKind, Manifest, ManifestBody,
    ManifestHeader,
};
use crate::pack::{FinishedPack, PackId, PackWriter, PACK_TARGET_SIZE};
use crate::reference::CheckpointKey;
use crate::Store;

/// Bytes of a memory image read and hashed per batch.
const BATCH: usize = 1 << 20;

#[derive(Clone, Copy, Debug)]
struct KnownLoc {
    pack: PackId,
    offset: u64,
    stored_len: u32,
}

/// Result of a committed `put`.
#[derive(Clone, Debug)]
pub struct PutOutcome {
    /// `NS/KEY/CONTAINER@GEN`.
    pub reference: String,
    /// The key.
    pub key: CheckpointKey,
    /// The new generation.
    pub generation: u64,
    /// The checkpoint id.
    pub id: Digest,
    /// Sum of file sizes.
    pub logical_bytes: u64,
    /// Chunks referenced (with repeats).
    pub chunks: u64,
    /// Chunks that were not in the store yet.
    pub new_chunks: u64,
    /// Bytes of new packs written (chunk data and pack tables).
    pub new_bytes: u64,
    /// Bytes of the manifest.
    pub manifest_bytes: u64,
    /// Wall time of the put.
    pub elapsed: Duration,
}

/// Writes one checkpoint. Created by [`Store::writer`]; add entries, then [`commit`].
/// Dropping it uncommitted removes everything it wrote.
///
/// [`commit`]: CheckpointWriter::commit
pub struct CheckpointWriter<'s> {
    store: &'s Store,
    key: CheckpointKey,
    nskey: Option<Arc<NamespaceKey>>,
    addresser: Addresser,
    _lock: LockGuard,
    known: DigestMap<KnownLoc>,
    pack: Option<PackWriter>,
    finished: Vec<FinishedPack>,
    published: Vec<PathBuf>,
    manifest_published: Option<PathBuf>,
    point_of_no_return: bool,
    entries: Vec<Entry>,
    paths: std::collections::HashMap<String, usize>,
    chunks: Vec<ChunkRef>,
    locs: Vec<KnownLoc>,
    metadata: BTreeMap<String, String>,
    logical: u64,
    new_chunks: u64,
    started: Instant,
    committed: bool,
}

impl<'s> CheckpointWriter<'s> {
    pub(crate) fn new(
        store: &'s Store,
        key: CheckpointKey,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        let lock = store.lock(LockKind::Shared)?;
        let nskey = store.key_for(&key.namespace);
        index::ensure_namespace(
            store.layout(),
            &key.namespace,
            nskey.as_ref().map(|k| k.fingerprint()),
        )?;
        let addresser = nskey.as_ref().map_or(Addresser::Plain, |k| k.addresser());
        let mut w = CheckpointWriter {
            store,
            key,
            nskey,
            addresser,
            _lock: lock,
            known: DigestMap::default(),
            pack: None,
            finished: Vec::new(),
            published: Vec::new(),
            manifest_published: None,
            point_of_no_return: false,
            entries: Vec::new(),
            paths: std::collections::HashMap::new(),
            chunks: Vec::new(),
            locs: Vec::new(),
            metadata,
            logical: 0,
            new_chunks: 0,
            started: Instant::now(),
            committed: false,
        };
        w.load_dedup_candidates();
        Ok(w)
    }

    /// Loads the chunk tables this put dedups against: the latest generation of every
    /// container of the same template, and the last two of this container.
    fn load_dedup_candidates(&mut self) {
        let layout = self.store.layout();
        let fp = self.nskey.as_ref().map(|k| k.fingerprint().to_owned());
        let keys =
            match index::list_keys(layout, Some(&self.key.namespace), Some(&self.key.template)) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list dedup candidates");
                    return;
                }
            };
        for k in keys {
            let gens: Vec<u64> = if k == self.key {
                let all = index::list_generations(layout, &k).unwrap_or_default();
                all.iter().rev().take(2).copied().collect()
            } else {
                index::latest_generation(layout, &k)
                    .ok()
                    .flatten()
                    .into_iter()
                    .collect()
            };
            for g in gens {
                let m = index::read_generation(layout, &k, g)
                    .and_then(|rec| rec.manifest_id(&layout.generation(&k, g)))
                    .and_then(|id| self.store.load_manifest(&id));
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(key = %k, generation = g, error = %e, "skipping dedup candidate");
                        continue;
                    }
                };
                let mfp = m
                    .header
                    .encryption
                    .as_ref()
                    .map(|e| e.key_fingerprint.clone());
                if mfp != fp {
                    continue;
                }
                for (c, l) in m.chunks.iter().zip(&m.locs) {
                    let Some(pack) = m.packs.get(l.pack as usize) else {
                        continue;
                    };
                    self.known.entry(c.addr).or_insert(KnownLoc {
                        pack: *pack,
                        offset: l.offset,
                        stored_len: l.stored_len,
                    });
                }
            }
        }
        tracing::debug!(key = %self.key, candidates = self.known.len(), "dedup candidates loaded");
    }

    fn ensure_parents(&mut self, path: &str) -> Result<()> {
        let Some((parent, _)) = path.rsplit_once('/') else {
            return Ok(());
        };
        match self.paths.get(parent) {
            Some(&i) if self.entries[i].kind == EntryKind::Dir => Ok(()),
            Some(_) => Err(StoreError::Unsupported {
                path: PathBuf::from(path),
                reason: "parent is not a directory".into(),
            }),
            None => {
                self.ensure_parents(parent)?;
                self.push_entry(Entry {
                    path: parent.to_owned(),
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    size: 0,
                    target: None,
                    first_chunk: 0,
                    chunk_count: 0,
                });
                Ok(())
            }
        }
    }

    fn push_entry(&mut self, e: Entry) {
        self.paths.insert(e.path.clone(), self.entries.len());
        self.entries.push(e);
    }

    fn check_new_path(&mut self, path: &str) -> Result<()> {
        manifest::check_rel_path(path).map_err(|r| StoreError::Unsupported {
            path: PathBuf::from(path),
            reason: r.to_owned(),
        })?;
        if self.paths.contains_key(path) {
            return Err(StoreError::Unsupported {
                path: PathBuf::from(path),
                reason: "duplicate path in checkpoint".into(),
            });
        }
        self.ensure_parents(path)
    }

    /// Adds a directory (adding it again only updates its mode).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<()> {
        if let Some(&i) = self.paths.get(path) {
            if self.entries[i].kind == EntryKind::Dir {
                self.entries[i].mode = mode & 0o7777;
                return Ok(());
            }
        }
        self.check_new_path(path)?;
        self.push_entry(Entry {
            path: path.to_owned(),
            kind: EntryKind::Dir,
            mode: mode & 0o7777,
            size: 0,
            target: None,
            first_chunk: 0,
            chunk_count: 0,
        });
        Ok(())
    }

    /// Adds a symbolic link.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.check_new_path(path)?;
        self.push_entry(Entry {
            path: path.to_owned(),
            kind: EntryKind::Symlink,
            mode: 0o777,
            size: 0,
            target: Some(target.to_owned()),
            first_chunk: 0,
            chunk_count: 0,
        });
        Ok(())
    }

    /// Adds a regular file read from `reader`. `size_hint` (the file's size when known)
    /// selects whole-file chunking for small files.
    pub fn add_file(
        &mut self,
        path: &str,
        mode: u32,
        reader: &mut dyn Read,
        size_hint: Option<u64>,
    ) -> Result<()> {
        self.check_new_path(path)?;
        let name = path.rsplit('/').next().unwrap_or(path);
        let first_chunk = self.chunks.len() as u64;
        let size = match chunker::chunking_for(name, size_hint) {
            Chunking::Pages => self.ingest_pages(path, reader)?,
            Chunking::Whole => {
                let mut buf = Vec::with_capacity(size_hint.unwrap_or(0) as usize);
                reader
                    .take(chunker::WHOLE_FILE_MAX + 1)
                    .read_to_end(&mut buf)
                    .ctx("read", path)?;
                if buf.len() as u64 > chunker::WHOLE_FILE_MAX {
                    let mut chained = std::io::Cursor::new(buf).chain(reader);
                    self.ingest_cdc(path, &mut chained)?
                } else {
                    self.put_chunks(&buf, &[(0, buf.len())])?;
                    buf.len() as u64
                }
            }
            Chunking::ContentDefined => self.ingest_cdc(path, reader)?,
        };
        self.logical += size;
        self.push_entry(Entry {
            path: path.to_owned(),
            kind: EntryKind::File,
            mode: mode & 0o7777,
            size,
            target: None,
            first_chunk,
            chunk_count: self.chunks.len() as u64 - first_chunk,
        });
        Ok(())
    }

    /// Adds a regular file from memory.
    pub fn add_bytes(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.add_file(
            path,
            mode,
            &mut std::io::Cursor::new(data),
            Some(data.len() as u64),
        )
    }

    /// Adds every entry of the directory `src` under `prefix` ("" for the top level).
    pub fn add_tree(&mut self, prefix: &str, src: &Path) -> Result<()> {
        let meta = std::fs::metadata(src).ctx("stat", src)?;
        if !meta.is_dir() {
            return Err(StoreError::Unsupported {
                path: src.to_owned(),
                reason: "not a directory".into(),
            });
        }
        if !prefix.is_empty() {
            self.add_dir(prefix, meta.permissions().mode())?;
        }
        self.walk(prefix, src)
    }

    fn walk(&mut self, prefix: &str, dir: &Path) -> Result<()> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .ctx("read directory", dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .ctx("read directory", dir)?;
        names.sort();
        for name in names {
            let full = dir.join(&name);
            let Some(name) = name.to_str() else {
                return Err(StoreError::Unsupported {
                    path: full,
                    reason: "file name is not UTF-8".into(),
                });
            };
            let rel = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            };
            let meta = std::fs::symlink_metadata(&full).ctx("stat", &full)?;
            let ft = meta.file_type();
            if ft.is_dir() {
                self.add_dir(&rel, meta.permissions().mode())?;
                self.walk(&rel, &full)?;
            } else if ft.is_file() {
                let mut f = std::fs::File::open(&full).ctx("open", &full)?;
                self.add_file(&rel, meta.permissions().mode(), &mut f, Some(meta.len()))
                    .map_err(|e| match e {
                        StoreError::Io { op, path, source } if path == Path::new(&rel) => {
                            StoreError::Io {
                                op,
                                path: full.clone(),
                                source,
                            }
                        }
                        other => other,
                    })?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&full).ctx("readlink", &full)?;
                let Some(target) = target.to_str() else {
                    return Err(StoreError::Unsupported {
                        path: full,
                        reason: "symlink target is not UTF-8".into(),
                    });
                };
                self.add_symlink(&rel, target)?;
            } else {
                return Err(StoreError::Unsupported {
                    path: full,
                    reason: "not a regular file, directory or symlink".into(),
                });
            }
        }
        Ok(())
    }

    fn ingest_pages(&mut self, path: &str, reader: &mut dyn Read) -> Result<u64> {
        let mut buf = vec![0u8; BATCH];
        let mut total = 0u64;
        loop {
            let n = chunker::read_full(reader, &mut buf).ctx("read", path)?;
            if n == 0 {
                break;
            }
            let spans: Vec<(usize, usize)> = (0..n)
                .step_by(PAGE_SIZE)
                .map(|s| (s, (s + PAGE_SIZE).min(n)))
                .collect();
            self.put_chunks(&buf[..n], &spans)?;
            total += n as u64;
            if n < BATCH {
                break;
            }
        }
        Ok(total)
    }

    fn ingest_cdc(&mut self, path: &str, reader: &mut dyn Read) -> Result<u64> {
        let mut total = 0u64;
        let cdc = fastcdc::v2020::StreamCDC::new(
            reader,
            chunker::CDC_MIN,
            chunker::CDC_AVG,
            chunker::CDC_MAX,
        );
        for chunk in cdc {
            let chunk = chunk.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => StoreError::io("read", path, io),
                other => StoreError::io("read", path, std::io::Error::other(other.to_string())),
            })?;
            self.put_chunks(&chunk.data, &[(0, chunk.data.len())])?;
            total += chunk.data.len() as u64;
        }
        Ok(total)
    }

    /// Addresses the spans of `data` (in parallel), appends the ones not yet stored to the
    /// pack (encrypting in parallel if needed), and records all of them.
    fn put_chunks(&mut self, data: &[u8], spans: &[(usize, usize)]) -> Result<()> {
        // An empty file has no chunks (a zero-length record would share its offset).
        if spans.iter().any(|(a, b)| a >= b) {
            let non_empty: Vec<(usize, usize)> =
                spans.iter().copied().filter(|(a, b)| a < b).collect();
            if non_empty.is_empty() {
                return Ok(());
            }
            return self.put_chunks(data, &non_empty);
        }
        let addresser = &self.addresser;
        let addrs: Vec<Digest> = if spans.len() > 1 {
            self.store.run(|| {
                spans
                    .par_iter()
                    .map(|&(a, b)| addresser.address(&data[a..b]))
                    .collect()
            })
        } else {
            spans
                .iter()
                .map(|&(a, b)| addresser.address(&data[a..b]))
                .collect()
        };
        // Which spans are new (first occurrence only)?
        let mut fresh: Vec<usize> = Vec::new();
        {
            let mut seen_here: HashSet<Digest, crate::digest::DigestBuildHasher> =
                HashSet::default();
            for (i, a) in addrs.iter().enumerate() {
                if !self.known.contains_key(a) && seen_here.insert(*a) {
                    fresh.push(i);
                }
            }
        }
        if !fresh.is_empty() {
            let sealed: Option<Vec<(Vec<u8>, Digest)>> = match &self.nskey {
                None => None,
                Some(k) => {
                    let k = k.clone();
                    let res: Result<Vec<(Vec<u8>, Digest)>> = self.store.run(|| {
                        fresh
                            .par_iter()
                            .map(|&i| {
                                let (a, b) = spans[i];
                                let mut buf = Vec::with_capacity(b - a + crate::crypt::TAG_LEN);
                                buf.extend_from_slice(&data[a..b]);
                                k.seal_chunk(&addrs[i], &mut buf)?;
                                let h = Digest::of(&buf);
                                Ok((buf, h))
                            })
                            .collect()
                    });
                    Some(res?)
                }
            };
            let batch: Vec<(Digest, u32, &[u8], Digest)> = fresh
                .iter()
                .enumerate()
                .map(|(j, &i)| {
                    let (a, b) = spans[i];
                    match &sealed {
                        Some(s) => (addrs[i], (b - a) as u32, s[j].0.as_slice(), s[j].1),
                        None => (addrs[i], (b - a) as u32, &data[a..b], addrs[i]),
                    }
                })
                .collect();
            let pack = self.current_pack()?;
            let pack_id = pack.id();
            let offsets = pack.append_batch(&batch)?;
            for (c, offset) in batch.iter().zip(offsets) {
                self.known.insert(
                    c.0,
                    KnownLoc {
                        pack: pack_id,
                        offset,
                        stored_len: c.2.len() as u32,
                    },
                );
            }
            self.new_chunks += batch.len() as u64;
        }
        for (i, a) in addrs.iter().enumerate() {
            let loc = *self.known.get(a).ok_or_else(|| StoreError::Unsupported {
                path: PathBuf::from(self.key.to_string()),
                reason: format!("internal: chunk {a} vanished from the dedup table"),
            })?;
            let (s, e) = spans[i];
            self.chunks.push(ChunkRef {
                addr: *a,
                raw_len: (e - s) as u32,
            });
            self.locs.push(loc);
        }
        Ok(())
    }

    fn current_pack(&mut self) -> Result<&mut PackWriter> {
        if self
            .pack
            .as_ref()
            .is_some_and(|p| p.size() >= PACK_TARGET_SIZE)
        {
            if let Some(p) = self.pack.take() {
                let tmp = p.tmp_path().to_owned();
                match p.finish() {
                    Ok(f) => self.finished.push(f),
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
            }
        }
        if self.pack.is_none() {
            self.pack = Some(PackWriter::create(
                &self.store.layout().tmp(),
                self.nskey.is_some(),
            )?);
        }
        self.pack.as_mut().ok_or_else(|| StoreError::Unsupported {
            path: PathBuf::from("pack"),
            reason: "internal: no pack".into(),
        })
    }

    /// Makes the checkpoint durable and visible as the key's new latest generation.
    pub fn commit(mut self) -> Result<PutOutcome> {
        let layout = self.store.layout().clone();
        if let Some(p) = self.pack.take() {
            let tmp = p.tmp_path().to_owned();
            match p.finish() {
                Ok(f) => self.finished.push(f),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        let mut new_bytes = 0;
        let finished = std::mem::take(&mut self.finished);
        for (i, p) in finished.iter().enumerate() {
            let dest = layout.pack(&p.id);
            if let Err(e) = std::fs::rename(&p.tmp_path, &dest) {
                // Keep the not-yet-renamed ones for cleanup on drop.
                self.finished = finished.into_iter().skip(i).collect();
                return Err(StoreError::io("rename", dest, e));
            }
            new_bytes += p.size;
            self.published.push(dest);
        }
        if !self.published.is_empty() {
            fsutil::fsync_dir(&layout.packs())?;
        }
        crate::fault::point("packs-published");

        // Manifest.
        let mut pack_table: Vec<PackId> = Vec::new();
        let mut pack_no: std::collections::HashMap<PackId, u32> = std::collections::HashMap::new();
        let locs: Vec<ChunkLoc> = self
            .locs
            .iter()
            .map(|l| {
                let n = *pack_no.entry(l.pack).or_insert_with(|| {
                    pack_table.push(l.pack);
                    (pack_table.len() - 1) as u32
                });
                ChunkLoc {
                    pack: n,
                    offset: l.offset,
                    stored_len: l.stored_len,
                }
            })
            .collect();
        let created_ms = fsutil::now_ms();
        let header = ManifestHeader {
            format: manifest::FORMAT,
            namespace: self.key.namespace.clone(),
            template: self.key.template.clone(),
            container: self.key.container.clone(),
            created_ms,
            logical_size: self.logical,
            entries: self.entries.len() as u64,
            encryption: self.nskey.as_ref().map(|k| EncryptionInfo {
                cipher: manifest::CIPHER.to_owned(),
                key_fingerprint: k.fingerprint().to_owned(),
            }),
        };
        let body = ManifestBody {
            metadata: std::mem::take(&mut self.metadata),
            entries: std::mem::take(&mut self.entries),
        };
        let body_json = serde_json::to_vec(&body).map_err(|e| StoreError::Unsupported {
            path: PathBuf::from(self.key.to_string()),
            reason: format!("metadata: {e}"),
        })?;
        let body_stored = match &self.nskey {
            None => body_json,
            Some(k) => {
                k.seal_manifest(&Manifest::aad(&manifest::header_json(&header)), &body_json)?
            }
        };
        let chunks = std::mem::take(&mut self.chunks);
        let chunk_count = chunks.len() as u64;
        let m = Manifest::build(header, body_stored, chunks, pack_table, locs)?;
        let bytes = m.encode();
        let mpath = layout.manifest(&m.id);
        let tmp = fsutil::write_temp(&layout.tmp(), "manifest", &bytes)?;
        if let Err(e) = std::fs::rename(&tmp, &mpath) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::io("rename", mpath, e));
        }
        self.manifest_published = Some(mpath);
        fsutil::fsync_dir(&layout.manifests())?;
        crate::fault::point("manifest-published");

        // Generation: from here on the packs may be referenced, never remove them.
        self.point_of_no_return = true;
        let generation =
            index::publish_generation(&layout, &self.key, &m.id, created_ms, self.logical)?;
        self.committed = true;
        let out = PutOutcome {
            reference: format!("{}@{generation}", self.key),
            key: self.key.clone(),
            generation,
            id: m.id,
            logical_bytes: self.logical,
            chunks: chunk_count,
            new_chunks: self.new_chunks,
            new_bytes,
            manifest_bytes: bytes.len() as u64,
            elapsed: self.started.elapsed(),
        };
        tracing::info!(
            reference = %out.reference,
            id = %out.id.short(),
            logical = out.logical_bytes,
            new_bytes = out.new_bytes,
            chunks = out.chunks,
            new_chunks = out.new_chunks,
            "checkpoint stored"
        );
        Ok(out)
    }
}

impl Drop for CheckpointWriter<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Some(p) = self.pack.take() {
            let _ = std::fs::remove_file(p.tmp_path());
        }
        for p in &self.finished {
            let _ = std::fs::remove_file(&p.tmp_path);
        }
        if !self.point_of_no_return {
            // Nothing committed names these: no other writer can have deduped against them
            // (dedup only uses committed manifests).
            for p in &self.published {
                let _ = std::fs::remove_file(p);
            }
            if let Some(m) = &self.manifest_published {
                let _ = std::fs::remove_file(m);
            }
        }
        tracing::debug!(key = %self.key, "uncommitted checkpoint discarded");
    }
}
