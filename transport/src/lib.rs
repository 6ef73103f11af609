//! peerbus transport: node identity, TLS, the QUIC endpoint, the mesh
//! membership proof and the frame codec.
//!
//! This is the only crate of peerbus that names quinn, rustls, rcgen or
//! ring. It knows nothing of messages, topics or storage: frames are any
//! serde type, encoded as a `u32` little-endian length prefix plus bincode 2.
//!
//! - [`Identity`] / [`NodeId`]: an ed25519 key per node; the id is the public key.
//! - [`MeshKey`] / [`Membership`]: who may join.
//! - [`Endpoint`] / [`Connection`]: QUIC with ALPN [`ALPN`], TLS 1.3, both sides
//!   presenting a self-signed certificate for their key, then the mesh proof.
//! - [`FrameSender`] / [`FrameReceiver`]: coalescing frame I/O on streams.

mod endpoint;
mod error;
mod frame;
mod identity;
mod membership;
mod tls;

use std::time::Duration;

pub use endpoint::{Connection, Endpoint, EndpointConfig, Incoming};
pub use error::{
    AcceptError, BindError, CloseCode, ConnectError, ConnectionError, IdParseError, IdentityError,
    MeshKeyError,
};
pub use frame::{FrameError, FrameReceiver, FrameSender, decode_frame, encode_frame};
pub use identity::{Identity, NodeId};
pub use membership::{Membership, MeshKey};

/// ALPN protocol id of peerbus connections.
pub const ALPN: &[u8] = b"peerbus/1";
/// Default largest frame accepted (8 MiB). Larger frames close the connection with
/// [`CloseCode::FrameTooLarge`].
pub const DEFAULT_MAX_FRAME_SIZE: usize = 8 * 1024 * 1024;
/// Default QUIC keep-alive interval: an idle connection still carries a packet this often.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// Default idle timeout: a peer that sends nothing (not even keep-alives) for this long is
/// considered dead, so a dead peer is noticed within about 3 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
