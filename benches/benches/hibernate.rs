//! Hibernation benchmarks (issue 9), runc-architect's hibernation side by side with a cold
//! start and with containerd's stock runc shim (`containerd-shim-runc-v2` + runc + the same
//! CRIU) on one private containerd, in one run:
//!
//! - **wake from SCALED_DOWN to the first answer**, measured by the client from its
//!   `connect()` to the end of the HTTP answer (the SYN is held in the kernel while the
//!   container is restored), for busybox `httpd` and for `hibheap` (a small server of ours
//!   with 256 MiB of touched heap and a 1.5 s warm-up, `benches/workloads/hibheap.c`);
//!   beside it, a cold start of the same server (`ctr run -d` to the first answer, both
//!   runtimes) and the stock shim's `ctr c checkpoint --task` + `ctr c restore --live` (from
//!   the start of `ctr c restore` to the first answer). Each wake is checked: the woken
//!   process answers with its in-memory request counter continued and its heap intact.
//!   Where the wake goes: the shim's own wake time (its state file's `last_wake_ms`), its
//!   restore (`restored ... took_ms`), inside it the preparation and the CRIU request
//!   (CRIU's forking and restore phases from its `stats-restore`), from the shim's log
//!   lines in containerd's log;
//! - **the first request to a FROZEN container** against the same request to it running;
//! - **memory**: the container's memory cgroup (v1 `memory.usage_in_bytes` on hybrid and
//!   legacy hosts, v2 `memory.current` on unified ones) before and after SCALED_DOWN, the
//!   shim's own record of both, and the shim's RSS with the container awake and asleep;
//! - **the idle detector's CPU**: the shim of one RUNNING hibernation-enabled container over
//!   an idle window, against the shim of a container without hibernation and the stock
//!   shim's, and the shims of the SCALED_DOWN containers (hold and probe responder), as %
//!   of a core, from `utime+stime` (`/proc/PID/stat`, tick resolution) and from the
//!   threads' `schedstat` run time (nanoseconds).
//!
//! States are waited on as the shim reports them (its state files under the `Root` of the
//! runtime options, the ones `runc-architect status` reads), never on sleeps. The runtime
//! options (`--runtime-config-path`) put `Root`, `HibernateDir` and the `StoreConfig` store
//! into the daemon's scratch directory, so nothing of the run lands in the node's
//! directories. The containers join named network namespaces wired to the host by a veth
//! pair (the pod shape: the namespace outlives the container), one per measured
//! container, because a sleeping container holds every TCP connection to its namespace.
//!
//! Figures are medians over the rounds; the first wake of each container is a warm-up and
//! not counted. Ratios are architect / reference (lower is better).
//!
//! `cargo bench -p runc-architect-benches --bench hibernate` (uses
//! `target/release/containerd-shim-runc-architect-v1`, or `RA_SHIM_BINARY`; `runc-architect`
//! next to the shim binary, or `RA_CLI_BINARY`, prints the final status table). Environment:
//! `RA_BENCH_ROUNDS` (default 5; the FROZEN comparison runs 4× as many), `RA_ONLY_CONTAINERD=1.7|2.1`
//! (default 1.7), `RA_BENCH_ONLY=NAME` (only the workloads whose name contains NAME: `httpd`,
//! `heap-256m`), `RA_BENCH_IDLE_SECS` (the idle CPU window, default 10).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use runc_architect_proto::status::{self as record, ContainerStatus, State};
use runc_architect_tests::ckpt::{self, NetNs};
use runc_architect_tests::image::ImageBuilder;
use runc_architect_tests::poll::{try_wait_for, wait_for};
use runc_architect_tests::{process, Containerd, Ctr, Runtime, Version};

const NAMESPACE: &str = "bench-hib";
const IMAGE: &str = "bench/hibernate:1";
/// The heap server's source, built with the host's `gcc -static`.
const HIBHEAP_SOURCE: &str = include_str!("../workloads/hibheap.c");

const ANN_HIBERNATE: &str = "runc-architect.io/hibernate";
const ANN_FREEZE: &str = "runc-architect.io/freeze-after";
const ANN_SCALEDOWN: &str = "runc-architect.io/scaledown-after";

/// Idle time before a wake-benchmark container is scaled down.
const SCALEDOWN_AFTER: &str = "1s";
/// Idle time before a FROZEN-benchmark container is frozen.
const FREEZE_AFTER: &str = "300ms";
/// How long a state may take to be reached (a scale-down of 256 MiB included).
const STATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after a wait begins the shim's state file of a started container may be missing.
const NO_STATE_FILE: Duration = Duration::from_secs(10);

/// One benchmarked server.
struct Workload {
    name: &'static str,
    args: Vec<String>,
    port: u16,
    /// What the answer's body must start with on every request.
    body_prefix: &'static str,
    /// The targets for its wake, for the report.
    targets: &'static str,
}

/// Everything the measurements share.
struct Bench {
    containerd: Containerd,
    ctr: Ctr,
    /// The runtime options file for runc-architect's containers.
    options: PathBuf,
    /// `Root` of those options: the shim's state files are below it.
    root: PathBuf,
}

fn main() -> Result<()> {
    let rounds: usize = env_num("RA_BENCH_ROUNDS").unwrap_or(5).max(1);
    let idle_secs: u64 = env_num("RA_BENCH_IDLE_SECS").unwrap_or(10).max(1);
    let version = std::env::var("RA_ONLY_CONTAINERD")
        .ok()
        .and_then(|v| Version::parse(&v))
        .unwrap_or(Version::V1_7);
    let containerd = Containerd::start(version).context("start private containerd")?;
    let ctr = containerd
        .ctr(NAMESPACE)
        .with_timeout(Duration::from_secs(300));
    let scratch = containerd.scratch_dir("hibernate")?;
    image(&scratch)?.import(&ctr, &scratch)?;
    let root = scratch.join("root");
    let store_config = scratch.join("store.toml");
    std::fs::write(
        &store_config,
        format!("root = {}\n", toml_str(&scratch.join("store"))),
    )?;
    let options = scratch.join("runtime-options.toml");
    std::fs::write(
        &options,
        format!(
            "Root = {}\nHibernateDir = {}\nStoreConfig = {}\n",
            toml_str(&root),
            toml_str(&scratch.join("images")),
            toml_str(&store_config)
        ),
    )?;
    println!(
        "runc-architect hibernation benchmark on containerd {} ({rounds} rounds)",
        version.series()
    );
    println!("architect shim: {}", containerd.architect_shim().display());
    // A wake moves CRIU into the container's cgroups; without `favordynmods` the first move
    // waits for an RCU grace period (see the shim's spawner).
    println!(
        "cgroup2 favordynmods: {}",
        if favordynmods() { "on" } else { "off" }
    );
    let bench = Bench {
        containerd,
        ctr,
        options,
        root,
    };

    let workloads = [
        Workload {
            name: "httpd",
            args: ["httpd", "-f", "-p", "8080", "-h", "/www"]
                .map(String::from)
                .to_vec(),
            port: 8080,
            body_prefix: "hello from httpd",
            targets: "target: <= 30 ms and <= 0.3x the stock restore",
        },
        Workload {
            name: "heap-256m",
            args: ["/bin/hibheap", "256", "8181", "1500"]
                .map(String::from)
                .to_vec(),
            port: 8181,
            body_prefix: "hits ",
            targets: "target: <= 0.25x its cold start",
        },
    ];
    let only = std::env::var("RA_BENCH_ONLY").unwrap_or_default();
    let mut lines = Vec::new();
    let mut sleepers = Vec::new();
    for w in workloads.iter().filter(|w| w.name.contains(only.as_str())) {
        let reference = NetNs::create()?;
        let cold = cold_starts(&bench, &reference, w, rounds)?;
        let stock = stock_restores(&bench, &reference, w, rounds)?;
        drop(reference);
        let ns = NetNs::create()?;
        let wakes = scaled_down_wakes(&bench, &ns, w, rounds)?;
        report_wakes(w, &cold, &stock, &wakes, &mut lines);
        // It stays asleep for the idle measurement (with its namespace).
        sleepers.push((wakes.id.clone(), ns));
        let ns = NetNs::create()?;
        let frozen = frozen_requests(&bench, &ns, w, rounds * 4)?;
        report_frozen(w, &frozen, &mut lines);
    }
    idle_cpu(&bench, &sleepers, idle_secs, &mut lines)?;

    println!();
    for l in &lines {
        println!("{l}");
    }
    if let Some(cli) = cli_binary(bench.containerd.architect_shim()) {
        let out = process::run(
            {
                let mut c = std::process::Command::new(&cli);
                c.arg("status").arg("--root").arg(&bench.root);
                c
            },
            None,
            Duration::from_secs(20),
        )?;
        println!("\n`runc-architect status --root ROOT` at the end:");
        print!("{}", out.stdout_str());
        if !out.success() {
            print!("{}", out.stderr_str());
        }
    }
    for (id, _) in &sleepers {
        remove(&bench.ctr, id)?;
    }
    Ok(())
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn toml_str(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The busybox test image with a document root for httpd and `/bin/hibheap`.
fn image(scratch: &Path) -> Result<ImageBuilder> {
    let dir = scratch.join("hibheap");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("hibheap.c");
    let bin = dir.join("hibheap");
    std::fs::write(&src, HIBHEAP_SOURCE)?;
    let mut cmd = std::process::Command::new("gcc");
    cmd.args(["-static", "-O2", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src);
    process::run(cmd, None, Duration::from_secs(60))
        .context("run gcc (hibheap is built with the host's gcc -static)")?
        .ok()
        .context("compile hibheap")?;
    Ok(ImageBuilder::busybox(IMAGE)?
        .dir("www", 0o755)
        .file("www/index.html", b"hello from httpd\n".to_vec(), 0o644)
        .file("bin/hibheap", std::fs::read(&bin)?, 0o755))
}

/// `runc-architect`: `$RA_CLI_BINARY`, else next to the shim binary.
fn cli_binary(shim: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RA_CLI_BINARY").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let p = shim.with_file_name("runc-architect");
    p.is_file().then_some(p)
}

// ---- the client -----------------------------------------------------------------------

/// One HTTP/1.0 GET of `path`; the body of a 200 answer.
fn http_get(addr: SocketAddr, path: &str, connect: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, connect)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr}: no HTTP answer: {text:?}");
    };
    let status = head.lines().next().unwrap_or_default();
    ensure!(
        status.starts_with("HTTP/1.") && status.contains(" 200"),
        "{addr}: {status}"
    );
    Ok(body.to_string())
}

/// GETs `/` until it answers: short connect attempts (a SYN dropped by CRIU's network lock
/// must not cost the client's 1 s retransmission), 1 ms apart. When it answered, after
/// `start`, and the body.
fn first_answer(addr: SocketAddr, start: Instant, limit: Duration) -> Result<(Duration, String)> {
    loop {
        if let Ok(body) = http_get(addr, "/", Duration::from_millis(5)) {
            return Ok((start.elapsed(), body));
        }
        if start.elapsed() > limit {
            bail!("{addr} did not answer within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The request counter in a `hibheap` answer ("hits N sum S").
fn hits(body: &str) -> Option<u64> {
    body.split_whitespace().nth(1)?.parse().ok()
}

/// The heap checksum in a `hibheap` answer.
fn heap_sum(body: &str) -> Option<&str> {
    body.split_whitespace().nth(3)
}

fn check_body(w: &Workload, body: &str) -> Result<()> {
    ensure!(
        body.starts_with(w.body_prefix),
        "{}: unexpected answer {body:?}",
        w.name
    );
    Ok(())
}

// ---- containers -----------------------------------------------------------------------

/// `ctr run -d` of `w` as `id` in `ns` (or a namespace of its own); runc-architect's runs
/// get the bench's runtime options.
fn run(
    b: &Bench,
    rt: Runtime,
    id: &str,
    ns: Option<&NetNs>,
    w: &Workload,
    annotations: &[(&str, &str)],
) -> Result<()> {
    let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--runtime".into()];
    args.push(rt.runtime_type().into());
    if rt == Runtime::Architect {
        args.push("--runtime-config-path".into());
        args.push(b.options.display().to_string());
    }
    if let Some(ns) = ns {
        args.push("--with-ns".into());
        args.push(format!("network:{}", ns.path()));
    }
    for (k, v) in annotations {
        args.push("--annotation".into());
        args.push(format!("{k}={v}"));
    }
    args.push(IMAGE.into());
    args.push(id.into());
    args.extend(w.args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    b.ctr.ok(&args)?;
    Ok(())
}

fn remove(ctr: &Ctr, id: &str) -> Result<()> {
    ctr.remove(id);
    wait_for(
        &format!("{id} to be deleted"),
        Duration::from_secs(60),
        || ctr.containers().ok().filter(|c| !c.iter().any(|x| x == id)),
    )?;
    Ok(())
}

/// The shim's state file of `id`, if written.
fn status(b: &Bench, id: &str) -> Option<ContainerStatus> {
    record::read_one(&record::status_path(&b.root, NAMESPACE, id), NAMESPACE, id).ok()
}

/// Waits until the shim reports `id` in `state` and `ok` holds for its record.
fn wait_state(
    b: &Bench,
    id: &str,
    state: State,
    ok: impl Fn(&ContainerStatus) -> bool,
) -> Result<ContainerStatus> {
    let mut last = None;
    let started = Instant::now();
    let r = try_wait_for(&format!("{id} to be {state}"), STATE_TIMEOUT, || {
        let s = status(b, id);
        let done = s.as_ref().is_some_and(|s| s.state == state && ok(s));
        if done {
            return Ok(s);
        }
        if s.is_none() && started.elapsed() > NO_STATE_FILE {
            bail!("the shim wrote no state file for {id}: hibernation did not start");
        }
        last = s.map(|s| s.state);
        ensure_task_alive(&b.ctr, id)?;
        Ok(None)
    });
    r.with_context(|| {
        format!(
            "last state reported: {last:?}\n--- containerd log (tail) ---\n{}",
            b.containerd.log_tail(30)
        )
    })
}

/// A task that stopped while a state was awaited ends the wait.
fn ensure_task_alive(ctr: &Ctr, id: &str) -> Result<()> {
    match ctr.task_status(id)? {
        Some(s) if s == "STOPPED" => bail!("task {id} stopped"),
        None => bail!("task {id} is gone"),
        _ => Ok(()),
    }
}

/// The shim process serving `id`: of the processes started with its `-namespace` and
/// `-id` (the shim re-executes itself for helpers), the one whose parent is none of them.
fn shim_pid(id: &str) -> Result<i32> {
    let pids = ckpt::shim_pids(NAMESPACE, id);
    pids.iter()
        .copied()
        .find(|p| !parent(*p).is_some_and(|pp| pids.contains(&pp)))
        .with_context(|| format!("no shim process serves {id}"))
}

fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The memory-use file of the memory cgroup of `pid`: v1 `memory.usage_in_bytes` when a
/// v1 memory hierarchy holds it (hybrid and legacy hosts), else v2 `memory.current`.
fn memory_file(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrls.split(',').any(|c| c == "memory") {
            let f = Path::new("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.usage_in_bytes");
            if f.exists() {
                return Some(f);
            }
        }
        if ctrls.is_empty() {
            for base in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                let f = Path::new(base).join(rel).join("memory.current");
                if f.exists() {
                    unified = Some(f);
                    break;
                }
            }
        }
    }
    unified
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

// ---- the shim's log -------------------------------------------------------------------

/// The numeric `key=value` fields of the last line of containerd's log (the shim's log
/// goes there) that is about container `id` and contains every one of `needles`.
fn log_fields(b: &Bench, id: &str, needles: &[&str]) -> Option<Vec<(String, f64)>> {
    let log = std::fs::read_to_string(b.containerd.dir().join("containerd.log")).ok()?;
    let span = format!("{{container={id}}}");
    let field = format!("container={id} ");
    let line = log.lines().rev().find(|l| {
        (l.contains(&span) || l.contains(&field)) && needles.iter().all(|n| l.contains(n))
    })?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.trim_matches('"').parse().ok()?))
            })
            .collect(),
    )
}

fn field(fields: &Option<Vec<(String, f64)>>, name: &str) -> Option<f64> {
    fields
        .as_ref()?
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
}

// ---- measurements ---------------------------------------------------------------------

/// Cold starts: `ctr run -d` to the first answer, both runtimes alternating (no
/// hibernation).
fn cold_starts(b: &Bench, ns: &NetNs, w: &Workload, rounds: usize) -> Result<[Vec<f64>; 2]> {
    let mut out = [Vec::new(), Vec::new()];
    for round in 0..=rounds {
        for (i, rt) in Runtime::ALL.into_iter().enumerate() {
            let id = format!("cold-{}-{round}-{}", w.name, rt.tag());
            let t = Instant::now();
            run(b, rt, &id, Some(ns), w, &[])?;
            let (took, body) = first_answer(ns.addr(w.port), t, Duration::from_secs(120))?;
            check_body(w, &body)?;
            remove(&b.ctr, &id)?;
            // Round 0 warms up the snapshot, the binaries and the page cache.
            if round > 0 {
                out[i].push(ms(took));
            }
        }
    }
    Ok(out)
}

/// The stock shim's checkpoint and live restore: from the start of `ctr c restore --live`
/// to the first answer.
fn stock_restores(b: &Bench, ns: &NetNs, w: &Workload, rounds: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    let addr = ns.addr(w.port);
    for round in 0..=rounds {
        let id = format!("stock-{}-{round}", w.name);
        let image = format!("bench/hib-ckpt-{id}:1");
        run(b, Runtime::Stock, &id, Some(ns), w, &[])?;
        let (_, before) = first_answer(addr, Instant::now(), Duration::from_secs(120))?;
        check_body(w, &before)?;
        // httpd's child for that connection must be gone before the dump.
        b.ctr.wait_alone(&id, Duration::from_secs(60))?;
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        b.ctr
            .ok(&["containers", "checkpoint", "--task", &id, &image])?;
        remove(&b.ctr, &id)?;
        let t = Instant::now();
        let mut restore = b
            .ctr
            .command(&["containers", "restore", "--live", &id, &image])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start ctr c restore")?;
        let answered = first_answer(addr, t, Duration::from_secs(300));
        let st = restore.wait()?;
        if !st.success() {
            let mut err = String::new();
            if let Some(mut e) = restore.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("{id}: ctr c restore --live failed: {err}");
        }
        let (took, after) = answered?;
        check_body(w, &after)?;
        if let (Some(a), Some(b)) = (hits(&before), hits(&after)) {
            ensure!(b > a, "{id}: the restored server counts {b} after {a}");
        }
        remove(&b.ctr, &id)?;
        let _ = b.ctr.run(&["images", "rm", &image]);
        if round > 0 {
            out.push(ms(took));
        }
    }
    Ok(out)
}

/// One wake from SCALED_DOWN.
/// Whether a cgroup2 hierarchy is mounted with `favordynmods` (the cgroup threadgroup lock
/// is global: one such mount is enough).
fn favordynmods() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&"cgroup2")
                && f.get(3)
                    .is_some_and(|o| o.split(',').any(|o| o == "favordynmods"))
        })
}

#[derive(Default)]
struct Wake {
    /// Client: connect to the end of the answer.
    client_ms: f64,
    /// The shim's state file: `last_wake_ms`.
    shim_wake_ms: Option<f64>,
    /// The tree's restore (`restored ... took_ms`).
    tree_ms: Option<f64>,
    prepare_ms: Option<f64>,
    criu_ms: Option<f64>,
    criu_forking_ms: Option<f64>,
    criu_restore_ms: Option<f64>,
    /// Moving CRIU into the container's cgroups, before its request.
    cgroup_join_ms: Option<f64>,
    restore_total_ms: Option<f64>,
}

/// The scaled-down container's figures.
struct Wakes {
    id: String,
    wakes: Vec<Wake>,
    /// Container memory (cgroup) running, and once SCALED_DOWN, bytes.
    memory_running: Option<u64>,
    memory_asleep: Option<u64>,
    memory_file: Option<PathBuf>,
    /// The shim's record of the last scale-down.
    shim_memory: (Option<u64>, Option<u64>),
    checkpoint_bytes: Option<u64>,
    /// Shim RSS running and asleep, KiB.
    rss_running: Option<u64>,
    rss_asleep: Option<u64>,
    /// The scale-down's phases (from the last one's log lines).
    scaledown_ms: Option<f64>,
    dump_ms: Option<f64>,
    criu_frozen_ms: Option<f64>,
}

/// A hibernation-enabled container woken from SCALED_DOWN `rounds` (+1 warm-up) times by a
/// client's connection; left asleep at the end.
fn scaled_down_wakes(b: &Bench, ns: &NetNs, w: &Workload, rounds: usize) -> Result<Wakes> {
    let id = format!("sd-{}", w.name);
    let addr = ns.addr(w.port);
    run(
        b,
        Runtime::Architect,
        &id,
        Some(ns),
        w,
        &[
            (ANN_HIBERNATE, "true"),
            (ANN_FREEZE, "0"),
            (ANN_SCALEDOWN, SCALEDOWN_AFTER),
        ],
    )?;
    let (_, body) = first_answer(addr, Instant::now(), Duration::from_secs(120))?;
    check_body(w, &body)?;
    let mut last_hits = hits(&body);
    let sum = heap_sum(&body).map(str::to_string);
    let pid = b.ctr.task_pid(&id)?;
    let mem_file = memory_file(pid);
    let memory_running = mem_file.as_deref().and_then(read_u64);
    let shim = shim_pid(&id)?;
    let rss_running = rss_kib(shim);
    let full_sum = match sum {
        Some(_) => {
            let full = http_get(addr, "/full", Duration::from_secs(1))?;
            last_hits = hits(&full);
            Some(full)
        }
        None => None,
    };
    let mut out = Wakes {
        id: id.clone(),
        wakes: Vec::new(),
        memory_running,
        memory_asleep: None,
        memory_file: mem_file.clone(),
        shim_memory: (None, None),
        checkpoint_bytes: None,
        rss_running,
        rss_asleep: None,
        scaledown_ms: None,
        dump_ms: None,
        criu_frozen_ms: None,
    };
    for round in 0..=rounds {
        let st = wait_state(b, &id, State::ScaledDown, |_| true)?;
        if round == 0 {
            out.memory_asleep = mem_file.as_deref().and_then(read_u64);
            out.shim_memory = (st.memory_before_bytes, st.memory_after_bytes);
            out.checkpoint_bytes = st.checkpoint_bytes;
            out.rss_asleep = rss_kib(shim);
            let sd = log_fields(b, &id, &["scaled down", "took_ms="]);
            out.scaledown_ms = field(&sd, "took_ms");
            let dump = log_fields(b, &id, &["checkpointed", "elapsed_ms="]);
            out.dump_ms = field(&dump, "elapsed_ms");
            out.criu_frozen_ms = field(&dump, "criu_frozen_ms");
        }
        // The images are written back before the wake, so it does not compete with that.
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        let t = Instant::now();
        let body = http_get(addr, "/", Duration::from_secs(30))
            .with_context(|| format!("{id}: the wake's request\n{}", b.containerd.log_tail(30)))?;
        let client = t.elapsed();
        check_body(w, &body)?;
        if let (Some(a), Some(n)) = (last_hits, hits(&body)) {
            ensure!(
                n == a + 1,
                "{id}: the woken server counts {n} after {a}: not the same process"
            );
        }
        ensure!(
            sum.as_deref() == heap_sum(&body),
            "{id}: the heap's checksum changed across the wake"
        );
        last_hits = hits(&body);
        let st = wait_state(b, &id, State::Running, |s| s.wakes > st.wakes)?;
        let tree = log_fields(b, &id, &[" restored", "took_ms="]);
        let criu = log_fields(b, &id, &[" restored", "prepare_ms="]);
        if round > 0 {
            out.wakes.push(Wake {
                client_ms: ms(client),
                shim_wake_ms: st.last_wake_ms,
                tree_ms: field(&tree, "took_ms"),
                prepare_ms: field(&criu, "prepare_ms"),
                criu_ms: field(&criu, "criu_ms"),
                criu_forking_ms: field(&criu, "criu_forking_ms"),
                criu_restore_ms: field(&criu, "criu_restore_ms"),
                cgroup_join_ms: field(&criu, "cgroup_join_ms"),
                restore_total_ms: field(&criu, "total_ms"),
            });
        }
    }
    if let Some(before) = full_sum {
        let after = http_get(addr, "/full", Duration::from_secs(10))?;
        ensure!(
            heap_sum(&before) == heap_sum(&after),
            "{id}: the whole heap's checksum changed across {} wakes",
            rounds + 1
        );
    }
    // Asleep again for the idle measurement.
    let st = wait_state(b, &id, State::ScaledDown, |_| true)?;
    ensure!(
        st.wakes as usize == rounds + 1,
        "{id}: {} wakes recorded, {} made",
        st.wakes,
        rounds + 1
    );
    Ok(out)
}

/// First request to a FROZEN container and the next request to it (running), per round.
fn frozen_requests(b: &Bench, ns: &NetNs, w: &Workload, rounds: usize) -> Result<[Vec<f64>; 2]> {
    let id = format!("fr-{}", w.name);
    let addr = ns.addr(w.port);
    run(
        b,
        Runtime::Architect,
        &id,
        Some(ns),
        w,
        &[
            (ANN_HIBERNATE, "true"),
            (ANN_FREEZE, FREEZE_AFTER),
            (ANN_SCALEDOWN, "0"),
        ],
    )?;
    let (_, body) = first_answer(addr, Instant::now(), Duration::from_secs(120))?;
    check_body(w, &body)?;
    let mut out = [Vec::new(), Vec::new()];
    for round in 0..=rounds {
        let st = wait_state(b, &id, State::Frozen, |_| true)?;
        let t = Instant::now();
        let body = http_get(addr, "/", Duration::from_secs(10))?;
        let frozen = t.elapsed();
        check_body(w, &body)?;
        // Then the same request to it running: three, 30 ms apart (well within
        // freeze-after), the median.
        let mut running = Vec::new();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(30));
            let t = Instant::now();
            let body = http_get(addr, "/", Duration::from_secs(10))?;
            running.push(ms(t.elapsed()));
            check_body(w, &body)?;
        }
        let running = median(running);
        // The request thawed it: the shim has left that FROZEN (it may be FROZEN again
        // by now; the state file does not count thaws in `wakes`).
        wait_for(
            &format!("{id} to leave the FROZEN state of the request"),
            Duration::from_secs(10),
            || status(b, &id).filter(|s| s.since_unix_ms > st.since_unix_ms),
        )?;
        if round > 0 {
            out[0].push(ms(frozen));
            out[1].push(running);
        }
    }
    remove(&b.ctr, &id)?;
    Ok(out)
}

/// CPU time of `pid` so far: utime+stime in seconds (tick resolution; threads that
/// exited included), and each thread's run time from its `schedstat` (nanoseconds).
struct Cpu {
    ticks_s: f64,
    threads_ns: std::collections::HashMap<String, u64>,
}

impl Cpu {
    fn of(pid: i32) -> Result<Cpu> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let close = stat.rfind(')').context("malformed stat")?;
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()?
            + f.get(12).context("stime")?.parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut threads_ns = std::collections::HashMap::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
            {
                threads_ns.insert(t.file_name().to_string_lossy().into_owned(), ns);
            }
        }
        Ok(Cpu {
            ticks_s: ticks as f64 / hz,
            threads_ns,
        })
    }

    /// Seconds of run time since `before`, over the threads alive now (a thread that exited
    /// in between is not counted; one that started is counted from zero).
    fn threads_since(&self, before: &Cpu) -> f64 {
        self.threads_ns
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(*before.threads_ns.get(tid).unwrap_or(&0)))
            .sum::<u64>() as f64
            / 1e9
    }
}

/// The shims' CPU over an idle window: one RUNNING hibernation-enabled container (never
/// frozen within the window), one without hibernation, one under the stock shim, and the
/// SCALED_DOWN containers left by the wake measurements.
fn idle_cpu(
    b: &Bench,
    sleepers: &[(String, NetNs)],
    secs: u64,
    lines: &mut Vec<String>,
) -> Result<()> {
    let w = Workload {
        name: "idle",
        args: ["httpd", "-f", "-p", "8080", "-h", "/www"]
            .map(String::from)
            .to_vec(),
        port: 8080,
        body_prefix: "hello from httpd",
        targets: "",
    };
    let mut watched = Vec::new();
    let hib = [
        (ANN_HIBERNATE, "true"),
        (ANN_FREEZE, "1h"),
        (ANN_SCALEDOWN, "1h"),
    ];
    for (id, rt, ann, what) in [
        (
            "idle-hib",
            Runtime::Architect,
            &hib[..],
            "architect, hibernation on, RUNNING",
        ),
        (
            "idle-plain",
            Runtime::Architect,
            &[][..],
            "architect, hibernation off",
        ),
        ("idle-stock", Runtime::Stock, &[][..], "stock runc shim"),
    ] {
        run(b, rt, id, None, &w, ann)?;
        b.ctr.wait_status(id, "RUNNING", Duration::from_secs(30))?;
        watched.push((id.to_string(), what.to_string()));
    }
    wait_state(b, "idle-hib", State::Running, |_| true)?;
    for (id, _) in sleepers {
        wait_state(b, id, State::ScaledDown, |_| true)?;
        watched.push((id.clone(), "architect, SCALED_DOWN".to_string()));
    }
    let pids: Vec<i32> = watched
        .iter()
        .map(|(id, _)| shim_pid(id))
        .collect::<Result<_>>()?;
    // Start-up work (the first state file, the watch's rules) settles first.
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<Cpu> = pids.iter().map(|p| Cpu::of(*p)).collect::<Result<_>>()?;
    let t = Instant::now();
    // The measurement window itself (not a wait for a state).
    std::thread::sleep(Duration::from_secs(secs));
    let wall = t.elapsed().as_secs_f64();
    let after: Vec<Cpu> = pids.iter().map(|p| Cpu::of(*p)).collect::<Result<_>>()?;
    let st = status(b, "idle-hib").context("idle-hib state file")?;
    ensure!(
        st.state == State::Running,
        "idle-hib left RUNNING during the window"
    );
    lines.push(format!(
        "idle shim CPU over {wall:.1} s (% of one core; utime+stime at tick resolution | threads' schedstat run time):"
    ));
    let mut pct = Vec::new();
    for (i, (id, what)) in watched.iter().enumerate() {
        let ticks = (after[i].ticks_s - before[i].ticks_s) / wall * 100.0;
        let sched = after[i].threads_since(&before[i]) / wall * 100.0;
        pct.push(sched);
        lines.push(format!(
            "  {id:<16} {what:<36} {ticks:7.3} % | {sched:7.4} %   RSS {} KiB",
            rss_kib(pids[i]).map_or("?".into(), |k| k.to_string())
        ));
    }
    lines.push(format!(
        "  idle detector per watched container (hibernation on - off, schedstat): {:.4} % of a core (target <= 0.1 %)",
        pct[0] - pct[1]
    ));
    for id in ["idle-hib", "idle-plain", "idle-stock"] {
        remove(&b.ctr, id)?;
    }
    Ok(())
}

// ---- report ---------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn med_of(ws: &[Wake], f: impl Fn(&Wake) -> Option<f64>) -> f64 {
    median(ws.iter().filter_map(f).collect())
}

fn mib(b: Option<u64>) -> String {
    b.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1_048_576.0))
}

fn report_wakes(
    w: &Workload,
    cold: &[Vec<f64>; 2],
    stock: &[f64],
    wakes: &Wakes,
    lines: &mut Vec<String>,
) {
    let wake = med_of(&wakes.wakes, |x| Some(x.client_ms));
    let cold_stock = median(cold[0].clone());
    let cold_arch = median(cold[1].clone());
    let restore = median(stock.to_vec());
    let n = &w.name;
    lines.push(format!(
        "{n:<10} wake from SCALED_DOWN to first answer (client connect..answer) {wake:8.1} ms   ({})",
        w.targets
    ));
    lines.push(format!(
        "{n:<10} cold start to first answer: architect {cold_arch:8.1} ms, stock {cold_stock:8.1} ms   wake/cold(architect) {:.3}x",
        wake / cold_arch
    ));
    lines.push(format!(
        "{n:<10} stock ctr c checkpoint --task + ctr c restore --live, restore to first answer {restore:8.1} ms   wake/stock restore {:.3}x",
        wake / restore
    ));
    let shim = med_of(&wakes.wakes, |x| x.shim_wake_ms);
    let tree = med_of(&wakes.wakes, |x| x.tree_ms);
    let total = med_of(&wakes.wakes, |x| x.restore_total_ms);
    let prepare = med_of(&wakes.wakes, |x| x.prepare_ms);
    let criu = med_of(&wakes.wakes, |x| x.criu_ms);
    let forking = med_of(&wakes.wakes, |x| x.criu_forking_ms);
    let crestore = med_of(&wakes.wakes, |x| x.criu_restore_ms);
    let join = med_of(&wakes.wakes, |x| x.cgroup_join_ms);
    lines.push(format!(
        "{n:<10} where the wake goes (medians): client {wake:.1} ms = tree restore {tree:.1} \
         (images check {:.1} + restore {total:.1}: prepare {prepare:.1}, CRIU request {criu:.1} \
         [CRIU forking {forking:.1}, CRIU restore {crestore:.1}, CRIU moved into the cgroups {join:.1}, \
         CRIU start/exit {:.1}], finish {:.1}) \
         + the rest {:.1} (the SYN seen, the held packets let through, the app answering); \
         the shim's own record (last_wake_ms, until the hold is gone) {shim:.1} ms",
        tree - total,
        criu - crestore - join,
        total - prepare - criu,
        wake - tree,
    ));
    let per: Vec<String> = wakes
        .wakes
        .iter()
        .map(|x| format!("{:.1}", x.client_ms))
        .collect();
    lines.push(format!(
        "{n:<10} wakes (client ms, each round): {}",
        per.join(" ")
    ));
    let left = match (wakes.memory_running, wakes.memory_asleep) {
        (Some(r), Some(a)) if r > 0 => format!("{:.2} %", a as f64 / r as f64 * 100.0),
        _ => "?".into(),
    };
    lines.push(format!(
        "{n:<10} container memory ({}): running {}, SCALED_DOWN {} ({left} left, target <= 5 %); \
         shim's record: before {}, after {}; checkpoint {}",
        wakes
            .memory_file
            .as_deref()
            .and_then(|p| p.file_name())
            .map_or("?".into(), |f| f.to_string_lossy().into_owned()),
        mib(wakes.memory_running),
        mib(wakes.memory_asleep),
        mib(wakes.shim_memory.0),
        mib(wakes.shim_memory.1),
        mib(wakes.checkpoint_bytes),
    ));
    lines.push(format!(
        "{n:<10} shim RSS: container running {} KiB, right after its scale-down {} KiB (settled: the idle table)",
        wakes.rss_running.map_or("?".into(), |k| k.to_string()),
        wakes.rss_asleep.map_or("?".into(), |k| k.to_string()),
    ));
    let opt = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.1} ms"));
    lines.push(format!(
        "{n:<10} scale-down (first): {} in all, CRIU dump {} (tree frozen by CRIU {})",
        opt(wakes.scaledown_ms),
        opt(wakes.dump_ms),
        opt(wakes.criu_frozen_ms),
    ));
}

fn report_frozen(w: &Workload, r: &[Vec<f64>; 2], lines: &mut Vec<String>) {
    let frozen = median(r[0].clone());
    let running = median(r[1].clone());
    lines.push(format!(
        "{:<10} request to FROZEN {frozen:7.3} ms, to RUNNING {running:7.3} ms: {:+.3} ms added (target <= 1 ms; {} rounds)",
        w.name,
        frozen - running,
        r[0].len()
    ));
}
