//! Running the helper (see [`crate::helper`]) from the multi-threaded shim.
//!
//! The helper is spawned with `std::process::Command` and never waited for directly:
//! its exit comes through the [`ExitWatcher`], which is how every child of the shim is
//! reaped. Its stdout and stderr are pipes read only after it has exited, without
//! blocking, so a descendant that kept a copy of them open cannot hang the shim.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use tracing::debug;

use crate::error::{Error, Result};
use crate::exits::ExitWatcher;
use crate::helper::{Reply, Request, HELPER_ARG};

/// The running shim's own executable image.
const OWN_IMAGE: &str = "/proc/self/exe";

/// Runs one helper request; `inherit` are descriptors the helper must receive (their
/// numbers are in the request). Returns the pid the helper reports.
pub async fn call_helper(exits: &ExitWatcher, req: &Request, inherit: &[RawFd]) -> Result<i32> {
    let json = serde_json::to_string(req)
        .map_err(|e| Error::Other(format!("encode helper request: {e}")))?;
    // The running image itself, not the path it was started from: a node upgrade
    // (`runc-architect install`) replaces that file under running shims, and
    // `current_exe()` then names a path that is gone (" (deleted)") or a newer binary whose
    // helper protocol may differ. Executing /proc/self/exe always runs this very binary.
    let exe = std::path::PathBuf::from(OWN_IMAGE);
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    let mut cmd = Command::new(&exe);
    cmd.arg(HELPER_ARG)
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .env_remove("RUST_LOG")
        // Not the shim's own cwd: that is the bundle of the pod's first container, which
        // is gone once that container is deleted while its siblings live on.
        .current_dir("/");
    let fds: Vec<RawFd> = inherit.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which
    // is async-signal-safe; it touches no memory shared with other threads.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let started = std::time::Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("start helper", &exe, e))?;
    let pid = child.id() as i32;
    // The reaper owns the wait; dropping the handle does not wait or kill.
    drop(child);
    drop(cmd);
    let status = exits
        .register(pid)
        .await
        .map_err(|_| Error::Other("exit monitor closed while waiting for the helper".into()))?;
    let out = drain(out_r);
    let err = drain(err_r);
    debug!(pid, status, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, stderr = %err.trim(), "helper finished");
    match serde_json::from_str::<Reply>(out.trim()) {
        Ok(Reply::Pid(pid)) if status == 0 => Ok(pid),
        Ok(Reply::Error(msg)) => Err(Error::Runtime {
            context: req_context(req),
            message: msg,
        }),
        _ => Err(Error::Runtime {
            context: req_context(req),
            message: format!("helper exited with status {status}: {}", last_lines(&err)),
        }),
    }
}

fn req_context(req: &Request) -> String {
    match req {
        Request::Create { .. } => "OCI runtime create failed".into(),
        Request::Exec { .. } => "OCI runtime exec failed".into(),
    }
}

fn last_lines(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("; ")
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::sys("create pipe", e))
}

/// Reads what is buffered in a pipe without waiting for writers that may never close.
fn drain(fd: OwnedFd) -> String {
    let mut buf = Vec::new();
    if fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_ok() {
        let mut f = File::from(fd);
        let mut chunk = [0u8; 8192];
        while let Ok(n) = f.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Marks `fd` close-on-exec again (or not), used for descriptors handed to children.
pub fn set_cloexec(fd: RawFd, on: bool) -> Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))
        .map(|_| ())
        .map_err(|e| Error::sys("fcntl F_SETFD", e))
}
