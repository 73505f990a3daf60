//! Process I/O: the container's stdio are pipes (or a pty) owned by the shim, copied to
//! and from what containerd handed us (FIFOs, `file://` URIs).
//!
//! Pipes rather than containerd's FIFOs go to the container so that the container's
//! file descriptors never point at host files: CRIU can then dump them and re-attach
//! fresh pipes at restore (`inherit_fd` of `pipe:[inode]`), and the shim stays in
//! control of the stream (holding output while hibernated, for one).
//!
//! Each stream is copied by a thread of its own ([`copy`]): FIFO semantics (blocking
//! opens, EOF only when every writer closed) are simplest to get right that way, and a
//! process has at most three streams. The shim's async side never waits on those
//! threads: it steers them through a [`copy::Control`] each. The contract with
//! containerd, whose CRI waits for end of file on a process's output before it deletes
//! the task or answers `ExecSync`:
//!
//! - an output FIFO is closed when the process's stream ends (the process and whatever
//!   inherited its stdout are gone), not when the task is deleted;
//! - CloseIO closes stdin after delivering what the client already wrote, without
//!   waiting for a process that does not read;
//! - Delete ([`ProcessIo::close`]) ends every copy at once.

mod console;
mod copy;
mod sink;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::OFlag;
use tokio::sync::oneshot;
use tracing::warn;

use crate::error::{Error, Result};
use crate::helper::StdioFds;
use console::ConsoleSocket;
use copy::Control;
use sink::Sink;

/// What containerd asked for: paths or URIs of the three streams, and whether the
/// process has a terminal.
#[derive(Debug, Clone, Default)]
pub struct StdioConfig {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
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
    /// Write end towards the process's stdin until the stdin copier takes it.
    stdin_pipe: Option<File>,
    /// CloseIO came before the copier started.
    stdin_closed: bool,
    stdin: Option<Arc<Control>>,
    /// Each output copier, and its end until [`ProcessIo::wait_output`] takes it.
    outputs: Vec<(Arc<Control>, Option<oneshot::Receiver<()>>)>,
    console: Option<Arc<File>>,
    console_listener: Option<ConsoleSocket>,
}

impl ProcessIo {
    /// Prepares stdio for a new process. For a terminal, `scratch` is a directory where
    /// the console socket is created.
    pub fn prepare(cfg: &StdioConfig, scratch: &Path) -> Result<(ProcessIo, ChildStdio)> {
        let mut io = ProcessIo {
            stdin_fifo: (!cfg.stdin.is_empty()).then(|| PathBuf::from(&cfg.stdin)),
            stdin_pipe: None,
            stdin_closed: false,
            stdin: None,
            outputs: Vec::new(),
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
        let in_child = if io.stdin_fifo.is_some() {
            let (r, w) = pipe()?;
            io.stdin_pipe = Some(File::from(w));
            r
        } else {
            dev_null(false)?
        };
        let out_child = io.output("stdout-copy", &cfg.stdout)?;
        let err_child = io.output("stderr-copy", &cfg.stderr)?;
        Ok((
            io,
            ChildStdio {
                fds: Some([in_child, out_child, err_child]),
                console_socket: None,
            },
        ))
    }

    /// Sets up one output stream and returns the descriptor for the process.
    fn output(&mut self, name: &str, uri: &str) -> Result<OwnedFd> {
        let Some(dst) = Sink::parse(uri)?.open()? else {
            return dev_null(true);
        };
        let (r, w) = pipe()?;
        self.copy_output(name, File::from(r), dst)?;
        Ok(w)
    }

    fn copy_output(&mut self, name: &str, src: File, dst: File) -> Result<()> {
        let ctl = Control::new()?;
        let done = copy::output(name, src, dst, ctl.clone())?;
        self.outputs.push((ctl, Some(done)));
        Ok(())
    }

    /// Starts the copies once the process exists: stdin always, and for a terminal the
    /// pty master received on the console socket.
    pub async fn start(&mut self, cfg: &StdioConfig) -> Result<()> {
        if let Some(sock) = self.console_listener.take() {
            let master = Arc::new(File::from(sock.receive_master().await?));
            if let Some(dst) = Sink::parse(&cfg.stdout)?.open()? {
                let src = master
                    .try_clone()
                    .map_err(|e| Error::io("dup pty master", "", e))?;
                self.copy_output("pty-out", src, dst)?;
            }
            if self.stdin_fifo.is_some() {
                let w = master
                    .try_clone()
                    .map_err(|e| Error::io("dup pty master", "", e))?;
                self.stdin_pipe = Some(w);
            }
            self.console = Some(master);
        }
        if let (Some(fifo), Some(dst)) = (self.stdin_fifo.clone(), self.stdin_pipe.take()) {
            let ctl = Control::new()?;
            if self.stdin_closed {
                ctl.close_soft();
            }
            // The copier reports nothing back: its end is the process's end of file.
            let _done = copy::stdin(fifo, dst, ctl.clone())?;
            self.stdin = Some(ctl);
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

    /// Closes the process's stdin (CloseIO): whatever the client already wrote into the
    /// FIFO is delivered first, then the process sees end of file. Returns at once, also
    /// when the process does not read its stdin.
    pub fn close_stdin(&mut self) {
        match &self.stdin {
            Some(ctl) => ctl.close_soft(),
            None => {
                self.stdin_closed = true;
                // Not started: nothing was delivered, so nothing is pending.
                self.stdin_pipe = None;
            }
        }
    }

    /// Waits (bounded) until the output copies reached EOF, i.e. every writer of the
    /// process's stdout and stderr is gone.
    pub async fn wait_output(&mut self, limit: Duration) {
        let outs: Vec<_> = self
            .outputs
            .iter_mut()
            .filter_map(|(_, done)| done.take())
            .collect();
        let all = async {
            for o in outs {
                let _ = o.await;
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            warn!("output copy still running after {limit:?}; closing the streams");
        }
    }

    /// Releases everything: every copy ends (readers see EOF), stdin, the pty master. A
    /// stdin copier still blocked in opening its FIFO is woken up.
    pub fn close(&mut self) {
        for (ctl, _) in &self.outputs {
            ctl.cancel();
        }
        self.stdin_pipe = None;
        self.console = None;
        if let Some(ctl) = self.stdin.take() {
            ctl.cancel();
            if let Some(fifo) = &self.stdin_fifo {
                // Opening the write side unblocks a copier waiting in open(2); it then
                // sees the cancellation.
                let _ = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(fifo);
            }
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.close();
    }
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

#[cfg(test)]
mod tests;
