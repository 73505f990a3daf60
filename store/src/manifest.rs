//! Manifests: what a checkpoint is made of.
//!
//! Layout (little-endian):
//!
//! ```text
//! logical part (its BLAKE3 is the checkpoint id; never changes)
//!   "RAMANIF1"
//!   u32 len | header JSON (cleartext: names, time, sizes, encryption fingerprint)
//!   u32 len | body (JSON of the file tree and metadata; sealed with the namespace's
//!                   manifest key when the namespace is encrypted)
//!   u64 n   | n x (chunk address [32] | raw length u32)
//! location part (rewritten by gc when it repacks; chunk digests make it self-checking)
//!   u32 p   | p x pack id [16]
//!   n x (pack number u32 | offset u64 | stored length u32)
//! BLAKE3 of all the bytes above [32]
//! ```
//!
//! The trailing checksum catches any damaged byte at load; the id (file name) catches a
//! manifest swapped for another. Every file entry names a range of the chunk table.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::crypt::NamespaceKey;
use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::pack::PackId;

const MAGIC: &[u8; 8] = b"RAMANIF1";
/// Current manifest format.
pub const FORMAT: u32 = 1;

/// Cleartext header of a manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestHeader {
    /// Format version.
    pub format: u32,
    /// Namespace.
    pub namespace: String,
    /// Template key.
    pub template: String,
    /// Container name.
    pub container: String,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Sum of file sizes.
    pub logical_size: u64,
    /// Number of tree entries.
    pub entries: u64,
    /// Set when the body and chunks are encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionInfo>,
}

/// How a manifest's namespace is encrypted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptionInfo {
    /// AEAD used.
    pub cipher: String,
    /// Fingerprint of the namespace key.
    pub key_fingerprint: String,
}

/// Name of the AEAD recorded in manifests.
pub const CIPHER: &str = "xchacha20poly1305-convergent";

/// Kind of a tree entry.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
}

/// One entry of the checkpoint's file tree.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// Relative path, '/'-separated.
    pub path: String,
    /// Kind.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// File size (files only).
    #[serde(default)]
    pub size: u64,
    /// Link target (symlinks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// First chunk in the chunk table (files only).
    #[serde(default)]
    pub first_chunk: u64,
    /// Number of chunks (files only).
    #[serde(default)]
    pub chunk_count: u64,
}

/// The (possibly encrypted) body of a manifest.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestBody {
    /// Caller metadata (labels).
    pub metadata: BTreeMap<String, String>,
    /// The file tree, parents before children.
    pub entries: Vec<Entry>,
}

/// A chunk of the logical chunk table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// Address.
    pub addr: Digest,
    /// Plaintext length.
    pub raw_len: u32,
}

/// Where a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// Index into [`Manifest::packs`].
    pub pack: u32,
    /// Offset in the pack.
    pub offset: u64,
    /// Stored length.
    pub stored_len: u32,
}

/// A decoded manifest.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The checkpoint id: BLAKE3 of the logical part.
    pub id: Digest,
    /// Cleartext header.
    pub header: ManifestHeader,
    /// The body as stored (plain JSON or sealed).
    body_stored: Vec<u8>,
    /// Raw bytes of the logical part (kept to rewrite locations).
    logical: Vec<u8>,
    /// Chunk table.
    pub chunks: Vec<ChunkRef>,
    /// Packs referenced by `locs`.
    pub packs: Vec<PackId>,
    /// Location of each chunk (same length as `chunks`).
    pub locs: Vec<ChunkLoc>,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

impl Manifest {
    /// Builds a manifest from its parts (body already sealed if encrypted).
    pub fn build(
        header: ManifestHeader,
        body_stored: Vec<u8>,
        chunks: Vec<ChunkRef>,
        packs: Vec<PackId>,
        locs: Vec<ChunkLoc>,
    ) -> Result<Self> {
        let header_json = serde_json::to_vec(&header).map_err(|e| StoreError::CorruptManifest {
            path: "<new>".into(),
            reason: e.to_string(),
        })?;
        let logical = encode_logical(&header_json, &body_stored, &chunks)?;
        Ok(Manifest {
            id: Digest::of(&logical),
            header,
            body_stored,
            logical,
            chunks,
            packs,
            locs,
        })
    }

    /// The manifest file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.logical.len() + 4 + self.packs.len() * 16 + self.locs.len() * 16 + 32,
        );
        out.extend_from_slice(&self.logical);
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for p in &self.packs {
            out.extend_from_slice(&p.0);
        }
        for l in &self.locs {
            out.extend_from_slice(&l.pack.to_le_bytes());
            out.extend_from_slice(&l.offset.to_le_bytes());
            out.extend_from_slice(&l.stored_len.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Bytes of the header as it is bound into the sealed body.
    pub fn aad(header_json: &[u8]) -> Vec<u8> {
        let mut aad = MAGIC.to_vec();
        aad.extend_from_slice(header_json);
        aad
    }

    /// Decodes and checks a manifest file's bytes.
    pub fn decode(path: &Path, data: &[u8]) -> Result<Self> {
        let corrupt = |reason: &str| StoreError::CorruptManifest {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        if data.len() < MAGIC.len() + 32 {
            return Err(corrupt("too short"));
        }
        let (content, sum) = data.split_at(data.len() - 32);
        if blake3::hash(content).as_bytes() != sum {
            return Err(corrupt("checksum mismatch"));
        }
        let mut c = Cursor {
            data: content,
            pos: 0,
        };
        if c.take(8) != Some(MAGIC.as_slice()) {
            return Err(corrupt("bad magic"));
        }
        let short = || corrupt("truncated");
        let hlen = c.u32().ok_or_else(short)? as usize;
        let header_json = c.take(hlen).ok_or_else(short)?;
        let header: ManifestHeader =
            serde_json::from_slice(header_json).map_err(|e| corrupt(&format!("header: {e}")))?;
        if header.format != FORMAT {
            return Err(corrupt(&format!("unknown format {}", header.format)));
        }
        let blen = c.u32().ok_or_else(short)? as usize;
        let body_stored = c.take(blen).ok_or_else(short)?.to_vec();
        let n = c.u64().ok_or_else(short)?;
        let n = usize::try_from(n).map_err(|_| short())?;
        if n.checked_mul(52).is_none_or(|b| b > content.len()) {
            return Err(short());
        }
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            let addr = Digest::from_slice(c.take(32).ok_or_else(short)?).ok_or_else(short)?;
            let raw_len = c.u32().ok_or_else(short)?;
            chunks.push(ChunkRef { addr, raw_len });
        }
        let logical_end = c.pos;
        let p = c.u32().ok_or_else(short)? as usize;
        let mut packs = Vec::with_capacity(p.min(1 << 16));
        for _ in 0..p {
            let b: [u8; 16] = c
                .take(16)
                .ok_or_else(short)?
                .try_into()
                .map_err(|_| short())?;
            packs.push(PackId(b));
        }
        let mut locs = Vec::with_capacity(n);
        for _ in 0..n {
            let pack = c.u32().ok_or_else(short)?;
            let offset = c.u64().ok_or_else(short)?;
            let stored_len = c.u32().ok_or_else(short)?;
            if pack as usize >= packs.len() {
                return Err(corrupt("chunk location names a pack outside the table"));
            }
            locs.push(ChunkLoc {
                pack,
                offset,
                stored_len,
            });
        }
        if c.pos != content.len() {
            return Err(corrupt("trailing bytes"));
        }
        let logical = content[..logical_end].to_vec();
        Ok(Manifest {
            id: Digest::of(&logical),
            header,
            body_stored,
            logical,
            chunks,
            packs,
            locs,
        })
    }

    /// The raw header JSON (bound as AAD into a sealed body).
    fn header_json(&self) -> &[u8] {
        let hlen = u32::from_le_bytes([
            self.logical[8],
            self.logical[9],
            self.logical[10],
            self.logical[11],
        ]) as usize;
        &self.logical[12..12 + hlen]
    }

    /// Decodes (and if needed decrypts) the body, and checks it against the chunk table.
    pub fn body(&self, key: Option<&NamespaceKey>, path: &Path) -> Result<ManifestBody> {
        let plain = match (&self.header.encryption, key) {
            (None, _) => self.body_stored.clone(),
            (Some(info), None) => {
                return Err(StoreError::MissingKey {
                    namespace: self.header.namespace.clone(),
                    fingerprint: info.key_fingerprint.clone(),
                })
            }
            (Some(info), Some(k)) => {
                if info.key_fingerprint != k.fingerprint() {
                    return Err(StoreError::WrongKey {
                        namespace: self.header.namespace.clone(),
                        expected: info.key_fingerprint.clone(),
                        actual: k.fingerprint().to_owned(),
                    });
                }
                k.open_manifest(
                    &Self::aad(self.header_json()),
                    &self.body_stored,
                    &format!("manifest {}", path.display()),
                )?
            }
        };
        let body: ManifestBody =
            serde_json::from_slice(&plain).map_err(|e| StoreError::CorruptManifest {
                path: path.to_owned(),
                reason: format!("body: {e}"),
            })?;
        self.check_body(&body, path)?;
        Ok(body)
    }

    fn check_body(&self, body: &ManifestBody, path: &Path) -> Result<()> {
        let corrupt = |reason: String| StoreError::CorruptManifest {
            path: path.to_owned(),
            reason,
        };
        let mut logical = 0u64;
        for e in &body.entries {
            check_rel_path(&e.path).map_err(|r| corrupt(format!("entry {:?}: {r}", e.path)))?;
            if e.kind == EntryKind::File {
                let end = e
                    .first_chunk
                    .checked_add(e.chunk_count)
                    .filter(|end| *end <= self.chunks.len() as u64)
                    .ok_or_else(|| {
                        corrupt(format!("entry {:?}: chunk range out of table", e.path))
                    })?;
                let sum: u64 = self.chunks[e.first_chunk as usize..end as usize]
                    .iter()
                    .map(|c| u64::from(c.raw_len))
                    .sum();
                if sum != e.size {
                    return Err(corrupt(format!(
                        "entry {:?}: chunks hold {sum} bytes, size is {}",
                        e.path, e.size
                    )));
                }
                logical += e.size;
            }
            if e.kind == EntryKind::Symlink && e.target.is_none() {
                return Err(corrupt(format!("symlink {:?} without target", e.path)));
            }
        }
        if logical != self.header.logical_size {
            return Err(corrupt("logical size does not match the entries".into()));
        }
        Ok(())
    }

    /// Replaces the location part (used by gc when it moves chunks).
    pub fn with_locations(&self, packs: Vec<PackId>, locs: Vec<ChunkLoc>) -> Self {
        Manifest {
            packs,
            locs,
            ..self.clone()
        }
    }

    /// Size of the encoded manifest.
    pub fn encoded_len(&self) -> usize {
        self.logical.len() + 4 + self.packs.len() * 16 + self.locs.len() * 16 + 32
    }
}

fn encode_logical(header_json: &[u8], body: &[u8], chunks: &[ChunkRef]) -> Result<Vec<u8>> {
    let too_big = || StoreError::CorruptManifest {
        path: "<new>".into(),
        reason: "header or body larger than 4 GiB".into(),
    };
    let mut out =
        Vec::with_capacity(8 + 8 + header_json.len() + body.len() + 8 + chunks.len() * 36);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(
        &u32::try_from(header_json.len())
            .map_err(|_| too_big())?
            .to_le_bytes(),
    );
    out.extend_from_slice(header_json);
    out.extend_from_slice(
        &u32::try_from(body.len())
            .map_err(|_| too_big())?
            .to_le_bytes(),
    );
    out.extend_from_slice(body);
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    for c in chunks {
        out.extend_from_slice(&c.addr.0);
        out.extend_from_slice(&c.raw_len.to_le_bytes());
    }
    Ok(out)
}

/// Serialises the header as it will be stored (to compute the AAD before sealing).
pub fn header_json(header: &ManifestHeader) -> Vec<u8> {
    serde_json::to_vec(header).unwrap_or_default()
}

/// Checks that a tree path is relative and stays inside the tree.
pub fn check_rel_path(p: &str) -> std::result::Result<(), &'static str> {
    if p.is_empty() {
        return Err("empty path");
    }
    if p.contains('\0') {
        return Err("NUL in path");
    }
    for c in p.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err("path must be relative, normal, without '.' or '..' components");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let header = ManifestHeader {
            format: FORMAT,
            namespace: "ns".into(),
            template: "t".into(),
            container: "c".into(),
            created_ms: 1,
            logical_size: 5,
            entries: 1,
            encryption: None,
        };
        let body = ManifestBody {
            metadata: BTreeMap::new(),
            entries: vec![Entry {
                path: "a".into(),
                kind: EntryKind::File,
                mode: 0o600,
                size: 5,
                target: None,
                first_chunk: 0,
                chunk_count: 1,
            }],
        };
        Manifest::build(
            header,
            serde_json::to_vec(&body).unwrap(),
            vec![ChunkRef {
                addr: Digest::of(b"hello"),
                raw_len: 5,
            }],
            vec![PackId([3; 16])],
            vec![ChunkLoc {
                pack: 0,
                offset: 16,
                stored_len: 5,
            }],
        )
        .unwrap()
    }

    #[test]
    fn round_trip_and_every_byte_checked() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(bytes.len(), m.encoded_len());
        let back = Manifest::decode(Path::new("m"), &bytes).unwrap();
        assert_eq!(back.id, m.id);
        assert_eq!(back.body(None, Path::new("m")).unwrap().entries.len(), 1);
        let moved = back.with_locations(vec![PackId([4; 16])], back.locs.clone());
        assert_eq!(moved.id, m.id, "locations are not part of the id");
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(Manifest::decode(Path::new("m"), &b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn paths() {
        assert!(check_rel_path("checkpoint/pages-1.img").is_ok());
        for bad in ["", "/a", "../a", "a/../b", "a/./b", "a//b", "a/"] {
            assert!(check_rel_path(bad).is_err(), "{bad}");
        }
    }
}
