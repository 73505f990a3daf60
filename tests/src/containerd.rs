//! A private containerd daemon for tests.
//!
//! Everything it writes lives under one temporary directory: root, state, temp, the opt
//! plugin's directory, the gRPC/ttrpc/debug sockets, ctr's FIFOs and the daemon's log. The
//! system's /run/containerd and /var/lib/containerd are never configured. Two things outside
//! that directory are chosen by the shims themselves, not by containerd's config: the stock
//! shim's socket directory (/run/containerd/s, named by a hash of our socket path) and runc's
//! default state root (/run/containerd/runc/<namespace>, and runc-architect's
//! /run/containerd/runc-architect/<namespace>); the harness uses namespaces of its own (unique
//! per daemon) and removes their state and cgroups when it stops.
//!
//! The runc-architect shim is registered by a directory that holds
//! `containerd-shim-runc-architect-v1` (a symlink to the binary under test) placed first on the
//! daemon's PATH, followed by the version's own bin directory (so `io.containerd.runc.v2`
//! resolves to that version's stock shim).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cleanup;
use crate::ctr::Ctr;
use crate::events::EventRecorder;
use crate::paths::{self, Version, ARCHITECT_SHIM_NAME};
use crate::poll::{try_wait_for, wait_for};

/// How long the daemon may take to serve its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// File in the daemon's directory naming the test process that owns it (stale-run cleanup).
const OWNER_FILE: &str = "owner.pid";
/// File in the daemon's directory listing the namespaces used (stale-run cleanup).
const NAMESPACES_FILE: &str = "namespaces";
/// Prefix of the daemons' directories in the temp directory.
const DIR_PREFIX: &str = "ra-containerd-";

/// Default state roots of the shims, keyed by namespace below them: runc's under the stock
/// shim, and runc-architect's own.
const SHIM_STATE_ROOTS: &[&str] = &["/run/containerd/runc", "/run/containerd/runc-architect"];

/// Options for [`Containerd::start`].
#[derive(Clone, Debug)]
pub struct ContainerdOptions {
    pub version: Version,
    /// The binary containerd runs for `io.containerd.runc-architect.v1`.
    pub architect_shim: PathBuf,
    /// containerd's log level ("info" unless `RA_CONTAINERD_LOG_LEVEL` says otherwise).
    pub log_level: String,
}

impl ContainerdOptions {
    /// Options for `version` with the shim found by [`paths::architect_shim`].
    pub fn new(version: Version) -> Result<Self> {
        Ok(ContainerdOptions {
            version,
            architect_shim: paths::architect_shim(version)?,
            log_level: std::env::var("RA_CONTAINERD_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
        })
    }
}

/// A running private containerd. Stopped and cleaned up on drop.
pub struct Containerd {
    version: Version,
    dir: PathBuf,
    address: PathBuf,
    architect_shim: PathBuf,
    child: Option<Child>,
    namespaces: Mutex<BTreeSet<String>>,
    events: Option<EventRecorder>,
    unique: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Containerd {
    /// Starts `version` with the runc-architect shim found by [`paths::architect_shim`].
    pub fn start(version: Version) -> Result<Containerd> {
        Containerd::start_with(ContainerdOptions::new(version)?)
    }

    /// Starts a daemon, waits until it serves, and starts its event recorder.
    pub fn start_with(opts: ContainerdOptions) -> Result<Containerd> {
        let version = opts.version;
        version.check_installed()?;
        if !paths::is_executable(&opts.architect_shim) {
            bail!(
                "shim binary {} is not executable",
                opts.architect_shim.display()
            );
        }
        reap_stale_dirs();

        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let unique = format!("{}-{}-{}", version.tag(), std::process::id(), seq);
        let dir = temp_base().join(format!("{DIR_PREFIX}{unique}"));
        if dir.exists() {
            cleanup::remove_tree(&dir);
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())?;
        for d in ["root", "state", "tmp", "opt", "bin", "fifo"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        // Register the shim under test by name.
        std::os::unix::fs::symlink(
            &opts.architect_shim,
            dir.join("bin").join(ARCHITECT_SHIM_NAME),
        )
        .context("link the shim binary")?;

        let address = dir.join("containerd.sock");
        let config = config_toml(version, &dir, &address, &opts.log_level);
        std::fs::write(dir.join("config.toml"), &config)?;

        let log = File::create(dir.join("containerd.log"))?;
        let mut cmd = Command::new(version.containerd_bin());
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .env_clear()
            .env("PATH", daemon_path(version, &dir))
            .env("HOME", "/root")
            .env("TMPDIR", dir.join("tmp"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // The shim's CRIU log level (see the shim's checkpoint module), for a look at
        // CRIU's own timestamps when a run is investigated.
        if let Some(level) = std::env::var_os("RA_CRIU_LOG_LEVEL") {
            cmd.env("RA_CRIU_LOG_LEVEL", level);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", version.containerd_bin().display()))?;
        std::fs::write(dir.join("containerd.pid"), child.id().to_string())?;

        let mut me = Containerd {
            version,
            dir,
            address,
            architect_shim: opts.architect_shim,
            child: Some(child),
            namespaces: Mutex::new(BTreeSet::new()),
            events: None,
            unique,
        };
        me.wait_serving()?;
        me.events = Some(EventRecorder::start(&me)?);
        Ok(me)
    }

    fn wait_serving(&mut self) -> Result<()> {
        let ctr_bin = self.version.ctr_bin();
        let address = self.address.clone();
        let child = self.child.as_mut().expect("child");
        let res = try_wait_for("containerd to serve its socket", START_TIMEOUT, || {
            if let Some(st) = child.try_wait()? {
                bail!("containerd exited during start-up ({st})");
            }
            if !address.exists() {
                return Ok(None);
            }
            Ok(ctr_answers(&ctr_bin, &address)?.then_some(()))
        });
        if let Err(e) = res {
            bail!("{e}\n--- containerd log (tail) ---\n{}", self.log_tail(40));
        }
        Ok(())
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The daemon's private directory (everything it writes is below it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The ttrpc socket (shims publish events to it).
    pub fn ttrpc_address(&self) -> PathBuf {
        PathBuf::from(format!("{}.ttrpc", self.address.display()))
    }

    /// The shim binary registered as `io.containerd.runc-architect.v1`.
    pub fn architect_shim(&self) -> &Path {
        &self.architect_shim
    }

    /// A string unique to this daemon (version, test process, sequence), for names.
    pub fn unique(&self) -> &str {
        &self.unique
    }

    /// Directory for ctr's FIFOs.
    pub fn fifo_dir(&self) -> PathBuf {
        self.dir.join("fifo")
    }

    /// A scratch directory below the daemon's directory (created).
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.join("scratch").join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// A `ctr` bound to this daemon and `namespace`. The namespace is remembered for cleanup.
    pub fn ctr(&self, namespace: &str) -> Ctr {
        self.note_namespace(namespace);
        Ctr::new(
            self.version.ctr_bin(),
            self.address.clone(),
            namespace.to_string(),
            self.fifo_dir(),
        )
    }

    fn note_namespace(&self, ns: &str) {
        let mut set = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        if set.insert(ns.to_string()) {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(NAMESPACES_FILE))
            {
                let _ = writeln!(f, "{ns}");
            }
        }
    }

    /// The event recorder (`ctr events` since the daemon started).
    pub fn events(&self) -> &EventRecorder {
        self.events.as_ref().expect("event recorder")
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the daemon and removes everything it and its shims left (also done on drop).
    pub fn stop(&mut self) {
        if let Some(ev) = self.events.take() {
            drop(ev);
        }
        let namespaces: Vec<String> = self
            .namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        // Gracefully first: kill and delete every task and container the tests left, so the
        // shims exit and clean up after themselves.
        if self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        {
            for ns in &namespaces {
                let ctr = Ctr::new(
                    self.version.ctr_bin(),
                    self.address.clone(),
                    ns.clone(),
                    self.fifo_dir(),
                )
                .with_timeout(Duration::from_secs(20));
                ctr.remove_all();
            }
        }
        if let Some(mut child) = self.child.take() {
            stop_process(child.id() as i32, Duration::from_secs(10));
            let _ = child.wait();
        }
        cleanup_dir(&self.dir, &namespaces);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the daemon at `address` answers `ctr version`.
pub fn ctr_answers(ctr_bin: &Path, address: &Path) -> std::io::Result<bool> {
    Ok(Command::new(ctr_bin)
        .arg("-a")
        .arg(address)
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success())
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
fn stop_process(pid: i32, grace: Duration) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if wait_for("process to exit", grace, || {
        (!cleanup::is_alive(pid)).then_some(())
    })
    .is_err()
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Hard cleanup of a daemon directory: shims, container processes, cgroups, runc state,
/// shim sockets, mounts, files.
fn cleanup_dir(dir: &Path, namespaces: &[String]) {
    let address = dir.join("containerd.sock");
    let address_s = address.display().to_string();
    // Shim sockets live outside our directory; their bundles name them.
    let sockets = shim_sockets(&dir.join("state"));
    // Shims are started with `-address <our socket>`; anything else that names our directory
    // (a leftover ctr, a daemon) goes too.
    let mut pids = cleanup::processes_with_arg(&address_s);
    pids.extend(cleanup::processes_with_arg(&format!("{}/", dir.display())));
    pids.sort_unstable();
    pids.dedup();
    cleanup::kill_and_wait(&pids);
    for ns in namespaces {
        cleanup::remove_cgroup_tree(ns);
        // The shims' default state roots (see the module docs).
        for root in SHIM_STATE_ROOTS {
            let state = Path::new(root).join(ns);
            if state.is_dir() {
                let _ = std::fs::remove_dir_all(&state);
            }
        }
    }
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    cleanup::remove_tree(dir);
}

/// Socket paths named by `address` files in the bundles below `state`.
fn shim_sockets(state: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let task_dir = state.join("io.containerd.runtime.v2.task");
    let Ok(nss) = std::fs::read_dir(&task_dir) else {
        return out;
    };
    for ns in nss.flatten() {
        let Ok(ids) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for id in ids.flatten() {
            if let Ok(a) = std::fs::read_to_string(id.path().join("address")) {
                let a = a.trim();
                if let Some(p) = a.strip_prefix("unix://") {
                    if p.starts_with("/run/containerd/s/") {
                        out.push(PathBuf::from(p));
                    }
                }
            }
        }
    }
    out
}

/// Where daemon directories go: `$RA_TMPDIR`, else the system temp dir.
pub fn temp_base() -> PathBuf {
    match std::env::var_os("RA_TMPDIR") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => std::env::temp_dir(),
    }
}

/// Cleans up directories of earlier test runs whose process is gone (a run killed before its
/// drop handlers ran).
pub fn reap_stale_dirs() {
    let base = temp_base();
    let Ok(rd) = std::fs::read_dir(&base) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = e.path();
        // The owner's pid is part of the name (`TAG-PID-SEQ`), so a directory that another
        // thread has just created, before its owner file is written, is never taken for a
        // stale one (its daemon would be killed during its start-up).
        let from_name: Option<i32> = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').nth(1))
            .and_then(|p| p.parse().ok());
        let owner: Option<i32> = from_name.or_else(|| {
            std::fs::read_to_string(dir.join(OWNER_FILE))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        if owner.is_some_and(|p| p == std::process::id() as i32 || cleanup::is_alive(p)) {
            continue;
        }
        let namespaces: Vec<String> = std::fs::read_to_string(dir.join(NAMESPACES_FILE))
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if let Some(pid) = std::fs::read_to_string(dir.join("containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if cleanup::is_alive(pid) {
                stop_process(pid, Duration::from_secs(5));
            }
        }
        cleanup_dir(&dir, &namespaces);
    }
}

/// The daemon's PATH: the shim-under-test directory, the version's own binaries, the system.
fn daemon_path(version: Version, dir: &Path) -> String {
    format!(
        "{}:{}:{}",
        dir.join("bin").display(),
        version.bin_dir().display(),
        paths::SYSTEM_PATH
    )
}

/// A minimal private configuration: own root/state/temp/sockets, the CRI and NRI plugins off
/// (they would touch system paths and are not what these tests drive).
pub fn config_toml(version: Version, dir: &Path, address: &Path, log_level: &str) -> String {
    let q = |p: &Path| toml_string(&p.display().to_string());
    let (schema, disabled) = match version {
        Version::V1_7 => (
            2,
            r#"["io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri"]"#,
        ),
        Version::V2_1 => (
            3,
            r#"["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]"#,
        ),
    };
    let temp_line = match version {
        Version::V1_7 => String::new(),
        Version::V2_1 => format!("temp = {}\n", q(&dir.join("tmp"))),
    };
    format!(
        r#"# Generated by runc-architect-tests: a private containerd {series}.
version = {schema}
root = {root}
state = {state}
{temp_line}disabled_plugins = {disabled}

[grpc]
  address = {grpc}

[ttrpc]
  address = {ttrpc}

[debug]
  address = {debug}
  level = {level}

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}
"#,
        series = version.series(),
        root = q(&dir.join("root")),
        state = q(&dir.join("state")),
        grpc = q(address),
        ttrpc = toml_string(&format!("{}.ttrpc", address.display())),
        debug = q(&dir.join("debug.sock")),
        level = toml_string(log_level),
        opt = q(&dir.join("opt")),
    )
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
