//! The driver: one tokio task per hibernating container that feeds the [`Machine`] its
//! events (requests from the task API, network signals, timers, mechanism results) and
//! carries out its actions with the mechanisms ([`Tree`], the [`net`](super::net) pieces).
//!
//! Mechanism actions run inline, in order: a request that arrives during a dump waits in
//! the channel and is handled after it (the dump is a few hundred milliseconds; the
//! machine then wakes the container at once). Network signals are never lost meanwhile:
//! the activity watch keeps them in its socket and the hold keeps the packets themselves.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, info_span, warn, Instrument};

use super::net::{self, ActivityWatch, Hold, HoldConfig, NetNs, ProbeResponder, WatchConfig};
use super::policy::{Action, Event, ExecToken, Machine, Request, Settings, State};
use super::tree::{Tree, TreeConfig};
use crate::container::{Container, RuntimeEvent};
use crate::exits::ExitWatcher;

/// How long a woken container may take to listen again on the ports that woke it (a cold
/// start's fresh process) before the held connections are let through anyway.
const LISTEN_WAIT: Duration = Duration::from_secs(30);

/// How long a relayed connection may take to reach the woken app.
const RELAY_CONNECT: Duration = Duration::from_secs(10);

/// A hibernation transition, for the shim (events to containerd, the status file).
#[derive(Debug, Clone)]
pub struct Transition {
    pub container_id: String,
    pub from: State,
    pub to: State,
    pub at: SystemTime,
    /// The snapshot after the transition.
    pub snapshot: Snapshot,
    /// Why, for failures.
    pub reason: Option<String>,
}

/// What the shim shows of a hibernating container.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: State,
    pub since: SystemTime,
    pub last_activity: SystemTime,
    pub wakes: u64,
    pub last_wake: Option<Duration>,
    pub last_checkpoint: Option<Duration>,
    pub checkpoint_bytes: Option<u64>,
    pub memory_before: Option<u64>,
    pub memory_after: Option<u64>,
    pub checkpoint_failures: u64,
    pub restore_failures: u64,
    pub cold_starts: u64,
    /// The container's processes when it went to sleep (Pids while asleep).
    pub pids: Vec<u32>,
}

/// Why a request was not carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Rejected {
    #[error("container {0} is stopped")]
    Stopped(String),
    #[error("container {0}: hibernation has ended")]
    Gone(String),
}

/// What became of a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOutcome {
    /// Deliver it now (the container is awake).
    Deliver,
    /// The sleeping container was ended by it (SIGKILL): its exit is reported.
    Killed,
}

/// Everything a driver needs.
pub struct DriverConfig {
    pub settings: Settings,
    pub tree: TreeConfig,
    /// The container's network namespace: a pod's (by path), or its own (of its init).
    pub netns: NetNs,
}

enum Msg {
    Request {
        req: Request,
        reply: oneshot::Sender<Result<Grant, Rejected>>,
    },
    ExecExited(ExecToken),
    InitExited,
    Shutdown(oneshot::Sender<()>),
}

/// What a waiting request gets once the machine lets it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Go,
    Killed,
}

/// The handle of one container's hibernation (the container holds it; the driver task
/// holds the container only weakly).
pub struct Hibernation {
    id: String,
    tx: mpsc::UnboundedSender<Msg>,
    snapshot: watch::Receiver<Snapshot>,
    next_token: std::sync::atomic::AtomicU64,
    /// Resources an Update asked for while the container slept: applied at the wake.
    deferred_update: Mutex<Option<Vec<u8>>>,
}

/// An exec let through: its end is reported when this drops.
pub struct ExecPermit {
    token: ExecToken,
    tx: mpsc::UnboundedSender<Msg>,
}

impl Drop for ExecPermit {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::ExecExited(self.token));
    }
}

impl Hibernation {
    /// Starts the driver of `container`.
    pub fn start(
        container: &Arc<Container>,
        exits: ExitWatcher,
        events: mpsc::UnboundedSender<RuntimeEvent>,
        cfg: DriverConfig,
    ) -> Hibernation {
        let (tx, rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let machine = Machine::new(cfg.settings.clone(), now);
        let snapshot = Snapshot::of(&machine, now, &Facts::default());
        let (snap_tx, snap_rx) = watch::channel(snapshot);
        let id = container.id.clone();
        let tree = Tree::new(container.clone(), exits, cfg.tree);
        let driver = Driver {
            id: id.clone(),
            container: Arc::downgrade(container),
            machine,
            tree,
            ns: cfg.netns,
            settings: cfg.settings,
            events,
            snapshot: snap_tx,
            rx,
            watch: None,
            hold: None,
            responder: None,
            handed: Vec::new(),
            waiting: HashMap::new(),
            facts: Facts::default(),
            started_at: (now, SystemTime::now()),
        };
        let span = info_span!("hibernation", container = %id);
        tokio::spawn(driver.run().instrument(span));
        Hibernation {
            id,
            tx,
            snapshot: snap_rx,
            next_token: std::sync::atomic::AtomicU64::new(1),
            deferred_update: Mutex::new(None),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// Whether the container's processes are gone (SCALED_DOWN or WAKING).
    pub fn asleep(&self) -> bool {
        matches!(
            self.snapshot.borrow().state,
            State::ScaledDown | State::Waking | State::Checkpointing
        )
    }

    async fn request(&self, req: Request) -> Result<Grant, Rejected> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Request { req, reply })
            .map_err(|_| Rejected::Gone(self.id.clone()))?;
        rx.await.map_err(|_| Rejected::Gone(self.id.clone()))?
    }

    /// An exec is about to start: waits until the container is awake; the permit reports
    /// the exec's end when dropped.
    pub async fn exec(&self) -> Result<ExecPermit, Rejected> {
        let token = ExecToken(
            self.next_token
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        self.request(Request::Exec(token)).await?;
        Ok(ExecPermit {
            token,
            tx: self.tx.clone(),
        })
    }

    /// A signal for the init: waits until it may be delivered (a wake first), or says the
    /// sleeping container was ended by it.
    pub async fn signal(&self, sig: i32) -> Result<SignalOutcome, Rejected> {
        Ok(match self.request(Request::Signal(sig)).await? {
            Grant::Go => SignalOutcome::Deliver,
            Grant::Killed => SignalOutcome::Killed,
        })
    }

    /// containerd's Pause: waits until the container is awake and may be paused.
    pub async fn pause(&self) -> Result<(), Rejected> {
        self.request(Request::Pause).await.map(|_| ())
    }

    /// containerd's Resume.
    pub async fn resume(&self) -> Result<(), Rejected> {
        self.request(Request::Resume).await.map(|_| ())
    }

    /// Wakes the container (for a checkpoint or another operation that needs its
    /// processes) by the same path as an exec that ends at once.
    pub async fn wake(&self) -> Result<(), Rejected> {
        self.exec().await.map(drop)
    }

    /// The init exited on its own (not hibernation's kill).
    pub fn init_exited(&self) {
        let _ = self.tx.send(Msg::InitExited);
    }

    /// Keeps an Update for the wake (the container sleeps: its cgroups are empty).
    pub fn defer_update(&self, resources_json: Vec<u8>) {
        *self
            .deferred_update
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(resources_json);
    }

    /// The Update kept for the wake, if any (taken).
    pub fn take_deferred_update(&self) -> Option<Vec<u8>> {
        self.deferred_update
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Ends hibernation for a deleted container: removes its rules, listeners, local
    /// images and checkpoints; returns when done.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Measurements of mechanisms, kept for the snapshot.
#[derive(Default, Clone)]
struct Facts {
    memory_before: Option<u64>,
    memory_after: Option<u64>,
    pids: Vec<u32>,
    last_reason: Option<String>,
}

impl Snapshot {
    fn of(m: &Machine, now: Instant, facts: &Facts) -> Snapshot {
        let wall = |i: Instant| {
            SystemTime::now()
                .checked_sub(now.saturating_duration_since(i))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        let s = m.stats();
        Snapshot {
            state: m.state(),
            since: wall(m.since()),
            last_activity: wall(m.last_activity()),
            wakes: s.wakes,
            last_wake: s.last_wake_latency,
            last_checkpoint: s.last_checkpoint_duration,
            checkpoint_bytes: s.checkpoint_bytes,
            memory_before: facts.memory_before,
            memory_after: facts.memory_after,
            checkpoint_failures: s.failures.checkpoint,
            restore_failures: s.failures.restore,
            cold_starts: s.cold_starts,
            pids: facts.pids.clone(),
        }
    }
}

struct Driver {
    id: String,
    container: Weak<Container>,
    machine: Machine,
    tree: Tree,
    ns: NetNs,
    settings: Settings,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    snapshot: watch::Sender<Snapshot>,
    rx: mpsc::UnboundedReceiver<Msg>,
    watch: Option<ActivityWatch>,
    hold: Option<Hold>,
    responder: Option<ProbeResponder>,
    /// Node connections the responder handed out while asleep, relayed after the wake.
    handed: Vec<net::Handed>,
    /// Requests waiting for the machine, by request.
    waiting: HashMap<Request, Vec<oneshot::Sender<Result<Grant, Rejected>>>>,
    facts: Facts,
    started_at: (Instant, SystemTime),
}

/// What woke the driver's loop.
enum Input {
    Msg(Option<Msg>),
    Net(Result<net::Signal, net::NetError>),
    Wake(Result<net::WakeCause, net::NetError>),
    Handed(Option<net::Handed>),
    Timer,
}

impl Driver {
    async fn run(mut self) {
        if let Err(e) = self.start_watch().await {
            warn!(error = %e, "no activity watch: the container is never frozen nor scaled down");
            // Without a way to see activity, hibernating would strand the container.
            self.finish().await;
            self.idle_until_shutdown().await;
            return;
        }
        self.publish_snapshot();
        loop {
            let deadline = self.machine.next_deadline();
            let input = self.next_input(deadline).await;
            let now = Instant::now();
            let event = match input {
                Input::Msg(None) => break,
                Input::Msg(Some(Msg::Shutdown(done))) => {
                    self.finish().await;
                    let _ = done.send(());
                    self.reject_all();
                    return;
                }
                Input::Msg(Some(Msg::Request { req, reply })) => {
                    self.waiting.entry(req).or_default().push(reply);
                    request_event(req)
                }
                Input::Msg(Some(Msg::ExecExited(t))) => Event::ExecExited(t),
                Input::Msg(Some(Msg::InitExited)) => Event::Stop,
                Input::Net(Ok(net::Signal::Activity)) => Event::Activity,
                Input::Net(Ok(net::Signal::Touch)) => Event::Touch,
                Input::Net(Err(e)) => {
                    warn!(error = %e, "activity watch failed");
                    self.watch = None;
                    continue;
                }
                Input::Wake(Ok(cause)) => {
                    debug!(peer = %cause.peer, port = cause.port, syn = cause.syn, "wake");
                    Event::Activity
                }
                Input::Wake(Err(e)) => {
                    warn!(error = %e, "connection hold failed");
                    Event::Activity
                }
                Input::Handed(Some(h)) => {
                    self.handed.push(h);
                    Event::Activity
                }
                Input::Handed(None) => {
                    warn!("the probe responder stopped");
                    self.responder = None;
                    continue;
                }
                Input::Timer => Event::Tick,
            };
            self.step(now, event).await;
            if self.machine.state() == State::Exited {
                break;
            }
        }
        self.finish().await;
        self.reject_all();
        self.idle_until_shutdown().await;
    }

    /// Answers requests after the machine ended, until the container is deleted.
    async fn idle_until_shutdown(&mut self) {
        while let Some(msg) = self.rx.recv().await {
            match msg {
                Msg::Request { reply, .. } => {
                    let _ = reply.send(Err(Rejected::Stopped(self.id.clone())));
                }
                Msg::Shutdown(done) => {
                    let _ = done.send(());
                    return;
                }
                _ => {}
            }
        }
    }

    async fn next_input(&mut self, deadline: Option<Instant>) -> Input {
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let watch = async {
            match self.watch.as_mut() {
                Some(w) => w.next().await,
                None => std::future::pending().await,
            }
        };
        let hold = async {
            match self.hold.as_ref() {
                Some(h) => h.wake().await,
                None => std::future::pending().await,
            }
        };
        let responder = async {
            match self.responder.as_mut() {
                Some(r) => r.next_wake().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = self.rx.recv() => Input::Msg(m),
            s = watch => Input::Net(s),
            w = hold => Input::Wake(w),
            h = responder => Input::Handed(h),
            _ = timer => Input::Timer,
        }
    }

    /// Feeds `event` to the machine and carries out what it says, feeding the results
    /// back until nothing is left.
    async fn step(&mut self, now: Instant, event: Event) {
        let mut events = std::collections::VecDeque::from([event]);
        while let Some(ev) = events.pop_front() {
            let actions = self.machine.step(Instant::now().max(now), ev);
            for a in actions {
                if let Some(result) = self.perform(a).await {
                    events.push_back(result);
                }
            }
        }
        self.publish_snapshot();
    }

    fn container(&self) -> Option<Arc<Container>> {
        self.container.upgrade()
    }

    /// Carries out one action; the result event, if the action has one.
    async fn perform(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Transition { from, to, .. } => {
                self.transition(from, to);
                None
            }
            Action::Freeze => Some(match self.tree.freeze().await {
                Ok(took) => {
                    debug!(freeze_us = took.as_micros() as u64, "frozen");
                    Event::Frozen
                }
                Err(e) => Event::FreezeFailed {
                    reason: e.to_string(),
                },
            }),
            Action::Thaw => Some(match self.tree.thaw() {
                Ok(()) => Event::Thawed,
                Err(e) => Event::ThawFailed {
                    reason: e.to_string(),
                },
            }),
            Action::Checkpoint => Some(self.checkpoint().await),
            // Mechanisms run inline: a dump is never under way when this comes.
            Action::Abort => Some(Event::CheckpointAborted),
            Action::Restore => Some(self.wake(false).await),
            Action::ColdStart => Some(self.wake(true).await),
            Action::Kill => {
                self.kill_asleep().await;
                None
            }
            Action::ReportExit(status) => {
                if let Some(c) = self.container() {
                    c.report_exit(status as u32).await;
                }
                None
            }
            Action::RunExec(t) => {
                self.grant(Request::Exec(t), Grant::Go);
                None
            }
            Action::DeliverSignal(sig) => {
                self.grant(Request::Signal(sig), Grant::Go);
                None
            }
            Action::PauseTask => {
                self.grant(Request::Pause, Grant::Go);
                None
            }
            Action::ResumeTask => {
                self.grant(Request::Resume, Grant::Go);
                None
            }
            Action::Reject(req) => {
                for tx in self.waiting.remove(&req).unwrap_or_default() {
                    let _ = tx.send(Err(Rejected::Stopped(self.id.clone())));
                }
                None
            }
        }
    }

    /// Lets the oldest waiting caller of `req` through.
    fn grant(&mut self, req: Request, grant: Grant) {
        if let Some(list) = self.waiting.get_mut(&req) {
            if !list.is_empty() {
                let tx = list.remove(0);
                let _ = tx.send(Ok(grant));
            }
            if list.is_empty() {
                self.waiting.remove(&req);
            }
        }
    }

    fn reject_all(&mut self) {
        for (_, list) in self.waiting.drain() {
            for tx in list {
                let _ = tx.send(Err(Rejected::Stopped(self.id.clone())));
            }
        }
    }

    async fn start_watch(&mut self) -> Result<(), net::NetError> {
        let cfg = WatchConfig {
            wake_ports: self.settings.wake_ports.clone(),
            shadow: self.shadow(),
            node: self.node().await,
            tag: self.id.clone(),
        };
        self.watch = Some(ActivityWatch::start(&self.ns, &cfg).await?);
        Ok(())
    }

    fn shadow(&self) -> Vec<(u16, Option<u16>)> {
        self.settings
            .shadow_ports
            .iter()
            .map(|s| (s.port, s.app))
            .collect()
    }

    /// The node's side of the pod (kubelet probes come from there).
    async fn node(&self) -> Vec<IpAddr> {
        match self.ns.addresses().await {
            Ok(a) => a.gateways,
            Err(e) => {
                warn!(error = %e, "the pod's gateways are unknown: no traffic is taken for the node's");
                Vec::new()
            }
        }
    }

    /// The ports the held connections go to: the wake ports, else every port the
    /// container listens on now.
    async fn app_ports(&self) -> Vec<u16> {
        if let Some(p) = &self.settings.wake_ports {
            return p.clone();
        }
        self.ns.listening_ports().await.unwrap_or_default()
    }

    /// Scale-down: probe responder and hold first (no connection reaches a listener while
    /// it is dumped), then the tree's dump, store, kill.
    async fn checkpoint(&mut self) -> Event {
        let Some(container) = self.container() else {
            return Event::CheckpointFailed {
                reason: "the container is gone".into(),
            };
        };
        if container.has_running_execs() {
            return Event::CheckpointFailed {
                reason: "an exec process runs in the container".into(),
            };
        }
        let app_ports = self.app_ports().await;
        let responder = match ProbeResponder::start_for(&self.ns, 0, Some(&self.id)).await {
            Ok(r) => r,
            Err(e) => {
                return Event::CheckpointFailed {
                    reason: format!("probe responder: {e}"),
                }
            }
        };
        let hold_cfg = HoldConfig {
            app_ports,
            shadow: self.shadow(),
            node: self.node().await,
            responder_port: Some(responder.port()),
            tag: self.id.clone(),
        };
        let hold = match Hold::engage(&self.ns, &hold_cfg).await {
            Ok(h) => h,
            Err(e) => {
                responder.stop();
                return Event::CheckpointFailed {
                    reason: format!("connection hold: {e}"),
                };
            }
        };
        self.facts.pids = container
            .cgroups()
            .procs()
            .unwrap_or_default()
            .into_iter()
            .map(|p| p as u32)
            .collect();
        if let Err(e) = self.tree.freeze().await {
            let _ = hold.release().await;
            responder.stop();
            return Event::CheckpointFailed {
                reason: e.to_string(),
            };
        }
        match self.tree.scale_down().await {
            Ok(done) => {
                self.facts.memory_before = Some(done.memory_before);
                self.facts.memory_after = Some(done.memory_after);
                self.hold = Some(hold);
                self.responder = Some(responder);
                Event::CheckpointDone { bytes: done.bytes }
            }
            Err(e) => {
                warn!(error = %e, "checkpoint failed: the container stays awake");
                // Thawed by the machine's Thaw; the held connections go to the app then.
                let _ = self.tree.thaw();
                let _ = hold.release().await;
                responder.stop();
                self.facts.last_reason = Some(e.to_string());
                Event::CheckpointFailed {
                    reason: e.to_string(),
                }
            }
        }
    }

    /// Restore (or, `cold`, start afresh from the spec), then let the held connections
    /// through once the process listens, then relay the node connections that arrived
    /// meanwhile.
    async fn wake(&mut self, cold: bool) -> Event {
        let result = if cold {
            self.tree.cold_start().await
        } else {
            self.tree.restore().await
        };
        match result {
            Ok(w) => {
                if let Some(c) = self.container() {
                    if let Some(update) = c.hibernation().and_then(|h| h.take_deferred_update()) {
                        if let Err(e) = c.apply_update(update).await {
                            warn!(error = %e, "the update deferred to the wake failed");
                        }
                    }
                }
                self.release_held(w.cold).await;
                if w.cold {
                    Event::ColdStarted
                } else {
                    Event::Restored
                }
            }
            Err(e) => {
                let reason = e.to_string();
                warn!(error = %reason, cold, "wake failed");
                self.facts.last_reason = Some(reason.clone());
                if cold {
                    Event::ColdStartFailed { reason }
                } else {
                    Event::RestoreFailed { reason }
                }
            }
        }
    }

    async fn release_held(&mut self, cold: bool) {
        if cold {
            // A fresh process must listen before the held connections reach it.
            let want: Vec<u16> = match &self.settings.wake_ports {
                Some(p) => p.clone(),
                None => self.handed_ports(),
            };
            let deadline = Instant::now() + LISTEN_WAIT;
            while Instant::now() < deadline {
                let now = self.ns.listening_ports().await.unwrap_or_default();
                if !now.is_empty() && want.iter().all(|p| now.contains(p)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if let Some(hold) = self.hold.take() {
            match hold.release().await {
                Ok(n) => debug!(held = n, "held connections released"),
                Err(e) => warn!(error = %e, "release the held connections"),
            }
        }
        if let Some(r) = self.responder.take() {
            let late = r.finish().await;
            self.handed.extend(late);
        }
        if !self.handed.is_empty() {
            info!(
                connections = self.handed.len(),
                "relaying the node's connections that arrived while asleep"
            );
        }
        for h in std::mem::take(&mut self.handed) {
            let Some(app) = h.original_dst else {
                continue;
            };
            let ns = self.ns.clone();
            tokio::spawn(async move {
                if let Err(e) = net::relay(&ns, h, app, RELAY_CONNECT).await {
                    warn!(%app, "relay: {e}");
                }
            });
        }
    }

    /// The app ports the handed-out node connections were for.
    fn handed_ports(&self) -> Vec<u16> {
        self.handed
            .iter()
            .filter_map(|h| h.original_dst.map(|a| a.port()))
            .collect()
    }

    /// SIGKILL while asleep: no restore; the hold goes (connections to a dead task are
    /// refused from now on) and so do the local images.
    async fn kill_asleep(&mut self) {
        if let Some(hold) = self.hold.take() {
            let _ = hold.release().await;
        }
        self.handed.clear();
        if let Some(r) = self.responder.take() {
            r.close().await;
        }
        self.tree.forget_sleep();
        self.grant(Request::Signal(super::policy::SIGKILL), Grant::Killed);
    }

    /// Everything of hibernation goes: rules, listeners, images, checkpoints.
    async fn finish(&mut self) {
        if let Some(w) = self.watch.take() {
            if let Err(e) = w.stop().await {
                warn!(error = %e, "remove the activity rules");
            }
        }
        if let Some(hold) = self.hold.take() {
            let _ = hold.release().await;
        }
        self.handed.clear();
        if let Some(r) = self.responder.take() {
            r.close().await;
        }
        self.tree.discard().await;
    }

    fn transition(&mut self, from: State, to: State) {
        let now = Instant::now();
        info!(from = from.as_str(), to = to.as_str(), "hibernation");
        let snapshot = Snapshot::of(&self.machine, now, &self.facts);
        let _ = self.events.send(RuntimeEvent::Hibernation(Transition {
            container_id: self.id.clone(),
            from,
            to,
            at: SystemTime::now(),
            snapshot,
            reason: self.facts.last_reason.take(),
        }));
    }

    fn publish_snapshot(&self) {
        let _ = self.started_at;
        self.snapshot
            .send_replace(Snapshot::of(&self.machine, Instant::now(), &self.facts));
    }
}

fn request_event(req: Request) -> Event {
    match req {
        Request::Exec(t) => Event::Exec(t),
        Request::Signal(s) => Event::Signal(s),
        Request::Pause => Event::Pause,
        Request::Resume => Event::Resume,
    }
}
