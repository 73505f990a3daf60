//! Tests of the real `runc-architect` binary: store commands, crash injection (SIGKILL at
//! random moments and abort at every fault point), concurrent processes, corruption, keys,
//! archives, gc and configuration files.

#[path = "../../store/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_runc-architect");

fn ra(root: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("store")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run runc-architect")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = ra(root, args);
    assert!(
        out.status.success(),
        "runc-architect store {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(root: &Path, args: &[&str]) -> String {
    let out = ra(root, args);
    assert!(
        !out.status.success(),
        "runc-architect store {args:?} should have failed"
    );
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or_default().to_owned()
}

fn put(root: &Path, ns: &str, key: &str, c: &str, src: &Path) -> String {
    last_line(&ok(
        root,
        &[
            "put",
            "--namespace",
            ns,
            "--key",
            key,
            "--container",
            c,
            src.to_str().unwrap(),
        ],
    ))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn put_get_ls_inspect_stats() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 1, 2, 256, 10);
    let r1 = put(&root, "prod", "web-5d8f", "web-0", &src);
    assert_eq!(r1, "prod/web-5d8f/web-0@1");
    let r2 = put(&root, "prod", "web-5d8f", "web-1", &src);
    assert_eq!(r2, "prod/web-5d8f/web-1@1");
    ok(&root, &["get", &r1, p(&tmp.path().join("out"))]);
    assert_eq!(read_tree(&tmp.path().join("out")), read_tree(&src));
    let ls = ok(&root, &["ls", "prod/web-5d8f"]);
    assert!(
        ls.contains("prod/web-5d8f/web-0@1") && ls.contains("prod/web-5d8f/web-1@1"),
        "{ls}"
    );
    let ls: serde_json::Value = serde_json::from_str(&ok(&root, &["ls", "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let id = ls[0]["id"].as_str().unwrap().to_owned();
    let insp: serde_json::Value =
        serde_json::from_str(&ok(&root, &["inspect", "--json", &id[..20]])).unwrap();
    assert_eq!(insp["reference"], r1);
    assert!(insp["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["path"] == "pages-1.img"));
    let stats: serde_json::Value = serde_json::from_str(&ok(&root, &["stats", "--json"])).unwrap();
    assert_eq!(stats["checkpoints"], 2);
    let logical = stats["logical_bytes"].as_u64().unwrap();
    let stored = stats["stored_bytes"].as_u64().unwrap();
    assert!(
        stored * 18 < logical * 10,
        "identical replica deduped: {stats}"
    );
    assert!(stats["chunks"].as_u64().unwrap() > 256);
    assert!(ok(&root, &["verify"]).starts_with("ok"));
    // Errors: unknown ref, bad ref, existing destination.
    assert!(fails(
        &root,
        &["get", "prod/web-5d8f/web-9", p(&tmp.path().join("x"))]
    )
    .contains("no checkpoint"));
    assert!(fails(&root, &["get", "prod/web", p(&tmp.path().join("x"))])
        .contains("invalid checkpoint reference"));
    assert!(fails(&root, &["get", &r1, p(&tmp.path().join("out"))]).contains("already exists"));
    let help = String::from_utf8(
        Command::new(BIN)
            .args(["store", "--help"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(help.contains("NS/KEY/CONTAINER@GEN") && help.contains("blake3:HEX"));
}

/// Starts a `put` as a child process (optionally with a fault point armed).
fn spawn_put(root: &Path, c: &str, src: &Path, fault: Option<&str>) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.arg("store")
        .arg("--root")
        .arg(root)
        .args(["put", "--namespace", "ns", "--key", "t", "--container", c])
        .arg(src)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(f) = fault {
        cmd.env(runc_architect_store::fault::ENV, f);
    }
    cmd.spawn().unwrap()
}

/// After a crash: verify is clean, and the latest generation restores exactly one of the
/// sources (the one with its tag).
fn check_after_crash(
    root: &Path,
    tmp: &Path,
    sources: &[(String, Tree)],
    expect_gens: Option<u64>,
) -> u64 {
    let v = ra(root, &["verify"]);
    assert!(
        v.status.success(),
        "verify after crash: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let ls: serde_json::Value =
        serde_json::from_str(&ok(root, &["ls", "--json", "ns/t/c"])).unwrap();
    let gens = ls.as_array().unwrap().len() as u64;
    if let Some(e) = expect_gens {
        assert_eq!(gens, e);
    }
    let out = tmp.join(format!("restore-{gens}-{:x}", rand_u64()));
    ok(root, &["get", "ns/t/c", p(&out)]);
    let got = read_tree(&out);
    let tag = String::from_utf8(got["tag"].2.clone()).unwrap();
    let expected = &sources.iter().find(|(t, _)| *t == tag).unwrap().1;
    assert_eq!(&got, expected, "latest generation restores byte-exact");
    std::fs::remove_dir_all(&out).unwrap();
    gens
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(1);
    h.finish()
}

fn tagged_source(tmp: &Path, name: &str, pages: usize, seed: u64) -> (PathBuf, (String, Tree)) {
    let src = tmp.join(name);
    fake_criu_dir(&src, seed, seed, pages, 1); // every page unique: maximal writing
    std::fs::write(src.join("tag"), name).unwrap();
    let tree = read_tree(&src);
    (src, (name.to_owned(), tree))
}

#[test]
fn sigkill_at_random_moments() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (small, s0) = tagged_source(tmp.path(), "gen1", 64, 1);
    let (big, s1) = tagged_source(tmp.path(), "big", 8192, 2); // 32 MiB
    let sources = vec![s0, s1];
    put(&root, "ns", "t", "c", &small);
    // How long does a full put take here?
    let t = Instant::now();
    let mut child = spawn_put(&root, "probe", &big, None);
    assert!(child.wait().unwrap().success());
    let full = t.elapsed();
    let seed = rand_u64();
    eprintln!("sigkill test: a full put takes {full:?}; seed {seed}");
    let mut x = seed | 1;
    let mut completed = 0;
    for i in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_micros(x % (full.as_micros() as u64 * 11 / 10 + 1));
        let mut child = spawn_put(&root, "c", &big, None);
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            completed += 1;
        }
        let gens = check_after_crash(&root, tmp.path(), &sources, None);
        eprintln!(
            "kill {i} after {delay:?}: completed={} generations={gens}",
            status.success()
        );
    }
    // Orphans of the killed writers go with gc; the store stays sound. (A writer killed
    // after its commit point but before exiting counts as stored.)
    let gc = ok(&root, &["gc"]);
    assert!(gc.contains("gc:"), "{gc}");
    assert!(files_in(&root.join("tmp")).is_empty());
    let gens = check_after_crash(&root, tmp.path(), &sources, None);
    assert!(
        gens > completed,
        "{gens} generations, {completed} completed puts"
    );
}

#[test]
fn abort_at_every_fault_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (g1, s1) = tagged_source(tmp.path(), "gen1", 64, 1);
    let (g2, s2) = tagged_source(tmp.path(), "gen2", 512, 2);
    let sources = vec![s1, s2];
    put(&root, "ns", "t", "c", &g1);
    let mut gens = 1;
    let points = [
        "pack-append:2",
        "pack-synced",
        "packs-published",
        "manifest-published",
        "generation-published",
        "latest-published",
    ];
    for point in points {
        let out = spawn_put(&root, "c", &g2, Some(point))
            .wait_with_output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{point}: the writer should have died"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("fault injection"),
            "{point}"
        );
        if point == "latest-published" {
            gens += 1; // the commit point was passed
        }
        let found = check_after_crash(&root, tmp.path(), &sources, Some(gens));
        assert_eq!(found, gens, "{point}");
    }
    let ls: serde_json::Value = serde_json::from_str(&ok(&root, &["ls", "--json"])).unwrap();
    assert_eq!(
        ls[1]["reference"], "ns/t/c@2",
        "the leftover of the dead writer was replaced"
    );
    assert_eq!(ls[1]["latest"], true);
    let gc = ok(&root, &["gc"]);
    assert!(gc.contains("temp files"), "{gc}");
    assert!(ok(&root, &["verify"]).starts_with("ok"));

    // gc crashing in the middle of a repack.
    let (g3, s3) = tagged_source(tmp.path(), "gen3", 64, 3);
    let sources = vec![sources[0].clone(), sources[1].clone(), s3];
    put(&root, "ns", "t", "c", &g3);
    for point in ["gc-repack-published", "gc-manifest-rewritten"] {
        let out = Command::new(BIN)
            .args([
                "store",
                "--root",
                p(&root),
                "gc",
                "--keep-last",
                "1",
                "--repack-threshold",
                "1",
            ])
            .env(runc_architect_store::fault::ENV, point)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}");
        check_after_crash(&root, tmp.path(), &sources, None);
    }
    ok(&root, &["gc", "--keep-last", "1"]);
    check_after_crash(&root, tmp.path(), &sources, Some(1));
}

#[test]
fn concurrent_put_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let mut sources = Vec::new();
    let mut children = Vec::new();
    for i in 0..4 {
        let (src, s) = tagged_source(tmp.path(), &format!("w{i}"), 512, 10 + i);
        sources.push(s);
        children.push(spawn_put(&root, "c", &src, None));
    }
    let mut refs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            last_line(&String::from_utf8(out.stdout).unwrap())
        })
        .collect();
    refs.sort();
    assert_eq!(refs, vec!["ns/t/c@1", "ns/t/c@2", "ns/t/c@3", "ns/t/c@4"]);
    assert!(ok(&root, &["verify"]).starts_with("ok"));
    let mut tags = Vec::new();
    for r in &refs {
        let out = tmp.path().join(r.replace(['/', '@'], "_"));
        ok(&root, &["get", r, p(&out)]);
        let got = read_tree(&out);
        let tag = String::from_utf8(got["tag"].2.clone()).unwrap();
        assert_eq!(got, sources.iter().find(|(t, _)| *t == tag).unwrap().1);
        tags.push(tag);
    }
    tags.sort();
    tags.dedup();
    assert_eq!(tags.len(), 4);
}

#[test]
fn corruption_is_reported_by_verify_and_get() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 1, 1, 16, 0);
    let r = put(&root, "ns", "t", "c", &src);
    let pack = files_in(&root.join("packs")).remove(0);
    let orig = std::fs::read(&pack).unwrap();
    let mut bad = orig.clone();
    bad[16 + 4096 * 3 + 100] ^= 0xff; // inside the 4th page
    std::fs::write(&pack, &bad).unwrap();
    let err = fails(&root, &["verify"]);
    assert!(
        err.contains("problem: pack") && err.contains("do not match"),
        "{err}"
    );
    let dest = tmp.path().join("out");
    let err = fails(&root, &["get", &r, p(&dest)]);
    assert!(
        err.contains("checkpoint ns/t/c@1") && err.contains("chunk") && err.contains("pages-1.img"),
        "{err}"
    );
    assert!(!dest.exists(), "nothing usable written");
    assert!(std::fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".out")));
    let err = fails(&root, &["export", &r, p(&tmp.path().join("a.tar"))]);
    assert!(err.contains("corrupt"), "{err}");
    assert!(!tmp.path().join("a.tar").exists());
    std::fs::write(&pack, &orig).unwrap();

    let m = files_in(&root.join("manifests")).remove(0);
    let orig = std::fs::read(&m).unwrap();
    let mut bad = orig.clone();
    bad[orig.len() / 2] ^= 1;
    std::fs::write(&m, &bad).unwrap();
    assert!(fails(&root, &["verify"]).contains("manifest"));
    assert!(fails(&root, &["get", &r, p(&dest)]).contains("manifest"));
    assert!(!dest.exists());
    std::fs::write(&m, &orig).unwrap();
    ok(&root, &["get", &r, p(&dest)]);
}

#[test]
fn keys_and_encryption() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let ka = tmp.path().join("a.key");
    let kb = tmp.path().join("b.key");
    ok(&root, &["keygen", p(&ka)]);
    ok(&root, &["keygen", p(&kb)]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&ka).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 1, 1, 64, 0);
    let kfa = format!("sec={}", p(&ka));
    let kfb = format!("sec={}", p(&kb));
    let out = ok(
        &root,
        &[
            "--key-file",
            &kfa,
            "put",
            "-n",
            "sec",
            "-k",
            "t",
            "-c",
            "c",
            p(&src),
        ],
    );
    let r = last_line(&out);
    let dest = tmp.path().join("out");
    let err = fails(&root, &["--key-file", &kfb, "get", &r, p(&dest)]);
    assert!(err.contains("wrong key for namespace sec"), "{err}");
    let err = fails(&root, &["get", &r, p(&dest)]);
    assert!(
        err.contains("encrypted") && err.contains("no key is configured"),
        "{err}"
    );
    assert!(!dest.exists());
    // Without the key verify still checks the stored bytes; with it, it decrypts them too.
    assert!(ok(&root, &["verify"]).starts_with("ok"));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&root, &["--key-file", &kfa, "verify", "--json"])).unwrap();
    assert_eq!(v["decrypted_chunks"], 69);
    ok(&root, &["--key-file", &kfa, "get", &r, p(&dest)]);
    assert_eq!(read_tree(&dest), read_tree(&src));
    // A config file works the same way.
    let cfg = tmp.path().join("store.toml");
    std::fs::write(
        &cfg,
        format!(
            "root = {:?}\n[keys]\nsec = {:?}\n[retention]\nkeep_last = 1\n",
            p(&root),
            p(&ka)
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "store",
            "--config",
            p(&cfg),
            "put",
            "-n",
            "sec",
            "-k",
            "t",
            "-c",
            "c",
            p(&src),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["store", "--config", p(&cfg), "gc"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed sec/t/c@1"));
}

#[test]
fn export_import_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 1, 1, 32, 0);
    let r = last_line(&ok(
        &root,
        &[
            "put",
            "-n",
            "prod",
            "-k",
            "web",
            "-c",
            "app",
            "--label",
            "image=app:1",
            p(&src),
        ],
    ));
    let tar = tmp.path().join("ckpt.tar");
    ok(&root, &["export", &r, p(&tar)]);
    let other = tmp.path().join("other");
    let out = ok(&other, &["import", p(&tar)]);
    assert_eq!(last_line(&out), "prod/web/app@1");
    let dest = tmp.path().join("out");
    ok(&other, &["get", "prod/web/app", p(&dest)]);
    let got = read_tree(&dest);
    for (path, (_, _, data)) in read_tree(&src) {
        assert_eq!(got[&format!("checkpoint/{path}")].2, data);
    }
    let cfg: serde_json::Value = serde_json::from_slice(&got["config.dump"].2).unwrap();
    assert_eq!(cfg["name"], "app");
    assert_eq!(cfg["rootfsImageName"], "app:1");
    let out = ok(
        &other,
        &["import", "-n", "x", "-k", "y", "-c", "z", p(&tar)],
    );
    assert_eq!(last_line(&out), "x/y/z@1");
}

#[test]
fn gc_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    for g in 0..4 {
        let src = tmp.path().join(format!("s{g}"));
        fake_criu_dir(&src, 1, g + 1, 64, 2);
        put(&root, "ns", "t", "c", &src);
    }
    let out = ok(&root, &["gc", "--keep-last", "2", "--dry-run"]);
    assert!(
        out.contains("would have removed ns/t/c@2") && out.contains("would have removed ns/t/c@1"),
        "{out}"
    );
    let out = ok(&root, &["gc", "--keep-last", "2", "--json"]);
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["removed_checkpoints"].as_array().unwrap().len(), 2);
    assert!(ok(&root, &["verify"]).starts_with("ok"));
    let out = ok(&root, &["gc", "--max-age", "0s"]);
    assert!(out.contains("removed ns/t/c@4"), "{out}");
    let stats: serde_json::Value = serde_json::from_str(&ok(&root, &["stats", "--json"])).unwrap();
    assert_eq!(stats["stored_bytes"], 0);
    assert!(fails(&root, &["gc", "--max-bytes", "lots"]).contains("bad size"));
}
