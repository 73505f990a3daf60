//! Container metrics in containerd's format: `io.containerd.cgroups.v1.Metrics` on
//! legacy and hybrid hosts (the stock shim also reports v1 there), and
//! `io.containerd.cgroups.v2.Metrics` on unified hosts.

use std::path::Path;

use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};

use super::{read_keyed, read_u64, CgroupPaths};
use crate::error::{Error, Result};

/// Type URL of v1 metrics, as containerd's typeurl registry names them.
pub const V1_METRICS: &str = "io.containerd.cgroups.v1.Metrics";
/// Type URL of v2 metrics.
pub const V2_METRICS: &str = "io.containerd.cgroups.v2.Metrics";

/// Collects the container's metrics, wrapped in an `Any` ready for a StatsResponse.
pub fn collect(paths: &CgroupPaths) -> Result<Any> {
    let (type_url, value) = if paths.uses_v1() {
        (V1_METRICS, v1_metrics(paths).write_to_bytes())
    } else {
        let dir = paths
            .unified
            .as_deref()
            .ok_or_else(|| Error::NotFound("container has no cgroup v2 directory".into()))?;
        (V2_METRICS, v2_metrics(dir).write_to_bytes())
    };
    let value = value.map_err(|e| Error::Other(format!("encode metrics: {e}")))?;
    let mut any = Any::new();
    any.type_url = type_url.to_string();
    any.value = value;
    Ok(any)
}

fn v1_metrics(paths: &CgroupPaths) -> v1::Metrics {
    let mut m = v1::Metrics::new();
    if let Some(dir) = paths.v1("pids") {
        let mut p = v1::PidsStat::new();
        p.current = read_u64(&dir.join("pids.current")).unwrap_or(0);
        // "max" means no limit, which containerd reports as 0.
        p.limit = read_u64(&dir.join("pids.max"))
            .filter(|v| *v != u64::MAX)
            .unwrap_or(0);
        m.pids = MessageField::some(p);
    }
    if let Some(dir) = paths.v1("cpuacct") {
        let mut usage = v1::CPUUsage::new();
        usage.total = read_u64(&dir.join("cpuacct.usage")).unwrap_or(0);
        usage.per_cpu = std::fs::read_to_string(dir.join("cpuacct.usage_percpu"))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let st = read_keyed(&dir.join("cpuacct.stat"));
        // cpuacct.stat counts USER_HZ ticks; containerd reports nanoseconds.
        let tick_ns = 1_000_000_000 / clock_ticks();
        usage.user = st.get("user").copied().unwrap_or(0) * tick_ns;
        usage.kernel = st.get("system").copied().unwrap_or(0) * tick_ns;
        let mut cpu = v1::CPUStat::new();
        cpu.usage = MessageField::some(usage);
        if let Some(cdir) = paths.v1("cpu") {
            let t = read_keyed(&cdir.join("cpu.stat"));
            let mut th = v1::Throttle::new();
            th.periods = t.get("nr_periods").copied().unwrap_or(0);
            th.throttled_periods = t.get("nr_throttled").copied().unwrap_or(0);
            th.throttled_time = t.get("throttled_time").copied().unwrap_or(0);
            cpu.throttling = MessageField::some(th);
        }
        m.cpu = MessageField::some(cpu);
    }
    if let Some(dir) = paths.v1("memory") {
        m.memory = MessageField::some(v1_memory(dir));
        let oc = read_keyed(&dir.join("memory.oom_control"));
        let mut o = v1::MemoryOomControl::new();
        o.oom_kill_disable = oc.get("oom_kill_disable").copied().unwrap_or(0);
        o.under_oom = oc.get("under_oom").copied().unwrap_or(0);
        o.oom_kill = oc.get("oom_kill").copied().unwrap_or(0);
        m.memory_oom_control = MessageField::some(o);
    }
    if let Some(dir) = paths.v1("blkio") {
        m.blkio = MessageField::some(v1_blkio(dir));
    }
    m
}

/// blkio statistics; like containerd, the CFQ files first and the throttle files when
/// those are empty (they are on most current kernels).
fn v1_blkio(dir: &Path) -> v1::BlkIOStat {
    let read = |name: &str| -> Vec<v1::BlkIOEntry> {
        let primary = blkio_entries(&dir.join(format!("blkio.{name}")));
        if primary.is_empty()
            && matches!(name, "io_service_bytes_recursive" | "io_serviced_recursive")
        {
            return blkio_entries(&dir.join(format!(
                "blkio.throttle.{}",
                name.trim_end_matches("_recursive")
            )));
        }
        primary
    };
    let mut b = v1::BlkIOStat::new();
    b.io_service_bytes_recursive = read("io_service_bytes_recursive");
    b.io_serviced_recursive = read("io_serviced_recursive");
    b.io_queued_recursive = read("io_queued_recursive");
    b.io_service_time_recursive = read("io_service_time_recursive");
    b.io_wait_time_recursive = read("io_wait_time_recursive");
    b.io_merged_recursive = read("io_merged_recursive");
    b.io_time_recursive = read("time_recursive");
    b.sectors_recursive = read("sectors_recursive");
    b
}

/// Parses `MAJ:MIN [Op] value` lines; `Total` lines are skipped.
fn blkio_entries(path: &Path) -> Vec<v1::BlkIOEntry> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dev, op, value) = match f.as_slice() {
                [dev, op, value] => (*dev, *op, *value),
                [dev, value] => (*dev, "", *value),
                _ => return None,
            };
            let (major, minor) = dev.split_once(':')?;
            let mut e = v1::BlkIOEntry::new();
            e.major = major.parse().ok()?;
            e.minor = minor.parse().ok()?;
            e.op = op.to_string();
            e.value = value.parse().ok()?;
            Some(e)
        })
        .collect()
}

fn v1_memory(dir: &Path) -> v1::MemoryStat {
    let s = read_keyed(&dir.join("memory.stat"));
    let g = |k: &str| s.get(k).copied().unwrap_or(0);
    let mut mem = v1::MemoryStat::new();
    mem.cache = g("cache");
    mem.rss = g("rss");
    mem.rss_huge = g("rss_huge");
    mem.mapped_file = g("mapped_file");
    mem.dirty = g("dirty");
    mem.writeback = g("writeback");
    mem.pg_pg_in = g("pgpgin");
    mem.pg_pg_out = g("pgpgout");
    mem.pg_fault = g("pgfault");
    mem.pg_maj_fault = g("pgmajfault");
    mem.inactive_anon = g("inactive_anon");
    mem.active_anon = g("active_anon");
    mem.inactive_file = g("inactive_file");
    mem.active_file = g("active_file");
    mem.unevictable = g("unevictable");
    mem.hierarchical_memory_limit = g("hierarchical_memory_limit");
    mem.hierarchical_swap_limit = g("hierarchical_memsw_limit");
    mem.total_cache = g("total_cache");
    mem.total_rss = g("total_rss");
    mem.total_rss_huge = g("total_rss_huge");
    mem.total_mapped_file = g("total_mapped_file");
    mem.total_dirty = g("total_dirty");
    mem.total_writeback = g("total_writeback");
    mem.total_pg_pg_in = g("total_pgpgin");
    mem.total_pg_pg_out = g("total_pgpgout");
    mem.total_pg_fault = g("total_pgfault");
    mem.total_pg_maj_fault = g("total_pgmajfault");
    mem.total_inactive_anon = g("total_inactive_anon");
    mem.total_active_anon = g("total_active_anon");
    mem.total_inactive_file = g("total_inactive_file");
    mem.total_active_file = g("total_active_file");
    mem.total_unevictable = g("total_unevictable");
    mem.usage = MessageField::some(v1_entry(dir, "memory"));
    mem.swap = MessageField::some(v1_entry(dir, "memory.memsw"));
    mem.kernel = MessageField::some(v1_entry(dir, "memory.kmem"));
    mem.kernel_tcp = MessageField::some(v1_entry(dir, "memory.kmem.tcp"));
    mem
}

fn v1_entry(dir: &Path, prefix: &str) -> v1::MemoryEntry {
    let f = |name: &str| read_u64(&dir.join(format!("{prefix}.{name}"))).unwrap_or(0);
    let mut e = v1::MemoryEntry::new();
    e.usage = f("usage_in_bytes");
    e.limit = f("limit_in_bytes");
    e.max = f("max_usage_in_bytes");
    e.failcnt = f("failcnt");
    e
}

fn v2_metrics(dir: &Path) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    let mut p = v2::PidsStat::new();
    p.current = read_u64(&dir.join("pids.current")).unwrap_or(0);
    p.limit = read_u64(&dir.join("pids.max"))
        .filter(|v| *v != u64::MAX)
        .unwrap_or(0);
    m.pids = MessageField::some(p);

    let c = read_keyed(&dir.join("cpu.stat"));
    let g = |k: &str| c.get(k).copied().unwrap_or(0);
    let mut cpu = v2::CPUStat::new();
    cpu.usage_usec = g("usage_usec");
    cpu.user_usec = g("user_usec");
    cpu.system_usec = g("system_usec");
    cpu.nr_periods = g("nr_periods");
    cpu.nr_throttled = g("nr_throttled");
    cpu.throttled_usec = g("throttled_usec");
    cpu.nr_bursts = g("nr_bursts");
    cpu.burst_usec = g("burst_usec");
    m.cpu = MessageField::some(cpu);

    let s = read_keyed(&dir.join("memory.stat"));
    let g = |k: &str| s.get(k).copied().unwrap_or(0);
    let mut mem = v2::MemoryStat::new();
    mem.anon = g("anon");
    mem.file = g("file");
    mem.kernel_stack = g("kernel_stack");
    mem.slab = g("slab");
    mem.sock = g("sock");
    mem.shmem = g("shmem");
    mem.file_mapped = g("file_mapped");
    mem.file_dirty = g("file_dirty");
    mem.file_writeback = g("file_writeback");
    mem.anon_thp = g("anon_thp");
    mem.inactive_anon = g("inactive_anon");
    mem.active_anon = g("active_anon");
    mem.inactive_file = g("inactive_file");
    mem.active_file = g("active_file");
    mem.unevictable = g("unevictable");
    mem.slab_reclaimable = g("slab_reclaimable");
    mem.slab_unreclaimable = g("slab_unreclaimable");
    mem.pgfault = g("pgfault");
    mem.pgmajfault = g("pgmajfault");
    mem.workingset_refault = g("workingset_refault");
    mem.workingset_activate = g("workingset_activate");
    mem.workingset_nodereclaim = g("workingset_nodereclaim");
    mem.pgrefill = g("pgrefill");
    mem.pgscan = g("pgscan");
    mem.pgsteal = g("pgsteal");
    mem.pgactivate = g("pgactivate");
    mem.pgdeactivate = g("pgdeactivate");
    mem.pglazyfree = g("pglazyfree");
    mem.pglazyfreed = g("pglazyfreed");
    mem.thp_fault_alloc = g("thp_fault_alloc");
    mem.thp_collapse_alloc = g("thp_collapse_alloc");
    mem.usage = read_u64(&dir.join("memory.current")).unwrap_or(0);
    mem.usage_limit = read_u64(&dir.join("memory.max")).unwrap_or(0);
    mem.max_usage = read_u64(&dir.join("memory.peak")).unwrap_or(0);
    mem.swap_usage = read_u64(&dir.join("memory.swap.current")).unwrap_or(0);
    mem.swap_limit = read_u64(&dir.join("memory.swap.max")).unwrap_or(0);
    m.memory = MessageField::some(mem);

    let e = read_keyed(&dir.join("memory.events"));
    let g = |k: &str| e.get(k).copied().unwrap_or(0);
    let mut ev = v2::MemoryEvents::new();
    ev.low = g("low");
    ev.high = g("high");
    ev.max = g("max");
    ev.oom = g("oom");
    ev.oom_kill = g("oom_kill");
    ev.oom_group_kill = g("oom_group_kill");
    m.memory_events = MessageField::some(ev);
    m
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}
