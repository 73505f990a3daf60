//! `ctr`, the client that ships with each containerd version, bound to a private daemon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::poll::try_wait_for;
use crate::process::{self, Output};

/// Default time limit of one ctr command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs the version's `ctr` with `-a SOCKET -n NAMESPACE`.
///
/// Commands that create FIFOs (`run`, `tasks start`, `tasks exec`) get `--fifo-dir` pointing
/// into the daemon's directory, so nothing is written to ctr's default /run/containerd/fifo.
#[derive(Clone, Debug)]
pub struct Ctr {
    bin: PathBuf,
    address: PathBuf,
    namespace: String,
    fifo_dir: PathBuf,
    timeout: Duration,
}

/// One row of `ctr tasks ls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRow {
    pub id: String,
    pub pid: u32,
    pub status: String,
}

impl Ctr {
    pub fn new(bin: PathBuf, address: PathBuf, namespace: String, fifo_dir: PathBuf) -> Ctr {
        Ctr {
            bin,
            address,
            namespace,
            fifo_dir,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same ctr with another time limit per command.
    pub fn with_timeout(mut self, timeout: Duration) -> Ctr {
        self.timeout = timeout;
        self
    }

    /// The same ctr in another namespace.
    pub fn in_namespace(&self, namespace: &str) -> Ctr {
        let mut c = self.clone();
        c.namespace = namespace.to_string();
        c
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn address(&self) -> &Path {
        &self.address
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The argument list after the global flags, with `--fifo-dir` added where ctr takes it.
    fn full_args(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "-a".into(),
            self.address.display().to_string(),
            "-n".into(),
            self.namespace.clone(),
        ];
        let split = match args {
            ["run", ..] => Some(1),
            ["t" | "task" | "tasks", "start" | "exec", ..] => Some(2),
            _ => None,
        };
        match split {
            Some(n) => {
                v.extend(args[..n].iter().map(|s| s.to_string()));
                v.push("--fifo-dir".into());
                v.push(self.fifo_dir.display().to_string());
                v.extend(args[n..].iter().map(|s| s.to_string()));
            }
            None => v.extend(args.iter().map(|s| s.to_string())),
        }
        v
    }

    /// A `Command` for `ctr <global flags> args...` with a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.full_args(args))
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .env_remove("CONTAINERD_RUNTIME")
            .env("PATH", process::host_path());
        cmd
    }

    /// Runs ctr, whatever its exit code.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        process::run(self.command(args), None, self.timeout)
    }

    /// Runs ctr with `input` on its stdin.
    pub fn run_input(&self, args: &[&str], input: &[u8]) -> Result<Output> {
        process::run(self.command(args), Some(input), self.timeout)
    }

    /// Runs ctr and requires exit code 0.
    pub fn ok(&self, args: &[&str]) -> Result<Output> {
        self.run(args)?.ok()
    }

    /// Runs ctr on a new pseudo terminal (its stdin, stdout and stderr), typing `steps` as
    /// the screen shows their markers. The output is everything the terminal showed.
    pub fn run_pty(&self, args: &[&str], steps: &[crate::pty::Step]) -> Result<Output> {
        crate::pty::run_on_pty(self.command(args), steps, self.timeout)
    }

    /// Starts ctr in the background (stdout/stderr captured by [`BackgroundCtr::wait`]).
    pub fn spawn(&self, args: &[&str]) -> Result<BackgroundCtr> {
        let mut cmd = self.command(args);
        let argv: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let out_file = tempfile_in(&self.fifo_dir, "out")?;
        let err_file = tempfile_in(&self.fifo_dir, "err")?;
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_file)?)
            .stderr(std::fs::File::create(&err_file)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("start `{}`", process::shell_join(&argv)))?;
        Ok(BackgroundCtr {
            child: Some(child),
            argv,
            out_file,
            err_file,
        })
    }

    /// Parsed `ctr tasks ls`.
    pub fn tasks(&self) -> Result<Vec<TaskRow>> {
        let out = self.ok(&["tasks", "ls"])?;
        parse_task_ls(&out.stdout_str())
    }

    /// The status column of task `id` in `ctr tasks ls`, if listed.
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .tasks()?
            .into_iter()
            .find(|t| t.id == id)
            .map(|t| t.status))
    }

    /// The pid column of task `id` in `ctr tasks ls`.
    pub fn task_pid(&self, id: &str) -> Result<u32> {
        self.tasks()?
            .into_iter()
            .find(|t| t.id == id)
            .map(|t| t.pid)
            .with_context(|| format!("task {id} is not listed by ctr tasks ls"))
    }

    /// The pids of task `id`'s processes (`ctr tasks ps`).
    pub fn task_pids(&self, id: &str) -> Result<Vec<u32>> {
        let out = self.ok(&["tasks", "ps", id])?;
        Ok(out
            .stdout_str()
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect())
    }

    /// Waits until task `id` runs its init alone (e.g. a server's child for a connection
    /// has gone: CRIU refuses to dump a connected socket without `tcp_established`).
    pub fn wait_alone(&self, id: &str, timeout: Duration) -> Result<()> {
        try_wait_for(&format!("task {id} to run its init alone"), timeout, || {
            Ok((self.task_pids(id)?.len() == 1).then_some(()))
        })
    }

    /// Polls `ctr tasks ls` until task `id` shows `status`.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Result<()> {
        let mut last = None;
        let r = try_wait_for(&format!("task {id} to be {status}"), timeout, || {
            let s = self.task_status(id)?;
            let done = s.as_deref() == Some(status);
            last = s;
            Ok(done.then_some(()))
        });
        r.with_context(|| format!("last status seen: {last:?}"))
    }

    /// Container ids (`ctr containers ls -q`).
    pub fn containers(&self) -> Result<Vec<String>> {
        let out = self.ok(&["containers", "ls", "-q"])?;
        Ok(out
            .stdout_str()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Imports an OCI image layout tarball.
    pub fn import(&self, tarball: &Path) -> Result<Output> {
        self.ok(&["images", "import", &tarball.display().to_string()])
    }

    /// Image names (`ctr images ls -q`).
    pub fn images(&self) -> Result<Vec<String>> {
        let out = self.ok(&["images", "ls", "-q"])?;
        Ok(out
            .stdout_str()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Kills and deletes every task and container in the namespace (best effort).
    pub fn remove_all(&self) {
        if let Ok(tasks) = self.tasks() {
            for t in tasks {
                let _ = self.run(&["tasks", "rm", "-f", &t.id]);
            }
        }
        if let Ok(cs) = self.containers() {
            for c in cs {
                let _ = self.run(&["containers", "rm", &c]);
            }
        }
    }

    /// Removes task (forced) and container `id`, ignoring "not found".
    pub fn remove(&self, id: &str) {
        let _ = self.run(&["tasks", "rm", "-f", id]);
        let _ = self.run(&["containers", "rm", id]);
    }
}

/// Parses `ctr tasks ls` (`TASK PID STATUS` columns).
pub fn parse_task_ls(s: &str) -> Result<Vec<TaskRow>> {
    let mut rows = Vec::new();
    for (i, line) in s.lines().enumerate() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.is_empty() {
            continue;
        }
        if i == 0 && cols[0] == "TASK" {
            continue;
        }
        if cols.len() != 3 {
            bail!("unexpected `ctr tasks ls` line {line:?}");
        }
        rows.push(TaskRow {
            id: cols[0].to_string(),
            pid: cols[1]
                .parse()
                .with_context(|| format!("pid in `ctr tasks ls` line {line:?}"))?,
            status: cols[2].to_string(),
        });
    }
    Ok(rows)
}

fn tempfile_in(dir: &Path, what: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    Ok(dir.join(format!(
        "bg-{}-{}.{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )))
}

/// A ctr running in the background (e.g. an attached `ctr run` or `ctr tasks start`).
pub struct BackgroundCtr {
    child: Option<Child>,
    argv: Vec<String>,
    out_file: PathBuf,
    err_file: PathBuf,
}

impl BackgroundCtr {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True once ctr has exited.
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Waits (bounded) for ctr to exit and returns what it printed.
    pub fn wait(mut self, timeout: Duration) -> Result<Output> {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().context("already waited")?;
        let status = try_wait_for(
            &format!("`{}` to exit", process::shell_join(&self.argv)),
            timeout,
            || Ok(child.try_wait()?),
        );
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let out = self.collect();
                bail!("{e}: {out}");
            }
        };
        Ok(Output {
            code: status.code(),
            signal: status.signal(),
            ..self.collect()
        })
    }

    fn collect(&self) -> Output {
        Output {
            argv: self.argv.clone(),
            stdout: std::fs::read(&self.out_file).unwrap_or_default(),
            stderr: std::fs::read(&self.err_file).unwrap_or_default(),
            code: None,
            signal: None,
        }
    }
}

impl Drop for BackgroundCtr {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.out_file);
        let _ = std::fs::remove_file(&self.err_file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_task_ls() {
        let rows = parse_task_ls(
            "TASK    PID     STATUS    \na       123     RUNNING\nb       0       STOPPED\n",
        )
        .expect("parsed");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "a");
        assert_eq!(rows[0].pid, 123);
        assert_eq!(rows[1].status, "STOPPED");
    }

    #[test]
    fn fifo_dir_goes_where_ctr_takes_it() {
        let c = Ctr::new("ctr".into(), "/s".into(), "ns".into(), "/f".into());
        assert_eq!(
            c.full_args(&["run", "--rm", "img", "id"]),
            [
                "-a",
                "/s",
                "-n",
                "ns",
                "run",
                "--fifo-dir",
                "/f",
                "--rm",
                "img",
                "id"
            ]
        );
        assert_eq!(
            c.full_args(&["tasks", "exec", "--exec-id", "e", "id", "true"])[4..7],
            ["tasks", "exec", "--fifo-dir"]
        );
        assert_eq!(
            c.full_args(&["tasks", "ls"]),
            ["-a", "/s", "-n", "ns", "tasks", "ls"]
        );
    }
}
