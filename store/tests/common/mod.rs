//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use runc_architect_store::{Store, StoreConfig};

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for hundreds of MiB.
pub fn fill_random(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// `n` pseudo-random bytes.
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fill_random(seed, &mut v);
    v
}

/// What a tree holds: path -> (kind, mode, content or link target).
pub type Tree = BTreeMap<String, (char, u32, Vec<u8>)>;

/// Reads a directory tree (regular files, directories, symlinks).
pub fn read_tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Tree) {
    let mut ents: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    ents.sort_by_key(|e| e.file_name());
    for e in ents {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        if m.is_dir() {
            out.insert(rel, ('d', mode, Vec::new()));
            walk(root, &p, out);
        } else if m.file_type().is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            out.insert(rel, ('l', 0, t.to_str().unwrap().as_bytes().to_vec()));
        } else {
            out.insert(rel, ('f', mode, std::fs::read(&p).unwrap()));
        }
    }
}

/// Writes files (creating parents) with mode 0600.
pub fn write_files(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (p, data) in files {
        let full = root.join(p);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, data).unwrap();
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A CRIU-like image directory: one memory image of `pages` pages where page `i` is shared
/// (same in every replica of `template_seed`) unless `unique(i)`; plus small images.
pub fn fake_criu_dir(
    dir: &Path,
    template_seed: u64,
    replica_seed: u64,
    pages: usize,
    unique_every: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut mem = vec![0u8; pages * 4096];
    for (i, page) in mem.chunks_mut(4096).enumerate() {
        let unique = unique_every > 0 && (i + replica_seed as usize) % unique_every == 0;
        let seed = if unique {
            replica_seed.wrapping_mul(1_000_003) + i as u64
        } else {
            template_seed.wrapping_mul(7_919) + i as u64
        };
        fill_random(seed, page);
    }
    write_files(
        dir,
        &[
            ("pages-1.img", mem),
            ("pagemap-1.img", random_bytes(replica_seed + 11, 230)),
            ("core-1.img", random_bytes(replica_seed + 12, 2613)),
            ("mm-1.img", random_bytes(template_seed + 13, 1421)),
            ("inventory.img", b"inventory".to_vec()),
            ("pstree.img", random_bytes(replica_seed + 14, 26)),
        ],
    );
}

/// Opens a store at `root` with keys given as (namespace, 32 key bytes); key files are
/// written next to the root.
pub fn open_store(root: &Path, keys: &[(&str, [u8; 32])]) -> Store {
    let mut cfg = StoreConfig::new(root);
    for (ns, k) in keys {
        let kf = root.with_file_name(format!(
            "{}-{ns}.key",
            root.file_name().unwrap().to_str().unwrap()
        ));
        std::fs::write(&kf, k).unwrap();
        cfg.keys.insert((*ns).to_owned(), kf);
    }
    Store::open(&cfg).unwrap()
}

/// Files of a store sub-directory.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// A tmpfs mounted on a temporary directory, unmounted on drop.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mount tmpfs (tests run as root)");
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}
