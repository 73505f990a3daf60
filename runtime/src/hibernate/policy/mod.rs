//! The hibernation policy: one container's state machine, and its settings.
//!
//! The machine decides and does nothing else: no file system, no clock, no thread, no
//! tokio. The driver (one task per container) feeds it [`Event`]s stamped with the time
//! it read (`Machine::step(now, event)`), carries out the [`Action`]s it returns in their
//! order, and sends [`Event::Tick`] at [`Machine::next_deadline`]. Because every input is
//! explicit, each transition below is a unit test with `start + Duration` instants.
//!
//! # States
//!
//! `RUNNING` → (idle `freeze_after`) → `FROZEN` → (idle `scaledown_after`, counted from the
//! last activity) → `CHECKPOINTING` (shown as FROZEN) → `SCALED_DOWN` → (wake) → `WAKING` →
//! `RUNNING`; [`State::Exited`] is terminal (the task ended: the driver drops the machine).
//!
//! "Idle" is measured from the last [`Event::Activity`] (start counts as one). Nothing
//! hibernates before `initial_delay` after the start, while containerd has the task
//! paused, while an exec runs in it, within [`SIGNAL_GRACE`] of a delivered signal, or
//! before a failure's backoff has run out. A tier that is off (`None`) is skipped:
//! without `freeze_after` RUNNING goes straight to CHECKPOINTING after `scaledown_after`;
//! without `scaledown_after` a FROZEN container stays frozen while idle. When
//! `scaledown_after <= freeze_after` freezing first is pointless, and RUNNING goes straight
//! to CHECKPOINTING too.
//!
//! # Contract with the driver
//!
//! Actions change the state when they are emitted (the machine is optimistic: freezing
//! and thawing are sub-millisecond cgroup writes, and actions are carried out in order,
//! so a `RunExec` after a `Thaw` runs in the thawed container). Every action that changes
//! the state is followed by an [`Action::Transition`] `{from, to, at}` for the driver to
//! log, publish and record. Each mechanism action is answered by exactly one result event:
//!
//! | action         | answered by                                                     |
//! |----------------|-----------------------------------------------------------------|
//! | `Freeze`       | `Frozen` or `FreezeFailed`                                      |
//! | `Thaw`         | `Thawed` or `ThawFailed`                                        |
//! | `Checkpoint`   | `CheckpointDone`, `CheckpointFailed`, or after `Abort` also `CheckpointAborted` |
//! | `Restore`      | `Restored` or `RestoreFailed`                                   |
//! | `ColdStart`    | `ColdStarted` or `ColdStartFailed`                              |
//! | `RunExec(t)`   | `ExecExited(t)` when it ends (also when it failed to start)     |
//! | `PauseTask` / `ResumeTask` | `PauseOutcome { paused }` (optional, see Paused below) |
//!
//! `Abort`, `Kill`, `ReportExit`, `DeliverSignal`, `Reject` and `Transition` have no
//! answer. Results that do not match what the machine is waiting for (late, duplicated)
//! are ignored, apart from counting failures. The machine never believes a frozen cgroup
//! thawed: after a failed thaw it stays on the frozen side and thaws again every
//! [`THAW_RETRY`] (thawing a thawed cgroup is harmless). Requests (`Exec`, `Signal`, `Pause`, `Resume`)
//! are never lost: each one is answered by exactly one of `RunExec`, `DeliverSignal`,
//! `PauseTask`, `ResumeTask` (carried out, in the order the requests came), `Kill` (a
//! SIGKILL that ended a sleeping container) or `Reject` (the task ended before it could
//! be carried out); until then it waits in the machine's queue.
//!
//! # Transitions, state by state
//!
//! **RUNNING**
//! - `Tick`: scale-down due → `Checkpoint` → CHECKPOINTING (the mechanism freezes
//!   first); else freeze due → `Freeze` → FROZEN; else, after a failed thaw, `Thaw` again
//!   once [`THAW_RETRY`] has passed.
//! - `Activity`: resets the idle clock. `Touch`: nothing (it never counts).
//! - `Exec` → `RunExec`; `Signal` → `DeliverSignal` (and [`SIGNAL_GRACE`] unless SIGKILL);
//!   `Pause` → `PauseTask`; `Resume` → `ResumeTask` (restarts the idle clock).
//! - `ExecExited`: the exec is over; its end counts as activity (someone just used it).
//!   No hibernation while an exec runs (a `kubectl exec` shell must not freeze under its
//!   user). Every exec wakes a sleeping container, kubelet's exec probes too: the shim
//!   cannot tell them from a user's exec.
//! - `Stop` (the init exited on its own) → EXITED; the exit is reported the usual way.
//!
//! **FROZEN**
//! - `Tick`: scale-down due → `Checkpoint` → CHECKPOINTING; else when a touch's grace is
//!   over, `Freeze` again (the state stays FROZEN).
//! - `Activity` → `Thaw` → RUNNING (idle clock reset).
//! - `Touch` → `Thaw` for a moment: re-frozen [`TOUCH_GRACE`] after the last touch, the
//!   state stays FROZEN and the idle clock runs on (probes never keep it awake).
//! - `Exec`, `Signal`, `Pause` → `Thaw` → RUNNING, then as in RUNNING. A SIGKILL gives
//!   `Thaw` + `DeliverSignal(9)`. Any other signal is not network activity and does not
//!   reset the idle clock, but the container stays awake for [`SIGNAL_GRACE`] after it:
//!   re-freezing it after a touch's 500 ms would stall a graceful shutdown (SIGTERM →
//!   flush) until the SIGKILL at the end of the grace period, losing exactly what the
//!   shutdown was meant to save. A `Pause` thaws first so that the freezer passes from us
//!   to containerd's pause cleanly (a failed pause then leaves a running task, not one
//!   frozen by nobody); the container is RUNNING and paused.
//! - `Resume` (not paused) → `ResumeTask`, which refuses as the stock shim does.
//! - `FreezeFailed` → `Thaw` → RUNNING, retried after the backoff.
//! - `Stop` → EXITED.
//!
//! **CHECKPOINTING** (the dump runs; the network is held)
//! - `Activity`, `Exec`, `Signal`, `Pause` → `Abort` (once; requests are queued). The
//!   mechanism answers `CheckpointAborted` → `Thaw` → RUNNING, queue carried out; or, if
//!   the dump had finished, `CheckpointDone` → SCALED_DOWN and at once `Restore` → WAKING
//!   (or, with a SIGKILL queued, `Kill` + `ReportExit(137)` → EXITED); or
//!   `CheckpointFailed`, taken as the abort's (no backoff).
//! - `CheckpointDone` → SCALED_DOWN; the backoff is reset.
//! - `CheckpointFailed` → `Thaw` → RUNNING; retried after the backoff ([`BACKOFF_FIRST`]
//!   doubling to [`BACKOFF_MAX`], reset by a checkpoint that succeeds). A
//!   `CheckpointAborted` that nobody asked for counts as a failure.
//! - `Touch`, `Tick`: nothing. `Stop` → `Abort` → EXITED.
//!
//! **SCALED_DOWN** (no process; the probe responder answers probes, so no `Touch` comes)
//! - `Activity`, `Exec`, `Signal` (not SIGKILL), `Pause` → `Restore` → WAKING (requests
//!   queued; the pause is carried out once awake).
//! - `Signal(SIGKILL)` → `Kill` + `ReportExit(137)` → EXITED, no restore.
//! - `Resume` (nothing is paused) → `ResumeTask`, which refuses as the stock shim does.
//! - `Stop`: ignored (there is no process to exit; the kill after the dump is not one).
//!
//! **WAKING**
//! - `Exec`, `Signal`, `Pause`, `Resume`: queued until `Restored`/`ColdStarted`.
//! - `Restored` → RUNNING, the wake counted with its latency (from the event that
//!   started it), the idle clock reset, the queue carried out in order.
//! - `RestoreFailed` → `ColdStart` (from the original spec), unless a SIGKILL is queued:
//!   then `Kill` + `ReportExit(137)` → EXITED (no cold start just to kill it).
//! - `ColdStarted` → RUNNING as after a start (the initial delay applies again).
//! - `ColdStartFailed` → `ReportExit(255)` → EXITED, as a failed start would.
//! - `Stop` (the restored task exited at once) → EXITED, queue rejected.
//!
//! **Paused** (containerd's Pause; only ever in RUNNING): no timer runs; requests are
//! carried out at once as the stock shim would (it refuses an exec into a paused task);
//! `Resume` → `ResumeTask`, and the idle clock restarts. The machine takes the task as
//! paused from the `PauseTask` on (and as running from the `ResumeTask` on), because the
//! driver may carry the operation out later, outside its loop, and nothing must be frozen
//! in between. After each `PauseTask`/`ResumeTask`, carried out, refused or failed, the
//! driver should report `PauseOutcome { paused }` (whether the task is paused right after
//! it); reports come in order, so the last one is the truth. Without reports a failed
//! pause only keeps the container from hibernating until the next Resume.
//!
//! **EXITED**: requests → `Reject`; everything else is ignored.

pub mod duration;
pub mod settings;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

pub use settings::{NodeDefaults, NodeOptions, Settings, SettingsError, ShadowPort};

/// A touched FROZEN container is re-frozen this long after the last touch.
pub const TOUCH_GRACE: Duration = Duration::from_millis(500);
/// A delivered signal keeps the container awake at least this long (kubelet's default
/// termination grace period: a graceful shutdown is not frozen half-way).
pub const SIGNAL_GRACE: Duration = Duration::from_secs(30);
/// The first retry after a failed freeze or checkpoint.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// The longest backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// After a failed thaw, the next try.
pub const THAW_RETRY: Duration = Duration::from_secs(1);
/// The signal that ends a sleeping container without waking it.
pub const SIGKILL: i32 = 9;
/// The exit status of a task ended by SIGKILL.
pub const EXIT_SIGKILL: i32 = 128 + SIGKILL;
/// The exit status of a task whose cold start failed.
pub const EXIT_COLD_START_FAILED: i32 = 255;

/// Where a container is in its hibernation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Running,
    Frozen,
    /// Internal: the dump is running; shown as FROZEN.
    Checkpointing,
    ScaledDown,
    Waking,
    /// Terminal: the task ended.
    Exited,
}

impl State {
    /// The machine's own name (`CHECKPOINTING` included), for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "RUNNING",
            State::Frozen => "FROZEN",
            State::Checkpointing => "CHECKPOINTING",
            State::ScaledDown => "SCALED_DOWN",
            State::Waking => "WAKING",
            State::Exited => "EXITED",
        }
    }

    /// What `runc-architect status` shows: CHECKPOINTING is FROZEN to a user.
    pub fn shown(self) -> &'static str {
        match self {
            State::Checkpointing => State::Frozen.as_str(),
            other => other.as_str(),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one exec request (the driver maps it to containerd's exec id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecToken(pub u64);

/// What the driver tells the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A deadline ([`Machine::next_deadline`]) may have passed.
    Tick,
    /// A new connection or payload on a wake port, not a probe, not a shadow port.
    Activity,
    /// Traffic that must be answered but does not count (a probe, a shadow port, the node).
    Touch,
    /// containerd's Exec: it waits until the container is awake.
    Exec(ExecToken),
    /// An exec the machine let run ([`Action::RunExec`]) ended (or never started).
    ExecExited(ExecToken),
    /// containerd's Kill of the init with this signal.
    Signal(i32),
    /// containerd's Pause.
    Pause,
    /// containerd's Resume.
    Resume,
    /// The init exited on its own (not the kill after a dump: the driver swallows that).
    Stop,
    Frozen,
    FreezeFailed {
        reason: String,
    },
    Thawed,
    ThawFailed {
        reason: String,
    },
    /// The checkpoint is durable in the store and the processes are gone.
    CheckpointDone {
        bytes: u64,
    },
    /// The checkpoint failed; the container is still there (frozen).
    CheckpointFailed {
        reason: String,
    },
    /// The checkpoint was cancelled ([`Action::Abort`]) before the processes were killed.
    CheckpointAborted,
    Restored,
    RestoreFailed {
        reason: String,
    },
    ColdStarted,
    ColdStartFailed {
        reason: String,
    },
    /// After a [`Action::PauseTask`] or [`Action::ResumeTask`] was carried out (also
    /// refused or failed): whether the task is paused now.
    PauseOutcome {
        paused: bool,
    },
}

/// A request from containerd that must be answered, and may have to wait for a wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    Exec(ExecToken),
    Signal(i32),
    Pause,
    Resume,
}

/// What the machine tells the driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The state changed (log it, publish it, write the state file).
    Transition { from: State, to: State, at: Instant },
    /// Freeze the container's cgroup.
    Freeze,
    /// Thaw the container's cgroup.
    Thaw,
    /// Freeze, hold the network, dump, make the images durable in the store, then kill
    /// the processes (their exit swallowed).
    Checkpoint,
    /// Cancel the running checkpoint if the processes are still there.
    Abort,
    /// Restore the container from its checkpoint, then release the held connections.
    Restore,
    /// Start the container afresh from its original spec (the restore failed).
    ColdStart,
    /// End the sleeping container without a restore: kill what is left in its cgroup,
    /// drop the network hold, delete its local checkpoint generations.
    Kill,
    /// Report the task's exit with this status (TaskExit, Wait returns).
    ReportExit(i32),
    /// Let this exec run now.
    RunExec(ExecToken),
    /// Deliver this signal to the init now.
    DeliverSignal(i32),
    /// Carry out containerd's Pause now, as the stock shim does.
    PauseTask,
    /// Carry out containerd's Resume now, as the stock shim does.
    ResumeTask,
    /// The task ended before this request could be carried out.
    Reject(Request),
}

/// Failures by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failures {
    pub freeze: u64,
    pub thaw: u64,
    pub checkpoint: u64,
    pub restore: u64,
    pub cold_start: u64,
}

impl Failures {
    pub fn total(&self) -> u64 {
        self.freeze + self.thaw + self.checkpoint + self.restore + self.cold_start
    }
}

/// What happened to the container so far (for the status file and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// RUNNING → FROZEN.
    pub freezes: u64,
    /// FROZEN → RUNNING (by activity or a request).
    pub thaws: u64,
    /// Thaws for a touch (FROZEN stays FROZEN).
    pub touch_thaws: u64,
    /// Checkpoints that succeeded.
    pub checkpoints: u64,
    /// The size of the last successful checkpoint.
    pub checkpoint_bytes: Option<u64>,
    /// From `Checkpoint` to `CheckpointDone`, last time.
    pub last_checkpoint_duration: Option<Duration>,
    /// Wakes from SCALED_DOWN (by restore or cold start).
    pub wakes: u64,
    /// From the event that started the last wake to `Restored`/`ColdStarted`.
    pub last_wake_latency: Option<Duration>,
    pub cold_starts: u64,
    pub failures: Failures,
    /// The reason given with the last failure.
    pub last_failure: Option<String>,
}

/// Which mechanism a WAKING container waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waking {
    Restore,
    ColdStart,
}

/// One container's hibernation state machine.
#[derive(Debug, Clone)]
pub struct Machine {
    settings: Settings,
    state: State,
    since: Instant,
    /// The start (or the last cold start): the initial delay counts from here.
    started: Instant,
    last_activity: Instant,
    /// The machine froze the cgroup (by `Freeze`, or `Checkpoint` which freezes first) and
    /// has not thawed it; also true after a failed thaw.
    frozen: bool,
    /// FROZEN but thawed for a touch: re-freeze at this time.
    touch_until: Option<Instant>,
    /// containerd paused the task (only ever while RUNNING).
    paused: bool,
    /// Execs running in the container.
    execs: BTreeSet<ExecToken>,
    /// Requests waiting for the wake, in order.
    queue: VecDeque<Request>,
    /// CHECKPOINTING: `Abort` was sent.
    abort_requested: bool,
    /// When the event that asked for the current (or coming) wake arrived.
    wake_cause: Option<Instant>,
    waking: Option<Waking>,
    checkpoint_started: Option<Instant>,
    /// No hibernation before this (a delivered signal).
    signal_hold_until: Option<Instant>,
    /// No hibernation before this (a failure's backoff).
    retry_at: Option<Instant>,
    freeze_failures_in_row: u32,
    checkpoint_failures_in_row: u32,
    /// RUNNING after a failed thaw: thaw again at this time.
    thaw_retry_at: Option<Instant>,
    stats: Stats,
}

/// `min(BACKOFF_FIRST * 2^(n-1), BACKOFF_MAX)` for the n-th failure in a row.
pub fn backoff(failures_in_row: u32) -> Duration {
    let doublings = failures_in_row.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

fn later(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn earlier(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl Machine {
    /// A machine for a container started (its init running) at `started`.
    pub fn new(settings: Settings, started: Instant) -> Machine {
        Machine {
            settings,
            state: State::Running,
            since: started,
            started,
            last_activity: started,
            frozen: false,
            touch_until: None,
            paused: false,
            execs: BTreeSet::new(),
            queue: VecDeque::new(),
            abort_requested: false,
            wake_cause: None,
            waking: None,
            checkpoint_started: None,
            signal_hold_until: None,
            retry_at: None,
            freeze_failures_in_row: 0,
            checkpoint_failures_in_row: 0,
            thaw_retry_at: None,
            stats: Stats::default(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// When the current state was entered.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The last activity (the start, if none yet): the idle clock counts from here.
    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether containerd has the task paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Requests waiting for the wake, oldest first.
    pub fn queued(&self) -> impl Iterator<Item = &Request> {
        self.queue.iter()
    }

    /// When the driver must send [`Event::Tick`] (`None`: no timer; a later event will
    /// tell). A tick at or after it is fine; an early one does nothing.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Running if !self.paused => {
                let retry = self.thaw_retry_at.filter(|_| self.frozen);
                earlier(retry, earlier(self.scaledown_due(), self.freeze_due()))
            }
            State::Frozen => {
                let refreeze = self.touch_until.filter(|_| !self.frozen);
                earlier(refreeze, self.scaledown_due())
            }
            _ => None,
        }
    }

    /// Feeds one event at `now`; returns what to do, in order.
    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Tick => self.tick(now, &mut out),
            Event::Activity => self.activity(now, &mut out),
            Event::Touch => self.touch(now, &mut out),
            Event::Exec(token) => self.request(now, Request::Exec(token), &mut out),
            Event::Signal(sig) => self.request(now, Request::Signal(sig), &mut out),
            Event::Pause => self.request(now, Request::Pause, &mut out),
            Event::Resume => self.request(now, Request::Resume, &mut out),
            Event::ExecExited(token) => {
                if self.execs.remove(&token) {
                    self.last_activity = self.last_activity.max(now);
                }
            }
            Event::Stop => self.stop(now, &mut out),
            Event::Frozen => {
                if self.state == State::Frozen {
                    self.freeze_failures_in_row = 0;
                }
            }
            Event::FreezeFailed { reason } => self.freeze_failed(now, reason, &mut out),
            Event::Thawed => self.thaw_retry_at = None,
            Event::ThawFailed { reason } => self.thaw_failed(now, reason),
            Event::CheckpointDone { bytes } => self.checkpoint_done(now, bytes, &mut out),
            Event::CheckpointFailed { reason } => {
                if self.state == State::Checkpointing && self.abort_requested {
                    // The abort's doing, most likely: not the checkpoint's failure.
                    self.checkpoint_over(now, &mut out);
                } else {
                    self.checkpoint_failed(now, reason, &mut out);
                }
            }
            Event::CheckpointAborted => {
                if self.state != State::Checkpointing {
                    // Stale: nothing is being checkpointed.
                } else if self.abort_requested {
                    self.checkpoint_over(now, &mut out);
                } else {
                    let reason = "checkpoint aborted without being asked to".to_string();
                    self.checkpoint_failed(now, reason, &mut out);
                }
            }
            Event::Restored => {
                if self.waking == Some(Waking::Restore) {
                    self.woken(now, &mut out);
                }
            }
            Event::RestoreFailed { reason } => self.restore_failed(now, reason, &mut out),
            Event::ColdStarted => {
                if self.waking == Some(Waking::ColdStart) {
                    self.stats.cold_starts += 1;
                    // A new start: the initial delay applies again, the backoffs are gone.
                    self.started = now;
                    self.retry_at = None;
                    self.freeze_failures_in_row = 0;
                    self.checkpoint_failures_in_row = 0;
                    self.woken(now, &mut out);
                }
            }
            Event::ColdStartFailed { reason } => {
                self.fail(reason, |f| &mut f.cold_start);
                if self.waking == Some(Waking::ColdStart) {
                    self.waking = None;
                    out.push(Action::ReportExit(EXIT_COLD_START_FAILED));
                    self.exit(now, &mut out);
                }
            }
            Event::PauseOutcome { paused } => {
                // A task is only ever paused while RUNNING.
                if self.state == State::Running {
                    self.set_paused(now, paused);
                }
            }
        }
        out
    }

    fn transition(&mut self, now: Instant, to: State, out: &mut Vec<Action>) {
        out.push(Action::Transition {
            from: self.state,
            to,
            at: now,
        });
        self.state = to;
        self.since = now;
    }

    fn fail(&mut self, reason: String, kind: impl FnOnce(&mut Failures) -> &mut u64) {
        *kind(&mut self.stats.failures) += 1;
        self.stats.last_failure = Some(reason);
    }

    /// Hibernation may act at all (the gates that do not depend on time).
    fn may_hibernate(&self) -> bool {
        self.settings.enabled && !self.paused && self.execs.is_empty() && self.queue.is_empty()
    }

    /// The earliest time hibernation may act; `None` if never (an overflow: a delay
    /// beyond the end of `Instant`).
    fn not_before(&self) -> Option<Instant> {
        let delay_over = self.started.checked_add(self.settings.initial_delay)?;
        Some(
            [self.signal_hold_until, self.retry_at]
                .into_iter()
                .flatten()
                .fold(delay_over, Instant::max),
        )
    }

    fn due(&self, after: Option<Duration>) -> Option<Instant> {
        if !self.may_hibernate() {
            return None;
        }
        let at = self.last_activity.checked_add(after?)?;
        Some(at.max(self.not_before()?))
    }

    fn freeze_due(&self) -> Option<Instant> {
        self.due(self.settings.freeze_after)
    }

    fn scaledown_due(&self) -> Option<Instant> {
        self.due(self.settings.scaledown_after)
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let is_due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        match self.state {
            State::Running if !self.paused => {
                if is_due(self.scaledown_due()) {
                    self.start_checkpoint(now, out);
                } else if is_due(self.freeze_due()) {
                    if !self.frozen {
                        out.push(Action::Freeze);
                        self.frozen = true;
                    }
                    // (Already frozen after a failed thaw: it simply is FROZEN now.)
                    self.thaw_retry_at = None;
                    self.stats.freezes += 1;
                    self.transition(now, State::Frozen, out);
                } else if self.frozen && is_due(self.thaw_retry_at) {
                    self.thaw_retry_at = None;
                    self.thaw(out);
                }
            }
            State::Frozen => {
                if is_due(self.scaledown_due()) {
                    self.start_checkpoint(now, out);
                } else if !self.frozen && is_due(self.touch_until) {
                    self.touch_until = None;
                    self.frozen = true;
                    out.push(Action::Freeze);
                }
            }
            _ => {}
        }
    }

    fn start_checkpoint(&mut self, now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Checkpoint);
        self.frozen = true;
        self.touch_until = None;
        self.thaw_retry_at = None;
        self.abort_requested = false;
        self.wake_cause = None;
        self.checkpoint_started = Some(now);
        self.transition(now, State::Checkpointing, out);
    }

    fn activity(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.last_activity = self.last_activity.max(now);
        self.wake(now, out);
    }

    fn touch(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.state != State::Frozen {
            return;
        }
        if self.frozen {
            self.stats.touch_thaws += 1;
            self.thaw(out);
        }
        self.touch_until = now.checked_add(TOUCH_GRACE).or(Some(now));
    }

    /// Starts waking the container from where it is (nothing when it is awake).
    fn wake(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.state {
            State::Frozen => {
                if self.frozen {
                    self.thaw(out);
                }
                self.touch_until = None;
                self.stats.thaws += 1;
                self.transition(now, State::Running, out);
            }
            State::Checkpointing => {
                self.wake_cause.get_or_insert(now);
                if !self.abort_requested {
                    self.abort_requested = true;
                    out.push(Action::Abort);
                }
            }
            State::ScaledDown => {
                self.wake_cause.get_or_insert(now);
                self.waking = Some(Waking::Restore);
                out.push(Action::Restore);
                self.transition(now, State::Waking, out);
            }
            State::Running | State::Waking | State::Exited => {}
        }
    }

    fn request(&mut self, now: Instant, request: Request, out: &mut Vec<Action>) {
        match self.state {
            State::Exited => out.push(Action::Reject(request)),
            State::Running if self.queue.is_empty() => self.carry_out(now, request, out),
            _ if request == Request::Resume && self.queue.is_empty() => {
                // Nothing asleep is paused: the stock answer (it refuses), no wake.
                self.carry_out(now, request, out)
            }
            State::ScaledDown if request == Request::Signal(SIGKILL) => {
                self.queue.push_back(request);
                self.kill_now(now, out);
            }
            State::Frozen => {
                self.wake(now, out);
                self.carry_out(now, request, out);
            }
            _ => {
                self.queue.push_back(request);
                self.wake(now, out);
            }
        }
    }

    /// Carries a request out as in RUNNING.
    fn carry_out(&mut self, now: Instant, request: Request, out: &mut Vec<Action>) {
        match request {
            Request::Exec(token) => {
                self.execs.insert(token);
                out.push(Action::RunExec(token));
            }
            Request::Signal(sig) => {
                if sig != SIGKILL {
                    self.signal_hold_until =
                        later(self.signal_hold_until, now.checked_add(SIGNAL_GRACE));
                }
                out.push(Action::DeliverSignal(sig));
            }
            Request::Pause => {
                // Only ever carried out while RUNNING (a FROZEN container is thawed first).
                self.set_paused(now, true);
                out.push(Action::PauseTask);
            }
            Request::Resume => {
                self.set_paused(now, false);
                out.push(Action::ResumeTask);
            }
        }
    }

    fn thaw(&mut self, out: &mut Vec<Action>) {
        self.frozen = false;
        out.push(Action::Thaw);
    }

    /// The idle clock restarts when a paused task runs again.
    fn set_paused(&mut self, now: Instant, paused: bool) {
        if self.paused && !paused {
            self.last_activity = self.last_activity.max(now);
        }
        self.paused = paused;
    }

    fn flush_queue(&mut self, now: Instant, out: &mut Vec<Action>) {
        while let Some(request) = self.queue.pop_front() {
            self.carry_out(now, request, out);
        }
    }

    /// The container ended: requests still waiting are rejected.
    fn exit(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.transition(now, State::Exited, out);
        self.execs.clear();
        self.frozen = false;
        self.paused = false;
        self.touch_until = None;
        self.waking = None;
        for request in std::mem::take(&mut self.queue) {
            out.push(Action::Reject(request));
        }
    }

    /// A SIGKILL is queued and there is no process: end it without a restore. The first
    /// queued SIGKILL is answered by `Kill`; the other requests are rejected.
    fn kill_now(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Some(i) = self
            .queue
            .iter()
            .position(|r| *r == Request::Signal(SIGKILL))
        {
            self.queue.remove(i);
        }
        out.push(Action::Kill);
        out.push(Action::ReportExit(EXIT_SIGKILL));
        self.exit(now, out);
    }

    fn stop(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.state {
            State::Exited | State::ScaledDown => {}
            State::Checkpointing => {
                if !self.abort_requested {
                    out.push(Action::Abort);
                }
                self.exit(now, out);
            }
            State::Running | State::Frozen | State::Waking => self.exit(now, out),
        }
    }

    fn freeze_failed(&mut self, now: Instant, reason: String, out: &mut Vec<Action>) {
        self.fail(reason, |f| &mut f.freeze);
        if self.state == State::Frozen && self.frozen {
            // Undo whatever part of the freeze took, and try again after the backoff.
            self.touch_until = None;
            self.thaw(out);
            self.freeze_failures_in_row += 1;
            self.retry_at = now.checked_add(backoff(self.freeze_failures_in_row));
            self.transition(now, State::Running, out);
        }
    }

    fn thaw_failed(&mut self, now: Instant, reason: String) {
        self.fail(reason, |f| &mut f.thaw);
        match self.state {
            // Also when paused meanwhile: the retry waits for the pause's end. (A Resume
            // may have thawed it by then; thawing a thawed cgroup is harmless, believing a
            // frozen one thawed is not, so the belief stays on the frozen side.)
            State::Running if !self.frozen => {
                self.frozen = true;
                self.thaw_retry_at = now.checked_add(THAW_RETRY).or(Some(now));
            }
            // A touch's thaw failed: it stays frozen, as an idle container should.
            State::Frozen if !self.frozen => {
                self.frozen = true;
                self.touch_until = None;
            }
            _ => {}
        }
    }

    fn checkpoint_done(&mut self, now: Instant, bytes: u64, out: &mut Vec<Action>) {
        if self.state != State::Checkpointing {
            return;
        }
        self.stats.checkpoints += 1;
        self.stats.checkpoint_bytes = Some(bytes);
        self.stats.last_checkpoint_duration = self
            .checkpoint_started
            .take()
            .map(|t| now.saturating_duration_since(t));
        self.checkpoint_failures_in_row = 0;
        self.freeze_failures_in_row = 0;
        self.retry_at = None;
        self.frozen = false;
        let wake_wanted = self.abort_requested;
        self.abort_requested = false;
        self.transition(now, State::ScaledDown, out);
        if self.queue.contains(&Request::Signal(SIGKILL)) {
            self.kill_now(now, out);
        } else if wake_wanted || !self.queue.is_empty() {
            self.wake(now, out);
        }
    }

    /// The checkpoint ended without a scale-down (aborted or failed): awake again.
    fn checkpoint_over(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.abort_requested = false;
        self.checkpoint_started = None;
        self.wake_cause = None;
        self.thaw(out);
        self.transition(now, State::Running, out);
        self.flush_queue(now, out);
    }

    fn checkpoint_failed(&mut self, now: Instant, reason: String, out: &mut Vec<Action>) {
        self.fail(reason, |f| &mut f.checkpoint);
        if self.state == State::Checkpointing {
            self.checkpoint_failures_in_row += 1;
            self.retry_at = now.checked_add(backoff(self.checkpoint_failures_in_row));
            self.checkpoint_over(now, out);
        }
    }

    fn restore_failed(&mut self, now: Instant, reason: String, out: &mut Vec<Action>) {
        self.fail(reason, |f| &mut f.restore);
        if self.waking != Some(Waking::Restore) {
            return;
        }
        if self.queue.contains(&Request::Signal(SIGKILL)) {
            self.waking = None;
            self.kill_now(now, out);
        } else {
            self.waking = Some(Waking::ColdStart);
            out.push(Action::ColdStart);
        }
    }

    fn woken(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.waking = None;
        self.frozen = false;
        self.stats.wakes += 1;
        self.stats.last_wake_latency = self
            .wake_cause
            .take()
            .map(|t| now.saturating_duration_since(t));
        // The wake answers activity: the idle clock starts again now.
        self.last_activity = self.last_activity.max(now);
        self.transition(now, State::Running, out);
        self.flush_queue(now, out);
    }
}
