//! The handler table in `plugins.<CRI plugin>.containerd.runtimes`: merging and removal.
//!
//! Merging adds the snippet's handler table where containerd looks for it, creating the
//! tables on the way as implicit ones (no header of their own), so a config without a
//! `runtimes` table gains exactly one `[...runtimes.<handler>]` table and its `options`. A new
//! table has no document position, so toml_edit prints it right after the last table before
//! it in key order, i.e. after the existing runtimes. A handler that is already there (and is
//! runc-architect's) is updated key by key: values that are already right keep their bytes,
//! other keys of the table are kept, and the annotation lists only gain the pattern they lack.
//! Any other handler of the same name is left alone and refused.
//!
//! Removal takes the handler table out of both CRI plugin paths and drops the implicit tables
//! it leaves empty, which restores the bytes of a file the merge had changed.

use std::path::Path;

use toml_edit::{Array, DocumentMut, Item, Key, Table, Value};

use super::binary::SHIM_NAME;
use super::config::ConfigVersion;
use super::options::{self, OptionValue};
use super::snippet::{Form, Template, RUNTIME_TYPE};
use super::Error;

/// What the handler should look like.
#[derive(Debug)]
pub struct Desired<'a> {
    pub name: &'a str,
    pub form: Form,
    pub template: &'a Template,
    /// The installed binary.
    pub runtime_path: &'a str,
    pub options: &'a [(String, OptionValue)],
}

/// What a merge found.
#[derive(Debug, Default)]
pub struct Merged {
    /// The handler was there before (ours; updated in place).
    pub existed: bool,
    /// Keys already in the handler's options that do not reach the shim in this form.
    pub warnings: Vec<String>,
}

/// Merges the handler into `doc`.
pub fn merge(doc: &mut DocumentMut, d: &Desired, file: &Path) -> Result<Merged, Error> {
    let runtimes = descend_creating(doc.as_table_mut(), &d.template.path, file)?;
    let mut merged = Merged::default();
    match runtimes.get_mut(d.name) {
        None => {
            let table = new_handler(d, &sibling_indent(runtimes));
            runtimes.insert_formatted(&Key::new(d.name), Item::Table(table));
        }
        Some(Item::Table(existing)) => {
            if !is_ours(existing) {
                return Err(foreign(existing, d.name, file));
            }
            merged.existed = true;
            update_handler(existing, d, &mut merged.warnings);
        }
        Some(Item::Value(Value::InlineTable(_))) => {
            return Err(Error::InlineTable {
                path: file.to_path_buf(),
                table: dotted(&d.template.path, Some(d.name)),
            })
        }
        Some(_) => {
            return Err(Error::NotATable {
                path: file.to_path_buf(),
                key: dotted(&d.template.path, Some(d.name)),
            })
        }
    }
    Ok(merged)
}

/// Removes handler `name` from `doc` (under either config version's CRI plugin); returns
/// whether there was one.
pub fn remove(doc: &mut DocumentMut, name: &str, file: &Path) -> Result<bool, Error> {
    let mut found = false;
    for version in [ConfigVersion::V2, ConfigVersion::V3] {
        let path = [
            "plugins",
            version.cri_runtime_plugin(),
            "containerd",
            "runtimes",
        ];
        found |= remove_below(doc.as_table_mut(), &path, name, file)?;
    }
    Ok(found)
}

/// Whether a handler table is runc-architect's: our runtime type, or runc's type with
/// `runtime_path` naming our binary.
pub fn is_ours(table: &Table) -> bool {
    let runtime_type = table.get("runtime_type").and_then(Item::as_str);
    let runtime_path = table.get("runtime_path").and_then(Item::as_str);
    ours(runtime_type, runtime_path)
}

fn ours(runtime_type: Option<&str>, runtime_path: Option<&str>) -> bool {
    runtime_type == Some(RUNTIME_TYPE)
        || runtime_path
            .and_then(|p| Path::new(p).file_name())
            .is_some_and(|n| n == SHIM_NAME)
}

fn foreign(table: &Table, name: &str, file: &Path) -> Error {
    let get = |k| {
        table
            .get(k)
            .and_then(Item::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Error::ForeignHandler {
        path: file.to_path_buf(),
        handler: name.to_string(),
        runtime_type: get("runtime_type"),
        runtime_path: get("runtime_path"),
    }
}

fn dotted(path: &[Key], last: Option<&str>) -> String {
    path.iter()
        .map(|k| k.display_repr().into_owned())
        .chain(last.map(|l| Key::new(l).display_repr().into_owned()))
        .collect::<Vec<_>>()
        .join(".")
}

/// Walks `path` from `root`, creating missing tables as implicit ones spelled like the
/// snippet's keys.
fn descend_creating<'d>(
    root: &'d mut Table,
    path: &[Key],
    file: &Path,
) -> Result<&'d mut Table, Error> {
    let mut table = root;
    for (i, key) in path.iter().enumerate() {
        let item = table.entry_format(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = match item {
            Item::Table(t) => t,
            Item::Value(Value::InlineTable(_)) => {
                return Err(Error::InlineTable {
                    path: file.to_path_buf(),
                    table: dotted(&path[..=i], None),
                })
            }
            _ => {
                return Err(Error::NotATable {
                    path: file.to_path_buf(),
                    key: dotted(&path[..=i], None),
                })
            }
        };
    }
    Ok(table)
}

fn remove_below(table: &mut Table, path: &[&str], name: &str, file: &Path) -> Result<bool, Error> {
    let Some((first, rest)) = path.split_first() else {
        return match table.get(name) {
            None => Ok(false),
            Some(Item::Table(t)) if !is_ours(t) => Err(foreign(t, name, file)),
            Some(Item::Value(Value::InlineTable(t))) => {
                let get = |k| t.get(k).and_then(Value::as_str);
                if !ours(get("runtime_type"), get("runtime_path")) {
                    return Err(Error::ForeignHandler {
                        path: file.to_path_buf(),
                        handler: name.to_string(),
                        runtime_type: get("runtime_type").unwrap_or_default().to_string(),
                        runtime_path: get("runtime_path").unwrap_or_default().to_string(),
                    });
                }
                table.remove(name);
                Ok(true)
            }
            Some(Item::Table(_)) => {
                table.remove(name);
                Ok(true)
            }
            Some(_) => Err(Error::NotATable {
                path: file.to_path_buf(),
                key: name.to_string(),
            }),
        };
    };
    let Some(Item::Table(child)) = table.get_mut(first) else {
        return Ok(false);
    };
    let found = remove_below(child, rest, name, file)?;
    if found && child.is_implicit() && child.is_empty() {
        table.remove(first);
    }
    Ok(found)
}

/// The handler as new: the snippet's table, indented like the other handlers (`base`).
fn new_handler(d: &Desired, base: &str) -> Table {
    let mut table = d.template.handler.clone();
    // Keep the comment right above the snippet's table, not the file's header.
    let prefix = decor_prefix(table.decor());
    let own = format!(
        "\n{}",
        prefix.rsplit_once("\n\n").map_or(prefix, |(_, p)| p)
    );
    table.decor_mut().set_prefix(indent(&own, base));
    indent_keys(&mut table, base);
    if let Some(Item::Table(opts)) = table.get_mut("options") {
        let p = indent(decor_prefix(opts.decor()), base);
        opts.decor_mut().set_prefix(p);
        indent_keys(opts, base);
    }
    let path = string_value(d.runtime_path, d.template.literal_strings);
    set_value(&mut table, "runtime_path", path, None);
    if let Some(Item::Table(opts)) = table.get_mut("options") {
        set_options(opts, d);
    }
    table
}

fn decor_prefix(decor: &toml_edit::Decor) -> &str {
    decor.prefix().and_then(|p| p.as_str()).unwrap_or_default()
}

/// Indents the keys of `table` (and the comments above them) by `base`.
fn indent_keys(table: &mut Table, base: &str) {
    if base.is_empty() {
        return;
    }
    // Value keys only: a subtable's key is part of its header path.
    let keys: Vec<String> = table
        .iter()
        .filter(|(_, item)| item.is_value())
        .map(|(k, _)| k.to_string())
        .collect();
    for k in keys {
        if let Some(mut key) = table.key_mut(&k) {
            let p = indent(decor_prefix(key.leaf_decor()), base);
            key.leaf_decor_mut().set_prefix(p);
        }
    }
}

/// `base` before every non-empty line of `s` and at its end (where the header or key goes).
fn indent(s: &str, base: &str) -> String {
    let mut out = String::with_capacity(s.len() + base.len() * 4);
    let mut line_start = true;
    for c in s.chars() {
        if line_start && c != '\n' {
            out.push_str(base);
        }
        out.push(c);
        line_start = c == '\n';
    }
    if line_start {
        out.push_str(base);
    }
    out
}

/// The indentation of the handler tables already in `runtimes` (or one step more than its
/// own header), so a new one lines up with them.
fn sibling_indent(runtimes: &Table) -> String {
    let last_line = |t: &Table| {
        let p = decor_prefix(t.decor());
        let line = p.rsplit_once('\n').map_or(p, |(_, l)| l).to_string();
        line.chars().all(|c| c == ' ' || c == '\t').then_some(line)
    };
    let sibling = runtimes
        .iter()
        .filter_map(|(_, item)| item.as_table())
        .find(|t| !t.is_implicit())
        .and_then(last_line);
    match sibling {
        Some(s) => s,
        None if !runtimes.is_implicit() => last_line(runtimes)
            .map(|l| format!("{l}  "))
            .unwrap_or_default(),
        None => String::new(),
    }
}

fn update_handler(table: &mut Table, d: &Desired, warnings: &mut Vec<String>) {
    for (key, item) in d.template.handler.iter() {
        let Some(wanted) = item.as_value() else {
            continue;
        };
        let template_key = d.template.handler.key(key);
        match (wanted, table.get_mut(key)) {
            (Value::Array(patterns), Some(Item::Value(Value::Array(have)))) => {
                for p in patterns.iter() {
                    if !have.iter().any(|h| same(h, p)) {
                        have.push(p.clone());
                    }
                }
            }
            _ => {
                let wanted = if key == "runtime_path" {
                    string_value(d.runtime_path, d.template.literal_strings)
                } else {
                    wanted.clone()
                };
                set_value(table, key, wanted, template_key);
            }
        }
    }
    if !matches!(table.get("options"), Some(Item::Table(_))) {
        if let Some(Item::Table(opts)) = d.template.handler.get("options") {
            table.insert("options", Item::Table(opts.clone()));
        }
    }
    if let Some(Item::Table(opts)) = table.get_mut("options") {
        set_options(opts, d);
        for (key, _) in opts.iter() {
            if !options::is_known(key, d.form) {
                warnings.push(format!(
                    "handler {:?} has option {key}, which {}",
                    d.name,
                    match d.form {
                        Form::Native => "the shim refuses at container create",
                        Form::AsRunc => "runc's options do not carry to the shim",
                    }
                ));
            }
        }
    }
}

fn set_options(opts: &mut Table, d: &Desired) {
    let indent = option_indent(opts);
    for (key, value) in d.options {
        let value = match value {
            OptionValue::Bool(b) => Value::from(*b),
            OptionValue::Integer(n) => Value::from(*n),
            OptionValue::String(s) => string_value(s, d.template.literal_strings),
        };
        let mut k = Key::new(key.as_str());
        k.leaf_decor_mut().set_prefix(indent.clone());
        set_value(opts, key, value, Some(&k));
    }
}

/// The indentation for a new key of the options table: that of a key already in it, or
/// two more spaces than the table's header.
fn option_indent(opts: &Table) -> String {
    let existing = opts
        .iter()
        .filter_map(|(k, _)| opts.key(k))
        .filter_map(|k| k.leaf_decor().prefix().and_then(|p| p.as_str()))
        .find(|p| p.chars().all(|c| c == ' ' || c == '\t'));
    if let Some(indent) = existing {
        return indent.to_string();
    }
    let header = opts
        .decor()
        .prefix()
        .and_then(|p| p.as_str())
        .unwrap_or_default();
    let last_line = header.rsplit_once('\n').map_or(header, |(_, l)| l);
    if last_line.chars().all(|c| c == ' ' || c == '\t') {
        format!("{last_line}  ")
    } else {
        String::new()
    }
}

/// Sets `table[key] = value` unless it already holds an equal value (then its bytes stay).
/// A new key takes the formatting of `format` when given.
fn set_value(table: &mut Table, key: &str, mut value: Value, format: Option<&Key>) {
    match table.get_mut(key) {
        Some(Item::Value(have)) if same(have, &value) => {}
        Some(item) => {
            if let Item::Value(have) = item {
                // Keep the space before the value and a trailing comment.
                *value.decor_mut() = have.decor().clone();
            }
            *item = Item::Value(value);
        }
        None => {
            let k = format.cloned().unwrap_or_else(|| Key::new(key));
            table.insert_formatted(&k, Item::Value(value));
        }
    }
}

/// A string value, as a literal string (`'…'`) when the file's style is that and the text
/// allows it.
fn string_value(s: &str, literal: bool) -> Value {
    if literal && !s.contains('\'') && !s.chars().any(char::is_control) {
        if let Ok(mut v) = format!("'{s}'").parse::<Value>() {
            v.decor_mut().clear();
            return v;
        }
    }
    Value::from(s)
}

/// Equality of values, whatever their formatting.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x.value() == y.value(),
        (Value::Integer(x), Value::Integer(y)) => x.value() == y.value(),
        (Value::Boolean(x), Value::Boolean(y)) => x.value() == y.value(),
        (Value::Float(x), Value::Float(y)) => x.value() == y.value(),
        (Value::Array(x), Value::Array(y)) => same_arrays(x, y),
        _ => false,
    }
}

fn same_arrays(x: &Array, y: &Array) -> bool {
    x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, b)| same(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::snippet;

    fn merge_text(text: &str, version: ConfigVersion, name: &str) -> String {
        let template = snippet::find(version, Form::Native).template().unwrap();
        let mut doc: DocumentMut = text.parse().unwrap();
        let opts = [("Root".to_string(), OptionValue::String("/run/x".into()))];
        let d = Desired {
            name,
            form: Form::Native,
            template: &template,
            runtime_path: "/opt/bin/containerd-shim-runc-architect-v1",
            options: &opts,
        };
        merge(&mut doc, &d, Path::new("c.toml")).unwrap();
        doc.to_string()
    }

    #[test]
    fn merge_then_remove_restores_the_bytes() {
        let original = "version = 3\n\n# runtimes\n[plugins.'io.containerd.cri.v1.runtime'.containerd]\n  default_runtime_name = 'runc'\n\n# after\n[plugins.'io.containerd.grpc.v1.grpc']\n  address = '/x'\n";
        let merged = merge_text(original, ConfigVersion::V3, "ra");
        assert!(merged.contains(
            "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.ra]\n  runtime_type = 'io.containerd.runc-architect.v1'\n  runtime_path = '/opt/bin/containerd-shim-runc-architect-v1'\n"
        ), "{merged}");
        assert!(
            merged.contains("options]\n    Root = '/run/x'\n"),
            "{merged}"
        );
        // The new table sits right after the containerd table, before the next one.
        let at = |s| merged.find(s).unwrap();
        assert!(at("runtimes.ra]") < at("# after"));
        // Merging again changes nothing.
        assert_eq!(merge_text(&merged, ConfigVersion::V3, "ra"), merged);
        let mut doc: DocumentMut = merged.parse().unwrap();
        assert!(remove(&mut doc, "ra", Path::new("c.toml")).unwrap());
        assert_eq!(doc.to_string(), original);
    }

    #[test]
    fn foreign_handlers_are_refused() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n";
        let template = snippet::find(ConfigVersion::V2, Form::Native)
            .template()
            .unwrap();
        let mut doc: DocumentMut = text.parse().unwrap();
        let d = Desired {
            name: "runc",
            form: Form::Native,
            template: &template,
            runtime_path: "/b/containerd-shim-runc-architect-v1",
            options: &[],
        };
        let e = merge(&mut doc, &d, Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("not runc-architect's"), "{e}");
        let e = remove(&mut doc, "runc", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("not runc-architect's"), "{e}");
    }

    #[test]
    fn inline_handlers_are_removed_only_when_ours() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes]\nra = { runtime_type = \"io.containerd.runc-architect.v1\" }\nrunc = { runtime_type = \"io.containerd.runc.v2\" }\n";
        let mut doc: DocumentMut = text.parse().unwrap();
        assert!(remove(&mut doc, "ra", Path::new("c.toml")).unwrap());
        assert!(!doc.to_string().contains("ra ="));
        let e = remove(&mut doc, "runc", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("not runc-architect's"), "{e}");
    }

    #[test]
    fn inline_tables_are_refused() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n";
        let template = snippet::find(ConfigVersion::V2, Form::Native)
            .template()
            .unwrap();
        let mut doc: DocumentMut = text.parse().unwrap();
        let d = Desired {
            name: "runc-architect",
            form: Form::Native,
            template: &template,
            runtime_path: "/b/containerd-shim-runc-architect-v1",
            options: &[],
        };
        let e = merge(&mut doc, &d, Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("inline table"), "{e}");
    }
}
