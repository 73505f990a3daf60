//! Pluggable process spawning and reaping for the `criu swrk` child.
//!
//! criu-rpc never calls `waitpid` itself. It hands a fully prepared
//! [`std::process::Command`] to a [`ChildSpawner`] and awaits the exit future the
//! spawner returns. [`TokioSpawner`] (the default) uses `tokio::process`, which waits for
//! that one pid. A containerd shim must not use it: the `containerd-shim` crate reaps
//! every child with `waitpid(-1)` and publishes exits on its monitor, so tokio would lose
//! the race (ECHILD). Such a program implements the trait on top of its own reaper:
//!
//! ```ignore
//! struct MonitorSpawner;
//!
//! #[async_trait::async_trait]
//! impl criu_rpc::ChildSpawner for MonitorSpawner {
//!     async fn spawn(&self, mut cmd: std::process::Command) -> std::io::Result<criu_rpc::SpawnedChild> {
//!         use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
//!         use containerd_shim::monitor::{Subject, Topic};
//!         // 1. Subscribe BEFORE spawning, so an immediate exit cannot be missed.
//!         let mut sub = monitor_subscribe(Topic::Pid).await.map_err(std::io::Error::other)?;
//!         // 2. Spawn exactly the Command we were given (it carries pre_exec hooks that
//!         //    place the inherited descriptors): no changes to stdio or fds.
//!         let child = match cmd.spawn() {
//!             Ok(c) => c,
//!             Err(e) => { let _ = monitor_unsubscribe(sub.id).await; return Err(e); }
//!         };
//!         let pid = child.id() as i32;
//!         // Never call child.wait(): the shim's reaper owns the exit status.
//!         std::mem::forget(child);
//!         // 3. Resolve with the exit of *this* pid, filtering the global stream.
//!         let exit = Box::pin(async move {
//!             while let Some(e) = sub.rx.recv().await {
//!                 if let Subject::Pid(p) = e.subject { if p == pid {
//!                     let _ = monitor_unsubscribe(sub.id).await;
//!                     return Ok(criu_rpc::ChildExit::from_shell_code(e.exit_code));
//!                 } }
//!             }
//!             Err(std::io::Error::other("shim monitor closed"))
//!         });
//!         Ok(criu_rpc::SpawnedChild { pid, exit })
//!     }
//! }
//! ```
//!
//! (`std::process::Child` has no `Drop` that waits, so forgetting it only leaks its
//! closed pipe handles, of which a `Stdio::null`/inherit child has none.)

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::ExitStatus;

use async_trait::async_trait;

/// How a child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ChildExit {
    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == ChildExit::Code(0)
    }

    /// Builds a `ChildExit` from a shell-style code as reapers such as containerd-shim's
    /// report them: codes above 128 mean "killed by signal (code - 128)".
    pub fn from_shell_code(code: i32) -> Self {
        if code > 128 && code < 128 + 65 {
            ChildExit::Signal(code - 128)
        } else {
            ChildExit::Code(code)
        }
    }

    /// Builds a `ChildExit` from a raw `wait(2)` status.
    pub fn from_wait_status(status: i32) -> Self {
        ExitStatus::from_raw(status).into()
    }
}

impl From<ExitStatus> for ChildExit {
    fn from(s: ExitStatus) -> Self {
        match (s.code(), s.signal()) {
            (Some(c), _) => ChildExit::Code(c),
            (None, Some(sig)) => ChildExit::Signal(sig),
            // Stopped/continued statuses are not exits; report the raw value.
            (None, None) => ChildExit::Code(s.into_raw()),
        }
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildExit::Code(c) => write!(f, "exited with code {c}"),
            ChildExit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Resolves once the child has been reaped.
pub type ExitFuture = Pin<Box<dyn Future<Output = io::Result<ChildExit>> + Send + 'static>>;

/// A child started by a [`ChildSpawner`].
pub struct SpawnedChild {
    /// Its pid (in this process's pid namespace).
    pub pid: i32,
    /// Resolves with its exit once it has been reaped. Dropping it must be harmless: the
    /// child is still reaped by whoever owns reaping.
    pub exit: ExitFuture,
}

impl fmt::Debug for SpawnedChild {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnedChild")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// Starts CRIU and reports its exit.
///
/// Contract:
/// - spawn `cmd` as given: it carries `pre_exec` hooks that move the inherited
///   descriptors to their fixed numbers and mark every other descriptor close-on-exec;
///   do not change its stdio, descriptors or program;
/// - be ready to observe the child's exit before it can happen (subscribe to the reaper
///   first), so a CRIU that dies at once is still reported;
/// - return the child's pid and a future resolving to its exit status after it has been
///   reaped; the future may be dropped unpolled;
/// - never block the async runtime for long (fork/exec is fine).
#[async_trait]
pub trait ChildSpawner: Send + Sync + fmt::Debug {
    /// Spawns `cmd`; see the trait docs for the contract.
    async fn spawn(&self, cmd: std::process::Command) -> io::Result<SpawnedChild>;
}

/// The default spawner: `tokio::process`, which reaps exactly the pid it started.
///
/// Use it in standalone programs and tests, never under a global `waitpid(-1)` reaper.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioSpawner;

#[async_trait]
impl ChildSpawner for TokioSpawner {
    async fn spawn(&self, cmd: std::process::Command) -> io::Result<SpawnedChild> {
        let mut child = tokio::process::Command::from(cmd).spawn()?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| io::Error::other("spawned child has no pid"))?;
        let exit = Box::pin(async move { child.wait().await.map(ChildExit::from) });
        Ok(SpawnedChild { pid, exit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes() {
        assert_eq!(ChildExit::from_shell_code(0), ChildExit::Code(0));
        assert_eq!(ChildExit::from_shell_code(1), ChildExit::Code(1));
        assert_eq!(ChildExit::from_shell_code(137), ChildExit::Signal(9));
        assert_eq!(ChildExit::from_wait_status(9), ChildExit::Signal(9));
        assert_eq!(ChildExit::from_wait_status(3 << 8), ChildExit::Code(3));
        assert!(ChildExit::Code(0).success());
    }

    #[tokio::test]
    async fn tokio_spawner_reports_exit() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "exit 7"]);
        let child = TokioSpawner.spawn(cmd).await.expect("spawn sh");
        assert!(child.pid > 0);
        assert_eq!(child.exit.await.expect("wait"), ChildExit::Code(7));
    }
}
