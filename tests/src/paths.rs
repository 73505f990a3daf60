//! Where things are: the containerd series under test, their binaries, and the shim under test.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Default install prefix of `scripts/setup` (override with `RA_PREFIX`).
pub const DEFAULT_PREFIX: &str = "/opt/runc-architect";

/// Runtime type of containerd's stock runc shim.
pub const STOCK_RUNTIME: &str = "io.containerd.runc.v2";
/// Runtime type of runc-architect.
pub const ARCHITECT_RUNTIME: &str = "io.containerd.runc-architect.v1";
/// Binary name containerd derives from [`ARCHITECT_RUNTIME`].
pub const ARCHITECT_SHIM_NAME: &str = "containerd-shim-runc-architect-v1";
/// Binary name of the stock shim.
pub const STOCK_SHIM_NAME: &str = "containerd-shim-runc-v2";

/// `RA_SHIM_BINARY=stock` runs the stock shim of each containerd version under the
/// runc-architect runtime name: the differential suites then compare stock with stock, which
/// proves the harness itself.
pub const SHIM_BINARY_STOCK: &str = "stock";

/// The install prefix: `$RA_PREFIX` or [`DEFAULT_PREFIX`].
pub fn prefix() -> PathBuf {
    match std::env::var_os("RA_PREFIX") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PREFIX),
    }
}

/// The cargo workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A containerd series under test, installed side by side by `scripts/setup`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    V1_7,
    V2_1,
}

impl Version {
    pub const ALL: [Version; 2] = [Version::V1_7, Version::V2_1];

    /// "1.7" or "2.1".
    pub fn series(self) -> &'static str {
        match self {
            Version::V1_7 => "1.7",
            Version::V2_1 => "2.1",
        }
    }

    /// A short tag usable in names: "17" or "21".
    pub fn tag(self) -> &'static str {
        match self {
            Version::V1_7 => "17",
            Version::V2_1 => "21",
        }
    }

    pub fn parse(s: &str) -> Option<Version> {
        Version::ALL.into_iter().find(|v| v.series() == s.trim())
    }

    /// `$RA_PREFIX/containerd-<series>`.
    pub fn install_dir(self) -> PathBuf {
        prefix().join(format!("containerd-{}", self.series()))
    }

    pub fn bin_dir(self) -> PathBuf {
        self.install_dir().join("usr/bin")
    }

    pub fn containerd_bin(self) -> PathBuf {
        self.bin_dir().join("containerd")
    }

    pub fn ctr_bin(self) -> PathBuf {
        self.bin_dir().join("ctr")
    }

    pub fn stock_shim_bin(self) -> PathBuf {
        self.bin_dir().join(STOCK_SHIM_NAME)
    }

    /// Checks that this series is installed; the error says how to install it.
    pub fn check_installed(self) -> Result<()> {
        for b in [self.containerd_bin(), self.ctr_bin(), self.stock_shim_bin()] {
            if !is_executable(&b) {
                bail!(
                    "containerd {} is not installed: {} is missing (run scripts/setup as root, \
                     or set RA_PREFIX; RA_ONLY_CONTAINERD=1.7|2.1 restricts the run to one series)",
                    self.series(),
                    b.display()
                );
            }
        }
        Ok(())
    }

    /// The series this run covers: both, unless `RA_ONLY_CONTAINERD` names one.
    pub fn selected() -> Result<Vec<Version>> {
        match std::env::var("RA_ONLY_CONTAINERD") {
            Ok(s) if !s.trim().is_empty() => match Version::parse(&s) {
                Some(v) => Ok(vec![v]),
                None => bail!("RA_ONLY_CONTAINERD={s:?}: expected 1.7 or 2.1"),
            },
            _ => Ok(Version::ALL.to_vec()),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "containerd-{}", self.series())
    }
}

/// The two runtimes a differential suite compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Runtime {
    /// `io.containerd.runc.v2`, containerd's own shim.
    Stock,
    /// `io.containerd.runc-architect.v1`.
    Architect,
}

impl Runtime {
    pub const ALL: [Runtime; 2] = [Runtime::Stock, Runtime::Architect];

    /// The runtime type given to containerd (`ctr run --runtime`).
    pub fn runtime_type(self) -> &'static str {
        match self {
            Runtime::Stock => STOCK_RUNTIME,
            Runtime::Architect => ARCHITECT_RUNTIME,
        }
    }

    /// A short tag for container ids and file names.
    pub fn tag(self) -> &'static str {
        match self {
            Runtime::Stock => "s",
            Runtime::Architect => "a",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Stock => "stock",
            Runtime::Architect => "runc-architect",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.runtime_type())
    }
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The runc-architect shim binary to test with containerd `version`.
///
/// `$RA_SHIM_BINARY` if set (the value `stock` means the stock shim of `version`, for proving
/// the harness), else `$CARGO_TARGET_DIR/{release,debug}/` and `<workspace>/target/{release,debug}/`.
pub fn architect_shim(version: Version) -> Result<PathBuf> {
    if let Some(v) = std::env::var_os("RA_SHIM_BINARY").filter(|v| !v.is_empty()) {
        if v == SHIM_BINARY_STOCK {
            return Ok(version.stock_shim_bin());
        }
        let p = PathBuf::from(v);
        if !is_executable(&p) {
            bail!("RA_SHIM_BINARY={} is not an executable file", p.display());
        }
        return Ok(std::fs::canonicalize(&p).unwrap_or(p));
    }
    let mut candidates = Vec::new();
    let mut target_dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        target_dirs.push(PathBuf::from(t));
    }
    target_dirs.push(workspace_root().join("target"));
    for profile in ["release", "debug"] {
        for t in &target_dirs {
            candidates.push(t.join(profile).join(ARCHITECT_SHIM_NAME));
        }
    }
    if let Some(p) = candidates.iter().find(|p| is_executable(p)) {
        return Ok(p.clone());
    }
    bail!(
        "the runc-architect shim binary is not built: looked for {}. Build it with \
         `cargo build --release -p containerd-shim-runc-architect`, or set RA_SHIM_BINARY \
         (RA_SHIM_BINARY=stock tests the harness with the stock shim under both runtime names)",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Directories that hold the host tools the harness runs (runc, ip, mount, ...): the sbin
/// directories may be missing from root's PATH.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds an executable on `PATH` (plus [`SYSTEM_PATH`]).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(SYSTEM_PATH.split(':'))
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}
