//! criu-rpc's [`ChildSpawner`] on top of the shim's reaper.
//!
//! Every child of the shim is reaped by the containerd-shim crate's global SIGCHLD
//! handler, which publishes exits to the [`ExitWatcher`]. CRIU (`criu swrk`) is spawned
//! with `std::process` (never waited for here) and its pid registered right after
//! spawning; an exit that arrives before the registration is kept by the watcher's
//! early-exit buffer, so none is lost.
//!
//! A restore needs CRIU inside the container's cgroups before it forks the tree. The
//! optional `after_spawn` hook moves the new pid there, and it runs beside CRIU rather
//! than before it: the spawn starts the hook on a blocking thread and returns at once, so
//! criu-rpc sends the request while the move is under way, and [`JoinBeforeFork`] holds
//! CRIU at its `pre-restore` notification (CRIU's last step before it forks the root task)
//! until the move is done. If the hook fails, CRIU is killed and the restore fails with the
//! hook's error; the tree is never forked outside the container's cgroups.
//!
//! Why in parallel: the move is most of CRIU's start on a wake. The first write to a
//! `cgroup.procs` takes the kernel's cgroup threadgroup lock for writing, which waits for
//! an RCU grace period (about 13 ms on an idle 2-CPU VM; the writes to the other
//! hierarchies right after it do not wait again). CRIU spends that time starting, reading
//! the images and preparing what the tasks share, so only the rest of the grace period
//! stays on the wake's path. A cgroup2 hierarchy mounted with `favordynmods` keeps the lock
//! ready for writers and the move takes well under a millisecond. Both times are kept:
//! [`ShimSpawner::hook_time`] (the move) and [`JoinBeforeFork::waited`] (how long CRIU
//! waited for it).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criu_rpc::{BoxError, ChildExit, ChildSpawner, Notify, NotifyHandler, SpawnedChild};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::task::JoinHandle;

use crate::exits::ExitWatcher;

/// A hook run with the pid of a freshly spawned CRIU, on a blocking thread.
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
    hook_time: Arc<Mutex<Duration>>,
    /// The hook started by the last spawn, until somebody waits for it.
    pending: Arc<Mutex<Option<JoinHandle<std::io::Result<()>>>>>,
}

impl ShimSpawner {
    pub fn new(exits: ExitWatcher) -> ShimSpawner {
        ShimSpawner {
            exits,
            after_spawn: None,
            spawned: Arc::default(),
            hook_time: Arc::default(),
            pending: Arc::default(),
        }
    }

    /// The time the `after_spawn` hook took, over every spawn so far (`None` without a
    /// hook).
    pub fn hook_time(&self) -> Option<Duration> {
        self.after_spawn
            .as_ref()
            .map(|_| *self.hook_time.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Starts `hook` with CRIU's pid right after each spawn, beside CRIU (see the module
    /// docs: a restore must wait for it with [`hook_done`](Self::hook_done), through
    /// [`JoinBeforeFork`]).
    pub fn after_spawn(mut self, hook: AfterSpawn) -> ShimSpawner {
        self.after_spawn = Some(hook);
        self
    }

    /// Waits for the hook started by the last spawn, if it still runs, and gives its
    /// result (`Ok` when there is none, or when it was waited for already).
    pub async fn hook_done(&self) -> std::io::Result<()> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match pending {
            None => Ok(()),
            Some(handle) => handle.await.map_err(std::io::Error::other)?,
        }
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
        if let Some(hook) = self.after_spawn.clone() {
            let hook_time = self.hook_time.clone();
            let handle = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let joined = hook(pid);
                *hook_time.lock().unwrap_or_else(|p| p.into_inner()) += started.elapsed();
                if joined.is_err() {
                    // Still our unreaped child: the pid cannot have been reused.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                joined
            });
            *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
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

/// A notification handler that holds CRIU at `pre-restore` until the spawner's hook (the
/// move into the container's cgroups) is done, then hands every notification to `inner`.
pub struct JoinBeforeFork<'a, H> {
    spawner: &'a ShimSpawner,
    inner: &'a mut H,
    waited: Duration,
}

impl<'a, H> JoinBeforeFork<'a, H> {
    pub fn new(spawner: &'a ShimSpawner, inner: &'a mut H) -> Self {
        JoinBeforeFork {
            spawner,
            inner,
            waited: Duration::ZERO,
        }
    }

    /// How long CRIU waited at `pre-restore` for the hook.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

/// The hook failed: CRIU is not in the container's cgroups, and must not fork the tree.
#[derive(Debug, thiserror::Error)]
#[error("move CRIU into the container's cgroups: {0}")]
pub struct JoinError(#[source] pub std::io::Error);

#[async_trait]
impl<H: NotifyHandler> NotifyHandler for JoinBeforeFork<'_, H> {
    type Error = BoxError;

    async fn on_notify(&mut self, notify: Notify<'_>) -> Result<(), BoxError> {
        if matches!(notify, Notify::PreRestore) {
            let started = Instant::now();
            let joined = self.spawner.hook_done().await;
            self.waited += started.elapsed();
            joined.map_err(|e| Box::new(JoinError(e)) as BoxError)?;
        }
        self.inner.on_notify(notify).await.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches it.
    #[derive(Default)]
    struct Seen(Vec<String>);

    #[async_trait]
    impl NotifyHandler for Seen {
        type Error = std::io::Error;

        async fn on_notify(&mut self, n: Notify<'_>) -> Result<(), std::io::Error> {
            self.0.push(n.script().to_owned());
            Ok(())
        }
    }

    fn state_of(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 1..].trim_start().chars().next()
    }

    /// A hook that blocks until the test lets it go, then answers `result`.
    fn gated_hook(result: std::io::Result<()>) -> (AfterSpawn, std::sync::mpsc::Sender<()>) {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let result = Mutex::new(Some(result));
        let hook: AfterSpawn = Arc::new(move |_pid| {
            let _ = wait.lock().unwrap().recv();
            result.lock().unwrap().take().unwrap_or(Ok(()))
        });
        (hook, go)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hook_runs_beside_the_child_and_pre_restore_waits_for_it() {
        let exits = ExitWatcher::start().await.expect("exit watcher");
        let (hook, go) = gated_hook(Ok(()));
        let spawner = ShimSpawner::new(exits).after_spawn(hook);
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // The hook is blocked: a spawn that waited for it would never return.
        let child = tokio::time::timeout(Duration::from_secs(10), spawner.spawn(cmd))
            .await
            .expect("the spawn does not wait for the hook")
            .expect("spawn");

        let mut seen = Seen::default();
        let mut gate = JoinBeforeFork::new(&spawner, &mut seen);
        gate.on_notify(Notify::NetworkLock)
            .await
            .expect("other notifications pass");
        {
            let pre_restore = gate.on_notify(Notify::PreRestore);
            tokio::pin!(pre_restore);
            assert!(
                tokio::time::timeout(Duration::from_millis(200), &mut pre_restore)
                    .await
                    .is_err(),
                "pre-restore went on while the hook still ran"
            );
            go.send(()).expect("release the hook");
            pre_restore.await.expect("pre-restore after the hook");
        }
        assert!(gate.waited() > Duration::ZERO);
        assert_eq!(seen.0, ["network-lock", "pre-restore"]);
        assert!(spawner.hook_time().is_some());
        assert!(spawner.hook_done().await.is_ok(), "waited for once only");
        let _ = kill(Pid::from_raw(child.pid), Signal::SIGKILL);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_hook_kills_the_child_and_refuses_pre_restore() {
        let exits = ExitWatcher::start().await.expect("exit watcher");
        let (hook, go) = gated_hook(Err(std::io::Error::other("no such cgroup")));
        let spawner = ShimSpawner::new(exits).after_spawn(hook);
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        let child = spawner.spawn(cmd).await.expect("spawn");
        go.send(()).expect("release the hook");

        let mut seen = Seen::default();
        let mut gate = JoinBeforeFork::new(&spawner, &mut seen);
        let err = gate
            .on_notify(Notify::PreRestore)
            .await
            .expect_err("a failed move refuses pre-restore");
        assert!(
            err.to_string().contains("cgroups") && format!("{err:?}").contains("no such cgroup"),
            "{err:?}"
        );
        assert!(seen.0.is_empty(), "the inner handler never saw pre-restore");
        // Nothing reaps in a unit test: the killed child stays a zombie.
        let mut state = state_of(child.pid);
        for _ in 0..100 {
            if state == Some('Z') {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            state = state_of(child.pid);
        }
        assert_eq!(state, Some('Z'), "the child was killed");
    }
}
