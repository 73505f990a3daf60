//! The shim process: bootstrap (`start`, `delete`, `-info`), one shim per pod, and the
//! task service it serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{api, Config, Error, Flags, StartOpts};
use runc_architect_runtime::ExitWatcher;
use tracing::{info, warn};

use crate::events::{timestamp, Events};
use crate::options::DEFAULT_STATE_ROOT;
use crate::task::{read_options_file, TaskService};

/// Spec annotations that put containers into one shim: containerd's explicit group
/// label, then the CRI sandbox id (all containers of a pod share the pod's shim).
const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

/// The shim instance.
pub struct Service {
    namespace: String,
    id: String,
    debug: bool,
    exit: Arc<ExitSignal>,
    /// The socket this shim serves on (`-socket`).
    socket: String,
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            debug: args.debug,
            exit: Arc::new(ExitSignal::default()),
            socket: args.socket.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = group_of(Path::new("config.json")).unwrap_or_else(|| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        Ok(address)
    }

    /// Cleans up after a shim containerd lost: kills what is left of the container,
    /// removes its state and unmounts its rootfs, like `runc delete --force`.
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let bundle = std::env::current_dir().unwrap_or_default();
        let root = read_options_file(&bundle)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT))
            .join(&self.namespace);
        let pid = read_init_pid(&root, &self.id).unwrap_or(0);
        let state_root = root.parent().map(Path::to_path_buf).unwrap_or_default();
        crate::hibernate::cleanup_lost(&bundle, &self.namespace, &self.id, &state_root).await;
        if let Err(e) = runc_architect_runtime::container::force_delete(root, self.id.clone()).await
        {
            warn!(id = %self.id, "cleanup of lost container: {e}");
        }
        runc_architect_runtime::rootfs::unmount(&bundle);
        Ok(api::DeleteResponse {
            pid,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // The shim crate removes the socket named by the bundle's `address` file after
        // this returns, but containerd has deleted the bundle by then: the socket file
        // would stay, and the next shim for the same id (a restore after delete, a
        // re-run) would first wait a second for the dead socket to answer.
        let path = self.socket.strip_prefix("unix://").unwrap_or(&self.socket);
        if !path.is_empty() && !path.starts_with('@') {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        crate::logging::init(self.debug);
        info!(namespace = %self.namespace, id = %self.id, "runc-architect shim serving");
        let exits = match ExitWatcher::start().await {
            Ok(w) => w,
            Err(e) => {
                // Without exit tracking no container can be run; fail loudly and early.
                tracing::error!("{e}");
                std::process::exit(1);
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let events = Events::new(publisher, &self.namespace);
        tokio::spawn(events.clone().forward(rx));
        TaskService::new(&self.namespace, exits, tx, events, self.exit.clone())
    }
}

fn group_of(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
    let ann = spec.get("annotations")?;
    GROUP_ANNOTATIONS.iter().find_map(|k| {
        ann.get(*k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    })
}

fn read_init_pid(root: &Path, id: &str) -> Option<u32> {
    let text = std::fs::read_to_string(root.join(id).join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("pid")?.as_u64().map(|p| p as u32)
}
