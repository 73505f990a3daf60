//! `runc-architect store ...`: the checkpoint store commands.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use runc_architect_store::config::{parse_duration, parse_size};
use runc_architect_store::{
    CheckpointKey, EntryKind, GcOptions, MaterializeOptions, Reference, RetentionPolicy, Store,
    StoreConfig,
};

const STORE_HELP: &str = "\
CHECKPOINT REFERENCES (REF):
  NS/KEY/CONTAINER            latest generation of a container's checkpoints
  NS/KEY/CONTAINER@latest     the same
  NS/KEY/CONTAINER@GEN        generation GEN (1, 2, ...)
  blake3:HEX                  the checkpoint whose id starts with HEX (8 to 64 hex digits)

  NS is the namespace (unit of encryption keys), KEY the template key (replicas of one pod
  template share it and deduplicate against each other), CONTAINER the container. Names are
  1-128 characters of [A-Za-z0-9._-], starting with a letter or digit.

ENCRYPTION:
  --key-file NS=PATH (repeatable) or [keys] in --config encrypts namespace NS at rest. A key
  file holds 32 random bytes, raw or as 64 hex digits (make one with `store keygen PATH`).
  The first checkpoint of a namespace fixes whether it is encrypted and with which key.

CONFIGURATION (--config FILE, TOML):
  root = \"/var/lib/runc-architect/store\"
  threads = 2
  [keys]
  payments = \"/etc/runc-architect/keys/payments.key\"
  [retention]
  keep_last = 3
  max_age = \"7d\"
  max_bytes = \"20GiB\"
  repack_threshold = 0.5

EXIT STATUS: 0 on success; 1 on any error, including any integrity problem found by
verify or met by get/export (get then leaves nothing at DEST_DIR).";

/// Arguments of `runc-architect store`.
#[derive(Args, Debug)]
#[command(after_long_help = STORE_HELP, after_help = "REF: NS/KEY/CONTAINER[@GEN|@latest] or blake3:HEX (more with --help)")]
pub struct StoreArgs {
    /// Store directory (created if missing; overrides the configuration's root).
    #[arg(long, value_name = "DIR", global = true)]
    root: Option<PathBuf>,
    /// Store configuration file (TOML: root, keys, retention, threads).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Key file of an encrypted namespace (repeatable).
    #[arg(long = "key-file", value_name = "NS=PATH", global = true)]
    key_files: Vec<String>,
    /// Worker threads for ingest and materialize (default: one per core).
    #[arg(long, value_name = "N", global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: StoreCmd,
}

#[derive(Subcommand, Debug)]
enum StoreCmd {
    /// Ingest a checkpoint directory as a new generation; prints its reference last.
    Put {
        /// Namespace.
        #[arg(long, short = 'n')]
        namespace: String,
        /// Template key (e.g. the pod-template-hash).
        #[arg(long, short = 'k')]
        key: String,
        /// Container name.
        #[arg(long, short = 'c')]
        container: String,
        /// Metadata label (repeatable).
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
        /// The checkpoint directory (a CRIU image directory, or the Kubernetes layout).
        src_dir: PathBuf,
    },
    /// Materialize a checkpoint into DEST_DIR (must not exist or be empty), verifying every chunk.
    Get {
        /// Checkpoint reference: NS/KEY/CONTAINER[@GEN|@latest] or blake3:HEX.
        reference: String,
        /// Destination directory.
        dest_dir: PathBuf,
        /// Skip the final fsync (faster; the result is not durable across a power loss).
        #[arg(long)]
        no_sync: bool,
    },
    /// List checkpoints, optionally under NS[/KEY[/CONTAINER]].
    Ls {
        /// Filter.
        filter: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show a checkpoint's manifest: files, chunks, metadata.
    Inspect {
        /// Checkpoint reference: NS/KEY/CONTAINER[@GEN|@latest] or blake3:HEX.
        reference: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Check every chunk, pack, manifest and index record; exits 1 naming what is wrong.
    Verify {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Apply a retention policy and reclaim space (flags override the configuration's policy).
    Gc {
        /// Keep at most N generations per container.
        #[arg(long, value_name = "N")]
        keep_last: Option<u32>,
        /// Remove generations older than this ("90s", "12h", "7d"), the latest included.
        #[arg(long, value_name = "DURATION")]
        max_age: Option<String>,
        /// Remove the oldest generations until live data fits ("500MiB", "20GiB").
        #[arg(long, value_name = "SIZE")]
        max_bytes: Option<String>,
        /// Repack packs whose live fraction is below this (0 disables).
        #[arg(long, value_name = "FRACTION")]
        repack_threshold: Option<f64>,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Sizes and counts: logical bytes, stored bytes, chunks, checkpoints.
    Stats {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Write a checkpoint as a Kubernetes checkpoint archive (tar: checkpoint/, config.dump,
    /// spec.dump, rootfs-diff.tar, deleted.files), as checkpointctl reads it.
    Export {
        /// Checkpoint reference: NS/KEY/CONTAINER[@GEN|@latest] or blake3:HEX.
        reference: String,
        /// Archive to write.
        file: PathBuf,
    },
    /// Ingest a Kubernetes checkpoint archive (uncompressed tar); prints its reference last.
    Import {
        /// Archive to read.
        file: PathBuf,
        /// Namespace (default: from the archive's spec.dump annotations).
        #[arg(long, short = 'n', requires_all = ["key", "container"])]
        namespace: Option<String>,
        /// Template key (default: from the archive).
        #[arg(long, short = 'k', requires_all = ["namespace", "container"])]
        key: Option<String>,
        /// Container name (default: from the archive).
        #[arg(long, short = 'c', requires_all = ["namespace", "key"])]
        container: Option<String>,
    },
    /// Write a new random key file (mode 0600) for an encrypted namespace.
    Keygen {
        /// Key file to create.
        file: PathBuf,
    },
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn open(args: &StoreArgs) -> Result<Store> {
    let mut cfg = match &args.config {
        Some(p) => StoreConfig::load(p)?,
        None => StoreConfig::default(),
    };
    if let Some(root) = &args.root {
        cfg.root = root.clone();
    }
    if cfg.root.as_os_str().is_empty() {
        bail!("no store given: pass --root DIR or --config FILE");
    }
    for kf in &args.key_files {
        let (ns, path) = kf
            .split_once('=')
            .with_context(|| format!("--key-file {kf:?}: expected NS=PATH"))?;
        cfg.keys.insert(ns.to_owned(), PathBuf::from(path));
    }
    if args.threads.is_some() {
        cfg.threads = args.threads;
    }
    Ok(Store::open(&cfg)?)
}

fn parse_ref(s: &str) -> Result<Reference> {
    Ok(s.parse::<Reference>()?)
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a store command; returns the process exit code.
pub fn run(args: StoreArgs) -> Result<i32> {
    if let StoreCmd::Keygen { file } = &args.cmd {
        runc_architect_store::crypt::generate_key_file(file)?;
        println!("{}", file.display());
        return Ok(0);
    }
    let store = open(&args)?;
    match &args.cmd {
        StoreCmd::Put {
            namespace,
            key,
            container,
            labels,
            src_dir,
        } => {
            let key = CheckpointKey::new(namespace, key, container)?;
            let mut meta = BTreeMap::new();
            for l in labels {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("--label {l:?}: expected K=V"))?;
                meta.insert(k.to_owned(), v.to_owned());
            }
            let out = store
                .put_dir(&key, src_dir, meta)
                .with_context(|| format!("storing {} as {key}", src_dir.display()))?;
            println!(
                "stored {} (blake3:{}): {} logical, {} new ({} of {} chunks new), {} ms",
                out.reference,
                out.id,
                human(out.logical_bytes),
                human(out.new_bytes + out.manifest_bytes),
                out.new_chunks,
                out.chunks,
                out.elapsed.as_millis()
            );
            println!("{}", out.reference);
        }
        StoreCmd::Get {
            reference,
            dest_dir,
            no_sync,
        } => {
            let r = parse_ref(reference)?;
            let rep = store.materialize(&r, dest_dir, &MaterializeOptions { sync: !no_sync })?;
            println!(
                "materialized {} (blake3:{}) into {}: {} files, {} in {} ms",
                rep.info.reference(),
                rep.info.id.short(),
                dest_dir.display(),
                rep.files,
                human(rep.bytes),
                rep.elapsed.as_millis()
            );
        }
        StoreCmd::Ls { filter, json } => {
            let parts: Vec<&str> = filter
                .as_deref()
                .map(|f| f.split('/').collect())
                .unwrap_or_default();
            if parts.len() > 3 {
                bail!("filter must be NS[/KEY[/CONTAINER]]");
            }
            let list = store.list(
                parts.first().copied(),
                parts.get(1).copied(),
                parts.get(2).copied(),
            )?;
            if *json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "reference": c.reference(),
                            "namespace": c.key.namespace,
                            "template_key": c.key.template,
                            "container": c.key.container,
                            "generation": c.generation,
                            "id": format!("blake3:{}", c.id),
                            "created": runc_architect_store::fsutil::rfc3339_ms(c.created_ms),
                            "logical_bytes": c.logical_size,
                            "latest": c.latest,
                        })
                    })
                    .collect();
                print_json(&v)?;
            } else {
                println!(
                    "{:<48} {:<20} {:<21} {:>10}  LATEST",
                    "REFERENCE", "ID", "CREATED", "SIZE"
                );
                for c in list {
                    println!(
                        "{:<48} blake3:{:<13} {:<21} {:>10}  {}",
                        c.reference(),
                        c.id.short(),
                        runc_architect_store::fsutil::rfc3339_ms(c.created_ms),
                        human(c.logical_size),
                        if c.latest { "*" } else { "" }
                    );
                }
            }
        }
        StoreCmd::Inspect { reference, json } => {
            let i = store.inspect(&parse_ref(reference)?)?;
            if *json {
                print_json(&serde_json::json!({
                    "reference": i.info.reference(),
                    "id": format!("blake3:{}", i.info.id),
                    "latest": i.info.latest,
                    "created": runc_architect_store::fsutil::rfc3339_ms(i.header.created_ms),
                    "logical_bytes": i.header.logical_size,
                    "encryption": i.header.encryption,
                    "chunks": i.chunks,
                    "unique_chunks": i.unique_chunks,
                    "packs": i.packs,
                    "manifest_bytes": i.manifest_bytes,
                    "metadata": i.body.metadata,
                    "entries": i.body.entries,
                }))?;
            } else {
                println!(
                    "reference:  {}{}",
                    i.info.reference(),
                    if i.info.latest { " (latest)" } else { "" }
                );
                println!("id:         blake3:{}", i.info.id);
                println!(
                    "created:    {}",
                    runc_architect_store::fsutil::rfc3339_ms(i.header.created_ms)
                );
                println!(
                    "size:       {} in {} files",
                    human(i.header.logical_size),
                    i.body
                        .entries
                        .iter()
                        .filter(|e| e.kind == EntryKind::File)
                        .count()
                );
                println!(
                    "chunks:     {} ({} distinct) in {} packs",
                    i.chunks,
                    i.unique_chunks,
                    i.packs.len()
                );
                println!("manifest:   {}", human(i.manifest_bytes));
                match &i.header.encryption {
                    Some(e) => println!(
                        "encryption: {} (key fingerprint {})",
                        e.cipher, e.key_fingerprint
                    ),
                    None => println!("encryption: none"),
                }
                for (k, v) in &i.body.metadata {
                    println!("label:      {k}={v}");
                }
                for e in &i.body.entries {
                    match e.kind {
                        EntryKind::Dir => println!("  d {:04o} {:>10} {}/", e.mode, "", e.path),
                        EntryKind::File => println!(
                            "  f {:04o} {:>10} {} ({} chunks)",
                            e.mode, e.size, e.path, e.chunk_count
                        ),
                        EntryKind::Symlink => println!(
                            "  l {:>15} {} -> {}",
                            "",
                            e.path,
                            e.target.as_deref().unwrap_or("")
                        ),
                    }
                }
            }
        }
        StoreCmd::Verify { json } => {
            let rep = store.verify()?;
            if *json {
                print_json(&serde_json::json!({
                    "ok": rep.is_ok(),
                    "packs": rep.packs,
                    "manifests": rep.manifests,
                    "generations": rep.generations,
                    "chunks": rep.chunks,
                    "decrypted_chunks": rep.decrypted_chunks,
                    "problems": rep.problems,
                }))?;
            } else {
                for p in &rep.problems {
                    eprintln!("problem: {p}");
                }
                println!(
                    "{}: {} packs ({} chunks), {} manifests, {} generations checked; {} problems",
                    if rep.is_ok() { "ok" } else { "CORRUPT" },
                    rep.packs,
                    rep.chunks,
                    rep.manifests,
                    rep.generations,
                    rep.problems.len()
                );
            }
            return Ok(if rep.is_ok() { 0 } else { 1 });
        }
        StoreCmd::Gc {
            keep_last,
            max_age,
            max_bytes,
            repack_threshold,
            dry_run,
            json,
        } => {
            let mut policy: RetentionPolicy = store.retention().clone();
            if keep_last.is_some() || max_age.is_some() || max_bytes.is_some() {
                policy = RetentionPolicy {
                    repack_threshold: policy.repack_threshold,
                    ..RetentionPolicy::default()
                };
            }
            if let Some(n) = keep_last {
                if *n == 0 {
                    bail!("--keep-last must be at least 1");
                }
                policy.keep_last = Some(*n);
            }
            if let Some(a) = max_age {
                policy.max_age = Some(parse_duration(a).map_err(anyhow::Error::msg)?);
            }
            if let Some(b) = max_bytes {
                policy.max_bytes = Some(parse_size(b).map_err(anyhow::Error::msg)?);
            }
            if let Some(t) = repack_threshold {
                if !(0.0..=1.0).contains(t) {
                    bail!("--repack-threshold must be within 0..=1");
                }
                policy.repack_threshold = *t;
            }
            let rep = store.gc(&GcOptions {
                policy,
                dry_run: *dry_run,
                ..Default::default()
            })?;
            if *json {
                print_json(&rep)?;
            } else {
                for r in &rep.removed_checkpoints {
                    println!(
                        "{}removed {r}",
                        if rep.dry_run { "would have " } else { "" }
                    );
                }
                for w in &rep.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "gc{}: {} checkpoints, {} manifests, {} packs removed; {} packs repacked ({} chunks moved); {} temp files; {} -> {}",
                    if rep.dry_run { " (dry run)" } else { "" },
                    rep.removed_checkpoints.len(),
                    rep.manifests_removed,
                    rep.packs_removed,
                    rep.packs_repacked,
                    rep.chunks_moved,
                    rep.temp_files_removed,
                    human(rep.bytes_before),
                    human(rep.bytes_after)
                );
            }
        }
        StoreCmd::Stats { json } => {
            let s = store.stats()?;
            if *json {
                print_json(&s)?;
            } else {
                let ratio = if s.stored_bytes > 0 {
                    s.logical_bytes as f64 / s.stored_bytes as f64
                } else {
                    0.0
                };
                println!(
                    "checkpoints:   {} ({} containers, {} namespaces)",
                    s.checkpoints, s.containers, s.namespaces
                );
                println!(
                    "logical bytes: {} ({})",
                    s.logical_bytes,
                    human(s.logical_bytes)
                );
                println!(
                    "stored bytes:  {} ({}; packs {}, manifests {})",
                    s.stored_bytes,
                    human(s.stored_bytes),
                    human(s.pack_bytes),
                    human(s.manifest_bytes)
                );
                println!("chunks:        {} in {} packs", s.chunks, s.packs);
                println!("dedup ratio:   {ratio:.2}x");
            }
        }
        StoreCmd::Export { reference, file } => {
            let info = store.export(&parse_ref(reference)?, file)?;
            println!(
                "exported {} (blake3:{}) to {}",
                info.reference(),
                info.id.short(),
                file.display()
            );
        }
        StoreCmd::Import {
            file,
            namespace,
            key,
            container,
        } => {
            let k = match (namespace, key, container) {
                (Some(n), Some(k), Some(c)) => Some(CheckpointKey::new(n, k, c)?),
                _ => None,
            };
            let out = store
                .import(file, k.as_ref())
                .with_context(|| format!("importing {}", file.display()))?;
            println!(
                "imported {} as {} (blake3:{}): {} logical, {} of {} chunks new",
                file.display(),
                out.reference,
                out.id.short(),
                human(out.logical_bytes),
                out.new_chunks,
                out.chunks
            );
            println!("{}", out.reference);
        }
        StoreCmd::Keygen { .. } => {}
    }
    Ok(0)
}
