//! The CRI test node itself, on containerd 1.7 and 2.1 (`runc_architect_tests::node`).
//!
//! Per version one node serves the trials of the stock runtime (the nodes of both versions
//! run at the same time), and a second one runc-architect's pods. Per version:
//!
//! - `node`: CRI answers (Version, Status with RuntimeReady and NetworkReady), the pause,
//!   busybox and checkpoint images are in `k8s.io`, containerd runs in network and mount
//!   namespaces that are not the host's, with loopback up, the cgroup hierarchies (v1
//!   controllers and the unified one) and CRIU's kdat cache in /run/criu visible, and private
//!   directories over /run/containerd, /run/netns and /var/lib/cni.
//! - `pods::runc` and `pods::runc-architect`: two pods on the CNI network under that handler,
//!   each a busybox httpd: both get an IP of the pod subnet, both answer from the node's
//!   network namespace, the second reaches the first (it fetches the first's page by IP and
//!   serves it), the first's host port mapping answers on the node's bridge address, CRI Exec
//!   works through the streaming server inside the node; after the kubelet's pod deletion
//!   nothing is left in the node ([`Node::leftovers`]).
//! - `registry_pull`: an image pushed only to the node's registry is pulled through CRI
//!   (`PullImage`, by digest and by tag) and runs.
//! - `registration_as_runc`: the installer's other form (`io.containerd.runc.v2` +
//!   `runtime_path`, with an option) as containerd reads it.
//!
//! Once: `stale_node_reaped`: a child run of this binary starts a node with a running pod and
//! exits without dropping it; the reaper removes all of it. With both versions: `isolation`:
//! a pod with the same namespace, name and uid on both nodes; each node lists only its own
//! sandbox and holds only its own state.
//!
//! After the trials the nodes are dropped and the host is compared with its state before the
//! run ([`runc_architect_tests::node::host`]): links, named network namespaces, iptables
//! rules, mounts, /run/containerd, /var/lib/cni and the top-level cgroups must show nothing
//! new of a test node (`RA_NODE_HOST_CHECK=0` skips the check).
//!
//! The trials of one node run one at a time (each checks the whole node for leftovers); the
//! two nodes' trials run side by side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use libtest_mimic::{Failed, Trial};
use runc_architect_tests::cleanup;
use runc_architect_tests::cri::api;
use runc_architect_tests::cri::stream::ExecOptions;
use runc_architect_tests::cri::{ContainerSpec, Kubelet, Timeouts};
use runc_architect_tests::image::ImageBuilder;
use runc_architect_tests::node::host::HostState;
use runc_architect_tests::node::{config, namespaces};
use runc_architect_tests::node::{
    Node, NodeOptions, Registration, ARCHITECT_HANDLER, NODE_BRIDGE_IP, POD_SUBNET, RUNC_HANDLER,
};
use runc_architect_tests::poll::wait_for;
use runc_architect_tests::process;
use runc_architect_tests::suite::{self, LazyShared};
use runc_architect_tests::Version;

/// How long a trial waits for something it expects.
const WAIT: Duration = Duration::from_secs(30);
/// The CRI deadlines of these trials (the kubelet's 2 min would only make a hang slower).
const CRI_TIMEOUTS: Timeouts = Timeouts {
    request: Duration::from_secs(40),
    pull: Duration::from_secs(60),
    connect: Duration::from_secs(10),
};
/// The pods' grace period at deletion (busybox httpd as PID 1 ignores SIGTERM).
const GRACE: i64 = 2;
/// The host port mapped to the first pod's port 80.
const HOST_PORT: i32 = 8080;

/// A node and the lock its trials take: each trial checks the whole node for leftovers, so
/// the trials of one node run one at a time (the two nodes' trials run side by side).
struct Env {
    node: Node,
    lock: Mutex<()>,
}

type Shared = Arc<LazyShared<Env>>;

fn start(version: Version) -> Result<Env> {
    version.check_installed()?;
    let node = Node::start(NodeOptions::new(version)?)?;
    eprintln!(
        "{version}: node {} (containerd pid {}, streaming port {}, registered by {:?})",
        node.dir().display(),
        node.pid(),
        node.stream_port(),
        node.registered_by()
    );
    Ok(Env {
        node,
        lock: Mutex::new(()),
    })
}

fn trial(name: String, env: Shared, f: fn(&Node) -> Result<()>) -> Trial {
    Trial::test(name, move || {
        let env = env.get()?;
        let _one_at_a_time = env.lock.lock().unwrap_or_else(|e| e.into_inner());
        let node = &env.node;
        f(node).map_err(|e| {
            Failed::from(format!(
                "{e:#}\n--- containerd log (tail) ---\n{}",
                node.log_tail(30)
            ))
        })
    })
}

fn main() {
    if let Ok(series) = std::env::var(ABANDON_ENV) {
        abandon_a_node(&series);
    }
    let args = suite::arguments();
    let before = HostState::now();
    let mut trials = Vec::new();
    let mut envs: BTreeMap<Version, Shared> = BTreeMap::new();
    let mut all_envs: Vec<Shared> = Vec::new();
    match Version::selected() {
        Ok(versions) => {
            for v in versions {
                let env: Shared = Arc::new(LazyShared::new(move || start(v)));
                // runc-architect's pods get a node of their own: what a shim under test
                // leaves behind must not fail the stock runtime's trials.
                let architect_env: Shared = Arc::new(LazyShared::new(move || start(v)));
                envs.insert(v, env.clone());
                all_envs.push(env.clone());
                all_envs.push(architect_env.clone());
                let s = v.series();
                trials.push(trial(format!("{s}::node"), env.clone(), node_is_up));
                trials.push(trial(format!("{s}::pods::runc"), env.clone(), |n| {
                    pods(n, RUNC_HANDLER)
                }));
                trials.push(trial(
                    format!("{s}::pods::runc-architect"),
                    architect_env,
                    |n| pods(n, ARCHITECT_HANDLER),
                ));
                trials.push(trial(format!("{s}::registry_pull"), env, registry_pull));
                trials.push(Trial::test(
                    format!("{s}::registration_as_runc"),
                    move || registration_as_runc(v).map_err(|e| Failed::from(format!("{e:#}"))),
                ));
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            trials.push(Trial::test("select-containerd-versions", move || {
                Err(msg.clone().into())
            }));
        }
    }
    if let Some(v) = envs.keys().next().copied() {
        trials.push(Trial::test("stale_node_reaped", move || {
            stale_node_reaped(v).map_err(|e| Failed::from(format!("{e:#}")))
        }));
    }
    if let (Some(a), Some(b)) = (envs.get(&Version::V1_7), envs.get(&Version::V2_1)) {
        let (a, b) = (a.clone(), b.clone());
        trials.push(Trial::test("isolation", move || {
            let (a, b) = (a.get()?, b.get()?);
            let _a = a.lock.lock().unwrap_or_else(|e| e.into_inner());
            let _b = b.lock.lock().unwrap_or_else(|e| e.into_inner());
            isolation(&a.node, &b.node).map_err(|e| Failed::from(format!("{e:#}")))
        }));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    drop(envs);
    for e in &all_envs {
        e.shutdown();
    }
    if let Err(left) = before.check_after() {
        eprintln!("host check FAILED: {left}");
        std::process::exit(101);
    }
    conclusion.exit()
}

fn kubelet(node: &Node, handler: &str) -> Result<Kubelet> {
    node.kubelet_with(handler, CRI_TIMEOUTS)
}

// ---------------------------------------------------------------------------------------------

fn node_is_up(node: &Node) -> Result<()> {
    let k = kubelet(node, RUNC_HANDLER)?;
    let v = k.version()?;
    ensure!(
        v.runtime_name == "containerd",
        "runtime_name {:?}",
        v.runtime_name
    );
    ensure!(
        v.runtime_api_version == "v1",
        "runtime_api_version {:?}",
        v.runtime_api_version
    );
    let status = k.cri().status(api::StatusRequest { verbose: false })?;
    let conditions: BTreeMap<String, bool> = status
        .status
        .map(|s| {
            s.conditions
                .into_iter()
                .map(|c| (c.r#type, c.status))
                .collect()
        })
        .unwrap_or_default();
    for c in ["RuntimeReady", "NetworkReady"] {
        ensure!(
            conditions.get(c) == Some(&true),
            "CRI Status {c} not true: {conditions:?}"
        );
    }

    let images = node.ctr().images()?;
    let want = node.images().context("test images")?;
    for name in [&want.pause, &want.busybox, &want.ckpt] {
        ensure!(images.contains(name), "{name} not in k8s.io: {images:?}");
    }

    for kind in ["net", "mnt"] {
        let inside = namespaces::ns_id(node.pid(), kind)?;
        ensure!(
            inside != namespaces::own_ns_id(kind)?,
            "containerd is in the host's {kind} namespace"
        );
    }
    let links = node.run("ip", &["-o", "link", "show", "lo"])?.stdout_str();
    ensure!(links.contains("UP"), "lo is not up inside: {links}");
    let pid = node.pid();
    let unified = namespaces::mount_type(pid, Path::new("/sys/fs/cgroup/unified"))?;
    ensure!(
        unified.as_deref() == Some("cgroup2"),
        "/sys/fs/cgroup/unified inside: {unified:?}"
    );
    let memory = namespaces::mount_type(pid, Path::new("/sys/fs/cgroup/memory"))?;
    ensure!(
        memory.as_deref() == Some("cgroup"),
        "/sys/fs/cgroup/memory inside: {memory:?}"
    );
    let criu = namespaces::mount_type(pid, Path::new("/run/criu"))?;
    ensure!(
        criu.as_deref() == Some("tmpfs"),
        "/run/criu inside: {criu:?}"
    );
    let kdat = Path::new("/proc")
        .join(pid.to_string())
        .join("root/run/criu/criu.kdat");
    ensure!(
        kdat.exists(),
        "CRIU's kdat cache is not visible inside ({})",
        kdat.display()
    );
    for global in namespaces::private_paths() {
        let from = node.layout().private_dir(&global);
        let seen = node.run(
            "findmnt",
            &["-n", "-o", "SOURCE", &global.display().to_string()],
        )?;
        ensure!(
            seen.stdout_str().contains(&from.display().to_string()),
            "{} inside is not the node's {}: {}",
            global.display(),
            from.display(),
            seen.stdout_str()
        );
    }
    let stream: SocketAddr = format!("127.0.0.1:{}", node.stream_port()).parse()?;
    node.connect_tcp(stream).with_context(|| {
        format!("connect to CRI's streaming server at {stream} inside the node")
    })?;
    ensure!(
        node.leftovers().is_empty(),
        "a fresh node has leftovers: {:#?}",
        node.leftovers()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// A busybox httpd serving `index` as its page and, when `peer` is given, the page of
/// `http://<peer>/` as `/peer.html` (fetched from inside this pod, again and again).
fn httpd(image: &str, index: &str, peer: Option<&str>) -> ContainerSpec {
    let fetch = match peer {
        Some(ip) => format!(
            "(while true; do {get} | tail -n 1 > /www/peer.tmp && [ -s /www/peer.tmp ] && mv /www/peer.tmp /www/peer.html; sleep 0.2; done) & ",
            get = http_get_in_pod(ip)
        ),
        None => String::new(),
    };
    let script = format!(
        "mkdir -p /www; echo {index} > /www/index.html; {fetch}exec httpd -f -p 80 -h /www"
    );
    ContainerSpec::new("web", image).command(&["sh", "-c", &script])
}

/// A shell pipeline that GETs `http://<ip>/` from inside a pod (busybox `nc`: Debian's
/// static busybox `wget` crashes).
fn http_get_in_pod(ip: &str) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80")
}

/// Polls `GET http://addr/path` from inside the node until the body (trimmed) is `want`.
fn wait_page(node: &Node, addr: SocketAddr, path: &str, want: &str) -> Result<()> {
    let mut last = String::new();
    let r = wait_for(
        &format!("http://{addr}{path} to answer {want:?}"),
        WAIT,
        || match node.http_get(addr, path) {
            Ok(r) if r.status == 200 && r.body_str().trim() == want => Some(()),
            Ok(r) => {
                last = format!("{} {:?}", r.status, r.body_str());
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        },
    );
    r.with_context(|| format!("last answer: {last}"))
}

fn in_pod_subnet(ip: &str) -> Result<bool> {
    let (net, bits) = POD_SUBNET.split_once('/').context("subnet")?;
    let net: std::net::Ipv4Addr = net.parse()?;
    let bits: u32 = bits.parse()?;
    let ip: std::net::Ipv4Addr = ip.parse().with_context(|| format!("pod IP {ip:?}"))?;
    let mask = u32::MAX << (32 - bits);
    Ok(u32::from(ip) & mask == u32::from(net) & mask)
}

fn pods(node: &Node, handler: &str) -> Result<()> {
    let k = kubelet(node, handler)?;
    let image = node.images().context("test images")?.busybox.clone();
    let tag = format!("{}-{}", handler.replace('-', ""), node.unique());
    let mut spec_a = node.pod_spec("default", &format!("web-a-{tag}"));
    spec_a.port_mappings.push(api::PortMapping {
        protocol: api::Protocol::Tcp as i32,
        container_port: 80,
        host_port: HOST_PORT,
        host_ip: String::new(),
    });
    let pod_a = k.run_pod(spec_a).context("RunPodSandbox a")?;
    let result = (|| -> Result<()> {
        ensure!(
            in_pod_subnet(&pod_a.ip)?,
            "pod a's IP {:?} is not in {POD_SUBNET}",
            pod_a.ip
        );
        k.start_container(&pod_a, &httpd(&image, "pod-a", None))
            .context("start pod a's httpd")?;
        let pod_b = k
            .run_pod(node.pod_spec("default", &format!("web-b-{tag}")))
            .context("RunPodSandbox b")?;
        let r = (|| -> Result<()> {
            ensure!(
                in_pod_subnet(&pod_b.ip)?,
                "pod b's IP {:?} is not in {POD_SUBNET}",
                pod_b.ip
            );
            ensure!(pod_a.ip != pod_b.ip, "both pods got {}", pod_a.ip);
            let id_b = k
                .start_container(&pod_b, &httpd(&image, "pod-b", Some(&pod_a.ip)))
                .context("start pod b's httpd")?;
            let a: SocketAddr = format!("{}:80", pod_a.ip).parse()?;
            let b: SocketAddr = format!("{}:80", pod_b.ip).parse()?;
            wait_page(node, a, "/", "pod-a").context("pod a from the node")?;
            wait_page(node, b, "/", "pod-b").context("pod b from the node")?;
            if let Err(e) = wait_page(node, b, "/peer.html", "pod-a") {
                let probe = k.exec_sync(
                    &id_b,
                    &["sh", "-c", &http_get_in_pod(&pod_a.ip)],
                    Duration::from_secs(10),
                );
                return Err(e.context(format!("pod b reaching pod a (GET from pod b: {probe:?})")));
            }
            let host_port: SocketAddr = format!("{NODE_BRIDGE_IP}:{HOST_PORT}").parse()?;
            wait_page(node, host_port, "/", "pod-a").context("pod a's host port")?;
            // CRI Exec's URL is on the streaming server inside the node: the kubelet from
            // Node::kubelet connects there from the node's network namespace.
            let r = k
                .exec(
                    &id_b,
                    &["cat", "/www/index.html"],
                    ExecOptions {
                        timeout: WAIT,
                        ..ExecOptions::default()
                    },
                )
                .context("Exec in pod b")?;
            ensure!(
                r.exit_code == Some(0) && String::from_utf8_lossy(&r.stdout).trim() == "pod-b",
                "Exec in pod b: exit {:?}, stdout {:?}, stderr {:?}",
                r.exit_code,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
            Ok(())
        })();
        let killed = k.kill_pod(&pod_b, Some(GRACE)).context("delete pod b");
        r.and(killed)
    })();
    let killed = k.kill_pod(&pod_a, Some(GRACE)).context("delete pod a");
    result.and(killed)?;
    expect_no_leftovers(node)
}

/// Waits (bounded: shims exit after the deletion) until the node has no leftovers.
fn expect_no_leftovers(node: &Node) -> Result<()> {
    let mut last = Vec::new();
    let r = wait_for("the node to be clean", Duration::from_secs(15), || {
        last = node.leftovers();
        last.is_empty().then_some(())
    });
    r.with_context(|| format!("left in the node:\n  {}", last.join("\n  ")))
}

// ---------------------------------------------------------------------------------------------

fn registry_pull(node: &Node) -> Result<()> {
    let k = kubelet(node, RUNC_HANDLER)?;
    let marker = format!("pushed for {}", node.unique());
    let image = ImageBuilder::busybox("pushed")?.file(
        "etc/pushed",
        format!("{marker}\n").into_bytes(),
        0o644,
    );
    let repo = format!("runc-architect-test/pushed-{}", node.unique());
    let pushed = node.push_image(&image, &repo, "v1")?;
    let local = node.ctr().images()?;
    ensure!(
        !local.contains(&pushed.reference),
        "{} is already local",
        pushed.reference
    );

    // By digest first (what a CRI restore of a checkpoint does for its base image), then by tag.
    for reference in [&pushed.digest_reference, &pushed.reference] {
        let r = k
            .cri()
            .pull_image(api::PullImageRequest {
                image: Some(api::ImageSpec {
                    image: reference.clone(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            })
            .with_context(|| format!("PullImage {reference}"))?;
        ensure!(
            !r.image_ref.is_empty(),
            "PullImage {reference}: no image_ref"
        );
    }
    let st = k.cri().image_status(api::ImageStatusRequest {
        image: Some(api::ImageSpec {
            image: pushed.reference.clone(),
            ..Default::default()
        }),
        verbose: false,
    })?;
    let img = st
        .image
        .context("ImageStatus: the pulled image is unknown")?;
    ensure!(
        img.repo_digests
            .iter()
            .any(|d| d.ends_with(&pushed.manifest_digest)),
        "repo digests {:?} lack {}",
        img.repo_digests,
        pushed.manifest_digest
    );

    // It runs: a pod whose container prints the marker file of the pushed image.
    let pod = k.run_pod(node.pod_spec("default", &format!("pulled-{}", node.unique())))?;
    let r = (|| -> Result<()> {
        let id = k.start_container(
            &pod,
            &ContainerSpec::new("pulled", &pushed.reference).command(&[
                "sh",
                "-c",
                "cat /etc/pushed; exec sleep 1000",
            ]),
        )?;
        let log = pod.container_log_path("pulled", 0);
        let mut seen = String::new();
        let found = wait_for("the container's log to show the marker", WAIT, || {
            seen = std::fs::read_to_string(&log).unwrap_or_default();
            seen.contains(&marker).then_some(())
        });
        found.with_context(|| format!("container {id}, log {}: {seen:?}", log.display()))
    })();
    let killed = k.kill_pod(&pod, Some(GRACE)).context("delete the pod");
    r.and(killed)?;
    k.cri().remove_image(api::RemoveImageRequest {
        image: Some(api::ImageSpec {
            image: pushed.reference.clone(),
            ..Default::default()
        }),
    })?;
    expect_no_leftovers(node)
}

// ---------------------------------------------------------------------------------------------

/// The same pod on both nodes: neither sees the other's.
fn isolation(a: &Node, b: &Node) -> Result<()> {
    let ka = kubelet(a, RUNC_HANDLER)?;
    let kb = kubelet(b, RUNC_HANDLER)?;
    let spec_a = a.pod_spec("isolation", "same-pod");
    let mut spec_b = b.pod_spec("isolation", "same-pod");
    spec_b.uid = spec_a.uid.clone();
    spec_b.cgroup_parent = b.pod_cgroup_parent(&spec_a.uid);
    spec_b.pod_dir = b.layout().kubelet_pods().join(&spec_a.uid);
    let pa = ka.run_pod(spec_a)?;
    let pb = kb.run_pod(spec_b)?;
    let r = (|| -> Result<()> {
        for (k, own, other) in [(&ka, &pa, &pb), (&kb, &pb, &pa)] {
            let filter = api::PodSandboxFilter {
                label_selector: [(
                    "io.kubernetes.pod.namespace".to_string(),
                    "isolation".to_string(),
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            };
            let ids: Vec<String> = k
                .list_pods(Some(filter))?
                .into_iter()
                .map(|p| p.id)
                .collect();
            ensure!(
                ids == vec![own.sandbox_id.clone()],
                "{ids:?}: expected only {}",
                own.sandbox_id
            );
            ensure!(
                !ids.contains(&other.sandbox_id),
                "sees the other node's sandbox"
            );
        }
        for (node, own, other) in [(a, &pa, &pb), (b, &pb, &pa)] {
            let containers = node.ctr().containers()?;
            ensure!(
                containers.contains(&own.sandbox_id),
                "{containers:?} lacks its own sandbox"
            );
            ensure!(
                !containers.contains(&other.sandbox_id),
                "{containers:?} has the other's sandbox"
            );
            let veths = node
                .run("ip", &["-o", "link", "show", "type", "veth"])?
                .stdout_str();
            ensure!(
                veths.lines().count() == 1,
                "expected one veth in the node: {veths}"
            );
            // runc's state (the handler's private Root) holds this node's sandbox only.
            let state: Vec<String> = std::fs::read_dir(node.layout().runc_root().join("k8s.io"))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            ensure!(
                state.contains(&own.sandbox_id) && !state.contains(&other.sandbox_id),
                "runc state of the node: {state:?}"
            );
        }
        Ok(())
    })();
    let ra = ka.kill_pod(&pa, Some(GRACE));
    let rb = kb.kill_pod(&pb, Some(GRACE));
    r?;
    ra?;
    rb?;
    expect_no_leftovers(a)?;
    expect_no_leftovers(b)
}

// ---------------------------------------------------------------------------------------------

/// A node with runc-architect registered as `io.containerd.runc.v2` + `runtime_path`, with an
/// option: containerd's merged configuration shows that handler, and CRI serves.
fn registration_as_runc(version: Version) -> Result<()> {
    let opts = NodeOptions {
        registry: false,
        test_images: false,
        ..NodeOptions::new(version)?
    }
    .registration(Registration::as_runc().option("NoPivotRoot", true));
    let node = Node::start(opts)?;
    let mut cmd = std::process::Command::new(version.containerd_bin());
    cmd.arg("--config")
        .arg(node.layout().config())
        .args(["config", "dump"]);
    let dump: toml_edit::DocumentMut = process::run(cmd, None, Duration::from_secs(30))?
        .ok()?
        .stdout_str()
        .parse()
        .context("parse `containerd config dump`")?;
    let h = &dump["plugins"][config::cri_runtime_plugin(version)]["containerd"]["runtimes"]
        [ARCHITECT_HANDLER];
    ensure!(
        h["runtime_type"].as_str() == Some("io.containerd.runc.v2"),
        "runtime_type {:?}",
        h["runtime_type"].as_str()
    );
    let path = h["runtime_path"].as_str().context("no runtime_path")?;
    ensure!(
        Path::new(path).starts_with(node.layout().bin()),
        "runtime_path {path} is not in the node's bin dir"
    );
    ensure!(
        h["options"]["NoPivotRoot"].as_bool() == Some(true),
        "options {:?}",
        h["options"].to_string()
    );
    kubelet(&node, ARCHITECT_HANDLER)?.version()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Set for a child run of this binary that starts a node of that series, runs a pod in it,
/// prints what it made and exits without dropping anything (a run killed mid-test).
const ABANDON_ENV: &str = "RA_NODE_SMOKE_ABANDON";

fn abandon_a_node(series: &str) -> ! {
    let r = (|| -> Result<()> {
        let v = Version::parse(series).context("series")?;
        let node = Node::start(NodeOptions::new(v)?)?;
        let k = kubelet(&node, RUNC_HANDLER)?;
        let image = node.images().context("test images")?.busybox.clone();
        let pod = k.run_pod(node.pod_spec("default", "abandoned"))?;
        k.start_container(
            &pod,
            &ContainerSpec::new("sleep", &image).command(&["sleep", "1000"]),
        )?;
        println!(
            "ABANDONED {} {} {} {} {}",
            node.pid(),
            node.cgroup_parent(),
            namespaces::ns_id(node.pid(), "net")?,
            namespaces::ns_id(node.pid(), "mnt")?,
            node.dir().display()
        );
        // Neither the pod nor the node is dropped: exit runs no destructors.
        std::mem::forget(pod);
        std::mem::forget(node);
        Ok(())
    })();
    match r {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e:#}");
            std::process::exit(1)
        }
    }
}

/// A node whose test process died without dropping it (pod running) is removed entirely by
/// the next run's reaper: containerd, shims, the pod's processes, the namespaces, the
/// cgroups, the directory.
fn stale_node_reaped(version: Version) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.env(ABANDON_ENV, version.series());
    let out = process::run(cmd, None, Duration::from_secs(180))?.ok()?;
    let line = out
        .stdout_str()
        .lines()
        .find_map(|l| l.strip_prefix("ABANDONED ").map(str::to_string))
        .context("the child printed no ABANDONED line")?;
    let words: Vec<&str> = line.splitn(5, ' ').collect();
    let [pid, parent, net, mnt, dir] = words[..] else {
        anyhow::bail!("malformed line {line:?}");
    };
    let pid: i32 = pid.parse()?;
    let dir = std::path::PathBuf::from(dir);
    let ns = vec![net.to_string(), mnt.to_string()];
    ensure!(
        ns.iter()
            .all(|n| n.starts_with("net:[") || n.starts_with("mnt:[")),
        "namespace ids {ns:?}"
    );
    // (Another trial's Node::start may reap it first: the checks below hold either way.)
    runc_architect_tests::node::reap::reap_stale_nodes();
    ensure!(!dir.exists(), "{} is still there", dir.display());
    ensure!(!cleanup::is_alive(pid), "containerd {pid} still runs");
    let left = namespaces::processes_in(&ns);
    ensure!(
        left.is_empty(),
        "processes still in the node's namespaces {ns:?}: {left:?}"
    );
    for root in cleanup::cgroup_roots() {
        let cg = root.join(parent.trim_start_matches('/'));
        ensure!(!cg.exists(), "cgroup {} is still there", cg.display());
    }
    Ok(())
}
