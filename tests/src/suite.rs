//! Small pieces shared by the custom-harness suites (libtest-mimic).

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use libtest_mimic::Trial;

use crate::Version;

/// A value built on first use by whichever trial needs it first, shared by all trials, and
/// dropped by [`LazyShared::shutdown`] once the trials are done (statics are never dropped,
/// and a daemon must be stopped and cleaned up).
pub struct LazyShared<T> {
    init: Box<dyn Fn() -> Result<T> + Send + Sync>,
    cell: Mutex<Option<Result<Arc<T>, String>>>,
}

impl<T> LazyShared<T> {
    pub fn new(init: impl Fn() -> Result<T> + Send + Sync + 'static) -> LazyShared<T> {
        LazyShared {
            init: Box::new(init),
            cell: Mutex::new(None),
        }
    }

    /// The value, built now if this is the first call. A failed build is remembered: every
    /// trial that needs it fails with the same message.
    pub fn get(&self) -> Result<Arc<T>, String> {
        let mut g = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some((self.init)().map(Arc::new).map_err(|e| format!("{e:#}")));
        }
        g.as_ref().expect("set above").clone()
    }

    /// Drops the value (the last reference, once no trial holds one).
    pub fn shutdown(&self) {
        let taken = self.cell.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(taken);
    }
}

/// libtest-mimic arguments with the suites' default of two trials at a time (the machines
/// have two cores; each trial drives daemons, shims and runc).
pub fn arguments() -> libtest_mimic::Arguments {
    let mut args = libtest_mimic::Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(2);
    }
    args
}

/// The main of a per-version suite: for each selected containerd version, a lazily started
/// environment (`start`, after checking the version is installed) and the trials
/// `trials(version, env)` makes for it; runs them, stops the environments, exits with
/// libtest's verdict. A version selection that cannot be read is one failing trial.
pub fn run_per_version<E: Send + Sync + 'static>(
    start: fn(Version) -> Result<E>,
    trials: impl Fn(Version, Arc<LazyShared<E>>) -> Vec<Trial>,
) -> ! {
    let args = arguments();
    let mut all = Vec::new();
    let mut envs = Vec::new();
    match Version::selected() {
        Ok(versions) => {
            for version in versions {
                let env = Arc::new(LazyShared::new(move || {
                    version.check_installed()?;
                    start(version).with_context(|| format!("cannot set up {version}"))
                }));
                envs.push(env.clone());
                all.extend(trials(version, env));
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            all.push(Trial::test("select-containerd-versions", move || {
                Err(msg.clone().into())
            }));
        }
    }
    let conclusion = libtest_mimic::run(&args, all);
    for e in &envs {
        e.shutdown();
    }
    conclusion.exit()
}
