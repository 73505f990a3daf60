//! The CRI container log format, as containerd writes it to `ContainerConfig.log_path` and
//! the kubelet reads it for `kubectl logs`.
//!
//! One entry per line: `<RFC3339Nano time> <stdout|stderr> <F|P> <content>\n`. `F` marks the
//! end of a line of the container's output, `P` a partial piece (containerd cuts lines longer
//! than its buffer, and output that ends without a newline). The kubelet shows a `P` piece
//! without a newline and an `F` piece followed by one; [`join`] puts the pieces of each
//! stream's lines back together and [`kubectl_view`] renders what `kubectl logs` prints.

use std::path::{Path, PathBuf};

/// Which output stream an entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line of the log file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// The timestamp as written (RFC 3339 with nanoseconds).
    pub timestamp: String,
    pub stream: LogStream,
    /// `P`: a piece of a longer line; `F`: the end of a line.
    pub partial: bool,
    pub content: Vec<u8>,
}

/// A line of the container's output, joined from its pieces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Timestamp of the first piece.
    pub timestamp: String,
    pub stream: LogStream,
    pub content: Vec<u8>,
    /// How many entries made it.
    pub pieces: usize,
    /// False for trailing partial pieces not (yet) ended by an `F` entry.
    pub complete: bool,
}

impl LogLine {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.content).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("read container log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container log line {line}: {why}: {text:?}")]
    Malformed {
        line: usize,
        why: String,
        text: String,
    },
}

/// Parses a whole log file's bytes. A last line without a newline (a writer caught
/// mid-write) is parsed like the others.
pub fn parse(data: &[u8]) -> Result<Vec<LogEntry>, LogError> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut n = 0;
    while !rest.is_empty() {
        n += 1;
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        out.push(parse_line(line).map_err(|why| LogError::Malformed {
            line: n,
            why,
            text: String::from_utf8_lossy(line).into_owned(),
        })?);
    }
    Ok(out)
}

/// Parses one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<LogEntry, String> {
    let mut fields = line.splitn(4, |&b| b == b' ');
    let ts = fields.next().unwrap_or_default();
    let stream = fields.next().ok_or("no stream field")?;
    let tag = fields.next().ok_or("no tag field")?;
    // Content may be empty; "ts stdout F" without a trailing space is an empty line too.
    let content = fields.next().unwrap_or_default();
    let timestamp = std::str::from_utf8(ts).map_err(|_| "timestamp is not UTF-8")?;
    check_timestamp(timestamp)?;
    let stream = match stream {
        b"stdout" => LogStream::Stdout,
        b"stderr" => LogStream::Stderr,
        other => {
            return Err(format!(
                "unknown stream {:?}",
                String::from_utf8_lossy(other)
            ))
        }
    };
    let partial = match tag {
        b"F" => false,
        b"P" => true,
        other => return Err(format!("unknown tag {:?}", String::from_utf8_lossy(other))),
    };
    Ok(LogEntry {
        timestamp: timestamp.to_string(),
        stream,
        partial,
        content: content.to_vec(),
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
fn check_timestamp(ts: &str) -> Result<(), String> {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    let mut i = 19;
    let mut ok = ok;
    if ok && b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        ok = i > start;
    }
    ok = ok
        && match b.get(i) {
            Some(b'Z') => i + 1 == b.len(),
            Some(b'+') | Some(b'-') => {
                i + 6 == b.len() && digits(i + 1..i + 3) && b[i + 3] == b':' && digits(i + 4..i + 6)
            }
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err(format!("timestamp {ts:?} is not RFC 3339"))
    }
}

/// Reads and parses a log file.
pub fn read_file(path: &Path) -> Result<Vec<LogEntry>, LogError> {
    let data = std::fs::read(path).map_err(|source| LogError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&data)
}

/// Joins partial pieces into lines, per stream, in the order lines were completed (pieces of
/// stdout and stderr may interleave). Trailing unfinished pieces come last, marked
/// incomplete.
pub fn join(entries: &[LogEntry]) -> Vec<LogLine> {
    let mut lines = Vec::new();
    let mut pending: Vec<LogLine> = Vec::new();
    for e in entries {
        let slot = pending.iter().position(|p| p.stream == e.stream);
        let mut line = match slot {
            Some(i) => pending.remove(i),
            None => LogLine {
                timestamp: e.timestamp.clone(),
                stream: e.stream,
                content: Vec::new(),
                pieces: 0,
                complete: false,
            },
        };
        line.content.extend_from_slice(&e.content);
        line.pieces += 1;
        if e.partial {
            pending.push(line);
        } else {
            line.complete = true;
            lines.push(line);
        }
    }
    lines.extend(pending);
    lines
}

/// What `kubectl logs` prints: every entry's content in file order, a newline after each `F`
/// entry; only `stream`'s entries if given.
pub fn kubectl_view(entries: &[LogEntry], stream: Option<LogStream>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if stream.is_some_and(|s| s != e.stream) {
            continue;
        }
        out.extend_from_slice(&e.content);
        if !e.partial {
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"2024-05-06T07:08:09.123456789Z stdout F hello world\n\
2024-05-06T07:08:09.200000000Z stderr P par\n\
2024-05-06T07:08:09.300000000Z stdout P long \n\
2024-05-06T07:08:09.400000000Z stderr F tial\n\
2024-05-06T07:08:09.500000000+02:00 stdout F line\n\
2024-05-06T07:08:10Z stdout F \n\
2024-05-06T07:08:11.5Z stdout P no newline yet";

    #[test]
    fn parses_entries() {
        let e = parse(SAMPLE).expect("parse");
        assert_eq!(e.len(), 7);
        assert_eq!(
            e[0],
            LogEntry {
                timestamp: "2024-05-06T07:08:09.123456789Z".into(),
                stream: LogStream::Stdout,
                partial: false,
                content: b"hello world".to_vec(),
            }
        );
        assert_eq!(e[1].stream, LogStream::Stderr);
        assert!(e[1].partial);
        assert_eq!(e[2].content, b"long ", "content keeps its spaces");
        assert_eq!(e[5].content, b"", "an empty line");
        assert_eq!(e[6].content, b"no newline yet");
    }

    #[test]
    fn joins_partial_lines_per_stream() {
        let lines = join(&parse(SAMPLE).expect("parse"));
        let got: Vec<(LogStream, String, usize, bool)> = lines
            .iter()
            .map(|l| (l.stream, l.text(), l.pieces, l.complete))
            .collect();
        assert_eq!(
            got,
            [
                (LogStream::Stdout, "hello world".into(), 1, true),
                (LogStream::Stderr, "partial".into(), 2, true),
                (LogStream::Stdout, "long line".into(), 2, true),
                (LogStream::Stdout, "".into(), 1, true),
                (LogStream::Stdout, "no newline yet".into(), 1, false),
            ]
        );
        assert_eq!(lines[1].timestamp, "2024-05-06T07:08:09.200000000Z");
    }

    #[test]
    fn renders_like_kubectl_logs() {
        let e = parse(SAMPLE).expect("parse");
        assert_eq!(
            kubectl_view(&e, None),
            b"hello world\nparlong tial\nline\n\nno newline yet".to_vec()
        );
        assert_eq!(
            kubectl_view(&e, Some(LogStream::Stderr)),
            b"partial\n".to_vec()
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            &b"2024-05-06T07:08:09Z stdin F x"[..],
            b"2024-05-06T07:08:09Z stdout X x",
            b"yesterday stdout F x",
            b"2024-05-06T07:08:09 stdout F x",
            b"2024-05-06T07:08:09.Z stdout F x",
            b"2024-05-06T07:08:09Z",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        match parse(b"2024-05-06T07:08:09Z stdout F ok\nbroken\n") {
            Err(LogError::Malformed { line, .. }) => assert_eq!(line, 2),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn keeps_non_utf8_content() {
        let e = parse(b"2024-05-06T07:08:09Z stdout F \xff\xfe\n").expect("parse");
        assert_eq!(e[0].content, [0xff, 0xfe]);
    }
}
