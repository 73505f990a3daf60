//! Holding a container's network still while CRIU dumps it, and letting it go again.
//!
//! While CRIU dumps a tree with sockets, packets must not reach them (a connection
//! accepted into a listen queue mid-dump would be lost; an established one would see
//! its peer's data acknowledged by nobody). CRIU locks the network namespace for that
//! at its `network-lock` point and unlocks it at `network-unlock`, and it notifies its
//! caller at both points.
//!
//! # The runtime's lock ([`NetworkLock::Runtime`], the default)
//!
//! CRIU is told to skip locking and [`LockWatch`] does it on those notifications: a
//! `RUNC-ARCHITECT` chain in the container's namespace that accepts CRIU's own marked
//! packets and drops the rest, jumped to first from INPUT and OUTPUT, for IPv4 and IPv6
//! (the rules CRIU's iptables method adds, under our own name). Why not leave it to CRIU:
//!
//! - CRIU records its lock method in the images and, at restore, always runs its unlock
//!   (five `iptables` processes, about 20 ms here), even when the restore goes into a
//!   namespace that was never locked: a fresh pod, or the same one after a dump that
//!   left the tree running. The runtime knows better: a dump that ends with the tree
//!   killed (`exit`) leaves its lock in place for the restore to lift, exactly as CRIU
//!   does, and records which namespace it left locked
//!   ([`meta::DumpRecord::locked_netns`](super::meta::DumpRecord)). A restore lifts it
//!   only in that namespace; otherwise it costs nothing.
//! - The lock is ours to remove when CRIU dies with it in place (killed, out of memory),
//!   whatever method CRIU would have used. CRIU's nftables table is named after its run
//!   id, which it does not report, so a failed CRIU's nftables lock cannot be found.
//! - Hibernation will hold packets (queue them for the wake-up) instead of dropping
//!   them, at the same two points.
//!
//! # CRIU's own lock ([`NetworkLock::Iptables`], `Nftables`)
//!
//! Used for checkpoints that recorded it (runc's, older ones of ours). When CRIU dies
//! with its iptables lock in place, [`LockWatch::release`] removes CRIU's `CRIU` chain.
//!
//! Every change is one `iptables-restore --noflush` transaction per family, run in the
//! container's namespace: if it does not apply (the lock is gone already), nothing
//! changes. When removing a lock that has more than one jump (a lock taken again over
//! one nobody removed), the jumps are taken out one at a time.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use criu_rpc::{Notify, NotifyHandler};
use tracing::{debug, info, warn};

use super::NetworkLock;
use crate::exits::ExitWatcher;

/// How long one iptables command may take.
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many stacked jumps into a lock chain are removed one by one.
const MAX_JUMPS: usize = 32;

/// The chain of the runtime's own lock.
pub const RUNTIME_CHAIN: &str = "RUNC-ARCHITECT";

/// The chain of CRIU's iptables lock.
const CRIU_CHAIN: &str = "CRIU";

/// The mark CRIU puts on its own packets (TCP repair), which a lock must let through
/// (CRIU's `SOCCR_MARK`).
const CRIU_PACKET_MARK: &str = "0xC114";

/// The iptables-restore programs, IPv4 then IPv6, with the matching single-rule tool.
const FAMILIES: [(&str, &str); 2] = [
    ("iptables-restore", "iptables"),
    ("ip6tables-restore", "ip6tables"),
];

/// Rules that put a lock in place under `chain`.
fn lock_rules(chain: &str) -> String {
    format!(
        "*filter\n:{chain} - [0:0]\n-I INPUT -j {chain}\n-I OUTPUT -j {chain}\n\
         -A {chain} -m mark --mark {CRIU_PACKET_MARK} -j ACCEPT\n-A {chain} -j DROP\nCOMMIT\n"
    )
}

/// Rules that remove the lock under `chain` (the inverse of [`lock_rules`]).
fn unlock_rules(chain: &str) -> String {
    format!("*filter\n-D INPUT -j {chain}\n-D OUTPUT -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n")
}

/// Whether the host has IPv6 (else ip6tables has nothing to lock).
fn has_ipv6() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// A network lock could not be put in place.
#[derive(Debug, thiserror::Error)]
#[error("lock the container's network: {program} failed ({detail})")]
pub struct LockError {
    program: &'static str,
    detail: String,
}

/// Follows CRIU's network-lock and -unlock notifications for one dump or restore: takes
/// and lifts the runtime's lock, notes CRIU's, keeps a pty master CRIU hands over.
pub struct LockWatch {
    method: NetworkLock,
    /// The container's network namespace (`None`: nothing to lock, the host's).
    netns: Option<File>,
    exits: ExitWatcher,
    /// The runtime's lock is in place in `netns` (taken by this dump, or left by the
    /// dump a restore comes from).
    held: bool,
    /// CRIU reached its network-lock point (its own lock may be in place).
    pub criu_locked: bool,
    /// The master of an orphaned pty (restore of a terminal).
    pub pts_master: Option<OwnedFd>,
}

impl LockWatch {
    /// A watch for a request locking with `method` in `netns`.
    pub fn new(exits: ExitWatcher, method: NetworkLock, netns: Option<File>) -> Self {
        LockWatch {
            method,
            netns,
            exits,
            held: false,
            criu_locked: false,
            pts_master: None,
        }
    }

    /// For a restore: the dump left the runtime's lock in place in this namespace, to be
    /// lifted at CRIU's network-unlock point (or by [`release`](Self::release)).
    pub fn inherit_lock(mut self) -> Self {
        self.held = self.method == NetworkLock::Runtime && self.netns.is_some();
        self
    }

    /// Whether the runtime's lock is in place now (after a dump: it was left for the
    /// restore).
    pub fn holds_lock(&self) -> bool {
        self.held
    }

    /// After a failed dump or restore: removes whatever lock is left in the namespace,
    /// ours or CRIU's. Best effort: problems are logged.
    pub async fn release(&mut self) {
        let Some(ns) = &self.netns else { return };
        match self.method {
            NetworkLock::Runtime if self.held => {
                remove_chain(&self.exits, ns, RUNTIME_CHAIN).await;
                self.held = false;
            }
            NetworkLock::Iptables if self.criu_locked => {
                remove_chain(&self.exits, ns, CRIU_CHAIN).await;
            }
            NetworkLock::Nftables if self.criu_locked => {
                warn!("a failed CRIU may have left its nftables lock (table inet CRIU-<run id>) in the container's network namespace");
            }
            _ => {}
        }
    }
}

#[async_trait]
impl NotifyHandler for LockWatch {
    type Error = LockError;

    async fn on_notify(&mut self, notify: Notify<'_>) -> Result<(), LockError> {
        match notify {
            Notify::NetworkLock => {
                self.criu_locked = true;
                if let (NetworkLock::Runtime, Some(ns)) = (self.method, &self.netns) {
                    take_lock(&self.exits, ns).await?;
                    self.held = true;
                }
            }
            Notify::NetworkUnlock => {
                if let (NetworkLock::Runtime, true, Some(ns)) =
                    (self.method, self.held, &self.netns)
                {
                    remove_chain(&self.exits, ns, RUNTIME_CHAIN).await;
                    self.held = false;
                }
            }
            Notify::OrphanPtsMaster { fd } => self.pts_master = Some(fd),
            _ => {}
        }
        Ok(())
    }
}

/// Puts the runtime's lock in place in `netns`.
async fn take_lock(exits: &ExitWatcher, netns: &File) -> Result<(), LockError> {
    let rules = lock_rules(RUNTIME_CHAIN);
    let families = if has_ipv6() {
        &FAMILIES[..]
    } else {
        &FAMILIES[..1]
    };
    for (i, (restore, _)) in families.iter().enumerate() {
        let mut cmd = Command::new(restore);
        cmd.args(["-w", "--noflush"]);
        match run_in(exits, netns, cmd, Some(&rules)).await {
            Ok(0) => {}
            result => {
                // Leave nothing half-locked behind.
                for (undo, _) in &families[..i] {
                    let mut cmd = Command::new(undo);
                    cmd.args(["-w", "--noflush"]);
                    let _ = run_in(exits, netns, cmd, Some(&unlock_rules(RUNTIME_CHAIN))).await;
                }
                return Err(LockError {
                    program: restore,
                    detail: match result {
                        Ok(code) => format!("exit status {code}"),
                        Err(e) => e,
                    },
                });
            }
        }
    }
    debug!("network locked");
    Ok(())
}

/// Removes the lock under `chain` from `netns`, if there is one. Best effort.
async fn remove_chain(exits: &ExitWatcher, netns: &File, chain: &str) {
    let rules = unlock_rules(chain);
    for (restore, single) in FAMILIES {
        let mut cmd = Command::new(restore);
        cmd.args(["-w", "--noflush"]);
        if run_in(exits, netns, cmd, Some(&rules)).await == Ok(0) {
            info!(chain, program = restore, "network lock removed");
            continue;
        }
        // No lock, or more than one jump into the chain: take the jumps out one by one.
        for hook in ["INPUT", "OUTPUT"] {
            for _ in 0..MAX_JUMPS {
                let mut cmd = Command::new(single);
                cmd.args(["-w", "-D", hook, "-j", chain]);
                if run_in(exits, netns, cmd, None).await != Ok(0) {
                    break;
                }
            }
        }
        for flag in ["-F", "-X"] {
            let mut cmd = Command::new(single);
            cmd.args(["-w", flag, chain]);
            let _ = run_in(exits, netns, cmd, None).await;
        }
    }
}

/// Runs `cmd` in the network namespace `netns`, feeding it `input`; waits for it through
/// the shim's reaper and returns its exit code, or why it could not run or finish.
async fn run_in(
    exits: &ExitWatcher,
    netns: &File,
    mut cmd: Command,
    input: Option<&str>,
) -> Result<i32, String> {
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
    let mut child = cmd.spawn().map_err(|e| {
        warn!(program, "cannot run: {e}");
        format!("cannot run: {e}")
    })?;
    let pid = i32::try_from(child.id()).map_err(|e| e.to_string())?;
    let exited = exits.register(pid);
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        if let Err(e) = stdin.write_all(text.as_bytes()) {
            debug!(program, "write rules: {e}");
        }
    }
    // The reaper owns the exit; the handle neither waits nor kills on drop.
    drop(child);
    match tokio::time::timeout(IPTABLES_TIMEOUT, exited).await {
        Ok(Ok(code)) => {
            debug!(program, code, "iptables step");
            Ok(code)
        }
        Ok(Err(_)) => Err("its exit was lost".into()),
        Err(_) => {
            warn!(program, "did not finish in time");
            Err(format!("did not finish within {IPTABLES_TIMEOUT:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlock_undoes_lock() {
        let lock = lock_rules("X");
        let unlock = unlock_rules("X");
        assert!(lock.contains("-I INPUT -j X\n") && unlock.contains("-D INPUT -j X\n"));
        assert!(lock.contains("-I OUTPUT -j X\n") && unlock.contains("-D OUTPUT -j X\n"));
        assert!(lock.contains("--mark 0xC114 -j ACCEPT"));
        assert!(unlock.contains("-X X\n"));
        assert!(lock.ends_with("COMMIT\n") && unlock.ends_with("COMMIT\n"));
    }
}
