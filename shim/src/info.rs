//! `-info`: what containerd 2.x asks a runtime before using it. It pipes the runtime
//! options (a protobuf `Any`) to our stdin and reads a `RuntimeInfo` from our stdout,
//! whose features document (OCI runtime-spec `features`) says what we support.

use std::io::{Read, Write};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// Answers `-info`: reads the options from stdin, writes the RuntimeInfo to stdout.
pub fn answer(runtime_id: &str) -> std::io::Result<()> {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let options = if input.is_empty() {
        None
    } else {
        Some(
            Any::parse_from_bytes(&input)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
        )
    };
    let bytes = runtime_info(runtime_id, options)
        .write_to_bytes()
        .map_err(std::io::Error::other)?;
    let mut out = std::io::stdout();
    out.write_all(&bytes)?;
    out.flush()
}

fn runtime_info(runtime_id: &str, options: Option<Any>) -> RuntimeInfo {
    let mut version = RuntimeVersion::new();
    version.version = env!("CARGO_PKG_VERSION").to_string();
    version.revision = option_env!("RA_GIT_REVISION")
        .unwrap_or("unknown")
        .to_string();
    let mut info = RuntimeInfo::new();
    info.name = runtime_id.to_string();
    info.version = MessageField::some(version);
    if let Some(o) = options {
        info.options = MessageField::some(o);
    }
    let mut features = Any::new();
    features.type_url =
        "types.containerd.io/opencontainers/runtime-spec/1/features/Features".into();
    features.value = json().into_bytes();
    info.features = MessageField::some(features);
    info
}

/// Features as JSON (the OCI runtime-spec `features` schema).
fn json() -> String {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": [
            "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec",
            "iversion", "lazytime", "loud", "mand", "noatime", "nodev", "nodiratime",
            "noexec", "noiversion", "nolazytime", "nomand", "norelatime", "nostrictatime",
            "nosuid", "nosymfollow", "private", "rbind", "relatime", "remount", "ro",
            "rprivate", "rshared", "rslave", "runbindable", "rw", "shared", "silent",
            "slave", "strictatime", "suid", "symfollow", "sync", "unbindable"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"],
            "capabilities": caps(),
            "cgroup": { "v1": true, "v2": true, "systemd": false, "systemdUser": false },
            "seccomp": { "enabled": true },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false }
        },
        "annotations": {
            "io.github.runc-architect.version": env!("CARGO_PKG_VERSION"),
            "io.github.runc-architect.libcontainer": "0.7"
        }
    })
    .to_string()
}

fn caps() -> Vec<String> {
    [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
    .iter()
    .map(|c| format!("CAP_{c}"))
    .collect()
}
