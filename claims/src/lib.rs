//! # runc-architect-claims: who restores a migrated checkpoint
//!
//! When a pod is deleted with migration on, its containers are checkpointed into the shared
//! store, and the replacement pod that the controller creates restores from that checkpoint
//! instead of starting cold. Several replacements can want the same checkpoint (N replicas
//! deleted at once, a scale-out racing a replacement); each checkpoint must be restored by
//! exactly one of them, and the others cold-start. This crate decides who: a replacement
//! *claims* the checkpoint before it fetches anything, and only the winner restores.
//!
//! A claim is a compare-and-set in a coordination service that the cluster already runs,
//! never one of our own: [`etcd::EtcdClaims`] (etcd is the store the Kubernetes API keeps its
//! objects in). The claim lives on a lease that the claimer keeps alive while it restores, so
//! a claimer that dies (node lost, shim killed) releases its claim when the lease runs out,
//! and the next replacement may take the checkpoint. The backend sits behind
//! [`ClaimBackend`], so that the Kubernetes API (Leases) can implement it too.
//!
//! ## A claim's life
//!
//! ```text
//!   (none) --claim--> HELD(claimer, lease) --consume--> CONSUMED(claimer)   restore succeeded
//!                         |  |                                              (until gc forgets it)
//!                         |  +--release / lease expires--> (none)           restore failed early,
//!                         |                                                 or the claimer died
//!                  claim by another: Held { by }        claim after consume: Consumed { by }
//! ```
//!
//! `consume` keeps the record without a lease, so that a checkpoint that was restored is
//! never restored again, even before the store's gc has removed it; `forget` (gc) deletes
//! it. Clone mode (`runc-architect.io/restore-mode: clone`, every new replica restores the
//! same checkpoint on purpose) takes no claim at all: that is the caller's policy.
//!
//! Every failure of the backend (unreachable, timed out, refused) is a [`ClaimError`]; the
//! caller treats it as a lost claim and cold-starts, never as a failed pod.

pub mod etcd;

use std::time::Duration;

use async_trait::async_trait;

/// The checkpoint a claim is for: its Kubernetes namespace and the store's checkpoint id.
/// Claims never cross namespaces: the namespace is part of the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimKey {
    namespace: String,
    checkpoint: String,
}

impl ClaimKey {
    /// A key for `checkpoint` (the store's checkpoint id, e.g. `blake3:…`) in the Kubernetes
    /// namespace `namespace`. Both must be non-empty, without `/` and without control
    /// characters (they become one path segment each in the backend).
    pub fn new(namespace: &str, checkpoint: &str) -> Result<ClaimKey, ClaimError> {
        for (what, v) in [("namespace", namespace), ("checkpoint", checkpoint)] {
            if v.is_empty() || v.contains('/') || v.chars().any(char::is_control) {
                return Err(ClaimError::InvalidKey {
                    what,
                    value: v.to_string(),
                });
            }
        }
        Ok(ClaimKey {
            namespace: namespace.to_string(),
            checkpoint: checkpoint.to_string(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn checkpoint(&self) -> &str {
        &self.checkpoint
    }
}

impl std::fmt::Display for ClaimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.checkpoint)
    }
}

/// What a claim attempt got.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// This claimer holds the checkpoint: restore it, then [`ClaimBackend::consume`] (or
    /// [`ClaimBackend::release`] if the restore failed before it changed anything).
    Won(Claim),
    /// Another claimer holds it (its restore is under way): cold-start.
    Held { by: String },
    /// It was restored already: cold-start.
    Consumed { by: String },
}

/// A claim this process holds. Its lease is kept alive until the claim is consumed or
/// released; dropping it stops the keep-alive, so the lease runs out within its TTL (as if
/// the claimer had died).
#[derive(Debug)]
pub struct Claim {
    key: ClaimKey,
    claimer: String,
    /// The backend's handle of the claim (etcd: the lease id).
    token: i64,
    keepalive: Option<tokio::task::JoinHandle<()>>,
}

impl Claim {
    pub fn key(&self) -> &ClaimKey {
        &self.key
    }

    pub fn claimer(&self) -> &str {
        &self.claimer
    }

    /// Whether the keep-alive still runs (it ends when the backend stops answering or says
    /// the lease is gone: the claim may be lost then).
    pub fn kept_alive(&self) -> bool {
        self.keepalive.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(h) = self.keepalive.take() {
            h.abort();
        }
    }
}

/// Failures of a claim backend. Each names the key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("claim key: {what} {value:?} must be non-empty, without '/' or control characters")]
    InvalidKey { what: &'static str, value: String },
    #[error("claimer {0:?} must be non-empty, without control characters")]
    InvalidClaimer(String),
    #[error("claim lease TTL {0:?}: must be at least 2 s")]
    InvalidTtl(Duration),
    #[error("claim {key}: the claim was lost (lease expired or taken over): {detail}")]
    Lost { key: String, detail: String },
    #[error("claim backend {endpoint}: {op}: {source}")]
    Backend {
        endpoint: String,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("claim backend {endpoint}: {op}: no answer within {timeout:?}")]
    TimedOut {
        endpoint: String,
        op: &'static str,
        timeout: Duration,
    },
}

/// A coordination service that holds claims: an atomic compare-and-set with leases.
#[async_trait]
pub trait ClaimBackend: Send + Sync {
    /// Tries to claim `key` for `claimer` (an id naming the replacement: its node and pod).
    async fn claim(&self, key: &ClaimKey, claimer: &str) -> Result<ClaimOutcome, ClaimError>;

    /// The claimer restored the checkpoint: nobody may claim it again.
    async fn consume(&self, claim: Claim) -> Result<(), ClaimError>;

    /// The claimer gives the checkpoint back untouched (its restore failed before it changed
    /// anything): the next replacement may claim it.
    async fn release(&self, claim: Claim) -> Result<(), ClaimError>;

    /// Forgets whatever is recorded for `key` (the store's gc removed the checkpoint).
    async fn forget(&self, key: &ClaimKey) -> Result<(), ClaimError>;
}

fn check_claimer(claimer: &str) -> Result<(), ClaimError> {
    if claimer.is_empty() || claimer.chars().any(char::is_control) {
        return Err(ClaimError::InvalidClaimer(claimer.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_segment_each() {
        assert!(ClaimKey::new("default", "blake3:00ff").is_ok());
        for (ns, ck) in [
            ("", "x"),
            ("a/b", "x"),
            ("ns", ""),
            ("ns", "a/../b"),
            ("n\ns", "x"),
        ] {
            let err = ClaimKey::new(ns, ck).expect_err("refused");
            assert!(matches!(err, ClaimError::InvalidKey { .. }), "{err}");
        }
        assert_eq!(
            ClaimKey::new("team-a", "blake3:ab").unwrap().to_string(),
            "team-a/blake3:ab"
        );
    }

    #[test]
    fn claimers_are_named() {
        assert!(check_claimer("node-b/pod-7").is_ok());
        assert!(check_claimer("").is_err());
        assert!(check_claimer("a\nb").is_err());
    }
}
