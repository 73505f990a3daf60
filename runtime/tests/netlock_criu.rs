//! Issue 9 item 11 with the real CRIU (root only; skipped when CRIU is not installed): a
//! process tree with a network namespace of its own is dumped with that namespace while
//! the runtime's network lock (`RUNC-ARCHITECT`) and hibernation's chains (`RA-HIB-*`,
//! here a running activity watch) are in place, through the runtime's own lock watch and
//! the image scrub its dump runs; then restored by CRIU into a new namespace. What CRIU
//! saved must be the namespace's own rules: after the restore `iptables-save` there shows
//! no chain of ours but keeps the namespace's own chain, and servers on the namespace's
//! loopback and on its veth answer.
//!
//! The world: an anonymous "app" namespace (lo up, a veth to an anonymous "client"
//! namespace) in which a small Python server listens on `127.0.0.1:7000` and
//! `0.0.0.0:7001`. CRIU restores the veth with its peer in this process's namespace
//! under a name of ours; the test moves that peer into the client namespace. Guards kill
//! the processes and delete the peer, also when the test fails. CRIU is
//! `RA_CRIU` or `/usr/local/sbin/criu`, else `criu` on PATH.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use criu_rpc::{Criu, CriuNetworkLockMethod, CriuOptions, CriuStderr};
use runc_architect_runtime::checkpoint::netlock::{self, LockWatch};
use runc_architect_runtime::checkpoint::spawner::ShimSpawner;
use runc_architect_runtime::checkpoint::NetworkLock;
use runc_architect_runtime::hibernate::net::rules::{self, Family};
use runc_architect_runtime::hibernate::net::{ActivityWatch, NetNs, WatchConfig};
use runc_architect_runtime::ExitWatcher;

const APP_IP: &str = "10.215.1.2";
const CLIENT_IP: &str = "10.215.1.1";
const APP_IF: &str = "eth-app";

const SERVER: &str = r#"
import selectors, socket
sel = selectors.DefaultSelector()
for addr in (("127.0.0.1", 7000), ("0.0.0.0", 7001)):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(16)
    sel.register(s, selectors.EVENT_READ, addr[1])
while True:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept()
        c.recv(64)
        c.sendall(b"pong %d\n" % key.data)
        c.close()
"#;

// ---- reaping (see hibernate_net.rs: a thread blocked in waitpid) --------------------

fn start_reaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("reaper runtime");
            loop {
                use nix::sys::wait::{waitpid, WaitStatus};
                let (pid, code) = match waitpid(None, None) {
                    Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                    Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
                    Ok(_) => continue,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                let _ = rt.block_on(
                    containerd_shim::asynchronous::monitor::monitor_notify_by_pid(
                        pid.as_raw(),
                        code,
                    ),
                );
            }
        });
    });
}

// ---- guards ----------------------------------------------------------------------------

/// Kills a process (SIGKILL) when dropped.
struct Killed(i32);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Deletes a link of this process's namespace when dropped (the restored veth's peer,
/// if it is still here). The reaper thread may reap `ip` before `status()` does: the
/// link goes all the same.
struct Link(String);

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes a directory tree when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- helpers ---------------------------------------------------------------------------

fn criu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RA_CRIU") {
        return Some(PathBuf::from(p));
    }
    let default = PathBuf::from("/usr/local/sbin/criu");
    if default.exists() {
        return Some(default);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("criu"))
            .find(|p| p.exists())
    })
}

fn anonymous_netns() -> File {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare a netns");
        File::open("/proc/thread-self/ns/net").expect("open the new netns")
    })
    .join()
    .expect("netns thread")
}

fn path_of(ns: &NetNs) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), ns.fd().as_raw_fd())
}

async fn run(exits: &ExitWatcher, ns: &NetNs, program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = rules::run_in(exits, ns.fd(), cmd, None, true)
        .await
        .unwrap_or_else(|e| panic!("run {program} {args:?}: {e}"));
    assert_eq!(out.code, 0, "{program} {args:?}: {}", out.stderr);
    out.stdout
}

/// Starts the server in `ns`, in a session of its own (nothing ties it to this test's
/// terminal: CRIU dumps it whole).
fn start_server(ns: &NetNs) -> i32 {
    let fd = ns.fd().as_raw_fd();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SERVER])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the hook runs between fork and exec and only calls setns(2) and setsid(2),
    // both async-signal-safe; `fd` stays open in the parent until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start the server");
    let pid = child.id() as i32;
    // The reaper owns its exit.
    drop(child);
    pid
}

/// Asks the server at `to` from a socket made in `ns`; retries while it comes up.
fn ask(ns: &NetNs, to: &str) -> std::io::Result<String> {
    let to: std::net::SocketAddr = to.parse().expect("address");
    ns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Ok(mut c) => {
                    c.set_read_timeout(Some(Duration::from_secs(2)))?;
                    c.write_all(b"ping\n")?;
                    let mut answer = String::new();
                    c.read_to_string(&mut answer)?;
                    return Ok(answer.trim_end().to_string());
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        }
    })
    .expect("enter the namespace")
}

/// Every rule of the namespace, both families.
async fn saved(ns: &NetNs) -> String {
    let mut all = String::new();
    for f in rules::families() {
        all.push_str(&rules::save(ns, *f).await.expect("save rules"));
    }
    all
}

// ---- the test --------------------------------------------------------------------------

#[tokio::test]
async fn own_netns_dump_saves_the_namespaces_rules_not_ours() {
    let Some(criu_bin) = criu_binary() else {
        eprintln!("skipped: no CRIU");
        return;
    };
    start_reaper();
    let exits = ExitWatcher::start().await.expect("exit watcher");
    let app = NetNs::from_file(anonymous_netns(), exits.clone()).expect("app netns");
    let client = NetNs::from_file(anonymous_netns(), exits.clone()).expect("client netns");
    let client_path = path_of(&client);
    for ns in [&app, &client] {
        run(&exits, ns, "ip", &["link", "set", "lo", "up"]).await;
    }
    run(
        &exits,
        &app,
        "ip",
        &[
            "link",
            "add",
            APP_IF,
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            &client_path,
        ],
    )
    .await;
    run(
        &exits,
        &app,
        "ip",
        &["addr", "add", &format!("{APP_IP}/24"), "dev", APP_IF],
    )
    .await;
    run(&exits, &app, "ip", &["link", "set", APP_IF, "up"]).await;
    run(
        &exits,
        &client,
        "ip",
        &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"],
    )
    .await;
    run(&exits, &client, "ip", &["link", "set", "c0", "up"]).await;
    // The namespace's own rules, which must survive: a chain of the app's.
    let own = "*filter\n:APP-OWN - [0:0]\n-A INPUT -p tcp -m tcp --dport 7999 -j APP-OWN\n\
               -A APP-OWN -j DROP\nCOMMIT\n";
    let mut cmd = Command::new("iptables-restore");
    cmd.args(["-w", "--noflush"]);
    let out = rules::run_in(&exits, app.fd(), cmd, Some(own), false)
        .await
        .unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);

    let pid = start_server(&app);
    let server = Killed(pid);
    let app_veth = format!("{APP_IP}:7001");
    assert_eq!(ask(&app, "127.0.0.1:7000").unwrap(), "pong 7000");
    assert_eq!(ask(&client, &app_veth).unwrap(), "pong 7001");

    // Hibernation's chains are in place (a FROZEN container's watch), and the dump takes
    // the runtime's lock: both are in the rules when CRIU saves them.
    let watch = ActivityWatch::start(
        &app,
        &WatchConfig {
            wake_ports: Some(vec![7001]),
            shadow: vec![(7002, None)],
            node: vec![],
            tag: "netlock-criu".into(),
        },
    )
    .await
    .expect("activity watch");

    let dir = TempDir(std::env::temp_dir().join(format!("ra-netlock-criu-{}", std::process::id())));
    let images = dir.0.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let spawner = Arc::new(ShimSpawner::new(exits.clone()));
    let criu = Criu::with_binary(&criu_bin)
        .spawner(spawner.clone())
        .stderr(CriuStderr::Null);
    let opts = CriuOptions::new()
        .pid(pid)
        .images_dir(&images)
        .work_dir(&dir.0)
        .log_file("dump.log")
        .log_level(4)
        .leave_running(false)
        .network_lock(CriuNetworkLockMethod::Skip);
    let netns = File::open(format!("/proc/{pid}/ns/net")).unwrap();
    let mut lock = LockWatch::new(exits.clone(), NetworkLock::Runtime, Some(netns));
    let dumped = criu.dump_with_notify(opts, &mut lock).await;
    let log = std::fs::read_to_string(dir.0.join("dump.log")).unwrap_or_default();
    dumped.unwrap_or_else(|e| panic!("dump: {e}\n{}", tail(&log)));
    assert!(
        lock.holds_lock(),
        "the runtime's lock was not taken at CRIU's network-lock"
    );
    // The tree's own namespace: what the runtime's dump does right after CRIU.
    let changed = netlock::scrub_rule_images(&images).expect("scrub");
    assert!(!changed.is_empty(), "no rule image had the lock in it");
    for entry in std::fs::read_dir(&images).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("iptables-")
            || name.starts_with("ip6tables-")
            || name.starts_with("nftables-")
        {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains("RUNC-ARCHITECT") && !text.contains("RA-HIB-"),
                "{name}:\n{text}"
            );
        }
    }
    drop(server);
    watch.stop().await.expect("stop the watch");
    // The old namespace goes (with its veth): the restore makes a new one.
    drop(lock);
    drop(app);

    let peer = Link(format!("ra-nl{}", std::process::id() % 100_000));
    let opts = CriuOptions::new()
        .images_dir(&images)
        .work_dir(&dir.0)
        .log_file("restore.log")
        .log_level(4)
        .rst_sibling(true)
        .external(format!("veth[{APP_IF}]:{}", peer.0));
    let restored = criu.restore(opts).await;
    let log = std::fs::read_to_string(dir.0.join("restore.log")).unwrap_or_default();
    let restored = restored.unwrap_or_else(|e| panic!("restore: {e}\n{}", tail(&log)));
    let _restored = Killed(restored.pid);

    let ns = NetNs::of_pid(restored.pid, exits.clone()).expect("restored netns");
    let rules_now = saved(&ns).await;
    assert!(
        !rules_now.contains("RUNC-ARCHITECT"),
        "the lock came back:\n{rules_now}"
    );
    assert!(
        !rules_now.contains(rules::PREFIX),
        "hibernation's chains came back:\n{rules_now}"
    );
    assert!(
        rules_now.contains(":APP-OWN"),
        "the namespace's own chain is gone:\n{rules_now}"
    );
    if rules::families().contains(&Family::V6) {
        let v6 = rules::save(&ns, Family::V6).await.unwrap();
        assert!(
            !v6.contains("RUNC-ARCHITECT"),
            "the IPv6 lock came back:\n{v6}"
        );
    }
    // Loopback answers.
    assert_eq!(
        ask(&ns, "127.0.0.1:7000").expect("loopback after restore"),
        "pong 7000"
    );
    // The veth: its peer came back here; into the client namespace with it.
    // (Through the reaper, like every program here: its thread reaps every child.)
    let here = NetNs::from_path("/proc/self/ns/net", exits.clone()).expect("this namespace");
    run(
        &exits,
        &here,
        "ip",
        &["link", "set", &peer.0, "netns", &client_path, "name", "c0"],
    )
    .await;
    run(
        &exits,
        &client,
        "ip",
        &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"],
    )
    .await;
    run(&exits, &client, "ip", &["link", "set", "c0", "up"]).await;
    assert_eq!(
        ask(&client, &app_veth).expect("veth after restore"),
        "pong 7001"
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
