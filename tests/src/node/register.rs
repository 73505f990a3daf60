//! Registering runc-architect with the node's containerd the way a user does: by running
//! `runc-architect install` on the node's config.toml.
//!
//! The CLI binary is `$RA_CLI_BINARY`, else the first `runc-architect` in `$CARGO_TARGET_DIR`
//! or the workspace's `target/` (`release/` before `debug/`; built by `cargo build -p
//! runc-architect-cli`). There is no other way: a broken installer or a broken file in
//! `RuntimeClass/` (the installer merges those) fails every test that needs a node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::layout::Layout;
use crate::paths::{self, Version, ARCHITECT_RUNTIME, STOCK_RUNTIME};
use crate::process;

/// The CRI runtime handler runc-architect is registered under (the installer's default).
pub const ARCHITECT_HANDLER: &str = "runc-architect";
/// The CLI's binary name.
pub const CLI_NAME: &str = "runc-architect";
/// The annotations the handler passes to the shim (what the installer writes too).
pub const ANNOTATION_PATTERN: &str = "runc-architect.io/*";

/// A value of the handler's `options` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionValue {
    Bool(bool),
    Int(i64),
    Str(String),
}

impl OptionValue {
    /// The value as given to `runc-architect install --option KEY=VALUE`.
    pub fn to_arg(&self) -> String {
        match self {
            OptionValue::Bool(b) => b.to_string(),
            OptionValue::Int(i) => i.to_string(),
            OptionValue::Str(s) => s.clone(),
        }
    }
}

impl From<bool> for OptionValue {
    fn from(b: bool) -> Self {
        OptionValue::Bool(b)
    }
}
impl From<i64> for OptionValue {
    fn from(i: i64) -> Self {
        OptionValue::Int(i)
    }
}
impl From<&str> for OptionValue {
    fn from(s: &str) -> Self {
        OptionValue::Str(s.to_string())
    }
}
impl From<String> for OptionValue {
    fn from(s: String) -> Self {
        OptionValue::Str(s)
    }
}
impl From<&Path> for OptionValue {
    fn from(p: &Path) -> Self {
        OptionValue::Str(p.display().to_string())
    }
}

/// How runc-architect is registered as the CRI handler [`ARCHITECT_HANDLER`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// Our own runtime type (`io.containerd.runc-architect.v1`): CRI sends the `options`
    /// table to the shim as TOML.
    Own {
        options: BTreeMap<String, OptionValue>,
    },
    /// `runtime_type = "io.containerd.runc.v2"` with `runtime_path` = our shim: CRI sends
    /// runc's options (and runc's checkpoint options).
    AsRunc {
        options: BTreeMap<String, OptionValue>,
    },
}

impl Default for Registration {
    fn default() -> Self {
        Registration::own()
    }
}

impl Registration {
    pub fn own() -> Registration {
        Registration::Own {
            options: BTreeMap::new(),
        }
    }

    pub fn as_runc() -> Registration {
        Registration::AsRunc {
            options: BTreeMap::new(),
        }
    }

    /// The same registration with option `key` set.
    pub fn option(mut self, key: &str, value: impl Into<OptionValue>) -> Registration {
        match &mut self {
            Registration::Own { options } | Registration::AsRunc { options } => {
                options.insert(key.to_string(), value.into());
            }
        }
        self
    }

    pub fn options(&self) -> &BTreeMap<String, OptionValue> {
        match self {
            Registration::Own { options } | Registration::AsRunc { options } => options,
        }
    }

    /// The handler's `runtime_type`.
    pub fn runtime_type(&self) -> &'static str {
        match self {
            Registration::Own { .. } => ARCHITECT_RUNTIME,
            Registration::AsRunc { .. } => STOCK_RUNTIME,
        }
    }
}

/// Who wrote the handler into config.toml: the installer at this path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisteredBy {
    /// `runc-architect install` (this binary).
    Installer(PathBuf),
}

/// The `runc-architect` CLI binaries that exist, in the order of the module docs.
pub fn cli_candidates() -> Result<Vec<PathBuf>> {
    if let Some(v) = std::env::var_os("RA_CLI_BINARY").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if !paths::is_executable(&p) {
            bail!("RA_CLI_BINARY={} is not an executable file", p.display());
        }
        return Ok(vec![p]);
    }
    let mut target_dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        target_dirs.push(PathBuf::from(t));
    }
    target_dirs.push(paths::workspace_root().join("target"));
    let mut out = Vec::new();
    for profile in ["release", "debug"] {
        for t in &target_dirs {
            let p = t.join(profile).join(CLI_NAME);
            if paths::is_executable(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The first CLI binary with the `install` command (a stale build may predate it).
pub fn installer() -> Result<PathBuf> {
    let candidates = cli_candidates()?;
    candidates
        .iter()
        .find(|cli| has_install(cli))
        .cloned()
        .with_context(|| {
            format!(
                "no `runc-architect install` found (tried {candidates:?}): build it with \
                 `cargo build --release -p runc-architect-cli` or set RA_CLI_BINARY"
            )
        })
}

/// Whether `cli` has the `install` command.
fn has_install(cli: &Path) -> bool {
    let mut cmd = Command::new(cli);
    cmd.args(["install", "--help"]);
    process::run(cmd, None, Duration::from_secs(20)).is_ok_and(|o| o.success())
}

/// Registers runc-architect in the node's config.toml with the installer.
pub fn register(
    version: Version,
    layout: &Layout,
    shim: &Path,
    registration: &Registration,
) -> Result<RegisteredBy> {
    let cli = installer()?;
    run_installer(&cli, version, layout, shim, registration)?;
    Ok(RegisteredBy::Installer(cli))
}

/// `runc-architect install --config <node>/config.toml --bin-dir <node>/bin --shim SHIM
/// --containerd <containerd> [--as-runc] [--option KEY=VALUE]...`.
fn run_installer(
    cli: &Path,
    version: Version,
    layout: &Layout,
    shim: &Path,
    registration: &Registration,
) -> Result<()> {
    let mut cmd = Command::new(cli);
    cmd.arg("install")
        .arg("--config")
        .arg(layout.config())
        .arg("--bin-dir")
        .arg(layout.bin())
        .arg("--shim")
        .arg(shim)
        .arg("--containerd")
        .arg(version.containerd_bin())
        .env("PATH", process::host_path());
    if matches!(registration, Registration::AsRunc { .. }) {
        cmd.arg("--as-runc");
    }
    for (k, v) in registration.options() {
        cmd.arg("--option").arg(format!("{k}={}", v.to_arg()));
    }
    process::run(cmd, None, Duration::from_secs(120))?
        .ok()
        .context("runc-architect install")?;
    Ok(())
}
