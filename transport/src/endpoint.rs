//! The QUIC endpoint, connections, and the mesh proof run right after the
//! TLS handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tracing::warn;

use crate::error::{AcceptError, BindError, CloseCode, ConnectError, ConnectionError};
use crate::frame::{FrameReceiver, FrameSender};
use crate::identity::{Identity, NodeId};
use crate::membership::{EXPORTER_LABEL, Membership};
use crate::tls;
use crate::{DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_FRAME_SIZE};

/// How long the mesh proof exchange may take after the TLS handshake.
const PROOF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a dial (TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent streams a peer may open, per kind (control + lanes need a handful).
const MAX_STREAMS: u32 = 256;
/// Flow-control window per stream.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Flow-control window per connection.
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// Endpoint settings.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// This node's key pair.
    pub identity: Identity,
    /// Mesh key or open mesh.
    pub membership: Membership,
    /// UDP address to bind (tests and demos: `127.0.0.1:0`).
    pub listen: SocketAddr,
    /// Largest frame accepted. Default [`DEFAULT_MAX_FRAME_SIZE`].
    pub max_frame_size: usize,
    /// QUIC keep-alive interval. Default [`DEFAULT_KEEP_ALIVE`].
    pub keep_alive: Duration,
    /// Idle timeout after which a silent peer is dead. Default [`DEFAULT_IDLE_TIMEOUT`]; keep it
    /// a few times the keep-alive or healthy connections will drop.
    pub idle_timeout: Duration,
}

impl EndpointConfig {
    /// Settings with the defaults above.
    pub fn new(identity: Identity, membership: Membership, listen: SocketAddr) -> Self {
        Self {
            identity,
            membership,
            listen,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

struct Inner {
    quinn: quinn::Endpoint,
    config: EndpointConfig,
    transport: Arc<TransportConfig>,
}

/// A bound QUIC endpoint: dials and accepts peer connections. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.node_id())
            .field("addr", &self.local_addr())
            .finish()
    }
}

fn transport_config(cfg: &EndpointConfig) -> Result<TransportConfig, BindError> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(cfg.idle_timeout).map_err(|e| BindError::Tls(e.to_string()))?,
    ));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(MAX_STREAMS));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    Ok(t)
}

impl Endpoint {
    /// Binds the UDP socket and prepares TLS. Needs a tokio runtime.
    pub fn bind(config: EndpointConfig) -> Result<Endpoint, BindError> {
        let transport = Arc::new(transport_config(&config)?);
        let tls = tls::server_config(&config.identity).map_err(BindError::Tls)?;
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| BindError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport.clone());
        let quinn = quinn::Endpoint::server(server, config.listen).map_err(|e| BindError::Io {
            addr: config.listen,
            source: e,
        })?;
        Ok(Endpoint {
            inner: Arc::new(Inner {
                quinn,
                config,
                transport,
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .quinn
            .local_addr()
            .unwrap_or(self.inner.config.listen)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.config.identity.node_id()
    }

    /// Dials `addr`: TLS handshake (pinning `expected` when given), then the mesh proof.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Connection, ConnectError> {
        let tls =
            tls::client_config(&self.inner.config.identity, expected).map_err(ConnectError::Tls)?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| ConnectError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(self.inner.transport.clone());
        let connecting = self
            .inner
            .quinn
            .connect_with(client, addr, tls::SERVER_NAME)
            .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
        let quinn_conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => return Err(ConnectError::TimedOut),
            Ok(Err(e)) => return Err(connect_error(e, expected)),
            Ok(Ok(c)) => c,
        };
        let peer = peer_id(&quinn_conn).map_err(ConnectError::Tls)?;
        let conn = Connection {
            inner: quinn_conn,
            peer,
            dialer: true,
            max_frame: self.inner.config.max_frame_size,
        };
        match tokio::time::timeout(PROOF_TIMEOUT, self.prove(&conn)).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                conn.close(CloseCode::MeshProofFailed, "mesh proof timed out");
                Err(ConnectError::TimedOut)
            }
        }
    }

    /// The dialer's side of the mesh proof.
    async fn prove(&self, conn: &Connection) -> Result<(), ConnectError> {
        let me = self.node_id();
        let (dialer, listener) = (me, conn.peer);
        let ekm = ekm(&conn.inner, &dialer, &listener).map_err(ConnectError::Other)?;
        let (mut send, mut recv) = conn.inner.open_bi().await.map_err(|e| refused(e.into()))?;
        let ours = self.proof_bytes(0, &dialer, &listener, &ekm);
        send.write_all(&ours)
            .await
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        let mut theirs = [0u8; 33];
        if let Err(e) = recv.read_exact(&mut theirs).await {
            // The listener closes the connection when our proof fails: report its reason.
            return Err(match e {
                quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
                    refused(c.into())
                }
                other => match conn.inner.close_reason() {
                    Some(r) => refused(r.into()),
                    None => ConnectError::Other(format!("mesh proof exchange failed: {other}")),
                },
            });
        }
        if let Err(why) = self.check_proof(1, &dialer, &listener, &ekm, &theirs) {
            warn!(addr = %conn.remote_addr(), peer = %conn.peer, %why, "refusing peer: mesh proof failed");
            conn.close(CloseCode::MeshProofFailed, &why);
            return Err(ConnectError::Refused {
                code: CloseCode::MeshProofFailed,
                reason: why,
            });
        }
        let _ = send.finish();
        Ok(())
    }

    fn proof_bytes(&self, role: u8, dialer: &NodeId, listener: &NodeId, ekm: &[u8]) -> [u8; 33] {
        let mut out = [0u8; 33];
        if let Membership::Key(k) = &self.inner.config.membership {
            out[0] = 1;
            out[1..].copy_from_slice(k.proof(role, dialer, listener, ekm).as_ref());
        }
        out
    }

    fn check_proof(
        &self,
        role: u8,
        dialer: &NodeId,
        listener: &NodeId,
        ekm: &[u8],
        got: &[u8; 33],
    ) -> Result<(), String> {
        match &self.inner.config.membership {
            Membership::InsecureOpen => Ok(()),
            Membership::Key(k) => {
                if got[0] != 1 {
                    Err("the peer has no mesh key".into())
                } else if k.verify(role, dialer, listener, ekm, &got[1..]) {
                    Ok(())
                } else {
                    Err("the peer proved a different mesh key".into())
                }
            }
        }
    }

    /// The next incoming connection attempt; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Incoming> {
        let incoming = self.inner.quinn.accept().await?;
        Some(Incoming {
            incoming,
            endpoint: self.clone(),
        })
    }

    /// Closes every connection with [`CloseCode::Shutdown`] and waits (at most 1 s) for the
    /// close to reach peers.
    pub async fn close(&self) {
        self.inner.quinn.close(
            VarInt::from_u32(CloseCode::Shutdown as u32),
            b"node shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.quinn.wait_idle()).await;
    }
}

/// A connection attempt from a peer, not yet handshaken.
pub struct Incoming {
    incoming: quinn::Incoming,
    endpoint: Endpoint,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("remote", &self.remote_addr())
            .finish()
    }
}

impl Incoming {
    /// Where it comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// TLS handshake, then the mesh proof. A failed proof closes the connection with
    /// [`CloseCode::MeshProofFailed`] and is logged with the address and claimed node id.
    pub async fn complete(self) -> Result<Connection, AcceptError> {
        let addr = self.remote_addr();
        let failed = |reason: String| AcceptError::Failed { addr, reason };
        let quinn_conn = match tokio::time::timeout(CONNECT_TIMEOUT, async {
            self.incoming
                .accept()
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        })
        .await
        {
            Err(_) => return Err(failed("handshake timed out".into())),
            Ok(Err(e)) => return Err(failed(e)),
            Ok(Ok(c)) => c,
        };
        let peer = peer_id(&quinn_conn).map_err(failed)?;
        let conn = Connection {
            inner: quinn_conn,
            peer,
            dialer: false,
            max_frame: self.endpoint.inner.config.max_frame_size,
        };
        let ep = &self.endpoint;
        let proof = async {
            let (dialer, listener) = (peer, ep.node_id());
            let ekm = ekm(&conn.inner, &dialer, &listener)?;
            let (mut send, mut recv) = conn.inner.accept_bi().await.map_err(|e| e.to_string())?;
            let mut theirs = [0u8; 33];
            recv.read_exact(&mut theirs)
                .await
                .map_err(|e| e.to_string())?;
            if let Err(why) = ep.check_proof(0, &dialer, &listener, &ekm, &theirs) {
                return Err(format!("{MESH}{why}"));
            }
            let ours = ep.proof_bytes(1, &dialer, &listener, &ekm);
            send.write_all(&ours).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            Ok(())
        };
        match tokio::time::timeout(PROOF_TIMEOUT, proof).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) if e.starts_with(MESH) => {
                let reason = e.trim_start_matches(MESH).to_string();
                warn!(%addr, claimed = %peer, %reason, "refusing peer: mesh proof failed");
                conn.close(CloseCode::MeshProofFailed, &reason);
                Err(AcceptError::MeshProofFailed {
                    addr,
                    claimed: peer,
                    reason,
                })
            }
            Ok(Err(e)) => {
                conn.close(CloseCode::ProtocolViolation, "mesh proof exchange failed");
                Err(failed(format!("mesh proof exchange failed: {e}")))
            }
            Err(_) => {
                conn.close(CloseCode::MeshProofFailed, "mesh proof timed out");
                Err(failed("mesh proof timed out".into()))
            }
        }
    }
}

const MESH: &str = "mesh:";

fn ekm(conn: &quinn::Connection, dialer: &NodeId, listener: &NodeId) -> Result<[u8; 32], String> {
    let mut ctx = Vec::with_capacity(64);
    ctx.extend_from_slice(dialer.as_bytes());
    ctx.extend_from_slice(listener.as_bytes());
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, &ctx)
        .map_err(|_| "TLS keying material export failed".to_string())?;
    Ok(out)
}

fn peer_id(conn: &quinn::Connection) -> Result<NodeId, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let first = certs
        .first()
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    tls::node_id_of(first).map_err(|e| e.to_string())
}

fn refused(e: ConnectionError) -> ConnectError {
    match e {
        ConnectionError::ClosedByPeer { code, reason } => ConnectError::Refused { code, reason },
        ConnectionError::TimedOut => ConnectError::TimedOut,
        other => ConnectError::Other(other.to_string()),
    }
}

fn connect_error(e: quinn::ConnectionError, expected: Option<NodeId>) -> ConnectError {
    let text = e.to_string();
    match e {
        quinn::ConnectionError::TimedOut => {
            ConnectError::Unreachable("no answer (timed out)".into())
        }
        quinn::ConnectionError::ApplicationClosed(_) => refused(e.into()),
        _ if text.contains(tls::WRONG_PEER) => match (expected, parse_actual(&text)) {
            (Some(expected), Some(actual)) => ConnectError::WrongPeer { expected, actual },
            _ => ConnectError::Tls(text),
        },
        _ => ConnectError::Tls(text),
    }
}

fn parse_actual(text: &str) -> Option<NodeId> {
    let tail = text.split("certificate is for ").nth(1)?;
    tail.split(|c: char| !c.is_ascii_alphanumeric())
        .next()?
        .parse()
        .ok()
}

/// An established, mesh-proven connection to a peer. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    inner: quinn::Connection,
    peer: NodeId,
    dialer: bool,
    max_frame: usize,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("addr", &self.remote_addr())
            .field("dialer", &self.dialer)
            .finish()
    }
}

impl Connection {
    /// The peer's node id (proven by its certificate).
    pub fn peer_id(&self) -> NodeId {
        self.peer
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Whether this side dialed.
    pub fn is_dialer(&self) -> bool {
        self.dialer
    }

    /// An id unique among this endpoint's connections.
    pub fn stable_id(&self) -> usize {
        self.inner.stable_id()
    }

    /// Current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(FrameSender, FrameReceiver), ConnectionError> {
        let (s, r) = self.inner.open_bi().await?;
        Ok((
            FrameSender::new(s, self.max_frame),
            FrameReceiver::new(r, self.max_frame, self.clone()),
        ))
    }

    /// Accepts the peer's next bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(FrameSender, FrameReceiver), ConnectionError> {
        let (s, r) = self.inner.accept_bi().await?;
        Ok((
            FrameSender::new(s, self.max_frame),
            FrameReceiver::new(r, self.max_frame, self.clone()),
        ))
    }

    /// Opens a unidirectional stream.
    pub async fn open_uni(&self) -> Result<FrameSender, ConnectionError> {
        Ok(FrameSender::new(
            self.inner.open_uni().await?,
            self.max_frame,
        ))
    }

    /// Accepts the peer's next unidirectional stream.
    pub async fn accept_uni(&self) -> Result<FrameReceiver, ConnectionError> {
        let r = self.inner.accept_uni().await?;
        Ok(FrameReceiver::new(r, self.max_frame, self.clone()))
    }

    /// Closes the connection with a code and reason the peer will see.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.inner
            .close(VarInt::from_u32(code as u32), reason.as_bytes());
    }

    /// Resolves when the connection is closed, with why.
    pub async fn closed(&self) -> ConnectionError {
        self.inner.closed().await.into()
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.inner.close_reason().map(Into::into)
    }
}
