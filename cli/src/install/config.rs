//! containerd's `config.toml`: reading it, telling its version, writing it back safely.
//!
//! The file is edited as a [`toml_edit::DocumentMut`], which keeps every comment, blank line,
//! key order and quoting style of what it does not touch, so a merge shows up as a few added
//! lines in a diff. Writes go to a temp file in the same directory, optionally checked by the
//! node's own containerd (`containerd --config TMP config dump`), then renamed over the file:
//! containerd never sees a half-written config.
//!
//! Versions: containerd 1.6/1.7 read `version = 2` (CRI plugin `io.containerd.grpc.v1.cri`);
//! 2.x reads `version = 3` (`io.containerd.cri.v1.runtime`) and also migrates a version 2 file
//! on load, so a file's own version decides which form is merged. A file without `version` is
//! version 1 to containerd (old plugin names), which is refused.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Value};

use super::Error;

/// A config version this installer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigVersion {
    /// containerd 1.6/1.7 (and 2.x, which migrates it).
    V2,
    /// containerd 2.x.
    V3,
}

impl ConfigVersion {
    pub fn number(self) -> i64 {
        match self {
            ConfigVersion::V2 => 2,
            ConfigVersion::V3 => 3,
        }
    }

    /// The CRI plugin that holds `containerd.runtimes` in this version.
    pub fn cri_runtime_plugin(self) -> &'static str {
        match self {
            ConfigVersion::V2 => "io.containerd.grpc.v1.cri",
            ConfigVersion::V3 => "io.containerd.cri.v1.runtime",
        }
    }

    /// The version `containerd config default` of this major writes.
    pub fn for_major(major: u32) -> Option<ConfigVersion> {
        match major {
            1 => Some(ConfigVersion::V2),
            2 => Some(ConfigVersion::V3),
            _ => None,
        }
    }
}

/// A loaded config file.
#[derive(Debug)]
pub struct Config {
    /// The file to write: the path given, or what it links to.
    pub path: PathBuf,
    /// Whether the file existed.
    pub existed: bool,
    /// The file's text as parsed (a missing final newline added: toml_edit always writes one).
    pub text: String,
    pub doc: DocumentMut,
    /// `None` for a missing or empty file (nothing but comments and blank lines).
    pub version: Option<ConfigVersion>,
}

/// Reads and parses `path`; a missing file is an empty config.
pub fn load(path: &Path) -> Result<Config, Error> {
    // Write through a symlink (some distributions link config.toml elsewhere), not over it.
    let path = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    };
    let original = match fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(Error::Io {
                what: "read",
                path,
                source,
            })
        }
    };
    let existed = original.is_some();
    let mut text = original.unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        let (line, column) = line_column(&text, e.span().map_or(0, |s| s.start));
        Error::Parse {
            path: path.clone(),
            line,
            column,
            message: e.message().to_string(),
        }
    })?;
    let version = detect_version(&doc, &path)?;
    Ok(Config {
        path,
        existed,
        text,
        doc,
        version,
    })
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, l)| l)
        .chars()
        .count()
        + 1;
    (line, column)
}

fn detect_version(doc: &DocumentMut, path: &Path) -> Result<Option<ConfigVersion>, Error> {
    let Some(item) = doc.get("version") else {
        if doc.as_table().is_empty() {
            return Ok(None);
        }
        return Err(Error::ConfigV1 {
            path: path.to_path_buf(),
            stated: false,
        });
    };
    match item.as_value().and_then(Value::as_integer) {
        Some(1) => Err(Error::ConfigV1 {
            path: path.to_path_buf(),
            stated: true,
        }),
        Some(2) => Ok(Some(ConfigVersion::V2)),
        Some(3) => Ok(Some(ConfigVersion::V3)),
        _ => Err(Error::UnknownVersion {
            path: path.to_path_buf(),
            found: item.to_string().trim().to_string(),
        }),
    }
}

/// Gives an empty document its `version`, above any comments it has.
pub fn initialise(doc: &mut DocumentMut, version: ConfigVersion) {
    let comments = doc.trailing().as_str().unwrap_or_default().to_string();
    doc.set_trailing("");
    doc.insert("version", Item::Value(Value::from(version.number())));
    if let Some(mut key) = doc.key_mut("version") {
        key.leaf_decor_mut().set_prefix(comments);
    }
}

/// A unified diff of the file before and after (empty when they are equal).
pub fn diff(path: &Path, before: &str, after: &str) -> String {
    if before == after {
        return String::new();
    }
    let name = path.display().to_string();
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(3)
        .header(&name, &name)
        .to_string()
}

/// Replaces `path` with `text` atomically: a temp file beside it (the old file's mode and
/// owner, 0644 root for a new one), `check` run on the temp file, fsync, rename, fsync of the
/// directory. Nothing changes when `check` fails.
pub fn write(
    path: &Path,
    text: &str,
    check: impl FnOnce(&Path) -> Result<(), Error>,
) -> Result<(), Error> {
    let io = |what, p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io {
            what,
            path: p,
            source,
        }
    };
    let dir = parent_dir(path);
    fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
    let old = fs::metadata(path).ok();
    let mode = old
        .as_ref()
        .map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let name = path.file_name().map_or_else(
        || "config.toml".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = dir.join(format!(".{name}.runc-architect-{}", std::process::id()));
    let guard = TempFile(tmp.clone());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
    match &old {
        Some(m) => std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())),
        None if nix::unistd::geteuid().is_root() => std::os::unix::fs::fchown(&f, Some(0), Some(0)),
        None => Ok(()),
    }
    .map_err(io("chown", &tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("chmod", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    drop(f);
    check(&tmp)?;
    fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    std::mem::forget(guard);
    sync_dir(&dir)
}

/// The directory of `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsyncs a directory so a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            what: "sync directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// Removes a temp file unless forgotten.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column() {
        assert_eq!(line_column("a = 1\nb = \n", 10), (2, 5));
        assert_eq!(line_column("x", 0), (1, 1));
        assert_eq!(line_column("é = x", 5), (1, 5));
    }

    #[test]
    fn versions() {
        let v = |s: &str| detect_version(&s.parse().unwrap(), Path::new("c.toml"));
        assert_eq!(v("").unwrap(), None);
        assert_eq!(v("# just a comment\n").unwrap(), None);
        assert_eq!(v("version = 2").unwrap(), Some(ConfigVersion::V2));
        assert_eq!(v("version = 3").unwrap(), Some(ConfigVersion::V3));
        assert!(v("root = '/x'")
            .unwrap_err()
            .to_string()
            .contains("version 1"));
        assert!(v("version = 1")
            .unwrap_err()
            .to_string()
            .contains("version 1"));
        assert!(v("version = '2'").unwrap_err().to_string().contains("'2'"));
        assert!(v("version = 4").is_err());
    }

    #[test]
    fn initialise_keeps_comments_on_top() {
        let mut doc: DocumentMut = "# node config\n\n".parse().unwrap();
        initialise(&mut doc, ConfigVersion::V3);
        assert_eq!(doc.to_string(), "# node config\n\nversion = 3\n");
    }
}
