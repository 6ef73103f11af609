//! Membership by a mesh CA: each node presents a certificate for its own key, signed by a CA
//! key that the operator keeps off the nodes.
//!
//! - [`CaKey`] is the CA: its ed25519 signing key and its self-signed certificate, written by
//!   `peerbus ca new` and used only to issue node certificates (`peerbus ca issue`).
//! - [`MeshCa`] is what a node trusts: one CA certificate, or a few while the CA is replaced.
//! - [`NodeCert`] is a node's certificate, issued for its node id. The node presents it in the
//!   TLS handshake instead of its self-signed one; the handshake proves the node holds the
//!   key, and the peer checks the CA's signature and the validity period in the mesh proof
//!   step, before any stream opens. A refused peer is closed with
//!   [`CloseCode::MeshProofFailed`](crate::CloseCode) and a reason both sides can read.
//!
//! Only the subject key, the validity period and the CA's signature count; the names in the
//! certificates are for people reading them. Revocation is by expiry (issue certificates for
//! as long as a node may stay in the mesh without being issued a new one: a connection ends
//! when its peer's certificate does), or of a whole CA by dropping it from the trusted file
//! ([`Endpoint::renew_trust`](crate::Endpoint::renew_trust)); there are no revocation lists.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use crate::error::CaError;
use crate::identity::{NodeId, read_limited, write_private};
use crate::tls;

/// CA certificates a node trusts at once: its CA and, while the CA is replaced, the next one
/// (a few more leave room for a slow replacement).
pub const MAX_CA_CERTS: usize = 8;

/// Largest certificate or CA key file read. An ed25519 certificate is about 600 bytes of
/// PEM; a larger file is refused, not cut.
const MAX_PEM_FILE: u64 = 64 * 1024;

/// How long `peerbus ca new` makes a CA certificate valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Longest validity a node certificate may be issued for (ten years).
pub const MAX_NODE_VALIDITY: Duration = CA_VALIDITY;

/// How far back a certificate's validity starts, so that a node whose clock is a little behind
/// the issuer's accepts it at once.
const BACKDATE: Duration = Duration::from_secs(300);

/// File names inside a CA directory.
const CA_KEY_FILE: &str = "ca.key";
const CA_CERT_FILE: &str = "ca.crt";

/// Seconds since the Unix epoch (0 for a clock before it).
fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A time as rcgen takes it.
fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Reads at most [`MAX_PEM_FILE`] bytes of `path`, refusing a larger file.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, CaError> {
    let raw = read_limited(path, MAX_PEM_FILE).map_err(|error| CaError::Io {
        path: path.into(),
        error,
    })?;
    if raw.len() as u64 > MAX_PEM_FILE {
        return Err(CaError::Malformed {
            what: path.display().to_string(),
            reason: format!("larger than {MAX_PEM_FILE} bytes"),
        });
    }
    Ok(raw)
}

/// Every certificate in PEM text (other sections are skipped).
fn pem_certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| CaError::Malformed {
            what: what.into(),
            reason: format!("not PEM: {e}"),
        })?;
        if out.len() == MAX_CA_CERTS {
            return Err(CaError::Malformed {
                what: what.into(),
                reason: format!("more than {MAX_CA_CERTS} certificates"),
            });
        }
        out.push(cert);
    }
    if out.is_empty() {
        return Err(CaError::Malformed {
            what: what.into(),
            reason: "holds no PEM certificate".into(),
        });
    }
    Ok(out)
}

/// A certificate's validity period, in seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Validity {
    not_before: i64,
    not_after: i64,
}

impl Validity {
    /// Why a certificate is not valid at `now`, if it is not.
    fn check(&self, now: SystemTime) -> Result<(), String> {
        let now = unix_secs(now);
        if now < self.not_before {
            Err(format!("not valid until {}", show_time(self.not_before)))
        } else if now > self.not_after {
            Err(format!("expired at {}", show_time(self.not_after)))
        } else {
            Ok(())
        }
    }

    fn not_after(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.not_after).unwrap_or(0))
    }
}

/// A time for error messages, in UTC (RFC 3339, seconds).
fn show_time(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => {
            let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
            let (h, mi, s) = (t.hour(), t.minute(), t.second());
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
        }
        Err(_) => format!("{secs} s after the Unix epoch"),
    }
}

/// What a node checks of a certificate: its ed25519 key, validity and signature.
struct Parsed {
    key: [u8; 32],
    validity: Validity,
    is_ca: bool,
    subject: String,
    /// The signed part and its signature, for [`MeshCa::check`].
    tbs: Vec<u8>,
    signature: Vec<u8>,
    ed25519_signed: bool,
}

fn parse(der: &[u8]) -> Result<Parsed, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err("the certificate has trailing bytes".into());
    }
    let key = tls::ed25519_key(&cert).map_err(|why| format!("the {why}"))?;
    let validity = cert.validity();
    Ok(Parsed {
        key,
        validity: Validity {
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        },
        is_ca: cert.is_ca(),
        subject: cert.subject().to_string(),
        tbs: cert.tbs_certificate.as_ref().to_vec(),
        signature: cert.signature_value.data.to_vec(),
        ed25519_signed: cert.signature_algorithm.algorithm
            == x509_parser::oid_registry::OID_SIG_ED25519,
    })
}

/// One trusted CA certificate.
#[derive(Clone)]
struct Root {
    key: [u8; 32],
    validity: Validity,
    subject: String,
}

/// The CA certificates a node trusts: a peer's certificate must be signed by one of them.
/// Cheap to clone.
#[derive(Clone)]
pub struct MeshCa {
    roots: Arc<Vec<Root>>,
}

/// Two trusts are equal when they hold the same CA keys with the same validity, in order.
impl PartialEq for MeshCa {
    fn eq(&self, other: &MeshCa) -> bool {
        let ids = |ca: &MeshCa| -> Vec<([u8; 32], Validity)> {
            ca.roots.iter().map(|r| (r.key, r.validity)).collect()
        };
        ids(self) == ids(other)
    }
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.roots.iter().map(|r| r.subject.as_str()).collect();
        f.debug_struct("MeshCa").field("roots", &names).finish()
    }
}

impl MeshCa {
    /// Reads a CA certificate file (`ca.crt` from `peerbus ca new`). While the CA is replaced
    /// it holds both certificates, one after the other; at most [`MAX_CA_CERTS`].
    pub fn load(path: &Path) -> Result<MeshCa, CaError> {
        Self::from_pem(&path.display().to_string(), &read_pem_file(path)?)
    }

    /// The CA certificates in PEM text; `what` names it in errors.
    pub fn from_pem(what: &str, pem: &[u8]) -> Result<MeshCa, CaError> {
        let mut roots = Vec::new();
        for (n, der) in pem_certificates(what, pem)?.iter().enumerate() {
            let bad = |reason: String| CaError::Malformed {
                what: format!("{what}, certificate {}", n + 1),
                reason,
            };
            let p = parse(der).map_err(bad)?;
            if !p.is_ca {
                return Err(bad(
                    "is not a CA certificate (a node certificate in place of the CA's?)".into(),
                ));
            }
            roots.push(Root {
                key: p.key,
                validity: p.validity,
                subject: p.subject,
            });
        }
        Ok(MeshCa {
            roots: Arc::new(roots),
        })
    }

    /// Checks a node certificate (DER) at `now`: signed by one of these CAs, itself valid, and
    /// that CA valid too. Returns the certificate (its node id, its expiry); the error says
    /// why not.
    pub fn check(&self, der: &[u8], now: SystemTime) -> Result<NodeCert, String> {
        let cert = parse(der)?;
        if !cert.ed25519_signed {
            return Err("the certificate is not signed by the mesh CA".into());
        }
        let signer = self.roots.iter().find(|r| {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &r.key)
                .verify(&cert.tbs, &cert.signature)
                .is_ok()
        });
        let Some(root) = signer else {
            return Err("the certificate is not signed by the mesh CA".into());
        };
        root.validity
            .check(now)
            .map_err(|why| format!("the mesh CA certificate ({}) is {why}", root.subject))?;
        cert.validity
            .check(now)
            .map_err(|why| format!("the certificate is {why}"))?;
        Ok(NodeCert {
            der: CertificateDer::from(der.to_vec()),
            node: NodeId::from_bytes(cert.key),
            validity: cert.validity,
        })
    }
}

/// A node's certificate, issued by the mesh CA for its node id. Cheap to clone.
#[derive(Clone)]
pub struct NodeCert {
    der: CertificateDer<'static>,
    node: NodeId,
    validity: Validity,
}

impl fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCert")
            .field("node", &self.node)
            .field("not_after", &show_time(self.validity.not_after))
            .finish()
    }
}

impl NodeCert {
    /// Reads a node certificate file (written by `peerbus ca issue`).
    pub fn load(path: &Path) -> Result<NodeCert, CaError> {
        Self::from_pem(&path.display().to_string(), &read_pem_file(path)?)
    }

    /// The node certificate in PEM text (the first certificate in it); `what` names it in
    /// errors.
    pub fn from_pem(what: &str, pem: &[u8]) -> Result<NodeCert, CaError> {
        let bad = |reason: String| CaError::Malformed {
            what: what.into(),
            reason,
        };
        let der = pem_certificates(what, pem)?.swap_remove(0);
        let p = parse(&der).map_err(bad)?;
        if p.is_ca {
            return Err(bad(
                "is a CA certificate, not a node's (issue one with `peerbus ca issue`)".into(),
            ));
        }
        Ok(NodeCert {
            der,
            node: NodeId::from_bytes(p.key),
            validity: p.validity,
        })
    }

    /// The node the certificate was issued for.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// When the certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.validity.not_after()
    }

    /// The certificate, DER-encoded.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }
}

/// The public half of a node key, as rcgen signs it.
struct NodeKey([u8; 32]);

impl rcgen::PublicKeyData for NodeKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// A mesh CA: its signing key and certificate. Kept by whoever admits nodes, never on the
/// nodes (they need only its certificate).
pub struct CaKey {
    key: rcgen::KeyPair,
    cert_pem: String,
    cert: CertificateDer<'static>,
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaKey(..)")
    }
}

impl CaKey {
    /// A new CA (nothing written), its certificate named after `name` and valid from now for
    /// `valid_for`.
    pub fn generate(name: &str, valid_for: Duration) -> Result<CaKey, CaError> {
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(sign)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(sign)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("peerbus mesh CA {name}"));
        let now = SystemTime::now();
        params.not_before = offset_time(now - BACKDATE);
        params.not_after = offset_time(now + valid_for);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let cert = params.self_signed(&key).map_err(sign)?;
        Ok(CaKey {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key,
        })
    }

    /// Creates a CA in `dir` (made if missing): `ca.key`, the signing key (mode 0600), and
    /// `ca.crt`, the certificate every node trusts. Refuses to overwrite either.
    pub fn create(dir: &Path, name: &str) -> Result<CaKey, CaError> {
        let (key_path, cert_path) = (dir.join(CA_KEY_FILE), dir.join(CA_CERT_FILE));
        for path in [&key_path, &cert_path] {
            if path.exists() {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
        let ca = CaKey::generate(name, CA_VALIDITY)?;
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |error| CaError::Io { path, error }
        };
        std::fs::create_dir_all(dir).map_err(io(&dir.to_path_buf()))?;
        write_private(&key_path, ca.key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        write_private(&cert_path, ca.cert_pem.as_bytes()).map_err(io(&cert_path))?;
        Ok(ca)
    }

    /// Loads the CA in `dir` (as written by [`CaKey::create`]).
    pub fn load(dir: &Path) -> Result<CaKey, CaError> {
        let (key_path, cert_path) = (dir.join(CA_KEY_FILE), dir.join(CA_CERT_FILE));
        let key_pem = read_pem_file(&key_path)?;
        let bad = |path: &Path, reason: String| CaError::Malformed {
            what: path.display().to_string(),
            reason,
        };
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad(&key_path, format!("no PKCS#8 private key: {e}")))?;
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
            .map_err(|e| bad(&key_path, format!("not an ed25519 key: {e}")))?;
        let cert_pem = read_pem_file(&cert_path)?;
        let what = cert_path.display().to_string();
        let cert = pem_certificates(&what, &cert_pem)?.swap_remove(0);
        let p = parse(&cert).map_err(|why| bad(&cert_path, why))?;
        if p.key != key.public_key_raw() {
            return Err(bad(
                &cert_path,
                format!("is not the certificate of {CA_KEY_FILE}"),
            ));
        }
        let cert_pem =
            String::from_utf8(cert_pem).map_err(|_| bad(&cert_path, "not text".into()))?;
        Ok(CaKey {
            key,
            cert_pem,
            cert,
        })
    }

    /// The CA's certificate in PEM, the file nodes trust.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// What a node trusts to accept certificates of this CA.
    pub fn trust(&self) -> Result<MeshCa, CaError> {
        MeshCa::from_pem("the CA certificate", self.cert_pem.as_bytes())
    }

    /// Issues a certificate for `node`, valid from now for `valid_for` (at most
    /// [`MAX_NODE_VALIDITY`]), in PEM.
    pub fn issue(&self, node: &NodeId, valid_for: Duration) -> Result<String, CaError> {
        if valid_for.is_zero() || valid_for > MAX_NODE_VALIDITY {
            return Err(CaError::Sign(format!(
                "a node certificate is valid for 1 s to {} days, not {} s",
                MAX_NODE_VALIDITY.as_secs() / 86_400,
                valid_for.as_secs()
            )));
        }
        let now = SystemTime::now();
        self.issue_between(node, now - BACKDATE, now + valid_for)
    }

    /// Issues a certificate for `node` valid from `not_before` to `not_after`, in PEM.
    fn issue_between(
        &self,
        node: &NodeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, CaError> {
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(sign)?;
        let mut params =
            rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_string()]).map_err(sign)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node.to_string());
        params.not_before = offset_time(not_before);
        params.not_after = offset_time(not_after);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&NodeKey(*node.as_bytes()), &issuer)
            .map_err(sign)?;
        Ok(cert.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    const DAY: Duration = Duration::from_secs(86_400);

    /// The node id `trust` finds in `cert` now.
    fn checked(trust: &MeshCa, cert: &NodeCert) -> Result<NodeId, String> {
        trust
            .check(cert.der(), SystemTime::now())
            .map(|c| c.node_id())
    }

    fn node() -> NodeId {
        Identity::generate().expect("identity").node_id()
    }

    #[test]
    fn an_issued_certificate_names_its_node_and_checks_against_its_ca() {
        let ca = CaKey::generate("test", DAY).expect("ca");
        let id = node();
        let pem = ca.issue(&id, DAY).expect("issue");
        let cert = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("node cert");
        assert_eq!(cert.node_id(), id);
        let trust = ca.trust().expect("trust");
        assert_eq!(checked(&trust, &cert), Ok(id));
        let left = cert
            .not_after()
            .duration_since(SystemTime::now())
            .expect("future");
        assert!(
            left > DAY - Duration::from_secs(60) && left <= DAY,
            "{left:?}"
        );
    }

    #[test]
    fn another_cas_certificate_and_a_self_signed_one_are_refused() {
        let (ca, other) = (
            CaKey::generate("a", DAY).expect("ca"),
            CaKey::generate("b", DAY).expect("other"),
        );
        let pem = other.issue(&node(), DAY).expect("issue");
        let cert = NodeCert::from_pem("x", pem.as_bytes()).expect("cert");
        let trust = ca.trust().expect("trust");
        let err = trust
            .check(cert.der(), SystemTime::now())
            .expect_err("foreign");
        assert!(err.contains("not signed by the mesh CA"), "{err}");
        let self_signed = tls::certificate(&Identity::generate().expect("id")).expect("cert");
        let err = trust
            .check(self_signed.chain().0[0].as_ref(), SystemTime::now())
            .expect_err("self-signed");
        assert!(err.contains("not signed by the mesh CA"), "{err}");
    }

    #[test]
    fn a_ca_bundle_accepts_the_certificates_of_each() {
        let (a, b) = (
            CaKey::generate("a", DAY).expect("a"),
            CaKey::generate("b", DAY).expect("b"),
        );
        let bundle = format!("{}{}", a.certificate_pem(), b.certificate_pem());
        let trust = MeshCa::from_pem("bundle", bundle.as_bytes()).expect("bundle");
        for ca in [&a, &b] {
            let id = node();
            let pem = ca.issue(&id, DAY).expect("issue");
            let cert = NodeCert::from_pem("x", pem.as_bytes()).expect("cert");
            assert_eq!(checked(&trust, &cert), Ok(id));
        }
        let many = a.certificate_pem().repeat(MAX_CA_CERTS + 1);
        let err = MeshCa::from_pem("many", many.as_bytes()).expect_err("too many");
        assert!(err.to_string().contains("more than 8"), "{err}");
    }

    #[test]
    fn certificates_outside_their_validity_are_refused() {
        let ca = CaKey::generate("test", DAY).expect("ca");
        let trust = ca.trust().expect("trust");
        let now = SystemTime::now();
        let expired = ca
            .issue_between(&node(), now - 2 * DAY, now - DAY)
            .expect("issue");
        let cert = NodeCert::from_pem("x", expired.as_bytes()).expect("cert");
        let err = trust.check(cert.der(), now).expect_err("expired");
        assert!(err.contains("the certificate is expired at"), "{err}");
        let early = ca
            .issue_between(&node(), now + DAY, now + 2 * DAY)
            .expect("issue");
        let cert = NodeCert::from_pem("x", early.as_bytes()).expect("cert");
        let err = trust.check(cert.der(), now).expect_err("early");
        assert!(err.contains("not valid until"), "{err}");
        // The CA's own validity counts too: a day and a half on, its certificate has expired.
        let fresh = ca.issue(&node(), DAY).expect("issue");
        let cert = NodeCert::from_pem("x", fresh.as_bytes()).expect("cert");
        let err = trust
            .check(cert.der(), now + DAY + DAY / 2)
            .expect_err("ca expired");
        assert!(err.contains("the mesh CA certificate"), "{err}");
        assert!(ca.issue(&node(), Duration::ZERO).is_err());
        assert!(ca.issue(&node(), MAX_NODE_VALIDITY + DAY).is_err());
    }

    #[test]
    fn ca_files_round_trip_and_bad_files_get_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        let ca = CaKey::create(&ca_dir, "shop").expect("create");
        assert!(matches!(
            CaKey::create(&ca_dir, "shop"),
            Err(CaError::Exists { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(ca_dir.join(CA_KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = CaKey::load(&ca_dir).expect("load");
        let id = node();
        let pem = loaded.issue(&id, DAY).expect("issue");
        let trust = MeshCa::load(&ca_dir.join(CA_CERT_FILE)).expect("trust");
        let cert = NodeCert::from_pem("x", pem.as_bytes()).expect("cert");
        assert_eq!(checked(&trust, &cert), Ok(id));
        assert_eq!(ca.certificate_pem(), loaded.certificate_pem());

        // A node certificate is not a CA, and the CA's is not a node's.
        let node_file = dir.path().join("node.crt");
        std::fs::write(&node_file, &pem).expect("write");
        let err = MeshCa::load(&node_file).expect_err("node cert as CA");
        assert!(err.to_string().contains("is not a CA certificate"), "{err}");
        let err = NodeCert::load(&ca_dir.join(CA_CERT_FILE)).expect_err("CA as node cert");
        assert!(err.to_string().contains("is a CA certificate"), "{err}");

        let garbage = dir.path().join("garbage.crt");
        std::fs::write(&garbage, "hello").expect("write");
        let err = MeshCa::load(&garbage).expect_err("garbage");
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        std::fs::write(&garbage, vec![b'a'; MAX_PEM_FILE as usize + 1]).expect("write");
        let err = NodeCert::load(&garbage).expect_err("large");
        assert!(err.to_string().contains("larger than"), "{err}");
        let err = NodeCert::load(&dir.path().join("missing.crt")).expect_err("missing");
        assert!(err.to_string().contains("missing.crt"), "{err}");
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = NodeCert::from_pem("broken", broken.as_bytes()).expect_err("broken");
        assert!(err.to_string().contains("does not parse"), "{err}");

        // A CA directory whose certificate belongs to another key.
        let other = CaKey::generate("other", DAY).expect("other");
        std::fs::write(ca_dir.join(CA_CERT_FILE), other.certificate_pem()).expect("write");
        let err = CaKey::load(&ca_dir).expect_err("mismatch");
        assert!(
            err.to_string().contains("is not the certificate of"),
            "{err}"
        );
    }
}
