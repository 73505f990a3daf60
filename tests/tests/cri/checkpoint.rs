//! Kubelet checkpoints (KEP-2008): `CheckpointContainer` through CRI writes an archive in
//! the layout checkpointctl reads (CRIU images under `checkpoint/`, `dump.log` and
//! `stats-dump` at the top, the spec, config and status dumps, the rootfs diff, the log);
//! on containerd 2.x a container created from that archive restores with its state.
//! containerd 1.7 does not implement CheckpointContainer (both handlers answer alike).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use runc_architect_tests::cri::api::{self, ContainerState};
use runc_architect_tests::cri::ContainerSpec;
use runc_architect_tests::diff::Observation;
use runc_architect_tests::Version;
use serde_json::json;

use crate::run::Run;
use crate::Scenario;

/// The one entry runc-architect's archive has that runc's has not: its own record of the
/// dump (stdio keys, externals, options; runc's `descriptors.json` is written too, so the
/// archive is restorable by runc). See the README's known differences.
pub const OWN_RECORD: &str = "checkpoint/runc-architect-checkpoint.json";

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "kubelet_checkpoint",
        as_runc: true,
        run: kubelet_checkpoint,
    }]
}

/// A counter that must continue after the restore, and a file written into the rootfs.
const COUNTER: &str = "echo from-before > /written-before; i=0; while true; do i=$((i+1)); \
     echo $i > /tmp/count; sleep 0.1; done";

fn kubelet_checkpoint(r: &mut Run) -> Result<Observation> {
    let image = r
        .node
        .images()
        .and_then(|i| i.busybox_pushed.clone())
        .context("the busybox image in the node's registry")?
        .reference;
    let pod = r.pod(|_| {})?;
    let spec = ContainerSpec::new("counter", &image).command(&["sh", "-c", COUNTER]);
    let id = r.start(pod, spec)?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    r.wait_exec(&id, "[ \"$(cat /tmp/count)\" -gt 10 ]")?;
    let dir = r
        .node
        .layout()
        .scratch()
        .join(format!("kubelet-checkpoint-{}", r.handler));
    std::fs::create_dir_all(&dir)?;
    let archive = dir.join("checkpoint.tar");
    let _ = std::fs::remove_file(&archive);
    let mut o = Observation::new();
    // Read before the dump: the checkpointed value is at least this (the container goes on
    // counting after the checkpoint, so a later read could be ahead of it).
    let before: u64 = r.exec_ok(&id, &["cat", "/tmp/count"])?.trim().parse()?;
    let res = r.kubelet.checkpoint(&id, &archive, Duration::from_secs(60));
    if r.node.version() == Version::V1_7 {
        o.put(
            "checkpoint",
            match res {
                Ok(()) => json!("ok"),
                Err(e) => json!({"code": format!("{:?}", e.code())}),
            },
        );
        return Ok(o);
    }
    res.map_err(|e| anyhow!("CheckpointContainer: {e}"))?;
    o.put("still_running_after", r.status_brief(&id)?);
    let entries = archive_entries(&archive)?;
    o.put(
        "archive_entries",
        normalized_names(&entries, r.is_architect()),
    );
    o.put(
        "archive_files_nonempty",
        [
            "dump.log",
            "stats-dump",
            "config.dump",
            "spec.dump",
            "status.dump",
            "rootfs-diff.tar",
            "checkpoint/inventory.img",
        ]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                json!(entries.get(*n).is_some_and(|e| e.size > 0)),
            )
        })
        .collect::<serde_json::Map<_, _>>(),
    );
    o.put(
        "archive_is_private",
        std::fs::metadata(&archive)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o077 == 0)?,
    );
    o.put("config_dump", config_dump(&archive)?);
    o.put("store_round_trip", store_round_trip(&archive, &dir)?);
    if r.registration == "as-runc" {
        // containerd 2.1's restore (client Container.Restore) sends no runtime_path: the
        // handler's binary is then looked up by runtime type, which for
        // `io.containerd.runc.v2` is the stock shim, whatever runtime_path says. CRI
        // restores need runc-architect's own runtime type (see the README).
        return Ok(o);
    }
    // The kubelet's restore (containerd 2.x): a new pod, CreateContainer with the archive
    // as the image.
    let pod2 = r.pod(|_| {})?;
    let mut spec = ContainerSpec::new("counter", &archive.display().to_string());
    spec.command.clear();
    let image_ref = archive.display().to_string();
    let restored = r.create(pod2, &spec, &image_ref, "restored")?;
    r.kubelet
        .cri()
        .start_container(api::StartContainerRequest {
            container_id: restored.clone(),
        })
        .map_err(|e| anyhow!("StartContainer of the restored container: {e}"))?;
    r.wait_state(&restored, ContainerState::ContainerRunning)?;
    let after: u64 = r
        .exec_ok(&restored, &["cat", "/tmp/count"])?
        .trim()
        .parse()?;
    o.put("counter_continued", after >= before);
    o.put(
        "rootfs_change_came_along",
        r.exec_ok(&restored, &["cat", "/written-before"])?,
    );
    let st = r.status(&restored)?;
    o.put(
        "restored_annotations",
        json!({
            "restored": st.annotations.get("restored").cloned(),
            "checkpointedAt_set": st.annotations.contains_key("checkpointedAt"),
        }),
    );
    o.put("restored_status", r.status_brief(&restored)?);
    // The archive is portable: the other runtime restores it too (runc-architect's under
    // the stock shim, the stock shim's under runc-architect).
    let pod3 = r.pod_under_the_other_handler(|_| {})?;
    let crossed = r.create(pod3, &spec, &image_ref, "crossed")?;
    r.kubelet
        .cri()
        .start_container(api::StartContainerRequest {
            container_id: crossed.clone(),
        })
        .map_err(|e| anyhow!("StartContainer of the archive under the other handler: {e}"))?;
    r.wait_state(&crossed, ContainerState::ContainerRunning)?;
    let crossed_count: u64 = r
        .exec_ok(&crossed, &["cat", "/tmp/count"])?
        .trim()
        .parse()?;
    o.put("restored_by_the_other_handler", crossed_count >= before);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(o)
}

/// `runc-architect store import` of the archive containerd wrote, then `store export`: the
/// same entries with the same bytes (the layout checkpointctl reads).
fn store_round_trip(archive: &Path, dir: &Path) -> Result<serde_json::Value> {
    let cli = runc_architect_tests::node::register::installer()?;
    let root = dir.join("store");
    let run = |args: &[&str]| -> Result<String> {
        let mut cmd = std::process::Command::new(&cli);
        cmd.arg("store").arg("--root").arg(&root).args(args);
        let out = runc_architect_tests::process::run(cmd, None, Duration::from_secs(60))?.ok()?;
        Ok(out.stdout_str())
    };
    let imported = run(&["import", &archive.display().to_string()])?;
    let reference = imported
        .lines()
        .last()
        .and_then(|l| {
            l.split_whitespace()
                .find(|w| w.contains('/') || w.starts_with("blake3:"))
        })
        .with_context(|| format!("no reference in the import's output {imported:?}"))?
        .to_string();
    let exported = dir.join("exported.tar");
    run(&["export", &reference, &exported.display().to_string()])?;
    let (a, b) = (entry_bytes(archive)?, entry_bytes(&exported)?);
    let same_names = a.keys().collect::<Vec<_>>() == b.keys().collect::<Vec<_>>();
    let differing: Vec<&String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    Ok(json!({"same_entries": same_names, "entries_with_other_bytes": differing}))
}

/// Every regular file of an archive and its bytes.
fn entry_bytes(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut ar = tar::Archive::new(std::fs::File::open(path)?);
    let mut out = BTreeMap::new();
    for e in ar.entries()? {
        let mut e = e?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = e
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.insert(name, data);
    }
    Ok(out)
}

struct Entry {
    size: u64,
}

fn archive_entries(path: &Path) -> Result<BTreeMap<String, Entry>> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut ar = tar::Archive::new(f);
    let mut out = BTreeMap::new();
    for e in ar.entries()? {
        let e = e?;
        let name = e
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        if name.is_empty() {
            continue;
        }
        out.insert(
            name,
            Entry {
                size: e.header().size()?,
            },
        );
    }
    Ok(out)
}

/// Entry names with the numbers CRIU puts into image names (ids, mount ids) masked, and
/// runc-architect's own record left out (see [`OWN_RECORD`]).
fn normalized_names(entries: &BTreeMap<String, Entry>, architect: bool) -> Vec<String> {
    let mut v: Vec<String> = entries
        .keys()
        .filter(|n| !(architect && n.as_str() == OWN_RECORD))
        .map(|n| {
            let mut s = String::new();
            let mut digits = false;
            for c in n.chars() {
                if c.is_ascii_digit() {
                    if !digits {
                        s.push('N');
                    }
                    digits = true;
                } else {
                    digits = false;
                    s.push(c);
                }
            }
            s
        })
        .collect();
    v.sort();
    v
}

/// config.dump's fields that do not name the run.
fn config_dump(archive: &Path) -> Result<serde_json::Value> {
    let f = std::fs::File::open(archive)?;
    let mut ar = tar::Archive::new(f);
    for e in ar.entries()? {
        let mut e = e?;
        if e.path()?.to_string_lossy().trim_start_matches("./") == "config.dump" {
            let mut s = String::new();
            e.read_to_string(&mut s)?;
            let v: serde_json::Value = serde_json::from_str(&s)?;
            return Ok(json!({
                "rootfsImageName": v.get("rootfsImageName"),
                "ociRuntime_set": v.get("runtime").or(v.get("ociRuntime")).is_some(),
            }));
        }
    }
    bail!("no config.dump in the archive")
}
