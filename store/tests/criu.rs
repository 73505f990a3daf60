//! Real CRIU images through the store: dump small process trees, ingest, materialize, compare
//! byte-exact, dedup a second replica, and restore the process from the materialized images.
//! Skipped (with a message) only when `criu` is not installed.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use runc_architect_store::{CheckpointKey, MaterializeOptions, Reference};

fn find_criu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("criu"))
        .find(|p| p.is_file())
}

/// Starts `sleep` in its own session (no terminal, stdio on /dev/null, no address-space
/// randomisation: replicas of one image then share their pages, as forked or
/// identically-started workers do).
fn start_sleep() -> std::process::Child {
    let mut cmd = Command::new("sleep");
    cmd.arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2) and
    // personality(2), both async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    child
}

fn dump(criu: &Path, pid: u32, dir: &Path, leave_running: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new(criu);
    cmd.args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(dir)
        .args(["-o", "dump.log"]);
    if leave_running {
        cmd.arg("--leave-running");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "criu dump failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default()
    );
}

/// Dumps a fresh `sleep` (which criu then kills) and reaps it so its pid is free again.
fn dump_sleep(criu: &Path, dir: &Path) -> u32 {
    let mut child = start_sleep();
    let pid = child.id();
    let res = std::panic::catch_unwind(|| dump(criu, pid, dir, false));
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = res {
        std::panic::resume_unwind(e);
    }
    pid
}

#[test]
fn real_criu_images_round_trip_dedup_and_restore() {
    let Some(criu) = find_criu() else {
        eprintln!("SKIPPED real_criu_images_round_trip_dedup_and_restore: criu is not installed");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(&tmp.path().join("store"), &[("enc", [5; 32])]);
    let images = tmp.path().join("images-a");
    let pid = dump_sleep(&criu, &images);
    assert!(std::fs::read_dir(&images).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("pages-")));

    for ns in ["plain", "enc"] {
        let key = CheckpointKey::new(ns, "sleep", "a").unwrap();
        let out = store.put_dir(&key, &images, BTreeMap::new()).unwrap();
        let dest = tmp.path().join(format!("restored-{ns}"));
        store
            .materialize(
                &out.reference.parse::<Reference>().unwrap(),
                &dest,
                &MaterializeOptions::default(),
            )
            .unwrap();
        assert_eq!(read_tree(&dest), read_tree(&images), "{ns}: byte-exact");
    }

    // A second replica of the same "template" shares most of its pages.
    let images_b = tmp.path().join("images-b");
    dump_sleep(&criu, &images_b);
    let out = store
        .put_dir(
            &CheckpointKey::new("plain", "sleep", "b").unwrap(),
            &images_b,
            BTreeMap::new(),
        )
        .unwrap();
    eprintln!(
        "replica b: {} of {} chunks new ({} logical bytes)",
        out.new_chunks, out.chunks, out.logical_bytes
    );
    assert!(
        out.new_chunks * 2 < out.chunks,
        "replica b deduped against replica a"
    );

    // Two generations of one process (dumped twice, left running in between).
    let mut child = start_sleep();
    let (g1, g2) = (tmp.path().join("gen1"), tmp.path().join("gen2"));
    dump(&criu, child.id(), &g1, true);
    dump(&criu, child.id(), &g2, true);
    let _ = child.kill();
    let _ = child.wait();
    let key_c = CheckpointKey::new("plain", "sleep", "c").unwrap();
    store.put_dir(&key_c, &g1, BTreeMap::new()).unwrap();
    let out = store.put_dir(&key_c, &g2, BTreeMap::new()).unwrap();
    eprintln!(
        "generation 2: {} of {} chunks new ({} logical bytes)",
        out.new_chunks, out.chunks, out.logical_bytes
    );
    assert!(
        out.new_chunks * 4 < out.chunks,
        "generation 2 deduped against generation 1"
    );
    let dest = tmp.path().join("restored-gen2");
    store
        .materialize(
            &out.reference.parse::<Reference>().unwrap(),
            &dest,
            &MaterializeOptions::default(),
        )
        .unwrap();
    assert_eq!(read_tree(&dest), read_tree(&g2));
    assert!(store.verify().unwrap().is_ok());

    // CRIU restores the process from the materialized images.
    let dest = tmp.path().join("restored-plain");
    let out = Command::new(&criu)
        .args(["restore", "-d", "-D"])
        .arg(&dest)
        .args(["-o", "restore.log"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "criu restore failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dest.join("restore.log")).unwrap_or_default()
    );
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(comm.trim(), "sleep", "restored process runs");
}
