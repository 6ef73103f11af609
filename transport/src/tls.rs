//! TLS 1.3 configuration: self-signed ed25519 certificates on both sides,
//! verifiers that derive (and for the dialer, pin) the peer's node id.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme};

use crate::ALPN;
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
    let spki = &parsed.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err(TlsError::General(
            "peer certificate key is not ed25519".into(),
        ));
    }
    let raw: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| TlsError::General("peer ed25519 key is not 32 bytes".into()))?;
    Ok(NodeId::from_bytes(raw))
}

pub(crate) fn certificate(
    identity: &Identity,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
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
    Ok((cert.der().clone(), key))
}

#[derive(Debug)]
struct PeerVerifier {
    algs: WebPkiSupportedAlgorithms,
    expected: Option<NodeId>,
}

impl PeerVerifier {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), TlsError> {
        let id = node_id_of(end_entity)?;
        match self.expected {
            Some(e) if e != id => Err(TlsError::General(format!(
                "{}: expected node {e}, certificate is for {id}",
                WRONG_PEER
            ))),
            _ => Ok(()),
        }
    }
}

/// Marker in TLS errors raised for a pinned-id mismatch.
pub(crate) const WRONG_PEER: &str = "wrong peer";

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
        Err(TlsError::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
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
        Err(TlsError::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

pub(crate) fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, String> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        algs: provider.signature_verification_algorithms,
        expected: None,
    });
    let (cert, key) = certificate(identity)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

pub(crate) fn client_config(
    identity: &Identity,
    expected: Option<NodeId>,
) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        algs: provider.signature_verification_algorithms,
        expected,
    });
    let (cert, key) = certificate(identity)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}
