//! Checkpoint and restore with real CRIU, through real containerd (1.7 and 2.1).
//!
//! One private containerd per version serves the whole run, with the `ckpt` test image
//! (busybox plus the `ckload` workloads) imported into a namespace of its own. Each trial
//! is one scenario on one version:
//!
//! - workloads through `ctr`: a counter that continues after `ctr c checkpoint --task
//!   --rw` / delete / `ctr c restore --live --rw` (and then exec, metrics, pause, kill,
//!   wait and delete work on the restored task); a TCP server in a pod-style network
//!   namespace that serves again; a process tree joined by a pipe and a unix socket
//!   pair; tmpfs and bind mounts; tmpfs mounts that come back exactly as they were
//!   (options, modes, owners, read-only), empty or not; a container in a pod's pid
//!   namespace (joined by path) restored into it; the host's cgroup hierarchies mounted
//!   in, and a device node; a paused container (`ctr t checkpoint` too); a terminal;
//!   a checkpoint restored twice into fresh containers;
//! - straight to the shim's task API (what ctr cannot ask for: ctr passes checkpoint
//!   options only to runtimes named `io.containerd.runc.v1/v2`, so `ctr t checkpoint
//!   --exit` is a plain checkpoint for any other runtime name): an established TCP
//!   connection kept with `open_tcp` across a dump with `exit` and a restore, the
//!   network lock a dump with `exit` leaves in a pod's namespace until the restore, and
//!   the dump of a paused task restored; a checkpoint made by the stock shim restored
//!   under runc-architect;
//! - failures: CRIU missing, CRIU killed mid-dump, a resource CRIU cannot dump. Each
//!   leaves the container running, untouched, and the error names CRIU's reason. A
//!   damaged checkpoint fails to restore with CRIU's reason and leaves nothing behind.
//!
//! The runtime under test is runc-architect (`$RA_SHIM_BINARY`, or the workspace build);
//! `RA_CKPT_RUNTIME=io.containerd.runc.v2` runs the ctr scenarios against the stock shim
//! (with runc and the same CRIU), which proves the scenarios themselves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use libtest_mimic::{Failed, Trial};
use runc_architect_tests::ckpt::{self, LineConn, NetNs};
use runc_architect_tests::image::ImageBuilder;
use runc_architect_tests::paths::ARCHITECT_RUNTIME;
use runc_architect_tests::poll::{try_wait_for, wait_for};
use runc_architect_tests::pty::Step;
use runc_architect_tests::suite;
use runc_architect_tests::{Containerd, Ctr, Output, Version};

/// How long a scenario waits for something it expects.
const WAIT: Duration = Duration::from_secs(30);

/// One containerd version with the checkpoint image imported.
struct Env {
    containerd: Containerd,
    namespace: String,
    builder: ImageBuilder,
    runtime: String,
}

impl Env {
    fn start(version: Version) -> Result<Env> {
        let containerd = Containerd::start(version)?;
        let namespace = format!("ra-ck-{}", containerd.unique());
        let scratch = containerd.scratch_dir("ckpt-image")?;
        let builder = ckpt::ckpt_image(&scratch)?;
        builder
            .import(&containerd.ctr(&namespace), &scratch)
            .context("import the checkpoint test image")?;
        let runtime = std::env::var("RA_CKPT_RUNTIME")
            .ok()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| ARCHITECT_RUNTIME.to_string());
        Ok(Env {
            containerd,
            namespace,
            builder,
            runtime,
        })
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One scenario's view: the daemon, a ctr, unique names.
struct Ctx {
    env: Arc<Env>,
    ctr: Ctr,
    tag: String,
}

impl Ctx {
    fn new(env: Arc<Env>, scenario: &str) -> Ctx {
        let ctr = env.containerd.ctr(&env.namespace);
        let tag = format!(
            "{}-{}",
            scenario.replace('_', "-"),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        Ctx { env, ctr, tag }
    }

    fn id(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.tag)
    }

    fn image_ref(&self, suffix: &str) -> String {
        format!("runc-architect-test/checkpoint/{}{suffix}:1", self.tag)
    }

    /// `ctr run -d` of the checkpoint image.
    fn run_detached(&self, id: &str, flags: &[&str], args: &[&str]) -> Result<Output> {
        let mut a: Vec<&str> = vec!["run", "-d", "--runtime", &self.env.runtime];
        a.extend_from_slice(flags);
        a.push(ckpt::CKPT_IMAGE);
        a.push(id);
        a.extend_from_slice(args);
        self.ctr.ok(&a)
    }

    /// `ctr t exec` of `args`; returns stdout.
    fn exec(&self, id: &str, args: &[&str]) -> Result<String> {
        let exec_id = format!("x{}", SEQ.fetch_add(1, Ordering::SeqCst));
        let mut a = vec!["tasks", "exec", "--exec-id", &exec_id, id];
        a.extend_from_slice(args);
        Ok(self.ctr.ok(&a)?.stdout_str())
    }

    /// The number in `file` inside container `id`.
    fn number(&self, id: &str, file: &str) -> Result<u64> {
        // The workloads rewrite the file (truncate, then write): retry an empty read.
        let mut last = String::new();
        for _ in 0..20 {
            last = self.exec(id, &["cat", file])?;
            if let Ok(n) = last.trim().parse() {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("{file} in {id} holds {last:?}, not a number")
    }

    /// Waits until the number in `file` is at least `min`; returns it.
    fn wait_number(&self, id: &str, file: &str, min: u64) -> Result<u64> {
        try_wait_for(&format!("{file} in {id} to reach {min}"), WAIT, || {
            Ok(self.number(id, file).ok().filter(|n| *n >= min))
        })
    }

    fn status(&self, id: &str) -> Result<Option<String>> {
        self.ctr.task_status(id)
    }

    fn checkpoint(&self, id: &str, image: &str) -> Result<Duration> {
        let t = Instant::now();
        self.ctr
            .ok(&["containers", "checkpoint", "--task", "--rw", id, image])?;
        Ok(t.elapsed())
    }

    fn restore(&self, id: &str, image: &str) -> Result<Duration> {
        let t = Instant::now();
        self.ctr
            .ok(&["containers", "restore", "--live", "--rw", id, image])?;
        Ok(t.elapsed())
    }

    /// Kills and deletes task and container `id`, and waits until they are gone.
    fn remove(&self, id: &str) -> Result<()> {
        self.ctr.remove(id);
        wait_for(&format!("{id} to be deleted"), WAIT, || {
            self.ctr
                .containers()
                .ok()
                .filter(|c| !c.iter().any(|x| x == id))
        })?;
        Ok(())
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if let Ok(cs) = self.ctr.containers() {
            for c in cs.iter().filter(|c| c.starts_with(&self.tag)) {
                self.ctr.remove(c);
            }
        }
        if let Ok(images) = self.ctr.images() {
            for i in images.iter().filter(|i| i.contains(&self.tag)) {
                let _ = self.ctr.run(&["images", "rm", i]);
            }
        }
    }
}

const COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; echo tick $i; sleep 0.1; done";

/// What a restored task must still do: run execs, report metrics, pause and resume, be
/// killed, report its exit, be deleted (with its cgroups).
fn check_lifecycle(cx: &Ctx, id: &str, counter_file: &str) -> Result<()> {
    ensure!(
        cx.status(id)?.as_deref() == Some("RUNNING"),
        "restored task {id} is not RUNNING: {:?}",
        cx.status(id)?
    );
    let pid = cx.ctr.task_pid(id)?;
    ensure!(pid > 0, "restored task {id} reports pid 0");
    // In the container's own cgroup (v1 controllers and v2 alike), not the shim's.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let own = format!("/{}/{id}", cx.env.namespace);
    for line in cgroup.lines() {
        let ctrls = line.split(':').nth(1).unwrap_or_default();
        if ctrls.contains("memory") || ctrls.contains("pids") || ctrls.is_empty() {
            ensure!(
                line.ends_with(&own),
                "restored init {pid} is in the wrong cgroup: {line} (want {own})"
            );
        }
    }
    let out = cx.exec(id, &["sh", "-c", "echo exec-ok"])?;
    ensure!(
        out.contains("exec-ok"),
        "exec in the restored task printed {out:?}"
    );
    let metrics = cx.ctr.ok(&["tasks", "metrics", id])?.stdout_str();
    ensure!(
        !metrics.trim().is_empty(),
        "no metrics for the restored task"
    );
    let ps = cx.ctr.ok(&["tasks", "ps", id])?.stdout_str();
    ensure!(
        ps.contains(&pid.to_string()),
        "ctr t ps does not list the init {pid}: {ps}"
    );

    cx.ctr.ok(&["tasks", "pause", id])?;
    ensure!(
        cx.status(id)?.as_deref() == Some("PAUSED"),
        "pause did not take"
    );
    cx.ctr.ok(&["tasks", "resume", id])?;
    ensure!(
        cx.status(id)?.as_deref() == Some("RUNNING"),
        "resume did not take"
    );
    let n = cx.number(id, counter_file)?;
    cx.wait_number(id, counter_file, n + 2)?;

    cx.ctr.ok(&["tasks", "kill", "-s", "SIGKILL", id])?;
    wait_for(&format!("{id} to stop"), WAIT, || {
        cx.status(id).ok().flatten().filter(|s| s == "STOPPED")
    })?;
    let cgroup_dirs: Vec<PathBuf> = ["memory", "pids", "unified"]
        .iter()
        .map(|c| {
            Path::new("/sys/fs/cgroup")
                .join(c)
                .join(&cx.env.namespace)
                .join(id)
        })
        .collect();
    cx.ctr.ok(&["tasks", "delete", id])?;
    cx.ctr.ok(&["containers", "delete", id])?;
    if cx.env.runtime == ARCHITECT_RUNTIME {
        for d in &cgroup_dirs {
            ensure!(
                !d.exists(),
                "cgroup {} left behind after delete",
                d.display()
            );
        }
    }
    Ok(())
}

// ---- scenarios through ctr ------------------------------------------------------------

/// A counter continues where it was after checkpoint, delete, restore; the restored task
/// then behaves like a started one.
fn counter_continues(cx: &Ctx) -> Result<()> {
    let id = cx.id("");
    let image = cx.image_ref("");
    cx.run_detached(&id, &[], &["sh", "-c", COUNTER])?;
    cx.wait_number(&id, "/tmp/count", 5)?;
    cx.checkpoint(&id, &image)?;
    // The checkpointed container keeps running.
    ensure!(
        cx.status(&id)?.as_deref() == Some("RUNNING"),
        "not RUNNING after checkpoint"
    );
    let before = cx.number(&id, "/tmp/count")?;
    cx.remove(&id)?;
    cx.restore(&id, &image)?;
    let after = cx.number(&id, "/tmp/count")?;
    ensure!(
        after + 20 >= before && after >= 5,
        "the restored counter is at {after}: it started over (it was at {before} after the \
         checkpoint)"
    );
    cx.wait_number(&id, "/tmp/count", after + 3)?;
    check_lifecycle(cx, &id, "/tmp/count")
}

/// The same checkpoint restored twice, each time into a fresh container after the
/// previous one was deleted (and another container ran in between).
fn restore_fresh_after_delete(cx: &Ctx) -> Result<()> {
    let id = cx.id("");
    let image = cx.image_ref("");
    cx.run_detached(&id, &[], &["sh", "-c", COUNTER])?;
    let at = cx.wait_number(&id, "/tmp/count", 10)?;
    cx.checkpoint(&id, &image)?;
    cx.remove(&id)?;
    let other = cx.id("-other");
    cx.run_detached(&other, &[], &["sh", "-c", COUNTER])?;
    cx.wait_number(&other, "/tmp/count", 2)?;
    cx.remove(&other)?;
    for round in 0..2 {
        cx.restore(&id, &image)?;
        let n = cx.number(&id, "/tmp/count")?;
        ensure!(
            n >= at,
            "round {round}: restored counter at {n}, below the checkpointed {at}"
        );
        cx.wait_number(&id, "/tmp/count", n + 2)?;
        cx.remove(&id)?;
    }
    Ok(())
}

/// A TCP server in a network namespace joined by path (like a pod's) serves again after
/// restore, from the host side of the namespace's veth.
fn tcp_server_in_netns(cx: &Ctx) -> Result<()> {
    let ns = NetNs::create()?;
    let id = cx.id("");
    let image = cx.image_ref("");
    let with_ns = format!("network:{}", ns.path());
    cx.run_detached(
        &id,
        &["--with-ns", &with_ns],
        &["/bin/ckload", "echo", "7070"],
    )?;
    let addr = ns.addr(7070);
    let (a, _) = ckpt::wait_answer(addr, Some("hello"), WAIT)?;
    ensure!(a == "pong 1 hello", "server answered {a:?}");
    cx.ctr.wait_alone(&id, WAIT)?;
    cx.checkpoint(&id, &image)?;
    let (a, _) = ckpt::wait_answer(addr, Some("still"), WAIT)?;
    ensure!(
        a == "pong 1 still",
        "after checkpoint the server answered {a:?}"
    );
    cx.remove(&id)?;
    ensure!(
        ckpt::tcp_line(addr, Some("gone"), Duration::from_millis(300)).is_err(),
        "something still answers on {addr} after delete"
    );
    cx.restore(&id, &image)?;
    let (a, _) = ckpt::wait_answer(addr, Some("again"), WAIT)?;
    ensure!(a == "pong 1 again", "restored server answered {a:?}");
    cx.remove(&id)
}

/// A parent and child joined by a pipe and a unix socket pair keep their streams intact.
fn process_tree_pipes_unix(cx: &Ctx) -> Result<()> {
    let id = cx.id("");
    let image = cx.image_ref("");
    cx.run_detached(&id, &[], &["/bin/ckload", "tree", "/tmp/state"])?;
    cx.wait_number(&id, "/tmp/state", 10)?;
    cx.checkpoint(&id, &image)?;
    let before = cx.number(&id, "/tmp/state")?;
    cx.remove(&id)?;
    cx.restore(&id, &image)?;
    let state = cx.exec(&id, &["cat", "/tmp/state"])?;
    ensure!(!state.contains("BROKEN"), "the streams broke: {state}");
    let n: u64 = state.trim().parse().context("state")?;
    ensure!(
        n + 40 >= before,
        "restored tree at {n}, checkpointed near {before}"
    );
    let later = cx.wait_number(&id, "/tmp/state", n + 10)?;
    let state = cx.exec(&id, &["cat", "/tmp/state"])?;
    ensure!(
        !state.contains("BROKEN"),
        "the streams broke after {later}: {state}"
    );
    let ps = cx.ctr.ok(&["tasks", "ps", &id])?.stdout_str();
    ensure!(ps.lines().count() >= 3, "the tree lost a process: {ps}");
    cx.remove(&id)
}

/// A tmpfs keeps its content; a bind mount from the host is re-attached (a descriptor
/// kept open into it still writes to the host directory).
fn tmpfs_and_bind_mount(cx: &Ctx) -> Result<()> {
    let host_dir = cx.env.containerd.scratch_dir(&cx.id("-data"))?;
    let id = cx.id("");
    let image = cx.image_ref("");
    let bind = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        host_dir.display()
    );
    let tmpfs = "type=tmpfs,src=tmpfs,dst=/scratch,options=size=4m";
    let script = "echo kept-in-tmpfs > /scratch/note; exec 3>>/data/log; \
                  i=0; while true; do i=$((i+1)); echo $i >&3; echo $i > /tmp/count; \
                  sleep 0.1; done";
    cx.run_detached(
        &id,
        &["--mount", &bind, "--mount", tmpfs],
        &["sh", "-c", script],
    )?;
    cx.wait_number(&id, "/tmp/count", 5)?;
    cx.checkpoint(&id, &image)?;
    cx.remove(&id)?;
    let lines_before = std::fs::read_to_string(host_dir.join("log"))?
        .lines()
        .count();
    cx.restore(&id, &image)?;
    let note = cx.exec(&id, &["cat", "/scratch/note"])?;
    ensure!(
        note.trim() == "kept-in-tmpfs",
        "tmpfs content after restore: {note:?}"
    );
    let mounts = cx.exec(&id, &["cat", "/proc/self/mountinfo"])?;
    ensure!(
        mounts
            .lines()
            .any(|l| l.contains(" /scratch ") && l.contains(" - tmpfs ")),
        "/scratch is no tmpfs after restore:\n{mounts}"
    );
    wait_for(
        "the restored process to write through its bind mount",
        WAIT,
        || {
            let n = std::fs::read_to_string(host_dir.join("log"))
                .map(|s| s.lines().count())
                .unwrap_or(0);
            (n >= lines_before + 5).then_some(())
        },
    )?;
    cx.remove(&id)
}

/// What a container sees of its tmpfs mounts: their mountinfo from the mount point on
/// (sorted: CRIU mounts in its own order, with any runtime), and mode and owner of their
/// roots. Only whole tmpfs mounts: runc's restore turns masked files (binds of the
/// container's /dev/null) into binds of the host's, which would fail the stock runtime.
fn tmpfs_view(cx: &Ctx, id: &str) -> Result<String> {
    let script = "cut -d' ' -f4- /proc/self/mountinfo | grep '^/ .* - tmpfs ' \
                  | cut -d' ' -f2- | sort; \
                  stat -c '%n %a %u %g' /run /scratch /dev/shm /proc/acpi /sys/firmware";
    cx.exec(id, &["sh", "-c", script])
}

/// Tmpfs mounts come back as they were, whether CRIU archives them or (empty at dump)
/// runc-architect mounts them afresh: same options, root modes and owners, read-only
/// where they were; an unlinked file still open in one keeps its data.
fn tmpfs_mounts_as_they_were(cx: &Ctx) -> Result<()> {
    let id = cx.id("");
    let image = cx.image_ref("");
    let tmpfs = "type=tmpfs,src=tmpfs,dst=/scratch,options=size=4m:mode=0750";
    // /run, /scratch and the masked /proc/acpi and /sys/firmware stay empty; /dev/shm
    // holds a file that is unlinked but open.
    let script = "chmod 700 /run; chown 65534:65534 /scratch; \
                  exec 3<>/dev/shm/held; echo unlinked-but-open >&3; rm /dev/shm/held; \
                  i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done";
    cx.run_detached(&id, &["--mount", tmpfs], &["sh", "-c", script])?;
    cx.wait_number(&id, "/tmp/count", 3)?;
    let before = tmpfs_view(cx, &id)?;
    ensure!(
        before.contains("/scratch 750 65534 65534") && before.contains("/run 700 0 0"),
        "the workload did not set up its mounts:\n{before}"
    );
    cx.checkpoint(&id, &image)?;
    cx.remove(&id)?;
    cx.restore(&id, &image)?;
    let after = tmpfs_view(cx, &id)?;
    ensure!(
        before == after,
        "tmpfs mounts differ after restore:\n--- before\n{before}\n--- after\n{after}"
    );
    let held = cx.exec(&id, &["cat", "/proc/1/fd/3"])?;
    ensure!(
        held.trim() == "unlinked-but-open",
        "the unlinked file in /dev/shm holds {held:?}"
    );
    let probe = "touch /run/x /scratch/x /dev/shm/x && echo writable; \
                 touch /proc/acpi/x 2>/dev/null || echo read-only";
    let out = cx.exec(&id, &["sh", "-c", probe])?;
    ensure!(
        out.split_whitespace().collect::<Vec<_>>() == ["writable", "read-only"],
        "after restore: {out:?}"
    );
    cx.remove(&id)
}

/// A container with the host's cgroup hierarchies mounted (as every Kubernetes container
/// has them) and a device node: after restore the device is the same node, and the cgroup
/// mounts show the restored container's own cgroups (its processes are in them).
fn cgroup_mounts_and_device(cx: &Ctx) -> Result<()> {
    let id = cx.id("");
    let image = cx.image_ref("");
    let cgroup = "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:nodev:noexec";
    cx.run_detached(
        &id,
        &["--mount", cgroup, "--device", "/dev/net/tun"],
        &["sh", "-c", COUNTER],
    )?;
    cx.wait_number(&id, "/tmp/count", 3)?;
    // Every v1 hierarchy mounted, each holding the container's init (pid 1 inside).
    // /dev entry for entry (type, mode, owner, device number, time); what is mounted
    // below it only by name.
    let script = "stat -c '%n %F %t:%T %a' /dev/net/tun; ls /sys/fs/cgroup; \
                  for d in /sys/fs/cgroup/*/; do \
                    [ -f $d/cgroup.procs ] && grep -qx 1 $d/cgroup.procs && echo \"init in $d\"; \
                  done; \
                  dev=$(stat -c %d /dev); find /dev -xdev | sort | while read f; do \
                    if [ \"$(stat -c %d $f)\" = $dev ]; then stat -c 'dev: %n %F %a %u %g %t:%T %Y' $f; \
                    else echo \"dev: $f mounted\"; fi; \
                  done; true";
    let before = cx.exec(&id, &["sh", "-c", script])?;
    ensure!(
        before.contains("/dev/net/tun character special file a:c8")
            && before.contains("init in /sys/fs/cgroup/memory/"),
        "the workload's view before the checkpoint:\n{before}"
    );
    cx.checkpoint(&id, &image)?;
    cx.remove(&id)?;
    cx.restore(&id, &image)?;
    let after = cx.exec(&id, &["sh", "-c", script])?;
    // runc's restore on a hybrid host leaves the cgroup mounts showing cgroups the restored
    // processes are not in: for the stock shim only the rest is compared.
    let compared = |t: &str| -> String {
        t.lines()
            .filter(|l| cx.env.runtime == ARCHITECT_RUNTIME || !l.starts_with("init in "))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    ensure!(
        before.contains("dev: /dev/null character special file 666 0 0 1:3")
            && before.contains("dev: /dev/net directory"),
        "the workload's /dev before the checkpoint:\n{before}"
    );
    ensure!(
        compared(&before) == compared(&after),
        "the view differs after restore:\n--- before\n{before}\n--- after\n{after}"
    );
    // Our shim made that /dev itself, without CRIU archiving it.
    if cx.env.runtime == ARCHITECT_RUNTIME {
        let log = cx.env.containerd.log_tail(usize::MAX);
        ensure!(
            log.lines().any(|l| l.contains("tmpfs without data")
                && l.trim_end().ends_with("destination=/dev")
                && l.contains(&id)),
            "no data-less /dev at the dump in containerd's log"
        );
    }
    cx.wait_number(&id, "/tmp/count", 1)?;
    cx.remove(&id)
}

/// A paused container: `ctr t checkpoint` leaves it paused (frozen, not running a single
/// step), and it resumes afterwards. (`ctr c checkpoint` pauses unconditionally, so on a
/// paused task it fails with any shim; a paused task's dump is restored in
/// `paused_dump_restores`, straight to the shim.)
fn paused_container(cx: &Ctx) -> Result<()> {
    // A paused task runs no exec: the counter goes to a host directory instead.
    let host_dir = cx.env.containerd.scratch_dir(&cx.id("-out"))?;
    let count = host_dir.join("count");
    let number = || -> Option<u64> { ckpt::read_trimmed(&count).ok()?.parse().ok() };
    let bind = format!(
        "type=bind,src={},dst=/out,options=rbind:rw",
        host_dir.display()
    );
    let id = cx.id("");
    let script = "i=0; while true; do i=$((i+1)); echo $i > /out/count; sleep 0.1; done";
    cx.run_detached(&id, &["--mount", &bind], &["sh", "-c", script])?;
    wait_for("the counter", WAIT, || number().filter(|n| *n >= 5))?;
    cx.ctr.ok(&["tasks", "pause", &id])?;
    let frozen = number().context("counter")?;
    let out = cx.ctr.ok(&["tasks", "checkpoint", &id])?.stdout_str();
    let task_image = out.trim().to_string();
    ensure!(!task_image.is_empty(), "ctr t checkpoint printed no image");
    ensure!(
        cx.status(&id)?.as_deref() == Some("PAUSED"),
        "not PAUSED after ctr t checkpoint"
    );
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        number() == Some(frozen),
        "the paused container ran during or after the checkpoint"
    );
    let pid = cx.ctr.task_pid(&id)?;
    ensure!(
        ckpt::freezer_states(pid)?
            .iter()
            .any(|(_, s)| s == "FROZEN" || s == "1"),
        "no freezer holds the paused container after the checkpoint"
    );
    cx.ctr.ok(&["tasks", "resume", &id])?;
    wait_for("the resumed counter", WAIT, || {
        number().filter(|n| *n >= frozen + 3)
    })?;
    let _ = cx.ctr.run(&["images", "rm", &task_image]);
    cx.remove(&id)
}

/// A container with a terminal: its pty is re-attached at restore; input and output
/// flow through the new master.
fn terminal_container(cx: &Ctx) -> Result<()> {
    let id = cx.id("");
    let image = cx.image_ref("");
    let script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; \
                  if read -t 1 line; then echo \"got:$line\"; [ \"$line\" = quit ] && exit 0; fi; \
                  done";
    let run = cx.ctr.run_pty(
        &[
            "run",
            "-d",
            "-t",
            "--runtime",
            &cx.env.runtime,
            ckpt::CKPT_IMAGE,
            &id,
            "sh",
            "-c",
            script,
        ],
        &[],
    )?;
    ensure!(run.success(), "ctr run -d -t failed: {run}");
    cx.wait_number(&id, "/tmp/count", 2)?;
    cx.checkpoint(&id, &image)?;
    let before = cx.number(&id, "/tmp/count")?;
    cx.remove(&id)?;
    // `ctr c restore` of a terminal task attaches the terminal and waits for the exit.
    let out = cx.ctr.run_pty(
        &["containers", "restore", "--live", "--rw", &id, &image],
        &[
            Step {
                after: "",
                send: b"ping\r",
            },
            Step {
                after: "got:ping",
                send: b"quit\r",
            },
        ],
    )?;
    let shown = out.stdout_str();
    ensure!(
        shown.contains("got:ping"),
        "the restored shell did not echo input: {out}"
    );
    ensure!(
        out.success(),
        "ctr c restore of the terminal task failed: {out}"
    );
    // ctr deletes the task once it has exited.
    let st = cx.status(&id)?;
    ensure!(
        st.is_none() || st.as_deref() == Some("STOPPED"),
        "the restored terminal task did not exit on quit: it is {st:?}; ctr showed:\n{shown}"
    );
    // It continued from the checkpoint rather than starting over.
    ensure!(before >= 2, "counter {before}");
    cx.remove(&id)
}

// ---- straight to the shim -------------------------------------------------------------

use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::oci::CheckpointOptions;
use runc_architect_tests::shim::{write_bundle, ShimProcess};

/// A container run by a shim launched the way containerd launches it, its bundle and a
/// directory for images.
struct Direct {
    shim: ShimProcess,
    id: String,
    bundle: PathBuf,
    dir: PathBuf,
}

impl Direct {
    /// Runs `args` in a new container, in the network namespace `netns` if given.
    fn run(cx: &Ctx, args: &[&str], netns: Option<&NetNs>) -> Result<Direct> {
        let id = cx.id("");
        let dir = cx.env.containerd.scratch_dir(&id)?;
        let bundle = dir.join("bundle");
        let mut spec = runc_architect_tests::spec::default_spec(
            "rootfs",
            args,
            &format!("/{}/{id}", cx.env.namespace),
        );
        if let (Some(ns), Some(list)) = (netns, spec["linux"]["namespaces"].as_array_mut()) {
            for n in list.iter_mut() {
                if n["type"] == "network" {
                    n["path"] = serde_json::Value::String(ns.path());
                }
            }
        }
        write_bundle(&bundle, &spec, Some(&cx.env.builder))?;
        let binary = cx.env.containerd.architect_shim().to_path_buf();
        let mut shim =
            ShimProcess::launch(&binary, &cx.env.containerd, &cx.env.namespace, &id, &bundle)?;
        shim.run(&id, &bundle)?;
        Ok(Direct {
            shim,
            id,
            bundle,
            dir,
        })
    }

    /// Task.Checkpoint into `images` with `opts` (its image and work paths are set here).
    fn checkpoint(&self, images: &Path, opts: CheckpointOptions) -> Result<()> {
        checkpoint_task(&self.shim, &self.id, images, &self.dir.join("work"), opts)
    }

    /// Waits until the container runs its init alone (the echo server's child for a
    /// connection has gone: a dump without `open_tcp` refuses a connected socket).
    fn wait_alone(&self) -> Result<()> {
        wait_for("the container's init to run alone", WAIT, || {
            self.shim.pids(&self.id).ok().filter(|p| p.len() == 1)
        })?;
        Ok(())
    }

    /// A checkpoint with `exit` (and `opts`): returns once the dumped init has exited.
    fn checkpoint_exit(&self, images: &Path, opts: CheckpointOptions) -> Result<()> {
        self.checkpoint(images, CheckpointOptions { exit: true, ..opts })?;
        self.shim
            .wait(&self.id, "")
            .context("wait for the dumped init to exit")?;
        Ok(())
    }

    /// Deletes the (stopped) container and creates it again from `images`, then starts it.
    fn restore(&mut self, images: &Path) -> Result<()> {
        self.shim
            .delete(&self.id, "")
            .context("delete the dumped container")?;
        self.create_from(images).map_err(|e| {
            anyhow::anyhow!(
                "Create from checkpoint: {e}; shim log:\n{}",
                self.shim.log()
            )
        })?;
        self.shim
            .start(&self.id, "")
            .context("Start of the restored task")?;
        Ok(())
    }

    /// Task.Create of the container from the checkpoint `images`.
    fn create_from(
        &mut self,
        images: &Path,
    ) -> runc_architect_tests::shim::RpcResult<api::CreateTaskResponse> {
        let req = api::CreateTaskRequest {
            id: self.id.clone(),
            bundle: self.bundle.display().to_string(),
            checkpoint: images.display().to_string(),
            ..Default::default()
        };
        self.shim.create_req(req)
    }

    /// The number in `file` of the container (read in the bundle's rootfs, which the
    /// container uses as it is).
    fn number(&self, file: &str) -> Result<u64> {
        rootfs_number(&self.bundle, file)
    }
}

/// Task.Checkpoint of `id` through `shim` into `images`, CRIU working in `work`.
fn checkpoint_task(
    shim: &ShimProcess,
    id: &str,
    images: &Path,
    work: &Path,
    mut opts: CheckpointOptions,
) -> Result<()> {
    opts.work_path = work.display().to_string();
    let any = Any {
        type_url: "containerd.runc.v1.CheckpointOptions".into(),
        value: opts.write_to_bytes()?,
        ..Default::default()
    };
    let req = api::CheckpointTaskRequest {
        id: id.to_string(),
        path: images.display().to_string(),
        options: MessageField::some(any),
        ..Default::default()
    };
    shim.call::<_, Empty>("Checkpoint", &req).map_err(|e| {
        let log = std::fs::read_to_string(work.join("dump.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!(
            "Checkpoint: {e}; shim log:\n{}\n--- CRIU's dump.log (tail) ---\n{}",
            shim.log(),
            tail.join("\n")
        )
    })?;
    Ok(())
}

/// The number in `file` of a container whose rootfs is the bundle directory's `rootfs`.
fn rootfs_number(bundle: &Path, file: &str) -> Result<u64> {
    let path = bundle.join("rootfs").join(file.trim_start_matches('/'));
    // The shell rewrites the file (truncate, then write): retry an empty read, and a
    // missing file (a restored task writes into a new rootfs at its next step).
    try_wait_for(
        &format!("a number in {}", path.display()),
        WAIT,
        || match std::fs::read_to_string(&path) {
            Ok(s) => Ok(s.trim().parse().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("read {}", path.display()))),
        },
    )
}

/// A checkpoint the stock shim made (runc, its `descriptors.json`, CRIU's defaults)
/// restores under runc-architect: a node can switch runtimes between the two.
fn stock_checkpoint_restores(cx: &Ctx) -> Result<()> {
    if cx.env.runtime != ARCHITECT_RUNTIME {
        return Ok(());
    }
    let id = cx.id("");
    let dir = cx.env.containerd.scratch_dir(&id)?;
    let mut spec = runc_architect_tests::spec::default_spec(
        "rootfs",
        &["sh", "-c", COUNTER],
        &format!("/{}/{id}", cx.env.namespace),
    );
    // As in every Kubernetes container: runc binds the host's cgroup hierarchies in.
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        mounts.push(serde_json::json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["ro", "nosuid", "noexec", "nodev"]
        }));
    }
    let stock_bundle = dir.join("stock");
    write_bundle(&stock_bundle, &spec, Some(&cx.env.builder))?;
    let stock_binary = cx
        .env
        .containerd
        .version()
        .bin_dir()
        .join(runc_architect_tests::paths::STOCK_SHIM_NAME);
    let mut stock = ShimProcess::launch(
        &stock_binary,
        &cx.env.containerd,
        &cx.env.namespace,
        &id,
        &stock_bundle,
    )?;
    stock.run(&id, &stock_bundle)?;
    wait_for("the counter under the stock shim", WAIT, || {
        rootfs_number(&stock_bundle, "/tmp/count")
            .ok()
            .filter(|n| *n >= 3)
    })?;
    let images = dir.join("images");
    checkpoint_task(
        &stock,
        &id,
        &images,
        &dir.join("work"),
        CheckpointOptions {
            exit: true,
            ..Default::default()
        },
    )?;
    stock
        .wait(&id, "")
        .map_err(|e| anyhow::anyhow!("Wait (stock): {e}"))?;
    let dumped = rootfs_number(&stock_bundle, "/tmp/count")?;
    stock.remove(&id);
    drop(stock);

    let bundle = dir.join("architect");
    write_bundle(&bundle, &spec, Some(&cx.env.builder))?;
    let binary = cx.env.containerd.architect_shim().to_path_buf();
    let mut shim =
        ShimProcess::launch(&binary, &cx.env.containerd, &cx.env.namespace, &id, &bundle)?;
    let req = api::CreateTaskRequest {
        id: id.clone(),
        bundle: bundle.display().to_string(),
        checkpoint: images.display().to_string(),
        ..Default::default()
    };
    shim.create_req(req).map_err(|e| {
        anyhow::anyhow!(
            "Create from the stock shim's checkpoint: {e}; shim log:\n{}",
            shim.log()
        )
    })?;
    shim.start(&id, "").context("Start of the restored task")?;
    // The restored shell counts on from its dumped value, now into the new rootfs.
    let n = rootfs_number(&bundle, "/tmp/count")?;
    ensure!(
        n >= dumped && n < dumped + 20,
        "restored counter at {n}, dumped at {dumped}"
    );
    wait_for("the restored counter", WAIT, || {
        rootfs_number(&bundle, "/tmp/count")
            .ok()
            .filter(|m| *m >= n + 3)
    })?;
    shim.check_serves(&id, "probe")?;
    shim.remove(&id);
    Ok(())
}

/// A container that joined another's pid namespace by path (a pod sharing one process
/// namespace, with a pause process as its init) is dumped with that namespace external
/// and restored into it: the same pids there, the pod's processes still in sight.
fn pid_namespace_of_a_pod(cx: &Ctx) -> Result<()> {
    let pod = cx.id("-pod");
    cx.run_detached(&pod, &[], &["/bin/ckload", "pause"])?;
    let pod_pid = cx.ctr.task_pid(&pod)?;
    let pod_ns = std::fs::read_link(format!("/proc/{pod_pid}/ns/pid"))?;
    let id = cx.id("");
    let image = cx.image_ref("");
    let with_ns = format!("pid:/proc/{pod_pid}/ns/pid");
    let script = format!("echo $$ > /tmp/pid; {COUNTER}");
    cx.run_detached(&id, &["--with-ns", &with_ns], &["sh", "-c", &script])?;
    let at = cx.wait_number(&id, "/tmp/count", 3)?;
    let ns_pid = cx.number(&id, "/tmp/pid")?;
    ensure!(
        ns_pid > 1,
        "the container's init is pid {ns_pid} in the pod's namespace"
    );
    cx.checkpoint(&id, &image)?;
    cx.remove(&id)?;
    cx.restore(&id, &image)?;
    let host_pid = cx.ctr.task_pid(&id)?;
    let ns = std::fs::read_link(format!("/proc/{host_pid}/ns/pid"))?;
    ensure!(
        ns == pod_ns,
        "restored into {}, not the pod's {}",
        ns.display(),
        pod_ns.display()
    );
    // "NSpid:\tHOST\tIN-NAMESPACE".
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status"))?;
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|p| p.parse::<u64>().ok());
    ensure!(
        nspid == Some(ns_pid),
        "restored init is {nspid:?} in the pod's namespace, was {ns_pid}"
    );
    let ps = cx.exec(&id, &["ps", "-o", "pid,args"])?;
    ensure!(
        ps.lines()
            .any(|l| l.trim_start().starts_with("1 ") && l.contains("ckload pause")),
        "the pod's init is not in sight after restore:\n{ps}"
    );
    let n = cx.number(&id, "/tmp/count")?;
    ensure!(
        n >= at,
        "restored counter at {n}, below the checkpointed {at}"
    );
    cx.wait_number(&id, "/tmp/count", n + 3)?;
    cx.remove(&id)?;
    cx.remove(&pod)
}

/// An established TCP connection survives a dump with `open_tcp` and `exit` and a
/// restore: the same client socket keeps talking to the restored server. Also checks
/// that the images are root-only, and that stdio which is not a pipe (the shim's
/// /dev/null for a task created without stdio) comes back.
fn established_tcp_open_tcp(cx: &Ctx) -> Result<()> {
    let ns = NetNs::create()?;
    let mut d = Direct::run(cx, &["/bin/ckload", "echo", "7171"], Some(&ns))?;
    let addr = ns.addr(7171);
    ckpt::wait_answer(addr, Some("probe"), WAIT)?;
    let mut conn = LineConn::connect(addr, WAIT)?;
    ensure!(conn.ask("one")? == "pong 1 one", "first answer");
    let images = d.dir.join("images");
    d.checkpoint_exit(
        &images,
        CheckpointOptions {
            open_tcp: true,
            ..Default::default()
        },
    )?;
    check_private(&images)?;
    d.restore(&images)?;
    let a = conn
        .ask("two")
        .context("the kept connection after restore")?;
    ensure!(a == "pong 2 two", "the kept connection answered {a:?}");
    d.shim.check_serves(&d.id, "probe")?;
    d.shim.remove(&d.id);
    Ok(())
}

/// The network of a pod-style namespace is held still while its container is dumped: a
/// dump that kills the tree (`exit`) leaves the namespace locked (connections neither
/// answered nor refused) until the restore lifts the lock; a dump that leaves the tree
/// running leaves no lock behind.
fn network_lock_until_restore(cx: &Ctx) -> Result<()> {
    let ns = NetNs::create()?;
    let mut d = Direct::run(cx, &["/bin/ckload", "echo", "7474"], Some(&ns))?;
    let addr = ns.addr(7474);
    ckpt::wait_answer(addr, Some("probe"), WAIT)?;
    let clean = ns.filter_rules()?;

    let running = d.dir.join("running");
    d.wait_alone()?;
    d.checkpoint(&running, CheckpointOptions::default())?;
    let rules = ns.filter_rules()?;
    ensure!(
        rules == clean,
        "a dump that left the task running left rules behind:\n{rules}"
    );
    ckpt::wait_answer(addr, Some("still"), WAIT)?;

    let images = d.dir.join("images");
    d.wait_alone()?;
    d.checkpoint_exit(&images, CheckpointOptions::default())?;
    let rules = ns.filter_rules()?;
    ensure!(
        rules.contains("RUNC-ARCHITECT") && rules.contains("-j DROP"),
        "no network lock after a dump with exit:\n{rules}"
    );
    // Locked, not closed: nothing answers, nothing refuses (SYNs are dropped).
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => anyhow::bail!("connecting to the locked namespace gave {other:?}"),
    }
    d.restore(&images)?;
    let rules = ns.filter_rules()?;
    ensure!(
        rules == clean,
        "the restore left the lock in place:\n{rules}"
    );
    let (a, _) = ckpt::wait_answer(addr, Some("again"), WAIT)?;
    ensure!(a.ends_with(" again"), "restored server answered {a:?}");
    d.shim.remove(&d.id);
    Ok(())
}

/// A process holding a file lock: without `file_locks` CRIU refuses (its reason reaches the
/// caller, the task runs on); with it the lock is dumped and held again after restore.
fn file_locks(cx: &Ctx) -> Result<()> {
    let mut d = Direct::run(cx, &["/bin/ckload", "lock", "/tmp/locked"], None)?;
    wait_for("the lock holder to count", WAIT, || {
        d.number("/tmp/locked").ok().filter(|n| *n >= 3)
    })?;
    let images = d.dir.join("images");
    let err = d
        .checkpoint(&images, CheckpointOptions::default())
        .err()
        .context("a dump of a held file lock without file_locks succeeded")?;
    let text = format!("{err:#}");
    ensure!(
        text.contains("CRIU") && text.to_lowercase().contains("lock"),
        "the error does not carry CRIU's reason: {text}"
    );
    ensure!(
        d.shim.status(&d.id, "")? == "RUNNING",
        "not RUNNING after the failed dump"
    );
    let n = d.number("/tmp/locked")?;
    wait_for("the lock holder to go on", WAIT, || {
        d.number("/tmp/locked").ok().filter(|m| *m >= n + 2)
    })?;
    let _ = std::fs::remove_dir_all(&images);
    d.checkpoint_exit(
        &images,
        CheckpointOptions {
            file_locks: true,
            ..Default::default()
        },
    )?;
    d.restore(&images)?;
    let pid = d
        .shim
        .state(&d.id, "")
        .map_err(|e| anyhow::anyhow!("State: {e}"))?
        .pid;
    let n = d.number("/tmp/locked")?;
    wait_for("the restored lock holder to count", WAIT, || {
        d.number("/tmp/locked").ok().filter(|m| *m >= n + 2)
    })?;
    // /proc/locks: "N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF".
    let locks = std::fs::read_to_string("/proc/locks")?;
    ensure!(
        locks
            .lines()
            .any(|l| l.contains("FLOCK") && l.split_whitespace().nth(4) == Some(&pid.to_string())),
        "the restored process {pid} holds no flock:\n{locks}"
    );
    d.shim.remove(&d.id);
    Ok(())
}

/// A paused task is dumped as it is (it stays paused, frozen), and its dump restores.
fn paused_dump_restores(cx: &Ctx) -> Result<()> {
    let mut d = Direct::run(cx, &["sh", "-c", COUNTER], None)?;
    wait_for("the counter to start", WAIT, || {
        d.number("/tmp/count").ok().filter(|n| *n >= 3)
    })?;
    d.shim
        .call::<_, Empty>(
            "Pause",
            &api::PauseRequest {
                id: d.id.clone(),
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("Pause: {e}"))?;
    let frozen = d.number("/tmp/count")?;
    let images = d.dir.join("images");
    d.checkpoint(&images, CheckpointOptions::default())?;
    ensure!(
        d.shim.status(&d.id, "")? == "PAUSED",
        "not PAUSED after the dump"
    );
    std::thread::sleep(Duration::from_millis(300));
    ensure!(d.number("/tmp/count")? == frozen, "the paused task ran");
    d.shim
        .call::<_, Empty>(
            "Resume",
            &api::ResumeRequest {
                id: d.id.clone(),
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("Resume: {e}"))?;
    wait_for("the resumed counter", WAIT, || {
        d.number("/tmp/count").ok().filter(|n| *n >= frozen + 3)
    })?;
    d.shim
        .kill(&d.id, "", 9, true)
        .map_err(|e| anyhow::anyhow!("Kill: {e}"))?;
    d.shim
        .wait(&d.id, "")
        .map_err(|e| anyhow::anyhow!("Wait: {e}"))?;
    d.restore(&images)?;
    // Restored at the paused value, and running.
    let n = d.number("/tmp/count")?;
    ensure!(
        n >= frozen && n < frozen + 20,
        "restored at {n}, dumped at {frozen}"
    );
    wait_for("the restored counter", WAIT, || {
        d.number("/tmp/count").ok().filter(|m| *m >= n + 3)
    })?;
    ensure!(
        d.shim.status(&d.id, "")? == "RUNNING",
        "restored task not RUNNING"
    );
    d.shim.remove(&d.id);
    Ok(())
}

/// A restore from a damaged checkpoint fails with the reason and leaves nothing behind:
/// no task, no libcontainer state, no cgroups, no staged mounts, and no network lock in
/// the pod's namespace (the dump left one there for the restore). Two damages: an
/// inventory CRIU cannot parse (CRIU's reason reaches the caller) and a truncated pages
/// file (found before CRIU runs: CRIU 4.2 would spin forever on it). The intact copy then
/// restores into the same container.
fn damaged_checkpoint_fails_cleanly(cx: &Ctx) -> Result<()> {
    if cx.env.runtime != ARCHITECT_RUNTIME {
        return Ok(());
    }
    let ns = NetNs::create()?;
    let clean_rules = ns.filter_rules()?;
    let mut d = Direct::run(cx, &["/bin/ckload", "echo", "7575"], Some(&ns))?;
    let addr = ns.addr(7575);
    ckpt::wait_answer(addr, Some("probe"), WAIT)?;
    let images = d.dir.join("images");
    d.wait_alone()?;
    d.checkpoint_exit(&images, CheckpointOptions::default())?;
    d.shim
        .delete(&d.id, "")
        .context("delete the dumped container")?;
    ensure!(
        ns.filter_rules()? != clean_rules,
        "the dump with exit left no lock to lift"
    );
    let state_dir = PathBuf::from("/run/containerd/runc-architect")
        .join(&cx.env.namespace)
        .join(&d.id);
    let memory_cgroup = PathBuf::from("/sys/fs/cgroup/memory")
        .join(&cx.env.namespace)
        .join(&d.id);

    // What is damaged, how, and what the error must name.
    type Damage = (&'static str, fn(&Path) -> Result<()>, &'static str);
    let damages: [Damage; 2] = [
        (
            "unparsable inventory",
            |dir| {
                std::fs::write(dir.join("inventory.img"), b"not a CRIU image")?;
                Ok(())
            },
            "CRIU",
        ),
        (
            "truncated pages",
            |dir| {
                for e in std::fs::read_dir(dir)? {
                    let path = e?.path();
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    if name.starts_with("pages-") {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&path)?
                            .set_len(100)?;
                    }
                }
                Ok(())
            },
            "cut short",
        ),
    ];
    for (what, damage, reason) in damages {
        let copy = d.dir.join(format!("damaged-{}", what.replace(' ', "-")));
        copy_dir(&images, &copy)?;
        damage(&copy)?;
        let err = match d.create_from(&copy) {
            Ok(_) => anyhow::bail!("{what}: the restore succeeded"),
            Err(e) => e.to_string(),
        };
        ensure!(
            err.contains(reason),
            "{what}: the error does not say why ({reason}): {err}"
        );
        ensure!(
            d.shim.state(&d.id, "").is_err(),
            "{what}: a task exists after the failed restore"
        );
        ensure!(
            !state_dir.exists(),
            "{what}: {} is left behind",
            state_dir.display()
        );
        ensure!(
            !memory_cgroup.exists(),
            "{what}: {} is left behind",
            memory_cgroup.display()
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(
            !mounts.contains(&state_dir.display().to_string()),
            "{what}: mounts are left behind:\n{mounts}"
        );
        let rules = ns.filter_rules()?;
        ensure!(
            rules == clean_rules,
            "{what}: the failed restore left the network locked:\n{rules}"
        );
    }
    d.create_from(&images)
        .map_err(|e| anyhow::anyhow!("Create from the intact checkpoint: {e}"))?;
    d.shim
        .start(&d.id, "")
        .context("Start of the restored task")?;
    let (a, _) = ckpt::wait_answer(addr, Some("again"), WAIT)?;
    ensure!(a.ends_with(" again"), "restored server answered {a:?}");
    d.shim.remove(&d.id);
    Ok(())
}

/// Copies the files of `from` into a new directory `to` (images are flat).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Directories 0700 and files 0600, all the way down.
fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_dir() {
        ensure!(mode == 0o700, "{} has mode {mode:o}", dir.display());
        for e in std::fs::read_dir(dir)? {
            check_private(&e?.path())?;
        }
    } else if meta.is_file() {
        ensure!(mode == 0o600, "{} has mode {mode:o}", dir.display());
    }
    Ok(())
}

// ---- failures --------------------------------------------------------------------------

/// Checks that a failed checkpoint left `id` running and untouched: RUNNING, not frozen,
/// its counter still counting.
fn check_untouched(cx: &Ctx, id: &str, counter: &str) -> Result<()> {
    ensure!(
        cx.status(id)?.as_deref() == Some("RUNNING"),
        "{id} is {:?} after the failed checkpoint",
        cx.status(id)?
    );
    let pid = cx.ctr.task_pid(id)?;
    for (file, state) in ckpt::freezer_states(pid)? {
        ensure!(
            state == "THAWED" || state == "0",
            "{} is {state} after the failed checkpoint",
            file.display()
        );
    }
    let n = cx.number(id, counter)?;
    cx.wait_number(id, counter, n + 3)?;
    Ok(())
}

/// No CRIU where the container's runtime options say it is.
fn criu_missing(cx: &Ctx) -> Result<()> {
    if cx.env.runtime != ARCHITECT_RUNTIME {
        return Ok(());
    }
    let dir = cx.env.containerd.scratch_dir(&cx.id("-opts"))?;
    let opts = dir.join("runtime.toml");
    std::fs::write(&opts, "CriuPath = \"/nonexistent/criu\"\n")?;
    let id = cx.id("");
    cx.run_detached(
        &id,
        &["--runtime-config-path", &opts.display().to_string()],
        &["sh", "-c", COUNTER],
    )?;
    cx.wait_number(&id, "/tmp/count", 3)?;
    let out = cx.ctr.run(&[
        "containers",
        "checkpoint",
        "--task",
        "--rw",
        &id,
        &cx.image_ref(""),
    ])?;
    let out = out.failed()?;
    let err = out.stderr_str();
    ensure!(
        err.contains("CRIU binary") && err.contains("/nonexistent/criu"),
        "the error does not say CRIU is missing: {err}"
    );
    check_untouched(cx, &id, "/tmp/count")?;
    cx.remove(&id)
}

/// CRIU killed in the middle of dumping 256 MiB: the container runs on with its memory
/// intact and the error says what happened to CRIU.
fn criu_killed_mid_dump(cx: &Ctx) -> Result<()> {
    if cx.env.runtime != ARCHITECT_RUNTIME {
        return Ok(());
    }
    let ns = NetNs::create()?;
    let id = cx.id("");
    let with_ns = format!("network:{}", ns.path());
    cx.run_detached(
        &id,
        &["--with-ns", &with_ns],
        &[
            "sh",
            "-c",
            "/bin/ckload heap 256 7272 & while true; do date +%s%N > /tmp/count; sleep 0.1; done",
        ],
    )?;
    let addr = ns.addr(7272);
    let (sum, _) = ckpt::wait_answer(addr, None, WAIT)?;
    let shim = ckpt::shim_pids(&cx.env.namespace, &id);
    ensure!(
        shim.len() == 1,
        "expected one shim for {id}, found {shim:?}"
    );
    let shim = shim[0];
    let bg = cx.ctr.spawn(&[
        "containers",
        "checkpoint",
        "--task",
        "--rw",
        &id,
        &cx.image_ref(""),
    ])?;
    let criu = wait_for("CRIU to start under the shim", WAIT, || {
        ckpt::children_named(shim, "criu").first().copied()
    })?;
    // Let it get into the dump proper.
    std::thread::sleep(Duration::from_millis(60));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(criu),
        nix::sys::signal::Signal::SIGKILL,
    );
    let out = bg.wait(WAIT)?.failed()?;
    let err = out.stderr_str();
    ensure!(
        err.contains("CRIU") && (err.contains("signal 9") || err.contains("closed the session")),
        "the error does not say CRIU died: {err}"
    );
    // `date +%s%N` is not a counter: wait for the file to change instead.
    let t0 = cx.exec(&id, &["cat", "/tmp/count"])?;
    wait_for("the container to keep running", WAIT, || {
        cx.exec(&id, &["cat", "/tmp/count"])
            .ok()
            .filter(|t| *t != t0)
    })?;
    ensure!(cx.status(&id)?.as_deref() == Some("RUNNING"), "not RUNNING");
    let pid = cx.ctr.task_pid(&id)?;
    for (file, state) in ckpt::freezer_states(pid)? {
        ensure!(
            state == "THAWED" || state == "0",
            "{} is {state}",
            file.display()
        );
    }
    let (again, _) = ckpt::wait_answer(addr, None, WAIT)?;
    ensure!(again == sum, "the heap changed: {sum:?} then {again:?}");
    let rules = ns.filter_rules()?;
    ensure!(
        !rules.contains("RUNC-ARCHITECT") && !rules.contains("CRIU"),
        "a network lock outlived the killed CRIU:\n{rules}"
    );
    cx.remove(&id)
}

/// A perf event descriptor cannot be dumped: the caller gets CRIU's reason, the
/// container runs on.
fn undumpable_resource(cx: &Ctx) -> Result<()> {
    let id = cx.id("");
    cx.run_detached(&id, &[], &["/bin/ckload", "perf", "/tmp/count"])?;
    cx.wait_number(&id, "/tmp/count", 5)?;
    let out = cx
        .ctr
        .run(&[
            "containers",
            "checkpoint",
            "--task",
            "--rw",
            &id,
            &cx.image_ref(""),
        ])?
        .failed()?;
    let err = out.stderr_str();
    if cx.env.runtime == ARCHITECT_RUNTIME {
        ensure!(
            err.contains("CRIU") && err.contains("perf"),
            "the error does not carry CRIU's reason: {err}"
        );
    }
    check_untouched(cx, &id, "/tmp/count")?;
    cx.remove(&id)
}

// ---- the runner ------------------------------------------------------------------------

type Scenario = (&'static str, fn(&Ctx) -> Result<()>);

fn scenarios() -> Vec<Scenario> {
    vec![
        ("counter_continues", counter_continues),
        ("restore_fresh_after_delete", restore_fresh_after_delete),
        ("tcp_server_in_netns", tcp_server_in_netns),
        ("process_tree_pipes_unix", process_tree_pipes_unix),
        ("tmpfs_and_bind_mount", tmpfs_and_bind_mount),
        ("tmpfs_mounts_as_they_were", tmpfs_mounts_as_they_were),
        ("cgroup_mounts_and_device", cgroup_mounts_and_device),
        ("paused_container", paused_container),
        ("terminal_container", terminal_container),
        ("established_tcp_open_tcp", established_tcp_open_tcp),
        ("paused_dump_restores", paused_dump_restores),
        ("network_lock_until_restore", network_lock_until_restore),
        ("stock_checkpoint_restores", stock_checkpoint_restores),
        ("pid_namespace_of_a_pod", pid_namespace_of_a_pod),
        ("file_locks", file_locks),
        ("criu_missing", criu_missing),
        ("criu_killed_mid_dump", criu_killed_mid_dump),
        ("undumpable_resource", undumpable_resource),
        (
            "damaged_checkpoint_fails_cleanly",
            damaged_checkpoint_fails_cleanly,
        ),
    ]
}

fn main() {
    suite::run_per_version(Env::start, |version, env| {
        scenarios()
            .into_iter()
            .map(|(name, run)| {
                let env = env.clone();
                Trial::test(
                    format!("{version}::{name}"),
                    move || -> Result<(), Failed> {
                        let e = env.get()?;
                        let cx = Ctx::new(e.clone(), name);
                        run(&cx).map_err(|err| {
                            let log = e.containerd.log_tail(40);
                            Failed::from(format!("{err:#}\n--- containerd log (tail) ---\n{log}"))
                        })
                    },
                )
            })
            .collect()
    })
}
