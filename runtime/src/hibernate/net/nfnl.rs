//! A netfilter netlink socket made inside a namespace and awaited on tokio: what the
//! activity watch (nfnetlink_log) and the hold (nfnetlink_queue) talk through.
//!
//! Messages are built and parsed with rust-netlink's `netlink-packet-netfilter`: its
//! nflog types for the log, and its generic attribute messages for the queue, whose
//! subsystem it has no types for (the queue's four structs are written here).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_netfilter::NetfilterMessage;
use netlink_sys::constants::NETLINK_NETFILTER;
use netlink_sys::Socket;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{NetError, NetNs};

/// How long the kernel may take to acknowledge a configuration request (it answers in
/// the sender's system call; this only guards against a lost answer).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Receive buffer asked for (SO_RCVBUFFORCE; root in the shim): a burst of held packets
/// must not overflow it before the shim reads.
const RCVBUF: usize = 8 << 20;

/// Size of one receive (a datagram holds one or a few messages).
const RECV_SIZE: usize = 64 * 1024;

/// One message received: its type and netfilter header fields, and the parsed message
/// (`None` when the crate could not parse it).
pub(crate) struct Received {
    pub message: Option<NetfilterMessage>,
    pub res_id: u16,
}

/// What one receive gave.
pub(crate) enum Batch {
    /// Messages (possibly none: a datagram of acknowledgements only).
    Messages(Vec<Received>),
    /// The kernel dropped messages because the buffer was full (`ENOBUFS`).
    Overrun,
    /// Nothing to read right now ([`NfnlSocket::recv_now`]).
    Empty,
}

pub(crate) struct NfnlSocket {
    fd: AsyncFd<Socket>,
    seq: u32,
    ino: u64,
    buf: Vec<u8>,
    /// Messages read while waiting for an acknowledgement, handed out by the next
    /// [`recv_now`](Self::recv_now).
    stash: Vec<Received>,
}

impl NfnlSocket {
    /// A netfilter socket in `ns`.
    pub fn open(ns: &NetNs) -> Result<NfnlSocket, NetError> {
        let ino = ns.ino();
        let sock = ns.run(|| -> io::Result<Socket> {
            let mut s = Socket::new(NETLINK_NETFILTER)?;
            s.bind_auto()?;
            Ok(s)
        })?;
        let sock = sock.map_err(|e| NetError::io("open a netfilter netlink socket", ino, e))?;
        sock.set_non_blocking(true)
            .map_err(|e| NetError::io("set the netlink socket non-blocking", ino, e))?;
        // Best effort: the default buffer works for modest bursts.
        let _ =
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF);
        // SAFETY: the socket owns its fd (closed when it drops, with the AsyncFd) and
        // always reports that same fd.
        let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
            .map_err(|e| NetError::io("register the netlink socket", ino, e.into()))?;
        Ok(NfnlSocket {
            fd,
            seq: 0,
            ino,
            buf: vec![0; RECV_SIZE],
            stash: Vec::new(),
        })
    }

    /// Sends `message` as a request; with `ack`, waits for the kernel's answer and returns
    /// its error, if any, as an `io::Error` (errno). Messages that arrive meanwhile are
    /// kept for the next receive.
    pub async fn request(
        &mut self,
        mut message: NetlinkMessage<NetfilterMessage>,
        ack: bool,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
        header.sequence_number = seq;
        message.header = header;
        message.finalize();
        let mut out = vec![0; message.buffer_len()];
        message.serialize(&mut out);
        self.fd.get_ref().send(&out, 0)?;
        if !ack {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        loop {
            let n =
                match tokio::time::timeout_at(deadline, recv_wait(&self.fd, &mut self.buf)).await {
                    Ok(Ok(n)) => n,
                    // Dropped messages are not the answer: keep waiting for it.
                    Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no answer from the kernel",
                        ))
                    }
                };
            if let Some(answer) = self.parse(n, Some(seq)) {
                return answer;
            }
        }
    }

    /// Waits for and reads the next datagram. Cancel-safe: nothing is consumed until it
    /// returns.
    pub async fn recv(&mut self) -> io::Result<Batch> {
        if !self.stash.is_empty() {
            return Ok(Batch::Messages(std::mem::take(&mut self.stash)));
        }
        match recv_wait(&self.fd, &mut self.buf).await {
            Ok(n) => {
                self.parse(n, None);
                Ok(Batch::Messages(std::mem::take(&mut self.stash)))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Batch::Overrun),
            Err(e) => Err(e),
        }
    }

    /// Reads the next datagram if one is there, without waiting.
    pub fn recv_now(&mut self) -> io::Result<Batch> {
        if !self.stash.is_empty() {
            return Ok(Batch::Messages(std::mem::take(&mut self.stash)));
        }
        match recv_dontwait(self.fd.get_ref(), &mut self.buf) {
            Ok(n) => {
                self.parse(n, None);
                Ok(Batch::Messages(std::mem::take(&mut self.stash)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Batch::Empty),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Batch::Overrun),
            Err(e) => Err(e),
        }
    }

    /// Splits the datagram of `n` bytes in the buffer into messages: stashes what is not
    /// an answer, and returns the answer to request `want` if it is there.
    fn parse(&mut self, n: usize, want: Option<u32>) -> Option<io::Result<()>> {
        let mut off = 0;
        let mut answer = None;
        while off + NLMSG_HDRLEN <= n {
            let bytes = &self.buf[off..n];
            let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            if len < NLMSG_HDRLEN || len > bytes.len() {
                break;
            }
            let seq = u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            // nfgenmsg after the header: family, version, res_id (big endian).
            let res_id = if len >= NLMSG_HDRLEN + 4 {
                u16::from_be_bytes([bytes[18], bytes[19]])
            } else {
                0
            };
            match NetlinkMessage::<NetfilterMessage>::deserialize(&bytes[..len]) {
                Ok(msg) => match msg.payload {
                    NetlinkPayload::Error(e) if want == Some(seq) => {
                        answer = Some(match e.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(code.get().abs())),
                        });
                    }
                    NetlinkPayload::InnerMessage(m) => self.stash.push(Received {
                        message: Some(m),
                        res_id,
                    }),
                    _ => {}
                },
                Err(_) => self.stash.push(Received {
                    message: None,
                    res_id,
                }),
            }
            off += (len + 3) & !3;
        }
        answer
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }
}

/// Length of a netlink message header.
const NLMSG_HDRLEN: usize = 16;

/// One `recv(2)` that does not wait.
fn recv_dontwait(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    // netlink-sys' recv wants a BufMut; a plain recv(2) into our buffer is simpler.
    nix::sys::socket::recv(
        sock.as_raw_fd(),
        buf,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)
}

/// Waits until a datagram is there and reads it.
async fn recv_wait(fd: &AsyncFd<Socket>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|s| recv_dontwait(s.get_ref(), buf)) {
            Ok(result) => return result,
            // Nothing after all: tokio waits for the next edge.
            Err(_would_block) => continue,
        }
    }
}

/// Maps a netlink failure to our error.
pub(crate) fn netlink_err(what: &'static str, ino: u64, e: io::Error) -> NetError {
    NetError::Netlink {
        what,
        ino,
        detail: e.to_string(),
    }
}
