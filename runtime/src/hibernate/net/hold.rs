//! Holding a sleeping container's connections in the kernel (NFQUEUE) until it is
//! restored, then letting every held packet through in order.
//!
//! # Rules
//!
//! `RA-HIB-HOLD-<tag>`, jumped to first from INPUT for TCP not on `lo`:
//!
//! 1. a connection to a shadow port (by its original destination port) is refused at
//!    once: `REJECT --reject-with tcp-reset`, never left hanging;
//! 2. connections the nat rules redirected to the probe responder are accepted;
//! 3. everything else is queued: `NFQUEUE --queue-num Q`, without `--queue-bypass`, so
//!    nothing reaches a dead port while the shim is away: fail-closed (a full queue or a
//!    dead shim drops packets, which clients retransmit; nothing is accepted into a port
//!    that would answer with a reset).
//!
//! `RA-HIB-HOLDLO-<tag>`, from INPUT for TCP on `lo`: clients inside the namespace (a
//! sidecar calling `localhost:PORT`). The shim's own packets ([`super::SHIM_MARK`]: the
//! relay) pass; shadow ports are refused as above; only packets to the app's ports are
//! queued (the rest of a pod keeps talking over `lo`).
//!
//! `RA-HIB-PROBE-<tag>` (nat, from PREROUTING): new connections from the node to app
//! ports are `REDIRECT`ed to the probe responder, which answers kubelet without a wake.
//!
//! The queue is bound before the rules go in, with a generous length and the packets'
//! first 128 bytes copied (IP and TCP headers: enough to tell a SYN or payload, its source
//! and port). The first held SYN or payload resolves [`Hold::wake`]: the wake cause.
//!
//! # Release
//!
//! After the restore, [`Hold::release`] gives every held packet the ACCEPT verdict in
//! the order they arrived (one batch verdict: the kernel re-injects them in queue order),
//! and from then on accepts each newly queued packet the moment it is read, while the
//! rules are removed; a final drain covers what was queued until the rules were gone.
//! Held SYNs reach the restored listener before the client's retransmission timer (1 s)
//! fires; held segments of established connections (keep-alive across the sleep) reach
//! the restored sockets. An accepted packet continues with the next netfilter hook, so
//! rules in INPUT after ours do not see the held packets.
//!
//! Queues are per network namespace in the kernel; the number comes from the tag and the
//! next one is taken when it is bound by someone else (`EPERM`/`EBUSY`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use netlink_packet_core::{DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    NetfilterSubsystem,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::activity::port_list;
use super::nfnl::{netlink_err, Batch, NfnlSocket};
use super::rules::{self, chain_name, families, Family, RuleSet, Table};
use super::{canonical, NetError, NetNs, SHIM_MARK};

/// Packets the kernel keeps queued at most (then it drops new ones: fail-closed).
pub const QUEUE_MAXLEN: u32 = 16_384;

/// Bytes of each packet copied to the shim: IP and TCP headers.
const COPY_RANGE: u32 = 128;

const QUEUE_BASE: u16 = 0x4000;
const QUEUE_SPAN: u16 = 0x3000;
const QUEUE_TRIES: usize = 64;

// nfnetlink_queue (include/uapi/linux/netfilter/nfnetlink_queue.h).
const NFNL_SUBSYS_QUEUE: u8 = 3;
const NFQNL_MSG_PACKET: u8 = 0;
const NFQNL_MSG_CONFIG: u8 = 2;
const NFQNL_MSG_VERDICT_BATCH: u8 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NFQA_CFG_F_GSO: u32 = 4;
const NF_ACCEPT: u32 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// What to hold, for one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldConfig {
    /// The app's ports: new connections from the node to them go to the responder.
    pub app_ports: Vec<u16>,
    /// Shadow ports (as in [`super::WatchConfig`]): refused at once while held.
    pub shadow: Vec<(u16, Option<u16>)>,
    /// The node's addresses (IPv4-mapped ones count as IPv4).
    pub node: Vec<IpAddr>,
    /// The probe responder's port in the namespace; `None`: nothing is redirected.
    pub responder_port: Option<u16>,
    /// Names this container's chains and picks its queue: the container's id.
    pub tag: String,
}

/// The first held packet that asks for the container: a SYN or a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeCause {
    /// Who sent it (IPv4-mapped addresses as IPv4).
    pub peer: SocketAddr,
    /// The container's port it went to.
    pub port: u16,
    /// A new connection (SYN) rather than data on an established one.
    pub syn: bool,
}

enum Cmd {
    /// Verdict everything held, and accept from now on; answers how many were held.
    Pass(oneshot::Sender<Result<usize, NetError>>),
    /// Verdict what is left, unbind, end; answers how many passed since `Pass`.
    Close(oneshot::Sender<Result<usize, NetError>>),
}

/// Connections held in the kernel.
pub struct Hold {
    ns: NetNs,
    queue: u16,
    chains: Vec<String>,
    cmds: mpsc::Sender<Cmd>,
    wake: watch::Receiver<Option<WakeCause>>,
    held: Arc<AtomicUsize>,
    released: bool,
}

impl Hold {
    /// Binds a queue in `ns` and puts the hold rules in place: from the moment this
    /// returns, no TCP packet from outside reaches a socket of the namespace but those
    /// for the responder.
    pub async fn engage(ns: &NetNs, cfg: &HoldConfig) -> Result<Hold, NetError> {
        let mut sock = NfnlSocket::open(ns)?;
        let queue = bind_queue(&mut sock, &cfg.tag).await?;
        let tag = rules::tag_of(&cfg.tag);
        let sets = rule_sets(cfg, &tag, queue);
        let mut chains: Vec<String> = Vec::new();
        for (_, set) in &sets {
            for c in set.chain_names() {
                if !chains.iter().any(|x| x == c) {
                    chains.push(c.to_string());
                }
            }
        }
        let (wake_tx, wake) = watch::channel(None);
        let held = Arc::new(AtomicUsize::new(0));
        let (cmds, rx) = mpsc::channel(4);
        let reader = Reader {
            sock,
            queue,
            ino: ns.ino(),
            last_id: None,
            verdicted: None,
            passing: false,
            passed: 0,
            wake: wake_tx,
            held: held.clone(),
        };
        tokio::spawn(reader.run(rx));
        let hold = Hold {
            ns: ns.clone(),
            queue,
            chains,
            cmds,
            wake,
            held,
            released: false,
        };
        if let Err(e) = rules::install(ns, &sets).await {
            let mut hold = hold;
            hold.released = true;
            let _ = hold.close().await;
            return Err(e);
        }
        info!(netns = ns.ino(), queue, "connections held");
        Ok(hold)
    }

    /// Resolves at the first held SYN or payload (at once if there was one already).
    /// Cancel-safe.
    pub async fn wake(&self) -> Result<WakeCause, NetError> {
        let mut rx = self.wake.clone();
        let cause = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| NetError::Stopped {
                what: "the hold's queue reader",
                ino: self.ns.ino(),
            })?;
        cause.ok_or(NetError::Stopped {
            what: "the hold's queue reader",
            ino: self.ns.ino(),
        })
    }

    /// How many packets are held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The NFQUEUE number in use.
    pub fn queue_num(&self) -> u16 {
        self.queue
    }

    /// The chains this hold installed.
    pub fn chains(&self) -> &[String] {
        &self.chains
    }

    /// Lets every held packet through in order, removes the rules, and returns how many
    /// packets were held.
    pub async fn release(mut self) -> Result<usize, NetError> {
        self.released = true;
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Pass(tx)).await?;
        let held = rx.await.map_err(|_| self.stopped())??;
        let removed = match rules::remove(&self.ns, &self.chains).await {
            Ok(_) => Ok(()),
            Err(first) => {
                debug!("remove the hold rules: {first}; once more");
                rules::remove(&self.ns, &self.chains).await.map(|_| ())
            }
        };
        if let Err(e) = removed {
            // The reader keeps accepting what the rules still queue: traffic flows.
            warn!(
                netns = self.ns.ino(),
                "hold rules stay (packets pass through the shim): {e}"
            );
            return Err(e);
        }
        let passed = self.close().await?;
        info!(netns = self.ns.ino(), held, passed, "connections released");
        Ok(held)
    }

    async fn close(&self) -> Result<usize, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Close(tx)).await?;
        rx.await.map_err(|_| self.stopped())?
    }

    async fn send(&self, cmd: Cmd) -> Result<(), NetError> {
        self.cmds.send(cmd).await.map_err(|_| self.stopped())
    }

    fn stopped(&self) -> NetError {
        NetError::Stopped {
            what: "the hold's queue reader",
            ino: self.ns.ino(),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Dropped without release: the reader ends with the command channel, the kernel
        // drops what was held (clients retransmit), and the rules go in the background
        // (left in place they would drop every TCP packet of the namespace).
        warn!(netns = self.ns.ino(), "hold dropped without release");
        let ns = self.ns.clone();
        let chains = std::mem::take(&mut self.chains);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = rules::remove(&ns, &chains).await {
                    warn!("remove the rules of a dropped hold: {e}");
                }
            });
        }
    }
}

/// The task that owns the queue socket.
struct Reader {
    sock: NfnlSocket,
    queue: u16,
    ino: u64,
    /// The newest packet id read.
    last_id: Option<u32>,
    /// The newest id given a verdict.
    verdicted: Option<u32>,
    passing: bool,
    passed: usize,
    wake: watch::Sender<Option<WakeCause>>,
    held: Arc<AtomicUsize>,
}

impl Reader {
    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        loop {
            tokio::select! {
                batch = self.sock.recv() => match batch {
                    Ok(b) => {
                        self.take(b);
                        if self.passing {
                            if let Err(e) = self.verdict_all(false).await {
                                warn!(netns = self.ino, "accept queued packets: {e}");
                            }
                        }
                    }
                    Err(e) => {
                        warn!(netns = self.ino, "read the hold queue: {e}");
                        return;
                    }
                },
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Pass(tx)) => {
                        let r = self.drain_and_verdict().await;
                        let held = self.held.load(Ordering::Relaxed);
                        self.passing = true;
                        let _ = tx.send(r.map(|_| held));
                    }
                    Some(Cmd::Close(tx)) => {
                        let before = self.passed;
                        let r = self.drain_and_verdict().await;
                        self.unbind().await;
                        let _ = tx.send(r.map(|_| self.passed - before));
                        return;
                    }
                    // The hold was dropped: closing the socket makes the kernel drop
                    // what is held.
                    None => return,
                },
            }
        }
    }

    /// Reads whatever is queued right now, then accepts everything read.
    async fn drain_and_verdict(&mut self) -> Result<(), NetError> {
        loop {
            match self.sock.recv_now() {
                Ok(Batch::Empty) => break,
                Ok(b) => self.take(b),
                Err(e) => return Err(netlink_err("read the hold queue", self.ino, e)),
            }
        }
        self.verdict_all(true).await
    }

    /// Records the packets of `batch`.
    fn take(&mut self, batch: Batch) {
        let Batch::Messages(msgs) = batch else {
            if let Batch::Overrun = batch {
                // The kernel could not tell us about some packets: it dropped them.
                warn!(
                    netns = self.ino,
                    "hold queue socket overran (packets dropped)"
                );
            }
            return;
        };
        for m in msgs {
            let Some(NetfilterMessage {
                inner:
                    NetfilterMessageInner::Other {
                        subsys: NetfilterSubsystem::Other(NFNL_SUBSYS_QUEUE),
                        message_type: NFQNL_MSG_PACKET,
                        attributes,
                    },
                ..
            }) = m.message
            else {
                continue;
            };
            let mut id = None;
            let mut hw_proto = 0u16;
            let mut payload = Vec::new();
            for a in &attributes {
                match a.kind() & NLA_TYPE_MASK {
                    NFQA_PACKET_HDR => {
                        let v = nla_value(a);
                        if v.len() >= 6 {
                            id = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                            hw_proto = u16::from_be_bytes([v[4], v[5]]);
                        }
                    }
                    NFQA_PAYLOAD => payload = nla_value(a),
                    _ => {}
                }
            }
            let Some(id) = id else { continue };
            self.last_id = Some(id);
            if self.passing {
                self.passed += 1;
                continue;
            }
            self.held.fetch_add(1, Ordering::Relaxed);
            let info = parse_tcp(&payload, hw_proto);
            let wakes = info.is_none_or(|p| p.syn || p.payload);
            if wakes && self.wake.borrow().is_none() {
                let cause = match info {
                    Some(p) => WakeCause {
                        peer: canonical(SocketAddr::new(p.src, p.src_port)),
                        port: p.dst_port,
                        syn: p.syn,
                    },
                    // Headers we could not read (IPv6 extension headers): still a wake.
                    None => WakeCause {
                        peer: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                        port: 0,
                        syn: false,
                    },
                };
                debug!(netns = self.ino, ?cause, "wake");
                let _ = self.wake.send(Some(cause));
            }
        }
    }

    /// Accepts every packet read and not yet accepted (one batch verdict: in order).
    async fn verdict_all(&mut self, ack: bool) -> Result<(), NetError> {
        let Some(last) = self.last_id else {
            return Ok(());
        };
        if self.verdicted == Some(last) {
            return Ok(());
        }
        let mut hdr = Vec::with_capacity(8);
        hdr.extend_from_slice(&NF_ACCEPT.to_be_bytes());
        hdr.extend_from_slice(&last.to_be_bytes());
        let msg = queue_message(
            NFQNL_MSG_VERDICT_BATCH,
            self.queue,
            vec![DefaultNla::new(NFQA_VERDICT_HDR, hdr)],
        );
        self.sock
            .request(msg, ack)
            .await
            .map_err(|e| netlink_err("accept held packets", self.ino, e))?;
        self.verdicted = Some(last);
        Ok(())
    }

    async fn unbind(&mut self) {
        let msg = queue_message(
            NFQNL_MSG_CONFIG,
            self.queue,
            vec![DefaultNla::new(
                NFQA_CFG_CMD,
                vec![NFQNL_CFG_CMD_UNBIND, 0, 0, 0],
            )],
        );
        if let Err(e) = self.sock.request(msg, true).await {
            debug!(queue = self.queue, "unbind the hold queue: {e}");
        }
    }
}

/// A queue message of `kind` for queue `queue`.
fn queue_message(
    kind: u8,
    queue: u16,
    attributes: Vec<DefaultNla>,
) -> NetlinkMessage<NetfilterMessage> {
    let inner = NetfilterMessageInner::Other {
        subsys: NetfilterSubsystem::Other(NFNL_SUBSYS_QUEUE),
        message_type: kind,
        attributes,
    };
    let msg = NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, queue),
        inner,
    );
    NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg))
}

fn nla_value(nla: &DefaultNla) -> Vec<u8> {
    let mut v = vec![0; nla.value_len()];
    nla.emit_value(&mut v);
    v
}

/// Binds a free queue, starting from the tag's, and configures it.
async fn bind_queue(sock: &mut NfnlSocket, tag: &str) -> Result<u16, NetError> {
    let start = (rules::fnv1a(tag.as_bytes()) % u32::from(QUEUE_SPAN)) as u16;
    for i in 0..QUEUE_TRIES as u16 {
        let queue = QUEUE_BASE + (start + i) % QUEUE_SPAN;
        let mut params = Vec::with_capacity(5);
        params.extend_from_slice(&COPY_RANGE.to_be_bytes());
        params.push(NFQNL_COPY_PACKET);
        let msg = queue_message(
            NFQNL_MSG_CONFIG,
            queue,
            vec![
                DefaultNla::new(NFQA_CFG_CMD, vec![NFQNL_CFG_CMD_BIND, 0, 0, 0]),
                DefaultNla::new(NFQA_CFG_PARAMS, params),
                DefaultNla::new(NFQA_CFG_QUEUE_MAXLEN, QUEUE_MAXLEN.to_be_bytes().to_vec()),
                // Whole GSO packets (we never change them); never fail open.
                DefaultNla::new(
                    NFQA_CFG_MASK,
                    (NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN)
                        .to_be_bytes()
                        .to_vec(),
                ),
                DefaultNla::new(NFQA_CFG_FLAGS, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
            ],
        );
        match sock.request(msg, true).await {
            Ok(()) => return Ok(queue),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EBUSY)) => continue,
            Err(e) => return Err(netlink_err("bind an NFQUEUE", sock.ino(), e)),
        }
    }
    Err(NetError::NoFreeId {
        what: "NFQUEUE number",
        ino: sock.ino(),
        tried: QUEUE_TRIES,
    })
}

/// The rules of `cfg` for every family of the host, queueing to `queue`.
pub fn rule_sets(cfg: &HoldConfig, tag: &str, queue: u16) -> Vec<(Family, RuleSet)> {
    let hold = chain_name("HOLD", tag);
    let hold_lo = chain_name("HOLDLO", tag);
    let probe = chain_name("PROBE", tag);
    let mut out = Vec::new();
    for family in families() {
        let mut rules = Vec::new();
        for (port, _) in &cfg.shadow {
            rules.push(format!(
                "-p tcp -m conntrack --ctorigdstport {port} -j REJECT --reject-with tcp-reset"
            ));
        }
        if let Some(r) = cfg.responder_port {
            rules.push(format!(
                "-p tcp -m tcp --dport {r} -m conntrack --ctstate DNAT -j ACCEPT"
            ));
        }
        rules.push(format!("-p tcp -j NFQUEUE --queue-num {queue}"));
        let mut set = RuleSet::new();
        set.chain(Table::Filter, &hold, rules).jump(
            Table::Filter,
            "INPUT",
            format!("! -i lo -p tcp -j {hold}"),
        );
        if !cfg.app_ports.is_empty() {
            let mut lo_rules = vec![format!("-m mark --mark {SHIM_MARK:#x} -j RETURN")];
            for (port, _) in &cfg.shadow {
                lo_rules.push(format!(
                    "-p tcp -m conntrack --ctorigdstport {port} -j REJECT --reject-with tcp-reset"
                ));
            }
            for chunk in cfg.app_ports.chunks(15) {
                lo_rules.push(format!(
                    "-p tcp -m multiport --dports {} -j NFQUEUE --queue-num {queue}",
                    port_list(chunk)
                ));
            }
            set.chain(Table::Filter, &hold_lo, lo_rules).jump(
                Table::Filter,
                "INPUT",
                format!("-i lo -p tcp -j {hold_lo}"),
            );
        }
        if let Some(r) = cfg.responder_port {
            let mut redirects = Vec::new();
            for n in cfg.node.iter().map(IpAddr::to_canonical) {
                if Family::of(&n) != *family {
                    continue;
                }
                for chunk in cfg.app_ports.chunks(15) {
                    redirects.push(format!(
                        "-s {n} -p tcp -m multiport --dports {} -j REDIRECT --to-ports {r}",
                        port_list(chunk)
                    ));
                }
            }
            if !redirects.is_empty() {
                set.chain(Table::Nat, &probe, redirects).jump(
                    Table::Nat,
                    "PREROUTING",
                    format!("-p tcp -j {probe}"),
                );
            }
        }
        out.push((*family, set));
    }
    out
}

/// What the held packet says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpInfo {
    src: IpAddr,
    src_port: u16,
    dst_port: u16,
    syn: bool,
    payload: bool,
}

/// Reads the IP and TCP headers at the start of a held packet.
fn parse_tcp(p: &[u8], hw_proto: u16) -> Option<TcpInfo> {
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    let version = p.first()? >> 4;
    let (src, l4, l4_len) = match (hw_proto, version) {
        (ETH_P_IP, _) | (0, 4) => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            if *p.get(9)? != 6 || ihl < 20 {
                return None;
            }
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            // 0: a GSO packet larger than the field holds.
            let len = if total == 0 {
                None
            } else {
                total.checked_sub(ihl)
            };
            (IpAddr::V4(src), ihl, len)
        }
        (ETH_P_IPV6, _) | (0, 6) => {
            let plen = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            let mut next = *p.get(6)?;
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let mut off = 40;
            // Hop-by-hop, routing and destination options headers, a few at most.
            for _ in 0..4 {
                if next == 6 {
                    break;
                }
                if !matches!(next, 0 | 43 | 60) {
                    return None;
                }
                next = *p.get(off)?;
                off += (usize::from(*p.get(off + 1)?) + 1) * 8;
            }
            if next != 6 {
                return None;
            }
            let len = if plen == 0 {
                None
            } else {
                plen.checked_sub(off - 40)
            };
            (IpAddr::V6(Ipv6Addr::from(src)), off, len)
        }
        _ => return None,
    };
    let tcp = p.get(l4..l4 + 14)?;
    let src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let doff = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    let syn = flags & 0x02 != 0 && flags & 0x10 == 0;
    let payload = match l4_len {
        Some(len) => len > doff,
        None => true,
    };
    Some(TcpInfo {
        src,
        src_port,
        dst_port,
        syn,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_packet(flags: u8, payload: usize) -> Vec<u8> {
        let total = 20 + 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 7]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&8080u16.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p
    }

    #[test]
    fn tcp_headers_v4() {
        let syn = parse_tcp(&v4_packet(0x02, 0), 0x0800).unwrap();
        assert!(syn.syn && !syn.payload);
        assert_eq!(syn.src, "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!((syn.src_port, syn.dst_port), (40000, 8080));
        let ack = parse_tcp(&v4_packet(0x10, 0), 0x0800).unwrap();
        assert!(!ack.syn && !ack.payload);
        let data = parse_tcp(&v4_packet(0x18, 100)[..COPY_RANGE as usize], 0x0800).unwrap();
        assert!(!data.syn && data.payload);
        let synack = parse_tcp(&v4_packet(0x12, 0), 0x0800).unwrap();
        assert!(!synack.syn);
        assert!(parse_tcp(&[0x45, 0, 0], 0x0800).is_none());
    }

    #[test]
    fn tcp_headers_v6() {
        let mut p = vec![0u8; 40 + 20 + 5];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&25u16.to_be_bytes());
        p[6] = 6;
        p[8..24].copy_from_slice(&"fd00::7".parse::<Ipv6Addr>().unwrap().octets());
        p[42..44].copy_from_slice(&443u16.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = 0x18;
        let info = parse_tcp(&p, 0x86dd).unwrap();
        assert!(info.payload && !info.syn);
        assert_eq!(info.dst_port, 443);
        assert_eq!(info.src, "fd00::7".parse::<IpAddr>().unwrap());
        // An extension header we do not walk: unknown (a wake, to be safe).
        p[6] = 44;
        assert!(parse_tcp(&p, 0x86dd).is_none());
    }

    #[test]
    fn hold_rules() {
        let cfg = HoldConfig {
            app_ports: vec![8080, 9090],
            shadow: vec![(9100, None), (19090, Some(8080))],
            node: vec![
                "::ffff:10.0.0.1".parse().unwrap(),
                "fd00::1".parse().unwrap(),
            ],
            responder_port: Some(41000),
            tag: "c".into(),
        };
        let sets = rule_sets(&cfg, "t", 0x4001);
        let text = sets[0].1.install_text(&rules::Saved::default());
        let reject = text
            .find("--ctorigdstport 9100 -j REJECT --reject-with tcp-reset")
            .unwrap();
        let reject2 = text.find("--ctorigdstport 19090 -j REJECT").unwrap();
        let accept = text
            .find("--dport 41000 -m conntrack --ctstate DNAT -j ACCEPT")
            .unwrap();
        let queue = text.find("-j NFQUEUE --queue-num 16385").unwrap();
        assert!(
            reject < accept && reject2 < accept && accept < queue,
            "{text}"
        );
        assert!(!text.contains("queue-bypass"));
        assert!(text.contains("-I INPUT 1 ! -i lo -p tcp -j RA-HIB-HOLD-t\n"));
        assert!(text.contains(
            "-A RA-HIB-PROBE-t -s 10.0.0.1 -p tcp -m multiport --dports 8080,9090 -j REDIRECT --to-ports 41000\n"
        ));
        assert!(text.contains("-I PREROUTING 1 -p tcp -j RA-HIB-PROBE-t\n"));
        // Loopback: the shim's packets pass, shadow ports are refused, app ports queued.
        assert!(
            text.contains("-I INPUT 2 -i lo -p tcp -j RA-HIB-HOLDLO-t\n"),
            "{text}"
        );
        let lo_pass = text
            .find("-A RA-HIB-HOLDLO-t -m mark --mark 0x52414842 -j RETURN\n")
            .unwrap();
        let lo_reject = text
            .find("-A RA-HIB-HOLDLO-t -p tcp -m conntrack --ctorigdstport 9100 -j REJECT")
            .unwrap();
        let lo_queue = text
            .find("-A RA-HIB-HOLDLO-t -p tcp -m multiport --dports 8080,9090 -j NFQUEUE --queue-num 16385\n")
            .unwrap();
        assert!(lo_pass < lo_reject && lo_reject < lo_queue, "{text}");
        if let Some((_, v6)) = sets.get(1) {
            let t6 = v6.install_text(&rules::Saved::default());
            assert!(t6.contains("-s fd00::1 -p tcp"));
            assert!(!t6.contains("10.0.0.1"));
        }
        // No responder: no redirect, no accept.
        let cfg = HoldConfig {
            responder_port: None,
            ..cfg
        };
        let text = rule_sets(&cfg, "t", 1)[0]
            .1
            .install_text(&rules::Saved::default());
        assert!(!text.contains("REDIRECT") && !text.contains("DNAT"));
    }
}
