//! Shim benchmarks, runc-architect side by side with containerd's stock runc shim
//! (`containerd-shim-runc-v2` + runc) on the same private containerd, in one run:
//!
//! - memory of the shim process (RSS and PSS from `/proc/PID/smaps_rollup`) for one idle
//!   container and for a pod of three containers (grouped into one shim by the CRI
//!   sandbox-id annotation, as the kubelet's containers are);
//! - `ctr run -d` until the task is RUNNING;
//! - a full lifecycle through ctr: `ctr run -d`, `ctr task kill -s KILL`, wait for STOPPED,
//!   `ctr task rm`, `ctr container rm` (each step is a ctr process, ~10 ms of fixed cost that
//!   both runtimes pay alike);
//! - the same lifecycle at the shim's own API, as containerd drives it, without ctr and
//!   containerd's metadata work: `shim start` (bootstrap), Create, Start, Kill, Wait,
//!   Delete, Shutdown, one new shim per container on a prepared bundle.
//!
//! Every figure is a median over several rounds; runtimes alternate within a round so
//! drift on the machine hits both alike. Ratios are architect / stock (lower is better).
//!
//! `cargo bench -p runc-architect-benches --bench shim` (builds nothing itself: it uses
//! `target/release/containerd-shim-runc-architect-v1`, or `RA_SHIM_BINARY`). Environment:
//! `RA_BENCH_ROUNDS` (default 15), `RA_ONLY_CONTAINERD=1.7|2.1` (default 1.7).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use runc_architect_tests::cleanup::serving_shims;
use runc_architect_tests::image::ImageBuilder;
use runc_architect_tests::shim::{write_bundle, ShimProcess};
use runc_architect_tests::spec::default_spec;
use runc_architect_tests::{Containerd, Ctr, Runtime, Version};

const IMAGE: &str = "bench/busybox:latest";

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let rounds: usize = std::env::var("RA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let version = std::env::var("RA_ONLY_CONTAINERD")
        .ok()
        .and_then(|v| Version::parse(&v))
        .unwrap_or(Version::V1_7);
    let containerd = Containerd::start(version).context("start private containerd")?;
    let ctr = containerd.ctr("bench");
    let scratch = containerd.scratch_dir("image")?;
    ImageBuilder::busybox(IMAGE)?.import(&ctr, &scratch)?;
    println!(
        "runc-architect shim benchmark on containerd {} ({rounds} rounds)",
        version.series()
    );
    println!("architect shim: {}", containerd.architect_shim().display());

    let mut report = Report::default();
    // Warm-up: page cache, first shim start, image unpack into the snapshotter.
    for rt in Runtime::ALL {
        lifecycle(&ctr, rt, "warmup")?;
    }
    let mut run = [Vec::new(), Vec::new()];
    let mut cycle = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, rt) in Runtime::ALL.into_iter().enumerate() {
            let (r, c) = lifecycle(&ctr, rt, &format!("cycle-{round}"))?;
            run[i].push(r);
            cycle[i].push(c);
        }
    }
    report.time("ctr run -d to RUNNING", &run);
    report.time("ctr: run, kill, rm (cycle)", &cycle);

    let image = ImageBuilder::busybox(IMAGE)?;
    let mut api = [Vec::new(), Vec::new()];
    for round in 0..rounds + 1 {
        for (i, rt) in Runtime::ALL.into_iter().enumerate() {
            let d = shim_cycle(&containerd, &image, rt, &format!("api-{round}"))?;
            // The first round warms up both shims' binaries and the bundle code paths.
            if round > 0 {
                api[i].push(d);
            }
        }
    }
    report.time("shim API: start..shutdown", &api);

    let mut one = [Vec::new(), Vec::new()];
    let mut pod = [Vec::new(), Vec::new()];
    for round in 0..3 {
        for (i, rt) in Runtime::ALL.into_iter().enumerate() {
            one[i].push(shim_memory(&ctr, rt, &format!("mem1-{round}"), 1)?);
            pod[i].push(shim_memory(&ctr, rt, &format!("mem3-{round}"), 3)?);
        }
    }
    report.memory("1 idle container", &one);
    report.memory("pod of 3 containers", &pod);
    report.print();
    Ok(())
}

/// One container's life; returns (run -d latency, whole cycle).
fn lifecycle(ctr: &Ctr, rt: Runtime, name: &str) -> Result<(Duration, Duration)> {
    let id = format!("{name}-{}", rt.tag());
    let start = Instant::now();
    ctr.ok(&[
        "run",
        "-d",
        "--runtime",
        rt.runtime_type(),
        IMAGE,
        &id,
        "sleep",
        "1000",
    ])?;
    let run = start.elapsed();
    ctr.ok(&["task", "kill", "-s", "SIGKILL", &id])?;
    ctr.wait_status(&id, "STOPPED", Duration::from_secs(10))?;
    ctr.ok(&["task", "rm", &id])?;
    ctr.ok(&["container", "rm", &id])?;
    Ok((run, start.elapsed()))
}

/// One container's whole life at the shim API: bootstrap a new shim, Create, Start,
/// Kill (SIGKILL), Wait, Delete, Shutdown; timed from `start` to the shim's exit.
fn shim_cycle(
    containerd: &Containerd,
    image: &ImageBuilder,
    rt: Runtime,
    name: &str,
) -> Result<Duration> {
    let id = format!("{name}-{}", rt.tag());
    let bundle = containerd.scratch_dir(&format!("bundle-{id}"))?;
    let spec = default_spec("rootfs", &["sleep", "1000"], &format!("/bench/{id}"));
    write_bundle(&bundle, &spec, Some(image))?;
    let binary = match rt {
        Runtime::Stock => containerd.version().stock_shim_bin(),
        Runtime::Architect => containerd.architect_shim().to_path_buf(),
    };
    let start = Instant::now();
    let mut shim = ShimProcess::launch(&binary, containerd, "bench-api", &id, &bundle)?;
    shim.run(&id, &bundle)?;
    shim.kill(&id, "", 9, false)
        .map_err(|e| anyhow!("kill {id}: {e}"))?;
    shim.wait(&id, "").map_err(|e| anyhow!("wait {id}: {e}"))?;
    shim.delete(&id, "")
        .map_err(|e| anyhow!("delete {id}: {e}"))?;
    drop(shim); // Shutdown, and waits for the shim process to exit.
    let elapsed = start.elapsed();
    let _ = std::fs::remove_dir_all(&bundle);
    Ok(elapsed)
}

#[derive(Clone, Copy, Default)]
struct Mem {
    rss_kib: u64,
    pss_kib: u64,
}

/// Starts `n` idle containers in one shim, measures that shim, removes them.
fn shim_memory(ctr: &Ctr, rt: Runtime, name: &str, n: usize) -> Result<Mem> {
    let group = format!("{name}-{}", rt.tag());
    let ids: Vec<String> = (0..n).map(|i| format!("{group}-{i}")).collect();
    let annotation = format!("io.kubernetes.cri.sandbox-id={group}");
    for id in &ids {
        ctr.ok(&[
            "run",
            "-d",
            "--runtime",
            rt.runtime_type(),
            "--annotation",
            &annotation,
            IMAGE,
            id,
            "sleep",
            "1000",
        ])?;
    }
    // Measure the idle state: give each shim a few quiet seconds (runc-architect trims its
    // resident memory after one second without requests; the stock shim's Go runtime
    // returns memory on its own schedule).
    std::thread::sleep(Duration::from_secs(3));
    let pid = shim_pid(rt, &ids[0])?;
    let mem = read_mem(pid)?;
    for id in &ids {
        let _ = ctr.run(&["task", "kill", "-s", "SIGKILL", id]);
    }
    for id in &ids {
        let _ = ctr.wait_status(id, "STOPPED", Duration::from_secs(10));
        let _ = ctr.run(&["task", "rm", id]);
        let _ = ctr.run(&["container", "rm", id]);
    }
    Ok(mem)
}

/// The shim process serving container `id` (the one whose command line names it or its
/// group: a grouped shim is started with the first container's id).
fn shim_pid(rt: Runtime, id: &str) -> Result<u32> {
    let binary = match rt {
        Runtime::Stock => "containerd-shim-runc-v2",
        Runtime::Architect => "containerd-shim-runc-architect-v1",
    };
    let pids = serving_shims(binary, |args| {
        args.windows(2).any(|w| w[0] == "-id" && w[1] == id)
    });
    if let Some(pid) = pids.first() {
        return Ok(*pid);
    }
    bail!("no {binary} process serving {id}")
}

fn read_mem(pid: u32) -> Result<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{name} missing in smaps_rollup of {pid}"))
    };
    Ok(Mem {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:")?,
    })
}

#[derive(Default)]
struct Report {
    lines: Vec<String>,
}

fn median_ms(v: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN)
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

impl Report {
    fn time(&mut self, what: &str, samples: &[Vec<Duration>; 2]) {
        let (stock, arch) = (median_ms(&samples[0]), median_ms(&samples[1]));
        self.lines.push(format!(
            "{what:<28} stock {stock:8.1} ms   architect {arch:8.1} ms   ratio {:.2}x",
            arch / stock
        ));
    }

    fn memory(&mut self, what: &str, samples: &[Vec<Mem>; 2]) {
        let rss = |i: usize| median_u64(samples[i].iter().map(|m| m.rss_kib).collect());
        let pss = |i: usize| median_u64(samples[i].iter().map(|m| m.pss_kib).collect());
        self.lines.push(format!(
            "shim RSS, {what:<19} stock {:6} KiB   architect {:6} KiB   ratio {:.2}x",
            rss(0),
            rss(1),
            rss(1) as f64 / rss(0) as f64
        ));
        self.lines.push(format!(
            "shim PSS, {what:<19} stock {:6} KiB   architect {:6} KiB   ratio {:.2}x",
            pss(0),
            pss(1),
            pss(1) as f64 / pss(0) as f64
        ));
    }

    fn print(&self) {
        println!();
        for l in &self.lines {
            println!("{l}");
        }
    }
}
