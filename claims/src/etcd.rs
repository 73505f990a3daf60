//! Claims in etcd: one key per checkpoint, set only if absent, on a lease.
//!
//! The key is `PREFIX/NAMESPACE/CHECKPOINT`. A claim is one transaction: if the key was never
//! created (`create_revision == 0`), put `held:CLAIMER` on a fresh lease; otherwise read what
//! is there (`held:OTHER` or `consumed:OTHER`). etcd runs the transaction atomically, so of
//! any number of concurrent claimers exactly one sees its put succeed. The winner keeps the
//! lease alive (a refresh every third of its TTL) while it restores; a winner that dies stops
//! refreshing, and etcd deletes the key when the lease runs out. `consume` replaces the value
//! with `consumed:CLAIMER` without a lease (so it stays), but only if the key still says
//! `held:CLAIMER`: a claim lost in the meantime is reported, never overwritten.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tracing::{debug, warn};

use crate::{check_claimer, Claim, ClaimBackend, ClaimError, ClaimKey, ClaimOutcome};

const HELD: &str = "held:";
const CONSUMED: &str = "consumed:";

/// Where the claims live and how long a silent claimer keeps one.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// etcd client URLs (`http://HOST:2379`, ...).
    pub endpoints: Vec<String>,
    /// Key prefix of the claims (default `/runc-architect/claims`).
    pub prefix: String,
    /// Lease TTL: how long the claim of a claimer that died blocks the checkpoint (at least
    /// 2 s; etcd raises shorter ones to its own minimum). Default 15 s.
    pub ttl: Duration,
    /// Time limit of each request, and of connecting. Default 3 s.
    pub timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/runc-architect/claims".into(),
            ttl: Duration::from_secs(15),
            timeout: Duration::from_secs(3),
        }
    }
}

/// [`ClaimBackend`] on etcd's v3 API.
#[derive(Clone)]
pub struct EtcdClaims {
    client: Client,
    cfg: EtcdConfig,
}

impl std::fmt::Debug for EtcdClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClaims")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl EtcdClaims {
    /// Connects to `cfg.endpoints`.
    pub async fn connect(cfg: EtcdConfig) -> Result<EtcdClaims, ClaimError> {
        if cfg.ttl < Duration::from_secs(2) {
            return Err(ClaimError::InvalidTtl(cfg.ttl));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(cfg.timeout)
            .with_timeout(cfg.timeout);
        let endpoint = cfg.endpoints.join(",");
        let client = bounded(
            &endpoint,
            "connect",
            cfg.timeout,
            Client::connect(&cfg.endpoints, Some(options)),
        )
        .await?;
        Ok(EtcdClaims { client, cfg })
    }

    fn path(&self, key: &ClaimKey) -> String {
        format!(
            "{}/{}/{}",
            self.cfg.prefix.trim_end_matches('/'),
            key.namespace(),
            key.checkpoint()
        )
    }

    fn endpoint(&self) -> String {
        self.cfg.endpoints.join(",")
    }

    async fn op<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClaimError> {
        bounded(&self.endpoint(), op, self.cfg.timeout, f).await
    }

    /// Revokes `lease`, best effort (it runs out by itself otherwise).
    async fn revoke(&self, lease: i64) {
        let mut c = self.client.clone();
        if let Err(e) = self.op("revoke a lease", c.lease_revoke(lease)).await {
            debug!(lease, error = %e, "revoke claim lease");
        }
    }

    /// Refreshes `lease` every third of the TTL until the task is aborted or etcd says
    /// the lease is gone.
    fn keep_alive(&self, key: &ClaimKey, lease: i64) -> tokio::task::JoinHandle<()> {
        let mut client = self.client.clone();
        let period = self.cfg.ttl / 3;
        let key = key.to_string();
        tokio::spawn(async move {
            let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(claim = %key, error = %e, "claim keep-alive: cannot start");
                    return;
                }
            };
            loop {
                tokio::time::sleep(period).await;
                if let Err(e) = keeper.keep_alive().await {
                    warn!(claim = %key, error = %e, "claim keep-alive: refresh failed");
                    return;
                }
                match stream.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    Ok(_) => {
                        warn!(claim = %key, "claim keep-alive: the lease is gone");
                        return;
                    }
                    Err(e) => {
                        warn!(claim = %key, error = %e, "claim keep-alive: no answer");
                        return;
                    }
                }
            }
        })
    }
}

async fn bounded<T>(
    endpoint: &str,
    op: &'static str,
    timeout: Duration,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClaimError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ClaimError::Backend {
            endpoint: endpoint.to_string(),
            op,
            source: Box::new(e),
        }),
        Err(_) => Err(ClaimError::TimedOut {
            endpoint: endpoint.to_string(),
            op,
            timeout,
        }),
    }
}

/// The key still says that `claim`'s claimer holds it.
fn still_held(path: &str, claim: &Claim) -> Compare {
    Compare::value(path, CompareOp::Equal, format!("{HELD}{}", claim.claimer))
}

/// The first value a transaction's get returned.
fn got_value(ops: Vec<TxnOpResponse>) -> Option<String> {
    ops.into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        _ => None,
    })
}

#[async_trait]
impl ClaimBackend for EtcdClaims {
    async fn claim(&self, key: &ClaimKey, claimer: &str) -> Result<ClaimOutcome, ClaimError> {
        check_claimer(claimer)?;
        let path = self.path(key);
        let mut c = self.client.clone();
        let ttl = i64::try_from(self.cfg.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = self
            .op("grant a lease", c.lease_grant(ttl, None))
            .await?
            .id();
        let txn = Txn::new()
            .when([Compare::create_revision(path.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                path.clone(),
                format!("{HELD}{claimer}"),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(path.clone(), None)]);
        let resp = match self.op("claim", c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke(lease).await;
                return Err(e);
            }
        };
        if resp.succeeded() {
            debug!(claim = %key, claimer, lease, "claim won");
            return Ok(ClaimOutcome::Won(Claim {
                key: key.clone(),
                claimer: claimer.to_string(),
                token: lease,
                keepalive: Some(self.keep_alive(key, lease)),
            }));
        }
        self.revoke(lease).await;
        let value = got_value(resp.op_responses()).unwrap_or_default();
        Ok(match value.strip_prefix(CONSUMED) {
            Some(by) => ClaimOutcome::Consumed { by: by.to_string() },
            None => ClaimOutcome::Held {
                by: value.strip_prefix(HELD).unwrap_or(&value).to_string(),
            },
        })
    }

    async fn consume(&self, mut claim: Claim) -> Result<(), ClaimError> {
        let path = self.path(&claim.key);
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when([still_held(&path, &claim)])
            .and_then([TxnOp::put(
                path.clone(),
                format!("{CONSUMED}{}", claim.claimer),
                None,
            )])
            .or_else([TxnOp::get(path.clone(), None)]);
        let resp = self.op("consume", c.txn(txn)).await?;
        if let Some(h) = claim.keepalive.take() {
            h.abort();
        }
        // The value no longer hangs on the lease: revoking it removes nothing.
        self.revoke(claim.token).await;
        if resp.succeeded() {
            return Ok(());
        }
        let now = got_value(resp.op_responses());
        Err(ClaimError::Lost {
            key: claim.key.to_string(),
            detail: match now {
                Some(v) => format!("the key says {v:?} now"),
                None => "the key is gone (the lease ran out)".into(),
            },
        })
    }

    async fn release(&self, mut claim: Claim) -> Result<(), ClaimError> {
        let path = self.path(&claim.key);
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when([still_held(&path, &claim)])
            .and_then([TxnOp::delete(path.clone(), None)]);
        let resp = self.op("release", c.txn(txn)).await?;
        if let Some(h) = claim.keepalive.take() {
            h.abort();
        }
        self.revoke(claim.token).await;
        if !resp.succeeded() {
            debug!(claim = %claim.key, "released a claim that was no longer held");
        }
        Ok(())
    }

    async fn forget(&self, key: &ClaimKey) -> Result<(), ClaimError> {
        let mut c = self.client.clone();
        self.op("forget", c.delete(self.path(key), None)).await?;
        Ok(())
    }
}
