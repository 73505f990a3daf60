//! Hibernation events through containerd's event service, on private containerd 1.7 and 2.1.
//!
//! The shim publishes each hibernation transition under a topic of ours
//! (`/runc-architect/hibernate/{frozen,thawed,scaled-down,waking,woken,checkpoint-failed,
//! restore-failed}`) with the payload built by `runc_architect_proto::status::HibernationEvent`,
//! through the containerd-shim crate's `RemotePublisher` on the daemon's ttrpc socket. This
//! suite publishes every topic exactly that way from the test process and checks what a user
//! and the daemon see:
//!
//! - `ctr events` prints each event: topic, namespace, the container id and the transition's
//!   labels (from, to, at, wake time, reason), and a `ctr events` filtered on our topic prefix
//!   gets them and nothing else, without a warning on its stderr (ctr skips, with a warning,
//!   any event whose payload type it does not know: that is why the payload is a message type
//!   every containerd client knows; see the `status` module docs in the proto crate);
//! - the daemon forwards each one (its trace log says "event forwarded" with the payload
//!   type) and logs no warning or error from the first publish on.
//!
//! No container runs here: the daemon's runc-architect runtime name is given the version's
//! stock shim so that the suite needs no shim build.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::Context as TtrpcContext;
use libtest_mimic::Trial;
use runc_architect_proto::status::{HibernationEvent, State, Topic, EVENT_PAYLOAD_TYPE};
use runc_architect_tests::containerd::ContainerdOptions;
use runc_architect_tests::events::{parse_line, Event};
use runc_architect_tests::poll::wait_for;
use runc_architect_tests::suite::{self, LazyShared};
use runc_architect_tests::{Containerd, Version};

/// How long an event may take from publish to `ctr events`.
const DELIVERY: Duration = Duration::from_secs(20);

fn start(version: Version) -> Result<Containerd> {
    Containerd::start_with(ContainerdOptions {
        version,
        architect_shim: version.stock_shim_bin(),
        // The "event forwarded" lines are logged at trace level.
        log_level: "trace".into(),
    })
}

fn main() {
    suite::run_per_version(start, |version, env: Arc<LazyShared<Containerd>>| {
        vec![Trial::test(
            format!(
                "{}::every-hibernation-topic-reaches-ctr-events",
                version.tag()
            ),
            move || {
                let cd = env.get()?;
                every_topic(&cd).map_err(|e| format!("{e:#}").into())
            },
        )]
    })
}

/// One event per topic, with the fields each carries in the shim.
fn events(id: &str) -> Vec<HibernationEvent> {
    let at = SystemTime::now();
    Topic::ALL
        .iter()
        .map(|&topic| {
            let (from, to) = match topic {
                Topic::Frozen => (State::Running, State::Frozen),
                Topic::Thawed => (State::Frozen, State::Running),
                Topic::ScaledDown => (State::Frozen, State::ScaledDown),
                Topic::Waking => (State::ScaledDown, State::Waking),
                Topic::Woken => (State::Waking, State::Running),
                Topic::CheckpointFailed => (State::Frozen, State::Running),
                Topic::RestoreFailed => (State::Waking, State::Waking),
            };
            HibernationEvent {
                topic,
                container_id: id.to_string(),
                from,
                to,
                at,
                wake_ms: matches!(topic, Topic::Thawed | Topic::Woken).then_some(12.5),
                checkpoint_bytes: (topic == Topic::ScaledDown).then_some(48 << 20),
                reason: match topic {
                    Topic::Waking => Some("connection".into()),
                    Topic::CheckpointFailed => Some("criu dump: Can't dump perf event".into()),
                    Topic::RestoreFailed => Some("criu restore: images corrupt".into()),
                    _ => None,
                },
            }
        })
        .collect()
}

/// A `ctr events` with a filter, stdout and stderr to files; killed on drop.
struct FilteredEvents {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl FilteredEvents {
    fn start(cd: &Containerd, filter: &str) -> Result<FilteredEvents> {
        let dir = cd.scratch_dir("events-topics")?;
        let (stdout, stderr) = (dir.join("ctr-events.out"), dir.join("ctr-events.err"));
        let mut cmd = cd.ctr("ra-events-topics").command(&["events", filter]);
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?);
        let child = cmd.spawn().context("start ctr events with a filter")?;
        Ok(FilteredEvents {
            child,
            stdout,
            stderr,
        })
    }

    fn lines(&self) -> Vec<Event> {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .enumerate()
            .filter_map(|(i, l)| parse_line(i, l))
            .collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for FilteredEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn every_topic(cd: &Containerd) -> Result<()> {
    let ns = format!("ra-hib-events-{}", cd.unique());
    let id = "web-1";
    // Remembered for cleanup like every namespace the harness hands out.
    let _ = cd.ctr(&ns);
    let filtered = FilteredEvents::start(cd, r#"topic~="^/runc-architect/hibernate/""#)?;
    // The filtered subscription is live once it sees an event of ours: publish a probe topic
    // until it arrives, then start the real checks from a clean mark.
    let log_path = cd.dir().join("containerd.log");
    let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let address = cd.ttrpc_address().display().to_string();
    let publisher = rt
        .block_on(RemotePublisher::new(&address))
        .with_context(|| format!("connect the publisher to {address}"))?;
    let publish = |ev: &HibernationEvent| -> Result<()> {
        let msg = ev.to_protobuf()?;
        rt.block_on(publisher.publish(TtrpcContext::default(), ev.topic.as_str(), &ns, msg))
            .with_context(|| format!("publish {}", ev.topic))
    };
    let probe = HibernationEvent {
        container_id: "probe".into(),
        ..events("probe")[0].clone()
    };
    wait_for("the filtered ctr events to receive", DELIVERY, || {
        publish(&probe).ok()?;
        std::thread::sleep(Duration::from_millis(200));
        filtered
            .lines()
            .iter()
            .any(|e| e.container_id() == Some("probe"))
            .then_some(())
    })?;
    let log_mark = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    let filtered_mark = filtered.lines().len();
    let recorder_mark = cd.events().mark();

    let sent = events(id);
    for ev in &sent {
        publish(ev)?;
    }

    for ev in &sent {
        let topic = ev.topic.as_str();
        let got = cd.events().wait_topic(&ns, id, topic, DELIVERY)?;
        ensure!(got.seq >= recorder_mark, "{topic}: an old event");
        let labels = got
            .payload
            .get("labels")
            .with_context(|| format!("{topic}: no labels in {}", got.payload))?;
        let want = serde_json::to_value(ev.labels())?;
        ensure!(
            labels == &want,
            "{topic}: ctr events shows labels {labels}, published {want}"
        );
        ensure!(
            got.payload.get("id").and_then(|v| v.as_str()) == Some(id),
            "{topic}: payload {}",
            got.payload
        );
        // Nothing but id and labels: no field of a real container record is set.
        let keys: Vec<&String> = got
            .payload
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        ensure!(keys.len() == 2, "{topic}: payload {}", got.payload);
    }
    // Spot checks of what a user reads.
    let woken = cd
        .events()
        .wait_topic(&ns, id, Topic::Woken.as_str(), DELIVERY)?;
    ensure!(woken.payload["labels"]["from"] == "WAKING");
    ensure!(woken.payload["labels"]["to"] == "RUNNING");
    ensure!(woken.payload["labels"]["wake_ms"] == "12.500");
    let failed = cd
        .events()
        .wait_topic(&ns, id, Topic::CheckpointFailed.as_str(), DELIVERY)?;
    ensure!(
        failed.payload["labels"]["reason"] == "criu dump: Can't dump perf event",
        "{}",
        failed.payload
    );

    // The filtered subscription got exactly ours, in order, and ctr warned about nothing.
    let topics: Vec<String> = wait_for("the filtered ctr events to show all", DELIVERY, || {
        let got: Vec<String> = filtered.lines()[filtered_mark..]
            .iter()
            // (A probe published twice may still arrive.)
            .filter(|e| e.container_id() == Some(id))
            .map(|e| e.topic.clone())
            .collect();
        (got.len() >= sent.len()).then_some(got)
    })?;
    let want: Vec<String> = sent.iter().map(|e| e.topic.as_str().to_string()).collect();
    ensure!(
        topics == want,
        "filtered ctr events: {topics:?}, want {want:?}"
    );
    if std::env::var_os("RA_SHOW_OBSERVATIONS").is_some() {
        let out = std::fs::read_to_string(&filtered.stdout).unwrap_or_default();
        eprintln!("--- {} ctr events (filtered):\n{out}", cd.version());
    }
    let err = filtered.stderr();
    ensure!(err.trim().is_empty(), "ctr events wrote to stderr:\n{err}");

    // The daemon forwarded each (trace level) and complained about nothing since.
    let whole = std::fs::read(&log_path)?;
    let log = String::from_utf8_lossy(whole.get(log_mark as usize..).unwrap_or_default());
    for ev in &sent {
        let forwarded = log.lines().any(|l| {
            l.contains("event forwarded")
                && l.contains(&format!("topic={}", ev.topic.as_str()))
                && l.contains(&format!("ns={ns}"))
                && l.contains(&format!("type={EVENT_PAYLOAD_TYPE}"))
        });
        if !forwarded {
            bail!(
                "containerd did not log forwarding {} (log level trace):\n{}",
                ev.topic,
                cd.log_tail(30)
            );
        }
    }
    let since_first = String::from_utf8_lossy(whole.get(log_start as usize..).unwrap_or_default());
    let complaints: Vec<&str> = since_first
        .lines()
        .filter(|l| l.contains("level=error") || l.contains("level=warning"))
        .collect();
    ensure!(
        complaints.is_empty(),
        "containerd logged after the first publish:\n{}",
        complaints.join("\n")
    );
    Ok(())
}
