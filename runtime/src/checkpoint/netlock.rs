//! Undoing CRIU's network lock when CRIU does not get to undo it.
//!
//! With its default `iptables` method, CRIU locks the network namespace of the tree by
//! adding a `CRIU` chain that drops everything but its own marked packets (INPUT and
//! OUTPUT, IPv4 and IPv6), and removes it when the dump (with the tree left running) or
//! the restore is over. A CRIU that dies in between (killed, out of memory) leaves the
//! chain behind, and the container, still running, is cut off. So dumps and restores run
//! with notifications: [`LockWatch`] notes the `network-lock` point, and after a failure
//! [`unlock`] removes CRIU's chain from the namespace. The removal is one
//! `iptables-restore --noflush` transaction per family: if CRIU had removed it already,
//! the transaction fails as a whole and changes nothing. (CRIU's nftables lock is a table
//! named after CRIU's run id, which CRIU does not report; it is not removed here.)

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use criu_rpc::{Notify, NotifyHandler};
use tracing::{debug, warn};

use super::NetworkLock;
use crate::exits::ExitWatcher;

/// How long one iptables-restore may take.
const UNLOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The rules that remove CRIU's lock (the inverse of what CRIU adds).
const UNLOCK_RULES: &str = "*filter\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-F CRIU\n-X CRIU\nCOMMIT\n";

/// Notes CRIU's network-lock notifications; keeps a pty master CRIU hands over.
#[derive(Debug, Default)]
pub struct LockWatch {
    /// CRIU reached its network-lock point (the lock may be in place).
    pub locked: bool,
    /// The master of an orphaned pty (restore of a terminal).
    pub pts_master: Option<OwnedFd>,
}

#[async_trait]
impl NotifyHandler for LockWatch {
    type Error = std::convert::Infallible;

    async fn on_notify(&mut self, notify: Notify<'_>) -> Result<(), Self::Error> {
        match notify {
            Notify::NetworkLock => self.locked = true,
            Notify::OrphanPtsMaster { fd } => self.pts_master = Some(fd),
            _ => {}
        }
        Ok(())
    }
}

/// Removes a network lock CRIU may have left in the namespace `netns` (an open
/// namespace file). Best effort: problems are logged.
pub async fn unlock(exits: &ExitWatcher, netns: &File, method: NetworkLock) {
    match method {
        NetworkLock::Skip => {}
        NetworkLock::Nftables => {
            // CRIU names its nftables table after its run id, which it does not report.
            warn!("a failed CRIU may have left its nftables lock (table inet CRIU-<run id>) in the container's network namespace");
        }
        NetworkLock::Iptables => {
            for program in ["iptables-restore", "ip6tables-restore"] {
                let mut cmd = Command::new(program);
                cmd.args(["-w", "--noflush"]);
                run_in(exits, netns, cmd, Some(UNLOCK_RULES)).await;
            }
        }
    }
}

/// Runs `cmd` in the network namespace `netns`, feeding it `input`; waits for it through
/// the shim's reaper.
async fn run_in(exits: &ExitWatcher, netns: &File, mut cmd: Command, input: Option<&str>) {
    let fd = netns.as_raw_fd();
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: the hook runs between fork and exec and only calls setns(2), which is
    // async-signal-safe; `fd` stays open in the parent until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!(program, "cannot remove CRIU's network lock: {e}");
            return;
        }
    };
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    let exited = exits.register(pid);
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        if let Err(e) = stdin.write_all(text.as_bytes()) {
            debug!(program, "write rules: {e}");
        }
    }
    // The reaper owns the exit; the handle neither waits nor kills on drop.
    drop(child);
    match tokio::time::timeout(UNLOCK_TIMEOUT, exited).await {
        Ok(Ok(0)) => warn!(program, "removed a network lock a failed CRIU left behind"),
        Ok(Ok(code)) => debug!(program, code, "no CRIU network lock to remove"),
        _ => warn!(program, "removing CRIU's network lock did not finish"),
    }
}
