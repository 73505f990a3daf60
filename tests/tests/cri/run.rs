//! One run of a scenario under one runtime handler, and the comparison of the two runs.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use runc_architect_tests::cri::api;
use runc_architect_tests::cri::{ContainerSpec, Kubelet, Pod, PodSpec, Timeouts};
use runc_architect_tests::diff::{differences, Normalizer, Observation};
use runc_architect_tests::differential::attempts;
use runc_architect_tests::node::{Node, ARCHITECT_HANDLER, RUNC_HANDLER};
use serde_json::{json, Value};

use crate::Env;

/// The CRI deadlines of these runs: long enough for any call that works, short enough that
/// a hang fails the trial rather than the CI run.
pub const CRI_TIMEOUTS: Timeouts = Timeouts {
    request: Duration::from_secs(40),
    pull: Duration::from_secs(90),
    connect: Duration::from_secs(10),
};
/// How long a run waits for a state it expects.
pub const WAIT: Duration = Duration::from_secs(30);
/// The grace period of pod deletions at the end of a run.
pub const GRACE: i64 = 2;
/// How long the node may take to be clean after the pods' removal (shims exit after
/// their last container is deleted).
const CLEAN_WAIT: Duration = Duration::from_secs(15);

/// A scenario's view of one handler: a kubelet, the pods it ran, and how to normalize what
/// it saw.
pub struct Run<'a> {
    pub node: &'a Node,
    pub registration: &'static str,
    pub handler: &'static str,
    pub kubelet: Kubelet,
    base: String,
    pods: Vec<Pod>,
    norm: Normalizer,
    seq: u32,
}

/// A pod of a run (an index into its pods).
#[derive(Clone, Copy, Debug)]
pub struct PodRef(usize);

impl<'a> Run<'a> {
    fn new(env: &'a Env, scenario: &str, handler: &'static str, attempt: u32) -> Result<Run<'a>> {
        let tag = if handler == RUNC_HANDLER { "s" } else { "a" };
        let kubelet = env
            .node
            .kubelet_with(handler, CRI_TIMEOUTS)
            .context("a kubelet for the node")?;
        Ok(Run {
            node: &env.node,
            registration: env.registration,
            handler,
            kubelet,
            base: format!("{}-{tag}{attempt}", scenario.replace('_', "-")),
            pods: Vec::new(),
            norm: Normalizer::new(),
            seq: 0,
        })
    }

    /// A pod annotation map with the kubelet's `kubernetes.io/config.seen` (a time) masked.
    pub fn masked(&self, ann: &std::collections::HashMap<String, String>) -> Value {
        let m: std::collections::BTreeMap<&String, &str> = ann
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    if k == "kubernetes.io/config.seen" {
                        "<set>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        json!(m)
    }

    /// Is this the runc-architect run?
    pub fn is_architect(&self) -> bool {
        self.handler == ARCHITECT_HANDLER
    }

    /// Makes `from` look the same in both runs (it becomes `to`).
    pub fn normalize(&mut self, from: &str, to: &str) {
        let n = std::mem::take(&mut self.norm);
        self.norm = n.replace(from, to);
    }

    /// The busybox image (imported on the node).
    pub fn busybox(&self) -> String {
        self.node
            .images()
            .map(|i| i.busybox.clone())
            .unwrap_or_default()
    }

    /// A pod spec of this run (namespace `conformance`, a name of its own), customized.
    pub fn pod_spec(&mut self, f: impl FnOnce(&mut PodSpec)) -> PodSpec {
        self.seq += 1;
        let name = format!("{}-{}", self.base, self.seq);
        let mut spec = self.node.pod_spec("conformance", &name);
        spec.termination_grace_period = GRACE;
        f(&mut spec);
        spec
    }

    /// Runs a pod (RunPodSandbox, as the kubelet does) and records its names for
    /// normalization.
    pub fn pod(&mut self, f: impl FnOnce(&mut PodSpec)) -> Result<PodRef> {
        let spec = self.pod_spec(f);
        self.run_pod(spec)
    }

    /// Runs `spec` as a pod.
    pub fn run_pod(&mut self, spec: PodSpec) -> Result<PodRef> {
        let pod = self
            .kubelet
            .run_pod(spec.clone())
            .map_err(|e| anyhow!("RunPodSandbox of {}: {e}", spec.name))?;
        Ok(self.track(pod, &spec))
    }

    /// A pod under the other handler of the comparison (runc for runc-architect's run and
    /// the other way round), deleted with the run's own pods.
    pub fn pod_under_the_other_handler(&mut self, f: impl FnOnce(&mut PodSpec)) -> Result<PodRef> {
        let other = if self.is_architect() {
            RUNC_HANDLER
        } else {
            ARCHITECT_HANDLER
        };
        let spec = self.pod_spec(f);
        let kubelet = self.node.kubelet_with(other, CRI_TIMEOUTS)?;
        let pod = kubelet
            .run_pod(spec.clone())
            .map_err(|e| anyhow!("RunPodSandbox of {} under {other}: {e}", spec.name))?;
        Ok(self.track(pod, &spec))
    }

    fn track(&mut self, pod: Pod, spec: &PodSpec) -> PodRef {
        let n = self.pods.len() + 1;
        let (name, uid) = (&spec.name, &spec.uid);
        self.normalize(&pod.sandbox_id, &format!("<sandbox{n}>"));
        self.normalize(name, &format!("<pod{n}>"));
        self.normalize(uid, &format!("<uid{n}>"));
        if !pod.ip.is_empty() {
            self.normalize(&pod.ip, &format!("<pod{n}-ip>"));
        }
        self.pods.push(pod);
        PodRef(self.pods.len() - 1)
    }

    pub fn pod_of(&self, p: PodRef) -> &Pod {
        &self.pods[p.0]
    }

    /// Creates and starts a container in `pod` (ImageStatus/PullImage, CreateContainer,
    /// StartContainer); returns its id.
    pub fn start(&mut self, pod: PodRef, spec: ContainerSpec) -> Result<String> {
        let name = spec.name.clone();
        let id = self
            .kubelet
            .start_container(&self.pods[pod.0], &spec)
            .map_err(|e| anyhow!("start container {name}: {e}"))?;
        self.normalize(&id, &format!("<ctr:{name}.{}>", spec.restart_count));
        Ok(id)
    }

    /// CreateContainer of `spec` in `pod` with the kubelet's config for it, naming the
    /// image as `image` (a pulled image's reference, or a checkpoint archive); the id,
    /// normalized as `<ctr:LABEL>`. Not started.
    pub fn create(
        &mut self,
        pod: PodRef,
        spec: &ContainerSpec,
        image: &str,
        label: &str,
    ) -> Result<String> {
        let p = &self.pods[pod.0];
        let config = self
            .kubelet
            .container_config(p, spec, image)
            .map_err(|e| anyhow!("container config: {e}"))?;
        let created = self
            .kubelet
            .cri()
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: p.sandbox_id.clone(),
                config: Some(config),
                sandbox_config: Some(p.config.clone()),
            })
            .map_err(|e| anyhow!("CreateContainer of {}: {e}", spec.name))?;
        let id = created.container_id;
        self.normalize(&id, &format!("<ctr:{label}>"));
        Ok(id)
    }

    /// A busybox container named `name` running `sh -c script`.
    pub fn sh(&self, name: &str, script: &str) -> ContainerSpec {
        ContainerSpec::new(name, &self.busybox()).command(&["sh", "-c", script])
    }

    /// A pod with one busybox container running `script`; the pod and the container id.
    pub fn pod_with(&mut self, script: &str) -> Result<(PodRef, String)> {
        let pod = self.pod(|_| {})?;
        let spec = self.sh("app", script);
        let id = self.start(pod, spec)?;
        Ok((pod, id))
    }

    /// ContainerStatus.
    pub fn status(&self, id: &str) -> Result<api::ContainerStatus> {
        self.kubelet
            .container_status(id)
            .map_err(|e| anyhow!("ContainerStatus of {id}: {e}"))
    }

    /// Waits until the container is in `state` (polling ContainerStatus as the kubelet's
    /// relist does, but faster).
    pub fn wait_state(&self, id: &str, state: api::ContainerState) -> Result<api::ContainerStatus> {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.status(id)?;
            if s.state == state as i32 {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "container {id} is still {} after {WAIT:?} (waiting for {})",
                    state_name(s.state),
                    state.as_str_name()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the container to exit.
    pub fn wait_exited(&self, id: &str) -> Result<api::ContainerStatus> {
        self.wait_state(id, api::ContainerState::ContainerExited)
    }

    /// ExecSync with a 30 s timeout.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> Result<api::ExecSyncResponse> {
        self.kubelet
            .exec_sync(id, cmd, Duration::from_secs(30))
            .map_err(|e| anyhow!("ExecSync {cmd:?}: {e}"))
    }

    /// ExecSync that must exit 0; its stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> Result<String> {
        let r = self.exec(id, cmd)?;
        if r.exit_code != 0 {
            bail!(
                "ExecSync {cmd:?} exited {}: stdout {:?} stderr {:?}",
                r.exit_code,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&r.stdout).into_owned())
    }

    /// Waits until `script` (a shell test) succeeds inside the container.
    pub fn wait_exec(&self, id: &str, script: &str) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.exec(id, &["sh", "-c", script])?.exit_code == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("`{script}` never succeeded in {id} within {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the kubelet records of a container status: state, exit code, reason and the
    /// container's identity (labels, annotations, image, log path, mounts), times only as
    /// "set" and in order.
    pub fn status_value(&self, s: &api::ContainerStatus) -> Value {
        let mut mounts: Vec<String> = s.mounts.iter().map(|m| m.container_path.clone()).collect();
        mounts.sort();
        json!({
            "state": state_name(s.state),
            "exit_code": s.exit_code,
            "reason": s.reason,
            "metadata": s.metadata.as_ref().map(|m| json!({"name": m.name, "attempt": m.attempt})),
            "image": s.image.as_ref().map(|i| i.image.clone()),
            "image_ref_set": !s.image_ref.is_empty(),
            "labels": s.labels,
            "annotations": s.annotations,
            "log_path": s.log_path,
            "mounts": mounts,
            "created": s.created_at > 0,
            "started": s.started_at > 0,
            "finished": s.finished_at > 0,
            "times_in_order": s.started_at == 0 || s.created_at <= s.started_at,
        })
    }

    /// The essentials of a status: state, exit code, reason.
    pub fn status_brief(&self, id: &str) -> Result<Value> {
        let s = self.status(id)?;
        Ok(json!({
            "state": state_name(s.state),
            "exit_code": s.exit_code,
            "reason": s.reason,
        }))
    }

    /// The kubelet's deletion of every pod of this run (stop each container with the
    /// grace period, StopPodSandbox, RemoveContainer, RemovePodSandbox).
    pub fn delete_pods(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for pod in self.pods.drain(..) {
            if let Err(e) = self.kubelet.kill_pod(&pod, Some(GRACE)) {
                errors.push(format!("deleting pod {}: {e}", pod.spec.name));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("\n"))
        }
    }

    /// Deletes one pod now (the kubelet's pod deletion); how long it took.
    pub fn delete_pod(&mut self, p: PodRef) -> Result<Duration> {
        let t = Instant::now();
        self.kubelet
            .kill_pod(&self.pods[p.0], Some(GRACE))
            .map_err(|e| anyhow!("delete pod: {e}"))?;
        Ok(t.elapsed())
    }

    /// Waits until the node holds nothing of the run's pods.
    pub fn wait_clean(&self) -> Vec<String> {
        let deadline = Instant::now() + CLEAN_WAIT;
        loop {
            let left = self.node.leftovers();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        let _ = self.delete_pods();
    }
}

/// The name of a CRI container state.
pub fn state_name(state: i32) -> String {
    api::ContainerState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("STATE_{state}"))
}

/// A duration as the scenarios compare it: whole seconds, which both runtimes must agree on
/// (a second's difference is what a user notices in a stop or an exec timeout).
pub fn secs(d: Duration) -> u64 {
    d.as_secs()
}

/// Runs the scenario under both handlers and compares; see the crate docs.
pub fn compare(env: &Env, scenario: &str, f: fn(&mut Run) -> Result<Observation>) -> Result<()> {
    let attempts = attempts();
    let mut earlier = Vec::new();
    for attempt in 1..=attempts {
        let mut seen = Vec::new();
        for handler in [RUNC_HANDLER, ARCHITECT_HANDLER] {
            let obs = once(env, scenario, handler, attempt, f)
                .with_context(|| format!("under handler {handler} ({})", env.registration))?;
            seen.push(obs);
        }
        let (a, b) = (&seen[0], &seen[1]);
        if std::env::var_os("RA_SHOW_OBSERVATIONS").is_some() {
            eprintln!(
                "--- {scenario} (attempt {attempt}) under {RUNC_HANDLER} ---\n{}--- under {ARCHITECT_HANDLER} ---\n{}",
                a.render(),
                b.render()
            );
        }
        let d = differences(&a.to_value(), &b.to_value());
        if d.is_empty() {
            if !earlier.is_empty() {
                eprintln!(
                    "note: {scenario} agreed on attempt {attempt}; earlier attempts differed:\n{}",
                    earlier.join("\n")
                );
            }
            return Ok(());
        }
        earlier.push(format!(
            "  {}\n--- {RUNC_HANDLER} saw ---\n{}--- {ARCHITECT_HANDLER} saw ---\n{}",
            d.join("\n  "),
            a.render(),
            b.render()
        ));
    }
    bail!(
        "the handlers differ (on each of {attempts} attempts; the last one:)\n{}",
        earlier.last().map(String::as_str).unwrap_or("")
    )
}

/// One run: the scenario, the pods' deletion, the node's cleanliness.
fn once(
    env: &Env,
    scenario: &str,
    handler: &'static str,
    attempt: u32,
    f: fn(&mut Run) -> Result<Observation>,
) -> Result<Observation> {
    let mut run = Run::new(env, scenario, handler, attempt)?;
    let obs = f(&mut run);
    let deleted = run.delete_pods();
    let left = run.wait_clean();
    let obs = obs?;
    deleted?;
    if !left.is_empty() {
        bail!(
            "after the kubelet deleted the pods, the node still holds:\n  {}",
            left.join("\n  ")
        );
    }
    Ok(obs.normalized(&run.norm))
}
