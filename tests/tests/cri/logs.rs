//! Container logs as `kubectl logs` shows them: CRI's log files (written by containerd from
//! the shim's stdio), partial lines, the split of long lines, and log rotation.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use runc_architect_tests::cri::api::ContainerState;
use runc_architect_tests::cri::logs::{kubectl_view, LogStream};
use runc_architect_tests::diff::Observation;
use serde_json::json;

use crate::lifecycle::wait_log;
use crate::run::Run;
use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "log_format",
            as_runc: true,
            run: log_format,
        },
        Scenario {
            name: "log_terminal",
            as_runc: false,
            run: log_terminal,
        },
        Scenario {
            name: "log_reopen",
            as_runc: false,
            run: log_reopen,
        },
    ]
}

/// Both streams, a line without newline at exit, a 20000-byte line (CRI splits at 16 KiB),
/// and empty lines: each stream as `kubectl logs` shows it, and the file's structure.
fn log_format(r: &mut Run) -> Result<Observation> {
    let (pod, id) = r.pod_with(
        "echo out-1; echo err-1 >&2; echo; printf '%20000s\\n' '' | tr ' ' x; \
         echo out-2; echo err-2 >&2; printf 'no-newline'",
    )?;
    r.wait_exited(&id)?;
    let entries = r
        .kubelet
        .container_log(r.pod_of(pod), "app", 0)
        .map_err(|e| anyhow!("read the log: {e}"))?;
    let mut o = Observation::new();
    for (name, stream) in [("stdout", LogStream::Stdout), ("stderr", LogStream::Stderr)] {
        let view = kubectl_view(&entries, Some(stream));
        let shape: Vec<_> = entries
            .iter()
            .filter(|e| e.stream == stream)
            .map(|e| json!({"partial": e.partial, "bytes": e.content.len()}))
            .collect();
        o.put(name, String::from_utf8_lossy(&view).into_owned());
        o.put(&format!("{name}_entries"), shape);
    }
    o.put(
        "timestamps_parse",
        entries.iter().all(|e| {
            e.timestamp.contains('T') && e.timestamp.ends_with('Z') || e.timestamp.contains('+')
        }),
    );
    Ok(o)
}

/// A container with a terminal: one stream (stdout), carriage returns as the pty writes
/// them.
fn log_terminal(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let mut spec = r.sh("tty", "echo on-a-terminal; echo to-stderr >&2; exit 0");
    spec.tty = true;
    let id = r.start(pod, spec)?;
    r.wait_exited(&id)?;
    let entries = r
        .kubelet
        .container_log(r.pod_of(pod), "tty", 0)
        .map_err(|e| anyhow!("read the log: {e}"))?;
    let mut o = Observation::new();
    o.put(
        "stdout",
        String::from_utf8_lossy(&kubectl_view(&entries, Some(LogStream::Stdout))).into_owned(),
    );
    o.put(
        "stderr_entries",
        entries
            .iter()
            .filter(|e| e.stream == LogStream::Stderr)
            .count(),
    );
    Ok(o)
}

/// Log rotation as the kubelet does it: rename the file, ReopenContainerLog, the container
/// goes on writing into a new file, nothing is lost across the switch.
fn log_reopen(r: &mut Run) -> Result<Observation> {
    let (pod, id) = r.pod_with("i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.05; done")?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    wait_log(r, pod, "app", "line-5\n")?;
    let path = r.pod_of(pod).container_log_path("app", 0);
    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated)?;
    r.kubelet
        .reopen_log(&id)
        .map_err(|e| anyhow!("ReopenContainerLog: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(path.exists() && std::fs::read_to_string(&path)?.lines().count() >= 5) {
        if Instant::now() > deadline {
            bail!("no new log file with lines after ReopenContainerLog");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    r.kubelet
        .stop_container(&id, 2)
        .map_err(|e| anyhow!("StopContainer: {e}"))?;
    let numbers = |p: &std::path::Path| -> Result<Vec<u64>> {
        let entries = runc_architect_tests::cri::logs::read_file(p).map_err(|e| anyhow!("{e}"))?;
        Ok(entries
            .iter()
            .filter_map(|e| {
                String::from_utf8_lossy(&e.content)
                    .strip_prefix("line-")
                    .and_then(|n| n.trim().parse().ok())
            })
            .collect())
    };
    let (old, new) = (numbers(&rotated)?, numbers(&path)?);
    let mut all = old.clone();
    all.extend(&new);
    let contiguous = all.windows(2).all(|w| w[1] == w[0] + 1) && all.first() == Some(&0);
    let mut o = Observation::new();
    o.put("old_file_has_lines", !old.is_empty());
    o.put("new_file_has_lines", !new.is_empty());
    o.put("nothing_lost_or_doubled", contiguous);
    let _ = std::fs::remove_file(&rotated);
    Ok(o)
}
