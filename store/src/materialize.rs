//! Reading checkpoints back: verified, parallel, into a temporary directory renamed at the end.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::crypt::NamespaceKey;
use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, LockKind};
use crate::index::CheckpointInfo;
use crate::manifest::{Entry, EntryKind, Manifest, ManifestBody};
use crate::pack;
use crate::reference::Reference;
use crate::Store;

/// Largest run of chunks read and written at once.
const RUN_MAX: u64 = 8 << 20;

/// Options of [`Store::materialize`].
#[derive(Clone, Debug, Default)]
pub struct MaterializeOptions {
    /// fsync the result before it is renamed into place (durable across a power loss).
    pub sync: bool,
}

/// What a materialization did.
#[derive(Clone, Debug)]
pub struct MaterializeReport {
    /// The checkpoint.
    pub info: CheckpointInfo,
    /// Regular files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Everything needed to read a checkpoint's chunks with verification.
pub(crate) struct ReadContext {
    pub manifest: Manifest,
    pub body: ManifestBody,
    key: Option<Arc<NamespaceKey>>,
    packs: Vec<(PathBuf, File)>,
    label: String,
}

/// A run of chunks of one file adjacent in one pack.
#[derive(Clone, Copy, Debug)]
struct Run {
    file: usize,
    file_offset: u64,
    first: usize,
    end: usize,
}

impl ReadContext {
    pub fn open(store: &Store, info: &CheckpointInfo) -> Result<Self> {
        let manifest = store.load_manifest(&info.id)?;
        let mpath = store.layout().manifest(&info.id);
        if manifest.header.namespace != info.key.namespace
            || manifest.header.template != info.key.template
            || manifest.header.container != info.key.container
        {
            return Err(StoreError::CorruptManifest {
                path: mpath,
                reason: format!(
                    "belongs to {}/{}/{}, not {}",
                    manifest.header.namespace,
                    manifest.header.template,
                    manifest.header.container,
                    info.key
                ),
            });
        }
        let key = store.key_for(&manifest.header.namespace);
        let body = manifest.body(key.as_deref(), &mpath)?;
        let mut packs = Vec::with_capacity(manifest.packs.len());
        for id in &manifest.packs {
            let p = store.layout().pack(id);
            let f = File::open(&p).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    StoreError::CorruptPack {
                        path: p.clone(),
                        reason: format!("missing (needed by checkpoint {})", info.reference()),
                    }
                } else {
                    StoreError::io("open", &p, e)
                }
            })?;
            packs.push((p, f));
        }
        Ok(ReadContext {
            manifest,
            body,
            key,
            packs,
            label: format!("{} (blake3:{})", info.reference(), info.id.short()),
        })
    }

    fn corrupt(&self, file: &str, chunk: usize, reason: String) -> StoreError {
        let loc = self.manifest.locs[chunk];
        StoreError::CorruptChunk(Box::new(crate::error::ChunkFault {
            checkpoint: self.label.clone(),
            file: file.to_owned(),
            chunk: self.manifest.chunks[chunk].addr,
            pack: self.manifest.packs[loc.pack as usize].to_string(),
            offset: loc.offset,
            reason,
        }))
    }

    /// Splits a file entry's chunks into runs adjacent in one pack.
    fn runs(&self, file: usize, entry: &Entry, out: &mut Vec<Run>) {
        let first = entry.first_chunk as usize;
        let end = first + entry.chunk_count as usize;
        let mut i = first;
        let mut file_offset = 0u64;
        while i < end {
            let start_loc = self.manifest.locs[i];
            let mut j = i + 1;
            let mut bytes = u64::from(start_loc.stored_len);
            let mut next = start_loc.offset + u64::from(start_loc.stored_len);
            while j < end {
                let l = self.manifest.locs[j];
                if l.pack != start_loc.pack
                    || l.offset != next
                    || bytes + u64::from(l.stored_len) > RUN_MAX
                {
                    break;
                }
                bytes += u64::from(l.stored_len);
                next += u64::from(l.stored_len);
                j += 1;
            }
            out.push(Run {
                file,
                file_offset,
                first: i,
                end: j,
            });
            file_offset += self.manifest.chunks[i..j]
                .iter()
                .map(|c| u64::from(c.raw_len))
                .sum::<u64>();
            i = j;
        }
    }

    /// Reads a run and returns its verified plaintext in `out` (`scratch` is reused).
    fn read_run(
        &self,
        file: &str,
        run: &Run,
        stored: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let loc0 = self.manifest.locs[run.first];
        let total: u64 = self.manifest.locs[run.first..run.end]
            .iter()
            .map(|l| u64::from(l.stored_len))
            .sum();
        let (ppath, pfile) = &self.packs[loc0.pack as usize];
        let total32 = u32::try_from(total)
            .map_err(|_| self.corrupt(file, run.first, "run too large".into()))?;
        pack::read_stored(pfile, ppath, loc0.offset, total32, stored)?;
        out.clear();
        let mut pos = 0usize;
        let mut plain = Vec::new();
        for i in run.first..run.end {
            let c = self.manifest.chunks[i];
            let len = self.manifest.locs[i].stored_len as usize;
            let data = &stored[pos..pos + len];
            pos += len;
            if self.manifest.header.encryption.is_none() {
                if len != c.raw_len as usize {
                    return Err(self.corrupt(
                        file,
                        i,
                        format!("stored length {len}, expected {}", c.raw_len),
                    ));
                }
                let actual = Digest::of(data);
                if actual != c.addr {
                    return Err(self.corrupt(file, i, format!("content hashes to {actual}")));
                }
                out.extend_from_slice(data);
            } else {
                // body() already refused a missing or wrong key.
                let Some(k) = &self.key else {
                    return Err(self.corrupt(file, i, "no key for encrypted chunk".into()));
                };
                plain.clear();
                plain.extend_from_slice(data);
                k.open_chunk(&c.addr, &mut plain)
                    .map_err(|r| self.corrupt(file, i, r))?;
                if plain.len() != c.raw_len as usize {
                    return Err(self.corrupt(file, i, "plaintext length mismatch".into()));
                }
                out.extend_from_slice(&plain);
            }
        }
        Ok(())
    }

    /// A verified reader of one file entry (for archives).
    pub fn entry_reader<'a>(&'a self, entry: &'a Entry) -> EntryReader<'a> {
        let mut runs = Vec::new();
        if entry.kind == EntryKind::File {
            self.runs(0, entry, &mut runs);
        }
        EntryReader {
            ctx: self,
            entry,
            runs,
            next: 0,
            buf: Vec::new(),
            stored: Vec::new(),
            pos: 0,
        }
    }
}

/// Streams a file of a checkpoint, verifying each chunk before handing out its bytes.
pub struct EntryReader<'a> {
    ctx: &'a ReadContext,
    entry: &'a Entry,
    runs: Vec<Run>,
    next: usize,
    buf: Vec<u8>,
    stored: Vec<u8>,
    pos: usize,
}

impl Read for EntryReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.next == self.runs.len() {
                return Ok(0);
            }
            let run = self.runs[self.next];
            self.next += 1;
            self.ctx
                .read_run(&self.entry.path, &run, &mut self.stored, &mut self.buf)
                .map_err(std::io::Error::other)?;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

pub(crate) fn materialize(
    store: &Store,
    r: &Reference,
    dest: &Path,
    opts: &MaterializeOptions,
) -> Result<MaterializeReport> {
    let started = Instant::now();
    let _lock = store.lock(LockKind::Shared)?;
    let info = store.resolve(r)?;
    let ctx = ReadContext::open(store, &info)?;

    // The destination must be absent or an empty directory.
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            if std::fs::read_dir(dest)
                .ctx("read directory", dest)?
                .next()
                .is_some()
            {
                return Err(StoreError::DestinationExists {
                    path: dest.to_owned(),
                });
            }
        }
        Ok(_) => {
            return Err(StoreError::DestinationExists {
                path: dest.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("stat", dest, e)),
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| StoreError::Unsupported {
            path: dest.to_owned(),
            reason: "destination has no file name".into(),
        })?;
    std::fs::create_dir_all(&parent).ctx("create directory", &parent)?;
    let tmp = parent.join(format!(".{name}{}", fsutil::temp_name("get")));
    std::fs::DirBuilder::new()
        .mode(fsutil::DIR_MODE)
        .create(&tmp)
        .ctx("create directory", &tmp)?;
    let res = fill(store, &ctx, &tmp, opts);
    let (files, bytes) = match res {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            tracing::warn!(checkpoint = %info.reference(), error = %e, "materialize failed; nothing written");
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(StoreError::io("rename", dest, e));
    }
    if opts.sync {
        fsutil::fsync_dir(&parent)?;
    }
    let report = MaterializeReport {
        info,
        files,
        bytes,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        checkpoint = %report.info.reference(),
        dest = %dest.display(),
        bytes,
        ms = report.elapsed.as_millis() as u64,
        "checkpoint materialized"
    );
    Ok(report)
}

fn fill(
    store: &Store,
    ctx: &ReadContext,
    tmp: &Path,
    opts: &MaterializeOptions,
) -> Result<(usize, u64)> {
    let entries = &ctx.body.entries;
    // Directories first (entries list parents before children), then files and links.
    for e in entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        let p = tmp.join(&e.path);
        std::fs::DirBuilder::new()
            .mode(fsutil::DIR_MODE)
            .create(&p)
            .ctx("create directory", &p)?;
    }
    let mut files: Vec<Option<(PathBuf, File)>> = Vec::with_capacity(entries.len());
    let mut runs = Vec::new();
    let mut bytes = 0u64;
    let mut nfiles = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let p = tmp.join(&e.path);
        match e.kind {
            EntryKind::File => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(fsutil::FILE_MODE)
                    .open(&p)
                    .ctx("create", &p)?;
                f.set_len(e.size).ctx("truncate", &p)?;
                ctx.runs(i, e, &mut runs);
                bytes += e.size;
                nfiles += 1;
                files.push(Some((p, f)));
            }
            EntryKind::Symlink => {
                let target = e.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(target, &p).ctx("symlink", &p)?;
                files.push(None);
            }
            EntryKind::Dir => files.push(None),
        }
    }
    store.run(|| {
        runs.par_iter().try_for_each_init(
            || (Vec::new(), Vec::new()),
            |(stored, plain), run| {
                let e = &entries[run.file];
                ctx.read_run(&e.path, run, stored, plain)?;
                if let Some((p, f)) = &files[run.file] {
                    f.write_all_at(plain, run.file_offset).ctx("write", p)?;
                }
                Ok::<(), StoreError>(())
            },
        )
    })?;
    // Permissions last (a read-only directory must not block creating its children).
    for (e, f) in entries.iter().zip(&files) {
        if let Some((p, f)) = f {
            f.set_permissions(std::fs::Permissions::from_mode(e.mode))
                .ctx("chmod", p)?;
        }
    }
    for e in entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
        let p = tmp.join(&e.path);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(e.mode)).ctx("chmod", &p)?;
    }
    if opts.sync {
        // fsync each file (in parallel) and directory; syncfs would flush the whole file
        // system, other tenants' dirty data included.
        store.run(|| {
            files
                .par_iter()
                .flatten()
                .try_for_each(|(p, f)| f.sync_data().ctx("fsync", p))
        })?;
        for e in entries.iter().filter(|e| e.kind == EntryKind::Dir) {
            fsutil::fsync_dir(&tmp.join(&e.path))?;
        }
        fsutil::fsync_dir(tmp)?;
    }
    Ok((nfiles, bytes))
}
