//! SPDY/3 name/value header blocks and their compression.
//!
//! A header block is `u32 count`, then per pair `u32 len, name, u32 len, value`, names in
//! lower case, several values of one name joined by NUL. On the wire each block is compressed
//! with zlib; each direction of a connection is ONE zlib stream (the compressor's state carries
//! over from block to block) that starts with the preset dictionary of the SPDY/3
//! specification (section 2.6.10.1) and ends every block with a sync flush.
//!
//! flate2 with its `zlib-rs` backend does the zlib part: it supports preset dictionaries
//! (`set_dictionary`), which the default miniz_oxide backend does not. No maintained Rust crate
//! implements SPDY/3 itself (the protocol is obsolete outside Kubernetes' streaming), so the
//! framing here is written by hand.

use std::sync::LazyLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::StreamError;

/// Largest decompressed header block accepted (a peer cannot make us allocate more).
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Header names of the SPDY/3 dictionary, each stored in it as `u32 length` + name.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The dictionary's tail: common values, stored without length prefixes.
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information",
    "204 No Content",
    "301 Moved Permanently",
    "400 Bad Request",
    "401 Unauthorized",
    "403 Forbidden",
    "404 Not Found",
    "500 Internal Server Error",
    "501 Not Implemented",
    "503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec",
    " 00:00:00",
    " Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
    "text/plain,text/javascript,public",
    "privatemax-age=gzip,deflate,sdch",
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The SPDY/3 header compression dictionary (1423 bytes).
pub static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut d = Vec::with_capacity(1423);
    for w in DICTIONARY_WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    d
});

/// An ordered name/value header block. Names are kept in lower case (SPDY requires it);
/// a name appears once, with one or more values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, Vec<String>)>,
}

impl Headers {
    pub fn new() -> Headers {
        Headers::default()
    }

    /// Sets `name` (lower-cased) to the single `value`, replacing earlier values.
    pub fn set(&mut self, name: &str, value: &str) -> &mut Self {
        let name = name.to_ascii_lowercase();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = vec![value.to_string()],
            None => self.entries.push((name, vec![value.to_string()])),
        }
        self
    }

    /// Adds `value` to `name`'s values.
    pub fn add(&mut self, name: &str, value: &str) -> &mut Self {
        let name = name.to_ascii_lowercase();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(value.to_string()),
            None => self.entries.push((name, vec![value.to_string()])),
        }
        self
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.first().map(String::as_str))
    }

    /// Every (name, values) pair in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The uncompressed block.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for (name, values) in &self.entries {
            let value = values.join("\0");
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// Parses an uncompressed block. Upper-case names, repeated names, empty names and
    /// bytes left over are protocol errors (as the specification says).
    pub fn decode(block: &[u8]) -> Result<Headers, StreamError> {
        let mut r = block;
        let count = take_u32(&mut r)? as usize;
        if count > block.len() / 8 {
            return Err(protocol(format!(
                "header block claims {count} pairs in {} bytes",
                block.len()
            )));
        }
        let mut h = Headers::new();
        for _ in 0..count {
            let name = take_string(&mut r)?;
            let value = take_string(&mut r)?;
            if name.is_empty() {
                return Err(protocol("empty header name".into()));
            }
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(protocol(format!("header name {name:?} is not lower case")));
            }
            if h.get(&name).is_some() {
                return Err(protocol(format!("header {name:?} appears twice")));
            }
            h.entries
                .push((name, value.split('\0').map(str::to_string).collect()));
        }
        if !r.is_empty() {
            return Err(protocol(format!(
                "{} bytes after the header block's last pair",
                r.len()
            )));
        }
        Ok(h)
    }
}

fn protocol(msg: String) -> StreamError {
    StreamError::Protocol(msg)
}

fn take_u32(r: &mut &[u8]) -> Result<u32, StreamError> {
    let Some((head, rest)) = r.split_first_chunk::<4>() else {
        return Err(protocol("header block cut short".into()));
    };
    *r = rest;
    Ok(u32::from_be_bytes(*head))
}

fn take_string(r: &mut &[u8]) -> Result<String, StreamError> {
    let len = take_u32(r)? as usize;
    if len > r.len() {
        return Err(protocol(format!(
            "header string of {len} bytes with {} left",
            r.len()
        )));
    }
    let (s, rest) = r.split_at(len);
    *r = rest;
    String::from_utf8(s.to_vec()).map_err(|_| protocol("header string is not UTF-8".into()))
}

/// One direction's compressor: a single zlib stream with the SPDY dictionary, flushed
/// (sync flush) at the end of every block.
pub struct HeaderCompressor {
    z: Compress,
}

impl HeaderCompressor {
    pub fn new() -> Result<HeaderCompressor, StreamError> {
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(&DICTIONARY)
            .map_err(|e| StreamError::Compression(format!("set the SPDY dictionary: {e}")))?;
        Ok(HeaderCompressor { z })
    }

    /// Compresses one header block.
    pub fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, StreamError> {
        let input = headers.encode();
        let start = self.z.total_in();
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        loop {
            let consumed = (self.z.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(input.len().max(256));
            }
            self.z
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| StreamError::Compression(format!("compress headers: {e}")))?;
            let consumed = (self.z.total_in() - start) as usize;
            // Done once all input is in and zlib left room in the buffer (the flush is
            // complete; a full buffer may mean more output is pending).
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// One direction's decompressor, the counterpart of [`HeaderCompressor`].
pub struct HeaderDecompressor {
    z: Decompress,
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        HeaderDecompressor::new()
    }
}

impl HeaderDecompressor {
    pub fn new() -> HeaderDecompressor {
        HeaderDecompressor {
            z: Decompress::new(true),
        }
    }

    /// Decompresses and parses one header block (the compressed bytes of one frame).
    pub fn decompress(&mut self, input: &[u8]) -> Result<Headers, StreamError> {
        let start = self.z.total_in();
        let mut out: Vec<u8> = Vec::with_capacity(input.len() * 4 + 64);
        loop {
            let consumed = (self.z.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.len().max(1024));
            }
            let before = (self.z.total_in(), out.len());
            match self
                .z
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => {
                    return Err(StreamError::Compression(
                        "the peer ended its header compression stream".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z.set_dictionary(&DICTIONARY).map_err(|e| {
                        StreamError::Compression(format!("set the SPDY dictionary: {e}"))
                    })?;
                    continue;
                }
                Err(e) => return Err(StreamError::Compression(format!("decompress headers: {e}"))),
            }
            if out.len() > MAX_HEADER_BLOCK {
                return Err(protocol(format!(
                    "header block larger than {MAX_HEADER_BLOCK} bytes"
                )));
            }
            let consumed = (self.z.total_in() - start) as usize;
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
            if (self.z.total_in(), out.len()) == before {
                return Err(StreamError::Compression(
                    "header block does not end on a flush point".into(),
                ));
            }
        }
        Headers::decode(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[test]
    fn dictionary_is_the_spdy3_constant() {
        assert_eq!(DICTIONARY.len(), 1423);
        // The dictionary id a zlib stream with this preset dictionary carries (FDICT).
        assert_eq!(adler32(&DICTIONARY), 0xe3c6_a7c2);
        assert_eq!(&DICTIONARY[..11], b"\0\0\0\x07options");
        assert!(DICTIONARY.ends_with(b",*,enq=0."));
    }

    #[test]
    fn header_block_encoding() {
        let mut h = Headers::new();
        h.set("streamType", "stdin")
            .add("x-multi", "a")
            .add("x-multi", "b");
        let block = h.encode();
        let mut want = Vec::new();
        want.extend_from_slice(&2u32.to_be_bytes());
        want.extend_from_slice(&10u32.to_be_bytes());
        want.extend_from_slice(b"streamtype");
        want.extend_from_slice(&5u32.to_be_bytes());
        want.extend_from_slice(b"stdin");
        want.extend_from_slice(&7u32.to_be_bytes());
        want.extend_from_slice(b"x-multi");
        want.extend_from_slice(&3u32.to_be_bytes());
        want.extend_from_slice(b"a\0b");
        assert_eq!(block, want);
        let back = Headers::decode(&block).expect("decode");
        assert_eq!(back, h);
        assert_eq!(back.get("StreamType"), Some("stdin"));
    }

    #[test]
    fn header_block_rejects_bad_input() {
        let mut h = Headers::new();
        h.set("a", "1");
        let mut block = h.encode();
        block.push(0);
        assert!(Headers::decode(&block).is_err(), "trailing byte");
        let mut upper = Vec::new();
        upper.extend_from_slice(&1u32.to_be_bytes());
        upper.extend_from_slice(&1u32.to_be_bytes());
        upper.push(b'A');
        upper.extend_from_slice(&0u32.to_be_bytes());
        assert!(Headers::decode(&upper).is_err(), "upper-case name");
        assert!(Headers::decode(&[0, 0, 0, 1, 0, 0]).is_err(), "cut short");
        assert!(
            Headers::decode(&[0xff, 0xff, 0xff, 0xff]).is_err(),
            "huge count"
        );
    }

    #[test]
    fn compressed_blocks_round_trip_over_one_stream() {
        let mut c = HeaderCompressor::new().expect("compressor");
        let mut d = HeaderDecompressor::new();
        let mut blocks = Vec::new();
        for (i, t) in ["error", "stdin", "stdout", "stderr", "resize"]
            .iter()
            .enumerate()
        {
            let mut h = Headers::new();
            h.set("streamtype", t).set("requestid", &i.to_string());
            blocks.push((h.clone(), c.compress(&h).expect("compress")));
        }
        // The first block starts the zlib stream: header with FDICT and the dictionary id.
        let first = &blocks[0].1;
        assert_eq!(first[0], 0x78);
        assert_ne!(first[1] & 0x20, 0, "FDICT set");
        assert_eq!(
            u32::from_be_bytes([first[2], first[3], first[4], first[5]]),
            0xe3c6_a7c2
        );
        // Later blocks reuse the stream's history: a repeated block shrinks.
        assert!(blocks[4].1.len() < blocks[0].1.len());
        for (h, z) in &blocks {
            assert_eq!(&d.decompress(z).expect("decompress"), h);
        }
    }

    #[test]
    fn decompressor_refuses_garbage() {
        let mut d = HeaderDecompressor::new();
        assert!(d.decompress(b"definitely not zlib").is_err());
    }

    #[test]
    fn large_header_values_survive() {
        let mut c = HeaderCompressor::new().expect("compressor");
        let mut d = HeaderDecompressor::new();
        let big: String = (0..100_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let mut h = Headers::new();
        h.set("big", &big);
        let z = c.compress(&h).expect("compress");
        assert_eq!(
            d.decompress(&z).expect("decompress").get("big"),
            Some(&*big)
        );
    }
}
