//! What containerd and the kubelet lean on at a shim's task API, under both shims.
//!
//! containerd's CRI (and its Go client) waits for end of file on a process's output FIFOs
//! before it deletes the task (`task.Delete` calls `io.Wait()` first) and before `ExecSync`
//! answers. A shim that keeps those FIFOs open until Delete deadlocks the kubelet's every
//! exit, exec probe and pod removal, while ctr, which closes its own readers, never notices.
//! And the shim serves all containers of a pod from one process: one process whose stdin is
//! stuck must not stall the others (`kubectl cp` streams a tar through an exec's stdin).
//!
//! And a node upgrade replaces the shim binary under running shims, which must go on
//! serving their pods (execs and new containers) with the code they started with.
//!
//! Each case runs under containerd's stock shim and under runc-architect (a shim started
//! the way containerd starts it, see `runc_architect_tests::shim`), and must hold for both.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::MessageField;
use libtest_mimic::{Failed, Trial};
use runc_architect_tests::image::{ImageBuilder, BUSYBOX_IMAGE};
use runc_architect_tests::paths::{self, Runtime};
use runc_architect_tests::shim::{process_any, write_bundle, ShimProcess};
use runc_architect_tests::spec::default_spec;
use runc_architect_tests::suite;
use runc_architect_tests::{Containerd, Version};

/// How long a request of a healthy container may take while another process misbehaves.
const PROMPT: Duration = Duration::from_secs(3);

struct Env {
    containerd: Containerd,
    namespace: String,
    image: ImageBuilder,
    stock: PathBuf,
    architect: PathBuf,
}

impl Env {
    fn start(version: Version) -> Result<Env> {
        let architect = paths::architect_shim(version)?;
        let containerd = Containerd::start(version)?;
        Ok(Env {
            namespace: format!("ra-io-{}", containerd.unique()),
            image: ImageBuilder::busybox(BUSYBOX_IMAGE)?,
            stock: version.stock_shim_bin(),
            architect,
            containerd,
        })
    }
}

/// A shim serving one running `sleep` container, and a scratch dir for FIFOs.
struct Pod {
    shim: ShimProcess,
    id: String,
    dir: PathBuf,
    /// The binary this shim was started from (a copy of the shim under test).
    binary: PathBuf,
    env_namespace: String,
    image: ImageBuilder,
}

impl Pod {
    fn start(env: &Env, rt: Runtime, case: &str) -> Result<Pod> {
        let id = format!("{case}-{}", rt.tag());
        let dir = env.containerd.scratch_dir(&format!("io-{id}"))?;
        let bundle = dir.join("bundle");
        let spec = default_spec(
            "rootfs",
            &["sleep", "1000"],
            &format!("/{}/{id}", env.namespace),
        );
        write_bundle(&bundle, &spec, Some(&env.image))?;
        let original = match rt {
            Runtime::Stock => &env.stock,
            Runtime::Architect => &env.architect,
        };
        // A copy of the binary per pod, which a case may replace (a node upgrade).
        let binary = dir.join(original.file_name().unwrap_or_default());
        std::fs::copy(original, &binary)
            .with_context(|| format!("copy {} to {}", original.display(), binary.display()))?;
        let mut shim = ShimProcess::launch(&binary, &env.containerd, &env.namespace, &id, &bundle)?;
        shim.run(&id, &bundle)?;
        Ok(Pod {
            shim,
            id,
            dir,
            binary,
            env_namespace: env.namespace.clone(),
            image: env.image.clone(),
        })
    }

    fn fifo(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("mkfifo {}", p.display()))?;
        Ok(p)
    }

    /// Exec of `args` with the given stdio paths (not started).
    fn exec(
        &self,
        exec_id: &str,
        args: &[&str],
        stdin: &str,
        stdout: &str,
        stderr: &str,
    ) -> Result<()> {
        let req = api::ExecProcessRequest {
            id: self.id.clone(),
            exec_id: exec_id.into(),
            spec: MessageField::some(process_any(args)),
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            ..Default::default()
        };
        self.shim
            .call::<_, api::Empty>("Exec", &req)
            .map(|_| ())
            .map_err(|e| anyhow!("Exec {exec_id}: {e}"))
    }

    /// A request of the healthy container, which must answer within [`PROMPT`].
    fn prompt_state(&self, when: &str) -> Result<()> {
        let t = Instant::now();
        let req = api::StateRequest {
            id: self.id.clone(),
            ..Default::default()
        };
        self.shim
            .call_within::<_, api::StateResponse>("State", &req, PROMPT)
            .map_err(|e| anyhow!("State of the healthy container {when}: {e}"))?;
        if t.elapsed() > PROMPT {
            bail!("State {when} took {:?}", t.elapsed());
        }
        Ok(())
    }
}

/// A FIFO opened for reading the way containerd's client opens it (non-blocking, before
/// the process starts).
fn fifo_reader(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("open {} for reading", path.display()))
}

/// Reads until end of file (every writer gone), failing after `limit`.
fn read_to_eof(f: &mut File, limit: Duration, what: &str) -> Result<Vec<u8>> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > limit {
                    bail!(
                        "{what}: no end of file within {limit:?} (so far {:?})",
                        String::from_utf8_lossy(&out)
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context(format!("read {what}")),
        }
    }
}

/// The output FIFOs of an exec reach end of file when it exits, before any Delete, and
/// carry all it wrote; Delete then reports the exit.
fn output_eof_before_delete(pod: &mut Pod) -> Result<()> {
    let (out, err) = (pod.fifo("out")?, pod.fifo("err")?);
    let (mut out_r, mut err_r) = (fifo_reader(&out)?, fifo_reader(&err)?);
    pod.exec(
        "talk",
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        "",
        &out.to_string_lossy(),
        &err.to_string_lossy(),
    )?;
    pod.shim
        .start(&pod.id, "talk")
        .map_err(|e| anyhow!("Start: {e}"))?;
    let code = pod
        .shim
        .wait(&pod.id, "talk")
        .map_err(|e| anyhow!("Wait: {e}"))?;
    let o = read_to_eof(&mut out_r, Duration::from_secs(5), "stdout")?;
    let e = read_to_eof(&mut err_r, Duration::from_secs(5), "stderr")?;
    if o != b"to-stdout\n" || e != b"to-stderr\n" || code != 3 {
        bail!(
            "exit {code}, stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&o),
            String::from_utf8_lossy(&e)
        );
    }
    let d = pod
        .shim
        .delete(&pod.id, "talk")
        .map_err(|e| anyhow!("Delete: {e}"))?;
    if d.exit_status != 3 {
        bail!("Delete reported exit {}", d.exit_status);
    }
    // A terminal's output ends the same way: when the process and the pty are done.
    let tty = pod.fifo("tty")?;
    let mut tty_r = fifo_reader(&tty)?;
    let req = api::ExecProcessRequest {
        id: pod.id.clone(),
        exec_id: "tty".into(),
        spec: MessageField::some(terminal_process(&["sh", "-c", "echo on-a-tty; exit 4"])),
        stdout: tty.to_string_lossy().into_owned(),
        terminal: true,
        ..Default::default()
    };
    pod.shim
        .call::<_, api::Empty>("Exec", &req)
        .map_err(|e| anyhow!("Exec with a terminal: {e}"))?;
    pod.shim
        .start(&pod.id, "tty")
        .map_err(|e| anyhow!("Start: {e}"))?;
    let code = pod
        .shim
        .wait(&pod.id, "tty")
        .map_err(|e| anyhow!("Wait: {e}"))?;
    let t = read_to_eof(&mut tty_r, Duration::from_secs(5), "terminal output")?;
    if code != 4 || !String::from_utf8_lossy(&t).contains("on-a-tty") {
        bail!(
            "terminal exec: exit {code}, output {:?}",
            String::from_utf8_lossy(&t)
        );
    }
    pod.shim
        .delete(&pod.id, "tty")
        .map_err(|e| anyhow!("Delete: {e}"))?;
    Ok(())
}

fn terminal_process(args: &[&str]) -> containerd_shim_protos::protobuf::well_known_types::any::Any {
    let mut any = process_any(args);
    let mut v: serde_json::Value = serde_json::from_slice(&any.value).expect("process JSON");
    v["terminal"] = serde_json::Value::Bool(true);
    any.value = serde_json::to_vec(&v).expect("json");
    any
}

/// A process that never reads its stdin, fed far more than a pipe holds, then CloseIO:
/// every other request of the shim keeps answering, and the process can still be killed
/// and deleted.
fn stuck_stdin_blocks_nothing(pod: &mut Pod) -> Result<()> {
    let fifo = pod.fifo("stuck-in")?;
    // containerd's client opens its stdin FIFO read-write (it never blocks).
    let mut client = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .context("open the stdin FIFO")?;
    // Output FIFOs as containerd's client gives them with stdin (CRI's exec always has them).
    let (out, err) = (pod.fifo("deaf-out")?, pod.fifo("deaf-err")?);
    let (_out_r, _err_r) = (fifo_reader(&out)?, fifo_reader(&err)?);
    pod.exec(
        "deaf",
        &["sleep", "1000"],
        &fifo.to_string_lossy(),
        &out.to_string_lossy(),
        &err.to_string_lossy(),
    )?;
    pod.shim
        .start(&pod.id, "deaf")
        .map_err(|e| anyhow!("Start: {e}"))?;
    let mut flooder = client.try_clone()?;
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..16 {
            if flooder.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    pod.prompt_state("while the exec's stdin is full")?;
    let t = Instant::now();
    let close = api::CloseIORequest {
        id: pod.id.clone(),
        exec_id: "deaf".into(),
        stdin: true,
        ..Default::default()
    };
    pod.shim
        .call_within::<_, api::Empty>("CloseIO", &close, PROMPT)
        .map_err(|e| anyhow!("CloseIO of the stuck stdin: {e}"))?;
    if t.elapsed() > PROMPT {
        bail!("CloseIO took {:?}", t.elapsed());
    }
    pod.prompt_state("after CloseIO")?;
    pod.shim
        .check_serves(&pod.id, "probe")
        .context("an exec in the healthy container after the stuck CloseIO")?;
    pod.shim
        .kill(&pod.id, "deaf", 9, false)
        .map_err(|e| anyhow!("Kill of the stuck exec: {e}"))?;
    let code = pod
        .shim
        .wait(&pod.id, "deaf")
        .map_err(|e| anyhow!("Wait: {e}"))?;
    pod.shim
        .delete(&pod.id, "deaf")
        .map_err(|e| anyhow!("Delete of the stuck exec: {e}"))?;
    if code != 137 {
        bail!("the killed exec exited {code}, not 137");
    }
    pod.prompt_state("after the stuck exec was deleted")?;
    // Unblock our own feeder: drain the FIFO from our side.
    let _ = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&client),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut sink = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !feeder.is_finished() && Instant::now() < deadline {
        let _ = client.read(&mut sink);
    }
    let _ = feeder.join();
    Ok(())
}

/// The binary is replaced (as `runc-architect install` or a package upgrade does: a new
/// file renamed over the old path) and then removed, while the shim runs: execs and a new
/// container in the same pod still work, and so does Delete.
fn binary_replaced_under_running_shim(pod: &mut Pod) -> Result<()> {
    let staged = pod.dir.join("upgrade.new");
    std::fs::write(
        &staged,
        b"#!/bin/sh\necho 'not the shim that is running' >&2\nexit 99\n",
    )?;
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::rename(&staged, &pod.binary).context("replace the shim binary")?;
    pod.shim
        .check_serves(&pod.id, "after-upgrade")
        .context("an exec after the binary was replaced")?;
    std::fs::remove_file(&pod.binary).context("remove the shim binary")?;
    pod.shim
        .check_serves(&pod.id, "after-removal")
        .context("an exec after the binary was removed")?;
    let sibling = format!("{}-sibling", pod.id);
    let bundle = pod.dir.join("sibling");
    let spec = default_spec(
        "rootfs",
        &["sleep", "1000"],
        &format!("/{}/{sibling}", pod.env_namespace),
    );
    write_bundle(&bundle, &spec, Some(&pod.image))?;
    pod.shim
        .run(&sibling, &bundle)
        .context("a new container in the pod after the binary was removed")?;
    pod.shim.check_serves(&sibling, "sibling-probe")?;
    pod.shim.remove(&sibling);
    Ok(())
}

type CaseFn = fn(&mut Pod) -> Result<()>;

fn cases() -> Vec<(&'static str, CaseFn)> {
    vec![
        (
            "output_eof_before_delete",
            output_eof_before_delete as CaseFn,
        ),
        (
            "stuck_stdin_blocks_nothing",
            stuck_stdin_blocks_nothing as CaseFn,
        ),
        (
            "binary_replaced_under_running_shim",
            binary_replaced_under_running_shim as CaseFn,
        ),
    ]
}

fn main() {
    suite::run_per_version(Env::start, |version, env| {
        cases()
            .into_iter()
            .map(|(name, case)| {
                let env = env.clone();
                Trial::test(
                    format!("{version}::{name}"),
                    move || -> Result<(), Failed> {
                        let e = env.get()?;
                        for rt in [Runtime::Stock, Runtime::Architect] {
                            let mut pod = Pod::start(&e, rt, &name.replace('_', "-"))
                                .map_err(|err| Failed::from(format!("{rt:?}: {err:#}")))?;
                            case(&mut pod).map_err(|err| {
                                Failed::from(format!(
                                    "{rt:?}: {err:#}\nshim log:\n{}",
                                    pod.shim.log()
                                ))
                            })?;
                        }
                        Ok(())
                    },
                )
            })
            .collect()
    })
}
