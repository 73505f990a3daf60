//! The kubelet's side of the CRI as a library: the calls the kubelet makes to run and tear
//! down a pod, in its order and with its arguments.
//!
//! Followed (kubelet 1.3x: `kuberuntime_manager.go` SyncPod/killPod, `kuberuntime_sandbox.go`,
//! `kuberuntime_container.go`, `kuberuntime_container_linux.go`, `security_context.go`,
//! cri-client's deadlines; cross-checked against what containerd's CRI plugin consumes):
//!
//! - **Pod start** ([`Kubelet::run_pod`]): create the pod log directory
//!   `<root>/<namespace>_<name>_<uid>` (0755); `RunPodSandbox` with the runtime handler and a
//!   `PodSandboxConfig` of metadata {name, uid, namespace, attempt}, hostname (the pod name,
//!   empty for host-network pods), log_directory, dns_config, port_mappings, labels (the pod's
//!   plus `io.kubernetes.pod.{name,namespace,uid}`), annotations (the pod's plus
//!   `kubernetes.io/config.seen` and `kubernetes.io/config.source: api`, which the kubelet's
//!   config layer adds), linux {cgroup_parent, security_context {namespace_options (network
//!   POD/NODE, pid CONTAINER/POD/NODE, ipc POD/NODE), privileged if any container is,
//!   run_as_user/group, supplemental_groups, seccomp Unconfined (kubelet `seccompDefault`
//!   off)}, sysctls, resources}; then `PodSandboxStatus` for the pod IP.
//! - **Container start** ([`Kubelet::start_container`]): IfNotPresent pulls — `ImageStatus`,
//!   `PullImage` (with the sandbox config) only if missing — and the image *reference* (the
//!   image id) goes into `CreateContainer`, the name as `user_specified_image`; then
//!   `CreateContainer` with the container config (metadata {name, attempt}, command, args,
//!   working_dir, envs, mounts = the caller's volumes, then the kubelet-managed `/etc/hosts`
//!   (`<pod dir>/etc-hosts`) and the termination message file
//!   (`<pod dir>/containers/<name>/<8 hex>` at `/dev/termination-log`), labels
//!   `io.kubernetes.container.name` + pod name/namespace/uid, annotations
//!   `io.kubernetes.container.{hash,restartCount,terminationMessagePath,
//!   terminationMessagePolicy}` + `io.kubernetes.pod.terminationGracePeriod` + the caller's,
//!   log_path `<name>/<attempt>.log` (the kubelet creates `<log dir>/<name>/`), stdin,
//!   stdin_once, tty, linux {resources (cpu_shares from the request, min 2; cpu_period 100000
//!   and cpu_quota from the limit; memory limit; oom_score_adj from the pod's QoS class),
//!   security_context (namespaces as the pod's, run_as_user/group, readonly_rootfs,
//!   privileged, capabilities, no_new_privs from allowPrivilegeEscalation=false, the default
//!   masked and read-only /proc paths, seccomp Unconfined)}) and the sandbox config; then
//!   `StartContainer`.
//! - **Stop** ([`Kubelet::stop_container`]): `StopContainer` with timeout = the grace period
//!   (at least 2 s, the kubelet's minimum) and a deadline of 2 min + grace.
//! - **Pod deletion** ([`Kubelet::kill_pod`]): stop every container of the pod (in parallel,
//!   with the grace period), `StopPodSandbox`, then what the kubelet's garbage collector does
//!   afterwards: `RemoveContainer` for each, `RemovePodSandbox`.
//! - Exec/attach/port-forward: the CRI call for the URL, then the SPDY session
//!   ([`super::stream`]); `stderr` is dropped when `tty` is set, as kubectl does.
//!
//! Left out: init and ephemeral containers, probes and lifecycle hooks, restarts and
//! backoff, image pull secrets and policies other than IfNotPresent/Always/Never, volumes
//! (the caller passes mounts), CNI-derived DNS and hosts entries beyond the basics,
//! device plugins, CPU/memory managers, hugepage limits (the kubelet lists every host page
//! size with limit 0), cgroup v2 `unified` (MemoryQoS), swap limits, AppArmor, SELinux labels,
//! user namespaces, the `/var/log/containers` symlinks, and log/directory garbage collection
//! (logs stay for the test to read; the caller removes its directories).

mod spec;
pub use spec::*;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::api;
use super::client::{CriClient, CriError};
use super::logs::{self, LogEntry, LogError};
use super::stream::{
    self, ExecOptions, PortForward, Session, SessionOptions, StreamError, StreamResult,
};

/// Errors of the kubelet layer.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error(transparent)]
    Cri(#[from] CriError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl KubeletError {
    /// The gRPC code when a CRI call failed.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            KubeletError::Cri(e) => e.code(),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KubeletError {
    let what = what.into();
    move |source| KubeletError::Io { what, source }
}

/// A running pod. Killed (best effort, short deadlines) on drop unless
/// [`Kubelet::kill_pod`] already did it.
pub struct Pod {
    pub sandbox_id: String,
    pub spec: PodSpec,
    pub config: api::PodSandboxConfig,
    /// The first `PodSandboxStatus` answer.
    pub status: api::PodSandboxStatusResponse,
    /// The pod IP (empty for host-network pods).
    pub ip: String,
    cri: Arc<CriClient>,
    killed: AtomicBool,
}

impl Pod {
    /// The pod's log directory.
    pub fn log_directory(&self) -> PathBuf {
        PathBuf::from(&self.config.log_directory)
    }

    /// The log file of container `name`, attempt `attempt`.
    pub fn container_log_path(&self, name: &str, attempt: u32) -> PathBuf {
        self.log_directory()
            .join(name)
            .join(format!("{attempt}.log"))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.killed.load(Ordering::SeqCst) || !self.cri.socket().exists() {
            return;
        }
        let d = Duration::from_secs(15);
        let ids = self
            .cri
            .list_containers_within(
                api::ListContainersRequest {
                    filter: Some(api::ContainerFilter {
                        pod_sandbox_id: self.sandbox_id.clone(),
                        ..Default::default()
                    }),
                },
                d,
            )
            .map(|r| r.containers.into_iter().map(|c| c.id).collect::<Vec<_>>())
            .unwrap_or_default();
        for id in &ids {
            let _ = self.cri.stop_container_within(
                api::StopContainerRequest {
                    container_id: id.clone(),
                    timeout: MINIMUM_GRACE_PERIOD,
                },
                d,
            );
        }
        let _ = self.cri.stop_pod_sandbox_within(
            api::StopPodSandboxRequest {
                pod_sandbox_id: self.sandbox_id.clone(),
            },
            d,
        );
        for id in ids {
            let _ = self
                .cri
                .remove_container_within(api::RemoveContainerRequest { container_id: id }, d);
        }
        let _ = self.cri.remove_pod_sandbox_within(
            api::RemovePodSandboxRequest {
                pod_sandbox_id: self.sandbox_id.clone(),
            },
            d,
        );
    }
}

/// Connects to a streaming server's address (see [`super::stream`]).
pub type StreamConnector = dyn Fn(SocketAddr) -> io::Result<TcpStream> + Send + Sync;

/// The kubelet bound to a CRI socket, a runtime handler and a pod log root.
pub struct Kubelet {
    cri: Arc<CriClient>,
    runtime_handler: String,
    pod_log_root: PathBuf,
    connect: Arc<StreamConnector>,
    /// Node memory for Burstable oom_score_adj.
    pub memory_capacity: i64,
    /// Streaming session deadline for setup (connect, upgrade, streams).
    pub stream_setup_timeout: Duration,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Kubelet {
    /// Connects to `socket` and checks the runtime answers `Version` with every field set, as
    /// the kubelet does at start.
    pub fn new(
        socket: &Path,
        runtime_handler: &str,
        pod_log_root: &Path,
    ) -> Result<Kubelet, KubeletError> {
        let cri = CriClient::connect(socket)?;
        let k = Kubelet::with_client(cri, runtime_handler, pod_log_root);
        k.version()?;
        Ok(k)
    }

    pub fn with_client(cri: CriClient, runtime_handler: &str, pod_log_root: &Path) -> Kubelet {
        Kubelet {
            cri: Arc::new(cri),
            runtime_handler: runtime_handler.into(),
            pod_log_root: pod_log_root.to_path_buf(),
            connect: Arc::new(stream::direct),
            memory_capacity: node_memory().unwrap_or(0),
            stream_setup_timeout: Duration::from_secs(30),
        }
    }

    /// Uses `connect` to reach the streaming server (e.g. from inside the node's netns).
    pub fn set_stream_connector(&mut self, connect: Arc<StreamConnector>) {
        self.connect = connect;
    }

    pub fn cri(&self) -> &CriClient {
        &self.cri
    }

    pub fn runtime_handler(&self) -> &str {
        &self.runtime_handler
    }

    pub fn pod_log_root(&self) -> &Path {
        &self.pod_log_root
    }

    /// `Version` with the kubelet's check that every field is set.
    pub fn version(&self) -> Result<api::VersionResponse, KubeletError> {
        let v = self.cri.version(api::VersionRequest {
            version: "v1".into(),
        })?;
        let missing: Vec<&str> = [
            ("version", &v.version),
            ("runtime_name", &v.runtime_name),
            ("runtime_version", &v.runtime_version),
            ("runtime_api_version", &v.runtime_api_version),
        ]
        .iter()
        .filter(|(_, f)| f.is_empty())
        .map(|(n, _)| *n)
        .collect();
        if !missing.is_empty() {
            return Err(CriError::BadResponse {
                rpc: "Version",
                why: format!("fields not set: {}", missing.join(", ")),
            }
            .into());
        }
        Ok(v)
    }

    /// `<root>/<namespace>_<name>_<uid>`.
    pub fn pod_log_directory(&self, pod: &PodSpec) -> PathBuf {
        pod_log_directory(&self.pod_log_root, pod)
    }

    /// The `PodSandboxConfig` the kubelet generates for `pod`.
    pub fn sandbox_config(&self, pod: &PodSpec) -> api::PodSandboxConfig {
        sandbox_config(pod, &self.pod_log_root)
    }

    /// Runs the pod's sandbox as the kubelet does and reads its status.
    pub fn run_pod(&self, pod: PodSpec) -> Result<Pod, KubeletError> {
        let config = self.sandbox_config(&pod);
        let log_dir = PathBuf::from(&config.log_directory);
        mkdir_mode(&log_dir, 0o755)?;
        let resp = self.cri.run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: self.runtime_handler.clone(),
        })?;
        if resp.pod_sandbox_id.is_empty() {
            return Err(CriError::BadResponse {
                rpc: "RunPodSandbox",
                why: "pod_sandbox_id is not set".into(),
            }
            .into());
        }
        let mut handle = Pod {
            sandbox_id: resp.pod_sandbox_id,
            spec: pod,
            config,
            status: api::PodSandboxStatusResponse::default(),
            ip: String::new(),
            cri: Arc::clone(&self.cri),
            killed: AtomicBool::new(false),
        };
        // From here on a failure still tears the sandbox down (the handle's drop).
        let status = self.cri.pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: handle.sandbox_id.clone(),
            verbose: false,
        })?;
        handle.ip = status
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        handle.status = status;
        Ok(handle)
    }

    /// IfNotPresent/Always/Never as the kubelet's image puller; returns the image reference
    /// to create the container from.
    pub fn ensure_image(
        &self,
        pod: &Pod,
        image: &str,
        policy: PullPolicy,
    ) -> Result<String, KubeletError> {
        let image = with_default_tag(image);
        let spec = api::ImageSpec {
            image: image.clone(),
            ..Default::default()
        };
        if policy != PullPolicy::Always {
            let st = self.cri.image_status(api::ImageStatusRequest {
                image: Some(spec.clone()),
                verbose: false,
            })?;
            if let Some(img) = st.image {
                if !img.id.is_empty() {
                    return Ok(img.id);
                }
            }
            if policy == PullPolicy::Never {
                return Err(KubeletError::Invalid(format!(
                    "ErrImageNeverPull: image {image} is not present and the pull policy is Never"
                )));
            }
        }
        let pulled = self.cri.pull_image(api::PullImageRequest {
            image: Some(spec),
            auth: None,
            sandbox_config: Some(pod.config.clone()),
        })?;
        if pulled.image_ref.is_empty() {
            return Err(CriError::BadResponse {
                rpc: "PullImage",
                why: format!("no image_ref for {image}"),
            }
            .into());
        }
        Ok(pulled.image_ref)
    }

    /// The `ContainerConfig` the kubelet generates (writes the pod's etc-hosts and the
    /// container's termination message file, creates its log directory).
    pub fn container_config(
        &self,
        pod: &Pod,
        spec: &ContainerSpec,
        image_ref: &str,
    ) -> Result<api::ContainerConfig, KubeletError> {
        let p = &pod.spec;
        let mut mounts: Vec<api::Mount> = spec
            .mounts
            .iter()
            .map(|m| api::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.display().to_string(),
                readonly: m.readonly,
                ..Default::default()
            })
            .collect();
        if !spec.no_hosts_mount {
            let hosts = self.write_hosts_file(pod)?;
            mounts.push(api::Mount {
                container_path: "/etc/hosts".into(),
                host_path: hosts.display().to_string(),
                ..Default::default()
            });
        }
        if !spec.termination_message_path.is_empty() {
            let dir = p.pod_dir.join("containers").join(&spec.name);
            mkdir_mode(&dir, 0o750)?;
            let file = dir.join(format!("{:08x}", random_u32()));
            std::fs::File::create(&file).map_err(io_err(format!("create {}", file.display())))?;
            set_mode(&file, 0o666)?;
            mounts.push(api::Mount {
                container_path: spec.termination_message_path.clone(),
                host_path: file.display().to_string(),
                ..Default::default()
            });
        }
        mkdir_mode(&pod.log_directory().join(&spec.name), 0o755)?;

        let mut labels = std::collections::HashMap::new();
        labels.insert(keys::CONTAINER_NAME.to_string(), spec.name.clone());
        labels.insert(keys::POD_NAME.to_string(), p.name.clone());
        labels.insert(keys::POD_NAMESPACE.to_string(), p.namespace.clone());
        labels.insert(keys::POD_UID.to_string(), p.uid.clone());
        let mut annotations: std::collections::HashMap<String, String> =
            spec.annotations.clone().into_iter().collect();
        annotations.insert(keys::CONTAINER_HASH.into(), spec.hash());
        annotations.insert(
            keys::CONTAINER_RESTART_COUNT.into(),
            spec.restart_count.to_string(),
        );
        annotations.insert(
            keys::TERMINATION_MESSAGE_PATH.into(),
            spec.termination_message_path.clone(),
        );
        annotations.insert(
            keys::TERMINATION_MESSAGE_POLICY.into(),
            spec.termination_message_policy.clone(),
        );
        annotations.insert(
            keys::TERMINATION_GRACE_PERIOD.into(),
            p.termination_grace_period.to_string(),
        );

        let (masked, readonly) = if spec.unmasked_proc {
            (Vec::new(), Vec::new())
        } else {
            (
                DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
                DEFAULT_READONLY_PATHS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )
        };
        let capabilities = if spec.add_capabilities.is_empty() && spec.drop_capabilities.is_empty()
        {
            None
        } else {
            Some(api::Capability {
                add_capabilities: spec.add_capabilities.clone(),
                drop_capabilities: spec.drop_capabilities.clone(),
                add_ambient_capabilities: Vec::new(),
            })
        };
        Ok(api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: spec.name.clone(),
                attempt: spec.restart_count,
            }),
            image: Some(api::ImageSpec {
                image: image_ref.to_string(),
                user_specified_image: spec.image.clone(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            working_dir: spec.working_dir.clone(),
            envs: spec
                .env
                .iter()
                .map(|(k, v)| api::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts,
            devices: Vec::new(),
            labels,
            annotations,
            log_path: format!("{}/{}.log", spec.name, spec.restart_count),
            stdin: spec.stdin,
            stdin_once: spec.stdin_once,
            tty: spec.tty,
            linux: Some(api::LinuxContainerConfig {
                resources: Some(spec.resources.to_linux(p.qos, self.memory_capacity)),
                security_context: Some(api::LinuxContainerSecurityContext {
                    capabilities,
                    privileged: spec.privileged,
                    namespace_options: Some(p.namespace_options()),
                    run_as_user: spec
                        .run_as_user
                        .or(p.run_as_user)
                        .map(|value| api::Int64Value { value }),
                    run_as_group: spec
                        .run_as_group
                        .or(p.run_as_group)
                        .map(|value| api::Int64Value { value }),
                    readonly_rootfs: spec.readonly_rootfs,
                    supplemental_groups: p.supplemental_groups.clone(),
                    no_new_privs: spec.allow_privilege_escalation == Some(false),
                    masked_paths: masked,
                    readonly_paths: readonly,
                    seccomp: Some(p.seccomp.to_api()),
                    ..Default::default()
                }),
            }),
            cdi_devices: Vec::new(),
        })
    }

    /// The kubelet's managed hosts file for the pod (rewritten for every container).
    fn write_hosts_file(&self, pod: &Pod) -> Result<PathBuf, KubeletError> {
        let p = &pod.spec;
        mkdir_mode(&p.pod_dir, 0o750)?;
        let path = p.pod_dir.join("etc-hosts");
        let content = if p.host_network {
            let node = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
            format!("# Kubernetes-managed hosts file (host network).\n{node}")
        } else {
            let host = pod.config.hostname.clone();
            let mut s = String::from(
                "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
            );
            if !pod.ip.is_empty() {
                s.push_str(&format!("{}\t{host}\n", pod.ip));
            }
            s
        };
        std::fs::write(&path, content).map_err(io_err(format!("write {}", path.display())))?;
        set_mode(&path, 0o644)?;
        Ok(path)
    }

    /// Pulls if needed, creates and starts the container; returns its id.
    pub fn start_container(&self, pod: &Pod, spec: &ContainerSpec) -> Result<String, KubeletError> {
        let image_ref = self.ensure_image(pod, &spec.image, spec.pull_policy)?;
        let config = self.container_config(pod, spec, &image_ref)?;
        let created = self.cri.create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod.sandbox_id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        })?;
        if created.container_id.is_empty() {
            return Err(CriError::BadResponse {
                rpc: "CreateContainer",
                why: "container_id is not set".into(),
            }
            .into());
        }
        self.cri.start_container(api::StartContainerRequest {
            container_id: created.container_id.clone(),
        })?;
        Ok(created.container_id)
    }

    /// `StopContainer` with the grace period (at least 2 s) and a deadline of 2 min + grace.
    pub fn stop_container(&self, id: &str, grace: i64) -> Result<(), KubeletError> {
        self.cri.stop_container(api::StopContainerRequest {
            container_id: id.into(),
            timeout: grace.max(MINIMUM_GRACE_PERIOD),
        })?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), KubeletError> {
        self.cri.remove_container(api::RemoveContainerRequest {
            container_id: id.into(),
        })?;
        Ok(())
    }

    /// Pod deletion: stop every container (in parallel) with the grace period (the pod's
    /// `terminationGracePeriodSeconds` unless given), StopPodSandbox, then RemoveContainer
    /// each and RemovePodSandbox. Errors of the stops are collected; the first is returned
    /// after everything was tried.
    pub fn kill_pod(&self, pod: &Pod, grace: Option<i64>) -> Result<(), KubeletError> {
        let grace = grace.unwrap_or(pod.spec.termination_grace_period);
        let containers = self
            .cri
            .list_containers(api::ListContainersRequest {
                filter: Some(api::ContainerFilter {
                    pod_sandbox_id: pod.sandbox_id.clone(),
                    ..Default::default()
                }),
            })?
            .containers;
        let running: Vec<&api::Container> = containers
            .iter()
            .filter(|c| c.state == api::ContainerState::ContainerRunning as i32)
            .collect();
        let mut first_err: Option<KubeletError> = None;
        std::thread::scope(|s| {
            let handles: Vec<_> = running
                .iter()
                .map(|c| s.spawn(move || self.stop_container(&c.id, grace)))
                .collect();
            for h in handles {
                if let Ok(Err(e)) = h.join() {
                    first_err.get_or_insert(e);
                }
            }
        });
        pod.killed.store(true, Ordering::SeqCst);
        let mut record = |r: Result<(), KubeletError>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        record(
            self.cri
                .stop_pod_sandbox(api::StopPodSandboxRequest {
                    pod_sandbox_id: pod.sandbox_id.clone(),
                })
                .map(drop)
                .map_err(Into::into),
        );
        for c in &containers {
            record(self.remove_container(&c.id));
        }
        record(
            self.cri
                .remove_pod_sandbox(api::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.sandbox_id.clone(),
                })
                .map(drop)
                .map_err(Into::into),
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// `ExecSync` with `timeout` (seconds precision, like the kubelet's probes).
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<api::ExecSyncResponse, KubeletError> {
        Ok(self.cri.exec_sync(api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout.as_secs() as i64,
        })?)
    }

    /// The `ExecRequest` matching `opts` (no stderr with a tty, as kubectl asks).
    fn exec_url(
        &self,
        id: &str,
        cmd: &[&str],
        stdin: bool,
        stdout: bool,
        stderr: bool,
        tty: bool,
    ) -> Result<String, KubeletError> {
        let r = self.cri.exec(api::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout,
            stderr: stderr && !tty,
        })?;
        non_empty_url("Exec", r.url)
    }

    fn attach_url(
        &self,
        id: &str,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        tty: bool,
    ) -> Result<String, KubeletError> {
        let r = self.cri.attach(api::AttachRequest {
            container_id: id.into(),
            stdin,
            tty,
            stdout,
            stderr: stderr && !tty,
        })?;
        non_empty_url("Attach", r.url)
    }

    /// `kubectl exec`: CRI Exec for the URL, then a one-shot streaming session.
    pub fn exec(
        &self,
        id: &str,
        cmd: &[&str],
        opts: ExecOptions,
    ) -> Result<StreamResult, KubeletError> {
        let url = self.exec_url(
            id,
            cmd,
            opts.stdin.is_some(),
            opts.stdout,
            opts.stderr,
            opts.tty,
        )?;
        let connect = Arc::clone(&self.connect);
        Ok(stream::exec(&url, move |a| connect(a), opts)?)
    }

    /// An interactive exec session (`kubectl exec -it`).
    pub fn exec_session(
        &self,
        id: &str,
        cmd: &[&str],
        mut opts: SessionOptions,
    ) -> Result<Session, KubeletError> {
        let url = self.exec_url(id, cmd, opts.stdin, opts.stdout, opts.stderr, opts.tty)?;
        opts.setup_timeout = opts.setup_timeout.min(self.stream_setup_timeout);
        let connect = Arc::clone(&self.connect);
        Ok(stream::session(&url, move |a| connect(a), opts)?)
    }

    /// `kubectl attach`, one-shot.
    pub fn attach(&self, id: &str, opts: ExecOptions) -> Result<StreamResult, KubeletError> {
        let url = self.attach_url(id, opts.stdin.is_some(), opts.stdout, opts.stderr, opts.tty)?;
        let connect = Arc::clone(&self.connect);
        Ok(stream::attach(&url, move |a| connect(a), opts)?)
    }

    /// An interactive attach session (`kubectl attach -it`).
    pub fn attach_session(
        &self,
        id: &str,
        mut opts: SessionOptions,
    ) -> Result<Session, KubeletError> {
        let url = self.attach_url(id, opts.stdin, opts.stdout, opts.stderr, opts.tty)?;
        opts.setup_timeout = opts.setup_timeout.min(self.stream_setup_timeout);
        let connect = Arc::clone(&self.connect);
        Ok(stream::session(&url, move |a| connect(a), opts)?)
    }

    /// `kubectl port-forward`: CRI PortForward for the URL, then the SPDY session.
    pub fn port_forward(
        &self,
        pod: &Pod,
        ports: &[u16],
        timeout: Duration,
    ) -> Result<PortForward, KubeletError> {
        let r = self.cri.port_forward(api::PortForwardRequest {
            pod_sandbox_id: pod.sandbox_id.clone(),
            port: ports.iter().map(|p| *p as i32).collect(),
        })?;
        let url = non_empty_url("PortForward", r.url)?;
        let connect = Arc::clone(&self.connect);
        Ok(stream::port_forward(&url, move |a| connect(a), timeout)?)
    }

    /// `ContainerStatus` (not verbose), the status itself.
    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus, KubeletError> {
        self.cri
            .container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })?
            .status
            .ok_or_else(|| {
                CriError::BadResponse {
                    rpc: "ContainerStatus",
                    why: format!("no status for {id}"),
                }
                .into()
            })
    }

    /// `PodSandboxStatus` (not verbose).
    pub fn pod_status(&self, pod: &Pod) -> Result<api::PodSandboxStatusResponse, KubeletError> {
        Ok(self.cri.pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: pod.sandbox_id.clone(),
            verbose: false,
        })?)
    }

    pub fn list_pods(
        &self,
        filter: Option<api::PodSandboxFilter>,
    ) -> Result<Vec<api::PodSandbox>, KubeletError> {
        Ok(self
            .cri
            .list_pod_sandbox(api::ListPodSandboxRequest { filter })?
            .items)
    }

    pub fn list_containers(
        &self,
        filter: Option<api::ContainerFilter>,
    ) -> Result<Vec<api::Container>, KubeletError> {
        Ok(self
            .cri
            .list_containers(api::ListContainersRequest { filter })?
            .containers)
    }

    /// `ContainerStats`.
    pub fn stats(&self, id: &str) -> Result<api::ContainerStats, KubeletError> {
        self.cri
            .container_stats(api::ContainerStatsRequest {
                container_id: id.into(),
            })?
            .stats
            .ok_or_else(|| {
                CriError::BadResponse {
                    rpc: "ContainerStats",
                    why: format!("no stats for {id}"),
                }
                .into()
            })
    }

    pub fn list_stats(
        &self,
        filter: Option<api::ContainerStatsFilter>,
    ) -> Result<Vec<api::ContainerStats>, KubeletError> {
        Ok(self
            .cri
            .list_container_stats(api::ListContainerStatsRequest { filter })?
            .stats)
    }

    pub fn pod_stats(&self, pod: &Pod) -> Result<api::PodSandboxStatsResponse, KubeletError> {
        Ok(self.cri.pod_sandbox_stats(api::PodSandboxStatsRequest {
            pod_sandbox_id: pod.sandbox_id.clone(),
        })?)
    }

    /// `UpdateContainerResources` (what in-place resize and the CPU manager send).
    pub fn update_resources(
        &self,
        id: &str,
        linux: api::LinuxContainerResources,
    ) -> Result<(), KubeletError> {
        self.cri
            .update_container_resources(api::UpdateContainerResourcesRequest {
                container_id: id.into(),
                linux: Some(linux),
                annotations: Default::default(),
            })?;
        Ok(())
    }

    /// `ReopenContainerLog` (after the kubelet's log rotation renamed the file).
    pub fn reopen_log(&self, id: &str) -> Result<(), KubeletError> {
        self.cri
            .reopen_container_log(api::ReopenContainerLogRequest {
                container_id: id.into(),
            })?;
        Ok(())
    }

    /// `CheckpointContainer` as the kubelet's checkpoint API sends it: a timeout below the
    /// request timeout is raised to it.
    pub fn checkpoint(
        &self,
        id: &str,
        location: &Path,
        timeout: Duration,
    ) -> Result<(), KubeletError> {
        let default = self.cri.timeouts().request.as_secs() as i64;
        let t = (timeout.as_secs() as i64).max(default);
        self.cri
            .checkpoint_container(api::CheckpointContainerRequest {
                container_id: id.into(),
                location: location.display().to_string(),
                timeout: t,
            })?;
        Ok(())
    }

    /// The container's CRI log entries (`kubectl logs` reads this file).
    pub fn container_log(
        &self,
        pod: &Pod,
        name: &str,
        attempt: u32,
    ) -> Result<Vec<LogEntry>, KubeletError> {
        Ok(logs::read_file(&pod.container_log_path(name, attempt))?)
    }
}

/// `<root>/<namespace>_<name>_<uid>`: the pod's log directory.
pub fn pod_log_directory(root: &Path, pod: &PodSpec) -> PathBuf {
    root.join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid))
}

/// The `PodSandboxConfig` the kubelet generates for `pod` (log directory under `log_root`).
pub fn sandbox_config(pod: &PodSpec, log_root: &Path) -> api::PodSandboxConfig {
    let mut labels: std::collections::HashMap<String, String> =
        pod.labels.clone().into_iter().collect();
    labels.insert(keys::POD_NAME.into(), pod.name.clone());
    labels.insert(keys::POD_NAMESPACE.into(), pod.namespace.clone());
    labels.insert(keys::POD_UID.into(), pod.uid.clone());
    let mut annotations: std::collections::HashMap<String, String> =
        pod.annotations.clone().into_iter().collect();
    annotations
        .entry(keys::CONFIG_SEEN.into())
        .or_insert_with(|| pod.config_seen.clone().unwrap_or_else(rfc3339_now));
    annotations
        .entry(keys::CONFIG_SOURCE.into())
        .or_insert_with(|| "api".into());
    let hostname = if pod.host_network {
        String::new()
    } else {
        pod_hostname(pod.hostname.as_deref().unwrap_or(&pod.name))
    };
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            namespace: pod.namespace.clone(),
            attempt: pod.attempt,
        }),
        hostname,
        log_directory: pod_log_directory(log_root, pod).display().to_string(),
        dns_config: Some(pod.dns.to_api()),
        port_mappings: pod.port_mappings.clone(),
        labels,
        annotations,
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: pod.cgroup_parent.clone(),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(pod.namespace_options()),
                run_as_user: pod.run_as_user.map(|value| api::Int64Value { value }),
                run_as_group: pod.run_as_group.map(|value| api::Int64Value { value }),
                supplemental_groups: pod.supplemental_groups.clone(),
                privileged: pod.privileged,
                seccomp: Some(pod.seccomp.to_api()),
                ..Default::default()
            }),
            sysctls: pod.sysctls.clone().into_iter().collect(),
            resources: pod.resources.clone(),
            ..Default::default()
        }),
    }
}

fn non_empty_url(rpc: &'static str, url: String) -> Result<String, KubeletError> {
    if url.is_empty() {
        return Err(CriError::BadResponse {
            rpc,
            why: "URL is not set".into(),
        }
        .into());
    }
    Ok(url)
}

/// The pod's hostname as the kubelet makes it: at most 63 characters, no trailing `-`/`.`.
fn pod_hostname(name: &str) -> String {
    let mut h: String = name.chars().take(63).collect();
    while h.ends_with('-') || h.ends_with('.') {
        h.pop();
    }
    h
}

fn mkdir_mode(dir: &Path, mode: u32) -> Result<(), KubeletError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    set_mode(dir, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), KubeletError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

fn random_u32() -> u32 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    t ^ SEQ.fetch_add(1, Ordering::SeqCst).wrapping_mul(0x9e37_79b9)
}

/// Now as RFC 3339 with nanoseconds (UTC), as `kubernetes.io/config.seen` carries it.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// MemTotal from /proc/meminfo, in bytes.
fn node_memory() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tags_and_hostnames() {
        assert_eq!(with_default_tag("busybox"), "busybox:latest");
        assert_eq!(
            with_default_tag("localhost:5000/x/busybox"),
            "localhost:5000/x/busybox:latest"
        );
        assert_eq!(with_default_tag("a/b:1"), "a/b:1");
        assert_eq!(with_default_tag("a/b@sha256:00"), "a/b@sha256:00");
        assert_eq!(pod_hostname(&"x".repeat(70)).len(), 63);
        assert_eq!(pod_hostname("web-"), "web");
    }

    #[test]
    fn sandbox_config_fields() {
        let mut pod = PodSpec::new("default", "web", Path::new("/pods/x"));
        pod.labels.insert("pod-template-hash".into(), "abc".into());
        pod.annotations.insert("note".into(), "n".into());
        pod.sysctls
            .insert("net.ipv4.ip_unprivileged_port_start".into(), "0".into());
        let c = sandbox_config(&pod, Path::new("/logs"));
        let md = c.metadata.as_ref().expect("metadata");
        assert_eq!(
            (md.name.as_str(), md.namespace.as_str(), md.attempt),
            ("web", "default", 0)
        );
        assert_eq!(c.log_directory, format!("/logs/default_web_{}", pod.uid));
        assert_eq!(c.hostname, "web");
        assert_eq!(c.labels["pod-template-hash"], "abc");
        assert_eq!(c.labels[keys::POD_UID], pod.uid);
        assert_eq!(c.labels[keys::POD_NAME], "web");
        assert_eq!(c.labels[keys::POD_NAMESPACE], "default");
        assert_eq!(c.annotations["note"], "n");
        assert_eq!(c.annotations[keys::CONFIG_SOURCE], "api");
        assert!(c.annotations.contains_key(keys::CONFIG_SEEN));
        let dns = c.dns_config.as_ref().expect("dns");
        assert_eq!(dns.options, ["ndots:5"]);
        assert_eq!(dns.searches[0], "default.svc.cluster.local");
        let linux = c.linux.as_ref().expect("linux");
        assert!(linux.cgroup_parent.starts_with("/kubepods/besteffort/pod"));
        assert_eq!(linux.sysctls["net.ipv4.ip_unprivileged_port_start"], "0");
        let sc = linux.security_context.as_ref().expect("security context");
        let ns = sc.namespace_options.as_ref().expect("namespaces");
        assert_eq!(ns.network, api::NamespaceMode::Pod as i32);
        assert_eq!(ns.pid, api::NamespaceMode::Container as i32);
        assert_eq!(ns.ipc, api::NamespaceMode::Pod as i32);
        assert_eq!(
            sc.seccomp.as_ref().expect("seccomp").profile_type,
            api::security_profile::ProfileType::Unconfined as i32
        );

        pod.host_network = true;
        let h = sandbox_config(&pod, Path::new("/logs"));
        assert_eq!(h.hostname, "", "host-network pods get no hostname");
        let ns = h
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options);
        assert_eq!(
            ns.expect("namespaces").network,
            api::NamespaceMode::Node as i32
        );
    }

    #[test]
    fn timestamps_and_uids() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let now = rfc3339_now();
        assert!(
            super::super::logs::parse_line(format!("{now} stdout F x").as_bytes()).is_ok(),
            "{now}"
        );
        let (a, b) = (new_uid(), new_uid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let c = ContainerSpec::new("c", "img");
        assert_eq!(c.hash(), c.clone().hash());
        assert_ne!(c.hash(), ContainerSpec::new("d", "img").hash());
    }
}
