//! Node identity: an ed25519 key pair kept in the data directory.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

use crate::error::{IdParseError, IdentityError};

/// A node's id: its ed25519 public key. Printed as lowercase base32 (52 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// The id for these public key bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// The public key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 10 characters of the printed id, for logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(10);
        s
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = BASE32_NOPAD
            .decode(s.trim().to_ascii_uppercase().as_bytes())
            .map_err(|e| IdParseError(format!("`{s}` is not base32: {e}")))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|v: Vec<u8>| {
            IdParseError(format!("`{s}` decodes to {} bytes, not 32", v.len()))
        })?;
        Ok(NodeId(arr))
    }
}

/// A node's key pair (ed25519, PKCS#8). Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    pkcs8: Arc<Vec<u8>>,
    id: NodeId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// File name of the key inside the data directory.
const KEY_FILE: &str = "node.key";

impl Identity {
    /// A fresh random identity (nothing written anywhere). Fails only if the operating
    /// system's random number generator does.
    pub fn generate() -> Result<Identity, IdentityError> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Self::from_pkcs8(kp.serialize_der())
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Identity, IdentityError> {
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
            &rcgen::PKCS_ED25519,
        )
        .map_err(|e| IdentityError::Key(e.to_string()))?;
        let raw: [u8; 32] = kp
            .public_key_raw()
            .try_into()
            .map_err(|_| IdentityError::Key("public key is not 32 bytes".into()))?;
        Ok(Identity {
            pkcs8: Arc::new(pkcs8),
            id: NodeId(raw),
        })
    }

    /// Loads `<dir>/node.key`, or creates it (mode 0600) on first use.
    ///
    /// The file appears atomically (written aside, then linked into place), so a crash never
    /// leaves a half-written key, and two processes starting together end up with the same
    /// identity.
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let path = dir.join(KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| IdentityError::Io { path, error }
        };
        match read_key_file(&path) {
            Ok(bytes) => Self::load(&path, bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(io(dir))?;
                let id = Self::generate()?;
                if create_private(dir, &path, &id.pkcs8).map_err(io(&path))? {
                    Ok(id)
                } else {
                    // Another process created it first: use theirs.
                    let bytes = read_key_file(&path).map_err(io(&path))?;
                    Self::load(&path, bytes)
                }
            }
            Err(e) => Err(IdentityError::Io { path, error: e }),
        }
    }

    fn load(path: &Path, bytes: Vec<u8>) -> Result<Identity, IdentityError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    "the node key is readable by other users; run `chmod 600` on it"
                );
            }
        }
        Self::from_pkcs8(bytes).map_err(|e| IdentityError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// This identity's node id.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    pub(crate) fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }
}

/// Reads a key file, at most 64 KiB of it (a PKCS#8 ed25519 key is 83 bytes).
fn read_key_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(128);
    fs::File::open(path)?
        .take(64 * 1024)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Creates `path` with `bytes`, readable by the owner only, atomically: the bytes go to a
/// temporary file in `dir` first, which is then hard-linked into place (linking never replaces
/// an existing file). `Ok(false)` when `path` already existed. Falls back to writing `path`
/// directly where hard links are not supported.
fn create_private(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let tmp = dir.join(format!(
        ".{KEY_FILE}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    write_private(&tmp, bytes)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    let created = match linked {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(_) => match write_private(path, bytes) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        },
    };
    if created {
        // Make the new directory entry durable too; not every platform can sync a directory.
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(created)
}

/// Reads at most `limit + 1` bytes of a file: the caller refuses a file longer than `limit`
/// without ever reading a huge one.
pub(crate) fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut raw = Vec::with_capacity(1024);
    fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut raw)?;
    Ok(raw)
}

/// Writes a new file readable by the owner only; refuses to overwrite.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_or_create_reuses_the_key_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Identity::load_or_create(dir.path()).expect("create");
        let b = Identity::load_or_create(dir.path()).expect("load");
        assert_eq!(a.node_id(), b.node_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_ne!(Identity::generate().expect("gen").node_id(), a.node_id());
    }

    #[test]
    fn corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(KEY_FILE), b"not a key").expect("write");
        let err = Identity::load_or_create(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("node.key"), "{err}");
    }

    #[test]
    fn node_id_display_round_trips() {
        let id = Identity::generate().expect("gen").node_id();
        let s = id.to_string();
        assert_eq!(s.len(), 52);
        assert_eq!(s, s.to_lowercase());
        assert_eq!(s.parse::<NodeId>().expect("parse"), id);
        assert!("zz".parse::<NodeId>().is_err());
        assert_eq!(id.short().len(), 10);
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids: Vec<NodeId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Identity::load_or_create(dir.path()).expect("identity")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join").node_id())
                .collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(KEY_FILE)],
            "no temp files left"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_id_round_trips_and_any_text_parses_without_panic(
            bytes in proptest::prelude::any::<[u8; 32]>(),
            text in ".{0,80}",
        ) {
            let id = NodeId::from_bytes(bytes);
            proptest::prop_assert_eq!(id.to_string().parse::<NodeId>().ok(), Some(id));
            proptest::prop_assert_eq!(format!("{id:?}"), format!("NodeId({})", id.short()));
            let _ = text.parse::<NodeId>();
        }
    }
}
