//! Crash injection for tests.
//!
//! When the environment variable `RUNC_ARCHITECT_STORE_FAULT` is `NAME` or `NAME:N`, the
//! process aborts (as abruptly as a SIGKILL: no destructors, no cleanup) the first (or N-th)
//! time it reaches the fault point `NAME`. Points: `pack-append`, `pack-synced`,
//! `packs-published`, `manifest-published`, `generation-published`, `latest-published`, `gc-repack-published`,
//! `gc-manifest-rewritten`. Without the variable a point costs one relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Name of the environment variable.
pub const ENV: &str = "RUNC_ARCHITECT_STORE_FAULT";

struct Fault {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn config() -> Option<&'static Fault> {
    static CONFIG: OnceLock<Option<Fault>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            let (name, at) = match v.split_once(':') {
                Some((n, k)) => (n.to_owned(), k.parse().unwrap_or(1)),
                None => (v, 1),
            };
            Some(Fault {
                name,
                at,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// A fault point: aborts the process if configured to.
#[inline]
pub fn point(name: &str) {
    if let Some(f) = config() {
        if f.name == name && f.hits.fetch_add(1, Ordering::Relaxed) + 1 == f.at {
            eprintln!("fault injection: aborting at {name}");
            std::process::abort();
        }
    }
}
