//! Pack files: where chunk bytes live.
//!
//! A 4 KiB chunk per file would cost an inode, a rename and an fsync per page, far from
//! 1 GB/s; so each `put` appends its *new* chunks to one pack file (a new one every
//! [`PACK_TARGET_SIZE`]) and fsyncs it once. Packs are immutable once published.
//!
//! Layout (little-endian):
//!
//! ```text
//! header   "RAPACK01" | flags u32 (bit 0: encrypted) | reserved u32          16 bytes
//! data     stored chunk bytes, back to back (no gaps)
//! entries  per chunk: address [32] | offset u64 | stored_len u32 | raw_len u32
//!          [| BLAKE3 of the stored bytes [32], encrypted packs only]
//! footer   entries_offset u64 | entry_count u64 | BLAKE3(header|entries|offset|count) [32]
//!          | "RAPKEND1"                                                       56 bytes
//! ```
//!
//! Every stored byte is covered by a digest checkable without keys: plaintext chunks by their
//! address (BLAKE3 of the bytes), encrypted ones by the stored-bytes hash; the header and the
//! entry table by the footer checksum. Manifests record each chunk's pack and offset, so a
//! read never needs the entry table; `verify` and `gc` do.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::digest::{hex, unhex, Digest};
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil;

const MAGIC: &[u8; 8] = b"RAPACK01";
const MAGIC_END: &[u8; 8] = b"RAPKEND1";
/// Size of the pack header.
pub const HEADER_LEN: u64 = 16;
const FOOTER_LEN: u64 = 56;
/// Bytes of a pack that are not chunk records or entry rows (header and footer).
pub const OVERHEAD: u64 = HEADER_LEN + FOOTER_LEN;
const FLAG_ENCRYPTED: u32 = 1;
/// A writer starts a new pack past this size.
pub const PACK_TARGET_SIZE: u64 = 1 << 30;
const WRITE_BUF: usize = 4 << 20;

/// A pack's identifier: 16 random bytes, shown as 32 hex characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// A new random id.
    pub fn random() -> Result<Self> {
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b).map_err(|e| StoreError::Unsupported {
            path: PathBuf::from("/dev/urandom"),
            reason: format!("no randomness: {e}"),
        })?;
        Ok(PackId(b))
    }

    /// Parses 32 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = unhex(s)?;
        Some(PackId(v.try_into().ok()?))
    }

    /// The pack's file name.
    pub fn file_name(&self) -> String {
        format!("{}.pack", hex(&self.0))
    }

    /// Parses a pack file name.
    pub fn from_file_name(name: &str) -> Option<Self> {
        Self::from_hex(name.strip_suffix(".pack")?)
    }
}

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// One chunk record of a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk's address.
    pub addr: Digest,
    /// Offset of the stored bytes in the pack.
    pub offset: u64,
    /// Stored length (plaintext length, or ciphertext + tag).
    pub stored_len: u32,
    /// Plaintext length.
    pub raw_len: u32,
    /// BLAKE3 of the stored bytes (encrypted packs; equals `addr` for plaintext ones).
    pub stored_hash: Digest,
}

/// Writes one pack into the store's tmp directory.
pub struct PackWriter {
    id: PackId,
    tmp_path: PathBuf,
    file: File,
    buf: Vec<u8>,
    offset: u64,
    entries: Vec<PackEntry>,
    encrypted: bool,
}

/// A finished, fsynced, not yet published pack.
#[derive(Debug)]
pub struct FinishedPack {
    /// Its id.
    pub id: PackId,
    /// Where it is (in tmp/).
    pub tmp_path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

impl PackWriter {
    /// Creates a new pack in `tmp_dir`.
    pub fn create(tmp_dir: &Path, encrypted: bool) -> Result<Self> {
        let id = PackId::random()?;
        let tmp_path = tmp_dir.join(fsutil::temp_name(&id.file_name()));
        let file = fsutil::create_new_file(&tmp_path)?;
        let mut buf = Vec::with_capacity(WRITE_BUF);
        buf.extend_from_slice(MAGIC);
        let flags = if encrypted { FLAG_ENCRYPTED } else { 0 };
        buf.extend_from_slice(&flags.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        Ok(PackWriter {
            id,
            tmp_path,
            file,
            buf,
            offset: HEADER_LEN,
            entries: Vec::new(),
            encrypted,
        })
    }

    /// The pack's id.
    pub fn id(&self) -> PackId {
        self.id
    }

    /// Its temporary path.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.offset
    }

    /// Appends a chunk's stored bytes; returns their offset. `stored_hash` is the BLAKE3 of
    /// `stored` (for plaintext chunks: the address itself).
    pub fn append(
        &mut self,
        addr: Digest,
        raw_len: u32,
        stored: &[u8],
        stored_hash: Digest,
    ) -> Result<u64> {
        let stored_len = u32::try_from(stored.len())
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| StoreError::Unsupported {
                path: self.tmp_path.clone(),
                reason: format!("chunk of {} bytes (must be 1 byte to 4 GiB)", stored.len()),
            })?;
        let offset = self.offset;
        if self.buf.len() + stored.len() > WRITE_BUF {
            self.flush()?;
        }
        if stored.len() >= WRITE_BUF {
            self.file.write_all(stored).ctx("write", &self.tmp_path)?;
        } else {
            self.buf.extend_from_slice(stored);
        }
        self.offset += u64::from(stored_len);
        self.entries.push(PackEntry {
            addr,
            offset,
            stored_len,
            raw_len,
            stored_hash,
        });
        crate::fault::point("pack-append");
        Ok(offset)
    }

    /// Appends many chunks at once (`(address, raw length, stored bytes, stored hash)`);
    /// returns their offsets. Large batches go to the file with writev(2) straight from the
    /// caller's buffers, saving a copy.
    pub fn append_batch(&mut self, chunks: &[(Digest, u32, &[u8], Digest)]) -> Result<Vec<u64>> {
        let total: usize = chunks.iter().map(|c| c.2.len()).sum();
        if total < (256 << 10) {
            return chunks
                .iter()
                .map(|&(a, r, s, h)| self.append(a, r, s, h))
                .collect();
        }
        self.flush()?;
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut entries = Vec::with_capacity(chunks.len());
        let mut offset = self.offset;
        for &(addr, raw_len, stored, stored_hash) in chunks {
            let stored_len = u32::try_from(stored.len())
                .ok()
                .filter(|l| *l > 0)
                .ok_or_else(|| StoreError::Unsupported {
                    path: self.tmp_path.clone(),
                    reason: format!("chunk of {} bytes (must be 1 byte to 4 GiB)", stored.len()),
                })?;
            offsets.push(offset);
            entries.push(PackEntry {
                addr,
                offset,
                stored_len,
                raw_len,
                stored_hash,
            });
            offset += u64::from(stored_len);
        }
        for group in chunks.chunks(512) {
            // Adjacent buffers (runs of new pages in the caller's read buffer) become one
            // iovec: one large copy in the kernel instead of many 4 KiB ones.
            let mut runs: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for i in 1..=group.len() {
                let contiguous = i < group.len()
                    && group[i - 1].2.as_ptr() as usize + group[i - 1].2.len()
                        == group[i].2.as_ptr() as usize;
                if !contiguous {
                    let first = group[start].2;
                    let len: usize = group[start..i].iter().map(|c| c.2.len()).sum();
                    // SAFETY: the slices group[start..i] are adjacent in memory (checked
                    // above: each one ends where the next begins) and all borrowed for the
                    // whole call, so together they form one valid, initialised, immutably
                    // borrowed region of `len` bytes starting at `first`.
                    runs.push(unsafe { std::slice::from_raw_parts(first.as_ptr(), len) });
                    start = i;
                }
            }
            let mut slices: Vec<std::io::IoSlice<'_>> =
                runs.iter().map(|r| std::io::IoSlice::new(r)).collect();
            let mut rest: &mut [std::io::IoSlice<'_>] = &mut slices;
            while !rest.is_empty() {
                match self.file.write_vectored(rest) {
                    Ok(0) => {
                        return Err(StoreError::io(
                            "write",
                            &self.tmp_path,
                            std::io::ErrorKind::WriteZero.into(),
                        ))
                    }
                    Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(StoreError::io("write", &self.tmp_path, e)),
                }
            }
            crate::fault::point("pack-append");
        }
        self.offset = offset;
        self.entries.extend(entries);
        Ok(offsets)
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all(&self.buf)
                .ctx("write", &self.tmp_path)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes the entry table and footer and fsyncs the file.
    pub fn finish(mut self) -> Result<FinishedPack> {
        let entries_offset = self.offset;
        let mut table = encode_entries(&self.entries, self.encrypted);
        let header = header_bytes(self.encrypted);
        let count = self.entries.len() as u64;
        let sum = footer_sum(&header, &table, entries_offset, count);
        table.extend_from_slice(&entries_offset.to_le_bytes());
        table.extend_from_slice(&count.to_le_bytes());
        table.extend_from_slice(sum.as_bytes());
        table.extend_from_slice(MAGIC_END);
        self.flush()?;
        self.file.write_all(&table).ctx("write", &self.tmp_path)?;
        self.file.sync_data().ctx("fsync", &self.tmp_path)?;
        crate::fault::point("pack-synced");
        Ok(FinishedPack {
            id: self.id,
            tmp_path: self.tmp_path,
            size: entries_offset + table.len() as u64,
        })
    }
}

fn header_bytes(encrypted: bool) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(MAGIC);
    let flags = if encrypted { FLAG_ENCRYPTED } else { 0 };
    h[8..12].copy_from_slice(&flags.to_le_bytes());
    h
}

fn entry_len(encrypted: bool) -> usize {
    if encrypted {
        80
    } else {
        48
    }
}

fn encode_entries(entries: &[PackEntry], encrypted: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * entry_len(encrypted) + FOOTER_LEN as usize);
    for e in entries {
        out.extend_from_slice(&e.addr.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        if encrypted {
            out.extend_from_slice(&e.stored_hash.0);
        }
    }
    out
}

fn footer_sum(header: &[u8], table: &[u8], entries_offset: u64, count: u64) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(table);
    h.update(&entries_offset.to_le_bytes());
    h.update(&count.to_le_bytes());
    h.finalize()
}

/// A published pack opened for reading, with its checked entry table.
#[derive(Debug)]
pub struct PackIndex {
    /// The pack file.
    pub path: PathBuf,
    /// Whether its chunks are encrypted.
    pub encrypted: bool,
    /// Its chunk records, in offset order.
    pub entries: Vec<PackEntry>,
    /// Where the data region ends.
    pub data_end: u64,
    /// File size.
    pub size: u64,
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

impl PackIndex {
    /// Reads and checks a pack's header, entry table and footer.
    pub fn load(path: &Path) -> Result<Self> {
        let corrupt = |reason: String| StoreError::CorruptPack {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).ctx("open", path)?;
        let size = file.metadata().ctx("stat", path)?.len();
        if size < HEADER_LEN + FOOTER_LEN {
            return Err(corrupt(format!("too short ({size} bytes)")));
        }
        let mut header = [0u8; 16];
        file.read_exact_at(&mut header, 0).ctx("read", path)?;
        if &header[..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let flags = le_u32(&header[8..12]);
        if flags & !FLAG_ENCRYPTED != 0 || header[12..16] != [0; 4] {
            return Err(corrupt(format!("unknown flags {flags:#x}")));
        }
        let encrypted = flags & FLAG_ENCRYPTED != 0;
        let mut footer = [0u8; FOOTER_LEN as usize];
        file.read_exact_at(&mut footer, size - FOOTER_LEN)
            .ctx("read", path)?;
        if &footer[48..56] != MAGIC_END {
            return Err(corrupt("bad end magic (truncated?)".into()));
        }
        let entries_offset = le_u64(&footer[0..8]);
        let count = le_u64(&footer[8..16]);
        let elen = entry_len(encrypted) as u64;
        let table_len = count
            .checked_mul(elen)
            .filter(|l| {
                entries_offset >= HEADER_LEN
                    && entries_offset.checked_add(*l).map(|e| e + FOOTER_LEN) == Some(size)
            })
            .ok_or_else(|| corrupt("entry table does not fit the file".into()))?;
        let table_len =
            usize::try_from(table_len).map_err(|_| corrupt("entry table too large".into()))?;
        let mut table = vec![0u8; table_len];
        file.read_exact_at(&mut table, entries_offset)
            .ctx("read", path)?;
        let sum = footer_sum(&header, &table, entries_offset, count);
        if sum.as_bytes() != &footer[16..48] {
            return Err(corrupt("entry table checksum mismatch".into()));
        }
        let mut entries = Vec::with_capacity(table_len / elen as usize);
        let mut expect = HEADER_LEN;
        for rec in table.chunks_exact(elen as usize) {
            let addr =
                Digest::from_slice(&rec[0..32]).ok_or_else(|| corrupt("short entry".into()))?;
            let offset = le_u64(&rec[32..40]);
            let stored_len = le_u32(&rec[40..44]);
            let raw_len = le_u32(&rec[44..48]);
            let stored_hash = if encrypted {
                Digest::from_slice(&rec[48..80]).ok_or_else(|| corrupt("short entry".into()))?
            } else {
                addr
            };
            if stored_len == 0 {
                return Err(corrupt(format!("empty record at offset {offset}")));
            }
            if offset != expect {
                return Err(corrupt(format!(
                    "entry at offset {offset}, expected {expect}"
                )));
            }
            expect += u64::from(stored_len);
            entries.push(PackEntry {
                addr,
                offset,
                stored_len,
                raw_len,
                stored_hash,
            });
        }
        if expect != entries_offset {
            return Err(corrupt("entries do not cover the data region".into()));
        }
        Ok(PackIndex {
            path: path.to_owned(),
            encrypted,
            entries,
            data_end: entries_offset,
            size,
        })
    }

    /// Reads the whole data region and checks every chunk's stored-bytes digest; returns the
    /// entries that do not match.
    pub fn check_data(&self) -> Result<Vec<(PackEntry, String)>> {
        let file = File::open(&self.path).ctx("open", &self.path)?;
        let mut bad = Vec::new();
        let mut buf = Vec::new();
        // Read in large slabs of whole records.
        let mut i = 0;
        while i < self.entries.len() {
            let start = self.entries[i].offset;
            let mut j = i;
            let mut end = start;
            while j < self.entries.len() && (end - start < (8 << 20) || j == i) {
                end += u64::from(self.entries[j].stored_len);
                j += 1;
            }
            buf.resize((end - start) as usize, 0);
            file.read_exact_at(&mut buf, start)
                .ctx("read", &self.path)?;
            for e in &self.entries[i..j] {
                let lo = (e.offset - start) as usize;
                let data = &buf[lo..lo + e.stored_len as usize];
                if Digest::of(data) != e.stored_hash {
                    bad.push((*e, "stored bytes do not match their digest".to_string()));
                } else if !self.encrypted && e.stored_len != e.raw_len {
                    bad.push((*e, "stored and raw length differ".to_string()));
                }
            }
            i = j;
        }
        Ok(bad)
    }
}

/// Copies the stored bytes of one entry out of a pack.
pub fn read_stored(
    file: &File,
    path: &Path,
    offset: u64,
    len: u32,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.resize(len as usize, 0);
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StoreError::CorruptPack {
                path: path.to_owned(),
                reason: format!("truncated: no {len} bytes at offset {offset}"),
            }
        } else {
            StoreError::io("read", path, e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), false).unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 100];
        w.append(Digest::of(&a), 4096, &a, Digest::of(&a)).unwrap();
        w.append(Digest::of(&b), 100, &b, Digest::of(&b)).unwrap();
        let f = w.finish().unwrap();
        let idx = PackIndex::load(&f.tmp_path).unwrap();
        assert_eq!(idx.entries.len(), 2);
        assert_eq!(idx.entries[1].offset, HEADER_LEN + 4096);
        assert!(idx.check_data().unwrap().is_empty());
        let bytes = std::fs::read(&f.tmp_path).unwrap();
        for i in 0..bytes.len() {
            let mut c = bytes.clone();
            c[i] ^= 0x40;
            std::fs::write(&f.tmp_path, &c).unwrap();
            let caught = match PackIndex::load(&f.tmp_path) {
                Err(_) => true,
                Ok(idx) => !idx.check_data().unwrap().is_empty(),
            };
            assert!(caught, "flip at {i} not caught");
        }
    }
}
