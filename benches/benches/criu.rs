//! Checkpoint/restore benchmarks, runc-architect side by side with containerd's stock runc
//! shim (`containerd-shim-runc-v2` + runc + the same CRIU) on one private containerd, in
//! one run:
//!
//! - `ctr c checkpoint --task --rw` and `ctr c restore --live --rw` wall time for a small
//!   TCP server (`ckload echo`) and for processes with 256 MiB and 1 GiB of touched heap
//!   (`ckload heap`, which answers with a checksum of its whole heap: every restore is
//!   verified);
//! - restore-to-first-answer: from starting `ctr c restore` until the restored server
//!   answers a TCP connection from the host side of its network namespace (a named netns
//!   joined with `--with-ns`, like a pod's);
//! - where runc-architect's restore time goes: containerd and ctr (everything outside the
//!   shim's Create), the shim's preparation, the CRIU request (spawn to exit), and inside
//!   it CRIU's own phases from its `stats-restore` image (forking, restore); the stock
//!   path's CRIU phases from the `stats-restore` runc's CRIU leaves in the shim's work
//!   directory;
//! - where runc-architect's checkpoint time goes: how long CRIU kept the tree frozen, how
//!   long it took drawing memory out of it and writing it (runc's CRIU leaves its
//!   `stats-dump` in the image directory, which containerd packs and deletes);
//! - restore throughput for the heaps (MiB restored / CRIU restore time, and end to end),
//!   next to the machine's ceiling for it: reading as much from the page cache into
//!   fresh anonymous memory.
//!
//! Every figure is a median over the rounds; runtimes alternate within a round, and which
//! goes first alternates between rounds, so drift on the machine hits both alike; dirty
//! pages are written back before each checkpoint. Ratios are architect / stock (lower is
//! better).
//!
//! `cargo bench -p runc-architect-benches --bench criu` (uses
//! `target/release/containerd-shim-runc-architect-v1`, or `RA_SHIM_BINARY`). Environment:
//! `RA_BENCH_ROUNDS` (default 7; the 1 GiB case runs at most 3), `RA_ONLY_CONTAINERD=1.7|2.1`
//! (default 1.7), `RA_BENCH_ONLY=NAME` (only the workloads whose name contains NAME:
//! `tcp-server`, `heap-256m`, `heap-1g`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use runc_architect_runtime::checkpoint::stats;
use runc_architect_tests::ckpt::{self, NetNs};
use runc_architect_tests::poll::wait_for;
use runc_architect_tests::{Containerd, Ctr, Runtime, Version};

const NAMESPACE: &str = "bench-ckpt";

/// One benchmarked workload.
struct Workload {
    name: &'static str,
    args: Vec<String>,
    port: u16,
    /// Touched heap, for throughput figures.
    heap_mib: Option<u64>,
    rounds: usize,
}

/// One checkpoint/restore cycle.
#[derive(Default, Clone)]
struct Sample {
    checkpoint: Duration,
    restore: Duration,
    first_answer: Duration,
    /// runc-architect's own account (from the shim's `restored` log line).
    shim: Option<ShimRestore>,
    /// CRIU's restore phases (from `stats-restore`), when found.
    criu: Option<stats::RestorePhases>,
    /// runc-architect's CRIU dump phases (from its `checkpointed` log line, which carries
    /// CRIU's `stats-dump`).
    dump: Option<stats::DumpPhases>,
}

#[derive(Default, Clone, Copy)]
struct ShimRestore {
    prepare_ms: f64,
    criu_ms: f64,
    total_ms: f64,
}

fn main() -> Result<()> {
    let rounds: usize = std::env::var("RA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let version = std::env::var("RA_ONLY_CONTAINERD")
        .ok()
        .and_then(|v| Version::parse(&v))
        .unwrap_or(Version::V1_7);
    let containerd = Containerd::start(version).context("start private containerd")?;
    let ctr = containerd
        .ctr(NAMESPACE)
        .with_timeout(Duration::from_secs(300));
    let scratch = containerd.scratch_dir("image")?;
    ckpt::ckpt_image(&scratch)?.import(&ctr, &scratch)?;
    let ns = NetNs::create()?;
    println!(
        "runc-architect checkpoint/restore benchmark on containerd {} ({rounds} rounds)",
        version.series()
    );
    println!("architect shim: {}", containerd.architect_shim().display());
    println!("criu: {}", criu_version());

    let workloads = [
        Workload {
            name: "tcp-server",
            args: vec!["/bin/ckload".into(), "echo".into(), "7070".into()],
            port: 7070,
            heap_mib: None,
            rounds,
        },
        Workload {
            name: "heap-256m",
            args: vec![
                "/bin/ckload".into(),
                "heap".into(),
                "256".into(),
                "7272".into(),
            ],
            port: 7272,
            heap_mib: Some(256),
            rounds,
        },
        Workload {
            name: "heap-1g",
            args: vec![
                "/bin/ckload".into(),
                "heap".into(),
                "1024".into(),
                "7373".into(),
            ],
            port: 7373,
            heap_mib: Some(1024),
            rounds: rounds.min(3),
        },
    ];

    let only = std::env::var("RA_BENCH_ONLY").unwrap_or_default();
    let mut lines = Vec::new();
    for w in workloads.iter().filter(|w| w.name.contains(only.as_str())) {
        // Warm-up: page cache, shim binaries, the image's snapshot.
        for rt in Runtime::ALL {
            cycle(&containerd, &ctr, &ns, rt, w, "warmup")?;
        }
        let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        for round in 0..w.rounds {
            // Who goes first alternates: the second runs while the first one's gigabytes
            // of images are still being written back.
            let mut order: Vec<(usize, Runtime)> = Runtime::ALL.into_iter().enumerate().collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for (i, rt) in order {
                samples[i].push(cycle(&containerd, &ctr, &ns, rt, w, &round.to_string())?);
            }
        }
        report(w, &samples, &mut lines);
        if let Some(mib) = w.heap_mib {
            match copy_limit(&scratch, mib) {
                Ok(gbs) => lines.push(format!(
                    "{:<10} physical limit: page cache into fresh anonymous memory (what CRIU's \
                     restorer does) {gbs:.2} GB/s",
                    w.name
                )),
                Err(e) => lines.push(format!(
                    "{:<10} physical limit: not measured ({e:#})",
                    w.name
                )),
            }
        }
    }
    println!();
    for l in &lines {
        println!("{l}");
    }
    Ok(())
}

/// The machine's ceiling for a restore's memory: reading `mib` MiB that sit in the page
/// cache into freshly mapped anonymous memory, as CRIU's restorer preadv()s the pages
/// image into the restored mappings (each page faulted in, zeroed, then overwritten).
/// Median of three runs, in GB/s.
fn copy_limit(scratch: &Path, mib: u64) -> Result<f64> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let len = (mib as usize) << 20;
    let path = scratch.join("copy-limit.img");
    {
        let mut f = std::fs::File::create(&path)?;
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for _ in 0..mib {
            f.write_all(&chunk)?;
        }
    }
    let file = std::fs::File::open(&path)?;
    // Into the page cache first, as the unpacked checkpoint is at restore.
    let mut sink = vec![0u8; 64 << 20];
    let mut off = 0;
    while off < len {
        off += file.read_at(&mut sink, off as u64)?.max(1);
    }
    let mut runs = Vec::new();
    for _ in 0..3 {
        // SAFETY: a fresh private anonymous mapping of `len` bytes, unmapped below; only
        // read into through the slice made from it while it is mapped.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            bail!("mmap {mib} MiB: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `map` is a live, writable mapping of `len` bytes owned here.
        let mem = unsafe { std::slice::from_raw_parts_mut(map.cast::<u8>(), len) };
        let t = Instant::now();
        let mut off = 0;
        let mut result = Ok(());
        while off < len {
            let end = (off + (64 << 20)).min(len);
            match file.read_at(&mut mem[off..end], off as u64) {
                Ok(0) => break,
                Ok(n) => off += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        // SAFETY: unmapping the mapping made above; `mem` is not used after this.
        unsafe { libc::munmap(map, len) };
        result?;
        runs.push(len as f64 / secs / 1e9);
    }
    let _ = std::fs::remove_file(&path);
    Ok(median(runs))
}

fn criu_version() -> String {
    std::process::Command::new("criu")
        .arg("--version")
        .env("PATH", runc_architect_tests::process::host_path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().replace('\n', " "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Runs the workload, checkpoints it, deletes it, restores it; times each step.
fn cycle(
    containerd: &Containerd,
    ctr: &Ctr,
    ns: &NetNs,
    rt: Runtime,
    w: &Workload,
    round: &str,
) -> Result<Sample> {
    let id = format!("{}-{round}-{}", w.name, rt.tag());
    let image = format!("bench/ckpt-{id}:1");
    let addr: SocketAddr = ns.addr(w.port);
    let with_ns = format!("network:{}", ns.path());
    let mut run: Vec<&str> = vec![
        "run",
        "-d",
        "--runtime",
        rt.runtime_type(),
        "--with-ns",
        &with_ns,
        ckpt::CKPT_IMAGE,
        &id,
    ];
    run.extend(w.args.iter().map(String::as_str));
    ctr.ok(&run)?;
    let (before, _) = ckpt::wait_answer(addr, Some("hello"), Duration::from_secs(120))?;
    // The server's child for that connection must be gone before the dump.
    ctr.wait_alone(&id, Duration::from_secs(60))?;
    // Dirty pages from earlier cycles written back first, so no dump pays for them.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };

    let t = Instant::now();
    ctr.ok(&["containers", "checkpoint", "--task", "--rw", &id, &image])?;
    let checkpoint = t.elapsed();
    let dump = match rt {
        Runtime::Stock => None,
        Runtime::Architect => shim_dump(containerd, &id),
    };
    remove(ctr, &id)?;

    let tmp = containerd.dir().join("tmp");
    let known: Vec<PathBuf> = checkpoint_dirs(&tmp);
    let t = Instant::now();
    let mut restore = ctr
        .command(&["containers", "restore", "--live", "--rw", &id, &image])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start ctr c restore")?;
    let mut first_answer = None;
    let mut restored = None;
    while first_answer.is_none() || restored.is_none() {
        if restored.is_none() {
            if let Some(st) = restore.try_wait()? {
                restored = Some((t.elapsed(), st));
            }
        }
        if first_answer.is_none() {
            if let Ok(a) = ask(addr) {
                first_answer = Some((t.elapsed(), a));
            }
        }
        if t.elapsed() > Duration::from_secs(300) {
            let _ = restore.kill();
            bail!("{id}: no answer within 300 s of the restore");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let (restore_time, status) = restored.context("restore")?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = restore.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("{id}: ctr c restore failed: {err}");
    }
    let (first_answer, after) = first_answer.context("answer")?;
    if before != after {
        bail!("{id}: the restored workload answered {after:?}, before the checkpoint {before:?}");
    }

    // CRIU's work directory: ours writes into the unpacked checkpoint (containerd's temp
    // directory); the stock shim's runc into the shim's work directory in containerd's root.
    let stock_work = containerd
        .dir()
        .join("root/io.containerd.runtime.v2.task")
        .join(NAMESPACE)
        .join(&id);
    let criu = checkpoint_dirs(&tmp)
        .into_iter()
        .filter(|d| !known.contains(d))
        .chain(std::iter::once(stock_work))
        .find_map(|d| stats::restore_phases(&d).ok());
    let shim = match rt {
        Runtime::Architect => shim_restore(containerd, &id),
        Runtime::Stock => None,
    };
    remove(ctr, &id)?;
    let _ = ctr.run(&["images", "rm", &image]);
    for d in checkpoint_dirs(&tmp)
        .into_iter()
        .filter(|d| !known.contains(d))
    {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(Sample {
        checkpoint,
        restore: restore_time,
        first_answer,
        shim,
        criu,
        dump,
    })
}

/// One question to the workload: a short connect timeout (a SYN dropped by CRIU's network
/// lock must not cost the 1 s SYN retransmission), then as long as the answer takes (the
/// heap workloads checksum their whole heap per connection).
fn ask(addr: SocketAddr) -> Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        bail!("{addr} closed the connection");
    }
    Ok(line.trim_end().to_string())
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

/// containerd's unpacked checkpoints (`ctrd-checkpoint*` in its temp directory).
fn checkpoint_dirs(tmp: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(tmp)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("ctrd-checkpoint"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The numeric fields of the last line of containerd's log (the shim's log goes there)
/// that holds both `span` and `message`.
fn shim_log_fields(
    containerd: &Containerd,
    span: &str,
    message: &str,
) -> Option<Vec<(String, f64)>> {
    let log = std::fs::read_to_string(containerd.dir().join("containerd.log")).ok()?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(span) && l.contains(message))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

fn field(fields: &[(String, f64)], name: &str) -> Option<f64> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// The shim's account of restoring `id`, from its `restored` line.
fn shim_restore(containerd: &Containerd, id: &str) -> Option<ShimRestore> {
    let f = shim_log_fields(
        containerd,
        &format!("restore{{container={id}}}"),
        " restored pid=",
    )?;
    Some(ShimRestore {
        prepare_ms: field(&f, "prepare_ms")?,
        criu_ms: field(&f, "criu_ms")?,
        total_ms: field(&f, "total_ms")?,
    })
}

/// CRIU's dump phases of checkpointing `id`, from the shim's `checkpointed` line.
fn shim_dump(containerd: &Containerd, id: &str) -> Option<stats::DumpPhases> {
    let f = shim_log_fields(
        containerd,
        &format!("checkpoint{{container={id}}}"),
        " checkpointed",
    )?;
    let d = |name: &str| field(&f, name).map(|ms| Duration::from_secs_f64(ms / 1e3));
    Some(stats::DumpPhases {
        freezing: Duration::ZERO,
        frozen: d("criu_frozen_ms")?,
        memdump: d("criu_memdump_ms")?,
        memwrite: d("criu_memwrite_ms")?,
        pages_written: field(&f, "pages_written")? as u64,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(w: &Workload, samples: &[Vec<Sample>; 2], lines: &mut Vec<String>) {
    let med = |i: usize, f: &dyn Fn(&Sample) -> Option<f64>| -> f64 {
        median(samples[i].iter().filter_map(f).collect())
    };
    let row = |what: &str, f: &dyn Fn(&Sample) -> Option<f64>| -> String {
        let (s, a) = (med(0, f), med(1, f));
        format!(
            "{:<10} {what:<34} stock {s:8.1} ms   architect {a:8.1} ms   ratio {:.2}x",
            w.name,
            a / s
        )
    };
    lines.push(row("ctr c checkpoint --task --rw", &|s| {
        Some(ms(s.checkpoint))
    }));
    // runc's CRIU writes stats-dump into the image directory, which containerd packs into
    // the checkpoint and deletes: only runc-architect's dump phases are at hand.
    lines.push(format!(
        "{:<10} architect checkpoint breakdown (medians): tree frozen {:.1} ms; CRIU \
         drawing memory {:.1} ms, writing it {:.1} ms (partly after the tree runs again)",
        w.name,
        med(1, &|s| s.dump.map(|d| ms(d.frozen))),
        med(1, &|s| s.dump.map(|d| ms(d.memdump))),
        med(1, &|s| s.dump.map(|d| ms(d.memwrite))),
    ));
    lines.push(row("ctr c restore --live --rw", &|s| Some(ms(s.restore))));
    lines.push(row("restore to first answer", &|s| {
        Some(ms(s.first_answer))
    }));
    lines.push(row("CRIU restore_time (stats-restore)", &|s| {
        s.criu.map(|c| ms(c.restore))
    }));
    // Where runc-architect's restore goes.
    let a = |f: &dyn Fn(&Sample) -> Option<f64>| med(1, f);
    let total = a(&|s| Some(ms(s.restore)));
    let shim_total = a(&|s| s.shim.map(|x| x.total_ms));
    let prepare = a(&|s| s.shim.map(|x| x.prepare_ms));
    let criu = a(&|s| s.shim.map(|x| x.criu_ms));
    let forking = a(&|s| s.criu.map(|c| ms(c.forking)));
    let restore = a(&|s| s.criu.map(|c| ms(c.restore)));
    lines.push(format!(
        "{:<10} architect restore breakdown (medians): ctr+containerd+shim start {:.1} ms | \
         shim create {:.1} ms = prepare {:.1} + CRIU request {:.1} (CRIU forking {:.1}, \
         CRIU restore {:.1}, CRIU start/exit and notify {:.1}) + finish {:.1}",
        w.name,
        total - shim_total,
        shim_total,
        prepare,
        criu,
        forking,
        restore,
        criu - restore,
        shim_total - prepare - criu
    ));
    if let Some(mib) = w.heap_mib {
        let gbs = |t_ms: f64| (mib as f64 * 1_048_576.0) / (t_ms / 1e3) / 1e9;
        let stock_criu = med(0, &|s| s.criu.map(|c| ms(c.restore)));
        lines.push(format!(
            "{:<10} restore throughput: CRIU restore stock {:.2} GB/s, architect {:.2} GB/s; \
             end to end (ctr c restore) stock {:.2} GB/s, architect {:.2} GB/s",
            w.name,
            gbs(stock_criu),
            gbs(restore),
            gbs(med(0, &|s| Some(ms(s.restore)))),
            gbs(total)
        ));
    }
}
