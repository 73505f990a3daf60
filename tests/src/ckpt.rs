//! Pieces for the checkpoint/restore tests and benchmarks: the `ckload` workload (a small
//! static C program, built here with the host's gcc), an image with it, named network
//! namespaces wired to the host by a veth pair, TCP probes, and ways to find (and kill)
//! the CRIU a shim is running.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::ImageBuilder;
use crate::process;

/// Source of the workload program.
pub const CKLOAD_SOURCE: &str = include_str!("../workloads/ckload.c");
/// Where the workload lives in the test image.
pub const CKLOAD_IN_IMAGE: &str = "bin/ckload";
/// Name of the checkpoint test image.
pub const CKPT_IMAGE: &str = "runc-architect-test/ckpt:latest";

/// Compiles `ckload` statically into `dir` and returns the binary.
pub fn build_ckload(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let src = dir.join("ckload.c");
    let bin = dir.join("ckload");
    std::fs::write(&src, CKLOAD_SOURCE)?;
    let mut cmd = Command::new("gcc");
    cmd.args(["-static", "-O2", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src);
    process::run(cmd, None, Duration::from_secs(60))
        .context("run gcc (the checkpoint workloads are built with the host's gcc -static)")?
        .ok()
        .context("compile the ckload workload")?;
    Ok(bin)
}

/// The busybox test image plus `/bin/ckload`.
pub fn ckpt_image(scratch: &Path) -> Result<ImageBuilder> {
    let bin = build_ckload(&scratch.join("ckload"))?;
    let data = std::fs::read(&bin)?;
    Ok(ImageBuilder::busybox(CKPT_IMAGE)?.file(CKLOAD_IN_IMAGE, data, 0o755))
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/var/run/netns/NAME`) joined to the host by a veth pair:
/// the host side has `.1`, the namespace side `.2` of a /30. Removed on drop.
pub struct NetNs {
    pub name: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl NetNs {
    pub fn create() -> Result<NetNs> {
        let seq = NETNS_SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{}", std::process::id() % 100_000, seq);
        let name = format!("ra-ck-{tag}");
        let host_if = format!("rkh{tag}");
        let ns_if = format!("rkc{tag}");
        // A /30 per namespace in 10.213.0.0/16, from the tag.
        let n = (std::process::id() % 64) * 256 + seq * 4;
        let (a, b) = ((n / 256) % 256, n % 256);
        let host_ip = format!("10.213.{a}.{}", b + 1);
        let ns_ip = format!("10.213.{a}.{}", b + 2);
        let me = NetNs {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
        };
        let ip = |args: &[&str]| -> Result<()> { process::host("ip", args)?.ok().map(|_| ()) };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&["-n", &name, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// The namespace file, for `ctr run --with-ns network:PATH` or a spec.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip:port` of the namespace side.
    pub fn addr(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.ns_ip)
            .parse()
            .expect("valid address")
    }

    /// The namespace's IPv4 and IPv6 filter rules (`iptables -S`, then `ip6tables -S`).
    pub fn filter_rules(&self) -> Result<String> {
        let mut all = String::new();
        for tool in ["iptables", "ip6tables"] {
            let out =
                process::host("ip", &["netns", "exec", &self.name, tool, "-w", "-S"])?.ok()?;
            all.push_str(&out.stdout_str());
        }
        Ok(all)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = process::host("ip", &["link", "del", &self.host_if]);
        let _ = process::host("ip", &["netns", "del", &self.name]);
    }
}

/// Connects, sends `line` (if any) and reads one answer line.
pub fn tcp_line(addr: SocketAddr, line: Option<&str>, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    if let Some(l) = line {
        s.write_all(format!("{l}\n").as_bytes())?;
    }
    let mut r = BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out)?;
    if out.is_empty() {
        bail!("{addr} closed the connection without answering");
    }
    Ok(out.trim_end().to_string())
}

/// Polls `addr` until it answers a line; returns the answer and when it came.
pub fn wait_answer(
    addr: SocketAddr,
    line: Option<&str>,
    timeout: Duration,
) -> Result<(String, Instant)> {
    let start = Instant::now();
    loop {
        if let Ok(a) = tcp_line(addr, line, Duration::from_millis(500)) {
            return Ok((a, Instant::now()));
        }
        if start.elapsed() > timeout {
            bail!("{addr} did not answer within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A line-oriented TCP connection kept open across a checkpoint.
pub struct LineConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LineConn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<LineConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(LineConn { stream, reader })
    }

    /// Sends `line` and reads the answer line.
    pub fn ask(&mut self, line: &str) -> Result<String> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let mut out = String::new();
        self.reader.read_line(&mut out)?;
        if out.is_empty() {
            bail!("the connection was closed");
        }
        Ok(out.trim_end().to_string())
    }
}

/// Pids of the shim processes serving container `id` in `namespace`.
pub fn shim_pids(namespace: &str, id: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let has = |flag: &str, val: &str| args.windows(2).any(|w| w[0] == flag && w[1] == val);
        if args.first().is_some_and(|a| a.contains("containerd-shim"))
            && has("-namespace", namespace)
            && has("-id", id)
        {
            out.push(pid);
        }
    }
    out
}

/// Children of `parent` whose command name is `comm`.
pub fn children_named(parent: i32, comm: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid: i32 = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent && name == comm {
            out.push(pid);
        }
    }
    out
}

/// The v1 freezer state and v2 `cgroup.freeze` of the cgroup of `pid` (hybrid/legacy and
/// unified hosts), for checking that a failed dump left no freezer behind.
pub fn freezer_states(pid: u32) -> Result<Vec<(PathBuf, String)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrls.split(',').any(|c| c == "freezer") {
            let f = Path::new("/sys/fs/cgroup/freezer")
                .join(rel)
                .join("freezer.state");
            out.push((f.clone(), std::fs::read_to_string(&f)?.trim().to_string()));
        }
        if ctrls.is_empty() {
            for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                let f = Path::new(root).join(rel).join("cgroup.freeze");
                if f.exists() {
                    out.push((f.clone(), std::fs::read_to_string(&f)?.trim().to_string()));
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// Reads a whole small file, trimmed.
pub fn read_trimmed(path: &Path) -> Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)
        .with_context(|| format!("open {}", path.display()))?
        .read_to_string(&mut s)?;
    Ok(s.trim().to_string())
}
