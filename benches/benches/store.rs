//! Benchmark of the checkpoint store: raw digest speed, ingest and materialize throughput,
//! and dedup of replicas of one app. Run with
//! `cargo bench -p runc-architect-benches --bench store`. Prints medians of several runs.
//!
//! Workload: per replica a 64 MiB `pages-1.img` (16384 pages) whose pages are shared by all
//! replicas except 2-5% unique ones (the fraction varies per replica, the positions are
//! random), 5% of the shared pages are zero pages, plus eight small image files. Sources and
//! stores live on tmpfs (/dev/shm) so the figures are the store's CPU path; one ingest run
//! on the root file system (with its fsyncs) is shown for reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runc_architect_store::{CheckpointKey, MaterializeOptions, Reference, Store, StoreConfig};

const MIB: usize = 1 << 20;
const PAGES: usize = 16384; // 64 MiB
const RUNS: usize = 5;

fn fill_random(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^ (x >> 33)
}

/// Writes replica `r` of the synthetic app into `dir`; returns its unique-page fraction.
fn write_replica(dir: &Path, r: u64) -> f64 {
    std::fs::create_dir_all(dir).expect("create replica dir");
    let unique_permille = 20 + mix(r, 1) % 31; // 2.0% .. 5.0%
    let mut mem = vec![0u8; PAGES * 4096];
    let mut unique = 0;
    for (i, page) in mem.chunks_mut(4096).enumerate() {
        let i = i as u64;
        if mix(r + 1000, i) % 1000 < unique_permille {
            fill_random(mix(r, i) | 1, page);
            unique += 1;
        } else if mix(7, i) % 100 < 5 {
            // zero page (already zero)
        } else {
            fill_random(mix(42, i), page);
        }
    }
    std::fs::write(dir.join("pages-1.img"), &mem).expect("write pages");
    for (name, len) in [
        ("core-1.img", 2613),
        ("mm-1.img", 1421),
        ("pagemap-1.img", 230),
        ("files.img", 1486),
        ("fdinfo-2.img", 69),
        ("pstree.img", 26),
        ("inventory.img", 86),
        ("ids-1.img", 36),
    ] {
        let mut b = vec![0u8; len];
        fill_random(mix(r, len as u64), &mut b);
        std::fs::write(dir.join(name), &b).expect("write image");
    }
    unique as f64 / PAGES as f64
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// CPU time consumed by this process (all threads).
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and CPU time of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let (w, c) = (Instant::now(), cpu_time());
    let v = f();
    (v, w.elapsed(), cpu_time().saturating_sub(c))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn fmt_runs(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Bench {
    base: PathBuf,
    n: u64,
}

impl Bench {
    fn fresh(&mut self, tag: &str) -> PathBuf {
        self.n += 1;
        let p = self.base.join(format!("{tag}-{}", self.n));
        let _ = std::fs::remove_dir_all(&p);
        p
    }
}

fn open(root: &Path, threads: usize, key: Option<&Path>) -> Store {
    let mut cfg = StoreConfig::new(root);
    cfg.threads = Some(threads);
    if let Some(k) = key {
        cfg.keys.insert("enc".into(), k.to_owned());
    }
    Store::open(&cfg).expect("open store")
}

fn key(ns: &str, c: &str) -> CheckpointKey {
    CheckpointKey::new(ns, "app-5d8f7c9b4", c).expect("key")
}

/// Throughput of several runs: wall clock, and per CPU-second (bytes over the CPU time the
/// process consumed: "per core", unaffected by other load on the machine).
struct Tput {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Tput {
    fn new() -> Self {
        Tput {
            wall: Vec::new(),
            cpu: Vec::new(),
        }
    }
    fn add(&mut self, bytes: u64, wall: Duration, cpu: Duration) {
        self.wall.push(gbps(bytes, wall));
        self.cpu
            .push(gbps(bytes, cpu.max(Duration::from_micros(1))));
    }
    fn wall(&self) -> f64 {
        median(self.wall.clone())
    }
    fn cpu(&self) -> f64 {
        median(self.cpu.clone())
    }
    fn line(&self) -> String {
        format!(
            "wall {:6.2} GB/s [{}]   per CPU-second {:6.2} GB/s [{}]",
            self.wall(),
            fmt_runs(&self.wall),
            self.cpu(),
            fmt_runs(&self.cpu)
        )
    }
}

/// Ingest throughput of `src` into fresh stores.
fn ingest(
    b: &mut Bench,
    src: &Path,
    threads: usize,
    ns: &str,
    key_file: Option<&Path>,
    twice: bool,
) -> Tput {
    let mut t = Tput::new();
    for _ in 0..RUNS {
        let root = b.fresh("ingest");
        let store = open(&root, threads, key_file);
        if twice {
            store
                .put_dir(&key(ns, "w0"), src, BTreeMap::new())
                .expect("put");
        }
        let (out, wall, cpu) = timed(|| {
            store
                .put_dir(&key(ns, "w0"), src, BTreeMap::new())
                .expect("put")
        });
        t.add(out.logical_bytes, wall, cpu);
        drop(store);
        let _ = std::fs::remove_dir_all(&root);
    }
    t
}

fn materialize(
    b: &mut Bench,
    src: &Path,
    threads: usize,
    ns: &str,
    key_file: Option<&Path>,
) -> Tput {
    let root = b.fresh("mat");
    let store = open(&root, threads, key_file);
    let out = store
        .put_dir(&key(ns, "w0"), src, BTreeMap::new())
        .expect("put");
    let r: Reference = out.reference.parse().expect("ref");
    let mut t = Tput::new();
    for _ in 0..RUNS {
        let dest = b.fresh("dest");
        let (rep, wall, cpu) = timed(|| {
            store
                .materialize(&r, &dest, &MaterializeOptions::default())
                .expect("get")
        });
        t.add(rep.bytes, wall, cpu);
        let _ = std::fs::remove_dir_all(&dest);
    }
    let _ = std::fs::remove_dir_all(&root);
    t
}

fn find_criu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join("criu"))
        .find(|p| p.is_file())
}

/// Dumps `n` replicas of `sleep` (without address randomisation) and reports the stored
/// bytes over one checkpoint's bytes.
fn real_criu(b: &mut Bench, criu: &Path, n: usize) -> Option<(f64, u64)> {
    let root = b.fresh("criu-store");
    let store = open(&root, 2, None);
    let mut one = 0;
    for i in 0..n {
        let dir = b.fresh("criu-img");
        std::fs::create_dir_all(&dir).ok()?;
        let mut child = Command::new("setarch")
            .args(["-R", "sleep", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        std::thread::sleep(Duration::from_millis(50));
        let ok = Command::new(criu)
            .args(["dump", "--shell-job", "-t", &child.id().to_string(), "-D"])
            .arg(&dir)
            .args(["-o", "dump.log"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let _ = child.kill();
        let _ = child.wait();
        if !ok {
            eprintln!("criu dump failed; see {}", dir.join("dump.log").display());
            return None;
        }
        let out = store
            .put_dir(&key("criu", &format!("r{i}")), &dir, BTreeMap::new())
            .ok()?;
        one = out.logical_bytes;
    }
    let s = store.stats().ok()?;
    let _ = std::fs::remove_dir_all(&root);
    Some((s.stored_bytes as f64 / one as f64, one))
}

fn main() {
    let started = Instant::now();
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    let base = base.join(format!("ra-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).expect("bench dir");
    let mut b = Bench {
        base: base.clone(),
        n: 0,
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    println!("== runc-architect store benchmark ==");
    println!(
        "workload: per replica pages-1.img of {} MiB ({PAGES} pages; 2-5% unique pages, 5% zero pages, rest shared) + 8 small images",
        PAGES * 4096 / MIB
    );
    println!("sources and stores on {} (CPU path); {cores} cores; medians of {RUNS} runs; 1 GB = 1e9 bytes", base.display());
    println!("per CPU-second = bytes / CPU time of this process (all its threads): the per-core figure, robust to other load");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine load average now: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let src = base.join("replica-0");
    write_replica(&src, 0);
    let key_file = base.join("enc.key");
    std::fs::write(&key_file, [7u8; 32]).expect("key");

    // Raw digest speed: what the store hashes, the way it hashes it.
    let mut mem = vec![0u8; PAGES * 4096];
    fill_random(1, &mut mem);
    let mut sink = 0u8;
    let mut dig = Tput::new();
    for _ in 0..RUNS {
        let (_, wall, cpu) = timed(|| {
            for p in mem.chunks(4096) {
                sink ^= blake3_page(p);
            }
        });
        dig.add(mem.len() as u64, wall, cpu);
    }
    println!(
        "digest  BLAKE3 of 4 KiB pages, 1 thread            {}",
        dig.line()
    );
    let mut big = Tput::new();
    for _ in 0..RUNS {
        let (_, wall, cpu) = timed(|| sink ^= blake3_page(&mem));
        big.add(mem.len() as u64, wall, cpu);
    }
    println!(
        "digest  BLAKE3 of one 64 MiB buffer, 1 thread      {}",
        big.line()
    );
    drop(mem);
    let digest = dig.cpu();

    let i1 = ingest(&mut b, &src, 1, "plain", None, false);
    println!(
        "ingest  new data, 1 thread                         {}",
        i1.line()
    );
    println!(
        "        -> ingest per core {:.2} GB/s = {:.0}% of the digest speed measured above; target >= 1 GB/s per core: {}",
        i1.cpu(),
        100.0 * i1.cpu() / digest,
        if i1.cpu() >= 1.0 { "MET" } else { "NOT MET" }
    );
    let i2 = ingest(&mut b, &src, cores, "plain", None, false);
    println!(
        "ingest  new data, {cores} threads                        {}",
        i2.line()
    );
    let id = ingest(&mut b, &src, 1, "plain", None, true);
    println!(
        "ingest  all-duplicate data (dedup hits), 1 thread  {}",
        id.line()
    );
    let ie = ingest(&mut b, &src, 1, "enc", Some(&key_file), false);
    println!(
        "ingest  new data, encrypted namespace, 1 thread    {}",
        ie.line()
    );

    let m1 = materialize(&mut b, &src, 1, "plain", None);
    println!(
        "get     verify + write, 1 thread                   {}",
        m1.line()
    );
    let m2 = materialize(&mut b, &src, cores, "plain", None);
    println!(
        "get     verify + write, {cores} threads                  {}",
        m2.line()
    );
    let me = materialize(&mut b, &src, cores, "enc", Some(&key_file));
    println!(
        "get     decrypt + verify + write, {cores} threads        {}",
        me.line()
    );

    // Reference: the root file system, fsyncs included (device-bound, one run each).
    let disk = std::env::temp_dir().join(format!("ra-store-bench-disk-{}", std::process::id()));
    {
        let store = open(&disk, 1, None);
        let t = Instant::now();
        let out = store
            .put_dir(&key("plain", "w0"), &src, BTreeMap::new())
            .expect("put");
        let d = t.elapsed();
        println!(
            "ingest  new data, 1 thread, store on {} (fsync)   {:6.2} GB/s   (one run; device-bound)",
            std::env::temp_dir().display(),
            gbps(out.logical_bytes, d)
        );
        let dest = disk.join("out");
        let r: Reference = out.reference.parse().expect("ref");
        let t = Instant::now();
        let rep = store
            .materialize(&r, &dest, &MaterializeOptions { sync: true })
            .expect("get");
        println!(
            "get     {} threads, destination on {} (fsync)    {:6.2} GB/s   (one run; device-bound)",
            1,
            std::env::temp_dir().display(),
            gbps(rep.bytes, t.elapsed())
        );
    }
    let _ = std::fs::remove_dir_all(&disk);

    // Dedup of replicas.
    let root = b.fresh("dedup");
    let store = open(&root, cores, None);
    let mut one = 0u64;
    let mut fractions = Vec::new();
    for r in 0..10u64 {
        let dir = base.join(format!("replica-{r}"));
        if r > 0 {
            fractions.push(write_replica(&dir, r));
        }
        let out = store
            .put_dir(&key("dedup", &format!("app-{r}")), &dir, BTreeMap::new())
            .expect("put replica");
        if r == 0 {
            one = out.logical_bytes;
        }
        if r > 0 {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if r == 4 || r == 9 {
            let s = store.stats().expect("stats");
            let ratio = s.stored_bytes as f64 / one as f64;
            let target = if r == 4 {
                if ratio <= 1.5 {
                    " target <= 1.5x: MET"
                } else {
                    " target <= 1.5x: NOT MET"
                }
            } else {
                ""
            };
            println!(
                "dedup   {:2} replicas: stored {:7.1} MiB / one checkpoint {:5.1} MiB = {ratio:.3}x  (logical {:.1} MiB, {:.1}x saved){target}",
                r + 1,
                s.stored_bytes as f64 / MIB as f64,
                one as f64 / MIB as f64,
                s.logical_bytes as f64 / MIB as f64,
                s.logical_bytes as f64 / s.stored_bytes as f64
            );
        }
    }
    println!(
        "        (unique pages per replica: {})",
        fractions
            .iter()
            .map(|f| format!("{:.1}%", f * 100.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = dir_size(&root);
    drop(store);

    match find_criu() {
        Some(criu) => match (real_criu(&mut b, &criu, 5), real_criu(&mut b, &criu, 10)) {
            (Some((r5, one)), Some((r10, _))) => println!(
                "dedup   real CRIU images of `sleep` (no ASLR), {:.0} KiB each: 5 replicas {r5:.3}x, 10 replicas {r10:.3}x of one checkpoint",
                one as f64 / 1024.0
            ),
            _ => println!("dedup   real CRIU images: dump failed, skipped"),
        },
        None => println!("dedup   real CRIU images: criu not installed, skipped"),
    }

    let _ = std::fs::remove_dir_all(&base);
    println!(
        "(checksum {sink}; total bench time {:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// BLAKE3 of a page, as the store computes chunk addresses (single-threaded).
fn blake3_page(p: &[u8]) -> u8 {
    runc_architect_store::Digest::of(p).0[0]
}
