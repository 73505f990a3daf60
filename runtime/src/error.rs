//! Errors of the runtime layer.
//!
//! Each variant carries what a caller needs to report the problem at the right place: the
//! shim maps [`Error::kind`] to a ttrpc status code and uses the message verbatim, so
//! messages say which container, process or file they are about.

use std::path::PathBuf;

/// The class of an error, which the shim maps onto a ttrpc/gRPC status code the way the
/// stock runc shim does (containerd's errdefs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object (container, process, file) does not exist.
    NotFound,
    /// The object already exists.
    AlreadyExists,
    /// The request itself is malformed.
    InvalidArgument,
    /// The object is in the wrong state for the request.
    FailedPrecondition,
    /// The request is valid but not supported.
    Unimplemented,
    /// Anything else; the stock shim reports runtime failures this way.
    Unknown,
}

/// Errors of container and process management.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    /// A state-machine refusal worded like the stock shim's ("cannot start a running
    /// process"); the stock shim returns these with code Unknown.
    #[error("{0}")]
    State(String),
    /// The OCI runtime (libcontainer, run by our helper) failed.
    #[error("{context}: {message}")]
    Runtime { context: String, message: String },
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The status class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::Unimplemented(_) => ErrorKind::Unimplemented,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            _ => ErrorKind::Unknown,
        }
    }

    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn sys(context: impl Into<String>, source: nix::Error) -> Self {
        Error::Sys {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
