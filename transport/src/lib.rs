//! peerbus transport: node identity, TLS, the QUIC endpoint, the mesh
//! membership proof and the frame codec.
//!
//! This is the only crate of peerbus that names quinn, rustls, rcgen or
//! ring. It knows nothing of messages, topics or storage: frames are any
//! serde type, encoded as a `u32` little-endian length prefix plus bincode 2
//! (`bincode::config::standard()`).
//!
//! # Tour
//!
//! - [`Identity`] / [`NodeId`]: an ed25519 key per node, kept in `<data_dir>/node.key`
//!   (mode 0600); the node id is the public key, printed as 52 lowercase base32 characters.
//! - [`MeshKey`] / [`Membership`]: who may join. Members prove the shared key with an HMAC
//!   over TLS exported keying material bound to both node ids; the key never crosses the wire.
//! - [`CaKey`] / [`MeshCa`] / [`NodeCert`]: membership by a mesh CA instead
//!   ([`Membership::Ca`]): a node presents a certificate the CA issued for its key, and
//!   refuses peers whose certificate another CA signed or that expired.
//! - [`Endpoint`] / [`Connection`]: QUIC with ALPN [`ALPN`], TLS 1.3 only, both sides
//!   presenting a certificate for their key (self-signed, or issued by the mesh CA). The
//!   dialer may pin the node id it expects ([`ConnectError::WrongPeer`]). A [`Connection`]
//!   is handed out only after the mesh proof, on both sides.
//! - [`FrameSender`] / [`FrameReceiver`]: coalescing frame I/O on streams; a malformed or
//!   oversized frame closes the connection with a [`CloseCode`].
//! - [`Faults`] / [`FaultConfig`]: optional in-process fault injection (seeded loss, delay,
//!   duplication, reordering, partitions), set through [`EndpointConfig::faults`] and
//!   changeable at run time. Off by default.
//!
//! # Transport settings
//!
//! Keep-alive every 500 ms and a 3 s idle timeout: a dead peer is noticed within about 3 s.
//! Each side may open 256 bidirectional and 256 unidirectional streams at a time. Receive
//! windows are 8 MiB per stream and 32 MiB per connection (send window 32 MiB), enough to fill
//! a LAN link from one stream; they bound what a peer can make us buffer.
//!
//! # Example
//!
//! ```
//! use peerbus_transport::{Endpoint, EndpointConfig, Identity, Membership, MeshKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let key = MeshKey::generate();
//! let local = "127.0.0.1:0".parse()?;
//! let a = Endpoint::bind(EndpointConfig::new(Identity::generate()?, Membership::Key(key.clone()), local))?;
//! let b = Endpoint::bind(EndpointConfig::new(Identity::generate()?, Membership::Key(key), local))?;
//!
//! let listener = b.clone();
//! let accepted = tokio::spawn(async move {
//!     let conn = listener.accept().await.ok_or("closed")?.complete().await?;
//!     let mut rx = conn.accept_uni().await?;
//!     let hello: Option<String> = rx.recv().await?;
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hello)
//! });
//!
//! // Pin the id we expect at that address (discovery tells us).
//! let conn = a.connect(b.local_addr(), Some(b.node_id())).await?;
//! let mut tx = conn.open_uni().await?;
//! tx.push(&"hello".to_string())?; // buffered, no I/O
//! tx.finish().await?; // one write, then end of stream
//! assert_eq!(accepted.await?.map_err(|e| e.to_string())?.as_deref(), Some("hello"));
//! a.close().await;
//! b.close().await;
//! # Ok(())
//! # }
//! ```

mod ca;
mod endpoint;
mod error;
mod fault;
mod frame;
mod identity;
mod membership;
mod tls;

use std::time::Duration;

pub use ca::{
    CA_CERT_FILE, CA_CRL_FILE, CA_KEY_FILE, CA_VALIDITY, CRL_NEXT_UPDATE, CaKey, MAX_CA_CERTS,
    MAX_NODE_VALIDITY, MAX_REVOKED, MeshCa, NodeCert, RevocationListInfo, SERVICE_URI,
    certificate_request, read_revocation_lists, revocation_lists_pem, says_revoked,
    write_replacing,
};
pub use endpoint::{
    CloseCounts, Connection, Endpoint, EndpointConfig, Incoming, ListTaken, RETIRED_KEY, Traffic,
};
pub use error::{
    AcceptError, BindError, CaError, CloseCode, ConnectError, ConnectionError, IdParseError,
    IdentityError, MeshKeyError,
};
pub use fault::{FaultConfig, FaultStats, Faults};
pub use frame::{
    FrameError, FrameReceiver, FrameSender, SHARED_PAYLOAD_MIN, decode_body, decode_frame,
    encode_frame,
};
pub use identity::{Identity, NodeId};
pub use membership::{MAX_MESH_KEYS, Membership, MeshKey};

/// The default ALPN protocol id of peerbus connections ([`EndpointConfig::alpn`]).
pub const ALPN: &[u8] = b"peerbus/1";
/// Most ALPN ids one endpoint offers ([`EndpointConfig::alpn`]).
pub const MAX_ALPN_PROTOCOLS: usize = 8;
/// Default largest frame accepted (8 MiB). Larger frames close the connection with
/// [`CloseCode::FrameTooLarge`].
pub const DEFAULT_MAX_FRAME_SIZE: usize = 8 * 1024 * 1024;
/// Default QUIC keep-alive interval: an idle connection still carries a packet this often.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// Default idle timeout: a peer that sends nothing (not even keep-alives) for this long is
/// considered dead, so a dead peer is noticed within about 3 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
