//! TLS 1.3 configuration: self-signed ed25519 certificates on both sides,
//! verifiers that derive (and for the dialer, pin) the peer's node id.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme};

use crate::ca::NodeCert;
use crate::identity::{Identity, NodeId};

/// The server name every dialer asks for; ignored by the verifiers (ids are pinned instead).
pub(crate) const SERVER_NAME: &str = "peerbus";

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node id a certificate proves: its ed25519 subject public key.
pub(crate) fn node_id_of(cert: &CertificateDer<'_>) -> Result<NodeId, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::General(format!("peer certificate does not parse: {e}")))?;
    ed25519_key(&parsed.tbs_certificate.subject_pki)
        .map(NodeId::from_bytes)
        .map_err(|why| TlsError::General(format!("peer {why}")))
}

/// A certificate's ed25519 subject public key (`spki`); the error completes "certificate …".
pub(crate) fn ed25519_key(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Result<[u8; 32], &'static str> {
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err("certificate key is not ed25519");
    }
    spki.subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| "certificate ed25519 key is not 32 bytes")
}

/// A node's self-signed certificate and its key, made once per endpoint.
pub(crate) struct Certified {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    /// When a mesh CA's certificate ends (`None` for a self-signed one: it never matters).
    pub(crate) not_after: Option<SystemTime>,
    /// The services a mesh CA's certificate binds the node to ([`NodeCert::services`]; empty
    /// for a self-signed one, and for one bound to none).
    pub(crate) services: Vec<String>,
    /// A mesh CA's certificate's serial number, as [`NodeCert::serial`] writes it (`None`
    /// for a self-signed one).
    pub(crate) serial: Option<String>,
}

impl Certified {
    pub(crate) fn chain(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (vec![self.cert.clone()], self.key.clone_key())
    }
}

/// A self-signed certificate for the identity's ed25519 key. The verifiers ignore everything
/// in it but the subject public key.
pub(crate) fn certificate(identity: &Identity) -> Result<Certified, String> {
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(identity.pkcs8()),
        &rcgen::PKCS_ED25519,
    )
    .map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, identity.node_id().to_string());
    let cert = params.self_signed(&kp).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.pkcs8().to_vec()));
    Ok(Certified {
        cert: cert.der().clone(),
        key,
        not_after: None,
        services: Vec::new(),
        serial: None,
    })
}

/// The identity's key with the certificate the mesh CA issued for it (which must be for the
/// same key: [`Endpoint::bind`](crate::Endpoint::bind) checks).
pub(crate) fn issued(identity: &Identity, cert: &NodeCert) -> Certified {
    Certified {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.pkcs8().to_vec())),
        not_after: Some(cert.not_after()),
        services: cert.services().to_vec(),
        serial: Some(cert.serial()),
    }
}

/// Accepts any ed25519 certificate (the key *is* the identity), checks the handshake
/// signature against it, and on the dialer pins the expected node id. Whether a mesh CA signed
/// it is checked after the handshake, with the mesh proof, so that a refusal carries a reason.
#[derive(Debug)]
struct PeerVerifier {
    algs: WebPkiSupportedAlgorithms,
    expected: Option<NodeId>,
    /// The id the peer's certificate proved, recorded even when it is the wrong one so that
    /// the dialer can report [`crate::ConnectError::WrongPeer`].
    seen: Arc<OnceLock<NodeId>>,
}

impl PeerVerifier {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), TlsError> {
        let id = node_id_of(end_entity)?;
        let _ = self.seen.set(id);
        match self.expected {
            Some(e) if e != id => Err(TlsError::General(format!(
                "wrong peer: expected node {e}, certificate is for {id}"
            ))),
            _ => Ok(()),
        }
    }
}

impl PeerVerifier {
    /// The TLS 1.3 handshake signature check both verifier roles share.
    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

/// Both roles refuse TLS 1.2 (the configs never offer it; this is the belt to those braces).
fn tls12_refused() -> TlsError {
    TlsError::General("TLS 1.2 is not supported".into())
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The listener's TLS config: TLS 1.3 only, the given ALPN ids (most preferred first), client
/// certificates mandatory.
pub(crate) fn server_config(
    certified: &Certified,
    alpn: &[Vec<u8>],
) -> Result<rustls::ServerConfig, String> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        algs: provider.signature_verification_algorithms,
        expected: None,
        seen: Arc::default(),
    });
    let (cert, key) = certified.chain();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = alpn.to_vec();
    Ok(cfg)
}

/// A dialer's TLS config for one connection attempt, and the slot where its verifier records
/// the id the listener's certificate proved.
pub(crate) fn client_config(
    certified: &Certified,
    expected: Option<NodeId>,
    alpn: &[Vec<u8>],
) -> Result<(rustls::ClientConfig, Arc<OnceLock<NodeId>>), String> {
    let provider = provider();
    let seen = Arc::<OnceLock<NodeId>>::default();
    let verifier = Arc::new(PeerVerifier {
        algs: provider.signature_verification_algorithms,
        expected,
        seen: seen.clone(),
    });
    let (cert, key) = certified.chain();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = alpn.to_vec();
    Ok((cfg, seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_proves_the_identity() {
        let id = Identity::generate().expect("identity");
        let c = certificate(&id).expect("certificate");
        assert_eq!(node_id_of(&c.cert).expect("ed25519"), id.node_id());
    }

    #[test]
    fn non_ed25519_and_garbage_certificates_are_refused() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.into()]).expect("params");
        let cert = params.self_signed(&kp).expect("self-signed");
        let err = node_id_of(cert.der()).expect_err("p256 refused");
        assert!(err.to_string().contains("not ed25519"), "{err}");
        assert!(node_id_of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
        assert!(node_id_of(&CertificateDer::from(Vec::new())).is_err());
    }

    #[test]
    fn pinning_records_the_real_id() {
        let id = Identity::generate().expect("identity");
        let c = certificate(&id).expect("certificate");
        let other = NodeId::from_bytes([9; 32]);
        let v = PeerVerifier {
            algs: provider().signature_verification_algorithms,
            expected: Some(other),
            seen: Arc::default(),
        };
        assert!(v.check(&c.cert).is_err());
        assert_eq!(v.seen.get().copied(), Some(id.node_id()));
    }
}
