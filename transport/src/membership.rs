//! Mesh membership: the shared mesh key and the proof of holding it.

use std::fmt;
use std::path::Path;

use ring::hmac;

use crate::error::MeshKeyError;
use crate::identity::{NodeId, write_private};

/// The mesh's shared secret (32 bytes). Never printed, never sent: members prove they hold it
/// with an HMAC over TLS exported keying material.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshKey([u8; 32]);

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(..)")
    }
}

impl MeshKey {
    /// A new random key.
    pub fn generate() -> MeshKey {
        MeshKey(rand::random())
    }

    /// A key from its bytes.
    pub fn from_bytes(b: [u8; 32]) -> MeshKey {
        MeshKey(b)
    }

    /// Reads a key file: 64 hexadecimal characters, optionally followed by a newline.
    pub fn load(path: &Path) -> Result<MeshKey, MeshKeyError> {
        use std::io::Read;
        let io = |e| MeshKeyError::Io {
            path: path.into(),
            source: e,
        };
        let bad = |reason: String| MeshKeyError::Malformed {
            path: path.into(),
            reason,
        };
        // A key file is 64 characters; read a little more than that, never a whole huge file.
        let mut raw = Vec::with_capacity(128);
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_KEY_FILE)
            .read_to_end(&mut raw)
            .map_err(io)?;
        let text = String::from_utf8(raw).map_err(|_| bad("not text".into()))?;
        let hex = text.trim();
        if hex.len() != 64 {
            return Err(bad(format!(
                "expected 64 hex characters, found {}",
                hex.len()
            )));
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(chunk).map_err(|_| bad("not text".into()))?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| bad(format!("`{s}` is not hex")))?;
        }
        Ok(MeshKey(out))
    }

    /// Writes a new random key as hex with mode 0600. Refuses to overwrite an existing file.
    pub fn write_new(path: &Path) -> Result<MeshKey, MeshKeyError> {
        let key = MeshKey::generate();
        let mut hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
        hex.push('\n');
        write_private(path, hex.as_bytes()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                MeshKeyError::Exists { path: path.into() }
            } else {
                MeshKeyError::Io {
                    path: path.into(),
                    source: e,
                }
            }
        })?;
        Ok(key)
    }

    /// The proof one side sends: HMAC-SHA256 over the label, its role, both ids and the TLS
    /// exporter value of this connection.
    pub(crate) fn proof(
        &self,
        role: u8,
        dialer: &NodeId,
        listener: &NodeId,
        ekm: &[u8],
    ) -> hmac::Tag {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(PROOF_LABEL);
        ctx.update(&[role]);
        ctx.update(dialer.as_bytes());
        ctx.update(listener.as_bytes());
        ctx.update(ekm);
        ctx.sign()
    }

    /// Checks a proof in constant time.
    pub(crate) fn verify(
        &self,
        role: u8,
        dialer: &NodeId,
        listener: &NodeId,
        ekm: &[u8],
        tag: &[u8],
    ) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut msg = Vec::with_capacity(PROOF_LABEL.len() + 1 + 64 + ekm.len());
        msg.extend_from_slice(PROOF_LABEL);
        msg.push(role);
        msg.extend_from_slice(dialer.as_bytes());
        msg.extend_from_slice(listener.as_bytes());
        msg.extend_from_slice(ekm);
        hmac::verify(&key, &msg, tag).is_ok()
    }
}

/// Bytes of a mesh key file read at most (64 hex characters plus whitespace fit easily).
const MAX_KEY_FILE: u64 = 1024;

const PROOF_LABEL: &[u8] = b"peerbus/1 mesh-proof";
/// TLS exporter label of the mesh proof.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-peerbus-mesh-proof";

/// How a node proves (and checks) mesh membership.
#[derive(Clone, Debug)]
pub enum Membership {
    /// Peers must prove they hold this key; we prove it too.
    Key(MeshKey),
    /// No key: any peer is accepted (and keyed peers refuse us). For demos only.
    InsecureOpen,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mesh.key");
        let k = MeshKey::write_new(&p).expect("write");
        assert_eq!(MeshKey::load(&p).expect("load"), k);
        assert!(matches!(
            MeshKey::write_new(&p),
            Err(MeshKeyError::Exists { .. })
        ));
        std::fs::write(dir.path().join("short"), "abcd").expect("write");
        let e = MeshKey::load(&dir.path().join("short")).expect_err("short");
        assert!(e.to_string().contains("64 hex"), "{e}");
        std::fs::write(dir.path().join("nothex"), "zz".repeat(32)).expect("write");
        assert!(MeshKey::load(&dir.path().join("nothex")).is_err());
        assert!(MeshKey::load(&dir.path().join("missing")).is_err());
        assert_eq!(format!("{k:?}"), "MeshKey(..)");
    }

    #[test]
    fn proofs_bind_key_role_and_ids() {
        let k = MeshKey::generate();
        let (a, b) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        let tag = k.proof(0, &a, &b, b"ekm");
        assert!(k.verify(0, &a, &b, b"ekm", tag.as_ref()));
        assert!(!k.verify(1, &a, &b, b"ekm", tag.as_ref()));
        assert!(!k.verify(0, &b, &a, b"ekm", tag.as_ref()));
        assert!(!k.verify(0, &a, &b, b"other", tag.as_ref()));
        assert!(!MeshKey::generate().verify(0, &a, &b, b"ekm", tag.as_ref()));
    }
}
