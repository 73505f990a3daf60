//! What hibernation shows outside the shim: per-container state files, and the events of its
//! transitions.
//!
//! # State files
//!
//! Each shim keeps one file per container that has hibernation on, at
//! `<root>/hibernate/<namespace>/<id>.json` (`root` is the shim's `Root`, default
//! [`DEFAULT_ROOT`]). The shim writes it on every transition and on every change of the counters
//! ([`write_atomic`]); `runc-architect status` and `runc-architect metrics` read all of them
//! ([`read_all`]), across containerd namespaces, without talking to any shim. A shim removes its
//! container's file at delete ([`remove`]).
//!
//! - The record is JSON ([`ContainerStatus`]) with a schema [`VERSION`]. A reader never guesses:
//!   a file of another version, a file that is not JSON of this shape, or a record whose
//!   counters contradict each other is reported as unreadable ([`Unreadable`]), never misread
//!   and never a panic. Fields added later within one version are ignored by older readers.
//! - Writes are atomic: a temporary file in the same directory (created exclusively, 0600),
//!   written, fsynced, renamed over the old one, then the directory fsynced. A reader sees the
//!   old record or the new one, never a torn one, also with several writers at once (each has
//!   its own temporary file; the last rename wins).
//! - The directories are 0700 and the files 0600: they name containers and their activity.
//! - Times are unix milliseconds (UTC); durations are seconds in histograms and milliseconds in
//!   `last_wake_ms`, sizes are bytes.
//! - Histograms ([`Histogram`]) keep their own bucket bounds, so a reader exposes what the
//!   writer counted even after the default bounds change.
//!
//! The shim's state root also holds libcontainer's state at `<root>/<namespace>/<id>/`, so a
//! containerd namespace named `hibernate` shares the `hibernate` directory with the state
//! files. Readers therefore only take regular `*.json` files one level below a namespace
//! directory and check that the record names the namespace and id of its path.
//!
//! # Events
//!
//! A transition is also published to containerd's event service ([`HibernationEvent`]) under
//! a topic of ours ([`Topic`], `/runc-architect/hibernate/...`). containerd forwards an event of
//! any payload type without decoding it (1.7 and 2.1: the exchange validates namespace, topic
//! and timestamp only), but `ctr events` skips an event whose payload type its binary does not
//! know ("cannot unmarshal an event from Any"): a message type of our own would be invisible
//! there. So the payload is a message `ctr` (and every containerd client) knows and whose
//! shape fits: `containerd.services.containers.v1.Container` with `id` = the container's id and
//! `labels` = the transition ([`HibernationEvent::labels`]). `ctr events` prints it as
//! `{"id":"web","labels":{"at":"...","from":"RUNNING","to":"FROZEN",...}}`. It is never
//! published under one of containerd's own topics, so no consumer that dispatches on topics
//! mistakes it for a container record.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Schema version of [`ContainerStatus`] records written by this code.
pub const VERSION: u32 = 1;

/// The shim's default `Root` (where it keeps libcontainer's state and these files).
pub const DEFAULT_ROOT: &str = "/run/containerd/runc-architect";

/// Directory below the root that holds the state files (one directory per namespace).
pub const STATUS_DIR: &str = "hibernate";

/// Largest state file a reader accepts (a record is a few KiB).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Default bucket bounds (seconds) of the wake latency histogram: a thaw takes well under a
/// millisecond, a restore tens of milliseconds, a cold start after a failed restore seconds.
pub const WAKE_SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Default bucket bounds (seconds) of the checkpoint duration histogram (freeze to durable).
pub const CHECKPOINT_SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Default bucket bounds (seconds) of the restore duration histogram (CRIU restore alone).
pub const RESTORE_SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A container's hibernation state as the outside sees it. `CHECKPOINTING` is internal to the
/// shim and shown as [`State::Frozen`] (the container is frozen while it is dumped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Running,
    Frozen,
    ScaledDown,
    Waking,
}

impl State {
    /// Every state, in the order the metrics list them.
    pub const ALL: [State; 4] = [
        State::Running,
        State::Frozen,
        State::ScaledDown,
        State::Waking,
    ];

    /// `RUNNING`, `FROZEN`, `SCALED_DOWN` or `WAKING`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "RUNNING",
            State::Frozen => "FROZEN",
            State::ScaledDown => "SCALED_DOWN",
            State::Waking => "WAKING",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A histogram as Prometheus exposes one: fixed upper bounds, a count per bucket and the sum
/// of the observed values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Upper bounds (inclusive, `le`) of the buckets, finite and strictly ascending. The
    /// `+Inf` bucket is implied.
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative): `counts[i]` for `bounds[i-1] < v <= bounds[i]`,
    /// and one more entry at the end for values above the last bound. `bounds.len() + 1` long.
    pub counts: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram with these bounds (sorted, non-finite values and duplicates dropped).
    pub fn new(bounds: &[f64]) -> Histogram {
        let mut b: Vec<f64> = bounds.iter().copied().filter(|v| v.is_finite()).collect();
        b.sort_by(f64::total_cmp);
        b.dedup();
        Histogram {
            counts: vec![0; b.len() + 1],
            bounds: b,
            sum: 0.0,
        }
    }

    /// Counts `v`. Negative, NaN and infinite values are not observations and are ignored.
    pub fn observe(&mut self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get_mut(i) {
            *c = c.saturating_add(1);
            self.sum += v;
        }
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    /// `(upper bound, observations in that bucket alone)` for each bound, then
    /// `(+Inf, observations above the last bound)`.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| (self.bounds.get(i).copied().unwrap_or(f64::INFINITY), *c))
            .collect()
    }

    /// The buckets as Prometheus exposes them: `(upper bound, cumulative count)` for each
    /// bound, then `(+Inf, count)`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0u64;
        let mut out = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            acc = acc.saturating_add(*c);
            out.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), acc));
        }
        out
    }

    /// Why this histogram cannot be what a writer produced, if it cannot.
    fn check(&self, name: &str) -> Result<(), String> {
        if self.counts.len() != self.bounds.len() + 1 {
            return Err(format!(
                "histogram {name}: {} counts for {} bounds (want bounds + 1)",
                self.counts.len(),
                self.bounds.len()
            ));
        }
        if self.bounds.iter().any(|b| !b.is_finite())
            || self.bounds.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(format!(
                "histogram {name}: bounds are not finite and strictly ascending"
            ));
        }
        if !self.sum.is_finite() || self.sum < 0.0 {
            return Err(format!(
                "histogram {name}: sum {} is not a duration",
                self.sum
            ));
        }
        Ok(())
    }
}

/// Failures counted since the container started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    /// Checkpoints that failed (the container was thawed and kept running).
    pub checkpoint: u64,
    /// Restores that failed at a wake (a cold start followed).
    pub restore: u64,
}

/// Counters kept for `runc-architect metrics`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Wake latency: from the event that woke the container (a connection, an exec) to
    /// RUNNING again, in seconds; thaws and restores alike.
    pub wake_seconds: Histogram,
    /// Checkpoint duration: from the start of the dump to the images durable in the store.
    pub checkpoint_seconds: Histogram,
    /// Restore duration (CRIU restore, or the cold start after a failed one).
    pub restore_seconds: Histogram,
    /// Bytes of checkpoint images written, over all checkpoints.
    pub checkpoint_written_bytes: u64,
    /// Bytes of checkpoint images read by restores, over all restores.
    pub restore_read_bytes: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            wake_seconds: Histogram::new(WAKE_SECONDS_BUCKETS),
            checkpoint_seconds: Histogram::new(CHECKPOINT_SECONDS_BUCKETS),
            restore_seconds: Histogram::new(RESTORE_SECONDS_BUCKETS),
            checkpoint_written_bytes: 0,
            restore_read_bytes: 0,
        }
    }
}

/// One container's state file (schema [`VERSION`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// Schema version; [`VERSION`] when written by this code.
    pub version: u32,
    pub id: String,
    /// containerd namespace.
    pub namespace: String,
    pub state: State,
    /// When the container entered `state` (unix ms).
    pub since_unix_ms: u64,
    /// Last activity that counted (a connection or payload on a wake port, an exec), unix ms.
    pub last_activity_unix_ms: Option<u64>,
    /// Wakes so far (from FROZEN or SCALED_DOWN back to RUNNING).
    pub wakes: u64,
    /// When the last wake finished (unix ms).
    pub last_wake_unix_ms: Option<u64>,
    /// How long the last wake took, in milliseconds (fractions for sub-millisecond thaws).
    pub last_wake_ms: Option<f64>,
    /// Size of the last checkpoint's images, bytes.
    pub checkpoint_bytes: Option<u64>,
    /// Memory use of the container's cgroup right before the last scale-down, bytes.
    pub memory_before_bytes: Option<u64>,
    /// Memory use of the container's cgroup once the last scale-down had killed its
    /// processes, bytes.
    pub memory_after_bytes: Option<u64>,
    pub failures: Failures,
    pub counters: Counters,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A unix millisecond time as a [`SystemTime`].
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl ContainerStatus {
    /// A fresh record: RUNNING since `now`, nothing counted.
    pub fn new(namespace: &str, id: &str, now: SystemTime) -> ContainerStatus {
        ContainerStatus {
            version: VERSION,
            id: id.to_string(),
            namespace: namespace.to_string(),
            state: State::Running,
            since_unix_ms: unix_ms(now),
            last_activity_unix_ms: None,
            wakes: 0,
            last_wake_unix_ms: None,
            last_wake_ms: None,
            checkpoint_bytes: None,
            memory_before_bytes: None,
            memory_after_bytes: None,
            failures: Failures::default(),
            counters: Counters::default(),
        }
    }

    /// The container entered `state` at `at` (no change when it already was in it).
    pub fn set_state(&mut self, state: State, at: SystemTime) {
        if self.state != state {
            self.state = state;
            self.since_unix_ms = unix_ms(at);
        }
    }

    /// Activity that counts (resets the idle clock) happened at `at`.
    pub fn record_activity(&mut self, at: SystemTime) {
        self.last_activity_unix_ms = Some(unix_ms(at));
    }

    /// A wake finished at `at` after `took`.
    pub fn record_wake(&mut self, took: Duration, at: SystemTime) {
        self.wakes = self.wakes.saturating_add(1);
        self.last_wake_unix_ms = Some(unix_ms(at));
        self.last_wake_ms = Some(took.as_secs_f64() * 1000.0);
        self.counters.wake_seconds.observe(took.as_secs_f64());
    }

    /// A checkpoint of `bytes` finished after `took`; the cgroup used `memory_before` bytes
    /// before and `memory_after` after the processes were killed.
    pub fn record_checkpoint(
        &mut self,
        took: Duration,
        bytes: u64,
        memory_before: Option<u64>,
        memory_after: Option<u64>,
    ) {
        self.checkpoint_bytes = Some(bytes);
        self.memory_before_bytes = memory_before;
        self.memory_after_bytes = memory_after;
        self.counters.checkpoint_seconds.observe(took.as_secs_f64());
        self.counters.checkpoint_written_bytes =
            self.counters.checkpoint_written_bytes.saturating_add(bytes);
    }

    /// A restore that read `bytes` of images finished after `took`.
    pub fn record_restore(&mut self, took: Duration, bytes: u64) {
        self.counters.restore_seconds.observe(took.as_secs_f64());
        self.counters.restore_read_bytes = self.counters.restore_read_bytes.saturating_add(bytes);
    }

    /// A checkpoint failed.
    pub fn record_checkpoint_failure(&mut self) {
        self.failures.checkpoint = self.failures.checkpoint.saturating_add(1);
    }

    /// A restore failed.
    pub fn record_restore_failure(&mut self) {
        self.failures.restore = self.failures.restore.saturating_add(1);
    }

    /// Memory the last scale-down freed (before − after), if both were measured.
    pub fn memory_freed_bytes(&self) -> Option<u64> {
        Some(
            self.memory_before_bytes?
                .saturating_sub(self.memory_after_bytes?),
        )
    }

    /// Why this record cannot be one a writer of this version produced, if it cannot.
    fn check(&self) -> Result<(), String> {
        check_name("namespace", &self.namespace).map_err(|e| e.to_string())?;
        check_name("container id", &self.id).map_err(|e| e.to_string())?;
        if let Some(ms) = self.last_wake_ms {
            if !ms.is_finite() || ms < 0.0 {
                return Err(format!("last_wake_ms {ms} is not a duration"));
            }
        }
        self.counters.wake_seconds.check("wake_seconds")?;
        self.counters
            .checkpoint_seconds
            .check("checkpoint_seconds")?;
        self.counters.restore_seconds.check("restore_seconds")?;
        Ok(())
    }
}

/// Errors of the writer side.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("encode the state of {namespace}/{id}: {source}")]
    Encode {
        namespace: String,
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StatusError + 'a {
    move |source| StatusError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Namespaces and container ids become path components: refuse what is not one name.
/// (containerd's identifiers are stricter; this only keeps paths inside their directory.)
fn check_name(what: &'static str, value: &str) -> Result<(), StatusError> {
    let why = if value.is_empty() {
        Some("empty")
    } else if value.len() > 255 {
        Some("longer than 255 bytes")
    } else if value.starts_with('.') {
        Some("starts with '.'")
    } else if value.contains(['/', '\0']) {
        Some("contains '/' or NUL")
    } else {
        None
    };
    match why {
        Some(why) => Err(StatusError::InvalidName {
            what,
            value: value.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// `<root>/hibernate`.
pub fn status_dir(root: &Path) -> PathBuf {
    root.join(STATUS_DIR)
}

/// `<root>/hibernate/<namespace>/<id>.json`.
pub fn status_path(root: &Path, namespace: &str, id: &str) -> PathBuf {
    status_dir(root).join(namespace).join(format!("{id}.json"))
}

/// Creates `dir` (0700) if missing and makes it 0700 if it is not.
fn ensure_private_dir(dir: &Path) -> Result<(), StatusError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create directory", dir)(e)),
    }
    let meta = fs::metadata(dir).map_err(io_err("stat", dir))?;
    if meta.permissions().mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod 0700", dir))?;
    }
    Ok(())
}

/// Distinguishes the temporary files of concurrent writers within one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `status` to its file below `root`, atomically (see the module docs). Creates the
/// directories as needed (the root too, if missing).
pub fn write_atomic(root: &Path, status: &ContainerStatus) -> Result<(), StatusError> {
    check_name("namespace", &status.namespace)?;
    check_name("container id", &status.id)?;
    let body = serde_json::to_vec_pretty(status).map_err(|source| StatusError::Encode {
        namespace: status.namespace.clone(),
        id: status.id.clone(),
        source,
    })?;
    let path = status_path(root, &status.namespace, &status.id);
    let dir = status_dir(root).join(&status.namespace);
    // A concurrent `remove` of the namespace's last container may take the directory away
    // between creating it and creating the file in it: then create it again.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match write_once(root, &dir, &path, &status.id, &body) {
            Err(StatusError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && attempts < 5 => {}
            other => return other,
        }
    }
}

fn write_once(
    root: &Path,
    dir: &Path,
    path: &Path,
    id: &str,
    body: &[u8],
) -> Result<(), StatusError> {
    if !root.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io_err("create directory", root))?;
    }
    ensure_private_dir(&status_dir(root))?;
    ensure_private_dir(dir)?;
    let tmp = dir.join(format!(
        ".{id}.json.{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(body).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", dir))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Removes the state file of `namespace`/`id` (and temporary files a crashed writer left),
/// then the namespace's directory if it is empty. A missing file is no error.
pub fn remove(root: &Path, namespace: &str, id: &str) -> Result<(), StatusError> {
    check_name("namespace", namespace)?;
    check_name("container id", id)?;
    let dir = status_dir(root).join(namespace);
    let path = status_path(root, namespace, id);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &path)(e)),
    }
    let tmp_prefix = format!(".{id}.json.");
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&tmp_prefix) && name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    // Fails while other containers of the namespace have files: that is fine.
    let _ = fs::remove_dir(&dir);
    Ok(())
}

/// Why a state file was skipped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read: {0}")]
    Io(#[source] io::Error),
    #[error("larger than {MAX_FILE_BYTES} bytes: not a state file")]
    TooLarge,
    #[error("not a runc-architect state file: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("schema version {found}; this runc-architect reads version {VERSION}")]
    Version { found: u64 },
    #[error("inconsistent record: {0}")]
    Invalid(String),
}

/// A file (or directory) below `<root>/hibernate` that could not be read as a state file.
#[derive(Debug)]
pub struct Unreadable {
    pub path: PathBuf,
    pub error: ReadError,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.error)
    }
}

/// What [`read_all`] found.
#[derive(Debug, Default)]
pub struct ReadAll {
    /// The readable records, sorted by namespace, then id.
    pub statuses: Vec<ContainerStatus>,
    /// Files that were skipped, with the reason.
    pub unreadable: Vec<Unreadable>,
}

/// Reads every state file below `root` (all namespaces). Never fails as a whole: a missing
/// root or `hibernate` directory is an empty result, anything unreadable is listed in
/// [`ReadAll::unreadable`] and skipped.
pub fn read_all(root: &Path) -> ReadAll {
    let mut out = ReadAll::default();
    let top = status_dir(root);
    let namespaces = match fs::read_dir(&top) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return out,
        Err(e) => {
            out.unreadable.push(Unreadable {
                path: top,
                error: ReadError::Io(e),
            });
            return out;
        }
    };
    for ns in namespaces {
        let ns = match ns {
            Ok(ns) => ns,
            Err(e) => {
                out.unreadable.push(Unreadable {
                    path: top.clone(),
                    error: ReadError::Io(e),
                });
                continue;
            }
        };
        let ns_name = ns.file_name().to_string_lossy().into_owned();
        if ns_name.starts_with('.') || !ns.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let files = match fs::read_dir(ns.path()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.unreadable.push(Unreadable {
                    path: ns.path(),
                    error: ReadError::Io(e),
                });
                continue;
            }
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            // Temporary files of writers, and what is not ours (libcontainer's directories
            // of a namespace called "hibernate").
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if name.starts_with('.') || !f.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            match read_one(&f.path(), &ns_name, id) {
                Ok(s) => out.statuses.push(s),
                // Removed since the listing: the container was deleted.
                Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => out.unreadable.push(Unreadable {
                    path: f.path(),
                    error,
                }),
            }
        }
    }
    out.statuses
        .sort_by(|a, b| (&a.namespace, &a.id).cmp(&(&b.namespace, &b.id)));
    out.unreadable.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Reads one state file, which must name `namespace`/`id` (its place).
pub fn read_one(path: &Path, namespace: &str, id: &str) -> Result<ContainerStatus, ReadError> {
    let f = File::open(path).map_err(ReadError::Io)?;
    let mut body = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(ReadError::Io)?;
    if body.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    parse(&body, namespace, id)
}

/// Parses a state file's content; see [`read_one`].
fn parse(body: &[u8], namespace: &str, id: &str) -> Result<ContainerStatus, ReadError> {
    // The version first: a record of another version is reported as such, never parsed with
    // this version's meaning.
    #[derive(Deserialize)]
    struct Probe {
        version: serde_json::Value,
    }
    let probe: Probe = serde_json::from_slice(body).map_err(ReadError::Malformed)?;
    match probe.version.as_u64() {
        Some(v) if v == u64::from(VERSION) => {}
        Some(found) => return Err(ReadError::Version { found }),
        None => {
            return Err(ReadError::Invalid(format!(
                "version {} is not a number",
                probe.version
            )))
        }
    }
    let s: ContainerStatus = serde_json::from_slice(body).map_err(ReadError::Malformed)?;
    if s.namespace != namespace || s.id != id {
        return Err(ReadError::Invalid(format!(
            "names {}/{} but is the file of {namespace}/{id}",
            s.namespace, s.id
        )));
    }
    s.check().map_err(ReadError::Invalid)?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Events

/// The topics hibernation publishes to containerd's event service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// RUNNING → FROZEN.
    Frozen,
    /// FROZEN → RUNNING (a wake from FROZEN).
    Thawed,
    /// FROZEN → SCALED_DOWN: the checkpoint is durable and the processes are gone.
    ScaledDown,
    /// SCALED_DOWN → WAKING: a restore started.
    Waking,
    /// WAKING → RUNNING: the restore (or the cold start after a failed one) finished.
    Woken,
    /// A checkpoint failed; the container runs on.
    CheckpointFailed,
    /// A restore failed; a cold start follows.
    RestoreFailed,
}

impl Topic {
    /// Every topic.
    pub const ALL: [Topic; 7] = [
        Topic::Frozen,
        Topic::Thawed,
        Topic::ScaledDown,
        Topic::Waking,
        Topic::Woken,
        Topic::CheckpointFailed,
        Topic::RestoreFailed,
    ];

    /// The topic string, `/runc-architect/hibernate/<name>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Frozen => "/runc-architect/hibernate/frozen",
            Topic::Thawed => "/runc-architect/hibernate/thawed",
            Topic::ScaledDown => "/runc-architect/hibernate/scaled-down",
            Topic::Waking => "/runc-architect/hibernate/waking",
            Topic::Woken => "/runc-architect/hibernate/woken",
            Topic::CheckpointFailed => "/runc-architect/hibernate/checkpoint-failed",
            Topic::RestoreFailed => "/runc-architect/hibernate/restore-failed",
        }
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One hibernation transition, as published to containerd (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct HibernationEvent {
    pub topic: Topic,
    pub container_id: String,
    pub from: State,
    pub to: State,
    pub at: SystemTime,
    /// How long the wake took (thawed, woken).
    pub wake_ms: Option<f64>,
    /// Size of the checkpoint (scaled-down).
    pub checkpoint_bytes: Option<u64>,
    /// Why it failed (checkpoint-failed, restore-failed), or what woke it (waking: e.g.
    /// `connection`, `exec`, `signal`).
    pub reason: Option<String>,
}

/// The payload's message type (see the module docs for why this one).
pub const EVENT_PAYLOAD_TYPE: &str = "containerd.services.containers.v1.Container";

/// Errors building an event's payload.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("build the descriptor of {EVENT_PAYLOAD_TYPE}: {0}")]
    Descriptor(String),
}

impl HibernationEvent {
    /// The transition as the payload's labels: `from`, `to`, `at` (RFC 3339, UTC, ms) and,
    /// when set, `wake_ms`, `checkpoint_bytes`, `reason`.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("from".to_string(), self.from.as_str().to_string());
        m.insert("to".to_string(), self.to.as_str().to_string());
        m.insert("at".to_string(), rfc3339_millis(self.at));
        if let Some(ms) = self.wake_ms {
            m.insert("wake_ms".to_string(), format!("{ms:.3}"));
        }
        if let Some(b) = self.checkpoint_bytes {
            m.insert("checkpoint_bytes".to_string(), b.to_string());
        }
        if let Some(r) = &self.reason {
            m.insert("reason".to_string(), r.clone());
        }
        m
    }

    /// The payload for the shim crate's publisher: a
    /// `containerd.services.containers.v1.Container { id, labels }`.
    pub fn to_protobuf(&self) -> Result<Box<dyn protobuf::MessageDyn>, EventError> {
        let md = payload_descriptor()?;
        let mut msg = md.new_instance();
        let (Some(id), Some(labels)) = (md.field_by_name("id"), md.field_by_name("labels")) else {
            return Err(EventError::Descriptor(
                "fields id and labels missing".into(),
            ));
        };
        id.set_singular_field(&mut *msg, self.container_id.clone().into());
        {
            let mut map = labels.mut_map(&mut *msg);
            for (k, v) in self.labels() {
                map.insert(k.into(), v.into());
            }
        }
        Ok(msg)
    }
}

/// The two fields of containerd's `Container` message we fill, with containerd's field
/// numbers (`id = 1`, `map<string, string> labels = 2`), as a dynamic descriptor: rust-protobuf
/// (the shim crate's protobuf runtime) encodes it like the generated message, and no code
/// generation step is needed for one message.
fn payload_descriptor() -> Result<protobuf::reflect::MessageDescriptor, EventError> {
    static DESCRIPTOR: OnceLock<Result<protobuf::reflect::MessageDescriptor, String>> =
        OnceLock::new();
    DESCRIPTOR
        .get_or_init(build_payload_descriptor)
        .clone()
        .map_err(EventError::Descriptor)
}

fn build_payload_descriptor() -> Result<protobuf::reflect::MessageDescriptor, String> {
    use protobuf::descriptor::field_descriptor_proto::{Label, Type};
    use protobuf::descriptor::{
        DescriptorProto, FieldDescriptorProto, FileDescriptorProto, MessageOptions,
    };

    fn field(name: &str, json: &str, number: i32, ty: Type, label: Label) -> FieldDescriptorProto {
        let mut f = FieldDescriptorProto::new();
        f.set_name(name.into());
        f.set_json_name(json.into());
        f.set_number(number);
        f.set_type(ty);
        f.set_label(label);
        f
    }

    let (package, name) = EVENT_PAYLOAD_TYPE
        .rsplit_once('.')
        .ok_or_else(|| "type name without package".to_string())?;
    let mut entry = DescriptorProto::new();
    entry.set_name("LabelsEntry".into());
    entry.field.push(field(
        "key",
        "key",
        1,
        Type::TYPE_STRING,
        Label::LABEL_OPTIONAL,
    ));
    entry.field.push(field(
        "value",
        "value",
        2,
        Type::TYPE_STRING,
        Label::LABEL_OPTIONAL,
    ));
    let mut opts = MessageOptions::new();
    opts.set_map_entry(true);
    entry.options = Some(opts).into();

    let mut msg = DescriptorProto::new();
    msg.set_name(name.into());
    msg.field.push(field(
        "id",
        "id",
        1,
        Type::TYPE_STRING,
        Label::LABEL_OPTIONAL,
    ));
    let mut labels = field(
        "labels",
        "labels",
        2,
        Type::TYPE_MESSAGE,
        Label::LABEL_REPEATED,
    );
    labels.set_type_name(format!(".{EVENT_PAYLOAD_TYPE}.LabelsEntry"));
    msg.field.push(labels);
    msg.nested_type.push(entry);

    let mut file = FileDescriptorProto::new();
    file.set_name("runc-architect/hibernation-event.proto".into());
    file.set_package(package.into());
    file.set_syntax("proto3".into());
    file.message_type.push(msg);
    let fd =
        protobuf::reflect::FileDescriptor::new_dynamic(file, &[]).map_err(|e| e.to_string())?;
    fd.message_by_package_relative_name(name)
        .ok_or_else(|| format!("message {name} not in its own descriptor"))
}

/// `t` as RFC 3339 in UTC with milliseconds (`2026-12-03T14:30:05.615Z`).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let ms = unix_ms(t);
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, mo, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day): Howard Hinnant's
/// `civil_from_days`. Hand-written because proto has no date crate and needs only this.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    fn sample(ns: &str, id: &str) -> ContainerStatus {
        let t0 = from_unix_ms(1_700_000_000_000);
        let mut s = ContainerStatus::new(ns, id, t0);
        s.record_activity(t0 + Duration::from_secs(1));
        s.set_state(State::Frozen, t0 + Duration::from_secs(3));
        s.set_state(State::ScaledDown, t0 + Duration::from_secs(60));
        s.record_checkpoint(
            Duration::from_millis(420),
            48 << 20,
            Some(300 << 20),
            Some(4 << 20),
        );
        s.record_restore(Duration::from_millis(25), 48 << 20);
        s.record_wake(Duration::from_micros(31_500), t0 + Duration::from_secs(90));
        s.set_state(State::Running, t0 + Duration::from_secs(90));
        s.record_checkpoint_failure();
        s
    }

    #[test]
    fn write_read_round_trip_with_modes() {
        let d = tmp();
        let root = d.path().join("root");
        let a = sample("k8s.io", "web");
        let b = sample("default", "db");
        write_atomic(&root, &a).expect("write a");
        write_atomic(&root, &b).expect("write b");
        let all = read_all(&root);
        assert!(all.unreadable.is_empty(), "{:?}", all.unreadable);
        assert_eq!(
            all.statuses,
            vec![b.clone(), a.clone()],
            "sorted by namespace"
        );
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&status_dir(&root)), 0o700);
        assert_eq!(mode(&status_dir(&root).join("k8s.io")), 0o700);
        assert_eq!(mode(&status_path(&root, "k8s.io", "web")), 0o600);
        // No temporary file is left.
        let names: Vec<String> = fs::read_dir(status_dir(&root).join("k8s.io"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["web.json".to_string()]);
        // A second write replaces the record.
        let mut a2 = a.clone();
        a2.set_state(State::Frozen, SystemTime::now());
        write_atomic(&root, &a2).expect("rewrite");
        assert_eq!(read_all(&root).statuses[1].state, State::Frozen);
    }

    #[test]
    fn a_directory_of_the_wrong_mode_is_made_private() {
        let d = tmp();
        let root = d.path();
        fs::create_dir_all(status_dir(root).join("ns")).expect("mkdir");
        fs::set_permissions(status_dir(root), fs::Permissions::from_mode(0o755)).expect("chmod");
        write_atomic(root, &sample("ns", "c")).expect("write");
        let m = fs::metadata(status_dir(root))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, 0o700);
    }

    #[test]
    fn empty_and_missing_roots() {
        let d = tmp();
        let r = read_all(&d.path().join("nothing-here"));
        assert!(r.statuses.is_empty() && r.unreadable.is_empty());
        let r = read_all(d.path());
        assert!(r.statuses.is_empty() && r.unreadable.is_empty());
    }

    #[test]
    fn serialized_names() {
        let s = sample("ns", "c");
        let v: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&s).expect("encode")).expect("json");
        assert_eq!(v["version"], 1);
        assert_eq!(v["state"], "RUNNING");
        assert_eq!(v["wakes"], 1);
        assert_eq!(v["last_wake_ms"], 31.5);
        assert_eq!(v["checkpoint_bytes"], 48u64 << 20);
        assert_eq!(v["failures"]["checkpoint"], 1);
        assert_eq!(
            serde_json::to_value(State::ScaledDown).expect("state"),
            "SCALED_DOWN"
        );
    }

    #[test]
    fn corrupt_and_foreign_files_are_reported_not_misread() {
        let d = tmp();
        let root = d.path();
        write_atomic(root, &sample("ns", "good")).expect("write");
        let dir = status_dir(root).join("ns");
        let good = fs::read(dir.join("good.json")).expect("read");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", b"\x00\xff not json at all {{{".to_vec()),
            ("empty", Vec::new()),
            ("truncated", good[..good.len() / 2].to_vec()),
            ("array", b"[1,2,3]".to_vec()),
            (
                "v2",
                String::from_utf8_lossy(&good)
                    .replace("\"version\": 1", "\"version\": 2")
                    .into_bytes(),
            ),
            (
                "noversion",
                b"{\"id\":\"noversion\",\"namespace\":\"ns\"}".to_vec(),
            ),
            (
                "strversion",
                b"{\"version\":\"1\",\"id\":\"strversion\"}".to_vec(),
            ),
            // A valid record in the wrong place.
            ("elsewhere", good.clone()),
            (
                "badstate",
                String::from_utf8_lossy(&good)
                    .replace("\"good\"", "\"badstate\"")
                    .replace("\"RUNNING\"", "\"ASLEEP\"")
                    .into_bytes(),
            ),
            (
                "badhist",
                String::from_utf8_lossy(&good)
                    .replace("\"good\"", "\"badhist\"")
                    .replacen("\"counts\": [", "\"counts\": [7,", 1)
                    .into_bytes(),
            ),
        ];
        for (name, body) in &cases {
            fs::write(dir.join(format!("{name}.json")), body).expect("write case");
        }
        // Too large.
        fs::write(
            dir.join("huge.json"),
            vec![b' '; (MAX_FILE_BYTES + 10) as usize],
        )
        .expect("huge");
        // Not ours: a directory (libcontainer state of a namespace "hibernate"), a temp file,
        // a file without .json.
        fs::create_dir_all(dir.join("abc.json")).expect("dir");
        fs::create_dir_all(status_dir(root).join("some-container")).expect("dir");
        fs::write(status_dir(root).join("some-container/state.json"), b"{}").expect("f");
        fs::write(dir.join(".good.json.1.2.tmp"), b"partial").expect("tmp");
        fs::write(dir.join("notes.txt"), b"hello").expect("txt");
        fs::write(status_dir(root).join("stray.json"), b"{}").expect("stray");

        let r = read_all(root);
        assert_eq!(r.statuses.len(), 1, "{:?}", r.statuses);
        assert_eq!(r.statuses[0].id, "good");
        let reported: Vec<String> = r
            .unreadable
            .iter()
            .map(|u| {
                u.path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let mut want: Vec<String> = cases.iter().map(|(n, _)| format!("{n}.json")).collect();
        want.push("huge.json".into());
        // libcontainer's "state.json" of namespace "hibernate" does not name itself: reported.
        want.push("state.json".into());
        want.sort();
        let mut got = reported.clone();
        got.sort();
        assert_eq!(got, want);
        let msg = |n: &str| {
            r.unreadable
                .iter()
                .find(|u| u.path.ends_with(n))
                .map(|u| u.to_string())
                .unwrap_or_default()
        };
        assert!(
            msg("v2.json").contains("schema version 2"),
            "{}",
            msg("v2.json")
        );
        assert!(matches!(
            r.unreadable
                .iter()
                .find(|u| u.path.ends_with("v2.json"))
                .map(|u| &u.error),
            Some(ReadError::Version { found: 2 })
        ));
        assert!(
            msg("elsewhere.json").contains("ns/good"),
            "{}",
            msg("elsewhere.json")
        );
        assert!(
            msg("badhist.json").contains("histogram"),
            "{}",
            msg("badhist.json")
        );
        assert!(msg("huge.json").contains("larger"), "{}", msg("huge.json"));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A tiny deterministic generator: no dependency for this one test.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = serde_json::to_vec(&sample("ns", "c")).expect("encode");
        for round in 0..2000 {
            let mut body = good.clone();
            let n = (next() % 8 + 1) as usize;
            for _ in 0..n {
                let i = (next() as usize) % body.len();
                body[i] = (next() & 0xff) as u8;
            }
            if round % 3 == 0 {
                body.truncate((next() as usize) % body.len());
            }
            let _ = parse(&body, "ns", "c");
        }
    }

    #[test]
    fn names_that_are_not_one_path_component_are_refused() {
        let d = tmp();
        for (ns, id) in [
            ("ns", "../x"),
            ("ns", ""),
            ("..", "c"),
            ("ns", "a/b"),
            ("ns", ".x"),
        ] {
            let s = ContainerStatus::new(ns, id, SystemTime::now());
            assert!(
                matches!(
                    write_atomic(d.path(), &s),
                    Err(StatusError::InvalidName { .. })
                ),
                "{ns}/{id}"
            );
            assert!(remove(d.path(), ns, id).is_err(), "{ns}/{id}");
        }
        assert!(!status_dir(d.path()).exists());
    }

    #[test]
    fn remove_takes_the_file_temps_and_empty_directory() {
        let d = tmp();
        let root = d.path();
        write_atomic(root, &sample("ns", "a")).expect("a");
        write_atomic(root, &sample("ns", "b")).expect("b");
        let dir = status_dir(root).join("ns");
        fs::write(dir.join(".a.json.99.1.tmp"), b"x").expect("tmp");
        remove(root, "ns", "a").expect("remove a");
        assert!(!dir.join("a.json").exists());
        assert!(!dir.join(".a.json.99.1.tmp").exists());
        assert!(dir.join("b.json").exists(), "b stays");
        remove(root, "ns", "a").expect("again: no error");
        remove(root, "ns", "b").expect("remove b");
        assert!(!dir.exists(), "empty namespace directory removed");
        assert!(read_all(root).statuses.is_empty());
    }

    #[test]
    fn concurrent_writers_and_readers_see_whole_records() {
        let d = tmp();
        let root = Arc::new(d.path().to_path_buf());
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        // Four writers of their own container each, two of one shared container, and one that
        // keeps removing and re-creating a container of the same namespace.
        for w in 0..6 {
            let root = root.clone();
            writers.push(std::thread::spawn(move || {
                let id = if w < 4 {
                    format!("c{w}")
                } else {
                    "shared".into()
                };
                let mut s = ContainerStatus::new("ns", &id, SystemTime::now());
                for i in 0..150u64 {
                    s.wakes = i;
                    s.counters.wake_seconds.observe(i as f64 / 1000.0);
                    write_atomic(&root, &s).expect("write");
                }
            }));
        }
        {
            let root = root.clone();
            writers.push(std::thread::spawn(move || {
                for _ in 0..100 {
                    write_atomic(&root, &sample("ns", "flapping")).expect("write");
                    remove(&root, "ns", "flapping").expect("remove");
                }
            }));
        }
        let mut readers = Vec::new();
        for _ in 0..2 {
            let root = root.clone();
            let stop = stop.clone();
            readers.push(std::thread::spawn(move || {
                let mut last = [0u64; 4];
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) || reads == 0 {
                    let r = read_all(&root);
                    assert!(r.unreadable.is_empty(), "torn read: {:?}", r.unreadable);
                    for s in &r.statuses {
                        if let Some(w) =
                            s.id.strip_prefix('c').and_then(|n| n.parse::<usize>().ok())
                        {
                            assert!(s.wakes >= last[w], "{} went back", s.id);
                            last[w] = s.wakes;
                        }
                        if s.id != "flapping" {
                            // Each write observed one more value than its `wakes`.
                            assert_eq!(s.counters.wake_seconds.count(), s.wakes + 1);
                        }
                    }
                    reads += 1;
                }
                reads
            }));
        }
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().expect("reader") > 0);
        }
        let r = read_all(&root);
        assert!(r.unreadable.is_empty());
        let ids: Vec<&str> = r.statuses.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, vec!["c0", "c1", "c2", "c3", "shared"]);
        assert!(r.statuses.iter().all(|s| s.wakes == 149));
        // Nothing but the records is left in the directory.
        let n = fs::read_dir(status_dir(&root).join("ns"))
            .expect("ls")
            .count();
        assert_eq!(n, 5);
    }

    #[test]
    fn histogram_buckets() {
        let mut h = Histogram::new(&[0.1, 0.01, 1.0, f64::NAN, 0.1]);
        assert_eq!(h.bounds, vec![0.01, 0.1, 1.0]);
        for v in [0.005, 0.01, 0.05, 0.5, 2.0, -1.0, f64::INFINITY] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1, 1, 1]);
        assert_eq!(h.count(), 5);
        assert!((h.sum - 2.565).abs() < 1e-9);
        assert_eq!(
            h.cumulative(),
            vec![(0.01, 2), (0.1, 3), (1.0, 4), (f64::INFINITY, 5)]
        );
        assert_eq!(
            h.buckets(),
            vec![(0.01, 2), (0.1, 1), (1.0, 1), (f64::INFINITY, 1)]
        );
        assert!(h.check("h").is_ok());
    }

    #[test]
    fn record_helpers() {
        let s = sample("ns", "c");
        assert_eq!(s.state, State::Running);
        assert_eq!(s.since_unix_ms, 1_700_000_090_000);
        assert_eq!(s.last_activity_unix_ms, Some(1_700_000_001_000));
        assert_eq!(s.wakes, 1);
        assert_eq!(s.last_wake_unix_ms, Some(1_700_000_090_000));
        assert_eq!(s.memory_freed_bytes(), Some(296 << 20));
        assert_eq!(s.counters.checkpoint_written_bytes, 48 << 20);
        assert_eq!(s.counters.restore_read_bytes, 48 << 20);
        assert_eq!(s.counters.restore_seconds.count(), 1);
        assert_eq!(
            s.failures,
            Failures {
                checkpoint: 1,
                restore: 0
            }
        );
    }

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(from_unix_ms(1_700_000_000_123)),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            rfc3339_millis(from_unix_ms(951_782_400_000)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn topics_are_valid_containerd_topics() {
        // containerd: a topic starts with '/', and each component is an identifier
        // (alphanumerics, separated by single '.', '_' or '-').
        for t in Topic::ALL {
            let s = t.as_str();
            assert!(s.starts_with("/runc-architect/hibernate/"), "{s}");
            for comp in s[1..].split('/') {
                assert!(!comp.is_empty());
                assert!(comp.starts_with(|c: char| c.is_ascii_alphanumeric()), "{s}");
                assert!(comp.ends_with(|c: char| c.is_ascii_alphanumeric()), "{s}");
                assert!(
                    comp.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                    "{s}"
                );
            }
        }
    }

    /// containerd's `Container` message, the fields we fill, as prost sees them: proves the
    /// dynamic message encodes with containerd's field numbers and wire types.
    #[derive(Clone, PartialEq, prost::Message)]
    struct ContainerWire {
        #[prost(string, tag = "1")]
        id: String,
        #[prost(map = "string, string", tag = "2")]
        labels: std::collections::HashMap<String, String>,
        #[prost(string, tag = "3")]
        image: String,
    }

    #[test]
    fn event_payload_encodes_as_containerds_container() {
        use prost::Message as _;
        let ev = HibernationEvent {
            topic: Topic::Woken,
            container_id: "web".into(),
            from: State::Waking,
            to: State::Running,
            at: from_unix_ms(1_700_000_000_123),
            wake_ms: Some(12.3456),
            checkpoint_bytes: None,
            reason: Some("connection".into()),
        };
        let msg = ev.to_protobuf().expect("payload");
        assert_eq!(msg.descriptor_dyn().full_name(), EVENT_PAYLOAD_TYPE);
        let bytes = msg.write_to_bytes_dyn().expect("encode");
        let back = ContainerWire::decode(bytes.as_slice()).expect("decode");
        assert_eq!(back.id, "web");
        assert_eq!(back.image, "");
        let want: std::collections::HashMap<String, String> = [
            ("from", "WAKING"),
            ("to", "RUNNING"),
            ("at", "2023-11-14T22:13:20.123Z"),
            ("wake_ms", "12.346"),
            ("reason", "connection"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(back.labels, want);
    }
}
