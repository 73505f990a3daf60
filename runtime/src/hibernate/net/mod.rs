//! Hibernation's network mechanisms: everything happens inside the container's network
//! namespace (the pod's, or the container's own), seen through a [`NetNs`].
//!
//! # The pieces
//!
//! - [`rules`]: chains of our own (`RA-HIB-*`), installed and removed as one
//!   `iptables-restore --noflush` transaction per family (IPv4, IPv6), idempotent, and
//!   findable by name after a crash ([`rules::remove_all`] for `shim delete`).
//! - [`activity`]: the activity source of RUNNING and FROZEN. Rules in the namespace log
//!   the first SYN or payload packet after a quiet period to nfnetlink_log groups of ours
//!   (rate-limited in the kernel: a busy server costs a few rule evaluations per packet and
//!   nothing in the shim); the shim's socket for them is made inside the namespace and
//!   awaited on tokio, so an idle watch costs no CPU at all (no polling). A short
//!   connection cannot be missed: its SYN is logged in the packet path and waits in the
//!   socket until read.
//! - [`hold`]: SCALED_DOWN (and around the dump). Every inbound TCP packet from outside
//!   (and, on `lo`, every one to the app's ports: see below) is queued in the kernel (NFQUEUE, fail-closed, a generous queue length); the first
//!   queued SYN or payload is the wake. After the restore every held packet gets the
//!   ACCEPT verdict in order and reaches the restored socket: a client whose SYN was held
//!   for less than a second never retransmits it. Node-originated connections to app
//!   ports are redirected to the probe responder; shadow ports are refused at once.
//! - [`probes`]: the probe responder, a listener of the shim in the namespace: kubelet's
//!   HTTP probes (`User-Agent: kube-probe/...`) get `200`, TCP probes (connect, close) just
//!   complete; anything else from the node is a real request, handed out for the driver to
//!   wake the container and [`relay`] it.
//! - [`relay`]: those few node connections, relayed to the restored app to their end (the
//!   only proxied connections; after the wake nothing is redirected).
//!
//! # Loopback
//!
//! Clients inside the namespace (a sidecar calling `localhost:PORT`) are clients like
//! any other: their connections to the app's ports count as activity and are held while
//! the app sleeps (a reset would be a dropped request). On `lo` only the app's ports are
//! matched (the rest of a pod talks over `lo` too, and its traffic is neither the app's
//! activity nor to be held), and packets carrying [`SHIM_MARK`] are skipped: the shim's
//! own connections in the namespace (the relay's to the restored app) set it on their
//! sockets ([`mark_shim_socket`]), so they are never held behind the hold they serve nor
//! counted as activity.
//!
//! # Several containers in one namespace
//!
//! A pod's containers share its namespace, and each hibernating one runs its own
//! mechanisms. Chain names carry a tag derived from the container's id
//! ([`rules::tag_of`]), so two watches never touch each other's rules; nfnetlink_log
//! groups and NFQUEUE numbers are per namespace in the kernel, are chosen from the same
//! tag and, when taken (`EBUSY`/`EPERM` on bind), the next free one is used.
//!
//! # Threads and namespaces
//!
//! A socket belongs to the namespace it was created in, whatever thread uses it later:
//! [`NetNs::run`] creates sockets on a short-lived thread that entered the namespace
//! (never a pooled thread: the pool would keep the namespace), and everything after that
//! runs on the shim's tokio runtime. Programs (`iptables-restore`) enter the namespace
//! between fork and exec, and are reaped through the shim's [`ExitWatcher`].

pub mod activity;
pub mod hold;
mod nfnl;
pub mod probes;
pub mod relay;
pub mod rules;

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sched::{setns, CloneFlags};

use crate::exits::ExitWatcher;

pub use activity::{ActivityWatch, Signal, WatchConfig};
pub use hold::{Hold, HoldConfig, WakeCause};
pub use probes::{Handed, ProbeCounts, ProbeResponder};
pub use relay::{relay, RelayStats};

/// The packet mark (`SO_MARK`) of the shim's own sockets in a container's namespace; the
/// rules on `lo` let packets carrying it pass uncounted. ASCII `RAHB`: far from the small
/// marks CNI plugins and meshes use for their routing rules.
pub const SHIM_MARK: u32 = 0x5241_4842;

/// Marks `socket` as the shim's ([`SHIM_MARK`]): its packets are neither held nor counted.
pub fn mark_shim_socket(socket: &impl AsFd) -> io::Result<()> {
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Mark, &SHIM_MARK)
        .map_err(io::Error::from)
}

/// What can go wrong with the network mechanisms. Every variant names the namespace by
/// its inode (as `ip netns identify` and `/proc/PID/ns/net` show it).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a network namespace ({what})")]
    NotNetNs { path: PathBuf, what: String },
    #[error("enter network namespace {ino}: {source}")]
    Enter {
        ino: u64,
        #[source]
        source: io::Error,
    },
    #[error("{what} in network namespace {ino}: {source}")]
    Io {
        what: String,
        ino: u64,
        #[source]
        source: io::Error,
    },
    #[error("{program} in network namespace {ino}: {detail}")]
    Program {
        program: String,
        ino: u64,
        detail: String,
    },
    #[error("netlink ({what}) in network namespace {ino}: {detail}")]
    Netlink {
        what: &'static str,
        ino: u64,
        detail: String,
    },
    #[error("no free {what} in network namespace {ino} (tried {tried})")]
    NoFreeId {
        what: &'static str,
        ino: u64,
        tried: usize,
    },
    #[error("{what} in network namespace {ino} has stopped")]
    Stopped { what: &'static str, ino: u64 },
}

impl NetError {
    pub(crate) fn io(what: impl Into<String>, ino: u64, source: io::Error) -> NetError {
        NetError::Io {
            what: what.into(),
            ino,
            source,
        }
    }
}

/// An open network namespace (an fd of it) and the shim's reaper for programs run in it.
/// Cheap to clone; every clone shares one lock that serializes rule changes made through
/// it.
#[derive(Clone)]
pub struct NetNs {
    inner: Arc<Inner>,
}

struct Inner {
    file: File,
    ino: u64,
    exits: ExitWatcher,
    /// Rule transactions of this process in this namespace, one at a time (each reads
    /// the current rules first).
    rules: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NetNs(net:[{}])", self.inner.ino)
    }
}

impl NetNs {
    /// Opens the namespace at `path` (`/proc/PID/ns/net`, `/run/netns/NAME`, a bind mount).
    pub fn from_path(path: impl AsRef<Path>, exits: ExitWatcher) -> Result<NetNs, NetError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| NetError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        NetNs::checked(file, path, exits)
    }

    /// The namespace of process `pid`.
    pub fn of_pid(pid: i32, exits: ExitWatcher) -> Result<NetNs, NetError> {
        NetNs::from_path(format!("/proc/{pid}/ns/net"), exits)
    }

    /// A namespace already open (the shim's held fd of a container's own namespace).
    pub fn from_file(file: File, exits: ExitWatcher) -> Result<NetNs, NetError> {
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        NetNs::checked(file, &path, exits)
    }

    fn checked(file: File, path: &Path, exits: ExitWatcher) -> Result<NetNs, NetError> {
        // NS_GET_NSTYPE tells the namespace type of any nsfs file: `/proc/PID/ns/net` and a
        // bind mount of it (`/run/netns/NAME`, a pod's namespace as CRI hands it over),
        // whose link in /proc/self/fd reads as its path rather than `net:[...]`.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703; // _IO(0xb7, 0x3), linux/nsfs.h
                                                     // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor's inode;
                                                     // `file` is an open descriptor we own. A non-nsfs file fails with ENOTTY.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            let what = if kind < 0 {
                format!("not a namespace ({})", std::io::Error::last_os_error())
            } else {
                format!("a namespace of type {kind:#x}, not a network namespace")
            };
            return Err(NetError::NotNetNs {
                path: path.to_path_buf(),
                what,
            });
        }
        let ino = file
            .metadata()
            .map_err(|source| NetError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .ino();
        Ok(NetNs {
            inner: Arc::new(Inner {
                file,
                ino,
                exits,
                rules: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The namespace's inode number (its identity).
    pub fn ino(&self) -> u64 {
        self.inner.ino
    }

    /// The namespace's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.file.as_fd()
    }

    /// The shim's reaper, through which programs run in the namespace are waited for.
    pub fn exits(&self) -> &ExitWatcher {
        &self.inner.exits
    }

    pub(crate) async fn lock_rules(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.rules.lock().await
    }

    /// Runs `f` on a new thread that entered the namespace and returns its result; sockets
    /// `f` creates belong to the namespace. Blocks the caller for the thread's life (tens
    /// of microseconds plus `f`); from async code prefer [`enter`](Self::enter).
    pub fn run<T, F>(&self, f: F) -> Result<T, NetError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                setns(self.fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Enter {
                    ino: self.ino(),
                    source: e.into(),
                })?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`run`](Self::run), without blocking the async caller.
    pub async fn enter<T, F>(&self, f: F) -> Result<T, NetError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                let _ = tx.send(ns.run(f));
            })
            .map_err(|e| NetError::io("start a thread", self.ino(), e))?;
        rx.await.map_err(|_| NetError::Stopped {
            what: "the namespace thread",
            ino: self.ino(),
        })?
    }

    /// The container's addresses and the node side (the default gateways: where kubelet's
    /// probes come from under the usual CNI plugins).
    pub async fn addresses(&self) -> Result<Addresses, NetError> {
        let ino = self.ino();
        self.enter(move || read_addresses(ino)).await?
    }

    /// The TCP sockets listening in the namespace, both families.
    pub async fn tcp_listeners(&self) -> Result<Vec<Listener>, NetError> {
        let ino = self.ino();
        self.enter(move || read_listeners(ino)).await?
    }

    /// The TCP ports anything listens on in the namespace (sorted, each once): the
    /// default wake ports.
    pub async fn listening_ports(&self) -> Result<Vec<u16>, NetError> {
        let mut ports: Vec<u16> = self
            .tcp_listeners()
            .await?
            .iter()
            .map(|l| l.addr.port())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Ok(ports)
    }
}

/// The namespace's addresses as the mechanisms need them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    /// Addresses on interfaces other than loopback (IPv6 link-local ones left out).
    pub local: Vec<IpAddr>,
    /// Gateways of the default routes (both families): the node side of the pod.
    pub gateways: Vec<IpAddr>,
}

/// One listening TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    /// The socket's inode (`socket:[INODE]` in `/proc/PID/fd`): which process owns it.
    pub inode: u64,
}

/// The socket inodes process `pid` holds open (to tell which listeners are a container's
/// own when its namespace is shared).
pub fn socket_inodes_of(pid: i32) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(ino) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse().ok())
        {
            out.push(ino);
        }
    }
    Ok(out)
}

/// An address as a socket reports it, with IPv4-mapped IPv6 addresses turned back into
/// IPv4 (a dual-stack listener sees kubelet's IPv4 address that way).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Reads the addresses and default gateways of the calling thread's namespace.
fn read_addresses(ino: u64) -> Result<Addresses, NetError> {
    let mut out = Addresses::default();
    let ifaddrs =
        nix::ifaddrs::getifaddrs().map_err(|e| NetError::io("list addresses", ino, e.into()))?;
    for ifa in ifaddrs {
        if ifa.interface_name == "lo" {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let ip = v6.ip();
            if ip.is_unicast_link_local() {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        if !ip.is_loopback() && !out.local.contains(&ip) {
            out.local.push(ip);
        }
    }
    let route = std::fs::read_to_string("/proc/thread-self/net/route")
        .map_err(|e| NetError::io("read the IPv4 routes", ino, e))?;
    out.gateways.extend(default_gateways_v4(&route));
    // No IPv6 in the kernel or the namespace: no IPv6 routes.
    if let Ok(route6) = std::fs::read_to_string("/proc/thread-self/net/ipv6_route") {
        out.gateways.extend(default_gateways_v6(&route6));
    }
    Ok(out)
}

/// Gateways of the default routes in `/proc/net/route` text.
fn default_gateways_v4(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        let (Ok(dest), Ok(gw), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[2], 16),
            u32::from_str_radix(f[7], 16),
        ) else {
            continue;
        };
        if dest == 0 && mask == 0 && gw != 0 {
            // The kernel prints the address in host byte order.
            let ip = IpAddr::V4(Ipv4Addr::from(gw.to_ne_bytes()));
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// Gateways of the default routes in `/proc/net/ipv6_route` text.
fn default_gateways_v6(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // dest dest_len src src_len next_hop metric refcnt use flags iface
        if f.len() < 10 || f[1] != "00" {
            continue;
        }
        let (Some(dest), Some(hop)) = (parse_hex_v6(f[0]), parse_hex_v6(f[4])) else {
            continue;
        };
        if dest.is_unspecified() && !hop.is_unspecified() {
            let ip = IpAddr::V6(hop);
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// A 32-digit hex IPv6 address as `/proc/net/ipv6_route` prints it (network order).
fn parse_hex_v6(s: &str) -> Option<Ipv6Addr> {
    if s.len() != 32 {
        return None;
    }
    u128::from_str_radix(s, 16).ok().map(Ipv6Addr::from)
}

/// Reads the listening TCP sockets of the calling thread's namespace.
fn read_listeners(ino: u64) -> Result<Vec<Listener>, NetError> {
    let tcp = std::fs::read_to_string("/proc/thread-self/net/tcp")
        .map_err(|e| NetError::io("read /proc/net/tcp", ino, e))?;
    let mut out = parse_proc_tcp(&tcp, false);
    if let Ok(tcp6) = std::fs::read_to_string("/proc/thread-self/net/tcp6") {
        out.extend(parse_proc_tcp(&tcp6, true));
    }
    Ok(out)
}

/// The listening sockets in `/proc/net/tcp` or `tcp6` text.
fn parse_proc_tcp(text: &str, v6: bool) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != LISTEN {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        let ip = if v6 {
            match parse_proc_v6(addr) {
                Some(ip) => IpAddr::V6(ip),
                None => continue,
            }
        } else {
            match u32::from_str_radix(addr, 16) {
                Ok(n) => IpAddr::V4(Ipv4Addr::from(n.to_ne_bytes())),
                Err(_) => continue,
            }
        };
        let Ok(inode) = f[9].parse() else { continue };
        out.push(Listener {
            addr: SocketAddr::new(ip, port),
            inode,
        });
    }
    out
}

/// An IPv6 address as `/proc/net/tcp6` prints it: four 32-bit words, each in host order.
fn parse_proc_v6(s: &str) -> Option<Ipv6Addr> {
    if s.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(4).enumerate() {
        let word = u32::from_str_radix(s.get(i * 8..i * 8 + 8)?, 16).ok()?;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Some(Ipv6Addr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_tcp_listeners_both_families() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
   1: 0200000A:0050 0300000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0\n";
        let got = parse_proc_tcp(v4, false);
        assert_eq!(
            got,
            vec![Listener {
                addr: "127.0.0.1:8080".parse().unwrap(),
                inode: 12345
            }]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000000000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0\n\
   1: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 778 1 0000000000000000 100 0 0 10 0\n";
        let got = parse_proc_tcp(v6, true);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].addr, "[::]:9090".parse().unwrap());
        assert_eq!(got[1].addr, "[::1]:8081".parse().unwrap());
        assert_eq!(got[1].inode, 778);
    }

    #[test]
    fn default_gateways() {
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0101580A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0001580A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            default_gateways_v4(route),
            vec!["10.88.1.1".parse::<IpAddr>().unwrap()]
        );
        let route6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        assert_eq!(
            default_gateways_v6(route6),
            vec!["fd00::1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let a: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(canonical(a), "10.1.2.3:80".parse().unwrap());
        let b: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(b), b);
    }
}
