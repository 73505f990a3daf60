//! What a dump records next to its images for the restore: the stdio of the dumped init,
//! the external resources it declared, and the CRIU options a restore must repeat.
//!
//! It is a small JSON file ([`RECORD_FILE`]) in the images directory, root-only like the
//! images. A checkpoint made by runc (the stock shim) has no such file but a
//! `descriptors.json` (the link targets of fds 0-2); [`DumpRecord::load`] accepts that too,
//! so a stock checkpoint can be restored by runc-architect.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::mounts::ExternalMount;
use super::{CgroupsMode, NetworkLock};

/// The record's file name in the images directory.
pub const RECORD_FILE: &str = "runc-architect-checkpoint.json";
/// runc's record of the stdio link targets.
pub const RUNC_DESCRIPTORS: &str = "descriptors.json";
/// Version of the record's layout.
pub const RECORD_VERSION: u32 = 1;

/// Writes `body` to `path`, root-only (0600) like the images, and syncs it.
fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(body)?;
    f.sync_all()
}

/// One of the dumped init's fds 0-2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioRecord {
    /// What `/proc/PID/fd/N` pointed at (`pipe:[123]`, `/dev/null`, `/dev/pts/0`).
    pub link: String,
    /// The key a restore passes its replacement under (`inherit_fd`): `pipe:[123]` for a
    /// pipe, `file[MNT:INO]` for a host file declared external at dump; `None` when CRIU
    /// restores the descriptor by itself (a terminal inside the container).
    pub inherit_key: Option<String>,
}

/// Everything a restore needs to know about a dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpRecord {
    pub version: u32,
    /// The container the images were taken from.
    pub container_id: String,
    /// fds 0, 1 and 2 of the init.
    pub stdio: Vec<StdioRecord>,
    /// Whether the init had a terminal (its pty master must be re-attached).
    pub terminal: bool,
    /// Mounts dumped as external, with how to find their new source.
    pub external_mounts: Vec<ExternalMount>,
    /// Whether the network namespace was external (joined by path).
    pub external_net_ns: bool,
    /// Whether the pid namespace was external (joined by path).
    pub external_pid_ns: bool,
    /// CRIU options of the dump that a restore must repeat.
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub cgroups_mode: CgroupsMode,
    pub network_lock: NetworkLock,
    /// The network namespace (its inode) the dump left locked with the runtime's lock:
    /// the tree was killed (`exit`), its namespace belongs to someone else (a pod) and
    /// stays, and the restore lifts the lock if it restores into that namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_netns: Option<u64>,
    /// The cgroup the init was in (relative to the hierarchy root).
    pub cgroup_path: String,
}

impl DumpRecord {
    /// Writes the record into `dir` (mode 0600).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let body = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_private(&dir.join(RECORD_FILE), &body)
    }

    /// Writes runc's record of the dump (`descriptors.json`: the link targets of the
    /// init's fds 0-2) into `dir` (mode 0600), for images that runc may restore.
    pub fn save_runc_descriptors(&self, dir: &Path) -> std::io::Result<()> {
        let links: Vec<&str> = self.stdio.iter().map(|s| s.link.as_str()).collect();
        let body = serde_json::to_vec(&links).map_err(std::io::Error::other)?;
        write_private(&dir.join(RUNC_DESCRIPTORS), &body)
    }

    /// Reads the record of the images in `dir`: ours, else runc's `descriptors.json`
    /// (then the rest is inferred from the bundle at restore). `Ok(None)` when neither
    /// exists.
    pub fn load(dir: &Path) -> Result<Option<DumpRecord>, String> {
        let ours = dir.join(RECORD_FILE);
        match std::fs::read(&ours) {
            Ok(body) => {
                let rec: DumpRecord = serde_json::from_slice(&body)
                    .map_err(|e| format!("{}: {e}", ours.display()))?;
                if rec.version > RECORD_VERSION {
                    return Err(format!(
                        "{}: record version {} is newer than this shim's {RECORD_VERSION}",
                        ours.display(),
                        rec.version
                    ));
                }
                return Ok(Some(rec));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", ours.display())),
        }
        let runc = dir.join(RUNC_DESCRIPTORS);
        match std::fs::read(&runc) {
            Ok(body) => {
                let links: Vec<String> = serde_json::from_slice(&body)
                    .map_err(|e| format!("{}: {e}", runc.display()))?;
                Ok(Some(DumpRecord::from_runc(links)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", runc.display())),
        }
    }

    /// A record for a runc checkpoint, which only lists the stdio link targets. runc
    /// declares every bind mount of the spec external; the restore does the same when
    /// the record lists no mounts and `inferred` is set.
    fn from_runc(links: Vec<String>) -> DumpRecord {
        let stdio = links
            .into_iter()
            .map(|link| StdioRecord {
                inherit_key: link.starts_with("pipe:").then(|| link.clone()),
                link,
            })
            .collect();
        DumpRecord {
            version: 0,
            container_id: String::new(),
            stdio,
            terminal: false,
            external_mounts: Vec::new(),
            external_net_ns: false,
            external_pid_ns: false,
            tcp_established: false,
            ext_unix_sk: false,
            shell_job: false,
            file_locks: false,
            // runc dumps with CRIU's default (soft).
            cgroups_mode: CgroupsMode::Soft,
            network_lock: NetworkLock::Iptables,
            locked_netns: None,
            cgroup_path: String::new(),
        }
    }

    /// Whether this record came from runc (version 0): its externals are inferred from
    /// the bundle at restore.
    pub fn is_inferred(&self) -> bool {
        self.version == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_runc_fallback() {
        let dir = std::env::temp_dir().join(format!("ra-meta-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(RUNC_DESCRIPTORS),
            r#"["pipe:[11]","pipe:[12]","/dev/null"]"#,
        )
        .unwrap();
        let rec = DumpRecord::load(&dir).unwrap().unwrap();
        assert!(rec.is_inferred());
        assert_eq!(rec.stdio[0].inherit_key.as_deref(), Some("pipe:[11]"));
        assert_eq!(rec.stdio[2].inherit_key, None);

        let mut ours = rec.clone();
        ours.version = RECORD_VERSION;
        ours.container_id = "c1".into();
        ours.save(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(RECORD_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(DumpRecord::load(&dir).unwrap().unwrap(), ours);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
