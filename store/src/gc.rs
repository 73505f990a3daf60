//! Garbage collection: retention, then removal of unreferenced manifests and packs, then
//! repacking of mostly-dead packs. Runs under the store lock held exclusively (see the crate
//! docs, "Garbage collection").

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;

use crate::config::RetentionPolicy;
use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{self, LockKind};
use crate::index::{self, CheckpointInfo};
use crate::manifest::{ChunkLoc, Manifest};
use crate::pack::{self, PackId, PackIndex, PackWriter, PACK_TARGET_SIZE};
use crate::reference::CheckpointKey;
use crate::Store;

/// Options of [`Store::gc`].
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// What to keep.
    pub policy: RetentionPolicy,
    /// Only report what would be done.
    pub dry_run: bool,
    /// Containers of which nothing is kept, whatever the policy says (a deleted container's
    /// hibernation checkpoints): every generation goes, and so do chunks only they used.
    pub forget: Vec<CheckpointKey>,
}

/// What a collection did (or, dry, would do).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// References of the generations removed.
    pub removed_checkpoints: Vec<String>,
    /// Manifests deleted (removed generations and orphans of crashed writers).
    pub manifests_removed: u64,
    /// Packs deleted because nothing uses them.
    pub packs_removed: u64,
    /// Packs rewritten because most of their chunks were dead.
    pub packs_repacked: u64,
    /// Chunks copied by repacking.
    pub chunks_moved: u64,
    /// Temporary files of dead writers removed.
    pub temp_files_removed: u64,
    /// Stored bytes before.
    pub bytes_before: u64,
    /// Stored bytes after.
    pub bytes_after: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Non-fatal problems met (a damaged pack is left alone, not repacked).
    pub warnings: Vec<String>,
}

struct Gen {
    info: CheckpointInfo,
    remove: bool,
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub(crate) fn gc(store: &Store, opts: &GcOptions) -> Result<GcReport> {
    let _lock = store.lock(LockKind::Exclusive)?;
    let layout = store.layout();
    let policy = &opts.policy;
    let mut report = GcReport {
        dry_run: opts.dry_run,
        bytes_before: dir_bytes(&layout.packs()) + dir_bytes(&layout.manifests()),
        ..Default::default()
    };
    let now = fsutil::now_ms();

    // 1. Retention by count and age.
    let mut by_key: BTreeMap<CheckpointKey, Vec<Gen>> = BTreeMap::new();
    for key in index::list_keys(layout, None, None)? {
        let mut gens: Vec<Gen> = index::list_checkpoints(layout, &key)?
            .into_iter()
            .map(|info| Gen {
                info,
                remove: false,
            })
            .collect();
        gens.sort_by_key(|g| std::cmp::Reverse(g.info.generation));
        let forgotten = opts.forget.contains(&key);
        for (i, g) in gens.iter_mut().enumerate() {
            if forgotten || policy.keep_last.is_some_and(|n| i >= n as usize) {
                g.remove = true;
            }
            if let Some(age) = policy.max_age {
                let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                if g.info.created_ms.saturating_add(age_ms) < now {
                    g.remove = true;
                }
            }
        }
        by_key.insert(key, gens);
    }

    // Manifests of the remaining generations.
    let mut manifests: HashMap<Digest, Manifest> = HashMap::new();
    for gens in by_key.values() {
        for g in gens.iter().filter(|g| !g.remove) {
            if let std::collections::hash_map::Entry::Vacant(v) = manifests.entry(g.info.id) {
                v.insert(store.load_manifest(&g.info.id)?);
            }
        }
    }

    // 2. Quota: drop the oldest generations (non-latest first) until live bytes fit. Live
    // bytes = what the store would take after a full repack: referenced records with their
    // entry-table rows, pack headers and footers, and manifests.
    if let Some(max) = policy.max_bytes {
        let mut refs: HashMap<(PackId, u64), (u64, u64)> = HashMap::new();
        let mut pack_refs: HashMap<PackId, u64> = HashMap::new();
        let mut users: HashMap<Digest, u64> = HashMap::new();
        for gens in by_key.values() {
            for g in gens.iter().filter(|g| !g.remove) {
                *users.entry(g.info.id).or_default() += 1;
            }
        }
        let locs_of = |m: &Manifest| -> HashSet<(PackId, u64, u64)> {
            let row = if m.header.encryption.is_some() {
                80
            } else {
                48
            };
            m.locs
                .iter()
                .map(|l| {
                    (
                        m.packs[l.pack as usize],
                        l.offset,
                        u64::from(l.stored_len) + row,
                    )
                })
                .collect()
        };
        let mut live: u64 = 0;
        for m in manifests.values() {
            live += m.encoded_len() as u64;
            for (p, o, len) in locs_of(m) {
                let r = refs.entry((p, o)).or_insert((0, len));
                if r.0 == 0 {
                    live += len;
                    let pr = pack_refs.entry(p).or_default();
                    if *pr == 0 {
                        live += pack::OVERHEAD;
                    }
                    *pr += 1;
                }
                r.0 += 1;
            }
        }
        let mut order: Vec<(bool, u64, CheckpointKey, u64, Digest)> = by_key
            .iter()
            .flat_map(|(k, gens)| {
                gens.iter().filter(|g| !g.remove).map(move |g| {
                    (
                        g.info.latest,
                        g.info.created_ms,
                        k.clone(),
                        g.info.generation,
                        g.info.id,
                    )
                })
            })
            .collect();
        order.sort();
        for (_, _, key, gen, id) in order {
            if live <= max {
                break;
            }
            if let Some(g) = by_key
                .get_mut(&key)
                .and_then(|gs| gs.iter_mut().find(|g| g.info.generation == gen))
            {
                g.remove = true;
            }
            let Some(u) = users.get_mut(&id) else {
                continue;
            };
            *u -= 1;
            if *u > 0 {
                continue;
            }
            if let Some(m) = manifests.remove(&id) {
                live -= m.encoded_len() as u64;
                for (p, o, _) in locs_of(&m) {
                    if let Some(r) = refs.get_mut(&(p, o)) {
                        r.0 -= 1;
                        if r.0 == 0 {
                            live -= r.1;
                            if let Some(pr) = pack_refs.get_mut(&p) {
                                *pr -= 1;
                                if *pr == 0 {
                                    live -= pack::OVERHEAD;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // 3. Remove generations. The pointer moves first (to the newest kept generation, or 0),
    // so a crash midway never shows a half-removed set; then the files go, with any
    // uncommitted leftovers of dead writers.
    for (key, gens) in &by_key {
        let removed: Vec<&Gen> = gens.iter().filter(|g| g.remove).collect();
        for g in &removed {
            report.removed_checkpoints.push(g.info.reference());
        }
        if opts.dry_run {
            continue;
        }
        let leftovers = index::uncommitted_generations(layout, key)?;
        let kept = gens
            .iter()
            .filter(|g| !g.remove)
            .map(|g| g.info.generation)
            .max();
        if removed.is_empty() && leftovers.is_empty() && kept.is_some() {
            continue;
        }
        let dir = layout.key_dir(key);
        if removed.iter().any(|g| g.info.latest) || kept.is_none() {
            index::set_latest(layout, key, kept.unwrap_or(0))?;
        }
        for g in removed.iter().map(|g| g.info.generation).chain(leftovers) {
            fsutil::remove_any(&layout.generation(key, g))?;
        }
        fsutil::fsync_dir(&dir)?;
        if kept.is_none() {
            fsutil::remove_any(&layout.latest(key))?;
            fsutil::remove_any(&layout.key_lock(key))?;
            if std::fs::remove_dir(&dir).is_ok() {
                if let Some(parent) = dir.parent() {
                    fsutil::fsync_dir(parent)?;
                }
            }
        }
    }
    let live_ids: HashSet<Digest> = by_key
        .values()
        .flat_map(|gs| gs.iter().filter(|g| !g.remove).map(|g| g.info.id))
        .collect();
    manifests.retain(|id, _| live_ids.contains(id));

    // 4. Unreferenced manifests.
    let mdir = layout.manifests();
    for ent in std::fs::read_dir(&mdir).ctx("read directory", &mdir)? {
        let ent = ent.ctx("read directory", &mdir)?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let id = name.strip_suffix(".manifest").and_then(Digest::from_hex);
        if id.is_some_and(|id| live_ids.contains(&id)) {
            continue;
        }
        report.manifests_removed += 1;
        if !opts.dry_run {
            fsutil::remove_any(&ent.path())?;
        }
    }
    if !opts.dry_run {
        fsutil::fsync_dir(&mdir)?;
    }

    // 5. Packs: live chunk records from the live manifests.
    let mut live: HashMap<PackId, HashSet<u64>> = HashMap::new();
    for m in manifests.values() {
        for l in &m.locs {
            live.entry(m.packs[l.pack as usize])
                .or_default()
                .insert(l.offset);
        }
    }
    let pdir = layout.packs();
    let mut sparse: Vec<PackIndex> = Vec::new();
    for ent in std::fs::read_dir(&pdir).ctx("read directory", &pdir)? {
        let ent = ent.ctx("read directory", &pdir)?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(id) = PackId::from_file_name(&name) else {
            continue;
        };
        let Some(offsets) = live.get(&id) else {
            report.packs_removed += 1;
            if !opts.dry_run {
                fsutil::remove_any(&ent.path())?;
            }
            continue;
        };
        if policy.repack_threshold <= 0.0 {
            continue;
        }
        let idx = match PackIndex::load(&ent.path()) {
            Ok(i) => i,
            Err(e) => {
                report.warnings.push(format!("not repacking: {e}"));
                continue;
            }
        };
        let total: u64 = idx.entries.iter().map(|e| u64::from(e.stored_len)).sum();
        let live_bytes: u64 = idx
            .entries
            .iter()
            .filter(|e| offsets.contains(&e.offset))
            .map(|e| u64::from(e.stored_len))
            .sum();
        if total > 0 && (live_bytes as f64) < policy.repack_threshold * total as f64 {
            sparse.push(idx);
        }
    }
    if !opts.dry_run {
        fsutil::fsync_dir(&pdir)?;
    }

    // 6. Repack.
    if !sparse.is_empty() {
        if opts.dry_run {
            report.packs_repacked = sparse.len() as u64;
        } else {
            repack(store, &sparse, &live, &mut manifests, &mut report)?;
        }
    }

    // 7. Temporary files of dead writers (none can be alive: we hold the lock exclusively).
    let tdir = layout.tmp();
    for ent in std::fs::read_dir(&tdir).ctx("read directory", &tdir)? {
        let ent = ent.ctx("read directory", &tdir)?;
        report.temp_files_removed += 1;
        if !opts.dry_run {
            fsutil::remove_any(&ent.path())?;
        }
    }

    report.bytes_after = dir_bytes(&layout.packs()) + dir_bytes(&layout.manifests());
    tracing::info!(
        removed = report.removed_checkpoints.len(),
        packs_removed = report.packs_removed,
        packs_repacked = report.packs_repacked,
        bytes_before = report.bytes_before,
        bytes_after = report.bytes_after,
        dry_run = opts.dry_run,
        "garbage collection done"
    );
    Ok(report)
}

/// Copies the live chunks of `sparse` packs into new packs, points the manifests at the
/// copies, then deletes the old packs. Each step is durable before the next; a crash leaves
/// every manifest pointing at a complete, published pack.
fn repack(
    store: &Store,
    sparse: &[PackIndex],
    live: &HashMap<PackId, HashSet<u64>>,
    manifests: &mut HashMap<Digest, Manifest>,
    report: &mut GcReport,
) -> Result<()> {
    let layout = store.layout();
    let mut moved: HashMap<(PackId, u64), (PackId, u64)> = HashMap::new();
    let mut done_old: Vec<PackId> = Vec::new();
    for encrypted in [false, true] {
        let mut writer: Option<PackWriter> = None;
        let mut finished = Vec::new();
        let mut pending_old = Vec::new();
        for idx in sparse.iter().filter(|i| i.encrypted == encrypted) {
            let Some(old_id) = idx
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(PackId::from_file_name)
            else {
                continue;
            };
            let offsets = live.get(&old_id);
            let f = File::open(&idx.path).ctx("open", &idx.path)?;
            let mut buf = Vec::new();
            let mut local: Vec<((PackId, u64), u64)> = Vec::new();
            let mut ok = true;
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(PackWriter::create(&layout.tmp(), encrypted)?),
            };
            for e in idx
                .entries
                .iter()
                .filter(|e| offsets.is_some_and(|o| o.contains(&e.offset)))
            {
                pack::read_stored(&f, &idx.path, e.offset, e.stored_len, &mut buf)?;
                if Digest::of(&buf) != e.stored_hash {
                    report.warnings.push(format!(
                        "not repacking {}: chunk {} at offset {} is damaged",
                        idx.path.display(),
                        e.addr,
                        e.offset
                    ));
                    ok = false;
                    break;
                }
                let off = w.append(e.addr, e.raw_len, &buf, e.stored_hash)?;
                local.push(((old_id, e.offset), off));
            }
            if !ok {
                // The copies already appended stay as unreferenced records in the new pack.
                continue;
            }
            let new_id = w.id();
            report.chunks_moved += local.len() as u64;
            for (k, off) in local {
                moved.insert(k, (new_id, off));
            }
            pending_old.push(old_id);
            if w.size() >= PACK_TARGET_SIZE {
                if let Some(w) = writer.take() {
                    finished.push(w.finish()?);
                }
            }
        }
        if let Some(w) = writer.take() {
            finished.push(w.finish()?);
        }
        for p in finished {
            std::fs::rename(&p.tmp_path, layout.pack(&p.id)).ctx("rename", layout.pack(&p.id))?;
        }
        fsutil::fsync_dir(&layout.packs())?;
        done_old.extend(pending_old);
    }
    crate::fault::point("gc-repack-published");

    // Point manifests at the copies.
    for m in manifests.values_mut() {
        if !m
            .locs
            .iter()
            .any(|l| moved.contains_key(&(m.packs[l.pack as usize], l.offset)))
        {
            continue;
        }
        let mut packs: Vec<PackId> = Vec::new();
        let mut numbers: HashMap<PackId, u32> = HashMap::new();
        let mut locs = Vec::with_capacity(m.locs.len());
        for l in &m.locs {
            let old = (m.packs[l.pack as usize], l.offset);
            let (pid, offset) = moved.get(&old).copied().unwrap_or(old);
            let n = *numbers.entry(pid).or_insert_with(|| {
                packs.push(pid);
                (packs.len() - 1) as u32
            });
            locs.push(ChunkLoc {
                pack: n,
                offset,
                stored_len: l.stored_len,
            });
        }
        let new = m.with_locations(packs, locs);
        let path = layout.manifest(&new.id);
        fsutil::atomic_write(&path, &new.encode())?;
        crate::fault::point("gc-manifest-rewritten");
        *m = new;
    }
    for old in done_old {
        fsutil::remove_any(&layout.pack(&old))?;
        report.packs_repacked += 1;
    }
    fsutil::fsync_dir(&layout.packs())?;
    if manifests
        .values()
        .any(|m| m.packs.iter().any(|p| !layout.pack(p).exists()))
    {
        return Err(StoreError::CorruptPack {
            path: layout.packs(),
            reason: "internal: a live manifest names a removed pack after repacking".into(),
        });
    }
    Ok(())
}
