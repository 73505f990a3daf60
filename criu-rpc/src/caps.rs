//! What the installed CRIU can do: its version, `criu check`, and FEATURE_CHECK, probed
//! once and cached ([`CapabilitiesCache`]) so a long-lived program (the shim) pays the
//! probe only once.

use std::fmt;

use tokio::sync::OnceCell;

use crate::client::Criu;
use crate::error::{Error, Result};
use crate::proto::{CriuReqType, CriuResp};

/// CRIU's version as reported by the VERSION request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Major number.
    pub major: i32,
    /// Minor number.
    pub minor: i32,
    /// Sublevel (0 when CRIU sent none).
    pub sublevel: i32,
    /// Extra number, for development builds.
    pub extra: Option<i32>,
    /// Git id, for builds from git.
    pub gitid: Option<String>,
    /// Release name.
    pub name: Option<String>,
}

impl Version {
    pub(crate) fn from_response(resp: &CriuResp) -> Result<Self> {
        let v = resp.version.as_ref().ok_or_else(|| Error::Protocol {
            request: CriuReqType::Version,
            detail: "VERSION answer without a version".into(),
        })?;
        Ok(Version {
            major: v.major_number,
            minor: v.minor_number,
            sublevel: v.sublevel.unwrap_or(0),
            extra: v.extra,
            gitid: v.gitid.clone(),
            name: v.name.clone(),
        })
    }

    /// The version as one number, `major * 10000 + minor * 100 + sublevel` (runc's
    /// convention: 4.2.1 is 40201).
    pub fn number(&self) -> i64 {
        i64::from(self.major) * 10_000 + i64::from(self.minor) * 100 + i64::from(self.sublevel)
    }

    /// Whether this is at least `major.minor.sublevel`.
    pub fn at_least(&self, major: i32, minor: i32, sublevel: i32) -> bool {
        (self.major, self.minor, self.sublevel) >= (major, minor, sublevel)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        if let Some(g) = &self.gitid {
            write!(f, " ({g})")?;
        }
        Ok(())
    }
}

/// Features FEATURE_CHECK knows. As a request: which to probe; as an answer: which
/// are supported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// Memory change tracking (soft-dirty), needed by pre-dump/iterative dumps.
    pub mem_track: bool,
    /// Lazy restore through userfaultfd.
    pub lazy_pages: bool,
    /// Keeping pidfds across pre-dumps (`pidfd_store_sk`).
    pub pidfd_store: bool,
}

impl Features {
    /// Every feature.
    pub const ALL: Features = Features {
        mem_track: true,
        lazy_pages: true,
        pidfd_store: true,
    };

    pub(crate) fn from_response(resp: &CriuResp) -> Result<Self> {
        let f = resp.features.as_ref().ok_or_else(|| Error::Protocol {
            request: CriuReqType::FeatureCheck,
            detail: "FEATURE_CHECK answer without features".into(),
        })?;
        Ok(Features {
            mem_track: f.mem_track(),
            lazy_pages: f.lazy_pages(),
            pidfd_store: f.pidfd_store(),
        })
    }
}

/// The result of probing a CRIU installation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriuCapabilities {
    /// CRIU's version.
    pub version: Version,
    /// Supported features (all were probed).
    pub features: Features,
    /// `None` when `criu check` passed, else why it failed.
    pub check_error: Option<String>,
}

impl CriuCapabilities {
    /// Probes `criu`: VERSION and FEATURE_CHECK in one session (kept open between them), then CHECK in another (CRIU does not keep a session open after CHECK).
    /// Fails only when CRIU cannot be run or answer VERSION; a failed check is recorded.
    pub async fn probe(criu: &Criu) -> Result<Self> {
        let mut session = criu.session().await?;
        let version = session.version().await?;
        session.keep_open(false);
        let features = session.feature_check(Features::ALL).await;
        session.close().await;
        let features = features?;
        let check_error = criu.check().await.err().map(|e| e.to_string());
        Ok(CriuCapabilities {
            version,
            features,
            check_error,
        })
    }

    /// Whether `criu check` passed.
    pub fn check_passed(&self) -> bool {
        self.check_error.is_none()
    }
}

/// Probes once, then answers from memory. Concurrent first callers share one probe; a
/// failed probe is not cached (the next call tries again).
#[derive(Debug)]
pub struct CapabilitiesCache {
    criu: Criu,
    cell: OnceCell<CriuCapabilities>,
}

impl CapabilitiesCache {
    /// A cache for `criu`.
    pub fn new(criu: Criu) -> Self {
        CapabilitiesCache {
            criu,
            cell: OnceCell::new(),
        }
    }

    /// The capabilities, probing on first use.
    pub async fn get(&self) -> Result<&CriuCapabilities> {
        self.cell
            .get_or_try_init(|| CriuCapabilities::probe(&self.criu))
            .await
    }

    /// The capabilities if already probed.
    pub fn cached(&self) -> Option<&CriuCapabilities> {
        self.cell.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ordering() {
        let v = Version {
            major: 4,
            minor: 2,
            sublevel: 1,
            extra: None,
            gitid: None,
            name: None,
        };
        assert_eq!(v.number(), 40201);
        assert!(v.at_least(4, 2, 0));
        assert!(v.at_least(4, 2, 1));
        assert!(!v.at_least(4, 3, 0));
        assert!(!v.at_least(5, 0, 0));
        assert_eq!(v.to_string(), "4.2.1");
    }
}
