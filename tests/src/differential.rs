//! The differential runner: one scenario, run under the stock runc shim and under
//! runc-architect against the same daemon, observations normalized and compared.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::containerd::Containerd;
use crate::ctr::Ctr;
use crate::diff::{differences, Normalizer, Observation};
use crate::events::{Event, EventRecorder};
use crate::image::{ImageBuilder, BUSYBOX_IMAGE};
use crate::paths::{Runtime, Version};
use crate::process::Output;

/// One containerd version prepared for differential runs: the daemon, a namespace with the
/// busybox test image imported.
pub struct VersionEnv {
    pub containerd: Containerd,
    namespace: String,
    image: String,
    builder: ImageBuilder,
}

impl VersionEnv {
    /// Starts `version`'s daemon (with the shim under test registered) and imports the test
    /// image into a namespace of its own.
    pub fn start(version: Version) -> Result<VersionEnv> {
        let containerd = Containerd::start(version)?;
        // Unique per daemon: runc state and cgroups are keyed by namespace outside our dir.
        let namespace = format!("ra-{}", containerd.unique());
        let ctr = containerd.ctr(&namespace);
        let images = containerd.scratch_dir("images")?;
        let builder = ImageBuilder::busybox(BUSYBOX_IMAGE)?;
        builder
            .import(&ctr, &images)
            .context("import the busybox test image")?;
        Ok(VersionEnv {
            containerd,
            namespace,
            image: BUSYBOX_IMAGE.to_string(),
            builder,
        })
    }

    pub fn version(&self) -> Version {
        self.containerd.version()
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn image(&self) -> &str {
        &self.image
    }

    pub fn ctr(&self) -> Ctr {
        self.containerd.ctr(&self.namespace)
    }

    /// The test image's builder (to unpack its files as a host root filesystem).
    pub fn image_builder(&self) -> &ImageBuilder {
        &self.builder
    }

    /// Runs `scenario` once per runtime and compares the normalized observations.
    /// The error explains every difference and shows both observations.
    ///
    /// A difference is confirmed before it is reported: the pair of runs is repeated up to
    /// [`attempts`] times in all and the trial passes if any pair agrees (a note on stderr
    /// names the earlier difference). The reference itself is not deterministic everywhere:
    /// with the stock shim, output written just before a process exits is sometimes lost on
    /// a loaded machine (seen with containerd 2.1). A deterministic difference shows on every
    /// attempt. A run that cannot complete fails at once.
    pub fn compare(
        &self,
        scenario: &str,
        f: &dyn Fn(&RunCtx) -> Result<Observation>,
    ) -> Result<()> {
        let attempts = attempts();
        let mut earlier = Vec::new();
        for attempt in 1..=attempts {
            match self.compare_once(scenario, attempt, f)? {
                None => {
                    if !earlier.is_empty() {
                        eprintln!(
                            "note: scenario `{scenario}` on {} agreed on attempt {attempt}; \
                             earlier attempts differed:\n{}",
                            self.version(),
                            earlier.join("\n")
                        );
                    }
                    return Ok(());
                }
                Some(report) => earlier.push(report),
            }
        }
        bail!(
            "{} (the same on each of {attempts} attempts; the last one:)\n{}",
            "the runtimes differ",
            earlier.last().map(String::as_str).unwrap_or("")
        )
    }

    /// One pair of runs: `None` when they agree, else the report of the difference.
    fn compare_once(
        &self,
        scenario: &str,
        attempt: u32,
        f: &dyn Fn(&RunCtx) -> Result<Observation>,
    ) -> Result<Option<String>> {
        let mut results = Vec::new();
        for rt in Runtime::ALL {
            let ctx = RunCtx::new(self, scenario, rt, attempt)?;
            let r = f(&ctx).map(|o| o.normalized(&ctx.normalizer()));
            drop(ctx);
            results.push((rt, r));
        }
        let mut errors = Vec::new();
        for (rt, r) in &results {
            if let Err(e) = r {
                errors.push(format!(
                    "under {rt} on {}: the scenario could not complete: {e:#}",
                    self.version()
                ));
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("\n\n"));
        }
        let (Ok(a), Ok(b)) = (&results[0].1, &results[1].1) else {
            unreachable!()
        };
        if std::env::var_os("RA_SHOW_OBSERVATIONS").is_some() {
            eprintln!(
                "--- {scenario} on {} (attempt {attempt}): {} saw ---\n{}--- {} saw ---\n{}",
                self.version(),
                Runtime::Stock.name(),
                a.render(),
                Runtime::Architect.name(),
                b.render()
            );
        }
        let d = differences(&a.to_value(), &b.to_value());
        if d.is_empty() {
            return Ok(None);
        }
        Ok(Some(format!(
            "scenario `{scenario}` on {} differs: first = {}, second = {}\n  {}\n\
             --- {} saw ---\n{}--- {} saw ---\n{}",
            self.version(),
            Runtime::Stock,
            Runtime::Architect,
            d.join("\n  "),
            Runtime::Stock.name(),
            a.render(),
            Runtime::Architect.name(),
            b.render()
        )))
    }
}

/// How many times a differing scenario is run before the difference is reported:
/// `RA_ATTEMPTS`, default 3.
pub fn attempts() -> u32 {
    std::env::var("RA_ATTEMPTS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(3)
}

/// What a scenario gets for one run under one runtime.
pub struct RunCtx<'a> {
    env: &'a VersionEnv,
    runtime: Runtime,
    id: String,
    ctr: Ctr,
    scratch: PathBuf,
    ids: RefCell<Vec<String>>,
    extra_norm: RefCell<Vec<(String, String)>>,
    /// Events before this mark belong to earlier runs.
    mark: usize,
}

impl<'a> RunCtx<'a> {
    fn new(
        env: &'a VersionEnv,
        scenario: &str,
        runtime: Runtime,
        attempt: u32,
    ) -> Result<RunCtx<'a>> {
        let id = format!("{scenario}-{}", runtime.tag());
        let scratch = env.containerd.scratch_dir(&format!("{id}.{attempt}"))?;
        let ctx = RunCtx {
            env,
            runtime,
            ctr: env.ctr(),
            scratch,
            ids: RefCell::new(vec![id.clone()]),
            id,
            extra_norm: RefCell::new(Vec::new()),
            mark: 0,
        };
        // Leftovers of an earlier attempt in the same daemon.
        ctx.ctr.remove(&ctx.id);
        let mut ctx = ctx;
        ctx.mark = env.containerd.events().mark();
        Ok(ctx)
    }

    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    pub fn version(&self) -> Version {
        self.env.version()
    }

    /// The runtime type for `ctr run --runtime`.
    pub fn runtime_type(&self) -> &'static str {
        self.runtime.runtime_type()
    }

    /// The scenario's main container id (normalized to `<ID>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A further container id, `<main id>-<suffix>` (normalized to `<ID>-<suffix>`), removed
    /// at the end of the run.
    pub fn extra_id(&self, suffix: &str) -> String {
        let id = format!("{}-{suffix}", self.id);
        self.ctr.remove(&id);
        self.ids.borrow_mut().push(id.clone());
        id
    }

    pub fn ctr(&self) -> &Ctr {
        &self.ctr
    }

    pub fn namespace(&self) -> &str {
        self.env.namespace()
    }

    pub fn image(&self) -> &str {
        self.env.image()
    }

    pub fn containerd(&self) -> &Containerd {
        &self.env.containerd
    }

    /// The test image's builder.
    pub fn image_builder(&self) -> &ImageBuilder {
        self.env.image_builder()
    }

    pub fn events(&self) -> &EventRecorder {
        self.env.containerd.events()
    }

    /// A host directory of this run (normalized to `<SCRATCH>`).
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// Adds a replacement to this run's normalizer.
    pub fn normalize(&self, from: &str, to: &str) {
        self.extra_norm
            .borrow_mut()
            .push((from.to_string(), to.to_string()));
    }

    /// `run --runtime <type> FLAGS IMAGE ID CMD...` as ctr arguments.
    pub fn run_args(&self, id: &str, flags: &[&str], cmd: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec!["run".into(), "--runtime".into(), self.runtime_type().into()];
        v.extend(flags.iter().map(|s| s.to_string()));
        v.push(self.image().to_string());
        v.push(id.to_string());
        v.extend(cmd.iter().map(|s| s.to_string()));
        v
    }

    /// `ctr run --rm` of the main container, attached; returns what ctr printed.
    pub fn run(&self, flags: &[&str], cmd: &[&str]) -> Result<Output> {
        self.run_id(&self.id, flags, cmd, None)
    }

    /// `ctr run --rm` of the main container with `input` on ctr's stdin.
    pub fn run_input(&self, flags: &[&str], cmd: &[&str], input: &[u8]) -> Result<Output> {
        self.run_id(&self.id, flags, cmd, Some(input))
    }

    /// `ctr run --rm` of container `id`.
    pub fn run_id(
        &self,
        id: &str,
        flags: &[&str],
        cmd: &[&str],
        input: Option<&[u8]>,
    ) -> Result<Output> {
        let mut f = vec!["--rm"];
        f.extend_from_slice(flags);
        let args = self.run_args(id, &f, cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match input {
            Some(i) => self.ctr.run_input(&args, i),
            None => self.ctr.run(&args),
        }
    }

    /// `ctr run -d` of container `id`; requires success.
    pub fn run_detached(&self, id: &str, flags: &[&str], cmd: &[&str]) -> Result<Output> {
        let mut f = vec!["-d"];
        f.extend_from_slice(flags);
        let args = self.run_args(id, &f, cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctr.ok(&args)
    }

    /// Waits until `ctr tasks ls` shows task `id` with `status`.
    pub fn wait_status(&self, id: &str, status: &str) -> Result<()> {
        self.ctr.wait_status(id, status, Duration::from_secs(30))
    }

    /// Events of container `id` in this run so far.
    pub fn events_of(&self, id: &str) -> Vec<Event> {
        self.events()
            .since(self.mark)
            .into_iter()
            .filter(|e| e.namespace == self.namespace() && e.container_id() == Some(id))
            .collect()
    }

    /// The event count when this run began (events before it belong to earlier runs).
    pub fn events_mark(&self) -> usize {
        self.mark
    }

    /// Waits for event `topic` of container `id` in this run.
    pub fn wait_event(&self, id: &str, topic: &str) -> Result<Event> {
        let ns = self.namespace().to_string();
        self.events()
            .wait_for(Duration::from_secs(30), |e| {
                e.seq >= self.mark
                    && e.namespace == ns
                    && e.topic == topic
                    && e.container_id() == Some(id)
            })
            .with_context(|| format!("event {topic} for container {id} in namespace {ns}"))
    }

    /// The normalizer for this run: container ids, namespace, runtime, scratch and daemon paths.
    pub fn normalizer(&self) -> Normalizer {
        let mut n = Normalizer::new()
            .replace(&self.id, "<ID>")
            .replace(self.namespace(), "<NS>")
            .replace(self.runtime_type(), "<RUNTIME>")
            .replace(&self.scratch.display().to_string(), "<SCRATCH>")
            .replace(
                &self.env.containerd.dir().display().to_string(),
                "<DAEMON-DIR>",
            );
        for (f, t) in self.extra_norm.borrow().iter() {
            n = n.replace(f, t);
        }
        n
    }
}

impl Drop for RunCtx<'_> {
    fn drop(&mut self) {
        for id in self.ids.borrow().iter() {
            self.ctr.remove(id);
        }
    }
}
