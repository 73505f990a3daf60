//! Development check against a real containerd 2.1 CRI plugin (ignored by default: it needs
//! root and `scripts/setup`'s containerd). It starts a throwaway private daemon with the
//! minimal CRI configuration of scripts/CONTAINERD-NOTES.md, imports a pause and a busybox
//! image, and drives a host-network pod under the stock `runc` handler through everything
//! the client offers: ExecSync, Exec with stdin (half-close), nonzero exit codes, a terminal
//! with resizes, Attach, PortForward, logs, stats, deadlines and error codes.
//!
//! `cargo test -p runc-architect-tests --lib cri::live_tests -- --ignored --nocapture`

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::api;
use super::kubelet::{ContainerSpec, Kubelet, PodSpec};
use super::logs::{self, LogStream};
use super::stream::{ExecOptions, Output, Session, SessionOptions, StreamError, TerminalSize};
use crate::ctr::Ctr;
use crate::image::ImageBuilder;
use crate::{cleanup, containerd, paths::Version};

const PAUSE: &str = "localhost/runc-architect/pause:latest";
const BUSYBOX: &str = "localhost/runc-architect/busybox:latest";

/// A private containerd with CRI, removed with everything it started on drop.
struct DevNode {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    cgroup: String,
}

impl DevNode {
    fn start() -> Result<DevNode> {
        let v = Version::V2_1;
        v.check_installed()?;
        let dir = containerd::temp_base().join(format!("ra-cri-dev-{}", std::process::id()));
        cleanup::remove_tree(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("containerd.sock");
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let config = format!(
            r#"version = 3
root = {root}
state = {state}
temp = {tmp}

[grpc]
  address = {sock}

[plugins.'io.containerd.internal.v1.opt']
  path = {opt}

[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE}"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = {cni}
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        Root = {runc}
"#,
            root = q(&dir.join("root")),
            state = q(&dir.join("state")),
            tmp = q(&dir.join("tmp")),
            sock = q(&socket),
            opt = q(&dir.join("opt")),
            cni = q(&dir.join("cni")),
            runc = q(&dir.join("runc")),
        );
        for d in [
            "root", "state", "tmp", "opt", "cni", "runc", "fifo", "images",
        ] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(dir.join("config.toml"), config)?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new(v.containerd_bin())
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env_clear()
            .env(
                "PATH",
                format!("{}:{}", v.bin_dir().display(), crate::paths::SYSTEM_PATH),
            )
            .env("TMPDIR", dir.join("tmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        let node = DevNode {
            cgroup: format!("ra-cri-dev-{}", std::process::id()),
            dir,
            socket,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.socket.exists() {
            if Instant::now() > deadline {
                bail!("containerd did not serve: {}", node.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let ctr = Ctr::new(
            v.ctr_bin(),
            node.socket.clone(),
            "k8s.io".into(),
            node.dir.join("fifo"),
        );
        ImageBuilder::busybox(PAUSE)?
            .cmd(&["sleep", "1000000000"])
            .import(&ctr, &node.dir.join("images"))?;
        ImageBuilder::busybox(BUSYBOX)?.import(&ctr, &node.dir.join("images"))?;
        Ok(node)
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let pids = cleanup::processes_with_arg(&format!("{}", self.dir.display()));
        cleanup::kill_and_wait(&pids);
        cleanup::remove_cgroup_tree(&self.cgroup);
        cleanup::remove_tree(&self.dir);
    }
}

/// Runs `stty size` in the session's shell until it prints `want` (rows, columns).
fn expect_size(s: &mut Session, want: &str) -> Result<()> {
    let mut last = Vec::new();
    for _ in 0..10 {
        s.take_output()?;
        s.write_stdin(b"stty size\n", Duration::from_secs(5))?;
        match s.read_until(Output::Stdout, want.as_bytes(), Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(StreamError::Timeout { .. }) => last = s.stdout_so_far()?.to_vec(),
            Err(e) => return Err(e.into()),
        }
    }
    bail!(
        "the terminal never showed {want:?} (last output {:?})",
        String::from_utf8_lossy(&last)
    )
}

fn sh(cmd: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), cmd.into()]
}

#[test]
#[ignore = "needs root and containerd 2.1 from scripts/setup"]
fn kubelet_against_containerd_2_1_cri() -> Result<()> {
    let node = DevNode::start()?;
    let r = drive(&node);
    if r.is_err() {
        eprintln!("containerd log tail:\n{}", node.log_tail());
    }
    r
}

fn drive(node: &DevNode) -> Result<()> {
    let kubelet = Kubelet::new(&node.socket, "runc", &node.dir.join("pod-logs"))?;
    let v = kubelet.version()?;
    eprintln!(
        "runtime {} {} (CRI {})",
        v.runtime_name, v.runtime_version, v.runtime_api_version
    );
    let st = kubelet
        .cri()
        .status(api::StatusRequest { verbose: false })?;
    let conditions: Vec<(String, bool)> = st
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().map(|c| (c.r#type.clone(), c.status)))
        .collect();
    eprintln!("status conditions: {conditions:?}");
    assert!(
        conditions.contains(&("RuntimeReady".into(), true)),
        "{conditions:?}"
    );

    let mut spec = PodSpec::new("default", "cri-dev", &node.dir.join("pods").join("cri-dev"));
    spec.host_network = true;
    spec.cgroup_parent = format!("/{}/pod{}", node.cgroup, spec.uid);
    spec.labels
        .insert("pod-template-hash".into(), "6d4cf56db6".into());
    let pod = kubelet.run_pod(spec)?;
    eprintln!("sandbox {} ip {:?}", pod.sandbox_id, pod.ip);
    let ps = pod.status.status.as_ref().context("sandbox status")?;
    assert_eq!(ps.state, api::PodSandboxState::SandboxReady as i32);
    assert_eq!(ps.labels["pod-template-hash"], "6d4cf56db6");
    assert_eq!(ps.runtime_handler, "runc");

    let mut main = ContainerSpec::new("main", BUSYBOX);
    main.command = sh(
        "echo hello-from-main; echo err-line >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; printf partial; exec sleep 1000000",
    );
    let main_id = kubelet.start_container(&pod, &main)?;
    let cs = kubelet.container_status(&main_id)?;
    assert_eq!(cs.state, api::ContainerState::ContainerRunning as i32);
    assert_eq!(cs.labels["io.kubernetes.container.name"], "main");
    assert!(cs.image_ref.starts_with("sha256:"), "{}", cs.image_ref);
    assert!(
        cs.mounts.iter().any(|m| m.container_path == "/etc/hosts"),
        "{:?}",
        cs.mounts
    );
    assert!(
        cs.mounts
            .iter()
            .any(|m| m.container_path == "/dev/termination-log"),
        "{:?}",
        cs.mounts
    );

    // ExecSync: output and exit code; the kubelet-managed hosts file is mounted.
    let r = kubelet.exec_sync(
        &main_id,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        Duration::from_secs(10),
    )?;
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 3)
    );
    let hosts = kubelet.exec_sync(
        &main_id,
        &["head", "-1", "/etc/hosts"],
        Duration::from_secs(10),
    )?;
    assert_eq!(
        String::from_utf8_lossy(&hosts.stdout),
        "# Kubernetes-managed hosts file (host network).\n"
    );
    // Our deadline vs a real error: both are typed with their gRPC codes.
    let slow = kubelet.cri().exec_sync_within(
        api::ExecSyncRequest {
            container_id: main_id.clone(),
            cmd: vec!["sleep".into(), "5".into()],
            timeout: 0,
        },
        Duration::from_millis(500),
    );
    let e = slow.expect_err("deadline");
    assert!(e.is_deadline_exceeded(), "{e}");
    let missing = kubelet
        .exec_sync("no-such-container", &["true"], Duration::from_secs(5))
        .expect_err("missing container");
    assert_eq!(missing.code(), Some(tonic::Code::NotFound), "{missing}");
    // ExecSync's own timeout: containerd kills the command.
    let t0 = Instant::now();
    let timed = kubelet.exec_sync(&main_id, &["sleep", "30"], Duration::from_secs(1));
    eprintln!(
        "ExecSync past its timeout after {:?}: {timed:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(20));
    // containerd ends it with the server's DeadlineExceeded (the kubelet's "command timed out").
    match timed {
        Err(super::KubeletError::Cri(super::CriError::Rpc {
            code,
            client_deadline,
            ..
        })) => {
            assert_eq!(
                (code, client_deadline),
                (tonic::Code::DeadlineExceeded, false)
            );
        }
        other => bail!("ExecSync past its timeout: {other:?}"),
    }

    // Exec with stdin, half-closed: cat echoes and exits 0.
    let r = kubelet.exec(
        &main_id,
        &["cat"],
        ExecOptions {
            stdin: Some(b"hello\nworld\n".to_vec()),
            ..ExecOptions::default()
        },
    )?;
    assert_eq!(r.protocol, "v4.channel.k8s.io");
    assert_eq!(r.stdout_str(), "hello\nworld\n");
    assert_eq!(r.exit_code, Some(0), "{:?}", r.status);
    eprintln!("exec cat: {:?}", r.stats);

    // Several windows' worth of stdin and stdout (spdystream does no flow control; we send
    // WINDOW_UPDATEs anyway).
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let r = kubelet.exec(
        &main_id,
        &["cat"],
        ExecOptions {
            stdin: Some(big.clone()),
            stderr: false,
            timeout: Duration::from_secs(60),
            ..ExecOptions::default()
        },
    )?;
    assert_eq!(r.stdout.len(), big.len());
    assert!(r.stdout == big, "cat returned different bytes");
    assert!(r.stats.window_updates_out > 0, "{:?}", r.stats);
    eprintln!("exec 300 KB: {:?}", r.stats);

    // A command that exits without reading its input: the session still ends with its
    // status, whatever part of the input was written before the server closed.
    let r = kubelet.exec(
        &main_id,
        &["sh", "-c", "echo early; exit 4"],
        ExecOptions {
            stdin: Some(vec![b'z'; 1024]),
            ..ExecOptions::default()
        },
    )?;
    assert_eq!((r.stdout_str().as_str(), r.exit_code), ("early\n", Some(4)));

    // A nonzero exit code from the v4 status.
    let r = kubelet.exec(
        &main_id,
        &["sh", "-c", "echo bye; echo oops >&2; exit 7"],
        ExecOptions::default(),
    )?;
    assert_eq!(
        (
            r.stdout_str().as_str(),
            r.stderr_str().as_str(),
            r.exit_code
        ),
        ("bye\n", "oops\n", Some(7))
    );
    assert_eq!(
        r.status.as_ref().map(|s| s.reason.as_str()),
        Some("NonZeroExitCode")
    );

    // A command that cannot start: a failure status without an exit code.
    let r = kubelet.exec(&main_id, &["/no/such/binary"], ExecOptions::default())?;
    assert_eq!(r.exit_code, None);
    let why = r.error().unwrap_or_default();
    assert!(
        why.starts_with("InternalError: ") && why.contains("/no/such/binary"),
        "{why}"
    );

    // A used token is refused (404).
    let url = kubelet
        .cri()
        .exec(api::ExecRequest {
            container_id: main_id.clone(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })?
        .url;
    let first = super::stream::exec(
        &url,
        super::stream::direct,
        ExecOptions {
            stderr: false,
            ..ExecOptions::default()
        },
    )?;
    assert_eq!(first.exit_code, Some(0));
    match super::stream::exec(&url, super::stream::direct, ExecOptions::default()) {
        Err(StreamError::Upgrade { status: 404, .. }) => {}
        other => bail!("reused token: want 404, got {other:?}"),
    }

    // A terminal with resizes: `stty size` shows them.
    let mut s = kubelet.exec_session(
        &main_id,
        &["sh"],
        SessionOptions {
            stdin: true,
            stdout: true,
            stderr: true,
            tty: true,
            ..SessionOptions::default()
        },
    )?;
    let rtt = s
        .connection()
        .ping(Instant::now() + Duration::from_secs(5))?;
    eprintln!("SPDY ping round trip {rtt:?}");
    s.resize(
        TerminalSize {
            width: 123,
            height: 45,
        },
        Duration::from_secs(5),
    )?;
    // containerd applies a resize asynchronously (to the shim's console): ask until the
    // new size shows.
    expect_size(&mut s, "45 123")?;
    s.resize(
        TerminalSize {
            width: 80,
            height: 24,
        },
        Duration::from_secs(5),
    )?;
    expect_size(&mut s, "24 80")?;
    s.write_stdin(b"exit 5\n", Duration::from_secs(5))?;
    let r = s.wait(Duration::from_secs(10))?;
    assert_eq!(r.exit_code, Some(5), "{:?}", r.status);
    assert!(r.stderr.is_empty(), "no stderr stream with a tty");

    // Attach to a container started with stdin and a tty.
    let mut interactive = ContainerSpec::new("interactive", BUSYBOX);
    interactive.command = vec!["sh".into()];
    interactive.stdin = true;
    interactive.tty = true;
    let it_id = kubelet.start_container(&pod, &interactive)?;
    let mut a = kubelet.attach_session(
        &it_id,
        SessionOptions {
            stdin: true,
            stdout: true,
            stderr: false,
            tty: true,
            ..SessionOptions::default()
        },
    )?;
    a.resize(
        TerminalSize {
            width: 100,
            height: 30,
        },
        Duration::from_secs(5),
    )?;
    a.write_stdin(b"echo attached-$((6*7))\n", Duration::from_secs(5))?;
    a.read_until(Output::Stdout, b"attached-42", Duration::from_secs(10))?;
    expect_size(&mut a, "30 100")?;
    a.write_stdin(b"exit 0\n", Duration::from_secs(5))?;
    let r = a.wait(Duration::from_secs(20))?;
    eprintln!("attach ended: {:?} {:?}", r.exit_code, r.status);
    assert_eq!(r.exit_code, Some(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = kubelet.container_status(&it_id)?;
        if st.state == api::ContainerState::ContainerExited as i32 {
            assert_eq!(st.exit_code, 0);
            break;
        }
        if Instant::now() > deadline {
            bail!("attached container did not exit: {st:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Port forward (host network: containerd dials localhost:PORT in the node's netns).
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let echo = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut c, _) = listener.accept()?;
        let mut got = [0u8; 4];
        c.read_exact(&mut got)?;
        c.write_all(b"pong:")?;
        c.write_all(&got)?;
        Ok(got.to_vec())
    });
    let pf = kubelet.port_forward(&pod, &[port], Duration::from_secs(10))?;
    let f = pf.connect(port, Duration::from_secs(10))?;
    f.write(b"ping", Duration::from_secs(5))?;
    // containerd does not pass our half-close on to the pod's connection (it copies until
    // one direction ends, then closes both a second later), so the server answers after a
    // fixed 4 bytes and closes; its close reaches us as the data stream's end.
    let back = f.read_to_end(Duration::from_secs(10))?;
    assert_eq!(back, b"pong:ping");
    assert_eq!(
        echo.join().map_err(|_| anyhow::anyhow!("echo thread"))??,
        b"ping"
    );
    assert_eq!(f.error_so_far()?, "");
    drop(pf);

    // Stats, resources, log reopen, listings.
    let stats = kubelet.stats(&main_id)?;
    assert_eq!(
        stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(main_id.as_str())
    );
    assert!(stats.memory.and_then(|m| m.working_set_bytes).is_some());
    kubelet.update_resources(
        &main_id,
        api::LinuxContainerResources {
            cpu_shares: 512,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            ..Default::default()
        },
    )?;
    let after = kubelet.container_status(&main_id)?;
    let res = after
        .resources
        .and_then(|r| r.linux)
        .context("resources in status")?;
    assert_eq!((res.cpu_shares, res.cpu_quota), (512, 50_000));
    kubelet.reopen_log(&main_id)?;
    let listed = kubelet.list_containers(Some(api::ContainerFilter {
        pod_sandbox_id: pod.sandbox_id.clone(),
        ..Default::default()
    }))?;
    assert_eq!(listed.len(), 2);
    let list_stats = kubelet.list_stats(None)?;
    assert!(list_stats
        .iter()
        .any(|s| s.attributes.as_ref().is_some_and(|a| a.id == main_id)));
    let fs = kubelet.cri().image_fs_info(api::ImageFsInfoRequest {})?;
    assert!(!fs.image_filesystems.is_empty());
    let images = kubelet
        .cri()
        .list_images(api::ListImagesRequest { filter: None })?;
    assert!(images
        .images
        .iter()
        .any(|i| i.repo_tags.iter().any(|t| t == BUSYBOX)));

    // Stop with the minimum grace period: `sleep` is pid 1 of its pid namespace and ignores
    // SIGTERM, so this takes the grace period and a SIGKILL.
    let t0 = Instant::now();
    kubelet.stop_container(&main_id, 2)?;
    eprintln!("StopContainer took {:?}", t0.elapsed());
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        kubelet.container_status(&main_id)?.state,
        api::ContainerState::ContainerExited as i32
    );

    // Logs as kubectl shows them (the unterminated piece is written when the output ends;
    // a line over containerd's 16 KiB limit is split into a partial and a full entry).
    let entries = kubelet.container_log(&pod, "main", 0)?;
    let joined = logs::join(&entries);
    assert!(
        joined
            .iter()
            .any(|l| l.stream == LogStream::Stdout && l.text() == "hello-from-main"),
        "{joined:?}"
    );
    assert!(
        joined
            .iter()
            .any(|l| l.stream == LogStream::Stderr && l.text() == "err-line"),
        "{joined:?}"
    );
    assert!(
        joined.iter().any(|l| l.text() == "partial" && !l.complete),
        "{joined:?}"
    );
    // stdout and stderr are copied to the file independently: compare each stream alone.
    let out = logs::kubectl_view(&entries, Some(LogStream::Stdout));
    assert!(
        out.starts_with(b"hello-from-main\nxxx") && out.ends_with(b"x\npartial"),
        "{:?}",
        String::from_utf8_lossy(&out[..40.min(out.len())])
    );
    assert_eq!(
        logs::kubectl_view(&entries, Some(LogStream::Stderr)),
        b"err-line\n"
    );
    let long = joined
        .iter()
        .find(|l| l.content.len() == 20_000)
        .context("the 20000-byte line")?;
    assert!(long.pieces >= 2 && long.complete, "{} pieces", long.pieces);
    assert!(long.content.iter().all(|&b| b == b'x'));

    kubelet.kill_pod(&pod, None)?;
    assert!(kubelet
        .list_pods(None)?
        .iter()
        .all(|p| p.id != pod.sandbox_id));
    Ok(())
}
