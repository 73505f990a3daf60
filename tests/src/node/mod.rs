//! A CRI "test node": a private containerd with its CRI plugin, in network and mount
//! namespaces of its own, serving pods with real pod networking (CNI), a pause image of
//! ours, a local OCI registry, and runc-architect registered by its installer exactly as a
//! user does.
//!
//! [`Node::start`] builds one in a directory of its own (`$RA_TMPDIR` or the temp dir,
//! `ra-node-<version>-<pid>-<n>`, laid out by [`layout::Layout`]):
//!
//! 1. config.toml from the version's `containerd config default`, edited to private paths
//!    and this machine's CRI settings ([`config`]); a CNI conflist (bridge + host-local +
//!    portmap) in a private conf dir; a `hosts.toml` for the registry.
//! 2. `runc-architect install --config ... --bin-dir ...` registers the handler
//!    [`ARCHITECT_HANDLER`] ([`register`]; [`Registration`] picks our runtime type or the
//!    `io.containerd.runc.v2` + `runtime_path` form, with options).
//! 3. containerd starts in fresh network and mount namespaces, with private directories over
//!    the global paths shims and CNI use ([`namespaces`]): bridges, veths, NAT rules, pod
//!    netns mounts and shim sockets all live inside, so nothing of a node shows on the host
//!    and two nodes (both using CRI's namespace `k8s.io`) never see each other.
//! 4. The pause image (our `workloads/pause.c`) is imported into `k8s.io` under the name the
//!    config names as the sandbox image; the registry (Debian's docker-registry) starts in
//!    the node's network namespace; the busybox and checkpoint test images are imported and
//!    pushed ([`images`], [`push`]).
//!
//! The test process reaches the node through [`Node::connect_tcp`] (a socket made inside the
//! node's network namespace: pod IPs, host ports, the streaming server's URLs) and
//! [`Node::command`] (a program run inside both namespaces). [`Node::leftovers`] lists what a
//! test leaked ([`leftovers`]). Drop stops and removes everything ([`reap`]); a run killed
//! before its drop handlers ran is cleaned up by the next [`Node::start`]. [`host`] checks
//! that the host shows nothing of the nodes after a run.
//!
//! [`Node::kubelet`] gives a [`crate::cri::Kubelet`] bound to the node (its CRI socket, pod
//! log root, and a streaming connector that dials from inside the node), [`Node::pod_spec`]
//! a pod for it. Pods must use [`Node::pod_cgroup_parent`] (what `pod_spec` sets: the
//! cgroupfs driver's parent, as the kubelet sets one under `/kubepods`): the node removes its
//! cgroup tree and reports what is left in it.

pub mod config;
pub mod host;
pub mod http;
pub mod images;
pub mod layout;
pub mod leftovers;
pub mod namespaces;
pub mod push;
pub mod reap;
pub mod register;
pub mod registry;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::containerd::temp_base;
use crate::cri::{CriClient, Kubelet, PodSpec, Timeouts};
use crate::ctr::Ctr;
use crate::image::ImageBuilder;
use crate::paths::{self, Version};
use crate::poll::try_wait_for;
use crate::process::{self, Output};

pub use config::{CNI_BRIDGE, NODE_BRIDGE_IP, POD_SUBNET, RUNC_HANDLER};
pub use images::NodeImages;
pub use layout::Layout;
pub use push::PushedImage;
pub use register::{OptionValue, RegisteredBy, Registration, ARCHITECT_HANDLER};
pub use registry::Registry;

/// CRI's containerd namespace.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// How long containerd may take to serve its socket and start CRI's streaming server.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Options for [`Node::start`].
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub version: Version,
    /// The shim under test (given to the installer as `--shim`).
    pub architect_shim: PathBuf,
    /// How the installer registers runc-architect.
    pub registration: Registration,
    /// containerd's log level (`RA_CONTAINERD_LOG_LEVEL`, default `info`).
    pub log_level: String,
    /// Start the node's registry (and push the test images to it).
    pub registry: bool,
    /// Import the busybox and checkpoint images (the pause image is always imported).
    pub test_images: bool,
}

impl NodeOptions {
    /// `version` with the shim of [`paths::architect_shim`], our own runtime type without
    /// options, the registry and the test images.
    pub fn new(version: Version) -> Result<NodeOptions> {
        Ok(NodeOptions {
            version,
            architect_shim: paths::architect_shim(version)?,
            registration: Registration::own(),
            log_level: std::env::var("RA_CONTAINERD_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            registry: true,
            test_images: true,
        })
    }

    pub fn registration(mut self, r: Registration) -> NodeOptions {
        self.registration = r;
        self
    }
}

/// A running test node. Stopped and removed on drop.
pub struct Node {
    version: Version,
    layout: Layout,
    unique: String,
    child: Option<Child>,
    pid: u32,
    cgroup_parent: String,
    registered_by: RegisteredBy,
    registry: Option<Registry>,
    images: Option<NodeImages>,
    stream_port: u16,
    baseline_mounts: BTreeSet<PathBuf>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Node {
    /// Starts a node and waits until CRI serves, the images are in and the registry answers.
    pub fn start(opts: NodeOptions) -> Result<Node> {
        let version = opts.version;
        version.check_installed()?;
        if !paths::is_executable(&opts.architect_shim) {
            bail!(
                "shim binary {} is not executable",
                opts.architect_shim.display()
            );
        }
        if opts.registry {
            registry::registry_binary()?;
        }
        reap::reap_stale_nodes();

        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        // The reaper reads the owner's pid from the directory name (reap::owner_pid).
        let unique = format!("{}-{}-{}", version.tag(), std::process::id(), seq);
        let dir = temp_base().join(format!("{}{unique}", layout::DIR_PREFIX));
        if dir.exists() {
            crate::cleanup::remove_tree(&dir);
        }
        let layout = Layout::new(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        std::fs::write(layout.owner_file(), std::process::id().to_string())?;
        for d in layout.dirs() {
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        }
        let cgroup_parent = format!("/ra-kubepods-{unique}");
        std::fs::write(layout.cgroup_parent_file(), &cgroup_parent)?;

        // Until containerd runs, a failure leaves only the directory: remove it.
        let prepared = Node::prepare(&opts, &layout)
            .and_then(|r| Ok((r, spawn_containerd(version, &layout)?)));
        let (registered_by, child) = match prepared {
            Ok(v) => v,
            Err(e) => {
                reap::cleanup_node_dir(&layout, &[]);
                return Err(e);
            }
        };
        let pid = child.id();
        std::fs::write(layout.containerd_pid_file(), pid.to_string())?;
        let mut me = Node {
            version,
            layout,
            unique,
            child: Some(child),
            pid,
            cgroup_parent,
            registered_by,
            registry: None,
            images: None,
            stream_port: 0,
            baseline_mounts: BTreeSet::new(),
        };
        me.wait_serving()?;
        me.record_namespaces()?;
        me.stream_port = me.wait_stream_port()?;

        let ctr = me.ctr();
        let scratch = me.layout.scratch();
        images::import_pause(&ctr, &me.layout.images(), &scratch)?;
        if opts.registry {
            me.registry = Some(Registry::start(&me.layout, pid)?);
        }
        if opts.test_images {
            me.images = Some(images::import_test_images(
                &ctr,
                &me.layout.images(),
                &scratch,
                me.registry.as_ref(),
            )?);
        }
        me.baseline_mounts = namespaces::mount_points(pid)?.into_iter().collect();
        Ok(me)
    }

    /// Writes the configuration and registers runc-architect in it.
    fn prepare(opts: &NodeOptions, layout: &Layout) -> Result<RegisteredBy> {
        config::write_config(
            opts.version,
            layout,
            &config::CriSettings {
                sandbox_image: images::PAUSE_IMAGE,
                log_level: &opts.log_level,
            },
        )?;
        config::write_cni(layout)?;
        config::write_hosts_toml(layout, &format!("127.0.0.1:{}", registry::REGISTRY_PORT))?;
        register::register(
            opts.version,
            layout,
            &opts.architect_shim,
            &opts.registration,
        )
        .context("register runc-architect")
    }

    fn child_exited(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("containerd exited ({st})");
            }
        }
        Ok(())
    }

    fn with_log(&self, e: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "{e:#}\n--- containerd log (tail) ---\n{}",
            self.log_tail(40)
        )
    }

    fn wait_serving(&mut self) -> Result<()> {
        let ctr_bin = self.version.ctr_bin();
        let address = self.layout.address();
        let res = try_wait_for("containerd to serve its socket", START_TIMEOUT, || {
            self.child_exited()?;
            if !address.exists() {
                return Ok(None);
            }
            Ok(crate::containerd::ctr_answers(&ctr_bin, &address)?.then_some(()))
        });
        res.map_err(|e| self.with_log(e))
    }

    /// Records the node's namespaces (after the exec: containerd serves) for the cleanup,
    /// and checks they are not the host's.
    fn record_namespaces(&self) -> Result<()> {
        let mut lines = Vec::new();
        for kind in ["net", "mnt"] {
            let id = namespaces::ns_id(self.pid, kind)?;
            if id == namespaces::own_ns_id(kind)? {
                bail!("containerd runs in the test process's {kind} namespace ({id})");
            }
            lines.push(id);
        }
        std::fs::write(self.layout.namespaces_file(), lines.join("\n") + "\n")?;
        Ok(())
    }

    /// The port of CRI's streaming server: the socket containerd listens on at 127.0.0.1.
    fn wait_stream_port(&mut self) -> Result<u16> {
        let pid = self.pid;
        let res = try_wait_for("CRI's streaming server to listen", START_TIMEOUT, || {
            self.child_exited()?;
            Ok(listening_ports(pid)?.into_iter().next())
        });
        res.map_err(|e| self.with_log(e))
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The node's directory (everything of the node on the host's file system is below it).
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Version, test process and sequence number: unique among live nodes.
    pub fn unique(&self) -> &str {
        &self.unique
    }

    /// containerd's pid; its `/proc/<pid>/ns/{net,mnt}` are the node's namespaces.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The CRI socket (containerd's gRPC socket).
    pub fn cri_socket(&self) -> PathBuf {
        self.layout.address()
    }

    /// A `ctr` for CRI's namespace `k8s.io`.
    pub fn ctr(&self) -> Ctr {
        Ctr::new(
            self.version.ctr_bin(),
            self.layout.address(),
            CRI_NAMESPACE.to_string(),
            self.layout.fifo(),
        )
    }

    /// Who registered runc-architect (the installer, or the temporary fallback).
    pub fn registered_by(&self) -> &RegisteredBy {
        &self.registered_by
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(self.layout.log()).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// The pod log root (the kubelet's `/var/log/pods`; pods log below it in
    /// `<namespace>_<name>_<uid>/`).
    pub fn pod_log_root(&self) -> PathBuf {
        self.layout.pod_logs()
    }

    /// The node's cgroup parent for pods (cgroupfs driver): `/ra-kubepods-<unique>`.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The cgroup parent of the pod with `uid`: `<cgroup parent>/pod<uid>` (what the kubelet
    /// gives as `PodSandboxConfig.linux.cgroup_parent`).
    pub fn pod_cgroup_parent(&self, uid: &str) -> String {
        format!("{}/pod{uid}", self.cgroup_parent)
    }

    /// A kubelet ([`crate::cri::Kubelet`]) for this node's CRI socket and pod log root, with
    /// runtime handler `handler` ([`RUNC_HANDLER`] or [`ARCHITECT_HANDLER`]), whose streaming
    /// sessions connect from inside the node's network namespace.
    pub fn kubelet(&self, handler: &str) -> Result<Kubelet> {
        self.kubelet_with(handler, Timeouts::default())
    }

    /// [`Node::kubelet`] with other deadlines for the CRI calls.
    pub fn kubelet_with(&self, handler: &str, timeouts: Timeouts) -> Result<Kubelet> {
        let cri = CriClient::connect_with(&self.cri_socket(), timeouts)
            .with_context(|| format!("connect to CRI at {}", self.cri_socket().display()))?;
        let mut k = Kubelet::with_client(cri, handler, &self.pod_log_root());
        k.version().context("CRI Version")?;
        let pid = self.pid;
        k.set_stream_connector(Arc::new(move |addr| {
            namespaces::connect_tcp(pid, addr, namespaces::CONNECT_TIMEOUT)
        }));
        Ok(k)
    }

    /// A BestEffort pod `namespace/name` for this node: a fresh uid, its kubelet pod directory
    /// below the node directory, the cgroup parent [`Node::pod_cgroup_parent`].
    pub fn pod_spec(&self, namespace: &str, name: &str) -> PodSpec {
        let mut p = PodSpec::new(namespace, name, Path::new(""));
        p.pod_dir = self.layout.kubelet_pods().join(&p.uid);
        p.cgroup_parent = self.pod_cgroup_parent(&p.uid);
        p
    }

    /// The port of CRI's streaming server (127.0.0.1 inside the node).
    pub fn stream_port(&self) -> u16 {
        self.stream_port
    }

    /// The node's address on the pods' bridge (their gateway).
    pub fn bridge_ip(&self) -> &'static str {
        NODE_BRIDGE_IP
    }

    /// The registry, unless the node was started without one.
    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    /// The imported (and pushed) test images, unless started without them.
    pub fn images(&self) -> Option<&NodeImages> {
        self.images.as_ref()
    }

    /// Builds `image` and pushes it to the node's registry as `repository:tag` (without
    /// importing it: CRI must pull it).
    pub fn push_image(
        &self,
        image: &ImageBuilder,
        repository: &str,
        tag: &str,
    ) -> Result<PushedImage> {
        let registry = self
            .registry
            .as_ref()
            .context("the node was started without a registry")?;
        let file = self.layout.images().join(format!(
            "push-{}-{}.oci.tar",
            repository.replace('/', "_"),
            tag
        ));
        let built = image.write_oci_tar(&file)?;
        push::push_oci_tar(registry, &built.tarball, repository, tag)
    }

    /// A TCP connection made inside the node's network namespace (10 s to connect).
    pub fn connect_tcp(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.connect_tcp_timeout(addr, namespaces::CONNECT_TIMEOUT)
    }

    pub fn connect_tcp_timeout(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        namespaces::connect_tcp(self.pid, addr, timeout)
    }

    /// `GET path` from `addr`, connected inside the node.
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> Result<http::Response> {
        let s = self
            .connect_tcp(addr)
            .with_context(|| format!("connect to {addr} inside the node"))?;
        http::send(
            s,
            &http::Request {
                method: "GET",
                host: &addr.to_string(),
                target: path,
                headers: &[],
                body: &[],
            },
            Duration::from_secs(20),
        )
    }

    /// `program` run inside the node's network and mount namespaces (`nsenter`).
    pub fn command(&self, program: &str) -> Command {
        namespaces::command(self.pid, program)
    }

    /// Runs `program args...` inside the node and requires success.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command(program);
        cmd.args(args);
        process::run(cmd, None, Duration::from_secs(60))?.ok()
    }

    /// runc-architect's default state `Root` inside the node (`/run/containerd/runc-architect`,
    /// private to the node), as the host sees it: where `runc-architect status` reads.
    pub fn architect_root(&self) -> PathBuf {
        self.layout
            .private_dir(Path::new("/run/containerd"))
            .join("runc-architect")
    }

    /// runc-architect's default store inside the node (`/var/lib/runc-architect/store`), as
    /// the host sees it.
    pub fn architect_store(&self) -> PathBuf {
        self.layout
            .private_dir(Path::new(namespaces::RUNC_ARCHITECT_LIB))
            .join("store")
    }

    /// `runc-architect status --json` for the node's shims: one record per container with
    /// hibernation on.
    pub fn hibernation_status(&self) -> Result<Vec<serde_json::Value>> {
        let RegisteredBy::Installer(cli) = &self.registered_by;
        let mut cmd = Command::new(cli);
        cmd.args(["status", "--json", "--root"])
            .arg(self.architect_root());
        let out = process::run(cmd, None, Duration::from_secs(20))?
            .ok()
            .context("runc-architect status --json")?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout_str())
            .with_context(|| format!("status --json printed {:?}", out.stdout_str()))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `runc-architect store ls --json` of the node's default store (what it holds).
    pub fn store_entries(&self) -> Result<String> {
        let RegisteredBy::Installer(cli) = &self.registered_by;
        let store = self.architect_store();
        if !store.exists() {
            return Ok(String::new());
        }
        let mut cmd = Command::new(cli);
        cmd.arg("store")
            .arg("--root")
            .arg(&store)
            .args(["ls", "--json"]);
        let out = process::run(cmd, None, Duration::from_secs(20))?
            .ok()
            .context("runc-architect store ls --json")?;
        Ok(out.stdout_str())
    }

    /// What a test left in the node (see [`leftovers`]); empty when clean.
    pub fn leftovers(&self) -> Vec<String> {
        leftovers::leftovers(self)
    }

    /// Stops everything and removes everything (also done on drop).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let running = matches!(child.try_wait(), Ok(None));
        let mut pod_netns = Vec::new();
        if running {
            // Gracefully first: the shims exit and clean up after themselves.
            self.ctr()
                .with_timeout(Duration::from_secs(20))
                .remove_all();
            pod_netns = reap::pod_netns_ids(self.pid);
        }
        if let Some(mut r) = self.registry.take() {
            r.stop();
        }
        reap::stop_process(self.pid as i32, Duration::from_secs(10));
        let _ = child.wait();
        reap::cleanup_node_dir(&self.layout, &pod_netns);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts containerd by the namespace script, its output into the node's log.
fn spawn_containerd(version: Version, layout: &Layout) -> Result<Child> {
    let argv = vec![
        version.containerd_bin().display().to_string(),
        "--config".to_string(),
        layout.config().display().to_string(),
    ];
    let script = namespaces::setup_script(layout, &argv)?;
    std::fs::write(layout.ns_script(), script)?;
    let log = File::create(layout.log())?;
    let mut cmd = namespaces::unshare_command(&layout.ns_script())?;
    cmd.env_clear()
        .env("PATH", daemon_path(version, layout))
        .env("HOME", "/root")
        .env("TMPDIR", layout.tmp())
        .current_dir(&layout.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn().with_context(|| {
        format!(
            "start {} in new namespaces",
            version.containerd_bin().display()
        )
    })
}

/// The daemon's PATH: the node's bin dir (the installed shim), the version's own binaries
/// (its stock shim), the system (runc; CRIU in /usr/local/sbin first).
fn daemon_path(version: Version, layout: &Layout) -> String {
    format!(
        "{}:{}:{}",
        layout.bin().display(),
        version.bin_dir().display(),
        paths::SYSTEM_PATH
    )
}

/// TCP ports `pid` listens on at 127.0.0.1 (from the /proc view of its network namespace
/// and its socket descriptors).
fn listening_ports(pid: u32) -> Result<Vec<u16>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))?;
    let mut by_inode = std::collections::BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        let (Some(local), Some(st), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
            continue;
        };
        if *st != "0A" {
            continue;
        }
        let Some((ip, port)) = local.split_once(':') else {
            continue;
        };
        if ip != "0100007F" {
            continue;
        }
        if let Ok(port) = u16::from_str_radix(port, 16) {
            by_inode.insert(inode.to_string(), port);
        }
    }
    let mut ports = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(l) = std::fs::read_link(e.path()) {
            let l = l.to_string_lossy();
            if let Some(ino) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Some(p) = by_inode.get(ino) {
                    ports.push(*p);
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}
