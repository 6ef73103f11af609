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
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let path = dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => Self::from_pkcs8(bytes).map_err(|e| IdentityError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(|e| IdentityError::Io {
                    path: dir.into(),
                    source: e,
                })?;
                let id = Self::generate()?;
                write_private(&path, &id.pkcs8).map_err(|e| IdentityError::Io {
                    path: path.clone(),
                    source: e,
                })?;
                Ok(id)
            }
            Err(e) => Err(IdentityError::Io { path, source: e }),
        }
    }

    /// This identity's node id.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    pub(crate) fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }
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
}
