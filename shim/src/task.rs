//! The task API (containerd's `containerd.task.v2.Task` over ttrpc).
//!
//! Each method maps a request onto [`runc_architect_runtime::Container`], publishes the
//! event the stock shim publishes for it, and reports errors with the stock shim's
//! status codes and wording (containerd's errdefs: "...: not found" and so on).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskIO, TaskPaused, TaskResumed,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::TtrpcResult;
use runc_architect_runtime::rootfs::{self, RootfsMount};
use runc_architect_runtime::{
    Container, CreateConfig, ErrorKind, ExitWatcher, RuntimeEvent, Status, StdioConfig,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::RwLock;
use tracing::{info, instrument};

use crate::checkpoint::{self, CriuRegistry};
use crate::events::{not_exited, timestamp, Events};
use crate::options::RuntimeOptions;
use crate::store::NodeStore;
use crate::trim::Trimmer;
use runc_architect_runtime::hibernate::policy::Settings;

/// File in the bundle recording the options a container was created with, so that the
/// `delete` bootstrap command can clean up after a lost shim.
pub const OPTIONS_FILE: &str = "runc-architect-options.json";

/// The task service of one shim (one pod, or one container under plain containerd).
pub struct TaskService {
    namespace: String,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    /// Ids whose Create is under way, reserved before anything is mounted or created so
    /// that a second Create of the same id fails at once and touches nothing of the first.
    creating: std::sync::Mutex<HashSet<String>>,
    exits: ExitWatcher,
    runtime_events: UnboundedSender<RuntimeEvent>,
    events: Events,
    exit: Arc<ExitSignal>,
    trimmer: Trimmer,
    criu: CriuRegistry,
    store: NodeStore,
    /// Hibernation settings and options of containers created but not started yet.
    hibernating: std::sync::Mutex<HashMap<String, (Settings, RuntimeOptions)>>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        exits: ExitWatcher,
        runtime_events: UnboundedSender<RuntimeEvent>,
        events: Events,
        exit: Arc<ExitSignal>,
    ) -> TaskService {
        TaskService {
            namespace: namespace.to_string(),
            containers: RwLock::default(),
            creating: std::sync::Mutex::default(),
            exits,
            runtime_events,
            events,
            exit,
            trimmer: Trimmer::start(),
            criu: CriuRegistry::default(),
            store: NodeStore::default(),
            hibernating: std::sync::Mutex::default(),
        }
    }

    fn lock_hibernating(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Settings, RuntimeOptions)>> {
        self.hibernating.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `id` for a Create; the reservation ends when the returned guard drops
    /// (after the container was inserted, or the Create failed).
    async fn reserve(&self, id: &str) -> TtrpcResult<Reservation<'_>> {
        let containers = self.containers.write().await;
        let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if containers.contains_key(id) || !creating.insert(id.to_string()) {
            // The stock shim's answer, word for word (runc refuses the id).
            return Err(status(
                Code::UNKNOWN,
                format!("OCI runtime create failed: container {id}: container with given ID already exists"),
            ));
        }
        Ok(Reservation {
            ids: &self.creating,
            id: id.to_string(),
        })
    }

    /// The container `id`. Every request goes through here, so this is also where the
    /// idle trimmer learns about activity.
    async fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.trimmer.poke();
        self.containers
            .read()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, "container not created"))
    }
}

/// An id reserved by a Create under way.
struct Reservation<'a> {
    ids: &'a std::sync::Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A ttrpc error with containerd's errdefs wording for `code`.
fn status(code: Code, msg: impl AsRef<str>) -> ttrpc::Error {
    let suffix = match code {
        Code::NOT_FOUND => "not found",
        Code::ALREADY_EXISTS => "already exists",
        Code::INVALID_ARGUMENT => "invalid argument",
        Code::FAILED_PRECONDITION => "failed precondition",
        Code::UNIMPLEMENTED => "not implemented",
        _ => "",
    };
    let msg = msg.as_ref();
    let text = if suffix.is_empty() || msg.ends_with(suffix) {
        msg.to_string()
    } else {
        format!("{msg}: {suffix}")
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, text))
}

fn rt_err(e: runc_architect_runtime::Error) -> ttrpc::Error {
    let code = match e.kind() {
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
        ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorKind::Unimplemented => Code::UNIMPLEMENTED,
        ErrorKind::Unknown => Code::UNKNOWN,
    };
    status(code, e.to_string())
}

fn task_status(s: Status) -> api::Status {
    match s {
        Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Paused => api::Status::PAUSED,
        Status::Stopped => api::Status::STOPPED,
    }
}

fn write_options_file(bundle: &Path, root: &Path, opts: &RuntimeOptions) {
    let body = serde_json::json!({
        "root": root,
        "hibernate_dir": opts.hibernate_dir,
        "store_config": opts.store_config,
    });
    if let Err(e) = std::fs::write(bundle.join(OPTIONS_FILE), body.to_string()) {
        tracing::warn!(bundle = %bundle.display(), "record options: {e}");
    }
}

/// Reads the state root recorded at create (for the `delete` bootstrap command).
pub fn read_options_file(bundle: &Path) -> Option<PathBuf> {
    recorded_path(bundle, "root")
}

/// A path recorded at create under `key` (`root`, `hibernate_dir`, `store_config`).
pub fn recorded_path(bundle: &Path, key: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(bundle.join(OPTIONS_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get(key)?.as_str().map(PathBuf::from)
}

#[async_trait]
impl Task for TaskService {
    #[instrument(skip_all, fields(id = %req.id))]
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let opts = RuntimeOptions::from_any(req.options.as_ref())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        if opts.systemd_cgroup {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "runtime option SystemdCgroup is not supported by runc-architect yet",
            ));
        }
        self.trimmer.poke();
        if let Some(config) = &opts.store_config {
            self.store
                .open(config)
                .await
                .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        }
        let _reservation = self.reserve(&req.id).await?;
        let bundle = PathBuf::from(&req.bundle);
        // Before anything of the container exists: a malformed annotation fails here.
        let hibernation = if bundle.join("config.json").exists() {
            Some(crate::hibernate::settings(&bundle, &opts)?)
        } else {
            None
        };
        if !bundle.is_dir() {
            return Err(status(
                Code::NOT_FOUND,
                format!("bundle {} does not exist", req.bundle),
            ));
        }
        let mounts: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fs_type: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        if mounts.is_empty()
            && !rootfs::rootfs_dir(&bundle).exists()
            && !bundle.join("config.json").exists()
        {
            return Err(status(
                Code::NOT_FOUND,
                format!("bundle {}: no config.json and no rootfs", req.bundle),
            ));
        }
        rootfs::mount(&bundle, &mounts).map_err(rt_err)?;
        let state_root = opts.state_root(&self.namespace);
        write_options_file(
            &bundle,
            &opts.root.clone().unwrap_or_else(|| {
                state_root
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
            }),
            &opts,
        );
        let stdio = StdioConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let cfg = CreateConfig {
            id: req.id.clone(),
            bundle: bundle.clone(),
            state_root,
            stdio,
            no_pivot: opts.no_pivot_root,
        };
        let created = if req.checkpoint.is_empty() {
            Container::create(cfg, self.exits.clone(), self.runtime_events.clone()).await
        } else {
            let restore = checkpoint::restore_config(cfg, &req.checkpoint, &opts);
            runc_architect_runtime::checkpoint::restore(
                restore,
                self.exits.clone(),
                self.runtime_events.clone(),
            )
            .await
            .map_err(Into::into)
        };
        let container = match created {
            Ok(c) => c,
            Err(e) => {
                rootfs::unmount(&bundle);
                return Err(rt_err(e));
            }
        };
        self.criu.remember(&req.id, &opts);
        if let Some(settings) = hibernation.filter(|s| s.enabled) {
            self.lock_hibernating()
                .insert(req.id.clone(), (settings, opts.clone()));
        }
        let pid = container.init_pid() as u32;
        self.containers
            .write()
            .await
            .insert(req.id.clone(), container);

        let mut ev = TaskCreate::new();
        ev.container_id = req.id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut io = TaskIO::new();
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        io.terminal = req.terminal;
        ev.io = MessageField::some(io);
        ev.checkpoint = req.checkpoint.clone();
        ev.pid = pid;
        self.events
            .publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
        info!(pid, "task created");
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.container(&req.id).await?;
        // The start event is published from the runtime's event stream, which orders it
        // before the process's exit.
        let pid = c.start(&req.exec_id).await.map_err(rt_err)? as u32;
        if req.exec_id.is_empty() {
            let pending = self.lock_hibernating().remove(&req.id);
            if let Some((settings, opts)) = pending {
                crate::hibernate::start(crate::hibernate::Start {
                    container: &c,
                    settings,
                    opts: &opts,
                    namespace: &self.namespace,
                    store: &self.store,
                    exits: self.exits.clone(),
                    events: self.runtime_events.clone(),
                    criu: self.criu.get(&req.id),
                })
                .await;
            }
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let c = self.container(&req.id).await?;
        if !req.exec_id.is_empty() {
            let (pid, exit) = c.delete_exec(&req.exec_id).await.map_err(rt_err)?;
            return Ok(api::DeleteResponse {
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            });
        }
        let (pid, exit) = c.delete().await.map_err(rt_err)?;
        rootfs::unmount(c.bundle());
        let _ = std::fs::remove_file(c.bundle().join(OPTIONS_FILE));
        self.containers.write().await.remove(&req.id);
        self.criu.forget(&req.id);
        self.lock_hibernating().remove(&req.id);
        crate::hibernate::forget(&req.id);
        let mut ev = TaskDelete::new();
        ev.container_id = req.id.clone();
        ev.pid = pid;
        ev.exit_status = exit.status;
        ev.exited_at = MessageField::some(timestamp(exit.at));
        self.events
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id).await?;
        let s = c.state(&req.exec_id).map_err(rt_err)?;
        let mut resp = api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle().to_string_lossy().into_owned(),
            pid: s.pid,
            status: task_status(s.status).into(),
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: s.stdio.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        match s.exit {
            Some(exit) => {
                resp.exit_status = exit.status;
                resp.exited_at = MessageField::some(timestamp(exit.at));
            }
            None => resp.exited_at = MessageField::some(not_exited()),
        }
        Ok(resp)
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id).await?;
        let pids = c.pids().map_err(rt_err)?;
        let processes = pids
            .into_iter()
            .map(|(pid, exec_id)| {
                let mut info = containerd_shim::protos::api::ProcessInfo {
                    pid,
                    ..Default::default()
                };
                if let Some(exec_id) = exec_id {
                    let mut d = containerd_shim::protos::shim::oci::ProcessDetails::new();
                    d.exec_id = exec_id;
                    if let Ok(value) = d.write_to_bytes() {
                        let mut any = Any::new();
                        any.type_url = "containerd.runc.v1.ProcessDetails".into();
                        any.value = value;
                        info.info = MessageField::some(any);
                    }
                }
                info
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        c.pause().await.map_err(rt_err)?;
        let mut ev = TaskPaused::new();
        ev.container_id = req.id.clone();
        self.events
            .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        c.resume().await.map_err(rt_err)?;
        let mut ev = TaskResumed::new();
        ev.container_id = req.id.clone();
        self.events
            .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        if let Some(h) = c.hibernation() {
            // A checkpoint asked for through the task API is of the running tree.
            h.wake()
                .await
                .map_err(|e| status(Code::FAILED_PRECONDITION, e.to_string()))?;
        }
        let mut creq = checkpoint::checkpoint_request(&req, self.criu.get(&req.id))?;
        if creq.work_dir.is_none() {
            // A kubelet checkpoint under our own runtime type (see cri_work_dir); its
            // archive leaves the node, so its images are written as runc writes them.
            creq.work_dir = checkpoint::cri_work_dir(c.bundle(), &req.id);
            creq.portable |= creq.work_dir.is_some();
        }
        runc_architect_runtime::checkpoint::checkpoint(&c, &self.exits, creq)
            .await
            .map_err(|e| rt_err(e.into()))?;
        Ok(api::Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all))]
    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        c.kill(&req.exec_id, req.signal, req.all)
            .await
            .map_err(rt_err)?;
        Ok(api::Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if let Err(e) = serde_json::from_slice::<oci_spec::runtime::Process>(&spec) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("malformed exec process spec: {e}"),
            ));
        }
        let stdio = StdioConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.add_exec(&req.exec_id, spec, stdio).map_err(rt_err)?;
        let mut ev = TaskExecAdded::new();
        ev.container_id = req.id.clone();
        ev.exec_id = req.exec_id.clone();
        self.events
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        c.resize_pty(&req.exec_id, req.width, req.height)
            .await
            .map_err(rt_err)?;
        Ok(api::Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        if req.stdin {
            c.close_stdin(&req.exec_id).await.map_err(rt_err)?;
        }
        Ok(api::Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        c.update(resources).await.map_err(rt_err)?;
        Ok(api::Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let c = self.container(&req.id).await?;
        let p = c.process(&req.exec_id).map_err(rt_err)?;
        let exit = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let c = self.container(&req.id).await?;
        let stats = c.stats().map_err(rt_err)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = match self.containers.read().await.get(&req.id) {
            Some(c) => c.init_pid().max(0) as u32,
            None => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    #[instrument(skip_all)]
    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        // A shim serving a pod stays up while any of its containers exists.
        if self.containers.read().await.is_empty() {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
