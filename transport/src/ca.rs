//! Membership by a mesh CA: each node presents a certificate for its own key, signed by a CA
//! key that the operator keeps off the nodes.
//!
//! - [`CaKey`] is the CA: its ed25519 signing key and its self-signed certificate, written by
//!   `peerbus ca new` and used only to issue node certificates (`peerbus ca issue`).
//! - [`MeshCa`] is what a node trusts: one CA certificate, or a few while the CA is replaced.
//!   It need not be a [`CaKey`]'s: a CA of an existing PKI (an ed25519, ECDSA P-256 or P-384,
//!   or RSA key) works too, signing the request [`certificate_request`] writes for a node
//!   (`peerbus ca request`).
//! - [`NodeCert`] is a node's certificate, issued for its node id. The node presents it in the
//!   TLS handshake instead of its self-signed one; the handshake proves the node holds the
//!   key, and the peer checks the CA's signature and the validity period in the mesh proof
//!   step, before any stream opens. A refused peer is closed with
//!   [`CloseCode::MeshProofFailed`](crate::CloseCode) and a reason both sides can read.
//!
//! Only the subject key, the serial number, the validity period and the CA's signature count;
//! the names in the certificates are for people reading them. A certificate ends at its
//! expiry (a connection ends when its peer's certificate does), when the CA's revocation list
//! names its serial number ([`MeshCa::with_revocation_lists`], written by `peerbus ca revoke`
//! or [`CaKey::revoke`], or published by the CA of an existing PKI), or with its whole CA,
//! dropped from the trusted file. A node reads both files again while it runs
//! ([`Endpoint::renew_trust`](crate::Endpoint::renew_trust) checks live connections anew).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivatePkcs8KeyDer};

use crate::error::CaError;
use crate::identity::{Identity, NodeId, read_limited, write_private};
use crate::tls;

/// CA certificates a node trusts at once: its CA and, while the CA is replaced, the next one
/// (a few more leave room for a slow replacement).
pub const MAX_CA_CERTS: usize = 8;

/// Largest certificate or CA key file read. An ed25519 certificate is about 600 bytes of
/// PEM; a larger file is refused, not cut.
const MAX_PEM_FILE: u64 = 64 * 1024;

/// The largest revocation list file read: [`MAX_REVOKED`] entries take about 4 MiB.
const MAX_CRL_FILE: u64 = 8 * 1024 * 1024;

/// The most certificates the revocation lists of a [`MeshCa`] may revoke, together.
pub const MAX_REVOKED: usize = 100_000;

/// How long a revocation list [`CaKey::revoke`] writes says it stays current (its next
/// update), a year. Nodes use a list past it all the same (the file they are given is the
/// word) and flag it ([`RevocationListInfo::stale_at`]).
pub const CRL_NEXT_UPDATE: Duration = Duration::from_secs(365 * 86_400);

/// The start of a subject alternative name (URI) that binds a node certificate to a service:
/// `peerbus:service:payments` lets its node run `payments` only ([`NodeCert::services`]). A
/// CA of another PKI binds its certificates the same way.
pub const SERVICE_URI: &str = "peerbus:service:";

/// How long `peerbus ca new` makes a CA certificate valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Longest validity a node certificate may be issued for (ten years).
pub const MAX_NODE_VALIDITY: Duration = CA_VALIDITY;

/// How far back a certificate's validity starts, so that a node whose clock is a little behind
/// the issuer's accepts it at once.
const BACKDATE: Duration = Duration::from_secs(300);

/// The CA's signing key in a CA directory ([`CaKey::create`]): kept off the nodes.
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA certificate in a CA directory: what every node of the mesh trusts.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA's revocation list in a CA directory ([`CaKey::create`] writes it empty).
pub const CA_CRL_FILE: &str = "ca.crl";

/// What a refusal of a revoked certificate says, in this node's words and (as a close
/// reason) in its peers' ([`says_revoked`]).
const REVOKED: &str = "is revoked by the mesh CA";

/// Whether `reason`, a refusal's reason or an error's text, says that a certificate is
/// revoked by the mesh CA: a node refused for that needs a new certificate, not another
/// mesh key or CA.
pub fn says_revoked(reason: &str) -> bool {
    reason.contains(REVOKED)
}

/// Whether `reason` says that the certificate of serial number `serial` (as
/// [`NodeCert::serial`] writes it) is revoked, in the words of [`MeshCa::check`].
pub(crate) fn says_serial_revoked(reason: &str, serial: &str) -> bool {
    reason.contains(&format!("(serial {serial}) {REVOKED}"))
}

/// Seconds since the Unix epoch (0 for a clock before it).
fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A time as rcgen takes it.
fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Creates `path` with `bytes` (the umask's mode), refusing to replace a file.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?
        .write_all(bytes)
}

/// Writes `bytes` to a file beside `path`, syncs it and renames it over `path`, so that a
/// reader of `path` (a node reading its certificate or revocation lists again) never sees half
/// of it.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads at most [`MAX_PEM_FILE`] bytes of `path`, refusing a larger file.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, CaError> {
    read_file_of_at_most(path, MAX_PEM_FILE)
}

/// Reads at most `limit` bytes of `path`, refusing a larger file.
fn read_file_of_at_most(path: &Path, limit: u64) -> Result<Vec<u8>, CaError> {
    let raw = read_limited(path, limit).map_err(|error| CaError::Io {
        path: path.into(),
        error,
    })?;
    if raw.len() as u64 > limit {
        return Err(CaError::Malformed {
            what: path.display().to_string(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(raw)
}

/// Revocation lists (DER) as PEM text, as a list file holds them.
pub fn revocation_lists_pem(lists: &[Vec<u8>]) -> String {
    let pems: Vec<pem::Pem> = lists
        .iter()
        .map(|der| pem::Pem::new("X509 CRL", der.as_slice()))
        .collect();
    pem::encode_many_config(
        &pems,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The revocation lists (DER) of the PEM file `path`, unchecked: at most [`MAX_CA_CERTS`],
/// and at most 8 MiB of file, as a list file ([`MeshCa::with_revocation_list_file`]).
pub fn read_revocation_lists(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let pem = read_file_of_at_most(path, MAX_CRL_FILE)?;
    let lists = pem_revocation_lists(&path.display().to_string(), &pem)?;
    Ok(lists.into_iter().map(|der| der.as_ref().to_vec()).collect())
}

/// The revocation lists in PEM text (other sections are skipped), `what` naming it in
/// errors: at most [`MAX_CA_CERTS`].
fn pem_revocation_lists(
    what: &str,
    pem: &[u8],
) -> Result<Vec<CertificateRevocationListDer<'static>>, CaError> {
    let mut lists = Vec::new();
    for der in CertificateRevocationListDer::pem_slice_iter(pem) {
        let bad = |reason: String| CaError::Malformed {
            what: format!("{what}, revocation list {}", lists.len() + 1),
            reason,
        };
        let der = der.map_err(|e| bad(format!("not PEM: {e}")))?;
        if lists.len() == MAX_CA_CERTS {
            return Err(bad(format!("more than {MAX_CA_CERTS} revocation lists")));
        }
        lists.push(der);
    }
    Ok(lists)
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

/// A certificate's subject public key, of the kinds a mesh CA may have. A node's is always
/// ed25519 (it is the node id); a CA of an existing PKI often has an ECDSA or RSA key.
#[derive(Clone, PartialEq, Eq)]
enum PublicKey {
    Ed25519([u8; 32]),
    /// The uncompressed curve point, as ring reads it.
    EcdsaP256(Vec<u8>),
    EcdsaP384(Vec<u8>),
    /// The DER of the `RSAPublicKey`, as ring reads it.
    Rsa(Vec<u8>),
    /// Any other kind: such a CA signs nothing this node can check.
    Unsupported(String),
}

impl PublicKey {
    fn of(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> PublicKey {
        use x509_parser::oid_registry as oid;
        let alg = &spki.algorithm.algorithm;
        if *alg == oid::OID_SIG_ED25519 {
            return match tls::ed25519_key(spki) {
                Ok(key) => PublicKey::Ed25519(key),
                Err(why) => PublicKey::Unsupported(format!("a {why}")),
            };
        }
        let bits = spki.subject_public_key.data.to_vec();
        if *alg == oid::OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == oid::OID_EC_P256 => PublicKey::EcdsaP256(bits),
                Some(c) if c == oid::OID_NIST_EC_P384 => PublicKey::EcdsaP384(bits),
                Some(c) => PublicKey::Unsupported(format!("an ECDSA key on curve {c}")),
                None => PublicKey::Unsupported("an ECDSA key without a named curve".into()),
            }
        } else if *alg == oid::OID_PKCS1_RSAENCRYPTION {
            PublicKey::Rsa(bits)
        } else {
            PublicKey::Unsupported(format!("a key of algorithm {alg}"))
        }
    }

    /// Whether `signature` over `signed` is this key's, made the way `how` says. `false` for
    /// a signature of another kind than the key's.
    fn verifies(&self, how: Signed, signed: &[u8], signature: &[u8]) -> bool {
        use ring::signature as sig;
        let (alg, key): (&'static dyn sig::VerificationAlgorithm, &[u8]) = match (self, how) {
            (PublicKey::Ed25519(k), Signed::Ed25519) => (&sig::ED25519, k),
            (PublicKey::EcdsaP256(k), Signed::EcdsaSha256) => (&sig::ECDSA_P256_SHA256_ASN1, k),
            (PublicKey::EcdsaP256(k), Signed::EcdsaSha384) => (&sig::ECDSA_P256_SHA384_ASN1, k),
            (PublicKey::EcdsaP384(k), Signed::EcdsaSha256) => (&sig::ECDSA_P384_SHA256_ASN1, k),
            (PublicKey::EcdsaP384(k), Signed::EcdsaSha384) => (&sig::ECDSA_P384_SHA384_ASN1, k),
            (PublicKey::Rsa(k), Signed::RsaSha256) => (&sig::RSA_PKCS1_2048_8192_SHA256, k),
            (PublicKey::Rsa(k), Signed::RsaSha384) => (&sig::RSA_PKCS1_2048_8192_SHA384, k),
            (PublicKey::Rsa(k), Signed::RsaSha512) => (&sig::RSA_PKCS1_2048_8192_SHA512, k),
            _ => return false,
        };
        sig::UnparsedPublicKey::new(alg, key)
            .verify(signed, signature)
            .is_ok()
    }
}

/// How a certificate was signed, of the algorithms a mesh CA may sign with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signed {
    Ed25519,
    EcdsaSha256,
    EcdsaSha384,
    RsaSha256,
    RsaSha384,
    RsaSha512,
}

impl Signed {
    /// The algorithm of `oid`, or why it is not one a node checks (completing "… is signed
    /// with …").
    fn of(oid: &x509_parser::der_parser::oid::Oid<'_>) -> Result<Signed, String> {
        use x509_parser::oid_registry as reg;
        Ok(match oid {
            o if *o == reg::OID_SIG_ED25519 => Signed::Ed25519,
            o if *o == reg::OID_SIG_ECDSA_WITH_SHA256 => Signed::EcdsaSha256,
            o if *o == reg::OID_SIG_ECDSA_WITH_SHA384 => Signed::EcdsaSha384,
            o if *o == reg::OID_PKCS1_SHA256WITHRSA => Signed::RsaSha256,
            o if *o == reg::OID_PKCS1_SHA384WITHRSA => Signed::RsaSha384,
            o if *o == reg::OID_PKCS1_SHA512WITHRSA => Signed::RsaSha512,
            o => {
                return Err(format!(
                    "algorithm {o}, which a node does not check (ed25519, ECDSA with SHA-256 \
                     or SHA-384, or RSA PKCS#1 with SHA-256, SHA-384 or SHA-512)"
                ));
            }
        })
    }
}

/// What a node checks of a certificate: its subject key, validity and signature.
struct Parsed {
    key: PublicKey,
    validity: Validity,
    is_ca: bool,
    /// Whether it is an X.509 version 3 certificate (rustls takes no other).
    v3: bool,
    /// What its key usage extension allows its key to sign (both when it has none, as RFC
    /// 5280 reads it): certificates, and revocation lists.
    signs_certificates: bool,
    signs_lists: bool,
    serial: Serial,
    subject: String,
    /// The services its subject alternative names bind it to ([`SERVICE_URI`]), or why they
    /// do not parse: a node certificate's must (it might bind its node), a CA's need not.
    services: Result<Vec<String>, String>,
    /// The signed part, its signature and how it was made, for [`MeshCa::check`].
    tbs: Vec<u8>,
    signature: Vec<u8>,
    signed: Result<Signed, String>,
}

impl Parsed {
    /// The subject's ed25519 key: a node certificate's node id.
    fn node_key(&self) -> Result<[u8; 32], String> {
        match &self.key {
            PublicKey::Ed25519(key) => Ok(*key),
            _ => Err("the certificate key is not ed25519".into()),
        }
    }
}

fn parse(der: &[u8]) -> Result<Parsed, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err("the certificate has trailing bytes".into());
    }
    let validity = cert.validity();
    let usage = cert
        .key_usage()
        .map_err(|e| format!("the certificate's key usage does not parse: {e}"))?;
    let (signs_certificates, signs_lists) = usage.map_or((true, true), |u| {
        (u.value.key_cert_sign(), u.value.crl_sign())
    });
    let services = cert
        .subject_alternative_name()
        .map(|names| {
            names
                .into_iter()
                .flat_map(|n| n.value.general_names.iter())
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(SERVICE_URI),
                    _ => None,
                })
                .map(str::to_owned)
                .collect()
        })
        .map_err(|e| format!("the certificate's alternative names do not parse: {e}"));
    Ok(Parsed {
        key: PublicKey::of(&cert.tbs_certificate.subject_pki),
        validity: Validity {
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        },
        is_ca: cert.is_ca(),
        v3: cert.version() == x509_parser::x509::X509Version::V3,
        signs_certificates,
        signs_lists,
        serial: Serial::of(cert.raw_serial()),
        subject: cert.subject().to_string(),
        services,
        tbs: cert.tbs_certificate.as_ref().to_vec(),
        signature: cert.signature_value.data.to_vec(),
        signed: Signed::of(&cert.signature_algorithm.algorithm),
    })
}

/// A certificate's serial number: the bytes of its DER integer, without leading zeros (so
/// that a certificate and a revocation list compare alike however they were encoded).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Serial(Vec<u8>);

impl Serial {
    fn of(raw: &[u8]) -> Serial {
        let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
        Serial(raw[start..].to_vec())
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("0");
        }
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A serial number in hex (`1a2b…`, any case, colons allowed), or `None`.
fn parse_serial(hex: &str) -> Option<Serial> {
    let digits: Vec<u8> = hex
        .bytes()
        .filter(|b| *b != b':')
        .map(|b| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok()))
        .collect::<Option<_>>()?;
    if digits.is_empty() || digits.len() > 40 {
        return None;
    }
    // Pairs from the right: an odd count has a lone leading digit.
    let mut bytes = Vec::with_capacity(digits.len().div_ceil(2));
    let odd = digits.len() % 2;
    if odd == 1 {
        bytes.push(digits[0]);
    }
    for pair in digits[odd..].chunks(2) {
        bytes.push(pair[0] << 4 | pair[1]);
    }
    Some(Serial::of(&bytes))
}

/// One trusted CA certificate, and the serial numbers its revocation list revokes.
#[derive(Clone)]
struct Root {
    key: PublicKey,
    validity: Validity,
    subject: String,
    /// Whether its key usage lets it sign revocation lists.
    signs_lists: bool,
    revoked: Arc<BTreeSet<Serial>>,
    /// The newest revocation list taken for it (`revoked` holds what it names).
    list: Option<Arc<RevocationList>>,
}

/// What a revocation list a [`MeshCa`] took is ([`MeshCa::revocation_list_info`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RevocationListInfo {
    /// The subject of the CA that signed it.
    pub ca: String,
    /// Its CRL number: decimal, or hexadecimal (`0x…`) when over 128 bits; `None` when the
    /// list has none (lists of `peerbus ca revoke` always do, one past the last).
    pub number: Option<String>,
    /// When it was issued (its thisUpdate), in seconds since the Unix epoch.
    pub issued: u64,
    /// When its CA promised a newer one by (its nextUpdate), in seconds since the Unix
    /// epoch; `None` when it names no time. A list past it is still used (the mesh would
    /// rather keep what it knows is revoked than refuse everyone), but the CA may have
    /// revoked more since: give the mesh a newer one (`peerbus ca revoke` writes one, valid
    /// a year).
    pub next_update: Option<u64>,
    /// How many certificates it revokes.
    pub revoked: usize,
}

impl RevocationListInfo {
    /// Whether the list is past its next update at `now` (seconds since the Unix epoch).
    pub fn stale_at(&self, now: u64) -> bool {
        self.next_update.is_some_and(|next| next <= now)
    }
}

/// A CRL number (big-endian, no leading zeros) as [`RevocationListInfo::number`] shows it.
fn crl_number_text(number: &[u8]) -> String {
    if number.len() <= 16 {
        let n = number.iter().fold(0u128, |n, &b| (n << 8) | u128::from(b));
        n.to_string()
    } else {
        let hex: String = number.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

/// A revocation list a [`MeshCa`] took: its bytes, passed on to peers as they are (its CA's
/// signature vouches for them), and what orders two lists of one CA.
#[derive(Debug, PartialEq, Eq)]
struct RevocationList {
    der: Vec<u8>,
    /// Its CRL number (big-endian, no leading zeros), when it has one. RFC 5280 makes it
    /// mandatory, and `peerbus ca revoke` numbers each list one past the last.
    number: Option<Vec<u8>>,
    /// When it was issued (thisUpdate), seconds since the Unix epoch.
    issued: i64,
    /// When a newer one is due (nextUpdate), seconds since the Unix epoch, when it says.
    next_update: Option<i64>,
}

impl RevocationList {
    /// Whether this list replaces `held`, an earlier one of the same CA: a higher CRL
    /// number, or, when either has none, a later issue time. A list never replaces itself,
    /// so a list passed around the mesh comes to rest.
    fn newer_than(&self, held: &RevocationList) -> bool {
        match (&self.number, &held.number) {
            (Some(a), Some(b)) => (a.len(), a) > (b.len(), b),
            _ => self.issued > held.issued,
        }
    }
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
        self.roots.len() == other.roots.len()
            && self.roots.iter().zip(other.roots.iter()).all(|(a, b)| {
                a.key == b.key
                    && a.validity == b.validity
                    && a.revoked == b.revoked
                    && a.list == b.list
            })
    }
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.roots.iter().map(|r| r.subject.as_str()).collect();
        f.debug_struct("MeshCa")
            .field("roots", &names)
            .field("revoked", &self.revoked())
            .finish()
    }
}

impl MeshCa {
    /// Reads a CA certificate file (`ca.crt` from `peerbus ca new`, or the certificate of the
    /// CA of an existing PKI that signs the nodes' certificates: an ed25519, ECDSA P-256 or
    /// P-384, or RSA key). While the CA is replaced it holds both certificates, one after the
    /// other; at most [`MAX_CA_CERTS`].
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
            if !p.signs_certificates {
                return Err(bad(
                    "has a key usage that does not allow signing certificates (keyCertSign)".into(),
                ));
            }
            if let PublicKey::Unsupported(kind) = &p.key {
                return Err(bad(format!(
                    "has {kind}; a mesh CA's key is ed25519, ECDSA P-256 or P-384, or RSA"
                )));
            }
            roots.push(Root {
                key: p.key,
                validity: p.validity,
                subject: p.subject,
                signs_lists: p.signs_lists,
                revoked: Arc::default(),
                list: None,
            });
        }
        Ok(MeshCa {
            roots: Arc::new(roots),
        })
    }

    /// The trusted certificates whose key made `signature` over `signed` the way `how` says:
    /// every one of that key, as a CA certificate renewed for the same key sits beside the
    /// old one in the file, and either may be the valid one.
    fn signers<'a>(
        &'a self,
        how: Signed,
        signed: &'a [u8],
        signature: &'a [u8],
    ) -> impl Iterator<Item = (usize, &'a Root)> {
        self.roots
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.key.verifies(how, signed, signature))
    }

    /// Checks a node certificate (DER) at `now`: signed by one of these CAs, itself valid, and
    /// that CA valid too. Returns the certificate (its node id, its expiry); the error says
    /// why not.
    pub fn check(&self, der: &[u8], now: SystemTime) -> Result<NodeCert, String> {
        let cert = parse(der)?;
        let node = cert.node_key()?;
        let how = cert
            .signed
            .clone()
            .map_err(|alg| format!("the certificate is signed with {alg}"))?;
        let signers: Vec<&Root> = self
            .signers(how, &cert.tbs, &cert.signature)
            .map(|(_, r)| r)
            .collect();
        let Some(first) = signers.first() else {
            return Err("the certificate is not signed by the mesh CA".into());
        };
        if let Some(root) = signers.iter().find(|r| r.revoked.contains(&cert.serial)) {
            // `says_serial_revoked` reads these words back.
            return Err(format!(
                "the certificate (serial {}) {REVOKED} ({})",
                cert.serial, root.subject
            ));
        }
        let root = signers
            .iter()
            .find(|r| r.validity.check(now).is_ok())
            .unwrap_or(first);
        root.validity
            .check(now)
            .map_err(|why| format!("the mesh CA certificate ({}) is {why}", root.subject))?;
        cert.validity
            .check(now)
            .map_err(|why| format!("the certificate is {why}"))?;
        Ok(NodeCert {
            der: CertificateDer::from(der.to_vec()),
            node: NodeId::from_bytes(node),
            validity: cert.validity,
            serial: cert.serial,
            services: cert.services?,
        })
    }
}

impl MeshCa {
    /// These CAs with the revocation lists (CRLs) in PEM text, `what` naming it in errors: a
    /// certificate whose serial number the list of its CA names is refused from then on.
    /// Each list must be signed by one of the CAs (one list per CA; while a CA is replaced,
    /// the lists of both one after the other). They replace any lists taken before; a list
    /// past its next update is used all the same. At most [`MAX_REVOKED`] certificates in
    /// all.
    pub fn with_revocation_lists(&self, what: &str, pem: &[u8]) -> Result<MeshCa, CaError> {
        let mut revoked = vec![BTreeSet::new(); self.roots.len()];
        let mut newest: Vec<Option<Arc<RevocationList>>> = vec![None; self.roots.len()];
        let lists = pem_revocation_lists(what, pem)?;
        let mut count = 0;
        for (n, der) in lists.iter().enumerate() {
            let bad = |reason: String| CaError::Malformed {
                what: format!("{what}, revocation list {}", n + 1),
                reason,
            };
            let (signers, list, serials) = self
                .verify_list(der.as_ref(), MAX_REVOKED - count)
                .map_err(bad)?;
            count += serials.len();
            let list = Arc::new(list);
            for &root in &signers {
                revoked[root].extend(serials.iter().cloned());
                if newest[root].as_ref().is_none_or(|n| list.newer_than(n)) {
                    newest[root] = Some(list.clone());
                }
            }
        }
        if lists.is_empty() {
            return Err(CaError::Malformed {
                what: what.into(),
                reason: "holds no PEM revocation list (X509 CRL)".into(),
            });
        }
        let roots = self
            .roots
            .iter()
            .zip(revoked.into_iter().zip(newest))
            .map(|(r, (revoked, list))| Root {
                revoked: Arc::new(revoked),
                list,
                ..r.clone()
            })
            .collect();
        Ok(MeshCa {
            roots: Arc::new(roots),
        })
    }

    /// Checks one revocation list (DER): it parses, and a trusted CA whose key usage allows
    /// it signed it. Returns the roots it holds for (every trusted certificate of the signing
    /// key), the list, and the serial numbers it revokes, refusing more than `room`.
    fn verify_list(
        &self,
        der: &[u8],
        room: usize,
    ) -> Result<(Vec<usize>, RevocationList, BTreeSet<Serial>), String> {
        let (rest, crl) =
            x509_parser::parse_x509_crl(der).map_err(|e| format!("does not parse: {e}"))?;
        if !rest.is_empty() {
            return Err("has trailing bytes".into());
        }
        let how = Signed::of(&crl.signature_algorithm.algorithm)
            .map_err(|alg| format!("is signed with {alg}"))?;
        // The list holds for every trusted certificate of its signing key.
        let signers: Vec<usize> = self
            .signers(how, crl.tbs_cert_list.as_ref(), &crl.signature_value.data)
            .map(|(i, _)| i)
            .collect();
        if signers.is_empty() {
            return Err("is not signed by a CA of the mesh CA file".into());
        }
        if signers.iter().any(|&i| !self.roots[i].signs_lists) {
            return Err(format!(
                "is signed by a CA ({}) whose key usage does not allow signing revocation \
                 lists (cRLSign)",
                self.roots[signers[0]].subject
            ));
        }
        let mut serials = BTreeSet::new();
        for entry in crl.iter_revoked_certificates() {
            if serials.len() == room {
                return Err(format!("revokes more than {MAX_REVOKED} certificates"));
            }
            serials.insert(Serial::of(entry.raw_serial()));
        }
        let list = RevocationList {
            der: der.to_vec(),
            number: crl.crl_number().map(|n| n.to_bytes_be()),
            issued: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
        };
        Ok((signers, list, serials))
    }

    /// These CAs with `der`, a revocation list (DER) a peer passed on, in place of the list
    /// held for its CA when it is newer ([`MeshCa::revocation_lists`]: a higher CRL number,
    /// or a later issue time when either list has none); `None` when it is not (the same
    /// list, or an older one). Errors when it does not parse, no CA of these signed it, or
    /// the lists would revoke more than [`MAX_REVOKED`] certificates together.
    pub fn with_newer_revocation_list(&self, der: &[u8]) -> Result<Option<MeshCa>, CaError> {
        let bad = |reason: String| CaError::Malformed {
            what: "a revocation list passed on by a peer".into(),
            reason,
        };
        let (signers, list, serials) = self.verify_list(der, MAX_REVOKED).map_err(bad)?;
        let newer = signers.iter().any(|&i| {
            self.roots[i]
                .list
                .as_ref()
                .is_none_or(|held| list.newer_than(held))
        });
        if !newer {
            return Ok(None);
        }
        let (list, serials) = (Arc::new(list), Arc::new(serials));
        let roots: Vec<Root> = self
            .roots
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if signers.contains(&i) {
                    Root {
                        revoked: serials.clone(),
                        list: Some(list.clone()),
                        ..r.clone()
                    }
                } else {
                    r.clone()
                }
            })
            .collect();
        let ca = MeshCa {
            roots: Arc::new(roots),
        };
        if ca.revoked() > MAX_REVOKED {
            return Err(bad(format!(
                "would make the lists revoke more than {MAX_REVOKED} certificates together"
            )));
        }
        Ok(Some(ca))
    }

    /// These CAs, where `held` (the trust in use) has a newer revocation list for a CA of the
    /// same key, with that list in place of theirs: a list a peer passed on outlives an older
    /// one read again from a file. An operator replaces a list only with a newer one.
    pub fn keeping_newer_lists_of(&self, held: &MeshCa) -> MeshCa {
        let roots = self
            .roots
            .iter()
            .map(|r| {
                let newer = held.roots.iter().find(|h| {
                    h.key == r.key
                        && h.list
                            .as_ref()
                            .is_some_and(|l| r.list.as_ref().is_none_or(|mine| l.newer_than(mine)))
                });
                match newer {
                    Some(h) => Root {
                        revoked: h.revoked.clone(),
                        list: h.list.clone(),
                        ..r.clone()
                    },
                    None => r.clone(),
                }
            })
            .collect();
        MeshCa {
            roots: Arc::new(roots),
        }
    }

    /// Each revocation list taken once, with the first CA certificate (in the order of the
    /// CA file) it holds for: a CA certificate renewed for the same key shares its list.
    fn distinct_lists(&self) -> Vec<(&Root, &RevocationList)> {
        let mut lists: Vec<(&Root, &RevocationList)> = Vec::new();
        for root in self.roots.iter() {
            if let Some(list) = &root.list
                && !lists.iter().any(|(_, l)| l.der == list.der)
            {
                lists.push((root, list));
            }
        }
        lists
    }

    /// The revocation lists taken (DER), one per CA key: what a node passes on to its peers.
    pub fn revocation_lists(&self) -> Vec<Vec<u8>> {
        self.distinct_lists()
            .into_iter()
            .map(|(_, list)| list.der.clone())
            .collect()
    }

    /// What the revocation lists taken are, one per CA key, in the order of the CA file:
    /// which CA issued each, its number and issue time, and how many certificates it
    /// revokes. Every node of a mesh shows the same once a new list reached them all.
    pub fn revocation_list_info(&self) -> Vec<RevocationListInfo> {
        self.distinct_lists()
            .into_iter()
            .map(|(root, list)| RevocationListInfo {
                ca: root.subject.clone(),
                number: list.number.as_deref().map(crl_number_text),
                issued: u64::try_from(list.issued).unwrap_or(0),
                next_update: list.next_update.map(|t| u64::try_from(t).unwrap_or(0)),
                revoked: root.revoked.len(),
            })
            .collect()
    }

    /// Whether `other` is this very trust (a clone of it), not only an equal one.
    pub fn is_same(&self, other: &MeshCa) -> bool {
        Arc::ptr_eq(&self.roots, &other.roots)
    }

    /// [`MeshCa::with_revocation_lists`] from a file (`ca.crl` of `peerbus ca revoke`, or
    /// the CRL another CA publishes, in PEM).
    pub fn with_revocation_list_file(&self, path: &Path) -> Result<MeshCa, CaError> {
        let pem = read_file_of_at_most(path, MAX_CRL_FILE)?;
        self.with_revocation_lists(&path.display().to_string(), &pem)
    }

    /// How many certificates the revocation lists taken revoke (a CA certificate renewed for
    /// the same key shares its list, counted once).
    pub fn revoked(&self) -> usize {
        self.roots
            .iter()
            .enumerate()
            .filter(|(i, r)| !self.roots[..*i].iter().any(|e| e.key == r.key))
            .map(|(_, r)| r.revoked.len())
            .sum()
    }

    /// Whether a revocation list taken names the serial number `serial` (hex, as
    /// [`NodeCert::serial`] shows it), for any of the CAs.
    pub fn revokes(&self, serial: &str) -> bool {
        parse_serial(serial).is_some_and(|s| self.roots.iter().any(|r| r.revoked.contains(&s)))
    }
}

/// A node's certificate, issued by the mesh CA for its node id. Cheap to clone.
#[derive(Clone)]
pub struct NodeCert {
    der: CertificateDer<'static>,
    node: NodeId,
    validity: Validity,
    serial: Serial,
    services: Vec<String>,
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
    /// Reads a node certificate file (written by `peerbus ca issue`, or by another CA from the
    /// node's [`certificate_request`]). A file that holds the chain, the node's certificate
    /// first, is read too: the certificates after the first are not used.
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
        if !p.v3 {
            return Err(bad(
                "is not an X.509 version 3 certificate, which TLS requires (a CA that signs \
                 without extensions makes version 1: with `openssl x509 -req`, add \
                 `-copy_extensions copy`)"
                    .into(),
            ));
        }
        Ok(NodeCert {
            der,
            node: NodeId::from_bytes(p.node_key().map_err(bad)?),
            validity: p.validity,
            serial: p.serial,
            services: p.services.map_err(bad)?,
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

    /// Its serial number, in hex (what a revocation list names).
    pub fn serial(&self) -> String {
        self.serial.to_string()
    }

    /// The services the certificate binds its node to (subject alternative names
    /// `peerbus:service:<name>`, [`SERVICE_URI`]; `peerbus ca issue --service`): a node
    /// that claims another service is refused by its peers. Empty when it names none: the
    /// node may run any service.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// Why the certificate does not let its node run `service` (it names services, and not
    /// that one); `None` when it does.
    pub fn refuses_service(&self, service: &str) -> Option<String> {
        (!self.services.is_empty() && !self.services.iter().any(|s| s == service)).then(|| {
            format!(
                "its mesh certificate binds it to service{} {}, not `{service}`",
                if self.services.len() == 1 { "" } else { "s" },
                self.services
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// The certificate, DER-encoded.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }
}

/// A certificate signing request (PKCS#10, PEM) for `identity`'s key, named after its node id,
/// for a CA of an existing PKI to sign (`peerbus ca request`): `openssl x509 -req`, Vault's
/// `pki/sign`, step-ca, cert-manager and the like. The certificate it gets back is a
/// [`NodeCert`] for this node; the CA's own certificate goes in the [`MeshCa`] file.
pub fn certificate_request(identity: &Identity) -> Result<String, CaError> {
    let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(identity.pkcs8()),
        &rcgen::PKCS_ED25519,
    )
    .map_err(sign)?;
    let mut params =
        rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_string()]).map_err(sign)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, identity.node_id().to_string());
    let request = params.serialize_request(&key).map_err(sign)?;
    request.pem().map_err(sign)
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

    /// Creates a CA in `dir` (made if missing): `ca.key`, the signing key (mode 0600),
    /// `ca.crt`, the certificate every node trusts, and `ca.crl`, its revocation list, empty
    /// (so that nodes can take it from the start: [`CaKey::revoke`] adds to it); those two
    /// are public (the umask's mode). Refuses to overwrite any of them.
    pub fn create(dir: &Path, name: &str) -> Result<CaKey, CaError> {
        let (key_path, cert_path) = (dir.join(CA_KEY_FILE), dir.join(CA_CERT_FILE));
        let crl_path = dir.join(CA_CRL_FILE);
        for path in [&key_path, &cert_path, &crl_path] {
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
        // The certificate and the list are public: every node gets a copy.
        write_new(&cert_path, ca.cert_pem.as_bytes()).map_err(io(&cert_path))?;
        let crl = ca.revoke(None, [])?;
        write_new(&crl_path, crl.as_bytes()).map_err(io(&crl_path))?;
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
        if !matches!(&p.key, PublicKey::Ed25519(k) if k[..] == *key.public_key_raw()) {
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
        self.issue_for_services(node, valid_for, &[])
    }

    /// [`CaKey::issue`] binding the certificate to `services` (none: any service): its node
    /// may run only one of them, and its peers refuse it when it claims another
    /// ([`NodeCert::services`]). Each name is a service name as nodes use them.
    pub fn issue_for_services(
        &self,
        node: &NodeId,
        valid_for: Duration,
        services: &[&str],
    ) -> Result<String, CaError> {
        if let Some(bad) = services.iter().find(|s| {
            s.is_empty() || s.len() > 255 || !s.is_ascii() || s.contains(char::is_whitespace)
        }) {
            return Err(CaError::Sign(format!(
                "`{bad}` is not a service name to bind a certificate to (1 to 255 ASCII \
                 characters, no spaces)"
            )));
        }
        if valid_for.is_zero() || valid_for > MAX_NODE_VALIDITY {
            return Err(CaError::Sign(format!(
                "a node certificate is valid for 1 s to {} days, not {} s",
                MAX_NODE_VALIDITY.as_secs() / 86_400,
                valid_for.as_secs()
            )));
        }
        let now = SystemTime::now();
        self.issue_between(node, now - BACKDATE, now + valid_for, services)
    }

    /// This CA's revocation list (PEM) revoking the certificates of `serials` (hex, as
    /// [`NodeCert::serial`] or `openssl x509 -serial` show them) as well as every one that
    /// `current`, this CA's list as written before (PEM), revokes; numbered one past it, and
    /// current for [`CRL_NEXT_UPDATE`]. The nodes take it as their `mesh_crl_file`
    /// (`--mesh-crl`). With no `serials` it renews `current`: the same certificates revoked,
    /// a new number and next update.
    pub fn revoke<'a>(
        &self,
        current: Option<&[u8]>,
        serials: impl IntoIterator<Item = &'a str>,
    ) -> Result<String, CaError> {
        self.revoke_until(current, serials, CRL_NEXT_UPDATE)
    }

    /// [`CaKey::revoke`] with a list whose next update is `current_for` from now (1 s to
    /// [`MAX_NODE_VALIDITY`]): a CA that publishes lists often promises the next one soon, so
    /// that a list left behind shows as late.
    pub fn revoke_until<'a>(
        &self,
        current: Option<&[u8]>,
        serials: impl IntoIterator<Item = &'a str>,
        current_for: Duration,
    ) -> Result<String, CaError> {
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        if current_for < Duration::from_secs(1) || current_for > MAX_NODE_VALIDITY {
            return Err(CaError::Sign(format!(
                "a revocation list's next update is 1 s to {} days ahead, not {} s",
                MAX_NODE_VALIDITY.as_secs() / 86_400,
                current_for.as_secs_f64()
            )));
        }
        let now = SystemTime::now();
        let (mut entries, number) = match current {
            Some(pem) => self.revoked_by(pem)?,
            None => (Vec::new(), 0),
        };
        for hex in serials {
            let serial = parse_serial(hex)
                .ok_or_else(|| CaError::Sign(format!("`{hex}` is not a serial number in hex")))?;
            if !entries.iter().any(|(s, _)| *s == serial) {
                entries.push((serial, offset_time(now)));
            }
        }
        if entries.len() > MAX_REVOKED {
            return Err(CaError::Sign(format!(
                "a revocation list names at most {MAX_REVOKED} certificates"
            )));
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: offset_time(now - BACKDATE),
            next_update: offset_time(now + current_for),
            crl_number: rcgen::SerialNumber::from(number.saturating_add(1)),
            issuing_distribution_point: None,
            revoked_certs: entries
                .into_iter()
                .map(|(serial, when)| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&serial.0),
                    revocation_time: when,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(sign)?;
        params
            .signed_by(&issuer)
            .and_then(|l| l.pem())
            .map_err(sign)
    }

    /// [`CaKey::revoke_until`] continuing this CA's list in the file `path`, when there is
    /// one (read up to the size a node reads); the new list, in PEM, is for the caller to
    /// write.
    pub fn revoke_continuing<'a>(
        &self,
        path: &Path,
        serials: impl IntoIterator<Item = &'a str>,
        current_for: Duration,
    ) -> Result<String, CaError> {
        let current = match read_file_of_at_most(path, MAX_CRL_FILE) {
            Ok(pem) => Some(pem),
            Err(CaError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        self.revoke_until(current.as_deref(), serials, current_for)
    }

    /// The entries of this CA's revocation list `pem` and its number; an error for a list
    /// that another key signed.
    fn revoked_by(
        &self,
        pem: &[u8],
    ) -> Result<(Vec<(Serial, time::OffsetDateTime)>, u64), CaError> {
        let bad = |reason: String| CaError::Malformed {
            what: "the current revocation list".into(),
            reason,
        };
        let der = CertificateRevocationListDer::from_pem_slice(pem)
            .map_err(|e| bad(format!("not PEM: {e}")))?;
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| bad(format!("does not parse: {e}")))?;
        let ours = PublicKey::Ed25519(
            self.key
                .public_key_raw()
                .try_into()
                .map_err(|_| bad("this CA's key is not ed25519".into()))?,
        );
        let signed = Signed::of(&crl.signature_algorithm.algorithm).is_ok_and(|how| {
            ours.verifies(how, crl.tbs_cert_list.as_ref(), &crl.signature_value.data)
        });
        if !signed {
            return Err(bad("is not this CA's".into()));
        }
        let number = crl.crl_number().map_or(0, |n| {
            n.to_bytes_be()
                .iter()
                .fold(0u64, |acc, b| acc.wrapping_shl(8) | u64::from(*b))
        });
        let entries = crl
            .iter_revoked_certificates()
            .map(|e| {
                let when = time::OffsetDateTime::from_unix_timestamp(e.revocation_date.timestamp())
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
                (Serial::of(e.raw_serial()), when)
            })
            .collect();
        Ok((entries, number))
    }

    /// Issues a certificate for `node` valid from `not_before` to `not_after`, in PEM.
    fn issue_between(
        &self,
        node: &NodeId,
        not_before: SystemTime,
        not_after: SystemTime,
        services: &[&str],
    ) -> Result<String, CaError> {
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(sign)?;
        let mut params =
            rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_string()]).map_err(sign)?;
        for service in services {
            let uri = format!("{SERVICE_URI}{service}").try_into().map_err(sign)?;
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
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
    fn a_certificate_bound_to_services_names_them_and_refuses_others() {
        let ca = CaKey::generate("test", DAY).expect("ca");
        let id = node();
        let pem = ca
            .issue_for_services(&id, DAY, &["payments", "refunds"])
            .expect("issue");
        let cert = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("node cert");
        assert_eq!(cert.services(), ["payments", "refunds"]);
        // The checked certificate a peer sees names them too.
        let checked = ca
            .trust()
            .expect("trust")
            .check(cert.der(), SystemTime::now());
        assert_eq!(checked.expect("valid").services(), ["payments", "refunds"]);
        assert_eq!(cert.refuses_service("refunds"), None);
        assert_eq!(
            cert.refuses_service("orders").as_deref(),
            Some("its mesh certificate binds it to services `payments`, `refunds`, not `orders`")
        );
        let any = NodeCert::from_pem("any.crt", ca.issue(&id, DAY).expect("issue").as_bytes())
            .expect("cert");
        assert!(any.services().is_empty());
        assert_eq!(any.refuses_service("orders"), None);
        for bad in ["", "two words"] {
            let err = ca.issue_for_services(&id, DAY, &[bad]).expect_err(bad);
            assert!(err.to_string().contains("is not a service name"), "{err}");
        }
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
            .issue_between(&node(), now - 2 * DAY, now - DAY, &[])
            .expect("issue");
        let cert = NodeCert::from_pem("x", expired.as_bytes()).expect("cert");
        let err = trust.check(cert.der(), now).expect_err("expired");
        assert!(err.contains("the certificate is expired at"), "{err}");
        let early = ca
            .issue_between(&node(), now + DAY, now + 2 * DAY, &[])
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
        // `create` writes the CA's revocation list too, empty, for nodes to take from the start.
        let listed = trust
            .with_revocation_list_file(&ca_dir.join(CA_CRL_FILE))
            .expect("the empty list");
        assert_eq!((listed.revoked(), checked(&listed, &cert)), (0, Ok(id)));

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

    /// A CA of another PKI: a self-signed CA certificate (PEM) for a key of `alg` (the given
    /// PKCS#8 key, or a new one), and the issuer that signs with it.
    fn external_ca(
        alg: &'static rcgen::SignatureAlgorithm,
        key_pem: Option<&str>,
    ) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = match key_pem {
            Some(pem) => rcgen::KeyPair::from_pem_and_sign_algo(pem, alg).expect("ca key"),
            None => rcgen::KeyPair::generate_for(alg).expect("ca key"),
        };
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Example Corp issuing CA");
        let cert = params.self_signed(&key).expect("ca cert");
        (cert.pem(), rcgen::Issuer::new(params, key))
    }

    /// `identity`'s certificate request, signed by `issuer` as another PKI would (PEM).
    fn sign_request(
        identity: &Identity,
        issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
    ) -> String {
        let csr = certificate_request(identity).expect("request");
        assert!(
            csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{csr}"
        );
        rcgen::CertificateSigningRequestParams::from_pem(&csr)
            .expect("the request parses and its signature holds")
            .signed_by(issuer)
            .expect("sign")
            .pem()
    }

    /// A revocation list (PEM) that `issuer` signs, valid for a day from now, revoking
    /// `certs`.
    fn list_revoking(
        issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
        certs: &[&NodeCert],
    ) -> String {
        let now = offset_time(SystemTime::now());
        rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: certs
                .iter()
                .map(|c| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(
                        &parse_serial(&c.serial()).expect("serial").0,
                    ),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(issuer)
        .expect("sign")
        .pem()
        .expect("pem")
    }

    const RSA_CA_KEY: &str = include_str!("../tests/data/rsa-ca.key");

    #[test]
    fn a_request_signed_by_an_ecdsa_rsa_or_ed25519_ca_makes_a_node_certificate() {
        let cas = [
            external_ca(&rcgen::PKCS_ECDSA_P256_SHA256, None),
            external_ca(&rcgen::PKCS_ECDSA_P384_SHA384, None),
            external_ca(&rcgen::PKCS_RSA_SHA256, Some(RSA_CA_KEY)),
            external_ca(&rcgen::PKCS_RSA_SHA512, Some(RSA_CA_KEY)),
            external_ca(&rcgen::PKCS_ED25519, None),
        ];
        for (n, (ca_pem, issuer)) in cas.iter().enumerate() {
            let identity = Identity::generate().expect("id");
            let pem = sign_request(&identity, issuer);
            let cert = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("node cert");
            assert_eq!(cert.node_id(), identity.node_id(), "CA {n}");
            let trust = MeshCa::from_pem("ca.crt", ca_pem.as_bytes()).expect("trust");
            assert_eq!(checked(&trust, &cert), Ok(identity.node_id()), "CA {n}");
            // Every other CA refuses it, whatever its key: the P-256 CA a P-384 one's
            // certificate, the RSA CA with SHA-256 the same key's certificate with SHA-512
            // (another certificate, so another subject and signature: still not its own).
            for (m, (other_pem, _)) in cas.iter().enumerate().filter(|(m, _)| *m != n) {
                let other = MeshCa::from_pem("other", other_pem.as_bytes()).expect("other");
                let verdict = checked(&other, &cert);
                if m / 2 == 1 && n / 2 == 1 {
                    // The two RSA CAs share their key: a signature of one is the other's.
                    assert_eq!(verdict, Ok(identity.node_id()), "CA {n} under {m}");
                } else {
                    let err = verdict.expect_err("another CA");
                    assert!(
                        err.contains("not signed by the mesh CA"),
                        "{n} under {m}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_ca_whose_key_or_signature_a_node_cannot_check_is_refused_clearly() {
        let p521 = include_str!("../tests/data/p521-ca.crt");
        let err = MeshCa::from_pem("p521.crt", p521.as_bytes()).expect_err("P-521");
        assert!(err.to_string().contains("an ECDSA key on curve"), "{err}");
        assert!(err.to_string().contains("P-256 or P-384"), "{err}");
        // A node certificate whose key is not ed25519 names no node.
        let (_, issuer) = external_ca(&rcgen::PKCS_ECDSA_P256_SHA256, None);
        let ecdsa_node = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("k");
        let params = rcgen::CertificateParams::new(vec!["peerbus".to_string()]).expect("params");
        let pem = params.signed_by(&ecdsa_node, &issuer).expect("sign").pem();
        let err = NodeCert::from_pem("node.crt", pem.as_bytes()).expect_err("not ed25519");
        assert!(err.to_string().contains("key is not ed25519"), "{err}");
        // `openssl x509 -req` without extensions signs a version 1 certificate, which TLS
        // refuses: the node says so when it reads the file, not with a TLS error at start.
        let v1 = include_str!("../tests/data/v1-node.crt");
        let err = NodeCert::from_pem("v1.crt", v1.as_bytes()).expect_err("version 1");
        assert!(err.to_string().contains("-copy_extensions copy"), "{err}");
    }

    /// Two CAs, valid for a day.
    fn two_cas() -> (CaKey, CaKey) {
        (
            CaKey::generate("a", DAY).expect("ca"),
            CaKey::generate("b", DAY).expect("other"),
        )
    }

    /// A certificate `ca` issued for a new node, for a day.
    fn issue(ca: &CaKey) -> NodeCert {
        let pem = ca.issue(&node(), DAY).expect("issue");
        NodeCert::from_pem("x", pem.as_bytes()).expect("cert")
    }

    #[test]
    fn a_newer_list_passed_on_replaces_the_one_held_and_an_older_one_does_not() {
        let (ca, other) = two_cas();
        let (a, b, c) = (issue(&ca), issue(&ca), issue(&other));
        let der = |pem: &str| {
            CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
                .expect("pem")
                .as_ref()
                .to_vec()
        };
        let first = ca.revoke(None, [a.serial().as_str()]).expect("first");
        let second = ca
            .revoke(Some(first.as_bytes()), [b.serial().as_str()])
            .expect("second");
        // Both CAs trusted; only `ca`'s first list taken from the file.
        let bundle = format!("{}{}", ca.certificate_pem(), other.certificate_pem());
        let trust = MeshCa::from_pem("bundle", bundle.as_bytes())
            .expect("bundle")
            .with_revocation_lists("ca.crl", first.as_bytes())
            .expect("list");
        assert_eq!(trust.revocation_lists(), vec![der(&first)]);

        // The same list, or an older one, changes nothing; the next one replaces it.
        assert!(
            trust
                .with_newer_revocation_list(&der(&first))
                .expect("same")
                .is_none()
        );
        let newer = trust
            .with_newer_revocation_list(&der(&second))
            .expect("checked")
            .expect("newer");
        assert!(newer.revokes(&a.serial()) && newer.revokes(&b.serial()));
        assert_eq!(newer.revoked(), 2);
        assert_eq!(newer.revocation_lists(), vec![der(&second)]);
        assert!(
            newer
                .with_newer_revocation_list(&der(&first))
                .expect("older")
                .is_none()
        );
        assert_eq!(
            checked(&newer, &c),
            Ok(c.node_id()),
            "the other CA's nodes stay"
        );

        // A first list for the other CA is taken beside it; both are passed on.
        let others = other.revoke(None, [c.serial().as_str()]).expect("other's");
        let both = newer
            .with_newer_revocation_list(&der(&others))
            .expect("checked")
            .expect("first of its CA");
        assert!(checked(&both, &c).is_err() && checked(&both, &a).is_err());
        assert_eq!(both.revocation_lists(), vec![der(&second), der(&others)]);
        // Status shows each CA's list: its number (`revoke` with no list before numbers 1),
        // its issue time and what it revokes.
        let info = both.revocation_list_info();
        let shown: Vec<(Option<&str>, usize)> = info
            .iter()
            .map(|l| (l.number.as_deref(), l.revoked))
            .collect();
        assert_eq!(shown, vec![(Some("2"), 2), (Some("1"), 1)]);
        assert_ne!(info[0].ca, info[1].ca);
        let now = u64::try_from(unix_secs(SystemTime::now())).expect("after 1970");
        assert!(
            info.iter()
                .all(|l| l.issued + 3_600 > now && l.issued <= now)
        );
        // `revoke` promises the next list in a year: not stale now, stale after it.
        let year = CRL_NEXT_UPDATE.as_secs();
        assert!(
            info.iter().all(|l| l
                .next_update
                .is_some_and(|next| next > now + year - 3_600 && next <= now + year)),
            "{info:?}"
        );
        assert!(
            info.iter()
                .all(|l| !l.stale_at(now) && l.stale_at(now + year))
        );
        // A list renewed for a minute (no more revoked, one number up) says so; a next
        // update out of bounds is refused.
        let minute = ca
            .revoke_until(Some(second.as_bytes()), [], Duration::from_secs(60))
            .expect("renewed");
        let renewed = newer
            .with_newer_revocation_list(&der(&minute))
            .expect("checked")
            .expect("newer");
        let info = renewed.revocation_list_info();
        assert_eq!((info[0].number.as_deref(), info[0].revoked), (Some("3"), 2));
        let next = info[0].next_update.expect("next update");
        assert!(next > now && next <= now + 61, "{info:?}");
        assert!(ca.revoke_until(None, [], Duration::ZERO).is_err());
        assert!(ca.revoke_until(None, [], MAX_NODE_VALIDITY + DAY).is_err());
        assert_eq!(crl_number_text(&[1, 0]), "256");
        assert_eq!(
            crl_number_text(&[0xab; 17]),
            format!("0x{}", "ab".repeat(17))
        );
        let pem = revocation_lists_pem(&both.revocation_lists());
        let again = MeshCa::from_pem("bundle", bundle.as_bytes())
            .expect("bundle")
            .with_revocation_lists("written", pem.as_bytes())
            .expect("the PEM written reads back");
        assert_eq!(again, both);

        // A list no trusted CA signed is refused, and says why.
        let stranger = CaKey::generate("c", DAY).expect("stranger");
        let foreign = stranger
            .revoke(None, [a.serial().as_str()])
            .expect("foreign");
        let err = trust
            .with_newer_revocation_list(&der(&foreign))
            .expect_err("a stranger's list");
        assert!(err.to_string().contains("not signed by a CA"), "{err}");
        assert!(trust.with_newer_revocation_list(b"junk").is_err());

        // A list read again from a file does not undo a newer one passed on.
        let reread = trust.keeping_newer_lists_of(&both);
        assert_eq!(reread, both);
        assert_eq!(both.keeping_newer_lists_of(&trust), both);
        let plain = MeshCa::from_pem("bundle", bundle.as_bytes()).expect("bundle");
        assert_eq!(plain.keeping_newer_lists_of(&both), both);
    }

    #[test]
    fn a_revoked_certificate_is_refused_and_the_others_still_accepted() {
        let (ca, other) = two_cas();
        let (a, b) = (issue(&ca), issue(&ca));
        let trust = ca.trust().expect("trust");
        let crl = ca.revoke(None, [a.serial().as_str()]).expect("revoke a");
        let revoking = trust
            .with_revocation_lists("ca.crl", crl.as_bytes())
            .expect("the CA's list");
        assert_eq!(revoking.revoked(), 1);
        assert_ne!(revoking, trust, "a list changes what is trusted");
        let err = checked(&revoking, &a).expect_err("revoked");
        assert!(
            err.contains(&format!("(serial {}) is revoked", a.serial())),
            "{err}"
        );
        assert_eq!(checked(&revoking, &b), Ok(b.node_id()));

        // The next list keeps what the last one revoked, and is numbered after it.
        let crl2 = ca
            .revoke(
                Some(crl.as_bytes()),
                [b.serial().as_str(), a.serial().as_str()],
            )
            .expect("revoke b");
        let both = trust
            .with_revocation_lists("ca.crl", crl2.as_bytes())
            .expect("the CA's list");
        assert_eq!(both.revoked(), 2);
        assert!(both.revokes(&a.serial()) && both.revokes(&b.serial()));
        assert!(!revoking.revokes(&b.serial()) && !revoking.revokes("not hex"));
        assert!(checked(&both, &a).is_err() && checked(&both, &b).is_err());
        let der = CertificateRevocationListDer::from_pem_slice(crl2.as_bytes()).expect("pem");
        let (_, parsed) = x509_parser::parse_x509_crl(der.as_ref()).expect("parse");
        assert_eq!(parsed.crl_number().map(|n| n.to_bytes_be()), Some(vec![2]));

        // Another CA's list is not taken, nor continued.
        let foreign = other
            .revoke(None, [a.serial().as_str()])
            .expect("foreign list");
        let err = trust
            .with_revocation_lists("other.crl", foreign.as_bytes())
            .expect_err("another CA's list");
        assert!(
            err.to_string()
                .contains("not signed by a CA of the mesh CA file"),
            "{err}"
        );
        let err = ca
            .revoke(Some(foreign.as_bytes()), [b.serial().as_str()])
            .expect_err("continuing another CA's list");
        assert!(err.to_string().contains("is not this CA's"), "{err}");
        assert!(ca.revoke(None, ["xyz"]).is_err());
        let err = trust
            .with_revocation_lists("empty", ca.certificate_pem().as_bytes())
            .expect_err("no list");
        assert!(
            err.to_string().contains("holds no PEM revocation list"),
            "{err}"
        );
        // A certificate of another CA in the same file is still judged by its own list.
        let bundle = format!("{}{}", ca.certificate_pem(), other.certificate_pem());
        let two = MeshCa::from_pem("bundle", bundle.as_bytes())
            .expect("bundle")
            .with_revocation_lists("lists", format!("{crl}{foreign}").as_bytes())
            .expect("one list per CA");
        let c = issue(&other);
        assert_eq!(checked(&two, &c), Ok(c.node_id()));
        assert!(checked(&two, &a).is_err());
    }

    #[test]
    fn another_pkis_revocation_list_revokes_its_certificates() {
        let (ca_pem, issuer) = external_ca(&rcgen::PKCS_ECDSA_P256_SHA256, None);
        let (identity, kept) = (
            Identity::generate().expect("id"),
            Identity::generate().expect("id"),
        );
        let cert = NodeCert::from_pem("n", sign_request(&identity, &issuer).as_bytes()).expect("c");
        let other = NodeCert::from_pem("k", sign_request(&kept, &issuer).as_bytes()).expect("c");
        let list = list_revoking(&issuer, &[&cert]);
        let trust = MeshCa::from_pem("ca", ca_pem.as_bytes())
            .expect("trust")
            .with_revocation_lists("corp.crl", list.as_bytes())
            .expect("the CA's list");
        let err = checked(&trust, &cert).expect_err("revoked");
        assert!(err.contains("is revoked by the mesh CA"), "{err}");
        assert_eq!(checked(&trust, &other), Ok(kept.node_id()));
    }

    #[test]
    fn serial_numbers_read_alike_however_written() {
        let s = |hex: &str| parse_serial(hex).map(|s| s.to_string());
        assert_eq!(s("00AB:cd"), Some("abcd".into()));
        assert_eq!(s("abc"), Some("0abc".into()));
        assert_eq!(s("0"), Some("0".into()));
        assert_eq!(Serial::of(&[0, 0, 0x80]), Serial::of(&[0x80]));
        assert_eq!(s(""), None);
        assert_eq!(s("0g"), None);
    }

    #[test]
    fn a_ca_certificate_renewed_for_the_same_key_counts_beside_the_old_one() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let now = SystemTime::now();
        let ca_cert = |from: SystemTime, to: SystemTime| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("p");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.not_before = offset_time(from);
            params.not_after = offset_time(to);
            let pem = params.self_signed(&key).expect("ca cert").pem();
            (pem, params)
        };
        let (old, _) = ca_cert(now - 3 * DAY, now - DAY);
        let (renewed, params) = ca_cert(now - DAY, now + DAY);
        let issuer = rcgen::Issuer::new(params, &key);
        let identity = Identity::generate().expect("id");
        let pem = sign_request(&identity, &issuer);
        let cert = NodeCert::from_pem("n", pem.as_bytes()).expect("cert");
        let list = list_revoking(&issuer, &[&cert]);
        for bundle in [format!("{old}{renewed}"), format!("{renewed}{old}")] {
            let trust = MeshCa::from_pem("bundle", bundle.as_bytes()).expect("bundle");
            assert_eq!(checked(&trust, &cert), Ok(identity.node_id()), "{bundle}");
            let revoking = trust
                .with_revocation_lists("list", list.as_bytes())
                .expect("the key's list");
            let err = checked(&revoking, &cert).expect_err("revoked under either certificate");
            assert!(err.contains("is revoked"), "{err}");
        }
        let only_old = MeshCa::from_pem("old", old.as_bytes()).expect("old");
        let err = checked(&only_old, &cert).expect_err("the old CA certificate expired");
        assert!(err.contains("the mesh CA certificate"), "{err}");
    }

    #[test]
    fn a_ca_whose_key_usage_forbids_signing_is_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let ca = |usages: Vec<rcgen::KeyUsagePurpose>| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("p");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = usages;
            (params.self_signed(&key).expect("ca cert").pem(), params)
        };
        let (signs_only_data, _) = ca(vec![rcgen::KeyUsagePurpose::DigitalSignature]);
        let err = MeshCa::from_pem("ca.crt", signs_only_data.as_bytes()).expect_err("usage");
        assert!(err.to_string().contains("keyCertSign"), "{err}");

        // A CA that may sign certificates but not lists: its certificates count, a list
        // signed with its key does not. (The list is signed through a CA description that
        // allows it: rcgen would refuse otherwise.)
        let (certs_only, _) = ca(vec![rcgen::KeyUsagePurpose::KeyCertSign]);
        let (_, both) = ca(vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ]);
        let issuer = rcgen::Issuer::new(both, &key);
        let identity = Identity::generate().expect("id");
        let pem = sign_request(&identity, &issuer);
        let cert = NodeCert::from_pem("n", pem.as_bytes()).expect("cert");
        let trust = MeshCa::from_pem("ca.crt", certs_only.as_bytes()).expect("trust");
        assert_eq!(checked(&trust, &cert), Ok(identity.node_id()));
        let list = list_revoking(&issuer, &[]);
        let err = trust
            .with_revocation_lists("ca.crl", list.as_bytes())
            .expect_err("a CA that may not sign lists");
        assert!(err.to_string().contains("cRLSign"), "{err}");
    }
}
