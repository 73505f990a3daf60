//! The console socket: where libcontainer hands over the pty master of a process that
//! has a terminal.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A unix socket on which libcontainer sends the pty master of a terminal process.
pub(super) struct ConsoleSocket {
    pub(super) path: PathBuf,
    listener: std::os::unix::net::UnixListener,
    _dir: TempDir,
}

impl ConsoleSocket {
    pub(super) fn bind(scratch: &Path) -> Result<ConsoleSocket> {
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

    pub(super) async fn receive_master(self) -> Result<OwnedFd> {
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
