//! The activity source of RUNNING and FROZEN: netfilter logs the packets that matter to
//! nfnetlink_log groups of ours, and the shim reads them from a socket made inside the
//! namespace.
//!
//! # Rules (`RA-HIB-ACT-<tag>`, from INPUT for TCP not on `lo`, first; `lo` below)
//!
//! 1. a packet with neither SYN nor PSH set (a pure ACK, most of a busy connection's
//!    traffic) returns at once;
//! 2. a shadow port (by the connection's original destination port, so a `SHADOW:APP`
//!    pair redirected to APP is still known as SHADOW), a packet from the node (the pod's
//!    gateway: kubelet), and a payload carrying `User-Agent: kube-probe/` in its first
//!    bytes (`-m string --algo bm`) go to `RA-HIB-TOUCH-<tag>` (`-g`: they never reach the
//!    rules below), which logs them to the touch group: traffic that must be answered
//!    (a FROZEN container is thawed for a moment) but does not count;
//! 3. a SYN, and a payload (`PSH`), to a wake port is logged to the activity group.
//!
//! Every logging rule is rate-limited in the kernel (`-m limit --limit 10/s
//! --limit-burst 1`): the first packet after 100 ms of quiet always passes, so the driver
//! learns of activity within one packet of it, and a busy server costs a few rule
//! evaluations per SYN or PSH packet and no wake-up of the shim beyond 10 per second.
//!
//! # Loopback (`RA-HIB-LO-<tag>`, from INPUT for TCP on `lo`)
//!
//! The shim's own packets ([`super::SHIM_MARK`]) return first; then the same touch rules
//! for shadow ports and probes, and a SYN or payload to one of the app's ports counts:
//! the wake ports, or (every port by default) the ports the namespace listens on when the
//! watch starts. Other traffic on `lo` (the rest of a pod talking among itself, the
//! app's own calls to a sidecar) counts nowhere.
//!
//! `SHADOW:APP` pairs also get a nat `REDIRECT` (`RA-HIB-SHADOW-<tag>`, from PREROUTING,
//! and from OUTPUT for the pod's own `lo` traffic) so that SHADOW reaches the app's APP
//! port.
//!
//! # Reading
//!
//! One nfnetlink_log socket, made in the namespace, is bound to both groups (each
//! message names its group); the kernel sends each logged packet at once (queue
//! threshold 1) and nothing else, so an idle watch sleeps in the tokio reactor and costs
//! no CPU. A connection opened and closed between two reads is not missed: its SYN's
//! message waits in the socket. If the socket overflowed (`ENOBUFS`, only if the shim did
//! not read for a long time) the lost messages count as activity, the safe side.
//!
//! Groups are per network namespace in the kernel (nfnetlink_log's instances live in the
//! namespace). They are picked from the tag; one already bound by another watch in the
//! same namespace (`EBUSY`/`EPERM`) makes the watch take the next pair.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;

use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, ConfigNla, Timeout, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessageInner, NetfilterProtoFamily};
use tracing::{debug, info, warn};

use super::nfnl::{netlink_err, Batch, NfnlSocket};
use super::rules::{self, chain_name, families, Family, RuleSet, Table};
use super::{NetError, NetNs, SHIM_MARK};

/// The probe marker looked for in payloads.
pub const PROBE_USER_AGENT: &str = "User-Agent: kube-probe/";

/// How far into a packet (from its IP header) the probe marker is looked for: kubelet
/// sends the request line, `Host` and then `User-Agent`, well within this.
pub const PROBE_SCAN_BYTES: u32 = 1200;

/// The kernel's rate limit of each logging rule.
pub const LOG_LIMIT: &str = "-m limit --limit 10/sec --limit-burst 1";

/// multiport takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// Group numbers are tried from this range (pairs: activity, touch).
const GROUP_BASE: u16 = 0x4000;
const GROUP_PAIRS: u16 = 0x2000;
const GROUP_TRIES: usize = 64;

/// What the watch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A new connection or payload on a wake port: resets the idle clock, wakes.
    Activity,
    /// Traffic that must be answered but does not count (a probe, a shadow port, the
    /// node).
    Touch,
}

/// What counts, for one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchConfig {
    /// Ports whose traffic counts; `None`: every TCP port.
    pub wake_ports: Option<Vec<u16>>,
    /// Ports that never count: `(PORT, None)` the app's own, or `(SHADOW, Some(APP))`
    /// redirected to the app's APP port.
    pub shadow: Vec<(u16, Option<u16>)>,
    /// The node's addresses (the pod's gateway): their traffic is a touch. IPv4-mapped
    /// IPv6 addresses count as IPv4.
    pub node: Vec<IpAddr>,
    /// Names this container's chains and picks its groups: the container's id.
    pub tag: String,
}

/// The activity watch of one container.
pub struct ActivityWatch {
    ns: NetNs,
    sock: NfnlSocket,
    activity_group: u16,
    touch_group: u16,
    chains: Vec<String>,
    pending: VecDeque<Signal>,
    stopped: bool,
}

impl ActivityWatch {
    /// Binds the log groups in `ns` and installs the rules of `cfg`.
    pub async fn start(ns: &NetNs, cfg: &WatchConfig) -> Result<ActivityWatch, NetError> {
        let mut sock = NfnlSocket::open(ns)?;
        let (activity_group, touch_group) = bind_groups(&mut sock, &cfg.tag).await?;
        let tag = rules::tag_of(&cfg.tag);
        let lo_ports = match &cfg.wake_ports {
            Some(ports) => ports.clone(),
            None => match ns.listening_ports().await {
                Ok(ports) => ports,
                Err(e) => {
                    unbind(&mut sock, &[activity_group, touch_group]).await;
                    return Err(e);
                }
            },
        };
        let sets = rule_sets(cfg, &tag, activity_group, touch_group, &lo_ports);
        let mut chains: Vec<String> = Vec::new();
        for (_, set) in &sets {
            for c in set.chain_names() {
                if !chains.iter().any(|x| x == c) {
                    chains.push(c.to_string());
                }
            }
        }
        if let Err(e) = rules::install(ns, &sets).await {
            unbind(&mut sock, &[activity_group, touch_group]).await;
            return Err(e);
        }
        info!(
            netns = ns.ino(),
            activity_group, touch_group, "activity watch started"
        );
        Ok(ActivityWatch {
            ns: ns.clone(),
            sock,
            activity_group,
            touch_group,
            chains,
            pending: VecDeque::new(),
            stopped: false,
        })
    }

    /// The next signal. Cancel-safe: a signal read is kept until a call returns it.
    pub async fn next(&mut self) -> Result<Signal, NetError> {
        loop {
            if let Some(s) = self.pending.pop_front() {
                return Ok(s);
            }
            let batch = self
                .sock
                .recv()
                .await
                .map_err(|e| netlink_err("read nfnetlink_log", self.ns.ino(), e))?;
            self.take(batch);
        }
    }

    /// A signal that is there already, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Signal>, NetError> {
        if self.pending.is_empty() {
            let batch = self
                .sock
                .recv_now()
                .map_err(|e| netlink_err("read nfnetlink_log", self.ns.ino(), e))?;
            self.take(batch);
        }
        Ok(self.pending.pop_front())
    }

    fn take(&mut self, batch: Batch) {
        let (mut activity, mut touch) = (false, false);
        match batch {
            Batch::Messages(msgs) => {
                for m in msgs {
                    let is_packet = match &m.message {
                        Some(msg) => matches!(
                            msg.inner,
                            NetfilterMessageInner::ULog(ULogMessage::Packet(_))
                        ),
                        // Unparsed: our groups only ever send packets.
                        None => true,
                    };
                    if !is_packet {
                        continue;
                    }
                    if m.res_id == self.activity_group {
                        activity = true;
                    } else if m.res_id == self.touch_group {
                        touch = true;
                    }
                }
            }
            Batch::Overrun => {
                warn!(
                    netns = self.ns.ino(),
                    "nfnetlink_log overran: counted as activity"
                );
                activity = true;
            }
            Batch::Empty => {}
        }
        if activity {
            self.pending.push_back(Signal::Activity);
        }
        if touch {
            self.pending.push_back(Signal::Touch);
        }
    }

    /// The (activity, touch) groups in use.
    pub fn groups(&self) -> (u16, u16) {
        (self.activity_group, self.touch_group)
    }

    /// The chains this watch installed.
    pub fn chains(&self) -> &[String] {
        &self.chains
    }

    /// Removes the rules and unbinds the groups.
    pub async fn stop(mut self) -> Result<(), NetError> {
        self.stopped = true;
        let result = rules::remove(&self.ns, &self.chains).await.map(|_| ());
        unbind(&mut self.sock, &[self.activity_group, self.touch_group]).await;
        debug!(netns = self.ns.ino(), "activity watch stopped");
        result
    }
}

impl Drop for ActivityWatch {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        // Dropped without stop(): take the rules out in the background (they are
        // harmless, but nobody reads their logs any more).
        warn!(netns = self.ns.ino(), "activity watch dropped without stop");
        let ns = self.ns.clone();
        let chains = std::mem::take(&mut self.chains);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = rules::remove(&ns, &chains).await {
                    warn!("remove the rules of a dropped activity watch: {e}");
                }
            });
        }
    }
}

/// Binds a free pair of groups, starting from the tag's.
async fn bind_groups(sock: &mut NfnlSocket, tag: &str) -> Result<(u16, u16), NetError> {
    let start = (rules::fnv1a(tag.as_bytes()) % u32::from(GROUP_PAIRS)) as u16;
    for i in 0..GROUP_TRIES as u16 {
        let pair = (start + i) % GROUP_PAIRS;
        let a = GROUP_BASE + pair * 2;
        let t = a + 1;
        match bind_group(sock, a).await {
            Ok(()) => {}
            Err(e) if taken(&e) => continue,
            Err(e) => return Err(netlink_err("bind an nfnetlink_log group", sock.ino(), e)),
        }
        match bind_group(sock, t).await {
            Ok(()) => return Ok((a, t)),
            Err(e) => {
                unbind(sock, &[a]).await;
                if taken(&e) {
                    continue;
                }
                return Err(netlink_err("bind an nfnetlink_log group", sock.ino(), e));
            }
        }
    }
    Err(NetError::NoFreeId {
        what: "nfnetlink_log group",
        ino: sock.ino(),
        tried: GROUP_TRIES,
    })
}

/// Another socket has the group (EPERM), or this one does already (EBUSY).
fn taken(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EBUSY))
}

async fn bind_group(sock: &mut NfnlSocket, group: u16) -> io::Result<()> {
    let msg = config_request(
        NetfilterProtoFamily::Unspec,
        group,
        vec![
            ConfigCmd::Bind.into(),
            // Metadata only: which group is all we need.
            ConfigMode::META.into(),
            // Send each message at once (the default waits for 100 or a second).
            ConfigNla::QThresh(1),
            Timeout::new(1).into(),
        ],
    );
    sock.request(msg, true).await
}

async fn unbind(sock: &mut NfnlSocket, groups: &[u16]) {
    for g in groups {
        let msg = config_request(
            NetfilterProtoFamily::Unspec,
            *g,
            vec![ConfigCmd::Unbind.into()],
        );
        if let Err(e) = sock.request(msg, true).await {
            debug!(group = g, "unbind nfnetlink_log group: {e}");
        }
    }
}

/// The rules of `cfg` for every family of the host.
pub fn rule_sets(
    cfg: &WatchConfig,
    tag: &str,
    activity_group: u16,
    touch_group: u16,
    lo_ports: &[u16],
) -> Vec<(Family, RuleSet)> {
    let act = chain_name("ACT", tag);
    let lo = chain_name("LO", tag);
    let touch = chain_name("TOUCH", tag);
    let shadow = chain_name("SHADOW", tag);
    let log = |group: u16| format!("{LOG_LIMIT} -j NFLOG --nflog-group {group}");
    let mut out = Vec::new();
    for family in families() {
        let mut act_rules = vec!["-p tcp --tcp-flags SYN,PSH NONE -j RETURN".to_string()];
        for (port, _) in &cfg.shadow {
            act_rules.push(format!(
                "-p tcp -m conntrack --ctorigdstport {port} -g {touch}"
            ));
        }
        for n in cfg.node.iter().map(IpAddr::to_canonical) {
            if Family::of(&n) == *family {
                act_rules.push(format!("-s {n} -p tcp -g {touch}"));
            }
        }
        act_rules.push(format!(
            "-p tcp --tcp-flags PSH PSH -m string --string \"{PROBE_USER_AGENT}\" --algo bm \
             --to {PROBE_SCAN_BYTES} -g {touch}"
        ));
        match &cfg.wake_ports {
            None => {
                act_rules.push(format!("-p tcp --syn {}", log(activity_group)));
                act_rules.push(format!(
                    "-p tcp --tcp-flags PSH PSH {}",
                    log(activity_group)
                ));
            }
            Some(ports) => {
                for chunk in ports.chunks(MULTIPORT_MAX) {
                    let list = port_list(chunk);
                    act_rules.push(format!(
                        "-p tcp --syn -m multiport --dports {list} {}",
                        log(activity_group)
                    ));
                    act_rules.push(format!(
                        "-p tcp --tcp-flags PSH PSH -m multiport --dports {list} {}",
                        log(activity_group)
                    ));
                }
            }
        }
        let mut set = RuleSet::new();
        set.chain(Table::Filter, &act, act_rules)
            .chain(
                Table::Filter,
                &touch,
                vec![format!("-p tcp {}", log(touch_group))],
            )
            .jump(Table::Filter, "INPUT", format!("! -i lo -p tcp -j {act}"));
        if !lo_ports.is_empty() {
            let mut lo_rules = vec![
                format!("-m mark --mark {SHIM_MARK:#x} -j RETURN"),
                "-p tcp --tcp-flags SYN,PSH NONE -j RETURN".to_string(),
            ];
            for (port, _) in &cfg.shadow {
                lo_rules.push(format!(
                    "-p tcp -m conntrack --ctorigdstport {port} -g {touch}"
                ));
            }
            lo_rules.push(format!(
                "-p tcp --tcp-flags PSH PSH -m string --string \"{PROBE_USER_AGENT}\" --algo bm \
                 --to {PROBE_SCAN_BYTES} -g {touch}"
            ));
            for chunk in lo_ports.chunks(MULTIPORT_MAX) {
                let list = port_list(chunk);
                lo_rules.push(format!(
                    "-p tcp --syn -m multiport --dports {list} {}",
                    log(activity_group)
                ));
                lo_rules.push(format!(
                    "-p tcp --tcp-flags PSH PSH -m multiport --dports {list} {}",
                    log(activity_group)
                ));
            }
            set.chain(Table::Filter, &lo, lo_rules).jump(
                Table::Filter,
                "INPUT",
                format!("-i lo -p tcp -j {lo}"),
            );
        }
        let redirects: Vec<String> = cfg
            .shadow
            .iter()
            .filter_map(|(s, app)| {
                app.map(|a| format!("-p tcp -m tcp --dport {s} -j REDIRECT --to-ports {a}"))
            })
            .collect();
        if !redirects.is_empty() {
            set.chain(Table::Nat, &shadow, redirects)
                .jump(Table::Nat, "PREROUTING", format!("-p tcp -j {shadow}"))
                .jump(Table::Nat, "OUTPUT", format!("-o lo -p tcp -j {shadow}"));
        }
        out.push((*family, set));
    }
    out
}

/// `80,8080,...` for multiport.
pub(crate) fn port_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_of_a_config() {
        let cfg = WatchConfig {
            wake_ports: Some((8000..8020).collect()),
            shadow: vec![(9100, None), (19090, Some(8080))],
            node: vec![
                "10.1.0.1".parse().unwrap(),
                "::ffff:10.1.0.9".parse().unwrap(),
                "fd00::1".parse().unwrap(),
            ],
            tag: "c1".into(),
        };
        let sets = rule_sets(&cfg, "t", 100, 101, &[8080]);
        let (family, v4) = &sets[0];
        assert_eq!(*family, Family::V4);
        let text = v4.install_text(&rules::Saved::default());
        // Order: fast path, exclusions, counting.
        let lines: Vec<&str> = text.lines().collect();
        let pos = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} not in\n{text}"))
        };
        assert!(pos("SYN,PSH NONE -j RETURN") < pos("--ctorigdstport 9100 -g RA-HIB-TOUCH-t"));
        assert!(pos("--ctorigdstport 19090") < pos("-s 10.1.0.1 -p tcp -g"));
        assert!(pos("-s 10.1.0.9 -p tcp -g") < pos("kube-probe/"));
        assert!(pos("kube-probe/") < pos("--syn -m multiport --dports 8000,"));
        assert!(!text.contains("fd00::1"), "an IPv6 node in IPv4 rules");
        // 20 ports: two multiport rules each for SYN and payload.
        let act_rules: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A RA-HIB-ACT-t "))
            .collect();
        assert_eq!(
            act_rules
                .iter()
                .filter(|l| l.contains("--nflog-group 100"))
                .count(),
            4
        );
        // Loopback: the shim's packets pass first, then only the app's ports count.
        assert!(
            text.contains(
                "-I INPUT 2 -i lo -p tcp -j RA-HIB-LO-t
"
            ),
            "{text}"
        );
        assert!(
            pos("-A RA-HIB-LO-t -m mark --mark 0x52414842 -j RETURN")
                < pos("-A RA-HIB-LO-t -p tcp --syn")
        );
        assert!(text.contains("-A RA-HIB-LO-t -p tcp --syn -m multiport --dports 8080 -m limit"));
        assert!(text.contains(
            "-A RA-HIB-LO-t -p tcp -m conntrack --ctorigdstport 9100 -g RA-HIB-TOUCH-t
"
        ));
        assert_eq!(text.matches("-A RA-HIB-LO-t ").count(), 7, "{text}");
        assert_eq!(text.matches("--nflog-group 101").count(), 1);
        assert!(text.contains("-A RA-HIB-TOUCH-t -p tcp -m limit --limit 10/sec --limit-burst 1 -j NFLOG --nflog-group 101\n"));
        assert!(text.contains("-I INPUT 1 ! -i lo -p tcp -j RA-HIB-ACT-t\n"));
        assert!(text.contains("*nat\n"));
        assert!(text.contains("--dport 19090 -j REDIRECT --to-ports 8080"));
        assert!(!text.contains("--dport 9100 -j REDIRECT"));
        if let Some((_, v6)) = sets.get(1) {
            let text6 = v6.install_text(&rules::Saved::default());
            assert!(text6.contains("-s fd00::1 -p tcp -g"));
            assert!(!text6.contains("10.1.0.1"));
        }
    }

    #[test]
    fn every_port_when_none_given() {
        let cfg = WatchConfig::default();
        let sets = rule_sets(&cfg, "t", 1, 2, &[]);
        let text = sets[0].1.install_text(&rules::Saved::default());
        assert!(text.contains("-p tcp --syn -m limit"));
        assert!(!text.contains("multiport"));
        assert!(!text.contains("*nat"));
    }
}
