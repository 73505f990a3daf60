//! The exchange against a scripted fake CRIU on the other end of a socketpair.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recv, MsgFlags};
use prost::Message;

use super::*;
use crate::notify::Notify;
use crate::proto::{CriuNotify, CriuRestoreResp};
use crate::transport::send_with_fds;

/// One step of the fake CRIU.
enum Step {
    /// Send a NOTIFY (with optional fd) and expect an ack with this verdict.
    Notify {
        script: &'static str,
        pid: Option<i32>,
        fd: Option<OwnedFd>,
        expect_ok: bool,
    },
    /// Send the final answer.
    Answer(CriuResp),
}

fn recv_req(fd: RawFd) -> CriuReq {
    let mut buf = vec![0u8; 4096];
    let n = recv(fd, &mut buf, MsgFlags::empty()).expect("fake criu recv");
    CriuReq::decode(&buf[..n]).expect("decode request")
}

/// Runs the fake CRIU on a thread; returns what it saw (request types and acks).
fn fake_criu(fd: OwnedFd, steps: Vec<Step>) -> std::thread::JoinHandle<Vec<CriuReq>> {
    std::thread::spawn(move || {
        let raw = fd.as_raw_fd();
        let mut seen = vec![recv_req(raw)];
        for step in steps {
            match step {
                Step::Notify {
                    script,
                    pid,
                    fd: extra,
                    expect_ok,
                } => {
                    let msg = CriuResp {
                        r#type: CriuReqType::Notify as i32,
                        success: true,
                        notify: Some(CriuNotify {
                            script: Some(script.into()),
                            pid,
                        }),
                        ..Default::default()
                    };
                    let fds: Vec<RawFd> = extra.iter().map(|f| f.as_raw_fd()).collect();
                    send_with_fds(raw, &msg.encode_to_vec(), &fds).expect("send notify");
                    drop(extra);
                    let ack = recv_req(raw);
                    assert_eq!(ack.r#type(), CriuReqType::Notify);
                    assert_eq!(ack.notify_success, Some(expect_ok), "ack for {script}");
                    seen.push(ack);
                }
                Step::Answer(resp) => {
                    send_with_fds(raw, &resp.encode_to_vec(), &[]).expect("send answer");
                }
            }
        }
        drop(fd);
        seen
    })
}

fn session_pair() -> (Session, OwnedFd) {
    let (ours, theirs) = crate::transport::pair().expect("pair");
    (
        Session::new(ours, None, "test", Duration::from_secs(1)),
        theirs,
    )
}

fn restore_req() -> CriuReq {
    CriuReq {
        r#type: CriuReqType::Restore as i32,
        opts: Some(CriuOpts {
            notify_scripts: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Records notifications; reads one byte from a received pts-master stand-in.
#[derive(Default)]
struct Recorder {
    seen: Vec<String>,
    restored_pid: Option<i32>,
    fd_payload: Option<String>,
    fail_on: Option<&'static str>,
}

#[async_trait::async_trait]
impl NotifyHandler for Recorder {
    type Error = std::io::Error;

    async fn on_notify(&mut self, n: Notify<'_>) -> Result<(), std::io::Error> {
        self.seen.push(n.script().to_owned());
        if Some(n.script()) == self.fail_on {
            return Err(std::io::Error::other("handler says no"));
        }
        match n {
            Notify::PostRestore { pid } => self.restored_pid = Some(pid),
            Notify::OrphanPtsMaster { fd } => {
                let mut s = String::new();
                std::fs::File::from(fd).read_to_string(&mut s)?;
                self.fd_payload = Some(s);
            }
            Notify::QueryExtFiles { external } => external.push("file[1:2]".into()),
            _ => {}
        }
        Ok(())
    }
}

#[tokio::test]
async fn notifications_are_acked_in_order_with_state_and_fds() {
    let (mut session, theirs) = session_pair();
    let (r, w) = nix::unistd::pipe().expect("pipe");
    nix::unistd::write(&w, b"pts").expect("write");
    drop(w);
    let peer = fake_criu(
        theirs,
        vec![
            Step::Notify {
                script: "setup-namespaces",
                pid: Some(77),
                fd: None,
                expect_ok: true,
            },
            Step::Notify {
                script: "orphan-pts-master",
                pid: None,
                fd: Some(r),
                expect_ok: true,
            },
            Step::Notify {
                script: "query-ext-files",
                pid: None,
                fd: None,
                expect_ok: true,
            },
            Step::Notify {
                script: "post-restore",
                pid: Some(77),
                fd: None,
                expect_ok: true,
            },
            Step::Answer(CriuResp {
                r#type: CriuReqType::Restore as i32,
                success: true,
                restore: Some(CriuRestoreResp { pid: 77 }),
                ..Default::default()
            }),
        ],
    );
    let mut h = Recorder::default();
    let resp = session
        .run(restore_req(), None, &mut h)
        .await
        .expect("restore");
    assert_eq!(resp.restore.map(|r| r.pid), Some(77));
    assert_eq!(
        h.seen,
        vec![
            "setup-namespaces",
            "orphan-pts-master",
            "query-ext-files",
            "post-restore"
        ]
    );
    assert_eq!(h.restored_pid, Some(77));
    assert_eq!(h.fd_payload.as_deref(), Some("pts"));
    let seen = peer.join().expect("fake criu");
    assert_eq!(seen[0].r#type(), CriuReqType::Restore);
    // The query-ext-files ack carries the handler's external keys.
    let ext_ack = &seen[3];
    assert_eq!(
        ext_ack.opts.as_ref().map(|o| o.external.clone()),
        Some(vec!["file[1:2]".to_string()])
    );
}

#[tokio::test]
async fn handler_error_nacks_and_surfaces_with_criu_failure() {
    let (mut session, theirs) = session_pair();
    let peer = fake_criu(
        theirs,
        vec![
            Step::Notify {
                script: "pre-dump",
                pid: None,
                fd: None,
                expect_ok: true,
            },
            Step::Notify {
                script: "post-dump",
                pid: None,
                fd: None,
                expect_ok: false,
            },
            Step::Answer(CriuResp {
                r#type: CriuReqType::Dump as i32,
                success: false,
                cr_errno: Some(0),
                cr_errmsg: Some("One of more action scripts failed".into()),
                ..Default::default()
            }),
        ],
    );
    let mut h = Recorder {
        fail_on: Some("post-dump"),
        ..Default::default()
    };
    let req = CriuReq {
        r#type: CriuReqType::Dump as i32,
        ..Default::default()
    };
    let err = session
        .run(req, None, &mut h)
        .await
        .expect_err("handler failed");
    match &err {
        Error::Notify {
            script,
            source,
            criu,
            request,
        } => {
            assert_eq!(script, "post-dump");
            assert_eq!(*request, CriuReqType::Dump);
            assert!(source.to_string().contains("handler says no"));
            let criu = criu.as_ref().expect("CRIU's answer attached");
            assert_eq!(criu.errno, None, "errno 0 means none");
            assert_eq!(
                criu.message.as_deref(),
                Some("One of more action scripts failed")
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(
        err.criu_message(),
        Some("One of more action scripts failed")
    );
    peer.join().expect("fake criu");
}

#[tokio::test]
async fn failure_answer_carries_errno_message_and_log_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
    lines.push("(00.052504) Error (criu/cr-dump.c:1975): Dumping FAILED.".into());
    std::fs::write(dir.path().join("dump.log"), lines.join("\n") + "\n").expect("write log");
    let prepared = crate::CriuOptions::new()
        .images_dir(dir.path())
        .log_file("dump.log")
        .prepare(CriuReqType::Dump, None)
        .expect("prepare");

    let (mut session, theirs) = session_pair();
    let peer = fake_criu(
        theirs,
        vec![Step::Answer(CriuResp {
            r#type: CriuReqType::Dump as i32,
            success: false,
            cr_errno: Some(3),
            cr_errmsg: Some("No process with such pid".into()),
            ..Default::default()
        })],
    );
    let req = CriuReq {
        r#type: CriuReqType::Dump as i32,
        opts: Some(prepared.opts.clone()),
        ..Default::default()
    };
    let err = session
        .run(req, prepared.log.as_ref(), &mut notify::NoNotify)
        .await
        .expect_err("dump fails");
    assert_eq!(err.criu_errno(), Some(3));
    assert_eq!(err.criu_message(), Some("No process with such pid"));
    let tail = err.log_tail().expect("log tail");
    assert_eq!(tail.lines.len(), LOG_TAIL_LINES);
    assert_eq!(tail.lines[LOG_TAIL_LINES - 2], "line 49");
    assert_eq!(
        err.criu_failure().and_then(|f| f.last_log_error()),
        Some("Error (criu/cr-dump.c:1975): Dumping FAILED.")
    );
    assert_eq!(tail.path, dir.path().join("dump.log"));
    let shown = err.to_string();
    assert!(shown.contains("DUMP") && shown.contains("ESRCH"), "{shown}");
    assert!(
        shown.contains("last logged error: Error (criu/cr-dump.c"),
        "{shown}"
    );
    peer.join().expect("fake criu");
}

#[tokio::test]
async fn hang_up_is_session_closed() {
    let (mut session, theirs) = session_pair();
    let peer = fake_criu(theirs, vec![]);
    let err = session
        .run(
            CriuReq {
                r#type: CriuReqType::Check as i32,
                ..Default::default()
            },
            None,
            &mut notify::NoNotify,
        )
        .await
        .expect_err("closed");
    assert!(matches!(err, Error::SessionClosed { .. }), "{err}");
    peer.join().expect("fake criu");
}

#[tokio::test]
async fn wrong_answer_type_is_a_protocol_error() {
    let (mut session, theirs) = session_pair();
    let peer = fake_criu(
        theirs,
        vec![Step::Answer(CriuResp {
            r#type: CriuReqType::Dump as i32,
            success: true,
            ..Default::default()
        })],
    );
    let err = session
        .run(
            CriuReq {
                r#type: CriuReqType::Version as i32,
                ..Default::default()
            },
            None,
            &mut notify::NoNotify,
        )
        .await
        .expect_err("protocol");
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    peer.join().expect("fake criu");
}
