//! The keys `--option KEY=VALUE` may set in the handler's `options` table.
//!
//! The table mirrors the shim's `TomlOptions` (shim/src/options.rs): runc's key names plus
//! runc-architect's own `StoreConfig`, `CriuPath` and the hibernation defaults (`Hibernate`,
//! `FreezeAfter`, `ScaledownAfter`, `InitialDelay`, `HibernateDir`). It is written out here
//! rather than shared with the shim crate because the CLI must not pull in libcontainer; the
//! CLI's tests compare this list with the shim's source so the two cannot drift apart.
//!
//! Values are checked as the shim checks them, so that a value it would refuse at every
//! container create is refused here: booleans are `true` or `false`, paths absolute, and
//! durations Go's ([`super::duration`], never negative).
//!
//! Which keys reach the shim depends on the handler's form: with our own runtime type CRI
//! sends the whole table as TOML and the shim reads every key below; registered as
//! `io.containerd.runc.v2` (`--as-runc`) containerd decodes the table into runc's options
//! (`containerd.runc.v1.Options`) and silently drops keys runc's options do not have, so
//! runc-architect's own keys are refused in that form instead of being lost.

use super::duration::{self, DurationError};
use super::snippet::Form;

/// The TOML type of an option's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    String,
    /// A string holding an absolute path.
    Path,
    /// An unsigned 32-bit integer (uid, gid).
    U32,
    /// A Go-style duration (`500ms`, `2s`, `1m30s`, `0`), not negative; written as a string.
    Duration,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Bool => "true or false",
            Kind::String => "a string",
            Kind::Path => "an absolute path",
            Kind::U32 => "an integer from 0 to 4294967295",
            Kind::Duration => "a Go duration such as 500ms, 2s or 1m30s (0 for none)",
        }
    }
}

struct KnownKey {
    name: &'static str,
    kind: Kind,
    /// Part of runc's options, so also carried in the `--as-runc` form.
    in_runc_options: bool,
}

const fn key(name: &'static str, kind: Kind, in_runc_options: bool) -> KnownKey {
    KnownKey {
        name,
        kind,
        in_runc_options,
    }
}

/// The shim's accepted keys (shim/src/options.rs, `TomlOptions`).
const KNOWN: &[KnownKey] = &[
    key("Root", Kind::Path, true),
    key("NoPivotRoot", Kind::Bool, true),
    key("NoNewKeyring", Kind::Bool, true),
    key("SystemdCgroup", Kind::Bool, true),
    key("BinaryName", Kind::String, true),
    key("ShimCgroup", Kind::String, true),
    key("IoUid", Kind::U32, true),
    key("IoGid", Kind::U32, true),
    key("CriuImagePath", Kind::Path, true),
    key("CriuWorkPath", Kind::Path, true),
    key("CriuPath", Kind::Path, false),
    key("StoreConfig", Kind::Path, false),
    key("Hibernate", Kind::Bool, false),
    key("FreezeAfter", Kind::Duration, false),
    key("ScaledownAfter", Kind::Duration, false),
    key("InitialDelay", Kind::Duration, false),
    key("HibernateDir", Kind::Path, false),
];

/// A typed option value, written into the TOML table as such.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionValue {
    Bool(bool),
    String(String),
    Integer(i64),
}

/// One `--option` that was refused.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    #[error("--option {0:?}: expected KEY=VALUE")]
    Syntax(String),
    #[error("--option {key}: unknown key{hint}; the shim accepts {known}")]
    UnknownKey {
        key: String,
        hint: String,
        known: String,
    },
    #[error(
        "--option {key}: runc's options (containerd.runc.v1.Options), which containerd sends in \
         the --as-runc form, have no {key}; register without --as-runc to set it"
    )]
    NotInRuncOptions { key: String },
    #[error("--option {key}={value}: {key} takes {expected}")]
    Type {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("--option {key}={value}: {key} takes {expected}: {reason}")]
    Duration {
        key: String,
        value: String,
        expected: &'static str,
        reason: DurationError,
    },
    #[error("--option {key} is given more than once")]
    Duplicate { key: String },
    #[error(
        "--option SystemdCgroup=true: the shim refuses the systemd cgroup driver for now (it uses \
         cgroupfs)"
    )]
    SystemdCgroup,
}

/// Parses and checks every `--option KEY=VALUE` for `form`, in the order given.
pub fn parse_all(specs: &[String], form: Form) -> Result<Vec<(String, OptionValue)>, OptionError> {
    let mut out: Vec<(String, OptionValue)> = Vec::with_capacity(specs.len());
    for spec in specs {
        let (key, value) = parse(spec, form)?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(OptionError::Duplicate { key });
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Whether `key` reaches the shim in `form` (used to warn about keys already in a config).
pub fn is_known(key: &str, form: Form) -> bool {
    KNOWN
        .iter()
        .any(|k| k.name == key && (form == Form::Native || k.in_runc_options))
}

fn parse(spec: &str, form: Form) -> Result<(String, OptionValue), OptionError> {
    let Some((key, raw)) = spec.split_once('=') else {
        return Err(OptionError::Syntax(spec.to_string()));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(OptionError::Syntax(spec.to_string()));
    }
    let Some(known) = KNOWN.iter().find(|k| k.name == key) else {
        let hint = KNOWN
            .iter()
            .find(|k| k.name.eq_ignore_ascii_case(key))
            .map(|k| format!(" (did you mean {}?)", k.name))
            .unwrap_or_default();
        let known = KNOWN
            .iter()
            .filter(|k| form == Form::Native || k.in_runc_options)
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(", ");
        return Err(OptionError::UnknownKey {
            key: key.to_string(),
            hint,
            known,
        });
    };
    if form == Form::AsRunc && !known.in_runc_options {
        return Err(OptionError::NotInRuncOptions {
            key: key.to_string(),
        });
    }
    let type_err = || OptionError::Type {
        key: key.to_string(),
        value: raw.to_string(),
        expected: known.kind.describe(),
    };
    let value = match known.kind {
        Kind::Bool => match raw {
            "true" => OptionValue::Bool(true),
            "false" => OptionValue::Bool(false),
            _ => return Err(type_err()),
        },
        Kind::U32 => {
            let n: u32 = raw.parse().map_err(|_| type_err())?;
            OptionValue::Integer(i64::from(n))
        }
        Kind::String | Kind::Path => {
            let s = unquote(raw).ok_or_else(type_err)?;
            if known.kind == Kind::Path && !s.starts_with('/') {
                return Err(type_err());
            }
            OptionValue::String(s)
        }
        Kind::Duration => {
            let s = unquote(raw).ok_or_else(type_err)?;
            duration::check_non_negative(&s).map_err(|reason| OptionError::Duration {
                key: key.to_string(),
                value: raw.to_string(),
                expected: known.kind.describe(),
                reason,
            })?;
            OptionValue::String(s)
        }
    };
    if key == "SystemdCgroup" && value == OptionValue::Bool(true) {
        return Err(OptionError::SystemdCgroup);
    }
    Ok((key.to_string(), value))
}

/// A string value as given: plain text, or a TOML string literal when quoted (so
/// `--option 'Root="/run/x"'` and `--option Root=/run/x` mean the same). `None` when it is
/// quoted but not a valid TOML string.
fn unquote(raw: &str) -> Option<String> {
    if raw.starts_with('"') || raw.starts_with('\'') {
        match raw.parse::<toml_edit::Value>() {
            Ok(toml_edit::Value::String(s)) => Some(s.value().clone()),
            _ => None,
        }
    } else {
        Some(raw.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn typed_values() {
        let got = parse_all(
            &specs(&[
                "Root=/run/ra",
                "NoPivotRoot=true",
                "IoUid=1000",
                "StoreConfig=\"/etc/ra/store.toml\"",
                "BinaryName=",
                "Hibernate=true",
                "FreezeAfter=500ms",
                "ScaledownAfter='1m30s'",
                "InitialDelay=0",
                "HibernateDir=/var/lib/ra/hib",
            ]),
            Form::Native,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                ("Root".into(), OptionValue::String("/run/ra".into())),
                ("NoPivotRoot".into(), OptionValue::Bool(true)),
                ("IoUid".into(), OptionValue::Integer(1000)),
                (
                    "StoreConfig".into(),
                    OptionValue::String("/etc/ra/store.toml".into())
                ),
                ("BinaryName".into(), OptionValue::String(String::new())),
                ("Hibernate".into(), OptionValue::Bool(true)),
                ("FreezeAfter".into(), OptionValue::String("500ms".into())),
                ("ScaledownAfter".into(), OptionValue::String("1m30s".into())),
                ("InitialDelay".into(), OptionValue::String("0".into())),
                (
                    "HibernateDir".into(),
                    OptionValue::String("/var/lib/ra/hib".into())
                ),
            ]
        );
    }

    #[test]
    fn refusals() {
        let err = |s: &str, form| parse_all(&specs(&[s]), form).unwrap_err().to_string();
        assert!(err("root=/x", Form::Native).contains("did you mean Root?"));
        assert!(err("Bogus=1", Form::Native).contains("StoreConfig"));
        assert!(!err("Bogus=1", Form::AsRunc).contains("StoreConfig"));
        assert!(err("StoreConfig=/x", Form::AsRunc).contains("have no StoreConfig"));
        assert!(err("NoPivotRoot=yes", Form::Native).contains("true or false"));
        assert!(err("Root=relative", Form::Native).contains("absolute path"));
        assert!(err("IoUid=-1", Form::Native).contains("integer"));
        assert!(err("Root='/x", Form::Native).contains("absolute path"));
        assert!(err("SystemdCgroup=true", Form::Native).contains("systemd"));
        assert!(err("Root", Form::Native).contains("KEY=VALUE"));
        assert_eq!(
            err("FreezeAfter=2x", Form::Native),
            "--option FreezeAfter=2x: FreezeAfter takes a Go duration such as 500ms, 2s or \
             1m30s (0 for none): unknown unit \"x\""
        );
        assert!(err("InitialDelay=-1s", Form::Native).contains("negative"));
        assert!(err("ScaledownAfter=60", Form::Native).contains("missing unit"));
        assert!(err("Hibernate=yes", Form::Native).contains("true or false"));
        assert!(err("HibernateDir=hib", Form::Native).contains("absolute path"));
        assert!(err("Hibernate=true", Form::AsRunc).contains("have no Hibernate"));
        let dup = parse_all(&specs(&["Root=/a", "Root=/b"]), Form::Native).unwrap_err();
        assert!(dup.to_string().contains("more than once"));
        assert!(is_known("CriuPath", Form::Native));
        assert!(!is_known("CriuPath", Form::AsRunc));
    }
}
