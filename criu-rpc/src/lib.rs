//! An async (tokio) client for CRIU's RPC protocol.
//!
//! It talks to CRIU directly, the way runc does, instead of running the `criu` command
//! line: options are typed, notifications are handled in-process (no action scripts),
//! descriptors travel both ways, and the restored pid comes back as a number.
//!
//! ```no_run
//! # async fn demo() -> criu_rpc::Result<()> {
//! use criu_rpc::{Criu, CriuOptions};
//! let criu = Criu::new();
//! println!("CRIU {}", criu.version().await?);
//! criu.dump(CriuOptions::new().pid(1234).images_dir("/tmp/img").log_file("dump.log"))
//!     .await?;
//! let restored = criu
//!     .restore(CriuOptions::new().images_dir("/tmp/img").log_file("restore.log"))
//!     .await?;
//! println!("restored as pid {}", restored.pid);
//! # Ok(()) }
//! ```
//!
//! # Session model
//!
//! A [`Session`] is one SOCK_SEQPACKET connection; each packet is one protobuf message
//! ([`proto::CriuReq`] from us, [`proto::CriuResp`] from CRIU).
//! - **swrk** (default): every session starts its own `criu swrk 3` child on one end of a
//!   socketpair. CRIU serves one request and exits, except that VERSION, FEATURE_CHECK,
//!   PAGE_SERVER, PAGE_SERVER_CHLD and the CPUINFO requests may set `keep_open` and be
//!   followed by more requests; PRE_DUMP waits for more PRE_DUMPs and a final DUMP
//!   ([`IterativeDump`]). DUMP, RESTORE, CHECK and SINGLE_PRE_DUMP end the session.
//!   The one-shot methods of [`Criu`] each use a fresh session; [`Criu::session`] opens
//!   one for `keep_open` sequences.
//! - **service** ([`Criu::service`]): each session connects to a running `criu service`
//!   socket. Same protocol, but CRIU is not our child, so it cannot receive descriptors
//!   (`inherit_fd`, `ps.fd`) nor restore as our sibling (`rst_sibling`).
//!
//! Each request runs in a `criu_request` tracing span (request type, transport, CRIU's
//! pid) and logs its duration.
//!
//! # Descriptor passing
//!
//! - *To CRIU, by number in our process*: the images and work directories (and
//!   `status_fd`, `pidfd_store_sk`) are opened here and their numbers sent; CRIU opens
//!   them as `/proc/<peer>/fd/<n>`, the peer being the process at the other end of the
//!   socket (this one). [`CriuOptions`] keeps them open until the request is answered.
//! - *To CRIU, inherited*: `inherit_fd` (e.g. new stdio pipes for `pipe:[ino]`, external
//!   namespaces) and `ps.fd` are placed in the swrk child at fixed numbers (4, 5, ...; the
//!   socket is 3) and those numbers are sent. A `pre_exec` hook moves them into place and
//!   marks every other descriptor close-on-exec, so nothing else leaks into CRIU even if
//!   some library forgot `O_CLOEXEC`.
//! - *From CRIU*: every receive asks for SCM_RIGHTS data; CRIU sends the master of an
//!   orphaned pts with the `orphan-pts-master` notification, which the handler receives
//!   as an [`std::os::fd::OwnedFd`].
//!
//! # Notify protocol
//!
//! With `notify_scripts` (set by [`Criu::dump_with_notify`] and
//! [`Criu::restore_with_notify`]) CRIU pauses at each action-script point and sends a
//! NOTIFY response. The session turns it into a [`Notify`] and awaits the
//! [`NotifyHandler`], then acknowledges with a NOTIFY request whose `notify_success` is
//! the handler's verdict. An error aborts the operation in CRIU and the call returns
//! [`Error::Notify`], with CRIU's own failure report attached. Handlers take `&mut self`
//! and can carry state across the notifications of a request. `query-ext-files` lets
//! the handler return `--external` keys.
//!
//! # Reaping contract
//!
//! This crate never calls `waitpid`. A [`ChildSpawner`] starts the swrk child and returns
//! a future for its exit; [`TokioSpawner`] (the default) uses `tokio::process`. Inside a
//! containerd shim, whose reaper `waitpid(-1)`s every child and publishes exits on its
//! monitor, plug in a spawner that subscribes to the monitor *before* spawning and
//! resolves the future from the exit event of that pid (example in [`spawn`]). After
//! each one-shot request the client waits (bounded by [`Criu::exit_wait`]) for CRIU to
//! be reaped. A tree restored with `rst_sibling` is the caller's child: reap it too.
//!
//! # Errors
//!
//! [`Error`] names the request and, when CRIU answered, carries its errno
//! (`cr_errno`), first error line (`cr_errmsg`) and the last lines of its log file when
//! the options gave a directory we hold (work dir, else images dir; log name
//! `log_file`, else CRIU's default `criu.log`).

pub mod caps;
mod client;
pub mod error;
mod fds;
pub mod notify;
pub mod opts;
mod session;
pub mod spawn;
mod transport;

/// CRIU's RPC messages, generated from the schema in `runc-architect-proto`.
pub mod proto {
    pub use runc_architect_proto::criu::*;
}

pub use caps::{CapabilitiesCache, CriuCapabilities, Features, Version};
pub use client::{Criu, CriuStderr, DumpOutcome, IterativeDump, PageServerInfo, RestoreOutcome};
pub use error::{BoxError, CriuFailure, Error, LogTail, Result};
pub use fds::SWRK_SOCKET_FD;
pub use notify::{NoNotify, Notify, NotifyHandler};
pub use opts::CriuOptions;
pub use proto::{CriuCgMode, CriuNetworkLockMethod, CriuPreDumpMode, CriuReqType};
pub use session::{Session, LOG_TAIL_LINES};
pub use spawn::{ChildExit, ChildSpawner, ExitFuture, SpawnedChild, TokioSpawner};
