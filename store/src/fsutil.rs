//! Durable file-system primitives: private modes, temporary names, fsync of files and
//! directories, publish-by-rename, checksummed JSON records, and flock-based locks.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{IoContext, Result, StoreError};

/// Mode of every directory the store creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the store creates.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and missing parents with mode 0700, fsyncing each parent whose entries
/// changed so the new directories survive a crash.
pub fn create_dir_all_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_all_durable(parent)?;
        }
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(StoreError::io("create directory", dir, e)),
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// fsyncs a directory so renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).ctx("open directory", dir)?;
    f.sync_all().ctx("fsync directory", dir)
}

/// A process-unique temporary file name (`.tmp-PID-N-NANOS-TAG`).
pub fn temp_name(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(".tmp-{}-{n}-{nanos}-{tag}", std::process::id())
}

/// Creates a new file (never reusing an existing one) with mode 0600.
pub fn create_new_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .ctx("create", path)
}

/// Writes `data` to a temporary file in `tmp_dir`, fsyncs it and returns its path.
pub fn write_temp(tmp_dir: &Path, tag: &str, data: &[u8]) -> Result<PathBuf> {
    let tmp = tmp_dir.join(temp_name(tag));
    let res = (|| {
        let mut f = create_new_file(&tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        f.sync_data().ctx("fsync", &tmp)?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Atomically replaces `dest` with `data`: temp file in the same directory, fsync, rename,
/// fsync of the directory.
pub fn atomic_write(dest: &Path, data: &[u8]) -> Result<()> {
    let dir = parent_of(dest)?;
    let tmp = write_temp(dir, "w", data)?;
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_file(&tmp);
        return Err(StoreError::io("rename", dest, e));
    }
    fsync_dir(dir)
}

/// Atomically creates `dest` with `data`, failing with `Ok(false)` if it already exists
/// (link(2) never replaces). The directory is fsynced.
pub fn atomic_create(dest: &Path, data: &[u8]) -> Result<bool> {
    let dir = parent_of(dest)?;
    let tmp = write_temp(dir, "c", data)?;
    let res = std::fs::hard_link(&tmp, dest);
    let _ = std::fs::remove_file(&tmp);
    match res {
        Ok(()) => {
            fsync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(StoreError::io("link", dest, e)),
    }
}

fn parent_of(p: &Path) -> Result<&Path> {
    p.parent().ok_or_else(|| StoreError::Unsupported {
        path: p.to_owned(),
        reason: "path has no parent directory".into(),
    })
}

/// Serialises a record as one JSON line followed by a line with its BLAKE3 (so a flipped byte
/// is detected, not silently believed).
pub fn encode_record<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising plain structs of strings and integers cannot fail.
    let json = serde_json::to_string(value).unwrap_or_default();
    let sum = blake3::hash(json.as_bytes());
    format!("{json}\n{}\n", sum.to_hex()).into_bytes()
}

/// Parses a record written by [`encode_record`], checking its checksum.
pub fn decode_record<T: DeserializeOwned>(path: &Path, data: &[u8]) -> Result<T> {
    let corrupt = |reason: String| StoreError::CorruptRecord {
        path: path.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(data).map_err(|_| corrupt("not UTF-8".into()))?;
    let mut lines = text.split('\n');
    let json = lines.next().unwrap_or_default();
    let sum = lines.next().unwrap_or_default();
    let rest: String = lines.collect();
    if !rest.is_empty() {
        return Err(corrupt("trailing data".into()));
    }
    if blake3::hash(json.as_bytes()).to_hex().as_str() != sum {
        return Err(corrupt("checksum mismatch".into()));
    }
    serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))
}

/// Reads and checks a record file.
pub fn read_record<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let data = std::fs::read(path).ctx("read", path)?;
    decode_record(path, &data)
}

/// Kind of a flock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Many holders (writers and readers of the store).
    Shared,
    /// One holder (garbage collection; a key's generation allocation).
    Exclusive,
}

/// A held flock; released when dropped.
#[derive(Debug)]
pub struct LockGuard {
    _lock: Flock<File>,
}

/// Takes a flock on `path` (created 0600 if missing), waiting until it is granted.
pub fn lock_file(path: &Path, kind: LockKind) -> Result<LockGuard> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
        .ctx("open lock", path)?;
    let arg = match kind {
        LockKind::Shared => FlockArg::LockShared,
        LockKind::Exclusive => FlockArg::LockExclusive,
    };
    loop {
        match Flock::lock(f.try_clone().ctx("dup lock", path)?, arg) {
            Ok(lock) => return Ok(LockGuard { _lock: lock }),
            Err((_, nix::errno::Errno::EINTR)) => continue,
            Err((_, e)) => return Err(StoreError::io("flock", path, e.into())),
        }
    }
}

/// Tries to take a flock without waiting; `Ok(None)` when someone else holds it.
pub fn try_lock_file(path: &Path, kind: LockKind) -> Result<Option<LockGuard>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
        .ctx("open lock", path)?;
    let arg = match kind {
        LockKind::Shared => FlockArg::LockSharedNonblock,
        LockKind::Exclusive => FlockArg::LockExclusiveNonblock,
    };
    match Flock::lock(f, arg) {
        Ok(lock) => Ok(Some(LockGuard { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(StoreError::io("flock", path, e.into())),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 form of a millisecond timestamp.
pub fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Removes a path (file or directory tree) ignoring "not found".
pub fn remove_any(path: &Path) -> Result<()> {
    let res = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    match res {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StoreError::io("remove", path, e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_corruption() {
        let rec = serde_json::json!({"a": 1, "b": "x"});
        let enc = encode_record(&rec);
        let back: serde_json::Value = decode_record(Path::new("r"), &enc).unwrap();
        assert_eq!(back, rec);
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x01;
            assert!(
                decode_record::<serde_json::Value>(Path::new("r"), &bad).is_err(),
                "flip at {i} undetected"
            );
        }
    }
}
