//! One RPC connection to CRIU and the request/notify/response exchange on it.
//!
//! A request is one `CriuReq` packet; CRIU answers with any number of `NOTIFY`
//! responses, each acknowledged by a `NOTIFY` request, then with the final response.
//! With `keep_open` (only VERSION, FEATURE_CHECK, PAGE_SERVER, PAGE_SERVER_CHLD and the
//! CPUINFO requests) CRIU then waits for the next request; otherwise it closes the
//! connection (and a swrk CRIU exits). PRE_DUMP is special: CRIU waits for further
//! PRE_DUMPs and a final DUMP on the same connection (see [`crate::IterativeDump`]).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::Instrument;

use crate::caps::{Features, Version};
use crate::error::{CriuFailure, Error, LogTail, Result};
use crate::notify::{self, NotifyHandler};
use crate::opts::LogLocation;
use crate::proto::{CriuFeatures, CriuOpts, CriuReq, CriuReqType, CriuResp};
use crate::spawn::{ChildExit, ExitFuture};
use crate::transport::SeqPacket;

/// How many log lines an error carries.
pub const LOG_TAIL_LINES: usize = 20;
/// How much of the log end is read to find them.
const LOG_TAIL_BYTES: u64 = 16 * 1024;
/// How long to wait for a CRIU that closed the connection to be reaped before an error
/// is reported without its exit status.
const CLOSED_EXIT_WAIT: Duration = Duration::from_secs(5);

/// A CRIU child process (swrk) attached to a session.
struct ChildHandle {
    pid: i32,
    exit: Option<ExitFuture>,
}

/// A connection to CRIU: a `criu swrk` child or a `criu service` socket.
///
/// Most callers use the one-shot methods of [`crate::Criu`]; a `Session` serves
/// sequences of `keep_open` requests (VERSION, FEATURE_CHECK, PAGE_SERVER ...) and raw
/// requests through [`Session::call`].
pub struct Session {
    sock: SeqPacket,
    child: Option<ChildHandle>,
    transport: &'static str,
    exit_wait: Duration,
    keep_open: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("transport", &self.transport)
            .field("criu_pid", &self.criu_pid())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(
        sock: SeqPacket,
        child: Option<(i32, ExitFuture)>,
        transport: &'static str,
        exit_wait: Duration,
    ) -> Self {
        Session {
            sock,
            child: child.map(|(pid, exit)| ChildHandle {
                pid,
                exit: Some(exit),
            }),
            transport,
            exit_wait,
            keep_open: true,
        }
    }

    /// Wraps a connected SOCK_SEQPACKET socket whose peer speaks CRIU's RPC (e.g. a
    /// service connection made by other means). No child is attached.
    pub fn from_socket(fd: OwnedFd) -> Result<Self> {
        let sock = SeqPacket::new(fd).map_err(|e| Error::io("preparing the CRIU socket", e))?;
        Ok(Session::new(sock, None, "socket", Duration::from_secs(10)))
    }

    /// Pid of the CRIU child, for swrk sessions.
    pub fn criu_pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.pid)
    }

    /// Sends `req` and returns CRIU's final answer as it is (even `success = false`),
    /// calling `handler` for each notification on the way. Errors are transport and
    /// protocol errors, and the handler's.
    pub async fn call<H: NotifyHandler>(
        &mut self,
        req: CriuReq,
        handler: &mut H,
    ) -> Result<CriuResp> {
        let request = req.r#type();
        let span = self.span(request);
        async move {
            let (answer, pending) = self.exchange(&req, handler).await?;
            if let Some(err) = pending {
                return Err(attach_answer(err, answer.as_ref(), None));
            }
            match answer {
                Some(resp) => Ok(resp),
                None => Err(self.closed_error(request, None).await),
            }
        }
        .instrument(span)
        .await
    }

    fn span(&self, request: CriuReqType) -> tracing::Span {
        tracing::info_span!(
            "criu_request",
            request = request.as_str_name(),
            transport = self.transport,
            criu_pid = self.criu_pid(),
        )
    }

    /// Whether the following VERSION/FEATURE_CHECK requests ask CRIU to keep the
    /// session open (default `true`). Set it to `false` before the last one: a swrk
    /// CRIU that kept the session open treats the hang-up of [`Session::close`] as an
    /// error (it logs "Can't recv request" and exits with code 255), while one whose
    /// last request did not ask to keep it open exits cleanly.
    pub fn keep_open(&mut self, keep_open: bool) {
        self.keep_open = keep_open;
    }

    /// VERSION (keeping the session open unless [`Session::keep_open`] says otherwise).
    pub async fn version(&mut self) -> Result<Version> {
        let req = CriuReq {
            r#type: CriuReqType::Version as i32,
            keep_open: self.keep_open.then_some(true),
            ..Default::default()
        };
        let resp = self.run(req, None, &mut notify::NoNotify).await?;
        Version::from_response(&resp)
    }

    /// FEATURE_CHECK (keeping the session open unless [`Session::keep_open`] says
    /// otherwise). Returns, for each feature asked for,
    /// whether it is supported (features not asked for are `false`).
    pub async fn feature_check(&mut self, features: Features) -> Result<Features> {
        let resp = self
            .run(
                feature_request(features, self.keep_open),
                None,
                &mut notify::NoNotify,
            )
            .await?;
        Features::from_response(&resp)
    }

    /// WAIT_PID: waits for `pid`, a child of this CRIU (e.g. a page server started with
    /// PAGE_SERVER_CHLD), and returns its exit. CRIU refuses `keep_open` for it, so it
    /// must be the session's last request.
    pub async fn wait_pid(&mut self, pid: u32) -> Result<ChildExit> {
        let req = CriuReq {
            r#type: CriuReqType::WaitPid as i32,
            pid: Some(pid),
            ..Default::default()
        };
        let resp = self.run(req, None, &mut notify::NoNotify).await?;
        let status = resp.status.ok_or_else(|| Error::Protocol {
            request: CriuReqType::WaitPid,
            detail: "WAIT_PID answer without a status".into(),
        })?;
        Ok(ChildExit::from_wait_status(status))
    }

    /// Closes the connection and, for a swrk session, waits (bounded) for CRIU to be
    /// reaped. Returns its exit when known.
    pub async fn close(self) -> Option<ChildExit> {
        let Session {
            sock,
            child,
            exit_wait,
            ..
        } = self;
        drop(sock);
        let mut child = child?;
        let exit = child.exit.take()?;
        match tokio::time::timeout(exit_wait, exit).await {
            Ok(Ok(e)) => {
                tracing::debug!(criu_pid = child.pid, exit = %e, "CRIU exited");
                Some(e)
            }
            Ok(Err(e)) => {
                tracing::warn!(criu_pid = child.pid, error = %e, "waiting for CRIU failed");
                None
            }
            Err(_) => {
                tracing::warn!(criu_pid = child.pid, "CRIU did not exit in {exit_wait:?}");
                None
            }
        }
    }

    /// Runs one request and interprets the answer: `Ok` only for a successful answer
    /// of the request's type. `log` names the log file for error reports.
    pub(crate) async fn run<H: NotifyHandler>(
        &mut self,
        req: CriuReq,
        log: Option<&LogLocation>,
        handler: &mut H,
    ) -> Result<CriuResp> {
        let request = req.r#type();
        let span = self.span(request);
        async move {
            let started = Instant::now();
            let (answer, pending) = self.exchange(&req, handler).await?;
            let result = match (answer, pending) {
                (answer, Some(err)) => {
                    let failure = match &answer {
                        Some(resp) if !resp.success => {
                            Some(failure(request, resp, read_tail(log).await))
                        }
                        _ => None,
                    };
                    Err(attach_answer(err, None, failure))
                }
                (None, None) => Err(self.closed_error(request, log).await),
                (Some(resp), None) if !resp.success => {
                    let tail = read_tail(log).await;
                    Err(Error::Criu(Box::new(failure(request, &resp, tail))))
                }
                (Some(resp), None) if resp.r#type() != request => Err(Error::Protocol {
                    request,
                    detail: format!(
                        "answer of type {} to a {} request",
                        resp.r#type().as_str_name(),
                        request.as_str_name()
                    ),
                }),
                (Some(resp), None) => Ok(resp),
            };
            let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            match &result {
                Ok(_) => tracing::info!(elapsed_ms, "CRIU request done"),
                Err(e) => tracing::warn!(elapsed_ms, error = %e, "CRIU request failed"),
            }
            result
        }
        .instrument(span)
        .await
    }

    /// Sends `req`, serves notifications, and returns the final answer (`None` when CRIU
    /// hung up first) plus the first notify error, if any.
    async fn exchange<H: NotifyHandler>(
        &mut self,
        req: &CriuReq,
        handler: &mut H,
    ) -> Result<(Option<CriuResp>, Option<Error>)> {
        let request = req.r#type();
        self.sock
            .send(&req.encode_to_vec())
            .await
            .map_err(|e| Error::io(format!("sending {} to CRIU", request.as_str_name()), e))?;
        let mut pending: Option<Error> = None;
        loop {
            let packet = match self.sock.recv().await {
                Ok(Some(p)) => p,
                Ok(None) => return Ok((None, pending)),
                // The peer vanished mid-packet: same as a hang-up for the caller.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok((None, pending))
                }
                Err(e) => return Err(Error::io("receiving from CRIU", e)),
            };
            let resp = CriuResp::decode(packet.data.as_slice())
                .map_err(|source| Error::Decode { request, source })?;
            if resp.r#type() != CriuReqType::Notify {
                return Ok((Some(resp), pending));
            }
            let script = resp
                .notify
                .as_ref()
                .and_then(|n| n.script.clone())
                .unwrap_or_default();
            let pid = resp.notify.as_ref().and_then(|n| n.pid);
            tracing::debug!(script = %script, pid, fds = packet.fds.len(), "CRIU notify");

            let mut external = Vec::new();
            let verdict: Result<(), Error> = if pending.is_some() {
                // A handler already failed: CRIU should have aborted; refuse the rest.
                Err(Error::Protocol {
                    request,
                    detail: format!("notification {script:?} after a refused one"),
                })
            } else {
                match notify::parse(&script, pid, packet.fds, &mut external) {
                    Ok(n) => handler.on_notify(n).await.map_err(|e| Error::Notify {
                        request,
                        script: script.clone(),
                        source: e.into(),
                        criu: None,
                    }),
                    Err(e) => Err(Error::Protocol {
                        request,
                        detail: e.to_string(),
                    }),
                }
            };
            let ok = verdict.is_ok();
            if let Err(e) = verdict {
                tracing::warn!(script = %script, error = %e, "refusing CRIU notification");
                pending.get_or_insert(e);
            }
            let ack = CriuReq {
                r#type: CriuReqType::Notify as i32,
                notify_success: Some(ok),
                opts: (ok && !external.is_empty()).then(|| CriuOpts {
                    external,
                    ..Default::default()
                }),
                ..Default::default()
            };
            if let Err(e) = self.sock.send(&ack.encode_to_vec()).await {
                // CRIU may already be gone; report what we know.
                if pending.is_some() {
                    return Ok((None, pending));
                }
                return Err(Error::io(format!("acknowledging {script:?} to CRIU"), e));
            }
        }
    }

    async fn closed_error(&mut self, request: CriuReqType, log: Option<&LogLocation>) -> Error {
        let exit = match self.child.as_mut().and_then(|c| c.exit.take()) {
            Some(fut) => match tokio::time::timeout(CLOSED_EXIT_WAIT, fut).await {
                Ok(Ok(e)) => Some(e),
                _ => None,
            },
            None => None,
        };
        Error::SessionClosed {
            request,
            exit,
            log: read_tail(log).await,
        }
    }
}

/// Puts CRIU's own failure report into a notify error.
fn attach_answer(err: Error, resp: Option<&CriuResp>, with: Option<CriuFailure>) -> Error {
    match err {
        Error::Notify {
            request,
            script,
            source,
            criu: None,
        } => {
            let criu = with.or_else(|| {
                resp.filter(|r| !r.success)
                    .map(|r| failure(request, r, None))
            });
            Error::Notify {
                request,
                script,
                source,
                criu: criu.map(Box::new),
            }
        }
        other => other,
    }
}

fn failure(request: CriuReqType, resp: &CriuResp, log: Option<LogTail>) -> CriuFailure {
    CriuFailure {
        request,
        answered: resp.r#type(),
        errno: resp.cr_errno.filter(|e| *e != 0),
        message: resp.cr_errmsg.clone().filter(|m| !m.is_empty()),
        log,
    }
}

pub(crate) fn feature_request(features: Features, keep_open: bool) -> CriuReq {
    CriuReq {
        r#type: CriuReqType::FeatureCheck as i32,
        keep_open: keep_open.then_some(true),
        // CRIU dereferences `features` unconditionally: always send it.
        features: Some(CriuFeatures {
            mem_track: Some(features.mem_track),
            lazy_pages: Some(features.lazy_pages),
            pidfd_store: Some(features.pidfd_store),
        }),
        ..Default::default()
    }
}

/// Reads the last lines of the log, if there is one to read.
pub(crate) async fn read_tail(log: Option<&LogLocation>) -> Option<LogTail> {
    let log = log?;
    match tail_lines(log, LOG_TAIL_LINES).await {
        Ok(lines) => Some(LogTail {
            path: log.display_path(),
            lines,
        }),
        Err(e) => {
            tracing::debug!(log = %log.display_path().display(), error = %e, "no CRIU log tail");
            None
        }
    }
}

async fn tail_lines(log: &LogLocation, n: usize) -> std::io::Result<Vec<String>> {
    let mut f = tokio::fs::File::open(log.open_path()).await?;
    let len = f.metadata().await?.len();
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    f.seek(std::io::SeekFrom::Start(start)).await?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // the first one is cut
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..].iter().map(|l| (*l).to_owned()).collect())
}

#[cfg(test)]
mod tests;
