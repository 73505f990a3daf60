//! `runc-architect install` / `uninstall`: register the shim with a node's containerd.
//!
//! Install puts the shim binary into a binary directory ([`binary`]), merges the handler
//! table of the matching `RuntimeClass/` snippet ([`snippet`]) into containerd's existing
//! `config.toml` ([`config`], [`handler`]) with `runtime_path` naming the installed binary and
//! the `--option` values ([`options`]; durations checked by [`duration`]), then optionally
//! restarts containerd ([`containerd`]) and labels the node for the RuntimeClass's node
//! selector ([`kube`]).
//!
//! Everything that can be refused is checked before anything is written: the options, the
//! config (parse errors with file, line and column; version 1 refused), the shim binary, the
//! merged result (parsed again, and loaded by the node's containerd when it can be run). The
//! binary goes in before the config names it; the config is replaced atomically. Running
//! twice changes nothing the second time and says so; `--dry-run` prints the diff and writes
//! nothing. Uninstall takes the same steps back: config first, then the label, then the
//! binary.
//!
//! The form merged follows the file: a `version = 2` file gets the version 2 form (also on
//! containerd 2.x, which migrates it), `version = 3` the version 3 form. Only a missing or
//! empty file takes its version from containerd's major (`--containerd-major`, or
//! `containerd --version`).

pub mod binary;
pub mod config;
pub mod containerd;
pub mod duration;
pub mod handler;
pub mod kube;
pub mod options;
pub mod snippet;

use std::io::Write;
use std::path::{Path, PathBuf};

use config::ConfigVersion;
use snippet::Form;

/// Something that stopped an install or uninstall. Nothing was written unless it says so.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot {what}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: not valid TOML: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{path}: containerd config version 1 ({}), whose plugin names this installer does not \
         write; convert it first (containerd 2.x: `containerd config migrate`; 1.x: start from \
         `containerd config default`, which is version 2)",
        if *stated { "`version = 1`" } else { "the file has no `version`" }
    )]
    ConfigV1 { path: PathBuf, stated: bool },
    #[error("{path}: unsupported config `version = {found}` (expected 2 or 3)")]
    UnknownVersion { path: PathBuf, found: String },
    #[error(
        "{path} is at config version 3, which containerd {version} cannot read (1.x reads \
         version 2)"
    )]
    VersionTooNew { path: PathBuf, version: String },
    #[error(
        "{path} is missing or empty, so containerd's major version decides its config version, \
         and it is not known ({reason}); pass --containerd-major 1|2 or --containerd PATH"
    )]
    UnknownMajor { path: PathBuf, reason: String },
    #[error("--containerd-major {0}: expected 1 or 2")]
    BadMajor(u32),
    #[error("--handler {0:?}: a RuntimeClass handler is a lowercase RFC 1123 label (a-z, 0-9, '-', at most 63)")]
    BadHandler(String),
    #[error(
        "{path}: `{table}` is an inline table; write it as a [table] so the handler can be added"
    )]
    InlineTable { path: PathBuf, table: String },
    #[error("{path}: `{key}` is not a table")]
    NotATable { path: PathBuf, key: String },
    #[error(
        "{path}: handler {handler:?} exists and is not runc-architect's (runtime_type \
         {runtime_type:?}, runtime_path {runtime_path:?}); choose another --handler"
    )]
    ForeignHandler {
        path: PathBuf,
        handler: String,
        runtime_type: String,
        runtime_path: String,
    },
    #[error("{file} (embedded when runc-architect was built) is broken: {message}")]
    Snippet { file: &'static str, message: String },
    #[error(transparent)]
    Option(#[from] options::OptionError),
    #[error("shim binary {path}: {message} (pass --shim PATH)")]
    Shim { path: PathBuf, message: String },
    #[error("{program}: {message}")]
    Command { program: String, message: String },
    #[error("{} refuses the merged config, nothing was changed: {message}", containerd.display())]
    Rejected {
        containerd: PathBuf,
        message: String,
    },
    #[error("internal error: the merged config does not parse again: {0}")]
    Reparse(String),
    #[error("labelling the node: {0}")]
    Kube(#[from] kube::KubeError),
}

/// `runc-architect install`.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub config: PathBuf,
    pub bin_dir: PathBuf,
    /// The binary to install; `None`: the shim next to the running executable.
    pub shim: Option<PathBuf>,
    pub containerd: PathBuf,
    pub containerd_major: Option<u32>,
    pub handler: String,
    pub as_runc: bool,
    /// `KEY=VALUE` as given.
    pub options: Vec<String>,
    pub dry_run: bool,
    pub restart: bool,
    pub restart_command: Option<String>,
    pub label_node: Option<String>,
}

/// `runc-architect uninstall`.
#[derive(Debug, Clone)]
pub struct UninstallOptions {
    pub config: PathBuf,
    pub bin_dir: PathBuf,
    pub containerd: PathBuf,
    pub handler: String,
    pub keep_binary: bool,
    pub dry_run: bool,
    pub restart: bool,
    pub restart_command: Option<String>,
    pub label_node: Option<String>,
}

/// What a run changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub binary: bool,
    pub config: bool,
}

/// Installs (see the module docs); reports each step on `out`.
pub fn install(o: &InstallOptions, out: &mut dyn Write) -> Result<Changes, Error> {
    check_handler_name(&o.handler)?;
    let form = if o.as_runc {
        Form::AsRunc
    } else {
        Form::Native
    };
    let opts = options::parse_all(&o.options, form)?;
    // Outside a pod, --label-node fails here, before anything is written.
    let kube = o
        .label_node
        .as_ref()
        .map(|_| kube::Client::in_cluster())
        .transpose()?;
    let mut cfg = config::load(&o.config)?;
    let containerd = node_containerd(&o.containerd, o.containerd_major)?;
    let version = match (cfg.version, &containerd) {
        (Some(ConfigVersion::V3), Known::Ran(v)) if v.major < 2 => {
            return Err(Error::VersionTooNew {
                path: cfg.path.clone(),
                version: v.version.clone(),
            })
        }
        (Some(v), _) => v,
        (None, Known::Ran(v)) => major_version(v.major)?,
        (None, Known::Given(m)) => major_version(*m)?,
        (None, Known::Unknown(reason)) => {
            return Err(Error::UnknownMajor {
                path: cfg.path.clone(),
                reason: reason.clone(),
            })
        }
    };
    let shim = match &o.shim {
        Some(s) => s.clone(),
        None => binary::default_shim()?,
    };
    let dest = binary::target(&o.bin_dir)?;
    let bin_plan = binary::plan(&shim, &dest)?;

    let template = snippet::find(version, form).template()?;
    if cfg.version.is_none() {
        config::initialise(&mut cfg.doc, version);
    }
    let runtime_path = dest.to_string_lossy();
    let desired = handler::Desired {
        name: &o.handler,
        form,
        template: &template,
        runtime_path: &runtime_path,
        options: &opts,
    };
    let merged = handler::merge(&mut cfg.doc, &desired, &cfg.path)?;
    let new_text = cfg.doc.to_string();
    new_text
        .parse::<toml_edit::DocumentMut>()
        .map_err(|e| Error::Reparse(e.to_string()))?;
    let config_changes = new_text != cfg.text;
    for w in &merged.warnings {
        say(out, &format!("warning: {w}"));
    }
    let form_name = match form {
        Form::Native => "",
        Form::AsRunc => " (as runc)",
    };
    let state = describe_version(cfg.version, version, &containerd);

    if o.dry_run {
        say(
            out,
            &format!("shim: {}", describe_bin(bin_plan, &dest, true)),
        );
        if config_changes {
            let before = if cfg.existed { cfg.text.as_str() } else { "" };
            let _ = out.write_all(config::diff(&cfg.path, before, &new_text).as_bytes());
            let verb = if merged.existed { "update" } else { "add" };
            say(
                out,
                &format!(
                    "config: {} ({state}): would {verb} handler {:?}{form_name}",
                    cfg.path.display(),
                    o.handler
                ),
            );
        } else {
            say(out, &up_to_date(&cfg.path, &o.handler));
        }
        if let Some(node) = &o.label_node {
            say(
                out,
                &format!("node {node}: would label {}=true", kube::LABEL),
            );
        }
        say(out, "dry run: nothing was changed");
        return Ok(Changes {
            binary: false,
            config: false,
        });
    }

    let bin_done = binary::install(&shim, &dest)?;
    say(
        out,
        &format!("shim: {}", describe_bin(bin_done, &dest, false)),
    );
    if config_changes {
        write_config(&cfg, &new_text, &containerd, &o.containerd)?;
        let verb = if merged.existed { "updated" } else { "added" };
        say(
            out,
            &format!(
                "config: {} ({state}): {verb} handler {:?}{form_name}",
                cfg.path.display(),
                o.handler
            ),
        );
    } else {
        say(out, &up_to_date(&cfg.path, &o.handler));
    }
    restart_if(config_changes, o.restart, o.restart_command.as_deref(), out)?;
    if let (Some(node), Some(kube)) = (&o.label_node, &kube) {
        kube.set_node_label(node, kube::LABEL, Some("true"))?;
        say(out, &format!("node {node}: labelled {}=true", kube::LABEL));
    }
    let changes = Changes {
        binary: bin_done != binary::Outcome::UpToDate,
        config: config_changes,
    };
    finish(out, changes);
    Ok(changes)
}

/// Uninstalls (see the module docs); reports each step on `out`.
pub fn uninstall(o: &UninstallOptions, out: &mut dyn Write) -> Result<Changes, Error> {
    check_handler_name(&o.handler)?;
    let kube = o
        .label_node
        .as_ref()
        .map(|_| kube::Client::in_cluster())
        .transpose()?;
    let mut cfg = config::load(&o.config)?;
    let found = handler::remove(&mut cfg.doc, &o.handler, &cfg.path)?;
    let new_text = cfg.doc.to_string();
    let config_changes = found && new_text != cfg.text;
    let dest = binary::target(&o.bin_dir)?;
    let bin_there = !o.keep_binary && std::fs::symlink_metadata(&dest).is_ok();

    if o.dry_run {
        if config_changes {
            let _ = out.write_all(config::diff(&cfg.path, &cfg.text, &new_text).as_bytes());
            say(
                out,
                &format!(
                    "config: {}: would remove handler {:?}",
                    cfg.path.display(),
                    o.handler
                ),
            );
        } else {
            say(out, &not_there(&cfg.path, &o.handler));
        }
        if let Some(node) = &o.label_node {
            say(
                out,
                &format!("node {node}: would remove label {}", kube::LABEL),
            );
        }
        if bin_there {
            say(out, &format!("shim: would remove {}", dest.display()));
        }
        say(out, "dry run: nothing was changed");
        return Ok(Changes {
            binary: false,
            config: false,
        });
    }

    if config_changes {
        let containerd = node_containerd(&o.containerd, None)?;
        write_config(&cfg, &new_text, &containerd, &o.containerd)?;
        say(
            out,
            &format!(
                "config: {}: removed handler {:?}",
                cfg.path.display(),
                o.handler
            ),
        );
    } else {
        say(out, &not_there(&cfg.path, &o.handler));
    }
    restart_if(config_changes, o.restart, o.restart_command.as_deref(), out)?;
    if let (Some(node), Some(kube)) = (&o.label_node, &kube) {
        kube.set_node_label(node, kube::LABEL, None)?;
        say(out, &format!("node {node}: removed label {}", kube::LABEL));
    }
    let mut removed = false;
    if o.keep_binary {
        say(out, &format!("shim: kept {}", dest.display()));
    } else if binary::remove(&dest)? {
        removed = true;
        say(out, &format!("shim: removed {}", dest.display()));
    } else {
        say(out, &format!("shim: {} is not there", dest.display()));
    }
    let changes = Changes {
        binary: removed,
        config: config_changes,
    };
    finish(out, changes);
    Ok(changes)
}

/// What is known about the node's containerd.
enum Known {
    Ran(containerd::Version),
    Given(u32),
    Unknown(String),
}

fn node_containerd(binary: &Path, major: Option<u32>) -> Result<Known, Error> {
    if let Some(m) = major {
        major_version(m)?;
        return Ok(Known::Given(m));
    }
    Ok(match containerd::version(binary) {
        Ok(v) => Known::Ran(v),
        Err(e) => Known::Unknown(e.to_string()),
    })
}

fn major_version(major: u32) -> Result<ConfigVersion, Error> {
    ConfigVersion::for_major(major).ok_or(Error::BadMajor(major))
}

fn describe_version(stated: Option<ConfigVersion>, used: ConfigVersion, c: &Known) -> String {
    let who = match c {
        Known::Ran(v) => format!("containerd {}", v.version),
        Known::Given(m) => format!("containerd {m}.x"),
        Known::Unknown(_) => "containerd not run".to_string(),
    };
    match stated {
        Some(_) => format!("config version {}, {who}", used.number()),
        None => format!("new config, version {} for {who}", used.number()),
    }
}

/// Writes the config; the node's containerd loads it first when it could be run.
fn write_config(
    cfg: &config::Config,
    text: &str,
    known: &Known,
    containerd: &Path,
) -> Result<(), Error> {
    config::write(&cfg.path, text, |tmp| match known {
        Known::Ran(_) => containerd::check_config(containerd, tmp),
        _ => Ok(()),
    })
}

fn restart_if(
    changed: bool,
    restart: bool,
    command: Option<&str>,
    out: &mut dyn Write,
) -> Result<(), Error> {
    match (changed, restart) {
        (true, true) => {
            containerd::restart(command)?;
            say(out, "containerd: restarted");
        }
        (true, false) => say(
            out,
            "containerd: restart it to load the change (or pass --restart)",
        ),
        (false, true) => say(out, "containerd: not restarted (config unchanged)"),
        (false, false) => {}
    }
    Ok(())
}

fn check_handler_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadHandler(name.to_string()))
    }
}

fn describe_bin(o: binary::Outcome, dest: &Path, dry_run: bool) -> String {
    let d = dest.display();
    match (o, dry_run) {
        (binary::Outcome::Installed, false) => format!("installed {d}"),
        (binary::Outcome::Replaced, false) => format!("replaced {d}"),
        (binary::Outcome::Installed, true) => format!("would install {d}"),
        (binary::Outcome::Replaced, true) => format!("would replace {d}"),
        (binary::Outcome::UpToDate, _) => format!("{d} is up to date"),
    }
}

fn up_to_date(path: &Path, handler: &str) -> String {
    format!(
        "config: {}: handler {handler:?} is up to date",
        path.display()
    )
}

fn not_there(path: &Path, handler: &str) -> String {
    format!("config: {}: no handler {handler:?}", path.display())
}

fn finish(out: &mut dyn Write, c: Changes) {
    if !c.binary && !c.config {
        say(out, "nothing changed");
    }
}

fn say(out: &mut dyn Write, line: &str) {
    // A closed stdout must not turn a finished install into a failure.
    let _ = writeln!(out, "{line}");
}
