//! The kubelet/apiserver side of CRI streaming: Exec, Attach and PortForward sessions on
//! containerd's streaming server, over SPDY/3.1 as `kubectl exec/attach/port-forward` use it.
//!
//! CRI's `Exec`/`Attach`/`PortForward` calls only return a URL
//! (`http://127.0.0.1:PORT/exec/TOKEN`, one use per token). The client connects there, asks
//! for an HTTP/1.1 upgrade to SPDY/3.1 with the subprotocol `v4.channel.k8s.io` (older ones
//! are offered too), and then speaks SPDY: one stream per channel (error, stdin, stdout,
//! stderr, resize). containerd's server also offers a WebSocket variant, but that one cannot
//! half-close stdin, which `kubectl exec -i` and `kubectl cp` need, so this is SPDY only.
//!
//! Layers, bottom up:
//! - [`headers`]: SPDY/3 name/value blocks and their zlib compression with the SPDY/3
//!   dictionary (one zlib stream per direction).
//! - [`frame`]: frame encoding/decoding (SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING,
//!   GOAWAY, HEADERS, WINDOW_UPDATE, DATA).
//! - [`flow`]: SPDY/3.1 stream and session windows and the connection's policy on them.
//! - [`upgrade`]: the HTTP upgrade and the streaming URL.
//! - [`conn`]: a client connection: a reader thread, blocking calls with deadlines.
//! - [`remotecommand`]: exec/attach ([`Session`], [`exec`], [`attach`]);
//!   [`portforward`]: port forwarding.
//!
//! The TCP connection is made by a caller-supplied `connect` function, because the streaming
//! server may listen inside a network namespace that only a thread which entered it can
//! reach ([`direct`] connects from the calling thread's namespace). Every blocking call takes
//! a timeout. The design follows the server's code (kubelet's `cri/streaming`, apimachinery's
//! `httpstream/spdy`, moby/spdystream) read in containerd's vendor tree; see the submodules
//! for the details that matter.

pub mod conn;
pub mod flow;
pub mod frame;
pub mod headers;
pub mod portforward;
pub mod remotecommand;
pub mod upgrade;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub use conn::{ConnStats, Connection, StreamEnd};
pub use flow::FlowControl;
pub use portforward::{Forwarded, PortForward};
pub use remotecommand::{
    ExecOptions, Output, Session, SessionOptions, Status, StreamResult, TerminalSize,
};

/// Errors of the streaming client.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("bad streaming URL {0}")]
    Url(String),
    #[error("connect to the streaming server at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("streaming I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the streaming server refused the upgrade: HTTP {status} {reason}: {body}")]
    Upgrade {
        status: u16,
        reason: String,
        body: String,
    },
    #[error("upgrade handshake: {0}")]
    Handshake(String),
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
    #[error("SPDY header compression: {0}")]
    Compression(String),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("stream {stream} was reset by the peer (status {status})")]
    Reset { stream: u32, status: u32 },
    #[error("the streaming connection ended: {0}")]
    Closed(String),
    #[error("bad status on the error stream: {0}")]
    Status(String),
}

/// Connects from the calling thread's network namespace (10 s connect timeout).
pub fn direct(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(10))
}

/// Runs an exec session on an `Exec` URL: sends stdin, collects output and the exit code.
pub fn exec<C>(url: &str, connect: C, opts: ExecOptions) -> Result<StreamResult, StreamError>
where
    C: Fn(SocketAddr) -> io::Result<TcpStream>,
{
    remotecommand::run(url, &connect, &opts)
}

/// Runs an attach session on an `Attach` URL (same protocol as exec; the status arrives when
/// the container's process ends or the server ends the session).
pub fn attach<C>(url: &str, connect: C, opts: ExecOptions) -> Result<StreamResult, StreamError>
where
    C: Fn(SocketAddr) -> io::Result<TcpStream>,
{
    remotecommand::run(url, &connect, &opts)
}

/// Opens an interactive exec/attach session (terminal sessions, stdin over time).
pub fn session<C>(url: &str, connect: C, opts: SessionOptions) -> Result<Session, StreamError>
where
    C: Fn(SocketAddr) -> io::Result<TcpStream>,
{
    Session::open(url, &connect, &opts)
}

/// Opens a port-forward session on a `PortForward` URL.
pub fn port_forward<C>(url: &str, connect: C, timeout: Duration) -> Result<PortForward, StreamError>
where
    C: Fn(SocketAddr) -> io::Result<TcpStream>,
{
    PortForward::open(url, &connect, timeout)
}
