//! Claims against a real etcd (Debian's etcd-server), started by each test on loopback with
//! a data directory of its own.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runc_architect_claims::etcd::{EtcdClaims, EtcdConfig};
use runc_architect_claims::{ClaimBackend, ClaimError, ClaimKey, ClaimOutcome};

/// A private etcd: killed and its data removed when dropped.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    async fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .arg("--name=claims-test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=claims-test={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian's etcd-server; scripts/setup installs it)");
        let etcd = Etcd {
            child,
            url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = EtcdClaims::connect(etcd.config()).await {
                let probe = ClaimKey::new("probe", "ready").expect("key");
                if c.forget(&probe).await.is_ok() {
                    return etcd;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 30 s:\n{}",
                etcd.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn config(&self) -> EtcdConfig {
        EtcdConfig {
            ttl: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            ..EtcdConfig::new(vec![self.url.clone()])
        }
    }

    async fn claims(&self) -> EtcdClaims {
        EtcdClaims::connect(self.config()).await.expect("connect")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn key(ns: &str, ck: &str) -> ClaimKey {
    ClaimKey::new(ns, ck).expect("key")
}

/// Claims `k` for `who` until it is won, at most `within`.
async fn claim_within(
    c: &EtcdClaims,
    k: &ClaimKey,
    who: &str,
    within: Duration,
) -> runc_architect_claims::Claim {
    let deadline = Instant::now() + within;
    loop {
        match c.claim(k, who).await.expect("claim") {
            ClaimOutcome::Won(claim) => return claim,
            other => assert!(
                Instant::now() < deadline,
                "{who} did not win {k} within {within:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_of_many_concurrent_claimers_wins() {
    let etcd = Etcd::start().await;
    let k = key("default", "blake3:aaaa");
    let mut tasks = Vec::new();
    for i in 0..12 {
        // Separate connections, as separate replacement pods on separate nodes would have.
        let c = etcd.claims().await;
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            (
                format!("node-{i}/pod"),
                c.claim(&k, &format!("node-{i}/pod")).await,
            )
        }));
    }
    let mut winners = Vec::new();
    let mut held_by = Vec::new();
    let mut claims = Vec::new();
    for t in tasks {
        let (who, outcome) = t.await.expect("task");
        match outcome.expect("claim") {
            ClaimOutcome::Won(c) => {
                winners.push(who);
                claims.push(c);
            }
            ClaimOutcome::Held { by } => held_by.push(by),
            ClaimOutcome::Consumed { by } => panic!("consumed by {by} before anyone restored"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(held_by.len(), 11);
    assert!(held_by.iter().all(|b| b == &winners[0]), "{held_by:?}");
}

#[tokio::test]
async fn a_consumed_checkpoint_is_never_claimed_again_until_forgotten() {
    let etcd = Etcd::start().await;
    let c = etcd.claims().await;
    let k = key("team-a", "blake3:bbbb");
    let ClaimOutcome::Won(claim) = c.claim(&k, "node-b/web-2").await.expect("claim") else {
        panic!("the first claimer wins");
    };
    c.consume(claim).await.expect("consume");
    // Past the lease's TTL: the record does not hang on the lease any more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    match c.claim(&k, "node-c/web-3").await.expect("claim") {
        ClaimOutcome::Consumed { by } => assert_eq!(by, "node-b/web-2"),
        other => panic!("a restored checkpoint was offered again: {other:?}"),
    }
    c.forget(&k).await.expect("forget");
    assert!(matches!(
        c.claim(&k, "node-c/web-3").await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
}

#[tokio::test]
async fn a_released_claim_goes_to_the_next_claimer() {
    let etcd = Etcd::start().await;
    let c = etcd.claims().await;
    let k = key("default", "blake3:cccc");
    let ClaimOutcome::Won(first) = c.claim(&k, "a").await.expect("claim") else {
        panic!("a wins");
    };
    assert!(matches!(
        c.claim(&k, "b").await.expect("claim"),
        ClaimOutcome::Held { by } if by == "a"
    ));
    c.release(first).await.expect("release");
    assert!(matches!(
        c.claim(&k, "b").await.expect("claim"),
        ClaimOutcome::Won(_)
    ));
}

#[tokio::test]
async fn a_dead_claimer_s_claim_runs_out_and_a_live_one_s_does_not() {
    let etcd = Etcd::start().await;
    let c = etcd.claims().await;
    let (dead, alive) = (key("default", "blake3:dddd"), key("default", "blake3:eeee"));
    let ClaimOutcome::Won(d) = c.claim(&dead, "dies").await.expect("claim") else {
        panic!("wins");
    };
    let ClaimOutcome::Won(kept) = c.claim(&alive, "lives").await.expect("claim") else {
        panic!("wins");
    };
    // The claimer dies: its keep-alive stops with it.
    drop(d);
    assert!(matches!(
        c.claim(&dead, "next").await.expect("claim"),
        ClaimOutcome::Held { by } if by == "dies"
    ));
    let taken = claim_within(&c, &dead, "next", Duration::from_secs(10)).await;
    assert_eq!(taken.claimer(), "next");
    // The live claimer's lease (2 s) is refreshed: well past it, the claim still holds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(kept.kept_alive());
    assert!(matches!(
        c.claim(&alive, "thief").await.expect("claim"),
        ClaimOutcome::Held { by } if by == "lives"
    ));
    c.consume(kept).await.expect("the kept claim is still ours");
}

#[tokio::test]
async fn claims_never_cross_namespaces() {
    let etcd = Etcd::start().await;
    let c = etcd.claims().await;
    let ck = "blake3:ffff";
    for ns in ["team-a", "team-b"] {
        assert!(
            matches!(
                c.claim(&key(ns, ck), ns).await.expect("claim"),
                ClaimOutcome::Won(_)
            ),
            "{ns} gets its own claim"
        );
    }
}

#[tokio::test]
async fn a_lost_claim_is_not_consumed() {
    let etcd = Etcd::start().await;
    let c = etcd.claims().await;
    let k = key("default", "blake3:1111");
    let ClaimOutcome::Won(claim) = c.claim(&k, "slow").await.expect("claim") else {
        panic!("wins");
    };
    // Taken over meanwhile (gc forgot it, and another replacement claimed it).
    c.forget(&k).await.expect("forget");
    let _other = claim_within(&c, &k, "other", Duration::from_secs(5)).await;
    let err = c.consume(claim).await.expect_err("lost");
    assert!(matches!(err, ClaimError::Lost { .. }), "{err}");
    assert!(err.to_string().contains("held:other"), "{err}");
    assert!(matches!(
        c.claim(&k, "third").await.expect("claim"),
        ClaimOutcome::Held { by } if by == "other"
    ));
}

#[tokio::test]
async fn etcd_that_is_down_is_an_error_not_a_win() {
    let mut etcd = Etcd::start().await;
    let c = Arc::new(etcd.claims().await);
    etcd.kill();
    let started = Instant::now();
    let err = c
        .claim(&key("default", "blake3:2222"), "x")
        .await
        .expect_err("no etcd, no claim");
    assert!(
        matches!(
            err,
            ClaimError::Backend { .. } | ClaimError::TimedOut { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&etcd.url), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the timeout"
    );
    // Nothing listens there at all: connecting fails the same way.
    let nothing = EtcdConfig {
        timeout: Duration::from_secs(1),
        ..EtcdConfig::new(vec![format!("http://127.0.0.1:{}", free_port())])
    };
    match EtcdClaims::connect(nothing).await {
        Err(e) => assert!(
            matches!(e, ClaimError::Backend { .. } | ClaimError::TimedOut { .. }),
            "{e}"
        ),
        Ok(c) => assert!(c.claim(&key("default", "x"), "y").await.is_err()),
    }
}

#[tokio::test]
async fn bad_input_is_refused_before_etcd_is_asked() {
    let etcd = Etcd::start().await;
    let short = EtcdConfig {
        ttl: Duration::from_secs(1),
        ..etcd.config()
    };
    assert!(matches!(
        EtcdClaims::connect(short).await,
        Err(ClaimError::InvalidTtl(_))
    ));
    let c = etcd.claims().await;
    assert!(matches!(
        c.claim(&key("default", "x"), "").await,
        Err(ClaimError::InvalidClaimer(_))
    ));
}
