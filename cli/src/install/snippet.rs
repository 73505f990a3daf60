//! The handler snippets of `RuntimeClass/`, embedded at compile time.
//!
//! The files users read and the tables `install` merges are the same bytes: each snippet is
//! a TOML document holding exactly one handler table (`runc-architect`) with its `options`
//! subtable under the CRI runtime plugin of one config version, and no `version` key (a
//! snippet must never change the version of the file it is merged into). [`Snippet::template`]
//! checks that shape, so a broken file in `RuntimeClass/` fails the tests instead of a node.
//!
//! The template keeps the snippet's formatting: key quoting (`"…"` in version 2 files, `'…'`
//! in version 3 files, as `containerd config default` writes them), indentation and the
//! comments attached to the handler's keys and tables.

use toml_edit::{DocumentMut, Item, Key, Table};

use super::config::ConfigVersion;
use super::Error;

/// How the handler is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `runtime_type = "io.containerd.runc-architect.v1"`: CRI sends the `options` table to
    /// the shim as TOML (runtimeoptions.v1).
    Native,
    /// `runtime_type = "io.containerd.runc.v2"` plus `runtime_path`: CRI sends runc's options.
    AsRunc,
}

impl Form {
    /// The `runtime_type` the snippet of this form must carry.
    pub fn runtime_type(self) -> &'static str {
        match self {
            Form::Native => RUNTIME_TYPE,
            Form::AsRunc => "io.containerd.runc.v2",
        }
    }
}

/// runc-architect's own runtime type (binary `containerd-shim-runc-architect-v1`).
pub const RUNTIME_TYPE: &str = "io.containerd.runc-architect.v1";

/// The annotation pattern every handler lists in `pod_annotations` and
/// `container_annotations` (hibernation settings come through it).
pub const ANNOTATIONS: &str = "runc-architect.io/*";

/// The handler name used inside the snippet files.
const SNIPPET_HANDLER: &str = "runc-architect";

/// One embedded file of `RuntimeClass/`.
#[derive(Debug, Clone, Copy)]
pub struct Snippet {
    /// Its path in the repository, for messages.
    pub file: &'static str,
    pub text: &'static str,
    pub version: ConfigVersion,
    pub form: Form,
}

/// Every snippet, for every config version and form.
pub const ALL: [Snippet; 4] = [
    Snippet {
        file: "RuntimeClass/containerd-1.7.toml",
        text: include_str!("../../../RuntimeClass/containerd-1.7.toml"),
        version: ConfigVersion::V2,
        form: Form::Native,
    },
    Snippet {
        file: "RuntimeClass/containerd-2.x.toml",
        text: include_str!("../../../RuntimeClass/containerd-2.x.toml"),
        version: ConfigVersion::V3,
        form: Form::Native,
    },
    Snippet {
        file: "RuntimeClass/containerd-as-runc-1.7.toml",
        text: include_str!("../../../RuntimeClass/containerd-as-runc-1.7.toml"),
        version: ConfigVersion::V2,
        form: Form::AsRunc,
    },
    Snippet {
        file: "RuntimeClass/containerd-as-runc-2.x.toml",
        text: include_str!("../../../RuntimeClass/containerd-as-runc-2.x.toml"),
        version: ConfigVersion::V3,
        form: Form::AsRunc,
    },
];

/// The snippet for a config version and form.
pub fn find(version: ConfigVersion, form: Form) -> Snippet {
    // ALL covers every (version, form) pair; the fallback is never taken.
    ALL.into_iter()
        .find(|s| s.version == version && s.form == form)
        .unwrap_or(ALL[0])
}

/// A snippet's handler, ready to merge.
#[derive(Debug, Clone)]
pub struct Template {
    /// The keys from the document root to the `runtimes` table, as the snippet spells them.
    pub path: Vec<Key>,
    /// The handler table, `options` subtable included, positions cleared.
    pub handler: Table,
    /// Whether the snippet writes strings as literal strings (`'…'`, version 3 style).
    pub literal_strings: bool,
}

impl Snippet {
    /// Parses the snippet and checks its shape.
    pub fn template(&self) -> Result<Template, Error> {
        let bad = |message: String| Error::Snippet {
            file: self.file,
            message,
        };
        let doc: DocumentMut = self
            .text
            .parse()
            .map_err(|e: toml_edit::TomlError| bad(e.to_string()))?;
        if doc.contains_key("version") {
            return Err(bad(
                "carries a `version` key (it would change the version of the file it is merged into)"
                    .into(),
            ));
        }
        let names = [
            "plugins",
            self.version.cri_runtime_plugin(),
            "containerd",
            "runtimes",
        ];
        let mut path = Vec::new();
        let mut table = doc.as_table();
        for name in names {
            if table.len() != 1 {
                return Err(bad(format!("expected only `{name}` at this level")));
            }
            let (key, item) = table
                .get_key_value(name)
                .ok_or_else(|| bad(format!("has no `{name}` table")))?;
            path.push(key.clone());
            table = item
                .as_table()
                .ok_or_else(|| bad(format!("`{name}` is not a table")))?;
        }
        if table.len() != 1 {
            return Err(bad("expected exactly one handler table".into()));
        }
        let mut handler = table
            .get(SNIPPET_HANDLER)
            .and_then(Item::as_table)
            .cloned()
            .ok_or_else(|| bad(format!("has no handler table `{SNIPPET_HANDLER}`")))?;
        let runtime_type = handler
            .get("runtime_type")
            .and_then(Item::as_value)
            .and_then(toml_edit::Value::as_str);
        if runtime_type != Some(self.form.runtime_type()) {
            return Err(bad(format!(
                "runtime_type must be {:?}, is {runtime_type:?}",
                self.form.runtime_type()
            )));
        }
        let literal_strings = match handler.get("runtime_type").and_then(Item::as_value) {
            Some(toml_edit::Value::String(s)) => s
                .as_repr()
                .and_then(|r| r.as_raw().as_str())
                .is_some_and(|raw| raw.starts_with('\'')),
            _ => false,
        };
        if !handler.contains_value("runtime_path") {
            return Err(bad("has no runtime_path".into()));
        }
        for key in ["pod_annotations", "container_annotations"] {
            let lists = handler
                .get(key)
                .and_then(Item::as_array)
                .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(ANNOTATIONS)));
            if !lists {
                return Err(bad(format!("{key} must list {ANNOTATIONS:?}")));
            }
        }
        let options = handler
            .get_mut("options")
            .and_then(Item::as_table_mut)
            .ok_or_else(|| bad("has no options table".into()))?;
        options.set_position(None);
        handler.set_position(None);
        Ok(Template {
            path,
            handler,
            literal_strings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_snippet_is_well_formed() {
        for s in ALL {
            let t = s.template().unwrap_or_else(|e| panic!("{}: {e}", s.file));
            assert_eq!(
                t.path[1].get(),
                s.version.cri_runtime_plugin(),
                "{}",
                s.file
            );
            assert_eq!(
                t.literal_strings,
                s.version == ConfigVersion::V3,
                "{}",
                s.file
            );
            // The header says which config version the file is for.
            let wanted = format!("`version = {}`", s.version.number());
            assert!(
                s.text.contains(&wanted),
                "{} does not name {wanted}",
                s.file
            );
        }
    }

    #[test]
    fn find_covers_every_pair() {
        for version in [ConfigVersion::V2, ConfigVersion::V3] {
            for form in [Form::Native, Form::AsRunc] {
                let s = find(version, form);
                assert_eq!((s.version, s.form), (version, form));
            }
        }
    }

    #[test]
    fn a_version_key_is_refused() {
        let s = Snippet {
            text: "version = 2\n[plugins]\n",
            ..ALL[0]
        };
        assert!(s.template().unwrap_err().to_string().contains("version"));
    }
}
