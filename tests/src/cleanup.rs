//! Best-effort cleanup of what a test daemon leaves behind: processes, mounts, cgroups.
//!
//! Everything here only touches what is named by the caller (a directory the harness created,
//! a cgroup name the harness chose): never the machine's own processes or cgroups.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::poll::wait_for;

/// Every process's pid but this test process's own.
pub fn other_pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| *pid != me)
        .collect()
}

/// The arguments of process `pid` (`None` when it is gone).
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Pids of processes whose command line has an argument equal to `arg` or containing it.
pub fn processes_with_arg(arg: &str) -> Vec<i32> {
    other_pids()
        .into_iter()
        .filter(|pid| cmdline(*pid).is_some_and(|args| args.iter().any(|a| a.contains(arg))))
        .collect()
}

/// Pids of serving shim processes (`binary` is the shim's file name) whose command line
/// matches `filter`: not the short-lived `start` and `delete` invocations.
pub fn serving_shims(binary: &str, filter: impl Fn(&[String]) -> bool) -> Vec<u32> {
    other_pids()
        .into_iter()
        .filter(|pid| {
            cmdline(*pid).is_some_and(|args| {
                let is_binary = args
                    .first()
                    .and_then(|a| std::path::Path::new(a).file_name())
                    .is_some_and(|f| f == binary);
                let serving = !args.last().is_some_and(|a| a == "start" || a == "delete");
                is_binary && serving && filter(&args)
            })
        })
        .map(|pid| pid as u32)
        .collect()
}

/// SIGKILLs `pids` and waits (bounded) until they are gone.
pub fn kill_and_wait(pids: &[i32]) {
    for &p in pids {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let _ = wait_for("killed processes to exit", Duration::from_secs(5), || {
        pids.iter().all(|&p| !is_alive(p)).then_some(())
    });
}

/// True while `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the field after the ")" that closes the command name
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount_path(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|oct| u8::from_str_radix(oct, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or below `dir` (repeated: mounts can be stacked).
pub fn unmount_under(dir: &Path) {
    for _ in 0..8 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Removes the cgroup `/<name>` (with everything below it) from every mounted hierarchy under
/// /sys/fs/cgroup: thaws it, kills what is left in it, then removes the directories bottom-up.
pub fn remove_cgroup_tree(name: &str) {
    let name = name.trim_matches('/');
    if name.is_empty() || name.contains("..") {
        return;
    }
    for root in cgroup_roots() {
        let dir = root.join(name);
        if dir.is_dir() {
            remove_cgroup_dir(&dir);
        }
    }
}

/// Each cgroup hierarchy's mount point: /sys/fs/cgroup itself on a pure v2 host, else its
/// subdirectories (v1 controllers and the unified one).
pub fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(base) {
        for e in rd.flatten() {
            let p = e.path();
            let is_link = std::fs::symlink_metadata(&p)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(true);
            if !is_link && p.is_dir() {
                v.push(p);
            }
        }
    }
    v
}

fn remove_cgroup_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_dir(&e.path());
            }
        }
    }
    // Frozen processes cannot die: thaw first (v1 freezer and v2).
    let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
    let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
    let procs: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if !procs.is_empty() {
        kill_and_wait(&procs);
    }
    let _ = wait_for(
        &format!("cgroup {} to be removable", dir.display()),
        Duration::from_secs(5),
        || match std::fs::remove_dir(dir) {
            Ok(()) => Some(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(()),
            Err(_) => None,
        },
    );
}

/// Removes a directory tree, unmounting anything mounted inside it first.
pub fn remove_tree(dir: &Path) {
    unmount_under(dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/end\04"), r"/end\04");
    }
}
