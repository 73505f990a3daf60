//! Mounting the container's root filesystem from the mounts containerd passes with
//! Create (typically one overlay), and taking it down again at delete.

use std::path::{Path, PathBuf};

use tracing::warn;

use crate::error::{Error, Result};

/// One mount from containerd's CreateTaskRequest.
#[derive(Debug, Clone)]
pub struct RootfsMount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The directory the rootfs goes to inside a bundle.
pub fn rootfs_dir(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// Mounts `mounts` in order on `<bundle>/rootfs`. With no mounts the bundle's rootfs is
/// used as it is (a bundle made by hand). On failure, what was mounted is undone.
pub fn mount(bundle: &Path, mounts: &[RootfsMount]) -> Result<()> {
    if mounts.is_empty() {
        return Ok(());
    }
    let target = rootfs_dir(bundle);
    std::fs::create_dir_all(&target)
        .map_err(|e| Error::io("create rootfs directory", &target, e))?;
    for m in mounts {
        let res = containerd_shim::mount::mount_rootfs(
            Some(m.fs_type.as_str()).filter(|s| !s.is_empty()),
            Some(m.source.as_str()).filter(|s| !s.is_empty()),
            &m.options,
            &target,
        );
        if let Err(e) = res {
            unmount(bundle);
            return Err(Error::Other(format!(
                "failed to mount rootfs component {} ({}) on {}: {e}",
                m.source,
                m.fs_type,
                target.display()
            )));
        }
    }
    Ok(())
}

/// Unmounts everything at and below `<bundle>/rootfs`; problems are logged.
pub fn unmount(bundle: &Path) {
    let target = rootfs_dir(bundle);
    let Some(t) = target.to_str() else { return };
    if let Err(e) = containerd_shim::mount::umount_recursive(Some(t), libc::MNT_DETACH) {
        warn!(rootfs = t, "unmount rootfs: {e}");
    }
}

/// Creates the process's working directory in the rootfs when it is missing, as runc does
/// (`ctr run --cwd /new/dir` works with the stock shim; libcontainer would refuse it).
///
/// The path is walked one component at a time without following symlinks: a symlink in
/// an image must never make the shim create directories outside the rootfs, so the walk
/// stops at the first symlink and leaves the rest to the runtime (which resolves it
/// inside the container). Directories are created 0755, owned by root.
pub fn ensure_cwd(bundle: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let config = bundle.join("config.json");
    let Ok(text) = std::fs::read_to_string(&config) else {
        return Ok(());
    };
    let Ok(spec) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(());
    };
    let Some(cwd) = spec.pointer("/process/cwd").and_then(|v| v.as_str()) else {
        return Ok(());
    };
    let Some(root) = spec.pointer("/root/path").and_then(|v| v.as_str()) else {
        return Ok(());
    };
    let mut dir = bundle.join(root);
    for comp in Path::new(cwd).components() {
        let std::path::Component::Normal(name) = comp else {
            continue;
        };
        dir.push(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() || !m.is_dir() => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&dir)
                    .map_err(|e| Error::io("create working directory", &dir, e))?;
            }
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}
