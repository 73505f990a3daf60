//! The node's images: the pause image (our own `workloads/pause.c`, built with the host's
//! `gcc -static`), the busybox test image and the checkpoint workload image, imported into
//! CRI's namespace `k8s.io` under names CRI resolves as they are (`localhost/...`: a name
//! without a registry host would be read by CRI as one on the default public registry), and
//! pushed to the node's registry.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::push::{push_oci_tar, PushedImage};
use super::registry::Registry;
use crate::ckpt;
use crate::ctr::Ctr;
use crate::image::ImageBuilder;
use crate::process;

/// Source of the pause program.
pub const PAUSE_SOURCE: &str = include_str!("../../workloads/pause.c");
/// The sandbox image named in the CRI configuration.
pub const PAUSE_IMAGE: &str = "localhost/runc-architect/pause:latest";
/// Where the pause program lives in its image.
pub const PAUSE_IN_IMAGE: &str = "pause";
/// The busybox test image under a name CRI resolves locally.
pub const BUSYBOX_LOCAL: &str = "localhost/runc-architect-test/busybox:latest";
/// The checkpoint workload image under a name CRI resolves locally.
pub const CKPT_LOCAL: &str = "localhost/runc-architect-test/ckpt:latest";
/// Repository and tag of the busybox image in the node's registry.
pub const BUSYBOX_REPO: (&str, &str) = ("runc-architect-test/busybox", "latest");
/// Repository and tag of the checkpoint image in the node's registry.
pub const CKPT_REPO: (&str, &str) = ("runc-architect-test/ckpt", "latest");

/// Compiles the pause program statically into `dir` and returns the binary.
pub fn build_pause(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let src = dir.join("pause.c");
    let bin = dir.join("pause");
    std::fs::write(&src, PAUSE_SOURCE)?;
    let mut cmd = Command::new("gcc");
    cmd.args(["-static", "-Os", "-s", "-Wall", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .env("PATH", process::host_path());
    process::run(cmd, None, Duration::from_secs(60))
        .context("run gcc (the pause program is built with the host's gcc -static)")?
        .ok()
        .context("compile the pause program")?;
    Ok(bin)
}

/// The pause binary, built once per test process.
fn pause_binary(scratch: &Path) -> Result<Vec<u8>> {
    static BIN: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        build_pause(&scratch.join("pause"))
            .and_then(|b| Ok(std::fs::read(b)?))
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// An image holding only the pause program as its entrypoint.
pub fn pause_image(scratch: &Path) -> Result<ImageBuilder> {
    let data = pause_binary(scratch)?;
    Ok(ImageBuilder::new(PAUSE_IMAGE)
        .file(PAUSE_IN_IMAGE, data, 0o755)
        .entrypoint(&[&format!("/{PAUSE_IN_IMAGE}")])
        .cmd(&[]))
}

/// The test images of a node, by the names CRI knows them.
#[derive(Clone, Debug)]
pub struct NodeImages {
    /// [`PAUSE_IMAGE`].
    pub pause: String,
    /// [`BUSYBOX_LOCAL`], imported.
    pub busybox: String,
    /// The busybox image in the registry (not pulled yet).
    pub busybox_pushed: Option<PushedImage>,
    /// [`CKPT_LOCAL`], imported.
    pub ckpt: String,
    /// The checkpoint image in the registry (not pulled yet).
    pub ckpt_pushed: Option<PushedImage>,
}

/// Imports the pause image into `ctr`'s namespace.
pub fn import_pause(ctr: &Ctr, dir: &Path, scratch: &Path) -> Result<()> {
    pause_image(scratch)?
        .import(ctr, dir)
        .context("import the pause image")?;
    Ok(())
}

/// Imports the busybox and checkpoint images and pushes them to `registry`.
pub fn import_test_images(
    ctr: &Ctr,
    dir: &Path,
    scratch: &Path,
    registry: Option<&Registry>,
) -> Result<NodeImages> {
    let busybox = ImageBuilder::busybox(BUSYBOX_LOCAL)?;
    let built = busybox
        .import(ctr, dir)
        .context("import the busybox image")?;
    let busybox_pushed = registry
        .map(|r| push_oci_tar(r, &built.tarball, BUSYBOX_REPO.0, BUSYBOX_REPO.1))
        .transpose()
        .context("push the busybox image")?;

    let ckpt_builder = ckpt::ckpt_image(&scratch.join("ckpt"))?;
    let built = ckpt_builder
        .import(ctr, dir)
        .context("import the checkpoint image")?;
    // ckpt_image names it without a registry host; give it the local name CRI resolves.
    ctr.ok(&["images", "tag", "--force", ckpt::CKPT_IMAGE, CKPT_LOCAL])?;
    ctr.ok(&["images", "rm", ckpt::CKPT_IMAGE])?;
    let ckpt_pushed = registry
        .map(|r| push_oci_tar(r, &built.tarball, CKPT_REPO.0, CKPT_REPO.1))
        .transpose()
        .context("push the checkpoint image")?;
    Ok(NodeImages {
        pause: PAUSE_IMAGE.to_string(),
        busybox: BUSYBOX_LOCAL.to_string(),
        busybox_pushed,
        ckpt: CKPT_LOCAL.to_string(),
        ckpt_pushed,
    })
}
