//! The stdio contract with containerd, on real pipes and FIFOs.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use super::*;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("ra-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn fifo(&self, name: &str) -> String {
        let p = self.0.join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p.to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Opens a FIFO for reading the way containerd does (before the process starts).
fn reader(path: &str) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}

/// Reads `f` to end of file, failing after `limit`.
fn read_to_eof(mut f: File, limit: Duration) -> Vec<u8> {
    copy::set_nonblocking(&f).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    start.elapsed() < limit,
                    "no end of file after {limit:?} (read {out:?})"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn output_fifo_ends_when_the_process_stream_ends() {
    let dir = Scratch::new("out");
    let cfg = StdioConfig {
        stdout: dir.fifo("out"),
        stderr: dir.fifo("err"),
        ..Default::default()
    };
    let (out_r, err_r) = (reader(&cfg.stdout), reader(&cfg.stderr));
    let (io, child) = ProcessIo::prepare(&cfg, &dir.0).unwrap();
    let [_, out_w, err_w] = child.fds.unwrap();
    let mut out_w = File::from(out_w);
    out_w.write_all(b"hello\n").unwrap();
    // A child that inherited stdout keeps the stream open after the process is gone.
    let inherited = out_w.try_clone().unwrap();
    drop(out_w);
    drop(err_w);
    assert_eq!(read_to_eof(err_r, Duration::from_secs(5)), b"");
    let late = std::thread::spawn(move || {
        let mut w = inherited;
        std::thread::sleep(Duration::from_millis(100));
        w.write_all(b"late\n").unwrap();
    });
    // containerd sees EOF without any Delete, once the last writer is gone, and the
    // shim's ProcessIo is still alive (as it is until Delete).
    assert_eq!(read_to_eof(out_r, Duration::from_secs(5)), b"hello\nlate\n");
    late.join().unwrap();
    drop(io);
}

#[test]
fn close_stdin_delivers_what_was_written_then_eof() {
    let dir = Scratch::new("in");
    let cfg = StdioConfig {
        stdin: dir.fifo("in"),
        ..Default::default()
    };
    let rt = rt();
    let (mut io, child) = ProcessIo::prepare(&cfg, &dir.0).unwrap();
    let [stdin_r, _, _] = child.fds.unwrap();
    rt.block_on(io.start(&cfg)).unwrap();
    // The client keeps its write end open, as containerd does until after CloseIO.
    let mut client = OpenOptions::new().write(true).open(&cfg.stdin).unwrap();
    client.write_all(b"abc").unwrap();
    io.close_stdin();
    assert_eq!(
        read_to_eof(File::from(stdin_r), Duration::from_secs(5)),
        b"abc"
    );
    drop(client);
}

#[test]
fn a_process_that_never_reads_stdin_blocks_nothing() {
    let dir = Scratch::new("stuck");
    let cfg = StdioConfig {
        stdin: dir.fifo("in"),
        stdout: dir.fifo("out"),
        ..Default::default()
    };
    let out_r = reader(&cfg.stdout);
    let rt = rt();
    let (mut io, child) = ProcessIo::prepare(&cfg, &dir.0).unwrap();
    let [stdin_r, out_w, _] = child.fds.unwrap();
    rt.block_on(io.start(&cfg)).unwrap();
    let fifo = cfg.stdin.clone();
    // The client pushes far more than a pipe and a FIFO hold (kubectl cp of a big tar
    // into a process that does not read).
    let writer = std::thread::spawn(move || {
        let mut client = OpenOptions::new().write(true).open(&fifo).unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..16 {
            if client.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    io.close_stdin();
    rt.block_on(io.wait_output(Duration::from_millis(10)));
    io.close();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "CloseIO/Delete waited on the stuck copier for {:?}",
        t.elapsed()
    );
    drop(stdin_r);
    drop(out_w);
    // Delete ended the output copy too: containerd's reader sees EOF.
    assert_eq!(read_to_eof(out_r, Duration::from_secs(5)), b"");
    // The client's blocked write ends once nobody reads the FIFO any more.
    drop(io);
    let _ = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&cfg.stdin)
        .map(drop);
    writer.join().unwrap();
}
