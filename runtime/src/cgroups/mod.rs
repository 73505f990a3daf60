//! cgroups as the shim sees them: which hierarchy layout the host has, where a
//! container's cgroups are, its processes, stats and OOM notifications.
//!
//! Hosts come in three layouts: legacy (v1 controllers only), hybrid (v1 controllers
//! plus an empty v2 hierarchy at `/sys/fs/cgroup/unified`) and unified (pure v2, most
//! current Kubernetes nodes). libcontainer sets the limits; this module only reads
//! (stats, processes, OOM) and, on hybrid hosts, mirrors the container into the v2
//! hierarchy so that freezing and CRIU can use one v2 cgroup everywhere.

pub mod oom;
pub mod stats;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const HYBRID_UNIFIED: &str = "/sys/fs/cgroup/unified";

/// The host's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Legacy,
    Hybrid,
    Unified,
}

/// Detects (once) the cgroup layout of this host.
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        if is_cgroup2(Path::new(CGROUP_ROOT)) {
            Mode::Unified
        } else if is_cgroup2(Path::new(HYBRID_UNIFIED)) {
            Mode::Hybrid
        } else {
            Mode::Legacy
        }
    })
}

fn is_cgroup2(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Directory of the v2 hierarchy's root on this host, if it has one.
pub fn unified_root() -> Option<&'static Path> {
    match mode() {
        Mode::Unified => Some(Path::new(CGROUP_ROOT)),
        Mode::Hybrid => Some(Path::new(HYBRID_UNIFIED)),
        Mode::Legacy => None,
    }
}

/// Where one container's cgroups are.
#[derive(Debug, Clone, Default)]
pub struct CgroupPaths {
    /// v1 controller name → directory.
    pub v1: HashMap<String, PathBuf>,
    /// The v2 directory, if the host has a v2 hierarchy.
    pub unified: Option<PathBuf>,
}

impl CgroupPaths {
    /// Reads `/proc/PID/cgroup`.
    pub fn of_pid(pid: i32) -> Result<CgroupPaths> {
        let file = format!("/proc/{pid}/cgroup");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io("read", &file, e))?;
        Ok(Self::parse(&text))
    }

    fn parse(text: &str) -> CgroupPaths {
        let mut paths = CgroupPaths::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if ctrls.is_empty() {
                paths.unified = unified_root().map(|r| r.join(rel));
                continue;
            }
            for c in ctrls.split(',') {
                let c = c.strip_prefix("name=").unwrap_or(c);
                // Co-mounted controllers share a directory named after all of them
                // (cpu,cpuacct); the per-controller symlinks point at it.
                paths
                    .v1
                    .insert(c.to_string(), Path::new(CGROUP_ROOT).join(c).join(rel));
            }
        }
        paths
    }

    /// The directory of a v1 controller.
    pub fn v1(&self, controller: &str) -> Option<&Path> {
        self.v1.get(controller).map(PathBuf::as_path)
    }

    /// Whether stats and OOM come from v1 controllers (legacy and hybrid hosts, like the
    /// stock shim does) or from v2.
    pub fn uses_v1(&self) -> bool {
        mode() != Mode::Unified
    }

    /// All processes in the container's cgroup.
    pub fn procs(&self) -> Result<Vec<i32>> {
        let dir = if self.uses_v1() {
            ["pids", "memory", "devices", "cpu", "freezer"]
                .iter()
                .find_map(|c| self.v1(c))
                .map(Path::to_path_buf)
        } else {
            self.unified.clone()
        };
        let Some(dir) = dir else {
            return Err(Error::NotFound("container cgroup not found".into()));
        };
        let file = dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io("read", &file, e))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Removes the container's own cgroup directories that are left once libcontainer
    /// deleted the container: the v2 mirror on a hybrid host, and directories in hierarchies
    /// libcgroups does not manage (the named `systemd` one, which CRIU re-creates when it
    /// restores a checkpoint of runc's, whose containers live there too). Only directories
    /// at the container's own path (that of its memory, pids or v2 cgroup) are touched, never
    /// a parent or the root a hierarchy shares with the host; a directory that still holds
    /// processes stays.
    pub fn remove_own(&self) -> Result<()> {
        let own = ["memory", "pids", "cpu", "devices"]
            .iter()
            .find_map(|c| self.relative(c))
            .or_else(|| {
                let root = unified_root()?;
                self.unified
                    .as_deref()?
                    .strip_prefix(root)
                    .ok()
                    .map(Path::to_path_buf)
            });
        let Some(own) = own.filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(());
        };
        let mut dirs: Vec<&PathBuf> = self.v1.values().collect();
        dirs.extend(self.unified.iter());
        let mut first_error = None;
        for dir in dirs {
            let at_own_path = match (unified_root(), self.unified.as_ref()) {
                (Some(root), Some(u)) if u == dir => {
                    dir.strip_prefix(root).ok() == Some(own.as_path())
                }
                _ => {
                    dir.strip_prefix(CGROUP_ROOT)
                        .ok()
                        .map(|p| p.iter().skip(1).collect::<PathBuf>())
                        .as_deref()
                        == Some(own.as_path())
                }
            };
            if !at_own_path || !dir.exists() {
                continue;
            }
            if let Err(e) = std::fs::remove_dir(dir) {
                first_error.get_or_insert(Error::io("remove cgroup", dir, e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The path of a v1 controller's directory below its hierarchy's root.
    fn relative(&self, controller: &str) -> Option<PathBuf> {
        let dir = self.v1(controller)?;
        let below = dir.strip_prefix(CGROUP_ROOT).ok()?;
        Some(below.iter().skip(1).collect())
    }
}

/// On a hybrid host, moves `pid` into the v2 hierarchy at the path its v1 memory (or
/// first) controller has; a no-op elsewhere.
pub fn join_unified_like_v1(pid: i32) -> Result<()> {
    if mode() != Mode::Hybrid {
        return Ok(());
    }
    let paths = CgroupPaths::of_pid(pid)?;
    let rel = ["memory", "pids", "cpu", "devices"]
        .iter()
        .find_map(|c| paths.v1(c))
        .and_then(|p| p.strip_prefix(CGROUP_ROOT).ok())
        .map(|p| p.iter().skip(1).collect::<PathBuf>())
        .ok_or_else(|| Error::NotFound(format!("no v1 cgroup for pid {pid}")))?;
    let dir = Path::new(HYBRID_UNIFIED).join(rel);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create cgroup", &dir, e))?;
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(|e| Error::io("join cgroup", &procs, e))
}

pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    if s == "max" {
        return Some(u64::MAX);
    }
    s.parse().ok()
}

pub(crate) fn read_keyed(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    Some((it.next()?.to_string(), it.next()?.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_cgroup() {
        let p = CgroupPaths::parse(
            "12:cpu,cpuacct:/default/x\n4:memory:/default/x\n1:name=systemd:/s\n0::/default/x\n",
        );
        assert_eq!(
            p.v1("memory"),
            Some(Path::new("/sys/fs/cgroup/memory/default/x"))
        );
        assert_eq!(
            p.v1("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpuacct/default/x"))
        );
        assert_eq!(p.v1("systemd"), Some(Path::new("/sys/fs/cgroup/systemd/s")));
    }

    /// On this machine's hybrid hierarchy: a container's own directories go, in every
    /// hierarchy that has one at its path; a shared parent and the root stay.
    #[test]
    fn removes_only_the_containers_own_directories() {
        if mode() != Mode::Hybrid || !Path::new("/sys/fs/cgroup/systemd").is_dir() {
            eprintln!("skipped: needs a hybrid host with the named systemd hierarchy");
            return;
        }
        let parent = format!("ra-unit-{}", std::process::id());
        let own = format!("{parent}/c1");
        let dirs: Vec<PathBuf> = ["systemd", "memory"]
            .iter()
            .map(|h| Path::new(CGROUP_ROOT).join(h).join(&own))
            .chain([Path::new(HYBRID_UNIFIED).join(&own)])
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        // libcontainer removed the memory cgroup already; the named and v2 ones are left.
        std::fs::remove_dir(&dirs[1]).unwrap();
        let p = CgroupPaths::parse(&format!(
            "4:memory:/{own}\n1:name=systemd:/{own}\n0::/{own}\n"
        ));
        p.remove_own().unwrap();
        for d in &dirs {
            assert!(!d.exists(), "{} is left", d.display());
        }
        for h in [
            Path::new(CGROUP_ROOT).join("systemd"),
            Path::new(CGROUP_ROOT).join("memory"),
            PathBuf::from(HYBRID_UNIFIED),
        ] {
            let parent_dir = h.join(&parent);
            assert!(
                parent_dir.is_dir(),
                "the parent {} went too",
                parent_dir.display()
            );
            std::fs::remove_dir(&parent_dir).unwrap();
        }
        // A container at a hierarchy's root (the named one on hybrid hosts) removes nothing.
        CgroupPaths::parse("4:memory:/\n1:name=systemd:/\n")
            .remove_own()
            .unwrap();
        assert!(Path::new("/sys/fs/cgroup/systemd").is_dir());
    }
}
