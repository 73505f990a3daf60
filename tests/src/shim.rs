//! Driving a shim binary directly, the way containerd does, and speaking its task API over
//! ttrpc (v2, or v3 when the shim's `start` output announces it, as containerd 2 does). Used where ctr cannot express a request (a malformed bundle, odd runtime options)
//! and where the exact ttrpc status code matters.
//!
//! Start-up follows containerd: `<shim> -namespace NS -address GRPC -publish-binary
//! CONTAINERD -id ID start` with the first bundle as working directory, `TTRPC_ADDRESS`,
//! `GRPC_ADDRESS` and `NAMESPACE` in the environment, and a `log` FIFO in the bundle that the
//! serving shim writes its log to. `start` prints the socket address (plain, or as JSON).
//! Events go to a real private containerd's ttrpc socket.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::ttrpc;
use serde_json::{json, Value};

use crate::cleanup;
use crate::containerd::Containerd;
use crate::image::ImageBuilder;
use crate::poll::wait_for;

/// Time limit of one task API call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The ttrpc metadata key containerd puts the namespace in.
const NAMESPACE_KEY: &str = "containerd-namespace-ttrpc";

/// Type URL of an OCI process spec (JSON) in an `Any`, as containerd sends it for exec.
pub const PROCESS_SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// Type URL of runc's shim options.
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

/// An error answer of the task API: the ttrpc status code and message, or a transport error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError {
    /// The status code name (`NOT_FOUND`, `FAILED_PRECONDITION`, ...), or `TRANSPORT`.
    pub code: String,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &str, message: impl Into<String>) -> RpcError {
        RpcError {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for RpcError {}

impl From<ttrpc::Error> for RpcError {
    fn from(e: ttrpc::Error) -> RpcError {
        match e {
            ttrpc::Error::RpcStatus(s) => RpcError {
                code: match s.code.enum_value() {
                    Ok(c) => format!("{c:?}"),
                    Err(n) => format!("CODE_{n}"),
                },
                message: s.message.clone(),
            },
            other => RpcError {
                code: "TRANSPORT".into(),
                message: other.to_string(),
            },
        }
    }
}

/// A result of one task API call.
pub type RpcResult<T> = std::result::Result<T, RpcError>;

/// Writes a bundle: `config.json` from `spec` and, if `rootfs`, the test image's files in
/// `rootfs/`.
pub fn write_bundle(dir: &Path, spec: &Value, rootfs: Option<&ImageBuilder>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(spec)?)?;
    if let Some(b) = rootfs {
        b.unpack_into(&dir.join("rootfs"))?;
    }
    Ok(())
}

/// An OCI process spec for exec, as an `Any`.
pub fn process_any(args: &[&str]) -> Any {
    let p = json!({
        "terminal": false,
        "user": { "uid": 0, "gid": 0 },
        "args": args,
        "env": [crate::image::IMAGE_PATH_ENV],
        "cwd": "/",
    });
    Any {
        type_url: PROCESS_SPEC_TYPE_URL.into(),
        value: serde_json::to_vec(&p).expect("json"),
        ..Default::default()
    }
}

/// A shim process started by the test, with a task API client. On drop, the containers it
/// was asked to create are killed and deleted, the shim is shut down (killed if need be) and
/// its socket removed.
pub struct ShimProcess {
    binary: PathBuf,
    namespace: String,
    address: String,
    pid: Option<i32>,
    rt: tokio::runtime::Runtime,
    client: ttrpc::asynchronous::Client,
    /// `containerd.task.v2.Task` or `containerd.task.v3.Task`, as the shim announced.
    service: &'static str,
    created: Vec<String>,
    log: SharedBytes,
    log_stop: Arc<AtomicBool>,
}

impl ShimProcess {
    /// Launches `binary` for container `id` with bundle `bundle` (its working directory), in
    /// `namespace`, publishing events to `containerd`.
    pub fn launch(
        binary: &Path,
        containerd: &Containerd,
        namespace: &str,
        id: &str,
        bundle: &Path,
    ) -> Result<ShimProcess> {
        // Remember the namespace: runc state and cgroups under it are removed with the daemon.
        let _ = containerd.ctr(namespace);
        let (log, log_stop) = open_log_fifo(&bundle.join("log"))?;
        let out_path = bundle.join("start.stdout");
        let err_path = bundle.join("start.stderr");
        let ttrpc_address = containerd.ttrpc_address();
        let mut cmd = Command::new(binary);
        cmd.args(["-namespace", namespace, "-address"])
            .arg(containerd.address())
            .arg("-publish-binary")
            .arg(containerd.version().containerd_bin())
            .args(["-id", id, "start"])
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", &ttrpc_address)
            .env("GRPC_ADDRESS", containerd.address())
            .env("NAMESPACE", namespace)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    containerd.version().bin_dir().display(),
                    crate::paths::SYSTEM_PATH
                ),
            )
            .stdin(Stdio::null())
            // Files, not pipes: the serving shim it forks must not keep our pipes open.
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let status = crate::poll::try_wait_for(
            &format!("`{} ... start` to exit", binary.display()),
            CALL_TIMEOUT,
            || Ok(child.try_wait()?),
        );
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        if !status.success() {
            log_stop.store(true, Ordering::SeqCst);
            bail!(
                "`{} start` failed ({status}): stdout {stdout:?}, stderr {stderr:?}",
                binary.display()
            );
        }
        let (address, api_version) = parse_start_output(&stdout)
            .with_context(|| format!("shim start printed {stdout:?} (stderr {stderr:?})"))?;
        let pid = std::fs::read_to_string(bundle.join("shim.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .or_else(|| find_shim_by_cwd(binary, bundle));

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let connect_to = address.clone();
        let client = rt
            .block_on(async move { ttrpc::asynchronous::Client::connect(&connect_to).await })
            .with_context(|| format!("connect to the shim at {address}"))?;
        Ok(ShimProcess {
            binary: binary.to_path_buf(),
            namespace: namespace.to_string(),
            address,
            pid,
            rt,
            client,
            service: if api_version >= 3 {
                "containerd.task.v3.Task"
            } else {
                "containerd.task.v2.Task"
            },
            created: Vec::new(),
            log,
            log_stop,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// What the shim wrote to its log FIFO so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The task API service name the shim serves (v2, or v3 when `start` announced it).
    pub fn service(&self) -> &str {
        self.service
    }

    /// One unary call of the task API, the way containerd makes it (namespace in the
    /// metadata, a timeout).
    pub fn call<Req: Message, Resp: Message>(&self, method: &str, req: &Req) -> RpcResult<Resp> {
        self.call_within(method, req, CALL_TIMEOUT)
    }

    /// [`ShimProcess::call`] with a deadline of `timeout`.
    pub fn call_within<Req: Message, Resp: Message>(
        &self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> RpcResult<Resp> {
        let request = self.request(method, req, timeout)?;
        let res = self
            .rt
            .block_on(self.client.request(request))
            .map_err(RpcError::from)?;
        decode(&res.payload)
    }

    /// Two calls sent at the same time, each answered on its own.
    pub fn call_concurrently<Req: Message, Resp: Message>(
        &self,
        method: &str,
        a: &Req,
        b: &Req,
    ) -> (RpcResult<Resp>, RpcResult<Resp>) {
        let (ra, rb) = match (
            self.request(method, a, CALL_TIMEOUT),
            self.request(method, b, CALL_TIMEOUT),
        ) {
            (Ok(ra), Ok(rb)) => (ra, rb),
            (ra, rb) => {
                return (
                    ra.and_then(|_| Err(RpcError::new("ENCODE", "not sent"))),
                    rb.and_then(|_| Err(RpcError::new("ENCODE", "not sent"))),
                )
            }
        };
        let (a, b) = self
            .rt
            .block_on(async { tokio::join!(self.client.request(ra), self.client.request(rb)) });
        let answer = |r: Result<ttrpc::Response, ttrpc::Error>| {
            r.map_err(RpcError::from).and_then(|r| decode(&r.payload))
        };
        (answer(a), answer(b))
    }

    fn request<Req: Message>(
        &self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> RpcResult<ttrpc::Request> {
        let mut md = std::collections::HashMap::new();
        md.insert(NAMESPACE_KEY.to_string(), vec![self.namespace.clone()]);
        let payload = req
            .write_to_bytes()
            .map_err(|e| RpcError::new("ENCODE", e.to_string()))?;
        Ok(ttrpc::Request {
            service: self.service.to_string(),
            method: method.to_string(),
            timeout_nano: timeout.as_nanos() as i64,
            metadata: ttrpc::context::to_pb(md),
            payload,
            ..Default::default()
        })
    }

    /// `Create` with the given request (its id is remembered for cleanup).
    pub fn create_req(
        &mut self,
        req: api::CreateTaskRequest,
    ) -> RpcResult<api::CreateTaskResponse> {
        self.note_created(&req.id);
        self.call("Create", &req)
    }

    /// `Create` of container `id` from `bundle` with null stdio and optional runtime options.
    pub fn create(&mut self, id: &str, bundle: &Path, options: Option<Any>) -> RpcResult<u32> {
        let mut req = self.create_template(id, bundle);
        req.options = options.map(MessageField::some).unwrap_or_default();
        self.create_req(req).map(|r| r.pid)
    }

    /// The request [`ShimProcess::create`] sends (null stdio, no options), to send by hand.
    pub fn create_template(&self, id: &str, bundle: &Path) -> api::CreateTaskRequest {
        api::CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            ..Default::default()
        }
    }

    /// Remembers `id` for cleanup, for a Create sent by hand.
    pub fn note_created(&mut self, id: &str) {
        if !self.created.iter().any(|c| c == id) {
            self.created.push(id.to_string());
        }
    }

    /// Runs `args` as exec `exec_id` in container `id` to its end; its exit status.
    pub fn exec_output(&self, id: &str, exec_id: &str, args: &[&str]) -> RpcResult<u32> {
        self.exec(id, exec_id, args)?;
        self.start(id, exec_id)?;
        let code = self.wait(id, exec_id)?;
        self.delete(id, exec_id)?;
        Ok(code)
    }

    pub fn start(&self, id: &str, exec_id: &str) -> RpcResult<u32> {
        let req = api::StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call::<_, api::StartResponse>("Start", &req)
            .map(|r| r.pid)
    }

    pub fn state(&self, id: &str, exec_id: &str) -> RpcResult<api::StateResponse> {
        let req = api::StateRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call("State", &req)
    }

    /// The status name (`RUNNING`, `STOPPED`, ...) of a process.
    pub fn status(&self, id: &str, exec_id: &str) -> RpcResult<String> {
        self.state(id, exec_id)
            .map(|s| match s.status.enum_value() {
                Ok(v) => format!("{v:?}"),
                Err(n) => format!("STATUS_{n}"),
            })
    }

    pub fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> RpcResult<()> {
        let req = api::KillRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.call::<_, Empty>("Kill", &req).map(|_| ())
    }

    /// Waits for a process to exit; returns its exit status.
    pub fn wait(&self, id: &str, exec_id: &str) -> RpcResult<u32> {
        let req = api::WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call::<_, api::WaitResponse>("Wait", &req)
            .map(|r| r.exit_status)
    }

    pub fn delete(&self, id: &str, exec_id: &str) -> RpcResult<api::DeleteResponse> {
        let req = api::DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call("Delete", &req)
    }

    /// `Exec` of `args` as `exec_id` in container `id` (not started).
    pub fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> RpcResult<()> {
        let req = api::ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            spec: MessageField::some(process_any(args)),
            ..Default::default()
        };
        self.call::<_, Empty>("Exec", &req).map(|_| ())
    }

    pub fn pids(&self, id: &str) -> RpcResult<Vec<u32>> {
        let req = api::PidsRequest {
            id: id.into(),
            ..Default::default()
        };
        self.call::<_, api::PidsResponse>("Pids", &req)
            .map(|r| r.processes.iter().map(|p| p.pid).collect())
    }

    pub fn shutdown(&self, now: bool) -> RpcResult<()> {
        let req = api::ShutdownRequest {
            id: String::new(),
            now,
            ..Default::default()
        };
        self.call::<_, Empty>("Shutdown", &req).map(|_| ())
    }

    /// Creates and starts container `id` from `bundle`; returns the init pid.
    pub fn run(&mut self, id: &str, bundle: &Path) -> Result<u32> {
        self.create(id, bundle, None)
            .with_context(|| format!("create {id}: shim log:\n{}", self.log()))?;
        let pid = self
            .start(id, "")
            .with_context(|| format!("start {id}: shim log:\n{}", self.log()))?;
        Ok(pid)
    }

    /// Proves the shim still serves container `id`: it is RUNNING and an exec in it runs and
    /// reports its exit status.
    pub fn check_serves(&self, id: &str, probe_exec_id: &str) -> Result<()> {
        let st = self.status(id, "").context("State")?;
        if st != "RUNNING" {
            bail!("container {id} is {st}, not RUNNING");
        }
        self.exec(id, probe_exec_id, &["sh", "-c", "exit 7"])
            .context("Exec")?;
        self.start(id, probe_exec_id).context("Start of the exec")?;
        let code = self.wait(id, probe_exec_id).context("Wait for the exec")?;
        self.delete(id, probe_exec_id)
            .context("Delete of the exec")?;
        if code != 7 {
            bail!("probe exec exited {code}, not 7");
        }
        let pids = self.pids(id).context("Pids")?;
        if pids.is_empty() {
            bail!("Pids of {id} is empty");
        }
        Ok(())
    }

    /// Kills (SIGKILL, all processes) and deletes container `id`, ignoring errors.
    pub fn remove(&self, id: &str) {
        if self.kill(id, "", 9, true).is_ok() {
            let _ = self.wait(id, "");
        }
        let _ = self.delete(id, "");
    }
}

impl Drop for ShimProcess {
    fn drop(&mut self) {
        for id in self.created.clone() {
            self.remove(&id);
        }
        let _ = self.shutdown(true);
        if let Some(pid) = self.pid {
            if wait_for("the shim to exit", Duration::from_secs(5), || {
                (!cleanup::is_alive(pid)).then_some(())
            })
            .is_err()
            {
                cleanup::kill_and_wait(&[pid]);
            }
        }
        if let Some(path) = self.address.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
        }
        self.log_stop.store(true, Ordering::SeqCst);
    }
}

/// `start` prints the address plainly (task API v2) or as JSON with the API version
/// (`{"version": 3, "address": ..., "protocol": "ttrpc"}`), as containerd 2 reads it.
fn parse_start_output(stdout: &str) -> Result<(String, u64)> {
    let s = stdout.trim();
    if s.starts_with('{') {
        let v: Value = serde_json::from_str(s)?;
        let version = v.get("version").and_then(Value::as_u64).unwrap_or(2);
        if let Some(a) = v.get("address").and_then(Value::as_str) {
            return Ok((a.to_string(), version));
        }
        bail!("no address in the JSON");
    }
    if s.is_empty() {
        bail!("empty output");
    }
    Ok((s.lines().last().unwrap_or(s).trim().to_string(), 2))
}

/// The pid of a running `binary` whose working directory is `bundle`.
fn find_shim_by_cwd(binary: &Path, bundle: &Path) -> Option<i32> {
    let name = binary.file_name()?.to_string_lossy().into_owned();
    let bundle = std::fs::canonicalize(bundle).ok()?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cwd = std::fs::read_link(e.path().join("cwd")).ok();
        let exe = std::fs::read_link(e.path().join("exe")).ok();
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd0 =
            String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
        if cwd.as_deref() == Some(bundle.as_path())
            && (cmd0.ends_with(&name)
                || exe.is_some_and(|x| x.file_name().is_some_and(|f| f.to_string_lossy() == name)))
        {
            return Some(pid);
        }
    }
    None
}

fn decode<Resp: Message>(payload: &[u8]) -> RpcResult<Resp> {
    Resp::parse_from_bytes(payload).map_err(|e| RpcError::new("DECODE", e.to_string()))
}

/// Bytes filled by a background reader.
type SharedBytes = Arc<Mutex<Vec<u8>>>;

/// Creates the `log` FIFO the serving shim writes to and drains it in the background.
fn open_log_fifo(path: &Path) -> Result<(SharedBytes, Arc<AtomicBool>)> {
    let _ = std::fs::remove_file(path);
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o700))
        .with_context(|| format!("mkfifo {}", path.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let buf = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (b, s) = (buf.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while !s.load(Ordering::SeqCst) {
            match f.read(&mut chunk) {
                Ok(n) if n > 0 => b
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]),
                // No writer yet or none any more, or nothing to read: look again shortly.
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    Ok((buf, stop))
}
