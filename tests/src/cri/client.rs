//! A typed, blocking CRI client: containerd's CRI plugin over gRPC on its unix socket.
//!
//! The test suites are synchronous, so the client owns a small tokio runtime and every
//! method blocks. Every call carries a deadline, as the kubelet's do: it goes out as the
//! `grpc-timeout` header (containerd's handlers see it as their context's deadline) and is
//! enforced here too, so a runtime that never answers fails the call with
//! [`tonic::Code::DeadlineExceeded`] instead of hanging the test. The kubelet's deadlines
//! (cri-client's remote_runtime.go / remote_image.go) are the defaults:
//!
//! | call | deadline |
//! | --- | --- |
//! | most calls | the runtime request timeout, 2 min |
//! | RunPodSandbox | twice that, 4 min |
//! | StopContainer | 2 min + the request's grace period |
//! | ExecSync | 2 min + the request's timeout (the kubelet sets none for timeout 0; 2 min here) |
//! | CheckpointContainer | the request's timeout if longer than 2 min, else 2 min |
//! | PullImage | 4 min (the kubelet bounds pulls by progress, not by a deadline) |
//!
//! Requests and responses are the generated messages themselves ([`super::api`]), so tests
//! see and set every field; `*_within` variants take an explicit deadline, and
//! [`CriClient::call`] with [`CriClient::runtime_service`]/[`CriClient::image_service`] runs any
//! call with any deadline.

use std::error::Error as _;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;
use tower::service_fn;

use super::api::image_service_client::ImageServiceClient;
use super::api::runtime_service_client::RuntimeServiceClient;
use super::api::*;

/// The kubelet's receive limit for CRI messages (16 MiB; gRPC's default is 4 MiB).
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// Deadlines for the calls (the kubelet's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// `--runtime-request-timeout` (2 min).
    pub request: Duration,
    /// Image pulls (4 min).
    pub pull: Duration,
    /// Connecting to the socket.
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request: Duration::from_secs(120),
            pull: Duration::from_secs(240),
            connect: Duration::from_secs(10),
        }
    }
}

/// A failed CRI call.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("start the CRI client's tokio runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("connect to the CRI socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// The call failed with a gRPC status (from the runtime, or `DeadlineExceeded` from our
    /// own deadline: then `client_deadline` is set).
    #[error("CRI {rpc}: {code:?}: {message}")]
    Rpc {
        rpc: &'static str,
        code: Code,
        message: String,
        client_deadline: bool,
    },
    /// The call succeeded but its answer breaks the CRI contract (checked by the kubelet
    /// layer, as the kubelet checks it).
    #[error("CRI {rpc}: bad response: {why}")]
    BadResponse { rpc: &'static str, why: String },
}

impl CriError {
    /// The gRPC code, for RPC failures.
    pub fn code(&self) -> Option<Code> {
        match self {
            CriError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The gRPC message, for RPC failures.
    pub fn message(&self) -> Option<&str> {
        match self {
            CriError::Rpc { message, .. } => Some(message),
            _ => None,
        }
    }

    /// Whether the call ran out of time (our deadline or the server's).
    pub fn is_deadline_exceeded(&self) -> bool {
        self.code() == Some(Code::DeadlineExceeded)
    }

    fn from_status(rpc: &'static str, s: tonic::Status) -> CriError {
        // tonic enforces the request's grpc-timeout itself and reports it as CANCELLED with a
        // TimeoutExpired source; Go's gRPC (the kubelet) reports DEADLINE_EXCEEDED.
        // (the source is not always kept, so the message is compared too).
        let timed_out = s
            .source()
            .is_some_and(|e| e.downcast_ref::<tonic::TimeoutExpired>().is_some())
            || (s.code() == Code::Cancelled
                && s.message() == tonic::TimeoutExpired(()).to_string());
        if timed_out {
            return CriError::Rpc {
                rpc,
                code: Code::DeadlineExceeded,
                message: format!("no answer within the deadline ({})", s.message()),
                client_deadline: true,
            };
        }
        CriError::Rpc {
            rpc,
            code: s.code(),
            message: s.message().to_string(),
            client_deadline: false,
        }
    }
}

/// A connected CRI client. Cheap calls from several threads at once are fine.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
    timeouts: Timeouts,
}

macro_rules! rpc {
    ($(#[$doc:meta])* $name:ident, $within:ident, $client:ident, $method:ident, $rpc:literal,
     $req:ty => $resp:ty, $deadline:ident) => {
        $(#[$doc])*
        pub fn $name(&self, req: $req) -> Result<$resp, CriError> {
            let d = self.timeouts.$deadline;
            self.$within(req, d)
        }

        #[doc = concat!("`", $rpc, "` with an explicit deadline.")]
        pub fn $within(&self, req: $req, deadline: Duration) -> Result<$resp, CriError> {
            let mut c = self.$client.clone();
            self.call($rpc, deadline, req, move |r| async move { c.$method(r).await })
        }
    };
}

impl CriClient {
    /// Connects to the CRI socket at `socket` with the kubelet's deadlines.
    pub fn connect(socket: &Path) -> Result<CriClient, CriError> {
        CriClient::connect_with(socket, Timeouts::default())
    }

    pub fn connect_with(socket: &Path, timeouts: Timeouts) -> Result<CriClient, CriError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cri-client")
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_path_buf();
        let connect_err = |source| CriError::Connect {
            path: path.clone(),
            source,
        };
        // The authority is what the kubelet sends (grpc.WithAuthority("localhost")); the
        // connector ignores the URI and dials the socket.
        let endpoint = Endpoint::from_static("http://localhost")
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.pull.max(timeouts.request) * 4);
        let dial = path.clone();
        let channel = rt
            .block_on(endpoint.connect_with_connector(service_fn(move |_: Uri| {
                let dial = dial.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(dial).await?;
                    Ok::<_, io::Error>(TokioIo::new(s))
                }
            })))
            .map_err(connect_err)?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
            images: ImageServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE),
            rt,
            socket: path,
            timeouts,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// A clone of the generated RuntimeService client (for [`CriClient::call`]).
    pub fn runtime_service(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// A clone of the generated ImageService client (for [`CriClient::call`]).
    pub fn image_service(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    /// Runs one unary call with `deadline` (sent as grpc-timeout and enforced here).
    pub fn call<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        deadline: Duration,
        req: Req,
        f: F,
    ) -> Result<Resp, CriError>
    where
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let mut request = tonic::Request::new(req);
        request.set_timeout(deadline);
        let start = std::time::Instant::now();
        self.rt.block_on(async move {
            match tokio::time::timeout(deadline, f(request)).await {
                Ok(Ok(resp)) => Ok(resp.into_inner()),
                // As in Go's gRPC, a call whose deadline has passed failed by the deadline,
                // whatever the transport saw first (the server resets the stream when the
                // grpc-timeout it was sent expires, racing our own timer).
                Ok(Err(status)) if start.elapsed() >= deadline => Err(CriError::Rpc {
                    rpc,
                    code: Code::DeadlineExceeded,
                    message: format!(
                        "no answer within the deadline of {deadline:?} ({:?}: {})",
                        status.code(),
                        status.message()
                    ),
                    client_deadline: true,
                }),
                Ok(Err(status)) => Err(CriError::from_status(rpc, status)),
                Err(_) => Err(CriError::Rpc {
                    rpc,
                    code: Code::DeadlineExceeded,
                    message: format!("no answer within the deadline of {deadline:?}"),
                    client_deadline: true,
                }),
            }
        })
    }

    /// Runs a future on the client's runtime (for anything else async).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    rpc!(version, version_within, runtime, version, "Version",
        VersionRequest => VersionResponse, request);
    rpc!(status, status_within, runtime, status, "Status",
        StatusRequest => StatusResponse, request);

    /// `RunPodSandbox`, with twice the request timeout as the kubelet gives it.
    pub fn run_pod_sandbox(
        &self,
        req: RunPodSandboxRequest,
    ) -> Result<RunPodSandboxResponse, CriError> {
        self.run_pod_sandbox_within(req, self.timeouts.request * 2)
    }

    #[doc = "`RunPodSandbox` with an explicit deadline."]
    pub fn run_pod_sandbox_within(
        &self,
        req: RunPodSandboxRequest,
        deadline: Duration,
    ) -> Result<RunPodSandboxResponse, CriError> {
        let mut c = self.runtime.clone();
        self.call("RunPodSandbox", deadline, req, move |r| async move {
            c.run_pod_sandbox(r).await
        })
    }

    rpc!(stop_pod_sandbox, stop_pod_sandbox_within, runtime, stop_pod_sandbox, "StopPodSandbox",
        StopPodSandboxRequest => StopPodSandboxResponse, request);
    rpc!(remove_pod_sandbox, remove_pod_sandbox_within, runtime, remove_pod_sandbox,
        "RemovePodSandbox", RemovePodSandboxRequest => RemovePodSandboxResponse, request);
    rpc!(pod_sandbox_status, pod_sandbox_status_within, runtime, pod_sandbox_status,
        "PodSandboxStatus", PodSandboxStatusRequest => PodSandboxStatusResponse, request);
    rpc!(list_pod_sandbox, list_pod_sandbox_within, runtime, list_pod_sandbox, "ListPodSandbox",
        ListPodSandboxRequest => ListPodSandboxResponse, request);
    rpc!(create_container, create_container_within, runtime, create_container, "CreateContainer",
        CreateContainerRequest => CreateContainerResponse, request);
    rpc!(start_container, start_container_within, runtime, start_container, "StartContainer",
        StartContainerRequest => StartContainerResponse, request);

    /// `StopContainer` with the kubelet's deadline: the request timeout plus the grace period.
    pub fn stop_container(
        &self,
        req: StopContainerRequest,
    ) -> Result<StopContainerResponse, CriError> {
        let d = self.timeouts.request + Duration::from_secs(req.timeout.max(0) as u64);
        self.stop_container_within(req, d)
    }

    #[doc = "`StopContainer` with an explicit deadline."]
    pub fn stop_container_within(
        &self,
        req: StopContainerRequest,
        deadline: Duration,
    ) -> Result<StopContainerResponse, CriError> {
        let mut c = self.runtime.clone();
        self.call("StopContainer", deadline, req, move |r| async move {
            c.stop_container(r).await
        })
    }

    rpc!(remove_container, remove_container_within, runtime, remove_container, "RemoveContainer",
        RemoveContainerRequest => RemoveContainerResponse, request);
    rpc!(list_containers, list_containers_within, runtime, list_containers, "ListContainers",
        ListContainersRequest => ListContainersResponse, request);
    rpc!(container_status, container_status_within, runtime, container_status, "ContainerStatus",
        ContainerStatusRequest => ContainerStatusResponse, request);
    rpc!(update_container_resources, update_container_resources_within, runtime,
        update_container_resources, "UpdateContainerResources",
        UpdateContainerResourcesRequest => UpdateContainerResourcesResponse, request);
    rpc!(reopen_container_log, reopen_container_log_within, runtime, reopen_container_log,
        "ReopenContainerLog", ReopenContainerLogRequest => ReopenContainerLogResponse, request);

    /// `ExecSync` with the kubelet's deadline: the request timeout plus the command's.
    pub fn exec_sync(&self, req: ExecSyncRequest) -> Result<ExecSyncResponse, CriError> {
        let d = self.timeouts.request + Duration::from_secs(req.timeout.max(0) as u64);
        self.exec_sync_within(req, d)
    }

    #[doc = "`ExecSync` with an explicit deadline."]
    pub fn exec_sync_within(
        &self,
        req: ExecSyncRequest,
        deadline: Duration,
    ) -> Result<ExecSyncResponse, CriError> {
        let mut c = self.runtime.clone();
        self.call("ExecSync", deadline, req, move |r| async move {
            c.exec_sync(r).await
        })
    }

    rpc!(exec, exec_within, runtime, exec, "Exec", ExecRequest => ExecResponse, request);
    rpc!(attach, attach_within, runtime, attach, "Attach", AttachRequest => AttachResponse,
        request);
    rpc!(port_forward, port_forward_within, runtime, port_forward, "PortForward",
        PortForwardRequest => PortForwardResponse, request);
    rpc!(container_stats, container_stats_within, runtime, container_stats, "ContainerStats",
        ContainerStatsRequest => ContainerStatsResponse, request);
    rpc!(list_container_stats, list_container_stats_within, runtime, list_container_stats,
        "ListContainerStats", ListContainerStatsRequest => ListContainerStatsResponse, request);
    rpc!(pod_sandbox_stats, pod_sandbox_stats_within, runtime, pod_sandbox_stats,
        "PodSandboxStats", PodSandboxStatsRequest => PodSandboxStatsResponse, request);
    rpc!(list_pod_sandbox_stats, list_pod_sandbox_stats_within, runtime, list_pod_sandbox_stats,
        "ListPodSandboxStats", ListPodSandboxStatsRequest => ListPodSandboxStatsResponse, request);

    /// `CheckpointContainer` with the kubelet's deadline: the request's timeout if longer than
    /// the request timeout, else the request timeout.
    pub fn checkpoint_container(
        &self,
        req: CheckpointContainerRequest,
    ) -> Result<CheckpointContainerResponse, CriError> {
        let d = self
            .timeouts
            .request
            .max(Duration::from_secs(req.timeout.max(0) as u64));
        self.checkpoint_container_within(req, d)
    }

    #[doc = "`CheckpointContainer` with an explicit deadline."]
    pub fn checkpoint_container_within(
        &self,
        req: CheckpointContainerRequest,
        deadline: Duration,
    ) -> Result<CheckpointContainerResponse, CriError> {
        let mut c = self.runtime.clone();
        self.call("CheckpointContainer", deadline, req, move |r| async move {
            c.checkpoint_container(r).await
        })
    }

    rpc!(list_images, list_images_within, images, list_images, "ListImages",
        ListImagesRequest => ListImagesResponse, request);
    rpc!(image_status, image_status_within, images, image_status, "ImageStatus",
        ImageStatusRequest => ImageStatusResponse, request);
    rpc!(pull_image, pull_image_within, images, pull_image, "PullImage",
        PullImageRequest => PullImageResponse, pull);
    rpc!(remove_image, remove_image_within, images, remove_image, "RemoveImage",
        RemoveImageRequest => RemoveImageResponse, request);
    rpc!(image_fs_info, image_fs_info_within, images, image_fs_info, "ImageFsInfo",
        ImageFsInfoRequest => ImageFsInfoResponse, request);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connecting_to_a_missing_socket_fails_with_the_path() {
        let dir = std::env::temp_dir().join(format!("ra-cri-missing-{}", std::process::id()));
        let sock = dir.join("nothing.sock");
        let err = CriClient::connect_with(
            &sock,
            Timeouts {
                connect: Duration::from_millis(500),
                ..Timeouts::default()
            },
        )
        .err()
        .expect("no socket there");
        assert!(matches!(err, CriError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("nothing.sock"), "{err}");
    }

    #[test]
    fn a_silent_server_hits_the_client_deadline() {
        // A unix socket that accepts and never answers: the call must end with
        // DeadlineExceeded from our side, not hang.
        struct RemoveDir(PathBuf);
        impl Drop for RemoveDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = std::env::temp_dir().join(format!("ra-cri-silent-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let _guard = RemoveDir(dir.clone());
        let sock = dir.join("silent.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let held = std::thread::spawn(move || {
            let (c, _) = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_secs(2));
            drop(c);
        });
        let client = CriClient::connect(&sock).expect("connect");
        let err = client
            .version_within(VersionRequest::default(), Duration::from_millis(300))
            .expect_err("no answer");
        assert!(err.is_deadline_exceeded(), "{err}");
        assert!(
            matches!(
                err,
                CriError::Rpc {
                    client_deadline: true,
                    ..
                }
            ),
            "{err}"
        );
        held.join().expect("server thread");
    }
}
