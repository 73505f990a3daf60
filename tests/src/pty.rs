//! Running a command on a pseudo terminal, as a user at a terminal would (`ctr run -t`).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::pty::{openpty, Winsize};

use crate::poll::try_wait_for;
use crate::process::{shell_join, Output};

/// Terminal size given to the command.
pub const COLS: u16 = 100;
pub const ROWS: u16 = 30;

/// One step of a terminal dialogue: once the screen shows `after` (at once if empty), type
/// `send`.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub after: &'a str,
    pub send: &'a [u8],
}

/// Runs `cmd` as the session leader of a new pseudo terminal that is its stdin, stdout,
/// stderr and controlling terminal, typing `steps` in order as the screen shows their markers.
/// Returns everything the terminal showed as `stdout` (`stderr` stays empty).
pub fn run_on_pty(mut cmd: Command, steps: &[Step], timeout: Duration) -> Result<Output> {
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
    let screen = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel::<()>();
    let sc = screen.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match master_file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => sc
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EIO: no slave left
            }
        }
        let _ = tx.send(());
    });
    let shown = |screen: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&screen.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    };

    let mut next = 0;
    let status = try_wait_for(&format!("`{}` to exit", shell_join(&argv)), timeout, || {
        while let Some(step) = steps.get(next) {
            if step.after.is_empty() || shown(&screen).contains(step.after) {
                writer.write_all(step.send).context("write to the pty")?;
                next += 1;
            } else {
                break;
            }
        }
        Ok(child.try_wait()?)
    });
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{e}; the terminal showed {:?}", shown(&screen));
        }
    };
    drop(writer);
    let _ = rx.recv_timeout(Duration::from_secs(5));
    if next < steps.len() {
        bail!(
            "`{}` exited before the terminal showed {:?}; it showed {:?}",
            shell_join(&argv),
            steps[next].after,
            shown(&screen)
        );
    }
    let stdout = screen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Output {
        argv,
        stdout,
        stderr: Vec::new(),
        code: status.code(),
        signal: status.signal(),
    })
}
