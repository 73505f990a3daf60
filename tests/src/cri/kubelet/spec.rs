//! The kubelet's view of pods and containers: the spec fields that reach the CRI, and the
//! kubelet's arithmetic on them (QoS class, CPU shares and quota, oom_score_adj, default
//! tags, uids). [`super::Kubelet`] turns them into CRI messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cri::api::{self, security_profile};

/// The kubelet's defaults.
pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
pub const DEFAULT_GRACE_PERIOD: i64 = 30;
/// The kubelet never stops a container with less than this grace period.
pub const MINIMUM_GRACE_PERIOD: i64 = 2;
/// CFS period the kubelet uses.
pub const CPU_PERIOD: i64 = 100_000;

/// `securitycontext.defaultMaskedPaths` (kubelet), used unless procMount is Unmasked.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// `securitycontext.defaultReadonlyPaths` (kubelet).
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Label and annotation keys.
pub mod keys {
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    pub const CONTAINER_HASH: &str = "io.kubernetes.container.hash";
    pub const CONTAINER_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
    pub const TERMINATION_MESSAGE_PATH: &str = "io.kubernetes.container.terminationMessagePath";
    pub const TERMINATION_MESSAGE_POLICY: &str = "io.kubernetes.container.terminationMessagePolicy";
    pub const TERMINATION_GRACE_PERIOD: &str = "io.kubernetes.pod.terminationGracePeriod";
    pub const CONFIG_SEEN: &str = "kubernetes.io/config.seen";
    pub const CONFIG_SOURCE: &str = "kubernetes.io/config.source";
}

/// DNS settings for the sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl DnsConfig {
    /// What `dnsPolicy: ClusterFirst` gives a pod in `namespace`: the cluster's search path and
    /// `ndots:5` (servers: the cluster DNS service addresses the caller passes).
    pub fn cluster_first(namespace: &str, cluster_domain: &str, servers: &[&str]) -> DnsConfig {
        DnsConfig {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            searches: vec![
                format!("{namespace}.svc.{cluster_domain}"),
                format!("svc.{cluster_domain}"),
                cluster_domain.to_string(),
            ],
            options: vec!["ndots:5".into()],
        }
    }

    /// The CRI message.
    pub fn to_api(&self) -> api::DnsConfig {
        api::DnsConfig {
            servers: self.servers.clone(),
            searches: self.searches.clone(),
            options: self.options.clone(),
        }
    }
}

/// Seccomp profile kinds the kubelet sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seccomp {
    /// The kubelet's default (`seccompDefault: false`).
    Unconfined,
    RuntimeDefault,
    Localhost(String),
}

impl Seccomp {
    /// The CRI message.
    pub fn to_api(&self) -> api::SecurityProfile {
        let (t, r) = match self {
            Seccomp::Unconfined => (security_profile::ProfileType::Unconfined, String::new()),
            Seccomp::RuntimeDefault => {
                (security_profile::ProfileType::RuntimeDefault, String::new())
            }
            Seccomp::Localhost(p) => (security_profile::ProfileType::Localhost, p.clone()),
        };
        api::SecurityProfile {
            profile_type: t as i32,
            localhost_ref: r,
        }
    }
}

/// A pod as the kubelet sees it (the parts that reach the CRI).
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// Sandbox attempt (0 for the first sandbox of the pod).
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub host_network: bool,
    pub host_pid: bool,
    pub host_ipc: bool,
    /// `shareProcessNamespace`: pid namespace POD instead of CONTAINER.
    pub share_process_namespace: bool,
    /// `spec.hostname`; the pod name when `None` (ignored for host-network pods).
    pub hostname: Option<String>,
    pub dns: DnsConfig,
    pub port_mappings: Vec<api::PortMapping>,
    /// e.g. `/kubepods/besteffort/pod<uid>` (cgroupfs driver).
    pub cgroup_parent: String,
    pub sysctls: BTreeMap<String, String>,
    /// Whether any container of the pod is privileged.
    pub privileged: bool,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub supplemental_groups: Vec<i64>,
    pub seccomp: Seccomp,
    /// `terminationGracePeriodSeconds`.
    pub termination_grace_period: i64,
    /// Sandbox-level resources (the kubelet's sum over the containers; see
    /// [`Resources::sandbox_total`]).
    pub resources: Option<api::LinuxContainerResources>,
    /// The pod's QoS class, for the containers' oom_score_adj.
    pub qos: QosClass,
    /// The kubelet's pod directory (`<kubelet root>/pods/<uid>`): etc-hosts and the
    /// termination message files go there.
    pub pod_dir: PathBuf,
    /// `kubernetes.io/config.seen`; now when `None`.
    pub config_seen: Option<String>,
}

impl PodSpec {
    /// A BestEffort pod `namespace/name` with a fresh uid, ClusterFirst DNS search paths,
    /// the cgroupfs driver's parent `/kubepods/besteffort/pod<uid>`, files under `pod_dir`.
    pub fn new(namespace: &str, name: &str, pod_dir: &Path) -> PodSpec {
        let uid = new_uid();
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
            uid,
            attempt: 0,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            host_network: false,
            host_pid: false,
            host_ipc: false,
            share_process_namespace: false,
            hostname: None,
            dns: DnsConfig::cluster_first(namespace, "cluster.local", &[]),
            port_mappings: Vec::new(),
            sysctls: BTreeMap::new(),
            privileged: false,
            run_as_user: None,
            run_as_group: None,
            supplemental_groups: Vec::new(),
            seccomp: Seccomp::Unconfined,
            termination_grace_period: DEFAULT_GRACE_PERIOD,
            resources: None,
            qos: QosClass::BestEffort,
            pod_dir: pod_dir.to_path_buf(),
            config_seen: None,
        }
    }

    /// The namespaces of the sandbox and of every container: network POD (NODE for host
    /// network), pid CONTAINER (POD with a shared process namespace, NODE for host pid), ipc
    /// POD (NODE for host ipc).
    pub fn namespace_options(&self) -> api::NamespaceOption {
        use namespace_option_mode as m;
        api::NamespaceOption {
            network: if self.host_network { m::NODE } else { m::POD },
            pid: if self.host_pid {
                m::NODE
            } else if self.share_process_namespace {
                m::POD
            } else {
                m::CONTAINER
            },
            ipc: if self.host_ipc { m::NODE } else { m::POD },
            target_id: String::new(),
            userns_options: None,
        }
    }
}

/// NamespaceMode values as i32 (prost enums are i32 fields).
mod namespace_option_mode {
    use super::api::NamespaceMode;
    pub const POD: i32 = NamespaceMode::Pod as i32;
    pub const CONTAINER: i32 = NamespaceMode::Container as i32;
    pub const NODE: i32 = NamespaceMode::Node as i32;
}

/// The pod's QoS class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The class of a pod with these containers' resources (requests default to limits).
    pub fn of(containers: &[Resources]) -> QosClass {
        let all_empty = containers.iter().all(|r| {
            r.cpu_request_milli.is_none()
                && r.cpu_limit_milli.is_none()
                && r.memory_request.is_none()
                && r.memory_limit.is_none()
        });
        if all_empty {
            return QosClass::BestEffort;
        }
        let guaranteed = containers.iter().all(|r| {
            r.cpu_limit_milli.is_some()
                && r.memory_limit.is_some()
                && r.cpu_request() == r.cpu_limit_milli
                && r.memory_request() == r.memory_limit
        });
        if guaranteed {
            QosClass::Guaranteed
        } else {
            QosClass::Burstable
        }
    }
}

/// A container's resources as in its spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    pub cpu_request_milli: Option<i64>,
    pub cpu_limit_milli: Option<i64>,
    pub memory_request: Option<i64>,
    pub memory_limit: Option<i64>,
}

impl Resources {
    /// The request, defaulted to the limit as the API server does.
    fn cpu_request(&self) -> Option<i64> {
        self.cpu_request_milli.or(self.cpu_limit_milli)
    }

    fn memory_request(&self) -> Option<i64> {
        self.memory_request.or(self.memory_limit)
    }

    /// `LinuxContainerResources` as the kubelet computes them (`memory_capacity`: the node's
    /// memory, for Burstable oom_score_adj).
    pub fn to_linux(&self, qos: QosClass, memory_capacity: i64) -> api::LinuxContainerResources {
        let shares = milli_cpu_to_shares(self.cpu_request().unwrap_or(0));
        let quota = self
            .cpu_limit_milli
            .map(|l| milli_cpu_to_quota(l, CPU_PERIOD))
            .unwrap_or(0);
        api::LinuxContainerResources {
            cpu_period: CPU_PERIOD,
            cpu_quota: quota,
            cpu_shares: shares,
            memory_limit_in_bytes: self.memory_limit.unwrap_or(0),
            oom_score_adj: oom_score_adj(qos, self.memory_request().unwrap_or(0), memory_capacity),
            ..Default::default()
        }
    }

    /// The sandbox's resources: the sums of the containers' requests and limits (a limit
    /// only if every container has one), as `calculateSandboxResources`.
    pub fn sandbox_total(containers: &[Resources]) -> api::LinuxContainerResources {
        let cpu_req: i64 = containers.iter().filter_map(|r| r.cpu_request()).sum();
        let cpu_lim: Option<i64> = containers.iter().map(|r| r.cpu_limit_milli).sum();
        let mem_lim: Option<i64> = containers.iter().map(|r| r.memory_limit).sum();
        api::LinuxContainerResources {
            cpu_period: CPU_PERIOD,
            cpu_quota: cpu_lim
                .map(|l| milli_cpu_to_quota(l, CPU_PERIOD))
                .unwrap_or(0),
            cpu_shares: milli_cpu_to_shares(cpu_req),
            memory_limit_in_bytes: mem_lim.unwrap_or(0),
            ..Default::default()
        }
    }
}

/// `cm.MilliCPUToShares`: 1024 shares per CPU, at least 2.
pub fn milli_cpu_to_shares(milli: i64) -> i64 {
    if milli == 0 {
        return 2;
    }
    (milli * 1024 / 1000).max(2)
}

/// `cm.MilliCPUToQuota`: at least 1000 µs.
pub fn milli_cpu_to_quota(milli: i64, period: i64) -> i64 {
    if milli == 0 {
        return 0;
    }
    (milli * period / 1000).max(1000)
}

/// `qos.GetContainerOOMScoreAdjust` for ordinary (non-critical) pods.
pub fn oom_score_adj(qos: QosClass, memory_request: i64, memory_capacity: i64) -> i64 {
    match qos {
        QosClass::Guaranteed => -997,
        QosClass::BestEffort => 1000,
        QosClass::Burstable => {
            if memory_capacity <= 0 {
                return 999;
            }
            let adj = 1000 - (1000 * memory_request) / memory_capacity;
            adj.clamp(2, 999)
        }
    }
}

/// Image pull policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
    Never,
}

/// A container as the kubelet sees it.
#[derive(Clone, Debug, Hash)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub pull_policy: PullPolicy,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub env: Vec<(String, String)>,
    /// Volume mounts (host paths chosen by the caller), before the kubelet's own.
    pub mounts: Vec<MountSpec>,
    /// Extra annotations (device plugins and the like put theirs here).
    pub annotations: BTreeMap<String, String>,
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
    pub resources: Resources,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub readonly_rootfs: bool,
    pub privileged: bool,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    pub allow_privilege_escalation: Option<bool>,
    /// procMount: Unmasked (no masked/read-only /proc paths).
    pub unmasked_proc: bool,
    /// Restart count: the container's attempt.
    pub restart_count: u32,
    pub termination_message_path: String,
    /// `File` or `FallbackToLogsOnError`.
    pub termination_message_policy: String,
    /// Skip the kubelet-managed /etc/hosts mount.
    pub no_hosts_mount: bool,
}

/// A volume mount.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MountSpec {
    pub container_path: String,
    pub host_path: PathBuf,
    pub readonly: bool,
}

impl ContainerSpec {
    pub fn new(name: &str, image: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: image.into(),
            pull_policy: PullPolicy::IfNotPresent,
            command: Vec::new(),
            args: Vec::new(),
            working_dir: String::new(),
            env: Vec::new(),
            mounts: Vec::new(),
            annotations: BTreeMap::new(),
            stdin: false,
            stdin_once: false,
            tty: false,
            resources: Resources::default(),
            run_as_user: None,
            run_as_group: None,
            readonly_rootfs: false,
            privileged: false,
            add_capabilities: Vec::new(),
            drop_capabilities: Vec::new(),
            allow_privilege_escalation: None,
            unmasked_proc: false,
            restart_count: 0,
            termination_message_path: DEFAULT_TERMINATION_MESSAGE_PATH.into(),
            termination_message_policy: "File".into(),
            no_hosts_mount: false,
        }
    }

    pub fn command(mut self, cmd: &[&str]) -> Self {
        self.command = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The `io.kubernetes.container.hash` annotation: FNV-1a (32 bit) over the spec, hex, as
    /// the kubelet hashes its container spec.
    pub fn hash(&self) -> String {
        let text = format!("{self:?}");
        let mut h: u32 = 0x811c_9dc5;
        for b in text.bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("{h:x}")
    }
}

/// The image name with the kubelet's default tag (`:latest` when none and no digest).
pub fn with_default_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A pod uid: random-looking, unique in this process (UUID-shaped like the API server's).
pub fn new_uid() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = SEQ.fetch_add(1, Ordering::SeqCst) as u128;
    let x = t ^ (n << 64) ^ ((std::process::id() as u128) << 96);
    let h = format!("{x:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_like_the_kubelet() {
        let r = Resources {
            cpu_request_milli: Some(250),
            cpu_limit_milli: Some(500),
            memory_request: Some(64 << 20),
            memory_limit: Some(128 << 20),
        };
        let l = r.to_linux(QosClass::Burstable, 1 << 30);
        assert_eq!(l.cpu_shares, 256);
        assert_eq!(l.cpu_period, 100_000);
        assert_eq!(l.cpu_quota, 50_000);
        assert_eq!(l.memory_limit_in_bytes, 128 << 20);
        assert_eq!(l.oom_score_adj, 1000 - 1000 * 64 / 1024);
        let none = Resources::default().to_linux(QosClass::BestEffort, 1 << 30);
        assert_eq!(
            (none.cpu_shares, none.cpu_quota, none.oom_score_adj),
            (2, 0, 1000)
        );
        assert_eq!(milli_cpu_to_quota(1, CPU_PERIOD), 1000, "minimum quota");
    }

    #[test]
    fn qos_classes() {
        let g = Resources {
            cpu_limit_milli: Some(100),
            memory_limit: Some(1 << 20),
            ..Default::default()
        };
        assert_eq!(
            QosClass::of(&[g]),
            QosClass::Guaranteed,
            "requests default to limits"
        );
        let b = Resources {
            memory_request: Some(1 << 20),
            ..Default::default()
        };
        assert_eq!(QosClass::of(&[g, b]), QosClass::Burstable);
        assert_eq!(QosClass::of(&[Resources::default()]), QosClass::BestEffort);
        assert_eq!(oom_score_adj(QosClass::Guaranteed, 0, 1), -997);
        assert_eq!(oom_score_adj(QosClass::Burstable, 1 << 30, 1 << 30), 2);
    }

    #[test]
    fn sandbox_totals() {
        let a = Resources {
            cpu_request_milli: Some(100),
            cpu_limit_milli: Some(200),
            memory_limit: Some(10),
            ..Default::default()
        };
        let b = Resources {
            cpu_request_milli: Some(300),
            ..Default::default()
        };
        let t = Resources::sandbox_total(&[a, b]);
        assert_eq!(t.cpu_shares, 409);
        assert_eq!(t.cpu_quota, 0, "no limit unless every container has one");
        assert_eq!(Resources::sandbox_total(&[a, a]).cpu_quota, 40_000);
        assert_eq!(Resources::sandbox_total(&[a, a]).memory_limit_in_bytes, 20);
    }
}
