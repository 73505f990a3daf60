//! Error types. Every error that comes from CRIU names the request it answered, and
//! carries what CRIU said about it: its errno (`cr_errno`), its first error line
//! (`cr_errmsg`) and, when the request had a log file in a directory we hold, the last
//! lines of that log.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::proto::CriuReqType;
use crate::spawn::ChildExit;

/// A boxed error, as returned by notify handlers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The last lines of a CRIU log file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogTail {
    /// Where the log was read from (as seen from this process).
    pub path: PathBuf,
    /// Its last lines, oldest first.
    pub lines: Vec<String>,
}

impl fmt::Display for LogTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "last lines of {}:", self.path.display())?;
        for l in &self.lines {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// CRIU answered a request with `success = false`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriuFailure {
    /// The request that failed.
    pub request: CriuReqType,
    /// The request type of CRIU's answer (CRIU answers `EMPTY` to requests it could not
    /// parse or does not know).
    pub answered: CriuReqType,
    /// CRIU's error number (`cr_errno`), when it set one.
    pub errno: Option<i32>,
    /// CRIU's first logged error (`cr_errmsg`), when it sent one. See also
    /// [`CriuFailure::last_log_error`].
    pub message: Option<String>,
    /// The end of CRIU's log file, when the request named one in a directory we hold.
    pub log: Option<LogTail>,
}

impl fmt::Display for CriuFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CRIU {} failed", self.request.as_str_name())?;
        if self.answered != self.request {
            write!(f, " (answered as {})", self.answered.as_str_name())?;
        }
        if let Some(e) = self.errno {
            write!(f, ": errno {e} ({})", errno_name(e))?;
        }
        let first = self.message.as_deref().map(str::trim_end);
        if let Some(m) = first {
            write!(f, ": {m}")?;
        }
        // CRIU's first error is not always the decisive one; show the last as well.
        if let Some(last) = self.last_log_error() {
            if first != Some(last) {
                let sep = if first.is_some() {
                    "; last logged error"
                } else {
                    ""
                };
                write!(f, "{sep}: {last}")?;
            }
        }
        if let Some(log) = &self.log {
            write!(f, " (log: {})", log.path.display())?;
        }
        Ok(())
    }
}

impl CriuFailure {
    /// The last `Error` line of the log tail, without its timestamp.
    pub fn last_log_error(&self) -> Option<&str> {
        let log = self.log.as_ref()?;
        let line = log.lines.iter().rev().find(|l| l.contains("Error ("))?;
        let line = line.trim_end();
        Some(match line.strip_prefix('(') {
            Some(rest) if rest.split_once(") ").is_some() => {
                rest.split_once(") ").map_or(line, |(_, r)| r)
            }
            _ => line,
        })
    }
}

fn errno_name(e: i32) -> String {
    let errno = nix::errno::Errno::from_raw(e);
    if errno == nix::errno::Errno::UnknownErrno {
        "unknown".to_owned()
    } else {
        format!("{errno:?}: {}", errno.desc())
    }
}

/// Everything that can go wrong talking to CRIU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No CRIU binary where we looked.
    #[error("CRIU binary {name:?} not found (looked in: {searched})")]
    BinaryNotFound {
        /// The name or path we were asked to run.
        name: String,
        /// Where we looked, `:`-separated.
        searched: String,
    },

    /// Starting `criu swrk` failed.
    #[error("cannot start CRIU {binary}: {source}")]
    Spawn {
        /// The binary we tried to start.
        binary: PathBuf,
        /// What the spawner reported.
        #[source]
        source: io::Error,
    },

    /// Connecting to a `criu service` socket failed.
    #[error("cannot connect to the CRIU service socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The options cannot work for this request or this kind of session.
    #[error("invalid options for CRIU {}: {reason}", request.as_str_name())]
    InvalidOptions {
        /// The request.
        request: CriuReqType,
        /// What is wrong.
        reason: String,
    },

    /// A local I/O step failed (opening a directory, the socket, ...).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// CRIU sent something we cannot decode.
    #[error("malformed message from CRIU during {}: {source}", request.as_str_name())]
    Decode {
        /// The request in flight.
        request: CriuReqType,
        /// The decoding error.
        #[source]
        source: prost::DecodeError,
    },

    /// CRIU sent a well-formed message that breaks the protocol (wrong answer type, a
    /// notification without its pid or descriptor, ...).
    #[error("protocol error during CRIU {}: {detail}", request.as_str_name())]
    Protocol {
        /// The request in flight.
        request: CriuReqType,
        /// What was wrong.
        detail: String,
    },

    /// CRIU closed the connection before answering.
    #[error(
        "CRIU closed the session during {} without answering{}{}",
        request.as_str_name(),
        exit.map(|e| format!(" (CRIU {e})")).unwrap_or_default(),
        log.as_ref().map(|l| format!(" (log: {})", l.path.display())).unwrap_or_default()
    )]
    SessionClosed {
        /// The request in flight.
        request: CriuReqType,
        /// How the CRIU process ended, when known.
        exit: Option<ChildExit>,
        /// The end of its log, when known.
        log: Option<LogTail>,
    },

    /// CRIU answered `success = false`.
    #[error("{0}")]
    Criu(Box<CriuFailure>),

    /// A notify handler returned an error; CRIU was told (notify_success = false) and
    /// aborted the request.
    #[error("notify handler failed on {script:?} during CRIU {}: {source}", request.as_str_name())]
    Notify {
        /// The request in flight.
        request: CriuReqType,
        /// The notification the handler failed on ("post-dump", ...).
        script: String,
        /// The handler's error.
        #[source]
        source: BoxError,
        /// CRIU's own answer after the abort, when it sent one.
        criu: Option<Box<CriuFailure>>,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The request this error belongs to, when it belongs to one.
    pub fn request(&self) -> Option<CriuReqType> {
        match self {
            Error::InvalidOptions { request, .. }
            | Error::Decode { request, .. }
            | Error::Protocol { request, .. }
            | Error::SessionClosed { request, .. }
            | Error::Notify { request, .. } => Some(*request),
            Error::Criu(f) => Some(f.request),
            _ => None,
        }
    }

    /// CRIU's failure report, when CRIU answered with one.
    pub fn criu_failure(&self) -> Option<&CriuFailure> {
        match self {
            Error::Criu(f) => Some(f),
            Error::Notify { criu: Some(f), .. } => Some(f),
            _ => None,
        }
    }

    /// CRIU's errno (`cr_errno`), when it reported one.
    pub fn criu_errno(&self) -> Option<i32> {
        self.criu_failure().and_then(|f| f.errno)
    }

    /// CRIU's first error message (`cr_errmsg`), when it reported one.
    pub fn criu_message(&self) -> Option<&str> {
        self.criu_failure().and_then(|f| f.message.as_deref())
    }

    /// The end of CRIU's log, when we could read it.
    pub fn log_tail(&self) -> Option<&LogTail> {
        match self {
            Error::SessionClosed { log, .. } => log.as_ref(),
            other => other.criu_failure().and_then(|f| f.log.as_ref()),
        }
    }
}
