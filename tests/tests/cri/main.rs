//! Conformance through CRI: what the kubelet sees of runc-architect, next to the stock runc
//! shim, in the same run.
//!
//! No kubelet exists on this machine, so this suite is the kubelet: `runc_architect_tests::cri`
//! makes the kubelet's calls, in its order and with its arguments, against containerd's CRI
//! plugin on a test node (`runc_architect_tests::node`: a private containerd in network and
//! mount namespaces of its own, CNI pod networking, our pause image, a local registry, and
//! runc-architect registered by its installer from `RuntimeClass/`, as a user does).
//!
//! One trial per (containerd version, registration, scenario). A scenario runs as a pod under
//! the runtime handler `runc` (containerd's stock shim) and then under `runc-architect`;
//! what the kubelet saw (states, exit codes and reasons, logs, exec output, streaming
//! sessions, resources, stats, errors) is recorded as an observation, normalized (ids, pod
//! names and uids, IPs, times) and must be identical. After each run the pod is deleted the
//! way the kubelet deletes it and the node must hold nothing of it
//! (`Node::leftovers`: no task, shim, mount, cgroup, state directory, veth or rule).
//!
//! Registrations: `own` (our runtime type, TOML options, both majors) runs every scenario;
//! `as-runc` (`io.containerd.runc.v2` + `runtime_path`, the form in which CRI passes runc's
//! options, checkpoint options included) runs the scenarios marked for it on a node of its
//! own.
//!
//! Differences are confirmed before they are reported (`RA_ATTEMPTS`, default 3): the
//! stock shim itself is not deterministic everywhere on a loaded machine.
//!
//! The trials of one node run one at a time (each checks the whole node); the nodes of the
//! two versions run side by side. After all trials the host is compared with its state
//! before the run.

mod checkpoint;
mod exec;
mod hibernation;
mod lifecycle;
mod logs;
mod network;
mod resources;
mod run;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use libtest_mimic::{Failed, Trial};
use runc_architect_tests::diff::Observation;
use runc_architect_tests::node::{host::HostState, Node, NodeOptions, Registration};
use runc_architect_tests::suite::{self, LazyShared};
use runc_architect_tests::Version;

pub use run::Run;

/// A scenario: what the kubelet sees of one pod.
pub struct Scenario {
    pub name: &'static str,
    /// Also run with the `as-runc` registration.
    pub as_runc: bool,
    pub run: fn(&mut Run) -> Result<Observation>,
}

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    v.extend(lifecycle::scenarios());
    v.extend(exec::scenarios());
    v.extend(logs::scenarios());
    v.extend(resources::scenarios());
    v.extend(network::scenarios());
    v.extend(checkpoint::scenarios());
    v.extend(hibernation::scenarios());
    let mut seen = BTreeSet::new();
    for s in &v {
        assert!(seen.insert(s.name), "scenario name {} used twice", s.name);
    }
    v
}

/// A node and the lock its trials take.
pub struct Env {
    pub node: Node,
    pub registration: &'static str,
    lock: Mutex<()>,
}

fn start(version: Version, registration: &'static str) -> Result<Env> {
    let reg = match registration {
        "as-runc" => Registration::as_runc(),
        _ => Registration::own(),
    };
    let node = Node::start(NodeOptions::new(version)?.registration(reg))
        .with_context(|| format!("start a test node ({registration} registration)"))?;
    Ok(Env {
        node,
        registration,
        lock: Mutex::new(()),
    })
}

fn main() {
    let args = suite::arguments();
    let before = HostState::now();
    let mut trials = Vec::new();
    let mut envs: Vec<Arc<LazyShared<Env>>> = Vec::new();
    match Version::selected() {
        Ok(versions) => {
            for version in versions {
                for registration in ["own", "as-runc"] {
                    let env = Arc::new(LazyShared::new(move || start(version, registration)));
                    envs.push(env.clone());
                    for s in scenarios() {
                        if registration == "as-runc" && !s.as_runc {
                            continue;
                        }
                        let env = env.clone();
                        let (name, f) = (s.name, s.run);
                        trials.push(Trial::test(
                            format!("{version}::{registration}::{name}"),
                            move || -> Result<(), Failed> {
                                let env = env.get()?;
                                let _one = env.lock.lock().unwrap_or_else(|e| e.into_inner());
                                run::compare(&env, name, f).map_err(|e| {
                                    Failed::from(format!(
                                        "{e:#}\n--- containerd log (tail) ---\n{}",
                                        env.node.log_tail(25)
                                    ))
                                })
                            },
                        ));
                    }
                }
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            trials.push(Trial::test("select-containerd-versions", move || {
                Err(msg.clone().into())
            }));
        }
    }
    let conclusion = libtest_mimic::run(&args, trials);
    for e in &envs {
        e.shutdown();
    }
    if let Err(left) = before.check_after() {
        eprintln!("host check FAILED: {left}");
        std::process::exit(101);
    }
    conclusion.exit()
}
