//! Hard cleanup of a node directory, for [`super::Node`]'s drop and for runs killed before
//! their drop handlers ran ([`reap_stale_nodes`]).
//!
//! A node leaves nothing on the host but its directory and its cgroups: its mounts, bridge,
//! veths, iptables rules and pod network namespaces all live in namespaces that go with
//! their last process. So the cleanup kills every process in the node's network and mount
//! namespaces (recorded at start) and in its pods' network namespaces, the processes that
//! name the node directory, and what is left in the node's cgroups; then removes the cgroups
//! and the directory.

use std::path::Path;
use std::time::Duration;

use super::layout::{Layout, DIR_PREFIX};
use super::namespaces;
use crate::cleanup;
use crate::containerd::temp_base;
use crate::poll::wait_for;

/// SIGTERM, wait up to `grace`, then SIGKILL.
pub fn stop_process(pid: i32, grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if wait_for("process to exit", grace, || {
        (!cleanup::is_alive(pid)).then_some(())
    })
    .is_err()
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Namespace ids (`net:[N]`, `mnt:[N]`) recorded in the node directory.
pub fn recorded_namespaces(layout: &Layout) -> Vec<String> {
    std::fs::read_to_string(layout.namespaces_file())
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Network namespace ids of the pods: what CRI mounted in the node's /run/netns, looked at
/// through containerd's root (`/proc/<pid>/root`), while containerd runs.
pub fn pod_netns_ids(containerd_pid: u32) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for global in namespaces::private_paths() {
        if !global.ends_with("netns") {
            continue;
        }
        let rel = global.strip_prefix("/").unwrap_or(&global);
        let dir = Path::new("/proc")
            .join(containerd_pid.to_string())
            .join("root")
            .join(rel);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        // A bind-mounted namespace file is on nsfs and reports the namespace's inode.
        let Ok(nsfs) = std::fs::metadata("/proc/self/ns/net").map(|m| m.dev()) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                if m.dev() == nsfs {
                    out.push(format!("net:[{}]", m.ino()));
                }
            }
        }
    }
    out
}

/// Kills everything of the node and removes its cgroups and its directory.
pub fn cleanup_node_dir(layout: &Layout, extra_ns: &[String]) {
    let mut ns = recorded_namespaces(layout);
    ns.extend_from_slice(extra_ns);
    let dir_arg = format!("{}/", layout.dir.display());
    for _ in 0..3 {
        let mut pids = namespaces::processes_in(&ns);
        pids.extend(cleanup::processes_with_arg(&dir_arg));
        pids.extend(cleanup::processes_with_arg(
            &layout.address().display().to_string(),
        ));
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            break;
        }
        cleanup::kill_and_wait(&pids);
    }
    if let Ok(parent) = std::fs::read_to_string(layout.cgroup_parent_file()) {
        cleanup::remove_cgroup_tree(parent.trim());
    }
    cleanup::remove_tree(&layout.dir);
}

/// The test process that owns a node directory: named in the directory's name
/// (`ra-node-<version>-<pid>-<n>`, there from the first moment, so a directory being set up
/// is never taken for a stale one), else in its owner file.
fn owner_pid(layout: &Layout) -> Option<i32> {
    let name = layout.dir.file_name()?.to_string_lossy().into_owned();
    let from_name = name
        .strip_prefix(DIR_PREFIX)
        .and_then(|rest| rest.split('-').nth(1))
        .and_then(|p| p.parse().ok());
    from_name.or_else(|| {
        std::fs::read_to_string(layout.owner_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
}

/// Cleans up node directories of earlier runs whose test process is gone.
pub fn reap_stale_nodes() {
    let Ok(rd) = std::fs::read_dir(temp_base()) else {
        return;
    };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let layout = Layout::new(&e.path());
        if owner_pid(&layout).is_some_and(cleanup::is_alive) {
            continue;
        }
        // containerd first (gracefully: it may still clean up), if it is still ours.
        if let Some(pid) = std::fs::read_to_string(layout.containerd_pid_file())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let config = layout.config().display().to_string();
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&config))
                .unwrap_or(false);
            if ours && cleanup::is_alive(pid) {
                stop_process(pid, Duration::from_secs(5));
            }
        }
        cleanup_node_dir(&layout, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_comes_from_the_directory_name() {
        let l = Layout::new(Path::new("/tmp/ra-node-21-4242-7"));
        assert_eq!(owner_pid(&l), Some(4242));
    }
}
