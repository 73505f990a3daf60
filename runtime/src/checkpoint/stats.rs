//! CRIU's own timing of a dump or restore, from the `stats-dump` / `stats-restore` image
//! it leaves in its work directory.
//!
//! The file is a CRIU service image: two little-endian u32 magics (the service-image
//! magic, then the stats magic), a u32 length and one protobuf `stats_entry`
//! (`criu/stats.proto` in the proto crate). Times are microseconds.

use std::path::Path;
use std::time::Duration;

use prost::Message;
use runc_architect_proto::criu::{DumpStatsEntry, RestoreStatsEntry, StatsEntry};

/// File name of the dump statistics.
pub const STATS_DUMP: &str = "stats-dump";
/// File name of the restore statistics.
pub const STATS_RESTORE: &str = "stats-restore";

const SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// Decodes a stats image.
pub fn decode(bytes: &[u8]) -> Result<StatsEntry, String> {
    let word = |i: usize| -> Result<u32, String> {
        bytes
            .get(i..i + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| "stats image too short".to_string())
    };
    if word(0)? != SERVICE_MAGIC || word(4)? != STATS_MAGIC {
        return Err(format!(
            "not a CRIU stats image (magic {:#x} {:#x})",
            word(0)?,
            word(4)?
        ));
    }
    let len = word(8)? as usize;
    let body = bytes
        .get(12..12 + len)
        .ok_or_else(|| format!("stats entry of {len} bytes is truncated"))?;
    StatsEntry::decode(body).map_err(|e| format!("stats entry: {e}"))
}

/// Reads and decodes `dir/name`.
pub fn read(dir: &Path, name: &str) -> Result<StatsEntry, String> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// CRIU's phases of a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpPhases {
    /// Freezing the tree (zero when it was frozen already).
    pub freezing: Duration,
    /// How long the tree stayed frozen.
    pub frozen: Duration,
    /// Drawing memory out of the tasks.
    pub memdump: Duration,
    /// Writing it to the images.
    pub memwrite: Duration,
    pub pages_written: u64,
}

impl From<&DumpStatsEntry> for DumpPhases {
    fn from(d: &DumpStatsEntry) -> Self {
        DumpPhases {
            freezing: Duration::from_micros(d.freezing_time.into()),
            frozen: Duration::from_micros(d.frozen_time.into()),
            memdump: Duration::from_micros(d.memdump_time.into()),
            memwrite: Duration::from_micros(d.memwrite_time.into()),
            pages_written: d.pages_written,
        }
    }
}

/// CRIU's phases of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestorePhases {
    /// Forking the tree.
    pub forking: Duration,
    /// Restoring the tasks (from forking until they resume).
    pub restore: Duration,
    pub pages_restored: u64,
}

impl From<&RestoreStatsEntry> for RestorePhases {
    fn from(r: &RestoreStatsEntry) -> Self {
        RestorePhases {
            forking: Duration::from_micros(r.forking_time.into()),
            restore: Duration::from_micros(r.restore_time.into()),
            pages_restored: r.pages_restored.unwrap_or_default(),
        }
    }
}

/// The dump phases recorded in `dir` (CRIU's work directory of the dump).
pub fn dump_phases(dir: &Path) -> Result<DumpPhases, String> {
    let s = read(dir, STATS_DUMP)?;
    s.dump
        .as_ref()
        .map(DumpPhases::from)
        .ok_or_else(|| format!("{}: no dump entry", dir.join(STATS_DUMP).display()))
}

/// The restore phases recorded in `dir` (CRIU's work directory of the restore).
pub fn restore_phases(dir: &Path) -> Result<RestorePhases, String> {
    let s = read(dir, STATS_RESTORE)?;
    s.restore
        .as_ref()
        .map(RestorePhases::from)
        .ok_or_else(|| format!("{}: no restore entry", dir.join(STATS_RESTORE).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_dump_image_written_by_criu_4_2() {
        // A stats-dump file from CRIU 4.2.1 (a busybox loop), byte for byte.
        let bytes: [u8; 49] = [
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x25, 0x00, 0x00, 0x00, 0x0a, 0x23,
            0x08, 0x9b, 0x95, 0x06, 0x10, 0xd9, 0x8c, 0x21, 0x18, 0xeb, 0x84, 0x01, 0x20, 0xb4,
            0x01, 0x28, 0x31, 0x30, 0x00, 0x38, 0x23, 0x40, 0x00, 0x48, 0x00, 0x50, 0x08, 0x58,
            0x08, 0x60, 0x00, 0x68, 0x00, 0x70, 0x00,
        ];
        let s = decode(&bytes).expect("decodes");
        let d = DumpPhases::from(s.dump.as_ref().expect("dump entry"));
        assert_eq!(d.freezing, Duration::from_micros(101_019));
        assert_eq!(d.pages_written, 35);
        assert!(s.restore.is_none());
        assert!(decode(&bytes[..20]).is_err());
        assert!(decode(&[0u8; 16]).is_err());
    }
}
