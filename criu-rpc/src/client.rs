//! [`Criu`]: where CRIU is and how to start it, and the one-shot requests.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::caps::{Features, Version};
use crate::error::{Error, Result};
use crate::fds::{ChildFds, SWRK_SOCKET_FD};
use crate::notify::{NoNotify, NotifyHandler};
use crate::opts::CriuOptions;
use crate::proto::{CriuReq, CriuReqType, CriuResp};
use crate::session::{feature_request, Session};
use crate::spawn::{ChildExit, ChildSpawner, TokioSpawner};
use crate::transport;

/// Directories searched for `criu` after `$PATH` (a shim may run with a short `$PATH`).
const SBIN_FALLBACK: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Where CRIU's stderr goes.
#[derive(Clone, Debug, Default)]
pub enum CriuStderr {
    /// This process's stderr.
    #[default]
    Inherit,
    /// Nowhere.
    Null,
    /// A duplicate of this descriptor (a log file, a pipe you drain).
    Fd(Arc<OwnedFd>),
}

#[derive(Clone, Debug)]
enum Target {
    Swrk { binary: PathBuf },
    Service { socket: PathBuf },
}

/// What a successful dump reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DumpOutcome {
    /// CRIU's `dump.restored` (true only for a self-dump that was restored).
    pub restored: bool,
    /// How the swrk CRIU exited afterwards, when known.
    pub criu_exit: Option<ChildExit>,
}

/// What a successful restore reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Pid of the restored tree's root, in this process's pid namespace. With
    /// `rst_sibling` it is a child of this process (reap it!); otherwise it was a child of
    /// the CRIU process and now belongs to the nearest subreaper.
    pub pid: i32,
    /// How the swrk CRIU exited afterwards, when known.
    pub criu_exit: Option<ChildExit>,
}

/// Where a PAGE_SERVER request left the page server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageServerInfo {
    /// Its pid, when CRIU reports one (CRIU 4.2.1 reports 0 for the daemon it starts
    /// over RPC, which shows here as `None`). The daemon ends with its first session.
    pub pid: Option<i32>,
    /// The port it listens on.
    pub port: Option<i32>,
}

/// A CRIU to talk to: a binary started as `criu swrk` per session (the default), or a
/// running `criu service` socket. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Criu {
    target: Target,
    spawner: Arc<dyn ChildSpawner>,
    stderr: CriuStderr,
    exit_wait: Duration,
}

impl Default for Criu {
    fn default() -> Self {
        Self::new()
    }
}

impl Criu {
    /// `criu` from `$PATH` (then the usual sbin directories), spawned with
    /// [`TokioSpawner`].
    pub fn new() -> Self {
        Self::with_binary("criu")
    }

    /// A given binary: a path, or a name looked up in `$PATH` and the sbin directories.
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Criu {
            target: Target::Swrk {
                binary: binary.into(),
            },
            spawner: Arc::new(TokioSpawner),
            stderr: CriuStderr::default(),
            exit_wait: Duration::from_secs(10),
        }
    }

    /// A running `criu service` listening on `socket` (SOCK_SEQPACKET). Each request opens
    /// its own connection. Services cannot receive descriptors (`inherit_fd`, `ps.fd`)
    /// nor restore as a sibling (`rst_sibling`).
    pub fn service(socket: impl Into<PathBuf>) -> Self {
        Criu {
            target: Target::Service {
                socket: socket.into(),
            },
            ..Self::new()
        }
    }

    /// Uses `spawner` to start and reap CRIU (see [`ChildSpawner`]).
    pub fn spawner(mut self, spawner: Arc<dyn ChildSpawner>) -> Self {
        self.spawner = spawner;
        self
    }

    /// Where CRIU's stderr goes (default: inherited).
    pub fn stderr(mut self, stderr: CriuStderr) -> Self {
        self.stderr = stderr;
        self
    }

    /// How long to wait for CRIU to exit after its last answer (default 10 s) before
    /// returning without its exit status.
    pub fn exit_wait(mut self, wait: Duration) -> Self {
        self.exit_wait = wait;
        self
    }

    /// The binary this client runs, resolved (`None` for a service client).
    pub fn binary(&self) -> Option<Result<PathBuf>> {
        match &self.target {
            Target::Swrk { binary } => Some(resolve_binary(binary)),
            Target::Service { .. } => None,
        }
    }

    // ---- sessions -------------------------------------------------------------------

    /// Opens a bare session for `keep_open` sequences (VERSION, FEATURE_CHECK,
    /// PAGE_SERVER ...) or raw calls.
    pub async fn session(&self) -> Result<Session> {
        self.open(ChildFds::default()).await
    }

    async fn open(&self, mut child_fds: ChildFds) -> Result<Session> {
        match &self.target {
            Target::Service { socket } => {
                if !child_fds.is_empty() {
                    return Err(Error::InvalidOptions {
                        request: CriuReqType::Empty,
                        reason: "a CRIU service cannot receive descriptors".into(),
                    });
                }
                let sock = transport::connect_path(socket).map_err(|source| Error::Connect {
                    path: socket.clone(),
                    source,
                })?;
                Ok(Session::new(sock, None, "service", self.exit_wait))
            }
            Target::Swrk { binary } => {
                let binary = resolve_binary(binary)?;
                let (ours, theirs) =
                    transport::pair().map_err(|e| Error::io("creating the swrk socket pair", e))?;
                child_fds
                    .push(theirs, SWRK_SOCKET_FD)
                    .map_err(|e| Error::io("placing the swrk socket", e))?;
                let mut cmd = Command::new(&binary);
                cmd.arg("swrk")
                    .arg(SWRK_SOCKET_FD.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(self.stderr_stdio()?);
                let guard = child_fds.install(&mut cmd);
                let spawned = self
                    .spawner
                    .spawn(cmd)
                    .await
                    .map_err(|source| Error::Spawn {
                        binary: binary.clone(),
                        source,
                    })?;
                // Close our copies of the child's descriptors: from now on a dead CRIU
                // shows as a hang-up on our end.
                drop(guard);
                tracing::debug!(criu_pid = spawned.pid, binary = %binary.display(), "started criu swrk");
                Ok(Session::new(
                    ours,
                    Some((spawned.pid, spawned.exit)),
                    "swrk",
                    self.exit_wait,
                ))
            }
        }
    }

    fn stderr_stdio(&self) -> Result<Stdio> {
        Ok(match &self.stderr {
            CriuStderr::Inherit => Stdio::inherit(),
            CriuStderr::Null => Stdio::null(),
            CriuStderr::Fd(fd) => Stdio::from(
                fd.try_clone()
                    .map_err(|e| Error::io("duplicating CRIU's stderr descriptor", e))?,
            ),
        })
    }

    fn is_service(&self) -> bool {
        matches!(self.target, Target::Service { .. })
    }

    /// One request in its own session: prepares `opts`, starts CRIU (passing inherited
    /// descriptors), runs the request, closes the session.
    async fn one_shot<H: NotifyHandler>(
        &self,
        request: CriuReqType,
        opts: Option<CriuOptions>,
        handler: &mut H,
        tweak: impl FnOnce(&mut CriuReq),
    ) -> Result<(CriuResp, Option<ChildExit>)> {
        let mut child_fds = ChildFds::default();
        let prepared = match opts {
            Some(o) => {
                let slot = (!self.is_service()).then_some(&mut child_fds);
                Some(o.prepare(request, slot)?)
            }
            None => None,
        };
        let mut session = self.open(child_fds).await?;
        let mut req = CriuReq {
            r#type: request as i32,
            opts: prepared.as_ref().map(|p| p.opts.clone()),
            ..Default::default()
        };
        tweak(&mut req);
        let log = prepared.as_ref().and_then(|p| p.log.as_ref());
        let result = session.run(req, log, handler).await;
        let exit = session.close().await;
        // `prepared` (and the descriptors CRIU opened through /proc) lives until here.
        drop(prepared);
        result.map(|r| (r, exit))
    }

    // ---- requests -------------------------------------------------------------------

    /// VERSION.
    pub async fn version(&self) -> Result<Version> {
        let (resp, _) = self
            .one_shot(CriuReqType::Version, None, &mut NoNotify, |_| {})
            .await?;
        Version::from_response(&resp)
    }

    /// CHECK (`criu check`) without options: `Ok` when CRIU says this kernel works.
    pub async fn check(&self) -> Result<()> {
        self.one_shot(CriuReqType::Check, None, &mut NoNotify, |_| {})
            .await
            .map(|_| ())
    }

    /// CHECK with options (e.g. a log file and work directory to read on failure).
    pub async fn check_with(&self, opts: CriuOptions) -> Result<()> {
        self.one_shot(CriuReqType::Check, Some(opts), &mut NoNotify, |_| {})
            .await
            .map(|_| ())
    }

    /// FEATURE_CHECK: which of `features` this CRIU and kernel support.
    pub async fn feature_check(&self, features: Features) -> Result<Features> {
        let (resp, _) = self
            .one_shot(CriuReqType::FeatureCheck, None, &mut NoNotify, |req| {
                *req = feature_request(features, false);
            })
            .await?;
        Features::from_response(&resp)
    }

    /// DUMP without notifications (unless `opts` set `notify_scripts`, in which case
    /// every notification is acknowledged).
    pub async fn dump(&self, opts: CriuOptions) -> Result<DumpOutcome> {
        self.dump_inner(opts, &mut NoNotify).await
    }

    /// DUMP with `notify_scripts` set and `handler` called for each notification.
    pub async fn dump_with_notify<H: NotifyHandler>(
        &self,
        opts: CriuOptions,
        handler: &mut H,
    ) -> Result<DumpOutcome> {
        self.dump_inner(opts.notify_scripts(true), handler).await
    }

    async fn dump_inner<H: NotifyHandler>(
        &self,
        opts: CriuOptions,
        handler: &mut H,
    ) -> Result<DumpOutcome> {
        check_dump_opts(CriuReqType::Dump, &opts)?;
        let (resp, exit) = self
            .one_shot(CriuReqType::Dump, Some(opts), handler, |_| {})
            .await?;
        Ok(DumpOutcome {
            restored: resp.dump.and_then(|d| d.restored).unwrap_or(false),
            criu_exit: exit,
        })
    }

    /// RESTORE without notifications (see [`Criu::dump`]).
    pub async fn restore(&self, opts: CriuOptions) -> Result<RestoreOutcome> {
        self.restore_inner(opts, &mut NoNotify).await
    }

    /// RESTORE with `notify_scripts` set and `handler` called for each notification.
    pub async fn restore_with_notify<H: NotifyHandler>(
        &self,
        opts: CriuOptions,
        handler: &mut H,
    ) -> Result<RestoreOutcome> {
        self.restore_inner(opts.notify_scripts(true), handler).await
    }

    async fn restore_inner<H: NotifyHandler>(
        &self,
        opts: CriuOptions,
        handler: &mut H,
    ) -> Result<RestoreOutcome> {
        if !opts.has_images_dir() {
            return Err(missing_images(CriuReqType::Restore));
        }
        if self.is_service() && opts.raw().rst_sibling() {
            return Err(Error::InvalidOptions {
                request: CriuReqType::Restore,
                reason: "rst_sibling needs a `criu swrk` session".into(),
            });
        }
        let (resp, exit) = self
            .one_shot(CriuReqType::Restore, Some(opts), handler, |_| {})
            .await?;
        let pid = resp.restore.map(|r| r.pid).ok_or_else(|| Error::Protocol {
            request: CriuReqType::Restore,
            detail: "RESTORE answer without a pid".into(),
        })?;
        Ok(RestoreOutcome {
            pid,
            criu_exit: exit,
        })
    }

    /// SINGLE_PRE_DUMP: one pre-dump (memory only, tree keeps running). Needs memory
    /// tracking in the kernel (soft-dirty; see FEATURE_CHECK `mem_track`).
    pub async fn pre_dump(&self, opts: CriuOptions) -> Result<()> {
        check_dump_opts(CriuReqType::SinglePreDump, &opts)?;
        self.one_shot(
            CriuReqType::SinglePreDump,
            Some(opts),
            &mut NoNotify,
            |_| {},
        )
        .await
        .map(|_| ())
    }

    /// Starts an iterative dump: PRE_DUMPs then a final DUMP on one CRIU session.
    pub async fn iterative_dump(&self) -> Result<IterativeDump> {
        Ok(IterativeDump {
            session: self.session().await?,
        })
    }

    /// PAGE_SERVER: starts a page server daemon (address/port from `opts.page_server`)
    /// and returns where it runs.
    pub async fn page_server(&self, opts: CriuOptions) -> Result<PageServerInfo> {
        let (resp, _) = self
            .one_shot(CriuReqType::PageServer, Some(opts), &mut NoNotify, |_| {})
            .await?;
        Ok(PageServerInfo {
            pid: resp.ps.as_ref().and_then(|p| p.pid).filter(|p| *p > 0),
            port: resp.ps.as_ref().and_then(|p| p.port),
        })
    }

    /// CPUINFO_DUMP: saves this CPU's description into the images directory.
    pub async fn cpuinfo_dump(&self, opts: CriuOptions) -> Result<()> {
        self.one_shot(CriuReqType::CpuinfoDump, Some(opts), &mut NoNotify, |_| {})
            .await
            .map(|_| ())
    }

    /// CPUINFO_CHECK: checks this CPU against the one saved in the images directory.
    pub async fn cpuinfo_check(&self, opts: CriuOptions) -> Result<()> {
        self.one_shot(CriuReqType::CpuinfoCheck, Some(opts), &mut NoNotify, |_| {})
            .await
            .map(|_| ())
    }

    /// Any request in its own session, with a handler; returns CRIU's successful answer.
    /// `opts` descriptors are handled as for the typed calls.
    pub async fn request<H: NotifyHandler>(
        &self,
        request: CriuReqType,
        opts: Option<CriuOptions>,
        handler: &mut H,
    ) -> Result<CriuResp> {
        self.one_shot(request, opts, handler, |_| {})
            .await
            .map(|(r, _)| r)
    }
}

/// An iterative dump in progress: any number of [`IterativeDump::pre_dump`]s, then
/// [`IterativeDump::dump`], all on one CRIU session (as CRIU requires).
#[derive(Debug)]
pub struct IterativeDump {
    session: Session,
}

impl IterativeDump {
    /// One PRE_DUMP. Each one writes its own images directory; point the next one's
    /// `parent_img` at it.
    pub async fn pre_dump(&mut self, opts: CriuOptions) -> Result<()> {
        check_dump_opts(CriuReqType::PreDump, &opts)?;
        let prepared = opts.prepare(CriuReqType::PreDump, None)?;
        let req = CriuReq {
            r#type: CriuReqType::PreDump as i32,
            opts: Some(prepared.opts.clone()),
            ..Default::default()
        };
        self.session
            .run(req, prepared.log.as_ref(), &mut NoNotify)
            .await
            .map(|_| ())
    }

    /// The final DUMP; ends the session.
    pub async fn dump<H: NotifyHandler>(
        mut self,
        opts: CriuOptions,
        handler: &mut H,
    ) -> Result<DumpOutcome> {
        check_dump_opts(CriuReqType::Dump, &opts)?;
        let prepared = opts.prepare(CriuReqType::Dump, None)?;
        let req = CriuReq {
            r#type: CriuReqType::Dump as i32,
            opts: Some(prepared.opts.clone()),
            ..Default::default()
        };
        let result = self.session.run(req, prepared.log.as_ref(), handler).await;
        let exit = self.session.close().await;
        let resp = result?;
        Ok(DumpOutcome {
            restored: resp.dump.and_then(|d| d.restored).unwrap_or(false),
            criu_exit: exit,
        })
    }

    /// Abandons the dump (CRIU sees the connection close).
    pub async fn abort(self) -> Option<ChildExit> {
        self.session.close().await
    }
}

fn missing_images(request: CriuReqType) -> Error {
    Error::InvalidOptions {
        request,
        reason: "no images directory (images_dir / images_dir_fd)".into(),
    }
}

fn check_dump_opts(request: CriuReqType, opts: &CriuOptions) -> Result<()> {
    match opts.raw().pid {
        Some(p) if p > 0 => {}
        _ => {
            return Err(Error::InvalidOptions {
                request,
                reason: "no pid to dump (CRIU would dump the requesting process)".into(),
            })
        }
    }
    if !opts.has_images_dir() {
        return Err(missing_images(request));
    }
    Ok(())
}

/// Finds `binary`: a path is taken as is; a bare name is looked up in `$PATH`, then in
/// the sbin directories.
pub(crate) fn resolve_binary(binary: &Path) -> Result<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 || binary.is_absolute() {
        return if is_exec(binary) {
            Ok(binary.to_path_buf())
        } else {
            Err(Error::BinaryNotFound {
                name: binary.display().to_string(),
                searched: binary.display().to_string(),
            })
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut searched = Vec::new();
    let dirs = std::env::split_paths(&path_var)
        .chain(SBIN_FALLBACK.iter().map(PathBuf::from))
        .filter(|d| !d.as_os_str().is_empty());
    for dir in dirs {
        let candidate = dir.join(binary);
        if is_exec(&candidate) {
            return Ok(candidate);
        }
        searched.push(dir.display().to_string());
    }
    searched.dedup();
    Err(Error::BinaryNotFound {
        name: binary.display().to_string(),
        searched: searched.join(":"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_paths() {
        let sh = resolve_binary(Path::new("sh")).expect("sh is on PATH");
        assert!(sh.is_absolute());
        let err = resolve_binary(Path::new("/nonexistent/criu")).expect_err("missing");
        assert!(matches!(err, Error::BinaryNotFound { .. }), "{err}");
        let err = resolve_binary(Path::new("criu-rpc-no-such-binary")).expect_err("missing");
        assert!(err.to_string().contains("criu-rpc-no-such-binary"), "{err}");
    }

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn client_and_futures_are_send() {
        // The shim runs these on a multi-threaded runtime (tokio::spawn needs Send).
        fn assert_sync<T: Send + Sync>() {}
        fn assert_send_type<T: Send>() {}
        assert_sync::<Criu>();
        assert_send_type::<Session>();
        let criu = Criu::new();
        let mut h = NoNotify;
        assert_send(&criu.dump_with_notify(CriuOptions::new(), &mut h));
        assert_send(&criu.restore_with_notify(CriuOptions::new(), &mut h));
        assert_send(&criu.version());
        assert_send(&criu.check());
        assert_send(&criu.session());
        assert_send(&criu.request(CriuReqType::Check, None, &mut h));
    }

    #[tokio::test]
    async fn missing_binary_fails_before_spawning() {
        let err = Criu::with_binary("/nonexistent/criu")
            .version()
            .await
            .expect_err("no binary");
        assert!(matches!(err, Error::BinaryNotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn dump_requires_pid_and_images() {
        let criu = Criu::with_binary("/nonexistent/criu");
        let err = criu.dump(CriuOptions::new()).await.expect_err("no pid");
        assert!(err.to_string().contains("no pid"), "{err}");
        let err = criu
            .dump(CriuOptions::new().pid(1))
            .await
            .expect_err("no images");
        assert!(err.to_string().contains("images"), "{err}");
    }
}
