//! Hibernation as the shim wires it (the design is in `runc_architect_runtime::hibernate`):
//!
//! - at Create, the container's settings from its spec annotations over the node defaults
//!   of the runtime options; a malformed value fails the Create with INVALID_ARGUMENT
//!   before anything of the container exists ([`settings`]);
//! - at the init's Start, the driver, with the node's store (the `StoreConfig` one, or
//!   [`DEFAULT_STORE_ROOT`]), the container's local images directory below `HibernateDir`
//!   and its network namespace ([`start`]);
//! - each transition is published to containerd under `/runc-architect/hibernate/...` and
//!   recorded in the container's state file under the shim's `Root`, which `runc-architect
//!   status` and `metrics` read ([`transition`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use containerd_shim::protos::ttrpc::{self, Code};
use runc_architect_proto::status::{self as record, ContainerStatus, HibernationEvent, Topic};
use runc_architect_runtime::checkpoint::CriuConfig;
use runc_architect_runtime::hibernate::driver::{DriverConfig, Hibernation, Transition};
use runc_architect_runtime::hibernate::net::{rules, NetNs};
use runc_architect_runtime::hibernate::policy::{NodeDefaults, Settings, State};
use runc_architect_runtime::hibernate::tree::TreeConfig;
use runc_architect_runtime::{Container, ExitWatcher, RuntimeEvent};
use runc_architect_store::CheckpointKey;
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use crate::events::Events;
use crate::options::{
    RuntimeOptions, DEFAULT_HIBERNATE_DIR, DEFAULT_STATE_ROOT, DEFAULT_STORE_ROOT,
};
use crate::store::NodeStore;

const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

/// The container's hibernation settings, from its bundle's spec over the node defaults.
pub fn settings(bundle: &Path, opts: &RuntimeOptions) -> Result<Settings, ttrpc::Error> {
    let invalid = |msg: String| {
        ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::INVALID_ARGUMENT,
            format!("{msg}: invalid argument"),
        ))
    };
    let defaults =
        NodeDefaults::from_options(&opts.hibernation).map_err(|e| invalid(e.to_string()))?;
    let annotations = annotations(bundle);
    Settings::for_container(&annotations, &defaults).map_err(|e| invalid(e.to_string()))
}

fn annotations(bundle: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("annotations").cloned())
        .and_then(|a| serde_json::from_value(a).ok())
        .unwrap_or_default()
}

/// What the shim keeps of each hibernating container for its state file.
struct Entry {
    root: PathBuf,
    record: ContainerStatus,
}

fn book() -> &'static Mutex<HashMap<String, Entry>> {
    static BOOK: OnceLock<Mutex<HashMap<String, Entry>>> = OnceLock::new();
    BOOK.get_or_init(Mutex::default)
}

/// Everything [`start`] needs from the task service.
pub struct Start<'a> {
    pub container: &'a Arc<Container>,
    pub settings: Settings,
    pub opts: &'a RuntimeOptions,
    pub namespace: &'a str,
    pub store: &'a NodeStore,
    pub exits: ExitWatcher,
    pub events: UnboundedSender<RuntimeEvent>,
    pub criu: CriuConfig,
}

/// Starts hibernation of a started container. A failure leaves the container running
/// without hibernation, logged with the reason.
pub async fn start(s: Start<'_>) {
    let c = s.container;
    let id = c.id.clone();
    if let Err(e) = try_start(&s).await {
        warn!(container = %id, "hibernation not started: {e}");
    }
}

async fn try_start(s: &Start<'_>) -> Result<(), String> {
    let c = s.container;
    let store = match &s.opts.store_config {
        Some(cfg) => s.store.open(cfg).await?,
        None => s.store.open_default(Path::new(DEFAULT_STORE_ROOT)).await?,
    };
    let key = checkpoint_key(c.bundle(), s.namespace, &c.id)?;
    let images_dir = s
        .opts
        .hibernate_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HIBERNATE_DIR))
        .join(s.namespace)
        .join(&c.id);
    let netns = match netns_path(c.bundle()) {
        Some(p) => NetNs::from_path(&p, s.exits.clone()),
        None => NetNs::of_pid(c.init_pid(), s.exits.clone()),
    }
    .map_err(|e| format!("network namespace: {e}"))?;
    let cfg = DriverConfig {
        settings: s.settings.clone(),
        tree: TreeConfig {
            images_dir,
            store,
            key,
            criu: s.criu.clone(),
        },
        netns,
    };
    let root = s
        .opts
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT));
    let mut rec = ContainerStatus::new(s.namespace, &c.id, SystemTime::now());
    rec.set_state(record::State::Running, SystemTime::now());
    if let Err(e) = record::write_atomic(&root, &rec) {
        warn!(container = %c.id, "write the hibernation state file: {e}");
    }
    book()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(c.id.clone(), Entry { root, record: rec });
    c.set_hibernation(Hibernation::start(
        c,
        s.exits.clone(),
        s.events.clone(),
        cfg,
    ));
    Ok(())
}

/// A name the store accepts: letters, digits, `.`, `_`, `-`, at most 128, starting with a
/// letter or digit.
fn store_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        out.insert(0, 'x');
        out.truncate(128);
    }
    out
}

/// The network namespace the spec joins by path (a pod's).
/// The store key of a container's hibernation checkpoints: the pod's namespace, name and
/// container name under Kubernetes, else the containerd namespace and the id.
fn checkpoint_key(bundle: &Path, namespace: &str, id: &str) -> Result<CheckpointKey, String> {
    let ann = annotations(bundle);
    let store_ns = ann
        .get(SANDBOX_NAMESPACE)
        .cloned()
        .unwrap_or_else(|| namespace.to_string());
    let template = ann
        .get(SANDBOX_NAME)
        .cloned()
        .unwrap_or_else(|| id.to_string());
    let name = ann
        .get(CONTAINER_NAME)
        .cloned()
        .unwrap_or_else(|| id.to_string());
    CheckpointKey::new(
        &store_name(&store_ns),
        &store_name(&template),
        &store_name(&name),
    )
    .map_err(|e| format!("checkpoint key: {e}"))
}

/// What a lost shim (killed while its container slept) held of hibernation, removed for
/// `shim delete`: the state file, the local images and its netfilter chains in a
/// namespace that outlives it (a pod's). The checkpoint in the store stays: containerd
/// runs `shim delete` as soon as it sees the shim gone, and that checkpoint is then the
/// only copy of the container's processes (the store's retention policy reclaims it).
/// Best effort, each step logged.
pub async fn cleanup_lost(bundle: &Path, namespace: &str, id: &str, root: &Path) {
    if let Err(e) = record::remove(root, namespace, id) {
        warn!(container = %id, "remove the hibernation state file: {e}");
    }
    let images = crate::task::recorded_path(bundle, "hibernate_dir")
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HIBERNATE_DIR))
        .join(namespace)
        .join(id);
    match std::fs::remove_dir_all(&images) {
        Ok(()) => {
            if let Some(p) = images.parent() {
                let _ = std::fs::remove_dir(p);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(container = %id, dir = %images.display(), "remove hibernation images: {e}"),
    }
    if let Some(path) = netns_path(bundle) {
        let Ok(exits) = ExitWatcher::start().await else {
            return;
        };
        if let Ok(ns) = NetNs::from_path(&path, exits) {
            let suffix = format!("-{}", rules::tag_of(id));
            match rules::remove_matching(&ns, |c| {
                c.starts_with(rules::PREFIX) && c.ends_with(&suffix)
            })
            .await
            {
                Ok(n) if n > 0 => {
                    tracing::info!(container = %id, chains = n, "hibernation rules of a lost shim removed")
                }
                Ok(_) => {}
                Err(e) => warn!(container = %id, "remove hibernation rules: {e}"),
            }
        }
    }
}

fn netns_path(bundle: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(bundle.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("linux")?
        .get("namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .map(PathBuf::from)
}

/// The container was deleted: its state file goes.
pub fn forget(id: &str) {
    if let Some(e) = book().lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
        if let Err(err) = record::remove(&e.root, &e.record.namespace, id) {
            warn!(container = %id, "remove the hibernation state file: {err}");
        }
    }
}

fn shown(s: State) -> Option<record::State> {
    Some(match s {
        State::Running => record::State::Running,
        State::Frozen | State::Checkpointing => record::State::Frozen,
        State::ScaledDown => record::State::ScaledDown,
        State::Waking => record::State::Waking,
        State::Exited => return None,
    })
}

/// A transition: the state file, and the event to containerd.
pub async fn transition(events: &Events, t: Transition) {
    let (from, to) = (shown(t.from), shown(t.to));
    let topic = match (t.from, t.to) {
        (State::Running, State::Frozen) => Some(Topic::Frozen),
        (State::Frozen, State::Running) => Some(Topic::Thawed),
        (State::Checkpointing, State::ScaledDown) => Some(Topic::ScaledDown),
        (State::Checkpointing, State::Running) => Some(Topic::CheckpointFailed),
        (State::ScaledDown, State::Waking) => Some(Topic::Waking),
        (State::Waking, State::Running) => Some(Topic::Woken),
        _ => None,
    };
    let failed_restore = {
        let mut book = book().lock().unwrap_or_else(|p| p.into_inner());
        match book.get_mut(&t.container_id) {
            Some(e) => {
                let rec = &mut e.record;
                let restore_failed = t.snapshot.restore_failures > rec.failures.restore;
                if restore_failed {
                    rec.record_restore_failure();
                }
                if topic == Some(Topic::CheckpointFailed) {
                    rec.record_checkpoint_failure();
                }
                if topic == Some(Topic::ScaledDown) {
                    rec.record_checkpoint(
                        t.snapshot.last_checkpoint.unwrap_or_default(),
                        t.snapshot.checkpoint_bytes.unwrap_or(0),
                        t.snapshot.memory_before,
                        t.snapshot.memory_after,
                    );
                }
                if topic == Some(Topic::Woken) {
                    if let Some(took) = t.snapshot.last_wake {
                        rec.record_wake(took, t.at);
                        rec.record_restore(took, t.snapshot.checkpoint_bytes.unwrap_or(0));
                    }
                }
                rec.record_activity(t.snapshot.last_activity);
                if let Some(to) = to {
                    rec.set_state(to, t.at);
                }
                if let Err(err) = record::write_atomic(&e.root, rec) {
                    warn!(container = %t.container_id, "write the hibernation state file: {err}");
                }
                restore_failed
            }
            None => false,
        }
    };
    let (Some(from), Some(to)) = (from, to) else {
        return;
    };
    let publish = |topic: Topic, reason: Option<String>| HibernationEvent {
        topic,
        container_id: t.container_id.clone(),
        from,
        to,
        at: t.at,
        wake_ms: (topic == Topic::Woken)
            .then(|| t.snapshot.last_wake.map(|d| d.as_secs_f64() * 1e3))
            .flatten(),
        checkpoint_bytes: (topic == Topic::ScaledDown)
            .then_some(t.snapshot.checkpoint_bytes)
            .flatten(),
        reason,
    };
    if failed_restore {
        events
            .publish_hibernation(publish(Topic::RestoreFailed, t.reason.clone()))
            .await;
    }
    if let Some(topic) = topic {
        let reason = match topic {
            Topic::CheckpointFailed => t.reason.clone(),
            _ => None,
        };
        events.publish_hibernation(publish(topic, reason)).await;
    }
}
