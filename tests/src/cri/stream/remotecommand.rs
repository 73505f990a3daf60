//! The remotecommand protocol (`kubectl exec` / `kubectl attach`) on a SPDY connection.
//!
//! After the upgrade the client opens one stream per channel, each named by its
//! `streamType` header, in client-go's order: `error`, then `stdin`, `stdout`, `stderr` for
//! those the CRI request asked for, then `resize` when a terminal was asked for (v3+). The
//! server counts exactly those streams (it drops `stderr` when `tty` is set), so the set must
//! match the CRI `ExecRequest`/`AttachRequest`. Then:
//!
//! - stdin: our DATA frames; our FIN half-closes the process's stdin (what `kubectl exec -i`
//!   does at the end of its input).
//! - stdout/stderr: the server's DATA frames.
//! - resize: JSON objects `{"Width":W,"Height":H}`, one per terminal size change.
//! - error: when the command ends the server writes its result and closes the connection (it
//!   resets every stream and sends GOAWAY). In v4 the result is a JSON `metav1.Status`:
//!   `{"status":"Success"}`, or `"Failure"` with `reason: NonZeroExitCode` and the exit code
//!   in `details.causes[reason=ExitCode].message`, or another failure (an internal error
//!   starting the command). In v1–v3 it is plain text, empty on success.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::conn::{ConnStats, Connection};
use super::flow::FlowControl;
use super::headers::Headers;
use super::upgrade::{upgrade, StreamUrl};
use super::StreamError;

pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";
pub const PROTOCOL_V3: &str = "v3.channel.k8s.io";
pub const PROTOCOL_V2: &str = "v2.channel.k8s.io";
pub const PROTOCOL_V1: &str = "channel.k8s.io";

/// What kubectl offers, newest first.
pub fn default_protocols() -> Vec<String> {
    [PROTOCOL_V4, PROTOCOL_V3, PROTOCOL_V2, PROTOCOL_V1]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A terminal size for the resize stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TerminalSize {
    pub width: u16,
    pub height: u16,
}

impl From<(u16, u16)> for TerminalSize {
    fn from((width, height): (u16, u16)) -> Self {
        TerminalSize { width, height }
    }
}

/// Which streams to open: must match the CRI request's flags.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    /// Offered subprotocols (default: v4, v3, v2, v1).
    pub protocols: Vec<String>,
    pub flow: FlowControl,
    /// Deadline for connecting, upgrading and opening the streams.
    pub setup_timeout: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            stdin: false,
            stdout: true,
            stderr: true,
            tty: false,
            protocols: default_protocols(),
            flow: FlowControl::default(),
            setup_timeout: Duration::from_secs(30),
        }
    }
}

/// A one-shot exec or attach: send all of stdin, optionally half-close it, collect output
/// until the command's status arrives.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// Data for stdin; `Some` opens the stdin stream (the CRI request must have `stdin`).
    pub stdin: Option<Vec<u8>>,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    /// Half-close stdin after sending it (`kubectl exec -i` at the end of its input).
    pub close_stdin_after: bool,
    /// Terminal sizes sent on the resize stream before stdin (needs `tty`).
    pub resize: Vec<TerminalSize>,
    /// Deadline for the whole session.
    pub timeout: Duration,
    pub protocols: Vec<String>,
    pub flow: FlowControl,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            stdin: None,
            stdout: true,
            stderr: true,
            tty: false,
            close_stdin_after: true,
            resize: Vec::new(),
            timeout: Duration::from_secs(60),
            protocols: default_protocols(),
            flow: FlowControl::default(),
        }
    }
}

/// A `metav1.Status` as the v4 error stream carries it (the fields the protocol uses).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Status {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub code: i32,
    #[serde(default)]
    pub details: Option<StatusDetails>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct StatusDetails {
    #[serde(default)]
    pub causes: Vec<StatusCause>,
}

/// A cause; its Go field `Type` is serialized as `reason`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct StatusCause {
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub field: String,
}

/// What a finished session produced.
#[derive(Clone, Debug, Default)]
pub struct StreamResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command's exit code: 0 for Success, the ExitCode cause for NonZeroExitCode, `None`
    /// for any other failure (then see [`StreamResult::error`]).
    pub exit_code: Option<i32>,
    /// The parsed v4 status (`None` for older protocols or an empty error stream).
    pub status: Option<Status>,
    /// The error stream's bytes as received.
    pub raw_status: Vec<u8>,
    /// The negotiated subprotocol.
    pub protocol: String,
    /// Connection counters at the end.
    pub stats: ConnStats,
}

impl StreamResult {
    /// The failure message when the command could not run or its result is not an exit code.
    pub fn error(&self) -> Option<String> {
        match (&self.status, self.exit_code) {
            (_, Some(_)) => None,
            (Some(s), None) => Some(format!("{}: {}", s.reason, s.message)),
            (None, None) => Some(String::from_utf8_lossy(&self.raw_status).into_owned()),
        }
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Interprets the error stream's bytes for `protocol`.
pub fn interpret_status(
    protocol: &str,
    raw: &[u8],
) -> Result<(Option<Status>, Option<i32>), StreamError> {
    if protocol != PROTOCOL_V4 {
        // v1-v3: plain text, nothing on success.
        let code = if raw.iter().all(u8::is_ascii_whitespace) {
            Some(0)
        } else {
            None
        };
        return Ok((None, code));
    }
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(StreamError::Status(
            "the v4 error stream ended without a status".into(),
        ));
    }
    let status: Status = serde_json::from_slice(raw).map_err(|e| {
        StreamError::Status(format!(
            "error stream is not a Status ({e}): {:?}",
            String::from_utf8_lossy(raw)
        ))
    })?;
    let code = match (status.status.as_str(), status.reason.as_str()) {
        ("Success", _) => Some(0),
        ("Failure", "NonZeroExitCode") => {
            let cause = status
                .details
                .as_ref()
                .and_then(|d| d.causes.iter().find(|c| c.reason == "ExitCode"))
                .ok_or_else(|| {
                    StreamError::Status(format!(
                        "NonZeroExitCode status without an ExitCode cause: {status:?}"
                    ))
                })?;
            Some(cause.message.trim().parse::<i32>().map_err(|_| {
                StreamError::Status(format!("exit code {:?} is not a number", cause.message))
            })?)
        }
        _ => None,
    };
    Ok((Some(status), code))
}

/// The output streams, for [`Session::read_until`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// An open exec/attach session: write stdin over time, read output as it comes, resize,
/// half-close stdin, wait for the status.
pub struct Session {
    conn: Connection,
    protocol: String,
    error: u32,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
    out: Vec<u8>,
    err: Vec<u8>,
    status: Vec<u8>,
}

/// Connects to the streaming server named by `url` through `connect` and upgrades.
pub(super) fn connect_and_upgrade<C>(
    url: &str,
    connect: &C,
    protocols: &[String],
    flow: FlowControl,
    deadline: Instant,
) -> Result<(Connection, String), StreamError>
where
    C: Fn(SocketAddr) -> io::Result<TcpStream> + ?Sized,
{
    let url = StreamUrl::parse(url)?;
    let mut sock = connect(url.addr).map_err(|source| StreamError::Connect {
        addr: url.addr,
        source,
    })?;
    let _ = sock.set_nodelay(true);
    let up = upgrade(&mut sock, &url, protocols, deadline)?;
    let conn = Connection::client(sock, up.leftover, flow)?;
    Ok((conn, up.protocol))
}

impl Session {
    /// Connects, upgrades and opens the streams `opts` names.
    pub fn open<C>(url: &str, connect: &C, opts: &SessionOptions) -> Result<Session, StreamError>
    where
        C: Fn(SocketAddr) -> io::Result<TcpStream> + ?Sized,
    {
        if !opts.stdin && !opts.stdout && !opts.stderr {
            return Err(StreamError::Protocol(
                "at least one of stdin, stdout, stderr is needed".into(),
            ));
        }
        let deadline = Instant::now() + opts.setup_timeout;
        let (conn, protocol) =
            connect_and_upgrade(url, connect, &opts.protocols, opts.flow, deadline)?;
        let open = |t: &str| -> Result<u32, StreamError> {
            let mut h = Headers::new();
            h.set("streamType", t);
            let id = conn.open_stream(h, false)?;
            conn.wait_reply(id, deadline)?;
            Ok(id)
        };
        let error = open("error")?;
        let stdin = opts.stdin.then(|| open("stdin")).transpose()?;
        let stdout = opts.stdout.then(|| open("stdout")).transpose()?;
        // The server ignores stderr when a terminal is asked for.
        let stderr = (opts.stderr && !opts.tty)
            .then(|| open("stderr"))
            .transpose()?;
        let resizable = protocol == PROTOCOL_V4 || protocol == PROTOCOL_V3;
        let resize = (opts.tty && resizable)
            .then(|| open("resize"))
            .transpose()?;
        Ok(Session {
            conn,
            protocol,
            error,
            stdin,
            stdout,
            stderr,
            resize,
            out: Vec::new(),
            err: Vec::new(),
            status: Vec::new(),
        })
    }

    /// The negotiated subprotocol.
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    /// The SPDY connection underneath (pings, counters, windows).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn write_stdin(&self, data: &[u8], timeout: Duration) -> Result<(), StreamError> {
        let id = self
            .stdin
            .ok_or_else(|| StreamError::Protocol("the session has no stdin stream".into()))?;
        self.conn.write(id, data, Instant::now() + timeout)
    }

    /// Half-closes stdin: the process reads EOF.
    pub fn close_stdin(&self) -> Result<(), StreamError> {
        let id = self
            .stdin
            .ok_or_else(|| StreamError::Protocol("the session has no stdin stream".into()))?;
        self.conn.close_write(id)
    }

    /// Sends a terminal size.
    pub fn resize(&self, size: TerminalSize, timeout: Duration) -> Result<(), StreamError> {
        let id = self.resize.ok_or_else(|| {
            StreamError::Protocol(
                "the session has no resize stream (no tty, or protocol < v3)".into(),
            )
        })?;
        let msg = format!("{{\"Width\":{},\"Height\":{}}}\n", size.width, size.height);
        self.conn
            .write(id, msg.as_bytes(), Instant::now() + timeout)
    }

    /// Moves whatever has arrived into the output buffers; true once every output stream and
    /// the error stream have ended.
    fn pump(&mut self) -> Result<bool, StreamError> {
        let mut done = true;
        for (id, buf) in [
            (self.stdout, &mut self.out),
            (self.stderr, &mut self.err),
            (Some(self.error), &mut self.status),
        ] {
            let Some(id) = id else { continue };
            let (data, ended) = self.conn.try_read(id)?;
            buf.extend(data);
            done &= ended;
        }
        Ok(done)
    }

    /// Stdout (the terminal, with a tty) received so far.
    pub fn stdout_so_far(&mut self) -> Result<&[u8], StreamError> {
        self.pump()?;
        Ok(&self.out)
    }

    /// Stderr received so far.
    pub fn stderr_so_far(&mut self) -> Result<&[u8], StreamError> {
        self.pump()?;
        Ok(&self.err)
    }

    /// Takes (and clears) the output received so far.
    pub fn take_output(&mut self) -> Result<(Vec<u8>, Vec<u8>), StreamError> {
        self.pump()?;
        Ok((std::mem::take(&mut self.out), std::mem::take(&mut self.err)))
    }

    /// Waits until `needle` shows up in the stream's output received so far (from the last
    /// [`Session::take_output`]); returns that output.
    pub fn read_until(
        &mut self,
        which: Output,
        needle: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, StreamError> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.conn.generation();
            let done = self.pump()?;
            let buf = match which {
                Output::Stdout => &self.out,
                Output::Stderr => &self.err,
            };
            if contains(buf, needle) {
                return Ok(buf.clone());
            }
            if done {
                return Err(StreamError::Closed(format!(
                    "the session ended before {:?} appeared on {which:?} (got {:?})",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(buf)
                )));
            }
            if Instant::now() >= deadline {
                return Err(StreamError::Timeout {
                    what: format!(
                        "{:?} on {which:?} (got {:?})",
                        String::from_utf8_lossy(needle),
                        String::from_utf8_lossy(buf)
                    ),
                    after: timeout,
                });
            }
            self.conn.wait_change(seen, deadline);
        }
    }

    /// Waits for the command's status and the end of its output; closes the connection.
    pub fn wait(mut self, timeout: Duration) -> Result<StreamResult, StreamError> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.conn.generation();
            if self.pump()? {
                break;
            }
            if Instant::now() >= deadline {
                return Err(StreamError::Timeout {
                    what: format!(
                        "the command's status (stdout so far {:?}, stderr {:?}, status {:?})",
                        String::from_utf8_lossy(&self.out),
                        String::from_utf8_lossy(&self.err),
                        String::from_utf8_lossy(&self.status)
                    ),
                    after: timeout,
                });
            }
            self.conn.wait_change(seen, deadline);
        }
        let (status, exit_code) = interpret_status(&self.protocol, &self.status)?;
        Ok(StreamResult {
            stdout: std::mem::take(&mut self.out),
            stderr: std::mem::take(&mut self.err),
            exit_code,
            status,
            raw_status: std::mem::take(&mut self.status),
            protocol: self.protocol.clone(),
            stats: self.conn.stats(),
        })
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs a one-shot session on an exec or attach URL.
pub fn run<C>(url: &str, connect: &C, opts: &ExecOptions) -> Result<StreamResult, StreamError>
where
    C: Fn(SocketAddr) -> io::Result<TcpStream> + ?Sized,
{
    let deadline = Instant::now() + opts.timeout;
    let session = Session::open(
        url,
        connect,
        &SessionOptions {
            stdin: opts.stdin.is_some(),
            stdout: opts.stdout,
            stderr: opts.stderr,
            tty: opts.tty,
            protocols: opts.protocols.clone(),
            flow: opts.flow,
            setup_timeout: opts.timeout,
        },
    )?;
    let left = || deadline.saturating_duration_since(Instant::now());
    for size in &opts.resize {
        session.resize(*size, left())?;
    }
    if let Some(data) = &opts.stdin {
        let sent = session.write_stdin(data, left()).and_then(|()| {
            if opts.close_stdin_after {
                session.close_stdin()
            } else {
                Ok(())
            }
        });
        // A command that exits without reading all its input ends the session under our
        // writes (the server closes the connection): its status still says what happened.
        if let Err(e) = sent {
            let grace = Instant::now() + Duration::from_secs(2).min(left());
            if session.connection().wait_closed(grace).is_err() {
                return Err(e);
            }
        }
    }
    session.wait(left())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_success() {
        let (s, code) =
            interpret_status(PROTOCOL_V4, br#"{"metadata":{},"status":"Success"}"#).expect("ok");
        assert_eq!(code, Some(0));
        assert_eq!(s.expect("status").status, "Success");
    }

    #[test]
    fn v4_nonzero_exit_code() {
        let raw = br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        let (s, code) = interpret_status(PROTOCOL_V4, raw).expect("ok");
        assert_eq!(code, Some(3));
        assert_eq!(s.expect("status").reason, "NonZeroExitCode");
    }

    #[test]
    fn v4_internal_error_has_no_exit_code() {
        let raw = br#"{"metadata":{},"status":"Failure","message":"error executing command in container: failed to exec in container: starting exec process failed","reason":"InternalError","details":{"causes":[{"message":"boom"}]},"code":500}"#;
        let (s, code) = interpret_status(PROTOCOL_V4, raw).expect("ok");
        assert_eq!(code, None);
        let r = StreamResult {
            status: s,
            exit_code: code,
            ..Default::default()
        };
        assert!(r.error().expect("error").starts_with("InternalError: "));
    }

    #[test]
    fn v4_malformed_status_is_an_error() {
        assert!(interpret_status(PROTOCOL_V4, b"").is_err());
        assert!(interpret_status(PROTOCOL_V4, b"not json").is_err());
        assert!(interpret_status(
            PROTOCOL_V4,
            br#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"x"}]}}"#
        )
        .is_err());
    }

    #[test]
    fn older_protocols_use_text() {
        assert_eq!(
            interpret_status(PROTOCOL_V3, b"").expect("ok"),
            (None, Some(0))
        );
        assert_eq!(
            interpret_status(PROTOCOL_V2, b"command terminated with exit code 1").expect("ok"),
            (None, None)
        );
    }
}
