//! Where an output stream of a process goes: nowhere, one of containerd's FIFOs, or a
//! `file://` log.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// One output destination, parsed from containerd's stdio string.
pub(super) enum Sink {
    Null,
    Fifo(PathBuf),
    File(PathBuf),
}

impl Sink {
    pub(super) fn parse(uri: &str) -> Result<Sink> {
        if uri.is_empty() {
            return Ok(Sink::Null);
        }
        if let Some(rest) = uri.strip_prefix("file://") {
            return Ok(Sink::File(PathBuf::from(rest)));
        }
        if uri.starts_with("binary://") {
            return Err(Error::Unimplemented(format!(
                "log URI {uri}: binary:// logging is not supported by runc-architect yet"
            )));
        }
        if let Some(rest) = uri.strip_prefix("fifo://") {
            return Ok(Sink::Fifo(PathBuf::from(rest)));
        }
        if uri.contains("://") {
            return Err(Error::InvalidArgument(format!(
                "unsupported stdio URI {uri}"
            )));
        }
        Ok(Sink::Fifo(PathBuf::from(uri)))
    }

    /// Opens the sink for writing. A FIFO is opened read-write so the open never blocks
    /// and a departed reader never turns writes into EPIPE (the stock shim keeps a read
    /// end open for the same reason). The copier closes it when the process's stream
    /// ends, which is the end-of-file containerd waits for.
    pub(super) fn open(&self) -> Result<Option<File>> {
        match self {
            Sink::Null => Ok(None),
            Sink::Fifo(p) => OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .map(Some)
                .map_err(|e| Error::io("open stdio fifo", p, e)),
            Sink::File(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| Error::io("create log directory", dir, e))?;
                }
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(p)
                    .map(Some)
                    .map_err(|e| Error::io("open log file", p, e))
            }
        }
    }
}
