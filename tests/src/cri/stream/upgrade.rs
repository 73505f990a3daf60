//! The HTTP/1.1 upgrade to SPDY/3.1 that starts a streaming session, and the streaming URL.
//!
//! The client (as client-go's SPDY round tripper does) sends
//!
//! ```text
//! POST /exec/<token> HTTP/1.1
//! Host: 127.0.0.1:<port>
//! Connection: Upgrade
//! Upgrade: SPDY/3.1
//! X-Stream-Protocol-Version: v4.channel.k8s.io      (one header per offered version)
//! Content-Length: 0
//! ```
//!
//! and the server answers `101 Switching Protocols` with `Connection: Upgrade`,
//! `Upgrade: SPDY/3.1` and the negotiated `X-Stream-Protocol-Version`. Anything else (404 for
//! an unknown or used token, 400 for a failed handshake) is an error carrying status and body.
//! Bytes after the response head already belong to the SPDY session and are handed on.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::conn::Socket;
use super::StreamError;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest error body kept.
const MAX_BODY: usize = 64 * 1024;

/// A streaming URL taken apart: where to connect and what to ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamUrl {
    pub addr: SocketAddr,
    /// The `Host` header value (`host:port` as in the URL).
    pub host: String,
    /// Path and query, e.g. `/exec/Xa1b2`.
    pub path: String,
}

impl StreamUrl {
    /// Parses `http://HOST:PORT/PATH` (what containerd's streaming server hands out; `https`
    /// is not supported: containerd serves plain HTTP unless configured with TLS).
    pub fn parse(url: &str) -> Result<StreamUrl, StreamError> {
        let bad = |why: &str| StreamError::Url(format!("{url:?}: {why}"));
        let uri: http::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// streaming URLs are supported"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addr = match bare.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => (bare, port)
                .to_socket_addrs()
                .map_err(|e| bad(&format!("resolve {bare}: {e}")))?
                .next()
                .ok_or_else(|| bad("host resolves to no address"))?,
        };
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        Ok(StreamUrl {
            addr,
            host: authority.as_str().to_string(),
            path,
        })
    }
}

/// The request bytes of the upgrade.
pub fn request(url: &StreamUrl, protocols: &[String]) -> Vec<u8> {
    let mut r = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: runc-architect-tests\r\nContent-Length: 0\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n",
        url.path, url.host
    );
    for p in protocols {
        r.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// The outcome of a successful upgrade.
#[derive(Debug)]
pub struct Upgraded {
    /// The negotiated `X-Stream-Protocol-Version` (empty if the server named none).
    pub protocol: String,
    /// Bytes read past the response head (the start of the SPDY session).
    pub leftover: Vec<u8>,
}

/// Performs the upgrade on `sock` within `deadline`.
pub fn upgrade<S: Socket>(
    sock: &mut S,
    url: &StreamUrl,
    protocols: &[String],
    deadline: Instant,
) -> Result<Upgraded, StreamError> {
    let remaining = |what: &str| -> Result<Duration, StreamError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(StreamError::Timeout {
                what: what.to_string(),
                after: Duration::ZERO,
            });
        }
        Ok(deadline - now)
    };
    sock.set_write_timeout_opt(Some(remaining("sending the upgrade request")?))
        .map_err(StreamError::Io)?;
    sock.write_all(&request(url, protocols))
        .map_err(|e| io_or_timeout(e, "sending the upgrade request"))?;
    sock.flush().map_err(StreamError::Io)?;
    sock.set_write_timeout_opt(None).map_err(StreamError::Io)?;

    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(StreamError::Handshake(format!(
                "response head longer than {MAX_HEAD} bytes"
            )));
        }
        sock.set_read_timeout_opt(Some(remaining("the upgrade response")?))
            .map_err(StreamError::Io)?;
        let mut chunk = [0u8; 4096];
        let n = sock
            .read(&mut chunk)
            .map_err(|e| io_or_timeout(e, "the upgrade response"))?;
        if n == 0 {
            return Err(StreamError::Handshake(format!(
                "connection closed before the upgrade response ended (got {:?})",
                String::from_utf8_lossy(&buf)
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    };

    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(StreamError::Handshake("incomplete response head".into()))
        }
        Err(e) => return Err(StreamError::Handshake(format!("bad response head: {e}"))),
    }
    let code = resp.code.unwrap_or(0);
    let header = |name: &str| -> Option<String> {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if code != 101 {
        let mut body = buf[head_len..].to_vec();
        let want = header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(MAX_BODY);
        while body.len() < want {
            let Ok(t) = remaining("the error body") else {
                break;
            };
            if sock.set_read_timeout_opt(Some(t)).is_err() {
                break;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        return Err(StreamError::Upgrade {
            status: code,
            reason: resp.reason.unwrap_or("").to_string(),
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    let upgrade = header("upgrade").unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("SPDY/3.1") {
        return Err(StreamError::Handshake(format!(
            "101 response upgrades to {upgrade:?}, not SPDY/3.1"
        )));
    }
    let protocol = header("x-stream-protocol-version").unwrap_or_default();
    if !protocol.is_empty() && !protocols.contains(&protocol) {
        return Err(StreamError::Handshake(format!(
            "server chose protocol {protocol:?}, which was not offered ({protocols:?})"
        )));
    }
    sock.set_read_timeout_opt(None).map_err(StreamError::Io)?;
    Ok(Upgraded {
        protocol,
        leftover: buf[head_len..].to_vec(),
    })
}

fn io_or_timeout(e: std::io::Error, what: &str) -> StreamError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => StreamError::Timeout {
            what: what.to_string(),
            after: Duration::ZERO,
        },
        _ => StreamError::Io(e),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn parses_streaming_urls() {
        let u = StreamUrl::parse("http://127.0.0.1:34567/exec/AbC_1").expect("url");
        assert_eq!(u.addr, "127.0.0.1:34567".parse().expect("addr"));
        assert_eq!(u.host, "127.0.0.1:34567");
        assert_eq!(u.path, "/exec/AbC_1");
        let v6 = StreamUrl::parse("http://[::1]:80/attach/x").expect("v6");
        assert_eq!(v6.addr, "[::1]:80".parse().expect("addr"));
        assert!(StreamUrl::parse("https://127.0.0.1:1/exec/x").is_err());
        assert!(StreamUrl::parse("not a url").is_err());
    }

    #[test]
    fn request_offers_every_protocol() {
        let u = StreamUrl::parse("http://127.0.0.1:1/exec/t").expect("url");
        let r = String::from_utf8(request(
            &u,
            &["v4.channel.k8s.io".into(), "v3.channel.k8s.io".into()],
        ))
        .expect("utf8");
        assert!(r.starts_with("POST /exec/t HTTP/1.1\r\n"), "{r}");
        assert!(
            r.contains("\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"),
            "{r}"
        );
        assert!(r.contains("X-Stream-Protocol-Version: v4.channel.k8s.io\r\nX-Stream-Protocol-Version: v3.channel.k8s.io\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
    }

    fn serve(response: &'static [u8]) -> (UnixStream, std::thread::JoinHandle<Vec<u8>>) {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || {
            let mut req = Vec::new();
            let mut chunk = [0u8; 1024];
            while find(&req, b"\r\n\r\n").is_none() {
                let n = b.read(&mut chunk).expect("read");
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&chunk[..n]);
            }
            b.write_all(response).expect("write");
            req
        });
        (a, t)
    }

    #[test]
    fn upgrade_keeps_bytes_after_the_head() {
        let (mut a, t) = serve(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n\x80\x03\x00\x06",
        );
        let u = StreamUrl::parse("http://127.0.0.1:1/exec/t").expect("url");
        let deadline = Instant::now() + Duration::from_secs(5);
        let protos = vec!["v4.channel.k8s.io".to_string()];
        let up = upgrade(&mut a, &u, &protos, deadline).expect("upgrade");
        assert_eq!(up.protocol, "v4.channel.k8s.io");
        assert_eq!(up.leftover, b"\x80\x03\x00\x06");
        let req = t.join().expect("server");
        assert!(req.starts_with(b"POST /exec/t "));
    }

    #[test]
    fn upgrade_reports_http_errors() {
        let (mut a, _t) =
            serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 19\r\n\r\n404 page not found\n");
        let u = StreamUrl::parse("http://127.0.0.1:1/exec/t").expect("url");
        let err = upgrade(
            &mut a,
            &u,
            &["v4.channel.k8s.io".into()],
            Instant::now() + Duration::from_secs(5),
        )
        .expect_err("404");
        match err {
            StreamError::Upgrade { status, body, .. } => {
                assert_eq!(status, 404);
                assert_eq!(body, "404 page not found");
            }
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn upgrade_refuses_an_unoffered_protocol() {
        let (mut a, _t) = serve(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v9.channel.k8s.io\r\n\r\n",
        );
        let u = StreamUrl::parse("http://127.0.0.1:1/exec/t").expect("url");
        let err = upgrade(
            &mut a,
            &u,
            &["v4.channel.k8s.io".into()],
            Instant::now() + Duration::from_secs(5),
        )
        .expect_err("bad protocol");
        assert!(matches!(err, StreamError::Handshake(_)), "{err}");
    }

    #[test]
    fn upgrade_times_out() {
        let (mut a, _b) = UnixStream::pair().expect("pair");
        let u = StreamUrl::parse("http://127.0.0.1:1/exec/t").expect("url");
        let err = upgrade(
            &mut a,
            &u,
            &["v4.channel.k8s.io".into()],
            Instant::now() + Duration::from_millis(100),
        )
        .expect_err("silent server");
        assert!(matches!(err, StreamError::Timeout { .. }), "{err}");
    }
}
