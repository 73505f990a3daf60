//! [`CriuOptions`]: a builder over CRIU's `criu_opts`, covering every field, plus the
//! descriptors some fields refer to.
//!
//! Descriptors come in two kinds, and the builder keeps both alive for the request:
//! - *client* descriptors (images dir, work dir, `status_fd`, `pidfd_store_sk`): CRIU
//!   opens them as `/proc/<client pid>/fd/<n>` (the client being the peer of the RPC
//!   socket), so their number in this process goes on the wire;
//! - *inherited* descriptors (`inherit_fd`, the page-server socket `ps.fd`): swrk only;
//!   they are placed in the CRIU child at fixed numbers (4, 5, ...) and those numbers go
//!   on the wire.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fds::ChildFds;
use crate::proto::{
    CgroupRoot, CriuCgMode, CriuFileValidationMethod, CriuNetworkLockMethod, CriuOpts,
    CriuPageServerInfo, CriuPreDumpMode, CriuReqType, CriuVethPair, ExtMountMap, InheritFd,
    JoinNamespace, UnixSk,
};

/// CRIU's log file name when the options name none.
pub const DEFAULT_LOG_FILE: &str = "criu.log";

/// A directory given by path (opened when the request is prepared) or by descriptor.
#[derive(Debug)]
enum Dir {
    Path(PathBuf),
    Fd(OwnedFd),
}

/// Options of a CRIU request. See the module docs for descriptors.
///
/// Setters consume and return the builder; every `criu_opts` field has one (named like
/// the field), and [`CriuOptions::raw_mut`] gives the generated struct for anything else.
#[derive(Debug, Default)]
pub struct CriuOptions {
    raw: CriuOpts,
    images_dir: Option<Dir>,
    work_dir: Option<Dir>,
    status_fd: Option<OwnedFd>,
    pidfd_store_sk: Option<OwnedFd>,
    inherit: Vec<(String, OwnedFd)>,
    page_server_fd: Option<OwnedFd>,
}

macro_rules! bool_setters {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, on: bool) -> Self {
            self.raw.$name = Some(on);
            self
        }
    )*};
}

macro_rules! string_setters {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: impl Into<String>) -> Self {
            self.raw.$name = Some(value.into());
            self
        }
    )*};
}

macro_rules! u32_setters {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: u32) -> Self {
            self.raw.$name = Some(value);
            self
        }
    )*};
}

macro_rules! push_setters {
    ($($(#[$doc:meta])* $name:ident => $field:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: impl Into<String>) -> Self {
            self.raw.$field.push(value.into());
            self
        }
    )*};
}

impl CriuOptions {
    /// Empty options (CRIU's defaults).
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from a prepared `criu_opts`. Its descriptor fields are taken as they are,
    /// as numbers of this process (images/work dir, status fd) or of the CRIU child
    /// (inherit_fd, ps.fd): prefer the typed setters.
    pub fn from_raw(raw: CriuOpts) -> Self {
        CriuOptions {
            raw,
            ..Self::default()
        }
    }

    /// The `criu_opts` as built so far (descriptor numbers are filled in per request).
    pub fn raw(&self) -> &CriuOpts {
        &self.raw
    }

    /// Mutable access to the generated struct, for fields set by hand.
    pub fn raw_mut(&mut self) -> &mut CriuOpts {
        &mut self.raw
    }

    // ---- directories --------------------------------------------------------------

    /// Images directory (opened when the request starts; dump needs it to exist).
    pub fn images_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.images_dir = Some(Dir::Path(path.into()));
        self
    }

    /// Images directory as an open directory descriptor.
    pub fn images_dir_fd(mut self, fd: OwnedFd) -> Self {
        self.images_dir = Some(Dir::Fd(fd));
        self
    }

    /// Images directory by path *as CRIU sees it* (`images_dir`, field 68): for a
    /// `criu service` in another mount namespace. Ignored when an images directory
    /// descriptor is set.
    pub fn images_dir_path_for_criu(mut self, path: impl Into<String>) -> Self {
        self.raw.images_dir = Some(path.into());
        self
    }

    /// Work directory (logs, stats); defaults to the images directory.
    pub fn work_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(Dir::Path(path.into()));
        self
    }

    /// Work directory as an open directory descriptor.
    pub fn work_dir_fd(mut self, fd: OwnedFd) -> Self {
        self.work_dir = Some(Dir::Fd(fd));
        self
    }

    /// `status_fd` (obsolete in CRIU, prefer the status-ready notification): CRIU writes
    /// a byte to it when ready.
    pub fn status_fd(mut self, fd: OwnedFd) -> Self {
        self.status_fd = Some(fd);
        self
    }

    /// `pidfd_store_sk`: a socket CRIU keeps pidfds in between iterations.
    pub fn pidfd_store_sk(mut self, fd: OwnedFd) -> Self {
        self.pidfd_store_sk = Some(fd);
        self
    }

    // ---- descriptors given to CRIU (swrk only) -------------------------------------

    /// `inherit_fd`: on restore, use `fd` for the resource `key` (e.g. `pipe:[12345]`
    /// for a stdio pipe, or an external namespace key). `fd` is passed to the CRIU child.
    pub fn inherit_fd(mut self, key: impl Into<String>, fd: OwnedFd) -> Self {
        self.inherit.push((key.into(), fd));
        self
    }

    /// `ps.fd`: an already connected page-server socket, passed to the CRIU child.
    pub fn page_server_fd(mut self, fd: OwnedFd) -> Self {
        self.page_server_fd = Some(fd);
        self
    }

    // ---- scalars --------------------------------------------------------------------

    /// `pid`: root of the tree to dump. Dump refuses to run without it here (CRIU
    /// would dump the requesting process).
    pub fn pid(mut self, pid: i32) -> Self {
        self.raw.pid = Some(pid);
        self
    }

    /// `log_level` (0-4, CRIU's default 2).
    pub fn log_level(mut self, level: i32) -> Self {
        self.raw.log_level = Some(level);
        self
    }

    bool_setters! {
        /// `leave_running`: keep the tree running after dump.
        leave_running;
        /// `ext_unix_sk`: allow external unix sockets.
        ext_unix_sk;
        /// `tcp_established`: checkpoint established TCP connections.
        tcp_established;
        /// `evasive_devices`: allow devices opened by a path that changed.
        evasive_devices;
        /// `shell_job`: the tree shares session/terminal with its parent.
        shell_job;
        /// `file_locks`: checkpoint file locks.
        file_locks;
        /// `notify_scripts`: send NOTIFY messages (set for you by the `*_with_notify`
        /// calls).
        notify_scripts;
        /// `track_mem`: memory tracking for iterative dumps (needs soft-dirty).
        track_mem;
        /// `auto_dedup`: punch holes in parent images.
        auto_dedup;
        /// `link_remap`: allow link remaps for unlinked open files.
        link_remap;
        /// `force_irmap`: force resolving inotify/fanotify paths.
        force_irmap;
        /// `manage_cgroups`: old switch for SOFT cgroup mode.
        manage_cgroups;
        /// `rst_sibling`: restore the tree as a sibling of CRIU, i.e. a child of this
        /// process (swrk only).
        rst_sibling;
        /// `auto_ext_mnt`: detect external mounts.
        auto_ext_mnt;
        /// `ext_sharing`: allow external sharing of mounts.
        ext_sharing;
        /// `ext_masters`: allow external masters of mounts.
        ext_masters;
        /// `tcp_skip_in_flight`: skip in-flight TCP connections.
        tcp_skip_in_flight;
        /// `weak_sysctls`: tolerate missing sysctls on restore.
        weak_sysctls;
        /// `lazy_pages`: restore memory lazily (userfaultfd).
        lazy_pages;
        /// `orphan_pts_master`: hand the master of an orphaned pts over through the
        /// orphan-pts-master notification.
        orphan_pts_master;
        /// `tcp_close`: close TCP connections on restore.
        tcp_close;
        /// `tls`: TLS for page-server traffic.
        tls;
        /// `tls_no_cn_verify`: do not verify the peer's CN.
        tls_no_cn_verify;
        /// `mntns_compat_mode`: old mount-namespace restore engine.
        mntns_compat_mode;
        /// `skip_file_rwx_check`: skip the permission check of restored files.
        skip_file_rwx_check;
        /// `unprivileged`: run without full capabilities (CAP_CHECKPOINT_RESTORE).
        unprivileged;
        /// `leave_stopped`: leave the tree stopped after dump or restore.
        leave_stopped;
        /// `display_stats`: log statistics at the end.
        display_stats;
        /// `log_to_stderr`: log to CRIU's stderr instead of a file.
        log_to_stderr;
        /// `allow_uprobes`: allow uprobes VMAs (CRIU newer than 4.2.1).
        allow_uprobes;
        /// `ghost_fiemap`: use FIEMAP for ghost files (CRIU newer than 4.2.1).
        ghost_fiemap;
    }

    string_setters! {
        /// `log_file`: file name inside the work directory (no slashes).
        log_file;
        /// `root`: root directory of the tree (e.g. the container rootfs).
        root;
        /// `parent_img`: previous images directory, relative to the images directory.
        parent_img;
        /// `config_file`: a CRIU configuration file overriding these options.
        config_file;
        /// `lsm_profile`: LSM profile for restored tasks ("apparmor:..", "selinux:..").
        lsm_profile;
        /// `lsm_mount_context`: SELinux mount context for restored mounts.
        lsm_mount_context;
        /// `tls_cacert`.
        tls_cacert;
        /// `tls_cacrl`.
        tls_cacrl;
        /// `tls_cert`.
        tls_cert;
        /// `tls_key`.
        tls_key;
        /// `cgroup_yard`: where CRIU mounts cgroup controllers it needs.
        cgroup_yard;
        /// `cgroup_props`: cgroup properties to dump (YAML text).
        cgroup_props;
        /// `cgroup_props_file`: file with cgroup properties.
        cgroup_props_file;
        /// `freeze_cgroup`: freeze the tree through this cgroup.
        freeze_cgroup;
    }

    u32_setters! {
        /// `cpu_cap`: CPU capability checks (CRIU's default all bits).
        cpu_cap;
        /// `ghost_limit`: largest ghost file kept in the images (bytes).
        ghost_limit;
        /// `empty_ns`: namespaces (CLONE_NEW* bits; CRIU accepts CLONE_NEWNET) restored
        /// empty.
        empty_ns;
        /// `timeout`: seconds to wait for the tree to freeze.
        timeout;
    }

    push_setters! {
        /// Adds to `skip_mnt`: a mount point to skip.
        skip_mnt => skip_mnt;
        /// Adds to `enable_fs`: a filesystem to auto-mount on restore.
        enable_fs => enable_fs;
        /// Adds to `irmap_scan_paths`.
        irmap_scan_path => irmap_scan_paths;
        /// Adds to `external`: an external resource in CRIU's --external syntax
        /// (`mnt[/proc]:proc`, `net[4026531993]:extNet`, `dev[...]`, ...).
        external => external;
        /// Adds to `cgroup_dump_controller`.
        cgroup_dump_controller => cgroup_dump_controller;
    }

    /// `exec_cmd`: after a successful restore, CRIU execs this command.
    pub fn exec_cmd<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.raw.exec_cmd = argv.into_iter().map(Into::into).collect();
        self
    }

    // ---- enums ---------------------------------------------------------------------

    /// `manage_cgroups_mode`.
    pub fn manage_cgroups_mode(mut self, mode: CriuCgMode) -> Self {
        self.raw.set_manage_cgroups_mode(mode);
        self
    }

    /// `pre_dump_mode`.
    pub fn pre_dump_mode(mut self, mode: CriuPreDumpMode) -> Self {
        self.raw.set_pre_dump_mode(mode);
        self
    }

    /// `network_lock`: how CRIU locks the network (`Skip` when the caller does).
    pub fn network_lock(mut self, method: CriuNetworkLockMethod) -> Self {
        self.raw.set_network_lock(method);
        self
    }

    /// `file_validation_method` (CRIU newer than 4.2.1).
    pub fn file_validation_method(mut self, method: CriuFileValidationMethod) -> Self {
        self.raw.set_file_validation_method(method);
        self
    }

    // ---- messages ------------------------------------------------------------------

    /// `ps`: page server address and port.
    pub fn page_server(mut self, address: impl Into<String>, port: i32) -> Self {
        let ps = self.raw.ps.get_or_insert_with(CriuPageServerInfo::default);
        ps.address = Some(address.into());
        ps.port = Some(port);
        self
    }

    /// Adds to `veths` (deprecated by CRIU; prefer `external("veth[in]:out")`).
    pub fn veth(mut self, if_in: impl Into<String>, if_out: impl Into<String>) -> Self {
        self.raw.veths.push(CriuVethPair {
            if_in: if_in.into(),
            if_out: if_out.into(),
        });
        self
    }

    /// Adds to `ext_mnt` (deprecated by CRIU; prefer `external("mnt[key]:val")`).
    pub fn ext_mount(mut self, key: impl Into<String>, val: impl Into<String>) -> Self {
        self.raw.ext_mnt.push(ExtMountMap {
            key: key.into(),
            val: val.into(),
        });
        self
    }

    /// Adds to `cg_root`: restore under `path` for controller `ctrl` (all when `None`).
    pub fn cg_root(mut self, ctrl: Option<String>, path: impl Into<String>) -> Self {
        self.raw.cg_root.push(CgroupRoot {
            ctrl,
            path: path.into(),
        });
        self
    }

    /// Adds to `join_ns`: restore into namespace `ns` ("net", "ipc", ...) at `ns_file`.
    pub fn join_ns(
        mut self,
        ns: impl Into<String>,
        ns_file: impl Into<String>,
        extra_opt: Option<String>,
    ) -> Self {
        self.raw.join_ns.push(JoinNamespace {
            ns: ns.into(),
            ns_file: ns_file.into(),
            extra_opt,
        });
        self
    }

    /// Adds to `unix_sk_ino` (deprecated by CRIU; prefer `external("unix[ino]")`).
    pub fn unix_sk_ino(mut self, inode: u32) -> Self {
        self.raw.unix_sk_ino.push(UnixSk { inode });
        self
    }

    // ---- request preparation ---------------------------------------------------------

    /// Whether an images directory is set (path, descriptor or path for CRIU).
    pub fn has_images_dir(&self) -> bool {
        self.images_dir.is_some() || self.raw.images_dir.is_some() || self.raw.images_dir_fd >= 0
    }

    /// Resolves directories and descriptor numbers for one request.
    ///
    /// `child_fds` receives the inherited descriptors (for swrk); pass `None` for a
    /// service connection, which cannot take any.
    pub(crate) fn prepare(
        self,
        request: CriuReqType,
        child_fds: Option<&mut ChildFds>,
    ) -> Result<Prepared> {
        let CriuOptions {
            mut raw,
            images_dir,
            work_dir,
            status_fd,
            pidfd_store_sk,
            inherit,
            page_server_fd,
        } = self;
        let mut held = Vec::new();

        let images = images_dir.map(|d| open_dir(d, "images")).transpose()?;
        let work = work_dir.map(|d| open_dir(d, "work")).transpose()?;
        if let Some((fd, _)) = &images {
            raw.images_dir_fd = fd.as_raw_fd();
        }
        if let Some((fd, _)) = &work {
            raw.work_dir_fd = Some(fd.as_raw_fd());
        }
        if let Some(fd) = status_fd {
            raw.status_fd = Some(fd.as_raw_fd());
            held.push(fd);
        }
        if let Some(fd) = pidfd_store_sk {
            raw.pidfd_store_sk = Some(fd.as_raw_fd());
            held.push(fd);
        }

        if !inherit.is_empty() || page_server_fd.is_some() {
            let Some(child) = child_fds else {
                return Err(Error::InvalidOptions {
                    request,
                    reason: "inherit_fd and ps.fd need a `criu swrk` session; a CRIU \
                             service cannot receive descriptors"
                        .into(),
                });
            };
            for (key, fd) in inherit {
                let n = child.next_target();
                child
                    .push(fd, n)
                    .map_err(|e| Error::io("placing an inherited descriptor", e))?;
                raw.inherit_fd.push(InheritFd { key, fd: n });
            }
            if let Some(fd) = page_server_fd {
                let n = child.next_target();
                child
                    .push(fd, n)
                    .map_err(|e| Error::io("placing the page-server descriptor", e))?;
                raw.ps.get_or_insert_with(CriuPageServerInfo::default).fd = Some(n);
            }
        }

        // Where the log lands: work dir, else images dir; CRIU's default name.
        let log = if raw.log_to_stderr() && raw.log_file.is_none() {
            None
        } else {
            let name = raw
                .log_file
                .clone()
                .unwrap_or_else(|| DEFAULT_LOG_FILE.into());
            match (&work, &images) {
                (Some((fd, p)), _) | (None, Some((fd, p))) => Some(LogLocation {
                    dir_fd: fd.as_raw_fd(),
                    display_dir: p.clone(),
                    name,
                }),
                (None, None) => None,
            }
        };
        held.extend(images.map(|(fd, _)| fd));
        held.extend(work.map(|(fd, _)| fd));

        Ok(Prepared {
            opts: raw,
            log,
            _held: held,
        })
    }
}

fn open_dir(d: Dir, what: &str) -> Result<(OwnedFd, PathBuf)> {
    match d {
        Dir::Fd(fd) => {
            let shown = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            let shown = std::fs::read_link(&shown).unwrap_or(shown);
            Ok((fd, shown))
        }
        Dir::Path(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            // std opens close-on-exec; O_DIRECTORY makes a file path fail here, not in CRIU.
            let dir = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(&p)
                .map_err(|e| {
                    Error::io(format!("cannot open {what} directory {}", p.display()), e)
                })?;
            Ok((OwnedFd::from(dir), p))
        }
    }
}

/// Where CRIU writes its log for one request.
#[derive(Debug)]
pub(crate) struct LogLocation {
    /// Directory descriptor (kept open by [`Prepared`]).
    dir_fd: RawFd,
    /// The directory, for messages.
    display_dir: PathBuf,
    /// The log's file name.
    name: String,
}

impl LogLocation {
    /// The path this process can open the log by.
    pub(crate) fn open_path(&self) -> PathBuf {
        let mut p = OsString::from(format!("/proc/self/fd/{}/", self.dir_fd));
        p.push(&self.name);
        PathBuf::from(p)
    }

    /// The log's path for humans.
    pub(crate) fn display_path(&self) -> PathBuf {
        Path::new(&self.display_dir).join(&self.name)
    }
}

/// Options ready to send, with the descriptors they name kept open.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub opts: CriuOpts,
    pub log: Option<LogLocation>,
    _held: Vec<OwnedFd>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn every_kind_of_setter_lands_in_the_struct() {
        let o = CriuOptions::new()
            .pid(42)
            .leave_running(true)
            .tcp_established(true)
            .log_file("dump.log")
            .log_level(4)
            .ghost_limit(1 << 24)
            .external("mnt[/proc]:proc")
            .external("net[1]:ext")
            .exec_cmd(["true"])
            .network_lock(CriuNetworkLockMethod::Skip)
            .manage_cgroups_mode(CriuCgMode::Soft)
            .cg_root(None, "/x")
            .join_ns("net", "/proc/1/ns/net", None)
            .page_server("127.0.0.1", 1234);
        let r = o.raw();
        assert_eq!(r.pid, Some(42));
        assert_eq!(r.leave_running, Some(true));
        assert_eq!(r.log_file.as_deref(), Some("dump.log"));
        assert_eq!(r.log_level(), 4);
        assert_eq!(r.ghost_limit(), 1 << 24);
        assert_eq!(r.external, vec!["mnt[/proc]:proc", "net[1]:ext"]);
        assert_eq!(r.exec_cmd, vec!["true"]);
        assert_eq!(r.network_lock(), CriuNetworkLockMethod::Skip);
        assert_eq!(r.manage_cgroups_mode(), CriuCgMode::Soft);
        assert_eq!(r.cg_root[0].path, "/x");
        assert_eq!(r.join_ns[0].ns, "net");
        assert_eq!(r.ps.as_ref().and_then(|p| p.port), Some(1234));
    }

    #[test]
    fn prepare_fills_descriptor_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let opts = CriuOptions::new()
            .images_dir(dir.path())
            .log_file("restore.log")
            .inherit_fd("pipe:[1]", r)
            .inherit_fd("pipe:[2]", w)
            .page_server_fd(File::open("/dev/null").expect("open").into());
        let mut child = ChildFds::default();
        child
            .push(File::open("/dev/null").expect("open").into(), 3)
            .expect("push");
        let p = opts
            .prepare(CriuReqType::Restore, Some(&mut child))
            .expect("prepare");
        assert!(p.opts.images_dir_fd >= 0);
        let fds: Vec<(String, i32)> = p
            .opts
            .inherit_fd
            .iter()
            .map(|i| (i.key.clone(), i.fd))
            .collect();
        assert_eq!(
            fds,
            vec![("pipe:[1]".to_string(), 4), ("pipe:[2]".to_string(), 5)]
        );
        assert_eq!(p.opts.ps.as_ref().and_then(|ps| ps.fd), Some(6));
        let log = p.log.as_ref().expect("log location");
        assert_eq!(log.display_path(), dir.path().join("restore.log"));
        std::fs::write(dir.path().join("restore.log"), "x").expect("write");
        assert_eq!(std::fs::read_to_string(log.open_path()).expect("read"), "x");
    }

    #[test]
    fn service_sessions_cannot_take_descriptors() {
        let opts =
            CriuOptions::new().inherit_fd("k", File::open("/dev/null").expect("open").into());
        let err = opts
            .prepare(CriuReqType::Restore, None)
            .expect_err("must fail");
        assert!(matches!(err, Error::InvalidOptions { .. }), "{err}");
    }

    #[test]
    fn missing_images_dir_is_a_clear_error() {
        let err = CriuOptions::new()
            .images_dir("/nonexistent/criu-rpc-test")
            .prepare(CriuReqType::Dump, None)
            .expect_err("must fail");
        assert!(
            err.to_string().contains("/nonexistent/criu-rpc-test"),
            "{err}"
        );
    }
}
