//! Shedding the shim's own resident memory while it is idle.
//!
//! A shim lives as long as its pod and is idle almost all of that time; runc-architect's
//! whole point is that idle things should not hold memory. After each burst of requests
//! (one second without a new one) the shim hands back what it can rebuild cheaply:
//! - free heap pages (`malloc_trim`);
//! - its read-only file-backed mappings (code, read-only data of the binary and of shared
//!   libraries): their page-table entries are dropped with `MADV_DONTNEED`. The pages stay
//!   in the page cache, shared and reclaimable, and come back on the next use with a minor
//!   fault. Mappings with private copies (relocated RELRO data, anything ever written) are
//!   left alone: dropping them would lose the copy.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::debug;

/// Quiet time after the last request before trimming.
const IDLE: Duration = Duration::from_secs(1);

/// Triggers a trim once the shim has been quiet for a moment.
#[derive(Clone)]
pub struct Trimmer {
    poke: Arc<Notify>,
}

impl Trimmer {
    /// Starts the background task.
    pub fn start() -> Trimmer {
        let poke = Arc::new(Notify::new());
        let p = poke.clone();
        tokio::spawn(async move {
            loop {
                p.notified().await;
                // Debounce: every new poke restarts the quiet period.
                while tokio::time::timeout(IDLE, p.notified()).await.is_ok() {}
                let dropped = tokio::task::spawn_blocking(trim).await.unwrap_or(0);
                debug!(dropped_kib = dropped / 1024, "trimmed idle memory");
            }
        });
        Trimmer { poke }
    }

    /// Notes activity; a trim follows when it stops.
    pub fn poke(&self) {
        self.poke.notify_one();
    }
}

/// Trims now; returns the bytes of mappings whose pages were dropped.
fn trim() -> usize {
    // SAFETY: malloc_trim only walks and releases the allocator's free memory.
    unsafe { libc::malloc_trim(0) };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut dropped = 0;
    for m in mappings(&smaps) {
        if m.droppable() {
            // SAFETY: the range is a whole mapping of this process, read-only, file-backed
            // and without private (anonymous) pages, so dropping its page-table entries
            // loses nothing: the next access faults the same file contents back in.
            let rc = unsafe {
                libc::madvise(
                    m.start as *mut libc::c_void,
                    m.end - m.start,
                    libc::MADV_DONTNEED,
                )
            };
            if rc == 0 {
                dropped += m.rss_kib * 1024;
            }
        }
    }
    dropped
}

struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
    rss_kib: usize,
    anonymous_kib: usize,
}

impl Mapping<'_> {
    fn droppable(&self) -> bool {
        let read_only = self.perms.starts_with('r') && !self.perms.contains('w');
        let private = self.perms.ends_with('p');
        let file = self.path.starts_with('/');
        read_only && private && file && self.anonymous_kib == 0 && self.rss_kib > 0
    }
}

/// Parses `/proc/self/smaps` into mappings with their Rss and Anonymous sizes.
fn mappings(smaps: &str) -> Vec<Mapping<'_>> {
    let mut out: Vec<Mapping<'_>> = Vec::new();
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        let Some(first) = it.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                let perms = it.next().unwrap_or("");
                let path = it.nth(3).unwrap_or("");
                out.push(Mapping {
                    start,
                    end,
                    perms,
                    path,
                    rss_kib: 0,
                    anonymous_kib: 0,
                });
                continue;
            }
        }
        let value = || {
            it.clone()
                .next()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
        };
        if let Some(m) = out.last_mut() {
            match first {
                "Rss:" => m.rss_kib = value(),
                "Anonymous:" => m.anonymous_kib = value(),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_selects() {
        let s = "55ea72270000-55ea728e2000 r-xp 00249000 fe:00 5408383 /usr/bin/x\nRss: 4552 kB\nAnonymous: 0 kB\n\
                 55ea728e2000-55ea72963000 r--p 008ba000 fe:00 5408383 /usr/bin/x\nRss: 516 kB\nAnonymous: 120 kB\n\
                 55ea9caae000-55ea9cb37000 rw-p 00000000 00:00 0 [heap]\nRss: 496 kB\nAnonymous: 496 kB\n";
        let m = mappings(s);
        assert_eq!(m.len(), 3);
        assert!(m[0].droppable());
        assert!(!m[1].droppable(), "relocated read-only data must be kept");
        assert!(!m[2].droppable());
    }

    #[test]
    fn trimming_keeps_the_process_working() {
        let before = trim();
        // Code and data used after a trim are faulted back in.
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
        let _ = before;
    }
}
