//! SPDY/3.1 frames: encoding and decoding.
//!
//! Every frame starts with 8 bytes. A control frame: `1 | version:15 | type:16 | flags:8 |
//! length:24`; a data frame: `0 | stream id:31 | flags:8 | length:24`. Header blocks inside
//! SYN_STREAM, SYN_REPLY and HEADERS are compressed by the direction's
//! [`HeaderCompressor`]/[`HeaderDecompressor`], so encoding and decoding carry that state:
//! an [`Encoder`] per sending direction, a [`Decoder`] per receiving one.

use std::io::Read;

use super::headers::{HeaderCompressor, HeaderDecompressor, Headers};
use super::StreamError;

pub const VERSION: u16 = 3;

pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_SETTINGS: u16 = 4;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const TYPE_HEADERS: u16 = 8;
pub const TYPE_WINDOW_UPDATE: u16 = 9;

pub const FLAG_FIN: u8 = 0x01;
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

/// Largest payload a frame's 24-bit length can describe.
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const UNSUPPORTED_VERSION: u32 = 4;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// SETTINGS ids.
pub mod settings {
    pub const MAX_CONCURRENT_STREAMS: u32 = 4;
    pub const INITIAL_WINDOW_SIZE: u32 = 7;
}

/// One SETTINGS entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        slot: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    /// A control frame of a type this implementation does not know (the specification says
    /// to ignore it).
    Unknown {
        frame_type: u16,
        flags: u8,
        payload: Vec<u8>,
    },
}

/// Encodes frames for one sending direction.
pub struct Encoder {
    headers: HeaderCompressor,
}

impl Encoder {
    pub fn new() -> Result<Encoder, StreamError> {
        Ok(Encoder {
            headers: HeaderCompressor::new()?,
        })
    }

    /// The frame's bytes. Header blocks go through this direction's compressor, so frames
    /// must be sent in the order they were encoded.
    pub fn encode(&mut self, frame: &Frame) -> Result<Vec<u8>, StreamError> {
        let mut p = Vec::new();
        let (frame_type, flags) = match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                check_len(data.len())?;
                let mut out = Vec::with_capacity(8 + data.len());
                out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                out.extend_from_slice(&flags_len(u8::from(*fin) * FLAG_FIN, data.len()));
                out.extend_from_slice(data);
                return Ok(out);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                slot,
                fin,
                unidirectional,
                headers,
            } => {
                p.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p.extend_from_slice(&(associated_to & 0x7fff_ffff).to_be_bytes());
                p.push((priority & 0x07) << 5);
                p.push(*slot);
                p.extend_from_slice(&self.headers.compress(headers)?);
                let mut f = 0;
                if *fin {
                    f |= FLAG_FIN;
                }
                if *unidirectional {
                    f |= FLAG_UNIDIRECTIONAL;
                }
                (TYPE_SYN_STREAM, f)
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => {
                p.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p.extend_from_slice(&self.headers.compress(headers)?);
                (TYPE_SYN_REPLY, u8::from(*fin) * FLAG_FIN)
            }
            Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                p.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p.extend_from_slice(&self.headers.compress(headers)?);
                (TYPE_HEADERS, u8::from(*fin) * FLAG_FIN)
            }
            Frame::RstStream { stream_id, status } => {
                p.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p.extend_from_slice(&status.to_be_bytes());
                (TYPE_RST_STREAM, 0)
            }
            Frame::Settings { clear, entries } => {
                p.extend_from_slice(&(entries.len() as u32).to_be_bytes());
                for e in entries {
                    p.extend_from_slice(
                        &(((e.flags as u32) << 24) | (e.id & 0xff_ffff)).to_be_bytes(),
                    );
                    p.extend_from_slice(&e.value.to_be_bytes());
                }
                (TYPE_SETTINGS, u8::from(*clear) * FLAG_SETTINGS_CLEAR)
            }
            Frame::Ping { id } => {
                p.extend_from_slice(&id.to_be_bytes());
                (TYPE_PING, 0)
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                p.extend_from_slice(&(last_good_stream_id & 0x7fff_ffff).to_be_bytes());
                p.extend_from_slice(&status.to_be_bytes());
                (TYPE_GOAWAY, 0)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                p.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p.extend_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
                (TYPE_WINDOW_UPDATE, 0)
            }
            Frame::Unknown {
                frame_type,
                flags,
                payload,
            } => {
                p.extend_from_slice(payload);
                (*frame_type, *flags)
            }
        };
        check_len(p.len())?;
        let mut out = Vec::with_capacity(8 + p.len());
        out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
        out.extend_from_slice(&frame_type.to_be_bytes());
        out.extend_from_slice(&flags_len(flags, p.len()));
        out.extend_from_slice(&p);
        Ok(out)
    }
}

fn check_len(len: usize) -> Result<(), StreamError> {
    if len > MAX_PAYLOAD {
        return Err(StreamError::Protocol(format!(
            "frame payload of {len} bytes exceeds {MAX_PAYLOAD}"
        )));
    }
    Ok(())
}

fn flags_len(flags: u8, len: usize) -> [u8; 4] {
    (((flags as u32) << 24) | (len as u32 & 0xff_ffff)).to_be_bytes()
}

/// Decodes frames for one receiving direction.
pub struct Decoder {
    headers: HeaderDecompressor,
    /// Largest payload accepted (data or control); larger frames are an error.
    pub max_payload: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            headers: HeaderDecompressor::new(),
            max_payload: MAX_PAYLOAD,
        }
    }

    /// Reads one frame. `Ok(None)` on a clean end of stream before a frame's first byte.
    pub fn read_frame(&mut self, r: &mut impl Read) -> Result<Option<Frame>, StreamError> {
        let mut head = [0u8; 8];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(StreamError::Protocol(
                        "connection closed inside a frame header".into(),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
        let len = (u32::from_be_bytes([0, head[5], head[6], head[7]])) as usize;
        if len > self.max_payload {
            return Err(StreamError::Protocol(format!(
                "frame of {len} bytes exceeds the limit of {}",
                self.max_payload
            )));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StreamError::Protocol("connection closed inside a frame".into())
            } else {
                StreamError::Io(e)
            }
        })?;
        self.decode(head, payload).map(Some)
    }

    /// Decodes a frame from its 8 header bytes and its payload.
    pub fn decode(&mut self, head: [u8; 8], payload: Vec<u8>) -> Result<Frame, StreamError> {
        let flags = head[4];
        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(StreamError::Protocol("data frame on stream 0".into()));
            }
            return Ok(Frame::Data {
                stream_id,
                fin: flags & FLAG_FIN != 0,
                data: payload,
            });
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        let frame_type = u16::from_be_bytes([head[2], head[3]]);
        if version != VERSION {
            return Err(StreamError::Protocol(format!(
                "control frame of SPDY version {version}, want {VERSION}"
            )));
        }
        let p = payload.as_slice();
        let need = |n: usize| -> Result<(), StreamError> {
            if p.len() < n {
                Err(StreamError::Protocol(format!(
                    "control frame type {frame_type} with {} payload bytes, needs {n}",
                    p.len()
                )))
            } else {
                Ok(())
            }
        };
        let word = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let frame = match frame_type {
            TYPE_SYN_STREAM => {
                need(10)?;
                Frame::SynStream {
                    stream_id: nonzero(word(0) & 0x7fff_ffff, "SYN_STREAM")?,
                    associated_to: word(4) & 0x7fff_ffff,
                    priority: p[8] >> 5,
                    slot: p[9],
                    fin: flags & FLAG_FIN != 0,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers: self.headers.decompress(&p[10..])?,
                }
            }
            TYPE_SYN_REPLY => {
                need(4)?;
                Frame::SynReply {
                    stream_id: nonzero(word(0) & 0x7fff_ffff, "SYN_REPLY")?,
                    fin: flags & FLAG_FIN != 0,
                    headers: self.headers.decompress(&p[4..])?,
                }
            }
            TYPE_HEADERS => {
                need(4)?;
                Frame::Headers {
                    stream_id: nonzero(word(0) & 0x7fff_ffff, "HEADERS")?,
                    fin: flags & FLAG_FIN != 0,
                    headers: self.headers.decompress(&p[4..])?,
                }
            }
            TYPE_RST_STREAM => {
                exact(p, 8, "RST_STREAM")?;
                Frame::RstStream {
                    stream_id: nonzero(word(0) & 0x7fff_ffff, "RST_STREAM")?,
                    status: word(4),
                }
            }
            TYPE_SETTINGS => {
                need(4)?;
                let n = word(0) as usize;
                if n > (p.len() - 4) / 8 || p.len() != 4 + n * 8 {
                    return Err(StreamError::Protocol(format!(
                        "SETTINGS with {n} entries in {} bytes",
                        p.len()
                    )));
                }
                let entries = (0..n)
                    .map(|i| {
                        let id = word(4 + i * 8);
                        Setting {
                            flags: (id >> 24) as u8,
                            id: id & 0xff_ffff,
                            value: word(8 + i * 8),
                        }
                    })
                    .collect();
                Frame::Settings {
                    clear: flags & FLAG_SETTINGS_CLEAR != 0,
                    entries,
                }
            }
            TYPE_PING => {
                exact(p, 4, "PING")?;
                Frame::Ping { id: word(0) }
            }
            TYPE_GOAWAY => {
                exact(p, 8, "GOAWAY")?;
                Frame::GoAway {
                    last_good_stream_id: word(0) & 0x7fff_ffff,
                    status: word(4),
                }
            }
            TYPE_WINDOW_UPDATE => {
                exact(p, 8, "WINDOW_UPDATE")?;
                Frame::WindowUpdate {
                    stream_id: word(0) & 0x7fff_ffff,
                    delta: word(4) & 0x7fff_ffff,
                }
            }
            _ => Frame::Unknown {
                frame_type,
                flags,
                payload,
            },
        };
        Ok(frame)
    }
}

fn exact(p: &[u8], n: usize, what: &str) -> Result<(), StreamError> {
    if p.len() != n {
        return Err(StreamError::Protocol(format!(
            "{what} with {} payload bytes, want {n}",
            p.len()
        )));
    }
    Ok(())
}

fn nonzero(id: u32, what: &str) -> Result<u32, StreamError> {
    if id == 0 {
        return Err(StreamError::Protocol(format!("{what} for stream 0")));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frames: &[Frame]) -> Vec<u8> {
        let mut e = Encoder::new().expect("encoder");
        let mut wire = Vec::new();
        for f in frames {
            wire.extend(e.encode(f).expect("encode"));
        }
        let mut d = Decoder::new();
        let mut r = wire.as_slice();
        for f in frames {
            assert_eq!(&d.read_frame(&mut r).expect("decode").expect("a frame"), f);
        }
        assert!(d.read_frame(&mut r).expect("clean end").is_none());
        wire
    }

    fn hdrs(pairs: &[(&str, &str)]) -> Headers {
        let mut h = Headers::new();
        for (k, v) in pairs {
            h.set(k, v);
        }
        h
    }

    #[test]
    fn every_frame_type_round_trips() {
        round_trip(&[
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: hdrs(&[("streamtype", "error")]),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 1,
                priority: 7,
                slot: 2,
                fin: true,
                unidirectional: true,
                headers: hdrs(&[("streamtype", "stdin"), ("port", "80")]),
            },
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: Headers::new(),
            },
            Frame::Headers {
                stream_id: 3,
                fin: true,
                headers: hdrs(&[("x", "y")]),
            },
            Frame::Data {
                stream_id: 3,
                fin: false,
                data: b"hello".to_vec(),
            },
            Frame::Data {
                stream_id: 0x7fff_fffd,
                fin: true,
                data: Vec::new(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: rst::CANCEL,
            },
            Frame::Settings {
                clear: true,
                entries: vec![Setting {
                    flags: 1,
                    id: settings::INITIAL_WINDOW_SIZE,
                    value: 1 << 20,
                }],
            },
            Frame::Ping { id: 2 },
            Frame::GoAway {
                last_good_stream_id: 7,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 65536,
            },
            Frame::Unknown {
                frame_type: 0x20,
                flags: 0,
                payload: vec![1, 2, 3],
            },
        ]);
    }

    #[test]
    fn exact_wire_bytes() {
        let mut e = Encoder::new().expect("encoder");
        assert_eq!(
            e.encode(&Frame::Data {
                stream_id: 5,
                fin: true,
                data: b"ab".to_vec()
            })
            .expect("data"),
            [0, 0, 0, 5, 1, 0, 0, 2, b'a', b'b']
        );
        assert_eq!(
            e.encode(&Frame::Ping { id: 1 }).expect("ping"),
            [0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]
        );
        assert_eq!(
            e.encode(&Frame::WindowUpdate {
                stream_id: 3,
                delta: 0x10000
            })
            .expect("window update"),
            [0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 3, 0, 1, 0, 0]
        );
        assert_eq!(
            e.encode(&Frame::RstStream {
                stream_id: 1,
                status: rst::PROTOCOL_ERROR
            })
            .expect("rst"),
            [0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 1]
        );
        assert_eq!(
            e.encode(&Frame::GoAway {
                last_good_stream_id: 0,
                status: 0
            })
            .expect("goaway"),
            [0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let syn = e
            .encode(&Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: hdrs(&[("streamtype", "error")]),
            })
            .expect("syn");
        assert_eq!(&syn[..4], [0x80, 3, 0, 1]);
        assert_eq!(syn[4], 0, "no flags");
        let len = u32::from_be_bytes([0, syn[5], syn[6], syn[7]]) as usize;
        assert_eq!(len, syn.len() - 8);
        assert_eq!(&syn[8..18], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let mut d = Decoder::new();
        // PING with 3 payload bytes.
        let bad_ping = [0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 1];
        assert!(d.read_frame(&mut &bad_ping[..]).is_err());
        // Wrong version.
        let mut d = Decoder::new();
        let v2 = [0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1];
        assert!(d.read_frame(&mut &v2[..]).is_err());
        // Data on stream 0.
        let mut d = Decoder::new();
        let zero = [0, 0, 0, 0, 0, 0, 0, 1, 9];
        assert!(d.read_frame(&mut &zero[..]).is_err());
        // Cut inside the payload.
        let mut d = Decoder::new();
        let cut = [0, 0, 0, 1, 0, 0, 0, 9, 1, 2];
        assert!(d.read_frame(&mut &cut[..]).is_err());
        // Over the configured limit.
        let mut d = Decoder::new();
        d.max_payload = 4;
        let big = [0, 0, 0, 1, 0, 0, 0, 5, 1, 2, 3, 4, 5];
        assert!(d.read_frame(&mut &big[..]).is_err());
        // SETTINGS whose count does not match its length.
        let mut d = Decoder::new();
        let settings = [0x80, 3, 0, 4, 0, 0, 0, 4, 0, 0, 0, 2];
        assert!(d.read_frame(&mut &settings[..]).is_err());
    }
}
