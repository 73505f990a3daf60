//! Where a node keeps everything: one directory, laid out the same way for every node, so the
//! stale-run reaper can clean up a node directory knowing only its path.

use std::path::{Path, PathBuf};

/// Prefix of node directories in the temp directory ([`crate::containerd::temp_base`]).
pub const DIR_PREFIX: &str = "ra-node-";

/// The paths of one node below its directory.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
        }
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The test process that owns the node (stale-run cleanup).
    pub fn owner_file(&self) -> PathBuf {
        self.at("owner.pid")
    }
    /// containerd's pid (also the pid through which the namespaces are reached).
    pub fn containerd_pid_file(&self) -> PathBuf {
        self.at("containerd.pid")
    }
    /// The registry's pid.
    pub fn registry_pid_file(&self) -> PathBuf {
        self.at("registry.pid")
    }
    /// The node's cgroup parent (stale-run cleanup removes it).
    pub fn cgroup_parent_file(&self) -> PathBuf {
        self.at("cgroup-parent")
    }
    /// Inodes of the node's network and mount namespaces, one `net:INODE` / `mnt:INODE` per
    /// line (stale-run cleanup kills every process still in them).
    pub fn namespaces_file(&self) -> PathBuf {
        self.at("namespaces")
    }

    pub fn config(&self) -> PathBuf {
        self.at("config.toml")
    }
    pub fn log(&self) -> PathBuf {
        self.at("containerd.log")
    }
    /// The shell script that sets up the namespaces and execs containerd.
    pub fn ns_script(&self) -> PathBuf {
        self.at("namespaces.sh")
    }
    pub fn address(&self) -> PathBuf {
        self.at("containerd.sock")
    }
    pub fn ttrpc_address(&self) -> PathBuf {
        self.at("containerd.sock.ttrpc")
    }
    pub fn debug_address(&self) -> PathBuf {
        self.at("debug.sock")
    }
    pub fn root(&self) -> PathBuf {
        self.at("root")
    }
    pub fn state(&self) -> PathBuf {
        self.at("state")
    }
    pub fn tmp(&self) -> PathBuf {
        self.at("tmp")
    }
    pub fn opt(&self) -> PathBuf {
        self.at("opt")
    }
    /// Where the installer puts the shim (`--bin-dir`); first on containerd's PATH.
    pub fn bin(&self) -> PathBuf {
        self.at("bin")
    }
    /// ctr's FIFOs.
    pub fn fifo(&self) -> PathBuf {
        self.at("fifo")
    }
    /// The stock runc handler's `Root`.
    pub fn runc_root(&self) -> PathBuf {
        self.at("runc")
    }
    pub fn cdi(&self) -> PathBuf {
        self.at("cdi")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.at("cni/net.d")
    }
    /// host-local's `dataDir` (IP reservations).
    pub fn cni_ipam_dir(&self) -> PathBuf {
        self.at("cni/ipam")
    }
    /// CRI's registry `config_path` (one `hosts.toml` per registry host).
    pub fn certs_d(&self) -> PathBuf {
        self.at("certs.d")
    }
    /// The kubelet's pod log root (`/var/log/pods` on a real node).
    pub fn pod_logs(&self) -> PathBuf {
        self.at("pod-logs")
    }
    /// The kubelet's pod directories (`<kubelet root>/pods`; one `<uid>/` per pod).
    pub fn kubelet_pods(&self) -> PathBuf {
        self.at("kubelet/pods")
    }
    pub fn images(&self) -> PathBuf {
        self.at("images")
    }
    pub fn registry_dir(&self) -> PathBuf {
        self.at("registry")
    }
    pub fn scratch(&self) -> PathBuf {
        self.at("scratch")
    }
    /// Private directories bind-mounted over global paths inside the node's mount namespace.
    pub fn private_dir(&self, global: &Path) -> PathBuf {
        let flat = global.to_string_lossy().trim_matches('/').replace('/', "-");
        self.at("private").join(flat)
    }
    /// Staging mount points for the host directories a shadowed parent is rebuilt from.
    pub fn staging_dir(&self) -> PathBuf {
        self.at("ns-staging")
    }

    /// Every directory created at start.
    pub fn dirs(&self) -> Vec<PathBuf> {
        vec![
            self.root(),
            self.state(),
            self.tmp(),
            self.opt(),
            self.bin(),
            self.fifo(),
            self.runc_root(),
            self.cdi(),
            self.cni_conf_dir(),
            self.cni_ipam_dir(),
            self.certs_d(),
            self.pod_logs(),
            self.kubelet_pods(),
            self.images(),
            self.registry_dir(),
            self.scratch(),
            self.staging_dir(),
        ]
    }
}
