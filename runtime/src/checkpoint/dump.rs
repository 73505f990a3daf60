//! `Task.Checkpoint`: dumping a container's init and its descendants with CRIU. See the
//! module docs of [`crate::checkpoint`] for the design.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use criu_rpc::{Criu, CriuOptions, CriuStderr};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use tracing::{debug, info, info_span, warn, Instrument};

use super::freezer::{self, Snapshot, FREEZE_TIMEOUT};
use super::meta::{DumpRecord, StdioRecord, RECORD_VERSION};
use super::mounts::{self, parse_mountinfo};
use super::netlock::{self, LockWatch};
use super::spawner::ShimSpawner;
use super::{
    restrict_tree, CheckpointError, CheckpointRequest, NetworkLock, DUMP_LOG, EXT_NET_NS_KEY,
    EXT_PID_NS_KEY,
};
use crate::cgroups::CgroupPaths;
use crate::exits::ExitWatcher;
use crate::process::Status;
use crate::Container;

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Where the log of a failed dump is kept (in the bundle, like the stock shim's).
const DUMP_LOG_COPY: &str = "criu-dump.log";

/// Dumps `container` (its init and every descendant) into `req.image_dir`.
///
/// The container keeps running (or stays paused) unless `req.exit`; on failure it is left
/// as it was and the error carries CRIU's reason.
pub async fn checkpoint(
    container: &Container,
    exits: &ExitWatcher,
    req: CheckpointRequest,
) -> Result<()> {
    let span = info_span!("checkpoint", container = %container.id);
    dump(container, exits, req).instrument(span).await
}

async fn dump(container: &Container, exits: &ExitWatcher, req: CheckpointRequest) -> Result<()> {
    let id = container.id.as_str();
    let started = Instant::now();
    let init = container
        .state("")
        .map_err(|e| CheckpointError::runtime(id, "init state", e))?;
    match init.status {
        Status::Running | Status::Paused => {}
        Status::Created => {
            return Err(CheckpointError::State {
                id: id.into(),
                reason: "cannot checkpoint a container that was not started".into(),
            })
        }
        Status::Stopped => {
            return Err(CheckpointError::State {
                id: id.into(),
                reason: "cannot checkpoint a stopped container".into(),
            })
        }
    }
    let pid = container.init_pid();
    let bundle = container.bundle().to_path_buf();
    let spec = load_spec(id, &bundle)?;
    let rootfs = rootfs_of(&bundle, &spec);

    create_private_dir(id, &req.image_dir)?;
    let work_dir = req
        .work_dir
        .clone()
        .unwrap_or_else(|| req.image_dir.clone());
    create_private_dir(id, &work_dir)?;

    let cgroups = CgroupPaths::of_pid(pid)
        .map_err(|e| CheckpointError::runtime(id, "find the init's cgroups", e))?;
    let mountinfo_path = format!("/proc/{pid}/mountinfo");
    let mountinfo = std::fs::read_to_string(&mountinfo_path)
        .map_err(|e| CheckpointError::io(id, "read", &mountinfo_path, e))?;
    let mountinfo = parse_mountinfo(&mountinfo);
    let external_mounts = mounts::classify(&mountinfo, &spec);
    let mount_ids: Vec<u32> = mountinfo.iter().map(|m| m.id).collect();

    let empty_ns = empty_namespaces(&req.empty_namespaces)?;
    // A network namespace dumped empty is re-created by CRIU at restore, which must lock
    // it while sockets are repaired: only CRIU's own lock does that.
    let network_lock = match req.network_lock {
        NetworkLock::Runtime if empty_ns & libc::CLONE_NEWNET as u32 != 0 => NetworkLock::Iptables,
        other => other,
    };
    let mut opts = CriuOptions::new()
        .pid(pid)
        .images_dir(&req.image_dir)
        .work_dir(&work_dir)
        .log_file(DUMP_LOG)
        .log_level(req.criu.log_level)
        .root(rootfs.to_string_lossy())
        .leave_running(!req.exit)
        .tcp_established(req.open_tcp)
        .ext_unix_sk(req.external_unix_sockets)
        .shell_job(req.terminal)
        .file_locks(req.file_locks)
        .manage_cgroups(req.cgroups_mode.managed())
        .manage_cgroups_mode(req.cgroups_mode.criu())
        .network_lock(network_lock.criu());
    if let Some(parent) = &req.parent {
        opts = opts.parent_img(parent.to_string_lossy());
    }
    if empty_ns != 0 {
        opts = opts.empty_ns(empty_ns);
    }
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if terminal {
        opts = opts.orphan_pts_master(true);
    }
    for m in &external_mounts {
        opts = opts.external(m.dump_key());
    }

    // Namespaces joined by path belong to someone else (a pod): external. So is the
    // container's own network namespace when the caller keeps it.
    let mut external_net_ns = false;
    let mut external_pid_ns = false;
    for ns in spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
    {
        let kept = req.keep_netns && ns.typ() == LinuxNamespaceType::Network;
        if ns.path().is_none() && !kept {
            continue;
        }
        let (name, key) = match ns.typ() {
            LinuxNamespaceType::Network => ("net", EXT_NET_NS_KEY),
            LinuxNamespaceType::Pid => ("pid", EXT_PID_NS_KEY),
            _ => continue,
        };
        let link = format!("/proc/{pid}/ns/{name}");
        let ino = std::fs::metadata(&link)
            .map_err(|e| CheckpointError::io(id, "inspect namespace", &link, e))?;
        opts = opts.external(format!(
            "{name}[{}]:{key}",
            std::os::unix::fs::MetadataExt::ino(&ino)
        ));
        match ns.typ() {
            LinuxNamespaceType::Network => external_net_ns = true,
            _ => external_pid_ns = true,
        }
    }

    // The init's stdio: pipes are re-attached at restore by inode; host files (the
    // shim's /dev/null) are external files; a terminal in the container is CRIU's.
    let mut stdio = Vec::with_capacity(3);
    for fd in 0..3 {
        let rec = stdio_record(id, pid, fd, &mount_ids)?;
        if let Some(key) = rec
            .inherit_key
            .as_deref()
            .filter(|k| k.starts_with("file["))
        {
            opts = opts.external(key.to_string());
        }
        stdio.push(rec);
    }
    let mut record = DumpRecord {
        version: RECORD_VERSION,
        container_id: id.to_string(),
        stdio,
        terminal,
        external_mounts,
        external_net_ns,
        external_pid_ns,
        tcp_established: req.open_tcp,
        ext_unix_sk: req.external_unix_sockets,
        shell_job: req.terminal,
        file_locks: req.file_locks,
        cgroups_mode: req.cgroups_mode,
        network_lock,
        locked_netns: None,
        cgroup_path: cgroups
            .unified
            .as_ref()
            .and_then(|u| crate::cgroups::unified_root().and_then(|r| u.strip_prefix(r).ok()))
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_default(),
    };

    // The namespace to lock (and to unlock if CRIU dies with a lock in place).
    let netns_path = format!("/proc/{pid}/ns/net");
    let netns = std::fs::File::open(&netns_path)
        .map_err(|e| CheckpointError::io(id, "open network namespace", &netns_path, e))?;
    let netns_ino = netns
        .metadata()
        .map_err(|e| CheckpointError::io(id, "inspect network namespace", &netns_path, e))?
        .ino();

    // Freeze with our own freezer unless something holds the container frozen already.
    let snapshot = Snapshot::take(&cgroups);
    let freezer = freezer::choose(&cgroups).ok_or_else(|| CheckpointError::State {
        id: id.into(),
        reason: "the container has no freezer cgroup".into(),
    })?;
    let was_frozen = freezer.is_frozen().unwrap_or(false);
    if !was_frozen {
        let f = freezer.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || f.freeze(FREEZE_TIMEOUT))
            .await
            .map_err(|e| CheckpointError::runtime(id, "freeze", e))?
            .map_err(|e| CheckpointError::io(id, "freeze", freezer.path(), e))?;
        info!(freeze_us = t.elapsed().as_micros() as u64, cgroup = %freezer.path().display(), "frozen");
    }
    opts = opts.freeze_cgroup(freezer.path().to_string_lossy());

    // Frozen, nothing can change a tmpfs any more: the ones without data are re-created
    // at restore instead of archived (mountinfo read again: it is final now). Not for
    // portable images: runc archives every tmpfs and would not know how to re-create one.
    if !req.portable {
        match std::fs::read_to_string(&mountinfo_path) {
            Ok(text) => {
                let root = PathBuf::from(format!("/proc/{pid}/root"));
                for m in
                    mounts::dataless_tmpfs(&parse_mountinfo(&text), &root, &record.external_mounts)
                {
                    info!(destination = %m.destination, "tmpfs without data: re-created at restore");
                    opts = opts.external(m.dump_key());
                    record.external_mounts.push(m);
                }
            }
            // Then CRIU archives every tmpfs, as it would anyway.
            Err(e) => debug!("read mountinfo again: {e}"),
        }
    }

    let spawner = Arc::new(ShimSpawner::new(exits.clone()));
    let criu = Criu::with_binary(&req.criu.binary)
        .spawner(spawner.clone())
        .stderr(CriuStderr::Null);
    let mut watch = LockWatch::new(exits.clone(), network_lock, Some(netns));
    let result =
        match tokio::time::timeout(req.criu.timeout, criu.dump_with_notify(opts, &mut watch)).await
        {
            Ok(r) => r,
            Err(_) => {
                spawner.kill_all();
                Err(super::timed_out(req.criu.timeout))
            }
        };
    match result {
        Ok(_) => {
            if !req.exit && !was_frozen {
                if let Err(e) = freezer.thaw() {
                    warn!(cgroup = %freezer.path().display(), "thaw after dump: {e}");
                }
            }
            // A pod's namespace outlives the killed tree: its lock waits for the restore.
            // (The tree's own namespace went with the tree, lock included.)
            if watch.holds_lock() && external_net_ns {
                record.locked_netns = Some(netns_ino);
            }
            // The tree's own namespace was saved with our lock in place: the images must
            // hold the namespace's own rules, not the lock (netlock's module docs).
            if !external_net_ns {
                let scrubbed = netlock::scrub_rule_images(&req.image_dir).map_err(|e| {
                    CheckpointError::io(id, "cut the runtime's rules out of", &req.image_dir, e)
                })?;
                debug!(
                    images = scrubbed.len(),
                    "runtime's rules cut out of saved rules"
                );
            }
            record.save(&req.image_dir).map_err(|e| {
                CheckpointError::io(id, "write checkpoint record in", &req.image_dir, e)
            })?;
            if req.portable {
                record.save_runc_descriptors(&req.image_dir).map_err(|e| {
                    CheckpointError::io(id, "write runc's descriptors.json in", &req.image_dir, e)
                })?;
            }
            restrict_tree(&req.image_dir)
                .map_err(|e| CheckpointError::io(id, "restrict access to", &req.image_dir, e))?;
            if work_dir != req.image_dir {
                let _ = restrict_tree(&work_dir);
            }
            let phases = super::stats::dump_phases(&work_dir).ok();
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            info!(
                pid,
                exit = req.exit,
                elapsed_ms = ms(started.elapsed()),
                criu_frozen_ms = phases.map(|p| ms(p.frozen)),
                criu_memdump_ms = phases.map(|p| ms(p.memdump)),
                criu_memwrite_ms = phases.map(|p| ms(p.memwrite)),
                pages_written = phases.map(|p| p.pages_written),
                images = %req.image_dir.display(),
                "checkpointed"
            );
            Ok(())
        }
        Err(source) => {
            // Leave the container as it was: CRIU may have died with its network lock in
            // place, with the cgroup frozen, or after thawing a paused one it had seized.
            watch.release().await;
            for p in snapshot.restore() {
                warn!("restore freezer after failed dump: {p}");
            }
            let err =
                CheckpointError::criu(id, "checkpoint", source, Some(&bundle.join(DUMP_LOG_COPY)));
            warn!(pid, error = %err, "checkpoint failed");
            Err(err)
        }
    }
}

pub(crate) fn load_spec(id: &str, bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|e| CheckpointError::Image {
        id: id.into(),
        path,
        reason: format!("cannot read the bundle's spec: {e}"),
    })
}

/// The rootfs directory of a bundle.
pub(crate) fn rootfs_of(bundle: &Path, spec: &Spec) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    }
}

fn create_private_dir(id: &str, dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CheckpointError::io(id, "create directory", dir, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| CheckpointError::io(id, "restrict access to", dir, e))
}

fn empty_namespaces(names: &[String]) -> Result<u32> {
    let mut bits = 0u32;
    for n in names {
        match n.as_str() {
            "network" | "net" => bits |= libc::CLONE_NEWNET as u32,
            other => {
                return Err(CheckpointError::InvalidOption(format!(
                    "empty namespace {other:?}: CRIU can only dump the network namespace empty"
                )))
            }
        }
    }
    Ok(bits)
}

fn stdio_record(id: &str, pid: i32, fd: i32, container_mounts: &[u32]) -> Result<StdioRecord> {
    let link_path = format!("/proc/{pid}/fd/{fd}");
    let link = std::fs::read_link(&link_path)
        .map_err(|e| CheckpointError::io(id, "inspect stdio", &link_path, e))?
        .to_string_lossy()
        .into_owned();
    if link.starts_with("pipe:") {
        return Ok(StdioRecord {
            inherit_key: Some(link.clone()),
            link,
        });
    }
    if link.starts_with("socket:") || link.starts_with("anon_inode:") {
        return Ok(StdioRecord {
            link,
            inherit_key: None,
        });
    }
    let info_path = format!("/proc/{pid}/fdinfo/{fd}");
    let info = std::fs::read_to_string(&info_path)
        .map_err(|e| CheckpointError::io(id, "inspect stdio", &info_path, e))?;
    let mnt_id: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if container_mounts.contains(&mnt_id) {
        // A file of the container (its terminal): CRIU dumps and restores it.
        return Ok(StdioRecord {
            link,
            inherit_key: None,
        });
    }
    let ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(&link_path)
            .map_err(|e| CheckpointError::io(id, "inspect stdio", &link_path, e))?,
    );
    Ok(StdioRecord {
        inherit_key: Some(format!("file[{mnt_id:x}:{ino:x}]")),
        link,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_namespace_names() {
        assert_eq!(
            empty_namespaces(&["network".into()]).unwrap(),
            libc::CLONE_NEWNET as u32
        );
        assert_eq!(empty_namespaces(&[]).unwrap(), 0);
        assert!(empty_namespaces(&["ipc".into()]).is_err());
    }

    #[test]
    fn own_stdio_records() {
        // This test process's own fds: whatever they are, the record is well-formed.
        let me = std::process::id() as i32;
        for fd in 0..3 {
            if let Ok(rec) = stdio_record("t", me, fd, &[]) {
                if rec.link.starts_with("pipe:") {
                    assert_eq!(rec.inherit_key.as_deref(), Some(rec.link.as_str()));
                }
            }
        }
    }
}
