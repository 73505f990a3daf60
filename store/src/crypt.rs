//! Encryption at rest: per-namespace keys, convergent chunk encryption, sealed manifest bodies.
//!
//! * A namespace key file holds 32 random bytes (raw, or 64 hex characters).
//! * Subkeys are derived with BLAKE3's key derivation from the key file's bytes *and the
//!   namespace name*, so even one key file reused for two namespaces gives unrelated keys:
//!   nothing is shared, deduplicated or comparable across namespaces.
//! * Chunk address = keyed BLAKE3 (address subkey) of the plaintext: a PRF, so an address
//!   reveals nothing of the content without the key.
//! * Chunk ciphertext = XChaCha20-Poly1305 (chunk subkey) with nonce = the first 24 bytes of
//!   the address and the whole address as associated data. Equal plaintexts in one namespace
//!   give equal addresses and ciphertexts (convergent: dedup works); a nonce repeats only for
//!   the same plaintext, so no nonce is ever reused with different data (the SIV argument).
//! * Manifest bodies (file names, sizes, metadata) are sealed with a third subkey and a random
//!   nonce, binding the cleartext header as associated data.

use std::fmt;
use std::path::Path;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};

use crate::digest::{hex, unhex, Addresser, Digest};
use crate::error::{Result, StoreError};

/// Bytes added to each encrypted chunk (the Poly1305 tag).
pub const TAG_LEN: usize = 16;
/// Bytes of a manifest body nonce.
pub const NONCE_LEN: usize = 24;

const CTX_ADDRESS: &str = "runc-architect-store 2026-11 v1 chunk address";
const CTX_CHUNK: &str = "runc-architect-store 2026-11 v1 chunk encryption";
const CTX_MANIFEST: &str = "runc-architect-store 2026-11 v1 manifest encryption";
const CTX_FINGERPRINT: &str = "runc-architect-store 2026-11 v1 key fingerprint";

/// The keys of one encrypted namespace.
pub struct NamespaceKey {
    namespace: String,
    address_key: [u8; 32],
    chunk_cipher: XChaCha20Poly1305,
    manifest_cipher: XChaCha20Poly1305,
    fingerprint: String,
}

impl fmt::Debug for NamespaceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamespaceKey")
            .field("namespace", &self.namespace)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl NamespaceKey {
    /// Derives the namespace's keys from 32 bytes of key material.
    pub fn from_bytes(namespace: &str, material: &[u8; 32]) -> Self {
        let mut input = Vec::with_capacity(32 + namespace.len() + 1);
        input.extend_from_slice(material);
        input.push(0);
        input.extend_from_slice(namespace.as_bytes());
        let address_key = blake3::derive_key(CTX_ADDRESS, &input);
        let chunk_key = blake3::derive_key(CTX_CHUNK, &input);
        let manifest_key = blake3::derive_key(CTX_MANIFEST, &input);
        let fp = blake3::derive_key(CTX_FINGERPRINT, &input);
        NamespaceKey {
            namespace: namespace.to_owned(),
            address_key,
            chunk_cipher: XChaCha20Poly1305::new(Key::from_slice(&chunk_key)),
            manifest_cipher: XChaCha20Poly1305::new(Key::from_slice(&manifest_key)),
            fingerprint: hex(&fp[..8]),
        }
    }

    /// Reads a key file: 32 raw bytes, or 64 hex characters (surrounding whitespace allowed).
    /// Warns when the file is readable by group or others.
    pub fn load(namespace: &str, path: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let bad = |reason: String| StoreError::BadKeyFile {
            namespace: namespace.to_owned(),
            path: path.to_owned(),
            reason,
        };
        let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "key file is accessible by group or others; use mode 0600");
            }
        }
        let material: [u8; 32] = if data.len() == 32 {
            data.as_slice()
                .try_into()
                .map_err(|_| bad("expected 32 bytes".into()))?
        } else {
            let text = std::str::from_utf8(&data).map_err(|_| {
                bad(format!(
                    "expected 32 raw bytes or 64 hex characters, found {} bytes",
                    data.len()
                ))
            })?;
            let bytes = unhex(text.trim())
                .filter(|b| b.len() == 32)
                .ok_or_else(|| bad("expected 32 raw bytes or 64 hex characters".into()))?;
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| bad("expected 32 bytes".into()))?
        };
        Ok(Self::from_bytes(namespace, &material))
    }

    /// The namespace these keys belong to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A short public identifier of the key (16 hex characters), recorded in the store so a
    /// wrong key is reported as such.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The address function of this namespace.
    pub fn addresser(&self) -> Addresser {
        Addresser::Keyed(self.address_key)
    }

    /// Encrypts a chunk in place (appending the tag). `addr` must be `addresser().address(buf)`.
    pub fn seal_chunk(&self, addr: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        let nonce = XNonce::from_slice(&addr.0[..NONCE_LEN]);
        let tag = self
            .chunk_cipher
            .encrypt_in_place_detached(nonce, &addr.0, buf.as_mut_slice())
            .map_err(|_| StoreError::Decrypt {
                what: format!("encryption of chunk {addr}"),
            })?;
        buf.extend_from_slice(tag.as_slice());
        Ok(())
    }

    /// Decrypts a stored chunk in place (`buf` = ciphertext + tag; on success it is truncated
    /// to the plaintext) and checks that the plaintext has address `addr`. The error string
    /// says what failed.
    pub fn open_chunk(&self, addr: &Digest, buf: &mut Vec<u8>) -> std::result::Result<(), String> {
        if buf.len() < TAG_LEN {
            return Err("stored chunk shorter than its authentication tag".into());
        }
        let split = buf.len() - TAG_LEN;
        let tag = Tag::clone_from_slice(&buf[split..]);
        buf.truncate(split);
        let nonce = XNonce::from_slice(&addr.0[..NONCE_LEN]);
        self.chunk_cipher
            .decrypt_in_place_detached(nonce, &addr.0, buf.as_mut_slice(), &tag)
            .map_err(|_| "authentication failed (tampered chunk or wrong key)".to_string())?;
        let actual = self.addresser().address(buf);
        if actual != *addr {
            return Err(format!("decrypted content has address {actual}"));
        }
        Ok(())
    }

    /// Seals a manifest body: returns nonce || ciphertext || tag.
    pub fn seal_manifest(&self, aad: &[u8], body: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| StoreError::Decrypt {
            what: format!("manifest encryption (no randomness: {e})"),
        })?;
        let mut buf = body.to_vec();
        let tag = self
            .manifest_cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), aad, &mut buf)
            .map_err(|_| StoreError::Decrypt {
                what: "manifest encryption".into(),
            })?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out.extend_from_slice(tag.as_slice());
        Ok(out)
    }

    /// Opens a sealed manifest body.
    pub fn open_manifest(&self, aad: &[u8], sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        let fail = || StoreError::Decrypt {
            what: what.to_owned(),
        };
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(fail());
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = ct.to_vec();
        self.manifest_cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                aad,
                &mut buf,
                Tag::from_slice(tag),
            )
            .map_err(|_| fail())?;
        Ok(buf)
    }
}

/// Writes a new random key file (mode 0600, never overwriting).
pub fn generate_key_file(path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| StoreError::BadKeyFile {
        namespace: String::new(),
        path: path.to_owned(),
        reason: format!("no randomness: {e}"),
    })?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io("create", path, e))?;
    f.write_all(format!("{}\n", hex(&key)).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| StoreError::io("write", path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_round_trip_and_tamper() {
        let k = NamespaceKey::from_bytes("ns", &[1; 32]);
        let data = vec![42u8; 4096];
        let addr = k.addresser().address(&data);
        let mut buf = data.clone();
        k.seal_chunk(&addr, &mut buf).unwrap();
        assert_eq!(buf.len(), 4096 + TAG_LEN);
        let mut again = data.clone();
        k.seal_chunk(&addr, &mut again).unwrap();
        assert_eq!(buf, again, "convergent");
        let mut ok = buf.clone();
        k.open_chunk(&addr, &mut ok).unwrap();
        assert_eq!(ok, data);
        let mut bad = buf.clone();
        bad[10] ^= 1;
        assert!(k.open_chunk(&addr, &mut bad).is_err());
        let other = NamespaceKey::from_bytes("ns", &[2; 32]);
        let mut wrong = buf.clone();
        assert!(other.open_chunk(&addr, &mut wrong).is_err());
    }

    #[test]
    fn namespaces_do_not_share_addresses() {
        let a = NamespaceKey::from_bytes("a", &[1; 32]);
        let b = NamespaceKey::from_bytes("b", &[1; 32]);
        assert_ne!(a.addresser().address(b"x"), b.addresser().address(b"x"));
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn manifest_seal() {
        let k = NamespaceKey::from_bytes("ns", &[1; 32]);
        let s = k.seal_manifest(b"hdr", b"body").unwrap();
        assert_eq!(k.open_manifest(b"hdr", &s, "m").unwrap(), b"body");
        assert!(k.open_manifest(b"hdX", &s, "m").is_err());
    }
}
