//! Checkpoint and restore on the task API: containerd's requests turned into the runtime's
//! ([`runc_architect_runtime::checkpoint`]).
//!
//! - `Task.Checkpoint` carries the images directory (`path`, which containerd tars into
//!   its content store afterwards) and `containerd.runc.v1.CheckpointOptions`; every field
//!   of those options is honoured ([`checkpoint_request`]).
//! - `Task.Create` with `checkpoint` set names a directory holding the CRIU images
//!   (containerd unpacks the checkpoint's CRIU layer there); the container is restored at
//!   Create ([`restore_config`]). Like the stock shim, an explicit restore that fails
//!   returns CRIU's error: it is never turned into a cold start behind the caller's back.
//! - Which CRIU to run comes from the runtime options the container was created with
//!   (`CriuPath`, runc-architect's own key); [`CriuRegistry`] remembers it per container.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use containerd_shim::api;
use containerd_shim::protos::ttrpc::{self, Code};
use prost::Message as _;
use runc_architect_proto::runc::CheckpointOptions;
use runc_architect_proto::type_urls;
use runc_architect_runtime::checkpoint::{
    CgroupsMode, CheckpointRequest, CriuConfig, NetworkLock, RestoreConfig,
};
use runc_architect_runtime::CreateConfig;

use crate::options::RuntimeOptions;

/// The CRIU configuration of each container of this shim.
#[derive(Debug, Default)]
pub struct CriuRegistry {
    by_container: Mutex<HashMap<String, CriuConfig>>,
}

impl CriuRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CriuConfig>> {
        self.by_container.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the CRIU configuration `opts` give container `id`.
    pub fn remember(&self, id: &str, opts: &RuntimeOptions) {
        self.lock().insert(id.to_string(), criu_config(opts));
    }

    /// Forgets container `id`.
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The CRIU configuration of container `id` (the default if unknown).
    pub fn get(&self, id: &str) -> CriuConfig {
        self.lock().get(id).cloned().unwrap_or_default()
    }
}

/// Environment variable that sets CRIU's log level (0-4) for debugging.
pub const LOG_LEVEL_ENV: &str = "RA_CRIU_LOG_LEVEL";

/// The CRIU configuration from runtime options (and `RA_CRIU_LOG_LEVEL` from the shim's
/// environment).
pub fn criu_config(opts: &RuntimeOptions) -> CriuConfig {
    let mut c = CriuConfig::default();
    if let Some(p) = &opts.criu_path {
        c.binary = p.clone();
    }
    if let Some(level) = std::env::var(LOG_LEVEL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|l| (0..=4).contains(l))
    {
        c.log_level = level;
    }
    c
}

fn invalid(msg: impl AsRef<str>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        Code::INVALID_ARGUMENT,
        format!("{}: invalid argument", msg.as_ref()),
    ))
}

/// Decodes containerd's checkpoint options (absent options are the defaults).
pub fn decode_options(
    any: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> Result<CheckpointOptions, ttrpc::Error> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
        return Ok(CheckpointOptions::default());
    };
    if !type_urls::matches(&any.type_url, type_urls::CHECKPOINT_OPTIONS) {
        return Err(invalid(format!(
            "unsupported checkpoint options type {:?}: expected {}",
            any.type_url,
            type_urls::CHECKPOINT_OPTIONS
        )));
    }
    CheckpointOptions::decode(any.value.as_slice())
        .map_err(|e| invalid(format!("malformed checkpoint options: {e}")))
}

/// The runtime's checkpoint request for containerd's `req`.
pub fn checkpoint_request(
    req: &api::CheckpointTaskRequest,
    criu: CriuConfig,
) -> Result<CheckpointRequest, ttrpc::Error> {
    let o = decode_options(req.options.as_ref())?;
    // containerd puts the images path in `path` (its temp dir, or the options'
    // image_path when the caller chose one); a direct caller may only set the option.
    let image_dir = [req.path.as_str(), o.image_path.as_str()]
        .into_iter()
        .find(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| invalid("checkpoint without an images path"))?;
    if !image_dir.is_absolute() {
        return Err(invalid(format!(
            "checkpoint images path {} is not absolute",
            image_dir.display()
        )));
    }
    let cgroups_mode = CgroupsMode::parse(&o.cgroups_mode).map_err(|e| invalid(e.to_string()))?;
    Ok(CheckpointRequest {
        image_dir,
        work_dir: (!o.work_path.is_empty()).then(|| PathBuf::from(&o.work_path)),
        parent: (!o.parent_path.is_empty()).then(|| PathBuf::from(&o.parent_path)),
        exit: o.exit,
        open_tcp: o.open_tcp,
        external_unix_sockets: o.external_unix_sockets,
        terminal: o.terminal,
        file_locks: o.file_locks,
        empty_namespaces: o.empty_namespaces,
        cgroups_mode,
        network_lock: NetworkLock::default(),
        criu,
        portable: o.work_path.ends_with(CRI_CHECKPOINT_DIR),
        keep_netns: false,
    })
}

/// The directory in which containerd's CRI collects a kubelet checkpoint (KEP-2008).
const CRI_CHECKPOINT_DIR: &str = "ctrd-checkpoint";

/// Where containerd's CRI collects a kubelet checkpoint (KEP-2008) of container `id`,
/// if this is a CRI container being checkpointed that way.
///
/// CRI's `CheckpointContainer` makes `<CRI root>/containers/<id>/ctrd-checkpoint`, asks
/// the task for a checkpoint, and archives that directory with the CRIU images under
/// `checkpoint/`; CRIU's log (`dump.log`) and statistics (`stats-dump`) belong at its top,
/// where they land as CRIU's work directory. CRI names that directory to the shim only in
/// runc's options, that is only for `runtime_type = "io.containerd.runc.v2"`; for our own
/// runtime type the request has no options. The directory is then found from the spec
/// CRI wrote: the files it mounts into every container (`/etc/hostname`,
/// `/etc/resolv.conf`) come from `<CRI root>/sandboxes/<sandbox id>/`. It is used only
/// when it exists, i.e. while CRI is taking that checkpoint.
pub fn cri_work_dir(bundle: &Path, id: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(bundle.join("config.json")).ok()?;
    let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
    let ann = spec.get("annotations")?;
    if ann.get("io.kubernetes.cri.container-type")?.as_str()? != "container" {
        return None;
    }
    let sandbox = ann.get("io.kubernetes.cri.sandbox-id")?.as_str()?;
    let cri_root = spec
        .get("mounts")?
        .as_array()?
        .iter()
        .filter(|m| {
            matches!(
                m.get("destination").and_then(|d| d.as_str()),
                Some("/etc/hostname" | "/etc/resolv.conf")
            )
        })
        .filter_map(|m| m.get("source")?.as_str().map(Path::new))
        .find_map(|src| {
            let sandbox_dir = src.parent()?;
            let sandboxes = sandbox_dir.parent()?;
            (sandbox_dir.file_name()? == sandbox && sandboxes.file_name()? == "sandboxes")
                .then(|| sandboxes.parent().map(Path::to_path_buf))
                .flatten()
        })?;
    let dir = cri_root
        .join("containers")
        .join(id)
        .join(CRI_CHECKPOINT_DIR);
    dir.is_dir().then_some(dir)
}

/// The restore of a Create whose `checkpoint` is `images`.
pub fn restore_config(create: CreateConfig, images: &str, opts: &RuntimeOptions) -> RestoreConfig {
    RestoreConfig {
        create,
        image_dir: PathBuf::from(images),
        work_dir: opts.criu_work_path.clone(),
        criu: criu_config(opts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use containerd_shim::protos::protobuf::MessageField;

    fn any(o: &CheckpointOptions) -> Any {
        let mut a = Any::new();
        a.type_url = "containerd.runc.v1.CheckpointOptions".into();
        a.value = o.encode_to_vec();
        a
    }

    #[test]
    fn every_option_is_honoured() {
        let o = CheckpointOptions {
            exit: true,
            open_tcp: true,
            external_unix_sockets: true,
            terminal: true,
            file_locks: true,
            empty_namespaces: vec!["network".into()],
            cgroups_mode: "strict".into(),
            image_path: "/img".into(),
            work_path: "/work".into(),
            parent_path: "../prev".into(),
        };
        let req = api::CheckpointTaskRequest {
            id: "c".into(),
            path: String::new(),
            options: MessageField::some(any(&o)),
            ..Default::default()
        };
        let r = checkpoint_request(&req, CriuConfig::default()).unwrap();
        assert_eq!(r.image_dir, PathBuf::from("/img"));
        assert_eq!(r.work_dir, Some(PathBuf::from("/work")));
        assert_eq!(r.parent, Some(PathBuf::from("../prev")));
        assert!(r.exit && r.open_tcp && r.external_unix_sockets && r.terminal && r.file_locks);
        assert_eq!(r.empty_namespaces, vec!["network".to_string()]);
        assert_eq!(r.cgroups_mode, CgroupsMode::Strict);
    }

    #[test]
    fn path_wins_and_defaults_apply() {
        let req = api::CheckpointTaskRequest {
            id: "c".into(),
            path: "/tmp/ctd-checkpoint1".into(),
            ..Default::default()
        };
        let r = checkpoint_request(&req, CriuConfig::default()).unwrap();
        assert_eq!(r.image_dir, PathBuf::from("/tmp/ctd-checkpoint1"));
        assert!(!r.exit && r.work_dir.is_none());
        assert_eq!(r.cgroups_mode, CgroupsMode::Ignore);
    }

    #[test]
    fn bad_requests_are_invalid_arguments() {
        let none = api::CheckpointTaskRequest::default();
        assert!(checkpoint_request(&none, CriuConfig::default()).is_err());
        let mut a = Any::new();
        a.type_url = "containerd.runc.v1.Options".into();
        let req = api::CheckpointTaskRequest {
            path: "/x".into(),
            options: MessageField::some(a),
            ..Default::default()
        };
        let err = checkpoint_request(&req, CriuConfig::default()).unwrap_err();
        assert!(
            format!("{err:?}").contains("containerd.runc.v1.Options"),
            "{err:?}"
        );
        let o = CheckpointOptions {
            cgroups_mode: "bogus".into(),
            ..Default::default()
        };
        let req = api::CheckpointTaskRequest {
            path: "/x".into(),
            options: MessageField::some(any(&o)),
            ..Default::default()
        };
        assert!(checkpoint_request(&req, CriuConfig::default()).is_err());
    }

    #[test]
    fn cri_checkpoint_dir_from_the_spec() {
        let base = std::env::temp_dir().join(format!("ra-cri-wd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let cri = base.join("io.containerd.grpc.v1.cri");
        let bundle = base.join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let spec = |kind: &str| {
            serde_json::json!({
                "annotations": {
                    "io.kubernetes.cri.container-type": kind,
                    "io.kubernetes.cri.sandbox-id": "sb1",
                },
                "mounts": [
                    {"destination": "/etc/hosts", "source": "/elsewhere/etc-hosts"},
                    {"destination": "/etc/hostname", "source": cri.join("sandboxes/sb1/hostname")},
                ],
            })
            .to_string()
        };
        std::fs::write(bundle.join("config.json"), spec("container")).unwrap();
        // Not while CRI is not taking a checkpoint.
        assert_eq!(cri_work_dir(&bundle, "c1"), None);
        let dir = cri.join("containers/c1/ctrd-checkpoint");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(cri_work_dir(&bundle, "c1"), Some(dir));
        // Never for a pod's sandbox, nor for containers outside CRI.
        std::fs::write(bundle.join("config.json"), spec("sandbox")).unwrap();
        assert_eq!(cri_work_dir(&bundle, "c1"), None);
        std::fs::write(bundle.join("config.json"), r#"{"mounts": []}"#).unwrap();
        assert_eq!(cri_work_dir(&bundle, "c1"), None);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn registry_remembers_criu_paths() {
        let reg = CriuRegistry::default();
        let opts = RuntimeOptions {
            criu_path: Some(PathBuf::from("/opt/criu")),
            ..Default::default()
        };
        reg.remember("a", &opts);
        assert_eq!(reg.get("a").binary, PathBuf::from("/opt/criu"));
        reg.forget("a");
        assert_eq!(reg.get("a").binary, PathBuf::from("criu"));
    }
}
