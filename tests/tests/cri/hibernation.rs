//! Hibernation under the kubelet: a pod whose annotations turn hibernation on.
//!
//! Under the stock handler the annotations mean nothing and the pod simply runs; under
//! runc-architect its app container is frozen, scaled down and woken by the node's requests
//! and by ExecSync. What the kubelet sees must be the same in both runs (the observation:
//! states, answers with the server's in-memory count continued, exec output, stats that are
//! not zero, the pod IP, probe answers, a graceful stop within the grace period). What only
//! runc-architect does is asserted on its run alone, from the shims' own records
//! (`runc-architect status --json` on the node's state root): the tiers are reached, the
//! pause container never sleeps, probes do not wake, each wake is counted, and the pod's
//! deletion leaves no images or checkpoints in the node's `/var/lib/runc-architect` (the
//! node's leftovers check covers that too).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use runc_architect_tests::cri::api::{self, ContainerState};
use runc_architect_tests::cri::ContainerSpec;
use runc_architect_tests::diff::Observation;
use serde_json::{json, Value};

use crate::run::{secs, Run, GRACE};
use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "hibernating_pod",
        // Hibernation needs runc-architect's own runtime type (the options of
        // `io.containerd.runc.v2` carry no hibernation settings).
        as_runc: false,
        run: hibernating_pod,
    }]
}

const PORT: u16 = 7070;
/// How long a tier may take to be reached (idle time, the dump, a loaded machine).
const TIER_WAIT: Duration = Duration::from_secs(40);

/// The pod's annotations: hibernation on, short tiers.
fn annotations() -> [(&'static str, &'static str); 3] {
    [
        ("runc-architect.io/hibernate", "true"),
        ("runc-architect.io/freeze-after", "300ms"),
        ("runc-architect.io/scaledown-after", "1500ms"),
    ]
}

/// One line to `ckload hib` from the node; its answer (`n TOTAL LINE`).
fn ask(r: &Run, addr: SocketAddr, line: &str) -> Result<String> {
    let mut s = r
        .node
        .connect_tcp(addr)
        .with_context(|| format!("connect to {addr} from the node"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    ensure!(!answer.is_empty(), "no answer from {addr} to {line:?}");
    Ok(answer.trim().to_string())
}

/// A kubelet HTTP probe from the node (`GET /` with kube-probe's User-Agent): the status line.
fn http_probe(r: &Run, addr: SocketAddr) -> Result<String> {
    let mut s = r.node.connect_tcp(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.31\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out.lines().next().unwrap_or("").to_string())
}

/// A kubelet TCP probe from the node: connect, close without sending.
fn tcp_probe(r: &Run, addr: SocketAddr) -> Result<bool> {
    Ok(r.node.connect_tcp(addr).is_ok())
}

/// The shim's record of `id`, if it has one.
fn record(r: &Run, id: &str) -> Result<Option<Value>> {
    Ok(r.node
        .hibernation_status()?
        .into_iter()
        .find(|o| o["id"] == id))
}

/// Waits until the shim reports `state` for `id` (runc-architect's run only).
fn wait_tier(r: &Run, id: &str, state: &str) -> Result<Value> {
    let deadline = Instant::now() + TIER_WAIT;
    loop {
        let rec = record(r, id)?;
        if let Some(rec) = rec.as_ref().filter(|rec| rec["state"] == state) {
            return Ok(rec.clone());
        }
        if Instant::now() > deadline {
            bail!("{id} never reached {state} within {TIER_WAIT:?} (record: {rec:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wakes(rec: &Value) -> u64 {
    rec["wakes"].as_u64().unwrap_or(0)
}

/// Waits (briefly: the shim records a wake as it happens) until the shim counts `expected`
/// wakes of `id`; `what` woke it.
fn wait_wakes(r: &Run, id: &str, expected: u64, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rec = record(r, id)?.with_context(|| format!("no record after {what}"))?;
        let n = wakes(&rec);
        ensure!(
            n <= expected,
            "{what}: {n} wakes counted, {expected} expected: {rec}"
        );
        if n == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} was served, but the shim counts {n} wakes, not {expected}: {rec}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the kubelet sees of the sleeping (architect) or running (stock) container.
fn seen_while(r: &Run, pod_ip: &str, id: &str, sandbox: &str) -> Result<Value> {
    let st = r.status(id)?;
    let stats = r
        .kubelet
        .stats(id)
        .map_err(|e| anyhow!("ContainerStats: {e}"))?;
    let listed = r
        .kubelet
        .list_stats(Some(api::ContainerStatsFilter {
            id: id.to_string(),
            ..Default::default()
        }))
        .map_err(|e| anyhow!("ListContainerStats: {e}"))?;
    let nonzero = |s: &api::ContainerStats| {
        s.cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .is_some_and(|v| v.value > 0)
            && s.memory
                .as_ref()
                .and_then(|m| m.working_set_bytes.as_ref())
                .is_some_and(|v| v.value > 0)
    };
    let pod_status = r
        .kubelet
        .cri()
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.to_string(),
            verbose: false,
        })
        .map_err(|e| anyhow!("PodSandboxStatus: {e}"))?;
    let ip = pod_status
        .status
        .as_ref()
        .and_then(|s| s.network.as_ref())
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    Ok(json!({
        "state": crate::run::state_name(st.state),
        "exit_code": st.exit_code,
        "container_stats_nonzero": nonzero(&stats),
        "listed_stats": listed.len(),
        "listed_stats_nonzero": listed.iter().all(nonzero),
        "pod_ip_kept": ip == pod_ip,
    }))
}

fn hibernating_pod(r: &mut Run) -> Result<Observation> {
    let image = r
        .node
        .images()
        .and_then(|i| i.ckpt_pushed.clone())
        .context("the checkpoint image in the node's registry")?
        .reference;
    let pod = r.pod(|p| {
        for (k, v) in annotations() {
            p.annotations.insert(k.into(), v.into());
        }
    })?;
    let spec = ContainerSpec::new("server", &image).command(&[
        "/bin/ckload",
        "hib",
        &PORT.to_string(),
        "/tmp/flushed",
    ]);
    let id = r.start(pod, spec)?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    let (sandbox, pod_ip) = {
        let p = r.pod_of(pod);
        (p.sandbox_id.clone(), p.ip.clone())
    };
    let addr: SocketAddr = format!("{pod_ip}:{PORT}")
        .parse()
        .with_context(|| format!("pod IP {pod_ip:?}"))?;
    let architect = r.is_architect();
    let mut o = Observation::new();

    // Serving (the server listens a moment after the start).
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        match ask(r, addr, "first") {
            Ok(a) => break a,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("the server never answered"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    o.put("first_answer", first);

    // FROZEN: the kubelet still sees a running container with real stats and its pod IP;
    // probes from the node are answered.
    if architect {
        wait_tier(r, &id, "FROZEN")?;
        ensure!(
            record(r, &sandbox)?.is_none(),
            "the pause container has a hibernation record"
        );
    }
    o.put("while_frozen", seen_while(r, &pod_ip, &id, &sandbox)?);
    o.put("http_probe_frozen", http_probe(r, addr)?);
    o.put("tcp_probe_frozen", tcp_probe(r, addr)?);

    // SCALED_DOWN: the same, and probes do not wake it.
    let mut wake_count = 0;
    if architect {
        let rec = wait_tier(r, &id, "SCALED_DOWN")?;
        wake_count = wakes(&rec);
    }
    o.put("while_scaled_down", seen_while(r, &pod_ip, &id, &sandbox)?);
    o.put("http_probe_scaled_down", http_probe(r, addr)?);
    o.put("tcp_probe_scaled_down", tcp_probe(r, addr)?);
    if architect {
        let rec = record(r, &id)?.context("no record after the probes")?;
        ensure!(
            rec["state"] == "SCALED_DOWN" && wakes(&rec) == wake_count,
            "a kubelet probe woke the container: {rec}"
        );
    }

    // A request from the node wakes it; the same process answers, its count continued.
    o.put("answer_after_sleep", ask(r, addr, "second")?);
    if architect {
        wake_count += 1;
        wait_wakes(r, &id, wake_count, "the request")?;
        wait_tier(r, &id, "SCALED_DOWN")?;
    }

    // ExecSync (a liveness exec probe, kubectl exec) wakes it and runs in it.
    o.put(
        "exec_after_sleep",
        r.exec_ok(&id, &["sh", "-c", "echo exec-in-$(cat /proc/1/comm)"])?,
    );
    if architect {
        wake_count += 1;
        wait_wakes(r, &id, wake_count, "ExecSync")?;
        wait_tier(r, &id, "SCALED_DOWN")?;
    }
    o.put("answer_after_exec_wake", ask(r, addr, "third")?);
    if architect {
        wait_tier(r, &id, "SCALED_DOWN")?;
    }

    // The kubelet's deletion of a sleeping pod: SIGTERM (a wake, then the server's graceful
    // exit), within the grace period; the run's cleanliness check follows.
    let t = Instant::now();
    r.kubelet
        .stop_container(&id, GRACE)
        .map_err(|e| anyhow!("StopContainer: {e}"))?;
    let stopped = r.status(&id)?;
    o.put(
        "stop",
        json!({
            "state": crate::run::state_name(stopped.state),
            "exit_code": stopped.exit_code,
            "reason": stopped.reason,
            "within_grace": secs(t.elapsed()) < GRACE as u64,
        }),
    );
    let took = r.delete_pod(pod)?;
    o.put("pod_removed_within_grace", secs(took) <= GRACE as u64);
    if architect {
        ensure!(
            record(r, &id)?.is_none(),
            "the deleted container still has a hibernation record"
        );
        let entries = r.node.store_entries()?;
        ensure!(
            !entries.contains(&id),
            "the store keeps a checkpoint of the deleted container: {entries}"
        );
    }
    Ok(o)
}
