//! Test harness for runc-architect: real containerd daemons, real shims, real runc.
//!
//! The pieces, used by the suites in `tests/tests/` and by the benchmarks in `benches/`:
//!
//! - [`Version`] and [`paths`]: where each containerd series is installed
//!   (`$RA_PREFIX/containerd-<series>`, default prefix `/opt/runc-architect`) and where the
//!   runc-architect shim binary is ([`paths::architect_shim`]).
//! - [`Containerd`]: a private daemon (own root, state, sockets and temp dir, all under one
//!   temporary directory) with the runc-architect shim registered by putting a directory that
//!   holds `containerd-shim-runc-architect-v1` first on the daemon's `PATH`. Stopped and cleaned
//!   up (shims, mounts, cgroups, runc state) on drop.
//! - [`Ctr`]: the matching `ctr` binary bound to that daemon's socket and a namespace.
//! - [`image::ImageBuilder`]: an OCI image layout tarball built in Rust (static busybox with its
//!   applets, `/etc/passwd`, ...), imported with `ctr images import`.
//! - [`events::EventRecorder`]: `ctr events` in the background, parsed.
//! - [`pty`]: run a command on a pseudo terminal (for `ctr run -t`).
//! - [`diff`]: observations as structured data, normalization and readable diffs for the
//!   differential suites.
//! - [`shim`]: start a shim binary the way containerd does and speak its task API over ttrpc
//!   (bad-input tests, exact error codes).
//! - [`ckpt`]: checkpoint/restore pieces: the `ckload` workloads (built with `gcc -static`),
//!   named network namespaces wired to the host, TCP probes, finding the CRIU a shim runs.
//! - [`cri`]: the kubelet's side of the CRI: a typed gRPC client for containerd's CRI plugin, the
//!   kubelet's calls as a library ([`cri::kubelet`]), the SPDY/3.1 remotecommand streaming
//!   client for Exec/Attach/PortForward ([`cri::stream`]) and the CRI log format ([`cri::logs`]).
//! - [`node`]: a CRI test node: a private containerd with CRI in network and mount
//!   namespaces of its own, CNI pod networking, our pause image, a local OCI registry, and
//!   runc-architect registered by its installer.

pub mod ckpt;
pub mod cleanup;
pub mod containerd;
pub mod cri;
pub mod ctr;
pub mod diff;
pub mod differential;
pub mod events;
pub mod image;
pub mod node;
pub mod paths;
pub mod poll;
pub mod process;
pub mod pty;
pub mod shim;
pub mod spec;
pub mod suite;

pub use containerd::Containerd;
pub use ctr::Ctr;
pub use paths::{Runtime, Version};
pub use process::Output;
