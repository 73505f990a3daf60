//! Checkpoint keys (namespace, template key, container) and references.
//!
//! Reference syntax:
//!
//! * `NS/KEY/CONTAINER` or `NS/KEY/CONTAINER@latest`: the latest generation of that container;
//! * `NS/KEY/CONTAINER@GEN`: generation `GEN` (a positive integer);
//! * `blake3:HEX`: the checkpoint whose id (BLAKE3 of its manifest's logical part) starts
//!   with `HEX` (at least 8 hex characters; must be unambiguous).
//!
//! Names are 1 to 128 characters of `[A-Za-z0-9._-]`, starting with a letter or digit, so
//! they are safe as single path components and cannot collide with the store's own
//! dot-files.

use std::fmt;
use std::str::FromStr;

use crate::error::{Result, StoreError};

/// Maximum length of a name.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a namespace, template key or container name.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let invalid = |reason| StoreError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("longer than 128 characters"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid("must start with a letter or digit"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

/// Identifies a series of checkpoints: one container of one template in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckpointKey {
    /// Namespace: the unit of encryption keys and of deduplication isolation.
    pub namespace: String,
    /// Template key: replicas of one pod template share it (and dedup against each other).
    pub template: String,
    /// Container name (for example the pod and container name).
    pub container: String,
}

impl CheckpointKey {
    /// Validates and builds a key.
    pub fn new(namespace: &str, template: &str, container: &str) -> Result<Self> {
        validate_name("namespace", namespace)?;
        validate_name("template key", template)?;
        validate_name("container name", container)?;
        Ok(CheckpointKey {
            namespace: namespace.to_owned(),
            template: template.to_owned(),
            container: container.to_owned(),
        })
    }
}

impl fmt::Display for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.template, self.container)
    }
}

/// Which generation of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// The latest one.
    Latest,
    /// A given one.
    Number(u64),
}

/// A parsed checkpoint reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// By key and generation.
    Key(CheckpointKey, Generation),
    /// By (a prefix of) the checkpoint id, lower-case hex.
    Id(String),
}

impl FromStr for Reference {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: &str| StoreError::InvalidRef {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(hex) = s.strip_prefix("blake3:") {
            if hex.len() < 8 || hex.len() > 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    "expected blake3: followed by 8 to 64 hex characters",
                ));
            }
            return Ok(Reference::Id(hex.to_ascii_lowercase()));
        }
        let (path, gen) = match s.split_once('@') {
            Some((p, g)) => (p, Some(g)),
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let [ns, key, container] = parts.as_slice() else {
            return Err(invalid(
                "expected NS/KEY/CONTAINER[@GEN|@latest] or blake3:HEX",
            ));
        };
        let key = CheckpointKey::new(ns, key, container).map_err(|e| invalid(&e.to_string()))?;
        let gen = match gen {
            None | Some("latest") => Generation::Latest,
            Some(g) => match g.parse::<u64>() {
                Ok(n) if n > 0 => Generation::Number(n),
                _ => return Err(invalid("generation must be a positive integer or 'latest'")),
            },
        };
        Ok(Reference::Key(key, gen))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Key(k, Generation::Latest) => write!(f, "{k}@latest"),
            Reference::Key(k, Generation::Number(n)) => write!(f, "{k}@{n}"),
            Reference::Id(h) => write!(f, "blake3:{h}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refs() {
        let r: Reference = "prod/web-5d8f/web-0@3".parse().unwrap();
        assert_eq!(
            r,
            Reference::Key(
                CheckpointKey::new("prod", "web-5d8f", "web-0").unwrap(),
                Generation::Number(3)
            )
        );
        assert!(matches!(
            "a/b/c".parse::<Reference>().unwrap(),
            Reference::Key(_, Generation::Latest)
        ));
        assert!(matches!(
            "blake3:ABCDEF0123".parse::<Reference>().unwrap(),
            Reference::Id(h) if h == "abcdef0123"
        ));
        for bad in [
            "a/b",
            "a/b/c/d",
            "a/b/c@0",
            "a/b/c@x",
            "a/../c",
            "blake3:12",
            "a/.b/c",
            "",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad}");
        }
    }
}
