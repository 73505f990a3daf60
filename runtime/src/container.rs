//! A container: its init, its exec processes, its cgroups, driven through libcontainer.
//!
//! Calls that clone (create, exec) go through the single-threaded helper
//! ([`crate::helper`]); calls that only touch files and send signals (start, pause,
//! resume, delete) run libcontainer in a blocking task of the shim itself.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};

use crate::cgroups::{self, CgroupPaths};
use crate::error::{Error, Result};
use crate::exits::ExitWatcher;
use crate::helper::{Request, StdioFds};
use crate::hibernate::driver::{Hibernation, SignalOutcome};
use crate::io::{ProcessIo, StdioConfig};
use crate::process::{ExitInfo, Process, ProcessState, Status};
use crate::spawn::call_helper;

/// How long Delete waits for a process's output to drain before closing the streams.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// What happens to containers, reported to the shim, which turns these into events.
#[derive(Debug, Clone)]
pub enum RuntimeEvent {
    /// A process started (`exec_id` empty for the init); always before its exit.
    Started {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    Exit {
        container_id: String,
        exec_id: String,
        pid: u32,
        exit: ExitInfo,
    },
    Oom {
        container_id: String,
    },
    /// A hibernation transition ([`crate::hibernate`]).
    Hibernation(crate::hibernate::driver::Transition),
}

/// Everything needed to create a container.
#[derive(Debug, Clone)]
pub struct CreateConfig {
    pub id: String,
    pub bundle: PathBuf,
    /// libcontainer's state root (one directory per container below it).
    pub state_root: PathBuf,
    pub stdio: StdioConfig,
    pub no_pivot: bool,
}

/// A created container.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    state_root: PathBuf,
    exits: ExitWatcher,
    events: UnboundedSender<RuntimeEvent>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Exec>>,
    cgroups: CgroupPaths,
    /// Set for an init restored by CRIU at Create: it runs already, and the Start that
    /// follows only reports it (see [`crate::checkpoint`]).
    restored: std::sync::atomic::AtomicBool,
    /// Set while hibernation kills the init after its checkpoint: that exit is not the
    /// task's (no exit event, Wait goes on waiting); it is sent here instead.
    sleep_exit: Mutex<Option<tokio::sync::oneshot::Sender<i32>>>,
    /// The container's hibernation, when it has it on.
    hibernation: std::sync::OnceLock<Arc<Hibernation>>,
}

struct Exec {
    process: Arc<Process>,
    /// JSON of the OCI process to run, kept until start.
    spec: Vec<u8>,
}

impl Container {
    /// Creates the container; its init waits for [`Container::start`].
    pub async fn create(
        cfg: CreateConfig,
        exits: ExitWatcher,
        events: UnboundedSender<RuntimeEvent>,
    ) -> Result<Arc<Container>> {
        let config_json = cfg.bundle.join("config.json");
        if !config_json.exists() {
            return Err(Error::NotFound(format!(
                "OCI runtime create failed: bundle {}: config.json not found",
                cfg.bundle.display()
            )));
        }
        std::fs::create_dir_all(&cfg.state_root)
            .map_err(|e| Error::io("create state root", &cfg.state_root, e))?;
        crate::rootfs::ensure_cwd(&cfg.bundle)?;
        let init = Arc::new(Process::new("", cfg.stdio.clone()));
        let (mut io, child) = ProcessIo::prepare(&cfg.stdio, &std::env::temp_dir())?;
        let req = Request::Create {
            id: cfg.id.clone(),
            bundle: cfg.bundle.clone(),
            root: cfg.state_root.clone(),
            stdio: child.fds(),
            console_socket: child.console_socket.clone(),
            no_pivot: cfg.no_pivot,
            join_unified: cgroups::mode() == cgroups::Mode::Hybrid,
        };
        let pid = match call_helper(&exits, &req, &child.inherit()).await {
            Ok(pid) => pid,
            Err(e) => {
                io.close();
                // A half-created container must not linger in libcontainer's state.
                let _ = force_delete(cfg.state_root.clone(), cfg.id.clone()).await;
                return Err(e);
            }
        };
        drop(child);
        init.set_pid(pid);
        let exit_rx = exits.register(pid);
        io.start(&cfg.stdio).await?;
        *init.io.lock().await = Some(io);
        let container = Self::track(cfg, init, exit_rx, exits, events, false);
        info!(container = %container.id, pid, "created");
        Ok(container)
    }

    /// Adopts an init that CRIU restored (see [`crate::checkpoint`]): it runs already, is
    /// the shim's child, and `exited` is its registration with the [`ExitWatcher`]. From
    /// here on it is tracked exactly like a created and started init.
    pub(crate) fn adopt_restored(
        cfg: CreateConfig,
        init: Arc<Process>,
        exited: tokio::sync::oneshot::Receiver<i32>,
        exits: ExitWatcher,
        events: UnboundedSender<RuntimeEvent>,
    ) -> Arc<Container> {
        let container = Self::track(cfg, init, exited, exits, events, true);
        info!(container = %container.id, pid = container.init.pid(), "restored");
        container
    }

    /// A container around a running `init` (created or restored): OOM notifications
    /// watched, and its exit (`exited`, its registration with the [`ExitWatcher`])
    /// handled when it comes.
    fn track(
        cfg: CreateConfig,
        init: Arc<Process>,
        exited: tokio::sync::oneshot::Receiver<i32>,
        exits: ExitWatcher,
        events: UnboundedSender<RuntimeEvent>,
        restored: bool,
    ) -> Arc<Container> {
        let cgroups = CgroupPaths::of_pid(init.pid()).unwrap_or_default();
        let container = Arc::new(Container {
            id: cfg.id,
            bundle: cfg.bundle,
            state_root: cfg.state_root,
            exits,
            events,
            init,
            execs: Mutex::default(),
            cgroups,
            restored: std::sync::atomic::AtomicBool::new(restored),
            sleep_exit: Mutex::default(),
            hibernation: std::sync::OnceLock::new(),
        });
        container.watch_oom();
        container.handle_init_exit(exited);
        container
    }

    /// Waits for the current init's exit (`exited`, its registration with the
    /// [`ExitWatcher`]) and handles it: the task's exit, or hibernation's.
    fn handle_init_exit(self: &Arc<Self>, exited: tokio::sync::oneshot::Receiver<i32>) {
        let c = self.clone();
        tokio::spawn(async move {
            let status = exited.await.unwrap_or(255);
            let asleep = c
                .sleep_exit
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            match asleep {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => c.on_init_exit(status as u32).await,
            }
        });
    }

    fn watch_oom(&self) {
        let events = self.events.clone();
        let id = self.id.clone();
        if let Err(e) = cgroups::oom::watch(&self.cgroups, move || {
            let _ = events.send(RuntimeEvent::Oom {
                container_id: id.clone(),
            });
        }) {
            debug!(container = %self.id, "no OOM notifications: {e}");
        }
    }

    /// The init exited: stop whatever is left in the container, let the execs' exits
    /// be reported first (as the stock shim does), then report the init's.
    async fn on_init_exit(&self, status: u32) {
        if let Some(h) = self.hibernation() {
            h.init_exited();
        }
        let _ = self.signal_all(Signal::SIGKILL);
        let running: Vec<Arc<Process>> = self
            .execs()
            .into_iter()
            .filter(|p| p.status() != Status::Stopped && p.pid() > 0)
            .collect();
        for p in running {
            let _ = tokio::time::timeout(Duration::from_secs(2), p.wait()).await;
        }
        let _gate = self.init.start_gate.lock().await;
        let exit = self.init.set_exited(status);
        let pid = self.init.pid().max(0) as u32;
        info!(container = %self.id, pid, status, "init exited");
        let _ = self.events.send(RuntimeEvent::Exit {
            container_id: self.id.clone(),
            exec_id: String::new(),
            pid,
            exit,
        });
    }

    fn execs(&self) -> Vec<Arc<Process>> {
        self.lock_execs()
            .values()
            .map(|e| e.process.clone())
            .collect()
    }

    fn lock_execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Exec>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process `exec_id` names (the init for an empty id).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.lock_execs()
            .get(exec_id)
            .map(|e| e.process.clone())
            .ok_or_else(|| Error::NotFound(format!("process {exec_id} does not exist")))
    }

    pub fn init_pid(&self) -> i32 {
        self.init.pid()
    }

    pub fn state(&self, exec_id: &str) -> Result<ProcessState> {
        Ok(self.process(exec_id)?.state())
    }

    /// Starts the init (empty `exec_id`) or a created exec process; returns its pid.
    pub async fn start(&self, exec_id: &str) -> Result<i32> {
        if !exec_id.is_empty() {
            return self.start_exec(exec_id).await;
        }
        let _gate = self.init.start_gate.lock().await;
        if !self
            .restored
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.init.check_start()?;
            let (root, id) = (self.state_root.clone(), self.id.clone());
            blocking(move || start_init(&root, &id)).await?;
            self.init.set_status(Status::Running);
        }
        let pid = self.init.pid();
        self.report_started("", pid);
        Ok(pid)
    }

    fn report_started(&self, exec_id: &str, pid: i32) {
        let _ = self.events.send(RuntimeEvent::Started {
            container_id: self.id.clone(),
            exec_id: exec_id.to_string(),
            pid: pid.max(0) as u32,
        });
    }

    /// Registers an exec process; it runs at [`Container::start`] with its id.
    pub fn add_exec(&self, exec_id: &str, spec: Vec<u8>, stdio: StdioConfig) -> Result<()> {
        if self.init.status() == Status::Stopped {
            return Err(Error::FailedPrecondition(format!(
                "container {} is stopped",
                self.id
            )));
        }
        let mut execs = self.lock_execs();
        if execs.contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!("id {exec_id}")));
        }
        execs.insert(
            exec_id.to_string(),
            Exec {
                process: Arc::new(Process::new(exec_id, stdio)),
                spec,
            },
        );
        Ok(())
    }

    async fn start_exec(&self, exec_id: &str) -> Result<i32> {
        let (process, spec) = {
            let execs = self.lock_execs();
            let e = execs
                .get(exec_id)
                .ok_or_else(|| Error::NotFound(format!("process {exec_id} does not exist")))?;
            (e.process.clone(), e.spec.clone())
        };
        let _gate = process.start_gate.lock().await;
        process.check_start()?;
        if self.init.status() == Status::Stopped {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        // A sleeping container wakes first; the permit reports the exec's end.
        let permit = match self.hibernation() {
            Some(h) => Some(
                h.exec()
                    .await
                    .map_err(|e| Error::FailedPrecondition(e.to_string()))?,
            ),
            None => None,
        };
        let spec_file = self.bundle.join(format!(".exec-{exec_id}.json"));
        std::fs::write(&spec_file, &spec)
            .map_err(|e| Error::io("write exec process spec", &spec_file, e))?;
        let (mut io, child) = ProcessIo::prepare(&process.stdio, &std::env::temp_dir())?;
        let req = Request::Exec {
            id: self.id.clone(),
            root: self.state_root.clone(),
            process: spec_file.clone(),
            stdio: child.fds(),
            console_socket: child.console_socket.clone(),
        };
        let res = call_helper(&self.exits, &req, &child.inherit()).await;
        let _ = std::fs::remove_file(&spec_file);
        drop(child);
        let pid = match res {
            Ok(pid) => pid,
            Err(e) => {
                io.close();
                // The stock shim leaves a failed exec stopped with status 255? No: it
                // reports the error and the process stays unstartable; remove it so the
                // id can be reused after delete.
                process.set_exited(255);
                return Err(e);
            }
        };
        process.set_pid(pid);
        let exit_rx = self.exits.register(pid);
        io.start(&process.stdio).await?;
        *process.io.lock().await = Some(io);
        process.set_status(Status::Running);
        let events = self.events.clone();
        let (cid, eid, p) = (self.id.clone(), exec_id.to_string(), process.clone());
        tokio::spawn(async move {
            let status = exit_rx.await.unwrap_or(255) as u32;
            drop(permit);
            let _gate = p.start_gate.lock().await;
            let exit = p.set_exited(status);
            debug!(container = %cid, exec = %eid, pid, status, "exec exited");
            let _ = events.send(RuntimeEvent::Exit {
                container_id: cid,
                exec_id: eid,
                pid: pid as u32,
                exit,
            });
        });
        self.report_started(exec_id, pid);
        Ok(pid)
    }

    /// Sends `signal` to the process, or with `all` to every process of the container.
    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        if let (true, Some(h)) = (exec_id.is_empty(), self.hibernation()) {
            // A sleeping init wakes for any signal but SIGKILL, which ends it as it sleeps.
            if self.init.status() != Status::Stopped {
                if let Ok(SignalOutcome::Killed) = h.signal(signal as i32).await {
                    return Ok(());
                }
            }
        }
        self.kill_now(exec_id, signal, all)
    }

    fn kill_now(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let p = self.process(exec_id)?;
        let sig = Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("invalid signal {signal}")))?;
        if all && exec_id.is_empty() {
            if p.status() == Status::Stopped {
                return Err(Error::NotFound("process already finished".into()));
            }
            self.signal_all(sig)?;
        } else {
            p.check_kill()?;
            match kill(Pid::from_raw(p.pid()), sig) {
                Ok(()) => {}
                Err(nix::errno::Errno::ESRCH) => {
                    return Err(Error::NotFound("process already finished".into()));
                }
                Err(e) => return Err(Error::sys(format!("kill {} with {sig}", p.pid()), e)),
            }
        }
        // A frozen v1 cgroup would hold SIGKILL until thawed: thaw it, as runc does.
        if sig == Signal::SIGKILL && self.init.status() == Status::Paused {
            let (root, id) = (self.state_root.clone(), self.id.clone());
            let init = self.init.clone();
            tokio::spawn(async move {
                if blocking(move || {
                    load(&root, &id)?
                        .resume()
                        .map_err(|e| runtime_err("resume", e))
                })
                .await
                .is_ok()
                {
                    init.set_status(Status::Running);
                }
            });
        }
        Ok(())
    }

    fn signal_all(&self, sig: Signal) -> Result<()> {
        let pids = match self.cgroups.procs() {
            Ok(p) => p,
            Err(_) => vec![self.init.pid()],
        };
        for pid in pids.into_iter().filter(|p| *p > 0) {
            match kill(Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => warn!(container = %self.id, pid, "kill {sig}: {e}"),
            }
        }
        Ok(())
    }

    pub async fn pause(&self) -> Result<()> {
        if let Some(h) = self.hibernation() {
            if self.init.status() == Status::Running {
                h.pause().await.map_err(|e| Error::State(e.to_string()))?;
            }
        }
        match self.init.status() {
            Status::Running => {}
            Status::Created => {
                return Err(Error::State("cannot pause task in created state".into()))
            }
            Status::Paused => return Err(Error::State("cannot pause a paused container".into())),
            Status::Stopped => return Err(Error::State("cannot pause a stopped container".into())),
        }
        let (root, id) = (self.state_root.clone(), self.id.clone());
        blocking(move || {
            load(&root, &id)?
                .pause()
                .map_err(|e| runtime_err("OCI runtime pause failed", e))
        })
        .await?;
        self.init.set_status(Status::Paused);
        Ok(())
    }

    pub async fn resume(&self) -> Result<()> {
        if let Some(h) = self.hibernation() {
            if self.init.status() == Status::Paused {
                h.resume().await.map_err(|e| Error::State(e.to_string()))?;
            }
        }
        match self.init.status() {
            Status::Paused => {}
            Status::Created => {
                return Err(Error::State("cannot resume task in created state".into()))
            }
            Status::Running => return Err(Error::State("cannot resume a running process".into())),
            Status::Stopped => {
                return Err(Error::State("cannot resume a stopped container".into()))
            }
        }
        let (root, id) = (self.state_root.clone(), self.id.clone());
        blocking(move || {
            load(&root, &id)?
                .resume()
                .map_err(|e| runtime_err("OCI runtime resume failed", e))
        })
        .await?;
        self.init.set_status(Status::Running);
        Ok(())
    }

    /// Deletes an exec process (which must have exited) and returns how it ended.
    pub async fn delete_exec(&self, exec_id: &str) -> Result<(u32, ExitInfo)> {
        let p = self.process(exec_id)?;
        match p.status() {
            Status::Running | Status::Paused => {
                return Err(Error::State("cannot delete a running process".into()));
            }
            Status::Created | Status::Stopped => {}
        }
        self.finish_io(&p).await;
        self.lock_execs().remove(exec_id);
        let exit = p.exit().unwrap_or(ExitInfo {
            status: 0,
            at: std::time::SystemTime::now(),
        });
        Ok((p.pid().max(0) as u32, exit))
    }

    /// Deletes the container: its init must have exited (or never started). Cleans up
    /// libcontainer's state and the cgroups.
    pub async fn delete(&self) -> Result<(u32, ExitInfo)> {
        if self.init.status() == Status::Stopped || self.init.status() == Status::Created {
            if let Some(h) = self.hibernation() {
                // Its rules, listeners, images and checkpoints go with it.
                h.shutdown().await;
            }
        }
        match self.init.status() {
            Status::Running => return Err(Error::State("cannot delete a running process".into())),
            Status::Paused => return Err(Error::State("cannot delete a paused process".into())),
            Status::Created => {
                let _ = self.signal_all(Signal::SIGKILL);
                if tokio::time::timeout(Duration::from_secs(10), self.init.wait())
                    .await
                    .is_err()
                {
                    return Err(Error::Other(format!(
                        "container {} init did not die",
                        self.id
                    )));
                }
            }
            Status::Stopped => {}
        }
        let _ = self.signal_all(Signal::SIGKILL);
        for p in self.execs() {
            self.finish_io(&p).await;
        }
        self.lock_execs().clear();
        self.finish_io(&self.init).await;
        force_delete(self.state_root.clone(), self.id.clone()).await?;
        if let Err(e) = self.cgroups.remove_own() {
            warn!(container = %self.id, "{e}");
        }
        let exit = self.init.exit().unwrap_or(ExitInfo {
            status: 0,
            at: std::time::SystemTime::now(),
        });
        Ok((self.init.pid().max(0) as u32, exit))
    }

    async fn finish_io(&self, p: &Process) {
        let mut guard = p.io.lock().await;
        if let Some(io) = guard.as_mut() {
            if p.status() == Status::Stopped {
                io.wait_output(OUTPUT_DRAIN).await;
            }
            io.close();
        }
        *guard = None;
    }

    pub async fn close_stdin(&self, exec_id: &str) -> Result<()> {
        let p = self.process(exec_id)?;
        let mut guard = p.io.lock().await;
        if let Some(io) = guard.as_mut() {
            io.close_stdin();
        }
        Ok(())
    }

    pub async fn resize_pty(&self, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let p = self.process(exec_id)?;
        let guard = p.io.lock().await;
        match guard.as_ref() {
            Some(io) => io.resize(width, height),
            None => Err(Error::NotFound(format!(
                "process {exec_id} has no terminal"
            ))),
        }
    }

    /// Pids of every process in the container, with the exec id of those that are execs.
    pub fn pids(&self) -> Result<Vec<(u32, Option<String>)>> {
        if let Some(h) = self.hibernation().filter(|h| h.asleep()) {
            // The processes it had when it went to sleep: to containerd it runs.
            return Ok(h.snapshot().pids.into_iter().map(|p| (p, None)).collect());
        }
        let execs: HashMap<i32, String> = self
            .lock_execs()
            .iter()
            .filter(|(_, e)| e.process.pid() > 0)
            .map(|(id, e)| (e.process.pid(), id.clone()))
            .collect();
        let pids = self.cgroups.procs()?;
        Ok(pids
            .into_iter()
            .map(|p| (p as u32, execs.get(&p).cloned()))
            .collect())
    }

    /// Metrics in containerd's cgroups format.
    pub fn stats(&self) -> Result<containerd_shim_protos::protobuf::well_known_types::any::Any> {
        cgroups::stats::collect(&self.cgroups)
    }

    /// Applies new resource limits (a JSON `LinuxResources`).
    pub async fn update(&self, resources_json: Vec<u8>) -> Result<()> {
        if self.init.status() == Status::Stopped {
            return Err(Error::State("cannot update a stopped container".into()));
        }
        if let Some(h) = self.hibernation().filter(|h| h.asleep()) {
            serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources_json)
                .map_err(|e| Error::InvalidArgument(format!("malformed resources: {e}")))?;
            // Applied to the restored tree at the wake.
            h.defer_update(resources_json);
            return Ok(());
        }
        self.apply_update(resources_json).await
    }

    /// Applies new resource limits (a JSON `LinuxResources`) to the container's cgroups.
    pub(crate) async fn apply_update(&self, resources_json: Vec<u8>) -> Result<()> {
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&resources_json)
            .map_err(|e| Error::InvalidArgument(format!("malformed resources: {e}")))?;
        let (root, id) = (self.state_root.clone(), self.id.clone());
        blocking(move || {
            let c = load(&root, &id)?;
            let cfg = c
                .spec()
                .map_err(|e| runtime_err("load container config", e))?;
            let manager =
                libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
                    cgroup_path: cfg.cgroup_path.clone(),
                    systemd_cgroup: false,
                    container_name: id.clone(),
                })
                .map_err(|e| Error::Other(format!("cgroup manager for {id}: {e}")))?;
            use libcgroups::common::CgroupManager;
            manager
                .apply(&libcgroups::common::ControllerOpt {
                    resources: &resources,
                    disable_oom_killer: false,
                    oom_score_adj: None,
                    freezer_state: None,
                })
                .map_err(|e| Error::Other(format!("OCI runtime update failed: {e}")))
        })
        .await
    }

    /// The bundle directory.
    pub fn bundle(&self) -> &Path {
        &self.bundle
    }
}

/// What hibernation ([`crate::hibernate`]) does to a container's init: hold its stdio while
/// the tree sleeps, kill the tree without the task noticing, and put a restored (or
/// cold-started) init in its place.
impl Container {
    /// The init's fds 0-2 as the same open files (`pidfd_getfd`): the shim holds them
    /// while the tree sleeps, so that the output copiers see no end of file and the
    /// restore re-attaches the very same pipes.
    pub(crate) fn hold_init_stdio(&self) -> Result<[OwnedFd; 3]> {
        let pid = self.init.pid();
        let pidfd = pidfd_open(pid).map_err(|e| Error::sys(format!("pidfd_open {pid}"), e))?;
        let get = |n| {
            pidfd_getfd(&pidfd, n).map_err(|e| Error::sys(format!("pidfd_getfd {pid} fd {n}"), e))
        };
        Ok([get(0)?, get(1)?, get(2)?])
    }

    /// Turns hibernation on for this container (once, after its start).
    pub fn set_hibernation(&self, h: Hibernation) {
        let _ = self.hibernation.set(Arc::new(h));
    }

    /// The container's hibernation, when it has it on.
    pub fn hibernation(&self) -> Option<&Arc<Hibernation>> {
        self.hibernation.get()
    }

    /// Reports the init's exit with `status` (a sleeping container ended by SIGKILL, or
    /// one that could not be woken).
    pub(crate) async fn report_exit(&self, status: u32) {
        self.on_init_exit(status).await;
    }

    /// How the container was created (for a restore into it).
    pub(crate) fn create_config(&self) -> CreateConfig {
        CreateConfig {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            state_root: self.state_root.clone(),
            stdio: self.init.stdio.clone(),
            no_pivot: false,
        }
    }

    /// Whether the container joins a network namespace by path (a pod's), rather than
    /// having one of its own.
    pub(crate) fn joins_netns_by_path(&self) -> bool {
        let Ok(spec) = oci_spec::runtime::Spec::load(self.bundle.join("config.json")) else {
            return false;
        };
        spec.linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .iter()
            .any(|n| {
                n.typ() == oci_spec::runtime::LinuxNamespaceType::Network && n.path().is_some()
            })
    }

    /// The running processes of the container, for Pids while it sleeps.
    pub(crate) fn cgroups(&self) -> &CgroupPaths {
        &self.cgroups
    }

    /// Whether an exec process runs (a tree with one is not hibernated: CRIU dumps the
    /// init's tree, and an exec is not part of it).
    pub(crate) fn has_running_execs(&self) -> bool {
        self.execs().iter().any(|p| p.status() == Status::Running)
    }

    /// Puts every TCP connection of the container's processes into repair mode and
    /// returns the shim's own references to them, to be dropped once the processes are
    /// gone. Killing a process closes its sockets, and a normal close sends the peer a
    /// FIN (or a reset), which would end a keep-alive connection that CRIU has just
    /// dumped to restore; a socket closed in repair mode goes silently (the kernel's
    /// `tcp_close`/`tcp_disconnect` send nothing for it), so the peer's connection stays
    /// open for the restored socket. Best effort: a socket that cannot be switched is
    /// logged and left as it is.
    pub(crate) fn quiesce_tcp(&self) -> Vec<OwnedFd> {
        let pids = self
            .cgroups
            .procs()
            .unwrap_or_else(|_| vec![self.init.pid()]);
        let mut held = Vec::new();
        for pid in pids.into_iter().filter(|p| *p > 0) {
            let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            let Ok(pidfd) = pidfd_open(pid) else { continue };
            for e in entries.flatten() {
                let is_socket = std::fs::read_link(e.path())
                    .map(|l| l.to_string_lossy().starts_with("socket:["))
                    .unwrap_or(false);
                let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
                    continue;
                };
                if !is_socket {
                    continue;
                }
                let Ok(fd) = pidfd_getfd(&pidfd, n) else {
                    continue;
                };
                if !is_connected_tcp(&fd) {
                    continue;
                }
                let on: libc::c_int = 1;
                // SAFETY: setsockopt on a socket we hold, with a pointer to a c_int that
                // lives across the call and its exact size.
                let r = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_REPAIR,
                        &on as *const libc::c_int as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    debug!(container = %self.id, pid, fd = n, "TCP_REPAIR: {}", std::io::Error::last_os_error());
                    continue;
                }
                held.push(fd);
            }
        }
        held
    }

    /// Kills every process of the container for hibernation; the init's exit arrives on
    /// the returned receiver instead of being reported.
    pub(crate) fn kill_for_sleep(&self) -> tokio::sync::oneshot::Receiver<i32> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *self.sleep_exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let _ = self.signal_all(Signal::SIGKILL);
        rx
    }

    /// A restored init (its pid, and its registration with the exit watcher) takes the
    /// place of the one that slept; the task's state goes on as if nothing had happened.
    pub(crate) fn adopt_woken_init(
        self: &Arc<Self>,
        pid: i32,
        exited: tokio::sync::oneshot::Receiver<i32>,
    ) {
        self.init.set_pid(pid);
        self.handle_init_exit(exited);
        info!(container = %self.id, pid, "woken");
    }

    /// A fresh init from the bundle's spec, when the sleeping tree cannot be restored:
    /// libcontainer's state of the old one goes, the new one gets the held stdio (so the
    /// copies to containerd go on) and is started at once.
    pub(crate) async fn cold_restart(self: &Arc<Self>, stdio: &[OwnedFd; 3]) -> Result<i32> {
        force_delete(self.state_root.clone(), self.id.clone()).await?;
        let fds = StdioFds {
            stdin: stdio[0].as_raw_fd(),
            stdout: stdio[1].as_raw_fd(),
            stderr: stdio[2].as_raw_fd(),
        };
        let req = Request::Create {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            root: self.state_root.clone(),
            stdio: Some(fds),
            console_socket: None,
            no_pivot: false,
            join_unified: cgroups::mode() == cgroups::Mode::Hybrid,
        };
        let pid = call_helper(&self.exits, &req, &[fds.stdin, fds.stdout, fds.stderr]).await?;
        let exited = self.exits.register(pid);
        let (root, id) = (self.state_root.clone(), self.id.clone());
        if let Err(e) = blocking(move || start_init(&root, &id)).await {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(10), exited).await;
            return Err(e);
        }
        self.adopt_woken_init(pid, exited);
        self.watch_oom();
        Ok(pid)
    }
}

/// Whether `fd` is a TCP socket that is not a listener (a connection, or one being made).
fn is_connected_tcp(fd: &OwnedFd) -> bool {
    let get = |opt: libc::c_int| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt on a descriptor we hold into a c_int on our stack, with its
        // size in `len`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    get(libc::SO_PROTOCOL) == Some(libc::IPPROTO_TCP) && get(libc::SO_ACCEPTCONN) == Some(0)
}

fn pidfd_open(pid: i32) -> std::result::Result<OwnedFd, nix::errno::Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
    // memory is passed. (nix 0.29 has no wrapper.)
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> std::result::Result<OwnedFd, nix::errno::Errno> {
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and flags,
    // and returns a new descriptor (close-on-exec) or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Starts a created init. This is libcontainer's `Container::start` with one difference
/// users can see: poststart hooks get the state as runc gives it to them (status
/// `created`, the state before the start took effect), not `running`.
fn start_init(root: &Path, id: &str) -> Result<()> {
    use libcontainer::container::ContainerStatus;
    let runtime = |e: String| Error::Runtime {
        context: "OCI runtime start failed".into(),
        message: e,
    };
    let mut c = load(root, id)?;
    c.refresh_status().map_err(|e| runtime(e.to_string()))?;
    if !c.can_start() {
        return Err(Error::State(format!(
            "cannot start a container in state {:?}",
            c.status()
        )));
    }
    let config =
        libcontainer::config::YoukiConfig::load(&c.root).map_err(|e| runtime(e.to_string()))?;
    let hook_state = c.state.clone();
    libcontainer::notify_socket::NotifySocket::new(
        c.root.join(libcontainer::notify_socket::NOTIFY_FILE),
    )
    .notify_container_start()
    .map_err(|e| runtime(e.to_string()))?;
    c.set_status(ContainerStatus::Running)
        .save()
        .map_err(|e| runtime(e.to_string()))?;
    if let Some(hooks) = config.hooks.as_ref() {
        libcontainer::hooks::run_hooks(
            hooks.poststart().as_ref(),
            Some(&hook_state),
            Some(&c.root),
            None,
            None,
        )
        .map_err(|e| Error::Runtime {
            context: "poststart hook failed".into(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

fn load(root: &Path, id: &str) -> Result<libcontainer::container::Container> {
    let dir = root.join(id);
    libcontainer::container::Container::load(dir.clone())
        .map_err(|e| Error::NotFound(format!("container {id} state in {}: {e}", dir.display())))
}

fn runtime_err(context: &str, e: libcontainer::error::LibcontainerError) -> Error {
    Error::Runtime {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// Removes libcontainer's state of `id` (and its cgroups), killing what is left.
pub async fn force_delete(root: PathBuf, id: String) -> Result<()> {
    blocking(move || {
        crate::checkpoint::restore::clean_leftovers(&root.join(&id));
        if !root.join(&id).exists() {
            return Ok(());
        }
        let mut c = load(&root, &id)?;
        c.delete(true)
            .map_err(|e| runtime_err("OCI runtime delete failed", e))
    })
    .await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Other(format!("blocking task failed: {e}")))?
}
