//! Create with a checkpoint: restoring a container's tree with CRIU as the init of a new
//! container. See the module docs of [`crate::checkpoint`] for the design.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criu_rpc::{Criu, CriuOptions, CriuStderr};
use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::config::YoukiConfig;
use libcontainer::container::ContainerStatus;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxNamespaceType;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, info_span, warn, Instrument};

use super::dump::{load_spec, rootfs_of};
use super::images;
use super::meta::DumpRecord;
use super::mounts::{self, MountSource};
use super::netlock::LockWatch;
use super::spawner::{AfterSpawn, ShimSpawner};
use super::stats;
use super::{CheckpointError, CriuConfig, EXT_NET_NS_KEY, EXT_PID_NS_KEY, RESTORE_LOG};
use crate::cgroups;
use crate::container::{Container, CreateConfig, RuntimeEvent};
use crate::exits::ExitWatcher;
use crate::io::ProcessIo;
use crate::process::{Process, Status};

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Where the log of a failed restore is kept (in the bundle).
const RESTORE_LOG_COPY: &str = "criu-restore.log";

/// Directory in the container's state directory where a rootfs that is not a mount point
/// is bind-mounted as CRIU's root while it restores.
const CRIU_ROOT: &str = "criu-root";

/// Directory in the container's state directory holding the fresh tmpfs mounts that
/// replace the ones empty at dump (`mounts::FreshTmpfs`), one numbered directory each,
/// while CRIU binds them into the container. They are detached right after.
pub const FRESH_TMPFS: &str = "fresh-tmpfs";

/// Detaches staged tmpfs mounts (the container keeps its binds of them) and removes
/// their directories.
fn unmount_fresh_tmpfs(dirs: Vec<PathBuf>) {
    for dir in dirs {
        if let Err(e) = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH) {
            warn!(path = %dir.display(), "unmount staged tmpfs: {e}");
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

/// Removes what a restore interrupted by the shim's death left in the state directory
/// `dir` of a container: CRIU's root and staged tmpfs mounts, and the directory itself
/// when the restore never got as far as writing libcontainer's state.
pub fn clean_leftovers(dir: &Path) {
    let root = dir.join(CRIU_ROOT);
    if root.exists() {
        let _ = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&root);
    }
    let staged = dir.join(FRESH_TMPFS);
    if let Ok(entries) = std::fs::read_dir(&staged) {
        unmount_fresh_tmpfs(entries.flatten().map(|e| e.path()).collect());
        let _ = std::fs::remove_dir(&staged);
    }
    if dir.is_dir() && !dir.join("state.json").exists() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A Create with a checkpoint.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The container to create, as for a cold start.
    pub create: CreateConfig,
    /// The CRIU images (containerd unpacks the checkpoint here).
    pub image_dir: PathBuf,
    /// CRIU's work directory (logs, stats); the images directory when unset.
    pub work_dir: Option<PathBuf>,
    pub criu: CriuConfig,
}

/// Where a restore puts the tree.
pub(crate) enum Target {
    /// A new container (Create with a checkpoint): state directory, cgroups and stdio are
    /// made as for a cold start.
    New,
    /// The hibernated init of a container that still exists: its state directory and
    /// cgroups are there, and so are its stdio pipes, which the shim held while the tree
    /// slept (fds 0-2 of the dumped init, in that order); the network namespace the dump
    /// declared external is `netns` when the spec names none (the container's own, held
    /// by the shim).
    Existing {
        stdio: [OwnedFd; 3],
        netns: Option<std::fs::File>,
    },
}

/// The restored tree: its pid, its exit registration, and for a new container its stdio.
pub(crate) struct RestoredTree {
    pub pid: i32,
    pub exited: tokio::sync::oneshot::Receiver<i32>,
    pub io: Option<ProcessIo>,
}

/// Restores the images of `cfg` into `target` (no new [`Container`]): the hibernation
/// wake-up.
pub(crate) async fn restore_tree(
    cfg: &RestoreConfig,
    target: Target,
    exits: &ExitWatcher,
) -> Result<RestoredTree> {
    let span = info_span!("restore", container = %cfg.create.id);
    async {
        let mut undo = Undo {
            keep_container: matches!(target, Target::Existing { .. }),
            ..Default::default()
        };
        match attempt(cfg, target, exits, &mut undo).await {
            Ok(t) => Ok(t),
            Err(e) => {
                warn!(error = %e, "restore failed");
                undo.run().await;
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

/// Restores the checkpoint in `cfg.image_dir` as the running init of a new container.
pub async fn restore(
    cfg: RestoreConfig,
    exits: ExitWatcher,
    events: UnboundedSender<RuntimeEvent>,
) -> Result<Arc<Container>> {
    let span = info_span!("restore", container = %cfg.create.id);
    run(cfg, exits, events).instrument(span).await
}

/// What a failed restore must undo.
#[derive(Default)]
struct Undo {
    /// The target container exists (hibernation): its state and cgroups are not ours to
    /// remove.
    keep_container: bool,
    state_dir: Option<PathBuf>,
    criu_root: Option<PathBuf>,
    /// Fresh tmpfs mounts CRIU binds into the container (see [`FRESH_TMPFS`]).
    fresh_tmpfs: Vec<PathBuf>,
    cgroups: Option<(Arc<AnyCgroupManager>, Option<PathBuf>)>,
    io: Option<ProcessIo>,
    restored: Option<(i32, tokio::sync::oneshot::Receiver<i32>)>,
}

impl Undo {
    fn unmount_staging(&mut self) {
        if let Some(root) = self.criu_root.take() {
            if let Err(e) = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH) {
                warn!(path = %root.display(), "unmount CRIU root: {e}");
            }
            let _ = std::fs::remove_dir(&root);
        }
        unmount_fresh_tmpfs(std::mem::take(&mut self.fresh_tmpfs));
    }

    async fn run(mut self) {
        if let Some((pid, exited)) = self.restored.take() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(10), exited).await;
        }
        if let Some(mut io) = self.io.take() {
            io.close();
        }
        self.unmount_staging();
        if self.keep_container {
            return;
        }
        if let Some((manager, unified)) = self.cgroups.take() {
            if let Err(e) = manager.remove() {
                warn!("remove cgroups of failed restore: {e}");
            }
            if let Some(dir) = unified {
                let _ = std::fs::remove_dir(dir);
            }
        }
        if let Some(dir) = self.state_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn run(
    cfg: RestoreConfig,
    exits: ExitWatcher,
    events: UnboundedSender<RuntimeEvent>,
) -> Result<Arc<Container>> {
    let mut undo = Undo::default();
    match attempt(&cfg, Target::New, &exits, &mut undo).await {
        Ok(restored) => Restored::from_tree(restored, &cfg).map(|r| r.finish(cfg, exits, events)),
        Err(e) => {
            warn!(error = %e, "restore failed");
            undo.run().await;
            Err(e)
        }
    }
}

/// A tree CRIU restored, ready to become a container's init.
struct Restored {
    pid: i32,
    io: ProcessIo,
    exited: tokio::sync::oneshot::Receiver<i32>,
}

impl Restored {
    fn from_tree(t: RestoredTree, cfg: &RestoreConfig) -> Result<Restored> {
        let io = t.io.ok_or_else(|| {
            CheckpointError::runtime(
                &cfg.create.id,
                "stdio",
                "a new container's restore made no stdio",
            )
        })?;
        Ok(Restored {
            pid: t.pid,
            io,
            exited: t.exited,
        })
    }

    fn finish(
        self,
        cfg: RestoreConfig,
        exits: ExitWatcher,
        events: UnboundedSender<RuntimeEvent>,
    ) -> Arc<Container> {
        let init = Arc::new(Process::new("", cfg.create.stdio.clone()));
        init.set_pid(self.pid);
        init.set_status(Status::Running);
        // Nobody else can hold the lock of a process that was just made.
        if let Ok(mut slot) = init.io.try_lock() {
            *slot = Some(self.io);
        }
        Container::adopt_restored(cfg.create, init, self.exited, exits, events)
    }
}

/// What the images and the bundle say about a restore, before anything is changed.
struct Plan {
    spec: oci_spec::runtime::Spec,
    record: DumpRecord,
    work_dir: PathBuf,
    youki: YoukiConfig,
    terminal: bool,
}

impl Plan {
    fn load(cfg: &RestoreConfig) -> Result<Plan> {
        let id = cfg.create.id.as_str();
        let spec = load_spec(id, &cfg.create.bundle)?;
        let record = DumpRecord::load(&cfg.image_dir)
            .map_err(|r| image_err(cfg, r))?
            .ok_or_else(|| {
                image_err(
                    cfg,
                    "no checkpoint record (runc-architect-checkpoint.json or descriptors.json): \
                     not a container checkpoint"
                        .into(),
                )
            })?;
        // CRIU would spin forever on a pages file that is cut short.
        images::check_pages(&cfg.image_dir).map_err(|r| image_err(cfg, r))?;
        let youki = YoukiConfig::from_spec(&spec, id)
            .map_err(|e| CheckpointError::runtime(id, "cgroup path from spec", e))?;
        let terminal = record.terminal
            || spec
                .process()
                .as_ref()
                .and_then(|p| p.terminal())
                .unwrap_or(false);
        Ok(Plan {
            work_dir: cfg
                .work_dir
                .clone()
                .unwrap_or_else(|| cfg.image_dir.clone()),
            spec,
            record,
            youki,
            terminal,
        })
    }
}

fn image_err(cfg: &RestoreConfig, reason: String) -> CheckpointError {
    CheckpointError::Image {
        id: cfg.create.id.clone(),
        path: cfg.image_dir.clone(),
        reason,
    }
}

/// libcontainer's state directory of a new container, as a create would make it.
fn new_state_dir(cfg: &RestoreConfig, undo: &mut Undo) -> Result<PathBuf> {
    let id = cfg.create.id.as_str();
    std::fs::create_dir_all(&cfg.create.state_root)
        .map_err(|e| CheckpointError::io(id, "create state root", &cfg.create.state_root, e))?;
    let state_dir = cfg.create.state_root.join(id);
    match std::fs::create_dir(&state_dir) {
        Ok(()) => undo.state_dir = Some(state_dir.clone()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(CheckpointError::State {
                id: id.into(),
                reason: format!("state directory {} exists already", state_dir.display()),
            })
        }
        Err(e) => return Err(CheckpointError::io(id, "create", &state_dir, e)),
    }
    Ok(state_dir)
}

/// The container's cgroups (made from the spec, with its limits, or the ones a hibernated
/// container kept), and what joins CRIU to them the moment it is spawned.
fn cgroups_for(id: &str, plan: &Plan, undo: &mut Undo) -> Result<AfterSpawn> {
    let cgroup_path = plan.youki.cgroup_path.clone();
    let manager = Arc::new(
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: cgroup_path.clone(),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(|e| CheckpointError::runtime(id, "cgroup manager", e))?,
    );
    let unified_dir = match cgroups::mode() {
        cgroups::Mode::Hybrid => cgroups::unified_root().map(|r| join_rel(r, &cgroup_path)),
        _ => None,
    };
    undo.cgroups = Some((manager.clone(), unified_dir));
    let resources = plan
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().clone())
        .unwrap_or_default();
    Ok(Arc::new(move |pid| {
        manager
            .add_task(Pid::from_raw(pid))
            .map_err(std::io::Error::other)?;
        manager
            .apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: resources
                    .memory()
                    .as_ref()
                    .and_then(|m| m.disable_oom_killer())
                    .unwrap_or(false),
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(std::io::Error::other)?;
        cgroups::join_unified_like_v1(pid).map_err(std::io::Error::other)
    }))
}

/// CRIU's root, which must be a mount point: the rootfs containerd had us mount is one; a
/// bundle's plain rootfs directory is bind-mounted into the state directory first. Using
/// the mounted rootfs as it is leaves nothing to clean up should the shim die in the
/// middle of the restore.
fn criu_root(
    id: &str,
    plan: &Plan,
    bundle: &Path,
    state_dir: &Path,
    undo: &mut Undo,
) -> Result<PathBuf> {
    let rootfs = rootfs_of(bundle, &plan.spec);
    mounts::ensure_mountpoints(&rootfs, &plan.spec)
        .map_err(|e| CheckpointError::io(id, "create mount points in", &rootfs, e))?;
    if is_mount_point(&rootfs) {
        return Ok(rootfs);
    }
    let criu_root = state_dir.join(CRIU_ROOT);
    std::fs::create_dir(&criu_root)
        .map_err(|e| CheckpointError::io(id, "create", &criu_root, e))?;
    nix::mount::mount(
        Some(&rootfs),
        &criu_root,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| CheckpointError::io(id, "bind-mount the rootfs on", &criu_root, e.into()))?;
    undo.criu_root = Some(criu_root.clone());
    Ok(criu_root)
}

/// The stdio the restored init gets: for a new container fresh pipes (or a console
/// socket) from [`ProcessIo`], as for a cold start; for a hibernated one the pipes the
/// shim held. CRIU re-attaches them by the dumped pipes' inodes.
struct StdioPlan {
    /// Descriptors to hand to CRIU for fds 0-2 (when the init has no terminal).
    fds: Option<[RawFd; 3]>,
    console_socket: Option<PathBuf>,
    /// Our ends for a new container, kept until the restored tree holds its own.
    child: Option<crate::io::ChildStdio>,
    held: Option<[OwnedFd; 3]>,
}

fn stdio_for(
    cfg: &RestoreConfig,
    held: Option<[OwnedFd; 3]>,
    undo: &mut Undo,
) -> Result<StdioPlan> {
    if let Some(held) = held {
        let fds = [
            held[0].as_raw_fd(),
            held[1].as_raw_fd(),
            held[2].as_raw_fd(),
        ];
        return Ok(StdioPlan {
            fds: Some(fds),
            console_socket: None,
            child: None,
            held: Some(held),
        });
    }
    let (io, child) = ProcessIo::prepare(&cfg.create.stdio, &std::env::temp_dir())
        .map_err(|e| CheckpointError::runtime(&cfg.create.id, "prepare stdio", e))?;
    undo.io = Some(io);
    Ok(StdioPlan {
        fds: child.fds().map(|f| [f.stdin, f.stdout, f.stderr]),
        console_socket: child.console_socket.clone(),
        child: Some(child),
        held: None,
    })
}

/// CRIU's restore options: the record's, the stdio to inherit, the external mounts
/// (fresh tmpfs mounts made for the ones that were empty at dump), the namespaces.
/// Returns them with the external network namespace, if any.
#[allow(clippy::too_many_arguments)]
fn criu_options(
    cfg: &RestoreConfig,
    plan: &Plan,
    criu_root: &Path,
    state_dir: &Path,
    stdio: &StdioPlan,
    kept_netns: Option<std::fs::File>,
    undo: &mut Undo,
) -> Result<(CriuOptions, Option<std::fs::File>)> {
    let id = cfg.create.id.as_str();
    let record = &plan.record;
    let cgroup_path = &plan.youki.cgroup_path;
    let mut opts = CriuOptions::new()
        .images_dir(&cfg.image_dir)
        .work_dir(&plan.work_dir)
        .log_file(RESTORE_LOG)
        .log_level(cfg.criu.log_level)
        .root(criu_root.to_string_lossy())
        .rst_sibling(true)
        .manage_cgroups(record.cgroups_mode.managed())
        .manage_cgroups_mode(record.cgroups_mode.criu())
        .tcp_established(record.tcp_established)
        .ext_unix_sk(record.ext_unix_sk)
        .shell_job(record.shell_job)
        .file_locks(record.file_locks)
        .network_lock(record.network_lock.criu())
        .orphan_pts_master(plan.terminal);
    if record.cgroups_mode.managed() {
        opts = opts.cg_root(None, cgroup_path.to_string_lossy());
    }

    let mut seen = HashSet::new();
    if let Some(fds) = stdio.fds {
        for (n, rec) in record.stdio.iter().enumerate().take(3) {
            let Some(key) = rec.inherit_key.clone() else {
                continue;
            };
            if !seen.insert(key.clone()) {
                continue;
            }
            let fd = dup_cloexec(fds[n])
                .map_err(|e| CheckpointError::io(id, "duplicate stdio for", &key, e))?;
            opts = opts.inherit_fd(key, fd);
        }
    }

    let externals = if record.is_inferred() {
        let host = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| CheckpointError::io(id, "read", "/proc/self/mountinfo", e))?;
        mounts::runc_externals(&plan.spec, &mounts::parse_mountinfo(&host))
    } else {
        record.external_mounts.clone()
    };
    let cgroup_dir = |controller: &str| -> Option<PathBuf> {
        if controller.is_empty() {
            cgroups::unified_root().map(|r| join_rel(r, cgroup_path))
        } else {
            Some(join_rel(
                &Path::new("/sys/fs/cgroup").join(controller),
                cgroup_path,
            ))
        }
    };
    let mut fresh = HashMap::new();
    for (n, ext) in externals.iter().enumerate() {
        let MountSource::Tmpfs(t) = &ext.source else {
            continue;
        };
        let dir = state_dir.join(FRESH_TMPFS).join(n.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| CheckpointError::io(id, "create", &dir, e))?;
        t.mount(&dir).map_err(|e| {
            let _ = std::fs::remove_dir(&dir);
            CheckpointError::io(id, "mount a fresh tmpfs on", &dir, e)
        })?;
        undo.fresh_tmpfs.push(dir.clone());
        fresh.insert(ext.destination.clone(), dir);
    }
    for ext in mounts::restore_externals(&externals, &plan.spec, cgroup_dir, &fresh)
        .map_err(|r| image_err(cfg, r))?
    {
        opts = opts.external(ext);
    }

    // Namespaces joined by path: network and pid were external at dump; the others are
    // joined as they are. A network namespace of the container's own that the shim kept
    // (hibernation) is external too.
    let mut external_netns: Option<std::fs::File> = None;
    let mut pid_given = false;
    for ns in plan
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
    {
        let Some(path) = ns.path().clone() else {
            continue;
        };
        let open = |what: &'static str| {
            std::fs::File::open(&path).map_err(|e| CheckpointError::io(id, what, &path, e))
        };
        match ns.typ() {
            LinuxNamespaceType::Network => {
                if record.external_net_ns || record.is_inferred() {
                    external_netns = Some(open("open network namespace")?);
                }
            }
            LinuxNamespaceType::Pid => {
                if record.external_pid_ns || record.is_inferred() {
                    opts =
                        opts.inherit_fd(EXT_PID_NS_KEY, OwnedFd::from(open("open pid namespace")?));
                    pid_given = true;
                }
            }
            LinuxNamespaceType::Ipc => opts = join_ns(opts, "ipc", &path),
            LinuxNamespaceType::Uts => opts = join_ns(opts, "uts", &path),
            LinuxNamespaceType::Time => opts = join_ns(opts, "time", &path),
            LinuxNamespaceType::User => opts = join_ns(opts, "user", &path),
            other => {
                return Err(CheckpointError::InvalidOption(format!(
                    "cannot restore into an existing {other:?} namespace ({})",
                    path.display()
                )))
            }
        }
    }
    if external_netns.is_none() && record.external_net_ns {
        external_netns = kept_netns;
    }
    match &external_netns {
        Some(ns) => {
            let fd = ns
                .try_clone()
                .map_err(|e| CheckpointError::io(id, "duplicate", "the network namespace", e))?;
            opts = opts.inherit_fd(EXT_NET_NS_KEY, OwnedFd::from(fd));
        }
        None if record.external_net_ns => {
            return Err(image_err(
                cfg,
                "the checkpoint joined an existing network namespace, but the restoring spec \
                 names none"
                    .into(),
            ))
        }
        None => {}
    }
    if record.external_pid_ns && !pid_given {
        return Err(image_err(
            cfg,
            "the checkpoint joined an existing pid namespace, but the restoring spec names none"
                .into(),
        ));
    }
    Ok((opts, external_netns))
}

async fn attempt(
    cfg: &RestoreConfig,
    target: Target,
    exits: &ExitWatcher,
    undo: &mut Undo,
) -> Result<RestoredTree> {
    let started = Instant::now();
    let id = cfg.create.id.as_str();
    let bundle = &cfg.create.bundle;
    let plan = Plan::load(cfg)?;
    let (held, kept_netns) = match target {
        Target::New => (None, None),
        Target::Existing { stdio, netns } => (Some(stdio), netns),
    };
    let existing = held.is_some();
    let state_dir = if existing {
        cfg.create.state_root.join(id)
    } else {
        new_state_dir(cfg, undo)?
    };
    let join = cgroups_for(id, &plan, undo)?;
    let criu_root = criu_root(id, &plan, bundle, &state_dir, undo)?;
    let mut stdio = stdio_for(cfg, held, undo)?;
    let (opts, external_netns) =
        criu_options(cfg, &plan, &criu_root, &state_dir, &stdio, kept_netns, undo)?;

    let prepared = started.elapsed();
    let spawner = Arc::new(ShimSpawner::new(exits.clone()).after_spawn(join));
    let criu = Criu::with_binary(&cfg.criu.binary)
        .spawner(spawner.clone())
        .stderr(CriuStderr::Null);
    // The dump may have left this namespace locked for us (the runtime's lock); CRIU's
    // own lock, if the checkpoint used it, is CRIU's to lift.
    let inherited_lock = match (&external_netns, plan.record.locked_netns) {
        (Some(ns), Some(locked)) => ns.metadata().map(|m| m.ino() == locked).unwrap_or(false),
        _ => false,
    };
    let mut handler = LockWatch::new(exits.clone(), plan.record.network_lock, external_netns);
    if inherited_lock {
        handler = handler.inherit_lock();
    }
    let criu_started = Instant::now();
    let result = match tokio::time::timeout(
        cfg.criu.timeout,
        criu.restore_with_notify(opts, &mut handler),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => {
            spawner.kill_all();
            Err(super::timed_out(cfg.criu.timeout))
        }
    };
    let outcome = match result {
        Ok(o) => o,
        Err(source) => {
            // A restore into an existing (pod) network namespace must not leave it locked.
            handler.release().await;
            return Err(CheckpointError::criu(
                id,
                "restore",
                source,
                Some(&bundle.join(RESTORE_LOG_COPY)),
            ));
        }
    };
    let criu_elapsed = criu_started.elapsed();
    let pid = outcome.pid;
    // Our child now (rst_sibling); its exit may already be buffered by the watcher.
    let exited = exits.register(pid);
    undo.restored = Some((pid, exited));
    undo.unmount_staging();

    if let Some(master) = handler.pts_master.take() {
        let sock = stdio.console_socket.clone().ok_or_else(|| {
            CheckpointError::runtime(
                id,
                "re-attach terminal",
                "CRIU handed over a pty master, but the new task has no terminal",
            )
        })?;
        send_fd(&sock, &master)
            .map_err(|e| CheckpointError::io(id, "hand the pty master to", &sock, e))?;
    } else if stdio.console_socket.is_some() {
        return Err(CheckpointError::runtime(
            id,
            "re-attach terminal",
            "the task wants a terminal, but the checkpoint has none to re-attach",
        ));
    }
    // The process holds its ends now; ours must go so that EOF works.
    stdio.child.take();
    stdio.held.take();
    if let Some(mut io) = undo.io.take() {
        if let Err(e) = io.start(&cfg.create.stdio).await {
            undo.io = Some(io);
            return Err(CheckpointError::runtime(id, "start stdio copies", e));
        }
        undo.io = Some(io);
    }

    write_state(id, bundle, &state_dir, pid, &plan.youki)?;

    let (pid, exited) = undo
        .restored
        .take()
        .ok_or_else(|| CheckpointError::runtime(id, "restore", "restored pid lost"))?;
    let io = undo.io.take();
    // Success: nothing to undo any more.
    *undo = Undo::default();

    let phases = stats::restore_phases(&plan.work_dir).ok();
    info!(
        pid,
        prepare_ms = ms(prepared),
        criu_ms = ms(criu_elapsed),
        cgroup_join_ms = spawner.hook_time().map(ms),
        criu_forking_ms = phases.map(|p| ms(p.forking)),
        criu_restore_ms = phases.map(|p| ms(p.restore)),
        total_ms = ms(started.elapsed()),
        "restored"
    );
    Ok(RestoredTree { pid, exited, io })
}

/// Whether `path` is a mount point in this mount namespace.
fn is_mount_point(path: &Path) -> bool {
    let Ok(path) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mounts::parse_mountinfo(&text)
        .iter()
        .any(|m| Path::new(&m.mount_point) == path)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn join_ns(opts: CriuOptions, ns: &str, path: &Path) -> CriuOptions {
    opts.join_ns(ns, path.to_string_lossy(), None)
}

/// `root` joined with a cgroup path that starts with `/`.
fn join_rel(root: &Path, cgroup_path: &Path) -> PathBuf {
    root.join(cgroup_path.strip_prefix("/").unwrap_or(cgroup_path))
}

fn dup_cloexec(fd: RawFd) -> std::io::Result<OwnedFd> {
    let new = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        .map_err(std::io::Error::from)?;
    // SAFETY: F_DUPFD_CLOEXEC just created this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Sends `fd` over the unix socket at `path` (a console socket, as libcontainer would).
fn send_fd(path: &Path, fd: &OwnedFd) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let conn = std::os::unix::net::UnixStream::connect(path)?;
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let name = b"/dev/ptmx";
    let iov = [std::io::IoSlice::new(name)];
    sendmsg::<()>(conn.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(std::io::Error::from)?;
    Ok(())
}

/// libcontainer's state for the restored init, so that its pause, resume, update, exec
/// and delete work as for a created container.
fn write_state(
    id: &str,
    bundle: &Path,
    state_dir: &Path,
    pid: i32,
    youki: &YoukiConfig,
) -> Result<()> {
    let mut c = libcontainer::container::Container::new(
        id,
        ContainerStatus::Created,
        Some(pid),
        bundle,
        state_dir,
    )
    .map_err(|e| CheckpointError::runtime(id, "container state", e))?;
    c.set_status(ContainerStatus::Running)
        .set_creator(nix::unistd::geteuid().as_raw())
        .set_systemd(false);
    c.save()
        .map_err(|e| CheckpointError::runtime(id, "save container state", e))?;
    youki
        .save(state_dir)
        .map_err(|e| CheckpointError::runtime(id, "save container config", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mount_points() {
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self/fd")));
    }

    #[test]
    fn joins_cgroup_paths() {
        assert_eq!(
            join_rel(Path::new("/sys/fs/cgroup/unified"), Path::new("/ns/c")),
            PathBuf::from("/sys/fs/cgroup/unified/ns/c")
        );
        assert_eq!(
            join_rel(Path::new("/sys/fs/cgroup"), Path::new("ns/c")),
            PathBuf::from("/sys/fs/cgroup/ns/c")
        );
    }

    #[test]
    fn hands_a_descriptor_over_a_socket() {
        let dir = std::env::temp_dir().join(format!("ra-sendfd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_fd(&sock, &OwnedFd::from(file)).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let mut got = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel installed these descriptors for this test alone.
                got.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        assert_eq!(got.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
