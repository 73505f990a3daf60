//! The port-forward protocol (`kubectl port-forward`, subprotocol `portforward.k8s.io`).
//!
//! Each forwarded connection is a pair of streams with the same `port` and `requestID`
//! headers: `streamType: error` (created first and half-closed by us at once, as kubectl
//! does: only the server writes on it, a message when it cannot reach the port) and
//! `streamType: data` (the TCP byte stream in both directions; our FIN half-closes the
//! connection to the pod's port).

use std::cell::Cell;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::conn::Connection;
use super::flow::FlowControl;
use super::headers::Headers;
use super::remotecommand::connect_and_upgrade;
use super::StreamError;

pub const PROTOCOL: &str = "portforward.k8s.io";

/// A port-forward session (one SPDY connection, any number of forwarded connections).
pub struct PortForward {
    conn: Connection,
    next_request: Cell<u32>,
}

/// One forwarded connection to a port of the pod.
pub struct Forwarded<'a> {
    pf: &'a PortForward,
    pub port: u16,
    pub request_id: u32,
    data: u32,
    error: u32,
}

impl PortForward {
    /// Connects to a PortForward URL and upgrades.
    pub fn open<C>(url: &str, connect: &C, timeout: Duration) -> Result<PortForward, StreamError>
    where
        C: Fn(SocketAddr) -> io::Result<TcpStream> + ?Sized,
    {
        let (conn, protocol) = connect_and_upgrade(
            url,
            connect,
            &[PROTOCOL.to_string()],
            FlowControl::default(),
            Instant::now() + timeout,
        )?;
        if protocol != PROTOCOL {
            return Err(StreamError::Handshake(format!(
                "port forward negotiated {protocol:?}"
            )));
        }
        Ok(PortForward {
            conn,
            next_request: Cell::new(0),
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Opens a forwarded connection to `port`.
    pub fn connect(&self, port: u16, timeout: Duration) -> Result<Forwarded<'_>, StreamError> {
        let deadline = Instant::now() + timeout;
        let request_id = self.next_request.get();
        self.next_request.set(request_id + 1);
        let open = |t: &str| -> Result<u32, StreamError> {
            let mut h = Headers::new();
            h.set("streamType", t)
                .set("port", &port.to_string())
                .set("requestID", &request_id.to_string());
            let id = self.conn.open_stream(h, false)?;
            self.conn.wait_reply(id, deadline)?;
            Ok(id)
        };
        let error = open("error")?;
        self.conn.close_write(error)?;
        let data = open("data")?;
        Ok(Forwarded {
            pf: self,
            port,
            request_id,
            data,
            error,
        })
    }
}

impl Forwarded<'_> {
    pub fn write(&self, data: &[u8], timeout: Duration) -> Result<(), StreamError> {
        self.pf
            .conn
            .write(self.data, data, Instant::now() + timeout)
    }

    /// Half-closes our direction (the pod's side reads EOF).
    pub fn close_write(&self) -> Result<(), StreamError> {
        self.pf.conn.close_write(self.data)
    }

    /// The next bytes from the pod, `None` at the end.
    pub fn read(&self, timeout: Duration) -> Result<Option<Vec<u8>>, StreamError> {
        self.pf.conn.read(self.data, Instant::now() + timeout)
    }

    /// Everything until the pod's side closes.
    pub fn read_to_end(&self, timeout: Duration) -> Result<Vec<u8>, StreamError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some(d) = self.pf.conn.read(self.data, deadline)? {
            out.extend(d);
        }
        Ok(out)
    }

    /// What the server wrote on the error stream so far (without waiting).
    pub fn error_so_far(&self) -> Result<String, StreamError> {
        let (d, _) = self.pf.conn.try_read(self.error)?;
        Ok(String::from_utf8_lossy(&d).into_owned())
    }

    /// Waits for the error stream to end and returns its text (empty: no error).
    pub fn wait_error(&self, timeout: Duration) -> Result<String, StreamError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some(d) = self.pf.conn.read(self.error, deadline)? {
            out.extend(d);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}
