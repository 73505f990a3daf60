//! Answering kubelet's probes while the container sleeps: a listener of the shim in the
//! container's namespace, to which the hold redirects new connections from the node to
//! app ports.
//!
//! Each connection is read for at most [`READ_LIMIT`] bytes within [`READ_DEADLINE`]:
//!
//! - an HTTP request with a `User-Agent: kube-probe/...` header is kubelet's HTTP probe:
//!   it gets `HTTP/1.1 200 OK` (`Content-Length: 0`, `Connection: close`) and the
//!   connection is closed;
//! - a connection closed at once without data is kubelet's TCP probe: it succeeded when
//!   the connect completed; we close too;
//! - anything else (another request, another protocol, a client that waits for the server
//!   to speak first) is a real request from the node: it is handed out with the bytes
//!   read ([`ProbeResponder::next_wake`]) for the driver to wake the container and relay
//!   it ([`super::relay()`]).
//!
//! There are two listeners on one port, IPv4 and IPv6-only, so that each family's
//! `REDIRECT` lands on a socket of its own family and the original destination (the app
//! port the client asked for) can be read back (`SO_ORIGINAL_DST`). Peer addresses are
//! reported canonical: an IPv4-mapped IPv6 address (kubelet's, on a dual-stack socket) is
//! reported as IPv4.
//!
//! # Redirected connections outlive the hold's rules
//!
//! Every connection the responder accepts was redirected (NAT): its packets are
//! translated by conntrack's binding, and the kernel only looks bindings up while some
//! netfilter rule of the namespace uses conntrack. The hold's rules do, but they go at
//! the wake, before a handed connection is relayed; in a namespace without other such
//! rules (a pod's, usually) conntrack would stop at that moment and the app's answers
//! would leave untranslated (from the responder's port: the node resets them). So the
//! responder keeps a chain of its own, `RA-HIB-CT-<id>`, with one conntrack rule and no
//! jump into it (no packet ever runs it: it costs nothing per packet, it only keeps
//! conntrack on), from its start until it is stopped and the last connection it accepted
//! (a handed one being relayed, a probe being closed) is gone.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::rules::{self, chain_name, families, RuleSet, Table};
use super::{canonical, NetError, NetNs};

/// How much of a connection is read to classify it.
pub const READ_LIMIT: usize = 1024;

/// How long a connection may take to show what it is.
pub const READ_DEADLINE: Duration = Duration::from_secs(1);

/// The answer to a kubelet HTTP probe.
pub const PROBE_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// How many real requests may wait for the driver.
const HANDED_BACKLOG: usize = 1024;

/// A connection from the node that is not a probe: the driver wakes the container and
/// relays it.
#[derive(Debug)]
pub struct Handed {
    pub stream: TcpStream,
    /// Who connected (canonical: IPv4-mapped addresses as IPv4).
    pub peer: SocketAddr,
    /// Where the client connected to before the redirect (the app's address and port).
    pub original_dst: Option<SocketAddr>,
    /// What was read from it already (to be sent on first).
    pub head: Vec<u8>,
    /// Keeps conntrack on in the namespace while this connection lives (module docs).
    _conntrack: Arc<ConntrackKeeper>,
}

/// Keeps conntrack on in a namespace (module docs) until dropped: a chain with one
/// conntrack rule and no jump into it. Dropping the last reference removes the chain
/// in the background (`remove_all` takes it after a crash).
#[derive(Debug)]
struct ConntrackKeeper {
    ns: NetNs,
    chain: String,
}

impl ConntrackKeeper {
    async fn install(
        ns: &NetNs,
        port: u16,
        owner: Option<&str>,
    ) -> Result<ConntrackKeeper, NetError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        // Unique to this responder: a later one on the same port never shares the
        // chain whose removal may still be on its way. With an owner (the container), the
        // name ends in the owner's tag like its other chains, so that `shim delete` after
        // a crash finds it.
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let chain = match owner {
            Some(owner) => chain_name(&format!("CT{:02x}", seq % 256), &rules::tag_of(owner)),
            None => {
                let id = format!("{}/{seq}/{port}/{}", std::process::id(), ns.ino());
                chain_name("CT", &format!("{:08x}", rules::fnv1a(id.as_bytes())))
            }
        };
        let sets: Vec<_> = families()
            .iter()
            .map(|f| {
                let mut set = RuleSet::new();
                set.chain(
                    Table::Filter,
                    &chain,
                    vec!["-m conntrack --ctstate DNAT -j RETURN".into()],
                );
                (*f, set)
            })
            .collect();
        rules::install(ns, &sets).await?;
        Ok(ConntrackKeeper {
            ns: ns.clone(),
            chain,
        })
    }
}

impl ConntrackKeeper {
    /// Removes the chain now (the caller waits), instead of in the background on drop.
    async fn remove_now(mut self) {
        let chains = vec![std::mem::take(&mut self.chain)];
        if let Err(e) = rules::remove(&self.ns, &chains).await {
            warn!("remove the responder's conntrack chain: {e}");
        }
    }
}

impl Drop for ConntrackKeeper {
    fn drop(&mut self) {
        if self.chain.is_empty() {
            return;
        }
        let ns = self.ns.clone();
        let chains = vec![std::mem::take(&mut self.chain)];
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = rules::remove(&ns, &chains).await {
                        warn!("remove the responder's conntrack chain: {e}");
                    }
                });
            }
            Err(_) => warn!(
                netns = ns.ino(),
                chain = chains[0],
                "no runtime to remove the responder's conntrack chain (remove_all takes it)"
            ),
        }
    }
}

/// Counts of what the responder saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCounts {
    /// HTTP probes answered.
    pub http: u64,
    /// TCP probes (connect, close).
    pub tcp: u64,
    /// Real requests handed out.
    pub handed: u64,
}

#[derive(Default)]
struct Counts {
    http: AtomicU64,
    tcp: AtomicU64,
    handed: AtomicU64,
}

/// The probe responder of one container.
pub struct ProbeResponder {
    port: u16,
    ino: u64,
    handed: mpsc::Receiver<Handed>,
    counts: Arc<Counts>,
    tasks: Vec<JoinHandle<()>>,
    _conntrack: Arc<ConntrackKeeper>,
}

impl ProbeResponder {
    /// Listens in `ns` on `port` (0: a free port, the same for both families).
    pub async fn start(ns: &NetNs, port: u16) -> Result<ProbeResponder, NetError> {
        Self::start_for(ns, port, None).await
    }

    /// [`ProbeResponder::start`] for container `owner`: its conntrack chain is named
    /// after the owner's tag, like the container's other chains.
    pub async fn start_for(
        ns: &NetNs,
        port: u16,
        owner: Option<&str>,
    ) -> Result<ProbeResponder, NetError> {
        let ino = ns.ino();
        let (v4, v6) = ns
            .enter(move || bind_pair(port))
            .await?
            .map_err(|e| NetError::io(format!("listen on port {port}"), ino, e))?;
        let port = v4
            .local_addr()
            .map_err(|e| NetError::io("read the responder's address", ino, e))?
            .port();
        let keeper = Arc::new(ConntrackKeeper::install(ns, port, owner).await?);
        let (tx, handed) = mpsc::channel(HANDED_BACKLOG);
        let counts = Arc::new(Counts::default());
        let mut tasks = Vec::new();
        for (listener, v6) in [(Some(v4), false), (v6, true)] {
            let Some(listener) = listener else { continue };
            listener
                .set_nonblocking(true)
                .map_err(|e| NetError::io("set the responder non-blocking", ino, e))?;
            let listener = TcpListener::from_std(listener)
                .map_err(|e| NetError::io("register the responder", ino, e))?;
            tasks.push(tokio::spawn(accept_loop(
                listener,
                v6,
                tx.clone(),
                counts.clone(),
                keeper.clone(),
                ino,
            )));
        }
        info!(netns = ino, port, "probe responder listening");
        Ok(ProbeResponder {
            port,
            ino,
            handed,
            counts,
            tasks,
            _conntrack: keeper,
        })
    }

    /// The port it listens on (for the hold's `REDIRECT`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next real request from the node. Cancel-safe.
    pub async fn next_wake(&mut self) -> Option<Handed> {
        self.handed.recv().await
    }

    /// What it saw so far.
    pub fn counts(&self) -> ProbeCounts {
        ProbeCounts {
            http: self.counts.http.load(Ordering::Relaxed),
            tcp: self.counts.tcp.load(Ordering::Relaxed),
            handed: self.counts.handed.load(Ordering::Relaxed),
        }
    }

    /// Closes the listeners and returns every real request that is handed out or still
    /// being classified (those finish within [`READ_DEADLINE`]): at a wake, each of them
    /// must be relayed, none dropped. Probes being answered finish on their own.
    pub async fn finish(mut self) -> Vec<Handed> {
        for t in &self.tasks {
            t.abort();
        }
        // Once the accept loops are gone, the only senders left are the connections still
        // being classified; the channel ends when the last of them is done.
        let mut out = Vec::new();
        let until = tokio::time::Instant::now() + READ_DEADLINE + Duration::from_millis(500);
        while let Ok(Some(h)) = tokio::time::timeout_at(until, self.handed.recv()).await {
            out.push(h);
        }
        debug!(
            netns = self.ino,
            port = self.port,
            handed = out.len(),
            "probe responder finished"
        );
        out
    }

    /// Closes the listeners and waits (at most the probes' read deadline) for the
    /// connections being answered, then removes the conntrack chain before returning:
    /// for the container's end, when the shim may exit right after.
    pub async fn close(self) {
        let keeper = self._conntrack.clone();
        drop(self);
        let until = tokio::time::Instant::now() + READ_DEADLINE + Duration::from_millis(500);
        let mut k = keeper;
        loop {
            match Arc::try_unwrap(k) {
                Ok(keeper) => return keeper.remove_now().await,
                Err(back) if tokio::time::Instant::now() >= until => {
                    drop(back);
                    return;
                }
                Err(back) => {
                    k = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Closes the listeners (connections being answered, or handed out and relayed,
    /// finish on their own: conntrack stays on for them).
    pub fn stop(self) {
        debug!(
            netns = self.ino,
            port = self.port,
            "probe responder stopped"
        );
    }
}

impl Drop for ProbeResponder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    v6: bool,
    handed: mpsc::Sender<Handed>,
    counts: Arc<Counts>,
    keeper: Arc<ConntrackKeeper>,
    ino: u64,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds and the like: pause instead of spinning.
                debug!(netns = ino, "responder accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handed = handed.clone();
        let counts = counts.clone();
        let keeper = keeper.clone();
        tokio::spawn(async move {
            let original_dst = original_dst(&stream, v6);
            serve(
                stream,
                canonical(peer),
                original_dst,
                handed,
                counts,
                keeper,
            )
            .await;
        });
    }
}

/// Classifies one connection and answers, closes or hands it out.
async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    handed: mpsc::Sender<Handed>,
    counts: Arc<Counts>,
    keeper: Arc<ConntrackKeeper>,
) {
    let mut head = Vec::with_capacity(READ_LIMIT);
    let deadline = tokio::time::Instant::now() + READ_DEADLINE;
    let mut buf = [0u8; READ_LIMIT];
    let decision = loop {
        let eof = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) => true,
            Ok(Ok(n)) => {
                let room = READ_LIMIT - head.len();
                head.extend_from_slice(&buf[..n.min(room)]);
                false
            }
            // Reset by the peer (a TCP probe may end that way).
            Ok(Err(_)) if head.is_empty() => true,
            Ok(Err(_)) => return,
            Err(_) => break Decision::Real,
        };
        match classify(&head, eof) {
            Decision::NeedMore => continue,
            d => break d,
        }
    };
    match decision {
        Decision::TcpProbe => {
            counts.tcp.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "TCP probe");
        }
        Decision::HttpProbe => {
            counts.http.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "HTTP probe answered");
            if stream.write_all(PROBE_RESPONSE).await.is_ok() {
                let _ = stream.shutdown().await;
                // Read to the client's close, so ours sends no reset over its data.
                let _ = tokio::time::timeout(READ_DEADLINE, async {
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                })
                .await;
            }
        }
        Decision::Real | Decision::NeedMore => {
            counts.handed.fetch_add(1, Ordering::Relaxed);
            info!(%peer, bytes = head.len(), "a real request from the node: wake");
            let _ = handed
                .send(Handed {
                    stream,
                    peer,
                    original_dst,
                    head,
                    _conntrack: keeper,
                })
                .await;
        }
    }
}

/// What a connection is, from what was read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    NeedMore,
    HttpProbe,
    TcpProbe,
    Real,
}

/// Classifies a connection from its first bytes (`eof`: the client closed its side).
pub fn classify(head: &[u8], eof: bool) -> Decision {
    if head.is_empty() {
        return if eof {
            Decision::TcpProbe
        } else {
            Decision::NeedMore
        };
    }
    if !looks_like_http(head) {
        return Decision::Real;
    }
    let complete = find(head, b"\r\n\r\n").is_some() || find(head, b"\n\n").is_some();
    if has_probe_agent(head) {
        // Answer once the request is all read: closing over unread data would reset.
        return if complete || eof || head.len() >= READ_LIMIT {
            Decision::HttpProbe
        } else {
            Decision::NeedMore
        };
    }
    if complete || eof || head.len() >= READ_LIMIT {
        Decision::Real
    } else {
        Decision::NeedMore
    }
}

/// Whether `head` starts like an HTTP/1 request (`METHOD SP`), as far as it goes.
fn looks_like_http(head: &[u8]) -> bool {
    for (i, b) in head.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' => continue,
            b' ' => return i > 0,
            _ => return false,
        }
    }
    head.len() <= 16
}

/// Whether a complete header line `User-Agent: kube-probe/...` is in `head`.
fn has_probe_agent(head: &[u8]) -> bool {
    let mut lines: Vec<&[u8]> = head.split(|b| *b == b'\n').collect();
    // What follows the last newline is not a complete line yet.
    lines.pop();
    lines.iter().skip(1).any(|line| {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return false;
        };
        let (name, value) = line.split_at(colon);
        name.eq_ignore_ascii_case(b"user-agent")
            && value[1..].trim_ascii_start().starts_with(b"kube-probe/")
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The address a redirected connection was meant for.
fn original_dst(stream: &TcpStream, v6: bool) -> Option<SocketAddr> {
    if v6 {
        let sin6 = socket::getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
            0,
            0,
        )))
    } else {
        let sin = socket::getsockopt(stream, sockopt::OriginalDst).ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        )))
    }
}

/// An IPv4 listener on `port` and, if the namespace has IPv6, an IPv6-only one on the
/// same port (for port 0: the IPv4 one's).
fn bind_pair(port: u16) -> io::Result<(std::net::TcpListener, Option<std::net::TcpListener>)> {
    let mut last = None;
    for _ in 0..16 {
        let v4 = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
        let got = v4.local_addr()?.port();
        match bind_v6_only(got) {
            Ok(v6) => return Ok((v4, Some(v6))),
            // No IPv6 here: IPv4 alone.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
            {
                return Ok((v4, None))
            }
            // The port is taken for IPv6: with a chosen port that is final.
            Err(e) if port == 0 && e.raw_os_error() == Some(libc::EADDRINUSE) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EADDRINUSE)))
}

fn bind_v6_only(port: u16) -> io::Result<std::net::TcpListener> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    socket::bind(fd.as_raw_fd(), &addr)?;
    socket::listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))?;
    Ok(std::net::TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_and_requests() {
        let probe = b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.2:8080\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\n\r\n";
        assert_eq!(classify(probe, false), Decision::HttpProbe);
        // The agent line is there but the request is not complete yet.
        assert_eq!(classify(&probe[..70], false), Decision::NeedMore);
        let lower = b"GET / HTTP/1.1\r\nuser-agent:   kube-probe/1.30\r\n\r\n";
        assert_eq!(classify(lower, false), Decision::HttpProbe);
        let curl = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.0\r\n\r\n";
        assert_eq!(classify(curl, false), Decision::Real);
        // Only part of a request line: wait.
        assert_eq!(classify(b"GE", false), Decision::NeedMore);
        assert_eq!(
            classify(b"GET /x HTTP/1.1\r\nHost", false),
            Decision::NeedMore
        );
        // A binary protocol, or a client talking first in another language.
        assert_eq!(classify(&[0x16, 0x03, 0x01], false), Decision::Real);
        assert_eq!(classify(b"hello\n", false), Decision::Real);
        // Connect and close: a TCP probe.
        assert_eq!(classify(b"", true), Decision::TcpProbe);
        assert_eq!(classify(b"", false), Decision::NeedMore);
        // Data then close: real.
        assert_eq!(classify(b"GET / HTTP/1.0\r\n", true), Decision::Real);
        // kube-probe as a path, not the agent.
        let sneaky = b"GET /User-Agent:%20kube-probe/ HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(classify(sneaky, false), Decision::Real);
    }
}
