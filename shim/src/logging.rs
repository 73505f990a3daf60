//! Logging of the serving shim: tracing events go to the `log` FIFO containerd creates
//! in the bundle and copies into its own log, as with every shim.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use tracing_subscriber::EnvFilter;

/// Sets up the subscriber; `debug` follows containerd's `-debug` flag.
pub fn init(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_env("RA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Opened read-write and non-blocking: the open never waits for a reader, and a full
    // FIFO drops a line instead of stalling the shim.
    let fifo = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match fifo {
        Ok(f) => builder.with_writer(Arc::new(f) as Arc<File>).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
}
