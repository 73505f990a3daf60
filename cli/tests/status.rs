//! `runc-architect status` and `runc-architect metrics` against state files written by the
//! proto crate's writer (the one the shims use), for containers in several namespaces and
//! every state. The metrics are checked with Prometheus' own parser and linter
//! (`promtool check metrics`; `scripts/setup` puts it at `$RA_PREFIX/prometheus/promtool`,
//! `RA_PROMTOOL` names another), printed once and served over HTTP on loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use runc_architect_proto::status::{
    self, from_unix_ms, status_dir, write_atomic, ContainerStatus, State,
};

const BIN: &str = env!("CARGO_BIN_EXE_runc-architect");

fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("RA_PROMTOOL") {
        return PathBuf::from(p);
    }
    let prefix = std::env::var_os("RA_PREFIX")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/runc-architect"));
    let p = prefix.join("prometheus/promtool");
    assert!(
        p.is_file(),
        "promtool not found at {} (run scripts/setup, or set RA_PROMTOOL)",
        p.display()
    );
    p
}

fn ra(args: &[&str], root: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run runc-architect")
}

fn ok(args: &[&str], root: &Path) -> (String, String) {
    let out = ra(args, root);
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{o}\n{e}",
        out.status
    );
    (o, e)
}

/// `promtool check metrics` of `text`: must pass with no lint problem at all.
fn promtool_check(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}):\n{report}\n--- input ---\n{text}",
        out.status
    );
}

/// Samples of an exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn value(s: &BTreeMap<String, String>, key: &str) -> f64 {
    s.get(key)
        .unwrap_or_else(|| panic!("no sample {key}"))
        .parse()
        .unwrap_or_else(|e| panic!("sample {key}: {e}"))
}

const T0_MS: u64 = 1_700_000_000_000;

/// Four containers in three namespaces, one per state, with their histories.
fn fixtures() -> Vec<ContainerStatus> {
    let t0 = from_unix_ms(T0_MS);
    let s = |n: u64| t0 + Duration::from_secs(n);

    let mut web = ContainerStatus::new("k8s.io", "web", t0);
    web.record_activity(s(5));
    web.set_state(State::Frozen, s(7));
    web.set_state(State::ScaledDown, s(65));
    web.record_checkpoint(
        Duration::from_millis(800),
        48 << 20,
        Some(300 << 20),
        Some(6 << 20),
    );
    web.record_wake(Duration::from_micros(23_400), s(100));
    web.record_restore(Duration::from_millis(21), 48 << 20);
    web.record_activity(s(100));
    web.set_state(State::Running, s(100));
    web.set_state(State::Frozen, s(103));
    web.set_state(State::ScaledDown, s(161));
    web.record_checkpoint(
        Duration::from_millis(700),
        50 << 20,
        Some(310 << 20),
        Some(5 << 20),
    );

    let mut api = ContainerStatus::new("k8s.io", "api", t0);
    api.record_activity(s(1));
    api.set_state(State::Frozen, s(3));
    api.record_wake(Duration::from_micros(400), s(20));
    api.set_state(State::Running, s(20));
    api.set_state(State::Frozen, s(22));

    let db = ContainerStatus::new("default", "db", t0);

    let mut worker = ContainerStatus::new("tenant-a", "worker", t0);
    worker.set_state(State::Frozen, s(2));
    worker.record_checkpoint_failure();
    worker.record_checkpoint_failure();
    worker.set_state(State::ScaledDown, s(70));
    worker.record_checkpoint(
        Duration::from_secs(3),
        1 << 30,
        Some(2 << 30),
        Some(10 << 20),
    );
    worker.set_state(State::Waking, s(200));
    worker.record_restore_failure();
    vec![web, api, db, worker]
}

fn write_fixtures(root: &Path) -> Vec<ContainerStatus> {
    let f = fixtures();
    for s in &f {
        write_atomic(root, s).expect("write state file");
    }
    f
}

#[test]
fn empty_root_gives_an_empty_table_and_array() {
    let d = tempfile::tempdir().expect("tempdir");
    for root in [d.path().to_path_buf(), d.path().join("missing")] {
        let (table, err) = ok(&["status"], &root);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 1, "{table}");
        assert!(lines[0].starts_with("ID "), "{table}");
        assert!(err.is_empty(), "{err}");
        let (json, _) = ok(&["status", "--json"], &root);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json).expect("json"),
            serde_json::json!([])
        );
        let (metrics, _) = ok(&["metrics"], &root);
        promtool_check(&metrics);
        assert_eq!(
            value(&samples(&metrics), "runc_architect_status_files_unreadable"),
            0.0
        );
    }
}

#[test]
fn status_table_lists_every_namespace_and_state() {
    let d = tempfile::tempdir().expect("tempdir");
    write_fixtures(d.path());
    let (table, err) = ok(&["status"], d.path());
    assert!(err.is_empty(), "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    let header: Vec<&str> = lines[0]
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "ID",
            "NAMESPACE",
            "STATE",
            "SINCE",
            "LAST ACTIVITY",
            "WAKES",
            "LAST WAKE",
            "CHECKPOINT"
        ]
    );
    // Sorted by namespace, then id.
    let rows: Vec<Vec<&str>> = lines[1..]
        .iter()
        .map(|l| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    let key: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[1], r[0], r[2])).collect();
    assert_eq!(
        key,
        [
            ("default", "db", "RUNNING"),
            ("k8s.io", "api", "FROZEN"),
            ("k8s.io", "web", "SCALED_DOWN"),
            ("tenant-a", "worker", "WAKING"),
        ]
    );
    let web = &rows[2];
    assert_eq!(web[5], "1", "wakes: {web:?}");
    assert!(web[3].ends_with(" ago"), "since: {web:?}");
    assert!(web[6].ends_with("ago (23.4ms)"), "last wake: {web:?}");
    assert_eq!(web[7], "50.0MiB", "checkpoint: {web:?}");
    let api = &rows[1];
    assert!(api[6].ends_with("ago (0.40ms)"), "{api:?}");
    assert_eq!(api[7], "-");
    let db = &rows[0];
    assert_eq!(&db[4..], ["-", "0", "-", "-"], "{db:?}");
    assert_eq!(rows[3][7], "1.0GiB");
}

#[test]
fn status_json_has_the_keys_and_values() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = write_fixtures(d.path());
    let (json, _) = ok(&["status", "--json"], d.path());
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let arr = v.as_array().expect("array");
    assert_eq!(arr.len(), f.len());
    for o in arr {
        for k in [
            "id",
            "namespace",
            "state",
            "wakes",
            "last_wake_ms",
            "since",
            "since_unix_ms",
            "last_activity",
            "last_activity_unix_ms",
            "last_wake",
            "last_wake_unix_ms",
            "checkpoint_bytes",
            "memory_before_bytes",
            "memory_after_bytes",
            "checkpoint_failures",
            "restore_failures",
        ] {
            assert!(o.get(k).is_some(), "key {k} missing in {o}");
        }
    }
    let find = |id: &str| {
        arr.iter()
            .find(|o| o["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    let web = find("web");
    assert_eq!(web["namespace"], "k8s.io");
    assert_eq!(web["state"], "SCALED_DOWN");
    assert_eq!(web["wakes"], 1);
    assert!((web["last_wake_ms"].as_f64().expect("number") - 23.4).abs() < 1e-9);
    assert_eq!(web["last_wake_unix_ms"], T0_MS + 100_000);
    assert_eq!(web["last_wake"], "2023-11-14T22:15:00.000Z");
    assert_eq!(web["since_unix_ms"], T0_MS + 161_000);
    assert_eq!(web["since"], "2023-11-14T22:16:01.000Z");
    assert_eq!(web["checkpoint_bytes"], 50u64 << 20);
    assert_eq!(web["memory_before_bytes"], 310u64 << 20);
    let db = find("db");
    assert_eq!(db["state"], "RUNNING");
    assert_eq!(db["wakes"], 0);
    assert!(db["last_wake_ms"].is_null());
    assert!(db["last_activity"].is_null());
    let worker = find("worker");
    assert_eq!(worker["namespace"], "tenant-a");
    assert_eq!(worker["state"], "WAKING");
    assert_eq!(worker["checkpoint_failures"], 2);
    assert_eq!(worker["restore_failures"], 1);
    assert_eq!(find("api")["state"], "FROZEN");
}

fn check_fixture_metrics(text: &str) {
    promtool_check(text);
    let s = samples(text);
    let l = |ns: &str, c: &str| format!(r#"namespace="{ns}",container="{c}""#);
    // One state series per state, 1 for the current one.
    for (ns, c, cur) in [
        ("k8s.io", "web", State::ScaledDown),
        ("k8s.io", "api", State::Frozen),
        ("default", "db", State::Running),
        ("tenant-a", "worker", State::Waking),
    ] {
        for st in State::ALL {
            let key = format!(r#"runc_architect_state{{{},state="{st}"}}"#, l(ns, c));
            assert_eq!(value(&s, &key), if st == cur { 1.0 } else { 0.0 }, "{key}");
        }
    }
    let web = l("k8s.io", "web");
    assert_eq!(
        value(&s, &format!("runc_architect_wakes_total{{{web}}}")),
        1.0
    );
    assert_eq!(
        value(
            &s,
            &format!(r#"runc_architect_wake_duration_seconds_bucket{{{web},le="0.01"}}"#)
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            &format!(r#"runc_architect_wake_duration_seconds_bucket{{{web},le="0.025"}}"#)
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            &format!(r#"runc_architect_wake_duration_seconds_bucket{{{web},le="+Inf"}}"#)
        ),
        1.0
    );
    assert!(
        (value(
            &s,
            &format!("runc_architect_wake_duration_seconds_sum{{{web}}}")
        ) - 0.0234)
            .abs()
            < 1e-9
    );
    assert_eq!(
        value(
            &s,
            &format!("runc_architect_checkpoint_duration_seconds_count{{{web}}}")
        ),
        2.0
    );
    assert!(
        (value(
            &s,
            &format!("runc_architect_checkpoint_duration_seconds_sum{{{web}}}")
        ) - 1.5)
            .abs()
            < 1e-9
    );
    assert_eq!(
        value(
            &s,
            &format!(r#"runc_architect_checkpoint_duration_seconds_bucket{{{web},le="0.5"}}"#)
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            &format!(r#"runc_architect_checkpoint_duration_seconds_bucket{{{web},le="1"}}"#)
        ),
        2.0
    );
    assert_eq!(
        value(
            &s,
            &format!("runc_architect_restore_duration_seconds_count{{{web}}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            &format!("runc_architect_checkpoint_written_bytes_total{{{web}}}")
        ),
        (98u64 << 20) as f64
    );
    assert_eq!(
        value(
            &s,
            &format!("runc_architect_restore_read_bytes_total{{{web}}}")
        ),
        (48u64 << 20) as f64
    );
    assert_eq!(
        value(
            &s,
            &format!("runc_architect_checkpoint_size_bytes{{{web}}}")
        ),
        (50u64 << 20) as f64
    );
    assert_eq!(
        value(&s, &format!("runc_architect_memory_freed_bytes{{{web}}}")),
        (305u64 << 20) as f64
    );
    assert_eq!(
        value(
            &s,
            &format!("runc_architect_state_since_timestamp_seconds{{{web}}}")
        ),
        (T0_MS + 161_000) as f64 / 1000.0
    );
    assert_eq!(
        value(
            &s,
            &format!("runc_architect_last_activity_timestamp_seconds{{{web}}}")
        ),
        (T0_MS + 100_000) as f64 / 1000.0
    );
    let worker = l("tenant-a", "worker");
    assert_eq!(
        value(
            &s,
            &format!(r#"runc_architect_failures_total{{{worker},kind="checkpoint"}}"#)
        ),
        2.0
    );
    assert_eq!(
        value(
            &s,
            &format!(r#"runc_architect_failures_total{{{worker},kind="restore"}}"#)
        ),
        1.0
    );
    let db = l("default", "db");
    assert_eq!(
        value(&s, &format!("runc_architect_wakes_total{{{db}}}")),
        0.0
    );
    assert!(!s.contains_key(&format!("runc_architect_memory_freed_bytes{{{db}}}")));
    assert!(!s.contains_key(&format!(
        "runc_architect_last_activity_timestamp_seconds{{{db}}}"
    )));
    assert_eq!(value(&s, "runc_architect_status_files_unreadable"), 0.0);
}

#[test]
fn metrics_pass_promtool_and_carry_the_values() {
    let d = tempfile::tempdir().expect("tempdir");
    write_fixtures(d.path());
    let (text, err) = ok(&["metrics"], d.path());
    assert!(err.is_empty(), "{err}");
    check_fixture_metrics(&text);
}

/// Kills the served process if the test fails before it stops it.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A whole HTTP/1.0 exchange: (status line, headers, body).
fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut resp = String::new();
    c.read_to_string(&mut resp).expect("response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("head and body");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

#[test]
fn metrics_served_over_http_until_sigterm() {
    let d = tempfile::tempdir().expect("tempdir");
    write_fixtures(d.path());
    let mut child = Command::new(BIN)
        .args(["metrics", "--listen", "127.0.0.1:0", "--root"])
        .arg(d.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start metrics --listen");
    let stderr = child.stderr.take().expect("stderr");
    let mut served = Served(child);
    let mut lines = BufReader::new(stderr).lines();
    let first = lines
        .next()
        .expect("a line on stderr")
        .expect("read stderr");
    let addr = first
        .strip_prefix("runc-architect: serving metrics on http://")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let (status, headers, body) = http_get(&addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    check_fixture_metrics(&body);

    // Each scrape reads the files anew.
    let mut db = fixtures().into_iter().find(|s| s.id == "db").expect("db");
    db.set_state(State::Frozen, SystemTime::now());
    write_atomic(d.path(), &db).expect("rewrite db");
    let (_, _, body) = http_get(&addr, "/metrics?x=1");
    let s = samples(&body);
    assert_eq!(
        value(
            &s,
            r#"runc_architect_state{namespace="default",container="db",state="FROZEN"}"#
        ),
        1.0
    );
    let (status, _, _) = http_get(&addr, "/elsewhere");
    assert!(status.contains(" 404 "), "{status}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(st) = served.0.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "still serving 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit after SIGTERM: {code}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:?}");
    assert!(TcpStream::connect(&addr).is_err(), "still listening");
}

#[test]
fn corrupt_files_are_skipped_and_named() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = write_fixtures(d.path());
    let dir = status_dir(d.path());
    std::fs::write(
        dir.join("k8s.io/broken.json"),
        b"{\"version\": 1, \"id\": \"bro",
    )
    .expect("write");
    let good = std::fs::read_to_string(dir.join("k8s.io/web.json")).expect("read");
    std::fs::create_dir_all(dir.join("future")).expect("mkdir");
    std::fs::write(
        dir.join("future/web.json"),
        good.replace("\"version\": 1", "\"version\": 7")
            .replace("\"k8s.io\"", "\"future\""),
    )
    .expect("write");

    let out = ra(&["status"], d.path());
    assert!(out.status.success(), "{}", out.status);
    let table = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(table.lines().count(), 1 + f.len(), "{table}");
    assert!(err.contains("broken.json"), "{err}");
    assert!(
        err.contains("future/web.json") && err.contains("schema version 7"),
        "{err}"
    );

    let out = ra(&["status", "--json"], d.path());
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is still JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(f.len()));

    let out = ra(&["metrics"], d.path());
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    promtool_check(&text);
    let s = samples(&text);
    assert_eq!(value(&s, "runc_architect_status_files_unreadable"), 2.0);
    assert_eq!(
        value(
            &s,
            r#"runc_architect_wakes_total{namespace="k8s.io",container="web"}"#
        ),
        1.0
    );
    assert!(!text.contains("container=\"broken\""));
    assert!(!text.contains("namespace=\"future\""));
    // The reader API agrees.
    assert_eq!(status::read_all(d.path()).unreadable.len(), 2);
}
