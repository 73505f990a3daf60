//! # runc-architect-store: the checkpoint store
//!
//! Where runc-architect keeps a sleeping container's state (CRIU images, rootfs diff, our
//! metadata), and where a replacement pod on another node restores from. Checkpoints are
//! kept as content-addressed chunks plus a manifest, deduplicated at page granularity,
//! verified on every read, crash safe, optionally encrypted per namespace, and collected by a
//! retention policy.
//!
//! ## Model
//!
//! A checkpoint is a file tree (regular files, directories, symlinks; contents and permission
//! bits are kept byte-exact, owners and times are not) stored under a [`CheckpointKey`]:
//! `(namespace, template key, container)`. Each `put` of a key makes a new *generation*
//! (1, 2, ...); the key's *latest* pointer names the newest. A checkpoint also has an *id*,
//! the BLAKE3 of its manifest's logical part. References ([`Reference`]):
//! `NS/KEY/CONTAINER[@GEN|@latest]` or `blake3:HEXPREFIX`.
//!
//! The tree is free-form; the shim and `import` use the Kubernetes checkpoint archive layout
//! (`checkpoint/` with CRIU's images, `config.dump`, `spec.dump`, `rootfs-diff.tar`,
//! `deleted.files`), and a raw CRIU image directory works as well.
//!
//! ## Layout on disk
//!
//! ```text
//! ROOT/                 0700, every file 0600
//!   STORE               format marker (checksummed record)
//!   lock                flock: puts/gets/verify shared, gc exclusive
//!   packs/<id>.pack     immutable chunk packs (see `pack`)
//!   manifests/<id>.manifest   one per checkpoint, named by checkpoint id (see `manifest`)
//!   index/<ns>/.namespace     the namespace's encryption state
//!   index/<ns>/<template>/<container>/gen-NNNNNNNNNN  generation records
//!   index/<ns>/<template>/<container>/.latest        latest pointer (the commit point)
//!   index/<ns>/<template>/<container>/.lock          flock: generation allocation
//!   tmp/                files being written (anything here is garbage after a crash)
//! ```
//!
//! ## Chunking and deduplication
//!
//! CRIU memory images (`pages-*.img`) are cut into 4 KiB pages, so identical pages dedup
//! across replicas of one template and across generations of one container wherever they
//! sit in the file; small files are single chunks; other large files (the rootfs diff) use
//! FastCDC content-defined chunks (see `chunker`). A `put` loads the chunk tables of the
//! latest generation of every container of the same (namespace, template) and of the last
//! two generations of its own container, and writes only chunks not found there (or earlier
//! in the same put) into a new pack. Scoping the lookup this way keeps a `put` independent of
//! the store's total size (no global index to load) while catching the redundancy the store
//! exists for. Each manifest records where each of its chunks lives (pack, offset), so a
//! read needs no index at all.
//!
//! ## Digest choice: BLAKE3
//!
//! Addresses must be collision resistant (a collision would hand out foreign data) and cost
//! little next to a 1 GB/s ingest. BLAKE3 is a 256-bit cryptographic hash (no known attack
//! better than generic; 128-bit collision security) and the fastest such hash on CPUs: it is
//! built from a reduced-round BLAKE2s compression arranged as a tree, so even one 4 KiB page
//! is four 1 KiB chunks hashed in parallel SIMD lanes (AVX2/AVX-512/NEON), giving several
//! GB/s per core where SHA-256 gives 0.5 to 2 GB/s (with SHA-NI). It also has a keyed mode
//! (a PRF/MAC with no HMAC double pass) and a key derivation mode, which the encryption
//! scheme uses, so one primitive serves addresses, MACs and subkeys. xxHash-class hashes
//! would be faster still but are not collision resistant: a crafted page could alias
//! another container's page. The benchmark prints the measured digest speed next to ingest.
//!
//! ## Crash safety
//!
//! Order of a `put` (module `ingest`): new chunks are appended to a pack in `tmp/`, which is
//! fsynced and renamed into `packs/`, and `packs/` is fsynced; then the manifest is written to
//! `tmp/`, fsynced, renamed into `manifests/`, and `manifests/` is fsynced; then, under the
//! key's flock, the generation record is created (temp file, fsync, link(2), which never
//! replaces, directory fsync) and finally the `.latest` pointer is moved to it (temp, fsync,
//! rename, directory fsync). That last rename is the commit point: only generations up to
//! the pointer are visible. So:
//!
//! * a visible generation's manifest and every chunk it names were durable before it became
//!   visible: a crash or a full disk at any point leaves the earlier generations intact and
//!   no partial checkpoint visible (at worst unreferenced packs, manifests, temp files and a
//!   generation record above the pointer, which the next writer of the key or `gc` removes
//!   and `verify` ignores);
//! * a `put` that returned an error (or whose process died before the commit point) is not
//!   visible; one that returned `Ok` is durable;
//! * every store file carries a digest (chunks: their address or stored-bytes hash; packs: a
//!   footer checksum over header and entry table; manifests: a trailing checksum and their id;
//!   records: a checksum line), so a torn or flipped byte is detected, never believed;
//! * concurrent writers of one key serialise generation allocation and the pointer move on
//!   the key's flock (and link(2) refuses to overwrite a generation in any case); writers of
//!   different keys never touch the same file (packs have random names);
//! * a failed `put` removes what it wrote before the commit point (so a full disk gets its
//!   space back at once); nothing can reference those files, because a writer dedups only
//!   against committed manifests.
//!
//! ## Speed
//!
//! Ingest reads each memory image in 1 MiB batches, hashes the pages of a batch on the
//! store's rayon pool, looks them up in an in-memory table, and writes the new ones to the
//! pack with one writev(2) per batch straight from the read buffer (adjacent pages coalesced).
//! `benches/benches/store.rs` measures it next to the raw BLAKE3 speed on the same machine.
//!
//! ## Reads
//!
//! [`Store::materialize`] checks every chunk before its bytes reach the destination:
//! BLAKE3 of plaintext chunks must equal their address; encrypted chunks must authenticate
//! and their plaintext's keyed address must match. Work is split in runs of chunks adjacent
//! in one pack (one large `pread`, one large `pwrite`), spread over a rayon pool. Output goes
//! to a temporary directory next to the destination, renamed into place at the end: on any
//! error the temporary directory is removed and the destination is left untouched. (Clone or
//! `copy_file_range` would skip the user-space pass, but every byte has to be read and hashed
//! anyway to be verified, so a verified read followed by one large write is the fast path.)
//!
//! ## Encryption at rest
//!
//! Configured per namespace with a key file (32 bytes, raw or hex). Subkeys derive from the
//! key *and the namespace name* with BLAKE3's KDF. A chunk's address is the keyed BLAKE3 of
//! its plaintext (a PRF: addresses leak nothing, and equal pages in one namespace still
//! dedup); its ciphertext is XChaCha20-Poly1305 with a nonce taken from the address and the
//! address as associated data: convergent (deterministic) within a namespace, unrelated
//! across namespaces, and a nonce repeats only for the same plaintext. Manifest bodies (file
//! names, sizes, metadata) are sealed with a random nonce, binding the cleartext header. The
//! namespace's key fingerprint is recorded on first use: a wrong key, a missing key, or a
//! key offered for a plaintext namespace is a clear error, and a tampered chunk fails
//! authentication. See `crypt`.
//!
//! ## Garbage collection
//!
//! [`Store::gc`] applies a [`RetentionPolicy`] (keep the last N generations per container,
//! drop generations older than an age, then drop the oldest generations until live data fits
//! a byte quota), removes unreferenced manifests and packs, and rewrites packs whose live
//! fraction fell below a threshold (copying live chunks into a new pack, then atomically
//! rewriting the location part of the manifests that use them, then deleting the old pack;
//! a crash in between leaves both copies valid). Safety: every `put`, `get`, `export`
//! and `verify` holds the store lock *shared* for its whole duration, and gc holds it
//! *exclusive*; a writer only dedups against chunks of committed manifests, read under its
//! shared lock; so gc never runs while a checkpoint is being written or read, and everything
//! a committed generation names is live. Anything in `tmp/` when gc holds the lock belongs
//! to a dead writer.
//!
//! ## Using it from async code
//!
//! The API is synchronous and [`Store`] is `Send + Sync`: share it in an `Arc` and call it
//! from `tokio::task::spawn_blocking`. Store calls may block on the store lock while gc
//! runs.
//!
//! ```no_run
//! use runc_architect_store::{CheckpointKey, Reference, Store, StoreConfig};
//! # fn main() -> Result<(), runc_architect_store::StoreError> {
//! let store = Store::open(&StoreConfig::load("/etc/runc-architect/store.toml".as_ref())?)?;
//! let key = CheckpointKey::new("default", "web-5d8f7c9b4", "web-0")?;
//! let put = store.put_dir(&key, "/run/ckpt/web-0".as_ref(), Default::default())?;
//! store.materialize(&put.reference.parse::<Reference>()?, "/run/restore/web-0".as_ref(), &Default::default())?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod archive;
pub mod chunker;
pub mod config;
pub mod crypt;
pub mod digest;
pub mod error;
pub mod fault;
pub mod fsutil;
pub mod gc;
pub mod index;
pub mod ingest;
pub mod manifest;
pub mod materialize;
pub mod pack;
pub mod reference;
pub mod stats;
pub mod verify;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::config::{RetentionPolicy, StoreConfig};
pub use crate::crypt::NamespaceKey;
pub use crate::digest::Digest;
pub use crate::error::{Result, StoreError};
pub use crate::gc::{GcOptions, GcReport};
pub use crate::index::CheckpointInfo;
pub use crate::ingest::{CheckpointWriter, PutOutcome};
pub use crate::manifest::{Entry, EntryKind, ManifestBody};
pub use crate::materialize::{MaterializeOptions, MaterializeReport};
pub use crate::reference::{CheckpointKey, Generation, Reference};
pub use crate::stats::Stats;
pub use crate::verify::VerifyReport;

use crate::error::IoContext;
use crate::fsutil::{LockGuard, LockKind};
use crate::index::Layout;
use crate::manifest::Manifest;

const FORMAT_NAME: &str = "runc-architect-store";
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u32,
}

/// An open store. Cheap to share (`Arc<Store>`); all methods take `&self`.
pub struct Store {
    layout: Layout,
    keys: HashMap<String, Arc<NamespaceKey>>,
    retention: RetentionPolicy,
    pool: Option<rayon::ThreadPool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.layout.root())
            .field(
                "encrypted_namespaces",
                &self.keys.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// What `inspect` shows of a checkpoint.
#[derive(Clone, Debug)]
pub struct Inspection {
    /// Where it is in the index.
    pub info: CheckpointInfo,
    /// Its manifest's cleartext header.
    pub header: manifest::ManifestHeader,
    /// File tree and metadata.
    pub body: ManifestBody,
    /// Number of chunks (with repeats).
    pub chunks: usize,
    /// Number of distinct chunks.
    pub unique_chunks: usize,
    /// Packs holding its chunks.
    pub packs: Vec<String>,
    /// Size of the manifest file.
    pub manifest_bytes: u64,
}

impl Store {
    /// Opens (creating if needed) the store described by `config`, loading its key files.
    pub fn open(config: &StoreConfig) -> Result<Self> {
        let root = &config.root;
        fsutil::create_dir_all_durable(root)?;
        let meta = std::fs::metadata(root).ctx("stat", root)?;
        if !meta.is_dir() {
            return Err(StoreError::NotAStore {
                path: root.clone(),
                reason: "not a directory".into(),
            });
        }
        if meta.permissions().mode() & 0o777 != fsutil::DIR_MODE {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(fsutil::DIR_MODE))
                .ctx("chmod", root)?;
        }
        let layout = Layout::new(root);
        let marker = layout.marker();
        let wanted = Marker {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
        };
        if !marker.exists() {
            // Refuse to turn a non-empty foreign directory into a store.
            let foreign = std::fs::read_dir(root)
                .ctx("read directory", root)?
                .filter_map(|e| e.ok())
                .any(|e| {
                    !matches!(
                        e.file_name().to_str(),
                        Some("lock" | "packs" | "manifests" | "index" | "tmp")
                    ) && !e.file_name().to_string_lossy().starts_with(".tmp-")
                });
            if foreign {
                return Err(StoreError::NotAStore {
                    path: root.clone(),
                    reason: "directory is not empty and has no STORE marker".into(),
                });
            }
            fsutil::atomic_create(&marker, &fsutil::encode_record(&wanted))?;
        }
        let found: Marker = fsutil::read_record(&marker)?;
        if found.format != FORMAT_NAME || found.version != FORMAT_VERSION {
            return Err(StoreError::NotAStore {
                path: root.clone(),
                reason: format!("format {} version {}", found.format, found.version),
            });
        }
        for d in [
            layout.packs(),
            layout.manifests(),
            layout.index(),
            layout.tmp(),
        ] {
            fsutil::create_dir_all_durable(&d)?;
        }
        let mut keys = HashMap::new();
        for (ns, path) in &config.keys {
            reference::validate_name("namespace", ns)?;
            keys.insert(ns.clone(), Arc::new(NamespaceKey::load(ns, path)?));
        }
        let pool = match config.threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("ra-store-{i}"))
                    .build()
                    .map_err(|e| StoreError::Config {
                        path: root.clone(),
                        reason: format!("thread pool: {e}"),
                    })?,
            ),
            None => None,
        };
        Ok(Store {
            layout,
            keys,
            retention: config.retention.clone(),
            pool,
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// The retention policy from the configuration.
    pub fn retention(&self) -> &RetentionPolicy {
        &self.retention
    }

    /// Adds (or replaces) the key of an encrypted namespace.
    pub fn set_key(&mut self, key: NamespaceKey) {
        self.keys.insert(key.namespace().to_owned(), Arc::new(key));
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(crate) fn key_for(&self, ns: &str) -> Option<Arc<NamespaceKey>> {
        self.keys.get(ns).cloned()
    }

    /// Runs `f` on the store's thread pool (or the global rayon pool).
    pub(crate) fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    pub(crate) fn lock(&self, kind: LockKind) -> Result<LockGuard> {
        fsutil::lock_file(&self.layout.lock(), kind)
    }

    /// Starts writing a new checkpoint of `key`. Holds the store lock shared until the
    /// writer is committed or dropped (dropping without commit discards everything).
    pub fn writer(
        &self,
        key: &CheckpointKey,
        metadata: std::collections::BTreeMap<String, String>,
    ) -> Result<CheckpointWriter<'_>> {
        CheckpointWriter::new(self, key.clone(), metadata)
    }

    /// Ingests a directory tree as a new generation of `key`.
    pub fn put_dir(
        &self,
        key: &CheckpointKey,
        src: &Path,
        metadata: std::collections::BTreeMap<String, String>,
    ) -> Result<PutOutcome> {
        let mut w = self.writer(key, metadata)?;
        w.add_tree("", src)?;
        w.commit()
    }

    /// Resolves a reference to a visible checkpoint.
    pub fn resolve(&self, r: &Reference) -> Result<CheckpointInfo> {
        let not_found = || StoreError::NotFound {
            reference: r.to_string(),
        };
        match r {
            Reference::Key(key, gen) => {
                let g = match gen {
                    Generation::Latest => {
                        index::latest_generation(&self.layout, key)?.ok_or_else(not_found)?
                    }
                    Generation::Number(n) => *n,
                };
                let path = self.layout.generation(key, g);
                if !index::list_generations(&self.layout, key)?.contains(&g) {
                    return Err(not_found());
                }
                let rec = index::read_generation(&self.layout, key, g)?;
                let latest = index::latest_generation(&self.layout, key)?;
                Ok(CheckpointInfo {
                    key: key.clone(),
                    generation: g,
                    id: rec.manifest_id(&path)?,
                    created_ms: rec.created_ms,
                    logical_size: rec.logical_size,
                    latest: latest == Some(g),
                })
            }
            Reference::Id(prefix) => {
                let mut found: Vec<CheckpointInfo> = Vec::new();
                for key in index::list_keys(&self.layout, None, None)? {
                    for info in index::list_checkpoints(&self.layout, &key)? {
                        if info.id.to_hex().starts_with(prefix.as_str()) {
                            found.push(info);
                        }
                    }
                }
                let mut ids: Vec<Digest> = found.iter().map(|i| i.id).collect();
                ids.sort();
                ids.dedup();
                match ids.len() {
                    0 => Err(not_found()),
                    1 => found.into_iter().next().ok_or_else(not_found),
                    n => Err(StoreError::Ambiguous {
                        reference: r.to_string(),
                        count: n,
                    }),
                }
            }
        }
    }

    /// Loads and checks a manifest by checkpoint id.
    pub(crate) fn load_manifest(&self, id: &Digest) -> Result<Manifest> {
        let path = self.layout.manifest(id);
        let data = std::fs::read(&path).ctx("read", &path)?;
        let m = Manifest::decode(&path, &data)?;
        if m.id != *id {
            return Err(StoreError::CorruptManifest {
                path,
                reason: format!("content has id {}", m.id),
            });
        }
        Ok(m)
    }

    /// Lists visible checkpoints, optionally of one namespace / template / container.
    pub fn list(
        &self,
        namespace: Option<&str>,
        template: Option<&str>,
        container: Option<&str>,
    ) -> Result<Vec<CheckpointInfo>> {
        let mut out = Vec::new();
        for key in index::list_keys(&self.layout, namespace, template)? {
            if container.is_some_and(|c| c != key.container) {
                continue;
            }
            out.extend(index::list_checkpoints(&self.layout, &key)?);
        }
        Ok(out)
    }

    /// Describes a checkpoint (needs the namespace key if it is encrypted).
    pub fn inspect(&self, r: &Reference) -> Result<Inspection> {
        let _lock = self.lock(LockKind::Shared)?;
        let info = self.resolve(r)?;
        let m = self.load_manifest(&info.id)?;
        let key = self.key_for(&m.header.namespace);
        let body = m.body(key.as_deref(), &self.layout.manifest(&info.id))?;
        let mut uniq: Vec<Digest> = m.chunks.iter().map(|c| c.addr).collect();
        uniq.sort_unstable();
        uniq.dedup();
        Ok(Inspection {
            header: m.header.clone(),
            body,
            chunks: m.chunks.len(),
            unique_chunks: uniq.len(),
            packs: m.packs.iter().map(|p| p.to_string()).collect(),
            manifest_bytes: m.encoded_len() as u64,
            info,
        })
    }

    /// Writes a checkpoint's tree into `dest` (which must not exist, or be an empty
    /// directory), verifying every chunk. See the crate docs ("Reads").
    pub fn materialize(
        &self,
        r: &Reference,
        dest: &Path,
        opts: &MaterializeOptions,
    ) -> Result<MaterializeReport> {
        materialize::materialize(self, r, dest, opts)
    }

    /// Checks every pack, manifest and index record.
    pub fn verify(&self) -> Result<VerifyReport> {
        verify::verify(self)
    }

    /// Applies a retention policy and reclaims space.
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        gc::gc(self, opts)
    }

    /// Sizes and counts.
    pub fn stats(&self) -> Result<Stats> {
        stats::stats(self)
    }

    /// Writes a checkpoint as a Kubernetes checkpoint archive (uncompressed tar).
    pub fn export(&self, r: &Reference, out: &Path) -> Result<CheckpointInfo> {
        archive::export(self, r, out)
    }

    /// Ingests a Kubernetes checkpoint archive. `key` overrides the key derived from the
    /// archive's `spec.dump` / `config.dump`.
    pub fn import(&self, archive_path: &Path, key: Option<&CheckpointKey>) -> Result<PutOutcome> {
        archive::import(self, archive_path, key)
    }
}
