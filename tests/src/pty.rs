//! Running a command on a pseudo terminal, as a user at a terminal would (`ctr run -t`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::pty::{openpty, Winsize};

use crate::poll::try_wait_for;
use crate::process::{shell_join, Output};

/// Terminal size given to the command.
pub const COLS: u16 = 100;
pub const ROWS: u16 = 30;

/// Runs `cmd` as the session leader of a new pseudo terminal that is its stdin, stdout,
/// stderr and controlling terminal. `input`, if any, is written to the terminal after start.
/// Returns everything the terminal showed as `stdout` (`stderr` stays empty).
pub fn run_on_pty(mut cmd: Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let argv: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let ws = Winsize {
        ws_row: ROWS,
        ws_col: COLS,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&ws), None).context("openpty")?;
    let master: OwnedFd = pty.master;
    let slave: OwnedFd = pty.slave;
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start `{}` on a pty", shell_join(&argv)))?;
    // Only the child may hold the terminal's slave side now, so reading the master ends (EIO)
    // when the child and whatever it started have closed it.
    drop(cmd);
    drop(slave);

    let mut master_file = std::fs::File::from(master);
    let mut writer = master_file.try_clone()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match master_file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EIO: no slave left
            }
        }
        let _ = tx.send(buf);
    });
    if let Some(data) = input {
        writer.write_all(data).context("write to the pty")?;
    }

    let status = try_wait_for(&format!("`{}` to exit", shell_join(&argv)), timeout, || {
        Ok(child.try_wait()?)
    });
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            drop(writer);
            let shown = rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
            bail!(
                "{e}; the terminal showed {:?}",
                String::from_utf8_lossy(&shown)
            );
        }
    };
    let _ = writer.as_raw_fd();
    drop(writer);
    let stdout = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    Ok(Output {
        argv,
        stdout,
        stderr: Vec::new(),
        code: status.code(),
        signal: status.signal(),
    })
}
