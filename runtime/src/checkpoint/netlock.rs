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
//! the transaction fails as a whole and changes nothing. If it fails, the jumps are
//! removed one at a time (a lock CRIU took again over one nobody removed stacks a second
//! jump, which the transaction cannot undo). (CRIU's nftables lock is a table
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

/// At most this many stacked jumps into CRIU's chain are removed one by one.
const MAX_JUMPS: usize = 32;

/// The rules that remove CRIU's lock (the inverse of what CRIU adds).
const UNLOCK_RULES: &str =
    "*filter\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-F CRIU\n-X CRIU\nCOMMIT\n";

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
            for (restore, single) in [
                ("iptables-restore", "iptables"),
                ("ip6tables-restore", "ip6tables"),
            ] {
                let mut cmd = Command::new(restore);
                cmd.args(["-w", "--noflush"]);
                if run_in(exits, netns, cmd, Some(UNLOCK_RULES)).await == Some(0) {
                    warn!(
                        program = restore,
                        "removed a network lock a failed CRIU left behind"
                    );
                    continue;
                }
                // No lock, or more than one jump into CRIU's chain (a lock taken again
                // over one nobody removed): take the jumps out one by one.
                for chain in ["INPUT", "OUTPUT"] {
                    for _ in 0..MAX_JUMPS {
                        let mut cmd = Command::new(single);
                        cmd.args(["-w", "-D", chain, "-j", "CRIU"]);
                        if run_in(exits, netns, cmd, None).await != Some(0) {
                            break;
                        }
                    }
                }
                for args in [["-w", "-F", "CRIU"], ["-w", "-X", "CRIU"]] {
                    let mut cmd = Command::new(single);
                    cmd.args(args);
                    run_in(exits, netns, cmd, None).await;
                }
            }
        }
    }
}

/// Runs `cmd` in the network namespace `netns`, feeding it `input`; waits for it through
/// the shim's reaper and returns its exit code (`None` if it could not run or did not
/// finish in time).
async fn run_in(
    exits: &ExitWatcher,
    netns: &File,
    mut cmd: Command,
    input: Option<&str>,
) -> Option<i32> {
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
            return None;
        }
    };
    let pid = i32::try_from(child.id()).ok()?;
    let exited = exits.register(pid);
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        if let Err(e) = stdin.write_all(text.as_bytes()) {
            debug!(program, "write rules: {e}");
        }
    }
    // The reaper owns the exit; the handle neither waits nor kills on drop.
    drop(child);
    match tokio::time::timeout(UNLOCK_TIMEOUT, exited).await {
        Ok(Ok(code)) => {
            debug!(program, code, "network unlock step");
            Some(code)
        }
        _ => {
            warn!(program, "removing CRIU's network lock did not finish");
            None
        }
    }
}
