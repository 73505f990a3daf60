//! Hibernation's network mechanisms in real network namespaces (root only).
//!
//! Every test builds its own world: three anonymous network namespaces (made by a thread
//! that unshared, held only by this test's fds, so they vanish with their veths and
//! rules when the test ends, also when it fails), "app" wired by one veth pair to "node"
//! (the app's default gateway: where kubelet's probes come from) and by another to
//! "client". Servers are small tokio servers on sockets made inside the app namespace;
//! clients use sockets made inside theirs. Programs (`ip`, `iptables-save`) run through
//! the runtime's own runner and the shim's reaper, which this binary provides the way
//! the shim does (publishing exits on containerd-shim's monitor), from a thread blocked in
//! `waitpid`.
//!
//! What is shown: activity for a new connection and for payload, none for a kube-probe
//! request, the node or a shadow port, a short connection seen after it closed; the hold
//! keeping a connection pending without a reset until the server is back, then serving
//! it (also 100 at once, and a keep-alive connection's data); probes from the node
//! answered without the app; a real request from the node relayed; a shadow port refused
//! at once; no rule left after stop, release and remove_all. It prints the idle CPU of a
//! watch and the NFLOG event latency.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use runc_architect_runtime::hibernate::net::rules::{self, Family};
use runc_architect_runtime::hibernate::net::{
    relay, ActivityWatch, Hold, HoldConfig, NetNs, ProbeResponder, Signal, WatchConfig,
};
use runc_architect_runtime::ExitWatcher;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

const APP_NODE_IP: &str = "10.214.1.2";
const NODE_IP: &str = "10.214.1.1";
const APP_CLIENT_IP: &str = "10.214.2.2";
const CLIENT_IP: &str = "10.214.2.1";
const APP_NODE_IP6: &str = "fd14:1::2";
const NODE_IP6: &str = "fd14:1::1";

const WAIT: Duration = Duration::from_secs(5);

// ---- the shim's reaper, as containerd-shim runs it ---------------------------------

fn start_reaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("reaper runtime");
            loop {
                reap(&rt);
            }
        });
    });
}

/// Waits for any child to end and publishes its exit. A thread blocked in `waitpid`
/// rather than a SIGCHLD handler: tokio's handler would wake every runtime of the
/// process at each exit (its signal pipe is shared), and the idle-CPU measurement must
/// see only the watch.
fn reap(rt: &tokio::runtime::Runtime) {
    use nix::sys::wait::{waitpid, WaitStatus};
    let (pid, code) = match waitpid(None, None) {
        Ok(WaitStatus::Exited(pid, code)) => (pid, code),
        Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
        Ok(_) => return,
        // No child yet.
        Err(_) => {
            std::thread::sleep(Duration::from_millis(2));
            return;
        }
    };
    let _ = rt.block_on(
        containerd_shim::asynchronous::monitor::monitor_notify_by_pid(pid.as_raw(), code),
    );
}

// ---- the world -----------------------------------------------------------------------

/// A network namespace nobody else can see: held by this fd only.
fn anonymous_netns() -> File {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare a netns");
        File::open("/proc/thread-self/ns/net").expect("open the new netns")
    })
    .join()
    .expect("netns thread")
}

struct World {
    exits: ExitWatcher,
    app: NetNs,
    node: NetNs,
    client: NetNs,
}

impl World {
    async fn new() -> World {
        start_reaper();
        let exits = ExitWatcher::start().await.expect("exit watcher");
        let ns = |f| NetNs::from_file(f, exits.clone()).expect("netns");
        let world = World {
            app: ns(anonymous_netns()),
            node: ns(anonymous_netns()),
            client: ns(anonymous_netns()),
            exits,
        };
        let node_fd = path_of(&world.node);
        let client_fd = path_of(&world.client);
        for ns in [&world.app, &world.node, &world.client] {
            world.ip(ns, &["link", "set", "lo", "up"]).await;
        }
        world
            .ip(
                &world.app,
                &[
                    "link", "add", "to-node", "type", "veth", "peer", "name", "n0", "netns",
                    &node_fd,
                ],
            )
            .await;
        world
            .ip(
                &world.app,
                &[
                    "link", "add", "to-cli", "type", "veth", "peer", "name", "c0", "netns",
                    &client_fd,
                ],
            )
            .await;
        let a = &world.app;
        world
            .ip(
                a,
                &[
                    "addr",
                    "add",
                    &format!("{APP_NODE_IP}/24"),
                    "dev",
                    "to-node",
                ],
            )
            .await;
        world
            .ip(
                a,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{APP_NODE_IP6}/64"),
                    "dev",
                    "to-node",
                    "nodad",
                ],
            )
            .await;
        world
            .ip(
                a,
                &[
                    "addr",
                    "add",
                    &format!("{APP_CLIENT_IP}/24"),
                    "dev",
                    "to-cli",
                ],
            )
            .await;
        world.ip(a, &["link", "set", "to-node", "up"]).await;
        world.ip(a, &["link", "set", "to-cli", "up"]).await;
        world
            .ip(a, &["route", "add", "default", "via", NODE_IP])
            .await;
        world
            .ip(a, &["-6", "route", "add", "default", "via", NODE_IP6])
            .await;
        let n = &world.node;
        world
            .ip(n, &["addr", "add", &format!("{NODE_IP}/24"), "dev", "n0"])
            .await;
        world
            .ip(
                n,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{NODE_IP6}/64"),
                    "dev",
                    "n0",
                    "nodad",
                ],
            )
            .await;
        world.ip(n, &["link", "set", "n0", "up"]).await;
        let c = &world.client;
        world
            .ip(c, &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"])
            .await;
        world.ip(c, &["link", "set", "c0", "up"]).await;
        world
    }

    async fn ip(&self, ns: &NetNs, args: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args(args);
        let out = rules::run_in(&self.exits, ns.fd(), cmd, None, false)
            .await
            .expect("run ip");
        assert_eq!(out.code, 0, "ip {args:?}: {}", out.stderr);
    }

    /// What `iptables-save` and `ip6tables-save` print in the app namespace.
    async fn saved_rules(&self) -> String {
        let mut all = String::new();
        for f in rules::families() {
            all.push_str(&rules::save(&self.app, *f).await.expect("save rules"));
        }
        all
    }

    /// Waits until no rule of ours is left in the app namespace (a stopped responder's
    /// chain goes in the background), then asserts so.
    async fn assert_no_ours_soon(&self) {
        let deadline = Instant::now() + WAIT;
        let mut left = self.saved_rules().await;
        while left.contains(rules::PREFIX) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            left = self.saved_rules().await;
        }
        assert_no_ours(&left);
    }

    fn watch_config(&self, tag: &str) -> WatchConfig {
        WatchConfig {
            wake_ports: Some(vec![8080]),
            shadow: vec![(9100, None), (19090, Some(8080))],
            node: vec![NODE_IP.parse().unwrap(), NODE_IP6.parse().unwrap()],
            tag: tag.into(),
        }
    }

    fn hold_config(&self, tag: &str, responder: Option<u16>) -> HoldConfig {
        HoldConfig {
            app_ports: vec![8080],
            shadow: vec![(9100, None), (19090, Some(8080))],
            node: vec![NODE_IP.parse().unwrap(), NODE_IP6.parse().unwrap()],
            responder_port: responder,
            tag: tag.into(),
        }
    }
}

/// A path another process can open the namespace by.
fn path_of(ns: &NetNs) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), ns.fd().as_raw_fd())
}

/// A listener made in `ns`.
fn listen(ns: &NetNs, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    let l = ns
        .run(move || std::net::TcpListener::bind(addr))
        .expect("enter")
        .expect("bind");
    l.set_nonblocking(true).unwrap();
    TcpListener::from_std(l).unwrap()
}

/// The app: each line received is answered `served: LINE`; the connection ends at EOF.
fn serve(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = conn.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("served: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    })
}

/// A socket made in `ns` for `to`'s family.
fn socket_in(ns: &NetNs, to: SocketAddr) -> TcpSocket {
    ns.run(move || {
        if to.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    })
    .expect("enter")
    .expect("socket")
}

async fn connect(ns: &NetNs, to: &str) -> std::io::Result<TcpStream> {
    let to: SocketAddr = to.parse().unwrap();
    tokio::time::timeout(WAIT, socket_in(ns, to).connect(to))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Sends one line, reads one line back.
async fn ask(conn: &mut TcpStream, line: &str) -> String {
    conn.write_all(format!("{line}\n").as_bytes())
        .await
        .expect("send");
    let mut reader = BufReader::new(conn);
    let mut answer = String::new();
    tokio::time::timeout(WAIT, reader.read_line(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    answer.trim_end().to_string()
}

/// Every signal the watch gives within `d`.
async fn signals_within(watch: &mut ActivityWatch, d: Duration) -> Vec<Signal> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(s) = tokio::time::timeout_at(deadline, watch.next()).await {
        out.push(s.expect("watch"));
    }
    out
}

/// Lets the rate limit refill and forgets what came before.
async fn quiet(watch: &mut ActivityWatch) {
    tokio::time::sleep(Duration::from_millis(150)).await;
    while watch.try_next().expect("watch").is_some() {}
}

fn assert_no_ours(rules: &str) {
    assert!(
        !rules.contains(rules::PREFIX),
        "rules of ours left behind:\n{rules}"
    );
}

// ---- activity ------------------------------------------------------------------------

#[tokio::test]
async fn activity_for_connections_and_payload() {
    let w = World::new().await;
    let _server = serve(listen(&w.app, "0.0.0.0:8080"));
    let mut watch = ActivityWatch::start(&w.app, &w.watch_config("act"))
        .await
        .unwrap();
    assert!(w.saved_rules().await.contains("RA-HIB-ACT-"));

    let mut conn = connect(&w.client, &format!("{APP_CLIENT_IP}:8080"))
        .await
        .unwrap();
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        got.contains(&Signal::Activity),
        "no activity for a new connection: {got:?}"
    );

    quiet(&mut watch).await;
    assert_eq!(ask(&mut conn, "hello").await, "served: hello");
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        got.contains(&Signal::Activity),
        "no activity for payload: {got:?}"
    );

    // Nothing while nothing happens.
    quiet(&mut watch).await;
    let got = signals_within(&mut watch, Duration::from_millis(400)).await;
    assert!(got.is_empty(), "signals with no traffic: {got:?}");

    watch.stop().await.unwrap();
    assert_no_ours(&w.saved_rules().await);
}

#[tokio::test]
async fn probes_node_and_shadow_ports_do_not_count() {
    let w = World::new().await;
    let _app = serve(listen(&w.app, "0.0.0.0:8080"));
    let _metrics = serve(listen(&w.app, "0.0.0.0:9100"));
    let mut watch = ActivityWatch::start(&w.app, &w.watch_config("excl"))
        .await
        .unwrap();

    // A kube-probe request on a connection made before (its SYN counted).
    let mut conn = connect(&w.client, &format!("{APP_CLIENT_IP}:8080"))
        .await
        .unwrap();
    quiet(&mut watch).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: app\r\nUser-Agent: kube-probe/1.32\r\n\r\n")
        .await
        .unwrap();
    // The app answers the probe (it is RUNNING: probes reach it), one line per line.
    let probe_answer = "served: GET /healthz HTTP/1.1\nserved: Host: app\n\
                        served: User-Agent: kube-probe/1.32\nserved: \n";
    let mut answer = vec![0u8; probe_answer.len()];
    tokio::time::timeout(WAIT, conn.read_exact(&mut answer))
        .await
        .expect("the probe's answer in time")
        .expect("read the probe's answer");
    assert_eq!(String::from_utf8_lossy(&answer), probe_answer);
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        !got.contains(&Signal::Activity),
        "a kube-probe request counted: {got:?}"
    );
    assert!(
        got.contains(&Signal::Touch),
        "a kube-probe request is no touch: {got:?}"
    );

    // A real request from the node: a touch, not activity.
    quiet(&mut watch).await;
    let mut from_node = connect(&w.node, &format!("{APP_NODE_IP}:8080"))
        .await
        .unwrap();
    assert_eq!(
        ask(&mut from_node, "from the node").await,
        "served: from the node"
    );
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        !got.contains(&Signal::Activity),
        "the node's request counted: {got:?}"
    );
    assert!(
        got.contains(&Signal::Touch),
        "the node's request is no touch: {got:?}"
    );

    // The shadow port, and SHADOW:APP reaching the app.
    quiet(&mut watch).await;
    let mut shadow = connect(&w.client, &format!("{APP_CLIENT_IP}:9100"))
        .await
        .unwrap();
    assert_eq!(ask(&mut shadow, "scrape").await, "served: scrape");
    let mut pair = connect(&w.client, &format!("{APP_CLIENT_IP}:19090"))
        .await
        .unwrap();
    assert_eq!(ask(&mut pair, "via shadow").await, "served: via shadow");
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        !got.contains(&Signal::Activity),
        "shadow ports counted: {got:?}"
    );
    assert!(
        got.contains(&Signal::Touch),
        "shadow ports are no touch: {got:?}"
    );

    // While the same client's request to the app does count.
    quiet(&mut watch).await;
    assert_eq!(ask(&mut conn, "real").await, "served: real");
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        got.contains(&Signal::Activity),
        "a real request did not count: {got:?}"
    );

    watch.stop().await.unwrap();
    assert_no_ours(&w.saved_rules().await);
}

#[tokio::test]
async fn loopback_clients_count_and_the_shims_own_do_not() {
    let w = World::new().await;
    let _app = serve(listen(&w.app, "0.0.0.0:8080"));
    let _sidecar = serve(listen(&w.app, "127.0.0.1:7070"));
    let mut watch = ActivityWatch::start(&w.app, &w.watch_config("lo"))
        .await
        .unwrap();
    quiet(&mut watch).await;

    // A sidecar calling the app over lo: activity, for the connection and its payload.
    let mut conn = connect(&w.app, "127.0.0.1:8080").await.unwrap();
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        got.contains(&Signal::Activity),
        "a loopback connection did not count: {got:?}"
    );
    quiet(&mut watch).await;
    assert_eq!(ask(&mut conn, "over lo").await, "served: over lo");
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        got.contains(&Signal::Activity),
        "loopback payload did not count: {got:?}"
    );

    // The shim's own connection (the relay's, marked) counts nowhere.
    quiet(&mut watch).await;
    let to: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let mut shim = runc_architect_runtime::hibernate::net::relay::connect(&w.app, to, WAIT)
        .await
        .unwrap();
    assert_eq!(ask(&mut shim, "relayed").await, "served: relayed");
    // Nor does the rest of the pod talking over lo.
    let mut side = connect(&w.app, "127.0.0.1:7070").await.unwrap();
    assert_eq!(ask(&mut side, "sidecar").await, "served: sidecar");
    let got = signals_within(&mut watch, Duration::from_millis(500)).await;
    assert!(
        got.is_empty(),
        "the shim's or the pod's own lo traffic counted: {got:?}"
    );

    watch.stop().await.unwrap();
    assert_no_ours(&w.saved_rules().await);
}

#[tokio::test]
async fn a_short_connection_is_not_missed() {
    let w = World::new().await;
    let _server = serve(listen(&w.app, "0.0.0.0:8080"));
    let mut watch = ActivityWatch::start(&w.app, &w.watch_config("short"))
        .await
        .unwrap();
    quiet(&mut watch).await;
    // Opened and closed while nobody reads the watch.
    drop(
        connect(&w.client, &format!("{APP_CLIENT_IP}:8080"))
            .await
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = tokio::time::timeout(Duration::from_secs(1), watch.next())
        .await
        .expect("the closed connection was missed")
        .unwrap();
    assert_eq!(s, Signal::Activity);
    watch.stop().await.unwrap();
}

#[tokio::test]
async fn idle_watch_costs_no_cpu_and_events_are_fast() {
    let w = World::new().await;
    let _server = serve(listen(&w.app, "0.0.0.0:8080"));
    // The watch runs alone on a runtime of its own, on one thread, whose CPU time is
    // measured: this test's runtime also runs its exit watcher, which hears the exits of
    // every program the tests running beside it start.
    let (app, client, cfg) = (w.app.clone(), w.client.clone(), w.watch_config("cpu"));
    let (spent, idle, lat) = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the watch's runtime");
        rt.block_on(measure_watch(app, client, cfg))
    })
    .await
    .expect("the measuring thread");
    println!(
        "idle watch: {:.3} ms CPU in {idle:?} ({:.4} % of a core)",
        spent.as_secs_f64() * 1e3,
        spent.as_secs_f64() / idle.as_secs_f64() * 100.0
    );
    println!(
        "NFLOG event latency (connect to next()): median {:?}, min {:?}, max {:?} over {}",
        lat[lat.len() / 2],
        lat[0],
        lat[lat.len() - 1],
        lat.len()
    );
    assert!(
        spent < Duration::from_millis(2),
        "an idle watch spent {spent:?}"
    );
    assert!(
        lat[lat.len() / 2] < Duration::from_millis(20),
        "slow events: {lat:?}"
    );
    assert_no_ours(&w.saved_rules().await);
}

/// The idle CPU of a watch on the calling thread, the idle time, and the latencies from
/// a client's connect to `next()` returning (sorted).
async fn measure_watch(
    app: NetNs,
    client: NetNs,
    cfg: WatchConfig,
) -> (Duration, Duration, Vec<Duration>) {
    let mut watch = ActivityWatch::start(&app, &cfg).await.unwrap();
    quiet(&mut watch).await;
    let cpu = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the valid one we pass.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let idle = Duration::from_secs(2);
    let before = cpu();
    let r = tokio::time::timeout(idle, watch.next()).await;
    let spent = cpu() - before;
    assert!(r.is_err(), "a signal with no traffic: {r:?}");

    let mut lat = Vec::new();
    for _ in 0..15 {
        quiet(&mut watch).await;
        let to: SocketAddr = format!("{APP_CLIENT_IP}:8080").parse().unwrap();
        let sock = socket_in(&client, to);
        let t = Instant::now();
        let conn = tokio::spawn(sock.connect(to));
        let s = tokio::time::timeout(WAIT, watch.next())
            .await
            .unwrap()
            .unwrap();
        lat.push(t.elapsed());
        assert_eq!(s, Signal::Activity);
        drop(conn.await);
    }
    lat.sort();
    watch.stop().await.unwrap();
    (spent, idle, lat)
}

#[tokio::test]
async fn watches_of_two_containers_share_a_namespace() {
    let w = World::new().await;
    let _a = serve(listen(&w.app, "0.0.0.0:8080"));
    let _b = serve(listen(&w.app, "0.0.0.0:9090"));
    let mut a = ActivityWatch::start(&w.app, &w.watch_config("container-a"))
        .await
        .unwrap();
    let cfg_b = WatchConfig {
        wake_ports: Some(vec![9090]),
        ..w.watch_config("container-b")
    };
    let mut b = ActivityWatch::start(&w.app, &cfg_b).await.unwrap();
    assert_ne!(a.groups(), b.groups());
    assert!(a.chains().iter().all(|c| !b.chains().contains(c)));
    // The same tag in another namespace gets the same groups: they are per namespace.
    let other = World::new().await;
    let a2 = ActivityWatch::start(&other.app, &other.watch_config("container-a"))
        .await
        .unwrap();
    assert_eq!(a.groups(), a2.groups());
    a2.stop().await.unwrap();

    quiet(&mut a).await;
    quiet(&mut b).await;
    drop(
        connect(&w.client, &format!("{APP_CLIENT_IP}:9090"))
            .await
            .unwrap(),
    );
    let got_b = signals_within(&mut b, Duration::from_millis(400)).await;
    let got_a = signals_within(&mut a, Duration::from_millis(100)).await;
    assert!(
        got_b.contains(&Signal::Activity),
        "b missed its port: {got_b:?}"
    );
    assert!(
        !got_a.contains(&Signal::Activity),
        "a counted b's port: {got_a:?}"
    );
    a.stop().await.unwrap();
    let left = w.saved_rules().await;
    assert!(
        left.contains("RA-HIB-ACT-"),
        "b's rules went with a's:\n{left}"
    );
    b.stop().await.unwrap();
    assert_no_ours(&w.saved_rules().await);
}

// ---- hold ----------------------------------------------------------------------------

#[tokio::test]
async fn a_held_connection_is_served_after_release() {
    let w = World::new().await;
    let server = serve(listen(&w.app, "0.0.0.0:8080"));
    // SCALED_DOWN: the app is gone.
    server.abort();
    let _ = server.await;
    let hold = Hold::engage(&w.app, &w.hold_config("held", None))
        .await
        .unwrap();
    assert!(w.saved_rules().await.contains("RA-HIB-HOLD-"));

    let to: SocketAddr = format!("{APP_CLIENT_IP}:8080").parse().unwrap();
    let sock = socket_in(&w.client, to);
    let started = Instant::now();
    let pending = tokio::spawn(async move { (sock.connect(to).await, Instant::now()) });
    let cause = tokio::time::timeout(WAIT, hold.wake())
        .await
        .unwrap()
        .unwrap();
    assert!(cause.syn, "{cause:?}");
    assert_eq!(cause.port, 8080);
    assert_eq!(cause.peer.ip(), CLIENT_IP.parse::<IpAddr>().unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "the connect ended while held (reset?)"
    );

    // The restore: the app listens again, then the hold lets go.
    let _back = serve(listen(&w.app, "0.0.0.0:8080"));
    let held = hold.release().await.unwrap();
    assert!(held >= 1, "held {held}");
    let (conn, done) = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    let mut conn = conn.expect("the held connect failed");
    let took = done - started;
    assert!(
        took < Duration::from_millis(1000),
        "the connect took {took:?}: its SYN was retransmitted"
    );
    assert_eq!(
        ask(&mut conn, "after the wake").await,
        "served: after the wake"
    );
    assert_no_ours(&w.saved_rules().await);
}

#[tokio::test]
async fn a_loopback_client_is_held_and_served_after_release() {
    let w = World::new().await;
    // A sidecar of the pod, on lo: its own traffic must keep flowing while the app sleeps.
    let _sidecar = serve(listen(&w.app, "127.0.0.1:7070"));
    let hold = Hold::engage(&w.app, &w.hold_config("loopback", None))
        .await
        .unwrap();
    let saved = w.saved_rules().await;
    assert!(saved.contains("-i lo -p tcp -j RA-HIB-HOLDLO-"), "{saved}");

    // A client inside the namespace calls the sleeping app: held, not reset.
    let to: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let sock = socket_in(&w.app, to);
    let started = Instant::now();
    let pending = tokio::spawn(async move { (sock.connect(to).await, Instant::now()) });
    let cause = tokio::time::timeout(WAIT, hold.wake())
        .await
        .unwrap()
        .unwrap();
    assert!(cause.syn, "{cause:?}");
    assert_eq!(
        (cause.peer.ip(), cause.port),
        ("127.0.0.1".parse::<IpAddr>().unwrap(), 8080)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "the loopback connect ended while held (reset?)"
    );

    // The pod's other traffic on lo is not held.
    let mut side = connect(&w.app, "127.0.0.1:7070")
        .await
        .expect("the sidecar is held");
    assert_eq!(ask(&mut side, "ping").await, "served: ping");
    // The shim's own (marked) connections are not held: to the dead port, refused at once.
    let held_before = hold.held();
    let t = Instant::now();
    let shim =
        runc_architect_runtime::hibernate::net::relay::connect(&w.app, to, Duration::ZERO).await;
    assert!(shim.is_err(), "something listened on the app's port");
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "the shim's connect was held"
    );
    assert_eq!(hold.held(), held_before, "the shim's packets were held");

    let _back = serve(listen(&w.app, "0.0.0.0:8080"));
    assert!(hold.release().await.unwrap() >= 1);
    let (conn, done) = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    let mut conn = conn.expect("the held loopback connect failed");
    assert!(
        done - started < Duration::from_millis(1000),
        "its SYN was retransmitted"
    );
    assert_eq!(
        ask(&mut conn, "from a sidecar").await,
        "served: from a sidecar"
    );
    assert_no_ours(&w.saved_rules().await);
}

#[tokio::test]
async fn a_hundred_held_connections_are_all_served() {
    let w = World::new().await;
    let hold = Hold::engage(&w.app, &w.hold_config("burst", None))
        .await
        .unwrap();
    let to: SocketAddr = format!("{APP_CLIENT_IP}:8080").parse().unwrap();
    let mut clients = Vec::new();
    for i in 0..100 {
        let sock = socket_in(&w.client, to);
        clients.push(tokio::spawn(async move {
            let mut conn = tokio::time::timeout(Duration::from_secs(10), sock.connect(to))
                .await
                .map_err(|_| format!("client {i}: connect timed out"))?
                .map_err(|e| format!("client {i}: {e}"))?;
            let answer = ask(&mut conn, &format!("client {i}")).await;
            Ok::<_, String>((i, answer))
        }));
    }
    tokio::time::timeout(WAIT, hold.wake())
        .await
        .unwrap()
        .unwrap();
    // Let all 100 SYNs arrive.
    let deadline = Instant::now() + WAIT;
    while hold.held() < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hold.held() >= 100, "only {} packets held", hold.held());
    let _app = serve(listen(&w.app, "0.0.0.0:8080"));
    let held = hold.release().await.unwrap();
    assert!(held >= 100);
    let mut served = 0;
    for c in clients {
        let (i, answer) = c.await.unwrap().unwrap();
        assert_eq!(answer, format!("served: client {i}"));
        served += 1;
    }
    assert_eq!(served, 100);
    assert_no_ours(&w.saved_rules().await);
}

#[tokio::test]
async fn keep_alive_data_is_held_and_delivered() {
    let w = World::new().await;
    let _server = serve(listen(&w.app, "0.0.0.0:8080"));
    let mut conn = connect(&w.client, &format!("{APP_CLIENT_IP}:8080"))
        .await
        .unwrap();
    assert_eq!(ask(&mut conn, "before").await, "served: before");

    let hold = Hold::engage(&w.app, &w.hold_config("keepalive", None))
        .await
        .unwrap();
    conn.write_all(b"during\n").await.unwrap();
    let cause = tokio::time::timeout(WAIT, hold.wake())
        .await
        .unwrap()
        .unwrap();
    assert!(!cause.syn, "{cause:?}");
    assert_eq!(cause.port, 8080);
    // Held: no answer comes.
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf))
            .await
            .is_err(),
        "data got through the hold"
    );
    hold.release().await.unwrap();
    let mut reader = BufReader::new(&mut conn);
    let mut answer = String::new();
    tokio::time::timeout(WAIT, reader.read_line(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.trim_end(), "served: during");
}

#[tokio::test]
async fn probes_from_the_node_are_answered_while_held() {
    let w = World::new().await;
    let responder = ProbeResponder::start(&w.app, 0).await.unwrap();
    let hold = Hold::engage(&w.app, &w.hold_config("probes", Some(responder.port())))
        .await
        .unwrap();

    for target in [
        format!("{APP_NODE_IP}:8080"),
        format!("[{APP_NODE_IP6}]:8080"),
    ] {
        // kubelet's HTTP probe.
        let mut conn = connect(&w.node, &target).await.unwrap();
        conn.write_all(
            b"GET /healthz HTTP/1.1\r\nHost: app:8080\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, conn.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{target}: {answer:?}"
        );
        // kubelet's TCP probe: connect, close.
        drop(connect(&w.node, &target).await.expect("a TCP probe failed"));
    }
    let deadline = Instant::now() + WAIT;
    while responder.counts().tcp < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let counts = responder.counts();
    assert_eq!(
        (counts.http, counts.tcp, counts.handed),
        (2, 2, 0),
        "{counts:?}"
    );
    assert_eq!(hold.held(), 0, "probes were held");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), hold.wake())
            .await
            .is_err(),
        "a probe woke the container"
    );
    hold.release().await.unwrap();
    responder.stop();
    w.assert_no_ours_soon().await;
}

#[tokio::test]
async fn a_real_request_from_the_node_is_relayed() {
    let w = World::new().await;
    let mut responder = ProbeResponder::start(&w.app, 0).await.unwrap();
    let hold = Hold::engage(&w.app, &w.hold_config("relay", Some(responder.port())))
        .await
        .unwrap();
    let mut conn = connect(&w.node, &format!("{APP_NODE_IP}:8080"))
        .await
        .unwrap();
    let request = b"GET /real HTTP/1.1\r\nHost: app\r\n\r\n";
    conn.write_all(request).await.unwrap();
    let handed = tokio::time::timeout(WAIT, responder.next_wake())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(handed.peer.ip(), NODE_IP.parse::<IpAddr>().unwrap());
    let app_addr: SocketAddr = format!("{APP_NODE_IP}:8080").parse().unwrap();
    assert_eq!(handed.original_dst, Some(app_addr));
    assert!(handed.head.starts_with(b"GET /real"));

    // The wake: the app is back, the hold lets go (its rules all gone: nothing is
    // redirected any more), the responder stops, the handed connection is relayed. Its
    // answers still reach the node: the connection was redirected, so it lives on
    // conntrack's NAT binding, which must outlast the hold's rules.
    let _app = serve(listen(&w.app, "0.0.0.0:8080"));
    hold.release().await.unwrap();
    let after = w.saved_rules().await;
    assert!(
        !after.contains("RA-HIB-HOLD-") && !after.contains("RA-HIB-PROBE-"),
        "hold rules left after release:\n{after}"
    );
    responder.stop();
    let ns = w.app.clone();
    let relaying =
        tokio::spawn(async move { relay(&ns, handed, app_addr, Duration::from_secs(2)).await });
    // The app answers each line (without its CR: it reads lines).
    let mut reader = BufReader::new(&mut conn);
    let mut first = String::new();
    tokio::time::timeout(WAIT, reader.read_line(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, "served: GET /real HTTP/1.1\n");
    // Half-close from the client ends the relay once the app has answered the rest.
    let mut rest = String::new();
    reader.get_mut().shutdown().await.unwrap();
    tokio::time::timeout(WAIT, reader.read_to_string(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, "served: Host: app\nserved: \n");
    let stats = tokio::time::timeout(WAIT, relaying)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(stats.to_app, request.len() as u64);
    assert_eq!(stats.to_client, (first.len() + rest.len()) as u64);

    // With the relay done and the responder gone, nothing of ours is left.
    w.assert_no_ours_soon().await;
}

#[tokio::test]
async fn a_shadow_port_is_refused_at_once_while_held() {
    let w = World::new().await;
    let hold = Hold::engage(&w.app, &w.hold_config("shadow", None))
        .await
        .unwrap();
    for port in [9100, 19090] {
        let t = Instant::now();
        let r = connect(&w.client, &format!("{APP_CLIENT_IP}:{port}")).await;
        let e = r.expect_err("a shadow port accepted a connection while held");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{port}: {e}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{port}: refused after {:?}",
            t.elapsed()
        );
    }
    assert_eq!(hold.held(), 0);
    hold.release().await.unwrap();
}

// ---- rules and the namespace ---------------------------------------------------------

#[tokio::test]
async fn no_rule_is_left_behind() {
    let w = World::new().await;
    // Both families, both tables, after remove_all (shim delete after a crash).
    let watch = ActivityWatch::start(&w.app, &w.watch_config("left"))
        .await
        .unwrap();
    let hold = Hold::engage(&w.app, &w.hold_config("left", Some(41000)))
        .await
        .unwrap();
    let saved = w.saved_rules().await;
    for chain in [
        "RA-HIB-ACT-",
        "RA-HIB-LO-",
        "RA-HIB-TOUCH-",
        "RA-HIB-SHADOW-",
        "RA-HIB-HOLD-",
        "RA-HIB-HOLDLO-",
        "RA-HIB-PROBE-",
    ] {
        assert!(saved.contains(chain), "{chain} missing:\n{saved}");
    }
    if rules::families().contains(&Family::V6) {
        let v6 = rules::save(&w.app, Family::V6).await.unwrap();
        assert!(
            v6.contains("RA-HIB-HOLD-") && v6.contains("fd14:1::1"),
            "{v6}"
        );
    }
    // Installing again changes nothing (idempotent).
    let again = ActivityWatch::start(&w.app, &w.watch_config("left"))
        .await
        .unwrap();
    let saved2 = w.saved_rules().await;
    assert_eq!(
        saved2.matches("-j RA-HIB-ACT-").count(),
        saved.matches("-j RA-HIB-ACT-").count(),
        "a second start duplicated the jumps:\n{saved2}"
    );
    let removed = rules::remove_all(&w.app).await.unwrap();
    assert!(removed >= 5, "removed {removed}");
    assert_no_ours(&w.saved_rules().await);
    // Stopping what remove_all already cleaned is fine.
    again.stop().await.unwrap();
    watch.stop().await.unwrap();
    hold.release().await.unwrap();
    assert_no_ours(&w.saved_rules().await);
    assert_eq!(rules::remove_all(&w.app).await.unwrap(), 0);
}

#[tokio::test]
async fn the_namespace_as_the_mechanisms_see_it() {
    let w = World::new().await;
    let _v4 = listen(&w.app, "0.0.0.0:8080");
    let _v6 = listen(&w.app, "[::]:9090");
    let _lo = listen(&w.app, "127.0.0.1:7070");
    let ports = w.app.listening_ports().await.unwrap();
    assert_eq!(ports, vec![7070, 8080, 9090]);
    let listeners = w.app.tcp_listeners().await.unwrap();
    assert!(listeners
        .iter()
        .any(|l| l.addr == "[::]:9090".parse().unwrap()));
    let inodes =
        runc_architect_runtime::hibernate::net::socket_inodes_of(std::process::id() as i32)
            .unwrap();
    assert!(listeners.iter().all(|l| inodes.contains(&l.inode)));

    let addrs = w.app.addresses().await.unwrap();
    for a in [APP_NODE_IP, APP_CLIENT_IP, APP_NODE_IP6] {
        assert!(
            addrs.local.contains(&a.parse().unwrap()),
            "{a} not in {addrs:?}"
        );
    }
    assert_eq!(
        addrs.gateways,
        vec![
            NODE_IP.parse::<IpAddr>().unwrap(),
            NODE_IP6.parse().unwrap()
        ]
    );
    // The node's namespace has none of it.
    assert!(w.node.listening_ports().await.unwrap().is_empty());
}
