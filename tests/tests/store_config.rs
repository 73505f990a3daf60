//! The shim opens the node's checkpoint store named by the `StoreConfig` runtime option
//! (runtimeoptions.v1 TOML, as CRI sends a handler's `options` table): a good configuration
//! creates the store (root-owned, 0700) and the container runs; a bad one fails the create
//! with INVALID_ARGUMENT naming the file, and the shim keeps serving.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use prost::Message;
use runc_architect_proto::runtimeoptions;
use runc_architect_tests::image::{ImageBuilder, BUSYBOX_IMAGE};
use runc_architect_tests::paths;
use runc_architect_tests::shim::{write_bundle, ShimProcess};
use runc_architect_tests::spec::default_spec;
use runc_architect_tests::{Containerd, Version};

/// `runtimeoptions.v1.Options` with a TOML body.
fn toml_options(body: &str) -> Any {
    let o = runtimeoptions::Options {
        type_url: String::new(),
        config_path: String::new(),
        config_body: body.into(),
    };
    Any {
        type_url: "runtimeoptions.v1.Options".into(),
        value: o.encode_to_vec(),
        ..Default::default()
    }
}

fn bundle(dir: &Path, id: &str, image: &ImageBuilder) -> Result<std::path::PathBuf> {
    let b = dir.join(id);
    write_bundle(
        &b,
        &default_spec(
            "rootfs",
            &["sleep", "1000"],
            &format!("/ra-store-test/{id}"),
        ),
        Some(image),
    )?;
    Ok(b)
}

#[test]
fn shim_opens_the_configured_store_and_refuses_a_bad_one() -> Result<()> {
    let version = Version::V1_7;
    version.check_installed()?;
    let shim_bin = paths::architect_shim(version)?;
    let containerd = Containerd::start(version)?;
    let dir = containerd.scratch_dir("store-config")?;
    let image = ImageBuilder::busybox(BUSYBOX_IMAGE)?;

    // A bad configuration first: the create fails with a message naming the file.
    let b1 = bundle(&dir, "bad", &image)?;
    let mut shim = ShimProcess::launch(&shim_bin, &containerd, "ra-store", "bad", &b1)?;
    let missing = dir.join("no-such-store.toml");
    let opts = toml_options(&format!("StoreConfig = \"{}\"\n", missing.display()));
    match shim.create("bad", &b1, Some(opts)) {
        Ok(_) => bail!("create with a missing store config succeeded"),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("INVALID_ARGUMENT"), "wrong code: {text}");
            assert!(
                text.contains("no-such-store.toml"),
                "message does not name the file: {text}"
            );
        }
    }

    // A good configuration: the store is created and the container runs in the same shim.
    let root = dir.join("store-root");
    let cfg = dir.join("store.toml");
    std::fs::write(&cfg, format!("root = \"{}\"\n", root.display()))?;
    let b2 = bundle(&dir, "good", &image)?;
    let opts = toml_options(&format!("StoreConfig = \"{}\"\n", cfg.display()));
    shim.create("good", &b2, Some(opts))
        .map_err(|e| anyhow::anyhow!("create with store: {e}"))?;
    shim.start("good", "")
        .map_err(|e| anyhow::anyhow!("start: {e}"))?;
    shim.check_serves("good", "probe")
        .context("shim serves after the store opened")?;
    let meta =
        std::fs::metadata(&root).with_context(|| format!("store root {}", root.display()))?;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o700,
        "store root must be 0700"
    );
    assert_eq!(meta.uid(), 0, "store root must be root-owned");
    Ok(())
}
