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
