//! Which of a container's mounts CRIU can rebuild by itself and which come from the host
//! (external mounts), at dump and at restore.
//!
//! CRIU rebuilds a mount namespace from its images: filesystems it knows how to mount
//! afresh (proc, sysfs, devpts, mqueue, tmpfs, whose content it saves) and bind mounts of
//! those. What it cannot rebuild is a mount whose source lies outside the dumped tree,
//! e.g. a host directory bound in by the spec. Those are declared external at dump, keyed
//! by their destination inside the container (`mnt[DEST]:DEST`), and at restore mapped to
//! their new source on the host (`mnt[DEST]:SOURCE`).
//!
//! At dump, each mount of the init's `/proc/PID/mountinfo` is classified ([`classify`]):
//! - a bind mount listed in the spec: external, its source comes from the spec of the
//!   restoring bundle (it may have moved: a fresh container, another node);
//! - a masked path that is a bind of the host's `/dev/null`, a device node bound from the
//!   host, a cgroup v1 controller bound from the host: external with a fixed source;
//! - anything else (fresh mounts, binds of those): CRIU's.
//!
//! Once the container is frozen, tmpfs mounts that hold no data ([`dataless_tmpfs`]: empty
//! ones, and ones with only directories, device nodes, symlinks, fifos and empty files,
//! such as a container's `/dev`) are added as external too: the restore mounts a fresh
//! tmpfs with the same options for each and re-creates those entries itself
//! ([`FreshTmpfs`]), rather than CRIU archiving them with `tar` and `gzip` processes at
//! dump and unpacking them with two more at restore (a few milliseconds a mount, on the
//! path of every wake).
//!
//! A checkpoint runc made did not record its externals: [`runc_externals`] infers the ones
//! runc declares from the restoring spec.
//!
//! At restore, [`ensure_mountpoints`] creates mount points missing from the rootfs (a
//! restore into a fresh rootfs), without following symlinks out of it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

/// One line of `/proc/PID/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the filesystem.
    pub dev: String,
    /// The directory of the filesystem that is mounted (`/` for a whole filesystem).
    pub root: String,
    /// Where, as seen by the process.
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    /// The filesystem's own options (`rw,size=65536k,mode=755`).
    pub super_options: String,
}

/// Parses mountinfo text. Octal escapes (`\040` for a space) are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if f.len() < 5 || r.len() < 2 {
                return None;
            }
            Some(MountInfo {
                id: f[0].parse().ok()?,
                parent: f[1].parse().ok()?,
                dev: f[2].to_string(),
                root: unescape(f[3]),
                mount_point: unescape(f[4]),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
                super_options: r.get(2).map(|o| unescape(o)).unwrap_or_default(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a restore finds the new source of an external mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MountSource {
    /// The source of the bind mount at the same destination in the restoring spec.
    Spec,
    /// The host's `/dev/null` (a masked file).
    DevNull,
    /// The host device node of the same path.
    Device,
    /// The container's own cgroup of this v1 controller (`""` for cgroup v2).
    Cgroup { controller: String },
    /// A fresh tmpfs the restore mounts with the same options and fills with the entries
    /// the tmpfs held at dump (it held no data: see [`dataless_tmpfs`]).
    Tmpfs(FreshTmpfs),
}

/// How to re-create a tmpfs that held no data at dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreshTmpfs {
    /// The mount's source name (`tmpfs`, `shm`).
    pub source: String,
    /// Its filesystem options without `rw`/`ro` (`size=65536k,mode=755`).
    pub options: String,
    pub read_only: bool,
    /// Mode and owner of its root directory at dump.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// What it held, parents before children (none: it was empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<TmpfsEntry>,
    /// Its root's modification time at dump (seconds, nanoseconds), when it held entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_mtime: Option<(i64, i64)>,
}

/// One inode of a data-less tmpfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmpfsEntry {
    /// Its path below the tmpfs root, relative (`pts`, `fd`, `net/tun`).
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
}

/// What a [`TmpfsEntry`] is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    Dir,
    /// An empty regular file (also the mount point of a file mounted over it).
    File,
    Symlink {
        target: String,
    },
    Char {
        rdev: u64,
    },
    Block {
        rdev: u64,
    },
    Fifo,
}

/// At most this many entries are re-created by hand; a fuller tmpfs is left to CRIU.
const MAX_TMPFS_ENTRIES: usize = 512;

impl TmpfsEntry {
    /// Creates this entry below `root` (a fresh, private tmpfs of ours), with its mode and
    /// owner. Its time is set by [`FreshTmpfs::mount`] once everything exists.
    fn create(&self, root: &Path) -> std::io::Result<PathBuf> {
        use nix::sys::stat::{mknod, SFlag};
        use std::os::unix::fs::PermissionsExt;
        let rel = Path::new(&self.path);
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("tmpfs entry {:?}: not a plain relative path", self.path),
            ));
        }
        let path = root.join(rel);
        let perm = Mode::from_bits_truncate(self.mode & 0o7777);
        match &self.kind {
            EntryKind::Dir => std::fs::create_dir(&path)?,
            EntryKind::File => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)?;
            }
            EntryKind::Symlink { target } => std::os::unix::fs::symlink(target, &path)?,
            EntryKind::Char { rdev } => mknod(&path, SFlag::S_IFCHR, perm, *rdev)?,
            EntryKind::Block { rdev } => mknod(&path, SFlag::S_IFBLK, perm, *rdev)?,
            EntryKind::Fifo => nix::unistd::mkfifo(&path, perm)?,
        }
        std::os::unix::fs::lchown(&path, Some(self.uid), Some(self.gid))?;
        if !matches!(self.kind, EntryKind::Symlink { .. }) {
            // After the chown, which clears setuid and setgid; the umask is undone too.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(self.mode & 0o7777))?;
        }
        Ok(path)
    }
}

/// Sets the access and modification time of `path` (not following a symlink) to `t`.
fn set_mtime(path: &Path, t: (i64, i64)) -> std::io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let ts = TimeSpec::new(t.0, t.1);
    utimensat(None, path, &ts, &ts, UtimensatFlags::NoFollowSymlink)?;
    Ok(())
}

impl FreshTmpfs {
    /// Mounts this tmpfs on the directory `at` (made private, so that nothing mounted or
    /// unmounted there propagates anywhere).
    pub fn mount(&self, at: &Path) -> std::io::Result<()> {
        use nix::mount::{mount, MsFlags};
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // Mounted with its dump-time options (so that mountinfo reads the same), then
        // given the root's mode and owner it had at dump (a chmod after mounting does not
        // change the options), then made read-only. The mount's own flags (nosuid,
        // noexec...) are CRIU's: it re-mounts its bind of this directory with the flags
        // of the dumped mount.
        let data = self.options.as_str();
        mount(
            Some(self.source.as_str()),
            at,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(data),
        )?;
        mount(
            None::<&str>,
            at,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )?;
        let md = std::fs::metadata(at)?;
        if md.mode() & 0o7777 != self.mode {
            std::fs::set_permissions(at, std::fs::Permissions::from_mode(self.mode))?;
        }
        if (md.uid(), md.gid()) != (self.uid, self.gid) {
            std::os::unix::fs::chown(at, Some(self.uid), Some(self.gid))?;
        }
        let mut made = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            made.push(e.create(at)?);
        }
        // Children first: creating an entry touches its directory's time.
        for (e, path) in self.entries.iter().zip(&made).rev() {
            set_mtime(path, e.mtime)?;
        }
        if let Some(t) = self.root_mtime {
            set_mtime(at, t)?;
        }
        if self.read_only {
            mount(
                None::<&str>,
                at,
                Some("tmpfs"),
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                Some(data),
            )?;
        }
        Ok(())
    }
}

/// A mount declared external at dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalMount {
    /// Its destination inside the container, which is also its key in the images.
    pub destination: String,
    pub source: MountSource,
}

impl ExternalMount {
    /// CRIU's `--external` value at dump.
    pub fn dump_key(&self) -> String {
        format!("mnt[{d}]:{d}", d = self.destination)
    }
}

/// Filesystems CRIU mounts afresh at restore (saving tmpfs content in the images).
const NATIVE_FS: &[&str] = &["proc", "sysfs", "devpts", "mqueue", "tmpfs", "binfmt_misc"];

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn norm(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else if t.starts_with('/') {
        t.to_string()
    } else {
        format!("/{t}")
    }
}

/// Classifies the mounts of a dumped container (`mounts`: its init's mountinfo) and
/// returns those to declare external.
pub fn classify(mounts: &[MountInfo], spec: &Spec) -> Vec<ExternalMount> {
    let spec_binds: HashMap<String, &oci_spec::runtime::Mount> = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| is_bind(m))
        .map(|m| (norm(&m.destination().to_string_lossy()), m))
        .collect();
    let linux = spec.linux().as_ref();
    let masked: Vec<String> = linux
        .and_then(|l| l.masked_paths().clone())
        .unwrap_or_default()
        .iter()
        .map(|p| norm(p))
        .collect();
    let devices: Vec<String> = linux
        .and_then(|l| l.devices().clone())
        .unwrap_or_default()
        .iter()
        .map(|d| norm(&d.path().to_string_lossy()))
        .collect();
    // Filesystems present in the tree as whole mounts of a kind CRIU rebuilds: binds of
    // their subdirectories are CRIU's too.
    let native_roots: Vec<&str> = mounts
        .iter()
        .filter(|m| m.root == "/" && NATIVE_FS.contains(&m.fs_type.as_str()))
        .map(|m| m.dev.as_str())
        .collect();
    let mut out = Vec::new();
    for m in mounts {
        let dest = norm(&m.mount_point);
        if dest == "/" {
            continue;
        }
        let source = if spec_binds.contains_key(&dest) {
            Some(MountSource::Spec)
        } else if native_roots.contains(&m.dev.as_str()) {
            None
        } else if masked.contains(&dest) && m.root.ends_with("/null") {
            Some(MountSource::DevNull)
        } else if devices.contains(&dest) && m.root != "/" {
            Some(MountSource::Device)
        } else if (m.fs_type == "cgroup" || m.fs_type == "cgroup2")
            && dest.starts_with("/sys/fs/cgroup")
            && m.root != "/"
        {
            let controller = match m.fs_type.as_str() {
                "cgroup2" => String::new(),
                _ => dest
                    .strip_prefix("/sys/fs/cgroup/")
                    .unwrap_or_default()
                    .to_string(),
            };
            Some(MountSource::Cgroup { controller })
        } else {
            None
        };
        if let Some(source) = source {
            out.push(ExternalMount {
                destination: dest,
                source,
            });
        }
    }
    out
}

/// The external mounts runc declares when it dumps a container of `spec`, for a
/// checkpoint that did not record its own (runc's, the stock shim's). `host_mounts` is
/// the host's mountinfo (for its cgroup v1 hierarchies).
///
/// - every bind mount, keyed by its destination;
/// - masked paths that are files: runc keys them all `/dev/null` at dump;
/// - with a `cgroup` mount on a host without a unified hierarchy at `/sys/fs/cgroup`,
///   runc binds each v1 hierarchy of the host's, keyed by its destination
///   (`/sys/fs/cgroup/cpu,cpuacct`).
pub fn runc_externals(spec: &Spec, host_mounts: &[MountInfo]) -> Vec<ExternalMount> {
    let mounts: Vec<&oci_spec::runtime::Mount> = spec.mounts().iter().flatten().collect();
    let mut out: Vec<ExternalMount> = mounts
        .iter()
        .filter(|m| is_bind(m))
        .map(|m| ExternalMount {
            destination: norm(&m.destination().to_string_lossy()),
            source: MountSource::Spec,
        })
        .collect();
    out.push(ExternalMount {
        destination: "/dev/null".into(),
        source: MountSource::DevNull,
    });
    let cgroup_v2_root = host_mounts
        .iter()
        .any(|m| m.mount_point == "/sys/fs/cgroup" && m.fs_type == "cgroup2");
    if mounts.iter().any(|m| m.typ().as_deref() == Some("cgroup")) && !cgroup_v2_root {
        for h in host_mounts.iter().filter(|m| m.fs_type == "cgroup") {
            if let Some(name) = h.mount_point.strip_prefix("/sys/fs/cgroup/") {
                out.push(ExternalMount {
                    destination: h.mount_point.clone(),
                    source: MountSource::Cgroup {
                        controller: name.to_string(),
                    },
                });
            }
        }
    }
    out
}

/// The tmpfs mounts of a frozen container that hold no data: CRIU would archive each with
/// a `tar` and a `gzip` process at dump and unpack it with two more at restore (about 3 ms
/// a mount there); declared external instead, the restore mounts a fresh one and
/// re-creates what it held ([`FreshTmpfs`]). Typical: a container's `/dev` (device nodes,
/// symlinks and the mount points of `pts`, `shm`, `mqueue`), the read-only tmpfs over
/// masked directories, an unused `/dev/shm` or `/run`.
///
/// `mounts` is the container's mountinfo read while it is frozen (nothing can change a
/// tmpfs between the check and the dump), `root` its root as seen from here
/// (`/proc/PID/root`), `taken` the externals already chosen. A tmpfs qualifies when it is
/// mounted whole once (its other mounts, if any, binds of entries in it, as runtimes
/// mask `/proc/kcore` and the like with their `/dev/null`: CRIU binds them again from
/// the fresh one), uses no block, and every inode it holds is found by walking it:
/// directories, device nodes, symlinks, fifos, empty regular files with one link, and
/// the mount points of the mounts below it (recorded, not entered). An
/// unlinked file still open or mapped, a hard link, a socket, anything hidden below a
/// mount point, or more than [`MAX_TMPFS_ENTRIES`] entries leave it to CRIU.
pub fn dataless_tmpfs(
    mounts: &[MountInfo],
    root: &Path,
    taken: &[ExternalMount],
) -> Vec<ExternalMount> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for m in mounts {
        let dest = norm(&m.mount_point);
        if m.fs_type != "tmpfs"
            || m.root != "/"
            || dest == "/"
            || taken.iter().any(|t| t.destination == dest)
        {
            continue;
        }
        // Other mounts of this tmpfs may only be binds of what is in it (a runtime masks
        // paths with binds of its /dev/null); CRIU binds them again from the new one.
        let binds: Vec<&str> = mounts
            .iter()
            .filter(|o| o.dev == m.dev && !std::ptr::eq(*o, m))
            .map(|o| o.root.trim_start_matches('/'))
            .collect();
        if binds.iter().any(|r| r.is_empty()) {
            continue;
        }
        let path = root.join(dest.trim_start_matches('/'));
        let (Ok(md), Ok(fs)) = (
            std::fs::symlink_metadata(&path),
            nix::sys::statfs::statfs(&path),
        ) else {
            continue;
        };
        let dev = format!("{}:{}", libc::major(md.dev()), libc::minor(md.dev()));
        if dev != m.dev || !md.is_dir() || fs.blocks() != fs.blocks_free() {
            continue;
        }
        let below: std::collections::HashSet<String> = mounts
            .iter()
            .map(|o| norm(&o.mount_point))
            .filter(|d| d.starts_with(&dest) && d.as_bytes().get(dest.len()) == Some(&b'/'))
            .map(|d| d[dest.len() + 1..].to_string())
            .collect();
        let mut entries = Vec::new();
        if walk_tmpfs(&path, "", md.dev(), &below, &mut entries).is_none()
            || !binds.iter().all(|r| entries.iter().any(|e| e.path == *r))
        {
            continue;
        }
        // Every inode in use is the root or an entry found: nothing is hidden.
        let inodes = fs.files();
        if inodes == 0 || inodes - fs.files_free() != entries.len() as u64 + 1 {
            continue;
        }
        let opts: Vec<&str> = m.super_options.split(',').collect();
        let root_mtime = (!entries.is_empty()).then(|| (md.mtime(), md.mtime_nsec()));
        out.push(ExternalMount {
            destination: dest,
            source: MountSource::Tmpfs(FreshTmpfs {
                source: m.source.clone(),
                options: opts
                    .iter()
                    .filter(|o| !matches!(**o, "rw" | "ro" | ""))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(","),
                read_only: opts.contains(&"ro"),
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                entries,
                root_mtime,
            }),
        });
    }
    out
}

/// Appends the entries of the directory `dir` (`rel` below the tmpfs root, on device
/// `dev`) to `out`, parents first, in name order. `None` when something in it is not
/// re-creatable (see [`dataless_tmpfs`]).
fn walk_tmpfs(
    dir: &Path,
    rel: &str,
    dev: u64,
    below: &std::collections::HashSet<String>,
    out: &mut Vec<TmpfsEntry>,
) -> Option<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(dir)
        .ok()?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .ok()?;
    names.sort();
    for name in names {
        if out.len() >= MAX_TMPFS_ENTRIES {
            return None;
        }
        let name = name.to_str()?;
        let child_rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let path = dir.join(name);
        let md = std::fs::symlink_metadata(&path).ok()?;
        let entry = |kind, mode: u32, uid, gid, mtime| TmpfsEntry {
            path: child_rel.clone(),
            kind,
            mode,
            uid,
            gid,
            mtime,
        };
        if below.contains(&child_rel) {
            // A mount point: what is mounted there hides the tmpfs' own inode, which
            // is a directory or an empty file, made as runtimes make them.
            let (kind, mode) = if md.is_dir() {
                (EntryKind::Dir, 0o755)
            } else {
                (EntryKind::File, 0o644)
            };
            out.push(entry(kind, mode, 0, 0, (0, 0)));
            continue;
        }
        if md.dev() != dev {
            return None;
        }
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink {
                target: std::fs::read_link(&path).ok()?.to_str()?.to_string(),
            }
        } else if ft.is_char_device() {
            EntryKind::Char { rdev: md.rdev() }
        } else if ft.is_block_device() {
            EntryKind::Block { rdev: md.rdev() }
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else if ft.is_file() && md.len() == 0 && md.nlink() == 1 {
            EntryKind::File
        } else {
            return None;
        };
        let is_dir = kind == EntryKind::Dir;
        out.push(entry(
            kind,
            md.mode() & 0o7777,
            md.uid(),
            md.gid(),
            (md.mtime(), md.mtime_nsec()),
        ));
        if is_dir {
            walk_tmpfs(&path, &child_rel, dev, below, out)?;
        }
    }
    Some(())
}

/// The `--external mnt[KEY]:SOURCE` values of a restore: each external mount mapped to
/// its source for the restoring container. `cgroup_dir(controller)` gives the host
/// directory of the container's cgroup for a v1 controller (or v2 for `""`);
/// `fresh_tmpfs` the directories where the fresh tmpfs mounts were made, by destination.
pub fn restore_externals(
    externals: &[ExternalMount],
    spec: &Spec,
    cgroup_dir: impl Fn(&str) -> Option<PathBuf>,
    fresh_tmpfs: &HashMap<String, PathBuf>,
) -> Result<Vec<String>, String> {
    let binds: HashMap<String, PathBuf> = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| is_bind(m))
        .filter_map(|m| {
            m.source()
                .as_ref()
                .map(|s| (norm(&m.destination().to_string_lossy()), s.clone()))
        })
        .collect();
    externals
        .iter()
        .map(|e| {
            let src = match &e.source {
                MountSource::Spec => binds.get(&e.destination).cloned().ok_or_else(|| {
                    format!(
                        "mount {} was a bind mount at checkpoint, but the restoring spec has \
                         no bind mount there",
                        e.destination
                    )
                })?,
                MountSource::DevNull => PathBuf::from("/dev/null"),
                MountSource::Device => PathBuf::from(&e.destination),
                MountSource::Cgroup { controller } => cgroup_dir(controller).ok_or_else(|| {
                    format!(
                        "mount {}: the restored container has no cgroup for controller {:?}",
                        e.destination, controller
                    )
                })?,
                MountSource::Tmpfs(_) => {
                    fresh_tmpfs.get(&e.destination).cloned().ok_or_else(|| {
                        format!(
                            "mount {}: no fresh tmpfs was prepared for it",
                            e.destination
                        )
                    })?
                }
            };
            Ok(format!("mnt[{}]:{}", e.destination, src.display()))
        })
        .collect()
}

/// Creates the mount points of `spec`'s mounts that are missing from `rootfs`, except
/// those below a tmpfs of the spec (CRIU restores the tmpfs content, mount points
/// included). Never follows a symlink: a mount point behind one is left to CRIU.
pub fn ensure_mountpoints(rootfs: &Path, spec: &Spec) -> std::io::Result<()> {
    let mounts: Vec<&oci_spec::runtime::Mount> = spec.mounts().iter().flatten().collect();
    let tmpfs: Vec<PathBuf> = mounts
        .iter()
        .filter(|m| m.typ().as_deref() == Some("tmpfs"))
        .map(|m| m.destination().clone())
        .collect();
    let root = std::fs::File::open(rootfs)?;
    let root = OwnedFd::from(root);
    for m in mounts {
        let dest = m.destination();
        if tmpfs.iter().any(|t| dest != t && dest.starts_with(t)) {
            continue;
        }
        let as_file = is_bind(m)
            && m.source()
                .as_ref()
                .and_then(|s| std::fs::metadata(s).ok())
                .is_some_and(|md| !md.is_dir());
        create_below(&root, dest, as_file)?;
    }
    Ok(())
}

/// Creates `rel` (directories, or a file as the last component) below the directory
/// `root`, refusing to traverse symlinks.
fn create_below(root: &OwnedFd, rel: &Path, last_is_file: bool) -> std::io::Result<()> {
    let parts: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    let open = |dir: RawFd, name: &std::ffi::OsStr| -> nix::Result<OwnedFd> {
        let fd = openat(
            Some(dir),
            name,
            OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_PATH,
            Mode::empty(),
        )?;
        // SAFETY: openat just returned this descriptor; we are its only owner.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let mut dir: Option<OwnedFd> = None;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let parent = dir.as_ref().unwrap_or(root).as_raw_fd();
        match open(parent, part) {
            Ok(fd) => {
                if last {
                    return Ok(());
                }
                let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(std::io::Error::from)?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    // A symlink or a file in the way: not ours to resolve.
                    return Ok(());
                }
                dir = Some(fd);
            }
            Err(nix::errno::Errno::ENOENT) => {
                if last && last_is_file {
                    let fd = openat(
                        Some(parent),
                        *part,
                        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    )
                    .map_err(std::io::Error::from)?;
                    // SAFETY: openat just returned this descriptor; closing it is ours.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    return Ok(());
                }
                match mkdirat(Some(parent), *part, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                if last {
                    return Ok(());
                }
                dir = Some(open(parent, part).map_err(std::io::Error::from)?);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
94 61 0:41 / / rw,relatime - overlay overlay rw,lowerdir=/a
95 94 0:63 / /proc rw,nosuid - proc proc rw
97 94 0:64 / /dev rw,nosuid - tmpfs tmpfs rw
98 97 0:65 / /dev/pts rw - devpts devpts rw
62 95 0:63 /bus /proc/bus ro - proc proc rw
67 95 0:64 /null /proc/keys rw - tmpfs tmpfs rw
110 94 8:1 /srv/data /data rw - ext4 /dev/sda1 rw
111 94 0:22 /null /proc/kcore rw - devtmpfs udev rw
112 94 0:22 /fuse /dev/fuse rw - devtmpfs udev rw
113 94 0:30 /k8s/pod/c /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory
114 94 0:31 /with\\040space /with\\040space rw - ext4 /dev/sda1 rw
";

    fn spec() -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.1.0",
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind"]},
                {"destination": "/with space", "type": "none", "source": "/x y", "options": ["bind"]},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs"}
            ],
            "linux": {
                "maskedPaths": ["/proc/keys", "/proc/kcore"],
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
            }
        }))
        .expect("spec")
    }

    #[test]
    fn parses_and_unescapes() {
        let m = parse_mountinfo(INFO);
        assert_eq!(m.len(), 11);
        assert_eq!(m[6].root, "/srv/data");
        assert_eq!(m[10].mount_point, "/with space");
        assert_eq!(m[0].fs_type, "overlay");
    }

    #[test]
    fn classifies_like_criu_needs() {
        let ext = classify(&parse_mountinfo(INFO), &spec());
        let got: Vec<(&str, &MountSource)> = ext
            .iter()
            .map(|e| (e.destination.as_str(), &e.source))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/data", &MountSource::Spec),
                ("/proc/kcore", &MountSource::DevNull),
                ("/dev/fuse", &MountSource::Device),
                (
                    "/sys/fs/cgroup/memory",
                    &MountSource::Cgroup {
                        controller: "memory".into()
                    }
                ),
                ("/with space", &MountSource::Spec),
            ]
        );
        assert_eq!(ext[0].dump_key(), "mnt[/data]:/data");
    }

    #[test]
    fn infers_runc_externals() {
        let host = parse_mountinfo(
            "30 1 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
32 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
33 30 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
",
        );
        let mut with_cgroup = spec();
        let mut mounts = with_cgroup.mounts().clone().unwrap_or_default();
        mounts.push(
            serde_json::from_value(serde_json::json!(
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
            ))
            .unwrap(),
        );
        with_cgroup.set_mounts(Some(mounts));
        let dests = |ext: Vec<ExternalMount>| -> Vec<String> {
            ext.into_iter().map(|e| e.destination).collect()
        };
        assert_eq!(
            dests(runc_externals(&spec(), &host)),
            ["/data", "/with space", "/dev/null"]
        );
        assert_eq!(
            dests(runc_externals(&with_cgroup, &host)),
            [
                "/data",
                "/with space",
                "/dev/null",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/cpu,cpuacct"
            ]
        );
        let v2 = parse_mountinfo("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(dests(runc_externals(&with_cgroup, &v2)).len(), 3);
    }

    #[test]
    fn maps_to_new_sources() {
        let ext = classify(&parse_mountinfo(INFO), &spec());
        let vals = restore_externals(
            &ext,
            &spec(),
            |c| Some(PathBuf::from(format!("/sys/fs/cgroup/{c}/new"))),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            vals,
            vec![
                "mnt[/data]:/srv/data",
                "mnt[/proc/kcore]:/dev/null",
                "mnt[/dev/fuse]:/dev/fuse",
                "mnt[/sys/fs/cgroup/memory]:/sys/fs/cgroup/memory/new",
                "mnt[/with space]:/x y",
            ]
        );
        let mut other = spec();
        other.set_mounts(None);
        assert!(restore_externals(&ext, &other, |_| None, &HashMap::new()).is_err());
    }

    /// Mounts a tmpfs named `source` on `at` with `opts` (tests run as root).
    fn mount_tmpfs(source: &str, at: &Path, opts: &str) {
        nix::mount::mount(
            Some(source),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(opts),
        )
        .unwrap()
    }

    /// A real tmpfs (needs root): empty is found, a file or an unlinked open file is not;
    /// the fresh one comes back with the same options, mode, owner and read-only flag.
    #[test]
    fn finds_empty_tmpfs_and_recreates_it() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let base = std::env::temp_dir().join(format!("ra-tmpfs-test-{}", std::process::id()));
        let (dump, fresh) = (base.join("dump"), base.join("fresh"));
        std::fs::create_dir_all(&dump).unwrap();
        std::fs::create_dir_all(&fresh).unwrap();
        mount_tmpfs("scratch", &dump, "size=1m,mode=750");
        std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::chown(&dump, Some(65534), Some(65534)).unwrap();
        let ours = |dir: &Path| -> Vec<MountInfo> {
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            parse_mountinfo(&text)
                .into_iter()
                .filter(|m| Path::new(&m.mount_point) == dir)
                .collect()
        };
        let found = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
        let file = dump.join("f");
        std::fs::write(&file, b"x").unwrap();
        let with_file = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
        let open = std::fs::File::open(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        let with_unlinked = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
        drop(open);
        let again = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
        nix::mount::umount2(&dump, nix::mount::MntFlags::MNT_DETACH).unwrap();

        assert_eq!(found.len(), 1, "{found:?}");
        assert!(with_file.is_empty() && with_unlinked.is_empty());
        assert_eq!(again, found);
        let MountSource::Tmpfs(t) = &found[0].source else {
            panic!("{found:?}")
        };
        assert_eq!((t.mode, t.uid, t.gid), (0o1777, 65534, 65534));
        assert_eq!(t.source, "scratch");
        assert!(!t.read_only);
        let ro = FreshTmpfs {
            read_only: true,
            ..t.clone()
        };
        ro.mount(&fresh).unwrap();
        let md = std::fs::metadata(&fresh).unwrap();
        let info = ours(&fresh);
        let write = std::fs::write(fresh.join("g"), b"x");
        nix::mount::umount2(&fresh, nix::mount::MntFlags::MNT_DETACH).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (0o1777, 65534, 65534)
        );
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].super_options, "ro,size=1024k,mode=750");
        assert!(write.is_err(), "the read-only tmpfs took a write");
    }

    /// A real tmpfs shaped like a container's `/dev` (needs root): directories, device
    /// nodes, symlinks, a fifo, an empty file and a mount below it are found and come back
    /// entry for entry (type, mode, owner, device number, target, time); data, a hard link
    /// or something hidden under the mount point leave it to CRIU.
    #[test]
    fn recreates_a_dev_like_tmpfs_entry_for_entry() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let base = std::env::temp_dir().join(format!("ra-devfs-test-{}", std::process::id()));
        let (dump, fresh) = (base.join("dump"), base.join("fresh"));
        std::fs::create_dir_all(&dump).unwrap();
        std::fs::create_dir_all(&fresh).unwrap();
        let tmpfs = |at: &Path, opts: &str| mount_tmpfs("tmpfs", at, opts);
        tmpfs(&dump, "size=65536k,mode=755");
        let null = libc::makedev(1, 3);
        nix::sys::stat::mknod(
            &dump.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            null,
        )
        .unwrap();
        std::fs::set_permissions(dump.join("null"), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        std::os::unix::fs::symlink("/proc/self/fd", dump.join("fd")).unwrap();
        std::fs::create_dir(dump.join("pts")).unwrap();
        std::fs::create_dir(dump.join("net")).unwrap();
        nix::unistd::mkfifo(&dump.join("net/pipe"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::write(dump.join("console"), b"").unwrap();
        std::os::unix::fs::chown(dump.join("console"), Some(5), Some(5)).unwrap();
        set_mtime(&dump.join("net"), (1_000_000, 5)).unwrap();
        tmpfs(&dump.join("pts"), "size=1m");
        // A path masked with a bind of its null, as runtimes mask /proc/kcore.
        let masked = base.join("kcore");
        std::fs::write(&masked, b"").unwrap();
        let bind = |from: &Path, to: &Path| {
            nix::mount::mount(
                Some(from),
                to,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap()
        };
        bind(&dump.join("null"), &masked);
        let ours = |dir: &Path| -> Vec<MountInfo> {
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            parse_mountinfo(&text)
                .into_iter()
                .filter(|m| {
                    Path::new(&m.mount_point).starts_with(dir)
                        || Path::new(&m.mount_point) == masked
                })
                .collect()
        };
        let found = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
        // The mount below is empty itself: found too, on its own.
        let dev: Vec<&ExternalMount> = found
            .iter()
            .filter(|e| Path::new(&e.destination) == dump)
            .collect();
        let hidden = {
            nix::mount::umount2(&dump.join("pts"), nix::mount::MntFlags::MNT_DETACH).unwrap();
            std::fs::write(dump.join("pts/under"), b"").unwrap();
            tmpfs(&dump.join("pts"), "size=1m");
            let h = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
            nix::mount::umount2(&dump.join("pts"), nix::mount::MntFlags::MNT_DETACH).unwrap();
            std::fs::remove_file(dump.join("pts/under")).unwrap();
            tmpfs(&dump.join("pts"), "size=1m");
            h
        };
        // A bind of the whole tmpfs in the masked path's place, through which its
        // inodes can be reached and changed: not re-creatable.
        let whole = {
            nix::mount::umount2(&masked, nix::mount::MntFlags::MNT_DETACH).unwrap();
            std::fs::remove_file(&masked).unwrap();
            std::fs::create_dir(&masked).unwrap();
            bind(&dump, &masked);
            let w = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
            nix::mount::umount2(&masked, nix::mount::MntFlags::MNT_DETACH).unwrap();
            w
        };
        std::fs::hard_link(dump.join("console"), dump.join("link")).unwrap();
        let linked = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
        std::fs::remove_file(dump.join("link")).unwrap();
        std::fs::write(dump.join("data"), b"x").unwrap();
        let with_data = dataless_tmpfs(&ours(&dump), Path::new("/"), &[]);
        std::fs::remove_file(dump.join("data")).unwrap();

        let listing = |root: &Path| -> Vec<(String, u32, u32, u32, u64, i64, String)> {
            let mut v = Vec::new();
            for rel in ["null", "fd", "pts", "net", "net/pipe", "console"] {
                let p = root.join(rel);
                let md = std::fs::symlink_metadata(&p).unwrap();
                let target = std::fs::read_link(&p)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                // A symlink's time is not kept; nor is that of the directory under a
                // mount point, which the container never sees (its mount covers it).
                let mtime = if md.file_type().is_symlink() || rel == "pts" {
                    0
                } else {
                    md.mtime()
                };
                v.push((
                    rel.to_string(),
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    md.rdev(),
                    mtime,
                    target,
                ));
            }
            v
        };
        nix::mount::umount2(&dump.join("pts"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        let before = listing(&dump);
        let (made, made_info) = match dev.first().map(|e| &e.source) {
            Some(MountSource::Tmpfs(t)) => {
                t.mount(&fresh).unwrap();
                let l = listing(&fresh);
                let info = ours(&fresh);
                nix::mount::umount2(&fresh, nix::mount::MntFlags::MNT_DETACH).unwrap();
                (l, info)
            }
            other => {
                nix::mount::umount2(&dump, nix::mount::MntFlags::MNT_DETACH).unwrap();
                panic!("no data-less tmpfs found: {other:?} in {found:?}")
            }
        };
        nix::mount::umount2(&dump, nix::mount::MntFlags::MNT_DETACH).unwrap();
        std::fs::remove_dir_all(&base).unwrap();

        assert_eq!(made, before);
        assert_eq!(made_info[0].super_options, "rw,size=65536k,mode=755");
        let t = match &dev[0].source {
            MountSource::Tmpfs(t) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(t.entries.len(), 6, "{:?}", t.entries);
        assert!(t
            .entries
            .iter()
            .any(|e| e.path == "null" && e.kind == EntryKind::Char { rdev: null }));
        let in_dump = |v: &[ExternalMount]| v.iter().any(|e| Path::new(&e.destination) == dump);
        assert!(in_dump(&found), "a bind of its null made it unusable");
        assert!(!in_dump(&whole), "a bind of the whole tmpfs went unnoticed");
        assert!(
            !in_dump(&hidden),
            "a file under the mount point went unnoticed"
        );
        assert!(!in_dump(&linked), "a hard link was taken");
        assert!(!in_dump(&with_data), "a file with data was taken");
    }

    #[test]
    fn creates_mountpoints_without_following_symlinks() {
        let root = std::env::temp_dir().join(format!("ra-mnt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.1.0",
            "mounts": [
                {"destination": "/a/b/c", "type": "bind", "source": "/", "options": ["bind"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hostname", "options": ["bind"]},
                {"destination": "/escape/ra-should-not-exist", "type": "bind", "source": "/", "options": ["bind"]},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/run/x", "type": "bind", "source": "/", "options": ["bind"]}
            ]
        }))
        .unwrap();
        ensure_mountpoints(&root, &spec).unwrap();
        assert!(root.join("a/b/c").is_dir());
        assert!(root.join("etc/hosts").is_file());
        assert!(root.join("run").is_dir());
        assert!(!root.join("run/x").exists());
        assert!(!Path::new("/ra-should-not-exist").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
