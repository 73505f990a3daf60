//! Integration tests of the store library: round trips, dedup, corruption, full disk,
//! concurrency, encryption, garbage collection, archives.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use runc_architect_store::{
    CheckpointKey, GcOptions, MaterializeOptions, Reference, RetentionPolicy, Store, StoreError,
};

fn key(ns: &str, t: &str, c: &str) -> CheckpointKey {
    CheckpointKey::new(ns, t, c).unwrap()
}

fn r(s: &str) -> Reference {
    s.parse().unwrap()
}

fn get(store: &Store, reference: &str, dest: &Path) -> Result<Tree, StoreError> {
    store.materialize(&r(reference), dest, &MaterializeOptions::default())?;
    Ok(read_tree(dest))
}

// ---------------------------------------------------------------- round trips

/// A random tree: nested dirs, page images (with repeated pages), small and large files,
/// empty files, odd modes and symlinks.
fn tree_strategy() -> impl Strategy<Value = Vec<(u8, u8, u8, u32, u64, u8)>> {
    prop::collection::vec(
        (0u8..4, 0u8..6, 0u8..4, 0u32..700_000, any::<u64>(), 0u8..4),
        0..10,
    )
}

fn build_tree(root: &Path, spec: &[(u8, u8, u8, u32, u64, u8)]) {
    std::fs::create_dir_all(root).unwrap();
    let dirs = ["", "checkpoint", "checkpoint/sub", "rootfs"];
    let modes = [0o600, 0o644, 0o400, 0o755];
    for (i, &(d, n, kind, size, seed, m)) in spec.iter().enumerate() {
        let dir = root.join(dirs[d as usize]);
        std::fs::create_dir_all(&dir).unwrap();
        let name = match n {
            0 => format!("pages-{i}.img"),
            1 => format!("core-{i}.img"),
            2 => format!("rootfs-diff-{i}.tar"),
            3 => format!("empty-{i}"),
            4 => format!("link-{i}"),
            _ => format!("f{i}"),
        };
        let path = dir.join(&name);
        if n == 4 {
            std::os::unix::fs::symlink(format!("../target-{seed}"), &path).unwrap();
            continue;
        }
        let size = match (n, kind) {
            (3, _) => 0,
            (_, 0) => size % 5000,
            (_, 1) => (size % 64) * 4096,
            _ => size as usize as u32,
        } as usize;
        let mut data = vec![0u8; size];
        // Pages repeat: page k takes seed (seed + k % 5).
        for (k, page) in data.chunks_mut(4096).enumerate() {
            if kind == 2 && k % 3 == 0 {
                continue; // zero pages
            }
            fill_random(seed.wrapping_add((k % 5) as u64), page);
        }
        std::fs::write(&path, &data).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(modes[m as usize]))
            .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn prop_round_trip_byte_exact(spec in tree_strategy(), encrypted in any::<bool>()) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        build_tree(&src, &spec);
        let keys: Vec<(&str, [u8; 32])> = if encrypted { vec![("ns", [9; 32])] } else { vec![] };
        let store = open_store(&tmp.path().join("store"), &keys);
        let out = store.put_dir(&key("ns", "t", "c"), &src, BTreeMap::new()).unwrap();
        prop_assert_eq!(&out.reference, "ns/t/c@1");
        let got = get(&store, "ns/t/c", &tmp.path().join("out")).unwrap();
        prop_assert_eq!(got, read_tree(&src));
        // A second generation of the same tree stores no new chunk.
        let again = store.put_dir(&key("ns", "t", "c"), &src, BTreeMap::new()).unwrap();
        prop_assert_eq!(again.new_chunks, 0);
        let rep = store.verify().unwrap();
        prop_assert!(rep.is_ok(), "{:?}", rep.problems);
    }
}

#[test]
fn writer_api_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(&tmp.path().join("store"), &[]);
    let mut meta = BTreeMap::new();
    meta.insert("image".to_string(), "busybox:1".to_string());
    let mut w = store.writer(&key("ns", "t", "c"), meta.clone()).unwrap();
    w.add_bytes(
        "checkpoint/pages-1.img",
        0o600,
        &random_bytes(1, 3 * 4096 + 7),
    )
    .unwrap();
    w.add_bytes("config.dump", 0o600, b"{}").unwrap();
    w.add_symlink("checkpoint/link", "pages-1.img").unwrap();
    assert!(
        w.add_bytes("config.dump", 0o600, b"x").is_err(),
        "duplicate path"
    );
    assert!(
        w.add_bytes("../evil", 0o600, b"x").is_err(),
        "escaping path"
    );
    let out = w.commit().unwrap();
    let insp = store.inspect(&r(&out.reference)).unwrap();
    assert_eq!(insp.body.metadata, meta);
    assert_eq!(insp.chunks, 5);
    let by_id = store
        .resolve(&r(&format!("blake3:{}", &out.id.to_hex()[..10])))
        .unwrap();
    assert_eq!(by_id.generation, 1);
    // An abandoned writer leaves nothing behind.
    let mut w = store.writer(&key("ns", "t", "c"), BTreeMap::new()).unwrap();
    w.add_bytes("pages-9.img", 0o600, &random_bytes(2, 64 * 4096))
        .unwrap();
    drop(w);
    assert!(files_in(&store.root().join("tmp")).is_empty());
    assert_eq!(store.list(None, None, None).unwrap().len(), 1);
    assert_eq!(files_in(&store.root().join("packs")).len(), 1);
}

#[test]
fn store_modes_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = open_store(&root, &[]);
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 1, 1, 8, 0);
    store
        .put_dir(&key("ns", "t", "c"), &src, BTreeMap::new())
        .unwrap();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            let mode = m.permissions().mode() & 0o777;
            if m.is_dir() {
                assert_eq!(mode, 0o700, "{}", e.path().display());
                stack.push(e.path());
            } else {
                assert_eq!(mode, 0o600, "{}", e.path().display());
            }
            assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 0);
        }
    }
}

// ---------------------------------------------------------------- dedup

#[test]
fn dedup_across_replicas_and_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(&tmp.path().join("store"), &[]);
    let pages = 1024; // 4 MiB
    let mut logical = 0;
    for rep in 0..5u64 {
        let src = tmp.path().join(format!("r{rep}"));
        fake_criu_dir(&src, 42, rep + 1, pages, 33); // ~3% unique pages
        let out = store
            .put_dir(
                &key("ns", "web-5d8f", &format!("web-{rep}")),
                &src,
                BTreeMap::new(),
            )
            .unwrap();
        logical += out.logical_bytes;
        if rep > 0 {
            // Its own unique pages, plus the shared pages that were unique in replica 0.
            assert!(
                out.new_chunks < (pages / 10) as u64,
                "replica {rep} stored {} new chunks",
                out.new_chunks
            );
        }
    }
    let s = store.stats().unwrap();
    assert_eq!(s.checkpoints, 5);
    assert_eq!(s.logical_bytes, logical);
    let one = logical / 5;
    let ratio = s.stored_bytes as f64 / one as f64;
    assert!(ratio < 1.5, "5 replicas take {ratio:.2}x one checkpoint");
    // A later generation of one container shares almost everything with the previous one.
    let src = tmp.path().join("gen2");
    fake_criu_dir(&src, 42, 77, pages, 50);
    let out = store
        .put_dir(&key("ns", "web-5d8f", "web-0"), &src, BTreeMap::new())
        .unwrap();
    assert_eq!(out.generation, 2);
    assert!(out.new_chunks < (pages / 20) as u64);
    // Another template does not dedup against this one (scope), but is correct.
    let out = store
        .put_dir(&key("ns", "other", "x"), &src, BTreeMap::new())
        .unwrap();
    assert_eq!(out.new_chunks, out.chunks - (out.chunks - out.new_chunks));
    let got = get(&store, "ns/other/x", &tmp.path().join("o")).unwrap();
    assert_eq!(got, read_tree(&src));
}

// ---------------------------------------------------------------- corruption

#[test]
fn any_flipped_byte_is_caught_by_verify_and_get() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(&tmp.path().join("store"), &[]);
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 5, 6, 6, 0);
    store
        .put_dir(&key("ns", "t", "c"), &src, BTreeMap::new())
        .unwrap();
    let expected = read_tree(&src);
    let pack = files_in(&store.root().join("packs")).remove(0);
    let manifest = files_in(&store.root().join("manifests")).remove(0);
    let gen = store.root().join("index/ns/t/c/gen-0000000001");
    let out = tmp.path().join("out");

    let check = |file: &Path, pos: usize, get_must_fail: bool| {
        let orig = std::fs::read(file).unwrap();
        let mut bad = orig.clone();
        bad[pos] ^= 0x10;
        std::fs::write(file, &bad).unwrap();
        let rep = store.verify().unwrap();
        assert!(
            !rep.is_ok(),
            "verify missed a flip at {pos} of {}",
            file.display()
        );
        let res = store.materialize(&r("ns/t/c@1"), &out, &MaterializeOptions::default());
        if get_must_fail {
            let err = res.expect_err("get returned data despite a flipped byte");
            assert!(
                err.is_integrity_error() || matches!(err, StoreError::NotFound { .. }),
                "unexpected error {err}"
            );
            let msg = err.to_string();
            if file == pack.as_path() {
                assert!(msg.contains("ns/t/c@1") && msg.contains("chunk"), "{msg}");
            }
            assert!(!out.exists(), "partial output left behind");
        } else if res.is_ok() {
            // Pack metadata outside any chunk: the bytes handed out must still be right.
            assert_eq!(read_tree(&out), expected);
            std::fs::remove_dir_all(&out).unwrap();
        }
        std::fs::write(file, &orig).unwrap();
    };

    let pack_len = std::fs::metadata(&pack).unwrap().len() as usize;
    let data_end = 16 + 6 * 4096 + 230 + 2613 + 1421 + 9 + 26; // header + chunk bytes
                                                               // Every header byte, a spread of chunk bytes, every entry-table and footer byte.
    for pos in (0..16)
        .chain((16..data_end).step_by(397))
        .chain(data_end..pack_len)
    {
        check(&pack, pos, (16..data_end).contains(&pos));
    }
    for pos in 0..std::fs::metadata(&manifest).unwrap().len() as usize {
        check(&manifest, pos, true);
    }
    for pos in 0..std::fs::metadata(&gen).unwrap().len() as usize {
        check(&gen, pos, true);
    }
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(get(&store, "ns/t/c@1", &out).unwrap(), expected);
}

#[test]
fn truncated_or_missing_pack_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(&tmp.path().join("store"), &[]);
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 5, 6, 6, 0);
    store
        .put_dir(&key("ns", "t", "c"), &src, BTreeMap::new())
        .unwrap();
    let pack = files_in(&store.root().join("packs")).remove(0);
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(100).unwrap();
    assert!(!store.verify().unwrap().is_ok());
    let err = store
        .materialize(&r("ns/t/c"), &tmp.path().join("o"), &Default::default())
        .unwrap_err();
    assert!(err.is_integrity_error(), "{err}");
    std::fs::remove_file(&pack).unwrap();
    let err = store
        .materialize(&r("ns/t/c"), &tmp.path().join("o"), &Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(!tmp.path().join("o").exists());
}

// ---------------------------------------------------------------- full disk

#[test]
fn full_disk_leaves_previous_generation_restorable() {
    let fs = Tmpfs::mount("4m");
    let root = fs.path().join("store");
    let store = open_store(&root, &[]);
    let small = fs.path().join("small");
    fake_criu_dir(&small, 1, 1, 64, 0); // 256 KiB
    store
        .put_dir(&key("ns", "t", "c"), &small, BTreeMap::new())
        .unwrap();
    let expected = read_tree(&small);
    std::fs::remove_dir_all(&small).unwrap();

    let work = tempfile::tempdir().unwrap();
    let big = work.path().join("big");
    fake_criu_dir(&big, 2, 2, 2048, 1); // 8 MiB of unique pages: cannot fit
    let err = store
        .put_dir(&key("ns", "t", "c"), &big, BTreeMap::new())
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("no space"));
    // Nothing partial is visible or left behind, and the previous generation restores.
    assert!(files_in(&root.join("tmp")).is_empty());
    assert_eq!(store.list(None, None, None).unwrap().len(), 1);
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(
        get(&store, "ns/t/c", &work.path().join("o")).unwrap(),
        expected
    );
    // The space came back: a small put fits again.
    let small2 = work.path().join("small2");
    fake_criu_dir(&small2, 1, 3, 64, 4);
    let out = store
        .put_dir(&key("ns", "t", "c"), &small2, BTreeMap::new())
        .unwrap();
    assert_eq!(out.generation, 2);
    assert_eq!(
        get(&store, "ns/t/c@2", &work.path().join("o2")).unwrap(),
        read_tree(&small2)
    );
}

// ---------------------------------------------------------------- concurrency

#[test]
fn concurrent_writers_of_one_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    drop(open_store(&root, &[]));
    let mut sources = BTreeMap::new();
    for t in 0..4u64 {
        for i in 0..3u64 {
            let src = tmp.path().join(format!("src-{t}-{i}"));
            fake_criu_dir(&src, 9, t * 10 + i + 1, 128, 3);
            std::fs::write(src.join("tag"), format!("{t}-{i}")).unwrap();
            sources.insert(format!("{t}-{i}"), read_tree(&src));
        }
    }
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let root = root.clone();
            let base = tmp.path().to_owned();
            std::thread::spawn(move || {
                let store = open_store(&root, &[]); // one instance per thread, like processes
                for i in 0..3u64 {
                    store
                        .put_dir(
                            &key("ns", "t", "c"),
                            &base.join(format!("src-{t}-{i}")),
                            BTreeMap::new(),
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let store = open_store(&root, &[]);
    let list = store.list(None, None, None).unwrap();
    assert_eq!(
        list.iter().map(|c| c.generation).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert!(store.verify().unwrap().is_ok());
    let mut seen = std::collections::BTreeSet::new();
    for g in 1..=12 {
        let got = get(
            &store,
            &format!("ns/t/c@{g}"),
            &tmp.path().join(format!("o{g}")),
        )
        .unwrap();
        let tag = String::from_utf8(got["tag"].2.clone()).unwrap();
        assert_eq!(got, sources[&tag]);
        seen.insert(tag);
    }
    assert_eq!(seen.len(), 12);
}

#[test]
fn gc_waits_for_a_writer_in_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = open_store(&root, &[]);
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 1, 1, 64, 0);
    store
        .put_dir(&key("ns", "t", "a"), &src, BTreeMap::new())
        .unwrap();
    // A writer dedups against generation 1 of "a" ... while gc wants to drop everything.
    let mut w = store.writer(&key("ns", "t", "b"), BTreeMap::new()).unwrap();
    w.add_tree("", &src).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let gc = {
        let root = root.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let store = open_store(&root, &[]);
            let opts = GcOptions {
                policy: RetentionPolicy {
                    max_age: Some(Duration::ZERO),
                    ..Default::default()
                },
                dry_run: false,
                ..Default::default()
            };
            let rep = store.gc(&opts).unwrap();
            done.store(true, Ordering::SeqCst);
            rep
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "gc ran while a writer held the store"
    );
    let out = w.commit().unwrap();
    assert_eq!(out.new_chunks, 0, "the writer deduped against generation 1");
    let rep = gc.join().unwrap();
    // gc ran after the commit, so it saw (and, with max_age 0, removed) both.
    assert_eq!(rep.removed_checkpoints.len(), 2);
    assert!(store.verify().unwrap().is_ok());
}

// ---------------------------------------------------------------- encryption

#[test]
fn encryption_keys_dedup_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let key_a = [1u8; 32];
    let store = open_store(&root, &[("sec", key_a), ("sec2", key_a)]);
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 3, 4, 64, 0);
    let marker = b"TOP-SECRET-MARKER-0123456789";
    std::fs::write(src.join("secret"), marker).unwrap();
    let out1 = store
        .put_dir(&key("sec", "t", "c1"), &src, BTreeMap::new())
        .unwrap();
    // Convergent within a namespace: a replica stores nothing new.
    let out2 = store
        .put_dir(&key("sec", "t", "c2"), &src, BTreeMap::new())
        .unwrap();
    assert_eq!(out2.new_chunks, 0);
    // Never across namespaces, even with the same key file.
    let out3 = store
        .put_dir(&key("sec2", "t", "c1"), &src, BTreeMap::new())
        .unwrap();
    assert_eq!(out3.new_chunks, out1.new_chunks);
    // No plaintext at rest.
    for p in files_in(&root.join("packs"))
        .into_iter()
        .chain(files_in(&root.join("manifests")))
    {
        let data = std::fs::read(&p).unwrap();
        assert!(
            !data.windows(marker.len()).any(|w| w == marker),
            "plaintext in {}",
            p.display()
        );
        assert!(
            !data.windows(11).any(|w| w == b"pages-1.img"),
            "file name in {}",
            p.display()
        );
    }
    assert_eq!(
        get(&store, "sec/t/c2", &tmp.path().join("o")).unwrap(),
        read_tree(&src)
    );
    assert!(store.verify().unwrap().is_ok());

    // Wrong key.
    std::fs::remove_dir_all(tmp.path().join("o")).unwrap();
    let wrong = open_store(&root, &[("sec", [2u8; 32])]);
    let err = get(&wrong, "sec/t/c1", &tmp.path().join("o")).unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("wrong key for namespace sec"));
    let err = wrong
        .put_dir(&key("sec", "t", "c3"), &src, BTreeMap::new())
        .unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
    // Missing key.
    let none = open_store(&root, &[]);
    let err = get(&none, "sec/t/c1", &tmp.path().join("o")).unwrap_err();
    assert!(matches!(err, StoreError::MissingKey { .. }), "{err}");
    let err = none
        .put_dir(&key("sec", "t", "c3"), &src, BTreeMap::new())
        .unwrap_err();
    assert!(matches!(err, StoreError::MissingKey { .. }), "{err}");
    // A key for a plaintext namespace.
    none.put_dir(&key("plain", "t", "c"), &src, BTreeMap::new())
        .unwrap();
    let keyed = open_store(&root, &[("plain", key_a)]);
    let err = keyed
        .put_dir(&key("plain", "t", "c"), &src, BTreeMap::new())
        .unwrap_err();
    assert!(matches!(err, StoreError::UnexpectedKey { .. }), "{err}");
    assert!(!tmp.path().join("o").exists());

    // A tampered encrypted chunk fails authentication (and verify sees it without the key).
    let info = store.resolve(&r("sec2/t/c1")).unwrap();
    let insp = store.inspect(&r("sec2/t/c1")).unwrap();
    let pack = root.join("packs").join(format!("{}.pack", insp.packs[0]));
    let mut data = std::fs::read(&pack).unwrap();
    data[16 + 5000] ^= 1;
    std::fs::write(&pack, &data).unwrap();
    let err = get(&store, &info.reference(), &tmp.path().join("o")).unwrap_err();
    assert!(matches!(err, StoreError::CorruptChunk(_)), "{err}");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(!none.verify().unwrap().is_ok());
    assert!(!tmp.path().join("o").exists());
}

// ---------------------------------------------------------------- gc

#[test]
fn gc_retention_and_repack() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(&tmp.path().join("store"), &[]);
    let mut trees = Vec::new();
    // Five generations: each rewrites a quarter of the pages (page i changes in the
    // generations g with g % 4 == i % 4), so each shares 3/4 with the previous one.
    for g in 1..=5u64 {
        let src = tmp.path().join(format!("g{g}"));
        std::fs::create_dir_all(&src).unwrap();
        let mut mem = vec![0u8; 256 * 4096];
        for (i, p) in mem.chunks_mut(4096).enumerate() {
            let version = (0..=g)
                .rev()
                .find(|v| *v > 0 && v % 4 == i as u64 % 4)
                .unwrap_or(0);
            fill_random(version * 100_000 + i as u64, p);
        }
        std::fs::write(src.join("pages-1.img"), &mem).unwrap();
        std::fs::write(src.join("core-1.img"), format!("gen {g}")).unwrap();
        store
            .put_dir(&key("ns", "t", "c"), &src, BTreeMap::new())
            .unwrap();
        trees.push(read_tree(&src));
    }
    let before = store.stats().unwrap();
    let dry = store
        .gc(&GcOptions {
            policy: RetentionPolicy {
                keep_last: Some(2),
                ..Default::default()
            },
            dry_run: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        dry.removed_checkpoints,
        vec!["ns/t/c@3", "ns/t/c@2", "ns/t/c@1"]
    );
    assert_eq!(store.stats().unwrap(), before, "dry run changed nothing");

    let rep = store
        .gc(&GcOptions {
            policy: RetentionPolicy {
                keep_last: Some(2),
                ..Default::default()
            },
            dry_run: false,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rep.removed_checkpoints.len(), 3);
    // Generation 1's pack is 3/4 dead (only its version-1 pages are still used): repacked.
    assert_eq!(
        (rep.packs_removed, rep.packs_repacked, rep.chunks_moved),
        (0, 1, 64),
        "{rep:?}"
    );
    let after = store.stats().unwrap();
    assert_eq!(after.checkpoints, 2);
    // 512 stored pages before, 320 live after.
    assert!(
        after.stored_bytes * 10 < before.stored_bytes * 7,
        "{before:?} -> {after:?}"
    );
    assert!(store.verify().unwrap().is_ok());
    for g in [4, 5] {
        let got = get(
            &store,
            &format!("ns/t/c@{g}"),
            &tmp.path().join(format!("o{g}")),
        )
        .unwrap();
        assert_eq!(got, trees[g - 1]);
    }
    assert!(store.resolve(&r("ns/t/c@3")).is_err());
    assert_eq!(store.resolve(&r("ns/t/c")).unwrap().generation, 5);

    // Quota: the older one goes first, then (if still over) the latest too.
    let rep = store
        .gc(&GcOptions {
            policy: RetentionPolicy {
                max_bytes: Some(after.stored_bytes * 9 / 10), // gen 5 alone is ~256 of 320 pages
                ..Default::default()
            },
            dry_run: false,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rep.removed_checkpoints, vec!["ns/t/c@4"]);
    assert_eq!(store.resolve(&r("ns/t/c")).unwrap().generation, 5);
    let rep = store
        .gc(&GcOptions {
            policy: RetentionPolicy {
                max_bytes: Some(1000),
                ..Default::default()
            },
            dry_run: false,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rep.removed_checkpoints, vec!["ns/t/c@5"]);
    let s = store.stats().unwrap();
    assert_eq!(
        (s.checkpoints, s.packs, s.manifests, s.stored_bytes),
        (0, 0, 0, 0)
    );
    assert!(store.verify().unwrap().is_ok());
}

/// A deleted container's checkpoints are forgotten: all its generations and the chunks only
/// they used go; a sibling's checkpoint (sharing chunks with it) stays whole.
#[test]
fn gc_forgets_a_container() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(&tmp.path().join("store"), &[]);
    let shared = random_bytes(1, 64 * 4096);
    let mut sibling = None;
    for (c, seed) in [("gone", 2u64), ("kept", 3)] {
        for g in 0..2u64 {
            let src = tmp.path().join(format!("{c}{g}"));
            std::fs::create_dir_all(&src).unwrap();
            let mut pages = shared.clone();
            pages.extend(random_bytes(seed * 10 + g, 64 * 4096));
            std::fs::write(src.join("pages-1.img"), &pages).unwrap();
            store
                .put_dir(&key("ns", "t", c), &src, BTreeMap::new())
                .unwrap();
            if c == "kept" {
                sibling = Some(read_tree(&src));
            }
        }
    }
    let before = store.stats().unwrap();
    let rep = store
        .gc(&GcOptions {
            forget: vec![key("ns", "t", "gone")],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rep.removed_checkpoints, vec!["ns/t/gone@2", "ns/t/gone@1"]);
    assert!(store
        .list(Some("ns"), None, Some("gone"))
        .unwrap()
        .is_empty());
    let after = store.stats().unwrap();
    assert_eq!(after.checkpoints, 2);
    // Its manifests and the pack only it used are gone (a pack it shares with the sibling
    // stays until repacking finds it mostly dead); the shared pages are there for the sibling.
    assert_eq!(after.manifests, 2, "{after:?}");
    assert!(after.packs < before.packs, "{before:?} -> {after:?}");
    assert!(
        after.stored_bytes < before.stored_bytes * 5 / 6,
        "{before:?} -> {after:?}"
    );
    let out = tmp.path().join("out");
    get(&store, "ns/t/kept", &out).unwrap();
    assert_eq!(read_tree(&out), sibling.unwrap());
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn gc_removes_orphans_of_crashed_writers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = open_store(&root, &[]);
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 1, 1, 16, 0);
    store
        .put_dir(&key("ns", "t", "c"), &src, BTreeMap::new())
        .unwrap();
    // Leftovers a SIGKILLed writer could leave: a temp file, an unpublished pack copy, an
    // orphan manifest.
    std::fs::write(root.join("tmp/.tmp-1-2-3-x.pack"), b"partial").unwrap();
    let pack = files_in(&root.join("packs")).remove(0);
    std::fs::copy(
        &pack,
        root.join("packs/0123456789abcdef0123456789abcdef.pack"),
    )
    .unwrap();
    let m = files_in(&root.join("manifests")).remove(0);
    let data = std::fs::read(&m).unwrap();
    std::fs::write(
        root.join(
            "manifests/1111111111111111111111111111111111111111111111111111111111111111.manifest",
        ),
        &data,
    )
    .unwrap();
    let rep = store.gc(&GcOptions::default()).unwrap();
    assert_eq!(
        (
            rep.temp_files_removed,
            rep.packs_removed,
            rep.manifests_removed
        ),
        (1, 1, 1)
    );
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(
        get(&store, "ns/t/c", &tmp.path().join("o")).unwrap(),
        read_tree(&src)
    );
}

// ---------------------------------------------------------------- archives

fn tar_members(path: &Path) -> BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut ar = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e
            .path()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(p, data);
    }
    out
}

#[test]
fn export_import_kubernetes_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(&tmp.path().join("store"), &[]);
    let src = tmp.path().join("src");
    fake_criu_dir(&src, 1, 2, 32, 0);
    let mut meta = BTreeMap::new();
    meta.insert("image".into(), "registry.invalid/app:1".into());
    store
        .put_dir(&key("prod", "web-5d8f", "web-0"), &src, meta)
        .unwrap();
    let tar1 = tmp.path().join("a.tar");
    store.export(&r("prod/web-5d8f/web-0"), &tar1).unwrap();
    let members = tar_members(&tar1);
    assert!(members.contains_key("checkpoint"));
    assert_eq!(
        members["checkpoint/pages-1.img"],
        std::fs::read(src.join("pages-1.img")).unwrap()
    );
    let cfg: serde_json::Value = serde_json::from_slice(&members["config.dump"]).unwrap();
    assert_eq!(cfg["name"], "web-0");
    assert_eq!(cfg["rootfsImageName"], "registry.invalid/app:1");
    assert!(cfg["createdTime"].as_str().unwrap().ends_with('Z'));
    let spec: serde_json::Value = serde_json::from_slice(&members["spec.dump"]).unwrap();
    assert_eq!(
        spec["annotations"]["io.kubernetes.cri.container-name"],
        "web-0"
    );
    assert_eq!(
        spec["annotations"]["io.kubernetes.cri.sandbox-namespace"],
        "prod"
    );

    // Import into another store: the key comes from the annotations.
    let other = open_store(&tmp.path().join("other"), &[]);
    let out = other.import(&tar1, None).unwrap();
    assert_eq!(out.reference, "prod/web-5d8f/web-0@1");
    let insp = other.inspect(&r(&out.reference)).unwrap();
    assert_eq!(insp.body.metadata["image"], "registry.invalid/app:1");
    let got = get(&other, &out.reference, &tmp.path().join("o")).unwrap();
    for (p, (_, _, data)) in read_tree(&src) {
        assert_eq!(got[&format!("checkpoint/{p}")].2, data);
    }
    // Exporting the imported checkpoint gives the same members.
    let tar2 = tmp.path().join("b.tar");
    other.export(&r(&out.reference), &tar2).unwrap();
    assert_eq!(tar_members(&tar2), members);
    // Explicit key; not-an-archive errors.
    let out = other.import(&tar1, Some(&key("x", "y", "z"))).unwrap();
    assert_eq!(out.reference, "x/y/z@1");
    std::fs::write(tmp.path().join("bad.tar"), b"not a tar").unwrap();
    assert!(other.import(&tmp.path().join("bad.tar"), None).is_err());
}
