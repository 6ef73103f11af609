//! Mesh membership: the shared mesh key and the proof of holding it.

use std::fmt;
use std::path::Path;

use ring::hmac;

use crate::ca::{MeshCa, NodeCert};
use crate::error::MeshKeyError;
use crate::identity::{NodeId, read_limited, write_private};

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

    /// A short name for the key that does not give it away: the first 8 bytes of
    /// SHA-256(`"peerbus mesh key fingerprint"`, a zero byte, the key), as 16 hex digits.
    /// `peerbus keygen` prints it and `peerbus status` names the keys a node proves and
    /// accepts by it, so operators compare keys across nodes (a rotation's steps) without
    /// copying them.
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(FINGERPRINT_LABEL);
        ctx.update(&self.0);
        ctx.finish().as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Reads a key file's first key (see [`MeshKey::load_all`]).
    pub fn load(path: &Path) -> Result<MeshKey, MeshKeyError> {
        let first = MeshKey::load_all(path)?.into_iter().next();
        first.ok_or_else(|| MeshKeyError::Malformed {
            path: path.into(),
            reason: "no key".into(),
        })
    }

    /// Reads a key file: one key, or up to [`MAX_MESH_KEYS`] while a key is being rotated, each
    /// as 64 hexadecimal characters on a line of its own (blank lines and lines starting with
    /// `#` are skipped). The first is the key this node proves membership with; a peer may
    /// prove it with any of them (see [`Membership::Rotating`]).
    pub fn load_all(path: &Path) -> Result<Vec<MeshKey>, MeshKeyError> {
        let bad = |reason: String| MeshKeyError::Malformed {
            path: path.into(),
            reason,
        };
        // A key file holds a few lines of 64 characters.
        let raw = read_limited(path, MAX_KEY_FILE).map_err(|error| MeshKeyError::Io {
            path: path.into(),
            error,
        })?;
        if raw.len() as u64 > MAX_KEY_FILE {
            return Err(bad(format!("larger than {MAX_KEY_FILE} bytes")));
        }
        let text = String::from_utf8(raw).map_err(|_| bad("not text".into()))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let hex = line.trim();
            if hex.is_empty() || hex.starts_with('#') {
                continue;
            }
            let key = parse_hex(hex).map_err(|why| bad(format!("line {}: {why}", n + 1)))?;
            if keys.len() == MAX_MESH_KEYS {
                return Err(bad(format!("more than {MAX_MESH_KEYS} keys")));
            }
            if keys.contains(&key) {
                return Err(bad(format!("line {}: the same key twice", n + 1)));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(bad("expected 64 hex characters, found no key".into()));
        }
        Ok(keys)
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
                    error: e,
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

/// One key as 64 hex characters.
fn parse_hex(hex: &str) -> Result<MeshKey, String> {
    if hex.len() != 64 {
        return Err(format!("expected 64 hex characters, found {}", hex.len()));
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| "not text".to_string())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| format!("`{s}` is not hex"))?;
    }
    Ok(MeshKey(out))
}

/// Keys a mesh key file may hold: the node's own and the others it accepts while a key is
/// rotated (two are enough for a rotation; a few more leave room for a slow one).
pub const MAX_MESH_KEYS: usize = 8;

/// Largest mesh key file: [`MAX_MESH_KEYS`] lines of 64 hex characters with room for comments.
/// A larger file is refused, not cut.
const MAX_KEY_FILE: u64 = 4096;

const PROOF_LABEL: &[u8] = b"peerbus/1 mesh-proof";
/// TLS exporter label of the mesh proof.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-peerbus-mesh-proof";

/// How a node proves (and checks) mesh membership.
#[derive(Clone, Debug)]
pub enum Membership {
    /// Peers must prove they hold this key; we prove it too.
    Key(MeshKey),
    /// While the mesh key is rotated: we prove `key`, and a peer may prove `key` or any of
    /// `also_accept`. A rotation from key A to key B is three rolling restarts: every node on
    /// A accepting B, then every node on B accepting A, then every node on B alone; nodes of
    /// two neighbouring steps always accept each other.
    Rotating {
        /// The key this node proves membership with.
        key: MeshKey,
        /// Keys a peer may prove membership with besides `key`.
        also_accept: Vec<MeshKey>,
    },
    /// Peers must present a certificate signed by the mesh CA (one of `ca`'s certificates);
    /// we present `cert`, which must be issued for this node's id (see [`crate::CaKey`]).
    Ca {
        /// The CA certificates a peer's certificate may be signed by.
        ca: MeshCa,
        /// This node's certificate.
        cert: NodeCert,
    },
    /// No key: any peer is accepted (and keyed peers refuse us). For demos only.
    InsecureOpen,
}

impl Membership {
    /// Membership by `keys`, the first one proven (as read by [`MeshKey::load_all`]): a single
    /// key is [`Membership::Key`], more are [`Membership::Rotating`]. `None` when empty.
    pub fn from_keys(mut keys: Vec<MeshKey>) -> Option<Membership> {
        if keys.is_empty() {
            return None;
        }
        let key = keys.remove(0);
        Some(if keys.is_empty() {
            Membership::Key(key)
        } else {
            Membership::Rotating {
                key,
                also_accept: keys,
            }
        })
    }

    /// The key this node proves membership with, if any.
    pub(crate) fn own_key(&self) -> Option<&MeshKey> {
        match self {
            Membership::Key(key) | Membership::Rotating { key, .. } => Some(key),
            Membership::Ca { .. } | Membership::InsecureOpen => None,
        }
    }

    /// Every key a peer may prove membership with (none for an open mesh).
    pub(crate) fn accepted(&self) -> impl Iterator<Item = &MeshKey> {
        let others = match self {
            Membership::Rotating { also_accept, .. } => also_accept.as_slice(),
            _ => &[],
        };
        self.own_key().into_iter().chain(others)
    }
}

/// What [`MeshKey::fingerprint`] hashes before the key (with its terminating zero byte).
const FINGERPRINT_LABEL: &[u8] = b"peerbus mesh key fingerprint\0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_names_a_key_without_giving_it_away() {
        // Computed apart: python3 -c "import hashlib; print(hashlib.sha256(
        //   b'peerbus mesh key fingerprint\x00' + bytes(range(32))).hexdigest()[:16])"
        let k = MeshKey::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(k.fingerprint(), "7e4d87a56a7a73d1");
        let (a, b) = (MeshKey::generate(), MeshKey::generate());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
    }

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
    fn a_key_file_may_hold_the_keys_of_a_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hex = |k: &MeshKey| k.0.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let (a, b) = (MeshKey::generate(), MeshKey::generate());
        let p = dir.path().join("rotating.key");
        let text = format!("# rotating to b\n{}\n\n  {}  \n", hex(&a), hex(&b));
        std::fs::write(&p, text).expect("write");
        assert_eq!(MeshKey::load_all(&p).expect("load"), [a.clone(), b.clone()]);
        assert_eq!(MeshKey::load(&p).expect("first"), a);
        let m = Membership::from_keys(vec![a.clone(), b.clone()]).expect("membership");
        assert_eq!(m.own_key(), Some(&a));
        assert_eq!(
            m.accepted().cloned().collect::<Vec<_>>(),
            [a.clone(), b.clone()]
        );
        assert!(matches!(
            Membership::from_keys(vec![b.clone()]),
            Some(Membership::Key(k)) if k == b
        ));
        assert!(Membership::from_keys(Vec::new()).is_none());

        let bad = |name: &str, text: String, why: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            let e = MeshKey::load_all(&p).expect_err(name).to_string();
            assert!(e.contains(why), "{name}: {e}");
        };
        bad("empty", "# nothing\n\n".into(), "found no key");
        bad(
            "twice",
            format!("{}\n{}\n", hex(&a), hex(&a)),
            "line 2: the same key twice",
        );
        bad(
            "short",
            format!("{}\nabcd\n", hex(&a)),
            "line 2: expected 64 hex",
        );
        let many: String = (0..=MAX_MESH_KEYS)
            .map(|_| hex(&MeshKey::generate()) + "\n")
            .collect();
        bad("many", many, "more than 8 keys");
        let long = format!("{}\n{}", hex(&a), "#".repeat(4096));
        bad("long", long, "larger than 4096 bytes");
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
