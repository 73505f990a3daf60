//! The cgroup freezer a dump hands to CRIU, and putting freezers back after a failure.
//!
//! CRIU's `freeze_cgroup` takes a v1 freezer directory (`freezer.state`) or a v2 cgroup
//! (`cgroup.freeze`). CRIU reads the state first: a frozen cgroup is seized as it is and
//! frozen again after the dump; a thawed one is frozen by CRIU, which then polls in
//! 100 ms steps. So a running container is frozen here first, on its v2 cgroup, waiting
//! for `frozen 1` in `cgroup.events` with a short backoff, and thawed after the dump.
//!
//! If CRIU fails or dies half-way, a freezer may be left in the wrong state (CRIU thaws
//! the cgroup once the tasks are seized, and freezes a paused one again only at the end),
//! so [`Snapshot`] records both freezers before the dump and [`Snapshot::restore`] puts
//! them back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroups::CgroupPaths;

/// How long freezing may take before the dump is refused.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// A freezer: a v1 freezer directory or a v2 cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    V1(PathBuf),
    V2(PathBuf),
}

impl Freezer {
    /// The directory CRIU gets as `freeze_cgroup`.
    pub fn path(&self) -> &Path {
        match self {
            Freezer::V1(p) | Freezer::V2(p) => p,
        }
    }

    /// Whether the cgroup is frozen (or freezing, for v1).
    pub fn is_frozen(&self) -> std::io::Result<bool> {
        match self {
            Freezer::V1(p) => {
                let s = std::fs::read_to_string(p.join("freezer.state"))?;
                Ok(matches!(s.trim(), "FROZEN" | "FREEZING"))
            }
            Freezer::V2(p) => Ok(v2_frozen(p)?),
        }
    }

    /// Freezes and waits until every task is frozen. Blocking.
    pub fn freeze(&self, timeout: Duration) -> std::io::Result<()> {
        let started = Instant::now();
        match self {
            Freezer::V1(p) => std::fs::write(p.join("freezer.state"), "FROZEN")?,
            Freezer::V2(p) => std::fs::write(p.join("cgroup.freeze"), "1")?,
        }
        let mut pause = Duration::from_micros(20);
        loop {
            let done = match self {
                Freezer::V1(p) => {
                    std::fs::read_to_string(p.join("freezer.state"))?.trim() == "FROZEN"
                }
                Freezer::V2(p) => v2_frozen(p)?,
            };
            if done {
                return Ok(());
            }
            if started.elapsed() > timeout {
                // Leave it as it was before we started.
                let _ = self.thaw();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "cgroup {} did not freeze within {timeout:?}",
                        self.path().display()
                    ),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Thaws (does not wait: thawing is immediate for the tasks' purposes).
    pub fn thaw(&self) -> std::io::Result<()> {
        match self {
            Freezer::V1(p) => std::fs::write(p.join("freezer.state"), "THAWED"),
            Freezer::V2(p) => std::fs::write(p.join("cgroup.freeze"), "0"),
        }
    }

    fn set(&self, frozen: bool) -> std::io::Result<()> {
        if frozen {
            self.freeze(FREEZE_TIMEOUT)
        } else {
            self.thaw()
        }
    }
}

fn v2_frozen(dir: &Path) -> std::io::Result<bool> {
    let events = std::fs::read_to_string(dir.join("cgroup.events"))?;
    Ok(events.lines().any(|l| l.trim() == "frozen 1"))
}

/// Picks the freezer for a dump of a container with `paths`: the v1 freezer if it holds
/// the container frozen (paused through libcontainer on a v1 or hybrid host), else the
/// v2 cgroup, else the v1 freezer.
pub fn choose(paths: &CgroupPaths) -> Option<Freezer> {
    let v1 = paths
        .v1("freezer")
        .filter(|p| p.join("freezer.state").exists())
        .map(|p| Freezer::V1(p.to_path_buf()));
    let v2 = paths
        .unified
        .as_ref()
        .filter(|p| p.join("cgroup.freeze").exists())
        .map(|p| Freezer::V2(p.clone()));
    if let Some(f) = &v1 {
        if f.is_frozen().unwrap_or(false) {
            return v1;
        }
    }
    v2.or(v1)
}

/// The state of every freezer of a container before a dump.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    states: Vec<(Freezer, bool)>,
}

impl Snapshot {
    /// Records the freezers of `paths` (the ones that exist).
    pub fn take(paths: &CgroupPaths) -> Snapshot {
        let mut states = Vec::new();
        if let Some(p) = paths.v1("freezer") {
            let f = Freezer::V1(p.to_path_buf());
            if let Ok(frozen) = f.is_frozen() {
                states.push((f, frozen));
            }
        }
        if let Some(p) = &paths.unified {
            let f = Freezer::V2(p.clone());
            if p.join("cgroup.freeze").exists() {
                if let Ok(frozen) = f.is_frozen() {
                    states.push((f, frozen));
                }
            }
        }
        Snapshot { states }
    }

    /// Whether any freezer holds the container.
    pub fn frozen(&self) -> bool {
        self.states.iter().any(|(_, f)| *f)
    }

    /// Puts every freezer back into its recorded state; returns what could not be.
    pub fn restore(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (f, frozen) in &self.states {
            match f.is_frozen() {
                Ok(now) if now == *frozen => {}
                _ => {
                    if let Err(e) = f.set(*frozen) {
                        problems.push(format!("{}: {e}", f.path().display()));
                    }
                }
            }
        }
        problems
    }
}
