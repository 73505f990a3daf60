//! Chunk addresses: 256-bit BLAKE3 digests (plain for unencrypted namespaces, keyed with a
//! namespace-derived key for encrypted ones), and a hasher for maps keyed by them.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Length of a digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// A 256-bit chunk address or checkpoint id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl Digest {
    /// All-zero digest (placeholder only).
    pub const ZERO: Digest = Digest([0; DIGEST_LEN]);

    /// Plain BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex form (64 characters).
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(DIGEST_LEN * 2);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    /// The first 12 hex characters, for humans.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(12);
        s
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != DIGEST_LEN * 2 {
            return None;
        }
        let mut out = [0u8; DIGEST_LEN];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Digest(out))
    }

    /// Reads a digest from the first 32 bytes of `b` (caller guarantees the length).
    pub(crate) fn from_slice(b: &[u8]) -> Option<Self> {
        let arr: [u8; DIGEST_LEN] = b.get(..DIGEST_LEN)?.try_into().ok()?;
        Some(Digest(arr))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lower-case hex of arbitrary bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// Parses hex of any even length.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|p| Some((hex_val(p[0])? << 4) | hex_val(p[1])?))
        .collect()
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl std::hash::Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Digests are uniformly distributed: their first 8 bytes are a perfect hash already.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// A `Hasher` that passes a digest's pre-mixed `u64` through (no SipHash on the hot path).
#[derive(Default, Clone, Copy)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Fallback for other key types: FNV-1a.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Build-hasher for maps keyed by [`Digest`].
pub type DigestBuildHasher = BuildHasherDefault<DigestHasher>;

/// `HashMap` keyed by digests.
pub type DigestMap<V> = std::collections::HashMap<Digest, V, DigestBuildHasher>;

/// How a namespace turns chunk bytes into chunk addresses.
#[derive(Clone)]
pub enum Addresser {
    /// Plain BLAKE3 (unencrypted namespaces).
    Plain,
    /// Keyed BLAKE3 with the namespace's address key (encrypted namespaces).
    Keyed([u8; 32]),
}

impl Addresser {
    /// The address of `data`.
    pub fn address(&self, data: &[u8]) -> Digest {
        match self {
            Addresser::Plain => Digest(*blake3::hash(data).as_bytes()),
            Addresser::Keyed(k) => Digest(*blake3::keyed_hash(k, data).as_bytes()),
        }
    }
}

impl fmt::Debug for Addresser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addresser::Plain => f.write_str("Addresser::Plain"),
            Addresser::Keyed(_) => f.write_str("Addresser::Keyed(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
        assert_eq!(unhex(&hex(&[1, 2, 255])), Some(vec![1, 2, 255]));
    }

    #[test]
    fn keyed_differs_from_plain() {
        let k = Addresser::Keyed([7; 32]);
        assert_ne!(k.address(b"x"), Addresser::Plain.address(b"x"));
    }
}
