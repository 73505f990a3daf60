//! Helpers shared by the scenarios.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use runc_architect_tests::events::Event;
use runc_architect_tests::poll::wait_for;
use runc_architect_tests::Output;
use serde_json::{json, Value};

/// How long a scenario waits for something it expects to happen.
pub const WAIT: Duration = Duration::from_secs(30);

/// `["sh", "-c", script]`.
pub fn sh(script: &str) -> [&str; 3] {
    ["sh", "-c", script]
}

/// Waits until `path` exists on the host (a container signals readiness through a bind mount).
pub fn wait_file(path: &Path) -> Result<()> {
    wait_for(&format!("{} to appear", path.display()), WAIT, || {
        path.exists().then_some(())
    })
}

/// Waits until the file at `path` contains `needle`.
pub fn wait_file_contains(path: &Path, needle: &str) -> Result<String> {
    wait_for(
        &format!("{} to contain {needle:?}", path.display()),
        WAIT,
        || {
            std::fs::read_to_string(path)
                .ok()
                .filter(|s| s.contains(needle))
        },
    )
}

/// The mounts of a /proc/self/mountinfo text as `mount point | fs type | mount options |
/// super options`, without ids, device numbers, sources and path-bearing super options
/// (overlay's lowerdir/upperdir/workdir name snapshot directories that differ run to run).
pub fn mountinfo_summary(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let mount_point = pre.get(4)?;
            let opts = pre.get(5)?;
            let fstype = post.first()?;
            let super_opts = post.get(2).copied().unwrap_or("");
            let super_opts: Vec<&str> = super_opts
                .split(',')
                .filter(|o| {
                    !(o.starts_with("lowerdir=")
                        || o.starts_with("upperdir=")
                        || o.starts_with("workdir="))
                })
                .collect();
            Some(format!(
                "{mount_point} | {fstype} | {opts} | {}",
                super_opts.join(",")
            ))
        })
        .collect()
}

/// Topics of `events`, in order.
pub fn topics(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.topic.clone()).collect()
}

/// The user-visible, run-independent part of events: topic, exec id, exit status.
pub fn event_summary(events: &[Event]) -> Value {
    Value::Array(
        events
            .iter()
            .map(|e| {
                let mut v = json!({ "topic": e.topic });
                if let Some(x) = e.str_field("exec_id") {
                    v["exec_id"] = json!(x);
                }
                if e.topic == "/tasks/exit" || e.topic == "/tasks/delete" {
                    v["exit_status"] = json!(e.u64_field("exit_status"));
                    if let Some(id) = e.str_field("id") {
                        v["id"] = json!(id);
                    }
                }
                v
            })
            .collect(),
    )
}

/// Facts about a failure message that must hold for both runtimes, without comparing
/// runtime-specific wording: ctr's exit code, whether the message names `names`, mentions
/// "not found"/"no such file", and the error class ctr printed last (`: unknown`,
/// `: not found`, `: failed precondition`, ...).
pub fn failure_facts(out: &Output, names: &[&str]) -> Value {
    let err = out.stderr_str();
    let lower = err.to_lowercase();
    let mut m = serde_json::Map::new();
    m.insert("code".into(), json!(out.code));
    m.insert("stdout".into(), json!(out.stdout_str()));
    m.insert("stderr_empty".into(), json!(err.trim().is_empty()));
    for n in names {
        m.insert(format!("mentions {n:?}"), json!(err.contains(n)));
    }
    m.insert(
        "says not found".into(),
        json!(lower.contains("not found") || lower.contains("no such file")),
    );
    m.insert("error class".into(), json!(error_class(&err)));
    Value::Object(m)
}

/// The errdefs class ctr appends to gRPC errors (the text after the last ": ").
pub fn error_class(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("ctr: ") || l.contains("level=fatal"))
        .unwrap_or("")
        .trim()
        .trim_end_matches('"');
    const CLASSES: &[&str] = &[
        "unknown",
        "not found",
        "already exists",
        "failed precondition",
        "invalid argument",
        "unavailable",
        "not implemented",
        "deadline exceeded",
        "canceled",
        "aborted",
        "permission denied",
        "resource exhausted",
        "out of range",
        "internal",
        "unauthenticated",
    ];
    CLASSES
        .iter()
        .find(|c| line.ends_with(&format!(": {c}")))
        .map(|c| c.to_string())
        .unwrap_or_else(|| "(none)".into())
}

/// `ctr tasks ps` without pids: the number of processes and whether `init_pid` is listed.
pub fn ps_facts(out: &Output, init_pid: u32) -> Value {
    let text = out.stdout_str();
    let mut lines = text.lines();
    let header = lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let pids: Vec<u32> = lines
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    json!({
        "code": out.code,
        "header": header,
        "count": pids.len(),
        "lists init": pids.contains(&init_pid),
        "stderr": out.stderr_str(),
    })
}

/// The structure of a JSON value: objects keep their keys, strings and bools become their
/// type name, numbers are left out. (ctr prints metrics with Go's `omitempty`: a counter that
/// happens to be 0 is absent, so which numeric fields show depends on the moment. Numbers that
/// matter are checked for plausibility instead.)
pub fn json_shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, x)| !x.is_number())
                .map(|(k, x)| (k.clone(), json_shape(x)))
                .collect(),
        ),
        Value::Array(a) => {
            // Per-cpu arrays and the like: the element shapes, not the length.
            let mut shapes: Vec<Value> = a
                .iter()
                .map(|x| {
                    if x.is_number() {
                        json!("number")
                    } else {
                        json_shape(x)
                    }
                })
                .collect();
            shapes.dedup();
            Value::Array(shapes)
        }
        Value::Null => json!("null"),
        Value::Bool(_) => json!("bool"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
    }
}

/// Reads a number at a JSON pointer, for plausibility checks.
pub fn num_at(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

/// Normalizes terminal output: CRLF to LF.
pub fn crlf(s: &str) -> String {
    s.replace("\r\n", "\n")
}

/// A host directory for a bind mount, with `files` written into it.
pub fn host_dir(base: &Path, name: &str, files: &[(&str, &str)]) -> Result<std::path::PathBuf> {
    let d = base.join(name);
    std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    for (f, content) in files {
        std::fs::write(d.join(f), content)?;
    }
    Ok(d)
}
