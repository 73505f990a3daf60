//! OOM-kill notifications for a container's cgroup.
//!
//! v1 (legacy and hybrid hosts): an eventfd registered on `memory.oom_control` through
//! `cgroup.event_control`; the kernel signals it on every OOM in the cgroup and once
//! more when the cgroup is removed. v2: `memory.events` is watched with inotify and an
//! increase of its `oom_kill` counter is an OOM kill.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use super::{read_keyed, CgroupPaths};
use crate::error::{Error, Result};

/// Watches the container's cgroup and calls `on_oom` for each OOM kill until the cgroup
/// goes away. Runs as a tokio task.
pub fn watch(paths: &CgroupPaths, on_oom: impl Fn() + Send + Sync + 'static) -> Result<()> {
    if paths.uses_v1() {
        let dir = paths
            .v1("memory")
            .ok_or_else(|| Error::NotFound("container has no memory cgroup".into()))?
            .to_path_buf();
        let efd = register_v1(&dir)?;
        tokio::spawn(async move {
            if let Err(e) = watch_v1(efd, &dir, on_oom).await {
                warn!(cgroup = %dir.display(), "oom watch ended: {e}");
            }
        });
    } else {
        let dir = paths
            .unified
            .clone()
            .ok_or_else(|| Error::NotFound("container has no cgroup v2 directory".into()))?;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| Error::sys("inotify_init", e))?;
        let events = dir.join("memory.events");
        inotify
            .add_watch(&events, AddWatchFlags::IN_MODIFY)
            .map_err(|e| Error::sys(format!("watch {}", events.display()), e))?;
        tokio::spawn(async move {
            if let Err(e) = watch_v2(inotify, events, on_oom).await {
                debug!("oom watch ended: {e}");
            }
        });
    }
    Ok(())
}

fn register_v1(dir: &Path) -> Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the returned descriptor is checked below and
    // then owned by the OwnedFd.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(Error::io("eventfd", dir, std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    let ctl_path = dir.join("memory.oom_control");
    let ctl = std::fs::File::open(&ctl_path).map_err(|e| Error::io("open", &ctl_path, e))?;
    let reg = dir.join("cgroup.event_control");
    std::fs::write(&reg, format!("{} {}", efd.as_raw_fd(), ctl.as_raw_fd()))
        .map_err(|e| Error::io("register oom eventfd with", &reg, e))?;
    // The registration keeps its own reference to oom_control; ours can go.
    Ok(efd)
}

async fn watch_v1(efd: OwnedFd, dir: &Path, on_oom: impl Fn()) -> std::io::Result<()> {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until dropped, and the
    // AsyncFd owns it for its whole life.
    let afd = unsafe { AsyncFd::register(efd) }.map_err(std::io::Error::from)?;
    loop {
        let mut guard = afd.readable().await?;
        let mut buf = [0u8; 8];
        let fd = guard.get_inner().as_fd().as_raw_fd();
        // SAFETY: reading 8 bytes into a valid 8-byte buffer from an eventfd we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(err);
        }
        // The eventfd also fires when the cgroup is removed: that is the end.
        if !dir.exists() {
            return Ok(());
        }
        on_oom();
    }
}

async fn watch_v2(inotify: Inotify, events: PathBuf, on_oom: impl Fn()) -> std::io::Result<()> {
    let mut last = read_keyed(&events).get("oom_kill").copied().unwrap_or(0);
    // SAFETY: the wrapper owns the inotify instance, whose descriptor stays open and
    // unchanged until the AsyncFd drops it.
    let afd = unsafe { AsyncFd::register(InotifyFd(inotify)) }.map_err(std::io::Error::from)?;
    loop {
        let mut guard = afd.readable().await?;
        match guard.get_inner().0.read_events() {
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                guard.clear_ready();
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        if !events.exists() {
            return Ok(());
        }
        let now = read_keyed(&events).get("oom_kill").copied().unwrap_or(0);
        if now > last {
            on_oom();
        }
        last = now;
    }
}

/// Gives tokio the raw descriptor of an inotify instance.
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_fd().as_raw_fd()
    }
}
