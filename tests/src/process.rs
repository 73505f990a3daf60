//! Running commands with captured output and a time limit.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a finished command printed and how it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// The command line, for messages.
    pub argv: Vec<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Terminating signal, when it was killed.
    pub signal: Option<i32>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The command line as a shell would show it.
    pub fn command_line(&self) -> String {
        shell_join(&self.argv)
    }

    /// `Ok(self)` when the command exited 0, else an error with the whole story.
    pub fn ok(self) -> Result<Output> {
        if self.success() {
            Ok(self)
        } else {
            bail!("command failed: {self}")
        }
    }

    /// `Ok(self)` when the command failed (exit code not 0), else an error.
    pub fn failed(self) -> Result<Output> {
        if self.success() {
            bail!("command succeeded but was expected to fail: {self}")
        } else {
            Ok(self)
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "`{}`", self.command_line())?;
        match (self.code, self.signal) {
            (Some(c), _) => writeln!(f, "  exit code: {c}")?,
            (None, Some(s)) => writeln!(f, "  killed by signal {s}")?,
            _ => writeln!(f, "  (no exit status)")?,
        }
        writeln!(f, "  stdout: {}", quote_block(&self.stdout))?;
        write!(f, "  stderr: {}", quote_block(&self.stderr))
    }
}

fn quote_block(b: &[u8]) -> String {
    const MAX: usize = 4000;
    let s = String::from_utf8_lossy(b);
    if s.is_empty() {
        return "(empty)".into();
    }
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{:?}... ({} bytes in all)", &s[..cut], s.len())
    } else {
        format!("{s:?}")
    }
}

/// Quotes words for display as a shell command line.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn argv_of(cmd: &Command) -> Vec<String> {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect()
}

/// Runs `cmd` to completion with `stdin` fed to it (or `/dev/null`), capturing stdout and
/// stderr. After `timeout` the command is killed and an error with what it printed so far is
/// returned.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let argv = argv_of(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", shell_join(&argv)))?;

    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || {
                // A command that exits without reading all of its input is not an error here.
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let out_rx = reader(child.stdout.take());
    let err_rx = reader(child.stderr.take());

    let start = Instant::now();
    let mut interval = Duration::from_millis(1);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(20));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    // A process the command left behind may still hold the pipes: do not wait for EOF forever.
    let grace = Duration::from_secs(5);
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    let out = Output {
        argv,
        stdout,
        stderr,
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
    };
    if status.is_none() {
        bail!("timed out after {timeout:?}: {out}");
    }
    Ok(out)
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// Runs a host command (with [`crate::paths::SYSTEM_PATH`] appended to `PATH`) and requires
/// success.
pub fn host(program: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args).env("PATH", host_path());
    run(cmd, None, Duration::from_secs(60))?.ok()
}

/// `PATH` for host commands: the caller's plus the system directories.
pub fn host_path() -> String {
    let cur = std::env::var("PATH").unwrap_or_default();
    if cur.is_empty() {
        crate::paths::SYSTEM_PATH.to_string()
    } else {
        format!("{cur}:{}", crate::paths::SYSTEM_PATH)
    }
}
