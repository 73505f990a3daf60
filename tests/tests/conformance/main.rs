//! The differential conformance suite.
//!
//! One trial per (containerd version, scenario). Each trial runs its scenario under the stock
//! runc shim (`io.containerd.runc.v2`) and under runc-architect
//! (`io.containerd.runc-architect.v1`) against the same private containerd, normalizes what
//! differs legitimately (container ids, namespace, runtime name, scratch paths, pids, times)
//! and requires the observations to be identical; a failure prints the differences and both
//! observations.
//!
//! One containerd per version serves the whole run (started on first use). Both versions are
//! covered; a version that is not installed fails its trials unless `RA_ONLY_CONTAINERD=1.7`
//! or `=2.1` restricts the run. The shim under test is `$RA_SHIM_BINARY` or the workspace's
//! build (see `runc_architect_tests::paths::architect_shim`); `RA_SHIM_BINARY=stock` compares
//! the stock shim with itself, which proves the harness.
//!
//! Trials run in parallel, two at a time unless `--test-threads` says otherwise.

mod io;
mod lifecycle;
mod process;
mod security;
mod util;

use std::collections::BTreeSet;

use anyhow::Result;
use libtest_mimic::{Failed, Trial};
use runc_architect_tests::diff::Observation;
use runc_architect_tests::differential::{RunCtx, VersionEnv};
use runc_architect_tests::suite;

/// A scenario: observes what a ctr user sees.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&RunCtx) -> Result<Observation>,
}

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    v.extend(io::scenarios());
    v.extend(process::scenarios());
    v.extend(security::scenarios());
    v.extend(lifecycle::scenarios());
    let mut seen = BTreeSet::new();
    for s in &v {
        assert!(seen.insert(s.name), "scenario name {} used twice", s.name);
    }
    v
}

fn main() {
    suite::run_per_version(VersionEnv::start, |version, env| {
        scenarios()
            .into_iter()
            .map(|s| {
                let env = env.clone();
                let (name, run) = (s.name, s.run);
                Trial::test(
                    format!("{version}::{name}"),
                    move || -> Result<(), Failed> {
                        let e = env.get()?;
                        e.compare(name, &run).map_err(|e| format!("{e:#}").into())
                    },
                )
            })
            .collect()
    })
}
