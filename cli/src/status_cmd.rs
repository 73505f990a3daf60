//! `runc-architect status`: the hibernation state of every container that has it on.
//!
//! Reads the state files the shims keep below their `Root` (`<root>/hibernate/<namespace>/
//! <id>.json`, see `runc_architect_proto::status`), across all containerd namespaces, without
//! talking to containerd or a shim: it works while a container sleeps and its shim is idle.
//! A file that cannot be read is named in a warning on stderr and skipped; the others are
//! still shown and the exit status stays 0.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use clap::Args;
use runc_architect_proto::status::{self, from_unix_ms, rfc3339_millis, ContainerStatus};
use serde::Serialize;

const STATUS_HELP: &str = "\
STATES:
  RUNNING      running as usual (also while it is being woken from FROZEN: sub-millisecond)
  FROZEN       idle, its cgroup frozen; the next connection thaws it (also shown while its
               checkpoint is being written)
  SCALED_DOWN  checkpointed into the store, its processes gone and its memory freed; the next
               connection or exec restores it
  WAKING       being restored

COLUMNS: SINCE and LAST ACTIVITY are ages (how long ago); LAST WAKE is how long ago the last
wake finished and, in parentheses, how long it took; CHECKPOINT is the size of the last
checkpoint.

--json prints an array of objects with the keys id, namespace, state, since (RFC 3339),
since_unix_ms, last_activity, last_activity_unix_ms, wakes, last_wake, last_wake_unix_ms,
last_wake_ms (duration of the last wake in milliseconds), checkpoint_bytes,
memory_before_bytes, memory_after_bytes, checkpoint_failures, restore_failures (absent
values are null).

EXIT STATUS: 0, also when some state file could not be read (named on stderr).";

/// Arguments of `runc-architect status`.
#[derive(Args, Debug)]
#[command(after_long_help = STATUS_HELP)]
pub struct StatusArgs {
    /// The shims' state root (their `Root` option).
    #[arg(long, value_name = "DIR", default_value = status::DEFAULT_ROOT)]
    root: PathBuf,
    /// Print JSON (an array of objects) instead of a table.
    #[arg(long)]
    json: bool,
}

/// One container as `--json` prints it.
#[derive(Serialize, Debug, PartialEq)]
pub struct StatusView {
    pub id: String,
    pub namespace: String,
    pub state: String,
    pub since: String,
    pub since_unix_ms: u64,
    pub last_activity: Option<String>,
    pub last_activity_unix_ms: Option<u64>,
    pub wakes: u64,
    pub last_wake: Option<String>,
    pub last_wake_unix_ms: Option<u64>,
    /// Duration of the last wake, milliseconds.
    pub last_wake_ms: Option<f64>,
    pub checkpoint_bytes: Option<u64>,
    pub memory_before_bytes: Option<u64>,
    pub memory_after_bytes: Option<u64>,
    pub checkpoint_failures: u64,
    pub restore_failures: u64,
}

impl From<&ContainerStatus> for StatusView {
    fn from(s: &ContainerStatus) -> Self {
        let time = |ms: u64| rfc3339_millis(from_unix_ms(ms));
        StatusView {
            id: s.id.clone(),
            namespace: s.namespace.clone(),
            state: s.state.as_str().to_string(),
            since: time(s.since_unix_ms),
            since_unix_ms: s.since_unix_ms,
            last_activity: s.last_activity_unix_ms.map(time),
            last_activity_unix_ms: s.last_activity_unix_ms,
            wakes: s.wakes,
            last_wake: s.last_wake_unix_ms.map(time),
            last_wake_unix_ms: s.last_wake_unix_ms,
            last_wake_ms: s.last_wake_ms,
            checkpoint_bytes: s.checkpoint_bytes,
            memory_before_bytes: s.memory_before_bytes,
            memory_after_bytes: s.memory_after_bytes,
            checkpoint_failures: s.failures.checkpoint,
            restore_failures: s.failures.restore,
        }
    }
}

pub fn run(args: StatusArgs) -> Result<i32> {
    let found = status::read_all(&args.root);
    for u in &found.unreadable {
        eprintln!("runc-architect: warning: skipped {u}");
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let views: Vec<StatusView> = found.statuses.iter().map(StatusView::from).collect();
        serde_json::to_writer_pretty(&mut out, &views)?;
        writeln!(out)?;
    } else {
        out.write_all(table(&found.statuses, SystemTime::now()).as_bytes())?;
    }
    out.flush()?;
    Ok(0)
}

const HEADER: [&str; 8] = [
    "ID",
    "NAMESPACE",
    "STATE",
    "SINCE",
    "LAST ACTIVITY",
    "WAKES",
    "LAST WAKE",
    "CHECKPOINT",
];

/// The table: a header, then one row per container, columns padded to their widest cell.
pub fn table(statuses: &[ContainerStatus], now: SystemTime) -> String {
    let mut rows: Vec<[String; 8]> = vec![HEADER.map(String::from)];
    for s in statuses {
        let ago = |ms: u64| format!("{} ago", age(now, from_unix_ms(ms)));
        rows.push([
            s.id.clone(),
            s.namespace.clone(),
            s.state.as_str().to_string(),
            ago(s.since_unix_ms),
            s.last_activity_unix_ms
                .map(ago)
                .unwrap_or_else(|| "-".into()),
            s.wakes.to_string(),
            match (s.last_wake_unix_ms, s.last_wake_ms) {
                (Some(at), Some(took)) => format!("{} ({})", ago(at), millis(took)),
                (Some(at), None) => ago(at),
                (None, Some(took)) => millis(took),
                (None, None) => "-".into(),
            },
            s.checkpoint_bytes.map(bytes).unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// How long before `now` `then` was, kubectl style: `45s`, `3m12s`, `5h4m`, `2d3h` (a time in
/// the future, from a clock step, is `0s`).
pub fn age(now: SystemTime, then: SystemTime) -> String {
    let s = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A duration in milliseconds: `0.42ms`, `12.3ms`, `1.25s`.
pub fn millis(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

/// A size in binary units: `512B`, `4.0KiB`, `48.0MiB`, `1.50GiB`.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if v < 100.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.0}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runc_architect_proto::status::State;

    #[test]
    fn ages() {
        let t = from_unix_ms(1_000_000_000_000);
        let at = |s: u64| age(t + Duration::from_secs(s), t);
        assert_eq!(at(0), "0s");
        assert_eq!(at(59), "59s");
        assert_eq!(at(192), "3m12s");
        assert_eq!(at(5 * 3600 + 4 * 60 + 7), "5h4m");
        assert_eq!(at(2 * 86_400 + 3 * 3600), "2d3h");
        assert_eq!(age(t, t + Duration::from_secs(5)), "0s");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(4096), "4.0KiB");
        assert_eq!(bytes(48 << 20), "48.0MiB");
        assert_eq!(bytes(300 << 20), "300MiB");
        assert_eq!(bytes(3 << 30), "3.0GiB");
        assert_eq!(millis(0.42), "0.42ms");
        assert_eq!(millis(12.34), "12.3ms");
        assert_eq!(millis(1250.0), "1.25s");
    }

    #[test]
    fn table_rows_and_placeholders() {
        let t0 = from_unix_ms(1_700_000_000_000);
        let mut a = ContainerStatus::new("k8s.io", "web", t0);
        a.set_state(State::ScaledDown, t0 + Duration::from_secs(60));
        a.record_checkpoint(Duration::from_millis(400), 48 << 20, None, None);
        a.record_wake(Duration::from_micros(12_340), t0 + Duration::from_secs(30));
        a.record_activity(t0 + Duration::from_secs(10));
        let b = ContainerStatus::new("default", "db", t0);
        let now = t0 + Duration::from_secs(120);
        let t = table(&[a, b], now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        let cols = |l: &str| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(cols(lines[0]), HEADER.map(String::from).to_vec());
        assert_eq!(
            cols(lines[1]),
            [
                "web",
                "k8s.io",
                "SCALED_DOWN",
                "1m0s ago",
                "1m50s ago",
                "1",
                "1m30s ago (12.3ms)",
                "48.0MiB"
            ]
        );
        assert_eq!(
            cols(lines[2]),
            ["db", "default", "RUNNING", "2m0s ago", "-", "0", "-", "-"]
        );
        // Columns line up: every row has STATE at the same offset.
        let off = lines[0].find("STATE").expect("STATE");
        assert_eq!(lines[1].find("SCALED_DOWN"), Some(off));
        assert_eq!(lines[2].find("RUNNING"), Some(off));
        // Empty: the header alone.
        assert_eq!(table(&[], now).lines().count(), 1);
    }
}
