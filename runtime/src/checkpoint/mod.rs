//! Checkpoint and restore of containers with CRIU, spoken to through `criu-rpc`.
//!
//! # Dump ([`checkpoint`])
//!
//! containerd pauses a task before `Task.Checkpoint` and resumes it afterwards, but the
//! task API also takes checkpoints of running containers; both work:
//!
//! 1. **Freezer.** CRIU is given a cgroup to freeze (`freeze_cgroup`) instead of
//!    stopping each task with ptrace, which races with forks. If the container is
//!    running we freeze it ourselves first, on its cgroup v2 directory (the shim puts
//!    every container into the v2 hierarchy, also on hybrid hosts), waiting for
//!    `frozen 1` in `cgroup.events` (well under a millisecond, where CRIU would poll in
//!    100 ms steps). A container paused through libcontainer on a legacy or hybrid host
//!    is frozen by the v1 freezer instead; CRIU then gets that v1 directory, because a
//!    v2 freeze cannot complete while the tasks sit in the v1 freezer. CRIU finds the
//!    cgroup frozen, seizes the tree, dumps it and leaves the freezer as it found it
//!    ([`freezer`]).
//! 2. **Externals.** The rootfs is CRIU's root; bind mounts, masked paths and device
//!    nodes that come from the host are declared as external mounts keyed by their
//!    destination ([`mounts`]); network and pid namespaces joined by path (a pod's) are
//!    external namespaces; stdio that is not a pipe (host `/dev/null`) is an external
//!    file. The keys and how to re-create them are recorded in [`meta::DumpRecord`], a
//!    small JSON file next to the images (like runc's `descriptors.json`).
//! 3. **Options.** Every field of containerd's `CheckpointOptions` maps onto a CRIU
//!    option ([`CheckpointRequest`]); a container with a terminal gets
//!    `orphan_pts_master` so that its pty can be re-attached.
//! 4. **Network lock.** The runtime locks the container's network namespace itself at
//!    CRIU's network-lock point and unlocks it at network-unlock; a dump that kills the
//!    tree leaves it locked for the restore, which lifts it only in that namespace
//!    ([`netlock`]).
//! 5. **Failure.** If CRIU fails, dies or outlives its time limit (it is then killed),
//!    a network lock left in the container's namespace is removed ([`netlock`]), the
//!    freezer state from before the dump is put back, and the error carries CRIU's
//!    errno, message, the error lines of its log that say why, and a copy of the log in
//!    the bundle (containerd deletes a failed checkpoint's directory); the container
//!    keeps running untouched. CRIU dies safely even mid-dump: its parasite code inside
//!    a task returns the task to its own code when CRIU's socket closes.
//! 6. **Images** are made root-only (0600 files in 0700 directories): they hold process
//!    memory. CRIU's timing (`stats-dump`) goes into the log line of each checkpoint
//!    ([`stats`]).
//!
//! # Restore ([`restore`])
//!
//! A Create with a checkpoint restores at Create (the init runs when Create returns;
//! the following Start only reports it, see [`crate::Container::start`]):
//!
//! 1. The container's cgroups are created by libcgroups from the bundle's spec, with its
//!    resource limits, and CRIU is moved into them as soon as it is spawned (before it
//!    gets its request), so every restored task is born there (CRIU's cgroup handling
//!    is off by default, see [`CgroupsMode`]; an explicit mode gets `cg_root` mapping
//!    the dumped cgroup onto the new one). We create the cgroups ourselves rather than
//!    run libcontainer's create and throw its init away: that would cost a clone,
//!    namespaces and mounts nobody uses, on the latency-critical path. libcontainer's state (`state.json`,
//!    its config) is written afterwards so that pause, resume, update, exec and delete
//!    work on the restored container exactly as on a created one.
//! 2. The rootfs containerd had the shim mount is CRIU's root (a bundle's plain rootfs
//!    directory is bind-mounted into the state directory first: CRIU's root must be a
//!    mount point); external mounts are mapped to their sources in the new bundle's spec;
//!    missing mount points are created first.
//! 3. New stdio pipes (or a console socket) come from [`crate::io::ProcessIo`] as for a
//!    cold start, and are handed to CRIU with `inherit_fd` under the `pipe:[inode]` keys
//!    recorded at dump. A terminal's new pty master arrives with the `orphan-pts-master`
//!    notification and is handed to `ProcessIo` over its console socket, the way
//!    libcontainer hands over a new one.
//! 4. Namespaces joined by path are re-joined: network and pid by `inherit_fd` of the
//!    namespace file, the others by `join_ns`.
//! 5. With `rst_sibling` the restored init is a child of the shim. Its pid is registered
//!    with the [`crate::ExitWatcher`] and it becomes the init of a running
//!    [`crate::Container`], tracked like a started one.
//!
//! A failed explicit restore returns CRIU's error and leaves nothing behind (restored
//! tasks, cgroups, state, mounts, a network lock in a pod's namespace), as the stock shim
//! does; there is no fallback to a cold start: the caller asked for this checkpoint's
//! state, and a fresh process would silently lose it. The shim logs how long each part of
//! a restore took, with CRIU's own phases from `stats-restore`.
//!
//! # Reaping
//!
//! CRIU is a child of the shim, whose reaper owns every exit: [`spawner::ShimSpawner`]
//! implements criu-rpc's `ChildSpawner` on the [`crate::ExitWatcher`].

pub mod dump;
pub mod freezer;
pub mod images;
pub mod meta;
pub mod mounts;
pub mod netlock;
pub mod restore;
pub mod spawner;
pub mod stats;

use std::path::{Path, PathBuf};

pub use dump::checkpoint;
pub use restore::{restore, RestoreConfig};

/// Name of CRIU's dump log in the work directory.
pub const DUMP_LOG: &str = "dump.log";
/// Name of CRIU's restore log in the work directory.
pub const RESTORE_LOG: &str = "restore.log";
/// CRIU's verbosity (2: errors and warnings, 4: everything). Errors always carry the
/// last logged error and the log's path.
pub const CRIU_LOG_LEVEL: i32 = 2;
/// The CRIU binary looked up when none is configured.
pub const DEFAULT_CRIU: &str = "criu";

/// Key of an external network namespace in the images (the `net[<inode>]:KEY` of dump,
/// the `inherit_fd` key of restore).
pub const EXT_NET_NS_KEY: &str = "extRootNetNS";
/// Key of an external pid namespace.
pub const EXT_PID_NS_KEY: &str = "extRootPidNS";

/// How CRIU treats cgroups (containerd's `cgroups_mode`).
///
/// The default (containerd sends "") is [`CgroupsMode::Ignore`], not CRIU's own default
/// (soft): the restoring shim creates the container's cgroups from the bundle's spec and
/// puts CRIU into them, so every restored task lands in the right cgroups without CRIU
/// dumping or re-creating any. CRIU's managed modes also walk every hierarchy from the
/// container's cgroup down, and on a hybrid host the container sits at the root of the
/// named `systemd` hierarchy: a managed dump there records (and a restore re-creates
/// below the container) every cgroup of the host in that hierarchy, and it races with
/// cgroups coming and going. The explicit modes are passed to CRIU as asked, with
/// `cg_root` mapping the dumped root onto the new cgroup. What ignore gives up: cgroups
/// the workload itself created below its own (which needs delegation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupsMode {
    /// Restore properties only of cgroups CRIU creates (CRIU's own default).
    Soft,
    /// Restore all cgroup properties.
    Full,
    /// Fail when cgroups or their properties differ.
    Strict,
    /// Neither dump nor restore cgroups (ours by default; see the type's docs).
    #[default]
    Ignore,
}

impl CgroupsMode {
    /// Parses containerd's value ("" is the default, [`CgroupsMode::Ignore`]).
    pub fn parse(s: &str) -> Result<CgroupsMode, CheckpointError> {
        match s {
            "" => Ok(CgroupsMode::default()),
            "soft" => Ok(CgroupsMode::Soft),
            "full" => Ok(CgroupsMode::Full),
            "strict" => Ok(CgroupsMode::Strict),
            "ignore" => Ok(CgroupsMode::Ignore),
            other => Err(CheckpointError::InvalidOption(format!(
                "cgroups mode {other:?}: expected soft, full, strict or ignore"
            ))),
        }
    }

    /// Whether CRIU manages cgroups at all in this mode.
    pub(crate) fn managed(self) -> bool {
        self != CgroupsMode::Ignore
    }

    pub(crate) fn criu(self) -> criu_rpc::CriuCgMode {
        match self {
            CgroupsMode::Soft => criu_rpc::CriuCgMode::Soft,
            CgroupsMode::Full => criu_rpc::CriuCgMode::Full,
            CgroupsMode::Strict => criu_rpc::CriuCgMode::Strict,
            CgroupsMode::Ignore => criu_rpc::CriuCgMode::Ignore,
        }
    }
}

/// How the network is held still while a tree with sockets is dumped and restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkLock {
    /// The runtime's own iptables rules, taken and lifted at CRIU's network-lock and
    /// -unlock notifications; CRIU is told to skip ([`netlock`]).
    #[default]
    Runtime,
    /// CRIU's iptables rules in the container's network namespace (CRIU's default, and
    /// what runc's checkpoints use).
    Iptables,
    /// CRIU's nftables table.
    Nftables,
    /// No locking by CRIU: the caller holds traffic itself.
    Skip,
}

impl NetworkLock {
    pub(crate) fn criu(self) -> criu_rpc::CriuNetworkLockMethod {
        match self {
            NetworkLock::Runtime | NetworkLock::Skip => criu_rpc::CriuNetworkLockMethod::Skip,
            NetworkLock::Iptables => criu_rpc::CriuNetworkLockMethod::Iptables,
            NetworkLock::Nftables => criu_rpc::CriuNetworkLockMethod::Nftables,
        }
    }
}

/// Where CRIU is and how to run it.
#[derive(Debug, Clone)]
pub struct CriuConfig {
    /// The binary: a path, or a name looked up in `$PATH` and the sbin directories.
    pub binary: PathBuf,
    /// CRIU's log verbosity (0-4).
    pub log_level: i32,
    /// How long one dump or restore may take before CRIU is killed and the request
    /// fails (the container is then left as it was).
    pub timeout: std::time::Duration,
}

/// The default limit of one CRIU request.
pub const DEFAULT_CRIU_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Default for CriuConfig {
    fn default() -> Self {
        CriuConfig {
            binary: PathBuf::from(DEFAULT_CRIU),
            log_level: CRIU_LOG_LEVEL,
            timeout: DEFAULT_CRIU_TIMEOUT,
        }
    }
}

/// A checkpoint of a container's init and everything below it: containerd's
/// `CheckpointOptions`, resolved.
#[derive(Debug, Clone, Default)]
pub struct CheckpointRequest {
    /// Where the images go (created if missing).
    pub image_dir: PathBuf,
    /// CRIU's work directory (logs, stats); the images directory when unset.
    pub work_dir: Option<PathBuf>,
    /// A previous dump to diff against, relative to the images directory (CRIU's
    /// `parent_img`).
    pub parent: Option<PathBuf>,
    /// Stop the container after the dump (`exit`): CRIU kills the tree.
    pub exit: bool,
    /// Dump established TCP connections (`open_tcp`).
    pub open_tcp: bool,
    /// Allow unix sockets connected to peers outside the container.
    pub external_unix_sockets: bool,
    /// The tree is a shell job (shares a session or terminal with its parent).
    pub terminal: bool,
    /// Dump file locks.
    pub file_locks: bool,
    /// Namespaces to dump empty (containerd: "network").
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: CgroupsMode,
    pub network_lock: NetworkLock,
    pub criu: CriuConfig,
    /// Images that leave the node (a kubelet checkpoint archive): written as runc writes
    /// them, so that runc (or CRI-O) can restore them too. Every tmpfs is archived by CRIU
    /// (none is re-created fresh at restore) and runc's `descriptors.json` is written next
    /// to our record.
    pub portable: bool,
    /// The container's own network namespace outlives the dump (hibernation: the shim
    /// holds it): it is declared external like a pod's, so the restore goes back into it
    /// with its addresses, routes and listening ports where clients expect them.
    pub keep_netns: bool,
}

/// What can go wrong checkpointing or restoring a container.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// CRIU failed (or could not be started); carries its errno, message and log tail,
    /// the errors from its log that say why, and where a copy of the log was kept.
    #[error(
        "container {id}: {op} failed: {source}{}{}",
        if reason.is_empty() { String::new() } else { format!("; CRIU's reason: {reason}") },
        log_copy.as_ref().map(|p| format!("; full log: {}", p.display())).unwrap_or_default()
    )]
    Criu {
        id: String,
        op: &'static str,
        #[source]
        source: Box<criu_rpc::Error>,
        /// CRIU's own error lines that explain the failure.
        reason: String,
        /// A copy of CRIU's log that outlives the request (the images directory may not).
        log_copy: Option<PathBuf>,
    },
    /// The container cannot be checkpointed in its state.
    #[error("container {id}: {reason}")]
    State { id: String, reason: String },
    /// A request option is not valid.
    #[error("invalid checkpoint option: {0}")]
    InvalidOption(String),
    /// The checkpoint (images, its record) is unusable.
    #[error("container {id}: checkpoint {path}: {reason}")]
    Image {
        id: String,
        path: PathBuf,
        reason: String,
    },
    /// A local step failed.
    #[error("container {id}: {context} {path}: {source}")]
    Io {
        id: String,
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A container layer (cgroups, libcontainer state, stdio) failed.
    #[error("container {id}: {context}: {message}")]
    Runtime {
        id: String,
        context: &'static str,
        message: String,
    },
}

impl CheckpointError {
    pub(crate) fn io(
        id: &str,
        context: &'static str,
        path: impl AsRef<Path>,
        source: std::io::Error,
    ) -> Self {
        CheckpointError::Io {
            id: id.to_string(),
            context,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn runtime(id: &str, context: &'static str, message: impl ToString) -> Self {
        CheckpointError::Runtime {
            id: id.to_string(),
            context,
            message: message.to_string(),
        }
    }

    /// A CRIU failure of `op` on container `id`: keeps a copy of CRIU's log as
    /// `keep_log` (containerd removes a failed checkpoint's directory, log included) and
    /// picks the lines of the log that say why.
    pub(crate) fn criu(
        id: &str,
        op: &'static str,
        source: criu_rpc::Error,
        keep_log: Option<&Path>,
    ) -> Self {
        let reason = source
            .log_tail()
            .map(|t| criu_reason(&t.lines))
            .unwrap_or_default();
        let log_copy = match (source.log_tail(), keep_log) {
            (Some(tail), Some(dest)) => std::fs::copy(&tail.path, dest)
                .ok()
                .map(|_| dest.to_path_buf()),
            _ => None,
        };
        CheckpointError::Criu {
            id: id.to_string(),
            op,
            source: Box::new(source),
            reason,
            log_copy,
        }
    }

    /// CRIU's failure report, when CRIU answered with one.
    pub fn criu_failure(&self) -> Option<&criu_rpc::CriuFailure> {
        match self {
            CheckpointError::Criu { source, .. } => source.criu_failure(),
            _ => None,
        }
    }
}

impl From<CheckpointError> for crate::Error {
    fn from(e: CheckpointError) -> Self {
        match &e {
            CheckpointError::InvalidOption(_) => crate::Error::InvalidArgument(e.to_string()),
            CheckpointError::State { .. } => crate::Error::FailedPrecondition(e.to_string()),
            CheckpointError::Image { .. } => crate::Error::InvalidArgument(e.to_string()),
            CheckpointError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                crate::Error::NotFound(e.to_string())
            }
            _ => crate::Error::Runtime {
                context: "checkpoint/restore".into(),
                message: e.to_string(),
            },
        }
    }
}

/// The error of a CRIU request that ran longer than `limit` (CRIU was killed).
pub(crate) fn timed_out(limit: std::time::Duration) -> criu_rpc::Error {
    criu_rpc::Error::Io {
        context: format!("CRIU did not finish within {limit:?} and was killed"),
        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
    }
}

/// The error lines of a CRIU log that explain a failure: its `Error` lines without the
/// ones CRIU logs on every run here (it cannot raise its own RLIMIT_NOFILE without
/// CAP_SYS_RESOURCE) and without the final summary ("Dumping FAILED."), at most three.
pub(crate) fn criu_reason(lines: &[String]) -> String {
    const NOISE: [&str; 4] = [
        "RLIMIT_NOFILE",
        "Dumping FAILED",
        "Restoring FAILED",
        "Restoring ipcns-var FAILED",
    ];
    let mut picked: Vec<&str> = Vec::new();
    for line in lines {
        let Some(at) = line.find("Error (") else {
            continue;
        };
        let text = line[at..].trim_end();
        if NOISE.iter().any(|n| text.contains(n)) || picked.contains(&text) {
            continue;
        }
        picked.push(text);
        if picked.len() == 3 {
            break;
        }
    }
    picked.join("; ")
}

/// Makes `dir` and everything below it root-only: directories 0700, files 0600. CRIU
/// images hold process memory.
pub(crate) fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)? {
            restrict_tree(&entry?.path())?;
        }
    } else if meta.is_file() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_modes() {
        assert_eq!(CgroupsMode::parse("").unwrap(), CgroupsMode::Ignore);
        assert_eq!(CgroupsMode::parse("soft").unwrap(), CgroupsMode::Soft);
        assert_eq!(CgroupsMode::parse("full").unwrap(), CgroupsMode::Full);
        assert_eq!(CgroupsMode::parse("strict").unwrap(), CgroupsMode::Strict);
        assert_eq!(CgroupsMode::parse("ignore").unwrap(), CgroupsMode::Ignore);
        let err = CgroupsMode::parse("hard").unwrap_err().to_string();
        assert!(err.contains("hard"), "{err}");
    }

    #[test]
    fn picks_criu_reasons() {
        let log: Vec<String> = [
            "(00.000915) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",
            "(00.1) Warn  (compel/arch/x86/src/lib/infect.c:419): Will restore 1 with interrupted system call",
            "(00.2) Error (criu/files-ext.c:94): Can't dump file 3 of that type [600] (anon anon_inode:[perf_event])",
            "(00.3) Error (criu/cr-dump.c:1545): Dump files (pid: 27111) failed with -1",
            "(00.4) Error (criu/cr-dump.c:1975): Dumping FAILED.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            criu_reason(&log),
            "Error (criu/files-ext.c:94): Can't dump file 3 of that type [600] (anon \
             anon_inode:[perf_event]); Error (criu/cr-dump.c:1545): Dump files (pid: 27111) \
             failed with -1"
        );
        assert_eq!(criu_reason(&[]), "");
    }

    #[test]
    fn error_kinds() {
        let e: crate::Error = CheckpointError::InvalidOption("x".into()).into();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        let e: crate::Error = CheckpointError::State {
            id: "c".into(),
            reason: "stopped".into(),
        }
        .into();
        assert_eq!(e.kind(), crate::ErrorKind::FailedPrecondition);
    }
}
