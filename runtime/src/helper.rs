//! The single-threaded helper that calls libcontainer's create and exec.
//!
//! libcontainer creates containers by `clone(2)`-ing its caller. In the shim, a
//! multi-threaded tokio process, a clone copies one thread and any lock another thread
//! held at that moment stays locked forever in the child (allocator, tracing, stdio).
//! So the shim never calls those builders itself: it re-executes its own binary with
//! [`HELPER_ARG`] and a JSON request. `main` checks for that argument before it starts
//! any thread and runs [`run_if_helper`], which does the libcontainer call in a process
//! that has exactly one thread, prints a JSON [`Reply`] and exits. This is the same
//! shape as the stock shim calling `runc create`: the helper exits once the container
//! init is waiting to be started; the init, orphaned, is re-parented to the shim (a
//! child subreaper) whose reaper then reports its exit.
//!
//! The container's stdio travels as inherited file descriptors whose numbers are in
//! the request; the helper hands them to libcontainer, which installs them as the
//! container process's fds 0-2.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// argv\[1\] that selects helper mode.
pub const HELPER_ARG: &str = "__runc-architect-helper";

/// File descriptor numbers, inherited by the helper, that become a process's stdio.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct StdioFds {
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
}

/// One libcontainer call.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Create a container from an OCI bundle and leave its init waiting for start.
    Create {
        id: String,
        bundle: PathBuf,
        root: PathBuf,
        /// Absent when the process has a terminal.
        stdio: Option<StdioFds>,
        console_socket: Option<PathBuf>,
        no_pivot: bool,
        /// On a hybrid host: also move the init into the cgroup v2 hierarchy, at the
        /// path libcontainer gave it in v1 (libcontainer manages only v1 there; the
        /// freezer and CRIU want the v2 cgroup, and runc does the same).
        join_unified: bool,
    },
    /// Start an additional process in a running container.
    Exec {
        id: String,
        root: PathBuf,
        /// JSON of the OCI `process` object.
        process: PathBuf,
        stdio: Option<StdioFds>,
        console_socket: Option<PathBuf>,
    },
}

/// The helper's answer, printed as JSON on its stdout.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Pid(i32),
    Error(String),
}

/// If this process was started as the helper, performs the request and returns the
/// exit code; returns `None` for a normal start. Must run before any thread exists.
pub fn run_if_helper() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(HELPER_ARG)) {
        return None;
    }
    reset_signals();
    // libcontainer logs through tracing, also from the container's init after that has
    // replaced fds 0-2 with the container's stdio. Log to a close-on-exec duplicate of
    // our stderr instead, so those lines reach the shim (which attaches them to its
    // error reports) and never the container's output.
    let log = nix::fcntl::fcntl(
        libc::STDERR_FILENO,
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3),
    )
    .map(|fd| {
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it.
        std::sync::Arc::new(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    })
    .ok();
    let _ = tracing_subscriber::fmt()
        .with_writer(move || -> Box<dyn std::io::Write> {
            match &log {
                Some(f) => Box::new(LogFile(f.clone())),
                None => Box::new(std::io::sink()),
            }
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .without_time()
        .try_init();
    let reply = match args.next() {
        None => Reply::Error("helper: missing request".into()),
        Some(raw) => match serde_json::from_slice::<Request>(raw.as_encoded_bytes()) {
            Ok(req) => match perform(req) {
                Ok(pid) => Reply::Pid(pid),
                Err(e) => Reply::Error(e),
            },
            Err(e) => Reply::Error(format!("helper: malformed request: {e}")),
        },
    };
    let ok = matches!(reply, Reply::Pid(_));
    // If stdout is gone there is no one left to tell; the exit code still says it.
    let _ = serde_json::to_writer(std::io::stdout(), &reply);
    Some(if ok { 0 } else { 1 })
}

fn perform(req: Request) -> Result<i32, String> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;

    match req {
        Request::Create {
            id,
            bundle,
            root,
            stdio,
            console_socket,
            no_pivot,
            join_unified,
        } => {
            let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
                .with_root_path(&root)
                .map_err(|e| format!("state directory {}: {e}", root.display()))?
                .with_console_socket(console_socket.as_ref());
            let builder = with_stdio(builder, stdio);
            let container = builder
                .validate_id()
                .map_err(|e| e.to_string())?
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .with_no_pivot(no_pivot)
                .build()
                .map_err(|e| describe_create_error(&bundle, e))?;
            let pid = container
                .pid()
                .ok_or_else(|| format!("container {id} has no init pid after create"))?
                .as_raw();
            if join_unified {
                crate::cgroups::join_unified_like_v1(pid).map_err(|e| e.to_string())?;
            }
            if own_netns(pid) {
                // Network first: entering the mount namespace changes what /proc shows.
                loopback_up(pid)?;
                sysfs_readonly(pid, &bundle)?;
            }
            Ok(pid)
        }
        Request::Exec {
            id,
            root,
            process,
            stdio,
            console_socket,
        } => {
            let builder = ContainerBuilder::new(id, SyscallType::default())
                .with_root_path(&root)
                .map_err(|e| format!("state directory {}: {e}", root.display()))?
                .with_console_socket(console_socket.as_ref());
            let pid = with_stdio(builder, stdio)
                .as_tenant()
                .with_detach(true)
                .with_process(Some(&process))
                .build()
                .map_err(|e| e.to_string())?;
            Ok(pid.as_raw())
        }
    }
}

fn with_stdio(
    builder: libcontainer::container::builder::ContainerBuilder,
    stdio: Option<StdioFds>,
) -> libcontainer::container::builder::ContainerBuilder {
    let Some(fds) = stdio else { return builder };
    // SAFETY: the shim passed these descriptors to us, open and inheritable, for exactly
    // this purpose; nothing else in this process refers to them.
    let (i, o, e) = unsafe {
        (
            OwnedFd::from_raw_fd(fds.stdin),
            OwnedFd::from_raw_fd(fds.stdout),
            OwnedFd::from_raw_fd(fds.stderr),
        )
    };
    builder.with_stdin(i).with_stdout(o).with_stderr(e)
}

/// Words a create failure with the file it is about, the way users read runc's errors.
fn describe_create_error(bundle: &Path, e: libcontainer::error::LibcontainerError) -> String {
    format!("{e} (bundle {})", bundle.display())
}

/// Brings up the loopback interface of the container's network namespace if it has its
/// own, as runc does also for a namespace joined by path (`ip netns add` leaves `lo` down).
/// Runs in the helper, which is single-threaded and about to exit, so entering the
/// namespace affects nothing else.
fn loopback_up(pid: i32) -> Result<(), String> {
    use nix::sched::{setns, CloneFlags};
    let theirs = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&theirs).map_err(|e| format!("open {theirs}: {e}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("enter network namespace of {pid}: {e}"))?;
    // SAFETY: a plain socket used only for the interface ioctls below; closed on return.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `sock` was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass, which lives for
    // the duration of each call.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(format!(
                "get flags of lo: {}",
                std::io::Error::last_os_error()
            ));
        }
        if req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
                return Err(format!("bring up lo: {}", std::io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

/// Whether `pid` has a network namespace of its own (not ours) and shares our user
/// namespace: only then is its sysfs superblock its own, and its loopback ours to touch.
fn own_netns(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: String| std::fs::metadata(p).map(|m| m.ino()).ok();
    let net = ino(format!("/proc/{pid}/ns/net")).zip(ino("/proc/self/ns/net".into()));
    let user = ino(format!("/proc/{pid}/ns/user")).zip(ino("/proc/self/ns/user".into()));
    matches!(net, Some((a, b)) if a != b) && matches!(user, Some((a, b)) if a == b)
}

/// Makes a read-only `/sys` read-only at the superblock too, as runc's mount with
/// `MS_RDONLY` does (libcontainer mounts it read-write and then makes only the mount
/// read-only, which `/proc/self/mountinfo` shows). Only for a container with its own
/// network namespace: sysfs has one superblock per network namespace, so the host's is
/// never touched.
fn sysfs_readonly(pid: i32, bundle: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{setns, CloneFlags};
    let Ok(text) = std::fs::read_to_string(bundle.join("config.json")) else {
        return Ok(());
    };
    let Ok(spec) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(());
    };
    let Some(mounts) = spec.get("mounts").and_then(|m| m.as_array()) else {
        return Ok(());
    };
    let Some(sys) = mounts.iter().find(|m| {
        m.get("destination").and_then(|d| d.as_str()) == Some("/sys")
            && m.get("type").and_then(|t| t.as_str()) == Some("sysfs")
    }) else {
        return Ok(());
    };
    let opts: Vec<&str> = sys
        .get("options")
        .and_then(|o| o.as_array())
        .map(|o| o.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if !opts.contains(&"ro") {
        return Ok(());
    }
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (name, flag) in [
        ("nosuid", MsFlags::MS_NOSUID),
        ("nodev", MsFlags::MS_NODEV),
        ("noexec", MsFlags::MS_NOEXEC),
    ] {
        if opts.contains(&name) {
            flags |= flag;
        }
    }
    let ns_path = format!("/proc/{pid}/ns/mnt");
    let ns = std::fs::File::open(&ns_path).map_err(|e| format!("open {ns_path}: {e}"))?;
    // Entering the mount namespace also moves our root and cwd to the container's root.
    setns(&ns, CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("enter mount namespace of {pid}: {e}"))?;
    mount(None::<&str>, "/sys", None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("remount /sys read-only in container {pid}: {e}"))
}

/// Gives the container the signal state a process normally starts with. The Rust runtime
/// ignores SIGPIPE in every Rust program, this helper included, and an ignored signal stays
/// ignored across exec: without this, `yes | head` in a container would never end, because
/// `yes` would get EPIPE instead of dying of SIGPIPE. The signal mask is cleared too.
fn reset_signals() {
    use nix::sys::signal::{sigaction, signal, SaFlags, SigAction, SigHandler, SigSet, Signal};
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing the default disposition runs no code of ours in a signal context.
        let _ = unsafe {
            sigaction(
                sig,
                &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty()),
            )
        };
    }
    // SAFETY: as above; SIGPIPE explicitly, in case the loop above was cut short.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    );
}

/// A shared log file handle usable as a tracing writer.
struct LogFile(std::sync::Arc<std::fs::File>);

impl std::io::Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
