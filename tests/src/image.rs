//! Test images built locally: an OCI image layout tarball (one uncompressed layer) written in
//! Rust and imported with `ctr images import`. No registry is involved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::ctr::Ctr;
use crate::process;

/// Where the static busybox comes from (Debian's busybox-static), unless `RA_BUSYBOX` says.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// The name of the standard test image ([`ImageBuilder::busybox`]).
pub const BUSYBOX_IMAGE: &str = "runc-architect-test/busybox:latest";

/// The PATH in the image config.
pub const IMAGE_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone, Debug)]
enum Entry {
    Dir { mode: u32, uid: u64, gid: u64 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

/// Builds a single-layer OCI image.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    name: String,
    entries: BTreeMap<String, Entry>,
    env: Vec<String>,
    cmd: Vec<String>,
    entrypoint: Vec<String>,
    working_dir: String,
    user: String,
    labels: BTreeMap<String, String>,
}

/// What [`ImageBuilder::write_oci_tar`] wrote.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub name: String,
    pub tarball: PathBuf,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn norm(path: &str) -> String {
    path.trim_matches('/').to_string()
}

/// The OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl ImageBuilder {
    /// An empty image named `name` (e.g. `runc-architect-test/foo:latest`).
    pub fn new(name: &str) -> ImageBuilder {
        ImageBuilder {
            name: name.to_string(),
            entries: BTreeMap::new(),
            env: vec![IMAGE_PATH_ENV.to_string()],
            cmd: vec!["sh".into()],
            entrypoint: Vec::new(),
            working_dir: "/".into(),
            user: String::new(),
            labels: BTreeMap::new(),
        }
    }

    /// The standard test image: static busybox at /bin/busybox with a symlink for every applet,
    /// /bin/sh, /etc/passwd and /etc/group with root, `user` (1000:1000) and nobody, and the
    /// usual empty directories.
    pub fn busybox(name: &str) -> Result<ImageBuilder> {
        let busybox = std::env::var_os("RA_BUSYBOX")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX));
        let data = std::fs::read(&busybox).with_context(|| {
            format!(
                "read the static busybox {} (install Debian's busybox-static: scripts/setup, or set RA_BUSYBOX)",
                busybox.display()
            )
        })?;
        let mut cmd = Command::new(&busybox);
        cmd.arg("--list-full");
        let list = process::run(cmd, None, Duration::from_secs(10))?.ok()?;
        let mut b = ImageBuilder::new(name);
        for (d, mode) in [
            ("bin", 0o755),
            ("sbin", 0o755),
            ("usr/bin", 0o755),
            ("usr/sbin", 0o755),
            ("etc", 0o755),
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("var", 0o755),
            ("var/tmp", 0o1777),
            ("mnt", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
        ] {
            b = b.dir(d, mode);
        }
        b.entries.insert(
            "home/user".into(),
            Entry::Dir {
                mode: 0o755,
                uid: 1000,
                gid: 1000,
            },
        );
        b = b.file("bin/busybox", data, 0o755);
        for applet in list.stdout_str().lines() {
            let applet = norm(applet);
            if applet.is_empty() || applet == "bin/busybox" {
                continue;
            }
            b = b.symlink(&applet, "/bin/busybox");
        }
        b = b
            .file(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\n\
                  user:x:1000:1000:user:/home/user:/bin/sh\n\
                  nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                    .to_vec(),
                0o644,
            )
            .file(
                "etc/group",
                b"root:x:0:\nuser:x:1000:\nextra:x:1001:user\nnogroup:x:65534:\n".to_vec(),
                0o644,
            )
            .file("etc/hostname", b"image-hostname\n".to_vec(), 0o644)
            .file("etc/image-marker", b"from the image\n".to_vec(), 0o644);
        Ok(b)
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.entries.insert(
            norm(path),
            Entry::Dir {
                mode,
                uid: 0,
                gid: 0,
            },
        );
        self
    }

    pub fn file(mut self, path: &str, data: Vec<u8>, mode: u32) -> Self {
        self.entries.insert(norm(path), Entry::File { data, mode });
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.insert(
            norm(path),
            Entry::Symlink {
                target: target.to_string(),
            },
        );
        self
    }

    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.to_string());
        self
    }

    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn entrypoint(mut self, ep: &[&str]) -> Self {
        self.entrypoint = ep.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn working_dir(mut self, wd: &str) -> Self {
        self.working_dir = wd.to_string();
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = user.to_string();
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.to_string(), v.to_string());
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The layer as an uncompressed tar (deterministic: sorted, mtime 0, parents first).
    pub fn layer_tar(&self) -> Result<Vec<u8>> {
        // Every parent directory gets an entry of its own.
        let mut all = self.entries.clone();
        for path in self.entries.keys() {
            let mut p = Path::new(path).parent();
            while let Some(d) = p {
                let s = d.to_string_lossy().to_string();
                if s.is_empty() {
                    break;
                }
                all.entry(s).or_insert(Entry::Dir {
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                });
                p = d.parent();
            }
        }
        let mut tb = tar::Builder::new(Vec::new());
        // BTreeMap order puts "a" before "a/b": parents come first.
        for (path, e) in &all {
            let mut h = tar::Header::new_ustar();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match e {
                Entry::Dir { mode, uid, gid } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_uid(*uid);
                    h.set_gid(*gid);
                    h.set_size(0);
                    tb.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                }
                Entry::File { data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    tb.append_data(&mut h, path, data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tb.append_link(&mut h, path, target)?;
                }
            }
        }
        Ok(tb.into_inner()?)
    }

    /// Unpacks the image's files into `dir` (a root filesystem for a hand-made bundle).
    pub fn unpack_into(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let layer = self.layer_tar()?;
        let mut ar = tar::Archive::new(layer.as_slice());
        ar.set_preserve_permissions(true);
        ar.set_preserve_ownerships(true);
        ar.set_overwrite(true);
        ar.unpack(dir)
            .with_context(|| format!("unpack {} into {}", self.name, dir.display()))
    }

    /// Writes the image as an OCI image layout tarball at `out`.
    pub fn write_oci_tar(&self, out: &Path) -> Result<BuiltImage> {
        let layer = self.layer_tar()?;
        let layer_digest = format!("sha256:{}", sha256_hex(&layer));
        let mut config = json!({
            "Env": self.env,
            "Cmd": self.cmd,
            "WorkingDir": self.working_dir,
            "Labels": self.labels,
        });
        if !self.entrypoint.is_empty() {
            config["Entrypoint"] = json!(self.entrypoint);
        }
        if !self.user.is_empty() {
            config["User"] = json!(self.user);
        }
        let config_blob = serde_json::to_vec(&json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": oci_arch(),
            "os": "linux",
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
            "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "runc-architect-tests" }],
        }))?;
        let config_digest = format!("sha256:{}", sha256_hex(&config_blob));
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_blob.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))?;
        let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
        let tag = self
            .name
            .rsplit_once(':')
            .map(|(_, t)| t)
            .unwrap_or("latest");
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "platform": { "architecture": oci_arch(), "os": "linux" },
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }))?;

        let mut tb = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_ustar();
            h.set_mtime(0);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_entry_type(tar::EntryType::Regular);
            tb.append_data(&mut h, path, data)?;
            Ok(())
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json", &index)?;
        for (digest, data) in [
            (&layer_digest, &layer),
            (&config_digest, &config_blob),
            (&manifest_digest, &manifest),
        ] {
            let hexd = digest.strip_prefix("sha256:").unwrap_or(digest);
            add(&format!("blobs/sha256/{hexd}"), data)?;
        }
        let bytes = tb.into_inner()?;
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, bytes).with_context(|| format!("write {}", out.display()))?;
        Ok(BuiltImage {
            name: self.name.clone(),
            tarball: out.to_path_buf(),
            manifest_digest,
        })
    }

    /// Writes the tarball into `dir` and imports it into `ctr`'s namespace.
    pub fn import(&self, ctr: &Ctr, dir: &Path) -> Result<BuiltImage> {
        let file = dir.join(format!("{}.oci.tar", self.name.replace(['/', ':'], "_")));
        let built = self.write_oci_tar(&file)?;
        ctr.import(&built.tarball)?;
        let names = ctr.images()?;
        if !names.iter().any(|n| n == &self.name) {
            bail!(
                "image {} not listed after import into namespace {} (have: {names:?})",
                self.name,
                ctr.namespace()
            );
        }
        Ok(built)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_is_deterministic_and_has_parents() {
        let b = ImageBuilder::new("t/x:1")
            .file("a/b/c.txt", b"hi".to_vec(), 0o644)
            .symlink("bin/sh", "/bin/busybox");
        let l1 = b.layer_tar().expect("tar");
        assert_eq!(l1, b.layer_tar().expect("tar"));
        let mut ar = tar::Archive::new(l1.as_slice());
        let names: Vec<String> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["a/", "a/b/", "a/b/c.txt", "bin/", "bin/sh"]);
    }

    #[test]
    fn oci_layout_names_the_image() {
        let dir = std::env::temp_dir().join(format!("ra-image-test-{}", std::process::id()));
        let out = dir.join("x.tar");
        let built = ImageBuilder::new("t/x:1")
            .file("f", b"1".to_vec(), 0o644)
            .write_oci_tar(&out)
            .expect("write");
        let mut ar = tar::Archive::new(std::fs::File::open(&out).expect("open"));
        let mut index = None;
        let mut blobs = 0;
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let p = e.path().expect("path").display().to_string();
            if p == "index.json" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).expect("read");
                index = Some(s);
            } else if p.starts_with("blobs/sha256/") {
                blobs += 1;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let index: serde_json::Value =
            serde_json::from_str(&index.expect("index.json")).expect("json");
        let m = &index["manifests"][0];
        assert_eq!(m["annotations"]["io.containerd.image.name"], "t/x:1");
        assert_eq!(m["digest"], built.manifest_digest.as_str());
        assert_eq!(blobs, 3);
    }
}
