//! criu-rpc's [`ChildSpawner`] on top of the shim's reaper.
//!
//! Every child of the shim is reaped by the containerd-shim crate's global SIGCHLD
//! handler, which publishes exits to the [`ExitWatcher`]. CRIU (`criu swrk`) is spawned
//! with `std::process` (never waited for here) and its pid registered right after
//! spawning; an exit that arrives before the registration is kept by the watcher's
//! early-exit buffer, so none is lost.
//!
//! A restore needs CRIU inside the container's cgroups before it forks the tree: the
//! optional `after_spawn` hook runs right after the spawn, before criu-rpc sends CRIU its
//! request (CRIU waits for it), and moves the new pid there. If the hook fails, CRIU is
//! killed and the spawn fails.
//!
//! That move is most of CRIU's start on a wake: the first write to a `cgroup.procs` takes
//! the kernel's cgroup threadgroup lock for writing, which waits for an RCU grace period
//! (about 13 ms on an idle 2-CPU VM; the writes to the other hierarchies right after it do
//! not wait again). A cgroup2 hierarchy mounted with `favordynmods` keeps that lock ready
//! for writers and the move takes well under a millisecond. The time is kept
//! ([`ShimSpawner::hook_time`]) so that the restore can report it.

use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use criu_rpc::{ChildExit, ChildSpawner, SpawnedChild};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::exits::ExitWatcher;

/// A hook run with the pid of a freshly spawned CRIU.
pub type AfterSpawn = Arc<dyn Fn(i32) -> std::io::Result<()> + Send + Sync>;

/// Spawns CRIU as a child of the shim and reports its exit through the [`ExitWatcher`].
#[derive(Clone)]
pub struct ShimSpawner {
    exits: ExitWatcher,
    after_spawn: Option<AfterSpawn>,
    /// Every CRIU started through this spawner, so that a request that runs too long can
    /// be ended.
    spawned: Arc<Mutex<Vec<i32>>>,
    /// Time spent in `after_spawn`, over every spawn.
    hook_time: Arc<Mutex<std::time::Duration>>,
}

impl ShimSpawner {
    pub fn new(exits: ExitWatcher) -> ShimSpawner {
        ShimSpawner {
            exits,
            after_spawn: None,
            spawned: Arc::default(),
            hook_time: Arc::default(),
        }
    }

    /// The time the `after_spawn` hook took, over every spawn so far (`None` without a
    /// hook).
    pub fn hook_time(&self) -> Option<std::time::Duration> {
        self.after_spawn
            .as_ref()
            .map(|_| *self.hook_time.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `hook` with CRIU's pid right after each spawn.
    pub fn after_spawn(mut self, hook: AfterSpawn) -> ShimSpawner {
        self.after_spawn = Some(hook);
        self
    }

    /// SIGKILLs every CRIU this spawner started that still runs as our child (a pid is
    /// only signalled while `/proc` shows it as our child: an exited CRIU's pid may have
    /// been reused).
    pub fn kill_all(&self) {
        let me = std::process::id() as i32;
        let pids = self
            .spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for pid in pids.into_iter().filter(|p| parent_of(*p) == Some(me)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

impl fmt::Debug for ShimSpawner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShimSpawner")
            .field("after_spawn", &self.after_spawn.is_some())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ChildSpawner for ShimSpawner {
    async fn spawn(&self, mut cmd: std::process::Command) -> std::io::Result<SpawnedChild> {
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
        // The reaper owns the exit status: never wait on the handle. Dropping a
        // `std::process::Child` neither waits nor kills.
        drop(child);
        let exit_rx = self.exits.register(pid);
        self.spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pid);
        if let Some(hook) = &self.after_spawn {
            let started = std::time::Instant::now();
            let joined = hook(pid);
            *self.hook_time.lock().unwrap_or_else(|p| p.into_inner()) += started.elapsed();
            if let Err(e) = joined {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(e);
            }
        }
        let exit = Box::pin(async move {
            exit_rx
                .await
                .map(ChildExit::from_shell_code)
                .map_err(|_| std::io::Error::other("the shim's exit monitor closed"))
        });
        Ok(SpawnedChild { pid, exit })
    }
}
