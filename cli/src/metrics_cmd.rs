//! `runc-architect metrics`: hibernation metrics in the Prometheus text exposition format
//! (version 0.0.4), printed once or served over HTTP (`--listen ADDR`, `GET /metrics`).
//!
//! Like `status`, it reads the shims' state files (`<root>/hibernate/<namespace>/<id>.json`,
//! see `runc_architect_proto::status`) at each scrape, so a scrape costs no shim anything and
//! a sleeping container is not touched. The families are built per scrape by a
//! `prometheus-client` collector from the records; the shims keep the histogram buckets
//! themselves, so nothing is lost between scrapes or when the exporter restarts.
//!
//! Metrics (every per-container series has the labels `namespace` and `container`):
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `runc_architect_state` | gauge | 1 for the container's current state, 0 for the others (label `state`: `RUNNING`, `FROZEN`, `SCALED_DOWN`, `WAKING`) |
//! | `runc_architect_state_since_timestamp_seconds` | gauge | when it entered its current state (unix time) |
//! | `runc_architect_last_activity_timestamp_seconds` | gauge | its last activity that counted (absent before the first) |
//! | `runc_architect_wakes_total` | counter | wakes (from FROZEN or SCALED_DOWN back to RUNNING) |
//! | `runc_architect_wake_duration_seconds` | histogram | wake latency, from the waking event to RUNNING |
//! | `runc_architect_checkpoint_duration_seconds` | histogram | checkpoint duration (dump to durable in the store) |
//! | `runc_architect_restore_duration_seconds` | histogram | restore duration |
//! | `runc_architect_checkpoint_written_bytes_total` | counter | bytes of checkpoint images written |
//! | `runc_architect_restore_read_bytes_total` | counter | bytes of checkpoint images read by restores |
//! | `runc_architect_checkpoint_size_bytes` | gauge | size of the last checkpoint (absent before the first) |
//! | `runc_architect_failures_total` | counter | failures, label `kind`: `checkpoint` (the container ran on) or `restore` (a cold start followed) |
//! | `runc_architect_memory_freed_bytes` | gauge | memory the last scale-down freed: the cgroup's use before minus after (absent before the first) |
//! | `runc_architect_status_files_unreadable` | gauge | state files skipped in this scrape (corrupt, another schema version); no labels |

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use runc_architect_proto::status::{self, ContainerStatus, Histogram, ReadAll, State};

const METRICS_HELP: &str = "\
METRICS (labels namespace and container on every per-container series):
  runc_architect_state{state}                      gauge: 1 for the current state, else 0
  runc_architect_state_since_timestamp_seconds     gauge: when the current state began
  runc_architect_last_activity_timestamp_seconds   gauge: last activity that counted
  runc_architect_wakes_total                       counter
  runc_architect_wake_duration_seconds             histogram: wake latency
  runc_architect_checkpoint_duration_seconds       histogram
  runc_architect_restore_duration_seconds          histogram
  runc_architect_checkpoint_written_bytes_total    counter
  runc_architect_restore_read_bytes_total          counter
  runc_architect_checkpoint_size_bytes             gauge: size of the last checkpoint
  runc_architect_failures_total{kind}              counter: kind checkpoint or restore
  runc_architect_memory_freed_bytes                gauge: freed by the last scale-down
  runc_architect_status_files_unreadable           gauge: state files skipped (no labels)

--listen ADDR serves GET /metrics on ADDR (e.g. 127.0.0.1:9465; port 0 picks a free port,
printed on stderr) until SIGTERM or SIGINT.";

/// The metric name prefix.
pub const PREFIX: &str = "runc_architect";

/// Arguments of `runc-architect metrics`.
#[derive(Args, Debug)]
#[command(after_long_help = METRICS_HELP)]
pub struct MetricsArgs {
    /// The shims' state root (their `Root` option).
    #[arg(long, value_name = "DIR", default_value = status::DEFAULT_ROOT)]
    root: PathBuf,
    /// Serve the metrics over HTTP at ADDR (`GET /metrics`) instead of printing them once.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

pub fn run(args: MetricsArgs) -> Result<i32> {
    match args.listen {
        None => {
            let found = status::read_all(&args.root);
            for u in &found.unreadable {
                eprintln!("runc-architect: warning: skipped {u}");
            }
            print!("{}", render(&found)?);
            Ok(0)
        }
        Some(addr) => serve(&args.root, addr),
    }
}

/// The exposition of `found`.
pub fn render(found: &ReadAll) -> Result<String> {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Snapshot {
        statuses: found.statuses.clone(),
        unreadable: found.unreadable.len(),
    }));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).context("encode the metrics")?;
    Ok(out)
}

/// The records of one scrape.
#[derive(Debug)]
struct Snapshot {
    statuses: Vec<ContainerStatus>,
    unreadable: usize,
}

fn secs(unix_ms: u64) -> f64 {
    unix_ms as f64 / 1000.0
}

impl Snapshot {
    /// One family with a gauge per container that has a value.
    fn gauges(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&ContainerStatus) -> Option<f64>,
    ) -> fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for s in &self.statuses {
            if let Some(v) = value(s) {
                m.encode_family(&labels(s))?.encode_gauge(&v)?;
            }
        }
        Ok(())
    }

    /// One family with a counter per container.
    fn counters(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&ContainerStatus) -> u64,
    ) -> fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for s in &self.statuses {
            m.encode_family(&labels(s))?
                .encode_counter::<NoLabelSet, _, f64>(&value(s), None)?;
        }
        Ok(())
    }

    /// One family with a histogram per container.
    fn histograms(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&ContainerStatus) -> &Histogram,
    ) -> fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for s in &self.statuses {
            let h = value(s);
            m.encode_family(&labels(s))?
                .encode_histogram::<NoLabelSet>(h.sum, h.count(), &h.buckets(), None)?;
        }
        Ok(())
    }
}

fn labels(s: &ContainerStatus) -> [(&'static str, &str); 2] {
    [
        ("namespace", s.namespace.as_str()),
        ("container", s.id.as_str()),
    ]
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        {
            let mut m = enc.encode_descriptor(
                "state",
                "Hibernation state of the container: 1 for its current state, 0 for the others.",
                None,
                MetricType::Gauge,
            )?;
            for s in &self.statuses {
                for st in State::ALL {
                    let l = [
                        ("namespace", s.namespace.as_str()),
                        ("container", s.id.as_str()),
                        ("state", st.as_str()),
                    ];
                    m.encode_family(&l)?
                        .encode_gauge(&i64::from(s.state == st))?;
                }
            }
        }
        self.gauges(
            &mut enc,
            "state_since_timestamp_seconds",
            "When the container entered its current hibernation state (unix time).",
            |s| Some(secs(s.since_unix_ms)),
        )?;
        self.gauges(
            &mut enc,
            "last_activity_timestamp_seconds",
            "The container's last activity that counted against idleness (unix time).",
            |s| s.last_activity_unix_ms.map(secs),
        )?;
        self.counters(
            &mut enc,
            "wakes",
            "Wakes of the container from FROZEN or SCALED_DOWN back to RUNNING.",
            |s| s.wakes,
        )?;
        self.histograms(
            &mut enc,
            "wake_duration_seconds",
            "Wake latency: from the event that woke the container to RUNNING.",
            |s| &s.counters.wake_seconds,
        )?;
        self.histograms(
            &mut enc,
            "checkpoint_duration_seconds",
            "Checkpoint duration: from the start of the dump to the images durable in the store.",
            |s| &s.counters.checkpoint_seconds,
        )?;
        self.histograms(
            &mut enc,
            "restore_duration_seconds",
            "Restore duration at a wake.",
            |s| &s.counters.restore_seconds,
        )?;
        self.counters(
            &mut enc,
            "checkpoint_written_bytes",
            "Bytes of checkpoint images written.",
            |s| s.counters.checkpoint_written_bytes,
        )?;
        self.counters(
            &mut enc,
            "restore_read_bytes",
            "Bytes of checkpoint images read by restores.",
            |s| s.counters.restore_read_bytes,
        )?;
        self.gauges(
            &mut enc,
            "checkpoint_size_bytes",
            "Size of the container's last checkpoint.",
            |s| s.checkpoint_bytes.map(|b| b as f64),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "failures",
                "Hibernation failures: kind checkpoint (the container ran on) or restore (a cold start followed).",
                None,
                MetricType::Counter,
            )?;
            for s in &self.statuses {
                for (kind, n) in [
                    ("checkpoint", s.failures.checkpoint),
                    ("restore", s.failures.restore),
                ] {
                    let l = [
                        ("namespace", s.namespace.as_str()),
                        ("container", s.id.as_str()),
                        ("kind", kind),
                    ];
                    m.encode_family(&l)?
                        .encode_counter::<NoLabelSet, _, f64>(&n, None)?;
                }
            }
        }
        self.gauges(
            &mut enc,
            "memory_freed_bytes",
            "Memory the last scale-down freed: the cgroup's use before it minus after it.",
            |s| s.memory_freed_bytes().map(|b| b as f64),
        )?;
        enc.encode_descriptor(
            "status_files_unreadable",
            "State files skipped in this scrape (corrupt, or of another schema version).",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(self.unreadable as i64))?;
        Ok(())
    }
}

/// Serves `GET /metrics` at `addr` until SIGTERM or SIGINT.
fn serve(root: &Path, addr: SocketAddr) -> Result<i32> {
    // The signals are blocked in this thread before any other exists (tiny_http's threads
    // inherit the mask) and taken by a thread of ours with sigwait, which then stops the
    // server: no signal handler, nothing async-signal-unsafe.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGTERM);
    stop_signals.add(Signal::SIGINT);
    stop_signals
        .thread_block()
        .context("block SIGTERM and SIGINT")?;
    let server =
        Arc::new(tiny_http::Server::http(addr).map_err(|e| anyhow!("listen on {addr}: {e}"))?);
    let bound = server
        .server_addr()
        .to_ip()
        .map(|a| a.to_string())
        .unwrap_or_else(|| addr.to_string());
    eprintln!("runc-architect: serving metrics on http://{bound}/metrics");
    {
        let server = server.clone();
        std::thread::spawn(move || {
            match stop_signals.wait() {
                Ok(sig) => eprintln!("runc-architect: {sig}: stopping"),
                Err(e) => eprintln!("runc-architect: waiting for signals: {e}: stopping"),
            }
            server.unblock();
        });
    }
    for req in server.incoming_requests() {
        respond(root, req);
    }
    Ok(0)
}

fn respond(root: &Path, req: tiny_http::Request) {
    use tiny_http::{Header, Method, Response, StatusCode};
    let path = req.url().split('?').next().unwrap_or_default();
    let text = |code: u16, body: String| {
        let mut r = Response::from_string(body).with_status_code(StatusCode(code));
        if let Ok(h) = Header::from_bytes("Content-Type", "text/plain; charset=utf-8") {
            r.add_header(h);
        }
        r
    };
    let response = match (req.method(), path) {
        (Method::Get | Method::Head, "/metrics") => {
            let found = status::read_all(root);
            for u in &found.unreadable {
                tracing::warn!("skipped {u}");
            }
            match render(&found) {
                Ok(body) => {
                    let mut r = Response::from_string(body);
                    if let Ok(h) = Header::from_bytes("Content-Type", prometheus_text::CONTENT_TYPE)
                    {
                        r.add_header(h);
                    }
                    r
                }
                Err(e) => text(500, format!("{e:#}\n")),
            }
        }
        (_, "/metrics") => text(405, "only GET /metrics\n".into()),
        _ => text(404, "metrics are at /metrics\n".into()),
    };
    // A client that went away is its own problem.
    let _ = req.respond(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record() -> ContainerStatus {
        let t0 = status::from_unix_ms(1_700_000_000_000);
        let mut s = ContainerStatus::new("k8s.io", "web", t0);
        s.set_state(State::ScaledDown, t0 + Duration::from_secs(61));
        s.record_checkpoint(Duration::from_millis(300), 1000, Some(5000), Some(200));
        s.record_wake(Duration::from_millis(20), t0 + Duration::from_secs(30));
        s.record_restore_failure();
        s
    }

    #[test]
    fn exposition_lines() {
        let found = ReadAll {
            statuses: vec![record()],
            unreadable: Vec::new(),
        };
        let text = render(&found).expect("render");
        let has = |l: &str| text.lines().any(|x| x == l);
        for l in [
            "# TYPE runc_architect_state gauge",
            r#"runc_architect_state{namespace="k8s.io",container="web",state="SCALED_DOWN"} 1"#,
            r#"runc_architect_state{namespace="k8s.io",container="web",state="RUNNING"} 0"#,
            "# TYPE runc_architect_wakes_total counter",
            r#"runc_architect_wakes_total{namespace="k8s.io",container="web"} 1"#,
            "# TYPE runc_architect_wake_duration_seconds histogram",
            r#"runc_architect_wake_duration_seconds_bucket{namespace="k8s.io",container="web",le="0.01"} 0"#,
            r#"runc_architect_wake_duration_seconds_bucket{namespace="k8s.io",container="web",le="0.025"} 1"#,
            r#"runc_architect_wake_duration_seconds_bucket{namespace="k8s.io",container="web",le="+Inf"} 1"#,
            r#"runc_architect_wake_duration_seconds_count{namespace="k8s.io",container="web"} 1"#,
            r#"runc_architect_checkpoint_written_bytes_total{namespace="k8s.io",container="web"} 1000"#,
            r#"runc_architect_failures_total{namespace="k8s.io",container="web",kind="restore"} 1"#,
            r#"runc_architect_failures_total{namespace="k8s.io",container="web",kind="checkpoint"} 0"#,
            r#"runc_architect_memory_freed_bytes{namespace="k8s.io",container="web"} 4800.0"#,
            r#"runc_architect_state_since_timestamp_seconds{namespace="k8s.io",container="web"} 1700000061.0"#,
            "runc_architect_status_files_unreadable 0",
        ] {
            assert!(has(l), "missing {l:?} in\n{text}");
        }
        // Nothing before the first activity.
        assert!(!text.contains("runc_architect_last_activity_timestamp_seconds{"));
    }
}
