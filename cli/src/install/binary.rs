//! The shim binary in the node's binary directory.
//!
//! Installed atomically: copied to a temp file in the target directory, made root-owned and
//! 0755, fsynced, then renamed over the old one. Running shims keep the file they were
//! started from (rename replaces the name, not the inode; writing into a running binary
//! would fail with ETXTBSY), containerd starts new shims from the new file. An identical
//! file with the right mode and owner is left alone.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::config::{sync_dir, TempFile};
use super::Error;

/// The binary containerd runs for runtime type `io.containerd.runc-architect.v1`.
pub const SHIM_NAME: &str = "containerd-shim-runc-architect-v1";

/// What installing the binary did (or would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Installed,
    Replaced,
    UpToDate,
}

/// The default `--shim`: the shim next to the running `runc-architect`.
pub fn default_shim() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "find the running executable",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    Ok(exe.with_file_name(SHIM_NAME))
}

/// Where the binary goes in `bin_dir`, as an absolute path (it becomes `runtime_path`).
pub fn target(bin_dir: &Path) -> Result<PathBuf, Error> {
    std::path::absolute(bin_dir.join(SHIM_NAME)).map_err(|source| Error::Io {
        what: "make absolute",
        path: bin_dir.to_path_buf(),
        source,
    })
}

/// Checks `src` and tells what [`install`] would do.
pub fn plan(src: &Path, dest: &Path) -> Result<Outcome, Error> {
    let bad = |message: String| Error::Shim {
        path: src.to_path_buf(),
        message,
    };
    let meta = fs::metadata(src).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let Ok(have) = fs::metadata(dest) else {
        return Ok(Outcome::Installed);
    };
    let same_inode = have.dev() == meta.dev() && have.ino() == meta.ino();
    let owner_ok = !nix::unistd::geteuid().is_root() || (have.uid() == 0 && have.gid() == 0);
    let mode_ok = have.permissions().mode() & 0o7777 == 0o755;
    if have.is_file()
        && owner_ok
        && mode_ok
        && (same_inode || (have.len() == meta.len() && same_content(src, dest)?))
    {
        return Ok(Outcome::UpToDate);
    }
    Ok(Outcome::Replaced)
}

/// Installs `src` as `dest` (see the module docs).
pub fn install(src: &Path, dest: &Path) -> Result<Outcome, Error> {
    let outcome = plan(src, dest)?;
    if outcome == Outcome::UpToDate {
        return Ok(outcome);
    }
    let io = |what, p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io {
            what,
            path: p,
            source,
        }
    };
    let dir = super::config::parent_dir(dest);
    fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
    let tmp = dir.join(format!(
        ".{SHIM_NAME}.runc-architect-{}",
        std::process::id()
    ));
    let guard = TempFile(tmp.clone());
    let mut from = fs::File::open(src).map_err(io("open", src))?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    std::io::copy(&mut from, &mut to).map_err(io("copy to", &tmp))?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::fchown(&to, Some(0), Some(0)).map_err(io("chown", &tmp))?;
    }
    to.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(io("chmod", &tmp))?;
    to.flush().map_err(io("write", &tmp))?;
    to.sync_all().map_err(io("sync", &tmp))?;
    drop(to);
    fs::rename(&tmp, dest).map_err(io("rename into place", dest))?;
    std::mem::forget(guard);
    sync_dir(&dir)?;
    Ok(outcome)
}

/// Removes `dest`; returns whether it was there.
pub fn remove(dest: &Path) -> Result<bool, Error> {
    match fs::remove_file(dest) {
        Ok(()) => {
            sync_dir(&super::config::parent_dir(dest))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io {
            what: "remove",
            path: dest.to_path_buf(),
            source,
        }),
    }
}

fn same_content(a: &Path, b: &Path) -> Result<bool, Error> {
    let open = |p: &Path| {
        fs::File::open(p).map_err(|source| Error::Io {
            what: "read",
            path: p.to_path_buf(),
            source,
        })
    };
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let na = read_full(&mut fa, &mut ba, a)?;
        let nb = read_full(&mut fb, &mut bb, b)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut fs::File, buf: &mut [u8], path: &Path) -> Result<usize, Error> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Io {
                    what: "read",
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(n)
}
