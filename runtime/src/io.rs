//! Process I/O: the container's stdio are pipes (or a pty) owned by the shim, copied to
//! and from what containerd handed us (FIFOs, `file://` URIs).
//!
//! Pipes rather than containerd's FIFOs go to the container so that the container's
//! file descriptors never point at host files: CRIU can then dump them and re-attach
//! fresh pipes at restore (`inherit_fd` of `pipe:[inode]`), and the shim stays in
//! control of the stream (holding output while hibernated, for one).
//!
//! Copies run on plain threads doing blocking I/O: FIFO semantics (blocking opens,
//! EOF only when every writer closed) are simplest to get right that way, and a
//! container has at most three streams per process.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nix::fcntl::OFlag;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::helper::StdioFds;

/// What containerd asked for: paths or URIs of the three streams, and whether the
/// process has a terminal.
#[derive(Debug, Clone, Default)]
pub struct StdioConfig {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Where one output stream goes.
enum Sink {
    Null,
    Fifo(PathBuf),
    File(PathBuf),
}

impl Sink {
    fn parse(uri: &str) -> Result<Sink> {
        if uri.is_empty() {
            return Ok(Sink::Null);
        }
        if let Some(rest) = uri.strip_prefix("file://") {
            return Ok(Sink::File(PathBuf::from(rest)));
        }
        if uri.starts_with("binary://") {
            return Err(Error::Unimplemented(format!(
                "log URI {uri}: binary:// logging is not supported by runc-architect yet"
            )));
        }
        if let Some(rest) = uri.strip_prefix("fifo://") {
            return Ok(Sink::Fifo(PathBuf::from(rest)));
        }
        if uri.contains("://") {
            return Err(Error::InvalidArgument(format!(
                "unsupported stdio URI {uri}"
            )));
        }
        Ok(Sink::Fifo(PathBuf::from(uri)))
    }

    /// Opens the sink for writing. A FIFO is opened read-write so the open never blocks
    /// and a departed reader never turns writes into EPIPE (the stock shim keeps a read
    /// end open for the same reason).
    fn open(&self) -> Result<Option<File>> {
        match self {
            Sink::Null => Ok(None),
            Sink::Fifo(p) => OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .map(Some)
                .map_err(|e| Error::io("open stdio fifo", p, e)),
            Sink::File(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| Error::io("create log directory", dir, e))?;
                }
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(p)
                    .map(Some)
                    .map_err(|e| Error::io("open log file", p, e))
            }
        }
    }
}

/// The process-side ends handed to the helper. Dropped by the caller once the helper
/// has returned, so that only the container holds them.
pub struct ChildStdio {
    fds: Option<[OwnedFd; 3]>,
    pub console_socket: Option<PathBuf>,
}

impl ChildStdio {
    /// Descriptor numbers to put in the helper request.
    pub fn fds(&self) -> Option<StdioFds> {
        self.fds.as_ref().map(|[i, o, e]| StdioFds {
            stdin: i.as_raw_fd(),
            stdout: o.as_raw_fd(),
            stderr: e.as_raw_fd(),
        })
    }

    /// Descriptors the helper must inherit.
    pub fn inherit(&self) -> Vec<RawFd> {
        self.fds()
            .map(|f| vec![f.stdin, f.stdout, f.stderr])
            .unwrap_or_default()
    }
}

/// The shim side of a process's stdio while it runs.
pub struct ProcessIo {
    stdin_fifo: Option<PathBuf>,
    /// Write end towards the process's stdin, shared with the stdin copier so that
    /// CloseIO can close it.
    stdin: Arc<Mutex<Option<File>>>,
    stdin_done: Option<oneshot::Receiver<()>>,
    outputs: Vec<oneshot::Receiver<()>>,
    /// Open sinks, kept until delete so readers see EOF only then.
    sinks: Arc<Mutex<Vec<File>>>,
    console: Option<Arc<File>>,
    console_listener: Option<ConsoleSocket>,
}

impl ProcessIo {
    /// Prepares stdio for a new process. For a terminal, `scratch` is a directory where
    /// the console socket is created.
    pub fn prepare(cfg: &StdioConfig, scratch: &Path) -> Result<(ProcessIo, ChildStdio)> {
        let mut io = ProcessIo {
            stdin_fifo: (!cfg.stdin.is_empty()).then(|| PathBuf::from(&cfg.stdin)),
            stdin: Arc::default(),
            stdin_done: None,
            outputs: Vec::new(),
            sinks: Arc::default(),
            console: None,
            console_listener: None,
        };
        if cfg.terminal {
            let sock = ConsoleSocket::bind(scratch)?;
            let child = ChildStdio {
                fds: None,
                console_socket: Some(sock.path.clone()),
            };
            io.console_listener = Some(sock);
            return Ok((io, child));
        }
        let (in_child, in_ours) = if io.stdin_fifo.is_some() {
            let (r, w) = pipe()?;
            (r, Some(File::from(w)))
        } else {
            (dev_null(false)?, None)
        };
        *lock(&io.stdin) = in_ours;
        let out_child = io.output(Sink::parse(&cfg.stdout)?)?;
        let err_child = io.output(Sink::parse(&cfg.stderr)?)?;
        Ok((
            io,
            ChildStdio {
                fds: Some([in_child, out_child, err_child]),
                console_socket: None,
            },
        ))
    }

    /// Sets up one output stream and returns the descriptor for the process.
    fn output(&mut self, sink: Sink) -> Result<OwnedFd> {
        let Some(dst) = sink.open()? else {
            return dev_null(true);
        };
        let (r, w) = pipe()?;
        let keep = dst
            .try_clone()
            .map_err(|e| Error::io("dup stdio sink", "", e))?;
        lock(&self.sinks).push(keep);
        self.outputs
            .push(copy_thread("stdout-copy", File::from(r), dst));
        Ok(w)
    }

    /// Starts the copies once the process exists: stdin always, and for a terminal the
    /// pty master received on the console socket.
    pub async fn start(&mut self, cfg: &StdioConfig) -> Result<()> {
        if let Some(sock) = self.console_listener.take() {
            let master = sock.receive_master().await?;
            let master = Arc::new(File::from(master));
            if let Some(dst) = Sink::parse(&cfg.stdout)?.open()? {
                let keep = dst
                    .try_clone()
                    .map_err(|e| Error::io("dup stdio sink", "", e))?;
                lock(&self.sinks).push(keep);
                let src = master
                    .try_clone()
                    .map_err(|e| Error::io("dup pty master", "", e))?;
                self.outputs.push(copy_thread("pty-out", src, dst));
            }
            if self.stdin_fifo.is_some() {
                let w = master
                    .try_clone()
                    .map_err(|e| Error::io("dup pty master", "", e))?;
                *lock(&self.stdin) = Some(w);
            }
            self.console = Some(master);
        }
        if let Some(fifo) = self.stdin_fifo.clone() {
            self.stdin_done = Some(stdin_thread(fifo, self.stdin.clone()));
        }
        Ok(())
    }

    /// Sets the terminal size of the process's pty.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(master) = &self.console else {
            return Err(Error::NotFound("process has no terminal".into()));
        };
        let ws = libc::winsize {
            ws_row: height as u16,
            ws_col: width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which is valid for the
        // duration of the call; the fd is an open pty master owned by `master`.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(Error::io("resize pty", "", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Closes the process's stdin (CloseIO). Whatever the client already wrote into the
    /// FIFO is delivered first: the copier gets a moment to reach EOF before the pipe is
    /// closed under it.
    pub async fn close_stdin(&mut self) {
        if let Some(done) = self.stdin_done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
        }
        lock(&self.stdin).take();
    }

    /// Waits (bounded) until the output copies reached EOF, i.e. every writer of the
    /// process's stdout and stderr is gone.
    pub async fn wait_output(&mut self, limit: Duration) {
        let outs = std::mem::take(&mut self.outputs);
        let all = async {
            for o in outs {
                let _ = o.await;
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            warn!("output copy still running after {limit:?}; closing the streams");
        }
    }

    /// Releases everything: sinks (readers see EOF), stdin, the pty master. A stdin
    /// copier still blocked in opening its FIFO is woken up.
    pub fn close(&mut self) {
        lock(&self.stdin).take();
        lock(&self.sinks).clear();
        self.console = None;
        if let Some(fifo) = &self.stdin_fifo {
            // Opening the write side unblocks a reader waiting in open(2); it then sees EOF.
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(fifo);
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::sys("create stdio pipe", e))
}

fn dev_null(write: bool) -> Result<OwnedFd> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| Error::io("open", "/dev/null", e))
}

/// Copies `src` to `dst` until EOF (or EIO, which a pty master reports once the last
/// slave is closed); the receiver resolves when done.
fn copy_thread(name: &str, mut src: File, mut dst: File) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let spawned = thread::Builder::new()
        .name(name.into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Err(e) = dst.write_all(&buf[..n]) {
                            debug!("stdio copy: write: {e}");
                            // Keep draining so the process never blocks on a full pipe.
                            continue;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        warn!("cannot start stdio copy thread: {e}");
    }
    rx
}

/// Copies the stdin FIFO into the process until the client closes it.
fn stdin_thread(fifo: PathBuf, dst: Arc<Mutex<Option<File>>>) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let spawned = thread::Builder::new()
        .name("stdin-copy".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            // Blocks until the client opens its write end.
            let src = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&fifo);
            if let Ok(mut src) = src {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match src.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let mut guard = lock(&dst);
                            let Some(w) = guard.as_mut() else { break };
                            if w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            }
            // EOF from the client: the process sees EOF too (for a pty the master stays
            // open; only the pipe case closes here).
            let mut guard = lock(&dst);
            if let Some(f) = guard.as_ref() {
                if is_pipe(f) {
                    guard.take();
                }
            }
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        warn!("cannot start stdin copy thread: {e}");
    }
    rx
}

fn is_pipe(f: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    f.metadata()
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

/// A unix socket on which libcontainer sends the pty master of a terminal process.
struct ConsoleSocket {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
    _dir: TempDir,
}

impl ConsoleSocket {
    fn bind(scratch: &Path) -> Result<ConsoleSocket> {
        let dir = TempDir::new(scratch)?;
        let path = dir.0.join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| Error::io("bind console socket", &path, e))?;
        Ok(ConsoleSocket {
            path,
            listener,
            _dir: dir,
        })
    }

    async fn receive_master(self) -> Result<OwnedFd> {
        let path = self.path.clone();
        let listener = self.listener;
        let res = tokio::task::spawn_blocking(move || -> Result<OwnedFd> {
            let (conn, _) = listener
                .accept()
                .map_err(|e| Error::io("accept console socket", &path, e))?;
            recv_fd(&conn).map_err(|e| Error::io("receive pty master on", &path, e))
        })
        .await
        .map_err(|e| Error::Other(format!("console socket task: {e}")))?;
        drop(self._dir);
        res
    }
}

fn recv_fd(conn: &std::os::unix::net::UnixStream) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor in our table for us;
                // nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(std::io::Error::other(
        "no file descriptor in console socket message",
    ))
}

/// A private directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> Result<TempDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "ra-console-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io("create console socket dir", &dir, e))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
