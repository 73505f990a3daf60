//! The machine's transitions and scenarios, with explicit instants (`start + Duration`).

use std::time::{Duration, Instant};

use super::*;

const SIGTERM: i32 = 15;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Hibernation on with the node defaults: freeze after 2 s, scale down after 60 s.
fn on() -> Settings {
    Settings {
        enabled: true,
        ..Settings::disabled()
    }
}

fn with(freeze: Option<u64>, scaledown: Option<u64>, delay: u64) -> Settings {
    Settings {
        freeze_after: freeze.map(secs),
        scaledown_after: scaledown.map(secs),
        initial_delay: secs(delay),
        ..on()
    }
}

/// A machine and its start; `at(offset, event)` steps it at `start + offset`.
struct H {
    m: Machine,
    start: Instant,
}

impl H {
    fn new(settings: Settings) -> H {
        let start = Instant::now();
        H {
            m: Machine::new(settings, start),
            start,
        }
    }

    fn t(&self, offset: Duration) -> Instant {
        self.start + offset
    }

    fn at(&mut self, offset: Duration, event: Event) -> Vec<Action> {
        let now = self.t(offset);
        self.m.step(now, event)
    }

    fn tr(&self, from: State, to: State, offset: Duration) -> Action {
        Action::Transition {
            from,
            to,
            at: self.t(offset),
        }
    }

    fn deadline(&self) -> Option<Duration> {
        self.m.next_deadline().map(|d| d - self.start)
    }

    /// Brings a fresh machine (default settings) to FROZEN at 2 s.
    fn frozen(settings: Settings) -> H {
        let mut h = H::new(settings);
        let freeze_at = h.deadline().expect("a freeze deadline");
        let a = h.at(freeze_at, Event::Tick);
        assert_eq!(
            a,
            [
                Action::Freeze,
                h.tr(State::Running, State::Frozen, freeze_at)
            ]
        );
        assert!(h.at(freeze_at, Event::Frozen).is_empty());
        h
    }

    /// Brings a machine to CHECKPOINTING at 60 s (through FROZEN).
    fn checkpointing() -> H {
        let mut h = H::frozen(on());
        let a = h.at(secs(60), Event::Tick);
        assert_eq!(
            a,
            [
                Action::Checkpoint,
                h.tr(State::Frozen, State::Checkpointing, secs(60))
            ]
        );
        h
    }

    /// Brings a machine to SCALED_DOWN at 61 s.
    fn scaled_down() -> H {
        let mut h = H::checkpointing();
        let a = h.at(secs(61), Event::CheckpointDone { bytes: 4096 });
        assert_eq!(a, [h.tr(State::Checkpointing, State::ScaledDown, secs(61))]);
        h
    }

    /// Brings a machine to WAKING at 100 s (woken by activity).
    fn waking() -> H {
        let mut h = H::scaled_down();
        let a = h.at(secs(100), Event::Activity);
        assert_eq!(
            a,
            [
                Action::Restore,
                h.tr(State::ScaledDown, State::Waking, secs(100))
            ]
        );
        h
    }
}

#[test]
fn idle_running_is_frozen_then_scaled_down() {
    let mut h = H::new(on());
    assert_eq!(h.m.state(), State::Running);
    assert_eq!(h.deadline(), Some(secs(2)));
    // An early tick does nothing.
    assert!(h.at(ms(1999), Event::Tick).is_empty());
    assert_eq!(
        h.at(secs(2), Event::Tick),
        [Action::Freeze, h.tr(State::Running, State::Frozen, secs(2))]
    );
    assert_eq!(h.m.state(), State::Frozen);
    assert_eq!(h.m.since(), h.t(secs(2)));
    // Scale-down counts from the last activity (the start), not from the freeze.
    assert_eq!(h.deadline(), Some(secs(60)));
    assert!(h.at(ms(59_999), Event::Tick).is_empty());
    assert_eq!(
        h.at(secs(60), Event::Tick),
        [
            Action::Checkpoint,
            h.tr(State::Frozen, State::Checkpointing, secs(60))
        ]
    );
    assert_eq!(h.m.state().shown(), "FROZEN");
    assert_eq!(h.deadline(), None);
    assert!(h.at(secs(61), Event::Tick).is_empty());
    assert_eq!(
        h.at(ms(61_500), Event::CheckpointDone { bytes: 123_456 }),
        [h.tr(State::Checkpointing, State::ScaledDown, ms(61_500))]
    );
    assert_eq!(h.m.state(), State::ScaledDown);
    assert_eq!(h.deadline(), None);
    let st = h.m.stats();
    assert_eq!(st.freezes, 1);
    assert_eq!(st.checkpoints, 1);
    assert_eq!(st.checkpoint_bytes, Some(123_456));
    assert_eq!(st.last_checkpoint_duration, Some(ms(1500)));
    assert_eq!(st.failures.total(), 0);
}

#[test]
fn activity_resets_the_idle_clock() {
    let mut h = H::new(on());
    assert!(h.at(ms(1500), Event::Activity).is_empty());
    assert_eq!(h.m.last_activity(), h.t(ms(1500)));
    assert!(h.at(secs(2), Event::Tick).is_empty());
    assert_eq!(h.deadline(), Some(ms(3500)));
    assert_eq!(
        h.at(ms(3500), Event::Tick),
        [
            Action::Freeze,
            h.tr(State::Running, State::Frozen, ms(3500))
        ]
    );
    assert_eq!(h.deadline(), Some(ms(61_500)));
}

#[test]
fn activity_thaws_a_frozen_container() {
    let mut h = H::frozen(on());
    assert_eq!(
        h.at(secs(10), Event::Activity),
        [Action::Thaw, h.tr(State::Frozen, State::Running, secs(10))]
    );
    assert!(h.at(secs(10), Event::Thawed).is_empty());
    assert_eq!(h.m.stats().thaws, 1);
    assert_eq!(h.deadline(), Some(secs(12)));
    assert_eq!(
        h.at(secs(12), Event::Tick),
        [
            Action::Freeze,
            h.tr(State::Running, State::Frozen, secs(12))
        ]
    );
    assert_eq!(h.deadline(), Some(secs(70)));
}

#[test]
fn activity_during_the_checkpoint_aborts_it() {
    let mut h = H::checkpointing();
    assert_eq!(h.at(ms(60_100), Event::Activity), [Action::Abort]);
    // Asked once.
    assert!(h.at(ms(60_200), Event::Activity).is_empty());
    assert_eq!(h.m.state(), State::Checkpointing);
    assert_eq!(
        h.at(ms(60_300), Event::CheckpointAborted),
        [
            Action::Thaw,
            h.tr(State::Checkpointing, State::Running, ms(60_300))
        ]
    );
    // No failure, no backoff: the clock counts from the last activity.
    assert_eq!(h.m.stats().failures.total(), 0);
    assert_eq!(h.deadline(), Some(ms(62_200)));
}

#[test]
fn activity_after_the_dump_finished_restores_at_once() {
    let mut h = H::checkpointing();
    assert_eq!(h.at(ms(60_100), Event::Activity), [Action::Abort]);
    // Too late: the images were durable and the processes gone.
    assert_eq!(
        h.at(ms(60_400), Event::CheckpointDone { bytes: 10 }),
        [
            h.tr(State::Checkpointing, State::ScaledDown, ms(60_400)),
            Action::Restore,
            h.tr(State::ScaledDown, State::Waking, ms(60_400)),
        ]
    );
    assert_eq!(
        h.at(ms(60_450), Event::Restored),
        [h.tr(State::Waking, State::Running, ms(60_450))]
    );
    // The wake's latency counts from the activity that asked for it.
    assert_eq!(h.m.stats().last_wake_latency, Some(ms(350)));
    assert_eq!(h.m.stats().wakes, 1);
    // A checkpoint that ended in the abort's failure is no failure either.
    let mut h = H::checkpointing();
    h.at(ms(60_100), Event::Activity);
    assert_eq!(
        h.at(
            ms(60_200),
            Event::CheckpointFailed {
                reason: "criu: interrupted".into()
            }
        ),
        [
            Action::Thaw,
            h.tr(State::Checkpointing, State::Running, ms(60_200))
        ]
    );
    assert_eq!(h.m.stats().failures.total(), 0);
    assert_eq!(h.deadline(), Some(ms(62_100)));
}

#[test]
fn activity_wakes_a_scaled_down_container() {
    let mut h = H::waking();
    assert_eq!(h.m.state().shown(), "WAKING");
    assert_eq!(h.deadline(), None);
    // More activity while waking: nothing more to do.
    assert!(h.at(ms(100_010), Event::Activity).is_empty());
    assert!(h.at(ms(100_020), Event::Touch).is_empty());
    assert_eq!(
        h.at(ms(100_040), Event::Restored),
        [h.tr(State::Waking, State::Running, ms(100_040))]
    );
    let st = h.m.stats();
    assert_eq!(st.wakes, 1);
    assert_eq!(st.last_wake_latency, Some(ms(40)));
    assert_eq!(st.cold_starts, 0);
    // The idle clock starts again at the wake.
    assert_eq!(h.deadline(), Some(ms(102_040)));
}

#[test]
fn probes_never_reset_the_idle_clock() {
    // RUNNING: a touch changes nothing.
    let mut h = H::new(on());
    assert!(h.at(secs(1), Event::Touch).is_empty());
    assert_eq!(h.deadline(), Some(secs(2)));

    // FROZEN: thawed for TOUCH_GRACE after the last touch, still FROZEN, clock unchanged.
    let mut h = H::frozen(on());
    assert_eq!(h.at(secs(10), Event::Touch), [Action::Thaw]);
    assert_eq!(h.m.state(), State::Frozen);
    assert_eq!(h.deadline(), Some(ms(10_500)));
    assert!(h.at(ms(10_300), Event::Touch).is_empty());
    assert_eq!(h.deadline(), Some(ms(10_800)));
    assert!(h.at(ms(10_799), Event::Tick).is_empty());
    assert_eq!(h.at(ms(10_800), Event::Tick), [Action::Freeze]);
    assert_eq!(h.m.state(), State::Frozen);
    assert_eq!(h.m.last_activity(), h.start);
    assert_eq!(h.m.stats().touch_thaws, 1);
    assert_eq!(h.m.stats().thaws, 0);
    assert_eq!(h.deadline(), Some(secs(60)));

    // A probe every 10 s does not keep it from scaling down at 60 s.
    let mut h = H::frozen(on());
    for s in (10..60).step_by(10) {
        assert_eq!(h.at(secs(s), Event::Touch), [Action::Thaw]);
        assert_eq!(h.at(secs(s) + TOUCH_GRACE, Event::Tick), [Action::Freeze]);
    }
    // Touched just before the deadline: the checkpoint freezes it itself.
    assert_eq!(h.at(ms(59_900), Event::Touch), [Action::Thaw]);
    assert_eq!(
        h.at(secs(60), Event::Tick),
        [
            Action::Checkpoint,
            h.tr(State::Frozen, State::Checkpointing, secs(60))
        ]
    );
    // Asleep, touches are answered by the responder; one reaching the machine does nothing.
    assert!(h.at(ms(60_100), Event::Touch).is_empty());
    h.at(secs(61), Event::CheckpointDone { bytes: 1 });
    assert!(h.at(secs(62), Event::Touch).is_empty());
    assert_eq!(h.m.state(), State::ScaledDown);
}

#[test]
fn activity_during_a_touch_thaw_needs_no_second_thaw() {
    let mut h = H::frozen(on());
    assert_eq!(h.at(secs(10), Event::Touch), [Action::Thaw]);
    assert_eq!(
        h.at(ms(10_100), Event::Activity),
        [h.tr(State::Frozen, State::Running, ms(10_100))]
    );
    assert_eq!(h.deadline(), Some(ms(12_100)));
}

#[test]
fn exec_in_every_state() {
    // RUNNING: runs at once; no hibernation while it runs; its end counts as activity.
    let mut h = H::new(on());
    assert_eq!(
        h.at(secs(1), Event::Exec(ExecToken(1))),
        [Action::RunExec(ExecToken(1))]
    );
    assert_eq!(h.deadline(), None);
    assert!(h.at(secs(100), Event::Tick).is_empty());
    assert!(h.at(secs(100), Event::ExecExited(ExecToken(1))).is_empty());
    assert_eq!(h.deadline(), Some(secs(102)));
    // An unknown or repeated exit changes nothing.
    assert!(h.at(secs(101), Event::ExecExited(ExecToken(1))).is_empty());
    assert_eq!(h.deadline(), Some(secs(102)));

    // FROZEN: thaw, then run.
    let mut h = H::frozen(on());
    assert_eq!(
        h.at(secs(5), Event::Exec(ExecToken(2))),
        [
            Action::Thaw,
            h.tr(State::Frozen, State::Running, secs(5)),
            Action::RunExec(ExecToken(2))
        ]
    );

    // CHECKPOINTING: abort, run once thawed.
    let mut h = H::checkpointing();
    assert_eq!(h.at(ms(60_100), Event::Exec(ExecToken(3))), [Action::Abort]);
    assert_eq!(
        h.m.queued().collect::<Vec<_>>(),
        [&Request::Exec(ExecToken(3))]
    );
    assert_eq!(
        h.at(ms(60_200), Event::CheckpointAborted),
        [
            Action::Thaw,
            h.tr(State::Checkpointing, State::Running, ms(60_200)),
            Action::RunExec(ExecToken(3))
        ]
    );
    assert_eq!(h.m.queued().count(), 0);

    // SCALED_DOWN: restore, run after; execs arriving while waking wait in order.
    let mut h = H::scaled_down();
    assert_eq!(
        h.at(secs(70), Event::Exec(ExecToken(4))),
        [
            Action::Restore,
            h.tr(State::ScaledDown, State::Waking, secs(70))
        ]
    );
    assert!(h.at(ms(70_010), Event::Exec(ExecToken(5))).is_empty());
    assert_eq!(
        h.at(ms(70_030), Event::Restored),
        [
            h.tr(State::Waking, State::Running, ms(70_030)),
            Action::RunExec(ExecToken(4)),
            Action::RunExec(ExecToken(5))
        ]
    );
    assert_eq!(h.m.stats().last_wake_latency, Some(ms(30)));

    // Paused: passed through (the stock path answers it).
    let mut h = H::new(on());
    assert_eq!(h.at(secs(1), Event::Pause), [Action::PauseTask]);
    assert_eq!(
        h.at(secs(2), Event::Exec(ExecToken(6))),
        [Action::RunExec(ExecToken(6))]
    );

    // EXITED: rejected.
    let mut h = H::new(on());
    h.at(secs(1), Event::Stop);
    assert_eq!(
        h.at(secs(2), Event::Exec(ExecToken(7))),
        [Action::Reject(Request::Exec(ExecToken(7)))]
    );
}

#[test]
fn signals_while_running() {
    let mut h = H::new(on());
    assert_eq!(
        h.at(secs(1), Event::Signal(SIGTERM)),
        [Action::DeliverSignal(SIGTERM)]
    );
    // Not frozen in the middle of a graceful shutdown.
    assert_eq!(h.deadline(), Some(secs(31)));
    assert!(h.at(secs(2), Event::Tick).is_empty());
    // The clock was not reset: at the end of the grace the freeze is due at once.
    assert_eq!(
        h.at(secs(31), Event::Tick),
        [
            Action::Freeze,
            h.tr(State::Running, State::Frozen, secs(31))
        ]
    );

    let mut h = H::new(on());
    assert_eq!(
        h.at(secs(1), Event::Signal(SIGKILL)),
        [Action::DeliverSignal(SIGKILL)]
    );
    assert_eq!(h.deadline(), Some(secs(2)));
    assert_eq!(
        h.at(secs(1), Event::Stop),
        [h.tr(State::Running, State::Exited, secs(1))]
    );
}

#[test]
fn signals_while_frozen() {
    // SIGKILL: thaw and deliver (the task dies; its exit follows as a Stop).
    let mut h = H::frozen(on());
    assert_eq!(
        h.at(secs(5), Event::Signal(SIGKILL)),
        [
            Action::Thaw,
            h.tr(State::Frozen, State::Running, secs(5)),
            Action::DeliverSignal(SIGKILL)
        ]
    );
    assert_eq!(h.m.last_activity(), h.start);

    // Another signal: thaw, deliver, keep it awake for SIGNAL_GRACE, clock not reset.
    let mut h = H::frozen(with(Some(2), Some(300), 0));
    assert_eq!(
        h.at(secs(5), Event::Signal(1)),
        [
            Action::Thaw,
            h.tr(State::Frozen, State::Running, secs(5)),
            Action::DeliverSignal(1)
        ]
    );
    assert_eq!(h.m.last_activity(), h.start);
    assert_eq!(h.deadline(), Some(secs(35)));
    assert_eq!(
        h.at(secs(35), Event::Tick),
        [
            Action::Freeze,
            h.tr(State::Running, State::Frozen, secs(35))
        ]
    );

    // When the grace ends past the scale-down time, it goes straight to the checkpoint.
    let mut h = H::frozen(on());
    h.at(secs(50), Event::Signal(SIGTERM));
    assert_eq!(h.deadline(), Some(secs(80)));
    assert_eq!(
        h.at(secs(80), Event::Tick),
        [
            Action::Checkpoint,
            h.tr(State::Running, State::Checkpointing, secs(80))
        ]
    );
}

#[test]
fn signals_while_checkpointing() {
    let mut h = H::checkpointing();
    assert_eq!(h.at(ms(60_100), Event::Signal(SIGTERM)), [Action::Abort]);
    assert_eq!(
        h.at(ms(60_200), Event::CheckpointAborted),
        [
            Action::Thaw,
            h.tr(State::Checkpointing, State::Running, ms(60_200)),
            Action::DeliverSignal(SIGTERM)
        ]
    );

    // SIGKILL, and the dump finished anyway: no restore just to kill it.
    let mut h = H::checkpointing();
    assert_eq!(h.at(ms(60_100), Event::Signal(SIGKILL)), [Action::Abort]);
    assert_eq!(
        h.at(ms(60_200), Event::CheckpointDone { bytes: 1 }),
        [
            h.tr(State::Checkpointing, State::ScaledDown, ms(60_200)),
            Action::Kill,
            Action::ReportExit(137),
            h.tr(State::ScaledDown, State::Exited, ms(60_200)),
        ]
    );

    // SIGKILL and the abort worked: delivered to the thawed task.
    let mut h = H::checkpointing();
    h.at(ms(60_100), Event::Signal(SIGKILL));
    assert_eq!(
        h.at(ms(60_200), Event::CheckpointAborted),
        [
            Action::Thaw,
            h.tr(State::Checkpointing, State::Running, ms(60_200)),
            Action::DeliverSignal(SIGKILL)
        ]
    );
}

#[test]
fn sigkill_while_scaled_down_ends_it_without_a_restore() {
    let mut h = H::scaled_down();
    assert_eq!(
        h.at(secs(70), Event::Signal(SIGKILL)),
        [
            Action::Kill,
            Action::ReportExit(137),
            h.tr(State::ScaledDown, State::Exited, secs(70))
        ]
    );
    assert_eq!(h.m.state(), State::Exited);
    assert_eq!(h.m.stats().wakes, 0);
    // The end: everything else is ignored, requests rejected.
    assert!(h.at(secs(71), Event::Activity).is_empty());
    assert!(h.at(secs(71), Event::Restored).is_empty());
    assert!(h.at(secs(71), Event::Tick).is_empty());
    assert_eq!(
        h.at(secs(71), Event::Signal(SIGTERM)),
        [Action::Reject(Request::Signal(SIGTERM))]
    );
    assert_eq!(
        h.at(secs(71), Event::Pause),
        [Action::Reject(Request::Pause)]
    );
    assert_eq!(h.deadline(), None);
}

#[test]
fn other_signals_while_scaled_down_wake_it_then_are_delivered() {
    let mut h = H::scaled_down();
    assert_eq!(
        h.at(secs(70), Event::Signal(SIGTERM)),
        [
            Action::Restore,
            h.tr(State::ScaledDown, State::Waking, secs(70))
        ]
    );
    assert_eq!(
        h.at(ms(70_050), Event::Restored),
        [
            h.tr(State::Waking, State::Running, ms(70_050)),
            Action::DeliverSignal(SIGTERM)
        ]
    );
    // The graceful shutdown is not frozen half-way.
    assert_eq!(h.deadline(), Some(ms(100_050)));
}

#[test]
fn signals_while_waking_wait_for_the_restore() {
    let mut h = H::waking();
    assert!(h.at(ms(100_001), Event::Signal(SIGTERM)).is_empty());
    assert!(h.at(ms(100_002), Event::Signal(SIGKILL)).is_empty());
    assert_eq!(
        h.at(ms(100_010), Event::Restored),
        [
            h.tr(State::Waking, State::Running, ms(100_010)),
            Action::DeliverSignal(SIGTERM),
            Action::DeliverSignal(SIGKILL)
        ]
    );

    // The restore failed with a SIGKILL waiting: no cold start, the task ends with 137.
    let mut h = H::waking();
    h.at(ms(100_001), Event::Exec(ExecToken(1)));
    h.at(ms(100_002), Event::Signal(SIGKILL));
    h.at(ms(100_003), Event::Signal(SIGTERM));
    assert_eq!(
        h.at(
            ms(100_010),
            Event::RestoreFailed {
                reason: "corrupt image".into()
            }
        ),
        [
            Action::Kill,
            Action::ReportExit(137),
            h.tr(State::Waking, State::Exited, ms(100_010)),
            Action::Reject(Request::Exec(ExecToken(1))),
            Action::Reject(Request::Signal(SIGTERM)),
        ]
    );
    assert_eq!(h.m.stats().failures.restore, 1);
}

#[test]
fn pause_and_resume_in_every_state() {
    // RUNNING: paused, the clock stops; Resume restarts it.
    let mut h = H::new(on());
    assert_eq!(h.at(secs(1), Event::Pause), [Action::PauseTask]);
    assert!(h.m.paused());
    assert!(h
        .at(secs(1), Event::PauseOutcome { paused: true })
        .is_empty());
    assert!(h.m.paused());
    assert_eq!(h.deadline(), None);
    assert!(h.at(secs(100), Event::Tick).is_empty());
    assert!(h.at(secs(100), Event::Activity).is_empty());
    assert!(h.at(secs(100), Event::Touch).is_empty());
    // Requests pass straight through to the stock path.
    assert_eq!(
        h.at(secs(150), Event::Signal(SIGTERM)),
        [Action::DeliverSignal(SIGTERM)]
    );
    assert_eq!(h.at(secs(150), Event::Pause), [Action::PauseTask]);
    assert_eq!(h.at(secs(200), Event::Resume), [Action::ResumeTask]);
    assert!(!h.m.paused());
    assert_eq!(h.deadline(), Some(secs(202)));

    // FROZEN: thawed first, the freezer passes to containerd's pause.
    let mut h = H::frozen(on());
    assert_eq!(
        h.at(secs(5), Event::Pause),
        [
            Action::Thaw,
            h.tr(State::Frozen, State::Running, secs(5)),
            Action::PauseTask
        ]
    );
    assert!(h.m.paused());
    assert_eq!(h.deadline(), None);
    assert!(h.at(secs(500), Event::Tick).is_empty());
    assert_eq!(h.at(secs(600), Event::Resume), [Action::ResumeTask]);
    assert_eq!(h.deadline(), Some(secs(602)));

    // CHECKPOINTING: the checkpoint is aborted, then the task paused.
    let mut h = H::checkpointing();
    assert_eq!(h.at(ms(60_100), Event::Pause), [Action::Abort]);
    assert_eq!(
        h.at(ms(60_200), Event::CheckpointAborted),
        [
            Action::Thaw,
            h.tr(State::Checkpointing, State::Running, ms(60_200)),
            Action::PauseTask
        ]
    );
    assert!(h.m.paused());

    // SCALED_DOWN: woken, then paused. A Resume of a task that is not paused does not
    // wake it (the stock answer refuses it).
    let mut h = H::scaled_down();
    assert_eq!(h.at(secs(70), Event::Resume), [Action::ResumeTask]);
    assert_eq!(h.m.state(), State::ScaledDown);
    assert_eq!(
        h.at(secs(71), Event::Pause),
        [
            Action::Restore,
            h.tr(State::ScaledDown, State::Waking, secs(71))
        ]
    );
    // WAKING: queued in order with the rest.
    assert!(h.at(ms(71_001), Event::Resume).is_empty());
    assert!(h.at(ms(71_002), Event::Exec(ExecToken(9))).is_empty());
    assert_eq!(
        h.at(ms(71_010), Event::Restored),
        [
            h.tr(State::Waking, State::Running, ms(71_010)),
            Action::PauseTask,
            Action::ResumeTask,
            Action::RunExec(ExecToken(9))
        ]
    );
    assert!(!h.m.paused());
    // The exec runs: no hibernation until it is over.
    assert_eq!(h.deadline(), None);
    h.at(secs(80), Event::ExecExited(ExecToken(9)));
    assert_eq!(h.deadline(), Some(secs(82)));
}

#[test]
fn reported_pause_outcomes_correct_the_belief() {
    // A pause that failed: the timers run again (the clock restarted with the report).
    let mut h = H::new(on());
    assert_eq!(h.at(secs(1), Event::Pause), [Action::PauseTask]);
    assert!(h
        .at(secs(1), Event::PauseOutcome { paused: false })
        .is_empty());
    assert!(!h.m.paused());
    assert_eq!(h.deadline(), Some(secs(3)));

    // A resume that failed: still paused, no timer.
    let mut h = H::new(on());
    h.at(secs(1), Event::Pause);
    assert_eq!(h.at(secs(5), Event::Resume), [Action::ResumeTask]);
    assert_eq!(h.deadline(), Some(secs(7)));
    h.at(secs(5), Event::PauseOutcome { paused: true });
    assert!(h.m.paused());
    assert_eq!(h.deadline(), None);

    // In order, the last report is the truth: two pauses, the first failed, the second
    // worked.
    let mut h = H::new(on());
    h.at(secs(1), Event::Pause);
    h.at(secs(1), Event::Pause);
    h.at(secs(1), Event::PauseOutcome { paused: false });
    h.at(secs(1), Event::PauseOutcome { paused: true });
    assert!(h.m.paused());

    // A report outside RUNNING is stale: a sleeping task is never paused.
    let mut h = H::frozen(on());
    assert!(h
        .at(secs(3), Event::PauseOutcome { paused: true })
        .is_empty());
    assert!(!h.m.paused());
    assert_eq!(h.m.last_activity(), h.start);
}

#[test]
fn a_failed_checkpoint_thaws_and_retries_with_backoff() {
    let mut h = H::checkpointing();
    let fail = |reason: &str| Event::CheckpointFailed {
        reason: reason.to_string(),
    };
    assert_eq!(
        h.at(secs(61), fail("In-flight connection")),
        [
            Action::Thaw,
            h.tr(State::Checkpointing, State::Running, secs(61))
        ]
    );
    assert_eq!(h.m.state(), State::Running);
    let st = h.m.stats();
    assert_eq!(st.failures.checkpoint, 1);
    assert_eq!(st.last_failure.as_deref(), Some("In-flight connection"));
    // Left running and thawed for the backoff; then, still idle, straight to the checkpoint.
    let mut now = secs(61);
    for n in 1..=7u32 {
        let wait = backoff(n);
        assert_eq!(h.deadline(), Some(now + wait), "failure {n}");
        assert!(h.at(now + wait - ms(1), Event::Tick).is_empty());
        now += wait;
        assert_eq!(
            h.at(now, Event::Tick),
            [
                Action::Checkpoint,
                h.tr(State::Running, State::Checkpointing, now)
            ]
        );
        now += secs(1);
        h.at(now, fail("again"));
    }
    assert_eq!(h.m.stats().failures.checkpoint, 8);
    assert_eq!(h.deadline(), Some(now + BACKOFF_MAX));
    // A success resets the backoff.
    let t = now + BACKOFF_MAX;
    h.at(t, Event::Tick);
    h.at(t + secs(1), Event::CheckpointDone { bytes: 5 });
    h.at(t + secs(2), Event::Activity);
    h.at(t + secs(3), Event::Restored);
    // Idle again: frozen at +2 s, checkpoint at +60 s, and its failure backs off 30 s.
    let woke = t + secs(3);
    assert_eq!(h.deadline(), Some(woke + secs(2)));
    h.at(woke + secs(60), Event::Tick);
    assert_eq!(h.m.state(), State::Checkpointing);
    h.at(woke + secs(61), fail("once more"));
    assert_eq!(h.deadline(), Some(woke + secs(61) + BACKOFF_FIRST));
}

#[test]
fn backoff_doubles_from_30s_to_10min() {
    let got: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(got, [30, 60, 120, 240, 480, 600, 600, 600]);
    assert_eq!(backoff(0), BACKOFF_FIRST);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}

#[test]
fn an_unasked_abort_counts_as_a_failure() {
    let mut h = H::checkpointing();
    assert_eq!(
        h.at(secs(61), Event::CheckpointAborted),
        [
            Action::Thaw,
            h.tr(State::Checkpointing, State::Running, secs(61))
        ]
    );
    assert_eq!(h.m.stats().failures.checkpoint, 1);
    assert_eq!(h.deadline(), Some(secs(61) + BACKOFF_FIRST));
}

#[test]
fn a_failed_restore_falls_back_to_a_cold_start() {
    let mut h = H::waking();
    h.at(ms(100_005), Event::Exec(ExecToken(1)));
    assert_eq!(
        h.at(
            ms(100_010),
            Event::RestoreFailed {
                reason: "checksum mismatch".into()
            }
        ),
        [Action::ColdStart]
    );
    assert_eq!(h.m.state(), State::Waking);
    // A late Restored for the failed restore is ignored.
    assert!(h.at(ms(100_020), Event::Restored).is_empty());
    assert_eq!(
        h.at(ms(100_500), Event::ColdStarted),
        [
            h.tr(State::Waking, State::Running, ms(100_500)),
            Action::RunExec(ExecToken(1))
        ]
    );
    let st = h.m.stats();
    assert_eq!((st.wakes, st.cold_starts, st.failures.restore), (1, 1, 1));
    assert_eq!(st.last_wake_latency, Some(ms(500)));
    assert_eq!(st.last_failure.as_deref(), Some("checksum mismatch"));
}

#[test]
fn a_failed_cold_start_ends_the_task_with_255() {
    let mut h = H::waking();
    h.at(ms(100_001), Event::Exec(ExecToken(1)));
    h.at(ms(100_002), Event::Signal(SIGTERM));
    h.at(ms(100_010), Event::RestoreFailed { reason: "x".into() });
    assert_eq!(
        h.at(
            ms(100_020),
            Event::ColdStartFailed {
                reason: "exec format error".into()
            }
        ),
        [
            Action::ReportExit(255),
            h.tr(State::Waking, State::Exited, ms(100_020)),
            Action::Reject(Request::Exec(ExecToken(1))),
            Action::Reject(Request::Signal(SIGTERM)),
        ]
    );
    assert_eq!(h.m.stats().failures.cold_start, 1);
    assert_eq!(h.m.stats().failures.total(), 2);
}

#[test]
fn a_cold_start_is_a_new_start_for_the_initial_delay() {
    let mut h = H::new(with(Some(2), Some(60), 10));
    assert_eq!(h.deadline(), Some(secs(10)));
    h.at(secs(10), Event::Tick);
    h.at(secs(60), Event::Tick);
    h.at(secs(61), Event::CheckpointDone { bytes: 1 });
    h.at(secs(100), Event::Activity);
    h.at(secs(101), Event::RestoreFailed { reason: "x".into() });
    h.at(secs(102), Event::ColdStarted);
    assert_eq!(h.deadline(), Some(secs(112)));
}

#[test]
fn a_failed_freeze_thaws_and_backs_off() {
    let mut h = H::new(on());
    h.at(secs(2), Event::Tick);
    assert_eq!(
        h.at(
            secs(2),
            Event::FreezeFailed {
                reason: "cgroup.freeze: EBUSY".into()
            }
        ),
        [Action::Thaw, h.tr(State::Frozen, State::Running, secs(2))]
    );
    assert_eq!(h.m.stats().failures.freeze, 1);
    assert_eq!(h.deadline(), Some(secs(32)));
    h.at(secs(32), Event::Tick);
    h.at(secs(32), Event::FreezeFailed { reason: "x".into() });
    assert_eq!(h.deadline(), Some(secs(92)));
    // Idle for 92 s by then: past the scale-down, so the retry is the checkpoint.
    h.at(secs(92), Event::Tick);
    assert_eq!(h.m.state(), State::Checkpointing);

    // A freeze that works resets its backoff.
    let mut h = H::new(with(Some(2), None, 0));
    h.at(secs(2), Event::Tick);
    h.at(secs(2), Event::FreezeFailed { reason: "x".into() });
    h.at(secs(32), Event::Tick);
    h.at(secs(32), Event::Frozen);
    h.at(secs(40), Event::Activity);
    h.at(secs(42), Event::Tick);
    h.at(secs(42), Event::FreezeFailed { reason: "x".into() });
    assert_eq!(h.deadline(), Some(secs(42) + BACKOFF_FIRST));
}

#[test]
fn a_failed_thaw_is_retried() {
    let mut h = H::frozen(on());
    h.at(secs(5), Event::Exec(ExecToken(1)));
    assert!(h
        .at(
            secs(5),
            Event::ThawFailed {
                reason: "EIO".into()
            }
        )
        .is_empty());
    assert_eq!(h.m.state(), State::Running);
    assert_eq!(h.deadline(), Some(secs(6)));
    assert_eq!(h.at(secs(6), Event::Tick), [Action::Thaw]);
    assert!(h.at(secs(6), Event::Thawed).is_empty());
    assert_eq!(h.m.stats().failures.thaw, 1);
    // The exec still runs: no hibernation.
    assert_eq!(h.deadline(), None);

    // A touch's failed thaw: it stays frozen, which an idle container should be anyway.
    let mut h = H::frozen(on());
    assert_eq!(h.at(secs(10), Event::Touch), [Action::Thaw]);
    h.at(secs(10), Event::ThawFailed { reason: "x".into() });
    assert_eq!(h.deadline(), Some(secs(60)));
    // Activity then thaws it again (the machine knows it is frozen).
    assert_eq!(
        h.at(secs(11), Event::Activity),
        [Action::Thaw, h.tr(State::Frozen, State::Running, secs(11))]
    );
}

#[test]
fn tiers_off() {
    // No freeze tier: RUNNING straight to CHECKPOINTING after scaledown_after.
    let mut h = H::new(with(None, Some(60), 0));
    assert_eq!(h.deadline(), Some(secs(60)));
    assert!(h.at(secs(2), Event::Tick).is_empty());
    assert_eq!(
        h.at(secs(60), Event::Tick),
        [
            Action::Checkpoint,
            h.tr(State::Running, State::Checkpointing, secs(60))
        ]
    );
    // After a wake it is RUNNING, never FROZEN, until the next scale-down.
    h.at(secs(61), Event::CheckpointDone { bytes: 1 });
    h.at(secs(70), Event::Activity);
    h.at(secs(71), Event::Restored);
    assert_eq!(h.deadline(), Some(secs(131)));

    // No scale-down tier: FROZEN forever while idle.
    let mut h = H::frozen(with(Some(2), None, 0));
    assert_eq!(h.deadline(), None);
    let year = secs(86_400 * 365);
    assert!(h.at(year, Event::Tick).is_empty());
    assert_eq!(h.m.state(), State::Frozen);
    // Touches still thaw for a moment.
    assert_eq!(h.at(year, Event::Touch), [Action::Thaw]);
    assert_eq!(h.deadline(), Some(year + TOUCH_GRACE));

    // Both off: nothing ever happens.
    let mut h = H::new(with(None, None, 0));
    assert_eq!(h.deadline(), None);
    assert!(h.at(secs(86_400), Event::Tick).is_empty());

    // Scale-down not after the freeze: freezing first is pointless.
    let mut h = H::new(with(Some(10), Some(5), 0));
    assert_eq!(h.deadline(), Some(secs(5)));
    assert_eq!(
        h.at(secs(5), Event::Tick),
        [
            Action::Checkpoint,
            h.tr(State::Running, State::Checkpointing, secs(5))
        ]
    );

    // Hibernation off: the machine only passes requests through.
    let mut h = H::new(Settings::disabled());
    assert_eq!(h.deadline(), None);
    assert!(h.at(secs(1000), Event::Tick).is_empty());
    assert_eq!(
        h.at(secs(1000), Event::Signal(SIGTERM)),
        [Action::DeliverSignal(SIGTERM)]
    );
    assert_eq!(h.at(secs(1000), Event::Pause), [Action::PauseTask]);
}

#[test]
fn initial_delay() {
    let mut h = H::new(with(Some(2), Some(60), 30));
    assert_eq!(h.deadline(), Some(secs(30)));
    assert!(h.at(secs(2), Event::Tick).is_empty());
    assert!(h.at(secs(29), Event::Activity).is_empty());
    assert_eq!(h.deadline(), Some(secs(31)));
    assert_eq!(
        h.at(secs(31), Event::Tick),
        [
            Action::Freeze,
            h.tr(State::Running, State::Frozen, secs(31))
        ]
    );

    // Longer than the scale-down: straight to the checkpoint when it is over.
    let mut h = H::new(with(Some(2), Some(60), 100));
    assert_eq!(h.deadline(), Some(secs(100)));
    assert_eq!(
        h.at(secs(100), Event::Tick),
        [
            Action::Checkpoint,
            h.tr(State::Running, State::Checkpointing, secs(100))
        ]
    );
}

#[test]
fn stop_in_every_state() {
    let mut h = H::new(on());
    assert_eq!(
        h.at(secs(1), Event::Stop),
        [h.tr(State::Running, State::Exited, secs(1))]
    );
    let mut h = H::frozen(on());
    assert_eq!(
        h.at(secs(3), Event::Stop),
        [h.tr(State::Frozen, State::Exited, secs(3))]
    );
    let mut h = H::checkpointing();
    assert_eq!(
        h.at(secs(61), Event::Stop),
        [
            Action::Abort,
            h.tr(State::Checkpointing, State::Exited, secs(61))
        ]
    );
    assert!(h
        .at(secs(62), Event::CheckpointDone { bytes: 1 })
        .is_empty());
    // No process exists while SCALED_DOWN: a Stop there is stale.
    let mut h = H::scaled_down();
    assert!(h.at(secs(62), Event::Stop).is_empty());
    assert_eq!(h.m.state(), State::ScaledDown);
    let mut h = H::waking();
    h.at(ms(100_001), Event::Exec(ExecToken(3)));
    assert_eq!(
        h.at(ms(100_002), Event::Stop),
        [
            h.tr(State::Waking, State::Exited, ms(100_002)),
            Action::Reject(Request::Exec(ExecToken(3)))
        ]
    );
}

#[test]
fn stale_results_are_ignored() {
    let mut h = H::new(on());
    for ev in [
        Event::Frozen,
        Event::Thawed,
        Event::CheckpointDone { bytes: 1 },
        Event::CheckpointAborted,
        Event::Restored,
        Event::RestoreFailed { reason: "x".into() },
        Event::ColdStarted,
        Event::ColdStartFailed { reason: "x".into() },
        Event::FreezeFailed { reason: "x".into() },
    ] {
        assert!(h.at(secs(1), ev.clone()).is_empty(), "{ev:?}");
        assert_eq!(h.m.state(), State::Running);
    }
    assert!(!h.m.paused());
    // Failures are still counted (and would be logged by the driver).
    assert_eq!(h.m.stats().failures.total(), 3);
}

#[test]
fn durations_beyond_the_clock_mean_never() {
    let huge = Duration::from_secs(u64::MAX);
    let mut h = H::new(Settings {
        freeze_after: Some(huge),
        scaledown_after: Some(huge),
        ..on()
    });
    assert_eq!(h.deadline(), None);
    assert!(h.at(secs(1), Event::Tick).is_empty());
    let mut h = H::new(Settings {
        initial_delay: huge,
        ..on()
    });
    assert_eq!(h.deadline(), None);
    assert!(h.at(secs(100), Event::Tick).is_empty());
}

#[test]
fn state_names() {
    let names: Vec<(&str, &str)> = [
        State::Running,
        State::Frozen,
        State::Checkpointing,
        State::ScaledDown,
        State::Waking,
        State::Exited,
    ]
    .into_iter()
    .map(|s| (s.as_str(), s.shown()))
    .collect();
    assert_eq!(
        names,
        [
            ("RUNNING", "RUNNING"),
            ("FROZEN", "FROZEN"),
            ("CHECKPOINTING", "FROZEN"),
            ("SCALED_DOWN", "SCALED_DOWN"),
            ("WAKING", "WAKING"),
            ("EXITED", "EXITED"),
        ]
    );
    assert_eq!(State::ScaledDown.to_string(), "SCALED_DOWN");
}
