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
//! container's namespace ([`rules::run_in`], shared with hibernation's rules): if it does
//! not apply (the lock is gone already), nothing changes. When removing a lock that has
//! more than one jump (a lock taken again over one nobody removed), the jumps are taken
//! out one at a time.
//!
//! # What CRIU saves of the namespace's rules ([`scrub_rule_images`])
//!
//! A container with a network namespace of its own (not joined by path, not kept) is
//! dumped with its namespace, and CRIU saves the namespace's netfilter rules while the
//! lock is in place: `iptables-<id>.img` / `ip6tables-<id>.img` (`iptables-save` text;
//! CRIU 4.2 built with libnftables runs the legacy tools for them) and `nftables-<id>.img`
//! (`nft list ruleset` text, which is where iptables-nft's rules land). A restore would
//! bring the lock back into the new namespace, where nothing lifts it, and every packet
//! would be dropped. So right after such a dump the runtime's chains (`RUNC-ARCHITECT`,
//! and hibernation's `RA-HIB-*`) and every jump into them are cut out of those images
//! (raw text files, no header): the images hold the namespace's own rule set.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use async_trait::async_trait;
use criu_rpc::{Notify, NotifyHandler};
use tracing::{debug, info, warn};

use super::NetworkLock;
use crate::exits::ExitWatcher;
use crate::hibernate::net::rules::{self, Family};

/// At most this many stacked jumps into a lock chain are removed one by one.
const MAX_JUMPS: usize = 32;

/// The chain of the runtime's own lock.
pub const RUNTIME_CHAIN: &str = "RUNC-ARCHITECT";

/// The chain of CRIU's iptables lock.
const CRIU_CHAIN: &str = "CRIU";

/// The mark CRIU puts on its own packets (TCP repair), which a lock must let through
/// (CRIU's `SOCCR_MARK`).
const CRIU_PACKET_MARK: &str = "0xC114";

/// IPv4 then IPv6: a lock may have been left in either, whatever the host has now.
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

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
    // Without IPv6 in the host, ip6tables has nothing to lock.
    let families = rules::families();
    for (i, family) in families.iter().enumerate() {
        let restore = family.restore_program();
        let mut cmd = Command::new(restore);
        cmd.args(["-w", "--noflush"]);
        match run_in(exits, netns, cmd, Some(&rules)).await {
            Ok(0) => {}
            result => {
                // Leave nothing half-locked behind.
                for undo in &families[..i] {
                    let mut cmd = Command::new(undo.restore_program());
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
    for family in FAMILIES {
        let (restore, single) = (family.restore_program(), family.single_program());
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
    cmd: Command,
    input: Option<&str>,
) -> Result<i32, String> {
    rules::run_in(exits, netns.as_fd(), cmd, input, false)
        .await
        .map(|out| out.code)
}

/// Whether `chain` is one of the runtime's (the lock's, or hibernation's).
pub fn is_runtime_chain(chain: &str) -> bool {
    chain == RUNTIME_CHAIN || chain.starts_with(rules::PREFIX)
}

/// Cuts the runtime's chains, and every jump into them, out of CRIU's images of a
/// namespace's netfilter rules in `dir` (see the module docs). Returns the images that
/// changed. Each is rewritten through a private temporary file and a rename.
pub fn scrub_rule_images(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".img") {
            continue;
        }
        let strip: fn(&str) -> String =
            if name.starts_with("iptables-") || name.starts_with("ip6tables-") {
                |t| rules::strip_saved(t, is_runtime_chain)
            } else if name.starts_with("nftables-") {
                |t| strip_nft_ruleset(t, is_runtime_chain)
            } else {
                continue;
            };
        let text = std::fs::read_to_string(&path)?;
        let stripped = strip(&text);
        if stripped == text {
            continue;
        }
        write_private(&path, stripped.as_bytes())?;
        changed.push(path);
    }
    Ok(changed)
}

/// Replaces `path` with `data` (mode 0600, synced, renamed over it).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("img.scrub");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `nft list ruleset` text without the chains `owns` says are ours and without the rules
/// that jump or go to them.
pub fn strip_nft_ruleset(text: &str, owns: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth: i64 = 0;
    // The depth at which a chain being cut out started.
    let mut cutting: Option<i64> = None;
    for line in text.split_inclusive('\n') {
        let (opens, closes) = braces(line);
        let words = nft_words(line);
        if let Some(start) = cutting {
            depth += opens - closes;
            if depth <= start {
                cutting = None;
            }
            continue;
        }
        let declares_ours = depth == 1
            && opens > 0
            && words.first() == Some(&"chain")
            && words.get(1).is_some_and(|n| owns(n));
        if declares_ours {
            let start = depth;
            depth += opens - closes;
            if depth > start {
                cutting = Some(start);
            }
            continue;
        }
        let jumps_to_ours = depth >= 2
            && words
                .windows(2)
                .any(|w| matches!(w[0], "jump" | "goto") && owns(w[1]));
        depth += opens - closes;
        if !jumps_to_ours {
            out.push_str(line);
        }
    }
    out
}

/// The `{` and `}` of an nft line outside quoted strings.
fn braces(line: &str) -> (i64, i64) {
    let (mut opens, mut closes, mut quoted) = (0, 0, false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => opens += 1,
            '}' if !quoted => closes += 1,
            _ => {}
        }
    }
    (opens, closes)
}

/// The words of an nft line, quotes and a trailing `;` or `{` taken off names.
fn nft_words(line: &str) -> Vec<&str> {
    line.split_whitespace()
        .map(|w| w.trim_end_matches([';', '{']).trim_matches('"'))
        .filter(|w| !w.is_empty())
        .collect()
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

    /// What `nft list ruleset` printed in a namespace with the lock in place, a user
    /// chain, hibernation's chains, and a nat table.
    const NFT_RULESET: &str = "table ip filter {
\tchain RUNC-ARCHITECT {
\t\tmeta mark 0x0000c114 counter packets 0 bytes 0 accept
\t\tcounter packets 3 bytes 180 drop
\t}

\tchain MYCHAIN {
\t\tmeta l4proto tcp xt match string counter packets 0 bytes 0 accept
\t}

\tchain INPUT {
\t\ttype filter hook input priority filter; policy accept;
\t\tcounter packets 3 bytes 180 jump RUNC-ARCHITECT
\t\tiifname != \"lo\" meta l4proto tcp counter packets 0 bytes 0 jump RA-HIB-ACT-0a0b0c0d
\t\ttcp dport 22 counter packets 0 bytes 0 jump MYCHAIN
\t}

\tchain RA-HIB-ACT-0a0b0c0d {
\t\tmeta l4proto tcp counter packets 0 bytes 0 goto RA-HIB-TOUCH-0a0b0c0d
\t}

\tchain RA-HIB-TOUCH-0a0b0c0d {
\t\tcounter packets 0 bytes 0 log group 16384
\t}

\tchain OUTPUT {
\t\ttype filter hook output priority filter; policy accept;
\t\tcounter packets 3 bytes 180 jump RUNC-ARCHITECT
\t}
}
table ip6 filter {
\tchain RUNC-ARCHITECT {
\t\tmeta mark 0x0000c114 counter packets 0 bytes 0 accept
\t\tcounter packets 0 bytes 0 drop
\t}

\tchain INPUT {
\t\ttype filter hook input priority filter; policy accept;
\t\tcounter packets 0 bytes 0 jump RUNC-ARCHITECT
\t}
}
table inet user {
\tchain c {
\t\tcomment \"not { ours }\"
\t\ttcp dport 80 accept
\t}
}
";

    #[test]
    fn nft_ruleset_loses_only_ours() {
        let out = strip_nft_ruleset(NFT_RULESET, is_runtime_chain);
        assert!(!out.contains("RUNC-ARCHITECT"), "{out}");
        assert!(!out.contains("RA-HIB-"), "{out}");
        assert!(
            !out.contains("0xc114") && !out.contains("0x0000c114"),
            "{out}"
        );
        assert!(out.contains("\tchain MYCHAIN {\n\t\tmeta l4proto tcp xt match string"));
        assert!(out.contains("\t\ttcp dport 22 counter packets 0 bytes 0 jump MYCHAIN\n"));
        assert!(out.contains(
            "\tchain OUTPUT {\n\t\ttype filter hook output priority filter; policy accept;\n\t}\n"
        ));
        assert!(out.contains("table ip6 filter {"));
        assert!(out.contains("table inet user {\n\tchain c {\n\t\tcomment \"not { ours }\"\n\t\ttcp dport 80 accept\n\t}\n}\n"));
        // Balanced braces: nft can read it back.
        let (o, c) = braces(&out);
        assert_eq!(o, c);
        // Nothing of ours: unchanged.
        assert_eq!(strip_nft_ruleset(&out, is_runtime_chain), out);
    }

    #[test]
    fn images_are_scrubbed_in_place() {
        let dir = std::env::temp_dir().join(format!("ra-netlock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let saved = "*filter\n:INPUT ACCEPT [0:0]\n:RUNC-ARCHITECT - [0:0]\n\
                     -A INPUT -j RUNC-ARCHITECT\n-A INPUT -p tcp --dport 22 -j ACCEPT\n\
                     -A RUNC-ARCHITECT -j DROP\nCOMMIT\n";
        std::fs::write(dir.join("iptables-9.img"), saved).unwrap();
        std::fs::write(dir.join("ip6tables-9.img"), "").unwrap();
        std::fs::write(dir.join("nftables-9.img"), NFT_RULESET).unwrap();
        std::fs::write(dir.join("pages-1.img"), "RUNC-ARCHITECT").unwrap();
        let mut changed = scrub_rule_images(&dir).unwrap();
        changed.sort();
        assert_eq!(
            changed,
            vec![dir.join("iptables-9.img"), dir.join("nftables-9.img")]
        );
        let v4 = std::fs::read_to_string(dir.join("iptables-9.img")).unwrap();
        assert_eq!(
            v4,
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("nftables-9.img"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.join("pages-1.img")).unwrap(),
            "RUNC-ARCHITECT"
        );
        assert!(scrub_rule_images(&dir).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
