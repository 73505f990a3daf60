//! Task events to containerd.
//!
//! Events go through the shim crate's [`RemotePublisher`], which queues and retries.
//! Events raised inside the runtime (exits, OOM kills) arrive on a channel and are
//! turned into `/tasks/exit` and `/tasks/oom` here, in the order they happened.
//!
//! Hibernation transitions go out under topics of ours, `/runc-architect/hibernate/...`
//! ([`Events::publish_hibernation`]); their topics and payload are defined, and the choice of
//! payload type explained, in `runc_architect_proto::status` (containerd 1.7 and 2.1 forward
//! them, and `ctr events` prints them with their fields).

use std::time::SystemTime;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{TaskExecStarted, TaskExit, TaskOOM, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::Context;
use runc_architect_proto::status::HibernationEvent;
use runc_architect_runtime::RuntimeEvent;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};

/// Publishes events for one namespace.
#[derive(Clone)]
pub struct Events {
    publisher: std::sync::Arc<RemotePublisher>,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Events {
        Events {
            publisher: std::sync::Arc::new(publisher),
            namespace: namespace.to_string(),
        }
    }

    /// Publishes `event` on `topic`; failures are logged, never returned: an event that
    /// cannot be delivered must not fail the request that caused it.
    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            warn!(topic, "publish event: {e}");
        }
    }

    /// Publishes a hibernation transition under its topic, and logs it (one `info` line with
    /// the container id, so callers need not). Like [`Events::publish`], never fails.
    pub async fn publish_hibernation(&self, ev: HibernationEvent) {
        info!(
            container = %ev.container_id,
            topic = ev.topic.as_str(),
            from = ev.from.as_str(),
            to = ev.to.as_str(),
            wake_ms = ev.wake_ms,
            checkpoint_bytes = ev.checkpoint_bytes,
            reason = ev.reason.as_deref(),
            "hibernation transition"
        );
        match ev.to_protobuf() {
            Ok(payload) => self.publish(ev.topic.as_str(), payload).await,
            Err(e) => {
                warn!(container = %ev.container_id, topic = ev.topic.as_str(), "publish event: {e}")
            }
        }
    }

    /// Forwards runtime events until the runtime side closes.
    pub async fn forward(self, mut rx: UnboundedReceiver<RuntimeEvent>) {
        while let Some(ev) = rx.recv().await {
            match ev {
                RuntimeEvent::Started {
                    container_id,
                    exec_id,
                    pid,
                } if exec_id.is_empty() => {
                    let mut e = TaskStart::new();
                    e.container_id = container_id;
                    e.pid = pid;
                    self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(e))
                        .await;
                }
                RuntimeEvent::Started {
                    container_id,
                    exec_id,
                    pid,
                } => {
                    let mut e = TaskExecStarted::new();
                    e.container_id = container_id;
                    e.exec_id = exec_id;
                    e.pid = pid;
                    self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e))
                        .await;
                }
                RuntimeEvent::Exit {
                    container_id,
                    exec_id,
                    pid,
                    exit,
                } => {
                    let mut e = TaskExit::new();
                    e.id = if exec_id.is_empty() {
                        container_id.clone()
                    } else {
                        exec_id
                    };
                    e.container_id = container_id;
                    e.pid = pid;
                    e.exit_status = exit.status;
                    e.exited_at = Some(timestamp(exit.at)).into();
                    self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(e))
                        .await;
                }
                RuntimeEvent::Oom { container_id } => {
                    let mut e = TaskOOM::new();
                    e.container_id = container_id;
                    self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(e))
                        .await;
                }
                RuntimeEvent::Hibernation(t) => crate::hibernate::transition(&self, t).await,
            }
        }
    }
}

/// A protobuf timestamp of `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

/// The timestamp the stock shim reports for a process that has not exited: Go's zero
/// `time.Time` (0001-01-01T00:00:00Z), which containerd and ctr show as such.
pub fn not_exited() -> Timestamp {
    let mut ts = Timestamp::new();
    ts.seconds = -62_135_596_800;
    ts
}
