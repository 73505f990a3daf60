//! Containers for the runc-architect shim, run by embedded libcontainer, with their
//! checkpoint, restore, hibernation and migration.
//!
//! Data flows containerd → shim (ttrpc, events) → this crate → libcontainer / cgroups /
//! CRIU (through `criu-rpc`) / the checkpoint store. The crate owns:
//!
//! - [`container`]: one container, its init and exec processes, and the stock shim's
//!   state machine (created → running ⇄ paused → stopped);
//! - [`helper`] and [`spawn`]: libcontainer's create and exec clone their caller, so
//!   they run in a single-threaded re-execution of the shim binary, never in the
//!   multi-threaded shim itself;
//! - [`exits`]: every child is reaped by the shim crate's reaper; exits are routed to
//!   the process that owns the pid;
//! - [`io`]: stdio as pipes or a pty owned by the shim, copied to containerd's FIFOs;
//! - [`cgroups`]: host layout (v1, hybrid, v2), stats in containerd's format, OOM;
//! - [`rootfs`]: mounting the rootfs containerd hands over;
//! - [`checkpoint`]: dump and restore with CRIU, one module per concern (images, mounts,
//!   network lock, the freezer, CRIU's spawner);
//! - [`hibernate`]: the per-container hibernation state machine (`policy`, no I/O) and
//!   the mechanisms it drives (the tree, the network watch, hold and probes);
//! - [`migrate`]: who is whose replacement when a pod's state moves to another node.
//!
//! Hibernation builds on the same pieces as the plain container: the v2 cgroup every
//! container gets (also on hybrid hosts), pipes instead of host fds for stdio, and exit
//! tracking that does not care who spawned a process.

pub mod cgroups;
pub mod checkpoint;
pub mod container;
pub mod error;
pub mod exits;
pub mod helper;
pub mod hibernate;
pub mod io;
pub mod migrate;
pub mod process;
pub mod rootfs;
pub mod spawn;

pub use container::{Container, CreateConfig, RuntimeEvent};
pub use error::{Error, ErrorKind, Result};
pub use exits::ExitWatcher;
pub use io::StdioConfig;
pub use process::{ExitInfo, ProcessState, Status};
