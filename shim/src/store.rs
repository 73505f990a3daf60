//! The node's checkpoint store, as the shim uses it.
//!
//! Where the store lives and how each namespace is encrypted is node-level
//! configuration: a TOML file (see `runc_architect_store::StoreConfig`) named by the
//! `StoreConfig` runtime option. The shim opens it at the first create that names it and
//! keeps it for its lifetime; a bad file fails that create with an error naming the file,
//! so a misconfigured node is noticed before any checkpoint is needed. Checkpoints the
//! shim takes on its own (hibernation, migration) are written here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use runc_architect_store::{Store, StoreConfig};
use tokio::sync::OnceCell;
use tracing::{info, warn};

/// The store of this shim, opened lazily from the first container's options.
#[derive(Default)]
pub struct NodeStore {
    cell: OnceCell<(PathBuf, Arc<Store>)>,
}

impl NodeStore {
    /// Opens the node's default store at `root` when no `StoreConfig` names one (once per
    /// shim, like [`NodeStore::open`]).
    pub async fn open_default(&self, root: &Path) -> Result<Arc<Store>, String> {
        let (_, store) = self
            .cell
            .get_or_try_init(|| async {
                let r = root.to_path_buf();
                let store = tokio::task::spawn_blocking(move || {
                    Store::open(&StoreConfig::new(&r)).map_err(|e| {
                        format!("open the default checkpoint store {}: {e}", r.display())
                    })
                })
                .await
                .map_err(|e| format!("open checkpoint store: {e}"))??;
                info!(root = %root.display(), "default checkpoint store open");
                Ok::<_, String>((root.to_path_buf(), Arc::new(store)))
            })
            .await?;
        Ok(store.clone())
    }

    /// Opens the store configured by `config` (once per shim). A later container naming
    /// another file keeps the first store, with a warning: the store is per node.
    pub async fn open(&self, config: &Path) -> Result<Arc<Store>, String> {
        let (path, store) = self
            .cell
            .get_or_try_init(|| async {
                let path = config.to_path_buf();
                let p = path.clone();
                let store = tokio::task::spawn_blocking(move || -> Result<Store, String> {
                    let cfg = StoreConfig::load(&p).map_err(|e| format!("checkpoint store config {}: {e}", p.display()))?;
                    Store::open(&cfg).map_err(|e| format!("open checkpoint store of {}: {e}", p.display()))
                })
                .await
                .map_err(|e| format!("open checkpoint store: {e}"))??;
                info!(config = %path.display(), root = %store.root().display(), "checkpoint store open");
                Ok::<_, String>((path, Arc::new(store)))
            })
            .await?;
        if path != config {
            warn!(first = %path.display(), requested = %config.display(), "one checkpoint store per shim; keeping the first");
        }
        Ok(store.clone())
    }
}
