//! Tests against the real CRIU (run as root). A test that needs CRIU and finds none
//! fails, unless `CRIU_RPC_SKIP_REAL=1` is set; `CRIU_RPC_BINARY` picks a binary.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use criu_rpc::{
    CapabilitiesCache, Criu, CriuOptions, CriuReqType, Error, Features, Notify, NotifyHandler,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

const STEP: Duration = Duration::from_secs(60);

/// The CRIU under test, or `None` (skip) when absent and skipping is allowed.
fn criu() -> Option<Criu> {
    let criu = match std::env::var_os("CRIU_RPC_BINARY") {
        Some(b) => Criu::with_binary(b),
        None => Criu::new(),
    };
    match criu.binary() {
        Some(Ok(_)) => Some(criu),
        Some(Err(e)) => {
            if std::env::var("CRIU_RPC_SKIP_REAL").as_deref() == Ok("1") {
                eprintln!("skipping: {e} (CRIU_RPC_SKIP_REAL=1)");
                None
            } else {
                panic!(
                    "this test needs CRIU: {e}. Install CRIU >= 4.2 (or set CRIU_RPC_BINARY), \
                     or set CRIU_RPC_SKIP_REAL=1 to skip the tests that need it"
                )
            }
        }
        None => unreachable!("swrk client"),
    }
}

async fn step<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {STEP:?}"))
}

/// A process printing 1, 2, 3, ... to a pipe every 20 ms, in its own session.
struct Counter {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    pid: i32,
}

impl Counter {
    fn start() -> Counter {
        let mut cmd = std::process::Command::new("perl");
        cmd.args([
            "-e",
            r#"$| = 1; my $i = 0; while (1) { $i++; print "$i\n"; select(undef, undef, undef, 0.02); }"#,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches no memory; it makes the child a
        // session leader, which CRIU needs to dump and restore it without shell_job.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn perl counter");
        let pid = i32::try_from(child.id()).expect("pid fits");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Counter { child, out, pid }
    }

    /// Reads lines until the counter reached at least `n`; returns the last value.
    fn read_until(&mut self, n: u64) -> u64 {
        read_counter_until(&mut self.out, n)
    }

    /// The `pipe:[inode]` key of its stdout, as CRIU names it.
    fn stdout_key(&self) -> String {
        std::fs::read_link(format!("/proc/{}/fd/1", self.pid))
            .expect("readlink stdout")
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_counter_until(r: &mut impl BufRead, n: u64) -> u64 {
    let mut line = String::new();
    loop {
        line.clear();
        let got = r.read_line(&mut line).expect("read counter");
        assert!(got > 0, "counter output ended before reaching {n}");
        let v: u64 = line.trim().parse().expect("a number");
        if v >= n {
            return v;
        }
    }
}

/// Reads `count` values; asserts they are consecutive.
fn read_consecutive(r: &mut impl BufRead, count: usize) -> Vec<u64> {
    let mut vals = Vec::new();
    let mut line = String::new();
    while vals.len() < count {
        line.clear();
        let got = r.read_line(&mut line).expect("read counter");
        assert!(got > 0, "counter output ended after {vals:?}");
        vals.push(line.trim().parse::<u64>().expect("a number"));
    }
    for w in vals.windows(2) {
        assert_eq!(w[1], w[0] + 1, "not consecutive: {vals:?}");
    }
    vals
}

fn is_alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at /proc state instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn images(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read images dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Records notifications in order, with the pids they carried.
#[derive(Default, Debug)]
struct Recorder {
    events: Vec<String>,
    post_restore_pid: Option<i32>,
    setup_ns_pid: Option<i32>,
    fail_on: Option<&'static str>,
}

#[async_trait]
impl NotifyHandler for Recorder {
    type Error = std::io::Error;

    async fn on_notify(&mut self, n: Notify<'_>) -> Result<(), std::io::Error> {
        self.events.push(n.script().to_owned());
        match n {
            Notify::PostRestore { pid } => self.post_restore_pid = Some(pid),
            Notify::SetupNamespaces { pid } => self.setup_ns_pid = Some(pid),
            _ => {}
        }
        if Some(self.events.last().map(String::as_str).unwrap_or("")) == self.fail_on {
            return Err(std::io::Error::other("refused by the test handler"));
        }
        Ok(())
    }
}

fn position(events: &[String], script: &str) -> usize {
    events
        .iter()
        .position(|e| e == script)
        .unwrap_or_else(|| panic!("no {script:?} in {events:?}"))
}

#[tokio::test]
async fn version_check_and_features() {
    let Some(criu) = criu() else { return };
    let v = step("VERSION", criu.version()).await.expect("VERSION");
    assert!(v.at_least(3, 0, 0), "version {v}");
    eprintln!("CRIU {v}");
    step("CHECK", criu.check())
        .await
        .expect("CHECK passes here");
    let f = step("FEATURE_CHECK", criu.feature_check(Features::ALL))
        .await
        .expect("FEATURE_CHECK");
    eprintln!("features: {f:?}");
    // This kernel has userfaultfd but no soft-dirty tracking; just make sure asking
    // for nothing yields nothing.
    let none = step(
        "FEATURE_CHECK none",
        criu.feature_check(Features::default()),
    )
    .await
    .expect("FEATURE_CHECK");
    assert_eq!(none, Features::default());

    let cache = CapabilitiesCache::new(criu.clone());
    assert!(cache.cached().is_none());
    let caps = step("probe", cache.get()).await.expect("probe");
    assert_eq!(caps.version, v);
    assert_eq!(caps.features, f);
    assert!(caps.check_passed(), "{:?}", caps.check_error);
    assert!(cache.cached().is_some());
}

#[tokio::test]
async fn keep_open_session_serves_several_requests() {
    let Some(criu) = criu() else { return };
    let mut s = step("session", criu.session()).await.expect("session");
    let pid = s.criu_pid().expect("swrk child");
    let v1 = step("VERSION 1", s.version()).await.expect("VERSION");
    let _ = step("FEATURE_CHECK", s.feature_check(Features::ALL))
        .await
        .expect("FEATURE_CHECK");
    assert!(is_alive(pid), "CRIU still serves");
    s.keep_open(false);
    let v2 = step("VERSION 2", s.version()).await.expect("VERSION");
    assert_eq!(v1, v2);
    let exit = step("close", s.close()).await;
    assert_eq!(exit.map(|e| e.success()), Some(true), "{exit:?}");
}

#[tokio::test]
async fn dump_leave_running_keeps_the_process() {
    let Some(criu) = criu() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Counter::start();
    c.read_until(3);
    let out = step(
        "DUMP",
        criu.dump(
            CriuOptions::new()
                .pid(c.pid)
                .images_dir(dir.path())
                .log_file("dump.log")
                .log_level(4)
                .leave_running(true),
        ),
    )
    .await
    .expect("DUMP");
    assert!(!out.restored);
    assert_eq!(out.criu_exit.map(|e| e.success()), Some(true));
    let files = images(dir.path());
    assert!(files.iter().any(|f| f == "inventory.img"), "{files:?}");
    assert!(files.iter().any(|f| f == "dump.log"), "{files:?}");
    // Still counting.
    assert!(is_alive(c.pid));
    let before = c.read_until(0);
    let after = c.read_until(before + 5);
    assert!(after >= before + 5);
}

#[tokio::test]
async fn dump_kill_then_restore_continues_with_notifications() {
    let Some(criu) = criu() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Counter::start();
    let pid = c.pid;
    let key = c.stdout_key();
    assert!(key.starts_with("pipe:["), "{key}");
    let seen = c.read_until(10);

    // Dump, killing the tree (leave_running = false), with a stateful handler.
    let mut dump_events = Recorder::default();
    let out = step(
        "DUMP",
        criu.dump_with_notify(
            CriuOptions::new()
                .pid(pid)
                .images_dir(dir.path())
                .log_file("dump.log")
                .log_level(4),
            &mut dump_events,
        ),
    )
    .await
    .expect("DUMP");
    assert!(!out.restored);
    eprintln!("dump notifications: {:?}", dump_events.events);
    assert!(position(&dump_events.events, "pre-dump") < position(&dump_events.events, "post-dump"));

    // The original is gone: reap it so the pid is free, and drain what it printed.
    let status = c.child.wait().expect("wait for the dumped counter");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "CRIU kills a dumped tree without leave_running: {status:?}"
    );
    // The dump may come before the counter printed anything more.
    let mut last = seen;
    let mut line = String::new();
    while c.out.read_line(&mut line).expect("drain") > 0 {
        last = line.trim().parse().expect("a number");
        line.clear();
    }
    assert!(last >= 10, "last value before the dump: {last}");

    // Restore with a fresh pipe standing in for the old stdout, as our child.
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let mut restore_events = Recorder::default();
    let restored = step(
        "RESTORE",
        criu.restore_with_notify(
            CriuOptions::new()
                .images_dir(dir.path())
                .log_file("restore.log")
                .log_level(4)
                .rst_sibling(true)
                .inherit_fd(key, w),
            &mut restore_events,
        ),
    )
    .await
    .expect("RESTORE");
    eprintln!("restore notifications: {:?}", restore_events.events);
    assert_eq!(restored.pid, pid, "the tree comes back under its pid");
    assert_eq!(restore_events.post_restore_pid, Some(pid));
    // CRIU's order; setup-namespaces only comes for trees with namespaces of their own.
    let ev = &restore_events.events;
    assert!(position(ev, "pre-restore") < position(ev, "post-restore"));
    assert!(position(ev, "post-restore") < position(ev, "pre-resume"));
    assert!(position(ev, "pre-resume") < position(ev, "post-resume"));
    assert_eq!(restore_events.setup_ns_pid, None);

    // It counts on from where it was, into the inherited pipe.
    let mut reader = BufReader::new(std::fs::File::from(r));
    let vals = read_consecutive(&mut reader, 10);
    assert!(
        vals[0] > 1 && vals[0] + 50 > last && vals[9] > last,
        "after restore {vals:?}, before {last}"
    );

    // rst_sibling made it our child: kill and reap it.
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill restored counter");
    let st = tokio::task::spawn_blocking(move || waitpid(Pid::from_raw(pid), None))
        .await
        .expect("join")
        .expect("waitpid: the restored tree is our child");
    assert!(
        matches!(st, WaitStatus::Signaled(_, Signal::SIGKILL, _)),
        "{st:?}"
    );
}

#[tokio::test]
async fn restore_without_rst_sibling_detaches_the_tree() {
    let Some(criu) = criu() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Counter::start();
    let pid = c.pid;
    let key = c.stdout_key();
    c.read_until(5);
    step(
        "DUMP",
        criu.dump(
            CriuOptions::new()
                .pid(pid)
                .images_dir(dir.path())
                .work_dir(dir.path())
                .log_file("dump.log"),
        ),
    )
    .await
    .expect("DUMP");
    c.child.wait().expect("reap the dumped counter");
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let restored = step(
        "RESTORE",
        criu.restore(
            CriuOptions::new()
                .images_dir(dir.path())
                .log_file("restore.log")
                .inherit_fd(key, w),
        ),
    )
    .await
    .expect("RESTORE");
    assert_eq!(restored.pid, pid);
    assert_eq!(restored.criu_exit.map(|e| e.success()), Some(true));
    let mut reader = BufReader::new(std::fs::File::from(r));
    let vals = read_consecutive(&mut reader, 5);
    assert!(vals[0] > 1, "{vals:?}");
    // Not our child: waitpid must refuse; kill it and let its new parent reap it.
    assert!(waitpid(
        Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG)
    )
    .is_err());
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill restored counter");
    for _ in 0..200 {
        if !is_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("restored counter {pid} survived SIGKILL");
}

/// Connecting and hanging up ends a page server's session, and with it the daemon.
fn end_page_server(port: i32) {
    let port = u16::try_from(port).expect("port");
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect page server");
    drop(s);
}

#[tokio::test]
async fn page_server_starts_and_reports_where() {
    let Some(criu) = criu() else { return };
    // A port that was free a moment ago.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        i32::from(l.local_addr().expect("addr").port())
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let info = step(
        "PAGE_SERVER",
        criu.page_server(
            CriuOptions::new()
                .images_dir(dir.path())
                .log_file("page-server.log")
                .page_server("127.0.0.1", port),
        ),
    )
    .await
    .expect("PAGE_SERVER");
    assert_eq!(info.port, Some(port), "{info:?}");
    // It listens there.
    end_page_server(port);
    if let Some(pid) = info.pid {
        for _ in 0..200 {
            if !is_alive(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!is_alive(pid), "page server {pid} ended with its session");
    }

    // Port 0: CRIU picks one and reports it.
    let dir = tempfile::tempdir().expect("tempdir");
    let info = step(
        "PAGE_SERVER",
        criu.page_server(
            CriuOptions::new()
                .images_dir(dir.path())
                .log_file("page-server.log")
                .page_server("127.0.0.1", 0),
        ),
    )
    .await
    .expect("PAGE_SERVER");
    let port = info.port.expect("port");
    assert!(port > 0, "{info:?}");
    end_page_server(port);
}

#[tokio::test]
async fn pre_dump_follows_the_kernel_memory_tracking() {
    let Some(criu) = criu() else { return };
    let tracking = step("FEATURE_CHECK", criu.feature_check(Features::ALL))
        .await
        .expect("FEATURE_CHECK")
        .mem_track;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Counter::start();
    c.read_until(2);
    let single = step(
        "SINGLE_PRE_DUMP",
        criu.pre_dump(
            CriuOptions::new()
                .pid(c.pid)
                .images_dir(dir.path())
                .log_file("pre-dump.log"),
        ),
    )
    .await;
    let iterative_dir = tempfile::tempdir().expect("tempdir");
    let mut it = step("session", criu.iterative_dump())
        .await
        .expect("session");
    let iterative = step(
        "PRE_DUMP",
        it.pre_dump(
            CriuOptions::new()
                .pid(c.pid)
                .images_dir(iterative_dir.path())
                .log_file("pre-dump.log"),
        ),
    )
    .await;
    if tracking {
        single.expect("SINGLE_PRE_DUMP with memory tracking");
        iterative.expect("PRE_DUMP with memory tracking");
        let final_dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(iterative_dir.path(), final_dir.path().join("parent"))
            .expect("parent link");
        step(
            "DUMP",
            it.dump(
                CriuOptions::new()
                    .pid(c.pid)
                    .images_dir(final_dir.path())
                    .parent_img("parent")
                    .leave_running(true)
                    .track_mem(true),
                &mut criu_rpc::NoNotify,
            ),
        )
        .await
        .expect("final DUMP");
    } else {
        // No soft-dirty in this kernel: CRIU refuses, and says so.
        for (what, r) in [("SINGLE_PRE_DUMP", single), ("PRE_DUMP", iterative)] {
            let err = r.expect_err("no memory tracking");
            eprintln!("{what}: {err}");
            assert!(
                matches!(err, Error::Criu(_)),
                "{what}: expected CRIU's refusal, got {err:?}"
            );
            assert!(err.log_tail().is_some(), "{what}: log tail");
        }
        step("abort", it.abort()).await;
    }
    assert!(is_alive(c.pid), "pre-dump leaves the tree running");
}

#[tokio::test]
async fn refusing_post_dump_aborts_and_the_process_survives() {
    let Some(criu) = criu() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Counter::start();
    c.read_until(3);
    let mut h = Recorder {
        fail_on: Some("post-dump"),
        ..Default::default()
    };
    let err = step(
        "DUMP",
        criu.dump_with_notify(
            CriuOptions::new()
                .pid(c.pid)
                .images_dir(dir.path())
                .log_file("dump.log"),
            &mut h,
        ),
    )
    .await
    .expect_err("the handler refuses");
    eprintln!("{err}");
    match &err {
        Error::Notify { script, criu, .. } => {
            assert_eq!(script, "post-dump");
            assert!(criu.is_some(), "CRIU's failure answer is attached");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.log_tail().is_some(), "log tail attached");
    // CRIU resumed the tree after the failed dump.
    assert!(is_alive(c.pid));
    let v = c.read_until(0);
    assert!(c.read_until(v + 3) >= v + 3);
}

#[tokio::test]
async fn dump_of_a_missing_pid_reports_errno_message_and_log() {
    let Some(criu) = criu() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("number");
    let pid = (2..pid_max)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid");
    let err = step(
        "DUMP",
        criu.dump(
            CriuOptions::new()
                .pid(pid)
                .images_dir(dir.path())
                .log_file("dump.log"),
        ),
    )
    .await
    .expect_err("no such process");
    eprintln!("error: {err}");
    assert_eq!(err.request(), Some(CriuReqType::Dump));
    let failure = err.criu_failure().expect("CRIU answered");
    assert!(
        failure.errno.is_some() || failure.message.is_some(),
        "{failure:?}"
    );
    let tail = err.log_tail().expect("log tail");
    assert!(!tail.lines.is_empty());
    assert!(tail.lines.len() <= criu_rpc::LOG_TAIL_LINES);
    assert_eq!(tail.path, dir.path().join("dump.log"));
    assert!(
        tail.lines.iter().any(|l| l.contains("Error")),
        "log tail: {tail}"
    );
}

#[tokio::test]
async fn missing_binary_is_a_clear_error() {
    let err = Criu::with_binary("/nonexistent/sbin/criu")
        .check()
        .await
        .expect_err("no binary");
    assert!(matches!(err, Error::BinaryNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/sbin/criu"), "{err}");
}

/// A `criu service` we start and stop ourselves.
struct Service {
    child: tokio::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    async fn start(binary: &Path) -> Service {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("criu.sock");
        let child = tokio::process::Command::new(binary)
            .arg("service")
            .arg("--address")
            .arg(&socket)
            .arg("-o")
            .arg(dir.path().join("service.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start criu service");
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(socket.exists(), "criu service did not create its socket");
        Service {
            child,
            socket,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn service_socket_version_and_check() {
    let Some(swrk) = criu() else { return };
    let binary = swrk
        .binary()
        .expect("swrk client")
        .expect("resolved earlier");
    let mut svc = Service::start(&binary).await;
    let criu = Criu::service(&svc.socket);
    let v = step("VERSION", criu.version())
        .await
        .expect("VERSION via service");
    assert_eq!(v, step("VERSION", swrk.version()).await.expect("VERSION"));
    step("CHECK", criu.check())
        .await
        .expect("CHECK via service");
    // Descriptors cannot go to a service.
    let (_r, w) = nix::unistd::pipe().expect("pipe");
    let err = criu
        .restore(CriuOptions::new().images_dir("/").inherit_fd("pipe:[1]", w))
        .await
        .expect_err("refused locally");
    assert!(matches!(err, Error::InvalidOptions { .. }), "{err}");
    let _ = svc.child.kill().await;
}

#[tokio::test]
async fn service_socket_missing_is_a_connect_error() {
    let err = Criu::service("/nonexistent/criu.sock")
        .version()
        .await
        .expect_err("no service");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
}
