//! The QUIC endpoint, connections, and the mesh proof run right after the
//! TLS handshake.
//!
//! Invariant: a [`Connection`] exists only after the TLS handshake *and* the mesh proof
//! succeeded, so no application stream can carry anything before membership is proven.
//! The proof stream is the first bidirectional stream the dialer opens.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, Runtime, TransportConfig, VarInt};
use tracing::warn;

use crate::ca::{MeshCa, NodeCert, RevocationListInfo};
use crate::error::{AcceptError, BindError, CloseCode, ConnectError, ConnectionError};
use crate::fault::{self, Faults};
use crate::frame::{FrameReceiver, FrameSender};
use crate::identity::{Identity, NodeId};
use crate::membership::{EXPORTER_LABEL, MAX_MESH_KEYS, Membership, MeshKey};
use crate::tls;
use crate::{
    ALPN, DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_FRAME_SIZE, MAX_ALPN_PROTOCOLS,
};

/// How long the mesh proof exchange may take after the TLS handshake.
const PROOF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a dial or an accept (TLS handshake) may take. The idle timeout usually ends a
/// silent handshake first.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Endpoint::close`] waits for the close frames to leave.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long quinn keeps a connection whose handshake did not complete (given up, failed or
/// timed out): closed, for three probe timeouts, which without a round-trip sample start from
/// quinn's initial estimate (333 ms): 3 × (333 + 4 × 167) ms, about 3 s; a little more here.
/// [`Endpoint::close`] does not wait for those.
const HALF_OPEN_LINGER: Duration = Duration::from_millis(3_500);
/// Most handshakes [`Endpoint::close`] remembers as given up (the oldest are forgotten first):
/// a node dials and probes a few peers at a time, so this is never reached in practice.
const MAX_HALF_OPEN: usize = 1024;
/// How often [`Endpoint::close`] looks at the connections quinn still keeps.
const CLOSE_POLL: Duration = Duration::from_millis(5);
/// Concurrent streams a peer may open, per kind. A node uses one control stream plus a
/// handful of lanes; 256 leaves room without letting a peer hold unbounded state.
const MAX_STREAMS: u32 = 256;
/// Flow-control window per stream (8 MiB): one lane can keep a LAN link busy by itself.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Flow-control window per connection (32 MiB), in both directions. This bounds the memory a
/// peer can make us buffer.
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Size of one mesh proof message: a tag byte and 32 bytes.
const PROOF_LEN: usize = 33;
/// First byte of a proof message: a mesh key's HMAC follows.
const PROOF_KEY: u8 = 1;
/// First byte of a proof message: the handshake's certificate is the proof (a mesh CA).
/// Nodes before the mesh CA read it as "no key", and refuse it when they have one.
const PROOF_CA: u8 = 2;

/// Endpoint settings. Build with [`EndpointConfig::new`], then adjust fields.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// This node's key pair; its public key is the node id peers see.
    pub identity: Identity,
    /// Mesh key or open mesh. A keyed endpoint refuses every peer that cannot prove the same
    /// key, including open ones.
    pub membership: Membership,
    /// UDP address to bind (tests and demos: `127.0.0.1:0`, which picks a free port).
    pub listen: SocketAddr,
    /// Largest frame sent or accepted, in bytes. Default [`DEFAULT_MAX_FRAME_SIZE`] (8 MiB).
    /// A peer sending a larger frame is disconnected; set it equal on all nodes, and below
    /// 64 MiB (bincode's allocation limit).
    pub max_frame_size: usize,
    /// QUIC keep-alive interval. Default [`DEFAULT_KEEP_ALIVE`] (500 ms). Must be well below
    /// `idle_timeout` or idle but healthy connections drop.
    pub keep_alive: Duration,
    /// A peer silent for this long (not even keep-alives) is dead. Default
    /// [`DEFAULT_IDLE_TIMEOUT`] (3 s), so a dead peer is noticed within about 3 s. QUIC uses
    /// the smaller of both sides' values. Keep it a few times `keep_alive`; larger values
    /// notice dead peers later, smaller ones drop connections over short hiccups.
    pub idle_timeout: Duration,
    /// Fault injection (tests, chaos runs): when set, the endpoint's UDP socket loses,
    /// delays, duplicates and reorders datagrams and honours partitions as the handle says,
    /// changeable at run time. Default `None`: the plain socket, no cost.
    pub faults: Option<Faults>,
    /// ALPN protocol ids this endpoint offers when it dials and accepts when it listens, most
    /// preferred first (at most [`MAX_ALPN_PROTOCOLS`], none empty). Default `[ALPN]`. A
    /// connection uses the first of the listener's ids that the dialer offers
    /// ([`Connection::alpn`]); with none in common the TLS handshake fails. The node offers
    /// one id per wire generation, so a new build still speaks to an old one.
    pub alpn: Vec<Vec<u8>>,
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
            faults: None,
            alpn: vec![ALPN.to_vec()],
        }
    }
}

/// The certificate an endpoint presents and the CA certificates it trusts, behind one lock so
/// that a renewal checks one against the other and swaps it in one step.
struct Presented {
    /// The certificate and key presented in handshakes (replaced by
    /// [`Endpoint::renew_certificate`]).
    certified: Arc<tls::Certified>,
    /// The CA certificates a peer's must be signed by, with a mesh CA (replaced by
    /// [`Endpoint::renew_trust`]); `None` otherwise.
    trust: Option<MeshCa>,
    /// Why `certified` is revoked, once a peer's refusal or a revocation list of its CA said
    /// so ([`Endpoint::own_certificate_revoked`]). Cleared when another certificate is
    /// presented.
    revoked: Option<String>,
    /// With a mesh key: the key this endpoint proves, then the others a peer may prove
    /// (replaced by [`Endpoint::renew_keys`]); empty otherwise.
    keys: Vec<MeshKey>,
}

struct Inner {
    quinn: quinn::Endpoint,
    config: EndpointConfig,
    transport: Arc<TransportConfig>,
    /// What this endpoint presents and trusts now. `config.membership` keeps what it was
    /// bound with; the renewals change this.
    presented: RwLock<Presented>,
    /// Bumped by [`Endpoint::renew_trust`], so that live connections are checked again
    /// ([`Connection::trust_changes`]).
    trust_changed: tokio::sync::watch::Sender<u64>,
    /// Set by [`Endpoint::close`], so that connections report why they closed.
    closing: Arc<AtomicBool>,
    /// Connections this endpoint closed, by code ([`Endpoint::local_closes`]).
    closes: Arc<CloseTally>,
    /// The handshakes that never completed, see [`HalfOpen`].
    half_open: HalfOpen,
    /// The UDP socket's receive buffer, see [`ReceiveBuffer`].
    rx_buffer: ReceiveBuffer,
}

/// The endpoint's UDP socket (a second handle to it), to enlarge its receive buffer for a
/// while ([`Endpoint::widen_receive_buffer`]). The kernel's default (208 KiB on Linux, about
/// a hundred full datagrams) stays the rest of the time: a deeper queue in front of a busy
/// receiver lengthened round trips and slowed 64 B sends by a fifth or more (ARCHITECTURE,
/// "Liveness and reconnects").
#[derive(Debug)]
struct ReceiveBuffer {
    socket: socket2::Socket,
    /// What to set `SO_RCVBUF` to for the size the socket had when bound: Linux reads back
    /// twice what was set (it books each datagram's overhead), other systems what was set.
    default: usize,
    /// Counts the widenings, so that only the last one's timer narrows the buffer again.
    widened: AtomicU64,
}

/// The connections quinn keeps that never completed a handshake: those in one now, and when
/// each given-up, failed or timed-out one ended (at most [`MAX_HALF_OPEN`], each for
/// [`HALF_OPEN_LINGER`]). [`Endpoint::close`] waits for the other connections only: it waited
/// for every connection quinn kept, so a node that shut down within about 3 s of losing a
/// dial tie-break, or of a stall probe, waited its whole [`CLOSE_GRACE`], for connections
/// whose peer has nothing to be told.
#[derive(Debug, Default)]
struct HalfOpen {
    handshaking: AtomicUsize,
    ended: std::sync::Mutex<std::collections::VecDeque<std::time::Instant>>,
}

impl HalfOpen {
    fn ended(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<std::time::Instant>> {
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A handshake ended without completing: quinn keeps its connection a while.
    fn gave_up(&self) {
        let mut ended = self.ended();
        if ended.len() >= MAX_HALF_OPEN {
            ended.pop_front();
        }
        ended.push_back(std::time::Instant::now());
    }

    /// How many connections quinn may keep that never completed a handshake.
    fn count(&self) -> usize {
        let mut ended = self.ended();
        while ended
            .front()
            .is_some_and(|t| t.elapsed() >= HALF_OPEN_LINGER)
        {
            ended.pop_front();
        }
        ended.len() + self.handshaking.load(Ordering::Relaxed)
    }
}

/// A handshake under way; dropped without [`Handshake::completed`] (given up, failed, timed
/// out), it is remembered as ended.
struct Handshake<'a> {
    half_open: &'a HalfOpen,
    completed: bool,
}

impl<'a> Handshake<'a> {
    fn start(half_open: &'a HalfOpen) -> Self {
        half_open.handshaking.fetch_add(1, Ordering::Relaxed);
        Handshake {
            half_open,
            completed: false,
        }
    }

    fn completed(mut self) {
        self.completed = true;
    }
}

impl Drop for Handshake<'_> {
    fn drop(&mut self) {
        self.half_open.handshaking.fetch_sub(1, Ordering::Relaxed);
        if !self.completed {
            self.half_open.gave_up();
        }
    }
}

/// How many connections an endpoint closed itself, by close code: a malformed frame, a
/// protocol violation or a failed mesh proof from a peer each count once here, so an
/// operator can see a misbehaving (or mismatched) peer without reading logs. Closes the
/// endpoint's own shutdown makes without a code are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseCounts {
    by_code: [u64; CloseCode::ALL.len()],
    revoked: u64,
    retired: u64,
}

impl CloseCounts {
    /// Connections closed with `code`.
    pub fn get(&self, code: CloseCode) -> u64 {
        self.by_code[code.index()]
    }

    /// Of the connections closed with [`CloseCode::MeshProofFailed`], those that refused (or
    /// cut off) a peer whose certificate the mesh CA revoked ([`says_revoked`] of the
    /// reason): a revoked node that keeps dialling, not a peer that breaks the protocol.
    ///
    /// [`says_revoked`]: crate::says_revoked
    pub fn revoked_certificates(&self) -> u64 {
        self.revoked
    }

    /// The name under which [`CloseCounts::by_cause`] counts the refusals of a revoked
    /// certificate.
    pub const REVOKED_CERTIFICATE: &'static str = "revoked_certificate";

    /// Of the connections closed with [`CloseCode::MeshProofFailed`], the live ones whose
    /// peer had proved a mesh key this endpoint no longer accepts ([`Endpoint::renew_keys`]
    /// dropped it: the last step of a key rotation): a peer that proves the new key
    /// connects again at once, one that knows only the old key cannot.
    pub fn retired_keys(&self) -> u64 {
        self.retired
    }

    /// The name under which [`CloseCounts::by_cause`] counts the closes of connections whose
    /// peer proved a retired mesh key.
    pub const RETIRED_MESH_KEY: &'static str = "retired_mesh_key";

    /// Every code's name with its count, zeros included, in [`CloseCode::ALL`] order, except
    /// that `mesh_proof_failed` leaves out the refusals of a revoked certificate and the
    /// closes for a retired mesh key, which come last as
    /// [`CloseCounts::REVOKED_CERTIFICATE`] and [`CloseCounts::RETIRED_MESH_KEY`]: a revoked
    /// node that keeps dialling, and the connections a key rotation ended, apart from a
    /// peer that breaks the protocol.
    pub fn by_cause(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.iter()
            .map(|(code, n)| match code {
                CloseCode::MeshProofFailed => {
                    (code.name(), n.saturating_sub(self.revoked + self.retired))
                }
                _ => (code.name(), n),
            })
            .chain([
                (Self::REVOKED_CERTIFICATE, self.revoked),
                (Self::RETIRED_MESH_KEY, self.retired),
            ])
    }

    /// Every code with its count, zeros included, in [`CloseCode::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (CloseCode, u64)> + '_ {
        CloseCode::ALL.iter().map(|c| (*c, self.get(*c)))
    }
}

/// The running tally behind [`CloseCounts`], shared by an endpoint and its connections.
#[derive(Debug, Default)]
struct CloseTally {
    by_code: [AtomicU64; CloseCode::ALL.len()],
    revoked: AtomicU64,
    retired: AtomicU64,
}

impl CloseTally {
    fn count(&self, code: CloseCode, reason: &str) {
        self.by_code[code.index()].fetch_add(1, Ordering::Relaxed);
        if code == CloseCode::MeshProofFailed {
            if crate::ca::says_revoked(reason) {
                self.revoked.fetch_add(1, Ordering::Relaxed);
            } else if reason.starts_with(RETIRED_KEY) {
                self.retired.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> CloseCounts {
        CloseCounts {
            by_code: std::array::from_fn(|i| self.by_code[i].load(Ordering::Relaxed)),
            revoked: self.revoked.load(Ordering::Relaxed),
            retired: self.retired.load(Ordering::Relaxed),
        }
    }
}

/// How [`Endpoint::recheck`]'s reason begins for a live connection whose peer proved a mesh
/// key that [`Endpoint::renew_keys`] dropped (counted as
/// [`CloseCounts::RETIRED_MESH_KEY`]).
pub const RETIRED_KEY: &str = "the mesh key the peer proved is no longer accepted";

/// What a peer proved its membership with.
enum Proved {
    /// A certificate of the mesh CA, as checked.
    Certificate(NodeCert),
    /// One of the mesh keys this endpoint accepted then.
    Key(MeshKey),
    /// Nothing: an open mesh.
    Open,
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
    if cfg.keep_alive.is_zero() || cfg.keep_alive >= cfg.idle_timeout {
        return Err(BindError::Config(format!(
            "keep_alive ({:?}) must be non-zero and below idle_timeout ({:?})",
            cfg.keep_alive, cfg.idle_timeout
        )));
    }
    let idle = IdleTimeout::try_from(cfg.idle_timeout).map_err(|_| {
        BindError::Config(format!(
            "idle_timeout {:?} is too large for QUIC",
            cfg.idle_timeout
        ))
    })?;
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.max_idle_timeout(Some(idle));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(MAX_STREAMS));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    // peerbus sends no datagrams; do not buffer any a peer sends.
    t.datagram_receive_buffer_size(None);
    Ok(t)
}

/// Refuses an ALPN list TLS could not offer: none, too many, or an empty or over-long id.
fn check_alpn(alpn: &[Vec<u8>]) -> Result<(), String> {
    if alpn.is_empty() || alpn.len() > MAX_ALPN_PROTOCOLS {
        return Err(format!(
            "alpn must list 1 to {MAX_ALPN_PROTOCOLS} protocol ids, not {}",
            alpn.len()
        ));
    }
    // TLS carries each id with a one-byte length.
    if let Some(bad) = alpn.iter().find(|id| id.is_empty() || id.len() > 255) {
        return Err(format!(
            "an alpn protocol id must be 1 to 255 bytes, not {}",
            bad.len()
        ));
    }
    Ok(())
}

/// The certificate a mesh CA issued, with the identity's key, once checked: issued for this
/// node, by one of the CAs it trusts, and valid now.
fn ca_certified(
    identity: &Identity,
    ca: &MeshCa,
    cert: &NodeCert,
) -> Result<tls::Certified, BindError> {
    let ours = identity.node_id();
    if cert.node_id() != ours {
        return Err(BindError::Config(format!(
            "the mesh certificate was issued for node {}, not for this node ({ours}); issue one \
             with `peerbus ca issue --node-id {ours}`",
            cert.node_id()
        )));
    }
    ca.check(cert.der().as_ref(), SystemTime::now())
        .map_err(|why| {
            BindError::Config(format!("this node's mesh certificate is refused: {why}"))
        })?;
    Ok(tls::issued(identity, cert))
}

/// What [`Endpoint::take_revocation_list`] did with a revocation list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListTaken {
    /// It was newer than the list held for its CA: trusted from now on, and live connections
    /// are checked again.
    Taken,
    /// The list held for its CA is as new (this very list, most often) or newer.
    NotNewer,
    /// It revokes this node's own certificate (why, as the check says it), so it was not
    /// taken.
    RevokesThisNode(String),
}

/// The error of a mesh CA call on an endpoint without one.
fn no_mesh_ca() -> BindError {
    BindError::Config("this endpoint proves membership with no mesh CA certificate".into())
}

/// The listener's QUIC config for a certificate.
fn server_config(
    certified: &tls::Certified,
    alpn: &[Vec<u8>],
    transport: &Arc<TransportConfig>,
) -> Result<quinn::ServerConfig, BindError> {
    let tls = tls::server_config(certified, alpn).map_err(BindError::Tls)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| BindError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport.clone());
    Ok(server)
}

impl Endpoint {
    /// Binds the UDP socket and prepares TLS. Needs a tokio runtime.
    pub fn bind(config: EndpointConfig) -> Result<Endpoint, BindError> {
        let transport = Arc::new(transport_config(&config)?);
        let keys: Vec<MeshKey> = config.membership.accepted().cloned().collect();
        let (certified, trust) = match &config.membership {
            Membership::Ca { ca, cert } => {
                (ca_certified(&config.identity, ca, cert)?, Some(ca.clone()))
            }
            _ => (
                tls::certificate(&config.identity).map_err(BindError::Tls)?,
                None,
            ),
        };
        check_alpn(&config.alpn).map_err(BindError::Config)?;
        let server = server_config(&certified, &config.alpn, &transport)?;
        let io = |error| BindError::Io {
            addr: config.listen,
            error,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(io)?;
        let rx_socket = socket2::Socket::from(socket.try_clone().map_err(io)?);
        let bound = rx_socket.recv_buffer_size().map_err(io)?;
        let rx_buffer = ReceiveBuffer {
            default: if cfg!(target_os = "linux") {
                bound / 2
            } else {
                bound
            },
            socket: rx_socket,
            widened: AtomicU64::new(0),
        };
        let socket = match &config.faults {
            None => quinn::TokioRuntime.wrap_udp_socket(socket),
            Some(faults) => fault::wrap(socket, faults.clone()),
        }
        .map_err(io)?;
        let quinn = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(io)?;
        Ok(Endpoint {
            inner: Arc::new(Inner {
                quinn,
                config,
                transport,
                presented: RwLock::new(Presented {
                    certified: Arc::new(certified),
                    trust,
                    revoked: None,
                    keys,
                }),
                trust_changed: tokio::sync::watch::Sender::new(0),
                closing: Arc::default(),
                closes: Arc::default(),
                half_open: HalfOpen::default(),
                rx_buffer,
            }),
        })
    }

    /// Presents `cert` from now on, in place of the mesh certificate this endpoint was bound
    /// with (a mesh CA, [`Membership::Ca`]): a renewed certificate, read again while the node
    /// runs. Handshakes already made keep the old one; a peer closes those when the old one
    /// expires, and the node connects again with the new one.
    ///
    /// Errors ([`BindError::Config`]) when the endpoint has no mesh CA, or the certificate is
    /// for another node, not from a trusted CA, or not valid now; the old one stays.
    pub fn renew_certificate(&self, cert: &NodeCert) -> Result<(), BindError> {
        let mut presented = self.presented_mut();
        let ca = presented.trust.as_ref().ok_or_else(no_mesh_ca)?;
        let certified = ca_certified(&self.inner.config.identity, ca, cert)?;
        let server = server_config(&certified, &self.inner.config.alpn, &self.inner.transport)?;
        self.inner.quinn.set_server_config(Some(server));
        presented.certified = Arc::new(certified);
        presented.revoked = None;
        Ok(())
    }

    /// Proves `keys[0]` and accepts a peer that proves any of `keys` from now on, in place of
    /// the mesh keys this endpoint was bound with or last given (a key rotation without a
    /// restart: the steps of [`Membership::Rotating`], each taken in place). Only for an
    /// endpoint bound with a mesh key; 1 to [`MAX_MESH_KEYS`] keys. Live connections whose
    /// peer proved a key still accepted stay; [`Connection::trust_changes`] tells the holders
    /// of the others ([`Endpoint::recheck`]) that their peer proved a key no longer accepted
    /// (the rotation's last step drops the old key: whoever was admitted by it alone, a
    /// holder of a leaked key say, is cut off, and a peer that proves the new key connects
    /// again). Refused, the keys in use kept, when `keys` holds one key twice.
    pub fn renew_keys(&self, keys: Vec<MeshKey>) -> Result<(), BindError> {
        if self.inner.config.membership.own_key().is_none() {
            return Err(BindError::Config(
                "this endpoint proves membership with no mesh key".into(),
            ));
        }
        // The count first: the look for a key given twice is quadratic.
        if keys.is_empty() || keys.len() > MAX_MESH_KEYS {
            return Err(BindError::Config(format!(
                "{} mesh keys: a node takes 1 to {MAX_MESH_KEYS}",
                keys.len()
            )));
        }
        if let Some(n) = (1..keys.len()).find(|&n| keys[..n].contains(&keys[n])) {
            return Err(BindError::Config(format!(
                "mesh key {} is given twice (as key {})",
                keys[n].fingerprint(),
                n + 1
            )));
        }
        self.presented_mut().keys = keys;
        self.inner.trust_changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The mesh keys this endpoint proves (the first) and accepts now; empty without a mesh
    /// key.
    pub fn mesh_keys(&self) -> Vec<MeshKey> {
        self.presented().keys.clone()
    }

    /// Why the mesh certificate this endpoint presents is revoked, when, since it was
    /// presented, a revocation list of its CA said so (one a peer passed on,
    /// [`ListTaken::RevokesThisNode`], or one of a CA file read again,
    /// [`Endpoint::renew_trust`]; neither is taken) or a peer refused it as revoked (the
    /// refusal's reason names its serial number; a revoked node most often learns it so: its
    /// peers refuse it before they pass lists on). Peers that know refuse this node until it
    /// presents a new certificate ([`Endpoint::renew_certificate`], which clears this).
    /// `None` otherwise, and without a mesh CA.
    pub fn own_certificate_revoked(&self) -> Option<String> {
        self.presented().revoked.clone()
    }

    /// Trusts `ca` from now on, in place of the CA certificates this endpoint was bound with
    /// (a mesh CA, [`Membership::Ca`]): while the mesh CA is replaced, a file with both CAs'
    /// certificates, then the new one's alone. New handshakes are checked against it, and
    /// [`Connection::trust_changes`] tells the holders of live connections to check those
    /// again ([`Endpoint::recheck`]).
    ///
    /// Errors ([`BindError::Config`]) when the endpoint has no mesh CA, or `ca` does not
    /// accept its own certificate (not signed by a CA of `ca`: issue it one from the new CA
    /// first, the mesh would refuse it; or revoked by `ca`'s revocation lists); the old trust
    /// stays.
    ///
    /// Where the trust in use holds a newer revocation list for a CA of `ca` (one a peer
    /// passed on, [`Endpoint::take_revocation_list`]), that list stays.
    pub fn renew_trust(&self, ca: MeshCa) -> Result<(), BindError> {
        let presented = self.presented_mut();
        let Some(held) = presented.trust.as_ref() else {
            return Err(no_mesh_ca());
        };
        let ca = ca.keeping_newer_lists_of(held);
        self.swap_trust(presented, ca).map_err(|why| {
            BindError::Config(format!(
                "the new mesh CA file or its revocation lists do not accept this node's own \
                 certificate ({why}); the trust in use stays"
            ))
        })
    }

    /// Trusts `ca` from now on if it accepts this node's own certificate, and tells the
    /// holders of live connections to check those again; why not otherwise (the trust in use
    /// stays).
    fn swap_trust(
        &self,
        mut presented: std::sync::RwLockWriteGuard<'_, Presented>,
        ca: MeshCa,
    ) -> Result<(), String> {
        if let Err(why) = ca.check(presented.certified.chain().0[0].as_ref(), SystemTime::now()) {
            if crate::ca::says_revoked(&why) {
                presented.revoked = Some(why.clone());
            }
            return Err(why);
        }
        presented.trust = Some(ca);
        drop(presented);
        self.inner.trust_changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Takes `der`, a revocation list a peer passed on, in place of the one held for its CA
    /// when it is newer ([`MeshCa::with_newer_revocation_list`]); live connections are then
    /// checked again, as after [`Endpoint::renew_trust`]. A list that revokes this node's own
    /// certificate is not taken ([`ListTaken::RevokesThisNode`]): the peers that take it
    /// refuse this node anyway.
    ///
    /// Errors ([`BindError::Config`]) without a mesh CA, or when the list is not one of a
    /// trusted CA's.
    pub fn take_revocation_list(&self, der: &[u8]) -> Result<ListTaken, BindError> {
        // Checked outside the lock (a list of many entries takes a while to read), then taken
        // if the trust did not change meanwhile; a file read again at that moment makes it
        // try again, at most three times in all.
        for _ in 0..3 {
            let held = self.trust().ok_or_else(no_mesh_ca)?;
            let Some(ca) = held
                .with_newer_revocation_list(der)
                .map_err(|e| BindError::Config(e.to_string()))?
            else {
                return Ok(ListTaken::NotNewer);
            };
            let presented = self.presented_mut();
            if !presented.trust.as_ref().is_some_and(|t| t.is_same(&held)) {
                continue;
            }
            return Ok(match self.swap_trust(presented, ca) {
                Ok(()) => ListTaken::Taken,
                Err(why) => ListTaken::RevokesThisNode(why),
            });
        }
        Err(BindError::Config(
            "the mesh CA trust kept changing while a revocation list was checked".into(),
        ))
    }

    /// The revocation lists (DER) of the mesh CA trusted now, one per CA key: what this node
    /// passes on to its peers. Empty without a mesh CA or lists.
    pub fn revocation_lists(&self) -> Vec<Vec<u8>> {
        self.with_trust(MeshCa::revocation_lists)
            .unwrap_or_default()
    }

    /// Checks a live connection's peer again against the CA certificates trusted now: when
    /// its membership ends ([`Connection::membership_expires`] for the trust of now), or why
    /// it is no longer a member. With mesh keys, whether the key the peer proved is still
    /// one of [`Endpoint::mesh_keys`] (`Ok(None)`), or why not (starting with
    /// [`RETIRED_KEY`]). `Ok(None)` in an open mesh.
    pub fn recheck(&self, conn: &Connection) -> Result<Option<SystemTime>, String> {
        if let Some(key) = conn.proved_key.as_deref() {
            return if self.presented().keys.contains(key) {
                Ok(None)
            } else {
                Err(format!(
                    "{RETIRED_KEY}: this node's key file (or `renew_keys`) dropped it"
                ))
            };
        }
        let Some(ca) = self.trust() else {
            return Ok(None);
        };
        let cert = peer_certificate(&conn.inner)?;
        ca.check(cert.as_ref(), SystemTime::now())
            .map(|c| Some(c.not_after()))
            .map_err(|why| format!("the peer's mesh certificate is no longer accepted: {why}"))
    }

    /// The CA certificates trusted now, with a mesh CA.
    fn trust(&self) -> Option<MeshCa> {
        self.with_trust(MeshCa::clone)
    }

    /// `f` of the CA certificates trusted now, with a mesh CA (read under the lock).
    fn with_trust<T>(&self, f: impl FnOnce(&MeshCa) -> T) -> Option<T> {
        self.presented().trust.as_ref().map(f)
    }

    /// How many certificates the revocation lists of the mesh CA trusted now revoke
    /// ([`MeshCa::with_revocation_lists`]); `None` with a mesh key or an open mesh.
    pub fn revoked_certificates(&self) -> Option<usize> {
        self.with_trust(MeshCa::revoked)
    }

    /// What the revocation lists of the mesh CA trusted now are
    /// ([`MeshCa::revocation_list_info`]); empty without a mesh CA or lists.
    pub fn revocation_list_info(&self) -> Vec<RevocationListInfo> {
        self.with_trust(MeshCa::revocation_list_info)
            .unwrap_or_default()
    }

    /// When the mesh certificate this endpoint presents now ends (a mesh CA, after
    /// [`Endpoint::renew_certificate`] the new one's); `None` with a mesh key or an open mesh.
    pub fn certificate_expires(&self) -> Option<SystemTime> {
        self.certified().not_after
    }

    /// The services the mesh certificate this endpoint presents now binds it to
    /// ([`NodeCert::services`]; empty: any); `None` with a mesh key or an open mesh.
    pub fn certificate_services(&self) -> Option<Vec<String>> {
        let certified = self.certified();
        certified.not_after.map(|_| certified.services.clone())
    }

    /// The certificate and key handshakes present now.
    fn certified(&self) -> Arc<tls::Certified> {
        self.presented().certified.clone()
    }

    fn presented(&self) -> std::sync::RwLockReadGuard<'_, Presented> {
        self.inner
            .presented
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn presented_mut(&self) -> std::sync::RwLockWriteGuard<'_, Presented> {
        self.inner
            .presented
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets the UDP socket's receive buffer hold up to `bytes` (the kernel caps it at
    /// `net.core.rmem_max`) for `period`, then the default again. For a node that has just
    /// run again after a pause: its buffer is full of what its peers sent meanwhile, and the
    /// replies to its reconnects would be dropped until it has read that backlog, and wait
    /// for QUIC's initial probe timeout (a second). Needs a tokio runtime.
    pub fn widen_receive_buffer(&self, bytes: usize, period: Duration) {
        let rx = &self.inner.rx_buffer;
        let widening = rx.widened.fetch_add(1, Ordering::AcqRel) + 1;
        if let Err(e) = rx.socket.set_recv_buffer_size(bytes) {
            warn!(error = %e, "could not enlarge the UDP receive buffer");
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            tokio::time::sleep(period).await;
            let Some(inner) = inner.upgrade() else { return };
            let rx = &inner.rx_buffer;
            if rx.widened.load(Ordering::Acquire) == widening {
                let _ = rx.socket.set_recv_buffer_size(rx.default);
            }
        });
    }

    /// The UDP socket's receive buffer size now, as the kernel reports it.
    pub fn receive_buffer(&self) -> std::io::Result<usize> {
        self.inner.rx_buffer.socket.recv_buffer_size()
    }

    /// The bound address (with the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .quinn
            .local_addr()
            .unwrap_or(self.inner.config.listen)
    }

    /// How many connections this endpoint closed since it was bound, by close code.
    pub fn local_closes(&self) -> CloseCounts {
        self.inner.closes.snapshot()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.config.identity.node_id()
    }

    /// Dials `addr`: TLS handshake (pinning `expected` when given), then the mesh proof.
    ///
    /// Errors: [`ConnectError::WrongPeer`] when the certificate is for another node than
    /// `expected`; [`ConnectError::Refused`] when the peer closed us with a [`CloseCode`]
    /// (for example [`CloseCode::MeshProofFailed`]: the meshes' keys differ), or when we
    /// refused the peer's proof; [`ConnectError::Unreachable`] when nothing answered.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Connection, ConnectError> {
        let result = self.dial(addr, expected).await;
        if let Err(ConnectError::Refused { code, reason }) = &result {
            self.note_refusal(*code, reason);
        }
        result
    }

    /// Notes a refusal of this endpoint's own certificate as revoked (the peer's reason
    /// names its serial number): [`Endpoint::own_certificate_revoked`] says so from then on.
    /// The peer's word alone, but a peer that says so refuses this node all the same.
    fn note_refusal(&self, code: CloseCode, reason: &str) {
        if code != CloseCode::MeshProofFailed || !crate::ca::says_revoked(reason) {
            return;
        }
        let mut presented = self.presented_mut();
        let ours = presented.certified.serial.as_deref();
        if ours.is_some_and(|serial| crate::ca::says_serial_revoked(reason, serial)) {
            presented.revoked = Some(reason.to_string());
        }
    }

    /// [`Endpoint::connect`] without noting a refusal.
    async fn dial(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Connection, ConnectError> {
        let certified = self.certified();
        let (tls, seen) = tls::client_config(&certified, expected, &self.inner.config.alpn)
            .map_err(ConnectError::Tls)?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| ConnectError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(self.inner.transport.clone());
        let connecting = self
            .inner
            .quinn
            .connect_with(client, addr, tls::SERVER_NAME)
            .map_err(|e| ConnectError::Unreachable(format!("cannot dial {addr}: {e}")))?;
        let handshake = Handshake::start(&self.inner.half_open);
        let quinn_conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Err(_) => return Err(ConnectError::TimedOut),
            Ok(Err(e)) => {
                // A pinned-id mismatch fails inside the verifier; it recorded the real id.
                if let (Some(expected), Some(actual)) = (expected, seen.get().copied())
                    && actual != expected
                {
                    return Err(ConnectError::WrongPeer { expected, actual });
                }
                return Err(connect_error(e, addr));
            }
            Ok(Ok(c)) => c,
        };
        handshake.completed();
        let peer = peer_id(&quinn_conn).map_err(ConnectError::Tls)?;
        let conn = Connection::new(quinn_conn, peer, true, self);
        match tokio::time::timeout(PROOF_TIMEOUT, self.prove(&conn)).await {
            Ok(Ok(proved)) => Ok(conn.with_membership(proved)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                conn.close(CloseCode::Unresponsive, "mesh proof timed out");
                Err(ConnectError::TimedOut)
            }
        }
    }

    /// The dialer's side of the mesh proof: send ours, check theirs, then finish the stream,
    /// which tells the listener that we accept it. Returns what the listener proved.
    async fn prove(&self, conn: &Connection) -> Result<Proved, ConnectError> {
        let (dialer, listener) = (self.node_id(), conn.peer);
        let ekm = ekm(&conn.inner, &dialer, &listener).map_err(ConnectError::Other)?;
        let lost = |e: quinn::ConnectionError| refused(conn.convert(e));
        let (mut send, mut recv) = conn.inner.open_bi().await.map_err(lost)?;
        let ours = self.proof_bytes(0, &dialer, &listener, &ekm);
        send.write_all(&ours).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => lost(c),
            other => ConnectError::Other(format!("mesh proof exchange failed: {other}")),
        })?;
        let mut theirs = [0u8; PROOF_LEN];
        recv.read_exact(&mut theirs).await.map_err(|e| match e {
            // The listener closes the connection when our proof fails: report its reason.
            quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => lost(c),
            other => match conn.inner.close_reason() {
                Some(c) => lost(c),
                None => ConnectError::Other(format!("mesh proof exchange failed: {other}")),
            },
        })?;
        let proved = match self.check_proof(1, &dialer, &listener, &ekm, &theirs, &conn.inner) {
            Ok(proved) => proved,
            Err(why) => {
                warn!(addr = %conn.remote_addr(), claimed = %conn.peer, reason = %why,
                    "refusing peer: mesh proof failed");
                conn.close(CloseCode::MeshProofFailed, &why);
                return Err(ConnectError::Refused {
                    code: CloseCode::MeshProofFailed,
                    reason: why,
                });
            }
        };
        send.finish()
            .map_err(|e| ConnectError::Other(format!("mesh proof exchange failed: {e}")))?;
        Ok(proved)
    }

    /// Our proof message for `role` (0 dialer, 1 listener): `[1][HMAC]` with a mesh key,
    /// `[2][zeros]` with a mesh CA certificate, `[0][zeros]` in an open mesh.
    fn proof_bytes(
        &self,
        role: u8,
        dialer: &NodeId,
        listener: &NodeId,
        ekm: &[u8],
    ) -> [u8; PROOF_LEN] {
        let mut out = [0u8; PROOF_LEN];
        if let Some(k) = self.presented().keys.first() {
            out[0] = PROOF_KEY;
            out[1..].copy_from_slice(k.proof(role, dialer, listener, ekm).as_ref());
        } else if let Membership::Ca { .. } = self.inner.config.membership {
            // The certificate in the handshake is the proof; the marker names it.
            out[0] = PROOF_CA;
        }
        out
    }

    /// Checks the peer's proof message: `Some(expiry)` of its certificate with a mesh CA. The
    /// error is the reason sent in the close frame, worded so that it reads right on both
    /// sides.
    fn check_proof(
        &self,
        role: u8,
        dialer: &NodeId,
        listener: &NodeId,
        ekm: &[u8],
        got: &[u8; PROOF_LEN],
        conn: &quinn::Connection,
    ) -> Result<Proved, String> {
        let who = if role == 0 { "dialer" } else { "listener" };
        let other = if role == 0 { "listener" } else { "dialer" };
        let membership = &self.inner.config.membership;
        if let Some(ca) = self.trust() {
            return match got[0] {
                PROOF_CA => {
                    let cert = peer_certificate(conn)?;
                    let peer = if role == 0 { dialer } else { listener };
                    match ca.check(cert.as_ref(), SystemTime::now()) {
                        Ok(c) if c.node_id() == *peer => Ok(Proved::Certificate(c)),
                        Ok(c) => Err(format!(
                            "the {who}'s certificate is for node {}",
                            c.node_id()
                        )),
                        Err(why) => Err(format!(
                            "the {other} refuses the {who}'s mesh certificate: {why}"
                        )),
                    }
                }
                PROOF_KEY => Err(format!(
                    "the {who} proves a mesh key but the {other} requires a certificate from \
                     its mesh CA"
                )),
                _ => Err(format!(
                    "the {who} has no mesh certificate but the {other} requires one from its \
                     mesh CA"
                )),
            };
        }
        if matches!(membership, Membership::InsecureOpen) {
            Ok(Proved::Open)
        } else if got[0] == PROOF_CA {
            Err(format!(
                "the {who} proves a mesh CA certificate but the {other} requires a mesh key"
            ))
        } else if got[0] != PROOF_KEY {
            Err(format!(
                "the {who} has no mesh key but the {other} requires one"
            ))
        } else if let Some(key) = self
            .presented()
            .keys
            .iter()
            .find(|k| k.verify(role, dialer, listener, ekm, &got[1..]))
        {
            Ok(Proved::Key(key.clone()))
        } else {
            Err(format!("the {who}'s mesh key differs from the {other}'s"))
        }
    }

    /// The next incoming connection attempt; `None` once the endpoint is closed.
    /// Dropping the [`Incoming`] refuses the attempt.
    pub async fn accept(&self) -> Option<Incoming> {
        let incoming = self.inner.quinn.accept().await?;
        Some(Incoming {
            incoming,
            endpoint: self.clone(),
        })
    }

    /// Closes every connection with [`CloseCode::Shutdown`], stops accepting, and waits (at
    /// most 1 s) for the close to reach peers: until quinn keeps no connection but those that
    /// never completed a handshake (a dial given up, failed or timed out: quinn keeps those
    /// about 3 s, and their peers have nothing to be told).
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        self.inner.quinn.close(
            VarInt::from_u32(CloseCode::Shutdown as u32),
            b"node shutting down",
        );
        let settled = async {
            while !self.close_settled() {
                tokio::time::sleep(CLOSE_POLL).await;
            }
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, settled).await;
    }

    /// Whether quinn keeps no connection but those that never completed a handshake.
    fn close_settled(&self) -> bool {
        self.inner.quinn.open_connections() <= self.inner.half_open.count()
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

/// Why the listener's side of the proof did not complete.
enum ProofFailure {
    /// The dialer proved no key or another key.
    Mismatch(String),
    /// The connection ended (for example the dialer refused our proof).
    Lost(ConnectionError),
    /// The dialer broke the exchange (wrong stream use, extra bytes).
    Protocol(String),
}

impl Incoming {
    /// Where it comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// TLS handshake, then the mesh proof. A failed proof closes the connection with
    /// [`CloseCode::MeshProofFailed`] and is logged (warn) with the address and the claimed
    /// node id. Completes only once the dialer has accepted our proof too.
    pub async fn complete(self) -> Result<Connection, AcceptError> {
        let endpoint = self.endpoint.clone();
        let result = self.answer().await;
        if let Err(AcceptError::Refused { code, reason, .. }) = &result {
            endpoint.note_refusal(*code, reason);
        }
        result
    }

    /// [`Incoming::complete`] without noting a refusal.
    async fn answer(self) -> Result<Connection, AcceptError> {
        let addr = self.remote_addr();
        let failed = |reason: String| AcceptError::Failed { addr, reason };
        let handshake = async {
            self.incoming
                .accept()
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| ConnectionError::from(e).to_string())
        };
        let half_open = Handshake::start(&self.endpoint.inner.half_open);
        let quinn_conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Err(_) => return Err(failed("TLS handshake timed out".into())),
            Ok(Err(e)) => return Err(failed(format!("TLS handshake failed: {e}"))),
            Ok(Ok(c)) => c,
        };
        half_open.completed();
        let peer = peer_id(&quinn_conn).map_err(failed)?;
        let ep = &self.endpoint;
        let conn = Connection::new(quinn_conn, peer, false, ep);
        match tokio::time::timeout(PROOF_TIMEOUT, ep.answer_proof(&conn)).await {
            Ok(Ok(proved)) => Ok(conn.with_membership(proved)),
            Ok(Err(ProofFailure::Mismatch(reason))) => {
                warn!(%addr, claimed = %peer, %reason, "refusing peer: mesh proof failed");
                conn.close(CloseCode::MeshProofFailed, &reason);
                Err(AcceptError::MeshProofFailed {
                    addr,
                    claimed: peer,
                    reason,
                })
            }
            Ok(Err(ProofFailure::Lost(ConnectionError::ClosedByPeer { code, reason }))) => {
                Err(AcceptError::Refused { addr, code, reason })
            }
            Ok(Err(ProofFailure::Lost(e))) => Err(failed(format!("during the mesh proof: {e}"))),
            Ok(Err(ProofFailure::Protocol(e))) => {
                conn.close(CloseCode::ProtocolViolation, "mesh proof exchange failed");
                Err(failed(format!("mesh proof exchange failed: {e}")))
            }
            Err(_) => {
                conn.close(CloseCode::Unresponsive, "mesh proof timed out");
                Err(failed("mesh proof timed out".into()))
            }
        }
    }
}

impl Endpoint {
    /// The listener's side of the mesh proof: check the dialer's, send ours, then wait for the
    /// dialer to finish its stream (its acceptance of our proof).
    async fn answer_proof(&self, conn: &Connection) -> Result<Proved, ProofFailure> {
        let (dialer, listener) = (conn.peer, self.node_id());
        let lost = |e: quinn::ConnectionError| ProofFailure::Lost(conn.convert(e));
        let read_err = |e: quinn::ReadError| match e {
            quinn::ReadError::ConnectionLost(c) => lost(c),
            other => ProofFailure::Protocol(other.to_string()),
        };
        let ekm = ekm(&conn.inner, &dialer, &listener).map_err(ProofFailure::Protocol)?;
        let (mut send, mut recv) = conn.inner.accept_bi().await.map_err(lost)?;
        let mut theirs = [0u8; PROOF_LEN];
        recv.read_exact(&mut theirs).await.map_err(|e| match e {
            quinn::ReadExactError::ReadError(e) => read_err(e),
            quinn::ReadExactError::FinishedEarly(n) => {
                ProofFailure::Protocol(format!("proof stream ended after {n} bytes"))
            }
        })?;
        let proved = self
            .check_proof(0, &dialer, &listener, &ekm, &theirs, &conn.inner)
            .map_err(ProofFailure::Mismatch)?;
        let ours = self.proof_bytes(1, &dialer, &listener, &ekm);
        send.write_all(&ours).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => lost(c),
            other => ProofFailure::Protocol(other.to_string()),
        })?;
        let _ = send.finish();
        recv.read_to_end(0).await.map_err(|e| match e {
            quinn::ReadToEndError::Read(e) => read_err(e),
            quinn::ReadToEndError::TooLong => {
                ProofFailure::Protocol("extra bytes after the mesh proof".into())
            }
        })?;
        Ok(proved)
    }
}

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
    tls::node_id_of(&peer_certificate(conn)?).map_err(|e| e.to_string())
}

/// The certificate the peer presented in the handshake.
fn peer_certificate(
    conn: &quinn::Connection,
) -> Result<rustls::pki_types::CertificateDer<'static>, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    certs
        .into_iter()
        .next()
        .ok_or_else(|| "peer presented no certificate".to_string())
}

/// A dial that failed after the handshake, by the connection's end.
fn refused(e: ConnectionError) -> ConnectError {
    match e {
        ConnectionError::ClosedByPeer { code, reason } => ConnectError::Refused { code, reason },
        ConnectionError::TimedOut => ConnectError::TimedOut,
        other => ConnectError::Other(other.to_string()),
    }
}

/// A dial whose handshake failed.
fn connect_error(e: quinn::ConnectionError, addr: SocketAddr) -> ConnectError {
    match e {
        quinn::ConnectionError::TimedOut => {
            ConnectError::Unreachable(format!("no answer from {addr} (timed out)"))
        }
        quinn::ConnectionError::ApplicationClosed(_) => refused(e.into()),
        quinn::ConnectionError::LocallyClosed => {
            ConnectError::Other("the endpoint is closing".into())
        }
        // TLS alert 120, no_application_protocol: the listener accepts none of our ALPN ids.
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::crypto(120) =>
        {
            ConnectError::NoCommonProtocol
        }
        other => ConnectError::Tls(other.to_string()),
    }
}

/// State shared by all clones of one [`Connection`].
#[derive(Debug, Default)]
struct Shared {
    /// The code and reason we closed with, so that [`ConnectionError::ClosedLocally`] can say.
    local_close: OnceLock<(CloseCode, String)>,
    /// The endpoint's shutdown flag.
    endpoint_closing: Arc<AtomicBool>,
    /// The endpoint's tally of the connections it closed.
    closes: Arc<CloseTally>,
}

/// What one connection (or several, added up) carried: QUIC's own counters, so bytes are UDP
/// payload bytes with QUIC headers, encryption, acknowledgements and retransmissions included,
/// and a datagram sent with segmentation offload counts once per segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// UDP payload bytes sent.
    pub bytes_sent: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
    /// Packets QUIC declared lost (and retransmitted what they carried).
    pub packets_lost: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Traffic) {
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.datagrams_sent += o.datagrams_sent;
        self.datagrams_received += o.datagrams_received;
        self.packets_lost += o.packets_lost;
    }
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(mut self, o: Traffic) -> Traffic {
        self += o;
        self
    }
}

/// An established, mesh-proven connection to a peer. Cheap to clone; clones share the same
/// QUIC connection.
#[derive(Clone)]
pub struct Connection {
    inner: quinn::Connection,
    peer: NodeId,
    dialer: bool,
    /// The ALPN protocol id the TLS handshake chose.
    alpn: Arc<[u8]>,
    max_frame: usize,
    shared: Arc<Shared>,
    /// The mesh certificate the peer proved membership with (a mesh CA); `None` otherwise.
    /// Behind a pointer: inline, it made every `Connection` (and every frame sender holding
    /// one) some 200 bytes larger.
    member_cert: Option<Arc<NodeCert>>,
    /// The mesh key the peer proved membership with (a mesh key); `None` otherwise. Behind
    /// a pointer for the same reason.
    proved_key: Option<Arc<MeshKey>>,
    /// The endpoint's trust changes, seen as of this connection's start.
    trust: tokio::sync::watch::Receiver<u64>,
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
    fn new(inner: quinn::Connection, peer: NodeId, dialer: bool, ep: &Endpoint) -> Self {
        // Both configs set ALPN ids, so a finished handshake always chose one.
        let alpn = inner
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .unwrap_or_default();
        Self {
            inner,
            peer,
            dialer,
            alpn: alpn.into(),
            max_frame: ep.inner.config.max_frame_size,
            shared: Arc::new(Shared {
                local_close: OnceLock::new(),
                endpoint_closing: ep.inner.closing.clone(),
                closes: ep.inner.closes.clone(),
            }),
            member_cert: None,
            proved_key: None,
            trust: ep.inner.trust_changed.subscribe(),
        }
    }

    fn with_membership(mut self, proved: Proved) -> Self {
        match proved {
            Proved::Certificate(cert) => self.member_cert = Some(Arc::new(cert)),
            Proved::Key(key) => self.proved_key = Some(Arc::new(key)),
            Proved::Open => {}
        }
        self
    }

    /// When the peer's membership ends: the expiry of the certificate it proved membership
    /// with, in a mesh CA ([`Membership::Ca`]). A peerbus node closes the connection then
    /// with [`CloseCode::MeshProofFailed`], and the peer cannot connect again until it is
    /// issued a new certificate. `None` with a mesh key or an open mesh.
    pub fn membership_expires(&self) -> Option<SystemTime> {
        self.member_cert.as_deref().map(NodeCert::not_after)
    }

    /// The mesh certificate the peer proved membership with, as checked then (a mesh CA;
    /// `None` with a mesh key or an open mesh): its [`NodeCert::services`] say which
    /// services the peer may run.
    pub fn peer_mesh_certificate(&self) -> Option<&NodeCert> {
        self.member_cert.as_deref()
    }

    /// Changes each time [`Endpoint::renew_trust`] replaces the trusted CA certificates (or a
    /// revocation list is taken, or [`Endpoint::renew_keys`] the mesh keys) after this
    /// connection began (so a change during its proof is not missed): the peer's membership
    /// is then for [`Endpoint::recheck`] to say.
    pub fn trust_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.trust.clone()
    }

    /// Converts quinn's reason, filling in our own close code for local closes.
    pub(crate) fn convert(&self, e: quinn::ConnectionError) -> ConnectionError {
        match e {
            quinn::ConnectionError::LocallyClosed => {
                let (code, reason) = match self.shared.local_close.get() {
                    Some((c, r)) => (*c, r.clone()),
                    None if self.shared.endpoint_closing.load(Ordering::Relaxed) => {
                        (CloseCode::Shutdown, "node shutting down".into())
                    }
                    None => (CloseCode::Normal, "closed".into()),
                };
                ConnectionError::ClosedLocally { code, reason }
            }
            other => other.into(),
        }
    }

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

    /// The ALPN protocol id this connection speaks: the first of the listener's
    /// [`EndpointConfig::alpn`] ids that the dialer offered.
    pub fn alpn(&self) -> &[u8] {
        &self.alpn
    }

    /// An id unique among this endpoint's live connections.
    pub fn stable_id(&self) -> usize {
        self.inner.stable_id()
    }

    /// Current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// What the connection carried so far, as QUIC counts it (see [`Traffic`]). Still
    /// readable after the connection closed.
    pub fn traffic(&self) -> Traffic {
        let s = self.inner.stats();
        Traffic {
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
            datagrams_sent: s.udp_tx.datagrams,
            datagrams_received: s.udp_rx.datagrams,
            packets_lost: s.path.lost_packets,
        }
    }

    /// Opens a bidirectional stream. Waits while the peer's stream limit (256) is reached.
    pub async fn open_bi(&self) -> Result<(FrameSender, FrameReceiver), ConnectionError> {
        let (s, r) = self.inner.open_bi().await.map_err(|e| self.convert(e))?;
        Ok((
            FrameSender::new(s, self.max_frame, self.clone()),
            FrameReceiver::new(r, self.max_frame, self.clone()),
        ))
    }

    /// Accepts the peer's next bidirectional stream. The peer's first write opens it.
    pub async fn accept_bi(&self) -> Result<(FrameSender, FrameReceiver), ConnectionError> {
        let (s, r) = self.inner.accept_bi().await.map_err(|e| self.convert(e))?;
        Ok((
            FrameSender::new(s, self.max_frame, self.clone()),
            FrameReceiver::new(r, self.max_frame, self.clone()),
        ))
    }

    /// Opens a unidirectional stream. Waits while the peer's stream limit (256) is reached.
    pub async fn open_uni(&self) -> Result<FrameSender, ConnectionError> {
        let s = self.inner.open_uni().await.map_err(|e| self.convert(e))?;
        Ok(FrameSender::new(s, self.max_frame, self.clone()))
    }

    /// Accepts the peer's next unidirectional stream.
    pub async fn accept_uni(&self) -> Result<FrameReceiver, ConnectionError> {
        let r = self.inner.accept_uni().await.map_err(|e| self.convert(e))?;
        Ok(FrameReceiver::new(r, self.max_frame, self.clone()))
    }

    /// Closes the connection at once with a code and reason the peer will see. Unsent
    /// stream data is dropped. Only the first close counts.
    pub fn close(&self, code: CloseCode, reason: &str) {
        // Only the first close of an open connection counts (and names the reason).
        if self.inner.close_reason().is_none()
            && self
                .shared
                .local_close
                .set((code, reason.to_string()))
                .is_ok()
        {
            self.shared.closes.count(code, reason);
            if code.is_protocol_fault()
                && !crate::ca::says_revoked(reason)
                && !reason.starts_with(RETIRED_KEY)
            {
                // Rare between nodes of one build and mesh, so each names itself: the chaos
                // report counts these closes as faults, and the reason is only here.
                warn!(
                    peer = %self.peer_id(),
                    addr = %self.remote_addr(),
                    code = code.name(),
                    reason,
                    "closing a connection whose peer broke the protocol"
                );
            }
        }
        self.inner
            .close(VarInt::from_u32(code as u32), reason.as_bytes());
    }

    /// Resolves when the connection is closed, with why.
    pub async fn closed(&self) -> ConnectionError {
        let e = self.inner.closed().await;
        self.convert(e)
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.inner.close_reason().map(|e| self.convert(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    /// A raw quinn endpoint on 127.0.0.1 with a node identity and peerbus's ALPN, which
    /// completes TLS handshakes but never runs the mesh proof: a peer that stopped (frozen,
    /// or a scanner that speaks TLS and nothing more). It sends keep-alives so that its
    /// connections stay open past the proof timeout.
    fn silent_peer() -> (quinn::Endpoint, quinn::ClientConfig) {
        let certified = tls::certificate(&Identity::generate().expect("identity")).expect("cert");
        let alpn = vec![crate::ALPN.to_vec()];
        let mut transport = TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_millis(200)));
        let transport = Arc::new(transport);
        let server_tls = tls::server_config(&certified, &alpn).expect("server tls");
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).expect("quic server"),
        ));
        server.transport_config(transport.clone());
        let ep = quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr"))
            .expect("bind the silent peer");
        let (client_tls, _) = tls::client_config(&certified, None, &alpn).expect("client tls");
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).expect("quic client"),
        ));
        client.transport_config(transport);
        (ep, client)
    }

    fn keyed_endpoint(key: &MeshKey) -> Endpoint {
        let id = Identity::generate().expect("identity");
        let cfg = EndpointConfig::new(
            id,
            Membership::Key(key.clone()),
            "127.0.0.1:0".parse().expect("addr"),
        );
        Endpoint::bind(cfg).expect("bind")
    }

    /// A widened receive buffer holds more for its period, then the default again; a second
    /// widening within the first's period is not cut short by the first's timer.
    #[tokio::test]
    async fn a_widened_receive_buffer_narrows_again_after_its_period() {
        let ep = keyed_endpoint(&MeshKey::generate());
        let default = ep.receive_buffer().expect("SO_RCVBUF");
        let allowed = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        // Four times the default, or what the kernel allows (Linux reads back twice that).
        let wide = (default * 2).min(allowed);
        ep.widen_receive_buffer(wide, Duration::from_millis(100));
        let widened = ep.receive_buffer().expect("SO_RCVBUF");
        assert!(
            widened > default || allowed <= default / 2,
            "widened to {widened} B from {default} B (the kernel allows {allowed} B)"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        ep.widen_receive_buffer(wide, Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            ep.receive_buffer().expect("SO_RCVBUF"),
            widened,
            "the first timer does not narrow the second widening"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(ep.receive_buffer().expect("SO_RCVBUF"), default);
    }

    /// The application close code `conn` ended with, waiting at most `limit`.
    async fn closed_with(conn: &quinn::Connection, limit: Duration) -> Option<u64> {
        match tokio::time::timeout(limit, conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }

    /// A dial given up before its handshake completed leaves quinn a connection that it keeps,
    /// closed, for about 3 s: `close` waits until the established connections have drained,
    /// not for that one.
    #[tokio::test]
    async fn close_waits_for_established_connections_not_a_given_up_handshake() {
        let key = MeshKey::generate();
        let a = keyed_endpoint(&key);
        let b = keyed_endpoint(&key);
        let accepted = {
            let b = b.clone();
            tokio::spawn(async move { b.accept().await.expect("open").complete().await })
        };
        let _conn = a.connect(b.local_addr(), None).await.expect("dial b");
        let _accepted = accepted.await.expect("join").expect("accepted");
        // A UDP socket that never answers: the handshake with it never completes.
        let dark = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let dark = dark.local_addr().expect("address");
        let gave_up = tokio::time::timeout(Duration::from_millis(50), a.connect(dark, None)).await;
        assert!(gave_up.is_err(), "nothing answers");
        assert_eq!(a.inner.quinn.open_connections(), 2);
        assert_eq!(a.inner.half_open.count(), 1);
        assert!(!a.close_settled(), "the connection to b is open");
        a.close().await;
        assert_eq!(
            a.inner.quinn.open_connections(),
            1,
            "close waited for the connection to b to drain, and the given-up one is still kept"
        );
        assert!(
            a.close_settled(),
            "close need not wait for the given-up one"
        );
    }

    /// A peer that completes TLS and then says nothing is closed with
    /// [`CloseCode::Unresponsive`] once the proof timeout passes, whichever side dialed, and
    /// counted under that code (not as a protocol fault).
    #[tokio::test]
    async fn a_peer_silent_after_the_handshake_is_closed_as_unresponsive() {
        let key = MeshKey::generate();
        let listener = keyed_endpoint(&key);
        let dialer = keyed_endpoint(&key);
        let (silent, client) = silent_peer();
        let limit = PROOF_TIMEOUT + Duration::from_secs(10);

        // The listener's side: the silent peer dials it and never sends its proof.
        let accepted = {
            let listener = listener.clone();
            tokio::spawn(async move {
                let incoming = listener.accept().await.expect("endpoint open");
                tokio::time::timeout(limit, incoming.complete()).await
            })
        };
        let to_listener = silent
            .connect_with(client, listener.local_addr(), tls::SERVER_NAME)
            .expect("dial")
            .await
            .expect("TLS handshake with the listener");

        // The dialer's side: it dials the silent peer, which never answers its proof.
        let dialed = {
            let dialer = dialer.clone();
            let addr = silent.local_addr().expect("silent peer address");
            tokio::spawn(
                async move { tokio::time::timeout(limit, dialer.connect(addr, None)).await },
            )
        };
        let from_dialer = tokio::time::timeout(limit, silent.accept())
            .await
            .expect("the dialer dials")
            .expect("silent peer open")
            .await
            .expect("TLS handshake with the dialer");

        match accepted
            .await
            .expect("join")
            .expect("the proof timeout ends the accept")
        {
            Err(AcceptError::Failed { reason, .. }) => {
                assert!(reason.contains("mesh proof timed out"), "{reason}")
            }
            other => panic!("expected a proof timeout, got {other:?}"),
        }
        match dialed
            .await
            .expect("join")
            .expect("the proof timeout ends the dial")
        {
            Err(ConnectError::TimedOut) => {}
            other => panic!(
                "expected a proof timeout, got {:?}",
                other.map(|c| c.peer_id())
            ),
        }
        let code = Some(CloseCode::Unresponsive as u64);
        assert_eq!(closed_with(&to_listener, limit).await, code);
        assert_eq!(closed_with(&from_dialer, limit).await, code);
        for ep in [&listener, &dialer] {
            let closes = ep.local_closes();
            assert_eq!(closes.get(CloseCode::Unresponsive), 1);
            assert_eq!(closes.iter().map(|(_, n)| n).sum::<u64>(), 1, "{closes:?}");
            assert!(!CloseCode::Unresponsive.is_protocol_fault());
        }
    }
}
