//! What the host shows of the things a test node must never leave there, for suites that
//! check the host is unchanged after their nodes are dropped: [`HostState::now`] before the
//! run, [`HostState::check_after`] after the nodes were dropped.
//!
//! Recorded: link names, named network namespaces, iptables chains and rules, mount points,
//! everything below /run/containerd, /var/lib/cni, /run/netns and /var/lib/runc-architect,
//! the top-level cgroups of every hierarchy. A new item fails the check when it looks like a node's (its directories,
//! cgroup parents, bridge, veths, CNI's netns, chains and files, CRI's namespace); other new
//! items (other suites running on the machine meanwhile: the ctr harness's shim sockets,
//! checkpoint tests' named netns) are only printed. `RA_NODE_HOST_CHECK=0` turns the check
//! off.

use std::collections::BTreeSet;
use std::path::Path;

use super::config::CNI_BRIDGE;
use crate::cleanup;
use crate::process;

/// The global paths whose entries are recorded.
const WATCHED_PATHS: &[&str] = &[
    "/run/containerd",
    "/var/lib/cni",
    "/run/netns",
    "/var/lib/runc-architect",
];

/// A snapshot of the host (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostState(BTreeSet<String>);

/// Whether `RA_NODE_HOST_CHECK` leaves the check on (the default).
pub fn check_enabled() -> bool {
    std::env::var("RA_NODE_HOST_CHECK").map_or(true, |v| v != "0")
}

impl HostState {
    /// The host as it is now (empty when the check is off).
    pub fn now() -> HostState {
        if !check_enabled() {
            return HostState::default();
        }
        let mut s = BTreeSet::new();
        let out = |p: &str, a: &[&str]| {
            process::host(p, a)
                .map(|o| o.stdout_str())
                .unwrap_or_default()
        };
        for l in out("ip", &["-o", "link", "show"]).lines() {
            if let Some(name) = l.split(':').nth(1) {
                s.insert(format!("link {}", name.trim()));
            }
        }
        for l in out("ip", &["netns", "list"]).lines() {
            s.insert(format!("netns {l}"));
        }
        for l in out("iptables-save", &[]).lines() {
            if l.starts_with(':') || l.starts_with("-A") {
                // Without the packet counters of chain lines.
                let l = l.split(" [").next().unwrap_or(l);
                s.insert(format!("iptables {l}"));
            }
        }
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            for l in info.lines() {
                if let Some(m) = l.split(' ').nth(4) {
                    s.insert(format!("mount {}", cleanup::unescape_mount_path(m)));
                }
            }
        }
        for dir in WATCHED_PATHS {
            walk(Path::new(dir), &mut |p| {
                s.insert(format!("path {}", p.display()));
            });
        }
        for root in cleanup::cgroup_roots() {
            if let Ok(rd) = std::fs::read_dir(&root) {
                for e in rd.flatten().filter(|e| e.path().is_dir()) {
                    s.insert(format!("cgroup {}", e.path().display()));
                }
            }
        }
        HostState(s)
    }

    /// Items of `self` that `before` did not have.
    pub fn new_since(&self, before: &HostState) -> Vec<String> {
        self.0.difference(&before.0).cloned().collect()
    }

    /// Compares the host now with `self` (taken before the run): `Err` lists what the test
    /// nodes left; new items that are not a node's are printed to stderr.
    pub fn check_after(&self) -> Result<(), String> {
        if !check_enabled() {
            return Ok(());
        }
        let (ours, others): (Vec<String>, Vec<String>) = HostState::now()
            .new_since(self)
            .into_iter()
            .partition(|i| from_a_node(i));
        if !others.is_empty() {
            eprintln!(
                "host check: new on the host, not from a test node (other tests running on \
                 this machine?):\n  {}",
                others.join("\n  ")
            );
        }
        if ours.is_empty() {
            eprintln!("host check: the test nodes left nothing on the host");
            Ok(())
        } else {
            Err(format!(
                "the test nodes left on the host:\n  {}",
                ours.join("\n  ")
            ))
        }
    }
}

/// Whether a new host item looks like a test node's.
pub fn from_a_node(item: &str) -> bool {
    [
        super::layout::DIR_PREFIX,
        "ra-kubepods-",
        CNI_BRIDGE,
        "veth",
        "netns cni-",
        "CNI-",
        "/var/lib/cni",
        "/var/lib/runc-architect",
        "/run/netns/cni-",
        "k8s.io",
    ]
    .iter()
    .any(|p| item.contains(p))
}

fn walk(p: &Path, f: &mut dyn FnMut(&Path)) {
    if std::fs::symlink_metadata(p).is_err() {
        return;
    }
    f(p);
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            walk(&e.path(), f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_node_items_fail_the_check() {
        let before = HostState(["link lo".to_string()].into_iter().collect());
        let after = HostState(
            [
                "link lo",
                "link vethab12cd34",
                "path /run/containerd/s/0123",
                "cgroup /sys/fs/cgroup/memory/ra-kubepods-21-1-0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        );
        let new = after.new_since(&before);
        assert_eq!(new.len(), 3);
        let ours: Vec<&String> = new.iter().filter(|i| from_a_node(i)).collect();
        assert_eq!(
            ours,
            [
                "cgroup /sys/fs/cgroup/memory/ra-kubepods-21-1-0",
                "link vethab12cd34"
            ]
        );
    }
}
