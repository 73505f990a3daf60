//! NOTIFY callbacks ("action scripts" run over RPC).
//!
//! With `notify_scripts` set, CRIU stops at each action-script point of a dump or restore
//! and sends a `NOTIFY` response naming the point ("post-dump", "pre-resume", ...). It
//! waits until the client answers with a `NOTIFY` request; `notify_success = false`
//! makes it abort the operation. The session calls the [`NotifyHandler`] for each one and
//! acknowledges after the handler returned: `Ok` acks with success, `Err` acks with
//! failure (CRIU then aborts, and the request ends with [`crate::Error::Notify`]).
//!
//! Handlers are `&mut self`, so they can keep state across the notifications of one
//! request (e.g. record the restored pid from `post-restore`, hold the pts master).

use std::convert::Infallible;
use std::os::fd::OwnedFd;

use async_trait::async_trait;

use crate::error::BoxError;

/// A notification from CRIU.
#[derive(Debug)]
#[non_exhaustive]
pub enum Notify<'a> {
    /// "pre-stream": before image streaming starts.
    PreStream,
    /// "pre-dump": before the tree is frozen and dumped.
    PreDump,
    /// "post-dump": everything is dumped; the tree is still frozen. Whatever must happen
    /// before the tasks are killed or resumed happens here.
    PostDump,
    /// "pre-restore": before restore starts.
    PreRestore,
    /// "post-restore": the tree is restored (still stopped before resume); `pid` is its
    /// root.
    PostRestore {
        /// Root of the restored tree, in our pid namespace.
        pid: i32,
    },
    /// "network-lock": lock the network now (when the caller does it itself).
    NetworkLock,
    /// "network-unlock": unlock it.
    NetworkUnlock,
    /// "setup-namespaces": the root task exists with its namespaces; set them up (e.g.
    /// move a veth into its netns).
    SetupNamespaces {
        /// Root of the tree being restored.
        pid: i32,
    },
    /// "post-setup-namespaces".
    PostSetupNamespaces,
    /// "pre-resume": right before the restored tasks run again.
    PreResume,
    /// "post-resume": they run.
    PostResume,
    /// "orphan-pts-master": CRIU hands over the master side of a pts whose master was
    /// not in the restored tree (with `orphan_pts_master`). The handler owns it now.
    OrphanPtsMaster {
        /// The pts master.
        fd: OwnedFd,
    },
    /// "status-ready": a lazy-pages or page-server CRIU is ready.
    StatusReady,
    /// "query-ext-files": push `--external` entries for files to treat as external;
    /// CRIU receives what the handler leaves in `external`.
    QueryExtFiles {
        /// External keys to return to CRIU (starts empty).
        external: &'a mut Vec<String>,
    },
    /// A notification this crate does not know.
    Other(String),
}

impl Notify<'_> {
    /// CRIU's name for the notification.
    pub fn script(&self) -> &str {
        match self {
            Notify::PreStream => "pre-stream",
            Notify::PreDump => "pre-dump",
            Notify::PostDump => "post-dump",
            Notify::PreRestore => "pre-restore",
            Notify::PostRestore { .. } => "post-restore",
            Notify::NetworkLock => "network-lock",
            Notify::NetworkUnlock => "network-unlock",
            Notify::SetupNamespaces { .. } => "setup-namespaces",
            Notify::PostSetupNamespaces => "post-setup-namespaces",
            Notify::PreResume => "pre-resume",
            Notify::PostResume => "post-resume",
            Notify::OrphanPtsMaster { .. } => "orphan-pts-master",
            Notify::StatusReady => "status-ready",
            Notify::QueryExtFiles { .. } => "query-ext-files",
            Notify::Other(s) => s,
        }
    }
}

/// Why a notification could not be turned into a [`Notify`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParseError {
    MissingPid(&'static str),
    MissingFd(&'static str),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::MissingPid(s) => write!(f, "{s:?} notification without a pid"),
            ParseError::MissingFd(s) => write!(f, "{s:?} notification without a descriptor"),
        }
    }
}

/// Builds the [`Notify`] for script `name`. `fds` are the descriptors that came with the
/// packet; the ones a notification does not use are closed.
pub(crate) fn parse<'a>(
    name: &str,
    pid: Option<i32>,
    fds: Vec<OwnedFd>,
    external: &'a mut Vec<String>,
) -> Result<Notify<'a>, ParseError> {
    let mut fds = fds.into_iter();
    Ok(match name {
        "pre-stream" => Notify::PreStream,
        "pre-dump" => Notify::PreDump,
        "post-dump" => Notify::PostDump,
        "pre-restore" => Notify::PreRestore,
        "post-restore" => Notify::PostRestore {
            pid: pid.ok_or(ParseError::MissingPid("post-restore"))?,
        },
        "network-lock" => Notify::NetworkLock,
        "network-unlock" => Notify::NetworkUnlock,
        "setup-namespaces" => Notify::SetupNamespaces {
            pid: pid.ok_or(ParseError::MissingPid("setup-namespaces"))?,
        },
        "post-setup-namespaces" => Notify::PostSetupNamespaces,
        "pre-resume" => Notify::PreResume,
        "post-resume" => Notify::PostResume,
        "orphan-pts-master" => Notify::OrphanPtsMaster {
            fd: fds
                .next()
                .ok_or(ParseError::MissingFd("orphan-pts-master"))?,
        },
        "status-ready" => Notify::StatusReady,
        "query-ext-files" => Notify::QueryExtFiles { external },
        other => Notify::Other(other.to_owned()),
    })
}

/// Receives CRIU's notifications during a request.
///
/// `Error` is anything that converts into a boxed error (`std::io::Error`,
/// `anyhow::Error`, your own `thiserror` type, `Box<dyn Error + Send + Sync>`).
#[async_trait]
pub trait NotifyHandler: Send {
    /// The handler's error.
    type Error: Into<BoxError> + Send;

    /// Called once per notification, in CRIU's order; CRIU waits for the return.
    async fn on_notify(&mut self, notify: Notify<'_>) -> Result<(), Self::Error>;
}

/// Acknowledges every notification and does nothing else.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoNotify;

#[async_trait]
impl NotifyHandler for NoNotify {
    type Error = Infallible;

    async fn on_notify(&mut self, _notify: Notify<'_>) -> Result<(), Infallible> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_scripts() {
        let mut ext = Vec::new();
        assert!(matches!(
            parse("post-restore", Some(7), vec![], &mut ext),
            Ok(Notify::PostRestore { pid: 7 })
        ));
        assert_eq!(
            parse("post-restore", None, vec![], &mut ext).map(|_| ()),
            Err(ParseError::MissingPid("post-restore"))
        );
        assert_eq!(
            parse("orphan-pts-master", None, vec![], &mut ext).map(|_| ()),
            Err(ParseError::MissingFd("orphan-pts-master"))
        );
        let n = parse("something-new", None, vec![], &mut ext).expect("parses");
        assert_eq!(n.script(), "something-new");
        for s in [
            "pre-stream",
            "pre-dump",
            "post-dump",
            "pre-restore",
            "network-lock",
            "network-unlock",
            "post-setup-namespaces",
            "pre-resume",
            "post-resume",
            "status-ready",
            "query-ext-files",
        ] {
            let n = parse(s, None, vec![], &mut ext).expect("parses");
            assert_eq!(n.script(), s);
            assert!(!matches!(n, Notify::Other(_)), "{s} is known");
        }
    }
}
