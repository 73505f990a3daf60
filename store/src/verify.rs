//! Full-store verification: every pack byte, every manifest, every index record.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::digest::Digest;
use crate::error::{IoContext, Result};
use crate::fsutil::{self, LockKind};
use crate::index;
use crate::manifest::Manifest;
use crate::pack::{self, PackEntry, PackId, PackIndex};
use crate::Store;

/// Outcome of [`Store::verify`].
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Packs checked.
    pub packs: usize,
    /// Manifests checked.
    pub manifests: usize,
    /// Generations checked.
    pub generations: usize,
    /// Chunk records checked.
    pub chunks: u64,
    /// Encrypted chunks also decrypted and re-addressed (namespace key present).
    pub decrypted_chunks: u64,
    /// Everything found wrong, one line each; empty when the store is sound.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir(dir).ctx("read directory", dir)? {
        let ent = ent.ctx("read directory", dir)?;
        if let Some(n) = ent.file_name().to_str() {
            if n.ends_with(suffix) && !n.starts_with('.') {
                out.push(n.to_owned());
            }
        } else {
            out.push(ent.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn verify(store: &Store) -> Result<VerifyReport> {
    let _lock = store.lock(LockKind::Shared)?;
    let layout = store.layout();
    let mut report = VerifyReport::default();

    // Packs.
    let mut packs: HashMap<PackId, (bool, HashMap<u64, PackEntry>)> = HashMap::new();
    for name in files_with_suffix(&layout.packs(), ".pack")? {
        let path = layout.packs().join(&name);
        let Some(id) = PackId::from_file_name(&name) else {
            report
                .problems
                .push(format!("pack {}: unexpected file name", path.display()));
            continue;
        };
        report.packs += 1;
        let idx = match PackIndex::load(&path) {
            Ok(i) => i,
            Err(e) => {
                report.problems.push(e.to_string());
                continue;
            }
        };
        for (e, why) in idx.check_data()? {
            report.problems.push(format!(
                "pack {}: chunk {} at offset {}: {why}",
                path.display(),
                e.addr,
                e.offset
            ));
        }
        report.chunks += idx.entries.len() as u64;
        let map = idx.entries.iter().map(|e| (e.offset, *e)).collect();
        packs.insert(id, (idx.encrypted, map));
    }

    // Manifests.
    let mut manifests: HashMap<Digest, Manifest> = HashMap::new();
    let mut decrypted: HashSet<(PackId, u64)> = HashSet::new();
    for name in files_with_suffix(&layout.manifests(), ".manifest")? {
        let path = layout.manifests().join(&name);
        report.manifests += 1;
        let Some(id) = name.strip_suffix(".manifest").and_then(Digest::from_hex) else {
            report
                .problems
                .push(format!("manifest {}: unexpected file name", path.display()));
            continue;
        };
        let m = match std::fs::read(&path)
            .ctx("read", &path)
            .and_then(|d| Manifest::decode(&path, &d))
        {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(e.to_string());
                continue;
            }
        };
        if m.id != id {
            report.problems.push(format!(
                "manifest {}: content has id {}",
                path.display(),
                m.id
            ));
            continue;
        }
        let encrypted = m.header.encryption.is_some();
        let mut bad_refs = 0usize;
        for (i, (c, l)) in m.chunks.iter().zip(&m.locs).enumerate() {
            let pid = m.packs[l.pack as usize];
            let problem = match packs.get(&pid) {
                None => Some(format!("pack {pid} is missing or unreadable")),
                Some((penc, map)) => match map.get(&l.offset) {
                    None => Some(format!("pack {pid} has no chunk at offset {}", l.offset)),
                    Some(e)
                        if e.addr != c.addr
                            || e.stored_len != l.stored_len
                            || e.raw_len != c.raw_len =>
                    {
                        Some(format!(
                            "pack {pid} offset {} holds chunk {} instead",
                            l.offset, e.addr
                        ))
                    }
                    Some(_) if *penc != encrypted => {
                        Some(format!("pack {pid} encryption differs from the manifest's"))
                    }
                    Some(_) => None,
                },
            };
            if let Some(p) = problem {
                bad_refs += 1;
                if bad_refs <= 5 {
                    report.problems.push(format!(
                        "manifest {}: chunk #{i} ({}): {p}",
                        path.display(),
                        c.addr
                    ));
                }
            }
        }
        if bad_refs > 5 {
            report.problems.push(format!(
                "manifest {}: {} more bad chunk references",
                path.display(),
                bad_refs - 5
            ));
        }
        // Body (needs the key when encrypted), and deep check of encrypted chunks.
        let key = store.key_for(&m.header.namespace);
        if !encrypted || key.is_some() {
            if let Err(e) = m.body(key.as_deref(), &path) {
                report.problems.push(e.to_string());
            } else if let (true, Some(k)) = (encrypted, key) {
                let mut buf = Vec::new();
                let mut open: HashMap<PackId, std::fs::File> = HashMap::new();
                for (c, l) in m.chunks.iter().zip(&m.locs) {
                    let pid = m.packs[l.pack as usize];
                    if !decrypted.insert((pid, l.offset)) {
                        continue;
                    }
                    let ppath = layout.pack(&pid);
                    let f = match open.entry(pid) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            match std::fs::File::open(&ppath) {
                                Ok(f) => v.insert(f),
                                Err(_) => continue, // reported above
                            }
                        }
                    };
                    if pack::read_stored(f, &ppath, l.offset, l.stored_len, &mut buf).is_err() {
                        continue; // reported above
                    }
                    report.decrypted_chunks += 1;
                    if let Err(why) = k.open_chunk(&c.addr, &mut buf) {
                        report.problems.push(format!(
                            "manifest {}: chunk {} in pack {pid} at offset {}: {why}",
                            path.display(),
                            c.addr,
                            l.offset
                        ));
                    }
                }
            }
        }
        manifests.insert(id, m);
    }

    // Index.
    for ns in index::list_namespaces(layout)? {
        let rec = layout.namespace_record(&ns);
        if rec.exists() {
            if let Err(e) = fsutil::read_record::<index::NamespaceRecord>(&rec) {
                report.problems.push(e.to_string());
            }
        }
    }
    for key in index::list_keys(layout, None, None)? {
        let latest = layout.latest(&key);
        if latest.exists() {
            if let Err(e) = fsutil::read_record::<serde_json::Value>(&latest) {
                report.problems.push(e.to_string());
            }
        }
        for g in index::list_generations(layout, &key)? {
            report.generations += 1;
            let path = layout.generation(&key, g);
            let rec = match index::read_generation(layout, &key, g) {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(e.to_string());
                    continue;
                }
            };
            let id = match rec.manifest_id(&path) {
                Ok(id) => id,
                Err(e) => {
                    report.problems.push(e.to_string());
                    continue;
                }
            };
            match manifests.get(&id) {
                None => report.problems.push(format!(
                    "checkpoint {key}@{g}: manifest {id} is missing or damaged"
                )),
                Some(m) => {
                    if m.header.namespace != key.namespace
                        || m.header.template != key.template
                        || m.header.container != key.container
                    {
                        report.problems.push(format!(
                            "checkpoint {key}@{g}: manifest {id} belongs to {}/{}/{}",
                            m.header.namespace, m.header.template, m.header.container
                        ));
                    }
                    if m.header.logical_size != rec.logical_size {
                        report.problems.push(format!(
                            "checkpoint {key}@{g}: size differs from its manifest's"
                        ));
                    }
                }
            }
        }
    }
    if report.is_ok() {
        tracing::info!(
            packs = report.packs,
            manifests = report.manifests,
            "store verified"
        );
    } else {
        tracing::warn!(
            problems = report.problems.len(),
            "store verification found problems"
        );
    }
    Ok(report)
}
