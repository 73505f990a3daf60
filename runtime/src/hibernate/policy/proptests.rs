//! Property tests: random event sequences never make the machine do what its state does
//! not allow, and never lose a request.
//!
//! Two drivers feed it:
//! - `World`, a model of the container and a well-behaved driver: a cgroup freezer, live
//!   or gone processes, containerd's pause, the long mechanisms (checkpoint, restore,
//!   cold start) finishing at random later times, short ones (freeze, thaw, pause,
//!   resume) answered at once, each succeeding or failing at random. Every action is
//!   checked against that world (no `Freeze` of a frozen cgroup, no `Restore` while
//!   processes exist, no `RunExec` while not RUNNING, ...), and at the end, once every
//!   mechanism has answered, every request has been answered exactly once, in order.
//! - chaos: any event at any time, results nobody asked for included; the machine must
//!   ignore what does not fit, keep its transitions chained, keep its own belief about the
//!   freezer consistent with what it emits, and keep every unanswered request queued.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

/// 1000 cases each by default; `PROPTEST_CASES` sets more for a deeper run.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    ProptestConfig::with_cases(cases)
}

const DELAYS_MS: [u64; 10] = [0, 1, 100, 499, 500, 2_000, 29_000, 31_000, 61_000, 600_000];

fn settings() -> impl Strategy<Value = Settings> {
    (
        prop::option::of(prop::sample::select(vec![1u64, 2, 10])),
        prop::option::of(prop::sample::select(vec![1u64, 5, 60])),
        prop::sample::select(vec![0u64, 3]),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(freeze, scaledown, delay, enabled)| Settings {
            enabled,
            freeze_after: freeze.map(Duration::from_secs),
            scaledown_after: scaledown.map(Duration::from_secs),
            initial_delay: Duration::from_secs(delay),
            ..Settings::disabled()
        })
}

/// Answers `request` (the oldest unanswered one must be it).
fn answer(pending: &mut VecDeque<Request>, request: Request) {
    assert_eq!(
        pending.pop_front(),
        Some(request),
        "answered out of order or twice"
    );
}

/// `Kill` answers the first waiting SIGKILL, wherever it is in the line.
fn answer_kill(pending: &mut VecDeque<Request>) {
    let i = pending
        .iter()
        .position(|r| *r == Request::Signal(SIGKILL))
        .expect("Kill without a SIGKILL asking for it");
    pending.remove(i);
}

fn check_queue(m: &Machine, pending: &VecDeque<Request>) {
    assert_eq!(
        m.queue.iter().collect::<Vec<_>>(),
        pending.iter().collect::<Vec<_>>(),
        "a request was lost or answered without leaving the queue"
    );
    if !m.queue.is_empty() {
        assert!(
            matches!(m.state, State::Checkpointing | State::Waking),
            "requests wait in {:?}",
            m.state
        );
    }
    if m.paused {
        assert_eq!(m.state, State::Running, "paused outside RUNNING");
    }
}

#[derive(Debug, Clone)]
enum Input {
    Wait(usize),
    TickAtDeadline,
    Tick,
    Activity,
    Touch,
    Exec,
    ExecExit(usize),
    Signal(bool),
    Pause,
    Resume,
    /// The init exits on its own (only when it can: alive and not frozen).
    Stop,
    /// The long mechanism in flight answers: `ok` or not; `late`: an aborted checkpoint
    /// had finished anyway.
    Finish {
        ok: bool,
        late: bool,
    },
}

fn input() -> impl Strategy<Value = (Input, u8)> {
    // Weighted so that most runs live long enough to sleep and wake a few times (a Stop
    // or a SIGKILL ends a run).
    let input = prop_oneof![
        12 => (0..DELAYS_MS.len()).prop_map(Input::Wait),
        16 => Just(Input::TickAtDeadline),
        4 => Just(Input::Tick),
        8 => Just(Input::Activity),
        8 => Just(Input::Touch),
        4 => Just(Input::Exec),
        4 => any::<usize>().prop_map(Input::ExecExit),
        3 => prop::bool::weighted(0.25).prop_map(Input::Signal),
        3 => Just(Input::Pause),
        3 => Just(Input::Resume),
        1 => Just(Input::Stop),
        12 => (prop::bool::weighted(0.8), any::<bool>())
            .prop_map(|(ok, late)| Input::Finish { ok, late }),
    ];
    (input, any::<u8>())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Long {
    Checkpoint { aborted: bool },
    Restore,
    ColdStart,
}

/// The container and a well-behaved driver.
struct World {
    m: Machine,
    now: Instant,
    luck: u8,
    /// The state as the transitions told it.
    state: State,
    alive: bool,
    frozen: bool,
    paused: bool,
    exited: bool,
    killed: bool,
    /// A thaw failed and no thaw worked since: the machine retries, and a Resume may
    /// have thawed the cgroup meanwhile.
    thaw_failed: bool,
    execs: Vec<ExecToken>,
    long: Option<Long>,
    results: VecDeque<Event>,
    pending: VecDeque<Request>,
    next_token: u64,
}

impl World {
    fn new(settings: Settings) -> World {
        let now = Instant::now();
        World {
            m: Machine::new(settings, now),
            now,
            luck: 1,
            state: State::Running,
            alive: true,
            frozen: false,
            paused: false,
            exited: false,
            killed: false,
            thaw_failed: false,
            execs: Vec::new(),
            long: None,
            results: VecDeque::new(),
            pending: VecDeque::new(),
            next_token: 0,
        }
    }

    /// One in five short operations fails.
    fn fails(&mut self) -> bool {
        let fail = self.luck % 5 == 0;
        self.luck = self.luck.wrapping_mul(37).wrapping_add(11);
        fail
    }

    fn step(&mut self, event: Event) {
        if event == Event::Stop {
            self.alive = false;
            self.execs.clear();
        }
        let early_tick =
            event == Event::Tick && self.m.next_deadline().is_none_or(|d| d > self.now);
        let actions = self.m.step(self.now, event.clone());
        if early_tick {
            assert!(
                actions.is_empty(),
                "a tick before the deadline did {actions:?}"
            );
        }
        for action in actions {
            self.apply(&action);
        }
        while let Some(result) = self.results.pop_front() {
            self.step(result);
        }
    }

    fn apply(&mut self, action: &Action) {
        use State::*;
        let s = self.state;
        match *action {
            Action::Transition { from, to, at } => {
                assert_eq!(from, s, "transition from a state it was not in");
                assert_ne!(from, to);
                assert_eq!(at, self.now);
                self.state = to;
            }
            Action::Freeze => {
                assert!(matches!(s, Running | Frozen), "Freeze in {s:?}");
                assert!(!self.frozen, "Freeze of a frozen cgroup");
                assert!(self.alive && !self.paused);
                self.frozen = true; // a failed freeze may have frozen part of it
                let result = if self.fails() {
                    Event::FreezeFailed {
                        reason: "EBUSY".into(),
                    }
                } else {
                    Event::Frozen
                };
                self.results.push_back(result);
            }
            Action::Thaw => {
                assert!(
                    matches!(s, Running | Frozen | Checkpointing),
                    "Thaw in {s:?}"
                );
                assert!(self.frozen || self.thaw_failed, "Thaw of a thawed cgroup");
                assert!(self.alive && !self.paused);
                let result = if self.fails() {
                    self.thaw_failed = true;
                    Event::ThawFailed {
                        reason: "EIO".into(),
                    }
                } else {
                    self.frozen = false;
                    self.thaw_failed = false;
                    Event::Thawed
                };
                self.results.push_back(result);
            }
            Action::Checkpoint => {
                assert!(matches!(s, Running | Frozen), "Checkpoint in {s:?}");
                assert!(
                    self.alive && !self.paused,
                    "Checkpoint of a paused or dead task"
                );
                assert!(self.execs.is_empty(), "Checkpoint while an exec runs");
                assert!(self.long.is_none());
                self.frozen = true;
                self.long = Some(Long::Checkpoint { aborted: false });
            }
            Action::Abort => {
                assert_eq!(s, Checkpointing);
                let Some(Long::Checkpoint { aborted }) = &mut self.long else {
                    panic!("Abort without a checkpoint running");
                };
                assert!(!*aborted, "Abort twice");
                *aborted = true;
            }
            Action::Restore => {
                assert_eq!(s, ScaledDown, "Restore in {s:?}");
                assert!(!self.alive && self.long.is_none());
                self.long = Some(Long::Restore);
            }
            Action::ColdStart => {
                assert_eq!(s, Waking, "ColdStart in {s:?}");
                assert!(!self.alive && self.long.is_none());
                self.long = Some(Long::ColdStart);
            }
            Action::Kill => {
                assert!(matches!(s, ScaledDown | Waking), "Kill in {s:?}");
                assert!(!self.alive, "Kill (no restore) of a live task");
                answer_kill(&mut self.pending);
                self.killed = true;
            }
            Action::ReportExit(status) => {
                assert!(matches!(s, ScaledDown | Waking), "ReportExit in {s:?}");
                assert!(!self.alive);
                match status {
                    EXIT_SIGKILL => assert!(self.killed),
                    EXIT_COLD_START_FAILED => assert_eq!(s, Waking),
                    other => panic!("exit status {other}"),
                }
                assert!(!self.exited, "two exits");
                self.exited = true;
            }
            Action::RunExec(token) => {
                assert_eq!(s, Running, "RunExec in {s:?}");
                assert!(self.alive);
                answer(&mut self.pending, Request::Exec(token));
                self.execs.push(token);
            }
            Action::DeliverSignal(sig) => {
                assert_eq!(s, Running, "DeliverSignal in {s:?}");
                assert!(self.alive);
                answer(&mut self.pending, Request::Signal(sig));
                if sig == SIGKILL && !self.results.contains(&Event::Stop) {
                    self.results.push_back(Event::Stop);
                }
            }
            Action::PauseTask => {
                assert_eq!(s, Running, "PauseTask in {s:?}");
                answer(&mut self.pending, Request::Pause);
                // The stock path refuses to pause a paused task; the outcome is reported.
                if !self.paused && !self.fails() {
                    self.paused = true;
                    self.frozen = true;
                }
                self.results.push_back(Event::PauseOutcome {
                    paused: self.paused,
                });
            }
            Action::ResumeTask => {
                assert_ne!(s, Exited);
                answer(&mut self.pending, Request::Resume);
                // The stock path refuses to resume a task that is not paused.
                if self.paused && !self.fails() {
                    self.paused = false;
                    self.frozen = false;
                }
                self.results.push_back(Event::PauseOutcome {
                    paused: self.paused,
                });
            }
            Action::Reject(request) => {
                assert_eq!(s, Exited, "Reject in {s:?}");
                answer(&mut self.pending, request);
            }
        }
    }

    fn finish(&mut self, ok: bool, late: bool) {
        let Some(long) = self.long.take() else {
            return;
        };
        let result = match long {
            Long::Checkpoint { aborted } => {
                if !ok {
                    Event::CheckpointFailed {
                        reason: "criu".into(),
                    }
                } else if aborted && !late {
                    Event::CheckpointAborted
                } else {
                    self.alive = false;
                    self.frozen = false;
                    Event::CheckpointDone { bytes: 1 }
                }
            }
            Long::Restore if ok => {
                self.alive = true;
                self.frozen = false;
                Event::Restored
            }
            Long::Restore => Event::RestoreFailed {
                reason: "corrupt".into(),
            },
            Long::ColdStart if ok => {
                self.alive = true;
                self.frozen = false;
                Event::ColdStarted
            }
            Long::ColdStart => Event::ColdStartFailed {
                reason: "enoent".into(),
            },
        };
        self.step(result);
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Wait(i) => self.now += Duration::from_millis(DELAYS_MS[i]),
            Input::TickAtDeadline => {
                if let Some(d) = self.m.next_deadline() {
                    self.now = self.now.max(d);
                }
                self.step(Event::Tick);
            }
            Input::Tick => self.step(Event::Tick),
            Input::Activity => self.step(Event::Activity),
            Input::Touch => self.step(Event::Touch),
            Input::Exec => {
                self.next_token += 1;
                let token = ExecToken(self.next_token);
                self.pending.push_back(Request::Exec(token));
                self.step(Event::Exec(token));
            }
            Input::ExecExit(i) => {
                if !self.execs.is_empty() {
                    let token = self.execs.remove(i % self.execs.len());
                    self.step(Event::ExecExited(token));
                }
            }
            Input::Signal(kill) => {
                let sig = if kill { SIGKILL } else { 15 };
                self.pending.push_back(Request::Signal(sig));
                self.step(Event::Signal(sig));
            }
            Input::Pause => {
                self.pending.push_back(Request::Pause);
                self.step(Event::Pause);
            }
            Input::Resume => {
                self.pending.push_back(Request::Resume);
                self.step(Event::Resume);
            }
            Input::Stop => {
                if self.alive && !self.frozen {
                    self.step(Event::Stop);
                }
            }
            Input::Finish { ok, late } => self.finish(ok, late),
        }
    }

    fn check(&self) {
        let m = &self.m;
        assert_eq!(m.state(), self.state);
        check_queue(m, &self.pending);
        if self.state == State::Running {
            assert_eq!(m.paused(), self.paused, "belief about the pause");
        }
        if matches!(self.state, State::Running | State::Frozen) && !self.paused {
            // Never a frozen cgroup believed thawed; the other way round only while a
            // failed thaw is being retried.
            if self.frozen {
                assert!(m.frozen, "a frozen cgroup believed thawed");
            } else {
                assert!(
                    !m.frozen || self.thaw_failed,
                    "a thawed cgroup believed frozen"
                );
            }
        }
        if self.state == State::Frozen {
            assert!(!self.paused);
        }
        match self.state {
            State::ScaledDown | State::Waking => assert!(!self.alive || self.long.is_none()),
            State::Exited => assert!(self.exited || !self.alive),
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_well_behaved_world_never_sees_a_forbidden_action(
        settings in settings(),
        inputs in prop::collection::vec(input(), 1..80),
    ) {
        let mut w = World::new(settings);
        for (input, luck) in inputs {
            w.luck = luck;
            w.input(input);
            w.check();
        }
        // Let every mechanism in flight succeed: then every request has its answer.
        w.luck = 1;
        for _ in 0..8 {
            if w.long.is_none() {
                break;
            }
            w.finish(true, false);
            w.check();
        }
        prop_assert!(w.long.is_none());
        prop_assert!(
            matches!(w.state, State::Running | State::Frozen | State::ScaledDown | State::Exited),
            "stuck in {:?}", w.state
        );
        prop_assert!(w.pending.is_empty(), "unanswered: {:?}", w.pending);
    }
}

/// Any event at all, results nobody asked for included.
fn chaos_event() -> impl Strategy<Value = Event> {
    let reason = || Just(String::from("x"));
    prop_oneof![
        4 => Just(Event::Tick),
        2 => Just(Event::Activity),
        2 => Just(Event::Touch),
        1 => (0u64..4).prop_map(|t| Event::Exec(ExecToken(t))),
        1 => (0u64..4).prop_map(|t| Event::ExecExited(ExecToken(t))),
        1 => prop::sample::select(vec![SIGKILL, 15, 1]).prop_map(Event::Signal),
        1 => Just(Event::Pause),
        1 => Just(Event::Resume),
        1 => Just(Event::Stop),
        1 => Just(Event::Frozen),
        1 => reason().prop_map(|reason| Event::FreezeFailed { reason }),
        1 => Just(Event::Thawed),
        1 => reason().prop_map(|reason| Event::ThawFailed { reason }),
        1 => Just(Event::CheckpointDone { bytes: 7 }),
        1 => reason().prop_map(|reason| Event::CheckpointFailed { reason }),
        1 => Just(Event::CheckpointAborted),
        1 => Just(Event::Restored),
        1 => reason().prop_map(|reason| Event::RestoreFailed { reason }),
        1 => Just(Event::ColdStarted),
        1 => reason().prop_map(|reason| Event::ColdStartFailed { reason }),
        2 => any::<bool>().prop_map(|paused| Event::PauseOutcome { paused }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn chaos_never_breaks_the_rules(
        settings in settings(),
        steps in prop::collection::vec(
            (prop::sample::select(DELAYS_MS.to_vec()), chaos_event()), 1..100),
    ) {
        use State::*;
        let mut now = Instant::now();
        let mut m = Machine::new(settings, now);
        let mut pending: VecDeque<Request> = VecDeque::new();
        for (delay, event) in steps {
            now += Duration::from_millis(delay);
            match &event {
                Event::Exec(t) => pending.push_back(Request::Exec(*t)),
                Event::Signal(s) => pending.push_back(Request::Signal(*s)),
                Event::Pause => pending.push_back(Request::Pause),
                Event::Resume => pending.push_back(Request::Resume),
                _ => {}
            }
            // The machine's belief about the freezer, followed through the actions; `None`
            // where the event or an action hands the cgroup to something else (a restore,
            // a resume, the end).
            let changes_belief = matches!(
                event,
                Event::ThawFailed { .. } | Event::CheckpointDone { .. } | Event::Restored
                    | Event::ColdStarted | Event::Stop | Event::CheckpointFailed { .. }
                    | Event::CheckpointAborted | Event::FreezeFailed { .. }
            );
            let mut belief = (!changes_belief).then_some(m.frozen);
            let mut state = m.state();
            let early_tick = event == Event::Tick && m.next_deadline().is_none_or(|d| d > now);
            let actions = m.step(now, event.clone());
            if early_tick {
                prop_assert!(actions.is_empty(), "a tick before the deadline did {:?}", actions);
            }
            for action in &actions {
                let s = state;
                match *action {
                    Action::Transition { from, to, at } => {
                        prop_assert_eq!(from, s);
                        prop_assert_ne!(from, to);
                        prop_assert_eq!(at, now);
                        state = to;
                        if matches!(to, Exited | ScaledDown | Waking) || from == Waking {
                            belief = None;
                        }
                    }
                    Action::Freeze => {
                        prop_assert!(matches!(s, Running | Frozen), "Freeze in {:?}", s);
                        if let Some(b) = belief {
                            prop_assert!(!b, "Freeze while frozen");
                        }
                        belief = belief.map(|_| true);
                    }
                    Action::Thaw => {
                        prop_assert!(matches!(s, Running | Frozen | Checkpointing), "Thaw in {:?}", s);
                        if let Some(b) = belief {
                            prop_assert!(b, "Thaw while thawed");
                        }
                        belief = belief.map(|_| false);
                    }
                    Action::Checkpoint => {
                        prop_assert!(matches!(s, Running | Frozen), "Checkpoint in {:?}", s);
                        belief = Some(true);
                    }
                    Action::Abort => prop_assert_eq!(s, Checkpointing),
                    Action::Restore => prop_assert_eq!(s, ScaledDown, "Restore in {:?}", s),
                    Action::ColdStart => prop_assert_eq!(s, Waking),
                    Action::Kill => {
                        prop_assert!(matches!(s, ScaledDown | Waking), "Kill in {:?}", s);
                        answer_kill(&mut pending);
                    }
                    Action::ReportExit(_) => {
                        prop_assert!(matches!(s, ScaledDown | Waking), "ReportExit in {:?}", s)
                    }
                    Action::RunExec(t) => {
                        prop_assert_eq!(s, Running);
                        answer(&mut pending, Request::Exec(t));
                    }
                    Action::DeliverSignal(sig) => {
                        prop_assert_eq!(s, Running);
                        answer(&mut pending, Request::Signal(sig));
                    }
                    Action::PauseTask => {
                        prop_assert_eq!(s, Running);
                        answer(&mut pending, Request::Pause);
                    }
                    Action::ResumeTask => {
                        prop_assert_ne!(s, Exited);
                        answer(&mut pending, Request::Resume);
                        belief = None;
                    }
                    Action::Reject(r) => {
                        prop_assert_eq!(s, Exited);
                        answer(&mut pending, r);
                    }
                }
            }
            prop_assert_eq!(state, m.state());
            if let Some(b) = belief {
                prop_assert_eq!(b, m.frozen, "the actions and the belief disagree");
            }
            check_queue(&m, &pending);
        }
    }
}
