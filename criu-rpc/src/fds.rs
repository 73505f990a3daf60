//! Descriptor hand-over to the CRIU child.
//!
//! The child must get exactly the descriptors we mean to give it, at known numbers: the
//! swrk socket at [`SWRK_SOCKET_FD`] and the `inherit_fd`/page-server descriptors after
//! it. Everything in this process is opened close-on-exec (Rust's std, tokio and nix all
//! do so), but a descriptor some library opened without `O_CLOEXEC` would still leak into
//! CRIU, and from there possibly into a dump. So the `pre_exec` hook installed here
//! (runs in the forked child, just before `exec`):
//!
//! 1. duplicates every source descriptor above the highest target number
//!    (`F_DUPFD_CLOEXEC`), so moving one cannot clobber another still to be moved;
//! 2. `dup2`s each duplicate onto its target (`dup2` clears close-on-exec on the target);
//! 3. marks every descriptor above the targets close-on-exec with
//!    `close_range(CLOSE_RANGE_CLOEXEC)` (a loop of `fcntl` where that is missing), and
//!    the unused numbers between 3 and the highest target too.
//!
//! The hook allocates nothing and only makes async-signal-safe system calls, as required
//! between `fork` and `exec` in a multi-threaded program.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Descriptor number of the swrk socket in the CRIU child (`criu swrk 3`).
pub const SWRK_SOCKET_FD: RawFd = 3;

/// Descriptors to place in a child at fixed numbers.
#[derive(Debug, Default)]
pub struct ChildFds {
    /// (our descriptor, number in the child)
    entries: Vec<(OwnedFd, RawFd)>,
}

impl ChildFds {
    /// Adds `fd` as descriptor `target` in the child. `target` must be at least 3 and not
    /// already used.
    pub fn push(&mut self, fd: OwnedFd, target: RawFd) -> io::Result<()> {
        if target < 3 || self.entries.iter().any(|(_, t)| *t == target) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor number {target} is reserved or already taken"),
            ));
        }
        self.entries.push((fd, target));
        Ok(())
    }

    /// The next free number after all targets (and after the swrk socket).
    pub fn next_target(&self) -> RawFd {
        self.entries
            .iter()
            .map(|(_, t)| *t + 1)
            .max()
            .unwrap_or(SWRK_SOCKET_FD + 1)
            .max(SWRK_SOCKET_FD + 1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Installs the `pre_exec` hook on `cmd`. The returned guard owns our copies of the
    /// descriptors: keep it alive until the child has been spawned, then drop it (our
    /// copies must be closed, or we would never see the swrk socket hang up).
    pub fn install(self, cmd: &mut Command) -> ChildFdsGuard {
        let pairs: Vec<(RawFd, RawFd)> = self
            .entries
            .iter()
            .map(|(fd, t)| (fd.as_raw_fd(), *t))
            .collect();
        let max_target = pairs.iter().map(|p| p.1).max().unwrap_or(2);
        // Scratch space for the temporary duplicates, allocated here, before fork.
        let mut scratch: Vec<RawFd> = vec![-1; pairs.len()];
        let hook = move || remap_in_child(&pairs, &mut scratch, max_target);
        // SAFETY: `remap_in_child` only calls async-signal-safe functions (fcntl, dup2,
        // close_range via syscall, getrlimit) and does not allocate: `pairs` and
        // `scratch` were allocated before the fork and are only read/written in place.
        unsafe {
            cmd.pre_exec(hook);
        }
        ChildFdsGuard {
            _fds: self.entries.into_iter().map(|(fd, _)| fd).collect(),
        }
    }
}

/// Keeps our copies of the child's descriptors open until the child is spawned.
#[derive(Debug)]
pub struct ChildFdsGuard {
    _fds: Vec<OwnedFd>,
}

/// Runs in the forked child. See the module docs.
fn remap_in_child(
    pairs: &[(RawFd, RawFd)],
    scratch: &mut [RawFd],
    max_target: RawFd,
) -> io::Result<()> {
    let above = max_target + 1;
    for (slot, (src, _)) in scratch.iter_mut().zip(pairs) {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor number; it has no memory
        // effects and fails with EBADF for a bad number, which we report.
        let dup = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, above) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        *slot = dup;
    }
    for (tmp, (_, target)) in scratch.iter().zip(pairs) {
        // SAFETY: dup2 between two descriptor numbers; `tmp` is a valid descriptor we
        // just created and `target` is a plain number we are allowed to replace.
        if unsafe { libc::dup2(*tmp, *target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // Unused numbers between stdio and our highest target must not leak either.
    for fd in 3..above {
        if !pairs.iter().any(|p| p.1 == fd) {
            set_cloexec_if_open(fd);
        }
    }
    // Everything above the targets: mark close-on-exec (closing it would also close the
    // pipe std uses to report exec failures, which is close-on-exec already).
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes descriptor flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            above as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 {
        // Kernels before 5.11: walk the descriptor table up to the soft limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass, which lives on our stack.
        let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur.min(1 << 20) as RawFd
        } else {
            4096
        };
        for fd in above..max {
            set_cloexec_if_open(fd);
        }
    }
    Ok(())
}

fn set_cloexec_if_open(fd: RawFd) {
    // SAFETY: F_GETFD/F_SETFD only read and change descriptor flags; EBADF for a closed
    // number is expected and ignored.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Clears `FD_CLOEXEC` on a descriptor of *this* process. Tests use it to simulate a
/// careless library.
#[cfg(test)]
pub(crate) fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on a descriptor the caller owns only changes its flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::process::Stdio;

    /// Starts `sleep` with `fds` installed and lists its descriptors from outside.
    fn fds_of_child(fds: ChildFds) -> Vec<RawFd> {
        let mut cmd = Command::new("sleep");
        cmd.arg("30").stdin(Stdio::null()).stdout(Stdio::null());
        let guard = fds.install(&mut cmd);
        let mut child = cmd.spawn().expect("spawn sleep");
        drop(guard);
        let dir = format!("/proc/{}/fd", child.id());
        // Read the table only once sleep sleeps: right after exec the dynamic loader
        // still has its libraries open (seen as a stray descriptor). Bounded wait.
        let sleeping = [libc::SYS_clock_nanosleep, libc::SYS_nanosleep].map(|n| n.to_string());
        for _ in 0..400 {
            let call = std::fs::read_to_string(format!("/proc/{}/syscall", child.id()))
                .unwrap_or_default();
            let nr = call.split_whitespace().next().unwrap_or("");
            if sleeping.iter().any(|s| s == nr) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut v: Vec<RawFd> = std::fs::read_dir(&dir)
            .expect("read fd dir")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        v.sort_unstable();
        v
    }

    #[test]
    fn only_given_descriptors_reach_the_child() {
        // A descriptor leaked on purpose: no close-on-exec.
        let leaky = File::open("/dev/null").expect("open");
        clear_cloexec(leaky.as_raw_fd()).expect("clear cloexec");

        let mut fds = ChildFds::default();
        fds.push(File::open("/dev/null").expect("open").into(), 3)
            .expect("push");
        fds.push(File::open("/dev/zero").expect("open").into(), 4)
            .expect("push");
        fds.push(File::open("/dev/null").expect("open").into(), 6)
            .expect("push");
        assert_eq!(fds.next_target(), 7);
        let seen = fds_of_child(fds);
        assert_eq!(
            seen,
            vec![0, 1, 2, 3, 4, 6],
            "leaky fd was {}",
            leaky.as_raw_fd()
        );
    }

    #[test]
    fn rejects_reserved_numbers() {
        let mut fds = ChildFds::default();
        assert!(fds
            .push(File::open("/dev/null").expect("open").into(), 2)
            .is_err());
        fds.push(File::open("/dev/null").expect("open").into(), 3)
            .expect("push");
        assert!(fds
            .push(File::open("/dev/null").expect("open").into(), 3)
            .is_err());
        assert_eq!(fds.next_target(), 4);
    }
}
