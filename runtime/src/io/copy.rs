//! The threads that move a process's bytes: each output stream (a pipe, or the pty
//! master) into its sink, and containerd's stdin FIFO into the process.
//!
//! Every descriptor a copier touches is non-blocking and every wait is a `poll(2)` that
//! also watches the copier's [`Control`] eventfd, so no copier can be stuck where the
//! shim cannot reach it: a process that never reads its stdin, a reader of a FIFO that
//! went away, or a stream held open by a daemonised child all leave the copier waiting
//! in `poll`, where [`Control::cancel`] ends it. The shim's own threads (its async
//! runtime is single-threaded) only ever flip a flag and write the eventfd; they never
//! wait on a copier or share a lock with one.
//!
//! End of file is what containerd waits for: an output copier closes its sink (the
//! FIFO containerd reads) as soon as the process's stream ends, that is when every
//! writer of the pipe (the process and whatever inherited its stdout) is gone, or for a
//! terminal when the last holder of the pty slave closed it. containerd's CRI waits for
//! that end of file before it deletes a task, and `ExecSync` returns only after it.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// Size of the copy buffer of one stream.
const BUF: usize = 32 * 1024;

const OPEN: u8 = 0;
/// Stdin only: deliver what the client already wrote, then close.
const CLOSING: u8 = 1;
/// Stop now.
const CANCELLED: u8 = 2;

/// How the shim steers a copier thread without ever waiting for it.
pub(super) struct Control {
    state: AtomicU8,
    wake: EventFd,
}

impl Control {
    pub(super) fn new() -> Result<Arc<Control>> {
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::sys("create stdio copy eventfd", e))?;
        Ok(Arc::new(Control {
            state: AtomicU8::new(OPEN),
            wake,
        }))
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    fn raise(&self, to: u8) {
        self.state.fetch_max(to, Ordering::AcqRel);
        // A full counter (impossible at one write per call) would only mean the thread
        // is already awake.
        let _ = self.wake.write(1);
    }

    /// Stdin: finish with what the client has written so far, then close.
    pub(super) fn close_soft(&self) {
        self.raise(CLOSING);
    }

    /// Stop at once; the thread drops both ends.
    pub(super) fn cancel(&self) {
        self.raise(CANCELLED);
    }

    fn drain_wake(&self) {
        let _ = self.wake.read();
    }

    fn cancelled(&self) -> bool {
        self.state() >= CANCELLED
    }
}

/// What a wait in [`wait_for`] ended with.
#[derive(PartialEq, Eq)]
enum Ready {
    Fd,
    Control,
    Timeout,
}

/// Waits until `fd` is ready for `events` or the control eventfd fires.
fn wait_for(fd: BorrowedFd<'_>, events: PollFlags, ctl: &Control, timeout: PollTimeout) -> Ready {
    loop {
        let mut fds = [
            PollFd::new(fd, events),
            PollFd::new(ctl.wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => return Ready::Timeout,
            Ok(_) => {
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    ctl.drain_wake();
                    return Ready::Control;
                }
                return Ready::Fd;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                // poll on two valid descriptors cannot fail otherwise; treat as readiness
                // so the following read or write reports the real error.
                debug!("stdio copy: poll: {e}");
                return Ready::Fd;
            }
        }
    }
}

/// Makes `f` non-blocking (a pty master is shared by every copier of the process, which
/// all handle `WouldBlock`).
pub(super) fn set_nonblocking(f: &impl AsRawFd) -> Result<()> {
    let fd = f.as_raw_fd();
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| Error::sys("get stdio flags", e))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| Error::sys("set stdio non-blocking", e))?;
    Ok(())
}

/// Writes all of `data` to the non-blocking `dst`, or says why the copier must stop.
fn write_all(dst: &mut File, mut data: &[u8], ctl: &Control) -> std::result::Result<(), WriteEnd> {
    while !data.is_empty() {
        if ctl.cancelled() {
            return Err(WriteEnd::Cancelled);
        }
        match dst.write(data) {
            Ok(0) => return Err(WriteEnd::Failed),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                wait_for(dst.as_fd(), PollFlags::POLLOUT, ctl, PollTimeout::NONE);
            }
            Err(e) => {
                debug!("stdio copy: write: {e}");
                return Err(WriteEnd::Failed);
            }
        }
    }
    Ok(())
}

enum WriteEnd {
    Cancelled,
    Failed,
}

/// Reads once from the non-blocking `src`; `None` at end of stream (EOF, or EIO from a
/// pty master whose last slave closed), `Some(0)` when nothing is there yet.
fn read_some(src: &mut File, buf: &mut [u8]) -> Option<usize> {
    loop {
        match src.read(buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(0),
            Err(_) => return None,
        }
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let spawned = thread::Builder::new()
        .name(name.into())
        .stack_size(64 * 1024)
        .spawn(move || {
            body();
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        warn!("cannot start {name} thread: {e}");
    }
    rx
}

/// Copies the process's output stream `src` into `dst` until the stream ends, then
/// closes `dst`; the receiver resolves when done. A failing `dst` (a full disk, say)
/// does not stop the copy: the process must never block on a full pipe.
pub(super) fn output(
    name: &str,
    mut src: File,
    mut dst: File,
    ctl: Arc<Control>,
) -> Result<oneshot::Receiver<()>> {
    set_nonblocking(&src)?;
    set_nonblocking(&dst)?;
    Ok(spawn(name, move || {
        let mut buf = vec![0u8; BUF];
        let mut sink_ok = true;
        loop {
            if ctl.cancelled() {
                break;
            }
            match read_some(&mut src, &mut buf) {
                None => break,
                Some(0) => {
                    wait_for(src.as_fd(), PollFlags::POLLIN, &ctl, PollTimeout::NONE);
                }
                Some(n) if sink_ok => match write_all(&mut dst, &buf[..n], &ctl) {
                    Ok(()) => {}
                    Err(WriteEnd::Cancelled) => break,
                    Err(WriteEnd::Failed) => sink_ok = false,
                },
                Some(_) => {}
            }
        }
        // Dropping `dst` here is the end of file containerd waits for.
        drop(dst);
    }))
}

/// Copies containerd's stdin FIFO into the process (`dst`: the write end of its stdin
/// pipe, or the pty master) until the client closes the FIFO, the process stops reading
/// for good (EPIPE), or the shim closes stdin: softly (what the client already wrote is
/// delivered first) or by cancelling.
pub(super) fn stdin(
    fifo: PathBuf,
    mut dst: File,
    ctl: Arc<Control>,
) -> Result<oneshot::Receiver<()>> {
    set_nonblocking(&dst)?;
    Ok(spawn("stdin-copy", move || {
        // Blocks until the client opens its write end; `ProcessIo::close` opens one
        // itself to end this wait.
        let src = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&fifo);
        let mut src = match src {
            Ok(f) => f,
            Err(e) => {
                debug!("stdin copy: open {}: {e}", fifo.display());
                return;
            }
        };
        if set_nonblocking(&src).is_err() {
            return;
        }
        let mut buf = vec![0u8; BUF];
        loop {
            let state = ctl.state();
            if state >= CANCELLED {
                break;
            }
            match read_some(&mut src, &mut buf) {
                None => break,
                Some(0) => {
                    let timeout = if state >= CLOSING {
                        PollTimeout::ZERO
                    } else {
                        PollTimeout::NONE
                    };
                    if wait_for(src.as_fd(), PollFlags::POLLIN, &ctl, timeout) == Ready::Timeout {
                        // Closing, and the client has nothing more in the FIFO.
                        break;
                    }
                }
                Some(n) => {
                    if write_all(&mut dst, &buf[..n], &ctl).is_err() {
                        break;
                    }
                }
            }
        }
        // For a pipe this is the process's end of file; for a terminal only this
        // thread's handle of the master goes.
        drop(dst);
    }))
}
