//! Resources and stats as the kubelet uses them: limits at create, UpdateContainerResources
//! (in-place resize, `kubectl set resources` on a running pod) seen in the container's
//! cgroup, and the stats metrics-server and the eviction manager read.

use std::time::Duration;

use anyhow::{anyhow, Result};
use runc_architect_tests::cri::api::{self, ContainerState};
use runc_architect_tests::cri::kubelet::Resources;
use runc_architect_tests::diff::Observation;
use serde_json::json;

use crate::run::Run;
use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "resources_and_update",
            as_runc: true,
            run: resources_and_update,
        },
        Scenario {
            name: "stats_plausible",
            as_runc: false,
            run: stats_plausible,
        },
    ]
}

/// The container's cgroup files as the container sees them (cgroup v1 controllers on
/// this host, the unified hierarchy where there is one).
const CGROUP_FILES: &str =
    "for f in memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us \
     cpu/cpu.shares memory.max cpu.max cpu.weight; do \
     [ -r /sys/fs/cgroup/$f ] && echo \"$f=$(cat /sys/fs/cgroup/$f)\"; done; true";

/// Limits from the pod spec, then UpdateContainerResources: both in the container's cgroup,
/// and reported back by ContainerStatus.
fn resources_and_update(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let mut spec = r.sh("app", "sleep 1000");
    spec.resources = Resources {
        cpu_request_milli: Some(250),
        cpu_limit_milli: Some(500),
        memory_request: Some(64 << 20),
        memory_limit: Some(128 << 20),
    };
    let id = r.start(pod, spec)?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    let mut o = Observation::new();
    o.put("at_create", r.exec_ok(&id, &["sh", "-c", CGROUP_FILES])?);
    r.kubelet
        .update_resources(
            &id,
            api::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 150_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 256 << 20,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow!("UpdateContainerResources: {e}"))?;
    o.put("after_update", r.exec_ok(&id, &["sh", "-c", CGROUP_FILES])?);
    let s = r.status(&id)?;
    o.put(
        "status_resources",
        s.resources.and_then(|x| x.linux).map(|l| {
            json!({"cpu_quota": l.cpu_quota, "cpu_period": l.cpu_period, "cpu_shares": l.cpu_shares, "memory": l.memory_limit_in_bytes})
        }),
    );
    // The process keeps running through it.
    o.put("still_running", r.status_brief(&id)?);
    Ok(o)
}

/// ContainerStats, ListContainerStats and PodSandboxStats answer for a busy container with
/// plausible numbers (metrics-server drops pods whose stats read zero).
fn stats_plausible(r: &mut Run) -> Result<Observation> {
    let (pod, id) = r.pod_with("while true; do :; done")?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    std::thread::sleep(Duration::from_millis(1500));
    let s = r
        .kubelet
        .stats(&id)
        .map_err(|e| anyhow!("ContainerStats: {e}"))?;
    let value = |v: &Option<api::UInt64Value>| v.as_ref().map(|x| x.value).unwrap_or(0);
    let mut o = Observation::new();
    let cpu = s.cpu.unwrap_or_default();
    let mem = s.memory.unwrap_or_default();
    o.put(
        "container",
        json!({
            "name": s.attributes.as_ref().and_then(|a| a.metadata.as_ref()).map(|m| m.name.clone()),
            "cpu_ns_over_0.5s": value(&cpu.usage_core_nano_seconds) > 500_000_000,
            "cpu_timestamp": cpu.timestamp > 0,
            "working_set_over_64KiB": value(&mem.working_set_bytes) > 64 * 1024,
            "memory_timestamp": mem.timestamp > 0,
            "writable_layer": s.writable_layer.as_ref().map(|w| w.used_bytes.is_some()),
        }),
    );
    let listed = r
        .kubelet
        .list_stats(None)
        .map_err(|e| anyhow!("ListContainerStats: {e}"))?;
    o.put(
        "listed",
        listed
            .iter()
            .any(|x| x.attributes.as_ref().is_some_and(|a| a.id == id)),
    );
    let p = r
        .kubelet
        .pod_stats(r.pod_of(pod))
        .map_err(|e| anyhow!("PodSandboxStats: {e}"));
    o.put(
        "pod_stats",
        match p {
            Ok(ps) => {
                let l = ps.stats.and_then(|s| s.linux);
                json!({
                    "containers": l.as_ref().map(|l| l.containers.len()),
                    "cpu": l.as_ref().and_then(|l| l.cpu.as_ref()).map(|c| value(&c.usage_core_nano_seconds) > 0),
                })
            }
            Err(e) => json!({"error": e.to_string().contains("nimplemented")}),
        },
    );
    Ok(o)
}
