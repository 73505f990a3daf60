//! Hibernation through real containerd (1.7 and 2.1), the real shim and real CRIU.
//!
//! One private containerd per version, with the checkpoint test image (busybox and the
//! `ckload` workloads) imported. Every container runs `ckload hib`: one process serving
//! any number of connections, answering each line with a count of all lines it has
//! served (state that must continue across every wake), and flushing that count to a
//! bind-mounted file on SIGTERM. Containers are started with `ctr run` and the
//! `runc-architect.io/*` annotations, with runtime options (`Root`, `StoreConfig`,
//! `HibernateDir`) that keep everything under the test's own directory. Each scenario
//! waits on the state the shim reports through `runc-architect status --json` (the CLI
//! users run), and asserts on what a user sees: answers, task states, exit codes, and
//! what is left on disk and in the namespace's netfilter rules.
//!
//! Scenarios:
//! - the pod shape (a named network namespace joined by path): FROZEN and woken by a
//!   connection; SCALED_DOWN (the init gone) while the task stays RUNNING; a keep-alive
//!   connection made before the sleep carries a request after it; woken by a new
//!   connection and by exec; SIGTERM while asleep is delivered after a wake and the
//!   graceful shutdown loses nothing; delete leaves nothing behind;
//! - 100 concurrent connections arriving while SCALED_DOWN, every answer checked;
//! - kube-probe HTTP and TCP probes answered without a wake, and a shadow port that
//!   neither keeps the container awake nor wakes it (refused at once while asleep);
//! - SIGKILL while asleep: exit 137 at once, no restore, nothing left after delete;
//! - a container with a network namespace of its own, woken by exec, its loopback server
//!   serving the same process afterwards;
//! - a checkpoint that fails (a perf event descriptor CRIU cannot dump): the container
//!   keeps running, the failure is counted;
//! - a corrupted checkpoint: the wake falls back to a cold start that serves;
//! - the shim killed while the container sleeps: the checkpoint in the store verifies,
//!   and deleting the task cleans up what that shim held.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use libtest_mimic::Trial;
use runc_architect_tests::ckpt::{self, NetNs};
use runc_architect_tests::node::register::cli_candidates;
use runc_architect_tests::paths::ARCHITECT_RUNTIME;
use runc_architect_tests::poll::try_wait_for;
use runc_architect_tests::process;
use runc_architect_tests::suite::{self, LazyShared};
use runc_architect_tests::{Containerd, Ctr, Version};
use serde_json::Value;

/// How long a scenario waits for a state it expects.
const WAIT: Duration = Duration::from_secs(40);
/// The server's port inside the container.
const PORT: u16 = 7070;
/// Idle times of the scenarios: short, so a run takes seconds.
const FREEZE_AFTER: &str = "300ms";
const SCALEDOWN_AFTER: &str = "1500ms";

struct Env {
    containerd: Containerd,
    namespace: String,
    cli: PathBuf,
}

fn start(version: Version) -> Result<Env> {
    let containerd = Containerd::start(version)?;
    let namespace = format!("ra-hib-{}", containerd.unique());
    let scratch = containerd.scratch_dir("hib-image")?;
    ckpt::ckpt_image(&scratch)?
        .import(&containerd.ctr(&namespace), &scratch)
        .context("import the checkpoint test image")?;
    let cli = cli_candidates()?
        .into_iter()
        .next()
        .context("no runc-architect CLI built (set RA_CLI_BINARY)")?;
    Ok(Env {
        containerd,
        namespace,
        cli,
    })
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One scenario: unique names, its own runtime options and directories.
struct Ctx {
    env: Arc<Env>,
    ctr: Ctr,
    tag: String,
    dir: PathBuf,
    options: PathBuf,
}

impl Ctx {
    fn new(env: Arc<Env>, scenario: &str) -> Result<Ctx> {
        let ctr = env.containerd.ctr(&env.namespace);
        let tag = format!(
            "{}-{}",
            scenario.replace('_', "-"),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = env.containerd.scratch_dir(&format!("hib-{tag}"))?;
        for d in ["root", "store", "images", "out"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let store_cfg = dir.join("store.toml");
        std::fs::write(
            &store_cfg,
            format!("root = \"{}\"\n", dir.join("store").display()),
        )?;
        let options = dir.join("runtime.toml");
        std::fs::write(
            &options,
            format!(
                "Root = \"{}\"\nStoreConfig = \"{}\"\nHibernateDir = \"{}\"\n",
                dir.join("root").display(),
                store_cfg.display(),
                dir.join("images").display()
            ),
        )?;
        Ok(Ctx {
            env,
            ctr,
            tag,
            dir,
            options,
        })
    }

    fn id(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.tag)
    }

    /// `ctr run -d` of `ckload hib` with hibernation on, `extra` annotations after ours.
    fn run(
        &self,
        id: &str,
        netns: Option<&NetNs>,
        extra: &[(&str, &str)],
        perf: bool,
    ) -> Result<()> {
        let mut annotations = vec![
            ("runc-architect.io/hibernate", "true"),
            ("runc-architect.io/freeze-after", FREEZE_AFTER),
            ("runc-architect.io/scaledown-after", SCALEDOWN_AFTER),
        ];
        annotations.extend_from_slice(extra);
        let mut a: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--runtime".into(),
            ARCHITECT_RUNTIME.into(),
            "--runtime-config-path".into(),
            self.options.display().to_string(),
            "--mount".into(),
            format!(
                "type=bind,src={},dst=/out,options=rbind:rw",
                self.dir.join("out").display()
            ),
        ];
        for (k, v) in annotations {
            a.push("--annotation".into());
            a.push(format!("{k}={v}"));
        }
        if let Some(ns) = netns {
            a.push("--with-ns".into());
            a.push(format!("network:{}", ns.path()));
        }
        a.push(ckpt::CKPT_IMAGE.into());
        a.push(id.into());
        for s in ["/bin/ckload", "hib", &PORT.to_string(), "/out/flushed"] {
            a.push(s.into());
        }
        if perf {
            a.push("perf".into());
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.ctr.ok(&a)?;
        Ok(())
    }

    /// The container's record in `runc-architect status --json`, if it has one.
    fn status(&self, id: &str) -> Result<Option<Value>> {
        let mut cmd = Command::new(&self.env.cli);
        cmd.args(["status", "--json", "--root"])
            .arg(self.dir.join("root"));
        let out = process::run(cmd, None, Duration::from_secs(10))?.ok()?;
        let all: Value = serde_json::from_str(&out.stdout_str())
            .with_context(|| format!("status --json printed {:?}", out.stdout_str()))?;
        Ok(all
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|o| o["id"] == id && o["namespace"] == self.env.namespace.as_str())
            })
            .cloned())
    }

    /// Waits until the shim reports `state` for `id`; returns the record.
    fn wait_state(&self, id: &str, state: &str) -> Result<Value> {
        try_wait_for(&format!("{id} to be {state}"), WAIT, || {
            Ok(self.status(id)?.filter(|s| s["state"] == state))
        })
    }

    fn state(&self, id: &str) -> Result<String> {
        Ok(self
            .status(id)?
            .and_then(|s| s["state"].as_str().map(str::to_string))
            .unwrap_or_default())
    }

    fn exec(&self, id: &str, args: &[&str]) -> Result<String> {
        let exec_id = format!("x{}", SEQ.fetch_add(1, Ordering::SeqCst));
        let mut a = vec!["tasks", "exec", "--exec-id", &exec_id, id];
        a.extend_from_slice(args);
        Ok(self.ctr.ok(&a)?.stdout_str())
    }

    /// What is left of `id` in the test's directories (state file, local images, store).
    fn leftovers(&self, id: &str, check_store: bool) -> Result<Vec<String>> {
        let mut left = Vec::new();
        for d in ["root", "images"] {
            let base = self.dir.join(d);
            for p in walk(&base) {
                let rel = p.strip_prefix(&base).unwrap_or(&p);
                if rel.to_string_lossy().contains(id) {
                    left.push(p.display().to_string());
                }
            }
        }
        if !check_store {
            return Ok(left);
        }
        let mut cmd = Command::new(&self.env.cli);
        cmd.args(["store", "--root"])
            .arg(self.dir.join("store"))
            .args(["ls", "--json"]);
        let out = process::run(cmd, None, Duration::from_secs(10))?.ok()?;
        if out.stdout_str().contains(id) {
            left.push(format!("store entries: {}", out.stdout_str().trim()));
        }
        Ok(left)
    }

    /// Kills and deletes `id`, then checks that nothing of it is left.
    fn remove_clean(&self, id: &str, netns: Option<&NetNs>) -> Result<()> {
        self.remove_checked(id, netns, true)
    }

    /// [`Ctx::remove_clean`]; `check_store: false` for a store damaged on purpose.
    fn remove_checked(&self, id: &str, netns: Option<&NetNs>, check_store: bool) -> Result<()> {
        self.ctr.remove(id);
        try_wait_for(&format!("{id} to be deleted"), WAIT, || {
            Ok(Some(()).filter(|_| {
                !self
                    .ctr
                    .containers()
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c == id)
            }))
        })?;
        let left = self.leftovers(id, check_store)?;
        ensure!(left.is_empty(), "left behind after delete: {left:?}");
        if let Some(ns) = netns {
            // The chains go right after the task's end; give the removal a moment.
            let mut rules = String::new();
            let gone = try_wait_for(
                "the hibernation rules to go",
                Duration::from_secs(10),
                || {
                    rules = ns.filter_rules()? + &nat_rules(ns)?;
                    Ok(Some(()).filter(|_| !rules.contains("RA-HIB")))
                },
            );
            ensure!(
                gone.is_ok(),
                "hibernation rules left in the namespace:\n{rules}"
            );
        }
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
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

fn nat_rules(ns: &NetNs) -> Result<String> {
    let mut all = String::new();
    for tool in ["iptables", "ip6tables"] {
        let out = process::host(
            "ip",
            &["netns", "exec", &ns.name, tool, "-w", "-t", "nat", "-S"],
        )?
        .ok()?;
        all.push_str(&out.stdout_str());
    }
    Ok(all)
}

/// A pod-like namespace: a veth to the host and a default route through the host side
/// (the pod's gateway, where the node's own connections come from).
fn pod_netns() -> Result<NetNs> {
    let ns = NetNs::create()?;
    process::host(
        "ip",
        &[
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            &ns.host_ip,
        ],
    )?
    .ok()?;
    Ok(ns)
}

/// A connection speaking the server's line protocol.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connect to {addr}"))?;
        s.set_read_timeout(Some(WAIT))?;
        Ok(Conn {
            reader: BufReader::new(s),
        })
    }

    /// Sends `line`; returns the count the server answered with.
    fn ask(&mut self, line: &str) -> Result<u64> {
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        let answer = answer.trim_end();
        let mut parts = answer.splitn(3, ' ');
        match (
            parts.next(),
            parts.next().map(str::parse::<u64>),
            parts.next(),
        ) {
            (Some("n"), Some(Ok(n)), Some(l)) if l == line => Ok(n),
            _ => bail!("asked {line:?}, the server answered {answer:?}"),
        }
    }
}

/// One request on a new connection.
fn ask(addr: SocketAddr, line: &str) -> Result<u64> {
    Conn::open(addr)?.ask(line)
}

/// Waits until the server answers on `addr` (it has started listening).
fn wait_serving(addr: SocketAddr, line: &str) -> Result<u64> {
    try_wait_for(&format!("the server on {addr}"), WAIT, || {
        Ok(ask(addr, line).ok())
    })
}

fn wakes(record: &Value) -> u64 {
    record["wakes"].as_u64().unwrap_or(0)
}

/// A kubelet HTTP probe: `GET /` with kube-probe's User-Agent; returns the status line.
fn http_probe(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out.lines().next().unwrap_or("").to_string())
}

/// A kubelet TCP probe: connect, then close without sending.
fn tcp_probe(addr: SocketAddr) -> Result<()> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("TCP probe to {addr}"))?;
    Ok(())
}

/// Ends the task with `end`; returns its exit status (from the `/tasks/exit` event) and
/// how long it took.
fn exit_code(cx: &Ctx, id: &str, end: impl FnOnce() -> Result<()>) -> Result<(i64, Duration)> {
    let events = cx.env.containerd.events();
    let t = Instant::now();
    end()?;
    let e = events.wait_topic(&cx.env.namespace, id, "/tasks/exit", WAIT)?;
    let took = t.elapsed();
    Ok((e.u64_field("exit_status") as i64, took))
}

// ---------------------------------------------------------------------------------------

/// The pod shape through every tier and every kind of wake.
fn pod_shape(cx: &Ctx) -> Result<()> {
    let ns = pod_netns()?;
    let id = cx.id("");
    cx.run(&id, Some(&ns), &[], false)?;
    let addr = ns.addr(PORT);
    let first = wait_serving(addr, "hello")?;
    let pid = cx.ctr.task_pid(&id)?;

    // FROZEN, then woken by a connection.
    cx.wait_state(&id, "FROZEN")?;
    ensure!(
        cx.ctr.task_status(&id)?.as_deref() == Some("RUNNING"),
        "ctr does not say RUNNING while FROZEN"
    );
    let n = ask(addr, "after-freeze")?;
    ensure!(
        n == first + 1,
        "after the thaw the count is {n}, expected {}",
        first + 1
    );
    ensure!(
        cx.state(&id)? != "SCALED_DOWN",
        "the thaw went through a restore"
    );

    // A keep-alive connection made before the sleep.
    let mut keep = Conn::open(addr)?;
    let n = keep.ask("keep-1")?;
    ensure!(n == first + 2, "count {n}");

    // SCALED_DOWN: the init is gone, the task still RUNNING, the record has a checkpoint.
    let rec = cx.wait_state(&id, "SCALED_DOWN")?;
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the init {pid} still exists while SCALED_DOWN"
    );
    ensure!(
        cx.ctr.task_status(&id)?.as_deref() == Some("RUNNING"),
        "ctr does not say RUNNING while SCALED_DOWN"
    );
    ensure!(
        rec["checkpoint_bytes"].as_u64().unwrap_or(0) > 0,
        "no checkpoint size: {rec}"
    );
    let before = wakes(&rec);

    // The keep-alive connection carries a request after the wake.
    let n = keep.ask("keep-2")?;
    ensure!(
        n == first + 3,
        "the keep-alive request after the wake got count {n}: state lost"
    );
    let rec = cx.wait_state(&id, "RUNNING")?;
    ensure!(wakes(&rec) > before, "no wake counted: {rec}");
    ensure!(
        rec["last_wake_ms"].as_f64().is_some(),
        "no wake time: {rec}"
    );
    let pid = cx.ctr.task_pid(&id)?;
    ensure!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "State reports pid {pid}, which does not exist"
    );

    // Woken by a new connection.
    cx.wait_state(&id, "SCALED_DOWN")?;
    let n = ask(addr, "new-conn")?;
    ensure!(n == first + 4, "count {n} after a wake by connection");
    drop(keep);

    // Woken by exec: the exec runs in the restored container.
    cx.wait_state(&id, "SCALED_DOWN")?;
    let out = cx.exec(
        &id,
        &[
            "sh",
            "-c",
            "echo exec-ran; cat /proc/1/cmdline | tr '\\0' ' '",
        ],
    )?;
    ensure!(
        out.contains("exec-ran") && out.contains("ckload hib"),
        "exec printed {out:?}"
    );
    ensure!(
        cx.state(&id)? == "RUNNING",
        "not RUNNING after a wake by exec"
    );
    let n = ask(addr, "after-exec")?;
    ensure!(n == first + 5, "count {n} after a wake by exec");

    // SIGTERM while asleep: woken, delivered, the flush has every request.
    cx.wait_state(&id, "SCALED_DOWN")?;
    let (code, _) = exit_code(cx, &id, || {
        cx.ctr.ok(&["tasks", "kill", "-s", "SIGTERM", &id])?;
        Ok(())
    })?;
    ensure!(code == 0, "SIGTERM while asleep: exit {code}");
    let flushed = std::fs::read_to_string(cx.dir.join("out/flushed"))?;
    ensure!(
        flushed.trim() == format!("total {}", first + 5),
        "the graceful shutdown flushed {flushed:?}, expected total {}",
        first + 5
    );
    cx.remove_clean(&id, Some(&ns))
}

/// 100 concurrent connections while SCALED_DOWN: every one answered, no count twice.
fn burst(cx: &Ctx) -> Result<()> {
    let ns = pod_netns()?;
    let id = cx.id("");
    cx.run(&id, Some(&ns), &[], false)?;
    let addr = ns.addr(PORT);
    let first = wait_serving(addr, "hello")?;
    cx.wait_state(&id, "SCALED_DOWN")?;
    let handles: Vec<_> = (0..100)
        .map(|i| std::thread::spawn(move || ask(addr, &format!("burst-{i}"))))
        .collect();
    let mut counts = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let n = h
            .join()
            .map_err(|_| anyhow::anyhow!("connection {i} panicked"))?
            .with_context(|| format!("connection {i} of the burst"))?;
        counts.push(n);
    }
    counts.sort_unstable();
    let expected: Vec<u64> = (first + 1..=first + 100).collect();
    ensure!(counts == expected, "the burst's counts are {counts:?}");
    cx.remove_clean(&id, Some(&ns))
}

/// Probes and a shadow port: answered, never a wake, never keeping it awake.
fn probes_and_shadow(cx: &Ctx) -> Result<()> {
    let ns = pod_netns()?;
    let id = cx.id("");
    cx.run(
        &id,
        Some(&ns),
        &[("runc-architect.io/shadow-ports", "19090:7070")],
        false,
    )?;
    let addr = ns.addr(PORT);
    let shadow = ns.addr(19090);
    let first = wait_serving(addr, "hello")?;
    // The shim's rules go in just after the start: wait for the redirect.
    let n = try_wait_for("the shadow port to reach the app", WAIT, || {
        Ok(ask(shadow, "via-shadow").ok())
    })?;
    ensure!(n == first + 1, "count {n} through the shadow port");

    // Probes and shadow traffic every 200 ms do not keep it from scaling down.
    let t = Instant::now();
    let mut answered = 0;
    loop {
        let state = cx.state(&id)?;
        if state == "SCALED_DOWN" {
            break;
        }
        ensure!(
            t.elapsed() < WAIT,
            "never SCALED_DOWN under probes (state {state})"
        );
        let status = http_probe(addr)?;
        ensure!(
            status.starts_with("HTTP/1.1 200"),
            "HTTP probe while {state} got {status:?}"
        );
        tcp_probe(addr)?;
        if state == "RUNNING" {
            // A shadow connection while awake reaches the app but does not count.
            let _ = ask(shadow, "shadow");
        }
        answered += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        answered >= 3,
        "only {answered} probe rounds before SCALED_DOWN"
    );
    let rec = cx.status(&id)?.context("no record")?;
    let before = wakes(&rec);

    // While SCALED_DOWN: probes answered by the shim, no wake; the shadow port refused.
    for _ in 0..5 {
        let status = http_probe(addr)?;
        ensure!(
            status.starts_with("HTTP/1.1 200"),
            "HTTP probe while SCALED_DOWN got {status:?}"
        );
        tcp_probe(addr)?;
    }
    let t = Instant::now();
    let refused = TcpStream::connect_timeout(&shadow, Duration::from_secs(5));
    ensure!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a connection to the shadow port while asleep: {refused:?}"
    );
    ensure!(
        t.elapsed() < Duration::from_secs(1),
        "the shadow refusal took {:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let rec = cx.status(&id)?.context("no record")?;
    ensure!(
        rec["state"] == "SCALED_DOWN" && wakes(&rec) == before,
        "a probe woke it: {rec}"
    );

    // A real request still wakes it, with its state.
    let n = ask(addr, "real")?;
    ensure!(n > first, "count {n} after the wake");
    cx.remove_clean(&id, Some(&ns))
}

/// SIGKILL while asleep: 137 at once, no restore; delete leaves nothing.
fn sigkill_asleep(cx: &Ctx) -> Result<()> {
    let ns = pod_netns()?;
    let id = cx.id("");
    cx.run(&id, Some(&ns), &[], false)?;
    wait_serving(ns.addr(PORT), "hello")?;
    let rec = cx.wait_state(&id, "SCALED_DOWN")?;
    let before = wakes(&rec);
    let (code, took) = exit_code(cx, &id, || {
        cx.ctr.ok(&["tasks", "kill", "-s", "SIGKILL", &id])?;
        Ok(())
    })?;
    ensure!(code == 137, "SIGKILL while asleep: exit {code}");
    ensure!(
        took < Duration::from_secs(2),
        "SIGKILL while asleep took {took:?}"
    );
    if let Some(rec) = cx.status(&id)? {
        ensure!(wakes(&rec) == before, "SIGKILL restored it first: {rec}");
    }
    cx.remove_clean(&id, Some(&ns))
}

/// A container with a network namespace of its own: woken by exec, its loopback server
/// is the same process afterwards (the namespace was held, the lock is not restored).
fn own_netns(cx: &Ctx) -> Result<()> {
    let id = cx.id("");
    cx.run(&id, None, &[], false)?;
    let ask_inside = |line: &str| -> Result<String> {
        let script = format!("echo {line} | nc 127.0.0.1 {PORT}");
        cx.exec(&id, &["sh", "-c", &script])
    };
    try_wait_for("the server inside", WAIT, || {
        Ok(ask_inside("hello").ok().filter(|a| a.starts_with("n 1 ")))
    })?;
    cx.wait_state(&id, "SCALED_DOWN")?;
    let a = ask_inside("after")?;
    ensure!(
        a.trim() == "n 2 after",
        "after the wake the server answered {a:?}"
    );
    let rules = cx.exec(
        &id,
        &[
            "sh",
            "-c",
            "cat /proc/net/ip_tables_names 2>/dev/null; true",
        ],
    )?;
    ensure!(!rules.contains("RUNC-ARCHITECT"), "{rules}");
    cx.remove_clean(&id, None)
}

/// A checkpoint CRIU cannot make: the container keeps running, the failure is counted.
fn checkpoint_failure(cx: &Ctx) -> Result<()> {
    let ns = pod_netns()?;
    let id = cx.id("");
    cx.run(&id, Some(&ns), &[], true)?;
    let addr = ns.addr(PORT);
    let first = wait_serving(addr, "hello")?;
    let pid = cx.ctr.task_pid(&id)?;
    let rec = try_wait_for("a failed checkpoint", WAIT, || {
        Ok(cx
            .status(&id)?
            .filter(|r| r["checkpoint_failures"].as_u64().unwrap_or(0) >= 1))
    })?;
    ensure!(
        rec["state"] != "SCALED_DOWN",
        "SCALED_DOWN after a failed checkpoint: {rec}"
    );
    ensure!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the init died at the failed checkpoint"
    );
    let n = ask(addr, "still")?;
    ensure!(n == first + 1, "count {n} after the failed checkpoint");
    ensure!(cx.ctr.task_pid(&id)? == pid, "the init changed");
    cx.remove_clean(&id, Some(&ns))
}

/// A corrupted checkpoint: the wake falls back to a cold start, which serves.
fn corrupt_checkpoint(cx: &Ctx) -> Result<()> {
    let ns = pod_netns()?;
    let id = cx.id("");
    cx.run(&id, Some(&ns), &[], false)?;
    let addr = ns.addr(PORT);
    wait_serving(addr, "hello")?;
    cx.wait_state(&id, "SCALED_DOWN")?;
    // Damage every copy of the memory: the local images' pages and the store's data
    // (not its index, so the store itself stays readable).
    let mut damaged = 0;
    let store = cx.dir.join("store");
    for p in walk(&cx.dir.join("images")).into_iter().chain(walk(&store)) {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let in_store_data =
            p.starts_with(&store) && !p.strip_prefix(&store).is_ok_and(|r| r.starts_with("index"));
        if p.is_file() && (name.starts_with("pages-") || name.starts_with("core-") || in_store_data)
        {
            let len = std::fs::metadata(&p)?.len();
            if len > 0 {
                let mut f = std::fs::OpenOptions::new().write(true).open(&p)?;
                f.write_all(&vec![0xa5; len.min(4096) as usize])?;
                damaged += 1;
            }
        }
    }
    ensure!(damaged > 0, "no checkpoint files found to damage");
    let n = ask(addr, "after-cold-start")?;
    ensure!(
        n == 1,
        "the cold-started server answered count {n} (expected a fresh process)"
    );
    let rec = cx.wait_state(&id, "RUNNING")?;
    ensure!(
        rec["restore_failures"].as_u64().unwrap_or(0) >= 1,
        "restore failure not counted: {rec}"
    );
    ensure!(
        cx.ctr.task_status(&id)?.as_deref() == Some("RUNNING"),
        "task not RUNNING after the cold start"
    );
    cx.remove_checked(&id, Some(&ns), false)
}

/// The shim killed while its container sleeps: the checkpoint in the store verifies;
/// deleting the task cleans up what that shim held.
fn killed_shim(cx: &Ctx) -> Result<()> {
    let ns = pod_netns()?;
    let id = cx.id("");
    cx.run(&id, Some(&ns), &[], false)?;
    wait_serving(ns.addr(PORT), "hello")?;
    cx.wait_state(&id, "SCALED_DOWN")?;
    let shims = ckpt::shim_pids(&cx.env.namespace, &id);
    ensure!(!shims.is_empty(), "no shim process found for {id}");
    for p in &shims {
        let _ = process::host("kill", &["-9", &p.to_string()]);
    }
    // containerd sees the shim gone and runs `shim delete`: the task ends with 137.
    try_wait_for("containerd to see the task stopped", WAIT, || {
        Ok(match cx.ctr.task_status(&id)? {
            None => Some(()),
            Some(s) if s == "STOPPED" => Some(()),
            Some(_) => None,
        })
    })?;
    let mut cmd = Command::new(&cx.env.cli);
    cmd.args(["store", "--root"])
        .arg(cx.dir.join("store"))
        .arg("verify");
    process::run(cmd, None, Duration::from_secs(60))?
        .ok()
        .context("store verify after the shim was killed")?;
    let mut cmd = Command::new(&cx.env.cli);
    cmd.args(["store", "--root"])
        .arg(cx.dir.join("store"))
        .args(["ls", "--json"]);
    let ls = process::run(cmd, None, Duration::from_secs(10))?.ok()?;
    ensure!(
        ls.stdout_str().contains(&id),
        "no checkpoint of {id} in the store: {}",
        ls.stdout_str()
    );
    // The store keeps it (the only copy of the processes); everything else goes.
    cx.remove_checked(&id, Some(&ns), false)
}

fn main() {
    type Scenario = fn(&Ctx) -> Result<()>;
    let scenarios: &[(&str, Scenario)] = &[
        ("pod_shape", pod_shape),
        ("burst", burst),
        ("probes_and_shadow", probes_and_shadow),
        ("sigkill_asleep", sigkill_asleep),
        ("own_netns", own_netns),
        ("checkpoint_failure", checkpoint_failure),
        ("corrupt_checkpoint", corrupt_checkpoint),
        ("killed_shim", killed_shim),
    ];
    suite::run_per_version(start, |version, env: Arc<LazyShared<Env>>| {
        scenarios
            .iter()
            .map(|&(name, f)| {
                let env = env.clone();
                Trial::test(format!("{}::{name}", version.tag()), move || {
                    let env = env.get()?;
                    let cx = Ctx::new(env, name).map_err(|e| format!("{e:#}"))?;
                    f(&cx).map_err(|e| {
                        format!(
                            "{e:#}\n--- containerd log ---\n{}",
                            cx.env.containerd.log_tail(40)
                        )
                        .into()
                    })
                })
            })
            .collect()
    })
}
