//! The mechanism that owns a hibernating container's process tree: freezing and thawing it,
//! scaling it down (dump, make the images durable in the store, only then kill the tree and
//! give its memory back) and waking it (restore the same tree into the same container, or
//! start a fresh init from the spec when the images cannot be restored).
//!
//! While the tree sleeps the shim holds what the restore puts back: the init's stdio pipes
//! (so that containerd's streams never see an end of file) and, for a container with a
//! network namespace of its own, that namespace (so that its addresses, routes and
//! listening ports stay where clients expect them; a pod's belongs to its pause container).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runc_architect_store::{CheckpointKey, Generation, MaterializeOptions, Reference, Store};
use tracing::{info, warn};

use crate::cgroups::{self, CgroupPaths};
use crate::checkpoint::freezer::{Freezer, FREEZE_TIMEOUT};
use crate::checkpoint::restore::{restore_tree, RestoreConfig, Target};
use crate::checkpoint::{restrict_tree, CheckpointRequest, CriuConfig, NetworkLock};
use crate::container::Container;
use crate::exits::ExitWatcher;

/// How long the killed tree may take to be gone after a scale-down.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the tree mechanism; each names the container and the step.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("container {id}: {step}: {source}")]
    Io {
        id: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("container {id}: {step}: {reason}")]
    Refused {
        id: String,
        step: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("container {id}: checkpoint store: {source}")]
    Store {
        id: String,
        #[source]
        source: runc_architect_store::StoreError,
    },
    #[error("container {id}: cold start: {source}")]
    ColdStart {
        id: String,
        #[source]
        source: crate::Error,
    },
}

/// Where a container's hibernation images go, and which store makes them durable.
#[derive(Clone)]
pub struct TreeConfig {
    /// The container's local images directory (on disk, root-only): the dump goes here and
    /// stays as the fast path of the wake; the store holds the durable copy.
    pub images_dir: PathBuf,
    pub store: Arc<Store>,
    /// The container's key in the store.
    pub key: CheckpointKey,
    pub criu: CriuConfig,
}

/// What a scale-down did.
#[derive(Debug, Clone, Copy)]
pub struct ScaledDown {
    pub took: Duration,
    /// Logical size of the checkpoint.
    pub bytes: u64,
    pub memory_before: u64,
    pub memory_after: u64,
}

/// What a wake did.
#[derive(Debug, Clone, Copy)]
pub struct Woken {
    pub pid: i32,
    pub took: Duration,
    /// The images could not be restored: a fresh init was started from the spec.
    pub cold: bool,
}

/// The tree of one hibernating container.
pub struct Tree {
    container: Arc<Container>,
    exits: ExitWatcher,
    cfg: TreeConfig,
    freezer: Option<Freezer>,
    /// fds 0-2 of the init while it sleeps.
    stdio: Option<[OwnedFd; 3]>,
    /// The container's own network namespace while it sleeps.
    netns: Option<File>,
}

impl Tree {
    pub fn new(container: Arc<Container>, exits: ExitWatcher, cfg: TreeConfig) -> Tree {
        let freezer = freezer_of(container.cgroups());
        Tree {
            container,
            exits,
            cfg,
            freezer,
            stdio: None,
            netns: None,
        }
    }

    fn id(&self) -> &str {
        &self.container.id
    }

    fn freezer(&self) -> Result<Freezer, TreeError> {
        self.freezer.clone().ok_or_else(|| TreeError::Refused {
            id: self.id().to_string(),
            step: "freeze",
            reason: "the container has no cgroup v2 directory to freeze".into(),
        })
    }

    /// Freezes the whole tree (cgroup v2 freezer); how long it took.
    pub async fn freeze(&self) -> Result<Duration, TreeError> {
        let f = self.freezer()?;
        let id = self.id().to_string();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || f.freeze(FREEZE_TIMEOUT))
            .await
            .map_err(|e| TreeError::Refused {
                id: id.clone(),
                step: "freeze",
                reason: e.to_string(),
            })?
            .map_err(|source| TreeError::Io {
                id,
                step: "freeze",
                source,
            })?;
        Ok(t.elapsed())
    }

    /// Thaws the tree (immediate: a single write).
    pub fn thaw(&self) -> Result<(), TreeError> {
        self.freezer()?.thaw().map_err(|source| TreeError::Io {
            id: self.id().to_string(),
            step: "thaw",
            source,
        })
    }

    /// Scales the (frozen) tree down: dump with CRIU into the local images directory, put
    /// the images into the store (durable), only then kill the tree, and give its memory
    /// back. On any failure before the kill the tree is left as it was (frozen) and the
    /// error says why; the caller thaws it.
    pub async fn scale_down(&mut self) -> Result<ScaledDown, TreeError> {
        let started = Instant::now();
        let id = self.id().to_string();
        if self.container.has_running_execs() {
            return Err(TreeError::Refused {
                id,
                step: "scale down",
                reason: "an exec process runs in the container".into(),
            });
        }
        let memory_before = memory_usage(self.container.cgroups());
        let dir = &self.cfg.images_dir;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|source| TreeError::Io {
                id: id.clone(),
                step: "clear the images directory",
                source,
            })?;
        }
        create_private_dir(dir).map_err(|source| TreeError::Io {
            id: id.clone(),
            step: "create the images directory",
            source,
        })?;
        let own_netns = !self.container.joins_netns_by_path();
        let req = CheckpointRequest {
            image_dir: dir.clone(),
            work_dir: None,
            parent: None,
            exit: false,
            open_tcp: true,
            external_unix_sockets: false,
            terminal: false,
            file_locks: true,
            empty_namespaces: Vec::new(),
            cgroups_mode: Default::default(),
            // The caller holds the network (connections are queued, not dropped).
            network_lock: NetworkLock::Skip,
            criu: self.cfg.criu.clone(),
            portable: false,
            keep_netns: own_netns,
        };
        // Held before the dump, while the init surely exists.
        let stdio = self
            .container
            .hold_init_stdio()
            .map_err(|e| TreeError::Refused {
                id: id.clone(),
                step: "hold the init's stdio",
                reason: e.to_string(),
            })?;
        let netns = if own_netns {
            let p = format!("/proc/{}/ns/net", self.container.init_pid());
            Some(File::open(&p).map_err(|source| TreeError::Io {
                id: id.clone(),
                step: "hold the network namespace",
                source,
            })?)
        } else {
            None
        };
        crate::checkpoint::checkpoint(&self.container, &self.exits, req).await?;
        let (store, key, src) = (self.cfg.store.clone(), self.cfg.key.clone(), dir.clone());
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("reason".to_string(), "hibernation".to_string());
        meta.insert("container-id".to_string(), id.clone());
        let put = tokio::task::spawn_blocking(move || store.put_dir(&key, &src, meta))
            .await
            .map_err(|e| TreeError::Refused {
                id: id.clone(),
                step: "store the checkpoint",
                reason: e.to_string(),
            })?
            .map_err(|source| TreeError::Store {
                id: id.clone(),
                source,
            })?;
        // Durable: the tree may go.
        self.stdio = Some(stdio);
        self.netns = netns;
        // Connections close silently with the tree: the restore brings them back.
        let quiet = self.container.quiesce_tcp();
        let exited = self.container.kill_for_sleep();
        if let Some(f) = &self.freezer {
            // SIGKILL reaches frozen tasks on cgroup v2; thawing makes sure.
            let _ = f.thaw();
        }
        if tokio::time::timeout(KILL_TIMEOUT, exited).await.is_err() {
            warn!(container = %id, "the tree did not die within {KILL_TIMEOUT:?} of SIGKILL");
        }
        wait_empty(self.container.cgroups(), KILL_TIMEOUT).await;
        drop(quiet);
        reclaim(self.container.cgroups());
        let memory_after = memory_usage(self.container.cgroups());
        let done = ScaledDown {
            took: started.elapsed(),
            bytes: put.logical_bytes,
            memory_before,
            memory_after,
        };
        info!(
            container = %id,
            took_ms = done.took.as_secs_f64() * 1e3,
            bytes = done.bytes,
            memory_before,
            memory_after,
            "scaled down"
        );
        Ok(done)
    }

    /// Wakes the sleeping tree: restores it from the local images (materialized from the
    /// store first if they are gone) into the same container. On failure the tree stays
    /// asleep (its stdio still held) for a [`Tree::cold_start`].
    pub async fn restore(&mut self) -> Result<Woken, TreeError> {
        let started = Instant::now();
        let stdio = self.held_stdio("restore")?;
        let pid = self.restore_with(stdio).await?;
        self.woke();
        let w = Woken {
            pid,
            took: started.elapsed(),
            cold: false,
        };
        info!(container = %self.id(), pid, took_ms = w.took.as_secs_f64() * 1e3, "restored");
        Ok(w)
    }

    /// Starts a fresh init from the bundle's spec in place of the sleeping tree (its
    /// restore failed), with the held stdio, so the streams to containerd go on.
    pub async fn cold_start(&mut self) -> Result<Woken, TreeError> {
        let started = Instant::now();
        let id = self.id().to_string();
        let stdio = self.held_stdio("cold start")?;
        let pid = self
            .container
            .cold_restart(stdio)
            .await
            .map_err(|source| TreeError::ColdStart { id, source })?;
        self.woke();
        let w = Woken {
            pid,
            took: started.elapsed(),
            cold: true,
        };
        info!(container = %self.id(), pid, took_ms = w.took.as_secs_f64() * 1e3, "cold-started");
        Ok(w)
    }

    fn held_stdio(&self, step: &'static str) -> Result<&[OwnedFd; 3], TreeError> {
        self.stdio.as_ref().ok_or_else(|| TreeError::Refused {
            id: self.id().to_string(),
            step,
            reason: "the tree is not asleep".into(),
        })
    }

    /// The tree holds its own stdio and namespace again: ours go.
    fn woke(&mut self) {
        self.stdio = None;
        self.netns = None;
    }

    async fn restore_with(&self, stdio: &[OwnedFd; 3]) -> Result<i32, TreeError> {
        let id = self.id().to_string();
        self.ensure_images().await?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| TreeError::Io {
                id: id.clone(),
                step: "duplicate the held stdio",
                source,
            })
        };
        let held = [dup(&stdio[0])?, dup(&stdio[1])?, dup(&stdio[2])?];
        let netns = match &self.netns {
            Some(f) => Some(f.try_clone().map_err(|source| TreeError::Io {
                id: id.clone(),
                step: "duplicate the held network namespace",
                source,
            })?),
            None => None,
        };
        let cfg = RestoreConfig {
            create: self.container.create_config(),
            image_dir: self.cfg.images_dir.clone(),
            work_dir: None,
            criu: self.cfg.criu.clone(),
        };
        let tree = restore_tree(&cfg, Target::Existing { stdio: held, netns }, &self.exits).await?;
        self.container.adopt_woken_init(tree.pid, tree.exited);
        Ok(tree.pid)
    }

    /// The local images, materialized from the store when they are gone (a node that
    /// lost its cache, a copy removed by hand).
    async fn ensure_images(&self) -> Result<(), TreeError> {
        let dir = self.cfg.images_dir.clone();
        if dir.join("inventory.img").exists() {
            return Ok(());
        }
        let id = self.id().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        let (store, key) = (self.cfg.store.clone(), self.cfg.key.clone());
        let d = dir.clone();
        tokio::task::spawn_blocking(move || {
            store.materialize(
                &Reference::Key(key, Generation::Latest),
                &d,
                &MaterializeOptions::default(),
            )
        })
        .await
        .map_err(|e| TreeError::Refused {
            id: id.clone(),
            step: "materialize the checkpoint",
            reason: e.to_string(),
        })?
        .map_err(|source| TreeError::Store {
            id: id.clone(),
            source,
        })?;
        restrict_tree(&dir).map_err(|source| TreeError::Io {
            id,
            step: "restrict the materialized images",
            source,
        })
    }

    /// Whether the tree sleeps (its stdio is held).
    pub fn asleep(&self) -> bool {
        self.stdio.is_some()
    }

    /// A sleeping tree that is killed (SIGKILL while asleep): nothing to restore any more.
    pub fn forget_sleep(&mut self) {
        self.stdio = None;
        self.netns = None;
    }

    /// Removes what hibernation keeps of the container: the local images and every
    /// checkpoint of it in the store (a deleted container leaves nothing behind).
    pub async fn discard(&mut self) {
        self.forget_sleep();
        let dir = self.cfg.images_dir.clone();
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(container = %self.id(), dir = %dir.display(), "remove hibernation images: {e}");
            }
        }
        if let Some(parent) = dir.parent() {
            // The per-namespace directory goes when it is empty.
            let _ = std::fs::remove_dir(parent);
        }
        let (store, key) = (self.cfg.store.clone(), self.cfg.key.clone());
        let res = tokio::task::spawn_blocking(move || {
            store.gc(&runc_architect_store::GcOptions {
                forget: vec![key],
                ..Default::default()
            })
        })
        .await;
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(container = %self.id(), "forget its checkpoints in the store: {e}"),
            Err(e) => warn!(container = %self.id(), "forget its checkpoints in the store: {e}"),
        }
    }
}

/// The container's cgroup v2 freezer (every container has a v2 directory, also on hybrid
/// hosts).
fn freezer_of(paths: &CgroupPaths) -> Option<Freezer> {
    let dir = paths.unified.clone()?;
    (cgroups::unified_root() != Some(dir.as_path()) && dir.join("cgroup.freeze").exists())
        .then_some(Freezer::V2(dir))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

/// The container's memory use (v1 `memory.usage_in_bytes` on legacy and hybrid hosts, v2
/// `memory.current`), 0 when unknown.
pub fn memory_usage(paths: &CgroupPaths) -> u64 {
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    if paths.uses_v1() {
        if let Some(dir) = paths.v1("memory") {
            return read(dir.join("memory.usage_in_bytes")).unwrap_or(0);
        }
    }
    paths
        .unified
        .as_ref()
        .and_then(|d| read(d.join("memory.current")))
        .unwrap_or(0)
}

/// Gives the memory still charged to the (empty) cgroup back: page cache of files the tree
/// read, mostly. v1 `memory.force_empty`, v2 `memory.reclaim`.
fn reclaim(paths: &CgroupPaths) {
    if paths.uses_v1() {
        if let Some(dir) = paths.v1("memory") {
            if let Err(e) = std::fs::write(dir.join("memory.force_empty"), "0") {
                warn!(cgroup = %dir.display(), "memory.force_empty: {e}");
            }
            return;
        }
    }
    if let Some(dir) = &paths.unified {
        let usage = memory_usage(paths);
        if usage > 0 {
            let _ = std::fs::write(dir.join("memory.reclaim"), usage.to_string());
        }
    }
}

/// Waits until the container's cgroup holds no process.
async fn wait_empty(paths: &CgroupPaths, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if paths.procs().map(|p| p.is_empty()).unwrap_or(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
