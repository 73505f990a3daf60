//! Exit tracking on top of the shim crate's reaper.
//!
//! The `containerd-shim` crate installs a SIGCHLD handler that `waitpid(-1)`s every child
//! of the shim (the shim is a child subreaper, so container inits and exec processes
//! reparent to it) and publishes each exit on its monitor. Nothing in this process may
//! call `waitpid` itself: it would race that reaper. [`ExitWatcher`] subscribes once and
//! routes exits to whoever registered the pid. An exit that arrives before its pid is
//! registered (a process that dies right after the helper reported it) is kept for a
//! while so the late registration still sees it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::monitor::monitor_subscribe;
use containerd_shim::monitor::{Subject, Topic};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// How long an exit of an unregistered pid is remembered.
const EARLY_EXIT_TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<i32>>,
    early: HashMap<i32, (i32, Instant)>,
}

/// Routes the reaper's exit events to per-pid waiters.
#[derive(Clone)]
pub struct ExitWatcher {
    table: Arc<Mutex<Table>>,
}

impl ExitWatcher {
    /// Subscribes to the shim's exit monitor and starts routing. Call once, before any
    /// child is spawned.
    pub async fn start() -> Result<Self> {
        let mut sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| Error::Other(format!("subscribe to exit monitor: {e}")))?;
        let watcher = ExitWatcher {
            table: Arc::default(),
        };
        let table = watcher.table.clone();
        tokio::spawn(async move {
            while let Some(ev) = sub.rx.recv().await {
                let Subject::Pid(pid) = ev.subject else {
                    continue;
                };
                let mut t = lock(&table);
                match t.waiting.remove(&pid) {
                    Some(tx) => {
                        let _ = tx.send(ev.exit_code);
                    }
                    None => {
                        let now = Instant::now();
                        t.early
                            .retain(|_, (_, at)| now.duration_since(*at) < EARLY_EXIT_TTL);
                        t.early.insert(pid, (ev.exit_code, now));
                    }
                }
            }
        });
        Ok(watcher)
    }

    /// Registers interest in `pid`'s exit. The receiver resolves with the exit status
    /// (128 + signal for a signalled process), also when the exit happened already.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<i32> {
        let (tx, rx) = oneshot::channel();
        let mut t = lock(&self.table);
        match t.early.remove(&pid) {
            Some((code, _)) => {
                let _ = tx.send(code);
            }
            None => {
                t.waiting.insert(pid, tx);
            }
        }
        rx
    }
}

fn lock(t: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    // A poisoned table only means a panic elsewhere; the data is still consistent.
    t.lock().unwrap_or_else(|p| p.into_inner())
}
