//! `runc-architect install` and `uninstall`: the command line over [`crate::install`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::install::{self, InstallOptions, UninstallOptions};

/// Flags both commands share.
#[derive(Args, Debug)]
pub struct Common {
    /// containerd's configuration file.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/etc/containerd/config.toml"
    )]
    config: PathBuf,
    /// Directory for containerd-shim-runc-architect-v1 (runtime_path names it, so it need not
    /// be on containerd's PATH).
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// The containerd binary: its major picks the config version of a new or empty config,
    /// and it checks the merged config (`config dump`) before it replaces the file.
    #[arg(long, value_name = "PATH", default_value = "containerd")]
    containerd: PathBuf,
    /// The CRI runtime handler name (RuntimeClass `handler`).
    #[arg(long, value_name = "NAME", default_value = "runc-architect")]
    handler: String,
    /// Print what would change (a unified diff of the config), change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Restart containerd when the config changed (`systemctl restart containerd`, in the
    /// node's namespaces when run in a hostPID pod); running containers keep running.
    #[arg(long)]
    restart: bool,
    /// The restart command for --restart (run with `sh -c` on the node), e.g. for nodes
    /// without systemd.
    #[arg(long, value_name = "CMD", requires = "restart")]
    restart_command: Option<String>,
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    #[command(flatten)]
    common: Common,
    /// The shim binary to install [default: containerd-shim-runc-architect-v1 next to this
    /// executable].
    #[arg(long, value_name = "PATH")]
    shim: Option<PathBuf>,
    /// containerd's major version (1 or 2) instead of asking --containerd.
    #[arg(long, value_name = "1|2")]
    containerd_major: Option<u32>,
    /// Register as runtime_type io.containerd.runc.v2 with runtime_path (containerd then sends
    /// runc's options, including checkpoint options, to the shim).
    #[arg(long)]
    as_runc: bool,
    /// Set KEY of the handler's options table (repeatable), e.g. Root=/run/ra, NoPivotRoot=true.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
    /// Label node NAME runc-architect.io/installed=true through the Kubernetes API (from
    /// inside a pod: service-account token and CA).
    #[arg(long, value_name = "NAME")]
    label_node: Option<String>,
    /// After installing, keep running until SIGTERM or SIGINT (the main process of a
    /// DaemonSet pod).
    #[arg(long)]
    sleep: bool,
}

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[command(flatten)]
    common: Common,
    /// Leave the shim binary in place.
    #[arg(long)]
    keep_binary: bool,
    /// Remove the label runc-architect.io/installed from node NAME (from inside a pod).
    #[arg(long, value_name = "NAME")]
    label_node: Option<String>,
}

pub fn install(a: InstallArgs) -> Result<i32> {
    let c = a.common;
    let o = InstallOptions {
        config: c.config,
        bin_dir: c.bin_dir,
        shim: a.shim,
        containerd: c.containerd,
        containerd_major: a.containerd_major,
        handler: c.handler,
        as_runc: a.as_runc,
        options: a.options,
        dry_run: c.dry_run,
        restart: c.restart,
        restart_command: c.restart_command,
        label_node: a.label_node,
    };
    install::install(&o, &mut std::io::stdout().lock())?;
    if a.sleep {
        wait_for_termination()?;
    }
    Ok(0)
}

pub fn uninstall(a: UninstallArgs) -> Result<i32> {
    let c = a.common;
    let o = UninstallOptions {
        config: c.config,
        bin_dir: c.bin_dir,
        containerd: c.containerd,
        handler: c.handler,
        keep_binary: a.keep_binary,
        dry_run: c.dry_run,
        restart: c.restart,
        restart_command: c.restart_command,
        label_node: a.label_node,
    };
    install::uninstall(&o, &mut std::io::stdout().lock())?;
    Ok(0)
}

/// Blocks until SIGTERM or SIGINT. The signals are blocked and waited for rather than
/// handled; as PID 1 of a container that is also what makes the kernel deliver them.
fn wait_for_termination() -> Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let sig = set.wait()?;
    println!("{sig}: exiting");
    Ok(())
}
