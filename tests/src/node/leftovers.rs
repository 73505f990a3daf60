//! What a test may have leaked into a node: everything a removed pod must not leave behind.
//!
//! Checked: tasks and containers in `k8s.io` (ctr); serving shim processes of the node;
//! mounts in the node's mount namespace below the node directory and the private paths
//! that did not exist when the node was ready; cgroups below the node's cgroup parent in
//! every hierarchy (a container's, or any with processes: empty pod-level cgroups are the
//! kubelet's to remove, as on a real node); shim state and sockets under the node's
//! private /run/containerd, pod network namespaces in its /run/netns, CNI results in its
//! /var/lib/cni, hibernation images and checkpoints in its /var/lib/runc-architect; veths in the node's network namespace; iptables rules of CNI's per-pod
//! chains; host-local IP reservations.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::namespaces;
use super::Node;
use crate::cleanup;
use crate::process;

/// Everything found, one line per item (empty when the node is clean).
pub fn leftovers(node: &Node) -> Vec<String> {
    let mut out = Vec::new();
    containers(node, &mut out);
    shims(node, &mut out);
    mounts(node, &mut out);
    cgroups(node.cgroup_parent(), &mut out);
    private_files(node, &mut out);
    veths(node, &mut out);
    cni_rules(node, &mut out);
    ip_reservations(node, &mut out);
    out
}

fn containers(node: &Node, out: &mut Vec<String>) {
    let ctr = node.ctr().with_timeout(Duration::from_secs(20));
    match ctr.tasks() {
        Ok(tasks) => out.extend(
            tasks
                .into_iter()
                .map(|t| format!("task {} in k8s.io ({}, pid {})", t.id, t.status, t.pid)),
        ),
        Err(e) => out.push(format!("cannot list tasks: {e:#}")),
    }
    match ctr.containers() {
        Ok(cs) => out.extend(cs.into_iter().map(|c| format!("container {c} in k8s.io"))),
        Err(e) => out.push(format!("cannot list containers: {e:#}")),
    }
}

fn shims(node: &Node, out: &mut Vec<String>) {
    let address = node.cri_socket().display().to_string();
    for pid in cleanup::processes_with_arg(&address) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_shim = argv.first().is_some_and(|a| {
            Path::new(a)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("containerd-shim"))
        });
        if is_shim && cleanup::is_alive(pid) {
            out.push(format!("shim process {pid}: {}", argv.join(" ")));
        }
    }
}

/// The paths below which a new mount is a leak.
fn watched_roots(node: &Node) -> Vec<PathBuf> {
    let mut v = vec![node.dir().to_path_buf()];
    v.extend(namespaces::private_paths());
    v
}

fn mounts(node: &Node, out: &mut Vec<String>) {
    match namespaces::mount_points(node.pid()) {
        Ok(now) => {
            let roots = watched_roots(node);
            let mut seen = BTreeSet::new();
            for m in now {
                if node.baseline_mounts.contains(&m) || !seen.insert(m.clone()) {
                    continue;
                }
                if roots.iter().any(|r| m.starts_with(r)) {
                    out.push(format!(
                        "mount {} in the node's mount namespace",
                        m.display()
                    ));
                }
            }
        }
        Err(e) => out.push(format!("cannot read the node's mounts: {e:#}")),
    }
}

/// Cgroups below `parent` (`/ra-kubepods-...`) in every hierarchy that belong to a
/// container (named by a 64-hex container id, as the cgroupfs driver names them) or hold
/// processes. Empty pod-level cgroups are not listed: the kubelet removes those itself.
pub fn cgroups(parent: &str, out: &mut Vec<String>) {
    let rel = parent.trim_matches('/');
    if rel.is_empty() {
        return;
    }
    for root in cleanup::cgroup_roots() {
        let base = root.join(rel);
        walk_dirs(&base, &mut |dir| {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            let n = procs.lines().filter(|l| !l.trim().is_empty()).count();
            let name = dir.file_name().map(|f| f.to_string_lossy().into_owned());
            let is_container = name.is_some_and(|n| is_container_id(&n));
            if is_container || n > 0 {
                out.push(format!("cgroup {} ({n} processes)", dir.display()));
            }
        });
    }
}

/// containerd's container ids (CRI's): 64 lower-case hex digits.
pub fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn walk_dirs(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let p = e.path();
            f(&p);
            walk_dirs(&p, f);
        }
    }
}

/// Every file (not directory) below `dir`, and directories at `min_dir_depth` or deeper.
fn files_below(dir: &Path, min_dir_depth: usize) -> Vec<PathBuf> {
    fn go(dir: &Path, depth: usize, min: usize, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if depth + 1 >= min {
                    out.push(p.clone());
                }
                go(&p, depth + 1, min, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    go(dir, 0, min_dir_depth, &mut out);
    out.sort();
    out
}

fn private_files(node: &Node, out: &mut Vec<String>) {
    for global in namespaces::private_paths() {
        let private = node.layout.private_dir(&global);
        // /run/containerd/<shim root>/<namespace>/<id>: a container's state.
        let min_dir_depth = if global.ends_with("containerd") {
            3
        } else {
            usize::MAX
        };
        for p in files_below(&private, min_dir_depth) {
            if global.as_os_str() == namespaces::RUNC_ARCHITECT_LIB
                && !is_container_data(&private, &p)
            {
                continue;
            }
            let inside = global.join(p.strip_prefix(&private).unwrap_or(&p));
            out.push(format!(
                "{} (in the node's {})",
                inside.display(),
                global.display()
            ));
        }
    }
}

/// Whether `p`, below runc-architect's private data directory `lib`, holds something of a
/// container: hibernation images (`hibernate/`), or a checkpoint in the default store (a
/// pack, a manifest, a generation record or latest pointer). The store's own files (its
/// format marker, locks, a namespace's encryption state) stay after its last container.
fn is_container_data(lib: &Path, p: &Path) -> bool {
    let rel = p.strip_prefix(lib).unwrap_or(p);
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    rel.starts_with("hibernate")
        || rel.starts_with("store/packs")
        || rel.starts_with("store/manifests")
        || (rel.starts_with("store/index") && (name.starts_with("gen-") || name == ".latest"))
}

fn node_output(node: &Node, program: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = node.command(program);
    cmd.args(args);
    match process::run(cmd, None, Duration::from_secs(30)).and_then(|o| o.ok()) {
        Ok(o) => Ok(o.stdout_str()),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn veths(node: &Node, out: &mut Vec<String>) {
    match node_output(node, "ip", &["-o", "link", "show", "type", "veth"]) {
        Ok(s) => {
            for l in s.lines().filter(|l| !l.trim().is_empty()) {
                let name = l.split(':').nth(1).unwrap_or(l).trim();
                out.push(format!("veth {name} in the node's network namespace"));
            }
        }
        Err(e) => out.push(format!("cannot list veths: {e}")),
    }
}

/// Whether `chain` is one of CNI's per-pod chains (`CNI-<hash>` of the bridge's masquerade,
/// `CNI-DN-<hash>` of portmap), not one of the plugins' shared chains.
pub fn is_pod_chain(chain: &str) -> bool {
    let Some(rest) = chain.strip_prefix("CNI-") else {
        return false;
    };
    let hash = rest
        .strip_prefix("DN-")
        .or_else(|| rest.strip_prefix("SN-"))
        .unwrap_or(rest);
    hash.len() >= 16 && hash.chars().all(|c| c.is_ascii_hexdigit())
}

/// Lines of `iptables-save` output that belong to a pod: per-pod chains and rules in or
/// jumping to them.
pub fn pod_rules(save: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in save.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let hit = if let Some(decl) = line.strip_prefix(':') {
            is_pod_chain(decl.split_whitespace().next().unwrap_or_default())
        } else if words.first() == Some(&"-A") {
            words.get(1).is_some_and(|c| is_pod_chain(c))
                || words
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && is_pod_chain(w[1]))
        } else {
            false
        };
        if hit {
            out.push(line.to_string());
        }
    }
    out
}

fn cni_rules(node: &Node, out: &mut Vec<String>) {
    match node_output(node, "iptables-save", &[]) {
        Ok(s) => out.extend(
            pod_rules(&s)
                .into_iter()
                .map(|r| format!("iptables in the node's network namespace: {r}")),
        ),
        Err(e) => out.push(format!("cannot read iptables: {e}")),
    }
}

fn ip_reservations(node: &Node, out: &mut Vec<String>) {
    for p in files_below(&node.layout.cni_ipam_dir(), usize::MAX) {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == "lock" || name.starts_with("last_reserved_ip") {
            continue;
        }
        out.push(format!("host-local IP reservation {}", p.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_per_pod_chains_only() {
        let save = "*nat\n\
            :POSTROUTING ACCEPT [0:0]\n\
            :CNI-HOSTPORT-DNAT - [0:0]\n\
            :CNI-3d1e0b9f8a2c4e5d6f7a8b9c - [0:0]\n\
            :CNI-DN-3d1e0b9f8a2c4e5d6f7a8 - [0:0]\n\
            -A POSTROUTING -m comment --comment \"CNI portfwd requiring masquerade\" -j CNI-HOSTPORT-MASQ\n\
            -A POSTROUTING -s 10.88.0.5/32 -j CNI-3d1e0b9f8a2c4e5d6f7a8b9c\n\
            -A CNI-3d1e0b9f8a2c4e5d6f7a8b9c -d 10.88.0.0/16 -j ACCEPT\n\
            -A CNI-HOSTPORT-DNAT -p tcp -j CNI-DN-3d1e0b9f8a2c4e5d6f7a8\n\
            COMMIT\n";
        let rules = pod_rules(save);
        assert_eq!(rules.len(), 5, "{rules:#?}");
        assert!(rules.iter().all(|r| !r.contains("CNI-HOSTPORT-MASQ")));
        assert!(!is_pod_chain("CNI-HOSTPORT-SETMARK"));
        assert!(!is_pod_chain("CNI-FORWARD"));
    }
}
