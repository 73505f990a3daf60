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
use std::path::PathBuf;
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
    })
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
