//! Tests of `runc-architect install` / `uninstall`: the real binary against real containerd
//! configs of both majors.
//!
//! The configs are what `containerd config default` of the private containerd 1.7 and 2.1
//! (`$RA_PREFIX/containerd-{1.7,2.1}/usr/bin/containerd`, default prefix /opt/runc-architect)
//! writes, plus hand-written ones. Every merged config is loaded by the real containerd of its
//! major (`containerd --config FILE config dump`), and the dump must show the handler.
//! `RA_ONLY_CONTAINERD=1.7|2.1` limits the tests to one series, as in scripts/test.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use toml_edit::{DocumentMut, Item};

const BIN: &str = env!("CARGO_BIN_EXE_runc-architect");
const SHIM_NAME: &str = "containerd-shim-runc-architect-v1";
const RUNTIME_TYPE: &str = "io.containerd.runc-architect.v1";

/// A private containerd series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Series {
    V17,
    V21,
}

impl Series {
    fn name(self) -> &'static str {
        match self {
            Series::V17 => "1.7",
            Series::V21 => "2.1",
        }
    }

    fn containerd(self) -> PathBuf {
        let prefix = std::env::var_os("RA_PREFIX")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/opt/runc-architect"));
        let p = prefix
            .join(format!("containerd-{}", self.name()))
            .join("usr/bin/containerd");
        assert!(
            p.is_file(),
            "{} is missing: run scripts/setup (or set RA_PREFIX / RA_ONLY_CONTAINERD)",
            p.display()
        );
        p
    }

    /// The CRI plugin holding the runtimes in the config this series writes by default.
    fn plugin(self) -> &'static str {
        match self {
            Series::V17 => "io.containerd.grpc.v1.cri",
            Series::V21 => "io.containerd.cri.v1.runtime",
        }
    }

    fn default_config(self) -> String {
        let out = Command::new(self.containerd())
            .args(["config", "default"])
            .output()
            .unwrap();
        assert!(out.status.success(), "containerd config default failed");
        String::from_utf8(out.stdout).unwrap()
    }
}

fn series() -> Vec<Series> {
    match std::env::var("RA_ONLY_CONTAINERD").as_deref() {
        Ok("1.7") => vec![Series::V17],
        Ok("2.1") => vec![Series::V21],
        _ => vec![Series::V17, Series::V21],
    }
}

/// A temp dir with a config path, a binary dir and a shim to install.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("bin")).unwrap();
        // Any file will do as the shim: the installer copies it, it never runs it.
        fs::write(dir.path().join("shim"), b"#!/bin/sh\necho shim v1\n").unwrap();
        Fixture { dir }
    }

    fn with_config(text: &str) -> Fixture {
        let f = Fixture::new();
        fs::write(f.config(), text).unwrap();
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    fn bin_dir(&self) -> PathBuf {
        self.path("bin")
    }

    fn installed(&self) -> PathBuf {
        self.bin_dir().join(SHIM_NAME)
    }

    fn read_config(&self) -> String {
        fs::read_to_string(self.config()).unwrap()
    }

    /// Runs `runc-architect CMD --config … --bin-dir … [--shim …] ARGS`.
    fn run(&self, cmd: &str, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        c.arg(cmd)
            .arg("--config")
            .arg(self.config())
            .arg("--bin-dir")
            .arg(self.bin_dir());
        if cmd == "install" {
            c.arg("--shim").arg(self.path("shim"));
        }
        c.args(args).output().unwrap()
    }

    /// Runs `CMD --containerd <the series' containerd> ARGS`.
    fn run_with(&self, cmd: &str, s: Series, args: &[&str]) -> Output {
        let c = cd(s);
        let mut all = vec!["--containerd", c.as_str()];
        all.extend_from_slice(args);
        self.run(cmd, &all)
    }

    fn install(&self, s: Series, args: &[&str]) -> String {
        ok(self.run_with("install", s, args))
    }

    fn uninstall(&self, s: Series, args: &[&str]) -> String {
        ok(self.run_with("uninstall", s, args))
    }

    /// Files in the config's and the binary's directories, but for the fixture's own.
    fn leftovers(&self) -> Vec<String> {
        let mut names = Vec::new();
        for d in [self.dir.path().to_path_buf(), self.bin_dir()] {
            for e in fs::read_dir(d).unwrap() {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                if n.starts_with('.') {
                    names.push(n);
                }
            }
        }
        names
    }
}

/// The series' containerd as a string argument.
fn cd(s: Series) -> String {
    s.containerd().to_string_lossy().into_owned()
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "runc-architect failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Asserts a failure with exit code 1; returns stderr.
fn fails(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected failure, got {}\nstdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `containerd --config FILE config dump` of the real containerd, parsed.
fn dump(s: Series, config: &Path) -> DocumentMut {
    let out = Command::new(s.containerd())
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "containerd {} refuses {}: {}",
        s.name(),
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().parse().unwrap()
}

/// The handler table in a dump (2.x dumps version 3, whatever it read).
fn dumped_handler<'d>(d: &'d DocumentMut, s: Series, handler: &str) -> &'d toml_edit::Table {
    d["plugins"][s.plugin()]["containerd"]["runtimes"][handler]
        .as_table()
        .unwrap_or_else(|| panic!("containerd {} has no handler {handler}", s.name()))
}

fn strings(item: &Item) -> Vec<String> {
    item.as_array()
        .unwrap_or_else(|| panic!("{item} is not an array"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Checks what containerd makes of the handler.
fn assert_handler(
    d: &DocumentMut,
    s: Series,
    handler: &str,
    runtime_type: &str,
    runtime_path: &Path,
) {
    let h = dumped_handler(d, s, handler);
    assert_eq!(h["runtime_type"].as_str(), Some(runtime_type));
    assert_eq!(h["runtime_path"].as_str(), runtime_path.to_str());
    assert_eq!(strings(&h["pod_annotations"]), ["runc-architect.io/*"]);
    assert_eq!(
        strings(&h["container_annotations"]),
        ["runc-architect.io/*"]
    );
}

/// Whether `sub`'s lines appear in `full` in order (nothing of the original lost or moved).
fn lines_kept(sub: &str, full: &str) -> bool {
    let mut rest = full.lines();
    sub.lines().all(|l| rest.any(|f| f == l))
}

#[test]
fn default_configs_of_both_majors_install_idempotently_and_revert() {
    for s in series() {
        let original = s.default_config();
        let fx = Fixture::with_config(&original);
        let out = fx.install(
            s,
            &["--option", "Root=/run/ra", "--option", "NoPivotRoot=true"],
        );
        assert!(out.contains("added handler \"runc-architect\""), "{out}");
        assert!(
            out.contains(&format!("installed {}", fx.installed().display())),
            "{out}"
        );
        let merged = fx.read_config();
        assert!(
            lines_kept(&original, &merged),
            "{}: original lines lost",
            s.name()
        );

        let d = dump(s, &fx.config());
        assert_handler(&d, s, "runc-architect", RUNTIME_TYPE, &fx.installed());
        let opts = &dumped_handler(&d, s, "runc-architect")["options"];
        assert_eq!(opts["Root"].as_str(), Some("/run/ra"));
        assert_eq!(opts["NoPivotRoot"].as_bool(), Some(true));
        // Unrelated settings survive: the stock runc handler is still there.
        let runc = dumped_handler(&d, s, "runc");
        assert_eq!(runc["runtime_type"].as_str(), Some("io.containerd.runc.v2"));

        // The binary: a copy, root-owned, 0755.
        let meta = fs::metadata(fx.installed()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!((meta.uid(), meta.gid()), (0, 0));
        assert_eq!(
            fs::read(fx.installed()).unwrap(),
            fs::read(fx.path("shim")).unwrap()
        );

        // A second run changes nothing and says so.
        let again = fx.install(
            s,
            &["--option", "Root=/run/ra", "--option", "NoPivotRoot=true"],
        );
        assert!(again.contains("nothing changed"), "{again}");
        assert!(again.contains("is up to date"), "{again}");
        assert_eq!(fx.read_config(), merged);

        // Uninstall gives back the original bytes and removes the binary.
        let out = fx.uninstall(s, &[]);
        assert!(out.contains("removed handler"), "{out}");
        assert_eq!(fx.read_config(), original, "{}: not reverted", s.name());
        assert!(!fx.installed().exists());
        let again = fx.uninstall(s, &[]);
        assert!(again.contains("nothing changed"), "{again}");
        assert!(fx.leftovers().is_empty(), "{:?}", fx.leftovers());
    }
}

#[test]
fn as_runc_form_on_both_majors() {
    for s in series() {
        let original = s.default_config();
        let fx = Fixture::with_config(&original);
        let out = fx.install(
            s,
            &[
                "--as-runc",
                "--handler",
                "ra-runc",
                "--option",
                "Root=/run/ra-runc",
                "--option",
                "CriuWorkPath=/var/lib/ra/criu",
            ],
        );
        assert!(out.contains("(as runc)"), "{out}");
        let d = dump(s, &fx.config());
        assert_handler(&d, s, "ra-runc", "io.containerd.runc.v2", &fx.installed());
        let opts = &dumped_handler(&d, s, "ra-runc")["options"];
        assert_eq!(opts["Root"].as_str(), Some("/run/ra-runc"));
        assert_eq!(opts["CriuWorkPath"].as_str(), Some("/var/lib/ra/criu"));
        // runc-architect's own keys do not exist in runc's options.
        let err = fails(fx.run_with(
            "install",
            s,
            &[
                "--as-runc",
                "--handler",
                "ra-runc",
                "--option",
                "StoreConfig=/etc/s.toml",
            ],
        ));
        assert!(err.contains("have no StoreConfig"), "{err}");
        fx.uninstall(s, &["--handler", "ra-runc"]);
        assert_eq!(fx.read_config(), original);
    }
}

const HAND_V2: &str = r#"# Node config, managed by hand.
version = 2
root = "/var/lib/containerd"   # keep on the big disk

# CRI: the kubelet's runtime.
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    # The stock runtime.
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false   # cgroupfs here

# Metrics stay local.
[metrics]
  address = "127.0.0.1:1338"
"#;

const HAND_V3: &str = r#"# Node config, managed by hand.
version = 3
root = '/var/lib/containerd'   # keep on the big disk

# CRI images.
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'

# No runtimes table yet: the installer creates it.
[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false

# Metrics stay local.
[metrics]
  address = '127.0.0.1:1338'
"#;

#[test]
fn hand_written_configs_keep_comments_and_settings() {
    for s in series() {
        let original = match s {
            Series::V17 => HAND_V2,
            Series::V21 => HAND_V3,
        };
        let fx = Fixture::with_config(original);
        fx.install(s, &["--option", "CriuPath=/usr/local/sbin/criu"]);
        let merged = fx.read_config();
        assert!(lines_kept(original, &merged), "{merged}");
        // The handler sits before the next top-level table, after the CRI ones.
        let at = |needle: &str| merged.find(needle).unwrap();
        assert!(
            at("runtimes.runc-architect]") < at("# Metrics stay local."),
            "{merged}"
        );
        let d = dump(s, &fx.config());
        assert_handler(&d, s, "runc-architect", RUNTIME_TYPE, &fx.installed());
        assert_eq!(
            dumped_handler(&d, s, "runc-architect")["options"]["CriuPath"].as_str(),
            Some("/usr/local/sbin/criu")
        );
        assert_eq!(d["metrics"]["address"].as_str(), Some("127.0.0.1:1338"));
        fx.uninstall(s, &["--keep-binary"]);
        assert_eq!(fx.read_config(), original);
        assert!(fx.installed().exists(), "--keep-binary removed the binary");
    }
}

#[test]
fn version_2_config_on_containerd_2_gets_the_version_2_form() {
    let s = Series::V21;
    if !series().contains(&s) {
        return;
    }
    let fx = Fixture::with_config(HAND_V2);
    let out = fx.install(s, &[]);
    assert!(out.contains("config version 2, containerd 2."), "{out}");
    let merged = fx.read_config();
    assert!(merged.starts_with("# Node config, managed by hand.\nversion = 2\n"));
    assert!(merged
        .contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc-architect]"));
    assert!(!merged.contains("io.containerd.cri.v1.runtime"));
    // containerd 2.1 migrates the file and finds the handler in its version 3 place.
    let d = dump(s, &fx.config());
    assert_handler(&d, s, "runc-architect", RUNTIME_TYPE, &fx.installed());
}

#[test]
fn version_3_config_is_refused_for_containerd_1() {
    let s = Series::V17;
    if !series().contains(&s) {
        return;
    }
    let fx = Fixture::with_config(HAND_V3);
    let err = fails(fx.run_with("install", s, &[]));
    assert!(
        err.contains("config version 3, which containerd 1.7"),
        "{err}"
    );
    assert_eq!(fx.read_config(), HAND_V3);
    assert!(!fx.installed().exists());
}

#[test]
fn missing_and_empty_configs_get_the_version_of_the_major() {
    for s in series() {
        let want = match s {
            Series::V17 => "version = 2\n",
            Series::V21 => "version = 3\n",
        };
        // Missing file.
        let fx = Fixture::new();
        let out = fx.install(s, &[]);
        assert!(out.contains("new config"), "{out}");
        let text = fx.read_config();
        assert!(text.starts_with(want), "{text}");
        assert_handler(
            &dump(s, &fx.config()),
            s,
            "runc-architect",
            RUNTIME_TYPE,
            &fx.installed(),
        );
        let mode = fs::metadata(fx.config()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Uninstall leaves the version line it cannot know it added.
        fx.uninstall(s, &[]);
        assert_eq!(fx.read_config(), want);

        // Empty file, and one with comments only (kept above `version`).
        for original in ["", "# containerd: defaults only\n\n"] {
            let fx = Fixture::with_config(original);
            fx.install(s, &[]);
            let text = fx.read_config();
            assert!(text.starts_with(&format!("{original}{want}")), "{text}");
            assert_handler(
                &dump(s, &fx.config()),
                s,
                "runc-architect",
                RUNTIME_TYPE,
                &fx.installed(),
            );
        }
    }
}

#[test]
fn containerd_major_without_a_containerd() {
    let fx = Fixture::new();
    // Nothing to ask and no --containerd-major: refused before anything is written.
    let err = fails(fx.run("install", &["--containerd", "/nonexistent/containerd"]));
    assert!(err.contains("--containerd-major"), "{err}");
    assert!(!fx.config().exists());
    assert!(!fx.installed().exists());
    let err = fails(fx.run("install", &["--containerd-major", "3"]));
    assert!(err.contains("expected 1 or 2"), "{err}");
    // --containerd-major decides; the result is what the real containerd of that major reads.
    for (major, s) in [("1", Series::V17), ("2", Series::V21)] {
        if !series().contains(&s) {
            continue;
        }
        let fx = Fixture::new();
        ok(fx.run(
            "install",
            &[
                "--containerd",
                "/nonexistent/containerd",
                "--containerd-major",
                major,
            ],
        ));
        assert_handler(
            &dump(s, &fx.config()),
            s,
            "runc-architect",
            RUNTIME_TYPE,
            &fx.installed(),
        );
    }
}

#[test]
fn version_1_configs_are_refused() {
    for text in [
        "# old style\n[plugins.cri]\n  sandbox_image = \"pause\"\n",
        "version = 1\n[plugins.cri.containerd]\n  snapshotter = \"overlayfs\"\n",
    ] {
        let fx = Fixture::with_config(text);
        let err = fails(fx.run("install", &["--containerd-major", "2"]));
        assert!(err.contains("version 1"), "{err}");
        assert!(err.contains("containerd config migrate"), "{err}");
        assert!(err.contains(&fx.config().display().to_string()), "{err}");
        assert_eq!(fx.read_config(), text);
        assert!(!fx.installed().exists());
    }
}

#[test]
fn unparsable_config_is_refused_with_its_position() {
    // Line 4, column 25: the end of the line, where the string's closing quote is missing.
    let text =
        "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause\n";
    let fx = Fixture::with_config(text);
    let err = fails(fx.run("install", &["--containerd-major", "1"]));
    let want = format!("{}:4:25:", fx.config().display());
    assert!(err.contains(&want), "wanted {want} in {err}");
    assert_eq!(fx.read_config(), text);
    assert!(!fx.installed().exists());
    let err = fails(fx.run("uninstall", &[]));
    assert!(err.contains(&want), "{err}");
    assert!(fx.leftovers().is_empty());
}

#[test]
fn config_containerd_refuses_is_not_written() {
    let s = series()[0];
    // Valid TOML, but containerd cannot decode it (a string where a list belongs).
    let text = match s {
        Series::V17 => "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  pod_annotations = \"x\"\n",
        Series::V21 => "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n  pod_annotations = 'x'\n",
    };
    let fx = Fixture::with_config(text);
    let err = fails(fx.run_with("install", s, &[]));
    assert!(err.contains("refuses the merged config"), "{err}");
    assert!(
        err.contains("PodAnnotations") || err.contains("[]string"),
        "{err}"
    );
    assert_eq!(fx.read_config(), text);
    assert!(fx.leftovers().is_empty(), "{:?}", fx.leftovers());
}

#[test]
fn dry_run_prints_a_diff_and_writes_nothing() {
    for s in series() {
        let original = s.default_config();
        let fx = Fixture::with_config(&original);
        let out = fx.install(s, &["--dry-run", "--option", "Root=/run/ra"]);
        let name = fx.config().display().to_string();
        assert!(
            out.contains(&format!("--- {name}\n+++ {name}\n@@ ")),
            "{out}"
        );
        assert!(out.contains("+          runtime_type = "), "{out}");
        assert!(out.contains("Root = "), "{out}");
        assert!(out.contains("would add handler"), "{out}");
        assert!(out.contains("would install"), "{out}");
        assert_eq!(fx.read_config(), original);
        assert!(!fx.installed().exists());

        fx.install(s, &[]);
        let merged = fx.read_config();
        let out = fx.uninstall(s, &["--dry-run"]);
        assert!(out.contains("-        [plugins."), "{out}");
        assert!(out.contains("would remove handler"), "{out}");
        assert_eq!(fx.read_config(), merged);
        assert!(fx.installed().exists());
        // Nothing to do: no diff at all.
        let out = fx.install(s, &["--dry-run"]);
        assert!(!out.contains("@@"), "{out}");
        assert!(out.contains("is up to date"), "{out}");
    }
}

#[test]
fn option_validation() {
    let fx = Fixture::with_config("version = 2\n");
    let cases: &[(&[&str], &str)] = &[
        (&["--option", "Bogus=1"], "unknown key"),
        (&["--option", "root=/x"], "did you mean Root?"),
        (&["--option", "NoPivotRoot=yes"], "true or false"),
        (&["--option", "Root=run/ra"], "an absolute path"),
        (&["--option", "IoUid=-1"], "integer"),
        (&["--option", "Root"], "KEY=VALUE"),
        (&["--option", "SystemdCgroup=true"], "systemd"),
        (
            &["--option", "Root=/a", "--option", "Root=/b"],
            "more than once",
        ),
        (
            &["--as-runc", "--option", "CriuPath=/c"],
            "have no CriuPath",
        ),
        (&["--handler", "Runc_Architect"], "RFC 1123"),
    ];
    for (args, want) in cases {
        let mut all = vec!["--containerd-major", "1"];
        all.extend_from_slice(args);
        let err = fails(fx.run("install", &all));
        assert!(err.contains(want), "{args:?}: wanted {want:?} in {err}");
        assert_eq!(fx.read_config(), "version = 2\n");
        assert!(!fx.installed().exists());
    }
}

/// The keys `--option` accepts are the shim's (shim/src/options.rs, `TomlOptions`).
#[test]
fn option_keys_are_the_shims() {
    let src =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shim/src/options.rs"))
            .unwrap();
    let start = src
        .find("struct TomlOptions")
        .expect("TomlOptions in shim/src/options.rs");
    let body = &src[start..start + src[start..].find("\n}").unwrap()];
    let shim: BTreeSet<String> = body
        .split("rename = \"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].to_string())
        .collect();
    assert!(shim.len() >= 10, "{shim:?}");
    let fx = Fixture::with_config("version = 2\n");
    let err = fails(fx.run(
        "install",
        &["--containerd-major", "1", "--option", "Bogus=1"],
    ));
    let list = err.split("the shim accepts ").nth(1).unwrap().trim();
    let ours: BTreeSet<String> = list.split(", ").map(str::to_string).collect();
    assert_eq!(ours, shim);
}

/// The hibernation defaults of the node, written into the handler's options with the types
/// the shim reads (`TomlOptions`: a bool, duration strings, a path), as the real containerd
/// of each major loads them.
#[test]
fn hibernation_options_are_written_with_their_types() {
    let args = [
        "--option",
        "Hibernate=true",
        "--option",
        "FreezeAfter=500ms",
        "--option",
        "ScaledownAfter=1m30s",
        "--option",
        "InitialDelay=0",
        "--option",
        "HibernateDir=/var/lib/ra/hibernate",
        "--option",
        "StoreConfig=/etc/ra/store.toml",
    ];
    for s in series() {
        let original = s.default_config();
        let fx = Fixture::with_config(&original);
        fx.install(s, &args);
        // The file as written: a TOML boolean, and strings (quoted as the file's form quotes).
        let q = match s {
            Series::V17 => '"',
            Series::V21 => '\'',
        };
        let merged = fx.read_config();
        for line in [
            "Hibernate = true".to_string(),
            format!("FreezeAfter = {q}500ms{q}"),
            format!("ScaledownAfter = {q}1m30s{q}"),
            format!("InitialDelay = {q}0{q}"),
            format!("HibernateDir = {q}/var/lib/ra/hibernate{q}"),
        ] {
            assert!(
                merged.lines().any(|l| l.trim() == line),
                "{}: no line {line:?} in\n{merged}",
                s.name()
            );
        }
        // What containerd makes of it (and would hand the shim as TOML).
        let d = dump(s, &fx.config());
        let opts = &dumped_handler(&d, s, "runc-architect")["options"];
        assert_eq!(opts["Hibernate"].as_bool(), Some(true));
        assert_eq!(opts["FreezeAfter"].as_str(), Some("500ms"));
        assert_eq!(opts["ScaledownAfter"].as_str(), Some("1m30s"));
        assert_eq!(opts["InitialDelay"].as_str(), Some("0"));
        assert_eq!(opts["HibernateDir"].as_str(), Some("/var/lib/ra/hibernate"));
        assert_eq!(opts["StoreConfig"].as_str(), Some("/etc/ra/store.toml"));
        // Idempotent, and uninstall gives back the original.
        let again = fx.install(s, &args);
        assert!(again.contains("nothing changed"), "{again}");
        fx.uninstall(s, &[]);
        assert_eq!(fx.read_config(), original, "{}: not reverted", s.name());
    }
}

/// A malformed hibernation option is refused before anything is written, and the message
/// names the key, the value and what the key takes.
#[test]
fn malformed_hibernation_options_are_refused() {
    let fx = Fixture::with_config("version = 2\n");
    let cases: &[(&str, &str)] = &[
        (
            "Hibernate=yes",
            "--option Hibernate=yes: Hibernate takes true or false",
        ),
        (
            "Hibernate=1",
            "--option Hibernate=1: Hibernate takes true or false",
        ),
        (
            "FreezeAfter=2x",
            "--option FreezeAfter=2x: FreezeAfter takes a Go duration such as 500ms, 2s or \
             1m30s (0 for none): unknown unit \"x\"",
        ),
        (
            "ScaledownAfter=60",
            "--option ScaledownAfter=60: ScaledownAfter takes a Go duration such as 500ms, 2s \
             or 1m30s (0 for none): missing unit (ns, us, ms, s, m, h)",
        ),
        (
            "InitialDelay=-5s",
            "--option InitialDelay=-5s: InitialDelay takes a Go duration such as 500ms, 2s or \
             1m30s (0 for none): negative",
        ),
        ("ScaledownAfter=1d", "unknown unit \"d\""),
        (
            "FreezeAfter=",
            "--option FreezeAfter=: FreezeAfter takes a Go duration",
        ),
        ("FreezeAfter=3000000h", "out of range"),
        (
            "HibernateDir=var/lib/hib",
            "--option HibernateDir=var/lib/hib: HibernateDir takes an absolute path",
        ),
        ("hibernate=true", "did you mean Hibernate?"),
    ];
    for (opt, want) in cases {
        let err = fails(fx.run("install", &["--containerd-major", "1", "--option", opt]));
        assert!(err.contains(want), "{opt}: wanted {want:?} in {err}");
        assert_eq!(fx.read_config(), "version = 2\n");
        assert!(!fx.installed().exists());
    }
    // In the --as-runc form containerd would drop them: refused, naming the key.
    for opt in [
        "Hibernate=true",
        "FreezeAfter=2s",
        "ScaledownAfter=60s",
        "InitialDelay=0",
        "HibernateDir=/var/lib/hib",
    ] {
        let key = opt.split('=').next().unwrap();
        let err = fails(fx.run(
            "install",
            &["--containerd-major", "1", "--as-runc", "--option", opt],
        ));
        assert!(err.contains(&format!("have no {key}")), "{opt}: {err}");
    }
}

/// The installer's duration check and the runtime's parser (which the shim uses) accept
/// and refuse the same values, for the same reasons. Both sources are compiled into this
/// test: the CLI cannot depend on the runtime crate (libcontainer).
/// (The `#[path]`s of an inline module are relative to a directory of its name, which
/// does not exist; so the two modules sit at the top level.)
#[path = "../src/install/duration.rs"]
#[allow(dead_code)]
mod cli_duration;
#[path = "../../runtime/src/hibernate/policy/duration.rs"]
#[allow(dead_code)]
mod runtime_duration;

mod durations_agree {
    use super::{cli_duration as cli, runtime_duration as runtime};

    fn both(s: &str) -> (Result<(), String>, Result<(), String>) {
        (
            cli::check_non_negative(s).map_err(|e| e.to_string()),
            runtime::parse_non_negative(s)
                .map(drop)
                .map_err(|e| e.to_string()),
        )
    }

    #[test]
    fn on_a_corpus() {
        let corpus = [
            "",
            "0",
            "-0",
            "+0",
            "0s",
            "-0s",
            "-0.0s",
            "00",
            "1",
            "1.5",
            "s",
            ".",
            ".s",
            "-",
            "+",
            "--1s",
            "+-1s",
            " 1s",
            "1 s",
            "1s ",
            "5s",
            "5.s",
            ".5s",
            "5.6s",
            "1..5s",
            "..5s",
            "1.5.5s",
            "1s.",
            "1.",
            "1h30",
            "300ms",
            "1.5h",
            "2h45m",
            "10.5s4m",
            "1h65m",
            "2x",
            "1d",
            "1S",
            "1sec",
            "1min",
            "1e3s",
            "12\u{b5}s",
            "12\u{3bc}s",
            "\u{fffd}",
            "1\u{fffd}",
            "-1ns",
            "-2m3.4s",
            "9223372036854775807ns",
            "9223372036854775808ns",
            "-9223372036854775808ns",
            "-9223372036854775809ns",
            "2562047h47m16.854775807s",
            "2562047h47m16.854775808s",
            "2562048h",
            "3000000h",
            "9223372036854776us",
            "99999999999999999999999s",
            "99999999999999999999999x",
            "0000000000000000000000000000000000000000001s",
            "0.3333333333333333333h",
            "0.100000000000000000000h",
            "1.000000000000000000000000000001s",
        ];
        for s in corpus {
            let (cli, runtime) = both(s);
            assert_eq!(cli, runtime, "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn on_random_strings(s in "[-+]?[0-9.]{0,6}(ns|us|ms|s|m|h|x|µs)?([0-9.]{0,4}(s|m|h)?){0,2}") {
            let (cli, runtime) = both(&s);
            proptest::prop_assert_eq!(cli, runtime, "{:?}", s);
        }

        #[test]
        fn on_large_values(n in 0u64..u64::MAX, unit in 0usize..6) {
            let s = format!("{n}{}", ["ns", "us", "ms", "s", "m", "h"][unit]);
            let (cli, runtime) = both(&s);
            proptest::prop_assert_eq!(cli, runtime, "{:?}", s);
        }
    }
}

#[test]
fn existing_handler_is_updated_in_place() {
    let s = series()[0];
    let fx = Fixture::with_config(&s.default_config());
    fx.install(s, &["--option", "Root=/a"]);
    // A key the user added by hand, and an annotation pattern of their own.
    let text = fx
        .read_config()
        .replace(
            "pod_annotations = [\"runc-architect.io/*\"]",
            "pod_annotations = [\"example.com/*\"]\n          snapshotter = \"native\"",
        )
        .replace(
            "pod_annotations = ['runc-architect.io/*']",
            "pod_annotations = ['example.com/*']\n          snapshotter = 'native'",
        );
    fs::write(fx.config(), &text).unwrap();
    fs::write(fx.path("shim"), b"#!/bin/sh\necho shim v2\n").unwrap();
    let out = fx.install(s, &["--option", "Root=/b", "--option", "NoPivotRoot=true"]);
    assert!(out.contains("updated handler"), "{out}");
    assert!(out.contains("replaced"), "{out}");
    let merged = fx.read_config();
    assert_eq!(
        merged.matches("runtimes.runc-architect]").count(),
        1,
        "{merged}"
    );
    let d = dump(s, &fx.config());
    let h = dumped_handler(&d, s, "runc-architect");
    assert_eq!(
        strings(&h["pod_annotations"]),
        ["example.com/*", "runc-architect.io/*"]
    );
    assert_eq!(h["snapshotter"].as_str(), Some("native"));
    assert_eq!(h["options"]["Root"].as_str(), Some("/b"));
    assert_eq!(h["options"]["NoPivotRoot"].as_bool(), Some(true));
    assert_eq!(
        fs::read(fx.installed()).unwrap(),
        b"#!/bin/sh\necho shim v2\n"
    );
}

#[test]
fn other_handlers_are_left_alone() {
    let s = series()[0];
    let original = s.default_config();
    let fx = Fixture::with_config(&original);
    let err = fails(fx.run_with("install", s, &["--handler", "runc"]));
    assert!(err.contains("not runc-architect's"), "{err}");
    let err = fails(fx.run("uninstall", &["--handler", "runc"]));
    assert!(err.contains("not runc-architect's"), "{err}");
    assert_eq!(fx.read_config(), original);
}

#[test]
fn config_symlink_is_written_through() {
    let s = series()[0];
    let fx = Fixture::new();
    let real = fx.path("real.toml");
    fs::write(&real, s.default_config()).unwrap();
    std::os::unix::fs::symlink(&real, fx.config()).unwrap();
    fx.install(s, &[]);
    assert!(fs::symlink_metadata(fx.config())
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::read_to_string(&real)
        .unwrap()
        .contains("runtimes.runc-architect]"));
}

#[test]
fn restart_runs_only_when_the_config_changed() {
    let s = series()[0];
    let fx = Fixture::with_config(&s.default_config());
    let log = fx.path("restarts");
    let cmd = format!("echo restarted >> {}", log.display());
    let args = ["--restart", "--restart-command", cmd.as_str()];
    let out = fx.install(s, &args);
    assert!(out.contains("containerd: restarted"), "{out}");
    let out = fx.install(s, &args);
    assert!(out.contains("not restarted (config unchanged)"), "{out}");
    assert_eq!(fs::read_to_string(&log).unwrap(), "restarted\n");
    fx.uninstall(s, &args);
    assert_eq!(fs::read_to_string(&log).unwrap(), "restarted\nrestarted\n");
    // A failing restart is an error (the config is written already, and says so in stdout).
    let err = fails(fx.run_with(
        "install",
        s,
        &[
            "--option",
            "Root=/x",
            "--restart",
            "--restart-command",
            "exit 3",
        ],
    ));
    assert!(err.contains("exit status: 3"), "{err}");
}

/// In a pod with hostPID the installer's mount namespace is not the node's: the restart
/// command must run in PID 1's. Here the installer runs in a new mount namespace whose
/// `marker` directory has a tmpfs with a file over it, and the test process stands for the
/// node's init (`RUNC_ARCHITECT_NODE_PID`: on this machine PID 1's namespaces cannot be
/// opened); in the node's namespace the directory is empty.
#[test]
fn restart_runs_in_the_nodes_namespaces() {
    let s = series()[0];
    let fx = Fixture::with_config(&s.default_config());
    let marker = fx.path("marker");
    fs::create_dir(&marker).unwrap();
    let seen = fx.path("seen");
    let restart = format!("ls -A {} > {}", marker.display(), seen.display());
    let script = format!(
        "mount -t tmpfs none {m} && touch {m}/only-in-the-pod && ls -A {m} > {inner} && exec \"$@\"",
        m = marker.display(),
        inner = fx.path("inner").display(),
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
            BIN,
            "install",
        ])
        .arg("--config")
        .arg(fx.config())
        .arg("--bin-dir")
        .arg(fx.bin_dir())
        .arg("--shim")
        .arg(fx.path("shim"))
        .args([
            "--containerd",
            &cd(s),
            "--restart",
            "--restart-command",
            &restart,
        ])
        .env("RUNC_ARCHITECT_NODE_PID", std::process::id().to_string())
        .output()
        .unwrap();
    ok(out);
    assert_eq!(
        fs::read_to_string(fx.path("inner")).unwrap(),
        "only-in-the-pod\n"
    );
    assert_eq!(
        fs::read_to_string(&seen).unwrap(),
        "",
        "restart ran in the pod's namespace"
    );
    // The config written from inside is the node's file (same path on both sides).
    assert!(fx.read_config().contains("runtimes.runc-architect]"));
}

#[test]
fn sleep_waits_for_sigterm() {
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let s = series()[0];
    let fx = Fixture::with_config(&s.default_config());
    let child = Command::new(BIN)
        .args(["install", "--sleep", "--containerd", &cd(s)])
        .arg("--config")
        .arg(fx.config())
        .arg("--bin-dir")
        .arg(fx.bin_dir())
        .arg("--shim")
        .arg(fx.path("shim"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("containerd:") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "install ended early"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "exited instead of sleeping"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not end --sleep");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

// --- --label-node -----------------------------------------------------------------------
//
// No Kubernetes API server can run on this machine. The test serves the one request the
// installer makes from a small local HTTPS server (rustls, a CA and a server certificate
// for 127.0.0.1 generated here with rcgen) and checks the method, path, bearer token,
// content type and JSON merge patch body of that request.

/// One HTTP request as received.
#[derive(Debug)]
struct Request {
    head: String,
    body: String,
}

struct FakeApiServer {
    port: u16,
    ca_pem: String,
    thread: Option<std::thread::JoinHandle<Vec<Request>>>,
}

impl FakeApiServer {
    /// Answers `n` requests with `status` and `body`.
    fn start(n: usize, status: u16, body: &'static str) -> FakeApiServer {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test cluster CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..n {
                let (tcp, _) = listener.accept().unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                got.push(read_request(&mut tls));
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                tls.write_all(reply.as_bytes()).unwrap();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
            got
        });
        FakeApiServer {
            port,
            ca_pem: ca.pem(),
            thread: Some(thread),
        }
    }

    fn requests(mut self) -> Vec<Request> {
        self.thread.take().unwrap().join().unwrap()
    }
}

fn read_request(s: &mut impl Read) -> Request {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    Request {
        head,
        body: String::from_utf8(body).unwrap(),
    }
}

fn header<'r>(r: &'r Request, name: &str) -> Option<&'r str> {
    r.head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Runs install or uninstall with `--label-node` against `server`.
fn run_labelled(fx: &Fixture, server: &FakeApiServer, cmd: &str, extra: &[&str]) -> Output {
    let sa = fx.path("serviceaccount");
    fs::create_dir_all(&sa).unwrap();
    fs::write(sa.join("token"), "test-token-123\n").unwrap();
    fs::write(sa.join("ca.crt"), &server.ca_pem).unwrap();
    let mut c = Command::new(BIN);
    c.arg(cmd)
        .arg("--config")
        .arg(fx.config())
        .arg("--bin-dir")
        .arg(fx.bin_dir())
        .args(["--label-node", "node-1"])
        .args(extra)
        .env("RUNC_ARCHITECT_SERVICEACCOUNT_DIR", &sa)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", server.port.to_string());
    if cmd == "install" {
        c.arg("--shim").arg(fx.path("shim"));
    }
    c.output().unwrap()
}

#[test]
fn label_node_patches_the_node_through_the_api() {
    let s = series()[0];
    let fx = Fixture::with_config(&s.default_config());
    let server = FakeApiServer::start(2, 200, "{\"kind\":\"Node\"}");
    let out = ok(run_labelled(
        &fx,
        &server,
        "install",
        &["--containerd", &cd(s)],
    ));
    assert!(
        out.contains("node node-1: labelled runc-architect.io/installed=true"),
        "{out}"
    );
    let out = ok(run_labelled(
        &fx,
        &server,
        "uninstall",
        &["--containerd", &cd(s)],
    ));
    assert!(out.contains("removed label"), "{out}");
    let reqs = server.requests();
    let bodies = [
        serde_json::json!({"metadata": {"labels": {"runc-architect.io/installed": "true"}}}),
        serde_json::json!({"metadata": {"labels": {"runc-architect.io/installed": null}}}),
    ];
    for (r, want) in reqs.iter().zip(bodies) {
        assert!(
            r.head
                .starts_with("PATCH /api/v1/nodes/node-1 HTTP/1.1\r\n"),
            "{}",
            r.head
        );
        assert_eq!(header(r, "authorization"), Some("Bearer test-token-123"));
        assert_eq!(
            header(r, "content-type"),
            Some("application/merge-patch+json")
        );
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body, want);
    }
}

#[test]
fn label_node_reports_the_api_servers_refusal() {
    let s = series()[0];
    let fx = Fixture::with_config(&s.default_config());
    let server = FakeApiServer::start(
        1,
        403,
        r#"{"kind":"Status","status":"Failure","message":"nodes \"node-1\" is forbidden: cannot patch","code":403}"#,
    );
    let err = fails(run_labelled(
        &fx,
        &server,
        "install",
        &["--containerd", &cd(s)],
    ));
    assert!(err.contains("HTTP 403"), "{err}");
    assert!(err.contains("is forbidden: cannot patch"), "{err}");
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn label_node_outside_a_pod_fails_clearly() {
    let fx = Fixture::with_config("version = 2\n");
    let out = Command::new(BIN)
        .args([
            "install",
            "--containerd-major",
            "1",
            "--label-node",
            "node-1",
            "--shim",
        ])
        .arg(fx.path("shim"))
        .arg("--config")
        .arg(fx.config())
        .arg("--bin-dir")
        .arg(fx.bin_dir())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let err = fails(out);
    assert!(err.contains("KUBERNETES_SERVICE_HOST is not set"), "{err}");
}

// --- the DaemonSet's image ----------------------------------------------------------------
//
// scripts/installer-image builds the image; a private containerd (own root, state and
// sockets in a temp dir, no CRI) runs it with `ctr run` the way the DaemonSet does:
// privileged, in the node's PID namespace (hostPID), the config and binary directories bound
// at the same paths. The installer in the container has neither containerd nor a shell: it
// must run `containerd --version`, `config dump` and the restart command in the node's
// namespaces, and reach the (fake) API server with the service account's files.

/// A private containerd daemon, stopped and removed on drop.
struct Daemon {
    dir: tempfile::TempDir,
    series: Series,
    child: Child,
    /// The test container's id (unique: cgroup paths are shared between daemons).
    container: String,
}

impl Daemon {
    fn start(s: Series) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let config = match s {
            Series::V17 => format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{d}/containerd.sock\"\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
            ),
            Series::V21 => format!(
                "version = 3\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{d}/containerd.sock\"\n[plugins.'io.containerd.internal.v1.opt']\n  path = \"{d}/opt\"\n[plugins.'io.containerd.nri.v1.nri']\n  disable = true\n"
            ),
        };
        fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new(s.containerd())
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            dir,
            series: s,
            child,
            container: format!("ra-installer-test-{}", std::process::id()),
        };
        let sock = daemon.dir.path().join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self) -> Command {
        let ctr = self.series.containerd().with_file_name("ctr");
        let mut c = Command::new(ctr);
        c.arg("-a").arg(self.dir.path().join("containerd.sock"));
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A container left by a failed test goes first, then the daemon.
        let id = self.container.clone();
        for args in [
            &["tasks", "kill", "-s", "SIGKILL", &id][..],
            &["tasks", "delete", "-f", &id][..],
            &["containers", "delete", &id][..],
        ] {
            let _ = self.ctr().args(args).stderr(Stdio::null()).output();
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn installer_image_runs_the_daemonset_steps_in_a_container() {
    let s = *series().last().unwrap();
    let fx = Fixture::with_config(&s.default_config());
    let image = fx.path("installer.oci.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/installer-image");
    let out = Command::new(script)
        .arg(&image)
        .env("RA_CLI_BINARY", BIN)
        .env("RA_SHIM_BINARY", fx.path("shim"))
        .env("RA_INSTALLER_IMAGE", "runc-architect-installer:test")
        .output()
        .unwrap();
    ok(out);

    let daemon = Daemon::start(s);
    ok(daemon
        .ctr()
        .args(["images", "import"])
        .arg(&image)
        .output()
        .unwrap());
    let server = FakeApiServer::start(1, 200, "{\"kind\":\"Node\"}");
    let sa = fx.path("serviceaccount");
    fs::create_dir_all(&sa).unwrap();
    fs::write(sa.join("token"), "pod-token\n").unwrap();
    fs::write(sa.join("ca.crt"), &server.ca_pem).unwrap();

    let dir = fx.dir.path().display().to_string();
    let restarted = fx.path("restarted");
    let me = std::process::id();
    let restart = format!("readlink /proc/self/ns/mnt > {}", restarted.display());
    let private = daemon.dir.path().display().to_string();
    let out = daemon
        .ctr()
        .args(["run", "--rm", "--privileged", "--net-host"])
        .arg(format!("--with-ns=pid:/proc/{me}/ns/pid"))
        .arg(format!("--runc-root={private}/runc"))
        .arg(format!("--fifo-dir={private}/fifo"))
        .arg(format!(
            "--mount=type=bind,src={dir},dst={dir},options=rbind:rw"
        ))
        .arg(format!("--env=RUNC_ARCHITECT_NODE_PID={me}"))
        .arg(format!(
            "--env=RUNC_ARCHITECT_SERVICEACCOUNT_DIR={}",
            sa.display()
        ))
        .arg("--env=KUBERNETES_SERVICE_HOST=127.0.0.1")
        .arg(format!("--env=KUBERNETES_SERVICE_PORT={}", server.port))
        .args(["runc-architect-installer:test", &daemon.container])
        .args([
            "/usr/lib/runc-architect/runc-architect",
            "install",
            "--label-node",
            "node-1",
        ])
        .arg("--config")
        .arg(fx.config())
        .arg("--bin-dir")
        .arg(fx.bin_dir())
        .arg("--containerd")
        .arg(s.containerd())
        .args(["--restart", "--restart-command", &restart])
        .output()
        .unwrap();
    let stdout = ok(out);
    assert!(stdout.contains("added handler"), "{stdout}");
    assert!(
        stdout.contains(&format!("containerd {}", s.name())),
        "{stdout}"
    );
    // The restart ran in the node's mount namespace, not the container's.
    let node_mnt = fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_eq!(
        fs::read_to_string(&restarted).unwrap().trim(),
        node_mnt.to_str().unwrap()
    );
    assert_handler(
        &dump(s, &fx.config()),
        s,
        "runc-architect",
        RUNTIME_TYPE,
        &fx.installed(),
    );
    assert_eq!(
        fs::read(fx.installed()).unwrap(),
        fs::read(fx.path("shim")).unwrap()
    );
    let reqs = server.requests();
    assert!(
        reqs[0].head.starts_with("PATCH /api/v1/nodes/node-1 "),
        "{}",
        reqs[0].head
    );
    assert_eq!(header(&reqs[0], "authorization"), Some("Bearer pod-token"));
    drop(daemon);
}

/// The DaemonSet calls flags that exist, the binary where the image has it, and the image
/// name scripts/installer-image gives by default.
#[test]
fn daemonset_manifest_matches_the_cli_and_the_image() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let yaml = fs::read_to_string(root.join("RuntimeClass/installer-daemonset.yaml")).unwrap();
    let help = ok(Command::new(BIN)
        .args(["install", "--help"])
        .output()
        .unwrap());
    let flags: Vec<&str> = yaml
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- --"))
        .map(|f| f.split('=').next().unwrap())
        .collect();
    assert!(
        flags.contains(&"label-node") && flags.contains(&"sleep"),
        "{flags:?}"
    );
    for f in flags {
        assert!(
            help.contains(&format!("--{f}")),
            "--{f} is not a flag of install"
        );
    }
    let command = "command: [\"/usr/lib/runc-architect/runc-architect\"]";
    assert!(yaml.contains(command), "{yaml}");
    let script = fs::read_to_string(root.join("scripts/installer-image")).unwrap();
    assert!(script.contains("\"$rootfs/usr/lib/runc-architect/runc-architect\""));
    let image = format!(
        "image: runc-architect-installer:{}",
        env!("CARGO_PKG_VERSION")
    );
    assert!(yaml.contains(&image), "wanted {image}");
}
