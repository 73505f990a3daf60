//! The store's error type: every variant carries what a person needs to find the problem
//! (paths, references, chunk digests).

use std::path::PathBuf;

use crate::digest::Digest;

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call on a path failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "write", "rename", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The storage device is full (or out of inodes / over quota).
    #[error("no space left while trying to {op} {}: the previous generations are untouched", path.display())]
    NoSpace {
        /// What was being done.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
    },

    /// A name (namespace, template key, container) is not acceptable.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A checkpoint reference could not be parsed.
    #[error("invalid checkpoint reference {reference:?}: {reason}")]
    InvalidRef {
        /// The reference given.
        reference: String,
        /// Why it was refused.
        reason: String,
    },

    /// No checkpoint matches the reference.
    #[error("no checkpoint {reference}")]
    NotFound {
        /// The reference looked up.
        reference: String,
    },

    /// A digest prefix matches several checkpoints.
    #[error("checkpoint reference {reference} is ambiguous: it matches {count} checkpoints")]
    Ambiguous {
        /// The reference looked up.
        reference: String,
        /// How many checkpoints it matched.
        count: usize,
    },

    /// A chunk's bytes do not match its digest, or do not authenticate.
    #[error("{0}")]
    CorruptChunk(Box<ChunkFault>),

    /// A manifest is damaged.
    #[error("manifest {}: {reason}", path.display())]
    CorruptManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A pack file is damaged.
    #[error("pack {}: {reason}", path.display())]
    CorruptPack {
        /// The pack file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A small metadata file (generation record, namespace record, store marker) is damaged.
    #[error("record {}: {reason}", path.display())]
    CorruptRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// An encrypted namespace was used without its key.
    #[error("namespace {namespace} is encrypted (key fingerprint {fingerprint}) but no key is configured for it")]
    MissingKey {
        /// The namespace.
        namespace: String,
        /// The fingerprint of the key its checkpoints were written with.
        fingerprint: String,
    },

    /// The configured key is not the namespace's key.
    #[error("wrong key for namespace {namespace}: its checkpoints were written with key fingerprint {expected}, the configured key has fingerprint {actual}")]
    WrongKey {
        /// The namespace.
        namespace: String,
        /// Fingerprint recorded in the store.
        expected: String,
        /// Fingerprint of the configured key.
        actual: String,
    },

    /// A key was configured for a namespace that already holds unencrypted checkpoints.
    #[error("namespace {namespace} holds unencrypted checkpoints; refusing to mix them with encrypted ones (use another namespace)")]
    UnexpectedKey {
        /// The namespace.
        namespace: String,
    },

    /// A key file could not be used.
    #[error("key file {} for namespace {namespace}: {reason}", path.display())]
    BadKeyFile {
        /// The namespace.
        namespace: String,
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// Authenticated decryption of metadata failed.
    #[error("{what} failed authentication: wrong key or tampered data")]
    Decrypt {
        /// What was being decrypted.
        what: String,
    },

    /// The input directory or archive holds something the store cannot keep.
    #[error("cannot store {}: {reason}", path.display())]
    Unsupported {
        /// The offending path.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// The destination of a materialization already exists and is not an empty directory.
    #[error("destination {} already exists and is not an empty directory", path.display())]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },

    /// The configuration file is unusable.
    #[error("configuration {}: {reason}", path.display())]
    Config {
        /// The configuration file (or "-" for built-in values).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A checkpoint archive (Kubernetes layout tar) is unusable.
    #[error("checkpoint archive {}: {reason}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The store directory is not a store, or of an unknown format version.
    #[error("{} is not a usable store: {reason}", path.display())]
    NotAStore {
        /// The root given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    /// Wraps an I/O error with the operation and path, recognising a full device.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace { op, path },
            _ => StoreError::Io { op, path, source },
        }
    }

    /// True when the error reports corrupt or unauthenticated data.
    pub fn is_integrity_error(&self) -> bool {
        matches!(
            self,
            StoreError::CorruptChunk(_)
                | StoreError::CorruptManifest { .. }
                | StoreError::CorruptPack { .. }
                | StoreError::CorruptRecord { .. }
                | StoreError::Decrypt { .. }
        )
    }
}

/// Details of a corrupt chunk met while reading a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFault {
    /// The checkpoint being read.
    pub checkpoint: String,
    /// The file inside the checkpoint.
    pub file: String,
    /// The chunk's address.
    pub chunk: Digest,
    /// The pack holding it.
    pub pack: String,
    /// Its offset in the pack.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for ChunkFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint {}: chunk {} of {} (pack {}, offset {}) is corrupt: {}",
            self.checkpoint, self.chunk, self.file, self.pack, self.offset, self.reason
        )
    }
}

/// Extension to attach an operation and a path to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| StoreError::io(op, path, e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| StoreError::io(op, path, std::io::Error::from(e)))
    }
}
