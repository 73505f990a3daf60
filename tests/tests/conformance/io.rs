//! Standard streams, exit codes, terminals.

use anyhow::Result;
use runc_architect_tests::diff::Observation;
use runc_architect_tests::differential::RunCtx;
use runc_architect_tests::pty::Step;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::util::{crlf, sh};
use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "stdout_stderr",
            run: stdout_stderr,
        },
        Scenario {
            name: "exit_codes",
            run: exit_codes,
        },
        Scenario {
            name: "args_quoting",
            run: args_quoting,
        },
        Scenario {
            name: "stdin_pipe",
            run: stdin_pipe,
        },
        Scenario {
            name: "large_stdout",
            run: large_stdout,
        },
        Scenario {
            name: "stderr_many_lines",
            run: stderr_many_lines,
        },
        Scenario {
            name: "terminal_run",
            run: terminal_run,
        },
        Scenario {
            name: "terminal_exec",
            run: terminal_exec,
        },
    ]
}

/// Separate stdout and stderr of an attached run.
fn stdout_stderr(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(
        &[],
        &sh("echo out1; echo err1 >&2; printf 'no newline'; echo err2 >&2"),
    )?;
    o.output("run", &out);
    Ok(o)
}

/// ctr's exit code is the container's: 0, 3, 255, and 130 for an init that exits so.
fn exit_codes(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    for code in ["0", "3", "255", "130"] {
        let id = ctx.extra_id(&format!("x{code}"));
        let out = ctx.run_id(&id, &[], &sh(&format!("exit {code}")), None)?;
        o.output(&format!("exit {code}"), &out);
    }
    let out = ctx.run(&[], &["false"])?;
    o.output("false", &out);
    Ok(o)
}

/// Arguments with spaces, quotes, globs and empty strings arrive unchanged.
fn args_quoting(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(
        &[],
        &[
            "sh",
            "-c",
            r#"echo "argc=$#"; for a in "$@"; do printf '[%s]\n' "$a"; done"#,
            "argv0",
            "a b",
            "it's",
            r#"say "hi""#,
            "",
            "$HOME",
            "*",
            "tab\there",
            "line\nbreak",
            "ünïcødé",
        ],
    )?;
    o.output("run", &out);
    Ok(o)
}

/// stdin of an attached `ctr run` reaches the container.
fn stdin_pipe(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    // ctr does not pass EOF of its stdin on to the container (the stock shim keeps the stdin
    // FIFO open): the container reads what it expects and exits.
    let input = b"line one\nline two\nno newline at end";
    let out = ctx.run_input(&[], &["head", "-c", &input.len().to_string()], input)?;
    o.output("head", &out);
    let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let id = ctx.extra_id("wc");
    let out = ctx.run_id(
        &id,
        &[],
        &sh("head -c 200000 | wc -c; echo done"),
        Some(&big),
    )?;
    o.output("wc", &out);
    Ok(o)
}

/// 1 MiB on stdout arrives complete.
fn large_stdout(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(
        &[],
        &sh("yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTU | head -c 1048576"),
    )?;
    o.put(
        "stdout",
        json!({
            "code": out.code,
            "len": out.stdout.len(),
            "sha256": hex::encode(Sha256::digest(&out.stdout)),
            "stderr": out.stderr_str(),
        }),
    );
    Ok(o)
}

/// Many lines on stderr, interleaved with a little stdout.
fn stderr_many_lines(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(
        &[],
        &sh("seq 1 20000 >&2; echo tail-out; echo tail-err >&2; exit 9"),
    )?;
    let err = out.stderr_str();
    o.put(
        "run",
        json!({
            "code": out.code,
            "stdout": out.stdout_str(),
            "stderr_lines": err.lines().count(),
            "stderr_len": out.stderr.len(),
            "stderr_sha256": hex::encode(Sha256::digest(&out.stderr)),
            "stderr_last": err.lines().last(),
        }),
    );
    Ok(o)
}

/// ctr sets the container's terminal size right after start: wait (bounded) until it shows,
/// then print it. A runtime that never passes the size on prints 0 0 or an error.
const WAIT_SIZE: &str =
    "i=0; while [ \"$(stty size 2>/dev/null)\" != \"30 100\" ] && [ $i -lt 500 ]; \
                         do sleep 0.01; i=$((i+1)); done; stty size";

/// The marker a terminal scenario prints before it waits for a line of input. Output that
/// comes right before a process exits may be cut short on a terminal (seen with the stock shim
/// and containerd 2.1), so scenarios compare the screen up to this marker, which the harness
/// has seen before it lets the process go on.
const READY: &str = "READY-FOR-INPUT";

/// The screen up to and including the marker line, CRLF normalized.
fn screen_until_ready(screen: &str) -> String {
    let s = crlf(screen);
    match s.find(READY) {
        Some(i) => s[..i + READY.len()].to_string(),
        None => s,
    }
}

/// `ctr run -t` on a terminal: the container's stdio is a tty of the terminal's size, input
/// typed at the terminal reaches it, and ctr exits with its status.
fn terminal_run(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let args = ctx.run_args(
        ctx.id(),
        &["--rm", "-t"],
        &sh(&format!(
            "tty; {WAIT_SIZE}; test -t 0 && echo stdin-is-tty; echo out; echo err >&2; \
             echo {READY}; read -r line; echo \"got:$line\"; exit 6"
        )),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ctx.ctr().run_pty(
        &args,
        &[Step {
            after: READY,
            send: b"bye\r",
        }],
    )?;
    o.put("code", json!(out.code));
    o.put("screen", screen_until_ready(&out.stdout_str()));
    Ok(o)
}

/// `ctr tasks exec -t` on a terminal into a container that has none, and an interactive shell
/// driven through it.
fn terminal_exec(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &[], &["sleep", "1000"])?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let script = format!(
        "tty; {WAIT_SIZE}; test -t 1 && echo stdout-is-tty; echo hello; echo {READY}; read -r l; exit 5"
    );
    let out = ctx.ctr().run_pty(
        &[
            "tasks",
            "exec",
            "-t",
            "--exec-id",
            "tty1",
            ctx.id(),
            "sh",
            "-c",
            &script,
        ],
        &[Step {
            after: READY,
            send: b"x\r",
        }],
    )?;
    o.put("exec code", json!(out.code));
    o.put("exec screen", screen_until_ready(&out.stdout_str()));
    // An interactive shell: type a command at the prompt, then exit with a status.
    let out = ctx.ctr().run_pty(
        &["tasks", "exec", "-t", "--exec-id", "tty2", ctx.id(), "sh"],
        &[
            Step {
                after: "# ",
                send: b"echo typed-$((6*7))\r",
            },
            Step {
                after: "typed-42",
                send: b"exit 3\r",
            },
        ],
    )?;
    o.put("shell code", json!(out.code));
    Ok(o)
}
