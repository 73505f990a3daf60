//! Runtime options: how containerd tells the shim where to keep state and how to run.
//!
//! They arrive with Create in one of two envelopes, depending on how the runtime was
//! registered in containerd's config:
//! - `containerd.runc.v1.Options` when registered as `runtime_type =
//!   "io.containerd.runc.v2"` with `runtime_path` pointing at our binary (so existing
//!   runc configuration carries over unchanged);
//! - `runtimeoptions.v1.Options` for our own runtime type: CRI sends the handler's
//!   `options` table as TOML text (`config_body`), `ctr --runtime-config-path` sends a
//!   path to a TOML file (`config_path`).
//!
//! Both become [`RuntimeOptions`]. Unknown keys and malformed values are refused with
//! an error that names them: a typo in a node's config must not pass silently.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use prost::Message as _;
use runc_architect_proto::runtimeoptions;
use runc_architect_proto::type_urls;
use runc_architect_runtime::hibernate::policy::NodeOptions;
use serde::Deserialize;

/// Default root of libcontainer's per-container state (a namespace directory below it).
pub const DEFAULT_STATE_ROOT: &str = "/run/containerd/runc-architect";

/// Options that apply to the containers of this shim.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeOptions {
    /// Root of libcontainer's state.
    pub root: Option<PathBuf>,
    pub no_pivot_root: bool,
    pub systemd_cgroup: bool,
    /// Node-level checkpoint store configuration file.
    pub store_config: Option<PathBuf>,
    pub criu_image_path: Option<PathBuf>,
    pub criu_work_path: Option<PathBuf>,
    /// The CRIU binary for checkpoint/restore (runc-architect's own option; default:
    /// `criu` from `$PATH` or the sbin directories).
    pub criu_path: Option<PathBuf>,
    /// Node defaults of hibernation (`Hibernate`, `FreezeAfter`, `ScaledownAfter`,
    /// `InitialDelay`; pod annotations override them).
    pub hibernation: NodeOptions,
    /// Where hibernated containers' images are kept on local disk (default
    /// [`DEFAULT_HIBERNATE_DIR`]).
    pub hibernate_dir: Option<PathBuf>,
}

/// Where hibernation keeps its local images unless `HibernateDir` says otherwise.
pub const DEFAULT_HIBERNATE_DIR: &str = "/var/lib/runc-architect/hibernate";
/// The node's checkpoint store when no `StoreConfig` names one.
pub const DEFAULT_STORE_ROOT: &str = "/var/lib/runc-architect/store";

/// A problem with the options; reported to containerd as InvalidArgument.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("unsupported runtime options type {0:?}: expected {runc} or {ro}", runc = type_urls::RUNC_OPTIONS, ro = type_urls::RUNTIME_OPTIONS)]
    UnknownType(String),
    #[error("malformed runtime options ({type_url}): {message}")]
    Decode { type_url: String, message: String },
    #[error("runtime options file {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime options {origin}: {message}")]
    Toml { origin: String, message: String },
}

/// The TOML form (CRI's `options` table), keyed like runc's options so that a handler
/// can be switched between runc and runc-architect without renaming anything.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlOptions {
    #[serde(rename = "Root")]
    root: Option<PathBuf>,
    #[serde(rename = "NoPivotRoot", default)]
    no_pivot_root: bool,
    #[serde(rename = "NoNewKeyring", default)]
    _no_new_keyring: bool,
    #[serde(rename = "SystemdCgroup", default)]
    systemd_cgroup: bool,
    /// Accepted for compatibility with runc handlers; there is no runc binary to name.
    #[serde(rename = "BinaryName")]
    _binary_name: Option<String>,
    #[serde(rename = "ShimCgroup")]
    _shim_cgroup: Option<String>,
    #[serde(rename = "IoUid")]
    _io_uid: Option<u32>,
    #[serde(rename = "IoGid")]
    _io_gid: Option<u32>,
    #[serde(rename = "CriuImagePath")]
    criu_image_path: Option<PathBuf>,
    #[serde(rename = "CriuWorkPath")]
    criu_work_path: Option<PathBuf>,
    /// runc-architect's own: the CRIU binary.
    #[serde(rename = "CriuPath")]
    criu_path: Option<PathBuf>,
    /// runc-architect's own: the node-level checkpoint store configuration.
    #[serde(rename = "StoreConfig")]
    store_config: Option<PathBuf>,
    /// runc-architect's own: hibernation on by default for the node's containers.
    #[serde(rename = "Hibernate")]
    hibernate: Option<bool>,
    /// runc-architect's own: the default idle time before freezing (Go duration).
    #[serde(rename = "FreezeAfter")]
    freeze_after: Option<String>,
    /// runc-architect's own: the default idle time before scaling down (Go duration).
    #[serde(rename = "ScaledownAfter")]
    scaledown_after: Option<String>,
    /// runc-architect's own: the default delay after start before any hibernation.
    #[serde(rename = "InitialDelay")]
    initial_delay: Option<String>,
    /// runc-architect's own: where hibernation keeps its local images.
    #[serde(rename = "HibernateDir")]
    hibernate_dir: Option<PathBuf>,
}

impl RuntimeOptions {
    /// Decodes the options of a Create request; `None` gives the defaults.
    pub fn from_any(any: Option<&Any>) -> Result<RuntimeOptions, OptionsError> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Ok(RuntimeOptions::default());
        };
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        let decode_err = |message: String| OptionsError::Decode {
            type_url: any.type_url.clone(),
            message,
        };
        match name {
            type_urls::RUNC_OPTIONS => {
                let o = containerd_shim_protos::shim::oci::Options::parse_from_bytes(&any.value)
                    .map_err(|e| decode_err(e.to_string()))?;
                Ok(RuntimeOptions {
                    root: non_empty(&o.root),
                    no_pivot_root: o.no_pivot_root,
                    systemd_cgroup: o.systemd_cgroup,
                    store_config: None,
                    criu_image_path: non_empty(&o.criu_image_path),
                    criu_work_path: non_empty(&o.criu_work_path),
                    criu_path: None,
                    hibernation: NodeOptions::default(),
                    hibernate_dir: None,
                })
            }
            type_urls::RUNTIME_OPTIONS => {
                let o = runtimeoptions::Options::decode(any.value.as_slice())
                    .map_err(|e| decode_err(e.to_string()))?;
                if !o.config_body.is_empty() {
                    Self::from_toml(&o.config_body, "config_body")
                } else if !o.config_path.is_empty() {
                    let text = std::fs::read_to_string(&o.config_path).map_err(|source| {
                        OptionsError::File {
                            path: o.config_path.clone(),
                            source,
                        }
                    })?;
                    Self::from_toml(&text, &o.config_path)
                } else {
                    Ok(RuntimeOptions::default())
                }
            }
            other => Err(OptionsError::UnknownType(other.to_string())),
        }
    }

    /// Parses the TOML form; `origin` names where it came from in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<RuntimeOptions, OptionsError> {
        let t: TomlOptions = toml::from_str(text).map_err(|e| OptionsError::Toml {
            origin: origin.to_string(),
            message: e.message().to_string(),
        })?;
        Ok(RuntimeOptions {
            root: t.root,
            no_pivot_root: t.no_pivot_root,
            systemd_cgroup: t.systemd_cgroup,
            store_config: t.store_config,
            criu_image_path: t.criu_image_path,
            criu_work_path: t.criu_work_path,
            criu_path: t.criu_path,
            hibernation: NodeOptions {
                hibernate: t.hibernate,
                freeze_after: t.freeze_after,
                scaledown_after: t.scaledown_after,
                initial_delay: t.initial_delay,
            },
            hibernate_dir: t.hibernate_dir,
        })
    }

    /// libcontainer's state root for `namespace`.
    pub fn state_root(&self, namespace: &str) -> PathBuf {
        self.root
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT))
            .join(namespace)
    }
}

fn non_empty(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value;
        a
    }

    #[test]
    fn none_is_default() {
        assert_eq!(
            RuntimeOptions::from_any(None).unwrap(),
            RuntimeOptions::default()
        );
    }

    #[test]
    fn runc_options() {
        let mut o = containerd_shim_protos::shim::oci::Options::new();
        o.root = "/run/x".into();
        o.no_pivot_root = true;
        let a = any("containerd.runc.v1.Options", o.write_to_bytes().unwrap());
        let r = RuntimeOptions::from_any(Some(&a)).unwrap();
        assert_eq!(r.root, Some(PathBuf::from("/run/x")));
        assert!(r.no_pivot_root);
        assert_eq!(r.state_root("k8s.io"), PathBuf::from("/run/x/k8s.io"));
    }

    #[test]
    fn toml_body() {
        let body = "Root = \"/run/y\"\nStoreConfig = \"/etc/ra/store.toml\"\n";
        let o = runtimeoptions::Options {
            type_url: String::new(),
            config_path: String::new(),
            config_body: body.into(),
        };
        let a = any("runtimeoptions.v1.Options", o.encode_to_vec());
        let r = RuntimeOptions::from_any(Some(&a)).unwrap();
        assert_eq!(r.root, Some(PathBuf::from("/run/y")));
        assert_eq!(r.store_config, Some(PathBuf::from("/etc/ra/store.toml")));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = RuntimeOptions::from_toml("Rooot = \"/x\"", "config_body")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Rooot"), "{err}");
    }

    #[test]
    fn malformed_value_and_type() {
        assert!(RuntimeOptions::from_toml("NoPivotRoot = \"yes\"", "b").is_err());
        let err = RuntimeOptions::from_any(Some(&any("example.Options", vec![1]))).unwrap_err();
        assert!(err.to_string().contains("example.Options"));
        let err =
            RuntimeOptions::from_any(Some(&any("containerd.runc.v1.Options", vec![0xff, 0xff])))
                .unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }
}
