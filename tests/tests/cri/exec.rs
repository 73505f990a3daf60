//! Exec and attach as the kubelet and kubectl use them: `ExecSync` (exec probes), streaming
//! `Exec` and `Attach` through containerd's streaming server (SPDY, as kubectl's requests
//! reach it), with stdin, half-close, a terminal and resizes.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use runc_architect_tests::cri::api::ContainerState;
use runc_architect_tests::cri::stream::remotecommand::Output;
use runc_architect_tests::cri::stream::{ExecOptions, SessionOptions, TerminalSize};
use runc_architect_tests::diff::Observation;
use serde_json::json;

use crate::run::{secs, state_name, Run};
use crate::Scenario;

const STREAM: Duration = Duration::from_secs(30);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "exec_sync_output",
            as_runc: true,
            run: exec_sync_output,
        },
        Scenario {
            name: "exec_sync_timeout",
            as_runc: true,
            run: exec_sync_timeout,
        },
        Scenario {
            name: "exec_sync_large_output",
            as_runc: false,
            run: exec_sync_large_output,
        },
        Scenario {
            name: "exec_sync_failures",
            as_runc: false,
            run: exec_sync_failures,
        },
        Scenario {
            name: "exec_stream_stdin",
            as_runc: true,
            run: exec_stream_stdin,
        },
        Scenario {
            name: "exec_stream_tty_resize",
            as_runc: false,
            run: exec_stream_tty_resize,
        },
        Scenario {
            name: "attach_terminal",
            as_runc: false,
            run: attach_terminal,
        },
        Scenario {
            name: "attach_stdin_once",
            as_runc: false,
            run: attach_stdin_once,
        },
        Scenario {
            name: "stuck_exec_stdin_spares_the_pod",
            as_runc: false,
            run: stuck_exec_stdin_spares_the_pod,
        },
    ]
}

fn running(r: &mut Run, script: &str) -> Result<String> {
    let (_, id) = r.pod_with(script)?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    Ok(id)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// ExecSync as an exec probe: stdout, stderr and exit code, also for several in a row.
fn exec_sync_output(r: &mut Run) -> Result<Observation> {
    let id = running(r, "sleep 1000")?;
    let mut o = Observation::new();
    for (i, cmd) in [
        &["sh", "-c", "echo out; echo err >&2; exit 3"][..],
        &["sh", "-c", "printf 'no newline'"][..],
        &["true"][..],
        &["sh", "-c", "exit 255"][..],
    ]
    .iter()
    .enumerate()
    {
        let x = r.exec(&id, cmd)?;
        o.put(
            &format!("exec{i}"),
            json!({"stdout": text(&x.stdout), "stderr": text(&x.stderr), "exit_code": x.exit_code}),
        );
    }
    Ok(o)
}

/// ExecSync with a 1 s timeout on a command that runs longer: the kubelet's probe timeout.
fn exec_sync_timeout(r: &mut Run) -> Result<Observation> {
    let id = running(r, "sleep 1000")?;
    let t = Instant::now();
    let res = r
        .kubelet
        .exec_sync(&id, &["sleep", "30"], Duration::from_secs(1));
    let took = t.elapsed();
    let mut o = Observation::new();
    o.put("seconds", secs(took));
    match res {
        Ok(x) => o.put("result", json!({"exit_code": x.exit_code, "stdout": text(&x.stdout)})),
        Err(e) => o.put("error", json!({"code": format!("{:?}", e.code()), "timeout": e.to_string().contains("timeout")})),
    };
    // The container is not disturbed, and the next probe works.
    o.put("after", r.exec_ok(&id, &["echo", "still-here"])?);
    o.put("status", r.status_brief(&id)?);
    Ok(o)
}

/// 1 MiB of output through ExecSync, byte for byte.
fn exec_sync_large_output(r: &mut Run) -> Result<Observation> {
    let id = running(r, "sleep 1000")?;
    let x = r.exec(
        &id,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 16384 ]; do printf '%063d\\n' $i; i=$((i+1)); done",
        ],
    )?;
    let mut o = Observation::new();
    o.put("bytes", x.stdout.len());
    o.put("exit_code", x.exit_code);
    let expect: Vec<u8> = (0..16384)
        .flat_map(|i| format!("{i:063}\n").into_bytes())
        .collect();
    o.put("exact", x.stdout == expect);
    Ok(o)
}

/// ExecSync of a missing binary, in an exited container, in an unknown container.
fn exec_sync_failures(r: &mut Run) -> Result<Observation> {
    let id = running(r, "sleep 1000")?;
    let mut o = Observation::new();
    let describe = |res: Result<
        runc_architect_tests::cri::api::ExecSyncResponse,
        runc_architect_tests::cri::KubeletError,
    >| match res {
        Ok(x) => json!({"exit_code": x.exit_code, "stdout": text(&x.stdout)}),
        Err(e) => json!({"code": format!("{:?}", e.code())}),
    };
    o.put(
        "missing_binary",
        describe(
            r.kubelet
                .exec_sync(&id, &["/no/such/binary"], Duration::from_secs(10)),
        ),
    );
    let (_, done) = r.pod_with("exit 0")?;
    r.wait_exited(&done)?;
    o.put(
        "exited_container",
        describe(
            r.kubelet
                .exec_sync(&done, &["true"], Duration::from_secs(10)),
        ),
    );
    o.put(
        "unknown_container",
        describe(
            r.kubelet
                .exec_sync(&"f".repeat(64), &["true"], Duration::from_secs(10)),
        ),
    );
    Ok(o)
}

/// `kubectl exec -i ... -- cat` with input and end of input; then `-- sh -c 'exit 7'`.
fn exec_stream_stdin(r: &mut Run) -> Result<Observation> {
    let id = running(r, "sleep 1000")?;
    let mut o = Observation::new();
    let input: Vec<u8> = (0..2000)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    let res = r
        .kubelet
        .exec(
            &id,
            &["sh", "-c", "cat; echo done >&2"],
            ExecOptions {
                stdin: Some(input.clone()),
                timeout: STREAM,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow!("Exec cat: {e}"))?;
    o.put("echoed_exactly", res.stdout == input);
    o.put("stderr", text(&res.stderr));
    o.put("exit_code", res.exit_code);
    let res = r
        .kubelet
        .exec(
            &id,
            &["sh", "-c", "echo bye; exit 7"],
            ExecOptions {
                timeout: STREAM,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow!("Exec exit 7: {e}"))?;
    o.put(
        "nonzero",
        json!({"stdout": text(&res.stdout), "exit_code": res.exit_code}),
    );
    Ok(o)
}

/// `kubectl exec -it ... -- sh` with window resizes.
fn exec_stream_tty_resize(r: &mut Run) -> Result<Observation> {
    let id = running(r, "sleep 1000")?;
    let mut s = r
        .kubelet
        .exec_session(
            &id,
            &["sh"],
            SessionOptions {
                stdin: true,
                tty: true,
                stderr: false,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow!("Exec -it: {e}"))?;
    let mut o = Observation::new();
    let mut sizes = Vec::new();
    for (w, h) in [(123u16, 45u16), (80, 24)] {
        s.resize(
            TerminalSize {
                width: w,
                height: h,
            },
            STREAM,
        )
        .map_err(|e| anyhow!("resize: {e}"))?;
        let want = format!("{h} {w}");
        let deadline = Instant::now() + STREAM;
        let mut seen = false;
        // The server applies a resize asynchronously: ask again until it shows.
        while Instant::now() < deadline && !seen {
            s.write_stdin(b"stty size\n", STREAM)
                .map_err(|e| anyhow!("stdin: {e}"))?;
            seen = s
                .read_until(Output::Stdout, want.as_bytes(), Duration::from_millis(500))
                .is_ok();
        }
        sizes.push(json!({"size": want, "seen": seen}));
        let _ = s.take_output();
    }
    o.put("sizes", sizes);
    s.write_stdin(b"echo tty=$(tty | cut -c1-8); exit 5\n", STREAM)
        .map_err(|e| anyhow!("stdin: {e}"))?;
    let res = s.wait(STREAM).map_err(|e| anyhow!("wait: {e}"))?;
    o.put("tty", text(&res.stdout).contains("tty=/dev/pts"));
    o.put("exit_code", res.exit_code);
    Ok(o)
}

/// `kubectl attach -it` to a container started with stdin and a terminal: commands go in,
/// output comes out, and `exit` ends the container.
fn attach_terminal(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let mut spec = r.sh("shell", "exec sh");
    spec.stdin = true;
    spec.tty = true;
    let id = r.start(pod, spec)?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    let mut s = r
        .kubelet
        .attach_session(
            &id,
            SessionOptions {
                stdin: true,
                tty: true,
                stderr: false,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow!("Attach: {e}"))?;
    s.write_stdin(b"echo attached-$((6*7))\n", STREAM)
        .map_err(|e| anyhow!("stdin: {e}"))?;
    let mut o = Observation::new();
    o.put(
        "answered",
        s.read_until(Output::Stdout, b"attached-42", STREAM).is_ok(),
    );
    s.write_stdin(b"exit 3\n", STREAM)
        .map_err(|e| anyhow!("stdin: {e}"))?;
    let res = s.wait(STREAM).map_err(|e| anyhow!("wait: {e}"))?;
    o.put("attach_exit_code", res.exit_code);
    let st = r.wait_exited(&id)?;
    o.put(
        "container",
        json!({"state": state_name(st.state), "exit_code": st.exit_code, "reason": st.reason}),
    );
    Ok(o)
}

/// `kubectl run -i --rm` style: a container with `stdin_once`; attach, send input, close it:
/// the container reads to end of input and exits.
fn attach_stdin_once(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let mut spec = r.sh("reader", "cat; echo eof-seen");
    spec.stdin = true;
    spec.stdin_once = true;
    let id = r.start(pod, spec)?;
    r.wait_state(&id, ContainerState::ContainerRunning)?;
    let res = r
        .kubelet
        .attach(
            &id,
            ExecOptions {
                stdin: Some(b"from-attach\n".to_vec()),
                timeout: STREAM,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow!("Attach: {e}"))?;
    let mut o = Observation::new();
    o.put("stdout", text(&res.stdout));
    let st = r.wait_exited(&id)?;
    o.put(
        "container",
        json!({"state": state_name(st.state), "exit_code": st.exit_code}),
    );
    o.put("log", crate::lifecycle::log_text(r, pod, "reader")?);
    Ok(o)
}

/// `kubectl cp` into a pod streams a tar through an exec's stdin. An exec whose process
/// does not read its stdin, fed more than the pipes hold, must not stall the pod's shim:
/// the other container's exec probes keep answering, and the stuck exec ends when killed.
fn stuck_exec_stdin_spares_the_pod(r: &mut Run) -> Result<Observation> {
    let pod = r.pod(|_| {})?;
    let a = r.sh("target", "sleep 1000");
    let b = r.sh("sibling", "sleep 1000");
    let (ida, idb) = (r.start(pod, a)?, r.start(pod, b)?);
    r.wait_state(&ida, ContainerState::ContainerRunning)?;
    r.wait_state(&idb, ContainerState::ContainerRunning)?;
    let s = r
        .kubelet
        .exec_session(
            &ida,
            &["sh", "-c", "echo $$ > /tmp/deaf.pid; exec sleep 1000"],
            SessionOptions {
                stdin: true,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow!("Exec -i: {e}"))?;
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    // Far more than a pipe and a FIFO hold; writes stop being accepted at some point.
    for _ in 0..8 {
        if s.write_stdin(&chunk, Duration::from_millis(500)).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let mut o = Observation::new();
    o.put("sent_more_than_a_pipe", sent > 64 * 1024);
    let mut probes = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let ok = r
            .exec(&idb, &["echo", "probe"])
            .map(|x| x.exit_code == 0)
            .unwrap_or(false);
        probes.push(json!({"ok": ok, "within_2s": t.elapsed() < Duration::from_secs(2)}));
    }
    o.put("sibling_probes", probes);
    let t = Instant::now();
    let st = r.status(&ida);
    o.put(
        "status_within_2s",
        st.is_ok() && t.elapsed() < Duration::from_secs(2),
    );
    // containerd's CRI goes on pushing into the stdin FIFO of the killed process and its
    // session does not end (the same under the stock shim): kubectl gives up, the pod
    // stays healthy, and its deletion ends it all.
    r.exec_ok(&ida, &["sh", "-c", "kill -9 $(cat /tmp/deaf.pid)"])?;
    drop(s);
    o.put("after", r.exec_ok(&ida, &["echo", "fine"])?);
    Ok(o)
}
