//! The SOCK_SEQPACKET socket CRIU talks over: one protobuf message per packet, and
//! descriptors as SCM_RIGHTS ancillary data (CRIU sends the orphan pts master this way).
//!
//! Every receive asks for ancillary data, so a descriptor is never silently dropped
//! (the kernel would close it). Received descriptors are close-on-exec
//! (`MSG_CMSG_CLOEXEC`) and wrapped in [`OwnedFd`] at once.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    connect, recv, recvmsg, send, socket, socketpair, AddressFamily, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;

/// Most descriptors accepted in one packet (CRIU sends at most one).
const MAX_FDS_PER_PACKET: usize = 8;

/// One received packet.
#[derive(Debug, Default)]
pub(crate) struct Packet {
    pub data: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// An async SOCK_SEQPACKET unix socket.
#[derive(Debug)]
pub(crate) struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

/// A connected pair: ours (non-blocking, async) and the child's (blocking, as CRIU
/// expects). Both are close-on-exec; the spawn hook places the child's end.
pub(crate) fn pair() -> io::Result<(SeqPacket, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((SeqPacket::new(ours)?, theirs))
}

/// Connects to a `criu service` socket.
pub(crate) fn connect_path(path: &Path) -> io::Result<SeqPacket> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    // A blocking connect: for a unix socket it completes (or fails) at once.
    connect(fd.as_raw_fd(), &addr)?;
    SeqPacket::new(fd)
}

impl SeqPacket {
    /// Wraps a connected SOCK_SEQPACKET socket; makes it non-blocking.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
        // SAFETY: an OwnedFd is a valid open descriptor that stays open, and keeps
        // returning the same number from as_raw_fd, until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(SeqPacket { fd })
    }

    /// Sends one packet.
    pub(crate) async fn send(&self, data: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                send(fd.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) if n == data.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short send on a seqpacket socket: {n} of {}", data.len()),
                    ))
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet with its descriptors; `None` when the peer hung up.
    pub(crate) async fn recv(&self) -> io::Result<Option<Packet>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_packet(fd.as_raw_fd())) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

fn recv_packet(fd: RawFd) -> io::Result<Option<Packet>> {
    // Learn the packet's size without consuming it. 0 means end of stream: CRIU never
    // sends an empty message (a response always carries type and success).
    let len = recv(fd, &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC)?;
    if len == 0 {
        return Ok(None);
    }
    let mut data = vec![0u8; len];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_PACKET]);
    let mut iov = [IoSliceMut::new(&mut data)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let bytes = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ancillary data truncated ({e}): more than {MAX_FDS_PER_PACKET} descriptors"),
        )
    })? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel installed `r` in our descriptor table for this
                // message (SCM_RIGHTS); nothing else knows or owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("packet truncated ({bytes} of {len} bytes)"),
        ));
    }
    data.truncate(bytes);
    Ok(Some(Packet { data, fds }))
}

/// Sends `data` with `fds` attached; used by tests that play CRIU.
#[cfg(test)]
pub(crate) fn send_with_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage};
    let iov = [io::IoSlice::new(data)];
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    sendmsg::<()>(fd, &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[tokio::test]
    async fn packets_and_descriptors_cross() {
        let (ours, theirs) = pair().expect("pair");
        let theirs_fd = theirs.as_raw_fd();
        let (mut r, w) = std::os::unix::net::UnixStream::pair().expect("pair");
        let peer = std::thread::spawn(move || {
            send_with_fds(theirs_fd, b"hello", &[w.as_raw_fd()]).expect("send");
            let mut buf = [0u8; 16];
            let n = recv(theirs_fd, &mut buf, MsgFlags::empty()).expect("recv");
            drop(w);
            drop(theirs);
            buf[..n].to_vec()
        });
        let p = ours.recv().await.expect("recv").expect("a packet");
        assert_eq!(p.data, b"hello");
        assert_eq!(p.fds.len(), 1);
        ours.send(b"ack").await.expect("send");
        assert_eq!(peer.join().expect("join"), b"ack");
        // The descriptor we received is the other end of `r`.
        let mut w2 = std::fs::File::from(p.fds.into_iter().next().expect("fd"));
        std::io::Write::write_all(&mut w2, b"x").expect("write");
        drop(w2);
        let mut s = String::new();
        r.read_to_string(&mut s).expect("read");
        assert_eq!(s, "x");
        assert!(
            ours.recv().await.expect("recv").is_none(),
            "EOF after hang-up"
        );
    }
}
