//! Container and pod lifecycle as the kubelet sees it: exits and their reasons, stops with a
//! grace period, failed creates, restarts, listings, pod deletion.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use runc_architect_tests::cri::api::{self, ContainerState};
use runc_architect_tests::cri::kubelet::Resources;
use runc_architect_tests::cri::ContainerSpec;
use runc_architect_tests::diff::Observation;
use runc_architect_tests::node::ARCHITECT_HANDLER;
use serde_json::json;

use crate::run::{secs, state_name, Run};
use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "exit_completed",
            as_runc: true,
            run: exit_completed,
        },
        Scenario {
            name: "exit_error",
            as_runc: false,
            run: exit_error,
        },
        Scenario {
            name: "exit_by_signal",
            as_runc: false,
            run: exit_by_signal,
        },
        Scenario {
            name: "oom_killed",
            as_runc: true,
            run: oom_killed,
        },
        Scenario {
            name: "stop_sigterm_honoured",
            as_runc: true,
            run: stop_sigterm_honoured,
        },
        Scenario {
            name: "stop_sigkill_after_grace",
            as_runc: true,
            run: stop_sigkill_after_grace,
        },
        Scenario {
            name: "pod_deletion",
            as_runc: true,
            run: pod_deletion,
        },
        Scenario {
            name: "failed_create_missing_binary",
            as_runc: false,
            run: failed_create_missing_binary,
        },
        Scenario {
            name: "failed_create_not_in_path",
            as_runc: false,
            run: failed_create_not_in_path,
        },
        Scenario {
            name: "restart_attempt",
            as_runc: false,
            run: restart_attempt,
        },
        Scenario {
            name: "listings_and_filters",
            as_runc: false,
            run: listings_and_filters,
        },
        Scenario {
            name: "process_identity",
            as_runc: false,
            run: process_identity,
        },
        Scenario {
            name: "security_context",
            as_runc: false,
            run: security_context,
        },
        Scenario {
            name: "one_shim_per_pod",
            as_runc: true,
            run: one_shim_per_pod,
        },
        Scenario {
            name: "shared_pid_namespace",
            as_runc: false,
            run: shared_pid_namespace,
        },
    ]
}

/// `exit 0`: EXITED, 0, Completed; the full status as the kubelet stores it.
fn exit_completed(r: &mut Run) -> Result<Observation> {
    let (_, id) = r.pod_with("echo done; exit 0")?;
    let s = r.wait_exited(&id)?;
    let mut o = Observation::new();
    o.put("status", r.status_value(&s));
    Ok(o)
}

/// `exit 7`: EXITED, 7, Error.
fn exit_error(r: &mut Run) -> Result<Observation> {
    let (_, id) = r.pod_with("exit 7")?;
    let s = r.wait_exited(&id)?;
    let mut o = Observation::new();
    o.put("status", r.status_value(&s));
    Ok(o)
}

/// A process killed by SIGSEGV (as a crashing program is): 139, Error.
fn exit_by_signal(r: &mut Run) -> Result<Observation> {
    // PID 1 of a pid namespace ignores signals it has no handler for: the crash is a
    // child's, and the shell passes its status on.
    let (_, id) = r.pod_with("sleep 0.2; sh -c 'kill -SEGV $$'; exit $?")?;
    r.wait_exited(&id)?;
    let mut o = Observation::new();
    o.put("status", r.status_brief(&id)?);
    Ok(o)
}

/// A container over its memory limit: OOMKilled, 137 (the reason comes from the shim's OOM
/// event).
fn oom_killed(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let mut spec = r.sh("hog", "tail /dev/zero");
    spec.resources = Resources {
        memory_limit: Some(32 << 20),
        memory_request: Some(32 << 20),
        ..Default::default()
    };
    let id = r.start(pod, spec)?;
    let s = r.wait_exited(&id)?;
    let mut o = Observation::new();
    o.put(
        "status",
        json!({"state": state_name(s.state), "exit_code": s.exit_code, "reason": s.reason}),
    );
    Ok(o)
}

/// StopContainer with a grace period on a process that exits on SIGTERM: it exits at once,
/// cleanly, and its handler ran.
fn stop_sigterm_honoured(r: &mut Run) -> Result<Observation> {
    let (pod, id) = r.pod_with(
        "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
    )?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    wait_log(r, pod, "app", "ready")?;
    let t = Instant::now();
    r.kubelet
        .stop_container(&id, 10)
        .map_err(|e| anyhow!("StopContainer: {e}"))?;
    let took = t.elapsed();
    let mut o = Observation::new();
    o.put("stopped_within_2s", took < Duration::from_secs(2));
    o.put("status", r.status_brief(&id)?);
    o.put("handler_ran", log_text(r, pod, "app")?.contains("got-term"));
    Ok(o)
}

/// StopContainer with a 2 s grace period on a process that ignores SIGTERM: SIGKILL after
/// the period, 137.
fn stop_sigkill_after_grace(r: &mut Run) -> Result<Observation> {
    let (pod, id) = r.pod_with("trap '' TERM; echo ready; while true; do sleep 0.1; done")?;
    wait_log(r, pod, "app", "ready")?;
    let t = Instant::now();
    r.kubelet
        .stop_container(&id, 2)
        .map_err(|e| anyhow!("StopContainer: {e}"))?;
    let took = t.elapsed();
    let mut o = Observation::new();
    o.put("stop_seconds", secs(took));
    o.put("status", r.status_brief(&id)?);
    Ok(o)
}

/// The kubelet's pod deletion of a pod with two running containers, one of which ignores
/// SIGTERM: within the grace period, and afterwards no sandbox, container or task.
fn pod_deletion(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let a = r.sh(
        "polite",
        "trap 'exit 0' TERM; while true; do sleep 0.1; done",
    );
    let b = r.sh("stubborn", "trap '' TERM; while true; do sleep 0.1; done");
    let (ida, idb) = (r.start(pod, a)?, r.start(pod, b)?);
    r.wait_state(&ida, ContainerState::ContainerRunning)?;
    r.wait_state(&idb, ContainerState::ContainerRunning)?;
    let sandbox = r.pod_of(pod).sandbox_id.clone();
    let took = r.delete_pod(pod)?;
    let mut o = Observation::new();
    o.put("deletion_seconds", secs(took));
    let pods = r
        .kubelet
        .list_pods(None)
        .map_err(|e| anyhow!("ListPodSandbox: {e}"))?;
    o.put("sandbox_listed", pods.iter().any(|p| p.id == sandbox));
    let cs = r
        .kubelet
        .list_containers(None)
        .map_err(|e| anyhow!("ListContainers: {e}"))?;
    o.put(
        "containers_listed",
        cs.iter().filter(|c| c.pod_sandbox_id == sandbox).count(),
    );
    let left = r.wait_clean();
    o.put("left_on_the_node", left);
    Ok(o)
}

/// A command that does not exist: StartContainer fails; the container is EXITED with the
/// start error; removal leaves nothing.
fn failed_create_missing_binary(r: &mut Run) -> Result<Observation> {
    failed_start(r, &["/no/such/binary"], "/no/such/binary")
}

/// A command not on PATH.
fn failed_create_not_in_path(r: &mut Run) -> Result<Observation> {
    failed_start(r, &["nosuchcommand"], "nosuchcommand")
}

fn failed_start(r: &mut Run, cmd: &[&str], name: &str) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let spec = ContainerSpec::new("broken", &r.busybox()).command(cmd);
    let image = r
        .kubelet
        .ensure_image(r.pod_of(pod), &spec.image, spec.pull_policy)
        .map_err(|e| anyhow!("image: {e}"))?;
    let id = r.create(pod, &spec, &image, "broken")?;
    let start = r.kubelet.cri().start_container(api::StartContainerRequest {
        container_id: id.clone(),
    });
    let mut o = Observation::new();
    match start {
        Ok(_) => bail!("StartContainer of {cmd:?} succeeded"),
        Err(e) => {
            let msg = e.message().unwrap_or_default().to_string();
            o.put("start_code", format!("{:?}", e.code()));
            o.put("start_error_names_the_command", msg.contains(name));
        }
    }
    let s = r.status(&id)?;
    o.put("state", state_name(s.state));
    o.put("exit_code", s.exit_code);
    o.put("reason", s.reason.clone());
    o.put("message_names_the_command", s.message.contains(name));
    r.kubelet
        .remove_container(&id)
        .map_err(|e| anyhow!("RemoveContainer: {e}"))?;
    let listed = r
        .kubelet
        .list_containers(None)
        .map_err(|e| anyhow!("ListContainers: {e}"))?
        .iter()
        .any(|c| c.id == id);
    o.put("listed_after_removal", listed);
    Ok(o)
}

/// The kubelet restarts an exited container as attempt 1 in the same pod: a new log file,
/// both statuses kept until removal.
fn restart_attempt(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let first = r.sh("app", "echo run-0; exit 3");
    let id0 = r.start(pod, first)?;
    r.wait_exited(&id0)?;
    let mut again = r.sh("app", "echo run-1; exit 0");
    again.restart_count = 1;
    let id1 = r.start(pod, again)?;
    r.wait_exited(&id1)?;
    let mut o = Observation::new();
    o.put("first", r.status_value(&r.status(&id0)?));
    o.put("second", r.status_value(&r.status(&id1)?));
    o.put("log0", log_text_attempt(r, pod, "app", 0)?);
    o.put("log1", log_text_attempt(r, pod, "app", 1)?);
    Ok(o)
}

/// ListContainers and ListPodSandbox with the kubelet's filters (by pod, by state, by
/// label), ListContainerStats by pod.
fn listings_and_filters(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|p| {
        p.labels.insert("app".into(), "listings".into());
        p.labels
            .insert("pod-template-hash".into(), "5d8f7b9c4".into());
    })?;
    let run = r.sh("runner", "sleep 1000");
    let done = r.sh("finisher", "exit 0");
    let (id_run, id_done) = (r.start(pod, run)?, r.start(pod, done)?);
    r.wait_exited(&id_done)?;
    r.wait_state(&id_run, ContainerState::ContainerRunning)?;
    let sandbox = r.pod_of(pod).sandbox_id.clone();
    let names = |cs: Vec<api::Container>| {
        let mut v: Vec<String> = cs
            .into_iter()
            .filter(|c| c.pod_sandbox_id == sandbox)
            .map(|c| {
                format!(
                    "{}:{}",
                    c.metadata.map(|m| m.name).unwrap_or_default(),
                    state_name(c.state)
                )
            })
            .collect();
        v.sort();
        v
    };
    let by_pod = api::ContainerFilter {
        pod_sandbox_id: sandbox.clone(),
        ..Default::default()
    };
    let running = api::ContainerFilter {
        pod_sandbox_id: sandbox.clone(),
        state: Some(api::ContainerStateValue {
            state: ContainerState::ContainerRunning as i32,
        }),
        ..Default::default()
    };
    let mut o = Observation::new();
    let list = |f| {
        r.kubelet
            .list_containers(Some(f))
            .map_err(|e| anyhow!("ListContainers: {e}"))
    };
    o.put("by_pod", names(list(by_pod)?));
    o.put("running", names(list(running)?));
    let mut sel = std::collections::HashMap::new();
    sel.insert("pod-template-hash".to_string(), "5d8f7b9c4".to_string());
    let pods = r
        .kubelet
        .list_pods(Some(api::PodSandboxFilter {
            label_selector: sel,
            ..Default::default()
        }))
        .map_err(|e| anyhow!("ListPodSandbox: {e}"))?;
    let mut ours: Vec<_> = pods
        .iter()
        .filter(|p| p.id == sandbox)
        .map(|p| json!({"state": p.state, "labels": p.labels, "runtime_handler_is_ours": p.runtime_handler == r.handler}))
        .collect();
    o.put("pods_by_label", std::mem::take(&mut ours));
    let stats = r
        .kubelet
        .list_stats(Some(api::ContainerStatsFilter {
            pod_sandbox_id: sandbox.clone(),
            ..Default::default()
        }))
        .map_err(|e| anyhow!("ListContainerStats: {e}"))?;
    let mut stat_names: Vec<String> = stats
        .iter()
        .filter_map(|s| {
            s.attributes
                .as_ref()
                .and_then(|a| a.metadata.as_ref())
                .map(|m| m.name.clone())
        })
        .collect();
    stat_names.sort();
    o.put("stats_of", stat_names);
    let status = r
        .kubelet
        .pod_status(r.pod_of(pod))
        .map_err(|e| anyhow!("PodSandboxStatus: {e}"))?;
    let st = status.status.unwrap_or_default();
    o.put(
        "pod_status",
        json!({
            "state": st.state,
            "labels": st.labels,
            "annotations": r.masked(&st.annotations),
            "runtime_handler_is_ours": st.runtime_handler == r.handler,
            "has_ip": st.network.map(|n| !n.ip.is_empty()).unwrap_or(false),
            "namespaces": st.linux.and_then(|l| l.namespaces).and_then(|n| n.options).map(|o| json!({"network": o.network, "pid": o.pid, "ipc": o.ipc})),
        }),
    );
    Ok(o)
}

/// The process as the pod spec says: user and groups, working directory, environment,
/// hostname, the kubelet's /etc/hosts and CRI's resolv.conf.
fn process_identity(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|p| {
        p.dns.servers = vec!["10.96.0.10".into()];
        p.dns.searches = vec![
            "conformance.svc.cluster.local".into(),
            "svc.cluster.local".into(),
        ];
        p.dns.options = vec!["ndots:5".into()];
    })?;
    let mut spec = r.sh("app", "sleep 1000");
    spec.working_dir = "/tmp".into();
    spec.env = vec![
        ("GREETING".into(), "hello world".into()),
        ("EMPTY".into(), String::new()),
    ];
    spec.run_as_user = Some(1000);
    spec.run_as_group = Some(1000);
    let id = r.start(pod, spec)?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    let mut o = Observation::new();
    o.put("id", r.exec_ok(&id, &["id"])?);
    o.put("pwd", r.exec_ok(&id, &["pwd"])?);
    o.put(
        "env",
        r.exec_ok(&id, &["sh", "-c", "echo \"$GREETING|$EMPTY|$HOME|$PATH\""])?,
    );
    o.put("hostname", r.exec_ok(&id, &["hostname"])?);
    o.put("resolv.conf", r.exec_ok(&id, &["cat", "/etc/resolv.conf"])?);
    o.put("hosts", r.exec_ok(&id, &["cat", "/etc/hosts"])?);
    o.put("pid1", r.exec_ok(&id, &["cat", "/proc/1/cmdline"])?);
    Ok(o)
}

/// Read-only rootfs, the kubelet's masked and read-only /proc paths, dropped capabilities,
/// no_new_privs.
fn security_context(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let mut spec = r.sh("app", "sleep 1000");
    spec.readonly_rootfs = true;
    spec.drop_capabilities = vec!["NET_RAW".into(), "CHOWN".into()];
    spec.allow_privilege_escalation = Some(false);
    let id = r.start(pod, spec)?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    let mut o = Observation::new();
    let code = |cmd: &[&str]| r.exec(&id, cmd).map(|x| x.exit_code);
    o.put("write_rootfs", code(&["touch", "/x"])?);
    o.put("write_tmp_is_rootfs_too", code(&["touch", "/tmp/x"])?);
    o.put(
        "kcore",
        r.exec(&id, &["sh", "-c", "wc -c < /proc/kcore"])?
            .stdout
            .len()
            > 1,
    );
    o.put(
        "write_proc_sys",
        code(&["sh", "-c", "echo 1 > /proc/sys/kernel/ns_last_pid"])?,
    );
    o.put(
        "status_caps",
        r.exec_ok(
            &id,
            &[
                "sh",
                "-c",
                "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status",
            ],
        )?,
    );
    o.put("mounts_ro", r.exec_ok(&id, &["sh", "-c", "awk '$2==\"/\" || $2==\"/proc/sys\" || $2==\"/sys\" {print $2, substr($4,1,2)}' /proc/mounts | sort"])?);
    Ok(o)
}

/// All containers of a pod are served by one shim process (the stock shim groups them by
/// the sandbox id), which exits when the pod is gone.
fn one_shim_per_pod(r: &mut Run) -> Result<Observation> {
    let before = shims(r);
    let pod = r.pod(|_| {})?;
    for name in ["one", "two", "three"] {
        let spec = r.sh(name, "sleep 1000");
        let id = r.start(pod, spec)?;
        r.wait_state(&id, ContainerState::ContainerRunning)?;
    }
    let during: Vec<_> = shims(r)
        .into_iter()
        .filter(|s| !before.contains(s))
        .collect();
    let mut o = Observation::new();
    o.put("new_shim_processes", during.len());
    let binary_is_ours = during.iter().all(|(_, exe)| {
        let name = std::path::Path::new(exe)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        (name == "containerd-shim-runc-architect-v1") == (r.handler == ARCHITECT_HANDLER)
    });
    o.put("shim_binary_matches_handler", binary_is_ours);
    r.delete_pod(pod)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = during.len();
    while Instant::now() < deadline {
        let now = shims(r);
        left = during.iter().filter(|s| now.contains(s)).count();
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    o.put("shims_left_after_deletion", left);
    Ok(o)
}

/// Serving shims of the node: (pid, executable).
fn shims(r: &Run) -> Vec<(i32, String)> {
    let address = r.node.cri_socket().display().to_string();
    let mut v: Vec<(i32, String)> = runc_architect_tests::cleanup::processes_with_arg(&address)
        .into_iter()
        .filter_map(|pid| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let exe = exe.to_string_lossy().into_owned();
            exe.contains("containerd-shim").then_some((pid, exe))
        })
        .collect();
    v.sort();
    v
}

/// `shareProcessNamespace: true`: the containers see each other and the pause process.
fn shared_pid_namespace(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|p| p.share_process_namespace = true)?;
    let a = r.sh("a", "exec sleep 1001");
    let b = r.sh("b", "exec sleep 1002");
    let (ida, idb) = (r.start(pod, a)?, r.start(pod, b)?);
    r.wait_state(&ida, ContainerState::ContainerRunning)?;
    r.wait_state(&idb, ContainerState::ContainerRunning)?;
    let ps = r.exec_ok(
        &idb,
        &[
            "sh",
            "-c",
            "cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | tr -s ' '",
        ],
    )?;
    let mut o = Observation::new();
    o.put("sees_sibling", ps.contains("sleep 1001"));
    o.put(
        "pid1",
        r.exec_ok(&ida, &["sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline"])?,
    );
    Ok(o)
}

/// Waits until the container's log contains `text`.
pub fn wait_log(r: &Run, pod: crate::run::PodRef, name: &str, text: &str) -> Result<()> {
    let deadline = Instant::now() + crate::run::WAIT;
    loop {
        if log_text(r, pod, name)?.contains(text) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the log of {name} never showed {text:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `kubectl logs` shows of attempt 0 (both streams, in file order).
pub fn log_text(r: &Run, pod: crate::run::PodRef, name: &str) -> Result<String> {
    log_text_attempt(r, pod, name, 0)
}

pub fn log_text_attempt(
    r: &Run,
    pod: crate::run::PodRef,
    name: &str,
    attempt: u32,
) -> Result<String> {
    let path = r.pod_of(pod).container_log_path(name, attempt);
    if !path.exists() {
        return Ok(String::new());
    }
    let entries = r
        .kubelet
        .container_log(r.pod_of(pod), name, attempt)
        .map_err(|e| anyhow!("read the log of {name}: {e}"))?;
    Ok(
        String::from_utf8_lossy(&runc_architect_tests::cri::logs::kubectl_view(
            &entries, None,
        ))
        .into_owned(),
    )
}
