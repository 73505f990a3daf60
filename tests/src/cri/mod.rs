//! The kubelet's side of the Container Runtime Interface, for tests that must behave like a
//! Kubernetes node without one: no kubelet, crictl or critest exists here, so the tests are
//! the kubelet.
//!
//! - [`api`]: the CRI v1 messages and the generated gRPC clients (`runtime.v1`), from our
//!   schema `proto/proto/cri/api.proto`, compiled by `build.rs` with protox (pure Rust).
//! - [`client`]: [`CriClient`], a blocking client for containerd's CRI plugin on its unix
//!   socket, every call with the kubelet's deadline and typed errors carrying the gRPC code.
//! - [`kubelet`]: [`Kubelet`], the kubelet's calls for running, stopping and deleting pods
//!   and containers, with the fields the kubelet fills in.
//! - [`stream`]: the SPDY/3.1 remotecommand and port-forward client for the URLs that
//!   Exec/Attach/PortForward return.
//! - [`logs`]: the CRI container log format (`kubectl logs`).

pub mod client;
pub mod kubelet;
pub mod logs;
pub mod stream;

/// The CRI v1 schema (`runtime.v1`): messages and the RuntimeService / ImageService clients.
#[allow(clippy::all, missing_docs)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

pub use client::{CriClient, CriError, Timeouts};
pub use kubelet::{ContainerSpec, Kubelet, KubeletError, Pod, PodSpec};

#[cfg(test)]
mod live_tests;
