//! Node-level configuration of the store: a TOML file named by the runtime options.
//!
//! ```toml
//! root = "/var/lib/runc-architect/store"
//! # threads = 2                 # ingest/materialize parallelism (default: all cores)
//!
//! [keys]                        # namespaces listed here are encrypted at rest
//! payments = "/etc/runc-architect/keys/payments.key"
//!
//! [retention]                   # applied by `gc` (and by the shim when it collects)
//! keep_last = 3                 # generations kept per container
//! max_age = "7d"                # generations older than this are removed (latest included)
//! max_bytes = "20GiB"           # quota on stored bytes: oldest generations go first
//! repack_threshold = 0.5        # repack packs whose live fraction is below this
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Result, StoreError};

/// The store's configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Store directory (created 0700 if missing).
    pub root: PathBuf,
    /// Key file per encrypted namespace.
    #[serde(default)]
    pub keys: BTreeMap<String, PathBuf>,
    /// Retention policy used by garbage collection.
    #[serde(default)]
    pub retention: RetentionPolicy,
    /// Worker threads for ingest and materialize (`None`: one per core).
    #[serde(default)]
    pub threads: Option<usize>,
}

/// What garbage collection keeps.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep at most this many generations per container (newest first).
    #[serde(default)]
    pub keep_last: Option<u32>,
    /// Remove generations older than this (the latest included: orphaned checkpoints must not
    /// fill a node's disk). Accepts "90s", "12h", "7d" or seconds.
    #[serde(
        default,
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub max_age: Option<Duration>,
    /// Quota on stored bytes: the oldest generations (non-latest first) are removed until
    /// the live data fits. Accepts "500MiB", "20GiB" or bytes.
    #[serde(default, deserialize_with = "de_size")]
    pub max_bytes: Option<u64>,
    /// Packs whose live fraction is below this are rewritten (0 disables repacking).
    #[serde(default = "default_repack")]
    pub repack_threshold: f64,
}

fn default_repack() -> f64 {
    0.5
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            keep_last: None,
            max_age: None,
            max_bytes: None,
            repack_threshold: default_repack(),
        }
    }
}

impl StoreConfig {
    /// A configuration with only a root.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StoreConfig {
            root: root.into(),
            ..Default::default()
        }
    }

    /// Reads a TOML configuration file. Relative paths in it are taken relative to the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| StoreError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut cfg = Self::parse(&text).map_err(|reason| StoreError::Config {
            path: path.to_owned(),
            reason,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.root.is_relative() {
            cfg.root = base.join(&cfg.root);
        }
        for p in cfg.keys.values_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let cfg: StoreConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if cfg.root.as_os_str().is_empty() {
            return Err("root must not be empty".into());
        }
        for ns in cfg.keys.keys() {
            crate::reference::validate_name("namespace", ns).map_err(|e| e.to_string())?;
        }
        if cfg.retention.keep_last == Some(0) {
            return Err("retention.keep_last must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&cfg.retention.repack_threshold) {
            return Err("retention.repack_threshold must be within 0..=1".into());
        }
        if cfg.threads == Some(0) {
            return Err("threads must be at least 1".into());
        }
        Ok(cfg)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::Num(s)) => Ok(Some(Duration::from_secs(s))),
        Some(NumOrStr::Str(s)) => parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn ser_duration<S: serde::Serializer>(
    v: &Option<Duration>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some(d) => s.serialize_u64(d.as_secs()),
    }
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::Num(n)) => Ok(Some(n)),
        Some(NumOrStr::Str(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Parses a duration such as "90s", "12h", "7d", "1h 30m" (humantime syntax) or plain seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// Parses a size such as "4096", "512K", "500MiB", "20GB" (K/M/G/T are powers of 1024 with or
/// without "iB"; "KB"/"MB"/"GB"/"TB" are powers of 1000).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("bad size unit in {s:?}")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("size {s:?} out of range"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_config() {
        let cfg = StoreConfig::parse(
            r#"
root = "/var/lib/ra"
threads = 2
[keys]
prod = "/k/prod.key"
[retention]
keep_last = 3
max_age = "7d"
max_bytes = "20GiB"
"#,
        )
        .unwrap();
        assert_eq!(cfg.retention.keep_last, Some(3));
        assert_eq!(cfg.retention.max_age, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(cfg.retention.max_bytes, Some(20 << 30));
        assert_eq!(cfg.retention.repack_threshold, 0.5);
        assert_eq!(cfg.keys["prod"], PathBuf::from("/k/prod.key"));
        assert!(StoreConfig::parse("root = \"/x\"\nbogus = 1").is_err());
        assert!(StoreConfig::parse("root = \"/x\"\n[keys]\n\"a/b\" = \"/k\"").is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4m").unwrap(), 4 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2MB").unwrap(), 2_000_000);
        assert!(parse_size("x").is_err());
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
    }
}
