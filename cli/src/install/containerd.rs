//! Commands run on the node: `containerd --version`, `containerd config dump` and the restart.
//!
//! On a node they simply run. In a privileged DaemonSet pod with `hostPID: true` the
//! installer's mount namespace is the container's, where neither the node's containerd nor
//! its systemd exist; PID 1 is then the node's init, so each such command is started in
//! PID 1's mount, UTS, IPC, network and PID namespaces, as `nsenter -t 1 -m -u -i -n -p`
//! would (the container image needs no nsenter). Config files are shared with the node
//! through hostPath mounts at the same paths, so a path means the same file on both sides.
//!
//! The default restart is `systemctl restart containerd`. containerd.service stops only the
//! daemon (`KillMode=process`): the shims, and so the containers, keep running, and the new
//! daemon reconnects to them. `--restart-command` replaces it on nodes without systemd.
//!
//! `RUNC_ARCHITECT_NODE_PID` names another process than PID 1 whose namespaces are the
//! node's (for tests, where PID 1 may not be the node's init or may not be readable).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::Error;

/// containerd's version as it reports it, and its major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: String,
    pub major: u32,
}

/// Runs `containerd --version`.
pub fn version(containerd: &Path) -> Result<Version, Error> {
    let out = run(host_command(containerd)?.arg("--version"), containerd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| Error::Command {
        program: containerd.display().to_string(),
        message: format!("cannot read a version from {:?}", text.trim()),
    })
}

/// `containerd github.com/containerd/containerd/v2 2.1.9+unknown` → 2.1.9+unknown, major 2.
fn parse_version(text: &str) -> Option<Version> {
    let version = text.split_whitespace().nth(2)?.trim_start_matches('v');
    let major = version.split('.').next()?.parse().ok()?;
    Some(Version {
        version: version.to_string(),
        major,
    })
}

/// Lets containerd load `file` (`containerd --config FILE config dump`): fails with
/// containerd's own message when it would not start with it.
pub fn check_config(containerd: &Path, file: &Path) -> Result<(), Error> {
    let mut cmd = host_command(containerd)?;
    cmd.arg("--config").arg(file).args(["config", "dump"]);
    match run(&mut cmd, containerd) {
        Ok(_) => Ok(()),
        Err(Error::Command { message, .. }) => Err(Error::Rejected {
            containerd: containerd.to_path_buf(),
            message,
        }),
        Err(e) => Err(e),
    }
}

/// Restarts containerd: `command` through `sh -c`, or `systemctl restart containerd`.
pub fn restart(command: Option<&str>) -> Result<(), Error> {
    let (program, mut cmd) = match command {
        Some(c) => {
            let mut cmd = host_command("/bin/sh")?;
            cmd.arg("-c").arg(c);
            (c.to_string(), cmd)
        }
        None => {
            let mut cmd = host_command("systemctl")?;
            cmd.args(["restart", "containerd"]);
            ("systemctl restart containerd".to_string(), cmd)
        }
    };
    run(&mut cmd, Path::new(&program)).map(|_| ())
}

fn run(cmd: &mut Command, program: &Path) -> Result<Output, Error> {
    let failed = |message: String| Error::Command {
        program: program.display().to_string(),
        message,
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let said = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        return Err(failed(format!("{}: {}", out.status, said.trim())));
    }
    Ok(out)
}

/// The namespaces entered, in nsenter's order (mount last, so the others are opened from
/// the original mount namespace).
const NAMESPACES: [(&str, nix::sched::CloneFlags); 5] = [
    ("ipc", nix::sched::CloneFlags::CLONE_NEWIPC),
    ("uts", nix::sched::CloneFlags::CLONE_NEWUTS),
    ("net", nix::sched::CloneFlags::CLONE_NEWNET),
    ("pid", nix::sched::CloneFlags::CLONE_NEWPID),
    ("mnt", nix::sched::CloneFlags::CLONE_NEWNS),
];

/// A command for `program` that runs in the node's namespaces (see the module docs).
pub fn host_command(program: impl AsRef<OsStr>) -> Result<Command, Error> {
    let mut cmd = Command::new(program);
    let node = node_pid();
    if !in_other_mount_ns(&node) {
        return Ok(cmd);
    }
    let mut fds: Vec<(OwnedFd, libc::c_int)> = Vec::with_capacity(NAMESPACES.len());
    for (name, flag) in NAMESPACES {
        let path = format!("/proc/{node}/ns/{name}");
        let f = File::open(&path).map_err(|source| Error::Io {
            what: "open the node's namespace",
            path: path.into(),
            source,
        })?;
        fds.push((OwnedFd::from(f), flag.bits()));
    }
    // SAFETY: the closure runs in the forked child before exec. It only makes the
    // async-signal-safe system calls setns(2) and chdir(2) on descriptors opened above (they
    // are close-on-exec and owned by the closure), allocates nothing and takes no lock. The
    // child is single-threaded, as setns(CLONE_NEWNS) requires.
    unsafe {
        cmd.pre_exec(move || {
            for (fd, flag) in &fds {
                if libc::setns(fd.as_raw_fd(), *flag) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The process whose namespaces are the node's: PID 1, or `RUNC_ARCHITECT_NODE_PID`.
fn node_pid() -> String {
    std::env::var("RUNC_ARCHITECT_NODE_PID")
        .ok()
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| "1".to_string())
}

/// Whether this process's mount namespace differs from the node's (a container with
/// hostPID). `false` when the node's cannot be read (not root, or no access to it).
fn in_other_mount_ns(node: &str) -> bool {
    match (
        std::fs::metadata("/proc/self/ns/mnt"),
        std::fs::metadata(format!("/proc/{node}/ns/mnt")),
    ) {
        (Ok(me), Ok(init)) => me.ino() != init.ino() || me.dev() != init.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let v = parse_version(
            "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n",
        )
        .unwrap();
        assert_eq!((v.version.as_str(), v.major), ("1.7.24~ds1", 1));
        let v =
            parse_version("containerd github.com/containerd/containerd/v2 v2.1.9 abc\n").unwrap();
        assert_eq!((v.version.as_str(), v.major), ("2.1.9", 2));
        assert!(parse_version("containerd\n").is_none());
    }
}
