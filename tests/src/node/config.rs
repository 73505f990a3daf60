//! The node's containerd configuration, its CNI network and its registry hosts file.
//!
//! The configuration starts from the version's real defaults (`containerd config default`, so
//! every setting a real node has is there) and is edited with `toml_edit` to private paths
//! and the CRI settings this machine needs (scripts/CONTAINERD-NOTES.md has the verified
//! minimal configs these edits follow). The runtime handler of runc-architect is not written
//! here: the installer adds it to the file written by [`write_config`] (see `register.rs`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use toml_edit::{Array, DocumentMut, Item, Table, Value};

use super::layout::Layout;
use crate::paths::{self, Version};
use crate::process;

/// Name of the stock runc handler in every default config.
pub const RUNC_HANDLER: &str = "runc";
/// The CNI network's name.
pub const CNI_NETWORK: &str = "ra-node";
/// The bridge the CNI network creates inside the node's network namespace.
pub const CNI_BRIDGE: &str = "ra-cni0";
/// The pods' subnet (every node has its own network namespace, so all use the same one).
pub const POD_SUBNET: &str = "10.88.0.0/16";
/// The node's address on the bridge (the pods' gateway).
pub const NODE_BRIDGE_IP: &str = "10.88.0.1";
/// Debian's CNI plugins (containernetworking-plugins), unless `RA_CNI_BIN_DIR` says.
pub const DEFAULT_CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The CNI plugin directory: `$RA_CNI_BIN_DIR` or [`DEFAULT_CNI_BIN_DIR`].
pub fn cni_bin_dir() -> String {
    std::env::var("RA_CNI_BIN_DIR")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_CNI_BIN_DIR.to_string())
}

/// What the CRI part of the configuration names.
pub struct CriSettings<'a> {
    pub sandbox_image: &'a str,
    pub log_level: &'a str,
}

/// `containerd config default` of `version`.
pub fn default_config(version: Version) -> Result<String> {
    let mut cmd = Command::new(version.containerd_bin());
    cmd.args(["config", "default"])
        .env_clear()
        .env("PATH", paths::SYSTEM_PATH);
    let out = process::run(cmd, None, Duration::from_secs(30))?.ok()?;
    Ok(out.stdout_str())
}

/// Writes the node's config.toml (without the runc-architect handler) and returns it.
pub fn write_config(version: Version, layout: &Layout, cri: &CriSettings) -> Result<String> {
    let base = default_config(version)?;
    let text = edit_config(version, &base, layout, cri)?;
    std::fs::write(layout.config(), &text)
        .with_context(|| format!("write {}", layout.config().display()))?;
    Ok(text)
}

/// The default configuration `base` edited for a private node.
pub fn edit_config(
    version: Version,
    base: &str,
    layout: &Layout,
    cri: &CriSettings,
) -> Result<String> {
    let mut doc: DocumentMut = base
        .parse()
        .with_context(|| format!("parse `containerd config default` of {version}"))?;
    let p = |path: &Path| path.display().to_string();
    let mut e = Editor { doc: &mut doc };

    // The daemon's own paths and sockets.
    e.set(&["root"], p(&layout.root()))?;
    e.set(&["state"], p(&layout.state()))?;
    e.set(&["temp"], p(&layout.tmp()))?;
    e.set(&["grpc", "address"], p(&layout.address()))?;
    e.set(&["ttrpc", "address"], p(&layout.ttrpc_address()))?;
    e.set(&["debug", "address"], p(&layout.debug_address()))?;
    e.set(&["debug", "level"], cri.log_level)?;
    e.set(&["metrics", "address"], "")?;
    e.set(
        &plugin("io.containerd.internal.v1.opt", &["path"]),
        p(&layout.opt()),
    )?;
    e.set(&plugin("io.containerd.nri.v1.nri", &["disable"]), true)?;
    e.set(
        &plugin("io.containerd.transfer.v1.local", &["config_path"]),
        p(&layout.certs_d()),
    )?;

    let cdi = Value::Array(Array::from_iter([p(&layout.cdi())]));
    let cni_conf = p(&layout.cni_conf_dir());
    let runc_root = p(&layout.runc_root());
    let certs = p(&layout.certs_d());
    match version {
        Version::V1_7 => {
            let cri_p = |keys: &[&str]| plugin("io.containerd.grpc.v1.cri", keys);
            e.set(&cri_p(&["sandbox_image"]), cri.sandbox_image)?;
            e.set(&cri_p(&["restrict_oom_score_adj"]), true)?;
            e.set(&cri_p(&["stream_server_address"]), "127.0.0.1")?;
            e.set(&cri_p(&["stream_server_port"]), "0")?;
            e.set(&cri_p(&["cdi_spec_dirs"]), cdi)?;
            e.set(&cri_p(&["cni", "bin_dir"]), cni_bin_dir())?;
            e.set(&cri_p(&["cni", "conf_dir"]), cni_conf)?;
            e.set(&cri_p(&["containerd", "snapshotter"]), "overlayfs")?;
            e.set(
                &cri_p(&["containerd", "default_runtime_name"]),
                RUNC_HANDLER,
            )?;
            e.set(
                &cri_p(&["containerd", "runtimes", RUNC_HANDLER, "options", "Root"]),
                runc_root,
            )?;
            e.set(&cri_p(&["registry", "config_path"]), certs)?;
        }
        Version::V2_1 => {
            let images = |keys: &[&str]| plugin("io.containerd.cri.v1.images", keys);
            let runtime = |keys: &[&str]| plugin("io.containerd.cri.v1.runtime", keys);
            let grpc = |keys: &[&str]| plugin("io.containerd.grpc.v1.cri", keys);
            e.set(&images(&["snapshotter"]), "overlayfs")?;
            e.set(&images(&["pinned_images", "sandbox"]), cri.sandbox_image)?;
            e.set(&images(&["registry", "config_path"]), certs)?;
            e.set(&runtime(&["restrict_oom_score_adj"]), true)?;
            e.set(&runtime(&["cdi_spec_dirs"]), cdi)?;
            e.set(&runtime(&["cni", "bin_dir"]), "")?;
            e.set(
                &runtime(&["cni", "bin_dirs"]),
                Value::Array(Array::from_iter([cni_bin_dir()])),
            )?;
            e.set(&runtime(&["cni", "conf_dir"]), cni_conf)?;
            e.set(
                &runtime(&["containerd", "default_runtime_name"]),
                RUNC_HANDLER,
            )?;
            e.set(
                &runtime(&["containerd", "runtimes", RUNC_HANDLER, "options", "Root"]),
                runc_root,
            )?;
            e.set(&grpc(&["stream_server_address"]), "127.0.0.1")?;
            e.set(&grpc(&["stream_server_port"]), "0")?;
            e.set(
                &plugin("io.containerd.image-verifier.v1.bindir", &["bin_dir"]),
                p(&layout.opt().join("image-verifier/bin")),
            )?;
        }
    }
    let mut out = format!(
        "# Generated by runc-architect-tests: a private containerd {} node with CRI,\n\
         # from `containerd config default` with private paths.\n",
        version.series()
    );
    out.push_str(&doc.to_string());
    Ok(out)
}

/// The plugin whose `containerd.runtimes` table holds the CRI runtime handlers.
pub fn cri_runtime_plugin(version: Version) -> &'static str {
    match version {
        Version::V1_7 => "io.containerd.grpc.v1.cri",
        Version::V2_1 => "io.containerd.cri.v1.runtime",
    }
}

/// `["plugins", id, keys...]`.
pub(super) fn plugin(id: &str, keys: &[&str]) -> Vec<String> {
    ["plugins", id]
        .iter()
        .chain(keys)
        .map(|s| s.to_string())
        .collect()
}

/// Sets keys below nested tables, creating the tables that are missing.
pub(super) struct Editor<'d> {
    pub(super) doc: &'d mut DocumentMut,
}

impl Editor<'_> {
    pub(super) fn set<S: AsRef<str>>(&mut self, path: &[S], v: impl Into<Value>) -> Result<()> {
        let path: Vec<&str> = path.iter().map(|s| s.as_ref()).collect();
        let Some((last, parents)) = path.split_last() else {
            bail!("empty key path");
        };
        let mut table: &mut Table = self.doc.as_table_mut();
        for (i, key) in parents.iter().enumerate() {
            let item = table.entry(key).or_insert_with(|| {
                let mut t = Table::new();
                t.set_implicit(true);
                Item::Table(t)
            });
            table = item
                .as_table_mut()
                .with_context(|| format!("{} is not a table", parents[..=i].join(".")))?;
        }
        table.insert(last, Item::Value(v.into()));
        Ok(())
    }
}

/// The CNI network: a bridge (the pods' gateway, masquerading), host-local IPAM with its
/// reservations in the node directory, and portmap for the sandbox's port mappings.
///
/// No `loopback` entry: containerd's CRI sets up each pod's `lo` itself with the loopback
/// plugin from the same plugin directory (go-cni's loopback network), and a loopback plugin
/// chained after the bridge would replace the bridge's result (the pod's IP).
pub fn cni_conflist(layout: &Layout) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_SUBNET, "gateway": NODE_BRIDGE_IP }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": layout.cni_ipam_dir().display().to_string(),
                }
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true },
            }
        ]
    })
}

/// Writes the CNI network into the node's private CNI configuration directory.
pub fn write_cni(layout: &Layout) -> Result<()> {
    let file = layout
        .cni_conf_dir()
        .join(format!("10-{CNI_NETWORK}.conflist"));
    let text = serde_json::to_string_pretty(&cni_conflist(layout))?;
    std::fs::write(&file, text).with_context(|| format!("write {}", file.display()))
}

/// `hosts.toml` for a plain-HTTP registry at `host` (`127.0.0.1:PORT`).
pub fn hosts_toml(host: &str) -> String {
    format!(
        "# Generated by runc-architect-tests: the node's local registry, plain HTTP.\n\
         server = \"http://{host}\"\n\n\
         [host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// Writes `<certs.d>/<host>/hosts.toml`.
pub fn write_hosts_toml(layout: &Layout, host: &str) -> Result<()> {
    let dir = layout.certs_d().join(host);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("hosts.toml"), hosts_toml(host))
        .with_context(|| format!("write {}/hosts.toml", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CriSettings<'static> {
        CriSettings {
            sandbox_image: "localhost/x/pause:1",
            log_level: "info",
        }
    }

    #[test]
    fn edits_keep_the_defaults_and_set_private_paths() {
        let base = "version = 2\nroot = \"/var/lib/containerd\"\n\
                    [plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    sandbox_image = \"x\"\n    \
                    max_concurrent_downloads = 3\n";
        let layout = Layout::new(Path::new("/t/n"));
        let out = edit_config(Version::V1_7, base, &layout, &settings()).expect("edit");
        let doc: DocumentMut = out.parse().expect("reparse");
        let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(doc["root"].as_str(), Some("/t/n/root"));
        assert_eq!(cri["sandbox_image"].as_str(), Some("localhost/x/pause:1"));
        assert_eq!(cri["max_concurrent_downloads"].as_integer(), Some(3));
        assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["options"]["Root"].as_str(),
            Some("/t/n/runc")
        );
        assert_eq!(cri["cni"]["conf_dir"].as_str(), Some("/t/n/cni/net.d"));
        assert_eq!(
            doc["grpc"]["address"].as_str(),
            Some("/t/n/containerd.sock")
        );
    }

    #[test]
    fn v21_edits_go_to_the_split_cri_plugins() {
        let layout = Layout::new(Path::new("/t/n"));
        let out = edit_config(Version::V2_1, "version = 3\n", &layout, &settings()).expect("edit");
        let doc: DocumentMut = out.parse().expect("reparse");
        let p = &doc["plugins"];
        assert_eq!(
            p["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].as_str(),
            Some("localhost/x/pause:1")
        );
        assert_eq!(
            p["io.containerd.cri.v1.runtime"]["cni"]["bin_dirs"][0].as_str(),
            Some(cni_bin_dir().as_str())
        );
        assert_eq!(
            p["io.containerd.grpc.v1.cri"]["stream_server_port"].as_str(),
            Some("0")
        );
        assert_eq!(
            p["io.containerd.nri.v1.nri"]["disable"].as_bool(),
            Some(true)
        );
    }

    #[test]
    fn hosts_toml_is_plain_http() {
        let t: DocumentMut = hosts_toml("127.0.0.1:5000").parse().expect("toml");
        assert_eq!(t["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert_eq!(
            t["host"]["http://127.0.0.1:5000"]["capabilities"][1].as_str(),
            Some("resolve")
        );
    }
}
