//! `ctr events` running in the background, parsed into [`Event`]s.
//!
//! ctr prints one event a line: `<date> <time> <zone offset> <zone> <namespace> <topic> <json>`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::containerd::Containerd;
use crate::ctr::Ctr;

/// One event as `ctr events` showed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Arrival order (0, 1, ...) in this recorder.
    pub seq: usize,
    /// Timestamp as printed.
    pub timestamp: String,
    pub namespace: String,
    /// E.g. `/tasks/exit`.
    pub topic: String,
    /// The event's fields (`null` if ctr printed no JSON).
    pub payload: Value,
}

impl Event {
    /// `container_id` (task events) or `id` (container events).
    pub fn container_id(&self) -> Option<&str> {
        self.payload
            .get("container_id")
            .or_else(|| self.payload.get("id"))
            .and_then(Value::as_str)
    }

    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.payload.get(name).and_then(Value::as_str)
    }

    /// A numeric field (absent means 0: ctr omits zero values).
    pub fn u64_field(&self, name: &str) -> u64 {
        self.payload.get(name).and_then(Value::as_u64).unwrap_or(0)
    }
}

/// Parses one `ctr events` line.
pub fn parse_line(seq: usize, line: &str) -> Option<Event> {
    let mut rest = line.trim_end();
    let mut fields = Vec::new();
    for _ in 0..6 {
        let r = rest.trim_start();
        let end = r.find(' ').unwrap_or(r.len());
        if end == 0 {
            return None;
        }
        fields.push(&r[..end]);
        rest = &r[end..];
    }
    let json = rest.trim();
    let topic = fields[5];
    if !topic.starts_with('/') {
        return None;
    }
    Some(Event {
        seq,
        timestamp: fields[..4].join(" "),
        namespace: fields[4].to_string(),
        topic: topic.to_string(),
        payload: if json.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(json).unwrap_or_else(|_| Value::String(json.to_string()))
        },
    })
}

#[derive(Default)]
struct Shared {
    events: Vec<Event>,
    ended: bool,
}

/// Collects every event of a daemon since it started.
pub struct EventRecorder {
    child: Child,
    shared: Arc<(Mutex<Shared>, Condvar)>,
}

impl EventRecorder {
    /// Starts `ctr events` and waits until it demonstrably receives events (a probe namespace
    /// is created and its event awaited).
    pub fn start(cd: &Containerd) -> Result<EventRecorder> {
        let ctr: Ctr = cd.ctr("ra-events-probe");
        let mut cmd = ctr.command(&["events"]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().context("start ctr events")?;
        let stdout = child.stdout.take().context("ctr events stdout")?;
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let sh = shared.clone();
        std::thread::spawn(move || {
            let reader = BufReader::new(stdout);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*sh;
                let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
                let seq = g.events.len();
                if let Some(ev) = parse_line(seq, &line) {
                    g.events.push(ev);
                    cv.notify_all();
                }
            }
            let (lock, cv) = &*sh;
            lock.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
            cv.notify_all();
        });
        let rec = EventRecorder { child, shared };
        // Prove the subscription: namespace events are published by containerd itself.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut n = 0;
        loop {
            n += 1;
            let probe = format!("ra-events-probe-{n}");
            let _ = ctr.run(&["namespaces", "create", &probe]);
            let got = rec.wait_for(Duration::from_millis(500), |e| {
                e.topic == "/namespaces/create"
                    && e.payload.get("name").and_then(Value::as_str) == Some(&probe)
            });
            let _ = ctr.run(&["namespaces", "rm", &probe]);
            if got.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("ctr events showed no event for a namespace created after it started");
            }
        }
        Ok(rec)
    }

    /// All events so far.
    pub fn all(&self) -> Vec<Event> {
        let (lock, _) = &*self.shared;
        lock.lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .clone()
    }

    /// The number of events so far (a mark for [`EventRecorder::since`]).
    pub fn mark(&self) -> usize {
        let (lock, _) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).events.len()
    }

    /// Events with `seq >= mark`.
    pub fn since(&self, mark: usize) -> Vec<Event> {
        let (lock, _) = &*self.shared;
        let g = lock.lock().unwrap_or_else(|e| e.into_inner());
        g.events.get(mark..).map(|s| s.to_vec()).unwrap_or_default()
    }

    /// Events of container `id` in namespace `ns`, in order.
    pub fn for_container(&self, ns: &str, id: &str) -> Vec<Event> {
        self.all()
            .into_iter()
            .filter(|e| e.namespace == ns && e.container_id() == Some(id))
            .collect()
    }

    /// Waits until an event matching `pred` has arrived (also one that arrived before).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Result<Event> {
        let (lock, cv) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(e) = g.events.iter().find(|e| pred(e)) {
                return Ok(e.clone());
            }
            if g.ended {
                bail!("ctr events ended");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out after {timeout:?} waiting for an event");
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for `topic` of container `id` in namespace `ns`.
    pub fn wait_topic(&self, ns: &str, id: &str, topic: &str, timeout: Duration) -> Result<Event> {
        self.wait_for(timeout, |e| {
            e.namespace == ns && e.topic == topic && e.container_id() == Some(id)
        })
        .with_context(|| format!("event {topic} for container {id} in namespace {ns}"))
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ctr_events_lines() {
        let l = r#"2026-11-21 08:01:26.123456789 +0000 UTC ns1 /tasks/exit {"container_id":"c1","id":"c1","pid":42,"exit_status":3}"#;
        let e = parse_line(7, l).expect("parsed");
        assert_eq!(e.seq, 7);
        assert_eq!(e.namespace, "ns1");
        assert_eq!(e.topic, "/tasks/exit");
        assert_eq!(e.container_id(), Some("c1"));
        assert_eq!(e.u64_field("exit_status"), 3);
        assert_eq!(e.u64_field("missing"), 0);
        let e = parse_line(
            0,
            r#"2026-11-21 08:01:26 +0000 UTC ns1 /containers/delete {"id":"c2"}"#,
        )
        .expect("parsed");
        assert_eq!(e.container_id(), Some("c2"));
        assert!(parse_line(0, "garbage").is_none());
    }
}
