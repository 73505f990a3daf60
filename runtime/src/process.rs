//! One process of a container (its init or an exec) and its state machine.
//!
//! The states and the refusals mirror the stock runc shim's, word for word where a user
//! can see them, because containerd and its users react to those messages and codes.

use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::io::{ProcessIo, StdioConfig};

/// Lifecycle state of a process, as containerd's task API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal number for a signalled process.
    pub status: u32,
    pub at: SystemTime,
}

/// A process the shim tracks.
pub struct Process {
    /// Exec id; empty for the container's init.
    pub exec_id: String,
    pub stdio: StdioConfig,
    inner: Mutex<Inner>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    pub(crate) io: tokio::sync::Mutex<Option<ProcessIo>>,
    /// Held while the process is being started and its start reported, and taken before
    /// its exit is reported: a process that dies at once is still reported as started
    /// first, as containerd expects.
    pub(crate) start_gate: tokio::sync::Mutex<()>,
}

struct Inner {
    pid: i32,
    status: Status,
    exit: Option<ExitInfo>,
}

/// A snapshot of a process for State requests.
#[derive(Debug, Clone)]
pub struct ProcessState {
    pub exec_id: String,
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioConfig,
    pub exit: Option<ExitInfo>,
}

impl Process {
    pub(crate) fn new(exec_id: &str, stdio: StdioConfig) -> Process {
        let (exit_tx, _) = watch::channel(None);
        Process {
            exec_id: exec_id.to_string(),
            stdio,
            inner: Mutex::new(Inner {
                pid: 0,
                status: Status::Created,
                exit: None,
            }),
            exit_tx,
            io: tokio::sync::Mutex::new(None),
            start_gate: tokio::sync::Mutex::new(()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pid(&self) -> i32 {
        self.inner().pid
    }

    pub fn status(&self) -> Status {
        self.inner().status
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        self.inner().exit
    }

    pub fn state(&self) -> ProcessState {
        let i = self.inner();
        ProcessState {
            exec_id: self.exec_id.clone(),
            pid: i.pid.max(0) as u32,
            status: i.status,
            stdio: self.stdio.clone(),
            exit: i.exit,
        }
    }

    pub(crate) fn set_pid(&self, pid: i32) {
        self.inner().pid = pid;
    }

    pub(crate) fn set_status(&self, status: Status) {
        let mut i = self.inner();
        if i.status != Status::Stopped {
            i.status = status;
        }
    }

    /// Records the exit and wakes every waiter.
    pub(crate) fn set_exited(&self, status: u32) -> ExitInfo {
        let info = ExitInfo {
            status,
            at: SystemTime::now(),
        };
        {
            let mut i = self.inner();
            i.status = Status::Stopped;
            i.exit = Some(info);
        }
        self.exit_tx.send_replace(Some(info));
        info
    }

    /// Waits until the process has exited.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`; this cannot happen while we borrow it.
                return ExitInfo {
                    status: 255,
                    at: SystemTime::now(),
                };
            }
        }
    }

    /// Checks that the process may be started, with the stock shim's wording.
    pub(crate) fn check_start(&self) -> Result<()> {
        match self.status() {
            Status::Created => Ok(()),
            Status::Running => Err(Error::State("cannot start a running process".into())),
            Status::Paused => Err(Error::State("cannot start a paused process".into())),
            Status::Stopped => Err(Error::State("cannot start a stopped process".into())),
        }
    }

    /// Checks that a signal can still be delivered.
    pub(crate) fn check_kill(&self) -> Result<()> {
        match self.status() {
            Status::Stopped => Err(Error::NotFound("process already finished".into())),
            _ if self.pid() <= 0 => Err(Error::FailedPrecondition("process not created".into())),
            _ => Ok(()),
        }
    }
}
